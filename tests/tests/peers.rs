//! Peer devds as real, sandboxed processes: two devds whose configs list
//! each other come up over TCP (the lower node dials), show it in their
//! statistics and in ringstat, notice the other's death, and refuse a
//! devd that does not hold the link's key.

use anyhow::{ensure, Context, Result};
use ssock_tests::{free_port, Devd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A scratch directory for configs and keys, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Result<Dir> {
        let d = std::env::temp_dir().join(format!("ssock-peers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(Dir(d))
    }

    fn key(&self, name: &str, text: &str) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let p = self.0.join(name);
        std::fs::write(&p, text)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        Ok(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// devd as node `node`, peer of `other` at `other_port` (listening on
/// `port` itself when the other node dials it).
fn node(dir: &Dir, node: u32, port: u16, other: u32, other_port: u16, key: &Path) -> Result<Devd> {
    let cfg = dir.0.join(format!("node{node}-{port}.toml"));
    let listen = if other < node {
        format!("peer_listen = \"127.0.0.1:{port}\"\n")
    } else {
        String::new()
    };
    std::fs::write(
        &cfg,
        format!(
            "node = {node}\n{listen}[[peer]]\nnode = {other}\naddress = \"127.0.0.1:{other_port}\"\nkey_file = \"{}\"\n",
            key.display()
        ),
    )?;
    let sock = dir.0.join(format!("node{node}-{port}")).join("devd.sock");
    Devd::start_at(&sock, &["--config", cfg.to_str().context("path")?])
}

/// Waits until devd's first peer is in `state`; returns the stats.
fn peer_state(d: &Devd, state: &str, within: Duration) -> Result<serde_json::Value> {
    let t = Instant::now();
    loop {
        let v = d.stats()?;
        if v["peers"][0]["state"] == state {
            return Ok(v);
        }
        ensure!(
            t.elapsed() < within,
            "peer never {state}: {}",
            serde_json::to_string(&v["peers"]).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_sandboxed_devds_become_peers_and_see_each_other_go() -> Result<()> {
    let dir = Dir::new("up")?;
    let key = dir.key("link.key", "the key of link 1-2, long enough\n")?;
    let (p1, p2) = (free_port()?, free_port()?);
    let mut n2 = node(&dir, 2, p2, 1, p1, &key)?;
    let mut n1 = node(&dir, 1, p1, 2, p2, &key)?;
    peer_state(&n1, "up", Duration::from_secs(15))?;
    let v = peer_state(&n2, "up", Duration::from_secs(15))?;
    ensure!(
        v["peers"][0]["node"] == 1 && v["peers"][0]["ups"] == 1,
        "{}",
        v["peers"]
    );
    ensure!(n1.alive() && n2.alive(), "a sandboxed devd died");
    let table = n1.ringstat(&[])?;
    ensure!(
        table
            .lines()
            .any(|l| l.contains("127.0.0.1:") && l.contains(" up ")),
        "ringstat shows no peer up:\n{table}"
    );
    // Node 2 dies: node 1 sees it go, then come back.
    n2.kill();
    let v = peer_state(&n1, "down", Duration::from_secs(10))?;
    ensure!(
        v["peers"][0]["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{}",
        v["peers"]
    );
    let _n2 = node(&dir, 2, p2, 1, p1, &key)?;
    let v = peer_state(&n1, "up", Duration::from_secs(15))?;
    ensure!(v["peers"][0]["ups"] == 2, "{}", v["peers"]);
    Ok(())
}

#[test]
fn a_devd_without_the_key_is_refused_and_counted() -> Result<()> {
    let dir = Dir::new("key")?;
    let key = dir.key("link.key", "the key of link 1-2, long enough\n")?;
    let wrong = dir.key("wrong.key", "not the key of link 1-2, though\n")?;
    let (p1, p2) = (free_port()?, free_port()?);
    let n2 = node(&dir, 2, p2, 1, p1, &key)?;
    let n1 = node(&dir, 1, p1, 2, p2, &wrong)?;
    let t = Instant::now();
    loop {
        let v = n2.stats()?;
        if v["peers_refused"]["bad_proof"]
            .as_u64()
            .is_some_and(|n| n > 0)
        {
            ensure!(v["peers"][0]["state"] != "up", "{}", v["peers"]);
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(15),
            "node 2 never refused the wrong key: {}",
            serde_json::to_string(&v).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = n1.stats()?;
    ensure!(v["peers"][0]["state"] != "up", "{}", v["peers"]);
    let table = n2.ringstat(&[])?;
    ensure!(
        table.contains("peer connections refused: bad_proof"),
        "{table}"
    );
    Ok(())
}
