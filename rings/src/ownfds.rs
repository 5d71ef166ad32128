//! Which fds ssock itself opened in this process (the devd session, the
//! shim's log, doorbells, regions): the preload shim keeps them out of the
//! application's reach. A program that closes every fd it does not know
//! (`close_range`, `closefrom`, a close loop: ssh and many daemons do)
//! would otherwise close them, and the next fd it opens would get the
//! number while ssock still writes to it.
//!
//! One bit per fd number below [`LIMIT`], set when an fd is created or
//! received through [`crate::sys`] and cleared when ssock closes it (the
//! shim's `close` sees its own calls). Lock-free: the bits are atomics, so
//! a look-up costs one load and may run in any thread, in fork handlers
//! and in signal handlers.
//!
//! Never here: closing, duplicating or moving an fd (see
//! [`crate::sys::move_high`]).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// fds at or above this number are not tracked (the usual hard limit of
/// open files is 1,048,576).
pub const LIMIT: usize = 1 << 20;

static BITS: [AtomicU64; LIMIT / 64] = [const { AtomicU64::new(0) }; LIMIT / 64];

fn at(fd: RawFd) -> Option<(&'static AtomicU64, u64)> {
    let i = usize::try_from(fd).ok().filter(|&i| i < LIMIT)?;
    Some((&BITS[i / 64], 1u64 << (i % 64)))
}

/// `fd` is ssock's from now on.
pub fn own(fd: RawFd) {
    if let Some((w, b)) = at(fd) {
        w.fetch_or(b, Ordering::Relaxed);
    }
}

/// `fd` is no longer ssock's (it is being closed, or was taken over).
pub fn disown(fd: RawFd) {
    if let Some((w, b)) = at(fd) {
        w.fetch_and(!b, Ordering::Relaxed);
    }
}

/// Whether `fd` is ssock's.
pub fn owned(fd: RawFd) -> bool {
    at(fd).is_some_and(|(w, b)| w.load(Ordering::Relaxed) & b != 0)
}

/// ssock's fds from `first` to `last` (both included), in order.
pub fn owned_in(first: u32, last: u32) -> Vec<RawFd> {
    let mut v = Vec::new();
    let (lo, hi) = (first as usize, (last as usize).min(LIMIT - 1));
    if lo > hi {
        return v;
    }
    for (wi, w) in BITS.iter().enumerate().take(hi / 64 + 1).skip(lo / 64) {
        let mut word = w.load(Ordering::Relaxed);
        while word != 0 {
            let bit = word.trailing_zeros() as usize;
            word &= word - 1;
            let fd = wi * 64 + bit;
            if (lo..=hi).contains(&fd) {
                v.extend(RawFd::try_from(fd).ok());
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_fds_are_found_in_their_range_and_forgotten_when_disowned() {
        for fd in [70_001, 70_063, 70_064, 70_200] {
            own(fd);
        }
        assert!(owned(70_063));
        assert!(!owned(70_002));
        assert_eq!(owned_in(70_002, 70_199), vec![70_063, 70_064]);
        assert_eq!(
            owned_in(70_000, 70_300),
            vec![70_001, 70_063, 70_064, 70_200]
        );
        for fd in [70_001, 70_063, 70_064, 70_200] {
            disown(fd);
        }
        assert!(owned_in(70_000, 70_300).is_empty());
        own(-1);
        own(RawFd::try_from(LIMIT).unwrap());
        assert!(!owned(-1));
    }
}
