//! A process's control session with devd: one SOCK_SEQPACKET connection,
//! request/response, shared by all threads of the process.

use ssock_rings::board::BOARD_SIZE;
use ssock_rings::codec::FallbackReason;
use ssock_rings::codec::{DecodeError, Mode, Request, Response, MAX_FDS, MAX_FRAME};
use ssock_rings::shm::Mapping;
use ssock_rings::sys::SeqPacket;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

static GLOBAL: Mutex<Option<Arc<Session>>> = Mutex::new(None);
/// How many times the process-wide session was replaced after it broke
/// ([`Session::replaced`]).
static REPLACED: AtomicU64 = AtomicU64::new(0);
/// A broken process-wide session was dropped and no new one made since
/// (the next one made counts in `REPLACED`, however many tries it takes).
static BROKE: AtomicBool = AtomicBool::new(false);
/// When (`monotonic_coarse_ns`) the process-wide session may be tried
/// again after no devd answered, and how long the next failure waits:
/// [`RETRY_FIRST`], doubled at each failure up to [`RETRY_MAX`]. Without
/// it a program with no devd (or `ssock-run --devd none`) would try every
/// devd socket at every connect, three system calls each. Both under
/// `GLOBAL`'s lock.
static RETRY_AT: AtomicU64 = AtomicU64::new(0);
static RETRY_WAIT: AtomicU64 = AtomicU64::new(0);
/// The wait after a first failure: a devd started again (a restart takes
/// tens of milliseconds) is found soon.
const RETRY_FIRST: Duration = Duration::from_millis(10);
/// The longest wait between two tries.
const RETRY_MAX: Duration = Duration::from_secs(1);
use std::time::Duration;

/// Why talking to devd failed. Every variant means "this connection stays
/// on kernel TCP" (see [`SessionError::falls_back`]).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No devd listens at the path.
    #[error("cannot reach devd at {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The control socket failed mid-request.
    #[error("control socket i/o failed")]
    Io(#[source] io::Error),
    /// devd closed the session.
    #[error("devd closed the control session")]
    Closed,
    /// devd's reply was malformed.
    #[error("devd sent a malformed reply")]
    Decode(#[source] DecodeError),
    /// devd refused the request.
    #[error("devd refused the request (code {code}): {message}")]
    Refused {
        /// errno-like code.
        code: u32,
        /// devd's sentence.
        message: String,
    },
    /// devd answered with a reply that does not fit the request.
    #[error("devd answered {0} to a request that cannot take it")]
    Unexpected(&'static str),
}

impl SessionError {
    /// Whether the failure leaves the connection on kernel TCP (true) or
    /// must be reported to the application (false). Today every session
    /// failure is a fallback: the application never depends on devd.
    pub fn falls_back(&self) -> bool {
        match self {
            SessionError::Connect { .. }
            | SessionError::Io(_)
            | SessionError::Closed
            | SessionError::Decode(_)
            | SessionError::Refused { .. }
            | SessionError::Unexpected(_) => true,
        }
    }
}

/// A control session.
#[derive(Debug)]
pub struct Session {
    sock: Mutex<Chan>,
    /// Set once a request failed mid-way: the channel may be out of step
    /// (a late reply would answer the next request), so it is not used again.
    broken: AtomicBool,
    /// The socket's fd number (stable for the session's life; read without the lock).
    fd: std::os::fd::RawFd,
    /// Spin budget devd's config suggests.
    pub spin: Duration,
    /// devd's default mode.
    pub default_mode: Mode,
    path: PathBuf,
    /// devd's listener board (`ssock_rings::board`), mapped read-only;
    /// None if devd gave none or it failed its checks.
    board: Option<Mapping>,
    /// Connections left on kernel TCP by the board, not yet reported,
    /// and when (CLOCK_MONOTONIC ns) the last report went (0: none yet).
    /// Atomics, not a lock: a fork may come at any moment.
    skips: AtomicU32,
    skips_sent: AtomicU64,
}

/// A batch of skipped connections goes to devd once it holds this many ...
const SKIPS_BATCH: u32 = 1 << 16;
/// ... or at the next one this long after the last report (and what is
/// left when the process exits: `flush_skipped`). Each report wakes devd,
/// on a machine whose CPUs such a program keeps busy: a statistic waits.
const SKIPS_EVERY: Duration = Duration::from_secs(1);

/// The control channel: the socket and a reply buffer kept between requests.
#[derive(Debug)]
struct Chan {
    sock: SeqPacket,
    buf: Vec<u8>,
}

impl Session {
    /// Connects to devd at `path` and says Hello. The doorbells of its
    /// Welcome become this process's only if it has none yet.
    pub fn connect(path: &Path) -> Result<Arc<Session>, SessionError> {
        Session::connect_as(path, false)
    }

    /// `connect`; `process_wide`: the process-wide session, whose doorbells
    /// become this process's (`crate::bells::welcome`).
    fn connect_as(path: &Path, process_wide: bool) -> Result<Arc<Session>, SessionError> {
        let sock = SeqPacket::connect(path)
            .map_err(|source| SessionError::Connect {
                path: path.into(),
                source,
            })?
            .into_high();
        sock.set_recv_timeout(Some(Duration::from_secs(10)))
            .map_err(SessionError::Io)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        let s = Session {
            fd,
            sock: Mutex::new(Chan {
                sock,
                buf: vec![0u8; MAX_FRAME],
            }),
            broken: AtomicBool::new(false),
            spin: ssock_rings::notify::DEFAULT_SPIN,
            default_mode: Mode::Direct,
            path: path.into(),
            board: None,
            skips: AtomicU32::new(0),
            skips_sent: AtomicU64::new(0),
        };
        match s.request(
            &Request::Hello {
                pid: std::process::id(),
            },
            &[],
        )? {
            (
                Response::Welcome {
                    spin_us,
                    default_mode,
                    board,
                    bell,
                    spare,
                },
                fds,
            ) => {
                let mut fds = fds.into_iter();
                let board = if board { fds.next() } else { None };
                let mut pipe = |id: u32| match (id, fds.next(), fds.next()) {
                    (0, ..) => None,
                    (id, Some(r), Some(w)) => Some((id, r, w)),
                    _ => None,
                };
                let (own, spare) = (pipe(bell), pipe(spare));
                crate::bells::welcome(own, spare, process_wide);
                Ok(Arc::new(Session {
                    spin: Duration::from_micros(u64::from(spin_us)),
                    default_mode,
                    board: board.and_then(|fd| map_board(fd.as_fd())),
                    ..s
                }))
            }
            _ => Err(SessionError::Unexpected("a non-Welcome")),
        }
    }

    /// The process-wide session to the default devd (see
    /// `ssock_rings::paths::client_sockets`), connected on first use and
    /// again after it broke (devd restarted); None if no devd answers.
    /// After a try that found none, the next waits (10 ms, doubling up to
    /// 1 s; a success starts over).
    pub fn global() -> Option<Arc<Session>> {
        Self::global_with(false)
    }

    /// [`Session::global`], tried even while the wait after a failed try
    /// lasts: for a call whose miss would last (a listener registered only
    /// when it listens).
    pub fn global_now() -> Option<Arc<Session>> {
        Self::global_with(true)
    }

    /// [`Session::global`], or None at once while another thread holds
    /// the process-wide session's lock (in a forked child, a thread of the
    /// parent may have held it at the fork: it is never released here).
    pub fn global_unless_busy() -> Option<Arc<Session>> {
        let g = match GLOBAL.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Self::global_in(g, false)
    }

    fn global_with(now: bool) -> Option<Arc<Session>> {
        Self::global_in(GLOBAL.lock().unwrap_or_else(|p| p.into_inner()), now)
    }

    fn global_in(
        mut g: std::sync::MutexGuard<'_, Option<Arc<Session>>>,
        now: bool,
    ) -> Option<Arc<Session>> {
        if g.as_ref().is_some_and(|s| s.is_broken()) {
            *g = None;
            // Relaxed: these are read and written under `GLOBAL`'s lock.
            BROKE.store(true, Ordering::Relaxed);
        }
        if g.is_none() {
            if !now && ssock_rings::sys::monotonic_coarse_ns() < RETRY_AT.load(Ordering::Relaxed) {
                return None;
            }
            *g = ssock_rings::paths::client_sockets()
                .iter()
                .find_map(|p| Session::connect_as(p, true).ok());
            let wait = if g.is_some() {
                0
            } else {
                let last = RETRY_WAIT.load(Ordering::Relaxed);
                (last * 2).clamp(nanos(RETRY_FIRST), nanos(RETRY_MAX))
            };
            // From the try's end: one that waited for an answer (a devd
            // stopped) is not tried again at once.
            let end = ssock_rings::sys::monotonic_coarse_ns();
            RETRY_WAIT.store(wait, Ordering::Relaxed);
            RETRY_AT.store(end.saturating_add(wait), Ordering::Relaxed);
            if g.is_some() && BROKE.swap(false, Ordering::Relaxed) {
                REPLACED.fetch_add(1, Ordering::Relaxed);
            }
        }
        g.clone()
    }

    /// How many times the process-wide session was replaced by a new one
    /// after it broke (its devd died and one was started again): what was
    /// registered with the old one (listeners) is to be registered anew.
    /// Not counted: a forked child's first session.
    pub fn replaced() -> u64 {
        REPLACED.load(Ordering::Relaxed)
    }

    /// The process-wide session if there is one that works; never connects.
    pub fn existing() -> Option<Arc<Session>> {
        let g = GLOBAL.try_lock().ok()?;
        g.as_ref().filter(|s| !s.is_broken()).cloned()
    }

    /// In a child after fork: the inherited control socket is the parent's
    /// (a request from here could read the parent's reply), so this process
    /// stops using it; the next `global()` connects anew (once the wait
    /// after the parent's last failed try is over, if it was: the child
    /// inherits it, so that the children of a server with no devd do not
    /// each try). Uses try_lock: a lock held by a parent thread at fork
    /// time is never released here.
    pub fn after_fork_in_child() {
        if let Ok(mut g) = GLOBAL.try_lock() {
            if let Some(s) = g.take() {
                s.broken.store(true, Ordering::Relaxed);
            }
        }
        // (A child's first session replaces nothing of its own.)
        BROKE.store(false, Ordering::Relaxed);
    }

    /// A request failed mid-way (no reply within the timeout, a send or
    /// receive error, an undecodable reply): the session is broken, and its
    /// socket shut down both ways, so that devd ends it at once whoever
    /// else still holds it (a kept connection's `Arc`): a request devd had
    /// not answered yet (an Intent, a Claim) then finds its session ended,
    /// the intent buried, and both ends stay on kernel TCP, rather than
    /// devd pairing a connection this process has given up on.
    fn fail(&self, chan: &Chan) {
        self.broken.store(true, Ordering::Relaxed);
        let _ = socket2::SockRef::from(&chan.sock).shutdown(std::net::Shutdown::Both);
    }

    /// Whether a request failed mid-way (the session is no longer used).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// The control socket's fd, for waits that must notice devd hanging
    /// up (poll it with events 0). Valid as long as the session lives.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd
    }

    /// devd's listener board, if it gave one.
    pub fn board(&self) -> Option<&Mapping> {
        self.board.as_ref()
    }

    /// Counts a connection this process left on kernel TCP because the
    /// board said its listener's connections stay there (`short_lived`):
    /// devd hears of them in batches (posted, no reply), at the next one
    /// after `SKIPS_EVERY` or once `SKIPS_BATCH` wait, and the last one
    /// when the process exits (`flush_skipped`; not a process killed, or
    /// one that connects no more and lives on).
    pub fn skipped(&self) {
        let waiting = self.skips.fetch_add(1, Ordering::Relaxed) + 1;
        // The coarse clock: a batch's second does not need the exact time.
        let now = ssock_rings::sys::monotonic_coarse_ns();
        let last = self.skips_sent.load(Ordering::Relaxed);
        let every = u64::try_from(SKIPS_EVERY.as_nanos()).unwrap_or(u64::MAX);
        if waiting < SKIPS_BATCH && last != 0 && now.saturating_sub(last) < every {
            return;
        }
        self.skips_sent.store(now, Ordering::Relaxed);
        self.report_skips(true);
    }

    /// Posts what `skipped` counted and did not report yet (`wait`: see
    /// `post_with`).
    fn report_skips(&self, wait: bool) {
        let count = self.skips.swap(0, Ordering::Relaxed);
        if count > 0 {
            let req = Request::Skipped {
                reason: FallbackReason::ShortLived,
                count,
            };
            let _ = self.post_with(&req, wait);
        }
    }

    /// Reports what `skipped` counted and did not report yet, on the
    /// process-wide session if one is at hand (never waits for a lock or
    /// connects): for a process that exits.
    pub fn flush_skipped() {
        if let Some(s) = Session::existing() {
            s.report_skips(false);
        }
    }

    /// Socket path this session uses.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a request with its fds and waits for the reply. A `Response::Error`
    /// becomes `SessionError::Refused`.
    pub fn request(
        &self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Response, Vec<OwnedFd>), SessionError> {
        self.begin(req, fds)?.finish()
    }

    /// Sends a request and returns without waiting for its reply, which
    /// [`InFlight::finish`] reads: the caller works meanwhile (a connector
    /// connects while devd handles its Intent). The session is this
    /// caller's until then; other threads' requests wait.
    pub fn begin(
        &self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<InFlight<'_>, SessionError> {
        if self.is_broken() {
            return Err(SessionError::Closed);
        }
        let chan = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        chan.sock.send(&req.encode(), fds).map_err(|e| {
            Session::fail(self, &chan);
            SessionError::Io(e)
        })?;
        Ok(InFlight {
            session: self,
            chan,
            done: false,
        })
    }

    /// Sends a request devd does not answer (Release, Leave, see
    /// [`Request::expects_reply`]): nothing waits, on the path that closes
    /// a connection. Also on a session this process stopped using (a
    /// child's inherited one, see [`Session::after_fork_in_child`]): a
    /// message with no reply cannot take a reply meant for another process,
    /// and a child that closes the last copy of an end it inherited
    /// releases it on the session that holds it in devd. The lock is only
    /// tried then (a parent thread may have held it at the fork).
    pub fn post(&self, req: &Request) -> Result<(), SessionError> {
        self.post_with(req, true)
    }

    /// `post`; `wait`: for the session's lock if another thread holds it,
    /// and for room in the socket (else the request is not sent).
    fn post_with(&self, req: &Request, wait: bool) -> Result<(), SessionError> {
        debug_assert!(!req.expects_reply());
        let chan = if self.is_broken() || !wait {
            match self.sock.try_lock() {
                Ok(c) => c,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Err(SessionError::Closed),
            }
        } else {
            self.sock.lock().unwrap_or_else(|p| p.into_inner())
        };
        let sent = if wait {
            chan.sock.send(&req.encode(), &[])
        } else {
            chan.sock.send_now(&req.encode())
        };
        sent.map_err(|e| {
            self.broken.store(true, Ordering::Relaxed);
            SessionError::Io(e)
        })
    }
}

/// `d` in nanoseconds, as the monotonic clock counts.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Maps the board devd sent with Welcome, read-only, once it is checked
/// to be sealed so (nobody can write it but devd) and large enough.
fn map_board(fd: BorrowedFd<'_>) -> Option<Mapping> {
    let checked = ssock_rings::sys::check_read_only(fd, BOARD_SIZE)
        .and_then(|()| Mapping::map(fd, BOARD_SIZE, false));
    checked
        .map_err(|e| {
            log::warn!("devd's listener board is not usable ({e}): every connection asks devd")
        })
        .ok()
}

/// A request sent on a session whose reply is still to be read. Dropped
/// unfinished, it reads and drops the reply, so that the next request
/// reads its own.
#[derive(Debug)]
pub struct InFlight<'a> {
    session: &'a Session,
    chan: std::sync::MutexGuard<'a, Chan>,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done && !self.session.is_broken() {
            let chan = &mut *self.chan;
            if chan.sock.recv(&mut chan.buf, MAX_FDS).is_err() {
                self.session.fail(chan);
            }
        }
    }
}

impl InFlight<'_> {
    /// Waits for the reply. A `Response::Error` becomes
    /// `SessionError::Refused`.
    pub fn finish(mut self) -> Result<(Response, Vec<OwnedFd>), SessionError> {
        self.done = true;
        let session = self.session;
        let chan = &mut *self.chan;
        let got = match chan.sock.recv(&mut chan.buf, MAX_FDS) {
            Ok((0, _)) => Err(SessionError::Closed),
            Ok((n, got)) => Response::decode(&chan.buf[..n], got.len())
                .map(|r| (r, got))
                .map_err(SessionError::Decode),
            Err(e) => Err(SessionError::Io(e)),
        };
        let (resp, got) = got.inspect_err(|_| session.fail(chan))?;
        match resp {
            Response::Error { code, message } => Err(SessionError::Refused { code, message }),
            r => Ok((r, got)),
        }
    }
}
