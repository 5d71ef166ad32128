//! The control thread's event loop: accepts sessions on the control socket
//! and serves their requests, all from one epoll set (sessions are
//! nonblocking; a client that does not read its replies is dropped). A
//! user at `max_sessions_per_user` has a new session closed at once; an
//! accept that fails (devd out of fds or memory) stops accepting for a
//! while ([`ACCEPT_PAUSE`]) instead of retrying at full speed; both are
//! logged at most once per [`LOG_EVERY`].

use super::{Devd, Reply, Session};
use crate::sys as dsys;
use ssock_rings::codec::{Request, Response, MAX_FDS, MAX_FRAME};
use ssock_rings::sys::SeqPacket;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const LISTENER: u64 = 0;
const SIGNALS: u64 = 1;
const WATCH: u64 = 2;
/// The peer thread's news (`Devd::peer_events`).
const PEERS: u64 = 3;
const FIRST_SESSION: u64 = 4;

/// How long devd stops accepting sessions after an accept failed (out of
/// fds or memory), at first: the control socket stays readable while
/// clients wait in its backlog, so accepting again at once would only
/// fail again, at full speed. The pause doubles while accepts keep
/// failing, up to [`ACCEPT_PAUSE_MAX`]; sessions already open are served
/// meanwhile.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// See [`ACCEPT_PAUSE`].
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// A trouble that may repeat (failed accepts, refused sessions) is logged
/// at most once per this, with the count since the last line.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The longest sleep of the control loop: intents expire on time.
const MAX_SLEEP: Duration = Duration::from_secs(5);

/// A warning that may repeat many times a second: the first is logged,
/// then at most one line per [`LOG_EVERY`], with how many there were.
#[derive(Default)]
struct Throttled {
    count: u64,
    last: Option<Instant>,
}

impl Throttled {
    /// Counts one; logs `what` if the last line is old enough.
    fn note(&mut self, now: Instant, what: std::fmt::Arguments<'_>) {
        self.count += 1;
        match self.last {
            None => log::warn!("{what} (repeats are logged once per {LOG_EVERY:?})"),
            Some(t) if now.duration_since(t) >= LOG_EVERY => {
                let (n, s) = (self.count, now.duration_since(t).as_secs());
                log::warn!("{what} ({n} times in the last {s} s)");
            }
            Some(_) => return,
        }
        self.count = 0;
        self.last = Some(now);
    }
}

/// Accepting sessions: paused after a failure, and the throttled logs.
struct Acceptor {
    /// Not watching the control socket until then.
    paused_until: Option<Instant>,
    /// The next pause.
    pause: Duration,
    failed: Throttled,
    refused: Throttled,
    next_sid: u64,
}

/// Serves the control socket until SIGTERM/SIGINT/SIGHUP.
pub fn serve(
    devd: &mut Devd,
    listener: &SeqPacket,
    signals: &OwnedFd,
    sandbox: Option<crate::sandbox::Mode>,
) -> io::Result<()> {
    let epoll = Epoll::new()?;
    watch_listener(&epoll, listener)?;
    epoll.ctl(
        ControlOperation::Add,
        signals.as_raw_fd(),
        EpollEvent::new(EventSet::IN, SIGNALS),
    )?;
    if let Some(fd) = devd.watch_fd() {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, WATCH),
        )?;
    }
    if let Some(fd) = devd.peers_news_fd() {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, PEERS),
        )?;
    }
    // Readiness first: sd_notify needs socket/sendto, which the control
    // filter (rightly) does not allow.
    dsys::sd_notify_ready();
    if let Some(mode) = sandbox {
        crate::sandbox::apply(crate::sandbox::ThreadKind::Control, mode, &[])
            .map_err(io::Error::other)?;
    }
    let mut acceptor = Acceptor {
        paused_until: None,
        pause: ACCEPT_PAUSE,
        failed: Throttled::default(),
        refused: Throttled::default(),
        next_sid: FIRST_SESSION,
    };
    let mut events = vec![EpollEvent::default(); 64];
    let mut buf = vec![0u8; MAX_FRAME];
    let mut last_expiry = Instant::now();
    let mut claims: Vec<Held> = Vec::new();
    loop {
        let now = Instant::now();
        if acceptor.paused_until.is_some_and(|t| now >= t) {
            // Accepting again: a client still waiting is taken now, or
            // the accept fails again and pauses longer.
            match watch_listener(&epoll, listener) {
                Ok(()) => acceptor.paused_until = None,
                Err(_) => acceptor.paused_until = Some(now + acceptor.pause),
            }
        }
        // Chores (freeing closed connections, refilling the pool) wait
        // for a moment when no request does. Timers (orphaned ends, the
        // watch's generations, the accept pause) are kept.
        let sleep = if devd.has_chores() || devd.has_peer_claims() {
            Duration::ZERO
        } else {
            [
                devd.wake_in(now),
                acceptor
                    .paused_until
                    .map(|t| t.saturating_duration_since(now)),
            ]
            .into_iter()
            .flatten()
            .fold(MAX_SLEEP, Duration::min)
        };
        // Rounded up: a wake-up a little early would find nothing due
        // and sleep 0 ms, again and again.
        let timeout = i32::try_from(sleep.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 && devd.has_chores() {
            devd.chore();
            continue;
        }
        if !devd.engine_alive() {
            return Err(io::Error::other("the engine thread died"));
        }
        devd.timers();
        if last_expiry.elapsed() >= MAX_SLEEP {
            devd.expire();
            last_expiry = Instant::now();
        }
        for ev in &events[..n] {
            match ev.data() {
                LISTENER => accept_sessions(devd, &epoll, listener, &mut acceptor),
                SIGNALS => {
                    if let Some(sig) = dsys::read_signal(signals.as_raw_fd()) {
                        log::info!("signal {sig}: shutting down");
                        return Ok(());
                    }
                }
                WATCH => devd.watch_events(),
                PEERS => devd.peer_events(),
                sid => serve_session(devd, &epoll, sid, &mut buf, &mut claims, 64),
            }
        }
        if !claims.is_empty() || devd.has_peer_claims() {
            answer_claims(devd, &epoll, &mut buf, &mut claims)?;
        }
    }
}

/// Puts the control socket in the epoll set (again).
fn watch_listener(epoll: &Epoll, listener: &SeqPacket) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER),
    )
}

/// Accepts the sessions waiting on the control socket. A user with
/// `max_sessions_per_user` open has the new one closed at once. A failed
/// accept (out of fds or memory) stops accepting for a while: the socket
/// leaves the epoll set until `paused_until`.
fn accept_sessions(devd: &mut Devd, epoll: &Epoll, listener: &SeqPacket, a: &mut Acceptor) {
    loop {
        match listener.accept() {
            Ok(sock) => {
                a.pause = ACCEPT_PAUSE;
                let Ok((pid, uid, gid)) = sock.peer_cred() else {
                    continue;
                };
                if !devd.admit(uid) {
                    // Dropped: the client reads EOF and stays on kernel TCP.
                    a.refused.note(
                        Instant::now(),
                        format_args!(
                            "refused a control session of pid {pid}: uid {uid} has \
                             max_sessions_per_user open"
                        ),
                    );
                    continue;
                }
                let sid = a.next_sid;
                a.next_sid += 1;
                let e = EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, sid);
                if epoll
                    .ctl(ControlOperation::Add, sock.as_raw_fd(), e)
                    .is_ok()
                {
                    log::debug!("session {sid}: pid {pid} uid {uid}");
                    devd.add_session(
                        sid,
                        Session {
                            sock,
                            pid,
                            uid,
                            gid,
                        },
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // That client gave up while waiting: the next one.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM (or anything else that
                // would fail again at once): the clients wait in the
                // backlog meanwhile.
                devd.accept_failed();
                let now = Instant::now();
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    listener.as_raw_fd(),
                    EpollEvent::default(),
                );
                a.paused_until = Some(now + a.pause);
                a.failed.note(
                    now,
                    format_args!(
                        "accepting a control session failed: {e}; not accepting for {:?}",
                        a.pause
                    ),
                );
                a.pause = (a.pause * 2).min(ACCEPT_PAUSE_MAX);
                return;
            }
        }
    }
}

/// Serves session `sid` (at most `max` messages); ends it if it is gone.
fn serve_session(
    devd: &mut Devd,
    epoll: &Epoll,
    sid: u64,
    buf: &mut [u8],
    claims: &mut Vec<Held>,
    max: usize,
) {
    if !serve_one(devd, sid, buf, claims, max) {
        end_session(devd, epoll, sid);
    }
}

/// Drops session `sid` (its socket leaves the epoll set first).
fn end_session(devd: &mut Devd, epoll: &Epoll, sid: u64) {
    if let Some(s) = devd.session_sock(sid) {
        let _ = epoll.ctl(
            ControlOperation::Delete,
            s.as_raw_fd(),
            EpollEvent::default(),
        );
    }
    devd.end_session(sid);
    log::debug!("session {sid} ended");
}

/// A Claim read but not answered yet: (session, the request, its fds).
type Held = (u64, Request, Vec<OwnedFd>);

/// Answers the Claims read in this round, after reading what was waiting
/// in any session when they were read (each up to a request that expects
/// a reply: nothing follows one before its reply). A connector sends its
/// Intent before it connects (and may connect before devd has read it),
/// so an Intent that precedes a Claim causally is in its session's queue
/// by the time the Claim is read, behind nothing that awaits a reply: one
/// pass over all readable sessions handles it, and the Claim then finds
/// its intent.
fn answer_claims(
    devd: &mut Devd,
    epoll: &Epoll,
    buf: &mut [u8],
    claims: &mut Vec<Held>,
) -> io::Result<()> {
    // The peers' Claims taken in so far: those taken in while the sessions
    // are read (a Stats request does) wait for the next pass.
    let peer_claims = devd.take_peer_claims();
    let mut events = vec![EpollEvent::default(); devd.session_count() + 4];
    let n = loop {
        match epoll.wait(0, &mut events) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    for ev in &events[..n] {
        let sid = ev.data();
        if sid >= FIRST_SESSION {
            // The socket buffer holds a few hundred messages at most.
            serve_session(devd, epoll, sid, buf, claims, DRAIN_MAX);
        }
    }
    // A peer's Claim: its connector's Intent was sent here before its
    // connect left the host.
    devd.answer_peer_claims(peer_claims);
    for (sid, req, fds) in std::mem::take(claims) {
        // The session may have ended meanwhile (then nobody waits).
        if devd.session_sock(sid).is_none() {
            continue;
        }
        let sent = match answer(devd, sid, req, fds) {
            Ok(Some(r)) => reply(devd, sid, &r.0, &r.1),
            Ok(None) => true,
            Err(()) => false,
        };
        if !sent {
            end_session(devd, epoll, sid);
        }
    }
    Ok(())
}

/// Messages read from one session when draining before Claims are
/// answered: more than its socket buffer can hold.
const DRAIN_MAX: usize = 4096;

/// Reads and answers the messages waiting on session `sid` (at most
/// `max`); Claims are held in `claims`, answered by [`answer_claims`].
/// false ends the session.
fn serve_one(
    devd: &mut Devd,
    sid: u64,
    buf: &mut [u8],
    claims: &mut Vec<Held>,
    max: usize,
) -> bool {
    for _ in 0..max {
        let Some(sock) = devd.session_sock(sid) else {
            return false;
        };
        let (n, fds) = match sock.recv(buf, MAX_FDS) {
            Ok((0, _)) => return false,
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                devd.bad_message();
                let r = Response::Error {
                    code: 22,
                    message: format!("control message refused: {e}"),
                };
                if !reply(devd, sid, &r, &[]) {
                    return false;
                }
                continue;
            }
            Err(_) => return false,
        };
        let resp = match Request::decode(&buf[..n], fds.len()) {
            // A client sends nothing more on its session until a request
            // that expects a reply has its reply (`Session::begin` holds
            // the session until then): nothing more to read here now. (A
            // message that came anyway is read in the next round: the
            // socket stays readable.)
            Ok(req @ Request::Claim) => {
                claims.push((sid, req, fds));
                return true;
            }
            // A bug in one request's handling must not take devd down:
            // the session gets an error and is dropped, others go on.
            Ok(req) => match answer(devd, sid, req, fds) {
                // Release is not answered (its failure is logged by handle).
                Ok(None) => continue,
                // An answered request is one that expected its reply.
                Ok(Some(r)) => return reply(devd, sid, &r.0, &r.1),
                Err(()) => return false,
            },
            Err(e) => {
                devd.bad_message();
                log::warn!("session {sid}: malformed control message: {e}");
                (
                    Response::Error {
                        code: 22,
                        message: format!("control message refused: {e}"),
                    },
                    vec![],
                )
            }
        };
        if !reply(devd, sid, &resp.0, &resp.1) {
            return false;
        }
    }
    true
}

/// Handles one request: Ok(None) when it gets no reply, Err when its
/// handling panicked (a bug in one request's handling must not take devd
/// down: the session is dropped, others go on).
fn answer(devd: &mut Devd, sid: u64, req: Request, fds: Vec<OwnedFd>) -> Result<Option<Reply>, ()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let wanted = req.expects_reply();
        let r = devd.handle(sid, req, fds);
        wanted.then_some(r)
    }))
    .map_err(|_| log::error!("session {sid}: request handling panicked; dropping the session"))
}

fn reply(devd: &Devd, sid: u64, r: &Response, fds: &[std::sync::Arc<OwnedFd>]) -> bool {
    let Some(sock) = devd.session_sock(sid) else {
        return false;
    };
    let b: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    // A reply that cannot be encoded (over a frame: a bug in a page's
    // budget) drops this session, not devd.
    let Ok(frame) = std::panic::catch_unwind(|| r.encode()) else {
        log::error!("session {sid}: a reply could not be encoded; dropping the session");
        return false;
    };
    match sock.send(&frame, &b) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("session {sid}: reply failed, dropping it: {e}");
            false
        }
    }
}
