//! The environment ssock's variables are read from. A program may clear or
//! rewrite its environment after it started (nginx workers keep only `TZ`),
//! so the preload shim takes a copy of ssock's variables at load
//! ([`remember`]) and every later look-up reads that copy; a process that
//! never called [`remember`] (the Rust library, the tools) reads its live
//! environment.
//!
//! Never here: any variable outside [`NAMES`], or a write to the
//! environment.

use std::ffi::OsString;
use std::sync::OnceLock;

/// The variables ssock reads: the control socket, the per-user runtime
/// directory, the spin budget, the shim's switch, its log, and whether
/// sockets on fds 0 to 2 are accelerated.
pub const NAMES: [&str; 7] = [
    crate::paths::SOCKET_ENV,
    "XDG_RUNTIME_DIR",
    "SSOCK_SPIN_US",
    "SSOCK_DISABLE",
    "SSOCK_LOG",
    "SSOCK_LOG_LEVEL",
    "SSOCK_STD_FDS",
];

static AT_LOAD: OnceLock<Vec<(&'static str, OsString)>> = OnceLock::new();

/// Takes the copy (once; later calls keep the first).
pub fn remember() {
    AT_LOAD.get_or_init(|| {
        NAMES
            .iter()
            .filter_map(|n| Some((*n, std::env::var_os(n)?)))
            .collect()
    });
}

/// `name`'s value: from the copy taken at load if there is one, else from
/// the live environment. `name` must be one of [`NAMES`].
pub fn var_os(name: &str) -> Option<OsString> {
    debug_assert!(NAMES.contains(&name), "{name} is not an ssock variable");
    match AT_LOAD.get() {
        Some(copy) => copy
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone()),
        None => std::env::var_os(name),
    }
}

/// `name`'s value as UTF-8 (None if unset or not UTF-8).
pub fn var(name: &str) -> Option<String> {
    var_os(name)?.into_string().ok()
}
