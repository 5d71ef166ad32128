//! ssock-hwbackends: the interconnects devd moves Queued data through.
//!
//! [`Backend`] says what devd needs from an interconnect (capabilities,
//! channels to a peer, moving bytes with flow control, end-of-stream and
//! reset marks, link events), not how a device is opened: devd opens
//! devices before dropping privileges and hands them to a backend's
//! constructor. Every backend has the same file shape: `mod.rs`-level type,
//! `Backend` impl, tests. Today: [`loopback`] (software, the CI reference).
//! `ntb` (memory windows and doorbells) and `verbs` (RDMA write with
//! immediate) implement the same trait in later parts.
//!
//! Never here: control-plane policy, client memory, sockets.

#![forbid(unsafe_code)]

pub mod loopback;

/// devd's name for one end of a backend channel (one Queued endpoint).
pub type ChannelId = u64;

/// What a backend can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Short name for stats ("loopback", "ntb", "verbs").
    pub name: &'static str,
    /// Whether the peer may be on another host.
    pub remote: bool,
    /// Bytes a channel buffers in flight before `send` accepts less.
    pub window: usize,
}

/// Where the other end of a channel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Another channel of this same backend instance (same host).
    Local(ChannelId),
}

/// A mark that ends a channel's stream, in order after its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Orderly end of stream (FIN).
    Eos,
    /// Abortive end (RST).
    Reset,
}

/// What `recv` delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// Bytes copied into the buffer.
    Data(usize),
    /// Nothing now.
    Empty,
    /// All bytes were delivered; the stream ended with this mark.
    Mark(Mark),
}

/// Link state changes devd reacts to (fail-over in later parts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// The link to the peer went down.
    Down,
    /// The link came back.
    Up,
}

/// Backend failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The channel id is not open.
    #[error("channel {0} is not open")]
    NoChannel(ChannelId),
    /// The channel id is already in use.
    #[error("channel {0} is already open")]
    Busy(ChannelId),
    /// The peer end is gone.
    #[error("peer of channel {0} is gone")]
    PeerGone(ChannelId),
    /// The channel already ended; no more bytes may be sent.
    #[error("channel {0} already sent its end mark")]
    Ended(ChannelId),
}

/// An interconnect as devd's engine sees it.
pub trait Backend: Send {
    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;
    /// Opens channel `ch` towards `peer`.
    fn open(&mut self, ch: ChannelId, peer: Peer) -> Result<(), BackendError>;
    /// Queues bytes on `ch`; returns how many were accepted (0: window full).
    fn send(&mut self, ch: ChannelId, data: &[u8]) -> Result<usize, BackendError>;
    /// Ends `ch`'s stream after the bytes sent so far.
    fn send_mark(&mut self, ch: ChannelId, mark: Mark) -> Result<(), BackendError>;
    /// Takes bytes that arrived for `ch`.
    fn recv(&mut self, ch: ChannelId, buf: &mut [u8]) -> Result<Recv, BackendError>;
    /// Bytes waiting to be received on `ch` (0 if none or closed).
    fn pending(&self, ch: ChannelId) -> usize;
    /// Closes `ch`; a peer still open sees Reset if no mark was sent.
    fn close(&mut self, ch: ChannelId);
    /// Link events since the last call.
    fn link_events(&mut self) -> Vec<LinkEvent>;
}
