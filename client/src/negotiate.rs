//! Negotiation (DESIGN 3.2) on a kernel socket the caller owns: the Rust
//! API's `TcpStream`s, or an application's own fd under the preload shim.
//! Nothing of ssock's ever travels on the kernel socket: devd pairs the two
//! sockets by their addresses (the connector's Intent, the acceptor's
//! Claim), and each direction moves from the kernel socket to the region
//! at a published offset (`transport::handover`). A connect is the
//! kernel's own connect, blocking or not.

use crate::options::Options;
use crate::session::Session;
use crate::transport::direct::{self, Direct, Parked, Source};
use crate::transport::handover::Handover;
use crate::transport::queued::Queued;
use crate::transport::Transport;
use socket2::{SockRef, Socket};
use ssock_rings::board::{self, Found};
use ssock_rings::codec::{Attachment, FallbackReason, Mode, ModePref, Request, Response};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

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
    /// Kernel TCP (a plain peer, a refusal, an end this side cannot
    /// use), with the reason if any.
    Kernel(Option<FallbackReason>),
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
        (Mode::Direct, false, src) => boxed(Direct::attach(&a, src, s, keep)).map(Handover::wrap),
        (Mode::Direct, true, src) => boxed(Direct::adopt(&a, src, s)).map(Handover::adopt),
        (Mode::Queued, false, Source::Fds(fds)) => {
            boxed(Queued::attach(&a, fds, s)).map(Handover::wrap)
        }
        (Mode::Queued, true, Source::Fds(fds)) => {
            boxed(Queued::adopt(&a, fds, s)).map(Handover::adopt)
        }
        (Mode::Queued, _, Source::Parked(_)) => Err("a Queued end reuses no region".into()),
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
/// (a plain one), or cannot be asked. Direct and Queued ends are taken
/// over (their state is in their regions); an accelerated end that cannot
/// be used here is an error.
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
    match session.request(&Request::Attach, &[fd]) {
        Ok(r) => Pending::from_reply(r),
        // ENOENT keeps its code: devd knows no end on this socket.
        Err(crate::session::SessionError::Refused { code, .. })
            if i32::try_from(code) == Ok(libc::ENOENT) =>
        {
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        }
        Err(e) => Err(io::Error::other(e)),
    }
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

/// This end of a paired connection, or why there is none (kernel TCP).
type Paired = Result<Pending, Option<FallbackReason>>;

/// Whether a connect error means the kernel's connect goes on without
/// the caller (nonblocking, or interrupted by a signal): the end stays.
fn under_way(e: &io::Error) -> bool {
    // Not EALREADY: a socket that has not started connecting never says
    // it, and one that has (its number's `fresh` mark gone stale: another
    // fd of the same socket connected it) is the kernel's alone.
    matches!(e.raw_os_error(), Some(libc::EINPROGRESS | libc::EINTR))
}

/// The connector's half of the pairing on `fd`, a TCP socket that has not
/// started connecting (see [`fresh_tcp`]): the Intent (devd creates the connection and keeps a duplicate
/// of the socket, to pair it with the acceptor's by address), then the
/// kernel's own connect, blocking or not. The socket is not bound first:
/// an explicit bind to port 0 costs a search of the kernel's bind table,
/// slow with many TIME_WAIT sockets. Returns this end (or why not) and the
/// connect's error when it goes on without the caller (EINPROGRESS,
/// EINTR); any other connect error lets the end go and is returned.
fn intent_and_connect(
    fd: BorrowedFd<'_>,
    dst: SocketAddr,
    opts: &Options,
    session: Option<&Arc<Session>>,
) -> io::Result<(Paired, Option<io::Error>)> {
    let sock = SockRef::from(&fd);
    let connect = || match sock.connect(&dst.into()) {
        Ok(()) => Ok(None),
        Err(e) if under_way(&e) => Ok(Some(e)),
        Err(e) => Err(e),
    };
    let Some(session) = session else {
        let reason = (opts.mode == ModePref::Kernel).then_some(FallbackReason::Requested);
        return Ok((Err(reason), connect()?));
    };
    let (plain, ends_a_hold) = by_board(session, dst);
    if let Some(reason) = plain {
        let c = connect()?;
        if reason == FallbackReason::ShortLived {
            session.skipped();
        }
        return Ok((Err(Some(reason)), c));
    }
    let intent = Request::Intent {
        dst,
        pref: opts.mode,
        // Queued ends wake through devd's eventfds: no doorbell.
        bell: if opts.mode == ModePref::Queued {
            0
        } else {
            crate::bells::own_id(session)
        },
    };
    // A connect that returns at once (to a loopback address, or
    // nonblocking: asked of the kernel only for other addresses) runs
    // while devd handles the intent: the reply is read after it (the
    // session is this thread's meanwhile). A blocking connect to another
    // address may take seconds: the reply first. So is it for an Intent
    // that ends its listener's hold (`by_board`).
    let overlap = !ends_a_hold
        && (dst.ip().to_canonical().is_loopback() || ssock_rings::sys::get_nonblocking(fd)?);
    let (reply, connected) = if overlap {
        match session.begin(&intent, &[fd]) {
            Ok(inflight) => {
                let c = connect();
                (inflight.finish(), c)
            }
            Err(e) => (Err(e), connect()),
        }
    } else {
        let r = session.request(&intent, &[fd]);
        (r, connect())
    };
    let end = match reply {
        Ok((Response::Proceed { attachment, .. }, fds)) => {
            // A spare doorbell for the next child, if the last went to
            // one: only for an accelerated end, which a child may sleep on
            // (a plain connection asks devd nothing more).
            crate::bells::refill(session);
            Ok(Pending::new(attachment, fds))
        }
        Ok((Response::Kernel { reason }, _)) => Err(Some(reason)),
        _ => {
            report(Some(session), FallbackReason::DevdError);
            Err(Some(FallbackReason::DevdError))
        }
    };
    match connected {
        Ok(under_way) => Ok((end, under_way)),
        Err(e) => {
            if let Ok(p) = &end {
                release(session, p);
            }
            Err(e)
        }
    }
}

/// Whether `fd` is a TCP socket that has not started connecting (TCP_INFO
/// state `TCP_CLOSE`), the only kind a connect may pair or count. Not one:
/// a socket already connecting or connected (a nonblocking connect()
/// called again, which says EALREADY during the handshake and 0 once it is
/// done; a retry after EINTR) was decided at its first call and is never
/// paired now (the bytes it may have carried are in no offset) nor counted
/// again; and a socket that is not TCP is not ssock's. The library's own
/// sockets are fresh; the preload shim asks before anything else (one
/// system call, which also keeps a datagram socket from opening a session).
pub fn fresh_tcp(fd: BorrowedFd<'_>) -> bool {
    ssock_rings::sys::tcp_state(fd).ok() == Some(ssock_rings::sys::TCP_STATE_CLOSE)
}

/// Whether devd's listener board says a connection to `dst` stays on
/// kernel TCP without asking devd: no registered listener serves it
/// (`peer_not_enabled`, not counted: not ssock's connection), or the
/// `short_lived` policy keeps that listener's connections there for now.
/// None: ask devd (the board cannot tell, or the listener is accelerated,
/// or held only for connectors not under ssock).
pub fn plain_by_board(session: &Session, dst: SocketAddr) -> Option<FallbackReason> {
    by_board(session, dst).0
}

/// [`plain_by_board`], and whether the listener is held only for
/// connectors not under ssock: this connector's Intent ends that hold, and
/// its answer must come before the connect, so that the acceptor, which
/// claims nothing while the board says held, reads it ended.
fn by_board(session: &Session, dst: SocketAddr) -> (Option<FallbackReason>, bool) {
    let Some(b) = session.board() else {
        return (None, false);
    };
    match board::lookup(b, dst) {
        Found::Nothing => (Some(FallbackReason::PeerNotEnabled), false),
        Found::Served {
            plain_until,
            peers_only,
        } if plain_until > board::now_ns() => {
            if peers_only {
                (None, true)
            } else {
                (Some(FallbackReason::ShortLived), false)
            }
        }
        _ => (None, false),
    }
}

/// Whether the board keeps the connection of `fd`, an accepted socket of
/// the listener bound to `listener` (if known), on kernel TCP
/// (`short_lived`): its connector did not ask devd either. Only while some
/// listener is kept so; the accepted socket's address is the listener's
/// when that is not a wildcard, and is asked of the kernel only when the
/// listener is a wildcard and not every listener on its port is kept.
fn kept_plain(session: &Session, fd: BorrowedFd<'_>, listener: Option<SocketAddr>) -> bool {
    let Some(b) = session.board() else {
        return false;
    };
    let now = board::now_ns();
    if !board::any_plain(b, now) {
        return false;
    }
    let kept = |here| matches!(board::lookup(b, here), Found::Served { plain_until, .. } if plain_until > now);
    match listener {
        Some(l) if !l.ip().to_canonical().is_unspecified() => kept(l),
        Some(l) if board::port_plain(b, l.port(), now) => true,
        _ => ssock_rings::sys::local_addr(fd).is_ok_and(kept),
    }
}

/// Connector side for a test peer that handles its end itself: the
/// pairing and the connect, and this end unmapped (Attached), or why the
/// connection stays on kernel TCP.
pub fn connect_on(
    fd: BorrowedFd<'_>,
    dst: SocketAddr,
    opts: &Options,
    session: Option<&Arc<Session>>,
) -> io::Result<Outcome> {
    match intent_and_connect(fd, dst, opts, session)? {
        (_, Some(e)) => Err(e),
        (Ok(p), None) => Ok(Outcome::Attached(p)),
        (Err(r), None) => Ok(Outcome::Kernel(r)),
    }
}

/// How a connector's negotiation ended.
#[derive(Debug)]
pub enum Started {
    /// Kernel TCP, connected, with the reason when there is one.
    Kernel(Option<FallbackReason>),
    /// This end, mapped and wrapped for the hand-over: its writes go on
    /// the kernel socket until the acceptor has claimed the connection.
    Up {
        /// The transport.
        transport: Box<dyn Transport>,
        /// The kernel's connect goes on without the caller: what connect()
        /// reports (EINPROGRESS, EINTR).
        under_way: Option<io::Error>,
    },
}

/// Connector side: pairing, the kernel's connect, and this end mapped at
/// once (so that the connector sees devd's CLAIM word and moves without
/// another request). A nonblocking socket gets the kernel's EINPROGRESS,
/// on either path (plain: as an error).
pub fn connect_start(
    fd: BorrowedFd<'_>,
    dst: SocketAddr,
    opts: &Options,
    session: Option<&Arc<Session>>,
) -> io::Result<Started> {
    let (end, under_way) = intent_and_connect(fd, dst, opts, session)?;
    let (p, session) = match (end, session) {
        (Ok(p), Some(s)) => (p, s),
        (Err(reason), _) => {
            return match under_way {
                Some(e) => {
                    log::info!(
                        "connect to {dst}: kernel TCP ({reason:?}); the kernel's connect: {e}"
                    );
                    Err(e)
                }
                None => Ok(Started::Kernel(reason)),
            };
        }
        (Ok(_), None) => return Err(io::Error::other("an end without a devd session")),
    };
    let shut = || {
        // devd may pair the connection before it hears of the release: an
        // acceptor on the region would wait for this side for ever. The
        // kernel connection ends instead.
        let _ = SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
    };
    let p = if p.usable() {
        p
    } else {
        // A reused region this process no longer keeps: the same end with
        // its fds, by the socket.
        match attach_by_socket(session, fd) {
            Ok(fresh) => fresh,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // devd knows neither an intent nor a connection on this
                // socket any more (it ended the intent: a short_lived hold
                // began, or it expired): nothing can pair it, the
                // connection is plain.
                log::info!("connect to {dst}: devd ended its intent; kernel TCP");
                return match under_way {
                    Some(e) => Err(e),
                    None => Ok(Started::Kernel(Some(FallbackReason::Refused))),
                };
            }
            Err(e) => {
                release(session, &p);
                shut();
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("ssock: this end could not be attached: {e}"),
                ));
            }
        }
    };
    match attach(session, p) {
        Ok(transport) => Ok(Started::Up {
            transport,
            under_way,
        }),
        Err(e) => {
            shut();
            Err(io::Error::new(io::ErrorKind::ConnectionReset, e))
        }
    }
}

/// Acceptor side on `fd`, a freshly accepted socket of a listener
/// registered with `session` and bound to `listener` (None: not known):
/// the Claim (devd pairs it with the connector's Intent by address and
/// hands this end over, or says kernel TCP). Nothing is read from or
/// written to the socket.
pub fn accept_on(
    session: &Arc<Session>,
    fd: BorrowedFd<'_>,
    listener: Option<SocketAddr>,
) -> io::Result<Accepted> {
    if kept_plain(session, fd, listener) {
        return Ok(Accepted::Kernel(Some(FallbackReason::ShortLived)));
    }
    // Whatever goes wrong, the connection is plain: its connector moves
    // only once this end, in hand, says accepted in the hand-over words
    // (`Handover::wrap`), so a Claim devd answered too late, or an end
    // that cannot be used, leaves it on the kernel socket.
    let sent = match session.begin(&Request::Claim, &[fd]) {
        Ok(f) => f,
        Err(_) => return Ok(Accepted::Kernel(None)),
    };
    let end = match sent.finish() {
        Ok((Response::Expect { attachment, .. }, fds)) => {
            // A spare doorbell for the next child (a forking server hands
            // this end to one), if the last went to one: only for an
            // accelerated end (a plain one asks devd nothing more).
            crate::bells::refill(session);
            Pending::new(attachment, fds)
        }
        Ok((Response::ExpectKernel { reason, .. }, _)) => {
            return Ok(Accepted::Kernel(Some(reason)))
        }
        Ok(_) | Err(crate::session::SessionError::Refused { .. }) => {
            return Ok(Accepted::Kernel(None))
        }
        Err(e) => {
            log::warn!("no answer to a Claim ({e}); the connection stays plain");
            return Ok(Accepted::Kernel(Some(FallbackReason::DevdError)));
        }
    };
    let plain = |e: io::Error| {
        log::warn!("the acceptor's end cannot be used ({e}); the connection stays plain");
        report(Some(session), FallbackReason::DevdError);
        Ok(Accepted::Kernel(Some(FallbackReason::DevdError)))
    };
    let end = if end.usable() {
        end
    } else {
        // A reused region this process does not have: the same end, with
        // its fds, attached by the accepted socket.
        match attach_by_socket(session, fd) {
            Ok(fresh) => fresh,
            Err(e) => {
                release(session, &end);
                return plain(e);
            }
        }
    };
    match attach(session, end) {
        Ok(t) => Ok(Accepted::Attached(t)),
        Err(e) => plain(e),
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
