//! Peer devds: one authenticated TCP control connection to each peer the
//! config lists, kept by a thread of its own (its own seccomp filter: a
//! hostile host reaches this thread first). The devd with the lower node
//! id dials, the other listens (`peer_listen`); both prove they hold the
//! link's key (`wire.rs`), then ping each other every second; a peer
//! silent for 3 s is down and dialled again, backing off from 100 ms to
//! 5 s. A connection that fails the handshake (unknown node, wrong key or
//! version, garbage, too slow) is closed and counted by reason.
//!
//! Never here: client sessions, regions, anything a peer says acted on
//! before its connection proved the key.

#[cfg(test)]
mod tests;
pub mod wire;

use crate::config::PeerConfig;
use crate::sandbox::ThreadKind;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use wire::{Msg, NONCE};

/// How often an up connection pings.
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// A peer not heard from for this long is down.
pub const SILENT: Duration = Duration::from_secs(3);
/// How long a handshake may take.
pub const HANDSHAKE: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Connections not yet known to be a peer's, at most.
const MAX_PENDING: usize = 16;

/// One change of a peer's link as the stats show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkChangeJson {
    /// Which of the links to the peer.
    pub link: u8,
    /// "up" or "down".
    pub state: &'static str,
    /// Milliseconds ago.
    pub ago_ms: u64,
    /// How many connection channels crossed the link then.
    pub channels: usize,
}

/// One link to a peer as the stats show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkJson {
    /// Which (0 first).
    pub link: u8,
    /// What it goes over: "ivshmem PATH", "vfio PCI-ADDRESS" or "verbs
    /// DEVICE".
    pub over: String,
    /// "up" or "down".
    pub state: &'static str,
    /// Times it came up or went down.
    pub changes: u64,
}

/// One configured peer as the stats show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerJson {
    /// Its node id.
    pub node: u32,
    /// Its control address.
    pub address: String,
    /// "up", "handshake" or "down".
    pub state: &'static str,
    /// Milliseconds since it was last heard from (none: never).
    pub heard_ms_ago: Option<u64>,
    /// Times its connection came up.
    pub ups: u64,
    /// The last reason it went down or could not be reached.
    pub last_error: String,
    /// Its interconnect (ntb): "up" while a link to it is, "down", or
    /// none configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<&'static str>,
    /// Times its links came up or went down, in all.
    pub link_changes: u64,
    /// Each link, in the config's order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkJson>,
    /// Their last changes, newest first (at most 8 per link).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub link_history: Vec<LinkChangeJson>,
    /// The listeners its devd advertised (while up): the first
    /// `SHOWN_LISTENERS` of them ...
    pub listeners: Vec<String>,
    /// ... and how many there are.
    pub listeners_total: usize,
}

/// Listeners of a peer the statistics list by address (a Stats reply must
/// fit one control frame).
pub const SHOWN_LISTENERS: usize = 16;
/// How often at most the peers hear of a change of this devd's listeners.
const TELL_EVERY: Duration = Duration::from_millis(200);
/// Bytes waiting to go to a peer, at most (more: it stopped reading).
const MAX_OUTBOX: usize = 1 << 20;

/// What the thread shares with the control thread's statistics.
#[derive(Debug, Default)]
pub struct Status {
    /// Per configured peer.
    pub peers: Vec<PeerJson>,
    /// Per configured peer, the listeners it advertised.
    pub lists: Vec<Vec<SocketAddr>>,
    /// Connections refused, by reason.
    pub refused: BTreeMap<&'static str, u64>,
}

/// What a peer said that the control thread acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Peer `node`'s devd advertised these listeners (none: it is down).
    Listeners {
        /// The peer.
        node: u32,
        /// Its listeners, as it registered them.
        addrs: Vec<SocketAddr>,
    },
    /// Peer `node`'s control connection came up or went down.
    Link {
        /// The peer.
        node: u32,
        /// Up now.
        up: bool,
    },
    /// An acceptor on peer `node` claimed a connection from this host.
    Claim {
        /// The peer.
        node: u32,
        /// The connector's address.
        from: SocketAddr,
        /// The acceptor's address.
        to: SocketAddr,
        /// The connection's channel.
        channel: u64,
    },
    /// Peer `node` answered this devd's Claim on `channel`.
    Claimed {
        /// The peer.
        node: u32,
        /// The Claim's channel.
        channel: u64,
        /// What became of it.
        answer: wire::Answer,
    },
    /// Peer `node` moves the connection on `channel` to its kernel socket
    /// (`Msg::Failover`): for the engine.
    Failover {
        /// The peer.
        node: u32,
        /// The connection's channel.
        channel: u64,
        /// Its end's hand-over words.
        words: [u64; 4],
        /// Where it closed the direction it reads, once it did.
        closed: Option<u64>,
    },
    /// Peer `node`'s setup message for link `link` (`Msg::Setup`): for
    /// the engine's backend.
    Setup {
        /// The peer.
        node: u32,
        /// The link.
        link: u8,
        /// The backend's message.
        data: Vec<u8>,
    },
    /// Peer `node` moves the connection on `channel` onto another link
    /// (`Msg::Migrate`): for the engine.
    Migrate {
        /// The peer.
        node: u32,
        /// The connection's channel on the failed link.
        channel: u64,
        /// The link it moves to, once the peer has it.
        link: Option<u8>,
        /// What the peer's end was given of this end's stream.
        received: u64,
        /// With this end's mark.
        marked: bool,
    },
    /// Peer `node` offers the moved connection on channel `old` a new
    /// region on channel `new` (`Msg::Forward`).
    Forward {
        /// The peer.
        node: u32,
        /// The moved connection's channel.
        old: u64,
        /// The new channel.
        new: u64,
    },
    /// Peer `node` answered this devd's Forward on channel `channel`.
    Forwarded {
        /// The peer.
        node: u32,
        /// The new channel.
        channel: u64,
        /// Its end is open there.
        ok: bool,
    },
    /// Peer `node`'s devd, started again, asks for the connection between
    /// `sender` (its end's address) and `receiver` (this host's end's)
    /// on behalf of its end's process (`Msg::Rejoin`).
    Rejoin {
        /// The peer.
        node: u32,
        /// Its end's local address.
        sender: std::net::SocketAddr,
        /// This host's end's local address.
        receiver: std::net::SocketAddr,
        /// Its end's words.
        words: [u64; 4],
    },
    /// Peer `node` answered this devd's Rejoin.
    Rejoined {
        /// The peer.
        node: u32,
        /// The Rejoin's sender address (this host's end's).
        sender: std::net::SocketAddr,
        /// Its receiver address (the peer's end's).
        receiver: std::net::SocketAddr,
        /// The connection's channel, if the peer has it.
        channel: Option<u64>,
    },
}

/// What another thread (the engine) holds to send peers messages.
#[derive(Clone)]
pub struct Sender {
    outbox: Arc<Mutex<Vec<(u32, Msg)>>>,
    wake: Arc<vmm_sys_util::eventfd::EventFd>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("peers::Sender")
    }
}

impl Sender {
    /// Sends `m` to peer `node` if it is up (dropped otherwise).
    pub fn send(&self, node: u32, m: Msg) {
        self.outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((node, m));
        let _ = self.wake.write(1);
    }
}

#[cfg(test)]
impl Sender {
    /// A sender whose messages nobody takes: the engine's side of a
    /// fail-over whose other host never answers.
    pub(crate) fn unheard() -> Sender {
        Sender {
            outbox: Arc::default(),
            wake: Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        }
    }
}

/// The control thread's handle on the peer thread.
pub struct Handle {
    status: Arc<Mutex<Status>>,
    /// What peers said, for the control thread, and its wake-up.
    events: Arc<Mutex<Vec<Event>>>,
    news: Arc<vmm_sys_util::eventfd::EventFd>,
    /// Messages for peers, by node.
    outbox: Arc<Mutex<Vec<(u32, Msg)>>>,
    stop: Arc<vmm_sys_util::eventfd::EventFd>,
    /// This devd's listeners to advertise, and the thread's wake-up.
    ours: Arc<Mutex<Vec<SocketAddr>>>,
    wake: Arc<vmm_sys_util::eventfd::EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    /// A copy of the status.
    pub fn status(&self) -> (Vec<PeerJson>, BTreeMap<&'static str, u64>) {
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let mut peers = s.peers.clone();
        for (p, l) in peers.iter_mut().zip(&s.lists) {
            p.listeners = l
                .iter()
                .take(SHOWN_LISTENERS)
                .map(ToString::to_string)
                .collect();
            p.listeners_total = l.len();
        }
        (peers, s.refused.clone())
    }

    /// This devd's listeners are now `l`: the peers hear of it.
    pub fn advertise(&self, l: Vec<SocketAddr>) {
        *self.ours.lock().unwrap_or_else(|p| p.into_inner()) = l;
        let _ = self.wake.write(1);
    }

    /// Sends `m` to peer `node` if it is up (dropped otherwise).
    pub fn send(&self, node: u32, m: Msg) {
        self.sender().send(node, m);
    }

    /// A sender of messages to peers, for another thread.
    pub fn sender(&self) -> Sender {
        Sender {
            outbox: self.outbox.clone(),
            wake: self.wake.clone(),
        }
    }

    /// The fd that becomes readable when peers said something
    /// (`take_events`).
    pub fn news_fd(&self) -> std::os::fd::RawFd {
        self.news.as_raw_fd()
    }

    /// What peers said since the last call.
    pub fn take_events(&self) -> Vec<Event> {
        let _ = self.news.read();
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether the thread still runs.
    pub fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the peer thread for `peers` as node `node`, accepting on
/// `listener` (bound before the sandbox).
pub fn spawn(
    node: u32,
    peers: Vec<PeerConfig>,
    listener: Option<TcpListener>,
    sandbox: Option<crate::sandbox::Mode>,
) -> io::Result<Handle> {
    let status = Arc::new(Mutex::new(Status {
        peers: peers
            .iter()
            .map(|p| PeerJson {
                node: p.node,
                address: p.address.to_string(),
                state: "down",
                heard_ms_ago: None,
                ups: 0,
                last_error: String::new(),
                link: None,
                link_changes: 0,
                links: Vec::new(),
                link_history: Vec::new(),
                listeners: Vec::new(),
                listeners_total: 0,
            })
            .collect(),
        lists: vec![Vec::new(); peers.len()],
        refused: BTreeMap::new(),
    }));
    let stop = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?);
    let wake = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?);
    let ours: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let news = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?);
    let outbox: Arc<Mutex<Vec<(u32, Msg)>>> = Arc::default();
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, WAKE),
    )?;
    if let Some(l) = &listener {
        l.set_nonblocking(true)?;
        epoll.ctl(
            ControlOperation::Add,
            l.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTEN),
        )?;
    }
    let (st, sp, wk, ou) = (status.clone(), stop.clone(), wake.clone(), ours.clone());
    let (ev, nw, ob) = (events.clone(), news.clone(), outbox.clone());
    let thread = crate::sandbox::spawn_sandboxed(
        ThreadKind::Peers,
        "ssock-peers",
        sandbox,
        Vec::new(),
        move || {
            let now = Instant::now();
            let mut t = Thread {
                node,
                slots: peers
                    .into_iter()
                    .map(|cfg| Slot {
                        cfg,
                        conn: None,
                        next_dial: now,
                        backoff: BACKOFF_MIN,
                        heard: None,
                    })
                    .collect(),
                pending: Vec::new(),
                listener,
                epoll,
                status: st,
                next_token: FIRST_CONN,
                accept_paused: None,
                ours: ou,
                told: Vec::new(),
                dirty: false,
                told_at: None,
                events: ev,
                news: nw,
                outbox: ob,
            };
            t.run(&sp, &wk);
        },
    )?;
    Ok(Handle {
        status,
        events,
        news,
        outbox,
        stop,
        ours,
        wake,
        thread: Some(thread),
    })
}

const STOP: u64 = 0;
const LISTEN: u64 = 1;
const WAKE: u64 = 2;
const FIRST_CONN: u64 = 16;

/// One TCP connection, before and after its handshake.
struct Conn {
    stream: TcpStream,
    token: u64,
    /// The slot it serves: the one dialled, or (accepted) the one its
    /// Hello named; it becomes that slot's connection only once verified.
    slot: Option<usize>,
    /// A dial not answered yet (watched for EPOLLOUT; no Hello sent).
    connecting: bool,
    buf: Vec<u8>,
    mine: [u8; NONCE],
    /// The peer's node and nonce, once its Hello came.
    theirs: Option<(u32, [u8; NONCE])>,
    verified: bool,
    /// Its frames' sealing, once both proofs were exchanged.
    session: Option<wire::Session>,
    /// Bytes not written yet (the socket was full).
    out: Vec<u8>,
    /// The listeners it advertised, kept until it is its slot's.
    listeners: Option<Vec<SocketAddr>>,
    /// Claims and answers it sent, for the control thread.
    got: Vec<Msg>,
    began: Instant,
    heard: Instant,
    pinged: Instant,
}

struct Slot {
    cfg: PeerConfig,
    conn: Option<Conn>,
    next_dial: Instant,
    backoff: Duration,
    heard: Option<Instant>,
}

struct Thread {
    node: u32,
    slots: Vec<Slot>,
    /// Accepted connections whose Hello has not named a peer yet.
    pending: Vec<Conn>,
    listener: Option<TcpListener>,
    epoll: Epoll,
    status: Arc<Mutex<Status>>,
    next_token: u64,
    /// Accepting stopped until then (an accept failed).
    accept_paused: Option<Instant>,
    /// This devd's listeners (set by the control thread), and what the
    /// up peers were last told.
    ours: Arc<Mutex<Vec<SocketAddr>>>,
    told: Vec<SocketAddr>,
    /// A change not told yet, and when the peers were last told one.
    dirty: bool,
    told_at: Option<Instant>,
    /// See `Handle`.
    events: Arc<Mutex<Vec<Event>>>,
    news: Arc<vmm_sys_util::eventfd::EventFd>,
    outbox: Arc<Mutex<Vec<(u32, Msg)>>>,
}

/// How a connection ended.
enum End {
    /// Refused during the handshake, counted under this reason.
    Refused(&'static str, String),
    /// Closed, hung up or silent after it was up (or while dialling).
    Lost(String),
}

impl Thread {
    fn run(
        &mut self,
        stop: &vmm_sys_util::eventfd::EventFd,
        wake: &vmm_sys_util::eventfd::EventFd,
    ) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            self.timers();
            self.publish();
            let wait = self.next_wake().saturating_duration_since(Instant::now());
            let ms = i32::try_from(wait.as_millis().clamp(1, 1000)).unwrap_or(1000);
            let n = match self.epoll.wait(ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("peer thread: epoll_wait failed, peers stop: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP => {
                        let _ = stop.read();
                        return;
                    }
                    LISTEN => self.accept(),
                    WAKE => {
                        let _ = wake.read();
                        self.dirty = true;
                        self.send_outbox();
                    }
                    token => self.readable(token),
                }
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut t = now + Duration::from_secs(1);
        if self.dirty {
            t = t.min(self.told_at.map_or(now, |x| x + TELL_EVERY));
        }
        for s in &self.slots {
            match &s.conn {
                None if self.dials(s) => t = t.min(s.next_dial),
                Some(c) if c.verified => t = t.min(c.pinged + PING_EVERY),
                Some(c) => t = t.min(c.began + HANDSHAKE),
                None => {}
            }
        }
        t
    }

    /// Whether this devd dials `s` (the lower node id dials).
    fn dials(&self, s: &Slot) -> bool {
        self.node < s.cfg.node
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// A connection accepted (`connecting` false: it says Hello at once)
    /// or being dialled (watched for its connect to end).
    fn new_conn(&mut self, stream: TcpStream, connecting: bool) -> io::Result<Conn> {
        stream.set_nonblocking(true)?;
        let mut mine = [0u8; NONCE];
        ssock_rings::sys::random(&mut mine)?;
        let token = self.token();
        let events = if connecting {
            EventSet::OUT
        } else {
            open_events()
        };
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(events, token),
        )?;
        let now = Instant::now();
        let mut c = Conn {
            stream,
            token,
            slot: None,
            connecting,
            buf: Vec::new(),
            mine,
            theirs: None,
            verified: false,
            session: None,
            out: Vec::new(),
            listeners: None,
            got: Vec::new(),
            began: now,
            heard: now,
            pinged: now,
        };
        if !connecting {
            self.start(&mut c)?;
        }
        Ok(c)
    }

    /// A connection that is open: it says Hello.
    fn start(&mut self, c: &mut Conn) -> io::Result<()> {
        c.connecting = false;
        c.stream.set_nodelay(true)?;
        self.epoll.ctl(
            ControlOperation::Modify,
            c.stream.as_raw_fd(),
            EpollEvent::new(open_events(), c.token),
        )?;
        send(
            c,
            &Msg::Hello {
                version: wire::VERSION,
                node: self.node,
                nonce: c.mine,
            },
        )
    }

    fn accept(&mut self) {
        loop {
            let Some(l) = &self.listener else { return };
            let (stream, from) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and the like: the listener stays readable; stop
                    // looking at it for a second instead of spinning.
                    log::warn!("peer thread: accept failed ({e}); pausing for 1 s");
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        l.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.accept_paused = Some(Instant::now() + Duration::from_secs(1));
                    return;
                }
            };
            // Only the addresses of peers that dial this devd get as far as
            // a handshake.
            let known = self
                .slots
                .iter()
                .any(|s| !self.dials(s) && s.cfg.address.ip() == from.ip());
            if !known {
                drop(stream);
                self.count("unknown_address", &format!("from {from}"));
                continue;
            }
            if self.pending.len() >= MAX_PENDING {
                self.count("too_many_pending", &format!("from {from}"));
                continue;
            }
            match self.new_conn(stream, false) {
                Ok(c) => self.pending.push(c),
                Err(e) => log::warn!("peer thread: connection from {from}: {e}"),
            }
        }
    }

    fn timers(&mut self) {
        enum Due {
            Dial,
            Silent,
            Unanswered,
            Late,
            Ping,
        }
        let now = Instant::now();
        if self.dirty
            && self
                .told_at
                .is_none_or(|t| now.duration_since(t) >= TELL_EVERY)
        {
            self.dirty = false;
            self.told_at = Some(now);
            self.tell_listeners();
        }
        if self.accept_paused.is_some_and(|t| now >= t) {
            self.accept_paused = None;
            if let Some(l) = &self.listener {
                let _ = self.epoll.ctl(
                    ControlOperation::Add,
                    l.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, LISTEN),
                );
            }
        }
        for i in 0..self.slots.len() {
            let s = &self.slots[i];
            let due = match &s.conn {
                None if self.dials(s) && now >= s.next_dial => Due::Dial,
                Some(c) if c.verified && now.duration_since(c.heard) > SILENT => Due::Silent,
                Some(c) if c.connecting && now.duration_since(c.began) > HANDSHAKE => {
                    Due::Unanswered
                }
                Some(c) if !c.verified && now.duration_since(c.began) > HANDSHAKE => Due::Late,
                Some(c) if c.verified && now.duration_since(c.pinged) >= PING_EVERY => Due::Ping,
                _ => continue,
            };
            match due {
                Due::Dial => self.dial(i),
                Due::Silent => self.lose(i, End::Lost(format!("silent for {SILENT:?}"))),
                Due::Unanswered => {
                    let addr = self.slots[i].cfg.address;
                    self.lose(
                        i,
                        End::Lost(format!("dial {addr}: no answer in {HANDSHAKE:?}")),
                    );
                }
                Due::Late => self.lose(i, End::Refused("timeout", "no handshake in time".into())),
                Due::Ping => {
                    let Some(c) = self.slots[i].conn.as_mut() else {
                        continue;
                    };
                    c.pinged = now;
                    if let Err(e) = send(c, &Msg::Ping) {
                        self.lose(i, End::Lost(format!("ping: {e}")));
                    }
                }
            }
        }
        let (late, keep): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|c| now.duration_since(c.began) > HANDSHAKE);
        self.pending = keep;
        for c in late {
            self.close(c);
            self.count("timeout", "an accepted connection sent no Hello");
        }
    }

    /// Starts a connect to slot `i`'s peer without waiting for it: its end
    /// comes as EPOLLOUT (`readable`), or the handshake time runs out.
    fn dial(&mut self, i: usize) {
        let addr: SocketAddr = self.slots[i].cfg.address;
        let r = (|| {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
            match s.connect(&addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            self.new_conn(TcpStream::from(s), true)
        })();
        let s = &mut self.slots[i];
        match r {
            Ok(mut c) => {
                c.slot = Some(i);
                s.conn = Some(c);
            }
            Err(e) => {
                s.next_dial = Instant::now() + s.backoff;
                s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
                self.set_error(i, format!("dial {addr}: {e}"));
            }
        }
    }

    fn readable(&mut self, token: u64) {
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.conn.as_ref().is_some_and(|c| c.token == token))
        {
            let mut c = self.slots[i].conn.take().expect("found above");
            if c.connecting {
                // The connect ended: an error, or open (say Hello).
                let r = match c.stream.take_error() {
                    Ok(None) => self.start(&mut c),
                    Ok(Some(e)) | Err(e) => Err(e),
                };
                self.slots[i].conn = Some(c);
                if let Err(e) = r {
                    let addr = self.slots[i].cfg.address;
                    self.lose(i, End::Lost(format!("dial {addr}: {e}")));
                }
                return;
            }
            let r = flush(&mut c).map_err(|e| End::Lost(format!("write: {e}")));
            let r = r.and_then(|()| self.serve(&mut c));
            if let Some(l) = c.listeners.take() {
                self.set_listeners(i, l);
            }
            let got = std::mem::take(&mut c.got);
            self.slots[i].conn = Some(c);
            self.tell_control(i, got);
            match r {
                Ok(true) => self.came_up(i),
                Ok(false) => {}
                Err(end) => self.lose(i, end),
            }
            return;
        }
        let Some(k) = self.pending.iter().position(|c| c.token == token) else {
            return;
        };
        let mut c = self.pending.swap_remove(k);
        match self.serve(&mut c) {
            Ok(true) => {
                // It proved the key of the peer its Hello named: it is that
                // slot's connection now (an older one is replaced: the
                // peer started again). Before its proof it replaces nothing.
                let Some(i) = c.slot else {
                    return self.close(c);
                };
                if let Some(old) = self.slots[i].conn.take() {
                    self.close(old);
                }
                let l = c.listeners.take().unwrap_or_default();
                let got = std::mem::take(&mut c.got);
                self.slots[i].conn = Some(c);
                self.set_listeners(i, l);
                self.came_up(i);
                self.tell_control(i, got);
            }
            Ok(false) => self.pending.push(c),
            Err(End::Refused(why, what)) => {
                self.close(c);
                self.count(why, &what);
            }
            Err(End::Lost(_)) => self.close(c),
        }
    }

    /// Reads what arrived on `c` and answers it; whether it proved itself
    /// just now.
    fn serve(&mut self, c: &mut Conn) -> Result<bool, End> {
        let mut chunk = [0u8; 4096];
        // What came before a hang-up is still read (a refusal's reason, a
        // proof), then the hang-up counts.
        let mut eof = false;
        let was_verified = c.verified;
        // Edge-triggered: read until the socket is empty, a frame's worth
        // at a time, each taken in before more is read.
        loop {
            let mut full = false;
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(End::Lost(e.to_string())),
                }
                if c.buf.len() > wire::MAX_FRAME + 8 {
                    full = true;
                    break;
                }
            }
            loop {
                let body = match wire::take(&mut c.buf) {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(e) => return Err(End::Refused("malformed", e.to_string())),
                };
                // After the proofs every frame is sealed; a frame that does not
                // open is an intruder's (or damage): the connection ends.
                let m = match &mut c.session {
                    Some(s) => s
                        .open(&body)
                        .map_err(|e| End::Refused("bad_seal", e.to_string()))?,
                    None => {
                        wire::parse(&body).map_err(|e| End::Refused("malformed", e.to_string()))?
                    }
                };
                c.heard = Instant::now();
                match m {
                    Msg::Hello {
                        version,
                        node,
                        nonce,
                    } => {
                        if c.theirs.is_some() {
                            return Err(End::Refused("malformed", "a second Hello".into()));
                        }
                        if version != wire::VERSION {
                            return Err(End::Refused(
                                "version",
                                format!(
                                    "node {node} speaks version {version}, not {}",
                                    wire::VERSION
                                ),
                            ));
                        }
                        let Some(i) = self.slots.iter().position(|s| s.cfg.node == node) else {
                            return Err(End::Refused("unknown_node", format!("node {node}")));
                        };
                        // A dialled connection must reach the node dialled; an
                        // accepted one must come from a node that dials us.
                        let right = match c.slot {
                            Some(k) => k == i,
                            None => !self.dials(&self.slots[i]),
                        };
                        if !right || node == self.node {
                            return Err(End::Refused(
                                "unknown_node",
                                format!("node {node} on this connection"),
                            ));
                        }
                        c.theirs = Some((node, nonce));
                        c.slot = Some(i);
                        let key = &self.slots[i].cfg.key;
                        let proof = wire::prove(key, self.node, node, &nonce, &c.mine);
                        send(c, &Msg::Proof(proof)).map_err(|e| End::Lost(e.to_string()))?;
                    }
                    Msg::Proof(p) => {
                        let (Some((node, theirs)), Some(i)) = (c.theirs, c.slot) else {
                            return Err(End::Refused("malformed", "a Proof before a Hello".into()));
                        };
                        if c.verified {
                            return Err(End::Refused("malformed", "a second Proof".into()));
                        }
                        let key = &self.slots[i].cfg.key;
                        if !wire::check(key, node, self.node, &c.mine, &theirs, &p) {
                            return Err(End::Refused("bad_proof", format!("node {node}")));
                        }
                        c.verified = true;
                        // Both proofs are out (this side's went at the Hello):
                        // from here on both seal.
                        c.session =
                            Some(wire::Session::new(key, self.node, node, &c.mine, &theirs));
                    }
                    Msg::Ping if c.verified => {}
                    Msg::Listeners(l) if c.verified => c.listeners = Some(l),
                    m @ (Msg::Claim { .. }
                    | Msg::Claimed { .. }
                    | Msg::Failover { .. }
                    | Msg::Migrate { .. }
                    | Msg::Setup { .. }
                    | Msg::Rejoin { .. }
                    | Msg::Rejoined { .. }
                    | Msg::Forward { .. }
                    | Msg::Forwarded { .. })
                        if c.verified =>
                    {
                        c.got.push(m)
                    }
                    Msg::Claim { .. }
                    | Msg::Claimed { .. }
                    | Msg::Failover { .. }
                    | Msg::Migrate { .. }
                    | Msg::Setup { .. }
                    | Msg::Rejoin { .. }
                    | Msg::Rejoined { .. }
                    | Msg::Forward { .. }
                    | Msg::Forwarded { .. } => {
                        return Err(End::Refused(
                            "malformed",
                            "a Claim, Claimed, Failover, Migrate, Setup, Rejoin or Forward before the handshake"
                                .into(),
                        ));
                    }
                    Msg::Listeners(_) => {
                        return Err(End::Refused(
                            "malformed",
                            "Listeners before the handshake".into(),
                        ));
                    }
                    Msg::Ping => {
                        return Err(End::Refused(
                            "malformed",
                            "a Ping before the handshake".into(),
                        ));
                    }
                }
            }
            if c.buf.len() > wire::MAX_FRAME + 8 {
                return Err(End::Refused("malformed", "an oversized frame".into()));
            }
            if !full {
                break;
            }
        }
        if eof {
            return Err(End::Lost("hung up".into()));
        }
        if let Some(i) = c.slot.filter(|_| c.verified) {
            self.slots[i].heard = Some(c.heard);
        }
        Ok(c.verified && !was_verified)
    }

    /// Tells every up peer this devd's listeners, if they changed since.
    fn tell_listeners(&mut self) {
        let now = self.ours.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if now == self.told {
            return;
        }
        self.told = now.clone();
        for i in 0..self.slots.len() {
            self.tell(i, &now);
        }
    }

    /// Tells peer `i` (if up) that this devd's listeners are `l`.
    fn tell(&mut self, i: usize, l: &[SocketAddr]) {
        if l.len() > wire::MAX_LISTENERS {
            log::warn!(
                "{} listeners: the peers hear of the first {}",
                l.len(),
                wire::MAX_LISTENERS
            );
        }
        let m = Msg::Listeners(l.to_vec());
        let Some(c) = self.slots[i].conn.as_mut().filter(|c| c.verified) else {
            return;
        };
        if let Err(e) = send(c, &m) {
            self.lose(i, End::Lost(format!("listeners: {e}")));
        }
    }

    /// Slot `i`'s connection just proved itself.
    fn came_up(&mut self, i: usize) {
        self.slots[i].heard = Some(Instant::now());
        self.slots[i].backoff = BACKOFF_MIN;
        log::info!(
            "peer node {} up ({})",
            self.slots[i].cfg.node,
            self.slots[i].cfg.address
        );
        {
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = st.peers.get_mut(i) {
                p.ups += 1;
            }
        }
        let node = self.slots[i].cfg.node;
        self.post(vec![Event::Link { node, up: true }]);
        // The newest set (a change not told the others yet reaches them at
        // the wake-up that is on its way).
        let now = self.ours.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.tell(i, &now);
    }

    fn lose(&mut self, i: usize, end: End) {
        let was_up = self.slots[i].conn.as_ref().is_some_and(|c| c.verified);
        if let Some(c) = self.slots[i].conn.take() {
            self.close(c);
        }
        let s = &mut self.slots[i];
        s.next_dial = Instant::now() + s.backoff;
        s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
        let node = s.cfg.node;
        let what = match end {
            End::Refused(why, what) => {
                self.count(why, &what);
                format!("refused ({why}): {what}")
            }
            End::Lost(what) => what,
        };
        if was_up {
            log::warn!("peer node {node} down: {what}");
            self.post(vec![Event::Link { node, up: false }]);
        }
        self.set_listeners(i, Vec::new());
        self.set_error(i, what);
    }

    fn close(&mut self, c: Conn) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            c.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Peer `i`'s devd advertised `l` (on the slot's own connection).
    /// The control thread hears of it before the statistics show it (a
    /// Stats request takes in what was posted first: what it shows, the
    /// board has).
    fn set_listeners(&mut self, i: usize, l: Vec<SocketAddr>) {
        let changed = {
            let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            st.lists.get(i).is_some_and(|x| *x != l)
        };
        if changed {
            let node = self.slots[i].cfg.node;
            self.post(vec![Event::Listeners {
                node,
                addrs: l.clone(),
            }]);
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(x) = st.lists.get_mut(i) {
                *x = l;
            }
        }
    }

    /// Hands the control thread the Claims and answers peer `i` sent.
    fn tell_control(&mut self, i: usize, got: Vec<Msg>) {
        let node = self.slots[i].cfg.node;
        let events: Vec<Event> = got
            .into_iter()
            .filter_map(|m| match m {
                Msg::Claim { from, to, channel } => Some(Event::Claim {
                    node,
                    from,
                    to,
                    channel,
                }),
                Msg::Claimed { channel, answer } => Some(Event::Claimed {
                    node,
                    channel,
                    answer,
                }),
                Msg::Failover {
                    channel,
                    words,
                    closed,
                } => Some(Event::Failover {
                    node,
                    channel,
                    words,
                    closed,
                }),
                Msg::Forward { old, new } => Some(Event::Forward { node, old, new }),
                Msg::Setup { link, data } => Some(Event::Setup { node, link, data }),
                Msg::Forwarded { channel, ok } => Some(Event::Forwarded { node, channel, ok }),
                Msg::Migrate {
                    channel,
                    link,
                    received,
                    marked,
                } => Some(Event::Migrate {
                    node,
                    channel,
                    link,
                    received,
                    marked,
                }),
                Msg::Rejoin {
                    sender,
                    receiver,
                    words,
                } => Some(Event::Rejoin {
                    node,
                    sender,
                    receiver,
                    words,
                }),
                Msg::Rejoined {
                    sender,
                    receiver,
                    channel,
                } => Some(Event::Rejoined {
                    node,
                    sender,
                    receiver,
                    channel,
                }),
                _ => None,
            })
            .collect();
        self.post(events);
    }

    fn post(&mut self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(events);
        let _ = self.news.write(1);
    }

    /// Sends what the control thread queued for up peers; a message for a
    /// peer that is not up is dropped (its sender's end waits for nothing
    /// that matters: the connection stays on kernel TCP).
    fn send_outbox(&mut self) {
        let out = std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()));
        for (node, m) in out {
            let Some(i) = self.slots.iter().position(|s| s.cfg.node == node) else {
                continue;
            };
            let Some(c) = self.slots[i].conn.as_mut().filter(|c| c.verified) else {
                log::debug!("peer node {node} is not up: {m:?} dropped");
                continue;
            };
            if let Err(e) = send(c, &m) {
                self.lose(i, End::Lost(format!("send: {e}")));
            }
        }
    }

    fn count(&mut self, why: &'static str, what: &str) {
        log::warn!("peer connection refused ({why}): {what}");
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        *st.refused.entry(why).or_default() += 1;
    }

    fn set_error(&mut self, i: usize, what: String) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = st.peers.get_mut(i) {
            p.last_error = what;
        }
    }

    /// Copies each slot's state into the shared status.
    fn publish(&mut self) {
        let now = Instant::now();
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        for (p, s) in st.peers.iter_mut().zip(&self.slots) {
            p.state = match &s.conn {
                Some(c) if c.verified => "up",
                Some(_) => "handshake",
                None => "down",
            };
            p.heard_ms_ago = s
                .heard
                .map(|h| u64::try_from(now.duration_since(h).as_millis()).unwrap_or(u64::MAX));
        }
    }
}

/// An open connection's epoll events: readable and writable, edge
/// triggered (`serve` reads until the socket is empty, `flush` writes
/// until it is full).
fn open_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED
}

/// Queues one message, sealed once the connection is up, and writes what
/// the socket takes; the rest goes when it is writable again.
fn send(c: &mut Conn, m: &Msg) -> io::Result<()> {
    let f = match &mut c.session {
        Some(s) => s.seal(m),
        None => wire::encode(m),
    };
    c.out.extend_from_slice(&f);
    if c.out.len() > MAX_OUTBOX {
        return Err(io::Error::other("the peer stopped reading"));
    }
    flush(c)
}

/// Writes what waits for `c` until the socket is full.
fn flush(c: &mut Conn) -> io::Result<()> {
    while !c.out.is_empty() {
        match c.stream.write(&c.out) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer gone")),
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
