//! Connections whose other end is on a peer host (docs/protocol.md
//! section 8.4): the listeners peers advertised (on the board, and for an
//! Intent to one of them), the connector's end held until the peer's
//! Claim names the channel, the acceptor's end made at a Claim from a
//! peer's address (its Claim sent to that peer's devd), and the peers'
//! Claims and answers.
//!
//! Never here: a channel opened towards a peer that is not up, a peer's
//! Claim matched to an intent made for another peer or to a socket that
//! is not connected to the address it names, a channel id a peer picked
//! that is not of its own range.

use super::pairing::{attachment, canon_addr, peer_of, refuse};
use super::*;
use crate::peers::wire::{Answer, Msg};
use crate::peers::Event;
use ssock_hwbackends::{link_of, on_link, LinkId, Peer};
use std::net::{IpAddr, SocketAddr};

/// The link channel of the connection `id` whose acceptor is on node
/// `node`: the acceptor's devd picks it from its own range (the top bit,
/// its node id, then the connection id plus `salt`, drawn at each start so
/// that a restarted devd does not name a channel its peer may still hold
/// open), so that both ends use one id and no two devds pick the same.
pub(super) fn channel_of(node: u32, id: u64, salt: u64) -> u64 {
    1 << 63 | u64::from(node & 0xFFFF) << 40 | (id.wrapping_add(salt) & ((1 << 40) - 1))
}

/// Whether `ch` is of node `node`'s range (see [`channel_of`]; its link
/// bits, [`ssock_hwbackends::link_of`], apart).
pub(super) fn in_range(node: u32, ch: u64) -> bool {
    ch >> 63 == 1 && (ch >> 40) & 0xFFFF == u64::from(node)
}

/// What a peer advertised, as this host reaches it: a wildcard listener
/// at the peer's own address, one on that address as it is. Any other
/// address is not the peer's to offer (a loopback one is this host's, any
/// other may be this host's or a third's): left out.
fn as_reached(l: SocketAddr, peer: IpAddr) -> Option<SocketAddr> {
    let ip = l.ip().to_canonical();
    if ip.is_unspecified() {
        // An IPv4 wildcard takes no IPv6 connection (an IPv6 one may take
        // IPv4 ones: dual-stack is the default).
        if ip.is_ipv4() && canon(peer).is_ipv6() {
            return None;
        }
        Some(SocketAddr::new(peer, l.port()))
    } else if canon(ip) == canon(peer) && !ip.is_loopback() {
        Some(l)
    } else {
        None
    }
}

/// Peers' Claims waiting at most (more are answered NoIntent at once).
const MAX_PENDING_CLAIMS: usize = 4096;

/// How long an intent for a peer's listener waits for that peer's Claim:
/// its connector writes on the kernel socket meanwhile, and an acceptor
/// that does not claim (not under ssock, or held there by its policy)
/// would otherwise pin the intent's region for `INTENT_TTL_S`.
pub(super) const REMOTE_INTENT_TTL: std::time::Duration = std::time::Duration::from_secs(10);

impl Devd {
    /// The fd that says the peers said something.
    pub fn peers_news_fd(&self) -> Option<std::os::fd::RawFd> {
        self.peers.as_ref().map(|p| p.news_fd())
    }

    /// Whether peer `node` can carry a connection now: its control
    /// connection is up, and so is its ntb link.
    pub(super) fn peer_ready(&self, node: u32) -> bool {
        self.remote.up.contains(&node) && self.link_up(node)
    }

    /// Whether an ntb link to peer `node` is up, as the engine last saw it.
    fn link_up(&self, node: u32) -> bool {
        self.engine.links().get(&node).is_some_and(|l| l.0)
    }

    /// The links configured to peer `node`.
    pub(super) fn links_to(&self, node: u32) -> usize {
        self.cfg
            .peers
            .iter()
            .find(|p| p.node == node)
            .map_or(0, |p| p.links())
    }

    /// The link a new connection with peer `node` crosses (this devd
    /// names its channel, link included): one that is up, by the peer's
    /// link policy (active-backup: the first; spread: the next in turn;
    /// docs/protocol.md 8.4), or link 0 when none is (it starts on its
    /// kernel sockets).
    pub(super) fn pick_link(&self, node: u32) -> LinkId {
        self.engine
            .choose_link(node, self.links_to(node), |t, l| t.up(node, l))
            .unwrap_or(0)
    }

    /// Whether channel `ch`, which a peer named for a new connection,
    /// crosses a link this devd has to peer `node`, and has not moved
    /// between links (docs/protocol.md 8.7: only a move gives it moves).
    pub(super) fn link_known(&self, node: u32, ch: u64) -> bool {
        usize::from(link_of(ch)) < self.links_to(node)
            && ssock_hwbackends::connection_of(ch) | u64::from(link_of(ch)) << 56 == ch
    }

    /// Whether a new connection with peer `node` is made a remote one: its
    /// control connection is up, and so is its link, or (with
    /// fail-forward on) the connection starts on its kernel sockets and
    /// moves onto the link once it is back (docs/protocol.md 8.6).
    fn peer_reachable(&self, node: u32) -> bool {
        let has_link = || {
            self.cfg
                .peers
                .iter()
                .any(|p| p.node == node && p.links() > 0)
        };
        self.remote.up.contains(&node)
            && (self.link_up(node) || (self.cfg.fail_forward_ms > 0 && has_link()))
    }

    /// The listeners peers advertised, as the board shows them.
    pub(super) fn remote_listeners(&self) -> Vec<SocketAddr> {
        self.remote.listeners.values().flatten().copied().collect()
    }

    /// The ready peer whose advertised listener serves `dst`, if any.
    pub(super) fn remote_for(&self, dst: SocketAddr) -> Option<u32> {
        self.remote
            .listeners
            .iter()
            .find(|(_, l)| {
                l.iter()
                    .any(|a| ssock_rings::board::reaches(*a, false, dst))
            })
            .map(|(&n, _)| n)
            .filter(|&n| self.peer_reachable(n))
    }

    /// The ready peer whose control address is `ip` (where its host's
    /// connections come from).
    pub(super) fn peer_at(&self, ip: IpAddr) -> Option<u32> {
        let ip = canon(ip);
        self.cfg
            .peers
            .iter()
            .find(|p| canon(p.address.ip()) == ip)
            .map(|p| p.node)
            .filter(|&n| self.peer_reachable(n))
    }

    /// The resources of a Queued connection with one end here, end `e`:
    /// that end's region and doorbells (none for the other's). `to`: the
    /// channel towards (node, channel) the engine opens now for it; none
    /// (a connector's end only): held until the peer's Claim.
    pub(super) fn remote_res(
        &mut self,
        id: u64,
        e: usize,
        to: Option<(u32, u64)>,
    ) -> Result<Res, RequestError> {
        // Only this host's end: the connector's, or the acceptor's.
        let here = [e == 0, e == 1];
        let (mut res, [connector, acceptor]) = self.queued_parts(id, here)?;
        let Res::Queued(q) = &mut res else {
            unreachable!("queued_parts makes Queued resources")
        };
        let one = 1u32.to_le_bytes();
        sys::pwrite_all(q.hov.as_fd(), &one, layout::hov::REMOTE as u64)
            .map_err(RequestError::Resources)?;
        let hov = Arc::new(
            ssock_rings::Mapping::map(q.hov.as_fd(), layout::HOV_PAGE, true)
                .map_err(RequestError::Resources)?,
        );
        if to.is_some() && e == 0 {
            // A connector's end for an acceptor's on the other host that
            // exists already (a move forward): matched from the start.
            layout::mark_matched(&hov);
        }
        match (to, connector, acceptor) {
            (None, Some(connector), _) => q.held = Some(Box::new((connector, hov))),
            (Some((node, channel)), Some(init), None)
            | (Some((node, channel)), None, Some(init)) => self.engine.send(Cmd::Add {
                id,
                sides: vec![SideSpec {
                    init,
                    ch: channel,
                    peer: Peer::Remote { node, channel },
                    end: e,
                    hov: Some(hov),
                    on_kernel: !self.engine.link_up(node, link_of(channel)),
                }],
                counters: q.counters.clone(),
            }),
            _ => unreachable!("queued_parts makes the end asked for"),
        }
        Ok(res)
    }

    /// The acceptor's end of a connection from peer `node`'s host (no
    /// intent here: its devd may hold one): made now and answered
    /// Expect, its Claim sent to the peer. Until the peer's devd says its
    /// connector holds the other end (its words, relayed), the acceptor
    /// stays on the kernel socket; if the peer finds no intent, CLAIM says
    /// kernel here.
    pub(super) fn remote_claim(
        &mut self,
        sid: u64,
        end: End,
        from: SocketAddr,
        node: u32,
    ) -> Result<Reply, RequestError> {
        let listener = self.reg.listener_inode_for(end.addr);
        self.make_room(end.uid);
        if self.refusal(sid, end.addr.port()).is_some() {
            // Its connector is told nothing: it stays on the kernel socket.
            return Ok((Response::Ok, vec![]));
        }
        let id = self.new_id();
        let channel = on_link(
            channel_of(self.cfg.node, id, self.remote.salt),
            self.pick_link(node),
        );
        let mut res = self.remote_res(id, 1, Some((node, channel)))?;
        let (attachment, fds) = match attachment(&mut res, id, 1, false, None, None) {
            Ok(a) => a,
            Err(e) => {
                self.free_res(id, &res);
                return Err(e);
            }
        };
        let bytes = self.cfg.region_size;
        self.reg
            .charge(end.uid, 1, isize::try_from(bytes).unwrap_or(isize::MAX));
        self.reg.by_inode.insert(end.inode, (id, 1));
        let to = end.addr;
        let stand_in = End {
            session: 0,
            pid: 0,
            uid: end.uid,
            inode: 0,
            addr: from,
            released: true,
            orphaned: None,
            seen: false,
        };
        self.reg.conns.insert(
            id,
            Conn {
                id,
                mode: Mode::Queued,
                ends: [stand_in, end],
                res,
                bytes,
                violated: false,
                parkable: false,
                park: [false; 2],
                listener,
                born: Instant::now(),
                ended: None,
                remote: Some((node, channel)),
                moves: Moves::default(),
            },
        );
        self.remote
            .claims
            .insert(channel, (id, node, Instant::now()));
        if let Some(p) = &self.peers {
            p.send(node, Msg::Claim { from, to, channel });
        }
        // Counted once the peer answers (`claimed`).
        Ok((
            Response::Expect {
                token: channel,
                attachment,
            },
            fds,
        ))
    }

    /// Takes in what the peers said: their listeners and links now,
    /// their answers; their Claims wait for [`Devd::answer_peer_claims`].
    pub fn peer_events(&mut self) {
        let Some(p) = &self.peers else { return };
        let mut board = false;
        for ev in p.take_events() {
            match ev {
                Event::Listeners { node, addrs } => {
                    let Some(ip) = self.cfg.peers.iter().find(|p| p.node == node) else {
                        continue;
                    };
                    let ip = ip.address.ip();
                    let total = addrs.len();
                    let l: Vec<SocketAddr> = addrs
                        .into_iter()
                        .filter_map(|a| as_reached(a, ip))
                        .collect();
                    if l.len() != total {
                        log::warn!(
                            "peer node {node} advertised {} listeners on addresses not its own: left out",
                            total - l.len()
                        );
                    }
                    if l.is_empty() {
                        self.remote.listeners.remove(&node);
                    } else {
                        self.remote.listeners.insert(node, l);
                    }
                    board = true;
                }
                Event::Link { node, up } => {
                    if up {
                        // Links that need setting up (verbs) start anew.
                        self.engine
                            .send(crate::dataplane::engine::Cmd::Setup { node, msg: None });
                        self.remote.up.insert(node);
                    } else {
                        self.remote.up.remove(&node);
                        self.peer_gone_forwards(node);
                        self.rejoin_peer_down(node);
                        // Its answers will not come: those acceptors stay
                        // on the kernel socket.
                        let lost: Vec<u64> = self
                            .remote
                            .claims
                            .iter()
                            .filter(|(_, &(_, n, _))| n == node)
                            .map(|(&ch, _)| ch)
                            .collect();
                        for ch in lost {
                            self.unanswered(ch);
                        }
                    }
                }
                Event::Claim {
                    node,
                    from,
                    to,
                    channel,
                } => {
                    if self.remote.pending.len() < MAX_PENDING_CLAIMS {
                        self.remote.pending.push((node, from, to, channel));
                    } else if let Some(p) = &self.peers {
                        log::warn!("peer node {node}: too many Claims waiting; answered none");
                        let answer = Answer::NoIntent;
                        p.send(node, Msg::Claimed { channel, answer });
                    }
                }
                Event::Claimed {
                    node,
                    channel,
                    answer,
                } => self.claimed(node, channel, answer),
                Event::Failover {
                    node,
                    channel,
                    words,
                    closed,
                } => {
                    if !self.rejoin_failover(node, channel, words, closed) {
                        self.engine
                            .send(crate::dataplane::engine::Cmd::PeerFailover {
                                node,
                                channel,
                                words,
                                closed,
                                again: false,
                            });
                    }
                }
                Event::Setup { node, link, data } => {
                    self.engine.send(crate::dataplane::engine::Cmd::Setup {
                        node,
                        msg: Some((link, data)),
                    })
                }
                Event::Rejoin {
                    node,
                    sender,
                    receiver,
                    words,
                } => self.peer_rejoin(node, sender, receiver, words),
                Event::Rejoined {
                    node,
                    sender,
                    receiver,
                    channel,
                } => self.peer_rejoined(node, sender, receiver, channel),
                Event::Migrate {
                    node,
                    channel,
                    link,
                    received,
                    marked,
                } => self
                    .engine
                    .send(crate::dataplane::engine::Cmd::PeerMigrate {
                        node,
                        channel,
                        link,
                        received,
                        marked,
                    }),
                Event::Forward { node, old, new } => self.peer_forward(node, old, new),
                Event::Forwarded { node, channel, ok } => self.forwarded(node, channel, ok),
            }
        }
        if board {
            self.listeners_changed();
        }
    }

    /// Peer `node` answered this host's Claim on `channel`: its connector
    /// holds the other end, or there was no intent for it (or no longer):
    /// CLAIM says kernel here and the acceptor stays on the kernel socket.
    fn claimed(&mut self, node: u32, channel: u64, answer: Answer) {
        let Some(&(id, n, _)) = self.remote.claims.get(&channel) else {
            return;
        };
        if n != node {
            log::warn!("peer node {node} answered a Claim that was not its own");
            return;
        }
        self.remote.claims.remove(&channel);
        // Counted even when the connection is over already (a short one
        // can end before the answer comes).
        if answer == Answer::Matched {
            self.totals.created(Mode::Queued);
            self.totals.remote += 1;
            return;
        }
        self.totals.kernel_connection();
        if answer == Answer::ConnectorGone {
            self.totals.fallback(FallbackReason::ConnectorGone);
        }
        let Some(c) = self.reg.conns.get(&id) else {
            if answer == Answer::NoIntent {
                self.totals.remote_unmatched += 1;
            }
            return;
        };
        stays_plain(id, c);
        // A connector not under ssock counts towards its listener's
        // plain-peer streak; one that let go of its intent does not.
        if answer == Answer::ConnectorGone {
            return;
        }
        self.totals.remote_unmatched += 1;
        if let Some(l) = c.listener {
            self.judge_plain_peer(l);
        }
    }

    /// Whether peers' Claims wait.
    pub fn has_peer_claims(&self) -> bool {
        !self.remote.pending.is_empty()
    }

    /// The peers' Claims taken in so far, for [`Devd::answer_peer_claims`]
    /// once every message waiting in any session now was read.
    pub fn take_peer_claims(&mut self) -> Vec<(u32, SocketAddr, SocketAddr, u64)> {
        std::mem::take(&mut self.remote.pending)
    }

    /// Answers `claims` (from [`Devd::take_peer_claims`]), each matched to
    /// an intent made for that peer whose socket is connected from `from`
    /// to `to` (answered after every message that waited in any session
    /// when they were taken was read: a connector's Intent went to this
    /// devd before its connect left the host).
    pub fn answer_peer_claims(&mut self, claims: Vec<(u32, SocketAddr, SocketAddr, u64)>) {
        for (node, from, to, channel) in claims {
            let answer = self.peer_claim(node, from, to, channel);
            if let Some(p) = &self.peers {
                p.send(node, Msg::Claimed { channel, answer });
            }
        }
    }

    fn peer_claim(&mut self, node: u32, from: SocketAddr, to: SocketAddr, channel: u64) -> Answer {
        if !in_range(node, channel) {
            log::warn!("peer node {node} claimed on channel {channel:#x}, not of its range");
            return Answer::NoIntent;
        }
        if !self.link_known(node, channel) {
            log::warn!(
                "peer node {node} claimed on link {} (channel {channel:#x}): this devd has {} links to it",
                link_of(channel),
                self.links_to(node)
            );
            return Answer::NoIntent;
        }
        // Only a connection to the peer's own address is the peer's.
        let theirs = self
            .cfg
            .peers
            .iter()
            .any(|p| p.node == node && canon(p.address.ip()) == canon(to.ip()));
        if !theirs {
            log::warn!("peer node {node} claimed a connection to {to}, not its address");
            return Answer::NoIntent;
        }
        let here = canon_addr(to);
        let from = canon_addr(from);
        let mut local = None;
        let intent = self.reg.take_intent(here, |i| {
            if i.remote != Some(node) {
                return false;
            }
            let Ok(l) = sys::local_addr(i.sock.as_fd()) else {
                return false;
            };
            local = peer_of(&i.sock, l, here, from).then_some(l);
            local.is_some()
        });
        let Some(mut intent) = intent else {
            // One its connector let go of before this Claim came.
            if self
                .take_gone_where(|g| g.key == here && g.local == from)
                .is_some()
            {
                self.totals.fallback(FallbackReason::ConnectorGone);
                return Answer::ConnectorGone;
            }
            return Answer::NoIntent;
        };
        let held = match &mut intent.res {
            Res::Queued(q) => q.held.take().map(|h| (*h, q.counters.clone())),
            Res::Direct(_) => None,
        };
        let Some(((init, hov), counters)) = held else {
            self.discard_intent(intent);
            return Answer::NoIntent;
        };
        // Before any word of the connector's page goes to the acceptor's
        // host (the engine relays them once it has the side): a kernel end
        // the connector sees from now on may come after moved bytes.
        layout::mark_matched(&hov);
        self.engine.send(Cmd::Add {
            id: intent.id,
            sides: vec![SideSpec {
                init,
                ch: channel,
                peer: Peer::Remote { node, channel },
                end: 0,
                hov: Some(hov),
                on_kernel: !self.engine.link_up(node, link_of(channel)),
            }],
            counters,
        });
        if let Some(l) = local {
            intent.end.addr = l;
        }
        let stand_in = End {
            session: 0,
            pid: 0,
            uid: intent.end.uid,
            inode: 0,
            addr: to,
            released: true,
            orphaned: None,
            seen: false,
        };
        let id = intent.id;
        self.reg.by_inode.insert(intent.end.inode, (id, 0));
        self.reg.conns.insert(
            id,
            Conn {
                id,
                mode: Mode::Queued,
                ends: [intent.end, stand_in],
                res: intent.res,
                bytes: intent.bytes,
                violated: false,
                parkable: false,
                park: [false; 2],
                listener: None,
                born: intent.at,
                ended: None,
                remote: Some((node, channel)),
                moves: Moves::default(),
            },
        );
        self.totals.created(Mode::Queued);
        self.totals.remote += 1;
        Answer::Matched
    }

    /// Gives up this host's Claims not answered in time and intents for
    /// peers that did not claim them in time (`REMOTE_INTENT_TTL`).
    pub(super) fn expire_remote(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .remote
            .claims
            .iter()
            .filter(|(_, &(_, _, at))| now.duration_since(at) >= REMOTE_INTENT_TTL)
            .map(|(&ch, _)| ch)
            .collect();
        for ch in late {
            self.unanswered(ch);
        }
        let stale = self
            .reg
            .retain_intents(|i| i.remote.is_none() || now.duration_since(i.at) < REMOTE_INTENT_TTL);
        for i in stale {
            self.discard_intent(i);
        }
    }

    /// This host's Claim on `channel` will not be answered (its peer went
    /// down, or took too long): its acceptor stays on the kernel socket.
    fn unanswered(&mut self, channel: u64) {
        let Some((id, _, _)) = self.remote.claims.remove(&channel) else {
            return;
        };
        self.totals.kernel_connection();
        if let Some(c) = self.reg.conns.get(&id) {
            log::info!("connection {id}: its peer never answered the Claim; kernel TCP");
            stays_plain(id, c);
        }
    }
}

/// CLAIM = kernel in an acceptor's end of connection `id` whose connector
/// never held its own, and its process woken (a reader that saw the
/// kernel socket end waits for this or the peer's offset).
fn stays_plain(id: u64, c: &Conn) {
    if let Err(e) = refuse(&c.res) {
        log::warn!("connection {id}: CLAIM word: {e}");
    }
    if let Res::Queued(q) = &c.res {
        let woken = q.call[1]
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no acceptor's end here"))
            .and_then(|c| c.try_clone())
            .map(EventFd::from_owned)
            .and_then(|e| e.notify());
        if let Err(e) = woken {
            log::warn!("connection {id}: the acceptor was not woken: {e}");
        }
    }
}

/// What this devd knows of its peers' side of connections.
#[derive(Debug, Default)]
pub struct RemoteState {
    /// Added to connection ids in channel ids (`channel_of`).
    pub salt: u64,
    /// Each peer's listeners, as this host reaches them.
    pub listeners: std::collections::BTreeMap<u32, Vec<SocketAddr>>,
    /// Peers whose control connection is up.
    pub up: std::collections::BTreeSet<u32>,
    /// This host's Claims not answered yet (kept until answered, or
    /// `REMOTE_INTENT_TTL`): channel -> connection, the peer, sent when.
    pub claims: HashMap<u64, (u64, u32, Instant)>,
    /// Peers' Claims waiting for the sessions to be read.
    pub pending: Vec<(u32, SocketAddr, SocketAddr, u64)>,
    /// Fail-forward (`forward.rs`).
    pub forward: super::forward::ForwardState,
    /// Rejoins asked of peers (`rejoin.rs`).
    pub rejoins: super::rejoin::RejoinState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_of_the_acceptors_range() {
        let c = channel_of(7, 12345, 99);
        assert!(in_range(7, c));
        assert!(!in_range(8, c));
        assert!(!in_range(7, 12345), "a local channel");
        assert_ne!(channel_of(7, 1, 0), channel_of(8, 1, 0));
        assert_ne!(channel_of(7, 1, 0), channel_of(7, 1, 1), "another start");
        assert_eq!(channel_of(65535, (1 << 40) + 5, 0), channel_of(65535, 5, 0));
        assert!(in_range(65535, channel_of(65535, u64::MAX, u64::MAX)));
        // The link a channel crosses changes neither its node nor its id.
        let l3 = ssock_hwbackends::on_link(c, 3);
        assert!(in_range(7, l3) && !in_range(8, l3));
        assert_eq!(ssock_hwbackends::link_of(l3), 3);
        assert_eq!(ssock_hwbackends::on_link(l3, 0), c);
    }

    #[test]
    fn a_wildcard_listener_is_reached_at_the_peers_address() {
        let peer: IpAddr = "10.77.0.2".parse().unwrap();
        let reached = |a: &str| as_reached(a.parse().unwrap(), peer);
        assert_eq!(
            reached("0.0.0.0:6379"),
            Some("10.77.0.2:6379".parse().unwrap())
        );
        assert_eq!(
            reached("[::]:6379"),
            Some("10.77.0.2:6379".parse().unwrap())
        );
        assert_eq!(
            reached("10.77.0.2:80"),
            Some("10.77.0.2:80".parse().unwrap())
        );
        let v6: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(as_reached("0.0.0.0:80".parse().unwrap(), v6), None);
        assert_eq!(
            as_reached("[::]:80".parse().unwrap(), v6),
            Some("[fd00::2]:80".parse().unwrap())
        );
        // Not the peer's to offer: another host's, this host's loopback.
        assert_eq!(reached("10.77.0.9:80"), None);
        assert_eq!(reached("127.0.0.1:6379"), None);
        assert_eq!(reached("[::1]:6379"), None);
    }
}
