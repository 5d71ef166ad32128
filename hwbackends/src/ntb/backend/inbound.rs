//! What arrives in this node's inbox, for [`Ntb`]: the peer's words
//! checked against this side's positions, each frame's header decoded
//! and checked before use, payloads copied out or held per channel, and
//! the room given back through the consumer word.
//!
//! Never here: a write into the peer's inbox other than the consumer word,
//! a value from the inbox used before it was checked.

use super::super::inbox::{self, Header, Kind, HDR, WORDS};
use super::{Ntb, HOLD_MIN};
use crate::{Mark, Words};

impl Ntb {
    /// Reads what the peer published in this node's inbox.
    pub(super) fn take_in(&mut self) {
        if self.hostile || self.out_of_service || self.ring == 0 || !self.synced {
            return;
        }
        // Both words read between two looks at `seen`: a peer that starts
        // again clears `seen` before it rewinds them, so a rewound word is
        // never judged against this epoch's positions.
        let pc = self.win.load(inbox::OFF_CONS);
        let prod = self.win.load(inbox::OFF_PROD);
        if self.win.load(inbox::OFF_SEEN) != self.epoch {
            self.synced = false;
            return;
        }
        if pc < self.peer_cons || pc > self.published {
            let why = format!(
                "consumer word {pc} outside {}..={}",
                self.peer_cons, self.published
            );
            return self.hostile(&why);
        }
        if pc > self.peer_cons {
            self.peer_cons = pc;
            // Channels whose sends found no room may go on.
            for (&ch, c) in &mut self.chans {
                if std::mem::take(&mut c.starved) {
                    self.ready.push(ch);
                }
            }
        }
        // The peer writes only into the room given back (`freed`, at most
        // `cons`): a producer beyond it overwrote what is held here.
        if prod < self.cons || prod - self.freed > self.ring {
            let why = format!(
                "producer word {prod} outside {}..={}",
                self.cons,
                self.freed + self.ring
            );
            return self.hostile(&why);
        }
        while self.cons < prod {
            let avail = usize::try_from(prod - self.cons).unwrap_or(usize::MAX);
            let mut hb = [0u8; HDR];
            self.ring_read(self.cons, &mut hb);
            let h = match inbox::decode(&hb, avail) {
                Ok(h) => h,
                Err(e) => return self.hostile(&e),
            };
            let at = self.cons + HDR as u64;
            self.cons += inbox::frame_size(h.len) as u64;
            if let Err(why) = self.frame(&h, at) {
                return self.hostile(&why);
            }
        }
    }

    /// Copies every payload still held in the inbox out of it (their
    /// readers took none in the turn since they came).
    pub(super) fn copy_out(&mut self) {
        for ch in std::mem::take(&mut self.holding) {
            if let Some(c) = self.chans.get_mut(&ch).filter(|c| c.rxq.holds()) {
                c.rxq.copy_out(&*self.win, self.ring);
                self.counters.copied_out += 1;
            }
        }
        self.held_from = None;
    }

    /// Gives the peer back the inbox's room up to the first payload still
    /// held (all it read when none is).
    pub(super) fn give_room(&mut self) {
        if self.hostile || self.out_of_service || !self.synced {
            return;
        }
        let to = self.held_from.unwrap_or(self.cons);
        if to != self.freed {
            self.freed = to;
            self.win.store(inbox::OFF_CONS, to);
            self.bell_due = true;
        }
    }

    /// One checked frame whose payload starts at ring position `at`.
    pub(super) fn frame(&mut self, h: &Header, at: u64) -> Result<(), String> {
        let Some(c) = self.chans.get_mut(&h.dst).filter(|c| c.dst == h.src) else {
            // Sent before this end opened, or after it closed.
            self.counters.stale += 1;
            return Ok(());
        };
        match h.kind {
            Kind::Data => {
                if c.rx_mark.is_some() {
                    return Ok(()); // after a mark: discarded, as after a reset
                }
                if c.rxq.len() + h.len > self.peer_window {
                    return Err(format!(
                        "channel {}: {} bytes beyond the window it declared",
                        h.dst,
                        c.rxq.len() + h.len - self.peer_window
                    ));
                }
                if h.len < HOLD_MIN && !c.rxq.holds() {
                    // Small: copied out now, its room given back at once.
                    c.rxq.copy(&*self.win, self.ring, at, h.len);
                } else {
                    // Held where it is until the reader takes it.
                    if !c.rxq.holds() {
                        self.holding.push(h.dst);
                    }
                    c.rxq.hold(at, h.len);
                    self.held_from.get_or_insert(at - HDR as u64);
                }
            }
            Kind::Eos | Kind::Reset => {
                // After the bytes sent before it, as a TCP receiver keeps
                // what came before an RST.
                let m = if h.kind == Kind::Eos {
                    Mark::Eos
                } else {
                    Mark::Reset
                };
                if c.rx_mark == Some(Mark::Eos) && m == Mark::Reset {
                    // An abortive close after shutdown(SHUT_WR): told,
                    // and the end of stream stays where it was.
                    c.reset_after_end = true;
                }
                c.rx_mark.get_or_insert(m);
            }
            Kind::Ack => {
                let mut w = [0u8; 8];
                self.ring_read(at, &mut w);
                let off = u64::from_le_bytes(w);
                let c = self.chans.get_mut(&h.dst).ok_or("channel gone")?;
                if off > c.out.sent {
                    return Err(format!(
                        "channel {}: ack {off} beyond the {} bytes sent",
                        h.dst, c.out.sent
                    ));
                }
                // One below what is acknowledged already is stale (sent
                // before this side's Reset counted everything), not wrong.
                c.out.acked = c.out.acked.max(off);
            }
            Kind::Words => {
                let mut b = [0u8; WORDS];
                self.ring_read(at, &mut b);
                let mut w: Words = [0; 4];
                for (i, x) in w.iter_mut().enumerate() {
                    let mut q = [0u8; 8];
                    q.copy_from_slice(&b[8 * i..8 * i + 8]);
                    *x = u64::from_le_bytes(q);
                }
                // Words after an abortive end are of no use to anyone
                // (after an orderly one the reader still reads, and says
                // so: TAKEN).
                if let Some(c) = self
                    .chans
                    .get_mut(&h.dst)
                    .filter(|c| c.rx_mark != Some(Mark::Reset) && !c.peer_gone)
                {
                    c.words = Some(w);
                }
            }
            Kind::Gone => {
                c.peer_gone = true;
                if c.rx_mark.is_none() {
                    c.rxq.clear();
                    c.rx_mark = Some(Mark::Reset);
                }
                c.out.acked = c.out.sent;
            }
        }
        self.ready.push(h.dst);
        Ok(())
    }
}
