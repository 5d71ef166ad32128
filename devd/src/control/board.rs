//! The listener board devd publishes to its clients (`ssock_rings::board`:
//! the registered listeners, and until when each one's connections stay on
//! kernel TCP), and the `short_lived` policy that decides the latter from
//! how long the listener's accelerated connections lived.
//!
//! Never here: a decision that pairs a connection (the board only lets
//! clients skip asking; devd still answers whatever they ask), or a write
//! to the board outside [`Board::publish`].

use super::registry::{Fd, Listener};
use crate::config::Policy;
use ssock_rings::board::{self, Entry, BOARD_SIZE};
use ssock_rings::shm::Mapping;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

/// A connection that carried this many bytes or more was worth its setup,
/// however short it lived.
pub const SHORT_LIVED_BYTES: u64 = 1 << 20;

/// The board: devd's writable mapping of it, the read-only fd every
/// Welcome carries, and what was last published (to write only changes).
pub struct Board {
    map: Option<(Mapping, Fd)>,
    last: Vec<Entry>,
}

impl Default for Board {
    fn default() -> Board {
        Board::new()
    }
}

impl Board {
    /// A fresh, empty board; without one (memfd or mapping refused),
    /// clients ask devd about every connection, as before the board.
    pub fn new() -> Board {
        let made = (|| -> std::io::Result<(Mapping, Fd)> {
            let fd = ssock_rings::sys::memfd_unsealed("board", BOARD_SIZE)?;
            let map = Mapping::map(fd.as_fd(), BOARD_SIZE, true)?;
            board::init(&map);
            ssock_rings::sys::seal_read_only(fd.as_fd())?;
            Ok((map, Arc::new(fd)))
        })();
        Board {
            map: made
                .map_err(|e| {
                    log::warn!("no listener board ({e}): clients ask about every connection")
                })
                .ok(),
            last: Vec::new(),
        }
    }

    /// devd is alive: renews the board's deadline (`board::ALIVE_FOR`).
    pub fn beat(&self) {
        if let Some((map, _)) = &self.map {
            board::beat(map, board::now_ns());
        }
    }

    /// The fd a Welcome carries, if there is a board.
    pub fn fd(&self) -> Option<Fd> {
        self.map.as_ref().map(|(_, fd)| fd.clone())
    }

    /// Publishes the listeners as they are now (this devd's, then those
    /// its peers advertised), if that changed anything.
    pub fn publish(&mut self, listeners: &HashMap<u64, Listener>, remote: &[SocketAddr]) {
        let Some((map, _)) = &self.map else { return };
        let now = board::now_ns();
        let mut keyed: Vec<(u64, Entry)> = listeners
            .iter()
            .map(|(&inode, l)| {
                (
                    inode,
                    Entry {
                        addr: l.addr,
                        dual_stack: l.dual_stack,
                        plain_until: l.short.plain_until,
                        peers_only: l.short.peers_only && l.short.plain_until > now,
                    },
                )
            })
            .collect();
        keyed.sort_unstable_by_key(|(inode, _)| *inode);
        // Then the peers' (accelerated: their policy is their devd's).
        let now: Vec<Entry> = keyed
            .into_iter()
            .map(|(_, e)| e)
            .chain(remote.iter().map(|&addr| Entry {
                addr,
                dual_stack: false,
                plain_until: 0,
                peers_only: false,
            }))
            .collect();
        if now != self.last {
            board::publish(map, &now);
            self.last = now;
        }
    }
}

impl Drop for Board {
    /// devd stops: its clients' boards say unknown at once.
    fn drop(&mut self) {
        if let Some((map, _)) = &self.map {
            board::retire(map);
        }
    }
}

/// A listener's `short_lived` state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Short {
    /// Short connections in a row (capped at the policy's streak).
    pub streak: u32,
    /// CLOCK_MONOTONIC ns until which its connections stay on kernel TCP
    /// (0: never put there).
    pub plain_until: u64,
    /// How many times the policy put it on kernel TCP.
    pub periods: u64,
    /// Holds in a row with no long connection between them: each doubles
    /// the next (up to `MAX_HOLD_DOUBLINGS` times), so a listener whose
    /// connections are all short pays a probe streak of accelerated setups
    /// ever more rarely.
    pub doublings: u32,
    /// Claims in a row that found no Intent: connections from programs
    /// not under ssock, each of which cost its acceptor a request.
    pub plain_peers: u32,
    /// The hold is for connectors not under ssock (it began after a
    /// streak of `plain_peers`): an Intent ends it.
    pub peers_only: bool,
}

/// Claims in a row that found no Intent (`Short::plain_peers`) after which
/// a listener's connections stay on kernel TCP for a hold, as after a
/// streak of short ones: a server under ssock whose clients are not stops
/// asking devd at every accept. Longer than a streak of short ones, since
/// each costs only a request, and a hold also keeps plain the accelerated
/// clients that connect during it.
pub const PLAIN_PEER_STREAK: u32 = 16;

/// A hold is at most the policy's `short_lived_hold_ms` times 2^this.
pub const MAX_HOLD_DOUBLINGS: u32 = 5;

/// Whether a closed accelerated connection that lived `lived` and carried
/// `bytes` (both directions) was short under `policy`.
pub fn was_short(policy: &Policy, lived: Duration, bytes: u64) -> bool {
    policy.short_lived_ms != 0
        && lived < Duration::from_millis(policy.short_lived_ms)
        && bytes < SHORT_LIVED_BYTES
}

/// Counts one closed connection of a listener, set up (its Intent) at
/// `born_ns`; true if the listener's connections now stay on kernel TCP
/// for the policy's hold (its board entry changed). Only connections set
/// up after the last hold ended count: each hold is followed by a full
/// streak of accelerated ones, so that persistent connections made then
/// (a client that probes the address first, then connects for good) are
/// accelerated, at the price of a streak's setups per hold.
pub fn judge(policy: &Policy, s: &mut Short, short: bool, born_ns: u64, now_ns: u64) -> bool {
    if born_ns < s.plain_until {
        return false;
    }
    if !short {
        s.streak = 0;
        s.doublings = 0;
        return false;
    }
    s.streak = s.streak.saturating_add(1);
    if s.streak < policy.short_lived_streak {
        return false;
    }
    hold(policy, s, now_ns, false);
    true
}

/// Counts one Claim through a listener that found no Intent at `now_ns`;
/// true if the listener's connections now stay on kernel TCP for the
/// policy's hold. A Claim that found one ends the streak
/// (`Short::plain_peers = 0`); one made during a hold (by an acceptor
/// whose board could not tell) does not count.
pub fn judge_plain_peer(policy: &Policy, s: &mut Short, now_ns: u64) -> bool {
    if policy.short_lived_ms == 0 || now_ns < s.plain_until {
        return false;
    }
    s.plain_peers = s.plain_peers.saturating_add(1);
    if s.plain_peers < PLAIN_PEER_STREAK {
        return false;
    }
    hold(policy, s, now_ns, true);
    true
}

/// Starts a hold at `now_ns` (`peers_only`: for connectors not under
/// ssock), twice the last if it follows one with no long connection
/// between them; both streaks start again after it.
fn hold(policy: &Policy, s: &mut Short, now_ns: u64, peers_only: bool) {
    s.streak = 0;
    s.plain_peers = 0;
    s.peers_only = peers_only;
    let hold = policy
        .short_lived_hold_ms
        .saturating_mul(1_000_000)
        .saturating_mul(1 << s.doublings.min(MAX_HOLD_DOUBLINGS));
    s.plain_until = now_ns.saturating_add(hold);
    s.periods += 1;
    s.doublings = s.doublings.saturating_add(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            short_lived_ms: 10,
            short_lived_streak: 3,
            short_lived_hold_ms: 1000,
            ..Policy::default()
        }
    }

    #[test]
    fn a_streak_of_short_connections_puts_the_listener_on_kernel_tcp_for_the_hold() {
        let p = policy();
        let mut s = Short::default();
        assert!(!judge(&p, &mut s, true, 0, 1));
        assert!(!judge(&p, &mut s, true, 0, 2));
        assert!(judge(&p, &mut s, true, 1, 5));
        assert_eq!((s.plain_until, s.periods), (5 + 1_000_000_000, 1));
        // Connections set up before the hold ended change nothing ...
        for _ in 0..5 {
            assert!(!judge(&p, &mut s, true, 4, 6));
            assert!(!judge(&p, &mut s, true, 900_000_000, 1_100_000_000));
        }
        // ... a full streak set up after it is needed again ...
        assert!(!judge(&p, &mut s, true, 1_000_000_005, 1_200_000_000));
        assert!(!judge(&p, &mut s, true, 1_000_000_006, 1_200_000_001));
        assert!(judge(&p, &mut s, true, 1_000_000_007, 1_200_000_002));
        // ... and this hold, the second in a row, lasts twice as long ...
        assert_eq!(
            (s.periods, s.plain_until),
            (2, 1_200_000_002 + 2_000_000_000)
        );
        // ... and a long one ends a streak, and the doubling.
        let after = s.plain_until;
        assert!(!judge(&p, &mut s, true, after, after + 1));
        assert!(!judge(&p, &mut s, false, after, after + 2));
        assert!(!judge(&p, &mut s, true, after, after + 3));
        assert_eq!((s.streak, s.doublings), (1, 0));
        assert!(!judge(&p, &mut s, true, after, after + 4));
        assert!(judge(&p, &mut s, true, after, after + 5));
        assert_eq!(s.plain_until, after + 5 + 1_000_000_000);
    }

    #[test]
    fn holds_in_a_row_double_up_to_a_bound() {
        let p = policy();
        let mut s = Short::default();
        let mut holds = Vec::new();
        for _ in 0..8 {
            // A streak of 3 set up after the last hold ended.
            let born = s.plain_until;
            let held = (0..3).any(|k| judge(&p, &mut s, true, born, born + k + 1));
            assert!(held);
            holds.push((s.plain_until - (born + 3)) / 1_000_000_000);
        }
        assert_eq!(holds, [1, 2, 4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn a_streak_of_claims_with_no_intent_holds_the_listener_too() {
        let p = policy();
        let mut s = Short::default();
        for k in 1..PLAIN_PEER_STREAK {
            assert!(!judge_plain_peer(&p, &mut s, u64::from(k)));
        }
        // A Claim that found an Intent between them starts the count again.
        s.plain_peers = 0;
        for k in 1..PLAIN_PEER_STREAK {
            assert!(!judge_plain_peer(&p, &mut s, u64::from(k)));
        }
        // Short connections before it count no more after it.
        s.streak = 2;
        assert!(judge_plain_peer(&p, &mut s, 100));
        assert_eq!(
            (
                s.plain_until,
                s.periods,
                s.plain_peers,
                s.streak,
                s.peers_only
            ),
            (100 + 1_000_000_000, 1, 0, 0, true)
        );
        // Claims during the hold do not count; after it, the next hold is
        // twice as long.
        for _ in 0..2 * PLAIN_PEER_STREAK {
            assert!(!judge_plain_peer(&p, &mut s, 200));
        }
        let after = s.plain_until;
        let held =
            (0..PLAIN_PEER_STREAK).filter(|&k| judge_plain_peer(&p, &mut s, after + u64::from(k)));
        assert_eq!(held.count(), 1);
        assert_eq!(
            s.plain_until,
            after + u64::from(PLAIN_PEER_STREAK) - 1 + 2_000_000_000
        );
        // A streak of short connections ends a count of Claims with no
        // Intent, and its hold is not for connectors not under ssock only.
        s.plain_peers = PLAIN_PEER_STREAK - 1;
        let at = s.plain_until;
        assert!((1..=3).any(|k| judge(&p, &mut s, true, at, at + k)));
        assert_eq!((s.plain_peers, s.peers_only), (0, false));
        let off = Policy {
            short_lived_ms: 0,
            ..p
        };
        let mut s = Short::default();
        assert!((0..100).all(|k| !judge_plain_peer(&off, &mut s, k)));
    }

    #[test]
    fn short_means_quick_and_small_and_zero_turns_it_off() {
        let p = policy();
        assert!(was_short(&p, Duration::from_millis(9), 100));
        assert!(!was_short(&p, Duration::from_millis(10), 100));
        assert!(!was_short(&p, Duration::from_millis(1), SHORT_LIVED_BYTES));
        let off = Policy {
            short_lived_ms: 0,
            ..p
        };
        assert!(!was_short(&off, Duration::ZERO, 0));
    }
}
