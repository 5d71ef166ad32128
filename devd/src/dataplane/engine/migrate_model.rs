//! A model of one connection between two hosts joined by three links,
//! moved between links when its link fails (docs/protocol.md 8.7), driven
//! by proptest through random interleavings of: the clients posting
//! buffers, each engine sending (resent bytes first, then a buffer partly
//! sent, then new ones, as far as the link's room allows), the links
//! delivering or (once failed) losing frames and acknowledgements, the
//! readers' engines taking what came on the channel they read, links
//! failing and coming back, each host noticing it at its own time, and
//! the devds' Migrate messages (in order, said again). With the engine's
//! own rules: the namer picks the link (`LinkTable::choose`, either
//! policy), the other devd confirms only once its move completed and the
//! namer sends on the new channel only after that, a frame for a channel
//! not open is dropped, acknowledgements of an old channel count no more,
//! the other host's half checked (`half_valid`) and each stream sent again
//! from what its reader was given (`resend_from`), the channels named by
//! `moved_onto`. A side that cannot move (no other link up, the link
//! picked down) goes to its kernel socket: the fail-over model
//! (`failover_model.rs`) covers what follows; here the case ends there.
//!
//! Checked: each reader takes its writer's stream in order, with no byte
//! twice and none skipped; an honest half is never refused; and when every
//! link event was noticed, the moves completed and the links that are up
//! carried everything, every byte written was taken.
//!
//! Not modelled: end marks (the `marked` half of `half_valid`), a side's
//! client going meanwhile, and the `WAIT` bound.
//!
//! 2048 cases with a fixed seed in CI (`SEED`); a larger run:
//! `PROPTEST_CASES=20000 cargo test -p ssock-devd migrate::model`
//! (and `PROPTEST_RNG_SEED=N` for another seed).

use super::{half_valid, resend_from};
use crate::dataplane::engine::links::{LinkPolicy, LinkTable};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use ssock_hwbackends::{link_of, moved_onto, ChannelId, LinkId};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

/// The seed CI runs with.
const SEED: u64 = 0x3160_2a7e;
/// Links between the two hosts.
const LINKS: usize = 3;
/// The connection's first channel: named by host 0 (node 1) on link 0.
const FIRST: ChannelId = 1 << 63 | 1 << 40 | 0x2a;

/// Moves both hosts completed, over every case run (a model that always
/// fell back would test nothing).
static MOVES: AtomicU64 = AtomicU64::new(0);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A model's count as an offset in a buffer (all are small).
fn us(n: u64) -> usize {
    usize::try_from(n).expect("a small count")
}

/// A client's TX buffer: stream bytes `start..start + len`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Buf {
    start: u64,
    len: u64,
}

/// What crosses a link, in order.
#[derive(Debug, Clone, Copy)]
enum Wire {
    /// Stream bytes `start..start + len` on channel `ch` (the offset is
    /// the model's, to check what the reader takes; no frame carries it).
    Data { ch: ChannelId, start: u64, len: u64 },
    /// The receiver's engine took `total` bytes of channel `ch`.
    Ack { ch: ChannelId, total: u64 },
}

/// A Migrate message (docs/protocol.md 8.7).
#[derive(Debug, Clone, Copy)]
struct Migrate {
    channel: ChannelId,
    link: Option<LinkId>,
    received: u64,
}

/// A side moving, as `migrate.rs` keeps it.
#[derive(Debug, Clone)]
struct Moving {
    old: ChannelId,
    link: Option<LinkId>,
    opened: bool,
    ours: u64,
    theirs: Option<u64>,
    confirmed: bool,
    acked: u64,
    sent: u64,
}

impl Moving {
    fn twin(&self) -> Option<ChannelId> {
        self.link.map(|l| moved_onto(self.old, l))
    }
}

/// One host's side: its writer's stream out, its reader's in.
#[derive(Debug)]
struct Host {
    namer: bool,
    /// Stream bytes its client posted, and the buffers not yet taken.
    written: u64,
    posted: VecDeque<Buf>,
    unacked: VecDeque<(Buf, u64)>,
    resend: VecDeque<(Buf, usize)>,
    pending: Option<(Buf, usize)>,
    sent: u64,
    acked: u64,
    base: u64,
    /// What its reader was given.
    received: u64,
    /// Per open channel: frames come, not taken yet, and bytes taken.
    open: HashMap<ChannelId, (VecDeque<(u64, u64)>, u64)>,
    ch: ChannelId,
    /// The channel of its last completed move, and its half then.
    prev: Option<(ChannelId, u64)>,
    /// Each link as this host last noticed it.
    sees_up: [bool; LINKS],
    moving: Option<Moving>,
    /// It went to its kernel socket instead.
    fell_back: bool,
    table: LinkTable,
}

impl Host {
    fn new(namer: bool, policy: LinkPolicy) -> Host {
        let mut table = LinkTable::default();
        table.set_policy(2, policy);
        let mut open = HashMap::new();
        open.insert(FIRST, Default::default());
        Host {
            namer,
            written: 0,
            posted: VecDeque::new(),
            unacked: VecDeque::new(),
            resend: VecDeque::new(),
            pending: None,
            sent: 0,
            acked: 0,
            base: 0,
            received: 0,
            open,
            ch: FIRST,
            prev: None,
            sees_up: [true; LINKS],
            moving: None,
            fell_back: false,
            table,
        }
    }

    /// A link other than `but` this host sees up, by its policy.
    fn other_link_up(&mut self, but: LinkId) -> Option<LinkId> {
        let up = self.sees_up;
        self.table
            .choose(2, LINKS, |l| l != but && up[usize::from(l)])
    }

    /// `give_back`: the buffers the other host acknowledged.
    fn give_back(&mut self) {
        while self
            .unacked
            .front()
            .is_some_and(|&(_, end)| end <= self.acked)
        {
            self.unacked.pop_front();
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Post(usize, u64),
    Send(usize, u64),
    Deliver(usize, usize),
    Lose(usize, usize),
    Take(usize),
    Fail(usize),
    Restore(usize),
    Notice(usize, usize),
    Control(usize),
    SayAgain(usize),
}

fn step() -> impl Strategy<Value = Step> {
    let h = 0..2usize;
    let l = 0..LINKS;
    prop_oneof![
        // (Small buffers and sends too: moves land on their edges.)
        3 => (h.clone(), prop_oneof![1..8u64, 1..6000u64]).prop_map(|(h, n)| Step::Post(h, n)),
        3 => (h.clone(), prop_oneof![1..8u64, 1..9000u64]).prop_map(|(h, n)| Step::Send(h, n)),
        4 => (l.clone(), 0..2usize).prop_map(|(l, d)| Step::Deliver(l, d)),
        1 => (l.clone(), 0..2usize).prop_map(|(l, d)| Step::Lose(l, d)),
        3 => h.clone().prop_map(Step::Take),
        1 => l.clone().prop_map(Step::Fail),
        1 => l.clone().prop_map(Step::Restore),
        2 => (h.clone(), l).prop_map(|(h, l)| Step::Notice(h, l)),
        2 => h.clone().prop_map(Step::Control),
        1 => h.prop_map(Step::SayAgain),
    ]
}

struct Model {
    hosts: [Host; 2],
    up: [bool; LINKS],
    /// Per link, per direction (from host d to host 1 - d).
    wire: [[VecDeque<Wire>; 2]; LINKS],
    /// Per link and direction: it lost what was on it, and loses
    /// everything until it comes back.
    cut: [[bool; 2]; LINKS],
    /// The devds' control connection, per direction.
    control: [VecDeque<Migrate>; 2],
}

impl Model {
    fn new(policy: LinkPolicy) -> Model {
        Model {
            hosts: [Host::new(true, policy), Host::new(false, policy)],
            up: [true; LINKS],
            wire: Default::default(),
            cut: Default::default(),
            control: Default::default(),
        }
    }

    fn run(&mut self, s: &Step) -> Result<(), String> {
        match *s {
            Step::Post(h, n) => {
                let w = &mut self.hosts[h];
                w.posted.push_back(Buf {
                    start: w.written,
                    len: n,
                });
                w.written += n;
            }
            Step::Send(h, max) => self.send(h, max),
            Step::Deliver(l, d) => self.deliver(l, d),
            Step::Lose(l, d) => {
                // (A failed link delivers a prefix of what was put on it:
                // from here on nothing more, until it comes back.)
                if !self.up[l] {
                    self.wire[l][d].clear();
                    self.cut[l][d] = true;
                }
            }
            Step::Take(h) => self.take(h)?,
            Step::Fail(l) => self.up[l] = false,
            Step::Restore(l) => {
                // (A link comes back once both hosts saw it down, with
                // its rings empty.)
                if !self.up[l] && self.hosts.iter().all(|x| !x.sees_up[l]) {
                    self.up[l] = true;
                    self.wire[l] = Default::default();
                    self.cut[l] = [false; 2];
                }
            }
            Step::Notice(h, l) => self.notice(h, l)?,
            Step::Control(h) => {
                if let Some(m) = self.control[1 - h].pop_front() {
                    self.peer_migrate(h, m)?;
                }
            }
            Step::SayAgain(h) => self.say(h),
        }
        Ok(())
    }

    fn live(&self, h: usize) -> bool {
        !self.hosts[h].fell_back
    }

    /// The engine's `tx`: resent bytes, the buffer partly sent, then new
    /// ones, at most `max` bytes, while its side is not moving and it
    /// sees its link up (else the backend takes nothing).
    fn send(&mut self, h: usize, mut max: u64) {
        let w = &mut self.hosts[h];
        if w.fell_back || w.moving.is_some() || !w.sees_up[usize::from(link_of(w.ch))] {
            return;
        }
        let (ch, l) = (w.ch, usize::from(link_of(w.ch)));
        let mut out = Vec::new();
        while max > 0 {
            if let Some((b, off)) = w.resend.front_mut() {
                let n = (b.len - *off as u64).min(max);
                out.push((b.start + *off as u64, n));
                *off += us(n);
                w.sent += n;
                max -= n;
                if *off as u64 == b.len {
                    w.resend.pop_front();
                }
                continue;
            }
            let (b, off) = match w.pending.take() {
                Some(p) => p,
                None => match w.posted.pop_front() {
                    Some(b) => (b, 0),
                    None => break,
                },
            };
            let n = (b.len - off as u64).min(max);
            out.push((b.start + off as u64, n));
            w.sent += n;
            max -= n;
            if off as u64 + n < b.len {
                w.pending = Some((b, off + us(n)));
                break;
            }
            w.unacked.push_back((b, w.sent));
        }
        for (start, len) in out {
            self.put(l, h, Wire::Data { ch, start, len });
        }
    }

    /// Host `d` puts `x` on link `l`.
    fn put(&mut self, l: usize, d: usize, x: Wire) {
        if !self.cut[l][d] {
            self.wire[l][d].push_back(x);
        }
    }

    /// Link `l` hands host `1 - d` the next thing host `d` put on it.
    fn deliver(&mut self, l: usize, d: usize) {
        let Some(x) = self.wire[l][d].pop_front() else {
            return;
        };
        let to = &mut self.hosts[1 - d];
        match x {
            Wire::Data { ch, start, len } => {
                // (A frame for a channel not open is dropped.)
                if let Some((q, _)) = to.open.get_mut(&ch) {
                    q.push_back((start, len));
                }
            }
            Wire::Ack { ch, total } => {
                // (What an old channel acknowledges counts no more, nor
                // what one acknowledges while its side moves.)
                if ch == to.ch && to.moving.is_none() {
                    to.acked = to.base + total;
                    to.give_back();
                }
            }
        }
    }

    /// Host `h`'s engine gives its reader what came on its channel.
    fn take(&mut self, h: usize) -> Result<(), String> {
        let r = &mut self.hosts[h];
        if r.fell_back || r.moving.is_some() {
            return Ok(());
        }
        let ch = r.ch;
        let Some((q, taken)) = r.open.get_mut(&ch) else {
            return Err(format!("host {h}: its channel {ch:#x} is not open"));
        };
        let Some((start, len)) = q.pop_front() else {
            return Ok(());
        };
        if start != r.received {
            return Err(format!(
                "host {h}'s reader was given bytes from {start} after {} (channel {ch:#x})",
                r.received
            ));
        }
        r.received += len;
        *taken += len;
        let total = *taken;
        let l = usize::from(link_of(ch));
        if r.sees_up[l] {
            self.put(l, h, Wire::Ack { ch, total });
        }
        Ok(())
    }

    /// Host `h` learns link `l`'s state (its link event).
    fn notice(&mut self, h: usize, l: usize) -> Result<(), String> {
        let up = self.up[l];
        let x = &mut self.hosts[h];
        if x.sees_up[l] == up {
            return Ok(());
        }
        x.sees_up[l] = up;
        if up || x.fell_back {
            return Ok(());
        }
        let link = LinkId::try_from(l).unwrap_or(0);
        if let Some(m) = &x.moving {
            if m.link == Some(link) {
                // (The link picked went down before the move completed.)
                x.fell_back = true;
            }
            return Ok(());
        }
        if link_of(x.ch) == link {
            self.migrate(h, None);
        }
        Ok(())
    }

    /// `migrate`: side `h` stops and starts moving (`link`: the namer's
    /// pick, when this side starts on its word); falls back when it
    /// cannot.
    fn migrate(&mut self, h: usize, link: Option<LinkId>) {
        let x = &mut self.hosts[h];
        let old_link = link_of(x.ch);
        let other = x.other_link_up(old_link);
        // The namer picks; the other side only goes along while a link
        // other than the failed one is up there too.
        let pick = if x.namer { other } else { other.and(link) };
        let can = if x.namer {
            pick.is_some()
        } else {
            other.is_some()
        };
        if !can || pick == Some(old_link) {
            x.fell_back = true;
            return;
        }
        x.moving = Some(Moving {
            old: x.ch,
            link: pick,
            opened: false,
            ours: x.received,
            theirs: None,
            confirmed: false,
            acked: x.acked.min(x.sent),
            sent: x.sent,
        });
        Self::open_twin(x);
        self.say(h);
    }

    fn open_twin(x: &mut Host) {
        if let Some(m) = x.moving.as_mut() {
            if let Some(t) = m.twin().filter(|_| !m.opened) {
                x.open.entry(t).or_default();
                m.opened = true;
            }
        }
    }

    /// `say_migrate`: side `h`'s half (again).
    fn say(&mut self, h: usize) {
        let x = &self.hosts[h];
        if x.fell_back {
            return;
        }
        if let Some(m) = &x.moving {
            self.control[h].push_back(Migrate {
                channel: m.old,
                link: m.link.filter(|_| x.namer && m.opened),
                received: m.ours,
            });
        }
    }

    /// `peer_half`: host `h` hears the other's half.
    fn peer_migrate(&mut self, h: usize, msg: Migrate) -> Result<(), String> {
        let x = &mut self.hosts[h];
        if x.fell_back {
            return Ok(());
        }
        if let Some((prev, said)) = x.prev.filter(|&(c, _)| c == msg.channel) {
            if !x.namer {
                self.control[h].push_back(Migrate {
                    channel: prev,
                    link: Some(link_of(x.ch)),
                    received: said,
                });
            }
            return Ok(());
        }
        let current = match &x.moving {
            Some(m) => m.old == msg.channel,
            None => x.ch == msg.channel,
        };
        if !current {
            return Ok(());
        }
        if x.moving.is_none() {
            self.migrate(h, msg.link);
            if self.hosts[h].fell_back {
                return Ok(());
            }
        }
        let x = &mut self.hosts[h];
        let Some(m) = x.moving.as_mut() else {
            return Ok(());
        };
        if m.theirs.is_some_and(|t| t != msg.received) {
            return Err(format!("host {h}: the other changed its half"));
        }
        m.theirs = Some(msg.received);
        match (x.namer, msg.link) {
            (true, Some(l)) if Some(l) == m.link => m.confirmed = true,
            (false, Some(l)) => {
                if m.link.is_some_and(|have| have != l) {
                    return Err(format!("host {h}: named two links"));
                }
                m.link = Some(l);
            }
            _ => {}
        }
        Self::open_twin(x);
        self.try_complete(h)
    }

    /// `try_complete`: side `h` moves onto the twin once both halves are
    /// in (and the namer heard the confirmation).
    fn try_complete(&mut self, h: usize) -> Result<(), String> {
        let x = &mut self.hosts[h];
        let Some(m) = x.moving.clone() else {
            return Ok(());
        };
        let (Some(r), Some(link), Some(twin)) = (m.theirs, m.link, m.twin()) else {
            return Ok(());
        };
        if x.namer && !m.confirmed {
            return Ok(());
        }
        if !x.sees_up[usize::from(link)] {
            x.fell_back = true;
            return Ok(());
        }
        if !half_valid((r, false), m.acked, m.sent, false) {
            return Err(format!(
                "host {h}: an honest half refused: given {r}, acknowledged {}, sent {}",
                m.acked, m.sent
            ));
        }
        x.open.remove(&m.old);
        x.moving = None;
        x.prev = Some((m.old, m.ours));
        x.ch = twin;
        let (resend, pending) = resend_from(&x.unacked, |b| b.len, x.pending, x.sent, r);
        x.resend = resend;
        x.pending = pending;
        x.sent = r;
        x.base = r;
        MOVES.fetch_add(1, Ordering::Relaxed);
        if !x.namer {
            self.control[h].push_back(Migrate {
                channel: m.old,
                link: Some(link),
                received: m.ours,
            });
        }
        Ok(())
    }

    /// Once every link event was noticed and no side fell back: moves
    /// complete and every byte written reaches its reader over the links
    /// up (when one is).
    fn finish(&mut self) -> Result<(), String> {
        for _ in 0..8 {
            for h in 0..2 {
                for l in 0..LINKS {
                    self.notice(h, l)?;
                }
                self.say(h);
            }
            for _ in 0..4 {
                for h in 0..2 {
                    while let Some(m) = self.control[1 - h].pop_front() {
                        self.peer_migrate(h, m)?;
                    }
                }
            }
            for _ in 0..4 {
                for h in 0..2 {
                    self.send(h, u64::MAX / 4);
                }
                for l in 0..LINKS {
                    for d in 0..2 {
                        while !self.wire[l][d].is_empty() {
                            self.deliver(l, d);
                        }
                    }
                }
                for h in 0..2 {
                    for _ in 0..self.hosts[h]
                        .open
                        .values()
                        .map(|q| q.0.len())
                        .sum::<usize>()
                    {
                        self.take(h)?;
                    }
                }
            }
        }
        if !self.live(0) || !self.live(1) || !self.up.iter().any(|&u| u) {
            return Ok(());
        }
        for h in 0..2 {
            if self.hosts[h].moving.is_some() {
                return Err(format!("host {h}'s move never completed"));
            }
            let (w, r) = (&self.hosts[h], &self.hosts[1 - h]);
            if r.received != w.written {
                return Err(format!(
                    "host {}'s reader has {} of the {} bytes host {h} wrote, the links up",
                    1 - h,
                    r.received,
                    w.written
                ));
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: env_or("PROPTEST_CASES", 2048),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(env_or("PROPTEST_RNG_SEED", SEED)),
        ..ProptestConfig::default()
    })]

    /// Whatever the interleaving, each reader takes its writer's stream
    /// exactly, and with a link up everything gets there.
    #[test]
    fn a_connection_moved_between_links_loses_duplicates_and_reorders_nothing(
        spread in proptest::bool::ANY,
        steps in proptest::collection::vec(step(), 1..300),
    ) {
        let policy = if spread { LinkPolicy::Spread } else { LinkPolicy::ActiveBackup };
        let mut m = Model::new(policy);
        for s in &steps {
            m.run(s).map_err(TestCaseError::fail)?;
        }
        m.finish().map_err(TestCaseError::fail)?;
    }
}

/// The random runs above complete moves (both hosts), not only fall back;
/// and one move by hand: link 0 fails with bytes in flight both ways.
#[test]
fn moves_complete() {
    let mut m = Model::new(LinkPolicy::ActiveBackup);
    for h in 0..2 {
        m.run(&Step::Post(h, 10_000)).unwrap();
        m.run(&Step::Send(h, 7_000)).unwrap();
    }
    m.run(&Step::Deliver(0, 0)).unwrap();
    m.run(&Step::Take(1)).unwrap();
    m.run(&Step::Fail(0)).unwrap();
    m.run(&Step::Notice(1, 0)).unwrap();
    m.finish().unwrap();
    assert!(m.live(0) && m.live(1));
    assert_eq!(link_of(m.hosts[0].ch), 1);
    assert_eq!(m.hosts[1].received, 10_000);
    assert_eq!(m.hosts[0].received, 10_000);
    let before = MOVES.load(Ordering::Relaxed);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(SEED),
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(step(), 100..300), |steps| {
            let mut m = Model::new(LinkPolicy::Spread);
            for s in &steps {
                m.run(s).map_err(TestCaseError::fail)?;
            }
            m.finish().map_err(TestCaseError::fail)?;
            Ok(())
        })
        .unwrap();
    assert!(
        MOVES.load(Ordering::Relaxed) - before >= 20,
        "64 random runs completed {} moves",
        MOVES.load(Ordering::Relaxed) - before
    );
}
