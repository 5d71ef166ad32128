//! Moving forward (docs/protocol.md section 8.6): an end between two hosts
//! that moved back to its kernel socket when its link failed takes the new
//! end devd offers once the link is back, and its hand-over starts anew:
//! each direction on the kernel socket until its writer moves, at an
//! offset in the socket's whole stream (every byte this end's process
//! sent there, every byte it read there), so both ends count alike.
//!
//! Never here: taking the new end while this process cannot count its
//! socket's bytes (an end shared, inherited or passed on), while bytes
//! are still owed to the peer or unread in the old region, while the
//! peer may still owe bytes it would send again, or after the stream's
//! end was read; or leaving another thread asleep on the old end (it is
//! woken, and its disarm undoes nothing on the new end: `generation`).

use super::*;
use crate::transport::queued::Queued;
use ssock_rings::codec::{Request, Response, Side};

/// What a sleeper on a moved end does about devd's offer of a new end
/// ([`Handover::offer_watch`]).
pub(super) enum OfferWatch {
    /// Nothing to watch: no offer can come, or it cannot be taken.
    Nothing,
    /// Watch this fd (POLLIN): devd rings it when it offers one.
    Fd(RawFd),
    /// An offer was there and this end took it: its sleep is the new
    /// end's.
    Taken,
}

impl Handover {
    /// This end's side as the control protocol names it.
    fn side_name(&self) -> Side {
        if self.side == 0 {
            Side::Connector
        } else {
            Side::Acceptor
        }
    }

    /// Before a sleep on this moved end, while it may still take a new
    /// one: devd's offer, which rings the fd returned (emptied first,
    /// unless a sleeper armed on the region before it was lost may still
    /// need that ring to wake: then a sleep on it ends at once until that
    /// sleeper left), looked at and taken now if made already. An idle
    /// end so moves forward without waiting for its program's next call.
    pub(super) fn offer_watch(&mut self, ctx: &Ctx<'_>) -> OfferWatch {
        let may = self.lost
            && !self.kernel
            && !self.broken
            && !self.closed
            && !self.forward_declined
            && !self.back_eof
            && self.counted
            && layout::is_remote(&self.map);
        if !may {
            return OfferWatch::Nothing;
        }
        let drain = !self.older_sleepers();
        let Some(fd) = self.inner.offer_fd(drain) else {
            return OfferWatch::Nothing;
        };
        self.forward(ctx);
        if self.kernel || !self.lost {
            OfferWatch::Taken
        } else {
            OfferWatch::Fd(fd)
        }
    }

    /// Takes the new end devd offers, if it offers one (FORWARD in the
    /// moved end's page) and this end is where it can: its resend is out,
    /// the old region read to its end, its counts its own, its peer's
    /// resend out too. An end that can never take it lets it go, once
    /// (`forward_declined`), and stays on its kernel socket.
    pub(super) fn forward(&mut self, ctx: &Ctx<'_>) {
        if !self.lost
            || self.kernel
            || self.broken
            || self.closed
            || self.forking
            || self.forward_declined
            || !layout::forward_offered(&self.map)
        {
            return;
        }
        // The peer's writes: all it owed sent again (END says "at the
        // socket's end": a writer that dies now leaves a FIN that is its
        // stream's end), and not ended. A peer whose writes never moved
        // (this end's reads `Rx::Forever`) owed nothing, and its END says
        // nothing (its old end's close writes one at region offset 0):
        // the socket's end is its stream's.
        let peer_end = layout::end_at(&self.map, 1 - self.side);
        let ended = match self.rx {
            Rx::Back { .. } => self.back_eof || matches!(peer_end, End::At(_)),
            Rx::Forever => self.tcp_eof,
            _ => false,
        };
        let never = if !self.counted || self.inner.holders() > 1 {
            Some("its bytes on the kernel socket are not all this process's".to_string())
        } else if self.wr_shut || self.tx == Tx::Shut {
            Some("its writes were shut down".to_string())
        } else if ended {
            Some(format!(
                "its peer's writes ended (reads {:?}, the peer's END {peer_end:?})",
                self.rx
            ))
        } else {
            None
        };
        if let Some(why) = never {
            self.decline(ctx, &why);
            return;
        }
        // This end's writes: every one on the kernel socket (those that
        // never moved, `Tx::Pinned`, were always counted there too).
        let peer_done = match self.rx {
            Rx::Back { .. } => peer_end == End::AtFin,
            Rx::Forever => true,
            _ => false,
        };
        let ready = matches!(self.tx, Tx::Back | Tx::Pinned)
            && peer_done
            && !self.owed()
            && self.end_wait.is_none()
            && self.tcp_err.is_none();
        if !ready {
            // Later: the next call looks again.
            return;
        }
        let (Some(session), Some(old)) = (self.inner.session(), self.inner.conn_id()) else {
            self.forward_declined = true;
            return;
        };
        let side = self.side_name();
        let req = Request::Forward {
            conn_id: old,
            side,
            take: true,
        };
        let new = match session.request(&req, &[ctx.tcp]) {
            Ok((Response::Attached(a), fds)) if a.side == side && a.mode == Mode::Queued => {
                match Queued::attach(&a, fds, Some(session.clone())) {
                    Ok(q) => q,
                    Err(e) => {
                        let _ = session.post(&Request::Release {
                            conn_id: a.conn_id,
                            side,
                            park: false,
                        });
                        self.forward_declined = true;
                        log::warn!("connection {old}: its new end cannot be used: {e}");
                        return;
                    }
                }
            }
            Ok(_) => {
                self.decline(ctx, "devd answered Forward with something else");
                return;
            }
            Err(e) => {
                // (devd may have let that end go meanwhile; it offers this
                // one no other once told.)
                self.decline(ctx, &format!("no new end from devd: {e}"));
                return;
            }
        };
        let Some((map, _)) = new.handover_words() else {
            return;
        };
        // Every byte this end read from the kernel socket: counted in
        // TCP_READ before the move (and all along for reads that never
        // moved), in `after` since the move back.
        let read = match self.rx {
            Rx::Back { after, .. } => self.done().wrapping_add(after),
            _ => self.done(),
        };
        let mut new: Box<dyn Transport> = Box::new(new);
        if !layout::is_remote(&map) {
            new.discard_region();
            new.close();
            self.forward_declined = true;
            log::warn!("connection {old}: its new end is not between two hosts");
            return;
        }
        // The new page counts this end's reads of the kernel socket from
        // the stream's start, as its peer's SWITCH will.
        layout::tcp_read(&map, self.side).store(read, Ordering::Release);
        // A SHUT_RD of the socket's holders stays the socket's.
        if layout::reads_shut(&self.map, self.side) {
            layout::shut_reads(&map, self.side);
        }
        // This end holds its new end: its peer's writes may move.
        if self.side == 0 {
            layout::mark_ready(&map);
        } else if !layout::accept_claim(&map) {
            new.discard_region();
            new.close();
            self.forward_declined = true;
            log::info!("connection {old}: devd said its new end stays on the kernel socket");
            return;
        }
        let mut old_end = std::mem::replace(&mut self.inner, new);
        // Threads asleep on the old end (its call eventfd is in each
        // sleep's set; this one too, if a look after arming took it) wake
        // and sleep again on the new one; that eventfd stays open, rung,
        // until the last of them is gone.
        if self.sleepers + self.old_sleepers > 0 {
            match old_end.retire_call() {
                Some(call) => {
                    let _ = call.notify();
                    self.retired.push(call);
                }
                // (No duplicate to spare: rung, and closed with the end.)
                None => old_end.wake_self(),
            }
        }
        self.next_generation();
        old_end.close();
        self.forwards += 1;
        log::info!(
            "connection {old}: moves forward onto the link as connection {} (time {}; kernel socket: {} bytes sent, {read} read)",
            self.inner.conn_id().unwrap_or(0),
            self.forwards,
            self.sock_out
        );
        self.map = map;
        self.tx = Tx::Tcp(self.sock_out);
        self.rx = Rx::Tcp(None);
        self.lost = false;
        self.reads_closed = None;
        self.resend = Vec::new();
        self.resent = 0;
        self.tail = 0;
        self.back_shut = false;
        self.tcp_eof = false;
        self.peer_closed = false;
        self.end_wait = None;
        self.recheck = RECHECK_MIN;
        self.inner.words_changed();
        self.step();
    }

    /// This end will not take the new end offered: devd lets it go (its
    /// engine side ends with Eos, which tells a reader on the other host
    /// that took its own new end that these writes never moved).
    fn decline(&mut self, ctx: &Ctx<'_>, why: &str) {
        self.forward_declined = true;
        let Some(old) = self.inner.conn_id() else {
            return;
        };
        log::info!("connection {old}: stays on its kernel socket: {why}");
        if let Some(s) = self.inner.session() {
            let req = Request::Forward {
                conn_id: old,
                side: self.side_name(),
                take: false,
            };
            if let Err(e) = s.request(&req, &[ctx.tcp]) {
                log::debug!("connection {old}: devd was not told: {e}");
            }
        }
    }
}
