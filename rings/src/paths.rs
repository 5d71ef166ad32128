//! Where devd's control socket is, as every ssock program finds it: see
//! [`client_sockets`] for the order clients try.

use std::path::PathBuf;

/// Environment variable overriding the control socket path everywhere.
pub const SOCKET_ENV: &str = "SSOCK_DEVD_SOCKET";
/// The system service's control socket.
pub const SYSTEM_SOCKET: &str = "/run/ssock/devd.sock";

/// The per-user runtime directory for a private devd.
pub fn user_dir() -> PathBuf {
    match crate::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("ssock"),
        _ => PathBuf::from(format!("/tmp/ssock-{}", crate::sys::uid())),
    }
}

/// The per-user control socket path.
pub fn user_socket() -> PathBuf {
    user_dir().join("devd.sock")
}

/// The sockets a client tries, in order: `SSOCK_DEVD_SOCKET` alone if set;
/// else the system socket, then the per-user one (if its directory is
/// safe: owned by this user, not writable by others).
pub fn client_sockets() -> Vec<PathBuf> {
    if let Some(p) = crate::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut v = vec![PathBuf::from(SYSTEM_SOCKET)];
    if user_dir_is_safe(&user_dir()) {
        v.push(user_socket());
    }
    v
}

/// Whether `dir` is owned by this user and not writable by group or others
/// (another user must not be able to put a socket of theirs in its place);
/// devd applies the same rule to its socket directory.
pub fn user_dir_is_safe(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == crate::sys::uid() && m.mode() & 0o022 == 0)
}

/// The socket a tool reports on: the first of [`client_sockets`] that
/// exists, else `SSOCK_DEVD_SOCKET` if set, else the per-user path.
pub fn client_socket() -> PathBuf {
    client_sockets()
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(
            || match crate::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
                // The override is the only place to look, even when absent.
                Some(p) => PathBuf::from(p),
                None => user_socket(),
            },
        )
}
