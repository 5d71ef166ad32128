//! Integration-test support: start real `devd` processes and real client
//! processes (`ssock-testpeer`), read devd's statistics, and generate and
//! verify byte patterns. Every process started here is killed and every
//! file removed when its guard drops, also when a test fails.

#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use ssock_client::Session;
use std::io::{BufRead, BufReader, Write};

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use ssock_tools::pattern;

pub mod lab;

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
        cmd.args(["build", "--quiet", "--bins", "--lib"]);
        for p in [
            "ssock-devd",
            "ssock-tools",
            "ssock-tests",
            "ssock-client",
            "ssock-preload",
        ] {
            cmd.args(["-p", p]);
        }
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
        Devd::start_at(&Devd::fresh_dir()?.join("devd.sock"), args)
    }

    /// `start` for a test that stops devd (SIGSTOP): devd gets a process
    /// group of its own. In the test's group it could be hung up: when that
    /// group is orphaned (the test run's parent exited, as under `nohup
    /// ... &`), the kernel sends SIGHUP and SIGCONT to the whole group as
    /// soon as any member exits while one is stopped, and devd shuts down
    /// on SIGHUP, every other test's devd with it.
    pub fn start_stoppable(args: &[&str]) -> Result<Devd> {
        use std::os::unix::process::CommandExt;
        let dir = Devd::fresh_dir()?;
        let mut cmd = Command::new(bin("devd"));
        cmd.process_group(0);
        Devd::launch(cmd, &dir.join("devd.sock"), args)
    }

    /// A new, empty directory for a devd's socket.
    fn fresh_dir() -> Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!(
            "ssock-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Starts `devd --user` on `socket` (its directory is removed on drop).
    pub fn start_at(socket: &Path, args: &[&str]) -> Result<Devd> {
        // SSOCK_TEST_DEVD_PREFIX runs devd under a tool, e.g. "strace -f -o FILE".
        let prefix: Vec<String> = std::env::var("SSOCK_TEST_DEVD_PREFIX")
            .map(|p| p.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let cmd = match prefix.split_first() {
            Some((tool, targs)) => {
                let mut c = Command::new(tool);
                c.args(targs).arg(bin("devd"));
                c
            }
            None => Command::new(bin("devd")),
        };
        Devd::launch(cmd, socket, args)
    }

    /// Starts the devd binary at `devd` (an installed one), as `start_at`
    /// does the workspace's.
    pub fn start_binary(devd: &Path, socket: &Path, args: &[&str]) -> Result<Devd> {
        Devd::launch(Command::new(devd), socket, args)
    }

    /// `cmd --user --short-lived-ms 0 [SSOCK_TEST_DEVD_ARGS] --socket SOCKET
    /// ARGS`, once it answers. The `short_lived` policy is off unless a
    /// test turns it on (ARGS come later and win): most tests prove the
    /// accelerated path, and make short connections to do so.
    fn launch(mut cmd: Command, socket: &Path, args: &[&str]) -> Result<Devd> {
        let dir = socket.parent().context("socket dir")?.to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let socket = socket.to_path_buf();
        let child = cmd
            .arg("--user")
            .args(["--short-lived-ms", "0"])
            .args(
                std::env::var("SSOCK_TEST_DEVD_ARGS")
                    .map(|a| a.split_whitespace().map(String::from).collect::<Vec<_>>())
                    .unwrap_or_default(),
            )
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

    /// SIGKILL: devd dies without cleaning up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

    /// Waits until devd holds no live connection (the programs' last
    /// closes, or sock_diag's look-ups, reach it asynchronously), failing
    /// after `within`; returns how long it took.
    pub fn wait_none_live(&self, within: Duration) -> Result<Duration> {
        let t = Instant::now();
        loop {
            let v = self.stats()?;
            if v["devd"]["live_connections"] == 0 {
                return Ok(t.elapsed());
            }
            anyhow::ensure!(
                t.elapsed() < within,
                "connections still live in devd after {within:?}: {}",
                v["devd"]
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a test peer talking to this devd.
    pub fn peer(&self, args: &[&str]) -> Result<Peer> {
        self.peer_env(args, &[])
    }

    /// Starts a test peer talking to this devd, with extra environment.
    pub fn peer_env(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Peer> {
        let mut e = vec![(
            "SSOCK_DEVD_SOCKET",
            self.socket.to_str().context("utf8 path")?,
        )];
        e.extend_from_slice(env);
        Peer::spawn(args, &e)
    }

    /// `ssock-run --devd <this devd's socket> -- PROGRAM`: add the
    /// program's arguments to it.
    pub fn ssock_run(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(bin("ssock-run"));
        c.arg("--devd").arg(&self.socket).arg("--").arg(program);
        c
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
        // SIGTERM first: devd (or a tool wrapping it) shuts down cleanly;
        // SIGKILL if it has not after two seconds.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let t = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Merged statistics from the devd at `socket`.
pub fn stats(socket: &Path) -> Result<serde_json::Value> {
    ssock_tools::fetch_stats(&*Session::connect(socket)?)
}

/// How long a test waits for any one line from a peer before failing.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `ssock-testpeer` process with line-oriented stdout.
pub struct Peer {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stdin: Option<ChildStdin>,
}

impl Peer {
    /// Spawns `ssock-testpeer ARGS` with extra environment.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Result<Peer> {
        let mut cmd = Command::new(bin("ssock-testpeer"));
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Peer::command(cmd)
    }

    /// Spawns any program, with stdin and stdout piped.
    pub fn command(mut cmd: Command) -> Result<Peer> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let out: ChildStdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l.trim().to_string()).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Peer {
            child,
            lines,
            stdin,
        })
    }

    /// Next stdout line; fails if the peer exits or stays silent for `LINE_TIMEOUT`.
    pub fn line(&mut self) -> Result<String> {
        self.line_within(LINE_TIMEOUT)
    }

    /// Next stdout line within `t`.
    pub fn line_within(&mut self, t: Duration) -> Result<String> {
        match self.lines.recv_timeout(t) {
            Ok(l) => Ok(l),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                bail!("peer {} silent for {t:?}", self.pid())
            }
            Err(_) => {
                let st = self.child.wait()?;
                bail!("peer exited ({st}) without the expected output")
            }
        }
    }

    /// Reads lines until one starts with `prefix`; returns it. A line
    /// starting with "ERR" fails at once.
    pub fn expect(&mut self, prefix: &str) -> Result<String> {
        // What came before it, for the error (the last few lines).
        let mut skipped: std::collections::VecDeque<String> = Default::default();
        loop {
            let l = self
                .line()
                .with_context(|| format!("waiting for {prefix:?} after {skipped:?}"))?;
            if l.starts_with(prefix) {
                return Ok(l);
            }
            if l.starts_with("ERR") {
                bail!("peer failed: {l}");
            }
            if skipped.len() == 8 {
                skipped.pop_front();
            }
            skipped.push_back(l);
        }
    }

    /// A serving peer's "PORT N ..." line: the port, and the whole line.
    pub fn expect_port(&mut self) -> Result<(String, String)> {
        let l = self.expect("PORT")?;
        let port = l.split_whitespace().nth(1).context("port")?.to_string();
        Ok((port, l))
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

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Closes stdin and waits for exit; true on success.
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

/// A port on 127.0.0.1 for a server a test starts, free when asked. Below
/// the kernel's ephemeral range (`ip_local_port_range`), so that no
/// connection a test running beside this one makes takes it as its own
/// source port before the server binds it (a port the kernel handed out
/// for `bind(0)` and freed again can be: "Address already in use"). Falls
/// back to `bind(0)` when the range leaves no room below it.
pub fn free_port() -> Result<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const FIRST: u32 = 10_000;
    if low > FIRST + 1_000 {
        // A start that differs between test processes (pid and clock),
        // then port after port.
        let seed = std::process::id().wrapping_mul(7919)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        let span = low - FIRST;
        for _ in 0..span.min(2_000) {
            let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let port = FIRST + seed.wrapping_add(k.wrapping_mul(131)) % span;
            let port = u16::try_from(port).context("port")?;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU time (user + system) a process has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" that closes the command name: state is field 3,
    // utime field 14, stime field 15.
    let rest = s.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

/// Whether a program needed by a test is installed. Missing: the test says
/// SKIP and passes, unless `SSOCK_REQUIRE_APPS=1` (CI), where it fails.
pub fn have_app(name: &str) -> Result<bool> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
    if found {
        return Ok(true);
    }
    if std::env::var_os("SSOCK_REQUIRE_APPS").is_some_and(|v| v == "1") {
        bail!("{name} is required (SSOCK_REQUIRE_APPS=1) but not installed");
    }
    eprintln!("SKIP: {name} is not installed");
    Ok(false)
}

/// The differential semantics test's verdict: `plain` (kernel TCP) and
/// `accelerated` (under ssock-run) outputs of tests/apps/semantics.py must
/// be identical; the connection count its last line gives.
pub fn same_semantics(plain: &str, accelerated: &str) -> anyhow::Result<u64> {
    if plain != accelerated {
        let diff: Vec<String> = plain
            .lines()
            .zip(accelerated.lines())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("kernel: {a}\nssock:  {b}"))
            .collect();
        anyhow::bail!(
            "outputs differ:\n{}\n--- kernel:\n{plain}\n--- under ssock-run:\n{accelerated}",
            diff.join("\n")
        );
    }
    Ok(plain
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("connections "))
        .ok_or_else(|| anyhow::anyhow!("no connection count"))?
        .parse()?)
}
