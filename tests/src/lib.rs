//! Integration-test support: start real `devd` processes and real client
//! processes (`ssock-testpeer`), read devd's statistics, and generate and
//! verify byte patterns. Every process started here is killed and every
//! file removed when its guard drops, also when a test fails.

use anyhow::{bail, Context, Result};
use ssock_client::Session;
use ssock_rings::codec::{Request, Response};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod pattern;

/// Path of a workspace binary, built (once per test process) with the same
/// profile as the tests, so a test never runs a stale devd.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test exe path");
        // target/<profile>/deps/<test> -> target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--bins",
            "-p",
            "ssock-devd",
            "-p",
            "ssock-tools",
            "-p",
            "ssock-tests",
        ]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build for the binaries");
        assert!(st.success(), "building the workspace binaries failed");
        dir
    });
    let p = dir.join(name);
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// A private devd process in its own temporary directory.
pub struct Devd {
    child: Child,
    dir: PathBuf,
    /// Its control socket.
    pub socket: PathBuf,
}

impl Devd {
    /// Starts `devd --user` with its socket in a fresh directory, plus `args`.
    pub fn start(args: &[&str]) -> Result<Devd> {
        let dir = std::env::temp_dir().join(format!(
            "ssock-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("devd.sock");
        let child = Command::new(bin("devd"))
            .arg("--user")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .context("spawn devd")?;
        let d = Devd { child, dir, socket };
        let t = Instant::now();
        while Session::connect(&d.socket).is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("devd did not come up at {}", d.socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(d)
    }

    /// devd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether devd is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// devd's resident memory in KiB (VmRSS).
    pub fn rss_kib(&self) -> Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let line = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS")?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("VmRSS value")?
            .parse()?)
    }

    /// All statistics pages merged: {devd, totals, connections: [...]}.
    pub fn stats(&self) -> Result<serde_json::Value> {
        stats(&self.socket)
    }

    /// Starts a test peer talking to this devd.
    pub fn peer(&self, args: &[&str]) -> Result<Peer> {
        Peer::spawn(
            args,
            &[(
                "SSOCK_DEVD_SOCKET",
                self.socket.to_str().context("utf8 path")?,
            )],
        )
    }

    /// Runs `ringstat` against this devd and returns its stdout.
    pub fn ringstat(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(bin("ringstat"))
            .args(args)
            .env("SSOCK_DEVD_SOCKET", &self.socket)
            .output()?;
        if !out.status.success() {
            bail!(
                "ringstat {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Drop for Devd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Merged statistics from the devd at `socket`.
pub fn stats(socket: &Path) -> Result<serde_json::Value> {
    let s = Session::connect(socket)?;
    let mut after = 0;
    let mut conns = Vec::new();
    loop {
        let (resp, _) = s.request(&Request::Stats { after, limit: 256 }, &[])?;
        let Response::Stats { json, more } = resp else {
            bail!("unexpected stats reply")
        };
        let mut v: serde_json::Value = serde_json::from_str(&json)?;
        let page = v["connections"].as_array().cloned().unwrap_or_default();
        if let Some(last) = page.last() {
            after = last["id"].as_u64().context("id")?;
        }
        conns.extend(page);
        if !more {
            v["connections"] = serde_json::Value::Array(conns);
            return Ok(v);
        }
    }
}

/// A running `ssock-testpeer` process with line-oriented stdout.
pub struct Peer {
    child: Child,
    out: BufReader<ChildStdout>,
    stdin: Option<ChildStdin>,
}

impl Peer {
    /// Spawns `ssock-testpeer ARGS` with extra environment.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Result<Peer> {
        let mut cmd = Command::new(bin("ssock-testpeer"));
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("spawn ssock-testpeer")?;
        let out = BufReader::new(child.stdout.take().context("stdout")?);
        let stdin = child.stdin.take();
        Ok(Peer { child, out, stdin })
    }

    /// Next stdout line (trimmed); errors at EOF.
    pub fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        if self.out.read_line(&mut l)? == 0 {
            let st = self.child.wait()?;
            bail!("peer exited ({st}) without the expected output");
        }
        Ok(l.trim().to_string())
    }

    /// Reads lines until one starts with `prefix`; returns it.
    pub fn expect(&mut self, prefix: &str) -> Result<String> {
        loop {
            let l = self.line()?;
            if l.starts_with(prefix) {
                return Ok(l);
            }
        }
    }

    /// Writes a line to the peer's stdin.
    pub fn say(&mut self, s: &str) -> Result<()> {
        let w = self.stdin.as_mut().context("stdin closed")?;
        writeln!(w, "{s}")?;
        w.flush()?;
        Ok(())
    }

    /// Closes stdin (peers that hold connections then close them and exit).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for exit; true on success.
    pub fn wait_success(&mut self) -> Result<bool> {
        self.stdin = None;
        Ok(self.child.wait()?.success())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}
