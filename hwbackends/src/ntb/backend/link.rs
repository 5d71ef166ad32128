//! The link's state, for [`Ntb`]: the epochs (a side starts over with
//! the peer's each time it starts), the heartbeat that says the link is
//! up, a hostile inbox that takes it down for good, and the doorbell.
//!
//! Never here: a frame read or written, a blocking call.

use super::super::inbox;
use super::super::{BEAT, DEAD};
use super::Ntb;
use crate::{LinkEvent, LinkState, Mark};
use std::time::Instant;

impl Ntb {
    /// Looks at the peer's epoch: a new one (a first start, or a restart)
    /// means both directions start over: channels reset (after a restart),
    /// positions 0, this side's words in the peer's inbox reset, then
    /// `seen` set to the peer's epoch. Frames flow once the peer did the
    /// same for this side's epoch.
    pub(super) fn sync(&mut self) {
        if self.hostile || self.win.load(inbox::OFF_MAGIC) != inbox::MAGIC {
            return;
        }
        let v = self.win.load(inbox::OFF_VERSION);
        if v != inbox::VERSION {
            return self.hostile(&format_args!("layout version {v}, not {}", inbox::VERSION));
        }
        let e = self.win.load(inbox::OFF_EPOCH);
        if e != 0 && e != self.peer_epoch {
            let w = self.win.load(inbox::OFF_WINDOW);
            if !(1..=inbox::MAX_WINDOW).contains(&w) {
                return self.hostile(&format_args!("a window of {w} bytes"));
            }
            let l = self.win.load(inbox::OFF_LINK);
            if l != u64::from(self.link) {
                // Both configs list their links to each other in one order.
                let why = format!(
                    "the peer calls this window its link {l}, this devd its link {}: \
                     the two configs list their links in another order",
                    self.link
                );
                return self.hostile(&why);
            }
            if self.peer_epoch != 0 {
                log::info!("ntb link to node {}: the peer started again", self.peer);
                // Its channels went with it: the link is down until both
                // sides synced again (the connections that crossed it move
                // to their kernel sockets; their ends there may rejoin).
                self.went_down();
                // (Its heartbeat counts from the start again.)
                self.peer_beat = 0;
                self.reset_all();
                // What waited was for the old epoch's channels.
                self.ctl.clear();
            }
            self.peer_window = usize::try_from(w).unwrap_or(usize::MAX);
            self.prod = 0;
            self.published = 0;
            self.peer_cons = 0;
            self.cons = 0;
            self.held_from = None;
            self.holding.clear();
            self.freed = 0;
            self.win.store(inbox::OFF_PROD, 0);
            self.win.store(inbox::OFF_CONS, 0);
            self.win.store(inbox::OFF_SEEN, e);
            self.peer_epoch = e;
            // The provider's news first (an ivshmem server names a peer
            // that came before it starts): the ring must reach it.
            self.win.drain();
            self.ring_bell();
        }
        let was = self.synced;
        self.synced = self.peer_epoch != 0 && self.win.load(inbox::OFF_SEEN) == self.epoch;
        if self.synced && !was {
            // Sends that found the link not started may go on.
            for (&ch, c) in &mut self.chans {
                if std::mem::take(&mut c.starved) {
                    self.ready.push(ch);
                }
            }
        }
    }

    /// Every channel ends with Reset (its peer went away with the link);
    /// one whose peer's reset came already keeps the bytes it had before
    /// it (checked when they came), as a TCP receiver does.
    pub(super) fn reset_all(&mut self) {
        for (&ch, c) in &mut self.chans {
            if c.rx_mark != Some(Mark::Reset) && !c.reset_after_end {
                c.rxq.clear();
            }
            c.rx_mark.get_or_insert(Mark::Reset);
            c.peer_gone = true;
            c.out.acked = c.out.sent;
            c.ack_due = false;
            self.ready.push(ch);
        }
    }

    pub(super) fn ring_bell(&mut self) {
        // What was written goes before the doorbell (a window whose
        // writes are not the peer's memory at once).
        self.win.publish();
        self.win.ring();
        self.counters.doorbells += 1;
    }

    /// After the turn's words were published: rings the peer only if it
    /// sleeps (its `asleep` word, read after the publishing stores; it sets
    /// the word before its last look at its inbox: one of the two sees the
    /// other). Sound on coherent shared memory (the emulated window,
    /// ivshmem); a window whose writes reach the peer later (a PCIe BAR's
    /// posted writes) must ring always.
    pub(super) fn wake_peer(&mut self) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if !self.win.coherent() || self.win.load(inbox::OFF_ASLEEP) != 0 {
            self.ring_bell();
        } else {
            self.counters.doorbells_suppressed += 1;
        }
    }

    /// Heartbeats out and in; link events.
    pub(super) fn link(&mut self, now: Instant) {
        if self.hostile || self.out_of_service {
            return; // silent: the peer sees the link down too
        }
        if now.duration_since(self.beat_at) >= BEAT {
            self.beat += 1;
            self.beat_at = now;
            self.win.store(inbox::OFF_BEAT, self.beat);
        }
        let ok = self.synced;
        let beat = self.win.load(inbox::OFF_BEAT);
        if ok && beat != self.peer_beat {
            self.peer_beat = beat;
            self.peer_seen = now;
            if !self.up && !self.hostile {
                self.up = true;
                self.events.push(LinkEvent {
                    node: self.peer,
                    link: self.link,
                    state: LinkState::Up,
                });
            }
        } else if self.up && now.duration_since(self.peer_seen) > DEAD {
            self.went_down();
        }
    }

    /// The link is down (if it was up): said once, as a link event.
    pub(super) fn went_down(&mut self) {
        if std::mem::take(&mut self.up) {
            self.events.push(LinkEvent {
                node: self.peer,
                link: self.link,
                state: LinkState::Down,
            });
        }
    }

    /// The peer broke the inbox's rules: the link is down for good, every
    /// channel ends with Reset.
    pub(super) fn hostile(&mut self, why: &dyn std::fmt::Display) {
        log::warn!(
            "ntb link to node {}: hostile inbox ({why}); the link is down",
            self.peer
        );
        self.hostile = true;
        self.went_down();
        self.reset_all();
    }
}
