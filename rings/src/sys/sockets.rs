//! Questions about a socket and its options: O_NONBLOCK, recv and send
//! with flags, queue lengths, local and peer addresses, type, timeouts,
//! TCP state and integer options.
//!
//! Never here: moving a connection's bytes but as the caller asks.

use super::*;

/// Whether O_NONBLOCK is set on an fd.
pub fn get_nonblocking(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: plain fcntl on a borrowed fd.
    let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    Ok(fl & libc::O_NONBLOCK != 0)
}

/// recv(2) on a borrowed socket with `flags` (MSG_PEEK, MSG_DONTWAIT...).
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    // SAFETY: buf is a valid, exclusively borrowed buffer of buf.len() bytes.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

/// send(2) on a borrowed socket with `flags` (MSG_DONTWAIT, MSG_NOSIGNAL...).
pub fn send(fd: BorrowedFd<'_>, buf: &[u8], flags: i32) -> io::Result<usize> {
    // SAFETY: buf is a valid borrowed buffer of buf.len() bytes, only read.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

thread_local! {
    /// A [`write_plain`] of this thread met a closed connection since the
    /// last [`take_sigpipe_raised`]: the kernel raised SIGPIPE for it.
    static SIGPIPE_RAISED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// read(2) on a socket whose file is O_NONBLOCK, for a program's own
/// read(): the system call itself (the process's `read` symbol may be the
/// shim's), the one a sandbox that lets the program read allows (recv(2)
/// is recvfrom, which sshd's does not).
pub fn read_plain(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: writes at most buf.len() bytes into a buffer this call
    // borrows exclusively; the fd is the caller's.
    let n = unsafe { libc::syscall(libc::SYS_read, fd.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n.unsigned_abs()).unwrap_or(0))
}

/// write(2) on a socket whose file is O_NONBLOCK, for a program's own
/// write() (see [`read_plain`]; send(2) is sendto). On a closed connection
/// the kernel raises SIGPIPE itself, as for the program's own call, and
/// [`take_sigpipe_raised`] says so (the caller must not raise another).
pub fn write_plain(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: reads at most buf.len() bytes from a valid, live buffer; the
    // fd is the caller's.
    let n = unsafe { libc::syscall(libc::SYS_write, fd.as_raw_fd(), buf.as_ptr(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPIPE) {
            SIGPIPE_RAISED.with(|r| r.set(true));
        }
        return Err(e);
    }
    Ok(usize::try_from(n.unsigned_abs()).unwrap_or(0))
}

/// Whether a [`write_plain`] of this thread raised SIGPIPE since the last
/// call (and forgets it).
pub fn take_sigpipe_raised() -> bool {
    SIGPIPE_RAISED.with(|r| r.replace(false))
}

/// (bytes waiting to be read, bytes sent but not yet acknowledged) on a
/// TCP socket: FIONREAD and SIOCOUTQ; 0 where the kernel says no.
pub fn socket_queues(fd: BorrowedFd<'_>) -> (usize, usize) {
    let q = |req: libc::c_ulong| {
        let mut n: libc::c_int = 0;
        // SAFETY: both requests write one int through the pointer, which
        // points at a live local.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut n as *mut libc::c_int) };
        if r < 0 {
            0
        } else {
            usize::try_from(n).unwrap_or(0)
        }
    };
    (q(libc::FIONREAD), q(libc::TIOCOUTQ))
}

/// Raises SIGPIPE in the calling thread, as the kernel does for a send on
/// a closed connection without MSG_NOSIGNAL.
pub fn raise_sigpipe() {
    // SAFETY: raise has no memory preconditions.
    unsafe {
        libc::raise(libc::SIGPIPE);
    }
}

/// Sets or clears O_NONBLOCK on any fd.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: plain fcntl on a borrowed fd.
    let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let nfl = if on {
        fl | libc::O_NONBLOCK
    } else {
        fl & !libc::O_NONBLOCK
    };
    if nfl != fl {
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, nfl) })?;
    }
    Ok(())
}

pub(super) fn from_storage(ss: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: family says this storage holds a sockaddr_in, which fits in it.
            let a: libc::sockaddr_in = unsafe { *(ss as *const libc::sockaddr_storage).cast() };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: family says this storage holds a sockaddr_in6, which fits in it.
            let a: libc::sockaddr_in6 = unsafe { *(ss as *const libc::sockaddr_storage).cast() };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        f => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("address family {f} is not IP"),
        )),
    }
}

pub(super) fn name_query(
    fd: BorrowedFd<'_>,
    f: unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int,
) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len =
        libc::socklen_t::try_from(size_of::<libc::sockaddr_storage>()).map_err(io::Error::other)?;
    // SAFETY: ss/len are a valid out-buffer of the stated size.
    cvt(unsafe {
        f(
            fd.as_raw_fd(),
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    from_storage(&ss)
}

/// `getsockname` of an IP socket fd.
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    name_query(fd, libc::getsockname)
}

/// `getpeername` of an IP socket fd.
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    name_query(fd, libc::getpeername)
}

/// The socket type (SOCK_STREAM, ...) of a socket fd.
pub fn socket_type(fd: BorrowedFd<'_>) -> io::Result<i32> {
    sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)
}

/// A timeval socket option (SO_RCVTIMEO, SO_SNDTIMEO); None when zero
/// (no timeout).
pub fn sockopt_timeout(fd: BorrowedFd<'_>, name: i32) -> io::Result<Option<Duration>> {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    let mut len =
        libc::socklen_t::try_from(size_of::<libc::timeval>()).map_err(io::Error::other)?;
    // SAFETY: tv/len are a valid out-buffer for a timeval option.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut tv as *mut libc::timeval).cast(),
            &mut len,
        )
    })?;
    let d = Duration::from_secs(u64::try_from(tv.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(tv.tv_usec).unwrap_or(0));
    Ok((!d.is_zero()).then_some(d))
}

/// The kernel's TCP state of a socket that has not started connecting
/// (`TCP_CLOSE` in include/net/tcp_states.h).
pub const TCP_STATE_CLOSE: u8 = 7;

/// A TCP socket's state (`tcpi_state` of TCP_INFO: [`TCP_STATE_CLOSE`]
/// for one not connecting yet); an error for a socket that is not TCP.
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    // TCP_INFO copies as much of `struct tcp_info` as asked for; its
    // first byte is the state.
    let mut v = [0u8; 8];
    let mut len = libc::socklen_t::try_from(v.len()).map_err(io::Error::other)?;
    // SAFETY: v/len describe a valid 8-byte out-buffer for the call.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            v.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    if len < 1 {
        return Err(io::Error::other("TCP_INFO gave no state"));
    }
    Ok(v[0])
}

/// An integer socket option (SO_ACCEPTCONN, IPV6_V6ONLY, ...).
pub fn sockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>()).map_err(io::Error::other)?;
    // SAFETY: v/len are valid out-pointers for an int option.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(v)
}
