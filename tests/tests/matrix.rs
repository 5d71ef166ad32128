//! The public program matrix (issue 10, item 10): real Debian programs,
//! unmodified, server and clients under `ssock-run`, each started as its
//! package starts it where that matters (daemonizing, workers under another
//! user, privilege drops, chroot). Each test checks the program's own success
//! output, a checksum wherever a payload moves, and devd's statistics: every
//! connection Direct (no fallback of any reason, no connection on kernel
//! TCP, and the shims' logs say `accept: Direct` at least once per client
//! connection), the payload's bytes carried through the rings, and no
//! connection left live in devd once the clients are done (while the
//! server still runs).
//!
//! Servers that drop privileges reach a private devd started as root with
//! `--system` (socket mode 0666 in a 0755 directory, every user admitted),
//! as `ssock-run` starts one for root. Programs started as another user
//! (PostgreSQL through `runuser`) get copies of `ssock-run` and
//! `libssock.so` in the test's own world-readable directory.
//!
//! A test of what does not work yet is `#[ignore]`d with the issue that
//! fixes it; `cargo test -p ssock-tests --test matrix -- --ignored` runs it
//! and shows the symptom, the shims' logs and ringstat's table.

use anyhow::{bail, ensure, Context, Result};
use ssock_tests::{bin, free_port, have_app, Devd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one client program may run before the test fails.
const CLIENT_LIMIT: Duration = Duration::from_secs(45);

/// The payload most tests move: 2 MiB.
const MIB2: u64 = 2 << 20;

/// A file of `tests/apps/matrix`.
fn app(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("apps/matrix")
        .join(name)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// A test that cannot run here: SKIP, or a failure under
/// `SSOCK_REQUIRE_APPS=1` (CI).
fn skip_unless_required(why: &str) -> Result<()> {
    ensure!(
        std::env::var_os("SSOCK_REQUIRE_APPS").is_none_or(|v| v != "1"),
        "{why} (SSOCK_REQUIRE_APPS=1)"
    );
    eprintln!("SKIP: {why}");
    Ok(())
}

/// Whether every program is installed (`have_app`: SKIP or a failure).
fn have_all(names: &[&str]) -> Result<bool> {
    for n in names {
        if !have_app(n)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether the test runs as root (servers that switch users need it).
fn root_or_skip(why: &str) -> Result<bool> {
    if std::fs::metadata("/proc/self")?.uid() == 0 {
        return Ok(true);
    }
    skip_unless_required(&format!("{why}: needs root"))?;
    Ok(false)
}

/// The test's own directory (mode 0755, so that other users reach what the
/// test puts there), removed at the end.
struct Scratch(PathBuf);

static SCRATCH: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Scratch {
    fn new(what: &str) -> Result<Scratch> {
        let n = SCRATCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d =
            std::env::temp_dir().join(format!("ssock-matrix-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
        Ok(Scratch(d))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn dir(&self) -> Result<&str> {
        path_str(&self.0)
    }

    /// A subdirectory with `mode`.
    fn mkdir(&self, name: &str, mode: u32) -> Result<PathBuf> {
        let p = self.path(name);
        std::fs::create_dir_all(&p)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(p)
    }

    /// An empty log file every user may append to.
    fn log(&self, name: &str) -> Result<PathBuf> {
        let p = self.path(name);
        std::fs::write(&p, "")?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666))?;
        Ok(p)
    }

    /// `tests/apps/matrix/NAME` with each (from, to) replaced, written here.
    fn template(&self, name: &str, subst: &[(&str, &str)]) -> Result<PathBuf> {
        let mut text = std::fs::read_to_string(app(name))?;
        for (from, to) in subst {
            text = text.replace(from, to);
        }
        let p = self.path(name);
        std::fs::write(&p, text)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
        Ok(p)
    }

    /// A file of `len` pattern bytes (readable by everyone); its bytes.
    fn payload(&self, name: &str, len: u64, seed: u64) -> Result<(PathBuf, Vec<u8>)> {
        let mut b = vec![0u8; usize::try_from(len)?];
        ssock_tests::pattern::Pattern::new(seed).fill(0, &mut b);
        let p = self.path(name);
        std::fs::write(&p, &b)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
        Ok((p, b))
    }

    /// Copies of ssock-run and libssock.so in a directory every user can
    /// read (the build's target directory may sit under a private home):
    /// the ssock-run to use for programs started as another user.
    fn shared_ssock_run(&self) -> Result<PathBuf> {
        let d = self.mkdir("ssock-bin", 0o755)?;
        for name in ["ssock-run", "libssock.so"] {
            let to = d.join(name);
            std::fs::copy(bin(name), &to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(d.join("ssock-run"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private devd every user can reach: `--system` (socket 0666, every user
/// admitted) on a socket in a 0755 directory of the test's.
fn shared_devd(s: &Scratch) -> Result<Devd> {
    let dir = s.mkdir("devd", 0o755)?;
    Devd::start_at(&dir.join("devd.sock"), &["--system"])
}

/// `ssock-run --devd SOCKET --log LOG -- PROGRAM ARGS`.
fn ssock(d: &Devd, log: &Path, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
    let mut c = Command::new(bin("ssock-run"));
    c.arg("--devd")
        .arg(&d.socket)
        .arg("--log")
        .arg(log)
        .arg("--")
        .arg(program)
        .args(args);
    c
}

/// What a client program printed.
struct Ran {
    stdout: Vec<u8>,
    text: String,
}

/// Runs `cmd` to its end with stdin from `stdin` (or /dev/null), killed
/// after `CLIENT_LIMIT`; fails unless it exits with success. A failure
/// message ends with what `diag` says (taken before a hung program is
/// killed).
fn run_with(
    mut cmd: Command,
    stdin: Option<&Path>,
    diag: Option<&dyn Fn() -> String>,
) -> Result<Ran> {
    use std::io::Read;
    let desc = format!("{cmd:?}");
    let input = match stdin {
        Some(p) => Stdio::from(std::fs::File::open(p)?),
        None => Stdio::null(),
    };
    let mut child = cmd
        .stdin(input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {desc}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let o = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let e = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > CLIENT_LIMIT {
            let why = diag.map(|f| f()).unwrap_or_default();
            let _ = child.kill();
            let _ = child.wait();
            let so = o.join().unwrap_or_default();
            let se = e.join().unwrap_or_default();
            bail!(
                "{desc} still running after {CLIENT_LIMIT:?} (killed); it printed:\n{}{}{why}",
                String::from_utf8_lossy(&so[..so.len().min(4000)]),
                String::from_utf8_lossy(&se)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = o.join().unwrap_or_default();
    let stderr = e.join().unwrap_or_default();
    let mut text = String::from_utf8_lossy(&stdout[..stdout.len().min(64 << 10)]).into_owned();
    text.push_str(&String::from_utf8_lossy(&stderr));
    ensure!(
        status.success(),
        "{desc} failed ({status}):\n{text}{}",
        diag.map(|f| f()).unwrap_or_default()
    );
    Ok(Ran { stdout, text })
}

/// `run_with` without stdin: stdout and stderr as text.
fn run(cmd: Command) -> Result<String> {
    Ok(run_with(cmd, None, None)?.text)
}

/// A client of the test's devd: `run_with`, a failure showing ringstat's
/// table and the shims' logs.
fn run_client(d: &Devd, logs: &[&Path], cmd: Command, stdin: Option<&Path>) -> Result<Ran> {
    run_with(cmd, stdin, Some(&|| diagnosis(d, logs)))
}

/// `run_client` without stdin: stdout and stderr as text.
fn run_in(d: &Devd, logs: &[&Path], cmd: Command) -> Result<String> {
    Ok(run_client(d, logs, cmd, None)?.text)
}

/// The SHA-256 of a file, in hex (coreutils' sha256sum).
fn sha256_file(p: &Path) -> Result<String> {
    let mut c = Command::new("sha256sum");
    c.arg(p);
    let out = run(c)?;
    Ok(out
        .split_whitespace()
        .next()
        .context("sha256sum output")?
        .to_string())
}

// ---------------------------------------------------------------------------
// Processes

/// The state letter of a process ('Z': a zombie), or None if it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// A process as /proc shows it.
#[derive(Debug, Clone, Copy)]
struct Proc {
    pid: u32,
    ppid: u32,
    uid: u32,
    /// Start time (clock ticks after boot): tells a reused pid apart.
    start: u64,
}

/// Process `pid`, if it exists.
fn proc_info(pid: u32) -> Option<Proc> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that closes the command name: state is field 3,
    // ppid 4, starttime 22.
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    Some(Proc {
        pid,
        ppid: f.get(1)?.parse().ok()?,
        uid: std::fs::metadata(format!("/proc/{pid}")).ok()?.uid(),
        start: f.get(19)?.parse().ok()?,
    })
}

/// Every process.
fn processes() -> Vec<Proc> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| proc_info(e.file_name().to_str()?.parse().ok()?))
        .collect()
}

/// Every descendant of `pid`.
fn descendants(pid: u32) -> Vec<Proc> {
    let all = processes();
    let mut found: Vec<Proc> = Vec::new();
    let mut parents = vec![pid];
    while let Some(p) = parents.pop() {
        for c in all.iter().filter(|c| c.ppid == p) {
            found.push(*c);
            parents.push(c.pid);
        }
    }
    found
}

/// Whether `p` still runs (the same process: not a zombie, pid not reused).
fn still_running(p: &Proc) -> bool {
    proc_info(p.pid).is_some_and(|now| now.start == p.start)
        && proc_state(p.pid).is_some_and(|s| s != 'Z')
}

/// The uid and primary gid of a user (from /etc/passwd).
fn ids_of(user: &str) -> Result<(u32, u32)> {
    let pw = std::fs::read_to_string("/etc/passwd")?;
    pw.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() != Some(&user) {
                return None;
            }
            Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
        })
        .with_context(|| format!("no user {user}"))
}

/// The uid of a user.
fn uid_of(user: &str) -> Result<u32> {
    Ok(ids_of(user)?.0)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// A server process, started in the foreground (our child) or as a daemon
/// (found through its pid file). Stopping it signals its main process and
/// waits; what is left of the processes it started is killed.
struct Server {
    name: String,
    child: Option<Child>,
    pid: u32,
    stop_signal: &'static str,
    out: PathBuf,
}

impl Server {
    /// Starts `cmd` in the foreground, stdout and stderr to `out`, in a
    /// process group of its own (apache2's prefork MPM signals its whole
    /// group when it stops).
    fn start(name: &str, mut cmd: Command, out: PathBuf) -> Result<Server> {
        let f = std::fs::File::create(&out)?;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Server {
            name: name.into(),
            pid: child.id(),
            child: Some(child),
            stop_signal: "TERM",
            out,
        })
    }

    /// Runs `cmd`, which starts a daemon and exits; the daemon's pid is in
    /// `pidfile`.
    fn daemon(name: &str, mut cmd: Command, out: PathBuf, pidfile: &Path) -> Result<Server> {
        cmd.process_group(0);
        let said = run(cmd).with_context(|| format!("starting {name}"))?;
        std::fs::write(&out, &said)?;
        let t = Instant::now();
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
                .filter(|p| proc_state(*p).is_some())
            {
                break pid;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(15),
                "{name} wrote no pid file {} (it said: {said})",
                pidfile.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Server {
            name: name.into(),
            child: None,
            pid,
            stop_signal: "TERM",
            out,
        })
    }

    fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => proc_state(self.pid).is_some_and(|s| s != 'Z'),
        }
    }

    /// What it printed.
    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits until something listens on `port` (read from /proc/net/tcp,
    /// so that no probe connection is counted by devd).
    fn wait_listening(&mut self, port: u16) -> Result<()> {
        let hex = format!(":{port:04X}");
        let t = Instant::now();
        loop {
            let tab = std::fs::read_to_string("/proc/net/tcp")?
                + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
            if tab.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&hex) && f[3] == "0A"
            }) {
                return Ok(());
            }
            ensure!(
                self.alive(),
                "{} exited before listening:\n{}",
                self.name,
                self.output()
            );
            ensure!(
                t.elapsed() < Duration::from_secs(30),
                "{} does not listen on {port}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until something listens on `port` (as `wait_listening`) and
    /// devd has a listener registered: the shim registers a listening
    /// socket just after the kernel's listen, and a client that connects
    /// in between is rightly left on kernel TCP.
    fn wait_served(&mut self, port: u16, d: &Devd) -> Result<()> {
        self.wait_listening(port)?;
        let t = Instant::now();
        while d.stats()?["devd"]["listeners"].as_u64() < Some(1) {
            ensure!(
                t.elapsed() < Duration::from_secs(10),
                "{} listens on {port}, but devd has no listener registered:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Waits until the server has `n` child processes running as `user`.
    fn wait_children_as(&mut self, n: usize, user: &str) -> Result<()> {
        let uid = uid_of(user)?;
        let t = Instant::now();
        loop {
            let kids: Vec<Proc> = processes()
                .into_iter()
                .filter(|c| c.ppid == self.pid)
                .collect();
            if kids.iter().filter(|c| c.uid == uid).count() >= n {
                return Ok(());
            }
            ensure!(
                t.elapsed() < Duration::from_secs(20),
                "{} has no {n} children running as {user} (uid {uid}): {kids:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Signals the main process, waits up to 15 s for it, then kills it and
    /// what is left of the processes it had started.
    fn stop(&mut self) -> Result<()> {
        if self.pid == 0 {
            return Ok(());
        }
        let family = descendants(self.pid);
        signal(self.pid, self.stop_signal);
        let t = Instant::now();
        while self.alive() && t.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let stopped = !self.alive();
        if !stopped {
            signal(self.pid, "KILL");
        }
        if let Some(c) = &mut self.child {
            let _ = c.wait();
        }
        // Workers left behind (reparented once the main process is gone).
        let t = Instant::now();
        for p in &family {
            while still_running(p) && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if still_running(p) {
                signal(p.pid, "KILL");
            }
        }
        self.pid = 0;
        ensure!(
            stopped,
            "{} did not stop on SIG{} within 15 s",
            self.name,
            self.stop_signal
        );
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

// ---------------------------------------------------------------------------
// devd's statistics and the shims' logs

/// Lines of the shim logs that contain `needle`.
fn log_lines(logs: &[&Path], needle: &str) -> Vec<String> {
    logs.iter()
        .flat_map(|l| {
            std::fs::read_to_string(l)
                .unwrap_or_default()
                .lines()
                .filter(|x| x.contains(needle))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// ringstat's table and the end of each shim log, for failure messages.
fn diagnosis(d: &Devd, logs: &[&Path]) -> String {
    let mut s = format!(
        "\n--- ringstat\n{}",
        d.ringstat(&[])
            .unwrap_or_else(|e| format!("ringstat failed: {e}"))
    );
    for l in logs {
        let text = std::fs::read_to_string(l).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(12);
        s += &format!(
            "--- {} ({} lines), last {}:\n{}\n",
            l.display(),
            lines.len(),
            lines.len() - from,
            lines[from..].join("\n")
        );
    }
    s
}

/// Checks that devd saw nothing but Direct connections: no fallback of any
/// reason, no connection on kernel TCP, at least `accepts` connections
/// created and at least `accepts` accepts logged as Direct by the shims, and
/// at least `bytes` carried through the rings. Called once no connection is
/// live (`expect_none_live`): devd adds a connection's bytes to its totals
/// when it closes.
fn expect_direct(d: &Devd, logs: &[&Path], accepts: u64, bytes: u64) -> Result<()> {
    expect_direct_with_probes(d, logs, accepts, bytes, 0)
}

/// `expect_direct`, allowing up to `probes` connections that a client
/// closed unused before the server accepted them (wrk connects to the
/// address and closes at once to check it): devd counts each as a kernel
/// connection with the reason `connector_gone`, as it must.
fn expect_direct_with_probes(
    d: &Devd,
    logs: &[&Path],
    accepts: u64,
    bytes: u64,
    probes: u64,
) -> Result<()> {
    let v = d.stats()?;
    let t = &v["totals"];
    let n = |x: &serde_json::Value| x.as_u64().unwrap_or(u64::MAX);
    let direct = n(&t["connections"]["direct"]);
    let kernel = n(&t["connections"]["kernel"]);
    let carried = n(&t["bytes"]["direct"]);
    let gone = n(&t["fallbacks"]["connector_gone"]);
    let fallbacks: Vec<String> = t["fallbacks"]
        .as_object()
        .context("fallbacks")?
        .iter()
        .filter(|(_, c)| c.as_u64() != Some(0))
        .map(|(k, c)| format!("{k} {c}"))
        .collect();
    let logged = u64::try_from(log_lines(logs, "accept: Direct").len())?;
    // An accept of a probe its client closed before the accept (wrk's)
    // says so in the log: those are the `gone` ones, and only those.
    let mut plain = log_lines(logs, "kernel TCP");
    let probe_lines = plain
        .iter()
        .filter(|l| l.contains("accept: kernel TCP (connector_gone)"))
        .count();
    if u64::try_from(probe_lines)? <= gone {
        plain.retain(|l| !l.contains("accept: kernel TCP (connector_gone)"));
    }
    let only_probes = fallbacks.len() == usize::from(gone > 0) && gone <= probes;
    let ok = kernel <= gone
        && only_probes
        && plain.is_empty()
        && direct >= accepts
        && logged >= accepts
        && carried >= bytes;
    ensure!(
        ok,
        "not every connection went Direct: devd has {} listener(s), {} live connection(s); \
         totals: {direct} Direct (expected >= {accepts}), {kernel} on kernel TCP \
         (expected <= {probes} unused probes), {carried} bytes through the rings \
         (expected >= {bytes}); fallbacks: [{}]; 'accept: Direct' in the shim logs: \
         {logged} (expected >= {accepts}); shim log lines saying kernel TCP: {} {:?}{}",
        v["devd"]["listeners"],
        v["devd"]["live_connections"],
        fallbacks.join(", "),
        plain.len(),
        &plain[..plain.len().min(5)],
        diagnosis(d, logs)
    );
    Ok(())
}

/// Waits until devd holds no live connection (closes reach it
/// asynchronously), failing after 10 s with ringstat's table.
fn expect_none_live(d: &Devd, logs: &[&Path]) -> Result<()> {
    let t = Instant::now();
    loop {
        let v = d.stats()?;
        if v["devd"]["live_connections"] == 0 {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!(
                "{} connection(s) still live in devd 10 s after the clients finished \
                 (PIDS: connector/acceptor){}",
                v["devd"]["live_connections"],
                diagnosis(d, logs)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The number after `key` in `text` (e.g. ab's "Complete requests:").
fn number_after(text: &str, key: &str) -> Result<u64> {
    text.split(key)
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no number after {key:?} in:\n{text}"))
}

/// Runs `ab ARGS URL` under ssock-run: checks that all `n` requests
/// completed without failure (and kept alive with -k); the bytes ab
/// received.
fn ab(
    d: &Devd,
    logs: &[&Path],
    log: &Path,
    keepalive: bool,
    n: u64,
    c: u64,
    url: &str,
) -> Result<u64> {
    let (ns, cs) = (n.to_string(), c.to_string());
    // -s 10: a response that stalls for 10 s fails ab (default 30 s).
    let mut args = vec!["-s", "10", "-n", &ns, "-c", &cs];
    if keepalive {
        args.push("-k");
    }
    args.push(url);
    let out = run_in(d, logs, ssock(d, log, "ab", &args))?;
    ensure!(
        number_after(&out, "Complete requests:")? == n,
        "ab did not complete {n} requests:\n{out}"
    );
    ensure!(
        number_after(&out, "Failed requests:")? == 0,
        "ab saw failures:\n{out}"
    );
    ensure!(!out.contains("Non-2xx"), "ab got errors:\n{out}");
    if keepalive {
        ensure!(
            number_after(&out, "Keep-Alive requests:")? == n,
            "ab's connections were not kept alive:\n{out}"
        );
    }
    number_after(&out, "Total transferred:")
}

/// `curl URL` under ssock-run into a file; checks status 200 and that the
/// body is `want`.
fn curl_get(
    d: &Devd,
    logs: &[&Path],
    log: &Path,
    s: &Scratch,
    url: &str,
    want: &[u8],
) -> Result<()> {
    let got = s.path("curl.out");
    let out = run_in(
        d,
        logs,
        ssock(
            d,
            log,
            "curl",
            &[
                "-sS",
                "-o",
                path_str(&got)?,
                "-w",
                "%{http_code} %{size_download}",
                url,
            ],
        ),
    )?;
    ensure!(
        out.trim() == format!("200 {}", want.len()),
        "curl {url}: {out}"
    );
    let body = std::fs::read(&got)?;
    ensure!(
        body == want,
        "curl {url}: the {} bytes received differ from the {} served",
        body.len(),
        want.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// nginx

/// nginx with 2 workers as www-data serving a 2 MiB file: curl (checksum)
/// and wrk with `wrk_conns` connections on `wrk_threads` threads.
/// `packaged`: `nginx -c CONF` daemonizes as the Debian package runs it;
/// else the master stays in the foreground (`daemon off`).
/// nginx as Debian runs it, curl of a 2 MiB file, then wrk with
/// `wrk_threads` threads and `wrk_conns` connections for 2 s on a file of
/// `wrk_bytes` (a small one for many connections: with 2 MiB each, nginx
/// accepts some only after wrk gave up on them).
fn nginx(packaged: bool, wrk_threads: u32, wrk_conns: u32, wrk_bytes: u64) -> Result<()> {
    if !have_all(&["nginx", "wrk", "curl", "sha256sum"])?
        || !root_or_skip("nginx's workers run as www-data")?
    {
        return Ok(());
    }
    let s = Scratch::new("nginx")?;
    let port = free_port()?;
    s.mkdir("www", 0o755)?;
    s.mkdir("tmp", 0o755)?;
    let (_, blob) = s.payload("www/2m.bin", MIB2, 10)?;
    s.payload("www/wrk.bin", wrk_bytes, 12)?;
    let conf = s.template(
        "nginx.conf",
        &[("@DIR@", s.dir()?), ("@PORT@", &port.to_string())],
    )?;
    let d = shared_devd(&s)?;
    let slog = s.log("nginx.shim.log")?;
    let clog = s.log("clients.shim.log")?;
    let logs = [slog.as_path(), clog.as_path()];
    let conf = path_str(&conf)?;
    let mut server = if packaged {
        Server::daemon(
            "nginx",
            ssock(&d, &slog, "nginx", &["-c", conf]),
            s.path("nginx.out"),
            &s.path("nginx.pid"),
        )?
    } else {
        Server::start(
            "nginx",
            ssock(&d, &slog, "nginx", &["-c", conf, "-g", "daemon off;"]),
            s.path("nginx.out"),
        )?
    };
    server.wait_listening(port)?;
    server.wait_children_as(2, "www-data")?;
    let url = format!("http://127.0.0.1:{port}/2m.bin");
    curl_get(&d, &logs, &clog, &s, &url, &blob)?;
    let (t, c) = (wrk_threads.to_string(), wrk_conns.to_string());
    let wrk_url = format!("http://127.0.0.1:{port}/wrk.bin");
    let out = run_in(
        &d,
        &logs,
        ssock(
            &d,
            &clog,
            "wrk",
            &["-t", &t, "-c", &c, "-d", "2s", &wrk_url],
        ),
    )?;
    let requests = wrk_requests(&out)?;
    ensure!(requests > 0, "wrk made no request:\n{out}");
    ensure!(
        !out.contains("Socket errors") && !out.contains("Non-2xx"),
        "wrk saw errors:\n{out}{}",
        diagnosis(&d, &logs)
    );
    // wrk connects to the address once and closes before it starts.
    expect_none_live(&d, &logs)?;
    expect_direct_with_probes(
        &d,
        &logs,
        1 + u64::from(wrk_conns),
        MIB2 + requests * wrk_bytes,
        1,
    )?;
    server.stop()
}

/// wrk's "N requests in T, X read" count.
fn wrk_requests(out: &str) -> Result<u64> {
    out.lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{out}"))
}

#[test]
fn nginx_packaged_daemon_with_two_www_data_workers_serves_curl_and_wrk_direct() -> Result<()> {
    nginx(true, 1, 2, MIB2)
}

#[test]
fn nginx_foreground_master_with_two_www_data_workers_serves_curl_and_wrk_direct() -> Result<()> {
    nginx(false, 1, 2, MIB2)
}

/// ab without keep-alive against nginx (a new connection per request, the
/// way web servers are measured) under devd's default `short_lived` policy:
/// the first connections go Direct, then the policy keeps the listener's
/// connections on kernel TCP, decided from devd's listener board without a
/// request (ab reports them in batches); every request succeeds. Once the
/// policy's hold is over, wrk's persistent connections go Direct again.
/// Then ab not under ssock-run: a streak of Claims that find no Intent
/// holds the listener too, and nginx stops asking devd; wrk under
/// ssock-run then ends that hold at once and goes Direct.
#[test]
fn ab_without_keep_alive_against_nginx_stays_on_kernel_tcp_by_policy_and_wrk_then_goes_direct(
) -> Result<()> {
    if !have_all(&["nginx", "ab", "wrk"])? || !root_or_skip("nginx's workers run as www-data")? {
        return Ok(());
    }
    let s = Scratch::new("nginx-ab")?;
    let port = free_port()?;
    s.mkdir("www", 0o755)?;
    s.mkdir("tmp", 0o755)?;
    s.payload("www/small", 100, 11)?;
    let conf = s.template(
        "nginx.conf",
        &[("@DIR@", s.dir()?), ("@PORT@", &port.to_string())],
    )?;
    let dir = s.mkdir("devd", 0o755)?;
    // devd's defaults: connections that end within 10 ms are short; 8 in a
    // row keep the listener's on kernel TCP for 1 s.
    let d = Devd::start_at(
        &dir.join("devd.sock"),
        &["--system", "--short-lived-ms", "10"],
    )?;
    let slog = s.log("nginx.shim.log")?;
    let clog = s.log("clients.shim.log")?;
    let logs = [slog.as_path(), clog.as_path()];
    let conf = path_str(&conf)?;
    let mut server = Server::start(
        "nginx",
        ssock(&d, &slog, "nginx", &["-c", conf, "-g", "daemon off;"]),
        s.path("nginx.out"),
    )?;
    server.wait_listening(port)?;
    server.wait_children_as(2, "www-data")?;
    let url = format!("http://127.0.0.1:{port}/small");
    let n = 2000u64;
    let asked = d.stats()?["totals"]["requests"]
        .as_u64()
        .context("requests")?;
    let out = run_in(
        &d,
        &logs,
        ssock(&d, &clog, "ab", &["-c", "4", "-n", &n.to_string(), &url]),
    )?;
    let field = |name: &str| -> Result<u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {name:?} in ab's output:\n{out}"))
    };
    ensure!(field("Complete requests:")? == n, "ab:\n{out}");
    ensure!(field("Failed requests:")? == 0, "ab:\n{out}");
    expect_none_live(&d, &logs)?;
    let num = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    // (ab's last report, posted as it exited, may reach devd a moment
    // after the stats are asked for.)
    let t0 = Instant::now();
    let t = loop {
        let t = d.stats()?["totals"].clone();
        let counted = num(&t["connections"]["direct"]) + num(&t["fallbacks"]["short_lived"]);
        if counted >= n || t0.elapsed() > Duration::from_secs(5) {
            break t;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (direct, kept) = (
        num(&t["connections"]["direct"]),
        num(&t["fallbacks"]["short_lived"]),
    );
    // At least one hold began, a streak of Direct connections before it;
    // ab reported all the others, once each (its last batch at its exit).
    // (ab counts a connection as started once its nonblocking connect
    // completes: the connects under way near the end each began while
    // fewer than n had, so up to `-c` - 1 = 3 more than n come to exist.)
    ensure!(
        num(&t["short_lived_periods"]) >= 1
            && direct >= 8
            && direct + kept >= n
            && direct + kept <= n + 3,
        "short_lived: direct {direct}, kept {kept} of {n}: totals {t}{}",
        diagnosis(&d, &logs)
    );
    ensure!(
        kept > n / 2,
        "most connections stay on kernel TCP: totals {t}"
    );
    // And they cost devd nothing: an accelerated connection makes four
    // requests, one kept plain by the board a share of a Skipped.
    let asked = num(&t["requests"]) - asked;
    ensure!(
        asked < 4 * direct + n / 8,
        "{asked} requests for {n} connections, {direct} Direct: totals {t}"
    );
    // After the hold, persistent connections are accelerated again.
    std::thread::sleep(Duration::from_millis(1200));
    let out = run_in(
        &d,
        &logs,
        ssock(&d, &clog, "wrk", &["-t", "1", "-c", "2", "-d", "1s", &url]),
    )?;
    let requests = wrk_requests(&out)?;
    ensure!(
        requests > 0 && !out.contains("Socket errors") && !out.contains("Non-2xx"),
        "wrk:\n{out}"
    );
    expect_none_live(&d, &logs)?;
    let t = d.stats()?["totals"].clone();
    let bytes = num(&t["bytes"]["direct"]);
    ensure!(
        num(&t["connections"]["direct"]) >= direct + 2 && bytes > requests * 100,
        "wrk's connections went Direct: before {direct}, totals {t}"
    );
    // ab not under ssock-run: nginx's Claims find no Intent, and after a
    // streak of them nginx stops asking devd at every accept (without the
    // hold, each connection would be one request).
    let (asked, periods) = (num(&t["requests"]), num(&t["short_lived_periods"]));
    let mut plain = Command::new("ab");
    plain.args(["-c", "4", "-n", &n.to_string(), &url]);
    let out = run_in(&d, &logs, plain)?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    ensure!(
        field("Complete requests:") == Some(n) && field("Failed requests:") == Some(0),
        "plain ab:\n{out}"
    );
    let t = d.stats()?["totals"].clone();
    let asked = num(&t["requests"]) - asked;
    ensure!(
        num(&t["short_lived_periods"]) > periods && asked < n / 8,
        "{asked} requests for {n} connections from a plain ab: totals {t}{}",
        diagnosis(&d, &logs)
    );
    // That hold is for connectors not under ssock only (the board says
    // so now): wrk under ssock-run, at once, ends it and goes Direct.
    let session = ssock_client::Session::connect(&d.socket)?;
    let board = session.board().context("no listener board")?;
    let dst: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let found = ssock_rings::board::lookup(board, dst);
    ensure!(
        matches!(found, ssock_rings::board::Found::Served { plain_until, peers_only: true }
            if plain_until > ssock_rings::board::now_ns()),
        "after the plain ab the board says {found:?}: totals {t}"
    );
    let (direct, kept) = (
        num(&t["connections"]["direct"]),
        num(&t["fallbacks"]["short_lived"]),
    );
    let out = run_in(
        &d,
        &logs,
        ssock(&d, &clog, "wrk", &["-t", "1", "-c", "2", "-d", "1s", &url]),
    )?;
    ensure!(
        wrk_requests(&out)? > 0 && !out.contains("Socket errors") && !out.contains("Non-2xx"),
        "wrk:\n{out}"
    );
    expect_none_live(&d, &logs)?;
    let t = d.stats()?["totals"].clone();
    ensure!(
        num(&t["connections"]["direct"]) >= direct + 2
            && num(&t["fallbacks"]["short_lived"]) == kept,
        "wrk after the plain ab went Direct: before {direct} ({kept} kept), totals {t}{}",
        diagnosis(&d, &logs)
    );
    server.stop()
}

// wrk sizes its event loop's table for 10 + 3 fds per connection: a
// Direct connection costs it its socket and no doorbell of its own (one
// per process), so its sockets' numbers stay within it (issue 11, item 1).

#[test]
fn wrk_with_eight_connections_against_nginx_has_no_socket_errors() -> Result<()> {
    nginx(false, 2, 8, MIB2)
}

#[test]
fn wrk_with_fifty_connections_against_nginx_has_no_socket_errors() -> Result<()> {
    nginx(false, 2, 50, 4096)
}

#[test]
fn wrk_with_five_hundred_connections_against_nginx_has_no_socket_errors() -> Result<()> {
    nginx(false, 2, 500, 4096)
}

// ---------------------------------------------------------------------------
// apache2

/// apache2 with `mpm` (mpm_prefork or mpm_event), children as www-data,
/// keep-alive on: curl of a 2 MiB file (checksum), then `ab -k` and `ab`
/// without keep-alive, 100 requests each over 4 connections at a time.
/// `packaged`: `apache2 -k start` (it daemonizes, as apache2ctl does); else
/// `-DFOREGROUND`.
fn apache(mpm: &str, packaged: bool) -> Result<()> {
    if !have_all(&["apache2", "ab", "curl"])?
        || !root_or_skip("apache2's children run as www-data")?
    {
        return Ok(());
    }
    if !Path::new(&format!("/usr/lib/apache2/modules/mod_{mpm}.so")).exists() {
        return skip_unless_required(&format!("apache2 has no mod_{mpm}"));
    }
    let s = Scratch::new(mpm)?;
    let port = free_port()?;
    s.mkdir("www", 0o755)?;
    let (_, blob) = s.payload("www/2m.bin", MIB2, 11)?;
    let conf = s.template(
        "httpd.conf",
        &[
            ("@DIR@", s.dir()?),
            ("@PORT@", &port.to_string()),
            ("@MPM@", mpm),
        ],
    )?;
    let d = shared_devd(&s)?;
    let slog = s.log("apache2.shim.log")?;
    let clog = s.log("clients.shim.log")?;
    let logs = [slog.as_path(), clog.as_path()];
    let conf = path_str(&conf)?;
    let mut server = if packaged {
        Server::daemon(
            "apache2",
            ssock(&d, &slog, "apache2", &["-f", conf, "-k", "start"]),
            s.path("apache2.out"),
            &s.path("httpd.pid"),
        )?
    } else {
        Server::start(
            "apache2",
            ssock(&d, &slog, "apache2", &["-f", conf, "-DFOREGROUND"]),
            s.path("apache2.out"),
        )?
    };
    server.wait_listening(port)?;
    server.wait_children_as(2, "www-data")?;
    let url = format!("http://127.0.0.1:{port}/2m.bin");
    curl_get(&d, &logs, &clog, &s, &url, &blob)?;
    let n = 100;
    let got = ab(&d, &logs, &clog, true, n, 4, &url)?;
    let got2 = ab(&d, &logs, &clog, false, n, 4, &url)?;
    // curl's connection, ab -k's 4 and one per request without keep-alive.
    // ab counts a request as started when it writes it: near the end, up
    // to 3 of its connections may connect and then close unused (devd
    // counts each `connector_gone`, as it must).
    expect_none_live(&d, &logs)?;
    expect_direct_with_probes(&d, &logs, 1 + 4 + n, MIB2 + got + got2, 3)?;
    server.stop()
}

#[test]
fn apache2_prefork_packaged_daemon_serves_ab_with_and_without_keepalive_direct() -> Result<()> {
    apache("mpm_prefork", true)
}

#[test]
fn apache2_prefork_foreground_serves_ab_with_and_without_keepalive_direct() -> Result<()> {
    apache("mpm_prefork", false)
}

#[test]
fn apache2_event_packaged_daemon_serves_ab_with_and_without_keepalive_direct() -> Result<()> {
    apache("mpm_event", true)
}

#[test]
fn apache2_event_foreground_serves_ab_with_and_without_keepalive_direct() -> Result<()> {
    apache("mpm_event", false)
}

// ---------------------------------------------------------------------------
// gunicorn

/// gunicorn with 2 sync workers (the master binds, the workers accept on the
/// shared socket): GETs and a POST of 2 MiB (checksums both ways), then ab
/// (gunicorn closes every connection after its response).
#[test]
fn gunicorn_with_two_workers_serves_direct() -> Result<()> {
    if !have_all(&["gunicorn", "curl", "ab", "sha256sum"])? {
        return Ok(());
    }
    let s = Scratch::new("gunicorn")?;
    let port = free_port()?;
    let (blob_path, blob) = s.payload("2m.bin", MIB2, 12)?;
    let d = shared_devd(&s)?;
    let slog = s.log("gunicorn.shim.log")?;
    let clog = s.log("clients.shim.log")?;
    let logs = [slog.as_path(), clog.as_path()];
    let bind = format!("127.0.0.1:{port}");
    let mut cmd = ssock(
        &d,
        &slog,
        "gunicorn",
        &[
            "-w",
            "2",
            "-b",
            &bind,
            "--chdir",
            path_str(&app(""))?,
            "wsgi_app:app",
        ],
    );
    cmd.env("MATRIX_BLOB", &blob_path);
    let mut server = Server::start("gunicorn", cmd, s.path("gunicorn.out"))?;
    server.wait_listening(port)?;
    let url = format!("http://127.0.0.1:{port}/");
    for _ in 0..2 {
        curl_get(&d, &logs, &clog, &s, &url, &blob)?;
    }
    let data = format!("@{}", blob_path.display());
    let out = run_in(
        &d,
        &logs,
        ssock(&d, &clog, "curl", &["-sS", "--data-binary", &data, &url]),
    )?;
    ensure!(
        out.trim() == sha256_file(&blob_path)?,
        "gunicorn hashed the 2 MiB POST as {out}"
    );
    let n = 200;
    let got = ab(&d, &logs, &clog, false, n, 2, &url)?;
    let workers: std::collections::BTreeSet<String> = log_lines(&logs[..1], "accept: Direct")
        .iter()
        .filter_map(|l| Some(l.split(['[', ']']).nth(1)?.to_string()))
        .collect();
    eprintln!("gunicorn: Direct accepts in processes {workers:?}");
    expect_none_live(&d, &logs)?;
    expect_direct(&d, &logs, 3 + n, 3 * MIB2 + got)?;
    server.stop()
}

// ---------------------------------------------------------------------------
// haproxy

/// haproxy (workers as the haproxy user) in front of a Python HTTP server:
/// curl through it (checksum) and ab -k; both hops Direct. `packaged`: as
/// Debian's unit runs it (`-Ws` master-worker, which re-executes the master;
/// `chroot` and `daemon` from the packaged config); else one foreground
/// process without chroot.
fn haproxy(packaged: bool) -> Result<()> {
    if !have_all(&["haproxy", "python3", "curl", "ab"])?
        || !root_or_skip("haproxy switches to the haproxy user")?
    {
        return Ok(());
    }
    let s = Scratch::new("haproxy")?;
    let port = free_port()?;
    let backend = free_port()?;
    s.mkdir("www", 0o755)?;
    let chroot = s.mkdir("chroot", 0o755)?;
    let (_, blob) = s.payload("www/2m.bin", MIB2, 13)?;
    let global = if packaged {
        format!("    chroot {}\n    daemon\n", chroot.display())
    } else {
        String::new()
    };
    let conf = s.template(
        "haproxy.cfg",
        &[
            ("@PORT@", &port.to_string()),
            ("@BACKEND@", &backend.to_string()),
            ("@GLOBAL@", &global),
        ],
    )?;
    let d = shared_devd(&s)?;
    let blog = s.log("backend.shim.log")?;
    let hlog = s.log("haproxy.shim.log")?;
    let clog = s.log("clients.shim.log")?;
    let logs = [blog.as_path(), hlog.as_path(), clog.as_path()];
    let mut be = Server::start(
        "python3 -m http.server",
        ssock(
            &d,
            &blog,
            "python3",
            &[
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "--directory",
                path_str(&s.path("www"))?,
                &backend.to_string(),
            ],
        ),
        s.path("backend.out"),
    )?;
    be.wait_listening(backend)?;
    let conf = path_str(&conf)?;
    let mut server = if packaged {
        let pid = s.path("haproxy.pid");
        let master = s.path("master.sock");
        Server::start(
            "haproxy",
            ssock(
                &d,
                &hlog,
                "haproxy",
                &[
                    "-Ws",
                    "-f",
                    conf,
                    "-p",
                    path_str(&pid)?,
                    "-S",
                    path_str(&master)?,
                ],
            ),
            s.path("haproxy.out"),
        )?
    } else {
        Server::start(
            "haproxy",
            ssock(&d, &hlog, "haproxy", &["-f", conf]),
            s.path("haproxy.out"),
        )?
    };
    server.wait_listening(port)?;
    if packaged {
        server.wait_children_as(1, "haproxy")?;
    }
    let url = format!("http://127.0.0.1:{port}/2m.bin");
    for _ in 0..2 {
        curl_get(&d, &logs, &clog, &s, &url, &blob)?;
    }
    let n = 50;
    let got = ab(&d, &logs, &clog, true, n, 2, &url)?;
    // Front: 2 curls and ab's 2 connections; back: one per request
    // (http.server closes each after its response).
    expect_none_live(&d, &logs)?;
    expect_direct(&d, &logs, 2 + 2 + 2 + n, 2 * (2 * MIB2 + got))?;
    server.stop()?;
    be.stop()
}

/// haproxy (root) in front of nginx whose workers (www-data) cannot reach
/// devd (a devd only root may use): nginx's master registered the
/// listener, so haproxy's connects to it are paired, but no worker ever
/// claims its end. Each such connection is found plain at its first answer
/// on the kernel socket (counted `unclaimed`) and stays on kernel TCP;
/// clients to haproxy are Direct. Three ab -k runs, with nginx ending its
/// connections often: new connections reuse the fd numbers of closed
/// backend connections, whose files devd must not keep open (their epoll
/// registrations would report events for the new ones: haproxy lost its
/// clients with resets).
#[test]
fn haproxy_before_a_backend_whose_workers_cannot_reach_devd_keeps_that_hop_on_kernel_tcp(
) -> Result<()> {
    if !have_all(&["haproxy", "nginx", "curl", "ab"])?
        || !root_or_skip("nginx's workers run as www-data")?
    {
        return Ok(());
    }
    let s = Scratch::new("unclaimed")?;
    let port = free_port()?;
    let backend = free_port()?;
    s.mkdir("www", 0o755)?;
    s.mkdir("tmp", 0o755)?;
    let (_, blob) = s.payload("www/2m.bin", MIB2, 14)?;
    s.payload("www/small", 100, 15)?;
    // nginx ends each connection after 10 requests: haproxy closes and
    // opens backend connections while ab runs.
    let nconf = s.template(
        "nginx.conf",
        &[
            ("@DIR@", s.dir()?),
            ("@PORT@", &backend.to_string()),
            ("keepalive_requests 1000000;", "keepalive_requests 10;"),
        ],
    )?;
    let hconf = s.template(
        "haproxy-as-root.cfg",
        &[
            ("@PORT@", &port.to_string()),
            ("@BACKEND@", &backend.to_string()),
        ],
    )?;
    // `devd --user` as root: its socket is root's alone.
    let d = Devd::start(&[])?;
    let nlog = s.log("nginx.shim.log")?;
    let hlog = s.log("haproxy.shim.log")?;
    let clog = s.log("clients.shim.log")?;
    let logs = [nlog.as_path(), hlog.as_path(), clog.as_path()];
    let mut be = Server::start(
        "nginx",
        ssock(
            &d,
            &nlog,
            "nginx",
            &["-c", path_str(&nconf)?, "-g", "daemon off;"],
        ),
        s.path("nginx.out"),
    )?;
    be.wait_listening(backend)?;
    be.wait_children_as(2, "www-data")?;
    let mut server = Server::start(
        "haproxy",
        ssock(&d, &hlog, "haproxy", &["-f", path_str(&hconf)?]),
        s.path("haproxy.out"),
    )?;
    server.wait_listening(port)?;
    curl_get(
        &d,
        &logs,
        &clog,
        &s,
        &format!("http://127.0.0.1:{port}/2m.bin"),
        &blob,
    )?;
    let url = format!("http://127.0.0.1:{port}/small");
    for _ in 0..3 {
        ab(&d, &logs, &clog, true, 2000, 20, &url)?;
    }
    let t = d.stats()?["totals"].clone();
    let unclaimed = t["fallbacks"]["unclaimed"].as_u64().unwrap_or(0);
    let direct = t["connections"]["direct"].as_u64().unwrap_or(0);
    let found = log_lines(
        &logs,
        "answered on the kernel socket without taking its end",
    );
    // (Each is posted on its end's session: the count may trail the log.)
    ensure!(
        unclaimed >= 1 && unclaimed <= found.len() as u64,
        "haproxy's connections to nginx should have been found plain and counted          unclaimed: {unclaimed} counted, {} logged; totals {t}{}",
        found.len(),
        diagnosis(&d, &logs)
    );
    // Front: curl and ab's 3 x 20 connections.
    ensure!(
        direct >= 61,
        "only {direct} Direct connections (curl and ab to haproxy: 61); totals {t}{}",
        diagnosis(&d, &logs)
    );
    expect_none_live(&d, &logs)?;
    server.stop()?;
    be.stop()
}

#[test]
fn haproxy_packaged_master_worker_in_chroot_proxies_direct() -> Result<()> {
    haproxy(true)
}

#[test]
fn haproxy_foreground_as_haproxy_user_proxies_direct() -> Result<()> {
    haproxy(false)
}

// ---------------------------------------------------------------------------
// memcached

/// memcached dropping to `-u nobody` (its session is opened as nobody),
/// with 2 worker threads: a Python client setting and getting 200 values of
/// up to 500 KB (checksums), and memcslap.
#[test]
fn memcached_as_nobody_serves_python_and_memcslap_direct() -> Result<()> {
    if !have_all(&["memcached", "memcslap", "python3"])? || !root_or_skip("memcached -u nobody")? {
        return Ok(());
    }
    let s = Scratch::new("memcached")?;
    let port = free_port()?;
    let d = shared_devd(&s)?;
    let slog = s.log("memcached.shim.log")?;
    let clog = s.log("clients.shim.log")?;
    let logs = [slog.as_path(), clog.as_path()];
    let ps = port.to_string();
    let mut server = Server::start(
        "memcached",
        ssock(
            &d,
            &slog,
            "memcached",
            &[
                "-u",
                "nobody",
                "-l",
                "127.0.0.1",
                "-p",
                &ps,
                "-U",
                "0",
                "-t",
                "2",
                "-m",
                "256",
                "-I",
                "2m",
            ],
        ),
        s.path("memcached.out"),
    )?;
    server.wait_listening(port)?;
    let nobody = uid_of("nobody")?;
    ensure!(
        std::fs::metadata(format!("/proc/{}", server.pid))?.uid() == nobody,
        "memcached does not run as nobody"
    );
    let out = run_in(
        &d,
        &logs,
        ssock(
            &d,
            &clog,
            "python3",
            &[path_str(&app("memcache_client.py"))?, "client", &ps, "200"],
        ),
    )?;
    let stored = number_after(&out, "OK memcache 200")?;
    let servers = format!("--servers=127.0.0.1:{port}");
    for test in ["set", "get"] {
        let out = run_in(
            &d,
            &logs,
            ssock(
                &d,
                &clog,
                "memcslap",
                &[
                    &servers,
                    "--concurrency=4",
                    "--execute-number=2000",
                    &format!("--test={test}"),
                ],
            ),
        )?;
        ensure!(
            out.contains("Time total") || out.contains("Took"),
            "memcslap --test={test} printed:\n{out}"
        );
    }
    expect_none_live(&d, &logs)?;
    expect_direct(&d, &logs, 1 + 4 + 4, 2 * stored)?;
    server.stop()
}

// ---------------------------------------------------------------------------
// PostgreSQL

/// The newest installed PostgreSQL's binaries (`/usr/lib/postgresql/N/bin`).
fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let b = e.path().join("bin");
            b.join("postgres").exists().then_some((v, b))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// PostgreSQL as its packaging runs it: initdb and the postmaster as the
/// postgres user (`runuser -u postgres`), a backend forked per connection.
/// pgbench -i, pgbench with 4 clients, and psql moving 2 MiB out (compared)
/// and 1 MiB in (md5 computed by the server, compared).
#[test]
fn postgresql_serves_pgbench_and_psql_direct() -> Result<()> {
    if !have_all(&["runuser", "md5sum"])? || !root_or_skip("postgres runs as the postgres user")? {
        return Ok(());
    }
    let Some(pg) = postgres_bin() else {
        return skip_unless_required("PostgreSQL (/usr/lib/postgresql/N/bin) is not installed");
    };
    let s = Scratch::new("postgres")?;
    let port = free_port()?;
    // The data directory and the unix socket's, the postgres user's.
    let (uid, gid) = ids_of("postgres")?;
    let data = s.mkdir("data", 0o700)?;
    let sock_dir = s.mkdir("run", 0o755)?;
    for dir in [&data, &sock_dir] {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    }
    let mut initdb = Command::new("runuser");
    initdb
        .args(["-u", "postgres", "--"])
        .arg(pg.join("initdb"))
        .args([
            "-D",
            path_str(&data)?,
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
    run(initdb)?;
    let d = shared_devd(&s)?;
    let shared = s.shared_ssock_run()?;
    let slog = s.log("postgres.shim.log")?;
    let clog = s.log("clients.shim.log")?;
    let logs = [slog.as_path(), clog.as_path()];
    let ps = port.to_string();
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"])
        .arg(&shared)
        .arg("--devd")
        .arg(&d.socket)
        .arg("--log")
        .arg(&slog)
        .arg("--")
        .arg(pg.join("postgres"))
        .args([
            "-D",
            path_str(&data)?,
            "-k",
            path_str(&sock_dir)?,
            "-h",
            "127.0.0.1",
            "-p",
            &ps,
            "-c",
            "fsync=off",
            "-c",
            "max_connections=20",
        ]);
    let mut launcher = Server::start("runuser postgres", cmd, s.path("postgres.out"))?;
    launcher.wait_served(port, &d)?;
    // The postmaster (runuser's child): stopped with SIGINT (fast shutdown).
    let pidfile = data.join("postmaster.pid");
    let pm: u32 = std::fs::read_to_string(&pidfile)?
        .lines()
        .next()
        .context("postmaster.pid")?
        .trim()
        .parse()?;
    let mut server = Server {
        name: "postgres".into(),
        child: None,
        pid: pm,
        stop_signal: "INT",
        out: s.path("postgres.out"),
    };
    let conn = ["-h", "127.0.0.1", "-p", &ps, "-U", "postgres"];
    let pgbench = pg.join("pgbench");
    let mut args = conn.to_vec();
    args.extend(["-i", "-s", "1", "postgres"]);
    // The postmaster listens before it accepts sessions ("the database
    // system is starting up"): pgbench -i is tried again meanwhile.
    let t = Instant::now();
    let out = loop {
        match run_in(&d, &logs, ssock(&d, &clog, &pgbench, &args)) {
            Err(e)
                if format!("{e:#}").contains("starting up")
                    && t.elapsed() < Duration::from_secs(30) =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            r => break r?,
        }
    };
    ensure!(out.contains("done in"), "pgbench -i:\n{out}");
    let mut args = conn.to_vec();
    args.extend(["-c", "4", "-j", "2", "-t", "200", "postgres"]);
    let out = run_in(&d, &logs, ssock(&d, &clog, &pgbench, &args))?;
    ensure!(
        out.contains("number of transactions actually processed: 800/800")
            && out.contains("number of failed transactions: 0"),
        "pgbench:\n{out}"
    );
    // 2 MiB out of the server, compared.
    let psql = pg.join("psql");
    let mut args = conn.to_vec();
    args.extend([
        "-At",
        "-c",
        "select repeat('0123456789abcdef', 131072)",
        "postgres",
    ]);
    let got = run_client(&d, &logs, ssock(&d, &clog, &psql, &args), None)?;
    let want = format!("{}\n", "0123456789abcdef".repeat(131072));
    ensure!(
        got.stdout == want.as_bytes(),
        "psql received {} bytes, not the 2 MiB string",
        got.stdout.len()
    );
    // 1 MiB into the server: its md5 must be md5sum's.
    let lit: String = (0..1u32 << 20)
        .map(|i| char::from(b'a' + u8::try_from(i.wrapping_mul(2654435761) >> 28).unwrap_or(0)))
        .collect();
    std::fs::write(s.path("lit"), &lit)?;
    std::fs::write(s.path("q.sql"), format!("select md5('{lit}');\n"))?;
    let mut c = Command::new("md5sum");
    c.arg(s.path("lit"));
    let want_md5 = run(c)?.split_whitespace().next().unwrap_or("").to_string();
    let mut args = conn.to_vec();
    let q = s.path("q.sql");
    args.extend(["-At", "-f", path_str(&q)?, "postgres"]);
    let out = run_in(&d, &logs, ssock(&d, &clog, &psql, &args))?;
    ensure!(
        out.trim() == want_md5,
        "the server's md5 of the 1 MiB literal is {out}, md5sum says {want_md5}"
    );
    // pgbench -i (1), pgbench's own connection and its 4 clients, 2 psql.
    expect_none_live(&d, &logs)?;
    expect_direct(&d, &logs, 1 + 1 + 4 + 2, MIB2 + (1 << 20))?;
    server.stop()?;
    launcher.stop()
}

// ---------------------------------------------------------------------------
// OpenMPI

/// Two OpenMPI ranks over its TCP transport (`--mca btl tcp,self`: no
/// shared-memory transport) under one `ssock-run mpirun`: tools/mpibench.c,
/// 1 B ping-pongs and 2 x 400 MiB from rank 0 to rank 1, the stamps of
/// every message and every byte of one in 16 checked by rank 1. The
/// ranks' connections (and mpirun's own to them) go Direct: devd counts
/// the 800 MiB among its Direct bytes.
#[test]
fn openmpi_ranks_move_their_messages_direct() -> Result<()> {
    if !have_all(&["mpirun", "mpicc"])? {
        return Ok(());
    }
    let s = Scratch::new("mpi")?;
    let exe = s.path("mpibench");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/mpibench.c");
    let mut cc = Command::new("mpicc");
    cc.args(["-O2", "-o"]).arg(&exe).arg(&src);
    run(cc)?;
    let d = shared_devd(&s)?;
    let log = s.log("mpi.shim.log")?;
    let logs = [log.as_path()];
    let out = run_in(
        &d,
        &logs,
        ssock(
            &d,
            &log,
            "mpirun",
            &[
                "--allow-run-as-root",
                "--oversubscribe",
                "-np",
                "2",
                "--mca",
                "btl",
                "tcp,self",
                "--mca",
                "btl_tcp_if_include",
                "lo",
                "--mca",
                "oob_tcp_if_include",
                "lo",
                path_str(&exe)?,
            ],
        ),
    )?;
    ensure!(out.contains("LAT1B_US"), "mpibench:\n{out}");
    let v = d.stats()?;
    let direct = v["totals"]["bytes"]["direct"].as_u64().unwrap_or(0);
    ensure!(
        direct >= 800 << 20,
        "{direct} bytes Direct, not the ranks' 800 MiB:{}",
        diagnosis(&d, &logs)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// node.js

/// `node http.js server PORT [cluster 2]` and its client: 40 requests over a
/// keep-alive agent of 4 sockets, 2 MiB GETs and POSTs (SHA-256 both ways).
fn node(cluster: bool) -> Result<()> {
    if !have_all(&["node"])? {
        return Ok(());
    }
    let s = Scratch::new("node")?;
    let port = free_port()?;
    let d = shared_devd(&s)?;
    let slog = s.log("server.shim.log")?;
    let clog = s.log("client.shim.log")?;
    let logs = [slog.as_path(), clog.as_path()];
    let ps = port.to_string();
    let js = app("http.js");
    let js = path_str(&js)?;
    let mut args = vec![js, "server", &ps];
    if cluster {
        args.extend(["cluster", "2"]);
    }
    let mut server = Server::start("node", ssock(&d, &slog, "node", &args), s.path("node.out"))?;
    server.wait_listening(port)?;
    let t = Instant::now();
    while !server.output().contains("READY") {
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "node server: {}",
            server.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run_in(
        &d,
        &logs,
        ssock(&d, &clog, "node", &[js, "client", &ps, "40"]),
    )?;
    ensure!(out.starts_with("OK 40 requests"), "node client:\n{out}");
    let pids = out
        .split("server pids ")
        .nth(1)
        .context("server pids")?
        .trim()
        .split(',')
        .count();
    if cluster {
        ensure!(
            pids == 2,
            "the cluster's 2 workers did not both serve: {out}"
        );
    }
    // 4 sockets; 20 GET responses of 2 MiB (a POST's body written before
    // the server claimed its connection may stay on the kernel socket).
    expect_none_live(&d, &logs)?;
    expect_direct(&d, &logs, 4, 20 * MIB2)?;
    server.stop()
}

#[test]
fn node_http_server_and_client_go_direct() -> Result<()> {
    node(false)
}

#[test]
fn node_cluster_with_two_workers_goes_direct() -> Result<()> {
    node(true)
}

/// A node client whose socket libuv closed (a raw close system call) opens
/// a file that gets the socket's fd number and reads it.
#[test]
fn node_reads_a_file_on_the_number_of_a_socket_libuv_closed() -> Result<()> {
    if !have_all(&["node"])? {
        return Ok(());
    }
    let s = Scratch::new("node-fd")?;
    let port = free_port()?;
    let d = shared_devd(&s)?;
    let slog = s.log("server.shim.log")?;
    let clog = s.log("client.shim.log")?;
    let logs = [slog.as_path(), clog.as_path()];
    let ps = port.to_string();
    let js = app("http.js");
    let js = path_str(&js)?;
    let mut server = Server::start(
        "node",
        ssock(&d, &slog, "node", &[js, "server", &ps]),
        s.path("node.out"),
    )?;
    server.wait_listening(port)?;
    let file = s.path("file.txt");
    std::fs::write(&file, "the contents of a regular file\n")?;
    let out = run_in(
        &d,
        &logs,
        ssock(&d, &clog, "node", &[js, "fdreuse", &ps, path_str(&file)?]),
    )?;
    ensure!(out.starts_with("OK fdreuse"), "{out}");
    expect_direct(&d, &logs, 1, MIB2)?;
    server.stop()
}

// ---------------------------------------------------------------------------
// socat

/// `socat TCP-LISTEN:PORT,fork SYSTEM:'sha256sum; cat FILE'`: a child per
/// connection. Three clients (`socat - TCP:...`) upload 2 MiB and get back
/// its SHA-256 and a 2 MiB file (compared).
#[test]
fn socat_fork_serves_each_connection_in_a_child_direct() -> Result<()> {
    if !have_all(&["socat", "sha256sum"])? {
        return Ok(());
    }
    let s = Scratch::new("socat")?;
    let port = free_port()?;
    let (up_path, _) = s.payload("up.bin", MIB2, 14)?;
    let (down_path, down) = s.payload("down.bin", MIB2, 15)?;
    let d = shared_devd(&s)?;
    let slog = s.log("server.shim.log")?;
    let clog = s.log("client.shim.log")?;
    let logs = [slog.as_path(), clog.as_path()];
    let listen = format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork");
    let system = format!("SYSTEM:sha256sum; cat {}", down_path.display());
    let mut server = Server::start(
        "socat",
        ssock(&d, &slog, "socat", &[&listen, &system]),
        s.path("socat.out"),
    )?;
    server.wait_listening(port)?;
    let want = format!("{}  -\n", sha256_file(&up_path)?);
    let connect = format!("TCP:127.0.0.1:{port}");
    let n = 3;
    for _ in 0..n {
        let got = run_client(
            &d,
            &logs,
            ssock(&d, &clog, "socat", &["-t", "10", "-", &connect]),
            Some(&up_path),
        )?;
        ensure!(
            got.stdout.len() == want.len() + down.len()
                && got.stdout.starts_with(want.as_bytes())
                && got.stdout[want.len()..] == down[..],
            "socat received {} bytes, not the upload's checksum and the 2 MiB file: {:?}",
            got.stdout.len(),
            String::from_utf8_lossy(&got.stdout[..got.stdout.len().min(80)])
        );
    }
    // The downloads go Direct; an upload written before the server claimed
    // its connection may stay on the kernel socket (the end was forked).
    expect_none_live(&d, &logs)?;
    expect_direct(&d, &logs, n, n * MIB2)?;
    server.stop()
}

// ---------------------------------------------------------------------------
// One process, both ends

/// A process connected to its own listener 5 times (writing before it
/// accepts, then 2 MiB each way at once), all Direct; then a socket
/// connected to itself (TCP simultaneous open, no listener) keeps its bytes
/// right on kernel TCP without asking devd (no listener on its board).
#[test]
fn a_process_connected_to_itself_goes_direct() -> Result<()> {
    if !have_all(&["python3"])? {
        return Ok(());
    }
    let s = Scratch::new("self")?;
    let d = shared_devd(&s)?;
    let log = s.log("self.shim.log")?;
    let logs = [log.as_path()];
    let py = app("selfconnect.py");
    let py = path_str(&py)?;
    let size = MIB2.to_string();
    let out = run_in(
        &d,
        &logs,
        ssock(&d, &log, "python3", &[py, "listener", "5", &size]),
    )?;
    ensure!(out.starts_with("OK listener 5 conns"), "{out}");
    expect_none_live(&d, &logs)?;
    expect_direct(&d, &logs, 5, 2 * 5 * MIB2)?;
    let out = run_in(
        &d,
        &logs,
        ssock(&d, &log, "python3", &[py, "simultaneous", "1048576"]),
    )?;
    ensure!(out.starts_with("OK simultaneous 1048576"), "{out}");
    let t = d.stats()?["totals"].clone();
    ensure!(
        t["fallbacks"]["peer_not_enabled"] == 0
            && t["connections"]["kernel"] == 0
            && t["connections"]["direct"] == 5,
        "a self-connected socket: totals {t}"
    );
    expect_none_live(&d, &logs)
}

/// A server that empties its environment (clearenv) after listen: it
/// accepts, and a child it forks afterwards connects to it, all Direct.
#[test]
fn a_server_that_clears_its_environment_after_listen_goes_direct() -> Result<()> {
    if !have_all(&["python3"])? {
        return Ok(());
    }
    let s = Scratch::new("envclear")?;
    let d = shared_devd(&s)?;
    let slog = s.log("server.shim.log")?;
    let clog = s.log("client.shim.log")?;
    let logs = [slog.as_path(), clog.as_path()];
    let py = app("envclear.py");
    let py = path_str(&py)?;
    let n = 4;
    let mut server = Server::start(
        "envclear.py",
        ssock(&d, &slog, "python3", &[py, "server", &n.to_string()]),
        s.path("server.out"),
    )?;
    let t = Instant::now();
    let port = loop {
        if let Some(p) = server
            .output()
            .lines()
            .find_map(|l| l.strip_prefix("PORT ")?.trim().parse::<u16>().ok())
        {
            break p;
        }
        ensure!(server.alive(), "envclear.py server: {}", server.output());
        ensure!(t.elapsed() < Duration::from_secs(20), "no PORT line");
        std::thread::sleep(Duration::from_millis(20));
    };
    let size = 1_000_000u64;
    let out = run_in(
        &d,
        &logs,
        ssock(
            &d,
            &clog,
            "python3",
            &[
                py,
                "client",
                &port.to_string(),
                &n.to_string(),
                &size.to_string(),
            ],
        ),
    )?;
    ensure!(out.starts_with(&format!("OK client {n}")), "{out}");
    let t = Instant::now();
    while server.alive() {
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "the server did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let said = server.output();
    ensure!(
        said.contains(&format!("OK served {}", n + 1)),
        "envclear.py server: {said}"
    );
    // n client connections and the forked child's, each with a 1 MiB
    // download (an upload written before the accept may stay on the kernel
    // socket: the server claims the connection only once it accepts).
    expect_none_live(&d, &logs)?;
    expect_direct(&d, &logs, n + 1, (n + 1) * (1 << 20))
}
