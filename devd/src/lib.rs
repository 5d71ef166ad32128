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
pub mod sandbox;
pub mod stats;
#[allow(unsafe_code)]
mod sys;

use anyhow::Context;
use config::Config;
use ssock_hwbackends::loopback::Loopback;
use ssock_hwbackends::Backend;
use ssock_rings::sys::SeqPacket;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// Runs devd until it is told to stop.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    cfg.validate()?;
    let _ = ssock_rings::sys::raise_nofile_limit();
    let signals = sys::termination_signalfd().context("cannot set up signal handling")?;
    let listener = bind(&cfg)?;
    let backend: Box<dyn Backend> = Box::new(Loopback::default());
    let name = backend.capabilities().name;
    let violations = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let engine = dataplane::engine::spawn(backend, violations.clone(), cfg.sandbox)
        .context("cannot start the engine thread")?;
    let mut devd = control::Devd::new(cfg.clone(), engine, name, violations);
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

fn bind(cfg: &Config) -> anyhow::Result<SeqPacket> {
    let path = &cfg.socket;
    let dir = path.parent().context("socket path has no directory")?;
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if cfg.user_mode {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    // Another user must not be able to replace our socket.
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
    Ok(l)
}
