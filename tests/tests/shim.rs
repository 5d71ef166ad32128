//! Unmodified programs under `ssock-run` (part 2, first slice): a blocking
//! Python echo server and client. Acceleration is checked through devd's
//! statistics while the connection is open: a silent fallback fails.

use anyhow::{ensure, Context, Result};
use ssock_tests::{bin, have_app, Devd, Peer};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn echo_py() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/apps/echo.py"))
}

/// python3 echo.py ARGS under ssock-run, to its end: its output (trimmed),
/// if it succeeded.
fn echo_run(d: &Devd, args: &[&str]) -> Result<String> {
    let out = d.ssock_run("python3").arg(echo_py()).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.status.success(),
        "echo.py {args:?} failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// python3 echo.py ARGS, under ssock-run unless `plain`.
fn python(d: &Devd, plain: bool, args: &[&str], env: &[(&str, &str)]) -> Result<Peer> {
    let mut cmd = if plain {
        Command::new("python3")
    } else {
        d.ssock_run("python3")
    };
    cmd.arg(echo_py()).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Peer::command(cmd)
}

/// Runs the echo pair; returns devd's view of the connection while open.
fn echo_pair(
    d: &Devd,
    plain_server: bool,
    plain_client: bool,
    env: &[(&str, &str)],
) -> Result<Option<serde_json::Value>> {
    echo_with(d, "server", plain_server, plain_client, env)
}

/// Like `echo_pair` with the given server mode of echo.py.
fn echo_with(
    d: &Devd,
    server: &str,
    plain_server: bool,
    plain_client: bool,
    env: &[(&str, &str)],
) -> Result<Option<serde_json::Value>> {
    echo_served(d, server, plain_server, plain_client, env, 0)
}

/// `echo_with`, the server having echoed `extra` bytes beyond the echo's.
fn echo_served(
    d: &Devd,
    server: &str,
    plain_server: bool,
    plain_client: bool,
    env: &[(&str, &str)],
    extra: u64,
) -> Result<Option<serde_json::Value>> {
    let (conn, _) = echo_on(d, server, plain_server, plain_client, env, extra, None)?;
    Ok(conn)
}

/// `echo_served` with the server listening on port `at` (None: one the
/// kernel picks); also returns the port.
fn echo_on(
    d: &Devd,
    server: &str,
    plain_server: bool,
    plain_client: bool,
    env: &[(&str, &str)],
    extra: u64,
    at: Option<&str>,
) -> Result<(Option<serde_json::Value>, String)> {
    let portfile = scratch(d, "port");
    let mut senv = env.to_vec();
    if let Some(p) = at {
        senv.push(("ECHO_PORT", p));
    }
    let mut s = python(
        d,
        plain_server,
        &[server, portfile.to_str().context("path")?],
        &senv,
    )?;
    let port = published_port(&portfile)?;
    let n = "1000000";
    let mut cargs = vec!["client", port.trim(), n];
    if let Some((_, mode)) = env.iter().find(|(k, _)| *k == "ECHO_MODE") {
        cargs.push(mode);
    }
    let mut c = python(d, plain_client, &cargs, env)?;
    c.expect(&format!("OK echo {n}"))?;
    let conn = d.stats()?["connections"]
        .as_array()
        .and_then(|a| a.first().cloned());
    c.say("")?;
    s.expect(&format!("OK served {}", 1_000_000 + extra))?;
    ensure!(
        c.wait_success()? && s.wait_success()?,
        "a python process failed"
    );
    Ok((conn, port.trim().to_string()))
}

/// The connection went Direct and carried the echo's 1,000,000 bytes each way.
fn direct_with_every_byte(conn: &serde_json::Value) -> Result<()> {
    ensure!(conn["mode"] == "direct", "mode {}", conn["mode"]);
    ensure!(
        conn["bytes_c2a"] == 1_000_000 && conn["bytes_a2c"] == 1_000_000,
        "bytes {conn}"
    );
    Ok(())
}

/// The port an echo.py server wrote to `portfile` (waits up to 20 s).
fn published_port(portfile: &std::path::Path) -> Result<String> {
    let t = Instant::now();
    while !portfile.exists() {
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(std::fs::read_to_string(portfile)?)
}

/// A path of this test's own beside devd's socket, `NAME` after a random part.
fn scratch(d: &Devd, name: &str) -> PathBuf {
    d.socket.with_file_name(format!("{}-{name}", rand_suffix()))
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()) ^ d.as_secs())
}

#[test]
fn unmodified_python_echo_goes_direct_under_ssock_run() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let conn =
        echo_pair(&d, false, false, &[])?.context("no accelerated connection in devd's stats")?;
    direct_with_every_byte(&conn)
}

/// A connection its connector reset before the server accepted it: the
/// server reads the bytes sent before the reset, then the reset, as on
/// kernel TCP, and devd counts the connection (on kernel TCP, its
/// connector gone) although the accepted socket has no peer address left.
#[test]
fn a_connection_reset_before_its_accept_is_read_right_and_counted() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let kernel = std::process::Command::new("python3")
        .arg(echo_py())
        .arg("reset-before-accept")
        .output()?;
    let kernel = String::from_utf8_lossy(&kernel.stdout).trim().to_string();
    ensure!(
        kernel == "early bytes ECONNRESET",
        "on kernel TCP: {kernel}"
    );
    let d = Devd::start(&[])?;
    let out = echo_run(&d, &["reset-before-accept"])?;
    ensure!(out == kernel, "under ssock-run: {out}");
    let t = d.stats()?["totals"].clone();
    ensure!(
        t["fallbacks"]["connector_gone"] == 1 && t["connections"]["kernel"] == 1,
        "the connection is counted: {t}"
    );
    Ok(())
}

#[test]
fn plain_python_peers_on_either_side_stay_on_kernel_tcp() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    // Plain client, accelerated server: the echo is verified byte for byte,
    // so no ssock byte reached the plain side.
    let (conn, port) = echo_on(&d, "server", false, true, &[], 0, None)?;
    ensure!(conn.is_none());
    // Accelerated client, plain server, on the port the accelerated server
    // has just left: devd's listener board lists no listener there any
    // more (devd looks its registration up when the server's session
    // ends), so the client does not even ask (nothing counted).
    let (conn, _) = echo_on(&d, "server", true, false, &[], 0, Some(&port))?;
    ensure!(conn.is_none());
    let t = d.stats()?["totals"].clone();
    ensure!(t["connections"]["direct"] == 0, "totals {t}");
    ensure!(
        t["fallbacks"]["peer_not_enabled"] == 0 && t["connections"]["kernel"] == 0,
        "totals {t}"
    );
    Ok(())
}

#[test]
fn ssock_disable_makes_the_shim_a_pass_through() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    ensure!(echo_pair(&d, false, false, &[("SSOCK_DISABLE", "1")])?.is_none());
    let t = d.stats()?["totals"].clone();
    // No negotiation at all: nothing accelerated, no fallback recorded.
    ensure!(
        t["connections"]["direct"] == 0 && t["connections"]["kernel"] == 0,
        "totals {t}"
    );
    ensure!(d.stats()?["devd"]["listeners"] == 0);
    Ok(())
}

#[test]
fn asyncio_server_and_client_go_direct_through_epoll_and_nonblocking_connect() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    // asyncio on both sides: a nonblocking listener and accept4, a
    // nonblocking connect (EINPROGRESS, then writable), and epoll waits
    // that must see the rings: the echo goes Direct with every byte.
    let d = Devd::start(&[])?;
    let conn = echo_with(&d, "aserver", false, false, &[("ECHO_MODE", "asyncio")])?
        .context("no accelerated connection")?;
    direct_with_every_byte(&conn)
}

#[test]
fn a_forking_server_keeps_the_connection_after_the_parent_closes_its_copy() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    // Fork per connection (PostgreSQL's shape): the parent closes its copy
    // right after fork. Only the last holder's close may end the stream,
    // so the child's echo must complete and the client must see EOF after
    // everything, on a Direct connection.
    let d = Devd::start(&[])?;
    let conn = echo_with(&d, "fserver", false, false, &[])?.context("no accelerated connection")?;
    direct_with_every_byte(&conn)
}

/// A pserver (echo.py) under ssock-run, `daemon` or not: three echo
/// clients one after another, each Direct with every byte; then, with the
/// server still up, devd must let go of every connection once the children
/// that held them have exited (they never close: the kernel does at exit),
/// as it would on kernel TCP: nothing stays charged to the server.
fn pserver_serves_and_lets_go(daemon: bool) -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let portfile = scratch(&d, "port");
    let mut args = vec!["pserver", portfile.to_str().context("path")?];
    if daemon {
        args.push("daemon");
    }
    let mut s = python(&d, false, &args, &[])?;
    if daemon {
        // The process that listened has exited; its child serves.
        ensure!(s.wait_success()?, "the daemonizing server failed");
    }
    let port = published_port(&portfile)?;
    let pidfile = portfile.with_extension("pid");
    let server_pid: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    let result = (|| -> Result<()> {
        let n = "100000";
        for _ in 0..3 {
            let mut c = python(&d, false, &["client", port.trim(), n], &[])?;
            c.expect(&format!("OK echo {n}"))?;
            c.say("")?;
            ensure!(c.wait_success()?, "a client failed");
        }
        let v = d.stats()?;
        ensure!(
            v["totals"]["connections"]["direct"] == 3 && v["totals"]["connections"]["kernel"] == 0,
            "not every connection went Direct: {}",
            v["totals"]
        );
        // Their holders all exited.
        d.wait_none_live(Duration::from_secs(10))?;
        ensure!(
            std::path::Path::new(&format!("/proc/{server_pid}")).exists(),
            "the server exited"
        );
        Ok(())
    })();
    let _ = Command::new("kill")
        .args(["-KILL", &server_pid.to_string()])
        .status();
    s.kill();
    result
}

#[test]
fn connections_handed_to_forked_children_end_in_devd_when_the_children_do() -> Result<()> {
    pserver_serves_and_lets_go(false)
}

#[test]
fn a_server_that_daemonizes_after_listen_stays_accelerated() -> Result<()> {
    pserver_serves_and_lets_go(true)
}

#[test]
fn vectored_calls_sendmsg_writev_recvmsg_readv_go_through_the_shim() -> Result<()> {
    // The client sends with sendmsg and writev and receives with recvmsg
    // and readv, in turns; every echoed byte is verified, over Direct.
    echo_mode_is_direct("vec")
}

#[test]
fn vectors_larger_than_the_ring_go_whole_without_staging() -> Result<()> {
    // writev and sendmsg of 400 KB vectors (one iovec a single byte) into
    // a ring of under 40 KiB, from a thread of their own, while the main
    // thread reads the echo with readv into three odd-sized buffers: each
    // vector is written piece after piece across many waits, in order,
    // every byte verified.
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&["--region-size", "81920"])?;
    let conn = echo_pair(&d, false, false, &[("ECHO_MODE", "bigvec")])?
        .context("no accelerated connection")?;
    direct_with_every_byte(&conn)
}

#[test]
fn poll_reports_ring_readiness_of_accelerated_sockets() -> Result<()> {
    // The client waits in poll(2) for POLLOUT before each send and POLLIN
    // before each receive: on an accelerated socket only the shim can say
    // so (the kernel socket carries no data), and a miss is a 10 s timeout
    // that fails the client.
    echo_mode_is_direct("poll")
}

#[test]
fn poll_with_spinning_off_sleeps_and_is_woken_by_the_peer() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let env = [("ECHO_MODE", "poll"), ("SSOCK_SPIN_US", "0")];
    let conn = echo_pair(&d, false, false, &env)?.context("no accelerated connection")?;
    ensure!(
        conn["mode"] == "direct" && conn["bytes_a2c"] == 1_000_000,
        "conn {conn}"
    );
    ensure!(
        conn["notify_sent"].as_u64().unwrap_or(0) > 0,
        "no wake-up was ever needed: {conn}"
    );
    Ok(())
}

fn echo_mode_is_direct(mode: &str) -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let conn = echo_pair(&d, false, false, &[("ECHO_MODE", mode)])?
        .context("no accelerated connection")?;
    direct_with_every_byte(&conn)
}

#[test]
fn splice_on_an_accelerated_socket_is_refused_and_counted() -> Result<()> {
    // EINVAL (programs fall back to read/write), the stream intact (the
    // echo after it is verified), and the refusal counted as unsupported.
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let conn = echo_pair(&d, false, false, &[("ECHO_MODE", "splice")])?
        .context("no accelerated connection")?;
    direct_with_every_byte(&conn)?;
    let t = d.stats()?["totals"].clone();
    ensure!(t["fallbacks"]["unsupported"] == 1, "totals {t}");
    Ok(())
}

#[test]
fn select_reports_ring_readiness_of_accelerated_sockets() -> Result<()> {
    // select.select before every send and receive; a miss times out (10 s).
    echo_mode_is_direct("select")
}

#[test]
fn a_dup_names_the_same_socket_and_closing_the_original_keeps_it() -> Result<()> {
    // The client dups its socket, closes the original, and runs the whole
    // echo on the duplicate.
    echo_mode_is_direct("dup")
}

#[test]
fn a_socket_on_a_number_that_named_a_plain_socket_before_is_accelerated() -> Result<()> {
    // The client's TCP socket lives on an fd number that held a connected
    // UDP socket (which the shim leaves to the kernel and remembers so),
    // dup2'ed onto it: fails if dup2 did not make the shim forget.
    echo_mode_is_direct("reused")
}

#[test]
fn two_threads_polling_one_idle_accelerated_socket_sleep() -> Result<()> {
    // Past the 1 s cap on a Direct sleep, a sleeper's wake-up may ring the
    // others: two cores busy for nothing if they ring each other back.
    // After the echo (both directions on the rings), echo.py fails over
    // 0.3 s of CPU in the 2.5 s its two threads poll the idle socket, and
    // again in the 2.5 s two threads wait on an edge-triggered epoll set
    // whose event (1 byte, left unread) they were already given.
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    // The echo's bytes and the one echoed while its event is not read.
    let conn = echo_served(&d, "server", false, false, &[("ECHO_MODE", "idlepoll")], 1)?
        .context("no accelerated connection")?;
    ensure!(conn["mode"] == "direct", "mode {}", conn["mode"]);
    ensure!(
        conn["bytes_c2a"] == 1_000_001 && conn["bytes_a2c"] == 1_000_001,
        "bytes {conn}"
    );
    Ok(())
}

#[test]
fn a_fork_per_connection_server_keeps_no_fd_per_connection() -> Result<()> {
    // Each fork gives the child a doorbell of the parent's pool: the
    // parent used to keep that doorbell's ringers' end for good.
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let portfile = scratch(&d, "port");
    let k = "40";
    let mut s = python(
        &d,
        false,
        &["kserver", portfile.to_str().context("path")?, k],
        &[],
    )?;
    let port = published_port(&portfile)?;
    let out = echo_run(&d, &["client", port.trim(), k, "kclient"])?;
    ensure!(out.contains("OK kclient 40"), "client: {out}");
    let line = s.expect("FDS")?;
    let fds: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(s.wait_success()?, "the server failed");
    let direct = d.stats()?["totals"]["connections"]["direct"]
        .as_u64()
        .unwrap_or(0);
    ensure!(direct >= 40, "{direct} of 40 connections Direct");
    ensure!(
        fds.len() == 2 && fds[1] <= fds[0] + 2,
        "the parent's fds grew from {} to {} over 35 forks",
        fds[0],
        fds.get(1).copied().unwrap_or(0)
    );
    Ok(())
}

#[test]
fn fionread_reports_the_bytes_waiting_in_the_ring() -> Result<()> {
    // After POLLIN, FIONREAD must count the ring's bytes (the kernel socket
    // holds none) and a recv of that many must return them.
    echo_mode_is_direct("fionread")
}

#[test]
fn two_threads_share_a_socket_full_duplex_and_shutdown_wakes_a_blocked_reader() -> Result<()> {
    // A writer thread and a reading thread on one accelerated socket must
    // not block each other (the shim holds a socket's lock only for
    // non-blocking steps, and readers and writers sleep on separate
    // doorbells), and shutdown(SHUT_RD) from another thread must wake a
    // reader blocked in recv, as on kernel TCP.
    echo_mode_is_direct("threads")
}

#[test]
fn so_rcvtimeo_ends_a_blocking_recv_with_eagain() -> Result<()> {
    // After the echo, the client sets SO_RCVTIMEO to 0.5 s and receives
    // with nothing coming: EAGAIN after about 0.5 s, not a hang.
    echo_mode_is_direct("rcvtimeo")
}

/// A server-speaks-first exchange (echo.py gserver/greeted): returns the
/// client's greeting delay in milliseconds and devd's view of the
/// connection while it was open.
fn greeting(
    d: &Devd,
    plain_server: bool,
    plain_client: bool,
) -> Result<(f64, Option<serde_json::Value>)> {
    let portfile = scratch(d, "port");
    let mut s = python(
        d,
        plain_server,
        &["gserver", portfile.to_str().context("path")?],
        &[],
    )?;
    let port = published_port(&portfile)?;
    let mut c = python(
        d,
        plain_client,
        &["client", port.trim(), "0", "greeted"],
        &[],
    )?;
    let line = c.expect("OK greeted in ")?;
    let ms: f64 = line
        .trim_start_matches("OK greeted in ")
        .trim_end_matches(" ms")
        .parse()?;
    s.expect("OK served 10")?;
    let conn = d.stats()?["connections"]
        .as_array()
        .and_then(|a| a.first().cloned());
    c.say("")?;
    s.say("")?;
    ensure!(
        c.wait_success()? && s.wait_success()?,
        "a python process failed"
    );
    Ok((ms, conn))
}

#[test]
fn server_speaks_first_protocols_work_with_plain_and_accelerated_peers() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    // A greeting (SMTP, PostgreSQL) with a plain peer on either side: the
    // plain side gets exactly the greeting, and at once: an acceptor that
    // waited for a Hello that never comes would stall it for the 2 s hello
    // timeout, so the bound is a protocol check, not a speed measurement.
    let d = Devd::start(&[])?;
    for (plain_server, plain_client) in [(false, true), (true, false)] {
        let (ms, conn) = greeting(&d, plain_server, plain_client)?;
        ensure!(conn.is_none(), "a plain pair was accelerated: {conn:?}");
        ensure!(
            ms < 1000.0,
            "greeting took {ms} ms (plain server {plain_server}, plain client {plain_client})"
        );
    }
    let t = d.stats()?["totals"].clone();
    ensure!(t["connections"]["direct"] == 0, "totals {t}");
    // Nobody is counted: an accelerated connector finds no listener on
    // devd's board and does not ask; a plain connector's acceptor finds
    // no intent.
    ensure!(t["fallbacks"]["peer_not_enabled"] == 0, "totals {t}");
    // Both accelerated: the exchange travels over Direct. The greeting
    // too, unless the server wrote it before its end of the region was
    // ready (a loaded machine): then it went on the kernel socket ahead of
    // the hand-over, and only the echo's 10 bytes each way are the ring's.
    let (_, conn) = greeting(&d, false, false)?;
    let conn = conn.context("no accelerated connection")?;
    ensure!(conn["mode"] == "direct", "mode {}", conn["mode"]);
    ensure!(
        (conn["bytes_a2c"] == 20 || conn["bytes_a2c"] == 10) && conn["bytes_c2a"] == 10,
        "bytes {conn}"
    );
    Ok(())
}

#[test]
fn ssock_run_warns_when_a_program_cannot_be_intercepted() -> Result<()> {
    // ldconfig is a static-pie binary on Debian (package libc-bin).
    let run = |prog: &str, args: &[&str]| -> Result<String> {
        let out = Command::new(bin("ssock-run"))
            .args(["--devd", "none", "--", prog])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let err = run("/sbin/ldconfig", &["--version"])?;
    ensure!(
        err.contains("cannot be accelerated: it is statically linked"),
        "stderr: {err}"
    );
    // A setuid program, where the system has one.
    if let Some(su) = ["/usr/bin/passwd", "/bin/su", "/usr/bin/su"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    {
        let err = run(su, &["--help"])?;
        ensure!(err.contains("it is setuid/setgid"), "stderr: {err}");
    }
    if have_app("python3")? {
        let err = run("python3", &["-c", "pass"])?;
        ensure!(!err.contains("warning"), "stderr: {err}");
    }
    Ok(())
}

#[test]
fn ssock_run_log_records_what_the_shim_decided() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let log = scratch(&d, "shim.log");
    let log_s = log.to_str().context("path")?;
    let portfile = scratch(&d, "port");
    let mut srv = Command::new(bin("ssock-run"));
    srv.args([
        "--devd",
        d.socket.to_str().context("path")?,
        "--log",
        log_s,
        "--",
        "python3",
    ])
    .arg(echo_py())
    .args(["server", portfile.to_str().context("path")?]);
    let mut s = Peer::command(srv)?;
    let port = published_port(&portfile)?;
    let mut c = python(&d, false, &["client", port.trim(), "1000"], &[])?;
    c.expect("OK echo 1000")?;
    c.say("")?;
    s.expect("OK served 1000")?;
    ensure!(c.wait_success()? && s.wait_success()?);
    let text = std::fs::read_to_string(&log)?;
    let _ = std::fs::remove_file(&log);
    ensure!(
        text.lines()
            .any(|l| l.starts_with("ssock[") && l.contains("accept: Direct, connection")),
        "log: {text}"
    );
    Ok(())
}

#[test]
fn a_failed_fd_passing_gives_its_hold_back_so_close_still_ends_the_stream() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    for mode in ["direct", "queued"] {
        let d = Devd::start(&["--default-mode", mode])?;
        let text = echo_run(&d, &["failed-pass"]).context(mode)?;
        ensure!(text == "eof", "{mode}: {text}");
        // And the connection was accelerated in that mode.
        let t = d.stats()?["totals"].clone();
        ensure!(t["connections"][mode] == 1, "{mode}: totals {t}");
    }
    Ok(())
}

#[test]
fn connections_between_the_same_processes_reuse_a_kept_region_that_no_child_inherits() -> Result<()>
{
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let n = 20;
    let text = echo_run(&d, &["reuse", &n.to_string()])?;
    // Each connection's bytes were checked both ways by the program; the
    // first one made a region, every later one reused it (both ends of
    // each are in this one process, so both sides of the region are kept).
    let t = d.stats()?["totals"].clone();
    ensure!(t["connections"]["direct"] == n, "totals {t}");
    ensure!(t["regions_reused"] == n - 1, "totals {t}");
    // This process still maps the region it keeps (one mapping per
    // side); a child forked meanwhile maps none.
    ensure!(text == format!("OK reuse {n} kept=2 child=0"), "{text}");
    Ok(())
}

#[test]
fn a_region_a_forked_child_may_have_is_not_kept() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let text = echo_run(&d, &["fork-live"])?;
    ensure!(text == "OK fork-live", "{text}");
    // Both connections Direct; the first was live at the fork, so its
    // region went with it instead of to the second.
    let st = d.stats()?;
    let t = &st["totals"];
    ensure!(t["connections"]["direct"] == 2, "totals {t}");
    ensure!(t["regions_reused"] == 0, "totals {t}");
    // The child's close gave its hold back: the parent's close ended the
    // first connection (released, not left to the orphan grace).
    ensure!(st["devd"]["live_connections"] == 0, "devd {}", st["devd"]);
    Ok(())
}

#[test]
fn closing_every_unknown_fd_leaves_the_shim_its_session_doorbells_and_log() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let log = scratch(&d, "shim.log");
    let file = scratch(&d, "app.txt");
    let mut cmd = Command::new(bin("ssock-run"));
    cmd.args(["--devd", d.socket.to_str().context("path")?])
        .args(["--log", log.to_str().context("path")?, "--", "python3"])
        .arg(echo_py())
        .args(["close-all", file.to_str().context("path")?])
        // Every wait sleeps on its doorbell: closed doorbells would show.
        .env("SSOCK_SPIN_US", "0")
        .env("SSOCK_LOG_LEVEL", "debug");
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.status.success() && text == "OK close-all",
        "close-all: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both connections Direct: the second needed the devd session that
    // the close-all code did not close.
    let t = d.stats()?["totals"].clone();
    ensure!(t["connections"]["direct"] == 2, "totals {t}");
    ensure!(t["connections"]["kernel"] == 0, "totals {t}");
    // The log still went to the log (the second connection's lines).
    let logged = std::fs::read_to_string(&log)?;
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&file);
    ensure!(
        logged
            .lines()
            .filter(|l| l.contains("Direct, connection"))
            .count()
            >= 4,
        "log: {logged}"
    );
    Ok(())
}

/// Waits up to `limit` for `p` to exit; false if it is still running.
fn exits_within(p: &mut Peer, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if !p.alive() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `who` exits within 10 s, successfully.
fn ends_well(p: &mut Peer, who: &str) -> Result<()> {
    ensure!(
        exits_within(p, Duration::from_secs(10)),
        "the {who} did not end"
    );
    ensure!(p.wait_success()?, "the {who} failed");
    Ok(())
}

/// A Queued connection between two programs under ssock-run outlives
/// devd: once devd is SIGKILLed, the next round of the echo (and its
/// end) goes over the kernel socket, every byte checked by the client.
#[test]
fn queued_peers_under_the_shim_move_to_the_kernel_socket_when_devd_dies() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    for spin in ["0", "50"] {
        let mut d = Devd::start(&["--default-mode", "queued"])?;
        let portfile = scratch(&d, "port");
        let env = [("SSOCK_SPIN_US", spin), ("ECHO_AGAIN", "1")];
        let mut s = python(
            &d,
            false,
            &["server", portfile.to_str().context("path")?],
            &env,
        )?;
        let port = published_port(&portfile)?;
        let mut c = python(&d, false, &["client", port.trim(), "1000000"], &env)?;
        c.expect("OK echo 1000000")?;
        let t = d.stats()?["totals"].clone();
        ensure!(
            t["connections"]["queued"] == 1 && t["bytes"]["queued"].as_u64() >= Some(2_000_000),
            "totals {t}"
        );
        // The server now sleeps in recv; the client waits on its stdin.
        d.kill();
        c.say("")?;
        c.expect("OK echo 2000000")?;
        c.say("")?;
        ends_well(&mut c, "client")?;
        ends_well(&mut s, "server")?;
    }
    Ok(())
}

/// A reader that closes with region bytes unread after devd died resets
/// the connection, as the kernel's close does: its peer, reading the
/// kernel socket by then, gets ECONNRESET, not an end of stream.
#[test]
fn a_queued_close_with_bytes_unread_after_devd_died_resets_the_peer() -> Result<()> {
    unread_at_close_after_devd_died(false)
}

/// The same when devd died before it moved any byte (stopped, then
/// killed): the bytes are still the writer's, never the reader's, and the
/// reader's close is a reset all the same.
#[test]
fn a_queued_close_after_devd_died_before_moving_the_bytes_resets_the_peer() -> Result<()> {
    unread_at_close_after_devd_died(true)
}

fn unread_at_close_after_devd_died(stalled: bool) -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let mut d = Devd::start_stoppable(&["--default-mode", "queued"])?;
    let portfile = scratch(&d, "port");
    let mut s = python(
        &d,
        false,
        &["userver", portfile.to_str().context("path")?],
        &[],
    )?;
    let port = published_port(&portfile)?;
    let mut c = python(&d, false, &["uclient", port.trim(), "100000"], &[])?;
    // Sent once accepted: every byte goes through the region.
    s.expect("ACCEPTED")?;
    let t = d.stats()?["totals"].clone();
    ensure!(t["connections"]["queued"] == 1, "totals {t}");
    if stalled {
        // SAFETY: kill on devd's pid, a child of this test.
        ensure!(unsafe { libc::kill(d.pid() as i32, libc::SIGSTOP) } == 0);
    }
    c.say("")?;
    c.expect("SENT")?;
    let t = Instant::now();
    while !stalled && live_queued_bytes(&d)? < 100_000 {
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "the bytes did not go through the region: {}",
            d.stats()?["totals"]
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    d.kill();
    s.say("")?;
    s.expect("OK userver")?;
    c.say("")?;
    c.expect("OK uclient ECONNRESET")?;
    ends_well(&mut c, "client")?;
    ends_well(&mut s, "server")?;
    Ok(())
}

/// The same with bytes in flight everywhere: a Python source writes 16 MiB
/// as fast as it can to a sink that reads a chunk per millisecond, and devd
/// is SIGKILLed on the way: the sink checks every byte, the source ends.
#[test]
fn queued_bytes_in_flight_under_the_shim_all_arrive_when_devd_dies() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let mut d = Devd::start(&["--default-mode", "queued"])?;
    let portfile = scratch(&d, "port");
    let mut s = python(
        &d,
        false,
        &["sink", portfile.to_str().context("path")?, "1000"],
        &[],
    )?;
    let port = published_port(&portfile)?;
    let n = (16u64 << 20).to_string();
    let mut c = python(&d, false, &["source", port.trim(), &n], &[])?;
    c.expect("SENDING")?;
    let t = Instant::now();
    loop {
        let tot = d.stats()?["totals"].clone();
        ensure!(tot["connections"]["queued"] == 1, "totals {tot}");
        if live_queued_bytes(&d)? > 0 {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "no byte through the region: {tot}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    d.kill();
    ensure!(s.line_within(Duration::from_secs(60))? == format!("OK sink {n}"));
    ensure!(c.line_within(Duration::from_secs(10))? == format!("OK source {n}"));
    ends_well(&mut c, "source")?;
    ends_well(&mut s, "sink")?;
    Ok(())
}

/// Now the reader finds devd gone first: the source stops (outside any
/// socket call) after 3 MiB, devd is SIGKILLed, the sink (which polls
/// before each read) notices when its queue runs dry and closes the region
/// part; the source, told to go on, learns it from TAKEN and sends again
/// from there. Every byte checked by the sink; the shim's log shows who
/// did what. `close`: the source closes right after the pause instead, so
/// what it owes goes out in its close.
fn reader_first(close: bool) -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let mut d = Devd::start(&["--default-mode", "queued"])?;
    let portfile = scratch(&d, "port");
    let log = scratch(&d, "log");
    let env = [("SSOCK_LOG", log.to_str().context("path")?)];
    let mut s = python(
        &d,
        false,
        &[
            "sink",
            portfile.to_str().context("path")?,
            "1000",
            "announce",
        ],
        &env,
    )?;
    let port = published_port(&portfile)?;
    let pause = 3u64 << 20;
    let n = if close { pause } else { 8u64 << 20 };
    let (n, pause) = (n.to_string(), pause.to_string());
    let args = ["source", port.trim(), &n, &pause, "hold"];
    let mut c = python(&d, false, &args, &env)?;
    // The source sends only once the sink holds its end: its writes move
    // to the region at once, not after 3 MiB that kernel buffers took.
    c.expect("CONNECTED")?;
    s.expect("ACCEPTED")?;
    c.say("")?;
    c.expect("PAUSED")?;
    ensure!(live_queued_bytes(&d)? > 0, "no byte through the region");
    d.kill();
    // The sink reads on and finds its queue empty.
    std::thread::sleep(Duration::from_millis(300));
    c.say("")?;
    ensure!(s.line_within(Duration::from_secs(60))? == format!("OK sink {n}"));
    let done = c.line_within(Duration::from_secs(10))?;
    ensure!(
        done.starts_with(&format!("OK source {n}")),
        "source said {done}"
    );
    ends_well(&mut c, "source")?;
    ends_well(&mut s, "sink")?;
    let text = std::fs::read_to_string(&log)?;
    let sink_pid = format!("ssock[{}]", s.pid());
    let source_pid = format!("ssock[{}]", c.pid());
    ensure!(
        text.lines()
            .any(|l| l.starts_with(&sink_pid) && l.contains("reads back on the kernel socket")),
        "the sink did not move back first:\n{text}"
    );
    let again = text
        .lines()
        .filter(|l| l.starts_with(&source_pid) && l.contains("bytes again"))
        .filter_map(|l| l.split('(').nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .next()
        .with_context(|| format!("the source did not move back:\n{text}"))?;
    ensure!(again > 0, "the source sent nothing again:\n{text}");
    Ok(())
}

#[test]
fn a_queued_reader_that_finds_devd_gone_first_closes_the_region_and_its_writer_follows(
) -> Result<()> {
    reader_first(false)
}

#[test]
fn a_queued_writer_that_closes_after_devd_died_still_delivers_what_it_owed() -> Result<()> {
    reader_first(true)
}

/// Bytes the live connections in devd's statistics carried through their
/// regions.
fn live_queued_bytes(d: &Devd) -> Result<u64> {
    let v = d.stats()?;
    let conns = v["connections"].as_array().context("connections")?;
    Ok(conns
        .iter()
        .map(|c| c["bytes_c2a"].as_u64().unwrap_or(0) + c["bytes_a2c"].as_u64().unwrap_or(0))
        .sum())
}

/// devd stopped for longer than a request may wait for its answer (10 s):
/// the connection set up meanwhile stays on kernel TCP, every byte checked,
/// and neither end waits beyond that bound; once devd runs again, the
/// processes' next connection goes Direct.
#[test]
fn a_stalled_devd_leaves_a_connection_on_kernel_tcp_and_the_next_one_goes_direct() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start_stoppable(&[])?;
    let portfile = scratch(&d, "port");
    let mut s = python(
        &d,
        false,
        &["pserver", portfile.to_str().context("path")?],
        &[],
    )?;
    let port = published_port(&portfile)?;
    let signal = |sig| {
        // SAFETY: kill on devd's pid, a child of this test.
        unsafe { libc::kill(d.pid() as i32, sig) }
    };
    ensure!(signal(libc::SIGSTOP) == 0);
    let t = Instant::now();
    let mut c = python(&d, false, &["client", port.trim(), "100000"], &[])?;
    let r = c.line_within(Duration::from_secs(40));
    ensure!(signal(libc::SIGCONT) == 0);
    ensure!(r? == "OK echo 100000");
    let took = t.elapsed();
    ensure!(
        took >= Duration::from_secs(9),
        "the request did not wait: {took:?}"
    );
    c.say("")?;
    ensure!(c.wait_success()?, "the client failed");
    let t = d.stats()?["totals"].clone();
    ensure!(t["connections"]["direct"] == 0, "totals {t}");
    // devd runs again: the same server's next connection, a new client.
    let mut c = python(&d, false, &["client", port.trim(), "100000"], &[])?;
    c.expect("OK echo 100000")?;
    let t = d.stats()?["totals"].clone();
    ensure!(
        t["connections"]["direct"] == 1 && t["bytes"]["direct"].as_u64() >= Some(200_000),
        "totals {t}"
    );
    c.say("")?;
    ensure!(c.wait_success()?, "the second client failed");
    ensure!(s.alive(), "the server died");
    d.wait_none_live(Duration::from_secs(10))?;
    Ok(())
}

/// Issue 11, item 1: a program limited to 1024 descriptors (Debian's
/// default) holds about as many accelerated connections as it holds on
/// kernel TCP: a Direct connection costs it its socket, the doorbells are
/// one per process (1016 against 1019 here; with 5 fds per connection it
/// was 205). The last, whose region could not arrive, stays on kernel TCP
/// and still gets its greeting.
#[test]
fn a_program_with_1024_fds_holds_at_least_half_as_many_accelerated_connections() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let script = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/apps/fdcap.py"));
    let mut held = Vec::new();
    for accelerated in [false, true] {
        let portfile = scratch(&d, "port");
        let spawn = |args: &[&str]| -> Result<Peer> {
            let mut cmd = if accelerated {
                d.ssock_run("python3")
            } else {
                Command::new("python3")
            };
            cmd.arg(&script).args(args);
            Peer::command(cmd)
        };
        let _s = spawn(&["server", portfile.to_str().context("path")?])?;
        let port = published_port(&portfile)?;
        let mut c = spawn(&["client", port.trim(), "2000"])?;
        let l = c.line_within(Duration::from_secs(120))?;
        let k: u64 = l.strip_prefix("HELD ").context("HELD")?.parse()?;
        held.push(k);
    }
    // The accelerated ones among those the program held.
    let t = d.stats()?["totals"].clone();
    let direct = t["connections"]["direct"].as_u64().context("direct")?;
    eprintln!(
        "kernel TCP: {} held; under ssock-run: {} held, {direct} of them Direct",
        held[0], held[1]
    );
    // Every one it held went Direct but those the fd limit kept on kernel
    // TCP (a region that could not be received), and a doorbell per
    // process (not per connection) leaves it a few fds short of kernel TCP.
    ensure!(
        direct + 2 >= held[1] && held[1] + 8 >= held[0],
        "kernel TCP: {} held; under ssock-run: {} held, {direct} of them Direct",
        held[0],
        held[1]
    );
    Ok(())
}

/// Issue 11: an epoll set of forty idle connections parks them on one
/// doorbell of its own (the kernel instance then holds that doorbell, a
/// socket that is no member's, beside the members' sockets), sleeps
/// without using the CPU, and still reports a byte a peer in another
/// process sends meanwhile. The same program on kernel TCP has no such
/// doorbell (the probe counts none).
#[test]
fn an_epoll_set_of_idle_connections_parks_them_on_one_doorbell() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let script = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/apps/parking.py"));
    for accelerated in [false, true] {
        let mut cmd = if accelerated {
            d.ssock_run("python3")
        } else {
            Command::new("python3")
        };
        cmd.arg(&script);
        let mut p = Peer::command(cmd)?;
        let mut line = || p.line_within(Duration::from_secs(30));
        let before = line()?;
        let asleep = line()?;
        let woke = line()?;
        let idle = line()?;
        let parked = if accelerated { "ASLEEP 1" } else { "ASLEEP 0" };
        ensure!(before == "BEFORE 0", "{accelerated}: {before}");
        ensure!(asleep == parked, "{accelerated}: {asleep}");
        ensure!(woke == "WOKE 7 1", "{accelerated}: {woke}");
        let cpu: f64 = idle.strip_prefix("IDLE ").context("IDLE")?.parse()?;
        ensure!(cpu < 0.2, "{accelerated}: the sleep used {cpu} s of CPU");
        ensure!(p.wait_success()?, "parking.py failed");
    }
    let t = d.stats()?["totals"].clone();
    ensure!(t["connections"]["direct"] == 40, "totals {t}");
    Ok(())
}
