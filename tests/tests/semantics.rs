//! The differential semantics test (issue 3, item 4): tests/apps/semantics.py
//! walks through fork, exec, fd passing, epoll (edge-triggered, one-shot,
//! RDHUP/HUP, nested), nonblocking connect, half-close, MSG_PEEK,
//! MSG_WAITALL, SO_RCVTIMEO, threads, IPv6, sendfile, a reset and FIONREAD,
//! printing what it observes. Run on kernel TCP and under ssock-run, the
//! two outputs must be identical, and devd must have made every one of its
//! connections Direct (all but the refused connect, which stays plain).

use anyhow::{ensure, Context, Result};
use ssock_tests::{have_app, Devd, Peer};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn script() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/apps/semantics.py"))
}

/// Runs the script (under ssock-run with `d`'s devd if given) on `cases`
/// (all when empty); its stdout.
fn run(d: Option<&Devd>, env: &[(&str, &str)], cases: &[&str]) -> Result<String> {
    let mut cmd = match d {
        None => Command::new("python3"),
        Some(d) => d.ssock_run("python3"),
    };
    cmd.arg(script())
        .args(cases)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // The script bounds its own waits; a hang is caught by the test harness.
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "semantics.py failed ({}):\n{text}",
        out.status
    );
    Ok(text)
}

/// Whether the script runs case `name` when given `cases` (all but those
/// named with a leading `-` when no other is named).
fn runs(cases: &[&str], name: &str) -> bool {
    let named: Vec<&&str> = cases.iter().filter(|c| !c.starts_with('-')).collect();
    if named.is_empty() {
        !cases.iter().any(|c| c.strip_prefix('-') == Some(name))
    } else {
        named.iter().any(|c| **c == name)
    }
}

fn differential(env: &[(&str, &str)]) -> Result<()> {
    differential_in(env, &[], &[], "direct")
}

/// The differential test on `cases` with devd started with `args`: every
/// connection devd counts must be of `mode`.
fn differential_in(env: &[(&str, &str)], args: &[&str], cases: &[&str], mode: &str) -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let plain = run(None, env, cases)?;
    let d = Devd::start(args)?;
    let accelerated = run(Some(&d), env, cases)?;
    let n = ssock_tests::same_semantics(&plain, &accelerated)?;
    // The plain acceptor (exec'd without the preload) serves its
    // connection without taking its end: its connector finds out at the
    // first answer and counts it on kernel TCP, `unclaimed` (posted: it
    // may reach devd a moment after the script ends).
    let plain_acceptors = u64::from(runs(cases, "case_plain_acceptor_by_exec"));
    let t0 = std::time::Instant::now();
    let t = loop {
        let t = d.stats()?["totals"].clone();
        if t["fallbacks"]["unclaimed"].as_u64() >= Some(plain_acceptors)
            || t0.elapsed() > std::time::Duration::from_secs(5)
        {
            break t;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    ensure!(
        t["connections"][mode] == n,
        "{n} connections expected {mode}: {t}"
    );
    // The refused connect never asked devd: its listener board lists no
    // listener there (nothing counted, no connection came to exist).
    ensure!(
        t["connections"]["kernel"] == plain_acceptors
            && t["fallbacks"]["unclaimed"] == plain_acceptors
            && t["fallbacks"]["peer_not_enabled"] == 0,
        "totals {t}"
    );
    ensure!(t["violations"] == 0, "totals {t}");
    Ok(())
}

#[test]
fn kernel_and_ssock_observe_the_same_socket_semantics() -> Result<()> {
    differential(&[])
}

#[test]
fn the_same_semantics_hold_when_every_wait_sleeps() -> Result<()> {
    differential(&[("SSOCK_SPIN_US", "0")])
}

/// Every case with Queued connections, where devd's engine moves the
/// bytes and relays each side's offset, and every process that holds an
/// end (a forked child, an exec'd program, one it was passed to) drives
/// the same queues. Not `case_epoll_waits_sleep`: its first wait, right
/// after a send, finds the bytes readable on loopback TCP (the kernel
/// delivers within the send) and not yet when devd's engine carries them
/// (as between two hosts).
#[test]
fn queued_connections_keep_the_same_semantics() -> Result<()> {
    let cases = ["-case_epoll_waits_sleep"];
    differential_in(&[], &["--default-mode", "queued"], &cases, "queued")?;
    differential_in(
        &[("SSOCK_SPIN_US", "0")],
        &["--default-mode", "queued"],
        &cases,
        "queued",
    )
}

/// Queued regions so small that a peer's last 40 KB (the script's
/// `case_reset_after_the_end_of_stream`) do not all fit in the reader's
/// RX buffers: its reset after its end of stream comes while some still
/// wait in devd's engine. A send then takes EPIPE, as the kernel's, and
/// the reads still get every byte, then the end (a read after the send
/// had taken the reset used to end the stream at what the region held).
/// (Not yet here: `case_send_after_a_reset_then_read` and
/// `case_reset_read_by_an_event_loop`, a reset with no end of stream
/// before it, whose reads still lose bytes now and then in such regions:
/// a race not found yet.)
#[test]
fn a_reset_leaves_every_byte_still_in_the_engine_to_read() -> Result<()> {
    let size = 81920;
    let l = ssock_rings::layout::QueuedLayout::for_size(size)?;
    ensure!(
        usize::from(l.qsize) * l.slot < 40 * 1024,
        "{size}-byte regions hold the script's 40 KB: nothing would wait in the engine"
    );
    differential_in(
        &[],
        &[
            "--default-mode",
            "queued",
            "--region-size",
            &size.to_string(),
        ],
        &["case_reset_after_the_end_of_stream"],
        "queued",
    )
}

/// tests/apps/NAME.c built into devd's directory, which goes when the
/// test ends.
fn built(d: &Devd, name: &str) -> Result<PathBuf> {
    let exe = d.socket.with_file_name(name);
    let src = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/apps")).join(format!("{name}.c"));
    let st = Command::new("gcc")
        .args(["-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()?;
    ensure!(st.success(), "gcc failed on {name}.c");
    Ok(exe)
}

#[test]
fn sa_restart_restarts_an_interrupted_recv_as_the_kernel_does() -> Result<()> {
    // A C program (Python retries EINTR itself, hiding the difference): a
    // blocking recv hit by SIGALRM is restarted when the handler has
    // SA_RESTART and fails with EINTR when it has not.
    if !have_app("gcc")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let exe = built(&d, "sarestart")?;
    let go = |d: Option<&Devd>| -> Result<String> {
        let mut cmd = match d {
            None => Command::new(&exe),
            Some(d) => d.ssock_run(&exe),
        };
        let out = cmd.stdin(Stdio::null()).output()?;
        ensure!(out.status.success(), "sarestart failed");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let plain = go(None)?;
    ensure!(
        plain == "SA_RESTART=1: recv=1 \nSA_RESTART=0: recv=-1 EINTR\n",
        "kernel: {plain}"
    );
    let accelerated = go(Some(&d))?;
    ensure!(
        plain == accelerated,
        "kernel:\n{plain}\nssock:\n{accelerated}"
    );
    let t = d.stats()?["totals"].clone();
    ensure!(t["connections"]["direct"] == 2, "totals {t}");
    Ok(())
}

/// tests/apps/remote.py with `args`, under ssock-run with `d`'s devd.
fn remote(d: &Devd, args: &[&str]) -> Command {
    let mut cmd = d.ssock_run("python3");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/apps/remote.py"))
        .args(args);
    cmd
}

/// remote.py's greet server, accepting once its flag file exists, and a
/// client that hands its socket to a new program (a plain one, its
/// environment cleared, if `plain`) right after its connect; the server
/// accepts once the new program is up. Both must end well; devd's totals.
fn handed_before_accept(d: &Devd, plain: bool) -> Result<serde_json::Value> {
    let flag = d.socket.with_file_name("accept-flag");
    let flag_arg = flag.to_str().context("flag path")?;
    let mut server = Peer::command(remote(d, &["greet", "0", flag_arg]))?;
    let (port, _) = server.expect_port()?;
    let mut args = vec!["handoff", "127.0.0.1", &port];
    if plain {
        args.push("plain");
    }
    let mut client = Peer::command(remote(d, &args))?;
    // The new program is up (under ssock, its shim asked devd at load,
    // before its first line); then the server accepts.
    client.expect("HANDED UP")?;
    std::fs::write(&flag, b"")?;
    client.expect("HANDED OK")?;
    server.expect("GREETED")?;
    ensure!(client.wait_success()? && server.wait_success()?);
    Ok(d.stats()?["totals"].clone())
}

/// A socket handed to a new program (an inherited fd) right after its
/// connect, before the server accepted: devd cannot tell the new program
/// what the connection will be, and the new program takes it for a plain
/// socket. Its "hello" went on TCP while the server's "ping" went into the
/// region, where nobody read it (a hang). devd now keeps such a connection
/// on kernel TCP, all of it, and counts it (connector_gone).
#[test]
fn a_socket_handed_to_a_new_program_before_its_acceptor_claimed_it_stays_on_kernel_tcp(
) -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let t = handed_before_accept(&d, false)?;
    ensure!(
        t["fallbacks"]["connector_gone"] == 1
            && t["connections"]["kernel"] == 1
            && t["connections"]["direct"] == 0,
        "the connection should have stayed on kernel TCP, counted: {t}"
    );
    Ok(())
}

/// A connected socket handed to a plain program (its environment cleared:
/// no ssock there) before its acceptor claimed it. The new program reads
/// and writes the kernel socket only; its connector's shim, in the forked
/// child before the exec, pins both directions there, so the server's
/// answer, which would have gone into the region where nobody reads it,
/// goes on TCP.
#[test]
fn a_socket_handed_to_a_plain_program_before_its_acceptor_claimed_it_keeps_every_byte() -> Result<()>
{
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let t = handed_before_accept(&d, true)?;
    ensure!(
        t["connections"]["direct"] == 1,
        "the connection should have been paired (then kept on TCP by its ends): {t}"
    );
    Ok(())
}

/// A Direct connection whose bytes moved to the region, handed to a plain
/// program (exec in place, or a spawned child with its environment
/// cleared) while the server's "hello" waits unread in the region: the
/// client's shim closes the region before the exec, at what it read and
/// wrote; the server's shim sends "hello" again on the kernel socket and
/// reads the plain program's "ping" there. Both logs say so.
#[test]
fn a_direct_connection_handed_to_a_plain_program_moves_back_to_the_kernel_socket() -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    for (i, how) in ["exec", "spawn"].into_iter().enumerate() {
        let slog = d.socket.with_file_name(format!("server-{how}.log"));
        let clog = d.socket.with_file_name(format!("client-{how}.log"));
        let mut cmd = remote(&d, &["moving", "0"]);
        cmd.env("SSOCK_LOG", &slog);
        let mut server = Peer::command(cmd)?;
        let (port, _) = server.expect_port()?;
        let mut cmd = remote(&d, &["moved", "127.0.0.1", &port, how]);
        cmd.env("SSOCK_LOG", &clog);
        let mut client = Peer::command(cmd)?;
        client.expect("HANDED OK")?;
        server.expect("SERVED OK")?;
        ensure!(client.wait_success()? && server.wait_success()?);
        let t = d.stats()?["totals"].clone();
        ensure!(
            t["connections"]["direct"] == i + 1 && t["connections"]["kernel"] == 0,
            "{how}: the connection should have been Direct: {t}"
        );
        let s = std::fs::read_to_string(&slog)?;
        let c = std::fs::read_to_string(&clog)?;
        ensure!(
            s.lines().any(
                |l| l.contains("writes back on the kernel socket at region offset")
                    && l.ends_with("(5 bytes again)")
            ),
            "{how}: the server should have sent \"hello\" again on the kernel socket:\n{s}"
        );
        ensure!(
            c.contains("survives an exec of a program without ssock: it left the region"),
            "{how}: the client should have left the region before the exec:\n{c}"
        );
    }
    Ok(())
}

/// As above, but the server closed right after its "hello", before the
/// client handed the socket on: those bytes are only in the region, and
/// nobody can send them again. The plain program gets a reset (the
/// client's shim aborts the connection before the exec), never a stream
/// that ends cleanly without them. (Kernel TCP would have delivered them:
/// a limit of docs/protocol.md 2.6.)
#[test]
fn a_plain_program_gets_a_reset_not_a_short_stream_when_its_peer_left_bytes_only_in_the_region(
) -> Result<()> {
    if !have_app("python3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let clog = d.socket.with_file_name("client.log");
    let flag = d.socket.with_file_name("closed-flag");
    let mut server = Peer::command(remote(&d, &["moving", "0", "close"]))?;
    let (port, _) = server.expect_port()?;
    let flag_arg = flag.to_str().context("flag path")?;
    let mut cmd = remote(&d, &["moved", "127.0.0.1", &port, "exec", flag_arg]);
    cmd.env("SSOCK_LOG", &clog);
    let mut client = Peer::command(cmd)?;
    server.expect("SERVED CLOSED")?;
    // The client hands the socket on only once the server closed.
    std::fs::write(&flag, b"")?;
    client.expect("HANDED RESET")?;
    ensure!(client.wait_success()? && server.wait_success()?);
    let t = d.stats()?["totals"].clone();
    ensure!(
        t["connections"]["direct"] == 1,
        "the connection should have been Direct: {t}"
    );
    let c = std::fs::read_to_string(&clog)?;
    ensure!(
        c.contains("reset before an exec: its peer left with bytes only the region had"),
        "the client should have reset the connection before the exec:\n{c}"
    );
    Ok(())
}

/// A C server that serves a connection through stdio, whose FILE streams
/// read and write the socket through the C library's internal calls, which
/// no preloaded library sees (tests/apps/stdio.c): the socket on fds 0 and
/// 1 of a forked child (dup2), of a child exec'ing a program (exec) or
/// spawned with the socket put there by posix_spawn's own file actions
/// (spawn, found at the new program's load), and fdopen on the accepted
/// socket. The client's "hello" waits in the region when the server turns
/// to stdio: its connection leaves the region first, the client sends
/// "hello" again on the kernel socket, and stdio reads it there. Before,
/// stdio waited on the kernel socket for bytes that were in the region.
#[test]
fn a_socket_that_stdio_may_reach_leaves_the_region_first() -> Result<()> {
    if !have_app("gcc")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let exe = built(&d, "stdio")?;
    for (i, mode) in ["dup2", "exec", "spawn", "fdopen"].into_iter().enumerate() {
        let slog = d.socket.with_file_name(format!("server-{mode}.log"));
        let clog = d.socket.with_file_name(format!("client-{mode}.log"));
        let mut cmd = d.ssock_run(&exe);
        cmd.args(["serve", mode]).env("SSOCK_LOG", &slog);
        let mut server = Peer::command(cmd)?;
        let (port, _) = server.expect_port()?;
        let mut cmd = d.ssock_run(&exe);
        cmd.args(["client", &port]).env("SSOCK_LOG", &clog);
        let mut client = Peer::command(cmd)?;
        client.expect("CLIENT OK").context(mode)?;
        server.expect("SERVED OK").context(mode)?;
        ensure!(client.wait_success()? && server.wait_success()?);
        let t = d.stats()?["totals"].clone();
        ensure!(
            t["connections"]["direct"] == i + 1 && t["fallbacks"]["stdio"] == i + 1,
            "{mode}: the connection should have been Direct, then left for stdio: {t}"
        );
        let s = std::fs::read_to_string(&slog)?;
        let c = std::fs::read_to_string(&clog)?;
        ensure!(
            s.contains(
                "which stdio reads and writes behind the shim: on its kernel socket from here"
            ),
            "{mode}: the server's end should have left the region:\n{s}"
        );
        ensure!(
            c.lines().any(
                |l| l.contains("writes back on the kernel socket at region offset")
                    && l.ends_with("(6 bytes again)")
            ),
            "{mode}: the client should have sent \"hello\" again on the kernel socket:\n{c}"
        );
    }
    Ok(())
}
