//! Process creation: the `pthread_atfork` handlers (prepare: the epoll
//! sets, the listener set and every accelerated socket locked, one more
//! hold each for the child; parent and child: unlocked, the child's hold
//! references dropped as the shim after it forgot the parent's devd
//! session), vfork served as fork (so that the handlers run), posix_spawn
//! and posix_spawnp (a hold for each socket the new program inherits),
//! and the exec family (the holds of sockets that close at exec go with
//! this image, and come back if the exec fails). Before an exec or spawn
//! whose new program will not take the sockets over, those it inherits
//! leave their regions (`takeover`).
//!
//! Never here: a lock a handler cannot take in a forking process (every
//! lock taken before the fork is released after it, in both processes),
//! or talking to devd from the child's handler on the parent's session.

use crate::boundary::{self, enter, set_errno};
use crate::sock::{self, lock};
use crate::takeover::{leave_unless_taken, Env};
use crate::{epoll, real, table};
use libc::c_int;

/// pthread_atfork prepare handler (registered by `load`'s constructor).
pub extern "C" fn before_fork() {
    epoll::before_fork();
    table::before_fork();
    ssock_client::bells::before_fork();
}

/// pthread_atfork parent handler: unlocks what the prepare handler locked.
pub extern "C" fn after_fork_in_parent() {
    // As the shim: the spare's fds it closes go to libc.
    fn bells() -> i8 {
        ssock_client::bells::after_fork(false);
        0
    }
    boundary::enter(bells, bells);
    let held = table::after_fork(false);
    epoll::after_fork(false);
    drop_as_shim(held);
}

/// Drops the references the prepare handler took, once every lock is
/// released, as the shim (the fds a last reference closes go to libc).
fn drop_as_shim(held: Vec<sock::Entry>) {
    let mut held = Some(held);
    boundary::enter(
        || {
            drop(held.take());
            0i8
        },
        || 0,
    );
    drop(held);
}

/// pthread_atfork child handler: the child stops using the parent's devd
/// session (first: nothing below may talk to devd on it), then unlocks
/// what the prepare handler locked. The session is dropped as the shim
/// (`boundary::enter`): closing its socket must go to libc, not to the
/// shim's close, which would wait for the listener set still locked here
/// (a child forked when nothing but the shim held the session hung).
pub extern "C" fn after_fork_in_child() {
    fn forget_session() -> i8 {
        ssock_client::Session::after_fork_in_child();
        0
    }
    boundary::enter(forget_session, forget_session);
    fn bells() -> i8 {
        ssock_client::bells::after_fork(true);
        0
    }
    boundary::enter(bells, bells);
    let held = table::after_fork(true);
    epoll::after_fork(true);
    drop_as_shim(held);
}

/// vfork(2), served as fork(2): the fork handlers must run so that the
/// child's hold on each accelerated socket is counted (a vfork child that
/// execs inherits the sockets). Costs a page-table copy, nothing else.
///
/// # Safety
/// The C contract of vfork(2) (which fork(2) satisfies).
pub unsafe fn vfork() -> libc::pid_t {
    // SAFETY: fork has no memory preconditions; its handlers are ours.
    unsafe { libc::fork() }
}

/// posix_spawn and posix_spawnp: the new program inherits the accelerated
/// sockets without FD_CLOEXEC (and takes them over when it loads the
/// shim), so each gets a hold first, as at fork; taken back if the spawn
/// fails. (A file action that closes one leaves an extra hold: the stream
/// then ends through the kernel socket's FIN, still an end of stream.)
/// (`leave` first: as for an exec.)
fn spawn_holding(leave: impl FnOnce(), spawn: impl FnOnce() -> c_int) -> c_int {
    leave();
    let held = table::inheritable();
    for s in &held {
        lock(s).fork_hold();
    }
    let r = spawn();
    if r != 0 {
        for s in &held {
            lock(s).drop_hold();
        }
    }
    r
}

/// posix_spawn(3).
///
/// # Safety
/// The C contract of posix_spawn(3).
pub unsafe fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const libc::c_char,
    acts: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().posix_spawn)(pid, path, acts, attr, argv, envp) };
    // SAFETY: posix_spawn's own contract on path and envp.
    let leave = || unsafe { leave_unless_taken(path, false, Env::Given(envp.cast())) };
    enter(|| spawn_holding(leave, real), real)
}

/// posix_spawnp(3).
///
/// # Safety
/// The C contract of posix_spawnp(3).
pub unsafe fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const libc::c_char,
    acts: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().posix_spawnp)(pid, file, acts, attr, argv, envp) };
    // SAFETY: posix_spawnp's own contract on file and envp.
    let leave = || unsafe { leave_unless_taken(file, true, Env::Given(envp.cast())) };
    enter(|| spawn_holding(leave, real), real)
}

/// Runs an exec of `prog` (searched in PATH if `search`) with `env` after
/// the sockets the new program inherits but will not take over left
/// their regions (`takeover`): the holds of accelerated sockets whose every fd closes at
/// exec (FD_CLOEXEC) go with this image (the new one will not have them),
/// and come back if the exec fails. Sockets that survive exec keep their
/// hold: the new image takes them over without adding one.
///
/// # Safety
/// As `takeover::leave_unless_taken` on `prog` and `env`.
unsafe fn exec_releasing(
    prog: *const libc::c_char,
    search: bool,
    env: Env,
    exec: impl FnOnce() -> c_int,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { leave_unless_taken(prog, search, env) };
    let closing = table::closing_at_exec();
    for s in &closing {
        lock(s).drop_hold();
    }
    let r = exec();
    let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    for s in &closing {
        lock(s).fork_hold();
    }
    set_errno(e);
    r
}

/// execve(2).
///
/// # Safety
/// The C contract of execve(2).
pub unsafe fn execve(
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().execve)(path, argv, envp) };
    // SAFETY: exec's own contract on path and its environment
    // (the caller's).
    enter(
        || unsafe { exec_releasing(path, false, Env::Given(envp), real) },
        real,
    )
}

/// execv(3).
///
/// # Safety
/// The C contract of execv(3).
pub unsafe fn execv(path: *const libc::c_char, argv: *const *const libc::c_char) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().execv)(path, argv) };
    // SAFETY: exec's own contract on path and its environment
    // (the caller's).
    enter(
        || unsafe { exec_releasing(path, false, Env::Current, real) },
        real,
    )
}

/// execvp(3).
///
/// # Safety
/// The C contract of execvp(3).
pub unsafe fn execvp(file: *const libc::c_char, argv: *const *const libc::c_char) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().execvp)(file, argv) };
    // SAFETY: exec's own contract on file and its environment
    // (the caller's).
    enter(
        || unsafe { exec_releasing(file, true, Env::Current, real) },
        real,
    )
}

/// execvpe(3).
///
/// # Safety
/// The C contract of execvpe(3).
pub unsafe fn execvpe(
    file: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    // SAFETY: forwarding the caller's own arguments to libc.
    let real = || unsafe { (real::get().execvpe)(file, argv, envp) };
    // SAFETY: exec's own contract on file and its environment
    // (the caller's).
    enter(
        || unsafe { exec_releasing(file, true, Env::Given(envp), real) },
        real,
    )
}
