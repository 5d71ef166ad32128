//! Driver side of a split virtqueue, used by clients on their own region.
//! devd is trusted by clients, but used-ring entries are still checked
//! (id and length) before they index anything.

use super::need_event;
use crate::layout::QueueOffsets;
use crate::shm::Mapping;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// devd returned an impossible used entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device broke the virtqueue protocol: {0}")]
pub struct DeviceViolation(pub &'static str);

/// One split virtqueue, driver side.
#[derive(Debug)]
pub struct QueueDriver {
    map: Arc<Mapping>,
    o: QueueOffsets,
    size: u16,
    next_avail: u16,
    used_seen: u16,
    kicked_at: u16,
}

impl QueueDriver {
    /// Driver for a queue at `o` with `size` entries (power of two).
    pub fn new(map: Arc<Mapping>, o: QueueOffsets, size: u16) -> QueueDriver {
        QueueDriver {
            map,
            o,
            size,
            next_avail: 0,
            used_seen: 0,
            kicked_at: 0,
        }
    }

    /// Publishes descriptor `id` (= slot) with buffer `addr`/`len`.
    pub fn post(&mut self, id: u16, addr: u64, len: u32, flags: u16) {
        assert!(id < self.size);
        let d = self.o.desc + 16 * usize::from(id);
        // Relaxed: the descriptor is published by the Release store of
        // avail.idx below.
        self.map.u64_at(d).store(addr, Ordering::Relaxed);
        self.map.u32_at(d + 8).store(len, Ordering::Relaxed);
        self.map.u16_at(d + 12).store(flags, Ordering::Relaxed);
        self.map.u16_at(d + 14).store(0, Ordering::Relaxed);
        let slot = self.o.avail + 4 + 2 * usize::from(self.next_avail % self.size);
        self.map.u16_at(slot).store(id, Ordering::Relaxed);
        self.next_avail = self.next_avail.wrapping_add(1);
        // Release: descriptor and ring entry are visible before the new index.
        self.map
            .u16_at(self.o.avail + 2)
            .store(self.next_avail, Ordering::Release);
    }

    /// Whether devd asked to be kicked for what was posted since the last
    /// call (EVENT_IDX); call after a batch of `post`s.
    pub fn should_kick(&mut self) -> bool {
        // SeqCst fence: our avail.idx store is ordered before reading
        // avail_event, pairing with the device's enable_notification,
        // which writes avail_event and then re-reads avail.idx.
        fence(Ordering::SeqCst);
        let ev = self
            .map
            .u16_at(self.o.used + 4 + 8 * usize::from(self.size))
            .load(Ordering::Relaxed);
        let old = self.kicked_at;
        self.kicked_at = self.next_avail;
        need_event(ev, self.next_avail, old)
    }

    /// Takes the next used entry: (descriptor id, bytes written).
    pub fn pop_used(&mut self, max_len: u32) -> Result<Option<(u16, u32)>, DeviceViolation> {
        // Acquire: pairs with the device's Release store of used.idx, so
        // the entry and the buffer contents are visible.
        let idx = self.map.u16_at(self.o.used + 2).load(Ordering::Acquire);
        if idx == self.used_seen {
            return Ok(None);
        }
        if idx.wrapping_sub(self.used_seen) > self.size {
            return Err(DeviceViolation("used index ran ahead of the queue"));
        }
        let e = self.o.used + 4 + 8 * usize::from(self.used_seen % self.size);
        let id = self.map.u32_at(e).load(Ordering::Relaxed);
        let len = self.map.u32_at(e + 4).load(Ordering::Relaxed);
        self.used_seen = self.used_seen.wrapping_add(1);
        let id = u16::try_from(id).ok().filter(|i| *i < self.size);
        match id {
            Some(id) if len <= max_len => Ok(Some((id, len))),
            _ => Err(DeviceViolation("used entry with bad id or length")),
        }
    }

    /// Announces interest in the next used entry (used_event) and reports
    /// whether the queue is still empty, i.e. whether sleeping is safe.
    pub fn arm(&mut self) -> bool {
        let ev = self.o.avail + 4 + 2 * usize::from(self.size);
        self.map.u16_at(ev).store(self.used_seen, Ordering::Relaxed);
        // SeqCst fence: used_event is ordered before re-reading used.idx,
        // pairing with the device's needs_notification.
        fence(Ordering::SeqCst);
        self.map.u16_at(self.o.used + 2).load(Ordering::Acquire) == self.used_seen
    }

    /// Whether a used entry is waiting.
    pub fn has_used(&self) -> bool {
        // Acquire: as in pop_used.
        self.map.u16_at(self.o.used + 2).load(Ordering::Acquire) != self.used_seen
    }

    /// The device's used index: it moves with every entry returned.
    pub fn used_idx(&self) -> u16 {
        // Acquire: as in pop_used.
        self.map.u16_at(self.o.used + 2).load(Ordering::Acquire)
    }

    /// Entries posted but not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.used_seen)
    }
}
