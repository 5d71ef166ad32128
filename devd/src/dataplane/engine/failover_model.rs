//! A model of a connection between two hosts whose link fails, driven by
//! proptest through random interleavings of writes, the writers' moves,
//! the engines' takes, the link's deliveries, relayed words, reads, the
//! link's failure, each engine noticing it, the devds' Failover messages
//! (delayed, said again) and the clients moving back: on real hand-over
//! pages, with the words functions the clients and engines use
//! (`layout`, `relay`) and the engine's own page logic (`start_page`,
//! `our_part`, `agree_page`). The clients' part follows
//! docs/protocol.md 2.3, 2.4 and 8.5. Checked: each reader gets exactly
//! its writer's stream, in order; a writer always still holds the bytes it
//! must send again; no step of an honest agreement is refused.
//!
//! A fixed seed in CI (`SEED`); a larger run:
//! `PROPTEST_CASES=20000 cargo test -p ssock-devd failover_model`
//! (and `PROPTEST_RNG_SEED=N` for another seed).

use super::{agree_page, our_part, start_page};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use ssock_rings::layout::{self, Switch, Taken};
use ssock_rings::relay::{self, Words};
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

/// One direction: its writer is end `d`, its reader end `1 - d`.
#[derive(Default)]
struct Dir {
    /// Stream bytes the writing program wrote.
    written: u64,
    /// The kernel socket: stream offsets in the order they are on it.
    tcp: VecDeque<u64>,
    /// Where the writer moved to the region (stream offset), once it did.
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
    /// What the reader took off the kernel socket before any move back,
    /// and from the region.
    tcp_read: u64,
    taken: u64,
    /// Region bytes still to read once the reads closed (None: open).
    left: Option<u64>,
    /// The reader moved back: it reads the kernel socket from here on.
    rx_back: bool,
    /// The stream the reading program got, in order.
    got: Vec<u64>,
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

struct Model {
    hosts: [Host; 2],
    dirs: [Dir; 2],
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
    Notice(usize),
    Message(usize),
    SayAgain(usize),
    Client(usize),
}

fn step() -> impl Strategy<Value = Step> {
    let d = 0usize..2;
    prop_oneof![
        4 => (d.clone(), 1u64..300).prop_map(|(d, n)| Step::Write(d, n)),
        1 => d.clone().prop_map(Step::Move),
        4 => (d.clone(), 1u64..400).prop_map(|(d, n)| Step::Take(d, n)),
        4 => (d.clone(), 1u64..400).prop_map(|(d, n)| Step::Deliver(d, n)),
        4 => (d.clone(), 1u64..400).prop_map(|(d, n)| Step::Give(d, n)),
        2 => Just(Step::Relay),
        4 => (d.clone(), 1u64..400).prop_map(|(d, n)| Step::Read(d, n)),
        1 => Just(Step::LinkDown),
        1 => d.clone().prop_map(Step::Notice),
        2 => d.clone().prop_map(Step::Message),
        1 => d.clone().prop_map(Step::SayAgain),
        2 => d.prop_map(Step::Client),
    ]
}

impl Model {
    fn new() -> Model {
        let host = || Host {
            page: page(),
            stopped: false,
            heard: false,
            inbox: VecDeque::new(),
            last_sent: None,
            moved_back: false,
        };
        let m = Model {
            hosts: [host(), host()],
            dirs: [Dir::default(), Dir::default()],
            link_up: true,
        };
        // Both ends hold theirs: each writer may move.
        layout::mark_ready(&m.hosts[1].page);
        assert!(layout::accept_claim(&m.hosts[0].page));
        m
    }

    fn run(&mut self, s: &Step) -> Result<(), String> {
        match *s {
            Step::Write(d, n) => self.write(d, n),
            Step::Move(d) => self.writer_moves(d),
            Step::Take(d, n) => {
                let dir = &mut self.dirs[d];
                if self.link_up && !self.hosts[d].stopped && !dir.back {
                    let k = n.min(dir.posted - dir.sent);
                    dir.wire.extend(dir.sent..dir.sent + k);
                    dir.sent += k;
                }
            }
            Step::Deliver(d, n) => {
                let dir = &mut self.dirs[d];
                if self.link_up && !self.hosts[1 - d].stopped {
                    for _ in 0..n {
                        let Some(b) = dir.wire.pop_front() else { break };
                        dir.queue.push_back(b);
                    }
                }
            }
            Step::Give(d, n) => {
                let dir = &mut self.dirs[d];
                if !self.hosts[1 - d].stopped {
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
                if self.link_up && !self.hosts[0].stopped && !self.hosts[1].stopped {
                    for dir in &mut self.dirs {
                        // The reader's engine acknowledges what it gave.
                        dir.acked = dir.received;
                    }
                    for h in 0..2 {
                        let w = relay::ours(&self.hosts[1 - h].page, 1 - h);
                        relay::apply(&self.hosts[h].page, h, &w, self.dirs[h].sent)
                            .map_err(|e| format!("relay to {h}: {e}"))?;
                    }
                }
            }
            Step::Read(d, n) => self.read(d, n)?,
            Step::LinkDown => {
                if self.link_up {
                    self.link_up = false;
                    for dir in &mut self.dirs {
                        // What was on the link is gone.
                        dir.wire.clear();
                    }
                }
            }
            Step::Notice(h) => {
                if !self.link_up {
                    self.start(h);
                }
            }
            Step::Message(h) => self.message(h)?,
            Step::SayAgain(h) => {
                if let Some(m) = self.hosts[h].last_sent {
                    self.hosts[1 - h].inbox.push_back(m);
                }
            }
            Step::Client(h) => self.client_moves_back(h)?,
        }
        Ok(())
    }

    fn write(&mut self, d: usize, n: u64) {
        let dir = &mut self.dirs[d];
        let from = dir.written;
        dir.written += n;
        if dir.back || dir.pinned || dir.moved_at.is_none() {
            dir.tcp.extend(from..from + n);
        } else {
            dir.posted += n;
        }
    }

    /// The writer moves once its peer holds its end (both do here).
    fn writer_moves(&mut self, d: usize) {
        let dir = &mut self.dirs[d];
        if dir.moved_at.is_some() || dir.pinned || dir.back {
            return;
        }
        let at = dir.written;
        match layout::publish_switch(&self.hosts[d].page, d, Switch::After(at)) {
            Switch::After(n) if n == at => dir.moved_at = Some(at),
            // Its engine pinned it first (the link failed).
            _ => dir.pinned = true,
        }
    }

    /// The reader of direction `d` (end `1 - d`) reads up to `n` bytes the
    /// way the hand-over does (2.3, 2.4).
    fn read(&mut self, d: usize, n: u64) -> Result<(), String> {
        let page = &self.hosts[1 - d].page;
        let dir = &mut self.dirs[d];
        let from_tcp = |dir: &mut Dir, max: u64| {
            for _ in 0..max {
                let Some(b) = dir.tcp.pop_front() else { break };
                dir.got.push(b);
                if !dir.rx_back {
                    dir.tcp_read += 1;
                }
            }
        };
        if dir.rx_back {
            from_tcp(dir, n);
            return Ok(());
        }
        match layout::switch_at(page, d) {
            // Every byte on the socket is before any move.
            Switch::NotYet | Switch::Never => from_tcp(dir, n),
            Switch::After(s) if dir.tcp_read < s => from_tcp(dir, n.min(s - dir.tcp_read)),
            Switch::After(s) => {
                if let Some(left) = dir.left {
                    let k = n.min(left);
                    dir.got.extend((dir.taken..dir.taken + k).map(|r| s + r));
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
                    dir.got.extend((dir.taken..dir.taken + k).map(|r| s + r));
                    dir.taken += k;
                }
            }
        }
        Ok(())
    }

    /// Host `h`'s engine starts the move (its link is down, or the other
    /// devd's Failover came): it stops, pins a writer that had not moved
    /// and says its part.
    fn start(&mut self, h: usize) {
        if self.hosts[h].stopped {
            return;
        }
        self.hosts[h].stopped = true;
        start_page(&self.hosts[h].page, h);
        self.say(h);
    }

    fn say(&mut self, h: usize) {
        let part = our_part(&self.hosts[h].page, h, self.hosts[h].heard);
        if self.hosts[h].last_sent != Some(part) {
            self.hosts[h].last_sent = Some(part);
            self.hosts[1 - h].inbox.push_back(part);
        }
    }

    /// Host `h` takes the other devd's next Failover.
    fn message(&mut self, h: usize) -> Result<(), String> {
        let Some((w, closed)) = self.hosts[h].inbox.pop_front() else {
            return Ok(());
        };
        self.start(h);
        // The end on host h writes direction h and reads direction 1 - h.
        let counts = (self.dirs[h].sent, self.dirs[1 - h].received);
        let host = &mut self.hosts[h];
        agree_page(&host.page, h, counts, &mut host.heard, &w, closed)
            .map_err(|e| format!("host {h} refused an honest part: {e}"))?;
        self.say(h);
        Ok(())
    }

    /// The client on host `h` moves back once both directions are closed
    /// in its page (2.4): its writer sends again what it kept from where
    /// its reader was given bytes, its reader reads what it was given.
    fn client_moves_back(&mut self, h: usize) -> Result<(), String> {
        let page = &self.hosts[h].page;
        let closed = |d| matches!(layout::taken(page, d), Taken::Closed(_));
        if self.hosts[h].moved_back || !(closed(0) && closed(1)) {
            return Ok(());
        }
        self.hosts[h].moved_back = true;
        // Writes: end h writes direction h.
        let w = &mut self.dirs[h];
        if let (Some(s), false) = (w.moved_at, w.pinned) {
            // Its kept copies start where the relayed TAKEN left them.
            if let Taken::Closed(c) = layout::taken(page, h) {
                if c < w.kept || c > w.posted {
                    return Err(format!(
                        "writer {h}: closed at {c}, kept {}..{}",
                        w.kept, w.posted
                    ));
                }
                w.tcp.extend(s + c..s + w.posted);
            }
            w.back = true;
        } else if w.moved_at.is_none() {
            w.pinned = true;
        }
        // Reads: end h reads direction 1 - h; what was given is still
        // there to read (TAKEN was counted before each take).
        let r = &mut self.dirs[1 - h];
        if let Taken::Closed(c) = layout::taken(page, 1 - h) {
            if c != r.received {
                return Err(format!("reader {h}: closed at {c}, given {}", r.received));
            }
        }
        r.left = Some(r.received - r.taken);
        if r.received == r.taken {
            r.rx_back =
                matches!(layout::switch_at(page, 1 - h), Switch::After(s) if r.tcp_read >= s);
        }
        Ok(())
    }

    /// Writers' engines give back the TX buffers acknowledged.
    fn trim(&mut self) {
        for w in &mut self.dirs {
            if !w.back {
                w.kept = w.kept.max(w.acked.min(w.posted));
            }
        }
    }

    /// After the random steps: the link fails (if it had not), every
    /// message is taken, both clients move back, and the readers read to
    /// the end.
    fn finish(&mut self) -> Result<(), String> {
        self.run(&Step::LinkDown)?;
        for h in 0..2 {
            self.start(h);
        }
        for _ in 0..8 {
            for h in 0..2 {
                while !self.hosts[h].inbox.is_empty() {
                    self.message(h)?;
                }
            }
        }
        for h in 0..2 {
            self.client_moves_back(h)?;
            if !self.hosts[h].moved_back {
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
        steps in proptest::collection::vec(step(), 1..160),
    ) {
        let mut m = Model::new();
        for s in &steps {
            m.run(s).map_err(TestCaseError::fail)?;
            m.trim();
        }
        m.finish().map_err(TestCaseError::fail)?;
        for d in 0..2 {
            let want: Vec<u64> = (0..m.dirs[d].written).collect();
            prop_assert_eq!(&m.dirs[d].got, &want, "direction {}", d);
        }
    }
}
