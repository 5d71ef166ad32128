//! Pairing: the connector's Intent (the connection created, from the pool
//! or a parked region), the acceptor's Claim (matched to its intent by the
//! two sockets' addresses), Attach by socket, the ends' attachments and
//! the refusals that leave both ends on kernel TCP.
//!
//! Never here: pairing two sockets devd has not seen connected to each
//! other, or an end handed to a process that did not prove its socket.

use super::*;

impl Devd {
    pub(super) fn intent(
        &mut self,
        sid: u64,
        fd: OwnedFd,
        dst: std::net::SocketAddr,
        pref: ModePref,
        bell: u32,
    ) -> Result<Reply, RequestError> {
        // No getsockname: it would wait for the socket's lock while the
        // connector's connect() holds it.
        let unbound = std::net::SocketAddr::new(
            match dst {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            },
            0,
        );
        let domain = sys::sockopt_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_DOMAIN)
            .map_err(RequestError::NotSocket)?;
        if domain != libc::AF_INET && domain != libc::AF_INET6 {
            return Err(RequestError::NotSocket(io::Error::other(
                "not an IP socket",
            )));
        }
        let end = self.end_at(sid, &fd, unbound)?;
        let inode = end.inode;
        let mode = match pref {
            ModePref::Kernel => return self.kernel(FallbackReason::Requested, &fd, inode),
            ModePref::Direct => Mode::Direct,
            ModePref::Queued => Mode::Queued,
            ModePref::Auto => self.cfg.default_mode.mode(),
        };
        if mode == Mode::Kernel {
            return self.kernel(FallbackReason::Requested, &fd, inode);
        }
        // A sessionless registration not looked at lately may be of a
        // socket closed everywhere since.
        let now = Instant::now();
        let old = |l: &registry::Listener| l.seen.is_none_or(|t| now - t >= LISTENER_CHECK);
        if self
            .reg
            .listeners_for(dst)
            .any(|l| l.session.is_none() && old(l))
        {
            self.check_listeners(|l| old(l) && l.addr.port() == dst.port());
        }
        // A listener a peer host advertised at its own address (the
        // connection is Queued then: the engine carries it over the link),
        // or one here (a wildcard one here matches every address).
        let remote = self.remote_for(dst);
        let local = match remote {
            Some(_) => None,
            None => match self.reg.listener_inode_for(dst) {
                Some(l) => Some(l),
                None => return self.kernel(FallbackReason::PeerNotEnabled, &fd, inode),
            },
        };
        let mode = if remote.is_some() { Mode::Queued } else { mode };
        let listener = local.and_then(|l| self.reg.listeners[&l].session);
        // Its acceptor will not claim while the short_lived policy keeps
        // the listener's connections on kernel TCP (a connector whose
        // board could not tell asks anyway). A hold for connectors not
        // under ssock ends once this Intent is accepted (below).
        let held = match local {
            Some(linode) => {
                let short = self.reg.listeners[&linode].short;
                let held = short.plain_until > sys::monotonic_ns();
                if held && !short.peers_only {
                    return self.kernel(FallbackReason::ShortLived, &fd, inode);
                }
                held.then_some(linode)
            }
            None => None,
        };
        // Several listeners (SO_REUSEPORT): which one accepts is the
        // kernel's choice, so no region kept with one of them is reused.
        let sole = local.is_some() && self.reg.listeners_for(dst).nth(1).is_none();
        self.make_room(end.uid);
        if let Some(reason) = self.refusal(sid, dst.port()) {
            return self.kernel(reason, &fd, inode);
        }
        if !self.reg.may_add_intent(end.uid) {
            return self.kernel(FallbackReason::Limit, &fd, inode);
        }
        let c = match self.create(sid, mode, listener, sole, remote) {
            Ok(c) => c,
            Err(e) => {
                // The connector reports devd_error and connects plainly.
                self.watch_kernel(&fd, inode);
                return Err(e);
            }
        };
        if let Some(w) = &mut self.watch {
            w.forget(inode);
        }
        if let Some(linode) = held {
            // Its connector waits for this answer before it connects, so
            // its acceptor reads the board without the hold, and claims.
            self.end_peers_hold(linode);
        }
        self.reg
            .charge(end.uid, 1, isize::try_from(c.bytes).unwrap_or(isize::MAX));
        let key = (canon(dst.ip()), dst.port());
        let token = c.token;
        let intent = Intent {
            key,
            token,
            mode,
            end,
            at: Instant::now(),
            sock: fd,
            id: c.id,
            res: c.res,
            bytes: c.bytes,
            port: std::cell::Cell::new(0),
            reuse_by: c.reuse_by,
            listener: local,
            remote,
            bell,
        };
        for old in self.reg.add_intent(key, intent) {
            self.discard_intent(old);
        }
        Ok((
            Response::Proceed {
                token,
                attachment: c.attachment,
            },
            c.fds,
        ))
    }

    /// An Intent's connection: its token, resources and the connector's
    /// end. It is created now (or was, in the pool), so that neither the
    /// acceptor's Claim nor the connector once claimed needs another
    /// request. `remote`: the acceptor is on that peer host (Queued).
    pub(super) fn create(
        &mut self,
        sid: u64,
        mode: Mode,
        listener: Option<u64>,
        sole: bool,
        remote: Option<u32>,
    ) -> Result<Created, RequestError> {
        let token = self.token()?;
        let reused = match (mode, listener) {
            (Mode::Direct, Some(l)) if sole => self.reuse(sid, l),
            _ => None,
        };
        let reuse_by = if reused.is_some() { listener } else { None };
        let (id, mut res) = match (mode, reused) {
            (_, Some(p)) => p,
            (Mode::Queued, _) => {
                let id = self.new_id();
                match remote {
                    Some(_) => (id, self.remote_res(id, 0, None)?),
                    None => (id, self.queued_res(id)?),
                }
            }
            _ => match self.pool.pop() {
                Some(p) => p,
                None => {
                    let id = self.new_id();
                    (id, self.direct_res(id)?)
                }
            },
        };
        let bytes = match &res {
            Res::Direct(_) => self.cfg.region_size / 2,
            Res::Queued(_) => self.cfg.region_size,
        };
        let (attachment, fds) = match attachment(&mut res, id, 0, reuse_by.is_some(), None, None) {
            Ok(a) => a,
            Err(e) => {
                self.free_res(id, &res);
                return Err(e);
            }
        };
        Ok(Created {
            token,
            id,
            res,
            bytes,
            attachment,
            fds,
            reuse_by,
        })
    }

    /// A region parked by session `sid` (connector) and `acceptor` for the
    /// next connection between them, as a new connection: its header reset
    /// (ring words, holders and marks zero, the new id), with pwrite: no
    /// process uses it while it is parked.
    pub(super) fn reuse(&mut self, sid: u64, acceptor: u64) -> Option<(u64, Res)> {
        let d = self.reg.unpark(sid, acceptor)?;
        let id = self.new_id();
        let mut page = [0u8; layout::HEADER_SIZE];
        let h = layout::header_bytes(
            RegionKind::Direct,
            d.layout.size,
            id,
            d.layout.cap as u64,
            0,
        );
        page[..h.len()].copy_from_slice(&h);
        // Only `acceptor` may claim it: its doorbell goes in with the
        // header, so that its Claim writes nothing.
        if let Some(bell) = self.bells.common_id(acceptor) {
            let at = layout::hov::ACCEPTOR_BELL;
            page[at..at + 4].copy_from_slice(&bell.to_le_bytes());
        }
        if let Err(e) = sys::pwrite_all(d.memfd.as_fd(), &page, 0) {
            log::warn!("region {}: header reset failed ({e}); not reused", d.region);
            return None;
        }
        Some((id, Res::Direct(d)))
    }

    pub(super) fn new_id(&mut self) -> u64 {
        let id = self.reg.next_id;
        self.reg.next_id += 1;
        id
    }

    /// Why session `sid`'s user may not have one more accelerated end on
    /// `port`, if it may not (policy, then the user's caps).
    pub(super) fn refusal(&self, sid: u64, port: u16) -> Option<FallbackReason> {
        let s = self.session(sid);
        if !self.cfg.policy.allows(s.uid, s.gid, port) {
            return Some(FallbackReason::Policy);
        }
        let (ends, bytes) = self.reg.usage.get(&s.uid).copied().unwrap_or((0, 0));
        (ends + 1 > self.cfg.policy.max_connections_per_user
            || bytes + self.cfg.region_size > self.cfg.policy.max_memory_per_user)
            .then_some(FallbackReason::Limit)
    }

    /// Frees user `uid`'s parked regions, oldest first, while they keep it
    /// from one more connection's region (the live one matters more).
    pub(super) fn make_room(&mut self, uid: u32) {
        let max = self.cfg.policy.max_memory_per_user;
        while self
            .reg
            .usage
            .get(&uid)
            .is_some_and(|u| u.1 + self.cfg.region_size > max)
            && self.reg.evict_one_of(uid)
        {}
    }

    /// Another session's intent on socket `inode` (its connector handed
    /// the socket to another process before an acceptor claimed it): what
    /// the connection will be cannot be told to the new holder, which
    /// takes it for a plain socket. So it stays on kernel TCP: the
    /// connector is told (CLAIM = kernel), a later Claim is answered
    /// ExpectKernel `connector_gone`. Else the new holder's bytes would
    /// go on TCP while the acceptor's went into the region.
    fn handed_before_claim(&mut self, inode: u64) {
        for i in self.reg.retain_intents(|i| i.end.inode != inode) {
            log::info!(
                "connection {}: its connector's socket went to another process before a Claim; kernel TCP",
                i.id
            );
            if let Err(e) = refuse(&i.res) {
                log::debug!("connection {}: CLAIM word: {e}", i.id);
            }
            self.bury(i);
        }
    }

    /// Frees an intent nobody will claim: refunds its connector's charge
    /// and drops its resources (their fds close with it).
    pub(super) fn discard_intent(&mut self, i: Intent) {
        // Its connector writes on the kernel socket until told: it stays
        // there and lets its end go.
        if let Err(e) = refuse(&i.res) {
            log::debug!("connection {}: CLAIM word: {e}", i.id);
        }
        self.unclaim(&i);
    }

    /// Refunds an unclaimed intent's charge and frees its engine state
    /// (its fds close when it is dropped; `bury` keeps its socket).
    pub(super) fn unclaim(&mut self, i: &Intent) {
        self.reg.charge(
            i.end.uid,
            -1,
            -isize::try_from(i.bytes).unwrap_or(isize::MAX),
        );
        self.free_res(i.id, &i.res);
    }

    /// Frees an intent whose connector let go of it before any Claim, and
    /// remembers it (see [`registry::Gone`]): a later Claim of it is
    /// answered ExpectKernel `connector_gone`.
    pub(super) fn bury(&mut self, i: Intent) {
        self.unclaim(&i);
        let Intent {
            key,
            token,
            sock,
            at,
            ..
        } = i;
        // Its address is bound once its connect started (the port the
        // Claim's peer address shows); a socket never connected has none,
        // and no Claim to match.
        let local = sys::local_addr(sock.as_fd())
            .ok()
            .filter(|l| l.port() != 0)
            .map(canon_addr);
        drop(sock);
        if let Some(local) = local {
            self.reg.bury(key, token, local, at);
        }
    }

    /// Tells the engine to forget a Queued connection's resources.
    pub(super) fn free_res(&self, id: u64, res: &Res) {
        if let Res::Queued(_) = res {
            for side in 0..2 {
                self.engine.send(Cmd::SideGone {
                    id,
                    side,
                    orderly: false,
                });
            }
        }
    }

    /// Answers a Claim with ExpectKernel: the acceptor has the connection,
    /// which stays on kernel TCP (counted here, once).
    pub(super) fn expect_kernel(&mut self, token: u64, reason: FallbackReason) -> Reply {
        self.totals.fallback(reason);
        self.totals.kernel_connection();
        (Response::ExpectKernel { token, reason }, vec![])
    }

    pub(super) fn claim(&mut self, sid: u64, fd: &OwnedFd) -> Result<Reply, RequestError> {
        let end = self.end(sid, fd)?;
        let peer = match sys::peer_addr(fd.as_fd()) {
            Ok(p) => p,
            // Over before its Claim (reset, or closed both ways: an
            // accepted socket with no peer any more). A connector under
            // ssock gave its intent up before that (its socket's RST or
            // FIN went when devd let go of it): one buried for this
            // address is this one's, or one like it, and is counted.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                let here = canon_addr(end.addr);
                return Ok(match self.take_gone_where(|g| g.key == here) {
                    Some(g) => self.expect_kernel(g.token, FallbackReason::ConnectorGone),
                    None => (Response::Ok, vec![]),
                });
            }
            Err(e) => return Err(RequestError::NotSocket(e)),
        };
        let here = canon_addr(end.addr);
        let from = canon_addr(peer);
        // The intent's own socket must be this accepted socket's peer (see
        // `peer_of`): a stale intent (its connect failed, or went
        // elsewhere) never connected here.
        let mut local = None;
        let intent = self.reg.take_intent(here, |i| {
            // A port seen before says no without a syscall (a connected
            // socket keeps its port).
            let known = i.port.get();
            if known != 0 && known != from.1 {
                return false;
            }
            let Ok(l) = sys::local_addr(i.sock.as_fd()) else {
                return false;
            };
            i.port.set(l.port());
            local = peer_of(&i.sock, l, here, from).then_some(l);
            local.is_some()
        });
        let Some(mut intent) = intent else {
            // An intent given up before this Claim: the acceptor stays on
            // kernel TCP (counted).
            if let Some(g) = self.take_gone_where(|g| g.key == here && g.local == from) {
                return Ok(self.expect_kernel(g.token, FallbackReason::ConnectorGone));
            }
            // No intent here: from a peer host, its devd may hold one.
            if let Some(node) = self.peer_at(peer.ip()) {
                return self.remote_claim(sid, end, peer, node);
            }
            // No intent: a plain peer; the acceptor goes on without delay
            // (and a streak of them stops its Claims for a while).
            if let Some(l) = self.reg.listener_inode_for(end.addr) {
                self.judge_plain_peer(l);
            }
            return Ok((Response::Ok, vec![]));
        };
        if let Some(l) = intent.listener {
            self.reg.same_address(l, |s| s.plain_peers = 0);
        }
        let token = intent.token;
        // A reused region is mapped in the process it was parked by; no
        // other acceptor may have it.
        let reuse = intent.reuse_by.is_some();
        let refused = match intent.reuse_by {
            Some(s) if s != sid => Some(FallbackReason::OtherAcceptor),
            _ => {
                self.make_room(end.uid);
                self.refusal(sid, end.addr.port())
            }
        };
        // The acceptor's user is held to the same policy and caps. Refused,
        // the connector is told (CLAIM = kernel) and both stay on TCP.
        if let Some(reason) = refused {
            self.discard_intent(intent);
            return Ok(self.expect_kernel(token, reason));
        }
        // The acceptor says accepted in the hand-over words itself, once
        // it holds its end (docs/protocol.md section 2.3).
        // A reused region carries no fds: the acceptor rings the doorbell
        // it already knows by its id, and no ringers' end is made for it.
        let peer_bell = if reuse {
            self.bells
                .common_id(intent.end.session)
                .map(|id| (id, None))
        } else {
            self.bells
                .of(intent.end.session)
                .map(|(id, fd)| (id, Some(fd)))
        };
        // The connecting thread's own doorbell too: rung for that thread,
        // the common one still for the others (and where the acceptor
        // cannot ask for a doorbell: a forked server's child).
        let thread_bell = match peer_bell {
            Some((common, Some(_))) if intent.bell != common => {
                self.bells.ringer(intent.bell, intent.end.session)
            }
            _ => None,
        };
        let own = self.bells.common_id(sid);
        if let (Res::Direct(d), Some(own), false) = (&intent.res, own, reuse) {
            // The connector learns the acceptor's doorbell when it moves
            // (docs/protocol.md section 3.2); without it, it asks later. A
            // reused region has it from the Intent (`reuse`: only this
            // session may claim it).
            let at = layout::hov::ACCEPTOR_BELL as u64;
            if let Err(e) = sys::pwrite_all(d.memfd.as_fd(), &own.to_le_bytes(), at) {
                log::warn!(
                    "connection {}: acceptor's doorbell not written: {e}",
                    intent.id
                );
            }
        }
        let given = attachment(&mut intent.res, intent.id, 1, reuse, peer_bell, thread_bell);
        let (attachment, fds) = match given {
            Ok(a) => a,
            Err(e) => {
                log::warn!("connection {}: acceptor's end: {e}", intent.id);
                self.discard_intent(intent);
                return Ok(self.expect_kernel(token, FallbackReason::DevdError));
            }
        };
        if let Some(l) = local {
            intent.end.addr = l;
        }
        let (id, mode, bytes) = (intent.id, intent.mode, intent.bytes);
        self.reg
            .charge(end.uid, 1, isize::try_from(bytes).unwrap_or(isize::MAX));
        self.reg.by_inode.insert(intent.end.inode, (id, 0));
        self.reg.by_inode.insert(end.inode, (id, 1));
        self.totals.created(mode);
        self.totals.reused += u64::from(reuse);
        // Its sockets looked up once, when devd is idle (`sight`); the
        // oldest forgotten beyond `MAX_UNSEEN` (their ends only wait
        // longer for their release).
        if self.diag.is_some() {
            if self.reg.unseen.len() >= registry::MAX_UNSEEN {
                self.reg.unseen.pop_front();
            }
            self.reg.unseen.push_back(id);
        }
        // Dropping the intent's duplicate of the connector's socket: the
        // connection exists; holding it longer would only delay its close.
        self.reg.conns.insert(
            id,
            Conn {
                id,
                mode,
                ends: [intent.end, end],
                res: intent.res,
                bytes,
                violated: false,
                parkable: true,
                park: [false; 2],
                listener: intent.listener,
                born: intent.at,
                ended: None,
                remote: None,
                moves: Moves::default(),
            },
        );
        Ok((Response::Expect { token, attachment }, fds))
    }

    pub(super) fn direct_res(&mut self, id: u64) -> Result<Res, RequestError> {
        let layout = DirectLayout::for_size(self.cfg.region_size)
            .map_err(|e| RequestError::Resources(io::Error::other(e)))?;
        let memfd = sys::memfd_sealed("direct", layout.size).map_err(RequestError::Resources)?;
        let header =
            layout::header_bytes(RegionKind::Direct, layout.size, id, layout.cap as u64, 0);
        sys::pwrite_all(memfd.as_fd(), &header, 0).map_err(RequestError::Resources)?;
        Ok(Res::Direct(DirectRes {
            memfd: Arc::new(memfd),
            layout,
            // Unpredictable and unique across devd restarts: a client may
            // still keep a region of an earlier devd.
            region: self.token()?,
        }))
    }

    /// A Queued connection between two local ends, served by the engine
    /// from now on.
    pub(super) fn queued_res(&mut self, id: u64) -> Result<Res, RequestError> {
        let (res, [Some(a), Some(b)]) = self.queued_parts(id, [true; 2])? else {
            unreachable!("queued_parts makes the sides asked for")
        };
        let Res::Queued(q) = &res else {
            unreachable!("queued_parts makes Queued resources")
        };
        self.engine.send(Cmd::Add {
            id,
            sides: SideSpec::local_pair(id, a, b),
            counters: q.counters.clone(),
        });
        Ok(res)
    }

    /// A Queued connection's resources (the regions and doorbells of the
    /// ends `here` says are on this host, and the hand-over page) and
    /// those ends' engine sides, not yet given to the engine. An end on
    /// another host has nothing here.
    pub(super) fn queued_parts(
        &mut self,
        id: u64,
        here: [bool; 2],
    ) -> Result<(Res, [Option<SideInit>; 2]), RequestError> {
        let layout = QueuedLayout::for_size(self.cfg.region_size)
            .map_err(|e| RequestError::Resources(io::Error::other(e)))?;
        let mut memfd = [None, None];
        let mut kick = [None, None];
        let mut call = [None, None];
        let mut inits = [None, None];
        for e in (0..2).filter(|&e| here[e]) {
            let m = sys::memfd_sealed("queued", layout.size).map_err(RequestError::Resources)?;
            let header = layout.header(id);
            sys::pwrite_all(m.as_fd(), &header, 0).map_err(RequestError::Resources)?;
            let region = DeviceRegion::new(dup(&m)?, layout).map_err(RequestError::Device)?;
            let k = EventFd::new().map_err(RequestError::Resources)?;
            let c = EventFd::new().map_err(RequestError::Resources)?;
            kick[e] = Some(Arc::new(dup(&k)?));
            call[e] = Some(Arc::new(dup(&c)?));
            memfd[e] = Some(Arc::new(m));
            inits[e] = Some(SideInit {
                region,
                kick: k,
                call: c,
            });
        }
        // The hand-over words both ends map (the regions are each end's own).
        let hov =
            sys::memfd_sealed("handover", layout::HOV_PAGE).map_err(RequestError::Resources)?;
        let header = layout::header_bytes(RegionKind::Handover, layout::HOV_PAGE, id, 0, 0);
        sys::pwrite_all(hov.as_fd(), &header, 0).map_err(RequestError::Resources)?;
        let counters = Arc::new(QueuedCounters::default());
        let res = Res::Queued(QueuedRes {
            hov: Arc::new(hov),
            memfd,
            kick,
            call,
            layout,
            counters,
            held: None,
        });
        Ok((res, inits))
    }

    /// The Attached reply for end `e` of connection `id`.
    pub(super) fn hand_out(&mut self, id: u64, e: usize) -> Result<Reply, RequestError> {
        let conn = self
            .reg
            .conns
            .get_mut(&id)
            .ok_or(RequestError::NoConnection(0))?;
        let peer_bell = self.bells.of(conn.ends[1 - e].session);
        let peer_bell = peer_bell.map(|(id, fd)| (id, Some(fd)));
        let (a, fds) = attachment(&mut conn.res, id, e, false, peer_bell, None)?;
        // Mapped by one more process: never parked.
        conn.parkable = false;
        Ok((Response::Attached(a), fds))
    }

    pub(super) fn attach(&mut self, sid: u64, fd: &OwnedFd) -> Result<Reply, RequestError> {
        let inode = sys::socket_inode(fd.as_fd()).map_err(RequestError::NotSocket)?;
        let Some(&(id, e)) = self.reg.by_inode.get(&inode) else {
            // Not paired yet: the connector's own intent, asked for again
            // by the session that made it (its Proceed named a reused
            // region this process no longer keeps). The same end, with fds.
            let own = self
                .reg
                .intents
                .values_mut()
                .flatten()
                .find(|i| i.end.inode == inode && i.end.session == sid);
            if let Some(intent) = own {
                let (a, fds) = attachment(&mut intent.res, intent.id, 0, false, None, None)?;
                return Ok((Response::Attached(a), fds));
            }
            self.handed_before_claim(inode);
            return Err(RequestError::NoConnection(inode));
        };
        let reply = self.hand_out(id, e)?;
        let (pid, local) = (self.session(sid).pid, sys::local_addr(fd.as_fd()).ok());
        if let Some(conn) = self.reg.conns.get_mut(&id) {
            let end = &mut conn.ends[e];
            end.session = sid;
            end.pid = pid;
            end.orphaned = None;
            self.reg.orphans.remove(&(id, e));
            if let Some(a) = local {
                end.addr = a;
            }
        }
        Ok(reply)
    }
}

impl Devd {
    /// The oldest buried intent (see [`registry::Gone`]) that `which`
    /// picks, taken out.
    pub(super) fn take_gone_where(
        &mut self,
        which: impl Fn(&registry::Gone) -> bool,
    ) -> Option<registry::Gone> {
        let i = self.reg.gone.iter().position(which)?;
        self.reg.gone.remove(i)
    }
}

/// An address as both ends of a local TCP connection see it (see `canon`).
pub(super) fn canon_addr(a: std::net::SocketAddr) -> (std::net::IpAddr, u16) {
    (canon(a.ip()), a.port())
}

/// Whether `sock` (a connector's socket devd holds, whose local address is
/// `local`) is connected to the accepted socket whose local address is
/// `here` and peer `from`: `local` is `from` and its peer is `here`.
pub(super) fn peer_of(
    sock: &OwnedFd,
    local: std::net::SocketAddr,
    here: (std::net::IpAddr, u16),
    from: (std::net::IpAddr, u16),
) -> bool {
    canon_addr(local) == from && sys::peer_addr(sock.as_fd()).ok().map(canon_addr) == Some(here)
}

/// Writes CLAIM = kernel into an intent's hand-over words with pwrite (the
/// Direct region's header, or the Queued hand-over page): nobody claimed
/// it, or the acceptor was refused; its connector lets its end go.
pub(super) fn refuse(res: &Res) -> io::Result<()> {
    let words = match res {
        Res::Direct(d) => d.memfd.as_fd(),
        Res::Queued(q) => q.hov.as_fd(),
    };
    let (off, b) = layout::claim_kernel_bytes();
    sys::pwrite_all(words, &b, off)
}

/// End `e`'s attachment of connection `id` and the fds that go with it.
/// With `reuse` (Direct), no fds: the process kept the region parked.
/// `peer_bell`: the doorbell of the other end's session, if known (Direct),
/// with a ringers' end to send unless the attachment reuses a region;
/// `thread_bell`: the connecting thread's own, with its ringers' end
/// (Expect; only beside `peer_bell`'s end).
pub(super) fn attachment(
    res: &mut Res,
    id: u64,
    e: usize,
    reuse: bool,
    peer_bell: Option<(u32, Option<Fd>)>,
    thread_bell: Option<(u32, Fd)>,
) -> Result<(Attachment, Vec<Fd>), RequestError> {
    let side = if e == 0 {
        Side::Connector
    } else {
        Side::Acceptor
    };
    match res {
        Res::Direct(d) => {
            let common_fd = peer_bell.as_ref().and_then(|(_, fd)| fd.clone());
            debug_assert!(thread_bell.is_none() || (!reuse && common_fd.is_some()));
            let fds = if reuse {
                vec![]
            } else {
                std::iter::once(d.memfd.clone())
                    .chain(common_fd)
                    .chain(thread_bell.as_ref().map(|(_, fd)| fd.clone()))
                    .collect()
            };
            let a = Attachment {
                conn_id: id,
                mode: Mode::Direct,
                side,
                region_size: d.layout.size as u64,
                geom_a: d.layout.cap as u64,
                geom_b: 0,
                region: d.region,
                reuse,
                peer_bell: peer_bell.map_or(0, |(id, _)| id),
                peer_thread_bell: thread_bell.map_or(0, |(id, _)| id),
            };
            Ok((a, fds))
        }
        Res::Queued(q) => {
            // (An end on another host has no region here: never handed out.)
            // Every process that attaches the end (an inherited or passed
            // socket) drives the same queues: their state is in the region.
            let (Some(memfd), Some(kick), Some(call)) =
                (q.memfd[e].clone(), q.kick[e].clone(), q.call[e].clone())
            else {
                return Err(RequestError::NotHere(id, e));
            };
            let fds = vec![memfd, kick, call, q.hov.clone()];
            let a = Attachment {
                conn_id: id,
                mode: Mode::Queued,
                side,
                region_size: q.layout.size as u64,
                geom_a: u64::from(q.layout.qsize),
                geom_b: q.layout.slot as u64,
                region: id,
                reuse: false,
                peer_bell: 0,
                peer_thread_bell: 0,
            };
            Ok((a, fds))
        }
    }
}
