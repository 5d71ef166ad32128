//! libssock.so: the LD_PRELOAD shim that `ssock-run` puts under an
//! unmodified program. The table below is every libc call it interposes
//! (`interpose!`: the exported function, one line that calls its handler,
//! and the real libc function it falls back to); `exports.map` exports
//! exactly these names. A handler looks the fd up and dispatches to the
//! accelerated socket (`sock`, `io`, `wait`, `epoll`) or to the real libc
//! function; negotiation and socket semantics live in `sock` on top of
//! ssock-client. All receives funnel into one path (`io::recv`), all sends
//! into another (`io::send`).
//!
//! Never here: policy, retries, timeouts or lazy initialisation inside an
//! interposed function; a panic crossing into C (`boundary`); output on
//! the program's stdout or stderr (`SSOCK_LOG` only).

#[macro_use]
mod interpose;

mod boundary;
mod dispatch;
mod epoll;
mod epoll_calls;
mod establish;
mod fdmap;
mod fdpass;
mod fds;
mod fdstate;
mod fork;
mod inherit;
mod io;
mod known;
mod load;
mod logging;
mod obj;
mod outcome;
mod poll;
mod rawcalls;
mod real;
mod select;
mod sendfile;
mod sleep;
mod sock;
mod sockctl;
mod stdio;
mod table;
mod takeover;
mod transfer;
mod wait;

use libc::{
    c_char, c_int, c_long, c_uint, c_ulong, c_void, epoll_event, fd_set, iovec, mmsghdr, msghdr,
    nfds_t, off_t, pid_t, pollfd, sigset_t, size_t, sockaddr, socklen_t, ssize_t, timespec,
};

interpose! {
    // Where a connection becomes accelerated.
    socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int => establish::socket;
    connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int => establish::connect;
    listen(fd: c_int, backlog: c_int) -> c_int => establish::listen;
    accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int
        => establish::accept, no real;
    accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int
        => establish::accept4;

    // Receives.
    read(fd: c_int, b: *mut c_void, n: size_t) -> ssize_t => transfer::read;
    recv(fd: c_int, b: *mut c_void, n: size_t, flags: c_int) -> ssize_t
        => transfer::recv, no real;
    recvfrom(fd: c_int, b: *mut c_void, n: size_t, flags: c_int, addr: *mut sockaddr,
        alen: *mut socklen_t) -> ssize_t => transfer::recvfrom;
    readv(fd: c_int, v: *const iovec, n: c_int) -> ssize_t => transfer::readv;
    recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t => transfer::recvmsg;
    __read_chk(fd: c_int, b: *mut c_void, n: size_t, buflen: size_t) -> ssize_t
        => transfer::__read_chk, no real;
    __recv_chk(fd: c_int, b: *mut c_void, n: size_t, buflen: size_t, flags: c_int) -> ssize_t
        => transfer::__recv_chk, no real;
    __recvfrom_chk(fd: c_int, b: *mut c_void, n: size_t, buflen: size_t, flags: c_int,
        addr: *mut sockaddr, alen: *mut socklen_t) -> ssize_t
        => transfer::__recvfrom_chk, no real;
    recvmmsg(fd: c_int, v: *mut mmsghdr, n: c_uint, flags: c_int, tmo: *mut timespec) -> c_int
        => transfer::recvmmsg;

    // Sends.
    write(fd: c_int, b: *const c_void, n: size_t) -> ssize_t => transfer::write;
    send(fd: c_int, b: *const c_void, n: size_t, flags: c_int) -> ssize_t
        => transfer::send, no real;
    sendto(fd: c_int, b: *const c_void, n: size_t, flags: c_int, addr: *const sockaddr,
        alen: socklen_t) -> ssize_t => transfer::sendto;
    writev(fd: c_int, v: *const iovec, n: c_int) -> ssize_t => transfer::writev;
    sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t => transfer::sendmsg;
    sendmmsg(fd: c_int, v: *mut mmsghdr, n: c_uint, flags: c_int) -> c_int
        => transfer::sendmmsg;
    sendfile(out: c_int, input: c_int, offset: *mut off_t, count: size_t) -> ssize_t
        => sendfile::sendfile;
    sendfile64(out: c_int, input: c_int, offset: *mut off_t, count: size_t) -> ssize_t
        => sendfile::sendfile64;

    // Waits.
    poll(fds: *mut pollfd, n: nfds_t, timeout: c_int) -> c_int => poll::poll;
    ppoll(fds: *mut pollfd, n: nfds_t, tmo: *const timespec, mask: *const sigset_t) -> c_int
        => poll::ppoll;
    __poll_chk(fds: *mut pollfd, n: nfds_t, timeout: c_int, fdslen: size_t) -> c_int
        => poll::__poll_chk, no real;
    __ppoll_chk(fds: *mut pollfd, n: nfds_t, tmo: *const timespec, mask: *const sigset_t,
        fdslen: size_t) -> c_int => poll::__ppoll_chk, no real;
    select(nfds: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set,
        tv: *mut libc::timeval) -> c_int => select::select;
    pselect(nfds: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set, tmo: *const timespec,
        mask: *const sigset_t) -> c_int => select::pselect;

    // epoll.
    epoll_create(size: c_int) -> c_int => epoll_calls::epoll_create;
    epoll_create1(flags: c_int) -> c_int => epoll_calls::epoll_create1;
    epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut epoll_event) -> c_int
        => epoll_calls::epoll_ctl;
    epoll_wait(epfd: c_int, events: *mut epoll_event, max: c_int, timeout: c_int) -> c_int
        => epoll_calls::epoll_wait;
    epoll_pwait(epfd: c_int, events: *mut epoll_event, max: c_int, timeout: c_int,
        mask: *const sigset_t) -> c_int => epoll_calls::epoll_pwait;
    epoll_pwait2(epfd: c_int, events: *mut epoll_event, max: c_int, tmo: *const timespec,
        mask: *const sigset_t) -> c_int => epoll_calls::epoll_pwait2, real if present;

    // Socket control (the optional argument of fcntl and ioctl as a fixed
    // one: see `sockctl::fcntl`).
    shutdown(fd: c_int, how: c_int) -> c_int => sockctl::shutdown;
    getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut socklen_t)
        -> c_int => sockctl::getsockopt;
    getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int
        => sockctl::getpeername;
    fcntl(fd: c_int, cmd: c_int, arg: c_long) -> c_int
        => sockctl::fcntl, real as unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
    fcntl64(fd: c_int, cmd: c_int, arg: c_long) -> c_int => sockctl::fcntl64, no real;
    ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int
        => sockctl::ioctl, real as unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;
    splice(fd_in: c_int, off_in: *mut libc::loff_t, fd_out: c_int, off_out: *mut libc::loff_t,
        len: size_t, flags: c_uint) -> ssize_t => sockctl::splice;

    // Streams (stdio reads and writes an fd through calls no preload sees).
    fdopen(fd: c_int, mode: *const c_char) -> *mut libc::FILE => stdio::fdopen;

    // fd numbers.
    dup(fd: c_int) -> c_int => fds::dup;
    dup2(fd: c_int, new: c_int) -> c_int => fds::dup2;
    dup3(fd: c_int, new: c_int, flags: c_int) -> c_int => fds::dup3;
    close(fd: c_int) -> c_int => fds::close;
    close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int
        => fds::close_range, no real;
    closefrom(lowfd: c_int) => fds::closefrom, no real;

    // Around libc's wrappers: syscall(2) (its real function is looked up
    // lock-free in `rawcalls`) and chroot(2).
    syscall(n: c_long, a1: c_long, a2: c_long, a3: c_long, a4: c_long, a5: c_long, a6: c_long)
        -> c_long => rawcalls::syscall, no real;
    chroot(path: *const c_char) -> c_int => rawcalls::chroot;

    // Processes.
    vfork() -> pid_t => fork::vfork, no real;
    posix_spawn(pid: *mut pid_t, path: *const c_char,
        acts: *const libc::posix_spawn_file_actions_t, attr: *const libc::posix_spawnattr_t,
        argv: *const *mut c_char, envp: *const *mut c_char) -> c_int => fork::posix_spawn;
    posix_spawnp(pid: *mut pid_t, file: *const c_char,
        acts: *const libc::posix_spawn_file_actions_t, attr: *const libc::posix_spawnattr_t,
        argv: *const *mut c_char, envp: *const *mut c_char) -> c_int => fork::posix_spawnp;
    execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char)
        -> c_int => fork::execve;
    execv(path: *const c_char, argv: *const *const c_char) -> c_int => fork::execv;
    execvp(file: *const c_char, argv: *const *const c_char) -> c_int => fork::execvp;
    execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char)
        -> c_int => fork::execvpe;
}
