//! The install path (issue 10, item 9): `make install` into a fresh prefix,
//! and the Debian package from `packaging/build-deb.sh`, each checked for
//! its layout (every file the systemd unit names is there) and then used
//! as a user would: that install's devd, its ssock-run (which must load
//! that install's libssock.so) and its ringstat, with redis-server and
//! redis-benchmark, every connection Direct in devd's statistics. Both
//! install the binaries the tests already built (`make install
//! PROFILE=...`), and nothing outside the test's own directory (no
//! `dpkg -i`).

use anyhow::{bail, ensure, Context, Result};
use ssock_tests::{bin, free_port, have_app, Devd, Peer};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one program (make, build-deb.sh, redis-benchmark) may run.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// redis-benchmark's requests per test, its clients, and its tests.
const REQUESTS: u64 = 5_000;
const CLIENTS: u64 = 4;
const REDIS_TESTS: [&str; 4] = ["PING_INLINE", "PING_MBULK", "SET", "GET"];

/// The binaries installed in a `bin` directory.
const BINS: [&str; 5] = [
    "devd",
    "ssock-run",
    "ringstat",
    "ssock-bench",
    "ssock-ivshmem-server",
];

/// The documents installed (the unit's Documentation= is operations.md).
const DOCS: [&str; 6] = [
    "README.md",
    "operations.md",
    "config.md",
    "ringstat.md",
    "protocol.md",
    "threat-model.md",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds tests/")
        .to_path_buf()
}

/// The binaries this test run built (`bin` builds them once):
/// (CARGO_TARGET_DIR, profile directory name) for `make install`.
fn built() -> Result<(PathBuf, String)> {
    for f in BINS.iter().chain(&["libssock.so"]) {
        bin(f);
    }
    let dir = bin("devd")
        .parent()
        .context("devd's directory")?
        .to_path_buf();
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("profile directory")?
        .to_string();
    let target = dir.parent().context("target directory")?.to_path_buf();
    Ok((target, profile))
}

/// A directory of the test's own, fresh, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Result<TempDir> {
        let d = std::env::temp_dir().join(format!("ssock-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(TempDir(d))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` to its end (killed after `RUN_LIMIT`); fails unless it exits
/// with success. Returns (stdout, stderr).
fn run(mut cmd: Command) -> Result<(String, String)> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {desc}"))?;
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read(child.stdout.take().map(|o| Box::new(o) as _));
    let err = read(child.stderr.take().map(|e| Box::new(e) as _));
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{desc} still running after {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    ensure!(status.success(), "{desc} failed ({status}):\n{out}\n{err}");
    Ok((out, err))
}

/// `make -C WORKSPACE ARGS...`, installing from the binaries already built.
fn make(args: &[String]) -> Result<String> {
    let mut c = Command::new("make");
    c.arg("--no-print-directory")
        .arg("-C")
        .arg(workspace())
        .args(args)
        .env_remove("BUILD_DIR")
        .env_remove("DESTDIR");
    Ok(run(c)?.0)
}

/// The "TEST: N requests per second" figure of `redis-benchmark -q`.
fn rps(out: &str, test: &str) -> Result<f64> {
    // -q rewrites a progress line with \r; the final figure follows the last one.
    let line = out
        .split(['\r', '\n'])
        .rfind(|l| l.starts_with(&format!("{test}: ")) && l.contains("requests per second"))
        .with_context(|| format!("no {test} result in:\n{out}"))?;
    let v = line
        .split_whitespace()
        .nth(1)
        .context("format")?
        .parse::<f64>()?;
    ensure!(v > 0.0, "{line}");
    Ok(v)
}

/// The files the unit names: ExecStart's program, its `--config` file, and
/// every `file://` document of Documentation=.
fn unit_paths(unit: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(unit)?;
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .with_context(|| format!("no {key} in {}", unit.display()))
    };
    let exec: Vec<&str> = value("ExecStart=")?.split_whitespace().collect();
    let mut paths = vec![PathBuf::from(exec.first().context("empty ExecStart")?)];
    let config = exec
        .windows(2)
        .find(|w| w[0] == "--config")
        .context("ExecStart has no --config")?[1];
    paths.push(PathBuf::from(config));
    let docs: Vec<PathBuf> = value("Documentation=")?
        .split_whitespace()
        .filter_map(|u| u.strip_prefix("file://"))
        .map(PathBuf::from)
        .collect();
    ensure!(!docs.is_empty(), "Documentation= names no file:// document");
    paths.extend(docs);
    Ok(paths)
}

/// Checks that `root/p` is a regular file for each `p`, executable for
/// the binaries.
fn check_files(root: &Path, files: &[String]) -> Result<()> {
    for f in files {
        let p = root.join(f);
        let m = std::fs::metadata(&p).with_context(|| format!("{} is missing", p.display()))?;
        ensure!(m.is_file(), "{} is not a file", p.display());
        if f.contains("/bin/") || f.starts_with("bin/") {
            ensure!(
                m.permissions().mode() & 0o111 == 0o111,
                "{} is not executable",
                p.display()
            );
        }
    }
    Ok(())
}

/// Runs redis-server and redis-benchmark, each under `BIN/ssock-run
/// --devd SOCKET` of an installed tree with `BIN/devd` serving SOCKET,
/// and checks with `BIN/ringstat` that every connection went Direct,
/// carried the requests' bytes, and is gone at the end; and that the
/// server loaded `shim` (the libssock.so that ssock-run found there).
fn redis_pair_goes_direct(bindir: &Path, shim: &Path, dir: &Path) -> Result<()> {
    let socket = dir.join("devd").join("devd.sock");
    let devd = Devd::start_binary(&bindir.join("devd"), &socket, &[])?;
    let exe = std::fs::read_link(format!("/proc/{}/exe", devd.pid()))?;
    ensure!(
        exe == std::fs::canonicalize(bindir.join("devd"))?,
        "devd runs {}",
        exe.display()
    );
    let ssock_run = |program: &str, args: &[&str]| {
        let mut c = Command::new(bindir.join("ssock-run"));
        c.arg("--devd")
            .arg(&devd.socket)
            .arg("--")
            .arg(program)
            .args(args)
            .env_remove("LD_PRELOAD")
            .env_remove("SSOCK_DEVD_SOCKET");
        c
    };
    let port = free_port()?.to_string();
    let mut server = Peer::command(ssock_run(
        "redis-server",
        &[
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    ))?;
    // The shim in redis-server registers its listener with devd at listen().
    let t = Instant::now();
    while ssock_tests::stats(&devd.socket)?["devd"]["listeners"] != 1 {
        ensure!(server.alive(), "redis-server exited before listening");
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "redis-server registered no listener with devd"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", server.pid()))?;
    let want = std::fs::canonicalize(shim)?;
    ensure!(
        maps.lines().any(|l| l.ends_with(&*want.to_string_lossy())),
        "redis-server did not load {}",
        want.display()
    );

    let (n, c) = (REQUESTS.to_string(), CLIENTS.to_string());
    let (out, err) = run(ssock_run(
        "redis-benchmark",
        &["-p", &port, "-t", "ping,set,get", "-q", "-n", &n, "-c", &c],
    ))?;
    for test in REDIS_TESTS {
        rps(&format!("{out}\n{err}"), test)?;
    }

    let ringstat = || -> Result<serde_json::Value> {
        let mut c = Command::new(bindir.join("ringstat"));
        c.arg("--json").env("SSOCK_DEVD_SOCKET", &devd.socket);
        Ok(serde_json::from_str(&run(c)?.0)?)
    };
    // The programs' last closes reach devd asynchronously.
    let t = Instant::now();
    let v = loop {
        let v = ringstat()?;
        if v["devd"]["live_connections"] == 0 {
            break v;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "connections still live in devd: {}",
            v["devd"]
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        v["devd"]["pid"] == devd.pid(),
        "ringstat asked another devd: {}",
        v["devd"]
    );
    let t = &v["totals"];
    let count = |key: &str| {
        t.pointer(key)
            .and_then(|x| x.as_u64())
            .context(key.to_string())
    };
    // Each test's clients, plus redis-benchmark's CONFIG connection.
    let tests = REDIS_TESTS.len() as u64;
    let direct = count("/connections/direct")?;
    ensure!(
        direct >= tests * CLIENTS,
        "only {direct} Direct connections: {t}"
    );
    ensure!(
        count("/connections/kernel")? == 0,
        "connections fell back to kernel TCP: {t}"
    );
    let fallbacks = t["fallbacks"].as_object().context("fallbacks")?;
    ensure!(
        !fallbacks.is_empty() && fallbacks.values().all(|x| x == 0),
        "fallbacks: {t}"
    );
    // The smallest exchange is "PING\r\n" and "+PONG\r\n": 13 bytes.
    let bytes = count("/bytes/direct")?;
    ensure!(
        bytes >= 13 * REQUESTS * tests,
        "{bytes} bytes over Direct for {} requests",
        REQUESTS * tests
    );
    Ok(())
}

#[test]
fn make_install_into_a_fresh_prefix_runs_redis_direct() -> Result<()> {
    if !have_app("make")? || !have_app("redis-server")? || !have_app("redis-benchmark")? {
        return Ok(());
    }
    let (target, profile) = built()?;
    let tmp = TempDir::new("install")?;
    let prefix = tmp.0.join("prefix");
    let vars = [
        format!("PREFIX={}", prefix.display()),
        format!("PROFILE={profile}"),
        format!("CARGO_TARGET_DIR={}", target.display()),
    ];
    let args = |target: &str| -> Vec<String> {
        std::iter::once(target.to_string())
            .chain(vars.iter().cloned())
            .collect()
    };
    make(&args("install"))?;

    let mut files: Vec<String> = BINS.iter().map(|b| format!("bin/{b}")).collect();
    files.extend(
        [
            "lib/ssock/libssock.so",
            "lib/systemd/system/ssock-devd.service",
            "etc/ssock/devd.toml",
            "share/doc/ssock/examples/devd.toml",
        ]
        .map(String::from),
    );
    files.extend(DOCS.iter().map(|d| format!("share/doc/ssock/{d}")));
    check_files(&prefix, &files)?;
    // The unit runs this prefix's devd with its config, and names its docs.
    let named = unit_paths(&prefix.join("lib/systemd/system/ssock-devd.service"))?;
    let want = [
        "bin/devd",
        "etc/ssock/devd.toml",
        "share/doc/ssock/operations.md",
    ]
    .map(|p| prefix.join(p));
    ensure!(named == want, "the unit names {named:?}");

    redis_pair_goes_direct(
        &prefix.join("bin"),
        &prefix.join("lib/ssock/libssock.so"),
        &tmp.0,
    )?;

    // A second install keeps the config; uninstall removes everything else.
    std::fs::write(prefix.join("etc/ssock/devd.toml"), "# edited\n")?;
    make(&args("install"))?;
    ensure!(std::fs::read_to_string(prefix.join("etc/ssock/devd.toml"))? == "# edited\n");
    make(&args("uninstall"))?;
    let left = walk(&prefix)?;
    ensure!(
        left == [prefix.join("etc/ssock/devd.toml")],
        "left after uninstall: {left:?}"
    );
    Ok(())
}

/// The files (not directories) under `dir`.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            files.extend(walk(&p)?);
        } else {
            files.push(p);
        }
    }
    Ok(files)
}

#[test]
fn debian_package_has_the_layout_and_runs_redis_direct() -> Result<()> {
    for app in [
        "make",
        "dpkg-deb",
        "dpkg-shlibdeps",
        "strip",
        "redis-server",
        "redis-benchmark",
    ] {
        if !have_app(app)? {
            return Ok(());
        }
    }
    let (target, profile) = built()?;
    let tmp = TempDir::new("deb")?;
    let mut c = Command::new(workspace().join("packaging/build-deb.sh"));
    c.arg(tmp.0.join("out"))
        .env("PROFILE", &profile)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("BUILD_DIR");
    let (out, _) = run(c)?;
    let deb = PathBuf::from(out.lines().last().context("build-deb.sh printed nothing")?);
    let (arch, _) = run({
        let mut c = Command::new("dpkg");
        c.arg("--print-architecture");
        c
    })?;
    let version = env!("CARGO_PKG_VERSION");
    ensure!(
        deb == tmp
            .0
            .join("out")
            .join(format!("ssock_{version}_{}.deb", arch.trim())),
        "the package is {}",
        deb.display()
    );
    let dpkg_deb = |args: &[&str]| -> Result<String> {
        let mut c = Command::new("dpkg-deb");
        c.args(args);
        Ok(run(c)?.0)
    };
    let deb_s = deb.to_str().context("utf8 path")?;

    // Control fields, the conffile and the maintainer scripts.
    let fields = dpkg_deb(&["-f", deb_s, "Package", "Version", "Architecture", "Depends"])?;
    for want in [
        "Package: ssock".to_string(),
        format!("Version: {version}"),
        format!("Architecture: {}", arch.trim()),
    ] {
        ensure!(
            fields.lines().any(|l| l == want),
            "no {want:?} in\n{fields}"
        );
    }
    ensure!(fields.contains("libc6"), "Depends: {fields}");
    ensure!(fields.contains("adduser"), "Depends: {fields}");
    let conffiles = dpkg_deb(&["--info", deb_s, "conffiles"])?;
    ensure!(
        conffiles.lines().collect::<Vec<_>>() == ["/etc/ssock/devd.toml"],
        "conffiles: {conffiles}"
    );
    let control = tmp.0.join("control");
    dpkg_deb(&["-e", deb_s, control.to_str().context("utf8 path")?])?;
    for script in ["postinst", "prerm", "postrm"] {
        let mut c = Command::new("sh");
        c.arg("-n").arg(control.join(script));
        run(c)?;
    }

    // Every file the package must hold, owned by root.
    let mut files: Vec<String> = BINS.iter().map(|b| format!("usr/bin/{b}")).collect();
    files.extend(
        [
            "usr/lib/ssock/libssock.so",
            "usr/lib/systemd/system/ssock-devd.service",
            "etc/ssock/devd.toml",
            "usr/share/doc/ssock/examples/devd.toml",
            "usr/share/doc/ssock/copyright",
            "usr/share/doc/ssock/changelog.gz",
        ]
        .map(String::from),
    );
    files.extend(DOCS.iter().map(|d| format!("usr/share/doc/ssock/{d}")));
    let contents = dpkg_deb(&["--contents", deb_s])?;
    for f in &files {
        let line = contents
            .lines()
            .find(|l| l.ends_with(&format!(" ./{f}")))
            .with_context(|| format!("{f} is not in the package:\n{contents}"))?;
        let cols: Vec<&str> = line.split_whitespace().collect();
        ensure!(cols.get(1) == Some(&"root/root"), "{line}");
        ensure!(cols[0].starts_with("-rw"), "{line}");
    }

    // Unpacked (not installed), it works from where it lies.
    let root = tmp.0.join("root");
    dpkg_deb(&["-x", deb_s, root.to_str().context("utf8 path")?])?;
    check_files(&root, &files)?;
    let named = unit_paths(&root.join("usr/lib/systemd/system/ssock-devd.service"))?;
    let want = [
        "/usr/bin/devd",
        "/etc/ssock/devd.toml",
        "/usr/share/doc/ssock/operations.md",
    ]
    .map(PathBuf::from);
    ensure!(named == want, "the unit names {named:?}");

    redis_pair_goes_direct(
        &root.join("usr/bin"),
        &root.join("usr/lib/ssock/libssock.so"),
        &tmp.0,
    )
}
