//! Which fds are accelerated sockets and which are registered listeners.
//! The fd table is lock-free: chunks of 4096 slots, allocated once and
//! never freed, each slot an `ArcSwapOption` (a lookup is the fd's
//! `ACCEL` flag, which every filled slot has, then a few atomic loads and
//! one reference count, no lock; arc-swap keeps a slot's old socket alive
//! while a concurrent lookup still uses it), with a count of
//! the sockets in each group of 64 slots (a scan of the table, at every
//! fork, skips the empty groups). Around fork: every socket held and
//! locked, then released in both processes.
//!
//! Never here: a call on a socket's transport beyond its fork holds, or a
//! lock held past the call that took it (except across a fork).

use crate::fdstate::{ACCEL, LISTENING};
use crate::sock::{Entry, Sock};
use arc_swap::ArcSwapOption;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

const CHUNK: usize = 4096;
/// 256 chunks of 4096: fds up to 1,048,575 (the usual hard limit).
const CHUNKS: usize = 256;
/// Slots per occupancy count: a scan (every fork) looks only into groups
/// whose count is not 0.
const GROUP: usize = 64;

static ANY: AtomicBool = AtomicBool::new(false);
type Slot = ArcSwapOption<Mutex<Sock>>;

/// One chunk of slots, with how many slots of each group hold a socket.
/// A count goes up before the swap that may fill a slot (and back down if
/// the slot was full already), and down after the swap that emptied one
/// (each swap sees exactly which it did): it may run ahead of the slots
/// while an insertion or a removal is under way, never behind, so a scan
/// misses no socket that is not changing meanwhile.
struct Chunk {
    slots: Box<[Slot]>,
    used: Box<[AtomicIsize]>,
}

static SOCKS: [OnceLock<Chunk>; CHUNKS] = [const { OnceLock::new() }; CHUNKS];
/// Registered listeners by fd, with the address each is bound to.
type Listeners = Option<HashMap<i32, SocketAddr>>;

/// Their fds are also flagged (`LISTENING`), so that the look-up of any
/// other fd (every accept and close asks) takes no lock.
static LISTENERS: Mutex<Listeners> = Mutex::new(None);

/// The slot of `fd` and its group's count, allocating its chunk if
/// `create`.
fn slot(fd: i32, create: bool) -> Option<(&'static Slot, &'static AtomicIsize)> {
    let i = usize::try_from(fd).ok()?;
    let chunk = SOCKS.get(i / CHUNK)?;
    let c = if create {
        chunk.get_or_init(|| Chunk {
            slots: (0..CHUNK).map(|_| ArcSwapOption::empty()).collect(),
            used: (0..CHUNK / GROUP).map(|_| AtomicIsize::new(0)).collect(),
        })
    } else {
        chunk.get()?
    };
    Some((c.slots.get(i % CHUNK)?, c.used.get(i % CHUNK / GROUP)?))
}

/// Puts `e` in `fd`'s `slot`, counted first (given back if the slot was
/// full), then flagged (`ACCEL`, after: see `unflag`).
fn fill(fd: i32, slot: (&Slot, &AtomicIsize), e: Entry) {
    slot.1.fetch_add(1, Ordering::Relaxed);
    if slot.0.swap(Some(e)).is_some() {
        slot.1.fetch_sub(1, Ordering::Relaxed);
    }
    ACCEL.insert(fd);
}

/// `fd`'s slot was just emptied: its `ACCEL` flag goes, and comes back if
/// the slot is full again meanwhile. A fill that raced with this flags
/// after it filled; if that flag came before this clearing, this look
/// (after the clearing, both sequentially consistent) sees the fill. So a
/// full slot always has its flag, and an fd without it has no socket.
fn unflag(fd: i32, slot: &Slot) {
    ACCEL.remove(fd);
    if slot.load().is_some() {
        ACCEL.insert(fd);
    }
}

/// Every slot in use, with its fd (only the groups whose count says so).
fn all() -> impl Iterator<Item = (i32, Entry)> {
    SOCKS
        .iter()
        .enumerate()
        .filter_map(|(k, c)| Some((k, c.get()?)))
        .flat_map(|(k, c)| {
            c.used
                .iter()
                .enumerate()
                .filter(|(_, n)| n.load(Ordering::Relaxed) > 0)
                .flat_map(move |(g, _)| {
                    let slots = c.slots.get(g * GROUP..(g + 1) * GROUP).unwrap_or(&[]);
                    slots.iter().enumerate().filter_map(move |(j, s)| {
                        let fd = i32::try_from(k * CHUNK + g * GROUP + j).ok()?;
                        Some((fd, s.load_full()?))
                    })
                })
        })
}

/// The accelerated socket behind `fd`, if any.
pub fn get(fd: i32) -> Option<Entry> {
    // An fd without the flag has no socket (the common case: most fds
    // were never accelerated); one load.
    if !ACCEL.contains(fd) {
        return None;
    }
    slot(fd, false)?.0.load_full()
}

/// Taken (shared) by every insertion and (exclusive) across a fork, so that
/// no socket enters the table between the prepare handler's holds and the
/// fork (it would reach the child without a hold).
static FORK_GATE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Whether this process has had an accelerated socket.
pub fn any() -> bool {
    ANY.load(Ordering::Relaxed)
}

/// Records `fd` as an accelerated socket.
pub fn insert(fd: i32, s: Sock) {
    let _gate = FORK_GATE.read().unwrap_or_else(|p| p.into_inner());
    if let Some(slot) = slot(fd, true) {
        fill(fd, slot, Arc::new(Mutex::new(s)));
        ANY.store(true, Ordering::Relaxed);
    }
}

/// `new` is a duplicate of `old` (dup, dup2, dup3, F_DUPFD): both name the
/// same socket, which lets go when the last of its fds closes.
pub fn duplicate(old: i32, new: i32) {
    let _gate = FORK_GATE.read().unwrap_or_else(|p| p.into_inner());
    if let (Some(e), Some(slot)) = (get(old), slot(new, true)) {
        fill(new, slot, e);
    }
}

/// Forgets `fd`'s socket `s` (its negotiation ended on kernel TCP), if the
/// fd still names it.
pub fn forget_kernel(fd: i32, s: &Entry) {
    if let Some((slot, used)) = slot(fd, false) {
        let was = slot.rcu(|cur| match cur {
            Some(e) if Arc::ptr_eq(e, s) => None,
            other => other.clone(),
        });
        if was.is_some_and(|e| Arc::ptr_eq(&e, s)) {
            used.fetch_sub(1, Ordering::Relaxed);
            unflag(fd, slot);
        }
    }
}

/// Forgets `fd` (it is being closed, or its number was just made again);
/// returns its socket.
pub fn remove(fd: i32) -> Option<Entry> {
    // Most fds were never accelerated: one flag costs less than a swap.
    if !ACCEL.contains(fd) {
        return None;
    }
    let (slot, used) = slot(fd, false)?;
    let was = slot.swap(None);
    if was.is_some() {
        used.fetch_sub(1, Ordering::Relaxed);
    }
    unflag(fd, slot);
    was
}

thread_local! {
    /// The sockets locked across a fork (in the forking thread), with the
    /// references that keep their mutexes alive until unlocked.
    static FORK_HELD: RefCell<(Vec<MutexGuard<'static, Sock>>, Vec<Entry>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Just before fork, in the parent: every accelerated socket gets one more
/// holder (the child-to-be), so neither process's close ends the other's
/// stream. It must happen before fork returns anywhere: done in the child,
/// it would race with the parent closing its copy right away. Each socket
/// is locked (a lock is only ever held for a non-blocking step) and stays
/// locked across the fork, so that the child inherits no lock held by a
/// thread that does not exist there (so are the listener set and, first,
/// the epoll sets: `epoll::before_fork`); `after_fork` unlocks, in both
/// processes. (If fork fails, the extra hold stays: the stream then ends
/// through the kernel socket's FIN, still an end of stream.)
pub fn before_fork() {
    let gate = FORK_GATE.write().unwrap_or_else(|p| p.into_inner());
    let _ = GATE_HELD.try_with(|h| *h.borrow_mut() = Some(gate));
    lock_listeners_for_fork();
    if !ANY.load(Ordering::Relaxed) {
        return;
    }
    let mut seen: Vec<*const Mutex<Sock>> = Vec::new();
    FORK_HELD.with(|h| {
        let mut h = h.borrow_mut();
        for (_, e) in all() {
            let p = Arc::as_ptr(&e);
            if seen.contains(&p) {
                continue; // a duplicate fd of a socket already held
            }
            seen.push(p);
            // SAFETY: the mutex lives inside `e`, which is kept in the
            // same thread-local until after its guard is dropped
            // (`after_fork` drops the guards first).
            let m: &'static Mutex<Sock> = unsafe { &*p };
            let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
            g.fork_hold();
            h.0.push(g);
            h.1.push(e);
        }
    });
}

/// After fork, in the parent and in the child: unlocks what `before_fork`
/// locked.
#[must_use = "the references are dropped once every lock is released"]
pub fn after_fork(child: bool) -> Vec<Entry> {
    // try_with: a fork from a thread being torn down holds nothing.
    let mut keep = Vec::new();
    let _ = FORK_HELD.try_with(|h| {
        let mut h = h.borrow_mut();
        h.0.clear();
        let held = std::mem::take(&mut h.1);
        if !child {
            keep = held;
        } else {
            // A socket another thread closed meanwhile may be held only
            // here: dropping it in the child would close it for the
            // parent too (end of stream, a Release on the parent's
            // session). The child never had it: let go of nothing. The
            // others are in the child's table: dropping this reference
            // leaves the child's close of its copy its usual effect
            // (forgetting them too kept every socket alive in the child,
            // so its close never gave back the hold taken for it).
            let live: HashSet<*const Mutex<Sock>> = if ANY.load(Ordering::Relaxed) {
                all().map(|(_, e)| Arc::as_ptr(&e)).collect()
            } else {
                HashSet::new()
            };
            for e in held {
                if live.contains(&Arc::as_ptr(&e)) {
                    keep.push(e);
                } else {
                    std::mem::forget(e);
                }
            }
        }
    });
    let _ = LISTENERS_HELD.try_with(|h| h.borrow_mut().take());
    let _ = GATE_HELD.try_with(|h| h.borrow_mut().take());
    // Returned, not dropped here: in the parent one may be the last
    // reference (another thread closed the socket during the fork), whose
    // drop closes fds, and the shim's close takes locks still held here.
    keep
}

thread_local! {
    static GATE_HELD: RefCell<Option<std::sync::RwLockWriteGuard<'static, ()>>> =
        const { RefCell::new(None) };
    static LISTENERS_HELD: RefCell<Option<MutexGuard<'static, Listeners>>> =
        const { RefCell::new(None) };
}

/// Part of `before_fork` (taken after epoll's locks, before the sockets'):
/// the listener set, so the child does not inherit it locked.
fn lock_listeners_for_fork() {
    let g = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
    let _ = LISTENERS_HELD.try_with(|h| *h.borrow_mut() = Some(g));
}

/// The accelerated sockets whose fds close at exec (FD_CLOEXEC): their
/// holds go with this image.
pub fn closing_at_exec() -> Vec<Entry> {
    if !ANY.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let mut seen: Vec<*const Mutex<Sock>> = Vec::new();
    let mut out = Vec::new();
    // One hold per socket, and only if none of its fds survives exec (each
    // fd's flags are read once).
    let all: Vec<(bool, Entry)> = all().map(|(fd, e)| (survives_exec(fd), e)).collect();
    for (_, e) in &all {
        let p = Arc::as_ptr(e);
        if seen.contains(&p) {
            continue;
        }
        seen.push(p);
        if !all.iter().any(|(s, x)| *s && Arc::ptr_eq(x, e)) {
            out.push(e.clone());
        }
    }
    out
}

/// Whether `fd` stays open across exec (no FD_CLOEXEC).
fn survives_exec(fd: i32) -> bool {
    // SAFETY: F_GETFD on a number only reads its flags.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    fl >= 0 && fl & libc::FD_CLOEXEC == 0
}

/// The accelerated sockets whose fds survive exec (no FD_CLOEXEC): a
/// spawned program inherits them.
pub fn inheritable() -> Vec<Entry> {
    if !ANY.load(Ordering::Relaxed) {
        return Vec::new();
    }
    // One entry per socket, however many of its fds survive (a hold is
    // per process and socket, as fork's and exec's are).
    let mut held: Vec<Entry> = Vec::new();
    for (_, e) in all().filter(|(fd, _)| survives_exec(*fd)) {
        if !held.iter().any(|h| std::sync::Arc::ptr_eq(h, &e)) {
            held.push(e);
        }
    }
    held
}

/// The accelerated sockets whose fds survive exec, each once with one of
/// its fds that does.
pub fn surviving_exec() -> Vec<(i32, Entry)> {
    if !ANY.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let mut out: Vec<(i32, Entry)> = Vec::new();
    for (fd, e) in all().filter(|(fd, _)| survives_exec(*fd)) {
        if !out.iter().any(|(_, h)| std::sync::Arc::ptr_eq(h, &e)) {
            out.push((fd, e));
        }
    }
    out
}

/// The fds of accelerated sockets.
pub fn fds() -> Vec<i32> {
    all().map(|(fd, _)| fd).collect()
}

/// The fds of registered listeners.
pub fn listeners() -> Vec<i32> {
    let l = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
    l.iter().flat_map(|m| m.keys()).copied().collect()
}

/// Records `fd` as a listener registered with devd, bound to `at`.
pub fn add_listener(fd: i32, at: SocketAddr) {
    let mut l = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
    l.get_or_insert_with(HashMap::new).insert(fd, at);
    LISTENING.insert(fd);
}

/// The address `fd` is bound to if it is a registered listener.
pub fn listener(fd: i32) -> Option<SocketAddr> {
    if !LISTENING.contains(fd) {
        return None;
    }
    let l = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
    l.as_ref().and_then(|s| s.get(&fd).copied())
}

/// Forgets a listener; true if it was one.
pub fn remove_listener(fd: i32) -> bool {
    if !LISTENING.contains(fd) {
        return false;
    }
    let mut l = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
    LISTENING.remove(fd);
    l.as_mut().is_some_and(|s| s.remove(&fd).is_some())
}
