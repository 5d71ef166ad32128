//! Moving a connection from a link that failed onto another link to the
//! same peer, with no byte on TCP and nothing for its clients to do
//! (docs/protocol.md 8.7). The devd that named the connection's channel
//! (its acceptor's) picks the link, opens the channel's twin on it and
//! says so (`Msg::Migrate`, over the peer control connection) with what
//! its end was given of the other end's stream when it stopped; the other
//! devd stops its side too, opens the twin and answers the same way. Each
//! then sends its stream again from what the other said it was given, out
//! of the TX buffers not yet acknowledged (the engine gives a buffer back
//! only once the other host took its bytes), and reads on from where it
//! stopped. No new link up, no answer within `WAIT`, or a value that
//! breaks the rules: the side moves to its kernel socket instead
//! (`failover.rs`).
//!
//! Never here: a byte delivered twice or skipped (each direction resumes
//! exactly at what its reader was given, checked against what its writer
//! sent and had acknowledged), a word from the other host used unchecked,
//! a side left waiting without a bound.

use super::{link_of, Engine, Pair, Side};
use crate::peers::wire::Msg;
use crate::stats::QueuedCounters;
use ssock_hwbackends::{connection_of, moved_onto, BackendError, ChannelId, LinkId, Peer};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a side waits for the other host's half before it moves to
/// its kernel socket instead.
const WAIT: Duration = Duration::from_secs(3);
/// How long before it says its half again.
const AGAIN: Duration = Duration::from_millis(500);

/// A side moving onto another link.
#[derive(Debug)]
pub(super) struct Migrating {
    node: u32,
    /// The channel on the failed link.
    old: ChannelId,
    /// The link it moves to (the namer's pick; at the other devd, once
    /// the namer said).
    link: Option<LinkId>,
    /// The channel's twin on that link is open here.
    opened: bool,
    /// This devd named the channel (it picks the link).
    namer: bool,
    /// What this side was given of the other end's stream when it
    /// stopped, and whether its mark too.
    ours: (u64, bool),
    /// The other host's, once heard.
    theirs: Option<(u64, bool)>,
    /// The other devd said it has the twin open (the namer waits for it
    /// before it sends there: a frame for a channel not open is dropped).
    confirmed: bool,
    /// This side's stream when it stopped: acknowledged, sent.
    acked: u64,
    sent: u64,
    said_at: Instant,
    began: Instant,
}

impl Migrating {
    fn twin(&self) -> Option<ChannelId> {
        self.link.map(|l| moved_onto(self.old, l))
    }
}

/// Whether the other host's half of a move can be true: what it says it
/// was given of this side's stream (`theirs`: bytes, and whether the end
/// mark too) is at least what it acknowledged and at most what was sent,
/// and the mark only after every byte of a stream whose mark was sent.
pub(super) fn half_valid(theirs: (u64, bool), acked: u64, sent: u64, mark_sent: bool) -> bool {
    let (r, marked) = theirs;
    r >= acked && r <= sent && (!marked || (mark_sent && r == sent))
}

/// What goes again, in order, each from an offset in it: the buffers
/// not acknowledged, then the one partly sent.
pub(super) type ResendPlan<B> = (VecDeque<(B, usize)>, Option<(B, usize)>);

/// Where a stream goes again from byte `r` (what the other host was
/// given): each buffer not acknowledged (`unacked`: a buffer and the
/// stream offset where it ends, in order; `len` its length) that ends
/// past `r`, from where `r` falls in it (0 for the later ones), and the
/// buffer partly sent (`pending`: it and how much of it went, at stream
/// offset `sent`) from where `r` falls in it. `r` at least the first
/// buffer's start (what was acknowledged; `half_valid`).
pub(super) fn resend_from<B: Copy>(
    unacked: &VecDeque<(B, u64)>,
    len: impl Fn(&B) -> u64,
    pending: Option<(B, usize)>,
    sent: u64,
    r: u64,
) -> ResendPlan<B> {
    let offset = |start: u64| usize::try_from(r.saturating_sub(start)).unwrap_or(usize::MAX);
    let resend = unacked
        .iter()
        .filter(|&&(_, end)| end > r)
        .map(|&(b, end)| (b, offset(end - len(&b))))
        .collect();
    let pending = pending.map(|(b, off)| (b, offset(sent - off as u64)));
    (resend, pending)
}

/// Whether this devd named `ch`, a channel with peer `node` (the acceptor's
/// devd names a connection's channel from its own range; the connector's
/// has the peer's node there).
fn named_here(node: u32, ch: ChannelId) -> bool {
    (ch >> 40) & 0xFFFF != u64::from(node)
}

impl Engine {
    /// The link to `node`, up and other than `but`, that a connection
    /// moves onto (by the peer's link policy).
    fn other_link_up(&self, node: u32, but: LinkId) -> Option<LinkId> {
        let mut l = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let up: Vec<LinkId> = l
            .seen
            .iter()
            .filter(|(&(n, link), seen)| n == node && link != but && seen.up)
            .map(|(&(_, link), _)| link)
            .collect();
        l.choose(node, ssock_hwbackends::MAX_LINKS, |link| up.contains(&link))
    }

    /// Starts moving remote side `s` of `pair` off its failed link onto
    /// another (`link`: the namer's pick, when the other devd starts on
    /// the namer's word): false when it cannot (no other link up here, no
    /// peer devds, not a remote side, the twin cannot open), and the
    /// caller moves it to its kernel socket instead.
    pub(super) fn migrate(
        &mut self,
        id: u64,
        pair: &mut Pair,
        s: usize,
        link: Option<LinkId>,
    ) -> bool {
        let side = &pair.sides[s];
        let Peer::Remote { node, channel } = side.peer else {
            return false;
        };
        // (A side that sent a reset ends: the other host learns of it on
        // its kernel socket, as fail-over agrees, 8.5.)
        if side.dead
            || side.hov.is_none()
            || self.peers.is_none()
            || side.failover.is_some()
            || side.reset_sent
        {
            return false;
        }
        if side.migrating.is_some() {
            return true;
        }
        let old_link = link_of(channel);
        let namer = named_here(node, channel);
        let pick = if namer {
            self.other_link_up(node, old_link)
        } else {
            // The namer picks; this side only goes along while a link
            // other than the failed one is up here too.
            if self.other_link_up(node, old_link).is_none() {
                return false;
            }
            link
        };
        let pick = match pick {
            Some(l) if l == old_link => return false,
            Some(l) => Some(l),
            None if namer => return false,
            None => None,
        };
        // (What the engine acted on: it holds every buffer from there.)
        let acked = side.acked.min(side.sent);
        let side = &mut pair.sides[s];
        side.migrating = Some(Migrating {
            node,
            old: channel,
            link: pick,
            opened: false,
            namer,
            // (What its gone client's side discarded was taken too.)
            ours: (side.received + side.discarded, side.rx_marked),
            theirs: None,
            confirmed: false,
            acked,
            sent: side.sent,
            said_at: Instant::now(),
            began: Instant::now(),
        });
        // Relaxed: statistics ("moving").
        pair.counters.failover.store(2, Ordering::Relaxed);
        if pick.is_some() && !self.open_twin(id, &mut pair.sides[s]) {
            pair.sides[s].migrating = None;
            pair.counters.failover.store(0, Ordering::Relaxed);
            return false;
        }
        log::info!(
            "connection {id}: the link to node {node} failed (link {old_link}); moving it onto {}",
            pick.map_or("another link".to_string(), |l| format!("link {l}"))
        );
        self.lingering.insert(id);
        self.say_migrate(&mut pair.sides[s]);
        true
    }

    /// Opens the channel's twin on the link picked; false if the backend
    /// cannot.
    fn open_twin(&mut self, id: u64, side: &mut Side) -> bool {
        let Some(m) = side.migrating.as_mut() else {
            return false;
        };
        let Some(twin) = m.twin().filter(|_| !m.opened) else {
            return m.opened;
        };
        let peer = Peer::Remote {
            node: m.node,
            channel: twin,
        };
        match self.backend.open(twin, peer) {
            Ok(()) => {
                m.opened = true;
                self.by_chan.insert(twin, id);
                true
            }
            Err(e) => {
                log::warn!("connection {id}: the channel on the new link: {e}");
                false
            }
        }
    }

    /// Tells the other host this side's half (again).
    fn say_migrate(&mut self, side: &mut Side) {
        let (Some(m), Some(peers)) = (side.migrating.as_mut(), self.peers.as_ref()) else {
            return;
        };
        // The namer names the link it opened; the other devd names one only
        // once its move completed (its confirmation, `try_complete`).
        peers.send(
            m.node,
            Msg::Migrate {
                channel: m.old,
                link: m.link.filter(|_| m.namer && m.opened),
                received: m.ours.0,
                marked: m.ours.1,
            },
        );
        m.said_at = Instant::now();
    }

    /// Peer `node` said its half for the connection on `channel`.
    pub(super) fn peer_migrate(
        &mut self,
        node: u32,
        channel: u64,
        link: Option<LinkId>,
        received: u64,
        marked: bool,
    ) {
        let Some((id, s)) = self.side_for(node, channel) else {
            log::debug!("peer node {node}: a move of channel {channel:#x}, not served here");
            return;
        };
        let Some(mut pair) = self.pairs.remove(&id) else {
            return;
        };
        self.peer_half(id, &mut pair, s, channel, link, (received, marked));
        self.pairs.insert(id, pair);
        if !self.busy.contains(&id) {
            self.busy.push_back(id);
        }
    }

    fn peer_half(
        &mut self,
        id: u64,
        pair: &mut Pair,
        s: usize,
        channel: u64,
        link: Option<LinkId>,
        theirs: (u64, bool),
    ) {
        let side = &mut pair.sides[s];
        if side.dead || side.failover.is_some() {
            // Moving to its kernel socket: the other host follows once it
            // hears so.
            return;
        }
        if side.prev_ch == Some(channel) {
            // Its last move (this side completed it): the namer missed
            // this side's confirmation, which goes again.
            if !named_here(theirs_node(side), channel) {
                let m = Msg::Migrate {
                    channel,
                    // (Its channel is that move's twin until the next
                    // move completes.)
                    link: Some(link_of(side.ch)),
                    received: side.migrate_said.0,
                    marked: side.migrate_said.1,
                };
                if let Some(p) = &self.peers {
                    p.send(theirs_node(side), m);
                }
            }
            return;
        }
        let current = match &side.migrating {
            Some(m) => m.old == channel,
            None => side.ch == channel,
        };
        if !current {
            // Of an older move.
            return;
        }
        if side.migrating.is_none() && !self.migrate(id, pair, s, link) {
            self.migration_failed(id, pair, s);
            return;
        }
        let Some(m) = pair.sides[s].migrating.as_mut() else {
            return;
        };
        if m.theirs.is_some_and(|t| t != theirs) {
            log::warn!(
                "connection {id}: node {} changed its half of the move; resetting it",
                m.node
            );
            self.migrate_reset(pair, s);
            return;
        }
        m.theirs = Some(theirs);
        match (m.namer, link) {
            (true, Some(l)) if Some(l) == m.link => m.confirmed = true,
            (true, Some(_)) | (false, None) => {}
            (true, None) => {}
            (false, Some(l)) => {
                if m.link.is_some_and(|have| have != l) {
                    log::warn!(
                        "connection {id}: node {} named two links for its move; resetting it",
                        m.node
                    );
                    self.migrate_reset(pair, s);
                    return;
                }
                m.link = Some(l);
            }
        }
        let side = &mut pair.sides[s];
        if !side.migrating.as_ref().is_some_and(|m| m.opened) && !self.open_twin(id, side) {
            self.migration_failed(id, pair, s);
            return;
        }
        self.try_complete(id, pair, s);
    }

    /// Completes side `s`'s move once both halves are in.
    fn try_complete(&mut self, id: u64, pair: &mut Pair, s: usize) {
        let side = &mut pair.sides[s];
        let Some(m) = side.migrating.as_ref() else {
            return;
        };
        let (Some(theirs), Some(link), Some(twin)) = (m.theirs, m.link, m.twin()) else {
            return;
        };
        if m.namer && !m.confirmed {
            return;
        }
        if !self.link_seen_up(m.node, link) {
            // The link picked is down here: no byte would cross it.
            log::info!("connection {id}: link {link} is down here too");
            self.migration_failed(id, pair, s);
            return;
        }
        // What the other host was given of this side's stream: at least
        // what it acknowledged, at most what was sent; the mark only
        // after every byte.
        let (r, marked) = theirs;
        if !half_valid(theirs, m.acked, m.sent, side.mark_sent) {
            log::warn!(
                "connection {id}: node {} says it was given {r} bytes (mark: {marked}) of a stream acknowledged to {} and sent to {}; resetting it",
                m.node, m.acked, m.sent
            );
            self.migrate_reset(pair, s);
            return;
        }
        let (node, old, ours, namer) = (m.node, m.old, m.ours, m.namer);
        // The old channel goes (its link is down: nothing crosses it).
        self.backend.close(old);
        self.by_chan.remove(&old);
        let side = &mut pair.sides[s];
        side.migrating = None;
        side.prev_ch = Some(old);
        side.migrate_said = ours;
        side.ch = twin;
        side.peer = Peer::Remote {
            node,
            channel: twin,
        };
        // This side's stream again from `r`: the unacknowledged buffers
        // from there, then the one partly sent, from where `r` falls.
        let (resend, pending) = resend_from(
            &side.unacked,
            |b| u64::from(b.len),
            side.tx_pending,
            side.sent,
            r,
        );
        side.resend = resend;
        side.tx_pending = pending;
        side.sent = r;
        side.base = r;
        if side.mark_sent && !marked {
            side.mark_sent = false;
        }
        side.words_sent = None;
        pair.counters.link.store(u64::from(link), Ordering::Relaxed);
        pair.counters.failover.store(0, Ordering::Relaxed);
        QueuedCounters::add(&pair.counters.migrations, 1);
        QueuedCounters::add(&self.counts.migrations, 1);
        log::info!(
            "connection {id}: on link {link} to node {node}, both hosts agreed where (this side's stream again from byte {r}, the other's from {})",
            ours.0
        );
        if !pair.sides.iter().any(|s| s.gone || s.failover.is_some()) {
            self.lingering.remove(&id);
        }
        if !namer {
            // Says it has the twin open: the namer sends there from now.
            if let Some(p) = &self.peers {
                p.send(
                    node,
                    Msg::Migrate {
                        channel: old,
                        link: Some(link),
                        received: ours.0,
                        marked: ours.1,
                    },
                );
            }
        }
        if !self.busy.contains(&id) {
            self.busy.push_back(id);
        }
    }

    /// Whether link `link` to `node` is up here.
    fn link_seen_up(&self, node: u32, link: LinkId) -> bool {
        let l = self.links.lock().unwrap_or_else(|p| p.into_inner());
        l.up(node, link)
    }

    /// The move cannot happen: side `s` moves to its kernel socket (or,
    /// without peer devds to agree with, is reset).
    pub(super) fn migration_failed(&mut self, id: u64, pair: &mut Pair, s: usize) {
        self.abandon_migration(&mut pair.sides[s]);
        if !self.fail_over(id, pair, s) {
            self.failover_reset(pair, s);
        }
    }

    fn migrate_reset(&mut self, pair: &mut Pair, s: usize) {
        self.abandon_migration(&mut pair.sides[s]);
        self.failover_reset(pair, s);
    }

    /// Forgets side's move; the twin it opened stays open (the other
    /// host may send there already) until the connection goes.
    pub(super) fn abandon_migration(&mut self, side: &mut Side) {
        if let Some(m) = side.migrating.take() {
            if let Some(twin) = m.twin().filter(|_| m.opened) {
                side.given_up.push(twin);
            }
        }
    }

    /// Sides of `pair` still moving: their half said again, and after
    /// `WAIT` moved to their kernel sockets instead.
    pub(super) fn migrate_expire(&mut self, id: u64, pair: &mut Pair) {
        for s in 0..pair.sides.len() {
            let Some(m) = pair.sides[s].migrating.as_ref() else {
                continue;
            };
            if m.began.elapsed() > WAIT {
                log::warn!(
                    "connection {id}: node {} did not agree on a move onto another link within {WAIT:?}; moving it to its kernel socket",
                    m.node
                );
                self.migration_failed(id, pair, s);
            } else if m.said_at.elapsed() >= AGAIN {
                self.say_migrate(&mut pair.sides[s]);
            }
        }
    }

    /// Sends again what the old link lost, before anything new: whether
    /// all of it went (else some waits for room), and whether bytes moved.
    pub(super) fn resend(&mut self, id: u64, pair: &mut Pair, s: usize) -> (bool, bool) {
        let mut moved = false;
        loop {
            let side = &mut pair.sides[s];
            let Some(&(buf, off)) = side.resend.front() else {
                return (true, moved);
            };
            let len = buf.len as usize;
            if off >= len {
                // (An empty buffer: nothing to send again.)
                side.resend.pop_front();
                continue;
            }
            let (sent, bad) =
                super::send_buf(self.backend.as_mut(), side.ch, side, buf, off, len - off);
            if let Some(e) = bad {
                self.violation(id, pair, s, &e);
                return (false, true);
            }
            let side = &mut pair.sides[s];
            match sent {
                Ok(0) | Err(BackendError::Busy(_)) => return (false, moved),
                Ok(n) => {
                    moved = true;
                    side.sent += n as u64;
                    if off + n < len {
                        if let Some(f) = side.resend.front_mut() {
                            f.1 = off + n;
                        }
                    } else {
                        side.resend.pop_front();
                    }
                }
                // The peer went meanwhile: as for new bytes, they have
                // nowhere to go.
                Err(_) => {
                    side.resend.clear();
                    return (true, moved);
                }
            }
        }
    }

    /// The connection and side that use (or used, or are moving to)
    /// channel `channel` with peer `node`.
    pub(super) fn side_for(&self, node: u32, channel: u64) -> Option<(u64, usize)> {
        // A channel's connection bits stay through its moves (a Failover
        // may name the channel before a move the sender gave up, or after
        // one this host gave up).
        let matches = |side: &Side| {
            !side.dead
                && matches!(side.peer, Peer::Remote { node: n, .. } if n == node)
                && connection_of(side.ch) == connection_of(channel)
        };
        let look = |id: u64| {
            self.pairs
                .get(&id)
                .and_then(|p| p.sides.iter().position(matches).map(|s| (id, s)))
        };
        self.by_conn
            .get(&connection_of(channel))
            .and_then(|&id| look(id))
    }
}

/// The peer node and link a side is moving onto, once picked.
pub(super) fn toward(side: &Side) -> Option<(u32, LinkId)> {
    let m = side.migrating.as_ref()?;
    Some((m.node, m.link?))
}

/// The channel's twin a moving side opened, if any.
pub(super) fn open_twin(side: &Side) -> Option<ChannelId> {
    side.migrating
        .as_ref()
        .filter(|m| m.opened)
        .and_then(Migrating::twin)
}

/// The peer node of a remote side.
fn theirs_node(side: &Side) -> u32 {
    match side.peer {
        Peer::Remote { node, .. } => node,
        Peer::Local(_) => 0,
    }
}

#[cfg(test)]
#[path = "migrate_model.rs"]
mod model;
