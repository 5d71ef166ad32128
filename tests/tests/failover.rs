//! Fail-over in the two-host lab (docs/protocol.md 8.5): when the ntb link
//! under remote connections goes down (taken out of service with
//! `ringstat link NODE down`, as a failing adapter would go), every
//! connection over it goes on over its kernel TCP socket, each byte
//! checked by the programs themselves (tests/apps/remote.py: the pattern at
//! its offset, both directions), and both devds' statistics show each
//! connection moved (`remote.failovers`, `path` = "tcp") and none reset.
//! Where a test needs bytes in flight at the failure (a reader that
//! stopped reading), the writer's log (`SSOCK_LOG`) shows it sent them
//! again.

mod common;

use anyhow::{ensure, Result};
use common::*;
use ssock_tests::lab::TwoHosts;
use std::time::{Duration, Instant};

/// Waits until host `h` shows `n` live remote connections on the link, at
/// least `moved` of which carried bytes across it (acknowledged by the
/// other host; a connection's first bytes go on its kernel socket until
/// its writer moves, and a quiet one may have sent nothing since).
fn moving_on_the_link(lab: &TwoHosts, h: usize, n: usize, moved: usize) -> Result<()> {
    let t = Instant::now();
    loop {
        let v = lab.stats(h)?;
        let live: Vec<&serde_json::Value> = v["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["path"] == "link")
            .collect();
        let acked = live
            .iter()
            .filter(|c| c["acked"].as_u64() > Some(0))
            .count();
        if live.len() >= n && acked >= moved {
            return Ok(());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "host {h}: {} of {n} connections on the link, {acked} of {moved} moved bytes: {v}",
            live.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A remote.py server (`args` after the script) on host b under
/// ssock-run, listening.
fn served_on_b(lab: &TwoHosts, args: &[&str]) -> Result<Prog> {
    let py = remote_py();
    let mut argv = vec!["python3", py.as_str()];
    argv.extend_from_slice(args);
    let mut p = Prog::start(lab.under_ssock(1, &argv))?;
    p.expect(&["LISTENING"], Duration::from_secs(10))?;
    Ok(p)
}

/// The lab's script setting for tests of fail-forward: connections move
/// back onto the link once it stayed up for 300 ms.
const FORWARD_SOON: &[(&str, &str)] = &[("SSOCK_LAB_FAIL_FORWARD_MS", "300")];

/// The lab `name` (`env` for its script) with redis-server on `redis` and
/// a one-shot iperf3 server on `iperf`, both on host b under ssock-run and
/// heard of on host a; None (skipped) without those programs or the lab.
fn apps_on_b(
    name: &str,
    env: &[(&str, &str)],
    redis: &str,
    iperf: &str,
) -> Result<Option<(TwoHosts, [Prog; 2])>> {
    for app in ["redis-server", "redis-benchmark", "iperf3"] {
        if !ssock_tests::have_app(app)? {
            return Ok(None);
        }
    }
    let Some(lab) = ready_with(name, env)? else {
        return Ok(None);
    };
    let servers = [
        redis_server(&lab, 1, redis)?,
        Prog::start(lab.under_ssock(1, &["iperf3", "-s", "-1", "-p", iperf]))?,
    ];
    for port in [redis, iperf] {
        heard(&lab, 0, port.parse()?)?;
    }
    Ok(Some((lab, servers)))
}

/// CPU time (user and system, in clock ticks) process `pid` has used.
fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    ensure!(f.len() == 2, "/proc/{pid}/stat: {stat}");
    Ok(f[0] + f[1])
}

/// The processes whose command line contains `what`.
fn pids_running(what: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(what) && !cmd.contains("two-host-lab") && !cmd.contains("ssock-run") {
            v.push(pid);
        }
    }
    v
}

/// Both hosts counted `n` connections moved to their kernel sockets and
/// none reset, every live remote connection on "tcp".
fn all_moved(lab: &TwoHosts, n: u64) -> Result<()> {
    for h in 0..2 {
        let t = settled(lab, h, |t| t["remote"]["failovers"].as_u64() >= Some(n))?;
        ensure!(
            t["remote"]["failovers"].as_u64() == Some(n) && t["remote"]["failover_resets"] == 0,
            "host {h}: {n} connections should have moved, none reset: {t}\n{}",
            lab.log(h)
        );
        ensure!(t["violations"] == 0, "host {h}: {t}");
        for c in lab.stats(h)?["connections"]
            .as_array()
            .into_iter()
            .flatten()
        {
            ensure!(
                c.get("path").is_none() || c["path"] == "tcp",
                "host {h}: a connection not on its kernel socket: {c}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_link_that_goes_down_under_load_moves_every_connection_to_tcp_with_no_byte_lost() -> Result<()>
{
    let Some(lab) = ready("failload")? else {
        return Ok(());
    };
    let py = remote_py();
    let log = lab.dir.join("shim.log");
    let mut servers = [
        echo_server_logged(&lab, 1, 6700, true, Some(&log))?,
        echo_server_logged(&lab, 0, 6701, true, Some(&log))?,
    ];
    // Two streams from host a, one from host b, 512 MiB each way each,
    // every byte of the echo checked at its offset.
    let (b, a) = (lab.addr[1].clone(), lab.addr[0].clone());
    let mut clients = Vec::new();
    for (h, dst, port) in [(0, &b, "6700"), (0, &b, "6700"), (1, &a, "6701")] {
        let mut c = lab.under_ssock(h, &["python3", &py, "stream", dst, port, "512"]);
        c.env("SSOCK_LOG", &log);
        clients.push(Prog::start(c)?);
    }
    // Every direction moved (each host's devd has taken bytes of each
    // of its writers across the link).
    moving_on_the_link(&lab, 0, 3, 3)?;
    moving_on_the_link(&lab, 1, 3, 3)?;
    // Host b's link goes down mid-stream: host b at once, host a when it
    // hears of it (or misses host b's heartbeat).
    lab.set_link(1, false)?;
    for c in &mut clients {
        if let Err(e) = c.expect(&["OK 536870912"], Duration::from_secs(60)) {
            anyhow::bail!(
                "{e}\nhost a: {}\n{}\nhost b: {}\n{}\nthe clients' log:\n{}\nwhere the programs' threads wait:\n{}",
                lab.stats(0)?,
                lab.log(0),
                lab.stats(1)?,
                lab.log(1),
                std::fs::read_to_string(&log).unwrap_or_default(),
                remote_py_threads()
            );
        }
        ensure!(c.wait(Duration::from_secs(10))?.success(), "{}", c.all());
    }
    servers[0].expect(&["ECHOED 536870912"], Duration::from_secs(10))?;
    servers[0].expect(&["ECHOED 536870912"], Duration::from_secs(10))?;
    servers[1].expect(&["ECHOED 536870912"], Duration::from_secs(10))?;
    all_moved(&lab, 3)?;
    // Each end moved both directions back (what it sent again depends
    // on what was in flight: the next test makes sure some was).
    let text = std::fs::read_to_string(&log)?;
    let back = |what: &str| text.lines().filter(|l| l.contains(what)).count();
    ensure!(
        back("reads back on the kernel socket") == 6
            && back("writes back on the kernel socket") == 6,
        "each end should have moved both directions back:\n{text}"
    );
    // The engines carried only a part: the rest went over the veth.
    for h in 0..2 {
        let q = queued_bytes(&totals(&lab, h)?);
        ensure!(
            q < 3 * 2 * (512 << 20),
            "host {h}: {q} bytes through the engine"
        );
    }
    lab.wait_peer(0, UP, "saw the link down", |p| p["link"] == "down")?;
    // Back in service: new connections cross the link again.
    lab.set_link(1, true)?;
    lab.wait_linked(UP)?;
    let before = [totals(&lab, 0)?, totals(&lab, 1)?];
    let mut c = Prog::start(lab.under_ssock(0, &["python3", &py, "stream", &b, "6700", "64"]))?;
    c.expect(&["OK 67108864"], Duration::from_secs(60))?;
    servers[0].expect(&["ECHOED 67108864"], Duration::from_secs(10))?;
    for (h, before) in before.iter().enumerate() {
        let t = settled(&lab, h, |t| remote_count(t) > remote_count(before))?;
        ensure!(
            remote_count(&t) == remote_count(before) + 1
                && queued_bytes(&t) - queued_bytes(before) >= 120 << 20,
            "host {h}: the new connection should cross the link: {t}\nbefore it: {before}\n{}",
            lab.log(h)
        );
    }
    Ok(())
}

#[test]
fn a_link_that_goes_down_under_blocked_calls_wakes_each_on_its_kernel_socket() -> Result<()> {
    let Some(lab) = ready("failblock")? else {
        return Ok(());
    };
    let py = remote_py();
    let flag = lab.dir.join("go");
    let flag = flag.to_string_lossy();
    let b = lab.addr[1].clone();
    // On host b: a server that answers 16 MiB only once the flag exists,
    // and a sink that stops reading after 1 MiB until then.
    let _later = served_on_b(&lab, &["later", "6710", &flag])?;
    let mut sink = served_on_b(&lab, &["sink", "6711", &flag])?;
    heard(&lab, 0, 6710)?;
    heard(&lab, 0, 6711)?;
    // On host a: a reader blocked in recv, one asleep in epoll_wait (both
    // after 1 MiB each way crossed the link), and a writer blocked in
    // send (the sink's window full).
    let mut idle = Prog::start(lab.under_ssock(0, &["python3", &py, "idle", &b, "6710"]))?;
    let mut idle_nb = Prog::start(lab.under_ssock(0, &["python3", &py, "idle", &b, "6710", "nb"]))?;
    let log = lab.dir.join("flood.log");
    let mut flood = lab.under_ssock(0, &["python3", &py, "flood", &b, "6711", "64"]);
    flood.env("SSOCK_LOG", &log);
    let mut flood = Prog::start(flood)?;
    idle.expect(&["MOVED"], Duration::from_secs(20))?;
    idle_nb.expect(&["MOVED"], Duration::from_secs(20))?;
    sink.expect(&["SINKING"], Duration::from_secs(20))?;
    moving_on_the_link(&lab, 0, 3, 3)?;
    // Let the writer fill what it can and block.
    std::thread::sleep(Duration::from_millis(300));
    lab.set_link(0, false)?;
    all_moved(&lab, 3)?;
    // Moved, and all blocked again (on their kernel sockets now, or on the
    // flag): nothing spins, neither the devds nor the programs.
    let idle_cmd = format!("remote.py idle {b} 6710");
    let flood_cmd = format!("remote.py flood {b} 6711");
    let mut pids = vec![lab.devd_pid(0)?, lab.devd_pid(1)?];
    pids.extend(pids_running(&idle_cmd));
    pids.extend(pids_running(&flood_cmd));
    ensure!(pids.len() == 5, "the devds and three clients: {pids:?}");
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_secs(1));
    for (p, t0) in pids.iter().zip(before) {
        let used = cpu_ticks(*p)? - t0;
        // Clock ticks (100 a second here): a busy loop takes ~100.
        ensure!(
            used < 20,
            "process {p} used {used} ticks of CPU in 1 s while all wait"
        );
    }
    std::fs::write(&*flag, b"")?;
    for p in [&mut idle, &mut idle_nb] {
        p.expect(&["OK 17825792"], Duration::from_secs(30))?;
        ensure!(p.wait(Duration::from_secs(10))?.success(), "{}", p.all());
    }
    flood.expect(&["SENT 67108864"], Duration::from_secs(30))?;
    sink.expect(&["SUNK 67108864"], Duration::from_secs(30))?;
    // The writer had bytes in flight (its queue, the engines, the window:
    // the sink had stopped reading): it sent them again on the socket.
    let text = std::fs::read_to_string(&log)?;
    ensure!(
        sent_again(&text) > 0,
        "nothing in flight was sent again:\n{text}"
    );
    Ok(())
}

#[test]
fn redis_benchmark_and_iperf3_run_through_a_link_failure_without_an_error() -> Result<()> {
    let Some((lab, _servers)) = apps_on_b("failapps", &[], "6391", "5212")? else {
        return Ok(());
    };
    // redis-benchmark's 4 connections and iperf3's control and data
    // connections, all crossing the link, when it goes down.
    let (bench, iperf) = redis_benchmark_and_iperf3(&lab, "6391", "5212", "4")?;
    moving_on_the_link(&lab, 0, 6, 5)?;
    lab.set_link(0, false)?;
    finished_without_error(bench, iperf, "through the link failure")?;
    all_moved(&lab, 6)?;
    Ok(())
}

/// A sink on host b (port `port`) that takes 1 MiB and stops, and a writer
/// on host a that sends it 2.25 MiB and shuts its writes down, so the rest
/// and the end mark are still on their way (the writer's queue, the
/// engines, the window) when host b's link goes down; returned once both
/// hosts moved the connection. Also: the flag that lets the sink read on,
/// the writer's log.
fn shut_behind_bytes_then_moved(
    lab: &TwoHosts,
    port: u16,
) -> Result<(Prog, Prog, std::path::PathBuf, std::path::PathBuf)> {
    let py = remote_py();
    let flag = lab.dir.join("go");
    let b = lab.addr[1].clone();
    let p = port.to_string();
    let mut sink = served_on_b(lab, &["sink", &p, &flag.to_string_lossy()])?;
    heard(lab, 0, port)?;
    let log = lab.dir.join("half.log");
    let mut half = lab.under_ssock(0, &["python3", &py, "half", &b, &p, "2304"]);
    half.env("SSOCK_LOG", &log);
    let mut half = Prog::start(half)?;
    sink.expect(&["SINKING"], Duration::from_secs(20))?;
    half.expect(&["SHUT"], Duration::from_secs(20))?;
    moving_on_the_link(lab, 0, 1, 1)?;
    lab.set_link(1, false)?;
    all_moved(lab, 1)?;
    Ok((sink, half, flag, log))
}

#[test]
fn an_end_of_stream_in_flight_when_the_link_goes_down_still_ends_the_stream() -> Result<()> {
    let Some(lab) = ready("faileos")? else {
        return Ok(());
    };
    let (mut sink, mut half, flag, log) = shut_behind_bytes_then_moved(&lab, 6720)?;
    std::fs::write(&flag, b"")?;
    // Every byte, then the end, on host b; its answer and its end on host a.
    sink.expect(&["SUNK 2359296"], Duration::from_secs(30))?;
    half.expect(&["REPLY SUNK 2359296"], Duration::from_secs(30))?;
    ensure!(
        half.wait(Duration::from_secs(10))?.success(),
        "{}",
        half.all()
    );
    // The end really was behind bytes in flight: those went again.
    let text = std::fs::read_to_string(&log)?;
    ensure!(sent_again(&text) > 0, "nothing was in flight:\n{text}");
    Ok(())
}

/// The bytes a client's log says it sent again on the kernel socket.
fn sent_again(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("bytes again"))
        .filter_map(|l| l.split('(').nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A sink on host b (port `port`; `until_reset`: it waits until poll
/// says its peer reset, reading nothing more) and a writer on host a that
/// sends it `kib` KiB and closes with SO_LINGER 0 (and stays alive: on
/// kernel TCP its reader is reset); host b's link goes down once the
/// writer closed, then the sink reads on: its last line.
fn reset_then_link_down(
    name: &str,
    port: u16,
    kib: &str,
    until_reset: bool,
) -> Result<Option<String>> {
    let Some(lab) = ready(name)? else {
        return Ok(None);
    };
    let py = remote_py();
    let flag = lab.dir.join("go");
    let flag = flag.to_string_lossy();
    let b = lab.addr[1].clone();
    let p = port.to_string();
    let mut args = vec!["sink", &p, &flag];
    if until_reset {
        args.push("until-reset");
    }
    let mut sink = served_on_b(&lab, &args)?;
    heard(&lab, 0, port)?;
    let mut w = Prog::start(lab.under_ssock(0, &["python3", &py, "rst", &b, &p, kib]))?;
    sink.expect(&["SINKING"], Duration::from_secs(20))?;
    w.expect(&["CLOSED"], Duration::from_secs(20))?;
    if until_reset {
        sink.expect(&["RESET-SEEN"], Duration::from_secs(20))?;
    }
    let t = settled(&lab, 1, |t| remote_count(t) == 1)?;
    ensure!(
        remote_count(&t) == 1,
        "the connection crossed the link: {t}"
    );
    lab.set_link(1, false)?;
    std::fs::write(&*flag, b"")?;
    Ok(Some(sink.expect(
        &["RESET", "SUNK", "WRONG"],
        Duration::from_secs(30),
    )?))
}

#[test]
fn a_writer_that_resets_just_before_the_link_goes_down_resets_its_reader() -> Result<()> {
    let Some(end) = reset_then_link_down("failrst", 6730, "2304", false)? else {
        return Ok(());
    };
    ensure!(
        end.starts_with("RESET"),
        "the reader should be reset: {end}"
    );
    Ok(())
}

/// A writer that resets after its last bytes reached the reader's host
/// (the reader told of the reset, none of those bytes read yet): the
/// link's failure then takes nothing from the reader, which reads every
/// byte and then the reset, as a TCP receiver keeps what came before an
/// RST. 2 MiB: past the reader's RX queue, so bytes wait on host b.
#[test]
fn a_link_that_goes_down_after_a_reset_came_leaves_the_reader_every_byte_before_it() -> Result<()> {
    let Some(end) = reset_then_link_down("failrstin", 6731, "2048", true)? else {
        return Ok(());
    };
    ensure!(
        end.trim() == format!("RESET {}", 2048 << 10),
        "the reader should read every byte, then the reset: {end}"
    );
    Ok(())
}

#[test]
fn a_connection_whose_other_devd_cannot_agree_is_reset_not_left_hanging() -> Result<()> {
    let Some(lab) = ready("failalone")? else {
        return Ok(());
    };
    let py = remote_py();
    let b = lab.addr[1].clone();
    let _server = echo_server(&lab, 1, 6740, true)?;
    let mut c = Prog::start(lab.under_ssock(0, &["python3", &py, "stream", &b, "6740", "100000"]))?;
    moving_on_the_link(&lab, 0, 1, 1)?;
    // Host b's devd stops (its clients stay), and host a's link goes down:
    // host a cannot agree on anything with it.
    let devd_b = lab.devd_pid(1)?;
    // SAFETY: kill on the lab's devd of host b, which this test started.
    ensure!(unsafe { libc::kill(devd_b, libc::SIGSTOP) } == 0);
    lab.set_link(0, false)?;
    c.wait(Duration::from_secs(30))?;
    let out = c.all();
    // SAFETY: as above.
    unsafe { libc::kill(devd_b, libc::SIGCONT) };
    ensure!(
        out.contains("ConnectionResetError") && !out.contains("OK ") && !out.contains("CORRUPT"),
        "the client should be reset, with no wrong byte:\n{out}"
    );
    let t = totals(&lab, 0)?;
    ensure!(
        t["remote"]["failover_resets"] == 1 && t["remote"]["failovers"] == 0,
        "host a: {t}"
    );
    Ok(())
}

/// Waits until both hosts counted `n` of their ends moved forward onto
/// the link (docs/protocol.md 8.6) and show `conns` live connections on
/// it, each moved forward `forwards` times and over `forwards` times, and
/// (`carried`) each with bytes acknowledged across the new link (else the
/// error shows host `h`'s devd log and the shim's `log`).
fn forwarded(
    lab: &TwoHosts,
    n: u64,
    conns: usize,
    forwards: u64,
    carried: bool,
    log: &std::path::Path,
) -> Result<()> {
    for h in 0..2 {
        let t = Instant::now();
        loop {
            let v = lab.stats(h)?;
            let tot = &v["totals"]["remote"];
            let on_link: Vec<&serde_json::Value> = v["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| {
                    c["path"] == "link"
                        && c["forwards"].as_u64() == Some(forwards)
                        && c["failovers"].as_u64() == Some(forwards)
                        && (!carried || c["acked"].as_u64() > Some(0))
                })
                .collect();
            if tot["forwards"].as_u64() == Some(n) && on_link.len() == conns {
                ensure!(
                    tot["failover_resets"] == 0,
                    "host {h}: {v}\nhost a's log:\n{}\nhost b's log:\n{}\nthe shim's log:\n{}",
                    lab.log(0),
                    lab.log(1),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(20),
                "host {h}: {n} ends should have moved forward, {conns} connections on the link again: {v}\n{}\nthe shim's log:\n{}",
                lab.log(h),
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

#[test]
fn a_link_dropped_and_restored_20_times_under_two_streams_loses_no_byte() -> Result<()> {
    let Some(lab) = ready_with("failforward", FORWARD_SOON)? else {
        return Ok(());
    };
    let py = remote_py();
    let log = lab.dir.join("shim.log");
    let flag = lab.dir.join("stop");
    let flag = flag.to_string_lossy();
    let mut server = echo_server_logged(&lab, 1, 6702, true, Some(&log))?;
    // Two streams from host a, 64 KiB a millisecond each way until the
    // flag, every byte of the echo checked at its offset.
    let b = lab.addr[1].clone();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = lab.under_ssock(0, &["python3", &py, "steady", &b, "6702", &flag]);
        c.env("SSOCK_LOG", &log);
        clients.push(Prog::start(c)?);
    }
    moving_on_the_link(&lab, 0, 2, 2)?;
    const CYCLES: u64 = 20;
    for cycle in 1..=CYCLES {
        // Taken out of service on host b, then on host a, in turn.
        let h_down = usize::from(cycle % 2 == 1);
        lab.set_link(h_down, false)?;
        for h in 0..2 {
            let t = settled(&lab, h, |t| {
                t["remote"]["failovers"].as_u64() >= Some(2 * cycle)
            })?;
            ensure!(
                t["remote"]["failovers"].as_u64() == Some(2 * cycle)
                    && t["remote"]["failover_resets"] == 0,
                "cycle {cycle}, host {h}: both connections should have moved: {t}\n{}",
                lab.log(h)
            );
        }
        lab.wait_peer(1 - h_down, UP, "saw the link down", |p| p["link"] == "down")?;
        // On kernel TCP now; back in service, they move forward once the
        // link stayed up for fail_forward_ms.
        lab.set_link(h_down, true)?;
        lab.wait_linked(UP)?;
        let before = [
            queued_bytes(&totals(&lab, 0)?),
            queued_bytes(&totals(&lab, 1)?),
        ];
        forwarded(&lab, 2 * cycle, 2, cycle, true, &log)?;
        // And their bytes cross the link again (1 MiB at least each way
        // for each connection).
        for (h, before) in before.iter().enumerate() {
            let what = "no bytes through the engine after moving forward";
            queued_past(&lab, h, before + (4 << 20), Duration::from_secs(20), what)?;
        }
    }
    std::fs::write(&*flag, b"")?;
    for c in &mut clients {
        let out = c.expect(&["OK "], Duration::from_secs(60));
        if let Err(e) = out {
            anyhow::bail!(
                "{e}\nhost a: {}\n{}\nhost b: {}\n{}\nthe shim's log:\n{}",
                lab.stats(0)?,
                lab.log(0),
                lab.stats(1)?,
                lab.log(1),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        ensure!(c.wait(Duration::from_secs(10))?.success(), "{}", c.all());
    }
    server.expect(&["ECHOED "], Duration::from_secs(10))?;
    server.expect(&["ECHOED "], Duration::from_secs(10))?;
    for h in 0..2 {
        let t = totals(&lab, h)?;
        ensure!(
            t["remote"]["forwards"].as_u64() == Some(2 * CYCLES)
                && t["remote"]["failover_resets"] == 0
                && t["violations"] == 0,
            "host {h}: {t}"
        );
    }
    // Each of the four ends said where it moved forward, every time.
    let text = std::fs::read_to_string(&log)?;
    let n = text
        .lines()
        .filter(|l| l.contains("moves forward onto the link"))
        .count();
    ensure!(
        n as u64 == 4 * CYCLES,
        "each end should have moved forward {CYCLES} times:\n{text}"
    );
    Ok(())
}

#[test]
fn redis_benchmark_and_iperf3_go_back_onto_a_link_that_comes_back_without_an_error() -> Result<()> {
    let Some((lab, _servers)) = apps_on_b("forwardapps", FORWARD_SOON, "6392", "5213")? else {
        return Ok(());
    };
    // redis-benchmark's 4 connections (an event loop on nonblocking
    // sockets) and iperf3's control and data connections.
    let (bench, iperf) = redis_benchmark_and_iperf3(&lab, "6392", "5213", "8")?;
    moving_on_the_link(&lab, 0, 6, 5)?;
    lab.set_link(1, false)?;
    for h in 0..2 {
        let t = settled(&lab, h, |t| t["remote"]["failovers"].as_u64() >= Some(6))?;
        ensure!(
            t["remote"]["failovers"] == 6 && t["remote"]["failover_resets"] == 0,
            "host {h}: all six connections should have moved: {t}\n{}",
            lab.log(h)
        );
    }
    lab.wait_peer(0, UP, "saw the link down", |p| p["link"] == "down")?;
    lab.set_link(1, true)?;
    lab.wait_linked(UP)?;
    // Back onto the link while they run: the data connections at their
    // next call, iperf3's control connection at its next select.
    moved_forward_and_finished(&lab, bench, iperf, "through the link failure and back")
}

#[test]
fn connections_idle_in_recv_poll_and_epoll_wait_move_back_onto_the_link_without_a_call(
) -> Result<()> {
    let Some(lab) = ready_with("forwardidle", FORWARD_SOON)? else {
        return Ok(());
    };
    let py = remote_py();
    let log = lab.dir.join("shim.log");
    let flag = lab.dir.join("go");
    let flag = flag.to_string_lossy();
    let b = lab.addr[1].clone();
    // On host b: a server that echoes 1 MiB, then has one thread blocked
    // in recv while another waits for the flag to send 16 MiB more.
    let mut server = lab.under_ssock(1, &["python3", &py, "later", "6741", &flag, "reading"]);
    server.env("SSOCK_LOG", &log);
    let mut server = Prog::start(server)?;
    server.expect(&["LISTENING"], Duration::from_secs(10))?;
    heard(&lab, 0, 6741)?;
    // On host a: a reader blocked in recv, one asleep in epoll_wait, and
    // one blocked in recv while another of its threads sleeps in poll.
    let mut clients = Vec::new();
    for how in [None, Some("nb"), Some("two")] {
        let mut argv = vec!["python3", py.as_str(), "idle", b.as_str(), "6741"];
        argv.extend(how);
        let mut c = lab.under_ssock(0, &argv);
        c.env("SSOCK_LOG", &log);
        let mut c = Prog::start(c)?;
        c.expect(&["MOVED"], Duration::from_secs(20))?;
        clients.push(c);
    }
    moving_on_the_link(&lab, 0, 3, 3)?;
    lab.set_link(1, false)?;
    all_moved(&lab, 3)?;
    // Back: no program makes a call, yet each end wakes to take its new
    // end, and the connections are on the link again.
    lab.set_link(1, true)?;
    lab.wait_linked(UP)?;
    forwarded(&lab, 3, 3, 1, false, &log)?;
    // The 16 MiB each then cross the link.
    let before = [
        queued_bytes(&totals(&lab, 0)?),
        queued_bytes(&totals(&lab, 1)?),
    ];
    std::fs::write(&*flag, b"")?;
    for c in &mut clients {
        c.expect(&["OK 17825792"], Duration::from_secs(30))?;
        ensure!(c.wait(Duration::from_secs(10))?.success(), "{}", c.all());
    }
    for (h, before) in before.iter().enumerate() {
        let t = totals(&lab, h)?;
        ensure!(
            queued_bytes(&t) >= before + (48 << 20)
                && t["remote"]["forwards"] == 3
                && t["remote"]["failover_resets"] == 0
                && t["violations"] == 0,
            "host {h}: the 48 MiB should have crossed the link: {t}\n{}",
            lab.log(h)
        );
    }
    Ok(())
}

#[test]
fn an_end_that_shut_its_writes_down_stays_on_tcp_when_the_link_comes_back() -> Result<()> {
    let Some(lab) = ready_with("forwardeos", FORWARD_SOON)? else {
        return Ok(());
    };
    let (mut sink, mut half, flag, log) = shut_behind_bytes_then_moved(&lab, 6721)?;
    // Back: the connector's devd offers it a new end, which an end whose
    // writes are shut down cannot take (it says so at its next call);
    // the sink is offered nothing before its connector took its own.
    lab.set_link(1, true)?;
    lab.wait_linked(UP)?;
    let t = settled(&lab, 0, |t| t["remote"]["forwards_offered"] == 1)?;
    ensure!(t["remote"]["forwards_offered"] == 1, "host a: {t}");
    std::fs::write(&flag, b"")?;
    sink.expect(&["SUNK 2359296"], Duration::from_secs(30))?;
    half.expect(&["REPLY SUNK 2359296"], Duration::from_secs(30))?;
    ensure!(
        half.wait(Duration::from_secs(10))?.success(),
        "{}",
        half.all()
    );
    for h in 0..2 {
        let t = totals(&lab, h)?;
        ensure!(
            t["remote"]["forwards"] == 0
                && t["remote"]["forwards_offered"] == u64::from(h == 0)
                && t["remote"]["failover_resets"] == 0,
            "host {h}: {t}"
        );
    }
    let text = std::fs::read_to_string(&log)?;
    ensure!(
        text.contains("stays on its kernel socket"),
        "the client should have let its new end go:\n{text}"
    );
    Ok(())
}

#[test]
fn a_connection_made_while_the_link_is_down_starts_on_tcp_and_moves_onto_it_once_back() -> Result<()>
{
    let Some(lab) = ready_with("forwardborn", FORWARD_SOON)? else {
        return Ok(());
    };
    let log = lab.dir.join("shim.log");
    let flag = lab.dir.join("stop");
    let flag = flag.to_string_lossy();
    let mut server = echo_server_logged(&lab, 1, 6731, true, Some(&log))?;
    // Out of service on host b: both devds see the link down, their
    // control connection stays up.
    lab.set_link(1, false)?;
    for h in 0..2 {
        lab.wait_peer(h, UP, "saw the link down", |p| {
            p["link"] == "down" && p["state"] == "up"
        })?;
    }
    // A client not under ssock: its connection stays plain, the server
    // lets the end devd made for its Claim go at once (its Claim found no
    // intent), and that end's engine side ends without a reset.
    let py = remote_py();
    let b = lab.addr[1].clone();
    let mut plain = Prog::start(lab.plain(0, &["python3", &py, "hang", &b, "6731"]))?;
    plain.expect(&["HANGING"], Duration::from_secs(30))?;
    let t = Instant::now();
    loop {
        let v = lab.stats(1)?;
        if v["devd"]["live_connections"] == 0 && v["totals"]["remote"]["unmatched"] == 1 {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "host b: the server should have let the plain connection's end go: {v}\n{}\nthe shim's log:\n{}",
            lab.log(1),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(plain);
    server.expect(&["ECHOED 65536", "RESET 65536"], Duration::from_secs(10))?;
    // A client under ssock: its connection is a remote one, on its kernel
    // sockets from the start, both ends counting their bytes there.
    let mut c = lab.under_ssock(0, &["python3", &py, "steady", &b, "6731", &flag]);
    c.env("SSOCK_LOG", &log);
    let mut client = Prog::start(c)?;
    for h in 0..2 {
        let t = settled(&lab, h, |t| t["remote"]["failovers"] == 1)?;
        ensure!(
            t["remote"]["made_while_down"] == 1
                && t["remote"]["failovers"] == 1
                && t["remote"]["connections"] == 1
                && t["remote"]["failover_resets"] == 0,
            "host {h}: the connection should have started on its kernel socket: {t}\n{}",
            lab.log(h)
        );
    }
    let on_tcp = |h: usize| -> Result<u64> {
        let v = lab.stats(h)?;
        let c = v["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["path"] == "tcp")
            .cloned()
            .unwrap_or_default();
        Ok(c["failovers"].as_u64().unwrap_or(0))
    };
    ensure!(on_tcp(0)? == 1 && on_tcp(1)? == 1, "{}", lab.stats(0)?);
    let before = [
        queued_bytes(&totals(&lab, 0)?),
        queued_bytes(&totals(&lab, 1)?),
    ];
    std::thread::sleep(Duration::from_millis(500));
    for (h, before) in before.iter().enumerate() {
        ensure!(
            queued_bytes(&totals(&lab, h)?) == *before,
            "host {h}: bytes through the engine while the link is down"
        );
    }
    // Back in service: once it stayed up for fail_forward_ms, the
    // connection moves onto the link, and its bytes cross it.
    lab.set_link(1, true)?;
    lab.wait_linked(UP)?;
    forwarded(&lab, 1, 1, 1, true, &log)?;
    // Each host's statistics show the link's last changes, newest first
    // (up, then down with no channel across it: the connection came
    // after), and ringstat prints them.
    for h in 0..2 {
        let v = lab.stats(h)?;
        let hist = &v["peers"][0]["link_history"];
        ensure!(
            hist[0]["state"] == "up"
                && hist[1]["state"] == "down"
                && hist[1]["channels"] == 0
                && hist[0]["ago_ms"].as_u64() <= hist[1]["ago_ms"].as_u64(),
            "host {h}: {}",
            v["peers"]
        );
    }
    let out = lab
        .on(0, &ssock_tests::bin("ringstat").to_string_lossy())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.lines().any(|l| l.starts_with("link to node 2 (")
            && l.contains(": up ")
            && l.contains(", down ")),
        "ringstat on host a:\n{text}"
    );
    for (h, before) in before.iter().enumerate() {
        let what = "no bytes through the engine after moving forward";
        queued_past(&lab, h, before + (4 << 20), Duration::from_secs(20), what)?;
    }
    std::fs::write(&*flag, b"")?;
    let out = client.expect(&["OK "], Duration::from_secs(60));
    if let Err(e) = out {
        anyhow::bail!(
            "{e}\n{}\n{}\nthe shim's log:\n{}",
            lab.log(0),
            lab.log(1),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    ensure!(
        client.wait(Duration::from_secs(10))?.success(),
        "{}",
        client.all()
    );
    server.expect(&["ECHOED "], Duration::from_secs(10))?;
    for h in 0..2 {
        let t = totals(&lab, h)?;
        ensure!(
            t["remote"]["forwards"] == 1
                && t["remote"]["failover_resets"] == 0
                && t["violations"] == 0,
            "host {h}: {t}\n{}",
            lab.log(h)
        );
    }
    Ok(())
}

#[test]
fn redis_benchmark_and_iperf3_started_while_the_link_is_down_move_onto_it_once_back() -> Result<()>
{
    let Some((lab, _servers)) = apps_on_b("bornapps", FORWARD_SOON, "6393", "5214")? else {
        return Ok(());
    };
    lab.set_link(1, false)?;
    for h in 0..2 {
        lab.wait_peer(h, UP, "saw the link down", |p| {
            p["link"] == "down" && p["state"] == "up"
        })?;
    }
    // Their connections are made while the link is down: remote ones on
    // their kernel sockets from the start (redis-benchmark's 4, and one it
    // makes first to read the server's config; iperf3's 2).
    let (bench, iperf) = redis_benchmark_and_iperf3(&lab, "6393", "5214", "8")?;
    for h in 0..2 {
        let t = settled(&lab, h, |t| {
            t["remote"]["made_while_down"].as_u64() >= Some(6)
        })?;
        ensure!(
            t["remote"]["made_while_down"].as_u64() >= Some(6)
                && t["remote"]["failover_resets"] == 0
                && queued_bytes(&t) == 0,
            "host {h}: all six connections should have started on their kernel sockets: {t}\n{}",
            lab.log(h)
        );
    }
    lab.set_link(1, true)?;
    lab.wait_linked(UP)?;
    // Onto the link while they run (the data connections at their next
    // call; iperf3's control connection may be idle until the end).
    moved_forward_and_finished(&lab, bench, iperf, "started while the link was down")
}

/// redis-benchmark (4 connections, an event loop on nonblocking sockets)
/// and iperf3 (a control and a data connection) on host a under ssock-run,
/// against host b's servers on `redis_port` and `iperf_port` (iperf3 for
/// `iperf_secs` seconds).
fn redis_benchmark_and_iperf3(
    lab: &TwoHosts,
    redis_port: &str,
    iperf_port: &str,
    iperf_secs: &str,
) -> Result<(Prog, Prog)> {
    let b = lab.addr[1].clone();
    let bench = Prog::start(lab.under_ssock(
        0,
        &[
            "redis-benchmark",
            "-h",
            &b,
            "-p",
            redis_port,
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
        &[
            "iperf3", "-c", &b, "-p", iperf_port, "-t", iperf_secs, "-l", "64K",
        ],
    ))?;
    Ok((bench, iperf))
}

/// Once the link is back: at least 5 of their connections move onto it
/// on both hosts within 20 s, both programs end with their own success
/// output and no error (`when`: what they ran through, for the message),
/// and more than 16 MiB then cross the link on each host.
fn moved_forward_and_finished(lab: &TwoHosts, bench: Prog, iperf: Prog, when: &str) -> Result<()> {
    for h in 0..2 {
        let t = Instant::now();
        loop {
            let tot = totals(lab, h)?;
            if tot["remote"]["forwards"].as_u64() >= Some(5) {
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(20),
                "host {h}: the connections should have moved onto the link: {}\n{}",
                lab.stats(h)?,
                lab.log(h)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let before = [
        queued_bytes(&totals(lab, 0)?),
        queued_bytes(&totals(lab, 1)?),
    ];
    finished_without_error(bench, iperf, when)?;
    // What they sent once on the link crossed it.
    for (h, before) in before.iter().enumerate() {
        let t = totals(lab, h)?;
        ensure!(
            queued_bytes(&t) > before + (16 << 20)
                && t["remote"]["failover_resets"] == 0
                && t["violations"] == 0,
            "host {h}: their bytes should cross the link: {t}"
        );
    }
    Ok(())
}

/// redis-benchmark and iperf3 end with their own success output and no
/// error (`when`: what they ran through, for the message).
fn finished_without_error(bench: Prog, iperf: Prog, when: &str) -> Result<()> {
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
            "{what} {when}:\n{out}"
        );
    }
    Ok(())
}
