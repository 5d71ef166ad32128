//! Each link to each peer node as the backend last said, and which link a
//! connection takes: shared by the engine (which writes the links' states
//! and picks where a connection moves when its link fails) and the control
//! thread (which names a new connection's link and reads the states for
//! the statistics and fail-forward). It only keeps state; it never opens,
//! closes or moves anything.

use ssock_hwbackends::LinkId;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

/// How many of a link's last changes are kept for the statistics.
pub const LINK_HISTORY: usize = 8;

/// One link to a peer node as the backend last said.
#[derive(Debug, Default, Clone)]
pub struct LinkSeen {
    /// Up or not.
    pub up: bool,
    /// How many times it changed.
    pub changes: u64,
    /// Its last `LINK_HISTORY` changes, oldest first: up or not, when,
    /// and how many channels crossed it then.
    pub history: VecDeque<(bool, Instant, usize)>,
}

/// How connections to a peer are put on its links (`[[peer]] link_policy`,
/// docs/config.md): decided by the devd that names the channel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum LinkPolicy {
    /// Every connection on the first link up; another only when it fails.
    #[default]
    ActiveBackup,
    /// Connections dealt in turn over the links that are up.
    Spread,
}

/// The links to every peer node, and how connections go on them.
#[derive(Debug, Default)]
pub struct LinkTable {
    /// Each (node, link) the backend spoke of.
    pub seen: BTreeMap<(u32, LinkId), LinkSeen>,
    /// Nodes whose connections are spread over their links.
    spread: BTreeSet<u32>,
    /// Per spread node, the link given out last.
    last: BTreeMap<u32, LinkId>,
}

/// The table, shared between the engine and the control thread.
pub type Links = std::sync::Arc<std::sync::Mutex<LinkTable>>;

impl LinkTable {
    /// Sets the policy for peer `node`.
    pub fn set_policy(&mut self, node: u32, policy: LinkPolicy) {
        match policy {
            LinkPolicy::Spread => self.spread.insert(node),
            LinkPolicy::ActiveBackup => self.spread.remove(&node),
        };
    }

    /// Whether link `link` to `node` is up.
    pub fn up(&self, node: u32, link: LinkId) -> bool {
        self.seen.get(&(node, link)).is_some_and(|l| l.up)
    }

    /// The link a connection with `node` takes among those `fits` allows
    /// (`0..links`): active-backup the first; spread the next after the
    /// one it gave out last, round the links (so a run of new
    /// connections, or of moves off a failed link, alternates over those
    /// left). None when none fits.
    pub fn choose(
        &mut self,
        node: u32,
        links: usize,
        fits: impl Fn(LinkId) -> bool,
    ) -> Option<LinkId> {
        let n = LinkId::try_from(links).unwrap_or(LinkId::MAX);
        if !self.spread.contains(&node) {
            return (0..n).find(|&l| fits(l));
        }
        let start = self.last.get(&node).map_or(0, |&l| l.wrapping_add(1));
        let pick = (0..n).map(|i| (start + i) % n.max(1)).find(|&l| fits(l))?;
        self.last.insert(node, pick);
        Some(pick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_backup_takes_the_first_that_fits_and_spread_deals_in_turn() {
        let mut t = LinkTable::default();
        let all = |_| true;
        assert_eq!(t.choose(2, 3, all), Some(0));
        assert_eq!(t.choose(2, 3, all), Some(0));
        assert_eq!(t.choose(2, 3, |l| l != 0), Some(1));
        t.set_policy(2, LinkPolicy::Spread);
        let dealt: Vec<_> = (0..7).map(|_| t.choose(2, 3, all).unwrap()).collect();
        assert_eq!(dealt, [0, 1, 2, 0, 1, 2, 0]);
        // A link that does not fit is skipped; the turn goes on from the
        // one given out.
        assert_eq!(t.choose(2, 3, |l| l != 1), Some(2));
        assert_eq!(t.choose(2, 3, |l| l != 1), Some(0));
        assert_eq!(t.choose(2, 3, |_| false), None);
        // Another node keeps its own turn and policy.
        assert_eq!(t.choose(3, 2, all), Some(0));
        assert_eq!(t.choose(3, 2, all), Some(0));
        assert_eq!(t.choose(2, 0, all), None);
        t.set_policy(2, LinkPolicy::ActiveBackup);
        assert_eq!(t.choose(2, 3, all), Some(0));
    }
}
