//! Doorbells: the socket pairs client processes' sleepers wait on
//! (docs/protocol.md section 3.2). Each session gets one at Welcome (both
//! ends) and a spare, and more when it asks: each thread of the process
//! that sleeps, and each child it forks, takes one as its own; devd keeps
//! only the ringers' ends (the "write ends"), and hands one to
//! the peers of that process's Direct connections with their attachments,
//! and to a session that asks for it by id (`Request::Bell`, when a
//! sleeping peer named one the asker lacks). Of the spares a session was
//! given, the last `SPARES_KEPT` stay known: a forking server's children
//! end without devd seeing it.
//!
//! Never here: who may have a doorbell (the control plane decides), or any
//! wait or wake-up (devd never rings a Direct doorbell).

use super::registry::Fd;
use ssock_rings::sys;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Spares devd keeps per session (older ones are forgotten: their holders
/// keep them, only new peers cannot ask for them).
pub const SPARES_KEPT: usize = 64;

/// A new doorbell: its id, the read end (for its owner only) and the
/// write end (devd keeps a copy).
pub type NewBell = (u32, OwnedFd, Fd);

/// The sessions' doorbells (their write ends) and their ids.
#[derive(Debug, Default)]
pub struct Bells {
    /// Per session: its own doorbell, then the spares it was given.
    by_session: HashMap<u64, VecDeque<(u32, Fd)>>,
    owner: HashMap<u32, (u64, Fd)>,
    next: u32,
}

impl Bells {
    /// Ids start at a random number (`seed`): a client may still hold
    /// doorbells of an earlier devd, whose ids should not name new ones.
    pub fn new(seed: u32) -> Bells {
        Bells {
            next: seed,
            ..Bells::default()
        }
    }

    fn make(&mut self, sid: u64) -> io::Result<NewBell> {
        let (r, w) = sys::doorbell_pair()?;
        let w: Fd = Arc::new(w);
        let id = loop {
            self.next = self.next.wrapping_add(1);
            if self.next != 0 && !self.owner.contains_key(&self.next) {
                break self.next;
            }
        };
        self.owner.insert(id, (sid, w.clone()));
        Ok((id, r, w))
    }

    /// A new doorbell for session `sid`: its own if it has none yet (at
    /// Welcome), else a spare (the oldest spares beyond `SPARES_KEPT` are
    /// forgotten).
    pub fn make_for(&mut self, sid: u64) -> io::Result<NewBell> {
        let made = self.make(sid)?;
        let v = self.by_session.entry(sid).or_default();
        v.push_back((made.0, made.2.clone()));
        if v.len() > 1 + SPARES_KEPT {
            if let Some((old, _)) = v.remove(1) {
                self.owner.remove(&old);
            }
        }
        Ok(made)
    }

    /// Session `sid`'s own doorbell, if it has one.
    pub fn of(&self, sid: u64) -> Option<(u32, Fd)> {
        self.by_session
            .get(&sid)
            .and_then(|v| v.front())
            .map(|(id, fd)| (*id, fd.clone()))
    }

    /// The doorbell (write end) with this id and the session it belongs to.
    pub fn get(&self, id: u32) -> Option<(u64, Fd)> {
        self.owner.get(&id).cloned()
    }

    /// Forgets an ended session's doorbells (their holders keep their fds).
    pub fn forget(&mut self, sid: u64) {
        for (id, _) in self.by_session.remove(&sid).unwrap_or_default() {
            self.owner.remove(&id);
        }
    }

    /// Number of doorbells devd keeps.
    pub fn count(&self) -> usize {
        self.owner.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn one_doorbell_per_session_with_a_unique_nonzero_id_then_spares() {
        let mut b = Bells::new(u32::MAX - 1);
        let (a, _, wa) = b.make_for(1).unwrap();
        assert_eq!(
            b.of(1).map(|(id, w)| (id, w.as_raw_fd())),
            Some((a, wa.as_raw_fd()))
        );
        let (c, _, _) = b.make_for(2).unwrap();
        assert!(
            a != 0 && c != 0 && a != c,
            "ids {a} {c} skip 0 when wrapping"
        );
        assert_eq!(b.get(c).map(|(s, _)| s), Some(2));
        b.forget(2);
        assert!(b.get(c).is_none());
        assert!(b.of(2).is_none());
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn spares_belong_to_their_session_and_the_oldest_are_forgotten() {
        let mut b = Bells::new(0);
        let (own, _, _) = b.make_for(1).unwrap();
        let first = b.make_for(1).unwrap().0;
        for _ in 0..SPARES_KEPT {
            let (id, _, _) = b.make_for(1).unwrap();
            assert_eq!(b.get(id).map(|(s, _)| s), Some(1));
        }
        assert!(b.get(first).is_none(), "the oldest spare is forgotten");
        assert_eq!(b.of(1).map(|(id, _)| id), Some(own), "the own one stays");
        assert_eq!(b.count(), 1 + SPARES_KEPT);
        b.forget(1);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn a_doorbell_rings_through_one_end_and_drains_through_the_other() {
        use std::os::fd::AsFd;
        let mut b = Bells::new(0);
        let (_, r, w) = b.make_for(1).unwrap();
        assert!(!sys::drain_bell(r.as_fd()));
        assert!(sys::ring_bell(w.as_fd()) && sys::ring_bell(w.as_fd()));
        assert!(sys::drain_bell(r.as_fd()));
        assert!(!sys::drain_bell(r.as_fd()));
        // Its owner gone, a ring fails quietly (no SIGPIPE).
        drop(r);
        assert!(!sys::ring_bell(w.as_fd()));
    }
}
