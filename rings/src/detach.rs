//! Detaching a daemon from whoever started it: a session of its own, and
//! no descriptor it inherited reaching the daemon (a pipe a caller reads
//! until EOF must not be held open by devd). Safe wrappers over `setsid`
//! and `close_range(CLOSE_RANGE_CLOEXEC)`.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

/// Starts a new session with this process as its leader, without a
/// controlling terminal (`setsid`). Fails (EPERM) in a process group leader.
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid takes no arguments and touches no memory of this
    // process; it only changes the process's session and group ids.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every open descriptor numbered `min_fd` or higher close-on-exec,
/// so that no program this process starts afterwards inherits one. Nothing
/// is closed: descriptors other code of this process owns stay valid (what
/// makes this safe where closing them would not be). For a process about
/// to start a daemon with only the standard descriptors it chose.
pub fn cloexec_from(min_fd: RawFd) -> io::Result<()> {
    let first = libc::c_uint::try_from(min_fd)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "negative descriptor"))?;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes no descriptor and
    // reads or writes no memory of this process: it only sets FD_CLOEXEC on
    // the open descriptors in [first, UINT_MAX].
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    // ENOSYS: before Linux 5.9; EINVAL: the flag is unknown before 5.11.
    if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
        return Err(e);
    }
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|d| d.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= min_fd)
        .collect();
    for fd in fds {
        // SAFETY: F_SETFD changes only the descriptor's close-on-exec flag
        // and passes no memory; a descriptor no longer open (the directory
        // listing's own, closed once read) gives EBADF, which is harmless.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn cloexec(fd: RawFd) -> bool {
        // SAFETY: F_GETFD reads the flags of a descriptor this test owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert!(flags >= 0, "F_GETFD failed");
        flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn cloexec_from_marks_descriptors_and_closes_none() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = f.as_raw_fd();
        // SAFETY: clears FD_CLOEXEC on a descriptor this test owns.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        assert!(!cloexec(fd));
        cloexec_from(fd).unwrap();
        assert!(cloexec(fd));
        // Still open: readable.
        use std::io::Read;
        assert_eq!((&f).read(&mut [0u8; 1]).unwrap(), 0);
    }
}
