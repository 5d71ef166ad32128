//! Sockets the C library's stdio may reach. A `FILE` stream reads and
//! writes its fd through the C library's own internal calls, which no
//! preloaded library sees: stdio over an accelerated socket would put
//! bytes on the kernel socket behind the region's back (its peer takes
//! them for stray bytes and resets the connection) or wait there for
//! bytes that went into the region. So an accelerated socket named by fd
//! 0, 1 or 2 (stdin, stdout and stderr always have a stream: inherited
//! there across an exec, as inetd-style servers hand connections on,
//! duplicated there, or accepted or connected there), or handed to
//! `fdopen`, leaves the region for its kernel socket first, and the shim
//! lets the socket go (docs/protocol.md section 2.7). A socket `fdopen`
//! gets before it connects stays on kernel TCP. Counted in devd's totals
//! as `stdio`. `SSOCK_STD_FDS=accelerate` keeps sockets on fds 0 to 2
//! accelerated, for a program known to use no stdio on them.
//!
//! Never here: a guess that a program will not use stdio on a stream it
//! has.

use crate::boundary::{borrow, enter};
use crate::sock::lock;
use crate::{known, real, table};
use libc::{c_char, c_int};
use ssock_client::transport::Leave;

/// Whether sockets on fds 0 to 2 stay accelerated (`SSOCK_STD_FDS`).
fn std_fds_trusted() -> bool {
    static TRUSTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRUSTED.get_or_init(|| {
        ssock_rings::env::var_os("SSOCK_STD_FDS").is_some_and(|v| v == "accelerate")
    })
}

/// `fd` now names an accelerated socket (a connect, an accept, a dup, a
/// socket inherited or received): on 0, 1 or 2 it leaves the region.
pub fn check(fd: c_int) {
    if (0..=2).contains(&fd) && !std_fds_trusted() {
        leave(fd, "is a standard stream's fd");
    }
}

/// `fd`'s accelerated socket, if it has one, leaves the region for its
/// kernel socket, counted; `why` for the log.
fn leave(fd: c_int, why: &str) {
    let Some(s) = table::get(fd) else {
        return;
    };
    let mut g = lock(&s);
    let id = g.conn_id().unwrap_or(0);
    // SAFETY: fd names this socket, open during the caller's call.
    let left = g.leave_for_stdio(unsafe { borrow(fd) });
    drop(g);
    match left {
        Leave::Left => {
            log::info!(
                "connection {id}: fd {fd} {why}, which stdio reads and writes behind the shim: on its kernel socket from here"
            );
            ssock_client::negotiate::report(
                crate::sock::session().as_ref(),
                ssock_client::FallbackReason::Stdio,
            );
        }
        Leave::Kernel => {}
        Leave::Stays => log::warn!(
            "connection {id}: fd {fd} {why}, which stdio reads and writes behind the shim, but a Queued end stays in the region"
        ),
    }
}

/// fdopen(3): a stream over `fd`. An accelerated socket leaves the region
/// first; a TCP socket not connected yet stays on kernel TCP when it is.
///
/// # Safety
/// The C contract of fdopen(3).
pub unsafe fn fdopen(fd: c_int, mode: *const c_char) -> *mut libc::FILE {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().fdopen)(fd, mode) };
    enter(
        || {
            if table::get(fd).is_some() {
                leave(fd, "went to fdopen");
            } else if known::take_fresh(fd) {
                known::set_plain(fd);
            }
            Wrapped(real())
        },
        || Wrapped(real()),
    )
    .0
}

/// A stream pointer as `enter` wants a call's result: success (any
/// stream) at or above its 0, failure (null) below it, so that a failed
/// fdopen keeps libc's errno.
#[derive(PartialEq, PartialOrd)]
struct Wrapped(*mut libc::FILE);

impl From<i8> for Wrapped {
    fn from(v: i8) -> Self {
        // 0: an address no stream has, between null and every stream;
        // only ever compared. Below 0 (a panic in the shim): null.
        Wrapped(if v < 0 {
            std::ptr::null_mut()
        } else {
            std::ptr::without_provenance_mut(1)
        })
    }
}
