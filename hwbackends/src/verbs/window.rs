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

/// Receives kept posted for the peer's doorbells (a doorbell that finds
/// none waits: the adapter retries it, and the writes behind it wait).
const RECVS: u32 = 256;
/// Send queue depth. Requests out (posted, no completion at or after
/// them yet) stay below it: a publish that would pass `SENDS - 8` waits
/// for the next turn, its ranges kept.
const SENDS: u32 = 256;
/// Every this many requests one is signaled: a send queue's entries come
/// back only with a completion at or after them.
const SIGNAL_EVERY: u64 = 32;
/// A request's id: its kind in the top byte, its number below.
const WR_RECV: u64 = 1 << 56;
const WR_BELL: u64 = 2 << 56;
const WR_WRITE: u64 = 3 << 56;
const WR_SEQ: u64 = (1 << 56) - 1;

/// What was written into the local copy of the peer's inbox since the
/// last publish: the words (a span of the inbox's first page) and ranges
/// after it.
#[derive(Default)]
struct Dirty {
    words: Option<(usize, usize)>,
    ranges: Vec<(usize, usize)>,
}

impl Dirty {
    /// The ranges after the words, in order, those that touch or overlap
    /// made one (a frame's payload is written before its header, the
    /// ring wraps): one write each.
    fn coalesced(&mut self) -> Vec<(usize, usize)> {
        self.ranges.sort_unstable();
        let mut out: Vec<(usize, usize)> = Vec::with_capacity(self.ranges.len());
        for &(a, b) in &self.ranges {
            match out.last_mut() {
                Some(l) if a <= l.1 => l.1 = l.1.max(b),
                _ => out.push((a, b)),
            }
        }
        out
    }

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
    /// Requests posted, and the number of the last one completed (every
    /// one before it is done too: a queue completes in order).
    posted: Cell<u64>,
    retired: Cell<u64>,
    /// A doorbell asked for and not posted yet (no room).
    bell_owed: Cell<bool>,
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
            posted: Cell::new(0),
            retired: Cell::new(0),
            bell_owed: Cell::new(false),
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

    /// Requests posted and not known done.
    fn out(&self) -> u64 {
        self.posted.get() - self.retired.get()
    }

    /// Posts one write (`imm`: the doorbell) as request number `posted +
    /// 1`, signaled every `SIGNAL_EVERY` and when `signal`.
    fn post(&self, peer: &Endpoint, what: Post, signal: bool) -> io::Result<()> {
        let seq = self.posted.get() + 1;
        let signaled = signal || seq.is_multiple_of(SIGNAL_EVERY);
        let r = match what {
            // The copy follows this node's inbox in the registered memory.
            // Ring bytes are not written again until the peer gave their
            // room back, after it read them: the device may read them late.
            // The words change every turn: inline, copied as posted.
            Post::Range(from, to) | Post::Words(from, to) => {
                let inline = matches!(what, Post::Words(..));
                let (off, len) = (self.size + from, to - from);
                let at = from as u64;
                let id = WR_WRITE | seq;
                self.qp
                    .write(&self.region, off, len, peer, at, None, signaled, inline, id)
            }
            Post::Bell => {
                let id = WR_BELL | seq;
                self.qp
                    .write(&self.region, 0, 0, peer, 0, Some(0), signaled, false, id)
            }
        };
        if r.is_ok() {
            self.posted.set(seq);
        }
        r
    }

    /// Posts the doorbell owed, if there is room.
    fn ring_owed(&self) {
        let Some(peer) = self.peer else {
            return;
        };
        if !self.bell_owed.get() || self.broken.get() || self.out() + 1 >= u64::from(SENDS) {
            return;
        }
        match self.post(&peer, Post::Bell, true) {
            Ok(()) => self.bell_owed.set(false),
            Err(e) => self.fail(&e),
        }
    }

    fn fail(&self, e: &dyn std::fmt::Display) {
        if !self.broken.replace(true) {
            log::warn!("verbs window: {e}; nothing more is sent on this link");
        }
    }

    /// One completion: a doorbell that came (its receive posted again),
    /// one of this node's requests done (and every one before it), or a
    /// failure.
    fn completed(&self, c: &IbvWc) {
        if c.status != IBV_WC_SUCCESS {
            self.fail(&format!("a work request failed (status {})", c.status));
        } else if c.opcode == IBV_WC_RECV_RDMA_WITH_IMM {
            if let Err(e) = self.qp.post_recv(WR_RECV) {
                self.fail(&e);
            }
        } else if c.wr_id & !WR_SEQ == WR_BELL || c.wr_id & !WR_SEQ == WR_WRITE {
            let seq = c.wr_id & WR_SEQ;
            if seq > self.retired.get() && seq <= self.posted.get() {
                self.retired.set(seq);
            }
        }
    }
}

/// What one request sends.
#[derive(Clone, Copy)]
enum Post {
    Range(usize, usize),
    Words(usize, usize),
    Bell,
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
            // (Nothing will go: nothing kept.)
            *self.dirty.borrow_mut() = Dirty::default();
            return;
        }
        let mut d = std::mem::take(&mut *self.dirty.borrow_mut());
        let ranges = d.coalesced();
        let need = ranges.len() as u64 + 2;
        if self.out() + need + 8 > u64::from(SENDS) {
            // No room: all of it at a later publish (drain calls it once
            // completions gave room back).
            d.ranges = ranges;
            *self.dirty.borrow_mut() = d;
            return;
        }
        // Ring bytes first, the words (the producer among them) last: one
        // queue pair executes its writes in order.
        for (from, to) in ranges {
            if let Err(e) = self.post(&peer, Post::Range(from, to), false) {
                return self.fail(&e);
            }
        }
        if let Some((from, to)) = d.words {
            if let Err(e) = self.post(&peer, Post::Words(from, to), false) {
                return self.fail(&e);
            }
        }
        self.ring_owed();
    }

    fn coherent(&self) -> bool {
        false
    }

    fn ring(&self) {
        // After what was published (a publish kept for want of room takes
        // the doorbell with it).
        self.bell_owed.set(true);
        if self.dirty.borrow().ranges.is_empty() && self.dirty.borrow().words.is_none() {
            self.ring_owed();
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
                Ok(0) => break,
                Ok(n) => {
                    for c in &wc[..n] {
                        self.completed(c);
                    }
                }
                Err(e) => return self.fail(&e),
            }
        }
        // What waited for room goes now.
        self.publish();
    }
}
