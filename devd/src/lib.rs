//! ssock-devd: the device daemon. It owns the interconnect (a backend),
//! brokers connections between client processes (listener registry,
//! intents, pairing, sealed regions), serves Queued connections from its
//! engine thread, and reports statistics.
//!
//! Never here: application bytes of Direct connections (devd is not on that
//! path), trust in anything a client wrote into shared memory.

#![deny(unsafe_code)]

pub mod config;
pub mod control;
pub mod dataplane;
pub mod peers;
mod privileges;
pub mod sandbox;
pub mod stats;
#[allow(unsafe_code)]
mod sys;

use anyhow::Context;
use config::Config;
use ssock_hwbackends::loopback::Loopback;
use ssock_hwbackends::ntb::{self, IvshmemWindow, Ntb};
use ssock_hwbackends::router::Router;
use ssock_hwbackends::Backend;
use ssock_rings::sys::SeqPacket;
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs devd until it is told to stop.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    cfg.validate()?;
    let _ = ssock_rings::sys::raise_nofile_limit();
    let signals = sys::termination_signalfd().context("cannot set up signal handling")?;
    // Who to become is settled before anything is opened: a wrong run_as
    // leaves no socket behind.
    let switch = match &cfg.run_as {
        Some(user) => privileges::plan(user)?,
        None => None,
    };
    let (listener, _lock) = bind(&cfg)?;
    let mut links = backends(&cfg)?;
    // The memory RDMA devices will pin, allowed while devd may still
    // raise its limit.
    let pinned = verbs_pinned(&cfg);
    if pinned > 0 {
        let need = (pinned + (16 << 20)) as u64;
        if let Err(e) = sys::raise_memlock_limit(need) {
            log::warn!("cannot raise the locked memory limit to {need} bytes for RDMA: {e}");
        }
    }
    let peer_listener = match cfg.peer_listen.filter(|_| !cfg.peers.is_empty()) {
        Some(a) => Some(
            std::net::TcpListener::bind(a)
                .with_context(|| format!("cannot listen for peers on {a}"))?,
        ),
        None => None,
    };
    // Everything only root may open is open: no thread but this one yet.
    if let Some(s) = &switch {
        privileges::apply(s)?;
        log::info!(
            "running as {} (uid {}, gid {}) with no capabilities",
            cfg.run_as.as_deref().unwrap_or("?"),
            s.uid,
            s.gid
        );
    }
    // RDMA devices are opened as the user that serves: the kernel refuses
    // commands on a uverbs file from a process whose credentials changed
    // since it was opened (its nodes are open to every user).
    links.extend(verbs_backends(&cfg)?);
    let backend: Box<dyn Backend> = if links.len() == 1 {
        links.remove(0)
    } else {
        Box::new(Router::new(links))
    };
    let name = backend.capabilities().name;
    let counts = std::sync::Arc::new(stats::EngineCounts::default());
    let engine = dataplane::engine::spawn(backend, counts.clone(), cfg.sandbox)
        .context("cannot start the engine thread")?;
    for p in &cfg.peers {
        engine.set_link_policy(p.node, p.link_policy);
    }
    let mut devd = control::Devd::new(cfg.clone(), engine, name, counts);
    if !cfg.peers.is_empty() {
        let peers = peers::spawn(cfg.node, cfg.peers.clone(), peer_listener, cfg.sandbox)
            .context("cannot start the peer thread")?;
        devd.set_peers(peers);
        log::info!("node {}: {} peers", cfg.node, cfg.peers.len());
    }
    if cfg.sandbox.is_none() {
        log::warn!("running without the seccomp sandbox (--no-sandbox)");
    }
    log::info!("devd ready on {}", cfg.socket.display());
    // serve() installs the control thread's filter once its epoll set exists,
    // then reports readiness.
    let r = control::server::serve(&mut devd, &listener, &signals, cfg.sandbox);
    let _ = std::fs::remove_file(&cfg.socket);
    r.context("control loop failed")
}

/// The engine's backends opened before devd gives up root: the loopback
/// for local pairs, and an ntb link for each window an ivshmem server
/// hands out for a peer (link 0 first; this devd's inbox is each window's
/// first half when its node id is the lower), then each VFIO device.
fn backends(cfg: &Config) -> anyhow::Result<Vec<Box<dyn Backend>>> {
    let mut all: Vec<Box<dyn Backend>> = vec![Box::new(Loopback::default())];
    for p in &cfg.peers {
        let half = usize::from(cfg.node > p.node);
        for (link, path) in p.ivshmem.iter().enumerate() {
            let link = u8::try_from(link).context("too many links")?;
            let w = IvshmemWindow::connect(path, half, 0, Duration::from_secs(5)).with_context(
                || {
                    format!(
                        "peer node {} link {link}: no window from the ivshmem server at {}",
                        p.node,
                        path.display()
                    )
                },
            )?;
            log::info!(
                "peer node {} link {link}: ntb over {} (inbox half {half}, ivshmem id {})",
                p.node,
                path.display(),
                w.id()
            );
            all.push(ntb_link(p.node, link, Box::new(w)));
        }
        // Then the devices owned through VFIO, in the config's order.
        for (k, bdf) in p.vfio.iter().enumerate() {
            let link = u8::try_from(p.ivshmem.len() + k).context("too many links")?;
            let w = ntb::VfioWindow::open(bdf, half, Box::new(ntb::ivshmem_pci::Ivshmem))
                .with_context(|| format!("peer node {} link {link}: no window on {bdf}", p.node))?;
            log::info!(
                "peer node {} link {link}: ntb over VFIO device {bdf} (inbox half {half})",
                p.node
            );
            all.push(ntb_link(p.node, link, Box::new(w)));
        }
    }
    Ok(all)
}

/// One ntb link to peer `node` over window `w`, with the default
/// per-channel window.
fn ntb_link(node: u32, link: u8, w: Box<dyn ntb::Window>) -> Box<dyn Backend> {
    Box::new(Ntb::new(node, link, w, ntb::DEFAULT_WINDOW))
}

/// Bytes the RDMA devices' links register (each its inbox and the copy
/// of the peer's).
#[cfg(feature = "verbs")]
fn verbs_pinned(cfg: &Config) -> usize {
    let links: usize = cfg.peers.iter().map(|p| p.verbs.len()).sum();
    links * 2 * ssock_hwbackends::verbs::INBOX
}

#[cfg(not(feature = "verbs"))]
fn verbs_pinned(_: &Config) -> usize {
    0
}

#[cfg(not(feature = "verbs"))]
fn verbs_backends(cfg: &Config) -> anyhow::Result<Vec<Box<dyn Backend>>> {
    if let Some(p) = cfg.peers.iter().find(|p| !p.verbs.is_empty()) {
        anyhow::bail!(
            "peer node {}: verbs = {:?}, but this devd was built without RDMA links \
             (cargo feature `verbs`)",
            p.node,
            p.verbs
        );
    }
    Ok(Vec::new())
}

/// The ntb links over RDMA devices, after each peer's windows: a queue
/// pair each and its memory registered, connected once the peer's
/// endpoint comes over the control connection (`Backend::setup`).
#[cfg(feature = "verbs")]
fn verbs_backends(cfg: &Config) -> anyhow::Result<Vec<Box<dyn Backend>>> {
    use ssock_hwbackends::verbs;
    let mut all: Vec<Box<dyn Backend>> = Vec::new();
    for p in &cfg.peers {
        for (k, dev) in p.verbs.iter().enumerate() {
            let link = u8::try_from(p.links() - p.verbs.len() + k).context("too many links")?;
            let ctx = verbs::Context::open(Some(dev), 1, p.verbs_gid_index).with_context(|| {
                format!("peer node {} link {link}: no RDMA device {dev}", p.node)
            })?;
            let w = verbs::VerbsWindow::new(&ctx, verbs::INBOX, cfg.node < p.node)
                .with_context(|| format!("peer node {} link {link}: {dev}", p.node))?;
            log::info!(
                "peer node {} link {link}: ntb over RDMA device {dev} (GID index {})",
                p.node,
                p.verbs_gid_index
            );
            all.push(ntb_link(p.node, link, Box::new(w)));
        }
    }
    Ok(all)
}

/// The file a detached devd (`--detach`) logs to, beside its socket.
pub const LOG_FILE: &str = "devd.log";

/// How long `--detach` waits for the detached devd to answer.
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// `devd --detach`: starts this program again with `args` plus
/// `--detached`, as a daemon of its own: a new session (it calls
/// [`ssock_rings::detach::setsid`] first), stdin from /dev/null, stdout
/// and stderr appended to [`LOG_FILE`] beside the socket, and no other
/// descriptor of this process (every one from 3 up is marked close-on-exec
/// first: a pipe the caller reads to EOF is not held by devd). Returns
/// once a devd answers on the socket (this one, or another that won a
/// race to it), or fails if the daemon exits first or does not answer
/// within 10 s (then it is killed). This process exits afterwards, so the
/// daemon is nobody's child but init's (or a subreaper's).
pub fn detach(cfg: &Config, args: &[OsString]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    cfg.validate()?;
    if SeqPacket::connect(&cfg.socket).is_ok() {
        anyhow::bail!("another devd is already serving {}", cfg.socket.display());
    }
    let dir = socket_dir(cfg)?;
    let log_path = dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    ssock_rings::detach::cloexec_from(3).context("cannot mark inherited descriptors")?;
    let exe = std::env::current_exe().context("cannot find devd's own executable")?;
    let mut child = Command::new(&exe)
        .args(args)
        .arg("--detached")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let t = Instant::now();
    loop {
        if SeqPacket::connect(&cfg.socket).is_ok() {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            anyhow::bail!(
                "devd exited ({st}) before serving {}; see {}",
                cfg.socket.display(),
                log_path.display()
            );
        }
        if t.elapsed() > DETACH_WAIT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "devd did not answer on {} within {DETACH_WAIT:?}; see {}",
                cfg.socket.display(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The socket's directory, created if missing (0700 for a user devd,
/// 0755 otherwise, whatever the umask: other users must reach a system
/// socket), and checked: another user must not be able to replace the
/// socket.
fn socket_dir(cfg: &Config) -> anyhow::Result<&Path> {
    let dir = cfg
        .socket
        .parent()
        .context("socket path has no directory")?;
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mode = if cfg.user_mode { 0o700 } else { 0o755 };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.uid() != ssock_rings::sys::uid() || meta.mode() & 0o022 != 0 {
        anyhow::bail!(
            "{} must be a directory owned by uid {} and not writable by others (it is uid {}, mode {:o})",
            dir.display(),
            ssock_rings::sys::uid(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(dir)
}

/// Binds the control socket. The returned file holds an exclusive lock on
/// `SOCKET.lock` for as long as it is open: two devds started on one path
/// at the same moment cannot both take it (the second could otherwise see
/// the first's socket before it listens, remove it as stale, and leave the
/// first serving nobody).
fn bind(cfg: &Config) -> anyhow::Result<(SeqPacket, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = &cfg.socket;
    socket_dir(cfg)?;
    let mut lock_path = path.clone().into_os_string();
    lock_path.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", Path::new(&lock_path).display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            anyhow::bail!("another devd is already serving {}", path.display())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e)
                .with_context(|| format!("cannot lock {}", Path::new(&lock_path).display()))
        }
    }
    if path.exists() {
        if SeqPacket::connect(path).is_ok() {
            anyhow::bail!("another devd is already serving {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    let l = SeqPacket::listen(path, 128)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.socket_mode))?;
    l.set_nonblocking(true)?;
    Ok((l, lock))
}
