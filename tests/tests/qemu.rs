//! The QEMU lab (`tools/qemu-lab/lab.sh`, issue 14): ssock on Debian's own
//! kernel in a QEMU guest (TCG, an emulated Intel IOMMU). In the guest,
//! devd starts as root with `run_as ssock` and serves with every thread
//! that user's and no capabilities, and sockperf's ping-pong under
//! ssock-run goes Direct (devd's totals in the guest say so, nothing fell
//! back), beside the same ping-pong on the guest's kernel TCP. The lab
//! comes from `lab.sh setup DIR` (.ci/run does it, DIR in
//! `SSOCK_QEMU_LAB`): without it the test says SKIP, and fails under
//! `SSOCK_REQUIRE_APPS=1`.

use anyhow::{bail, ensure, Context, Result};
use std::path::PathBuf;
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tools/qemu-lab/lab.sh"
    ))
}

/// The lab's directory, set up (QEMU and the kernel unpacked), or None.
fn lab() -> Result<Option<PathBuf>> {
    let dir = std::env::var_os("SSOCK_QEMU_LAB").map(PathBuf::from);
    let why = match &dir {
        None => "SSOCK_QEMU_LAB names no lab (tools/qemu-lab/lab.sh setup DIR)".to_string(),
        Some(d) if !d.join("root/usr/bin/qemu-system-x86_64").exists() => {
            format!(
                "{} is not set up (tools/qemu-lab/lab.sh setup)",
                d.display()
            )
        }
        Some(_) => return Ok(dir),
    };
    if std::env::var_os("SSOCK_REQUIRE_APPS").is_some_and(|v| v == "1") {
        bail!("the QEMU lab is required (SSOCK_REQUIRE_APPS=1): {why}");
    }
    eprintln!("SKIP: {why}");
    Ok(None)
}

#[test]
fn in_a_guest_devd_gives_up_root_and_sockperf_goes_direct() -> Result<()> {
    let Some(dir) = lab()? else {
        return Ok(());
    };
    let bin = ssock_tests::bin("devd")
        .parent()
        .context("binary dir")?
        .to_path_buf();
    let out = Command::new("bash")
        .arg(script())
        .arg("build")
        .args([&dir, &bin])
        .output()?;
    ensure!(
        out.status.success(),
        "lab.sh build: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log = dir.join(format!("guest-{}.log", std::process::id()));
    let st = Command::new("bash")
        .arg(script())
        .arg("run")
        .arg(&dir)
        .arg("devd,sockperf")
        .arg(&log)
        .status()?;
    let text = std::fs::read_to_string(&log)?;
    // What the guest saw, in the test's output (the latencies among it).
    for l in text
        .lines()
        .filter(|l| l.starts_with("QL:") || l.starts_with("qemu-lab:"))
    {
        eprintln!("{l}");
    }
    for step in ["devd", "sockperf"] {
        ensure!(
            text.contains(&format!("QL: step {step} rc=0")),
            "step {step} failed in the guest:\n{text}"
        );
    }
    ensure!(st.success(), "the guest did not end well:\n{text}");
    let _ = std::fs::remove_file(&log);
    Ok(())
}
