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
    std::fs::write(
        &cfg,
        text.replace(
            "/run/ssock/devd.sock",
            &dir.join("devd.sock").to_string_lossy(),
        ),
    )?;
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
