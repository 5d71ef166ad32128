//! The layout of an ntb inbox and the frames in its ring. An inbox is
//! written by the peer node only and read by its owner only; everything
//! read from it is copied out once and checked before use (the other host
//! is not trusted): a value that breaks these rules marks the inbox
//! hostile.
//!
//! Layout (offsets in bytes; words little-endian u64):
//! - 0 `MAGIC`, 8 `VERSION`: written once by the peer;
//! - 16 epoch: the peer's incarnation (random, not 0), new at each start;
//! - 24 seen: the owner's epoch the peer has started over for (its
//!   producer and consumer words reset); the owner reads its ring only
//!   while this is its own epoch;
//! - 32 window: the bytes per channel the peer sends at most in flight;
//! - 40 link: which of the links between the two nodes the peer takes
//!   this window for (both must say the same);
//! - 64 heartbeat: the peer's counter, bumped every `BEAT`;
//! - 128 producer: how many ring bytes the peer has published;
//! - 192 consumer: how many bytes of *its own* inbox the peer is done
//!   with (the owner's frames it read and no longer holds: room for the
//!   owner to write again; behind what it read while it holds payloads
//!   for its readers);
//! - 256 asleep: non-zero while the peer's engine sleeps (set before it
//!   looks for news a last time): the owner rings the peer's doorbell
//!   after publishing only then. Only a hint: a false value delays the
//!   peer's own connections, nobody else's;
//! - 4096 on: the ring, `size - 4096` bytes, frames back to back and
//!   wrapping at its end.
//!
//! A frame is a 24-byte header (kind u32, payload length u32, the
//! receiver's channel u64, the sender's channel u64), then the payload,
//! padded to 8 bytes: Data (1 to 64 KiB), Eos, Reset and Gone (none), Ack
//! (a u64 offset), Words (four u64).
//!
//! Never here: a read of a shared value after it was checked.

use crate::ChannelId;

/// "SSOCKNTB".
pub const MAGIC: u64 = u64::from_le_bytes(*b"SSOCKNTB");
/// This layout's version.
pub const VERSION: u64 = 5;
pub const OFF_MAGIC: usize = 0;
pub const OFF_VERSION: usize = 8;
pub const OFF_EPOCH: usize = 16;
pub const OFF_SEEN: usize = 24;
pub const OFF_WINDOW: usize = 32;
pub const OFF_LINK: usize = 40;
pub const OFF_BEAT: usize = 64;
pub const OFF_PROD: usize = 128;
pub const OFF_CONS: usize = 192;
pub const OFF_ASLEEP: usize = 256;
/// Where the ring starts.
pub const RING: usize = 4096;
/// A frame's header.
pub const HDR: usize = 24;
/// A Words frame's payload.
pub const WORDS: usize = 32;
/// The largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The largest window a peer may declare (what one channel may make this
/// node hold).
pub const MAX_WINDOW: u64 = 16 << 20;

/// What a frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Stream bytes for the receiver's channel.
    Data,
    /// The sender's stream ended in order.
    Eos,
    /// The sender's stream ended abortively.
    Reset,
    /// The receiver's stream was taken up to the payload's u64 offset.
    Ack,
    /// The sender's channel is closed.
    Gone,
    /// Words relayed beside the stream (four u64: the engine's hand-over
    /// words, opaque here); only the latest matters.
    Words,
}

impl Kind {
    fn code(self) -> u32 {
        match self {
            Kind::Data => 1,
            Kind::Eos => 2,
            Kind::Reset => 3,
            Kind::Ack => 4,
            Kind::Gone => 5,
            Kind::Words => 6,
        }
    }

    fn from_code(c: u32) -> Option<Kind> {
        Some(match c {
            1 => Kind::Data,
            2 => Kind::Eos,
            3 => Kind::Reset,
            4 => Kind::Ack,
            5 => Kind::Gone,
            6 => Kind::Words,
            _ => return None,
        })
    }
}

/// A frame header, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub len: usize,
    /// The receiver's channel.
    pub dst: ChannelId,
    /// The sender's channel.
    pub src: ChannelId,
}

/// Ring bytes a frame of `len` payload bytes takes.
pub fn frame_size(len: usize) -> usize {
    (HDR + len).next_multiple_of(8)
}

/// The header's bytes.
pub fn encode(h: &Header) -> [u8; HDR] {
    let mut b = [0u8; HDR];
    b[0..4].copy_from_slice(&h.kind.code().to_le_bytes());
    b[4..8].copy_from_slice(&u32::try_from(h.len).unwrap_or(u32::MAX).to_le_bytes());
    b[8..16].copy_from_slice(&h.dst.to_le_bytes());
    b[16..24].copy_from_slice(&h.src.to_le_bytes());
    b
}

/// Why a frame header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Bad {
    #[error("unknown frame kind {0}")]
    Kind(u32),
    #[error("a {0:?} frame of {1} bytes")]
    Length(Kind, usize),
    #[error("a frame of {0} bytes where {1} were published")]
    Beyond(usize, usize),
}

/// Checks a header copied out of the ring, `avail` bytes being published
/// from it on.
pub fn decode(b: &[u8; HDR], avail: usize) -> Result<Header, Bad> {
    let word = |r: std::ops::Range<usize>| {
        let mut w = [0u8; 8];
        w[..r.len()].copy_from_slice(&b[r]);
        u64::from_le_bytes(w)
    };
    let code = u32::try_from(word(0..4)).unwrap_or(u32::MAX);
    let kind = Kind::from_code(code).ok_or(Bad::Kind(code))?;
    let len = usize::try_from(word(4..8)).unwrap_or(usize::MAX);
    let ok = match kind {
        Kind::Data => (1..=MAX_PAYLOAD).contains(&len),
        Kind::Ack => len == 8,
        Kind::Words => len == WORDS,
        Kind::Eos | Kind::Reset | Kind::Gone => len == 0,
    };
    if !ok {
        return Err(Bad::Length(kind, len));
    }
    if frame_size(len) > avail {
        return Err(Bad::Beyond(frame_size(len), avail));
    }
    Ok(Header {
        kind,
        len,
        dst: word(8..16),
        src: word(16..24),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        let h = Header {
            kind: Kind::Ack,
            len: 8,
            dst: 7,
            src: u64::MAX,
        };
        assert_eq!(decode(&encode(&h), 32), Ok(h));
        assert_eq!(decode(&encode(&h), 31), Err(Bad::Beyond(32, 31)));
        let mut b = encode(&h);
        b[0] = 9;
        assert_eq!(decode(&b, 64), Err(Bad::Kind(9)));
        let d = Header {
            kind: Kind::Data,
            len: 0,
            dst: 1,
            src: 1,
        };
        assert_eq!(decode(&encode(&d), 64), Err(Bad::Length(Kind::Data, 0)));
        let big = Header {
            len: MAX_PAYLOAD + 1,
            ..d
        };
        assert!(decode(&encode(&big), usize::MAX).is_err());
        let eos = Header {
            kind: Kind::Eos,
            len: 3,
            ..d
        };
        assert_eq!(decode(&encode(&eos), 64), Err(Bad::Length(Kind::Eos, 3)));
    }
}
