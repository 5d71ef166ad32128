//! Which members a wait looks at and arms in a set that parks some: the
//! positions of those not parked, and of parked ones whose kernel socket
//! had an event (`Member::check`), so that a wait's passes cost what its
//! busy members do and not what a thousand parked ones would. Rebuilt
//! when the process's epoch moved since: every parking and unparking, the
//! flagging of a parked member and every change of a set's members bumps
//! it (`changed`), always under that set's lock.
//!
//! Never here: a member that is not parked left out (no wait would see
//! it). The index may name more than it must: each pass checks every
//! member it names as it did before.

use super::Member;
use std::sync::atomic::{AtomicU64, Ordering};

/// Moves at every change that may add a member to a set's index or shift
/// positions (of any set of the process: a change is rare, a rebuild one
/// pass over one set's members).
static EPOCH: AtomicU64 = AtomicU64::new(1);

/// A member was parked, unparked or flagged while parked, or a set's
/// members changed: every index is built again before its next use.
/// (Relaxed: each change and each use is made under the set's lock, whose
/// release and acquire order them.)
pub(super) fn changed() {
    EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// One set's index of the members its looks must see.
#[derive(Default)]
pub(super) struct Awake {
    at: Vec<usize>,
    /// The epoch it was built at (0: never).
    epoch: u64,
    /// How many members the set had then (a second guard).
    len: usize,
    any_parked: bool,
}

impl Awake {
    /// Brought up to date with the set's `members`.
    pub(super) fn update(&mut self, members: &[Member]) {
        let now = EPOCH.load(Ordering::Relaxed);
        if self.epoch == now && self.len == members.len() {
            return;
        }
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

    /// Whether some member was parked at the last `update`.
    pub(super) fn any_parked(&self) -> bool {
        self.any_parked
    }
}
