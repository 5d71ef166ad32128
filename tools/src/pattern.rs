//! Deterministic byte streams for end-to-end verification: byte `i` of the
//! stream with seed `s` is `TABLE_s[i % P]` for a prime period P, so chunk
//! boundaries never line up with the period and misplaced, repeated or
//! lost bytes are detected.

/// Period of the pattern (prime).
pub const PERIOD: usize = 65521;

/// A pattern generator/verifier.
pub struct Pattern {
    table: Vec<u8>,
}

impl Pattern {
    /// The pattern for `seed`.
    pub fn new(seed: u64) -> Pattern {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let table = (0..PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[3]
            })
            .collect();
        Pattern { table }
    }

    /// Fills `buf` with the stream's bytes starting at offset `at`.
    pub fn fill(&self, at: u64, buf: &mut [u8]) {
        let mut i = ssock_rings::idx(at % PERIOD as u64);
        let mut o = 0;
        while o < buf.len() {
            let n = (PERIOD - i).min(buf.len() - o);
            buf[o..o + n].copy_from_slice(&self.table[i..i + n]);
            o += n;
            i = 0;
        }
    }

    /// Whether `buf` equals the stream's bytes at offset `at`.
    pub fn check(&self, at: u64, buf: &[u8]) -> bool {
        let mut i = ssock_rings::idx(at % PERIOD as u64);
        let mut o = 0;
        while o < buf.len() {
            let n = (PERIOD - i).min(buf.len() - o);
            if buf[o..o + n] != self.table[i..i + n] {
                return false;
            }
            o += n;
            i = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_at_odd_offsets_and_detects_a_flip() {
        let p = Pattern::new(1);
        let mut b = vec![0u8; 200_000];
        p.fill(12345, &mut b);
        assert!(p.check(12345, &b));
        assert!(!p.check(12346, &b));
        b[150_000] ^= 1;
        assert!(!p.check(12345, &b));
        assert!(!Pattern::new(2).check(0, &{
            let mut c = vec![0u8; 64];
            p.fill(0, &mut c);
            c
        }));
    }
}
