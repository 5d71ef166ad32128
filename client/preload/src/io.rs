//! Blocking receive and send with the kernel's semantics, built from
//! non-blocking transport calls made under the socket's lock and waits
//! made outside it (through the poll path, on this one fd). Holding the
//! lock only for a non-blocking call lets a reader thread and a writer
//! thread share a socket, and lets another thread's shutdown reach a
//! blocked reader. SO_RCVTIMEO and SO_SNDTIMEO bound the waits (EAGAIN).
//!
//! Never here: a wait with the socket's lock held, or a send that
//! interleaves with another thread's (sends land whole).

use crate::obj::Obj;
use crate::outcome::Outcome;
use crate::sleep;
use crate::sock::{lock, Entry, Sock};
use crate::wait;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Waits until `fd` reports `events` (or an error/hangup). First for the
/// spin budget alone (no syscall while the peer answers quickly); then,
/// without spinning again, for the socket's SO_RCVTIMEO/SO_SNDTIMEO
/// (`opt`), read only on this slow path. Err(EAGAIN) when that timeout
/// passes, Err(EINTR) on a signal.
fn wait_for(e: &Entry, fd: BorrowedFd<'_>, events: i16, opt: i32) -> Result<(), i32> {
    let socks = [Some(Obj::Sock(e.clone()))];
    let once = |t: Option<std::time::Duration>, spin: bool| {
        let mut p = [libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        }];
        let r = wait::poll(&mut p, &socks, t, spin, &sleep::real_poll, &|set, rem| {
            sleep::real_poll(set, sleep::millis(rem))
        });
        if r < 0 {
            Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINTR))
        } else {
            Ok(r > 0)
        }
    };
    let spin = lock(e).spin();
    let limit = || ssock_rings::sys::sockopt_timeout(fd, opt).unwrap_or(None);
    match once(Some(spin), true) {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        // As the kernel: a signal whose handler has SA_RESTART restarts
        // the call, unless a timeout is set on the socket.
        Err(libc::EINTR) if limit().is_none() && restartable() => return Ok(()),
        Err(x) => return Err(x),
    }
    let limit = limit();
    loop {
        // The budget was spent above: straight to sleep.
        match once(limit, false) {
            Ok(true) => return Ok(()),
            Ok(false) => return Err(libc::EAGAIN),
            Err(libc::EINTR) if limit.is_none() && restartable() => {}
            Err(x) => return Err(x),
        }
    }
}

/// Whether a call interrupted by a signal would be restarted by the
/// kernel: the handler that ran had SA_RESTART. Which signal it was is not
/// known here, so every signal with a handler must have SA_RESTART (as
/// glibc's signal() installs them); otherwise the call ends with EINTR.
/// Only on the interrupted path: up to 64 sigaction calls.
fn restartable() -> bool {
    (1..=libc::SIGRTMAX()).all(|sig| {
        // SAFETY: a zeroed sigaction is a valid out-parameter; sigaction
        // with a null new action only reads the current one.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `old` is a live, exclusively borrowed struct.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
            return true; // not a valid signal number
        }
        old.sa_sigaction == libc::SIG_DFL
            || old.sa_sigaction == libc::SIG_IGN
            || old.sa_flags & libc::SA_RESTART != 0
    })
}

/// recv(2): MSG_PEEK, MSG_DONTWAIT, MSG_WAITALL. One lock per step and no
/// syscall while data is there. Kernel: the socket turned out plain and
/// nothing was received (the call goes to libc).
pub fn recv(e: &Entry, fd: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> Outcome<usize> {
    if flags & (libc::MSG_OOB | libc::MSG_ERRQUEUE) != 0 {
        // Urgent data travels on the kernel socket (see `send`), and the
        // error queue is the kernel socket's (never the stream's bytes).
        return ssock_rings::sys::recv(fd, buf, flags)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
            .into();
    }
    recv_into(e, fd, &mut [buf], flags)
}

/// `recv` into the concatenation of `bufs` (MSG_PEEK: one buffer only: a
/// peek looks from the start again for each). The peer sees the room it
/// frees buffer by buffer, as it does for a large buffer part by part.
fn recv_into(e: &Entry, fd: BorrowedFd<'_>, bufs: &mut [&mut [u8]], flags: i32) -> Outcome<usize> {
    debug_assert!(flags & libc::MSG_PEEK == 0 || bufs.len() <= 1);
    let mut nonblocking = flags & libc::MSG_DONTWAIT != 0;
    let peek = flags & libc::MSG_PEEK != 0;
    let waitall = flags & libc::MSG_WAITALL != 0 && !peek;
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut got = 0;
    loop {
        let r = {
            let mut s = lock(e);
            nonblocking |= s.nonblocking;
            recv_now_vec(&mut s, fd, bufs, got, peek)
        };
        match r {
            Outcome::Done(0) => return Outcome::Done(got),
            Outcome::Done(n) => {
                got += n;
                if !waitall || got == total {
                    return Outcome::Done(got);
                }
            }
            Outcome::Errno(libc::EAGAIN) => {}
            // (An error after some bytes comes with the socket's next call,
            // as the kernel keeps sk_err when it returns data.)
            other => return after_some(&mut lock(e), got, other),
        }
        if nonblocking {
            // An application polling without poll(2) must still learn that
            // the peer is gone: ask the kernel socket once.
            let ready = lock(e).readiness(fd, true);
            if ready.readable {
                continue;
            }
            return if got > 0 {
                Outcome::Done(got)
            } else {
                Outcome::Errno(libc::EAGAIN)
            };
        }
        if let Err(x) = wait_for(e, fd, libc::POLLIN, libc::SO_RCVTIMEO) {
            return if got > 0 {
                Outcome::Done(got)
            } else {
                Outcome::Errno(x)
            };
        }
    }
}

/// One non-blocking receive into the concatenation of `bufs` from byte
/// `from` on, under the socket's lock: buffer after buffer while each
/// fills, as one receive into their concatenation (no staging copy).
fn recv_now_vec(
    s: &mut Sock,
    fd: BorrowedFd<'_>,
    bufs: &mut [&mut [u8]],
    from: usize,
    peek: bool,
) -> Outcome<usize> {
    if let Some(e) = s.take_deferred() {
        return Outcome::Errno(e);
    }
    let mut got = 0;
    for piece in pieces_mut(bufs, from) {
        let len = piece.len();
        match s.recv_now(fd, piece, peek) {
            Outcome::Done(n) => {
                got += n;
                if n < len {
                    break;
                }
            }
            other => return after_some(s, got, other),
        }
    }
    Outcome::Done(got)
}

/// The bytes of the concatenation of `bufs` from byte `from` on, buffer
/// by buffer (empty ones left out).
fn pieces<'a>(bufs: &'a [&[u8]], from: usize) -> impl Iterator<Item = &'a [u8]> {
    let mut skip = from;
    bufs.iter().filter_map(move |b| {
        let at = skip.min(b.len());
        skip -= at;
        Some(&b[at..]).filter(|p| !p.is_empty())
    })
}

/// `pieces` of buffers to fill.
fn pieces_mut<'a, 'b: 'a>(
    bufs: &'a mut [&'b mut [u8]],
    from: usize,
) -> impl Iterator<Item = &'a mut [u8]> + use<'a, 'b> {
    let mut skip = from;
    bufs.iter_mut().filter_map(move |b| {
        let at = skip.min(b.len());
        skip -= at;
        let p = &mut b[at..];
        (!p.is_empty()).then_some(p)
    })
}

/// How a vector's step ends when a buffer after the first `done` bytes
/// got `other`: those bytes, the error kept for the socket's next call
/// (as the kernel keeps a socket error that came after data: an error of
/// the kernel socket is reported only once); `other` itself if none moved.
fn after_some(s: &mut Sock, done: usize, other: Outcome<usize>) -> Outcome<usize> {
    if done == 0 {
        return other;
    }
    if let Outcome::Errno(e) = other {
        s.defer(e, connection_failed(e));
    }
    Outcome::Done(done)
}

/// Whether `err` says the connection failed (a reset, a timeout): the
/// kernel keeps those as the socket's error (sk_err).
fn connection_failed(err: i32) -> bool {
    matches!(
        err,
        libc::ECONNRESET
            | libc::ETIMEDOUT
            | libc::ECONNABORTED
            | libc::ECONNREFUSED
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
    )
}

/// Keeps a later message's `err` for the socket's next call, as the
/// kernel's recvmmsg(2) keeps it as the socket's error (sk_err); not
/// EAGAIN.
pub fn defer_error(e: &Entry, err: i32) {
    lock(e).defer(err, true);
}

/// The socket's pending error, taken, as the kernel's `sock_error` that
/// recvmmsg(2) asks before any message: one an earlier call kept, or a
/// reset the region shows and nobody took yet (the bytes before it are
/// read afterwards). No system call: a peer gone without a mark is found
/// by the messages' own reads.
pub fn take_pending_error(e: &Entry, fd: BorrowedFd<'_>) -> Option<i32> {
    let mut s = lock(e);
    if let Some(err) = s.take_deferred() {
        return Some(err);
    }
    s.take_error(fd, false).filter(|&err| err != 0)
}

/// One non-blocking send of the concatenation of `bufs` from byte `from`
/// on, under the socket's lock: buffer after buffer while each goes whole,
/// as one send of their concatenation (no staging copy).
fn send_now_vec(s: &mut Sock, fd: BorrowedFd<'_>, bufs: &[&[u8]], from: usize) -> Outcome<usize> {
    if let Some(e) = s.take_deferred() {
        return Outcome::Errno(e);
    }
    if bufs.iter().all(|b| b.is_empty()) {
        // Nothing to send, but what the kernel would say of the socket
        // (EPIPE after a shutdown or a reset).
        return s.send_now(fd, &[]);
    }
    let mut sent = 0;
    for piece in pieces(bufs, from) {
        match s.send_now(fd, piece) {
            Outcome::Done(n) => {
                sent += n;
                if n < piece.len() {
                    break;
                }
            }
            other => return after_some(s, sent, other),
        }
    }
    Outcome::Done(sent)
}

/// The rest of a blocking send from byte `from` of `bufs`, on the kernel
/// socket: the connection turned plain while the send was under way (a
/// blocking send goes whole, as the kernel's). The bytes sent, or the
/// error if none.
fn rest_on_kernel(fd: BorrowedFd<'_>, bufs: &[&[u8]], from: usize, flags: i32) -> Outcome<usize> {
    let mut sent = 0;
    for mut piece in pieces(bufs, from) {
        while !piece.is_empty() {
            match ssock_rings::sys::send(fd, piece, flags) {
                Ok(n) => {
                    sent += n;
                    piece = &piece[n..];
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if sent == 0 => {
                    return Outcome::Errno(e.raw_os_error().unwrap_or(libc::EIO))
                }
                Err(_) => return Outcome::Done(sent),
            }
        }
    }
    Outcome::Done(sent)
}

thread_local! {
    /// This thread's call is the program's read(2), readv(2), write(2) or
    /// writev(2) (`PlainCall`).
    static PLAIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While it lives, this thread's call is the program's own read(2),
/// readv(2), write(2) or writev(2): bytes on the kernel socket of a
/// nonblocking socket move with read(2) and write(2) (`Ctx::plain`).
pub struct PlainCall(bool);

impl PlainCall {
    pub fn enter() -> PlainCall {
        PlainCall(PLAIN.with(|p| p.replace(true)))
    }
}

impl Drop for PlainCall {
    fn drop(&mut self) {
        PLAIN.with(|p| p.set(self.0));
    }
}

/// Whether this thread's call is one of `PlainCall`'s.
pub fn plain_call() -> bool {
    PLAIN.with(std::cell::Cell::get)
}

/// Marks a socket's send as under way across waits, so that concurrent
/// sends land whole; cleared when the send ends, however it ends.
struct SendTurn<'a>(&'a Entry, bool);

impl Drop for SendTurn<'_> {
    fn drop(&mut self) {
        if self.1 {
            lock(self.0).send_busy = false;
        }
    }
}

/// send(2): all of `buf` when blocking; EPIPE raises SIGPIPE unless
/// MSG_NOSIGNAL; a call that moved bytes reports them. A send that has to
/// wait keeps the socket's turn until it is done (others wait, or get
/// EAGAIN when nonblocking): sends from several threads land whole.
/// Kernel: the socket turned out plain and nothing was sent.
pub fn send(e: &Entry, fd: BorrowedFd<'_>, buf: &[u8], flags: i32) -> Outcome<usize> {
    if flags & libc::MSG_OOB != 0 {
        return send_urgent(e, fd, buf, flags);
    }
    send_from(e, fd, &[buf], flags)
}

/// `send` of the concatenation of `bufs` (not MSG_OOB).
fn send_from(e: &Entry, fd: BorrowedFd<'_>, bufs: &[&[u8]], flags: i32) -> Outcome<usize> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut nonblocking = flags & libc::MSG_DONTWAIT != 0;
    // (A write(2) of an earlier call's that raised SIGPIPE is no news.)
    ssock_rings::sys::take_sigpipe_raised();
    let mut turn = SendTurn(e, false);
    let mut turn_deadline: Option<Option<std::time::Instant>> = None;
    let mut off = 0;
    loop {
        let r = {
            let mut s = lock(e);
            nonblocking |= s.nonblocking;
            if s.send_busy && !turn.1 {
                // Another thread's send is waiting half done: wait for the
                // turn in short sleeps, bounded by SO_SNDTIMEO, and
                // interrupted by signals like any blocking send.
                drop(s);
                if nonblocking {
                    return Outcome::Errno(libc::EAGAIN);
                }
                let limit = *turn_deadline.get_or_insert_with(|| {
                    sleep::deadline(
                        ssock_rings::sys::sockopt_timeout(fd, libc::SO_SNDTIMEO).unwrap_or(None),
                    )
                });
                if limit.is_some_and(|d| std::time::Instant::now() >= d) {
                    return Outcome::Errno(libc::EAGAIN);
                }
                if sleep::real_poll(&mut [], 1) < 0 {
                    let e = std::io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EINTR);
                    if e != libc::EINTR || !restartable() {
                        return Outcome::Errno(e);
                    }
                }
                continue;
            }
            let r = send_now_vec(&mut s, fd, bufs, off);
            // A send that will have to wait takes the turn in the same
            // critical section as its partial write: nobody slips in.
            let partial = matches!(r, Outcome::Done(n) if off + n < total)
                || r == Outcome::Errno(libc::EAGAIN);
            if partial && !nonblocking && !turn.1 {
                s.send_busy = true;
                turn.1 = true;
            }
            r
        };
        match r {
            Outcome::Done(n) => {
                off += n;
                if off == total {
                    return Outcome::Done(off);
                }
            }
            Outcome::Errno(libc::EAGAIN) => {}
            Outcome::Kernel if off > 0 && !nonblocking => {
                return match rest_on_kernel(fd, bufs, off, flags) {
                    Outcome::Done(n) => Outcome::Done(off + n),
                    _ => Outcome::Done(off),
                };
            }
            other => {
                if off > 0 {
                    // A reset this send took comes with the next call, as
                    // the kernel's sk_err after a partial send.
                    if other == Outcome::Errno(libc::ECONNRESET) {
                        lock(e).defer(libc::ECONNRESET, true);
                    }
                    return Outcome::Done(off);
                }
                // (A write(2) on the kernel socket raised it already.)
                if other == Outcome::Errno(libc::EPIPE)
                    && flags & libc::MSG_NOSIGNAL == 0
                    && !ssock_rings::sys::take_sigpipe_raised()
                {
                    ssock_rings::sys::raise_sigpipe();
                }
                return other;
            }
        }
        if nonblocking {
            return if off > 0 {
                Outcome::Done(off)
            } else {
                Outcome::Errno(libc::EAGAIN)
            };
        }
        if let Err(x) = wait_for(e, fd, libc::POLLOUT, libc::SO_SNDTIMEO) {
            return if off > 0 {
                Outcome::Done(off)
            } else {
                Outcome::Errno(x)
            };
        }
    }
}

/// send(MSG_OOB): TCP makes only the last byte urgent. The bytes before it
/// go through the ring like any others; the urgent byte goes on the kernel
/// socket, out of band, where the peer's recv(MSG_OOB), SIGURG and POLLPRI
/// find it (a lone urgent byte is not in the kernel stream's normal data,
/// so the peer's liveness check does not see it as stray bytes).
fn send_urgent(e: &Entry, fd: BorrowedFd<'_>, buf: &[u8], flags: i32) -> Outcome<usize> {
    let Some((last, head)) = buf.split_last() else {
        return Outcome::Done(0);
    };
    let sent = if head.is_empty() {
        0
    } else {
        match send(e, fd, head, flags & !libc::MSG_OOB) {
            Outcome::Done(n) => n,
            other => return other,
        }
    };
    if sent < head.len() {
        return Outcome::Done(sent);
    }
    let f = libc::MSG_OOB | (flags & (libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT));
    // SAFETY: `last` is one readable byte; fd is the caller's socket.
    let r = unsafe { libc::send(fd.as_raw_fd(), std::ptr::from_ref(last).cast(), 1, f) };
    if r == 1 {
        Outcome::Done(sent + 1)
    } else if sent > 0 {
        Outcome::Done(sent)
    } else {
        Outcome::Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

/// Vectors up to this size are gathered into (scattered from) a staging
/// buffer and moved with one transport call; larger ones buffer by buffer,
/// without the copy (OpenMPI's 1 MiB messages: writev of a header and the
/// data).
const STAGE_MAX: usize = 64 * 1024;

/// Receive into several buffers (readv, recvmsg): like one recv into their
/// concatenation (one wait, one MSG_PEEK or MSG_WAITALL across them).
pub fn recv_vec(
    e: &Entry,
    fd: BorrowedFd<'_>,
    bufs: &mut [&mut [u8]],
    flags: i32,
) -> Outcome<usize> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut nonempty = bufs.iter_mut().filter(|b| !b.is_empty());
    match (nonempty.next(), nonempty.next()) {
        (None, _) => return Outcome::Done(0),
        (Some(b), None) => return recv(e, fd, b, flags),
        _ => {}
    }
    if flags & (libc::MSG_PEEK | libc::MSG_OOB) == 0 && total > STAGE_MAX {
        return recv_into(e, fd, bufs, flags);
    }
    // Staged: a small vector (one transport call: one Queued slot, one
    // wake-up of the peer), or a peek (which looks from the start again
    // for each buffer).
    with_scratch(total, |tmp| {
        let n = match recv(e, fd, tmp, flags) {
            Outcome::Done(n) => n,
            other => return other,
        };
        let mut off = 0;
        for b in bufs.iter_mut() {
            if off == n {
                break;
            }
            let k = b.len().min(n - off);
            b[..k].copy_from_slice(&tmp[off..off + k]);
            off += k;
        }
        Outcome::Done(n)
    })
}

/// Runs `f` on a staging buffer of `len` bytes: this thread's reused one
/// (no allocation per call once it has grown; at most 1 MiB is kept), or a
/// fresh one if it is in use (a signal handler calling in).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    use std::cell::RefCell;
    const KEEP: usize = 1 << 20;
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    let mut f = Some(f);
    let reused = SCRATCH.try_with(|s| {
        let mut s = s.try_borrow_mut().ok()?;
        if s.len() < len {
            s.resize(len, 0);
        }
        let r = f.take().map(|f| f(&mut s[..len]));
        if s.len() > KEEP {
            *s = Vec::new();
        }
        r
    });
    match (reused, f) {
        (Ok(Some(r)), _) => r,
        (_, Some(f)) => f(&mut vec![0u8; len]),
        (_, None) => unreachable!("the closure ran, so it returned"),
    }
}

/// Send several buffers (writev, sendmsg) as one stream write.
pub fn send_vec(e: &Entry, fd: BorrowedFd<'_>, bufs: &[&[u8]], flags: i32) -> Outcome<usize> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    match bufs {
        [] => Outcome::Done(0),
        [b] => send(e, fd, b, flags),
        _ if flags & libc::MSG_OOB == 0 && total > STAGE_MAX => send_from(e, fd, bufs, flags),
        _ => with_scratch(total, |tmp| {
            let mut off = 0;
            for b in bufs {
                tmp[off..off + b.len()].copy_from_slice(b);
                off += b.len();
            }
            send(e, fd, tmp, flags)
        }),
    }
}
