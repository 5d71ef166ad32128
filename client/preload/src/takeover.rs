//! Whether the program an exec (or posix_spawn) starts will take this
//! process's accelerated sockets over: its environment preloads this
//! library (LD_PRELOAD names it, or /etc/ld.so.preload does), does not
//! turn it off (`SSOCK_DISABLE=1`) and names the devd this process uses
//! (`SSOCK_DEVD_SOCKET` as it was at load), and the loader can preload
//! into the program (`ssock_client::exec_target`: not set-id, no file
//! capabilities, a dynamic 64-bit ELF or a script whose interpreter is).
//! When it will not, each accelerated socket that survives the exec leaves
//! its region for its kernel socket first (`Sock::before_plain_exec`), so
//! that the new program, which knows only the kernel socket, reads and
//! writes the whole stream there.
//!
//! Never here: a "yes" it cannot back (a program it cannot find or read,
//! an environment it cannot parse, count as "no": the cost is only the
//! acceleration of those connections).

use crate::boundary::borrow;
use crate::sock::lock;
use crate::table;
use libc::c_char;
use std::ffi::{CStr, OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This library's own file, found at load.
static SELF_PATH: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Finds this library's file (at load: `dladdr` takes the loader's lock,
/// which a forked child may not be able to take later).
pub fn remember_self() {
    SELF_PATH.get_or_init(|| {
        // SAFETY: Dl_info is plain data that dladdr fills; the address is
        // one of this library's functions, so dli_fname, when set, names
        // this library and lives as long as it stays loaded (for good).
        unsafe {
            let mut info: libc::Dl_info = std::mem::zeroed();
            let here = remember_self as *const libc::c_void;
            if libc::dladdr(here, &mut info) == 0 || info.dli_fname.is_null() {
                return None;
            }
            let name = CStr::from_ptr(info.dli_fname);
            let p = PathBuf::from(OsStr::from_bytes(name.to_bytes()));
            // Absolute now, while the working directory is the loader's.
            Some(std::fs::canonicalize(&p).unwrap_or(p))
        }
    });
}

/// The environment the new program gets.
#[derive(Clone, Copy)]
pub enum Env {
    /// The one an `envp` argument gives (a NULL-terminated array).
    Given(*const *const c_char),
    /// This process's own (`environ`), as exec without `envp` passes it.
    Current,
}

extern "C" {
    /// The C library's; it may replace it (setenv), never while exec or
    /// this code reads it in the same thread.
    static mut environ: *const *const c_char;
}

/// The value of `name` in an environment array (`NAME=value`).
///
/// # Safety
/// `envp` is NULL or a NULL-terminated array of NUL-terminated strings
/// that stay unchanged during the call (exec's contract on its caller).
unsafe fn lookup(envp: *const *const c_char, name: &str) -> Option<OsString> {
    if envp.is_null() {
        return None;
    }
    let mut i = 0;
    loop {
        // SAFETY: within the array up to and including its NULL (the
        // caller's contract).
        let p = unsafe { *envp.add(i) };
        if p.is_null() {
            return None;
        }
        // SAFETY: each entry is a NUL-terminated string.
        let kv = unsafe { CStr::from_ptr(p) }.to_bytes();
        if let Some(v) = kv
            .strip_prefix(name.as_bytes())
            .and_then(|r| r.strip_prefix(b"="))
        {
            return Some(OsStr::from_bytes(v).to_os_string());
        }
        i += 1;
    }
}

/// Whether `entry` (a path from LD_PRELOAD or /etc/ld.so.preload) names
/// this library: the same path, or the same file.
fn names_self(entry: &[u8], me: &Path) -> bool {
    let e = Path::new(OsStr::from_bytes(entry));
    if e == me {
        return true;
    }
    match (std::fs::metadata(e), std::fs::metadata(me)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether a preload list (separated by colons or white space) names this
/// library.
fn list_names_self(list: &[u8], me: &Path) -> bool {
    list.split(|&b| b == b':' || b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .any(|w| names_self(w, me))
}

/// Whether the program `prog` (searched in PATH if `search` and it has no
/// slash), exec'd with `env`, takes this process's sockets over. A
/// program that is not there counts as yes: that exec fails (ENOENT,
/// EACCES), and nothing needs to change for it (a search by hand, as
/// Python's os.execvp, tries several).
///
/// # Safety
/// `prog` is a NUL-terminated string; `env` as [`lookup`] requires.
unsafe fn takes_over(prog: *const c_char, search: bool, env: Env) -> bool {
    // SAFETY: plain queries of this process's credentials.
    let secure = unsafe { libc::getuid() != libc::geteuid() || libc::getgid() != libc::getegid() };
    if secure {
        // The loader runs the program in secure-execution mode: it ignores
        // LD_PRELOAD paths with a slash. (Asked first: the PATH search
        // below checks the real ids, exec the effective ones.)
        return false;
    }
    if prog.is_null() {
        return true;
    }
    // SAFETY: the caller's contract.
    let name = OsStr::from_bytes(unsafe { CStr::from_ptr(prog) }.to_bytes());
    // exec's own PATH search uses this process's PATH.
    let path = if search {
        // SAFETY: this process's environment (read by value: exec reads
        // it the same way).
        unsafe { lookup(environ, "PATH") }
    } else {
        None
    };
    let found = if search {
        ssock_client::exec_target::resolve(name, path.as_deref())
    } else {
        Some(PathBuf::from(name)).filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()))
    };
    let Some(found) = found else {
        return true;
    };
    let Some(Some(me)) = SELF_PATH.get() else {
        return false;
    };
    let envp = match env {
        Env::Given(e) => e,
        // SAFETY: `environ` is libc's; read by value, as exec does.
        Env::Current => unsafe { environ },
    };
    // SAFETY: the caller's contract.
    let var = |name| unsafe { lookup(envp, name) };
    let preloaded = var("LD_PRELOAD").is_some_and(|v| list_names_self(v.as_bytes(), me))
        || std::fs::read("/etc/ld.so.preload").is_ok_and(|l| list_names_self(&l, me));
    if !preloaded || var("SSOCK_DISABLE").is_some_and(|v| v == "1") {
        return false;
    }
    // The same devd: its socket as named, or as found by default (the
    // per-user one under XDG_RUNTIME_DIR).
    for v in ["SSOCK_DEVD_SOCKET", "XDG_RUNTIME_DIR"] {
        if var(v) != ssock_rings::env::var_os(v) {
            return false;
        }
    }
    ssock_client::exec_target::not_interceptable(&found).is_none()
}

/// Before an exec or spawn of `prog` with `env`: unless the new program
/// takes them over, every accelerated socket that survives the exec
/// leaves its region for its kernel socket.
///
/// # Safety
/// As [`takes_over`].
pub unsafe fn leave_unless_taken(prog: *const c_char, search: bool, env: Env) {
    let socks = table::surviving_exec();
    if socks.is_empty() {
        return;
    }
    // SAFETY: the caller's contract.
    if unsafe { takes_over(prog, search, env) } {
        return;
    }
    for (fd, s) in socks {
        let mut g = lock(&s);
        // Another thread may close the number meanwhile (the shim takes it
        // out of the table before the kernel closes it): a duplicate taken
        // while the table still names this socket there is this socket's.
        // SAFETY: a number the table named a moment ago; if it was closed
        // since, the duplicate fails or is checked away just below.
        let Ok(dup) = ssock_rings::sys::dup_cloexec(unsafe { borrow(fd) }) else {
            continue;
        };
        if !table::get(fd).is_some_and(|e| std::sync::Arc::ptr_eq(&e, &s)) {
            continue;
        }
        let id = g.conn_id();
        if g.before_plain_exec(dup.as_fd()) == ssock_client::transport::Leave::Left {
            log::info!(
                "connection {}: fd {fd} survives an exec of a program without ssock: it left the region",
                id.unwrap_or(0)
            );
        }
    }
}
