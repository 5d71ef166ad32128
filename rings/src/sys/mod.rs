//! Thin, checked wrappers over the Linux calls the contract needs: sealed
//! memfds, eventfds, poll, SOCK_SEQPACKET control sockets with SCM_RIGHTS
//! and SO_PEERCRED, and socket address/inode queries on passed fds.
//!
//! Every function here returns owned, typed results; no raw pointer leaves
//! this module.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

mod bells;
mod seqpacket;
mod sockets;

pub use bells::*;
pub use seqpacket::*;
pub use sockets::*;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: the kernel just returned this fd to us and nobody else owns it.
    Ok(keep_off_std(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// An fd ssock just got (created or received): recorded as ssock's
/// ([`crate::ownfds`]), and moved to 3 or above if it landed on 0, 1 or 2
/// (the program had closed them): a daemon reopens those with dup2.
fn keep_off_std(fd: OwnedFd) -> OwnedFd {
    let fd = if fd.as_raw_fd() < 3 {
        move_to(fd, 3)
    } else {
        fd
    };
    crate::ownfds::own(fd.as_raw_fd());
    fd
}

/// `fd` at the lowest free number at or above `min` (the same fd if that
/// fails, e.g. above the fd limit); the old number is closed.
fn move_to(fd: OwnedFd, min: RawFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own; the result, if any, is a new
    // fd nobody else owns.
    match cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) }) {
        Ok(n) => {
            crate::ownfds::disown(fd.as_raw_fd());
            drop(fd);
            // SAFETY: see above.
            unsafe { OwnedFd::from_raw_fd(n) }
        }
        Err(_) => fd,
    }
}

/// A close-on-exec duplicate of `fd` (ssock's, at 3 or above).
pub fn dup_cloexec(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a borrowed, open fd; the result, if any,
    // is a new fd nobody else owns (`owned` takes it).
    owned(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) })
}

/// The CPUs online on this machine (not only those this thread may run
/// on: a peer process may run on the others); at least 1.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf reads a system value; no memory of ours is involved.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

/// Moves a long-lived fd of ssock's (the devd session, the shim's log)
/// above the numbers a program uses (near 1000, or below a lower fd
/// limit), where a program's dup2 onto a fixed number or its loop closing
/// 3..N does not meet it; recorded as ssock's.
pub fn move_high(fd: OwnedFd) -> OwnedFd {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: rl is a valid out-parameter for the call's duration.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
        rl.rlim_cur
    } else {
        0
    };
    let min = RawFd::try_from(soft.saturating_sub(32).min(1000)).unwrap_or(3);
    let fd = if min > fd.as_raw_fd() {
        move_to(fd, min)
    } else {
        fd
    };
    crate::ownfds::own(fd.as_raw_fd());
    fd
}

/// Creates a memfd of `size` bytes and seals its size (shrink, grow, and
/// further sealing), so no holder can make the other side SIGBUS.
pub fn memfd_sealed(name: &str, size: usize) -> io::Result<OwnedFd> {
    let fd = memfd_unsealed(name, size)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: plain fcntl on an fd we own.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(fd)
}

/// A memfd of `size` bytes that its creator maps writable, then seals
/// with [`seal_read_only`] before giving it out (devd's listener board).
pub fn memfd_unsealed(name: &str, size: usize) -> io::Result<OwnedFd> {
    let cname = CString::new(format!("ssock-{name}")).map_err(io::Error::other)?;
    // SAFETY: cname is a valid NUL-terminated string for the call's duration.
    let fd = owned(unsafe {
        libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    let len = libc::off_t::try_from(size).map_err(io::Error::other)?;
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })?;
    Ok(fd)
}

/// Seals a memfd so that nobody given it can write it or change its size
/// (F_SEAL_FUTURE_WRITE: mappings made before, the creator's, still write).
pub fn seal_read_only(fd: BorrowedFd<'_>) -> io::Result<()> {
    let seals =
        libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: plain fcntl on a borrowed, open fd.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(())
}

/// Checks that a received memfd is sealed read-only, of `size` bytes or more.
pub fn check_read_only(fd: BorrowedFd<'_>, size: usize) -> io::Result<()> {
    // SAFETY: plain fcntl on a borrowed, open fd.
    let seals = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
    let need = libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    if seals & need != need {
        return Err(io::Error::other("the board is not sealed read-only"));
    }
    let st = fstat(fd)?;
    if usize::try_from(st.st_size).map_or(true, |n| n < size) {
        return Err(io::Error::other("the board is too small"));
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds (vDSO: no system call).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC as of the last timer tick (never ahead of
/// [`monotonic_ns`], behind it by a tick at most), in nanoseconds: the
/// vDSO without reading the time-stamp counter, for the checks on every
/// connection that a few milliseconds do not change.
pub fn monotonic_coarse_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec for the call.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Writes all of `buf` at offset `off` of a file (a region devd has not
/// mapped: its header).
pub fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(&*file_view(fd), buf, off)
}

/// Fills `buf` from offset `off` of a file (devd reading a region's header
/// words without mapping it).
pub fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(&*file_view(fd), buf, off)
}

/// A `File` over a borrowed fd, for std's positional I/O; never closes it.
fn file_view(fd: BorrowedFd<'_>) -> std::mem::ManuallyDrop<std::fs::File> {
    // SAFETY: the fd stays open for the borrow, and ManuallyDrop keeps the
    // File from closing it; the view does not outlive its caller's borrow.
    std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd.as_raw_fd()) })
}

/// Checks that a received region fd is a memfd sealed against shrinking and
/// growing, of exactly `size` bytes.
pub fn check_sealed(fd: BorrowedFd<'_>, size: usize) -> io::Result<()> {
    // SAFETY: plain fcntl on a borrowed, open fd.
    let seals = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
    let need = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    if seals & need != need {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "region is not sealed against resizing",
        ));
    }
    let st = fstat(fd)?;
    if u64::try_from(st.st_size).ok() != u64::try_from(size).ok() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("region is {} bytes, expected {size}", st.st_size),
        ));
    }
    Ok(())
}

/// `fstat` of a borrowed fd.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st is a valid out-pointer of the right type.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled the struct.
    Ok(unsafe { st.assume_init() })
}

/// Inode of a socket fd, verifying that it is a socket.
pub fn socket_inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = fstat(fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fd is not a socket",
        ));
    }
    Ok(st.st_ino)
}

/// An eventfd used as a doorbell between two processes.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new nonblocking, close-on-exec eventfd.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall.
        owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) }).map(EventFd)
    }

    /// Wraps a received fd (it must be an eventfd; a wrong kind only makes
    /// notifications fail with an error).
    pub fn from_owned(fd: OwnedFd) -> EventFd {
        EventFd(fd)
    }

    /// Adds one to the counter: wakes whoever polls it.
    pub fn notify(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64.
        let r = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if r == 8 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // A saturated counter already means "wake up".
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(())
        } else {
            Err(e)
        }
    }

    /// Resets the counter to zero; returns whether it was non-zero.
    pub fn drain(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64.
        let r = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        r == 8
    }

    /// A duplicate of the fd, for passing to another process.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.0.try_clone()
    }
}

impl From<EventFd> for OwnedFd {
    fn from(e: EventFd) -> OwnedFd {
        e.0
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// One entry of a [`poll`] set.
#[derive(Debug, Clone, Copy)]
pub struct PollFd {
    /// The fd to watch.
    pub fd: RawFd,
    /// `libc::POLL*` events wanted.
    pub events: i16,
    /// Events the kernel reported.
    pub revents: i16,
}

impl PollFd {
    /// Watch `fd` for `events`.
    pub fn new(fd: RawFd, events: i16) -> PollFd {
        PollFd {
            fd,
            events,
            revents: 0,
        }
    }
}

/// `poll(2)`; `None` waits forever. Returns the number of ready entries
/// (0 on timeout); `EINTR` is returned as an error for the caller to judge.
pub fn poll(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms: libc::c_int = match timeout {
        None => -1,
        Some(t) => libc::c_int::try_from(t.as_millis().min(i32::MAX as u128))
            .unwrap_or(i32::MAX)
            .max(i32::from(
                t > Duration::ZERO && t < Duration::from_millis(1),
            )),
    };
    let mut raw: Vec<libc::pollfd> = fds
        .iter()
        .map(|p| libc::pollfd {
            fd: p.fd,
            events: p.events,
            revents: 0,
        })
        .collect();
    let n = libc::nfds_t::try_from(raw.len()).map_err(io::Error::other)?;
    // SAFETY: raw is a valid array of `n` pollfd structs for the call.
    let r = cvt(unsafe { libc::poll(raw.as_mut_ptr(), n, ms) })?;
    for (p, r) in fds.iter_mut().zip(&raw) {
        p.revents = r.revents;
    }
    Ok(usize::try_from(r).unwrap_or(0))
}

/// Aborts a TCP connection now (connect with AF_UNSPEC: the kernel sends
/// a reset and the socket is no longer connected), whoever else holds it.
pub fn disconnect(fd: BorrowedFd<'_>) -> io::Result<()> {
    let sa = libc::sockaddr {
        sa_family: libc::sa_family_t::try_from(libc::AF_UNSPEC).unwrap_or(0),
        sa_data: [0; 14],
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr>()).unwrap_or(16);
    // SAFETY: fd is open (borrowed); sa and len describe one sockaddr
    // that lives across the call, which only reads it.
    cvt(unsafe { libc::connect(fd.as_raw_fd(), &sa, len) }).map(drop)
}

/// Whether this process may execute the file at `path` (access X_OK, as
/// exec's PATH search asks).
pub fn executable(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c is NUL-terminated and outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// Whether the file at `path` has the extended attribute `name` with a
/// value (false when it cannot be read).
pub fn has_xattr(path: &std::path::Path, name: &std::ffi::CStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: both strings are NUL-terminated and outlive the call; a null
    // buffer of size 0 only asks for the value's size, nothing is written.
    let n = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    n > 0
}

/// The real user id of this process.
pub fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Fills `buf` with random bytes from the kernel (getrandom).
pub fn random(buf: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of buf.
        let r = unsafe { libc::getrandom(buf[at..].as_mut_ptr().cast(), buf.len() - at, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        at += usize::try_from(r).unwrap_or(0);
    }
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (daemons and tests that
/// hold thousands of connections need it).
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: rl is a valid out-pointer.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) })?;
    rl.rlim_cur = rl.rlim_max;
    // SAFETY: rl is a valid in-pointer.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) })?;
    Ok(rl.rlim_cur)
}

/// Fork count since [`watch_forks`] was first called, two per fork: the
/// prepare handler adds one before the fork (odd: a fork is under way),
/// the parent and child handlers one more after it. Parent and child both
/// see a new value once the fork can have copied anything.
static FORKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Forks this process is a child of since [`watch_forks`] (the child
/// handler counts it): changes in a child only, never in its parent.
static CHILD_OF: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// The handlers are registered.
static WATCHING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn fork_begins() {
    FORKS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

extern "C" fn fork_ended_in_parent() {
    FORKS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

extern "C" fn fork_ended_in_child() {
    crate::notify::forget_spinners();
    CHILD_OF.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    FORKS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// Starts counting forks (once per process; later calls cost a load).
/// Memory that must not reach children forked after a point records
/// [`forks`] then, and compares it later.
pub fn watch_forks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers three handlers that stay valid for the
        // process's life and only touch atomics (safe in any context a
        // fork handler runs in, a signal handler's included).
        let r = unsafe {
            libc::pthread_atfork(
                Some(fork_begins),
                Some(fork_ended_in_parent),
                Some(fork_ended_in_child),
            )
        };
        WATCHING.store(r == 0, std::sync::atomic::Ordering::SeqCst);
    });
}

/// The fork count (see [`FORKS`]); None if forks are not counted (before
/// [`watch_forks`], or if registering its handlers failed) or one is
/// under way: a value read then is never taken as "no fork since".
pub fn forks() -> Option<u64> {
    if !WATCHING.load(std::sync::atomic::Ordering::SeqCst) {
        return None;
    }
    let n = FORKS.load(std::sync::atomic::Ordering::SeqCst);
    n.is_multiple_of(2).then_some(n)
}

/// Forks this process is a child of (see [`CHILD_OF`]).
pub fn child_of() -> u64 {
    CHILD_OF.load(std::sync::atomic::Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A doorbell and two ringers' ends of it.
    fn bell_with_two_ringers() -> (OwnedFd, OwnedFd, OwnedFd) {
        let (own, name) = doorbell_owner().unwrap();
        (
            own,
            doorbell_ringer(&name).unwrap(),
            doorbell_ringer(&name).unwrap(),
        )
    }

    #[test]
    fn a_ringer_that_disconnects_its_end_changes_nobody_elses_rings() {
        let (own, a, b) = bell_with_two_ringers();
        // A hostile holder of `a` disconnects it (connect with AF_UNSPEC).
        disconnect(a.as_fd()).unwrap();
        assert!(!ring_bell(a.as_fd()), "its own end no longer rings");
        assert!(ring_bell(b.as_fd()), "another ringer's still does");
        assert!(take_ring(own.as_fd()));
        assert!(!take_ring(own.as_fd()));
        // The owner gone, a ring fails quietly (no SIGPIPE).
        drop(own);
        assert!(!ring_bell(b.as_fd()));
    }

    #[test]
    fn a_drain_names_the_ringers_tokens_and_says_when_some_are_unknown() {
        let (own, a, b) = bell_with_two_ringers();
        // The queue's limit, found by filling it (emptied after).
        let limit = probe_queue(own.as_fd(), a.as_fd());
        assert!(limit >= 1);
        let mut t = Vec::new();
        assert!(!drain_tokens(own.as_fd(), &mut t, limit).any);
        assert_eq!(ring_bell_with(a.as_fd(), 7), Rang::Sent);
        assert_eq!(ring_bell_with(b.as_fd(), 1 << 40), Rang::Sent);
        let d = drain_tokens(own.as_fd(), &mut t, limit);
        assert!(d.any);
        assert_eq!(t, [7, 1 << 40]);
        assert_eq!(d.whole, limit > 2);
        // A ring without a token (one byte) leaves the drain not whole.
        t.clear();
        assert_eq!(ring_bell_with(a.as_fd(), 9), Rang::Sent);
        assert!(ring_bell(b.as_fd()));
        let d = drain_tokens(own.as_fd(), &mut t, limit);
        assert!(d.any && !d.whole);
        assert_eq!(t, [9]);
        // The queue filled to its limit, one more refused (its token lost,
        // and said so): not whole.
        t.clear();
        for k in 0..limit.min(DRAIN_MAX) as u64 {
            assert_eq!(ring_bell_with(a.as_fd(), k), Rang::Sent);
        }
        if limit <= DRAIN_MAX {
            assert_eq!(ring_bell_with(a.as_fd(), 99), Rang::Full);
        }
        let d = drain_tokens(own.as_fd(), &mut t, limit);
        assert!(d.any && !d.whole);
        // With the owner gone, a ring fails.
        drop(own);
        assert_eq!(ring_bell_with(a.as_fd(), 1), Rang::Failed);
    }

    #[test]
    fn sealed_memfd_passes_its_own_check_and_fails_a_wrong_size() {
        let fd = memfd_sealed("t", 12288).unwrap();
        check_sealed(fd.as_fd(), 12288).unwrap();
        assert!(check_sealed(fd.as_fd(), 4096).is_err());
    }

    #[test]
    fn unsealed_memfd_is_refused() {
        let name = CString::new("x").unwrap();
        // SAFETY: valid C string.
        let fd = owned(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) }).unwrap();
        // SAFETY: plain syscall on our fd.
        unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) };
        assert!(check_sealed(fd.as_fd(), 4096).is_err());
    }

    #[test]
    fn seqpacket_carries_fds_and_credentials() {
        let dir = std::env::temp_dir().join(format!("ssock-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = SeqPacket::listen(&path, 4).unwrap();
        let c = SeqPacket::connect(&path).unwrap();
        let s = l.accept().unwrap();
        s.set_nonblocking(false).unwrap();
        let e = EventFd::new().unwrap();
        c.send(b"hi", &[e.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = s.recv(&mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(fds.len(), 1);
        let (pid, uid, _) = s.peer_cred().unwrap();
        assert_eq!(pid, std::process::id() as i32);
        // SAFETY: plain syscall.
        assert_eq!(uid, unsafe { libc::getuid() });
        drop(c);
        let (n, fds) = s.recv(&mut buf, 4).unwrap();
        assert_eq!((n, fds.len()), (0, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
