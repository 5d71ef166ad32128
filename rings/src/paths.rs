//! Where devd's control socket is, as every ssock program finds it:
//! `SSOCK_DEVD_SOCKET` if set; else the system socket if it exists; else the
//! per-user socket under `$XDG_RUNTIME_DIR/ssock/` or `/tmp/ssock-$UID/`.

use std::path::PathBuf;

/// Environment variable overriding the control socket path everywhere.
pub const SOCKET_ENV: &str = "SSOCK_DEVD_SOCKET";
/// The system service's control socket.
pub const SYSTEM_SOCKET: &str = "/run/ssock/devd.sock";

/// The per-user runtime directory for a private devd.
pub fn user_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("ssock"),
        _ => PathBuf::from(format!("/tmp/ssock-{}", crate::sys::uid())),
    }
}

/// The per-user control socket path.
pub fn user_socket() -> PathBuf {
    user_dir().join("devd.sock")
}

/// The socket a client or tool should use.
pub fn client_socket() -> PathBuf {
    if let Some(p) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let sys = PathBuf::from(SYSTEM_SOCKET);
    if sys.exists() {
        return sys;
    }
    user_socket()
}
