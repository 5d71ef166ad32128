//! `ssock-run [--devd auto|none|PATH] [--log FILE] [--] PROGRAM ARGS...`
//!
//! Runs PROGRAM with libssock.so preloaded (appended to any LD_PRELOAD).
//! `--devd auto` (the default) uses a reachable devd or starts one in the
//! background (`devd --detach`: its own session, no descriptor of ours,
//! log in devd.log beside its socket), left running so that every later
//! ssock-run finds it: on `SSOCK_DEVD_SOCKET` if set, else as root the
//! system devd (`devd --system`, open to every user), else the user's own
//! (`devd --user`); `--devd PATH` uses the devd at that socket; `--devd
//! none` runs with the shim but no devd (everything stays on kernel TCP).
//! A devd is started only once PROGRAM was found.

use ssock_client::exec_target::{not_interceptable, resolve};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: ssock-run [--devd auto|none|PATH] [--log FILE] [--] PROGRAM [ARGS...]";

const HELP: &str = "ssock-run: runs PROGRAM with ssock's transparent TCP acceleration.
libssock.so is preloaded into it; a TCP connection between two programs of
this host that both use ssock (under ssock-run, or the ssock library) then
moves its bytes through shared memory (Direct) or devd's engine (Queued)
instead of kernel TCP. A peer that does not use ssock gets plain kernel TCP.

usage: ssock-run [--devd auto|none|PATH] [--log FILE] [--] PROGRAM [ARGS...]

options:
  --devd auto    (default) use the first devd that answers: SSOCK_DEVD_SOCKET
                 if set, else /run/ssock/devd.sock, then the per-user socket.
                 If none does, start one in the background and leave it
                 running for later runs (its log: devd.log beside its
                 socket): on SSOCK_DEVD_SOCKET if set; else, as root, the
                 system devd on /run/ssock/devd.sock (every user admitted);
                 else the user's own (devd --user) on the per-user socket.
                 No devd is started when PROGRAM cannot be found.
  --devd PATH    use the devd at this socket
  --devd none    no devd: the shim is loaded, every connection stays on
                 kernel TCP
  --log FILE     the shim appends its decisions to FILE (sets SSOCK_LOG)
  -h, --help     print this help
  -V, --version  print the version

environment read by ssock-run:
  SSOCK_DEVD_SOCKET  the control socket (see --devd auto)
  XDG_RUNTIME_DIR    per-user socket $XDG_RUNTIME_DIR/ssock/devd.sock
                     (unset: /tmp/ssock-$UID/devd.sock)
  PATH               where PROGRAM is looked for
  LD_PRELOAD         libssock.so is appended to it
environment read by libssock.so in PROGRAM:
  SSOCK_DEVD_SOCKET  set by ssock-run to the devd it chose
  SSOCK_DISABLE=1    pass every call to libc: no acceleration
  SSOCK_LOG=FILE     append the shim's decisions to FILE (--log sets it)
  SSOCK_LOG_LEVEL    error, warn, info (default) or debug
  SSOCK_SPIN_US=N    microseconds a wait spins before it sleeps
                     (default: devd's spin_us, 30)
  SSOCK_STD_FDS=accelerate
                     keep connections on fds 0-2 accelerated (the program
                     uses no stdio on them); else they go to kernel TCP

exit status: PROGRAM's; 127 if PROGRAM cannot be found or run; 2 for a
usage error.";

/// A socket no devd listens on: the shim then keeps everything on kernel TCP.
const NO_DEVD: &str = "/nonexistent/ssock/devd.sock";

/// Exit status when PROGRAM cannot be found or run (as a shell's).
const NOT_RUN: i32 = 127;
/// Exit status of a usage error.
const BAD_USAGE: i32 = 2;

fn main() {
    let (code, e) = run();
    eprintln!("ssock-run: {e}");
    std::process::exit(code);
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

/// Starts a devd in the background on `socket` (`devd --detach`, which
/// returns once it answers there) and checks that one answers.
fn start_devd(base: &str, socket: &Path) -> Result<(), String> {
    let devd = beside_me("devd").unwrap_or_else(|| PathBuf::from("devd"));
    // devd --detach leaves none of our descriptors to the daemon (so this
    // pipe is closed once it returns); in a process group of its own, a
    // Ctrl-C meant for us does not reach it while it starts.
    // Without LD_PRELOAD: a devd started from a program already under
    // ssock-run must not load the shim under its own seccomp filters.
    let out = Command::new(&devd)
        .env_remove("LD_PRELOAD")
        .arg(base)
        .arg("--socket")
        .arg(socket)
        .arg("--detach")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .output()
        .map_err(|e| format!("cannot start {}: {e}", devd.display()))?;
    // Another ssock-run may have started one at the same moment (then this
    // one says so and fails): what counts is that a devd answers.
    let t = Instant::now();
    while !reachable(socket) {
        if t.elapsed() > Duration::from_secs(1) {
            let why = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "no devd came up at {} ({}: {})",
                socket.display(),
                out.status,
                why.trim_end()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `--devd auto`: the first devd that answers, else one started for it.
fn auto_socket() -> Result<PathBuf, String> {
    use ssock_rings::paths;
    if let Some(s) = paths::client_sockets().into_iter().find(|p| reachable(p)) {
        return Ok(s);
    }
    let explicit = std::env::var_os(paths::SOCKET_ENV).filter(|p| !p.is_empty());
    let (base, socket) = match explicit {
        Some(p) => ("--user", PathBuf::from(p)),
        None if ssock_rings::sys::uid() == 0 => ("--system", PathBuf::from(paths::SYSTEM_SOCKET)),
        None => ("--user", paths::user_socket()),
    };
    start_devd(base, &socket)?;
    Ok(socket)
}

/// Runs PROGRAM (exec: returns only on failure): the exit status and why.
fn run() -> (i32, String) {
    let mut args = std::env::args().skip(1);
    let mut devd = "auto".to_string();
    let mut log: Option<String> = None;
    let mut program: Vec<String> = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--devd" | "--log" => {
                let Some(v) = args.next() else {
                    return (BAD_USAGE, format!("{a} needs a value\n{USAGE}"));
                };
                if a == "--devd" {
                    devd = v;
                } else {
                    log = Some(v);
                }
            }
            "--" => {
                program = args.by_ref().collect();
                break;
            }
            "-h" | "--help" => {
                print_out(HELP);
                std::process::exit(0);
            }
            "-V" | "--version" => {
                print_out(&format!("ssock-run {}", env!("CARGO_PKG_VERSION")));
                std::process::exit(0);
            }
            o if o.starts_with('-') => {
                return (BAD_USAGE, format!("unknown option {o}\n{USAGE}"));
            }
            _ => {
                program = std::iter::once(a).chain(args.by_ref()).collect();
                break;
            }
        }
    }
    let Some((prog, rest)) = program.split_first() else {
        return (BAD_USAGE, format!("no PROGRAM given\n{USAGE}"));
    };
    let Some(lib) = beside_me("libssock.so") else {
        return (
            NOT_RUN,
            "libssock.so is not next to ssock-run (build the workspace: cargo build)".into(),
        );
    };
    // Before any devd is started: a program that cannot run needs none.
    let Some(path) = resolve(prog.as_ref(), std::env::var_os("PATH").as_deref()) else {
        let where_ = if prog.contains('/') { "" } else { " in PATH" };
        return (NOT_RUN, format!("{prog}: no such executable file{where_}"));
    };
    if let Some(why) = not_interceptable(&path) {
        eprintln!("ssock-run: warning: {prog} cannot be accelerated: {why}; it runs on kernel TCP");
    }
    let socket = match devd.as_str() {
        "none" => PathBuf::from(NO_DEVD),
        "auto" => auto_socket().unwrap_or_else(|e| {
            eprintln!("ssock-run: {e}; running without acceleration");
            PathBuf::from(NO_DEVD)
        }),
        path => PathBuf::from(path),
    };
    let mut cmd = Command::new(prog);
    cmd.args(rest);
    cmd.env(ssock_rings::paths::SOCKET_ENV, socket);
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(p) if !p.is_empty() => format!("{p}:{}", lib.display()),
        _ => lib.display().to_string(),
    };
    cmd.env("LD_PRELOAD", preload);
    if let Some(f) = log {
        cmd.env("SSOCK_LOG", f);
    }
    // Only returns on failure.
    (NOT_RUN, format!("cannot run {prog}: {}", cmd.exec()))
}

/// Prints help or version text; a closed stdout (`| head`) is no error.
fn print_out(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}
