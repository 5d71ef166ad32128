//! Dispatch: the fd looked up in the socket table, then the accelerated
//! path or libc's. A socket whose negotiation ended on kernel TCP
//! (`Outcome::Kernel`) is forgotten and the call goes to libc on the same
//! fd; an errno becomes -1 with errno set, as libc's would.
//!
//! Never here: interpreting a call's arguments, waiting, or deciding
//! anything about a socket (that is `sock`'s and `io`'s).

use crate::boundary::set_errno;
use crate::outcome::Outcome;
use crate::sock::Entry;
use crate::table;
use libc::{c_int, ssize_t};

/// -1 with errno `e`, as a failing libc call returns.
pub fn fail<T: From<i8>>(e: i32) -> T {
    set_errno(e);
    T::from(-1)
}

/// Runs `accel` on `fd`'s accelerated socket, or `real` if it has none or
/// its negotiation ended on kernel TCP (then the fd is forgotten first).
pub fn dispatch<R: From<i8>>(
    fd: c_int,
    accel: impl FnOnce(&Entry) -> Outcome<R>,
    real: impl FnOnce() -> R,
) -> R {
    let Some(s) = table::get(fd) else {
        return real();
    };
    match accel(&s) {
        Outcome::Done(r) => r,
        Outcome::Kernel => {
            table::forget_kernel(fd, &s);
            real()
        }
        Outcome::Errno(e) => fail(e),
    }
}

/// `dispatch` for calls returning a byte count.
pub fn dispatch_n(
    fd: c_int,
    accel: impl FnOnce(&Entry) -> Outcome<usize>,
    real: impl FnOnce() -> ssize_t,
) -> ssize_t {
    dispatch(
        fd,
        |s| accel(s).map(|n| ssize_t::try_from(n).unwrap_or(ssize_t::MAX)),
        real,
    )
}
