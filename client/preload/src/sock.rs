//! One accelerated socket of the application: its transport, and the
//! socket calls translated into transport calls with the kernel's errno
//! semantics. Negotiation for connect/accept lives here too; the exported
//! functions in lib.rs only look fds up and dispatch.

use ssock_client::negotiate::{
    accept_on, attach, connect_on, refuse_on, register_listener, Accepted, Outcome,
};
use ssock_client::transport::{Ctx, Ready, Transport};
use ssock_client::FallbackReason;
use ssock_client::{Options, Session};
use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

/// An accelerated socket.
pub struct Sock {
    transport: Box<dyn Transport>,
    spin: Duration,
    read_shut: bool,
}

/// errno for an io::Error.
pub fn errno(e: &io::Error) -> i32 {
    match e.raw_os_error() {
        Some(n) => n,
        None if e.kind() == io::ErrorKind::WouldBlock => libc::EAGAIN,
        None if e.kind() == io::ErrorKind::TimedOut => libc::ETIMEDOUT,
        None => libc::EIO,
    }
}

/// Whether the shim should leave this process alone (`SSOCK_DISABLE=1`).
pub fn disabled() -> bool {
    std::env::var_os("SSOCK_DISABLE").is_some_and(|v| v == "1")
}

fn session() -> Option<Arc<Session>> {
    if disabled() {
        None
    } else {
        Session::global()
    }
}

fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
    ssock_rings::sys::get_nonblocking(fd).unwrap_or(false)
}

/// Whether `fd` is a TCP socket the shim handles (IPv4/IPv6 stream).
fn is_tcp(fd: BorrowedFd<'_>) -> bool {
    ssock_rings::sys::socket_type(fd).is_ok_and(|t| t == libc::SOCK_STREAM)
        && ssock_rings::sys::local_addr(fd).is_ok()
}

/// connect(2) on a blocking TCP socket: negotiate; returns Some(result)
/// if the shim handled it, None to let libc do it (not TCP, nonblocking,
/// no devd).
pub fn connect(fd: BorrowedFd<'_>, dst: SocketAddr) -> Option<Result<Option<Sock>, i32>> {
    if !is_tcp(fd) || is_nonblocking(fd) {
        return None;
    }
    let session = session()?;
    let opts = Options::with_session(session.clone());
    let spin = opts.spin(Some(&session));
    Some(match connect_on(fd, dst, &opts, Some(&session)) {
        Ok(Outcome::Kernel(_)) => Ok(None),
        Ok(Outcome::Attached(resp)) => match attach(&session, resp) {
            Ok(t) => Ok(Some(Sock {
                transport: t,
                spin,
                read_shut: false,
            })),
            Err(e) => Err(errno(&e)),
        },
        Err(e) => Err(errno(&e)),
    })
}

/// listen(2) succeeded on `fd`: register it; true if devd knows it now.
pub fn listened(fd: BorrowedFd<'_>) -> bool {
    if !is_tcp(fd) {
        return false;
    }
    session().is_some_and(|s| register_listener(&s, fd))
}

/// A socket accepted from a registered listener (`listener`): negotiate.
///
/// Until epoll is intercepted, a nonblocking listener or
/// accepted socket (an event-loop server) is served on kernel TCP: the
/// announced peer is told so (reason `unsupported`) instead of getting an
/// accelerated socket that the server's epoll would never see readable.
/// Ok(None):
/// plain; Err(()) : the announced peer sent no valid Hello, drop it.
pub fn accepted(listener: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> Result<Option<Sock>, ()> {
    let Some(session) = session() else {
        return Ok(None);
    };
    let opts = Options::with_session(session.clone());
    let spin = opts.spin(Some(&session));
    // Negotiation reads the Hello with a bounded blocking read: an
    // accept4(SOCK_NONBLOCK) socket is made blocking for that and back.
    let nb = is_nonblocking(fd);
    if nb {
        let _ = ssock_rings::sys::set_nonblocking(fd, false);
    }
    let r = if nb || is_nonblocking(listener) {
        refuse_on(&session, fd, &opts, FallbackReason::Unsupported)
    } else {
        accept_on(&session, fd, &opts)
    };
    if nb {
        let _ = ssock_rings::sys::set_nonblocking(fd, true);
    }
    match r {
        Ok(Accepted::Attached(t)) => Ok(Some(Sock {
            transport: t,
            spin,
            read_shut: false,
        })),
        Ok(Accepted::Kernel(_)) | Err(_) => Ok(None),
        Ok(Accepted::Dropped) => Err(()),
    }
}

/// Unregisters a listener that is being closed.
pub fn unlisten(fd: BorrowedFd<'_>) {
    if let Some(s) = session() {
        let _ = s.request(&ssock_rings::codec::Request::Unlisten, &[fd]);
    }
}

impl Sock {
    fn ctx<'a>(&self, fd: BorrowedFd<'a>, dontwait: bool) -> Ctx<'a> {
        Ctx {
            tcp: fd,
            nonblocking: dontwait || is_nonblocking(fd),
            deadline: None,
            spin: self.spin,
        }
    }

    /// recv(2) semantics: MSG_PEEK, MSG_DONTWAIT, MSG_WAITALL.
    pub fn recv(&mut self, fd: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> Result<usize, i32> {
        if self.read_shut || buf.is_empty() {
            return Ok(0);
        }
        let ctx = self.ctx(fd, flags & libc::MSG_DONTWAIT != 0);
        if flags & libc::MSG_PEEK != 0 {
            return self.transport.peek(buf, &ctx).map_err(|e| errno(&e));
        }
        let mut got = 0;
        loop {
            match self.transport.read(&mut buf[got..], &ctx) {
                Ok(0) => return Ok(got),
                Ok(n) => got += n,
                Err(e) if got > 0 => {
                    let _ = e;
                    return Ok(got);
                }
                Err(e) => return Err(errno(&e)),
            }
            if flags & libc::MSG_WAITALL == 0 || got == buf.len() {
                return Ok(got);
            }
        }
    }

    /// Receive into several buffers (readv, recvmsg): fills them in order,
    /// like one recv into their concatenation.
    pub fn recv_vec(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &mut [&mut [u8]],
        flags: i32,
    ) -> Result<usize, i32> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if bufs.len() == 1 || total == 0 {
            return match bufs.first_mut() {
                Some(b) => self.recv(fd, b, flags),
                None => Ok(0),
            };
        }
        // One receive into a bounce buffer keeps the semantics of a single
        // call (one wait, MSG_PEEK, MSG_WAITALL) across the pieces.
        let mut tmp = vec![0u8; total];
        let n = self.recv(fd, &mut tmp, flags)?;
        let mut off = 0;
        for b in bufs.iter_mut() {
            if off == n {
                break;
            }
            let k = b.len().min(n - off);
            b[..k].copy_from_slice(&tmp[off..off + k]);
            off += k;
        }
        Ok(n)
    }

    /// Send several buffers (writev, sendmsg) as one stream write.
    pub fn send_vec(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[&[u8]],
        flags: i32,
    ) -> Result<usize, i32> {
        match bufs {
            [] => Ok(0),
            [b] => self.send(fd, b, flags),
            _ => self.send(fd, &bufs.concat(), flags),
        }
    }

    /// send(2) semantics; EPIPE raises SIGPIPE unless MSG_NOSIGNAL.
    pub fn send(&mut self, fd: BorrowedFd<'_>, buf: &[u8], flags: i32) -> Result<usize, i32> {
        let ctx = self.ctx(fd, flags & libc::MSG_DONTWAIT != 0);
        match self.transport.write(buf, &ctx) {
            Ok(n) => Ok(n),
            Err(e) => {
                let n = errno(&e);
                if n == libc::EPIPE && flags & libc::MSG_NOSIGNAL == 0 {
                    ssock_rings::sys::raise_sigpipe();
                }
                Err(n)
            }
        }
    }

    /// The process forked; this is the child, which holds the socket too.
    pub fn fork_hold(&mut self) {
        self.transport.fork_hold();
    }

    /// (unread, unsent) bytes, for FIONREAD and SIOCOUTQ.
    pub fn pending(&mut self) -> (usize, usize) {
        self.transport.pending()
    }

    /// The spin budget for waits on this socket.
    pub fn spin(&self) -> Duration {
        self.spin
    }

    /// Readiness for poll and friends.
    pub fn readiness(&mut self, fd: BorrowedFd<'_>, check_peer: bool) -> Ready {
        let ctx = self.ctx(fd, true);
        self.transport.readiness(&ctx, check_peer)
    }

    /// Arms for a sleep; the fds to sleep on, or None if already ready.
    pub fn arm(&mut self, fd: BorrowedFd<'_>, read: bool, write: bool) -> Option<Vec<(i32, i16)>> {
        let ctx = self.ctx(fd, true);
        self.transport.arm(&ctx, read, write)
    }

    /// Ends a sleep prepared by `arm`.
    pub fn disarm(&mut self) {
        self.transport.disarm();
    }

    /// shutdown(2).
    pub fn shutdown(&mut self, fd: BorrowedFd<'_>, how: i32) -> Result<(), i32> {
        if how == libc::SHUT_RD || how == libc::SHUT_RDWR {
            self.read_shut = true;
        }
        if how == libc::SHUT_WR || how == libc::SHUT_RDWR {
            let ctx = self.ctx(fd, false);
            self.transport.shutdown_write(&ctx).map_err(|e| errno(&e))?;
        }
        Ok(())
    }
}
