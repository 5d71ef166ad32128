//! `devd`: parse arguments, build a config, run.

#![forbid(unsafe_code)]

use anyhow::Context;
use ssock_devd::config::{Config, DefaultMode};
use std::ffi::OsString;
use std::path::PathBuf;

const USAGE: &str = "usage: devd (--user | --system | --config FILE) [--socket PATH] [--default-mode direct|queued|kernel] [--region-size BYTES] [--spin-us N] [--short-lived-ms N] [--run-as USER] [--no-sandbox | --seccomp-log] [--log error|warn|info|debug] [--detach]";

const HELP: &str = "devd: the ssock daemon. It brokers accelerated TCP connections between
processes of this host (Direct: shared-memory rings between the two
processes; Queued: through devd's engine), enforces the access policy and
per-user limits, and reports statistics (ringstat). Clients reach it on a
unix control socket.

usage: devd (--user | --system | --config FILE) [OPTIONS]

base configuration (one is required; the last given wins):
  --user               a private devd for the calling user: socket
                       $XDG_RUNTIME_DIR/ssock/devd.sock, else
                       /tmp/ssock-$UID/devd.sock, mode 0600, directory 0700
  --system             the system defaults without a file: socket
                       /run/ssock/devd.sock, mode 0666, directory created
                       0755, every user admitted (per-user limits apply)
  --config FILE        the system defaults with a TOML file on top
                       (docs/config.md)
options:
  --socket PATH        control socket path
  --default-mode MODE  direct, queued or kernel: what connections asking
                       for Auto get (default direct)
  --region-size BYTES  bytes per connection region (default 2097152)
  --spin-us N          spin budget sent to clients, microseconds (default 30)
  --short-lived-ms N   connections that end within N ms are short: after a
                       streak of them a listener's stay on kernel TCP for a
                       while (default 10; 0 turns the policy off)
  --run-as USER        once the socket, its lock, the links' windows and
                       the peer port are open, devd started as root
                       becomes USER with no capabilities (config run_as;
                       default: it stays who started it)
  --no-sandbox         no seccomp filters (debugging only)
  --seccomp-log        seccomp filters that log a denied call instead of
                       killing devd
  --log LEVEL          error, warn (default), info or debug; to stderr
  --detach             run in the background: a new session, stdin from
                       /dev/null, stdout and stderr appended to devd.log
                       beside the socket, no other inherited descriptor;
                       returns once devd answers on its socket
  -h, --help           print this help
  -V, --version        print the version

environment:
  SSOCK_DEVD_SOCKET    control socket path (--socket wins)
  XDG_RUNTIME_DIR      where --user puts its socket
  NOTIFY_SOCKET        systemd readiness: devd sends READY=1 there";

fn main() {
    if let Err(e) = real_main() {
        eprintln!("devd: {e:#}");
        std::process::exit(1);
    }
}

/// How devd runs: in the foreground, `--detach` (start a daemon and return
/// once it serves) or `--detached` (that daemon: a new session first).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    Foreground,
    Detach,
    Detached,
}

fn real_main() -> anyhow::Result<()> {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut args = argv
        .iter()
        .map(|a| {
            a.to_str()
                .map(String::from)
                .ok_or_else(|| anyhow::anyhow!("argument {a:?} is not UTF-8"))
        })
        .collect::<anyhow::Result<Vec<String>>>()?
        .into_iter();
    let mut cfg: Option<Config> = None;
    let mut overrides: Vec<(String, String)> = Vec::new();
    let mut level = log::LevelFilter::Warn;
    let mut start = Start::Foreground;
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--user" => cfg = Some(Config::user()),
            "--system" => cfg = Some(Config::system()),
            "--config" => cfg = Some(Config::from_file(&PathBuf::from(val()?))?),
            "--socket" | "--default-mode" | "--region-size" | "--spin-us" | "--short-lived-ms"
            | "--run-as" => overrides.push((a.clone(), val()?)),
            "--no-sandbox" | "--seccomp-log" => overrides.push((a.clone(), String::new())),
            "--log" => {
                level = val()?
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--log: expected error, warn, info or debug"))?
            }
            "--detach" => start = Start::Detach,
            // What --detach starts (docs/config.md); not for people.
            "--detached" => start = Start::Detached,
            "-h" | "--help" => {
                print_out(HELP);
                return Ok(());
            }
            "-V" | "--version" => {
                print_out(&format!("devd {}", env!("CARGO_PKG_VERSION")));
                return Ok(());
            }
            _ => anyhow::bail!("unknown argument {a}\n{USAGE}"),
        }
    }
    let mut cfg =
        cfg.ok_or_else(|| anyhow::anyhow!("say --user, --system or --config FILE\n{USAGE}"))?;
    if let Some(p) = std::env::var_os(ssock_rings::paths::SOCKET_ENV).filter(|p| !p.is_empty()) {
        cfg.socket = PathBuf::from(p);
    }
    for (k, v) in overrides {
        match k.as_str() {
            "--socket" => cfg.socket = PathBuf::from(v),
            "--default-mode" => {
                cfg.default_mode = match v.as_str() {
                    "direct" => DefaultMode::Direct,
                    "queued" => DefaultMode::Queued,
                    "kernel" => DefaultMode::Kernel,
                    _ => anyhow::bail!("--default-mode {v}: expected direct, queued or kernel"),
                }
            }
            "--region-size" => {
                cfg.region_size = v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--region-size {v}: not a number of bytes"))?
            }
            "--spin-us" => {
                cfg.spin_us = v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--spin-us {v}: not a number"))?
            }
            "--short-lived-ms" => {
                cfg.policy.short_lived_ms = v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--short-lived-ms {v}: not a number"))?
            }
            "--run-as" => cfg.run_as = Some(v),
            "--no-sandbox" => cfg.sandbox = None,
            "--seccomp-log" => cfg.sandbox = Some(ssock_devd::sandbox::Mode::Log),
            _ => unreachable!("every flag pushed above is handled here"),
        }
    }
    match start {
        Start::Foreground => {}
        Start::Detach => {
            let rest: Vec<OsString> = argv.into_iter().filter(|a| a != "--detach").collect();
            return ssock_devd::detach(&cfg, &rest);
        }
        Start::Detached => ssock_rings::detach::setsid().context("cannot start a session")?,
    }
    stderr_logger(level);
    ssock_devd::run(cfg)
}

struct Stderr;
impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("devd[{}]: {}: {}", std::process::id(), r.level(), r.args());
        }
    }
    fn flush(&self) {}
}
static LOGGER: Stderr = Stderr;

fn stderr_logger(level: log::LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Prints help or version text; a closed stdout (`| head`) is no error.
fn print_out(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}
