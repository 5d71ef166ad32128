//! `SeqPacket`: the SOCK_SEQPACKET control socket between clients and
//! devd, with SCM_RIGHTS (passed fds, parsed within the control buffer)
//! and SO_PEERCRED; the same SCM_RIGHTS sending and receiving on any
//! unix socket (`send_with_fds`, `recv_with_fds`: the ivshmem protocol's
//! stream socket).
//!
//! Never here: what the messages mean (`codec`).

use super::*;

pub(super) fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).map_err(io::Error::other)?;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((
        addr,
        libc::socklen_t::try_from(len).map_err(io::Error::other)?,
    ))
}

/// A SOCK_SEQPACKET unix socket: the control channel between clients and devd.
#[derive(Debug)]
pub struct SeqPacket(OwnedFd);

impl SeqPacket {
    /// Binds and listens at `path` (the caller removes stale files first).
    pub fn listen(path: &Path, backlog: i32) -> io::Result<SeqPacket> {
        // SAFETY: plain syscall.
        let fd = owned(unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)
        })?;
        unix_call(fd.as_fd(), path, true)?;
        // SAFETY: plain syscall on our fd.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
        Ok(SeqPacket(fd))
    }

    /// The same socket at a high fd number (see [`move_high`]).
    pub fn into_high(self) -> SeqPacket {
        SeqPacket(move_high(self.0))
    }

    /// Connects to a listening control socket at `path` without waiting:
    /// a nonblocking socket (WouldBlock when the listener's backlog is
    /// full: try again later).
    pub fn connect_nonblocking(path: &Path) -> io::Result<SeqPacket> {
        // SAFETY: plain syscall.
        let fd = owned(unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        })?;
        unix_call(fd.as_fd(), path, false)?;
        Ok(SeqPacket(fd))
    }

    /// Connects to a listening control socket at `path`.
    pub fn connect(path: &Path) -> io::Result<SeqPacket> {
        // SAFETY: plain syscall.
        let fd = owned(unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)
        })?;
        unix_call(fd.as_fd(), path, false)?;
        Ok(SeqPacket(fd))
    }

    /// A connected pair, close-on-exec (for tests of both ends in one
    /// process).
    pub fn pair() -> io::Result<(SeqPacket, SeqPacket)> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid out-array of two ints.
        cvt(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        // SAFETY: the kernel just returned these two fds to us and nobody
        // else owns them.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (a, b) = (keep_off_std(a), keep_off_std(b));
        Ok((SeqPacket(a), SeqPacket(b)))
    }

    /// Accepts one client, nonblocking and close-on-exec.
    pub fn accept(&self) -> io::Result<SeqPacket> {
        // SAFETY: null address pointers are allowed by accept4.
        owned(unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        })
        .map(SeqPacket)
    }

    /// Sets or clears O_NONBLOCK.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        set_nonblocking(self.0.as_fd(), on)
    }

    /// Sets a receive timeout (None: block forever).
    pub fn set_recv_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = match t {
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            Some(t) => libc::timeval {
                tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_usec: libc::suseconds_t::from(t.subsec_micros()).max(1),
            },
        };
        let len =
            libc::socklen_t::try_from(size_of::<libc::timeval>()).map_err(io::Error::other)?;
        // SAFETY: tv is a valid timeval for the given length.
        cvt(unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                len,
            )
        })?;
        Ok(())
    }

    /// The connected peer's (pid, uid, gid), from SO_PEERCRED.
    pub fn peer_cred(&self) -> io::Result<(i32, u32, u32)> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len =
            libc::socklen_t::try_from(size_of::<libc::ucred>()).map_err(io::Error::other)?;
        // SAFETY: cred/len are valid out-pointers of the right size.
        cvt(unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        })?;
        Ok((cred.pid, cred.uid, cred.gid))
    }

    /// Sends one message with `fds` attached (SCM_RIGHTS).
    pub fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        send_with_fds(self.0.as_fd(), data, fds).map(|_| ())
    }

    /// [`SeqPacket::send`] without fds that never waits for room
    /// (WouldBlock when the peer's queue is full).
    pub fn send_now(&self, data: &[u8]) -> io::Result<()> {
        send_with_fds_flags(self.0.as_fd(), data, &[], libc::MSG_DONTWAIT).map(|_| ())
    }

    /// Receives one message into `buf`, returning its length and the fds
    /// that came with it (at most `max_fds`; extra fds are closed and make
    /// the call fail). Length 0 means the peer hung up.
    pub fn recv(&self, buf: &mut [u8], max_fds: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
        self.recv_flags(buf, max_fds, 0)
    }

    /// [`SeqPacket::recv`] with recvmsg flags (MSG_DONTWAIT: WouldBlock
    /// when no message is there).
    pub fn recv_flags(
        &self,
        buf: &mut [u8],
        max_fds: usize,
        flags: i32,
    ) -> io::Result<(usize, Vec<OwnedFd>)> {
        recv_with_fds(self.0.as_fd(), buf, max_fds, flags)
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for SeqPacket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Sends `data` with `fds` attached (SCM_RIGHTS) on the unix socket
/// `sock` (datagram-like or stream); returns the bytes sent.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    send_with_fds_flags(sock, data, fds, 0)
}

/// [`send_with_fds`] with sendmsg `flags` added to MSG_NOSIGNAL
/// (MSG_DONTWAIT: WouldBlock rather than a wait for room).
pub fn send_with_fds_flags(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: i32,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd_bytes = u32::try_from(raw.len() * size_of::<RawFd>()).map_err(io::Error::other)?;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` writable bytes, enough
        // for one cmsg header plus the fd array (CMSG_SPACE above); the
        // copy writes exactly fd_bytes after the header.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as usize;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(c),
                fd_bytes as usize,
            );
        }
    }
    loop {
        // SAFETY: msg and everything it points to are live for the call.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | flags) };
        if r >= 0 {
            return Ok(usize::try_from(r).unwrap_or(0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives into `buf` from the unix socket `sock`, with the fds that came
/// with those bytes (at most `max_fds`; more, or a truncated control
/// message, fail), with recvmsg `flags`. Length 0: the peer hung up.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    flags: i32,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let fd_bytes = u32::try_from(max_fds.max(1) * size_of::<RawFd>()).map_err(io::Error::other)?;
    // SAFETY: pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    let n = loop {
        // SAFETY: msg points at live buffers of the stated sizes.
        let r =
            unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
        if r >= 0 {
            break usize::try_from(r).unwrap_or(0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with well-formed cmsgs up to
    // msg_controllen; the CMSG_* macros stay inside that buffer, and
    // each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 fds that
    // are now ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = payload / size_of::<RawFd>();
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(keep_off_std(OwnedFd::from_raw_fd(fd)));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > max_fds {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many fds attached",
        ));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control message too long",
        ));
    }
    Ok((n, fds))
}
