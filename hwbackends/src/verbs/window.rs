//! A window provider for the ntb backend over RDMA verbs: this node's
//! inbox is a region of its own memory that the peer RDMA-writes (one
//! reliable-connected queue pair per link), and the peer's inbox is
//! written here into a local copy of the same layout, whose changed
//! ranges `publish` RDMA-writes to the peer, ring bytes first and the
//! inbox's words last, on one queue pair (executed in order). The
//! doorbell is an RDMA write with immediate, which completes a receive
//! on the peer: its completion channel's fd is this node's bell.
//!
//! Before `connect` (the peer's endpoint, which the peers' control
//! connection brings) nothing is sent: what was written waits, and the
//! link stays down (no heartbeat arrives).
//!
//! Never here: a read of the peer's memory (nothing is RDMA-read), a
//! write outside the peer's region (checked against the size both sides
//! declared), a value from the inbox used unchecked (the ntb backend
//! checks all it reads).

use super::device::{Context, Cq, Endpoint, Qp, Region};
use super::sys::{IbvWc, IBV_WC_RECV_RDMA_WITH_IMM, IBV_WC_SUCCESS};
use crate::ntb::window::{Halves, Window};
use ssock_rings::shm::Mapping;
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

/// Receives kept posted for the peer's doorbells.
const RECVS: u32 = 64;
/// Send queue depth: a publish posts a few writes and a doorbell.
const SENDS: u32 = 256;
/// Work request ids: receives (re-posted), doorbells (signaled).
const WR_RECV: u64 = 1;
const WR_BELL: u64 = 2;

/// What was written into the local copy of the peer's inbox since the
/// last publish: the words (a span of the inbox's first page) and ranges
/// after it.
#[derive(Default)]
struct Dirty {
    words: Option<(usize, usize)>,
    ranges: Vec<(usize, usize)>,
}

impl Dirty {
    fn mark(&mut self, off: usize, len: usize) {
        let end = off + len;
        if off < crate::ntb::inbox::RING {
            let w = self.words.get_or_insert((off, end));
            *w = (w.0.min(off), w.1.max(end));
            return;
        }
        match self.ranges.last_mut() {
            Some(r) if r.1 == off => r.1 = end,
            _ => self.ranges.push((off, end)),
        }
    }
}

/// A link's window over a queue pair to the peer's devd.
pub struct VerbsWindow {
    // (Dropped in this order: the queue pair before its queue and region.)
    qp: Qp,
    cq: Cq,
    region: Region,
    halves: Halves,
    size: usize,
    peer: Option<Endpoint>,
    dirty: RefCell<Dirty>,
    /// Doorbells posted and not completed yet.
    bells_out: Cell<u32>,
    /// A send or completion failed: nothing more is sent (the peer's
    /// heartbeat stops arriving, the link goes down).
    broken: Cell<bool>,
}

impl VerbsWindow {
    /// A window of two inboxes of `size` bytes each on device `ctx`, not
    /// connected yet.
    pub fn new(ctx: &Arc<Context>, size: usize) -> io::Result<VerbsWindow> {
        let size = size.max(2 * crate::ntb::inbox::RING).next_multiple_of(4096);
        // One memory, mapped twice: the registered mapping (this node's
        // inbox first, the peer's copy after it) and the halves' view.
        let fd = ssock_rings::sys::memfd_sealed("ssock-verbs-window", 2 * size)?;
        let region = Region::new(ctx, Mapping::map(fd.as_fd(), 2 * size, true)?, true)?;
        let halves = Halves::new(Mapping::map(fd.as_fd(), 2 * size, true)?, 0, size)?;
        let cq = Cq::new(ctx, RECVS + SENDS)?;
        let qp = Qp::new(ctx, &cq, SENDS.max(RECVS))?;
        cq.arm()?;
        Ok(VerbsWindow {
            qp,
            cq,
            region,
            halves,
            size,
            peer: None,
            dirty: RefCell::new(Dirty::default()),
            bells_out: Cell::new(0),
            broken: Cell::new(false),
        })
    }

    /// Where the peer writes this node's inbox (for its `connect`).
    pub fn endpoint(&self) -> Endpoint {
        let mut e = self.qp.endpoint(&self.region);
        e.len = self.size as u64;
        e
    }

    /// Connects to the peer's queue pair and inbox (`peer`, from its
    /// `endpoint`), then sends what was written meanwhile.
    pub fn connect(&mut self, peer: Endpoint) -> io::Result<()> {
        if peer.len != self.size as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "verbs: the peer's inbox has {} bytes, this node's {}",
                    peer.len, self.size
                ),
            ));
        }
        self.qp.connect(&peer)?;
        // (Receives are posted once the queue pair is past its reset
        // state; a doorbell that comes before finds the peer retrying.)
        for _ in 0..RECVS {
            self.qp.post_recv(WR_RECV)?;
        }
        self.peer = Some(peer);
        self.publish();
        Ok(())
    }

    /// Writes `[from, to)` of the peer's copy to the peer.
    fn send_range(&mut self, peer: &Endpoint, from: usize, to: usize) -> io::Result<()> {
        // The copy follows this node's inbox in the registered memory.
        self.qp.write(
            &self.region,
            self.size + from,
            to - from,
            peer,
            from as u64,
            None,
            false,
            0,
        )
    }

    fn fail(&self, e: &dyn std::fmt::Display) {
        if !self.broken.replace(true) {
            log::warn!("verbs window: {e}; nothing more is sent on this link");
        }
    }

    /// One completion: a doorbell that came (its receive posted again),
    /// one of this node's that went, or a failure.
    fn completed(&self, c: &IbvWc) {
        if c.status != IBV_WC_SUCCESS {
            self.fail(&format!("a work request failed (status {})", c.status));
        } else if c.opcode == IBV_WC_RECV_RDMA_WITH_IMM {
            if let Err(e) = self.qp.post_recv(WR_RECV) {
                self.fail(&e);
            }
        } else if c.wr_id == WR_BELL {
            self.bells_out.set(self.bells_out.get().saturating_sub(1));
        }
    }
}

impl Window for VerbsWindow {
    fn halves(&self) -> &Halves {
        &self.halves
    }

    fn write(&self, off: usize, src: &[u8]) {
        assert!(
            off + src.len() <= self.size,
            "write beyond the peer's inbox"
        );
        self.halves.mapping().write_bytes(self.size + off, src);
        self.dirty.borrow_mut().mark(off, src.len());
    }

    fn peer_piece(&self, off: usize, len: usize) -> crate::Piece<'_> {
        assert!(off + len <= self.size, "write beyond the peer's inbox");
        // Marked now: the caller fills it before the next publish.
        self.dirty.borrow_mut().mark(off, len);
        self.halves.mapping().volatile(self.size + off, len)
    }

    fn store(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.size, "store beyond the peer's inbox");
        self.halves
            .mapping()
            .u64_at(self.size + off)
            .store(v, std::sync::atomic::Ordering::Release);
        self.dirty.borrow_mut().mark(off, 8);
    }

    fn publish(&mut self) {
        let Some(peer) = self.peer else {
            return; // kept until connected
        };
        if self.broken.get() {
            return;
        }
        let d = std::mem::take(&mut *self.dirty.borrow_mut());
        // Ring bytes first, the words (the producer among them) last: one
        // queue pair executes its writes in order.
        for (from, to) in d.ranges.iter().copied().chain(d.words) {
            if let Err(e) = self.send_range(&peer, from, to) {
                return self.fail(&e);
            }
        }
    }

    fn coherent(&self) -> bool {
        false
    }

    fn ring(&self) {
        let Some(peer) = self.peer else {
            return;
        };
        if self.broken.get() || self.bells_out.get() >= SENDS / 2 {
            return; // (the ones still out ring the peer anyway)
        }
        match self
            .qp
            .write(&self.region, 0, 0, &peer, 0, Some(0), true, WR_BELL)
        {
            Ok(()) => self.bells_out.set(self.bells_out.get() + 1),
            Err(e) => self.fail(&e),
        }
    }

    fn bell(&self) -> BorrowedFd<'_> {
        self.cq.fd()
    }

    fn drain(&mut self) {
        self.cq.take_events();
        let mut wc = [IbvWc::default(); 32];
        loop {
            let n = match self.cq.poll(&mut wc) {
                Ok(n) => n,
                Err(e) => return self.fail(&e),
            };
            for c in &wc[..n] {
                self.completed(c);
            }
            if n == wc.len() {
                continue;
            }
            // Armed, then looked at again: a completion that came in
            // between raises the channel's event, one after it is here.
            if let Err(e) = self.cq.arm() {
                return self.fail(&e);
            }
            match self.cq.poll(&mut wc) {
                Ok(0) => return,
                Ok(n) => {
                    for c in &wc[..n] {
                        self.completed(c);
                    }
                }
                Err(e) => return self.fail(&e),
            }
        }
    }
}
