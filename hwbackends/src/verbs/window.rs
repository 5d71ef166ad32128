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

use super::device::{Context, Cq, Endpoint, Qp, Region, MAX_INLINE};
use super::sys::{IbvWc, IBV_WC_RECV_RDMA_WITH_IMM, IBV_WC_SUCCESS};
use crate::ntb::window::{Halves, Window};
use ssock_rings::shm::Mapping;
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

    /// Everything: the ring bytes as one range, the words after.
    fn all(&mut self, size: usize) {
        let ring = crate::ntb::inbox::RING;
        self.words = Some((0, ring));
        self.ranges = vec![(ring, size)];
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
    // (Dropped in this order: the queue pair before its queue and regions.)
    qp: Qp,
    cq: Cq,
    /// This node's inbox, which the peer may write, and the copy of the
    /// peer's, which only this node's requests read.
    inbox: Region,
    copy: Region,
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
    /// heartbeat stops arriving, the link goes down) until the link is
    /// set up again (`setup`).
    broken: Cell<bool>,
    /// Where the setup with the peer stands.
    stage: Stage,
    /// This node offers (the lower node id); the other answers.
    offers: bool,
    /// Since the last `connect`: a doorbell of the peer's came, and one
    /// of this node's requests completed. Both: the link works both
    /// ways, and the wait between setup rounds starts again from
    /// `RETRY_FIRST`.
    heard: Cell<bool>,
    acked: Cell<bool>,
    /// A setup was asked for since the link last broke (`setup_due`).
    asked: bool,
    /// The answering side sends nothing after it connected until the
    /// offering side's first doorbell came: before, that side's queue
    /// pair may not be ready yet (its answer is on the way).
    hold: Cell<bool>,
    /// Rounds of setup that did not end in a doorbell from the peer are
    /// asked for again no sooner than this (doubling, `RETRY_FIRST` to
    /// `RETRY_MAX`; back to the first once a round's link worked both
    /// ways), and `retry_at` the next time one may be.
    retry: Cell<Duration>,
    retry_at: Instant,
}

/// The first wait before a broken link's setup is asked for again, and
/// the longest.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Where a link's setup stands (docs/protocol.md 8.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Nothing offered or taken since the queue pair was made or reset.
    Fresh,
    /// This node offered its endpoint and waits for the answer.
    Offered,
    /// Connected to this endpoint of the peer's.
    Joined(Endpoint),
}

/// A setup message's kinds: an Offer of the offering side's endpoint,
/// the Answer with the other's (and the offer it answers), an Ask for a
/// new Offer (the answering side's link broke).
pub(super) const OFFER: u8 = 1;
const ANSWER: u8 = 2;
const ASK: u8 = 3;
/// A setup message's bytes: kind, version, 2 zero bytes, the sender's
/// endpoint (48 bytes), the endpoint it answers (qpn, psn; zeros if none).
pub(super) const SETUP_LEN: usize = 4 + 48 + 8;
const SETUP_VERSION: u8 = 1;

/// One setup message, checked: what it says of the peer's queue pair is
/// used only to connect to it (a wrong value makes the link fail to come
/// up, nothing else).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Setup {
    pub(super) kind: u8,
    pub(super) from: Endpoint,
    pub(super) answers: (u32, u32),
}

impl Setup {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(SETUP_LEN);
        b.extend_from_slice(&[self.kind, SETUP_VERSION, 0, 0]);
        let e = &self.from;
        b.extend_from_slice(&e.qpn.to_le_bytes());
        b.extend_from_slice(&e.psn.to_le_bytes());
        b.extend_from_slice(&e.gid);
        b.extend_from_slice(&e.addr.to_le_bytes());
        b.extend_from_slice(&e.rkey.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&e.len.to_le_bytes());
        b.extend_from_slice(&self.answers.0.to_le_bytes());
        b.extend_from_slice(&self.answers.1.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8]) -> io::Result<Setup> {
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("verbs: a setup message with {what}"),
            )
        };
        if b.len() != SETUP_LEN {
            return Err(bad(&format!("{} bytes", b.len())));
        }
        if b[1] != SETUP_VERSION || b[2..4] != [0, 0] || b[40..44] != [0; 4] {
            return Err(bad("another version"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let kind = b[0];
        if !(OFFER..=ASK).contains(&kind) {
            return Err(bad(&format!("kind {kind}")));
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[12..28]);
        let from = Endpoint {
            qpn: u32_at(4),
            psn: u32_at(8),
            gid,
            addr: u64_at(28),
            rkey: u32_at(36),
            len: u64_at(44),
        };
        let answers = (u32_at(52), u32_at(56));
        // Queue pair and packet numbers are 24 bits.
        if [from.qpn, from.psn, answers.0, answers.1]
            .iter()
            .any(|&v| v > 0x00ff_ffff)
        {
            return Err(bad("a number past 24 bits"));
        }
        Ok(Setup {
            kind,
            from,
            answers,
        })
    }
}

impl VerbsWindow {
    /// A window of two inboxes of `size` bytes each on device `ctx`, not
    /// connected yet; `offers`: this node offers its endpoint when the
    /// link is set up (the lower node id of the two), the peer answers.
    pub fn new(ctx: &Arc<Context>, size: usize, offers: bool) -> io::Result<VerbsWindow> {
        let size = size.max(2 * crate::ntb::inbox::RING).next_multiple_of(4096);
        // One memory (this node's inbox first, the peer's copy after it),
        // mapped three times: each half registered (only the inbox for the
        // peer's writes) and the halves' view.
        let fd = ssock_rings::sys::memfd_sealed("ssock-verbs-window", 2 * size)?;
        let inbox = Region::new(ctx, Mapping::map_at(fd.as_fd(), 0, size, true)?, true)?;
        let copy = Region::new(
            ctx,
            Mapping::map_at(fd.as_fd(), size as u64, size, true)?,
            false,
        )?;
        let halves = Halves::new(Mapping::map(fd.as_fd(), 2 * size, true)?, 0, size)?;
        let cq = Cq::new(ctx, RECVS + SENDS)?;
        let qp = Qp::new(ctx, &cq, SENDS.max(RECVS))?;
        cq.arm()?;
        Ok(VerbsWindow {
            qp,
            cq,
            inbox,
            copy,
            halves,
            size,
            peer: None,
            dirty: RefCell::new(Dirty::default()),
            posted: Cell::new(0),
            retired: Cell::new(0),
            bell_owed: Cell::new(false),
            broken: Cell::new(false),
            stage: Stage::Fresh,
            offers,
            heard: Cell::new(false),
            acked: Cell::new(false),
            asked: false,
            hold: Cell::new(false),
            retry: Cell::new(RETRY_FIRST),
            retry_at: Instant::now(),
        })
    }

    /// Where the peer writes this node's inbox (for its `connect`).
    pub fn endpoint(&self) -> Endpoint {
        let mut e = self.qp.endpoint(&self.inbox);
        e.len = self.size as u64;
        e
    }

    /// Connects to the peer's queue pair and inbox (`peer`, from its
    /// `endpoint`), then sends the whole copy of the peer's inbox (what
    /// was written meanwhile, and what a reset may have lost) and rings.
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
        self.heard.set(false);
        self.acked.set(false);
        self.qp.connect(&peer)?;
        // (Receives are posted once the queue pair is past its reset
        // state; a doorbell that comes before finds the peer retrying.)
        for _ in 0..RECVS {
            self.qp.post_recv(WR_RECV)?;
        }
        self.peer = Some(peer);
        self.stage = Stage::Joined(peer);
        self.asked = false;
        self.hold.set(!self.offers);
        self.dirty.borrow_mut().all(self.size);
        self.bell_owed.set(true);
        self.publish();
        Ok(())
    }

    /// A setup step failed (a device call): the link counts as broken, so
    /// that a new round is asked for, after the wait.
    fn failed_setup(&mut self, e: io::Error) -> io::Error {
        self.broken.set(true);
        self.asked = false;
        e
    }

    /// Back to a fresh queue pair: what was posted is dropped, the
    /// completions left are taken and ignored, a new starting packet
    /// number (each offer names a new one); nothing is sent until
    /// `connect`.
    fn restart(&mut self) -> io::Result<()> {
        self.peer = None;
        self.stage = Stage::Fresh;
        self.bell_owed.set(false);
        self.broken.set(false);
        self.hold.set(false);
        self.qp.reset()?;
        let mut wc = [IbvWc::default(); 32];
        while self.cq.poll(&mut wc)? == wc.len() {}
        self.retired.set(self.posted.get());
        Ok(())
    }

    fn message(&self, kind: u8, answers: (u32, u32)) -> Vec<u8> {
        Setup {
            kind,
            from: self.endpoint(),
            answers,
        }
        .encode()
    }

    /// The link's setup with the peer (docs/protocol.md 8.9): `msg` is
    /// the peer's setup message (None: the peers' control connection just
    /// came up). Returns the message to send the peer, if any. The
    /// offering side resets its queue pair and offers its endpoint; the
    /// other resets its own (unless it is already connected to that very
    /// endpoint), connects and answers with its endpoint; the offering
    /// side connects once the answer names its offer. Either side's link
    /// that breaks asks for a new round (`setup_owed`).
    fn setup_step(&mut self, msg: Option<&[u8]>) -> io::Result<Option<Vec<u8>>> {
        let Some(msg) = msg else {
            return if self.offers { self.offer() } else { Ok(None) };
        };
        let m = Setup::decode(msg)?;
        let wrong = |what: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("verbs: {what}"),
            ))
        };
        match (m.kind, self.offers) {
            (OFFER, false) => {
                if m.from.len != self.size as u64 {
                    return wrong(&format!(
                        "the peer's inbox has {} bytes, this node's {}",
                        m.from.len, self.size
                    ));
                }
                if self.stage == Stage::Joined(m.from) {
                    // The offer said again: answered as it was; but a link
                    // that broke on it waits for the new offer its Ask
                    // brings (the old one's packet numbers are spent).
                    return Ok((!self.broken.get())
                        .then(|| self.message(ANSWER, (m.from.qpn, m.from.psn))));
                }
                self.restart().map_err(|e| self.failed_setup(e))?;
                self.connect(m.from).map_err(|e| self.failed_setup(e))?;
                Ok(Some(self.message(ANSWER, (m.from.qpn, m.from.psn))))
            }
            (ANSWER, true) => {
                let mine = self.endpoint();
                if self.stage == Stage::Offered && m.answers == (mine.qpn, mine.psn) {
                    self.connect(m.from).map_err(|e| self.failed_setup(e))?;
                }
                // (Else an answer to an older offer: the newer one's comes.)
                Ok(None)
            }
            (ASK, true) => self.offer(),
            (k, _) => wrong(&format!(
                "a setup message of kind {k} where this side {}",
                if self.offers { "offers" } else { "answers" }
            )),
        }
    }

    fn offer(&mut self) -> io::Result<Option<Vec<u8>>> {
        self.restart().map_err(|e| self.failed_setup(e))?;
        self.stage = Stage::Offered;
        Ok(Some(self.message(OFFER, (0, 0))))
    }

    /// A setup message the link wants sent on its own: once after it
    /// broke (a request failed, or a setup step), a new offer (or, from
    /// the answering side, an ask for one), no sooner than `retry_at`;
    /// the wait doubles until a doorbell of the peer's comes.
    fn setup_owed(&mut self) -> Option<Vec<u8>> {
        let now = Instant::now();
        if !self.broken.get() || self.asked || now < self.retry_at {
            return None;
        }
        self.asked = true;
        let wait = self.retry.get();
        self.retry_at = now + wait;
        self.retry.set((wait * 2).min(RETRY_MAX));
        if !self.offers {
            return Some(self.message(ASK, (0, 0)));
        }
        match self.offer() {
            Ok(m) => m,
            Err(e) => {
                log::warn!("verbs window: {e}");
                None
            }
        }
    }

    /// Notes a change of the peer's inbox for the next publish (none
    /// while not connected: `connect` sends all of it).
    fn mark(&self, off: usize, len: usize) {
        if self.peer.is_some() {
            self.dirty.borrow_mut().mark(off, len);
        }
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
            // From the copy of the peer's inbox, at the same offset there.
            // Ring bytes are not written again until the peer gave their
            // room back, after it read them: the device may read them late.
            // The words change every turn: inline, copied as posted.
            Post::Range(from, to) | Post::Words(from, to, _) => {
                let inline = matches!(what, Post::Words(..));
                // The turn's last words carry the doorbell owed.
                let (imm, id) = match what {
                    Post::Words(_, _, true) => (Some(0), WR_BELL | seq),
                    _ => (None, WR_WRITE | seq),
                };
                let (off, len) = (from, to - from);
                let at = from as u64;
                self.qp
                    .write(&self.copy, off, len, peer, at, imm, signaled, inline, id)
            }
            Post::Bell => {
                let id = WR_BELL | seq;
                self.qp
                    .write(&self.copy, 0, 0, peer, 0, Some(0), signaled, false, id)
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
        if !self.bell_owed.get()
            || self.broken.get()
            || self.hold.get()
            || self.out() + 1 >= u64::from(SENDS)
        {
            return;
        }
        match self.post(&peer, Post::Bell, true) {
            Ok(()) => self.bell_owed.set(false),
            Err(e) => self.fail(&e),
        }
    }

    /// Once the link works both ways since it was set up, the next
    /// round's wait starts again from the first.
    fn proven(&self) {
        if self.heard.get() && self.acked.get() {
            self.retry.set(RETRY_FIRST);
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
            // The peer's doorbell: its queue pair is connected to this
            // one, which may send now.
            self.hold.set(false);
            self.heard.set(true);
            self.proven();
            if let Err(e) = self.qp.post_recv(WR_RECV) {
                self.fail(&e);
            }
        } else if c.wr_id & !WR_SEQ == WR_BELL || c.wr_id & !WR_SEQ == WR_WRITE {
            let seq = c.wr_id & WR_SEQ;
            if seq > self.retired.get() && seq <= self.posted.get() {
                self.retired.set(seq);
                self.acked.set(true);
                self.proven();
            }
        }
    }
}

/// What one request sends.
#[derive(Clone, Copy)]
enum Post {
    Range(usize, usize),
    /// Words, with the doorbell (`true`: an RDMA write with immediate).
    Words(usize, usize, bool),
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
        self.mark(off, src.len());
    }

    fn peer_piece(&self, off: usize, len: usize) -> crate::Piece<'_> {
        assert!(off + len <= self.size, "write beyond the peer's inbox");
        // Marked now: the caller fills it before the next publish.
        self.mark(off, len);
        self.halves.mapping().volatile(self.size + off, len)
    }

    fn store(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.size, "store beyond the peer's inbox");
        self.halves
            .mapping()
            .u64_at(self.size + off)
            .store(v, std::sync::atomic::Ordering::Release);
        self.mark(off, 8);
    }

    fn publish(&mut self) {
        let Some(peer) = self.peer else {
            return; // kept until connected
        };
        if self.hold.get() {
            return; // kept until the peer's first doorbell
        }
        if self.broken.get() {
            // (Nothing will go: nothing kept.)
            *self.dirty.borrow_mut() = Dirty::default();
            return;
        }
        let mut d = std::mem::take(&mut *self.dirty.borrow_mut());
        let ranges = d.coalesced();
        // The words go inline, in pieces of at most MAX_INLINE bytes.
        let words: Vec<(usize, usize)> = d
            .words
            .map(|(from, to)| {
                (from..to)
                    .step_by(MAX_INLINE)
                    .map(|a| (a, to.min(a + MAX_INLINE)))
                    .collect()
            })
            .unwrap_or_default();
        let need = (ranges.len() + words.len()) as u64 + 1;
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
        let last = words.len();
        for (k, (from, to)) in words.into_iter().enumerate() {
            let bell = k + 1 == last && self.bell_owed.get();
            if let Err(e) = self.post(&peer, Post::Words(from, to, bell), bell) {
                return self.fail(&e);
            }
            if bell {
                self.bell_owed.set(false);
            }
        }
        self.ring_owed();
    }

    fn coherent(&self) -> bool {
        false
    }

    fn setup(&mut self, msg: Option<&[u8]>) -> io::Result<Option<Vec<u8>>> {
        self.setup_step(msg)
    }

    fn syscalls(&self) -> Vec<crate::Syscall> {
        // Commands go to the device's fd by write (devd allows writes), or
        // by this ioctl in newer providers.
        vec![crate::Syscall {
            nr: libc::SYS_ioctl,
            arg: Some((1, vec![super::sys::RDMA_VERBS_IOCTL])),
            why: "verbs: the provider's commands to the device (RDMA_VERBS_IOCTL)",
        }]
    }

    fn setup_due(&mut self) -> Option<Vec<u8>> {
        self.setup_owed()
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
