//! Negotiation (DESIGN 3.2) on a kernel socket the caller owns: the Rust
//! API's `TcpStream`s, or an application's own fd under the preload shim.
//! No application byte moves before the decision, and a peer that did not
//! announce itself never sees a Hello.

use crate::session::Session;
use crate::stream::Options;
use crate::transport::direct::{self, Direct, Parked, Source};
use crate::transport::queued::Queued;
use crate::transport::Transport;
use socket2::{SockRef, Socket};
use ssock_rings::codec::{
    self, Attachment, FallbackReason, Mode, ModePref, Request, Response, ACK_ACCEPT, ACK_KERNEL,
    HELLO_LEN,
};
use ssock_rings::notify::Spin;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

/// How negotiation ended for a connector.
#[derive(Debug)]
pub enum Outcome {
    /// devd attached this end.
    Attached(Pending),
    /// Kernel TCP, with the reason when there is one.
    Kernel(Option<FallbackReason>),
}

/// How negotiation ended for an accepted socket.
#[derive(Debug)]
pub enum Accepted {
    /// Accelerated: the transport to use.
    Attached(Box<dyn Transport>),
    /// Kernel TCP (a plain peer, or a refusal), with the reason if any.
    Kernel(Option<FallbackReason>),
    /// The peer announced itself but sent no valid Hello: drop it (its
    /// stream position is unknown, so it cannot be served as plain TCP).
    Dropped,
}

/// Records a fallback decided on this side in devd's totals.
pub fn report(session: Option<&Arc<Session>>, reason: FallbackReason) {
    if let Some(s) = session {
        let _ = s.request(&Request::Fallback { reason }, &[]);
    }
}

/// Builds the transport devd attached; if this end cannot use it, tells
/// devd to release it so nothing stays held.
pub fn attach(session: &Arc<Session>, pending: Pending) -> io::Result<Box<dyn Transport>> {
    build(session, pending, false)
}

/// The transport of an Attached reply: attached (a new holder), or taken
/// over (`adopt`: the hold was counted elsewhere; Direct only). An end this
/// side cannot use is released at once.
fn build(session: &Arc<Session>, p: Pending, adopt: bool) -> io::Result<Box<dyn Transport>> {
    let Pending {
        attachment: a,
        fds,
        parked,
        keep,
    } = p;
    let s = Some(session.clone());
    fn boxed<T: Transport + 'static>(
        r: Result<T, impl std::fmt::Display>,
    ) -> Result<Box<dyn Transport>, String> {
        r.map(|t| Box::new(t) as Box<dyn Transport>)
            .map_err(|e| e.to_string())
    }
    let src = match parked {
        Some(p) => Source::Parked(p),
        None => Source::Fds(fds),
    };
    let t = match (a.mode, adopt, src) {
        (Mode::Direct, false, src) => boxed(Direct::attach(&a, src, s, keep)),
        (Mode::Direct, true, src) => boxed(Direct::adopt(&a, src, s)),
        (Mode::Queued, false, Source::Fds(fds)) => boxed(Queued::attach(&a, fds, s)),
        (Mode::Queued, false, Source::Parked(_)) => Err("a Queued end reuses no region".into()),
        (Mode::Queued, true, _) => Err("only a Direct connection can be taken over".into()),
        (Mode::Kernel, ..) => Err("devd attached a kernel-mode connection".into()),
    };
    t.map_err(|why| {
        // This end will not be used: devd releases it at once.
        let _ = session.post(&Request::Release {
            conn_id: a.conn_id,
            side: a.side,
            park: false,
        });
        io::Error::other(why)
    })
}

/// Takes over the accelerated connection behind `fd`, a TCP socket this
/// process got without negotiating it: inherited across exec, or received
/// over a Unix socket. Ok(None): devd knows no connection on that socket
/// (a plain one), or cannot be asked. Only Direct ends can be taken over
/// (a Queued end's state lives partly in the process that had it): an
/// accelerated end that cannot be used here is an error.
pub fn adopt(session: &Arc<Session>, fd: BorrowedFd<'_>) -> io::Result<Option<Box<dyn Transport>>> {
    match session.request(&Request::Attach, &[fd]) {
        Ok(resp) => build(session, Pending::from_reply(resp)?, true).map(Some),
        Err(crate::session::SessionError::Refused { .. }) => Ok(None),
        Err(e) => {
            // Without devd nothing can be known: the socket is left as it is.
            log::warn!("devd unreachable, an inherited socket stays as it is: {e}");
            Ok(None)
        }
    }
}

/// Reads exactly `buf.len()` bytes from `fd` within `timeout`, blocking
/// or not: what is there already costs one recv, and the socket's own
/// receive timeout (it may be the application's) is left alone. For the
/// first `spin` it polls with recv (a local peer usually answers within
/// tens of microseconds, and a sleep and wake-up costs more than that),
/// then sleeps in poll. A timeout is a WouldBlock error, the end of the
/// stream an UnexpectedEof one.
fn read_exact_within(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    timeout: Duration,
    spin: Duration,
) -> io::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let mut spin = Spin::new(spin);
    let mut got = 0;
    while got < buf.len() {
        match ssock_rings::sys::recv(fd, &mut buf[got..], libc::MSG_DONTWAIT) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if spin.again() {
                    continue;
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::WouldBlock, "timed out"));
                }
                let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
                let mut p = [ssock_rings::sys::PollFd::new(raw, libc::POLLIN)];
                match ssock_rings::sys::poll(&mut p, Some(left)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long a connector waiting for its HelloAck polls before it sleeps:
/// about what the acceptor's claim takes (measured: 35-60 us here).
const ACK_SPIN: Duration = Duration::from_micros(100);

/// How long an acceptor told to expect a Hello polls for it before it
/// sleeps: a blocking connector connects while devd handles its Intent and
/// writes the Hello once devd has answered it, just before devd answers
/// the acceptor's Claim (measured: 5.6-5.7 k connections/s without, 5.7-6.2 k
/// with 30-60 us).
const HELLO_SPIN: Duration = Duration::from_micros(30);

/// Starts counting forks (see `ssock_rings::sys::watch_forks`): an end is
/// kept for reuse only if no fork happened since it came. Called before
/// the first end comes; the preload shim calls it at load.
pub fn watch_forks() {
    ssock_rings::sys::watch_forks();
}

/// An end devd created but this side has not started using, for
/// [`attach`]: the attachment and its fds, or the kept region it reuses.
#[derive(Debug)]
pub struct Pending {
    /// What devd attached.
    pub attachment: Attachment,
    /// Its fds (none when it reuses a kept region).
    pub fds: Vec<OwnedFd>,
    /// The kept region a reusing attachment names, taken off this
    /// process's shelf when the reply came (None: not kept here).
    parked: Option<Parked>,
    /// The fork count when it came (see `Direct`'s field of that name);
    /// None for an end attached by its socket.
    keep: Option<u64>,
}

impl Pending {
    /// An end devd handed out, with its fds; a reused region is taken off
    /// the shelf now, so that nothing pushes it out before it is used.
    pub fn new(attachment: Attachment, fds: Vec<OwnedFd>) -> Pending {
        watch_forks();
        let keep = ssock_rings::sys::forks();
        let parked = if attachment.reuse {
            direct::unpark(attachment.region, attachment.side)
        } else {
            None
        };
        Pending {
            attachment,
            fds,
            parked,
            keep,
        }
    }

    /// The end in an Attached reply (never kept: devd keeps no region
    /// attached by socket).
    fn from_reply((resp, fds): (Response, Vec<OwnedFd>)) -> io::Result<Pending> {
        match resp {
            Response::Attached(attachment) => Ok(Pending {
                attachment,
                fds,
                parked: None,
                keep: None,
            }),
            _ => Err(io::Error::other("devd answered Attach with something else")),
        }
    }

    /// Whether this process can use it: devd may name a kept region this
    /// process no longer has (pushed off its shelf, or kept by the parent
    /// of a forked child); that end is then attached by its socket, once
    /// the connection is accepted (the region itself is the same).
    pub fn usable(&self) -> bool {
        !self.attachment.reuse || self.parked.is_some()
    }
}

/// This side's end of the connection on `fd`, with its fds, asked for by
/// the socket (Attach).
fn attach_by_socket(session: &Arc<Session>, fd: BorrowedFd<'_>) -> io::Result<Pending> {
    session
        .request(&Request::Attach, &[fd])
        .map_err(io::Error::other)
        .and_then(Pending::from_reply)
}

/// Tells devd this side will not use `pending` (posted: nothing waits).
pub fn release(session: &Arc<Session>, pending: &Pending) {
    let a = &pending.attachment;
    let _ = session.post(&Request::Release {
        conn_id: a.conn_id,
        side: a.side,
        park: false,
    });
}

/// Connector side on `fd`, an unconnected blocking TCP socket: announce the
/// intent (devd creates the connection and hands this end over; it keeps a
/// duplicate of the socket and learns its port from it once it has
/// connected), connect, send the Hello, wait for the HelloAck. The socket
/// is not bound first: an explicit bind to port 0 costs a search of the
/// kernel's bind table, slow with many TIME_WAIT sockets.
pub fn connect_on(
    fd: BorrowedFd<'_>,
    dst: SocketAddr,
    opts: &Options,
    session: Option<&Arc<Session>>,
) -> io::Result<Outcome> {
    match connect_start(fd, dst, opts, session)? {
        Started::Kernel(reason) => Ok(Outcome::Kernel(reason)),
        Started::HelloSent { pending, .. } => {
            let session = session.ok_or_else(|| io::Error::other("no devd session"))?;
            connect_finish(fd, session, Some(opts.ack_timeout), &mut Some(pending))?
                .ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))
        }
    }
}

/// Connector side for a blocking caller that uses the transport at once
/// (`Stream::connect_with`), on a fresh socket: like [`connect_on`], but
/// this end is mapped while the acceptor claims its own, before the
/// HelloAck is read (mapping is on the connector's critical path
/// otherwise). Ok(Err(reason)): kernel TCP. A HelloAck KERNEL, or none,
/// drops the mapped end, which releases it.
pub fn connect_mapped(
    fd: BorrowedFd<'_>,
    dst: SocketAddr,
    opts: &Options,
    session: Option<&Arc<Session>>,
) -> io::Result<Result<Box<dyn Transport>, Option<FallbackReason>>> {
    let pending = match connect_start(fd, dst, opts, session)? {
        Started::Kernel(reason) => return Ok(Err(reason)),
        Started::HelloSent { pending, .. } => pending,
    };
    let session = session.ok_or_else(|| io::Error::other("no devd session"))?;
    if !pending.usable() {
        // Attached by its socket once the acceptor has claimed it.
        return match connect_finish(fd, session, Some(opts.ack_timeout), &mut Some(pending))? {
            Some(Outcome::Attached(p)) => attach(session, p)
                .inspect_err(|_| {
                    // The acceptor waits on the rings: end the kernel
                    // connection, which it watches.
                    let _ = SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
                })
                .map(Ok),
            Some(Outcome::Kernel(r)) => Ok(Err(r)),
            None => Err(io::ErrorKind::TimedOut.into()),
        };
    }
    let t = attach(session, pending).inspect_err(|_| {
        // The end is released; the acceptor, if it answers ACCEPT, maps
        // its own and would wait on rings nobody serves: end the kernel
        // connection, which it watches.
        let _ = SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
    })?;
    let mut t = t;
    match read_ack(fd, Some(opts.ack_timeout)) {
        Ok(Some(true)) => Ok(Ok(t)),
        r => {
            // Never used (devd freed it, or will): not kept.
            t.discard_region();
            r?;
            Ok(Err(Some(FallbackReason::Refused)))
        }
    }
}

/// How the first half of a connector's negotiation ended.
#[derive(Debug)]
pub enum Started {
    /// Kernel TCP: the socket is connected (or, if nonblocking, its kernel
    /// connect is under way), with the reason when there is one.
    Kernel(Option<FallbackReason>),
    /// Connected and the Hello sent: [`connect_finish`] reads the HelloAck.
    /// This end (devd created the connection at the intent) waits for it.
    HelloSent {
        /// This end.
        pending: Pending,
        /// Whether the socket is nonblocking (as the caller found it).
        nonblocking: bool,
    },
}

/// First half of the connector side: announce the intent, connect, send the
/// Hello. A nonblocking socket that devd sends down the
/// plain path gets the kernel's own nonblocking connect (EINPROGRESS); one
/// with an intent is connected and greeted blocking (its acceptor is a
/// registered local listener), then made nonblocking again. The HelloAck
/// is left to [`connect_finish`], so a program that accepts its own
/// connection after connect() returns does not deadlock.
pub fn connect_start(
    fd: BorrowedFd<'_>,
    dst: SocketAddr,
    opts: &Options,
    session: Option<&Arc<Session>>,
) -> io::Result<Started> {
    let sock = SockRef::from(&fd);
    let plain = |reason: Option<FallbackReason>| -> io::Result<Started> {
        sock.connect(&dst.into())?;
        Ok(Started::Kernel(reason))
    };
    let Some(session) = session else {
        return plain((opts.mode == ModePref::Kernel).then_some(FallbackReason::Requested));
    };
    let intent = Request::Intent {
        dst,
        pref: opts.mode,
    };
    let nonblocking = ssock_rings::sys::get_nonblocking(fd)?;
    // A blocking socket to a loopback address connects while devd handles
    // the intent (the reply is read after connect() returns; the session
    // is this thread's meanwhile, which a loopback connect keeps short).
    // Others ask first: a nonblocking socket on the plain path must get
    // the kernel's own nonblocking connect, and a connect to another
    // address may take seconds, which would hold the session that long.
    let overlap = !nonblocking && dst.ip().to_canonical().is_loopback();
    let (reply, connected) = if !overlap {
        (session.request(&intent, &[fd]), None)
    } else {
        match session.begin(&intent, &[fd]) {
            Ok(inflight) => {
                let c = sock.connect(&dst.into());
                (inflight.finish(), Some(c))
            }
            Err(e) => (Err(e), None),
        }
    };
    let (token, pending) = match reply {
        Ok((Response::Proceed { token, attachment }, fds)) => {
            (token, Pending::new(attachment, fds))
        }
        r => {
            let reason = match r {
                Ok((Response::Kernel { reason }, _)) => reason,
                _ => {
                    report(Some(session), FallbackReason::DevdError);
                    FallbackReason::DevdError
                }
            };
            match connected {
                Some(c) => c?,
                None => sock.connect(&dst.into())?,
            }
            return Ok(Started::Kernel(Some(reason)));
        }
    };
    let greeted = match connected {
        Some(c) => c.and_then(|()| {
            let mut w: &Socket = &sock;
            w.write_all(&codec::hello(token))
        }),
        // Connected and greeted blocking (its acceptor is a registered
        // local listener), then made nonblocking again if it was.
        None => (|| {
            if nonblocking {
                ssock_rings::sys::set_nonblocking(fd, false)?;
            }
            let greeted = sock.connect(&dst.into()).and_then(|()| {
                let mut w: &Socket = &sock;
                w.write_all(&codec::hello(token))
            });
            if nonblocking {
                ssock_rings::sys::set_nonblocking(fd, true)?;
            }
            greeted
        })(),
    };
    if let Err(e) = greeted {
        release(session, &pending);
        return Err(e);
    }
    Ok(Started::HelloSent {
        pending,
        nonblocking,
    })
}

/// Second half of the connector side: reads the HelloAck (waiting up to
/// `wait`; None: only if it is there already). Ok(None): no HelloAck yet.
/// Once it is decided, `pending` (this end, from the intent) is taken: the
/// outcome carries it, or devd is told it will not be used. Without it (a
/// process forked before the HelloAck, whose own session must ask), or
/// when it reuses a kept region this process does not have, the end is
/// attached by its socket.
pub fn connect_finish(
    fd: BorrowedFd<'_>,
    session: &Arc<Session>,
    wait: Option<Duration>,
    pending: &mut Option<Pending>,
) -> io::Result<Option<Outcome>> {
    let accepted = match read_ack(fd, wait) {
        Ok(None) => return Ok(None),
        Ok(Some(a)) => a,
        Err(e) => {
            if let Some(p) = pending.take() {
                release(session, &p);
            }
            return Err(e);
        }
    };
    if !accepted {
        if let Some(p) = pending.take() {
            release(session, &p);
        }
        return Ok(Some(Outcome::Kernel(Some(FallbackReason::Refused))));
    }
    let resp = match pending.take() {
        Some(p) if p.usable() => p,
        // Attached by its socket: a process forked before the HelloAck,
        // or a reused region this process does not have.
        _ => attach_by_socket(session, fd).map_err(|e| {
            // The acceptor is on the rings, which this side cannot
            // reach: end the kernel connection, which it watches.
            let _ = SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
            io::Error::other(format!("ssock: attach failed after HelloAck: {e}"))
        })?,
    };
    Ok(Some(Outcome::Attached(resp)))
}

/// Waits up to `grace` for a whole HelloAck to be readable on `fd`,
/// polling with recv for the first [`ACK_SPIN`] of it (the preload
/// shim's blocking connect, which then reads it with [`connect_finish`]).
pub fn await_ack(fd: BorrowedFd<'_>, grace: Duration) -> bool {
    let start = std::time::Instant::now();
    let mut b = [0u8; HELLO_LEN];
    let peek = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    let mut spin = Spin::new(ACK_SPIN);
    loop {
        match ssock_rings::sys::recv(fd, &mut b, peek) {
            Ok(n) if n == HELLO_LEN => return true,
            // The end of the stream, or an error: let the reader see it.
            Ok(0) => return true,
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return true,
            _ => {}
        }
        let spent = start.elapsed();
        if spent >= grace {
            return false;
        }
        if spin.again() {
            continue;
        }
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let mut p = [ssock_rings::sys::PollFd::new(raw, libc::POLLIN)];
        if !matches!(ssock_rings::sys::poll(&mut p, Some(grace - spent)), Ok(n) if n > 0) {
            return false;
        }
        // Readable: go round once more to see whether it is all there.
        if start.elapsed() >= grace {
            return ssock_rings::sys::recv(fd, &mut b, peek).is_ok_and(|n| n == HELLO_LEN);
        }
    }
}

/// Reads the HelloAck: Some(true) ACCEPT, Some(false) KERNEL, None (only
/// without `wait`) not all there yet.
fn read_ack(fd: BorrowedFd<'_>, wait: Option<Duration>) -> io::Result<Option<bool>> {
    let mut ack = [0u8; HELLO_LEN];
    match wait {
        Some(t) => read_exact_within(fd, &mut ack, t, ACK_SPIN).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("ssock: no HelloAck from the acceptor: {e}"),
            )
        })?,
        None => {
            // Only a whole HelloAck is taken: peek first.
            let peek = libc::MSG_PEEK | libc::MSG_DONTWAIT;
            match ssock_rings::sys::recv(fd, &mut ack, peek) {
                Ok(n) if n == HELLO_LEN => {}
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::ECONNRESET)),
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
            ssock_rings::sys::recv(fd, &mut ack, libc::MSG_DONTWAIT)?;
        }
    }
    Ok(Some(
        codec::parse_hello_ack(&ack).map_err(io::Error::other)? != ACK_KERNEL,
    ))
}

/// Acceptor side on `fd`, a freshly accepted blocking socket of a listener
/// registered with `session`: claim the intent (none: a plain peer, served
/// at once; devd hands this end over with the claim), read the Hello
/// (bounded), answer with the HelloAck.
pub fn accept_on(
    session: &Arc<Session>,
    fd: BorrowedFd<'_>,
    opts: &Options,
) -> io::Result<Accepted> {
    // Ok: this side's end; Err: devd said kernel TCP (and counted why).
    let (token, end) = match session.request(&Request::Claim, &[fd]) {
        Ok((Response::Expect { token, attachment }, fds)) => {
            (token, Ok(Pending::new(attachment, fds)))
        }
        Ok((Response::ExpectKernel { token, reason }, _)) => (token, Err(reason)),
        _ => return Ok(Accepted::Kernel(None)),
    };
    let end = match end {
        // A reused region this process does not have: the same end, with
        // its fds, attached by the accepted socket (failing that, the
        // connection stays on kernel TCP).
        Ok(p) if !p.usable() => match attach_by_socket(session, fd) {
            Ok(fresh) => Ok(fresh),
            Err(e) => {
                log::warn!("attaching a reused region failed ({e}); kernel TCP");
                release(session, &p);
                report(Some(session), FallbackReason::DevdError);
                Err(FallbackReason::DevdError)
            }
        },
        other => other,
    };
    let drop_end = |why: FallbackReason| {
        if let Ok(p) = &end {
            release(session, p);
        }
        report(Some(session), why);
        Ok(Accepted::Dropped)
    };
    let mut hello = [0u8; HELLO_LEN];
    if let Err(e) = read_exact_within(fd, &mut hello, opts.hello_timeout, HELLO_SPIN) {
        log::warn!("announced peer sent no Hello ({e}); dropping the connection");
        return drop_end(FallbackReason::HelloTimeout);
    }
    match codec::parse_hello(&hello) {
        Ok(t) if t == token => {}
        r => {
            let reason = match r {
                Err(codec::DecodeError::Version { .. }) => FallbackReason::Version,
                _ => FallbackReason::BadHello,
            };
            log::warn!("announced peer sent a bad Hello; dropping the connection");
            return drop_end(reason);
        }
    }
    let sock = SockRef::from(&fd);
    let mut w: &Socket = &sock;
    let end = match end {
        Ok(end) => end,
        Err(reason) => {
            // devd's policy said no: the Hello is consumed, the connector
            // is told to stay on kernel TCP.
            w.write_all(&codec::hello_ack(ACK_KERNEL))?;
            return Ok(Accepted::Kernel(Some(reason)));
        }
    };
    // The HelloAck first: the connector maps its end while this side maps
    // its own. Should this side then fail to map (it never has), the
    // connector is already on the rings: the connection is ended, as an
    // announced peer with a bad Hello is.
    if let Err(e) = w.write_all(&codec::hello_ack(ACK_ACCEPT)) {
        release(session, &end);
        return Err(e);
    }
    match attach(session, end) {
        Ok(t) => Ok(Accepted::Attached(t)),
        Err(e) => {
            log::warn!("attaching failed after the HelloAck ({e}); dropping the connection");
            report(Some(session), FallbackReason::DevdError);
            Ok(Accepted::Dropped)
        }
    }
}

/// Registers a listening socket with devd; false if devd is unreachable or
/// refused (its connections then stay plain).
pub fn register_listener(session: &Arc<Session>, fd: BorrowedFd<'_>) -> bool {
    session.request(&Request::Listen, &[fd]).is_ok()
}

/// Connector side for the Rust API: a new socket for `dst`, negotiated.
pub fn negotiate_connect(dst: SocketAddr, opts: &Options) -> io::Result<Negotiated> {
    let session = opts.session();
    let sock = Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        None,
    )?;
    let outcome = connect_on(sock.as_fd(), dst, opts, session.as_ref())?;
    Ok(Negotiated {
        tcp: sock.into(),
        session,
        outcome,
    })
}

/// A connected kernel socket after negotiation, before a transport is built.
#[derive(Debug)]
pub struct Negotiated {
    /// The connected kernel socket (the Hello exchange is done).
    pub tcp: std::net::TcpStream,
    /// The session used, if any.
    pub session: Option<Arc<Session>>,
    /// What was agreed.
    pub outcome: Outcome,
}
