//! The stream ring: a single-producer single-consumer byte ring in a Direct
//! region, one per direction, with end-of-stream and reset marks.
//!
//! Positions (`head`, `tail`) count bytes since the connection started and
//! never wrap in practice (u64). Each side keeps its own position privately
//! and only *publishes* it; the other side's position is read once, checked
//! (`tail <= head <= tail + cap`, monotonic), and only then used. A check
//! that fails is a protocol violation: the caller resets this connection.
//!
//! Wake-ups: a side about to sleep stores the id of the doorbell it sleeps
//! on (its process's, see [`Doorbells`]) and then an odd "sleep epoch" in
//! its wait word, then re-checks the ring; the other side, after
//! publishing, reads that word and rings the doorbell it names only if it
//! is odd and not yet rung. A SeqCst fence on both sides between the store and the load makes
//! this Dekker-style handshake sound: at least one of them sees the other.
//! A busy connection therefore makes no syscalls at all.

use crate::idx;
use crate::layout::{DirOffsets, DirectLayout, FLAG_EOS, FLAG_RESET};
use crate::shm::Mapping;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// The peer broke the ring protocol; the connection must be reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer broke the stream ring protocol: {0}")]
pub struct Violation(pub &'static str);

/// What a read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes were copied out.
    Data(usize),
    /// The ring is empty and the producer is still open.
    Empty,
    /// The producer closed after the last byte (FIN).
    Eos,
    /// The producer reset the connection.
    Reset,
}

/// How a ring end rings a sleeping peer's doorbell by the id the peer
/// wrote (untrusted: a wrong one only wakes somebody for nothing, or
/// nobody).
pub trait Doorbells: Send + Sync + std::fmt::Debug {
    /// Rings doorbell `id`; false if there is no such doorbell here.
    fn ring(&self, id: u32) -> bool;
}

/// Counters a side keeps of its notifications (mirrored into the region for ringstat).
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    sent: u64,
    suppressed: u64,
}

/// Writing end of one direction.
#[derive(Debug)]
pub struct Producer {
    map: Arc<Mapping>,
    o: DirOffsets,
    cap: u64,
    head: u64,
    tail_seen: u64,
    /// The stream position at ring offset 0 (see `DirOffsets::base`).
    base: u64,
    /// Next head at which to look whether the ring is empty (to move base).
    rebase_at: u64,
    bells: Arc<dyn Doorbells>,
    last_rung: u32,
    epoch: u32,
    n: Counters,
    eos: bool,
}

/// Reading end of one direction.
#[derive(Debug)]
pub struct Consumer {
    map: Arc<Mapping>,
    o: DirOffsets,
    cap: u64,
    tail: u64,
    head_seen: u64,
    bells: Arc<dyn Doorbells>,
    last_rung: u32,
    epoch: u32,
    n: Counters,
}

/// Bytes written past `base` before the producer looks (once) whether the
/// ring is empty, to start again at offset 0: small messages then stay
/// within the first few KiB of the ring, in the caches of both cores,
/// instead of walking a ring larger than L2 (measured: a 1 KiB ping-pong
/// on a 1 MiB ring took 2.3 us instead of 0.3).
const REBASE_SPAN: u64 = 16 * 1024;

/// No stream reaches this position (4 EiB): a larger own position read back
/// from the region was written by somebody else, and adding to it could
/// overflow.
const MAX_POSITION: u64 = 1 << 62;

/// A large write (read) publishes its head (tail) after each this many
/// bytes, not only at its end: the consumer (producer) copies the first
/// part out (frees its room) while the rest is copied, as the kernel's
/// loopback hands a large send on one segment at a time. One whole-ring
/// copy published at its end would leave each side waiting while the
/// other copies (OpenMPI's 1 MiB messages: half the copy rate).
const PUBLISH_EVERY: usize = 64 * 1024;

/// The odd epoch of a new sleep on `wait_word`: after the newer of this
/// holder's last one (`own`) and the word's (another process holding the
/// same end, or one it came from, may have slept there since, or before
/// this one started counting at 0): a value the waker rang for already
/// would not be rung again, and the sleep would last its whole cap.
fn next_epoch(map: &Mapping, wait_word: usize, own: u32) -> u32 {
    // Relaxed: only this side's holders store it; the value only has to
    // differ from those stored before.
    let cur = map.u32_at(wait_word).load(Ordering::Relaxed);
    let newer = if cur.wrapping_sub(own) < 1 << 31 {
        cur
    } else {
        own
    };
    newer.wrapping_add(2) | 1
}

/// Publishes a sleep: the doorbell to ring, then the odd epoch (Release:
/// a waker that sees the epoch sees the id). The caller's SeqCst fence
/// follows.
fn sleep_on(map: &Mapping, wait_word: usize, bell_word: usize, epoch: u32, bell: u32) {
    // Relaxed: ordered before the epoch by its Release store.
    map.u32_at(bell_word).store(bell, Ordering::Relaxed);
    map.u32_at(wait_word).store(epoch, Ordering::Release);
}

fn copy_in(map: &Mapping, data: usize, cap: u64, pos: u64, src: &[u8]) {
    let off = idx(pos % cap);
    let first = src.len().min(idx(cap) - off);
    map.write_bytes(data + off, &src[..first]);
    if first < src.len() {
        map.write_bytes(data, &src[first..]);
    }
}

fn copy_out(map: &Mapping, data: usize, cap: u64, pos: u64, dst: &mut [u8]) {
    let off = idx(pos % cap);
    let first = dst.len().min(idx(cap) - off);
    map.read_bytes(data + off, &mut dst[..first]);
    if first < dst.len() {
        map.read_bytes(data, &mut dst[first..]);
    }
}

/// Rings the doorbell named at `bell_word` if the peer's wait word at
/// `wait_word` says it is asleep and we have not rung for this sleep yet;
/// counts the outcome. Call after a SeqCst fence that follows the publish.
fn wake(
    map: &Mapping,
    wait_word: usize,
    bell_word: usize,
    last_rung: &mut u32,
    bells: &dyn Doorbells,
    n: &mut Counters,
) {
    // Acquire: pairs with the Release store of the odd epoch in `sleep_on`,
    // so the bell id written before it is the one read here.
    let w = map.u32_at(wait_word).load(Ordering::Acquire);
    if w & 1 == 1 && w != *last_rung {
        // A doorbell that could not be rung is tried again at the next
        // publish; meanwhile the peer has its bounded sleep and its
        // liveness fd.
        if bells.ring(map.u32_at(bell_word).load(Ordering::Relaxed)) {
            *last_rung = w;
        }
        n.sent += 1;
    } else {
        n.suppressed += 1;
    }
}

impl Producer {
    /// The producer end of direction `d` of a mapped Direct region. Starts
    /// from the positions currently published (zero for a fresh region;
    /// an end taken over from another process may hold bytes its consumer
    /// has not taken yet).
    pub fn new(
        map: Arc<Mapping>,
        layout: DirectLayout,
        d: usize,
        bells: Arc<dyn Doorbells>,
    ) -> Self {
        let o = layout.dir(d);
        let cap = layout.cap as u64;
        // Relaxed: at attach time nobody else writes our own head.
        let head = map.u64_at(o.head).load(Ordering::Relaxed);
        let base = map.u64_at(o.base).load(Ordering::Relaxed);
        // Acquire: as in `refresh_tail`. A tail out of bounds is the
        // consumer's violation, found at the first look (it is then below
        // or above `head`).
        let tail = map.u64_at(o.tail).load(Ordering::Acquire);
        let tail_seen = if tail <= head && head - tail <= cap {
            tail
        } else {
            head
        };
        Producer {
            o,
            cap,
            head,
            tail_seen,
            base,
            rebase_at: head,
            bells,
            last_rung: 0,
            epoch: 0,
            n: Counters::default(),
            eos: map.u32_at(o.flags).load(Ordering::Relaxed) & FLAG_EOS != 0,
            map,
        }
    }

    /// Reads and checks the consumer's published tail.
    fn refresh_tail(&mut self) -> Result<(), Violation> {
        // Acquire: the consumer's copies out of the ring happen before its
        // tail store (Release); we may overwrite those bytes only after.
        let t = self.map.u64_at(self.o.tail).load(Ordering::Acquire);
        if t < self.tail_seen || t > self.head {
            return Err(Violation("consumer tail moved backwards or past head"));
        }
        self.tail_seen = t;
        Ok(())
    }

    /// Bytes that can be written now.
    pub fn writable(&mut self) -> Result<usize, Violation> {
        self.resync()?;
        self.refresh_tail()?;
        Ok(idx(self.cap - (self.head - self.tail_seen)))
    }

    /// Whether the consumer has closed its end (writes would be lost: EPIPE).
    pub fn peer_closed(&self) -> bool {
        self.map.u32_at(self.o.cons_closed).load(Ordering::Acquire) != 0
    }

    /// Catches up with writes another process holding this end (after
    /// fork or fd passing) made since our last call: our own head in the
    /// region is the truth, the cached copy only a shortcut.
    fn resync(&mut self) -> Result<(), Violation> {
        // Relaxed: only our side's processes store this word, and they
        // hand the end over through fork, exec or a socket, which order it.
        let h = self.map.u64_at(self.o.head).load(Ordering::Relaxed);
        if h != self.head {
            if h >= MAX_POSITION {
                return Err(Violation("own head beyond any stream's length"));
            }
            self.refresh_tail_upto(h)?;
            self.head = h;
            self.base = self.map.u64_at(self.o.base).load(Ordering::Relaxed);
            self.rebase_at = h;
        }
        Ok(())
    }

    fn refresh_tail_upto(&mut self, head: u64) -> Result<(), Violation> {
        let t = self.map.u64_at(self.o.tail).load(Ordering::Acquire);
        if t > head || head - t > self.cap {
            return Err(Violation("own head out of the ring's bounds"));
        }
        self.tail_seen = t;
        Ok(())
    }

    /// Copies as much of `buf` as fits; returns the count (0: full).
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, Violation> {
        self.resync()?;
        let mut free = self.cap - (self.head - self.tail_seen);
        if free < buf.len() as u64 {
            self.refresh_tail()?;
            free = self.cap - (self.head - self.tail_seen);
        }
        let n = buf.len().min(idx(free));
        if n == 0 {
            return Ok(0);
        }
        if self.head >= self.rebase_at && self.head != self.base {
            self.rebase_at = self.head.saturating_add(REBASE_SPAN);
            self.refresh_tail()?;
            if self.tail_seen == self.head {
                // Empty: the consumer reads nothing until the head store
                // below, which (Release) publishes this base with it.
                self.base = self.head;
                self.map
                    .u64_at(self.o.base)
                    .store(self.base, Ordering::Relaxed);
            }
        }
        for part in buf[..n].chunks(PUBLISH_EVERY) {
            copy_in(
                &self.map,
                self.o.data,
                self.cap,
                self.head.wrapping_sub(self.base),
                part,
            );
            self.head += part.len() as u64;
            // Release: the bytes copied above become visible before the
            // new head.
            self.map
                .u64_at(self.o.head)
                .store(self.head, Ordering::Release);
            self.wake_consumer();
        }
        Ok(n)
    }

    fn wake_consumer(&mut self) {
        // SeqCst fence: orders our head/flags store before the load of the
        // consumer's wait word (pairs with the fence in Consumer::arm).
        fence(Ordering::SeqCst);
        wake(
            &self.map,
            self.o.cons_wait,
            self.o.cons_bell,
            &mut self.last_rung,
            &*self.bells,
            &mut self.n,
        );
        self.publish_counters();
    }

    fn publish_counters(&self) {
        // Relaxed: statistics only; this side is the only writer.
        self.map
            .u64_at(self.o.prod_notify_sent)
            .store(self.n.sent, Ordering::Relaxed);
        self.map
            .u64_at(self.o.prod_notify_suppressed)
            .store(self.n.suppressed, Ordering::Relaxed);
    }

    /// The shared words a writer's readiness depends on, as they are now
    /// (`Transport::quiet_sig`): the consumer's tail and closed mark, and
    /// this direction's head and marks (any holder's writes and closes).
    pub fn quiet_sig(&self) -> [u64; 4] {
        // Acquire: as the readiness these stand for reads them.
        [
            self.map.u64_at(self.o.tail).load(Ordering::Acquire),
            u64::from(self.map.u32_at(self.o.cons_closed).load(Ordering::Acquire)),
            self.map.u64_at(self.o.head).load(Ordering::Acquire),
            u64::from(self.map.u32_at(self.o.flags).load(Ordering::Acquire)),
        ]
    }

    /// Marks end of stream after the last byte written (shutdown(SHUT_WR)).
    pub fn close(&mut self) {
        self.set_flag(FLAG_EOS);
        self.eos = true;
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.eos
    }

    /// Whether any holder of this end closed the direction (its end of
    /// stream mark, which every holder's `close` publishes).
    pub fn closed_by_any(&self) -> bool {
        // Acquire: as the consumer reads the mark.
        self.eos || self.map.u32_at(self.o.flags).load(Ordering::Acquire) & FLAG_EOS != 0
    }

    /// Marks the stream reset (abortive close, or a protocol violation seen).
    pub fn reset(&mut self) {
        self.set_flag(FLAG_RESET);
    }

    fn set_flag(&mut self, f: u32) {
        // Release: everything written before the mark is visible with it.
        self.map.u32_at(self.o.flags).fetch_or(f, Ordering::Release);
        self.wake_consumer();
    }

    /// Announces a sleep on doorbell `bell` until the consumer takes bytes,
    /// whatever the ring holds now (the caller re-checks what it waits for
    /// afterwards).
    pub fn arm_always(&mut self, bell: u32) {
        self.epoch = next_epoch(&self.map, self.o.prod_wait, self.epoch);
        sleep_on(
            &self.map,
            self.o.prod_wait,
            self.o.prod_bell,
            self.epoch,
            bell,
        );
        // SeqCst fence: as in `arm`.
        fence(Ordering::SeqCst);
    }

    /// Announces that this side will sleep on doorbell `bell` until space
    /// frees up. Returns false (and stays awake) if space is already there.
    pub fn arm(&mut self, bell: u32) -> Result<bool, Violation> {
        self.epoch = next_epoch(&self.map, self.o.prod_wait, self.epoch);
        sleep_on(
            &self.map,
            self.o.prod_wait,
            self.o.prod_bell,
            self.epoch,
            bell,
        );
        // SeqCst fence: the wait word store is ordered before re-reading
        // the tail (pairs with the fence in Consumer::wake_producer).
        fence(Ordering::SeqCst);
        if self.writable()? > 0 || self.peer_closed() {
            self.disarm();
            return Ok(false);
        }
        Ok(true)
    }

    /// Ends a sleep announced by `arm`.
    pub fn disarm(&mut self) {
        self.epoch = self.epoch.wrapping_add(1) & !1;
        self.map
            .u32_at(self.o.prod_wait)
            .store(self.epoch, Ordering::Relaxed);
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.head
    }

    /// Bytes the consumer had taken when last looked at.
    pub fn consumed_seen(&self) -> u64 {
        self.tail_seen
    }

    /// Bytes written but not yet consumed (as last seen).
    pub fn unconsumed(&mut self) -> Result<u64, Violation> {
        self.refresh_tail()?;
        Ok(self.head - self.tail_seen)
    }

    /// Bytes written so far by every holder of this end (caught up with
    /// writes another process holding it made).
    pub fn position_now(&mut self) -> Result<u64, Violation> {
        self.resync()?;
        Ok(self.head)
    }

    /// A copy of the bytes written from stream position `from` on, which
    /// the consumer has not taken (it stopped at `from`: the move back to
    /// the kernel socket, docs/protocol.md section 2.4). `from` is the
    /// other end's word: checked against what this end wrote and what
    /// the ring still holds.
    pub fn unconsumed_from(&mut self, from: u64) -> Result<Vec<u8>, Violation> {
        self.resync()?;
        self.refresh_tail()?;
        // Relaxed: only this side moves base.
        let base = self.map.u64_at(self.o.base).load(Ordering::Relaxed);
        if from > self.head || self.head - from > self.cap || from < base || from < self.tail_seen {
            return Err(Violation("closing offset outside what the ring holds"));
        }
        let mut out = vec![0; idx(self.head - from)];
        copy_out(
            &self.map,
            self.o.data,
            self.cap,
            from.wrapping_sub(base),
            &mut out,
        );
        Ok(out)
    }

    /// Wakes the consumer if it sleeps (after a hand-over word changed
    /// that it must look at).
    pub fn nudge(&mut self) {
        self.wake_consumer();
    }
}

impl Consumer {
    /// The consumer end of direction `d` of a mapped Direct region.
    pub fn new(
        map: Arc<Mapping>,
        layout: DirectLayout,
        d: usize,
        bells: Arc<dyn Doorbells>,
    ) -> Self {
        let o = layout.dir(d);
        // Relaxed: at attach time nobody else writes our own tail.
        let tail = map.u64_at(o.tail).load(Ordering::Relaxed);
        Consumer {
            o,
            cap: layout.cap as u64,
            tail,
            head_seen: tail,
            bells,
            last_rung: 0,
            epoch: 0,
            n: Counters::default(),
            map,
        }
    }

    fn refresh_head(&mut self) -> Result<(), Violation> {
        // Acquire: pairs with the producer's Release head store, so the
        // bytes up to head are visible before we copy them.
        let h = self.map.u64_at(self.o.head).load(Ordering::Acquire);
        if h < self.head_seen || h - self.tail > self.cap {
            return Err(Violation(
                "producer head moved backwards or beyond capacity",
            ));
        }
        self.head_seen = h;
        Ok(())
    }

    /// Bytes ready to read now.
    pub fn readable(&mut self) -> Result<usize, Violation> {
        self.resync()?;
        self.refresh_head()?;
        Ok(idx(self.head_seen - self.tail))
    }

    /// The shared words a reader's readiness depends on, as they are now
    /// (`Transport::quiet_sig`): the producer's head and marks, and this
    /// direction's tail (any holder's reads).
    pub fn quiet_sig(&self) -> [u64; 3] {
        [
            self.map.u64_at(self.o.head).load(Ordering::Acquire),
            u64::from(self.flags()),
            self.map.u64_at(self.o.tail).load(Ordering::Acquire),
        ]
    }

    fn flags(&self) -> u32 {
        // Acquire: pairs with the Release in Producer::set_flag, so a head
        // published before the mark is visible after seeing it.
        self.map.u32_at(self.o.flags).load(Ordering::Acquire)
    }

    /// Copies out up to `buf.len()` bytes, or reports the ring's state.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, Violation> {
        self.take(buf, true)
    }

    /// Like `read` without consuming (MSG_PEEK).
    pub fn peek(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, Violation> {
        self.take(buf, false)
    }

    /// Catches up with reads another process holding this end made (see
    /// `Producer::resync`).
    fn resync(&mut self) -> Result<(), Violation> {
        // Relaxed: as in Producer::resync.
        let t = self.map.u64_at(self.o.tail).load(Ordering::Relaxed);
        if t != self.tail {
            if t >= MAX_POSITION {
                return Err(Violation("own tail beyond any stream's length"));
            }
            let h = self.map.u64_at(self.o.head).load(Ordering::Acquire);
            if t > h || h - t > self.cap {
                return Err(Violation("own tail out of the ring's bounds"));
            }
            self.tail = t;
            self.head_seen = h;
        }
        Ok(())
    }

    fn take(&mut self, buf: &mut [u8], consume: bool) -> Result<ReadOutcome, Violation> {
        if buf.is_empty() {
            return Ok(ReadOutcome::Data(0));
        }
        self.resync()?;
        // A reset comes after the bytes written before it, as a TCP RST
        // after the segments before it: Linux keeps what was received
        // (a reader takes it, then ECONNRESET). The flags share the
        // producer's cache line with head: no extra miss.
        let f = self.flags();
        if f & FLAG_RESET != 0 {
            // (Acquire of the flag: every byte written before the reset is
            // in the head read now.)
            self.refresh_head()?;
            if self.head_seen == self.tail {
                // A reset after the end of stream (the peer shut its
                // writes down, then closed abortively): reads see the end,
                // as the kernel's after a FIN (its error is EPIPE, for
                // writes and SO_ERROR).
                return Ok(if f & FLAG_EOS != 0 {
                    ReadOutcome::Eos
                } else {
                    ReadOutcome::Reset
                });
            }
        }
        if self.head_seen == self.tail {
            self.refresh_head()?;
            if self.head_seen == self.tail {
                if self.flags() & FLAG_EOS == 0 {
                    return Ok(ReadOutcome::Empty);
                }
                // The mark was set after the final head: look once more.
                self.refresh_head()?;
                if self.head_seen == self.tail {
                    return Ok(ReadOutcome::Eos);
                }
            }
        }
        let n = buf.len().min(idx(self.head_seen - self.tail));
        // Relaxed: base is stored before the head this side loaded with
        // Acquire (Producer::write), and only moves while the ring is empty.
        let base = self.map.u64_at(self.o.base).load(Ordering::Relaxed);
        if !consume {
            copy_out(
                &self.map,
                self.o.data,
                self.cap,
                self.tail.wrapping_sub(base),
                &mut buf[..n],
            );
            return Ok(ReadOutcome::Data(n));
        }
        for part in buf[..n].chunks_mut(PUBLISH_EVERY) {
            copy_out(
                &self.map,
                self.o.data,
                self.cap,
                self.tail.wrapping_sub(base),
                part,
            );
            self.tail += part.len() as u64;
            // Release: our copies out complete before the producer may
            // reuse the space.
            self.map
                .u64_at(self.o.tail)
                .store(self.tail, Ordering::Release);
            self.wake_producer();
        }
        Ok(ReadOutcome::Data(n))
    }

    fn wake_producer(&mut self) {
        // SeqCst fence: orders the tail store before reading the producer's
        // wait word (pairs with the fence in Producer::arm).
        fence(Ordering::SeqCst);
        wake(
            &self.map,
            self.o.prod_wait,
            self.o.prod_bell,
            &mut self.last_rung,
            &*self.bells,
            &mut self.n,
        );
        // Relaxed: statistics only; this side is the only writer.
        self.map
            .u64_at(self.o.cons_notify_sent)
            .store(self.n.sent, Ordering::Relaxed);
        self.map
            .u64_at(self.o.cons_notify_suppressed)
            .store(self.n.suppressed, Ordering::Relaxed);
    }

    /// The producer's marks as last published: (end of stream, reset).
    pub fn marks(&self) -> (bool, bool) {
        let f = self.flags();
        (f & FLAG_EOS != 0, f & FLAG_RESET != 0)
    }

    /// Whether a read would return something other than `Empty` right now.
    pub fn ready(&mut self) -> Result<bool, Violation> {
        Ok(self.readable()? > 0 || self.flags() & (FLAG_EOS | FLAG_RESET) != 0)
    }

    /// Announces a sleep on doorbell `bell` until more data or a mark
    /// arrives, whatever the ring holds now (the caller re-checks what it
    /// waits for afterwards).
    pub fn arm_always(&mut self, bell: u32) {
        self.epoch = next_epoch(&self.map, self.o.cons_wait, self.epoch);
        sleep_on(
            &self.map,
            self.o.cons_wait,
            self.o.cons_bell,
            self.epoch,
            bell,
        );
        // SeqCst fence: as in `arm`.
        fence(Ordering::SeqCst);
    }

    /// Announces that this side will sleep on doorbell `bell` until data
    /// or a mark arrives. Returns false (and stays awake) if something is
    /// already there.
    pub fn arm(&mut self, bell: u32) -> Result<bool, Violation> {
        self.epoch = next_epoch(&self.map, self.o.cons_wait, self.epoch);
        sleep_on(
            &self.map,
            self.o.cons_wait,
            self.o.cons_bell,
            self.epoch,
            bell,
        );
        // SeqCst fence: the wait word store is ordered before re-reading
        // head and flags (pairs with the fence in Producer::wake_consumer).
        fence(Ordering::SeqCst);
        if self.ready()? {
            self.disarm();
            return Ok(false);
        }
        Ok(true)
    }

    /// Ends a sleep announced by `arm`.
    pub fn disarm(&mut self) {
        self.epoch = self.epoch.wrapping_add(1) & !1;
        self.map
            .u32_at(self.o.cons_wait)
            .store(self.epoch, Ordering::Relaxed);
    }

    /// Closes the reading end: the producer's further writes fail (EPIPE).
    pub fn close(&mut self) {
        // Release: pairs with the Acquire in Producer::peer_closed.
        self.map
            .u32_at(self.o.cons_closed)
            .store(1, Ordering::Release);
        self.wake_producer();
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.tail
    }

    /// Bytes consumed so far by every holder of this end (caught up with
    /// reads another process holding it made).
    pub fn position_now(&mut self) -> Result<u64, Violation> {
        self.resync()?;
        Ok(self.tail)
    }

    /// The ring's capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// Wakes the producer if it sleeps (see `Producer::nudge`).
    pub fn nudge(&mut self) {
        self.wake_producer();
    }

    /// Wakes this consumer's sleeper, whichever holder of the end it is
    /// (another holder changed a word its reads depend on: their shutdown).
    /// Call after publishing that word.
    pub fn wake_sleeper(&mut self) {
        // SeqCst fence: orders the caller's store before the load of the
        // wait word (pairs with the fence in `arm`, after which the
        // sleeper looks at that word again).
        fence(Ordering::SeqCst);
        let mut last = 0;
        wake(
            &self.map,
            self.o.cons_wait,
            self.o.cons_bell,
            &mut last,
            &*self.bells,
            &mut Counters::default(),
        );
    }

    /// Bytes the producer had published when last looked at.
    pub fn produced_seen(&self) -> u64 {
        self.head_seen
    }
}

/// A read-only view of one direction, for statistics (devd, ringstat).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirSnapshot {
    /// Bytes produced.
    pub head: u64,
    /// Bytes consumed.
    pub tail: u64,
    /// EOS/RESET marks.
    pub flags: u32,
    /// Producer sleep epoch (odd: asleep).
    pub prod_wait: u32,
    /// Consumer sleep epoch (odd: asleep).
    pub cons_wait: u32,
    /// Whether the consumer closed.
    pub cons_closed: bool,
    /// Wake-ups sent by the producer / by the consumer.
    pub notify_sent: u64,
    /// Wake-ups suppressed by the producer / by the consumer.
    pub notify_suppressed: u64,
}

/// Reads one direction's words from a copy of the region's header page
/// (`HEADER_SIZE` bytes, read with pread by devd, which does not map
/// regions). Values come from untrusted memory: they are only displayed,
/// never used to index anything.
pub fn snapshot(header: &[u8], layout: DirectLayout, d: usize) -> DirSnapshot {
    let o = layout.dir(d);
    let word = |off: usize, n: usize| -> u64 {
        header.get(off..off + n).map_or(0, |b| {
            let mut w = [0u8; 8];
            w[..n].copy_from_slice(b);
            u64::from_le_bytes(w)
        })
    };
    let r64 = |off| word(off, 8);
    let r32 = |off| u32::try_from(word(off, 4)).unwrap_or(0);
    DirSnapshot {
        head: r64(o.head),
        tail: r64(o.tail),
        flags: r32(o.flags),
        prod_wait: r32(o.prod_wait),
        cons_wait: r32(o.cons_wait),
        cons_closed: r32(o.cons_closed) != 0,
        notify_sent: r64(o.prod_notify_sent).wrapping_add(r64(o.cons_notify_sent)),
        notify_suppressed: r64(o.prod_notify_suppressed)
            .wrapping_add(r64(o.cons_notify_suppressed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// One doorbell, id 7, counting its rings.
    #[derive(Debug, Default)]
    struct OneBell(std::sync::atomic::AtomicU32);

    impl Doorbells for OneBell {
        fn ring(&self, id: u32) -> bool {
            if id != 7 {
                return false;
            }
            self.0.fetch_add(1, Ordering::Relaxed);
            true
        }
    }

    fn pair(size: usize) -> (Producer, Consumer, Arc<Mapping>, DirectLayout) {
        let fd = crate::sys::memfd_sealed("t", size).unwrap();
        let m = Arc::new(Mapping::map(fd.as_fd(), size, true).unwrap());
        let l = DirectLayout::for_size(size).unwrap();
        let bells: Arc<dyn Doorbells> = Arc::new(OneBell::default());
        let p = Producer::new(m.clone(), l, 0, bells.clone());
        let c = Consumer::new(m.clone(), l, 0, bells);
        (p, c, m, l)
    }

    #[test]
    fn bytes_wrap_around_in_order() {
        let (mut p, mut c, _m, l) = pair(16384);
        let mut next_w = 0u8;
        let mut next_r = 0u8;
        let mut total = 0usize;
        let mut buf = vec![0u8; 5000];
        while total < 10 * l.cap {
            let chunk: Vec<u8> = (0..3001)
                .map(|_| {
                    next_w = next_w.wrapping_add(1);
                    next_w
                })
                .collect();
            let mut off = 0;
            while off < chunk.len() {
                let n = p.write(&chunk[off..]).unwrap();
                off += n;
                if let ReadOutcome::Data(k) = c.read(&mut buf).unwrap() {
                    for b in &buf[..k] {
                        next_r = next_r.wrapping_add(1);
                        assert_eq!(*b, next_r);
                    }
                    total += k;
                }
            }
        }
    }

    #[test]
    fn large_writes_and_reads_go_in_parts_across_the_wrap_and_ring_once() {
        let (mut p, mut c, m, l) = pair(1 << 20);
        assert!(l.cap > 4 * PUBLISH_EVERY);
        // 40,000 bytes left unread: the ring is not empty, so the next
        // write does not rebase, and wraps.
        let first = vec![9u8; 100_000];
        assert_eq!(p.write(&first).unwrap(), first.len());
        let mut sink = vec![0u8; 60_000];
        assert_eq!(c.read(&mut sink).unwrap(), ReadOutcome::Data(60_000));
        // Asleep anyway (as a reader waiting in poll for POLLRDHUP would).
        c.arm_always(7);
        let room = l.cap - 40_000;
        let big: Vec<u8> = (0..room)
            .map(|i| u8::try_from(i * 131 % 251).unwrap())
            .collect();
        assert_eq!(p.write(&big).unwrap(), room);
        let header = |m: &Mapping| {
            let mut h = vec![0u8; crate::layout::HEADER_SIZE];
            m.read_bytes(0, &mut h);
            h
        };
        assert_eq!(
            snapshot(&header(&m), l, 0).notify_sent,
            1,
            "a sleeping reader is rung once for all the write's parts"
        );
        c.disarm();
        let mut got = vec![0u8; l.cap];
        let mut at = 0;
        while at < l.cap {
            match c.read(&mut got[at..]).unwrap() {
                ReadOutcome::Data(n) if n > 0 => at += n,
                r => panic!("after {at}: {r:?}"),
            }
        }
        assert!(got[..40_000].iter().all(|&b| b == 9));
        assert!(
            got[40_000..] == big[..],
            "the bytes in order across the wrap"
        );
        assert_eq!(p.writable().unwrap(), l.cap, "the reader freed it all");
    }

    #[test]
    fn eos_comes_after_all_data() {
        let (mut p, mut c, _m, _) = pair(16384);
        p.write(b"abc").unwrap();
        p.close();
        let mut b = [0u8; 2];
        assert_eq!(c.read(&mut b).unwrap(), ReadOutcome::Data(2));
        assert_eq!(c.read(&mut b).unwrap(), ReadOutcome::Data(1));
        assert_eq!(c.read(&mut b).unwrap(), ReadOutcome::Eos);
    }

    #[test]
    fn a_reset_comes_after_the_bytes_written_before_it_like_a_tcp_rst() {
        let (mut p, mut c, _m, _) = pair(16384);
        p.write(b"abc").unwrap();
        p.reset();
        let mut b = [0u8; 2];
        assert_eq!(c.read(&mut b).unwrap(), ReadOutcome::Data(2));
        assert_eq!(&b, b"ab");
        assert_eq!(c.read(&mut b).unwrap(), ReadOutcome::Data(1));
        assert_eq!(c.read(&mut b).unwrap(), ReadOutcome::Reset);
        assert_eq!(c.read(&mut b).unwrap(), ReadOutcome::Reset);
    }

    #[test]
    fn what_the_consumer_did_not_take_is_copied_back_from_where_it_stopped() {
        let (mut p, mut c, _m, l) = pair(16384);
        let data: Vec<u8> = (0..l.cap).map(|i| i.to_le_bytes()[0] ^ 0x5a).collect();
        assert_eq!(p.write(&data[..1000]).unwrap(), 1000);
        let mut b = vec![0u8; 300];
        assert_eq!(c.read(&mut b).unwrap(), ReadOutcome::Data(300));
        // The rest of the ring, then 200 bytes across its end.
        assert_eq!(p.write(&data[1000..]).unwrap(), l.cap - 1000);
        assert_eq!(p.write(&[9; 200]).unwrap(), 200);
        let end = l.cap as u64 + 200;
        assert_eq!(c.position_now().unwrap(), 300);
        let mut want = data[300..].to_vec();
        want.extend([9; 200]);
        assert_eq!(p.unconsumed_from(300).unwrap(), want);
        assert_eq!(p.unconsumed_from(end).unwrap(), []);
        // Before what the consumer took, or past what was written: refused.
        assert!(p.unconsumed_from(299).is_err());
        assert!(p.unconsumed_from(end + 1).is_err());
        assert_eq!(p.position_now().unwrap(), end);
    }

    #[test]
    fn full_ring_accepts_nothing_more() {
        let (mut p, _c, _m, l) = pair(16384);
        let big = vec![1u8; l.cap + 100];
        assert_eq!(p.write(&big).unwrap(), l.cap);
        assert_eq!(p.write(b"x").unwrap(), 0);
    }

    #[test]
    fn hostile_head_is_a_violation_not_a_read_outside() {
        let (_p, mut c, m, l) = pair(16384);
        let o = l.dir(0);
        m.u64_at(o.head).store(l.cap as u64 + 1, Ordering::Relaxed);
        let mut b = [0u8; 8];
        assert!(c.read(&mut b).is_err());
        m.u64_at(o.head).store(u64::MAX, Ordering::Relaxed);
        assert!(c.read(&mut b).is_err());
    }

    #[test]
    fn hostile_tail_is_a_violation() {
        let (mut p, _c, m, l) = pair(16384);
        p.write(b"abcd").unwrap();
        m.u64_at(l.dir(0).tail).store(99, Ordering::Relaxed);
        assert!(p.writable().is_err());
    }

    #[test]
    fn sleeping_consumer_is_woken_once_and_busy_one_never() {
        let (mut p, mut c, m, l) = pair(16384);
        p.write(b"a").unwrap();
        assert!(!c.arm(7).unwrap(), "data present: must not sleep");
        let mut b = [0u8; 4];
        c.read(&mut b).unwrap();
        assert!(c.arm(7).unwrap());
        p.write(b"b").unwrap();
        p.write(b"c").unwrap();
        let header = |m: &Mapping| {
            let mut h = vec![0u8; crate::layout::HEADER_SIZE];
            m.read_bytes(0, &mut h);
            h
        };
        let s = snapshot(&header(&m), l, 0);
        assert_eq!(s.notify_sent, 1, "second write must not ring again");
        assert_eq!(m.u32_at(l.dir(0).cons_bell).load(Ordering::Relaxed), 7);
        c.disarm();
        p.write(b"d").unwrap();
        assert_eq!(snapshot(&header(&m), l, 0).notify_sent, 1);
    }

    #[test]
    fn writes_after_consumer_close_are_detectable() {
        let (p, mut c, _m, _) = pair(16384);
        assert!(!p.peer_closed());
        c.close();
        assert!(p.peer_closed());
    }

    #[test]
    fn a_producer_taken_over_with_bytes_unread_goes_on_writing() {
        // Another process wrote bytes the consumer has not taken, then
        // handed the end on (an exec that takes it over): the new
        // producer starts from the published positions, unread bytes and
        // all, and the consumer's later takes are no violation.
        let (mut p, mut c, m, l) = pair(16384);
        p.write(b"before").unwrap();
        let bells: Arc<dyn Doorbells> = Arc::new(OneBell::default());
        let mut q = Producer::new(m.clone(), l, 0, bells);
        assert_eq!(q.unconsumed().unwrap(), 6);
        let mut b = [0u8; 16];
        assert!(matches!(c.read(&mut b).unwrap(), ReadOutcome::Data(6)));
        assert_eq!(q.unconsumed().unwrap(), 0);
        q.write(b"after").unwrap();
        assert!(matches!(c.read(&mut b).unwrap(), ReadOutcome::Data(5)));
        assert_eq!(&b[..5], b"after");
        // A consumer tail out of bounds at attach is still refused.
        m.u64_at(l.dir(0).tail).store(1 << 40, Ordering::Relaxed);
        let bells: Arc<dyn Doorbells> = Arc::new(OneBell::default());
        let mut r = Producer::new(m.clone(), l, 0, bells);
        assert!(r.unconsumed().is_err());
    }

    #[test]
    fn a_consumer_taken_over_is_woken_at_its_first_sleep() {
        // The end's first holder slept once and was rung; a process that
        // takes the end over (its own count of sleeps starting again) must
        // not announce a sleep the producer takes for the one it rang.
        let (mut p, mut c, m, l) = pair(16384);
        let header = |m: &Mapping| {
            let mut h = vec![0u8; crate::layout::HEADER_SIZE];
            m.read_bytes(0, &mut h);
            h
        };
        assert!(c.arm(7).unwrap());
        p.write(b"a").unwrap();
        assert_eq!(snapshot(&header(&m), l, 0).notify_sent, 1);
        let mut b = [0u8; 4];
        c.read(&mut b).unwrap();
        c.disarm();
        let bells: Arc<dyn Doorbells> = Arc::new(OneBell::default());
        let mut taken = Consumer::new(m.clone(), l, 0, bells);
        assert!(taken.arm(7).unwrap());
        p.write(b"b").unwrap();
        assert_eq!(
            snapshot(&header(&m), l, 0).notify_sent,
            2,
            "the new holder's sleep was not rung"
        );
    }
}
