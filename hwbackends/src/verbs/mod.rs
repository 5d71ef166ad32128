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
//! RDMA WRITE and rung by RDMA WRITE WITH IMM. devd does not make such
//! links yet: the endpoints' exchange over the peers' control connection
//! and the config that names the device are still to come.
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
