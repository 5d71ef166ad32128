//! More than one link between two hosts, in the two-host lab with two ntb
//! links (`SSOCK_LAB_LINKS=2`: two windows, each from its own ivshmem
//! server): a new connection crosses the first link that is up (both
//! devds agree: its channel id names the link, docs/protocol.md 8.4);
//! when that link goes down, the connections over it move to their kernel
//! sockets and, once the other host's devd agrees, onto the other link
//! (fail-forward, 8.6), while new connections cross the other link at
//! once; only when no link is left do new connections start on TCP. Every
//! byte is checked by the programs themselves (tests/apps/remote.py), and
//! devd's statistics show which link each connection crosses.

mod common;

use anyhow::{ensure, Result};
use common::*;
use ssock_tests::lab::TwoHosts;
use std::time::{Duration, Instant};

/// Two links, and connections move forward 300 ms after a link is back.
const TWO_LINKS: &[(&str, &str)] = &[
    ("SSOCK_LAB_LINKS", "2"),
    ("SSOCK_LAB_FAIL_FORWARD_MS", "300"),
];

/// Waits until both hosts see each of the two links up.
fn both_links_up(lab: &TwoHosts) -> Result<()> {
    for h in 0..2 {
        lab.wait_peer(h, UP, "up with both links", |p| {
            p["links"]
                .as_array()
                .is_some_and(|l| l.len() == 2 && l.iter().all(|l| l["state"] == "up"))
        })?;
    }
    Ok(())
}

/// Waits until host `h` shows `n` live remote connections crossing link
/// `link`, each of which carried bytes across it; returns them.
fn on_link(lab: &TwoHosts, h: usize, link: u64, n: usize) -> Result<Vec<serde_json::Value>> {
    let t = Instant::now();
    loop {
        let v = lab.stats(h)?;
        let there: Vec<serde_json::Value> = v["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["path"] == "link" && c["link"] == link && c["acked"].as_u64() > Some(0))
            .cloned()
            .collect();
        if there.len() >= n {
            return Ok(there);
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "host {h}: {} of {n} connections moving bytes on link {link}: {}\n{}\n{}",
            there.len(),
            v["connections"],
            lab.log(0),
            lab.log(1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_link_that_goes_down_moves_its_connections_onto_the_other_and_new_ones_go_there_at_once(
) -> Result<()> {
    let Some(lab) = ready_with("links", TWO_LINKS)? else {
        return Ok(());
    };
    both_links_up(&lab)?;
    let py = remote_py();
    let mut server = echo_server(&lab, 1, 6800, true)?;
    heard(&lab, 0, 6800)?;
    let b = lab.addr[1].clone();
    // Two connections streaming (64 KiB a millisecond each way) until the
    // flag, every byte of the echo checked.
    let flag = lab.dir.join("flag").to_string_lossy().into_owned();
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(Prog::start(
            lab.under_ssock(0, &["python3", &py, "steady", &b, "6800", &flag]),
        )?);
    }
    // Both cross link 0, the first one up.
    on_link(&lab, 0, 0, 2)?;
    on_link(&lab, 1, 0, 2)?;
    // Host a takes link 0 out of service: its connections go on over
    // TCP, then onto link 1 once host b's devd sees link 0 down too.
    lab.set_links(0, Some(0), false)?;
    let moved = on_link(&lab, 0, 1, 2)?;
    for c in &moved {
        ensure!(
            c["failovers"].as_u64() >= Some(1) && c["forwards"].as_u64() >= Some(1),
            "each moved off link 0 and onto link 1: {c}"
        );
    }
    // A new connection while link 0 is down crosses link 1 from the
    // start: not made on TCP, not moved.
    let before = totals(&lab, 0)?;
    let mut c = Prog::start(lab.under_ssock(0, &["python3", &py, "stream", &b, "6800", "64"]))?;
    c.expect(&["OK 67108864"], Duration::from_secs(60))?;
    server.expect(&["ECHOED 67108864"], Duration::from_secs(10))?;
    let t = settled(&lab, 0, |t| remote_count(t) > remote_count(&before))?;
    ensure!(
        remote_count(&t) == remote_count(&before) + 1
            && t["remote"]["made_while_down"] == before["remote"]["made_while_down"]
            && t["remote"]["failovers"] == before["remote"]["failovers"]
            && queued_bytes(&t) - queued_bytes(&before) >= 120 << 20,
        "the new connection should have crossed link 1 at once: {before}\n{t}"
    );
    // The streams end whole.
    std::fs::write(&flag, b"")?;
    let mut sent = Vec::new();
    for c in &mut clients {
        let line = c.expect(&["OK ", "CORRUPT", "SHORT"], Duration::from_secs(60))?;
        ensure!(line.starts_with("OK "), "{line}\n{}", c.all());
        sent.push(format!("ECHOED {}", line["OK ".len()..].trim()));
    }
    // (The server's two lines come in either order.)
    let mut echoed = Vec::new();
    for _ in 0..2 {
        let line = server.expect(&["ECHOED ", "RESET "], Duration::from_secs(10))?;
        echoed.push(line.trim().to_string());
    }
    sent.sort();
    echoed.sort();
    ensure!(
        sent == echoed,
        "the clients had {sent:?}, the server said {echoed:?}"
    );
    for h in 0..2 {
        let t = totals(&lab, h)?;
        ensure!(
            t["remote"]["failover_resets"] == 0 && t["violations"] == 0,
            "host {h}: {t}"
        );
    }
    // With no link left, a new connection starts on its kernel socket.
    lab.set_links(0, Some(1), false)?;
    lab.wait_peer(0, UP, "saw both links down", |p| p["link"] == "down")?;
    let before = totals(&lab, 0)?;
    let mut c = Prog::start(lab.under_ssock(0, &["python3", &py, "stream", &b, "6800", "8"]))?;
    c.expect(&["OK 8388608"], Duration::from_secs(60))?;
    server.expect(&["ECHOED 8388608"], Duration::from_secs(10))?;
    let t = settled(&lab, 0, |t| {
        t["remote"]["made_while_down"].as_u64() > before["remote"]["made_while_down"].as_u64()
    })?;
    ensure!(
        t["remote"]["made_while_down"].as_u64()
            == before["remote"]["made_while_down"].as_u64().map(|n| n + 1),
        "with no link up it starts on TCP: {before}\n{t}"
    );
    Ok(())
}
