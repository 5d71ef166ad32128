//! One accelerated socket of the application: its transport, and the
//! socket calls translated into transport calls with the kernel's errno
//! semantics. Negotiation for connect/accept lives here too; the
//! interposed functions' handlers only look fds up and dispatch.
//!
//! Never here: a blocking wait (a `Sock` call is one non-blocking step,
//! made under the socket's lock: `io` waits outside it), or the fd table.

use crate::outcome::Outcome;
use ssock_client::negotiate::{
    accept_on, connect_start, fresh_tcp, plain_by_board, register_listener, Accepted, Started,
};
use ssock_client::transport::{Ctx, Leave, Ready, Transport};
use ssock_client::{Mode, Options, Session};
use ssock_rings::codec::FallbackReason;
use ssock_rings::notify::Gate;
use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// An accelerated socket as the fd table, the epoll sets and the waits
/// hold it: shared by every fd that names it, locked for each step.
pub type Entry = Arc<Mutex<Sock>>;

/// Locks a socket; a lock poisoned by a panic (caught at the C boundary)
/// is taken all the same: each step leaves the socket consistent.
pub fn lock(s: &Mutex<Sock>) -> MutexGuard<'_, Sock> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a socket stands.
enum State {
    /// Accelerated (its directions may still be on the kernel socket,
    /// `transport::handover`).
    Up(Box<dyn Transport>),
    /// devd said kernel TCP after all: the kernel socket is the connection.
    Kernel,
}

/// What `Sock::arm` prepared: the fds to sleep on (and their events), and
/// the transport's generation if it was armed.
pub type Arming = (Vec<(i32, i16)>, Option<u64>);

/// An accelerated socket.
pub struct Sock {
    state: State,
    spin: Duration,
    /// shutdown(SHUT_WR) or SHUT_RDWR was called here (with SHUT_RD:
    /// POLLHUP, as the kernel's socket shut down both ways; the transport
    /// also says so for a shutdown by another holder).
    write_shut: bool,
    /// shutdown(SHUT_RD) or SHUT_RDWR was called (reads are over for it,
    /// as once a reset's error was taken: `read_shut`).
    rd_shutdown: bool,
    /// The progress counters of the first readiness that said reset: one
    /// that finds the connection broken later says them again (no second
    /// edge for edge-triggered epoll, as the kernel's single wake-up).
    reset_seq: Option<[u64; 2]>,
    /// A send is waiting half done (see `io::send`): other sends wait.
    pub send_busy: bool,
    /// O_NONBLOCK of the socket, kept here so that no call needs F_GETFL:
    /// read at creation, updated by the shim's fcntl(F_SETFL) and
    /// ioctl(FIONBIO). (The flag belongs to the open file: a change made
    /// by another process sharing it after fork is not seen.)
    pub nonblocking: bool,
    /// SO_ERROR already reported the reset.
    error_reported: bool,
    /// An error a vectored call met after it had moved bytes, for the
    /// next call (see `io::after_some`), and whether it is one the kernel
    /// keeps as the socket's sk_err (a reset, a later message's error in
    /// recvmmsg), which POLLERR and SO_ERROR show; not an EPIPE a partial
    /// send met.
    deferred: Option<(i32, bool)>,
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
    // The shim reads the copy of the environment taken at load, which
    // never changes: read once.
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| ssock_rings::env::var_os("SSOCK_DISABLE").is_some_and(|v| v == "1"))
}

/// Makes the process's devd session now if it has none (see
/// `rawcalls::chroot`).
pub fn connect_session() {
    let _ = session_with(true);
}

/// The process-wide session (None while the wait after a try that found
/// no devd lasts: `Session::global`).
pub fn session() -> Option<Arc<Session>> {
    session_with(false)
}

/// The process-wide session; `now`: tried even during that wait, for a
/// call whose miss would last (a listener is registered only at listen, a
/// session outlives a chroot that hides devd's socket).
fn session_with(now: bool) -> Option<Arc<Session>> {
    if disabled() {
        return None;
    }
    let s = if now {
        Session::global_now()
    } else {
        Session::global()
    }?;
    // A devd started again does not know this process's listeners: they
    // are registered with it, once per new session (by the thread that
    // first sees the new count; again later if that session broke on the
    // way).
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let (seen, n) = (SEEN.load(Ordering::Relaxed), Session::replaced());
    if seen != n
        && SEEN
            .compare_exchange(seen, n, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        for fd in crate::table::listeners() {
            // SAFETY: a listener the table holds is the application's open
            // socket (its close removes it); one closed behind the shim's
            // back is found so below (and forgotten), one reused is
            // registered only if it listens (devd checks).
            let b = unsafe { crate::boundary::borrow(fd) };
            let listening = ssock_rings::sys::sockopt_int(b, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
                .is_ok_and(|v| v == 1);
            if !listening {
                crate::table::remove_listener(fd);
                continue;
            }
            let ok = register_listener(&s, b);
            log::info!("listener fd {fd} registered with devd started again: {ok}");
        }
        if s.is_broken() {
            // (Registered with a session that broke meanwhile: the next
            // one does it again.)
            let _ = SEEN.compare_exchange(n, seen, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
    Some(s)
}

pub fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
    ssock_rings::sys::get_nonblocking(fd).unwrap_or(false)
}

/// The address of `fd` if it is a TCP socket the shim handles (IPv4/IPv6
/// stream).
fn tcp_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    ssock_rings::sys::socket_type(fd)
        .is_ok_and(|t| t == libc::SOCK_STREAM)
        .then(|| ssock_rings::sys::local_addr(fd).ok())
        .flatten()
}

/// What the shim does with a connect(2) on a TCP socket.
pub enum Connect {
    /// Not ssock's connection (not a fresh TCP socket, no devd, or no
    /// registered listener serves the address): the kernel's connect as
    /// it is, nothing more asked of the socket.
    Plain,
    /// The listener board keeps the listener's connections on kernel TCP
    /// for now (`short_lived`): the kernel's connect as it is, counted in
    /// this session once it is under way. No Intent, no option read.
    Kept(Arc<Session>),
    /// Negotiated: Ok(Some) the socket is tracked, with what the kernel's
    /// connect said (0, or EINPROGRESS/EINTR while it goes on); Ok(None)
    /// kernel TCP, connected; Err the errno.
    Done(Result<Option<(Sock, i32)>, i32>),
}

/// connect(2) on a TCP socket: what the board says first, then the
/// negotiation (see [`Connect`]).
pub fn connect(fd: BorrowedFd<'_>, dst: SocketAddr, fresh: bool) -> Connect {
    // Only a fresh TCP socket is ssock's; a datagram socket never opens a
    // devd session, and a connect() called again is the kernel's alone.
    // `fresh`: socket(2) made it so (`known`), nothing to ask.
    if !fresh && !fresh_tcp(fd) {
        return Connect::Plain;
    }
    let Some(session) = session() else {
        return Connect::Plain;
    };
    match plain_by_board(&session, dst) {
        Some(FallbackReason::PeerNotEnabled) => return Connect::Plain,
        Some(FallbackReason::ShortLived) => {
            log::info!("connect to {dst}: kernel TCP (short_lived, by the board)");
            return Connect::Kept(session);
        }
        _ => {}
    }
    let opts = Options::with_session(session.clone());
    let spin = opts.spin(Some(&session));
    Connect::Done(match connect_start(fd, dst, &opts, Some(&session)) {
        Ok(Started::Kernel(r)) => {
            log::info!("connect to {dst}: kernel TCP ({r:?})");
            Ok(None)
        }
        Ok(Started::Up {
            transport,
            under_way,
        }) => {
            log::info!(
                "connect to {dst}: {:?}, connection {}",
                transport.mode(),
                transport.conn_id().unwrap_or(0)
            );
            let said = under_way.as_ref().map_or(0, errno);
            Ok(Some((
                Sock::new(State::Up(transport), spin, is_nonblocking(fd)),
                said,
            )))
        }
        Err(e) => {
            log::info!("connect to {dst}: {e}");
            Err(errno(&e))
        }
    })
}

/// listen(2) succeeded on `fd`: register it; its address if devd knows
/// it now.
pub fn listened(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    let at = tcp_addr(fd)?;
    session_with(true)
        .is_some_and(|s| register_listener(&s, fd))
        .then_some(at)
}

/// A socket accepted from a registered listener bound to `at`: negotiate.
/// None: plain.
pub fn accepted(fd: BorrowedFd<'_>, at: SocketAddr) -> Option<Sock> {
    let session = session()?;
    match accept_on(&session, fd, Some(at)) {
        Ok(Accepted::Attached(t)) => {
            let spin = Options::with_session(session.clone()).spin(Some(&session));
            let nb = is_nonblocking(fd);
            log::info!(
                "accept: {:?}, connection {}",
                t.mode(),
                t.conn_id().unwrap_or(0)
            );
            Some(Sock::new(State::Up(t), spin, nb))
        }
        Ok(Accepted::Kernel(r)) => {
            log::info!(
                "accept: kernel TCP ({})",
                r.map_or("not announced by an accelerated connector", |r| r.name())
            );
            None
        }
        Err(e) => {
            log::info!("accept: kernel TCP ({e})");
            None
        }
    }
}

/// What a socket this process got without negotiating it turned out to be.
pub enum Inherited {
    /// An accelerated connection, taken over.
    Conn(Sock),
    /// A listener (at this address), registered with devd again: the
    /// caller records it.
    Listener(SocketAddr),
    /// Anything else: not the shim's.
    Plain,
}

/// A TCP socket this process got without negotiating it (inherited across
/// exec, or received over a Unix socket): an accelerated connection is
/// taken over, a listener registered again.
pub fn inherited(fd: BorrowedFd<'_>) -> Inherited {
    if tcp_addr(fd).is_none() {
        return Inherited::Plain;
    }
    if ssock_rings::sys::peer_addr(fd).is_err() {
        // Not connected: a listener (registered again if it is one).
        if ssock_rings::sys::sockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
            .is_ok_and(|v| v == 1)
        {
            if let Some(at) = listened(fd) {
                return Inherited::Listener(at);
            }
        }
        return Inherited::Plain;
    }
    let Some(session) = session() else {
        return Inherited::Plain;
    };
    let spin = Options::with_session(session.clone()).spin(Some(&session));
    match ssock_client::negotiate::adopt(&session, fd) {
        Ok(Some(t)) => Inherited::Conn(Sock::new(State::Up(t), spin, is_nonblocking(fd))),
        Ok(None) => Inherited::Plain,
        Err(e) => {
            // Accelerated, but not usable here: its bytes would never
            // arrive on the kernel socket. End it, so the peer sees it.
            log::warn!(
                "an inherited accelerated socket cannot be taken over ({e}); shutting it down"
            );
            let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
            Inherited::Plain
        }
    }
}

/// Unregisters a listener that is being closed. A forked child does it
/// only through a session it already has, never a new one: closing its
/// copy of its parent's listener (PostgreSQL's backends, each
/// connection's) it would otherwise connect to devd only to say so, while
/// the parent still listens; devd finds a listening socket nobody holds
/// by itself (sock_diag, within seconds).
pub fn unlisten(fd: BorrowedFd<'_>) {
    let s = if ssock_rings::sys::child_of() == 0 {
        session()
    } else {
        Session::existing()
    };
    if let Some(s) = s.filter(|_| !disabled()) {
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
            write_shut: false,
            rd_shutdown: false,
            reset_seq: None,
            send_busy: false,
            nonblocking,
            error_reported: false,
            deferred: None,
        }
    }

    /// The transport; None: kernel TCP (devd said so after the connect:
    /// the transport let its end go).
    fn up(&mut self) -> Option<&mut Box<dyn Transport>> {
        if let State::Up(t) = &self.state {
            if t.mode() == Mode::Kernel {
                log::info!("connection turned out plain: kernel TCP");
                TURNED_PLAIN.fetch_add(1, std::sync::atomic::Ordering::Release);
                self.state = State::Kernel;
            }
        }
        match &mut self.state {
            State::Up(t) => Some(t),
            State::Kernel => None,
        }
    }

    /// SO_ERROR: the pending error of the connection, reported once (then
    /// 0), as the kernel's sk_err: one an earlier call kept as sk_err
    /// (`defer`) first, ECONNRESET after a reset. None: ask the kernel
    /// socket (no error here).
    pub fn so_error(&mut self, fd: BorrowedFd<'_>) -> Option<i32> {
        if let Some((e, true)) = self.deferred {
            self.deferred = None;
            return Some(e);
        }
        self.take_error(fd, true)
    }

    /// The error an earlier call kept for this one, taken.
    pub fn take_deferred(&mut self) -> Option<i32> {
        self.deferred.take().map(|(e, _)| e)
    }

    /// Keeps `err` for the next call (`deferred`), as the kernel keeps an
    /// error a call met after it had moved bytes; not EAGAIN. `sk_err`:
    /// the kernel keeps it as the socket's error (POLLERR, SO_ERROR), as
    /// it does a connection's failure; not, say, an EPIPE.
    pub fn defer(&mut self, err: i32, sk_err: bool) {
        if err != libc::EAGAIN {
            self.deferred = Some((err, sk_err));
        }
    }

    /// `so_error`, asking the kernel socket whether the peer is gone
    /// (`ask_socket`: a system call) or looking at the region alone.
    pub fn take_error(&mut self, fd: BorrowedFd<'_>, ask_socket: bool) -> Option<i32> {
        if self.error_reported {
            // Taken already. The kernel socket may still hold the same
            // reset as its own pending error (the liveness check polls
            // and does not take it): it is not reported twice.
            return Some(0);
        }
        let r = self.readiness(fd, ask_socket);
        let ctx = self.ctx(fd);
        let State::Up(t) = &self.state else {
            return None;
        };
        if !t.settled() {
            // Still on the kernel socket (a connect under way, or refused):
            // its own error is the connection's.
            return None;
        }
        if r.err || t.rest_coming() {
            // As the kernel once its error is taken: reads see the end,
            // writes EPIPE. (With the bytes before the reset still coming,
            // readiness tells no error yet; the reset is known all the
            // same, as the kernel's on an RST beside its receive queue.)
            let e = t.reset_errno(&ctx);
            self.error_reported = true;
            return Some(e);
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
            plain: self.nonblocking && crate::io::plain_call(),
        }
    }

    /// One non-blocking receive (MSG_PEEK honoured): Done(0) is end of
    /// stream, Errno(EAGAIN) means nothing yet; Kernel once the socket
    /// turned out plain.
    pub fn recv_now(&mut self, fd: BorrowedFd<'_>, buf: &mut [u8], peek: bool) -> Outcome<usize> {
        let ctx = self.ctx(fd);
        // After the program's own SHUT_RD, or once a reset's error was
        // taken (SO_ERROR, or a receive), the kernel still hands out what
        // it received, and says 0 instead of waiting when nothing is there.
        // (Another holder's SHUT_RD, a shared word, is looked at only when
        // the read would wait: not on the path that moves bytes.)
        let rd_shutdown = self.rd_shutdown;
        let taken = self.error_reported;
        let Some(t) = self.up() else {
            return Outcome::Kernel;
        };
        if buf.is_empty() {
            return Outcome::Done(0);
        }
        let r = if peek {
            t.peek(buf, &ctx)
        } else {
            t.read(buf, &ctx)
        };
        // (Bytes the peer sent before its reset still coming are no end
        // after the reset's error was taken: the kernel would hold them.)
        let no_wait = matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            && (rd_shutdown || t.reads_shut() || (taken && !t.rest_coming()));
        match r {
            Err(_) if no_wait => Outcome::Done(0),
            // (Taken already: the end.)
            Err(e) if taken && e.raw_os_error() == Some(libc::ECONNRESET) => Outcome::Done(0),
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                // The receive takes the error, as the kernel's sock_error:
                // reads see the end from now on, SO_ERROR and POLLERR no
                // more.
                self.error_reported = true;
                Outcome::Errno(libc::ECONNRESET)
            }
            r => r.map_err(|e| errno(&e)).into(),
        }
    }

    /// One non-blocking send: how much went, or Errno(EAGAIN) if none
    /// could; Kernel once the socket turned out plain.
    pub fn send_now(&mut self, fd: BorrowedFd<'_>, buf: &[u8]) -> Outcome<usize> {
        if self.error_reported {
            return Outcome::Errno(libc::EPIPE);
        }
        let ctx = self.ctx(fd);
        let Some(t) = self.up() else {
            return Outcome::Kernel;
        };
        match t.write(buf, &ctx) {
            // A reset not taken yet: this send takes it, as the kernel's
            // (its error once, EPIPE after).
            Err(e)
                if e.raw_os_error() == Some(libc::ECONNRESET)
                    || (e.raw_os_error() == Some(libc::EPIPE)
                        && t.mode() == ssock_rings::codec::Mode::Direct
                        && t.settled()
                        && t.readiness(&ctx, false).err) =>
            {
                // (EPIPE for a reset after the peer's end of stream.)
                let e = t.reset_errno(&ctx);
                self.error_reported = true;
                Outcome::Errno(e)
            }
            r => r.map_err(|e| errno(&e)).into(),
        }
    }

    /// shutdown(2): Kernel once the socket turned out plain.
    pub fn shutdown(&mut self, fd: BorrowedFd<'_>, how: i32) -> Outcome<()> {
        if ![libc::SHUT_RD, libc::SHUT_WR, libc::SHUT_RDWR].contains(&how) {
            return Outcome::Errno(libc::EINVAL);
        }
        // A connection over is the kernel's TCP_CLOSE: shutdown says
        // ENOTCONN, and still records what it was asked. (On the kernel
        // socket `over` says false and the look below says so.)
        let over = self.over(fd);
        let ctx = self.ctx(fd);
        let Some(t) = self.up() else {
            return Outcome::Kernel;
        };
        if !over && (how == libc::SHUT_WR || how == libc::SHUT_RDWR) {
            if let Err(e) = t.shutdown_write(&ctx) {
                return Outcome::Errno(errno(&e));
            }
        }
        // A thread blocked on this socket re-checks, and sees the change.
        t.wake_self();
        if how == libc::SHUT_WR || how == libc::SHUT_RDWR {
            self.write_shut = true;
        }
        if how == libc::SHUT_RD || how == libc::SHUT_RDWR {
            self.rd_shutdown = true;
            if let State::Up(t) = &mut self.state {
                t.shut_reads();
            }
        }
        if over {
            return Outcome::Errno(libc::ENOTCONN);
        }
        Outcome::Done(())
    }

    /// Whether the connection is over, as the kernel's socket in
    /// TCP_CLOSE: reset (its error taken or not), or shut down both ways
    /// (the peer's end of stream, and this end's with every byte before
    /// it taken), on whichever path each direction is. False on the
    /// kernel socket, or while a direction may still move and this end
    /// never shut its writes down (a connect may be under way).
    pub fn over(&mut self, fd: BorrowedFd<'_>) -> bool {
        let ctx = self.ctx(fd);
        let taken = self.error_reported;
        let shut = self.write_shut;
        let Some(t) = self.up() else {
            return false;
        };
        // (The look first: it is what settles an end whose peer moved.)
        let r = t.readiness(&ctx, true);
        // A Direct end's bytes in the ring are in its peer's receive
        // queue, which the kernel would have acknowledged; a Queued end's
        // TX buffers come back once the peer side has their bytes.
        let acked = t.mode() == ssock_rings::codec::Mode::Direct || t.pending(&ctx).1 == 0;
        // (The peer's end on one path and this end's on another: the
        // kernel socket alone does not know.)
        let both = r.hup || (r.rdhup && shut);
        // (A reset whose bytes before it are still coming is there all
        // the same: the kernel's socket is in TCP_CLOSE.)
        (t.settled() || shut) && (taken || r.err || t.rest_coming() || (both && acked))
    }

    /// Another process will hold the socket too (fork, or fd passing).
    pub fn fork_hold(&mut self) {
        if let State::Up(t) = &mut self.state {
            t.fork_hold();
        }
    }

    /// The fd is being closed with SO_LINGER 0 (then the last holder's close
    /// resets the connection, as the kernel's RST).
    pub fn closing(&mut self, fd: BorrowedFd<'_>) {
        let ctx = self.ctx(fd);
        let State::Up(t) = &mut self.state else {
            return;
        };
        let l = socket2::SockRef::from(&fd).linger();
        if matches!(l, Ok(Some(d)) if d.is_zero()) {
            t.abort_on_close();
        }
        t.close_on(&ctx);
    }

    /// This process is about to exec a program that will not take the
    /// socket over: its connection leaves the region for the kernel
    /// socket (`Transport::before_plain_exec`); what it did.
    pub fn before_plain_exec(&mut self, fd: BorrowedFd<'_>) -> Leave {
        let ctx = self.ctx(fd);
        match &mut self.state {
            State::Up(t) => t.before_plain_exec(&ctx),
            State::Kernel => Leave::Kernel,
        }
    }

    /// The connection's id, while it is accelerated.
    pub fn conn_id(&self) -> Option<u64> {
        match &self.state {
            State::Up(t) => t.conn_id(),
            State::Kernel => None,
        }
    }

    /// The socket may be read or written through the C library's stdio
    /// (`stdio.rs`): its connection leaves the region as for a plain exec,
    /// and, once it did, the socket is this process's kernel socket alone
    /// (every later call goes to libc, epoll sets give it back to the
    /// kernel's instance). What it did (`Kernel` also for a socket
    /// already let go of).
    pub fn leave_for_stdio(&mut self, fd: BorrowedFd<'_>) -> Leave {
        if matches!(self.state, State::Kernel) {
            return Leave::Kernel;
        }
        let left = self.before_plain_exec(fd);
        if left == Leave::Stays {
            return left;
        }
        // (Nothing is owed: what was is out, or the connection was reset.)
        if let State::Up(t) = &mut self.state {
            t.let_go_keeping_socket();
        }
        self.state = State::Kernel;
        TURNED_PLAIN.fetch_add(1, std::sync::atomic::Ordering::Release);
        left
    }

    /// Takes back a `fork_hold` (the fd passing failed).
    pub fn drop_hold(&mut self) {
        if let State::Up(t) = &mut self.state {
            t.drop_hold();
        }
    }

    /// (unread, unsent) bytes, for FIONREAD and SIOCOUTQ; Kernel once the
    /// socket turned out plain.
    pub fn pending(&mut self, fd: BorrowedFd<'_>) -> Outcome<(usize, usize)> {
        let ctx = self.ctx(fd);
        match self.up() {
            Some(t) => Outcome::Done(t.pending(&ctx)),
            None => Outcome::Kernel,
        }
    }

    /// The spin budget for waits on this socket (none while a direction is
    /// still on the kernel socket: looking there costs a system call, and
    /// a waiter sleeps on it).
    pub fn spin(&self) -> Duration {
        match &self.state {
            State::Up(t) if t.settled() => self.spin,
            _ => Duration::ZERO,
        }
    }

    /// The connection's own spin gate (a wait on it alone asks it).
    pub fn gate(&self) -> Option<Arc<Gate>> {
        match &self.state {
            State::Up(t) => t.gate(),
            _ => None,
        }
    }

    /// Whether a sleep that arms this socket also watches everything a
    /// look at its kernel socket would find (a gone peer, stray bytes): a
    /// Direct end with both directions in the region, whose `arm` puts the
    /// kernel socket in the sleep. Else (a direction still on the kernel
    /// socket, Queued, plain) waiters look before they sleep.
    pub fn watched_by_sleep(&mut self) -> bool {
        matches!(self.up(), Some(t) if t.settled() && t.mode() == Mode::Direct)
    }

    /// `Transport::quiet_sig` (None after SHUT_RD, or once plain).
    pub fn quiet_sig(&mut self) -> Option<ssock_client::transport::QuietSig> {
        if self.read_shut() {
            return None;
        }
        self.up().and_then(|t| t.quiet_sig())
    }

    /// Reads never wait: after SHUT_RD (by any holder of the socket), or
    /// once a reset's error was taken.
    fn read_shut(&self) -> bool {
        self.error_reported || self.rd_shut_by_any()
    }

    /// shutdown(SHUT_RD) by this process or another holder of the socket.
    fn rd_shut_by_any(&self) -> bool {
        self.rd_shutdown || matches!(&self.state, State::Up(t) if t.reads_shut())
    }

    /// Readiness for poll and friends (the kernel socket's, once the
    /// socket turned out plain).
    pub fn readiness(&mut self, fd: BorrowedFd<'_>, check_peer: bool) -> Ready {
        let ctx = self.ctx(fd);
        let rd_shutdown = self.rd_shut_by_any();
        let (write_shut, error_taken) = (self.write_shut, self.error_reported);
        let reset_seq = self.reset_seq;
        let mut first_reset = None;
        let mut r = match self.up() {
            Some(t) => {
                let mut r = t.readiness(&ctx, check_peer);
                // (Not while the bytes before the reset are still coming:
                // reads wait for them.)
                // (Asked only where it can matter: not on a quiet path.)
                let rest = (r.err || error_taken) && t.rest_coming();
                let read_shut = rd_shutdown || (error_taken && !rest);
                // (The transport's own counters, before this socket's
                // marks below. While the bytes before a reset still come,
                // their counters are news as on the kernel's queue: the
                // reset's own report is its last mark's.)
                if r.err && !rest {
                    match reset_seq {
                        Some(s) if r.seq == Ready::BROKEN.seq => r.seq = s,
                        Some(_) => {}
                        None => first_reset = Some(r.seq),
                    }
                }
                if read_shut {
                    // After SHUT_RD a read never waits (it takes what is
                    // there, else 0); the kernel's tcp_poll says POLLIN
                    // and POLLRDHUP then, and POLLHUP once the writes are
                    // shut down too.
                    r.readable = true;
                    r.rdhup = true;
                    r.hup |= write_shut || t.writes_shut();
                }
                if rd_shutdown {
                    // News for edge-triggered epoll once, as the kernel's
                    // wake-up at the shutdown (not a reset's report, which
                    // was news already).
                    r.seq[0] ^= 1 << 63;
                }
                if error_taken {
                    // SO_ERROR took the error: the kernel's POLLERR ends
                    // with it.
                    r.err = false;
                }
                r
            }
            None => return kernel_readiness(fd),
        };
        if first_reset.is_some() {
            self.reset_seq = first_reset;
        }
        if matches!(self.deferred, Some((_, true))) {
            // An error kept for the next call as the kernel's sk_err:
            // POLLERR until a call or SO_ERROR takes it.
            r.err = true;
        }
        r
    }

    /// Arms for a sleep: the fds to sleep on, and the transport's
    /// generation if it was armed (then `disarm` must follow, with it);
    /// None if broken (ready).
    /// The caller re-checks readiness after arming, before sleeping.
    pub fn arm(&mut self, fd: BorrowedFd<'_>, read: bool, write: bool) -> Option<Arming> {
        let ctx = self.ctx(fd);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        match self.up() {
            // (Its generation once armed: arming may have taken a new end.)
            Some(t) => t.arm(&ctx, read, write).map(|f| (f, Some(t.generation()))),
            None => {
                let mut ev = 0;
                if read {
                    ev |= libc::POLLIN | libc::POLLRDHUP;
                }
                if write {
                    ev |= libc::POLLOUT;
                }
                Some((vec![(raw, ev)], None))
            }
        }
    }

    /// Ends a sleep prepared by `arm(read, write)`, which armed the
    /// transport at generation `gen`.
    pub fn disarm(&mut self, read: bool, write: bool, gen: u64) {
        if let State::Up(t) = &mut self.state {
            t.disarm_from(read, write, gen);
        }
    }

    /// Parks a settled Direct end on `sleep` (an epoll set's doorbell):
    /// if parked, its generation and the token its peer's rings carry
    /// (the connection's id, 0 if none).
    pub fn park(
        &mut self,
        sleep: ssock_client::bells::Sleep,
        read: bool,
        write: bool,
    ) -> Option<(u64, u64)> {
        let t = self.up()?;
        t.park(sleep, read, write)
            .then(|| (t.generation(), t.conn_id().unwrap_or(0)))
    }

    /// Arms a parking of generation `gen` on doorbell `id` again (see
    /// `Transport::repark`): whether it is still there.
    pub fn repark(&mut self, id: u32, gen: u64) -> bool {
        match &mut self.state {
            State::Up(t) => t.repark_from(id, gen),
            _ => false,
        }
    }

    /// Ends a parking of generation `gen` on doorbell `id`.
    pub fn unpark(&mut self, id: u32, gen: u64) {
        if let State::Up(t) = &mut self.state {
            t.unpark_from(id, gen);
        }
    }
}
