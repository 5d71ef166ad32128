//! ssock-hwbackends: the interconnects devd moves Queued data through.
//!
//! [`Backend`] says what devd's engine needs from an interconnect, not how
//! a device is opened (devd opens devices before it drops privileges and
//! hands them to a backend's constructor):
//! - channels towards a peer on this host ([`Peer::Local`]) or on another
//!   node ([`Peer::Remote`]), each an ordered byte stream with flow control
//!   (a window of bytes in flight) and an end mark ([`Mark`]) after its
//!   last byte;
//! - per channel, how far its outgoing stream went ([`Offsets`]): bytes
//!   the backend took (`sent`) and bytes the peer side has taken out of it
//!   (`acked`). The engine gives a client's TX buffer back only once its
//!   bytes are acknowledged, so a link that fails loses nothing the client
//!   does not still hold;
//! - readiness: an fd the engine's epoll waits on for news that arrives on
//!   its own (a doorbell, a completion channel), a deadline for the next
//!   poll (heartbeats), and [`Backend::poll`], which names the channels
//!   that changed;
//! - link events that name the peer node;
//! - the system calls the backend makes in the engine thread, which devd
//!   adds to that thread's seccomp filter ([`Syscall`]).
//!
//! Every backend lives in its own folder with the same files: `mod.rs`
//! (what it is, its constants), `backend.rs` (the type and its `Backend`
//! impl), `tests.rs` (the [`conformance`] suite on it, then its own
//! tests). Today: [`loopback`] (software, the CI reference). `ntb` (memory
//! windows and doorbells) and `verbs` (RDMA write with immediate) come as
//! siblings.
//!
//! Never here: control-plane policy, client memory, sockets; unsafe code
//! outside `ntb/vfio/sys.rs`, `verbs/sys.rs` and `verbs/device.rs`.

#![deny(unsafe_code)]

#[cfg(test)]
mod conformance;
pub mod loopback;
pub mod ntb;
pub mod router;
#[cfg(feature = "verbs")]
pub mod verbs;

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;

/// A stretch of bytes a copy goes to or comes from without a Rust
/// reference to it: shared memory (a client's buffer, a link's window) or
/// a backend's own (`VolatileSlice::from(&mut [u8])`).
pub use vm_memory::VolatileSlice as Piece;

/// Shows `take` what waits in `q`, piece by piece, and removes what it
/// took (at most all of it); how many (a backend's `recv_with` from its
/// per-channel queue).
pub(crate) fn take_out(q: &mut VecDeque<u8>, take: &mut dyn FnMut(Piece<'_>) -> usize) -> usize {
    let (a, b) = q.as_mut_slices();
    let n = offer(&mut [a, b], take);
    q.drain(..n);
    n
}

/// Shows `take` each of `pieces` in order until it takes less than one
/// (or all are shown); how many bytes it took in all.
pub(crate) fn offer(pieces: &mut [&mut [u8]], take: &mut dyn FnMut(Piece<'_>) -> usize) -> usize {
    let mut n = 0;
    for p in pieces.iter_mut().filter(|p| !p.is_empty()) {
        let len = p.len();
        let k = take(Piece::from(&mut **p)).min(len);
        n += k;
        if k < len {
            break;
        }
    }
    n
}

/// Appends `n` bytes to `q` that `fill` writes in place (called once per
/// contiguous piece, with its offset among the `n`: the queue may wrap);
/// false from `fill` leaves `q` as it was.
pub(crate) fn fill_in(
    q: &mut VecDeque<u8>,
    n: usize,
    fill: &mut dyn FnMut(usize, Piece<'_>) -> bool,
) -> bool {
    let old = q.len();
    q.resize(old + n, 0);
    let (a, b) = q.as_mut_slices();
    // The new bytes are the last `n`: the tail of `a` and all of `b`, or
    // the tail of `b`.
    let ok = if b.len() >= n {
        let at = b.len() - n;
        fill(0, Piece::from(&mut b[at..]))
    } else {
        let in_a = n - b.len();
        let at = a.len() - in_a;
        fill(0, Piece::from(&mut a[at..])) && (b.is_empty() || fill(in_a, Piece::from(b)))
    };
    if !ok {
        q.truncate(old);
    }
    ok
}

/// devd's name for one end of a backend channel (one Queued endpoint).
pub type ChannelId = u64;

/// A peer devd's node id, as devd's config names it.
pub type NodeId = u32;

/// Which of the links to one peer node: their order in the config of
/// both hosts (the first is 0).
pub type LinkId = u8;

/// How many links one peer node may have.
pub const MAX_LINKS: usize = 8;

/// The link a remote channel crosses: bits 56..=58 of its id (the devd
/// that names the channel picks its link too, so that both ends open it
/// on the same one). Local channels' ids, and any without those bits,
/// say link 0. Bits 59..=62 count the connection's moves onto another
/// link ([`moved_onto`]), modulo 16.
pub fn link_of(ch: ChannelId) -> LinkId {
    u8::try_from((ch >> 56) & 0x7).unwrap_or(0)
}

/// `ch` with its link bits set to `link` (below [`MAX_LINKS`]; see
/// [`link_of`]).
pub fn on_link(ch: ChannelId, link: LinkId) -> ChannelId {
    (ch & !(0x7 << 56)) | (u64::from(link & 0x7) << 56)
}

/// The channel a connection on `ch` takes when it moves onto link `link`:
/// its link bits set, its count of moves one more (so that a move back
/// onto a link it crossed before does not reuse that channel).
pub fn moved_onto(ch: ChannelId, link: LinkId) -> ChannelId {
    let moves = ((ch >> 59) + 1) & 0xF;
    on_link((ch & !(0xF << 59)) | (moves << 59), link)
}

/// The connection a remote channel is of, whatever link it crosses and
/// however often it moved.
pub fn connection_of(ch: ChannelId) -> ChannelId {
    ch & !(0x7F << 56)
}

/// Words sent beside a channel's bytes ([`Backend::send_words`]).
pub type Words = [u64; 4];

/// What a backend can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Short name for stats ("loopback", "ntb", "verbs").
    pub name: &'static str,
    /// Whether the peer may be on another host.
    pub remote: bool,
    /// Bytes a channel buffers in flight before `send` accepts less.
    pub window: usize,
    /// Nothing changes in the backend but through the engine's own calls,
    /// and `poll` only reports (no readiness fd, no deadline): the engine
    /// may take what pumping a connection caused about itself as no news.
    pub passive: bool,
}

/// Where the other end of a channel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Another channel of this same backend instance (same host).
    Local(ChannelId),
    /// A channel of the backend of the devd on node `node`.
    Remote {
        /// The peer devd's node id.
        node: NodeId,
        /// Its channel id (the peer devd's name for its end).
        channel: ChannelId,
    },
}

/// A mark that ends a channel's stream, in order after its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Orderly end of stream (FIN).
    Eos,
    /// Abortive end (RST): after the bytes sent before it, like Eos; the
    /// sender counts them all acknowledged at once.
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

/// How far a channel's outgoing stream went, in bytes from its start.
/// `acked <= sent` always; both only grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offsets {
    /// Bytes `send` accepted.
    pub sent: u64,
    /// Bytes the peer side took out of the channel (its `recv` returned
    /// them): they no longer depend on the link.
    pub acked: u64,
}

/// Whether the link to a peer node carries data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// The link came up (or back).
    Up,
    /// The link went down: channels to the node move nothing more.
    Down,
}

/// A change of one link to a peer node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkEvent {
    /// The peer devd's node.
    pub node: NodeId,
    /// Which of its links.
    pub link: LinkId,
    /// What the link does now.
    pub state: LinkState,
}

/// A system call a backend makes in the engine thread beyond devd's own
/// list, with why; devd's sandbox adds it to that thread's filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syscall {
    /// The syscall number (x86_64).
    pub nr: i64,
    /// Allowed only when argument `.0` equals one of `.1` (an ioctl's
    /// request, a descriptor); `None`: any arguments.
    pub arg: Option<(u8, Vec<u64>)>,
    /// What the backend uses it for.
    pub why: &'static str,
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
    /// The channel's peer is of a kind this backend cannot reach (a remote
    /// node on a local-only backend, an unknown node, a link that is down).
    #[error("channel {0}: its peer cannot be reached through this backend")]
    Unreachable(ChannelId),
    /// No link to this node here.
    #[error("no link to node {0}")]
    NoLink(NodeId),
}

/// An interconnect as devd's engine sees it. No call blocks.
pub trait Backend: Send {
    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;
    /// The fds that become readable when news arrives that no call of the
    /// engine made (bytes or acknowledgements from a remote peer, a link
    /// event): the engine waits on them and calls [`Backend::poll`]. None:
    /// every change happens inside the engine's own calls. They stay the
    /// same for the backend's life.
    fn readiness(&self) -> Vec<BorrowedFd<'_>>;
    /// Takes in what arrived (drains the readiness fd) and appends to
    /// `ready` every channel whose state changed since the last poll:
    /// bytes or a mark to receive, room in its window, acknowledged bytes,
    /// its peer gone. The engine polls after every turn and whenever the
    /// readiness fd fires. A channel may be named more than once.
    fn poll(&mut self, ready: &mut Vec<ChannelId>);
    /// Whether news waits that `poll` would take in, looked at without a
    /// system call (words in shared memory): the engine spins on it for a
    /// moment before it sleeps. False when the backend cannot tell so
    /// cheaply (its news come through the readiness fds only).
    fn news_waiting(&self) -> bool {
        false
    }
    /// The engine is about to sleep: a backend whose peer rings it only
    /// while it sleeps says so now. False: news came meanwhile, do not
    /// sleep. The next `poll` ends the sleep. A backend that wraps others
    /// must tell each of them (else their peers never ring them).
    fn idle(&mut self) -> bool {
        true
    }
    /// How long the engine may sleep before it must poll again even if
    /// nothing wakes it (a heartbeat to send, a peer's to check); `None`:
    /// as long as it likes.
    fn deadline(&self) -> Option<std::time::Duration>;
    /// Opens channel `ch` towards `peer`.
    fn open(&mut self, ch: ChannelId, peer: Peer) -> Result<(), BackendError>;
    /// Queues up to `len` bytes on `ch`, written by `fill` straight where
    /// the backend sends them from (a link's window, its own queue): the
    /// backend accepts `k` of them (at least one) and calls `fill(at,
    /// piece)` for each contiguous piece of those `k`, in order, `at` the
    /// piece's offset among them; `fill` writes all of the piece. Returns
    /// `k` (0: window full, `fill` not called). `fill` returning false
    /// (its source failed) queues nothing and returns 0.
    fn send_with(
        &mut self,
        ch: ChannelId,
        len: usize,
        fill: &mut dyn FnMut(usize, Piece<'_>) -> bool,
    ) -> Result<usize, BackendError>;
    /// Queues bytes on `ch`; returns how many were accepted (0: window full).
    fn send(&mut self, ch: ChannelId, data: &[u8]) -> Result<usize, BackendError> {
        self.send_with(ch, data.len(), &mut |at, dst| {
            dst.copy_from(&data[at..at + dst.len()]);
            true
        })
    }
    /// Ends `ch`'s stream after the bytes sent so far. A mark is sent
    /// once, but for a Reset after an Eos (an abortive close after
    /// shutdown(SHUT_WR)), which is told too.
    fn send_mark(&mut self, ch: ChannelId, mark: Mark) -> Result<(), BackendError>;
    /// Takes bytes that arrived for `ch` (which acknowledges them) with no
    /// copy between: `take` is shown what waits, in order, piece by piece
    /// (where the backend holds them: a link's window, its own queue), and
    /// says how many bytes from the front of each it took; a piece not
    /// taken whole is the last shown. `Recv::Data` of all it took (not
    /// called: `Empty` or the mark).
    fn recv_with(
        &mut self,
        ch: ChannelId,
        take: &mut dyn FnMut(Piece<'_>) -> usize,
    ) -> Result<Recv, BackendError>;
    /// Takes bytes that arrived for `ch` into `buf` (which acknowledges them).
    fn recv(&mut self, ch: ChannelId, buf: &mut [u8]) -> Result<Recv, BackendError> {
        let mut got = 0;
        self.recv_with(ch, &mut |p| {
            let k = p.copy_to(&mut buf[got..]);
            got += k;
            k
        })
    }
    /// Bytes waiting to be received on `ch` (0 if none or closed).
    fn pending(&self, ch: ChannelId) -> usize;
    /// The mark that arrived for `ch`, if any: `recv` gives it after the
    /// bytes still pending (a receiver learns of a reset at once, as the
    /// kernel's error on an RST, and still reads what came before it).
    /// Reset also when one came after the end of stream, which `recv`
    /// still gives as Eos (a TCP reader sees the end, not the error).
    fn mark_arrived(&self, ch: ChannelId) -> Option<Mark>;
    /// Whether the Reset `mark_arrived` tells for `ch` came after the end
    /// of stream (an abortive close after shutdown(SHUT_WR), which `recv`
    /// gives as Eos): the kernel's writer then takes EPIPE, its socket in
    /// CLOSE_WAIT, where an RST alone gives ECONNRESET.
    fn end_before_reset(&self, ch: ChannelId) -> bool;
    /// How far `ch`'s outgoing stream went; `None` if it is not open.
    fn offsets(&self, ch: ChannelId) -> Option<Offsets>;
    /// Closes `ch`; a peer still open sees Reset if no mark was sent.
    fn close(&mut self, ch: ChannelId);
    /// Sends `words` on `ch` beside its bytes: the hand-over words the
    /// engine relays between two hosts, opaque here. Each arrives whole;
    /// one not delivered yet may be replaced by a later one (only the
    /// latest matters).
    fn send_words(&mut self, ch: ChannelId, words: Words) -> Result<(), BackendError>;
    /// The latest words that arrived on `ch` since the last call, if any
    /// (`poll` names the channel when they arrive).
    fn recv_words(&mut self, ch: ChannelId) -> Option<Words>;
    /// Link events since the last call.
    fn link_events(&mut self) -> Vec<LinkEvent>;
    /// Takes link `link` to `node` (None: every link to it) out of
    /// service (`up` false: the link goes down here at once, as if the
    /// peer were gone, and the peer sees it go down too) or back in (it
    /// comes up again once both sides hear each other). Err(NoLink) if
    /// this backend has no such link.
    fn set_link(
        &mut self,
        node: NodeId,
        _link: Option<LinkId>,
        _up: bool,
    ) -> Result<(), BackendError> {
        Err(BackendError::NoLink(node))
    }
    /// Link setup with peer `node` over the peer devds' control
    /// connection (a verbs link's queue pair endpoints, docs/protocol.md
    /// 8.9): `msg` is the peer's setup message for one link (None: the
    /// control connection to `node` just came up). Returns the messages
    /// to send `node`, per link. A message for a link this backend does
    /// not have is dropped; one its link refuses is logged and dropped.
    fn setup(&mut self, _node: NodeId, _msg: Option<(LinkId, &[u8])>) -> Vec<(LinkId, Vec<u8>)> {
        Vec::new()
    }
    /// Setup messages links want sent on their own (a link that broke
    /// asks to be set up again), each once: (node, link, message).
    fn setup_due(&mut self) -> Vec<(NodeId, LinkId, Vec<u8>)> {
        Vec::new()
    }
    /// The system calls this backend makes in the engine thread that
    /// devd's own list (memory, eventfds, epoll) lacks.
    fn syscalls(&self) -> Vec<Syscall>;
}

#[cfg(test)]
mod ids {
    use super::*;

    #[test]
    fn a_channel_id_names_its_link_and_its_moves_apart_from_its_connection() {
        let ch = 1 << 63 | 7 << 40 | 12345;
        assert_eq!(link_of(ch), 0);
        let on1 = on_link(ch, 1);
        assert_eq!((link_of(on1), connection_of(on1)), (1, ch));
        // Moving onto link 1 and back onto link 0 gives new ids each time.
        let a = moved_onto(ch, 1);
        let b = moved_onto(a, 0);
        assert!(a != on1 && b != ch && b != a);
        assert_eq!((link_of(a), link_of(b)), (1, 0));
        assert_eq!((connection_of(a), connection_of(b)), (ch, ch));
        // 16 moves come round; the link bits stay within 3.
        let mut c = ch;
        for _ in 0..16 {
            c = moved_onto(c, 7);
        }
        assert_eq!((c, link_of(c)), (on_link(ch, 7), 7));
    }
}
