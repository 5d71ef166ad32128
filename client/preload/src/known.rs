//! What the shim knows of an fd number without asking the kernel, so that
//! a connection the shim leaves alone costs it no system call: a TCP
//! socket the program made with socket(2) and has not connected yet
//! (`fresh`: its connect needs no TCP_INFO question), and a socket whose
//! connect or accept the shim already left to the kernel (`plain`: a
//! connect() called again, as nonblocking programs do to learn how the
//! first one ended, goes straight to libc, and so does its epoll_ctl: it
//! never turns accelerated while its number names it).
//!
//! Each bit lives from the call that set it to the next call the shim sees
//! that makes or frees the number (socket, accept, close, close_range,
//! dup onto it, an fd received). A number freed and made again by a path
//! the shim does not see (a raw system call, io_uring) may keep a stale
//! bit. A stale `plain` only leaves a connection on kernel TCP, and its
//! epoll_ctl to the kernel unrecorded (no path makes an accelerated
//! socket on a number without clearing the bit first, and epoll
//! instances clear it when made and are looked up besides). A stale
//! `fresh` sends an Intent for a socket whose kernel connect then fails
//! (EISCONN...), and the shim releases it.
//!
//! Never here: a decision that moves bytes; only which question to skip.

use crate::fdstate::{FRESH, PLAIN};
use libc::c_int;

/// socket(2) made `fd`: fresh if it is an IPv4 or IPv6 TCP socket.
pub fn made(fd: c_int, domain: c_int, ty: c_int, protocol: c_int) {
    let tcp = matches!(domain, libc::AF_INET | libc::AF_INET6)
        && ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) == libc::SOCK_STREAM
        && matches!(protocol, 0 | libc::IPPROTO_TCP);
    if tcp {
        PLAIN.remove(fd);
        FRESH.insert(fd);
    } else {
        forget(fd);
    }
}

/// `fd` names another object from now on, or none (closed, accepted,
/// duplicated onto, received): nothing is known of it.
pub fn forget(fd: c_int) {
    ssock_rings::fdflags::clear(fd, FRESH.bit() | PLAIN.bit());
}

/// The same for every fd from `first` to `last`.
pub fn forget_within(first: u32, last: u32) {
    FRESH.remove_within(first, last);
    PLAIN.remove_within(first, last);
}

/// A connect on `fd`: whether socket(2) made it a TCP socket that nothing
/// connected since (the answer holds once: the connect under way decides).
pub fn take_fresh(fd: c_int) -> bool {
    FRESH.take(fd)
}

/// The shim left `fd`'s connection to the kernel (at connect or accept).
pub fn set_plain(fd: c_int) {
    FRESH.remove(fd);
    PLAIN.insert(fd);
}

/// Whether the shim left `fd`'s connection to the kernel.
pub fn plain(fd: c_int) -> bool {
    PLAIN.contains(fd)
}
