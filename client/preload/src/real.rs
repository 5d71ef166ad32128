//! The real libc functions, resolved once with `dlsym(RTLD_NEXT, ...)`.
//! A constructor resolves them at load time; a call that arrives earlier
//! (another library's constructor) resolves them itself. The state is an
//! atomic, never a plain flag.

use libc::{c_int, c_void, size_t, sockaddr, socklen_t, ssize_t};
use std::sync::OnceLock;

type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type ListenFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type Accept4Fn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int;
type ReadFn = unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t;
type WriteFn = unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t;
type RecvFromFn = unsafe extern "C" fn(
    c_int,
    *mut c_void,
    size_t,
    c_int,
    *mut sockaddr,
    *mut socklen_t,
) -> ssize_t;
type SendToFn = unsafe extern "C" fn(
    c_int,
    *const c_void,
    size_t,
    c_int,
    *const sockaddr,
    socklen_t,
) -> ssize_t;
type ShutdownFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type PollFn = unsafe extern "C" fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int;
type PpollFn = unsafe extern "C" fn(
    *mut libc::pollfd,
    libc::nfds_t,
    *const libc::timespec,
    *const libc::sigset_t,
) -> c_int;
type SelectFn = unsafe extern "C" fn(
    c_int,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *mut libc::timeval,
) -> c_int;
type PselectFn = unsafe extern "C" fn(
    c_int,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *const libc::timespec,
    *const libc::sigset_t,
) -> c_int;
type DupFn = unsafe extern "C" fn(c_int) -> c_int;
type Dup2Fn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type Dup3Fn = unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
type FcntlFn = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
type IoctlFn = unsafe extern "C" fn(c_int, libc::c_ulong, ...) -> c_int;
type ReadvFn = unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> ssize_t;
type RecvMsgFn = unsafe extern "C" fn(c_int, *mut libc::msghdr, c_int) -> ssize_t;
type SendMsgFn = unsafe extern "C" fn(c_int, *const libc::msghdr, c_int) -> ssize_t;
type CloseFn = unsafe extern "C" fn(c_int) -> c_int;
type SendfileFn = unsafe extern "C" fn(c_int, c_int, *mut libc::off_t, size_t) -> ssize_t;
type RecvMmsgFn = unsafe extern "C" fn(
    c_int,
    *mut libc::mmsghdr,
    libc::c_uint,
    c_int,
    *mut libc::timespec,
) -> c_int;
type SendMmsgFn = unsafe extern "C" fn(c_int, *mut libc::mmsghdr, libc::c_uint, c_int) -> c_int;
type PosixSpawnFn = unsafe extern "C" fn(
    *mut libc::pid_t,
    *const libc::c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    *const *mut libc::c_char,
    *const *mut libc::c_char,
) -> c_int;
type GetsockoptFn = unsafe extern "C" fn(c_int, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int;
type SpliceFn = unsafe extern "C" fn(
    c_int,
    *mut libc::loff_t,
    c_int,
    *mut libc::loff_t,
    size_t,
    libc::c_uint,
) -> ssize_t;
type ExecveFn = unsafe extern "C" fn(
    *const libc::c_char,
    *const *const libc::c_char,
    *const *const libc::c_char,
) -> c_int;
type ExecvFn = unsafe extern "C" fn(*const libc::c_char, *const *const libc::c_char) -> c_int;
type EpollCreate1Fn = unsafe extern "C" fn(c_int) -> c_int;
type EpollCtlFn = unsafe extern "C" fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int;
type EpollWaitFn = unsafe extern "C" fn(c_int, *mut libc::epoll_event, c_int, c_int) -> c_int;
type EpollPwaitFn = unsafe extern "C" fn(
    c_int,
    *mut libc::epoll_event,
    c_int,
    c_int,
    *const libc::sigset_t,
) -> c_int;
type EpollPwait2Fn = unsafe extern "C" fn(
    c_int,
    *mut libc::epoll_event,
    c_int,
    *const libc::timespec,
    *const libc::sigset_t,
) -> c_int;

/// The resolved functions.
pub struct Real {
    pub connect: ConnectFn,
    pub listen: ListenFn,
    pub accept4: Accept4Fn,
    pub read: ReadFn,
    pub write: WriteFn,
    pub recvfrom: RecvFromFn,
    pub sendto: SendToFn,
    pub shutdown: ShutdownFn,
    pub poll: PollFn,
    pub ppoll: PpollFn,
    pub select: SelectFn,
    pub pselect: PselectFn,
    pub dup: DupFn,
    pub dup2: Dup2Fn,
    pub dup3: Dup3Fn,
    pub fcntl: FcntlFn,
    pub ioctl: IoctlFn,
    pub readv: ReadvFn,
    pub writev: ReadvFn,
    pub recvmsg: RecvMsgFn,
    pub sendmsg: SendMsgFn,
    pub close: CloseFn,
    pub sendfile: SendfileFn,
    pub sendfile64: SendfileFn,
    pub recvmmsg: RecvMmsgFn,
    pub sendmmsg: SendMmsgFn,
    pub posix_spawn: PosixSpawnFn,
    pub posix_spawnp: PosixSpawnFn,
    pub getsockopt: GetsockoptFn,
    pub splice: SpliceFn,
    pub execve: ExecveFn,
    pub execv: ExecvFn,
    pub execvp: ExecvFn,
    pub execvpe: ExecveFn,
    pub epoll_create: EpollCreate1Fn,
    pub epoll_create1: EpollCreate1Fn,
    pub epoll_ctl: EpollCtlFn,
    pub epoll_wait: EpollWaitFn,
    pub epoll_pwait: EpollPwaitFn,
    /// None with a libc older than 2.35.
    pub epoll_pwait2: Option<EpollPwait2Fn>,
}

static REAL: OnceLock<Real> = OnceLock::new();

fn sym_opt(name: &std::ffi::CStr) -> *mut c_void {
    // SAFETY: RTLD_NEXT with a NUL-terminated name is dlsym's documented use.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) }
}

fn sym(name: &std::ffi::CStr) -> *mut c_void {
    let p = sym_opt(name);
    assert!(!p.is_null(), "libssock: libc has no {name:?}");
    p
}

/// Resolves every function (at most once).
pub fn get() -> &'static Real {
    REAL.get_or_init(|| {
        // SAFETY: each pointer comes from dlsym for the libc function of
        // that name, whose C signature is exactly the type it is cast to.
        unsafe {
            Real {
                connect: std::mem::transmute::<*mut c_void, ConnectFn>(sym(c"connect")),
                listen: std::mem::transmute::<*mut c_void, ListenFn>(sym(c"listen")),
                accept4: std::mem::transmute::<*mut c_void, Accept4Fn>(sym(c"accept4")),
                read: std::mem::transmute::<*mut c_void, ReadFn>(sym(c"read")),
                write: std::mem::transmute::<*mut c_void, WriteFn>(sym(c"write")),
                recvfrom: std::mem::transmute::<*mut c_void, RecvFromFn>(sym(c"recvfrom")),
                sendto: std::mem::transmute::<*mut c_void, SendToFn>(sym(c"sendto")),
                shutdown: std::mem::transmute::<*mut c_void, ShutdownFn>(sym(c"shutdown")),
                poll: std::mem::transmute::<*mut c_void, PollFn>(sym(c"poll")),
                ppoll: std::mem::transmute::<*mut c_void, PpollFn>(sym(c"ppoll")),
                select: std::mem::transmute::<*mut c_void, SelectFn>(sym(c"select")),
                pselect: std::mem::transmute::<*mut c_void, PselectFn>(sym(c"pselect")),
                dup: std::mem::transmute::<*mut c_void, DupFn>(sym(c"dup")),
                dup2: std::mem::transmute::<*mut c_void, Dup2Fn>(sym(c"dup2")),
                dup3: std::mem::transmute::<*mut c_void, Dup3Fn>(sym(c"dup3")),
                fcntl: std::mem::transmute::<*mut c_void, FcntlFn>(sym(c"fcntl")),
                ioctl: std::mem::transmute::<*mut c_void, IoctlFn>(sym(c"ioctl")),
                readv: std::mem::transmute::<*mut c_void, ReadvFn>(sym(c"readv")),
                writev: std::mem::transmute::<*mut c_void, ReadvFn>(sym(c"writev")),
                recvmsg: std::mem::transmute::<*mut c_void, RecvMsgFn>(sym(c"recvmsg")),
                sendmsg: std::mem::transmute::<*mut c_void, SendMsgFn>(sym(c"sendmsg")),
                close: std::mem::transmute::<*mut c_void, CloseFn>(sym(c"close")),
                sendfile: std::mem::transmute::<*mut c_void, SendfileFn>(sym(c"sendfile")),
                sendfile64: std::mem::transmute::<*mut c_void, SendfileFn>(sym(c"sendfile64")),
                recvmmsg: std::mem::transmute::<*mut c_void, RecvMmsgFn>(sym(c"recvmmsg")),
                sendmmsg: std::mem::transmute::<*mut c_void, SendMmsgFn>(sym(c"sendmmsg")),
                posix_spawn: std::mem::transmute::<*mut c_void, PosixSpawnFn>(sym(c"posix_spawn")),
                posix_spawnp: std::mem::transmute::<*mut c_void, PosixSpawnFn>(sym(
                    c"posix_spawnp",
                )),
                getsockopt: std::mem::transmute::<*mut c_void, GetsockoptFn>(sym(c"getsockopt")),
                splice: std::mem::transmute::<*mut c_void, SpliceFn>(sym(c"splice")),
                execve: std::mem::transmute::<*mut c_void, ExecveFn>(sym(c"execve")),
                execv: std::mem::transmute::<*mut c_void, ExecvFn>(sym(c"execv")),
                execvp: std::mem::transmute::<*mut c_void, ExecvFn>(sym(c"execvp")),
                execvpe: std::mem::transmute::<*mut c_void, ExecveFn>(sym(c"execvpe")),
                epoll_create: std::mem::transmute::<*mut c_void, EpollCreate1Fn>(sym(
                    c"epoll_create",
                )),
                epoll_create1: std::mem::transmute::<*mut c_void, EpollCreate1Fn>(sym(
                    c"epoll_create1",
                )),
                epoll_ctl: std::mem::transmute::<*mut c_void, EpollCtlFn>(sym(c"epoll_ctl")),
                epoll_wait: std::mem::transmute::<*mut c_void, EpollWaitFn>(sym(c"epoll_wait")),
                epoll_pwait: std::mem::transmute::<*mut c_void, EpollPwaitFn>(sym(c"epoll_pwait")),
                epoll_pwait2: Some(sym_opt(c"epoll_pwait2"))
                    .filter(|p| !p.is_null())
                    .map(|p| std::mem::transmute::<*mut c_void, EpollPwait2Fn>(p)),
            }
        }
    })
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

extern "C" fn init() {
    // What the shim needs from the environment and the system, taken now:
    // the program may clear its environment or install a seccomp filter
    // later.
    ssock_rings::env::remember();
    ssock_rings::notify::init();
    // Fork counting from the start (see `watch_forks`).
    ssock_client::negotiate::watch_forks();
    get();
    crate::inherit_at_load();
    // SAFETY: registering a handler that lives for the whole program (a
    // plain function); pthread_atfork has no other preconditions.
    unsafe {
        libc::pthread_atfork(
            Some(crate::before_fork),
            Some(crate::after_fork_in_parent),
            Some(crate::after_fork_in_child),
        );
    }
}

/// Runs `init` when the library is loaded.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("libssock's fixed-argument fcntl relies on the x86_64 SysV calling convention");
