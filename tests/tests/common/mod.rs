//! What the two-host lab's tests share: programs whose output is read as
//! it comes, the lab's statistics, and tests/apps/remote.py's servers.
//! (Each test file includes it; not every file uses every item.)
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use ssock_tests::lab::{self, TwoHosts};
use std::io::BufRead;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const UP: Duration = Duration::from_secs(15);

pub fn remote_py() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/apps/remote.py").to_string()
}

/// A program whose output lines are read as they come.
pub struct Prog {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Prog {
    pub fn start(mut c: std::process::Command) -> Result<Prog> {
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (tx, lines) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().context("stdout")?) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().context("stderr")?),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Prog {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits up to `within` for a line that starts with one of `want`.
    pub fn expect(&mut self, want: &[&str], within: Duration) -> Result<String> {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if want.iter().any(|w| l.starts_with(w)) {
                        return Ok(l);
                    }
                }
                Err(_) => bail!(
                    "no line starting with {want:?} within {within:?}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits up to `within` for the program to end; its exit status.
    pub fn wait(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let end = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > end {
                bail!(
                    "still running after {within:?}; it printed:\n{}",
                    self.all()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything it printed so far.
    pub fn all(&mut self) -> String {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.seen.join("\n")
    }
}

impl Drop for Prog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Host `h`'s `totals` section.
pub fn totals(lab: &TwoHosts, h: usize) -> Result<serde_json::Value> {
    Ok(lab.stats(h)?["totals"].clone())
}

/// Host `h`'s totals once `done` holds of them, or after 5 s as they are.
pub fn settled(
    lab: &TwoHosts,
    h: usize,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let t = Instant::now();
    loop {
        let v = totals(lab, h)?;
        if done(&v) || t.elapsed() > Duration::from_secs(5) {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn remote_count(t: &serde_json::Value) -> u64 {
    t["remote"]["connections"].as_u64().unwrap_or(0)
}

pub fn queued_bytes(t: &serde_json::Value) -> u64 {
    t["bytes"]["queued"].as_u64().unwrap_or(0)
}

/// Waits (up to `within`) until host `h`'s engine has moved more than
/// `at_least` bytes in all; `what` names them in the failure.
pub fn queued_past(
    lab: &TwoHosts,
    h: usize,
    at_least: u64,
    within: Duration,
    what: &str,
) -> Result<()> {
    let t = Instant::now();
    while queued_bytes(&totals(lab, h)?) < at_least {
        anyhow::ensure!(t.elapsed() < within, "host {h}: {what}: {}", lab.stats(h)?);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn ready(name: &str) -> Result<Option<TwoHosts>> {
    ready_with(name, &[])
}

/// `ready`, with `env` for the lab's script (`SSOCK_LAB_*`).
pub fn ready_with(name: &str, env: &[(&str, &str)]) -> Result<Option<TwoHosts>> {
    if !lab::available()? || !ssock_tests::have_app("python3")? {
        return Ok(None);
    }
    let lab = TwoHosts::up_with(name, env)?;
    lab.wait_linked(UP)?;
    Ok(Some(lab))
}

/// An echo server on host `srv`, under ssock-run or not, listening.
pub fn echo_server(lab: &TwoHosts, srv: usize, port: u16, ssock: bool) -> Result<Prog> {
    echo_server_logged(lab, srv, port, ssock, None)
}

/// `echo_server`, the shim's decisions logged to `log` (`SSOCK_LOG`).
pub fn echo_server_logged(
    lab: &TwoHosts,
    srv: usize,
    port: u16,
    ssock: bool,
    log: Option<&std::path::Path>,
) -> Result<Prog> {
    let py = remote_py();
    let port = port.to_string();
    let args = ["python3", py.as_str(), "serve", port.as_str()];
    let mut c = if ssock {
        lab.under_ssock(srv, &args)
    } else {
        lab.plain(srv, &args)
    };
    if let Some(l) = log {
        c.env("SSOCK_LOG", l);
    }
    let mut p = Prog::start(c)?;
    p.expect(&["LISTENING"], Duration::from_secs(10))?;
    if ssock {
        heard(lab, 1 - srv, port.parse()?)?;
    }
    Ok(p)
}

/// Waits until host `h`'s devd heard its peer advertise a listener on
/// every address (IPv4 or IPv6) at `port` (within 200 ms of its
/// registration).
pub fn heard(lab: &TwoHosts, h: usize, port: u16) -> Result<()> {
    let want = [format!("0.0.0.0:{port}"), format!("[::]:{port}")];
    lab.wait_peer(h, UP, "heard of the listener", |p| {
        p["listeners"]
            .as_array()
            .is_some_and(|l| l.iter().any(|a| want.iter().any(|w| a == w.as_str())))
    })?;
    Ok(())
}

/// redis-server on host `h` under ssock-run, on every address at `port`,
/// nothing saved.
pub fn redis_server(lab: &TwoHosts, h: usize, port: &str) -> Result<Prog> {
    Prog::start(lab.under_ssock(
        h,
        &[
            "redis-server",
            "--port",
            port,
            "--bind",
            "0.0.0.0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
    ))
}

/// Where each thread of every running tests/apps/remote.py process waits
/// (its state, kernel wait channel and system call), for a failure
/// message: a stall shows which side waits for what.
pub fn remote_py_threads() -> String {
    let mut out = String::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains("remote.py") {
            continue;
        }
        out += &format!("pid {}: {cmd}\n", p.file_name().to_string_lossy());
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
            let stat = read("stat");
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("?")
                .to_string();
            let call: Vec<String> = read("syscall")
                .split_whitespace()
                .take(3)
                .map(str::to_string)
                .collect();
            out += &format!(
                "  thread {} {state} wchan {} syscall {}\n",
                t.file_name().to_string_lossy(),
                read("wchan"),
                call.join(" ")
            );
        }
    }
    out
}

/// An echo server on host b (on `port`, under ssock-run, heard of on
/// host a) and `n` clients on host a streaming to it (64 KiB a
/// millisecond each way, every byte of the echo checked) until the flag
/// file (returned) exists.
pub fn steady_streams(lab: &TwoHosts, port: u16, n: usize) -> Result<(Prog, Vec<Prog>, String)> {
    let py = remote_py();
    let server = echo_server(lab, 1, port, true)?;
    heard(lab, 0, port)?;
    let flag = lab
        .dir
        .join(format!("flag{port}"))
        .to_string_lossy()
        .into_owned();
    let (b, port) = (lab.addr[1].clone(), port.to_string());
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(Prog::start(
            lab.under_ssock(0, &["python3", &py, "steady", &b, &port, &flag]),
        )?);
    }
    Ok((server, clients, flag))
}

/// Sets the flag: each stream ends whole ("OK N") and the server echoed
/// exactly what each sent (its lines come in either order).
pub fn ended_whole(server: &mut Prog, clients: &mut [Prog], flag: &str) -> Result<()> {
    std::fs::write(flag, b"")?;
    let mut sent = Vec::new();
    for c in clients.iter_mut() {
        let line = c.expect(&["OK ", "CORRUPT", "SHORT"], Duration::from_secs(60))?;
        anyhow::ensure!(line.starts_with("OK "), "{line}\n{}", c.all());
        sent.push(format!("ECHOED {}", line["OK ".len()..].trim()));
    }
    let mut echoed = Vec::new();
    for _ in 0..clients.len() {
        let line = server.expect(&["ECHOED ", "RESET "], Duration::from_secs(10))?;
        echoed.push(line.trim().to_string());
    }
    sent.sort();
    echoed.sort();
    anyhow::ensure!(
        sent == echoed,
        "the clients had {sent:?}, the server said {echoed:?}"
    );
    Ok(())
}
