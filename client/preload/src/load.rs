//! What runs when the library is loaded (an `.init_array` constructor),
//! before the program's `main`: the environment copy and the CPU count
//! (the program may clear its environment or install a seccomp filter
//! later), fork counting, the real functions resolved, inherited sockets
//! taken over (`inherit`), the shim's `pthread_atfork` handlers
//! registered (`fork`), and at exit the last skipped connections reported.
//!
//! Never here: anything that may run after load, but for the exit
//! handler (one call into the client library, which never blocks).

use crate::{fork, inherit, real, takeover};

extern "C" fn init() {
    // What the shim needs from the environment and the system, taken now:
    // the program may clear its environment or install a seccomp filter
    // later.
    ssock_rings::env::remember();
    ssock_rings::notify::init();
    // Fork counting from the start (see `watch_forks`).
    ssock_client::negotiate::watch_forks();
    real::get();
    takeover::remember_self();
    inherit::inherit_at_load();
    // SAFETY: registering handlers that live for the whole program (plain
    // functions); pthread_atfork has no other preconditions.
    unsafe {
        libc::pthread_atfork(
            Some(fork::before_fork),
            Some(fork::after_fork_in_parent),
            Some(fork::after_fork_in_child),
        );
    }
    // SAFETY: registering a plain function that lives for the whole
    // program; atexit has no other preconditions (a failure to register
    // only leaves the last skipped connections unreported).
    unsafe {
        libc::atexit(at_exit);
    }
}

/// At the program's exit: the connections the board kept on kernel TCP
/// that devd has not heard of yet (a statistic).
extern "C" fn at_exit() {
    ssock_client::Session::flush_skipped();
}

/// Runs `init` when the library is loaded.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;
