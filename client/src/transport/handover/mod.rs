//! The hand-over between the kernel socket and the region, per direction
//! (docs/protocol.md section 2.3). Until a direction's writer moves, its
//! bytes travel on the kernel socket, so nothing of ssock's is ever on it:
//! an acceptor that never claims the connection, or is refused, reads
//! exactly what its peer wrote. The acceptor, once it holds its end, says
//! so (CLAIM accepted); the connector, once it holds its end, says so too
//! (READY). Each moves its writes once the other said so (the acceptor
//! waits a moment for READY first, so that its writes usually move from
//! the first byte), publishing how many bytes it wrote on the kernel
//! socket before; each reader reads the kernel socket up to that offset,
//! then the region. A connector that could not take its end (its fds did
//! not arrive) never says READY, and reads only the kernel socket.
//!
//!
//! When the region stops carrying bytes (a Queued end whose devd is gone),
//! both directions move back to the kernel socket (section 2.4): a reader
//! closes its direction's region part at what it took plus what it holds,
//! or its writer closes it at what was taken; the writer writes what it
//! kept from there on on the kernel socket, then the rest of its writes.
//!
//! Must never: read past a published offset on the kernel socket, move a
//! direction whose end several processes hold, or let the wrapped
//! transport judge the kernel socket (liveness) while that socket still
//! carries the peer's bytes.

mod back;
mod forward;
mod wait;

use super::{pipe_error, reset_error, would_block, Ctx, Leave, Ready, Transport};
use forward::OfferWatch;
use ssock_rings::codec::Mode;
use ssock_rings::layout::{
    self, End, Switch, CLAIM_ACCEPTED, CLAIM_KERNEL, FLAG_PEER_RESET, FLAG_RESET,
};
use ssock_rings::shm::Mapping;
use ssock_rings::sys::PollFd;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// First bound of a blocking wait's sleep while a direction is on the
/// kernel socket (see `Handover::recheck`).
const RECHECK_MIN: std::time::Duration = std::time::Duration::from_millis(1);
/// Its largest bound.
const RECHECK_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the last close of an end that moved back waits for room to
/// send what it still owes its reader (then it resets the connection).
const CLOSE_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a read that moved back waits for its remote writer's END
/// once the kernel socket ended (see `Handover::back_end_unknown`).
const BACK_END_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a blocking wait looks before it sleeps while a direction is
/// on the kernel socket (at most the caller's spin budget).
const PHASE_SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// Where this end's writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tx {
    /// The kernel socket, this many bytes so far; moves once claimed.
    Tcp(u64),
    /// The kernel socket for good (the end was shared before it moved).
    Pinned,
    /// Shut down (SHUT_WR) on the kernel socket before it moved.
    Shut,
    /// The region.
    Ring,
    /// The kernel socket again, for good (the region stopped carrying
    /// bytes): first `Handover::resend`, then the rest.
    Back,
}

/// Where this end's reads come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    /// The kernel socket, up to the offset its writer published (once it has).
    Tcp(Option<u64>),
    /// The kernel socket for good (its writer never moves).
    Forever,
    /// The region (once its region part is closed, only up to there).
    Ring,
    /// The kernel socket again, for good: the region part closed at region
    /// offset `at`; `after` bytes read here since.
    Back { at: u64, after: u64 },
}

/// A Direct or Queued end whose directions may still be on the kernel
/// socket.
#[derive(Debug)]
pub struct Handover {
    inner: Box<dyn Transport>,
    map: Arc<Mapping>,
    /// 0 connector, 1 acceptor: this end writes direction `side`.
    side: usize,
    tx: Tx,
    rx: Rx,
    /// devd said the connection stays on the kernel socket: the wrapped
    /// end was let go of, every call is the kernel socket's.
    kernel: bool,
    /// The kernel socket's end of stream (or the peer's SHUT_WR) was seen
    /// while it carried the peer's bytes: it no longer wakes writers.
    tcp_eof: bool,
    /// Direct: the peer's socket ended before its writes moved and without
    /// it publishing anything (it died): writes into the region fail.
    peer_closed: bool,
    /// How long a blocking wait here sleeps at most before it looks at the
    /// hand-over words again (doubling up to a second, back to 1 ms when
    /// a direction moves): a safety net, not the wake-up path.
    recheck: std::time::Duration,
    /// The region stopped carrying bytes: both directions went back to the
    /// kernel socket (or are on their way there).
    lost: bool,
    /// Where this end's reads from the region end (its direction's region
    /// part closed there), once closed.
    reads_closed: Option<u64>,
    /// Written into the region and not taken by the reader: the first
    /// bytes of `Tx::Back`, sent from `resend[resent..]`.
    resend: Vec<u8>,
    resent: usize,
    /// How many bytes were sent again in all (for tests and logs).
    resend_total: u64,
    /// `Tx::Back`: bytes this end wrote since its writes moved to the
    /// region (in the region, then on the kernel socket): its END.
    tail: u64,
    /// shutdown(SHUT_WR) was asked for: once `resend` is out, the kernel
    /// socket is shut down.
    wr_shut: bool,
    /// `Tx::Back`: the kernel socket was shut down for writing.
    back_shut: bool,
    broken: bool,
    closed: bool,
    /// In a fork's prepare handler: no request to devd from here.
    forking: bool,
    /// The kernel socket's error (a reset) that a look at it took while
    /// the stream's end was unsure: reported by the read that finds the
    /// socket's end to be the stream's, as the kernel would have.
    tcp_err: Option<i32>,
    /// Since when a read that moved back waits for its remote writer's
    /// END (the kernel socket ended first), and whether that wait ended.
    end_wait: Option<(std::time::Instant, bool)>,
    /// Bytes this process sent on the kernel socket, all of them: where a
    /// direction that moves forward moves (`forward.rs`).
    sock_out: u64,
    /// This process's counts are the end's: it was never shared (fork,
    /// fd passing) nor taken over.
    counted: bool,
    /// This end will not take a new end devd offers (it cannot count its
    /// socket's bytes, or devd refused).
    forward_declined: bool,
    /// Times it moved forward onto the link.
    forwards: u32,
    /// The end's `generation`: one more each time its region changes
    /// (lost: `fail_back`; a new one: `forward`).
    gen: u64,
    /// Sleeps armed at this generation and not disarmed yet.
    sleepers: u32,
    /// Sleeps armed at an older generation (before the region was lost,
    /// or before a move forward) and not disarmed yet: they may still poll
    /// the call eventfds of the ends they armed.
    old_sleepers: u32,
    /// The forks this process is a child of when the counts above were
    /// its own (a forked child forgets its parent's sleepers).
    fork_gen: u64,
    /// The old ends' call eventfds, rung and kept open (their numbers not
    /// reused under a sleeper) until the last older sleeper is gone.
    retired: Vec<ssock_rings::sys::EventFd>,
    /// A read after moving back found the stream's end: it is over, and
    /// never moves forward (a new end's reads would wait again).
    back_eof: bool,
    /// This process took the end over (an exec, an fd received), with its
    /// region writes at this offset then: while it has written nothing
    /// into the region itself, a write direction a process it came from
    /// moved back already (END at the socket's end) owes nothing here.
    adopted_at: Option<u64>,
    /// The kernel connection was reset (a broken connection that had moved
    /// back: no other holder's close may end it cleanly).
    disconnected: bool,
}

/// How long a fresh acceptor end waits for its connector's READY: the
/// connector maps its end as soon as its Proceed arrives, which devd sent
/// before this end's Expect, so this is microseconds but for a preempted
/// connector; meanwhile a fork of this process would pin its writes.
const READY_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// Waits (spinning, yielding the CPU) up to [`READY_WAIT`] for READY.
fn wait_ready(map: &Mapping) {
    let start = std::time::Instant::now();
    while !layout::connector_ready(map) && start.elapsed() < READY_WAIT {
        std::thread::yield_now();
    }
}

impl Handover {
    /// Wraps a fresh end (from connect or accept). A transport without
    /// hand-over words (kernel TCP) is returned as it is.
    pub fn wrap(inner: Box<dyn Transport>) -> Box<dyn Transport> {
        Handover::make(inner, false)
    }

    /// Wraps an end taken over from another process (exec, fd passing):
    /// the bytes it wrote on the kernel socket are not known here, so a
    /// direction of this end that has not moved yet never will.
    pub fn adopt(inner: Box<dyn Transport>) -> Box<dyn Transport> {
        Handover::make(inner, true)
    }

    fn make(inner: Box<dyn Transport>, adopted: bool) -> Box<dyn Transport> {
        let Some((map, side)) = inner.handover_words() else {
            return inner;
        };
        // A fresh acceptor end says accepted itself, now that it holds it;
        // false if devd said kernel already.
        let refused = side == 1 && !adopted && !layout::accept_claim(&map);
        // Only the end's first holder says READY: a process that received
        // or inherited a connector end its first holder never took (it
        // stayed plain there) must not move the acceptor's writes.
        if side == 0 && !adopted {
            layout::mark_ready(&map);
        } else if side == 1 && !refused && !adopted && !layout::is_remote(&map) {
            // (A connector on another host says READY through the devds,
            // later than this wait is worth.)
            wait_ready(&map);
        }
        let mut sw = layout::switch_at(&map, side);
        if adopted && sw == Switch::NotYet {
            sw = layout::publish_switch(&map, side, Switch::Never);
        }
        let tx = match sw {
            Switch::After(_) => Tx::Ring,
            Switch::Never => Tx::Pinned,
            Switch::NotYet => Tx::Tcp(0),
        };
        let mut h = Handover {
            inner,
            map,
            side,
            tx,
            rx: Rx::Tcp(None),
            kernel: false,
            tcp_eof: false,
            peer_closed: false,
            recheck: RECHECK_MIN,
            lost: false,
            reads_closed: None,
            resend: Vec::new(),
            resent: 0,
            resend_total: 0,
            tail: 0,
            wr_shut: false,
            back_shut: false,
            broken: false,
            closed: false,
            forking: false,
            tcp_err: None,
            end_wait: None,
            sock_out: 0,
            counted: !adopted,
            forward_declined: false,
            forwards: 0,
            gen: 0,
            sleepers: 0,
            old_sleepers: 0,
            fork_gen: ssock_rings::sys::child_of(),
            retired: Vec::new(),
            back_eof: false,
            adopted_at: None,
            disconnected: false,
        };
        if adopted {
            h.adopted_at = Some(h.inner.region_written());
        }
        if refused {
            h.stay_on_kernel();
        } else {
            h.inner.words_changed();
        }
        h.step();
        Box::new(h)
    }

    /// Whether the connection stays on the kernel socket: known, or said
    /// by devd and not acted on yet (the next call lets the end go).
    /// Not while it keeps an error a look at the socket took: the read
    /// that reports it comes here first.
    fn turned_kernel(&self) -> bool {
        self.tcp_err.is_none()
            && (self.kernel
                || ((matches!(self.tx, Tx::Tcp(_)) || self.pinned_from_start())
                    && layout::claim(&self.map) == CLAIM_KERNEL))
    }

    /// Neither direction moved and this end's writes are pinned on the
    /// kernel socket: between hosts, a connection made while its link was
    /// down has both writers pinned by devd before they could move
    /// (docs/protocol.md 8.6); on one host, a connector end shared (a fork)
    /// before its acceptor claimed it. CLAIM = kernel then (its acceptor's
    /// Claim found no intent on the other host, or the two hosts never
    /// agreed; or another holder found the acceptor serving without its
    /// end) makes it a plain connection, as for an end not yet moved.
    fn pinned_from_start(&self) -> bool {
        self.tx == Tx::Pinned && matches!(self.rx, Rx::Tcp(None) | Rx::Forever)
    }

    /// Bytes this end's holders read from the kernel socket so far.
    fn done(&self) -> u64 {
        layout::tcp_read(&self.map, self.side).load(Ordering::Acquire)
    }

    /// The bytes this end wrote on the kernel socket before its writes
    /// moved (as its holders published them).
    fn tcp_written(&self) -> u64 {
        match layout::switch_at(&self.map, self.side) {
            Switch::After(n) => n,
            _ => 0,
        }
    }

    /// `r` with its progress counters moved to this end's stage: on the
    /// kernel socket (their sums count its bytes and its level, which
    /// falls as it is read), in the region, or back on the kernel socket,
    /// of each region the end had. Edge-triggered epoll reports a member
    /// when they change: without the stage, a settled end's counters (the
    /// region's alone) could come back to the sums reported while its
    /// reads were on the kernel socket, and its peer's end found then was
    /// never reported (nginx kept a keep-alive connection wrk had left
    /// for the whole of its timeout). A stage holds 2^48 of counting.
    fn staged(&self, mut r: Ready) -> Ready {
        if r.err && r.seq == Ready::BROKEN.seq {
            // A reset taken (its edge was reported before, with the
            // counters the shim keeps for it): no news, at any stage.
            return r;
        }
        let phase = if self.on_rings() {
            1
        } else if self.lost || matches!(self.rx, Rx::Back { .. }) || self.tx == Tx::Back {
            2
        } else {
            0
        };
        let stage = self.gen.wrapping_mul(3).wrapping_add(phase) << 48;
        r.seq = r.seq.map(|s| s.wrapping_add(stage));
        r
    }

    /// A send of nothing: what the kernel's says of the socket, from where
    /// the writes are. In the region: EPIPE once this end's writes are
    /// shut down (by any holder), the reset's error once the connection
    /// was reset, else 0, also when the peer closed in order (the kernel's
    /// in CLOSE_WAIT: a send of nothing provokes no RST). On the kernel
    /// socket: a send of no bytes there, which moves none.
    fn write_nothing(&mut self, ctx: &Ctx<'_>) -> io::Result<usize> {
        match (self.kernel, self.tx) {
            (false, Tx::Shut) => Err(pipe_error()),
            (false, Tx::Back) if self.wr_shut => Err(pipe_error()),
            (false, Tx::Ring) if self.writes_shut() => Err(pipe_error()),
            (false, Tx::Ring) if self.inner.readiness(&ctx.quiet(), false).err => {
                Err(reset_error())
            }
            (false, Tx::Ring | Tx::Back) => Ok(0),
            _ if ctx.plain => ssock_rings::sys::write_plain(ctx.tcp, &[]),
            _ => ssock_rings::sys::send(ctx.tcp, &[], libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL),
        }
    }

    /// Both directions in the region: every call is the wrapped end's.
    fn on_rings(&self) -> bool {
        !self.kernel && !self.lost && self.rx == Rx::Ring && self.tx == Tx::Ring
    }

    /// Looks at the hand-over words (loads only, and a compare-exchange
    /// when this end moves): what devd decided, and where the peer moved.
    /// Whether the connection broke; one that broke after it moved back
    /// is reset on its kernel socket now (AF_UNSPEC connect), since
    /// another process may hold that socket past this one's close (a
    /// holder gone to stdio, a program exec'd without ssock) and end it
    /// with a FIN its reader would take for the stream's end.
    fn broken_with(&mut self, ctx: &Ctx<'_>) -> bool {
        if self.broken && self.lost && !self.disconnected {
            self.disconnected = true;
            let _ = ssock_rings::sys::disconnect(ctx.tcp);
        }
        self.broken
    }

    fn step(&mut self) {
        if self.on_rings() && !self.inner.path_lost() {
            // Settled, and still: nothing here can change (the hot path).
            return;
        }
        if self.kernel || self.broken {
            return;
        }
        if self.pinned_from_start() && layout::claim(&self.map) == CLAIM_KERNEL {
            self.stay_on_kernel();
            return;
        }
        if !self.lost && self.inner.path_lost() {
            self.fail_back();
            if self.kernel || self.broken {
                return;
            }
        }
        if let Tx::Tcp(written) = self.tx {
            // The acceptor moves once its connector holds its end; the
            // connector once CLAIM says the acceptor holds its own.
            let go = if self.side == 1 {
                if layout::claim(&self.map) == CLAIM_KERNEL {
                    // Its connector's devd (another host's) found no
                    // intent: the connector never held its end.
                    self.stay_on_kernel();
                    return;
                }
                layout::connector_ready(&self.map)
            } else {
                match layout::claim(&self.map) {
                    CLAIM_ACCEPTED => true,
                    CLAIM_KERNEL => {
                        self.stay_on_kernel();
                        return;
                    }
                    _ if layout::is_remote(&self.map)
                        && self.inner.region_mark() & layout::FLAG_EOS != 0 =>
                    {
                        // The other host's side ended in order before its
                        // acceptor said it holds its end (its devd let
                        // that end go): it never will, and every byte
                        // either end wrote is on the kernel socket (an
                        // engine relays its words before its end mark).
                        // A reset instead stays one (bytes may be lost).
                        self.stay_on_kernel();
                        return;
                    }
                    _ => false,
                }
            };
            if go {
                self.tx = match self.publish(Switch::After(written)) {
                    Switch::After(n) if n == written => Tx::Ring,
                    // Only a broken region says otherwise: the kernel
                    // socket stays this direction's.
                    _ => Tx::Pinned,
                };
                if self.side == 0 && !self.forking {
                    self.inner.peer_claimed();
                }
            }
        }
        if let Rx::Tcp(known) = self.rx {
            let until = match known {
                Some(u) => u,
                None => match layout::switch_at(&self.map, 1 - self.side) {
                    Switch::After(u) => u,
                    Switch::Never => {
                        self.rx = Rx::Forever;
                        return;
                    }
                    Switch::NotYet => return,
                },
            };
            self.rx = Rx::Tcp(Some(until));
            if self.lost && self.reads_closed.is_none() {
                // The peer moved into a region that carries nothing more.
                self.close_reads();
            }
            let done = self.done();
            if done == until {
                self.rx = Rx::Ring;
            } else if done > until {
                log::warn!(
                    "connection {}: more bytes read from the kernel socket than its peer sent there; resetting it",
                    self.inner.conn_id().unwrap_or(0)
                );
                self.broken = true;
            }
        }
        if self.lost && self.rx == Rx::Ring && self.reads_closed.is_none() {
            // Not closed yet when the region was lost (see `close_reads`).
            self.close_reads();
        }
        if self.rx == Rx::Ring && self.inner.reads_left() == Some(0) {
            if let Some(at) = self.reads_closed {
                self.rx = Rx::Back { at, after: 0 };
            }
        }
    }

    /// Whether a sleeper armed before the region changed may still be
    /// asleep in this process (a forked child's are its own only).
    fn older_sleepers(&mut self) -> bool {
        self.forget_parents_sleeps();
        self.old_sleepers > 0
    }

    /// In a forked child, the sleepers counted are the parent's threads'
    /// (none of them is here): forgotten.
    fn forget_parents_sleeps(&mut self) {
        let now = ssock_rings::sys::child_of();
        if self.fork_gen != now {
            self.fork_gen = now;
            self.sleepers = 0;
            self.old_sleepers = 0;
            self.retired.clear();
        }
    }

    /// The end's region changed: sleepers armed so far are older ones.
    fn next_generation(&mut self) {
        self.gen += 1;
        self.old_sleepers += std::mem::take(&mut self.sleepers);
    }

    /// Writes that have not moved never will (SWITCH = NEVER); only a
    /// broken region says they moved already (another holder was first).
    fn pin_writes(&mut self) {
        self.tx = match self.publish(Switch::Never) {
            Switch::Never => Tx::Pinned,
            _ => Tx::Ring,
        };
    }

    /// Publishes where this end's writes move (see
    /// [`layout::publish_switch`]).
    fn publish(&mut self, sw: Switch) -> Switch {
        let now = layout::publish_switch(&self.map, self.side, sw);
        self.inner.words_changed();
        now
    }

    /// The wrapped end broke (reset, violation, or devd gone under a Queued
    /// end). A connector whose acceptor never claimed the connection is
    /// still a plain connection on the kernel socket: it stays there.
    fn inner_broke(&mut self) {
        if self.side == 0
            && matches!(self.tx, Tx::Tcp(_))
            && layout::claim(&self.map) != CLAIM_ACCEPTED
        {
            self.stay_on_kernel();
        } else {
            self.broken = true;
        }
    }

    /// The kernel socket's end was seen while no offset was published: it
    /// ends the stream (a writer that closes publishes its offset first,
    /// one that shuts down publishes NEVER, so the peer died: its writes
    /// are over too). Between hosts the peer's NEVER comes through the
    /// devds, possibly after its FIN (a connector whose devd has not
    /// matched its acceptor's Claim takes the FIN for the stream's end at
    /// once):
    /// there the peer died only if its engine's end mark came too (it
    /// comes after the words). `mark`: the region's end marks, read
    /// before the offset was looked at.
    fn kernel_end_ends(&mut self, mark: u32) {
        self.tcp_eof = true;
        let died = if layout::is_remote(&self.map) {
            mark != 0
        } else {
            !self.end_unsure(mark)
        };
        if matches!(self.rx, Rx::Tcp(None)) && died {
            self.peer_closed = true;
        }
    }

    /// Between hosts, the peer's offset comes through the devds and its
    /// FIN through the kernel, in no set order: a kernel end seen while
    /// that offset is unknown and the region has not ended says nothing
    /// yet (the peer's engine sends the words before its end mark, so one
    /// of them comes). `mark`: the region's end marks, read before the
    /// offset was looked at (the engine sets them after the words). Not
    /// while the peer cannot have moved: a connector's devd has not
    /// matched its acceptor's Claim (it does before this end's READY can
    /// reach the acceptor, whose writes wait for it; its CLAIM may come
    /// after the acceptor's FIN), or devd said the connection stays on the
    /// kernel socket.
    fn end_unsure(&self, mark: u32) -> bool {
        self.remote_offset_unknown()
            && mark == 0
            && match layout::claim(&self.map) {
                CLAIM_KERNEL => false,
                CLAIM_ACCEPTED => true,
                _ => self.side == 1 || layout::peer_matched(&self.map),
            }
    }

    /// The peer is on another host and has not said where its writes
    /// moved (this end still reads the kernel socket).
    fn remote_offset_unknown(&self) -> bool {
        !self.kernel && matches!(self.rx, Rx::Tcp(None)) && layout::is_remote(&self.map)
    }

    /// A remote peer's end came through the region without its offset:
    /// reset (its writes moved, then the link or its end broke).
    fn reset_without_offset(&self, mark: u32) -> bool {
        self.remote_offset_unknown()
            && mark & FLAG_RESET != 0
            && layout::claim(&self.map) != CLAIM_KERNEL
    }

    /// Between hosts, after the link failed (docs/protocol.md 8.5), the
    /// writer's END comes through the devds and its FIN through the
    /// kernel, in no set order: a kernel end seen by a read that moved
    /// back before END came says nothing yet, for `BACK_END_WAIT` at most
    /// (the other host's devd may be gone too: the read then finds the
    /// stream short and resets).
    fn back_end_unknown(&self) -> bool {
        !self.kernel
            && matches!(self.rx, Rx::Back { .. })
            && layout::is_remote(&self.map)
            && layout::end_at(&self.map, 1 - self.side) == End::Open
            && self
                .end_wait
                .is_none_or(|(t, _)| t.elapsed() < BACK_END_WAIT)
    }

    /// The kernel socket ended while `back_end_unknown`: the wait begins
    /// (once), its sleeps cut short so that its bound is seen.
    fn wait_for_end(&mut self) -> Option<RawFd> {
        if self.end_wait.is_none() {
            self.end_wait = Some((std::time::Instant::now(), false));
        }
        // (Not emptied while a sleeper armed on the region before it was
        // lost may still need devd's ring: `offer_watch`.)
        let cap = (!self.older_sleepers()).then_some(true);
        self.inner.words_fd(cap)
    }

    /// The wait for END is over (it came, or its bound passed): sleeps on
    /// devd's fd are no longer cut short.
    fn end_wait_over(&mut self) {
        if let Some((t, false)) = self.end_wait {
            if !self.back_end_unknown() {
                self.end_wait = Some((t, true));
                self.inner.words_fd(Some(false));
            }
        }
    }

    /// A blocking read's sleep until devd may have brought END (20 ms at
    /// most at a time, not past the call's deadline).
    fn wait_end(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        let now = std::time::Instant::now();
        if ctx.deadline.is_some_and(|d| now >= d) {
            return Err(would_block());
        }
        let Some(fd) = self.wait_for_end() else {
            return Ok(());
        };
        let cap = now + std::time::Duration::from_millis(20);
        let until = ctx.deadline.map_or(cap, |d| d.min(cap));
        let mut fds = [PollFd::new(fd, libc::POLLIN)];
        match ssock_rings::notify::sleep(&mut fds, Some(until)) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sleeps (100 ms at most at a time, and not past the call's deadline)
    /// until the region's words or end mark may have come; the kernel
    /// socket is left out (its end is what is known already).
    fn wait_region(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        let now = std::time::Instant::now();
        if ctx.deadline.is_some_and(|d| now >= d) {
            return Err(would_block());
        }
        let tcp = ctx.tcp.as_raw_fd();
        let Some(v) = self.inner.arm(&ctx.quiet(), true, false) else {
            self.inner_broke();
            return if self.kernel {
                Ok(())
            } else {
                Err(reset_error())
            };
        };
        let mut fds: Vec<PollFd> = v
            .into_iter()
            .filter(|&(fd, _)| fd != tcp)
            .map(|(fd, ev)| PollFd::new(fd, ev))
            .collect();
        let cap = now + std::time::Duration::from_millis(100);
        let until = ctx.deadline.map_or(cap, |d| d.min(cap));
        let r = ssock_rings::notify::sleep(&mut fds, Some(until));
        self.inner.disarm(true, false);
        self.inner.check_devd();
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// What a read gets at the stream's end: 0, or the error a look at
    /// the kernel socket (or a send on it) took before (once).
    fn kernel_end(&mut self) -> io::Result<usize> {
        match self.tcp_err.take() {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(0),
        }
    }

    /// A connector reading its acceptor's bytes on the kernel socket while
    /// CLAIM is still pending (on this host, where the acceptor says
    /// accepted before its program can write): the acceptor serves the
    /// connection without its end (it could not reach devd, or accepted
    /// where the shim does not see), and never will take it. Neither
    /// writer ever moved, so every byte is on the kernel socket: CLAIM
    /// says kernel (a claim answered late moves nobody), the end is let go
    /// of, and the connection is counted on kernel TCP (`unclaimed`,
    /// posted on the end's session: the read waits on nobody). Without this the
    /// connector would pay the hand-over's looks on every call until devd
    /// dropped the intent (`INTENT_TTL_S`, 2 minutes).
    fn acceptor_serves_plain(&mut self) -> bool {
        if self.side != 0
            || self.kernel
            || self.rx != Rx::Tcp(None)
            || !matches!(self.tx, Tx::Tcp(_) | Tx::Pinned | Tx::Shut)
            || layout::is_remote(&self.map)
            || layout::claim(&self.map) != layout::CLAIM_PENDING
            || !layout::refuse_claim(&self.map)
        {
            return false;
        }
        log::info!(
            "connection {}: the acceptor answered on the kernel socket without taking its end: kernel TCP",
            self.inner.conn_id().unwrap_or(0)
        );
        self.inner
            .count_kernel(ssock_rings::codec::FallbackReason::Unclaimed);
        self.stay_on_kernel();
        true
    }

    /// devd said the connection stays on the kernel socket (the acceptor
    /// was refused, or the intent expired): the end is let go of.
    fn stay_on_kernel(&mut self) {
        self.kernel = true;
        self.inner.discard_region();
        self.inner.close();
    }

    fn take(&mut self, buf: &mut [u8], ctx: &Ctx<'_>, peek: bool) -> io::Result<usize> {
        loop {
            self.step();
            self.forward(ctx);
            if self.broken_with(ctx) {
                return Err(reset_error());
            }
            if self.owed() {
                // Bytes the peer waits for before it answers.
                self.flush_aside(ctx);
            }
            if self.back_at_end() {
                // Its writer said its writes end here: the stream's end,
                // whenever the socket's FIN comes.
                self.back_eof = true;
                return self.kernel_end();
            }
            let max = match (self.kernel, self.rx) {
                (false, Rx::Ring) => {
                    let r = if peek {
                        self.inner.peek(buf, ctx)
                    } else {
                        self.inner.read(buf, ctx)
                    };
                    match r {
                        // The region stopped carrying bytes: the next look
                        // moves the reads (`fail_back`, `step`).
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            let was = self.lost;
                            if !self.lost_now() {
                                return Err(e);
                            }
                            if was && self.rx == Rx::Ring {
                                if self.reads_closed.is_none() {
                                    // Its writer closes it in a moment
                                    // (a Direct peer leaving the region).
                                    return Err(e);
                                }
                                // Closed with bytes left, and none there.
                                self.broken = true;
                                return Err(reset_error());
                            }
                        }
                        r => return r,
                    }
                    continue;
                }
                (false, Rx::Tcp(Some(u))) => {
                    usize::try_from(u.saturating_sub(self.done())).unwrap_or(usize::MAX)
                }
                (false, Rx::Tcp(None)) if layout::is_remote(&self.map) && !buf.is_empty() => {
                    // Between hosts, a writer whose link failed sends
                    // again on the socket once its reader's devd knew its
                    // SWITCH (docs/protocol.md 8.5): what is there is
                    // looked at first, then the words again, so that no
                    // byte past SWITCH is taken for one before it.
                    let flags = libc::MSG_DONTWAIT | libc::MSG_PEEK;
                    match ssock_rings::sys::recv(ctx.tcp, buf, flags) {
                        Ok(n) if n > 0 => {
                            self.step();
                            if self.rx != Rx::Tcp(None) {
                                continue;
                            }
                            n
                        }
                        // The kernel reports an error (a reset) once: to
                        // this look, so it is this read's.
                        Err(e)
                            if !matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                            ) =>
                        {
                            return Err(e)
                        }
                        _ => buf.len(),
                    }
                }
                _ => buf.len(),
            };
            if buf.is_empty() {
                return Ok(0);
            }
            let max = max.min(buf.len());
            let got = if ctx.plain && !peek {
                // The program's socket is nonblocking as far as the shim
                // knows (another process sharing its file may have changed
                // that): while the writer may still move, a read(2) must not
                // wait there for bytes the region would carry instead.
                let fd = ctx.tcp.as_raw_fd();
                if matches!(self.rx, Rx::Tcp(None))
                    && !Handover::tcp_entry(fd, libc::POLLIN, libc::POLLIN).1
                {
                    Err(would_block())
                } else {
                    ssock_rings::sys::read_plain(ctx.tcp, &mut buf[..max])
                }
            } else {
                let flags = libc::MSG_DONTWAIT | if peek { libc::MSG_PEEK } else { 0 };
                ssock_rings::sys::recv(ctx.tcp, &mut buf[..max], flags)
            };
            match got {
                Ok(0) => {
                    if self.kernel {
                        return self.kernel_end();
                    }
                    // The writer may have moved just before it closed. (The
                    // region's mark first: a remote peer's engine sets it
                    // after its words, see `end_unsure`.)
                    let mark = self.inner.region_mark();
                    self.step();
                    match self.rx {
                        Rx::Ring => continue,
                        Rx::Tcp(Some(_)) => {
                            // Fewer bytes on the socket than it announced.
                            self.broken = true;
                            return Err(reset_error());
                        }
                        Rx::Back { .. } if self.back_end_unknown() => {
                            if ctx.nonblocking {
                                self.wait_for_end();
                                return Err(would_block());
                            }
                            self.wait_end(ctx)?;
                        }
                        Rx::Back { at, after } => {
                            self.end_wait_over();
                            // The stream ends where its writer said it does
                            // (a writer that died, or a resend cut short,
                            // leaves bytes missing).
                            let end = layout::end_at(&self.map, 1 - self.side);
                            if end != End::At(at.saturating_add(after)) && end != End::AtFin {
                                log::warn!(
                                    "connection {}: the kernel socket ended at region offset {} of {end:?}; resetting it",
                                    self.inner.conn_id().unwrap_or(0),
                                    at.saturating_add(after)
                                );
                                self.broken = true;
                                return Err(reset_error());
                            }
                            self.back_eof = true;
                            return self.kernel_end();
                        }
                        _ if self.end_unsure(mark) => {
                            if ctx.nonblocking {
                                return Err(would_block());
                            }
                            self.wait_region(ctx)?;
                        }
                        _ if self.reset_without_offset(mark) => {
                            self.broken = true;
                            return Err(reset_error());
                        }
                        _ => {
                            self.kernel_end_ends(mark);
                            return self.kernel_end();
                        }
                    }
                }
                Ok(n) => {
                    if n > 0 && self.acceptor_serves_plain() {
                        // Nothing of the connection was ever in the region:
                        // these bytes are the stream's, as every later one.
                        return Ok(n);
                    }
                    if let Rx::Back { after, .. } = &mut self.rx {
                        if !peek {
                            *after += n as u64;
                        }
                    } else if !peek && !self.kernel {
                        layout::tcp_read(&self.map, self.side)
                            .fetch_add(n as u64, Ordering::AcqRel);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if ctx.nonblocking {
                        return Err(would_block());
                    }
                    self.wait(ctx, true, false)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Handover {
    /// `Transport::arm`'s work (the count of sleepers is kept around it).
    fn arm_inner(&mut self, ctx: &Ctx<'_>, read: bool, write: bool) -> Option<Vec<(RawFd, i16)>> {
        self.step();
        if self.broken {
            return None;
        }
        if self.on_rings() {
            return self.inner.arm(ctx, read, write);
        }
        let tcp = ctx.tcp.as_raw_fd();
        let mut fds: Vec<(RawFd, i16)> = Vec::new();
        if read && self.end_wait.is_some_and(|(_, over)| !over) && self.back_end_unknown() {
            // devd brings the writer's END (see `back_end_unknown`).
            if let Some(fd) = self.wait_for_end() {
                fds.push((fd, libc::POLLIN));
            }
        }
        match self.offer_watch(ctx) {
            OfferWatch::Taken => return self.arm_inner(ctx, read, write),
            OfferWatch::Fd(fd) if !fds.iter().any(|&(f, _)| f == fd) => {
                fds.push((fd, libc::POLLIN));
            }
            _ => {}
        }
        if !self.kernel && !self.lost {
            match self.inner.arm(ctx, read, write) {
                Some(v) => fds.extend(v.into_iter().filter(|&(fd, _)| fd != tcp)),
                // The region stopped carrying bytes: the kernel socket alone.
                None if self.inner.path_lost() => self.step(),
                None => {
                    self.inner_broke();
                    if !self.kernel {
                        return None;
                    }
                }
            }
        }
        // What is asserted now the caller's look after arming reports.
        let (entry, hung_up) = Handover::tcp_entry(tcp, self.tcp_events(read, write), 0);
        // But for room while bytes are owed: that look sends more of them
        // (`readiness` flushes) and may fill the room it saw, so the sleep
        // watches for room even when there is some now (a wake-up with
        // room sends more: no spin; a socket hung up or in error is
        // reported instead, and never watched).
        let room = if self.owed() && !hung_up {
            libc::POLLOUT
        } else {
            0
        };
        match entry {
            Some(e) => fds.push((e.fd, e.events | room)),
            None if room != 0 => fds.push((tcp, room)),
            None => {}
        }
        Some(fds)
    }
}

/// Whether the kernel socket's pending error is EPIPE: an RST after its
/// peer's FIN (taken: the reset is being reported). (Not its state: a
/// peer whose close resets the region may have sent a FIN on it.)
fn fin_came(tcp: std::os::fd::BorrowedFd<'_>) -> bool {
    matches!(
        ssock_rings::sys::sockopt_int(tcp, libc::SOL_SOCKET, libc::SO_ERROR),
        Ok(libc::EPIPE)
    )
}

/// A partial count wins over an error, as in the kernel.
fn partial(off: usize, e: io::Error) -> io::Result<usize> {
    if off > 0 {
        Ok(off)
    } else {
        Err(e)
    }
}

impl Transport for Handover {
    fn mode(&self) -> Mode {
        // (A connection moved back stays this transport's: its reads and
        // writes still go through the hand-over until it closes.)
        if self.turned_kernel() {
            Mode::Kernel
        } else {
            self.inner.mode()
        }
    }

    fn conn_id(&self) -> Option<u64> {
        if self.turned_kernel() {
            None
        } else {
            self.inner.conn_id()
        }
    }

    fn read(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        self.take(buf, ctx, false)
    }

    fn peek(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        self.take(buf, ctx, true)
    }

    fn write(&mut self, buf: &[u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        let mut off = 0;
        loop {
            self.step();
            self.forward(ctx);
            if self.broken_with(ctx) {
                return partial(off, reset_error());
            }
            if buf.is_empty() {
                return self.write_nothing(ctx);
            }
            if off == buf.len() {
                return Ok(off);
            }
            match (self.kernel, self.tx) {
                (false, Tx::Ring) if self.peer_closed => return partial(off, pipe_error()),
                (false, Tx::Ring) if self.rx == Rx::Ring || ctx.nonblocking => {
                    // The kernel socket is judged only once it no longer
                    // carries the peer's bytes.
                    let c = Ctx {
                        tcp: ctx.tcp,
                        nonblocking: ctx.nonblocking,
                        deadline: ctx.deadline,
                        spin: ctx.spin,
                        check_peer: ctx.check_peer && self.rx == Rx::Ring,
                        plain: ctx.plain,
                    };
                    match self.inner.write(&buf[off..], &c) {
                        Ok(n) => {
                            off += n;
                            // A part went in before the region stopped
                            // carrying bytes: the rest goes on the socket.
                            if off == buf.len() || !self.lost_now() {
                                return Ok(off);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.lost_now() => {}
                        Err(e) => return partial(off, e),
                    }
                }
                (false, Tx::Ring) => {
                    // Blocking while the kernel socket still carries the
                    // peer's bytes: the region's writes, this side's waits.
                    match self.inner.write(&buf[off..], &ctx.quiet()) {
                        Ok(n) => off += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return partial(off, e),
                    }
                    if off < buf.len() {
                        if let Err(e) = self.wait(ctx, false, true) {
                            return partial(off, e);
                        }
                    }
                }
                (false, Tx::Shut) => return partial(off, pipe_error()),
                (false, Tx::Back) if self.wr_shut => return partial(off, pipe_error()),
                (false, Tx::Back) if self.owed() => {
                    // What the region did not deliver goes first.
                    match self.flush(ctx, !ctx.nonblocking) {
                        Ok(true) => {}
                        Ok(false) => return partial(off, would_block()),
                        Err(e) => return partial(off, e),
                    }
                }
                _ => {
                    let sent = if ctx.plain {
                        ssock_rings::sys::write_plain(ctx.tcp, &buf[off..])
                    } else {
                        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
                        ssock_rings::sys::send(ctx.tcp, &buf[off..], flags)
                    };
                    match sent {
                        Ok(n) => {
                            off += n;
                            self.sock_out += n as u64;
                            match &mut self.tx {
                                Tx::Tcp(w) => *w += n as u64,
                                Tx::Back => self.tail += n as u64,
                                _ => {}
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if ctx.nonblocking {
                                return partial(off, would_block());
                            }
                            if let Err(e) = self.wait(ctx, false, true) {
                                return partial(off, e);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return partial(off, e),
                    }
                }
            }
        }
    }

    fn shutdown_write(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        self.step();
        // An offer seen now is taken first if it can be (once shut down,
        // this end would let it go).
        self.forward(ctx);
        match (self.kernel, self.tx) {
            (false, Tx::Ring) => {
                self.wr_shut = true;
                self.inner.shutdown_write(ctx)
            }
            (false, Tx::Shut) => Ok(()),
            (false, Tx::Back) => {
                // After the bytes to send again (`flush` ends the writes).
                self.wr_shut = true;
                self.flush(ctx, false).map(|_| ())
            }
            (kernel, tx) => {
                if !kernel && matches!(tx, Tx::Tcp(_)) {
                    // Its reader learns that this direction never moves:
                    // the socket's end is the stream's.
                    self.publish(Switch::Never);
                }
                let r = socket2::SockRef::from(&ctx.tcp).shutdown(std::net::Shutdown::Write);
                if !kernel {
                    self.tx = Tx::Shut;
                }
                r
            }
        }
    }

    fn close(&mut self) {
        self.close_with(None);
    }

    fn close_on(&mut self, ctx: &Ctx<'_>) {
        if !self.kernel && !self.closed {
            // devd may have gone since this end last looked: the bytes it
            // held are this close's to send again.
            self.inner.check_devd();
        }
        self.close_with(Some(ctx));
    }

    fn fork_hold(&mut self) {
        // Two processes' byte counts cannot be added up.
        self.counted = false;
        self.forking = true;
        self.step();
        self.forking = false;
        if self.lost {
            if self.owed() {
                // Two processes would send the same bytes again.
                self.broken = true;
            } else {
                // Two processes' writes cannot be counted: the socket's
                // end is the stream's.
                layout::publish_end_at_fin(&self.map, self.side);
                self.inner.words_changed();
            }
        }
        if self.side == 1 && self.tx == Tx::Tcp(0) && !self.kernel {
            // An acceptor forked right after accept (a forking server):
            // its connector is about to say READY, let its writes move
            // first rather than pin them.
            wait_ready(&self.map);
            self.step();
        }
        if let Tx::Tcp(_) = self.tx {
            // Two processes' kernel byte counts cannot be added up: this
            // direction stays on the kernel socket.
            self.pin_writes();
        }
        if !self.kernel {
            self.inner.fork_hold();
        }
    }

    fn drop_hold(&mut self) {
        if !self.kernel {
            self.inner.drop_hold();
        }
    }

    fn let_go_keeping_socket(&mut self) {
        if !self.kernel && !self.closed {
            self.closed = true;
            self.inner.let_go_keeping_socket();
        }
    }

    fn abort_on_close(&mut self) {
        if !self.kernel {
            self.inner.abort_on_close();
        }
    }

    fn discard_region(&mut self) {
        if !self.kernel {
            self.inner.discard_region();
        }
    }

    fn writes_shut(&self) -> bool {
        self.wr_shut || self.tx == Tx::Shut || (!self.kernel && self.inner.writes_shut())
    }

    fn shut_reads(&mut self) {
        layout::shut_reads(&self.map, self.side);
        if !self.kernel {
            self.inner.wake_readers();
        }
    }

    fn reads_shut(&self) -> bool {
        layout::reads_shut(&self.map, self.side)
    }

    fn reset_errno(&self, ctx: &Ctx<'_>) -> i32 {
        // EPIPE once the peer's end of stream came first, on whichever
        // path it came, read or not: on the kernel socket (its error, kept
        // from a read or pending there, taken now as this report's), or in
        // the region after the bytes this end has yet to read on the
        // socket (its writer moved, then shut down).
        let on_socket = self.tcp_eof || self.tcp_err == Some(libc::EPIPE);
        let ended = match self.rx {
            Rx::Ring => return self.inner.reset_errno(ctx),
            Rx::Tcp(_) => {
                on_socket || self.inner.reset_errno(ctx) == libc::EPIPE || fin_came(ctx.tcp)
            }
            _ => on_socket || self.back_eof || fin_came(ctx.tcp),
        };
        if ended {
            libc::EPIPE
        } else {
            libc::ECONNRESET
        }
    }

    fn rest_coming(&self) -> bool {
        !self.kernel && self.rx == Rx::Ring && self.inner.rest_coming()
    }

    fn quiet_sig(&self) -> Option<super::QuietSig> {
        // Settled: its readiness is the wrapped end's (whose region words
        // say when the region stops carrying bytes: `path_lost`).
        if self.on_rings() && !self.broken {
            self.inner.quiet_sig()
        } else {
            None
        }
    }

    fn readiness(&mut self, ctx: &Ctx<'_>, check_peer: bool) -> Ready {
        self.step();
        self.forward(ctx);
        if self.broken_with(ctx) {
            return Ready::BROKEN;
        }
        if self.on_rings() {
            let judge = check_peer || self.inner.peer_may_have_left();
            let r = self.inner.readiness(ctx, judge);
            if !self.inner.path_lost() {
                return self.staged(r);
            }
            // Found just now: the region stopped carrying bytes.
            self.step();
        }
        if self.owed() {
            // (A reset it meets is kept for the read.)
            self.flush_aside(ctx);
        }
        // Once the peer's bytes come through the region, the kernel socket
        // tells of its close, as for a settled end.
        let r = if self.kernel {
            Ready::default()
        } else {
            // (Also while a peer that was leaving the region has not
            // closed what this end reads: it may have died meanwhile.)
            let judge =
                check_peer && self.rx == Rx::Ring && (!self.lost || self.reads_closed.is_none());
            if check_peer && !judge {
                self.inner.check_devd();
            }
            self.inner.readiness(&ctx.quiet(), judge)
        };
        // The peer's own reset while this end reads the kernel socket
        // (its writer's offset unknown, or for good) is left to that
        // socket, which carries the writer's end and its reset (a region
        // mark may come ahead of them): neither a break nor an error here.
        // A region lost under this end (devd gone, a violation) still is.
        let peer_reset = self.inner.region_mark() & (FLAG_RESET | FLAG_PEER_RESET) != 0;
        let left_to_socket = r.err && peer_reset && matches!(self.rx, Rx::Tcp(None) | Rx::Forever);
        let r = if left_to_socket {
            Ready { err: false, ..r }
        } else {
            r
        };
        if r.err {
            // The region was reset (by the peer, or devd went away under a
            // Queued end): the connection is (unless it never left the
            // kernel socket).
            self.inner_broke();
            if self.broken {
                return Ready::BROKEN;
            }
            return self.readiness(ctx, check_peer);
        }
        let mut p = [PollFd::new(
            ctx.tcp.as_raw_fd(),
            libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP,
        )];
        let k = match ssock_rings::sys::poll(&mut p, Some(std::time::Duration::ZERO)) {
            Ok(_) => p[0].revents,
            Err(_) => libc::POLLERR,
        };
        let rx_ring = !self.kernel && self.rx == Rx::Ring;
        let tx_ring = !self.kernel && self.tx == Tx::Ring;
        // A remote peer's end with nothing before it, while its offset is
        // unknown: not an end yet (see `end_unsure`).
        let back_unsure = self.back_end_unknown();
        let unsure = k & libc::POLLRDHUP != 0
            && (back_unsure || self.end_unsure(self.inner.region_mark()))
            && {
                let mut b = [0u8; 1];
                let peek = libc::MSG_PEEK | libc::MSG_DONTWAIT;
                match ssock_rings::sys::recv(ctx.tcp, &mut b, peek) {
                    Ok(0) => true,
                    // A reset: the kernel reports it once, to this look; kept
                    // for the read that finds the socket's end the stream's.
                    Err(e)
                        if !matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) =>
                    {
                        self.tcp_err = e.raw_os_error();
                        true
                    }
                    _ => false,
                }
            };
        let k = if unsure {
            if back_unsure {
                self.wait_for_end();
            }
            k & !(libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP)
        } else {
            self.end_wait_over();
            k
        };
        let tcp_in = k & (libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0;
        let tcp_out = k & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0;
        // The socket's end: the stream's end only if its writer never moved.
        // A reader that moved back and has read up to its writer's END is
        // at the stream's end, whenever the socket's FIN comes.
        let at_end = self.back_at_end();
        let tcp_in = tcp_in || at_end;
        let tcp_end = at_end || (k & libc::POLLRDHUP != 0 && !matches!(self.rx, Rx::Tcp(Some(_))));
        if !rx_ring && !self.kernel && k & libc::POLLRDHUP != 0 {
            let mark = self.inner.region_mark();
            self.step();
            if matches!(self.rx, Rx::Tcp(None)) {
                self.kernel_end_ends(mark);
            }
        }
        // Progress on the kernel socket counts too (an edge-triggered
        // waiter is told of a change only): bytes written there before the
        // move or after moving back, and read after moving back.
        let written = match self.tx {
            Tx::Tcp(w) => w,
            Tx::Ring => self.tcp_written(),
            // (`resent` starts again at 0 once all was sent: then it was
            // `resend_total`, so the count never goes back.)
            Tx::Back => self.tail.wrapping_add(if self.resend.is_empty() {
                self.resend_total
            } else {
                self.resent as u64
            }),
            _ => 0,
        };
        let read_back = match self.rx {
            Rx::Back { after, .. } => after,
            _ => 0,
        };
        self.staged(Ready {
            readable: if rx_ring { r.readable } else { tcp_in },
            writable: if tx_ring {
                r.writable || self.peer_closed
            } else {
                tcp_out || (!self.kernel && self.tx == Tx::Shut)
            },
            rdhup: if rx_ring { r.rdhup } else { tcp_end },
            hup: if rx_ring {
                r.hup
            } else {
                k & libc::POLLHUP != 0
            },
            err: r.err || k & libc::POLLERR != 0,
            seq: [
                r.seq[0]
                    .wrapping_add(if self.kernel { 0 } else { self.done() })
                    .wrapping_add(read_back)
                    .wrapping_add(u64::from(tcp_in)),
                r.seq[1]
                    .wrapping_add(written)
                    .wrapping_add(u64::from(tcp_out)),
            ],
        })
    }

    fn arm(&mut self, ctx: &Ctx<'_>, read: bool, write: bool) -> Option<Vec<(RawFd, i16)>> {
        self.forget_parents_sleeps();
        let r = self.arm_inner(ctx, read, write);
        if r.is_some() {
            self.sleepers += 1;
        }
        r
    }

    fn disarm(&mut self, read: bool, write: bool) {
        if !self.kernel {
            self.inner.disarm(read, write);
        }
    }

    fn park(&mut self, sleep: crate::bells::Sleep, read: bool, write: bool) -> bool {
        self.forget_parents_sleeps();
        self.step();
        if self.broken || !self.on_rings() {
            return false;
        }
        let parked = self.inner.park(sleep, read, write);
        if parked {
            self.sleepers += 1;
        }
        parked
    }

    fn unpark(&mut self, id: u32) -> bool {
        self.forget_parents_sleeps();
        let done = !self.kernel && self.inner.unpark(id);
        if done {
            self.sleepers = self.sleepers.saturating_sub(1);
        }
        done
    }

    fn repark(&mut self, id: u32) -> bool {
        self.forget_parents_sleeps();
        !self.kernel && !self.broken && self.on_rings() && self.inner.repark(id)
    }

    fn unpark_from(&mut self, id: u32, gen: u64) {
        self.forget_parents_sleeps();
        if gen == self.generation() {
            self.unpark(id);
            return;
        }
        // Parked at an older generation: the end is the same one if it
        // moved back since (its parking is ended there as any), a new one
        // if it moved forward (the old one, parked, is closed; the new one
        // has no parking of this doorbell: this member was parked already).
        if !self.kernel {
            self.inner.unpark(id);
        }
        self.old_sleepers = self.old_sleepers.saturating_sub(1);
        if self.old_sleepers == 0 {
            self.retired.clear();
        }
    }

    fn generation(&self) -> u64 {
        self.gen
    }

    fn disarm_from(&mut self, read: bool, write: bool, gen: u64) {
        self.forget_parents_sleeps();
        if gen == self.generation() {
            self.sleepers = self.sleepers.saturating_sub(1);
            self.disarm(read, write);
            return;
        }
        // A sleeper armed before the end moved forward armed the old end
        // (or, moved back, nothing in it): nothing to undo here.
        self.old_sleepers = self.old_sleepers.saturating_sub(1);
        if self.old_sleepers == 0 {
            self.retired.clear();
        }
    }

    fn wake_self(&self) {
        if !self.kernel {
            self.inner.wake_self();
        }
    }

    fn pending(&mut self, ctx: &Ctx<'_>) -> (usize, usize) {
        self.step();
        if self.on_rings() {
            return self.inner.pending(ctx);
        }
        let (unread, unsent) = ssock_rings::sys::socket_queues(ctx.tcp);
        if self.kernel {
            return (unread, unsent);
        }
        let (ring_unread, ring_unsent) = self.inner.pending(ctx);
        (
            if self.rx == Rx::Ring {
                ring_unread
            } else {
                unread
            },
            if self.tx == Tx::Ring {
                ring_unsent
            } else {
                unsent
            },
        )
    }

    fn handover_words(&self) -> Option<(Arc<Mapping>, usize)> {
        Some((self.map.clone(), self.side))
    }

    fn moved_back(&self) -> Option<u64> {
        self.lost.then_some(self.resend_total)
    }

    fn before_plain_exec(&mut self, ctx: &Ctx<'_>) -> Leave {
        self.leave_for_plain(ctx)
    }

    fn holders(&self) -> u32 {
        self.inner.holders()
    }

    fn settled(&self) -> bool {
        self.on_rings()
    }

    fn gate(&self) -> Option<Arc<ssock_rings::notify::Gate>> {
        self.inner.gate()
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests;
