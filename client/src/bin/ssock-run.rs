//! `ssock-run [--devd auto|none|PATH] [--log FILE] -- PROGRAM ARGS...`
//!
//! Runs PROGRAM with libssock.so preloaded (appended to any LD_PRELOAD).
//! `--devd auto` (the default) uses a reachable devd or starts the user's
//! own (`devd --user`, which stays up so that every ssock-run of this user
//! finds the same one); `--devd PATH` uses the devd at that socket;
//! `--devd none` runs with the shim but no devd (everything stays on
//! kernel TCP). `SSOCK_DISABLE=1` makes the shim a pure pass-through.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: ssock-run [--devd auto|none|PATH] [--log FILE] -- PROGRAM ARGS...";

fn main() {
    let e = run();
    eprintln!("ssock-run: {e}");
    std::process::exit(127);
}

fn beside_me(name: &str) -> Option<PathBuf> {
    let dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
    [dir.join(name), dir.join("../lib/ssock").join(name)]
        .into_iter()
        .find(|p| p.exists())
}

fn reachable(socket: &Path) -> bool {
    ssock_client::Session::connect(socket).is_ok()
}

/// Starts the user's devd and waits until it answers.
fn start_user_devd() -> Result<PathBuf, String> {
    let devd = beside_me("devd").unwrap_or_else(|| PathBuf::from("devd"));
    let socket = ssock_rings::paths::user_socket();
    Command::new(&devd)
        .arg("--user")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", devd.display()))?;
    let t = Instant::now();
    while !reachable(&socket) {
        if t.elapsed() > Duration::from_secs(5) {
            return Err(format!("devd did not come up at {}", socket.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(socket)
}

/// PROGRAM as exec would find it (PATH search for a bare name).
fn resolve(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        return Some(PathBuf::from(prog));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Why the preload cannot reach `path`, if it cannot: a setuid/setgid
/// program (the loader ignores LD_PRELOAD there), a static or 32-bit ELF.
fn not_interceptable(path: &Path) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    if mode & 0o6000 != 0 {
        return Some("it is setuid/setgid: the loader ignores LD_PRELOAD".into());
    }
    let mut f = std::fs::File::open(path).ok()?;
    let mut elf = Vec::new();
    f.by_ref().take(64 * 1024).read_to_end(&mut elf).ok()?;
    if elf.get(..4)? != b"\x7fELF" {
        return None; // a script: its interpreter is what runs
    }
    if elf.get(4) != Some(&2) {
        return Some("it is a 32-bit program (libssock.so is 64-bit)".into());
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let (size, count) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    let interp = (0..count).any(|i| {
        let o = phoff + i * size;
        elf.get(o..o + 4) == Some(&3u32.to_le_bytes()[..]) // PT_INTERP
    });
    (!interp).then(|| "it is statically linked: there is no loader to preload into".into())
}

fn run() -> String {
    let mut args = std::env::args().skip(1);
    let mut devd = "auto".to_string();
    let mut log: Option<String> = None;
    let mut program: Vec<String> = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--devd" => match args.next() {
                Some(v) => devd = v,
                None => return USAGE.into(),
            },
            "--log" => log = args.next(),
            "--" => {
                program = args.by_ref().collect();
                break;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => {
                program = std::iter::once(a).chain(args.by_ref()).collect();
                break;
            }
        }
    }
    let Some((prog, rest)) = program.split_first() else {
        return USAGE.into();
    };
    let Some(lib) = beside_me("libssock.so") else {
        return "libssock.so is not next to ssock-run (build the workspace: cargo build)".into();
    };
    if let Some(why) = resolve(prog).as_deref().and_then(not_interceptable) {
        eprintln!("ssock-run: warning: {prog} cannot be accelerated: {why}; it runs on kernel TCP");
    }
    let mut cmd = Command::new(prog);
    cmd.args(rest);
    match devd.as_str() {
        "none" => {
            cmd.env(
                ssock_rings::paths::SOCKET_ENV,
                "/nonexistent/ssock/devd.sock",
            );
        }
        "auto" => {
            let found = ssock_rings::paths::client_sockets()
                .into_iter()
                .find(|p| reachable(p));
            let socket = match found {
                Some(s) => s,
                None => match start_user_devd() {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("ssock-run: {e}; running without acceleration");
                        PathBuf::from("/nonexistent/ssock/devd.sock")
                    }
                },
            };
            cmd.env(ssock_rings::paths::SOCKET_ENV, socket);
        }
        path => {
            cmd.env(ssock_rings::paths::SOCKET_ENV, path);
        }
    }
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(p) if !p.is_empty() => format!("{p}:{}", lib.display()),
        _ => lib.display().to_string(),
    };
    cmd.env("LD_PRELOAD", preload);
    if let Some(f) = log {
        cmd.env("SSOCK_LOG", f);
    }
    // Only returns on failure.
    format!("cannot run {prog}: {}", cmd.exec())
}
