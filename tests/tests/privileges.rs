//! devd gives up root (`run_as`, docs/threat-model.md): started as root
//! with `--run-as ssock`, every one of its threads serves as that user
//! with no capabilities, and unmodified programs' connections still go
//! through it: Direct on one host (loopback backend), and between the
//! two hosts of the lab over the ntb link. Needs root and the `ssock`
//! user (.ci/run makes it): without them the tests say SKIP, and fail
//! under SSOCK_REQUIRE_APPS=1.

mod common;

use anyhow::{bail, ensure, Context, Result};
use common::*;
use ssock_tests::{bin, have_app, Devd};
use std::process::Command;
use std::time::Duration;

/// The user CI makes for devd.
const USER: &str = "ssock";

/// Whether this test can run: as root, with `USER` on the host.
fn can_run() -> Result<bool> {
    let root = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let missing = if !root {
        "root"
    } else if ids(USER).is_err() {
        "the ssock user (useradd --system ssock)"
    } else {
        return Ok(true);
    };
    if std::env::var_os("SSOCK_REQUIRE_APPS").is_some_and(|v| v == "1") {
        bail!("{missing} is required (SSOCK_REQUIRE_APPS=1)");
    }
    eprintln!("SKIP: this test needs {missing}");
    Ok(false)
}

/// `user`'s uid and gid, as id(1) says.
fn ids(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, user]).output()?;
        ensure!(out.status.success(), "no user {user}");
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// A field of a /proc status text.
fn field<'a>(status: &'a str, key: &str) -> Result<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .with_context(|| format!("no {key} in\n{status}"))
}

/// One in-process echo of 1 MiB each way, every byte checked: a server
/// thread and a client of the same unmodified Python program.
const ECHO: &str = r#"
import socket, threading
N = 1 << 20
data = bytes((i * 131 + 7) & 0xFF for i in range(N))
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
accepted = threading.Event()
def serve():
    c, _ = s.accept()
    accepted.set()
    while True:
        b = c.recv(65536)
        if not b:
            break
        c.sendall(b)
    c.close()
t = threading.Thread(target=serve); t.start()
c = socket.create_connection(s.getsockname())
# Once accepted, the connector's writes go through the region from the
# first byte (before, they may all go on the kernel socket, as the
# hand-over allows).
accepted.wait()
got = bytearray()
sender = threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)))
sender.start()
while len(got) < N:
    b = c.recv(65536)
    if not b:
        break
    got += b
sender.join(); t.join()
assert bytes(got) == data, "echo differs"
print("OK", len(got))
"#;

#[test]
fn a_devd_started_as_root_serves_as_its_user_with_no_capabilities() -> Result<()> {
    if !can_run()? || !have_app("python3")? {
        return Ok(());
    }
    // no_new_privs comes from the switch itself, not only from the
    // seccomp filters (which set it too): a devd without them has it.
    let bare = Devd::start(&["--run-as", USER, "--no-sandbox"])?;
    ensure!(dropped(bare.pid())? >= 2, "devd has one thread");
    drop(bare);
    let d = Devd::start(&["--run-as", USER])?;
    // The control thread and the engine's at least.
    ensure!(dropped(d.pid())? >= 2, "devd has one thread");
    // It serves: an unmodified program's connection goes Direct.
    let out = d.ssock_run("python3").args(["-c", ECHO]).output()?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "OK 1048576",
        "the echo failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // devd counts a Direct connection's bytes when it frees it, between
    // requests once both ends went (the second end, closed by the
    // program's exit, a moment after it).
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let t = loop {
        let t = d.stats()?["totals"].clone();
        if t["bytes"]["direct"].as_u64() >= Some(2 << 20) || std::time::Instant::now() > until {
            break t;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    ensure!(t["connections"]["direct"] == 1, "totals {t}");
    ensure!(t["connections"]["kernel"] == 0, "totals {t}");
    ensure!(t["bytes"]["direct"].as_u64() >= Some(2 << 20), "totals {t}");
    Ok(())
}

#[test]
fn lab_devds_on_the_ntb_link_serve_as_their_user_with_no_capabilities() -> Result<()> {
    if !can_run()? {
        return Ok(());
    }
    let Some(lab) = ready_with("runas", &[("SSOCK_LAB_RUN_AS", USER)])? else {
        return Ok(());
    };
    // Control, engine and peer threads at least.
    for h in 0..2 {
        let pid = u32::try_from(lab.devd_pid(h)?)?;
        ensure!(dropped(pid)? >= 3, "host {h}: devd lacks a thread");
    }
    // A program on host a talks to one on host b through both devds'
    // engines and the window: 64 KiB each way every millisecond until
    // both engines have moved 4 MiB of it (its first bytes go on the
    // kernel socket until the acceptor's claim comes through the peers,
    // which a loaded machine may delay past a short stream's end), then
    // to its end, every byte of the echo checked.
    let before = [totals(&lab, 0)?, totals(&lab, 1)?];
    let mut server = echo_server(&lab, 1, 6300, true)?;
    heard(&lab, 0, 6300)?;
    let flag = lab.dir.join("flag6300").to_string_lossy().into_owned();
    let (py, dst) = (remote_py(), lab.addr[1].clone());
    let mut c = Prog::start(lab.under_ssock(0, &["python3", &py, "steady", &dst, "6300", &flag]))?;
    for (h, before) in before.iter().enumerate() {
        let what = "the bytes did not go through its engine";
        queued_past(
            &lab,
            h,
            queued_bytes(before) + (4 << 20),
            Duration::from_secs(60),
            what,
        )?;
    }
    std::fs::write(&flag, b"")?;
    let line = c.expect(&["OK ", "CORRUPT", "SHORT"], Duration::from_secs(60))?;
    ensure!(line.starts_with("OK "), "{line}\n{}", c.all());
    server.expect(
        &[&format!("ECHOED {}", line["OK ".len()..].trim())],
        Duration::from_secs(10),
    )?;
    for (h, before) in before.iter().enumerate() {
        let t = settled(&lab, h, |t| remote_count(t) > remote_count(before))?;
        ensure!(
            remote_count(&t) == remote_count(before) + 1,
            "host {h}: no remote connection: {t}"
        );
    }
    Ok(())
}

/// Checks that every thread of process `pid` has every id `USER`'s, no
/// supplementary group, no capability in any set, and no_new_privs;
/// returns how many threads it has.
fn dropped(pid: u32) -> Result<usize> {
    let (uid, gid) = ids(USER)?;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))?;
    let mut threads = 0;
    for t in tasks {
        let status = std::fs::read_to_string(t?.path().join("status"))?;
        let name = field(&status, "Name:")?.to_string();
        for key in ["Uid:", "Gid:"] {
            let want = if key == "Uid:" { uid } else { gid };
            let all: Vec<&str> = field(&status, key)?.split_whitespace().collect();
            ensure!(
                all.len() == 4 && all.iter().all(|v| v.parse() == Ok(want)),
                "{name}: {key} {all:?}, not {want}"
            );
        }
        ensure!(field(&status, "Groups:")?.is_empty(), "{name}: groups left");
        for key in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            let v = field(&status, key)?;
            ensure!(u64::from_str_radix(v, 16) == Ok(0), "{name}: {key} {v}");
        }
        ensure!(
            field(&status, "NoNewPrivs:")? == "1",
            "{name}: no_new_privs unset"
        );
        threads += 1;
    }
    Ok(threads)
}

#[test]
fn run_as_a_user_that_is_not_there_stops_devd_with_a_clear_error() -> Result<()> {
    // The look-up comes first: any devd, root or not, says so and stops,
    // before it made its socket.
    let dir = tempdir()?;
    let out = Command::new(bin("devd"))
        .args(["--user", "--socket"])
        .arg(dir.join("devd.sock"))
        .args(["--run-as", "no-such-user-for-ssock"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "devd started: {err}");
    ensure!(
        err.contains("there is no user \"no-such-user-for-ssock\""),
        "{err}"
    );
    ensure!(!dir.join("devd.sock").exists(), "devd left its socket");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A fresh directory of this test's own.
fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("ssock-priv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
