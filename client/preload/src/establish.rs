//! Where a connection becomes accelerated: connect (the Intent, then the
//! kernel's own connect), listen (the registration with devd) and accept
//! (the Claim). Each negotiates through `sock` on the application's fd and
//! records the result in the socket table; the kernel's calls are always
//! made, and what they say is what the application gets.
//!
//! Never here: reading or writing the socket's bytes, or a connect or
//! accept the application did not ask for.

use crate::boundary::{borrow, enter, sockaddr};
use crate::dispatch::fail;
use crate::{epoll, known, real, sock, table};
use libc::{c_int, sockaddr as SockAddr, socklen_t};

/// socket(2): an IPv4 or IPv6 TCP socket is remembered as fresh (`known`),
/// so that its connect need not ask the kernel what it is. Without
/// entering the shim: the shim's own sockets (a devd session) are made
/// here too and are no TCP sockets, which `known` forgets as it should.
///
/// # Safety
/// The C contract of socket(2).
pub unsafe fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let fd = unsafe { (real::get().socket)(domain, ty, protocol) };
    if fd >= 0 {
        known::made(fd, domain, ty, protocol);
    }
    fd
}

/// Whether what a connect said leaves the socket connecting or connected
/// (a later connect() on it is the kernel's alone), not failed.
fn under_way(said: c_int) -> bool {
    matches!(
        said,
        0 | libc::EINPROGRESS | libc::EALREADY | libc::EINTR | libc::EISCONN
    )
}

/// The kernel's connect, for a socket the shim leaves alone from now on
/// if it is connecting or connected.
fn connect_plain(fd: c_int, real: impl FnOnce() -> c_int) -> c_int {
    let r = real();
    if r == 0 || under_way(crate::boundary::errno()) {
        known::set_plain(fd);
    }
    r
}

/// connect(2).
///
/// # Safety
/// The C contract of connect(2).
pub unsafe fn connect(fd: c_int, addr: *const SockAddr, len: socklen_t) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().connect)(fd, addr, len) };
    enter(
        || {
            // SAFETY: addr/len are the caller's connect(2) arguments; fd is
            // the socket the caller is connecting, open during this call.
            let (dst, b) = unsafe { (sockaddr(addr, len), borrow(fd)) };
            let Some(dst) = dst else { return real() };
            if known::plain(fd) || table::get(fd).is_some() {
                // The kernel's connect is the connection's: it says
                // EALREADY, 0, EISCONN or the connect's error.
                return real();
            }
            let fresh = known::take_fresh(fd);
            match sock::connect(b, dst, fresh) {
                sock::Connect::Plain => connect_plain(fd, real),
                sock::Connect::Kept(session) => {
                    let r = connect_plain(fd, real);
                    let said = crate::boundary::errno();
                    // Counted once: a connect that found the socket
                    // connecting or connected already (a stale fresh mark)
                    // is not a new connection.
                    if r == 0 || matches!(said, libc::EINPROGRESS | libc::EINTR) {
                        session.skipped();
                        crate::boundary::set_errno(said);
                    }
                    r
                }
                sock::Connect::Done(Ok(Some((s, said)))) => {
                    table::insert(fd, s);
                    epoll::became_accelerated(fd);
                    crate::stdio::check(fd);
                    // What the kernel's connect said (EINPROGRESS...).
                    if said != 0 {
                        fail(said)
                    } else {
                        0
                    }
                }
                sock::Connect::Done(r) => {
                    // A plain connection: no stale entry may name this fd.
                    drop(table::remove(fd));
                    let said = r.err().unwrap_or(0);
                    if under_way(said) {
                        known::set_plain(fd);
                    }
                    if said != 0 {
                        fail(said)
                    } else {
                        0
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
pub unsafe fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().listen)(fd, backlog) };
    enter(
        || {
            let r = real();
            if r == 0 {
                // SAFETY: fd is the caller's listening socket, open during this call.
                if let Some(at) = sock::listened(unsafe { borrow(fd) }) {
                    table::add_listener(fd, at);
                }
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
pub unsafe fn accept4(fd: c_int, addr: *mut SockAddr, len: *mut socklen_t, flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().accept4)(fd, addr, len, flags) };
    enter(
        || {
            let m = real();
            if m < 0 {
                return m;
            }
            // A new fd: an entry under its number is stale (its socket was
            // closed by a path the shim does not see).
            drop(table::remove(m));
            known::forget(m);
            if let Some(at) = table::listener(fd) {
                // SAFETY: m was just returned by accept4 and is open; fd is
                // the caller's listener, open during this call.
                match sock::accepted(unsafe { borrow(m) }, at) {
                    Some(s) => {
                        table::insert(m, s);
                        crate::stdio::check(m);
                    }
                    None => known::set_plain(m),
                }
            } else {
                known::set_plain(m);
            }
            m
        },
        real,
    )
}

/// accept(2).
///
/// # Safety
/// The C contract of accept(2).
pub unsafe fn accept(fd: c_int, addr: *mut SockAddr, len: *mut socklen_t) -> c_int {
    // SAFETY: same contract as accept4 with no flags.
    unsafe { accept4(fd, addr, len, 0) }
}
