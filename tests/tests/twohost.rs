//! The two-host lab (`tools/two-host-lab.sh`): two network namespaces
//! joined by a veth pair, an ntb window from an ivshmem server, a devd in
//! each. Today: the devds become peers over the veth (their control
//! connection, the link's key proved) and their ntb link comes up over the
//! window (heartbeats); a stopped devd takes both down and they return.
//! Remote connections are the next part of the "Two hosts" issue.

use anyhow::{ensure, Context, Result};
use ssock_tests::lab::{self, TwoHosts};
use std::time::Duration;

const UP: Duration = Duration::from_secs(15);

#[test]
fn two_hosts_become_peers_over_the_veth_and_their_ntb_link_comes_up() -> Result<()> {
    if !lab::available()? {
        return Ok(());
    }
    let lab = TwoHosts::up("peers")?;
    for h in 0..2 {
        let v = lab.wait_peer(h, UP, "up with its link", |p| {
            p["state"] == "up" && p["link"] == "up"
        })?;
        let p = &v["peers"][0];
        ensure!(
            p["address"].as_str() == Some(format!("{}:7455", lab.addr[1 - h]).as_str()),
            "host {h} reaches its peer at {}",
            p["address"]
        );
        ensure!(p["node"] == [2, 1][h] && p["ups"] == 1, "{p}");
        ensure!(
            v["devd"]["backend"] == "loopback+ntb",
            "devd's backend: {}",
            v["devd"]["backend"]
        );
    }
    // ringstat on host a, run inside its namespace against its devd.
    let out = lab
        .on(0, &ssock_tests::bin("ringstat").to_string_lossy())
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(
        table
            .lines()
            .any(|l| l.contains(&lab.addr[1]) && l.contains(" up ")),
        "ringstat on host a:\n{table}"
    );
    Ok(())
}

#[test]
fn a_stopped_devd_takes_the_link_and_the_peer_down_and_both_return() -> Result<()> {
    if !lab::available()? {
        return Ok(());
    }
    let lab = TwoHosts::up("stop")?;
    lab.wait_peer(0, UP, "up with its link", |p| {
        p["state"] == "up" && p["link"] == "up"
    })?;
    let b = lab.devd_pid(1)?;
    let signal = |sig| {
        // SAFETY: kill on the lab's devd of host b, which this test started.
        unsafe { libc::kill(b, sig) }
    };
    ensure!(signal(libc::SIGSTOP) == 0);
    let r = (|| -> Result<()> {
        // The heartbeat stops first (2 s), the control connection's pings
        // next (3 s).
        lab.wait_peer(0, UP, "saw the link down", |p| p["link"] == "down")?;
        lab.wait_peer(0, UP, "saw the peer down", |p| p["state"] != "up")?;
        Ok(())
    })();
    ensure!(signal(libc::SIGCONT) == 0);
    r?;
    let v = lab.wait_peer(0, UP, "back up", |p| {
        p["state"] == "up" && p["link"] == "up"
    })?;
    let p = &v["peers"][0];
    ensure!(
        p["ups"] == 2 && p["link_changes"] == 3,
        "up twice, link up-down-up: {p}"
    );
    ensure!(
        lab.log(0).contains("link to node 2 down"),
        "devd's log says nothing of the link:\n{}",
        lab.log(0)
    );
    Ok(())
}

#[test]
fn a_killed_devd_leaves_the_other_serving() -> Result<()> {
    if !lab::available()? {
        return Ok(());
    }
    let lab = TwoHosts::up("kill")?;
    lab.wait_peer(0, UP, "up with its link", |p| {
        p["state"] == "up" && p["link"] == "up"
    })?;
    let b = lab.devd_pid(1)?;
    // SAFETY: kill on the lab's devd of host b, which this test started.
    ensure!(unsafe { libc::kill(b, libc::SIGKILL) } == 0);
    // Host a hears it from the control connection at once, from the window
    // (the ivshmem server's news that b left, read by the sandboxed
    // engine) and from the heartbeat.
    lab.wait_peer(0, UP, "saw the peer go", |p| {
        p["state"] != "up" && p["link"] == "down"
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let v = lab.stats(0)?;
    ensure!(
        v["devd"]["pid"] == lab.devd_pid(0)?,
        "host a's devd: {}",
        v["devd"]
    );
    Ok(())
}

#[test]
fn a_listener_on_one_host_is_advertised_to_the_other_while_it_lives() -> Result<()> {
    if !lab::available()? || !ssock_tests::have_app("python3")? {
        return Ok(());
    }
    let lab = TwoHosts::up("adverts")?;
    lab.wait_peer(0, UP, "up", |p| p["state"] == "up")?;
    // A program under ssock-run on host b listens (devd b registers it).
    let run = ssock_tests::bin("ssock-run");
    let mut srv = lab
        .on(1, &run.to_string_lossy())
        .arg("--devd")
        .arg(lab.socket(1))
        .args([
            "--",
            "python3",
            "-c",
            "import socket,sys,time\n\
             s=socket.socket(); s.bind(('0.0.0.0',0)); s.listen()\n\
             print(s.getsockname()[1], flush=True); sys.stdin.read()",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(srv.stdout.take().expect("stdout")),
        &mut line,
    )?;
    let port: u16 = line
        .trim()
        .parse()
        .with_context(|| format!("the listener on host b printed {line:?}, not its port"))?;
    let want = format!("0.0.0.0:{port}");
    let seen = lab.wait_peer(0, UP, "heard of the listener", |p| {
        p["listeners"]
            .as_array()
            .is_some_and(|l| l.iter().any(|a| a == want.as_str()))
    });
    // The program ends: its listener leaves host a's list too.
    drop(srv.stdin.take());
    let _ = srv.wait();
    seen?;
    lab.wait_peer(0, Duration::from_secs(30), "forgot the listener", |p| {
        p["state"] == "up"
            && p["listeners"]
                .as_array()
                .is_some_and(|l| !l.iter().any(|a| a == want.as_str()))
    })?;
    Ok(())
}
