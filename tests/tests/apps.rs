//! Real programs from Debian, unmodified, with server and client both under
//! `ssock-run` (issue 3, item 5): redis-server with redis-benchmark, a
//! redis replica and its master, iperf3, sockperf, sshd, git daemon. Each
//! test checks the program's own success output, and through devd's
//! statistics that its connections went Direct (none fell back to kernel
//! TCP) and carried at least the program's own bytes. The asyncio echo
//! server and client are in shim.rs.

use anyhow::{bail, ensure, Context, Result};
use ssock_tests::{free_port, have_app, Devd, Peer};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one client program may run before the test fails.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// `ssock-run --devd SOCKET -- PROGRAM ARGS`.
fn under_ssock(d: &Devd, program: &str, args: &[&str]) -> Result<Command> {
    let mut c = d.ssock_run(program);
    c.args(args);
    Ok(c)
}

/// Runs `cmd` to its end (killed after `RUN_LIMIT`); fails unless it exits
/// with success. Returns stdout followed by stderr.
fn run(cmd: Command) -> Result<String> {
    run_fed(cmd, Stdio::null())
}

/// `run`, with `stdin` as the program's standard input.
fn run_fed(mut cmd: Command, stdin: Stdio) -> Result<String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {desc}"))?;
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    })
    .collect();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > RUN_LIMIT {
            // What each of its threads waits in, then its output: enough to
            // tell a hang of the program from one of the shim.
            let waits = thread_waits(child.id());
            let _ = child.kill();
            let _ = child.wait();
            let out: String = readers
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect();
            bail!("{desc} still running after {RUN_LIMIT:?}; its threads wait in:\n{waits}\nits output:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out: String = readers
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .collect();
    ensure!(status.success(), "{desc} failed ({status}):\n{out}");
    Ok(out)
}

/// One line per thread of process `pid`: its name, state and the kernel
/// function it waits in.
fn thread_waits(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(gone)".into();
    };
    tasks
        .flatten()
        .map(|t| {
            let p = t.path();
            let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            let stat = read("stat");
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_string();
            format!(
                "{} {} {} {}",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                state,
                read("wchan")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until something listens on `port` (read from /proc/net/tcp and
/// tcp6, so that no probe connection is counted by devd), and
/// fails if the server exits first.
fn wait_listening(server: &mut Peer, port: &str) -> Result<()> {
    let hex = format!(":{:04X}", port.parse::<u16>()?);
    let t = Instant::now();
    loop {
        let tab = std::fs::read_to_string("/proc/net/tcp")?
            + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
        let listening = tab.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&hex) && f[3] == "0A"
        });
        if listening {
            return Ok(());
        }
        ensure!(server.alive(), "the server exited before listening");
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "nothing listens on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// devd's totals: (direct connections, kernel fallbacks, Direct bytes).
fn totals(d: &Devd) -> Result<(u64, u64, u64)> {
    let t = d.stats()?["totals"].clone();
    let n = |v: &serde_json::Value| v.as_u64().with_context(|| format!("totals {t}"));
    Ok((
        n(&t["connections"]["direct"])?,
        n(&t["connections"]["kernel"])?,
        n(&t["bytes"]["direct"])?,
    ))
}

/// The "TEST: N requests per second" figures of `redis-benchmark -q`.
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

#[test]
fn redis_benchmark_against_redis_server_goes_direct() -> Result<()> {
    if !have_app("redis-server")? || !have_app("redis-benchmark")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let port = free_port()?.to_string();
    let mut server = Peer::command(under_ssock(
        &d,
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
    )?)?;
    wait_listening(&mut server, &port)?;
    let n = 20_000u64;
    let mut requests = 0;
    for extra in [&["-c", "1"][..], &["-c", "50", "-P", "16"][..]] {
        let mut args = vec!["-p", &port, "-t", "ping,set,get", "-q"];
        let ns = n.to_string();
        args.extend(["-n", &ns]);
        args.extend(extra);
        let out = run(under_ssock(&d, "redis-benchmark", &args)?)?;
        for test in ["PING_INLINE", "PING_MBULK", "SET", "GET"] {
            rps(&out, test)?;
            requests += n;
        }
    }
    let (direct, kernel, bytes) = totals(&d)?;
    // 4 tests with 1 client, 4 with 50, plus redis-benchmark's own
    // CONFIG connections: at least 204, every one Direct.
    ensure!(direct >= 204, "only {direct} Direct connections");
    ensure!(kernel == 0, "{kernel} connections fell back to kernel TCP");
    // The smallest exchange is "PING\r\n" and "+PONG\r\n": 13 bytes.
    ensure!(
        bytes >= 13 * requests,
        "{bytes} bytes over Direct for {requests} requests"
    );
    Ok(())
}

#[test]
fn iperf3_goes_direct_and_carries_its_bytes() -> Result<()> {
    if !have_app("iperf3")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let port = free_port()?.to_string();
    let mut server = Peer::command(under_ssock(&d, "iperf3", &["-s", "-1", "-p", &port])?)?;
    wait_listening(&mut server, &port)?;
    let out = run(under_ssock(
        &d,
        "iperf3",
        &["-c", "127.0.0.1", "-p", &port, "-t", "3", "-J"],
    )?)?;
    let j: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("iperf3 -J output:\n{out}"))?;
    ensure!(j["error"].is_null(), "iperf3 error: {}", j["error"]);
    let received = j["end"]["sum_received"]["bytes"]
        .as_u64()
        .context("sum_received.bytes")?;
    ensure!(received > 0, "iperf3 received nothing");
    ensure!(server.wait_success()?, "iperf3 server failed");
    let (direct, kernel, bytes) = totals(&d)?;
    // The control connection and the data stream.
    ensure!(direct >= 2, "only {direct} Direct connections");
    ensure!(kernel == 0, "{kernel} connections fell back to kernel TCP");
    ensure!(
        bytes >= received,
        "{bytes} bytes over Direct, iperf3 received {received}"
    );
    Ok(())
}

/// The 64 hex digits of key `i`'s value (splitmix64: the RDB's LZF
/// compression gains nothing on them).
fn redis_value(i: u64) -> String {
    (0..4u64)
        .map(|k| {
            let mut z = (i * 4 + k)
                .wrapping_add(1)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            format!("{:016x}", z ^ (z >> 31))
        })
        .collect()
}

/// Redis replication, both servers under ssock-run: the replica's full
/// sync (the master's diskless RDB, which a forked child makes) and then
/// the stream of the master's writes, over one Direct connection that
/// stays open; afterwards both datasets have the same DEBUG DIGEST, and
/// every connection was Direct.
#[test]
fn redis_replica_syncs_from_its_master_and_follows_its_writes_over_direct() -> Result<()> {
    if !have_app("redis-server")? || !have_app("redis-cli")? {
        return Ok(());
    }
    let dir = TempDir::new("redis-replication")?;
    let d = Devd::start(&[])?;
    let server = |port: &str, sub: &str, extra: &[&str]| -> Result<Peer> {
        let data = dir.0.join(sub);
        std::fs::create_dir_all(&data)?;
        let data = data.display().to_string();
        let mut args = vec![
            "--port",
            port,
            "--bind",
            "127.0.0.1",
            "--dir",
            &data,
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
        ];
        args.extend(extra);
        let mut p = Peer::command(under_ssock(&d, "redis-server", &args)?)?;
        wait_listening(&mut p, port)?;
        Ok(p)
    };
    let cli = |port: &str, args: &[&str]| -> Result<String> {
        let mut a = vec!["-p", port];
        a.extend(args);
        run(under_ssock(&d, "redis-cli", &a)?)
    };
    // SET commands for keys `from..to`, through redis-cli --pipe.
    let load = |port: &str, from: u64, to: u64| -> Result<()> {
        let file = dir.0.join(format!("load-{from}"));
        let text: String = (from..to)
            .map(|i| format!("SET key:{i} {}\r\n", redis_value(i)))
            .collect();
        std::fs::write(&file, text)?;
        let out = run_fed(
            under_ssock(&d, "redis-cli", &["-p", port, "--pipe"])?,
            Stdio::from(std::fs::File::open(&file)?),
        )?;
        let want = format!("errors: 0, replies: {}", to - from);
        ensure!(out.contains(&want), "redis-cli --pipe said:\n{out}");
        Ok(())
    };
    // Waits until the replica has `keys` keys, its link up and no sync
    // under way.
    let caught_up = |port: &str, keys: u64| -> Result<()> {
        let t = Instant::now();
        loop {
            let info = cli(port, &["INFO", "replication"])?;
            let size = cli(port, &["DBSIZE"])?;
            if info.contains("master_link_status:up")
                && info.contains("master_sync_in_progress:0")
                && size.trim() == keys.to_string()
            {
                return Ok(());
            }
            ensure!(
                t.elapsed() < Duration::from_secs(60),
                "the replica did not catch up ({} keys of {keys}):\n{info}",
                size.trim()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let master_port = free_port()?.to_string();
    let mut master = server(
        &master_port,
        "master",
        &[
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ],
    )?;
    let keys = 40_000u64;
    load(&master_port, 0, keys)?;
    let replica_port = free_port()?.to_string();
    let mut replica = server(
        &replica_port,
        "replica",
        &["--replicaof", "127.0.0.1", &master_port],
    )?;
    caught_up(&replica_port, keys)?;
    // The master's writes after the sync reach the replica through the
    // replication stream.
    load(&master_port, keys, keys + 2_000)?;
    caught_up(&replica_port, keys + 2_000)?;
    let digest =
        |port: &str| -> Result<String> { Ok(cli(port, &["DEBUG", "DIGEST"])?.trim().to_string()) };
    let (m, r) = (digest(&master_port)?, digest(&replica_port)?);
    ensure!(
        m == r && m.len() == 40 && m.bytes().any(|b| b != b'0'),
        "master digest {m}, replica digest {r}"
    );
    // The replication link: the replica's connection to the master, open,
    // Direct, and it carried at least the values of the full sync.
    let stats = d.stats()?;
    let master_addr = format!("127.0.0.1:{master_port}");
    let conns = stats["connections"].as_array().context("connections")?;
    let link = conns
        .iter()
        .find(|c| c["remote"] == master_addr.as_str() && c["state"] == "open")
        .with_context(|| format!("no open connection to the master in {conns:?}"))?;
    ensure!(
        link["mode"] == "direct",
        "the replication link is {}",
        link["mode"]
    );
    let carried = link["bytes_a2c"].as_u64().context("bytes_a2c")?;
    ensure!(
        carried >= keys * 64,
        "the replication link carried {carried} bytes for {keys} values of 64 bytes"
    );
    let (direct, kernel, _) = totals(&d)?;
    ensure!(kernel == 0, "{kernel} connections fell back to kernel TCP");
    ensure!(direct >= 2, "only {direct} Direct connections");
    replica.kill();
    master.kill();
    Ok(())
}

/// A sockperf server under ssock-run on a free port, listening; and the port.
fn sockperf_server(d: &Devd) -> Result<(Peer, String)> {
    let port = free_port()?.to_string();
    let mut server = Peer::command(under_ssock(
        d,
        "sockperf",
        &["server", "--tcp", "-i", "127.0.0.1", "-p", &port],
    )?)?;
    wait_listening(&mut server, &port)?;
    Ok((server, port))
}

#[test]
fn sockperf_tcp_ping_pong_goes_direct() -> Result<()> {
    if !have_app("sockperf")? {
        return Ok(());
    }
    let d = Devd::start(&[])?;
    let (_server, port) = sockperf_server(&d)?;
    // sockperf sizes its table of samples from --mps (its own default
    // stops at 600,000 round trips a second, below what Direct does).
    let out = run(under_ssock(
        &d,
        "sockperf",
        &[
            "ping-pong",
            "--tcp",
            "-i",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "2",
            "-m",
            "14",
            "--mps",
            "1500000",
        ],
    )?)?;
    ensure!(
        out.contains("Summary: Latency is"),
        "no sockperf summary:\n{out}"
    );
    ensure!(
        out.contains(
            "# dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0"
        ),
        "sockperf saw loss or reordering:\n{out}"
    );
    // "[Total Run] ... ReceivedMessages=N": the replies the client got.
    let observations: u64 = out
        .split("ReceivedMessages=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no message count in:\n{out}"))?;
    ensure!(observations > 0);
    let (direct, kernel, bytes) = totals(&d)?;
    ensure!(direct >= 1, "no Direct connection");
    ensure!(kernel == 0, "{kernel} connections fell back to kernel TCP");
    // Each observation is a 14-byte message and its 14-byte reply.
    ensure!(
        bytes >= 28 * observations,
        "{bytes} bytes over Direct for {observations} round trips"
    );
    Ok(())
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

/// A directory of the test's own, removed at the end.
struct TempDir(std::path::PathBuf);

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

/// OpenSSH's sshd, started as a user starts it (it re-execs itself per
/// connection, closes every fd it does not know with close_range, and its
/// privilege-separated child runs under a seccomp filter with a file limit
/// of 1 while it talks to the client): `ssh HOST echo ok` and scp of 10 MiB
/// with a checksum. sshd re-execs itself with each connection on fds 0 and
/// 1, where stdio could reach it: by default the connection leaves the
/// region there (counted `stdio`) and the copy crosses kernel TCP; with
/// `SSOCK_STD_FDS=accelerate` (sshd moves the socket off them before it
/// uses it) every connection and the copy's bytes are Direct.
#[test]
fn sshd_serves_ssh_and_scp_direct() -> Result<()> {
    if !have_app("ssh")? || !have_app("scp")? || !have_app("ssh-keygen")? {
        return Ok(());
    }
    let sshd = std::path::Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        return skip_unless_required("/usr/sbin/sshd is not installed");
    }
    // sshd's privilege separation needs root.
    if std::fs::metadata("/proc/self")?.uid() != 0 {
        return skip_unless_required("sshd needs root");
    }
    std::fs::create_dir_all("/run/sshd")?;
    let dir = TempDir::new("sshd")?;
    let p = |n: &str| dir.0.join(n).display().to_string();
    for key in ["hostkey", "userkey"] {
        run({
            let mut c = Command::new("ssh-keygen");
            c.args(["-q", "-t", "ed25519", "-N", "", "-f", &p(key)]);
            c
        })?;
    }
    let port = free_port()?.to_string();
    std::fs::write(
        p("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n\
             PidFile {}\nSubsystem sftp /usr/lib/openssh/sftp-server\n",
            p("hostkey"),
            p("userkey.pub"),
            p("sshd.pid")
        ),
    )?;
    for trusted in [false, true] {
        let d = Devd::start(&[])?;
        let mut cmd = under_ssock(&d, "/usr/sbin/sshd", &["-D", "-e", "-f", &p("sshd_config")])?;
        if trusted {
            cmd.env("SSOCK_STD_FDS", "accelerate");
        }
        let mut server = Peer::command(cmd)?;
        wait_listening(&mut server, &port)?;
        ssh_and_scp(&d, &port, &p)?;
        let (direct, kernel, bytes) = totals(&d)?;
        let stdio = d.stats()?["totals"]["fallbacks"]["stdio"].clone();
        ensure!(direct >= 2, "only {direct} Direct connections");
        ensure!(kernel == 0, "{kernel} connections fell back to kernel TCP");
        if trusted {
            ensure!(stdio == 0, "{stdio} connections left for stdio");
            ensure!(
                bytes >= 10 << 20,
                "{bytes} bytes over Direct for a 10 MiB copy"
            );
        } else {
            ensure!(
                stdio == direct,
                "{stdio} of {direct} connections left for stdio"
            );
        }
        d.wait_none_live(Duration::from_secs(10))?;
        server.kill();
    }
    Ok(())
}

/// `ssh root@127.0.0.1 echo ok` and an scp of 10 MiB to sshd on `port`
/// (`p`: a file of the test's directory), both checked.
fn ssh_and_scp(d: &Devd, port: &str, p: &dyn Fn(&str) -> String) -> Result<()> {
    let client_opts = |c: &mut Command| {
        c.args(["-i", &p("userkey"), "-o", "BatchMode=yes"]);
        c.args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ]);
    };
    let mut ssh = under_ssock(d, "ssh", &["-p", port])?;
    client_opts(&mut ssh);
    ssh.args(["root@127.0.0.1", "echo", "ok"]);
    let out = run(ssh)?;
    ensure!(
        out.lines().next() == Some("ok"),
        "ssh echo ok printed:\n{out}"
    );
    let mut payload = vec![0u8; 10 << 20];
    ssock_tools::pattern::Pattern::new(7).fill(0, &mut payload);
    std::fs::write(p("payload"), &payload)?;
    let mut scp = under_ssock(d, "scp", &["-P", port])?;
    client_opts(&mut scp);
    scp.args([p("payload"), format!("root@127.0.0.1:{}", p("copy"))]);
    run(scp)?;
    ensure!(
        std::fs::read(p("copy"))? == payload,
        "scp's copy differs from the 10 MiB it sent"
    );
    std::fs::remove_file(p("copy"))?;
    Ok(())
}

/// git's own server: per connection, git daemon execs `git daemon --serve`
/// with the socket on fds 0 and 1, which execs `git upload-pack`, which
/// writes its answer through stdio (bytes the shim never saw: the client
/// took them for stray ones and reset the connection). Three clones under
/// ssock-run, each with the repository's commit and file; each connection
/// paired is Direct until its socket lands on fd 0 and leaves the region
/// there (counted `stdio`).
#[test]
fn git_daemon_serves_clones_whose_connections_leave_the_region_for_stdio() -> Result<()> {
    if !have_app("git")? {
        return Ok(());
    }
    let dir = TempDir::new("git")?;
    let base = dir.0.display().to_string();
    let repo = format!("{base}/repo");
    let git = |args: &[&str]| -> Result<String> {
        let mut c = Command::new("git");
        c.args(["-c", "user.name=ssock", "-c", "user.email=ssock@localhost"]);
        c.args(args);
        run(c)
    };
    git(&["init", "-q", &repo])?;
    std::fs::write(format!("{repo}/file"), "the file's bytes\n")?;
    git(&["-C", &repo, "add", "file"])?;
    git(&["-C", &repo, "commit", "-q", "-m", "one"])?;
    let head = git(&["-C", &repo, "rev-parse", "HEAD"])?;
    // git-daemon itself, not `git daemon` (whose git would leave it
    // behind when killed).
    let exec_path = git(&["--exec-path"])?;
    let daemon = format!("{}/git-daemon", exec_path.trim());
    let d = Devd::start(&[])?;
    let port = free_port()?.to_string();
    let mut server = Peer::command(under_ssock(
        &d,
        &daemon,
        &[
            "--reuseaddr",
            "--listen=127.0.0.1",
            &format!("--port={port}"),
            &format!("--base-path={base}"),
            "--export-all",
            &base,
        ],
    )?)?;
    wait_listening(&mut server, &port)?;
    for i in 0..3 {
        let clone = format!("{base}/clone{i}");
        run(under_ssock(
            &d,
            "git",
            &[
                "clone",
                "-q",
                &format!("git://127.0.0.1:{port}/repo"),
                &clone,
            ],
        )?)?;
        ensure!(
            git(&["-C", &clone, "rev-parse", "HEAD"])? == head,
            "clone {i} has another commit"
        );
        ensure!(std::fs::read_to_string(format!("{clone}/file"))? == "the file's bytes\n");
    }
    let (direct, kernel, _) = totals(&d)?;
    let stdio = d.stats()?["totals"]["fallbacks"]["stdio"].clone();
    // (devd's short_lived policy may keep a connection of a listener
    // whose connections were short on kernel TCP.)
    ensure!(
        direct >= 1 && direct + kernel == 3,
        "{direct} Direct, {kernel} kernel"
    );
    ensure!(
        stdio == direct,
        "{stdio} of {direct} Direct connections left for stdio"
    );
    server.kill();
    Ok(())
}

/// A server under ssock-run whose devd died and was started again serves
/// a plain client (sockperf, not under ssock) as the kernel would: its
/// Claim, sent to the dead devd, fails inside the shim, and that failure
/// must not show through the accept that succeeded (sockperf reads errno
/// after calls that succeeded, and closed the connection on the EPIPE the
/// shim's own failed send left there).
#[test]
fn sockperf_server_whose_devd_was_started_again_serves_a_plain_client() -> Result<()> {
    if !have_app("sockperf")? {
        return Ok(());
    }
    let mut d = Devd::start(&[])?;
    let (_server, port) = sockperf_server(&d)?;
    d.kill();
    let _d2 = Devd::start_at(&d.socket, &[])?;
    let mut client = Command::new("sockperf");
    client.args([
        "ping-pong",
        "--tcp",
        "-i",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        "1",
    ]);
    let out = run(client)?;
    ensure!(
        out.contains("Summary: Latency is") && !out.contains("ERROR"),
        "the plain client should be served:\n{out}"
    );
    Ok(())
}
