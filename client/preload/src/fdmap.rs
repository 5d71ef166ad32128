//! `FdMap`: a hash map keyed by fd number with a hash that costs one
//! multiplication (the default SipHash guards against keys an attacker
//! picks; fd numbers are the kernel's, the lowest free one each time).
//!
//! Never here: anything but the map type.

use libc::c_int;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map from fd numbers.
pub type FdMap<V> = HashMap<c_int, V, BuildHasherDefault<FdHash>>;

/// Fibonacci hashing of the one integer a key writes.
#[derive(Default)]
pub struct FdHash(u64);

impl Hasher for FdHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_i32(&mut self, n: i32) {
        // The bit pattern of the fd number (sign extension is not wanted).
        self.0 = u64::from(n.cast_unsigned()).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_map_to_their_values() {
        let mut m: FdMap<u32> = FdMap::default();
        for fd in 0..1000 {
            m.insert(fd, fd.cast_unsigned() * 2);
        }
        assert!((0..1000).all(|fd| m.get(&fd) == Some(&(fd.cast_unsigned() * 2))));
        assert_eq!(m.remove(&7), Some(14));
        assert!(!m.contains_key(&7) && !m.contains_key(&-1));
    }
}
