//! The VFIO provider's one FFI need: a borrowed fd of an object that owns
//! its fd but offers only `AsRawFd` (vfio-ioctls' device, vmm-sys-util's
//! eventfd).
//!
//! Never here: an fd whose owner is not the borrowed object.

use std::os::fd::{AsRawFd, BorrowedFd};
use vfio_ioctls::VfioDevice;
use vmm_sys_util::eventfd::EventFd;

/// The device's fd, for as long as the device is borrowed.
pub fn device_fd(d: &VfioDevice) -> BorrowedFd<'_> {
    // SAFETY: a VfioDevice owns its device fd and closes it only when it is
    // dropped, which the borrow of `d` forbids for the returned lifetime.
    unsafe { BorrowedFd::borrow_raw(d.as_raw_fd()) }
}

/// The eventfd's fd, for as long as the eventfd is borrowed.
pub fn eventfd_fd(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: an EventFd owns its fd and closes it only when it is dropped,
    // which the borrow of `e` forbids for the returned lifetime.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}
