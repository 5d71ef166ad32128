//! More than one link between two hosts, in the two-host lab with two ntb
//! links (`SSOCK_LAB_LINKS=2`: two windows, each from its own ivshmem
//! server): a new connection crosses the first link that is up, or with
//! `link_policy = "spread"` the next in turn (both devds agree: its
//! channel id names the link, docs/protocol.md 8.4); when a link goes
//! down, the connections over it move onto the other link with no byte
//! on TCP (8.7), whichever host saw it go down first;
//! when no other link is up they move to their kernel sockets (8.5) and
//! back onto a link once one is (8.6); with no link left, new connections
//! start on TCP. Every byte is checked by the programs themselves
//! (tests/apps/remote.py, redis-benchmark and iperf3 by their own output),
//! and devd's statistics show which link each connection crosses and how
//! it moved.

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

/// Both hosts count `n` moves onto another link and no connection on TCP.
fn moved_without_tcp(lab: &TwoHosts, n: u64) -> Result<()> {
    for h in 0..2 {
        let t = settled(lab, h, |t| t["remote"]["migrations"].as_u64() >= Some(n))?;
        ensure!(
            t["remote"]["migrations"].as_u64() == Some(n)
                && t["remote"]["failovers"] == 0
                && t["remote"]["failover_resets"] == 0
                && t["violations"] == 0,
            "host {h}: {n} moves onto another link, none to TCP: {t}\n{}",
            lab.log(h)
        );
    }
    Ok(())
}

#[test]
fn a_link_that_goes_down_moves_its_connections_onto_the_other_with_no_byte_on_tcp() -> Result<()> {
    let Some(lab) = ready_with("links", TWO_LINKS)? else {
        return Ok(());
    };
    both_links_up(&lab)?;
    let (mut server, mut clients, flag) = steady_streams(&lab, 6800, 2)?;
    let (py, b) = (remote_py(), lab.addr[1].clone());
    // Both cross link 0, the first one up.
    on_link(&lab, 0, 0, 2)?;
    on_link(&lab, 1, 0, 2)?;
    // Host a (the connectors' side) takes link 0 out of service: both
    // connections go on over link 1, TCP untouched.
    lab.set_links(0, Some(0), false)?;
    for h in 0..2 {
        for c in on_link(&lab, h, 1, 2)? {
            ensure!(
                c["migrations"] == 1 && c["failovers"] == 0,
                "host {h}: moved once, onto link 1: {c}"
            );
        }
    }
    moved_without_tcp(&lab, 2)?;
    // Their bytes cross link 1 now (host a's only link up).
    for h in 0..2 {
        let before = queued_bytes(&totals(&lab, h)?);
        queued_past(
            &lab,
            h,
            before + (16 << 20),
            Duration::from_secs(10),
            "no bytes cross link 1",
        )?;
    }
    // A new connection, once host b (whose devd picks a new connection's
    // link) has seen link 0 go down too (within its 2 s heartbeat bound),
    // crosses link 1 from the start: not made on TCP, not moved.
    lab.wait_peer(1, UP, "saw link 0 down", |p| {
        p["links"][0]["state"] == "down"
    })?;
    let before = totals(&lab, 0)?;
    let mut c = Prog::start(lab.under_ssock(0, &["python3", &py, "stream", &b, "6800", "64"]))?;
    c.expect(&["OK 67108864"], Duration::from_secs(60))?;
    server.expect(&["ECHOED 67108864"], Duration::from_secs(10))?;
    let t = settled(&lab, 0, |t| remote_count(t) > remote_count(&before))?;
    ensure!(
        remote_count(&t) == remote_count(&before) + 1
            && t["remote"]["made_while_down"] == before["remote"]["made_while_down"]
            && t["remote"]["failovers"] == 0
            && queued_bytes(&t) - queued_bytes(&before) >= 120 << 20,
        "the new connection should have crossed link 1 at once: {before}\n{t}"
    );
    // Link 0 back; then host b (the acceptors' side, whose devd named the
    // channels) takes link 1 out of service: back onto link 0.
    lab.set_links(0, Some(0), true)?;
    both_links_up(&lab)?;
    lab.set_links(1, Some(1), false)?;
    for h in 0..2 {
        for c in on_link(&lab, h, 0, 2)? {
            ensure!(
                c["migrations"] == 2 && c["failovers"] == 0,
                "host {h}: moved twice, back onto link 0: {c}"
            );
        }
    }
    moved_without_tcp(&lab, 4)?;
    // The streams end whole.
    ended_whole(&mut server, &mut clients, &flag)?;
    // With no link left, a new connection starts on its kernel socket.
    lab.set_links(1, Some(0), false)?;
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

#[test]
fn three_streams_at_full_speed_cross_onto_the_other_link_when_theirs_fails_and_lose_no_byte(
) -> Result<()> {
    let Some(lab) = ready_with("linkload", TWO_LINKS)? else {
        return Ok(());
    };
    both_links_up(&lab)?;
    let py = remote_py();
    let mut server = echo_server(&lab, 1, 6810, true)?;
    heard(&lab, 0, 6810)?;
    let b = lab.addr[1].clone();
    // 512 MiB each way each, as fast as they go, every byte of the echo
    // checked at its offset: bytes in flight everywhere when link 0 goes.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Prog::start(
            lab.under_ssock(0, &["python3", &py, "stream", &b, "6810", "512"]),
        )?);
    }
    on_link(&lab, 0, 0, 3)?;
    on_link(&lab, 1, 0, 3)?;
    lab.set_links(1, Some(0), false)?;
    for c in &mut clients {
        c.expect(&["OK 536870912"], Duration::from_secs(60))?;
        ensure!(c.wait(Duration::from_secs(10))?.success(), "{}", c.all());
    }
    for _ in 0..3 {
        server.expect(&["ECHOED 536870912"], Duration::from_secs(10))?;
    }
    moved_without_tcp(&lab, 3)?;
    Ok(())
}

#[test]
fn redis_benchmark_and_iperf3_run_through_a_link_failure_onto_the_other_link_without_an_error(
) -> Result<()> {
    for app in ["redis-server", "redis-benchmark", "iperf3"] {
        if !ssock_tests::have_app(app)? {
            return Ok(());
        }
    }
    let Some(lab) = ready_with("linkapps", TWO_LINKS)? else {
        return Ok(());
    };
    both_links_up(&lab)?;
    let _servers = [
        redis_server(&lab, 1, "6392")?,
        Prog::start(lab.under_ssock(1, &["iperf3", "-s", "-1", "-p", "5213"]))?,
    ];
    for port in [6392, 5213] {
        heard(&lab, 0, port)?;
    }
    let b = lab.addr[1].clone();
    let bench = Prog::start(lab.under_ssock(
        0,
        &[
            "redis-benchmark",
            "-h",
            &b,
            "-p",
            "6392",
            "-n",
            "400000",
            "-c",
            "4",
            "-t",
            "get",
            "-q",
        ],
    ))?;
    let iperf = Prog::start(lab.under_ssock(
        0,
        &["iperf3", "-c", &b, "-p", "5213", "-t", "4", "-l", "64K"],
    ))?;
    // redis-benchmark's 4 connections and iperf3's control and data
    // connections cross link 0 when it goes down.
    on_link(&lab, 0, 0, 5)?;
    lab.set_links(0, Some(0), false)?;
    for (mut p, what, ok) in [
        (bench, "redis-benchmark", "GET: "),
        (iperf, "iperf3", "receiver"),
    ] {
        let status = p.wait(Duration::from_secs(120))?;
        let out = p.all().replace('\r', "\n");
        ensure!(
            status.success()
                && out.lines().any(|l| l.contains(ok))
                && !out.to_lowercase().contains("error"),
            "{what} through the link failure:\n{out}"
        );
    }
    for h in 0..2 {
        let t = totals(&lab, h)?;
        ensure!(
            t["remote"]["migrations"].as_u64() >= Some(5)
                && t["remote"]["failovers"] == 0
                && t["remote"]["failover_resets"] == 0,
            "host {h}: their connections should have moved onto link 1, none to TCP: {t}\n{}",
            lab.log(h)
        );
    }
    Ok(())
}

#[test]
fn when_the_last_link_up_fails_connections_go_to_tcp_and_onto_another_link_once_one_is_back(
) -> Result<()> {
    let Some(lab) = ready_with("linklast", TWO_LINKS)? else {
        return Ok(());
    };
    both_links_up(&lab)?;
    // Link 1 is out of service from the start (both hosts see it down).
    lab.set_links(0, Some(1), false)?;
    lab.wait_peer(1, UP, "saw link 1 down", |p| {
        p["links"][1]["state"] == "down"
    })?;
    let (mut server, mut clients, flag) = steady_streams(&lab, 6820, 2)?;
    on_link(&lab, 0, 0, 2)?;
    // Link 0 goes too: no link left, so both connections move to TCP.
    lab.set_links(0, Some(0), false)?;
    for h in 0..2 {
        let t = settled(&lab, h, |t| t["remote"]["failovers"].as_u64() >= Some(2))?;
        ensure!(
            t["remote"]["failovers"] == 2
                && t["remote"]["migrations"] == 0
                && t["remote"]["failover_resets"] == 0,
            "host {h}: both to TCP: {t}\n{}",
            lab.log(h)
        );
    }
    // Link 1 back: they move forward onto it.
    lab.set_links(0, Some(1), true)?;
    for h in 0..2 {
        for c in on_link(&lab, h, 1, 2)? {
            ensure!(
                c["forwards"].as_u64() >= Some(1),
                "host {h}: moved forward onto link 1: {c}"
            );
        }
    }
    ended_whole(&mut server, &mut clients, &flag)?;
    Ok(())
}

#[test]
fn a_move_the_other_devd_does_not_answer_in_time_goes_to_tcp_and_loses_no_byte() -> Result<()> {
    let Some(lab) = ready_with("linkstop", TWO_LINKS)? else {
        return Ok(());
    };
    both_links_up(&lab)?;
    let (mut server, mut clients, flag) = steady_streams(&lab, 6830, 2)?;
    on_link(&lab, 0, 0, 2)?;
    on_link(&lab, 1, 0, 2)?;
    // Host b's devd stops answering; host a's link 0 goes down: host a
    // stops both connections for a move and says so, hears nothing, and
    // after its bound moves them to TCP instead.
    let devd_b = lab.devd_pid(1)?;
    // SAFETY: kill on the lab's devd of host b, which this test started.
    ensure!(unsafe { libc::kill(devd_b, libc::SIGSTOP) } == 0);
    lab.set_links(0, Some(0), false)?;
    let t = Instant::now();
    while !lab
        .log(0)
        .contains("did not agree on a move onto another link")
    {
        if t.elapsed() > Duration::from_secs(10) {
            // SAFETY: as above.
            unsafe { libc::kill(devd_b, libc::SIGCONT) };
            anyhow::bail!("host a never gave the move up:\n{}", lab.log(0));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Host b's devd resumes within the fail-over's own bound: both hosts
    // agree where each direction goes on over TCP.
    // SAFETY: as above.
    ensure!(unsafe { libc::kill(devd_b, libc::SIGCONT) } == 0);
    for h in 0..2 {
        let t = settled(&lab, h, |t| t["remote"]["failovers"].as_u64() >= Some(2))?;
        ensure!(
            t["remote"]["failovers"] == 2 && t["remote"]["failover_resets"] == 0,
            "host {h}: both to TCP, none reset: {t}\n{}",
            lab.log(h)
        );
    }
    ended_whole(&mut server, &mut clients, &flag)?;
    Ok(())
}

#[test]
fn spread_deals_connections_over_both_links_and_a_failed_one_moves_its_share_onto_the_other(
) -> Result<()> {
    let spread = [TWO_LINKS, &[("SSOCK_LAB_LINK_POLICY", "spread")][..]].concat();
    let Some(lab) = ready_with("linkspread", &spread)? else {
        return Ok(());
    };
    both_links_up(&lab)?;
    let (mut server, mut clients, flag) = steady_streams(&lab, 6840, 4)?;
    // Host b's devd names each channel, and deals them in turn: two
    // cross link 0, two link 1, and both hosts say so.
    for h in 0..2 {
        for link in 0..2 {
            let on = on_link(&lab, h, link, 2)?;
            ensure!(
                on.len() == 2 && on.iter().all(|c| c["migrations"] == 0),
                "host {h}: two connections on link {link} from the start: {on:?}"
            );
        }
    }
    // Both links carry bytes at once: each link's connections moved
    // more than what they had acknowledged when first seen.
    let acked = |h: usize, link: u64| -> Result<u64> {
        Ok(lab.stats(h)?["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["path"] == "link" && c["link"] == link)
            .filter_map(|c| c["acked"].as_u64())
            .sum())
    };
    let before = [acked(0, 0)?, acked(0, 1)?];
    let t = Instant::now();
    while acked(0, 0)? < before[0] + (4 << 20) || acked(0, 1)? < before[1] + (4 << 20) {
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "both links should carry bytes: {before:?} then {} {}",
            acked(0, 0)?,
            acked(0, 1)?
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Host a takes link 1 out of service: its two connections move onto
    // link 0, TCP untouched; the streams end whole.
    lab.set_links(0, Some(1), false)?;
    for h in 0..2 {
        let on = on_link(&lab, h, 0, 4)?;
        ensure!(
            on.iter().filter(|c| c["migrations"] == 1).count() == 2
                && on.iter().all(|c| c["failovers"] == 0),
            "host {h}: link 1's two moved onto link 0: {on:?}"
        );
    }
    moved_without_tcp(&lab, 2)?;
    ended_whole(&mut server, &mut clients, &flag)?;
    Ok(())
}
