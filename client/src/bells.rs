//! This process's doorbells (docs/protocol.md section 3.2). A Direct end
//! sleeps on its thread's doorbell and names it by id in its ring's wait
//! word; a peer rings whatever doorbell the word names. So a connection
//! costs the application no descriptor beside its socket: doorbells are
//! per thread that sleeps (kept for the next thread when it ends), plus
//! the ringers' ends of the peer processes' doorbells it rang.
//!
//! A doorbell is a datagram socket at an abstract address: this process
//! holds it, and everybody who rings it (this process too) a socket of
//! its own connected to it, so a peer can wake a thread here but never
//! take a wake-up away nor change where another's rings go, and ringing
//! one whose owner is gone fails quietly. A thread's doorbell is its own: it empties it after its sleep
//! without taking anybody's wake-up. New threads and forked children take
//! doorbells from a pool (Welcome gives a spare; more are asked for before
//! the next Intent or Claim, or when a thread needs one and the pool is
//! empty).
//!
//! The Welcome's first doorbell is the process's **common** one: devd
//! hands it to the peers with their attachments, and every sleeping thread
//! polls it beside its own. A peer that cannot get a thread's doorbell (a
//! forked child without a session of its own asks nobody) rings the
//! common one instead; the thread that empties it wakes every other
//! sleeping thread through its own doorbell, so the one it was meant for
//! looks again. A thread that cannot get a doorbell of its own sleeps on
//! the common one alone: its sleeps are cut at 20 ms (a wake-up another
//! thread took costs that much); every sleep is cut at 1 s anyway, the
//! net under a doorbell that could not be rung.
//!
//! Never here: a connection to devd of its own (a doorbell is asked for
//! only on a session the process already has: a forked child, maybe
//! sandboxed, asks nothing), or a sleep.

use crate::session::{Session, SessionError};
use ssock_rings::codec::{Request, Response};
use ssock_rings::stream::Doorbells;
use ssock_rings::sys;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Peer doorbells kept (the oldest learnt is closed first).
const KNOWN_MAX: usize = 256;
/// Doorbells devd would not give, remembered (the oldest forgotten first).
const REFUSED_MAX: usize = 64;
/// A doorbell devd would not give is not asked for again this soon.
const REFUSED_FOR: Duration = Duration::from_secs(1);
/// An end asks devd for at most `FETCH_BURST` doorbells in this long: the
/// ids come from the peer, who could name a new one before every ring (the
/// peer's common doorbell serves meanwhile). A burst, not one: a peer end
/// taken over by a new process, which forks, names a new doorbell each
/// time (sshd: its re-exec, its preauth child, then its own new one), and
/// the common doorbell known is the first process's.
const FETCH_EVERY: Duration = Duration::from_secs(1);
const FETCH_BURST: usize = 4;
/// The longest Direct sleep: the net under a wake-up that could not be
/// rung (a doorbell devd would not or could not give).
const CAP: Duration = Duration::from_secs(1);
/// The longest Direct sleep of a thread sharing a doorbell.
const CAP_SHARED: Duration = Duration::from_millis(20);

/// One doorbell of this process: both ends.
#[derive(Debug, Clone)]
struct Bell {
    id: u32,
    own: Arc<OwnedFd>,
    ring: Arc<OwnedFd>,
}

#[derive(Debug, Default)]
struct Book {
    /// The process's common doorbell (the Welcome's first). Never closed
    /// (sleeps refer to it without counting; one replaced by a new
    /// session's stays open).
    first: Option<&'static Bell>,
    /// Doorbells for new threads and forked children.
    pool: Vec<Bell>,
    /// Doorbells threads of this process hold, by thread key.
    held: HashMap<u64, Bell>,
    /// Ringers' ends of every doorbell this process may ring, by id (its
    /// own ones included).
    known: HashMap<u32, Arc<OwnedFd>>,
    /// Peers' ones, in the order learnt (the oldest closed first).
    order: VecDeque<u32>,
    refused: VecDeque<(u32, Instant)>,
    /// The pool ran dry: ask for a doorbell at the next Intent or Claim.
    need: bool,
}

static BOOK: Mutex<Option<Book>> = Mutex::new(None);
/// Threads with a doorbell of their own: its ringers' end (a lock of its
/// own, taken when a thread takes or gives back its doorbell).
static SLEEPING: Mutex<Option<Threads>> = Mutex::new(None);

/// Threads with a doorbell of their own, by key: its ringers' end, and
/// how many sleeps the thread has under way (a drain of the common
/// doorbell rings only threads inside a sleep: one outside looks at its
/// ends itself before it sleeps again).
type Threads = HashMap<u64, (Arc<OwnedFd>, Arc<AtomicU32>)>;

/// The calling thread's count of sleeps under way (always 1 for a thread
/// whose storage is gone: it is rung).
fn asleep() -> Arc<AtomicU32> {
    ASLEEP
        .try_with(Arc::clone)
        .unwrap_or_else(|_| Arc::new(AtomicU32::new(1)))
}
/// The common doorbell's fd (-1: none), for `doorbell_fds`.
static COMMON_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
/// Counts the process-wide sessions' Welcomes that replaced the common
/// doorbell and the pool: a thread that took its doorbell before polls
/// the new common one from its next sleep (its peers ring that one when
/// devd will not give them the thread's own).
static FIRST_GEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn sleeping() -> MutexGuard<'static, Option<Threads>> {
    SLEEPING.lock().unwrap_or_else(|p| p.into_inner())
}
static NEXT_THREAD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// This thread's doorbell; given back to the pool when the thread ends.
#[derive(Debug)]
struct Mine {
    bell: Bell,
    /// The common doorbell, polled beside `bell` (None when shared).
    common: Option<&'static Bell>,
    /// `sys::child_of` when taken: another value means a fork since.
    gen: u64,
    /// The process's first doorbell, shared (not this thread's own).
    shared: bool,
    key: u64,
    /// `FIRST_GEN` when taken.
    first_gen: u64,
}

impl Drop for Mine {
    fn drop(&mut self) {
        if self.shared || self.gen != sys::child_of() {
            return;
        }
        // The thread ends: its doorbell, emptied, serves the next one.
        sys::drain_bell(self.bell.own.as_fd());
        let bell = self.bell.clone();
        let key = self.key;
        if let Some(s) = sleeping().as_mut() {
            s.remove(&key);
        }
        with(|b| {
            b.held.remove(&key);
            b.pool.push(bell);
        });
    }
}

thread_local! {
    static MINE: RefCell<Option<Mine>> = const { RefCell::new(None) };
    /// The book, locked by `before_fork` until `after_fork`.
    static FORK_GUARD: RefCell<Option<MutexGuard<'static, Option<Book>>>> =
        const { RefCell::new(None) };
    /// The registry of threads, the same way.
    static FORK_GUARD_SLEEPING: RefCell<Option<MutexGuard<'static, Option<Threads>>>> =
        const { RefCell::new(None) };
    static KEY: u64 = NEXT_THREAD.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    static ASLEEP: Arc<AtomicU32> = Arc::new(AtomicU32::new(0));
}

fn lock() -> MutexGuard<'static, Option<Book>> {
    BOOK.lock().unwrap_or_else(|p| p.into_inner())
}

fn with<R>(f: impl FnOnce(&mut Book) -> R) -> R {
    f(lock().get_or_insert_with(Book::default))
}

impl Book {
    fn remember(&mut self, id: u32, ring: Arc<OwnedFd>, peer: bool) {
        if self.known.insert(id, ring).is_some() || !peer {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > KNOWN_MAX {
            if let Some(old) = self.order.pop_front() {
                self.known.remove(&old);
            }
        }
    }

    fn refused_lately(&self, id: u32) -> bool {
        self.refused
            .iter()
            .any(|(r, t)| *r == id && t.elapsed() < REFUSED_FOR)
    }

    fn add_own(&mut self, b: &Bell) {
        self.remember(b.id, b.ring.clone(), false);
    }

    /// One of this process's doorbells leaves it (or was never its own
    /// thread's here): its ringers' end is closed with it.
    fn drop_own(&mut self, b: &Bell) {
        if self
            .known
            .get(&b.id)
            .is_some_and(|r| Arc::ptr_eq(r, &b.ring))
        {
            self.known.remove(&b.id);
        }
    }
}

/// A doorbell from devd: (id, owner's end, ringers' end), its fds moved out
/// of the low numbers a program may `dup2` onto.
fn bell(id: u32, own: OwnedFd, ring: OwnedFd) -> Bell {
    Bell {
        id,
        own: Arc::new(sys::move_high(own)),
        ring: Arc::new(sys::move_high(ring)),
    }
}

/// The doorbells a Welcome gave, each (id, owner's end, ringers' end).
/// `replace`: the process-wide session connected (again): they become the
/// process's first and pool even if it has doorbells; else they are used
/// only if it has none (another session of the same process: they are
/// closed again).
pub fn welcome(
    own: Option<(u32, OwnedFd, OwnedFd)>,
    spare: Option<(u32, OwnedFd, OwnedFd)>,
    replace: bool,
) {
    with(|b| {
        if b.first.is_some() && !replace {
            return;
        }
        let Some((id, o, r)) = own else { return };
        let first = bell(id, o, r);
        let spare = spare.map(|(id, o, r)| bell(id, o, r));
        b.add_own(&first);
        for old in std::mem::take(&mut b.pool) {
            b.drop_own(&old);
        }
        if let Some(s) = &spare {
            b.add_own(s);
            b.pool.push(s.clone());
        }
        COMMON_FD.store(first.own.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
        b.first = Some(Box::leak(Box::new(first)));
        b.need = spare.is_none();
        FIRST_GEN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
}

/// A peer's doorbell (ringers' end) that came with an attachment (kept
/// unless known).
pub fn learn(id: u32, ring: OwnedFd) {
    if id != 0 {
        with(|b| {
            if !b.known.contains_key(&id) {
                b.remember(id, Arc::new(sys::move_high(ring)), true);
            }
        });
    }
}

/// Whether this process has a doorbell to sleep on.
pub fn usable() -> bool {
    with(|b| b.first.is_some())
}

/// Asks devd for a doorbell for the pool on `session`.
fn more(session: &Session) -> Option<Bell> {
    match session.request(&Request::Bell { id: 0 }, &[]) {
        Ok((Response::Bell { id, both: true }, fds)) if id != 0 && fds.len() == 2 => {
            let mut fds = fds.into_iter();
            let (o, r) = (fds.next()?, fds.next()?);
            let b = bell(id, o, r);
            with(|k| k.add_own(&b));
            Some(b)
        }
        other => {
            log::debug!("no doorbell from devd: {other:?}");
            None
        }
    }
}

/// Fills the pool (one doorbell) if it ran dry, on `session`.
pub fn refill(session: &Session) {
    if with(|b| b.first.is_some() && std::mem::take(&mut b.need)) {
        if let Some(b) = more(session) {
            with(|k| k.pool.push(b));
        }
    }
}

/// This thread's doorbell: its own (taken from the pool, or asked of devd
/// on `session` when the pool is empty), else the process's first, shared.
fn mine(session: Option<&Session>) -> Option<(Bell, Option<&'static Bell>)> {
    let gen = sys::child_of();
    let first_gen = FIRST_GEN.load(std::sync::atomic::Ordering::SeqCst);
    // The process-wide session was replaced since this thread took its
    // doorbell: the thread polls the new common doorbell from now on (the
    // new session's peers ring it when devd will not give them the
    // thread's own, which an earlier session owns). Nothing is asked of
    // devd for it: the thread may be in a sandbox by now (sshd's preauth
    // child).
    let _ = MINE.try_with(|m| {
        let mut m = m.borrow_mut();
        let Some(cur) = m
            .as_mut()
            .filter(|m| m.gen == gen && m.first_gen != first_gen)
        else {
            return;
        };
        cur.first_gen = first_gen;
        let first = with(|b| b.first);
        if cur.shared {
            // The new common doorbell, shared (the pool's next one is
            // taken below if there is one).
            if let Some(f) = first {
                cur.bell = f.clone();
            }
            return;
        }
        cur.common = first.filter(|f| f.id != cur.bell.id);
    });
    let have = match MINE.try_with(|m| {
        m.borrow()
            .as_ref()
            .filter(|m| m.gen == gen)
            .map(|m| ((m.bell.clone(), m.common), m.shared))
    }) {
        Ok(h) => h,
        // The thread's storage is going away: the common doorbell, shared,
        // and nothing taken from the pool for it.
        Err(_) => return with(|b| b.first.cloned()).map(|f| (f, None)),
    };
    // A thread sharing the common doorbell takes one of its own as soon
    // as the pool has one.
    match have {
        Some((h, false)) => return Some(h),
        Some((h, true)) if with(|b| b.pool.is_empty()) => return Some(h),
        _ => {}
    }
    let key = KEY.try_with(|k| *k).unwrap_or(0);
    let taken = with(|b| {
        let t = b.pool.pop();
        if b.pool.is_empty() {
            b.need = true;
        }
        t
    });
    let taken = taken.or_else(|| more(session?));
    let (bell, shared) = match taken {
        Some(t) => (t, false),
        None => (with(|b| b.first.cloned())?, true),
    };
    let common = if shared {
        None
    } else {
        with(|b| {
            b.held.insert(key, bell.clone());
            b.first
        })
    };
    if !shared {
        // Registered for the thread's life, before any wait word names its
        // doorbell: a drain of the common one wakes this thread.
        sleeping()
            .get_or_insert_with(HashMap::new)
            .insert(key, (bell.ring.clone(), asleep()));
    }
    let m = Mine {
        bell: bell.clone(),
        common,
        gen,
        shared,
        key,
        first_gen,
    };
    let _ = MINE.try_with(|c| *c.borrow_mut() = Some(m));
    Some((bell, common))
}

/// The calling thread's own doorbell's id, taken from the pool if it has
/// none yet, else asked of devd on `session` (once per thread: 0 if none
/// is to be had, as for a thread that shares the common one). Its Intent
/// names it: the acceptor is given it, and its rings wake this thread even
/// where it cannot ask devd for doorbells (a forked server's child)
/// instead of every thread through the common one.
pub fn own_id(session: &Session) -> u32 {
    match mine(Some(session)) {
        Some((bell, Some(_))) => bell.id,
        _ => 0,
    }
}

/// The key of a parked sleep (no thread's: `Sleep::on_this_thread` is
/// false for it).
const PARK_KEY: u64 = u64::MAX;

/// A doorbell of an epoll set's own, which its parked ends name (taken
/// from the pool, or asked of devd on `session`); given back, emptied,
/// when dropped. Registered among the threads', so that a drain of the
/// common doorbell rings it too.
#[derive(Debug)]
pub struct ParkBell {
    bell: Bell,
    gen: u64,
    /// How many rings its queue takes (`sys::probe_queue`, when taken).
    limit: usize,
}

/// A doorbell for an epoll set's parked ends.
pub fn park_bell(session: Option<&Session>) -> Option<ParkBell> {
    let taken = with(|b| {
        let t = b.pool.pop();
        if b.pool.is_empty() {
            b.need = true;
        }
        t
    });
    let bell = taken.or_else(|| more(session?))?;
    // Before any drain of the common doorbell may ring it.
    let limit = sys::probe_queue(bell.own.as_fd(), bell.ring.as_fd());
    sleeping().get_or_insert_with(HashMap::new).insert(
        PARK_KEY - u64::from(bell.id),
        (bell.ring.clone(), Arc::new(AtomicU32::new(1))),
    );
    Some(ParkBell {
        bell,
        gen: sys::child_of(),
        limit,
    })
}

impl ParkBell {
    /// A sleep on it that lasts until its end is unparked.
    pub fn sleep(&self) -> Sleep {
        Sleep {
            bell: self.bell.clone(),
            common: None,
            gen: self.gen,
            key: PARK_KEY,
            asleep: Arc::new(AtomicU32::new(1)),
        }
    }

    /// Its id, as the wait words name it.
    pub fn id(&self) -> u32 {
        self.bell.id
    }

    /// The owner's end, to poll.
    pub fn fd(&self) -> RawFd {
        self.bell.own.as_raw_fd()
    }

    /// Empties it: whether it was rung, and whether every ring named its
    /// connection (then `tokens` has their ids, as the ringers said them:
    /// see `sys::drain_tokens`).
    pub fn drain_named(&self, tokens: &mut Vec<u64>) -> sys::Drained {
        sys::drain_tokens(self.bell.own.as_fd(), tokens, self.limit)
    }

    /// Whether it was taken in this process (not inherited across fork).
    pub fn here(&self) -> bool {
        self.gen == sys::child_of()
    }
}

impl Drop for ParkBell {
    fn drop(&mut self) {
        if !self.here() {
            return;
        }
        // Out of the sleepers first: a drain of the common doorbell after
        // this rings it no more, and the drain below empties it for its
        // next owner.
        if let Some(s) = sleeping().as_mut() {
            s.remove(&(PARK_KEY - u64::from(self.bell.id)));
        }
        sys::drain_bell(self.bell.own.as_fd());
        let bell = self.bell.clone();
        with(|b| b.pool.push(bell));
    }
}

/// A sleep under way on this thread's doorbell (and the common one); the
/// thread's last one ends by emptying them.
#[derive(Debug)]
pub struct Sleep {
    bell: Bell,
    /// The common doorbell, unless `bell` is it.
    common: Option<&'static Bell>,
    gen: u64,
    key: u64,
    /// The thread's count of sleeps under way, one of them this.
    asleep: Arc<AtomicU32>,
}

/// Starts a sleep of the calling thread (`session`: where to ask for a
/// doorbell if it needs one). None only if this process has no doorbell.
pub fn enter(session: Option<&Session>) -> Option<Sleep> {
    let (bell, common) = mine(session)?;
    let key = KEY.try_with(|k| *k).unwrap_or(0);
    // Counted before any wait word names the doorbell: a drain of the
    // common one from now on rings this thread.
    let asleep = asleep();
    asleep.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Some(Sleep {
        bell,
        common,
        gen: sys::child_of(),
        key,
        asleep,
    })
}

impl Drop for Sleep {
    fn drop(&mut self) {
        self.asleep
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Sleep {
    /// The doorbell's id, for the wait words.
    pub fn id(&self) -> u32 {
        self.bell.id
    }

    /// The fds to poll (POLLIN): the thread's doorbell, and the common one.
    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        std::iter::once(self.bell.own.as_raw_fd())
            .chain(self.common.as_ref().map(|c| c.own.as_raw_fd()))
    }

    /// Whether this is a parked end's sleep (`ParkBell::sleep`).
    pub fn parked(&self) -> bool {
        self.key == PARK_KEY
    }

    /// Whether the calling thread started this sleep.
    pub fn on_this_thread(&self) -> bool {
        self.key == KEY.try_with(|k| *k).unwrap_or(0) && self.gen == sys::child_of()
    }

    /// Rings this sleep's doorbell (another thread of this process wakes
    /// it).
    pub fn ring(&self) {
        let _ = sys::ring_bell(self.bell.ring.as_fd());
    }
}

/// After every poll of a set that holds a `Sleep`'s fds (every one: a
/// doorbell left full would wake each later poll at once): takes one ring
/// off this thread's doorbell if the poll found it rung, and empties the
/// common one if it did (rung for a thread a peer could not name: every
/// other thread with a doorbell of its own then looks again).
pub fn polled(fds: impl IntoIterator<Item = (RawFd, i16)>) {
    let Ok(Some((own, common, key, shared))) = MINE.try_with(|m| {
        m.borrow()
            .as_ref()
            .filter(|m| m.gen == sys::child_of())
            .map(|m| (m.bell.own.clone(), m.common, m.key, m.shared))
    }) else {
        return;
    };
    let (mut mine, mut theirs) = (false, false);
    for (fd, rev) in fds {
        if rev != 0 {
            mine |= fd == own.as_raw_fd();
            theirs |= common.is_some_and(|c| c.own.as_raw_fd() == fd);
        }
    }
    // A thread sleeping on the common doorbell alone empties it as any
    // other thread empties the common one: the ring may have been meant
    // for a thread with a doorbell of its own.
    let drained = if shared {
        mine && sys::drain_bell(own.as_fd())
    } else {
        if mine {
            // One ring, one read (a ring more wakes the next poll at once,
            // which takes it).
            sys::take_ring(own.as_fd());
        }
        common
            .filter(|_| theirs)
            .is_some_and(|c| sys::drain_bell(c.own.as_fd()))
    };
    if drained {
        if let Some(others) = sleeping().as_ref() {
            for (k, (w, n)) in others {
                if *k != key && n.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                    let _ = sys::ring_bell(w.as_fd());
                }
            }
        }
    }
}

/// The fds of the doorbells the calling thread sleeps on (its own and the
/// common one; -1 for none), for caps on the sleeps that poll them.
pub fn doorbell_fds() -> [RawFd; 2] {
    let common = COMMON_FD.load(std::sync::atomic::Ordering::Relaxed);
    let own = MINE
        .try_with(|m| m.borrow().as_ref().map(|m| m.bell.own.as_raw_fd()))
        .ok()
        .flatten()
        .unwrap_or(-1);
    [own, common]
}

/// Whether the process's common doorbell is rung now (one zero-timeout
/// poll; nothing taken off it).
pub fn common_rung() -> bool {
    let fd = COMMON_FD.load(std::sync::atomic::Ordering::Relaxed);
    if fd < 0 {
        return false;
    }
    let mut p = [sys::PollFd::new(fd, libc::POLLIN)];
    matches!(sys::poll(&mut p, Some(std::time::Duration::ZERO)), Ok(n) if n > 0)
}

/// The longest a Direct sleep of the calling thread may last before
/// looking again.
pub fn cap() -> Duration {
    let shared = MINE
        .try_with(|m| m.borrow().as_ref().is_none_or(|m| m.shared))
        .unwrap_or(true);
    if shared {
        CAP_SHARED
    } else {
        CAP
    }
}

/// Before fork (the shim's prepare handler): the book is locked until the
/// parent and child handlers (`after_fork`) are done with it.
pub fn before_fork() {
    let g = lock();
    let _ = FORK_GUARD.try_with(|f| *f.borrow_mut() = Some(g));
    let s = sleeping();
    let _ = FORK_GUARD_SLEEPING.try_with(|f| *f.borrow_mut() = Some(s));
}

/// After fork, in the forking thread. Both take the pool's last doorbell
/// out: the child makes it the thread's own (no system call, no request:
/// the child may be sandboxed already) and closes its copies of the other
/// threads' doorbells; the parent closes its copy. Closes fds: call it
/// where closes go to libc.
pub fn after_fork(child: bool) {
    let mut threads = FORK_GUARD_SLEEPING
        .try_with(|f| f.borrow_mut().take())
        .ok()
        .flatten()
        .or_else(|| SLEEPING.try_lock().ok());
    let held = FORK_GUARD
        .try_with(|f| f.borrow_mut().take())
        .ok()
        .flatten();
    let Some(mut g) = held.or_else(|| BOOK.try_lock().ok()) else {
        return;
    };
    let Some(b) = g.as_mut() else { return };
    let taken = b.pool.pop();
    if b.pool.is_empty() {
        b.need = true;
    }
    if !child {
        // The child's now: its ringers' end goes with it.
        if let Some(t) = &taken {
            b.drop_own(t);
        }
        return;
    }
    // The parent's threads are not here: their doorbells are not ours.
    for (_, h) in std::mem::take(&mut b.held) {
        b.drop_own(&h);
    }
    if let Some(t) = threads.as_mut() {
        **t = None;
    }
    let key = KEY.try_with(|k| *k).unwrap_or(0);
    let (bell, shared) = match taken {
        Some(t) => {
            b.held.insert(key, t.clone());
            (t, false)
        }
        None => match b.first.cloned() {
            Some(f) => (f, true),
            None => return,
        },
    };
    let g2_first = b.first;
    drop(g);
    // The parent thread's doorbell, copied here, is closed, not pooled.
    if let Ok(Some(mut old)) = MINE.try_with(|c| c.borrow_mut().take()) {
        old.shared = true;
    }
    let common = if shared { None } else { g2_first };
    if !shared {
        if let Some(t) = threads.as_mut() {
            t.get_or_insert_with(HashMap::new)
                .insert(key, (bell.ring.clone(), asleep()));
        }
    }
    drop(threads);
    let m = Mine {
        bell,
        common,
        gen: sys::child_of(),
        shared,
        key,
        first_gen: FIRST_GEN.load(std::sync::atomic::Ordering::SeqCst),
    };
    let _ = MINE.try_with(|c| *c.borrow_mut() = Some(m));
}

/// Makes sure this process holds doorbell `id` (asked of devd on
/// `session` if not, and not refused lately), so that a later ring needs
/// no request.
pub fn know(id: u32, session: Option<&Session>) {
    if id != 0 && !with(|b| b.known.contains_key(&id) || b.refused_lately(id)) {
        let _ = fetch(id, session);
    }
}

/// The doorbells of this process as a ring end sees them: rings by id,
/// asking devd (on the end's session, else the process-wide one) for one
/// it does not hold, and else the peer's common doorbell.
#[derive(Debug, Default)]
pub struct ProcessBells {
    session: Option<Arc<Session>>,
    /// The peer process's common doorbell, once known (0: not yet).
    common: std::sync::atomic::AtomicU32,
    /// The doorbell rung last, kept here (a peer thread sleeps on the same
    /// one again and again: no look into the book).
    last: Mutex<Option<(u32, Arc<OwnedFd>)>>,
    /// When this end last asked devd for doorbells (at most
    /// `FETCH_BURST`, the oldest first).
    fetched: Mutex<VecDeque<Instant>>,
    /// What each ring says (the connection's id: an epoll set whose
    /// parked ends share a doorbell looks at the one that rang,
    /// `ParkBell::drain_named`); 0: a one-byte ring.
    token: u64,
}

impl ProcessBells {
    /// Rings through `session` (None: the process-wide session); `common`:
    /// the peer's common doorbell if known (0: not yet); `token`: what
    /// each ring says (the connection's id; 0 for none).
    pub fn new(session: Option<Arc<Session>>, common: u32, token: u64) -> ProcessBells {
        ProcessBells {
            session,
            common: common.into(),
            last: Mutex::new(None),
            fetched: Mutex::new(VecDeque::new()),
            token,
        }
    }

    fn ring_fd(&self, w: &OwnedFd) -> bool {
        if self.token == 0 {
            return sys::ring_bell(w.as_fd());
        }
        // A full queue is a rung doorbell; its owner knows from the count
        // that a token may be lost (`sys::drain_tokens`).
        sys::ring_bell_with(w.as_fd(), self.token) != sys::Rang::Failed
    }

    /// Whether this end may ask devd for a doorbell now (counted as asked):
    /// fewer than `FETCH_BURST` asks in the last `FETCH_EVERY`.
    fn may_fetch(&self) -> bool {
        let mut f = self.fetched.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() >= FETCH_BURST {
            if f.front().is_some_and(|t| t.elapsed() < FETCH_EVERY) {
                return false;
            }
            f.pop_front();
        }
        f.push_back(Instant::now());
        true
    }

    /// Rings the peer's common doorbell, which wakes every sleeping thread
    /// of its process (false if it is not known or cannot be rung).
    pub fn ring_common(&self) -> bool {
        let common = self.common.load(std::sync::atomic::Ordering::Relaxed);
        common != 0 && self.ring_known(common).unwrap_or(false)
    }

    /// The peer's common doorbell, learnt later (the acceptor's, written
    /// by devd at the Claim).
    pub fn set_common(&self, id: u32) {
        if id != 0 {
            self.common.store(id, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn ring_known(&self, id: u32) -> Option<bool> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((l, w)) = last.as_ref() {
            if *l == id && self.ring_fd(w) {
                return Some(true);
            }
        }
        let w = with(|b| b.known.get(&id).cloned())?;
        let rung = self.ring_fd(&w);
        *last = Some((id, w));
        // A doorbell that fails: the caller tries devd and the common one.
        rung.then_some(true)
    }
}

impl Doorbells for ProcessBells {
    fn ring(&self, id: u32) -> bool {
        if id == 0 {
            return false;
        }
        if let Some(rung) = self.ring_known(id) {
            return rung;
        }
        if !with(|b| b.refused_lately(id)) && self.may_fetch() {
            if let Some(w) = fetch(id, self.session.as_deref()) {
                return self.ring_fd(&w);
            }
        }
        // Not to be had: the peer's common doorbell wakes all its threads.
        let common = self.common.load(std::sync::atomic::Ordering::Relaxed);
        common != 0 && common != id && self.ring_known(common).unwrap_or(false)
    }
}

/// Asks devd for doorbell `id` on `session`, else on the process's
/// existing one (never a new one).
fn fetch(id: u32, session: Option<&Session>) -> Option<Arc<OwnedFd>> {
    let global;
    let s = match session.filter(|s| !s.is_broken()) {
        Some(s) => s,
        None => {
            // None at hand (a child, or another thread holds it): nothing
            // is remembered, the next ring asks again.
            global = Session::existing()?;
            &global
        }
    };
    let reply = s.request(&Request::Bell { id }, &[]);
    with(|b| match reply {
        Ok((
            Response::Bell {
                id: got,
                both: false,
            },
            fds,
        )) if got == id && fds.len() == 1 => {
            let w = Arc::new(sys::move_high(fds.into_iter().next()?));
            b.remember(id, w.clone(), true);
            Some(w)
        }
        Err(SessionError::Refused { .. }) => {
            if b.refused.len() >= REFUSED_MAX {
                b.refused.pop_front();
            }
            b.refused.push_back((id, Instant::now()));
            None
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(id: u32) -> (u32, OwnedFd, OwnedFd) {
        let (o, name) = sys::doorbell_owner().unwrap();
        (id, o, sys::doorbell_ringer(&name).unwrap())
    }

    fn readable(fd: RawFd) -> bool {
        let mut p = [sys::PollFd::new(fd, libc::POLLIN)];
        sys::poll(&mut p, Some(Duration::ZERO)).unwrap() == 1
    }

    /// An end may ask devd for a few doorbells in a row (a peer end taken
    /// over and forked names a new one each time), never for one per ring.
    #[test]
    fn an_end_asks_devd_for_a_burst_of_doorbells_then_one_a_second() {
        let b = ProcessBells::default();
        for n in 0..FETCH_BURST {
            assert!(b.may_fetch(), "ask {n} of the burst refused");
        }
        assert!(
            !b.may_fetch(),
            "a peer naming new ids could make every ring ask"
        );
        // The oldest ask a second old: one more.
        b.fetched.lock().unwrap()[0] -= FETCH_EVERY;
        assert!(b.may_fetch());
        assert!(!b.may_fetch());
    }

    /// One process's book, driven through its public calls (the book is
    /// process-wide: everything about it is in this one test).
    #[test]
    fn threads_sleep_on_doorbells_of_their_own_and_the_common_one_wakes_them_all() {
        welcome(Some(pair(11)), Some(pair(12)), false);
        welcome(Some(pair(13)), None, false);
        assert!(usable());
        let none = ProcessBells::default();
        assert!(!none.ring(13), "a second session's doorbells are not kept");

        // This thread takes the spare; another thread finds the pool
        // empty and no session to ask: it sleeps on the common one alone.
        let a = enter(None).unwrap();
        let fds: Vec<RawFd> = a.fds().collect();
        assert_eq!((a.id(), fds.len(), cap()), (12, 2, CAP));
        let other = std::thread::spawn(|| (enter(None).unwrap().id(), cap()));
        assert_eq!(other.join().unwrap(), (11, CAP_SHARED));
        // A ring wakes the sleeper it names; what its poll found takes it.
        assert!(none.ring(12));
        let mut set: Vec<sys::PollFd> = fds
            .iter()
            .map(|&fd| sys::PollFd::new(fd, libc::POLLIN))
            .collect();
        assert_eq!(sys::poll(&mut set, Some(Duration::ZERO)).unwrap(), 1);
        assert!(set[0].revents != 0 && set[1].revents == 0);
        polled(set.iter().map(|p| (p.fd, p.revents)));
        drop(a);
        assert!(!readable(fds[0]));

        // A peer's doorbell learnt with an attachment rings; an unknown
        // one falls back to the peer's common doorbell, if known.
        let (_, po, pr) = pair(21);
        learn(21, pr);
        assert!(none.ring(21));
        assert!(sys::drain_bell(po.as_fd()));
        assert!(!none.ring(22));
        assert!(ProcessBells::new(None, 21, 0).ring(22));
        assert!(sys::drain_bell(po.as_fd()));

        // A ring carries the end's token.
        let (_, qo, qr) = pair(23);
        learn(23, qr);
        let tokened = ProcessBells::new(None, 21, 77);
        assert!(tokened.ring(23));
        let mut t = Vec::new();
        sys::drain_tokens(qo.as_fd(), &mut t, 64);
        assert_eq!(t, [77]);

        // The common doorbell rung: the thread that empties it wakes the
        // other sleeping threads through their own.
        let (_, o2, r2) = pair(31);
        let theirs = bell(31, o2, r2);
        let their_fd = theirs.own.as_raw_fd();
        sleeping()
            .get_or_insert_with(HashMap::new)
            .insert(999, (theirs.ring.clone(), Arc::new(AtomicU32::new(1))));
        let a = enter(None).unwrap();
        assert!(ProcessBells::new(None, 11, 0).ring(777));
        let mut set: Vec<sys::PollFd> = a
            .fds()
            .map(|fd| sys::PollFd::new(fd, libc::POLLIN))
            .collect();
        sys::poll(&mut set, Some(Duration::ZERO)).unwrap();
        polled(set.iter().map(|p| (p.fd, p.revents)));
        drop(a);
        assert!(readable(their_fd), "the other sleeper was woken");
        sleeping().get_or_insert_with(HashMap::new).remove(&999);

        // Fork: the child takes the pool's doorbell as its thread's own;
        // with the pool empty, it shares the common one.
        let given = with(|b| b.pool.last().map(|p| p.id));
        before_fork();
        after_fork(true);
        match given {
            Some(id) => assert_eq!((enter(None).unwrap().id(), cap()), (id, CAP)),
            None => assert_eq!(cap(), CAP_SHARED),
        }
        before_fork();
        after_fork(true);
        assert_eq!(cap(), CAP_SHARED, "no doorbell left: shared");
    }
}
