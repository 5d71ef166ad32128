//! The ntb backend, on the Linux NTB model: a link to one peer node made
//! of memory windows and doorbells. Each side writes only into the peer's
//! inbox and reads only its own (ntb_transport's rule), checks every value
//! it reads there (the other host is not trusted: `inbox.rs`), copies
//! each payload once on each side (the sender's buffer into the peer's
//! inbox, published in a batch per turn; the inbox into the reader's
//! buffer: `rxq.rs`), and learns the link's state from a heartbeat word
//! plus the doorbells. Windows come from a provider
//! (`window.rs`): a shared memory file with eventfd doorbells, in one
//! process (`MemWindow`) or handed out by an ivshmem server as QEMU's
//! ivshmem-doorbell device gets them (`ivshmem.rs`), or a PCI device's BAR
//! mapped through VFIO with MSI-X doorbells (`vfio/`; the device's own
//! registers in `ivshmem_pci.rs`).
//!
//! Never here: a read of the peer's inbox, a value from the inbox used
//! before it was checked, a blocking call.

mod backend;
pub mod inbox;
pub mod ivshmem;
pub mod ivshmem_pci;
mod rxq;
#[cfg(test)]
mod tests;
pub mod vfio;
pub mod window;

pub use backend::{Counters, Ntb};
pub use ivshmem::IvshmemWindow;
pub use vfio::VfioWindow;
pub use window::{MemWindow, Window};

use std::time::Duration;

/// How often a side bumps its heartbeat word.
pub const BEAT: Duration = Duration::from_millis(250);
/// A peer whose heartbeat has not moved for this long is down.
pub const DEAD: Duration = Duration::from_secs(2);
/// Bytes a channel may have in flight each way, by default (at most half
/// the ring: `Ntb::new`). Two-host streaming of 64 KiB writes in the lab:
/// 3.8 GB/s with 256 KiB, 5.3 GB/s with 1 MiB (the kernel over the veth
/// 3.2-3.3).
pub const DEFAULT_WINDOW: usize = 1024 * 1024;
/// Bytes a channel may have in flight while another channel of the link
/// sent within `SHARED_FOR`: a small message of that other channel waits
/// behind at most this much of it at each copy on its way (the sender's
/// turn, the receiver's copy out and its delivery). A 64 B ping-pong
/// beside a stream of 64 KiB writes in the lab: a median round trip of
/// 163 us with 1 MiB, 70 us with this (docs/performance-limits.md).
pub const SHARED_WINDOW: usize = 256 * 1024;
/// How long after a send of another channel the link counts as shared.
pub const SHARED_FOR: Duration = Duration::from_millis(2);
