//! The software loopback backend: both channel ends live in this devd, and
//! a bounded in-memory queue per direction stands in for the wire. It
//! models the hardware path's flow control (a window of bytes in flight),
//! ordered end marks and acknowledgements (a byte is acknowledged when the
//! peer channel's `recv` takes it), and is what CI runs. It reaches no
//! remote node, needs no readiness fd and makes no system call.
//!
//! Never here: a peer on another node, a blocking call.

mod backend;
#[cfg(test)]
mod tests;

pub use backend::Loopback;

/// Default bytes in flight per direction.
pub const DEFAULT_WINDOW: usize = 256 * 1024;
