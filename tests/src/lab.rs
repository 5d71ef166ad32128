//! The two-host lab (`tools/two-host-lab.sh`) for tests: set up on
//! `TwoHosts::up`, torn down on drop, whatever the test did.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Two network namespaces, an ntb window between them and a devd in each.
pub struct TwoHosts {
    /// The lab's state directory.
    pub dir: PathBuf,
    /// Host a's and host b's addresses on the veth pair.
    pub addr: [String; 2],
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/two-host-lab.sh")
}

/// Whether the lab can run here (root, iproute2); if not, says SKIP, or
/// fails under SSOCK_REQUIRE_APPS=1.
pub fn available() -> Result<bool> {
    let root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)?;
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && ip {
        return Ok(true);
    }
    let why = if root {
        "iproute2 (ip) is not installed"
    } else {
        "the two-host lab needs root"
    };
    if std::env::var_os("SSOCK_REQUIRE_APPS").is_some_and(|v| v == "1") {
        bail!("{why} (SSOCK_REQUIRE_APPS=1)");
    }
    eprintln!("SKIP: {why}");
    Ok(false)
}

impl TwoHosts {
    /// Sets the lab up in a fresh directory named after `name`.
    pub fn up(name: &str) -> Result<TwoHosts> {
        TwoHosts::up_with(name, &[])
    }

    /// `up`, with `env` for tools/two-host-lab.sh (its `SSOCK_LAB_*`
    /// settings).
    pub fn up_with(name: &str, env: &[(&str, &str)]) -> Result<TwoHosts> {
        let dir = std::env::temp_dir().join(format!("ssock-lab-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut lab = TwoHosts {
            dir,
            addr: [String::new(), String::new()],
        };
        let out = Command::new(script())
            .envs(env.iter().copied())
            .arg("up")
            .arg(&lab.dir)
            .arg(crate::bin("devd").parent().context("bin dir")?)
            .output()?;
        if !out.status.success() {
            bail!(
                "two-host-lab up failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let a = std::fs::read_to_string(lab.dir.join("addresses"))?;
        let mut it = a.split_whitespace().map(String::from);
        lab.addr = [
            it.next().context("address a")?,
            it.next().context("address b")?,
        ];
        Ok(lab)
    }

    /// Host `h`'s (0: a, 1: b) devd control socket.
    pub fn socket(&self, h: usize) -> PathBuf {
        self.dir.join(["a", "b"][h]).join("devd.sock")
    }

    /// Host `h`'s devd statistics.
    pub fn stats(&self, h: usize) -> Result<serde_json::Value> {
        crate::stats(&self.socket(h))
    }

    /// Host `h`'s devd pid.
    pub fn devd_pid(&self, h: usize) -> Result<i32> {
        let p = self.dir.join(["a", "b"][h]).join("devd.pid");
        Ok(std::fs::read_to_string(&p)?.trim().parse()?)
    }

    /// Host `h`'s devd log.
    pub fn log(&self, h: usize) -> String {
        std::fs::read_to_string(self.dir.join(["a", "b"][h]).join("devd.log")).unwrap_or_default()
    }

    /// A command run on host `h` (in its namespace, `SSOCK_DEVD_SOCKET`
    /// set to its devd).
    pub fn on(&self, h: usize, program: &str) -> Command {
        let mut c = Command::new(script());
        c.arg("exec").arg(&self.dir).arg(["a", "b"][h]).arg(program);
        c
    }

    /// `args` run on host `h` under `ssock-run` with its devd (none
    /// started for it).
    pub fn under_ssock(&self, h: usize, args: &[&str]) -> Command {
        let mut c = self.on(h, &crate::bin("ssock-run").to_string_lossy());
        c.arg("--devd").arg(self.socket(h)).arg("--").args(args);
        c
    }

    /// `args` run on host `h` as they are (kernel TCP).
    pub fn plain(&self, h: usize, args: &[&str]) -> Command {
        let mut c = self.on(h, "env");
        c.arg("-u").arg("SSOCK_DEVD_SOCKET").args(args);
        c
    }

    /// Host `h` takes its interconnect links to the other host out of
    /// service (`up` false) or back in (`ringstat link NODE down|up`; host
    /// a is node 1, host b node 2).
    pub fn set_link(&self, h: usize, up: bool) -> Result<()> {
        self.set_links(h, None, up)
    }

    /// `set_link` for one link (`Some(l)`: `ringstat link NODE down|up
    /// l`) or all of them.
    pub fn set_links(&self, h: usize, link: Option<u8>, up: bool) -> Result<()> {
        let out = self
            .on(h, &crate::bin("ringstat").to_string_lossy())
            .arg("link")
            .arg(["2", "1"][h])
            .arg(if up { "up" } else { "down" })
            .args(link.map(|l| l.to_string()))
            .output()?;
        if !out.status.success() {
            bail!(
                "ringstat link on host {h}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts host `h`'s devd again (after a test killed it), once it
    /// says it is ready.
    pub fn restart_devd(&self, h: usize) -> Result<()> {
        let out = Command::new(script())
            .arg("restart")
            .arg(&self.dir)
            .arg(["a", "b"][h])
            .output()?;
        if !out.status.success() {
            bail!(
                "two-host-lab restart failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Waits until the two devds are peers with their link up.
    pub fn wait_linked(&self, within: Duration) -> Result<()> {
        for h in 0..2 {
            self.wait_peer(h, within, "up with its link", |p| {
                p["state"] == "up" && p["link"] == "up"
            })?;
        }
        Ok(())
    }

    /// Waits until host `h`'s first peer satisfies `f`, failing after
    /// `within` with the stats and devd's log.
    pub fn wait_peer(
        &self,
        h: usize,
        within: Duration,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let t = Instant::now();
        loop {
            let v = self.stats(h)?;
            if f(&v["peers"][0]) {
                return Ok(v);
            }
            if t.elapsed() > within {
                bail!(
                    "host {h}'s peer never {what}: {}\nthe devds' logs:\n{}\n{}\nthe ivshmem server's:\n{}",
                    v["peers"],
                    self.log(0),
                    self.log(1),
                    std::fs::read_to_string(self.dir.join("ivshmem.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("down").arg(&self.dir).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
