//! ssock-client: the connection logic as a library. Negotiation with devd
//! and the peer (DESIGN 3.2), the Direct, Queued and Kernel transports
//! behind one trait, socket semantics, and fallback to kernel TCP with the
//! reason recorded in devd. The preload shim (part 2) and `ssock-run` sit
//! on top of this crate.
//!
//! Never here: interception of libc symbols, unsafe code (shared memory
//! and FFI live in ssock-rings).

#![forbid(unsafe_code)]

pub mod bells;
pub mod exec_target;
pub mod negotiate;
pub mod options;
pub mod session;
pub mod stream;
pub mod transport;

pub use negotiate::{negotiate_connect, Negotiated, Outcome};
pub use options::Options;
pub use session::{Session, SessionError};
pub use ssock_rings::codec::{FallbackReason, Mode, ModePref};
pub use stream::{Listener, Stream};
