//! What arrived for one ntb channel and was not received yet: payloads
//! still in this node's inbox (held: their room is not given back to the
//! peer), then, once a poll found them not taken, the same bytes copied
//! out into the channel's own queue. A reader whose buffers are posted
//! takes the bytes straight from the inbox (one copy, the engine's into
//! the client's RX buffer); a slow one costs the copy out, and never the
//! peer's room for other channels past one turn.
//!
//! Never here: a frame's header or any value that steers this node (the
//! bytes held are the peer's stream, opaque; `backend.rs` checked the
//! frame before holding it).

use super::inbox::RING;
use super::window::Window;
use crate::Piece;
use std::collections::VecDeque;

/// One channel's bytes waiting for its reader, in stream order: the
/// copied ones first, then the held ones.
#[derive(Default)]
pub(super) struct RxQueue {
    copied: VecDeque<u8>,
    /// Payloads in the inbox: (ring position, length).
    held: VecDeque<(u64, usize)>,
    held_len: usize,
}

impl RxQueue {
    /// Bytes waiting.
    pub(super) fn len(&self) -> usize {
        self.copied.len() + self.held_len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Nothing waits any more (a reset: never to be read).
    pub(super) fn clear(&mut self) {
        self.copied.clear();
        self.held.clear();
        self.held_len = 0;
    }

    /// A payload of `len` bytes at ring position `pos` (checked by the
    /// caller to lie in what the peer published) comes after what waits.
    pub(super) fn hold(&mut self, pos: u64, len: usize) {
        if len > 0 {
            self.held.push_back((pos, len));
            self.held_len += len;
        }
    }

    /// Whether some of it is still in the inbox.
    pub(super) fn holds(&self) -> bool {
        self.held_len > 0
    }

    /// How many of its bytes are still in the inbox.
    pub(super) fn held(&self) -> usize {
        self.held_len
    }

    /// Copies what is held out of the inbox (`win`'s ring of `ring` bytes)
    /// into the channel's own queue: its room may go back to the peer.
    pub(super) fn copy_out(&mut self, win: &dyn Window, ring: u64) {
        self.held_len = 0;
        for (pos, len) in std::mem::take(&mut self.held) {
            self.copy(win, ring, pos, len);
        }
    }

    /// A payload as `hold` takes one, copied out at once (a small one,
    /// with nothing held before it: its room goes back at once).
    pub(super) fn copy(&mut self, win: &dyn Window, ring: u64, pos: u64, len: usize) {
        debug_assert!(!self.holds(), "copied ahead of what is held");
        crate::fill_in(&mut self.copied, len, &mut |at, dst| {
            for (p, piece) in pieces(win, ring, pos + at as u64, dst.len()) {
                if let Ok(d) = dst.offset(p) {
                    piece.copy_to_volatile_slice(d);
                }
            }
            true
        });
    }

    /// Shows `take` what waits, piece by piece and in order, until it
    /// takes less than a piece; removes and returns what it took.
    pub(super) fn take(
        &mut self,
        win: &dyn Window,
        ring: u64,
        take: &mut dyn FnMut(Piece<'_>) -> usize,
    ) -> usize {
        let had = self.copied.len();
        let mut n = crate::take_out(&mut self.copied, take);
        if n < had {
            return n;
        }
        while let Some(&(pos, len)) = self.held.front() {
            let mut got = 0;
            for (_, piece) in pieces(win, ring, pos, len) {
                let k = take(piece).min(piece.len());
                got += k;
                if k < piece.len() {
                    break;
                }
            }
            n += got;
            self.held_len -= got;
            if got < len {
                if let Some(f) = self.held.front_mut() {
                    *f = (pos + got as u64, len - got);
                }
                break;
            }
            self.held.pop_front();
        }
        n
    }
}

/// The inbox bytes at ring position `pos`, `len` of them, as one or two
/// pieces (the ring wraps), each with its offset among the `len`.
fn pieces(
    win: &dyn Window,
    ring: u64,
    pos: u64,
    len: usize,
) -> impl Iterator<Item = (usize, Piece<'_>)> {
    let ring = usize::try_from(ring).unwrap_or(0);
    let (at, first) = if ring == 0 || len == 0 {
        (0, 0)
    } else {
        let at = usize::try_from(pos % ring as u64).unwrap_or(0);
        (at, len.min(ring - at))
    };
    let one = (first > 0).then(|| (0, win.inbox_piece(RING + at, first)));
    let two = (first > 0 && first < len).then(|| (first, win.inbox_piece(RING, len - first)));
    one.into_iter().chain(two)
}
