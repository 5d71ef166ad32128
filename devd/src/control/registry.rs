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

/// A registered listening socket.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Session that registered it.
    pub session: u64,
    /// Bound address.
    pub addr: SocketAddr,
    /// An IPv6 wildcard listener that also takes IPv4 (IPV6_V6ONLY off).
    pub dual_stack: bool,
}

/// Key under which intents wait for their accept: the destination (ip
/// after [`canon`], port), as the acceptor sees its local address. The
/// connector's port is not part of it: the connector does not bind before
/// connecting (an explicit bind to port 0 searches the bind table, which
/// thousands of TIME_WAIT sockets make slow), so its port is known only
/// once it has connected, and Claim reads it from devd's duplicate then.
pub type IntentKey = (IpAddr, u16);

/// Unclaimed intents one user may have (over all its sessions); more are
/// refused (limit). Each holds a created connection, and every Claim to
/// the same destination looks at it.
pub const MAX_INTENTS_PER_USER: usize = 1024;

/// Intents whose connector let go before any Claim that devd remembers
/// (oldest forgotten first).
pub const MAX_GONE: usize = 4096;

/// Normalizes an address as both ends of a local TCP connection see it.
pub fn canon(ip: IpAddr) -> IpAddr {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        match ip {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        ip
    }
}

/// A connector's announced connection, created (its region and doorbells
/// exist, the connector holds its end) but not yet claimed by an acceptor.
#[derive(Debug)]
pub struct Intent {
    /// Where it waits (its destination).
    pub key: IntentKey,
    /// Token the Hello will carry.
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
}

/// An intent whose connector let go of it (Release, or its session ended)
/// before an acceptor claimed it: its resources are freed, but its Hello
/// may be on the way to an acceptor, which must consume it (ExpectKernel,
/// connector_gone) rather than hand it to the application as data.
#[derive(Debug)]
pub struct Gone {
    /// Where it was announced to.
    pub key: IntentKey,
    /// The token its Hello carries.
    pub token: u64,
    /// devd's duplicate of the connector's socket, to match the Claim.
    pub sock: OwnedFd,
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
    /// Its session ended without releasing it (the process exited, died or
    /// called exec): when. A Direct end stays attachable by its socket for
    /// `ORPHAN_GRACE`, so a program exec'd with the socket inherited can
    /// take it over; then it is released.
    pub orphaned: Option<Instant>,
}

/// An fd devd keeps and also sends (replies borrow it: no duplicate).
pub type Fd = Arc<OwnedFd>;

/// Resources of a Direct connection. devd does not map the region: it
/// wrote the header with pwrite and reads the ring words with pread.
#[derive(Debug)]
pub struct DirectRes {
    /// The region (kept to attach exec'd images and fd receivers).
    pub memfd: Fd,
    /// Doorbells (eventfds) per end [connector, acceptor], each [read,
    /// write]: data arrived / space freed, so a reader and a writer never
    /// share one.
    pub bells: [[Fd; 2]; 2],
    /// Geometry.
    pub layout: DirectLayout,
}

/// Resources of a Queued connection.
#[derive(Debug)]
pub struct QueuedRes {
    /// Each side's region (handed out once at attach).
    pub memfd: [Option<OwnedFd>; 2],
    /// Client -> devd doorbells (devd's copies are with the engine).
    pub kick: [Fd; 2],
    /// devd -> client interrupts.
    pub call: [Fd; 2],
    /// Geometry (same for both sides).
    pub layout: QueuedLayout,
    /// Counters shared with the engine.
    pub counters: Arc<QueuedCounters>,
}

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
    /// Ends waiting out their orphan grace, (connection id, end): a subset
    /// of the ends whose `orphaned` is set (entries of connections gone
    /// since are dropped when found).
    pub orphans: std::collections::BTreeSet<(u64, usize)>,
    /// Intents given up before their Claim, oldest first.
    pub gone: std::collections::VecDeque<Gone>,
    /// Live connections by id (ordered for paging).
    pub conns: BTreeMap<u64, Conn>,
    /// (connection id, end) by socket inode.
    pub by_inode: HashMap<u64, (u64, usize)>,
    /// (live ends, region bytes) by uid.
    pub usage: HashMap<u32, (usize, usize)>,
    /// Next connection id.
    pub next_id: u64,
}

impl Registry {
    /// A connection to `dst` reaches a registered listener only if the
    /// kernel would deliver it there: same port, and the listener's address
    /// is `dst` or the wildcard of `dst`'s family (an IPv6 wildcard also
    /// takes IPv4 when it is dual-stack). A wrong match would send a Hello
    /// to whatever plain process really accepts the connection.
    pub fn listener_for(&self, dst: SocketAddr) -> Option<&Listener> {
        let dip = canon(dst.ip());
        self.listeners.values().find(|l| {
            let lip = l.addr.ip().to_canonical();
            let addr_ok = if lip.is_unspecified() {
                lip.is_ipv4() == dip.is_ipv4() || (l.dual_stack && dip.is_ipv4())
            } else {
                canon(lip) == dip
            };
            l.addr.port() == dst.port() && addr_ok
        })
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

    /// Whether user `uid` may announce one more intent.
    pub fn may_add_intent(&self, uid: u32) -> bool {
        self.intents_of.get(&uid).copied().unwrap_or(0) < MAX_INTENTS_PER_USER
    }

    /// Remembers an intent given up before its Claim (see [`Gone`]).
    pub fn bury(&mut self, key: IntentKey, token: u64, sock: OwnedFd, at: Instant) {
        if self.gone.len() >= MAX_GONE {
            self.gone.pop_front();
        }
        self.gone.push_back(Gone {
            key,
            token,
            sock,
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
                session: 1,
                addr: addr.parse().unwrap(),
                dual_stack,
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
