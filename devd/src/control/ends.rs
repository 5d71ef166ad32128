//! The ends' lifetimes: Release (and parking a region both ends kept),
//! Leave, a session's end, orphaned ends watched through sock_diag, and
//! the `short_lived` policy's verdict when a connection's first end goes.
//!
//! Never here: freeing a region an end still maps, or judging a listener
//! by a connection that was never paired.

use super::*;

impl Devd {
    pub(super) fn holds(&self, sid: u64, id: u64) -> bool {
        self.reg
            .conns
            .get(&id)
            .is_some_and(|c| c.ends.iter().any(|e| e.session == sid && !e.released))
    }

    pub(super) fn release(
        &mut self,
        sid: u64,
        id: u64,
        e: usize,
        park: bool,
    ) -> Result<Reply, RequestError> {
        if e == 0 && !self.reg.conns.contains_key(&id) {
            // A connector letting go of an intent nobody claimed (its
            // connect failed, or the acceptor answered KERNEL).
            let gone = self
                .reg
                .retain_intents(|i| i.id != id || i.end.session != sid);
            if gone.is_empty() {
                return Err(RequestError::NotHeld(id));
            }
            for i in gone {
                self.judge_unclaimed(&i);
                self.bury(i);
            }
            return Ok((Response::Ok, vec![]));
        }
        let conn = self
            .reg
            .conns
            .get_mut(&id)
            .ok_or(RequestError::NotHeld(id))?;
        if conn.ends[e].session != sid || conn.ends[e].released {
            return Err(RequestError::NotHeld(id));
        }
        conn.park[e] = park;
        self.release_end(id, e);
        Ok((Response::Ok, vec![]))
    }

    pub(super) fn release_end(&mut self, id: u64, e: usize) {
        let Some(conn) = self.reg.conns.get_mut(&id) else {
            return;
        };
        if conn.ends[e].released {
            return;
        }
        if conn.moves.prev.is_some() {
            self.forward_end_released(id, e);
        }
        let Some(conn) = self.reg.conns.get_mut(&id) else {
            return;
        };
        conn.ends[e].released = true;
        let first = conn.ended.is_none();
        conn.ended.get_or_insert_with(Instant::now);
        let (uid, inode, bytes) = (conn.ends[e].uid, conn.ends[e].inode, conn.bytes);
        let both = conn.ends.iter().all(|x| x.released);
        if conn.mode == Mode::Queued {
            // How its kernel socket ended is how its stream ends, when
            // its client set no mark (it exited without a close).
            let (mine, peer) = (conn.ends[e].addr, conn.ends[1 - e].addr);
            let orderly = self.closed_in_order(mine, peer);
            self.engine.send(Cmd::SideGone {
                id,
                side: e,
                orderly,
            });
        }
        self.reg
            .charge(uid, -1, -isize::try_from(bytes).unwrap_or(isize::MAX));
        // (The socket may be another connection's already: the one that
        // took this one's place on the link.)
        if self.reg.by_inode.get(&inode) == Some(&(id, e)) {
            self.reg.by_inode.remove(&inode);
            // A new end its process took and could not use: the socket is
            // the moved connection's again.
            let remote = self.reg.conns.get(&id).is_some_and(|c| c.remote.is_some());
            let other = remote
                .then(|| {
                    self.reg.conns.values().find_map(|c| {
                        let x = c.ends.iter().position(|x| x.inode == inode && !x.released);
                        x.filter(|_| c.remote.is_some() && c.id != id)
                            .map(|x| (c.id, x))
                    })
                })
                .flatten();
            if let Some(o) = other {
                self.reg.by_inode.insert(inode, o);
            }
        }
        // A connection offered to take this one's place and not taken goes
        // with it.
        if let Some(next) = self
            .reg
            .conns
            .get_mut(&id)
            .and_then(|c| c.moves.next.take())
        {
            self.drop_forward(next);
        }
        if first {
            // Judged when its first end goes: the other may linger (a
            // forked child that exits without a close is found gone only
            // later), and a streak must not wait for it.
            if let Some((listener, lived, short)) = self
                .reg
                .conns
                .get(&id)
                .and_then(|c| verdict(&self.cfg.policy, c))
            {
                self.judge_listener(listener, lived, short);
            }
        }
        if both {
            let Some(c) = self.reg.conns.remove(&id) else {
                return;
            };
            self.remote_conn_gone(&c);
            if self.parkable(&c) {
                self.park(c);
                return;
            }
            // Freed (and its bytes counted) between requests, or at once
            // when requests never leave a moment for it.
            self.trash.push(c);
            if self.trash.len() > MAX_TRASH {
                let c = self.trash.remove(0);
                self.count_closed(&c);
            }
        }
    }

    /// The policy's look at an intent its connector let go of unclaimed:
    /// its setup bought nothing (the acceptor could not or would not
    /// claim it: a process without access to devd, a plain program on
    /// the listening socket), so it counts as short.
    pub(super) fn judge_unclaimed(&mut self, i: &Intent) {
        if self.cfg.policy.short_lived_ms != 0 {
            self.judge_listener(i.listener, i.at.elapsed(), true);
        }
    }

    /// Counts a judged connection that `lived` towards its listener's
    /// streak (`board::judge`), and republishes the board if that puts
    /// the listener's connections on kernel TCP.
    pub(super) fn judge_listener(
        &mut self,
        listener: Option<u64>,
        lived: std::time::Duration,
        short: bool,
    ) {
        let policy = &self.cfg.policy;
        let Some(inode) = listener else { return };
        let now = sys::monotonic_ns();
        let born = now.saturating_sub(u64::try_from(lived.as_nanos()).unwrap_or(u64::MAX));
        let Some(l) = self.reg.listeners.get_mut(&inode) else {
            return;
        };
        if board::judge(policy, &mut l.short, short, born, now) {
            log::info!(
                "listener {}: {} short or unclaimed connections in a row: its connections stay on kernel TCP for {} ms (short_lived)",
                l.addr,
                policy.short_lived_streak,
                l.short.plain_until.saturating_sub(now) / 1_000_000
            );
            self.hold_began(inode);
        }
    }

    /// The policy's look at a Claim through listener `inode` that found no
    /// Intent: its connector is a plain program, and the Claim a cost.
    pub(super) fn judge_plain_peer(&mut self, inode: u64) {
        let policy = &self.cfg.policy;
        let Some(l) = self.reg.listeners.get_mut(&inode) else {
            return;
        };
        let now = sys::monotonic_ns();
        if board::judge_plain_peer(policy, &mut l.short, now) {
            log::info!(
                "listener {}: {} connections in a row from programs not under ssock: its acceptors stop asking devd for {} ms, or until a connector under ssock asks (short_lived)",
                l.addr,
                board::PLAIN_PEER_STREAK,
                l.short.plain_until.saturating_sub(now) / 1_000_000
            );
            self.hold_began(inode);
        }
    }

    /// A hold of listener `inode` began: every listener on its address
    /// is held alike, the board republished, pending intents to it ended.
    fn hold_began(&mut self, inode: u64) {
        let Some(held) = self.reg.listeners.get(&inode).map(|l| l.short) else {
            return;
        };
        self.totals.short_lived_periods += 1;
        let same = self.reg.same_address(inode, |s| {
            // The kind of whichever hold ends last.
            if held.plain_until >= s.plain_until {
                s.plain_until = held.plain_until;
                s.peers_only = held.peers_only;
            }
        });
        self.listeners_changed();
        // Acceptors that read the board from now on do not claim:
        // pending intents to it end now (their connectors stay on the
        // kernel socket, as CLAIM = kernel tells them).
        let pending = self
            .reg
            .retain_intents(|i| !i.listener.is_some_and(|x| same.contains(&x)));
        for i in pending {
            self.totals.fallback(FallbackReason::ShortLived);
            self.discard_intent(i);
        }
    }

    /// An Intent to listener `inode`, held for connectors not under ssock,
    /// ends that hold: its connections are accelerated again (and the
    /// next hold is not doubled), the board republished before the
    /// Intent's answer.
    pub(super) fn end_peers_hold(&mut self, inode: u64) {
        // Ended now, not never set: only connections set up from now on
        // count towards the next streak (`board::judge`).
        let now = sys::monotonic_ns();
        self.reg.same_address(inode, |s| {
            s.plain_until = s.plain_until.min(now);
            s.peers_only = false;
            s.plain_peers = 0;
            s.doublings = 0;
        });
        self.listeners_changed();
        if let Some(l) = self.reg.listeners.get(&inode) {
            log::info!(
                "listener {}: a connector under ssock ended its hold for connectors not under ssock",
                l.addr
            );
        }
    }

    /// Whether a closed connection's region may be kept for the next
    /// connection between its two sessions ([`Parked`]): both ends asked
    /// for it, nobody else ever attached, neither end broke the protocol,
    /// both sessions still live, and it is Direct.
    pub(super) fn parkable(&self, c: &Conn) -> bool {
        let live = |e: &End| self.sessions.contains_key(&e.session);
        c.parkable
            && c.park == [true; 2]
            && !c.violated
            && c.ends.iter().all(live)
            && matches!(c.res, Res::Direct(_))
    }

    /// Keeps a closed connection's region (see [`Devd::parkable`]).
    pub(super) fn park(&mut self, c: Conn) {
        // Its bytes count now: reuse resets the ring words.
        self.count_closed(&c);
        if let Res::Direct(res) = c.res {
            self.reg.park(Parked {
                sessions: [c.ends[0].session, c.ends[1].session],
                uids: [c.ends[0].uid, c.ends[1].uid],
                bytes: c.bytes,
                res,
            });
        }
    }

    /// Forgets everything a session held (its process closed the socket or died).
    pub fn end_session(&mut self, sid: u64) {
        self.bells.forget(sid);
        self.rejoin_session_ended(sid);
        if let Some(s) = self.sessions.remove(&sid) {
            if let Some(n) = self.sessions_of.get_mut(&s.uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.sessions_of.remove(&s.uid);
                }
            }
        }
        self.reg.unpark_session(sid);
        let listened: Vec<u64> = self
            .reg
            .listeners
            .iter()
            .filter(|(_, l)| l.session == Some(sid))
            .map(|(&inode, _)| inode)
            .collect();
        for inode in listened {
            self.let_go_of_listener(inode);
        }
        // A process that ended has closed its listeners, those it still
        // had and those it unregistered (Unlisten comes before the close):
        // the registrations let go of since the last look are looked up at
        // once (one sock_diag dump, none if there are none), so that a
        // listener nobody holds leaves the board now, not at the next
        // expiry round, and a plain server given its port meanwhile costs
        // its connectors nothing. One still held (a daemon's child,
        // pre-fork workers, or its close not finished yet: the exiting
        // kernel may release the session's socket first) stays, and is
        // still looked up at the next Intent to it (not marked seen).
        let unseen: Vec<u64> = self
            .reg
            .listeners
            .iter()
            .filter(|(_, l)| l.session.is_none() && l.seen.is_none())
            .map(|(&inode, _)| inode)
            .collect();
        if !unseen.is_empty() {
            self.check_listeners(|l| l.seen.is_none());
            for inode in unseen {
                if let Some(l) = self.reg.listeners.get_mut(&inode) {
                    l.seen = None;
                }
            }
        }
        // Its own intents, and those reusing a region only it could claim.
        for i in self
            .reg
            .retain_intents(|i| i.end.session != sid && i.reuse_by != Some(sid))
        {
            self.bury(i);
        }
        let held: Vec<(u64, usize)> = self
            .reg
            .conns
            .values()
            .flat_map(|c| {
                (0..2)
                    .filter(|e| c.ends[*e].session == sid)
                    .map(move |e| (c.id, e))
            })
            .collect();
        let now = Instant::now();
        for (id, e) in held {
            // An end may live on in an exec'd image, a child or a process
            // the socket was passed to: it stays while its TCP socket is
            // held anywhere, attachable by it (a process that exits
            // without a close has its socket closed by the kernel, found
            // at once or soon after).
            match self.reg.conns.get(&id) {
                Some(c) if !c.ends[e].released => {
                    self.orphan(id, e, now);
                    self.look_at_orphan(id, e, now);
                }
                _ => self.release_end(id, e),
            }
        }
    }

    /// Leave: the process of session `sid` closed end `e` of connection
    /// `id` while others still hold its socket (see [`Request::Leave`]).
    pub(super) fn leave(&mut self, sid: u64, id: u64, e: usize) -> Result<Reply, RequestError> {
        let held = self
            .reg
            .conns
            .get(&id)
            .is_some_and(|c| c.ends[e].session == sid && !c.ends[e].released);
        if !held {
            return Err(RequestError::NotHeld(id));
        }
        self.orphan(id, e, Instant::now());
        Ok((Response::Ok, vec![]))
    }

    /// End `e` of connection `id` is held by no session any more (see
    /// [`registry::End::orphaned`]): its socket is looked up from now on.
    pub(super) fn orphan(&mut self, id: u64, e: usize, now: Instant) {
        if let Some(c) = self.reg.conns.get_mut(&id) {
            c.ends[e].orphaned.get_or_insert(now);
            self.reg.orphans.entry((id, e)).or_insert(registry::Look {
                next: now + ORPHAN_CHECK,
                every: ORPHAN_CHECK,
            });
        }
    }

    /// Looks up the orphaned ends that are due: released once no process
    /// holds their socket (or, when sock_diag cannot tell, after
    /// `ORPHAN_GRACE`); looked up again later otherwise.
    pub fn release_orphans(&mut self) {
        let now = Instant::now();
        let due: Vec<(u64, usize)> = self
            .reg
            .orphans
            .iter()
            .filter(|(_, l)| l.next <= now)
            .map(|(&k, _)| k)
            .collect();
        for (id, e) in due {
            self.look_at_orphan(id, e, now);
        }
    }

    /// Looks up orphaned end `e` of connection `id` now (see
    /// [`Devd::release_orphans`]).
    pub(super) fn look_at_orphan(&mut self, id: u64, e: usize, now: Instant) {
        let Some(since) = self.reg.conns.get(&id).and_then(|c| c.ends[e].orphaned) else {
            self.reg.orphans.remove(&(id, e));
            return;
        };
        let seen = self.orphan_seen(id, e);
        let Some(look) = self.reg.orphans.get_mut(&(id, e)) else {
            return;
        };
        match seen {
            Seen::Gone => self.release_orphan(id, e),
            Seen::Held => {
                // The next look after this one's interval, then twice as
                // long (an end orphaned as its process exits is looked at
                // at once, then 50 ms later).
                look.next = now + look.every;
                look.every = (look.every * 2).min(ORPHAN_CHECK_MAX);
                if let Some(c) = self.reg.conns.get_mut(&id) {
                    c.ends[e].orphaned = Some(now);
                }
            }
            Seen::Unsure if now.duration_since(since) >= ORPHAN_GRACE => {
                self.release_orphan(id, e);
            }
            Seen::Unsure => {
                look.every = if self.diag.is_some() {
                    ORPHAN_CHECK
                } else {
                    ORPHAN_GRACE
                };
                look.next = (now + look.every).min(since + ORPHAN_GRACE);
            }
        }
    }

    /// Whether the TCP socket from `mine` to `peer` was closed in order:
    /// sock_diag finds it in a state after its FIN (FIN_WAIT1, FIN_WAIT2,
    /// CLOSING, TIME_WAIT, LAST_ACK) with no file holding it (a holder's
    /// shutdown is not a close). Not found (reset, or gone without a
    /// TIME_WAIT), still held or open, or without sock_diag: false.
    fn closed_in_order(&mut self, mine: std::net::SocketAddr, peer: std::net::SocketAddr) -> bool {
        let Some(diag) = &self.diag else {
            return false;
        };
        self.diag_seq = self.diag_seq.wrapping_add(1);
        matches!(
            crate::sys::tcp_lookup(diag.as_fd(), mine, peer, self.diag_seq),
            Ok(Some(s)) if crate::sys::TCP_FIN_SENT.contains(&s.state) && s.inode == 0
        )
    }

    /// Releases orphaned end `e` of connection `id`.
    pub(super) fn release_orphan(&mut self, id: u64, e: usize) {
        self.reg.orphans.remove(&(id, e));
        if let Some(c) = self.reg.conns.get_mut(&id) {
            c.ends[e].orphaned = None;
        }
        self.release_end(id, e);
    }

    /// Looks up the TCP sockets of connection `id`'s ends on this host
    /// once, soon after it was made (a chore): each found by its inode
    /// is `seen`, so that its end is released at once when it is not
    /// found later.
    pub(super) fn sight(&mut self, id: u64) {
        let Some(diag) = &self.diag else {
            return;
        };
        let Some(c) = self.reg.conns.get(&id) else {
            return;
        };
        let mut found = [false; 2];
        for (e, f) in found.iter_mut().enumerate() {
            if c.ends[e].session == 0 || c.ends[e].seen {
                continue; // an end on another host, or seen already
            }
            let (mine, peer) = (c.ends[e].addr, c.ends[1 - e].addr);
            self.diag_seq = self.diag_seq.wrapping_add(1);
            let r = crate::sys::tcp_lookup(diag.as_fd(), mine, peer, self.diag_seq);
            *f = matches!(r, Ok(Some(s)) if s.state != crate::sys::TCP_LISTEN
                && u64::from(s.inode) == c.ends[e].inode);
        }
        if let Some(c) = self.reg.conns.get_mut(&id) {
            for (e, f) in found.iter().enumerate() {
                c.ends[e].seen |= *f;
            }
        }
    }

    /// Whether some process holds the TCP socket of orphaned end `e` of
    /// connection `id` (an exec'd image that inherited it, a child, a
    /// process it was passed to; a message carrying it still queued on a
    /// unix socket would too). sock_diag tells: the connection's socket on
    /// this end's side has our inode (held), another one (0 once closed
    /// everywhere while the kernel finishes the connection, or a new
    /// socket on the same addresses: gone). Not found, it is gone when
    /// the look-up found it before ([`registry::End::seen`]: a closed
    /// socket leaves no TIME_WAIT of its own when the kernel's table of
    /// them is full, or after a reset), or when the peer's socket is in
    /// TIME_WAIT (both FINs: a passive closer's socket is gone by then).
    /// Otherwise, or without sock_diag: unsure. (A peer that has only our
    /// FIN proves nothing: a socket the look-up cannot find, bound to a
    /// device or in another network namespace, may have sent it with
    /// shutdown and still be held.)
    pub(super) fn orphan_seen(&mut self, id: u64, e: usize) -> Seen {
        let Some(c) = self.reg.conns.get(&id) else {
            return Seen::Unsure;
        };
        let (mine, inode, peer) = (c.ends[e].addr, c.ends[e].inode, c.ends[1 - e].addr);
        let Some(diag) = &self.diag else {
            return Seen::Unsure;
        };
        let mut look = |local, remote| {
            self.diag_seq = self.diag_seq.wrapping_add(1);
            crate::sys::tcp_lookup(diag.as_fd(), local, remote, self.diag_seq)
        };
        // A listener on the same local address is what the kernel's
        // look-up finds once the connection's own socket is gone.
        let found = |r: io::Result<Option<crate::sys::TcpSeen>>| match r {
            Ok(Some(s)) if s.state != crate::sys::TCP_LISTEN => Ok(Some(s)),
            Ok(_) => Ok(None),
            Err(err) => Err(err),
        };
        // The peer's socket too, while this end's is not found or the
        // peer's was never seen: each one found by its inode proves the
        // look-up works for it.
        let here = found(look(mine, peer));
        let there = match (&here, c.ends[1 - e].seen) {
            (Ok(Some(_)), true) => None,
            _ => Some(found(look(peer, mine))),
        };
        let seen = match &here {
            Ok(Some(s)) if u64::from(s.inode) == inode => Seen::Held,
            Ok(Some(_)) => Seen::Gone,
            // Not found is no proof alone (a socket bound to a device or a
            // VRF is never found by this look-up).
            // Found before and not now: closed (with no TIME_WAIT left:
            // the kernel's table of them full, or a reset), unless the
            // peer's socket is still established (this one may have been
            // bound to a device since, which the look-up skips).
            Ok(None) if c.ends[e].seen => match &there {
                Some(Ok(Some(s))) if s.state == crate::sys::TCP_ESTABLISHED => Seen::Unsure,
                Some(Err(_)) => Seen::Unsure,
                _ => Seen::Gone,
            },
            Ok(None) => match &there {
                Some(Ok(Some(s))) if s.state == crate::sys::TCP_TIME_WAIT => Seen::Gone,
                _ => Seen::Unsure,
            },
            Err(err) => {
                log::debug!("connection {id}: sock_diag: {err}");
                Seen::Unsure
            }
        };
        if let Some(c) = self.reg.conns.get_mut(&id) {
            for (end, r) in [(e, Some(&here)), (1 - e, there.as_ref())] {
                if let Some(Ok(Some(s))) = r {
                    c.ends[end].seen |= u64::from(s.inode) == c.ends[end].inode;
                }
            }
        }
        seen
    }
}

/// The `short_lived` policy's look at connection `c` when its first end
/// closed: its listener, how long it lived from its Intent to then, and
/// whether that was short (None: the policy is off, or no listener).
pub(super) fn verdict(
    policy: &crate::config::Policy,
    c: &Conn,
) -> Option<(Option<u64>, std::time::Duration, bool)> {
    if policy.short_lived_ms == 0 || c.listener.is_none() {
        return None;
    }
    let lived = c
        .ended
        .map_or_else(|| c.born.elapsed(), |t| t.duration_since(c.born));
    let short = lived < std::time::Duration::from_millis(policy.short_lived_ms) && {
        let j = conn_json(c);
        board::was_short(policy, lived, j.bytes_c2a.saturating_add(j.bytes_a2c))
    };
    Some((c.listener, lived, short))
}
