//! The application's calls that reach the kernel around libc's socket
//! functions: `syscall(2)` with `SYS_close` or `SYS_close_range` (libuv,
//! node's event loop, closes every fd with `syscall(SYS_close, fd)`), and
//! `chroot(2)`, after which devd's socket path no longer resolves.
//!
//! A close the shim does not see would leave its table naming a socket
//! that is gone, and the next file opened on that number would be read
//! from the dead connection's ring. Every other system call number goes
//! straight to libc's `syscall`, taking no lock and no thread-local (the
//! shim's own futex waits, through std, come here too).
//!
//! libc's `syscall` is not in the table of real functions (`real::get`,
//! a `OnceLock` whose first use may wait in a futex, which comes through
//! `syscall`): it is looked up here, once, lock-free.
//!
//! Never here: a system call the application did not make, on its path.

use crate::boundary::enter;
use crate::{fds, real};
use libc::{c_char, c_int, c_long, c_uint, c_void};
use std::sync::atomic::{AtomicPtr, Ordering};

type SyscallFn = unsafe extern "C" fn(c_long, ...) -> c_long;

static REAL_SYSCALL: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// libc's function `name`, looked up once (dlsym takes no lock of ours).
fn next(slot: &AtomicPtr<c_void>, name: &std::ffi::CStr) -> *mut c_void {
    let mut p = slot.load(Ordering::Acquire);
    if p.is_null() {
        // SAFETY: RTLD_NEXT with a NUL-terminated name is dlsym's
        // documented use.
        p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        assert!(!p.is_null(), "libssock: libc has no {name:?}");
        slot.store(p, Ordering::Release);
    }
    p
}

/// libc's syscall(2) with six arguments (it reads six registers whatever
/// the caller passed, as the kernel's system call convention does).
///
/// # Safety
/// The C contract of syscall(2) for system call `n`.
unsafe fn real_syscall(n: c_long, a: [c_long; 6]) -> c_long {
    // SAFETY: the pointer is libc's `syscall`, whose C type is exactly
    // SyscallFn.
    let f =
        unsafe { std::mem::transmute::<*mut c_void, SyscallFn>(next(&REAL_SYSCALL, c"syscall")) };
    // SAFETY: guaranteed by the caller.
    unsafe { f(n, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

/// The low 32 bits of a register argument: what the kernel reads of an
/// `unsigned int` or `int` parameter.
fn low32(v: c_long) -> c_uint {
    c_uint::try_from(v & 0xffff_ffff).unwrap_or(0)
}

/// The same bits as a C int.
fn as_int(v: c_uint) -> c_int {
    c_int::from_ne_bytes(v.to_ne_bytes())
}

/// syscall(2). Defined with six fixed arguments: on x86_64 a variadic
/// call passes them in the same registers and stack slot, and a caller
/// that passed fewer leaves values there that the system call ignores, as
/// libc's own `syscall` reads all six.
///
/// # Safety
/// The C contract of syscall(2) for system call `n`.
pub unsafe fn syscall(
    n: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    let args = [a1, a2, a3, a4, a5, a6];
    match n {
        libc::SYS_close => {
            // The kernel takes the fd as an unsigned int.
            let fd = as_int(low32(a1));
            // SAFETY: the caller's own system call.
            let real = || c_int::try_from(unsafe { real_syscall(n, args) }).unwrap_or(-1);
            c_long::from(enter(
                || fds::close_app(fd, &real),
                || fds::close_own(fd, &real),
            ))
        }
        libc::SYS_close_range => {
            let (first, last, flags) = (low32(a1), low32(a2), as_int(low32(a3)));
            let real = |a: c_uint, b: c_uint, f: c_int| {
                let part = [c_long::from(a), c_long::from(b), c_long::from(f), 0, 0, 0];
                // SAFETY: the caller's close_range, or a part of its range.
                c_int::try_from(unsafe { real_syscall(n, part) }).unwrap_or(-1)
            };
            c_long::from(enter(
                || fds::close_range_app(first, last, flags, &real),
                || fds::close_range_own(first, last, flags, &real),
            ))
        }
        // SAFETY: the caller's own system call, forwarded as it came.
        _ => unsafe { real_syscall(n, args) },
    }
}

/// chroot(2): the process's devd session is made first (if it has none),
/// while devd's socket path still resolves; a server that chroots its
/// workers (haproxy) keeps them accelerated.
///
/// # Safety
/// The C contract of chroot(2).
pub unsafe fn chroot(path: *const c_char) -> c_int {
    // SAFETY: forwarding the caller's own argument to libc.
    let real = || unsafe { (real::get().chroot)(path) };
    enter(
        || {
            crate::sock::connect_session();
            real()
        },
        real,
    )
}
