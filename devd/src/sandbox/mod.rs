//! devd's sandbox: a seccomp filter per thread kind, built with
//! `seccompiler`, installed after setup (sockets bound, signal fd and
//! epoll created, engine started). Every rule names its caller. A syscall
//! outside the list kills devd (the service manager restarts it): a
//! compromised devd must not get further, and a missing rule shows up at
//! once in the integration tests, which run devd sandboxed. The engine
//! thread's list also has what its backend says it calls
//! (`Backend::syscalls`), and nothing else of the backend's.
//! Dropping privileges is `privileges.rs` (run_as), before any filter.

use seccompiler::{
    apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use ssock_hwbackends::Syscall;
use std::collections::BTreeMap;

// The syscall lists below name x86_64 syscalls (open, fstat, ...); another
// architecture needs its own lists, not a silently wrong filter.
#[cfg(not(target_arch = "x86_64"))]
compile_error!("devd's seccomp lists are written for x86_64");

/// The kinds of devd threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Control thread: sessions, pairing, regions, stats.
    Control,
    /// Engine thread: Queued virtqueues and the backend.
    Engine,
    /// Peer thread: TCP control connections to peer devds.
    Peers,
}

/// Why the sandbox could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// seccompiler refused the rules (a bug in this file).
    #[error("invalid seccomp rules for the {0:?} thread")]
    Rules(ThreadKind, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter for the {0:?} thread")]
    Install(ThreadKind, #[source] seccompiler::Error),
}

fn arg_eq(i: u8, v: u64) -> SeccompRule {
    SeccompRule::new(vec![SeccompCondition::new(
        i,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        v,
    )
    .expect("valid condition")])
    .expect("valid rule")
}

/// A backend's system calls (`Backend::syscalls`), added to the rules:
/// one with an argument condition gets a rule per allowed value; one a
/// thread already allows without condition stays so.
fn add_backend(r: &mut BTreeMap<i64, Vec<SeccompRule>>, extra: &[Syscall]) {
    for s in extra {
        let fresh = !r.contains_key(&s.nr);
        let rules = r.entry(s.nr).or_default();
        match &s.arg {
            // An empty rule list allows any arguments.
            None => rules.clear(),
            Some(_) if !fresh && rules.is_empty() => {}
            Some((i, values)) => rules.extend(values.iter().map(|&v| arg_is(*i, v))),
        }
    }
}

/// Argument `i` equals `v` (compared on 64 bits when `v` needs them).
fn arg_is(i: u8, v: u64) -> SeccompRule {
    let len = if u32::try_from(v).is_ok() {
        SeccompCmpArgLen::Dword
    } else {
        SeccompCmpArgLen::Qword
    };
    SeccompRule::new(vec![
        SeccompCondition::new(i, len, SeccompCmpOp::Eq, v).expect("valid condition")
    ])
    .expect("valid rule")
}

fn arg_mask_zero(i: u8, mask: u64) -> SeccompRule {
    SeccompRule::new(vec![SeccompCondition::new(
        i,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )
    .expect("valid condition")])
    .expect("valid rule")
}

/// Rules shared by every thread: memory, futexes, eventfd/signalfd reads
/// and writes, logging to stderr, closing fds, thread exit.
fn common() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut r: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let any = Vec::new;
    // read: eventfds (engine wake, kicks), the signalfd.
    r.insert(libc::SYS_read, any());
    // write: eventfd doorbells and log lines on stderr.
    r.insert(libc::SYS_write, any());
    // close: fds of ended sessions and connections.
    r.insert(libc::SYS_close, any());
    // epoll_wait/epoll_pwait, epoll_ctl: each thread's event loop.
    r.insert(libc::SYS_epoll_wait, any());
    r.insert(libc::SYS_epoll_pwait, any());
    r.insert(libc::SYS_epoll_ctl, any());
    // futex: std's Mutex, mpsc channel and thread join.
    r.insert(libc::SYS_futex, any());
    // The allocator: brk/mmap/mremap/munmap/madvise/mprotect. mmap and
    // mprotect never with PROT_EXEC (arg 2): devd maps data only.
    r.insert(libc::SYS_brk, any());
    r.insert(
        libc::SYS_mmap,
        vec![arg_mask_zero(2, libc::PROT_EXEC as u64)],
    );
    r.insert(
        libc::SYS_mprotect,
        vec![arg_mask_zero(2, libc::PROT_EXEC as u64)],
    );
    r.insert(libc::SYS_mremap, any());
    r.insert(libc::SYS_munmap, any());
    r.insert(libc::SYS_madvise, any());
    // sched_yield: std's spinning locks.
    r.insert(libc::SYS_sched_yield, any());
    // Thread and process exit (std tears down the alternate signal stack).
    r.insert(libc::SYS_sigaltstack, any());
    r.insert(libc::SYS_rt_sigprocmask, any());
    r.insert(libc::SYS_exit, any());
    r.insert(libc::SYS_exit_group, any());
    // clock_gettime when the vDSO is not used.
    r.insert(libc::SYS_clock_gettime, any());
    // getrandom: std seeds each thread's HashMap keys (and control's pairing tokens).
    r.insert(libc::SYS_getrandom, any());
    // fcntl F_GETFD: std checks an fd is open before closing it (debug builds).
    // The control thread widens this below.
    r.insert(libc::SYS_fcntl, vec![arg_eq(1, libc::F_GETFD as u64)]);
    // getpid: log lines carry devd's pid.
    r.insert(libc::SYS_getpid, any());
    // clone3, open, openat: let through here only so that the deny filters
    // below answer them (ENOSYS, EACCES) instead of killing devd. glibc's
    // malloc reads /proc/sys/vm/overcommit_memory when it trims a thread
    // arena, and a panic's backtrace reads /proc/self/maps; both cope with
    // the error. clone stays out: no thread is started after the filter.
    r.insert(libc::SYS_clone3, any());
    r.insert(libc::SYS_open, any());
    r.insert(libc::SYS_openat, any());
    r
}

fn rules(kind: ThreadKind, extra: &[Syscall]) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut r = common();
    add_backend(&mut r, extra);
    if kind == ThreadKind::Peers {
        let any = Vec::new;
        // socket: dialling a peer devd, TCP over IPv4 or IPv6 only (arg 0
        // the family, arg 1 the type: nonblocking, close-on-exec).
        let stream = (libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
        r.insert(
            libc::SYS_socket,
            vec![
                SeccompRule::new(vec![
                    SeccompCondition::new(
                        0,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        libc::AF_INET as u64,
                    )
                    .expect("valid condition"),
                    SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, stream)
                        .expect("valid condition"),
                ])
                .expect("valid rule"),
                SeccompRule::new(vec![
                    SeccompCondition::new(
                        0,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        libc::AF_INET6 as u64,
                    )
                    .expect("valid condition"),
                    SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, stream)
                        .expect("valid condition"),
                ])
                .expect("valid rule"),
            ],
        );
        // connect, nonblocking; its end seen by epoll, its error read with
        // getsockopt SO_ERROR.
        r.insert(libc::SYS_connect, any());
        r.insert(libc::SYS_getsockopt, any());
        // accept4: peers dialling this devd (std: SOCK_CLOEXEC).
        r.insert(libc::SYS_accept4, any());
        // ioctl FIONBIO (std's set_nonblocking), setsockopt TCP_NODELAY.
        r.insert(libc::SYS_ioctl, vec![arg_eq(1, libc::FIONBIO)]);
        r.insert(libc::SYS_setsockopt, any());
        // recvfrom/sendto: std's TcpStream read and write; shutdown.
        r.insert(libc::SYS_recvfrom, any());
        r.insert(libc::SYS_sendto, any());
        r.insert(libc::SYS_shutdown, any());
    }
    let any = Vec::new;
    if kind == ThreadKind::Control {
        // accept4: client sessions, flags SOCK_CLOEXEC|SOCK_NONBLOCK (arg 3).
        r.insert(
            libc::SYS_accept4,
            vec![arg_eq(3, (libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64)],
        );
        // recvmsg/sendmsg: control messages with SCM_RIGHTS; sock_diag
        // lookups on devd's netlink socket (made before the filter).
        r.insert(libc::SYS_recvmsg, any());
        r.insert(libc::SYS_sendmsg, any());
        // getsockopt: SO_PEERCRED, SO_TYPE, SO_ACCEPTCONN, IPV6_V6ONLY of passed sockets.
        r.insert(libc::SYS_getsockopt, any());
        // getsockname/getpeername: addresses of passed sockets.
        r.insert(libc::SYS_getsockname, any());
        r.insert(libc::SYS_getpeername, any());
        // fstat (newfstatat with AT_EMPTY_PATH, or statx): inode and size of passed fds.
        r.insert(libc::SYS_newfstatat, any());
        r.insert(libc::SYS_fstat, any());
        r.insert(libc::SYS_statx, any());
        // fcntl: F_DUPFD_CLOEXEC (try_clone), F_ADD_SEALS / F_GET_SEALS (regions),
        // F_GETFL / F_SETFL (nonblocking). Nothing else.
        r.insert(
            libc::SYS_fcntl,
            [
                libc::F_GETFD,
                libc::F_DUPFD_CLOEXEC,
                libc::F_ADD_SEALS,
                libc::F_GET_SEALS,
                libc::F_GETFL,
                libc::F_SETFL,
            ]
            .iter()
            .map(|c| arg_eq(1, *c as u64))
            .collect(),
        );
        // memfd_create + ftruncate: connection regions (MFD_CLOEXEC|MFD_ALLOW_SEALING).
        r.insert(
            libc::SYS_memfd_create,
            vec![arg_eq(
                1,
                u64::from(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING),
            )],
        );
        r.insert(libc::SYS_ftruncate, any());
        // pwrite64 / pread64: a new region's header, the ring words for
        // statistics (devd does not map regions).
        r.insert(libc::SYS_pwrite64, any());
        r.insert(libc::SYS_pread64, any());
        // eventfd2: Queued connections' kick and call.
        r.insert(libc::SYS_eventfd2, any());
        // socket (unix datagram only), bind, connect: the sessions'
        // doorbells, an abstract address each, and their ringers' ends
        // (docs/protocol.md section 3.2).
        r.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::AF_UNIX as u64,
                )
                .expect("socket domain condition"),
                SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    (libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64,
                )
                .expect("socket type condition"),
            ])
            .expect("socket rule")],
        );
        r.insert(libc::SYS_bind, any());
        r.insert(libc::SYS_connect, any());
        // getuid: statistics visibility.
        r.insert(libc::SYS_getuid, any());
        // epoll_create1: a set per generation of the sockets devd watches
        // after answering their Intent with Kernel (control/watch.rs).
        r.insert(libc::SYS_epoll_create1, any());
        // unlink: removing the control socket at shutdown.
        r.insert(libc::SYS_unlink, any());
        r.insert(libc::SYS_unlinkat, any());
    }
    r
}

/// What a syscall outside the list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Kill devd (the default).
    Enforce,
    /// Allow it and have the kernel log it (`--seccomp-log`, to find a
    /// missing rule: see `dmesg | grep 'type=1326'`).
    Log,
}

/// A filter that answers `syscalls` with `errno` and allows everything else.
fn deny(kind: ThreadKind, syscalls: &[i64], errno: i32) -> Result<BpfProgram, SandboxError> {
    let rules = syscalls.iter().map(|n| (*n, Vec::new())).collect();
    let errno = u32::try_from(errno).unwrap_or(1);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        TargetArch::x86_64,
    )
    .map_err(|e| SandboxError::Rules(kind, e))?;
    f.try_into().map_err(|e| SandboxError::Rules(kind, e))
}

/// The thread's filters, in installation order: the deny filters first
/// (installing a filter takes prctl and seccomp, which the allow-list
/// rightly lacks), the allow-list last. The kernel runs them all and the
/// strictest answer wins.
fn compile(
    kind: ThreadKind,
    mode: Mode,
    extra: &[Syscall],
) -> Result<Vec<BpfProgram>, SandboxError> {
    let miss = match mode {
        Mode::Enforce => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let allow = SeccompFilter::new(
        rules(kind, extra),
        miss,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SandboxError::Rules(kind, e))?;
    Ok(vec![
        // clone3 answers ENOSYS, so glibc would fall back to clone (absent).
        deny(kind, &[libc::SYS_clone3], libc::ENOSYS)?,
        // No file is opened after setup.
        deny(kind, &[libc::SYS_open, libc::SYS_openat], libc::EACCES)?,
        allow.try_into().map_err(|e| SandboxError::Rules(kind, e))?,
    ])
}

/// Installs the filters of `kind` on the calling thread (threads it starts
/// later inherit them), with a backend's `extra` system calls.
pub fn apply(kind: ThreadKind, mode: Mode, extra: &[Syscall]) -> Result<(), SandboxError> {
    for f in compile(kind, mode, extra)? {
        apply_filter(&f).map_err(|e| SandboxError::Install(kind, e))?;
    }
    Ok(())
}

/// Spawns a thread of `kind` that installs its filter (when `sandbox` is
/// on), then runs `f` inside `catch_unwind`. Returns once the filter is in
/// place (an error if it could not be installed), so devd never serves
/// with an unfiltered thread. The returned handle tells whether the
/// thread is still alive (`is_finished`): devd checks it and exits when an
/// engine died, so the service manager restarts it.
pub fn spawn_sandboxed<F>(
    kind: ThreadKind,
    name: &str,
    sandbox: Option<Mode>,
    extra: Vec<Syscall>,
    f: F,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (ready, filtered) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Some(mode) = sandbox {
                if let Err(e) = apply(kind, mode, &extra) {
                    log::error!("{e}; the {kind:?} thread stops");
                    let _ = ready.send(Err(e.to_string()));
                    return;
                }
            }
            let _ = ready.send(Ok(()));
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                log::error!("the {kind:?} thread panicked");
            }
        })?;
    match filtered.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(std::io::Error::other(format!(
            "the {kind:?} thread ended before its filter was in place"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_compile() {
        compile(ThreadKind::Control, Mode::Enforce, &[]).unwrap();
        compile(ThreadKind::Engine, Mode::Log, &[]).unwrap();
        compile(ThreadKind::Peers, Mode::Enforce, &[]).unwrap();
    }

    #[test]
    fn a_backends_system_calls_join_its_threads_rules() {
        let extra = [
            Syscall {
                nr: libc::SYS_ioctl,
                arg: Some((1, vec![0x3b71, 0x1_0000_0000])),
                why: "test: two requests",
            },
            Syscall {
                nr: libc::SYS_pwrite64,
                arg: None,
                why: "test: any",
            },
            Syscall {
                nr: libc::SYS_write,
                arg: Some((0, vec![9])),
                why: "test: already allowed for any fd",
            },
        ];
        let r = rules(ThreadKind::Engine, &extra);
        assert_eq!(r[&libc::SYS_ioctl].len(), 2);
        assert!(r[&libc::SYS_pwrite64].is_empty());
        assert!(
            r[&libc::SYS_write].is_empty(),
            "a condition narrows nothing already allowed"
        );
        assert!(!rules(ThreadKind::Engine, &[]).contains_key(&libc::SYS_ioctl));
        compile(ThreadKind::Engine, Mode::Enforce, &extra).unwrap();
    }
}
