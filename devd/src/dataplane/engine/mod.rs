//! The Queued engine: one thread, the device side of every Queued client's
//! virtqueues. It moves bytes from each side's TX queue into its backend
//! channel and from the channel into the side's RX queue, and sleeps in
//! `epoll_wait` on the clients' kick eventfds and the backend's readiness
//! fd when there is nothing to do (a spinning third process on a 2-core
//! machine costs milliseconds). After every turn it asks the backend which
//! channels changed (`Backend::poll`) and serves their connections.
//!
//! A TX buffer goes back to its client only once the backend says the
//! peer side took its bytes (`Offsets::acked`): until then the client
//! still holds them, whatever happens to the link.
//!
//! A side that breaks the queue protocol is reset (its peer sees a reset,
//! it sees a reset) and never touched again; other connections go on.
//! When a link fails, the connections that crossed it go on over their
//! kernel sockets (`failover.rs`).

mod failover;
mod links;
mod migrate;

pub use links::{LinkPolicy, LinkSeen, LinkTable, Links, LINK_HISTORY};

use crate::sandbox::ThreadKind;
use crate::stats::{EngineCounts, QueuedCounters};
use ssock_hwbackends::{
    link_of, Backend, BackendError, ChannelId, LinkId, LinkState, Mark, Peer, Recv, Words,
};
use ssock_rings::layout::{self, FLAG_EOS, FLAG_PEER_RESET, FLAG_RESET, FLAG_RESET_AFTER_EOS};
use ssock_rings::relay;
use ssock_rings::sys::EventFd;
use ssock_rings::vq::device::{Buf, DeviceRegion};
use ssock_rings::vq::{RX, TX};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// One side of a Queued connection as handed to the engine.
#[derive(Debug)]
pub struct SideInit {
    /// The client's region, mapped and validated.
    pub region: DeviceRegion,
    /// Client -> devd doorbell.
    pub kick: EventFd,
    /// devd -> client interrupt.
    pub call: EventFd,
}

/// A side with its backend channel and where that channel's other end is.
#[derive(Debug)]
pub struct SideSpec {
    /// The client's end.
    pub init: SideInit,
    /// Its backend channel.
    pub ch: ChannelId,
    /// The channel's peer: the other side's channel for a local pair.
    pub peer: Peer,
    /// Which end of the connection it is (0 connector, 1 acceptor).
    pub end: usize,
    /// With a remote peer: the connection's hand-over page on this host,
    /// whose words the engine relays to and from the other host's devd.
    pub hov: Option<Arc<ssock_rings::Mapping>>,
    /// With a remote peer: made while its devd saw the link down, it
    /// starts on its kernel socket (`Engine::born_on_kernel`).
    pub on_kernel: bool,
}

impl SideSpec {
    /// Both sides of a connection between two local clients, on channels
    /// `2 id` (connector) and `2 id + 1` (acceptor).
    pub fn local_pair(id: u64, connector: SideInit, acceptor: SideInit) -> Vec<SideSpec> {
        let (a, b) = (chan(id, 0), chan(id, 1));
        vec![
            SideSpec {
                init: connector,
                ch: a,
                peer: Peer::Local(b),
                end: 0,
                hov: None,
                on_kernel: false,
            },
            SideSpec {
                init: acceptor,
                ch: b,
                peer: Peer::Local(a),
                end: 1,
                hov: None,
                on_kernel: false,
            },
        ]
    }
}

/// Commands from the control thread.
#[derive(Debug)]
pub enum Cmd {
    /// Serve a new connection.
    Add {
        /// Connection id.
        id: u64,
        /// Its sides here: [connector, acceptor] for a local pair, the
        /// one end on this host when the peer is remote.
        sides: Vec<SideSpec>,
        /// Shared counters.
        counters: Arc<QueuedCounters>,
    },
    /// A side's process released the connection or died.
    SideGone {
        /// Connection id.
        id: u64,
        /// The side's end (`SideSpec::end`).
        side: usize,
        /// Its kernel socket was closed in order (a FIN, as the kernel
        /// closes a socket its last holder let go of without a close):
        /// the side ends with Eos, not Reset, if its client set no mark.
        orderly: bool,
    },
    /// The peer devds' messages go through here (`failover.rs`).
    Peers(crate::peers::Sender),
    /// Peer `node` moves the connection on `channel` to its kernel socket
    /// (`peers::wire::Msg::Failover`).
    PeerFailover {
        /// The peer.
        node: u32,
        /// The connection's channel.
        channel: u64,
        /// Its end's hand-over words.
        words: [u64; 4],
        /// Where it closed the direction it reads, once it did.
        closed: Option<u64>,
        /// Say this side's part again even if unchanged (an end that
        /// rejoined a devd started again asks anew: docs/protocol.md 8.8).
        again: bool,
    },
    /// Link setup with peer `node` (`Backend::setup`): its message for
    /// one link, or None when the peers' control connection came up.
    Setup {
        /// The peer.
        node: u32,
        /// The link and the peer's message.
        msg: Option<(LinkId, Vec<u8>)>,
    },
    /// Peer `node` moves the connection on `channel` onto another link
    /// (`peers::wire::Msg::Migrate`, `migrate.rs`).
    PeerMigrate {
        /// The peer.
        node: u32,
        /// The connection's channel on the failed link.
        channel: u64,
        /// The link it moves to, once the peer has it.
        link: Option<LinkId>,
        /// What the peer's end was given of this end's stream.
        received: u64,
        /// With this end's mark.
        marked: bool,
    },
    /// Take link `link` to `node` (None: each of them) out of service,
    /// or back in (`Backend::set_link`).
    SetLink {
        /// The peer.
        node: u32,
        /// Which of its links.
        link: Option<LinkId>,
        /// In service.
        up: bool,
    },
    /// Stop the thread.
    Stop,
}

/// The control thread's handle on the engine.
#[derive(Debug)]
pub struct Handle {
    tx: mpsc::Sender<Cmd>,
    wake: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    links: Links,
}

impl Handle {
    /// Each peer node's links together: whether any is up, how many
    /// times they changed in all.
    pub fn links(&self) -> std::collections::BTreeMap<u32, (bool, u64)> {
        let mut by_node = std::collections::BTreeMap::new();
        for (&(n, _), l) in &self.links.lock().unwrap_or_else(|p| p.into_inner()).seen {
            let e: &mut (bool, u64) = by_node.entry(n).or_default();
            e.0 |= l.up;
            e.1 += l.changes;
        }
        by_node
    }

    /// Each link's state: up or not, how many times it changed.
    pub fn link_states(&self) -> std::collections::BTreeMap<(u32, LinkId), (bool, u64)> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen
            .iter()
            .map(|(&k, l)| (k, (l.up, l.changes)))
            .collect()
    }

    /// Whether link `link` to `node` is up.
    pub fn link_up(&self, node: u32, link: LinkId) -> bool {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .up(node, link)
    }

    /// Sets how connections with peer `node` are put on its links.
    pub fn set_link_policy(&self, node: u32, policy: LinkPolicy) {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_policy(node, policy);
    }

    /// The link a new connection with peer `node` (which has `links`
    /// links) takes among those `fits` allows, by the peer's policy.
    pub fn choose_link(
        &self,
        node: u32,
        links: usize,
        fits: impl Fn(&LinkTable, LinkId) -> bool,
    ) -> Option<LinkId> {
        let mut t = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let fit: Vec<bool> = (0..links)
            .map(|l| LinkId::try_from(l).is_ok_and(|l| fits(&t, l)))
            .collect();
        t.choose(node, links, |l| {
            fit.get(usize::from(l)).copied().unwrap_or(false)
        })
    }

    /// The links as the statistics show them, with their last changes.
    pub fn link_history(&self) -> std::collections::BTreeMap<(u32, LinkId), LinkSeen> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen
            .clone()
    }

    /// Whether the engine thread is still running.
    pub fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Sends a command and wakes the engine.
    pub fn send(&self, cmd: Cmd) {
        if self.tx.send(cmd).is_ok() {
            let _ = self.wake.notify();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Side {
    region: DeviceRegion,
    kick: EventFd,
    call: EventFd,
    /// Its backend channel, and where that channel's other end is.
    ch: ChannelId,
    peer: Peer,
    end: usize,
    /// Remote peers: the hand-over page, the words last sent from it, and
    /// whether the other host's words came yet.
    hov: Option<Arc<ssock_rings::Mapping>>,
    words_sent: Option<Words>,
    heard: bool,
    /// When it was added (a remote connector's side that hears nothing
    /// for `UNHEARD` ends: `unheard`).
    opened: Instant,
    tx_pending: Option<(Buf, usize)>,
    /// TX buffers whose bytes the backend took, with the stream offset
    /// each ends at, given back once acknowledged up to there.
    unacked: VecDeque<(Buf, u64)>,
    /// Bytes of this side's stream the backend took.
    sent: u64,
    /// Where this side's stream stood when its channel opened (not 0
    /// once it moved onto another link: the channel's offsets count from
    /// there).
    base: u64,
    /// Unacknowledged TX buffers to send again from the given offset in
    /// each (after a move onto another link), before anything else.
    resend: VecDeque<(Buf, usize)>,
    /// Moving onto another link (`migrate.rs`).
    migrating: Option<migrate::Migrating>,
    /// The channel it crossed before its last move onto another link
    /// (the other host's late messages may still name it), and what this
    /// side said of it then (received, marked).
    prev_ch: Option<ChannelId>,
    migrate_said: (u64, bool),
    /// Twins of moves given up (fail-over took over): kept open until the
    /// connection goes, since the other host may already send there (a
    /// close would tell it Gone: a reset).
    given_up: Vec<ChannelId>,
    /// Bytes of the other end's stream discarded because this side's
    /// client went (taken from the channel, so acknowledged).
    discarded: u64,
    /// The end mark sent was a reset.
    reset_sent: bool,
    /// What of this side's stream the engine last saw acknowledged (it
    /// holds every TX buffer from there): a link that fails may say more
    /// of its own (a hostile inbox counts all sent as acknowledged).
    acked: u64,
    /// Bytes of the other end's stream given to this side's client.
    received: u64,
    /// The link under it failed: it moves to its kernel socket.
    failover: Option<failover::Failover>,
    mark_sent: bool,
    rx_marked: bool,
    /// The peer's reset was told to the client: `FLAG_PEER_RESET` while
    /// bytes it sent before still wait for room in the client's RX queue,
    /// or after the end of stream its client has; or `FLAG_RESET`, the
    /// end itself.
    reset_told: bool,
    gone: bool,
    /// It went with its kernel socket closed in order (`Cmd::SideGone`).
    orderly: bool,
    /// Bytes wait in the backend for an RX buffer of this side (the last
    /// `rx` found none posted): a repost is news.
    rx_waiting: bool,
    /// When a side alone here (its peer on another host) that went,
    /// waiting for its last bytes and mark to leave, last moved any.
    gone_at: Option<Instant>,
    dead: bool,
}

struct Pair {
    sides: Vec<Side>,
    counters: Arc<QueuedCounters>,
}

const WAKE: u64 = u64::MAX;
/// The backend's readiness fd.
const BACKEND: u64 = u64::MAX - 1;
/// Rounds of pumping one connection gets per turn before others run.
const BUDGET: usize = 64;
/// How long the engine looks for news before it sleeps, after a turn that
/// served a connection with an end on another host: the other host's
/// answer comes within a round trip, which costs less than this engine's
/// sleep and wake-up. The look reads shared memory only and yields the
/// CPU every 4 us (a client the scheduler put on this CPU runs at once: a
/// spin that does not yield kept one waiting out the whole spin, the p99
/// of a ping-pong at 250 us); it ends when a yield kept it off the CPU
/// for over 10 us, and none follows a turn that served no such
/// connection: idle, the engine sleeps.
const REMOTE_SPIN: std::time::Duration = std::time::Duration::from_micros(200);
/// Looks for news between two looks at the clock in `spin_for_news`.
const SPIN_LOOKS: usize = 16;
/// How long a side whose client went waits for the other host to take
/// its last bytes before it is reset and forgotten.
const LINGER: std::time::Duration = std::time::Duration::from_secs(10);
/// How often lingering sides (and sides moving to their kernel sockets)
/// are looked at when nothing else wakes the engine.
const LINGER_LOOK: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a remote connector's side waits, its link up, for the first
/// words of the acceptor's side on the other host (which answers this
/// side's first words at once while it exists) before taking that side
/// for one that ended before this one opened (`Engine::unheard`).
const UNHEARD: std::time::Duration = std::time::Duration::from_secs(5);
/// The looks at such a side (a second apart at least, each after the
/// backend's news of the turn before) that found it unheard first: an
/// engine that was not running for a while (its process stopped) reads
/// what came meanwhile before it judges.
const UNHEARD_LOOKS: u32 = 5;

/// `side` ends with a reset both ways: its client sees it, and the peer
/// through `backend`; nothing it held waits any more.
fn reset(backend: &mut dyn Backend, side: &mut Side) {
    side.dead = true;
    side.tx_pending = None;
    side.unacked.clear();
    let _ = backend.send_mark(side.ch, Mark::Reset);
    side.mark_sent = true;
    let _ = side.region.set_rx_flags(FLAG_RESET);
    let _ = side.call.notify();
}

/// The channel of side `side` of local connection `id`.
/// Sends up to `max` bytes of `side`'s client buffer `buf` from `off` on
/// channel `ch`, read from the client's buffer straight into what the
/// backend sends, as much as it takes; and the buffer's read error, if
/// reading it failed (a client that broke the queue protocol).
fn send_buf(
    backend: &mut dyn Backend,
    ch: ChannelId,
    side: &Side,
    buf: Buf,
    off: usize,
    max: usize,
) -> (
    Result<usize, BackendError>,
    Option<ssock_rings::vq::device::DeviceError>,
) {
    let mut bad = None;
    let from = buf.addr + off as u64;
    let sent = backend.send_with(ch, max, &mut |at, dst| match side
        .region
        .read_into(from + at as u64, dst)
    {
        Ok(()) => true,
        Err(e) => {
            bad = Some(e);
            false
        }
    });
    (sent, bad)
}

/// Whether the engine takes `side`'s client posts when they come (its
/// kicks wanted): a side still served here, with no TX buffer waiting for
/// the window, nothing to send again and no end mark sent.
fn wants_tx_kicks(side: &Side) -> bool {
    let off = side.dead || side.gone || side.failover.is_some() || side.migrating.is_some();
    !off && !side.mark_sent && side.tx_pending.is_none() && side.resend.is_empty()
}

/// Whether `side`'s channel crosses link `link` to `node`.
fn crosses(side: &Side, node: u32, link: LinkId) -> bool {
    matches!(side.peer, Peer::Remote { node: n, .. } if n == node) && link_of(side.ch) == link
}

fn chan(id: u64, side: usize) -> ChannelId {
    id * 2 + side as u64
}

/// Starts the engine thread over `backend`.
pub fn spawn(
    backend: Box<dyn Backend>,
    counts: Arc<EngineCounts>,
    sandbox: Option<crate::sandbox::Mode>,
) -> io::Result<Handle> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(EventFd::new()?);
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, WAKE),
    )?;
    for fd in backend.readiness() {
        epoll.ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, BACKEND),
        )?;
    }
    let extra = backend.syscalls();
    let quiet_backend = backend.capabilities().passive;
    let w = wake.clone();
    let links = Links::default();
    let l = links.clone();
    let thread = crate::sandbox::spawn_sandboxed(
        ThreadKind::Engine,
        "ssock-engine",
        sandbox,
        extra,
        move || {
            let mut e = Engine {
                backend,
                pairs: HashMap::new(),
                by_chan: HashMap::new(),
                by_conn: HashMap::new(),
                epoll,
                scratch: vec![0u8; 256 * 1024],
                busy: VecDeque::new(),
                ready: Vec::new(),
                remote: std::collections::HashSet::new(),
                spin_until: None,
                called: false,
                lingering: std::collections::HashSet::new(),
                lingered: Instant::now(),
                unheard: HashMap::new(),
                quiet_backend,
                counts,
                links: l,
                peers: None,
            };
            e.run(&rx, &w);
        },
    )?;
    Ok(Handle {
        tx,
        wake,
        thread: Some(thread),
        links,
    })
}

struct Engine {
    backend: Box<dyn Backend>,
    pairs: HashMap<u64, Pair>,
    /// The connection each open backend channel serves.
    by_chan: HashMap<ChannelId, u64>,
    /// The connection of each remote channel's connection bits
    /// (`connection_of`: the same through its moves onto other links).
    by_conn: HashMap<ChannelId, u64>,
    epoll: Epoll,
    scratch: Vec<u8>,
    busy: VecDeque<u64>,
    /// Channels `Backend::poll` named (reused buffer).
    ready: Vec<ChannelId>,
    /// Connections with an end on another host, and until when the
    /// engine looks for news without sleeping after it served one
    /// (`spin_for_news`).
    remote: std::collections::HashSet<u64>,
    spin_until: Option<Instant>,
    /// This turn woke a client (its call eventfd): the engine yields the
    /// CPU once before it goes on (another turn, or a look for news)
    /// without sleeping. The scheduler does not preempt it for the woken
    /// client where both share a CPU: that client waited 14-17 us (the
    /// two-host lab, `perf sched timehist`).
    called: bool,
    /// Connections whose one side here went and waits (`LINGER`), and
    /// when they were last looked at.
    lingering: std::collections::HashSet<u64>,
    lingered: Instant,
    /// Connections with a remote connector's side that has not heard the
    /// other host's side yet, looked at with the lingering ones, and how
    /// many of those looks (a second apart at least) each had.
    unheard: HashMap<u64, u32>,
    /// The backend is passive (`Capabilities::passive`): nothing changes
    /// in it but through the engine's calls.
    quiet_backend: bool,
    counts: Arc<EngineCounts>,
    links: Links,
    /// The peer devds, for fail-over (none: a failed link resets).
    peers: Option<crate::peers::Sender>,
}

impl Engine {
    fn run(&mut self, rx: &mpsc::Receiver<Cmd>, wake: &EventFd) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let busy = !self.busy.is_empty();
            if busy && std::mem::take(&mut self.called) {
                // Served on at once: a client this turn woke gets the
                // CPU first if the scheduler put it on this one.
                std::thread::yield_now();
            }
            let timeout = if busy || self.spin_for_news() || !self.backend.idle() {
                0
            } else {
                // The backend's next chore (a heartbeat), rounded up to
                // a millisecond, or the next look at lingering sides (a
                // second at most); none: sleep until woken.
                let linger = !(self.lingering.is_empty() && self.unheard.is_empty());
                let linger = linger.then(|| LINGER_LOOK.saturating_sub(self.lingered.elapsed()));
                match (self.backend.deadline(), linger) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
                .map_or(-1, |d| {
                    i32::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
                })
            };
            // (Before a sleep the call needs no yield: the wait gives way.)
            self.called = false;
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("engine epoll_wait failed, engine stops: {e}");
                    return;
                }
            };
            if !self.events_in(&events[..n], rx, wake) {
                return;
            }
            self.turn();
        }
    }

    /// Takes in what epoll said: commands, kicks (their connections are
    /// served next). False: stop.
    fn events_in(
        &mut self,
        events: &[EpollEvent],
        rx: &mpsc::Receiver<Cmd>,
        wake: &EventFd,
    ) -> bool {
        for ev in events {
            let data = ev.data();
            if data == WAKE {
                wake.drain();
                while let Ok(cmd) = rx.try_recv() {
                    if !self.command(cmd) {
                        return false;
                    }
                }
            } else if data == BACKEND {
                // poll (`turn`) takes it in.
            } else {
                let id = data >> 1;
                if let Some(p) = self.pairs.get(&id) {
                    p.sides[(data & 1) as usize].kick.drain();
                    if !self.busy.contains(&id) {
                        self.busy.push_back(id);
                    }
                }
            }
        }
        true
    }

    /// Serves the busy connections once each, then the backend's news,
    /// and once more the connections the news named; every second, the
    /// lingering ones too.
    fn turn(&mut self) {
        if !(self.lingering.is_empty() && self.unheard.is_empty())
            && self.lingered.elapsed() >= LINGER_LOOK
        {
            self.lingered = Instant::now();
            for (id, looks) in self.unheard.iter_mut() {
                *looks += 1;
                if !self.lingering.contains(id) && !self.busy.contains(id) {
                    self.busy.push_back(*id);
                }
            }
            for &id in &self.lingering {
                if !self.busy.contains(&id) {
                    self.busy.push_back(id);
                }
            }
        }
        self.pump_busy();
        self.backend_news();
        if !self.busy.is_empty() {
            // What the backend just named (a peer's frame for a client,
            // an acknowledgement) is served in this turn: the next one
            // would begin with a wait that only finds it again.
            self.pump_busy();
            self.backend_news();
        }
    }

    /// Pumps each busy connection once; those with more to do stay busy.
    fn pump_busy(&mut self) {
        for _ in 0..self.busy.len() {
            let Some(id) = self.busy.pop_front() else {
                break;
            };
            if self.remote.contains(&id) {
                self.spin_until = Some(Instant::now() + REMOTE_SPIN);
            }
            if self.pump(id) {
                self.busy.push_back(id);
            } else if self.quiet_backend {
                // All this backend's news come from the engine's own
                // calls: what pumping `id` to a standstill caused about
                // `id` itself is no news.
                self.backend.poll(&mut self.ready);
                let by_chan = &self.by_chan;
                self.ready.retain(|ch| by_chan.get(ch) != Some(&id));
            }
        }
    }

    /// Until `REMOTE_SPIN` after the engine last served a connection with
    /// a remote end: looks for news (the backend's shared words, the avail
    /// rings of those connections' clients; no system call but the
    /// yields, see `REMOTE_SPIN`); true
    /// if some came (the next wait does not sleep). News that concerns no
    /// connection leaves the spin's end where it was.
    fn spin_for_news(&mut self) -> bool {
        let Some(until) = self.spin_until else {
            return false;
        };
        // Looked up once: nothing changes them while the engine spins.
        let watched: Vec<(u64, &Pair)> = self
            .remote
            .iter()
            .filter_map(|&id| self.pairs.get(&id).map(|p| (id, p)))
            .collect();
        // Their clients' posts are seen by the look: no kick (a system
        // call on the client's side, an epoll wake-up on this one) until
        // the look ends and asks for kicks again. (Before the yield: the
        // client it lets run answers then.)
        for (_, p) in &watched {
            for s in p.sides.iter().filter(|s| wants_tx_kicks(s)) {
                let _ = s.region.suppress_kicks(TX);
            }
        }
        if std::mem::take(&mut self.called) {
            std::thread::yield_now();
        }
        let left = until.saturating_duration_since(Instant::now());
        let mut spin = ssock_rings::notify::Spin::new(left);
        let backend = &self.backend;
        let mut found = None;
        'spin: while spin.again() {
            // Several looks per look at the clock (each one a vDSO call).
            for _ in 0..SPIN_LOOKS {
                if backend.news_waiting() {
                    found = Some(None);
                    break 'spin;
                }
                // Bytes to take (unless the last ones still wait for the
                // window: then only the peer's acknowledgement is news),
                // or room for bytes that wait for it.
                let news = watched.iter().find(|(_, p)| {
                    p.sides.iter().any(|s| {
                        !s.dead
                            && s.failover.is_none()
                            && s.migrating.is_none()
                            && ((s.tx_pending.is_none()
                                && s.resend.is_empty()
                                && !s.mark_sent
                                && s.region.has_avail(TX))
                                || (s.rx_waiting && s.region.has_avail(RX)))
                    })
                });
                if let Some(&(id, _)) = news {
                    found = Some(Some(id));
                    break 'spin;
                }
                std::hint::spin_loop();
            }
        }
        drop(watched);
        // Kicks asked for again, and a post that came before the ask is
        // served (no kick comes for it).
        let mut posted = false;
        for &id in &self.remote {
            let Some(p) = self.pairs.get_mut(&id) else {
                continue;
            };
            let mut any = false;
            for s in p.sides.iter_mut().filter(|s| wants_tx_kicks(s)) {
                any |= s.region.enable_notification(TX).unwrap_or(true);
            }
            if any && !self.busy.contains(&id) {
                self.busy.push_back(id);
                posted = true;
            }
        }
        match found {
            Some(id) => {
                if let Some(id) = id.filter(|id| !self.busy.contains(id)) {
                    self.busy.push_back(id);
                }
                true
            }
            None => {
                // Spun out (or others want the CPU): sleep, unless a post
                // came as the look ended.
                self.spin_until = None;
                posted
            }
        }
    }

    /// What the backend says changed: the connections of the channels it
    /// names are served next; link events are logged with the channels
    /// they touch.
    fn backend_news(&mut self) {
        self.backend.poll(&mut self.ready);
        for ch in self.ready.drain(..) {
            if let Some(&id) = self.by_chan.get(&ch) {
                if !self.busy.contains(&id) {
                    self.busy.push_back(id);
                }
            }
        }
        for (node, link, data) in self.backend.setup_due() {
            self.send_setup(node, link, data);
        }
        for ev in self.backend.link_events() {
            let on = self
                .pairs
                .values()
                .flat_map(|p| &p.sides)
                .filter(|s| crosses(s, ev.node, ev.link))
                .count();
            let (node, link) = (ev.node, ev.link);
            match ev.state {
                LinkState::Up => log::info!("link to node {node} up (link {link}, {on} channels)"),
                LinkState::Down => {
                    log::warn!("link to node {node} down (link {link}, {on} channels)")
                }
            }
            {
                let mut l = self.links.lock().unwrap_or_else(|p| p.into_inner());
                let e = l.seen.entry((node, link)).or_default();
                e.up = ev.state == LinkState::Up;
                e.changes += 1;
                if e.history.len() == LINK_HISTORY {
                    e.history.pop_front();
                }
                e.history.push_back((e.up, Instant::now(), on));
            }
            if ev.state == LinkState::Down {
                self.link_lost(node, link);
            }
        }
    }

    /// A link setup message to peer `node` (dropped without peers).
    fn send_setup(&mut self, node: u32, link: LinkId, data: Vec<u8>) {
        log::info!(
            "link {link} to node {node}: setting up ({} bytes)",
            data.len()
        );
        if let Some(p) = &self.peers {
            p.send(node, crate::peers::wire::Msg::Setup { link, data });
        }
    }

    fn command(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Stop => return false,
            Cmd::Peers(p) => self.peers = Some(p),
            Cmd::SetLink { node, link, up } => match self.backend.set_link(node, link, up) {
                Ok(()) => {
                    let state = if up {
                        "back in service"
                    } else {
                        "out of service"
                    };
                    log::info!("link to node {node} {state}");
                    self.backend_news();
                }
                Err(e) => log::warn!("link to node {node}: {e}"),
            },
            Cmd::PeerFailover {
                node,
                channel,
                words,
                closed,
                again,
            } => self.peer_failover(node, channel, words, closed, again),
            Cmd::Setup { node, msg } => {
                let out = self
                    .backend
                    .setup(node, msg.as_ref().map(|(l, m)| (*l, &m[..])));
                for (link, data) in out {
                    self.send_setup(node, link, data);
                }
                self.backend_news();
            }
            Cmd::PeerMigrate {
                node,
                channel,
                link,
                received,
                marked,
            } => self.peer_migrate(node, channel, link, received, marked),
            Cmd::Add {
                id,
                sides,
                counters,
            } => {
                let mk = |s: SideSpec| Side {
                    region: s.init.region,
                    kick: s.init.kick,
                    call: s.init.call,
                    ch: s.ch,
                    peer: s.peer,
                    end: s.end,
                    hov: s.hov,
                    words_sent: None,
                    heard: false,
                    opened: Instant::now(),
                    tx_pending: None,
                    unacked: VecDeque::new(),
                    sent: 0,
                    base: 0,
                    resend: VecDeque::new(),
                    migrating: None,
                    prev_ch: None,
                    migrate_said: (0, false),
                    given_up: Vec::new(),
                    discarded: 0,
                    reset_sent: false,
                    acked: 0,
                    received: 0,
                    failover: None,
                    mark_sent: false,
                    rx_marked: false,
                    reset_told: false,
                    gone: false,
                    orderly: false,
                    rx_waiting: false,
                    gone_at: None,
                    dead: false,
                };
                let on_kernel: Vec<bool> = sides.iter().map(|s| s.on_kernel).collect();
                if sides.is_empty() || sides.len() > 2 {
                    log::error!("connection {id}: {} sides", sides.len());
                    return true;
                }
                let pair = Pair {
                    sides: sides.into_iter().map(mk).collect(),
                    counters,
                };
                let mut opened = Vec::new();
                for side in &pair.sides {
                    // A remote channel's connection bits name one live
                    // connection (its moves keep them).
                    let taken = side.hov.is_some()
                        && self
                            .by_conn
                            .contains_key(&ssock_hwbackends::connection_of(side.ch));
                    let opened_now = if taken {
                        Err(BackendError::Busy(side.ch))
                    } else {
                        self.backend.open(side.ch, side.peer)
                    };
                    match opened_now {
                        Ok(()) => opened.push(side.ch),
                        Err(e) => {
                            // Bytes must never go where no channel is: the
                            // connection ends at once, both sides reset.
                            log::error!(
                                "connection {id}: the backend cannot open its channel: {e}"
                            );
                            for ch in opened {
                                self.backend.close(ch);
                            }
                            for side in &pair.sides {
                                match &side.hov {
                                    // Nothing moved yet: the connection
                                    // stays on kernel TCP (the other host
                                    // never hears this end's words).
                                    Some(h) => h
                                        .u32_at(layout::hov::CLAIM)
                                        .store(layout::CLAIM_KERNEL, Ordering::Release),
                                    None => {
                                        let _ = side.region.set_rx_flags(FLAG_RESET);
                                    }
                                }
                                let _ = side.call.notify();
                            }
                            return true;
                        }
                    }
                }
                for (s, side) in pair.sides.iter().enumerate() {
                    let fd = side.kick.as_raw_fd();
                    let ev = EpollEvent::new(EventSet::IN, (id << 1) | s as u64);
                    if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
                        log::error!("connection {id}: cannot watch kick fd: {e}");
                    }
                    self.by_chan.insert(side.ch, id);
                    if side.hov.is_some() {
                        self.by_conn
                            .insert(ssock_hwbackends::connection_of(side.ch), id);
                    }
                }
                if pair
                    .sides
                    .iter()
                    .any(|s| matches!(s.peer, Peer::Remote { .. }))
                {
                    self.remote.insert(id);
                }
                if pair.sides.iter().any(|s| s.hov.is_some() && s.end == 0) {
                    self.unheard.insert(id, 0);
                }
                if let Some(s) = pair.sides.iter().find(|s| s.hov.is_some()) {
                    // Relaxed: statistics.
                    pair.counters
                        .link
                        .store(u64::from(link_of(s.ch)), Ordering::Relaxed);
                }
                let mut pair = pair;
                self.born_on_kernel(id, &mut pair, &on_kernel);
                self.pairs.insert(id, pair);
                self.busy.push_back(id);
            }
            Cmd::SideGone { id, side, orderly } => {
                if let Some(p) = self.pairs.get_mut(&id) {
                    for s in p.sides.iter_mut().filter(|s| s.end == side) {
                        s.gone = true;
                        s.orderly = orderly;
                        s.gone_at = Some(Instant::now());
                    }
                    if p.sides.len() == 1 {
                        self.lingering.insert(id);
                    }
                    if !self.busy.contains(&id) {
                        self.busy.push_back(id);
                    }
                }
            }
        }
        true
    }

    /// Moves what can be moved for connection `id`; returns true if it
    /// should run again before sleeping (budget exhausted).
    fn pump(&mut self, id: u64) -> bool {
        let Some(mut pair) = self.pairs.remove(&id) else {
            return false;
        };
        // A bug in one connection's handling must not stop the engine for
        // everyone: that connection is dropped and its clients are reset.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.pump_pair(id, &mut pair)
        }));
        match r {
            Ok(Some(again)) => {
                self.pairs.insert(id, pair);
                again
            }
            Ok(None) => false,
            Err(_) => {
                log::error!("connection {id}: the engine panicked serving it; resetting it");
                for side in &pair.sides {
                    let _ = side.region.set_rx_flags(FLAG_RESET);
                    let _ = side.call.notify();
                }
                self.forget(id, &pair);
                false
            }
        }
    }

    /// One turn of pumping; None when the connection is finished and forgotten.
    fn pump_pair(&mut self, id: u64, pair: &mut Pair) -> Option<bool> {
        self.words_in(id, pair);
        self.unheard(id, pair);
        let mut again = false;
        let mut moved = false;
        for round in 0.. {
            if round == BUDGET {
                again = true;
                break;
            }
            let mut progress = false;
            for s in 0..pair.sides.len() {
                progress |= self.tx(id, pair, s);
            }
            for s in 0..pair.sides.len() {
                progress |= self.rx(id, pair, s);
            }
            moved |= progress;
            if progress {
                continue;
            }
            // Nothing moved: ask for kicks, then look once more (a post
            // that raced with enable_notification is seen here).
            // TX kicks are wanted while no TX buffer waits on the backend
            // window; RX kicks only while bytes wait for RX buffers (posted
            // RX buffers alone are no work: asking then would never sleep).
            let mut more = false;
            for s in 0..pair.sides.len() {
                let pending = self.backend.pending(pair.sides[s].ch) > 0;
                let side = &mut pair.sides[s];
                if side.dead || side.gone || side.failover.is_some() || side.migrating.is_some() {
                    // (A side that moved to its kernel socket is no work:
                    // what its client posted stays where it is.)
                    continue;
                }
                // (Bytes to send again first: their room is the news.)
                if wants_tx_kicks(side) {
                    more |= side.region.enable_notification(TX).unwrap_or(false);
                }
                if !side.rx_marked && pending {
                    more |= side.region.enable_notification(RX).unwrap_or(false);
                }
            }
            if !more {
                break;
            }
        }
        for side in &pair.sides {
            failover::end_of_gone(side);
        }
        self.words_out(pair);
        // A local pair ends when both sides went; a side alone here (its
        // peer on another host) only once its last bytes and its mark left.
        let alone = pair.sides.len() == 1;
        if alone && moved && pair.sides[0].gone_at.is_some() {
            // The other host still takes its bytes: it waits on.
            pair.sides[0].gone_at = Some(Instant::now());
        }
        if alone
            && pair.sides[0].gone_at.is_some_and(|t| t.elapsed() > LINGER)
            && !pair.sides[0].dead
        {
            // Its last bytes did not move for that long.
            log::warn!("connection {id}: the other host took nothing for {LINGER:?}; resetting it");
            self.reset_side(pair, 0);
        }
        self.failover_expire(id, pair);
        self.migrate_expire(id, pair);
        let finished = pair.sides.iter().all(|s| {
            s.dead
                || (s.gone
                    && (!alone
                        || s.failover.as_ref().map_or(
                            s.mark_sent
                                && s.tx_pending.is_none()
                                && s.migrating.is_none()
                                && s.resend.is_empty(),
                            |_| failover::agreed(s),
                        )))
        });
        if finished {
            self.forget(id, pair);
            return None;
        }
        Some(again)
    }

    /// Applies the words the other host's devd sent for the remote sides
    /// of `pair` to their hand-over pages, waking the client when one
    /// changed. Words that break the page's rules reset that side.
    fn words_in(&mut self, id: u64, pair: &mut Pair) {
        for s in 0..pair.sides.len() {
            let side = &mut pair.sides[s];
            let Some(hov) = side
                .hov
                .clone()
                .filter(|_| !side.dead && side.failover.is_none())
            else {
                continue;
            };
            let Some(w) = self.backend.recv_words(side.ch) else {
                continue;
            };
            if !side.heard {
                // The other side's first words: its channel is open, so
                // what this side said before may have found it closed.
                side.heard = true;
                side.words_sent = None;
            }
            match relay::apply(&hov, side.end, &w, side.sent) {
                Ok(true) => {
                    let _ = side.call.notify();
                }
                Ok(false) => {}
                Err(e) => {
                    log::warn!(
                        "connection {id}: the other host's hand-over words: {e}; resetting it"
                    );
                    self.reset_side(pair, s);
                }
            }
        }
    }

    /// A remote connector's side that heard nothing of the acceptor's side
    /// on the other host for `UNHEARD`, its link up all along (else it is
    /// moving to its kernel socket): that side ended before this one's
    /// channel opened (its words and end mark went to no channel there),
    /// so this side's READY never reached it and its writes never moved.
    /// The end mark Eos says so to the client (a kernel end it saw is the
    /// stream's), as the other side's own mark would have.
    fn unheard(&mut self, id: u64, pair: &mut Pair) {
        // (No hashing on the busy path when no side waits to be heard.)
        if self.unheard.is_empty() {
            return;
        }
        let Some(&looks) = self.unheard.get(&id) else {
            return;
        };
        let mut waiting = false;
        for side in pair
            .sides
            .iter_mut()
            .filter(|s| s.hov.is_some() && s.end == 0)
        {
            if side.heard
                || side.dead
                || side.rx_marked
                || side.failover.is_some()
                || side.migrating.is_some()
            {
                continue;
            }
            if side.opened.elapsed() < UNHEARD || looks < UNHEARD_LOOKS {
                waiting = true;
                continue;
            }
            log::info!(
                "connection {id}: nothing from the other host's side in {UNHEARD:?}: it ended before this one opened; its writes never moved"
            );
            let _ = side.region.set_rx_flags(FLAG_EOS);
            let _ = side.call.notify();
            side.rx_marked = true;
        }
        if !waiting {
            self.unheard.remove(&id);
        }
    }

    /// Sends the other host's devd the words each remote side's client
    /// wrote, when they changed.
    fn words_out(&mut self, pair: &mut Pair) {
        for s in 0..pair.sides.len() {
            self.side_words_out(&mut pair.sides[s]);
        }
    }

    /// [`Engine::words_out`] for one side.
    fn side_words_out(&mut self, side: &mut Side) {
        if side.failover.is_some() {
            self.failover_words_out(side);
            return;
        }
        if side.migrating.is_some() {
            // Said on the new link once there.
            return;
        }
        let Some(hov) = side.hov.as_ref().filter(|_| !side.dead) else {
            return;
        };
        let w = relay::ours(hov, side.end);
        if side.words_sent != Some(w) && self.backend.send_words(side.ch, w).is_ok() {
            side.words_sent = Some(w);
        }
    }

    /// Counts `n` bytes sent by end `from` of `pair`, there and in the
    /// engine's totals.
    fn count_bytes(&self, pair: &Pair, from: usize, n: usize) {
        QueuedCounters::add(&pair.counters.bytes[from], n as u64);
        QueuedCounters::add(&self.counts.bytes, n as u64);
    }

    /// Side `s` ends with a reset both ways (its client and the peer).
    fn reset_side(&mut self, pair: &mut Pair, s: usize) {
        reset(self.backend.as_mut(), &mut pair.sides[s]);
    }

    /// The link to `node` went down: every side whose channel crossed it
    /// moves to its kernel socket (`failover.rs`), or, with no peer devds
    /// to agree the offsets with, ends with a reset (its client sees
    /// ECONNRESET, nothing hangs).
    fn link_lost(&mut self, node: u32, link: LinkId) {
        // Moves onto that very link cannot complete: to TCP instead.
        let toward: Vec<u64> = self
            .pairs
            .iter()
            .filter(|(_, p)| {
                p.sides
                    .iter()
                    .any(|s| migrate::toward(s) == Some((node, link)))
            })
            .map(|(&id, _)| id)
            .collect();
        for id in toward {
            let Some(mut pair) = self.pairs.remove(&id) else {
                continue;
            };
            for s in 0..pair.sides.len() {
                if migrate::toward(&pair.sides[s]) == Some((node, link)) {
                    log::info!("connection {id}: the link it was moving onto went down too");
                    self.migration_failed(id, &mut pair, s);
                }
            }
            self.pairs.insert(id, pair);
            if !self.busy.contains(&id) {
                self.busy.push_back(id);
            }
        }
        // Which sides, decided before any is touched (a side reset here
        // must not change another's lot).
        let ids: Vec<(u64, Vec<usize>)> = self
            .pairs
            .iter()
            .filter_map(|(&id, p)| {
                let sides: Vec<usize> = (0..p.sides.len())
                    .filter(|&s| {
                        let s = &p.sides[s];
                        !s.dead
                            && s.failover.is_none()
                            && s.migrating.is_none()
                            && crosses(s, node, link)
                            && !self.drains_a_reset(s)
                    })
                    .collect();
                (!sides.is_empty()).then_some((id, sides))
            })
            .collect();
        let (mut moved, mut migrated) = (0, 0);
        for (id, sides) in &ids {
            let id = *id;
            let Some(mut pair) = self.pairs.remove(&id) else {
                continue;
            };
            for &s in sides {
                if pair.sides[s].migrating.is_some() {
                    continue;
                }
                if self.migrate(id, &mut pair, s, None) {
                    migrated += 1;
                } else if self.fail_over(id, &mut pair, s) {
                    moved += 1;
                } else {
                    self.failover_reset(&mut pair, s);
                }
            }
            self.pairs.insert(id, pair);
            if !self.busy.contains(&id) {
                self.busy.push_back(id);
            }
        }
        let all: usize = ids.iter().map(|(_, sides)| sides.len()).sum();
        if all > 0 {
            log::warn!(
                "link to node {node} lost (link {link}): {migrated} connections move onto another link, {moved} to their kernel sockets, {} reset",
                all.saturating_sub(moved + migrated)
            );
        }
    }

    /// Whether the other end's reset already came to `side`, behind bytes
    /// its reader has not taken yet: what is left of that stream is all on
    /// this host (its writer, gone, will send nothing again), so the side
    /// needs no link. It neither moves nor resets when its link fails: its
    /// reader takes those bytes, then the reset, as a TCP receiver keeps
    /// what came before an RST whatever the network does afterwards.
    /// (A reset the backend made up for channels that lost their peer
    /// comes with no bytes before it: those sides move.)
    fn drains_a_reset(&self, side: &Side) -> bool {
        !side.rx_marked
            && matches!(side.peer, Peer::Remote { .. })
            && self.backend.pending(side.ch) > 0
            && self.backend.mark_arrived(side.ch) == Some(Mark::Reset)
    }

    /// A connection made while its link is down (its devds agreed on it
    /// over their control connection: docs/protocol.md 8.6) starts on its
    /// kernel sockets, as one whose link failed at once: nothing moved
    /// yet, so each side pins its writer and the two hosts agree at
    /// region offset 0. Its sides reset where no peer devds can agree.
    /// `on_kernel`: per side, whether its devd made it so; a link that
    /// went down since (its event came before this connection) counts
    /// too, or no event would ever move it.
    fn born_on_kernel(&mut self, id: u64, pair: &mut Pair, on_kernel: &[bool]) {
        for s in 0..pair.sides.len() {
            let Peer::Remote { node, .. } = pair.sides[s].peer else {
                continue;
            };
            let down = {
                let l = self.links.lock().unwrap_or_else(|p| p.into_inner());
                l.seen
                    .get(&(node, link_of(pair.sides[s].ch)))
                    .is_some_and(|l| !l.up)
            };
            if !on_kernel.get(s).copied().unwrap_or(false) && !down {
                continue;
            }
            log::info!("connection {id}: made while the link to node {node} is down; on its kernel socket until the link is back");
            if self.fail_over(id, pair, s) {
                if let Some(f) = pair.sides[s].failover.as_mut() {
                    f.born = true;
                }
            } else {
                self.failover_reset(pair, s);
            }
        }
    }

    /// Stops watching a connection and closes its backend channels.
    fn forget(&mut self, id: u64, pair: &Pair) {
        self.remote.remove(&id);
        self.lingering.remove(&id);
        self.unheard.remove(&id);
        for side in &pair.sides {
            let fd = side.kick.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.backend.close(side.ch);
            self.by_chan.remove(&side.ch);
            let twin = migrate::open_twin(side);
            for &ch in side.given_up.iter().chain(twin.iter()) {
                self.backend.close(ch);
                self.by_chan.remove(&ch);
            }
            if side.hov.is_some()
                && self.by_conn.get(&ssock_hwbackends::connection_of(side.ch)) == Some(&id)
            {
                self.by_conn
                    .remove(&ssock_hwbackends::connection_of(side.ch));
            }
        }
    }

    fn violation(&mut self, id: u64, pair: &mut Pair, s: usize, what: &dyn std::fmt::Display) {
        log::warn!("connection {id}: side {s} broke the queue protocol ({what}); resetting it");
        self.reset_side(pair, s);
        QueuedCounters::add(&pair.counters.violation[pair.sides[s].end & 1], 1);
        QueuedCounters::add(&self.counts.violations, 1);
    }

    /// Gives back side `s`'s TX buffers whose bytes the peer side took
    /// (all of them when `all`: their bytes went nowhere, as to a closed
    /// TCP peer); returns whether any went back.
    fn give_back(&mut self, id: u64, pair: &mut Pair, s: usize, all: bool) -> bool {
        let acked = match self.backend.offsets(pair.sides[s].ch) {
            _ if all => u64::MAX,
            // (Not while it moves onto another link: what the old one
            // acknowledges now counts no more.)
            _ if pair.sides[s].migrating.is_some() => 0,
            Some(o) => {
                let acked = pair.sides[s].base + o.acked;
                let a = &pair.counters.acked[pair.sides[s].end & 1];
                a.store(acked, std::sync::atomic::Ordering::Relaxed);
                pair.sides[s].acked = acked;
                acked
            }
            None => u64::MAX,
        };
        let mut back = false;
        while let Some(&(buf, end)) = pair.sides[s].unacked.front() {
            if end > acked {
                break;
            }
            pair.sides[s].unacked.pop_front();
            if let Err(e) = pair.sides[s].region.add_used(TX, buf.head, 0) {
                self.violation(id, pair, s, &e);
                return true;
            }
            back = true;
        }
        back
    }

    fn tx(&mut self, id: u64, pair: &mut Pair, s: usize) -> bool {
        if pair.sides[s].dead
            || pair.sides[s].failover.is_some()
            || pair.sides[s].migrating.is_some()
        {
            return false;
        }
        let mut used = self.give_back(id, pair, s, false);
        if pair.sides[s].dead {
            return true;
        }
        let mut progress = used;
        if pair.sides[s].mark_sent {
            progress |= self.reset_after_end(pair, s);
            self.notify_used(pair, s, TX, used);
            return progress;
        }
        let ch = pair.sides[s].ch;
        let mut dropped = false;
        let (all_out, moved) = self.resend(id, pair, s);
        progress |= moved;
        if pair.sides[s].dead {
            return true;
        }
        if !all_out {
            // Still sending again what the old link lost (the new link's
            // ring had no room): nothing new yet; the backend names the
            // channel when room comes back.
            self.notify_used(pair, s, TX, used);
            return progress;
        }
        loop {
            let side = &mut pair.sides[s];
            let (buf, off) = match side.tx_pending.take() {
                Some(p) => p,
                None => match side.region.pop(TX) {
                    Ok(Some(b)) => (b, 0),
                    Ok(None) => break,
                    Err(e) => {
                        self.violation(id, pair, s, &e);
                        return true;
                    }
                },
            };
            let len = buf.len as usize;
            let (sent, bad) = send_buf(self.backend.as_mut(), ch, side, buf, off, len - off);
            if let Some(e) = bad {
                self.violation(id, pair, s, &e);
                return true;
            }
            let n = match sent {
                Ok(n) => n,
                // The peer is gone: the bytes have nowhere to go, like
                // writing to a closed TCP peer; the writer learns of it
                // from its control socket.
                Err(
                    BackendError::PeerGone(_)
                    | BackendError::Ended(_)
                    | BackendError::NoChannel(_)
                    | BackendError::Unreachable(_)
                    | BackendError::NoLink(_),
                ) => {
                    dropped = true;
                    len - off
                }
                Err(BackendError::Busy(_)) => 0,
            };
            self.count_bytes(pair, pair.sides[s].end & 1, n);
            if n > 0 {
                progress = true;
            }
            let side = &mut pair.sides[s];
            side.sent += n as u64;
            if off + n < len {
                side.tx_pending = Some((buf, off + n));
                break;
            }
            side.unacked.push_back((buf, side.sent));
            progress = true;
        }
        // A local peer's bytes need no holding here: the client keeps a
        // copy of what it wrote until its reader took it (TAKEN), which
        // covers devd itself going away; between hosts only the
        // acknowledgement tells that the bytes crossed.
        let local = matches!(pair.sides[s].peer, Peer::Local(_));
        used |= self.give_back(id, pair, s, dropped || local);
        if pair.sides[s].dead {
            return true;
        }
        self.notify_used(pair, s, TX, used);
        let side = &mut pair.sides[s];
        if side.tx_pending.is_none() {
            let flags = side.region.tx_flags();
            // (Both: its client shut its writes down, then closed
            // abortively, an abortive close sets no EOS: the end of stream
            // goes first, its reset after it, as the kernel's FIN and RST.)
            let mark = if flags & FLAG_EOS != 0 {
                Some(Mark::Eos)
            } else if flags & FLAG_RESET != 0 {
                Some(Mark::Reset)
            } else if side.gone {
                // Died or released without an end mark: abortive close,
                // unless its writes never moved into the region (a remote
                // end's: its stream ended on the kernel socket, which says
                // how; the other host's reader waits for this mark), or
                // its kernel socket was closed in order (its last holder
                // exited without a close: the kernel sent a FIN) with no
                // byte for it still waiting here or unread in its region
                // (unread bytes make the kernel's close a reset).
                let never = side.hov.as_ref().is_some_and(|h| {
                    matches!(
                        layout::switch_at(h, side.end),
                        layout::Switch::NotYet | layout::Switch::Never
                    )
                });
                let unread = self.backend.pending(side.ch) > 0 || side.region.rx_unread();
                Some(if never || (side.orderly && !unread) {
                    Mark::Eos
                } else {
                    Mark::Reset
                })
            } else {
                None
            };
            if let Some(m) = mark {
                // The mark was set after the last post: look once more.
                match side.region.pop(TX) {
                    Ok(Some(b)) => {
                        side.tx_pending = Some((b, 0));
                        return true;
                    }
                    Ok(None) => {
                        // The words first: a reader on another host that
                        // saw the kernel socket end learns from them
                        // whether this end's writes moved before its mark.
                        self.side_words_out(side);
                        let _ = self.backend.send_mark(ch, m);
                        side.mark_sent = true;
                        side.reset_sent = m == Mark::Reset;
                        progress = true;
                        self.reset_after_end(pair, s);
                    }
                    Err(e) => {
                        self.violation(id, pair, s, &e);
                        return true;
                    }
                }
            }
        }
        progress
    }

    /// A side that sent its end of stream and then closed abortively (its
    /// client set the reset flag: SO_LINGER 0, or bytes unread, where the
    /// kernel's close sends an RST after its FIN) sends that reset too,
    /// once. So does a side that went without a close after its end of stream
    /// (its writes shut down, then its last holder exited) while bytes for
    /// it wait here or unread in its region: the kernel's close of a
    /// socket with bytes unread is a reset.
    fn reset_after_end(&mut self, pair: &mut Pair, s: usize) -> bool {
        let side = &mut pair.sides[s];
        if side.reset_sent {
            return false;
        }
        let flags = side.region.tx_flags();
        let abortive = flags & FLAG_RESET != 0;
        // (Its client's own end of stream: not the Eos this engine gives a
        // side whose writes never moved, whose stream the kernel socket ends.)
        let left_unread = side.gone
            && !side.dead
            && flags & FLAG_EOS != 0
            && (self.backend.pending(side.ch) > 0 || side.region.rx_unread());
        if !abortive && !left_unread {
            return false;
        }
        side.reset_sent = true;
        let _ = self.backend.send_mark(side.ch, Mark::Reset);
        true
    }

    /// Tells side `s` queue `q` has used entries (`used`), unless it
    /// asked not to be told.
    fn notify_used(&mut self, pair: &mut Pair, s: usize, q: usize, used: bool) {
        let side = &mut pair.sides[s];
        if used && side.region.needs_notification(q).unwrap_or(true) {
            let _ = side.call.notify();
            self.called = true;
            QueuedCounters::add(&pair.counters.calls[pair.sides[s].end & 1], 1);
        } else if used {
            QueuedCounters::add(&pair.counters.calls_suppressed[pair.sides[s].end & 1], 1);
        }
    }

    fn rx(&mut self, id: u64, pair: &mut Pair, s: usize) -> bool {
        let ch = pair.sides[s].ch;
        let side = &mut pair.sides[s];
        if side.dead || side.failover.is_some() || side.migrating.is_some() {
            return false;
        }
        if side.rx_marked {
            // A reset after the end of stream its reader has (the end
            // stays; writes and SO_ERROR take EPIPE, as the kernel's).
            return self.tell_peer_reset(pair, s);
        }
        let mut progress = false;
        let mut used = false;
        if side.gone {
            // Nobody will read: discard so the peer's writes do not stall.
            while let Ok(Recv::Data(n)) = self.backend.recv(ch, &mut self.scratch) {
                if n == 0 {
                    break;
                }
                side.discarded += n as u64;
                progress = true;
            }
            return progress;
        }
        side.rx_waiting = false;
        loop {
            if self.backend.pending(ch) == 0 {
                let side = &mut pair.sides[s];
                if let Ok(Recv::Mark(m)) = self.backend.recv(ch, &mut []) {
                    let f = if m == Mark::Eos { FLAG_EOS } else { FLAG_RESET };
                    let _ = side.region.set_rx_flags(f);
                    let _ = side.call.notify();
                    side.rx_marked = true;
                    // (A reset that is the end itself is told by it.)
                    side.reset_told |= m == Mark::Reset;
                    progress = true;
                }
                break;
            }
            let buf = match pair.sides[s].region.pop(RX) {
                Ok(Some(b)) => b,
                Ok(None) => {
                    pair.sides[s].rx_waiting = true;
                    break;
                }
                Err(e) => {
                    self.violation(id, pair, s, &e);
                    return true;
                }
            };
            // From the backend's queue straight into the client's buffer.
            let want = buf.len as usize;
            let side = &mut pair.sides[s];
            let mut wrote = Ok(());
            let mut at = 0;
            let got = self.backend.recv_with(ch, &mut |piece| {
                // (A piece not taken whole, 0 after a failed write too,
                // is the last one shown.)
                let k = piece.len().min(want - at);
                if k == 0 {
                    return 0;
                }
                let Ok(part) = piece.subslice(0, k) else {
                    return 0;
                };
                wrote = side.region.write_from(buf.addr + at as u64, part);
                if wrote.is_err() {
                    return 0;
                }
                at += k;
                k
            });
            let n = match got {
                Ok(Recv::Data(n)) => n,
                _ => 0,
            };
            let len = u32::try_from(n).unwrap_or(u32::MAX);
            let added = wrote.and_then(|_| side.region.add_used(RX, buf.head, len));
            if let Err(e) = added {
                self.violation(id, pair, s, &e);
                return true;
            }
            side.received += n as u64;
            if side.hov.is_some() {
                // The other end's bytes: its own engine, on its host,
                // counts them there.
                let from = 1 - (side.end & 1);
                self.count_bytes(pair, from, n);
            }
            used = true;
            progress = true;
        }
        // (Bytes are left only when its reader has no buffer posted:
        // `rx_waiting`; a pass that took everything asks the backend
        // nothing more.)
        if pair.sides[s].rx_waiting || pair.sides[s].rx_marked {
            progress |= self.tell_peer_reset(pair, s);
        }
        self.notify_used(pair, s, RX, used);
        progress
    }

    /// Side `s`'s reader learns of its peer's reset as soon as it came (a
    /// writer must not go on as if the peer were there), before the
    /// bytes that came first, or after the end of stream it read: once.
    fn tell_peer_reset(&mut self, pair: &mut Pair, s: usize) -> bool {
        let side = &mut pair.sides[s];
        if side.reset_told || self.backend.mark_arrived(side.ch) != Some(Mark::Reset) {
            return false;
        }
        let after_end = if self.backend.end_before_reset(side.ch) {
            FLAG_RESET_AFTER_EOS
        } else {
            0
        };
        let _ = side.region.set_rx_flags(FLAG_PEER_RESET | after_end);
        let _ = side.call.notify();
        side.reset_told = true;
        true
    }
}
