//! `Seen`: the fds (with their poll events) one sleep already watches, so
//! that a doorbell several accelerated sockets share is polled once. The
//! shim builds one per sleep; most hold a handful of fds.
//!
//! Never here: what the fds are, or a call on them.

use libc::c_int;

/// A linear look while there are few (no hash table allocated, nothing
/// hashed per sleep), a hash set beyond.
#[derive(Default)]
pub struct Seen {
    few: Vec<(c_int, i16)>,
    many: Option<std::collections::HashSet<(c_int, i16)>>,
}

impl Seen {
    /// Linear look-ups up to this many.
    const FEW: usize = 16;

    /// Whether `p` is new (and remembers it).
    pub fn insert(&mut self, p: (c_int, i16)) -> bool {
        if let Some(many) = &mut self.many {
            return many.insert(p);
        }
        if self.few.contains(&p) {
            return false;
        }
        self.few.push(p);
        if self.few.len() > Self::FEW {
            self.many = Some(self.few.drain(..).collect());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::Seen;

    #[test]
    fn seen_says_new_once_per_pair_before_and_after_it_turns_to_a_hash_set() {
        let mut s = Seen::default();
        for fd in 0..40 {
            assert!(s.insert((fd, 1)), "{fd} is new");
            assert!(!s.insert((fd, 1)), "{fd} seen");
            assert!(s.insert((fd, 4)), "{fd} with other events is new");
        }
        for fd in 0..40 {
            assert!(!s.insert((fd, 1)) && !s.insert((fd, 4)));
        }
    }
}
