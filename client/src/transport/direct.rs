//! Direct: both ends on this host share one sealed region with a stream
//! ring per direction. No syscall on a busy path; a blocked call spins for
//! its budget, then sleeps on its process's doorbell (`crate::bells`) and
//! the kernel socket (liveness).
//!
//! The region part of a direction can be closed (docs/protocol.md 2.4):
//! by an end whose process execs a program that will not take the end
//! over (`Handover::before_plain_exec`), at what it read and what it
//! wrote; the other end then reads up to the closed offset and sends
//! again, from the ring, what was not taken. Must never: take a byte past
//! a closed offset, or judge the kernel socket of a closed connection.

use super::{liveness, pipe_error, reset_error, would_block, Ctx, Liveness, Ready, Transport};
use crate::bells;
use crate::session::Session;
use ssock_rings::codec::{Attachment, Mode, Request, Side};
use ssock_rings::layout::{self, check_header, DirectLayout, RegionKind, Taken};
use ssock_rings::notify::{sleep, spin_until, Gate};
use ssock_rings::shm::Mapping;
use ssock_rings::stream::{Consumer, Producer, ReadOutcome, Violation};
use ssock_rings::sys::{check_sealed, PollFd};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

/// Why a Direct attachment was refused.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// devd sent the wrong number of fds.
    #[error("attachment carries {0} fds, expected 1 or 2")]
    Fds(usize),
    /// This process has no doorbell to sleep on.
    #[error("no doorbell in this process")]
    NoBell,
    /// The region is not a sealed memfd of the announced size.
    #[error("connection region refused")]
    Region(#[source] io::Error),
    /// The announced geometry is inconsistent.
    #[error("connection region layout refused")]
    Layout(#[source] ssock_rings::layout::LayoutError),
    /// devd named a kept region this process does not have.
    #[error("region {0} is not kept in this process")]
    NotKept(u64),
}

/// A region this process kept mapped after its Direct connection closed
/// (it said so in its Release, `park`): devd hands it
/// to the next connection between the same two devd sessions (processes)
/// in the same roles (Attachment `reuse`), which then needs no new region,
/// no fds, no mapping and no page faults.
#[derive(Debug)]
pub struct Parked {
    region: u64,
    /// The end it was (a process connected to itself keeps both).
    side: Side,
    map: Arc<Mapping>,
}

/// Regions a process keeps at most, and their total size at most (devd
/// keeps fewer per process, see its `PARKED_PER_SESSION`; one devd let go
/// of stays here until pushed out, oldest first).
const SHELF_MAX: usize = 8;
/// See [`SHELF_MAX`].
const SHELF_MAX_BYTES: usize = 32 << 20;

/// The kept regions, oldest first, with the value of
/// [`ssock_rings::sys::child_of`] they were kept under.
static SHELF: Mutex<(u64, VecDeque<Parked>)> = Mutex::new((0, VecDeque::new()));

/// The value of [`ssock_rings::sys::child_of`] of the process that uses
/// the shelf: another one here means a child that has not used it yet.
static SHELF_OWNER: AtomicU64 = AtomicU64::new(0);

/// How long a child tries the shelf's lock on its first use.
const SHELF_PATIENCE: std::time::Duration = std::time::Duration::from_micros(200);

/// Runs `f` on this process's kept regions; None in a child whose copy of
/// the shelf stayed locked (the fork came while another thread held it):
/// that process keeps nothing.
fn with_shelf<R>(f: impl FnOnce(&mut VecDeque<Parked>) -> R) -> Option<R> {
    let gen = ssock_rings::sys::child_of();
    let mut g = if SHELF_OWNER.load(Ordering::Acquire) == gen {
        SHELF.lock().unwrap_or_else(|p| p.into_inner())
    } else {
        // A child after fork, first use: the lock may be held by a thread
        // that does not exist here. Held for microseconds at a time by a
        // live one, so a while of trying tells (spinning, no system call:
        // the child may be sandboxed already).
        let start = std::time::Instant::now();
        let g = std::iter::repeat(()).find_map(|()| match SHELF.try_lock() {
            Ok(g) => Some(Some(g)),
            Err(TryLockError::Poisoned(p)) => Some(Some(p.into_inner())),
            Err(TryLockError::WouldBlock) if start.elapsed() > SHELF_PATIENCE => Some(None),
            Err(TryLockError::WouldBlock) => {
                std::hint::spin_loop();
                None
            }
        })??;
        SHELF_OWNER.store(gen, Ordering::Release);
        g
    };
    if g.0 != gen {
        // The kept regions were not inherited (MADV_DONTFORK): all
        // forgotten, nothing unmapped.
        for p in g.1.drain(..) {
            std::mem::forget(p);
        }
        g.0 = gen;
    }
    Some(f(&mut g.1))
}

/// Keeps a region for reuse if no fork happened since `at` (the fork
/// count when it came into this process); false if it is not kept. It is
/// marked MADV_DONTFORK first, so no child forked from then on gets it
/// (also one forked without the atfork handlers); a fork counted before
/// that shows in the count read after it.
fn park(p: Parked, at: u64) -> bool {
    if p.map.len() > SHELF_MAX_BYTES || p.map.set_inherited(false).is_err() {
        return false;
    }
    if ssock_rings::sys::forks() != Some(at) {
        return false;
    }
    with_shelf(|s| {
        let mut bytes = p.map.len();
        for q in s.iter() {
            bytes += q.map.len();
        }
        while s.len() >= SHELF_MAX || bytes > SHELF_MAX_BYTES {
            match s.pop_front() {
                Some(q) => bytes -= q.map.len(),
                None => break,
            }
        }
        s.push_back(p);
    })
    .is_some()
}

/// Takes kept region `region`'s end `side` off the shelf, if this
/// process has it.
pub fn unpark(region: u64, side: Side) -> Option<Parked> {
    let p = with_shelf(|s| {
        let i = s
            .iter()
            .position(|p| p.region == region && p.side == side)?;
        s.remove(i)
    })??;
    // Live again: a child forked from now on inherits it, as any live
    // connection's region.
    p.map.set_inherited(true).ok()?;
    Some(p)
}

/// Where an attached end's region comes from.
#[derive(Debug)]
pub enum Source {
    /// The fds devd sent: [region], then the peer's doorbell if the
    /// attachment names one.
    Fds(Vec<OwnedFd>),
    /// A region this process kept (the attachment says `reuse`).
    Parked(Parked),
}

/// How often a look at readiness asks the kernel socket of an end whose
/// peer may have left with this end's bytes unread
/// ([`Transport::peer_may_have_left`]): at most once a millisecond (the
/// coarse clock's tick, a few milliseconds, in practice).
const PROBE_EVERY_NS: u64 = 1_000_000;

/// One end of a Direct connection.
#[derive(Debug)]
pub struct Direct {
    conn_id: u64,
    /// devd's id of the region, kept on close.
    region: u64,
    /// Sleeps of `Transport::arm` under way (ended by `disarm`), each
    /// with the directions it waits on.
    sleeps: Vec<(bells::Sleep, [bool; 2])>,
    /// The doorbell each direction's wait word names (0: not armed), and
    /// the direction's progress (`progress`) when it was named.
    named: [u32; 2],
    named_at: [u64; 2],
    /// `sys::child_of` when `sleeps` and `sleepers` were last right: a
    /// forked child has none of the parent's sleeping threads.
    sleeps_gen: u64,
    /// How this end rings its peer's doorbells.
    rings: Arc<bells::ProcessBells>,
    /// The region may be kept on close ([`Parked`]) if no fork happened
    /// since it came into this process: the fork count then (None: an end
    /// attached by its socket or taken over, never kept).
    keep: Option<u64>,
    map: Arc<Mapping>,
    side: Side,
    tx: Producer,
    rx: Consumer,
    session: Option<Arc<Session>>,
    peer_gone: bool,
    /// The kernel socket was reset (not closed with a FIN).
    peer_reset: bool,
    /// When (coarse CLOCK_MONOTONIC ns) `peer_may_have_left` last sent a
    /// look to the kernel socket.
    probed_at: u64,
    broken: bool,
    closed: bool,
    /// Close with a reset (SO_LINGER 0).
    abort: bool,
    /// Threads asleep through `arm` on each direction (several threads may
    /// poll one socket): the wait word is cleared only when the last one
    /// leaves, so nobody's wake-up is taken away.
    sleepers: [u32; 2],
    /// Whether spinning paid lately on this end's waits.
    gate: Arc<Gate>,
}

impl Direct {
    /// Maps the region devd handed out (or takes the kept one it names)
    /// and takes this side's ring ends. `keep`: see the field of that name.
    pub fn attach(
        a: &Attachment,
        src: Source,
        session: Option<Arc<Session>>,
        keep: Option<u64>,
    ) -> Result<Direct, AttachError> {
        Direct::attach_inner(a, src, session, true, keep)
    }

    /// Like `attach` for an end this process got without negotiating it
    /// (inherited across exec, or received over a Unix socket): the hold
    /// it takes over was counted already (by the exec'd image, or by the
    /// sender's `fork_hold`), so none is added.
    pub fn adopt(
        a: &Attachment,
        src: Source,
        session: Option<Arc<Session>>,
    ) -> Result<Direct, AttachError> {
        Direct::attach_inner(a, src, session, false, None)
    }

    fn attach_inner(
        a: &Attachment,
        src: Source,
        session: Option<Arc<Session>>,
        hold: bool,
        keep: Option<u64>,
    ) -> Result<Direct, AttachError> {
        let size = usize::try_from(a.region_size).unwrap_or(usize::MAX);
        let layout = DirectLayout::announced(size, a.geom_a).map_err(AttachError::Layout)?;
        if !bells::usable() {
            return Err(AttachError::NoBell);
        }
        let map = match src {
            Source::Fds(fds) => {
                if fds.len() != a.fd_count() {
                    return Err(AttachError::Fds(fds.len()));
                }
                let mut fds = fds.into_iter();
                let region = fds.next().ok_or(AttachError::Fds(0))?;
                if let Some(peer) = fds.next() {
                    bells::learn(a.peer_bell, peer);
                }
                if let Some(thread) = fds.next() {
                    bells::learn(a.peer_thread_bell, thread);
                }
                check_sealed(region.as_fd(), size).map_err(AttachError::Region)?;
                let map = Mapping::map(region.as_fd(), size, true).map_err(AttachError::Region)?;
                Arc::new(map)
            }
            // devd reset the header for this connection; it is checked below
            // like a new region's.
            Source::Parked(p)
                if p.region == a.region && p.side == a.side && p.map.len() == size =>
            {
                p.map
            }
            Source::Parked(_) => return Err(AttachError::NotKept(a.region)),
        };
        check_header(&map, RegionKind::Direct, a.conn_id, a.geom_a, 0)
            .map_err(AttachError::Layout)?;
        if hold {
            layout::hold(&map, a.side as usize);
        }
        // Our producer wakes the peer's readers, our consumer its writers,
        // by the doorbell each names in its wait word.
        let rings = Arc::new(bells::ProcessBells::new(
            session.clone(),
            a.peer_bell,
            a.conn_id,
        ));
        let (out, inn) = match a.side {
            Side::Connector => (0, 1),
            Side::Acceptor => (1, 0),
        };
        Ok(Direct {
            conn_id: a.conn_id,
            region: a.region,
            sleeps: Vec::new(),
            named: [0; 2],
            named_at: [0; 2],
            sleeps_gen: ssock_rings::sys::child_of(),
            keep,
            side: a.side,
            map: map.clone(),
            tx: Producer::new(map.clone(), layout, out, rings.clone()),
            rx: Consumer::new(map, layout, inn, rings.clone()),
            rings,
            session,
            peer_gone: false,
            peer_reset: false,
            probed_at: 0,
            broken: false,
            closed: false,
            sleepers: [0; 2],
            abort: false,
            gate: Arc::default(),
        })
    }

    fn violation(&mut self, v: Violation) -> io::Error {
        log::warn!("connection {}: {v}; resetting it", self.conn_id);
        self.break_conn();
        if let Some(s) = &self.session {
            let _ = s.request(
                &Request::Violation {
                    conn_id: self.conn_id,
                },
                &[],
            );
        }
        reset_error()
    }

    fn break_conn(&mut self) {
        if !self.broken {
            self.broken = true;
            self.tx.reset();
            self.rx.close();
        }
    }

    /// Where direction `d`'s region part was closed, if it was.
    fn closed_at(&self, d: usize) -> Option<u64> {
        match layout::taken(&self.map, d) {
            Taken::Closed(at) => Some(at),
            Taken::Open(_) => None,
        }
    }

    /// Wakes the peer after a region part closed: both its wait words,
    /// and its process's common doorbell (a thread of it may be asleep on
    /// its kernel socket only, with this word unarmed).
    fn wake_peer(&mut self) {
        self.rx.nudge();
        self.tx.nudge();
        self.rings.ring_common();
    }

    /// The direction this end reads.
    fn d_in(&self) -> usize {
        1 - self.side as usize
    }

    fn check_peer(&mut self, ctx: &Ctx<'_>) {
        if self.peer_gone {
            return;
        }
        match liveness(ctx.tcp) {
            Liveness::Alive => {}
            // A closed region part: the kernel socket carries the
            // hand-over's bytes again, not stray ones.
            Liveness::Stray if self.closed_at(0).is_some() || self.closed_at(1).is_some() => {}
            Liveness::Gone => {
                self.peer_gone = true;
                // Its reads not closed, its last holder exited without
                // close() (its writes may have ended with a shutdown
                // first). The kernel resets a connection closed with
                // bytes unread, and this end's bytes the peer never took
                // are that (a closed region part: the hand-over's).
                let (_, reset) = self.rx.marks();
                if !reset
                    && !self.tx.peer_closed()
                    && self.closed_at(0).is_none()
                    && self.closed_at(1).is_none()
                    && self.tx.unconsumed().is_ok_and(|n| n > 0)
                {
                    self.peer_reset = true;
                }
            }
            Liveness::Reset => {
                self.peer_gone = true;
                self.peer_reset = true;
            }
            Liveness::Stray => {
                log::warn!("connection {}: bytes on the kernel socket of a Direct connection; resetting it", self.conn_id);
                self.peer_gone = true;
                self.break_conn();
            }
        }
    }

    /// Sleeps (`bell`, started before the wait word was armed) until the
    /// doorbell rings, the peer's socket changes, `bells::cap` passes (a
    /// spurious wake-up: the caller looks again), or the deadline passes
    /// (EWOULDBLOCK).
    fn sleep(&mut self, ctx: &Ctx<'_>, bell: bells::Sleep) -> io::Result<()> {
        let mut fds: Vec<PollFd> = bell.fds().map(|fd| PollFd::new(fd, libc::POLLIN)).collect();
        let bells_n = fds.len();
        if !self.peer_gone {
            fds.push(PollFd::new(
                ctx.tcp.as_raw_fd(),
                libc::POLLIN | libc::POLLRDHUP,
            ));
        }
        let cap = std::time::Instant::now() + bells::cap();
        let until = ctx.deadline.map_or(cap, |d| d.min(cap));
        let woke = sleep(&mut fds, Some(until));
        bells::polled(fds.iter().map(|p| (p.fd, p.revents)));
        drop(bell);
        let woke = woke?;
        if fds.get(bells_n).is_some_and(|p| p.revents != 0) {
            self.check_peer(ctx);
        }
        if woke || ctx.deadline.is_none_or(|d| d > until) {
            Ok(())
        } else {
            Err(would_block())
        }
    }

    fn wait_readable(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        if ctx.nonblocking {
            if ctx.check_peer {
                self.check_peer(ctx);
            }
            return if self.peer_gone {
                Ok(())
            } else {
                Err(would_block())
            };
        }
        let rx = &mut self.rx;
        // (A close is seen once the spin ends: after `arm` below.)
        if spin_until(ctx.spin, &self.gate, || {
            rx.ready().unwrap_or(true).then_some(())
        })
        .is_some()
        {
            return Ok(());
        }
        // Counted as a sleeper before the wait word names the doorbell.
        let bell = bells::enter(self.session.as_deref()).ok_or_else(would_block)?;
        match self.rx.arm(bell.id()) {
            // (Its fence orders the wait word before this look at the
            // words, as the closing end's nudge after its close.)
            Ok(true) if self.closed_at(self.d_in()).is_some() => {
                self.rx.disarm();
                return Ok(());
            }
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(v) => return Err(self.violation(v)),
        }
        let r = self.sleep(ctx, bell);
        self.rx.disarm();
        r
    }

    fn wait_writable(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        let tx = &mut self.tx;
        let out = self.side as usize;
        // (A close is seen once the spin ends: after `arm` below.)
        if spin_until(ctx.spin, &self.gate, || {
            (tx.writable().unwrap_or(1) > 0 || tx.peer_closed()).then_some(())
        })
        .is_some()
        {
            return Ok(());
        }
        let bell = bells::enter(self.session.as_deref()).ok_or_else(would_block)?;
        match self.tx.arm(bell.id()) {
            // (As in `wait_readable`.)
            Ok(true) if self.closed_at(out).is_some() => {
                self.tx.disarm();
                return Ok(());
            }
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(v) => return Err(self.violation(v)),
        }
        let r = self.sleep(ctx, bell);
        self.tx.disarm();
        r
    }

    fn take(&mut self, buf: &mut [u8], ctx: &Ctx<'_>, consume: bool) -> io::Result<usize> {
        loop {
            if self.broken {
                return Err(reset_error());
            }
            let r = if consume {
                self.rx.read(buf)
            } else {
                self.rx.peek(buf)
            };
            match r.map_err(|v| self.violation(v))? {
                ReadOutcome::Data(n) => return Ok(n),
                ReadOutcome::Eos => return Ok(0),
                ReadOutcome::Reset => {
                    self.broken = true;
                    return Err(reset_error());
                }
                ReadOutcome::Empty => {}
            }
            // A closed region part ends where its writer stopped writing
            // into the ring (its head, or this end's tail when this end
            // closed it, after which it never reads here again): once the
            // ring is empty, the hand-over reads the kernel socket.
            if self.closed_at(self.d_in()).is_some() {
                return Err(would_block());
            }
            if self.peer_gone {
                // The peer's socket closed without an end-of-stream mark:
                // its last holder exited or died without close(). The
                // kernel's FIN means end of stream there too; a reset is
                // a reset.
                if !self.peer_reset {
                    return Ok(0);
                }
                self.break_conn();
                return Err(reset_error());
            }
            self.wait_readable(ctx)?;
        }
    }
}

impl Direct {
    /// How far direction `d` (0: what this end reads, 1: what it writes)
    /// has come, read fresh from the ring: bytes moved plus marks. It
    /// changes whenever a sleeper on it may have something new to see.
    fn progress(&mut self, d: usize) -> u64 {
        if d == 0 {
            let _ = self.rx.readable();
            let (eos, reset) = self.rx.marks();
            self.rx.produced_seen() + u64::from(eos) + u64::from(reset)
        } else {
            let _ = self.tx.writable();
            self.tx.consumed_seen() + u64::from(self.tx.peer_closed())
        }
    }

    /// Has direction `d`'s wait word name doorbell `id`, whatever the ring
    /// holds, with a fence after it (`arm_always`).
    fn name(&mut self, d: usize, id: u32) {
        if d == 0 {
            self.rx.arm_always(id);
        } else {
            self.tx.arm_always(id);
        }
        self.named[d] = id;
    }

    /// Ends one sleep on directions `read`/`write`, whose doorbell was
    /// `gone` (taken out of `sleeps` already): a direction's last sleeper
    /// resets its wait word; otherwise a word that named it names another.
    fn leave(&mut self, gone: Option<u32>, read: bool, write: bool) {
        let mut moved = false;
        for (d, on) in [read, write].into_iter().enumerate() {
            if !on || self.sleepers[d] == 0 {
                continue;
            }
            self.sleepers[d] -= 1;
            if self.sleepers[d] == 0 {
                if d == 0 {
                    self.rx.disarm();
                } else {
                    self.tx.disarm();
                }
                self.named[d] = 0;
            } else if gone.is_some_and(|g| g == self.named[d]) {
                // The word named this thread's doorbell: name another
                // sleeper of this direction (any other, if none says so).
                let next = self
                    .sleeps
                    .iter()
                    .find(|(s, dirs)| dirs[d] && !s.parked())
                    .or_else(|| self.sleeps.iter().find(|(_, dirs)| dirs[d]))
                    .or(self.sleeps.first())
                    .map_or(0, |(s, _)| s.id());
                self.name(d, next);
                // A ring meant for every sleeper here may have gone to this
                // thread's doorbell alone. After the new name is out
                // (arm_always ends with a SeqCst fence: a peer publishing
                // from now on rings the new name), the others are woken if
                // the direction moved since its named sleeper armed; never
                // for a timeout, a wake-up from elsewhere, or readiness a
                // sleeper does not want (EPOLLET, RDHUP only): two sleepers
                // would wake each other for ever.
                let now = self.progress(d);
                moved |= now != self.named_at[d];
                self.named_at[d] = now;
            }
        }
        if moved {
            for (s, _) in &self.sleeps {
                s.ring();
            }
        }
    }

    /// In a forked child, the sleeps this end knew are the parent's
    /// threads' (none of them is here): forgotten, and the wait words left
    /// to the parent's sleepers. True if there were any.
    fn forget_parents_sleeps(&mut self) -> bool {
        let gen = ssock_rings::sys::child_of();
        if self.sleeps_gen == gen {
            return false;
        }
        self.sleeps_gen = gen;
        self.sleeps.clear();
        self.sleepers = [0; 2];
        self.named = [0; 2];
        true
    }
}

impl Transport for Direct {
    fn gate(&self) -> Option<Arc<Gate>> {
        Some(self.gate.clone())
    }

    fn mode(&self) -> Mode {
        Mode::Direct
    }

    fn conn_id(&self) -> Option<u64> {
        Some(self.conn_id)
    }

    fn handover_words(&self) -> Option<(Arc<Mapping>, usize)> {
        Some((self.map.clone(), self.side as usize))
    }

    fn path_lost(&mut self) -> bool {
        self.closed_at(0).is_some() || self.closed_at(1).is_some()
    }

    fn close_reads(&mut self) -> io::Result<u64> {
        let d = self.d_in();
        if self.closed_at(d).is_none() && self.closed_at(self.side as usize).is_some() {
            // The peer is leaving the region (it closed what it reads): it
            // closes what it writes itself, at all it wrote, in a moment.
            // Closing it here at this end's tail would make it send the
            // rest on the kernel socket before its exec.
            return Err(would_block());
        }
        self.close_reads_here()
    }

    fn close_reads_here(&mut self) -> io::Result<u64> {
        let d = self.d_in();
        let tail = self.rx.position_now().map_err(|v| self.violation(v))?;
        let at = match layout::close_taken_at(&self.map, d, tail) {
            Ok(()) => {
                // The writer sends again from here: wake it.
                self.wake_peer();
                tail
            }
            // Its writer closed it first, at what it wrote: this end reads
            // the rest from the ring.
            Err(Taken::Closed(at)) if at >= tail && at - tail <= self.rx.capacity() => at,
            Err(_) => {
                let v = ssock_rings::stream::Violation("region part closed at a wrong offset");
                return Err(self.violation(v));
            }
        };
        Ok(at)
    }

    fn close_writes(&mut self) -> io::Result<(u64, Vec<u8>)> {
        let d = self.side as usize;
        let head = self.tx.position_now().map_err(|v| self.violation(v))?;
        match layout::close_taken_at(&self.map, d, head) {
            Ok(()) => {
                // The reader takes the rest from the ring: wake it.
                self.wake_peer();
                Ok((head, Vec::new()))
            }
            // Its reader closed it first, at what it took: the rest goes
            // again on the kernel socket (checked against the ring).
            Err(Taken::Closed(at)) => match self.tx.unconsumed_from(at) {
                Ok(rest) => Ok((at, rest)),
                Err(v) => Err(self.violation(v)),
            },
            Err(Taken::Open(_)) => {
                let v = ssock_rings::stream::Violation("region part closed at a wrong offset");
                Err(self.violation(v))
            }
        }
    }

    fn region_written(&self) -> u64 {
        self.tx.position()
    }

    fn holders(&self) -> u32 {
        layout::holders(&self.map, self.side as usize).load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reads_left(&self) -> Option<u64> {
        self.closed_at(self.d_in())
            .map(|at| at.saturating_sub(self.rx.position()))
    }

    fn peer_may_have_left(&mut self) -> bool {
        let may = !self.peer_gone
            && !self.broken
            && self.rx.marks() == (true, false)
            && !self.tx.peer_closed()
            && self.tx.unconsumed().is_ok_and(|n| n > 0);
        // At most one look per clock tick: a server that streams its answer
        // after its client's shutdown (the ring never empty) makes no
        // system call per epoll wait for it.
        let now = ssock_rings::sys::monotonic_coarse_ns();
        if !may || now.saturating_sub(self.probed_at) < PROBE_EVERY_NS {
            return false;
        }
        self.probed_at = now;
        true
    }

    fn readiness(&mut self, ctx: &Ctx<'_>, check_peer: bool) -> Ready {
        if check_peer {
            self.check_peer(ctx);
        }
        if self.broken {
            return Ready::BROKEN;
        }
        let rx_ready = self.rx.ready().unwrap_or(true);
        let (eos, reset) = self.rx.marks();
        let reader_gone = self.tx.peer_closed();
        // Writes shut down by any holder of this end (a forked child's
        // shutdown is the socket's, as in the kernel).
        let shut = self.tx.closed_by_any();
        let writable = shut || self.peer_gone || reader_gone || self.tx.writable().unwrap_or(1) > 0;
        // News for edge-triggered epoll: the end of the peer's stream (its
        // mark, or its kernel socket's end), then a reset, which ends
        // everything at once, as the kernel's tcp_done (its socket's
        // reset seen later is no more news).
        let reset_any = reset || self.peer_reset;
        let marks = if reset_any {
            2
        } else {
            u64::from(eos || self.peer_gone)
        };
        // (The shutdown counts as news for edge-triggered epoll, as the
        // kernel's wake-up at every shutdown; after a reset nothing does.)
        let tx_marks = if reset_any {
            3
        } else {
            u64::from(reader_gone || self.peer_gone) + u64::from(shut)
        };
        Ready {
            readable: rx_ready || self.peer_gone,
            writable,
            // As the kernel's tcp_poll: RDHUP once the peer's FIN is in
            // (even with bytes still to read), HUP once both directions
            // are shut (its FIN and our shutdown) or the connection reset.
            // (A reset shuts both directions: RDHUP too.)
            rdhup: eos || self.peer_gone || reset_any,
            hup: reset_any || ((eos || self.peer_gone) && shut),
            err: reset_any,
            // Sums of counters that only grow: they change when any does.
            seq: [
                self.rx.produced_seen() + marks,
                self.tx.consumed_seen() + tx_marks,
            ],
        }
    }

    fn writes_shut(&self) -> bool {
        self.tx.closed_by_any()
    }

    fn wake_readers(&mut self) {
        if self.session.as_ref().is_none_or(|s| s.is_broken()) {
            // A forked child (its inherited session is its parent's): one
            // of its own, on which devd gives it the ringer of the
            // doorbell its parent's sleeping reader named (the same user's).
            // A rare call (shutdown(SHUT_RD)); a ring asks on no new one.
            let _ = Session::global_unless_busy();
        }
        self.rx.wake_sleeper();
    }

    fn reset_errno(&self, _ctx: &Ctx<'_>) -> i32 {
        // A reset after the peer's end of stream: EPIPE, as the kernel's
        // for a reset in CLOSE_WAIT.
        match self.rx.marks() {
            (true, true) => libc::EPIPE,
            (true, false) if self.peer_reset => libc::EPIPE,
            _ => libc::ECONNRESET,
        }
    }

    fn quiet_sig(&self) -> Option<super::QuietSig> {
        // (Its own state: a local close or shutdown of writes shows in
        // the tx marks, which are shared words.)
        if self.broken || self.peer_gone || self.peer_reset || self.closed {
            return None;
        }
        let [r0, r1, r2] = self.rx.quiet_sig();
        let [t0, t1, t2, t3] = self.tx.quiet_sig();
        Some([
            r0,
            r1,
            r2,
            t0,
            t1,
            t2,
            t3,
            layout::taken_raw(&self.map, 0),
            layout::taken_raw(&self.map, 1),
        ])
    }

    fn arm(
        &mut self,
        ctx: &Ctx<'_>,
        read: bool,
        write: bool,
    ) -> Option<Vec<(std::os::fd::RawFd, i16)>> {
        if self.broken {
            return None;
        }
        self.forget_parents_sleeps();
        // Counted as a sleeper before the wait words name the doorbell.
        let bell = if read || write {
            Some(bells::enter(self.session.as_deref())?)
        } else {
            None
        };
        let id = bell.as_ref().map_or(0, bells::Sleep::id);
        // A direction already armed by another sleeper stays armed, unless
        // it names a parked end's doorbell: nobody may be waiting on that
        // one, and this thread's wake-up must reach it.
        let parked_name = |d: usize| {
            self.named[d] != 0
                && self
                    .sleeps
                    .iter()
                    .any(|(s, _)| s.parked() && s.id() == self.named[d])
        };
        let rename = [0, 1].map(|d| id != 0 && parked_name(d));
        for (d, on) in [read, write].into_iter().enumerate() {
            if on && (self.sleepers[d] == 0 || rename[d]) {
                self.name(d, id);
                // A name taken from a parked end's doorbell keeps the
                // progress seen when that was named: a publish that rang
                // this thread alone, and that it does not consume, is
                // passed on when it leaves (`leave`).
                if !rename[d] {
                    self.named_at[d] = self.progress(d);
                }
            }
        }
        self.sleepers[0] += u32::from(read);
        self.sleepers[1] += u32::from(write);
        let mut fds = Vec::with_capacity(3);
        if let Some(bell) = bell {
            fds.extend(bell.fds().map(|fd| (fd, libc::POLLIN)));
            self.sleeps.push((bell, [read, write]));
        }
        if !self.peer_gone {
            fds.push((ctx.tcp.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP));
        }
        Some(fds)
    }

    fn wake_self(&self) {
        for (s, _) in &self.sleeps {
            s.ring();
        }
    }

    fn peer_claimed(&mut self) {
        let id = layout::acceptor_bell(&self.map);
        self.rings.set_common(id);
        bells::know(id, self.session.as_deref());
    }

    fn pending(&mut self, _ctx: &Ctx<'_>) -> (usize, usize) {
        // What this end wrote into the ring is in its peer's receive queue,
        // which the kernel would have acknowledged: nothing outstanding
        // (SIOCOUTQ; a program that waits for 0 before it closes would
        // wait for its peer's reads otherwise).
        (self.rx.readable().unwrap_or(0), 0)
    }

    fn disarm(&mut self, read: bool, write: bool) {
        if self.forget_parents_sleeps() {
            return;
        }
        if !read && !write {
            return;
        }
        // Ends one of this thread's sleeps (another thread's stays).
        let gone = self
            .sleeps
            .iter()
            .rposition(|(s, _)| s.on_this_thread())
            .map(|i| self.sleeps.remove(i).0.id());
        self.leave(gone, read, write);
    }

    fn park(&mut self, sleep: bells::Sleep, read: bool, write: bool) -> bool {
        if self.broken || !(read || write) {
            return false;
        }
        self.forget_parents_sleeps();
        // One parking per direction: a second set's would find the word
        // naming the first set's doorbell, whose set may never wait again.
        if self
            .sleeps
            .iter()
            .any(|(s, d)| s.parked() && ((read && d[0]) || (write && d[1])))
        {
            return false;
        }
        let id = sleep.id();
        for (d, on) in [read, write].into_iter().enumerate() {
            if on && self.sleepers[d] == 0 {
                self.name(d, id);
                self.named_at[d] = self.progress(d);
            }
        }
        self.sleepers[0] += u32::from(read);
        self.sleepers[1] += u32::from(write);
        self.sleeps.push((sleep, [read, write]));
        true
    }

    fn repark(&mut self, id: u32) -> bool {
        if self.forget_parents_sleeps() || self.broken {
            return false;
        }
        let Some(&(_, dirs)) = self.sleeps.iter().find(|(s, _)| s.parked() && s.id() == id) else {
            return false;
        };
        // (A direction a thread's sleep names now is armed by it: its
        // leave names the parking again, with a fresh wait.)
        for (d, on) in dirs.into_iter().enumerate() {
            if on && self.named[d] == id {
                self.name(d, id);
                self.named_at[d] = self.progress(d);
            }
        }
        true
    }

    fn unpark(&mut self, id: u32) -> bool {
        if self.forget_parents_sleeps() {
            return false;
        }
        let Some(i) = self
            .sleeps
            .iter()
            .position(|(s, _)| s.parked() && s.id() == id)
        else {
            return false;
        };
        let (s, [read, write]) = self.sleeps.remove(i);
        self.leave(Some(s.id()), read, write);
        true
    }

    fn fork_hold(&mut self) {
        if !self.closed {
            layout::hold(&self.map, self.side as usize);
        }
    }

    fn abort_on_close(&mut self) {
        self.abort = true;
    }

    fn count_kernel(&self, reason: ssock_rings::codec::FallbackReason) {
        if let Some(s) = &self.session {
            let _ = s.post(&Request::Skipped { reason, count: 1 });
        }
    }

    fn discard_region(&mut self) {
        self.keep = None;
    }

    fn drop_hold(&mut self) {
        if !self.closed {
            layout::unhold(&self.map, self.side as usize);
        }
    }

    fn let_go_keeping_socket(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Some(s) = &self.session {
            let _ = s.post(&Request::Release {
                conn_id: self.conn_id,
                side: self.side,
                park: false,
            });
        }
    }

    fn read(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        self.take(buf, ctx, true)
    }

    fn peek(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        self.take(buf, ctx, false)
    }

    fn write(&mut self, buf: &[u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        let mut off = 0;
        loop {
            if self.broken {
                return Err(reset_error());
            }
            if self.tx.is_closed() || self.peer_gone || self.tx.peer_closed() {
                return if off > 0 { Ok(off) } else { Err(pipe_error()) };
            }
            off += self.tx.write(&buf[off..]).map_err(|v| self.violation(v))?;
            if off == buf.len() {
                return Ok(off);
            }
            if self.closed_at(self.side as usize).is_some() {
                // The reader stopped taking from the region (the hand-over
                // looked before this call): the rest goes on the kernel
                // socket, and what went into the ring after the close is
                // sent again there (`fail_back`).
                return if off > 0 { Ok(off) } else { Err(would_block()) };
            }
            if ctx.nonblocking {
                if ctx.check_peer {
                    self.check_peer(ctx);
                }
                return if off > 0 { Ok(off) } else { Err(would_block()) };
            }
            match self.wait_writable(ctx) {
                Ok(()) => {}
                // Like the kernel: a call that moved bytes reports them, even
                // when a signal or a timeout ends it.
                Err(_) if off > 0 => return Ok(off),
                Err(e) => return Err(e),
            }
        }
    }

    fn shutdown_write(&mut self, _ctx: &Ctx<'_>) -> io::Result<()> {
        if !self.broken {
            self.tx.close();
        }
        Ok(())
    }

    fn close(&mut self) {
        self.close_or_reset(&|| false);
    }

    fn close_or_reset(&mut self, reset: &dyn Fn() -> bool) {
        if self.closed {
            return;
        }
        self.closed = true;
        if !layout::let_go(&self.map, self.side as usize) {
            // Another process (a child, a process it was passed to) still
            // holds this end: devd keeps it while any process holds the
            // socket.
            if let Some(s) = &self.session {
                let _ = s.post(&Request::Leave {
                    conn_id: self.conn_id,
                    side: self.side,
                });
            }
            return;
        }
        if !self.broken {
            // Like the kernel's close: a reset instead of end-of-stream
            // after SO_LINGER 0, or when received bytes were left unread.
            // (Bytes past a closed reads' offset are the peer's to send
            // again on the kernel socket, not unread here.)
            let unread =
                self.closed_at(self.d_in()).is_none() && self.rx.readable().unwrap_or(0) > 0;
            if self.abort || unread || reset() {
                self.tx.reset();
            } else {
                self.tx.close();
            }
            self.rx.close();
        }
        if let Some(s) = &self.session {
            // Kept (if no fork since it came into this process: a child
            // may map it) before devd hears of it: a reply reusing it may
            // come to another thread as soon as devd has.
            let park = match self.keep {
                Some(at)
                    if !self.broken
                        && self.closed_at(0).is_none()
                        && self.closed_at(1).is_none() =>
                {
                    self::park(
                        Parked {
                            region: self.region,
                            side: self.side,
                            map: self.map.clone(),
                        },
                        at,
                    )
                }
                _ => false,
            };
            let _ = s.post(&Request::Release {
                conn_id: self.conn_id,
                side: self.side,
                park,
            });
        }
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        self.close();
    }
}
