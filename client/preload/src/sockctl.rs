//! The calls that ask about or change a socket without moving its bytes:
//! shutdown, getsockopt (SO_ERROR), getpeername (ENOTCONN once the
//! connection is over), fcntl (F_DUPFD, F_SETFL), ioctl
//! (FIONREAD, SIOCOUTQ, FIONBIO), and splice (refused on an accelerated
//! socket). Everything they do not answer from the rings goes to the
//! kernel socket.
//!
//! Never here: reading or writing the socket's bytes.

use crate::boundary::{borrow, enter};
use crate::dispatch::{dispatch, fail};
use crate::outcome::Outcome;
use crate::sock::lock;
use crate::{fds, real, table};
use libc::{c_int, c_void, size_t, socklen_t, ssize_t};

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
pub unsafe fn fcntl(fd: c_int, cmd: c_int, arg: libc::c_long) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc's fcntl.
    let real = || unsafe { (real::get().fcntl)(fd, cmd, arg) };
    // Neither a new fd number nor an accelerated socket: libc's alone.
    if cmd != libc::F_DUPFD && cmd != libc::F_DUPFD_CLOEXEC && crate::fdstate::kernel_io(fd) {
        return real();
    }
    enter(
        || {
            let r = real();
            if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
                fds::duplicated(fd, r)
            } else {
                if cmd == libc::F_SETFL && r == 0 {
                    if let Some(s) = table::get(fd) {
                        // The kernel reads the low 32 bits of the
                        // register (a variadic int's upper half is
                        // unspecified).
                        let fl = arg & 0xffff_ffff;
                        lock(&s).nonblocking = fl & libc::c_long::from(libc::O_NONBLOCK) != 0;
                    }
                }
                r
            }
        },
        real,
    )
}

/// fcntl64: glibc's large-file name for fcntl.
///
/// # Safety
/// The C contract of fcntl(2).
pub unsafe fn fcntl64(fd: c_int, cmd: c_int, arg: libc::c_long) -> c_int {
    // SAFETY: same contract as fcntl.
    unsafe { fcntl(fd, cmd, arg) }
}

/// ioctl(2): FIONREAD and SIOCOUTQ report an accelerated socket's ring;
/// everything else (FIONBIO included: it sets O_NONBLOCK on the kernel
/// socket, which is what the shim reads) goes to the kernel socket. Same
/// fixed-argument convention as `fcntl`.
///
/// # Safety
/// The C contract of ioctl(2).
pub unsafe fn ioctl(fd: c_int, req: libc::c_ulong, arg: *mut c_void) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc's ioctl.
    let real = || unsafe { (real::get().ioctl)(fd, req, arg) };
    // No accelerated socket: libc's alone, without entering the shim.
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
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

/// shutdown(2).
///
/// # Safety
/// The C contract of shutdown(2).
pub unsafe fn shutdown(fd: c_int, how: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().shutdown)(fd, how) };
    // No accelerated socket: libc's alone, without entering the shim.
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
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

/// getsockopt(2): SO_ERROR of an accelerated socket reports a reset of
/// its rings (once, as the kernel's pending error); everything else is
/// the kernel socket's (SO_RCVBUF, TCP_NODELAY, TCP_INFO...).
///
/// # Safety
/// The C contract of getsockopt(2).
pub unsafe fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().getsockopt)(fd, level, name, val, len) };
    // No accelerated socket: libc's alone, without entering the shim.
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
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

/// getpeername(2): an accelerated connection that is over (reset, or shut
/// down both ways with this end's bytes all taken) has no peer, as the
/// kernel's socket in TCP_CLOSE: ENOTCONN; otherwise the kernel socket's
/// answer (its kernel socket, whose bytes moved to the rings, stays
/// connected).
///
/// # Safety
/// The C contract of getpeername(2).
pub unsafe fn getpeername(fd: c_int, addr: *mut libc::sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().getpeername)(fd, addr, len) };
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
    enter(
        || {
            let Some(s) = table::get(fd) else {
                return real();
            };
            // SAFETY: fd is open during this call.
            if lock(&s).over(unsafe { borrow(fd) }) {
                return fail(libc::ENOTCONN);
            }
            real()
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
pub unsafe fn splice(
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
