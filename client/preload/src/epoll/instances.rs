//! The process's epoll instances: the table of the shim's sets by epoll
//! fd, their creation, duplication and closing, a member's fd closed or
//! turned accelerated (in every instance that holds it), and the fork
//! handlers that keep the sets consistent across fork.
//!
//! Never here: a wait, or a member's readiness.

use super::*;

static ANY: AtomicBool = AtomicBool::new(false);
static SETS: RwLock<Sets> = RwLock::new(None);

type Sets = Option<FdMap<Arc<Set>>>;

// `SET_FDS` (`fdstate::SET`): the fds of the instances in `SETS`, so that
// a look-up of any other fd (every epoll_ctl asks of its fd) takes no
// lock. `REGISTERED`: fds ever added to an instance the shim tracks, until
// closed, so that a close of any other fd (most of them) looks into no
// instance.

/// The locks held across a fork (see `before_fork`).
type ForkHeld = (
    Option<RwLockWriteGuard<'static, Sets>>,
    Vec<MutexGuard<'static, Inner>>,
    Vec<Arc<Set>>,
);

thread_local! {
    static FORK_HELD: RefCell<ForkHeld> = const { RefCell::new((None, Vec::new(), Vec::new())) };
}

/// In the prepare handler, before the sockets are locked (the order every
/// path takes: sets table, a set, its sockets): the table of sets and
/// every set stay locked across the fork, so the child inherits none of
/// them held by a thread it does not have.
pub fn before_fork() {
    let table = SETS.write().unwrap_or_else(|p| p.into_inner());
    let mut sets: Vec<Arc<Set>> = Vec::new();
    let mut fds: Vec<c_int> = Vec::new();
    for (&epfd, s) in table.as_ref().into_iter().flat_map(|t| t.iter()) {
        if !sets.iter().any(|x| Arc::ptr_eq(x, s)) {
            sets.push(s.clone());
            fds.push(epfd);
        }
    }
    let guards = sets
        .iter()
        .zip(&fds)
        .map(|(s, &epfd)| {
            // SAFETY: the set lives in `sets`, kept in the same thread-local
            // until after its guard is dropped (`after_fork`).
            let m: &'static Mutex<Inner> = unsafe { &*std::ptr::from_ref(&s.inner) };
            let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
            // The child will hold the instance too: no liveness
            // registrations in it from now on (`live`).
            g.live.fork(epfd, s.live_key);
            // Parked members relied on those registrations; the shared
            // instance must not carry the parking doorbell either.
            if g.stop_parking(epfd, s.park_tag) {
                s.ring();
            }
            g
        })
        .collect();
    let _ = FORK_HELD.try_with(|h| *h.borrow_mut() = (Some(table), guards, sets));
}

/// After fork, in both processes: unlocks what `before_fork` locked. In the
/// child the set references are let go of without dropping (dropping the
/// last one could close a socket the parent still uses).
pub fn after_fork(child: bool) {
    let _ = FORK_HELD.try_with(|h| {
        let (table, mut guards, sets) = std::mem::take(&mut *h.borrow_mut());
        if child {
            for g in &mut guards {
                g.live.shared();
            }
        }
        drop(guards);
        if child {
            std::mem::forget(sets);
        } else {
            drop(sets);
        }
        drop(table);
    });
}

/// The shim's state of epoll instance `epfd`, if it knows it.
pub fn get(epfd: c_int) -> Option<Arc<Set>> {
    if !ANY.load(Ordering::Relaxed) || !SET_FDS.contains(epfd) {
        return None;
    }
    let t = SETS.read().unwrap_or_else(|p| p.into_inner());
    t.as_ref()?.get(&epfd).cloned()
}

fn all() -> Vec<(c_int, Arc<Set>)> {
    if !ANY.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let t = SETS.read().unwrap_or_else(|p| p.into_inner());
    t.as_ref()
        .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
        .unwrap_or_default()
}

fn put(epfd: c_int, s: Option<Arc<Set>>) {
    let mut t = SETS.write().unwrap_or_else(|p| p.into_inner());
    let m = t.get_or_insert_with(FdMap::default);
    match s {
        Some(s) => {
            m.insert(epfd, s);
            SET_FDS.insert(epfd);
            ANY.store(true, Ordering::Relaxed);
        }
        None => {
            m.remove(&epfd);
            SET_FDS.remove(epfd);
        }
    }
}

/// The fds from `first` to `last` ever added to an instance the shim
/// tracks and not closed since (a close of one drops it from them).
pub fn registered_within(first: u32, last: u32) -> Vec<c_int> {
    if !ANY.load(Ordering::Relaxed) {
        return Vec::new();
    }
    REGISTERED.within(first, last)
}

/// The fds of the epoll instances the shim tracks.
pub fn instances() -> Vec<c_int> {
    all().into_iter().map(|(fd, _)| fd).collect()
}

/// A new epoll instance `epfd` (epoll_create, epoll_create1).
pub fn created(epfd: c_int) {
    if epfd < 0 {
        return;
    }
    let made = EventFd::new().and_then(|bell| {
        let tag = bell_tag(epfd);
        let mut ev = epoll_event {
            events: EPOLLIN,
            u64: tag,
        };
        let bfd = std::os::fd::AsRawFd::as_raw_fd(&bell);
        // SAFETY: epfd is the instance just created; bfd is the bell, open;
        // ev is a valid event for the call.
        let r = unsafe { (crate::real::get().epoll_ctl)(epfd, libc::EPOLL_CTL_ADD, bfd, &mut ev) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((bell, tag))
    });
    match made {
        Ok((bell, tag)) => put(
            epfd,
            Some(Arc::new(Set {
                inner: Mutex::new(Inner::default()),
                bell,
                tag,
                live_key: bell_tag(epfd),
                sleepers: AtomicU32::new(0),
                rung: AtomicBool::new(false),
                any: AtomicBool::new(false),
                kernel_busy: AtomicBool::new(true),
                park_tag: bell_tag(epfd) ^ 0x9e37_79b9_7f4a_7c15,
                unparked: AtomicBool::new(false),
                park_wanted: AtomicBool::new(false),
                park_held: AtomicBool::new(false),
                parking_off: AtomicBool::new(false),
            })),
        ),
        // Without a bell the instance stays the kernel's alone: its
        // accelerated members would never be seen, so say so.
        Err(e) => log::warn!("epoll instance {epfd} not tracked: {e}"),
    }
}

/// A data word for an instance's bell that no application registration
/// carries by accident (pointers, fd numbers and small counters are what
/// applications put there): a mix of the clock, an address and a counter,
/// without a system call (epoll_create may come inside a sandbox).
fn bell_tag(epfd: c_int) -> u64 {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            u64::from(d.subsec_nanos()) ^ d.as_secs().rotate_left(30)
        });
    let addr = u64::try_from(std::ptr::addr_of!(COUNT) as usize).unwrap_or(0);
    let mut z = nanos
        ^ addr.rotate_left(32)
        ^ u64::from(epfd.unsigned_abs()).rotate_left(17)
        ^ COUNT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    // splitmix64's finalizer.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `new` names the same epoll instance as `old` (dup).
pub fn duplicated(old: c_int, new: c_int) {
    if let Some(s) = get(old) {
        put(new, Some(s));
    } else if get(new).is_some() {
        put(new, None);
    }
}

/// `fd` is being closed: an epoll instance is forgotten, and a member is
/// dropped from every instance (the kernel does that for its own).
pub fn closed(fd: c_int) {
    if !ANY.load(Ordering::Relaxed) {
        return;
    }
    if SET_FDS.contains(fd) {
        put(fd, None);
    }
    if !REGISTERED.take(fd) {
        return;
    }
    for (epfd, s) in all() {
        let mut i = s.lock();
        i.kernel.remove(&fd);
        i.live.drop_fd(epfd, s.live_key, fd);
        if i.remove_fd(fd) {
            i.member_left(epfd, s.park_tag);
            s.any.store(!i.members.is_empty(), Ordering::SeqCst);
            drop(i);
            s.ring();
        }
    }
}

/// `fd` is about to name another file (a dup2 or dup3 onto it): its
/// liveness registrations go while it still names its socket (after, a
/// removal would name the new file, and the old registration would stay
/// while that socket has another holder).
pub fn unwatch(fd: c_int) {
    if !ANY.load(Ordering::Relaxed) || !REGISTERED.contains(fd) {
        return;
    }
    for (epfd, s) in all() {
        s.lock().live.drop_fd(epfd, s.live_key, fd);
    }
}

/// `fd` just became an accelerated socket: registrations the kernel
/// instances hold for it move to the shim.
pub fn became_accelerated(fd: c_int) {
    let Some(sock) = table::get(fd) else { return };
    for (epfd, s) in all() {
        let mut i = s.lock();
        let Some((events, data)) = i.kernel.remove(&fd) else {
            continue;
        };
        let mut ev = epoll_event { events, u64: data };
        // SAFETY: plain epoll_ctl on the application's instance; ev is live.
        unsafe { (crate::real::get().epoll_ctl)(epfd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
        i.add(fd, Obj::Sock(sock.clone()), events, data);
        s.any.store(true, Ordering::SeqCst);
        drop(i);
        s.ring();
    }
}
