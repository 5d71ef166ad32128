//! `SSOCK_LOG=FILE` (set by `ssock-run --log FILE`): the shim's warnings
//! (fallbacks it decides, protocol violations, inherited sockets it could
//! not take over) are appended to FILE, one line each, with the pid.
//! `SSOCK_LOG_LEVEL` (error, warn, info, debug; default info) filters them.

use std::io::Write;
use std::sync::Mutex;

struct FileLog(Mutex<std::fs::File>);

impl log::Log for FileLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
            // A log line that cannot be written is dropped: never an error
            // in the application's call.
            let _ = writeln!(
                f,
                "ssock[{}] {}: {}",
                std::process::id(),
                r.level(),
                r.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Installs the file logger if `SSOCK_LOG` names a file.
pub fn init() {
    let Some(path) = std::env::var_os("SSOCK_LOG").filter(|p| !p.is_empty()) else {
        return;
    };
    let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    else {
        return;
    };
    let level = match std::env::var("SSOCK_LOG_LEVEL").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("warn") => log::LevelFilter::Warn,
        Ok("debug") => log::LevelFilter::Debug,
        _ => log::LevelFilter::Info,
    };
    if log::set_logger(Box::leak(Box::new(FileLog(Mutex::new(f))))).is_ok() {
        log::set_max_level(level);
    }
}
