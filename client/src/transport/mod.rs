//! Transports: how a connected stream's bytes move. A [`crate::Stream`]
//! talks to exactly one, chosen at negotiation: [`direct::Direct`] (shared
//! stream rings with the peer process), [`queued::Queued`] (virtqueues
//! served by devd) or [`kernel::Kernel`] (plain TCP).

pub mod direct;
pub mod handover;
pub mod kernel;
pub mod queued;

use ssock_rings::codec::Mode;
use ssock_rings::shm::Mapping;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a call may wait, and the kernel socket underneath (the liveness
/// channel: the peer's last close or death shows up there as EOF).
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The connection's kernel TCP socket (the application's own fd under
    /// the preload shim; a `TcpStream`'s for the Rust API).
    pub tcp: BorrowedFd<'a>,
    /// Return EWOULDBLOCK instead of waiting.
    pub nonblocking: bool,
    /// Give up (EWOULDBLOCK, like SO_RCVTIMEO) at this instant.
    pub deadline: Option<Instant>,
    /// Spin budget before sleeping.
    pub spin: Duration,
    /// Whether a nonblocking call that finds nothing asks the kernel socket
    /// (one syscall) whether the peer is gone. Off for callers that wait
    /// through `readiness(.., true)` next anyway (the preload shim).
    pub check_peer: bool,
    /// The kernel socket's file is O_NONBLOCK as far as the caller knows
    /// (the shim's record of the program's own setting) and the call is
    /// the program's own read(2) or write(2) family, without flags: bytes
    /// that go on the kernel socket go with read(2) and write(2), the calls
    /// a sandbox that lets the program read and write allows (sshd's
    /// network child dies of a send(2), which is sendto).
    pub plain: bool,
}

impl<'a> Ctx<'a> {
    /// The same call context, without waiting or asking the kernel socket.
    pub fn quiet(&self) -> Ctx<'a> {
        Ctx {
            tcp: self.tcp,
            nonblocking: true,
            deadline: None,
            spin: self.spin,
            check_peer: false,
            plain: self.plain,
        }
    }
}

/// What [`Transport::before_plain_exec`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// The end left the region now (or the connection was reset): the
    /// kernel socket carries the connection from here.
    Left,
    /// It never carried anything in the region: on its kernel socket
    /// already.
    Kernel,
    /// It stays in the region (a Queued end: a limit).
    Stays,
}

/// Readiness of a connection in poll(2) terms.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// A read would not block (data, end of stream, or an error to report).
    pub readable: bool,
    /// A write would not block (room, or an error to report).
    pub writable: bool,
    /// The peer shut down its writing side (POLLRDHUP).
    pub rdhup: bool,
    /// The connection is over in both directions (POLLHUP).
    pub hup: bool,
    /// The connection was reset (POLLERR).
    pub err: bool,
    /// Progress counters (received, sent): they change whenever data or a
    /// mark arrives, and whenever the peer takes what we sent. Edge-
    /// triggered epoll reports a direction again only after its counter
    /// moved, like the kernel's wake-up on each arrival.
    pub seq: [u64; 2],
}

impl Ready {
    /// A reset or broken connection: every call returns at once (with the error).
    pub const BROKEN: Ready = Ready {
        readable: true,
        writable: true,
        rdhup: true,
        hup: true,
        err: true,
        seq: [0; 2],
    };

    /// poll(2) revents for a request of `events`.
    pub fn revents(self, events: i16) -> i16 {
        let mut r = 0;
        if self.readable {
            r |= events & (libc::POLLIN | libc::POLLRDNORM);
        }
        if self.writable {
            r |= events & (libc::POLLOUT | libc::POLLWRNORM);
        }
        if self.rdhup {
            r |= events & libc::POLLRDHUP;
        }
        if self.hup {
            r |= libc::POLLHUP;
        }
        if self.err {
            r |= libc::POLLERR;
        }
        r
    }

    /// Whether anything is reported for `events`.
    pub fn any(self, events: i16) -> bool {
        self.revents(events) != 0
    }
}

/// One way of moving a stream's bytes.
pub trait Transport: Send + std::fmt::Debug {
    /// Which mode this is.
    fn mode(&self) -> Mode;
    /// devd's connection id (None for kernel TCP).
    fn conn_id(&self) -> Option<u64>;
    /// Reads at least one byte, or 0 at end of stream.
    fn read(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize>;
    /// Like `read` without consuming.
    fn peek(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize>;
    /// Writes all of `buf` when blocking; at least one byte (or
    /// EWOULDBLOCK) when nonblocking or past the deadline.
    fn write(&mut self, buf: &[u8], ctx: &Ctx<'_>) -> io::Result<usize>;
    /// No more writes: the peer reads what was sent, then end of stream.
    fn shutdown_write(&mut self, ctx: &Ctx<'_>) -> io::Result<()>;
    /// Closes this process's hold on this end. The last holder's close ends
    /// the stream (orderly unless the connection is broken); an earlier one
    /// only lets go.
    fn close(&mut self);
    /// [`Transport::close`], which, if it is the last holder's, resets
    /// the connection instead of ending it when `reset` says so then
    /// (asked only once every other holder let go: until then another
    /// holder may still read what `reset` looks at).
    fn close_or_reset(&mut self, reset: &dyn Fn() -> bool) {
        let _ = reset;
        self.close();
    }
    /// [`Transport::close`] while the kernel socket is still open (the
    /// last fd of it in this process is about to close): a hand-over end
    /// that moved back sends what it still owes there first.
    fn close_on(&mut self, _ctx: &Ctx<'_>) {
        self.close();
    }
    /// Another process will hold this end too: this one is about to fork
    /// (called in the parent, before fork), or is passing the socket over
    /// a Unix socket (the receiver adopts the hold).
    fn fork_hold(&mut self) {}
    /// Takes back a `fork_hold` whose fork or passing failed.
    fn drop_hold(&mut self) {}
    /// The end left the region (`before_plain_exec`) and this process goes
    /// on with the kernel socket alone: devd lets the end go (Release: an
    /// Attach of the socket finds none from now on, so whoever gets it
    /// next takes it for a plain socket), while the end's count of holders
    /// keeps this process (it still holds the socket: another holder's
    /// close must not take itself for the last one, whose close says
    /// where the stream ends). The transport does nothing more after.
    fn let_go_keeping_socket(&mut self) {}
    /// The last holder's close will reset the connection instead of ending
    /// the stream (SO_LINGER with a zero timeout).
    fn abort_on_close(&mut self) {}
    /// Its region is not to be kept for a next connection on close (the
    /// connection was never used: devd freed it).
    fn discard_region(&mut self) {}
    /// The shared words this end's readiness without a look at its
    /// kernel socket depends on, read now: while they read the same, that
    /// readiness is the same, so a look that found nothing to report need
    /// not be made again (an epoll set's looks at its members). None when
    /// the end's own state may change it too (broken, its peer gone, on
    /// its kernel socket, Queued): then every look asks.
    fn quiet_sig(&self) -> Option<QuietSig> {
        None
    }
    /// Whether this end's writes are shut down (by any of its holders,
    /// where the end can tell).
    fn writes_shut(&self) -> bool {
        false
    }
    /// Whether a look at readiness should ask the kernel socket even
    /// though its caller does not: the peer's writes ended while bytes of
    /// this end wait unread for it in the region, so its readiness is
    /// there at once (the end), and only the kernel socket tells that the
    /// peer then exited without a close, which the kernel makes a reset
    /// (a close with bytes unread). Asked only of an end whose two
    /// directions are in the region (the hand-over's own bytes are not on
    /// the socket then); Direct ends answer, from their shared words.
    fn peer_may_have_left(&mut self) -> bool {
        false
    }
    /// Readiness now, from the rings alone (no syscall): what poll and
    /// friends report. `check_peer` also asks the kernel socket, without
    /// blocking, whether the peer is gone (one syscall).
    fn readiness(&mut self, ctx: &Ctx<'_>, check_peer: bool) -> Ready {
        let _ = (ctx, check_peer);
        Ready {
            readable: true,
            writable: true,
            ..Ready::default()
        }
    }
    /// Prepares to sleep until the wanted readiness may change: arms the
    /// rings' wait words, whatever they hold now (an edge-triggered waiter
    /// sleeps on data it has been told about), and returns the fds (and
    /// poll events) whose readiness wakes this side. The caller re-checks
    /// what it waits for after arming, before sleeping. None: broken,
    /// nothing to sleep on (and nothing stays armed).
    fn arm(
        &mut self,
        ctx: &Ctx<'_>,
        read: bool,
        write: bool,
    ) -> Option<Vec<(std::os::fd::RawFd, i16)>> {
        let _ = (ctx, read, write);
        None
    }
    /// Ends a sleep prepared by `arm(read, write)`: only those directions
    /// (another thread may be asleep on the other one). Sleepers are
    /// counted: a direction's wait word and doorbell are reset only when
    /// its last sleeper leaves, so one thread's wake-up never swallows
    /// another's.
    fn disarm(&mut self, read: bool, write: bool) {
        let _ = (read, write);
    }
    /// Parks this end: `sleep` (a parked sleep, `bells::ParkBell::sleep`)
    /// becomes one of its sleepers for the directions asked, until
    /// `unpark` with its id. False: not parked (not a settled Direct end).
    /// The caller looks at its readiness again afterwards.
    fn park(&mut self, sleep: crate::bells::Sleep, read: bool, write: bool) -> bool {
        let _ = (sleep, read, write);
        false
    }
    /// Ends a parking made by `park` with that doorbell id: whether one
    /// was there to end (none in a forked child, whose end forgot its
    /// parent's sleeps).
    fn unpark(&mut self, id: u32) -> bool {
        let _ = id;
        false
    }
    /// Arms again, with a fresh wait, the directions whose wait word names
    /// the parking made by `park` with doorbell `id` (a ring of that
    /// doorbell may have been this end's, its news taken by another reader
    /// since: its peer rings once per wait): whether that parking is still
    /// there. The caller looks at its readiness again afterwards.
    fn repark(&mut self, id: u32) -> bool {
        let _ = id;
        false
    }
    /// `repark` for a parking made at generation `gen` (false for one made
    /// at another).
    fn repark_from(&mut self, id: u32, gen: u64) -> bool {
        gen == self.generation() && self.repark(id)
    }
    /// `unpark` for a parking made at generation `gen`.
    fn unpark_from(&mut self, id: u32, gen: u64) {
        if gen == self.generation() {
            self.unpark(id);
        }
    }
    /// Which end a sleeper that arms now arms: one more each time a
    /// hand-over end took a new end (fail-forward). A sleeper armed
    /// before is disarmed with its own (`disarm_from`), so that nothing
    /// armed on the old end is undone on the new one.
    fn generation(&self) -> u64 {
        0
    }
    /// Hands over this end's call eventfd (its number unchanged; the end
    /// goes on with a duplicate): sleepers of an older generation may
    /// still poll that number after the end was replaced, and it must
    /// not be closed (and reused for another file) under them. None if
    /// it has none.
    fn retire_call(&mut self) -> Option<ssock_rings::sys::EventFd> {
        None
    }
    /// `disarm` for a sleeper that armed at generation `gen`.
    fn disarm_from(&mut self, read: bool, write: bool, gen: u64) {
        let _ = gen;
        self.disarm(read, write);
    }
    /// Wakes this end's own sleepers (another thread shut the socket down).
    fn wake_self(&self) {}
    /// Shuts this end's reads down for all its holders, as the kernel's
    /// `shutdown(SHUT_RD)` is the socket's: a shared word, then the
    /// holders asleep on its reads woken, in any process.
    fn shut_reads(&mut self) {}
    /// Whether a holder of this end shut its reads down.
    fn reads_shut(&self) -> bool {
        false
    }
    /// The error a reset this end's readiness reports stands for (SO_ERROR):
    /// ECONNRESET, or EPIPE when it came after the peer's end of stream
    /// (the kernel's, for an RST in CLOSE_WAIT). Asked once, when the
    /// reset is reported: an end whose peer's bytes came on the kernel
    /// socket takes that socket's own pending error then.
    fn reset_errno(&self, _ctx: &Ctx<'_>) -> i32 {
        libc::ECONNRESET
    }
    /// The peer reset the connection and bytes it sent before it are still
    /// on their way to this end's reads (Queued: devd is posting them): a
    /// read that finds none now is not at the end, even once the reset's
    /// error was taken.
    fn rest_coming(&self) -> bool {
        false
    }
    /// Wakes the holders of this end asleep on its reads, in any process.
    fn wake_readers(&mut self) {}
    /// The connector's writes move to the region: its acceptor holds its
    /// end (Direct: this process gets the acceptor's doorbell now, while it
    /// has a session, rather than when a child may need to ring it).
    fn peer_claimed(&mut self) {}
    /// The end marks that came through the region (Queued: RX_FLAGS;
    /// `layout::FLAG_EOS`, `layout::FLAG_RESET`), 0 if none.
    fn region_mark(&self) -> u32 {
        0
    }
    /// This end wrote a hand-over word (READY, CLAIM, SWITCH, END) that
    /// devd relays when the other end is on another host.
    fn words_changed(&mut self) {}
    /// The fd devd rings when the other host's words change after the
    /// region was lost (a Queued end between hosts whose link failed:
    /// its writer's END comes that way), None if there is none. `cap`:
    /// Some(true) drains it and cuts sleeps on it short (the shim's
    /// shared-sleep cut) while a read waits for that END, so that the
    /// wait's bound is seen; Some(false) ends the cut.
    fn words_fd(&mut self, _cap: Option<bool>) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The fd devd rings when it offers this moved end a new one (fail-
    /// forward, docs/protocol.md 8.6), emptied first if `drain` (the
    /// caller looks at the FORWARD word after this, so an offer made
    /// before is not missed; not while another thread may sleep on it
    /// for something else). None if there is none.
    fn offer_fd(&mut self, drain: bool) -> Option<std::os::fd::RawFd> {
        let _ = drain;
        None
    }
    /// The mapping whose hand-over words this end uses, and its side
    /// (0 connector, 1 acceptor): Direct's shared region, Queued's shared
    /// hand-over page. None for kernel TCP.
    fn handover_words(&self) -> Option<(Arc<Mapping>, usize)> {
        None
    }
    /// Whether the region no longer carries bytes (Queued: devd is gone,
    /// or the peer closed a direction's region part): the hand-over then
    /// moves both directions back to the kernel socket (docs/protocol.md
    /// section 2.4).
    fn path_lost(&mut self) -> bool {
        false
    }
    /// Closes this end's reads from the region (after [`Transport::path_lost`]):
    /// the region offset where the peer's writes continue on the kernel
    /// socket. Reads then return the region bytes up to there, and
    /// WouldBlock after them.
    fn close_reads(&mut self) -> io::Result<u64> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// Closes this end's reads from the region at what it read, whatever
    /// the peer did (an end leaving the region: `before_plain_exec`).
    fn close_reads_here(&mut self) -> io::Result<u64> {
        self.close_reads()
    }
    /// Closes this end's writes into the region: the region offset where
    /// its reader stopped taking, and the bytes written from there on,
    /// which the hand-over writes on the kernel socket.
    fn close_writes(&mut self) -> io::Result<(u64, Vec<u8>)> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// Bytes this end wrote into the region.
    fn region_written(&self) -> u64 {
        0
    }
    /// Once [`Transport::close_reads`] was called: the region bytes still
    /// to read.
    fn reads_left(&self) -> Option<u64> {
        None
    }
    /// Processes holding this end (only the last one's close ends it).
    fn holders(&self) -> u32 {
        1
    }
    /// Whether the connection moved back to the kernel socket after its
    /// region stopped carrying bytes, and how many bytes this end sent
    /// again there (docs/protocol.md section 2.4).
    fn moved_back(&self) -> Option<u64> {
        None
    }
    /// This process is about to exec a program that will not take the end
    /// over (no shim there, or one that cannot reach this devd), or hands
    /// the socket to the C library's stdio: the connection leaves the
    /// region for its kernel socket now, whatever the peer does
    /// (docs/protocol.md section 2.6). Blocks up to 2 s for room for bytes
    /// it owes. Unless it says `Stays`, the kernel socket is the
    /// connection's for good from here, and this process may read and
    /// write it directly.
    fn before_plain_exec(&mut self, _ctx: &Ctx<'_>) -> Leave {
        Leave::Stays
    }
    /// The session with devd this end came through (Queued), for the
    /// requests the hand-over makes (a new end, `handover/forward.rs`).
    fn session(&self) -> Option<Arc<crate::session::Session>> {
        None
    }
    /// Counts, on the session this end came through, this connection as
    /// one left on kernel TCP for `reason` (Skipped: posted, no reply, so
    /// a program's call never waits on devd for it).
    fn count_kernel(&self, _reason: ssock_rings::codec::FallbackReason) {}
    /// Looks (one zero-timeout poll) at what the transport depends on
    /// beside its peer, without judging the kernel socket: Queued learns
    /// that devd's session hung up. For a waiter whose kernel
    /// socket still carries the peer's bytes.
    fn check_devd(&mut self) {}
    /// Whether calls may spin on this transport without system calls (a
    /// [`handover::Handover`] still on the kernel socket may not).
    fn settled(&self) -> bool {
        true
    }
    /// Whether spinning paid lately on this connection's waits (None: it
    /// never spins); a wait on it alone asks this gate, a wait on several
    /// the process's.
    fn gate(&self) -> Option<Arc<ssock_rings::notify::Gate>> {
        None
    }
    /// (bytes ready to read, bytes written but not yet taken by the peer),
    /// as far as this side can tell: FIONREAD and SIOCOUTQ.
    fn pending(&mut self, _ctx: &Ctx<'_>) -> (usize, usize) {
        (0, 0)
    }
}

pub(crate) fn reset_error() -> io::Error {
    io::Error::from_raw_os_error(libc::ECONNRESET)
}

pub(crate) fn pipe_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EPIPE)
}

pub(crate) fn would_block() -> io::Error {
    io::Error::from(io::ErrorKind::WouldBlock)
}

/// What the kernel socket says about the peer, without blocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Still open.
    Alive,
    /// Closed (FIN): the peer's last holder closed or exited (or died: the
    /// kernel closes a dead process's sockets with a FIN too).
    Gone,
    /// Reset (RST).
    Reset,
    /// Bytes arrived on the kernel socket of an accelerated connection.
    Stray,
}

/// Asks the kernel socket, with one `poll` and a zero timeout, what
/// became of it (or takes what the poll of a [`Polled`] scope said of it).
/// A poll and not a peeking recv: the application may run
/// under a seccomp filter that allows only the calls its own socket calls
/// make (sshd's sandboxed child allows poll, read and write but no recv).
/// Bytes followed by the end of the stream read as Gone, not Stray.
pub(crate) fn liveness(tcp: BorrowedFd<'_>) -> Liveness {
    use std::os::fd::AsRawFd;
    if let Some(revents) = Polled::revents(tcp.as_raw_fd()) {
        // An end and a reset stay; bytes may have been read since (by
        // another thread, or the hand-over's own reads): asked again.
        match judge(revents) {
            Liveness::Stray => {}
            other => return other,
        }
    }
    let mut fds = [liveness_poll(tcp.as_raw_fd())];
    match ssock_rings::sys::poll(&mut fds, Some(Duration::ZERO)) {
        Ok(0) | Err(_) => Liveness::Alive,
        Ok(_) => judge(fds[0].revents),
    }
}

/// What [`Transport::quiet_sig`] reads.
pub type QuietSig = [u64; 9];

/// The poll entry [`liveness`] asks the kernel socket `tcp` with (for a
/// caller that polls it together with other fds, then [`judge`]s it).
pub fn liveness_poll(tcp: std::os::fd::RawFd) -> ssock_rings::sys::PollFd {
    ssock_rings::sys::PollFd::new(tcp, libc::POLLIN | libc::POLLRDHUP)
}

thread_local! {
    /// The kernel sockets a [`Polled`] scope of this thread polled, with
    /// what the poll said of each.
    static POLLED: std::cell::RefCell<Vec<(std::os::fd::RawFd, i16)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// While it lives, [`liveness`] of the kernel sockets it names takes what
/// one poll of all of them (their [`liveness_poll`] entries, polled
/// together just before) said: an end or a reset (bytes there are asked
/// about again, since they may have been read meanwhile). A scan of many
/// connections asks the kernel once, not once per connection. Scopes
/// nest (the outer one's answers come back when the inner ends, also by
/// unwinding).
pub struct Polled {
    /// None: the thread's storage is gone (its exit): no scope.
    outer: Option<Vec<(std::os::fd::RawFd, i16)>>,
}

impl Polled {
    /// `polled`: (fd, revents) of [`liveness_poll`] entries (more events
    /// asked, such as POLLPRI, change nothing: [`judge`] ignores them).
    pub fn scope(mut polled: Vec<(std::os::fd::RawFd, i16)>) -> Polled {
        // Sorted: each look-up a binary search (a scan of thousands).
        polled.sort_unstable_by_key(|&(fd, _)| fd);
        // (`try_with`: a call from a thread's or the process's last
        // destructors, after the thread's storage went, asks each socket.)
        Polled {
            outer: POLLED
                .try_with(|p| std::mem::replace(&mut *p.borrow_mut(), polled))
                .ok(),
        }
    }

    fn revents(fd: std::os::fd::RawFd) -> Option<i16> {
        POLLED
            .try_with(|p| {
                let p = p.borrow();
                // (An fd listed twice was polled twice: either answer.)
                let k = p.binary_search_by_key(&fd, |&(f, _)| f).ok()?;
                Some(p[k].1)
            })
            .ok()
            .flatten()
    }
}

impl Drop for Polled {
    fn drop(&mut self) {
        if let Some(outer) = self.outer.take() {
            let _ = POLLED.try_with(|p| *p.borrow_mut() = outer);
        }
    }
}

/// What the revents of a [`liveness_poll`] entry say.
pub(crate) fn judge(revents: i16) -> Liveness {
    if revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        Liveness::Reset
    } else if revents & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
        Liveness::Gone
    } else if revents & libc::POLLIN != 0 {
        Liveness::Stray
    } else {
        Liveness::Alive
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsFd, AsRawFd};

    #[test]
    fn a_polled_scope_answers_for_the_sockets_it_names_and_ends_with_its_outer_one() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let fd = c.as_fd();
        assert_eq!(liveness(fd), Liveness::Alive);
        {
            // What the scope says, not what the socket says.
            let _gone = Polled::scope(vec![(999_999, 0), (fd.as_raw_fd(), libc::POLLRDHUP)]);
            assert_eq!(liveness(fd), Liveness::Gone);
            {
                let _reset = Polled::scope(vec![(fd.as_raw_fd(), libc::POLLERR)]);
                assert_eq!(liveness(fd), Liveness::Reset);
            }
            assert_eq!(liveness(fd), Liveness::Gone);
            {
                // Bytes said there: asked again (the socket has none).
                let _stray = Polled::scope(vec![(fd.as_raw_fd(), libc::POLLIN)]);
                assert_eq!(liveness(fd), Liveness::Alive);
            }
            let _none = Polled::scope(Vec::new());
            // Not named: asked of the kernel (still open).
            assert_eq!(liveness(fd), Liveness::Alive);
        }
        assert_eq!(liveness(fd), Liveness::Alive);
        drop(a);
        // The peer's close, seen by the poll each look makes outside a scope.
        let t = Instant::now();
        while liveness(fd) != Liveness::Gone {
            assert!(t.elapsed() < Duration::from_secs(5), "no FIN seen");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
