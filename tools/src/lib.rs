//! ssock-tools: what `ringstat` and `ssock-bench` share: fetching devd's
//! statistics, and finding or starting a private devd.

#![forbid(unsafe_code)]

pub mod pattern;

use anyhow::{bail, Context, Result};
use ssock_client::Session;
use ssock_rings::codec::{Request, Response};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// All statistics pages of the devd behind `s`, merged into one JSON
/// document: `{devd, totals, connections: [...]}` (docs/ringstat.md).
pub fn fetch_stats(s: &Session) -> Result<serde_json::Value> {
    let mut after = 0;
    let mut conns = Vec::new();
    loop {
        let (resp, _) = s.request(&Request::Stats { after, limit: 256 }, &[])?;
        let Response::Stats { json, more } = resp else {
            bail!("devd sent no statistics")
        };
        let mut v: serde_json::Value =
            serde_json::from_str(&json).context("devd sent invalid JSON")?;
        let page = v["connections"].as_array().cloned().unwrap_or_default();
        if let Some(last) = page.last() {
            after = last["id"].as_u64().context("connection without id")?;
        }
        conns.extend(page);
        if !more {
            v["connections"] = serde_json::Value::Array(conns);
            return Ok(v);
        }
    }
}

/// A devd this process started (killed on drop).
#[derive(Debug)]
pub struct PrivateDevd {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    dir: PathBuf,
}

impl Drop for PrivateDevd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `devd` binary: next to this executable, else on PATH.
pub fn devd_binary() -> PathBuf {
    if let Some(p) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("devd")))
    {
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("devd")
}

/// Starts a private `devd --user` on a socket in a fresh directory.
pub fn start_private_devd(extra: &[&str]) -> Result<PrivateDevd> {
    let dir = std::env::temp_dir().join(format!("ssock-private-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("devd.sock");
    let child = Command::new(devd_binary())
        .args(["--user", "--socket"])
        .arg(&socket)
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", devd_binary().display()))?;
    let d = PrivateDevd { child, socket, dir };
    wait_for(&d.socket, Duration::from_secs(10))?;
    Ok(d)
}

/// Waits until a devd answers at `socket`.
pub fn wait_for(socket: &Path, limit: Duration) -> Result<()> {
    let t = Instant::now();
    while Session::connect(socket).is_err() {
        if t.elapsed() > limit {
            bail!("no devd answered at {} within {limit:?}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
