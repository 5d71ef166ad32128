//! The tools as a user runs them.

use anyhow::{ensure, Context, Result};
use ssock_tests::bin;
use std::path::Path;
use std::process::Command;

#[test]
fn ssock_bench_runs_kernel_direct_and_queued_on_its_own_devd() -> Result<()> {
    // --plot needs a font (Debian: fonts-dejavu-core); without it the rest
    // still runs.
    let font = Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").is_file();
    let png = std::env::temp_dir().join(format!("ssock-bench-test-{}.png", std::process::id()));
    let mut cmd = Command::new(bin("ssock-bench"));
    cmd.args(["--quick", "--rounds", "1", "--json"])
        .env_remove("SSOCK_DEVD_SOCKET");
    if font {
        cmd.arg("--plot").arg(&png);
    } else {
        eprintln!("SKIP --plot: no DejaVuSans.ttf (Debian package fonts-dejavu-core)");
    }
    let out = cmd.output()?;
    let plotted = std::fs::read(&png);
    let _ = std::fs::remove_file(&png);
    ensure!(
        out.status.success(),
        "ssock-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let results = v["results"].as_array().context("results")?;
    let count = |f: &str| results.iter().filter(|r| r["family"] == f).count();
    // 1 B to 64 KiB; 1 KiB to 64 KiB writes; a CPU row per ping-pong size
    // and the hot spot; hot spot, multi-stream, setup.
    for (family, n) in [
        ("ping-pong", 17),
        ("stream", 7),
        ("cpu", 18),
        ("connections", 3),
    ] {
        ensure!(
            count(family) == n,
            "expected {n} {family} tests, got {}",
            count(family)
        );
    }
    for r in results {
        let transports = r["transports"].as_array().context("transports")?;
        let names: Vec<&str> = transports
            .iter()
            .filter_map(|t| t["transport"].as_str())
            .collect();
        ensure!(
            names == ["kernel", "unix", "direct", "queued"],
            "transports {names:?}"
        );
        for t in transports {
            ensure!(
                t["median"].as_f64().is_some_and(|m| m > 0.0),
                "no figure in {} {t}",
                r["test"]
            );
            if r["family"] == "ping-pong" {
                ensure!(
                    t["p99"].as_f64().is_some_and(|p| p > 0.0)
                        && t["messages"].as_u64().is_some_and(|n| n > 0),
                    "no per-message samples in {} {t}",
                    r["test"]
                );
            }
        }
    }
    if font {
        let png = plotted.context("--plot wrote no file")?;
        ensure!(png.starts_with(b"\x89PNG"), "--plot did not write a PNG");
    }
    Ok(())
}

#[test]
fn ringstat_without_a_devd_says_so_and_fails() -> Result<()> {
    let out = Command::new(bin("ringstat"))
        .env("SSOCK_DEVD_SOCKET", "/nonexistent/ssock/devd.sock")
        .output()?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("is devd running?"), "stderr: {err}");
    Ok(())
}

#[test]
fn devd_refuses_a_bad_config_with_the_key_named() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ssock-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("devd.toml");
    std::fs::write(&cfg, "region_size = 12345\n")?;
    let out = Command::new(bin("devd")).arg("--config").arg(&cfg).output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("region_size"), "stderr: {err}");
    Ok(())
}

#[test]
fn the_packaged_example_config_is_accepted_by_devd() -> Result<()> {
    // devd --config parses and validates the file, then binds its socket:
    // point the socket at a private directory and stop devd at once.
    let dir = std::env::temp_dir().join(format!("ssock-pkg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/devd.toml"
    ))?;
    let cfg = dir.join("devd.toml");
    let mut text = text.replace(
        "/run/ssock/devd.sock",
        &dir.join("devd.sock").to_string_lossy(),
    );
    // Its run_as = "ssock" needs root and that user (tests/tests/
    // privileges.rs checks what it does); elsewhere devd is asked to
    // stay who it is, the line still parsed.
    let root_with_user = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        && Command::new("id").arg("ssock").output()?.status.success();
    ensure!(text.contains("\nrun_as = \"ssock\"\n"), "{text}");
    if !root_with_user {
        let me = String::from_utf8(Command::new("id").arg("-un").output()?.stdout)?;
        text = text.replace(
            "\nrun_as = \"ssock\"\n",
            &format!("\nrun_as = {:?}\n", me.trim()),
        );
    }
    std::fs::write(&cfg, text)?;
    let mut child = Command::new(bin("devd"))
        .arg("--config")
        .arg(&cfg)
        .spawn()?;
    let up = ssock_tools::wait_for(&dir.join("devd.sock"), std::time::Duration::from_secs(10));
    let st = terminate(&mut child)?;
    let _ = std::fs::remove_dir_all(&dir);
    up?;
    ensure!(st.success(), "devd exited with {st} after SIGTERM");
    Ok(())
}

#[test]
fn sandboxed_devd_tells_systemd_it_is_ready_and_stays_up() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ssock-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let notify = dir.join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify)?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut child = Command::new(bin("devd"))
        .args(["--user", "--socket"])
        .arg(dir.join("devd.sock"))
        .env("NOTIFY_SOCKET", &notify)
        .spawn()?;
    let mut b = [0u8; 64];
    let got = sock.recv(&mut b);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let alive = child.try_wait()?.is_none();
    let served = ssock_tools::wait_for(&dir.join("devd.sock"), std::time::Duration::from_secs(5));
    let st = terminate(&mut child)?;
    let _ = std::fs::remove_dir_all(&dir);
    let n = got?;
    ensure!(
        &b[..n] == b"READY=1",
        "devd sent {:?}",
        String::from_utf8_lossy(&b[..n])
    );
    ensure!(alive, "devd died after readiness: {st}");
    served?;
    ensure!(st.success(), "devd exit {st}");
    Ok(())
}

/// Sends SIGTERM to `child` and waits for it.
fn terminate(child: &mut std::process::Child) -> Result<std::process::ExitStatus> {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    Ok(child.wait()?)
}

// ---------------------------------------------------------------------------
// ssock-run's devd, and every binary's --help and --version (issue 10).

/// A private directory for one test, and every process whose environment
/// carries its path in `SSOCK_TEST_MARK` (whatever started them: ssock-run
/// and the devd it started in the background, which is nobody's child):
/// all killed, and the directory removed, on drop, also when a test fails.
struct Marked {
    dir: std::path::PathBuf,
}

impl Marked {
    /// No devd came up and no process of this test is left.
    fn started_nothing(&self) -> Result<()> {
        ensure!(!self.socket().exists(), "a devd was started");
        ensure!(
            self.processes().is_empty(),
            "processes left: {:?}",
            self.processes()
        );
        Ok(())
    }

    fn new(tag: &str) -> Result<Marked> {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ssock-{tag}-{}", std::process::id()));
        let m = Marked { dir };
        m.kill_all();
        let _ = std::fs::remove_dir_all(&m.dir);
        std::fs::create_dir_all(m.dir.join("xdg"))?;
        for d in [&m.dir, &m.dir.join("xdg")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(m)
    }

    /// Where ssock-run finds (or starts) its devd: `SSOCK_DEVD_SOCKET`, in
    /// a directory that does not exist yet.
    fn socket(&self) -> std::path::PathBuf {
        self.dir.join("run/devd.sock")
    }

    /// `program` with the mark, `SSOCK_DEVD_SOCKET` = [`Self::socket`] and
    /// a private `XDG_RUNTIME_DIR` and `HOME`.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("SSOCK_TEST_MARK", &self.dir)
            .env("SSOCK_DEVD_SOCKET", self.socket())
            .env("XDG_RUNTIME_DIR", self.dir.join("xdg"))
            .env("HOME", &self.dir)
            .stdin(std::process::Stdio::null());
        c
    }

    /// Live processes carrying the mark.
    fn processes(&self) -> Vec<u32> {
        let mut mark = b"SSOCK_TEST_MARK=".to_vec();
        mark.extend_from_slice(self.dir.as_os_str().as_encoded_bytes());
        mark.push(0);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                    env.split_inclusive(|&b| b == 0)
                        .any(|v| v == mark.as_slice())
                })
            })
            .collect()
    }

    /// SIGTERM to every marked process, SIGKILL to those left after 2 s.
    fn kill_all(&self) {
        let signal = |sig: &str, pids: &[u32]| {
            for pid in pids {
                let _ = Command::new("kill")
                    .arg(sig)
                    .arg(pid.to_string())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        };
        signal("-TERM", &self.processes());
        let t = std::time::Instant::now();
        while !self.processes().is_empty() && t.elapsed() < std::time::Duration::from_secs(2) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        signal("-KILL", &self.processes());
    }
}

impl Drop for Marked {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The session id of process `pid`.
fn session_of(pid: u32) -> Result<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the ")" that closes the name: state, ppid, pgrp, session.
    let rest = s.rsplit_once(')').context("stat format")?.1;
    Ok(rest.split_whitespace().nth(3).context("session")?.parse()?)
}

#[test]
fn ssock_run_pipe_returns_while_the_devd_it_started_runs() -> Result<()> {
    // `ssock-run -- true | cat` must end: the devd ssock-run starts (and
    // leaves running) holds none of the caller's descriptors, here the
    // pipe as stdout, stderr and also as fds 3 and 4.
    let m = Marked::new("run-pipe")?;
    let mut child = m
        .command("sh")
        .arg("-c")
        .arg(r#"exec "$0" --devd auto -- true 3>&1 4>&2"#)
        .arg(bin("ssock-run"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let (mut out, mut err) = (
        child.stdout.take().context("stdout")?,
        child.stderr.take().context("stderr")?,
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let r = out
            .read_to_end(&mut o)
            .and_then(|_| err.read_to_end(&mut e));
        let _ = tx.send(r.map(|_| String::from_utf8_lossy(&e).into_owned()));
    });
    let limit = std::time::Duration::from_secs(30);
    let got = rx.recv_timeout(limit);
    let st = child.wait()?;
    let stderr = match got {
        Ok(r) => r?,
        Err(_) => {
            let holders = m.processes();
            m.kill_all();
            anyhow::bail!(
                "the pipe did not reach EOF within {limit:?} (ssock-run {st}); processes holding it: {holders:?}"
            );
        }
    };
    ensure!(st.success(), "ssock-run: {st}, stderr: {stderr}");
    // It did start a devd, still serving, in a session of its own, logging
    // beside its socket.
    let socket = m.socket();
    let devd = ssock_tests::stats(&socket)
        .with_context(|| format!("no devd at {}; stderr: {stderr}", socket.display()))?;
    let pid = u32::try_from(devd["devd"]["pid"].as_u64().context("devd pid")?)?;
    ensure!(
        session_of(pid)? == pid,
        "devd {pid} is not a session leader"
    );
    ensure!(socket.with_file_name("devd.log").is_file(), "no devd.log");
    Ok(())
}

#[test]
fn ssock_run_version_help_and_usage_start_no_devd() -> Result<()> {
    let m = Marked::new("run-version")?;
    let version = m.command(bin("ssock-run")).arg("--version").output()?;
    ensure!(version.status.success(), "--version: {}", version.status);
    ensure!(
        String::from_utf8_lossy(&version.stdout)
            == format!("ssock-run {}\n", env!("CARGO_PKG_VERSION")),
        "--version printed {:?}",
        String::from_utf8_lossy(&version.stdout)
    );
    for args in [&["-V"][..], &["--help"], &["-h"], &[], &["--devd", "auto"]] {
        let out = m.command(bin("ssock-run")).args(args).output()?;
        ensure!(
            out.status.success() == (args.len() == 1),
            "{args:?}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    m.started_nothing()
}

#[test]
fn ssock_run_missing_program_starts_no_devd_and_exits_127() -> Result<()> {
    let m = Marked::new("run-missing")?;
    let missing = m.dir.join("no-such-dir/program");
    for prog in [
        std::ffi::OsStr::new("ssock-no-such-program-anywhere"),
        missing.as_os_str(),
    ] {
        let out = m
            .command(bin("ssock-run"))
            .args(["--devd", "auto", "--"])
            .arg(prog)
            .arg("x")
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(127),
            "{prog:?}: {}, {err}",
            out.status
        );
        ensure!(
            err.contains(&*prog.to_string_lossy()) && err.contains("no such executable"),
            "stderr: {err}"
        );
    }
    m.started_nothing()
}

#[test]
fn every_binary_has_help_and_version() -> Result<()> {
    // What each --help must name: its options, and the environment it (and
    // for ssock-run, the shim in the program) reads.
    let wants: [(&str, &[&str]); 4] = [
        (
            "ssock-run",
            &[
                "usage:",
                "--devd",
                "--log",
                "--version",
                "SSOCK_DEVD_SOCKET",
                "SSOCK_LOG",
                "SSOCK_LOG_LEVEL",
                "SSOCK_DISABLE",
                "SSOCK_SPIN_US",
                "SSOCK_STD_FDS",
                "XDG_RUNTIME_DIR",
                "LD_PRELOAD",
            ],
        ),
        (
            "devd",
            &[
                "usage:",
                "--user",
                "--system",
                "--config",
                "--socket",
                "--default-mode",
                "--region-size",
                "--spin-us",
                "--no-sandbox",
                "--seccomp-log",
                "--log",
                "--detach",
                "--version",
                "SSOCK_DEVD_SOCKET",
                "NOTIFY_SOCKET",
                "XDG_RUNTIME_DIR",
            ],
        ),
        (
            "ringstat",
            &[
                "usage:",
                "conn ID",
                "--json",
                "--version",
                "SSOCK_DEVD_SOCKET",
                "XDG_RUNTIME_DIR",
            ],
        ),
        (
            "ssock-bench",
            &[
                "usage:",
                "--rounds",
                "--quick",
                "--only",
                "--transports",
                "--devd",
                "--version",
                "SSOCK_DEVD_SOCKET",
                "SSOCK_SPIN_US",
            ],
        ),
    ];
    for (name, words) in wants {
        let help = Command::new(bin(name)).arg("--help").output()?;
        let text = String::from_utf8_lossy(&help.stdout);
        ensure!(help.status.success(), "{name} --help: {}", help.status);
        ensure!(
            text.starts_with(&format!("{name}: ")) && text.lines().count() > 5,
            "{name} --help does not say what it is: {text}"
        );
        for w in words {
            ensure!(text.contains(w), "{name} --help lacks {w}:\n{text}");
        }
        for flag in ["--version", "-V"] {
            let v = Command::new(bin(name)).arg(flag).output()?;
            ensure!(v.status.success(), "{name} {flag}: {}", v.status);
            let got = String::from_utf8_lossy(&v.stdout);
            ensure!(
                got == format!("{name} {}\n", env!("CARGO_PKG_VERSION")),
                "{name} {flag} printed {got:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn ssock_run_as_root_starts_a_system_devd_every_user_can_reach() -> Result<()> {
    // As root with no devd answering, ssock-run starts `devd --system` on
    // /run/ssock/devd.sock. Done in a mount namespace of its own with a
    // fresh /run, so that the host's /run/ssock is not touched.
    if ssock_rings::sys::uid() != 0 {
        eprintln!("SKIP: needs root (ssock-run starts the system devd only as root)");
        return Ok(());
    }
    let probe = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs -o mode=0755 tmpfs /run")
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIP: cannot mount a private /run (unshare -m, mount)");
        return Ok(());
    }
    let m = Marked::new("run-system")?;
    // In the program: the modes of the directory and socket, the socket
    // ssock-run chose, and devd's statistics read by uid 65534.
    let script = r#"stat -c %a /run/ssock /run/ssock/devd.sock
echo "socket $SSOCK_DEVD_SOCKET"
exec env -u LD_PRELOAD setpriv --reuid=65534 --regid=65534 --clear-groups "$RINGSTAT" --json"#;
    let out = m
        .command("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o mode=0755 tmpfs /run && exec "$@""#)
        .arg("sh")
        .arg(bin("ssock-run"))
        .args(["--devd", "auto", "--", "sh", "-c", script])
        .env_remove("SSOCK_DEVD_SOCKET")
        .env("RINGSTAT", bin("ringstat"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{}: {text}\n{err}", out.status);
    let mut lines = text.lines();
    ensure!(
        lines.next() == Some("755") && lines.next() == Some("666"),
        "directory and socket modes: {text}"
    );
    ensure!(
        lines.next() == Some("socket /run/ssock/devd.sock"),
        "socket chosen: {text}"
    );
    let stats: serde_json::Value = serde_json::from_str(&lines.collect::<Vec<_>>().join("\n"))
        .with_context(|| format!("ringstat as uid 65534: {text}\n{err}"))?;
    let pid = stats["devd"]["pid"].as_u64().context("devd pid")?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    ensure!(
        cmdline.split(|&b| b == 0).any(|a| a == b"--system"),
        "devd {pid} is not a system devd: {}",
        String::from_utf8_lossy(&cmdline)
    );
    Ok(())
}
