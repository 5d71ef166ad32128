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
use park::{PARK_AFTER, PARK_IDLE_MS};
use ssock_client::transport::{Polled, Ready};
use ssock_rings::sys::EventFd;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::time::Duration;

mod awake;
mod ctl;
mod instances;
mod live;
mod park;
mod wait;
pub use ctl::ctl;
pub use instances::{
    after_fork, became_accelerated, before_fork, closed, created, duplicated, get, instances,
    registered_within, unwatch,
};
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
    /// Looks in a row that found nothing to report (for parking).
    idle: u32,
    /// When (`park::coarse_ms`) its idle looks reached `PARK_AFTER`.
    idle_since: u64,
    /// Parked (the doorbell id, the socket's generation, and the token its
    /// peer's rings carry: the connection's id, 0 if none): armed on the
    /// set's doorbell for good, left out of the looks until unparked.
    parked: Option<(u32, u64, u64)>,
    /// What its words read (`Sock::quiet_sig`) when a look at its rings
    /// last found nothing to report: while they read the same, a look at
    /// the rings skips it (`Obj::look`; forgotten when its registration
    /// changes).
    quiet: Option<ssock_client::transport::QuietSig>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.unpark();
    }
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
    /// The doorbell parked members name.
    park: Option<ssock_client::bells::ParkBell>,
    /// Never park (the set is watched by poll or another set).
    no_park: bool,
    /// When a doorbell for parking could last not be had (tried again a
    /// second later).
    park_missed: Option<std::time::Instant>,
    /// When the parked members' rings were last looked at without a ring
    /// of the set's doorbell (`Set::net`).
    net_at: Option<std::time::Instant>,
    /// Collects since `net_at` was last compared with the clock.
    net_looks: u32,
    /// A member became due for parking since the last parking pass.
    park_due: bool,
    /// The members a look at the rings must see (`awake`).
    awake: awake::Awake,
}

impl Inner {
    /// A new member (not parked, nothing seen yet); it is looked at from
    /// the next wait on (its socket's plainness checked, the index rebuilt).
    fn add(&mut self, fd: c_int, obj: Obj, events: u32, data: u64) {
        self.plain_seen = None;
        self.awake.touch();
        self.members.push(Member {
            idle: 0,
            idle_since: 0,
            parked: None,
            quiet: None,
            fd,
            obj,
            events,
            data,
            seen: None,
            disabled: false,
            check: false,
        });
    }

    /// Takes out the member at position `k` (the index rebuilt).
    fn remove_at(&mut self, k: usize) -> Member {
        self.awake.touch();
        self.members.remove(k)
    }

    /// Takes out the members registered under `fd`: whether there were any.
    fn remove_fd(&mut self, fd: c_int) -> bool {
        let before = self.members.len();
        self.members.retain(|m| m.fd != fd);
        let gone = self.members.len() != before;
        if gone {
            self.awake.touch();
        }
        gone
    }
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
    /// The data word of the parking doorbell's registration in the kernel
    /// instance (random as `tag`).
    park_tag: u64,
    /// Set when the parking doorbell's event unparked the members: the
    /// wait that took it looks at them again.
    unparked: AtomicBool,
    /// A member became due for parking (`Inner::park_due`, seen without the
    /// lock): a wait answered at once parks it before it returns.
    park_wanted: AtomicBool,
    /// The set has had a parking doorbell (a hint, never cleared: a set
    /// that never parked skips `park_idle` without its lock).
    park_held: AtomicBool,
    /// The set parks no member any more (`never_park`; `Inner::no_park`
    /// seen without the lock).
    parking_off: AtomicBool,
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
        let mut park_rung = false;
        for k in 0..n {
            let ev = out[k];
            if ev.u64 == self.tag {
                rung = true;
                continue;
            }
            if ev.u64 == self.park_tag {
                park_rung = true;
                continue;
            }
            if let Some(fd) = live::named(self.live_key, ev.u64) {
                let i = inner.get_or_insert_with(|| self.lock());
                if i.live.watched(fd) {
                    let mut parked = false;
                    for m in i.members.iter_mut().filter(|m| m.fd == fd) {
                        m.check = true;
                        parked |= m.parked.is_some();
                    }
                    if parked {
                        // (A parked one flagged joins the index.)
                        i.awake.touch();
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
        if park_rung {
            // A peer published to a parked member (or the common doorbell
            // was emptied): those with news are unparked, after the
            // doorbell was emptied (a ring after that stays).
            let i = inner.get_or_insert_with(|| self.lock());
            i.forget_parent_parking();
            // Each ring names its connection (`ProcessBells`): when every
            // ring did, only those are looked at.
            let mut rang = Vec::new();
            let whole = i
                .park
                .as_ref()
                .is_some_and(|p| p.drain_named(&mut rang).whole);
            if self.rescan_parked(i, whole.then_some(&rang[..])) {
                // This wait looks at them (`unparked`); a thread asleep on
                // the set arms them again.
                self.ring();
                self.unparked.store(true, Ordering::SeqCst);
            }
            // (The wait goes on, as for a liveness event: `wait_direct`
            // must not take the doorbell's event for an answer.)
            flagged = true;
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
            self.give_back(epfd, i, k);
        }
        self.any.store(!i.members.is_empty(), Ordering::SeqCst);
    }

    /// Member `k`, whose negotiation ended on kernel TCP, goes back to the
    /// kernel instance `epfd` with its events and data (and out of the
    /// socket table, if its fd still names it there).
    fn give_back(&self, epfd: c_int, i: &mut Inner, k: usize) {
        let m = i.remove_at(k);
        i.live.drop_fd(epfd, self.live_key, m.fd);
        if let Obj::Sock(s) = &m.obj {
            table::forget_kernel(m.fd, s);
        }
        // A one-shot member that fired stays registered and silent until
        // it is modified, as the kernel keeps one.
        let events = if m.disabled {
            m.events & (libc::EPOLLONESHOT as u32)
        } else {
            m.events
        };
        let mut ev = epoll_event {
            events,
            u64: m.data,
        };
        // SAFETY: plain epoll_ctl on the application's instance and fd.
        let r = unsafe { (crate::real::get().epoll_ctl)(epfd, libc::EPOLL_CTL_ADD, m.fd, &mut ev) };
        if r == 0 {
            i.kernel.insert(m.fd, (events, m.data));
        }
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
        i.forget_parent_parking();
        if at == 0 {
            reported.clear();
        }
        let _polled = polled(i, look);
        // Counted (and one place left to the kernel's events every fourth
        // time) only as the start of an answer.
        let counted = at == 0 && look != Look::Flagged;
        let tick = counted && i.calls.wrapping_add(1).is_multiple_of(4);
        if counted && i.park.is_some() {
            // (A set that never sleeps: `park_idle` casts the net too.)
            self.net_now_and_then(i);
        }
        let room = if tick && out.len() > at {
            out.len() - 1
        } else {
            out.len()
        };
        let len = i.members.len();
        let mut n = at;
        let start = if len == 0 { 0 } else { i.next % len };
        let mut park_due = false;
        let mut now = None;
        let mut unparked = false;
        // A parked member is looked at only when its kernel socket had an
        // event, or by a look at every peer: a look at the rings goes over
        // the index of the others (`awake`), from the first at or after
        // `start`.
        let rings = matches!(look, Look::Rings | Look::Last);
        i.awake.update(&i.members);
        let index = rings.then(|| i.awake.positions());
        let count = index.map_or(len, <[usize]>::len);
        let mut p = index.map_or(start, |a| a.partition_point(|&k| k < start));
        for _ in 0..count {
            if n >= room {
                break;
            }
            // Round from `i.next` (a division per member showed with
            // hundreds of them).
            if p >= count {
                p = 0;
            }
            let j = index.map_or(p, |a| a[p]);
            p += 1;
            let m = &mut i.members[j];
            if m.disabled {
                continue;
            }
            if m.parked.is_some() && rings && !m.check {
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
            // A look at the rings alone skips a member whose words read as
            // when a look found nothing (`Obj::look`).
            let rings_only = look == Look::Rings && !ask;
            // SAFETY: m.fd is registered in this instance and still open
            // (close() drops it from every instance first).
            let looked = m.obj.look(
                unsafe { borrow(m.fd) },
                ask,
                rings_only,
                m.quiet.as_ref().filter(|_| rings_only),
            );
            let (ev, seq) = match looked {
                None => (0, [0, 0]),
                Some((r, sig)) => {
                    m.check = false;
                    let ev = m.report(r);
                    m.quiet = if ev == 0 { sig } else { None };
                    (ev, r.seq)
                }
            };
            if rings {
                m.idle = if ev == 0 { m.idle.saturating_add(1) } else { 0 };
                // Idle for PARK_AFTER looks (the time noted), then due once
                // PARK_IDLE_MS passed without news (checked every
                // PARK_AFTER looks more: no clock read per look).
                if m.idle >= PARK_AFTER && m.idle.is_multiple_of(PARK_AFTER) {
                    let t = *now.get_or_insert_with(park::coarse_ms);
                    if m.idle == PARK_AFTER {
                        m.idle_since = t;
                    } else {
                        park_due |= t.saturating_sub(m.idle_since) >= PARK_IDLE_MS;
                    }
                }
            }
            if ev == 0 {
                continue;
            }
            unparked |= m.parked.is_some();
            m.unpark();
            out[n] = epoll_event {
                events: ev,
                u64: m.data,
            };
            n += 1;
            reported.push(m.fd);
            m.seen = Some(seq);
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
        if park_due && !i.park_due {
            i.park_due = true;
            self.park_wanted.store(true, Ordering::Relaxed);
        }
        if unparked {
            // Its wait word no longer names the set's doorbell: a thread
            // asleep on the set meanwhile arms it again.
            self.ring();
        }
        (n - at, tick)
    }

    /// Whether some member would report something now (no state change).
    fn any_ready(&self, check_peer: bool) -> bool {
        let mut guard = self.lock();
        let i = &mut *guard;
        let _polled = polled(i, if check_peer { Look::Peers } else { Look::Rings });
        let any = i
            .awake
            .over(&i.members)
            .filter(|m| m.parked.is_none() || m.check)
            .any(|m| {
                let ask = check_peer || m.check;
                // (As in `collect`: skipped while its words read as when a
                // look found nothing.)
                // SAFETY: as in `collect`.
                m.obj
                    .look(
                        unsafe { borrow(m.fd) },
                        ask,
                        !ask && m.quiet.is_some(),
                        m.quiet.as_ref(),
                    )
                    .is_some_and(|(r, _)| m.report(r) != 0)
            });
        any
    }

    /// Arms every member that is not parked for a sleep (the fds to sleep
    /// on, the epoll fd first, and the set's doorbell if it parked some)
    /// and what was armed, for `disarm`.
    fn arm_members(&self, epfd: c_int) -> (Vec<(c_int, i16)>, Vec<Armed>) {
        let mut guard = self.lock();
        let i = &mut *guard;
        let mut fds = vec![(epfd, libc::POLLIN)];
        let mut armed = Vec::with_capacity(i.members.len() + 1);
        let mut watched = Vec::new();
        i.awake.update(&i.members);
        if i.awake.any_parked() {
            // The parked members' doorbell is in the kernel instance; a
            // peer that cannot ring it rings the common doorbell, whose
            // drain (after the poll, by this thread's sleep) rings it. The
            // sleep is capped, as every sleep on a doorbell.
            let session = ssock_client::session::Session::existing();
            match ssock_client::bells::enter(session.as_deref()) {
                Some(sleep) => {
                    watched.extend(sleep.fds().map(|fd| (fd, libc::POLLIN)));
                    armed.push(Armed::Bell(sleep));
                }
                // No doorbell to sleep on (none in this process any
                // more): they are armed below as the others.
                None => {
                    if i.unpark_all() {
                        self.ring();
                    }
                }
            }
        }
        let mut polled_socks = false;
        // (Brought up to date again: `unpark_all` above may have changed
        // it.)
        for m in i
            .awake
            .over(&i.members)
            .filter(|m| !m.disabled && m.parked.is_none())
        {
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
        let mut guard = self.lock();
        let i = &mut *guard;
        // A parked member's kernel socket is watched through the kernel
        // instance (it was when it was parked, and stays so until it is
        // unparked): not asked.
        let all = i
            .awake
            .over(&i.members)
            .filter(|m| !m.disabled && m.parked.is_none())
            .all(|m| m.obj.watched_by_sleep());
        all
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
    if matches!(look, Look::Rings | Look::Flagged) {
        return None;
    }
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
        // Watched by poll or another set: parked members would be left out
        // of what it sees until a wait of this set's own.
        self.never_park(epfd);
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
        // Watched by poll or another set: nothing parked (their sleeps do
        // not look at the set's doorbell).
        self.never_park(epfd);
        self.arm_members(epfd)
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
