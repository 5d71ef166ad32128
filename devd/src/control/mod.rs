//! devd's control plane: sessions (one per client process, authenticated
//! with SO_PEERCRED), the listener registry, intents, pairing, creation of
//! sealed regions, attach by socket fd, release, and statistics.
//!
//! Runs on one thread; every request is validated by the codec and then
//! against the registry; a bad request gets an `Error` reply and harms
//! nothing else.

pub mod bells;
pub mod board;
pub mod registry;
pub mod server;
pub mod watch;

use crate::config::Config;
use crate::dataplane::engine::{self, Cmd, SideInit};
use crate::stats::{ConnJson, DevdJson, Page, QueuedCounters, RingJson, Totals};
use registry::{canon, Conn, DirectRes, End, Fd, Intent, Parked, QueuedRes, Registry, Res};
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
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

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
    /// A Queued end can be attached once.
    #[error("queued connection {0} end {1} is already attached")]
    AlreadyAttached(u64, usize),
    /// Release of a connection this session does not hold.
    #[error("connection {0} is not held by this session")]
    NotHeld(u64),
    /// Region or eventfd creation failed.
    #[error("failed to create connection resources")]
    Resources(#[source] io::Error),
    /// devd's own region could not be set up for the engine.
    #[error("failed to set up the queued region")]
    Device(#[source] ssock_rings::vq::device::DeviceError),
}

impl RequestError {
    fn code(&self) -> u32 {
        let c = match self {
            RequestError::NotSocket(_) | RequestError::Unbound | RequestError::NotListening => {
                libc::EINVAL
            }
            RequestError::NoConnection(_) | RequestError::NoBell(_) => libc::ENOENT,
            RequestError::AlreadyAttached(..) => libc::EBUSY,
            RequestError::NotHeld(_) => libc::EPERM,
            RequestError::Resources(_) | RequestError::Device(_) => libc::ENOMEM,
        };
        u32::try_from(c).unwrap_or(0)
    }
}

/// Fresh Direct connections kept ready (region and doorbells), so that an
/// Intent need not create them while its connector waits.
const POOL: usize = 4;

/// The largest batch a client reports in one Skipped (its batches hold
/// 64 connections at most).
const SKIPS_BATCH_MAX: u32 = 64;

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
    violations: Arc<AtomicU64>,
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
        violations: Arc<AtomicU64>,
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
            violations,
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
            Request::Intent { dst, pref } => self.intent(sid, fds.swap_remove(0), dst, pref),
            Request::Claim => self.claim(sid, &fds[0]),
            Request::Attach => self.attach(sid, &fds[0]),
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
                // (the board said so). Only statistics: a session could
                // inflate them (by at most a batch per message), never
                // change a decision.
                if reason == FallbackReason::ShortLived {
                    self.totals.skipped(reason, count.min(SKIPS_BATCH_MAX));
                }
                Ok((Response::Ok, vec![]))
            }
            Request::Stats { after, limit } => {
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
        })
    }

    fn listen(&mut self, sid: u64, fd: &OwnedFd) -> Result<Reply, RequestError> {
        let end = self.end(sid, fd)?;
        if end.addr.port() == 0 {
            return Err(RequestError::Unbound);
        }
        let listening = sys::sockopt_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
            .map_err(RequestError::NotSocket)?;
        if listening == 0 {
            return Err(RequestError::NotListening);
        }
        let dual_stack = end.addr.is_ipv6()
            && sys::sockopt_int(fd.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
                .is_ok_and(|v| v == 0);
        let l = registry::Listener {
            session: Some(sid),
            addr: end.addr,
            dual_stack,
            seen: None,
            short: Default::default(),
        };
        self.reg.listeners.insert(end.inode, l);
        self.board.publish(&self.reg.listeners);
        Ok((Response::Ok, vec![]))
    }

    /// A process closes its listener (the fd it sends proves it holds
    /// it). Others may hold it still (pre-fork workers, a daemon's child):
    /// the registration stays with the socket, looked up with sock_diag at
    /// the next Intent to its address ([`Devd::check_listeners`]).
    fn unlisten(&mut self, _sid: u64, fd: &OwnedFd) -> Result<Reply, RequestError> {
        let inode = sys::socket_inode(fd.as_fd()).map_err(RequestError::NotSocket)?;
        self.let_go_of_listener(inode);
        Ok((Response::Ok, vec![]))
    }

    /// The registration of listener `inode` no longer has a session:
    /// it belongs to the socket alone, or, without sock_diag to tell
    /// whether anyone holds the socket, it is dropped.
    fn let_go_of_listener(&mut self, inode: u64) {
        if self.diag.is_none() {
            self.reg.listeners.remove(&inode);
            self.board.publish(&self.reg.listeners);
        } else if let Some(l) = self.reg.listeners.get_mut(&inode) {
            l.session = None;
            l.seen = None;
        }
    }

    /// Looks up, with one sock_diag dump, the sessionless listeners that
    /// `stale` selects, and drops those no process holds any more (on a
    /// failed look-up, all of them: a connection to them stays on kernel
    /// TCP, which is never wrong).
    fn check_listeners(&mut self, stale: impl Fn(&registry::Listener) -> bool) {
        let now = Instant::now();
        let concerned: Vec<u64> = self
            .reg
            .listeners
            .iter()
            .filter(|(_, l)| l.session.is_none() && stale(l))
            .map(|(&inode, _)| inode)
            .collect();
        if concerned.is_empty() {
            return;
        }
        let held = match &self.diag {
            Some(diag) => {
                self.diag_seq = self.diag_seq.wrapping_add(1);
                crate::sys::tcp_listeners(diag.as_fd(), self.diag_seq)
            }
            None => Err(io::Error::other("no sock_diag")),
        };
        for inode in concerned {
            match &held {
                Ok(set) if set.contains(&inode) => {
                    if let Some(l) = self.reg.listeners.get_mut(&inode) {
                        l.seen = Some(now);
                    }
                }
                Ok(_) => {
                    self.reg.listeners.remove(&inode);
                }
                Err(e) => {
                    log::debug!("listener {inode}: sock_diag: {e}");
                    self.reg.listeners.remove(&inode);
                }
            }
        }
        self.board.publish(&self.reg.listeners);
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

    fn intent(
        &mut self,
        sid: u64,
        fd: OwnedFd,
        dst: std::net::SocketAddr,
        pref: ModePref,
    ) -> Result<Reply, RequestError> {
        // No getsockname: it would wait for the socket's lock while the
        // connector's connect() holds it.
        let unbound = std::net::SocketAddr::new(
            match dst {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            },
            0,
        );
        let domain = sys::sockopt_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_DOMAIN)
            .map_err(RequestError::NotSocket)?;
        if domain != libc::AF_INET && domain != libc::AF_INET6 {
            return Err(RequestError::NotSocket(io::Error::other(
                "not an IP socket",
            )));
        }
        let end = self.end_at(sid, &fd, unbound)?;
        let inode = end.inode;
        let mode = match pref {
            ModePref::Kernel => return self.kernel(FallbackReason::Requested, &fd, inode),
            ModePref::Direct => Mode::Direct,
            ModePref::Queued => Mode::Queued,
            ModePref::Auto => self.cfg.default_mode.mode(),
        };
        if mode == Mode::Kernel {
            return self.kernel(FallbackReason::Requested, &fd, inode);
        }
        // A sessionless registration not looked at lately may be of a
        // socket closed everywhere since.
        let now = Instant::now();
        let old = |l: &registry::Listener| l.seen.is_none_or(|t| now - t >= LISTENER_CHECK);
        if self
            .reg
            .listeners_for(dst)
            .any(|l| l.session.is_none() && old(l))
        {
            self.check_listeners(|l| old(l) && l.addr.port() == dst.port());
        }
        let Some(linode) = self.reg.listener_inode_for(dst) else {
            return self.kernel(FallbackReason::PeerNotEnabled, &fd, inode);
        };
        let listener = self.reg.listeners[&linode].session;
        // Its acceptor will not claim while the short_lived policy keeps
        // the listener's connections on kernel TCP (a connector whose
        // board could not tell asks anyway).
        if self.reg.listeners[&linode].short.plain_until > sys::monotonic_ns() {
            return self.kernel(FallbackReason::ShortLived, &fd, inode);
        }
        // Several listeners (SO_REUSEPORT): which one accepts is the
        // kernel's choice, so no region kept with one of them is reused.
        let sole = self.reg.listeners_for(dst).nth(1).is_none();
        self.make_room(end.uid);
        if let Some(reason) = self.refusal(sid, dst.port()) {
            return self.kernel(reason, &fd, inode);
        }
        if !self.reg.may_add_intent(end.uid) {
            return self.kernel(FallbackReason::Limit, &fd, inode);
        }
        let c = match self.create(sid, mode, listener, sole) {
            Ok(c) => c,
            Err(e) => {
                // The connector reports devd_error and connects plainly.
                self.watch_kernel(&fd, inode);
                return Err(e);
            }
        };
        if let Some(w) = &mut self.watch {
            w.forget(inode);
        }
        self.reg
            .charge(end.uid, 1, isize::try_from(c.bytes).unwrap_or(isize::MAX));
        let key = (canon(dst.ip()), dst.port());
        let token = c.token;
        let intent = Intent {
            key,
            token,
            mode,
            end,
            at: Instant::now(),
            sock: fd,
            id: c.id,
            res: c.res,
            bytes: c.bytes,
            port: std::cell::Cell::new(0),
            reuse_by: c.reuse_by,
            listener: Some(linode),
        };
        for old in self.reg.add_intent(key, intent) {
            self.discard_intent(old);
        }
        Ok((
            Response::Proceed {
                token,
                attachment: c.attachment,
            },
            c.fds,
        ))
    }

    /// An Intent's connection: its token, resources and the connector's
    /// end. It is created now (or was, in the pool), so that neither the
    /// acceptor's Claim nor the connector once claimed needs another
    /// request.
    fn create(
        &mut self,
        sid: u64,
        mode: Mode,
        listener: Option<u64>,
        sole: bool,
    ) -> Result<Created, RequestError> {
        let token = self.token()?;
        let reused = match (mode, listener) {
            (Mode::Direct, Some(l)) if sole => self.reuse(sid, l),
            _ => None,
        };
        let reuse_by = if reused.is_some() { listener } else { None };
        let (id, mut res) = match (mode, reused) {
            (_, Some(p)) => p,
            (Mode::Queued, _) => {
                let id = self.new_id();
                (id, self.queued_res(id)?)
            }
            _ => match self.pool.pop() {
                Some(p) => p,
                None => {
                    let id = self.new_id();
                    (id, self.direct_res(id)?)
                }
            },
        };
        let bytes = match &res {
            Res::Direct(_) => self.cfg.region_size / 2,
            Res::Queued(_) => self.cfg.region_size,
        };
        let (attachment, fds) = match attachment(&mut res, id, 0, reuse_by.is_some(), None) {
            Ok(a) => a,
            Err(e) => {
                self.free_res(id, &res);
                return Err(e);
            }
        };
        Ok(Created {
            token,
            id,
            res,
            bytes,
            attachment,
            fds,
            reuse_by,
        })
    }

    /// A region parked by session `sid` (connector) and `acceptor` for the
    /// next connection between them, as a new connection: its header reset
    /// (ring words, holders and marks zero, the new id), with pwrite: no
    /// process uses it while it is parked.
    fn reuse(&mut self, sid: u64, acceptor: u64) -> Option<(u64, Res)> {
        let d = self.reg.unpark(sid, acceptor)?;
        let id = self.new_id();
        let mut page = [0u8; layout::HEADER_SIZE];
        let h = layout::header_bytes(
            RegionKind::Direct,
            d.layout.size,
            id,
            d.layout.cap as u64,
            0,
        );
        page[..h.len()].copy_from_slice(&h);
        if let Err(e) = sys::pwrite_all(d.memfd.as_fd(), &page, 0) {
            log::warn!("region {}: header reset failed ({e}); not reused", d.region);
            return None;
        }
        Some((id, Res::Direct(d)))
    }

    fn new_id(&mut self) -> u64 {
        let id = self.reg.next_id;
        self.reg.next_id += 1;
        id
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
        !self.trash.is_empty() || self.pool_wanted()
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

    fn count_closed(&mut self, c: &Conn) {
        let j = conn_json(c);
        let k = usize::from(c.mode == Mode::Queued);
        // Head words come from client-writable memory: never overflow.
        let b = j.bytes_c2a.saturating_add(j.bytes_a2c);
        self.totals.bytes_closed[k] = self.totals.bytes_closed[k].saturating_add(b);
    }

    /// Why session `sid`'s user may not have one more accelerated end on
    /// `port`, if it may not (policy, then the user's caps).
    fn refusal(&self, sid: u64, port: u16) -> Option<FallbackReason> {
        let s = self.session(sid);
        if !self.cfg.policy.allows(s.uid, s.gid, port) {
            return Some(FallbackReason::Policy);
        }
        let (ends, bytes) = self.reg.usage.get(&s.uid).copied().unwrap_or((0, 0));
        (ends + 1 > self.cfg.policy.max_connections_per_user
            || bytes + self.cfg.region_size > self.cfg.policy.max_memory_per_user)
            .then_some(FallbackReason::Limit)
    }

    /// Frees user `uid`'s parked regions, oldest first, while they keep it
    /// from one more connection's region (the live one matters more).
    fn make_room(&mut self, uid: u32) {
        let max = self.cfg.policy.max_memory_per_user;
        while self
            .reg
            .usage
            .get(&uid)
            .is_some_and(|u| u.1 + self.cfg.region_size > max)
            && self.reg.evict_one_of(uid)
        {}
    }

    /// Frees an intent nobody will claim: refunds its connector's charge
    /// and drops its resources (their fds close with it).
    fn discard_intent(&mut self, i: Intent) {
        // Its connector writes on the kernel socket until told: it stays
        // there and lets its end go.
        if let Err(e) = refuse(&i.res) {
            log::debug!("connection {}: CLAIM word: {e}", i.id);
        }
        self.unclaim(&i);
    }

    /// Refunds an unclaimed intent's charge and frees its engine state
    /// (its fds close when it is dropped; `bury` keeps its socket).
    fn unclaim(&mut self, i: &Intent) {
        self.reg.charge(
            i.end.uid,
            -1,
            -isize::try_from(i.bytes).unwrap_or(isize::MAX),
        );
        self.free_res(i.id, &i.res);
    }

    /// Frees an intent whose connector let go of it before any Claim, and
    /// remembers it (see [`registry::Gone`]): a later Claim of it is
    /// answered ExpectKernel `connector_gone`.
    fn bury(&mut self, i: Intent) {
        self.unclaim(&i);
        let Intent {
            key,
            token,
            sock,
            at,
            ..
        } = i;
        self.reg.bury(key, token, sock, at);
    }

    /// Tells the engine to forget a Queued connection's resources.
    fn free_res(&self, id: u64, res: &Res) {
        if let Res::Queued(_) = res {
            for side in 0..2 {
                self.engine.send(Cmd::SideGone { id, side });
            }
        }
    }

    /// Answers a Claim with ExpectKernel: the acceptor has the connection,
    /// which stays on kernel TCP (counted here, once).
    fn expect_kernel(&mut self, token: u64, reason: FallbackReason) -> Reply {
        self.totals.fallback(reason);
        self.totals.kernel_connection();
        (Response::ExpectKernel { token, reason }, vec![])
    }

    fn claim(&mut self, sid: u64, fd: &OwnedFd) -> Result<Reply, RequestError> {
        let end = self.end(sid, fd)?;
        let peer = sys::peer_addr(fd.as_fd()).map_err(RequestError::NotSocket)?;
        let here = canon_addr(end.addr);
        let from = canon_addr(peer);
        // The intent's own socket must be this accepted socket's peer (see
        // `peer_of`): a stale intent (its connect failed, or went
        // elsewhere) never connected here.
        let mut local = None;
        let intent = self.reg.take_intent(here, |i| {
            // A port seen before says no without a syscall (a connected
            // socket keeps its port).
            let known = i.port.get();
            if known != 0 && known != from.1 {
                return false;
            }
            let Ok(l) = sys::local_addr(i.sock.as_fd()) else {
                return false;
            };
            i.port.set(l.port());
            local = peer_of(&i.sock, l, here, from).then_some(l);
            local.is_some()
        });
        let Some(mut intent) = intent else {
            // An intent given up before this Claim: the acceptor stays on
            // kernel TCP (counted).
            let gone = self.reg.gone.iter().position(|g| {
                g.key == here
                    && sys::local_addr(g.sock.as_fd())
                        .is_ok_and(|l| peer_of(&g.sock, l, here, from))
            });
            if let Some(g) = gone.and_then(|i| self.reg.gone.remove(i)) {
                return Ok(self.expect_kernel(g.token, FallbackReason::ConnectorGone));
            }
            // No intent: a plain peer; the acceptor goes on without delay.
            return Ok((Response::Ok, vec![]));
        };
        let token = intent.token;
        // A reused region is mapped in the process it was parked by; no
        // other acceptor may have it.
        let reuse = intent.reuse_by.is_some();
        let refused = match intent.reuse_by {
            Some(s) if s != sid => Some(FallbackReason::OtherAcceptor),
            _ => {
                self.make_room(end.uid);
                self.refusal(sid, end.addr.port())
            }
        };
        // The acceptor's user is held to the same policy and caps. Refused,
        // the connector is told (CLAIM = kernel) and both stay on TCP.
        if let Some(reason) = refused {
            self.discard_intent(intent);
            return Ok(self.expect_kernel(token, reason));
        }
        // The acceptor says accepted in the hand-over words itself, once
        // it holds its end (docs/protocol.md section 2.3).
        // A reused region carries no fds: the acceptor rings the doorbell
        // it already knows by its id, and no ringers' end is made for it.
        let peer_bell = if reuse {
            self.bells
                .common_id(intent.end.session)
                .map(|id| (id, None))
        } else {
            self.bells
                .of(intent.end.session)
                .map(|(id, fd)| (id, Some(fd)))
        };
        if let (Res::Direct(d), Some(own)) = (&intent.res, self.bells.common_id(sid)) {
            // The connector learns the acceptor's doorbell when it moves
            // (docs/protocol.md section 3.2); without it, it asks later.
            let at = layout::hov::ACCEPTOR_BELL as u64;
            if let Err(e) = sys::pwrite_all(d.memfd.as_fd(), &own.to_le_bytes(), at) {
                log::warn!(
                    "connection {}: acceptor's doorbell not written: {e}",
                    intent.id
                );
            }
        }
        let given = attachment(&mut intent.res, intent.id, 1, reuse, peer_bell);
        let (attachment, fds) = match given {
            Ok(a) => a,
            Err(e) => {
                log::warn!("connection {}: acceptor's end: {e}", intent.id);
                self.discard_intent(intent);
                return Ok(self.expect_kernel(token, FallbackReason::DevdError));
            }
        };
        if let Some(l) = local {
            intent.end.addr = l;
        }
        let (id, mode, bytes) = (intent.id, intent.mode, intent.bytes);
        self.reg
            .charge(end.uid, 1, isize::try_from(bytes).unwrap_or(isize::MAX));
        self.reg.by_inode.insert(intent.end.inode, (id, 0));
        self.reg.by_inode.insert(end.inode, (id, 1));
        self.totals.created(mode);
        self.totals.reused += u64::from(reuse);
        // Dropping the intent's duplicate of the connector's socket: the
        // connection exists; holding it longer would only delay its close.
        self.reg.conns.insert(
            id,
            Conn {
                id,
                mode,
                ends: [intent.end, end],
                res: intent.res,
                bytes,
                violated: false,
                parkable: true,
                park: [false; 2],
                listener: intent.listener,
                born: intent.at,
                ended: None,
            },
        );
        Ok((Response::Expect { token, attachment }, fds))
    }

    fn direct_res(&mut self, id: u64) -> Result<Res, RequestError> {
        let layout = DirectLayout::for_size(self.cfg.region_size)
            .map_err(|e| RequestError::Resources(io::Error::other(e)))?;
        let memfd = sys::memfd_sealed("direct", layout.size).map_err(RequestError::Resources)?;
        let header =
            layout::header_bytes(RegionKind::Direct, layout.size, id, layout.cap as u64, 0);
        sys::pwrite_all(memfd.as_fd(), &header, 0).map_err(RequestError::Resources)?;
        Ok(Res::Direct(DirectRes {
            memfd: Arc::new(memfd),
            layout,
            // Unpredictable and unique across devd restarts: a client may
            // still keep a region of an earlier devd.
            region: self.token()?,
        }))
    }

    fn queued_res(&mut self, id: u64) -> Result<Res, RequestError> {
        let layout = QueuedLayout::for_size(self.cfg.region_size)
            .map_err(|e| RequestError::Resources(io::Error::other(e)))?;
        let mut memfds = Vec::new();
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        let mut inits = Vec::new();
        for _ in 0..2 {
            let memfd =
                sys::memfd_sealed("queued", layout.size).map_err(RequestError::Resources)?;
            let header = layout::header_bytes(
                RegionKind::Queued,
                layout.size,
                id,
                u64::from(layout.qsize),
                layout.slot as u64,
            );
            sys::pwrite_all(memfd.as_fd(), &header, 0).map_err(RequestError::Resources)?;
            let region = DeviceRegion::new(dup(&memfd)?, layout).map_err(RequestError::Device)?;
            let kick = EventFd::new().map_err(RequestError::Resources)?;
            let call = EventFd::new().map_err(RequestError::Resources)?;
            kicks.push(Arc::new(dup(&kick)?));
            calls.push(Arc::new(dup(&call)?));
            memfds.push(Some(memfd));
            inits.push(SideInit { region, kick, call });
        }
        // The hand-over words both ends map (the regions are each end's own).
        let hov =
            sys::memfd_sealed("handover", layout::HOV_PAGE).map_err(RequestError::Resources)?;
        let header = layout::header_bytes(RegionKind::Handover, layout::HOV_PAGE, id, 0, 0);
        sys::pwrite_all(hov.as_fd(), &header, 0).map_err(RequestError::Resources)?;
        let counters = Arc::new(QueuedCounters::default());
        let [a, b]: [SideInit; 2] = inits
            .try_into()
            .map_err(|_| RequestError::Resources(io::Error::other("queued sides")))?;
        self.engine.send(Cmd::Add {
            id,
            sides: Box::new([a, b]),
            counters: counters.clone(),
        });
        let two = |v: Vec<Fd>| -> [Fd; 2] {
            let mut it = v.into_iter();
            [it.next().expect("two fds"), it.next().expect("two fds")]
        };
        let mut m = memfds.into_iter();
        Ok(Res::Queued(QueuedRes {
            hov: Arc::new(hov),
            memfd: [m.next().flatten(), m.next().flatten()],
            kick: two(kicks),
            call: two(calls),
            layout,
            counters,
        }))
    }

    /// The Attached reply for end `e` of connection `id`.
    fn hand_out(&mut self, id: u64, e: usize) -> Result<Reply, RequestError> {
        let conn = self
            .reg
            .conns
            .get_mut(&id)
            .ok_or(RequestError::NoConnection(0))?;
        let peer_bell = self.bells.of(conn.ends[1 - e].session);
        let peer_bell = peer_bell.map(|(id, fd)| (id, Some(fd)));
        let (a, fds) = attachment(&mut conn.res, id, e, false, peer_bell)?;
        // Mapped by one more process: never parked.
        conn.parkable = false;
        Ok((Response::Attached(a), fds))
    }

    fn attach(&mut self, sid: u64, fd: &OwnedFd) -> Result<Reply, RequestError> {
        let inode = sys::socket_inode(fd.as_fd()).map_err(RequestError::NotSocket)?;
        let Some(&(id, e)) = self.reg.by_inode.get(&inode) else {
            // Not paired yet: the connector's own intent, asked for again
            // by the session that made it (its Proceed named a reused
            // region this process no longer keeps). The same end, with fds.
            let intent = self
                .reg
                .intents
                .values_mut()
                .flatten()
                .find(|i| i.end.inode == inode && i.end.session == sid)
                .ok_or(RequestError::NoConnection(inode))?;
            let (a, fds) = attachment(&mut intent.res, intent.id, 0, false, None)?;
            return Ok((Response::Attached(a), fds));
        };
        let reply = self.hand_out(id, e)?;
        let (pid, local) = (self.session(sid).pid, sys::local_addr(fd.as_fd()).ok());
        if let Some(conn) = self.reg.conns.get_mut(&id) {
            let end = &mut conn.ends[e];
            end.session = sid;
            end.pid = pid;
            end.orphaned = None;
            self.reg.orphans.remove(&(id, e));
            if let Some(a) = local {
                end.addr = a;
            }
        }
        Ok(reply)
    }

    fn holds(&self, sid: u64, id: u64) -> bool {
        self.reg
            .conns
            .get(&id)
            .is_some_and(|c| c.ends.iter().any(|e| e.session == sid && !e.released))
    }

    fn release(&mut self, sid: u64, id: u64, e: usize, park: bool) -> Result<Reply, RequestError> {
        if e == 0 && !self.reg.conns.contains_key(&id) {
            // A connector letting go of an intent nobody claimed (its
            // connect failed, or the acceptor answered KERNEL).
            let gone = self
                .reg
                .retain_intents(|i| i.id != id || i.end.session != sid);
            if gone.is_empty() {
                return Err(RequestError::NotHeld(id));
            }
            for i in gone {
                self.judge_unclaimed(&i);
                self.bury(i);
            }
            return Ok((Response::Ok, vec![]));
        }
        let conn = self
            .reg
            .conns
            .get_mut(&id)
            .ok_or(RequestError::NotHeld(id))?;
        if conn.ends[e].session != sid || conn.ends[e].released {
            return Err(RequestError::NotHeld(id));
        }
        conn.park[e] = park;
        self.release_end(id, e);
        Ok((Response::Ok, vec![]))
    }

    fn release_end(&mut self, id: u64, e: usize) {
        let Some(conn) = self.reg.conns.get_mut(&id) else {
            return;
        };
        if conn.ends[e].released {
            return;
        }
        conn.ends[e].released = true;
        let first = conn.ended.is_none();
        conn.ended.get_or_insert_with(Instant::now);
        let (uid, inode, bytes) = (conn.ends[e].uid, conn.ends[e].inode, conn.bytes);
        let both = conn.ends.iter().all(|x| x.released);
        if conn.mode == Mode::Queued {
            self.engine.send(Cmd::SideGone { id, side: e });
        }
        self.reg
            .charge(uid, -1, -isize::try_from(bytes).unwrap_or(isize::MAX));
        self.reg.by_inode.remove(&inode);
        if first {
            // Judged when its first end goes: the other may linger (a
            // forked child that exits without a close is found gone only
            // later), and a streak must not wait for it.
            if let Some((listener, lived, short)) = self
                .reg
                .conns
                .get(&id)
                .and_then(|c| verdict(&self.cfg.policy, c))
            {
                self.judge_listener(listener, lived, short);
            }
        }
        if both {
            let Some(c) = self.reg.conns.remove(&id) else {
                return;
            };
            if self.parkable(&c) {
                self.park(c);
                return;
            }
            // Freed (and its bytes counted) between requests, or at once
            // when requests never leave a moment for it.
            self.trash.push(c);
            if self.trash.len() > MAX_TRASH {
                let c = self.trash.remove(0);
                self.count_closed(&c);
            }
        }
    }

    /// The policy's look at an intent its connector let go of unclaimed:
    /// its setup bought nothing (the acceptor could not or would not
    /// claim it: a process without access to devd, a plain program on
    /// the listening socket), so it counts as short.
    fn judge_unclaimed(&mut self, i: &Intent) {
        if self.cfg.policy.short_lived_ms != 0 {
            self.judge_listener(i.listener, i.at.elapsed(), true);
        }
    }

    /// Counts a judged connection that `lived` towards its listener's
    /// streak (`board::judge`), and republishes the board if that puts
    /// the listener's connections on kernel TCP.
    fn judge_listener(&mut self, listener: Option<u64>, lived: std::time::Duration, short: bool) {
        let policy = &self.cfg.policy;
        let Some(inode) = listener else { return };
        let now = sys::monotonic_ns();
        let born = now.saturating_sub(u64::try_from(lived.as_nanos()).unwrap_or(u64::MAX));
        let Some(l) = self.reg.listeners.get_mut(&inode) else {
            return;
        };
        if board::judge(policy, &mut l.short, short, born, now) {
            log::info!(
                "listener {}: {} short or unclaimed connections in a row: its connections stay on kernel TCP for {} ms (short_lived)",
                l.addr,
                policy.short_lived_streak,
                policy.short_lived_hold_ms
            );
            self.totals.short_lived_periods += 1;
            // Every listener on that address (SO_REUSEPORT) is held alike:
            // the board answers for the address.
            let (addr, until) = (l.addr, l.short.plain_until);
            let mut same = Vec::new();
            for (&i, other) in &mut self.reg.listeners {
                if other.addr == addr {
                    other.short.plain_until = other.short.plain_until.max(until);
                    same.push(i);
                }
            }
            self.board.publish(&self.reg.listeners);
            // Acceptors that read the board from now on do not claim:
            // pending intents to it end now (their connectors stay on the
            // kernel socket, as CLAIM = kernel tells them).
            let pending = self
                .reg
                .retain_intents(|i| !i.listener.is_some_and(|x| same.contains(&x)));
            for i in pending {
                self.totals.fallback(FallbackReason::ShortLived);
                self.discard_intent(i);
            }
        }
    }

    /// Whether a closed connection's region may be kept for the next
    /// connection between its two sessions ([`Parked`]): both ends asked
    /// for it, nobody else ever attached, neither end broke the protocol,
    /// both sessions still live, and it is Direct.
    fn parkable(&self, c: &Conn) -> bool {
        let live = |e: &End| self.sessions.contains_key(&e.session);
        c.parkable
            && c.park == [true; 2]
            && !c.violated
            && c.ends.iter().all(live)
            && matches!(c.res, Res::Direct(_))
    }

    /// Keeps a closed connection's region (see [`Devd::parkable`]).
    fn park(&mut self, c: Conn) {
        // Its bytes count now: reuse resets the ring words.
        self.count_closed(&c);
        if let Res::Direct(res) = c.res {
            self.reg.park(Parked {
                sessions: [c.ends[0].session, c.ends[1].session],
                uids: [c.ends[0].uid, c.ends[1].uid],
                bytes: c.bytes,
                res,
            });
        }
    }

    /// Forgets everything a session held (its process closed the socket or died).
    pub fn end_session(&mut self, sid: u64) {
        self.bells.forget(sid);
        if let Some(s) = self.sessions.remove(&sid) {
            if let Some(n) = self.sessions_of.get_mut(&s.uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.sessions_of.remove(&s.uid);
                }
            }
        }
        self.reg.unpark_session(sid);
        let listened: Vec<u64> = self
            .reg
            .listeners
            .iter()
            .filter(|(_, l)| l.session == Some(sid))
            .map(|(&inode, _)| inode)
            .collect();
        for inode in listened {
            self.let_go_of_listener(inode);
        }
        // Its own intents, and those reusing a region only it could claim.
        for i in self
            .reg
            .retain_intents(|i| i.end.session != sid && i.reuse_by != Some(sid))
        {
            self.bury(i);
        }
        let held: Vec<(u64, usize)> = self
            .reg
            .conns
            .values()
            .flat_map(|c| {
                (0..2)
                    .filter(|e| c.ends[*e].session == sid)
                    .map(move |e| (c.id, e))
            })
            .collect();
        let now = Instant::now();
        for (id, e) in held {
            // A Direct end may live on in an exec'd image, a child or a
            // process the socket was passed to: it stays while its TCP
            // socket is held anywhere, attachable by it.
            match self.reg.conns.get(&id) {
                Some(c) if c.mode == Mode::Direct && !c.ends[e].released => {
                    self.orphan(id, e, now);
                    self.look_at_orphan(id, e, now);
                }
                _ => self.release_end(id, e),
            }
        }
    }

    /// Leave: the process of session `sid` closed end `e` of connection
    /// `id` while others still hold its socket (see [`Request::Leave`]).
    fn leave(&mut self, sid: u64, id: u64, e: usize) -> Result<Reply, RequestError> {
        let held = self
            .reg
            .conns
            .get(&id)
            .is_some_and(|c| c.ends[e].session == sid && !c.ends[e].released);
        if !held {
            return Err(RequestError::NotHeld(id));
        }
        self.orphan(id, e, Instant::now());
        Ok((Response::Ok, vec![]))
    }

    /// End `e` of connection `id` is held by no session any more (see
    /// [`registry::End::orphaned`]): its socket is looked up from now on.
    fn orphan(&mut self, id: u64, e: usize, now: Instant) {
        if let Some(c) = self.reg.conns.get_mut(&id) {
            c.ends[e].orphaned.get_or_insert(now);
            self.reg.orphans.entry((id, e)).or_insert(registry::Look {
                next: now + ORPHAN_CHECK,
                every: ORPHAN_CHECK,
            });
        }
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

    /// Drops stale intents.
    pub fn expire(&mut self) {
        self.board.beat();
        for i in self.reg.expire(Instant::now(), INTENT_TTL_S) {
            self.discard_intent(i);
        }
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
        match (orphans, watch) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Work due on time, whatever woke the control loop: orphaned ends to
    /// release, watch generations to end.
    pub fn timers(&mut self) {
        self.release_orphans();
        if let Some(w) = &mut self.watch {
            w.retire(Instant::now());
        }
    }

    /// Looks up the orphaned ends that are due: released once no process
    /// holds their socket (or, when sock_diag cannot tell, after
    /// `ORPHAN_GRACE`); looked up again later otherwise.
    pub fn release_orphans(&mut self) {
        let now = Instant::now();
        let due: Vec<(u64, usize)> = self
            .reg
            .orphans
            .iter()
            .filter(|(_, l)| l.next <= now)
            .map(|(&k, _)| k)
            .collect();
        for (id, e) in due {
            self.look_at_orphan(id, e, now);
        }
    }

    /// Looks up orphaned end `e` of connection `id` now (see
    /// [`Devd::release_orphans`]).
    fn look_at_orphan(&mut self, id: u64, e: usize, now: Instant) {
        let Some(since) = self.reg.conns.get(&id).and_then(|c| c.ends[e].orphaned) else {
            self.reg.orphans.remove(&(id, e));
            return;
        };
        let seen = self.orphan_seen(id, e);
        let Some(look) = self.reg.orphans.get_mut(&(id, e)) else {
            return;
        };
        match seen {
            Seen::Gone => self.release_orphan(id, e),
            Seen::Held => {
                look.every = (look.every * 2).min(ORPHAN_CHECK_MAX);
                look.next = now + look.every;
                if let Some(c) = self.reg.conns.get_mut(&id) {
                    c.ends[e].orphaned = Some(now);
                }
            }
            Seen::Unsure if now.duration_since(since) >= ORPHAN_GRACE => {
                self.release_orphan(id, e);
            }
            Seen::Unsure => {
                look.every = if self.diag.is_some() {
                    ORPHAN_CHECK
                } else {
                    ORPHAN_GRACE
                };
                look.next = (now + look.every).min(since + ORPHAN_GRACE);
            }
        }
    }

    /// Releases orphaned end `e` of connection `id`.
    fn release_orphan(&mut self, id: u64, e: usize) {
        self.reg.orphans.remove(&(id, e));
        if let Some(c) = self.reg.conns.get_mut(&id) {
            c.ends[e].orphaned = None;
        }
        self.release_end(id, e);
    }

    /// Whether some process holds the TCP socket of orphaned end `e` of
    /// connection `id` (an exec'd image that inherited it, a child, a
    /// process it was passed to; a message carrying it still queued on a
    /// unix socket would too). sock_diag tells: the connection's socket on
    /// this end's side has our inode (held), another one (0 once closed
    /// everywhere while the kernel finishes the connection, or a new
    /// socket on the same addresses: gone), or none is left while the
    /// peer's side is in TIME_WAIT (the connection closed both ways; a
    /// passive closer's socket is gone by then: gone). Otherwise, or
    /// without sock_diag: unsure.
    fn orphan_seen(&mut self, id: u64, e: usize) -> Seen {
        let Some(c) = self.reg.conns.get(&id) else {
            return Seen::Unsure;
        };
        let (mine, inode, peer) = (c.ends[e].addr, c.ends[e].inode, c.ends[1 - e].addr);
        let Some(diag) = &self.diag else {
            return Seen::Unsure;
        };
        let mut look = |local, remote| {
            self.diag_seq = self.diag_seq.wrapping_add(1);
            crate::sys::tcp_lookup(diag.as_fd(), local, remote, self.diag_seq)
        };
        let connected = |s: &crate::sys::TcpSeen| s.state != crate::sys::TCP_LISTEN;
        match look(mine, peer) {
            Ok(Some(s)) if connected(&s) && u64::from(s.inode) == inode => Seen::Held,
            Ok(Some(s)) if connected(&s) => Seen::Gone,
            // Not found is no proof alone (a socket bound to a device or a
            // VRF is never found by this lookup): only with the peer in
            // TIME_WAIT, after both sides' FINs, is the connection over.
            Ok(_) => match look(peer, mine) {
                Ok(Some(s)) if s.state == crate::sys::TCP_TIME_WAIT => Seen::Gone,
                _ => Seen::Unsure,
            },
            Err(err) => {
                log::debug!("connection {id}: sock_diag: {err}");
                Seen::Unsure
            }
        }
    }

    /// A statistics page. A devd serving several users (as root) shows a
    /// non-root session only the connections one of whose ends is theirs.
    fn stats(&self, sid: u64, after: u64, limit: u16) -> Reply {
        let uid = self.session(sid).uid;
        let sees_all = uid == 0 || uid == sys::uid();
        let visible = |c: &&Conn| sees_all || c.ends.iter().any(|e| e.uid == uid);
        let mut page = Page {
            devd: DevdJson {
                pid: std::process::id(),
                uptime_s: self.started.elapsed().as_secs(),
                backend: self.backend,
                sessions: self.sessions.len(),
                doorbells: self.bells.count(),
                live_connections: self.reg.conns.len(),
                listeners: self.reg.listeners.len(),
                parked_regions: self.reg.parked.len(),
            },
            totals: {
                let mut t = self.totals.json();
                t.violations += QueuedCounters::get(&self.violations);
                let b = |j: &ConnJson| j.bytes_c2a.saturating_add(j.bytes_a2c);
                for c in self.reg.conns.values() {
                    let j = conn_json(c);
                    match c.mode {
                        Mode::Queued => {
                            t.bytes.queued = t.bytes.queued.saturating_add(b(&j));
                        }
                        _ => t.bytes.direct = t.bytes.direct.saturating_add(b(&j)),
                    }
                }
                t
            },
            connections: Vec::new(),
        };
        // A page must fit one control frame: stop adding connections
        // before the JSON could outgrow it and say there is more.
        let mut budget = MAX_FRAME - 16 * 1024;
        let mut more = false;
        for c in self
            .reg
            .conns
            .range(after.saturating_add(1)..)
            .map(|(_, c)| c)
            .filter(visible)
        {
            let j = conn_json(c);
            let len = serde_json::to_string(&j).map_or(usize::MAX, |s| s.len() + 1);
            if page.connections.len() == usize::from(limit) || len > budget {
                more = true;
                break;
            }
            budget -= len;
            page.connections.push(j);
        }
        let json =
            serde_json::to_string(&page).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        (Response::Stats { json, more }, vec![])
    }
}

/// An address as both ends of a local TCP connection see it (see `canon`).
fn canon_addr(a: std::net::SocketAddr) -> (std::net::IpAddr, u16) {
    (canon(a.ip()), a.port())
}

/// Whether `sock` (a connector's socket devd holds, whose local address is
/// `local`) is connected to the accepted socket whose local address is
/// `here` and peer `from`: `local` is `from` and its peer is `here`.
fn peer_of(
    sock: &OwnedFd,
    local: std::net::SocketAddr,
    here: (std::net::IpAddr, u16),
    from: (std::net::IpAddr, u16),
) -> bool {
    canon_addr(local) == from && sys::peer_addr(sock.as_fd()).ok().map(canon_addr) == Some(here)
}

/// Writes CLAIM = kernel into an intent's hand-over words with pwrite (the
/// Direct region's header, or the Queued hand-over page): nobody claimed
/// it, or the acceptor was refused; its connector lets its end go.
fn refuse(res: &Res) -> io::Result<()> {
    let words = match res {
        Res::Direct(d) => d.memfd.as_fd(),
        Res::Queued(q) => q.hov.as_fd(),
    };
    let (off, b) = layout::claim_kernel_bytes();
    sys::pwrite_all(words, &b, off)
}

/// End `e`'s attachment of connection `id` and the fds that go with it.
/// With `reuse` (Direct), no fds: the process kept the region parked.
/// `peer_bell`: the doorbell of the other end's session, if known (Direct),
/// with a ringers' end to send unless the attachment reuses a region.
fn attachment(
    res: &mut Res,
    id: u64,
    e: usize,
    reuse: bool,
    peer_bell: Option<(u32, Option<Fd>)>,
) -> Result<(Attachment, Vec<Fd>), RequestError> {
    let side = if e == 0 {
        Side::Connector
    } else {
        Side::Acceptor
    };
    match res {
        Res::Direct(d) => {
            let fds = if reuse {
                vec![]
            } else {
                std::iter::once(d.memfd.clone())
                    .chain(peer_bell.iter().filter_map(|(_, fd)| fd.clone()))
                    .collect()
            };
            let a = Attachment {
                conn_id: id,
                mode: Mode::Direct,
                side,
                region_size: d.layout.size as u64,
                geom_a: d.layout.cap as u64,
                geom_b: 0,
                region: d.region,
                reuse,
                peer_bell: peer_bell.map_or(0, |(id, _)| id),
            };
            Ok((a, fds))
        }
        Res::Queued(q) => {
            let memfd = q.memfd[e]
                .take()
                .ok_or(RequestError::AlreadyAttached(id, e))?;
            let fds = vec![
                Arc::new(memfd),
                q.kick[e].clone(),
                q.call[e].clone(),
                q.hov.clone(),
            ];
            let a = Attachment {
                conn_id: id,
                mode: Mode::Queued,
                side,
                region_size: q.layout.size as u64,
                geom_a: u64::from(q.layout.qsize),
                geom_b: q.layout.slot as u64,
                region: id,
                reuse: false,
                peer_bell: 0,
            };
            Ok((a, fds))
        }
    }
}

/// The `short_lived` policy's look at connection `c` when its first end
/// closed: its listener, how long it lived from its Intent to then, and
/// whether that was short (None: the policy is off, or no listener).
fn verdict(
    policy: &crate::config::Policy,
    c: &Conn,
) -> Option<(Option<u64>, std::time::Duration, bool)> {
    if policy.short_lived_ms == 0 || c.listener.is_none() {
        return None;
    }
    let lived = c
        .ended
        .map_or_else(|| c.born.elapsed(), |t| t.duration_since(c.born));
    let short = lived < std::time::Duration::from_millis(policy.short_lived_ms) && {
        let j = conn_json(c);
        board::was_short(policy, lived, j.bytes_c2a.saturating_add(j.bytes_a2c))
    };
    Some((c.listener, lived, short))
}

fn conn_json(c: &Conn) -> ConnJson {
    let state = if c.ends.iter().any(|e| e.released) {
        "closing"
    } else {
        "open"
    };
    let pids = [c.ends[0].pid, c.ends[1].pid];
    let (local, remote) = (c.ends[0].addr.to_string(), c.ends[1].addr.to_string());
    match &c.res {
        Res::Direct(d) => {
            // A region that cannot be read shows zeros (never happens: devd
            // owns the memfd).
            let mut header = vec![0u8; layout::HEADER_SIZE];
            let _ = sys::pread_exact(d.memfd.as_fd(), &mut header, 0);
            let snaps = [
                stream::snapshot(&header, d.layout, 0),
                stream::snapshot(&header, d.layout, 1),
            ];
            let fill = |s: &stream::DirSnapshot| s.head.saturating_sub(s.tail);
            let rings = snaps
                .iter()
                .enumerate()
                .map(|(i, s)| RingJson {
                    from: if i == 0 { "connector" } else { "acceptor" },
                    head: s.head,
                    tail: s.tail,
                    fill: fill(s),
                    cap: d.layout.cap as u64,
                    flags: flag_names(s.flags),
                    consumer_asleep: s.cons_wait & 1 == 1,
                    producer_asleep: s.prod_wait & 1 == 1,
                    consumer_closed: s.cons_closed,
                })
                .collect();
            let half = snaps.iter().any(|s| s.flags & FLAG_EOS != 0);
            ConnJson {
                id: c.id,
                mode: "direct",
                state: if state == "open" && half {
                    "half-closed"
                } else {
                    state
                },
                pids,
                local,
                remote,
                bytes_c2a: snaps[0].head,
                bytes_a2c: snaps[1].head,
                ring_fill: [fill(&snaps[0]), fill(&snaps[1])],
                notify_sent: snaps[0].notify_sent.wrapping_add(snaps[1].notify_sent),
                notify_suppressed: snaps[0]
                    .notify_suppressed
                    .wrapping_add(snaps[1].notify_suppressed),
                region_size: d.layout.size as u64,
                rings,
            }
        }
        Res::Queued(q) => {
            let k = &q.counters;
            let g = QueuedCounters::get;
            ConnJson {
                id: c.id,
                mode: "queued",
                state,
                pids,
                local,
                remote,
                bytes_c2a: g(&k.bytes[0]),
                bytes_a2c: g(&k.bytes[1]),
                ring_fill: [0, 0],
                notify_sent: g(&k.calls[0]) + g(&k.calls[1]),
                notify_suppressed: g(&k.calls_suppressed[0]) + g(&k.calls_suppressed[1]),
                region_size: q.layout.size as u64,
                rings: Vec::new(),
            }
        }
    }
}

fn flag_names(f: u32) -> Vec<&'static str> {
    let mut v = Vec::new();
    if f & layout::FLAG_EOS != 0 {
        v.push("eos");
    }
    if f & layout::FLAG_RESET != 0 {
        v.push("reset");
    }
    v
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
mod tests {
    use super::*;
    use ssock_hwbackends::loopback::Loopback;
    use std::net::{SocketAddr, TcpListener, TcpStream};

    /// A control plane with `policy` (TOML lines of the [policy] table)
    /// and one session (id 1) for this process; the short_lived policy
    /// off (these tests make many short connections to one listener).
    fn devd(policy: &str) -> Devd {
        let off = if policy.contains("short_lived_ms") {
            ""
        } else {
            "short_lived_ms = 0\n"
        };
        let toml = format!("[policy]\n{off}{policy}");
        let cfg = Config::from_toml(&toml, Config::user()).unwrap();
        let violations = Arc::new(AtomicU64::new(0));
        let engine =
            engine::spawn(Box::new(Loopback::default()), violations.clone(), None).unwrap();
        let mut d = Devd::new(cfg, engine, "loopback", violations);
        session(&mut d, 1);
        d
    }

    fn listener(d: &mut Devd) -> TcpListener {
        listener_of(d, 1)
    }

    /// A listener registered by session `sid`.
    fn listener_of(d: &mut Devd, sid: u64) -> TcpListener {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let r = d.handle(
            sid,
            Request::Listen,
            vec![l.as_fd().try_clone_to_owned().unwrap()],
        );
        assert_eq!(r.0, Response::Ok);
        l
    }

    fn socket() -> socket2::Socket {
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap()
    }

    fn intent(d: &mut Devd, s: &socket2::Socket, dst: SocketAddr) -> Reply {
        let fd = s.as_fd().try_clone_to_owned().unwrap();
        d.handle(
            1,
            Request::Intent {
                dst,
                pref: ModePref::Direct,
            },
            vec![fd],
        )
    }

    fn claim(d: &mut Devd, accepted: &TcpStream) -> Reply {
        let fd = accepted.as_fd().try_clone_to_owned().unwrap();
        d.handle(1, Request::Claim, vec![fd])
    }

    #[test]
    fn an_intent_creates_the_connection_and_its_claim_hands_out_the_other_end() {
        let mut d = devd("");
        let l = listener(&mut d);
        let dst = l.local_addr().unwrap();
        // Two connectors announce themselves to the same listener; only
        // the second connects. The claim must find the second's intent by
        // its socket, not take the first.
        let (s1, s2) = (socket(), socket());
        let (r1, f1) = intent(&mut d, &s1, dst);
        let (r2, f2) = intent(&mut d, &s2, dst);
        let (
            Response::Proceed { token: t1, .. },
            Response::Proceed {
                token: t2,
                attachment,
            },
        ) = (&r1, &r2)
        else {
            panic!("intents refused: {r1:?} {r2:?}");
        };
        assert_ne!(t1, t2);
        assert_eq!(
            (f1.len(), f2.len()),
            (1, 1),
            "a connector's end: its region"
        );
        assert_eq!(attachment.side, Side::Connector);
        s2.connect(&dst.into()).unwrap();
        let (a, _) = l.accept().unwrap();
        let (r, fds) = claim(&mut d, &a);
        match r {
            Response::Expect {
                token,
                attachment: b,
            } => {
                assert_eq!(token, *t2);
                assert_eq!(b.conn_id, attachment.conn_id);
                assert_eq!(b.side, Side::Acceptor);
                // The same region for both ends.
                let ino = |f: &Fd| sys::fstat(f.as_fd()).unwrap().st_ino;
                assert_eq!(ino(&fds[0]), ino(&f2[0]));
            }
            r => panic!("claim: {r:?}"),
        }
        assert_eq!(d.reg.conns.len(), 1);
        // The first intent still waits; a second claim of the same socket
        // finds nothing (plain).
        assert_eq!(d.reg.intents_of.get(&sys::uid()), Some(&1));
        assert_eq!(claim(&mut d, &a).0, Response::Ok);
    }

    #[test]
    fn unclaimed_intents_give_back_what_they_held() {
        let mut d = devd("max_connections_per_user = 2");
        let l = listener(&mut d);
        let dst = l.local_addr().unwrap();
        let s: Vec<_> = (0..3).map(|_| socket()).collect();
        let id = |r: &Reply| match r.0 {
            Response::Proceed { attachment, .. } => attachment.conn_id,
            ref r => panic!("refused: {r:?}"),
        };
        let first = id(&intent(&mut d, &s[0], dst));
        id(&intent(&mut d, &s[1], dst));
        // The cap counts the connectors' ends of unclaimed intents.
        assert_eq!(
            intent(&mut d, &s[2], dst).0,
            Response::Kernel {
                reason: FallbackReason::Limit
            }
        );
        // Its connect failed: the connector releases its end.
        let r = d.handle(
            1,
            Request::Release {
                conn_id: first,
                side: Side::Connector,
                park: false,
            },
            vec![],
        );
        assert_eq!(r.0, Response::Ok);
        id(&intent(&mut d, &s[2], dst));
        // A session that ends gives back all of its intents.
        d.end_session(1);
        assert!(d.reg.intents.is_empty() && d.reg.intents_of.is_empty());
        assert!(d.reg.usage.is_empty(), "usage left: {:?}", d.reg.usage);
    }

    #[test]
    fn a_claim_after_its_connector_let_go_consumes_the_hello_and_stays_plain() {
        let mut d = devd("");
        let l = listener(&mut d);
        let dst = l.local_addr().unwrap();
        let s = socket();
        let Response::Proceed { token, attachment } = intent(&mut d, &s, dst).0 else {
            panic!("intent refused");
        };
        s.connect(&dst.into()).unwrap();
        // The connector wrote its bytes and closed before the acceptor's
        // accept: its Release frees the intent's resources and charge.
        let r = d.handle(
            1,
            Request::Release {
                conn_id: attachment.conn_id,
                side: Side::Connector,
                park: false,
            },
            vec![],
        );
        assert_eq!(r.0, Response::Ok);
        assert!(d.reg.usage.is_empty() && d.reg.intents.is_empty());
        // The acceptor is told kernel TCP, with the reason counted.
        let (a, _) = l.accept().unwrap();
        assert_eq!(
            claim(&mut d, &a).0,
            Response::ExpectKernel {
                token,
                reason: FallbackReason::ConnectorGone
            }
        );
        assert!(d.reg.gone.is_empty());
        // A later plain connection is plain.
        let p = TcpStream::connect(dst).unwrap();
        let (b, _) = l.accept().unwrap();
        assert_eq!(claim(&mut d, &b).0, Response::Ok);
        drop(p);
    }

    #[test]
    fn closed_connections_wait_for_a_quiet_moment_but_not_without_bound() {
        let mut d = devd("");
        let l = listener(&mut d);
        let dst = l.local_addr().unwrap();
        for n in 0..(MAX_TRASH + 8) {
            let s = socket();
            let Response::Proceed { attachment, .. } = intent(&mut d, &s, dst).0 else {
                panic!("intent refused");
            };
            s.connect(&dst.into()).unwrap();
            let (a, _) = l.accept().unwrap();
            assert!(matches!(claim(&mut d, &a).0, Response::Expect { .. }));
            for side in [Side::Connector, Side::Acceptor] {
                let conn_id = attachment.conn_id;
                d.handle(
                    1,
                    Request::Release {
                        conn_id,
                        side,
                        park: false,
                    },
                    vec![],
                );
            }
            // No chore ran (no quiet moment): freed at once past the bound.
            assert_eq!(d.trash.len(), (n + 1).min(MAX_TRASH));
        }
        assert!(d.reg.conns.is_empty() && d.reg.usage.is_empty());
        while d.has_chores() {
            d.chore();
        }
        assert!(d.trash.is_empty() && d.pool.len() == POOL);
    }

    #[test]
    fn an_acceptor_over_its_cap_is_told_to_answer_kernel_and_the_end_is_freed() {
        // One end per user: the connector's intent takes it, so the
        // acceptor (the same user here) is over its cap at the claim.
        let mut d = devd("max_connections_per_user = 1");
        let l = listener(&mut d);
        let dst = l.local_addr().unwrap();
        let s = socket();
        let Response::Proceed { token, .. } = intent(&mut d, &s, dst).0 else {
            panic!("intent refused");
        };
        s.connect(&dst.into()).unwrap();
        let (a, _) = l.accept().unwrap();
        let (r, fds) = claim(&mut d, &a);
        assert_eq!(
            r,
            Response::ExpectKernel {
                token,
                reason: FallbackReason::Limit
            }
        );
        assert!(fds.is_empty());
        assert!(d.reg.conns.is_empty() && d.reg.usage.is_empty());
        assert_eq!(d.totals.fallbacks.get(&FallbackReason::Limit), Some(&1));
    }

    #[test]
    fn a_doorbell_goes_to_its_user_and_to_peers_only_and_spares_on_request() {
        let mut d = devd("");
        session(&mut d, 2);
        let (own1, _) = d.bells.of(1).unwrap();
        // Same user: given.
        let (r, fds) = d.handle(2, Request::Bell { id: own1 }, vec![]);
        let both = false;
        assert_eq!((r, fds.len()), (Response::Bell { id: own1, both }, 1));
        // Another user with no connection to this one: the same answer as
        // for an id that does not exist.
        let (sock, _peer) = sys::SeqPacket::pair().unwrap();
        let other = if sys::uid() == 0 {
            65534
        } else {
            sys::uid() + 1
        };
        d.add_session(
            7,
            Session {
                sock,
                pid: 1,
                uid: other,
                gid: 0,
            },
        );
        let (r, fds) = d.handle(7, Request::Bell { id: own1 }, vec![]);
        assert!(matches!(r, Response::Error { code, .. } if code == libc::ENOENT as u32));
        assert!(fds.is_empty());
        let (r2, _) = d.handle(7, Request::Bell { id: own1 ^ 0x5555 }, vec![]);
        assert!(matches!(r2, Response::Error { code, .. } if code == libc::ENOENT as u32));
        // Id 0: a new spare of the asker's own.
        let (r, fds) = d.handle(2, Request::Bell { id: 0 }, vec![]);
        let Response::Bell { id, both: true } = r else {
            panic!("{r:?}")
        };
        assert_eq!((fds.len(), d.bells.get(id).map(|(s, _)| s)), (2, Some(2)));
        // A session's doorbells go with it.
        d.end_session(2);
        assert!(d.bells.get(id).is_none());
    }

    /// Adds session `sid` (another process of this user).
    fn session(d: &mut Devd, sid: u64) {
        let (sock, _peer) = sys::SeqPacket::pair().unwrap();
        d.add_session(
            sid,
            Session {
                sock,
                pid: std::process::id() as i32,
                uid: sys::uid(),
                gid: 0,
            },
        );
        // Its Welcome: its doorbells, sent to the peers of its ends.
        let (r, fds) = d.handle(sid, Request::Hello { pid: 1 }, vec![]);
        assert!(matches!(r, Response::Welcome { bell, spare, .. } if bell != 0 && spare != 0));
        assert_eq!(fds.len(), r.fd_count());
        // The process keeps its doorbells' ends (a doorbell whose owner's
        // end is closed has no address to connect a ringer to).
        std::mem::forget(fds);
    }

    /// A connection from session `from` to `l` (listened on by the
    /// acceptor session `by`): its two attachments and their fd counts.
    fn connect_as(
        d: &mut Devd,
        from: u64,
        by: u64,
        l: &TcpListener,
    ) -> ((Attachment, usize), (Attachment, usize), TcpStream) {
        let dst = l.local_addr().unwrap();
        let s = socket();
        let fd = s.as_fd().try_clone_to_owned().unwrap();
        let pref = ModePref::Direct;
        let (r, fds) = d.handle(from, Request::Intent { dst, pref }, vec![fd]);
        let Response::Proceed { attachment: c, .. } = r else {
            panic!("intent: {r:?}");
        };
        s.connect(&dst.into()).unwrap();
        let (a, _) = l.accept().unwrap();
        let fd = a.as_fd().try_clone_to_owned().unwrap();
        let (r, afds) = d.handle(by, Request::Claim, vec![fd]);
        let Response::Expect { attachment: b, .. } = r else {
            panic!("claim: {r:?}");
        };
        ((c, fds.len()), (b, afds.len()), a)
    }

    #[test]
    fn a_hold_ends_the_listeners_pending_intents_and_answers_new_ones_kernel() {
        let mut d = devd("short_lived_ms = 60000\nshort_lived_streak = 1");
        let l = listener(&mut d);
        let dst = l.local_addr().unwrap();
        let s1 = socket();
        let (r_pending, pending) = intent(&mut d, &s1, dst);
        assert!(
            matches!(r_pending, Response::Proceed { .. }),
            "{r_pending:?}"
        );
        // One short connection is a streak here: the hold begins when both
        // its ends are released.
        let ((c, _), (a, _), _s) = connect_as(&mut d, 1, 1, &l);
        release(&mut d, 1, &c, false);
        release(&mut d, 1, &a, false);
        assert_eq!(d.totals.short_lived_periods, 1);
        // The pending intent ended, its connector told with CLAIM = kernel.
        assert!(d.reg.intents.is_empty());
        let (off, kernel) = layout::claim_kernel_bytes();
        let mut word = vec![0u8; kernel.len()];
        sys::pread_exact(pending[0].as_fd(), &mut word, off).unwrap();
        assert_eq!(word, kernel);
        // A connector whose board could not tell is answered Kernel.
        let (r, _) = intent(&mut d, &socket(), dst);
        assert_eq!(
            r,
            Response::Kernel {
                reason: FallbackReason::ShortLived
            }
        );
        assert_eq!(d.totals.fallbacks[&FallbackReason::ShortLived], 2);
        // Nothing stays charged; the ended intent's connection, accepted
        // now, is plain; its connector's Release of it changes nothing.
        assert!(d.reg.usage.is_empty(), "{:?}", d.reg.usage);
        s1.connect(&dst.into()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        assert_eq!(claim(&mut d, &accepted).0, Response::Ok);
        let Response::Proceed { attachment: a1, .. } = r_pending else {
            unreachable!()
        };
        let req = Request::Release {
            conn_id: a1.conn_id,
            side: a1.side,
            park: false,
        };
        assert!(matches!(d.handle(1, req, vec![]).0, Response::Error { .. }));
        assert!(d.reg.usage.is_empty() && d.reg.conns.is_empty());
        // The board says so to every client.
        let fd = d.board.fd().unwrap();
        let map = ssock_rings::shm::Mapping::map(fd.as_fd(), ssock_rings::board::BOARD_SIZE, false)
            .unwrap();
        let found = ssock_rings::board::lookup(&map, dst);
        assert!(
            matches!(found, ssock_rings::board::Found::Served { plain_until } if plain_until > sys::monotonic_ns()),
            "{found:?}"
        );
    }

    fn release(d: &mut Devd, sid: u64, a: &Attachment, park: bool) {
        let req = Request::Release {
            conn_id: a.conn_id,
            side: a.side,
            park,
        };
        assert_eq!(d.handle(sid, req, vec![]).0, Response::Ok);
    }

    /// A connection from session 1 to `l` (session 2's), closed with
    /// both ends asking to keep the region.
    fn keep_one(d: &mut Devd, l: &TcpListener) {
        let ((c, _), (a, _), _s) = connect_as(d, 1, 2, l);
        release(d, 1, &c, true);
        release(d, 2, &a, true);
    }

    #[test]
    fn a_region_both_ends_kept_goes_to_the_next_connection_of_the_same_two_sessions_only() {
        let mut d = devd("");
        session(&mut d, 2);
        session(&mut d, 3);
        let l = listener_of(&mut d, 2);
        // 1 connects to 2's listener: a new region, fds for both ends (the
        // acceptor's with the connector's doorbell).
        let ((c, nc), (a, na), _s1) = connect_as(&mut d, 1, 2, &l);
        assert_eq!((nc, na, c.reuse, a.reuse), (1, 2, false, false));
        assert_eq!(a.peer_bell, d.bells.of(1).unwrap().0);
        let memfd = match &d.reg.conns[&c.conn_id].res {
            Res::Direct(r) => r.memfd.clone(),
            Res::Queued(_) => panic!("queued"),
        };
        // The connection is used: ring words, holders and a mark set.
        let dl = DirectLayout::for_size(d.cfg.region_size).unwrap();
        let used = 12345u64.to_le_bytes();
        sys::pwrite_all(memfd.as_fd(), &used, dl.dir(0).head as u64).unwrap();
        sys::pwrite_all(memfd.as_fd(), &used, dl.dir(1).tail as u64).unwrap();
        sys::pwrite_all(memfd.as_fd(), &[1, 0, 0, 0], layout::hdr::HOLDERS as u64).unwrap();
        release(&mut d, 1, &c, true);
        release(&mut d, 2, &a, true);
        assert!(d.reg.conns.is_empty());
        assert_eq!(d.reg.parked.len(), 1);
        // Kept, its memory stays charged (no end).
        let region = d.cfg.region_size;
        assert_eq!(d.reg.usage.get(&sys::uid()), Some(&(0, region)));
        // Another process connecting to the same listener gets a new one.
        let ((c3, n3), (a3, _), _s3) = connect_as(&mut d, 3, 2, &l);
        assert!(!c3.reuse && n3 == 1 && c3.region != c.region);
        release(&mut d, 3, &c3, false);
        release(&mut d, 2, &a3, true);
        assert_eq!(d.reg.parked.len(), 1, "one end did not keep it");
        // 1 to 2 again: the kept region, no fds, its header reset.
        let ((c2, n2), (a2, m2), _s2) = connect_as(&mut d, 1, 2, &l);
        assert_eq!((n2, m2), (0, 0));
        assert!(c2.reuse && a2.reuse && c2.region == c.region && a2.region == c.region);
        // The acceptor still learns which doorbell rings the connector
        // (its ringers' end it kept from the first connection).
        assert_eq!(a2.peer_bell, a.peer_bell);
        assert_ne!(c2.conn_id, c.conn_id);
        let mut page = vec![0u8; layout::HEADER_SIZE];
        sys::pread_exact(memfd.as_fd(), &mut page, 0).unwrap();
        let word = |off: usize| u64::from_le_bytes(page[off..off + 8].try_into().unwrap());
        assert_eq!(word(layout::hdr::CONN_ID), c2.conn_id);
        assert_eq!(word(dl.dir(0).head), 0);
        assert_eq!(word(dl.dir(1).tail), 0);
        assert_eq!(word(layout::hdr::HOLDERS), 0);
        assert!(d.reg.parked.is_empty());
        assert_eq!(d.totals.reused, 1);
        // Charged as any connection again: two ends, one region.
        assert_eq!(d.reg.usage.get(&sys::uid()), Some(&(2, region)));
    }

    #[test]
    fn a_kept_region_gives_way_to_a_live_connection_at_the_memory_cap() {
        // Room for a connection and a half (a Claim checks for a whole
        // region more than the connector's half).
        let mut d = devd(&format!("max_memory_per_user = {}", 4 << 20));
        assert_eq!(d.cfg.region_size, 2 << 20);
        session(&mut d, 2);
        session(&mut d, 3);
        let l = listener_of(&mut d, 2);
        keep_one(&mut d, &l);
        assert_eq!(d.reg.parked.len(), 1);
        // Session 3's connection needs that memory: the kept one goes.
        let ((c3, n3), _, _s3) = connect_as(&mut d, 3, 2, &l);
        assert!(!c3.reuse && n3 == 1);
        assert!(d.reg.parked.is_empty());
        assert_eq!(d.reg.usage.get(&sys::uid()), Some(&(2, 2 << 20)));
    }

    #[test]
    fn a_region_another_process_attached_to_is_not_kept_and_kept_ones_end_with_their_session() {
        let mut d = devd("");
        session(&mut d, 2);
        session(&mut d, 3);
        let l = listener_of(&mut d, 2);
        // Session 3 takes the acceptor's end over (fd passing): mapped by
        // a third process, the region is never kept.
        let ((c, _), (a, _), s) = connect_as(&mut d, 1, 2, &l);
        let fd = s.as_fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            d.handle(3, Request::Attach, vec![fd]).0,
            Response::Attached(_)
        ));
        release(&mut d, 1, &c, true);
        release(&mut d, 3, &a, true);
        assert!(d.reg.parked.is_empty() && d.reg.conns.is_empty());
        // Kept, then claimed by another session than the one that kept
        // it: kernel TCP (the region is mapped in the keeper).
        keep_one(&mut d, &l);
        let dst = l.local_addr().unwrap();
        let s = socket();
        let fd = s.as_fd().try_clone_to_owned().unwrap();
        let pref = ModePref::Direct;
        let (r, fds) = d.handle(1, Request::Intent { dst, pref }, vec![fd]);
        assert!(matches!(r, Response::Proceed { attachment, .. } if attachment.reuse));
        assert!(fds.is_empty());
        s.connect(&dst.into()).unwrap();
        let (acc, _) = l.accept().unwrap();
        let fd = acc.as_fd().try_clone_to_owned().unwrap();
        let (r, _) = d.handle(3, Request::Claim, vec![fd]);
        assert!(
            matches!(
                r,
                Response::ExpectKernel {
                    reason: FallbackReason::OtherAcceptor,
                    ..
                }
            ),
            "{r:?}"
        );
        assert!(d.reg.conns.is_empty() && d.reg.intents.is_empty());
        // A kept region goes when either session ends.
        keep_one(&mut d, &l);
        assert_eq!(d.reg.parked.len(), 1);
        d.end_session(2);
        assert!(d.reg.parked.is_empty());
    }

    #[test]
    fn an_orphaned_end_goes_once_its_socket_is_closed_everywhere_and_not_before() {
        let mut d = devd("");
        if d.diag.is_none() {
            eprintln!("SKIP: no sock_diag socket here");
            return;
        }
        session(&mut d, 2);
        let l = listener_of(&mut d, 2);
        let dst = l.local_addr().unwrap();
        let s = socket();
        let fd = s.as_fd().try_clone_to_owned().unwrap();
        let pref = ModePref::Direct;
        let (r, _) = d.handle(1, Request::Intent { dst, pref }, vec![fd]);
        assert!(matches!(r, Response::Proceed { .. }), "{r:?}");
        s.connect(&dst.into()).unwrap();
        let (a, _) = l.accept().unwrap();
        let fd = a.as_fd().try_clone_to_owned().unwrap();
        let (r, _) = d.handle(2, Request::Claim, vec![fd]);
        assert!(matches!(r, Response::Expect { .. }), "{r:?}");
        assert_eq!(d.reg.usage.get(&sys::uid()).map(|u| u.0), Some(2));
        // The connector's session ends while its socket lives on (an
        // exec'd image, a process it was passed to): still attachable.
        d.end_session(1);
        assert_eq!(d.reg.orphans.len(), 1);
        look_now(&mut d);
        assert_eq!(d.reg.orphans.len(), 1, "released while its socket is open");
        // Closed everywhere: released at the next look, long before the
        // grace, and its charge with it.
        drop(s);
        look_now(&mut d);
        assert!(d.reg.orphans.is_empty(), "still orphaned after its close");
        assert_eq!(d.reg.usage.get(&sys::uid()).map(|u| u.0), Some(1));
        // The acceptor's side: its peer is gone, its own socket still
        // open (this process): it stays until its own close.
        d.end_session(2);
        assert_eq!(d.reg.orphans.len(), 1);
        drop(a);
        look_now(&mut d);
        assert!(d.reg.orphans.is_empty() && d.reg.conns.is_empty());
        assert!(d.reg.usage.is_empty(), "usage left: {:?}", d.reg.usage);
    }

    /// Makes every orphaned end due for a look-up, and looks.
    fn look_now(d: &mut Devd) {
        for l in d.reg.orphans.values_mut() {
            l.next = Instant::now();
        }
        d.release_orphans();
    }

    #[test]
    fn an_end_left_to_other_holders_lives_until_the_last_one_lets_go() {
        let mut d = devd("");
        if d.diag.is_none() {
            eprintln!("SKIP: no sock_diag socket here");
            return;
        }
        session(&mut d, 2);
        let l = listener_of(&mut d, 2);
        let dst = l.local_addr().unwrap();
        let s = socket();
        let (r, _) = intent(&mut d, &s, dst);
        let Response::Proceed { attachment, .. } = r else {
            panic!("{r:?}")
        };
        s.connect(&dst.into()).unwrap();
        let (a, _) = l.accept().unwrap();
        let fd = a.as_fd().try_clone_to_owned().unwrap();
        let (r, _) = d.handle(2, Request::Claim, vec![fd]);
        assert!(matches!(r, Response::Expect { .. }), "{r:?}");
        // The acceptor forks a child to serve it and closes its copy:
        // Leave. The child (here: a duplicate of the socket) holds it.
        let child = a.try_clone().unwrap();
        drop(a);
        let id = attachment.conn_id;
        let leave = Request::Leave {
            conn_id: id,
            side: Side::Acceptor,
        };
        // Only the session that holds the end may leave it.
        let (r, _) = d.handle(1, leave.clone(), vec![]);
        assert!(matches!(r, Response::Error { .. }), "{r:?}");
        let (r, _) = d.handle(2, leave, vec![]);
        assert!(matches!(r, Response::Ok), "{r:?}");
        for _ in 0..3 {
            look_now(&mut d);
            assert!(
                d.reg.conns.get(&id).is_some_and(|c| !c.ends[1].released),
                "released while a child holds it"
            );
        }
        // The interval grows while it is seen held.
        assert!(d.reg.orphans[&(id, 1)].every > ORPHAN_CHECK);
        // The child exits without closing (the kernel closes it).
        drop(child);
        look_now(&mut d);
        assert!(d.reg.orphans.is_empty(), "still held after the last close");
        assert!(d.reg.conns.get(&id).is_none_or(|c| c.ends[1].released));
        // The same from a session that ends: the connector's end, whose
        // socket lives on, is released at its last close only.
        d.end_session(1);
        look_now(&mut d);
        assert_eq!(d.reg.orphans.len(), 1);
        drop(s);
        look_now(&mut d);
        assert!(d.reg.conns.is_empty() && d.reg.usage.is_empty());
    }

    #[test]
    fn a_listener_stays_registered_while_any_process_holds_it() {
        let mut d = devd("");
        if d.diag.is_none() {
            eprintln!("SKIP: no sock_diag socket here");
            return;
        }
        session(&mut d, 2);
        let l = listener_of(&mut d, 2);
        let dst = l.local_addr().unwrap();
        // The process that listened daemonizes: its child holds the
        // listener (a duplicate here), the parent's session ends.
        let child = l.try_clone().unwrap();
        d.end_session(2);
        let s = socket();
        let (r, _) = intent(&mut d, &s, dst);
        assert!(matches!(r, Response::Proceed { .. }), "{r:?}");
        // The child closes it too (Unlisten from a new session, then the
        // close): gone at the next Intent to its address.
        session(&mut d, 3);
        let fd = child.as_fd().try_clone_to_owned().unwrap();
        let (r, _) = d.handle(3, Request::Unlisten, vec![fd]);
        assert!(matches!(r, Response::Ok), "{r:?}");
        assert_eq!(d.reg.listeners.len(), 1, "dropped while still open");
        drop((l, child));
        let s2 = socket();
        let (r, _) = intent(&mut d, &s2, dst);
        assert!(
            matches!(r, Response::Kernel { .. }),
            "a closed listener still matched: {r:?}"
        );
        assert!(d.reg.listeners.is_empty());
    }

    #[test]
    fn sessions_over_the_per_user_cap_are_refused_and_counted() {
        let mut d = devd("max_sessions_per_user = 2");
        // Session 1 is open (this user's first).
        assert!(d.admit(sys::uid()));
        session(&mut d, 2);
        assert!(!d.admit(sys::uid()));
        assert!(d.admit(sys::uid() + 1), "another user is not held to it");
        assert_eq!(d.totals.sessions_refused, 1);
        d.end_session(2);
        assert!(d.admit(sys::uid()));
    }

    #[test]
    fn kept_regions_are_bounded_per_pair_of_sessions() {
        let mut d = devd("");
        session(&mut d, 2);
        let l = listener_of(&mut d, 2);
        let live: Vec<_> = (0..registry::PARKED_PER_PAIR + 2)
            .map(|_| connect_as(&mut d, 1, 2, &l))
            .collect();
        for ((c, _), (a, _), _) in &live {
            release(&mut d, 1, c, true);
            release(&mut d, 2, a, true);
        }
        assert_eq!(d.reg.parked.len(), registry::PARKED_PER_PAIR);
        // The newest are kept.
        let last = &live[live.len() - 1].0 .0;
        assert!(d.reg.parked.iter().any(|p| p.res.region == last.region));
    }
}
