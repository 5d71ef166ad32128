//! [`Ntb`]: channels to one peer node through a [`Window`]. Frames go
//! into the peer's inbox, each payload copied there straight from the
//! sender's source (a client's TX buffer: one copy), and are published
//! in a batch with the producer word and a doorbell at the end of the
//! engine's turn (`poll`). What arrives in this node's inbox is checked
//! and held there per channel (at most a window each, which the peer may
//! not exceed: `rxq.rs`): a reader takes it straight from the inbox, and
//! what a turn left untaken is copied out at the next poll, so that the
//! room goes back through the peer's consumer word a turn later at most;
//! a channel's receiver acknowledges what its `recv` took with an Ack
//! frame.
//!
//! Each start is a new epoch: a side reads its inbox only once the peer
//! started over for its epoch (reset its words there), and a peer seen with
//! a new epoch (it restarted) ends every channel with Reset and both sides
//! start their positions from 0. Link state comes from the heartbeat words;
//! a hostile inbox (a value that breaks the layout's rules) takes the link
//! down for good: every channel ends with Reset, nothing more is read and
//! the heartbeat stops, so that the peer sees the link down too.
//! (Epochs, heartbeat and doorbell: `link.rs`; reading the inbox:
//! `inbound.rs`.)

mod inbound;
mod link;

use super::inbox::{self, Header, Kind, HDR, MAX_PAYLOAD, RING, WORDS};
use super::rxq::RxQueue;
use super::window::Window;
use super::{BEAT, SHARED_FOR, SHARED_WINDOW};
use crate::{
    link_of, Backend, BackendError, Capabilities, ChannelId, LinkEvent, LinkId, Mark, NodeId,
    Offsets, Peer, Piece, Recv, Syscall, Words,
};
use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

/// Payloads below this size are copied out of the inbox as they are taken
/// in, unless some of their channel's are held (then they are held behind
/// them): with nothing else held in that poll, the room goes back to the
/// peer in the same poll, as a ping-pong's reply is awaited.
const HOLD_MIN: usize = 4096;
/// How often an engine that has not slept takes in the doorbell and the
/// window provider's news (peers that come and go): two system calls,
/// not made on every turn.
pub(super) const DRAIN_AWAKE: Duration = Duration::from_millis(10);

struct Chan {
    /// The peer node's channel.
    dst: ChannelId,
    /// Bytes that arrived, not yet received.
    rxq: RxQueue,
    rx_mark: Option<Mark>,
    /// A reset that came after the end of stream (`rx_mark` Eos).
    reset_after_end: bool,
    /// Bytes `recv` took (what an Ack says).
    taken: u64,
    ack_due: bool,
    out: Offsets,
    /// The mark this end sent, if it did.
    ended: Option<Mark>,
    peer_gone: bool,
    /// A send found no room in the ring: named when room comes back.
    starved: bool,
    /// The latest words that arrived, not yet taken.
    words: Option<Words>,
}

/// What the backend counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Data frames written into the peer's inbox.
    pub data: u64,
    /// Receives that took bytes straight from this node's inbox.
    pub taken_in_place: u64,
    /// Copies out of this node's inbox (a channel's held payloads, once
    /// per poll at most), their reader slow.
    pub copied_out: u64,
    /// Doorbells rung.
    pub doorbells: u64,
    /// Doorbells not rung: the peer was awake.
    pub doorbells_suppressed: u64,
    /// Frames for a channel that is not (or no longer) open here.
    pub stale: u64,
}

/// An ntb link to one peer node.
pub struct Ntb {
    peer: NodeId,
    /// Which of the links to that node (channels whose id names another
    /// are not this link's).
    link: LinkId,
    win: Box<dyn Window>,
    ring: u64,
    window: usize,
    /// This incarnation's epoch, and the peer's (0: none seen yet).
    epoch: u64,
    peer_epoch: u64,
    /// The window the peer declared (what it may send per channel).
    peer_window: usize,
    /// The peer started over for this epoch: frames flow.
    synced: bool,
    chans: HashMap<ChannelId, Chan>,
    ready: Vec<ChannelId>,
    /// Ring bytes reserved in the peer's inbox, and published.
    prod: u64,
    published: u64,
    /// How far the peer read its inbox (from this node's inbox, checked).
    peer_cons: u64,
    /// Frames that found no room yet (marks, acks, closes, words), in
    /// order, with their payload.
    ctl: VecDeque<(Header, [u8; WORDS])>,
    /// This node's read position in its inbox.
    cons: u64,
    /// Where the first payload still held in the inbox starts (its
    /// frame), if one is.
    held_from: Option<u64>,
    /// The channels holding payloads in the inbox.
    holding: Vec<ChannelId>,
    /// The consumer word this node gave the peer last.
    freed: u64,
    beat: u64,
    beat_at: Instant,
    peer_beat: u64,
    peer_seen: Instant,
    up: bool,
    hostile: bool,
    /// The channel that sent last, when, and until when the link counts
    /// as shared by several (`shared_if`), as of its last send.
    last_sender: Option<ChannelId>,
    last_send: Instant,
    pub(super) shared_until: Option<Instant>,
    /// `SHARED_FOR` (a test sets another).
    pub(super) shared_for: Duration,
    /// Taken out of service (`set_link`): no heartbeat, nothing read.
    out_of_service: bool,
    /// This side told the peer it sleeps (`idle`).
    asleep: bool,
    /// When the window's doorbell and provider news were last taken in
    /// (`Window::drain`).
    drained_at: Instant,
    /// A word was published this turn: the peer is rung at its end if it
    /// sleeps (`wake_peer`).
    bell_due: bool,
    events: Vec<LinkEvent>,
    counters: Counters,
}

impl Ntb {
    /// Link `link` to node `peer` through `win`, each channel with
    /// `window` bytes in flight at most (no more than half the ring's
    /// payload: one channel does not fill it).
    pub fn new(peer: NodeId, link: LinkId, win: Box<dyn Window>, window: usize) -> Ntb {
        let ring = u64::try_from(win.size().saturating_sub(RING)).unwrap_or(0);
        let window = window.min(usize::try_from(ring / 2).unwrap_or(usize::MAX));
        let mut e = [0u8; 8];
        let _ = ssock_rings::sys::random(&mut e);
        let epoch = u64::from_le_bytes(e).max(1);
        // The peer stops reading its inbox first (what this side wrote
        // there before is of an old epoch), then the words start over.
        win.store(inbox::OFF_SEEN, 0);
        win.store(inbox::OFF_PROD, 0);
        win.store(inbox::OFF_CONS, 0);
        win.store(inbox::OFF_ASLEEP, 0);
        win.store(
            inbox::OFF_WINDOW,
            u64::try_from(window.max(1)).unwrap_or(u64::MAX),
        );
        win.store(inbox::OFF_LINK, u64::from(link));
        win.store(inbox::OFF_EPOCH, epoch);
        win.store(inbox::OFF_VERSION, inbox::VERSION);
        win.store(inbox::OFF_MAGIC, inbox::MAGIC);
        let now = Instant::now();
        Ntb {
            peer,
            link,
            win,
            ring,
            window: window.max(1),
            epoch,
            peer_epoch: 0,
            peer_window: 0,
            synced: false,
            chans: HashMap::new(),
            ready: Vec::new(),
            prod: 0,
            published: 0,
            peer_cons: 0,
            ctl: VecDeque::new(),
            cons: 0,
            held_from: None,
            holding: Vec::new(),
            freed: 0,
            beat: 0,
            beat_at: now.checked_sub(BEAT).unwrap_or(now),
            peer_beat: 0,
            peer_seen: now,
            up: false,
            hostile: false,
            out_of_service: false,
            asleep: false,
            drained_at: now,
            bell_due: false,
            events: Vec::new(),
            counters: Counters::default(),
            last_sender: None,
            last_send: now,
            shared_until: None,
            shared_for: SHARED_FOR,
        }
    }

    /// Until when the link counts as shared by several channels if `ch`
    /// sends at `now` (None: `ch` may have the whole window in flight):
    /// `shared_for` after a send of one channel followed one of another
    /// within that time.
    fn shared_if(&self, ch: ChannelId, now: Instant) -> Option<Instant> {
        let switched = self.last_sender.is_some_and(|l| l != ch);
        if switched && now < self.last_send + self.shared_for {
            Some(now + self.shared_for)
        } else {
            self.shared_until.filter(|&t| now < t)
        }
    }

    /// What was counted so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Whether the peer's heartbeat is current.
    pub fn link_up(&self) -> bool {
        self.up && !self.hostile
    }

    fn room(&self) -> u64 {
        self.ring.saturating_sub(self.prod - self.peer_cons)
    }

    /// Copies `b` into the peer's ring at position `pos`, wrapping.
    fn ring_write(&self, pos: u64, b: &[u8]) {
        let at = usize::try_from(pos % self.ring).unwrap_or(0);
        let ring = usize::try_from(self.ring).unwrap_or(0);
        let first = b.len().min(ring - at);
        self.win.write(RING + at, &b[..first]);
        if first < b.len() {
            self.win.write(RING, &b[first..]);
        }
    }

    /// Has `fill` write `n` bytes straight into the peer's ring at
    /// position `pos`, wrapping: one or two pieces.
    fn ring_fill(
        &self,
        pos: u64,
        n: usize,
        fill: &mut dyn FnMut(usize, Piece<'_>) -> bool,
    ) -> bool {
        let at = usize::try_from(pos % self.ring).unwrap_or(0);
        let ring = usize::try_from(self.ring).unwrap_or(0);
        let first = n.min(ring - at);
        fill(0, self.win.peer_piece(RING + at, first))
            && (first == n || fill(first, self.win.peer_piece(RING, n - first)))
    }

    /// Copies from this node's ring at position `pos`, wrapping.
    fn ring_read(&self, pos: u64, b: &mut [u8]) {
        ring_read(&*self.win, self.ring, pos, b);
    }

    /// Reserves and writes a frame now if the ring has room.
    fn put(&mut self, h: &Header, payload: &[u8]) -> bool {
        let size = inbox::frame_size(h.len) as u64;
        if size > self.room() {
            return false;
        }
        let pos = self.prod;
        self.prod += size;
        self.ring_write(pos, &inbox::encode(h));
        if !payload.is_empty() {
            self.ring_write(pos + HDR as u64, payload);
        }
        true
    }

    /// A control frame (mark, ack, close, words: `payload`, of which the
    /// header says how much), after every frame before it. Words waiting
    /// for room replace the channel's words already waiting.
    fn put_ctl(&mut self, h: Header, payload: [u8; WORDS]) {
        if h.kind == Kind::Words {
            if let Some(w) = self
                .ctl
                .iter_mut()
                .find(|(q, _)| q.kind == Kind::Words && q.src == h.src && q.dst == h.dst)
            {
                w.1 = payload;
                return;
            }
        }
        if !self.synced || !self.ctl.is_empty() || !self.put(&h, &payload[..h.len]) {
            self.ctl.push_back((h, payload));
        }
    }

    /// The control frames that wait, the acks due; then
    /// the producer word and one doorbell.
    fn flush(&mut self) {
        if !self.synced {
            return;
        }
        while let Some(&(h, payload)) = self.ctl.front() {
            if !self.put(&h, &payload[..h.len]) {
                break;
            }
            self.ctl.pop_front();
        }
        // Acks wait (still due) while older frames do: the queue holds at
        // most one frame per channel mark and close.
        let due: Vec<(ChannelId, ChannelId, u64)> = self
            .chans
            .iter_mut()
            .filter(|_| self.ctl.is_empty())
            .filter(|(_, c)| c.ack_due && !c.peer_gone)
            .map(|(&ch, c)| {
                c.ack_due = false;
                (ch, c.dst, c.taken)
            })
            .collect();
        for (ch, dst, taken) in due {
            let h = Header {
                kind: Kind::Ack,
                len: 8,
                dst,
                src: ch,
            };
            self.put_ctl(h, payload(&[taken]));
        }
        if self.prod != self.published {
            self.published = self.prod;
            self.win.store(inbox::OFF_PROD, self.published);
            self.bell_due = true;
        }
    }
}

impl Backend for Ntb {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "ntb",
            remote: true,
            window: self.window,
            passive: false,
        }
    }

    fn readiness(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.win.bell()]
    }

    fn poll(&mut self, ready: &mut Vec<ChannelId>) {
        let now = Instant::now();
        let slept = std::mem::take(&mut self.asleep);
        if slept {
            self.win.store(inbox::OFF_ASLEEP, 0);
        }
        // A synced peer on a coherent window rings only while this side
        // says it sleeps: an awake engine's turns make no system call for
        // the bell (a ring that raced with the wake-up keeps the bell
        // readable, and the next sleep's wait returns at once to take it).
        // After a sleep, and at every turn on a link not synced, silenced
        // or not coherent (whose peer rings as it likes, and whose `idle`
        // says no sleep in the window), the bell is taken in.
        let quiet = self.synced && !self.hostile && !self.out_of_service && self.win.coherent();
        if slept || !quiet || now.duration_since(self.drained_at) >= DRAIN_AWAKE {
            self.drained_at = now;
            self.win.drain();
        }
        self.copy_out();
        self.sync();
        self.link(now);
        self.take_in();
        self.give_room();
        self.flush();
        if self.bell_due && !self.win.coherent() {
            // Rung always: asked before the publish, the doorbell goes
            // with the turn's last write (one message fewer).
            self.bell_due = false;
            self.win.ring();
            self.counters.doorbells += 1;
        }
        self.win.publish();
        if std::mem::take(&mut self.bell_due) {
            self.wake_peer();
        }
        ready.append(&mut self.ready);
    }

    fn deadline(&self) -> Option<Duration> {
        // Silent (hostile, or out of service): no heartbeat to send, and
        // nothing read until it is put back.
        (!self.hostile && !self.out_of_service).then(|| BEAT.saturating_sub(self.beat_at.elapsed()))
    }

    fn idle(&mut self) -> bool {
        // (A window that is not coherent is rung after every turn that
        // published: its `asleep` word would only cost two writes.)
        if self.hostile || self.out_of_service || !self.synced || !self.win.coherent() {
            return true;
        }
        self.win.store(inbox::OFF_ASLEEP, 1);
        self.win.publish();
        self.asleep = true;
        // Pairs with the fence in `wake_peer`: either the peer sees this
        // word, or this look sees what it published.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if self.news_waiting() {
            // Not sleeping after all: not rung for nothing meanwhile.
            self.win.store(inbox::OFF_ASLEEP, 0);
            self.win.publish();
            self.asleep = false;
            return false;
        }
        true
    }

    fn news_waiting(&self) -> bool {
        // Frames published in this node's inbox, or room given back in
        // the peer's (only looked at: `poll` checks them).
        self.synced
            && !self.hostile
            && !self.out_of_service
            && self.ring != 0
            && (self.win.load(inbox::OFF_PROD) != self.cons
                || self.win.load(inbox::OFF_CONS) != self.peer_cons)
    }

    fn open(&mut self, ch: ChannelId, peer: Peer) -> Result<(), BackendError> {
        let Peer::Remote { node, channel } = peer else {
            return Err(BackendError::Unreachable(ch));
        };
        if node != self.peer || link_of(ch) != self.link || self.hostile {
            return Err(BackendError::Unreachable(ch));
        }
        if self.chans.contains_key(&ch) {
            return Err(BackendError::Busy(ch));
        }
        self.chans.insert(
            ch,
            Chan {
                dst: channel,
                rxq: RxQueue::default(),
                rx_mark: None,
                reset_after_end: false,
                taken: 0,
                ack_due: false,
                out: Offsets::default(),
                ended: None,
                peer_gone: false,
                starved: false,
                words: None,
            },
        );
        Ok(())
    }

    fn send_with(
        &mut self,
        ch: ChannelId,
        len: usize,
        fill: &mut dyn FnMut(usize, Piece<'_>) -> bool,
    ) -> Result<usize, BackendError> {
        let c = self.chans.get(&ch).ok_or(BackendError::NoChannel(ch))?;
        if c.ended.is_some() {
            return Err(BackendError::Ended(ch));
        }
        if c.peer_gone {
            return Err(BackendError::PeerGone(ch));
        }
        if len == 0 {
            return Ok(0);
        }
        if !self.synced {
            if let Some(c) = self.chans.get_mut(&ch) {
                c.starved = true;
            }
            return Ok(0);
        }
        let in_flight = usize::try_from(c.out.sent - c.out.acked).unwrap_or(usize::MAX);
        let dst = c.dst;
        let now = Instant::now();
        let shared = self.shared_if(ch, now);
        let window = match shared {
            Some(_) => self.window.min(SHARED_WINDOW),
            None => self.window,
        };
        let credit = window.saturating_sub(in_flight);
        if credit == 0 {
            return Ok(0); // the peer's ack names this channel
        }
        let room = usize::try_from(self.room()).unwrap_or(usize::MAX);
        // Frames before this one wait for room: nothing overtakes them.
        let n = if self.ctl.is_empty() {
            len.min(credit)
                .min(MAX_PAYLOAD)
                .min(room.saturating_sub(HDR) & !7)
        } else {
            0
        };
        if n == 0 {
            if let Some(c) = self.chans.get_mut(&ch) {
                c.starved = true;
            }
            return Ok(0);
        }
        let h = Header {
            kind: Kind::Data,
            len: n,
            dst,
            src: ch,
        };
        // Straight from the source into the frame's place in the peer's
        // ring; published (the producer word) at the end of the turn.
        let pos = self.prod;
        if !self.ring_fill(pos + HDR as u64, n, fill) {
            return Ok(0); // beyond the producer: never published
        }
        self.ring_write(pos, &inbox::encode(&h));
        self.prod += inbox::frame_size(n) as u64;
        self.counters.data += 1;
        // A send: the link's sharing as it said.
        (self.shared_until, self.last_sender, self.last_send) = (shared, Some(ch), now);
        if let Some(c) = self.chans.get_mut(&ch) {
            c.out.sent += n as u64;
        }
        Ok(n)
    }

    fn send_mark(&mut self, ch: ChannelId, mark: Mark) -> Result<(), BackendError> {
        let c = self.chans.get_mut(&ch).ok_or(BackendError::NoChannel(ch))?;
        // After its end of stream, a reset still goes (an abortive close
        // after shutdown(SHUT_WR)); nothing else follows a mark.
        let late = c.ended == Some(Mark::Eos) && mark == Mark::Reset;
        if c.ended.is_some() && !late {
            return Ok(());
        }
        c.ended = Some(mark);
        let dst = c.dst;
        if c.peer_gone {
            return Ok(());
        }
        let kind = if mark == Mark::Eos {
            Kind::Eos
        } else {
            // Nothing sent waits for its acknowledgement any more (the
            // peer still takes what it received, then the mark).
            c.out.acked = c.out.sent;
            self.ready.push(ch);
            Kind::Reset
        };
        let h = Header {
            kind,
            len: 0,
            dst,
            src: ch,
        };
        self.put_ctl(h, [0; WORDS]);
        Ok(())
    }

    fn recv_with(
        &mut self,
        ch: ChannelId,
        take: &mut dyn FnMut(Piece<'_>) -> usize,
    ) -> Result<Recv, BackendError> {
        let c = self.chans.get_mut(&ch).ok_or(BackendError::NoChannel(ch))?;
        if c.rxq.is_empty() {
            return Ok(match c.rx_mark {
                Some(m) => Recv::Mark(m),
                None => Recv::Empty,
            });
        }
        let held = c.rxq.held();
        let n = c.rxq.take(&*self.win, self.ring, take);
        if c.rxq.held() < held {
            self.counters.taken_in_place += 1;
        }
        if n > 0 {
            c.taken += n as u64;
            c.ack_due = true;
        }
        Ok(Recv::Data(n))
    }

    fn pending(&self, ch: ChannelId) -> usize {
        self.chans.get(&ch).map_or(0, |c| c.rxq.len())
    }

    fn mark_arrived(&self, ch: ChannelId) -> Option<Mark> {
        let c = self.chans.get(&ch)?;
        if c.reset_after_end {
            return Some(Mark::Reset);
        }
        c.rx_mark
    }

    fn end_before_reset(&self, ch: ChannelId) -> bool {
        self.chans.get(&ch).is_some_and(|c| c.reset_after_end)
    }

    fn offsets(&self, ch: ChannelId) -> Option<Offsets> {
        self.chans.get(&ch).map(|c| c.out)
    }

    fn close(&mut self, ch: ChannelId) {
        let Some(c) = self.chans.remove(&ch) else {
            return;
        };
        if !c.peer_gone {
            let h = Header {
                kind: Kind::Gone,
                len: 0,
                dst: c.dst,
                src: ch,
            };
            self.put_ctl(h, [0; WORDS]);
        }
    }

    fn send_words(&mut self, ch: ChannelId, words: Words) -> Result<(), BackendError> {
        let c = self.chans.get(&ch).ok_or(BackendError::NoChannel(ch))?;
        if c.peer_gone {
            return Err(BackendError::PeerGone(ch));
        }
        let h = Header {
            kind: Kind::Words,
            len: WORDS,
            dst: c.dst,
            src: ch,
        };
        self.put_ctl(h, payload(&words));
        Ok(())
    }

    fn recv_words(&mut self, ch: ChannelId) -> Option<Words> {
        self.chans.get_mut(&ch)?.words.take()
    }

    fn set_link(
        &mut self,
        node: NodeId,
        link: Option<LinkId>,
        up: bool,
    ) -> Result<(), BackendError> {
        if node != self.peer || link.is_some_and(|l| l != self.link) {
            return Err(BackendError::NoLink(node));
        }
        if up != self.out_of_service {
            return Ok(());
        }
        self.out_of_service = !up;
        if up {
            // Up again once a heartbeat of the peer's is seen (`link`).
            self.peer_seen = Instant::now();
            self.beat_at = self.beat_at.checked_sub(BEAT).unwrap_or(self.beat_at);
        } else if self.up {
            self.went_down();
        }
        Ok(())
    }

    fn link_events(&mut self) -> Vec<LinkEvent> {
        std::mem::take(&mut self.events)
    }

    fn setup(&mut self, node: NodeId, msg: Option<(LinkId, &[u8])>) -> Vec<(LinkId, Vec<u8>)> {
        if node != self.peer || msg.is_some_and(|(l, _)| l != self.link) {
            return Vec::new();
        }
        match self.win.setup(msg.map(|(_, m)| m)) {
            Ok(m) => m.map(|m| (self.link, m)).into_iter().collect(),
            Err(e) => {
                log::warn!("link {} to node {node}: {e}", self.link);
                Vec::new()
            }
        }
    }

    fn setup_due(&mut self) -> Vec<(NodeId, LinkId, Vec<u8>)> {
        let due = self.win.setup_due();
        due.map(|m| (self.peer, self.link, m)).into_iter().collect()
    }

    fn syscalls(&self) -> Vec<Syscall> {
        // Doorbells are eventfd reads and writes, which devd's engine
        // already makes; the window may need more.
        self.win.syscalls()
    }
}

/// A control frame's payload bytes: `words` little-endian, then zeros.
fn payload(words: &[u64]) -> [u8; WORDS] {
    let mut b = [0u8; WORDS];
    for (i, w) in words.iter().take(WORDS / 8).enumerate() {
        b[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// Copies from a node's ring in `win` (of `ring` bytes) at position
/// `pos`, wrapping.
fn ring_read(win: &dyn Window, ring: u64, pos: u64, b: &mut [u8]) {
    let at = usize::try_from(pos % ring).unwrap_or(0);
    let ring = usize::try_from(ring).unwrap_or(0);
    let first = b.len().min(ring - at);
    win.read(RING + at, &mut b[..first]);
    if first < b.len() {
        win.read(RING, &mut b[first..]);
    }
}
