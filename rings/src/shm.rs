//! Shared-memory mappings: the one place of the data path that touches raw
//! memory shared with another, untrusted process.
//!
//! A [`Mapping`] is an `mmap` of a (sealed) memfd, or of a device's memory
//! region (a VFIO BAR: `map_at`). Every accessor takes an
//! offset, checks it against the mapping's length and alignment, and only
//! then forms a reference or copies. Callers pass offsets computed from
//! their own validated layout; values *read* from the mapping are returned
//! by copy, so a peer changing them later cannot change a checked value.
//!
//! Concurrency: the control words are accessed only through atomics. Ring
//! payload bytes are copied with `ptr::copy_nonoverlapping` (or through a
//! `VolatileSlice`, `volatile`: the same raw copies) while the ring
//! protocol says the other side does not touch that range; a peer that
//! breaks the protocol can only garble the bytes it is itself sending.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64};
use vm_memory::VolatileSlice;

/// A shared mapping of `len` bytes of a file or device.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this object until drop; all
// access goes through atomics or bounds-checked copies, so sharing the
// handle across threads adds no hazard the process-sharing does not already
// have.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`: no interior state besides the mapped memory itself.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, shared, read-write or read-only.
    pub fn map(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Mapping> {
        Mapping::map_at(fd, 0, len, writable)
    }

    /// Maps `len` bytes of `fd` from `offset` (a multiple of the page
    /// size), shared: a device's memory region (a VFIO region's offset in
    /// its device fd), as `map` does a file's start.
    pub fn map_at(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> io::Result<Mapping> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED), so it
        // cannot alias any Rust object; the fd is valid for the call because
        // it is borrowed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { ptr, len, writable })
    }

    /// Whether a child forked from now on inherits the mapping
    /// (`MADV_DOFORK`, the default) or not (`MADV_DONTFORK`): a region kept
    /// for a later connection must not reach children forked meanwhile.
    pub fn set_inherited(&self, inherited: bool) -> io::Result<()> {
        let advice = if inherited {
            libc::MADV_DOFORK
        } else {
            libc::MADV_DONTFORK
        };
        // SAFETY: ptr/len are exactly this mapping, which lives as long as
        // `self`; fork inheritance advice changes no memory contents and
        // invalidates no reference in this process.
        if unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, advice) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Where the mapping starts in this process (for a device that is
    /// handed the memory to read or write: an RDMA memory region).
    pub fn addr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether stores are allowed.
    pub fn writable(&self) -> bool {
        self.writable
    }

    fn check(&self, off: usize, size: usize, align: usize) {
        let end = off.checked_add(size).expect("offset overflow");
        assert!(
            end <= self.len,
            "shm access {off}+{size} beyond {}",
            self.len
        );
        assert!(
            off.is_multiple_of(align),
            "shm access at {off} not aligned to {align}"
        );
    }

    /// The 64-bit atomic word at `off` (a layout constant, checked here).
    pub fn u64_at(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8, 8);
        // SAFETY: off+8 <= len and off is 8-aligned (checked above); the
        // page-aligned mapping lives as long as `self`, which bounds the
        // returned lifetime; AtomicU64 has the layout of u64 and all access
        // to the word by either process is atomic.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// The 32-bit atomic word at `off`.
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4, 4);
        // SAFETY: as in `u64_at`, with 4-byte size and alignment checked.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU32>() }
    }

    /// The 16-bit atomic word at `off`.
    pub fn u16_at(&self, off: usize) -> &AtomicU16 {
        self.check(off, 2, 2);
        // SAFETY: as in `u64_at`, with 2-byte size and alignment checked.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU16>() }
    }

    /// Copies `src` into the mapping at `off`.
    pub fn write_bytes(&self, off: usize, src: &[u8]) {
        assert!(self.writable, "store to a read-only mapping");
        self.check(off, src.len(), 1);
        // SAFETY: the destination range lies inside the mapping (checked);
        // `src` is private memory, so the ranges cannot overlap; the ring
        // protocol gives this side exclusive use of the range right now.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len());
        }
    }

    /// The bytes at `off..off + len` as a [`VolatileSlice`]: a copy's
    /// source or destination straight in the mapping (shared memory to
    /// shared memory: `copy_to_volatile_slice`), never a Rust reference to
    /// it. Only on a writable mapping (the slice can be written).
    pub fn volatile(&self, off: usize, len: usize) -> VolatileSlice<'_> {
        assert!(self.writable, "a slice of a read-only mapping");
        self.check(off, len, 1);
        // SAFETY: the range lies inside the mapping (checked) and the
        // mapping is writable (asserted), so any access through the slice
        // stays in mapped, writable memory; the slice borrows `self`, so
        // the mapping outlives it. VolatileSlice wants every other access
        // to be volatile: none here forms a Rust reference to these bytes
        // (this process copies them with raw-pointer copies, `read_bytes`,
        // `write_bytes` and vm-memory's own, the other process as it
        // likes), so a racing writer changes which bytes a copy gets,
        // never where it reads or writes.
        unsafe { VolatileSlice::new(self.ptr.as_ptr().add(off), len) }
    }

    /// Copies from the mapping at `off` into `dst`.
    pub fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len(), 1);
        // SAFETY: the source range lies inside the mapping (checked); `dst`
        // is private memory, so no overlap; a peer racing on the range can
        // only change which bytes we get, never where we write.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len());
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; no reference into
        // the mapping can outlive `self` (all accessors borrow `self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn words_and_bytes_round_trip() {
        let fd = crate::sys::memfd_sealed("t", 8192).unwrap();
        let m = Mapping::map(std::os::fd::AsFd::as_fd(&fd), 8192, true).unwrap();
        m.u64_at(8).store(7, Ordering::Relaxed);
        assert_eq!(m.u64_at(8).load(Ordering::Relaxed), 7);
        m.write_bytes(100, b"hello");
        let mut out = [0u8; 5];
        m.read_bytes(100, &mut out);
        assert_eq!(&out, b"hello");
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn out_of_range_access_panics_before_touching_memory() {
        let fd = crate::sys::memfd_sealed("t", 4096).unwrap();
        let m = Mapping::map(std::os::fd::AsFd::as_fd(&fd), 4096, true).unwrap();
        m.write_bytes(4090, &[0u8; 16]);
    }
}
