//! Connections between the two hosts of the lab (`tools/two-host-lab.sh`):
//! unmodified programs under `ssock-run` on host a talking to programs on
//! host b, their bytes carried by the two devds' engines over the ntb
//! window. Each test checks through both devds' statistics that its
//! connections crossed as remote Queued connections (`remote.connections`,
//! which only a channel opened to the peer node counts), or, for plain
//! peers, that they stayed on kernel TCP.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use std::time::{Duration, Instant};

#[test]
fn echo_of_256_mib_each_way_crosses_the_ntb_link_both_ways_round() -> Result<()> {
    let Some(lab) = ready("echo")? else {
        return Ok(());
    };
    // Host a connects to host b, then host b to host a (the other end of
    // the link picks the channel then).
    for (cli, srv, port) in [(0, 1, 6100), (1, 0, 6101)] {
        let before = [totals(&lab, 0)?, totals(&lab, 1)?];
        let mut server = echo_server(&lab, srv, port, true)?;
        let py = remote_py();
        let (dst, port) = (lab.addr[srv].clone(), port.to_string());
        let mut c =
            Prog::start(lab.under_ssock(cli, &["python3", &py, "stream", &dst, &port, "256"]))?;
        // While it streams, the client's devd shows what the other host
        // acknowledged of its end's stream: never more than it sent, and
        // more than nothing at some point.
        let t = Instant::now();
        let mut acked = 0;
        while acked == 0 && t.elapsed() < Duration::from_secs(60) {
            for conn in lab.stats(cli)?["connections"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if conn["backend"] != "ntb" {
                    continue;
                }
                let here = conn["local"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&format!("{}:", lab.addr[cli])));
                let sent = conn[if here { "bytes_c2a" } else { "bytes_a2c" }].as_u64();
                let a = conn["acked"].as_u64().context("acked")?;
                ensure!(Some(a) <= sent, "acked beyond what was sent: {conn}");
                acked = acked.max(a);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        ensure!(acked > 0, "host {cli} never showed acknowledged bytes");
        c.expect(&["OK 268435456"], Duration::from_secs(120))?;
        ensure!(c.wait(Duration::from_secs(10))?.success(), "{}", c.all());
        server.expect(&["ECHOED 268435456"], Duration::from_secs(10))?;
        for (h, before) in before.iter().enumerate() {
            let t = settled(&lab, h, |t| remote_count(t) > remote_count(before))?;
            ensure!(
                remote_count(&t) == remote_count(before) + 1,
                "host {h}: one more remote connection: {t}"
            );
            // Each devd's engine moved the connection's bytes, both
            // directions counted (512 MiB in all), but the first ones,
            // written on the kernel socket before the writer moved:
            // usually one write, but on a loaded machine the claim may
            // take tens of milliseconds to come through the peers, so
            // half is asked for.
            ensure!(
                queued_bytes(&t) - queued_bytes(before) >= 256 << 20,
                "host {h}: the bytes did not go through its engine: {t}"
            );
            ensure!(t["violations"] == 0, "host {h}: {t}");
        }
    }
    Ok(())
}

#[test]
fn plain_peers_on_either_host_stay_on_kernel_tcp_with_their_bytes_unchanged() -> Result<()> {
    let Some(lab) = ready("plain")? else {
        return Ok(());
    };
    let py = remote_py();
    let dst = lab.addr[1].clone();
    // A plain client on host a, a server under ssock-run on host b: b's
    // Claim finds no intent on a, the connection stays on kernel TCP.
    let mut server = echo_server(&lab, 1, 6200, true)?;
    let mut c = Prog::start(lab.plain(0, &["python3", &py, "stream", &dst, "6200", "8"]))?;
    c.expect(&["OK 8388608"], Duration::from_secs(60))?;
    server.expect(&["ECHOED 8388608"], Duration::from_secs(10))?;
    let b = totals(&lab, 1)?;
    ensure!(
        b["remote"]["unmatched"] == 1 && remote_count(&b) == 0 && queued_bytes(&b) == 0,
        "host b: {b}"
    );
    // A client under ssock-run on host a, a plain server on host b: no
    // listener of b is advertised, a does not ask.
    let mut plain = echo_server(&lab, 1, 6201, false)?;
    let mut c = Prog::start(lab.under_ssock(0, &["python3", &py, "stream", &dst, "6201", "8"]))?;
    c.expect(&["OK 8388608"], Duration::from_secs(60))?;
    plain.expect(&["ECHOED 8388608"], Duration::from_secs(10))?;
    let a = totals(&lab, 0)?;
    ensure!(
        remote_count(&a) == 0 && queued_bytes(&a) == 0 && a["connections"]["queued"] == 0,
        "host a: {a}"
    );
    Ok(())
}

#[test]
fn redis_benchmark_on_one_host_against_redis_on_the_other() -> Result<()> {
    if !ssock_tests::have_app("redis-server")? || !ssock_tests::have_app("redis-benchmark")? {
        return Ok(());
    }
    let Some(lab) = ready("redis")? else {
        return Ok(());
    };
    let _srv = redis_server(&lab, 1, "6390")?;
    heard(&lab, 0, 6390)?;
    let out = lab
        .under_ssock(
            0,
            &[
                "redis-benchmark",
                "-h",
                &lab.addr[1],
                "-p",
                "6390",
                "-n",
                "5000",
                "-c",
                "4",
                "-t",
                "ping,set,get",
                "-q",
            ],
        )
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    ensure!(out.status.success(), "redis-benchmark: {text}");
    for t in ["PING_INLINE: ", "SET: ", "GET: "] {
        ensure!(
            text.lines()
                .any(|l| l.starts_with(t) && l.contains("requests per second")),
            "no {t} result:\n{text}"
        );
    }
    for h in 0..2 {
        let t = settled(&lab, h, |t| remote_count(t) >= 4)?;
        ensure!(
            remote_count(&t) >= 4 && t["violations"] == 0,
            "host {h}: redis-benchmark's 4 connections did not cross as remote ones: {t}"
        );
    }
    ensure!(totals(&lab, 1)?["remote"]["unmatched"] == 0);
    Ok(())
}

#[test]
fn iperf3_and_sockperf_between_the_hosts() -> Result<()> {
    if !ssock_tests::have_app("iperf3")? || !ssock_tests::have_app("sockperf")? {
        return Ok(());
    }
    let Some(lab) = ready("iperf")? else {
        return Ok(());
    };
    let dst = lab.addr[1].clone();
    let before = totals(&lab, 0)?;
    let _s = Prog::start(lab.under_ssock(1, &["iperf3", "-s", "-1", "-p", "5211"]))?;
    heard(&lab, 0, 5211)?;
    let out = lab
        .under_ssock(0, &["iperf3", "-c", &dst, "-p", "5211", "-t", "2"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("receiver"),
        "iperf3: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = totals(&lab, 0)?;
    // iperf3's control connection and its data connection.
    ensure!(
        remote_count(&t) == remote_count(&before) + 2
            && queued_bytes(&t) - queued_bytes(&before) > 100 << 20,
        "host a after iperf3: {t}"
    );
    let _s = Prog::start(lab.under_ssock(
        1,
        &["sockperf", "sr", "--tcp", "-i", "0.0.0.0", "-p", "11211"],
    ))?;
    heard(&lab, 0, 11211)?;
    let out = lab
        .under_ssock(
            0,
            &[
                "sockperf", "pp", "--tcp", "-i", &dst, "-p", "11211", "-t", "2", "-m", "14",
            ],
        )
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("Summary: Latency is"),
        "sockperf: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t2 = totals(&lab, 0)?;
    ensure!(
        remote_count(&t2) == remote_count(&t) + 1,
        "host a after sockperf: {t2}"
    );
    Ok(())
}

#[test]
fn a_killed_client_gives_its_peer_on_the_other_host_an_end_not_a_hang() -> Result<()> {
    let Some(lab) = ready("killc")? else {
        return Ok(());
    };
    let py = remote_py();
    let mut w = Prog::start(lab.under_ssock(1, &["python3", &py, "wait", "6300"]))?;
    w.expect(&["LISTENING"], Duration::from_secs(10))?;
    heard(&lab, 0, 6300)?;
    let mut c = Prog::start(lab.under_ssock(0, &["python3", &py, "hang", &lab.addr[1], "6300"]))?;
    c.expect(&["HANGING"], Duration::from_secs(20))?;
    // The echo can be over (on the kernel socket, before the hand-over)
    // before host a has taken in host b's Claim: the connection goes live
    // there a moment later.
    let t = Instant::now();
    loop {
        let live = lab.stats(0)?;
        if live["connections"].as_array().is_some_and(|v| {
            v.iter()
                .any(|c| c["backend"] == "ntb" && c["peer_node"] == 2)
        }) {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "no live connection over the ntb link on host a: {live}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.child.kill()?;
    let end = w.expect(&["EOF", "RESET", "TIMEOUT"], Duration::from_secs(40))?;
    ensure!(!end.starts_with("TIMEOUT"), "the peer hung: {end}");
    Ok(())
}

#[test]
fn a_killed_devd_ends_its_remote_connections_without_a_hang_or_a_wrong_byte() -> Result<()> {
    let Some(lab) = ready("killd")? else {
        return Ok(());
    };
    let py = remote_py();
    let mut server = echo_server(&lab, 1, 6400, true)?;
    let mut c = Prog::start(lab.under_ssock(
        0,
        &["python3", &py, "stream", &lab.addr[1], "6400", "100000"],
    ))?;
    // Bytes flow through both engines ...
    let t = Instant::now();
    while queued_bytes(&totals(&lab, 0)?) < 64 << 20 {
        ensure!(t.elapsed() < Duration::from_secs(30), "no bytes moved");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... when host b's devd dies.
    let b = lab.devd_pid(1)?;
    // SAFETY: kill on the lab's devd of host b, which this test started.
    ensure!(unsafe { libc::kill(b, libc::SIGKILL) } == 0);
    c.wait(Duration::from_secs(30))?;
    let out = c.all();
    ensure!(
        !out.contains("OK ") && !out.contains("CORRUPT") && out.contains("Error"),
        "the client on host a should end with an error, no wrong byte:\n{out}"
    );
    server.expect(&["RESET", "ECHOED"], Duration::from_secs(30))?;
    // Host a's devd serves on.
    ensure!(lab.stats(0)?["devd"]["pid"] == lab.devd_pid(0)?);
    Ok(())
}

#[test]
fn a_server_that_closes_right_after_its_answer_loses_no_byte() -> Result<()> {
    // The answer's offset comes through the devds, the server's FIN
    // through the kernel: the client must not take the FIN for the end
    // before it knows where the answer's bytes went (blocking reads, and
    // a nonblocking socket on an edge-triggered epoll).
    let Some(lab) = ready("answer")? else {
        return Ok(());
    };
    let py = remote_py();
    let mut server = Prog::start(lab.under_ssock(1, &["python3", &py, "answer", "6500"]))?;
    server.expect(&["LISTENING"], Duration::from_secs(10))?;
    heard(&lab, 0, 6500)?;
    for nb in [&[][..], &["nb"][..]] {
        let mut args = vec!["python3", &py, "ask", &lab.addr[1], "6500", "200", "100000"];
        args.extend_from_slice(nb);
        let mut c = Prog::start(lab.under_ssock(0, &args))?;
        c.expect(&["OK 200"], Duration::from_secs(120))?;
    }
    // Host b counts a connection once host a's answer to its Claim came,
    // which may be after the client is done.
    // On a loaded machine a connection can be over (on the kernel
    // socket, its bytes right) before its Claim reached host a: then both
    // hosts count it as such (connector_gone, kernel), never silently.
    let gone = |t: &serde_json::Value| t["fallbacks"]["connector_gone"].as_u64().unwrap_or(0);
    let kernel = |t: &serde_json::Value| t["connections"]["kernel"].as_u64().unwrap_or(0);
    let a = totals(&lab, 0)?;
    let b = settled(&lab, 1, |t| remote_count(t) + kernel(t) == 400)?;
    ensure!(
        remote_count(&a) + gone(&a) == 400
            && remote_count(&b) + kernel(&b) == 400
            && remote_count(&a) == remote_count(&b)
            && remote_count(&b) >= 390,
        "every connection crossed as a remote one, or is counted as over before its Claim: {a}\n{b}"
    );
    // The answers went through the region, counted alike by the host
    // that sent them and the one that took them: all of them when the
    // machine is quiet; on a loaded one a connector's READY may come
    // after the server's 5 ms pause, and that answer goes on the kernel
    // socket.
    ensure!(
        queued_bytes(&b) > 400 * 100_000 / 4 && queued_bytes(&a) == queued_bytes(&b),
        "the answers should have crossed the link: {a}\n{b}"
    );
    Ok(())
}

#[test]
fn an_answer_whose_server_end_went_before_the_clients_devd_matched_it_ends_in_order() -> Result<()>
{
    // The client's devd is stopped while the server accepts, answers (on
    // its kernel socket: the client's READY cannot reach it) and closes:
    // the server's side on host b ends before host a's side for it
    // opens, so host a may never hear it. Host a then matches the Claim;
    // the client, reading only later, finds the FIN with the acceptor's
    // CLAIM still pending but matched, and waits until host a's engine
    // says that side's writes never moved (or its words come): the
    // answer ends in order.
    let Some(lab) = ready("unheard")? else {
        return Ok(());
    };
    let py = remote_py();
    let (mut server, flag) = gated_server(&lab, "answer", 6510)?;
    let mut c =
        Prog::start(lab.under_ssock(0, &["python3", &py, "late", &lab.addr[1], "6510", "100000"]))?;
    c.expect(&["CONNECTED"], Duration::from_secs(10))?;
    let devd_a = lab.devd_pid(0)?;
    // SAFETY: kill on the lab's devd of host a, which this test started.
    ensure!(unsafe { libc::kill(devd_a, libc::SIGSTOP) } == 0);
    std::fs::write(&flag, b"")?;
    let answered = server.expect(&["ANSWERED"], Duration::from_secs(10));
    // Host b's side gone (its end released) before host a's opens: only
    // then is it never heard. Within 1.5 s, before host b would take the
    // link for down.
    let t = Instant::now();
    let mut b_gone = false;
    while !b_gone && t.elapsed() < Duration::from_millis(1500) {
        b_gone = lab.stats(1)?["devd"]["live_connections"] == 0;
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    ensure!(unsafe { libc::kill(devd_a, libc::SIGCONT) } == 0);
    answered?;
    c.expect(&["OK 100000"], Duration::from_secs(30))?;
    ensure!(c.wait(Duration::from_secs(10))?.success(), "{}", c.all());
    // The answer is whole and ended in order whichever way host a learnt
    // that the server's writes never moved (a hang or a short answer
    // failed above). Which way is timing: host b's side ended before
    // host a's opened, but once host a runs again its engine may open the
    // side (the Claim, over the peers' TCP connection) before it reads
    // what host b's side left in its inbox, and hears it the usual way;
    // only when it reads the inbox first does it hear nothing.
    let log = lab.log(0);
    let v = lab.stats(0)?;
    ensure!(
        v["totals"]["remote"]["connections"] == 1,
        "the client's connection should have been a remote one: {v}"
    );
    if log.contains("nothing from the other host's side") {
        eprintln!("host a's engine ended the side it never heard");
    } else {
        eprintln!(
            "host a heard the side on host b (b gone first: {b_gone}), or the link went down: {v}"
        );
    }
    ensure!(v["totals"]["violations"] == 0, "{v}");
    Ok(())
}

#[test]
fn a_socket_handed_to_a_new_program_before_its_peer_accepted_keeps_every_byte() -> Result<()> {
    // The client hands its socket to a program it starts (an inherited
    // fd) right after the connect, while the server on host b has not
    // accepted yet: devd cannot tell the new program what the connection
    // is until host b's Claim comes, and the new program takes the socket
    // for a plain one. Its "hello" went on TCP while the server's "ping"
    // went into the link, where nobody read it (a hang). Now devd keeps
    // such a connection on kernel TCP, all of it.
    let Some(lab) = ready("handoff")? else {
        return Ok(());
    };
    let py = remote_py();
    let (mut server, flag) = gated_server(&lab, "greet", 6520)?;
    let mut c =
        Prog::start(lab.under_ssock(0, &["python3", &py, "handoff", &lab.addr[1], "6520"]))?;
    // The new program has asked devd (its shim did at load, before its
    // first line); then the server accepts.
    c.expect(&["HANDED UP"], Duration::from_secs(30))?;
    std::fs::write(&flag, b"")?;
    c.expect(&["HANDED OK"], Duration::from_secs(30))?;
    server.expect(&["GREETED"], Duration::from_secs(10))?;
    ensure!(c.wait(Duration::from_secs(10))?.success(), "{}", c.all());
    // Handed over before the Claim: kernel TCP, counted on both hosts
    // (connector_gone), never silently.
    let gone = |t: &serde_json::Value| t["fallbacks"]["connector_gone"].as_u64().unwrap_or(0);
    let a = totals(&lab, 0)?;
    let b = settled(&lab, 1, |t| gone(t) == 1)?;
    ensure!(
        gone(&a) == 1
            && gone(&b) == 1
            && b["connections"]["kernel"] == 1
            && remote_count(&a) + remote_count(&b) == 0
            && queued_bytes(&a) + queued_bytes(&b) == 0,
        "the connection should have stayed on kernel TCP, counted on both hosts: {a}\n{b}"
    );
    ensure!(lab
        .log(0)
        .contains("went to another process before a Claim"));
    Ok(())
}

#[test]
fn a_hostile_window_takes_its_link_down_and_its_connection_moves_to_tcp_harming_nothing(
) -> Result<()> {
    use ssock_hwbackends::ntb::{inbox, IvshmemWindow, Window};
    let Some(lab) = ready("hostile")? else {
        return Ok(());
    };
    let py = remote_py();
    // A connection across the link, and one within host a.
    let mut w = Prog::start(lab.under_ssock(1, &["python3", &py, "wait", "6600"]))?;
    w.expect(&["LISTENING"], Duration::from_secs(10))?;
    heard(&lab, 0, 6600)?;
    let mut c = Prog::start(lab.under_ssock(0, &["python3", &py, "hang", &lab.addr[1], "6600"]))?;
    c.expect(&["HANGING"], Duration::from_secs(20))?;
    let mut local = echo_server(&lab, 0, 6601, true)?;
    // Something on the memory that holds host b's half (as host b's devd
    // has it) writes garbage into host a's inbox: a producer word beyond
    // the ring, again and again, with the doorbell.
    let win = IvshmemWindow::connect(&lab.dir.join("ivshmem.sock"), 1, 0, Duration::from_secs(5))?;
    let t = Instant::now();
    while !lab.log(0).contains("hostile inbox") {
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "host a never saw its inbox hostile:\n{}",
            lab.log(0)
        );
        win.store(inbox::OFF_PROD, u64::MAX / 2);
        win.ring();
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(win);
    // That link is down for good (host a stops its heartbeat), and its
    // connection moves to its kernel socket on both hosts: when its
    // client dies, the reader on host b gets the end of its stream after
    // every byte, as on kernel TCP (no reset, no hang) ...
    lab.wait_peer(0, UP, "saw the link down", |p| p["link"] == "down")?;
    for h in 0..2 {
        let t = settled(&lab, h, |t| t["remote"]["failovers"] == 1)?;
        ensure!(t["remote"]["failovers"] == 1, "host {h}: {t}");
    }
    c.child.kill().ok();
    let end = w.expect(&["EOF", "RESET", "TIMEOUT"], Duration::from_secs(30))?;
    ensure!(end == "EOF 65536", "host b's reader: {end}");
    // ... while a connection within host a goes on, and both devds serve.
    let mut l =
        Prog::start(lab.under_ssock(0, &["python3", &py, "stream", &lab.addr[0], "6601", "16"]))?;
    l.expect(&["OK 16777216"], Duration::from_secs(60))?;
    local.expect(&["ECHOED 16777216"], Duration::from_secs(10))?;
    for h in 0..2 {
        ensure!(
            lab.stats(h)?["devd"]["pid"] == lab.devd_pid(h)?,
            "host {h}'s devd"
        );
    }
    let a = lab.stats(0)?;
    ensure!(
        a["totals"]["connections"]["direct"].as_u64() >= Some(1),
        "the local connection went Direct: {a}"
    );
    Ok(())
}

#[test]
fn a_client_that_closes_at_once_gives_the_server_its_end_at_once() -> Result<()> {
    // The server's read sees the kernel socket's end before the devds
    // settled the connection (a plain client: no intent; one under
    // ssock-run that lets go at once): it must not wait for an offset that
    // never comes.
    let Some(lab) = ready("closer")? else {
        return Ok(());
    };
    let py = remote_py();
    let closer = format!(
        "import socket\nsocket.create_connection(('{}', 6800)).close()\n",
        lab.addr[1]
    );
    for (ssock, block) in [(false, false), (false, true), (true, false), (true, true)] {
        for _ in 0..5 {
            let mut args = vec!["python3", py.as_str(), "wait", "6800"];
            if block {
                // A blocking read with no time limit of its own.
                args.push("block");
            }
            let mut w = Prog::start(lab.under_ssock(1, &args))?;
            w.expect(&["LISTENING"], Duration::from_secs(10))?;
            heard(&lab, 0, 6800)?;
            let args = ["python3", "-c", closer.as_str()];
            let c = if ssock {
                lab.under_ssock(0, &args).output()?
            } else {
                lab.plain(0, &args).output()?
            };
            ensure!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
            let t = Instant::now();
            let end = w.expect(&["EOF", "RESET", "TIMEOUT"], Duration::from_secs(40))?;
            ensure!(
                end == "EOF 0" && t.elapsed() < Duration::from_secs(5),
                "client under ssock-run: {ssock}, blocking server: {block}: the server saw {end:?} after {:?}",
                t.elapsed()
            );
        }
    }
    Ok(())
}

/// `ssock-bench --two-hosts` on host a, its ping-pong 1 B test only, one
/// quick round, with `last` after: what it printed (an error if it failed).
fn bench_on_a(lab: &ssock_tests::lab::TwoHosts, last: &str) -> Result<String> {
    let dir = lab.dir.to_string_lossy().to_string();
    let bench = ssock_tests::bin("ssock-bench")
        .to_string_lossy()
        .to_string();
    let args = [
        "--two-hosts",
        dir.as_str(),
        "--quick",
        "--rounds",
        "1",
        "--only",
        "ping-pong 1 B",
        last,
    ];
    let out = lab.on(0, &bench).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "ssock-bench --two-hosts {last}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

#[test]
fn ssock_bench_two_hosts_measures_both_paths_in_the_lab() -> Result<()> {
    let Some(lab) = ready("bench")? else {
        return Ok(());
    };
    let text = bench_on_a(&lab, "--json")?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let row = &v["results"][0];
    ensure!(row["test"] == "ping-pong 1 B", "{row}");
    let median = |t: &str| {
        row["transports"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["transport"] == t))
            .and_then(|x| x["median"].as_f64())
            .unwrap_or(0.0)
    };
    ensure!(
        median("kernel") > 0.0 && median("queued") > 0.0,
        "both kernel TCP over the veth and Queued over the link measured: {row}"
    );
    // The bench refuses a connection that is not Queued; host b's devd
    // counted its connections as remote ones.
    let b = settled(&lab, 1, |t| remote_count(t) > 0)?;
    ensure!(remote_count(&b) > 0, "host b: {b}");
    Ok(())
}

#[test]
fn ssock_bench_switch_measures_a_drop_and_a_restore_of_the_link() -> Result<()> {
    let Some(lab) = ready("benchswitch")? else {
        return Ok(());
    };
    let text = bench_on_a(&lab, "--switch")?;
    // Its section, with a figure in each cell (it fails if its connections
    // did not move to TCP and back onto the link, as devd's statistics
    // showed it).
    let section = text
        .split("Switching between the link and TCP")
        .nth(1)
        .unwrap_or_default();
    for what in [
        "on the link ",
        "link down: worst",
        "on TCP",
        "link back: worst",
    ] {
        let line = section.lines().find(|l| l.trim_start().starts_with(what));
        let figure = line
            .and_then(|l| l.split_whitespace().last())
            .and_then(|x| x.trim_end_matches(')').parse::<f64>().ok());
        ensure!(
            figure.is_some_and(|f| f > 0.0),
            "no figure for {what:?}:\n{text}"
        );
    }
    for h in 0..2 {
        let t = totals(&lab, h)?;
        ensure!(
            t["remote"]["failovers"] == 2 && t["remote"]["forwards"] == 2,
            "host {h}: both connections moved each way: {t}"
        );
    }
    Ok(())
}

/// remote.py `mode` on host b under ssock-run at `port`, accepting only
/// once the returned file exists, and heard of by host a's devd.
fn gated_server(
    lab: &ssock_tests::lab::TwoHosts,
    mode: &str,
    port: u16,
) -> Result<(Prog, std::path::PathBuf)> {
    let (py, flag) = (remote_py(), lab.dir.join("accept"));
    let (p, f) = (port.to_string(), flag.to_string_lossy().into_owned());
    let mut server = Prog::start(lab.under_ssock(1, &["python3", &py, mode, &p, &f]))?;
    server.expect(&["LISTENING"], Duration::from_secs(10))?;
    heard(lab, 0, port)?;
    Ok((server, flag))
}
