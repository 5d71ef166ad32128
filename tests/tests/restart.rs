//! A devd SIGKILLed under load in the two-host lab and started again
//! (docs/protocol.md 8.8): its remote connections go on over their kernel
//! sockets at the offsets its clients and the other host's devd agree on
//! through the new devd, every byte checked by the programs themselves
//! (tests/apps/remote.py: the pattern at its offset, both directions, and
//! the echo server's count of what it echoed); the other host's devd counts
//! each one moved (`remote.failovers`), none reset; and new connections
//! cross the link again, to the listener registered with the dead devd
//! too (its process registers it with the new one).

mod common;

use anyhow::{ensure, Result};
use common::*;
use std::time::{Duration, Instant};

/// Host `killed`'s devd dies under two verified streams (echo server on
/// host b, clients on host a) and is started again at once.
fn killed_and_started_again(name: &str, killed: usize) -> Result<()> {
    let Some(lab) = ready(name)? else {
        return Ok(());
    };
    let (mut server, mut clients, flag) = steady_streams(&lab, 6900, 2)?;
    // Both carry bytes across the link.
    let t = Instant::now();
    loop {
        let on = lab.stats(0)?["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["path"] == "link" && c["acked"].as_u64() > Some(1 << 20))
            .count();
        if on >= 2 {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the streams did not cross the link: {}",
            lab.stats(0)?
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let other = 1 - killed;
    let pid = lab.devd_pid(killed)?;
    // SAFETY: kill on the lab's devd, which this test started.
    ensure!(unsafe { libc::kill(pid, libc::SIGKILL) } == 0);
    std::thread::sleep(Duration::from_millis(200));
    lab.restart_devd(killed)?;
    // The other host's devd moved both to TCP with the new devd's help.
    let t = settled(&lab, other, |t| {
        t["remote"]["failovers"].as_u64() >= Some(2)
    })?;
    ensure!(
        t["remote"]["failovers"] == 2 && t["remote"]["failover_resets"] == 0,
        "host {other}: both moved, none reset: {t}\n{}\n{}",
        lab.log(other),
        lab.log(killed)
    );
    ensure!(
        lab.log(killed)
            .matches("agreed where the connection")
            .count()
            == 2
            && lab
                .log(other)
                .matches("started again; agreeing where")
                .count()
                == 2,
        "the new devd on host {killed} relayed both agreements:\n{}\n{}",
        lab.log(killed),
        lab.log(other)
    );
    // The streams go on over TCP and end whole.
    std::thread::sleep(Duration::from_millis(300));
    ended_whole(&mut server, &mut clients, &flag)?;
    // New connections cross the link again once it is back: to a new
    // listener at once; to the one registered with the dead devd once its
    // process found its session broken and registered it again (its first
    // accept after the restart does), and the other host heard of it.
    lab.wait_linked(UP)?;
    let py = remote_py();
    let b = lab.addr[1].clone();
    let mut server2 = echo_server(&lab, 1, 6901, true)?;
    heard(&lab, 0, 6901)?;
    for (port, tries, srv) in [("6901", 1, &mut server2), ("6900", 3, &mut server)] {
        let mut crossed = false;
        for _ in 0..tries {
            let before = totals(&lab, 0)?;
            let mut c =
                Prog::start(lab.under_ssock(0, &["python3", &py, "stream", &b, port, "16"]))?;
            c.expect(&["OK 16777216"], Duration::from_secs(60))?;
            srv.expect(&["ECHOED 16777216"], Duration::from_secs(10))?;
            let after = settled(&lab, 0, |t| remote_count(t) > remote_count(&before))?;
            if remote_count(&after) == remote_count(&before) + 1
                && queued_bytes(&after) >= queued_bytes(&before) + (16 << 20)
            {
                crossed = true;
                break;
            }
            // (Until then on kernel TCP, every byte checked all the same.)
            std::thread::sleep(Duration::from_millis(300));
        }
        ensure!(
            crossed,
            "no new connection to port {port} crossed the link within {tries}:\n{}\n{}",
            lab.log(0),
            lab.log(1)
        );
    }
    Ok(())
}

#[test]
fn the_acceptors_devd_killed_and_started_again_under_load_loses_no_byte() -> Result<()> {
    killed_and_started_again("restartb", 1)
}

#[test]
fn the_connectors_devd_killed_and_started_again_under_load_loses_no_byte() -> Result<()> {
    killed_and_started_again("restarta", 0)
}
