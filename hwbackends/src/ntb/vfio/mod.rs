//! A window provider on a PCI device that devd owns through VFIO (the
//! rust-vmm `vfio-ioctls` crate, without KVM): the VFIO container and the
//! device's IOMMU group are opened, the device's memory BAR is mapped as
//! the link's two inboxes, its MSI-X vector 0 is this node's bell (an
//! eventfd), and the peer is rung through the device's doorbell register.
//! What is the device's own (which BAR, which register) comes from its
//! [`Registers`] (`ivshmem_pci.rs`: QEMU's ivshmem-doorbell). Both nodes
//! see one memory here (ivshmem's BAR is one shared memory); a real NTB
//! adapter's inbound window is local memory and its ids come through
//! scratchpad registers, so it would need more than its registers.
//!
//! The window's first page is the provider's: the 64-bit word at 8 x h
//! holds the doorbell id, plus one, of the node that writes into half h
//! (the owner of the other half). Each node writes the word of the half it
//! writes into and reads the word of its own: nothing is read across the
//! link. The inboxes follow the page.
//!
//! Never here: a read of the peer's inbox, a write to this node's own, a
//! value read from the window used unchecked.

#[allow(unsafe_code)]
mod sys;

use super::ivshmem_pci::Registers;
use super::window::{Halves, Window};
use ssock_rings::shm::Mapping;
use ssock_rings::sys::{pread_exact, pwrite_all};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vfio_ioctls::{VfioContainer, VfioDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// The provider's page before the inboxes.
pub const PAGE: usize = 4096;
/// Largest window mapped.
pub const MAX_WINDOW: u64 = 1 << 30;
/// The PCI command register in config space, and its bus master bit.
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MASTER: u16 = 0x4;

fn bad(what: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("vfio: {what}"))
}

/// Whether `a` is a PCI address as sysfs names devices: `dddd:bb:ss.f`,
/// lower-case hexadecimal.
pub fn pci_address(a: &str) -> bool {
    a.len() == 12
        && a.bytes().enumerate().all(|(i, c)| match i {
            4 | 7 => c == b':',
            10 => c == b'.',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

/// A link's window on a VFIO-owned PCI device.
pub struct VfioWindow {
    halves: Halves,
    bell: EventFd,
    /// Never dropped: the window lives in the engine thread, and
    /// vfio-ioctls' Drop reads sysfs and unsets the group's container,
    /// system calls the engine's seccomp filter kills devd for. A window
    /// lasts as long as devd, and exit closes the fds.
    device: ManuallyDrop<VfioDevice>,
    _container: ManuallyDrop<Arc<VfioContainer>>,
    regs: Box<dyn Registers>,
    /// Where the doorbell register is in the device fd.
    doorbell_at: u64,
    half: usize,
    own_id: u16,
    /// The peer's id was seen to be this node's own (logged once).
    said: AtomicBool,
}

impl VfioWindow {
    /// Opens the PCI device `bdf` (as `0000:00:02.0`; bound to vfio-pci),
    /// this node's inbox being half `half` (0 or 1) of its window.
    pub fn open(bdf: &str, half: usize, regs: Box<dyn Registers>) -> io::Result<VfioWindow> {
        if !pci_address(bdf) || half > 1 {
            return Err(bad(format!("no PCI address {bdf:?} (half {half})")));
        }
        let sysfs = Path::new("/sys/bus/pci/devices").join(bdf);
        let container = Arc::new(VfioContainer::new(None).map_err(bad)?);
        let device = VfioDevice::new(&sysfs, container.clone()).map_err(bad)?;
        let bar = regs.window_bar();
        let need = vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP
            | vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_READ
            | vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_WRITE;
        if device.get_region_flags(bar) & need != need {
            return Err(bad(format!("{bdf}: BAR {bar} cannot be mapped read-write")));
        }
        let len = device.get_region_size(bar);
        if !(u64::try_from(PAGE + 2 * 8192).unwrap_or(u64::MAX)..=MAX_WINDOW).contains(&len) {
            return Err(bad(format!("{bdf}: a window of {len} bytes")));
        }
        let len = usize::try_from(len).map_err(bad)?;
        let size = ((len - PAGE) / 2) & !4095;
        let map = Mapping::map_at(
            sys::device_fd(&device),
            device.get_region_offset(bar),
            len,
            true,
        )?;
        let halves = Halves::at(map, PAGE, half, size)?;
        let fd = sys::device_fd(&device);
        let registers = device.get_region_offset(regs.register_bar());
        let mut b = [0u8; 4];
        pread_exact(fd, &mut b, registers + regs.own_id())
            .map_err(|e| bad(format!("{bdf}: its doorbell id: {e}")))?;
        let own = u32::from_le_bytes(b);
        let own_id = u16::try_from(own)
            .ok()
            .filter(|&id| u32::from(id) <= regs.max_id())
            .ok_or_else(|| bad(format!("{bdf}: doorbell id {own}")))?;
        // The word of the half this node writes into.
        halves
            .mapping()
            .u64_at(8 * (1 - half))
            .store(u64::from(own_id) + 1, Ordering::Release);
        // MSI-X messages are memory writes of the device's: it must be a
        // bus master.
        let config = device
            .get_region_offset(vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX)
            + PCI_COMMAND;
        let mut cmd = [0u8; 2];
        pread_exact(fd, &mut cmd, config).map_err(|e| bad(format!("{bdf}: its command: {e}")))?;
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MASTER;
        pwrite_all(fd, &cmd.to_le_bytes(), config)
            .map_err(|e| bad(format!("{bdf}: bus mastering: {e}")))?;
        let bell = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        device.enable_msix(vec![&bell]).map_err(bad)?;
        let (doorbell, _) = regs.doorbell(0, 0);
        let doorbell_at = registers + doorbell;
        log::info!(
            "vfio: {bdf}: window of {len} bytes (inboxes of {size}), doorbell id {own_id}, half {half}"
        );
        Ok(VfioWindow {
            halves,
            bell,
            device: ManuallyDrop::new(device),
            _container: ManuallyDrop::new(container),
            regs,
            doorbell_at,
            half,
            own_id,
            said: AtomicBool::new(false),
        })
    }

    /// The peer's doorbell id, once it published it (checked: within the
    /// device's ids and not this node's own).
    fn peer_id(&self) -> Option<u16> {
        let v = self
            .halves
            .mapping()
            .u64_at(8 * self.half)
            .load(Ordering::Acquire);
        let id = u16::try_from(v.checked_sub(1)?).ok()?;
        (u32::from(id) <= self.regs.max_id() && id != self.own_id).then_some(id)
    }

    /// Logs, once, a peer that names this node's own doorbell id.
    fn note_peer(&self) {
        let v = self
            .halves
            .mapping()
            .u64_at(8 * self.half)
            .load(Ordering::Acquire);
        if v == u64::from(self.own_id) + 1 && !self.said.swap(true, Ordering::Relaxed) {
            log::warn!(
                "vfio: the peer says its doorbell id is ours ({}): it is not rung",
                self.own_id
            );
        }
    }
}

impl Window for VfioWindow {
    fn halves(&self) -> &Halves {
        &self.halves
    }

    fn ring(&self) {
        // A peer that has not said where it is gets no doorbell: its
        // heartbeat has not come either.
        match self.peer_id() {
            Some(peer) => {
                let (_, v) = self.regs.doorbell(peer, 0);
                // A failed write (the device gone or reset) is not retried
                // here: the peer's heartbeat tells the link's state.
                let _ = pwrite_all(
                    sys::device_fd(&self.device),
                    &v.to_le_bytes(),
                    self.doorbell_at,
                );
            }
            None => self.note_peer(),
        }
    }

    fn bell(&self) -> BorrowedFd<'_> {
        sys::eventfd_fd(&self.bell)
    }

    fn drain(&mut self) {
        let _ = self.bell.read();
    }

    fn syscalls(&self) -> Vec<crate::Syscall> {
        let fd = u64::try_from(self.device.as_raw_fd()).unwrap_or(u64::MAX);
        vec![crate::Syscall {
            nr: libc::SYS_pwrite64,
            arg: Some((0, vec![fd])),
            why: "vfio: the peer's doorbell, a register written through the device fd",
        }]
    }
}
