//! The poll entry points: poll, ppoll and their fortified `_chk` forms. A
//! set with no accelerated socket (and no shim epoll instance with
//! members) goes to libc whole; otherwise the poll path (`wait`) runs it,
//! sleeping in libc's poll or ppoll (with the caller's signal mask).
//!
//! Never here: readiness rules or sleeping logic (`wait` has them).

use crate::boundary::{chk_fail, enter, pollfds};
use crate::{real, sleep, wait};
use libc::{c_int, size_t};
use std::time::Duration;

/// poll(2).
///
/// # Safety
/// The C contract of poll(2).
pub unsafe fn poll(fds: *mut libc::pollfd, n: libc::nfds_t, timeout: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().poll)(fds, n, timeout) };
    // Only kernel fds: libc's alone, without entering the shim.
    // SAFETY: fds/n is the caller's pollfd array (poll(2)).
    if crate::fdstate::kernel_poll(unsafe { pollfds(fds, n) }) {
        return real();
    }
    enter(
        || {
            // SAFETY: fds/n is the caller's pollfd array (poll(2)).
            let pfds = unsafe { pollfds(fds, n) };
            let Some(socks) = wait::accelerated(pfds) else {
                return real();
            };
            wait::poll(
                pfds,
                &socks,
                sleep::ms_timeout(timeout),
                true,
                &sleep::real_poll,
                &|set, rem| sleep::real_poll(set, sleep::millis(rem)),
            )
        },
        real,
    )
}

/// __poll_chk: poll(2) from fortified code.
///
/// # Safety
/// The C contract of poll(2); `fdslen` is the array's real size in bytes.
pub unsafe fn __poll_chk(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    timeout: c_int,
    fdslen: size_t,
) -> c_int {
    check_fdslen(n, fdslen);
    // SAFETY: same contract as poll.
    unsafe { poll(fds, n, timeout) }
}

/// __ppoll_chk: ppoll(2) from fortified code.
///
/// # Safety
/// The C contract of ppoll(2); `fdslen` is the array's real size in bytes.
pub unsafe fn __ppoll_chk(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    tmo: *const libc::timespec,
    mask: *const libc::sigset_t,
    fdslen: size_t,
) -> c_int {
    check_fdslen(n, fdslen);
    // SAFETY: same contract as ppoll.
    unsafe { ppoll(fds, n, tmo, mask) }
}

/// ppoll(2).
///
/// # Safety
/// The C contract of ppoll(2).
pub unsafe fn ppoll(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    tmo: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().ppoll)(fds, n, tmo, mask) };
    // Only kernel fds: libc's alone, without entering the shim.
    // SAFETY: fds/n is the caller's pollfd array (poll(2)).
    if crate::fdstate::kernel_poll(unsafe { pollfds(fds, n) }) {
        return real();
    }
    enter(
        || {
            // SAFETY: fds/n is the caller's pollfd array (ppoll(2)).
            let pfds = unsafe { pollfds(fds, n) };
            let Some(socks) = wait::accelerated(pfds) else {
                return real();
            };
            // SAFETY: tmo is null or the caller's timespec (ppoll(2)).
            let Ok(t) = (unsafe { sleep::timespec_timeout(tmo) }) else {
                return real();
            };
            let sleep =
                |set: &mut [libc::pollfd], rem: Option<Duration>| sleep::real_ppoll(set, rem, mask);
            wait::poll(pfds, &socks, t, true, &sleep::real_poll, &sleep)
        },
        real,
    )
}

/// Fortified poll/ppoll: `n` entries must fit in the `fdslen` bytes the
/// compiler knew the array has (glibc aborts otherwise, and so does this).
fn check_fdslen(n: libc::nfds_t, fdslen: size_t) {
    let need = usize::try_from(n)
        .unwrap_or(usize::MAX)
        .saturating_mul(std::mem::size_of::<libc::pollfd>());
    if need > fdslen {
        chk_fail();
    }
}
