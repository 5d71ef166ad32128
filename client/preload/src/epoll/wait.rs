//! The blocking part of epoll_wait on an instance the shim knows: with
//! no accelerated member yet, the kernel's own wait, counted as a sleeper
//! (`wait_direct`); with members, the rings first (and the kernel's
//! events, when the instance had some lately or a spin follows), then a
//! bounded spin, then one real poll over the epoll fd (which watches the
//! instance's bell) and the members' doorbells (`wait`).
//!
//! Never here: a sleep with the set's lock held, or a look at the
//! kernel's events that keeps the bell's event.

use super::{Look, Set, KERNEL_WAIT_CAP};
use crate::table;
use libc::{c_int, epoll_event};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// epoll_wait and friends on an instance with no shim member yet: the
/// kernel's own wait (`kernel_wait(out, remaining)`, with the caller's
/// signal mask), counted as a sleeper, so that an epoll_ctl adding an
/// accelerated socket from another thread rings the bell, which the kernel
/// instance holds; the wait then goes on through the shim ([`wait`]).
/// Costs the kernel's wait two atomic operations and a look at what it
/// returned.
pub fn wait_direct(
    epfd: c_int,
    set: &Set,
    out: &mut [epoll_event],
    timeout: Option<Duration>,
    kernel_wait: &dyn Fn(&mut [epoll_event], Option<Duration>) -> c_int,
    sleep: &dyn Fn(&mut [libc::pollfd], Option<Duration>) -> c_int,
) -> c_int {
    // The clock is read once, for a wait with a timeout, and looked at
    // again only if the wait goes on past the kernel's (rung, or cut
    // short by the cap): the kernel's wait gets the caller's timeout as
    // it is. No deadline: for ever (none, or too far for the clock).
    let deadline = crate::sleep::deadline(timeout);
    let mut left = deadline.and(timeout);
    loop {
        // A member added before this count is seen below; one added after
        // it rings the bell (both SeqCst).
        set.sleepers.fetch_add(1, Ordering::SeqCst);
        if set.has_members() {
            set.done_sleeping(false);
            return wait(epfd, set, out, left, sleep);
        }
        // Cut while this process has accelerated sockets: a member added
        // while another sleeper drained the bell is seen at the latest then.
        let cap = table::any().then_some(KERNEL_WAIT_CAP);
        let (cut, ours) = match (left, cap) {
            (Some(l), Some(c)) if c < l => (Some(c), true),
            (None, Some(c)) => (Some(c), true),
            (l, _) => (l, false),
        };
        let r = kernel_wait(out, cut);
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // A liveness event (`live`: a member added meanwhile, whose kernel
        // socket had one already) wakes it as the bell does: it goes on.
        let (n, rung, flagged) = set.strip_bell(out, usize::try_from(r).unwrap_or(0));
        set.done_sleeping(rung);
        if r < 0 {
            crate::boundary::set_errno(errno);
            return -1;
        }
        let capped = ours && r == 0;
        let done = c_int::try_from(n).unwrap_or(c_int::MAX);
        if n > 0 || (!rung && !flagged && !capped) {
            return done;
        }
        // Going on: what is left of the caller's timeout.
        if let Some(d) = deadline {
            match d.checked_duration_since(Instant::now()) {
                Some(l) if !l.is_zero() => left = Some(l),
                _ => return done,
            }
        }
    }
}

/// epoll_wait and friends on an instance with shim members. `sleep(set,
/// remaining)` is the blocking poll (with the caller's signal mask).
pub fn wait(
    epfd: c_int,
    set: &Set,
    out: &mut [epoll_event],
    timeout: Option<Duration>,
    sleep: &dyn Fn(&mut [libc::pollfd], Option<Duration>) -> c_int,
) -> c_int {
    let deadline = crate::sleep::deadline(timeout);
    // Whether a look at the kernel's events found the bell since the last
    // sleep (the sleep's end drains it then, as `done_sleeping` says).
    let saw = std::cell::Cell::new(false);
    // The kernel's events: how many, and whether a member's kernel socket
    // had one (that member's next look asks it). A full batch that had
    // some of the shim's own is fetched again into the room they left
    // (the kernel sends a level-triggered event to the back of its list),
    // a few times at most: they do not crowd out the application's.
    let kernel = |out: &mut [epoll_event]| -> (usize, bool) {
        let (mut got, mut flagged) = (0, false);
        for _ in 0..3 {
            let room = &mut out[got..];
            if room.is_empty() {
                break;
            }
            let max = c_int::try_from(room.len()).unwrap_or(c_int::MAX);
            // SAFETY: room is a valid, exclusively borrowed array of max
            // events.
            let r = unsafe { (crate::real::get().epoll_wait)(epfd, room.as_mut_ptr(), max, 0) };
            let r = usize::try_from(r).unwrap_or(0);
            let (n, rung, f) = set.strip_bell(room, r);
            saw.set(saw.get() | rung);
            flagged |= f;
            got += n;
            if r < room.len() || n == r {
                break;
            }
        }
        (got, flagged)
    };
    // The kernel's events into `out` after the `at` the answer has: how
    // many, with the members its liveness events flagged looked at when
    // nothing else is there or on a last look; remembered for the next
    // wait's first look.
    let kernel_look =
        |out: &mut [epoll_event], at: usize, last: bool, reported: &mut Vec<c_int>| {
            let (mut k, flagged) = kernel(&mut out[at..]);
            if at < out.len() {
                // (A full answer left no room to look.)
                set.kernel_busy.store(k > 0, Ordering::Relaxed);
            }
            if set.unparked.swap(false, Ordering::SeqCst) && at + k < out.len() {
                // Unparked by the kernel's answer: their rings looked at.
                let look = if last { Look::Last } else { Look::Rings };
                k += set.collect(epfd, out, at + k, look, reported).0;
            }
            let mut n = at + k;
            if flagged && (n == 0 || last) {
                // Members whose kernel socket had an event, looked at now.
                n += set.collect(epfd, out, n, Look::Flagged, reported).0;
            }
            n - at
        };
    let count = |n: usize| c_int::try_from(n).unwrap_or(c_int::MAX);
    let mut spun = false;
    // Whether this call slept already: the kernel sockets of members that
    // are Direct ends in the region are asked whether a peer is gone only
    // after a sleep, which watches them (as in `wait::poll`).
    let mut slept = false;
    // Whether the last sleep's poll found the epoll fd quiet (no kernel
    // event in the instance when it woke): the look after it need not
    // ask the kernel again (its tick and its busy flag neither: there
    // was nothing to be fair to).
    let mut kernel_quiet = false;
    // The members' fds in the answer being made (`Set::collect`): this
    // thread's vector, kept between calls (no allocation per wait).
    let mut kept = Reported::take();
    let reported = &mut kept.0;
    loop {
        // The rings first, without a syscall; the kernel's events when the
        // rings have none, when the kernel's instance had some at the last
        // look (busy: a listener whose queue holds connections is served at
        // each wait, as by the kernel's; asked every fourth wait, nginx's
        // workers took seconds to accept wrk's 500 connections, which timed
        // out), and every fourth time anyway. A last look (the
        // time is up: at once for a zero timeout) takes the kernel's
        // events always, and asks the members' kernel sockets whether a
        // peer is gone: those with an event there (the kernel instance
        // watches them, `live`), and those it does not watch. All that is
        // ready, as the kernel's would be. Before this call's first sleep,
        // the kernel's events are asked for only if its instance had some
        // for the last wait that asked, or just before a spin: a sleep's
        // poll watches the epoll fd, and wakes at once for them (a
        // database backend whose only kernel fds are quiet saves a system
        // call per wait).
        let last = deadline.is_some_and(|d| Instant::now() >= d);
        let look = if last { Look::Last } else { Look::Rings };
        let (rings, tick) = set.collect(epfd, out, 0, look, reported);
        let mut n = rings;
        let busy = set.kernel_busy.load(Ordering::Relaxed);
        let quiet = std::mem::take(&mut kernel_quiet);
        let ask = last || (!quiet && (slept || tick || busy));
        if ask && (n == 0 || tick || last || busy) {
            n += kernel_look(out, n, last, reported);
        }
        if tick && rings + 1 == out.len() && n < out.len() {
            // The place the rings left to the kernel's events (they filled
            // the rest), unused: theirs again.
            n += set.collect(epfd, out, n, look, reported).0;
        }
        if n > 0 || last {
            if set.park_wanted.load(Ordering::Relaxed) {
                // A wait that never finds nothing parks its idle members
                // here (else before its spin or sleep).
                set.park_idle(epfd);
            }
            return count(n);
        }
        if !spun {
            spun = true;
            set.park_idle(epfd);
            // Looked up only here: a wait answered by the first collect
            // takes no further lock for it.
            let (spin, gate) = set.spin();
            let gate = gate
                .as_deref()
                .unwrap_or(ssock_rings::notify::process_gate());
            if let Some(permit) = ssock_rings::notify::spin_permit(spin, gate) {
                if !ask {
                    // Not asked above: a spin looks at the rings alone.
                    let k = kernel_look(out, 0, false, reported);
                    if k > 0 {
                        return count(k);
                    }
                }
                // The collect above looked already.
                if permit.spin(|| set.any_ready(false).then_some(())).is_some() {
                    continue;
                }
            }
        }
        // After a sleep: every member's kernel socket if the sleep's poll
        // watched some (it says nothing of which); those the kernel
        // instance watched are flagged by their events.
        if (slept && set.polled_socks()) || !set.watched_by_sleep() {
            let (n, _) = set.collect(epfd, out, 0, Look::Peers, reported);
            if n > 0 {
                return count(n);
            }
        }
        let (fds, armed) = set.arm_for_wait(epfd);
        // Armed: anything reportable that was there already, or arrived
        // before the wait words were set, is seen here (no syscall).
        if set.any_ready(false) {
            set.end_sleep(armed, saw.take());
            continue;
        }
        let mut pfds: Vec<libc::pollfd> = fds
            .into_iter()
            .map(|(fd, events)| libc::pollfd {
                fd,
                events,
                revents: 0,
            })
            .collect();
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let left = crate::sleep::capped(left, &pfds);
        let r = sleep(&mut pfds, left);
        set.after_sleep(r);
        slept = true;
        // (pfds[0] is the epoll fd itself, `arm_members`. Not with parked
        // members: the sleep's end may ring their doorbell, which is in
        // the kernel instance, after the poll.)
        kernel_quiet = r >= 0
            && pfds.first().is_some_and(|p| p.revents == 0)
            && !set.park_held.load(Ordering::Relaxed);
        if kernel_quiet {
            set.kernel_busy.store(false, Ordering::Relaxed);
        }
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        set.end_sleep(armed, saw.take());
        if r < 0 {
            crate::boundary::set_errno(errno);
            return -1;
        }
    }
}

thread_local! {
    static REPORTED: std::cell::RefCell<Vec<c_int>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// This thread's vector of the members in an answer, given back when the
/// wait ends (by any of its returns).
struct Reported(Vec<c_int>);

impl Reported {
    fn take() -> Reported {
        Reported(
            REPORTED
                .try_with(|r| std::mem::take(&mut *r.borrow_mut()))
                .unwrap_or_default(),
        )
    }
}

impl Drop for Reported {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        let _ = REPORTED.try_with(|r| *r.borrow_mut() = v);
    }
}
