//! `ssock-ivshmem-server`: hands out one shared memory and every client's
//! doorbell eventfds over a unix socket, speaking QEMU's ivshmem-server
//! protocol (version 0): what two devds' ntb link (or two QEMU guests'
//! ivshmem-doorbell devices) share. Debian ships no ivshmem-server.
//!
//! Runs until killed; the memory is a memfd that lives as long as the
//! server or a client holds it.

use anyhow::{bail, Context, Result};
use ssock_hwbackends::ntb::ivshmem::Server;
use std::os::fd::AsFd;
use std::path::PathBuf;

const USAGE: &str = "usage: ssock-ivshmem-server --socket PATH --size BYTES [--vectors N]
  --socket PATH   the unix socket clients connect to (a stale one is replaced)
  --size BYTES    the shared memory's size: 16 KiB to 1 GiB, a multiple of 8 KiB
                  (two inboxes of half each)
  --vectors N     doorbell eventfds per client (default 1)";

fn main() {
    if let Err(e) = run() {
        eprintln!("ssock-ivshmem-server: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> Result<()> {
    let mut socket = None;
    let mut size = None;
    let mut vectors = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(val()?)),
            "--size" => size = Some(val()?.parse::<usize>().context("--size: bytes")?),
            "--vectors" => vectors = val()?.parse().context("--vectors: a number")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => bail!("unknown argument {a}\n{USAGE}"),
        }
    }
    let (Some(socket), Some(size)) = (socket, size) else {
        bail!("{USAGE}");
    };
    if !(16384..=1 << 30).contains(&size) || !size.is_multiple_of(8192) {
        bail!("--size {size}: 16 KiB to 1 GiB, a multiple of 8 KiB");
    }
    if !(1..=64).contains(&vectors) {
        bail!("--vectors {vectors}: 1 to 64");
    }
    let shm = ssock_rings::sys::memfd_sealed("ivshmem", size).context("shared memory")?;
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            bail!("{} is served already", socket.display());
        }
        std::fs::remove_file(&socket)
            .with_context(|| format!("cannot remove stale {}", socket.display()))?;
    }
    let l = std::os::unix::net::UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    eprintln!(
        "ssock-ivshmem-server: {} bytes, {vectors} vectors, on {}",
        size,
        socket.display()
    );
    let never = ssock_rings::sys::EventFd::new()?;
    Server::new(l, shm, vectors)?.run(never.as_fd())?;
    Ok(())
}
