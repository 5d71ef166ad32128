//! libssock.so: the LD_PRELOAD shim. Each exported libc symbol looks the fd
//! up and dispatches to the accelerated socket or to the real libc
//! function; negotiation and socket semantics live in `sock` (on top of
//! ssock-client), never in these functions.
//!
//! This first version intercepts the blocking TCP calls: connect, listen,
//! accept, accept4, read, recv, recvfrom, readv, recvmsg, write, send,
//! sendto, writev, sendmsg, shutdown, close, the fortified __read_chk,
//! __recv_chk and __recvfrom_chk (all receives funnel into one path, all
//! sends into another), poll/ppoll/select/pselect (wait.rs), and
//! dup/dup2/dup3/fcntl(F_DUPFD) (a duplicate names the same socket). A socket that is nonblocking at connect time stays on kernel TCP.
//! After fork, both processes hold the accelerated socket (a holder count
//! in the region): only the last close ends the stream.
//! ioctl answers FIONREAD and SIOCOUTQ from the rings.
//! Not yet intercepted (issue 3 goes on): epoll, recvmmsg/
//! sendmmsg, sendfile, exec, fd passing; a program that uses
//! those on an accelerated socket is not supported yet.

mod boundary;
mod epoll;
mod fds;
mod io;
mod logging;
mod obj;
mod outcome;
mod rawcalls;
mod real;
mod sleep;
mod sock;
mod table;
mod wait;

use boundary::{borrow, buf, buf_mut, chk_fail, enter, iov, iov_mut, pollfds, set_errno, sockaddr};
use libc::{c_int, c_uint, c_void, size_t, sockaddr as SockAddr, socklen_t, ssize_t};
use std::time::Duration;

fn fail<T: From<i8>>(e: i32) -> T {
    set_errno(e);
    T::from(-1)
}

use outcome::Outcome;
use sock::{lock, Entry};

/// Runs `accel` on `fd`'s accelerated socket, or `real` if it has none or
/// its negotiation ended on kernel TCP (then the fd is forgotten first).
fn dispatch<R: From<i8>>(
    fd: c_int,
    accel: impl FnOnce(&Entry) -> Outcome<R>,
    real: impl FnOnce() -> R,
) -> R {
    let Some(s) = table::get(fd) else {
        return real();
    };
    match accel(&s) {
        Outcome::Done(r) => r,
        Outcome::Kernel => {
            table::forget_kernel(fd, &s);
            real()
        }
        Outcome::Errno(e) => fail(e),
    }
}

/// `dispatch` for calls returning a byte count.
fn dispatch_n(
    fd: c_int,
    accel: impl FnOnce(&Entry) -> Outcome<usize>,
    real: impl FnOnce() -> ssize_t,
) -> ssize_t {
    dispatch(
        fd,
        |s| accel(s).map(|n| ssize_t::try_from(n).unwrap_or(ssize_t::MAX)),
        real,
    )
}

/// connect(2).
///
/// # Safety
/// The C contract of connect(2).
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const SockAddr, len: socklen_t) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().connect)(fd, addr, len) };
    enter(
        || {
            // SAFETY: addr/len are the caller's connect(2) arguments; fd is
            // the socket the caller is connecting, open during this call.
            let (dst, b) = unsafe { (sockaddr(addr, len), borrow(fd)) };
            let Some(dst) = dst else { return real() };
            if table::get(fd).is_some() {
                // The kernel's connect is the connection's: it says
                // EALREADY, 0, EISCONN or the connect's error.
                return real();
            }
            match sock::connect(b, dst) {
                None => real(),
                Some(Ok(Some((s, said)))) => {
                    table::insert(fd, s);
                    epoll::became_accelerated(fd);
                    // What the kernel's connect said (EINPROGRESS...).
                    if said != 0 {
                        fail(said)
                    } else {
                        0
                    }
                }
                r => {
                    // A plain connection: no stale entry may name this fd.
                    drop(table::remove(fd));
                    match r {
                        Some(Err(e)) => fail(e),
                        _ => 0,
                    }
                }
            }
        },
        real,
    )
}

/// listen(2).
///
/// # Safety
/// The C contract of listen(2).
#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().listen)(fd, backlog) };
    enter(
        || {
            let r = real();
            // SAFETY: fd is the caller's listening socket, open during this call.
            if r == 0 && sock::listened(unsafe { borrow(fd) }) {
                table::add_listener(fd);
            }
            r
        },
        real,
    )
}

/// accept4(2).
///
/// # Safety
/// The C contract of accept4(2).
#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut SockAddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().accept4)(fd, addr, len, flags) };
    enter(
        || loop {
            let m = real();
            if m < 0 {
                return m;
            }
            if !table::is_listener(fd) {
                // A new fd: an entry under its number is stale (its socket
                // was closed by a path the shim does not see).
                drop(table::remove(m));
                return m;
            }
            // SAFETY: m was just returned by accept4 and is open; fd is the
            // caller's listener, open during this call.
            match sock::accepted(unsafe { borrow(m) }) {
                Ok(Some(s)) => {
                    table::insert(m, s);
                    return m;
                }
                Ok(None) => {
                    drop(table::remove(m));
                    return m;
                }
                Err(()) => {
                    // An announced peer that sent no valid Hello cannot be
                    // served: drop it and take the next connection.
                    // SAFETY: m is ours to close; the application never saw it.
                    unsafe { (real::get().close)(m) };
                }
            }
        },
        real,
    )
}

/// accept(2).
///
/// # Safety
/// The C contract of accept(2).
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut SockAddr, len: *mut socklen_t) -> c_int {
    // SAFETY: same contract as accept4 with no flags.
    unsafe { accept4(fd, addr, len, 0) }
}

/// recvfrom(2); the peer address of a connected TCP socket is not filled.
///
/// # Safety
/// The C contract of recvfrom(2).
#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    b: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut SockAddr,
    alen: *mut socklen_t,
) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().recvfrom)(fd, b, n, flags, addr, alen) };
    enter(
        || {
            dispatch_n(
                fd,
                // SAFETY: b/n is the caller's receive buffer; fd is open.
                |s| io::recv(s, unsafe { borrow(fd) }, unsafe { buf_mut(b, n) }, flags),
                real,
            )
        },
        real,
    )
}

/// recv(2).
///
/// # Safety
/// The C contract of recv(2).
#[no_mangle]
pub unsafe extern "C" fn recv(fd: c_int, b: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: same contract as recvfrom without an address.
    unsafe { recvfrom(fd, b, n, flags, std::ptr::null_mut(), std::ptr::null_mut()) }
}

/// read(2).
///
/// # Safety
/// The C contract of read(2).
#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, b: *mut c_void, n: size_t) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().read)(fd, b, n) };
    enter(
        || {
            dispatch_n(
                fd,
                // SAFETY: b/n is the caller's buffer; fd is open.
                |s| io::recv(s, unsafe { borrow(fd) }, unsafe { buf_mut(b, n) }, 0),
                real,
            )
        },
        real,
    )
}

/// readv(2).
///
/// # Safety
/// The C contract of readv(2).
#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, v: *const libc::iovec, n: c_int) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().readv)(fd, v, n) };
    enter(
        || {
            dispatch_n(
                fd,
                |s| {
                    if n < 0 {
                        return Outcome::Errno(libc::EINVAL);
                    }
                    // SAFETY: v/n are the caller's iovecs (readv(2)); fd is
                    // open during this call.
                    let (fd_b, mut bufs) = unsafe { (borrow(fd), iov_mut(v, n)) };
                    io::recv_vec(s, fd_b, &mut bufs, 0)
                },
                real,
            )
        },
        real,
    )
}

/// recvmsg(2): no address and no ancillary data on a TCP stream.
///
/// # Safety
/// The C contract of recvmsg(2).
#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().recvmsg)(fd, msg, flags) };
    let real_then_adopt = || {
        let r = real();
        if r >= 0 {
            // SAFETY: recvmsg succeeded on the caller's msghdr.
            unsafe { adopt_passed(msg) };
        }
        r
    };
    enter(
        || {
            dispatch_n(
                fd,
                |s| {
                    if msg.is_null() {
                        return Outcome::Errno(libc::EFAULT);
                    }
                    // SAFETY: msg is the caller's valid msghdr (recvmsg(2)).
                    let m = unsafe { &mut *msg };
                    let n = c_int::try_from(m.msg_iovlen).unwrap_or(c_int::MAX);
                    // SAFETY: its iovecs are the caller's buffers; fd is open.
                    let r = io::recv_vec(
                        s,
                        unsafe { borrow(fd) },
                        &mut unsafe { iov_mut(m.msg_iov, n) },
                        flags,
                    );
                    if r != Outcome::Kernel {
                        m.msg_namelen = 0;
                        m.msg_controllen = 0;
                        m.msg_flags = 0;
                    }
                    r
                },
                real_then_adopt,
            )
        },
        real,
    )
}

/// __read_chk: read(2) from fortified code.
///
/// # Safety
/// The C contract of read(2); `buflen` is the buffer's real size.
#[no_mangle]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    b: *mut c_void,
    n: size_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    // SAFETY: same contract as read.
    unsafe { read(fd, b, n) }
}

/// __recv_chk: recv(2) from fortified code.
///
/// # Safety
/// The C contract of recv(2); `buflen` is the buffer's real size.
#[no_mangle]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    b: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    // SAFETY: same contract as recv.
    unsafe { recv(fd, b, n, flags) }
}

/// __recvfrom_chk: recvfrom(2) from fortified code.
///
/// # Safety
/// The C contract of recvfrom(2); `buflen` is the buffer's real size.
#[no_mangle]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    b: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
    addr: *mut SockAddr,
    alen: *mut socklen_t,
) -> ssize_t {
    if n > buflen {
        chk_fail();
    }
    // SAFETY: same contract as recvfrom.
    unsafe { recvfrom(fd, b, n, flags, addr, alen) }
}

/// writev(2).
///
/// # Safety
/// The C contract of writev(2).
#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, v: *const libc::iovec, n: c_int) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().writev)(fd, v, n) };
    enter(
        || {
            dispatch_n(
                fd,
                |s| {
                    if n < 0 {
                        return Outcome::Errno(libc::EINVAL);
                    }
                    // SAFETY: v/n are the caller's iovecs; fd is open.
                    io::send_vec(s, unsafe { borrow(fd) }, &unsafe { iov(v, n) }, 0)
                },
                real,
            )
        },
        real,
    )
}

/// sendmsg(2): the address and ancillary data are ignored on a connected
/// TCP stream.
///
/// # Safety
/// The C contract of sendmsg(2).
#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const libc::msghdr, flags: c_int) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().sendmsg)(fd, msg, flags) };
    let real_passing = || {
        // SAFETY: msg is null or the caller's valid msghdr.
        let passed = unsafe { passed_socks(msg) };
        for s in &passed {
            lock(s).fork_hold();
        }
        let r = real();
        if r < 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            for s in &passed {
                lock(s).drop_hold();
            }
            set_errno(e);
        }
        r
    };
    enter(
        || {
            dispatch_n(
                fd,
                |s| {
                    if msg.is_null() {
                        return Outcome::Errno(libc::EFAULT);
                    }
                    // SAFETY: msg is the caller's valid msghdr (sendmsg(2)).
                    let m = unsafe { &*msg };
                    let n = c_int::try_from(m.msg_iovlen).unwrap_or(c_int::MAX);
                    // SAFETY: its iovecs are the caller's buffers; fd is open.
                    io::send_vec(
                        s,
                        unsafe { borrow(fd) },
                        &unsafe { iov(m.msg_iov, n) },
                        flags,
                    )
                },
                real_passing,
            )
        },
        real,
    )
}

/// sendto(2); the address of a connected TCP socket is ignored, as by the kernel.
///
/// # Safety
/// The C contract of sendto(2).
#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    b: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const SockAddr,
    alen: socklen_t,
) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().sendto)(fd, b, n, flags, addr, alen) };
    enter(
        || {
            dispatch_n(
                fd,
                // SAFETY: b/n is the caller's data; fd is open.
                |s| io::send(s, unsafe { borrow(fd) }, unsafe { buf(b, n) }, flags),
                real,
            )
        },
        real,
    )
}

/// send(2).
///
/// # Safety
/// The C contract of send(2).
#[no_mangle]
pub unsafe extern "C" fn send(fd: c_int, b: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: same contract as sendto without an address.
    unsafe { sendto(fd, b, n, flags, std::ptr::null(), 0) }
}

/// write(2).
///
/// # Safety
/// The C contract of write(2).
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, b: *const c_void, n: size_t) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().write)(fd, b, n) };
    enter(
        || {
            dispatch_n(
                fd,
                // SAFETY: b/n is the caller's data; fd is open.
                |s| io::send(s, unsafe { borrow(fd) }, unsafe { buf(b, n) }, 0),
                real,
            )
        },
        real,
    )
}

/// poll(2).
///
/// # Safety
/// The C contract of poll(2).
#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, n: libc::nfds_t, timeout: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().poll)(fds, n, timeout) };
    enter(
        || {
            // SAFETY: fds/n is the caller's pollfd array (poll(2)).
            let pfds = unsafe { pollfds(fds, n) };
            let Some(socks) = wait::accelerated(pfds) else {
                return real();
            };
            wait::poll(
                pfds,
                &socks,
                ms_timeout(timeout),
                true,
                &sleep::real_poll,
                &|set, rem| sleep::real_poll(set, sleep::millis(rem)),
            )
        },
        real,
    )
}

/// libc's ppoll over a Rust slice, with `rem` as its timeout (None: forever)
/// and the caller's signal mask.
fn real_ppoll(
    set: &mut [libc::pollfd],
    rem: Option<Duration>,
    mask: *const libc::sigset_t,
) -> c_int {
    let ts = rem.map(|d| libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(d.subsec_nanos()),
    });
    let tp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    let k = libc::nfds_t::try_from(set.len()).unwrap_or(0);
    // SAFETY: set is a valid pollfd array of k entries; tp is null or a
    // live timespec; mask is null or the caller's sigset (ppoll/pselect).
    unsafe { (real::get().ppoll)(set.as_mut_ptr(), k, tp, mask) }
}

/// __poll_chk: poll(2) from fortified code.
///
/// # Safety
/// The C contract of poll(2); `fdslen` is the array's real size in bytes.
#[no_mangle]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    timeout: c_int,
    fdslen: size_t,
) -> c_int {
    let need = usize::try_from(n)
        .unwrap_or(usize::MAX)
        .saturating_mul(std::mem::size_of::<libc::pollfd>());
    if need > fdslen {
        chk_fail();
    }
    // SAFETY: same contract as poll.
    unsafe { poll(fds, n, timeout) }
}

/// __ppoll_chk: ppoll(2) from fortified code.
///
/// # Safety
/// The C contract of ppoll(2); `fdslen` is the array's real size in bytes.
#[no_mangle]
pub unsafe extern "C" fn __ppoll_chk(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    tmo: *const libc::timespec,
    mask: *const libc::sigset_t,
    fdslen: size_t,
) -> c_int {
    let need = usize::try_from(n)
        .unwrap_or(usize::MAX)
        .saturating_mul(std::mem::size_of::<libc::pollfd>());
    if need > fdslen {
        chk_fail();
    }
    // SAFETY: same contract as ppoll.
    unsafe { ppoll(fds, n, tmo, mask) }
}

/// ppoll(2).
///
/// # Safety
/// The C contract of ppoll(2).
#[no_mangle]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    tmo: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().ppoll)(fds, n, tmo, mask) };
    enter(
        || {
            // SAFETY: fds/n is the caller's pollfd array (ppoll(2)).
            let pfds = unsafe { pollfds(fds, n) };
            let Some(socks) = wait::accelerated(pfds) else {
                return real();
            };
            // SAFETY: tmo is null or the caller's timespec (ppoll(2)).
            let t = unsafe { timespec_timeout(tmo) };
            let sleep =
                |set: &mut [libc::pollfd], rem: Option<Duration>| real_ppoll(set, rem, mask);
            wait::poll(pfds, &socks, t, true, &sleep::real_poll, &sleep)
        },
        real,
    )
}

/// Runs select/pselect through the poll path when an accelerated socket is
/// among the sets; None: hand the call to libc.
///
/// # Safety
/// The fd_set pointers are null or the caller's sets, valid for `nfds` fds.
unsafe fn select_via_poll(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: Option<Duration>,
    sleep: &dyn Fn(&mut [libc::pollfd], Option<Duration>) -> c_int,
) -> Option<c_int> {
    let nfds = nfds.clamp(0, c_int::try_from(libc::FD_SETSIZE).unwrap_or(1024));
    // SAFETY: each set is null or valid for nfds fds (caller).
    let isset =
        |set: *mut libc::fd_set, fd: c_int| !set.is_null() && unsafe { libc::FD_ISSET(fd, set) };
    let mut pfds = Vec::new();
    for fd in 0..nfds {
        let mut ev = 0;
        if isset(r, fd) {
            ev |= libc::POLLIN;
        }
        if isset(w, fd) {
            ev |= libc::POLLOUT;
        }
        if isset(e, fd) {
            ev |= libc::POLLPRI;
        }
        if ev != 0 {
            pfds.push(libc::pollfd {
                fd,
                events: ev,
                revents: 0,
            });
        }
    }
    let socks = wait::accelerated(&pfds)?;
    let n = wait::poll(&mut pfds, &socks, timeout, true, &sleep::real_poll, sleep);
    if n < 0 {
        return Some(-1);
    }
    // Clear the caller's bits below nfds only: its fd_set may be sized for
    // nfds, not for FD_SETSIZE.
    for set in [r, w, e] {
        if set.is_null() {
            continue;
        }
        for fd in 0..nfds {
            // SAFETY: set is the caller's fd_set, valid for nfds fds.
            unsafe { libc::FD_CLR(fd, set) };
        }
    }
    let mut count = 0;
    if pfds.iter().any(|p| p.revents & libc::POLLNVAL != 0) {
        set_errno(libc::EBADF);
        return Some(-1);
    }
    for p in &pfds {
        // Only in the sets the fd was asked for (its events say which).
        let asked_r = p.events & libc::POLLIN != 0;
        let asked_w = p.events & libc::POLLOUT != 0;
        let asked_e = p.events & libc::POLLPRI != 0;
        let bits = [
            (
                r,
                asked_r && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0,
            ),
            (
                w,
                asked_w && p.revents & (libc::POLLOUT | libc::POLLERR) != 0,
            ),
            (e, asked_e && p.revents & libc::POLLPRI != 0),
        ];
        for (set, on) in bits {
            if on && !set.is_null() {
                // SAFETY: set is the caller's fd_set and p.fd < nfds <= FD_SETSIZE.
                unsafe { libc::FD_SET(p.fd, set) };
                count += 1;
            }
        }
    }
    Some(count)
}

/// select(2). The timeout is left as the caller passed it.
///
/// # Safety
/// The C contract of select(2).
#[no_mangle]
pub unsafe extern "C" fn select(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    tv: *mut libc::timeval,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().select)(nfds, r, w, e, tv) };
    enter(
        || {
            // SAFETY: tv is null or the caller's timeval (select(2)).
            let t = unsafe { tv.as_ref() }.map(|t| {
                Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                    + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
            });
            let sleep = |set: &mut [libc::pollfd], rem: Option<Duration>| {
                sleep::real_poll(set, sleep::millis(rem))
            };
            // SAFETY: the sets are the caller's (select(2)).
            unsafe { select_via_poll(nfds, r, w, e, t, &sleep) }.unwrap_or_else(real)
        },
        real,
    )
}

/// pselect(2).
///
/// # Safety
/// The C contract of pselect(2).
#[no_mangle]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    tmo: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().pselect)(nfds, r, w, e, tmo, mask) };
    enter(
        || {
            // SAFETY: tmo is null or the caller's timespec (pselect(2)).
            let t = unsafe { timespec_timeout(tmo) };
            let sleep =
                |set: &mut [libc::pollfd], rem: Option<Duration>| real_ppoll(set, rem, mask);
            // SAFETY: the sets are the caller's (pselect(2)).
            unsafe { select_via_poll(nfds, r, w, e, t, &sleep) }.unwrap_or_else(real)
        },
        real,
    )
}

/// After a successful dup onto `new`: `new` names `old`'s socket, or, if
/// `old` is not accelerated, no longer names the socket it may have named.
fn duplicated(old: c_int, new: c_int) -> c_int {
    if new >= 0 && new != old {
        fds::duplicated_onto(new);
        match table::get(old) {
            Some(_) => table::duplicate(old, new),
            None => drop(table::remove(new)),
        }
        epoll::duplicated(old, new);
    }
    new
}

/// dup(2).
///
/// # Safety
/// The C contract of dup(2).
#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: forwarding the caller's own argument to libc.
    let real = || unsafe { (real::get().dup)(fd) };
    enter(|| duplicated(fd, real()), real)
}

/// dup2(2).
///
/// # Safety
/// The C contract of dup2(2).
#[no_mangle]
pub unsafe extern "C" fn dup2(fd: c_int, new: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().dup2)(fd, new) };
    enter(|| duplicated(fd, real()), real)
}

/// dup3(2).
///
/// # Safety
/// The C contract of dup3(2).
#[no_mangle]
pub unsafe extern "C" fn dup3(fd: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().dup3)(fd, new, flags) };
    enter(|| duplicated(fd, real()), real)
}

/// fcntl(2): F_DUPFD and F_DUPFD_CLOEXEC duplicate an accelerated socket;
/// every other command goes to the kernel socket (O_NONBLOCK set there is
/// what the shim reads).
///
/// fcntl is variadic and stable Rust cannot define variadic functions.
/// Its optional argument is one int or pointer, which the x86_64 SysV ABI
/// passes in the same register for variadic and fixed calls (devd and the
/// rings are x86_64-only too), so `arg` receives it; for commands without
/// one it holds whatever the register held and is passed on unused.
///
/// # Safety
/// The C contract of fcntl(2).
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: libc::c_long) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc's fcntl.
    let real = || unsafe { (real::get().fcntl)(fd, cmd, arg) };
    enter(
        || {
            let r = real();
            if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
                duplicated(fd, r)
            } else {
                if cmd == libc::F_SETFL && r == 0 {
                    if let Some(s) = table::get(fd) {
                        lock(&s).nonblocking =
                            libc::c_int::try_from(arg).is_ok_and(|fl| fl & libc::O_NONBLOCK != 0);
                    }
                }
                r
            }
        },
        real,
    )
}

/// ioctl(2): FIONREAD and SIOCOUTQ report an accelerated socket's ring;
/// everything else (FIONBIO included: it sets O_NONBLOCK on the kernel
/// socket, which is what the shim reads) goes to the kernel socket. Same
/// fixed-argument convention as `fcntl`.
///
/// # Safety
/// The C contract of ioctl(2).
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: libc::c_ulong, arg: *mut c_void) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc's ioctl.
    let real = || unsafe { (real::get().ioctl)(fd, req, arg) };
    enter(
        || {
            let which = match req {
                libc::FIONREAD => 0,
                libc::TIOCOUTQ => 1,
                libc::FIONBIO => {
                    let r = real();
                    if r == 0 && !arg.is_null() {
                        if let Some(s) = table::get(fd) {
                            // SAFETY: for FIONBIO, arg is the caller's int*,
                            // which the kernel just read.
                            lock(&s).nonblocking = unsafe { *arg.cast::<c_int>() } != 0;
                        }
                    }
                    return r;
                }
                _ => return real(),
            };
            dispatch(
                fd,
                |s| {
                    if arg.is_null() {
                        return Outcome::Errno(libc::EFAULT);
                    }
                    // SAFETY: fd is open during this call.
                    let pending = lock(s).pending(unsafe { borrow(fd) });
                    pending.map(|(unread, unsent)| {
                        let v = if which == 0 { unread } else { unsent };
                        // SAFETY: for FIONREAD/SIOCOUTQ, arg is the caller's int* (ioctl(2)).
                        unsafe { *arg.cast::<c_int>() = c_int::try_from(v).unwrap_or(c_int::MAX) };
                        0
                    })
                },
                real,
            )
        },
        real,
    )
}

/// fcntl64: glibc's large-file name for fcntl.
///
/// # Safety
/// The C contract of fcntl(2).
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: libc::c_long) -> c_int {
    // SAFETY: same contract as fcntl.
    unsafe { fcntl(fd, cmd, arg) }
}

/// shutdown(2).
///
/// # Safety
/// The C contract of shutdown(2).
#[no_mangle]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().shutdown)(fd, how) };
    enter(
        || {
            dispatch(
                fd,
                // SAFETY: fd is open during this call.
                |s| lock(s).shutdown(unsafe { borrow(fd) }, how).map(|()| 0),
                real,
            )
        },
        real,
    )
}

/// close(2): an accelerated socket first ends its transport (end-of-stream
/// mark, release), then the kernel socket closes.
///
/// # Safety
/// The C contract of close(2).
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    // SAFETY: forwarding the caller's own argument to libc.
    let real = || unsafe { (real::get().close)(fd) };
    enter(|| fds::close(fd, &real), || fds::close_own(fd, &real))
}

/// close_range(2): the shim's own fds stay open (see `fds`).
///
/// # Safety
/// The C contract of close_range(2).
#[no_mangle]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's arguments (or a part of its range) to libc.
    let real = |a, b, f| unsafe { real::close_range(a, b, f) };
    enter(
        || fds::close_range(first, last, flags, &real),
        || fds::close_range_own(first, last, flags, &real),
    )
}

/// closefrom(3): close_range(lowfd, ~0U, 0), the shim's own fds staying open.
///
/// # Safety
/// The C contract of closefrom(3).
#[no_mangle]
pub unsafe extern "C" fn closefrom(lowfd: c_int) {
    let first = c_uint::try_from(lowfd).unwrap_or(0);
    // SAFETY: forwarding a part of the caller's range to libc.
    let real = |a, b, f| unsafe { real::close_range(a, b, f) };
    enter(
        || fds::close_range(first, c_uint::MAX, 0, &real),
        || fds::close_range_own(first, c_uint::MAX, 0, &real),
    );
}

/// The fds an SCM_RIGHTS message carries.
///
/// # Safety
/// `msg` is null or a valid msghdr whose control buffer holds
/// `msg_controllen` initialised bytes.
unsafe fn rights(msg: *const libc::msghdr) -> Vec<c_int> {
    let mut fds = Vec::new();
    if msg.is_null() {
        return fds;
    }
    // SAFETY: msg is valid (caller).
    let m = unsafe { &*msg };
    if m.msg_control.is_null() || m.msg_controllen == 0 {
        return fds;
    }
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the caller's control buffer
    // within msg_controllen; CMSG_DATA of an SCM_RIGHTS header points at
    // its ints, read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let head = data.offset_from(c.cast::<u8>()).unsigned_abs();
                // Within the control buffer, whatever cmsg_len claims.
                let start = c
                    .cast::<u8>()
                    .offset_from(m.msg_control.cast::<u8>())
                    .unsigned_abs();
                let len = h.cmsg_len.min(m.msg_controllen.saturating_sub(start));
                let n = len.saturating_sub(head) / std::mem::size_of::<c_int>();
                for i in 0..n {
                    fds.push(data.cast::<c_int>().add(i).read_unaligned());
                }
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    fds
}

/// The accelerated sockets an outgoing message passes (SCM_RIGHTS).
///
/// # Safety
/// As for `rights`.
unsafe fn passed_socks(msg: *const libc::msghdr) -> Vec<Entry> {
    // SAFETY: guaranteed by the caller.
    let fds = unsafe { rights(msg) };
    fds.into_iter().filter_map(table::get).collect()
}

/// Takes over the accelerated sockets a received message passed.
///
/// # Safety
/// As for `rights`, after a successful recvmsg.
unsafe fn adopt_passed(msg: *const libc::msghdr) {
    // SAFETY: guaranteed by the caller.
    for fd in unsafe { rights(msg) } {
        adopt(fd);
    }
}

/// `fd` arrived without negotiation: take it over if it is accelerated.
fn adopt(fd: c_int) {
    // SAFETY: fd was just received or inherited, and is open.
    match sock::inherited(unsafe { borrow(fd) }) {
        sock::Inherited::Conn(s) => table::insert(fd, s),
        sock::Inherited::Listener => {
            table::add_listener(fd);
            drop(table::remove(fd));
        }
        sock::Inherited::Plain => drop(table::remove(fd)),
    }
}

/// At load time (the library's constructor): sockets inherited across
/// exec are taken over.
pub(crate) fn inherit_at_load() {
    enter(
        || {
            logging::init();
            if sock::disabled() {
                return 0;
            }
            let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
                return 0;
            };
            let fds: Vec<c_int> = dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            let mut seen: Vec<(Option<u64>, c_int)> = Vec::new();
            for fd in fds {
                // The directory's own fd is in the list, closed by now.
                // SAFETY: F_GETFD on any number only reads its flags.
                if unsafe { (real::get().fcntl)(fd, libc::F_GETFD) } < 0 {
                    continue;
                }
                // SAFETY: fd is open (just checked) and stays so: nothing
                // else runs in this process yet.
                let b = unsafe { borrow(fd) };
                if ssock_rings::sys::socket_type(b).is_err() {
                    continue;
                }
                // Several fds of one socket (dup2 onto 0 and 1, inetd
                // style) are one socket here too: taken over once.
                let inode = ssock_rings::sys::socket_inode(b).ok();
                match seen.iter().find(|(i, _)| inode.is_some() && *i == inode) {
                    Some((_, first)) => table::duplicate(*first, fd),
                    None => {
                        adopt(fd);
                        seen.push((inode, fd));
                    }
                }
            }
            0
        },
        || 0,
    );
}

/// pthread_atfork prepare handler (registered by `real`'s constructor).
extern "C" fn before_fork() {
    epoll::before_fork();
    table::before_fork();
}

/// pthread_atfork parent handler: unlocks what the prepare handler locked.
extern "C" fn after_fork_in_parent() {
    let held = table::after_fork(false);
    epoll::after_fork(false);
    drop_as_shim(held);
}

/// Drops the references the prepare handler took, once every lock is
/// released, as the shim (the fds a last reference closes go to libc).
fn drop_as_shim(held: Vec<sock::Entry>) {
    let mut held = Some(held);
    boundary::enter(
        || {
            drop(held.take());
            0i8
        },
        || 0,
    );
    drop(held);
}

/// pthread_atfork child handler: the child stops using the parent's devd
/// session (first: nothing below may talk to devd on it), then unlocks
/// what the prepare handler locked. The session is dropped as the shim
/// (`boundary::enter`): closing its socket must go to libc, not to the
/// shim's close, which would wait for the listener set still locked here
/// (a child forked when nothing but the shim held the session hung).
extern "C" fn after_fork_in_child() {
    fn forget_session() -> i8 {
        ssock_client::Session::after_fork_in_child();
        0
    }
    boundary::enter(forget_session, forget_session);
    let held = table::after_fork(true);
    epoll::after_fork(true);
    drop_as_shim(held);
}

/// epoll_create(2).
///
/// # Safety
/// The C contract of epoll_create(2).
#[no_mangle]
pub unsafe extern "C" fn epoll_create(size: c_int) -> c_int {
    // SAFETY: forwarding the caller's own argument to libc.
    let real = || unsafe { (real::get().epoll_create)(size) };
    enter(
        || {
            let r = real();
            epoll::created(r);
            r
        },
        real,
    )
}

/// epoll_create1(2).
///
/// # Safety
/// The C contract of epoll_create1(2).
#[no_mangle]
pub unsafe extern "C" fn epoll_create1(flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's own argument to libc.
    let real = || unsafe { (real::get().epoll_create1)(flags) };
    enter(
        || {
            let r = real();
            epoll::created(r);
            r
        },
        real,
    )
}

/// epoll_ctl(2): accelerated sockets and nested shim instances are kept by
/// the shim, everything else by the kernel.
///
/// # Safety
/// The C contract of epoll_ctl(2).
#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    ev: *mut libc::epoll_event,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().epoll_ctl)(epfd, op, fd, ev) };
    enter(
        || match epoll::ctl(epfd, op, fd, ev, &real) {
            Ok(r) => r,
            Err(e) => fail(e),
        },
        real,
    )
}

/// The shared part of the epoll_wait family: Some(result) if `epfd` has
/// shim members, None to hand the call to libc.
///
/// # Safety
/// `events`/`max` are the caller's epoll_wait(2) arguments.
unsafe fn epoll_wait_via_shim(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: Option<Duration>,
    kernel_wait: &dyn Fn(&mut [libc::epoll_event], Option<Duration>) -> c_int,
    sleep: &dyn Fn(&mut [libc::pollfd], Option<Duration>) -> c_int,
) -> Option<c_int> {
    let set = epoll::get(epfd)?;
    let Ok(n) = usize::try_from(max) else {
        return Some(fail(libc::EINVAL));
    };
    if n == 0 {
        return Some(fail(libc::EINVAL));
    }
    if events.is_null() {
        return Some(fail(libc::EFAULT));
    }
    // SAFETY: the caller's array of `max` epoll_event (epoll_wait(2)).
    let out = unsafe { std::slice::from_raw_parts_mut(events, n) };
    if set.has_members() {
        Some(epoll::wait(epfd, &set, out, timeout, sleep))
    } else {
        Some(epoll::wait_direct(
            epfd,
            &set,
            out,
            timeout,
            kernel_wait,
            sleep,
        ))
    }
}

/// A millisecond timeout argument (negative: none).
fn ms_timeout(timeout: c_int) -> Option<Duration> {
    u64::try_from(timeout).ok().map(Duration::from_millis)
}

/// A timespec timeout argument (null: none).
///
/// # Safety
/// `tmo` is null or points to a valid timespec.
unsafe fn timespec_timeout(tmo: *const libc::timespec) -> Option<Duration> {
    // SAFETY: guaranteed by the caller.
    unsafe { tmo.as_ref() }.map(|t| {
        Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        )
    })
}

/// epoll_wait(2).
///
/// # Safety
/// The C contract of epoll_wait(2).
#[no_mangle]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().epoll_wait)(epfd, events, max, timeout) };
    enter(
        || {
            let sleep = |set: &mut [libc::pollfd], rem: Option<Duration>| {
                sleep::real_poll(set, sleep::millis(rem))
            };
            let kernel = |out: &mut [libc::epoll_event], rem: Option<Duration>| {
                let n = c_int::try_from(out.len()).unwrap_or(c_int::MAX);
                // SAFETY: out is the caller's event array (at most its max).
                unsafe { (real::get().epoll_wait)(epfd, out.as_mut_ptr(), n, sleep::millis(rem)) }
            };
            // SAFETY: the caller's epoll_wait arguments.
            unsafe { epoll_wait_via_shim(epfd, events, max, ms_timeout(timeout), &kernel, &sleep) }
                .unwrap_or_else(real)
        },
        real,
    )
}

/// epoll_pwait(2).
///
/// # Safety
/// The C contract of epoll_pwait(2).
#[no_mangle]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    mask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().epoll_pwait)(epfd, events, max, timeout, mask) };
    enter(
        || {
            let sleep =
                |set: &mut [libc::pollfd], rem: Option<Duration>| real_ppoll(set, rem, mask);
            let kernel = |out: &mut [libc::epoll_event], rem: Option<Duration>| {
                let n = c_int::try_from(out.len()).unwrap_or(c_int::MAX);
                let ms = sleep::millis(rem);
                // SAFETY: out is the caller's event array (at most its max);
                // mask is the caller's.
                unsafe { (real::get().epoll_pwait)(epfd, out.as_mut_ptr(), n, ms, mask) }
            };
            // SAFETY: the caller's epoll_pwait arguments.
            unsafe { epoll_wait_via_shim(epfd, events, max, ms_timeout(timeout), &kernel, &sleep) }
                .unwrap_or_else(real)
        },
        real,
    )
}

/// epoll_pwait2(2).
///
/// # Safety
/// The C contract of epoll_pwait2(2).
#[no_mangle]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    tmo: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    let real = || match real::get().epoll_pwait2 {
        // SAFETY: forwarding the caller's own arguments to libc.
        Some(f) => unsafe { f(epfd, events, max, tmo, mask) },
        None => fail(libc::ENOSYS),
    };
    enter(
        || {
            // SAFETY: tmo is null or the caller's timespec (epoll_pwait2(2)).
            let t = unsafe { timespec_timeout(tmo) };
            let sleep =
                |set: &mut [libc::pollfd], rem: Option<Duration>| real_ppoll(set, rem, mask);
            let kernel = |out: &mut [libc::epoll_event], rem: Option<Duration>| {
                let n = c_int::try_from(out.len()).unwrap_or(c_int::MAX);
                let ts = rem.map(|d| libc::timespec {
                    tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
                    tv_nsec: libc::c_long::from(d.subsec_nanos()),
                });
                let tp = ts
                    .as_ref()
                    .map_or(std::ptr::null(), |t| t as *const libc::timespec);
                match real::get().epoll_pwait2 {
                    // SAFETY: out is the caller's event array (at most its
                    // max); tp is null or a timespec alive for the call;
                    // mask is the caller's.
                    Some(f) => unsafe { f(epfd, out.as_mut_ptr(), n, tp, mask) },
                    None => fail(libc::ENOSYS),
                }
            };
            // SAFETY: the caller's epoll_pwait2 arguments.
            unsafe { epoll_wait_via_shim(epfd, events, max, t, &kernel, &sleep) }
                .unwrap_or_else(real)
        },
        real,
    )
}

/// sendfile(2) onto an accelerated socket: the file's bytes are read and
/// sent through the ring (a copy; the kernel's page-cache splice cannot
/// reach the ring). Partial sends put the file position back as the
/// kernel's would be.
fn sendfile_via_ring(
    s: &Entry,
    out: c_int,
    input: c_int,
    offset: *mut libc::off_t,
    count: usize,
) -> Outcome<usize> {
    let mut buf = vec![0u8; count.min(256 * 1024)];
    let mut total = 0;
    // SAFETY: offset is null or the caller's off_t (sendfile(2)).
    let mut pos = unsafe { offset.as_ref() }.copied();
    // Whatever ends the call, the caller's offset says what was sent.
    let done = |pos: Option<libc::off_t>, r: Outcome<usize>| {
        if let (Some(p), false, Outcome::Done(_)) = (pos, offset.is_null(), &r) {
            // SAFETY: offset is the caller's off_t (checked non-null).
            unsafe { *offset = p };
        }
        r
    };
    while total < count {
        let want = buf.len().min(count - total);
        // SAFETY: buf is ours with `want` bytes of room; input is the
        // caller's fd (read/pread on a bad one fail with EBADF).
        let k = unsafe {
            match pos {
                Some(p) => libc::pread(input, buf.as_mut_ptr().cast(), want, p),
                None => (real::get().read)(input, buf.as_mut_ptr().cast(), want),
            }
        };
        let Ok(k) = usize::try_from(k) else {
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            let r = if total > 0 {
                Outcome::Done(total)
            } else {
                Outcome::Errno(e)
            };
            return done(pos, r);
        };
        if k == 0 {
            break;
        }
        // SAFETY: out is the caller's socket, open during this call.
        let sent = match io::send(s, unsafe { borrow(out) }, &buf[..k], 0) {
            Outcome::Done(n) => n,
            not_sent => {
                if pos.is_none() {
                    // Give back what was read and not sent.
                    let back = libc::off_t::try_from(k).unwrap_or(0);
                    // SAFETY: plain lseek on the caller's fd.
                    unsafe { libc::lseek(input, -back, libc::SEEK_CUR) };
                }
                let r = if total > 0 {
                    Outcome::Done(total)
                } else {
                    not_sent
                };
                return done(pos, r);
            }
        };
        total += sent;
        if let Some(p) = &mut pos {
            *p += libc::off_t::try_from(sent).unwrap_or(0);
        }
        if sent < k {
            if pos.is_none() {
                let back = libc::off_t::try_from(k - sent).unwrap_or(0);
                // SAFETY: plain lseek on the caller's fd.
                unsafe { libc::lseek(input, -back, libc::SEEK_CUR) };
            }
            break;
        }
    }
    done(pos, Outcome::Done(total))
}

/// sendfile(2).
///
/// # Safety
/// The C contract of sendfile(2).
#[no_mangle]
pub unsafe extern "C" fn sendfile(
    out: c_int,
    input: c_int,
    offset: *mut libc::off_t,
    count: size_t,
) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().sendfile)(out, input, offset, count) };
    enter(
        || {
            dispatch_n(
                out,
                |s| sendfile_via_ring(s, out, input, offset, count),
                real,
            )
        },
        real,
    )
}

/// sendfile64: the same as sendfile on x86_64.
///
/// # Safety
/// The C contract of sendfile(2).
#[no_mangle]
pub unsafe extern "C" fn sendfile64(
    out: c_int,
    input: c_int,
    offset: *mut libc::off_t,
    count: size_t,
) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().sendfile64)(out, input, offset, count) };
    enter(
        || {
            dispatch_n(
                out,
                |s| sendfile_via_ring(s, out, input, offset, count),
                real,
            )
        },
        real,
    )
}

/// The caller's mmsghdr array.
///
/// # Safety
/// `v` is null or valid for `n` entries.
unsafe fn mmsgs<'a>(v: *mut libc::mmsghdr, n: libc::c_uint) -> &'a mut [libc::mmsghdr] {
    if v.is_null() || n == 0 {
        return &mut [];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut(v, usize::try_from(n).unwrap_or(0)) }
}

/// sendmmsg(2): each message is one stream write; stops at the first
/// message that does not go whole.
///
/// # Safety
/// The C contract of sendmmsg(2).
#[no_mangle]
pub unsafe extern "C" fn sendmmsg(
    fd: c_int,
    v: *mut libc::mmsghdr,
    n: libc::c_uint,
    flags: c_int,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().sendmmsg)(fd, v, n, flags) };
    enter(
        || {
            dispatch(
                fd,
                |s| {
                    // SAFETY: v/n is the caller's array (sendmmsg(2)).
                    let msgs = unsafe { mmsgs(v, n) };
                    let mut done: c_int = 0;
                    for m in msgs.iter_mut() {
                        let k = c_int::try_from(m.msg_hdr.msg_iovlen).unwrap_or(c_int::MAX);
                        // SAFETY: the message's iovecs are the caller's buffers.
                        let bufs = unsafe { iov(m.msg_hdr.msg_iov, k) };
                        let want: usize = bufs.iter().map(|b| b.len()).sum();
                        // SAFETY: fd is open during this call.
                        match io::send_vec(s, unsafe { borrow(fd) }, &bufs, flags) {
                            Outcome::Done(sent) => {
                                m.msg_len = libc::c_uint::try_from(sent).unwrap_or(0);
                                done += 1;
                                if sent < want {
                                    break;
                                }
                            }
                            Outcome::Kernel if done == 0 => return Outcome::Kernel,
                            Outcome::Errno(e) if done == 0 => return Outcome::Errno(e),
                            Outcome::Kernel | Outcome::Errno(_) => break,
                        }
                    }
                    Outcome::Done(done)
                },
                real,
            )
        },
        real,
    )
}

/// recvmmsg(2): the first message waits as recvmsg would (unless
/// nonblocking); with MSG_WAITFORONE the others take only what is there.
/// The timeout argument is not applied to accelerated sockets.
///
/// # Safety
/// The C contract of recvmmsg(2).
#[no_mangle]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    v: *mut libc::mmsghdr,
    n: libc::c_uint,
    flags: c_int,
    tmo: *mut libc::timespec,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().recvmmsg)(fd, v, n, flags, tmo) };
    enter(
        || {
            dispatch(
                fd,
                |s| {
                    // SAFETY: v/n is the caller's array (recvmmsg(2)).
                    let msgs = unsafe { mmsgs(v, n) };
                    let mut done: c_int = 0;
                    let base = flags & !libc::MSG_WAITFORONE;
                    for m in msgs.iter_mut() {
                        let f = if done > 0 && flags & libc::MSG_WAITFORONE != 0 {
                            base | libc::MSG_DONTWAIT
                        } else {
                            base
                        };
                        let k = c_int::try_from(m.msg_hdr.msg_iovlen).unwrap_or(c_int::MAX);
                        // SAFETY: the message's iovecs are the caller's buffers.
                        let mut bufs = unsafe { iov_mut(m.msg_hdr.msg_iov, k) };
                        // SAFETY: fd is open during this call.
                        match io::recv_vec(s, unsafe { borrow(fd) }, &mut bufs, f) {
                            Outcome::Done(got) => {
                                m.msg_len = libc::c_uint::try_from(got).unwrap_or(0);
                                m.msg_hdr.msg_namelen = 0;
                                m.msg_hdr.msg_controllen = 0;
                                m.msg_hdr.msg_flags = 0;
                                done += 1;
                                if got == 0 {
                                    break;
                                }
                            }
                            Outcome::Kernel if done == 0 => return Outcome::Kernel,
                            Outcome::Errno(e) if done == 0 => return Outcome::Errno(e),
                            Outcome::Kernel | Outcome::Errno(_) => break,
                        }
                    }
                    Outcome::Done(done)
                },
                real,
            )
        },
        real,
    )
}

/// vfork(2), served as fork(2): the fork handlers must run so that the
/// child's hold on each accelerated socket is counted (a vfork child that
/// execs inherits the sockets). Costs a page-table copy, nothing else.
///
/// # Safety
/// The C contract of vfork(2) (which fork(2) satisfies).
#[no_mangle]
pub unsafe extern "C" fn vfork() -> libc::pid_t {
    // SAFETY: fork has no memory preconditions; its handlers are ours.
    unsafe { libc::fork() }
}

/// posix_spawn and posix_spawnp: the new program inherits the accelerated
/// sockets without FD_CLOEXEC (and takes them over when it loads the
/// shim), so each gets a hold first, as at fork; taken back if the spawn
/// fails. (A file action that closes one leaves an extra hold: the stream
/// then ends through the kernel socket's FIN, still an end of stream.)
fn spawn_holding(spawn: impl FnOnce() -> c_int) -> c_int {
    let held = table::inheritable();
    for s in &held {
        lock(s).fork_hold();
    }
    let r = spawn();
    if r != 0 {
        for s in &held {
            lock(s).drop_hold();
        }
    }
    r
}

/// posix_spawn(3).
///
/// # Safety
/// The C contract of posix_spawn(3).
#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const libc::c_char,
    acts: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().posix_spawn)(pid, path, acts, attr, argv, envp) };
    enter(|| spawn_holding(real), real)
}

/// posix_spawnp(3).
///
/// # Safety
/// The C contract of posix_spawnp(3).
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const libc::c_char,
    acts: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().posix_spawnp)(pid, file, acts, attr, argv, envp) };
    enter(|| spawn_holding(real), real)
}

/// getsockopt(2): SO_ERROR of an accelerated socket reports a reset of
/// its rings (once, as the kernel's pending error); everything else is
/// the kernel socket's (SO_RCVBUF, TCP_NODELAY, TCP_INFO...).
///
/// # Safety
/// The C contract of getsockopt(2).
#[no_mangle]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().getsockopt)(fd, level, name, val, len) };
    enter(
        || {
            if level != libc::SOL_SOCKET || name != libc::SO_ERROR {
                return real();
            }
            let Some(s) = table::get(fd) else {
                return real();
            };
            // SAFETY: fd is open during this call.
            let Some(e) = lock(&s).so_error(unsafe { borrow(fd) }) else {
                return real();
            };
            // SAFETY: len is null or the caller's socklen_t (getsockopt(2)).
            let room = unsafe { len.as_ref() }.copied().unwrap_or(0);
            if val.is_null() || usize::try_from(room).unwrap_or(0) < std::mem::size_of::<c_int>() {
                return fail(libc::EINVAL);
            }
            // SAFETY: val has room for an int (checked); len is valid.
            unsafe {
                *val.cast::<c_int>() = e;
                *len = socklen_t::try_from(std::mem::size_of::<c_int>()).unwrap_or(4);
            }
            0
        },
        real,
    )
}

/// splice(2): an accelerated socket has no kernel buffer to splice from or
/// to, so it is refused with EINVAL (the kernel's answer for an fd that
/// does not support splicing), which programs take as "use read/write".
///
/// # Safety
/// The C contract of splice(2).
#[no_mangle]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut libc::loff_t,
    fd_out: c_int,
    off_out: *mut libc::loff_t,
    len: size_t,
    flags: libc::c_uint,
) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().splice)(fd_in, off_in, fd_out, off_out, len, flags) };
    enter(
        || {
            if table::get(fd_in).is_some() || table::get(fd_out).is_some() {
                // Counted in devd's totals (ringstat: unsupported).
                ssock_client::negotiate::report(
                    ssock_client::Session::global().as_ref(),
                    ssock_client::FallbackReason::Unsupported,
                );
                fail(libc::EINVAL)
            } else {
                real()
            }
        },
        real,
    )
}

/// Runs an exec: the holds of accelerated sockets whose every fd closes at
/// exec (FD_CLOEXEC) go with this image (the new one will not have them),
/// and come back if the exec fails. Sockets that survive exec keep their
/// hold: the new image takes them over without adding one.
fn exec_releasing(exec: impl FnOnce() -> c_int) -> c_int {
    let closing = table::closing_at_exec();
    for s in &closing {
        lock(s).drop_hold();
    }
    let r = exec();
    let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    for s in &closing {
        lock(s).fork_hold();
    }
    set_errno(e);
    r
}

/// execve(2).
///
/// # Safety
/// The C contract of execve(2).
#[no_mangle]
pub unsafe extern "C" fn execve(
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().execve)(path, argv, envp) };
    enter(|| exec_releasing(real), real)
}

/// execv(3).
///
/// # Safety
/// The C contract of execv(3).
#[no_mangle]
pub unsafe extern "C" fn execv(
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().execv)(path, argv) };
    enter(|| exec_releasing(real), real)
}

/// execvp(3).
///
/// # Safety
/// The C contract of execvp(3).
#[no_mangle]
pub unsafe extern "C" fn execvp(
    file: *const libc::c_char,
    argv: *const *const libc::c_char,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().execvp)(file, argv) };
    enter(|| exec_releasing(real), real)
}

/// execvpe(3).
///
/// # Safety
/// The C contract of execvpe(3).
#[no_mangle]
pub unsafe extern "C" fn execvpe(
    file: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().execvpe)(file, argv, envp) };
    enter(|| exec_releasing(real), real)
}
