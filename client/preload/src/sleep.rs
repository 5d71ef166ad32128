//! The kernel's own waits, which the shim sleeps in: libc's poll (the real
//! one, not the shim's) over a Rust slice, and timeouts converted between
//! the C arguments and `Duration`.
//!
//! Never here: accelerated sockets, spinning, or any decision about what
//! to wait for.

use crate::real;
use libc::c_int;
use std::time::Duration;

/// libc's poll over a Rust slice.
pub fn real_poll(set: &mut [libc::pollfd], timeout_ms: c_int) -> c_int {
    let n = libc::nfds_t::try_from(set.len()).unwrap_or(0);
    // SAFETY: set is a valid, exclusively borrowed pollfd array of n entries.
    let r = unsafe { (real::get().poll)(set.as_mut_ptr(), n, timeout_ms) };
    reported(set, r);
    r
}

/// Tells `ssock_client::bells` what a poll found (the common doorbell),
/// keeping errno.
fn reported(set: &[libc::pollfd], r: c_int) {
    if r > 0 {
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        ssock_client::bells::polled(set.iter().map(|p| (p.fd, p.revents)));
        crate::boundary::set_errno(e);
    }
}

/// A remaining wait as poll's millisecond timeout (rounded up; -1: forever).
pub fn millis(d: Option<Duration>) -> c_int {
    match d {
        None => -1,
        // Whole microseconds rounded up to the millisecond, in 64-bit steps
        // (a division of the u128 microseconds showed in every
        // epoll_wait's profile).
        Some(d) => {
            let ms = d
                .as_secs()
                .saturating_mul(1000)
                .saturating_add(u64::from(d.subsec_micros().div_ceil(1_000)));
            c_int::try_from(ms).unwrap_or(c_int::MAX)
        }
    }
}

/// libc's ppoll over a Rust slice, with `rem` as its timeout (None: forever)
/// and the caller's signal mask.
pub fn real_ppoll(
    set: &mut [libc::pollfd],
    rem: Option<Duration>,
    mask: *const libc::sigset_t,
) -> c_int {
    let ts = rem.map(timespec);
    let tp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    let k = libc::nfds_t::try_from(set.len()).unwrap_or(0);
    // SAFETY: set is a valid pollfd array of k entries; tp is null or a
    // live timespec; mask is null or the caller's sigset (ppoll/pselect).
    let r = unsafe { (real::get().ppoll)(set.as_mut_ptr(), k, tp, mask) };
    reported(set, r);
    r
}

/// A remaining wait as a timespec (ppoll, epoll_pwait2).
pub fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(d.subsec_nanos()),
    }
}

/// The longest sleep on an empty set (accelerated sockets whose arming
/// found nothing to watch: only a signal or the timeout would end it):
/// the caller looks at them again after it.
const NOTHING_WATCHED: Duration = Duration::from_secs(1);

/// A sleep's timeout: when `set` is empty, no longer than
/// [`NOTHING_WATCHED`]; when it holds this process's doorbell (a Direct
/// end is armed), no longer than `ssock_client::bells::cap`, after which
/// the caller looks again (a wake-up that could not be rung costs that
/// long, no more); when it holds the call eventfd of a Queued end several
/// processes hold, no longer than `queued::SHARED_SLEEP_CAP`.
pub fn capped(left: Option<Duration>, set: &[libc::pollfd]) -> Option<Duration> {
    use ssock_client::transport::queued;
    let bells = ssock_client::bells::doorbell_fds();
    let cap = if set.is_empty() {
        NOTHING_WATCHED
    } else if set.iter().any(|p| queued::sleep_is_capped(p.fd)) {
        queued::SHARED_SLEEP_CAP
    } else if set.iter().any(|p| p.fd >= 0 && bells.contains(&p.fd)) {
        ssock_client::bells::cap()
    } else {
        return left;
    };
    Some(left.map_or(cap, |l| l.min(cap)))
}

/// A millisecond timeout argument (negative: none).
pub fn ms_timeout(timeout: c_int) -> Option<Duration> {
    u64::try_from(timeout).ok().map(Duration::from_millis)
}

/// When a wait of `t` from now ends (None: never, also for a timeout too
/// large for the clock, which a program may pass to mean "for ever").
pub fn deadline(t: Option<Duration>) -> Option<std::time::Instant> {
    t.and_then(|t| std::time::Instant::now().checked_add(t))
}

/// A timespec timeout argument (Ok(None): null, no timeout); Err for one
/// the kernel refuses with EINVAL (negative, or nanoseconds of a second or
/// more): the caller then hands the call to libc, which says so.
///
/// # Safety
/// `tmo` is null or points to a valid timespec.
pub unsafe fn timespec_timeout(tmo: *const libc::timespec) -> Result<Option<Duration>, ()> {
    // SAFETY: guaranteed by the caller.
    let Some(t) = (unsafe { tmo.as_ref() }) else {
        return Ok(None);
    };
    match (u64::try_from(t.tv_sec), u32::try_from(t.tv_nsec)) {
        (Ok(s), Ok(n)) if n < 1_000_000_000 => Ok(Some(Duration::new(s, n))),
        _ => Err(()),
    }
}
