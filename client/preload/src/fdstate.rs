//! The shim's flags per fd (its bits of `ssock_rings::fdflags`), and the
//! questions an interposed call asks of them before anything else:
//! whether the shim knows nothing of the fd that
//! the call could need or change, so that the call goes straight to libc
//! (one load, without entering the shim: most calls of a program are on
//! fds that are no accelerated socket, and each cache line the shim
//! touches on them is a cost the program pays on kernel TCP).
//!
//! Never here: setting or clearing a flag for a reason (each owner does:
//! `known`, `table`, `epoll`), or a call on an fd.

use ssock_rings::fdflags::{self, Flag};

/// A TCP socket socket(2) made and nothing connected yet (`known`).
pub static FRESH: Flag = Flag::new(1);
/// A socket whose connection the shim left to the kernel (`known`).
pub static PLAIN: Flag = Flag::new(2);
/// A listener registered with devd (`table`).
pub static LISTENING: Flag = Flag::new(3);
/// An epoll instance the shim tracks (`epoll`).
pub static SET: Flag = Flag::new(4);
/// An fd added to an epoll instance the shim tracks, until closed
/// (`epoll`).
pub static REGISTERED: Flag = Flag::new(5);
/// The socket table may hold this fd (`table`): set once an entry is in,
/// cleared only while its slot is empty, so an fd without it has none.
pub static ACCEL: Flag = Flag::new(6);

/// Whether a receive, a send, an ioctl, a shutdown, a getsockopt, a
/// getpeername or an fcntl other than a duplication on `fd` is libc's alone: `fd` is no
/// accelerated socket.
pub fn kernel_io(fd: libc::c_int) -> bool {
    fdflags::of(fd) & ACCEL.bit() == 0
}

/// Whether closing `fd` needs nothing of the shim beyond forgetting what
/// `known` says of it: no accelerated socket, listener, tracked epoll
/// instance or member of one, and not ssock's own fd.
pub fn plain_close(fd: libc::c_int) -> bool {
    fdflags::of(fd) & !(FRESH.bit() | PLAIN.bit()) == 0
}

/// Whether epoll_ctl on `fd` is the kernel's alone: a socket the shim left
/// to the kernel for good (it never moves to the shim), in no instance the
/// shim tracks and not an instance itself.
pub fn kernel_member(fd: libc::c_int) -> bool {
    fdflags::of(fd) & (PLAIN.bit() | REGISTERED.bit() | SET.bit()) == PLAIN.bit()
}

/// Whether a wait on `fd` (poll, select) is the kernel's alone: no
/// accelerated socket and no epoll instance the shim tracks (one with
/// accelerated members answers from the shim).
pub fn kernel_wait(fd: libc::c_int) -> bool {
    fdflags::of(fd) & (ACCEL.bit() | SET.bit()) == 0
}

/// Whether a poll of `pfds` is the kernel's alone (`kernel_wait` for
/// each).
pub fn kernel_poll(pfds: &[libc::pollfd]) -> bool {
    pfds.iter().all(|p| kernel_wait(p.fd))
}

// Each flag its own bit, all within the shim's (checked when the shim is
// built: its unit tests never run, see its Cargo.toml).
const _: () = {
    let bits = [
        FRESH.bit(),
        PLAIN.bit(),
        LISTENING.bit(),
        SET.bit(),
        REGISTERED.bit(),
        ACCEL.bit(),
    ];
    let shim = fdflags::Flag::new(*fdflags::SHIM_BITS.end()).bit() * 2
        - fdflags::Flag::new(*fdflags::SHIM_BITS.start()).bit();
    let (mut all, mut i) = (0u8, 0);
    while i < bits.len() {
        assert!(all & bits[i] == 0, "an fd flag used twice");
        assert!(bits[i] & !shim == 0, "an fd flag outside the shim's bits");
        all |= bits[i];
        i += 1;
    }
};
