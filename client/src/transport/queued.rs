//! Queued: this process drives a TX and an RX split virtqueue in its own
//! region; devd is the device side and moves the bytes through a backend
//! to the peer. A blocked call spins on the used ring for its budget, then
//! sleeps on the call eventfd (devd only rings it when asked: used_event).
//!
//! Every process that holds the end (after fork, or a socket passed on)
//! drives the same queues: their state is in the region (`vq::driver`),
//! and so is the count of bytes posted (`qhdr::TX_BYTES`), so each goes on
//! where another stopped.
//!
//! The bytes in flight depend on devd: this end keeps a copy of what it
//! wrote until its reader took it (the TAKEN word of the hand-over page),
//! so that when devd is gone the hand-over (`handover.rs`) moves both
//! directions back to the kernel socket at the offset where the region
//! part was closed (docs/protocol.md section 2.4).
//!
//! Must never: take a region byte without counting it in TAKEN first, or
//! take one past the offset where its direction's region part is closed.

use super::{
    judge, liveness, liveness_poll, pipe_error, reset_error, would_block, Ctx, Liveness, Ready,
    Transport,
};
use crate::session::Session;
use crate::transport::direct::AttachError;
use ssock_rings::codec::{Attachment, Mode, Request, Side};
use ssock_rings::layout::{
    self, check_header, qhdr, QueuedLayout, RegionKind, Taken, FLAG_EOS, FLAG_PEER_RESET,
    FLAG_RESET, FLAG_RESET_AFTER_EOS,
};
use ssock_rings::notify::{sleep, spin_until, Gate};
use ssock_rings::shm::Mapping;
use ssock_rings::sys::{check_sealed, EventFd, PollFd};
use ssock_rings::vq::driver::{DeviceViolation, QueueDriver};
use ssock_rings::vq::{F_WRITE, RX, TX};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[path = "queued_rejoin.rs"]
mod rejoin;

/// How often a nonblocking call that found nothing to do asks whether
/// devd is still there (`Queued::look_now_and_then`).
const LOOK_EVERY: Duration = Duration::from_millis(1);

/// Capacity of the copy of written bytes kept once it is empty again.
const RETAIN_KEEP: usize = 256 * 1024;

/// The longest sleep on the call eventfd of an end several processes
/// hold: each drains the one eventfd devd rings, so one may take the
/// wake-up another waited for, which then looks again after this long.
pub const SHARED_SLEEP_CAP: Duration = Duration::from_millis(20);

/// The call eventfds of ends that were armed while several processes held
/// them ([`SHARED_SLEEP_CAP`]; the shim's multiplexed sleeps ask
/// [`sleep_is_capped`]).
static SHARED_CALLS: ssock_rings::fdflags::Flag =
    ssock_rings::fdflags::Flag::new(ssock_rings::fdflags::SHARED_CALL_BIT);

/// Whether a sleep polling `fd` must end within [`SHARED_SLEEP_CAP`].
pub fn sleep_is_capped(fd: std::os::fd::RawFd) -> bool {
    SHARED_CALLS.contains(fd)
}

/// One end of a Queued connection.
#[derive(Debug)]
pub struct Queued {
    conn_id: u64,
    side: Side,
    map: Arc<Mapping>,
    /// The hand-over page both ends map (`layout::hov`).
    hov: Arc<Mapping>,
    layout: QueuedLayout,
    tx: QueueDriver,
    rx: QueueDriver,
    /// Copies of the bytes this process wrote and not yet known taken by
    /// the reader: region offsets `retained_at .. retained_at +
    /// retained.len()`, which ends at what the end's holders posted unless
    /// another process wrote since (then they are of no use: `resync`).
    retained: VecDeque<u8>,
    retained_at: u64,
    /// The region carries no more bytes: devd is gone (its session hung
    /// up), or the peer closed a direction's region part.
    lost: bool,
    /// Once reads are closed: the region bytes still to read here.
    left: Option<u64>,
    /// Writes were closed (`close_writes`): END is the hand-over's.
    writes_closed: bool,
    /// When a nonblocking call last asked whether devd is there.
    looked: Option<std::time::Instant>,
    /// When a write after the peer's end of stream last asked its kernel
    /// socket whether the peer's process closed it; whether it had.
    closed_looked: Option<std::time::Instant>,
    closed_seen: bool,
    kick: EventFd,
    call: EventFd,
    /// Threads asleep through `arm` (see `disarm`).
    sleepers: u32,
    session: Option<Arc<Session>>,
    /// The other end is on another host (`layout::hov::REMOTE`): devd
    /// relays the hand-over words; the region is lost when devd closed
    /// both directions' region parts (the link failed, docs/protocol.md
    /// 8.5), and devd's going resets the end.
    remote: bool,
    peer_gone: bool,
    broken: bool,
    shut_wr: bool,
    /// The last close resets the stream (SO_LINGER 0).
    abort: bool,
    closed: bool,
    /// Whether spinning paid lately on this end's waits.
    gate: Arc<Gate>,
    /// A remote end whose devd died waits for one started again
    /// (`queued_rejoin.rs`).
    rejoin: Option<rejoin::Rejoin>,
    /// Once it rejoined: the connection to devd that relays its words.
    relay: Option<ssock_rings::sys::SeqPacket>,
}

impl Queued {
    /// Maps this process's region and the hand-over page, and posts every
    /// RX buffer if no process did before. fds: [region, kick eventfd,
    /// call eventfd, hand-over page].
    pub fn attach(
        a: &Attachment,
        fds: Vec<OwnedFd>,
        session: Option<Arc<Session>>,
    ) -> Result<Queued, AttachError> {
        Queued::attach_inner(a, fds, session, true)
    }

    /// Like `attach` for an end this process got without negotiating it
    /// (inherited across exec, or received over a Unix socket): the hold
    /// it takes over was counted already (by the exec'd image, or by the
    /// sender's `fork_hold`), so none is added; it goes on where the
    /// queues are.
    pub fn adopt(
        a: &Attachment,
        fds: Vec<OwnedFd>,
        session: Option<Arc<Session>>,
    ) -> Result<Queued, AttachError> {
        Queued::attach_inner(a, fds, session, false)
    }

    fn attach_inner(
        a: &Attachment,
        fds: Vec<OwnedFd>,
        session: Option<Arc<Session>>,
        hold: bool,
    ) -> Result<Queued, AttachError> {
        let [region, kick, call, hov]: [OwnedFd; 4] = fds
            .try_into()
            .map_err(|v: Vec<_>| AttachError::Fds(v.len()))?;
        check_sealed(hov.as_fd(), layout::HOV_PAGE).map_err(AttachError::Region)?;
        let hov = Arc::new(
            Mapping::map(hov.as_fd(), layout::HOV_PAGE, true).map_err(AttachError::Region)?,
        );
        check_header(&hov, RegionKind::Handover, a.conn_id, 0, 0).map_err(AttachError::Layout)?;
        let size = usize::try_from(a.region_size).unwrap_or(usize::MAX);
        let layout =
            QueuedLayout::announced(size, a.geom_a, a.geom_b).map_err(AttachError::Layout)?;
        check_sealed(region.as_fd(), size).map_err(AttachError::Region)?;
        let map = Arc::new(Mapping::map(region.as_fd(), size, true).map_err(AttachError::Region)?);
        check_header(&map, RegionKind::Queued, a.conn_id, a.geom_a, a.geom_b)
            .map_err(AttachError::Layout)?;
        if hold {
            layout::hold(&map, a.side as usize);
        }
        let remote = layout::is_remote(&hov);
        let q = layout.qsize;
        let mut me = Queued {
            conn_id: a.conn_id,
            side: a.side,
            tx: QueueDriver::new(map.clone(), layout.queues[TX], q),
            rx: QueueDriver::new(map.clone(), layout.queues[RX], q),
            map,
            hov,
            layout,
            retained: VecDeque::new(),
            retained_at: 0,
            lost: false,
            left: None,
            writes_closed: false,
            looked: None,
            closed_looked: None,
            closed_seen: false,
            kick: EventFd::from_owned(kick),
            call: EventFd::from_owned(call),
            sleepers: 0,
            session,
            remote,
            peer_gone: false,
            broken: false,
            shut_wr: false,
            abort: false,
            closed: false,
            gate: Arc::default(),
            rejoin: None,
            relay: None,
        };
        // Every free RX buffer: all of them on the end's first attach, none
        // on a later one (an inherited or passed socket) unless a holder
        // died between taking an entry and posting its buffer again.
        me.post_rx_buffers();
        me.retained_at = me.posted();
        me.kick();
        Ok(me)
    }

    fn slot_u32(&self) -> u32 {
        u32::try_from(self.layout.slot).unwrap_or(u32::MAX)
    }

    fn kick(&mut self) {
        let _ = self.kick.notify();
        self.count(qhdr::KICKS, 1);
    }

    /// Whether another holder of the end shut its writes down (or reset
    /// it): the socket's, for every process that holds it.
    fn shut_by_another(&self) -> bool {
        // Relaxed: this end's holders' own word; the mark's ordering with
        // the posts is devd's concern (it reads it with Acquire).
        self.map.u32_at(qhdr::TX_FLAGS).load(Ordering::Relaxed) & (FLAG_EOS | FLAG_RESET) != 0
    }

    /// Adds to a statistics word of the region (all holders add to it).
    fn count(&self, word: usize, n: u64) {
        // Relaxed: statistics for ringstat only.
        self.map.u64_at(word).fetch_add(n, Ordering::Relaxed);
    }

    /// Region bytes the end's holders posted on TX.
    fn posted(&self) -> u64 {
        // Relaxed: only this end's holders store it, and they take turns
        // (fork, exec, a socket passed on order them).
        self.map.u64_at(qhdr::TX_BYTES).load(Ordering::Relaxed)
    }

    /// The kept copies cover nothing once another holder posted since this
    /// process last did: they start again from what was posted.
    fn resync(&mut self) {
        let posted = self.posted();
        if self.retained_at.saturating_add(self.retained.len() as u64) != posted {
            self.retained.clear();
            self.retained_at = posted;
        }
    }

    fn kick_if_asked(&mut self, q: usize) {
        let want = if q == TX {
            self.tx.should_kick()
        } else {
            self.rx.should_kick()
        };
        if want {
            self.kick();
        } else {
            self.count(qhdr::KICKS_SUPPRESSED, 1);
        }
    }

    fn violation(&mut self, v: DeviceViolation) -> io::Error {
        log::warn!("connection {}: {v}; resetting it", self.conn_id);
        self.broken = true;
        reset_error()
    }

    fn rx_flags(&self) -> u32 {
        // Acquire: pairs with devd's Release when it sets the mark after
        // its last used entry.
        self.map.u32_at(qhdr::RX_FLAGS).load(Ordering::Acquire)
    }

    /// The region carries no more bytes (devd's session hung up, or the
    /// peer closed a direction's region part). The hand-over moves the
    /// connection back to the kernel socket, unless several processes hold
    /// this end (each has its own copy of what it wrote only): then it is
    /// reset.
    fn lose(&mut self, why: &str) {
        if self.lost || self.broken {
            return;
        }
        if self.remote && !self.failed_over() {
            // What the other host's end took is known to its devd only:
            // a devd started again asks it (`queued_rejoin.rs`).
            if self.holders() <= 1 && self.start_rejoin() {
                return;
            }
            log::warn!(
                "connection {}: {why} and the other end is on another host; resetting it",
                self.conn_id
            );
            self.broken = true;
        } else if layout::holders(&self.map, self.side as usize).load(Ordering::Relaxed) > 1 {
            log::warn!(
                "connection {}: {why} and the end is shared; resetting it",
                self.conn_id
            );
            self.broken = true;
        } else {
            log::warn!(
                "connection {}: {why}; handing it over to the kernel socket",
                self.conn_id
            );
            self.lost = true;
        }
    }

    /// The session fd a wait polls for devd's hangup (-1 once known).
    fn devd_fd(&self) -> std::os::fd::RawFd {
        if self.lost {
            -1
        } else if let Some(r) = &self.rejoin {
            // (Readable when the answer to its Rejoin comes.)
            r.fd()
        } else {
            self.session.as_ref().map_or(-1, |s| s.raw_fd())
        }
    }

    /// Whether the peer closed a direction's region part (it found devd
    /// gone first): this end then hands over too. A remote end's devd
    /// closes both once the two hosts agreed where (`failed_over`).
    fn peer_closed_region(&mut self) {
        let side = self.side as usize;
        let closed = |d| matches!(layout::taken(&self.hov, d), Taken::Closed(_));
        if self.lost {
        } else if self.remote {
            if self.failed_over() {
                self.lose("the link to the other host failed");
            }
        } else if closed(side) || closed(1 - side) {
            self.lose("the peer found devd gone");
        }
    }

    /// A remote end whose devd closed one direction's region part and not
    /// yet the other (the two hosts are agreeing where, after the link
    /// failed): its reads and writes wait until both are closed.
    fn agreeing(&self) -> bool {
        let closed = |d| matches!(layout::taken(&self.hov, d), Taken::Closed(_));
        self.remote && !self.lost && (closed(0) != closed(1))
    }

    /// A remote end whose devd closed both directions' region parts where
    /// the two hosts agreed (the link failed).
    fn failed_over(&self) -> bool {
        self.remote && (0..2).all(|d| matches!(layout::taken(&self.hov, d), Taken::Closed(_)))
    }

    /// Sleeps until devd rings, the peer's socket changes, devd's session
    /// hangs up (devd died: the region carries no more bytes, see
    /// [`Queued::devd_gone`]), or the deadline passes.
    fn sleep(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        let devd = self.devd_fd();
        let capped = self.holders() > 1 || self.rejoining();
        let deadline = if capped {
            let cap = std::time::Instant::now() + SHARED_SLEEP_CAP;
            Some(ctx.deadline.map_or(cap, |d| d.min(cap)))
        } else {
            ctx.deadline
        };
        let mut fds = [
            PollFd::new(self.call.as_raw_fd(), libc::POLLIN),
            // Events 0: only POLLHUP/POLLERR, never another thread's reply
            // (but the answer a rejoining end waits for).
            PollFd::new(devd, if self.rejoining() { libc::POLLIN } else { 0 }),
            liveness_poll(ctx.tcp.as_raw_fd()),
        ];
        // (While the hosts agree, the socket is no news: see `arm`.)
        let n = if self.peer_gone || self.agreeing() {
            2
        } else {
            3
        };
        let woke = sleep(&mut fds[..n], deadline)?;
        if fds[0].revents != 0 {
            self.call.drain();
        }
        if fds[1].revents != 0 && self.rejoining() {
            // Its answer came (or that devd went): looked at next.
            return Ok(());
        }
        if fds[1].revents != 0 {
            self.lose("devd is gone");
            return if self.broken {
                Err(reset_error())
            } else {
                Ok(())
            };
        }
        if n == 3 && judge(fds[2].revents) != Liveness::Alive {
            self.peer_gone = true;
        }
        if woke || (capped && ctx.deadline.is_none_or(|d| std::time::Instant::now() < d)) {
            // (A cut sleep looks again: another holder may have taken its
            // wake-up.)
            Ok(())
        } else {
            Err(would_block())
        }
    }

    /// Asks, with one zero-timeout poll, whether the peer is gone (its
    /// kernel socket, unless known already) and whether devd's session
    /// hung up ([`Queued::devd_gone`]).
    fn check_peer_and_devd(&mut self, ctx: &Ctx<'_>) {
        let tcp = if self.peer_gone {
            -1
        } else {
            ctx.tcp.as_raw_fd()
        };
        self.check_socket_and_devd(tcp);
    }

    /// [`Queued::check_peer_and_devd`] on kernel socket `tcp` (-1: none).
    fn check_socket_and_devd(&mut self, tcp: std::os::fd::RawFd) {
        let devd = self.devd_fd();
        // Events 0 on the session: only POLLHUP/POLLERR, never a reply.
        let mut fds = [liveness_poll(tcp), PollFd::new(devd, 0)];
        if !matches!(ssock_rings::sys::poll(&mut fds, Some(Duration::ZERO)), Ok(n) if n > 0) {
            return;
        }
        if matches!(judge(fds[0].revents), Liveness::Gone | Liveness::Reset) {
            self.peer_gone = true;
        }
        if fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            // A sleep through `arm` wakes on the session's hangup; without
            // this the waiter would arm and wake again at once, forever.
            self.lose("devd is gone");
        }
    }

    /// Posts every free RX buffer (they rotate: after a consumed entry,
    /// that entry's).
    fn post_rx_buffers(&mut self) -> bool {
        let mut any = false;
        while let Ok(Some(n)) = self.rx.next() {
            let addr = self.layout.slot_offset(RX, n.id) as u64;
            if !self.rx.post(n, addr, self.slot_u32(), F_WRITE) {
                break; // another holder posted it
            }
            any = true;
        }
        any
    }

    /// Posts the RX buffer a consumed entry freed.
    fn repost(&mut self) {
        if self.post_rx_buffers() {
            self.kick_if_asked(RX);
        }
    }

    fn take(&mut self, buf: &mut [u8], ctx: &Ctx<'_>, consume: bool) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if !self.retained.is_empty() && !self.lost {
            // A writer that now only reads lets go of what was taken.
            self.trim();
        }
        let slot = self.slot_u32();
        loop {
            self.rejoin_step(ctx.tcp);
            if self.broken {
                return Err(reset_error());
            }
            self.peer_closed_region();
            if self.agreeing() {
                self.wait_agreed(ctx)?;
                continue;
            }
            if self.left == Some(0) || (self.lost && self.left.is_none()) {
                // The region part is over (or about to be closed): the
                // hand-over reads the socket.
                return Err(would_block());
            }
            let Some(u) = self.rx.peek_used(slot).map_err(|v| self.violation(v))? else {
                if self.lost {
                    return Err(would_block());
                }
                let f = self.rx_flags();
                if f & FLAG_RESET != 0 {
                    if self.rx.has_used() {
                        // Posted before the mark (which came after this
                        // look found none): the bytes first.
                        continue;
                    }
                    self.broken = true;
                    return Err(reset_error());
                }
                if f & FLAG_EOS != 0 && !self.rx.has_used() {
                    return Ok(0);
                }
                if f & FLAG_EOS == 0 {
                    self.peer_closed_region();
                    if !self.lost {
                        self.wait_rx(ctx)?;
                    }
                }
                continue;
            };
            let rest = (u.len - u.off) as usize;
            if rest == 0 {
                // An empty entry: its buffer goes back at once.
                self.rx.consume(u, 0);
                self.repost();
                continue;
            }
            let mut n = buf.len().min(rest);
            if let Some(l) = self.left {
                n = n.min(usize::try_from(l).unwrap_or(usize::MAX));
            }
            if consume {
                // Counted before it is taken: a writer that closes the
                // region part meanwhile resends from what TAKEN says.
                match self.left {
                    Some(l) => self.left = Some(l - n as u64),
                    None => {
                        if layout::add_taken(&self.hov, 1 - self.side as usize, n as u64).is_err() {
                            if self.remote {
                                // devd closed it (the link failed): what it
                                // gave is read once both directions are.
                                continue;
                            }
                            self.lose("the peer found devd gone");
                            if self.broken {
                                return Err(reset_error());
                            }
                            self.left = Some(0);
                            return Err(would_block());
                        }
                    }
                }
            }
            self.map.read_bytes(
                self.layout.slot_offset(RX, u.id) + u.off as usize,
                &mut buf[..n],
            );
            if consume {
                self.count(qhdr::RX_BYTES, n as u64);
                if self.rx.consume(u, u32::try_from(n).unwrap_or(u32::MAX)) {
                    self.repost();
                }
            }
            return Ok(n);
        }
    }

    /// Region bytes delivered here and not read yet (the used RX entries
    /// past the holders' read position).
    fn delivered(&mut self) -> io::Result<u64> {
        let slot = self.slot_u32();
        self.rx.unconsumed(slot).map_err(|v| self.violation(v))
    }

    /// Drops the copies of written bytes the reader has taken; false if the
    /// region part of this end's direction was closed (the bytes go to the
    /// kernel socket from there).
    fn trim(&mut self) -> bool {
        match layout::taken(&self.hov, self.side as usize) {
            Taken::Open(t) => {
                let base = self.retained_at;
                if t > base {
                    let k =
                        usize::try_from((t - base).min(self.retained.len() as u64)).unwrap_or(0);
                    self.retained.drain(..k);
                    self.retained_at = self.retained_at.saturating_add(k as u64);
                    if self.retained.is_empty() && self.retained.capacity() > RETAIN_KEEP {
                        // A burst's worth is not kept for the connection's life.
                        self.retained.shrink_to(RETAIN_KEEP);
                    }
                }
                true
            }
            Taken::Closed(_) => {
                if !self.remote {
                    self.lose("the peer found devd gone");
                }
                false
            }
        }
    }

    /// A remote end's bytes from region offset `at` (where the two hosts
    /// agreed its reader was given them) to what it posted, read back from
    /// its TX buffers that devd has not given back: devd gives one back
    /// only once the other host's engine gave its bytes to the reader, and
    /// `at` is all that reader was given, so they hold every byte from
    /// `at` on (docs/protocol.md 8.5).
    fn unreturned_from(&mut self, at: u64) -> io::Result<Vec<u8>> {
        let posted = self.posted();
        let bufs: Vec<(u64, u32)> = self.tx.unreturned().collect();
        let held: u64 = bufs.iter().map(|&(_, n)| u64::from(n)).sum();
        let base = posted.saturating_sub(held);
        let slot = self.layout.slot as u64;
        let first = self.tx.used_idx();
        let sane = bufs.iter().enumerate().all(|(k, &(addr, n))| {
            // The k-th buffer not given back is the one at avail index
            // `first + k`: its slot (`Next::id`).
            let k = u16::try_from(k).unwrap_or(u16::MAX);
            let id = first.wrapping_add(k) % self.layout.qsize;
            addr == self.layout.slot_offset(TX, id) as u64 && u64::from(n) <= slot
        });
        if !sane || held > posted || at < base || at > posted {
            log::warn!(
                "connection {}: its reader was given {at} bytes, this end holds {base}..{posted}; resetting it",
                self.conn_id,
            );
            self.broken = true;
            return Err(reset_error());
        }
        let mut rest = Vec::with_capacity(usize::try_from(posted - at).unwrap_or(0));
        let mut skip = at - base;
        for (addr, n) in bufs {
            let n = u64::from(n);
            if skip >= n {
                skip -= n;
                continue;
            }
            let from = usize::try_from(addr + skip).unwrap_or(usize::MAX);
            let len = usize::try_from(n - skip).unwrap_or(0);
            let mut b = vec![0u8; len];
            self.map.read_bytes(from, &mut b);
            rest.extend_from_slice(&b);
            skip = 0;
        }
        self.retained.clear();
        Ok(rest)
    }

    /// Publishes where this end's writes into the region end (END), unless
    /// they went back to the kernel socket (the hand-over publishes it then).
    fn end_writes(&mut self) {
        if !self.writes_closed {
            layout::publish_end(&self.hov, self.side as usize, self.posted());
            self.words_changed();
        }
    }

    /// A nonblocking call found nothing to do: whether devd is still
    /// there is asked at most once per millisecond (a program that only
    /// polls by calling must notice too, at the cost of one system call).
    /// A write after the peer's end of stream came in the region: has its
    /// process closed the socket (a shutdown(SHUT_WR) ends only the region
    /// part; a close ends the kernel socket too)? Then the kernel's answer
    /// to this write would be a reset: it goes (devd discards it, as the
    /// kernel's peer does), and the next ones take EPIPE. Asked of the
    /// kernel socket at most once a millisecond, and only after that end
    /// of stream: never on a path that moves bytes both ways.
    fn peer_closed_its_socket(&mut self, ctx: &Ctx<'_>) {
        if self.closed_seen {
            self.peer_gone = true;
            return;
        }
        if self.rx_flags() & FLAG_EOS == 0 {
            return;
        }
        let now = std::time::Instant::now();
        if self
            .closed_looked
            .is_none_or(|t| now.duration_since(t) >= LOOK_EVERY)
        {
            self.closed_looked = Some(now);
            self.closed_seen = matches!(liveness(ctx.tcp), Liveness::Gone | Liveness::Reset);
        }
    }

    fn look_now_and_then(&mut self) {
        let now = std::time::Instant::now();
        if self
            .looked
            .is_none_or(|t| now.duration_since(t) >= LOOK_EVERY)
        {
            self.looked = Some(now);
            self.check_socket_and_devd(-1);
        }
    }

    /// Waits (on the call eventfd: devd rings it when it closes the other
    /// direction) while the two hosts agree where the region parts close.
    fn wait_agreed(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        if ctx.nonblocking {
            return Err(would_block());
        }
        let hov = &self.hov;
        let agreed = || {
            let closed = |d| matches!(layout::taken(hov, d), Taken::Closed(_));
            (closed(0) == closed(1)).then_some(())
        };
        if spin_until(ctx.spin, &self.gate, agreed).is_some() {
            return Ok(());
        }
        self.sleep(ctx)
    }

    fn wait_rx(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        if ctx.nonblocking {
            self.look_now_and_then();
            return Err(would_block());
        }
        let map = &self.map;
        let rx = &self.rx;
        let ready = || {
            // (The peer's reset before the bytes it sent is no news for
            // a reader: those bytes are.)
            let marks =
                map.u32_at(qhdr::RX_FLAGS).load(Ordering::Acquire) & (FLAG_EOS | FLAG_RESET);
            (rx.has_used() || marks != 0).then_some(())
        };
        if spin_until(ctx.spin, &self.gate, ready).is_some() {
            return Ok(());
        }
        if !self.rx.arm() || self.rx_flags() & (FLAG_EOS | FLAG_RESET) != 0 {
            return Ok(());
        }
        self.sleep(ctx)
    }

    fn wait_tx(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        let tx = &self.tx;
        if spin_until(ctx.spin, &self.gate, || tx.has_used().then_some(())).is_some() {
            return Ok(());
        }
        if !self.tx.arm() || self.peer_reset() {
            return Ok(());
        }
        self.sleep(ctx)
    }

    /// The peer reset the connection (the bytes it sent before may still
    /// be on their way to this end's reads).
    fn peer_reset(&self) -> bool {
        self.rx_flags() & (FLAG_RESET | FLAG_PEER_RESET) != 0
    }
}

impl Transport for Queued {
    fn gate(&self) -> Option<Arc<Gate>> {
        Some(self.gate.clone())
    }

    fn mode(&self) -> Mode {
        Mode::Queued
    }

    fn conn_id(&self) -> Option<u64> {
        Some(self.conn_id)
    }

    fn check_devd(&mut self) {
        self.check_socket_and_devd(-1);
    }

    fn handover_words(&self) -> Option<(Arc<Mapping>, usize)> {
        Some((self.hov.clone(), self.side as usize))
    }

    fn session(&self) -> Option<Arc<Session>> {
        self.session.clone()
    }

    fn count_kernel(&self, reason: ssock_rings::codec::FallbackReason) {
        if let Some(s) = &self.session {
            let _ = s.post(&Request::Skipped { reason, count: 1 });
        }
    }

    fn path_lost(&mut self) -> bool {
        self.peer_closed_region();
        self.lost
    }

    fn close_reads(&mut self) -> io::Result<u64> {
        let more = self.delivered()?;
        if self.rx_flags() & FLAG_RESET != 0 {
            self.broken = true;
            return Err(reset_error());
        }
        self.lost = true;
        let at = match layout::close_taken(&self.hov, 1 - self.side as usize, more) {
            Ok(at) => {
                self.left = Some(more);
                at
            }
            // The peer closed it first, at what this end had taken; or,
            // between hosts, devd at what it gave this end.
            Err(at) => {
                self.left = Some(if self.remote { more } else { 0 });
                at
            }
        };
        Ok(at)
    }

    fn close_writes(&mut self) -> io::Result<(u64, Vec<u8>)> {
        self.lost = true;
        self.writes_closed = true;
        let at = match layout::close_taken(&self.hov, self.side as usize, 0) {
            Ok(at) | Err(at) => at,
        };
        if self.remote {
            return self.unreturned_from(at).map(|rest| (at, rest));
        }
        self.resync();
        let (base, posted) = (self.retained_at, self.posted());
        if at < base || at > posted {
            log::warn!(
                "connection {}: its reader says it took {at} bytes, this end kept {base}..{posted}; resetting it",
                self.conn_id,
            );
            self.broken = true;
            return Err(reset_error());
        }
        let skip = usize::try_from(at - base).unwrap_or(0);
        let rest = std::mem::take(&mut self.retained)
            .into_iter()
            .skip(skip)
            .collect();
        Ok((at, rest))
    }

    fn region_written(&self) -> u64 {
        self.posted()
    }

    fn reads_left(&self) -> Option<u64> {
        self.left
    }

    fn holders(&self) -> u32 {
        layout::holders(&self.map, self.side as usize).load(Ordering::Relaxed)
    }

    fn readiness(&mut self, ctx: &Ctx<'_>, check_peer: bool) -> Ready {
        self.rejoin_step(ctx.tcp);
        self.peer_closed_region();
        if check_peer && !self.agreeing() {
            self.check_peer_and_devd(ctx);
        } else if check_peer {
            // The kernel socket may already carry the other end's bytes
            // or end (it moved first): not judged here.
            self.check_socket_and_devd(-1);
        }
        let f = self.rx_flags();
        // While the bytes sent before the peer's reset are still coming,
        // the reset shows (as the kernel's POLLERR and POLLHUP beside its
        // receive queue) only while some of them are here to read: a
        // wait for them sleeps until devd posts more (as for bytes still
        // on their way), never spins on an error it cannot act on yet.
        let rest = self.rest_coming();
        if self.broken || (self.peer_reset() && !rest) {
            return Ready::BROKEN;
        }
        if rest && !self.agreeing() {
            let data = self.rx.has_used();
            return Ready {
                readable: data,
                writable: true,
                rdhup: data,
                hup: data,
                err: data,
                seq: [
                    u64::from(self.rx.used_idx()),
                    u64::from(self.tx.used_idx()) + 1,
                ],
            };
        }
        self.peer_closed_region();
        if self.agreeing() {
            // Nothing to do until the hosts agree (devd rings then).
            return Ready {
                seq: [u64::from(self.rx.used_idx()), u64::from(self.tx.used_idx())],
                ..Ready::default()
            };
        }
        let agreeing = self.agreeing();
        let data = match self.left {
            Some(l) => l > 0,
            None => !self.lost && !agreeing && self.rx.has_used(),
        };
        let eos = f & FLAG_EOS != 0;
        Ready {
            readable: data || eos,
            writable: self.shut_wr
                || self.shut_by_another()
                || self.peer_gone
                || (!agreeing && (self.tx.in_flight() < self.layout.qsize || self.tx.has_used())),
            // The end of the stream as tcp_poll tells it: with EPOLLIN
            // (readable), once the engine's end mark is there. A peer seen
            // gone on the kernel socket before it is not an end yet: a
            // read would wait for the mark (the kernel's FIN and the
            // engine's mark race).
            rdhup: eos,
            hup: eos && (self.shut_wr || self.shut_by_another()),
            err: false,
            seq: [
                u64::from(self.rx.used_idx()) + u64::from(eos) + u64::from(self.peer_gone),
                u64::from(self.tx.used_idx())
                    + u64::from(self.peer_gone)
                    + u64::from(self.shut_by_another()),
            ],
        }
    }

    fn arm(
        &mut self,
        ctx: &Ctx<'_>,
        read: bool,
        write: bool,
    ) -> Option<Vec<(std::os::fd::RawFd, i16)>> {
        if self.broken || self.lost {
            return None;
        }
        // used_event set in both queues past what the device returned so
        // far, unconsumed or not (an edge-triggered waiter sleeps on
        // entries it was told about, and is woken by the next); what is
        // there already is the caller's to re-check.
        if read {
            self.rx.arm_always();
        }
        if write {
            self.tx.arm_always();
        }
        if read || write {
            self.sleepers += 1;
        }
        if self.holders() > 1 {
            SHARED_CALLS.insert(self.call.as_raw_fd());
        }
        let devd_events = if self.rejoining() { libc::POLLIN } else { 0 };
        let mut fds = vec![
            (self.call.as_raw_fd(), libc::POLLIN),
            (self.devd_fd(), devd_events),
        ];
        // While the hosts agree, the other end may already be back on the
        // kernel socket and write or shut it down: that is no news here
        // (devd rings the call eventfd when the agreement completes).
        if !self.peer_gone && !self.agreeing() {
            fds.push((ctx.tcp.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP));
        }
        Some(fds)
    }

    fn disarm(&mut self, read: bool, write: bool) {
        // One interrupt fd serves both directions: it is drained when the
        // last sleeper leaves, so no sleeper's wake-up is taken away. Once
        // the region is lost (or the end broke) `arm` counts no sleeper:
        // a wait that armed nothing must not take another thread's count
        // and drain the wake-up that thread still sleeps for.
        if self.lost || self.broken {
            return;
        }
        if read || write {
            self.sleepers = self.sleepers.saturating_sub(1);
            if self.sleepers == 0 {
                self.call.drain();
            }
        }
    }

    fn wake_self(&self) {
        let _ = self.call.notify();
    }

    fn wake_readers(&mut self) {
        // (Every holder's sleep polls the same call eventfd.)
        let _ = self.call.notify();
    }

    fn reset_errno(&self, _ctx: &Ctx<'_>) -> i32 {
        // The end of stream came first (FLAG_EOS stays; devd tells a later
        // reset with FLAG_PEER_RESET, and one that came behind an end still
        // waiting behind bytes with FLAG_RESET_AFTER_EOS too): the kernel's
        // EPIPE, for an RST in CLOSE_WAIT.
        if self.rx_flags() & (FLAG_EOS | FLAG_RESET_AFTER_EOS) != 0 {
            libc::EPIPE
        } else {
            libc::ECONNRESET
        }
    }

    fn region_mark(&self) -> u32 {
        self.rx_flags()
    }

    fn rest_coming(&self) -> bool {
        // (devd posts them, then its last mark.)
        let f = self.rx_flags();
        f & FLAG_PEER_RESET != 0
            && f & (FLAG_EOS | FLAG_RESET) == 0
            && !self.broken
            && !self.lost
            && self.left.is_none()
    }

    fn words_fd(&mut self, cap: Option<bool>) -> Option<std::os::fd::RawFd> {
        if !self.remote {
            return None;
        }
        // A rejoined end's words come on its relay session.
        let fd = self.relay_news().unwrap_or(self.call.as_raw_fd());
        match cap {
            Some(true) => {
                if fd == self.call.as_raw_fd() {
                    self.call.drain();
                }
                SHARED_CALLS.insert(fd);
            }
            Some(false) if self.holders() <= 1 || fd != self.call.as_raw_fd() => {
                SHARED_CALLS.remove(fd)
            }
            _ => {}
        }
        Some(fd)
    }

    fn retire_call(&mut self) -> Option<EventFd> {
        let dup = EventFd::from_owned(self.call.try_clone_fd().ok()?);
        let old = std::mem::replace(&mut self.call, dup);
        SHARED_CALLS.remove(old.as_raw_fd());
        Some(old)
    }

    fn offer_fd(&mut self, drain: bool) -> Option<std::os::fd::RawFd> {
        if !self.remote {
            return None;
        }
        if drain {
            self.call.drain();
        }
        Some(self.call.as_raw_fd())
    }

    fn words_changed(&mut self) {
        // devd relays them to the other host when its engine runs (or,
        // for an end that rejoined a devd started again, its session).
        if self.remote {
            self.kick();
            self.relay_words();
        }
    }

    fn pending(&mut self, _ctx: &Ctx<'_>) -> (usize, usize) {
        // The RX entries the engine filled past the holders' read
        // position; bytes still in devd's engine are not visible from here.
        let mut unread = self.delivered().unwrap_or(0);
        if let Some(l) = self.left {
            unread = unread.min(l);
        }
        let unread = usize::try_from(unread).unwrap_or(usize::MAX);
        // (Counted, not consumed: another holder may be writing.)
        let unsent = usize::try_from(self.tx.unreturned_len()).unwrap_or(usize::MAX);
        (unread, unsent)
    }

    fn fork_hold(&mut self) {
        if !self.closed {
            layout::hold(&self.map, self.side as usize);
            // Shared from now on: a thread already asleep on the call
            // eventfd wakes and sleeps again with the cut.
            SHARED_CALLS.insert(self.call.as_raw_fd());
            let _ = self.call.notify();
        }
    }

    fn abort_on_close(&mut self) {
        self.abort = true;
    }

    fn drop_hold(&mut self) {
        if !self.closed {
            layout::unhold(&self.map, self.side as usize);
        }
    }

    fn read(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        let mut got = self.take(buf, ctx, true)?;
        // As the kernel's: a read takes all that is there, up to its
        // length, not one RX buffer's worth (two sends read as one recv
        // on kernel TCP once both arrived). Only entries there now; an
        // end or an error found on the way is the next call's.
        let slot = self.slot_u32();
        while got > 0 && got < buf.len() && !self.lost && self.left != Some(0) {
            match self.rx.peek_used(slot) {
                Ok(Some(_)) => {}
                _ => break,
            }
            match self.take(&mut buf[got..], &ctx.quiet(), true) {
                Ok(n) if n > 0 => got += n,
                _ => break,
            }
        }
        Ok(got)
    }

    fn peek(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        self.take(buf, ctx, false)
    }

    fn write(&mut self, buf: &[u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        let mut off = 0;
        let slot = self.slot_u32();
        loop {
            self.rejoin_step(ctx.tcp);
            // (The peer's reset leaves what it delivered before it to be
            // read, as the kernel's receive queue after an RST.)
            if self.broken || self.peer_reset() {
                return if off > 0 { Ok(off) } else { Err(reset_error()) };
            }
            if !self.peer_gone {
                self.peer_closed_its_socket(ctx);
            }
            if self.shut_wr || self.peer_gone || self.shut_by_another() {
                return if off > 0 { Ok(off) } else { Err(pipe_error()) };
            }
            self.peer_closed_region();
            if self.agreeing() {
                if off > 0 {
                    return Ok(off);
                }
                self.wait_agreed(ctx)?;
                continue;
            }
            if self.lost || !self.trim() {
                // The hand-over takes the writes to the kernel socket.
                return if off > 0 { Ok(off) } else { Err(would_block()) };
            }
            while self
                .tx
                .pop_used(slot)
                .map_err(|v| self.violation(v))?
                .is_some()
            {}
            self.resync();
            let mut posted = false;
            while off < buf.len() {
                let Some(next) = self.tx.next().map_err(|v| self.violation(v))? else {
                    break;
                };
                let id = next.id;
                let n = (buf.len() - off).min(self.layout.slot);
                self.map
                    .write_bytes(self.layout.slot_offset(TX, id), &buf[off..off + n]);
                if !self.tx.post(
                    next,
                    self.layout.slot_offset(TX, id) as u64,
                    u32::try_from(n).unwrap_or(slot),
                    0,
                ) {
                    // Another holder posted there meanwhile (holders at the
                    // same instant are not serialized): look again.
                    continue;
                }
                // Relaxed: as in `posted`.
                self.map
                    .u64_at(qhdr::TX_BYTES)
                    .fetch_add(n as u64, Ordering::Relaxed);
                if !self.remote {
                    // (A remote end's engine gives its TX buffers back
                    // only once the other host gave their bytes to its
                    // reader: they are its copies, `unreturned_from`.)
                    self.retained.extend(&buf[off..off + n]);
                }
                off += n;
                posted = true;
            }
            if posted {
                if !self.remote {
                    layout::publish_posted(&self.hov, self.side as usize, self.posted());
                }
                self.kick_if_asked(TX);
            }
            if off == buf.len() {
                return Ok(off);
            }
            if ctx.nonblocking {
                if ctx.check_peer && matches!(liveness(ctx.tcp), Liveness::Gone | Liveness::Reset) {
                    self.peer_gone = true;
                }
                self.look_now_and_then();
                return if off > 0 { Ok(off) } else { Err(would_block()) };
            }
            match self.wait_tx(ctx) {
                Ok(()) => {}
                // A call that moved bytes reports them (EINTR, timeout).
                Err(_) if off > 0 => return Ok(off),
                Err(e) => return Err(e),
            }
        }
    }

    fn shutdown_write(&mut self, _ctx: &Ctx<'_>) -> io::Result<()> {
        if !self.shut_wr {
            self.shut_wr = true;
            self.end_writes();
            // Release: every post before is visible with the mark.
            self.map
                .u32_at(qhdr::TX_FLAGS)
                .fetch_or(FLAG_EOS, Ordering::Release);
            self.kick();
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
        // Received bytes left unread make the kernel's close a reset too.
        let unread = !self.lost && !self.broken && self.delivered().is_ok_and(|n| n > 0);
        // (An end that waits for a devd started again cannot hand what it
        // owes over any more: a reset, not an end of stream.)
        if self.abort || self.broken || unread || self.rejoining() || reset() {
            // Like the kernel's close after SO_LINGER 0, or with bytes
            // unread: a reset, not an end of stream; and a broken end's
            // peer is reset too (devd must not take its going for an
            // orderly one).
            self.shut_wr = true;
            self.map
                .u32_at(qhdr::TX_FLAGS)
                .fetch_or(FLAG_RESET, Ordering::Release);
            self.kick();
        } else if !self.shut_wr && !self.broken {
            self.shut_wr = true;
            self.end_writes();
            self.map
                .u32_at(qhdr::TX_FLAGS)
                .fetch_or(FLAG_EOS, Ordering::Release);
            self.kick();
        }
        if let Some(s) = &self.session {
            let _ = s.post(&Request::Release {
                conn_id: self.conn_id,
                side: self.side,
                park: false,
            });
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.close();
        SHARED_CALLS.remove(self.call.as_raw_fd());
        if let Some(r) = &self.relay {
            SHARED_CALLS.remove(std::os::fd::AsRawFd::as_raw_fd(r));
        }
    }
}
