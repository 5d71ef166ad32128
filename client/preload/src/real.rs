//! The real libc functions, resolved once with `dlsym(RTLD_NEXT, ...)`:
//! `Real`, the table `interpose!` generates (one field per interposed call
//! that has a real function of its own). The constructor (`load`) resolves
//! them at load time; a call that arrives earlier (another library's
//! constructor) resolves them itself. The state is an atomic (`OnceLock`),
//! never a plain flag. Also `close_range` as the system call.
//!
//! Never here: any call to an interposed function's handler, or a symbol
//! looked up anywhere but after this library (`RTLD_NEXT`).

use crate::Real;
use libc::{c_int, c_void};
use std::ffi::CStr;
use std::sync::OnceLock;

static REAL: OnceLock<Real> = OnceLock::new();

/// The function `name` (NUL-terminated) in the libraries after this one;
/// null if none has it.
pub(crate) fn sym_opt(name: &'static str) -> *mut c_void {
    let name = CStr::from_bytes_with_nul(name.as_bytes()).expect("a NUL-terminated symbol name");
    // SAFETY: RTLD_NEXT with a NUL-terminated name is dlsym's documented use.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) }
}

/// As `sym_opt`, for a function libc must have.
pub(crate) fn sym(name: &'static str) -> *mut c_void {
    let p = sym_opt(name);
    assert!(
        !p.is_null(),
        "libssock: libc has no {:?}",
        name.trim_end_matches('\0')
    );
    p
}

/// Resolves every function (at most once).
pub fn get() -> &'static Real {
    REAL.get_or_init(Real::resolve)
}

/// close_range(2), as the system call (libc's wrapper is the one the
/// shim interposes).
///
/// # Safety
/// The C contract of close_range(2): the caller may close any fd in the
/// range.
pub unsafe fn close_range(first: libc::c_uint, last: libc::c_uint, flags: c_int) -> c_int {
    // SAFETY: guaranteed by the caller; the arguments are close_range's own.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    c_int::try_from(r).unwrap_or(-1)
}

#[cfg(not(target_arch = "x86_64"))]
compile_error!("libssock's fixed-argument fcntl relies on the x86_64 SysV calling convention");
