//! [`Router`]: several backends as one, for devd's engine: a channel is
//! opened on the first backend that reaches its peer (the loopback for a
//! local peer, for a remote one the link to that node its id names:
//! [`crate::link_of`]) and every later call on it goes there. Readiness fds, deadlines, polls, link events and
//! system calls are the union of the backends'.
//!
//! Never here: an interconnect of its own, a channel on two backends.

use crate::{
    Backend, BackendError, Capabilities, ChannelId, LinkEvent, LinkId, Mark, NodeId, Offsets, Peer,
    Piece, Recv, Syscall, Words,
};
use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::time::Duration;

/// Backends behind one `Backend`.
pub struct Router {
    backends: Vec<Box<dyn Backend>>,
    /// Which backend each open channel is on.
    on: HashMap<ChannelId, usize>,
    name: &'static str,
}

impl Router {
    /// Routes over `backends`, tried in this order at each open.
    pub fn new(backends: Vec<Box<dyn Backend>>) -> Router {
        let names: Vec<&str> = backends.iter().map(|b| b.capabilities().name).collect();
        // One name for devd's life, made once at start.
        let name: &'static str = Box::leak(names.join("+").into_boxed_str());
        Router {
            backends,
            on: HashMap::new(),
            name,
        }
    }

    fn at(&self, ch: ChannelId) -> Result<&dyn Backend, BackendError> {
        let i = *self.on.get(&ch).ok_or(BackendError::NoChannel(ch))?;
        Ok(self.backends[i].as_ref())
    }

    fn at_mut(&mut self, ch: ChannelId) -> Result<&mut Box<dyn Backend>, BackendError> {
        let i = *self.on.get(&ch).ok_or(BackendError::NoChannel(ch))?;
        Ok(&mut self.backends[i])
    }
}

impl Backend for Router {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: self.name,
            remote: self.backends.iter().any(|b| b.capabilities().remote),
            window: self
                .backends
                .iter()
                .map(|b| b.capabilities().window)
                .min()
                .unwrap_or(0),
            passive: self.backends.iter().all(|b| b.capabilities().passive),
        }
    }

    fn readiness(&self) -> Vec<BorrowedFd<'_>> {
        self.backends.iter().flat_map(|b| b.readiness()).collect()
    }

    fn poll(&mut self, ready: &mut Vec<ChannelId>) {
        for b in &mut self.backends {
            b.poll(ready);
        }
    }

    fn deadline(&self) -> Option<Duration> {
        self.backends.iter().filter_map(|b| b.deadline()).min()
    }

    fn open(&mut self, ch: ChannelId, peer: Peer) -> Result<(), BackendError> {
        if self.on.contains_key(&ch) {
            return Err(BackendError::Busy(ch));
        }
        for (i, b) in self.backends.iter_mut().enumerate() {
            match b.open(ch, peer) {
                Ok(()) => {
                    self.on.insert(ch, i);
                    return Ok(());
                }
                Err(BackendError::Unreachable(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(BackendError::Unreachable(ch))
    }

    fn send_with(
        &mut self,
        ch: ChannelId,
        len: usize,
        fill: &mut dyn FnMut(usize, Piece<'_>) -> bool,
    ) -> Result<usize, BackendError> {
        self.at_mut(ch)?.send_with(ch, len, fill)
    }

    fn send_mark(&mut self, ch: ChannelId, mark: Mark) -> Result<(), BackendError> {
        self.at_mut(ch)?.send_mark(ch, mark)
    }

    fn recv_with(
        &mut self,
        ch: ChannelId,
        take: &mut dyn FnMut(Piece<'_>) -> usize,
    ) -> Result<Recv, BackendError> {
        self.at_mut(ch)?.recv_with(ch, take)
    }

    fn pending(&self, ch: ChannelId) -> usize {
        self.at(ch).map_or(0, |b| b.pending(ch))
    }

    fn mark_arrived(&self, ch: ChannelId) -> Option<Mark> {
        self.at(ch).ok()?.mark_arrived(ch)
    }

    fn end_before_reset(&self, ch: ChannelId) -> bool {
        self.at(ch).is_ok_and(|b| b.end_before_reset(ch))
    }

    fn offsets(&self, ch: ChannelId) -> Option<Offsets> {
        self.at(ch).ok()?.offsets(ch)
    }

    fn news_waiting(&self) -> bool {
        self.backends.iter().any(|b| b.news_waiting())
    }

    fn idle(&mut self) -> bool {
        // Every link is told (each may ring only a sleeper).
        let mut all = true;
        for b in &mut self.backends {
            all &= b.idle();
        }
        all
    }

    fn send_words(&mut self, ch: ChannelId, words: Words) -> Result<(), BackendError> {
        self.at_mut(ch)?.send_words(ch, words)
    }

    fn recv_words(&mut self, ch: ChannelId) -> Option<Words> {
        self.at_mut(ch).ok()?.recv_words(ch)
    }

    fn close(&mut self, ch: ChannelId) {
        if let Some(i) = self.on.remove(&ch) {
            self.backends[i].close(ch);
        }
    }

    fn link_events(&mut self) -> Vec<LinkEvent> {
        self.backends
            .iter_mut()
            .flat_map(|b| b.link_events())
            .collect()
    }

    fn set_link(
        &mut self,
        node: NodeId,
        link: Option<LinkId>,
        up: bool,
    ) -> Result<(), BackendError> {
        // Every backend with such a link (None: each link to `node`).
        let mut any = false;
        for b in &mut self.backends {
            match b.set_link(node, link, up) {
                Err(BackendError::NoLink(_)) => {}
                Ok(()) => any = true,
                Err(e) => return Err(e),
            }
        }
        if any {
            Ok(())
        } else {
            Err(BackendError::NoLink(node))
        }
    }

    fn setup(&mut self, node: NodeId, msg: Option<(LinkId, &[u8])>) -> Vec<(LinkId, Vec<u8>)> {
        self.backends
            .iter_mut()
            .flat_map(|b| b.setup(node, msg))
            .collect()
    }

    fn setup_due(&mut self) -> Vec<(NodeId, LinkId, Vec<u8>)> {
        self.backends
            .iter_mut()
            .flat_map(|b| b.setup_due())
            .collect()
    }

    fn syscalls(&self) -> Vec<Syscall> {
        self.backends.iter().flat_map(|b| b.syscalls()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{self, Lab, Linked};
    use crate::loopback::Loopback;
    use crate::ntb::{MemWindow, Ntb};

    /// Two nodes, each a router over a loopback and its ntb link to the
    /// other; pairs alternate between local (on node 1) and remote ones.
    type Routed = Linked<Router>;

    fn routed() -> Routed {
        let (w1, w2) = MemWindow::pair(1 << 20).unwrap();
        let node = |peer, w: MemWindow| -> Router {
            Router::new(vec![
                Box::new(Loopback::new(64 * 1024)),
                Box::new(Ntb::new(peer, 0, Box::new(w), 64 * 1024)),
            ])
        };
        Linked::new([node(2, w1), node(1, w2)], true)
    }

    #[test]
    fn a_channel_goes_on_the_link_its_id_names_and_one_link_out_of_service_leaves_the_other() {
        // Two links between nodes 1 and 2.
        let (a1, a2) = MemWindow::pair(1 << 20).unwrap();
        let (b1, b2) = MemWindow::pair(1 << 20).unwrap();
        let node = |peer, wa: MemWindow, wb: MemWindow| -> Router {
            Router::new(vec![
                Box::new(Loopback::new(64 * 1024)),
                Box::new(Ntb::new(peer, 0, Box::new(wa), 64 * 1024)),
                Box::new(Ntb::new(peer, 1, Box::new(wb), 64 * 1024)),
            ])
        };
        let mut n = Linked::new([node(2, a1, b1), node(1, a2, b2)], false);
        let chans: Vec<ChannelId> = (0..2).map(|l| crate::on_link(1 << 63 | 7, l)).collect();
        for &ch in &chans {
            n.b[0]
                .open(
                    ch,
                    Peer::Remote {
                        node: 2,
                        channel: ch,
                    },
                )
                .unwrap();
            n.b[1]
                .open(
                    ch,
                    Peer::Remote {
                        node: 1,
                        channel: ch,
                    },
                )
                .unwrap();
        }
        let moves = |n: &mut Routed, ch| {
            assert_eq!(n.b[0].send(ch, b"abc"), Ok(3));
            n.settle();
            let mut buf = [0u8; 8];
            n.b[1].recv(ch, &mut buf) == Ok(Recv::Data(3)) && &buf[..3] == b"abc"
        };
        assert!(chans.iter().all(|&ch| moves(&mut n, ch)));
        n.b[0].link_events();
        // Link 0 out of service on node 1: its event names it; link 1 goes on.
        n.b[0].set_link(2, Some(0), false).unwrap();
        let ev = n.b[0].link_events();
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].node, ev[0].link), (2, 0));
        assert!(moves(&mut n, chans[1]));
        assert_eq!(
            n.b[0].set_link(2, Some(5), false),
            Err(BackendError::NoLink(2))
        );
        // None: every link to the node.
        n.b[0].set_link(2, None, false).unwrap();
        let ev = n.b[0].link_events();
        assert_eq!(ev.iter().map(|e| e.link).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn a_router_over_a_loopback_and_a_link_passes_the_conformance_suite() {
        conformance::run_all(&mut || Box::new(routed()));
    }

    #[test]
    fn channels_go_where_their_peer_is_reached() {
        let mut n = routed();
        assert_eq!(n.b[0].capabilities().name, "loopback+ntb");
        assert!(n.b[0].capabilities().remote);
        assert!(
            !n.b[0].capabilities().passive,
            "the link's news come by themselves"
        );
        assert_eq!(n.b[0].readiness().len(), 1, "the link's doorbell");
        assert!(n.b[0].deadline().is_some(), "the link's heartbeat");
        assert_eq!(
            n.b[0].open(
                1,
                Peer::Remote {
                    node: 9,
                    channel: 1
                }
            ),
            Err(BackendError::Unreachable(1))
        );
        n.b[0].open(1, Peer::Local(2)).unwrap();
        assert_eq!(n.b[0].open(1, Peer::Local(3)), Err(BackendError::Busy(1)));
        n.b[0].close(1);
        assert_eq!(n.b[0].send(1, b"x"), Err(BackendError::NoChannel(1)));
    }
}
