//! Eight flags per fd number below [`LIMIT`], in one byte, lock-free and
//! shared by every part of ssock in the process that keeps a mark per fd:
//! `ownfds` (the fds ssock opened) has bit 0 ([`OWN_BIT`]), the Queued
//! transport's calls shared by several processes bit 7
//! ([`SHARED_CALL_BIT`]), the preload shim bits 1 to 6
//! ([`SHIM_BITS`]; `client/preload/src/fdstate.rs` names them). One load
//! ([`of`]) tells everything ssock knows of an fd, so a call on an fd it
//! knows nothing of costs one cache line, not one per set; a [`Flag`] is
//! one of the bits, with the operations of a set of fds.
//!
//! The bytes live eight to a 64-bit word: an update is one atomic
//! read-modify-write of the word (sequentially consistent: a writer that
//! sets a flag after filling a table and a remover that clears it and
//! looks again cannot both miss the other), a look-up one load with
//! acquire ordering, and a scan over a range of fds one load per eight
//! fds. The words of fds 0 to 4095 are static (4 KiB); those of higher
//! fds come in chunks of 4096 fds allocated the first time a flag is set
//! in them. Not one static array for all 2^20 fds: 1 MiB more of the
//! library's zeroed data spread its other statics over more pages, and a
//! ping-pong that sleeps, where each process switch costs the pages it
//! touches again, measured 0.15 us slower per message for it.
//!
//! Never here: what a flag means, or any call on the fds themselves.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// fds at or above this number are not tracked (the usual hard limit of
/// open files is 1,048,576); they are in no set.
pub const LIMIT: usize = 1 << 20;

/// `ownfds`'s bit.
pub const OWN_BIT: u32 = 0;
/// The bits the preload shim uses.
pub const SHIM_BITS: std::ops::RangeInclusive<u32> = 1..=6;
/// The Queued transport's bit: call eventfds several processes sleep on.
pub const SHARED_CALL_BIT: u32 = 7;

/// fds per chunk of words.
const CHUNK: usize = 4096;
/// The words of the first chunk (fd `i` is byte `i % 8` of word `i / 8`).
static FIRST: [AtomicU64; CHUNK / 8] = [const { AtomicU64::new(0) }; CHUNK / 8];
/// The other chunks, each allocated once (never freed) when a flag is
/// first set in it. (Allocating one takes a moment under the `OnceLock`;
/// a fork during it would leave that chunk unusable in the child, so the
/// fds most processes use are in the static one.)
static MORE: [OnceLock<Box<[AtomicU64]>>; LIMIT / CHUNK - 1] =
    [const { OnceLock::new() }; LIMIT / CHUNK - 1];

/// The words of chunk `c`; allocated if `create`, else None if it never
/// was (no fd of it has a flag).
#[inline]
fn chunk(c: usize, create: bool) -> Option<&'static [AtomicU64]> {
    if c == 0 {
        return Some(&FIRST);
    }
    let more = MORE.get(c - 1)?;
    if create {
        Some(more.get_or_init(|| (0..CHUNK / 8).map(|_| AtomicU64::new(0)).collect()))
    } else {
        more.get().map(|b| &**b)
    }
}

/// The word of `fd` (its chunk allocated if `create`) and the shift of its
/// byte in it.
#[inline]
fn at(fd: RawFd, create: bool) -> Option<(&'static AtomicU64, u32)> {
    let i = usize::try_from(fd).ok().filter(|&i| i < LIMIT)?;
    // Below 64 (the conversion cannot fail; the compiler drops it).
    let shift = u32::try_from(i % 8 * 8).unwrap_or(0);
    Some((chunk(i / CHUNK, create)?.get(i % CHUNK / 8)?, shift))
}

/// Every flag of `fd` (0 for an fd out of range): one load.
#[inline]
pub fn of(fd: RawFd) -> u8 {
    at(fd, false).map_or(0, |(w, s)| {
        u8::try_from((w.load(Ordering::Acquire) >> s) & 0xff).unwrap_or(0)
    })
}

/// Clears every flag of `bits` that `fd` has (a load, and an update only
/// if one is set).
#[inline]
pub fn clear(fd: RawFd, bits: u8) {
    if let Some((w, s)) = at(fd, false) {
        let b = u64::from(bits) << s;
        if w.load(Ordering::Acquire) & b != 0 {
            w.fetch_and(!b, Ordering::SeqCst);
        }
    }
}

/// One of the eight flags: a set of fd numbers.
pub struct Flag(u8);

impl Flag {
    /// Bit `bit` (0 to 7) of each fd's byte.
    pub const fn new(bit: u32) -> Self {
        assert!(bit < 8, "an fd has eight flags");
        Self(1 << bit)
    }

    /// This flag's bit in a byte from [`of`].
    #[inline]
    pub const fn bit(&self) -> u8 {
        self.0
    }

    /// Puts `fd` in the set.
    #[inline]
    pub fn insert(&self, fd: RawFd) {
        if let Some((w, s)) = at(fd, true) {
            w.fetch_or(u64::from(self.0) << s, Ordering::SeqCst);
        }
    }

    /// Takes `fd` out of the set.
    #[inline]
    pub fn remove(&self, fd: RawFd) {
        self.take(fd);
    }

    /// Takes `fd` out of the set; whether it was in it.
    #[inline]
    pub fn take(&self, fd: RawFd) -> bool {
        at(fd, false).is_some_and(|(w, s)| {
            let b = u64::from(self.0) << s;
            w.load(Ordering::Acquire) & b != 0 && w.fetch_and(!b, Ordering::SeqCst) & b != 0
        })
    }

    /// Whether `fd` is in the set.
    #[inline]
    pub fn contains(&self, fd: RawFd) -> bool {
        of(fd) & self.0 != 0
    }

    /// The fds of the set from `first` to `last` (both included), in order.
    pub fn within(&self, first: u32, last: u32) -> Vec<RawFd> {
        let mut v = Vec::new();
        let (lo, hi) = (first as usize, (last as usize).min(LIMIT - 1));
        if lo > hi {
            return v;
        }
        // This flag's bit in each of a word's eight bytes.
        let mask = u64::from_ne_bytes([self.0; 8]);
        // Only the chunks that exist: most of a wide range has none.
        for c in lo / CHUNK..=hi / CHUNK {
            let Some(words) = chunk(c, false) else {
                continue;
            };
            for (wi, w) in words.iter().enumerate() {
                let mut word = w.load(Ordering::Acquire) & mask;
                while word != 0 {
                    let fd = c * CHUNK + wi * 8 + word.trailing_zeros() as usize / 8;
                    word &= word - 1;
                    if (lo..=hi).contains(&fd) {
                        v.extend(RawFd::try_from(fd).ok());
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    // Bits 6 and 7 at fds no other test of this crate uses.
    static A: Flag = Flag::new(6);
    static B: Flag = Flag::new(7);

    #[test]
    fn each_flag_is_a_set_of_its_own_and_one_load_shows_them_all() {
        for fd in [80_001, 80_007, 80_008, 80_200] {
            A.insert(fd);
        }
        B.insert(80_007);
        assert!(A.contains(80_007) && B.contains(80_007));
        assert!(!A.contains(80_002) && !B.contains(80_008));
        assert_eq!(of(80_007), A.bit() | B.bit());
        assert_eq!(of(80_008), A.bit());
        assert_eq!(A.within(80_002, 80_199), vec![80_007, 80_008]);
        assert_eq!(B.within(0, u32::MAX), vec![80_007]);
        assert!(A.take(80_007));
        assert!(!A.take(80_007));
        assert!(B.contains(80_007), "taking one flag leaves the others");
        A.remove_within(80_000, 80_100);
        assert_eq!(A.within(0, u32::MAX), vec![80_200]);
        clear(80_007, A.bit() | B.bit());
        A.remove(80_200);
        assert_eq!(of(80_007) | of(80_200), 0);
        A.insert(-1);
        A.insert(RawFd::try_from(LIMIT).unwrap());
        assert!(!A.contains(-1));
        assert_eq!(of(-1), 0);
        assert!(A.within(0, u32::MAX).is_empty());
    }
}
