//! One accelerated socket of the application: its transport, and the
//! socket calls translated into transport calls with the kernel's errno
//! semantics. Negotiation for connect/accept lives here too; the exported
//! functions in lib.rs only look fds up and dispatch.

use ssock_client::negotiate::{
    accept_on, attach, connect_finish, connect_start, register_listener, Accepted, Outcome,
    Pending, Started,
};
use ssock_client::transport::{Ctx, Ready, Transport};
use ssock_client::{Options, Session};
use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

/// How long a blocking connect waits for the HelloAck before returning
/// (the rest of the wait, if any, happens at the socket's first use).
const ACK_GRACE: Duration = Duration::from_millis(1);

/// errno-like code some `Sock` calls return when negotiation ended on
/// kernel TCP after all: the caller forgets the socket and hands the call
/// to libc. Never a real errno.
pub const FALLBACK: i32 = -1;

/// Where a socket's negotiation stands.
enum State {
    /// connect() sent the Hello; the HelloAck is read at first use (so a
    /// program that accepts its own connection after connect() works).
    /// Holds the session and this end, created at the intent (None in a
    /// process forked before the HelloAck: it attaches through its own
    /// session instead).
    AwaitAck(Arc<Session>, Option<Pending>),
    /// Accelerated.
    Up(Box<dyn Transport>),
    /// The acceptor said kernel TCP (or the HelloAck never came): the kernel
    /// socket is the connection.
    Kernel,
}

/// An accelerated socket (or one whose negotiation is under way).
pub struct Sock {
    state: State,
    spin: Duration,
    read_shut: bool,
    /// shutdown(SHUT_WR) before the HelloAck: applied once it is known.
    write_shut: bool,
    /// A send is waiting half done (see `io::send`): other sends wait.
    pub send_busy: bool,
    /// O_NONBLOCK of the socket, kept here so that no call needs F_GETFL:
    /// read at creation, updated by the shim's fcntl(F_SETFL) and
    /// ioctl(FIONBIO). (The flag belongs to the open file: a change made
    /// by another process sharing it after fork is not seen.)
    pub nonblocking: bool,
    /// SO_ERROR already reported the reset.
    error_reported: bool,
    /// Other processes that got the socket (fork, exec, fd passing) before
    /// the HelloAck was read, as fork_hold minus drop_hold (an exec takes
    /// one back before it runs and gives it again if it fails, so this may
    /// dip below zero): above zero, its end is not ours alone to release.
    shared: i32,
    /// connect() has reported success (0). A nonblocking connect reported
    /// EINPROGRESS: the next connect() on the socket says 0, later ones
    /// EISCONN, as the kernel's do.
    connect_reported: bool,
}

impl Drop for Sock {
    fn drop(&mut self) {
        // Closed before the HelloAck was read, and never shared with another
        // process (which attaches the end by its socket later): devd holds
        // this end for us until told.
        if let State::AwaitAck(session, Some(p)) = &self.state {
            if self.shared <= 0 && !session.is_broken() {
                ssock_client::negotiate::release(session, p);
            }
        }
    }
}

/// Sockets that turned plain after connect (negotiation ended on kernel
/// TCP): epoll sets look for such members only when this changed.
static TURNED_PLAIN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// See [`TURNED_PLAIN`].
pub fn turned_plain() -> u64 {
    TURNED_PLAIN.load(std::sync::atomic::Ordering::Acquire)
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
    ssock_rings::env::var_os("SSOCK_DISABLE").is_some_and(|v| v == "1")
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

/// connect(2) on a TCP socket: negotiate; returns Some(result) if the
/// shim handled it, None to let libc do it (not TCP, no devd). Ok(Some):
/// the Hello is sent and the socket is tracked; a nonblocking caller is
/// then told EINPROGRESS, as by the kernel.
pub fn connect(fd: BorrowedFd<'_>, dst: SocketAddr) -> Option<Result<Option<Sock>, i32>> {
    if !is_tcp(fd) {
        return None;
    }
    let session = session()?;
    let opts = Options::with_session(session.clone());
    let spin = opts.spin(Some(&session));
    Some(match connect_start(fd, dst, &opts, Some(&session)) {
        Ok(Started::Kernel(r)) => {
            log::info!("connect to {dst}: kernel TCP ({r:?})");
            Ok(None)
        }
        Ok(Started::HelloSent {
            pending,
            nonblocking,
        }) => {
            // A nonblocking connect reported EINPROGRESS, not success.
            let mut s = Sock::new(State::AwaitAck(session, Some(pending)), spin, nonblocking);
            s.connect_reported = !nonblocking;
            if !nonblocking {
                // A blocking connect waits a little for the HelloAck (a
                // local acceptor usually answers within a few hundred us),
                // so that the socket is attached before the program can
                // fork or exec it. An acceptor that only accepts after
                // connect() returns (same thread) leaves it for first use.
                if ssock_client::negotiate::await_ack(fd, ACK_GRACE) {
                    s.settle(fd);
                }
            }
            Ok(Some(s))
        }
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

/// A socket accepted from a registered listener: negotiate. Ok(None):
/// plain; Err(()) : the announced peer sent no valid Hello, drop it.
pub fn accepted(fd: BorrowedFd<'_>) -> Result<Option<Sock>, ()> {
    let Some(session) = session() else {
        return Ok(None);
    };
    let opts = Options::with_session(session.clone());
    let spin = opts.spin(Some(&session));
    // Negotiation reads the Hello with recv(MSG_DONTWAIT) and poll, so an
    // accept4(SOCK_NONBLOCK) socket needs no change.
    let nb = is_nonblocking(fd);
    match accept_on(&session, fd, &opts) {
        Ok(Accepted::Attached(t)) => {
            log::info!(
                "accept: {:?}, connection {}",
                t.mode(),
                t.conn_id().unwrap_or(0)
            );
            Ok(Some(Sock::new(State::Up(t), spin, nb)))
        }
        Ok(Accepted::Kernel(_)) | Err(_) => Ok(None),
        Ok(Accepted::Dropped) => Err(()),
    }
}

/// A TCP socket this process got without negotiating it (inherited across
/// exec, or received over a Unix socket): an accelerated connection is
/// taken over, a listener registered again. Some: the accelerated socket.
pub fn inherited(fd: BorrowedFd<'_>) -> Option<Sock> {
    if !is_tcp(fd) {
        return None;
    }
    if ssock_rings::sys::peer_addr(fd).is_err() {
        // Not connected: a listener (registered again if it is one).
        if ssock_rings::sys::sockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
            .is_ok_and(|v| v == 1)
        {
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            if listened(fd) {
                crate::table::add_listener(raw);
            }
        }
        return None;
    }
    let session = session()?;
    let spin = Options::with_session(session.clone()).spin(Some(&session));
    match ssock_client::negotiate::adopt(&session, fd) {
        Ok(Some(t)) => Some(Sock::new(State::Up(t), spin, is_nonblocking(fd))),
        Ok(None) => None,
        Err(e) => {
            // Accelerated, but not usable here: its bytes would never
            // arrive on the kernel socket. End it, so the peer sees it.
            log::warn!(
                "an inherited accelerated socket cannot be taken over ({e}); shutting it down"
            );
            let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
            None
        }
    }
}

/// Unregisters a listener that is being closed.
pub fn unlisten(fd: BorrowedFd<'_>) {
    if let Some(s) = session() {
        let _ = s.request(&ssock_rings::codec::Request::Unlisten, &[fd]);
    }
}

/// poll(2) on the kernel socket alone, without waiting, as a `Ready`.
fn kernel_readiness(fd: BorrowedFd<'_>) -> Ready {
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let mut p = [ssock_rings::sys::PollFd::new(
        raw,
        libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP,
    )];
    if ssock_rings::sys::poll(&mut p, Some(Duration::ZERO)).is_err() {
        return Ready::BROKEN;
    }
    let r = p[0].revents;
    Ready {
        readable: r & libc::POLLIN != 0,
        writable: r & libc::POLLOUT != 0,
        rdhup: r & libc::POLLRDHUP != 0,
        hup: r & libc::POLLHUP != 0,
        err: r & libc::POLLERR != 0,
        seq: [0; 2],
    }
}

impl Sock {
    fn new(state: State, spin: Duration, nonblocking: bool) -> Sock {
        Sock {
            state,
            spin,
            read_shut: false,
            write_shut: false,
            send_busy: false,
            nonblocking,
            error_reported: false,
            shared: 0,
            connect_reported: true,
        }
    }

    /// The transport, once negotiation is over. Err(EAGAIN): the HelloAck
    /// has not come yet; Err(FALLBACK): kernel TCP.
    fn up(&mut self, fd: BorrowedFd<'_>) -> Result<&mut Box<dyn Transport>, i32> {
        if let State::AwaitAck(session, pending) = &mut self.state {
            // After fork the child's copy of the session is marked broken
            // (it is the parent's socket): use this process's own, and
            // attach through it (the end from the intent is the parent's).
            let session = if session.is_broken() {
                *pending = None;
                Session::global()
            } else {
                Some(session.clone())
            };
            let Some(session) = session else {
                // No devd to attach through: the acceptor waits on rings
                // this side can never reach. End the connection.
                log::warn!("connect: devd unreachable before the HelloAck; shutting down");
                let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
                TURNED_PLAIN.fetch_add(1, std::sync::atomic::Ordering::Release);
                self.state = State::Kernel;
                return Err(FALLBACK);
            };
            let session = &session;
            let next = match connect_finish(fd, session, None, pending) {
                Ok(None) => return Err(libc::EAGAIN),
                Ok(Some(Outcome::Attached(resp))) => match attach(session, resp) {
                    Ok(t) => {
                        log::info!(
                            "connect: {:?}, connection {}",
                            t.mode(),
                            t.conn_id().unwrap_or(0)
                        );
                        State::Up(t)
                    }
                    Err(e) => {
                        // The acceptor is attached and waits on the rings:
                        // ending the kernel connection tells it (a reset).
                        log::warn!("attach failed after the HelloAck: {e}");
                        let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
                        State::Kernel
                    }
                },
                Ok(Some(Outcome::Kernel(r))) => {
                    log::info!("connect: kernel TCP ({r:?})");
                    State::Kernel
                }
                Err(e) => {
                    // No valid HelloAck (the acceptor dropped us): what is
                    // left is the kernel connection, and the kernel's answer.
                    log::warn!("negotiation failed after connect: {e}");
                    State::Kernel
                }
            };
            if matches!(next, State::Kernel) {
                TURNED_PLAIN.fetch_add(1, std::sync::atomic::Ordering::Release);
            }
            self.state = next;
            let ctx = self.ctx(fd);
            match &mut self.state {
                State::Up(t) if self.write_shut => {
                    let _ = t.shutdown_write(&ctx);
                }
                State::Kernel if self.write_shut => {
                    let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Write);
                }
                _ => {}
            }
        }
        match &mut self.state {
            State::Up(t) => Ok(t),
            State::Kernel => Err(FALLBACK),
            State::AwaitAck(..) => Err(libc::EAGAIN),
        }
    }

    /// connect(2) again on a socket the shim tracks (programs check a
    /// nonblocking connect that way): EALREADY while the HelloAck is
    /// awaited, then 0 once, then EISCONN.
    pub fn reconnect(&mut self, fd: BorrowedFd<'_>) -> Result<i32, i32> {
        match self.up(fd).map(|_| ()) {
            Err(libc::EAGAIN) => Err(libc::EALREADY),
            Err(e) => Err(e),
            Ok(()) if !self.connect_reported => {
                self.connect_reported = true;
                Ok(0)
            }
            Ok(()) => Err(libc::EISCONN),
        }
    }

    /// SO_ERROR: the pending error of the connection, reported once (then
    /// 0), as the kernel's sk_err: ECONNRESET after a reset. None: ask the
    /// kernel socket (no error here).
    pub fn so_error(&mut self, fd: BorrowedFd<'_>) -> Option<i32> {
        if self.error_reported {
            // Taken already. The kernel socket may still hold the same
            // reset as its own pending error (the liveness check polls
            // and does not take it): it is not reported twice.
            return Some(0);
        }
        let r = self.readiness(fd, true);
        if r.err {
            // As the kernel once its error is taken: reads see the end,
            // writes EPIPE.
            self.error_reported = true;
            self.read_shut = true;
            return Some(libc::ECONNRESET);
        }
        None
    }

    /// Whether negotiation ended on kernel TCP (the caller should forget
    /// this socket and give the fd back to the kernel).
    pub fn is_kernel(&self) -> bool {
        matches!(self.state, State::Kernel)
    }

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
        let ctx = self.ctx(fd);
        let read_shut = self.read_shut;
        let t = self.up(fd)?;
        if read_shut || buf.is_empty() {
            return Ok(0);
        }
        let r = if peek {
            t.peek(buf, &ctx)
        } else {
            t.read(buf, &ctx)
        };
        r.map_err(|e| errno(&e))
    }

    /// One non-blocking send: how much went, or Err(EAGAIN) if none could.
    pub fn send_now(&mut self, fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize, i32> {
        if self.error_reported {
            return Err(libc::EPIPE);
        }
        let ctx = self.ctx(fd);
        self.up(fd)?.write(buf, &ctx).map_err(|e| errno(&e))
    }

    /// shutdown(2): Err(FALLBACK) once the socket turned out plain.
    pub fn shutdown(&mut self, fd: BorrowedFd<'_>, how: i32) -> Result<(), i32> {
        if ![libc::SHUT_RD, libc::SHUT_WR, libc::SHUT_RDWR].contains(&how) {
            return Err(libc::EINVAL);
        }
        let ctx = self.ctx(fd);
        let t = match self.up(fd) {
            Err(libc::EAGAIN) => {
                // Before the HelloAck: remembered, applied when it comes.
                self.read_shut |= how != libc::SHUT_WR;
                self.write_shut |= how != libc::SHUT_RD;
                return Ok(());
            }
            r => r?,
        };
        if how == libc::SHUT_WR || how == libc::SHUT_RDWR {
            t.shutdown_write(&ctx).map_err(|e| errno(&e))?;
        }
        // A thread blocked on this socket re-checks, and sees the change.
        t.wake_self();
        if how == libc::SHUT_RD || how == libc::SHUT_RDWR {
            self.read_shut = true;
        }
        Ok(())
    }

    /// If the HelloAck is there, attach now (before the socket is passed
    /// to another process, or at the end of a blocking connect), so that
    /// the hold and the rings are shared rather than several processes
    /// racing for the HelloAck later.
    pub fn settle(&mut self, fd: BorrowedFd<'_>) {
        if matches!(self.state, State::AwaitAck(..)) {
            let _ = self.up(fd);
        }
    }

    /// Another process will hold the socket too (fork, or fd passing).
    pub fn fork_hold(&mut self) {
        match &mut self.state {
            State::Up(t) => t.fork_hold(),
            State::AwaitAck(..) => self.shared = self.shared.saturating_add(1),
            State::Kernel => {}
        }
    }

    /// The fd is being closed with SO_LINGER 0 (then the last holder's close
    /// resets the connection, as the kernel's RST).
    pub fn closing(&mut self, fd: BorrowedFd<'_>) {
        let State::Up(t) = &mut self.state else {
            return;
        };
        let l = socket2::SockRef::from(&fd).linger();
        if matches!(l, Ok(Some(d)) if d.is_zero()) {
            t.abort_on_close();
        }
    }

    /// Takes back a `fork_hold` (the fd passing failed).
    pub fn drop_hold(&mut self) {
        match &mut self.state {
            State::Up(t) => t.drop_hold(),
            State::AwaitAck(..) => self.shared = self.shared.saturating_sub(1),
            State::Kernel => {}
        }
    }

    /// (unread, unsent) bytes, for FIONREAD and SIOCOUTQ.
    pub fn pending(&mut self, fd: BorrowedFd<'_>) -> Result<(usize, usize), i32> {
        match self.up(fd) {
            Ok(t) => Ok(t.pending()),
            Err(libc::EAGAIN) => Ok((0, 0)),
            Err(e) => Err(e),
        }
    }

    /// The spin budget for waits on this socket (none while the HelloAck
    /// is awaited: it arrives on the kernel socket, which a waiter sleeps on).
    pub fn spin(&self) -> Duration {
        if matches!(self.state, State::AwaitAck(..)) {
            Duration::ZERO
        } else {
            self.spin
        }
    }

    /// Readiness for poll and friends (the kernel socket's, once the
    /// socket turned out plain).
    pub fn readiness(&mut self, fd: BorrowedFd<'_>, check_peer: bool) -> Ready {
        if !check_peer && matches!(self.state, State::AwaitAck(..)) {
            // The HelloAck arrives on the kernel socket: looking costs a
            // syscall, so not in a spin loop (only when a waiter is about
            // to sleep, or was woken by that socket).
            return Ready::default();
        }
        let ctx = self.ctx(fd);
        let read_shut = self.read_shut;
        match self.up(fd) {
            Ok(t) => {
                let mut r = t.readiness(&ctx, check_peer);
                if read_shut {
                    // After SHUT_RD a read returns 0 at once.
                    r.readable = true;
                }
                r
            }
            Err(libc::EAGAIN) => Ready::default(),
            Err(_) => kernel_readiness(fd),
        }
    }

    /// Arms for a sleep: the fds to sleep on, and whether the transport's
    /// rings were armed (then `disarm` must follow); None if broken (ready).
    /// The caller re-checks readiness after arming, before sleeping.
    pub fn arm(
        &mut self,
        fd: BorrowedFd<'_>,
        read: bool,
        write: bool,
    ) -> Option<(Vec<(i32, i16)>, bool)> {
        let ctx = self.ctx(fd);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        match self.up(fd) {
            Ok(t) => t.arm(&ctx, read, write).map(|f| (f, true)),
            // The HelloAck arrives on the kernel socket.
            Err(libc::EAGAIN) => Some((vec![(raw, libc::POLLIN | libc::POLLRDHUP)], false)),
            Err(_) => {
                let mut ev = 0;
                if read {
                    ev |= libc::POLLIN | libc::POLLRDHUP;
                }
                if write {
                    ev |= libc::POLLOUT;
                }
                Some((vec![(raw, ev)], false))
            }
        }
    }

    /// Ends a sleep prepared by `arm(read, write)`.
    pub fn disarm(&mut self, read: bool, write: bool) {
        if let State::Up(t) = &mut self.state {
            t.disarm(read, write);
        }
    }
}
