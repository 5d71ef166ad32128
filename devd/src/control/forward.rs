//! Fail-forward (docs/protocol.md 8.6): a connection between two hosts
//! that moved to its kernel sockets when its link failed moves onto the
//! link again once the link has stayed up for `fail_forward_ms`. The move
//! is a new remote connection on the same two sockets: the acceptor's
//! devd makes its end of it (a new channel of its range) and sends the
//! connector's devd a Forward; that devd makes its own end on the same
//! channel and offers it to the process that holds the moved connector
//! end (FORWARD in the moved end's hand-over page, its call eventfd
//! rung), which takes it with a Forward request when it can count its
//! kernel socket's bytes (and releases the old end), or lets it go. Only
//! then does that devd answer Forwarded, and the acceptor's devd offers
//! its new end the same way: a connector always holds its new end before
//! its acceptor takes its own, so an acceptor that finds the kernel
//! socket ended before its connector's new offset came knows that the
//! words or the end mark will come. The clients' hand-over then moves
//! each direction as at connect time, at an offset in the kernel
//! socket's whole stream.
//!
//! Never here: a new end handed to any session but the one holding the
//! moved end on the same socket, a Forward from a peer matched to a
//! connection of another peer or not moved, a channel not of the
//! acceptor's range, an offer while the peer or its link is down.

use super::remote::{channel_of, in_range};
use super::*;
use crate::peers::wire::Msg;
use ssock_hwbackends::{on_link, LinkId};
use std::time::Duration;

/// How often the acceptor's devd looks for moved connections to offer
/// (only with peers configured).
pub(super) const LOOK_EVERY: Duration = Duration::from_millis(500);

/// How many new connections are offered for one moved connection at most
/// (each refused: the peer did not see the link up yet, its end went,
/// its user's caps), and how long after one the next may be.
const MAX_TRIES: u8 = 8;
/// `Moves::tries` of a connection whose process let its new end go.
const DECLINED: u8 = u8::MAX;
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the forward logic keeps.
#[derive(Debug, Default)]
pub struct ForwardState {
    /// Each link to each peer as last seen: how many times it changed
    /// state (the engine's count) and since when it is up, if it is.
    link_up: std::collections::BTreeMap<(u32, LinkId), (u64, Option<Instant>)>,
    /// This devd's Forwards not answered yet (the connector's process
    /// has not taken or let go of its new end): new channel -> (moved
    /// connection, new connection, peer). Dropped when the peer's
    /// control connection goes down.
    pending: HashMap<u64, (u64, u64, u32)>,
    /// When to look again.
    next_look: Option<Instant>,
}

impl Devd {
    /// How long the control loop may sleep before [`Devd::forward_look`]
    /// has work (None: no peers, or fail-forward off).
    pub(super) fn forward_wake_in(&self, now: Instant) -> Option<Duration> {
        if self.peers.is_none() || self.cfg.fail_forward_ms == 0 {
            return None;
        }
        Some(
            self.remote
                .forward
                .next_look
                .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
        )
    }

    /// Whether link `link` to `node` has been up here for
    /// `fail_forward_ms` (as `forward_look` last saw it).
    fn link_held(&self, node: u32, link: LinkId) -> bool {
        let hold = Duration::from_millis(self.cfg.fail_forward_ms);
        self.remote
            .forward
            .link_up
            .get(&(node, link))
            .and_then(|&(_, since)| since)
            .is_some_and(|t| t.elapsed() >= hold)
    }

    /// Whether a link to `node` has been up for `fail_forward_ms` (a
    /// link that flaps while another stays up holds back no move onto
    /// the other).
    fn any_link_held(&self, node: u32) -> bool {
        self.remote
            .forward
            .link_up
            .keys()
            .any(|&(n, l)| n == node && self.link_held(node, l))
    }

    /// Where a moved connection moves forward: a link to `node` that has
    /// been up for `fail_forward_ms`, by the peer's link policy.
    fn held_link(&self, node: u32) -> Option<LinkId> {
        self.engine
            .choose_link(node, self.links_to(node), |_, l| self.link_held(node, l))
    }

    /// The acceptor's side: offers every moved connection whose peer and
    /// link have been up for `fail_forward_ms` a new one on the link.
    pub(super) fn forward_look(&mut self, now: Instant) {
        if self.peers.is_none() || self.cfg.fail_forward_ms == 0 {
            return;
        }
        if self.remote.forward.next_look.is_some_and(|t| now < t) {
            return;
        }
        self.remote.forward.next_look = Some(now + LOOK_EVERY);
        let links = self.engine.link_states();
        let seen = &mut self.remote.forward.link_up;
        for (&key, &(up, changes)) in &links {
            let e = seen.entry(key).or_insert((changes, None));
            if e.0 != changes || !up {
                *e = (changes, None);
            }
            if up && e.1.is_none() {
                e.1 = Some(now);
            }
        }
        let mut nodes: Vec<u32> = seen.keys().map(|&(n, _)| n).collect();
        nodes.dedup();
        let held: Vec<u32> = nodes
            .into_iter()
            .filter(|&n| self.any_link_held(n) && self.remote.up.contains(&n))
            .collect();
        if held.is_empty() {
            return;
        }
        let due: Vec<u64> = self
            .reg
            .conns
            .values()
            .filter(|c| {
                c.remote.is_some_and(|(n, _)| held.contains(&n))
                    && moved(c)
                    && c.ends[0].inode == 0
                    && live(&c.ends[1])
                    && c.moves.next.is_none()
                    && c.moves.prev.is_none()
                    && c.moves.tries < MAX_TRIES
                    && c.moves.retry_at.is_none_or(|t| now >= t)
            })
            .map(|c| c.id)
            .collect();
        if !due.is_empty() {
            log::info!(
                "offering {} moved connections a new connection on the link",
                due.len()
            );
        }
        for id in due {
            // Counted whatever comes of it: a refusal (caps, policy) is
            // not tried again at every look.
            if let Some(c) = self.reg.conns.get_mut(&id) {
                c.moves.tries = c.moves.tries.saturating_add(1);
                c.moves.retry_at = Some(now + RETRY_AFTER);
            }
            if let Err(e) = self.offer_forward(id) {
                log::warn!("connection {id}: no new connection on the link: {e}");
            }
        }
    }

    /// Makes the acceptor's end of the connection that takes moved
    /// connection `old`'s place on the link, and sends the Forward.
    fn offer_forward(&mut self, old: u64) -> Result<(), RequestError> {
        let Some(c) = self.reg.conns.get(&old) else {
            return Ok(());
        };
        let Some((node, old_ch)) = c.remote else {
            return Ok(());
        };
        let ends = c.ends.clone();
        let moves = c.moves;
        if let Some(why) = self.may_not(&ends[1], ends[1].addr.port()) {
            log::debug!("connection {old}: stays on its kernel socket ({why:?})");
            return Ok(());
        }
        // (A link that stayed up for the hold; `forward_look` found one.)
        let Some(link) = self.held_link(node) else {
            return Ok(());
        };
        let id = self.new_id();
        let ch = on_link(channel_of(self.cfg.node, id, self.remote.salt), link);
        let res = self.remote_res(id, 1, Some((node, ch)))?;
        self.new_conn(id, res, ends, 1, (node, ch), (old, old_ch), moves);
        self.remote.forward.pending.insert(ch, (old, id, node));
        if let Some(p) = &self.peers {
            p.send(
                node,
                Msg::Forward {
                    old: old_ch,
                    new: ch,
                },
            );
        }
        Ok(())
    }

    /// Records connection `id` (resources `res`, this host's end `e` a
    /// copy of the moved connection `old`'s, held by the same session)
    /// as the one offered to take `old`'s place (the Forward naming
    /// channel `old_ch`).
    #[allow(clippy::too_many_arguments)]
    fn new_conn(
        &mut self,
        id: u64,
        res: Res,
        mut ends: [End; 2],
        e: usize,
        remote: (u32, u64),
        (old, old_ch): (u64, u64),
        moves: Moves,
    ) {
        ends[e].released = false;
        ends[e].orphaned = None;
        let bytes = self.cfg.region_size;
        self.reg
            .charge(ends[e].uid, 1, isize::try_from(bytes).unwrap_or(isize::MAX));
        self.reg.conns.insert(
            id,
            Conn {
                id,
                mode: Mode::Queued,
                ends,
                res,
                bytes,
                violated: false,
                parkable: false,
                park: [false; 2],
                listener: None,
                born: Instant::now(),
                ended: None,
                remote: Some(remote),
                moves: Moves {
                    next: None,
                    prev: Some(old),
                    failovers: moves.failovers + 1,
                    forwards: moves.forwards + 1,
                    tries: 0,
                    retry_at: None,
                    replaces: Some(old_ch),
                },
            },
        );
        if let Some(c) = self.reg.conns.get_mut(&old) {
            c.moves.next = Some(id);
        }
    }

    /// The connector's side: peer `node` offers its moved connection on
    /// channel `old` a new one on channel `new`; answered Forwarded once
    /// the connector's process took its new end or let it go, or its end
    /// went (at once if none can be made).
    pub(super) fn peer_forward(&mut self, node: u32, old: u64, new: u64) {
        if !self.take_peer_forward(node, old, new) {
            self.answer_forward(node, new, false);
        }
    }

    /// Forwarded to peer `node` for channel `channel`.
    fn answer_forward(&self, node: u32, channel: u64, ok: bool) {
        if let Some(p) = &self.peers {
            p.send(node, Msg::Forwarded { channel, ok });
        }
    }

    /// Peer `node`'s control connection went down: its Forwards will not
    /// be answered (their new ends are let go of).
    pub(super) fn peer_gone_forwards(&mut self, node: u32) {
        let lost: Vec<u64> = self
            .remote
            .forward
            .pending
            .iter()
            .filter(|(_, &(.., n))| n == node)
            .map(|(&ch, _)| ch)
            .collect();
        for ch in lost {
            if let Some((_, new, _)) = self.remote.forward.pending.remove(&ch) {
                self.drop_forward(new);
            }
        }
    }

    /// False if it answered nothing (the caller answers no).
    fn take_peer_forward(&mut self, node: u32, old: u64, new: u64) -> bool {
        if !in_range(node, new) || !self.link_known(node, new) {
            log::warn!("peer node {node} offered channel {new:#x}, not of its range or links");
            return false;
        }
        // Its own view of the link the channel crosses counts too: one
        // side may have missed the other's heartbeat for less than it
        // takes to call it down (within `ntb::DEAD`).
        let link = ssock_hwbackends::link_of(new);
        let held = self.link_held(node, link) && self.engine.link_up(node, link);
        if self.cfg.fail_forward_ms == 0 || !self.peer_ready(node) || !held {
            log::info!("peer node {node} offered a new connection for channel {old:#x}: not while the link is down here, or fail-forward is off");
            return false;
        }
        if self.reg.conns.values().any(|c| {
            c.remote.is_some_and(|(n, ch)| {
                n == node
                    && ssock_hwbackends::connection_of(ch) == ssock_hwbackends::connection_of(new)
            })
        }) {
            log::warn!("peer node {node} offered channel {new:#x}, in use");
            return false;
        }
        // The connection on that channel; or the one that took its place
        // here, if the acceptor never took its own end of that one (the
        // link failed first: the acceptor's devd still holds the old one).
        let find = |c: &&Conn| {
            (c.remote == Some((node, old))
                || (c.moves.replaces == Some(old) && c.remote.is_some_and(|(n, _)| n == node)))
                && moved(c)
                && c.ends[1].inode == 0
                && live(&c.ends[0])
                && c.moves.tries != DECLINED
                && c.moves.prev.is_none()
        };
        // An earlier offer its process did not take yet: the peer gave
        // its side of it up (no answer came in time), so this one replaces
        // it.
        let earlier = self
            .reg
            .conns
            .values()
            .find(find)
            .and_then(|c| c.moves.next);
        if let Some(n) = earlier {
            self.drop_forward(n);
        }
        let Some(c) = self
            .reg
            .conns
            .values()
            .find(find)
            .filter(|c| c.moves.next.is_none())
        else {
            log::info!("peer node {node} offered a new connection for channel {old:#x}: no moved connection of this host's there");
            return false;
        };
        let (old_id, ends, moves) = (c.id, c.ends.clone(), c.moves);
        if let Some(why) = self.may_not(&ends[0], ends[1].addr.port()) {
            log::debug!("connection {old_id}: stays on its kernel socket ({why:?})");
            return false;
        }
        let id = self.new_id();
        let res = match self.remote_res(id, 0, Some((node, new))) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("connection {old_id}: no new connection on the link: {e}");
                return false;
            }
        };
        self.new_conn(id, res, ends, 0, (node, new), (old_id, old), moves);
        // (Answered no already if the offer failed: its end let go of.)
        self.offer(old_id, id, 0);
        true
    }

    /// Why `end`'s user may not have one more connection's region now (its
    /// policy and caps for `port`, the acceptor's, as at Intent and
    /// Claim), if it may not.
    fn may_not(&mut self, end: &End, port: u16) -> Option<FallbackReason> {
        if !self.sessions.contains_key(&end.session) {
            return Some(FallbackReason::DevdError);
        }
        self.make_room(end.uid);
        self.refusal(end.session, port)
    }

    /// The acceptor's side: peer `node` answered the Forward on `channel`.
    pub(super) fn forwarded(&mut self, node: u32, channel: u64, ok: bool) {
        let Some(&(old, new, n)) = self.remote.forward.pending.get(&channel) else {
            return;
        };
        if n != node {
            log::warn!("peer node {node} answered a Forward that was not its own");
            return;
        }
        self.remote.forward.pending.remove(&channel);
        let live_old = self
            .reg
            .conns
            .get(&old)
            .is_some_and(|c| live(&c.ends[1]) && c.moves.next == Some(new));
        if ok && live_old && self.reg.conns.contains_key(&new) && self.peer_ready(node) {
            self.offer(old, new, 1);
        } else {
            self.drop_forward(new);
        }
    }

    /// Offers end `e` of connection `new` to the process holding that end
    /// of the moved connection `old`: FORWARD in `old`'s hand-over page,
    /// its call eventfd rung. False if it could not (`new` let go of).
    fn offer(&mut self, old: u64, new: u64, e: usize) -> bool {
        let Some(Res::Queued(q)) = self.reg.conns.get(&old).map(|c| &c.res) else {
            self.drop_forward(new);
            return false;
        };
        let (off, b) = layout::forward_bytes();
        if let Err(err) = sys::pwrite_all(q.hov.as_fd(), &b, off) {
            log::warn!("connection {old}: FORWARD word: {err}");
            self.drop_forward(new);
            return false;
        }
        let woken = q.call[e]
            .as_ref()
            .ok_or_else(|| io::Error::other("no end here"))
            .and_then(|c| c.try_clone())
            .map(EventFd::from_owned)
            .and_then(|c| c.notify());
        if let Err(err) = woken {
            log::warn!("connection {old}: its process was not woken for its new connection: {err}");
        }
        self.totals.forwards_offered += 1;
        log::info!("connection {old}: connection {new} offered to take its place on the link");
        true
    }

    /// Releases this host's end of connection `new`, offered and not
    /// taken (its engine side ends with Eos: its writes never moved). On
    /// the connector's side the peer is answered no.
    pub(super) fn drop_forward(&mut self, new: u64) {
        let Some(c) = self.reg.conns.get(&new) else {
            return;
        };
        // (Releasing it does the rest: `forward_end_released`.)
        let e = usize::from(c.ends[0].inode == 0);
        self.release_end(new, e);
    }

    /// End `e` of connection `id` is being released: if it is a new end
    /// offered and not taken (its process went, its socket was found
    /// closed), the moved connection forgets it and, on the connector's
    /// side, the peer is answered no.
    pub(super) fn forward_end_released(&mut self, id: u64, e: usize) {
        let Some(c) = self.reg.conns.get_mut(&id) else {
            return;
        };
        let Some(old) = c.moves.prev.take() else {
            return;
        };
        let answer = c.remote.filter(|_| e == 0 && c.ends[1].inode == 0);
        if let Some(o) = self.reg.conns.get_mut(&old) {
            if o.moves.next == Some(id) {
                o.moves.next = None;
            }
        }
        if let Some((node, ch)) = answer {
            self.answer_forward(node, ch, false);
        }
    }

    /// Request::Forward: session `sid`, holding end `e` of the moved
    /// connection `old` on socket `fd`, takes the end offered to it, or
    /// (not `take`) lets it go.
    pub(super) fn take_forward(
        &mut self,
        sid: u64,
        old: u64,
        e: usize,
        take: bool,
        fd: &OwnedFd,
    ) -> Result<Reply, RequestError> {
        let inode = sys::socket_inode(fd.as_fd()).map_err(RequestError::NotSocket)?;
        let held = self.reg.conns.get(&old).filter(|c| {
            c.ends[e].session == sid && !c.ends[e].released && c.ends[e].inode == inode
        });
        let new = held
            .and_then(|c| c.moves.next)
            .filter(|n| {
                self.reg.conns.get(n).is_some_and(|c| {
                    !c.ends[e].released
                        && c.ends[e].inode == inode
                        // An acceptor's new end is offered only once its
                        // connector took its own (the peer answered).
                        && (e == 0 || c.remote.is_some_and(|(_, ch)| !self.remote.forward.pending.contains_key(&ch)))
                })
            })
            .ok_or(RequestError::NoConnection(inode));
        if !take {
            if held.is_some() {
                log::info!("connection {old}: end {e} stays on its kernel socket");
                // For good: no new connection is offered for it again.
                if let Some(c) = self.reg.conns.get_mut(&old) {
                    c.moves.tries = DECLINED;
                }
            }
            // Its engine side ends with Eos: a reader on the other host
            // that took its own new end learns that these writes never
            // moved.
            if let Ok(n) = new {
                self.drop_forward(n);
            }
            return Ok((Response::Ok, vec![]));
        }
        let new = new?;
        let reply = self.hand_out(new, e)?;
        let pid = self.session(sid).pid;
        if let Some(c) = self.reg.conns.get_mut(&new) {
            c.ends[e].session = sid;
            c.ends[e].pid = pid;
            c.moves.prev = None;
        }
        if let Some(c) = self.reg.conns.get_mut(&old) {
            // Done with: its end here is released next (its process
            // closes it), and no new connection is offered for it
            // meanwhile.
            c.moves.next = None;
            c.moves.tries = DECLINED;
        }
        self.reg.by_inode.insert(inode, (new, e));
        self.totals.forwards += 1;
        if e == 0 {
            // The acceptor's devd offers its own new end now.
            if let Some((node, ch)) = self.reg.conns.get(&new).and_then(|c| c.remote) {
                self.answer_forward(node, ch, true);
            }
        }
        log::info!("connection {old}: end {e} moves forward onto the link as connection {new}");
        Ok(reply)
    }
}

/// Whether remote connection `c` moved to its kernel sockets (the two
/// hosts agreed where).
fn moved(c: &Conn) -> bool {
    match &c.res {
        Res::Queued(q) => QueuedCounters::get(&q.counters.failover) == 1,
        Res::Direct(_) => false,
    }
}

/// Whether an end is held by a live session (not released, not orphaned).
fn live(e: &End) -> bool {
    !e.released && e.orphaned.is_none() && e.inode != 0
}
