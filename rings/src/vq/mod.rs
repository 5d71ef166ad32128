//! Split virtqueues in a Queued region: our own driver side for clients,
//! and the device side for devd built on `virtio-queue` over `vm-memory`.
//!
//! Each queue uses one-descriptor chains whose descriptor id equals the
//! buffer slot number, and the EVENT_IDX notification scheme in both
//! directions (avail_event / used_event).

pub mod device;
pub mod driver;

/// Descriptor flag: chain continues.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device writes this buffer.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: indirect table.
pub const F_INDIRECT: u16 = 4;

/// `vring_need_event` from the virtio spec: notify if `event` lies in
/// (old, new].
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Queue index of TX (client -> devd).
pub const TX: usize = 0;
/// Queue index of RX (devd -> client).
pub const RX: usize = 1;
