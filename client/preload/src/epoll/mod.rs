//! epoll under the shim. The kernel's epoll instance keeps the kernel fds;
//! the shim keeps, per instance, the registrations of accelerated sockets
//! (their readiness lives in the rings, which the kernel cannot see) and
//! of nested shim epoll instances. epoll_wait reports ring readiness with
//! the kernel's rules (level-triggered, EPOLLET, EPOLLONESHOT, EPOLLRDHUP,
//! EPOLLHUP and EPOLLERR always), takes the kernel fds' events from the
//! real epoll_wait, and sleeps in one real poll over the epoll fd itself
//! and the members' doorbells. A control bell (so epoll_ctl from another
//! thread wakes a sleeper) is registered in the kernel instance, under a
//! random data word that the shim takes out of what the kernel reports:
//! the sleep's poll sees it through the epoll fd, and a thread asleep in
//! the kernel's own epoll_wait (no accelerated member yet) wakes when
//! another thread adds one, and goes on through the shim.
//!
//! A socket registered before it turned accelerated (nonblocking connect)
//! moves from the kernel instance to the shim's when it does, and back if
//! its negotiation ends on kernel TCP. An accelerated member's kernel
//! socket (which tells whether its peer is gone) is registered in the
//! kernel instance too, under a data word of the shim's (`live`): a sleep
//! watches them all through the epoll fd, and a wait learns which one had
//! an event from the kernel's answer.
//!
//! Never here: the C arguments of the epoll calls (`epoll_calls`), or a
//! sleep with a set's lock held.

use crate::boundary::borrow;
use crate::fdmap::FdMap;
use crate::fdstate::{REGISTERED, SET as SET_FDS};
use crate::obj::{Armed, Nested, Obj};
use crate::sleep;
use crate::table;
use crate::wait::{liveness_entry, polled_scope};
use libc::{c_int, epoll_event};
use ssock_client::transport::{Polled, Ready};
use ssock_rings::sys::EventFd;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::time::Duration;

mod ctl;
mod live;
mod wait;
pub use ctl::ctl;
pub use wait::{wait, wait_direct};

const EPOLLIN: u32 = libc::EPOLLIN as u32;
const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
const EPOLLRDHUP: u32 = libc::EPOLLRDHUP as u32;
const EPOLLHUP: u32 = libc::EPOLLHUP as u32;
const EPOLLERR: u32 = libc::EPOLLERR as u32;
const EPOLLET: u32 = libc::EPOLLET as u32;
const EPOLLONESHOT: u32 = libc::EPOLLONESHOT as u32;
const EPOLLEXCLUSIVE: u32 = libc::EPOLLEXCLUSIVE as u32;

/// The longest a wait in the kernel's epoll_wait lasts, in a process with
/// accelerated sockets, before it looks whether the shim has members now.
const KERNEL_WAIT_CAP: Duration = Duration::from_secs(1);

/// One registration the shim keeps.
struct Member {
    fd: c_int,
    obj: Obj,
    events: u32,
    data: u64,
    /// Edge-triggered: the progress counters when last reported (None:
    /// report the current state once, as after ADD or MOD).
    seen: Option<[u64; 2]>,
    /// EPOLLONESHOT fired: nothing more until EPOLL_CTL_MOD.
    disabled: bool,
    /// Its kernel socket had an event (`live`): its next look asks it.
    check: bool,
}

impl Member {
    fn read(&self) -> bool {
        self.events & (EPOLLIN | EPOLLRDHUP) != 0
    }
    fn write(&self) -> bool {
        self.events & EPOLLOUT != 0
    }

    /// What this member reports for readiness `r` (0: nothing).
    fn report(&self, r: Ready) -> u32 {
        if self.disabled {
            return 0;
        }
        let mut ev = 0;
        if r.readable {
            ev |= self.events & EPOLLIN;
        }
        if r.writable {
            ev |= self.events & EPOLLOUT;
        }
        if r.rdhup {
            ev |= self.events & EPOLLRDHUP;
        }
        if r.hup {
            ev |= EPOLLHUP;
        }
        if r.err {
            ev |= EPOLLERR;
        }
        if self.events & EPOLLET != 0 && self.seen == Some(r.seq) {
            return 0;
        }
        ev
    }
}

#[derive(Default)]
struct Inner {
    members: Vec<Member>,
    /// What the kernel instance holds (fd -> events, data), kept so a
    /// socket can move between the two when it turns accelerated or plain.
    kernel: FdMap<(u32, u64)>,
    /// Round-robin start, so a busy member cannot starve the others.
    next: usize,
    /// Collections so far: every fourth wait fetches the kernel's events
    /// even when the rings had some, so kernel fds are not starved.
    calls: u32,
    /// `sock::turned_plain()` when members were last checked for sockets
    /// that turned plain (None: a member came in since, check again).
    plain_seen: Option<u64>,
    /// The members' kernel sockets watched through the kernel instance.
    live: live::Live,
    /// Whether the last arming left a member's kernel socket to the
    /// sleep's own poll (a look after that sleep asks them all).
    polled_socks: bool,
}

/// The shim's side of one epoll instance.
pub struct Set {
    inner: Mutex<Inner>,
    /// Rung by epoll_ctl while someone sleeps in this instance; also in
    /// the kernel instance, with event data `tag`.
    bell: EventFd,
    /// The bell's event data in the kernel instance: random, so that no
    /// registration of the application's carries it (one chance in 2^64).
    tag: u64,
    /// The key of the members' liveness registrations (`live`): their
    /// data word is `live_key ^ fd`, random in the same way.
    live_key: u64,
    sleepers: AtomicU32,
    /// Set after each ring, taken by the last sleeper, who then drains the
    /// bell: a wait that nobody rang makes no system call for it.
    rung: AtomicBool,
    /// Whether any member is the shim's (else epoll_wait goes to libc).
    any: AtomicBool,
    /// Whether the kernel instance had events of the application's the
    /// last time a wait asked (`wait::wait`: a wait asks it before its
    /// first sleep only then, or before a spin).
    kernel_busy: AtomicBool,
}

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
        let before = i.members.len();
        i.members.retain(|m| m.fd != fd);
        if i.members.len() != before {
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
        i.plain_seen = None;
        i.members.push(Member {
            fd,
            obj: Obj::Sock(sock.clone()),
            events,
            data,
            seen: None,
            disabled: false,
            check: false,
        });
        s.any.store(true, Ordering::SeqCst);
        drop(i);
        s.ring();
    }
}

impl Set {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes sleepers so they see a changed registration.
    fn ring(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _ = self.bell.notify();
            // After the ring: a last sleeper that took the flag before it
            // was set leaves the bell rung and the flag set, and the next
            // wait, woken by the bell at once, drains it.
            self.rung.store(true, Ordering::SeqCst);
        }
    }

    /// Whether the shim has members here (else the kernel does it all).
    pub fn has_members(&self) -> bool {
        self.any.load(Ordering::SeqCst)
    }

    /// Takes the bell's events and the members' liveness events (`live`)
    /// out of the `n` events the kernel instance `epfd` reported in `out`
    /// (keeping the others' order): how many are left, whether the bell
    /// was among them, and whether a member's kernel socket was (its next
    /// look asks it; the wait goes on, as for the bell).
    fn strip_bell(&self, out: &mut [epoll_event], n: usize) -> (usize, bool, bool) {
        let n = n.min(out.len());
        let mut kept = 0;
        let mut rung = false;
        let mut flagged = false;
        // Locked at the first word of the liveness key's form.
        let mut inner: Option<MutexGuard<'_, Inner>> = None;
        for k in 0..n {
            let ev = out[k];
            if ev.u64 == self.tag {
                rung = true;
                continue;
            }
            if let Some(fd) = live::named(self.live_key, ev.u64) {
                let i = inner.get_or_insert_with(|| self.lock());
                if i.live.watched(fd) {
                    for m in i.members.iter_mut().filter(|m| m.fd == fd) {
                        m.check = true;
                    }
                    flagged = true;
                    continue;
                }
                // One that outlived its record (its fd now names another
                // file): taken out too, unless the application registered
                // that very word (the shim keeps its registrations).
                if !i.kernel.values().any(|&(_, data)| data == ev.u64) {
                    flagged = true;
                    continue;
                }
            }
            out[kept] = ev;
            kept += 1;
        }
        (kept, rung, flagged)
    }

    /// Members whose negotiation ended on kernel TCP go back to the kernel
    /// instance `epfd` (and out of the socket table).
    fn return_plain(&self, epfd: c_int, i: &mut Inner) {
        // Only when some socket turned plain (or a member came in) since
        // the last look: otherwise each wait would lock every member twice.
        let now = crate::sock::turned_plain();
        if i.plain_seen == Some(now) {
            return;
        }
        i.plain_seen = Some(now);
        let mut k = 0;
        while k < i.members.len() {
            let m = &i.members[k];
            if !m.obj.is_kernel() {
                k += 1;
                continue;
            }
            let m = i.members.remove(k);
            i.live.drop_fd(epfd, self.live_key, m.fd);
            if let Obj::Sock(s) = &m.obj {
                table::forget_kernel(m.fd, s);
            }
            let mut ev = epoll_event {
                events: m.events,
                u64: m.data,
            };
            // SAFETY: plain epoll_ctl on the application's instance and fd.
            let r =
                unsafe { (crate::real::get().epoll_ctl)(epfd, libc::EPOLL_CTL_ADD, m.fd, &mut ev) };
            if r == 0 {
                i.kernel.insert(m.fd, (m.events, m.data));
            }
        }
        self.any.store(!i.members.is_empty(), Ordering::SeqCst);
    }

    /// Fills `out` from `at` with the shim's members' events (updating
    /// edge and one-shot state), looking at them as `look` says; returns
    /// how many it wrote, and whether this call is one of the every fourth
    /// where the kernel's events are fetched even though the rings had
    /// some: that one leaves the answer's last place to them (members
    /// always ready would otherwise take every place of a wait for one
    /// event, and the kernel fds would never be reported). A look from 0
    /// starts a new answer (`reported`: the members' fds in it); one from
    /// further on adds to it, never a member already in it.
    fn collect(
        &self,
        epfd: c_int,
        out: &mut [epoll_event],
        at: usize,
        look: Look,
        reported: &mut Vec<c_int>,
    ) -> (usize, bool) {
        let mut guard = self.lock();
        self.return_plain(epfd, &mut guard);
        let i = &mut *guard;
        if at == 0 {
            reported.clear();
        }
        let _polled = polled(i, look);
        // Counted (and one place left to the kernel's events every fourth
        // time) only as the start of an answer.
        let counted = at == 0 && look != Look::Flagged;
        let tick = counted && i.calls.wrapping_add(1).is_multiple_of(4);
        let room = if tick && out.len() > at {
            out.len() - 1
        } else {
            out.len()
        };
        let len = i.members.len();
        let mut n = at;
        let start = if len == 0 { 0 } else { i.next % len };
        for k in 0..len {
            if n >= room {
                break;
            }
            let j = (start + k) % len;
            let m = &mut i.members[j];
            if m.disabled {
                continue;
            }
            let ask = match look {
                Look::Rings | Look::Flagged => m.check,
                Look::Peers => true,
                Look::Last => m.check || !i.live.watched(m.fd),
            };
            if look == Look::Flagged && !ask {
                continue;
            }
            // An answer being added to never names a member twice.
            if at > 0 && reported.contains(&m.fd) {
                continue;
            }
            // SAFETY: m.fd is registered in this instance and still open
            // (close() drops it from every instance first).
            let r = m.obj.readiness(unsafe { borrow(m.fd) }, ask);
            m.check = false;
            let ev = m.report(r);
            if ev == 0 {
                continue;
            }
            out[n] = epoll_event {
                events: ev,
                u64: m.data,
            };
            n += 1;
            reported.push(m.fd);
            m.seen = Some(r.seq);
            if m.events & EPOLLONESHOT != 0 {
                m.disabled = true;
                // Nothing to watch until EPOLL_CTL_MOD (its sleeps leave it
                // out, and its socket's events would only wake them).
                i.live.drop_fd(epfd, self.live_key, m.fd);
            }
            i.next = j + 1;
        }
        if counted {
            i.calls = i.calls.wrapping_add(1);
        }
        (n - at, tick)
    }

    /// Whether some member would report something now (no state change).
    fn any_ready(&self, check_peer: bool) -> bool {
        let i = self.lock();
        let _polled = polled(&i, if check_peer { Look::Peers } else { Look::Rings });
        i.members.iter().any(|m| {
            // SAFETY: as in `collect`.
            m.report(
                m.obj
                    .readiness(unsafe { borrow(m.fd) }, check_peer || m.check),
            ) != 0
        })
    }

    /// `disarm`, for a wait that may have found the bell rung (`saw`).
    fn end_sleep(&self, armed: Vec<Armed>, saw: bool) {
        for a in armed {
            a.disarm();
        }
        self.done_sleeping(saw);
    }

    /// One sleeper less; the last one drains the bell if it was rung, or
    /// if its own wait `saw` it (a ring whose flag is not set yet: the
    /// bell must not stay readable under every later wait). Earlier, a
    /// sleeper not yet back from its wait could miss the ring. (A sleeper
    /// that came in just before the drain may lose the ring meant for it:
    /// `wait_direct` looks again within `KERNEL_WAIT_CAP`.)
    fn done_sleeping(&self, saw: bool) {
        if self.sleepers.fetch_sub(1, Ordering::SeqCst) == 1
            && (self.rung.swap(false, Ordering::SeqCst) | saw)
        {
            self.bell.drain();
        }
    }

    /// Whether a sleep watches all a peer check of the members would find
    /// (`Obj::watched_by_sleep`).
    fn watched_by_sleep(&self) -> bool {
        let i = self.lock();
        i.members
            .iter()
            .filter(|m| !m.disabled)
            .all(|m| m.obj.watched_by_sleep())
    }

    /// Whether the last arming left a member's kernel socket to the sleep's
    /// own poll (then a look after the sleep asks every member's).
    fn polled_socks(&self) -> bool {
        self.lock().polled_socks
    }

    /// The spin budget of the first member (the instance's budget), and
    /// the gate its waits ask: a sole member's own, else (None) the
    /// process's.
    fn spin(&self) -> (Duration, Option<Arc<ssock_rings::notify::Gate>>) {
        let i = self.lock();
        let spin = i.members.first().map(|m| m.obj.spin()).unwrap_or_default();
        let gate = match &i.members[..] {
            [m] => m.obj.gate(),
            _ => None,
        };
        (spin, gate)
    }
}

/// How a collection looks at the members.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Look {
    /// Their rings (and the kernel sockets of those flagged by an event
    /// of theirs, `Member::check`).
    Rings,
    /// Every member's kernel socket too: is the peer gone?
    Peers,
    /// Only the flagged members, with their kernel sockets.
    Flagged,
    /// The rings, and the kernel sockets of the flagged members and of
    /// those the kernel instance does not watch (`live`): with the
    /// kernel's events, a look that must see every peer that is gone.
    Last,
}

/// One zero-timeout poll of the kernel sockets of the members that are
/// accelerated sockets and that `look` asks about, standing for the poll
/// each one's readiness would make (`Polled`): one system call, not one
/// per member. None: nothing to ask, or the poll failed (each asks on
/// its own then).
fn polled(i: &Inner, look: Look) -> Option<Polled> {
    let asked = |m: &&Member| match look {
        Look::Peers => true,
        Look::Last => !i.live.watched(m.fd),
        Look::Rings | Look::Flagged => false,
    };
    let mut fds: Vec<libc::pollfd> = i
        .members
        .iter()
        .filter(|m| !m.disabled && matches!(m.obj, Obj::Sock(_)))
        .filter(asked)
        .map(|m| liveness_entry(m.fd, 0))
        .collect();
    if fds.is_empty() || sleep::real_poll(&mut fds, 0) < 0 {
        return None;
    }
    Some(polled_scope(fds.iter()))
}

/// The instance as a member of a wait: in poll, or nested in another
/// instance.
impl Nested for Set {
    /// Readiness of the instance itself (for poll, or a nested epoll):
    /// readable when a wait would report something.
    fn readiness(&self, epfd: c_int, check_peer: bool) -> Ready {
        let mut readable = self.any_ready(check_peer);
        if !readable && check_peer {
            let mut p = [libc::pollfd {
                fd: epfd,
                events: libc::POLLIN,
                revents: 0,
            }];
            readable = sleep::real_poll(&mut p, 0) > 0;
        }
        Ready {
            readable,
            ..Ready::default()
        }
    }

    /// Arms every member for a sleep: the fds to sleep on (the epoll fd
    /// first, which also watches the control bell, the members' kernel
    /// sockets it registered and the application's kernel fds) and what was
    /// armed, for `disarm`. The caller re-checks what would be reported
    /// after arming, before sleeping.
    fn arm(&self, epfd: c_int) -> (Vec<(c_int, i16)>, Vec<Armed>) {
        let mut guard = self.lock();
        let i = &mut *guard;
        let mut fds = vec![(epfd, libc::POLLIN)];
        let mut armed = Vec::with_capacity(i.members.len());
        let mut watched = Vec::new();
        let mut polled_socks = false;
        for m in i.members.iter().filter(|m| !m.disabled) {
            // SAFETY: as in `collect`.
            // None: broken for good; nothing will change there, and what it
            // reports was (or is being) collected.
            let Some((mut f, undo)) = m.obj.arm(unsafe { borrow(m.fd) }, m.read(), m.write())
            else {
                i.live.drop_fd(epfd, self.live_key, m.fd);
                continue;
            };
            if matches!(m.obj, Obj::Sock(_)) {
                // Its kernel socket, if its arming asks for it: watched
                // through the kernel instance, else by the sleep's poll.
                let own = f.iter().filter(|e| e.0 == m.fd).fold(0, |a, e| a | e.1);
                if own == 0 {
                    i.live.drop_fd(epfd, self.live_key, m.fd);
                } else if i.live.want(epfd, self.live_key, m.fd, own) {
                    f.retain(|e| e.0 != m.fd);
                } else {
                    polled_socks = true;
                }
            }
            watched.extend(f);
            armed.push(undo);
        }
        i.polled_socks = polled_socks;
        // Accelerated members share their process's doorbell: once in the
        // set (sorted, not hashed: no hashing per sleep).
        watched.sort_unstable();
        watched.dedup();
        fds.extend(watched);
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        (fds, armed)
    }

    /// Ends a sleep prepared by `arm`: undoes exactly what it armed (the
    /// registrations may have changed meanwhile).
    fn disarm(&self, armed: Vec<Armed>) {
        self.end_sleep(armed, false);
    }

    /// The instances among the members (taken under the lock, which is
    /// released before anyone looks into them).
    fn nested(&self) -> Vec<Arc<dyn Nested>> {
        self.lock()
            .members
            .iter()
            .filter_map(|m| match &m.obj {
                Obj::Set(_, s) => Some(s.clone()),
                Obj::Sock(_) => None,
            })
            .collect()
    }
}
