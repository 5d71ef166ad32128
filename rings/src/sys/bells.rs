//! Doorbells: unix datagram sockets bound to abstract addresses. The
//! owner's end reads rings, a ringers' end (connected) writes one byte,
//! or eight: a token that says which connection rang (the connection's
//! id), which an owner may use as a hint ([`drain_tokens`]).
//!
//! Never here: who may hold which doorbell (devd decides).

use super::*;

/// The name of a doorbell: an abstract unix address (16 random bytes).
pub type BellName = [u8; 16];

/// A doorbell's address: its name in the abstract namespace (a leading
/// NUL byte: no file).
pub(super) fn bell_path(name: &BellName) -> std::path::PathBuf {
    let mut b = vec![0u8];
    b.extend_from_slice(name);
    std::ffi::OsStr::from_bytes(&b).into()
}

/// `bind` (true) or `connect` a unix socket to `path`.
pub(super) fn unix_call(fd: BorrowedFd<'_>, path: &Path, bind: bool) -> io::Result<()> {
    let (addr, len) = unix_addr(path)?;
    let addr = (&addr as *const libc::sockaddr_un).cast();
    // SAFETY: addr/len describe a valid sockaddr_un that outlives the call.
    cvt(unsafe {
        if bind {
            libc::bind(fd.as_raw_fd(), addr, len)
        } else {
            libc::connect(fd.as_raw_fd(), addr, len)
        }
    })
    .map(drop)
}

pub(super) fn dgram_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    owned(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })
}

/// A doorbell's owner end: a unix datagram socket (nonblocking,
/// close-on-exec) bound to an abstract address of random name. Only its
/// owner reads it; every ringer gets a socket of its own connected to it
/// ([`doorbell_ringer`]), so no ringer can change what another's rings
/// reach, and ringing a doorbell whose owner is gone fails quietly
/// (`ECONNREFUSED`, no SIGPIPE: a datagram socket).
pub fn doorbell_owner() -> io::Result<(OwnedFd, BellName)> {
    let fd = dgram_socket()?;
    let mut name = [0u8; 16];
    random(&mut name)?;
    unix_call(fd.as_fd(), &bell_path(&name), true)?;
    Ok((fd, name))
}

/// A new ringers' end of the doorbell `name`: a datagram socket connected
/// to its owner end.
pub fn doorbell_ringer(name: &BellName) -> io::Result<OwnedFd> {
    let fd = dgram_socket()?;
    unix_call(fd.as_fd(), &bell_path(name), false)?;
    Ok(fd)
}

/// Rings a doorbell through its ringers' end (`write`, which every sandbox
/// that lets a program write allows): false if that failed for another
/// reason than a full queue (which already means "wake up").
pub fn ring_bell(w: BorrowedFd<'_>) -> bool {
    ring_bytes(w, &[1]) != Rang::Failed
}

/// What a ring with a token did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rang {
    /// Queued, token and all.
    Sent,
    /// Refused for a full queue (the owner's, or this ringers' end's send
    /// buffer): a rung doorbell all the same, but the token is lost.
    Full,
    /// Not rung (the owner is gone, or the end is broken).
    Failed,
}

/// Rings a doorbell as [`ring_bell`] does, with `token` (eight bytes,
/// little-endian) as the ring's datagram.
pub fn ring_bell_with(w: BorrowedFd<'_>, token: u64) -> Rang {
    ring_bytes(w, &token.to_le_bytes())
}

/// One ring of datagram `b`.
fn ring_bytes(w: BorrowedFd<'_>, b: &[u8]) -> Rang {
    if usize::try_from(raw_write(w, b)).is_ok_and(|n| n == b.len()) {
        Rang::Sent
    } else if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
        Rang::Full
    } else {
        Rang::Failed
    }
}

/// write(2) as the system call itself, not libc's `write`: in a process
/// under the shim that symbol is the shim's own, whose look-up of the fd
/// (and libc's cancellation point) every ring would pay again.
fn raw_write(fd: BorrowedFd<'_>, b: &[u8]) -> isize {
    // SAFETY: writes at most b.len() bytes from a valid, live buffer to an
    // fd the caller holds; the kernel reads nothing else.
    let r = unsafe { libc::syscall(libc::SYS_write, fd.as_raw_fd(), b.as_ptr(), b.len()) };
    isize::try_from(r).unwrap_or(-1)
}

/// read(2) as the system call itself (see [`raw_write`]).
fn raw_read(fd: BorrowedFd<'_>, b: &mut [u8]) -> isize {
    // SAFETY: writes at most b.len() bytes into a valid buffer this call
    // borrows exclusively; the fd is the caller's.
    let r = unsafe { libc::syscall(libc::SYS_read, fd.as_raw_fd(), b.as_mut_ptr(), b.len()) };
    isize::try_from(r).unwrap_or(-1)
}

/// Rings a doorbell queue holds at most this many at a time for a drain
/// (a peer ringing faster only keeps its owner awake).
pub(super) const DRAIN_MAX: usize = 64;

/// Takes one ring off a doorbell through its owner's end (one system
/// call): true if it held one. Rings left behind only wake the next sleep
/// at once, which takes the next.
pub fn take_ring(r: BorrowedFd<'_>) -> bool {
    let mut buf = [0u8; 8];
    raw_read(r, &mut buf) >= 0
}

/// Empties a doorbell through its owner's end (at most [`DRAIN_MAX`]
/// rings); true if it held any.
pub fn drain_bell(r: BorrowedFd<'_>) -> bool {
    let mut buf = [0u8; 8];
    let mut any = false;
    for _ in 0..DRAIN_MAX {
        let n = raw_read(r, &mut buf);
        if n < 0 {
            break;
        }
        any = true;
    }
    any
}

/// What [`drain_tokens`] found.
#[derive(Debug)]
pub struct Drained {
    /// The doorbell held at least one ring.
    pub any: bool,
    /// Every ring it held carried a token (now in the caller's vector),
    /// and none can have been refused for a full queue since the last
    /// drain: the tokens name every ringer. False: some rings are unknown.
    pub whole: bool,
}

/// How many rings a doorbell takes before one is refused (at most
/// [`DRAIN_MAX`] + 1): rung through `w` until refused, then emptied
/// through its owner's end `r`. Its queue's own limit (devd made the
/// socket, in its namespace, with `net.unix.max_dgram_qlen` as it was
/// then), which no setting read here would give. Rings others make
/// meanwhile only make it smaller (an owner that judges drains by it then
/// judges more of them not whole).
pub fn probe_queue(r: BorrowedFd<'_>, w: BorrowedFd<'_>) -> usize {
    let mut n = 0;
    while n <= DRAIN_MAX && ring_bytes(w, &[1]) == Rang::Sent {
        n += 1;
    }
    // Bounded (a ringer may keep ringing): a ring left only wakes its
    // owner once for nothing.
    for _ in 0..2 {
        drain_bell(r);
    }
    n
}

/// Empties a doorbell through its owner's end (at most [`DRAIN_MAX`]
/// rings) as [`drain_bell`] does, adding each ring's token to `tokens`.
/// The tokens are the ringers' word, not checked by anyone: a hint of
/// where to look, never a reason to look less than the rings require
/// (see [`Drained::whole`]). `limit`: how many rings its queue takes
/// ([`probe_queue`]); a drain of that many may have followed a refusal.
pub fn drain_tokens(r: BorrowedFd<'_>, tokens: &mut Vec<u64>, limit: usize) -> Drained {
    let mut buf = [0u8; 9];
    let mut d = Drained {
        any: false,
        whole: true,
    };
    let mut n = 0;
    for _ in 0..DRAIN_MAX {
        let got = raw_read(r, &mut buf);
        if got < 0 {
            break;
        }
        d.any = true;
        n += 1;
        match <[u8; 8]>::try_from(&buf[..8]) {
            Ok(t) if got == 8 => tokens.push(u64::from_le_bytes(t)),
            _ => d.whole = false,
        }
    }
    // As many rings as the queue holds: one may have been refused.
    if n >= limit || n == DRAIN_MAX {
        d.whole = false;
    }
    d
}
