//! Driver side of a split virtqueue, used by clients on their own region.
//!
//! The driver keeps no state of its own: where it posts next is the avail
//! ring's index, and what it consumed is its used position in the region's
//! header (`QueueOffsets::driver`). Every process that holds the end (a
//! forked child, a process the socket was passed to) therefore goes on
//! exactly where another stopped. Buffers rotate: the one posted at avail
//! position `p` is descriptor `p mod size`, and devd returns them in the
//! order they were posted (in order, as virtio's `IN_ORDER`), so the free
//! descriptors are known from the two indices alone.
//!
//! devd is trusted by clients, but used entries are still checked (order,
//! id and length) before they index anything, and so are the driver's own
//! words, which every holder of the end can write.
//!
//! Must never: keep in the process what another holder of the end would
//! need to continue.

use super::need_event;
use crate::layout::QueueOffsets;
use crate::shm::Mapping;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// devd returned an impossible used entry, or the queue's words are
/// inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the virtqueue protocol was broken: {0}")]
pub struct DeviceViolation(pub &'static str);

/// A used position word: (used index, bytes of that entry consumed).
pub fn split_position(p: u64) -> (u16, u32) {
    (low16(p >> 32), u32::try_from(p & 0xffff_ffff).unwrap_or(0))
}

fn low16(v: u64) -> u16 {
    u16::try_from(v & 0xffff).unwrap_or(0)
}

/// A used entry not yet wholly consumed: descriptor `id` (the slot) holds
/// `len` bytes, of which `off` were taken already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Descriptor id, equal to the slot number.
    pub id: u16,
    /// Bytes the device put in it.
    pub len: u32,
    /// Bytes of it already consumed.
    pub off: u32,
}

/// The next buffer to post: descriptor `id` at avail index `avail` (from
/// [`QueueDriver::next`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    /// The avail index it goes to.
    pub avail: u16,
    /// Its descriptor id (= slot): `avail mod size`.
    pub id: u16,
}

/// One split virtqueue, driver side.
#[derive(Debug)]
pub struct QueueDriver {
    map: Arc<Mapping>,
    o: QueueOffsets,
    size: u16,
}

impl QueueDriver {
    /// Driver for a queue at `o` with `size` entries (power of two).
    pub fn new(map: Arc<Mapping>, o: QueueOffsets, size: u16) -> QueueDriver {
        QueueDriver { map, o, size }
    }

    fn avail_idx(&self) -> u16 {
        // Relaxed: only this end's holders store it, and they take turns
        // through fork, exec or a socket, which order their accesses.
        self.map.u16_at(self.o.avail + 2).load(Ordering::Relaxed)
    }

    /// The used position: the next used index to consume, and the bytes
    /// of that entry already consumed.
    fn position(&self) -> (u16, u32) {
        // Relaxed: as in avail_idx.
        split_position(self.map.u64_at(self.o.driver).load(Ordering::Relaxed))
    }

    fn set_position(&self, seen: u16, off: u32) {
        // One store: a holder that dies between two calls leaves a
        // position another can use.
        self.map
            .u64_at(self.o.driver)
            .store(u64::from(seen) << 32 | u64::from(off), Ordering::Relaxed);
    }

    /// The buffer the next post must use, or None while every buffer is
    /// posted and not yet consumed back.
    pub fn next(&self) -> Result<Option<Next>, DeviceViolation> {
        let avail = self.avail_idx();
        let flight = avail.wrapping_sub(self.position().0);
        if flight > self.size {
            return Err(DeviceViolation("more buffers posted than the queue has"));
        }
        Ok((flight < self.size).then_some(Next {
            avail,
            id: avail % self.size,
        }))
    }

    /// Publishes buffer `n` (from [`QueueDriver::next`]) with `addr`/`len`;
    /// false if another holder moved the avail index meanwhile (nothing
    /// published here then: the avail index never goes back). Holders at
    /// the same instant are not serialized: one may have written the
    /// same slot and descriptor.
    pub fn post(&self, n: Next, addr: u64, len: u32, flags: u16) -> bool {
        let id = n.id % self.size;
        let d = self.o.desc + 16 * usize::from(id);
        // Relaxed: the descriptor is published by the Release store of
        // avail.idx below.
        self.map.u64_at(d).store(addr, Ordering::Relaxed);
        self.map.u32_at(d + 8).store(len, Ordering::Relaxed);
        self.map.u16_at(d + 12).store(flags, Ordering::Relaxed);
        self.map.u16_at(d + 14).store(0, Ordering::Relaxed);
        let slot = self.o.avail + 4 + 2 * usize::from(id);
        self.map.u16_at(slot).store(id, Ordering::Relaxed);
        // Release: descriptor and ring entry are visible before the new
        // index. (Relaxed on failure: nothing was published.)
        self.map
            .u16_at(self.o.avail + 2)
            .compare_exchange(
                n.avail,
                n.avail.wrapping_add(1),
                Ordering::Release,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Whether devd asked to be kicked for what was posted since the last
    /// check (by any holder of the end; EVENT_IDX); call after a batch of
    /// `post`s.
    pub fn should_kick(&self) -> bool {
        // SeqCst fence: our avail.idx store is ordered before reading
        // avail_event, pairing with the device's enable_notification,
        // which writes avail_event and then re-reads avail.idx.
        fence(Ordering::SeqCst);
        let ev = self
            .map
            .u16_at(self.o.used + 4 + 8 * usize::from(self.size))
            .load(Ordering::Relaxed);
        let new = self.avail_idx();
        let word = self.map.u32_at(self.o.driver + 8);
        // Relaxed: as in avail_idx.
        let old = low16(u64::from(word.swap(u32::from(new), Ordering::Relaxed)));
        need_event(ev, new, old)
    }

    /// The used entry at the driver's position, not consumed.
    pub fn peek_used(&self, max_len: u32) -> Result<Option<Used>, DeviceViolation> {
        // Acquire: pairs with the device's Release store of used.idx, so
        // the entry and the buffer contents are visible.
        let idx = self.map.u16_at(self.o.used + 2).load(Ordering::Acquire);
        let (seen, off) = self.position();
        if idx == seen {
            return Ok(None);
        }
        if idx.wrapping_sub(seen) > self.size {
            return Err(DeviceViolation("used index ran ahead of the queue"));
        }
        self.entry(seen, max_len).and_then(|(id, len)| {
            if off > len {
                return Err(DeviceViolation("read position past its used entry"));
            }
            Ok(Some(Used { id, len, off }))
        })
    }

    /// Used entry at used index `at`, checked: in order, length at most
    /// `max_len`.
    fn entry(&self, at: u16, max_len: u32) -> Result<(u16, u32), DeviceViolation> {
        let e = self.o.used + 4 + 8 * usize::from(at % self.size);
        let id = self.map.u32_at(e).load(Ordering::Relaxed);
        let len = self.map.u32_at(e + 4).load(Ordering::Relaxed);
        if id != u32::from(at % self.size) {
            return Err(DeviceViolation("used entry out of order"));
        }
        if len > max_len {
            return Err(DeviceViolation("used entry longer than its buffer"));
        }
        Ok((at % self.size, len))
    }

    /// Consumes `n` more bytes of `u` (from [`QueueDriver::peek_used`]);
    /// true when that finished the entry, whose buffer may be posted again.
    pub fn consume(&self, u: Used, n: u32) -> bool {
        let (seen, _) = self.position();
        let off = u.off.saturating_add(n).min(u.len);
        if off == u.len {
            self.set_position(seen.wrapping_add(1), 0);
            true
        } else {
            self.set_position(seen, off);
            false
        }
    }

    /// Takes the next used entry whole: (descriptor id, bytes written).
    pub fn pop_used(&self, max_len: u32) -> Result<Option<(u16, u32)>, DeviceViolation> {
        Ok(self.peek_used(max_len)?.map(|u| {
            self.consume(u, u.len);
            (u.id, u.len)
        }))
    }

    /// Bytes in the used entries not yet consumed.
    pub fn unconsumed(&self, max_len: u32) -> Result<u64, DeviceViolation> {
        let idx = self.map.u16_at(self.o.used + 2).load(Ordering::Acquire);
        let (seen, off) = self.position();
        let n = idx.wrapping_sub(seen);
        if n > self.size {
            return Err(DeviceViolation("used index ran ahead of the queue"));
        }
        let mut sum = 0u64;
        for k in 0..n {
            sum += u64::from(self.entry(seen.wrapping_add(k), max_len)?.1);
        }
        if n > 0 && u64::from(off) > sum {
            return Err(DeviceViolation("read position past its used entry"));
        }
        Ok(sum - if n > 0 { u64::from(off) } else { 0 })
    }

    /// Bytes in the buffers posted and not yet returned by the device
    /// (nothing consumed: another holder may be using the queue).
    pub fn unreturned_len(&self) -> u64 {
        self.unreturned().map(|(_, n)| u64::from(n)).sum()
    }

    /// The buffers posted and not yet returned by the device, in the order
    /// they were posted: (address, length) as their descriptors say.
    pub fn unreturned(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let seen = self.used_idx();
        let flight = self.avail_idx().wrapping_sub(seen).min(self.size);
        (0..flight).map(move |k| {
            let id = seen.wrapping_add(k) % self.size;
            let d = self.o.desc + 16 * usize::from(id);
            // Relaxed: this end's own descriptors (see avail_idx).
            (
                self.map.u64_at(d).load(Ordering::Relaxed),
                self.map.u32_at(d + 8).load(Ordering::Relaxed),
            )
        })
    }

    /// Announces interest in the next used entry the device adds, whatever
    /// this end has not consumed yet (an edge-triggered waiter sleeps on
    /// entries it was told about): used_event is the device's used index
    /// now. The caller looks at the used index again afterwards (an entry
    /// added between the two loads was not announced).
    pub fn arm_always(&self) {
        let ev = self.o.avail + 4 + 2 * usize::from(self.size);
        // Acquire: as in peek_used.
        let mut now = self.map.u16_at(self.o.used + 2).load(Ordering::Acquire);
        // Stored again while the index moves: another holder of the end
        // (another process) arming at once must not leave used_event
        // behind what it stored (the device would not call for the next
        // entry). Bounded: the device adds at most a queue's entries.
        for _ in 0..=self.size {
            self.map.u16_at(ev).store(now, Ordering::Relaxed);
            // SeqCst fence: used_event is ordered before the re-read of
            // used.idx, pairing with the device's needs_notification.
            fence(Ordering::SeqCst);
            let again = self.map.u16_at(self.o.used + 2).load(Ordering::Acquire);
            if again == now {
                break;
            }
            now = again;
        }
    }

    /// Announces interest in the next used entry (used_event) and reports
    /// whether the queue is still empty, i.e. whether sleeping is safe.
    pub fn arm(&self) -> bool {
        let seen = self.position().0;
        let ev = self.o.avail + 4 + 2 * usize::from(self.size);
        self.map.u16_at(ev).store(seen, Ordering::Relaxed);
        // SeqCst fence: used_event is ordered before re-reading used.idx,
        // pairing with the device's needs_notification.
        fence(Ordering::SeqCst);
        self.map.u16_at(self.o.used + 2).load(Ordering::Acquire) == seen
    }

    /// Whether a used entry is waiting.
    pub fn has_used(&self) -> bool {
        // Acquire: as in peek_used.
        self.map.u16_at(self.o.used + 2).load(Ordering::Acquire) != self.position().0
    }

    /// The device's used index: it moves with every entry returned.
    pub fn used_idx(&self) -> u16 {
        // Acquire: as in peek_used.
        self.map.u16_at(self.o.used + 2).load(Ordering::Acquire)
    }

    /// Entries posted but not yet consumed back.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx().wrapping_sub(self.position().0)
    }
}
