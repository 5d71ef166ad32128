//! Sockets passed between processes (SCM_RIGHTS): an accelerated socket
//! a message carries gets a hold before the send (the receiver becomes a
//! holder; given back if the send fails), and an accelerated socket a
//! message brings, or a process inherits, is taken over (`adopt`). Also
//! the parsing of the SCM_RIGHTS control messages, within the caller's
//! control buffer whatever its headers claim.
//!
//! Never here: reading past `msg_controllen`, or writing to the caller's
//! message.

use crate::boundary::{borrow, set_errno};
use crate::sock::{self, lock, Entry};
use crate::table;
use libc::{c_int, ssize_t};

/// sendmsg on a kernel socket (`real`): the accelerated sockets the
/// message passes get a hold first (the receiver will hold them), given
/// back if the send fails.
///
/// # Safety
/// `msg` is null or the caller's valid msghdr (sendmsg(2)).
pub unsafe fn send_holding(msg: *const libc::msghdr, real: impl FnOnce() -> ssize_t) -> ssize_t {
    // SAFETY: msg is null or the caller's valid msghdr (our precondition).
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
}

/// recvmsg on a kernel socket (`real`): the accelerated sockets a message
/// brought are taken over.
///
/// # Safety
/// `msg` is null or the caller's valid msghdr (recvmsg(2)).
pub unsafe fn recv_adopting(msg: *mut libc::msghdr, real: impl FnOnce() -> ssize_t) -> ssize_t {
    let r = real();
    if r >= 0 {
        // SAFETY: recvmsg succeeded on the caller's msghdr.
        unsafe { adopt_passed(msg) };
    }
    r
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
pub fn adopt(fd: c_int) {
    crate::known::forget(fd);
    // SAFETY: fd was just received or inherited, and is open.
    match sock::inherited(unsafe { borrow(fd) }) {
        sock::Inherited::Conn(s) => {
            table::insert(fd, s);
            crate::stdio::check(fd);
        }
        sock::Inherited::Listener(at) => {
            table::add_listener(fd, at);
            drop(table::remove(fd));
        }
        sock::Inherited::Plain => drop(table::remove(fd)),
    }
}
