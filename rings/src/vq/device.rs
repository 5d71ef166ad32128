//! Device side of a client's Queued region, for devd: `virtio-queue`'s
//! `Queue` over a `vm-memory` `GuestMemoryMmap` of the client's sealed
//! memfd. The client is untrusted: every chain must be a single descriptor
//! of the right direction that names exactly its own slot; anything else is
//! a violation that resets this one connection.

use super::{RX, TX};
use crate::layout::{qhdr, QueuedLayout};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
};

/// Why a device-side operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The region fd is not a sealed memfd of the announced size.
    #[error("client region refused")]
    Region(#[source] io::Error),
    /// Mapping the region failed.
    #[error("failed to map the client region")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// virtio-queue refused the queue or an access.
    #[error("virtqueue error")]
    Queue(#[source] virtio_queue::Error),
    /// Guest memory access failed (address outside the region).
    #[error("region access out of bounds")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The client broke the queue protocol.
    #[error("client broke the virtqueue protocol: {0}")]
    Violation(&'static str),
}

/// One buffer popped from a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Head descriptor index (= slot).
    pub head: u16,
    /// Region offset of the data.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
}

/// devd's view of one client's Queued region.
#[derive(Debug)]
pub struct DeviceRegion {
    mem: GuestMemoryMmap,
    layout: QueuedLayout,
    queues: [Queue; 2],
}

impl DeviceRegion {
    /// Maps `fd` (checked to be a sealed memfd of `layout.size` bytes) and
    /// sets up the two queues at the addresses devd itself chose.
    pub fn new(fd: OwnedFd, layout: QueuedLayout) -> Result<DeviceRegion, DeviceError> {
        crate::sys::check_sealed(fd.as_fd(), layout.size).map_err(DeviceError::Region)?;
        let file = File::from(fd);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            layout.size,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(DeviceError::Map)?;
        let mk = |q: usize| -> Result<Queue, DeviceError> {
            let o = layout.queues[q];
            let mut queue = Queue::new(layout.qsize).map_err(DeviceError::Queue)?;
            queue
                .try_set_desc_table_address(GuestAddress(o.desc as u64))
                .map_err(DeviceError::Queue)?;
            queue
                .try_set_avail_ring_address(GuestAddress(o.avail as u64))
                .map_err(DeviceError::Queue)?;
            queue
                .try_set_used_ring_address(GuestAddress(o.used as u64))
                .map_err(DeviceError::Queue)?;
            queue.set_event_idx(true);
            queue.set_ready(true);
            if !queue.is_valid(&mem) {
                return Err(DeviceError::Violation(
                    "queue layout does not fit the region",
                ));
            }
            Ok(queue)
        };
        let queues = [mk(TX)?, mk(RX)?];
        Ok(DeviceRegion {
            mem,
            layout,
            queues,
        })
    }

    /// The next buffer of queue `q`, validated, or None if the queue is empty.
    pub fn pop(&mut self, q: usize) -> Result<Option<Buf>, DeviceError> {
        let mut iter = self.queues[q].iter(&self.mem).map_err(|e| match e {
            virtio_queue::Error::InvalidAvailRingIndex => {
                DeviceError::Violation("avail index ran ahead of the queue")
            }
            e => DeviceError::Queue(e),
        })?;
        let Some(mut chain) = iter.next() else {
            return Ok(None);
        };
        let head = chain.head_index();
        let d = chain
            .next()
            .ok_or(DeviceError::Violation("unreadable head descriptor"))?;
        if chain.next().is_some() || d.has_next() {
            return Err(DeviceError::Violation("chained descriptors"));
        }
        let want_write = q == RX;
        if d.is_write_only() != want_write {
            return Err(DeviceError::Violation("descriptor has the wrong direction"));
        }
        if head >= self.layout.qsize
            || d.addr().0 != self.layout.slot_offset(q, head) as u64
            || d.len() as usize > self.layout.slot
        {
            return Err(DeviceError::Violation(
                "descriptor does not name its own slot",
            ));
        }
        Ok(Some(Buf {
            head,
            addr: d.addr().0,
            len: d.len(),
        }))
    }

    /// Whether the driver made buffers of queue `q` available that `pop`
    /// has not taken yet (one read of the avail index: no validation, a
    /// hint for polling only).
    pub fn has_avail(&self, q: usize) -> bool {
        self.queues[q]
            .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|i| i.0 != self.queues[q].next_avail())
    }

    /// Copies from the region (a validated TX buffer) into `dst`.
    pub fn read(&self, addr: u64, dst: &mut [u8]) -> Result<(), DeviceError> {
        self.mem
            .read_slice(dst, GuestAddress(addr))
            .map_err(DeviceError::Memory)
    }

    /// Copies the region's bytes at `addr` into all of `dst` (a validated
    /// TX buffer straight into where a backend sends from).
    pub fn read_into(&self, addr: u64, dst: VolatileSlice<'_>) -> Result<(), DeviceError> {
        let src = self
            .mem
            .get_slice(GuestAddress(addr), dst.len())
            .map_err(DeviceError::Memory)?;
        src.copy_to_volatile_slice(dst);
        Ok(())
    }

    /// Copies all of `src` into the region at `addr` (a validated RX
    /// buffer, straight from where a backend received it).
    pub fn write_from(&self, addr: u64, src: VolatileSlice<'_>) -> Result<(), DeviceError> {
        let dst = self
            .mem
            .get_slice(GuestAddress(addr), src.len())
            .map_err(DeviceError::Memory)?;
        src.copy_to_volatile_slice(dst);
        Ok(())
    }

    /// Copies `src` into the region (a validated RX buffer).
    pub fn write(&self, addr: u64, src: &[u8]) -> Result<(), DeviceError> {
        self.mem
            .write_slice(src, GuestAddress(addr))
            .map_err(DeviceError::Memory)
    }

    /// Returns buffer `head` of queue `q` with `len` bytes used.
    pub fn add_used(&mut self, q: usize, head: u16, len: u32) -> Result<(), DeviceError> {
        self.queues[q]
            .add_used(&self.mem, head, len)
            .map_err(DeviceError::Queue)
    }

    /// Whether the client asked to be notified of the used entries added
    /// since the last call (EVENT_IDX).
    pub fn needs_notification(&mut self, q: usize) -> Result<bool, DeviceError> {
        self.queues[q]
            .needs_notification(&self.mem)
            .map_err(DeviceError::Queue)
    }

    /// Asks the client to kick on its next post; returns true if buffers
    /// are already available (so the caller must not sleep).
    pub fn enable_notification(&mut self, q: usize) -> Result<bool, DeviceError> {
        self.queues[q]
            .enable_notification(&self.mem)
            .map_err(DeviceError::Queue)
    }

    /// Asks the client not to kick for queue `q`'s posts while devd looks
    /// at the avail ring itself (EVENT_IDX: the avail event half the index
    /// space past devd's position, which no post reaches);
    /// `enable_notification` asks for kicks again and says whether posts
    /// came meanwhile.
    pub fn suppress_kicks(&self, q: usize) -> Result<(), DeviceError> {
        let o = self.layout.queues[q];
        let at = GuestAddress(o.used as u64 + 4 + 8 * u64::from(self.layout.qsize));
        let far = self.queues[q].next_avail().wrapping_add(0x8000);
        // Relaxed: a kick the client decides on before it sees this store
        // only costs a wake-up; enable_notification's fence orders the
        // store that ends the suppression.
        self.mem
            .store(u16::to_le(far), at, Ordering::Relaxed)
            .map_err(DeviceError::Memory)
    }

    /// The client's TX marks (EOS/RESET after its last TX buffer).
    pub fn tx_flags(&self) -> u32 {
        // Acquire: pairs with the client's Release when setting the mark
        // after its last post.
        self.mem
            .load::<u32>(GuestAddress(qhdr::TX_FLAGS as u64), Ordering::Acquire)
            .unwrap_or(0)
    }

    /// Sets marks for the client to see after its last RX buffer.
    pub fn set_rx_flags(&self, f: u32) -> Result<(), DeviceError> {
        let a = GuestAddress(qhdr::RX_FLAGS as u64);
        // Release: the used entries added before are visible with the mark.
        let old = self
            .mem
            .load::<u32>(a, Ordering::Acquire)
            .map_err(DeviceError::Memory)?;
        self.mem
            .store(old | f, a, Ordering::Release)
            .map_err(DeviceError::Memory)
    }

    /// Whether the client left RX bytes unread: its holders' read position
    /// (the driver's words, `qhdr::RX_DRIVER`) is behind the entries this
    /// device returned. The client writes that word: only its own
    /// connection's end mark depends on the answer.
    pub fn rx_unread(&self) -> bool {
        let p = self
            .mem
            .load::<u64>(GuestAddress(qhdr::RX_DRIVER as u64), Ordering::Relaxed)
            .unwrap_or(0);
        super::driver::split_position(p).0 != self.queues[RX].next_used()
    }

    /// Reads a client counter word (statistics only).
    pub fn counter(&self, off: usize) -> u64 {
        self.mem
            .load::<u64>(GuestAddress(off as u64), Ordering::Relaxed)
            .unwrap_or(0)
    }

    /// The region's geometry.
    pub fn layout(&self) -> &QueuedLayout {
        &self.layout
    }
}
