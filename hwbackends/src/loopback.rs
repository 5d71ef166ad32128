//! The software loopback backend: both channel ends live in this devd, and
//! a bounded in-memory queue per direction stands in for the wire. It
//! models the hardware path's flow control (a window of bytes in flight)
//! and ordered end marks, and is what CI runs.

use crate::{Backend, BackendError, Capabilities, ChannelId, LinkEvent, Mark, Peer, Recv};
use std::collections::{HashMap, VecDeque};

/// Default bytes in flight per direction.
pub const DEFAULT_WINDOW: usize = 256 * 1024;

#[derive(Debug)]
struct Channel {
    peer: ChannelId,
    /// Bytes on their way *to* this channel.
    inbox: VecDeque<u8>,
    /// Mark that follows the inbox bytes.
    inbox_mark: Option<Mark>,
    /// Whether this end already sent its mark.
    ended: bool,
}

/// In-process loopback interconnect.
#[derive(Debug)]
pub struct Loopback {
    window: usize,
    chans: HashMap<ChannelId, Channel>,
}

impl Loopback {
    /// A loopback with `window` bytes in flight per direction.
    pub fn new(window: usize) -> Loopback {
        Loopback {
            window: window.max(1),
            chans: HashMap::new(),
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
        }
    }

    fn open(&mut self, ch: ChannelId, peer: Peer) -> Result<(), BackendError> {
        let Peer::Local(peer) = peer;
        if self.chans.contains_key(&ch) {
            return Err(BackendError::Busy(ch));
        }
        self.chans.insert(
            ch,
            Channel {
                peer,
                inbox: VecDeque::new(),
                inbox_mark: None,
                ended: false,
            },
        );
        Ok(())
    }

    fn send(&mut self, ch: ChannelId, data: &[u8]) -> Result<usize, BackendError> {
        let me = self.chans.get(&ch).ok_or(BackendError::NoChannel(ch))?;
        if me.ended {
            return Err(BackendError::Ended(ch));
        }
        let peer = me.peer;
        let p = self
            .chans
            .get_mut(&peer)
            .ok_or(BackendError::PeerGone(ch))?;
        let room = self.window.saturating_sub(p.inbox.len());
        let n = room.min(data.len());
        p.inbox.extend(&data[..n]);
        Ok(n)
    }

    fn send_mark(&mut self, ch: ChannelId, mark: Mark) -> Result<(), BackendError> {
        let me = self.chans.get_mut(&ch).ok_or(BackendError::NoChannel(ch))?;
        if me.ended {
            return Ok(());
        }
        me.ended = true;
        let peer = me.peer;
        if let Some(p) = self.chans.get_mut(&peer) {
            if mark == Mark::Reset {
                p.inbox.clear();
            }
            p.inbox_mark.get_or_insert(mark);
        }
        Ok(())
    }

    fn recv(&mut self, ch: ChannelId, buf: &mut [u8]) -> Result<Recv, BackendError> {
        let me = self.chans.get_mut(&ch).ok_or(BackendError::NoChannel(ch))?;
        if me.inbox.is_empty() {
            return Ok(match me.inbox_mark {
                Some(m) => Recv::Mark(m),
                None => Recv::Empty,
            });
        }
        let n = buf.len().min(me.inbox.len());
        let (a, b) = me.inbox.as_slices();
        let first = n.min(a.len());
        buf[..first].copy_from_slice(&a[..first]);
        buf[first..n].copy_from_slice(&b[..n - first]);
        me.inbox.drain(..n);
        Ok(Recv::Data(n))
    }

    fn pending(&self, ch: ChannelId) -> usize {
        self.chans.get(&ch).map_or(0, |c| c.inbox.len())
    }

    fn close(&mut self, ch: ChannelId) {
        if let Some(me) = self.chans.remove(&ch) {
            if let Some(p) = self.chans.get_mut(&me.peer) {
                if !me.ended {
                    p.inbox.clear();
                    p.inbox_mark = Some(Mark::Reset);
                }
            }
        }
    }

    fn link_events(&mut self) -> Vec<LinkEvent> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(window: usize) -> Loopback {
        let mut l = Loopback::new(window);
        l.open(1, Peer::Local(2)).unwrap();
        l.open(2, Peer::Local(1)).unwrap();
        l
    }

    #[test]
    fn bytes_arrive_in_order_then_the_mark() {
        let mut l = pair(1024);
        assert_eq!(l.send(1, b"hello ").unwrap(), 6);
        assert_eq!(l.send(1, b"world").unwrap(), 5);
        l.send_mark(1, Mark::Eos).unwrap();
        let mut b = [0u8; 8];
        assert_eq!(l.recv(2, &mut b).unwrap(), Recv::Data(8));
        assert_eq!(&b, b"hello wo");
        assert_eq!(l.recv(2, &mut b).unwrap(), Recv::Data(3));
        assert_eq!(l.recv(2, &mut b).unwrap(), Recv::Mark(Mark::Eos));
        assert!(l.send(1, b"x").is_err());
    }

    #[test]
    fn window_limits_bytes_in_flight() {
        let mut l = pair(10);
        assert_eq!(l.send(1, &[0u8; 25]).unwrap(), 10);
        assert_eq!(l.send(1, &[0u8; 5]).unwrap(), 0);
        let mut b = [0u8; 4];
        l.recv(2, &mut b).unwrap();
        assert_eq!(l.send(1, &[0u8; 5]).unwrap(), 4);
    }

    #[test]
    fn closing_without_a_mark_resets_the_peer() {
        let mut l = pair(100);
        l.send(1, b"abc").unwrap();
        l.close(1);
        let mut b = [0u8; 4];
        assert_eq!(l.recv(2, &mut b).unwrap(), Recv::Mark(Mark::Reset));
        assert!(l.send(2, b"x").is_err());
    }
}
