//! Window providers: how an ntb backend reaches its link. A window is two
//! inboxes of the same size: this node's, which only this node reads, and
//! the peer's, which only this node writes (ntb_transport's rule: nothing
//! reads across the link), plus a doorbell each way.
//!
//! [`MemWindow`] is the emulation: one shared memory file split in two
//! halves and an eventfd per direction. A VFIO-mapped PCI BAR with MSI-X
//! doorbells will be a sibling provider.
//!
//! Never here: a read of the peer's inbox, a write to this node's own.

use ssock_rings::shm::Mapping;
use ssock_rings::sys::{self, EventFd};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;

/// What the ntb backend needs from a link's memory and doorbells.
pub trait Window: Send {
    /// Bytes in each inbox.
    fn size(&self) -> usize;
    /// Copies from this node's inbox at `off`.
    fn read(&self, off: usize, dst: &mut [u8]);
    /// The 64-bit word at `off` of this node's inbox (acquire).
    fn load(&self, off: usize) -> u64;
    /// Copies `src` into the peer's inbox at `off`.
    fn write(&self, off: usize, src: &[u8]);
    /// Stores the 64-bit word at `off` of the peer's inbox (release).
    fn store(&self, off: usize, v: u64);
    /// Rings the peer's doorbell.
    fn ring(&self);
    /// This node's doorbell: readable once the peer rang.
    fn bell(&self) -> BorrowedFd<'_>;
    /// Takes the rings that came (makes the bell quiet), and whatever
    /// else the provider was told (a peer that came or went).
    fn drain(&mut self);
    /// System calls the provider makes in the engine thread beyond
    /// eventfd reads and writes.
    fn syscalls(&self) -> Vec<crate::Syscall> {
        Vec::new()
    }
}

/// An emulated link: one shared memory file, this node's inbox at one
/// half and the peer's at the other, and an eventfd doorbell each way.
pub struct MemWindow {
    map: Mapping,
    mine: usize,
    theirs: usize,
    half: usize,
    bell: EventFd,
    peer_bell: EventFd,
}

impl MemWindow {
    /// Both ends of a new link whose inboxes have `half` bytes each
    /// (rounded up to a page): what two devds on one machine share.
    pub fn pair(half: usize) -> io::Result<(MemWindow, MemWindow)> {
        let half = half.max(8192).next_multiple_of(4096);
        let fd = sys::memfd_sealed("ntb-window", 2 * half)?;
        let (a_bell, b_bell) = (EventFd::new()?, EventFd::new()?);
        let a = MemWindow {
            map: Mapping::map(fd.as_fd(), 2 * half, true)?,
            mine: 0,
            theirs: half,
            half,
            bell: EventFd::from_owned(a_bell.try_clone_fd()?),
            peer_bell: EventFd::from_owned(b_bell.try_clone_fd()?),
        };
        let b = MemWindow {
            map: Mapping::map(fd.as_fd(), 2 * half, true)?,
            mine: half,
            theirs: 0,
            half,
            bell: b_bell,
            peer_bell: a_bell,
        };
        Ok((a, b))
    }
}

impl Window for MemWindow {
    fn size(&self) -> usize {
        self.half
    }

    fn read(&self, off: usize, dst: &mut [u8]) {
        assert!(off + dst.len() <= self.half, "read beyond the inbox");
        self.map.read_bytes(self.mine + off, dst);
    }

    fn load(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.half, "load beyond the inbox");
        self.map.u64_at(self.mine + off).load(Ordering::Acquire)
    }

    fn write(&self, off: usize, src: &[u8]) {
        assert!(
            off + src.len() <= self.half,
            "write beyond the peer's inbox"
        );
        self.map.write_bytes(self.theirs + off, src);
    }

    fn store(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.half, "store beyond the peer's inbox");
        self.map
            .u64_at(self.theirs + off)
            .store(v, Ordering::Release);
    }

    fn ring(&self) {
        let _ = self.peer_bell.notify();
    }

    fn bell(&self) -> BorrowedFd<'_> {
        self.bell.as_fd()
    }

    fn drain(&mut self) {
        self.bell.drain();
    }
}
