//! The hand-over around a stand-in transport whose region stops carrying
//! bytes when the test says so, on a real loopback TCP connection: what a
//! waiter is told and what it sleeps on once the writes moved back.

use super::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize};

/// A region end that carries nothing: its writes went in whole until
/// `lost`, then the hand-over takes back `owed` bytes to send again.
#[derive(Debug)]
struct Region {
    map: Arc<Mapping>,
    lost: Arc<AtomicBool>,
    owed: usize,
    /// Processes holding the end.
    holders: u32,
    /// Times its call eventfd (here a pipe's reading end) was emptied.
    drained: Arc<AtomicUsize>,
    call: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
}

impl Transport for Region {
    fn mode(&self) -> Mode {
        Mode::Queued
    }
    fn conn_id(&self) -> Option<u64> {
        Some(1)
    }
    fn read(&mut self, _: &mut [u8], _: &Ctx<'_>) -> io::Result<usize> {
        Err(would_block())
    }
    fn peek(&mut self, _: &mut [u8], _: &Ctx<'_>) -> io::Result<usize> {
        Err(would_block())
    }
    fn write(&mut self, buf: &[u8], _: &Ctx<'_>) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn shutdown_write(&mut self, _: &Ctx<'_>) -> io::Result<()> {
        Ok(())
    }
    fn close(&mut self) {}
    fn readiness(&mut self, _: &Ctx<'_>, _: bool) -> Ready {
        Ready::default()
    }
    fn arm(&mut self, _: &Ctx<'_>, _: bool, _: bool) -> Option<Vec<(RawFd, i16)>> {
        Some(Vec::new())
    }
    fn handover_words(&self) -> Option<(Arc<Mapping>, usize)> {
        Some((self.map.clone(), 0))
    }
    fn path_lost(&mut self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
    fn close_reads(&mut self) -> io::Result<u64> {
        Ok(0)
    }
    fn close_writes(&mut self) -> io::Result<(u64, Vec<u8>)> {
        Ok((0, vec![7; self.owed]))
    }
    fn reads_left(&self) -> Option<u64> {
        Some(0)
    }
    fn holders(&self) -> u32 {
        self.holders
    }
    fn offer_fd(&mut self, drain: bool) -> Option<RawFd> {
        if drain {
            self.drained.fetch_add(1, Ordering::Relaxed);
        }
        Some(self.call.0.as_raw_fd())
    }
}

/// A connected loopback pair with small buffers: (this end, its peer).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    socket2::SockRef::from(&a)
        .set_send_buffer_size(16 << 10)
        .unwrap();
    socket2::SockRef::from(&b)
        .set_recv_buffer_size(16 << 10)
        .unwrap();
    (a, b)
}

/// A connector end whose acceptor claimed it, its writes in the region
/// (`remote`: its acceptor on another host); and how often its call
/// eventfd was emptied.
fn moved_end(owed: usize, remote: bool) -> (Box<dyn Transport>, Arc<AtomicBool>, Arc<AtomicUsize>) {
    end_with(owed, remote, 1, false, true)
}

/// `moved_end` held by `holders` processes, taken over from another
/// process if `adopted`, its acceptor's claim pending unless `claimed`.
fn end_with(
    owed: usize,
    remote: bool,
    holders: u32,
    adopted: bool,
    claimed: bool,
) -> (Box<dyn Transport>, Arc<AtomicBool>, Arc<AtomicUsize>) {
    let fd = ssock_rings::sys::memfd_unsealed("handover-test", layout::HOV_PAGE).unwrap();
    let map = Arc::new(Mapping::map(fd.as_fd(), layout::HOV_PAGE, true).unwrap());
    assert!(!claimed || layout::accept_claim(&map));
    if remote {
        map.u32_at(layout::hov::REMOTE).store(1, Ordering::Release);
    }
    let lost = Arc::new(AtomicBool::new(false));
    let drained = Arc::new(AtomicUsize::new(0));
    let (r, w) = std::io::pipe().unwrap();
    let region = Region {
        map,
        lost: lost.clone(),
        owed,
        holders,
        drained: drained.clone(),
        call: (r.into(), w.into()),
    };
    let end = if adopted {
        // (Its first holder moved its writes to the region.)
        layout::publish_switch(&region.map, 0, Switch::After(0));
        Handover::adopt(Box::new(region))
    } else {
        Handover::wrap(Box::new(region))
    };
    (end, lost, drained)
}

fn ctx(tcp: &TcpStream) -> Ctx<'_> {
    Ctx {
        tcp: tcp.as_fd(),
        nonblocking: true,
        deadline: None,
        spin: std::time::Duration::ZERO,
        check_peer: false,
        plain: false,
    }
}

/// Reads what the peer's socket holds now, without waiting.
fn drain(peer: &mut TcpStream) -> usize {
    peer.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0;
    while let Ok(k) = peer.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k;
    }
    n
}

#[test]
fn a_writer_owing_bytes_again_sleeps_on_room_that_its_readiness_look_fills() {
    let (tcp, mut peer) = pair();
    let (mut end, lost, _) = moved_end(16 << 20, false);
    let c = ctx(&tcp);
    assert_eq!(end.write(b"in the region", &c).unwrap(), 13);
    // The link fails: the end owes 16 MiB again on the kernel socket,
    // more than it takes at once.
    lost.store(true, Ordering::Relaxed);
    assert_eq!(
        end.write(b"more", &c).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    // The peer reads a part: the socket has room again when the waiter
    // arms, and its look after arming (a poll's scan) fills it again.
    let room = || {
        let mut p = [PollFd::new(tcp.as_raw_fd(), libc::POLLOUT)];
        ssock_rings::sys::poll(&mut p, Some(std::time::Duration::ZERO)).unwrap() == 1
    };
    while !room() {
        drain(&mut peer);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let set = end.arm(&c, false, true).expect("armed");
    let ready = end.readiness(&c, false);
    // Either it says writable, or what it sleeps on wakes it when the
    // socket has room: never a sleep on nothing.
    let tcp_fd = tcp.as_raw_fd();
    let watches_room = set
        .iter()
        .any(|&(fd, ev)| fd == tcp_fd && ev & libc::POLLOUT != 0);
    assert!(
        ready.writable || watches_room,
        "not writable, and it sleeps on {set:?}"
    );
    end.disarm(false, true);
}

#[test]
fn a_sleeper_armed_on_the_region_keeps_its_wake_up_when_another_finds_the_region_lost() {
    let (tcp, _peer) = pair();
    let (mut end, lost, drained) = moved_end(0, true);
    let c = ctx(&tcp);
    // One thread asleep on the region (devd rings its call eventfd when
    // the two hosts agreed where the connection goes on).
    let on_region = end.generation();
    end.arm(&c, true, false).expect("armed");
    // Another finds the region lost and sleeps on the kernel socket and
    // devd's offer: it must not empty the eventfd the first one waits on.
    lost.store(true, Ordering::Relaxed);
    let _ = end.readiness(&c, false);
    assert_ne!(end.generation(), on_region);
    let after = end.generation();
    end.arm(&c, true, false).expect("armed");
    assert_eq!(drained.load(Ordering::Relaxed), 0);
    end.disarm_from(true, false, after);
    // Once the first one left, a sleep empties it (and then looks at
    // FORWARD itself).
    end.disarm_from(true, false, on_region);
    end.arm(&c, true, false).expect("armed");
    assert_eq!(drained.load(Ordering::Relaxed), 1);
    end.disarm_from(true, false, after);
}

/// A remote connector's read once its peer's FIN came while the
/// acceptor's CLAIM was not relayed yet (`matched`: this host's devd
/// matched the acceptor's Claim).
fn read_at_fin_with_claim_pending(matched: bool) -> io::Result<usize> {
    let (tcp, peer) = pair();
    let (mut end, _, _) = moved_end(0, true);
    let map = end.handover_words().expect("words").0;
    map.u32_at(layout::hov::CLAIM)
        .store(layout::CLAIM_PENDING, Ordering::Release);
    if matched {
        layout::mark_matched(&map);
    }
    drop(peer);
    std::thread::sleep(std::time::Duration::from_millis(20));
    end.read(&mut [0u8; 16], &ctx(&tcp))
}

#[test]
fn a_connector_whose_acceptor_on_another_host_was_matched_does_not_take_its_fin_for_the_end() {
    // Not matched by this host's devd: the acceptor's writes never moved,
    // and its FIN is the stream's end.
    assert_eq!(read_at_fin_with_claim_pending(false).unwrap(), 0);
    // Matched: its writes may have moved, their offset on its way.
    assert_eq!(
        read_at_fin_with_claim_pending(true).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
}

#[test]
fn an_end_taken_over_after_its_writes_moved_back_sends_nothing_again() {
    // The process this end came from moved its writes back and sent all it
    // owed (END at the socket's end); the region still holds those bytes
    // past where the reader closed. Taken over with nothing written into
    // the region since, the end sends none of them again; an end that
    // did not come that way (its own writes) sends them.
    for (adopted, sent) in [(true, 1), (false, 101)] {
        let (tcp, mut peer) = pair();
        let (mut end, lost, _) = end_with(100, false, 1, adopted, true);
        let c = ctx(&tcp);
        if !adopted {
            assert_eq!(end.write(b"in the region", &c).unwrap(), 13);
        }
        let map = end.handover_words().expect("words").0;
        layout::publish_end_at_fin(&map, 0);
        lost.store(true, Ordering::Relaxed);
        // Then one byte on the kernel socket, after what it owes.
        assert_eq!(end.write(b"y", &c).unwrap(), 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(drain(&mut peer), sent, "taken over: {adopted}");
    }
}

#[test]
fn a_shared_end_that_cannot_move_back_resets_its_kernel_connection_at_once() {
    // Two processes hold the end and it owes bytes again: nobody can tell
    // which of them sends them, so the connection is reset, on the kernel
    // socket now (another holder, gone to stdio, may keep that socket open
    // past this one's close and end it with a FIN).
    let (tcp, mut peer) = pair();
    let (mut end, lost, _) = end_with(100, false, 2, false, true);
    lost.store(true, Ordering::Relaxed);
    let r = end.write(b"x", &ctx(&tcp));
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ECONNRESET));
    peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let got = peer.read(&mut [0u8; 16]);
    assert_eq!(
        got.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset),
        "the peer should see a reset"
    );
}

#[test]
fn a_connector_whose_acceptor_answers_on_the_kernel_socket_without_its_end_turns_plain() {
    // The acceptor accepted without taking its end (CLAIM still pending)
    // and answered on the kernel socket: the connector reads the answer,
    // says kernel in CLAIM (a claim answered late then moves nobody) and
    // lets its end go; its later writes are the kernel socket's.
    let (tcp, mut peer) = pair();
    let (mut end, _, _) = end_with(0, false, 1, false, false);
    let map = end.handover_words().expect("words").0;
    let c = ctx(&tcp);
    assert_eq!(end.write(b"request", &c).unwrap(), 7);
    assert_eq!(drain(&mut peer), 7);
    assert_eq!(end.mode(), Mode::Queued, "pending: still the region's");
    peer.write_all(b"answer").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut buf = [0u8; 16];
    assert_eq!(end.read(&mut buf, &c).unwrap(), 6);
    assert_eq!(&buf[..6], b"answer");
    assert_eq!(end.mode(), Mode::Kernel);
    assert_eq!(layout::claim(&map), layout::CLAIM_KERNEL);
    assert!(!layout::accept_claim(&map), "a late claim must not move");

    // On another host CLAIM comes through the devds, later than the bytes:
    // the connector waits for it.
    let (tcp, mut peer) = pair();
    let (mut end, _, _) = end_with(0, true, 1, false, false);
    let map = end.handover_words().expect("words").0;
    peer.write_all(b"answer").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let got = end.read(&mut buf, &ctx(&tcp));
    assert_ne!(end.mode(), Mode::Kernel, "{got:?}");
    assert_eq!(layout::claim(&map), layout::CLAIM_PENDING);
}
