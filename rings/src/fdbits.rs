//! One bit per fd number below [`LIMIT`], lock-free: a set of fds that a
//! look-up tests with one atomic load, from any thread, in fork handlers
//! and in signal handlers (the Queued transport's fds under a shared call
//! are such a set). Marks that one call looks at together live in
//! [`crate::fdflags`] instead, one byte per fd.
//!
//! Never here: what a bit means, or any call on the fds themselves.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// fds at or above this number are not tracked (the usual hard limit of
/// open files is 1,048,576); they are never in a set.
pub const LIMIT: usize = 1 << 20;

/// A set of fd numbers (128 KiB of zeroed memory, touched only where
/// bits are set).
pub struct FdBits([AtomicU64; LIMIT / 64]);

impl FdBits {
    /// The empty set.
    pub const fn new() -> Self {
        Self([const { AtomicU64::new(0) }; LIMIT / 64])
    }

    fn at(&self, fd: RawFd) -> Option<(&AtomicU64, u64)> {
        let i = usize::try_from(fd).ok().filter(|&i| i < LIMIT)?;
        Some((&self.0[i / 64], 1u64 << (i % 64)))
    }

    /// Puts `fd` in the set.
    pub fn insert(&self, fd: RawFd) {
        if let Some((w, b)) = self.at(fd) {
            w.fetch_or(b, Ordering::Relaxed);
        }
    }

    /// Takes `fd` out of the set.
    pub fn remove(&self, fd: RawFd) {
        if let Some((w, b)) = self.at(fd) {
            if w.load(Ordering::Relaxed) & b != 0 {
                w.fetch_and(!b, Ordering::Relaxed);
            }
        }
    }

    /// Takes `fd` out of the set; whether it was in it.
    pub fn take(&self, fd: RawFd) -> bool {
        self.at(fd).is_some_and(|(w, b)| {
            w.load(Ordering::Relaxed) & b != 0 && w.fetch_and(!b, Ordering::Relaxed) & b != 0
        })
    }

    /// Whether `fd` is in the set.
    pub fn contains(&self, fd: RawFd) -> bool {
        self.at(fd)
            .is_some_and(|(w, b)| w.load(Ordering::Relaxed) & b != 0)
    }

    /// The fds of the set from `first` to `last` (both included), in order.
    pub fn within(&self, first: u32, last: u32) -> Vec<RawFd> {
        let mut v = Vec::new();
        let (lo, hi) = (first as usize, (last as usize).min(LIMIT - 1));
        if lo > hi {
            return v;
        }
        for (wi, w) in self.0.iter().enumerate().take(hi / 64 + 1).skip(lo / 64) {
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

    /// Takes every fd from `first` to `last` (both included) out of the set.
    pub fn remove_within(&self, first: u32, last: u32) {
        for fd in self.within(first, last) {
            self.remove(fd);
        }
    }
}

impl Default for FdBits {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_are_found_in_their_range_and_gone_once_removed() {
        let s = Box::new(FdBits::new());
        for fd in [70_001, 70_063, 70_064, 70_200] {
            s.insert(fd);
        }
        assert!(s.contains(70_063));
        assert!(!s.contains(70_002));
        assert_eq!(s.within(70_002, 70_199), vec![70_063, 70_064]);
        assert!(s.take(70_063));
        assert!(!s.take(70_063));
        s.remove_within(70_000, 70_100);
        assert_eq!(s.within(0, u32::MAX), vec![70_200]);
        s.insert(-1);
        s.insert(RawFd::try_from(LIMIT).unwrap());
        assert!(!s.contains(-1));
        assert_eq!(s.within(0, u32::MAX), vec![70_200]);
    }
}
