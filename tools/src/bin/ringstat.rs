//! `ringstat`: live connections and totals of a devd.
//!
//! ```text
//! ringstat [--json]          connections and totals since devd started
//! ringstat conn ID [--json]  one connection's ring indexes and flags
//! ```
//! Finds devd like every ssock program (SSOCK_DEVD_SOCKET, system socket,
//! per-user socket).

#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use serde_json::Value;
use ssock_client::Session;

/// println!, where a reader that went away (`ringstat | head -1`) ends
/// ringstat quietly instead of a panic.
macro_rules! out {
    ($($t:tt)*) => {
        emit(format_args!($($t)*))
    };
}

fn emit(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout(), "{args}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("ringstat: stdout: {e}");
        std::process::exit(1);
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ringstat: {e:#}");
        std::process::exit(1);
    }
}

const USAGE: &str =
    "usage: ringstat [--json] | ringstat conn ID [--json] | ringstat link NODE up|down [LINK]";

const HELP: &str = "ringstat: what a running devd is doing: its live accelerated connections
(mode, state, processes, addresses, bytes, ring fill, notifications) and
its totals since it started (connections per mode, bytes, fallbacks and
their reasons, violations). Fields: docs/ringstat.md.

usage: ringstat [--json]          every live connection and the totals
       ringstat conn ID [--json]  one connection, with each ring's indexes
                                  and flags
       ringstat link NODE down [LINK]
                                  takes the interconnect links to peer NODE
                                  (or only link LINK, 0 first, as devd's
                                  config lists them) out of service: the
                                  connections over them go on over their
                                  kernel TCP sockets (root or devd's user;
                                  `up` puts them back)

options:
  --json         print the JSON document instead of the table
  -h, --help     print this help
  -V, --version  print the version

The devd asked is the first of these whose socket exists: SSOCK_DEVD_SOCKET
alone if set; else /run/ssock/devd.sock; else the per-user socket.
Run as another user than devd's, ringstat lists only that user's
connections.

environment:
  SSOCK_DEVD_SOCKET  the control socket
  XDG_RUNTIME_DIR    per-user socket $XDG_RUNTIME_DIR/ssock/devd.sock
                     (unset: /tmp/ssock-$UID/devd.sock)";

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print_out(HELP);
        return Ok(());
    }
    if args.iter().any(|a| a == "-V" || a == "--version") {
        print_out(&format!("ringstat {}", env!("CARGO_PKG_VERSION")));
        return Ok(());
    }
    let json = args.iter().any(|a| a == "--json");
    let rest: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--json")
        .collect();
    if !matches!(
        rest.as_slice(),
        [] | ["conn", _] | ["link", _, "up" | "down"] | ["link", _, "up" | "down", _]
    ) {
        bail!("{USAGE}");
    }
    let path = ssock_rings::paths::client_socket();
    let s = Session::connect(&path)
        .with_context(|| format!("is devd running? (socket {})", path.display()))?;
    if let ["link", node, up, link @ ..] = rest.as_slice() {
        let node: u32 = node.parse().context("the node must be a number")?;
        let link = match link {
            [l] => Some(l.parse::<u8>().context("the link must be a number")?),
            _ => None,
        };
        let req = ssock_rings::codec::Request::Link {
            node,
            link,
            up: *up == "up",
        };
        match s.request(&req, &[])? {
            (ssock_rings::codec::Response::Ok, _) => return Ok(()),
            (r, _) => bail!("devd refused: {r:?}"),
        }
    }
    let v = ssock_tools::fetch_stats(&s)?;
    match rest.as_slice() {
        [] => {
            if json {
                out!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(&v);
            }
        }
        ["conn", id] => {
            let id: u64 = id.parse().context("connection id must be a number")?;
            let c = v["connections"]
                .as_array()
                .and_then(|a| a.iter().find(|c| c["id"].as_u64() == Some(id)))
                .with_context(|| format!("no live connection {id}"))?;
            if json {
                out!("{}", serde_json::to_string_pretty(c)?);
            } else {
                print_conn(c);
            }
        }
        _ => bail!("{USAGE}"),
    }
    Ok(())
}

fn print_table(v: &Value) {
    let d = &v["devd"];
    out!(
        "devd pid {} up {}s backend {} sessions {} listeners {} live {}",
        d["pid"],
        d["uptime_s"],
        d["backend"].as_str().unwrap_or("?"),
        d["sessions"],
        d["listeners"],
        d["live_connections"]
    );
    out!(
        "{:>6} {:<7} {:<11} {:>15} {:<22} {:<22} {:>12} {:>12} {:>14} {:>10} {:>10} {:<8}",
        "ID",
        "MODE",
        "STATE",
        "PIDS",
        "CONNECTOR",
        "ACCEPTOR",
        "BYTES C>A",
        "BYTES A>C",
        "FILL C>A/A>C",
        "NOTIFIED",
        "SUPPRESSED",
        "PATH"
    );
    for c in v["connections"].as_array().into_iter().flatten() {
        // serde_json values ignore width: format each cell as a string.
        let n = |k: &str| c[k].to_string();
        // Queued: the backend, and the peer node of an end on another host.
        // Its moves between the link and TCP, once it made any.
        let moves = match (c["failovers"].as_u64(), c["forwards"].as_u64()) {
            (Some(o), Some(f)) if o + f > 0 => format!(" moves {o}/{f}"),
            _ => String::new(),
        };
        let path = match (c["backend"].as_str(), c["peer_node"].as_u64()) {
            (Some(b), Some(node)) => {
                // Which link, where the peer has several.
                let several = v["peers"].as_array().into_iter().flatten().any(|p| {
                    p["node"].as_u64() == Some(node)
                        && p["links"].as_array().is_some_and(|l| l.len() > 1)
                });
                let node = match c["link"].as_u64() {
                    Some(l) if several => format!("{node}/{l}"),
                    _ => node.to_string(),
                };
                match (c["path"].as_str(), c["acked"].as_u64()) {
                    (Some(p @ ("tcp" | "moving")), _) => format!("{p} (was {b}:{node}){moves}"),
                    (_, Some(a)) => format!("{b}:{node} acked {a}{moves}"),
                    _ => format!("{b}:{node}{moves}"),
                }
            }
            (Some(b), None) => b.to_string(),
            _ => "-".to_string(),
        };
        out!(
            "{:>6} {:<7} {:<11} {:>15} {:<22} {:<22} {:>12} {:>12} {:>14} {:>10} {:>10} {:<8}",
            n("id"),
            c["mode"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?"),
            format!("{}/{}", c["pids"][0], c["pids"][1]),
            c["local"].as_str().unwrap_or("?"),
            c["remote"].as_str().unwrap_or("?"),
            n("bytes_c2a"),
            n("bytes_a2c"),
            format!("{}/{}", c["ring_fill"][0], c["ring_fill"][1]),
            n("notify_sent"),
            n("notify_suppressed"),
            path,
        );
    }
    let t = &v["totals"];
    out!(
        "totals: direct {} queued {} kernel {} bytes direct {} queued {} violations {} bad_messages {} sessions {}",
        t["connections"]["direct"],
        t["connections"]["queued"],
        t["connections"]["kernel"],
        t["bytes"]["direct"],
        t["bytes"]["queued"],
        t["violations"],
        t["bad_messages"],
        t["sessions"]
    );
    if t["remote"]["connections"].as_u64().unwrap_or(0) > 0
        || t["remote"]["unmatched"].as_u64().unwrap_or(0) > 0
    {
        out!(
            "remote: connections {} unmatched {} failovers {} failover_resets {} made_while_down {} forwards {} migrations {}",
            t["remote"]["connections"],
            t["remote"]["unmatched"],
            t["remote"]["failovers"],
            t["remote"]["failover_resets"],
            t["remote"]["made_while_down"],
            t["remote"]["forwards"],
            t["remote"]["migrations"]
        );
    }
    let fb: Vec<String> = t["fallbacks"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64() != Some(0))
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    out!(
        "fallbacks: {}",
        if fb.is_empty() {
            "none".to_string()
        } else {
            fb.join(", ")
        }
    );
    if t["short_lived_periods"].as_u64().is_some_and(|n| n > 0) {
        out!(
            "policy short_lived: listeners put on kernel TCP {} times, connections kept there {}",
            t["short_lived_periods"],
            t["fallbacks"]["short_lived"]
        );
    }
    print_peers(v);
}

/// The peer devds (only when devd has some).
fn print_peers(v: &Value) {
    let Some(peers) = v["peers"].as_array() else {
        return;
    };
    out!(
        "{:>6} {:<22} {:<10} {:>10} {:>5} {:<6} {:>9}  LAST ERROR",
        "PEER",
        "ADDRESS",
        "STATE",
        "HEARD",
        "UPS",
        "LINK",
        "LISTENERS"
    );
    for p in peers {
        let heard = p["heard_ms_ago"]
            .as_u64()
            .map_or("never".to_string(), |ms| format!("{ms} ms"));
        out!(
            "{:>6} {:<22} {:<10} {:>10} {:>5} {:<6} {:>9}  {}",
            p["node"].to_string(),
            p["address"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            heard,
            p["ups"].to_string(),
            p["link"].as_str().unwrap_or("-"),
            p["listeners"].as_array().map_or(0, Vec::len),
            p["last_error"].as_str().unwrap_or("")
        );
    }
    for p in peers {
        // What each link goes over, and its state.
        let links: Vec<String> = p["links"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                format!(
                    "{} {} {}",
                    l["link"],
                    l["over"].as_str().unwrap_or("?"),
                    l["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        if !links.is_empty() {
            out!("links to node {}: {}", p["node"], links.join(", "));
        }
    }
    for p in peers {
        let changes: Vec<String> = p["link_history"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let several = p["links"].as_array().is_some_and(|l| l.len() > 1);
                format!(
                    "{}{} {:.1} s ago ({} channels)",
                    if several {
                        format!("link {} ", c["link"])
                    } else {
                        String::new()
                    },
                    c["state"].as_str().unwrap_or("?"),
                    c["ago_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                    c["channels"]
                )
            })
            .collect();
        if !changes.is_empty() {
            out!(
                "link to node {} ({} changes): {}",
                p["node"],
                p["link_changes"],
                changes.join(", ")
            );
        }
    }
    let refused: Vec<String> = v["peers_refused"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if !refused.is_empty() {
        out!("peer connections refused: {}", refused.join(", "));
    }
}

fn print_conn(c: &Value) {
    out!(
        "connection {} mode {} state {} pids {}/{} {} -> {} region {} bytes",
        c["id"],
        c["mode"].as_str().unwrap_or("?"),
        c["state"].as_str().unwrap_or("?"),
        c["pids"][0],
        c["pids"][1],
        c["local"].as_str().unwrap_or("?"),
        c["remote"].as_str().unwrap_or("?"),
        c["region_size"]
    );
    for r in c["rings"].as_array().into_iter().flatten() {
        out!(
            "  ring from {:<9} head {:>12} tail {:>12} fill {:>8}/{} flags [{}] consumer_asleep {} producer_asleep {} consumer_closed {}",
            r["from"].as_str().unwrap_or("?"),
            r["head"], r["tail"], r["fill"], r["cap"],
            r["flags"].as_array().into_iter().flatten().filter_map(Value::as_str).collect::<Vec<_>>().join(","),
            r["consumer_asleep"], r["producer_asleep"], r["consumer_closed"]
        );
    }
    out!(
        "  bytes c>a {} a>c {} notifications sent {} suppressed {}",
        c["bytes_c2a"],
        c["bytes_a2c"],
        c["notify_sent"],
        c["notify_suppressed"]
    );
}

/// Prints help or version text; a closed stdout (`| head`) is no error.
fn print_out(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}
