//! The conformance suite every backend passes (each backend's `tests.rs`
//! runs [`run_all`] on a [`Lab`] of its own): ordered bytes then the end
//! mark, the window, sent and acknowledged offsets, resets, what `poll`
//! names, errors, many channels at once, a long stream checked byte by
//! byte.
//!
//! A lab is one backend instance for a local-only backend, or two (two
//! "nodes") joined by a link for a remote one; `settle` lets what is in
//! flight arrive. The suite asserts only what the `Backend` trait
//! promises, so that the engine can rely on exactly that.
//!
//! Never here: a backend's private behaviour, timing.

use crate::{Backend, BackendError, ChannelId, Mark, Peer, Recv};

/// One end of a channel pair: which of the lab's backends, which channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    /// Index of the backend in the lab.
    pub at: usize,
    /// The channel id on that backend.
    pub ch: ChannelId,
}

/// What the suite drives.
pub trait Lab {
    /// Opens a fresh pair of connected channels.
    fn pair(&mut self) -> [End; 2];
    /// The backend at `i`.
    fn backend(&mut self, i: usize) -> &mut dyn Backend;
    /// Lets what is in flight between the backends arrive (remote
    /// backends: poll every side until nothing moves).
    fn settle(&mut self);
    /// Every channel `Backend::poll` named on backend `at` since the last
    /// call, `settle`'s polls included.
    fn poll(&mut self, at: usize) -> Vec<ChannelId>;
}

/// Two backends, nodes 1 and 2 (at 0 and 1), joined by a link: the lab of
/// a backend between hosts. With `local_too`, every other pair is two
/// local channels on node 1 (a backend that reaches both).
pub struct Linked<B: Backend> {
    /// Node 1's backend, node 2's.
    pub b: [B; 2],
    named: [Vec<ChannelId>; 2],
    next: ChannelId,
    local_too: bool,
}

impl<B: Backend> Linked<B> {
    /// The lab over `b`, settled (both sides see each other).
    pub fn new(b: [B; 2], local_too: bool) -> Linked<B> {
        let mut n = Linked {
            b,
            named: [Vec::new(), Vec::new()],
            next: 100,
            local_too,
        };
        n.settle();
        n.named = [Vec::new(), Vec::new()];
        n
    }
}

impl<B: Backend> Lab for Linked<B> {
    fn pair(&mut self) -> [End; 2] {
        // The same channel id on both nodes: the suite must not care.
        let ch = self.next;
        self.next += 2;
        if self.local_too && ch.is_multiple_of(4) {
            self.b[0].open(ch, Peer::Local(ch + 1)).expect("open");
            self.b[0].open(ch + 1, Peer::Local(ch)).expect("open");
            return [End { at: 0, ch }, End { at: 0, ch: ch + 1 }];
        }
        for (i, node) in [(0, 2), (1, 1)] {
            let peer = Peer::Remote { node, channel: ch };
            self.b[i].open(ch, peer).expect("open");
        }
        [End { at: 0, ch }, End { at: 1, ch }]
    }

    fn backend(&mut self, i: usize) -> &mut dyn Backend {
        &mut self.b[i]
    }

    fn settle(&mut self) {
        for _ in 0..6 {
            for i in 0..2 {
                self.b[i].poll(&mut self.named[i]);
            }
        }
    }

    fn poll(&mut self, at: usize) -> Vec<ChannelId> {
        self.b[at].poll(&mut self.named[at]);
        std::mem::take(&mut self.named[at])
    }
}

/// One case of the suite.
type Case = fn(&mut dyn Lab);

/// Runs every case, each on a fresh lab from `make`; a failure names its
/// case.
pub fn run_all(make: &mut dyn FnMut() -> Box<dyn Lab>) {
    let cases: [(&str, Case); 13] = [
        ("bytes_in_order_then_the_mark", bytes_in_order_then_the_mark),
        ("words_arrive_latest_first", words_arrive_latest_first),
        (
            "the_window_limits_bytes_in_flight",
            the_window_limits_bytes_in_flight,
        ),
        (
            "offsets_count_sent_and_acknowledged",
            offsets_count_sent_and_acknowledged,
        ),
        (
            "closing_without_a_mark_resets_the_peer",
            closing_without_a_mark_resets_the_peer,
        ),
        (
            "a_reset_comes_after_the_bytes_sent_before_it",
            a_reset_comes_after_the_bytes_sent_before_it,
        ),
        (
            "a_reset_after_a_partial_receive_harms_nothing_else",
            a_reset_after_a_partial_receive_harms_nothing_else,
        ),
        (
            "a_reset_after_the_end_of_stream_is_told_and_the_end_stays",
            a_reset_after_the_end_of_stream_is_told_and_the_end_stays,
        ),
        (
            "poll_names_the_channels_that_changed",
            poll_names_the_channels_that_changed,
        ),
        ("misuse_gets_errors", misuse_gets_errors),
        (
            "a_failed_fill_or_a_partial_take_loses_nothing",
            a_failed_fill_or_a_partial_take_loses_nothing,
        ),
        ("many_channels_stay_apart", many_channels_stay_apart),
        (
            "a_long_stream_arrives_exactly",
            a_long_stream_arrives_exactly,
        ),
    ];
    let w = make().backend(0).capabilities().window;
    assert!(
        w >= 4096,
        "the suite needs a window of at least 4 KiB, not {w}"
    );
    for (name, case) in cases {
        let mut lab = make();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(lab.as_mut())));
        if let Err(e) = r {
            let what = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("conformance case {name} failed: {what}");
        }
    }
    let mut lab = make();
    let b = lab.backend(0);
    if b.capabilities().passive {
        assert!(
            b.readiness().is_empty() && b.deadline().is_none(),
            "a passive backend has no news of its own"
        );
    }
    for s in b.syscalls() {
        assert!(
            s.nr >= 0 && !s.why.is_empty(),
            "syscall without a reason: {s:?}"
        );
    }
}

fn send(lab: &mut dyn Lab, e: End, data: &[u8]) -> Result<usize, BackendError> {
    lab.backend(e.at).send(e.ch, data)
}

fn recv(lab: &mut dyn Lab, e: End, buf: &mut [u8]) -> Recv {
    lab.backend(e.at)
        .recv(e.ch, buf)
        .expect("recv on an open channel")
}

/// Receives everything that arrived on `e` (until Empty or a mark).
fn drain(lab: &mut dyn Lab, e: End) -> (Vec<u8>, Option<Mark>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match recv(lab, e, &mut buf) {
            Recv::Data(0) | Recv::Empty => return (got, None),
            Recv::Data(n) => got.extend_from_slice(&buf[..n]),
            Recv::Mark(m) => return (got, Some(m)),
        }
    }
}

/// `send_with` whose source fails queues nothing; `recv_with` takes only
/// what its caller says it took, the rest stays in order.
fn a_failed_fill_or_a_partial_take_loses_nothing(lab: &mut dyn Lab) {
    let [a, b] = lab.pair();
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    // Small and large (a backend may copy them differently).
    for len in [100, data.len()] {
        let r = lab.backend(a.at).send_with(a.ch, len, &mut |_, _| false);
        assert_eq!(
            r.expect("send_with on an open channel"),
            0,
            "a failed fill sent bytes"
        );
    }
    let sent = lab.backend(a.at).offsets(a.ch).expect("open").sent;
    assert_eq!(sent, 0, "a failed fill counted as sent");
    let mut off = 0;
    while off < data.len() {
        let mut asked = 0;
        let n = lab
            .backend(a.at)
            .send_with(a.ch, data.len() - off, &mut |at, dst| {
                assert_eq!(at, asked, "pieces out of order");
                asked += dst.len();
                dst.copy_from(&data[off + at..off + at + dst.len()]);
                true
            })
            .expect("send_with on an open channel");
        assert!(n > 0 && n == asked, "accepted {n}, filled {asked}");
        off += n;
        lab.settle();
        // Nothing taken: nothing consumed.
        let r = lab.backend(b.at).recv_with(b.ch, &mut |_| 0);
        assert!(matches!(r, Ok(Recv::Data(0))), "{r:?}");
    }
    // Taken 100 bytes at a time, in order, from both pieces.
    let mut got = Vec::new();
    loop {
        let mut left = 100;
        let r = lab.backend(b.at).recv_with(b.ch, &mut |p| {
            let mut part = vec![0u8; left.min(p.len())];
            let k = p.copy_to(&mut part[..]);
            got.extend_from_slice(&part[..k]);
            left -= k;
            k
        });
        match r.expect("recv_with on an open channel") {
            Recv::Data(n) if n > 0 => assert!(n <= 100),
            _ => break,
        }
        lab.settle();
    }
    assert!(
        got == data,
        "{} bytes back of {}, or not in order",
        got.len(),
        data.len()
    );
}

fn window(lab: &mut dyn Lab, e: End) -> usize {
    lab.backend(e.at).capabilities().window
}

fn bytes_in_order_then_the_mark(lab: &mut dyn Lab) {
    let [a, b] = lab.pair();
    assert_eq!(send(lab, a, b"hello ").unwrap(), 6);
    assert_eq!(send(lab, a, b"world").unwrap(), 5);
    lab.backend(a.at).send_mark(a.ch, Mark::Eos).unwrap();
    lab.settle();
    let mut buf = [0u8; 8];
    assert_eq!(recv(lab, b, &mut buf), Recv::Data(8));
    assert_eq!(&buf, b"hello wo");
    assert_eq!(recv(lab, b, &mut buf), Recv::Data(3));
    assert_eq!(&buf[..3], b"rld");
    assert_eq!(recv(lab, b, &mut buf), Recv::Mark(Mark::Eos));
    assert_eq!(
        recv(lab, b, &mut buf),
        Recv::Mark(Mark::Eos),
        "a mark stays"
    );
    assert_eq!(send(lab, a, b"x"), Err(BackendError::Ended(a.ch)));
    // The other direction is still open.
    assert_eq!(send(lab, b, b"back").unwrap(), 4);
    lab.settle();
    assert_eq!(drain(lab, a), (b"back".to_vec(), None));
}

/// Words go beside the bytes, to the peer channel only; the latest one
/// sent is what arrives last, and each is taken once.
fn words_arrive_latest_first(lab: &mut dyn Lab) {
    let [a, b] = lab.pair();
    let [c, d] = lab.pair();
    assert_eq!(lab.backend(b.at).recv_words(b.ch), None);
    lab.backend(a.at).send_words(a.ch, [1, 2, 3, 4]).unwrap();
    send(lab, a, b"between").unwrap();
    lab.backend(a.at).send_words(a.ch, [5, 6, 7, 8]).unwrap();
    lab.backend(d.at).send_words(d.ch, [9, 9, 9, 9]).unwrap();
    lab.settle();
    assert!(lab.poll(b.at).contains(&b.ch), "poll names the channel");
    assert_eq!(lab.backend(b.at).recv_words(b.ch), Some([5, 6, 7, 8]));
    assert_eq!(lab.backend(b.at).recv_words(b.ch), None);
    assert_eq!(lab.backend(c.at).recv_words(c.ch), Some([9, 9, 9, 9]));
    assert_eq!(lab.backend(d.at).recv_words(d.ch), None);
    assert_eq!(lab.backend(a.at).recv_words(a.ch), None);
    let (got, _) = drain(lab, b);
    assert_eq!(got, b"between");
    assert!(matches!(
        lab.backend(a.at).send_words(99_999, [0; 4]),
        Err(BackendError::NoChannel(_))
    ));
}

fn the_window_limits_bytes_in_flight(lab: &mut dyn Lab) {
    let [a, b] = lab.pair();
    let w = window(lab, a);
    let big = vec![7u8; w + 100];
    let mut took = 0;
    for _ in 0..4 {
        took += send(lab, a, &big[took..]).unwrap();
        lab.settle();
    }
    assert_eq!(took, w, "a full window takes exactly {w} bytes");
    assert_eq!(
        send(lab, a, b"more").unwrap(),
        0,
        "no room while the window is full"
    );
    lab.settle();
    lab.poll(a.at);
    let mut buf = vec![0u8; 100];
    assert_eq!(recv(lab, b, &mut buf), Recv::Data(100));
    lab.settle();
    let named = lab.poll(a.at);
    assert!(named.contains(&a.ch), "room came back: poll said {named:?}");
    let mut more = 0;
    for _ in 0..4 {
        more += send(lab, a, &big[..100 - more]).unwrap();
        lab.settle();
    }
    assert_eq!(more, 100, "room comes back as the peer receives");
    assert_eq!(lab.backend(b.at).pending(b.ch), w);
}

fn offsets_count_sent_and_acknowledged(lab: &mut dyn Lab) {
    let [a, b] = lab.pair();
    let o = lab.backend(a.at).offsets(a.ch).unwrap();
    assert_eq!((o.sent, o.acked), (0, 0));
    assert_eq!(send(lab, a, &[1u8; 1000]).unwrap(), 1000);
    lab.settle();
    let o = lab.backend(a.at).offsets(a.ch).unwrap();
    assert_eq!((o.sent, o.acked), (1000, 0), "nothing taken yet");
    let mut buf = [0u8; 300];
    assert_eq!(recv(lab, b, &mut buf), Recv::Data(300));
    lab.settle();
    let o = lab.backend(a.at).offsets(a.ch).unwrap();
    assert_eq!(o.sent, 1000);
    assert!(o.acked <= 300, "acknowledged beyond what was taken: {o:?}");
    drain(lab, b);
    lab.settle();
    let o = lab.backend(a.at).offsets(a.ch).unwrap();
    assert_eq!((o.sent, o.acked), (1000, 1000));
    let o = lab.backend(b.at).offsets(b.ch).unwrap();
    assert_eq!((o.sent, o.acked), (0, 0), "the other direction is its own");
}

fn closing_without_a_mark_resets_the_peer(lab: &mut dyn Lab) {
    let [a, b] = lab.pair();
    send(lab, a, b"abc").unwrap();
    send(lab, b, b"unread by a").unwrap();
    lab.settle();
    lab.poll(b.at);
    lab.backend(a.at).close(a.ch);
    lab.settle();
    let named = lab.poll(b.at);
    assert!(named.contains(&b.ch), "the peer went: poll said {named:?}");
    let mut buf = [0u8; 4];
    assert_eq!(recv(lab, b, &mut buf), Recv::Mark(Mark::Reset));
    assert!(
        send(lab, b, b"x").is_err(),
        "sending to a closed peer fails"
    );
    let o = lab.backend(b.at).offsets(b.ch).unwrap();
    assert_eq!(
        o.acked, o.sent,
        "bytes a closed peer never takes wait for nobody"
    );
    assert_eq!(lab.backend(a.at).offsets(a.ch), None);
}

fn a_reset_comes_after_the_bytes_sent_before_it(lab: &mut dyn Lab) {
    let [a, b] = lab.pair();
    send(lab, a, &[9u8; 500]).unwrap();
    lab.backend(a.at).send_mark(a.ch, Mark::Reset).unwrap();
    let o = lab.backend(a.at).offsets(a.ch).unwrap();
    assert_eq!(
        (o.sent, o.acked),
        (500, 500),
        "a reset's sender waits for no acknowledgement"
    );
    lab.settle();
    // Known before the bytes are taken (as the kernel's error on an RST).
    let be = lab.backend(b.at);
    assert_eq!(
        (be.pending(b.ch), be.mark_arrived(b.ch)),
        (500, Some(Mark::Reset))
    );
    assert!(!be.end_before_reset(b.ch), "a reset with no end before it");
    // As a TCP receiver keeps what came before an RST: the bytes, then
    // the mark.
    assert_eq!(drain(lab, b), (vec![9u8; 500], Some(Mark::Reset)));
    // An orderly end too.
    let [c, d] = lab.pair();
    send(lab, c, &[3u8; 500]).unwrap();
    lab.backend(c.at).send_mark(c.ch, Mark::Eos).unwrap();
    lab.backend(c.at).close(c.ch);
    lab.settle();
    assert_eq!(drain(lab, d), (vec![3u8; 500], Some(Mark::Eos)));
}

/// An abortive close after shutdown(SHUT_WR): the reset is known (the
/// kernel's EPIPE for an RST after the FIN), the reader still reads the
/// bytes and then the end of stream; nothing follows but that one reset.
fn a_reset_after_the_end_of_stream_is_told_and_the_end_stays(lab: &mut dyn Lab) {
    let [a, b] = lab.pair();
    send(lab, a, &[5u8; 300]).unwrap();
    lab.backend(a.at).send_mark(a.ch, Mark::Eos).unwrap();
    lab.settle();
    assert_eq!(lab.backend(b.at).mark_arrived(b.ch), Some(Mark::Eos));
    assert_eq!(drain(lab, b), (vec![5u8; 300], Some(Mark::Eos)));
    lab.backend(a.at).send_mark(a.ch, Mark::Reset).unwrap();
    // A second end of stream, or anything after the reset, is nothing.
    lab.backend(a.at).send_mark(a.ch, Mark::Eos).unwrap();
    lab.settle();
    let be = lab.backend(b.at);
    assert_eq!(be.mark_arrived(b.ch), Some(Mark::Reset), "the reset told");
    assert!(be.end_before_reset(b.ch), "after the end of stream");
    assert_eq!(recv(lab, b, &mut [0u8; 8]), Recv::Mark(Mark::Eos));
    // Both came before the reader took anything: the same.
    let [c, d] = lab.pair();
    send(lab, c, &[6u8; 200]).unwrap();
    lab.backend(c.at).send_mark(c.ch, Mark::Eos).unwrap();
    lab.backend(c.at).send_mark(c.ch, Mark::Reset).unwrap();
    let o = lab.backend(c.at).offsets(c.ch).unwrap();
    assert_eq!(o.acked, o.sent, "a reset's sender waits for nothing");
    lab.settle();
    assert_eq!(lab.backend(d.at).mark_arrived(d.ch), Some(Mark::Reset));
    assert!(lab.backend(d.at).end_before_reset(d.ch));
    assert_eq!(drain(lab, d), (vec![6u8; 200], Some(Mark::Eos)));
}

fn a_reset_after_a_partial_receive_harms_nothing_else(lab: &mut dyn Lab) {
    let [a, b] = lab.pair();
    let [c, d] = lab.pair();
    send(lab, a, &[4u8; 1000]).unwrap();
    lab.settle();
    // b takes some (its acknowledgement not sent yet), then a resets.
    assert_eq!(recv(lab, b, &mut [0u8; 100]), Recv::Data(100));
    lab.backend(a.at).send_mark(a.ch, Mark::Reset).unwrap();
    lab.settle();
    assert_eq!(drain(lab, b), (vec![4u8; 900], Some(Mark::Reset)));
    lab.settle();
    let o = lab.backend(a.at).offsets(a.ch).unwrap();
    assert_eq!((o.sent, o.acked), (1000, 1000), "late acknowledgements");
    // Another connection is unharmed, both ways.
    assert_eq!(send(lab, c, b"still here").unwrap(), 10);
    assert_eq!(send(lab, d, b"and back").unwrap(), 8);
    lab.settle();
    assert_eq!(drain(lab, d), (b"still here".to_vec(), None));
    assert_eq!(drain(lab, c), (b"and back".to_vec(), None));
}

fn poll_names_the_channels_that_changed(lab: &mut dyn Lab) {
    let [a, b] = lab.pair();
    let [c, _] = lab.pair();
    let polled = |lab: &mut dyn Lab, at: usize| {
        lab.settle();
        lab.poll(at)
    };
    polled(lab, a.at);
    polled(lab, b.at);
    send(lab, a, b"ping").unwrap();
    let r = polled(lab, b.at);
    assert!(
        r.contains(&b.ch),
        "bytes arrived for {}: poll said {r:?}",
        b.ch
    );
    assert!(!r.contains(&c.ch), "an idle channel named: {r:?}");
    let mut buf = [0u8; 4];
    assert_eq!(recv(lab, b, &mut buf), Recv::Data(4));
    let r = polled(lab, a.at);
    assert!(r.contains(&a.ch), "a's bytes were taken: poll said {r:?}");
    lab.backend(b.at).send_mark(b.ch, Mark::Eos).unwrap();
    let r = polled(lab, a.at);
    assert!(r.contains(&a.ch), "a mark arrived for a: poll said {r:?}");
}

fn misuse_gets_errors(lab: &mut dyn Lab) {
    let [a, b] = lab.pair();
    let peer = crate::Peer::Local(b.ch);
    let be = lab.backend(a.at);
    assert!(matches!(
        be.open(a.ch, peer),
        Err(BackendError::Busy(_) | BackendError::Unreachable(_))
    ));
    let none: ChannelId = 0xdead_beef_0000;
    assert_eq!(be.send(none, b"x"), Err(BackendError::NoChannel(none)));
    assert_eq!(
        be.recv(none, &mut [0u8; 4]),
        Err(BackendError::NoChannel(none))
    );
    assert_eq!(
        be.send_mark(none, Mark::Eos),
        Err(BackendError::NoChannel(none))
    );
    assert_eq!(be.pending(none), 0);
    assert_eq!(be.offsets(none), None);
    be.close(none);
    // A mark twice is one mark.
    be.send_mark(a.ch, Mark::Eos).unwrap();
    be.send_mark(a.ch, Mark::Reset).unwrap();
    lab.settle();
    assert_eq!(recv(lab, b, &mut [0u8; 4]), Recv::Mark(Mark::Eos));
    // An empty send moves nothing.
    assert_eq!(send(lab, b, &[]).unwrap(), 0);
}

/// A small deterministic generator (xorshift64*): the suite needs varied
/// sizes, not randomness.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }
}

/// Byte `i` of stream `s`: every stream and offset differs.
fn byte(s: usize, i: usize) -> u8 {
    (i.wrapping_mul(31) ^ s.wrapping_mul(131) ^ (i >> 8)).to_le_bytes()[0]
}

/// Streams `len` bytes each way over every pair at once, in chunks of
/// varied size and interleaved, and checks each byte where it lands.
fn streams(lab: &mut dyn Lab, pairs: &[[End; 2]], len: usize, seed: u64) {
    let ends: Vec<End> = pairs.iter().flatten().copied().collect();
    let mut sent = vec![0usize; ends.len()];
    let mut got = vec![0usize; ends.len()];
    let mut g = Gen(seed);
    let mut buf = vec![0u8; 70_000];
    let mut idle = 0;
    while got.iter().any(|&n| n < len) {
        let mut moved = false;
        for (k, &end) in ends.iter().enumerate() {
            // End k sends stream k; its peer (k ^ 1) receives it.
            if sent[k] < len {
                let n = (1 + g.below(65_536)).min(len - sent[k]);
                let chunk: Vec<u8> = (sent[k]..sent[k] + n).map(|i| byte(k, i)).collect();
                let took = send(lab, end, &chunk).unwrap();
                sent[k] += took;
                moved |= took > 0;
            }
        }
        lab.settle();
        for (k, &end) in ends.iter().enumerate() {
            let from = k ^ 1;
            let want = 1 + g.below(buf.len());
            match recv(lab, end, &mut buf[..want]) {
                Recv::Data(n) => {
                    for (j, &b) in buf[..n].iter().enumerate() {
                        let i = got[from] + j;
                        assert_eq!(b, byte(from, i), "stream {from}, byte {i}");
                    }
                    got[from] += n;
                    moved |= n > 0;
                }
                Recv::Empty => {}
                Recv::Mark(m) => panic!("stream {from} ended ({m:?}) at {}", got[from]),
            }
            assert!(got[from] <= len, "stream {from} longer than sent");
        }
        idle = if moved { 0 } else { idle + 1 };
        assert!(idle < 1000, "nothing moved: sent {sent:?}, got {got:?}");
    }
}

fn many_channels_stay_apart(lab: &mut dyn Lab) {
    let pairs: Vec<[End; 2]> = (0..8).map(|_| lab.pair()).collect();
    streams(lab, &pairs, 300_000, 0x5eed);
}

fn a_long_stream_arrives_exactly(lab: &mut dyn Lab) {
    let p = lab.pair();
    streams(lab, &[p], 4 << 20, 0xfeed);
    lab.settle();
    let o = lab.backend(p[0].at).offsets(p[0].ch).unwrap();
    assert_eq!((o.sent, o.acked), (4 << 20, 4 << 20));
}
