//! Fail-over (docs/protocol.md 8.5): when the link under a connection
//! with an end on another host fails, the connection goes on over its
//! kernel TCP socket at the exact offsets of each direction. The two
//! devds agree on them over their control connection: each stops moving
//! the side's bytes, pins a writer that had not moved to the kernel socket
//! (SWITCH = NEVER) and sends its end's words; each, once it has the other
//! host's words (so the writer's SWITCH is in this host's page before the
//! writer can send anything again), closes the region part of the
//! direction its end reads at what it gave the reader, and says where;
//! the other closes its writer's direction there. With both directions
//! closed in its page, the client moves back as when devd goes away
//! (section 2.4): the reader reads what it was given, then the socket;
//! the writer sends again what it kept from that offset on.
//!
//! Never here: a direction closed below what its reader took or above
//! what its writer sent, a word from the other host used unchecked, or a
//! connection left waiting for an answer that does not come (`WAIT`).

use super::{Engine, Pair, Side};
use crate::peers::wire::Msg;
use crate::stats::QueuedCounters;
use ssock_hwbackends::Peer;
use ssock_rings::layout::{self, qhdr, End, Taken};
use ssock_rings::relay::Words;
use ssock_rings::relay::{agree_page, our_part, start_page};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a side waits for the other host's half of the agreement
/// before it is reset (or, if nothing of it moved, left plain).
pub(super) const WAIT: Duration = Duration::from_secs(10);

/// A side moving to its kernel socket.
#[derive(Debug)]
pub(super) struct Failover {
    node: u32,
    channel: u64,
    /// The other host's words came: the SWITCH of the direction this side
    /// reads is final in the page, which closed that direction.
    heard: bool,
    /// What was last sent to the other host, and when.
    sent: Option<(Words, Option<u64>)>,
    sent_at: Instant,
    began: Instant,
    /// Made while its link was down (`Engine::born_on_kernel`).
    pub(super) born: bool,
}

/// How long a side waits for the other host's answer before it says its
/// part again.
const AGAIN: Duration = Duration::from_millis(500);

impl Engine {
    /// Starts moving side `s` of connection `id` to its kernel socket:
    /// false when it cannot (no peer devds to agree with, not a remote
    /// side, or over already).
    pub(super) fn fail_over(&mut self, id: u64, pair: &mut Pair, s: usize) -> bool {
        let side = &mut pair.sides[s];
        let (Some(hov), Peer::Remote { node, channel }) = (side.hov.clone(), side.peer) else {
            return false;
        };
        if side.dead || self.peers.is_none() {
            return false;
        }
        if side.failover.is_some() {
            return true;
        }
        // A move onto another link gives way (its other half goes with
        // the other host's own fail-over, which names either channel).
        self.abandon_migration(&mut pair.sides[s]);
        let side = &mut pair.sides[s];
        side.resend.clear();
        side.failover = Some(Failover {
            node,
            channel,
            heard: false,
            sent: None,
            sent_at: Instant::now(),
            began: Instant::now(),
            born: false,
        });
        // Its bytes move no more here; what the client posted stays its
        // own (unacknowledged TX buffers never go back).
        side.tx_pending = None;
        start_page(&hov, side.end);
        // Relaxed: statistics.
        pair.counters.failover.store(2, Ordering::Relaxed);
        let side = &mut pair.sides[s];
        log::info!(
            "connection {id}: the link to node {node} failed; moving it to its kernel socket"
        );
        self.lingering.insert(id);
        self.failover_words_out(side);
        let _ = side.call.notify();
        true
    }

    /// Peer `node` sent its half for the connection on `channel`.
    pub(super) fn peer_failover(
        &mut self,
        node: u32,
        channel: u64,
        words: Words,
        closed: Option<u64>,
        again: bool,
    ) {
        // A remote side's backend channel is the connection's channel (or
        // was, or is to be, around a move onto another link).
        let Some((id, s)) = self.side_for(node, channel) else {
            log::debug!("peer node {node}: fail-over of channel {channel:#x}, not served here");
            return;
        };
        let Some(mut pair) = self.pairs.remove(&id) else {
            return;
        };
        let side = &pair.sides[s];
        if side.failover.is_none() && side.migrating.is_none() && self.drains_a_reset(side) {
            // Its stream's rest is here already; the other host's side,
            // which reset, gives up its half of the agreement in time.
            log::debug!("connection {id}: fail-over from node {node} after its reset came; its reader reads on");
            self.pairs.insert(id, pair);
            return;
        }
        if self.fail_over(id, &mut pair, s) {
            if again {
                // (Its part goes again even if unchanged, and the other
                // side, back, has the whole bound again to agree.)
                if let Some(fo) = pair.sides[s].failover.as_mut() {
                    fo.sent = None;
                    fo.began = Instant::now();
                }
            }
            match self.agree(&mut pair.sides[s], &words, closed) {
                Ok(true) => {
                    log::info!("connection {id}: on its kernel socket, both hosts agreed where");
                    pair.counters.failover.store(1, Ordering::Relaxed);
                    QueuedCounters::add(&self.counts.failovers, 1);
                    if pair.sides[s].failover.as_ref().is_some_and(|f| f.born) {
                        QueuedCounters::add(&self.counts.made_while_down, 1);
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    log::warn!("connection {id}: node {node}'s fail-over: {e}; resetting it");
                    self.failover_reset(&mut pair, s);
                }
            }
        } else {
            self.failover_reset(&mut pair, s);
        }
        self.pairs.insert(id, pair);
        if !self.busy.contains(&id) {
            self.busy.push_back(id);
        }
    }

    /// Side `s` ends with a reset where it should have moved, counted
    /// (not when its own client had reset it before: nothing was to move).
    pub(super) fn failover_reset(&mut self, pair: &mut Pair, s: usize) {
        let side = &pair.sides[s];
        if !side.dead && !side.reset_sent && !never_moved(side) {
            QueuedCounters::add(&self.counts.failover_resets, 1);
        }
        self.reset_side(pair, s);
    }

    /// Applies the other host's words and closing offset to `side`'s page:
    /// Ok(true) when that closed its second direction (the agreement is
    /// complete).
    fn agree(&mut self, side: &mut Side, w: &Words, closed: Option<u64>) -> Result<bool, String> {
        let (Some(hov), Some(fo)) = (side.hov.clone(), side.failover.as_mut()) else {
            return Ok(false);
        };
        let was = both_closed(&hov);
        let counts = (side.sent, side.received);
        agree_page(&hov, side.end, counts, &mut fo.heard, w, closed)?;
        let _ = side.call.notify();
        self.failover_words_out(side);
        Ok(!was && both_closed(&hov))
    }

    /// Sends the other host this side's words (and, once it heard the
    /// other's, where the direction it reads closed) when they changed.
    pub(super) fn failover_words_out(&mut self, side: &mut Side) {
        let (Some(hov), Some(fo), Some(peers)) = (
            side.hov.as_ref(),
            side.failover.as_mut(),
            self.peers.as_ref(),
        ) else {
            return;
        };
        let (w, closed) = our_part(hov, side.end, fo.heard);
        if fo.sent != Some((w, closed)) {
            peers.send(
                fo.node,
                Msg::Failover {
                    channel: fo.channel,
                    words: w,
                    closed,
                },
            );
            fo.sent = Some((w, closed));
            fo.sent_at = Instant::now();
        }
    }

    /// Sides of `pair` whose agreement is not complete: the last message
    /// goes again (the control connection may have dropped it), and after
    /// `WAIT` the side is reset (the other host never answered: its devd
    /// or the control connection went too), or left on kernel TCP if
    /// nothing of it moved on either host. Called at every pump, and
    /// once a second at least (the engine's lingering look).
    pub(super) fn failover_expire(&mut self, id: u64, pair: &mut Pair) {
        // Twins of moves given up for this fail-over: once it is agreed,
        // neither host reads them.
        for side in pair.sides.iter_mut() {
            if !side.given_up.is_empty() && side.failover.is_some() && agreed(side) {
                for ch in std::mem::take(&mut side.given_up) {
                    self.backend.close(ch);
                    self.by_chan.remove(&ch);
                }
            }
        }
        if pair
            .sides
            .iter()
            .all(|s| s.dead || (s.failover.is_some() && !s.gone && agreed(s)))
        {
            // Moved and agreed: nothing to look at until its client goes.
            self.lingering.remove(&id);
        }
        for s in 0..pair.sides.len() {
            let side = &mut pair.sides[s];
            if side.dead || side.failover.is_none() || agreed(side) {
                continue;
            }
            if never_moved(side) {
                // Its connection stays on kernel TCP (a connection made
                // while the link was down whose peer found no intent, or
                // that never agreed, below): there is nothing to agree
                // on, and its client lets its end go at its next call.
                if side.gone {
                    self.reset_side(pair, s);
                }
                continue;
            }
            let held = held_here(side);
            let Some(fo) = side.failover.as_ref() else {
                continue;
            };
            let (born, node) = (fo.born, fo.node);
            let expired = fo.began.elapsed() > WAIT;
            let again = fo.sent_at.elapsed() >= AGAIN;
            // Never agreed (the other host has no side for it: its backend
            // could not open the channel, its devd refused the new
            // connection a fail-forward offered, or is gone), and nothing
            // of it moved on either host: made while the link was down
            // (both writers pinned from the start), or never taken by its
            // client here (the other end's writes move only once this one
            // says it holds its end), so it is a plain connection.
            if expired
                && (born || !held)
                && side.sent == 0
                && side.received == 0
                && make_plain(side, born)
            {
                log::info!(
                    "connection {id}: node {node} never agreed on it; it stays on kernel TCP"
                );
                let _ = side.call.notify();
            } else if expired {
                log::warn!(
                    "connection {id}: node {node} did not agree on the fail-over within {WAIT:?}; resetting it"
                );
                self.failover_reset(pair, s);
            } else if again {
                if let Some(fo) = side.failover.as_mut() {
                    fo.sent = None;
                }
                self.failover_words_out(side);
            }
        }
    }
}

/// `side`'s connection stays on kernel TCP (CLAIM says so in its page)
/// and no byte of it crossed the link here, either way.
fn never_moved(side: &Side) -> bool {
    side.sent == 0
        && side.received == 0
        && side
            .hov
            .as_ref()
            .is_some_and(|h| layout::claim(h) == layout::CLAIM_KERNEL)
}

/// CLAIM = kernel in `side`'s page: its client lets its end go (or, not
/// holding it yet, never takes it). False if an acceptor's client not
/// `born` pinned said accepted meanwhile: it holds its end. (Made while
/// the link was down, both writers are pinned: kernel only lets it go.)
fn make_plain(side: &Side, born: bool) -> bool {
    side.hov.as_ref().is_some_and(|h| {
        let claim = h.u32_at(layout::hov::CLAIM);
        if born || side.end == 0 {
            claim.store(layout::CLAIM_KERNEL, Ordering::Release);
            true
        } else {
            claim
                .compare_exchange(
                    layout::CLAIM_PENDING,
                    layout::CLAIM_KERNEL,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        }
    })
}

/// Whether `side`'s client said it holds its end (READY for a connector,
/// CLAIM accepted for an acceptor, each in its own host's page): until
/// then the other end's writes cannot have moved to the region.
fn held_here(side: &Side) -> bool {
    side.hov.as_ref().is_some_and(|h| {
        if side.end == 0 {
            layout::connector_ready(h)
        } else {
            layout::claim(h) == layout::CLAIM_ACCEPTED
        }
    })
}

/// Both directions' region parts are closed in `hov` (the agreement is
/// complete, or the client closed them itself).
fn both_closed(hov: &ssock_rings::Mapping) -> bool {
    (0..2).all(|d| matches!(layout::taken(hov, d), Taken::Closed(_)))
}

/// `side`'s agreement is complete: both directions closed in its page.
pub(super) fn agreed(side: &Side) -> bool {
    side.hov.as_deref().is_some_and(both_closed)
}

/// A side that moved whose client went (exited or closed) with its
/// kernel socket closed in order: if it owed nothing (its writes into the
/// region end where the other host's reader was given them), the socket's
/// end is its stream's, and END says so for it (a client that died could
/// not; its reader would take the end for bytes missing). A client that
/// lies about what it wrote harms only its own stream.
pub(super) fn end_of_gone(side: &Side) {
    let Some(hov) = side.hov.as_ref() else {
        return;
    };
    if !side.gone || !side.orderly || side.failover.is_none() || side.dead {
        return;
    }
    if side.region.tx_flags() & layout::FLAG_RESET != 0 {
        // It closed with a reset (SO_LINGER 0, bytes unread): no end.
        return;
    }
    let end = side.end & 1;
    if layout::end_at(hov, end) != End::Open {
        return;
    }
    if let Taken::Closed(c) = layout::taken(hov, end) {
        if side.region.counter(qhdr::TX_BYTES) == c {
            layout::publish_end_at_fin(hov, end);
        }
    }
}

#[cfg(test)]
#[path = "failover_model.rs"]
mod model;
