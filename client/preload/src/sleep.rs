//! The kernel's own waits, which the shim sleeps in: libc's poll (the real
//! one, not the shim's) over a Rust slice, and timeouts converted between
//! the C arguments and `Duration`.
//!
//! Never here: accelerated sockets, spinning, or any decision about what
//! to wait for.

use libc::c_int;
use std::time::Duration;

/// libc's poll over a Rust slice.
pub fn real_poll(set: &mut [libc::pollfd], timeout_ms: c_int) -> c_int {
    let n = libc::nfds_t::try_from(set.len()).unwrap_or(0);
    // SAFETY: set is a valid, exclusively borrowed pollfd array of n entries.
    unsafe { (crate::real::get().poll)(set.as_mut_ptr(), n, timeout_ms) }
}

/// A remaining wait as poll's millisecond timeout (rounded up; -1: forever).
pub fn millis(d: Option<Duration>) -> c_int {
    match d {
        None => -1,
        Some(d) => c_int::try_from(d.as_micros().div_ceil(1000)).unwrap_or(c_int::MAX),
    }
}
