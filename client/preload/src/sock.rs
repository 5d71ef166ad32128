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

pub fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
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
    /// A context for one non-blocking transport call: blocking waits
    /// happen in `io`, outside the socket's lock.
    fn ctx<'a>(&self, fd: BorrowedFd<'a>) -> Ctx<'a> {
        Ctx {
            tcp: fd,
            nonblocking: true,
            deadline: None,
            spin: self.spin,
            check_peer: false,
        }
    }

    /// One non-blocking receive (MSG_PEEK honoured): Ok(0) is end of
    /// stream, Err(EAGAIN) means nothing yet.
    pub fn recv_now(
        &mut self,
        fd: BorrowedFd<'_>,
        buf: &mut [u8],
        peek: bool,
    ) -> Result<usize, i32> {
        if self.read_shut || buf.is_empty() {
            return Ok(0);
        }
        let ctx = self.ctx(fd);
        let r = if peek {
            self.transport.peek(buf, &ctx)
        } else {
            self.transport.read(buf, &ctx)
        };
        r.map_err(|e| errno(&e))
    }

    /// One non-blocking send: how much went, or Err(EAGAIN) if none could.
    pub fn send_now(&mut self, fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize, i32> {
        let ctx = self.ctx(fd);
        self.transport.write(buf, &ctx).map_err(|e| errno(&e))
    }

    /// shutdown(2) on the transport.
    pub fn shutdown(&mut self, fd: BorrowedFd<'_>, how: i32) -> Result<(), i32> {
        if ![libc::SHUT_RD, libc::SHUT_WR, libc::SHUT_RDWR].contains(&how) {
            return Err(libc::EINVAL);
        }
        if how == libc::SHUT_RD || how == libc::SHUT_RDWR {
            self.read_shut = true;
        }
        if how == libc::SHUT_WR || how == libc::SHUT_RDWR {
            let ctx = self.ctx(fd);
            self.transport.shutdown_write(&ctx).map_err(|e| errno(&e))?;
        }
        // A thread blocked on this socket re-checks, and sees the change.
        self.transport.wake_self();
        Ok(())
    }

    /// The process is about to fork; the child will hold the socket too.
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
        let ctx = self.ctx(fd);
        let mut r = self.transport.readiness(&ctx, check_peer);
        if self.read_shut {
            // After SHUT_RD a read returns 0 at once.
            r.readable = true;
        }
        r
    }

    /// Arms for a sleep; the fds to sleep on, or None if already ready.
    pub fn arm(&mut self, fd: BorrowedFd<'_>, read: bool, write: bool) -> Option<Vec<(i32, i16)>> {
        let ctx = self.ctx(fd);
        self.transport.arm(&ctx, read, write)
    }

    /// Ends a sleep prepared by `arm(read, write)`.
    pub fn disarm(&mut self, read: bool, write: bool) {
        self.transport.disarm(read, write);
    }
}
