//! Which members a wait looks at and arms in a set that parks some: the
//! positions of those not parked, and of parked ones whose kernel socket
//! had an event (`Member::check`), so that a wait's passes cost what its
//! busy members do and not what a thousand parked ones would. Rebuilt
//! when the set marked it stale (`Awake::touch`: a member parked, flagged
//! while parked, added or removed, parking forgotten after fork), or when
//! it held parked members and the process's unpark epoch moved since
//! (`changed`, bumped by every unparking, which may happen where the set
//! is not at hand: a member dropped). Always under the set's lock.
//!
//! Never here: a member that is not parked left out (no wait would see
//! it). The index may name more than it must: each pass checks every
//! member it names as it did before.

use super::Member;
use std::sync::atomic::{AtomicU64, Ordering};

/// Moves at every unparking, in any set of the process: a set that held
/// parked members at its last build builds again (unparkings are rare; a
/// set that parks nothing is not concerned).
static EPOCH: AtomicU64 = AtomicU64::new(1);

/// A member was unparked. (Relaxed: each unparking and each use of a set's
/// index are made under that set's lock, whose release and acquire order
/// them; another set's unparkings only cost this one a rebuild.)
pub(super) fn changed() {
    EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// One set's index of the members its looks must see.
pub(super) struct Awake {
    at: Vec<usize>,
    /// To be built again at its next use (`touch`).
    stale: bool,
    /// The unpark epoch it was built at.
    epoch: u64,
    /// How many members the set had then (a second guard).
    len: usize,
    any_parked: bool,
}

impl Default for Awake {
    fn default() -> Awake {
        Awake {
            at: Vec::new(),
            stale: true,
            epoch: 0,
            len: 0,
            any_parked: false,
        }
    }
}

impl Awake {
    /// The set's members changed (one added or removed, parked, flagged
    /// while parked, or its parking forgotten): built again at next use.
    pub(super) fn touch(&mut self) {
        self.stale = true;
    }

    /// Brought up to date with the set's `members`.
    pub(super) fn update(&mut self, members: &[Member]) {
        let now = EPOCH.load(Ordering::Relaxed);
        if !self.stale && (!self.any_parked || self.epoch == now) && self.len == members.len() {
            return;
        }
        self.stale = false;
        self.epoch = now;
        self.len = members.len();
        self.at.clear();
        self.any_parked = false;
        for (k, m) in members.iter().enumerate() {
            if m.parked.is_none() || m.check {
                self.at.push(k);
            }
            self.any_parked |= m.parked.is_some();
        }
    }

    /// The positions (ascending) of every member that is not parked or
    /// is flagged, and maybe of some others, as of the last `update`.
    pub(super) fn positions(&self) -> &[usize] {
        &self.at
    }

    /// Brought up to date, then the members it names, in order.
    pub(super) fn over<'a>(
        &'a mut self,
        members: &'a [Member],
    ) -> impl Iterator<Item = &'a Member> {
        self.update(members);
        self.at.iter().map(move |&k| &members[k])
    }

    /// Whether some member was parked at the last `update`.
    pub(super) fn any_parked(&self) -> bool {
        self.any_parked
    }
}
