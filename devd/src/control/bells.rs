//! Doorbells: the datagram sockets client processes' sleepers wait on
//! (docs/protocol.md section 3.2). Each session gets one at Welcome (its
//! owner's end, bound to an abstract address, and a ringers' end) and a
//! spare, and more when it asks: each thread of the process that sleeps,
//! and each child it forks, takes one as its own; devd keeps only each
//! one's address, and hands a new ringers' end (a socket of its own,
//! connected to the doorbell) to
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

/// A new doorbell: its id, the owner's end and a ringers' end for it.
pub type NewBell = (u32, OwnedFd, Fd);

/// The sessions' doorbells (their addresses) and their ids.
#[derive(Debug, Default)]
pub struct Bells {
    /// Per session: its own doorbell, then the spares it was given.
    by_session: HashMap<u64, VecDeque<(u32, sys::BellName)>>,
    owner: HashMap<u32, (u64, sys::BellName)>,
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
        let (r, name) = sys::doorbell_owner()?;
        let w: Fd = Arc::new(sys::doorbell_ringer(&name)?);
        let id = loop {
            self.next = self.next.wrapping_add(1);
            if self.next != 0 && !self.owner.contains_key(&self.next) {
                break self.next;
            }
        };
        self.owner.insert(id, (sid, name));
        Ok((id, r, w))
    }

    /// A new doorbell for session `sid`: its own if it has none yet (at
    /// Welcome), else a spare (the oldest spares beyond `SPARES_KEPT` are
    /// forgotten).
    pub fn make_for(&mut self, sid: u64) -> io::Result<NewBell> {
        let made = self.make(sid)?;
        let name = self.owner[&made.0].1;
        let v = self.by_session.entry(sid).or_default();
        v.push_back((made.0, name));
        if v.len() > 1 + SPARES_KEPT {
            if let Some((old, _)) = v.remove(1) {
                self.owner.remove(&old);
            }
        }
        Ok(made)
    }

    /// A new ringers' end of doorbell `id` if session `sid` owns it and
    /// its owner still holds it (see `get`: one whose owner closed it is
    /// forgotten).
    pub fn ringer(&mut self, id: u32, sid: u64) -> Option<(u32, Fd)> {
        if self.owner.get(&id).is_none_or(|(s, _)| *s != sid) {
            return None;
        }
        self.get(id).map(|(_, w)| (id, w))
    }

    /// Whether session `sid` has its own (common) doorbell.
    pub fn has(&self, sid: u64) -> bool {
        self.by_session.get(&sid).is_some_and(|v| !v.is_empty())
    }

    /// The id of session `sid`'s own (common) doorbell.
    pub fn common_id(&self, sid: u64) -> Option<u32> {
        Some(self.by_session.get(&sid)?.front()?.0)
    }

    /// A new ringers' end of session `sid`'s own (common) doorbell, if it
    /// has one and its owner still holds it (a session that is not its
    /// process's first closes the one it was given).
    pub fn of(&self, sid: u64) -> Option<(u32, Fd)> {
        let (id, name) = self.by_session.get(&sid)?.front()?;
        let w = sys::doorbell_ringer(name)
            .map_err(|e| log::debug!("doorbell {id}: no ringers' end: {e}"))
            .ok()?;
        Some((*id, Arc::new(w)))
    }

    /// The session the doorbell with this id belongs to, and a new
    /// ringers' end of it. A doorbell whose owner closed it is forgotten:
    /// its address is free, and whoever binds it next must not receive
    /// the rings meant for it.
    pub fn get(&mut self, id: u32) -> Option<(u64, Fd)> {
        let (sid, name) = self.owner.get(&id)?;
        match sys::doorbell_ringer(name) {
            Ok(w) => Some((*sid, Arc::new(w))),
            Err(e) => {
                log::debug!("doorbell {id}: no ringers' end ({e}); forgotten");
                if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                    let sid = *sid;
                    self.owner.remove(&id);
                    if let Some(v) = self.by_session.get_mut(&sid) {
                        // The session's own stays first (`of` says it is gone).
                        if let Some(i) = v.iter().skip(1).position(|(b, _)| *b == id) {
                            v.remove(i + 1);
                        }
                    }
                }
                None
            }
        }
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
        let (a, _own_a, wa) = b.make_for(1).unwrap();
        // Every ringer gets a socket of its own.
        let (id, w) = b.of(1).unwrap();
        assert_eq!(id, a);
        assert_ne!(w.as_raw_fd(), wa.as_raw_fd());
        let (c, _own_c, _) = b.make_for(2).unwrap();
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
        // The owners' ends stay open (a doorbell without one has no
        // address to connect a ringer to).
        let mut owners = Vec::new();
        let (own, o, _) = b.make_for(1).unwrap();
        owners.push(o);
        let (first, o, _) = b.make_for(1).unwrap();
        owners.push(o);
        for _ in 0..SPARES_KEPT {
            let (id, o, _) = b.make_for(1).unwrap();
            owners.push(o);
            assert_eq!(b.get(id).map(|(s, _)| s), Some(1));
        }
        assert!(b.get(first).is_none(), "the oldest spare is forgotten");
        assert_eq!(b.of(1).map(|(id, _)| id), Some(own), "the own one stays");
        assert_eq!(b.count(), 1 + SPARES_KEPT);
        b.forget(1);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn a_doorbell_its_owner_closed_is_forgotten_so_its_address_reaches_nobody() {
        let mut b = Bells::new(0);
        let (own, _own_end, _) = b.make_for(1).unwrap();
        let (spare, spare_end, _) = b.make_for(1).unwrap();
        assert!(b.get(spare).is_some());
        drop(spare_end);
        assert!(b.get(spare).is_none());
        // Forgotten: a socket bound to the freed address later gets no
        // ringer from devd.
        assert_eq!(b.count(), 1);
        assert!(!b.owner.contains_key(&spare));
        assert_eq!((b.has(1), b.common_id(1)), (true, Some(own)));
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
