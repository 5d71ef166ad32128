//! FFI devd needs beyond ssock-rings::sys: signals as an fd, sd_notify,
//! sock_diag lookups of TCP sockets, and giving up root (a user's ids,
//! the capabilities, the ids themselves).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and threads spawned
/// after) and returns a signalfd that reports them.
pub fn termination_signalfd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    // SAFETY: set is initialized; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: set is initialized; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal number from a signalfd, if any.
pub fn read_signal(fd: RawFd) -> Option<u32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let want = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `want` bytes into `info`.
    let r = unsafe { libc::read(fd, (&mut info as *mut libc::signalfd_siginfo).cast(), want) };
    (usize::try_from(r).ok() == Some(want)).then_some(info.ssi_signo)
}

/// Tells systemd we are ready, if it asked ($NOTIFY_SOCKET).
pub fn sd_notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let r = if let Some(abs) = bytes.strip_prefix(b"@") {
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            abs,
        )
        .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = r {
        log::warn!("sd_notify failed: {e}");
    }
}

/// A `NETLINK_SOCK_DIAG` socket, to ask the kernel about TCP sockets devd
/// holds no fd of ([`tcp_lookup`]). Made before the control thread's
/// seccomp filter, which does not allow `socket`.
pub fn sock_diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with constant arguments; the result is
    // checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A TCP socket as `sock_diag` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSeen {
    /// TCP state (`TCP_ESTABLISHED` = 1 ... `TCP_LISTEN` = 10; a
    /// TIME_WAIT socket reports 6).
    pub state: u8,
    /// Inode of the socket's file: 0 once no process holds it (closed
    /// everywhere, the kernel finishing the connection alone).
    pub inode: u32,
}

/// `TCP_ESTABLISHED` in `TcpSeen::state`.
pub const TCP_ESTABLISHED: u8 = 1;

/// `TCP_TIME_WAIT` in `TcpSeen::state`.
pub const TCP_TIME_WAIT: u8 = 6;

/// `TCP_LISTEN` in `TcpSeen::state`.
pub const TCP_LISTEN: u8 = 10;

/// The states of a TCP socket that sent its FIN (`TcpSeen::state`):
/// FIN_WAIT1, FIN_WAIT2, TIME_WAIT, LAST_ACK, CLOSING.
pub const TCP_FIN_SENT: [u8; 5] = [4, 5, 6, 9, 11];

// Netlink and inet_diag wire constants (linux/netlink.h, linux/sock_diag.h,
// linux/inet_diag.h).
const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states u32, then
/// the 48-byte `inet_diag_sockid`.
const REQ_V2: usize = 56;
/// `struct inet_diag_msg`: state at 1, inode (u32) at 68.
const DIAG_MSG: usize = 72;

/// Looks up the TCP socket whose local address is `local` and remote
/// address `remote` in devd's network namespace (an exact lookup, as
/// `ss` does for one socket): Ok(None) when the kernel knows none. The
/// lookup ignores sockets bound to a device, and one in another network
/// namespace is never found, so None alone does not prove a socket gone.
/// If no connected socket matches, the kernel may answer with a listener
/// on `local` instead (state `TCP_LISTEN`).
pub fn tcp_lookup(
    diag: BorrowedFd<'_>,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    seq: u32,
) -> io::Result<Option<TcpSeen>> {
    use std::net::{IpAddr, SocketAddr};
    // Both addresses in the family of the socket's own (local) address.
    let (family, l, r) = match (local, remote) {
        (SocketAddr::V4(l), SocketAddr::V4(r)) => (
            libc::AF_INET,
            l.ip().octets().to_vec(),
            r.ip().octets().to_vec(),
        ),
        (SocketAddr::V4(l), SocketAddr::V6(r)) => match r.ip().to_ipv4_mapped() {
            Some(r4) => (
                libc::AF_INET,
                l.ip().octets().to_vec(),
                r4.octets().to_vec(),
            ),
            None => return Err(io::Error::other("an IPv4 socket with an IPv6 peer")),
        },
        (SocketAddr::V6(l), r) => {
            let r6 = match r.ip() {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            (
                libc::AF_INET6,
                l.ip().octets().to_vec(),
                r6.octets().to_vec(),
            )
        }
    };
    let mut req = [0u8; NLMSG_HDR + REQ_V2];
    let len = u32::try_from(req.len()).unwrap_or(u32::MAX);
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    // pid 12..16: 0 (the kernel assigns ours).
    let b = &mut req[NLMSG_HDR..];
    b[0] = u8::try_from(family).unwrap_or(0);
    b[1] = u8::try_from(libc::IPPROTO_TCP).unwrap_or(0);
    // idiag_ext 0, pad 0; every state.
    b[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: ports big-endian, addresses as on the wire,
    // interface 0, cookie INET_DIAG_NOCOOKIE (all ones).
    b[8..10].copy_from_slice(&local.port().to_be_bytes());
    b[10..12].copy_from_slice(&remote.port().to_be_bytes());
    b[12..12 + l.len()].copy_from_slice(&l);
    b[28..28 + r.len()].copy_from_slice(&r);
    b[48..56].copy_from_slice(&[0xff; 8]);
    nl_send(diag, &req)?;
    let mut buf = [0u8; 512];
    loop {
        let n = nl_recv(diag, &mut buf)?;
        let msg = &buf[..n];
        if msg.len() < NLMSG_HDR {
            return Err(io::Error::other("short netlink message"));
        }
        let word = |o: usize| u32::from_ne_bytes([msg[o], msg[o + 1], msg[o + 2], msg[o + 3]]);
        let kind = u16::from_ne_bytes([msg[4], msg[5]]);
        if word(8) != seq {
            continue; // an answer to an earlier request that was given up
        }
        return match kind {
            NLMSG_ERROR if msg.len() >= NLMSG_HDR + 4 => {
                let err = i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
                if err == -libc::ENOENT {
                    Ok(None)
                } else {
                    Err(io::Error::from_raw_os_error(-err))
                }
            }
            SOCK_DIAG_BY_FAMILY if msg.len() >= NLMSG_HDR + DIAG_MSG => Ok(Some(TcpSeen {
                state: msg[NLMSG_HDR + 1],
                inode: word(NLMSG_HDR + 68),
            })),
            _ => Err(io::Error::other("unexpected sock_diag answer")),
        };
    }
}

/// The inodes of every listening TCP socket (IPv4 and IPv6) in devd's
/// network namespace that some process holds: a dump of the sockets in
/// state LISTEN, as `ss -lt` makes.
pub fn tcp_listeners(diag: BorrowedFd<'_>, seq: u32) -> io::Result<std::collections::HashSet<u64>> {
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_DONE: u16 = 3;
    let mut inodes = std::collections::HashSet::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let mut req = [0u8; NLMSG_HDR + REQ_V2];
        let len = u32::try_from(req.len()).unwrap_or(u32::MAX);
        req[0..4].copy_from_slice(&len.to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req[8..12].copy_from_slice(&seq.to_ne_bytes());
        let b = &mut req[NLMSG_HDR..];
        b[0] = u8::try_from(family).unwrap_or(0);
        b[1] = u8::try_from(libc::IPPROTO_TCP).unwrap_or(0);
        b[4..8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        b[48..56].copy_from_slice(&[0xff; 8]);
        nl_send(diag, &req)?;
        let mut buf = vec![0u8; 32 * 1024];
        'parts: loop {
            let n = nl_recv(diag, &mut buf)?;
            let mut rest = &buf[..n];
            if rest.is_empty() {
                return Err(io::Error::other("empty netlink message"));
            }
            // Several messages per datagram, each 4-aligned.
            while rest.len() >= NLMSG_HDR {
                let word =
                    |o: usize| u32::from_ne_bytes([rest[o], rest[o + 1], rest[o + 2], rest[o + 3]]);
                let len = usize::try_from(word(0)).unwrap_or(usize::MAX);
                if len < NLMSG_HDR || len > rest.len() {
                    return Err(io::Error::other("malformed netlink message"));
                }
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let msg = &rest[..len];
                if word(8) == seq {
                    match kind {
                        NLMSG_DONE => break 'parts,
                        NLMSG_ERROR if len >= NLMSG_HDR + 4 => {
                            let err = i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
                            return Err(io::Error::from_raw_os_error(-err));
                        }
                        SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDR + DIAG_MSG => {
                            let o = NLMSG_HDR + 68;
                            let inode =
                                u32::from_ne_bytes([msg[o], msg[o + 1], msg[o + 2], msg[o + 3]]);
                            if msg[NLMSG_HDR + 1] == TCP_LISTEN && inode != 0 {
                                inodes.insert(u64::from(inode));
                            }
                        }
                        _ => return Err(io::Error::other("unexpected sock_diag answer")),
                    }
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }
    Ok(inodes)
}

/// Sends one netlink message to the kernel.
fn nl_send(fd: BorrowedFd<'_>, msg: &[u8]) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain data; all-zero (pid 0, groups 0) is the
    // kernel's address once the family is set.
    let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    to.nl_family = libc::sa_family_t::try_from(libc::AF_NETLINK).unwrap_or(0);
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr().cast_mut().cast(),
        iov_len: msg.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is "no name, no iov, no control".
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_name = (&mut to as *mut libc::sockaddr_nl).cast();
    h.msg_namelen =
        libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or(0);
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    // SAFETY: h points at `to` and at one iovec over `msg`, all alive for
    // the call; the kernel only reads them (sendmsg does not write the
    // buffer).
    let r = unsafe { libc::sendmsg(fd.as_raw_fd(), &h, libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one netlink message without waiting (the kernel answers a
/// sock_diag request before its sendmsg returns); its length (truncated
/// to `buf`).
fn nl_recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is "no name, no iov, no control".
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    // SAFETY: h points at one iovec over `buf`, which lives for the call
    // and is writable for its whole length; no control buffer is given.
    let r = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut h, libc::MSG_DONTWAIT) };
    usize::try_from(r)
        .map_err(|_| io::Error::last_os_error())
        .map(|n| n.min(buf.len()))
}

/// A user's (uid, gid) from the password database; None: no such user.
pub fn user_ids(name: &str) -> io::Result<Option<(u32, u32)>> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the user name"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: passwd is plain data (integers and pointers), filled by
        // getpwnam_r before it is read.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: cname is NUL-terminated; pw, buf (of buf.len() bytes) and
        // found live across the call; getpwnam_r writes only into them.
        let r = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if r == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        return Ok((!found.is_null()).then_some((pw.pw_uid, pw.pw_gid)));
    }
}

/// Raises the limit of locked memory to at least `bytes` (soft and hard:
/// root may raise the hard limit, which the privileges' drop keeps), for
/// memory an RDMA device pins. Returns the soft limit now.
pub fn raise_memlock_limit(bytes: u64) -> io::Result<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: rl is a valid out-pointer for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if rl.rlim_cur >= bytes {
        return Ok(rl.rlim_cur);
    }
    let want = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: rl.rlim_max.max(bytes),
    };
    // SAFETY: want is a valid in-pointer for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &want) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bytes)
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// Empties the capability bounding set (as root: CAP_SETPCAP), capability
/// by capability until the kernel knows no more (EINVAL).
pub fn drop_bounding_set() -> io::Result<()> {
    for cap in 0..64 as libc::c_ulong {
        // SAFETY: PR_CAPBSET_DROP takes one integer; the unused arguments
        // are 0 as prctl(2) asks.
        let r = unsafe {
            libc::prctl(
                libc::PR_CAPBSET_DROP,
                cap,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) && cap > 0 {
                return Ok(());
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Becomes `uid`/`gid` in every thread (glibc's set*id reach them all), for
/// good: no supplementary groups, and real, effective and saved ids alike,
/// so that nothing can switch back. From root to another uid the kernel
/// clears the permitted, effective and ambient capabilities.
pub fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: a count of 0 makes setgroups read no list.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clears the inheritable capabilities too (setuid leaves them), and sets
/// no_new_privs: no exec can give any back.
pub fn no_capabilities() -> io::Result<()> {
    /// `struct __user_cap_header_struct` (linux/capability.h).
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    /// `struct __user_cap_data_struct`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    /// _LINUX_CAPABILITY_VERSION_3: two data structs (64 capabilities).
    const VERSION_3: u32 = 0x2008_0522;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let d = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads the header and, for version 3, two data structs,
    // both alive across the call; lowering every set needs no privilege.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes 1 and zeros, as prctl(2) asks.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
