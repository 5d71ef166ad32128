//! The boundary between C callers and the shim's Rust code: a panic never
//! crosses into C (it becomes -1 with errno EIO), calls the shim makes
//! itself (through libc functions it also interposes) go straight to libc,
//! and a call that succeeds leaves errno as the caller had it (as libc's
//! wrappers do: the shim's own calls that failed on the way, a request to
//! a devd that died, must not show through).
//! Also the C arguments turned into Rust values (buffers, iovecs, pollfds,
//! a borrowed fd, a socket address) and errno.
//!
//! Never here: a decision about a call, or a Rust value that outlives the
//! C call whose arguments it borrows.

use std::cell::Cell;

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `shim` for a call from the application, or `direct` for a call the
/// shim itself made (re-entry) or when the thread is being torn down.
pub fn enter<T: From<i8> + PartialOrd>(shim: impl FnOnce() -> T, direct: impl FnOnce() -> T) -> T {
    let caller_errno = errno();
    // One look-up of the thread-local (each is a call in a shared object).
    let ran = INSIDE.try_with(|inside| {
        if inside.replace(true) {
            return None;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(shim));
        inside.set(false);
        Some(r)
    });
    match ran {
        Ok(Some(Ok(v))) => {
            if v >= T::from(0) {
                set_errno(caller_errno);
            }
            v
        }
        Ok(Some(Err(_))) => {
            set_errno(libc::EIO);
            T::from(-1)
        }
        // Re-entry, or the thread's locals are being torn down.
        Ok(None) | Err(_) => direct(),
    }
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Sets the calling thread's errno.
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location returns this thread's errno slot, valid for
    // the thread's life.
    unsafe { *libc::__errno_location() = e };
}

/// A C buffer as a mutable byte slice.
///
/// # Safety
/// `p` must be valid for writes of `len` bytes for the returned lifetime
/// (the caller's own buffer, as read(2) and recv(2) require) or `len` 0.
pub unsafe fn buf_mut<'a>(p: *mut libc::c_void, len: usize) -> &'a mut [u8] {
    if len == 0 || p.is_null() {
        return &mut [];
    }
    // SAFETY: guaranteed by the caller (see above).
    unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) }
}

/// A C buffer as a byte slice.
///
/// # Safety
/// `p` must be valid for reads of `len` bytes for the returned lifetime or `len` 0.
pub unsafe fn buf<'a>(p: *const libc::c_void, len: usize) -> &'a [u8] {
    if len == 0 || p.is_null() {
        return &[];
    }
    // SAFETY: guaranteed by the caller (see above).
    unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }
}

/// The buffers of an iovec array, as mutable slices (for readv/recvmsg).
///
/// # Safety
/// `iov` must point at `n` iovecs, each valid for writes of its length
/// (readv(2)'s contract), for the returned lifetime.
pub unsafe fn iov_mut<'a>(iov: *const libc::iovec, n: libc::c_int) -> Vec<&'a mut [u8]> {
    let n = usize::try_from(n).unwrap_or(0);
    if iov.is_null() || n == 0 {
        return Vec::new();
    }
    // SAFETY: guaranteed by the caller (see above).
    unsafe { std::slice::from_raw_parts(iov, n) }
        .iter()
        // SAFETY: each iovec is the caller's writable buffer.
        .map(|v| unsafe { buf_mut(v.iov_base, v.iov_len) })
        .collect()
}

/// The buffers of an iovec array, as slices (for writev/sendmsg).
///
/// # Safety
/// `iov` must point at `n` iovecs, each valid for reads of its length.
pub unsafe fn iov<'a>(iov: *const libc::iovec, n: libc::c_int) -> Vec<&'a [u8]> {
    let n = usize::try_from(n).unwrap_or(0);
    if iov.is_null() || n == 0 {
        return Vec::new();
    }
    // SAFETY: guaranteed by the caller (see above).
    unsafe { std::slice::from_raw_parts(iov, n) }
        .iter()
        // SAFETY: each iovec is the caller's readable buffer.
        .map(|v| unsafe { buf(v.iov_base, v.iov_len) })
        .collect()
}

/// The caller's pollfd array.
///
/// # Safety
/// `p` must point at `n` pollfds valid for reads and writes (poll(2)).
pub unsafe fn pollfds<'a>(p: *mut libc::pollfd, n: libc::nfds_t) -> &'a mut [libc::pollfd] {
    let n = usize::try_from(n).unwrap_or(0);
    if p.is_null() || n == 0 {
        return &mut [];
    }
    // SAFETY: guaranteed by the caller (see above).
    unsafe { std::slice::from_raw_parts_mut(p, n) }
}

/// Aborts like glibc's fortify check when a `_chk` caller's length exceeds
/// its buffer.
pub fn chk_fail() -> ! {
    std::process::abort()
}

/// An fd number the application passed, as a borrowed fd for this call.
///
/// # Safety
/// `fd` must stay open for the returned lifetime (true within one call the
/// application made on it, unless it closes the fd concurrently, which the
/// kernel's own calls do not protect against either).
pub unsafe fn borrow<'a>(fd: libc::c_int) -> std::os::fd::BorrowedFd<'a> {
    // SAFETY: guaranteed by the caller (see above); fd is not -1 here
    // because callers only borrow fds they found in the table or the
    // application just passed to a socket call that needs a valid fd.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// The socket address at `p`, if it is IPv4 or IPv6.
///
/// # Safety
/// `p` must be valid for reads of `len` bytes (connect(2)'s contract).
pub unsafe fn sockaddr(
    p: *const libc::sockaddr,
    len: libc::socklen_t,
) -> Option<std::net::SocketAddr> {
    if p.is_null() {
        return None;
    }
    let len = usize::try_from(len).ok()?;
    // SAFETY: p is readable for len bytes (caller); we read sa_family only
    // after checking it fits, then the full struct only if len covers it.
    unsafe {
        if len < std::mem::size_of::<libc::sa_family_t>() {
            return None;
        }
        match i32::from((*p).sa_family) {
            libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
                let a = std::ptr::read_unaligned(p.cast::<libc::sockaddr_in>());
                Some(std::net::SocketAddr::from((
                    std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
                let a = std::ptr::read_unaligned(p.cast::<libc::sockaddr_in6>());
                Some(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                    std::net::Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}
