//! Parking: the idle members of a large epoll set wait on one doorbell of
//! the set's own, so that a wait looks at and arms only the members that
//! were busy lately. A member that had nothing to report for `PARK_AFTER`
//! looks in a row and then `PARK_IDLE_MS` more, in a set of at least
//! `PARK_MIN`, and that is a settled
//! Direct end whose kernel socket the kernel instance watches (`live`), is
//! armed once, for good, naming the set's doorbell (`bells::ParkBell`,
//! registered level-triggered in the kernel instance under `park_tag`),
//! and left out of the looks and of each sleep's arming. It comes back
//! (unparked) when that doorbell rings and its rings have news
//! (`Set::rescan_parked`: the parked members the rings name, by the
//! connection id each ring carries, or all of them when a ring named
//! none or may have been lost; those without news armed again), when its
//! kernel socket has an event (its
//! look reports it), when `Set::net` finds its rings ready (a ring that
//! went to the process's common doorbell, or none), when the application
//! changes or removes its registration, and when parking stops: the set
//! is watched by poll or nested in another set (`never_park`), a fork
//! shares the instance, or it has fewer than `PARK_MIN` members left.
//!
//! Never here: a member reported that the application did not ask for,
//! a parked member whose news no wait would ever see (every unparking
//! that another thread's sleep relies on rings the set), or a sleep with
//! the set's lock held.

use super::{awake, borrow, live, liveness_entry, Armed, Inner, Member, Obj, Set, EPOLLIN};
use libc::c_int;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Looks in a row with nothing to report before a member may be parked.
pub(super) const PARK_AFTER: u32 = 64;
/// Milliseconds without news after those looks before it is parked: a
/// busy server's connections (nginx with 500 keep-alive clients, a
/// request on each every few milliseconds) go quiet for many looks
/// between two requests, and parking them costs more than it saves. (An
/// unparking costs one look at the member its peer's ring names, and a
/// pass over the parked members' tokens: `rescan_parked`.)
pub(super) const PARK_IDLE_MS: u64 = 20;
/// Members a set needs before any is parked.
pub(super) const PARK_MIN: usize = 32;
/// Answers between two looks at the clock and at the common doorbell for
/// `Set::net` in a set that does not sleep.
pub(super) const NET_LOOKS: u32 = 32;
/// How long a doorbell that could not be had is not asked for again.
const MISSED_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Member {
    /// Ends its parking, if it is parked.
    pub(super) fn unpark(&mut self) {
        if let Some((id, gen, _)) = self.parked.take() {
            awake::changed();
            self.obj.unpark(id, gen);
        }
        self.idle = 0;
    }

    /// Whether it may be parked at `now` (`coarse_ms`; if its kernel
    /// socket can be watched through the kernel instance: `park_idle`
    /// asks).
    fn due(&self, live: &live::Live, now: u64) -> bool {
        self.parked.is_none()
            && !self.disabled
            && self.idle > PARK_AFTER
            && now.saturating_sub(self.idle_since) >= PARK_IDLE_MS
            && matches!(self.obj, Obj::Sock(_))
            && !live.is_shared()
    }
}

impl Inner {
    /// Unparks every parked member (parking stops): whether any was. Their
    /// wait words no longer name the set's doorbell: a thread asleep on the
    /// set meanwhile must be woken to arm them (`Set::ring`).
    pub(super) fn unpark_all(&mut self) -> bool {
        let mut any = false;
        for m in self.members.iter_mut().filter(|m| m.parked.is_some()) {
            any = true;
            m.unpark();
        }
        any
    }

    /// Parking stops: every member unparked, the set's doorbell taken out
    /// of the kernel instance `epfd` and given back (this process's only:
    /// a forked child's copy is the parent's, see below). Whether any
    /// member was parked (see `unpark_all`).
    pub(super) fn stop_parking(&mut self, epfd: c_int, park_tag: u64) -> bool {
        self.forget_parent_parking();
        let any = self.unpark_all();
        if let Some(p) = self.park.take() {
            // DEL fails only when the registration is not there (ENOENT:
            // never added; EBADF: the instance is closed): then nothing
            // names the doorbell, which may go back to the pool.
            let _ = live::raw_ctl(epfd, libc::EPOLL_CTL_DEL, p.fd(), 0, park_tag);
        }
        any
    }

    /// After a member left: with fewer than `PARK_MIN` members left, the
    /// set parks no more (its doorbell goes back; the caller rings the set,
    /// as after any change of members).
    pub(super) fn member_left(&mut self, epfd: c_int, park_tag: u64) {
        if self.park.is_some() && self.members.len() < PARK_MIN {
            self.stop_parking(epfd, park_tag);
        }
    }

    /// A forked child's set: the parked ends' sleeps stayed with the parent
    /// (the child's transports forgot them), so nothing is parked here.
    pub(super) fn forget_parent_parking(&mut self) {
        if self.park.as_ref().is_some_and(|p| !p.here()) {
            for m in &mut self.members {
                m.parked = None;
                m.idle = 0;
            }
            self.awake.touch();
            self.park = None;
        }
    }

    /// Nothing to park until a member becomes due again (`collect` says).
    fn nothing_due(&mut self, set: &Set) {
        self.park_due = false;
        set.park_wanted.store(false, Ordering::Relaxed);
    }
}

impl Set {
    /// `park_idle`, then arms the members left (`arm_members`).
    pub(super) fn arm_for_wait(&self, epfd: c_int) -> (Vec<(c_int, i16)>, Vec<Armed>) {
        self.park_idle(epfd);
        self.arm_members(epfd)
    }

    /// Parks the members that are due (`Member::due`): each is armed once
    /// on the set's doorbell and left out of the looks until it is
    /// unparked. Before a wait sleeps or spins, and before it returns an
    /// answer when a member became due (a wait that never sleeps would
    /// otherwise look at every member each time); also the net, and the
    /// doorbell given back when too few members are left.
    pub(super) fn park_idle(&self, epfd: c_int) {
        if !self.park_wanted.load(Ordering::Relaxed) && !self.park_held.load(Ordering::Relaxed) {
            return;
        }
        let mut guard = self.lock();
        let i = &mut *guard;
        i.forget_parent_parking();
        self.net(i, false);
        let now = coarse_ms();
        if i.park.is_some() && i.members.len() < PARK_MIN && i.stop_parking(epfd, self.park_tag) {
            self.ring();
        }
        if !i.park_due {
            return;
        }
        if i.no_park || i.members.len() < PARK_MIN || !i.members.iter().any(|m| m.due(&i.live, now))
        {
            i.nothing_due(self);
            return;
        }
        if i.park.is_none() {
            if i.park_missed.is_some_and(|t| t.elapsed() < MISSED_WAIT) {
                i.nothing_due(self);
                return;
            }
            // The doorbell is had without the set's lock (it may ask devd,
            // on a session the process has: never a new one).
            drop(guard);
            let session = ssock_client::session::Session::existing();
            let pb = ssock_client::bells::park_bell(session.as_deref());
            // (The table of sets before the set's lock: the order of every
            // path.)
            let this = super::get(epfd).is_some_and(|s| std::ptr::eq(Arc::as_ptr(&s), self));
            guard = self.lock();
            let i = &mut *guard;
            // Still due, and still this instance: a fork meanwhile (the
            // instance shared now, no member watched through it), a change
            // of members, or the epoll fd closed (and its number reused)
            // may have ended that. (A doorbell not kept goes back.)
            let still = this
                && !i.no_park
                && i.park.is_none()
                && i.members.len() >= PARK_MIN
                && i.members.iter().any(|m| m.due(&i.live, now));
            match pb {
                Some(pb) if still => {
                    if live::raw_ctl(epfd, libc::EPOLL_CTL_ADD, pb.fd(), EPOLLIN, self.park_tag)
                        .is_ok()
                    {
                        i.park = Some(pb);
                        self.park_held.store(true, Ordering::Relaxed);
                    } else {
                        i.park_missed = Some(Instant::now());
                    }
                }
                Some(_) => {}
                None => i.park_missed = Some(Instant::now()),
            }
        }
        let i = &mut *guard;
        i.nothing_due(self);
        let Some(pb) = &i.park else {
            return;
        };
        let mut parked = false;
        for m in i.members.iter_mut() {
            if !m.due(&i.live, now) {
                continue;
            }
            // Its kernel socket watched as its sleeps would (a wait that
            // never slept has not asked yet): its peer's end or reset
            // flags it.
            let liveness = liveness_entry(m.fd, 0).events;
            if !i.live.watched(m.fd) && !i.live.want(epfd, self.live_key, m.fd, liveness) {
                m.idle = 0;
                continue;
            }
            if let Some((gen, token)) = m.obj.park(pb.sleep(), m.read(), m.write()) {
                m.parked = Some((pb.id(), gen, token));
                parked = true;
                // Parked: a publish from now on rings the set's doorbell;
                // one before is seen here.
                // SAFETY: as in `collect`.
                let r = m.obj.readiness(unsafe { borrow(m.fd) }, false);
                if m.report(r) != 0 {
                    m.unpark();
                }
            } else {
                m.idle = 0;
            }
        }
        if parked {
            // (Parked ones leave the index.)
            i.awake.touch();
        }
    }

    /// The set's doorbell rang: each parked member looked at whose rings
    /// have news is unparked; the others looked at are armed again with a
    /// fresh wait (the ring may have been one of theirs, its news taken by
    /// another reader since: a peer rings once per wait) and looked at once
    /// more. `only`: the tokens of every ring the doorbell held, when each
    /// named its connection and none can have been lost
    /// (`bells::ParkBell::drain_named`): only the members they name are
    /// looked at (a member whose peer did not ring still has its wait
    /// armed; a wrong token costs a look). Whether any was unparked (the
    /// caller rings the set and has them looked at).
    pub(super) fn rescan_parked(&self, i: &mut Inner, only: Option<&[u64]>) -> bool {
        let mut any = false;
        for m in i.members.iter_mut() {
            let Some((id, gen, token)) = m.parked else {
                continue;
            };
            if only.is_some_and(|o| token != 0 && !o.contains(&token)) {
                continue;
            }
            // SAFETY: as in `collect`.
            let fd = unsafe { borrow(m.fd) };
            let news = m.report(m.obj.readiness(fd, false)) != 0
                || !m.obj.repark(id, gen)
                || m.report(m.obj.readiness(fd, false)) != 0;
            if news {
                m.unpark();
                any = true;
            }
        }
        any
    }

    /// The set is watched by poll or another set: it parks no member from
    /// now on (what they look at leaves parked members out).
    pub(super) fn never_park(&self, epfd: c_int) {
        if self.parking_off.load(Ordering::Relaxed) {
            return;
        }
        let mut i = self.lock();
        i.no_park = true;
        self.parking_off.store(true, Ordering::Relaxed);
        if i.stop_parking(epfd, self.park_tag) {
            self.ring();
        }
    }

    /// After a sleep that ended with nothing (a cap, or its time up):
    /// `net`.
    pub(super) fn after_sleep(&self, woke: c_int) {
        if woke == 0 && self.park_held.load(Ordering::Relaxed) {
            self.net(&mut self.lock(), false);
        }
    }

    /// Every `NET_LOOKS` answers of a set that holds a doorbell (`collect`):
    /// the net, at once if the process's common doorbell is rung (a peer
    /// that could not ring the set's rang it, and no thread may sleep to
    /// empty it and ring the set's: a busy set never does).
    pub(super) fn net_now_and_then(&self, i: &mut Inner) {
        i.net_looks = i.net_looks.wrapping_add(1);
        if i.net_looks.is_multiple_of(NET_LOOKS) {
            self.net(i, ssock_client::bells::common_rung());
        }
    }

    /// The net under a ring that could not reach the set's doorbell, at
    /// most once per doorbell cap (`bells::cap`, the longest any Direct
    /// sleep lasts) unless `now`: the parked members whose rings have
    /// something to report are unparked, and looked at by the next look
    /// (`unparked`). Their readiness only is asked (no system call, no
    /// member's state changed but its parking).
    fn net(&self, i: &mut Inner, now: bool) {
        if i.park.is_none() {
            return;
        }
        let t = Instant::now();
        if !now
            && i.net_at
                .is_some_and(|at| t.saturating_duration_since(at) < ssock_client::bells::cap())
        {
            return;
        }
        i.net_at = Some(t);
        let mut any = false;
        for m in i.members.iter_mut().filter(|m| m.parked.is_some()) {
            // SAFETY: as in `collect`.
            let r = m.obj.readiness(unsafe { borrow(m.fd) }, false);
            if m.report(r) != 0 {
                m.unpark();
                any = true;
            }
        }
        if any {
            self.unparked.store(true, Ordering::SeqCst);
            self.ring();
        }
    }
}

/// The monotonic clock's coarse reading in milliseconds (the vDSO's, a few
/// nanoseconds; a tick of 1 to 10 ms leaves `PARK_IDLE_MS` at least half
/// of what it says).
pub(super) fn coarse_ms() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: t is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t) };
    u64::try_from(t.tv_sec).unwrap_or(0) * 1000 + u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000_000
}
