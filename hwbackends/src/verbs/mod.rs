//! The verbs backend's foundation: RDMA devices through libibverbs, loaded
//! at run time (`sys.rs`: a host without rdma-core builds and runs devd;
//! a config that asks for verbs there gets a clear error), and the handles
//! a link between two devds is made of (`device.rs`): a device's context,
//! registered regions of our own memory, a completion queue whose channel
//! is an fd to sleep on, and reliable-connected queue pairs that
//! RDMA-write, with an immediate as the doorbell.
//!
//! A link is the ntb backend's protocol over [`VerbsWindow`] (`window.rs`):
//! the peer's inbox is the other host's registered region, written by
//! RDMA WRITE and rung by RDMA WRITE WITH IMM. devd makes one per RDMA
//! device a `[[peer]]` names (`verbs`); the queue pairs' endpoints are
//! exchanged over the peer devds' control connection (the window's
//! `setup`, docs/protocol.md 8.9).
//!
//! Never here: policy; unsafe code outside `sys.rs` and `device.rs`.

pub mod device;
#[allow(unsafe_code)]
pub mod sys;
#[cfg(test)]
mod tests;
mod window;

pub use device::{devices, Context, Cq, Endpoint, Qp, Region};
pub use window::VerbsWindow;

/// Bytes of each inbox of a link over verbs (both sides use this size:
/// the setup refuses another).
pub const INBOX: usize = 4 << 20;
