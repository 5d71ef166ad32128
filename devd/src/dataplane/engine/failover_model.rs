//! A model of a connection between two hosts (made while their link is
//! up, or down) whose link fails and comes back, driven by proptest through random interleavings of writes, the
//! writers' moves, the engines' takes, the link's deliveries, relayed
//! words, reads, the link's failure and return, each engine noticing it,
//! the devds' Failover messages (delayed, said again), the clients moving
//! back, and fail-forward: a new connection on the same two sockets whose
//! ends each client takes when it may (the connector first), on which the
//! same can happen again. On real hand-over pages, with the words
//! functions the clients and engines use (`layout`, `relay`) and the
//! engine's own page logic (`start_page`, `our_part`, `agree_page`). The
//! clients' part follows docs/protocol.md 2.3, 2.4, 8.5 and 8.6: a move's
//! offset is a count of the kernel socket's whole stream (every byte the
//! writer put there, every byte the reader took from there), so a reader
//! whose writer is on a newer connection still reads the right bytes off
//! the socket. Checked: each reader gets exactly its writer's stream, in
//! order; a writer always still holds the bytes it must send again; no
//! step of an honest agreement is refused.
//!
//! A fixed seed in CI (`SEED`); a larger run:
//! `PROPTEST_CASES=20000 cargo test -p ssock-devd failover::model`
//! (and `PROPTEST_RNG_SEED=N` for another seed).

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use ssock_rings::layout::{self, Switch, Taken};
use ssock_rings::relay::{self, Words};
use ssock_rings::relay::{agree_page, our_part, start_page};
use ssock_rings::Mapping;
use std::collections::VecDeque;

/// The seed CI runs with.
const SEED: u64 = 0x55_0c_fa_11;

/// A number from the environment, else `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn page() -> Mapping {
    let fd = ssock_rings::sys::memfd_sealed("failover-model", layout::HOV_PAGE).unwrap();
    Mapping::map(std::os::fd::AsFd::as_fd(&fd), layout::HOV_PAGE, true).unwrap()
}

/// One direction of the whole stream: its writer is end `d`, its reader
/// end `1 - d`, whatever connection each is on.
#[derive(Default)]
struct Stream {
    /// Stream bytes the writing program wrote.
    written: u64,
    /// The kernel socket: stream offsets in the order they are on it.
    tcp: VecDeque<u64>,
    /// Bytes the writer put on the kernel socket, and the reader took
    /// from it, since the start (what a SWITCH counts after a move
    /// forward, and TCP_READ).
    sock_out: u64,
    sock_in: u64,
    /// The stream the reading program got, in order.
    got: Vec<u64>,
}

/// One direction on one connection.
#[derive(Default)]
struct Dir {
    /// Where the writer moved to the region: the stream offset of its
    /// first region byte, once it did.
    moved_at: Option<u64>,
    /// The writer stays on the kernel socket for good (SWITCH = NEVER).
    pinned: bool,
    /// Region bytes the writer posted, and what it still holds from
    /// `kept` on: its TX buffers not given back, which its engine gives
    /// back once acknowledged (`acked`: what the reader's engine gave the
    /// reader, as the writer's host last heard it over the link).
    posted: u64,
    kept: u64,
    acked: u64,
    /// The writer moved back: its writes go on the kernel socket.
    back: bool,
    /// The writer's engine took this much of the region stream ...
    sent: u64,
    /// ... which is on the link ...
    wire: VecDeque<u64>,
    /// ... or at the reader's engine ...
    queue: VecDeque<u64>,
    /// ... or given to the reader (its RX queue).
    received: u64,
    /// What the reader took from the region.
    taken: u64,
    /// Region bytes still to read once the reads closed (None: open).
    left: Option<u64>,
    /// The reader moved back: it reads the kernel socket from here on.
    rx_back: bool,
}

struct Host {
    page: Mapping,
    /// Its engine stopped moving bytes: the fail-over started here.
    stopped: bool,
    heard: bool,
    /// Failover messages from the other host, in order.
    inbox: VecDeque<(Words, Option<u64>)>,
    last_sent: Option<(Words, Option<u64>)>,
    /// Its client moved back (both directions closed in its page).
    moved_back: bool,
}

/// One connection on the two sockets: the first, or one made to move
/// forward onto the link.
struct Conn {
    hosts: [Host; 2],
    dirs: [Dir; 2],
}

impl Conn {
    fn new() -> Conn {
        let host = || Host {
            page: page(),
            stopped: false,
            heard: false,
            inbox: VecDeque::new(),
            last_sent: None,
            moved_back: false,
        };
        Conn {
            hosts: [host(), host()],
            dirs: [Dir::default(), Dir::default()],
        }
    }
}

struct Model {
    conns: Vec<Conn>,
    streams: [Stream; 2],
    /// The connection each end holds (0 connector, 1 acceptor).
    on: [usize; 2],
    link_up: bool,
}

#[derive(Debug, Clone)]
enum Step {
    Write(usize, u64),
    Move(usize),
    Take(usize, u64),
    Deliver(usize, u64),
    Give(usize, u64),
    Relay,
    Read(usize, u64),
    LinkDown,
    LinkUp,
    Notice(usize),
    Message(usize),
    SayAgain(usize),
    Client(usize),
    Forward,
    TakeNew(usize),
    /// A failed link's agreement runs to its end: both engines noticed,
    /// every message taken, both clients moved back where they can.
    Settle,
    /// With the link up, everything moves and every byte written so far
    /// is read (`drain_live`).
    Drain,
    /// The engines and the link move all they can, both ways (`pump`).
    Pump,
}

fn step() -> impl Strategy<Value = Step> {
    let d = 0usize..2;
    prop_oneof![
        4 => (d.clone(), 1u64..300).prop_map(|(d, n)| Step::Write(d, n)),
        2 => d.clone().prop_map(Step::Move),
        2 => Just(Step::Pump),
        4 => (d.clone(), 1u64..400).prop_map(|(d, n)| Step::Take(d, n)),
        4 => (d.clone(), 1u64..400).prop_map(|(d, n)| Step::Deliver(d, n)),
        4 => (d.clone(), 1u64..400).prop_map(|(d, n)| Step::Give(d, n)),
        2 => Just(Step::Relay),
        4 => (d.clone(), 1u64..400).prop_map(|(d, n)| Step::Read(d, n)),
        1 => Just(Step::LinkDown),
        2 => Just(Step::LinkUp),
        2 => d.clone().prop_map(Step::Notice),
        4 => d.clone().prop_map(Step::Message),
        1 => d.clone().prop_map(Step::SayAgain),
        3 => d.clone().prop_map(Step::Client),
        1 => Just(Step::Settle),
        1 => Just(Step::Drain),
        2 => Just(Step::Forward),
        4 => d.prop_map(Step::TakeNew),
    ]
}

impl Model {
    /// `down`: the connection is made while the link is down (8.6): both
    /// engines start it as failed over before either writer can move.
    fn new(down: bool) -> Model {
        let mut m = Model {
            conns: vec![Conn::new()],
            streams: [Stream::default(), Stream::default()],
            on: [0, 0],
            link_up: !down,
        };
        if down {
            m.start(0);
            m.start(1);
        }
        // Both ends hold theirs: each writer may move.
        layout::mark_ready(&m.conns[0].hosts[1].page);
        assert!(layout::accept_claim(&m.conns[0].hosts[0].page));
        m
    }

    /// The newest connection: the one the engines serve and the link
    /// carries (older ones moved to their kernel sockets for good).
    fn newest(&self) -> usize {
        self.conns.len() - 1
    }

    fn run(&mut self, s: &Step) -> Result<(), String> {
        let n_conn = self.newest();
        match *s {
            Step::Write(d, n) => self.write(d, n),
            Step::Move(d) => self.writer_moves(d),
            Step::Take(d, n) => {
                let c = &mut self.conns[n_conn];
                let dir = &mut c.dirs[d];
                if self.link_up && !c.hosts[d].stopped && !dir.back {
                    let k = n.min(dir.posted - dir.sent);
                    dir.wire.extend(dir.sent..dir.sent + k);
                    dir.sent += k;
                }
            }
            Step::Deliver(d, n) => {
                let c = &mut self.conns[n_conn];
                let dir = &mut c.dirs[d];
                if self.link_up && !c.hosts[1 - d].stopped {
                    for _ in 0..n {
                        let Some(b) = dir.wire.pop_front() else { break };
                        dir.queue.push_back(b);
                    }
                }
            }
            Step::Give(d, n) => {
                let c = &mut self.conns[n_conn];
                let dir = &mut c.dirs[d];
                if !c.hosts[1 - d].stopped {
                    for _ in 0..n {
                        let Some(b) = dir.queue.pop_front() else {
                            break;
                        };
                        assert_eq!(b, dir.received, "the link keeps the order");
                        dir.received += 1;
                    }
                }
            }
            Step::Relay => {
                // The engines' words over the link (8.4).
                let c = &mut self.conns[n_conn];
                if self.link_up && !c.hosts[0].stopped && !c.hosts[1].stopped {
                    for dir in &mut c.dirs {
                        // The reader's engine acknowledges what it gave.
                        dir.acked = dir.received;
                    }
                    for h in 0..2 {
                        let w = relay::ours(&c.hosts[1 - h].page, 1 - h);
                        relay::apply(&c.hosts[h].page, h, &w, c.dirs[h].sent)
                            .map_err(|e| format!("relay to {h}: {e}"))?;
                    }
                }
            }
            Step::Read(d, n) => self.read(d, n)?,
            Step::LinkDown => {
                if self.link_up {
                    self.link_up = false;
                    for dir in &mut self.conns[n_conn].dirs {
                        // What was on the link is gone.
                        dir.wire.clear();
                    }
                }
            }
            Step::LinkUp => {
                // Only a connection made after this uses it: the newest
                // one's engines stopped for good once they noticed.
                if !self.link_up && self.conns[n_conn].hosts.iter().all(|h| h.stopped) {
                    self.link_up = true;
                }
            }
            Step::Notice(h) => {
                if !self.link_up {
                    self.start(h);
                }
            }
            Step::Message(h) => self.message(h)?,
            Step::SayAgain(h) => {
                let c = &mut self.conns[n_conn];
                if let Some(m) = c.hosts[h].last_sent {
                    c.hosts[1 - h].inbox.push_back(m);
                }
            }
            Step::Client(h) => self.client_moves_back(h)?,
            Step::Forward => self.forward(),
            Step::Settle => self.settle()?,
            Step::Drain => self.drain_live()?,
            Step::Pump => self.pump()?,
            Step::TakeNew(h) => self.take_new(h),
        }
        Ok(())
    }

    fn write(&mut self, d: usize, n: u64) {
        let dir = &mut self.conns[self.on[d]].dirs[d];
        let st = &mut self.streams[d];
        let from = st.written;
        st.written += n;
        if dir.back || dir.pinned || dir.moved_at.is_none() {
            st.tcp.extend(from..from + n);
            st.sock_out += n;
        } else {
            dir.posted += n;
        }
    }

    /// The writer moves once its peer holds its end of the same
    /// connection (at the first, both do), at its kernel socket's count.
    fn writer_moves(&mut self, d: usize) {
        let c = self.on[d];
        if self.on[1 - d] != c {
            return;
        }
        let conn = &mut self.conns[c];
        let dir = &mut conn.dirs[d];
        if dir.moved_at.is_some() || dir.pinned || dir.back {
            return;
        }
        let at = self.streams[d].sock_out;
        match layout::publish_switch(&conn.hosts[d].page, d, Switch::After(at)) {
            Switch::After(n) if n == at => dir.moved_at = Some(self.streams[d].written),
            // Its engine pinned it first (the link failed).
            _ => dir.pinned = true,
        }
    }

    /// The reader of direction `d` (end `1 - d`) reads up to `n` bytes the
    /// way the hand-over does (2.3, 2.4): on its own connection, off the
    /// kernel socket up to its writer's SWITCH there, then the region.
    fn read(&mut self, d: usize, n: u64) -> Result<(), String> {
        let c = self.on[1 - d];
        let conn = &mut self.conns[c];
        let page = &conn.hosts[1 - d].page;
        let dir = &mut conn.dirs[d];
        let st = &mut self.streams[d];
        let from_tcp = |st: &mut Stream, max: u64| {
            for _ in 0..max {
                let Some(b) = st.tcp.pop_front() else { break };
                st.got.push(b);
                st.sock_in += 1;
            }
        };
        if dir.rx_back {
            from_tcp(st, n);
            return Ok(());
        }
        match layout::switch_at(page, d) {
            // Every byte on the socket is before any move.
            Switch::NotYet | Switch::Never => from_tcp(st, n),
            Switch::After(s) if st.sock_in < s => from_tcp(st, n.min(s - st.sock_in)),
            Switch::After(_) => {
                // The writer's first region byte (the model knows it; the
                // reader needs only the order).
                let base = dir.moved_at.ok_or("a SWITCH without a move")?;
                if let Some(left) = dir.left {
                    let k = n.min(left);
                    st.got.extend((dir.taken..dir.taken + k).map(|r| base + r));
                    dir.taken += k;
                    dir.left = Some(left - k);
                    if left == k {
                        dir.rx_back = true;
                    }
                    return Ok(());
                }
                let k = n.min(dir.received - dir.taken);
                if k == 0 {
                    return Ok(());
                }
                // Counted in TAKEN before it is taken (refused once closed:
                // the reader waits for the agreement).
                if layout::add_taken(page, d, k).is_ok() {
                    st.got.extend((dir.taken..dir.taken + k).map(|r| base + r));
                    dir.taken += k;
                }
            }
        }
        Ok(())
    }

    /// Host `h`'s engine starts the move of the newest connection (its
    /// link is down, or the other devd's Failover came): it stops, pins a
    /// writer that had not moved and says its part.
    fn start(&mut self, h: usize) {
        let c = self.newest();
        if self.conns[c].hosts[h].stopped {
            return;
        }
        self.conns[c].hosts[h].stopped = true;
        start_page(&self.conns[c].hosts[h].page, h);
        self.say(h);
    }

    fn say(&mut self, h: usize) {
        let c = self.newest();
        let conn = &mut self.conns[c];
        let part = our_part(&conn.hosts[h].page, h, conn.hosts[h].heard);
        if conn.hosts[h].last_sent != Some(part) {
            conn.hosts[h].last_sent = Some(part);
            conn.hosts[1 - h].inbox.push_back(part);
        }
    }

    /// Host `h` takes the other devd's next Failover.
    fn message(&mut self, h: usize) -> Result<(), String> {
        let c = self.newest();
        let Some((w, closed)) = self.conns[c].hosts[h].inbox.pop_front() else {
            return Ok(());
        };
        self.start(h);
        // The end on host h writes direction h and reads direction 1 - h.
        let conn = &mut self.conns[c];
        let counts = (conn.dirs[h].sent, conn.dirs[1 - h].received);
        let host = &mut conn.hosts[h];
        agree_page(&host.page, h, counts, &mut host.heard, &w, closed)
            .map_err(|e| format!("host {h} refused an honest part: {e}"))?;
        self.say(h);
        Ok(())
    }

    /// The client on host `h` moves back once both directions are closed
    /// in its connection's page (2.4): its writer sends again what it kept
    /// from where its reader was given bytes, its reader reads what it was
    /// given.
    fn client_moves_back(&mut self, h: usize) -> Result<(), String> {
        let c = self.on[h];
        let conn = &mut self.conns[c];
        let page = &conn.hosts[h].page;
        let closed = |d| matches!(layout::taken(page, d), Taken::Closed(_));
        if conn.hosts[h].moved_back || !(closed(0) && closed(1)) {
            return Ok(());
        }
        conn.hosts[h].moved_back = true;
        // Writes: end h writes direction h.
        let w = &mut conn.dirs[h];
        let st = &mut self.streams[h];
        if let (Some(s), false) = (w.moved_at, w.pinned) {
            // Its kept copies start where the relayed TAKEN left them.
            if let Taken::Closed(c) = layout::taken(page, h) {
                if c < w.kept || c > w.posted {
                    return Err(format!(
                        "writer {h}: closed at {c}, kept {}..{}",
                        w.kept, w.posted
                    ));
                }
                st.tcp.extend(s + c..s + w.posted);
                st.sock_out += w.posted - c;
            }
            w.back = true;
        } else if w.moved_at.is_none() {
            w.pinned = true;
        }
        // Reads: end h reads direction 1 - h; what was given is still
        // there to read (TAKEN was counted before each take).
        let r = &mut conn.dirs[1 - h];
        if let Taken::Closed(c) = layout::taken(page, 1 - h) {
            if c != r.received {
                return Err(format!("reader {h}: closed at {c}, given {}", r.received));
            }
        }
        r.left = Some(r.received - r.taken);
        if r.received == r.taken {
            r.rx_back = matches!(
                layout::switch_at(page, 1 - h),
                Switch::After(s) if self.streams[1 - h].sock_in >= s
            );
        }
        Ok(())
    }

    /// Whether end `h` may take a new end (8.6): both its directions on
    /// the kernel socket for good (moved back, or pinned before they
    /// moved), its old region read to its end, and its peer's writes all
    /// on the socket: its peer's writes never moved (this end's reads
    /// are the socket's for good), or its peer moved back on this
    /// connection too (its END says "at the socket's end" once its resend
    /// is out, which here is at once).
    fn may_take(&self, h: usize) -> bool {
        let conn = &self.conns[self.on[h]];
        let page = &conn.hosts[h].page;
        let reads = &conn.dirs[1 - h];
        let forever = layout::switch_at(page, 1 - h) == Switch::Never;
        conn.hosts[h].moved_back && (forever || (reads.rx_back && conn.hosts[1 - h].moved_back))
    }

    /// The acceptor's devd offers a new connection once the link is back
    /// and the newest connection moved (its agreement complete on both
    /// hosts); one not taken by both before the link failed again is
    /// followed by another, which the older ends take.
    fn forward(&mut self) {
        let c = self.newest();
        let agreed = self.conns[c]
            .hosts
            .iter()
            .all(|h| (0..2).all(|d| matches!(layout::taken(&h.page, d), Taken::Closed(_))));
        if self.link_up && agreed {
            self.conns.push(Conn::new());
        }
    }

    /// End `h` takes the newest connection's end (8.6) when it may: the
    /// connector first.
    fn take_new(&mut self, h: usize) {
        let c = self.newest();
        if self.on[h] == c || (h == 1 && self.on[0] != c) || !self.may_take(h) {
            return;
        }
        self.on[h] = c;
        // It holds its end: READY (connector) or CLAIM (acceptor), which
        // the other host's page learns through the relayed words.
        let page = &self.conns[c].hosts[h].page;
        if h == 0 {
            layout::mark_ready(page);
        } else {
            let _ = layout::accept_claim(page);
        }
    }

    /// Writers' engines give back the TX buffers acknowledged.
    fn trim(&mut self) {
        for conn in &mut self.conns {
            for w in &mut conn.dirs {
                if !w.back {
                    w.kept = w.kept.max(w.acked.min(w.posted));
                }
            }
        }
    }

    /// With the link down: both engines start the move, every message
    /// goes, both clients move back once their pages say so.
    fn settle(&mut self) -> Result<(), String> {
        if self.link_up {
            return Ok(());
        }
        for h in 0..2 {
            self.start(h);
        }
        for _ in 0..8 {
            for h in 0..2 {
                let c = self.newest();
                while !self.conns[c].hosts[h].inbox.is_empty() {
                    self.message(h)?;
                }
            }
        }
        for h in 0..2 {
            self.client_moves_back(h)?;
        }
        Ok(())
    }

    /// The engines and the link move everything they can, both ways, and
    /// the words are relayed.
    fn pump(&mut self) -> Result<(), String> {
        const ALL: u64 = u64::MAX / 4;
        for d in 0..2 {
            for s in [
                Step::Take(d, ALL),
                Step::Deliver(d, ALL),
                Step::Give(d, ALL),
            ] {
                self.run(&s)?;
            }
        }
        self.run(&Step::Relay)
    }

    /// While the newest connection's link is up and in use, every byte
    /// written so far reaches its reader once everything moves: no reader
    /// waits on its kernel socket for bytes that are in a region.
    fn drain_live(&mut self) -> Result<(), String> {
        let c = self.newest();
        if !self.link_up || self.conns[c].hosts.iter().any(|h| h.stopped) {
            return Ok(());
        }
        const ALL: u64 = u64::MAX / 4;
        // (Clients whose older connection moved look at their pages at
        // their next call.)
        for h in 0..2 {
            self.client_moves_back(h)?;
        }
        for _ in 0..4 {
            self.pump()?;
            for d in 0..2 {
                self.read(d, ALL)?;
            }
        }
        for d in 0..2 {
            let st = &self.streams[d];
            if st.got.len() as u64 != st.written {
                return Err(format!(
                    "direction {d}: {} of {} bytes readable with the link up",
                    st.got.len(),
                    st.written
                ));
            }
        }
        Ok(())
    }

    /// After the random steps: what was written is readable while the link
    /// is up; then the link fails (if it had not), every message is taken,
    /// both clients move back, and the readers read to the end.
    fn finish(&mut self) -> Result<(), String> {
        self.drain_live()?;
        self.run(&Step::LinkDown)?;
        self.settle()?;
        for h in 0..2 {
            if !self.conns[self.on[h]].hosts[h].moved_back {
                return Err(format!("host {h}'s client never moved back"));
            }
        }
        for _ in 0..4 {
            for d in 0..2 {
                self.read(d, u64::MAX / 4)?;
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: env_or("PROPTEST_CASES", 256),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(env_or("PROPTEST_RNG_SEED", SEED)),
        ..ProptestConfig::default()
    })]

    /// Whatever the interleaving, each reader gets its writer's stream
    /// exactly: nothing lost, duplicated or reordered.
    #[test]
    fn each_reader_gets_its_writers_stream_whatever_the_interleaving(
        down in proptest::bool::weighted(0.2),
        steps in proptest::collection::vec(step(), 1..400),
    ) {
        let mut m = Model::new(down);
        for s in &steps {
            m.run(s).map_err(TestCaseError::fail)?;
            m.trim();
        }
        m.finish().map_err(TestCaseError::fail)?;
        for d in 0..2 {
            let want: Vec<u64> = (0..m.streams[d].written).collect();
            prop_assert_eq!(&m.streams[d].got, &want, "direction {}", d);
        }
    }
}
