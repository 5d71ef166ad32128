//! The receive and send calls: read, recv, recvfrom, readv, recvmsg and
//! their fortified `_chk` forms, recvmmsg; write, send, sendto, writev,
//! sendmsg, sendmmsg. Each turns its C arguments into slices and funnels
//! into `io::recv` or `io::send` through `dispatch` (so an fd that is not
//! an accelerated socket goes to libc untouched); recvmsg and sendmsg on
//! kernel sockets pass through `fdpass` for the sockets they carry.
//!
//! Never here: waiting, or any socket semantics (`io` and `sock` have
//! them).

use crate::boundary::{borrow, buf, buf_mut, chk_fail, enter, iov, iov_mut};
use crate::dispatch::{dispatch, dispatch_n};
use crate::outcome::Outcome;
use crate::{fdpass, io, real};
use libc::{c_int, c_void, size_t, sockaddr as SockAddr, socklen_t, ssize_t};

/// recvfrom(2); the peer address of a connected TCP socket is not filled.
///
/// # Safety
/// The C contract of recvfrom(2).
pub unsafe fn recvfrom(
    fd: c_int,
    b: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut SockAddr,
    alen: *mut socklen_t,
) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().recvfrom)(fd, b, n, flags, addr, alen) };
    // No accelerated socket: libc's alone, without entering the shim.
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
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
pub unsafe fn recv(fd: c_int, b: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: same contract as recvfrom without an address.
    unsafe { recvfrom(fd, b, n, flags, std::ptr::null_mut(), std::ptr::null_mut()) }
}

/// read(2).
///
/// # Safety
/// The C contract of read(2).
pub unsafe fn read(fd: c_int, b: *mut c_void, n: size_t) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().read)(fd, b, n) };
    // No accelerated socket: libc's alone, without entering the shim.
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
    enter(
        || {
            dispatch_n(
                fd,
                |s| {
                    let _plain = io::PlainCall::enter();
                    // SAFETY: b/n is the caller's buffer; fd is open.
                    io::recv(s, unsafe { borrow(fd) }, unsafe { buf_mut(b, n) }, 0)
                },
                real,
            )
        },
        real,
    )
}

/// The kernel's most iovecs in one call (`UIO_MAXIOV`, `IOV_MAX`):
/// readv and writev with more fail with EINVAL, a message with more with
/// EMSGSIZE.
const UIO_MAXIOV: c_int = 1024;

/// A message's iovec count, if the kernel takes it.
fn msg_iovs(len: usize) -> Option<c_int> {
    c_int::try_from(len).ok().filter(|&n| n <= UIO_MAXIOV)
}

/// readv(2).
///
/// # Safety
/// The C contract of readv(2).
pub unsafe fn readv(fd: c_int, v: *const libc::iovec, n: c_int) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().readv)(fd, v, n) };
    // No accelerated socket: libc's alone, without entering the shim.
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
    enter(
        || {
            dispatch_n(
                fd,
                |s| {
                    if !(0..=UIO_MAXIOV).contains(&n) {
                        return Outcome::Errno(libc::EINVAL);
                    }
                    // SAFETY: v/n are the caller's iovecs (readv(2)); fd is
                    // open during this call.
                    let (fd_b, mut bufs) = unsafe { (borrow(fd), iov_mut(v, n)) };
                    let _plain = io::PlainCall::enter();
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
pub unsafe fn recvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().recvmsg)(fd, msg, flags) };
    // SAFETY: msg is the caller's msghdr (recvmsg(2)).
    let real_then_adopt = || unsafe { fdpass::recv_adopting(msg, real) };
    if flags & libc::MSG_ERRQUEUE != 0 {
        // The kernel socket's error queue, never the stream's bytes.
        return real();
    }
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
                    let Some(n) = msg_iovs(m.msg_iovlen) else {
                        return Outcome::Errno(libc::EMSGSIZE);
                    };
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
pub unsafe fn __read_chk(fd: c_int, b: *mut c_void, n: size_t, buflen: size_t) -> ssize_t {
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
pub unsafe fn __recv_chk(
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
pub unsafe fn __recvfrom_chk(
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
pub unsafe fn writev(fd: c_int, v: *const libc::iovec, n: c_int) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().writev)(fd, v, n) };
    // No accelerated socket: libc's alone, without entering the shim.
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
    enter(
        || {
            dispatch_n(
                fd,
                |s| {
                    if !(0..=UIO_MAXIOV).contains(&n) {
                        return Outcome::Errno(libc::EINVAL);
                    }
                    let _plain = io::PlainCall::enter();
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
pub unsafe fn sendmsg(fd: c_int, msg: *const libc::msghdr, flags: c_int) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().sendmsg)(fd, msg, flags) };
    // SAFETY: msg is null or the caller's valid msghdr (sendmsg(2)).
    let real_passing = || unsafe { fdpass::send_holding(msg, real) };
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
                    let Some(n) = msg_iovs(m.msg_iovlen) else {
                        return Outcome::Errno(libc::EMSGSIZE);
                    };
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
pub unsafe fn sendto(
    fd: c_int,
    b: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const SockAddr,
    alen: socklen_t,
) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().sendto)(fd, b, n, flags, addr, alen) };
    // No accelerated socket: libc's alone, without entering the shim.
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
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
pub unsafe fn send(fd: c_int, b: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: same contract as sendto without an address.
    unsafe { sendto(fd, b, n, flags, std::ptr::null(), 0) }
}

/// write(2).
///
/// # Safety
/// The C contract of write(2).
pub unsafe fn write(fd: c_int, b: *const c_void, n: size_t) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().write)(fd, b, n) };
    // No accelerated socket: libc's alone, without entering the shim.
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
    enter(
        || {
            dispatch_n(
                fd,
                |s| {
                    let _plain = io::PlainCall::enter();
                    // SAFETY: b/n is the caller's data; fd is open.
                    io::send(s, unsafe { borrow(fd) }, unsafe { buf(b, n) }, 0)
                },
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
pub unsafe fn sendmmsg(fd: c_int, v: *mut libc::mmsghdr, n: libc::c_uint, flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().sendmmsg)(fd, v, n, flags) };
    // No accelerated socket: libc's alone, without entering the shim.
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
    enter(
        || {
            dispatch(
                fd,
                |s| {
                    // SAFETY: v/n is the caller's array (sendmmsg(2)); the
                    // kernel's takes at most UIO_MAXIOV messages a call.
                    let msgs = unsafe { mmsgs(v, n.min(UIO_MAXIOV as libc::c_uint)) };
                    let mut done: c_int = 0;
                    for m in msgs.iter_mut() {
                        let Some(k) = msg_iovs(m.msg_hdr.msg_iovlen) else {
                            if done == 0 {
                                return Outcome::Errno(libc::EMSGSIZE);
                            }
                            break;
                        };
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
                            // (A later message's error is lost, as the
                            // kernel's sendmmsg drops it.)
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
pub unsafe fn recvmmsg(
    fd: c_int,
    v: *mut libc::mmsghdr,
    n: libc::c_uint,
    flags: c_int,
    tmo: *mut libc::timespec,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().recvmmsg)(fd, v, n, flags, tmo) };
    if flags & libc::MSG_ERRQUEUE != 0 {
        // The kernel socket's error queue, never the stream's bytes.
        return real();
    }
    // No accelerated socket: libc's alone, without entering the shim.
    if crate::fdstate::kernel_io(fd) {
        return real();
    }
    enter(
        || {
            dispatch(
                fd,
                |s| {
                    // SAFETY: v/n is the caller's array (recvmmsg(2)).
                    let msgs = unsafe { mmsgs(v, n) };
                    // SAFETY: fd is open during this call.
                    if let Some(e) = io::take_pending_error(s, unsafe { borrow(fd) }) {
                        return Outcome::Errno(e);
                    }
                    let mut done: c_int = 0;
                    let base = flags & !libc::MSG_WAITFORONE;
                    for m in msgs.iter_mut() {
                        let f = if done > 0 && flags & libc::MSG_WAITFORONE != 0 {
                            base | libc::MSG_DONTWAIT
                        } else {
                            base
                        };
                        let Some(k) = msg_iovs(m.msg_hdr.msg_iovlen) else {
                            if done == 0 {
                                return Outcome::Errno(libc::EMSGSIZE);
                            }
                            io::defer_error(s, libc::EMSGSIZE);
                            break;
                        };
                        // SAFETY: the message's iovecs are the caller's buffers.
                        let mut bufs = unsafe { iov_mut(m.msg_hdr.msg_iov, k) };
                        // SAFETY: fd is open during this call.
                        match io::recv_vec(s, unsafe { borrow(fd) }, &mut bufs, f) {
                            Outcome::Done(got) => {
                                m.msg_len = libc::c_uint::try_from(got).unwrap_or(0);
                                m.msg_hdr.msg_namelen = 0;
                                m.msg_hdr.msg_controllen = 0;
                                m.msg_hdr.msg_flags = 0;
                                // (At the end of the stream every message
                                // gets its 0, as the kernel's.)
                                done += 1;
                            }
                            Outcome::Kernel if done == 0 => return Outcome::Kernel,
                            Outcome::Errno(e) if done == 0 => return Outcome::Errno(e),
                            Outcome::Errno(e) => {
                                // The kernel keeps a later message's error
                                // for the socket's next call (sk_err).
                                io::defer_error(s, e);
                                break;
                            }
                            Outcome::Kernel => break,
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
