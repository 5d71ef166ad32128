//! Who listens where, who intends to connect where, and the live
//! connections with their resources. Owned by the control thread only.

use crate::stats::QueuedCounters;
use ssock_rings::codec::Mode;
use ssock_rings::layout::{DirectLayout, QueuedLayout};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

/// When to look up an orphaned end's socket next, and the interval, which
/// doubles (to a bound) while the socket is seen held.
#[derive(Debug, Clone, Copy)]
pub struct Look {
    /// Next look-up.
    pub next: Instant,
    /// Interval since the last.
    pub every: std::time::Duration,
}

/// A registered listening socket.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Session that registered it, while that session lives and has not
    /// closed it. None: the registration belongs to the socket alone (the
    /// process that listened exited, daemonized or closed its copy) and
    /// lasts while any process holds the socket, as sock_diag shows.
    pub session: Option<u64>,
    /// Bound address.
    pub addr: SocketAddr,
    /// An IPv6 wildcard listener that also takes IPv4 (IPV6_V6ONLY off).
    pub dual_stack: bool,
    /// With no session: when sock_diag last showed the socket listening
    /// (None: not looked at since its session let go of it).
    pub seen: Option<Instant>,
    /// Its `short_lived` state (what the listener board says of it).
    pub short: super::board::Short,
}

/// Key under which intents wait for their accept: the destination (ip
/// after [`canon`], port), as the acceptor sees its local address. The
/// connector's port is not part of it: the connector does not bind before
/// connecting (an explicit bind to port 0 searches the bind table, which
/// thousands of TIME_WAIT sockets make slow), so its port is known only
/// once it has connected, and Claim reads it from devd's duplicate then.
pub type IntentKey = (IpAddr, u16);

/// Connections whose sockets wait to be looked up once (`sight`).
pub const MAX_UNSEEN: usize = 4096;

/// Unclaimed intents one user may have (over all its sessions); more are
/// refused (limit). Each holds a created connection, and every Claim to
/// the same destination looks at it.
pub const MAX_INTENTS_PER_USER: usize = 1024;

/// Intents whose connector let go before any Claim that devd remembers
/// (oldest forgotten first).
pub const MAX_GONE: usize = 4096;

/// Parked regions (see [`Parked`]) kept per pair of sessions, per session
/// and per user at most; past that the oldest concerned is freed.
pub const PARKED_PER_PAIR: usize = 2;
/// See [`PARKED_PER_PAIR`].
pub const PARKED_PER_SESSION: usize = 4;
/// See [`PARKED_PER_PAIR`].
pub const PARKED_PER_USER: usize = 16;
/// See [`PARKED_PER_PAIR`]: parked regions in all.
pub const PARKED_MAX: usize = 256;

/// Normalizes an address as both ends of a local TCP connection see it
/// (the listener board's rule, which clients apply too).
pub use ssock_rings::board::canon;

/// A connector's announced connection, created (its region and doorbells
/// exist, the connector holds its end) but not yet claimed by an acceptor.
#[derive(Debug)]
pub struct Intent {
    /// Where it waits (its destination).
    pub key: IntentKey,
    /// devd's token of the intent (in Proceed and Expect).
    pub token: u64,
    /// Mode decided.
    pub mode: Mode,
    /// Connector's end.
    pub end: End,
    /// When it was made (intents expire).
    pub at: Instant,
    /// devd's duplicate of the connector's socket: at Claim, its peer must
    /// be the accepted socket (a stale intent's socket never connected
    /// there), and holding it keeps the port from being reused by another
    /// socket until the intent is claimed or expires.
    pub sock: OwnedFd,
    /// The connection's id.
    pub id: u64,
    /// Its resources.
    pub res: Res,
    /// Region bytes charged to each end's user.
    pub bytes: usize,
    /// The socket's local port once seen non-zero (0: not yet): a Claim
    /// skips intents whose port is not its peer's without a syscall.
    pub port: std::cell::Cell<u16>,
    /// The connection reuses a region parked by this session and the
    /// listener's: only that session may claim it (another gets
    /// ExpectKernel, `other_acceptor`: the region is mapped in the first).
    pub reuse_by: Option<u64>,
    /// The listener it is for (socket inode), for the `short_lived` policy.
    pub listener: Option<u64>,
    /// The doorbell the Intent named as the connecting thread's own (0:
    /// none): the acceptor is given it beside the common one if the
    /// connector's session owns it (checked at the Claim, `Bells::ringer`).
    pub bell: u32,
    /// The peer node whose listener it is for, when that is on another
    /// host (its Claim comes from that peer's devd).
    pub remote: Option<u32>,
}

/// An intent whose connector let go of it (Release, or its session ended)
/// before an acceptor claimed it: its resources are freed, but a later
/// Claim of it is recognized (ExpectKernel, connector_gone, counted).
#[derive(Debug)]
pub struct Gone {
    /// Where it was announced to.
    pub key: IntentKey,
    /// Its token.
    pub token: u64,
    /// The connector socket's own address, read when it was buried (a
    /// Claim matches it with its peer's, and `key` with its own). devd's
    /// duplicate of the socket is closed then: held, it kept the connection
    /// open past its program's close (no FIN, no reset for the peer; a
    /// connect under way completed after it) and kept the program's epoll
    /// registrations of it reporting events under an fd number the program
    /// may have reused (haproxy, whose backend's workers could not claim,
    /// reset its clients).
    pub local: IntentKey,
    /// When it was made (it expires like an intent).
    pub at: Instant,
}

/// One end of a connection.
#[derive(Debug, Clone)]
pub struct End {
    /// Session of the process that set it up.
    pub session: u64,
    /// That process.
    pub pid: i32,
    /// Its user.
    pub uid: u32,
    /// Kernel socket inode.
    pub inode: u64,
    /// Local address of this end.
    pub addr: SocketAddr,
    /// Whether it was released (closed, or its process ended).
    pub released: bool,
    /// No session holds it any more: its session ended without releasing
    /// it (the process exited, died or called exec), or its process closed
    /// it while others still held the socket (Leave: a child it forked, a
    /// process it passed the socket to). When that happened, or when its
    /// socket was last seen held. It lives while any process holds its
    /// TCP socket (sock_diag), stays attachable by that socket meanwhile
    /// (an exec'd image takes it over), and is released once none does;
    /// `ORPHAN_GRACE` after this time when sock_diag cannot tell.
    pub orphaned: Option<Instant>,
    /// sock_diag has found this end's TCP socket by the connection's
    /// addresses at least once (a chore soon after the connection was
    /// made, or an orphan's look), so the look-up works for it (same
    /// network namespace, no device binding): not found later, it was
    /// closed.
    pub seen: bool,
}

/// An fd devd keeps and also sends (replies borrow it: no duplicate).
pub type Fd = Arc<OwnedFd>;

/// Resources of a Direct connection. devd does not map the region: it
/// wrote the header with pwrite and reads the ring words with pread.
#[derive(Debug)]
pub struct DirectRes {
    /// The region (kept to attach exec'd images and fd receivers).
    pub memfd: Fd,
    /// Geometry.
    pub layout: DirectLayout,
    /// The region's id (random: clients may keep regions of an earlier
    /// devd, whose ids must not match).
    pub region: u64,
}

/// A Direct region whose connection both processes closed, each keeping it
/// mapped (Release `park`), for the next connection between the same two
/// sessions in the same roles. Only a connection no other process ever
/// attached to is parked, so the region is mapped in these two processes
/// alone (and in children forked while it was live, which are theirs).
#[derive(Debug)]
pub struct Parked {
    /// Sessions [connector, acceptor].
    pub sessions: [u64; 2],
    /// Their users.
    pub uids: [u32; 2],
    /// Region bytes it stays charged to each user, as the connection was.
    pub bytes: usize,
    /// The region.
    pub res: DirectRes,
}

/// Resources of a Queued connection.
#[derive(Debug)]
pub struct QueuedRes {
    /// Each side's region (handed out to every process that attaches
    /// the end; none for an end on another host).
    pub memfd: [Option<Fd>; 2],
    /// The hand-over page both ends map (`layout::hov`): devd writes the
    /// CLAIM word there.
    pub hov: Fd,
    /// Client -> devd doorbells (devd's copies are with the engine); none
    /// for an end on another host.
    pub kick: [Option<Fd>; 2],
    /// devd -> client interrupts, the same way.
    pub call: [Option<Fd>; 2],
    /// Geometry (same for both sides).
    pub layout: QueuedLayout,
    /// Counters shared with the engine.
    pub counters: Arc<QueuedCounters>,
    /// A connector's end whose acceptor is on another host: its engine
    /// side and the hand-over page's mapping, held until the peer's Claim
    /// names the channel.
    pub held: Option<Box<HeldSide>>,
}

/// A connector's engine side and its hand-over page's mapping, waiting
/// for the channel its peer host names ([`QueuedRes::held`]).
pub type HeldSide = (
    crate::dataplane::engine::SideInit,
    Arc<ssock_rings::Mapping>,
);

/// Resources by mode.
#[derive(Debug)]
pub enum Res {
    /// Direct.
    Direct(DirectRes),
    /// Queued.
    Queued(QueuedRes),
}

/// A live accelerated connection.
#[derive(Debug)]
pub struct Conn {
    /// devd's id.
    pub id: u64,
    /// Direct or Queued.
    pub mode: Mode,
    /// [connector, acceptor].
    pub ends: [End; 2],
    /// Resources.
    pub res: Res,
    /// Region bytes charged to each end's user.
    pub bytes: usize,
    /// Whether an end already reported a protocol violation.
    pub violated: bool,
    /// No process but the two that set it up ever attached to it (Attach by
    /// socket clears it): its region may be parked.
    pub parkable: bool,
    /// Each end asked in its Release to keep the region ([`Parked`]).
    pub park: [bool; 2],
    /// The listener it came through (socket inode) and when its Intent
    /// came: the `short_lived` policy judges it when it closes.
    pub listener: Option<u64>,
    /// See `listener`.
    pub born: Instant,
    /// Its other end's peer node and their channel, when that end is on
    /// another host (the local `ends` entry for it is a stand-in, released
    /// from the start).
    pub remote: Option<(u32, u64)>,
    /// When the first of its ends was released: the connection's life, as
    /// the policy sees it, ends there (the other end of a forked server's
    /// child that exits without a close is released only once devd finds
    /// its socket gone, up to seconds later).
    pub ended: Option<Instant>,
    /// Its moves between the link and the kernel socket (remote only).
    pub moves: Moves,
}

/// A remote connection's moves between its link and its kernel socket
/// (docs/protocol.md 8.5, 8.6). A connection that moves forward onto the
/// link again is a new connection on the same sockets: this host's end
/// of the new one is offered to the process holding the old one, which
/// takes it (or lets it go) with a Forward request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moves {
    /// The connection offered to take this one's place on the link, while
    /// this host's end of it is not taken (released with this one's end).
    pub next: Option<u64>,
    /// The moved connection whose place this one takes, until this host's
    /// end of it is taken.
    pub prev: Option<u64>,
    /// How many times the connections before it (and it) moved to their
    /// kernel sockets, as of when it was made.
    pub failovers: u32,
    /// How many times they moved forward onto the link (this one counts).
    pub forwards: u32,
    /// New connections offered for it so far, and when the next may be
    /// (a peer that refused one may not see the link up yet).
    pub tries: u8,
    /// See `tries`.
    pub retry_at: Option<Instant>,
    /// The channel of the moved connection the peer's Forward named when
    /// this one was made: until the acceptor's devd takes its own new
    /// end, it may name that channel again (the link failed before its
    /// acceptor took it), and on the connector's side it means this one.
    pub replaces: Option<u64>,
}

/// All control-plane tables.
#[derive(Debug, Default)]
pub struct Registry {
    /// Listeners by socket inode.
    pub listeners: HashMap<u64, Listener>,
    /// Intents awaiting their accept (use the `*_intent*` methods, which
    /// keep `intents_of` in step).
    pub intents: HashMap<IntentKey, Vec<Intent>>,
    /// Number of pending intents by user.
    pub intents_of: HashMap<u32, usize>,
    /// Ends no session holds, (connection id, end), with when to look
    /// at their socket next: a subset of the ends whose `orphaned` is set
    /// (entries of connections gone since are dropped when found).
    pub orphans: BTreeMap<(u64, usize), Look>,
    /// Local connections whose sockets sock_diag has not been asked about
    /// yet (a chore: [`End::seen`]), oldest first, at most `MAX_UNSEEN`.
    pub unseen: std::collections::VecDeque<u64>,
    /// Intents given up before their Claim, oldest first.
    pub gone: std::collections::VecDeque<Gone>,
    /// Live connections by id (ordered for paging).
    pub conns: BTreeMap<u64, Conn>,
    /// (connection id, end) by socket inode.
    pub by_inode: HashMap<u64, (u64, usize)>,
    /// (live ends, region bytes) by uid.
    pub usage: HashMap<u32, (usize, usize)>,
    /// Parked Direct regions, oldest first.
    pub parked: Vec<Parked>,
    /// Next connection id.
    pub next_id: u64,
}

impl Registry {
    /// A connection to `dst` reaches a registered listener only if the
    /// kernel would deliver it there: same port, and the listener's address
    /// is `dst` or the wildcard of `dst`'s family (an IPv6 wildcard also
    /// takes IPv4 when it is dual-stack). A wrong match would send a Hello
    /// to whatever plain process really accepts the connection.
    /// One held by a session is preferred (its session matters for reuse).
    pub fn listener_for(&self, dst: SocketAddr) -> Option<&Listener> {
        self.listener_inode_for(dst).map(|i| &self.listeners[&i])
    }

    /// The socket inode of [`Registry::listener_for`]'s listener.
    pub fn listener_inode_for(&self, dst: SocketAddr) -> Option<u64> {
        self.listeners
            .iter()
            .filter(|(_, l)| ssock_rings::board::reaches(l.addr, l.dual_stack, dst))
            .min_by_key(|(_, l)| l.session.is_none())
            .map(|(&i, _)| i)
    }

    /// Every registered listener a connection to `dst` may reach (several
    /// with SO_REUSEPORT; see [`Registry::listener_for`]).
    pub fn listeners_for(&self, dst: SocketAddr) -> impl Iterator<Item = &Listener> {
        self.listeners
            .values()
            .filter(move |l| ssock_rings::board::reaches(l.addr, l.dual_stack, dst))
    }

    /// Charges or refunds a user's usage.
    pub fn charge(&mut self, uid: u32, ends: isize, bytes: isize) {
        let u = self.usage.entry(uid).or_default();
        u.0 = u.0.saturating_add_signed(ends);
        u.1 = u.1.saturating_add_signed(bytes);
        if *u == (0, 0) {
            self.usage.remove(&uid);
        }
    }

    /// Takes the newest region parked for connections from session
    /// `connector` to session `acceptor`.
    pub fn unpark(&mut self, connector: u64, acceptor: u64) -> Option<DirectRes> {
        let i = self
            .parked
            .iter()
            .rposition(|p| p.sessions == [connector, acceptor])?;
        Some(self.take_parked(i).res)
    }

    /// Parks a region (its users stay charged its bytes), first freeing
    /// the oldest parked ones its pair, either session, either user or
    /// everyone already has the most of.
    pub fn park(&mut self, p: Parked) {
        let ([s0, s1], [u0, u1], pair) = (p.sessions, p.uids, p.sessions);
        self.evict_over(PARKED_PER_PAIR, |q| q.sessions == pair);
        self.evict_over(PARKED_PER_SESSION, |q| q.sessions.contains(&s0));
        self.evict_over(PARKED_PER_SESSION, |q| q.sessions.contains(&s1));
        self.evict_over(PARKED_PER_USER, |q| q.uids.contains(&u0));
        self.evict_over(PARKED_PER_USER, |q| q.uids.contains(&u1));
        self.evict_over(PARKED_MAX, |_| true);
        let b = isize::try_from(p.bytes).unwrap_or(isize::MAX);
        for uid in p.uids {
            self.charge(uid, 0, b);
        }
        self.parked.push(p);
    }

    /// Removes parked region `i`, refunding its users.
    fn take_parked(&mut self, i: usize) -> Parked {
        let p = self.parked.remove(i);
        let b = isize::try_from(p.bytes).unwrap_or(isize::MAX);
        for uid in p.uids {
            self.charge(uid, 0, -b);
        }
        p
    }

    /// Frees the oldest parked regions `concerned` accepts until fewer
    /// than `max` are left.
    fn evict_over(&mut self, max: usize, concerned: impl Fn(&Parked) -> bool) {
        while self.parked.iter().filter(|q| concerned(q)).count() >= max {
            match self.parked.iter().position(&concerned) {
                Some(i) => drop(self.take_parked(i)),
                None => break,
            }
        }
    }

    /// Frees user `uid`'s oldest parked region, if it has one (its memory
    /// is wanted for a live connection).
    pub fn evict_one_of(&mut self, uid: u32) -> bool {
        match self.parked.iter().position(|q| q.uids.contains(&uid)) {
            Some(i) => {
                drop(self.take_parked(i));
                true
            }
            None => false,
        }
    }

    /// Frees the regions parked with session `sid` as either end.
    pub fn unpark_session(&mut self, sid: u64) {
        while let Some(i) = self.parked.iter().position(|p| p.sessions.contains(&sid)) {
            drop(self.take_parked(i));
        }
    }

    /// Whether user `uid` may announce one more intent.
    pub fn may_add_intent(&self, uid: u32) -> bool {
        self.intents_of.get(&uid).copied().unwrap_or(0) < MAX_INTENTS_PER_USER
    }

    /// Remembers an intent given up before its Claim (see [`Gone`]).
    pub fn bury(&mut self, key: IntentKey, token: u64, local: IntentKey, at: Instant) {
        if self.gone.len() >= MAX_GONE {
            self.gone.pop_front();
        }
        self.gone.push_back(Gone {
            key,
            token,
            local,
            at,
        });
    }

    /// Stores an intent under `key`; returns the earlier intent of the same
    /// socket it replaces, if any (the caller frees it).
    pub fn add_intent(&mut self, key: IntentKey, intent: Intent) -> Vec<Intent> {
        let inode = intent.end.inode;
        let replaced = self.retain_intents(|i| i.end.inode != inode);
        *self.intents_of.entry(intent.end.uid).or_default() += 1;
        self.intents.entry(key).or_default().push(intent);
        replaced
    }

    /// Removes and returns the first intent under `key` that `ok` accepts.
    pub fn take_intent(
        &mut self,
        key: IntentKey,
        ok: impl FnMut(&Intent) -> bool,
    ) -> Option<Intent> {
        let list = self.intents.get_mut(&key)?;
        let i = list.iter().position(ok)?;
        let intent = list.swap_remove(i);
        if list.is_empty() {
            self.intents.remove(&key);
        }
        self.uncount(intent.end.uid, 1);
        Some(intent)
    }

    /// Applies `f` to the `short_lived` state of listener `inode` and of
    /// every other listener bound to its address (SO_REUSEPORT: the board
    /// answers for the address, so they are held alike); their inodes.
    pub fn same_address(
        &mut self,
        inode: u64,
        mut f: impl FnMut(&mut super::board::Short),
    ) -> Vec<u64> {
        let Some(addr) = self.listeners.get(&inode).map(|l| l.addr) else {
            return Vec::new();
        };
        let mut same = Vec::new();
        for (&i, l) in &mut self.listeners {
            if l.addr == addr {
                f(&mut l.short);
                same.push(i);
            }
        }
        same
    }

    /// Keeps only the intents `keep` accepts; returns the others (the
    /// caller frees them).
    #[must_use]
    pub fn retain_intents(&mut self, keep: impl Fn(&Intent) -> bool) -> Vec<Intent> {
        let mut gone = Vec::new();
        for list in self.intents.values_mut() {
            let mut i = 0;
            while i < list.len() {
                if keep(&list[i]) {
                    i += 1;
                } else {
                    gone.push(list.swap_remove(i));
                }
            }
        }
        self.intents.retain(|_, list| !list.is_empty());
        for i in &gone {
            self.uncount(i.end.uid, 1);
        }
        gone
    }

    fn uncount(&mut self, uid: u32, n: usize) {
        if let Some(c) = self.intents_of.get_mut(&uid) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.intents_of.remove(&uid);
            }
        }
    }

    /// Removes and returns the intents older than `max_age_s`.
    #[must_use]
    pub fn expire(&mut self, now: Instant, max_age_s: u64) -> Vec<Intent> {
        self.gone
            .retain(|g| now.duration_since(g.at).as_secs() < max_age_s);
        self.retain_intents(|i| now.duration_since(i.at).as_secs() < max_age_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(addr: &str, dual_stack: bool) -> Registry {
        let mut r = Registry::default();
        r.listeners.insert(
            1,
            Listener {
                session: Some(1),
                addr: addr.parse().unwrap(),
                dual_stack,
                seen: None,
                short: Default::default(),
            },
        );
        r
    }

    #[test]
    fn listeners_match_only_what_the_kernel_would_deliver_to_them() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(reg("0.0.0.0:80", false)
            .listener_for(a("127.0.0.1:80"))
            .is_some());
        assert!(reg("0.0.0.0:80", false)
            .listener_for(a("127.0.0.1:81"))
            .is_none());
        assert!(reg("0.0.0.0:80", false)
            .listener_for(a("[::1]:80"))
            .is_none());
        assert!(reg("127.0.0.1:80", false)
            .listener_for(a("127.0.0.2:80"))
            .is_none());
        assert!(reg("[::]:80", false)
            .listener_for(a("127.0.0.1:80"))
            .is_none());
        assert!(reg("[::]:80", true)
            .listener_for(a("127.0.0.1:80"))
            .is_some());
        assert!(reg("[::]:80", false).listener_for(a("[::1]:80")).is_some());
    }
}
