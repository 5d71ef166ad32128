//! A connection between two hosts whose end's devd died, and which that
//! end's process brings to a devd started again there (docs/protocol.md
//! 8.8). The dead devd took with it what its engine knew; the end's
//! process still has its hand-over page and its TX buffers, the other
//! host's devd its side. So the process asks (`Request::Rejoin`, with its
//! socket), this devd asks the other host's (`Msg::Rejoin`, by the
//! connection's two addresses, which only a holder of the socket can
//! name), the other devd answers with the connection's channel
//! (`Msg::Rejoined`) and then takes part in the fail-over of 8.5 with the
//! process's words (its engine's `Failover`), which this devd hands the
//! process (`Response::Rejoined`): where each direction goes on over the
//! kernel socket. From then on the session that asked is that end's
//! relay to the other host: its words as they change (`Request::Words`:
//! its END once its writes are on the kernel socket in order) go there as
//! Failover messages, and the other host's come back on the session,
//! unasked, as `Response::Rejoined` (the reader's wait for the writer's
//! END, 8.5), until the session ends.
//!
//! On the other side of the same exchange, this devd answers a peer's
//! Rejoin for a connection of its own.
//!
//! Never here: an answer held without a bound (every Rejoin is answered
//! within `REJOIN_WAIT`), a connection named by a peer that is not that
//! peer's, or a reply to a session that did not ask.

use super::pairing::canon_addr;
use super::Devd;
use crate::peers::wire::Msg;
use ssock_rings::codec::Response;
use ssock_rings::sys;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long a Rejoin waits for the other host's part.
pub const REJOIN_WAIT: Duration = Duration::from_secs(3);

/// errno-like codes of a Rejoin's refusals.
const EAGAIN: u32 = 11;
const ENOENT: u32 = 2;
const ECONNRESET: u32 = 104;
const EBUSY: u32 = 16;
const ETIMEDOUT: u32 = 110;
const EINVAL: u32 = 22;

/// A (peer node, this host's end's address, the peer's end's address).
type Key = (u32, (std::net::IpAddr, u16), (std::net::IpAddr, u16));

/// How long a remote connection whose ends here were released is still
/// found for a peer's Rejoin (its engine side may still be agreeing, or
/// holding its last bytes: its process wrote them and closed while the
/// peer's devd was down).
const GONE_KEPT: Duration = Duration::from_secs(30);
/// At most this many of them.
const GONE_MAX: usize = 4096;

/// A Rejoin asked of a peer on a session's behalf.
#[derive(Debug)]
struct Waiting {
    sid: u64,
    /// What the asking end's reader was given.
    received: u64,
    /// The connection's channel, once the peer said.
    channel: Option<u64>,
    since: Instant,
}

/// The Rejoins this devd asked of peers, not answered yet, and the ends
/// that rejoined, by session.
#[derive(Debug, Default)]
pub struct RejoinState {
    waiting: HashMap<Key, Waiting>,
    /// Session -> the end it rejoined.
    rejoined: HashMap<u64, Rejoined>,
    /// Remote connections released here lately: (peer node, their two
    /// ends' addresses, canonical, in order) -> (channel, when); and the
    /// same keys oldest first, to forget them in order.
    gone: HashMap<Key, (u64, Instant)>,
    gone_order: std::collections::VecDeque<(Key, Instant)>,
}

/// An end that rejoined through a session.
#[derive(Debug)]
struct Rejoined {
    node: u32,
    channel: u64,
    /// What its reader was given: where the direction it writes closes
    /// at the peer.
    received: u64,
    /// Its words as it last sent them (`Request::Words`): none before
    /// its first, which it sends once its page has the peer's part.
    words: Option<[u64; 4]>,
}

impl Devd {
    /// Session `sid`'s Rejoin with its socket `fd`: asked of the peer whose
    /// host the socket's peer is. Its answer goes later (`answer_later`),
    /// as do the refusals found at once.
    pub(super) fn rejoin(&mut self, sid: u64, fd: &OwnedFd, words: [u64; 4], received: u64) {
        let addrs = sys::local_addr(fd.as_fd()).and_then(|l| Ok((l, sys::peer_addr(fd.as_fd())?)));
        let Ok((here, there)) = addrs else {
            return self.answer_later(sid, error(EINVAL, "not a connected socket"));
        };
        // An end of a connection this devd serves found its session hung up
        // while devd lives on (its process dropped the session): its
        // engine side still moves bytes, so no agreement may be made for
        // it behind that side's back.
        let served =
            sys::socket_inode(fd.as_fd()).is_ok_and(|i| self.reg.by_inode.contains_key(&i));
        if served {
            return self.answer_later(sid, error(EBUSY, "this devd serves that connection"));
        }
        let Some(node) = self
            .cfg
            .peers
            .iter()
            .find(|p| canon_addr(p.address).0 == canon_addr(there).0)
            .map(|p| p.node)
        else {
            return self.answer_later(sid, error(ENOENT, "not a connection with a peer host"));
        };
        let (Some(p), true) = (&self.peers, self.remote.up.contains(&node)) else {
            return self.answer_later(
                sid,
                error(EAGAIN, &format!("node {node}'s devd is not connected yet")),
            );
        };
        p.send(
            node,
            Msg::Rejoin {
                sender: here,
                receiver: there,
                words,
            },
        );
        log::info!(
            "session {sid}: asking node {node} where the connection {here} - {there} goes on"
        );
        let key = (node, canon_addr(here), canon_addr(there));
        let w = Waiting {
            sid,
            received,
            channel: None,
            since: Instant::now(),
        };
        if let Some(old) = self.remote.rejoins.waiting.insert(key, w) {
            self.answer_later(old.sid, error(ECONNRESET, "asked again from elsewhere"));
        }
    }

    /// Peer `node` asks for the connection between `sender` (its end) and
    /// `receiver` (this host's): its channel, then this host's part in
    /// the fail-over, given that end's words.
    pub(super) fn peer_rejoin(
        &mut self,
        node: u32,
        sender: SocketAddr,
        receiver: SocketAddr,
        words: [u64; 4],
    ) {
        let want = [canon_addr(sender), canon_addr(receiver)];
        // The newest connection on those two sockets (a move forward makes
        // a new one on the same sockets) whose other end is on `node`,
        // its stand-in end being the sender's.
        let channel = self
            .reg
            .conns
            .values()
            .filter(|c| c.remote.is_some_and(|(n, _)| n == node))
            .filter(|c| {
                let e = [canon_addr(c.ends[0].addr), canon_addr(c.ends[1].addr)];
                // (The stand-in end, for the other host's, has no session.)
                let stand_in = usize::from(c.ends[0].session != 0);
                (e == want || e == [want[1], want[0]]) && e[stand_in] == want[0]
            })
            .max_by_key(|c| c.id)
            .and_then(|c| c.remote.map(|(_, ch)| ch))
            .or_else(|| {
                // Released here meanwhile: its engine side may live on.
                let key = (node, want[0].min(want[1]), want[0].max(want[1]));
                let r = &self.remote.rejoins.gone;
                r.get(&key)
                    .filter(|(_, at)| at.elapsed() < GONE_KEPT)
                    .map(|&(ch, _)| ch)
            });
        let Some(p) = &self.peers else { return };
        p.send(
            node,
            Msg::Rejoined {
                sender,
                receiver,
                channel,
            },
        );
        match channel {
            Some(channel) => {
                log::info!("node {node}'s devd was started again; agreeing where the connection on channel {channel:#x} goes on");
                // Its words first: this side's part (its words, where the
                // direction it reads closed) goes back, and the end closes
                // the direction it reads only once this host's page has
                // its writer's SWITCH (`rejoined_words` brings that next),
                // as two engines agree (8.5). Said again even if unchanged:
                // an end may ask anew.
                self.engine
                    .send(crate::dataplane::engine::Cmd::PeerFailover {
                        node,
                        channel,
                        words,
                        closed: None,
                        again: true,
                    });
            }
            None => log::info!(
                "node {node} asked for a connection {sender} - {receiver} this devd does not have"
            ),
        }
    }

    /// Peer `node` answered this devd's Rejoin.
    pub(super) fn peer_rejoined(
        &mut self,
        node: u32,
        sender: SocketAddr,
        receiver: SocketAddr,
        channel: Option<u64>,
    ) {
        let key = (node, canon_addr(sender), canon_addr(receiver));
        let Some(w) = self.remote.rejoins.waiting.get_mut(&key) else {
            return;
        };
        match channel {
            Some(ch) => w.channel = Some(ch),
            None => {
                let sid = w.sid;
                self.remote.rejoins.waiting.remove(&key);
                self.answer_later(
                    sid,
                    error(ECONNRESET, &format!("node {node} has no such connection")),
                );
            }
        }
    }

    /// Peer `node`'s Failover on `channel`: the answer to a Rejoin once it
    /// carries where the direction the asking end writes closes (true:
    /// it was one; not for the engine then).
    pub(super) fn rejoin_failover(
        &mut self,
        node: u32,
        channel: u64,
        words: [u64; 4],
        closed: Option<u64>,
    ) -> bool {
        let conn = ssock_hwbackends::connection_of(channel);
        let relay = (self.remote.rejoins.rejoined.iter())
            .find(|(_, r)| r.node == node && ssock_hwbackends::connection_of(r.channel) == conn)
            .map(|(&sid, r)| (sid, r.words.map(|w| (w, r.received))));
        if let (Some((sid, ours)), Some(closed)) = (relay, closed) {
            // A rejoined end's relay: the other end's words as they change.
            self.answer_later(sid, Response::Rejoined { words, closed });
            // The peer says its part again until its agreement completes
            // (a Failover of the end's may have been lost): the end's
            // part goes again, once the end sent it.
            if let (Some((w, received)), Some(p)) = (ours, &self.peers) {
                let m = Msg::Failover {
                    channel,
                    words: w,
                    closed: Some(received),
                };
                p.send(node, m);
            }
            return true;
        }
        let Some(key) = self
            .remote
            .rejoins
            .waiting
            .iter()
            .find(|(k, w)| {
                k.0 == node && w.channel.map(ssock_hwbackends::connection_of) == Some(conn)
            })
            .map(|(k, _)| *k)
        else {
            return false;
        };
        let Some(closed) = closed else {
            // (Its part before it heard this one's: the next carries it.)
            return true;
        };
        if let Some(w) = self.remote.rejoins.waiting.remove(&key) {
            log::info!(
                "session {}: node {node} agreed where the connection on channel {channel:#x} goes on",
                w.sid
            );
            self.answer_later(w.sid, Response::Rejoined { words, closed });
            let r = Rejoined {
                node,
                channel,
                received: w.received,
                words: None,
            };
            self.remote.rejoins.rejoined.insert(w.sid, r);
        }
        true
    }

    /// A rejoined end's words changed: to the other host, as its part of
    /// the fail-over said again (its closing offset unchanged).
    pub(super) fn rejoined_words(&mut self, sid: u64, words: [u64; 4]) {
        let Some(r) = self.remote.rejoins.rejoined.get_mut(&sid) else {
            return;
        };
        r.words = Some(words);
        let (node, channel, received) = (r.node, r.channel, r.received);
        if let Some(p) = &self.peers {
            p.send(
                node,
                Msg::Failover {
                    channel,
                    words,
                    closed: Some(received),
                },
            );
        }
    }

    /// Remote connection `c` was released here: a peer's Rejoin may
    /// still name it for a while.
    pub(super) fn remote_conn_gone(&mut self, c: &super::Conn) {
        let Some((node, channel)) = c.remote else {
            return;
        };
        let (a, b) = (canon_addr(c.ends[0].addr), canon_addr(c.ends[1].addr));
        let r = &mut self.remote.rejoins;
        let now = Instant::now();
        // The oldest go first: those past `GONE_KEPT`, then any to make
        // room (a key released again since is kept under its newer time).
        while let Some(&(k, at)) = r.gone_order.front() {
            if now.duration_since(at) < GONE_KEPT && r.gone_order.len() < GONE_MAX {
                break;
            }
            r.gone_order.pop_front();
            if r.gone.get(&k).is_some_and(|&(_, t)| t == at) {
                r.gone.remove(&k);
            }
        }
        let key = (node, a.min(b), a.max(b));
        r.gone.insert(key, (channel, now));
        r.gone_order.push_back((key, now));
    }

    /// Session `sid` ended: its Rejoin and its relay go.
    pub(super) fn rejoin_session_ended(&mut self, sid: u64) {
        let r = &mut self.remote.rejoins;
        r.rejoined.remove(&sid);
        r.waiting.retain(|_, w| w.sid != sid);
    }

    /// Peer `node`'s control connection went down: its Rejoins are asked
    /// again by their processes once it is back.
    pub(super) fn rejoin_peer_down(&mut self, node: u32) {
        let keys: Vec<Key> = (self.remote.rejoins.waiting.keys())
            .filter(|k| k.0 == node)
            .copied()
            .collect();
        for k in keys {
            if let Some(w) = self.remote.rejoins.waiting.remove(&k) {
                let e = error(EAGAIN, &format!("node {node}'s devd went down"));
                self.answer_later(w.sid, e);
            }
        }
    }

    /// Rejoins that waited `REJOIN_WAIT`: refused (the other host's devd
    /// does not answer; the process resets its end).
    pub(super) fn rejoins_expire(&mut self, now: Instant) {
        let late: Vec<Key> = (self.remote.rejoins.waiting.iter())
            .filter(|(_, w)| now.duration_since(w.since) >= REJOIN_WAIT)
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            if let Some(w) = self.remote.rejoins.waiting.remove(&k) {
                let e = error(ETIMEDOUT, &format!("node {} did not answer", k.0));
                self.answer_later(w.sid, e);
            }
        }
    }

    /// When the next Rejoin is due to be refused.
    pub(super) fn rejoin_wake_in(&self, now: Instant) -> Option<Duration> {
        (self.remote.rejoins.waiting.values())
            .map(|w| (w.since + REJOIN_WAIT).saturating_duration_since(now))
            .min()
    }

    /// Sends session `sid` the answer to its Rejoin (a request devd does
    /// not answer in turn: `Request::expects_reply`).
    fn answer_later(&self, sid: u64, r: Response) {
        if let Some(sock) = self.session_sock(sid) {
            if let Err(e) = sock.send(&r.encode(), &[]) {
                log::debug!("session {sid}: the answer to its Rejoin: {e}");
            }
        }
    }
}

fn error(code: u32, message: &str) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}
