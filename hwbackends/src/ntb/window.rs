//! Window providers: how an ntb backend reaches its link. A window is two
//! inboxes of the same size: this node's, which only this node reads, and
//! the peer's, which only this node writes (ntb_transport's rule: nothing
//! reads across the link), plus a doorbell each way.
//!
//! [`MemWindow`] is the emulation: one shared memory file split in two
//! halves and an eventfd per direction. Siblings: `ivshmem.rs` (a window
//! from an ivshmem server) and `vfio/` (a PCI device's BAR through VFIO,
//! MSI-X doorbells).
//!
//! Never here: a read of the peer's inbox, a write to this node's own.

use ssock_rings::shm::Mapping;
use ssock_rings::sys::{self, EventFd};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;

/// A link's memory as one side sees it: two inboxes of `size` bytes in
/// one mapping, this node's at `mine` (only read here) and the peer's at
/// `theirs` (only written here). Every access is checked against `size`.
pub struct Halves {
    map: Mapping,
    mine: usize,
    theirs: usize,
    size: usize,
}

impl Halves {
    /// `map` holds two inboxes of `size` bytes; this node's is `half`
    /// (0: the first).
    pub fn new(map: Mapping, half: usize, size: usize) -> io::Result<Halves> {
        Halves::at(map, 0, half, size)
    }

    /// `map` holds two inboxes of `size` bytes from byte `base` on (what is
    /// before it is the provider's own); this node's is `half`.
    pub fn at(map: Mapping, base: usize, half: usize, size: usize) -> io::Result<Halves> {
        if half > 1 || map.len() < base.saturating_add(size.saturating_mul(2)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no two inboxes there",
            ));
        }
        Ok(Halves {
            map,
            mine: base + half * size,
            theirs: base + (1 - half) * size,
            size,
        })
    }

    /// The whole mapping (a provider's own words before `base`).
    pub fn mapping(&self) -> &Mapping {
        &self.map
    }
}

/// What the ntb backend needs from a link's memory and doorbells.
pub trait Window: Send {
    /// The two inboxes.
    fn halves(&self) -> &Halves;
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
    /// Makes what was written into the peer's inbox since the last call
    /// reach it, in order, the inbox's words last (a window whose stores
    /// are the peer's memory already has nothing to do).
    fn publish(&mut self) {}
    /// Whether this node's stores reach the peer's memory as they are
    /// made (shared memory): then the peer is rung only while it sleeps.
    /// A window whose writes arrive later (RDMA writes, a PCIe BAR's
    /// posted writes) rings after every publish that woke nothing yet.
    fn coherent(&self) -> bool {
        true
    }
    /// The link's setup with the peer over the peer devds' control
    /// connection (a queue pair's endpoint): `msg` is the peer's setup
    /// message (None: that connection just came up); returns the one to
    /// send it. A window with nothing to set up has none.
    fn setup(&mut self, _msg: Option<&[u8]>) -> io::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// A setup message the window wants sent on its own (its link broke
    /// and asks to be set up again), once.
    fn setup_due(&mut self) -> Option<Vec<u8>> {
        None
    }

    /// Bytes in each inbox.
    fn size(&self) -> usize {
        self.halves().size
    }

    /// Copies from this node's inbox at `off`.
    fn read(&self, off: usize, dst: &mut [u8]) {
        let h = self.halves();
        assert!(off + dst.len() <= h.size, "read beyond the inbox");
        h.map.read_bytes(h.mine + off, dst);
    }

    /// The 64-bit word at `off` of this node's inbox (acquire).
    fn load(&self, off: usize) -> u64 {
        let h = self.halves();
        assert!(off + 8 <= h.size, "load beyond the inbox");
        h.map.u64_at(h.mine + off).load(Ordering::Acquire)
    }

    /// Copies `src` into the peer's inbox at `off`.
    fn write(&self, off: usize, src: &[u8]) {
        let h = self.halves();
        assert!(off + src.len() <= h.size, "write beyond the peer's inbox");
        h.map.write_bytes(h.theirs + off, src);
    }

    /// `len` bytes of this node's inbox at `off`, to copy from (a
    /// payload straight into a reader's buffer).
    fn inbox_piece(&self, off: usize, len: usize) -> crate::Piece<'_> {
        let h = self.halves();
        assert!(off + len <= h.size, "read beyond the inbox");
        h.map.volatile(h.mine + off, len)
    }

    /// `len` bytes of the peer's inbox at `off`, to copy into (a payload
    /// straight from a writer's buffer).
    fn peer_piece(&self, off: usize, len: usize) -> crate::Piece<'_> {
        let h = self.halves();
        assert!(off + len <= h.size, "write beyond the peer's inbox");
        h.map.volatile(h.theirs + off, len)
    }

    /// Stores the 64-bit word at `off` of the peer's inbox (release).
    fn store(&self, off: usize, v: u64) {
        let h = self.halves();
        assert!(off + 8 <= h.size, "store beyond the peer's inbox");
        h.map.u64_at(h.theirs + off).store(v, Ordering::Release);
    }
}

/// An emulated link: one shared memory file, this node's inbox at one
/// half and the peer's at the other, and an eventfd doorbell each way.
pub struct MemWindow {
    halves: Halves,
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
            halves: Halves::new(Mapping::map(fd.as_fd(), 2 * half, true)?, 0, half)?,
            bell: EventFd::from_owned(a_bell.try_clone_fd()?),
            peer_bell: EventFd::from_owned(b_bell.try_clone_fd()?),
        };
        let b = MemWindow {
            halves: Halves::new(Mapping::map(fd.as_fd(), 2 * half, true)?, 1, half)?,
            bell: b_bell,
            peer_bell: a_bell,
        };
        Ok((a, b))
    }
}

impl Window for MemWindow {
    fn halves(&self) -> &Halves {
        &self.halves
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
