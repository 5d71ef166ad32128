//! The calls on fd numbers: close, close_range and closefrom, with the
//! shim's own fds kept out of their reach, and dup, dup2, dup3 (a
//! duplicate names the same accelerated socket or epoll instance). A
//! program that closes every fd it does not know
//! (`close_range`, `closefrom`, a loop of `close`: sshd and many daemons)
//! must not close the devd session, the log or a connection's doorbells:
//! those fds stay open and the call reports success, as if the program
//! had never had them (it never did). Sockets, listeners and epoll
//! instances the shim tracks are let go of as on `close`.
//!
//! Never here: closing an fd of ssock's on the application's behalf.

use crate::boundary::{self, borrow, enter};
use crate::sock::{self, lock};
use crate::{epoll, known, real, table};
use libc::{c_int, c_uint};
use ssock_rings::ownfds;

/// close(2) from the application: `real` closes `fd`.
pub fn close_app(fd: c_int, real: &dyn Fn() -> c_int) -> c_int {
    if ownfds::owned(fd) {
        return 0;
    }
    let_go(fd);
    known::forget(fd);
    real()
}

/// close(2) from ssock itself (the shim's own code, through libc).
pub fn close_own(fd: c_int, real: &dyn Fn() -> c_int) -> c_int {
    ownfds::disown(fd);
    known::forget(fd);
    real()
}

/// The shim's part of closing `fd`, which is still open: a registered
/// listener is unregistered, an epoll instance or member forgotten, and
/// the last fd of an accelerated socket in this process ends its
/// transport.
fn let_go(fd: c_int) {
    // SAFETY: fd is still open: the caller closes it after this.
    let_go_through(fd, unsafe { borrow(fd) });
}

/// `let_go` of number `fd`, whose socket is reached through `sock` (`fd`
/// itself, or a duplicate of it when the number is about to name another
/// file).
fn let_go_through(fd: c_int, sock: std::os::fd::BorrowedFd<'_>) {
    if table::remove_listener(fd) {
        sock::unlisten(sock);
    }
    // Out of the epoll sets first: they hold references too.
    epoll::closed(fd);
    if let Some(s) = table::remove(fd) {
        if std::sync::Arc::strong_count(&s) == 1 {
            // The last fd of this socket in this process.
            lock(&s).closing(sock);
        }
    }
}

/// close_range(2) from the application: `real(first, last, flags)` is
/// the kernel's. The shim's own fds in the range are skipped (the range is
/// split around them); each fd the shim tracks is let go of first, then
/// closed with the rest. With CLOSE_RANGE_CLOEXEC nothing closes: the
/// shim's fds (close-on-exec already) are skipped all the same.
pub fn close_range_app(
    first: c_uint,
    last: c_uint,
    flags: c_int,
    real: &dyn Fn(c_uint, c_uint, c_int) -> c_int,
) -> c_int {
    if first > last {
        return real(first, last, flags);
    }
    let cloexec = flags & libc::CLOSE_RANGE_CLOEXEC as c_int != 0;
    let skip = ownfds::owned_in(first, last);
    if !cloexec {
        for fd in tracked_in(first, last) {
            if !skip.contains(&fd) {
                let_go(fd);
            }
        }
        known::forget_within(first, last);
    }
    // u64: the range may end at c_uint::MAX, and a skipped fd's next one
    // must not wrap.
    let mut from = u64::from(first);
    let mut result = 0;
    for fd in skip.iter().filter_map(|&fd| u64::try_from(fd).ok()) {
        if fd > from && part(from, fd - 1, flags, real) != 0 {
            result = -1;
        }
        from = fd + 1;
    }
    if from <= u64::from(last) && part(from, u64::from(last), flags, real) != 0 {
        result = -1;
    }
    result
}

/// `real` on the part from `a` to `b` of a range checked to fit c_uint.
fn part(a: u64, b: u64, flags: c_int, real: &dyn Fn(c_uint, c_uint, c_int) -> c_int) -> c_int {
    match (c_uint::try_from(a), c_uint::try_from(b)) {
        (Ok(a), Ok(b)) => real(a, b, flags),
        _ => 0,
    }
}

/// The fds from `first` to `last` the shim tracks: accelerated sockets,
/// registered listeners, epoll instances.
fn tracked_in(first: c_uint, last: c_uint) -> Vec<c_int> {
    let in_range = |fd: &c_int| c_uint::try_from(*fd).is_ok_and(|u| (first..=last).contains(&u));
    let mut v: Vec<c_int> = table::fds()
        .into_iter()
        .chain(table::listeners())
        .chain(epoll::instances())
        .chain(epoll::registered_within(first, last))
        .filter(in_range)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// close_range(2) or closefrom(3) made by ssock itself, or re-entering
/// from a signal handler while the thread was in the shim: the fds it
/// closes are no longer ssock's.
pub fn close_range_own(
    first: c_uint,
    last: c_uint,
    flags: c_int,
    real: &dyn Fn(c_uint, c_uint, c_int) -> c_int,
) -> c_int {
    let r = real(first, last, flags);
    if r == 0 && flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
        for fd in ownfds::owned_in(first, last) {
            ownfds::disown(fd);
        }
        known::forget_within(first, last);
    }
    r
}

/// After the application duplicated an fd onto `new` (dup2, dup3, F_DUPFD...): if `new` was
/// one of the shim's fds, the program's call won (it cannot know the
/// number was taken), and the shim's object there is lost to it. Said in
/// the log.
fn duplicated_onto(new: c_int) {
    if ownfds::owned(new) {
        ownfds::disown(new);
        log::warn!("the program duplicated an fd onto {new}, one of ssock's: ssock lost it");
    }
}

/// After a successful dup onto `new`: `new` names `old`'s socket, or, if
/// `old` is not accelerated, no longer names the socket it may have named.
/// What `new` named before was closed by the kernel: it leaves the epoll
/// sets and the listeners as on close (its registrations went with its
/// file), and its socket, once its last reference here is gone, ends its
/// transport (its kernel socket is closed already: nothing owed is sent).
pub fn duplicated(old: c_int, new: c_int) -> c_int {
    if new >= 0 && new != old {
        duplicated_onto(new);
        // Two numbers for one socket now: a connect through either makes
        // a `fresh` mark on the other wrong.
        known::forget(new);
        known::forget(old);
        // (A listener nobody holds any more is found by devd itself.)
        table::remove_listener(new);
        epoll::closed(new);
        match table::get(old) {
            Some(_) => table::duplicate(old, new),
            None => drop(table::remove(new)),
        }
        epoll::duplicated(old, new);
        crate::stdio::check(new);
    }
    new
}

/// dup(2).
///
/// # Safety
/// The C contract of dup(2).
pub unsafe fn dup(fd: c_int) -> c_int {
    // SAFETY: forwarding the caller's own argument to libc.
    let real = || unsafe { (real::get().dup)(fd) };
    enter(|| duplicated(fd, real()), real)
}

/// A dup onto `new` (`real` is the kernel's dup2 or dup3 of `old`). When
/// it closes an accelerated socket that `old` does not name, that socket
/// is let go of as on close (what it still owes is sent; SO_LINGER 0
/// resets it): through a duplicate the shim holds across the dup, only if
/// the dup succeeded; with no fd left for one (EMFILE), through `new`
/// itself before the dup, if the dup can succeed (`old` is open).
fn dup_onto(old: c_int, new: c_int, real: &dyn Fn() -> c_int) -> c_int {
    let caller_errno = boundary::errno();
    let held = needs_hold(old, new)
        .then(|| {
            // SAFETY: new names an open socket (the table says so); only
            // duplicated, above the numbers a program dup2s onto itself.
            let h = ssock_rings::sys::dup_cloexec(unsafe { borrow(new) });
            let h = h.map(ssock_rings::sys::move_high);
            if h.is_err() && old >= 0 {
                // SAFETY: old is an fd number the application passed, only
                // asked about.
                let old_open = ssock_rings::sys::get_nonblocking(unsafe { borrow(old) }).is_ok();
                if old_open {
                    let_go(new);
                }
            }
            h.ok()
        })
        .flatten();
    if new >= 0 && new != old {
        epoll::unwatch(new);
    }
    // As the program left it: the shim's own calls failing (EMFILE) are not
    // the dup's.
    boundary::set_errno(caller_errno);
    let r = real();
    if let (Some(h), true) = (held, r >= 0) {
        let_go_through(new, std::os::fd::AsFd::as_fd(&h));
    }
    duplicated(old, r)
}

/// Whether a dup onto `new` closes an accelerated socket that `old` does
/// not also name.
fn needs_hold(old: c_int, new: c_int) -> bool {
    new >= 0
        && new != old
        && table::get(new).is_some_and(|s| {
            old < 0 || !table::get(old).is_some_and(|o| std::sync::Arc::ptr_eq(&o, &s))
        })
}

/// dup2(2).
///
/// # Safety
/// The C contract of dup2(2).
pub unsafe fn dup2(fd: c_int, new: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().dup2)(fd, new) };
    enter(|| dup_onto(fd, new, &real), real)
}

/// dup3(2).
///
/// # Safety
/// The C contract of dup3(2).
pub unsafe fn dup3(fd: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().dup3)(fd, new, flags) };
    enter(|| dup_onto(fd, new, &real), real)
}

/// close(2): an accelerated socket first ends its transport (end-of-stream
/// mark, release), then the kernel socket closes.
///
/// # Safety
/// The C contract of close(2).
pub unsafe fn close(fd: c_int) -> c_int {
    // SAFETY: forwarding the caller's own argument to libc.
    let real = || unsafe { (real::get().close)(fd) };
    if crate::fdstate::plain_close(fd) {
        // Nothing of the shim's but what `known` says (and close_app and
        // close_own do the same then): without entering the shim.
        crate::known::forget(fd);
        return real();
    }
    enter(|| close_app(fd, &real), || close_own(fd, &real))
}

/// close_range(2): the shim's own fds stay open (see `fds`).
///
/// # Safety
/// The C contract of close_range(2).
pub unsafe fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's arguments (or a part of its range) to libc.
    let real = |a, b, f| unsafe { real::close_range(a, b, f) };
    enter(
        || close_range_app(first, last, flags, &real),
        || close_range_own(first, last, flags, &real),
    )
}

/// closefrom(3): close_range(lowfd, ~0U, 0), the shim's own fds staying open.
///
/// # Safety
/// The C contract of closefrom(3).
pub unsafe fn closefrom(lowfd: c_int) {
    let first = c_uint::try_from(lowfd).unwrap_or(0);
    // SAFETY: forwarding a part of the caller's range to libc.
    let real = |a, b, f| unsafe { real::close_range(a, b, f) };
    enter(
        || close_range_app(first, c_uint::MAX, 0, &real),
        || close_range_own(first, c_uint::MAX, 0, &real),
    );
}
