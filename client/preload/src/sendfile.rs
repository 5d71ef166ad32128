//! sendfile and sendfile64 onto an accelerated socket: the file's bytes
//! are read and sent through the ring (a copy: the kernel's page-cache
//! splice cannot reach the ring), with the offset or file position left
//! as the kernel's would be after a partial send. Any other destination
//! goes to libc.
//!
//! Never here: reading more of the file than one chunk ahead of what was
//! sent (what was read and not sent is given back).

use crate::boundary::borrow;
use crate::boundary::enter;
use crate::dispatch::dispatch_n;
use crate::outcome::Outcome;
use crate::sock::Entry;
use crate::{io, real};
use libc::{c_int, size_t, ssize_t};

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
    // A pipe or a socket to read from: this kernel's sendfile says EINVAL
    // (it reads only what can be spliced from a file), before taking
    // anything from it.
    if input < 0 {
        return Outcome::Errno(libc::EBADF);
    }
    // SAFETY: input is the fd number the caller passed, not -1 (checked);
    // one it never opened or closed meanwhile fails fstat with EBADF.
    match ssock_rings::sys::fstat(unsafe { borrow(input) }) {
        Ok(st) if matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK) => {
            return Outcome::Errno(libc::EINVAL);
        }
        Err(e) => return Outcome::Errno(e.raw_os_error().unwrap_or(libc::EBADF)),
        Ok(_) => {}
    }
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
pub unsafe fn sendfile(
    out: c_int,
    input: c_int,
    offset: *mut libc::off_t,
    count: size_t,
) -> ssize_t {
    // SAFETY: the caller's own arguments, and libc's sendfile.
    unsafe { sendfile_or(real::get().sendfile, out, input, offset, count) }
}

/// The accelerated socket's sendfile, or `real`'s for any other fd.
///
/// # Safety
/// The C contract of sendfile(2); `real` is libc's sendfile or sendfile64.
unsafe fn sendfile_or(
    real: unsafe extern "C" fn(c_int, c_int, *mut libc::off_t, size_t) -> ssize_t,
    out: c_int,
    input: c_int,
    offset: *mut libc::off_t,
    count: size_t,
) -> ssize_t {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { real(out, input, offset, count) };
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
pub unsafe fn sendfile64(
    out: c_int,
    input: c_int,
    offset: *mut libc::off_t,
    count: size_t,
) -> ssize_t {
    // SAFETY: the caller's own arguments, and libc's sendfile64.
    unsafe { sendfile_or(real::get().sendfile64, out, input, offset, count) }
}
