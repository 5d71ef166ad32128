//! select and pselect translated to poll: when an accelerated socket is
//! among the sets, the sets become a pollfd array for the poll path
//! (`wait`) and its answer becomes the sets again (each fd only in the
//! sets it was asked in; POLLNVAL is EBADF); otherwise libc's select runs
//! the call.
//!
//! Never here: touching the caller's fd_sets beyond `nfds`, or the
//! caller's timeout but as Linux's select does (pselect leaves it).

use crate::boundary::{enter, set_errno};
use crate::{real, sleep, wait};
use libc::c_int;
use std::time::Duration;

/// `nfds` as select looks at it: 0 to FD_SETSIZE.
fn clamped(nfds: c_int) -> c_int {
    nfds.clamp(0, c_int::try_from(libc::FD_SETSIZE).unwrap_or(1024))
}

/// The fds below `nfds` (at most FD_SETSIZE) in any of the sets, each with
/// the poll events its sets ask for.
///
/// # Safety
/// The fd_set pointers are null or the caller's sets, valid for `nfds` fds,
/// for as long as the iterator is used.
unsafe fn wanted(
    nfds: c_int,
    r: *const libc::fd_set,
    w: *const libc::fd_set,
    e: *const libc::fd_set,
) -> impl Iterator<Item = (c_int, i16)> {
    let nfds = clamped(nfds);
    // SAFETY: each set is null or valid for nfds fds (caller).
    let isset =
        move |set: *const libc::fd_set, fd| !set.is_null() && unsafe { libc::FD_ISSET(fd, set) };
    (0..nfds).filter_map(move |fd| {
        let ev = [(r, libc::POLLIN), (w, libc::POLLOUT), (e, libc::POLLPRI)]
            .iter()
            .filter(|(set, _)| isset(*set, fd))
            .fold(0, |ev, (_, bit)| ev | bit);
        (ev != 0).then_some((fd, ev))
    })
}

/// Whether select/pselect on these sets is libc's alone: every fd in them
/// is a kernel fd (`fdstate::kernel_wait`).
///
/// # Safety
/// As `wanted`.
unsafe fn kernel_only(
    nfds: c_int,
    r: *const libc::fd_set,
    w: *const libc::fd_set,
    e: *const libc::fd_set,
) -> bool {
    // SAFETY: the caller's contract is `wanted`'s.
    unsafe { wanted(nfds, r, w, e) }.all(|(fd, _)| crate::fdstate::kernel_wait(fd))
}

/// Runs select/pselect through the poll path when an accelerated socket is
/// among the sets; None: hand the call to libc.
///
/// # Safety
/// The fd_set pointers are null or the caller's sets, valid for `nfds` fds.
unsafe fn select_via_poll(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: Option<Duration>,
    sleep: &dyn Fn(&mut [libc::pollfd], Option<Duration>) -> c_int,
) -> Option<c_int> {
    // SAFETY: the sets are the caller's (this function's contract).
    let mut pfds: Vec<libc::pollfd> = unsafe { wanted(nfds, r, w, e) }
        .map(|(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    let socks = wait::accelerated(&pfds)?;
    let n = wait::poll(&mut pfds, &socks, timeout, true, &sleep::real_poll, sleep);
    if n < 0 {
        return Some(-1);
    }
    if pfds.iter().any(|p| p.revents & libc::POLLNVAL != 0) {
        // As the kernel: EBADF, and the sets as the caller left them.
        set_errno(libc::EBADF);
        return Some(-1);
    }
    // Clear the caller's bits below nfds only: its fd_set may be sized for
    // nfds, not for FD_SETSIZE.
    let nfds = clamped(nfds);
    for set in [r, w, e] {
        if set.is_null() {
            continue;
        }
        for fd in 0..nfds {
            // SAFETY: set is the caller's fd_set, valid for nfds fds.
            unsafe { libc::FD_CLR(fd, set) };
        }
    }
    let mut count = 0;
    for p in &pfds {
        // Only in the sets the fd was asked for (its events say which).
        let asked_r = p.events & libc::POLLIN != 0;
        let asked_w = p.events & libc::POLLOUT != 0;
        let asked_e = p.events & libc::POLLPRI != 0;
        let bits = [
            (
                r,
                asked_r && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0,
            ),
            (
                w,
                asked_w && p.revents & (libc::POLLOUT | libc::POLLERR) != 0,
            ),
            (e, asked_e && p.revents & libc::POLLPRI != 0),
        ];
        for (set, on) in bits {
            if on && !set.is_null() {
                // SAFETY: set is the caller's fd_set and p.fd < nfds <= FD_SETSIZE.
                unsafe { libc::FD_SET(p.fd, set) };
                count += 1;
            }
        }
    }
    Some(count)
}

/// select(2). As Linux's, the timeout is updated to the time not slept
/// when the call goes through the poll path.
///
/// # Safety
/// The C contract of select(2).
pub unsafe fn select(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    tv: *mut libc::timeval,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().select)(nfds, r, w, e, tv) };
    // Only kernel fds: libc's alone, without entering the shim.
    // SAFETY: each set is null or the caller's, valid for nfds fds.
    if unsafe { kernel_only(nfds, r, w, e) } {
        return real();
    }
    enter(
        || {
            // SAFETY: tv is null or the caller's timeval (select(2)).
            let tval = unsafe { tv.as_ref() };
            if tval.is_some_and(|t| t.tv_sec < 0 || t.tv_usec < 0) {
                // EINVAL, from libc, the timeout untouched.
                return real();
            }
            let t = tval.map(|t| {
                Duration::from_secs(t.tv_sec.unsigned_abs())
                    .saturating_add(Duration::from_micros(t.tv_usec.unsigned_abs()))
            });
            let sleep = |set: &mut [libc::pollfd], rem: Option<Duration>| {
                sleep::real_poll(set, sleep::millis(rem))
            };
            let start = std::time::Instant::now();
            // SAFETY: the sets are the caller's (select(2)).
            let Some(n) = (unsafe { select_via_poll(nfds, r, w, e, t, &sleep) }) else {
                return real();
            };
            if let Some(t) = t {
                // SAFETY: tv is the caller's timeval (non-null: `t` is Some).
                if let Some(tv) = unsafe { tv.as_mut() } {
                    let left = t.saturating_sub(start.elapsed());
                    tv.tv_sec = libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX);
                    tv.tv_usec = libc::suseconds_t::from(left.subsec_micros());
                }
            }
            n
        },
        real,
    )
}

/// pselect(2).
///
/// # Safety
/// The C contract of pselect(2).
pub unsafe fn pselect(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    tmo: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().pselect)(nfds, r, w, e, tmo, mask) };
    // Only kernel fds: libc's alone, without entering the shim.
    // SAFETY: each set is null or the caller's, valid for nfds fds.
    if unsafe { kernel_only(nfds, r, w, e) } {
        return real();
    }
    enter(
        || {
            // SAFETY: tmo is null or the caller's timespec (pselect(2)).
            let Ok(t) = (unsafe { sleep::timespec_timeout(tmo) }) else {
                return real();
            };
            let sleep =
                |set: &mut [libc::pollfd], rem: Option<Duration>| sleep::real_ppoll(set, rem, mask);
            // SAFETY: the sets are the caller's (pselect(2)).
            unsafe { select_via_poll(nfds, r, w, e, t, &sleep) }.unwrap_or_else(real)
        },
        real,
    )
}
