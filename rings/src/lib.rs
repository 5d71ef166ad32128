//! ssock-rings: the contract between clients and devd.
//!
//! What a per-connection region looks like ([`layout`]), the stream ring
//! that Direct connections use ([`stream`]), the split virtqueues of Queued
//! connections ([`vq`]: driver side for clients, device side for devd over
//! `virtio-queue`), wake-ups ([`notify`]) and the control messages
//! ([`codec`]) with their SOCK_SEQPACKET channel ([`sys::SeqPacket`]).
//!
//! Never here: threads, policy, retries, logging on the data path. The
//! only unsafe code is [`shm`] (shared memory), [`sys`] (FFI) and
//! [`detach`] (setsid, close-on-exec of inherited fds).

#![deny(unsafe_code)]

pub mod board;
pub mod codec;
pub mod detach;
pub mod env;
pub mod fdflags;
pub mod layout;
pub mod notify;
pub mod ownfds;
pub mod paths;
pub mod relay;
#[allow(unsafe_code)]
pub mod shm;
pub mod stream;
#[allow(unsafe_code)]
pub mod sys;
pub mod vq;

pub use shm::Mapping;

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
compile_error!("ssock supports 64-bit Linux only");

/// Converts a ring quantity already bounded by a region size (so below
/// `MAX_REGION`) to an index. ssock builds only for 64-bit targets (see the
/// `compile_error!` above), where this never truncates.
#[inline]
#[allow(clippy::cast_possible_truncation)]
pub fn idx(v: u64) -> usize {
    v as usize
}
