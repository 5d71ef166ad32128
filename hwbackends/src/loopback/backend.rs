//! [`Loopback`]: channels paired inside one instance, each direction a
//! bounded queue.

use super::DEFAULT_WINDOW;
use crate::{
    Backend, BackendError, Capabilities, ChannelId, LinkEvent, Mark, Offsets, Peer, Piece, Recv,
    Syscall, Words,
};
use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;

#[derive(Debug)]
struct Channel {
    peer: ChannelId,
    /// Bytes on their way *to* this channel.
    inbox: VecDeque<u8>,
    /// Mark that follows the inbox bytes.
    inbox_mark: Option<Mark>,
    /// A reset that came after the end of stream (`inbox_mark` Eos).
    reset_after_end: bool,
    /// The mark this end sent, if it did.
    ended: Option<Mark>,
    /// This channel's outgoing stream.
    out: Offsets,
    /// The latest words sent to this channel, not yet taken.
    words: Option<Words>,
}

/// In-process loopback interconnect.
#[derive(Debug)]
pub struct Loopback {
    window: usize,
    chans: HashMap<ChannelId, Channel>,
    /// Channels whose state changed since the last poll.
    ready: Vec<ChannelId>,
}

impl Loopback {
    /// A loopback with `window` bytes in flight per direction.
    pub fn new(window: usize) -> Loopback {
        Loopback {
            window: window.max(1),
            chans: HashMap::new(),
            ready: Vec::new(),
        }
    }

    /// `ch`'s bytes no longer wait for anyone (its peer reset or went
    /// away): all of them count as acknowledged.
    fn settle(&mut self, ch: ChannelId) {
        if let Some(c) = self.chans.get_mut(&ch) {
            c.out.acked = c.out.sent;
            self.ready.push(ch);
        }
    }
}

impl Default for Loopback {
    fn default() -> Self {
        Loopback::new(DEFAULT_WINDOW)
    }
}

impl Backend for Loopback {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "loopback",
            remote: false,
            window: self.window,
            passive: true,
        }
    }

    fn readiness(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }

    fn poll(&mut self, ready: &mut Vec<ChannelId>) {
        ready.append(&mut self.ready);
    }

    fn deadline(&self) -> Option<std::time::Duration> {
        None
    }

    fn open(&mut self, ch: ChannelId, peer: Peer) -> Result<(), BackendError> {
        let Peer::Local(peer) = peer else {
            return Err(BackendError::Unreachable(ch));
        };
        if self.chans.contains_key(&ch) {
            return Err(BackendError::Busy(ch));
        }
        self.chans.insert(
            ch,
            Channel {
                peer,
                inbox: VecDeque::new(),
                inbox_mark: None,
                reset_after_end: false,
                ended: None,
                out: Offsets::default(),
                words: None,
            },
        );
        Ok(())
    }

    fn send_with(
        &mut self,
        ch: ChannelId,
        len: usize,
        fill: &mut dyn FnMut(usize, Piece<'_>) -> bool,
    ) -> Result<usize, BackendError> {
        let me = self.chans.get(&ch).ok_or(BackendError::NoChannel(ch))?;
        if me.ended.is_some() {
            return Err(BackendError::Ended(ch));
        }
        let peer = me.peer;
        let p = self
            .chans
            .get_mut(&peer)
            .filter(|p| p.peer == ch)
            .ok_or(BackendError::PeerGone(ch))?;
        let room = self.window.saturating_sub(p.inbox.len());
        let n = room.min(len);
        if n > 0 {
            if !crate::fill_in(&mut p.inbox, n, fill) {
                return Ok(0);
            }
            self.ready.push(peer);
            if let Some(me) = self.chans.get_mut(&ch) {
                me.out.sent += n as u64;
            }
        }
        Ok(n)
    }

    fn send_mark(&mut self, ch: ChannelId, mark: Mark) -> Result<(), BackendError> {
        let me = self.chans.get_mut(&ch).ok_or(BackendError::NoChannel(ch))?;
        // After its end of stream, a reset still goes (an abortive close
        // after shutdown(SHUT_WR)); nothing else follows a mark.
        let late = me.ended == Some(Mark::Eos) && mark == Mark::Reset;
        if me.ended.is_some() && !late {
            return Ok(());
        }
        me.ended = Some(mark);
        let peer = me.peer;
        let Some(p) = self.chans.get_mut(&peer).filter(|p| p.peer == ch) else {
            return Ok(());
        };
        if late {
            p.reset_after_end = true;
        } else {
            p.inbox_mark.get_or_insert(mark);
        }
        self.ready.push(peer);
        if mark == Mark::Reset {
            // The peer takes what it had received first, then the reset
            // (as a TCP receiver keeps what came before an RST); nothing
            // sent waits for its acknowledgement any more.
            self.settle(ch);
        }
        Ok(())
    }

    fn recv_with(
        &mut self,
        ch: ChannelId,
        take: &mut dyn FnMut(Piece<'_>) -> usize,
    ) -> Result<Recv, BackendError> {
        let me = self.chans.get_mut(&ch).ok_or(BackendError::NoChannel(ch))?;
        if me.inbox.is_empty() {
            return Ok(match me.inbox_mark {
                Some(m) => Recv::Mark(m),
                None => Recv::Empty,
            });
        }
        let n = crate::take_out(&mut me.inbox, take);
        let peer = me.peer;
        if n > 0 {
            if let Some(p) = self.chans.get_mut(&peer).filter(|p| p.peer == ch) {
                // (Already all of it after the peer's reset.)
                p.out.acked = (p.out.acked + n as u64).min(p.out.sent);
                self.ready.push(peer);
            }
        }
        Ok(Recv::Data(n))
    }

    fn pending(&self, ch: ChannelId) -> usize {
        self.chans.get(&ch).map_or(0, |c| c.inbox.len())
    }

    fn mark_arrived(&self, ch: ChannelId) -> Option<Mark> {
        let c = self.chans.get(&ch)?;
        if c.reset_after_end {
            return Some(Mark::Reset);
        }
        c.inbox_mark
    }

    fn end_before_reset(&self, ch: ChannelId) -> bool {
        self.chans.get(&ch).is_some_and(|c| c.reset_after_end)
    }

    fn offsets(&self, ch: ChannelId) -> Option<Offsets> {
        self.chans.get(&ch).map(|c| c.out)
    }

    fn close(&mut self, ch: ChannelId) {
        let Some(me) = self.chans.remove(&ch) else {
            return;
        };
        let Some(p) = self.chans.get_mut(&me.peer).filter(|p| p.peer == ch) else {
            return;
        };
        if me.ended.is_none() {
            p.inbox.clear();
            p.inbox_mark = Some(Mark::Reset);
        }
        // Whatever the peer sent here is dropped with this end, as a
        // write to a closed TCP peer is.
        self.settle(me.peer);
    }

    fn send_words(&mut self, ch: ChannelId, words: Words) -> Result<(), BackendError> {
        let me = self.chans.get(&ch).ok_or(BackendError::NoChannel(ch))?;
        let peer = me.peer;
        if let Some(p) = self.chans.get_mut(&peer).filter(|p| p.peer == ch) {
            p.words = Some(words);
            self.ready.push(peer);
        }
        Ok(())
    }

    fn recv_words(&mut self, ch: ChannelId) -> Option<Words> {
        self.chans.get_mut(&ch)?.words.take()
    }

    fn link_events(&mut self) -> Vec<LinkEvent> {
        Vec::new()
    }

    fn syscalls(&self) -> Vec<Syscall> {
        Vec::new()
    }
}
