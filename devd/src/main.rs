//! `devd`: parse arguments, build a config, run.

#![forbid(unsafe_code)]

use ssock_devd::config::{Config, DefaultMode};
use std::path::PathBuf;

const USAGE: &str = "usage: devd (--user | --config FILE) [--socket PATH] [--default-mode direct|queued|kernel] [--region-size BYTES] [--spin-us N] [--no-sandbox | --seccomp-log] [--log error|warn|info|debug]";

fn main() {
    if let Err(e) = real_main() {
        eprintln!("devd: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut cfg: Option<Config> = None;
    let mut overrides: Vec<(String, String)> = Vec::new();
    let mut level = log::LevelFilter::Warn;
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--user" => cfg = Some(Config::user()),
            "--config" => cfg = Some(Config::from_file(&PathBuf::from(val()?))?),
            "--socket" | "--default-mode" | "--region-size" | "--spin-us" => {
                overrides.push((a.clone(), val()?))
            }
            "--no-sandbox" | "--seccomp-log" => overrides.push((a.clone(), String::new())),
            "--log" => {
                level = val()?
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--log: expected error, warn, info or debug"))?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => anyhow::bail!("unknown argument {a}\n{USAGE}"),
        }
    }
    let mut cfg = cfg.ok_or_else(|| anyhow::anyhow!("say --user or --config FILE\n{USAGE}"))?;
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
            "--no-sandbox" => cfg.sandbox = None,
            "--seccomp-log" => cfg.sandbox = Some(ssock_devd::sandbox::Mode::Log),
            _ => unreachable!("every flag pushed above is handled here"),
        }
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
