//! The engine against real Queued regions driven as a client drives them:
//! when a TX buffer goes back (at once for a local peer, only once the
//! peer side took its bytes for a remote one), bytes in order, a backend
//! that cannot open a channel resetting the connection, and what a side
//! whose link failed becomes when the other host never agrees.

use super::engine::{self, Cmd, SideInit, SideSpec};
use crate::stats::{EngineCounts, QueuedCounters};
use ssock_hwbackends::loopback::Loopback;
use ssock_hwbackends::{
    Backend, BackendError, Capabilities, ChannelId, LinkEvent, Mark, Offsets, Peer, Piece, Recv,
    Syscall, Words,
};
use ssock_rings::layout::{
    self, QueuedLayout, FLAG_EOS, FLAG_PEER_RESET, FLAG_RESET, FLAG_RESET_AFTER_EOS,
};
use ssock_rings::shm::Mapping;
use ssock_rings::sys::{self, EventFd};
use ssock_rings::vq::device::DeviceRegion;
use ssock_rings::vq::driver::QueueDriver;
use ssock_rings::vq::{F_WRITE, RX, TX};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A loopback whose channels call each other remote (node 7): what a
/// backend between hosts looks like to the engine, without a second host;
/// the test hands it link events to report.
struct AsRemote(Loopback, Arc<std::sync::Mutex<Vec<LinkEvent>>>);

impl Backend for AsRemote {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            remote: true,
            ..self.0.capabilities()
        }
    }
    fn readiness(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }
    fn poll(&mut self, ready: &mut Vec<ChannelId>) {
        self.0.poll(ready)
    }
    fn deadline(&self) -> Option<Duration> {
        None
    }
    fn open(&mut self, ch: ChannelId, peer: Peer) -> Result<(), BackendError> {
        match peer {
            Peer::Remote { node: 7, channel } => self.0.open(ch, Peer::Local(channel)),
            _ => Err(BackendError::Unreachable(ch)),
        }
    }
    fn send_with(
        &mut self,
        ch: ChannelId,
        len: usize,
        fill: &mut dyn FnMut(usize, Piece<'_>) -> bool,
    ) -> Result<usize, BackendError> {
        self.0.send_with(ch, len, fill)
    }
    fn send_mark(&mut self, ch: ChannelId, mark: Mark) -> Result<(), BackendError> {
        self.0.send_mark(ch, mark)
    }
    fn recv_with(
        &mut self,
        ch: ChannelId,
        take: &mut dyn FnMut(Piece<'_>) -> usize,
    ) -> Result<Recv, BackendError> {
        self.0.recv_with(ch, take)
    }
    fn pending(&self, ch: ChannelId) -> usize {
        self.0.pending(ch)
    }
    fn mark_arrived(&self, ch: ChannelId) -> Option<Mark> {
        self.0.mark_arrived(ch)
    }
    fn end_before_reset(&self, ch: ChannelId) -> bool {
        self.0.end_before_reset(ch)
    }
    fn offsets(&self, ch: ChannelId) -> Option<Offsets> {
        self.0.offsets(ch)
    }
    fn close(&mut self, ch: ChannelId) {
        self.0.close(ch)
    }
    fn send_words(&mut self, ch: ChannelId, words: Words) -> Result<(), BackendError> {
        self.0.send_words(ch, words)
    }
    fn recv_words(&mut self, ch: ChannelId) -> Option<Words> {
        self.0.recv_words(ch)
    }
    fn link_events(&mut self) -> Vec<LinkEvent> {
        std::mem::take(&mut *self.1.lock().unwrap())
    }
    fn syscalls(&self) -> Vec<Syscall> {
        Vec::new()
    }
}

fn as_remote() -> AsRemote {
    AsRemote(Loopback::default(), Arc::default())
}

/// A client's view of one Queued region: its two queues and doorbells.
struct Client {
    map: Arc<Mapping>,
    layout: QueuedLayout,
    tx: QueueDriver,
    rx: QueueDriver,
    kick: EventFd,
    call: EventFd,
}

/// A Queued region as devd makes one, and the client's end of it.
fn region(id: u64) -> (SideInit, Client) {
    let layout = QueuedLayout::for_size(256 * 1024).unwrap();
    let memfd = sys::memfd_sealed("engine-test", layout.size).unwrap();
    let header = layout.header(id);
    sys::pwrite_all(memfd.as_fd(), &header, 0).unwrap();
    let device = DeviceRegion::new(memfd.try_clone().unwrap(), layout).unwrap();
    let map = Arc::new(Mapping::map(memfd.as_fd(), layout.size, true).unwrap());
    let (kick, call) = (EventFd::new().unwrap(), EventFd::new().unwrap());
    let client = Client {
        tx: QueueDriver::new(map.clone(), layout.queues[TX], layout.qsize),
        rx: QueueDriver::new(map.clone(), layout.queues[RX], layout.qsize),
        map,
        layout,
        kick: EventFd::from_owned(kick.try_clone_fd().unwrap()),
        call: EventFd::from_owned(call.try_clone_fd().unwrap()),
    };
    (
        SideInit {
            region: device,
            kick,
            call,
        },
        client,
    )
}

impl Client {
    /// Posts `data` in TX buffer `id`, the next one in turn.
    fn send(&mut self, id: u16, data: &[u8]) {
        let n = self.tx.next().unwrap().unwrap();
        assert_eq!(n.id, id, "buffers are posted in turn");
        let at = self.layout.slot_offset(TX, id);
        self.map.write_bytes(at, data);
        self.tx
            .post(n, at as u64, u32::try_from(data.len()).unwrap(), 0);
        self.kick.notify().unwrap();
    }

    /// Posts RX buffer `id`, the next one in turn.
    fn post_rx(&mut self, id: u16) {
        let n = self.rx.next().unwrap().unwrap();
        assert_eq!(n.id, id, "buffers are posted in turn");
        let at = self.layout.slot_offset(RX, id);
        let slot = u32::try_from(self.layout.slot).unwrap();
        self.rx.post(n, at as u64, slot, F_WRITE);
        self.kick.notify().unwrap();
    }

    fn slot(&self) -> u32 {
        u32::try_from(self.layout.slot).unwrap()
    }

    /// TX buffers given back within `d` (none if none came).
    fn tx_back(&mut self, d: Duration) -> Vec<u16> {
        let t = Instant::now();
        let mut back = Vec::new();
        loop {
            while let Some((id, _)) = self.tx.pop_used(self.slot()).unwrap() {
                back.push(id);
            }
            if !back.is_empty() || t.elapsed() > d {
                return back;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The bytes of the next RX buffer filled within 5 s.
    fn rx_bytes(&mut self) -> Vec<u8> {
        let t = Instant::now();
        loop {
            if let Some((id, len)) = self.rx.pop_used(self.slot()).unwrap() {
                let mut b = vec![0u8; len as usize];
                self.map.read_bytes(self.layout.slot_offset(RX, id), &mut b);
                return b;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "no RX buffer filled");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn rx_flags(&self) -> u32 {
        self.map
            .u32_at(layout::qhdr::RX_FLAGS)
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

fn start(backend: Box<dyn Backend>) -> engine::Handle {
    engine::spawn(backend, Arc::new(EngineCounts::default()), None).unwrap()
}

fn add(e: &engine::Handle, id: u64, sides: Vec<SideSpec>) {
    e.send(Cmd::Add {
        id,
        sides,
        counters: Arc::new(QueuedCounters::default()),
    });
}

#[test]
fn a_local_peers_tx_buffer_goes_back_once_the_backend_has_its_bytes() {
    let e = start(Box::new(Loopback::default()));
    let (a, mut ca) = region(1);
    let (b, mut cb) = region(1);
    add(&e, 1, SideSpec::local_pair(1, a, b));
    ca.send(0, b"local bytes");
    // The reader posted no RX buffer yet: its client keeps its own copy
    // until TAKEN says so, the engine need not hold the buffer.
    assert_eq!(ca.tx_back(Duration::from_secs(5)), vec![0]);
    cb.post_rx(0);
    assert_eq!(cb.rx_bytes(), b"local bytes");
}

/// As a TCP receiver on an RST: the reset is known at once (writes,
/// readiness), the bytes sent before it are still read, then the end.
#[test]
fn a_peers_reset_is_told_at_once_and_the_bytes_before_it_still_come() {
    let e = start(Box::new(Loopback::default()));
    let (a, mut ca) = region(3);
    let (b, mut cb) = region(3);
    add(&e, 3, SideSpec::local_pair(3, a, b));
    // b has no RX buffer posted: the answer waits in the engine.
    ca.send(0, b"the answer");
    assert_eq!(ca.tx_back(Duration::from_secs(5)), vec![0]);
    ca.map
        .u32_at(layout::qhdr::TX_FLAGS)
        .fetch_or(FLAG_RESET, std::sync::atomic::Ordering::Release);
    ca.kick.notify().unwrap();
    wait_for("the peer's reset told", || {
        cb.rx_flags() & FLAG_PEER_RESET != 0
    });
    assert_eq!(cb.rx_flags() & FLAG_RESET, 0, "the end before the bytes");
    assert_eq!(
        cb.rx_flags() & FLAG_RESET_AFTER_EOS,
        0,
        "no end of stream came"
    );
    cb.post_rx(0);
    assert_eq!(cb.rx_bytes(), b"the answer");
    wait_for("the reset after the bytes", || {
        cb.rx_flags() & FLAG_RESET != 0
    });
}

/// An abortive close after shutdown(SHUT_WR) while the bytes before the
/// end still wait for the reader's buffers: the reset is told at once,
/// as one after the end (a writer's EPIPE), and the reader still gets the
/// bytes, then the end of stream, not the reset.
#[test]
fn a_reset_after_the_end_is_told_as_such_while_the_bytes_before_it_wait() {
    let e = start(Box::new(Loopback::default()));
    let (a, mut ca) = region(4);
    let (b, mut cb) = region(4);
    add(&e, 4, SideSpec::local_pair(4, a, b));
    ca.send(0, b"last words");
    assert_eq!(ca.tx_back(Duration::from_secs(5)), vec![0]);
    let flags = ca.map.u32_at(layout::qhdr::TX_FLAGS);
    flags.fetch_or(FLAG_EOS, std::sync::atomic::Ordering::Release);
    ca.kick.notify().unwrap();
    flags.fetch_or(FLAG_RESET, std::sync::atomic::Ordering::Release);
    ca.kick.notify().unwrap();
    wait_for("the peer's reset told", || {
        cb.rx_flags() & FLAG_PEER_RESET != 0
    });
    assert_ne!(cb.rx_flags() & FLAG_RESET_AFTER_EOS, 0, "after the end");
    assert_eq!(
        cb.rx_flags() & (FLAG_EOS | FLAG_RESET),
        0,
        "the bytes first"
    );
    cb.post_rx(0);
    assert_eq!(cb.rx_bytes(), b"last words");
    wait_for("the end after the bytes", || cb.rx_flags() & FLAG_EOS != 0);
    assert_eq!(cb.rx_flags() & FLAG_RESET, 0, "the end, not the reset");
}

#[test]
fn a_remote_peers_tx_buffer_goes_back_only_once_the_peer_took_its_bytes() {
    let e = start(Box::new(as_remote()));
    let (a, mut ca) = region(2);
    let (b, mut cb) = region(3);
    // Two connections, each the one end on "this host" of a remote pair.
    let remote = |channel| Peer::Remote { node: 7, channel };
    add(&e, 2, alone(a, 20, remote(30), 0, None));
    add(&e, 3, alone(b, 30, remote(20), 1, None));
    ca.send(0, b"first");
    ca.send(1, b"second");
    assert!(
        ca.tx_back(Duration::from_millis(300)).is_empty(),
        "given back before the peer took the bytes"
    );
    cb.post_rx(0);
    let mut got = cb.rx_bytes();
    let mut back = ca.tx_back(Duration::from_secs(5));
    if got.len() < 11 {
        cb.post_rx(1);
        got.extend(cb.rx_bytes());
    }
    assert_eq!(got, b"firstsecond");
    while back.len() < 2 {
        let more = ca.tx_back(Duration::from_secs(5));
        assert!(!more.is_empty(), "TX buffers {back:?} back, not both");
        back.extend(more);
    }
    back.sort_unstable();
    assert_eq!(back, vec![0, 1]);
    assert!(
        ca.call.drain(),
        "the writer was not told its buffers came back"
    );
}

#[test]
fn bytes_a_side_sent_before_it_went_are_counted_once_they_move() {
    // devd forgets a remote connection as soon as its one end here is
    // released; the engine moves that end's last bytes later, and its own
    // totals are what the statistics show for them.
    let counts = Arc::new(EngineCounts::default());
    let e = engine::spawn(Box::new(as_remote()), counts.clone(), None).unwrap();
    let (a, mut ca) = region(2);
    let (b, mut cb) = region(3);
    let remote = |channel| Peer::Remote { node: 7, channel };
    add(&e, 2, alone(a, 20, remote(30), 0, None));
    add(&e, 3, alone(b, 30, remote(20), 1, None));
    ca.send(0, b"last words");
    // Its close: the end mark after its last post, then its Release.
    ca.map
        .u32_at(layout::qhdr::TX_FLAGS)
        .fetch_or(FLAG_EOS, std::sync::atomic::Ordering::Release);
    ca.kick.notify().unwrap();
    e.send(Cmd::SideGone {
        id: 2,
        side: 0,
        orderly: false,
    });
    cb.post_rx(0);
    assert_eq!(cb.rx_bytes(), b"last words");
    // (Counted where they left: the receiving end has no hand-over page
    // here, which is how its host would know to count them too.)
    wait_for("the moved bytes counted", || {
        QueuedCounters::get(&counts.bytes) == 10
    });
}

#[test]
fn a_channel_the_backend_cannot_open_resets_both_sides() {
    // The plain loopback reaches no remote node.
    let e = start(Box::new(Loopback::default()));
    let (a, ca) = region(4);
    add(
        &e,
        4,
        alone(
            a,
            40,
            Peer::Remote {
                node: 7,
                channel: 50,
            },
            0,
            None,
        ),
    );
    let t = Instant::now();
    while ca.rx_flags() & FLAG_RESET == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "no reset");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_link_that_goes_down_resets_the_connections_that_crossed_it() {
    let (_e, events, mut ca, cb) = remote_pair(5, 6);
    ca.send(0, b"in flight when the link goes");
    link_down(&events);
    ca.kick.notify().unwrap(); // wakes the engine, which then hears of it
    let t = Instant::now();
    while ca.rx_flags() & FLAG_RESET == 0 || cb.rx_flags() & FLAG_RESET == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no reset after the link went down"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A reader whose peer's reset came behind bytes it has not read yet needs
/// no link for them: the link's failure neither moves nor resets it.
#[test]
fn a_link_that_goes_down_after_a_reset_came_leaves_the_bytes_before_it() {
    let (e, events, mut ca, mut cb) = remote_pair(10, 11);
    let remote = |channel| Peer::Remote { node: 7, channel };
    // A third connection over the same link, with nothing pending: reset
    // when the link goes (no peer devds to agree a move with), which
    // says the engine heard of it.
    let (c, cc) = region(12);
    add(&e, 12, alone(c, 120, remote(130), 0, None));
    ca.send(0, b"the answer");
    ca.map
        .u32_at(layout::qhdr::TX_FLAGS)
        .fetch_or(FLAG_RESET, std::sync::atomic::Ordering::Release);
    ca.kick.notify().unwrap();
    wait_for("the peer's reset told", || {
        cb.rx_flags() & FLAG_PEER_RESET != 0
    });
    link_down(&events);
    cc.kick.notify().unwrap();
    wait_for("the link's loss heard", || cc.rx_flags() & FLAG_RESET != 0);
    // (The engine deals with every side of the link in one go.)
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(cb.rx_flags() & FLAG_RESET, 0, "reset before its bytes");
    cb.post_rx(0);
    assert_eq!(cb.rx_bytes(), b"the answer");
    wait_for("the reset after the bytes", || {
        cb.rx_flags() & FLAG_RESET != 0
    });
}

/// An engine over a stand-in remote backend, with connections `a` and
/// `b` each the one side on "this host" of a pair across node 7's link 0
/// (channels `a * 10` and `b * 10`): the engine, the backend's link
/// events to report, and the two clients.
fn remote_pair(
    a: u64,
    b: u64,
) -> (
    engine::Handle,
    Arc<std::sync::Mutex<Vec<LinkEvent>>>,
    Client,
    Client,
) {
    let backend = as_remote();
    let events = backend.1.clone();
    let e = start(Box::new(backend));
    let (ra, ca) = region(a);
    let (rb, cb) = region(b);
    let remote = |channel| Peer::Remote { node: 7, channel };
    add(&e, a, alone(ra, a * 10, remote(b * 10), 0, None));
    add(&e, b, alone(rb, b * 10, remote(a * 10), 1, None));
    (e, events, ca, cb)
}

/// The test backend reports node 7's link 0 down (at the engine's next
/// look: a kick).
fn link_down(events: &std::sync::Mutex<Vec<LinkEvent>>) {
    events.lock().unwrap().push(LinkEvent {
        node: 7,
        link: 0,
        state: ssock_hwbackends::LinkState::Down,
    });
}

/// The one side on "this host" of a connection whose other end is `peer`.
fn alone(
    init: SideInit,
    ch: ChannelId,
    peer: Peer,
    end: usize,
    hov: Option<Arc<Mapping>>,
) -> Vec<SideSpec> {
    vec![SideSpec {
        init,
        ch,
        peer,
        end,
        hov,
        on_kernel: false,
    }]
}

fn hov_page() -> Arc<Mapping> {
    let fd = sys::memfd_sealed("hov-test", layout::HOV_PAGE).unwrap();
    Arc::new(Mapping::map(fd.as_fd(), layout::HOV_PAGE, true).unwrap())
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_hand_over_words_of_a_remote_pair_are_relayed_both_ways() {
    let e = start(Box::new(as_remote()));
    let (a, ca) = region(7);
    let (b, cb) = region(8);
    let (ha, hb) = (hov_page(), hov_page());
    let remote = |channel| Peer::Remote { node: 7, channel };
    add(&e, 7, alone(a, 70, remote(80), 0, Some(ha.clone())));
    add(&e, 8, alone(b, 80, remote(70), 1, Some(hb.clone())));
    // The acceptor says accepted on its host's page, then kicks.
    assert!(layout::accept_claim(&hb));
    cb.kick.notify().unwrap();
    wait_for("CLAIM relayed to the connector's page", || {
        layout::claim(&ha) == layout::CLAIM_ACCEPTED
    });
    assert!(ca.call.drain(), "the connector was not woken");
    layout::mark_ready(&ha);
    layout::publish_switch(&ha, 0, layout::Switch::After(3));
    ca.kick.notify().unwrap();
    wait_for("READY and SWITCH relayed to the acceptor's page", || {
        layout::connector_ready(&hb) && layout::switch_at(&hb, 0) == layout::Switch::After(3)
    });
    // The acceptor's own direction stays its own.
    assert_eq!(layout::switch_at(&hb, 1), layout::Switch::NotYet);
    assert_eq!(layout::switch_at(&ha, 1), layout::Switch::NotYet);
}

#[test]
fn a_remote_channel_that_cannot_open_leaves_the_connection_on_kernel_tcp() {
    let e = start(Box::new(Loopback::default()));
    let (a, ca) = region(9);
    let h = hov_page();
    add(
        &e,
        9,
        alone(
            a,
            90,
            Peer::Remote {
                node: 7,
                channel: 91,
            },
            1,
            Some(h.clone()),
        ),
    );
    wait_for("no CLAIM = kernel", || {
        layout::claim(&h) == layout::CLAIM_KERNEL
    });
    assert_eq!(ca.rx_flags() & FLAG_RESET, 0, "reset instead");
}

/// A link fails under a connection whose other host never answers the
/// fail-over (its devd gone): after the wait, the side whose client holds
/// its end is reset and counted; the side whose client never said it
/// holds its end (nothing of it moved on either host) stays on kernel TCP,
/// not counted.
#[test]
fn a_side_whose_client_never_held_its_end_stays_plain_when_no_agreement_comes() {
    let backend = as_remote();
    let events = backend.1.clone();
    let counts = Arc::new(EngineCounts::default());
    let e = engine::spawn(Box::new(backend), counts.clone(), None).unwrap();
    e.send(Cmd::Peers(crate::peers::Sender::unheard()));
    let (ra, ca) = region(30);
    let (rb, cb) = region(31);
    let (ha, hb) = (hov_page(), hov_page());
    let remote = |channel| Peer::Remote { node: 7, channel };
    // The connector holds its end; the acceptor never took its own.
    layout::mark_ready(&ha);
    add(&e, 30, alone(ra, 300, remote(310), 0, Some(ha.clone())));
    add(&e, 31, alone(rb, 310, remote(300), 1, Some(hb.clone())));
    ca.kick.notify().unwrap();
    wait_for("READY relayed", || layout::connector_ready(&hb));
    link_down(&events);
    ca.kick.notify().unwrap();
    let t = Instant::now();
    while ca.rx_flags() & FLAG_RESET == 0 || layout::claim(&hb) != layout::CLAIM_KERNEL {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "after the wait: connector reset {}, acceptor's CLAIM {}",
            ca.rx_flags() & FLAG_RESET != 0,
            layout::claim(&hb)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        t.elapsed() >= Duration::from_secs(9),
        "decided before the wait"
    );
    assert_eq!(cb.rx_flags() & FLAG_RESET, 0, "the acceptor's side reset");
    let resets = counts
        .failover_resets
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(resets, 1, "only the connector's side counts");
}
