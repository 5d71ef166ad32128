//! `SSOCK_LOG=FILE` (set by `ssock-run --log FILE`): the shim's warnings
//! (fallbacks it decides, protocol violations, inherited sockets it could
//! not take over) are appended to FILE, one line each, with the pid.
//! `SSOCK_LOG_LEVEL` (error, warn, info, debug; default info) filters them.
//! Both are read at load. Each line is one `write` (lines of processes
//! sharing the file do not interleave), to an fd the program cannot close
//! by accident ([`ssock_rings::ownfds`]).
//!
//! Never here: a write to the program's stdout or stderr, or a log line
//! that fails the program's call.

use std::io::Write;

/// No lock: each line is one `write` (a lock held by another thread at a
/// fork would stay held in the child, which may log before its exec).
struct FileLog(std::fs::File);

impl log::Log for FileLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            // The whole line in one write: O_APPEND makes it land whole
            // even when other processes share the file.
            let line = format!(
                "ssock[{}] {}: {}\n",
                std::process::id(),
                r.level(),
                r.args()
            );
            // A log line that cannot be written is dropped: never an error
            // in the application's call.
            let _ = (&self.0).write(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Installs the file logger if `SSOCK_LOG` names a file.
pub fn init() {
    let Some(path) = ssock_rings::env::var_os("SSOCK_LOG").filter(|p| !p.is_empty()) else {
        return;
    };
    let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    else {
        return;
    };
    // Above the program's fd numbers and kept from its close-all code.
    let f = std::fs::File::from(ssock_rings::sys::move_high(f.into()));
    let level = match ssock_rings::env::var("SSOCK_LOG_LEVEL").as_deref() {
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        _ => log::LevelFilter::Info,
    };
    if log::set_logger(Box::leak(Box::new(FileLog(f)))).is_ok() {
        log::set_max_level(level);
    }
}
