//! The QEMU lab (`tools/qemu-lab/lab.sh`, issue 14): ssock on Debian's own
//! kernel in a QEMU guest (TCG, an emulated Intel IOMMU). In the guest,
//! devd starts as root with `run_as ssock` and serves with every thread
//! that user's and no capabilities, and sockperf's ping-pong under
//! ssock-run goes Direct (devd's totals in the guest say so, nothing fell
//! back), beside the same ping-pong on the guest's kernel TCP. Two guests
//! joined by an emulated wire: their devds (root, `run_as ssock`) become
//! authenticated peers over it, and sockperf crosses it on kernel TCP and
//! under ssock-run (no ntb link between them: kernel TCP again); then each
//! binds the ivshmem-doorbell device they share to vfio-pci, their devds
//! take it as their ntb link's window through VFIO (`ntb::VfioWindow`),
//! and sockperf under ssock-run crosses that link as a remote Queued
//! connection, counted by both devds; then 64 MiB each way with socat
//! under ssock-run, checked byte for byte, through both engines; then
//! both devds stop with status 0. In one guest with a soft-RoCE device
//! (rdma_rxe), two queue pairs of the verbs backend's handles RDMA-write
//! into each other's region and ring with the immediate. The
//! lab comes from `lab.sh setup DIR` (.ci/run does it, DIR in
//! `SSOCK_QEMU_LAB`): without it the tests say SKIP, and fail under
//! `SSOCK_REQUIRE_APPS=1`. The guests run one test at a time.

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One test's guests at a time (TCG guests share this host's CPUs).
static GUESTS: Mutex<()> = Mutex::new(());

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

/// The hwbackends crate's unit tests, built as this test is (debug or
/// release): their binary, for the guest's verbs step.
fn hwbackends_tests() -> Result<PathBuf> {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.args([
        "test",
        "-p",
        "ssock-hwbackends",
        "--lib",
        "--no-run",
        "--message-format=json",
    ]);
    if !cfg!(debug_assertions) {
        c.arg("--release");
    }
    let out = c.output()?;
    ensure!(
        out.status.success(),
        "cargo test --no-run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("no hwbackends test binary")
}

/// The initramfs from the tests' binaries (`lab.sh build`).
fn build(dir: &Path) -> Result<()> {
    let bin = ssock_tests::bin("devd")
        .parent()
        .context("binary dir")?
        .to_path_buf();
    let out = Command::new("bash")
        .arg(script())
        .arg("build")
        .args([dir, &bin, &hwbackends_tests()?])
        .output()?;
    ensure!(
        out.status.success(),
        "lab.sh build: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `lab.sh WHAT DIR STEPS LOGS...`: the guests' verdict.
fn lab_sh(what: &str, dir: &Path, steps: &str, logs: &[&Path]) -> Result<std::process::ExitStatus> {
    Ok(Command::new("bash")
        .arg(script())
        .arg(what)
        .arg(dir)
        .arg(steps)
        .args(logs)
        .status()?)
}

/// A guest's console, its `QL:` lines echoed into the test's output (the
/// figures among them); fails unless every one of `steps` passed there.
fn passed(log: &Path, steps: &[&str]) -> Result<String> {
    let text = std::fs::read_to_string(log)?;
    for l in text
        .lines()
        .filter(|l| l.starts_with("QL:") || l.starts_with("qemu-lab:"))
    {
        eprintln!("{l}");
    }
    for step in steps {
        ensure!(
            text.contains(&format!("QL: step {step} rc=0")),
            "step {step} failed in the guest:\n{text}"
        );
    }
    ensure!(
        text.contains("QL: done ok"),
        "the guest did not end well:\n{text}"
    );
    Ok(text)
}

/// One guest through `lab.sh run` with these steps, its log
/// (`<name>-<pid>.log`) showing every step passed; kept only when
/// something failed.
fn guest_test(name: &str, steps: &[&str]) -> Result<()> {
    let Some(dir) = lab()? else {
        return Ok(());
    };
    let _one = GUESTS.lock().unwrap_or_else(|p| p.into_inner());
    build(&dir)?;
    let log = dir.join(format!("{name}-{}.log", std::process::id()));
    let st = lab_sh("run", &dir, &steps.join(","), &[&log])?;
    passed(&log, steps)?;
    ensure!(st.success(), "lab.sh run: {st}");
    let _ = std::fs::remove_file(&log);
    Ok(())
}

/// Two guests through `lab.sh pair` with these steps, each guest's log
/// (`<name>-a`, `<name>-b`) showing every step passed; the logs are kept
/// only when something failed.
fn pair_test(name: &str, steps: &[&str]) -> Result<()> {
    let Some(dir) = lab()? else {
        return Ok(());
    };
    let _one = GUESTS.lock().unwrap_or_else(|p| p.into_inner());
    build(&dir)?;
    let logs = ["a", "b"].map(|h| dir.join(format!("{name}-{h}-{}.log", std::process::id())));
    let st = lab_sh("pair", &dir, &steps.join(","), &[&logs[0], &logs[1]])?;
    for log in &logs {
        passed(log, steps)?;
    }
    ensure!(st.success(), "lab.sh pair: {st}");
    for log in &logs {
        let _ = std::fs::remove_file(log);
    }
    Ok(())
}

#[test]
fn in_a_guest_devd_gives_up_root_and_sockperf_goes_direct() -> Result<()> {
    guest_test("guest", &["devd", "sockperf"])
}

#[test]
fn in_a_guest_two_queue_pairs_on_soft_roce_write_into_each_others_region_and_ring() -> Result<()> {
    // The verbs backend's handles (hwbackends::verbs) on the guest
    // kernel's rdma_rxe device, through libibverbs loaded at run time:
    // the hwbackends unit tests that need a device, run there.
    guest_test("verbs", &["verbs"])
}

#[test]
fn two_guests_devds_become_peers_over_their_wire_and_sockperf_crosses_it() -> Result<()> {
    // Then each binds its ivshmem-doorbell device (the window the host's
    // ssock-ivshmem-server hands both) to vfio-pci behind the IOMMU, and
    // their devds, on it through VFIO, bring their ntb link up and carry
    // sockperf across it as a remote Queued connection, then 64 MiB each
    // way with socat, a plain peer on either side (kernel TCP, the bytes
    // unchanged) and a writer SIGKILLed mid-stream (its reader ends).
    pair_test(
        "pair",
        &[
            "net", "peers", "across", "vfio", "ntb", "bulk", "plain", "killed", "stop",
        ],
    )
}

#[test]
fn two_guests_devds_link_over_soft_roce_and_programs_cross_it() -> Result<()> {
    // Each guest makes an rxe device on its virtio-net; their devds (root,
    // then ssock with no capabilities) name it as their link (`verbs`),
    // set their queue pairs up over the peers' control connection, and
    // carry sockperf across it as a remote Queued connection, then 64 MiB
    // each way with socat, every byte checked, a plain peer on either side
    // (kernel TCP, the bytes unchanged), and a writer SIGKILLed
    // mid-stream (its reader ends); then b's devd is SIGKILLed and started
    // again, the queue pairs are set up anew and sockperf crosses again;
    // devd stops cleanly. (sockperf over kernel TCP between the guests
    // first: the figure to compare with.)
    pair_test(
        "rdma",
        &[
            "net", "peers", "across", "rxe", "rdma", "bulk", "plain", "killed", "relink", "stop",
        ],
    )
}

#[test]
fn two_guests_move_connections_off_a_cut_rdma_link_onto_the_vfio_one() -> Result<()> {
    // Both links between two guests' devds, VFIO (ivshmem-doorbell) and
    // verbs (rxe over a second address of the wire), connections spread
    // over both. RoCE is cut mid-transfer (a's neighbour entry for b's RoCE
    // address pointed at a MAC no one has), the
    // control connection untouched: the RDMA link's connections move onto
    // the VFIO link with both streams whole, and the RDMA link comes back
    // once the entry goes.
    pair_test(
        "drop",
        &["net", "peers", "vfio", "rxe", "both", "drop", "stop"],
    )
}
