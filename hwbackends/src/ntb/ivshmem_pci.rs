//! What is QEMU's ivshmem-doorbell PCI device's own (QEMU
//! docs/specs/ivshmem-spec.rst): which BAR holds what, its registers, and
//! how a doorbell is rung. The VFIO provider (`vfio/`) is generic over a
//! device's [`Registers`].
//!
//! Never here: VFIO, or the window's layout.

/// A device's window, bell and doorbell, as the VFIO provider needs them.
pub trait Registers: Send {
    /// The BAR index of the shared memory.
    fn window_bar(&self) -> u32;
    /// The BAR index of the registers.
    fn register_bar(&self) -> u32;
    /// Offset of this device's own doorbell id in the register BAR (read
    /// as a little-endian u32).
    fn own_id(&self) -> u64;
    /// Offset of the doorbell register and the value that rings `peer`'s
    /// vector `vector`.
    fn doorbell(&self, peer: u16, vector: u16) -> (u64, u32);
    /// Largest doorbell id a device may have.
    fn max_id(&self) -> u32;
}

/// QEMU's ivshmem-doorbell (vendor 0x1af4, device 0x1110).
pub struct Ivshmem;

/// Its PCI ids.
pub const VENDOR: u16 = 0x1af4;
pub const DEVICE: u16 = 0x1110;

impl Registers for Ivshmem {
    fn window_bar(&self) -> u32 {
        2
    }

    fn register_bar(&self) -> u32 {
        0
    }

    /// IVPosition.
    fn own_id(&self) -> u64 {
        8
    }

    /// Doorbell: the peer's id in the high 16 bits, the vector in the low.
    fn doorbell(&self, peer: u16, vector: u16) -> (u64, u32) {
        (12, (u32::from(peer) << 16) | u32::from(vector))
    }

    fn max_id(&self) -> u32 {
        0xffff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_doorbell_names_the_peer_high_and_the_vector_low() {
        assert_eq!(Ivshmem.doorbell(3, 1), (12, 0x0003_0001));
        assert_eq!(Ivshmem.doorbell(0xffff, 0), (12, 0xffff_0000));
    }
}
