//! devd's control plane: `Devd`, which answers each session's requests
//! (one session per client process, authenticated with SO_PEERCRED), and
//! here the dispatch of requests, sessions, doorbells, tokens, chores and
//! timers. Listeners are in `listeners`, pairing (Intent, Claim, Attach)
//! in `pairing`, the ends' release and orphans in `ends`, statistics in
//! `report`.
//!
//! Runs on one thread; every request is validated by the codec and then
//! against the registry; a bad request gets an `Error` reply and harms
//! nothing else.

pub mod bells;
pub mod board;
mod ends;
mod forward;
mod listeners;
mod pairing;
pub mod registry;
mod rejoin;
mod remote;
mod report;
pub mod server;
pub mod watch;

use crate::config::Config;
use crate::dataplane::engine::{self, Cmd, SideInit, SideSpec};
use crate::stats::{ConnJson, DevdJson, EngineCounts, Page, QueuedCounters, RingJson, Totals};
use registry::{canon, Conn, DirectRes, End, Fd, Intent, Moves, Parked, QueuedRes, Registry, Res};
use ssock_rings::codec::{
    Attachment, FallbackReason, Mode, ModePref, Request, Response, Side, MAX_FRAME,
};
use ssock_rings::layout::{self, DirectLayout, QueuedLayout, RegionKind, FLAG_EOS};
use ssock_rings::stream;
use ssock_rings::sys::{self, EventFd};
use ssock_rings::vq::device::DeviceRegion;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use report::conn_json;

/// A client process's control session.
#[derive(Debug)]
pub struct Session {
    /// The control socket.
    pub sock: sys::SeqPacket,
    /// From SO_PEERCRED.
    pub pid: i32,
    /// From SO_PEERCRED.
    pub uid: u32,
    /// From SO_PEERCRED.
    pub gid: u32,
}

/// Why a request failed (sent back as `Response::Error`).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The passed fd is not a usable TCP socket.
    #[error("the passed fd is not a usable IP stream socket")]
    NotSocket(#[source] io::Error),
    /// Listen with a socket that is not listening.
    #[error("the passed socket is not listening")]
    NotListening,
    /// The socket is not bound to a port yet.
    #[error("the listening socket has no local port")]
    Unbound,
    /// No connection for this socket.
    #[error("no accelerated connection for socket inode {0}")]
    NoConnection(u64),
    /// No doorbell with this id that this session may ring.
    #[error("no doorbell {0} for this session")]
    NoBell(u32),
    /// A Queued end on another host has nothing to attach here.
    #[error("queued connection {0} end {1} is not on this host")]
    NotHere(u64, usize),
    /// Release of a connection this session does not hold.
    #[error("connection {0} is not held by this session")]
    NotHeld(u64),
    /// Region or eventfd creation failed.
    #[error("failed to create connection resources")]
    Resources(#[source] io::Error),
    /// devd's own region could not be set up for the engine.
    #[error("failed to set up the queued region")]
    Device(#[source] ssock_rings::vq::device::DeviceError),
    /// A request only root or devd's own user may make.
    #[error("only root or devd's user may do this")]
    NotAllowed,
    /// No such peer in the config.
    #[error("no peer node {0} in the config")]
    NoPeer(u32),
}

impl RequestError {
    fn code(&self) -> u32 {
        let c = match self {
            RequestError::NotSocket(_) | RequestError::Unbound | RequestError::NotListening => {
                libc::EINVAL
            }
            RequestError::NoConnection(_) | RequestError::NoBell(_) => libc::ENOENT,
            RequestError::NotHere(..) => libc::EBUSY,
            RequestError::NotHeld(_) | RequestError::NotAllowed => libc::EPERM,
            RequestError::NoPeer(_) => libc::ENOENT,
            RequestError::Resources(_) | RequestError::Device(_) => libc::ENOMEM,
        };
        u32::try_from(c).unwrap_or(0)
    }
}

/// Fresh Direct connections kept ready (region and doorbells), so that an
/// Intent need not create them while its connector waits.
const POOL: usize = 4;

/// The largest batch a client reports in one Skipped (its batches hold
/// 65,536 connections at most: a report a second, or at its exit).
const SKIPS_BATCH_MAX: u32 = 1 << 16;

/// Closed connections waiting to be freed at most; past that they are
/// freed at once (a steady stream of requests leaves no quiet moment).
const MAX_TRASH: usize = 16;

/// The control plane's state.
pub struct Devd {
    cfg: Config,
    reg: Registry,
    /// Fresh Direct resources, with the connection id written in their
    /// header (refilled between requests, see [`Devd::chore`]).
    pool: Vec<(u64, Res)>,
    /// Closed connections whose resources are still to be freed (and
    /// their bytes counted), between requests.
    trash: Vec<Conn>,
    /// Intent tokens drawn from getrandom in batches.
    tokens: Vec<u64>,
    /// After a failed refill, when to try again.
    pool_retry: Option<Instant>,
    totals: Totals,
    engine: engine::Handle,
    sessions: HashMap<u64, Session>,
    started: Instant,
    backend: &'static str,
    /// The engine's own totals (Queued bytes and violations).
    engine_counts: Arc<EngineCounts>,
    /// The peer thread, when the config lists peers.
    peers: Option<crate::peers::Handle>,
    /// The listeners the peers were last told of.
    advertised: Vec<std::net::SocketAddr>,
    /// The peers' listeners, links and Claims.
    remote: remote::RemoteState,
    /// Open sessions by uid (`max_sessions_per_user`).
    sessions_of: HashMap<u32, usize>,
    /// Sockets of Kernel answers, watched until they connect (None if
    /// epoll could not be set up: such connections are not counted).
    watch: Option<watch::Watch>,
    /// sock_diag socket: is an orphaned end's TCP socket still held by
    /// anyone (None if it could not be made: orphans wait out their grace).
    diag: Option<OwnedFd>,
    /// Sequence number of the last sock_diag request.
    diag_seq: u32,
    /// The listener board every Welcome hands out.
    board: board::Board,
    /// Each session's doorbell.
    bells: bells::Bells,
}

/// What sock_diag says of an orphaned end's socket ([`Devd::orphan_seen`]).
enum Seen {
    /// Some process holds it.
    Held,
    /// No process does.
    Gone,
    /// The look-up cannot tell.
    Unsure,
}

/// A reply and the fds that travel with it (devd's own, borrowed for the send).
pub(crate) type Reply = (Response, Vec<Fd>);

/// How long an end whose session ended stays attachable by its socket,
/// unless its TCP socket is seen closed everywhere before
/// ([`Devd::release_orphans`]).
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// How soon an orphaned end's TCP socket is first looked up (sock_diag),
/// and how often while the look-up cannot tell.
pub const ORPHAN_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// The longest interval between look-ups of an orphaned end's socket:
/// the interval doubles from `ORPHAN_CHECK` while the socket is seen held
/// (a connection a forked child serves for hours costs devd a look-up
/// every few seconds, and is released at most this long after its last
/// holder let go).
pub const ORPHAN_CHECK_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// How old the last sighting of a sessionless listener may be when an
/// Intent to its address arrives; an older one is looked up again first.
pub const LISTENER_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Seconds an intent (or a buried intent) lives. Its connector uses the
/// kernel socket meanwhile; an acceptor that accepts later gets a plain
/// connection (its connector is told with CLAIM = kernel).
pub const INTENT_TTL_S: u64 = 120;

/// A connection created for an Intent ([`Devd::create`]).
struct Created {
    token: u64,
    id: u64,
    res: Res,
    /// Region bytes charged to each end's user.
    bytes: usize,
    /// The connector's end.
    attachment: Attachment,
    fds: Vec<Fd>,
    /// See [`Intent::reuse_by`].
    reuse_by: Option<u64>,
}

fn dup(fd: impl AsFd) -> Result<OwnedFd, RequestError> {
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(RequestError::Resources)
}

impl Devd {
    /// A control plane over an engine.
    pub fn new(
        cfg: Config,
        engine: engine::Handle,
        backend: &'static str,
        engine_counts: Arc<EngineCounts>,
    ) -> Devd {
        Devd {
            cfg,
            reg: Registry {
                next_id: 1,
                ..Registry::default()
            },
            pool: Vec::new(),
            trash: Vec::new(),
            tokens: Vec::new(),
            pool_retry: None,
            totals: Totals::default(),
            engine,
            sessions: HashMap::new(),
            started: Instant::now(),
            backend,
            engine_counts,
            sessions_of: HashMap::new(),
            watch: watch::Watch::new()
                .map_err(|e| log::warn!("kernel connections will not be counted: {e}"))
                .ok(),
            diag: crate::sys::sock_diag_socket()
                .map_err(|e| log::info!("no sock_diag ({e}): orphaned ends wait out their grace"))
                .ok(),
            diag_seq: 0,
            board: board::Board::new(),
            bells: bells::Bells::new({
                let mut b = [0u8; 4];
                // A failed getrandom leaves ids starting at 1: only an
                // earlier devd's clients could mistake them.
                let _ = sys::random(&mut b);
                u32::from_le_bytes(b)
            }),
            peers: None,
            advertised: Vec::new(),
            remote: remote::RemoteState {
                salt: {
                    let mut b = [0u8; 8];
                    // Without getrandom, channels start at 0 again: a
                    // peer still holding an old one refuses the new.
                    let _ = sys::random(&mut b);
                    u64::from_le_bytes(b)
                },
                ..Default::default()
            },
        }
    }

    /// The peer thread whose state the statistics show.
    pub fn set_peers(&mut self, peers: crate::peers::Handle) {
        self.engine.send(Cmd::Peers(peers.sender()));
        self.peers = Some(peers);
        self.listeners_changed();
    }

    /// The listeners (or their policy) changed: the board shows them, and
    /// the peer devds hear of the set when it is new.
    fn listeners_changed(&mut self) {
        let remote = self.remote_listeners();
        self.board.publish(&self.reg.listeners, &remote);
        let Some(p) = &self.peers else { return };
        // A loopback listener means nothing to another host.
        let mut now: Vec<std::net::SocketAddr> = self
            .reg
            .listeners
            .values()
            .map(|l| l.addr)
            .filter(|a| !a.ip().to_canonical().is_loopback())
            .collect();
        now.sort_unstable();
        now.dedup();
        if now != self.advertised {
            p.advertise(now.clone());
            self.advertised = now;
        }
    }

    /// Handles one decoded request from session `sid`.
    pub fn handle(&mut self, sid: u64, req: Request, mut fds: Vec<OwnedFd>) -> Reply {
        self.totals.requests += 1;
        let r = match req {
            Request::Hello { .. } => {
                let board = self.board.fd();
                // Without a doorbell this session's Direct ends cannot
                // sleep: it gets none, and its connections stay on TCP.
                let fresh = !self.bells.has(sid);
                let bell = if fresh {
                    self.bells
                        .make_for(sid)
                        .map_err(|e| log::warn!("no doorbell for session {sid}: {e}"))
                        .ok()
                } else {
                    None
                };
                let spare = bell.as_ref().and_then(|_| self.bells.make_for(sid).ok());
                let (bell_id, spare_id) = (
                    bell.as_ref().map_or(0, |b| b.0),
                    spare.as_ref().map_or(0, |b| b.0),
                );
                let mut fds: Vec<Fd> = board.into_iter().collect();
                let board = !fds.is_empty();
                for (_, r, w) in bell.into_iter().chain(spare) {
                    fds.push(Arc::new(r));
                    fds.push(w);
                }
                Ok((
                    Response::Welcome {
                        spin_us: self.cfg.spin_us,
                        default_mode: self.cfg.default_mode.mode(),
                        board,
                        bell: bell_id,
                        spare: spare_id,
                    },
                    fds,
                ))
            }
            Request::Bell { id } => self.bell(sid, id),
            Request::Listen => self.listen(sid, &fds[0]),
            Request::Unlisten => self.unlisten(sid, &fds[0]),
            Request::Intent { dst, pref, bell } => {
                self.intent(sid, fds.swap_remove(0), dst, pref, bell)
            }
            Request::Claim => self.claim(sid, &fds[0]),
            Request::Attach => self.attach(sid, &fds[0]),
            Request::Forward {
                conn_id,
                side,
                take,
            } => self.take_forward(sid, conn_id, side as usize, take, &fds[0]),
            Request::Rejoin { words, received } => {
                // (Answered later, by `answer_later`.)
                self.rejoin(sid, &fds[0], words, received);
                Ok((Response::Ok, vec![]))
            }
            Request::Words { words } => {
                self.rejoined_words(sid, words);
                Ok((Response::Ok, vec![]))
            }
            Request::Release {
                conn_id,
                side,
                park,
            } => self.release(sid, conn_id, side as usize, park),
            Request::Leave { conn_id, side } => self.leave(sid, conn_id, side as usize),
            Request::Violation { conn_id } => {
                // Counted once per connection, and only from a live end.
                let held = self.holds(sid, conn_id);
                if let Some(c) = self
                    .reg
                    .conns
                    .get_mut(&conn_id)
                    .filter(|c| held && !c.violated)
                {
                    c.violated = true;
                    self.totals.violations += 1;
                }
                Ok((Response::Ok, vec![]))
            }
            Request::Fallback { reason } => {
                // The reason only: the connection it concerns is counted
                // where devd sees it (a connector's plain connect by the
                // watch), was dropped (an acceptor's devd_error), or
                // stays accelerated
                // (unsupported).
                self.totals.fallback(reason);
                Ok((Response::Ok, vec![]))
            }
            Request::Skipped { reason, count } => {
                // Connections a client left on kernel TCP without asking
                // (the board said so), or found its acceptor serving
                // without its end (`unclaimed`). Only statistics: a session
                // could inflate them (by at most a batch per message),
                // never change a decision.
                if matches!(
                    reason,
                    FallbackReason::ShortLived | FallbackReason::Unclaimed
                ) {
                    self.totals.skipped(reason, count.min(SKIPS_BATCH_MAX));
                }
                Ok((Response::Ok, vec![]))
            }
            Request::Link { node, link, up } => {
                let uid = self.sessions.get(&sid).map_or(u32::MAX, |s| s.uid);
                let links = self
                    .cfg
                    .peers
                    .iter()
                    .find(|p| p.node == node)
                    .map(|p| p.links());
                if uid != 0 && uid != sys::uid() {
                    Err(RequestError::NotAllowed)
                } else if links.is_none_or(|n| link.is_some_and(|l| usize::from(l) >= n)) {
                    Err(RequestError::NoPeer(node))
                } else {
                    log::info!(
                        "session {sid}: link to node {node} ({}) asked {}",
                        link.map_or("every link".to_string(), |l| format!("link {l}")),
                        if up { "up" } else { "down" }
                    );
                    self.engine.send(Cmd::SetLink { node, link, up });
                    Ok((Response::Ok, vec![]))
                }
            }
            Request::Stats { after, limit } => {
                // What the peers said so far is on the board before the
                // statistics show it.
                self.peer_events();
                // Closed connections' bytes count before they are shown.
                while let Some(c) = self.trash.pop() {
                    self.count_closed(&c);
                }
                Ok(self.stats(sid, after, limit))
            }
        };
        r.unwrap_or_else(|e| {
            log::debug!("session {sid}: request failed: {e}");
            (
                Response::Error {
                    code: e.code(),
                    message: error_chain(&e),
                },
                vec![],
            )
        })
    }

    fn session(&self, sid: u64) -> &Session {
        &self.sessions[&sid]
    }

    fn end(&self, sid: u64, fd: &OwnedFd) -> Result<End, RequestError> {
        let addr = sys::local_addr(fd.as_fd()).map_err(RequestError::NotSocket)?;
        self.end_at(sid, fd, addr)
    }

    /// Like [`Devd::end`] with the local address given (a connector's
    /// socket is not bound yet: its address is read at the Claim).
    fn end_at(
        &self,
        sid: u64,
        fd: &OwnedFd,
        addr: std::net::SocketAddr,
    ) -> Result<End, RequestError> {
        let inode = sys::socket_inode(fd.as_fd()).map_err(RequestError::NotSocket)?;
        if sys::socket_type(fd.as_fd()).map_err(RequestError::NotSocket)? != libc::SOCK_STREAM {
            return Err(RequestError::NotSocket(io::Error::other("not SOCK_STREAM")));
        }
        let s = self.session(sid);
        Ok(End {
            session: sid,
            pid: s.pid,
            uid: s.uid,
            inode,
            addr,
            released: false,
            orphaned: None,
            seen: false,
        })
    }

    /// Answers an Intent with Kernel: counts the reason (not again for a
    /// socket already answered so: a nonblocking connect() called again)
    /// and watches the socket, to count its connection once it is seen
    /// connected ([`watch`]).
    fn kernel(
        &mut self,
        reason: FallbackReason,
        sock: &OwnedFd,
        inode: u64,
    ) -> Result<Reply, RequestError> {
        if self.watch_kernel(sock, inode) != watch::Added::Again {
            self.totals.fallback(reason);
        }
        Ok((Response::Kernel { reason }, vec![]))
    }

    /// Watches the socket of an Intent that goes on kernel TCP.
    fn watch_kernel(&mut self, sock: &OwnedFd, inode: u64) -> watch::Added {
        match &mut self.watch {
            Some(w) => w.add(sock.as_fd(), inode, Instant::now()),
            None => watch::Added::NotWatched,
        }
    }

    /// Counts the connections the watch saw connected since last asked.
    pub fn watch_events(&mut self) {
        if let Some(w) = &mut self.watch {
            for _ in 0..w.poll() {
                self.totals.kernel_connection();
            }
        }
    }

    /// The fd the control loop waits on for [`Devd::watch_events`].
    pub fn watch_fd(&self) -> Option<std::os::fd::RawFd> {
        self.watch.as_ref().map(watch::Watch::fd)
    }

    /// `Request::Bell`: with id 0 a new spare doorbell of this session;
    /// else the doorbell `id`, to a session that may ring it: one of the
    /// same user, root, or one that shares a connection with a session of
    /// the doorbell's user (a forked child sleeps on its parent's spare,
    /// an exec'd image on its own session's). Anybody else learns nothing
    /// (the same error as for an unknown id).
    fn bell(&mut self, sid: u64, id: u32) -> Result<Reply, RequestError> {
        if id == 0 {
            if !self.bells.has(sid) {
                return Err(RequestError::NoBell(0));
            }
            let (id, r, w) = self.bells.make_for(sid).map_err(RequestError::Resources)?;
            return Ok((Response::Bell { id, both: true }, vec![Arc::new(r), w]));
        }
        let unknown = || RequestError::NoBell(id);
        let (owner, fd) = self.bells.get(id).ok_or_else(unknown)?;
        let uid = |s: u64| self.sessions.get(&s).map(|s| s.uid);
        let (me, them) = match (uid(sid), uid(owner)) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(unknown()),
        };
        let pair = |a: &End, b: &End| a.session == sid && b.uid == them;
        let linked = me == them
            || me == 0
            || self
                .reg
                .conns
                .values()
                .any(|c| pair(&c.ends[0], &c.ends[1]) || pair(&c.ends[1], &c.ends[0]));
        if !linked {
            return Err(unknown());
        }
        Ok((Response::Bell { id, both: false }, vec![fd]))
    }

    /// An unpredictable token (64 drawn per getrandom call).
    fn token(&mut self) -> Result<u64, RequestError> {
        if self.tokens.is_empty() {
            let mut b = [0u8; 512];
            sys::random(&mut b).map_err(RequestError::Resources)?;
            self.tokens = b
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
        }
        self.tokens
            .pop()
            .ok_or(RequestError::Resources(io::Error::other("no token")))
    }

    /// Whether work waits for a quiet moment ([`Devd::chore`]).
    pub fn has_chores(&self) -> bool {
        !self.trash.is_empty() || self.pool_wanted() || self.wants_sight()
    }

    /// A connection waits for its sockets to be looked up once.
    fn wants_sight(&self) -> bool {
        self.diag.is_some() && !self.reg.unseen.is_empty()
    }

    fn pool_wanted(&self) -> bool {
        self.pool.len() < POOL && self.pool_retry.is_none_or(|t| Instant::now() >= t)
    }

    /// Does one piece of work that no client waits for: frees a closed
    /// connection (counting its bytes), or adds fresh resources to the
    /// pool. The control loop calls it when no request is waiting.
    pub fn chore(&mut self) {
        if let Some(c) = self.trash.pop() {
            self.count_closed(&c);
            return;
        }
        if self.wants_sight() {
            if let Some(id) = self.reg.unseen.pop_front() {
                self.sight(id);
            }
            return;
        }
        if self.pool_wanted() {
            self.pool_retry = None;
            let id = self.new_id();
            match self.direct_res(id) {
                Ok(r) => self.pool.push((id, r)),
                // Out of fds or memory: the pool stays short for a while;
                // an Intent creates its own (and reports its error) instead.
                Err(e) => {
                    log::debug!("pool refill failed: {e}");
                    self.pool_retry = Some(Instant::now() + std::time::Duration::from_secs(1));
                }
            }
        }
    }

    /// Counts a freed Direct connection's bytes (the engine counts the
    /// Queued ones itself: [`EngineCounts`]).
    fn count_closed(&mut self, c: &Conn) {
        if c.mode == Mode::Queued {
            return;
        }
        let j = conn_json(c);
        // Head words come from client-writable memory: never overflow.
        let b = j.bytes_c2a.saturating_add(j.bytes_a2c);
        self.totals.bytes_closed = self.totals.bytes_closed.saturating_add(b);
    }

    /// Whether a session of user `uid` may be added: fewer than
    /// `max_sessions_per_user` are open (root included: the cap is what
    /// keeps one user's processes from taking every fd devd has, and a
    /// client refused goes on kernel TCP). A refusal is counted.
    pub fn admit(&mut self, uid: u32) -> bool {
        let open = self.sessions_of.get(&uid).copied().unwrap_or(0);
        if open >= self.cfg.policy.max_sessions_per_user {
            self.totals.sessions_refused += 1;
            return false;
        }
        true
    }

    /// Counts a failed accept on the control socket.
    pub fn accept_failed(&mut self) {
        self.totals.accept_failures += 1;
    }

    /// Adds a session.
    pub fn add_session(&mut self, sid: u64, s: Session) {
        self.totals.sessions += 1;
        *self.sessions_of.entry(s.uid).or_default() += 1;
        self.sessions.insert(sid, s);
    }

    /// Whether the engine thread still runs.
    pub fn engine_alive(&self) -> bool {
        self.engine.alive()
    }

    /// Counts a malformed control message.
    pub fn bad_message(&mut self) {
        self.totals.bad_messages += 1;
    }

    /// Number of sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Session by id.
    pub fn session_sock(&self, sid: u64) -> Option<&sys::SeqPacket> {
        self.sessions.get(&sid).map(|s| &s.sock)
    }

    /// Drops stale intents; a hold for connectors not under ssock that
    /// ran out leaves the board (`Board::publish` writes F_PEERS only
    /// while a hold lasts, and only what changed).
    pub fn expire(&mut self) {
        self.board.beat();
        self.listeners_changed();
        for i in self.reg.expire(Instant::now(), INTENT_TTL_S) {
            self.discard_intent(i);
        }
        self.expire_remote(Instant::now());
        self.check_listeners(|_| true);
    }

    /// How long the control loop may sleep before [`Devd::timers`] has
    /// work: the next look-up of an orphaned end; the kernel-connection
    /// watch ends its generations on time.
    pub fn wake_in(&self, now: Instant) -> Option<std::time::Duration> {
        let orphans = self
            .reg
            .orphans
            .values()
            .map(|l| l.next.saturating_duration_since(now))
            .min();
        let watch = self
            .watch
            .as_ref()
            .and_then(watch::Watch::next_retire)
            .map(|t| t.saturating_duration_since(now));
        [
            orphans,
            watch,
            self.forward_wake_in(now),
            self.rejoin_wake_in(now),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Work due on time, whatever woke the control loop: orphaned ends to
    /// release, watch generations to end.
    pub fn timers(&mut self) {
        self.release_orphans();
        self.forward_look(Instant::now());
        self.rejoins_expire(Instant::now());
        if let Some(w) = &mut self.watch {
            w.retire(Instant::now());
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests;
