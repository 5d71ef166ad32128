//! The epoll entry points: epoll_create and epoll_create1 (the instance
//! recorded), epoll_ctl (`epoll::ctl`), and the wait family's glue: the
//! caller's arguments checked and turned into a slice and a timeout, the
//! kernel's own wait and the sleep (with the caller's signal mask) passed
//! to `epoll::wait` or `epoll::wait_direct`; an instance the shim does not
//! track goes to libc.
//!
//! Never here: epoll semantics (readiness, edge and one-shot rules,
//! registrations: `epoll`).

use crate::boundary::enter;
use crate::dispatch::fail;
use crate::{epoll, known, real, sleep};
use libc::c_int;
use std::time::Duration;

/// epoll_create(2).
///
/// # Safety
/// The C contract of epoll_create(2).
pub unsafe fn epoll_create(size: c_int) -> c_int {
    // SAFETY: forwarding the caller's own argument to libc.
    let real = || unsafe { (real::get().epoll_create)(size) };
    enter(
        || {
            let r = real();
            known::forget(r);
            epoll::created(r);
            r
        },
        real,
    )
}

/// epoll_create1(2).
///
/// # Safety
/// The C contract of epoll_create1(2).
pub unsafe fn epoll_create1(flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's own argument to libc.
    let real = || unsafe { (real::get().epoll_create1)(flags) };
    enter(
        || {
            let r = real();
            known::forget(r);
            epoll::created(r);
            r
        },
        real,
    )
}

/// epoll_ctl(2): accelerated sockets and nested shim instances are kept by
/// the shim, everything else by the kernel.
///
/// # Safety
/// The C contract of epoll_ctl(2).
pub unsafe fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut libc::epoll_event) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().epoll_ctl)(epfd, op, fd, ev) };
    // A socket left to the kernel for good, in no instance the shim
    // tracks (and not an instance itself, whatever a stale flag says): the
    // kernel's registration is all there is (`epoll::ctl`).
    if crate::fdstate::kernel_member(fd) {
        return real();
    }
    enter(
        || match epoll::ctl(epfd, op, fd, ev, &real) {
            Ok(r) => r,
            Err(e) => fail(e),
        },
        real,
    )
}

/// The shared part of the epoll_wait family: Some(result) if `epfd` has
/// shim members, None to hand the call to libc.
///
/// # Safety
/// `events`/`max` are the caller's epoll_wait(2) arguments.
unsafe fn epoll_wait_via_shim(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: Option<Duration>,
    kernel_wait: &dyn Fn(&mut [libc::epoll_event], Option<Duration>) -> c_int,
    sleep: &dyn Fn(&mut [libc::pollfd], Option<Duration>) -> c_int,
) -> Option<c_int> {
    let set = epoll::get(epfd)?;
    let Ok(n) = usize::try_from(max) else {
        return Some(fail(libc::EINVAL));
    };
    if n == 0 {
        return Some(fail(libc::EINVAL));
    }
    if events.is_null() {
        return Some(fail(libc::EFAULT));
    }
    // SAFETY: the caller's array of `max` epoll_event (epoll_wait(2)).
    let out = unsafe { std::slice::from_raw_parts_mut(events, n) };
    if set.has_members() {
        Some(epoll::wait(epfd, &set, out, timeout, sleep))
    } else {
        Some(epoll::wait_direct(
            epfd,
            &set,
            out,
            timeout,
            kernel_wait,
            sleep,
        ))
    }
}

/// epoll_wait(2).
///
/// # Safety
/// The C contract of epoll_wait(2).
pub unsafe fn epoll_wait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().epoll_wait)(epfd, events, max, timeout) };
    enter(
        || {
            let sleep = |set: &mut [libc::pollfd], rem: Option<Duration>| {
                sleep::real_poll(set, sleep::millis(rem))
            };
            let kernel = |out: &mut [libc::epoll_event], rem: Option<Duration>| {
                let n = c_int::try_from(out.len()).unwrap_or(c_int::MAX);
                // SAFETY: out is the caller's event array (at most its max).
                unsafe { (real::get().epoll_wait)(epfd, out.as_mut_ptr(), n, sleep::millis(rem)) }
            };
            // SAFETY: the caller's epoll_wait arguments.
            unsafe {
                epoll_wait_via_shim(
                    epfd,
                    events,
                    max,
                    sleep::ms_timeout(timeout),
                    &kernel,
                    &sleep,
                )
            }
            .unwrap_or_else(real)
        },
        real,
    )
}

/// epoll_pwait(2).
///
/// # Safety
/// The C contract of epoll_pwait(2).
pub unsafe fn epoll_pwait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    mask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().epoll_pwait)(epfd, events, max, timeout, mask) };
    enter(
        || {
            let sleep =
                |set: &mut [libc::pollfd], rem: Option<Duration>| sleep::real_ppoll(set, rem, mask);
            let kernel = |out: &mut [libc::epoll_event], rem: Option<Duration>| {
                let n = c_int::try_from(out.len()).unwrap_or(c_int::MAX);
                let ms = sleep::millis(rem);
                // SAFETY: out is the caller's event array (at most its max);
                // mask is the caller's.
                unsafe { (real::get().epoll_pwait)(epfd, out.as_mut_ptr(), n, ms, mask) }
            };
            // SAFETY: the caller's epoll_pwait arguments.
            unsafe {
                epoll_wait_via_shim(
                    epfd,
                    events,
                    max,
                    sleep::ms_timeout(timeout),
                    &kernel,
                    &sleep,
                )
            }
            .unwrap_or_else(real)
        },
        real,
    )
}

/// epoll_pwait2(2).
///
/// # Safety
/// The C contract of epoll_pwait2(2).
pub unsafe fn epoll_pwait2(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    tmo: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    let real = || match real::get().epoll_pwait2 {
        // SAFETY: forwarding the caller's own arguments to libc.
        Some(f) => unsafe { f(epfd, events, max, tmo, mask) },
        None => fail(libc::ENOSYS),
    };
    enter(
        || {
            // SAFETY: tmo is null or the caller's timespec (epoll_pwait2(2)).
            let Ok(t) = (unsafe { sleep::timespec_timeout(tmo) }) else {
                return real();
            };
            let sleep =
                |set: &mut [libc::pollfd], rem: Option<Duration>| sleep::real_ppoll(set, rem, mask);
            let kernel = |out: &mut [libc::epoll_event], rem: Option<Duration>| {
                let n = c_int::try_from(out.len()).unwrap_or(c_int::MAX);
                let ts = rem.map(sleep::timespec);
                let tp = ts
                    .as_ref()
                    .map_or(std::ptr::null(), |t| t as *const libc::timespec);
                match real::get().epoll_pwait2 {
                    // SAFETY: out is the caller's event array (at most its
                    // max); tp is null or a timespec alive for the call;
                    // mask is the caller's.
                    Some(f) => unsafe { f(epfd, out.as_mut_ptr(), n, tp, mask) },
                    None => fail(libc::ENOSYS),
                }
            };
            // SAFETY: the caller's epoll_pwait2 arguments.
            unsafe { epoll_wait_via_shim(epfd, events, max, t, &kernel, &sleep) }
                .unwrap_or_else(real)
        },
        real,
    )
}
