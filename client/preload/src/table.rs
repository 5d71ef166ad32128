//! Which fds are accelerated sockets and which are registered listeners.
//! First version: a read-mostly lock around a vector indexed by fd (part 3
//! replaces it with a lock-free table).

use crate::sock::Sock;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

type Entry = Arc<Mutex<Sock>>;

static ANY: AtomicBool = AtomicBool::new(false);
static SOCKS: RwLock<Vec<Option<Entry>>> = RwLock::new(Vec::new());
static LISTENERS: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

fn slot(fd: i32) -> Option<usize> {
    usize::try_from(fd).ok()
}

/// The accelerated socket behind `fd`, if any.
pub fn get(fd: i32) -> Option<Entry> {
    // Relaxed: a stale false only means "not accelerated yet", which is
    // what any call racing with the fd's own connect/accept sees anyway.
    if !ANY.load(Ordering::Relaxed) {
        return None;
    }
    let t = SOCKS.read().unwrap_or_else(|p| p.into_inner());
    t.get(slot(fd)?).cloned().flatten()
}

/// Records `fd` as an accelerated socket.
pub fn insert(fd: i32, s: Sock) {
    let Some(i) = slot(fd) else { return };
    let mut t = SOCKS.write().unwrap_or_else(|p| p.into_inner());
    if t.len() <= i {
        t.resize(i + 1, None);
    }
    t[i] = Some(Arc::new(Mutex::new(s)));
    ANY.store(true, Ordering::Relaxed);
}

/// `new` is a duplicate of `old` (dup, dup2, dup3, F_DUPFD): both name the
/// same socket, which lets go when the last of its fds closes.
pub fn duplicate(old: i32, new: i32) {
    if let Some(e) = get(old) {
        let Some(i) = slot(new) else { return };
        let mut t = SOCKS.write().unwrap_or_else(|p| p.into_inner());
        if t.len() <= i {
            t.resize(i + 1, None);
        }
        t[i] = Some(e);
    }
}

/// Forgets `fd`'s socket `s` (its negotiation ended on kernel TCP), if the
/// fd still names it.
pub fn forget_kernel(fd: i32, s: &Entry) {
    let mut t = SOCKS.write().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = t.get_mut(slot(fd).unwrap_or(usize::MAX)) {
        if e.as_ref().is_some_and(|e| Arc::ptr_eq(e, s)) {
            *e = None;
        }
    }
}

/// Forgets `fd` (it is being closed); returns its socket.
pub fn remove(fd: i32) -> Option<Entry> {
    if !ANY.load(Ordering::Relaxed) {
        return None;
    }
    let mut t = SOCKS.write().unwrap_or_else(|p| p.into_inner());
    t.get_mut(slot(fd)?).and_then(Option::take)
}

/// Just before fork, in the parent: every accelerated socket gets one more
/// holder (the child-to-be), so neither process's close ends the other's
/// stream. It must happen before fork returns anywhere: done in the child,
/// it would race with the parent closing its copy right away. try-locks
/// only: a socket another thread is using at that instant is skipped. (If
/// fork fails, the extra hold stays: the last close then leaves the end to
/// the peer's liveness check, which reports a reset instead of EOF.)
pub fn before_fork() {
    let Ok(t) = SOCKS.try_read() else { return };
    for s in t.iter().flatten() {
        if let Ok(mut s) = s.try_lock() {
            s.fork_hold();
        }
    }
}

/// The accelerated sockets whose fds survive exec (no FD_CLOEXEC): a
/// spawned program inherits them.
pub fn inheritable() -> Vec<Entry> {
    if !ANY.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let t = SOCKS.read().unwrap_or_else(|p| p.into_inner());
    t.iter()
        .enumerate()
        .filter_map(|(fd, e)| Some((i32::try_from(fd).ok()?, e.as_ref()?)))
        .filter(|(fd, _)| {
            // SAFETY: F_GETFD on a number only reads its flags.
            let fl = unsafe { libc::fcntl(*fd, libc::F_GETFD) };
            fl >= 0 && fl & libc::FD_CLOEXEC == 0
        })
        .map(|(_, e)| e.clone())
        .collect()
}

/// Records `fd` as a listener registered with devd.
pub fn add_listener(fd: i32) {
    let mut l = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
    l.get_or_insert_with(HashSet::new).insert(fd);
}

/// Whether `fd` is a registered listener.
pub fn is_listener(fd: i32) -> bool {
    let l = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
    l.as_ref().is_some_and(|s| s.contains(&fd))
}

/// Forgets a listener; true if it was one.
pub fn remove_listener(fd: i32) -> bool {
    let mut l = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
    l.as_mut().is_some_and(|s| s.remove(&fd))
}
