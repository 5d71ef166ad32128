//! The conformance suite on two ntb nodes joined by an emulated window,
//! then what only a link between hosts does: heartbeats and link events,
//! a hostile inbox, payloads read in place or copied out.

use super::inbox::MAX_PAYLOAD;
use super::inbox::{self, RING};
use super::{MemWindow, Ntb, Window, DEAD, SHARED_WINDOW};
use crate::conformance::{self, End, Lab, Linked};
use crate::{Backend, BackendError, ChannelId, LinkState, Mark, Peer, Recv};
use std::time::{Duration, Instant};

/// Two nodes (1 and 2), each an `Ntb` over one end of a window.
type TwoNodes = Linked<Ntb>;

/// Nodes over the two ends of a `MemWindow` of `half` bytes a side.
fn two_nodes(half: usize, window: usize) -> TwoNodes {
    let (w1, w2) = MemWindow::pair(half).unwrap();
    over(Box::new(w1), Box::new(w2), window)
}

/// Nodes 1 and 2 over the two ends of a window, started.
fn over(w1: Box<dyn Window>, w2: Box<dyn Window>, window: usize) -> TwoNodes {
    Linked::new(
        [Ntb::new(2, 0, w1, window), Ntb::new(1, 0, w2, window)],
        false,
    )
}

#[test]
fn two_ntb_nodes_pass_the_conformance_suite() {
    for (half, window) in [
        (1 << 20, 64 * 1024),
        (256 * 1024, 128 * 1024),
        (64 * 1024, 16384),
    ] {
        conformance::run_all(&mut || Box::new(two_nodes(half, window)));
    }
}

#[test]
fn payloads_go_straight_into_the_peers_inbox_and_are_published_at_the_turns_end() {
    let mut lab = two_nodes(1 << 20, 256 * 1024);
    let [a, b] = lab.pair();
    assert_eq!(lab.b[0].send(a.ch, &[1u8; 100]).unwrap(), 100);
    assert_eq!(lab.b[0].send(a.ch, &[2u8; 5000]).unwrap(), 5000);
    assert_eq!(lab.b[0].counters().data, 2);
    let mut r = Vec::new();
    lab.b[1].poll(&mut r);
    assert_eq!(lab.b[1].pending(b.ch), 0, "published before the turn's end");
    lab.settle();
    assert!(lab.b[0].counters().doorbells >= 1);
    let mut buf = vec![0u8; 6000];
    assert_eq!(lab.b[1].recv(b.ch, &mut buf).unwrap(), Recv::Data(5100));
    assert!(buf[..100].iter().all(|&x| x == 1) && buf[100..5100].iter().all(|&x| x == 2));
}

/// Bytes `ch` of node 1 takes in sends until it takes none.
fn fill(lab: &mut TwoNodes, ch: ChannelId) -> usize {
    let data = vec![5u8; MAX_PAYLOAD];
    let mut n = 0;
    loop {
        match lab.b[0].send(ch, &data).unwrap() {
            0 => return n,
            k => n += k,
        }
    }
}

#[test]
fn a_channel_has_the_whole_window_alone_and_the_shared_one_beside_another() {
    // Alone: the whole window in flight.
    let mut lab = two_nodes(4 << 20, 1 << 20);
    let [a, _] = lab.pair();
    assert_eq!(fill(&mut lab, a.ch), 1 << 20);
    // Beside another channel that sent just now: the shared window.
    let mut lab = two_nodes(4 << 20, 1 << 20);
    let ([a, ra], [p, rp]) = (lab.pair(), lab.pair());
    // (However slow this thread: shared until the test says otherwise.)
    lab.b[0].shared_for = Duration::from_secs(3600);
    assert_eq!(lab.b[0].send(p.ch, b"ping").unwrap(), 4);
    assert_eq!(fill(&mut lab, a.ch), SHARED_WINDOW);
    // Once that time is over (here: ended by hand), the whole again.
    lab.b[0].shared_until = None;
    assert_eq!(fill(&mut lab, a.ch), (1 << 20) - SHARED_WINDOW);
    // Both arrive whole.
    lab.settle();
    let mut buf = vec![0u8; 2 << 20];
    assert_eq!(lab.b[1].recv(rp.ch, &mut buf).unwrap(), Recv::Data(4));
    assert_eq!(&buf[..4], b"ping");
    let mut got = 0;
    while let Recv::Data(n) = lab.b[1].recv(ra.ch, &mut buf).unwrap() {
        assert!(buf[..n].iter().all(|&x| x == 5));
        got += n;
    }
    assert_eq!(got, 1 << 20);
}

#[test]
fn a_reader_takes_payloads_in_place_and_a_slow_ones_are_copied_out_in_order() {
    // A ring of 60 KiB: frames wrap at its end, held ones too.
    let mut lab = two_nodes(64 * 1024, 24 * 1024);
    let [a, b] = lab.pair();
    let data: Vec<u8> = (0..400_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (mut sent, mut got) = (0, Vec::new());
    let mut r = Vec::new();
    for round in 0.. {
        assert!(round < 20_000, "stuck at {} of {}", got.len(), data.len());
        if got.len() == data.len() {
            break;
        }
        if sent < data.len() {
            sent += lab.b[0].send(a.ch, &data[sent..]).unwrap();
        }
        lab.b[0].poll(&mut r); // published, acks taken in
        lab.b[1].poll(&mut r); // taken in: held in the inbox
                               // Some turns the reader takes nothing (the next poll copies out
                               // what is held: after a partial read, some is); else it reads in
                               // pieces of every size.
        let size = [40_000, 1000, 0, 7, 16_384][round % 5];
        if size == 0 {
            continue;
        }
        // (Reads of 1000 bytes: one a turn, what follows stays held.)
        let mut buf = vec![0u8; size];
        while let Ok(Recv::Data(n)) = lab.b[1].recv(b.ch, &mut buf) {
            got.extend_from_slice(&buf[..n]);
            if n < size || size == 1000 {
                break;
            }
        }
    }
    assert!(got == data, "{} bytes, or not in order", got.len());
    let c = lab.b[1].counters();
    assert!(
        c.taken_in_place > 0 && c.copied_out > 0,
        "both ways not taken: {c:?}"
    );
}

#[test]
fn the_backend_wakes_through_its_doorbell_only_when_asleep_and_has_a_deadline() {
    let mut lab = two_nodes(1 << 20, 64 * 1024);
    let [a, b] = lab.pair();
    lab.settle();
    let mut r = Vec::new();
    // (The rings of the link's start, taken in after a sleep: an awake
    // side leaves its doorbell alone.)
    assert!(lab.b[1].idle(), "nothing waits: it may sleep");
    lab.b[1].poll(&mut r);
    let fd = lab.b[1].readiness().pop().expect("a doorbell fd");
    assert!(!readable(fd), "quiet before anything was sent");
    // Node 2 goes to sleep: node 1's publish rings it.
    assert!(lab.b[1].idle(), "nothing waits: it may sleep");
    lab.b[0].send(a.ch, b"ring").unwrap();
    lab.b[0].poll(&mut r);
    let fd = lab.b[1].readiness().pop().expect("a doorbell fd");
    assert!(readable(fd), "the peer's publish rang the doorbell");
    // Awake again (its poll), node 2 is not rung, yet sees the news.
    lab.b[1].poll(&mut r);
    let rung = lab.b[0].counters().doorbells;
    lab.b[0].send(a.ch, b"quiet").unwrap();
    lab.b[0].poll(&mut r);
    let c = lab.b[0].counters();
    assert_eq!(c.doorbells, rung, "an awake peer is not rung");
    assert!(c.doorbells_suppressed >= 1);
    assert!(lab.b[1].news_waiting());
    // News that came before the sleep: it does not sleep.
    assert!(!lab.b[1].idle(), "frames wait in its inbox");
    lab.b[1].poll(&mut r);
    let mut buf = [0u8; 16];
    assert_eq!(lab.b[1].recv(b.ch, &mut buf).unwrap(), Recv::Data(9));
    assert_eq!(&buf[..9], b"ringquiet");
    assert!(lab.b[0].deadline().is_some_and(|d| d <= super::BEAT));
}

/// A `MemWindow` that counts the calls to `drain` (system calls: the
/// doorbell's read, an ivshmem server's news).
struct CountingWindow(MemWindow, std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Window for CountingWindow {
    fn halves(&self) -> &super::window::Halves {
        self.0.halves()
    }
    fn ring(&self) {
        self.0.ring();
    }
    fn bell(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.bell()
    }
    fn drain(&mut self) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.drain();
    }
}

#[test]
fn an_awake_backend_takes_its_doorbell_in_only_after_a_sleep_or_now_and_then() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (w1, w2) = MemWindow::pair(1 << 20).unwrap();
    let drains = std::sync::Arc::new(AtomicUsize::new(0));
    let mut lab = over(
        Box::new(w1),
        Box::new(CountingWindow(w2, drains.clone())),
        64 * 1024,
    );
    let [a, b] = lab.pair();
    lab.settle();
    let mut r = Vec::new();
    // Awake, node 2's turns make no system call for its doorbell (at
    // most one per `DRAIN_AWAKE`: the test's turns take far less).
    let before = drains.load(Ordering::Relaxed);
    let t = Instant::now();
    for _ in 0..100 {
        lab.b[0].send(a.ch, b"x").unwrap();
        lab.b[0].poll(&mut r);
        lab.b[1].poll(&mut r);
    }
    let awake = drains.load(Ordering::Relaxed) - before;
    let bound = 1 + t.elapsed().as_millis() / super::backend::DRAIN_AWAKE.as_millis();
    assert!(awake as u128 <= bound, "{awake} drains in 100 awake turns");
    let mut buf = [0u8; 256];
    assert_eq!(lab.b[1].recv(b.ch, &mut buf).unwrap(), Recv::Data(100));
    // Asleep, it is rung; its next turn takes the ring in.
    assert!(lab.b[1].idle());
    lab.b[0].send(a.ch, b"y").unwrap();
    lab.b[0].poll(&mut r);
    let fd = lab.b[1].readiness().pop().expect("a doorbell fd");
    assert!(readable(fd), "the peer's publish rang the doorbell");
    let before = drains.load(Ordering::Relaxed);
    lab.b[1].poll(&mut r);
    assert_eq!(
        drains.load(Ordering::Relaxed),
        before + 1,
        "the turn after a sleep drains"
    );
    let fd = lab.b[1].readiness().pop().expect("a doorbell fd");
    assert!(!readable(fd), "the ring was taken in");
    assert_eq!(lab.b[1].recv(b.ch, &mut buf).unwrap(), Recv::Data(1));
    // Awake for longer than `DRAIN_AWAKE`: the next turn drains.
    std::thread::sleep(super::backend::DRAIN_AWAKE);
    let before = drains.load(Ordering::Relaxed);
    lab.b[1].poll(&mut r);
    assert_eq!(drains.load(Ordering::Relaxed), before + 1);
}

/// Whether a zero-timeout poll finds `fd` readable.
fn readable(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = [ssock_rings::sys::PollFd::new(fd.as_raw_fd(), libc::POLLIN)];
    ssock_rings::sys::poll(&mut p, Some(Duration::ZERO)).unwrap_or(0) > 0
}

#[test]
fn the_link_comes_up_with_the_peers_heartbeat_and_goes_down_without_it() {
    let mut lab = two_nodes(64 * 1024, 16384);
    lab.settle();
    // Both wrote a beat at start; each saw the other's.
    let ev = lab.b[0].link_events();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].node, ev[0].state), (2, LinkState::Up));
    assert!(lab.b[0].link_up());
    // Node 2 stops polling (its devd is stopped): node 1 says Down after
    // DEAD, and only once.
    let t = Instant::now();
    let mut down = Vec::new();
    while down.is_empty() {
        assert!(t.elapsed() < DEAD * 3, "no Down event");
        std::thread::sleep(Duration::from_millis(50));
        let mut r = Vec::new();
        lab.b[0].poll(&mut r);
        down = lab.b[0].link_events();
    }
    assert!(t.elapsed() >= DEAD - Duration::from_millis(300));
    assert_eq!((down[0].node, down[0].state), (2, LinkState::Down));
    assert!(!lab.b[0].link_up());
    // Node 2 beats again: Up.
    std::thread::sleep(super::BEAT);
    lab.settle();
    let ev = lab.b[0].link_events();
    assert_eq!(
        ev.iter().map(|e| e.state).collect::<Vec<_>>(),
        [LinkState::Up]
    );
}

#[test]
fn a_link_taken_out_of_service_goes_down_at_once_here_and_on_the_peer_and_comes_back() {
    let mut lab = two_nodes(64 * 1024, 16384);
    lab.settle();
    for n in 0..2 {
        assert!(lab.b[n].link_up());
        lab.b[n].link_events();
    }
    assert_eq!(
        lab.b[0].set_link(7, None, false),
        Err(BackendError::NoLink(7)),
        "no link to node 7 here"
    );
    // Node 1 takes its link to node 2 out of service: Down at once there,
    // no heartbeat after, nothing read.
    lab.b[0].set_link(2, None, false).unwrap();
    let ev = lab.b[0].link_events();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].node, ev[0].state), (2, LinkState::Down));
    assert!(!lab.b[0].link_up());
    assert!(!lab.b[0].news_waiting());
    assert_eq!(
        lab.b[0].deadline(),
        None,
        "no heartbeat to send: no wake-up"
    );
    // Node 2, still polling, misses its heartbeat: Down after DEAD.
    let t = Instant::now();
    let mut down = Vec::new();
    while down.is_empty() {
        assert!(t.elapsed() < DEAD * 3, "no Down event on node 2");
        std::thread::sleep(Duration::from_millis(50));
        lab.settle();
        down = lab.b[1].link_events();
    }
    assert_eq!((down[0].node, down[0].state), (1, LinkState::Down));
    assert!(
        lab.b[0].link_events().is_empty(),
        "node 1 stays down while out of service"
    );
    // Back in service: both up once they hear each other.
    lab.b[0].set_link(2, None, true).unwrap();
    let t = Instant::now();
    while !(lab.b[0].link_up() && lab.b[1].link_up()) {
        assert!(t.elapsed() < DEAD * 3, "the link never came back");
        std::thread::sleep(Duration::from_millis(50));
        lab.settle();
    }
    for n in 0..2 {
        let ev = lab.b[n].link_events();
        assert_eq!(ev.last().map(|e| e.state), Some(LinkState::Up), "node {n}");
    }
}

/// A window end that lets a test write into node 1's own inbox, as a
/// hostile node 2 would.
fn hostile_lab() -> (Ntb, MemWindow, ChannelId) {
    let (w1, evil) = MemWindow::pair(64 * 1024).unwrap();
    let mut n1 = Ntb::new(2, 0, Box::new(w1), 16384);
    n1.open(
        5,
        Peer::Remote {
            node: 2,
            channel: 6,
        },
    )
    .unwrap();
    // A peer that follows the start-up protocol (its epoch, its window,
    // node 1's epoch seen), then misbehaves.
    evil.store(inbox::OFF_WINDOW, 16384);
    evil.store(inbox::OFF_EPOCH, 77);
    evil.store(inbox::OFF_VERSION, inbox::VERSION);
    evil.store(inbox::OFF_MAGIC, inbox::MAGIC);
    evil.store(inbox::OFF_SEEN, evil.load(inbox::OFF_EPOCH));
    evil.store(inbox::OFF_BEAT, 1);
    let mut r = Vec::new();
    n1.poll(&mut r);
    assert!(n1.link_up(), "the evil peer started properly");
    (n1, evil, 5)
}

fn ends_reset(n1: &mut Ntb, ch: ChannelId) {
    let mut r = Vec::new();
    n1.poll(&mut r);
    assert!(r.contains(&ch), "the channel was not named: {r:?}");
    assert_eq!(n1.recv(ch, &mut [0u8; 8]).unwrap(), Recv::Mark(Mark::Reset));
    assert_eq!(n1.send(ch, b"x"), Err(BackendError::PeerGone(ch)));
    assert!(!n1.link_up());
    assert!(n1.link_events().iter().any(|e| e.state == LinkState::Down));
    assert_eq!(
        n1.open(
            9,
            Peer::Remote {
                node: 2,
                channel: 9
            }
        ),
        Err(BackendError::Unreachable(9)),
        "a hostile link opens nothing more"
    );
}

#[test]
fn a_producer_word_beyond_the_ring_takes_the_link_down() {
    let (mut n1, evil, ch) = hostile_lab();
    let mut r = Vec::new();
    n1.poll(&mut r);
    assert!(n1.link_up());
    evil.store(inbox::OFF_PROD, 10 << 20);
    ends_reset(&mut n1, ch);
}

#[test]
fn a_garbage_frame_takes_the_link_down() {
    let (mut n1, evil, ch) = hostile_lab();
    evil.write(RING, &[0xff; 24]);
    evil.store(inbox::OFF_PROD, 24);
    ends_reset(&mut n1, ch);
}

#[test]
fn bytes_beyond_a_channels_window_take_the_link_down() {
    let (mut n1, evil, ch) = hostile_lab();
    // Three 8 KiB data frames for channel 5 (from 6): 24 KiB > 16 KiB.
    let mut pos = 0;
    for _ in 0..3 {
        let h = inbox::Header {
            kind: inbox::Kind::Data,
            len: 8192,
            dst: ch,
            src: 6,
        };
        evil.write(RING + pos, &inbox::encode(&h));
        evil.write(RING + pos + inbox::HDR, &[7u8; 8192]);
        pos += inbox::frame_size(8192);
    }
    evil.store(inbox::OFF_PROD, pos as u64);
    ends_reset(&mut n1, ch);
}

#[test]
fn an_ack_beyond_what_was_sent_takes_the_link_down() {
    let (mut n1, evil, ch) = hostile_lab();
    let h = inbox::Header {
        kind: inbox::Kind::Ack,
        len: 8,
        dst: ch,
        src: 6,
    };
    evil.write(RING, &inbox::encode(&h));
    evil.write(RING + inbox::HDR, &1000u64.to_le_bytes());
    evil.store(inbox::OFF_PROD, inbox::frame_size(8) as u64);
    ends_reset(&mut n1, ch);
}

#[test]
fn a_frame_for_a_channel_not_open_here_is_counted_and_dropped() {
    let (mut n1, evil, ch) = hostile_lab();
    let h = inbox::Header {
        kind: inbox::Kind::Data,
        len: 8,
        dst: 77,
        src: 6,
    };
    evil.write(RING, &inbox::encode(&h));
    evil.store(inbox::OFF_PROD, inbox::frame_size(8) as u64);
    let mut r = Vec::new();
    n1.poll(&mut r);
    assert_eq!(n1.counters().stale, 1);
    assert!(n1.link_up(), "a late frame is no hostility");
    assert_eq!(n1.recv(ch, &mut [0u8; 8]).unwrap(), Recv::Empty);
}

#[test]
fn a_local_peer_or_another_node_is_unreachable() {
    let mut lab = two_nodes(64 * 1024, 16384);
    let b = &mut lab.b[0];
    assert_eq!(b.open(1, Peer::Local(2)), Err(BackendError::Unreachable(1)));
    assert_eq!(
        b.open(
            1,
            Peer::Remote {
                node: 3,
                channel: 1
            }
        ),
        Err(BackendError::Unreachable(1))
    );
    assert!(b.capabilities().remote);
    assert!(b.syscalls().is_empty());
}

#[test]
fn a_channel_of_another_link_is_not_this_ones_and_two_configs_that_disagree_get_no_link() {
    let (w1, w2) = MemWindow::pair(64 * 1024).unwrap();
    let mut lab = Linked::new(
        [
            Ntb::new(2, 1, Box::new(w1), 16384),
            Ntb::new(1, 1, Box::new(w2), 16384),
        ],
        false,
    );
    assert!(lab.b[0].link_up() && lab.b[1].link_up());
    let to = |channel| Peer::Remote { node: 2, channel };
    // A channel whose id names link 0 goes elsewhere; link 1's opens here.
    let other = crate::on_link(1 << 63 | 5, 0);
    assert_eq!(
        lab.b[0].open(other, to(other)),
        Err(BackendError::Unreachable(other))
    );
    let ours = crate::on_link(1 << 63 | 5, 1);
    assert_eq!(crate::link_of(ours), 1);
    lab.b[0].open(ours, to(ours)).unwrap();
    // Taking link 0 to node 2 out of service is not this link's business.
    assert_eq!(
        lab.b[0].set_link(2, Some(0), false),
        Err(BackendError::NoLink(2))
    );
    assert!(lab.b[0].link_up());

    // Node 2's config takes this window for its link 0: no link at all.
    let (w1, w2) = MemWindow::pair(64 * 1024).unwrap();
    let mut lab = Linked::new(
        [
            Ntb::new(2, 1, Box::new(w1), 16384),
            Ntb::new(1, 0, Box::new(w2), 16384),
        ],
        false,
    );
    lab.settle();
    assert!(!lab.b[0].link_up() && !lab.b[1].link_up());
}

/// An ivshmem server on a fresh socket, in a thread, stopped on drop.
struct IvServer {
    path: std::path::PathBuf,
    stop: ssock_rings::sys::EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IvServer {
    fn start(bytes: usize) -> IvServer {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "ssock-ivshmem-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let shm = ssock_rings::sys::memfd_sealed("ivshmem-test", bytes).unwrap();
        let stop = ssock_rings::sys::EventFd::new().unwrap();
        let s = stop.try_clone_fd().unwrap();
        let mut server = super::ivshmem::Server::new(l, shm, 1).unwrap();
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsFd;
            server.run(s.as_fd()).unwrap();
        });
        IvServer {
            path,
            stop,
            thread: Some(thread),
        }
    }

    fn window(&self, half: usize) -> super::IvshmemWindow {
        super::IvshmemWindow::connect(&self.path, half, 0, Duration::from_secs(5)).unwrap()
    }
}

impl Drop for IvServer {
    fn drop(&mut self) {
        let _ = self.stop.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Two nodes over windows from an ivshmem server.
struct IvNodes {
    nodes: TwoNodes,
    _server: IvServer,
}

impl Lab for IvNodes {
    fn pair(&mut self) -> [End; 2] {
        self.nodes.pair()
    }
    fn backend(&mut self, i: usize) -> &mut dyn Backend {
        self.nodes.backend(i)
    }
    fn settle(&mut self) {
        self.nodes.settle()
    }
    fn poll(&mut self, at: usize) -> Vec<ChannelId> {
        self.nodes.poll(at)
    }
}

fn iv_nodes(bytes: usize, window: usize) -> IvNodes {
    let server = IvServer::start(bytes);
    let nodes = over(
        Box::new(server.window(0)),
        Box::new(server.window(1)),
        window,
    );
    IvNodes {
        nodes,
        _server: server,
    }
}

#[test]
fn two_nodes_over_an_ivshmem_servers_window_pass_the_conformance_suite() {
    conformance::run_all(&mut || Box::new(iv_nodes(2 << 20, 64 * 1024)));
}

#[test]
fn ivshmem_clients_learn_of_each_other_and_ring_only_present_peers() {
    let server = IvServer::start(1 << 20);
    let mut w1 = server.window(0);
    assert!(w1.peers().is_empty(), "alone at first");
    let mut w2 = server.window(1);
    assert_eq!(
        w2.peers(),
        vec![w1.id()],
        "the second learns of the first at once"
    );
    let t = Instant::now();
    while w1.peers().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "never told of the second client"
        );
        std::thread::sleep(Duration::from_millis(5));
        w1.drain();
    }
    assert_eq!(w1.peers(), vec![w2.id()]);
    let sc = w1.syscalls();
    assert_eq!(sc.len(), 2);
    assert_eq!(
        sc[0].nr,
        libc::SYS_recvmsg,
        "the server's news, on its socket only"
    );
    assert_eq!(sc[1].nr, libc::SYS_fcntl, "its doorbells made nonblocking");
    assert!(sc[0]
        .arg
        .as_ref()
        .is_some_and(|(i, v)| *i == 0 && v.len() == 1));
    w1.ring();
    assert!(readable(w2.bell()), "rung through the server's eventfd");
    w2.drain();
    assert!(!readable(w2.bell()));
    // The memory is one: what node 1 writes into its peer's inbox is in
    // node 2's own.
    w1.store(inbox::OFF_BEAT, 42);
    assert_eq!(w2.load(inbox::OFF_BEAT), 42);
    let id2 = w2.id();
    drop(w2);
    let t = Instant::now();
    while w1.peers().contains(&id2) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "never told the second left"
        );
        std::thread::sleep(Duration::from_millis(5));
        w1.drain();
    }
    w1.ring(); // to nobody: dropped, as ivshmem drops it
}

/// A fake server that says `msgs` (value, with the shared memory fd?) and
/// then hangs up.
fn fake_server(msgs: Vec<(i64, bool)>, bytes: usize) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "ssock-ivshmem-fake-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // usize::MAX: a memory of 1 MiB that anyone could truncate.
    let shm = if bytes == usize::MAX {
        ssock_rings::sys::memfd_unsealed("ivshmem-fake", 1 << 20).unwrap()
    } else {
        ssock_rings::sys::memfd_sealed("ivshmem-fake", bytes).unwrap()
    };
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let (c, _) = l.accept().unwrap();
        for (v, with_fd) in msgs {
            let fds: Vec<_> = if with_fd { vec![shm.as_fd()] } else { vec![] };
            let _ = ssock_rings::sys::send_with_fds(c.as_fd(), &v.to_le_bytes(), &fds);
        }
        std::thread::sleep(Duration::from_millis(200));
    });
    path
}

#[test]
fn a_server_that_breaks_the_protocol_gets_a_clear_error() {
    /// What the server says, its memory's size, what the error must say.
    type Case = (Vec<(i64, bool)>, usize, &'static str);
    let cases: Vec<Case> = vec![
        (vec![(1, false)], 1 << 20, "protocol version 1"),
        (vec![(0, false), (1 << 20, false)], 1 << 20, "client id"),
        (
            vec![(0, false), (3, false), (-1, false)],
            1 << 20,
            "no shared memory",
        ),
        (
            vec![(0, false), (3, false), (-1, true)],
            12288,
            "shared memory of 12288 bytes",
        ),
        (
            vec![(0, false), (3, false), (-1, true)],
            usize::MAX,
            "not sealed",
        ),
        (
            vec![(0, false), (3, false), (-1, true), (-7, true)],
            1 << 20,
            "client id -7",
        ),
        (vec![(0, false), (3, false), (-1, true)], 1 << 20, "hung up"),
    ];
    for (msgs, bytes, want) in cases {
        let path = fake_server(msgs, bytes);
        let r = super::IvshmemWindow::connect(&path, 0, 0, Duration::from_secs(2));
        let e = r.err().expect("a broken server accepted");
        assert!(e.to_string().contains(want), "{e} does not say {want}");
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn a_peer_that_starts_again_on_the_same_window_resets_its_channels_and_the_link_comes_back() {
    let server = IvServer::start(1 << 20);
    let mut n1 = Ntb::new(2, 0, Box::new(server.window(0)), 16384);
    let mut n2 = Ntb::new(1, 0, Box::new(server.window(1)), 16384);
    let settle = |a: &mut Ntb, b: &mut Ntb| {
        let mut r = Vec::new();
        for _ in 0..6 {
            a.poll(&mut r);
            b.poll(&mut r);
        }
    };
    settle(&mut n1, &mut n2);
    let to = |node, channel| Peer::Remote { node, channel };
    n1.open(7, to(2, 7)).unwrap();
    n2.open(7, to(1, 7)).unwrap();
    assert_eq!(n1.send(7, &[1u8; 5000]).unwrap(), 5000);
    // On channel 9, node 2's writer says its last words and resets.
    n1.open(9, to(2, 9)).unwrap();
    n2.open(9, to(1, 9)).unwrap();
    assert_eq!(n2.send(9, b"last words").unwrap(), 10);
    n2.send_mark(9, Mark::Reset).unwrap();
    // On channel 10, an end of stream, then a reset.
    n1.open(10, to(2, 10)).unwrap();
    n2.open(10, to(1, 10)).unwrap();
    assert_eq!(n2.send(10, b"all said").unwrap(), 8);
    n2.send_mark(10, Mark::Eos).unwrap();
    n2.send_mark(10, Mark::Reset).unwrap();
    settle(&mut n1, &mut n2);
    assert_eq!(n2.recv(7, &mut [0u8; 10]).unwrap(), Recv::Data(10));
    assert_eq!(n1.mark_arrived(9), Some(Mark::Reset));
    // Node 2's devd dies and starts again: the same memory, its words
    // still of the old epoch, positions far along.
    drop(n2);
    let mut n2 = Ntb::new(1, 0, Box::new(server.window(1)), 16384);
    settle(&mut n1, &mut n2);
    assert_eq!(
        n1.recv(7, &mut [0u8; 8]).unwrap(),
        Recv::Mark(Mark::Reset),
        "the old channel ended"
    );
    // What came before a reset stays readable, as on a TCP receiver.
    let mut b = [0u8; 16];
    assert_eq!(n1.recv(9, &mut b).unwrap(), Recv::Data(10));
    assert_eq!(&b[..10], b"last words");
    assert_eq!(n1.recv(9, &mut b).unwrap(), Recv::Mark(Mark::Reset));
    assert_eq!(n1.recv(10, &mut b).unwrap(), Recv::Data(8));
    assert_eq!(&b[..8], b"all said");
    assert_eq!(n1.recv(10, &mut b).unwrap(), Recv::Mark(Mark::Eos));
    assert_eq!(n1.mark_arrived(10), Some(Mark::Reset));
    // The link went down with the peer's channels (their connections
    // move to their kernel sockets), and comes up again at the next
    // heartbeats: no hostility, a restart is not an attack.
    assert!(
        n1.link_events()
            .iter()
            .any(|e| e.node == 2 && e.state == LinkState::Down),
        "the restart takes the link down"
    );
    let t = Instant::now();
    while !(n1.link_up() && n2.link_up()) {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the link comes up again"
        );
        std::thread::sleep(super::BEAT);
        settle(&mut n1, &mut n2);
    }
    // New channels flow both ways from position 0.
    n1.open(8, to(2, 8)).unwrap();
    n2.open(8, to(1, 8)).unwrap();
    assert_eq!(n1.send(8, b"again").unwrap(), 5);
    assert_eq!(n2.send(8, b"back").unwrap(), 4);
    settle(&mut n1, &mut n2);
    let mut b = [0u8; 8];
    assert_eq!(n2.recv(8, &mut b).unwrap(), Recv::Data(5));
    assert_eq!(&b[..5], b"again");
    assert_eq!(n1.recv(8, &mut b).unwrap(), Recv::Data(4));
    assert_eq!(&b[..4], b"back");
    assert_eq!(n2.counters().stale, 0, "nothing of the old epoch was read");
}

#[test]
fn a_hostile_inbox_silences_the_heartbeat_so_the_peer_sees_the_link_down() {
    let (mut n1, evil, _) = hostile_lab();
    evil.store(inbox::OFF_PROD, 10 << 20);
    let mut r = Vec::new();
    n1.poll(&mut r);
    let beat = evil.load(inbox::OFF_BEAT);
    std::thread::sleep(super::BEAT * 2);
    n1.poll(&mut r);
    assert_eq!(
        evil.load(inbox::OFF_BEAT),
        beat,
        "a hostile link is not kept alive"
    );
}

#[test]
fn a_consumer_word_beyond_what_was_published_takes_the_link_down() {
    let (mut n1, evil, ch) = hostile_lab();
    evil.store(inbox::OFF_CONS, 4096);
    ends_reset(&mut n1, ch);
}

#[test]
fn an_ivshmem_message_split_across_reads_is_put_back_together() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "ssock-ivshmem-split-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let shm = ssock_rings::sys::memfd_sealed("ivshmem-split", 1 << 20).unwrap();
        let own = ssock_rings::sys::EventFd::new().unwrap();
        let peer = ssock_rings::sys::EventFd::new().unwrap();
        let (c, _) = l.accept().unwrap();
        let say = |v: i64, fd: Option<std::os::fd::BorrowedFd<'_>>| {
            let fds: Vec<_> = fd.into_iter().collect();
            ssock_rings::sys::send_with_fds(c.as_fd(), &v.to_le_bytes(), &fds).unwrap();
        };
        say(0, None);
        say(3, None);
        say(-1, Some(shm.as_fd()));
        say(3, Some(own.as_fd()));
        wait.recv().unwrap();
        // Peer 5's doorbell, its 8 bytes in two writes.
        let b = 5i64.to_le_bytes();
        ssock_rings::sys::send_with_fds(c.as_fd(), &b[..3], &[peer.as_fd()]).unwrap();
        wait.recv().unwrap();
        ssock_rings::sys::send_with_fds(c.as_fd(), &b[3..], &[]).unwrap();
        wait.recv().unwrap();
    });
    let mut w = super::IvshmemWindow::connect(&path, 0, 0, Duration::from_secs(5)).unwrap();
    go.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    w.drain();
    assert!(w.peers().is_empty(), "half a message is no peer yet");
    go.send(()).unwrap();
    let t = Instant::now();
    while w.peers().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the split message never completed"
        );
        std::thread::sleep(Duration::from_millis(10));
        w.drain();
    }
    assert_eq!(w.peers(), vec![5]);
    go.send(()).unwrap();
    server.join().unwrap();
    let _ = std::fs::remove_file(&path);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Whatever a hostile peer writes into node 1's inbox (ring bytes,
    /// frames of every kind and length for its channel or another, the
    /// producer and consumer words), node 1 neither panics nor passes on
    /// more than the window: its channel either stays open with what came,
    /// or the link is down and the channel ended with Reset.
    #[test]
    fn whatever_the_inbox_holds_node_1_stays_sound(
        ring in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        frames in proptest::collection::vec((1u32..6, 0u32..24_000, proptest::prelude::any::<bool>(), proptest::prelude::any::<bool>()), 0..6),
        prod in proptest::prelude::any::<u64>(),
        cons in 0u64..64,
        exact in proptest::prelude::any::<bool>(),
        cons_zero in proptest::prelude::any::<bool>(),
    ) {
        let (mut n1, evil, ch) = hostile_lab();
        // Garbage, then some well-formed headers with wild values over it.
        evil.write(RING, &ring);
        // Headers back to back, each as long as it says (so that the
        // reader takes their payloads), for channel 5 from 6 or not.
        let mut pos = 0usize;
        for (kind, len, to_5, from_6) in frames {
            let len = if kind == 4 { 8 } else if kind == 1 { len.max(1) } else { len % 2 };
            let size = inbox::frame_size(usize::try_from(len).unwrap());
            if pos + size > 60_000 {
                break;
            }
            let mut h = [0u8; inbox::HDR];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[4..8].copy_from_slice(&len.to_le_bytes());
            h[8..16].copy_from_slice(&(if to_5 { ch } else { 77 }).to_le_bytes());
            h[16..24].copy_from_slice(&(if from_6 { 6u64 } else { 9 }).to_le_bytes());
            evil.write(RING + pos, &h);
            pos += size;
        }
        let p = if exact { u64::try_from(pos).unwrap() } else { prod };
        evil.store(inbox::OFF_PROD, p);
        // Node 1 published nothing: a consumer word above 0 is hostile.
        evil.store(inbox::OFF_CONS, if cons_zero { 0 } else { cons });
        let mut r = Vec::new();
        n1.poll(&mut r);
        n1.poll(&mut r);
        let mut got = 0usize;
        let mut buf = [0u8; 4096];
        loop {
            match n1.recv(ch, &mut buf).unwrap() {
                Recv::Data(n) if n > 0 => got += n,
                Recv::Mark(_) => break,
                _ => break,
            }
        }
        proptest::prop_assert!(got <= 16384, "{got} bytes passed on, over the window");
        if !n1.link_up() {
            // Ended: by Reset, or by an Eos that came before the garbage.
            let end = n1.recv(ch, &mut buf).unwrap();
            proptest::prop_assert!(matches!(end, Recv::Mark(_)), "{end:?}");
            proptest::prop_assert!(n1.send(ch, b"x").is_err());
        }
    }
}
