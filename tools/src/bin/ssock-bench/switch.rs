//! `--switch` (with `--two-hosts`): what a link failure and its return cost
//! the programs over it (docs/protocol.md 8.5, 8.6). Two Queued
//! connections cross the link, one ping-ponging 64 B messages, one
//! streaming 64 KiB writes, both verified byte by byte by the peer; this
//! process takes host a's link out of service, waits until both moved to
//! their kernel sockets, puts it back, and waits until both moved forward
//! onto the link again. Reported: the longest round trip a message saw
//! across each switch (the stall the program saw), the median round trip
//! before, on TCP and after, and the stream's throughput before, across
//! the cycle and after, with its worst 100 ms. When host a has two links
//! or more to its peer, a move between links comes first: link 0 out of
//! service until both connections cross another link (TCP untouched,
//! docs/protocol.md 8.7), then back in service, with the same figures.
//!
//! Never here: a figure from a connection that did not take the path it
//! is labelled with (the statistics of host a's devd say which path each
//! was on, and a run whose connections did not move is an error).

use super::*;
use ssock_rings::codec::Request;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The server echoes `ECHO` connections' messages until their end.
pub(crate) const ECHO: u8 = 4;
/// The server reads `SINK` connections to their end, then answers ACK.
pub(crate) const SINK: u8 = 5;

/// Message size of the ping-pong connection.
const PING_SIZE: usize = 64;
/// Write size of the streaming connection.
const CHUNK: usize = 64 * 1024;
/// How long each phase lasts before the next switch.
const PHASE: Duration = Duration::from_millis(1500);
/// Throughput bins.
const BIN: Duration = Duration::from_millis(100);

/// The server's side of ECHO and SINK connections: every byte checked.
pub(crate) fn serve_one(
    s: &mut (impl Read + Write),
    kind: u8,
    size: usize,
    pat: &Pattern,
) -> Result<()> {
    ensure!(size > 0, "zero-sized messages");
    s.write_all(&[READY])?;
    let mut b = vec![0u8; size];
    let mut got = 0u64;
    if kind == ECHO {
        loop {
            let mut n = 0;
            while n < size {
                let k = s.read(&mut b[n..])?;
                if k == 0 {
                    ensure!(n == 0, "echo ended inside a message at byte {got}");
                    return Ok(());
                }
                n += k;
            }
            ensure!(pat.check(got, &b), "echo corrupt at byte {got}");
            got += size as u64;
            s.write_all(&b)?;
        }
    }
    loop {
        let n = s.read(&mut b)?;
        if n == 0 {
            break;
        }
        ensure!(pat.check(got, &b[..n]), "sink corrupt at byte {got}");
        got += n as u64;
    }
    s.write_all(&[ACK])?;
    Ok(())
}

/// When each switch happened, seconds from the start.
#[derive(Debug, Clone, Copy, Default)]
struct Times {
    /// With two links or more: link 0 out of service, both connections on
    /// another link (start 0: no such move).
    link0_down: f64,
    other_link: f64,
    down: f64,
    moved: f64,
    up: f64,
    forward: f64,
    end: f64,
}

/// Host a's devd's remote connections: (path, forwards, moves between
/// links) of each live one.
fn paths(s: &ssock_client::Session) -> Result<Vec<(String, u64, u64)>> {
    let v = ssock_tools::fetch_stats(s)?;
    Ok(v["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                c["path"].as_str()?.to_string(),
                c["forwards"].as_u64().unwrap_or(0),
                c["migrations"].as_u64().unwrap_or(0),
            ))
        })
        .collect())
}

/// Polls (every 5 ms, up to `within`) until `done` holds of the paths.
fn until(
    s: &ssock_client::Session,
    within: Duration,
    what: &str,
    done: impl Fn(&[(String, u64, u64)]) -> bool,
) -> Result<()> {
    let t = Instant::now();
    loop {
        let p = paths(s)?;
        if done(&p) {
            return Ok(());
        }
        ensure!(t.elapsed() < within, "{what}: not within {within:?}: {p:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures one drop/restore cycle; returns the report's section.
pub(crate) fn measure(x: &Ctx, socket: &Path, markdown: bool) -> Result<String> {
    let s = ssock_client::Session::connect(socket)
        .map_err(|e| anyhow!("devd at {}: {e}", socket.display()))?;
    let v = ssock_tools::fetch_stats(&s)?;
    let node = v["peers"][0]["node"]
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .context("host a's devd has no peer")?;
    let links = v["peers"][0]["links"].as_array().map_or(0, Vec::len);
    let one = |link: Option<u8>, up: bool| -> Result<()> {
        s.request(&Request::Link { node, link, up }, &[])
            .map(|_| ())
            .map_err(|e| anyhow!("ringstat link {node}: {e} (root only)"))
    };
    let link = |up: bool| one(None, up);
    let mut ping = open(&x.peer, Transport::Queued, ECHO, None, PING_SIZE, 0)?;
    let mut sink = open(&x.peer, Transport::Queued, SINK, None, CHUNK, 0)?;
    until(&s, Duration::from_secs(10), "both on the link", |p| {
        p.iter().filter(|(path, _, _)| path == "link").count() >= 2
    })?;
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let rtts: Mutex<Vec<(f64, f64)>> = Mutex::new(Vec::new());
    let bins: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let times = std::thread::scope(|sc| -> Result<Times> {
        let pinger = sc.spawn(|| -> Result<()> {
            let mut b = vec![0u8; PING_SIZE];
            let mut out = vec![0u8; PING_SIZE];
            let mut off = 0u64;
            let mut got = Vec::with_capacity(1 << 20);
            while !stop.load(Ordering::Relaxed) {
                x.pat.fill(off, &mut out);
                let t0 = Instant::now();
                ping.write_all(&out)?;
                ping.read_exact(&mut b)?;
                let t1 = Instant::now();
                ensure!(b == out, "echo differs at byte {off}");
                got.push((
                    t0.duration_since(start).as_secs_f64(),
                    t1.duration_since(t0).as_secs_f64() * 1e6,
                ));
                off += PING_SIZE as u64;
            }
            *rtts.lock().unwrap_or_else(|p| p.into_inner()) = got;
            Ok(())
        });
        let streamer = sc.spawn(|| -> Result<()> {
            let src = stream_source(&x.pat, CHUNK);
            let mut sent = 0u64;
            let mut per: Vec<u64> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let at = idx(sent % PERIOD as u64);
                sink.write_all(&src[at..at + CHUNK])?;
                sent += CHUNK as u64;
                let bin = (start.elapsed().as_nanos() / BIN.as_nanos()) as usize;
                if per.len() <= bin {
                    per.resize(bin + 1, 0);
                }
                per[bin] += CHUNK as u64;
            }
            *bins.lock().unwrap_or_else(|p| p.into_inner()) = per;
            Ok(())
        });
        let secs = || start.elapsed().as_secs_f64();
        let r = (|| -> Result<Times> {
            let mut t = Times::default();
            std::thread::sleep(PHASE);
            if links >= 2 {
                t.link0_down = secs();
                one(Some(0), false)?;
                until(&s, Duration::from_secs(15), "both on another link", |p| {
                    p.iter()
                        .filter(|(path, _, m)| path == "link" && *m >= 1)
                        .count()
                        >= 2
                })?;
                t.other_link = secs();
                std::thread::sleep(PHASE);
                one(Some(0), true)?;
                // (Link 0 comes up again once both hosts hear it; the
                // connections stay where they are.)
                std::thread::sleep(PHASE);
            }
            t.down = secs();
            link(false)?;
            until(&s, Duration::from_secs(15), "both moved to TCP", |p| {
                p.iter().filter(|(path, _, _)| path == "tcp").count() >= 2
            })?;
            t.moved = secs();
            std::thread::sleep(PHASE);
            t.up = secs();
            link(true)?;
            until(&s, Duration::from_secs(60), "both moved forward", |p| {
                p.iter()
                    .filter(|(path, f, _)| path == "link" && *f >= 1)
                    .count()
                    >= 2
            })?;
            t.forward = secs();
            std::thread::sleep(PHASE);
            t.end = secs();
            Ok(t)
        })();
        stop.store(true, Ordering::Relaxed);
        let a = pinger
            .join()
            .map_err(|_| anyhow!("the ping thread panicked"))?;
        let b = streamer
            .join()
            .map_err(|_| anyhow!("the stream thread panicked"))?;
        let t = r?;
        a?;
        b?;
        Ok(t)
    })?;
    // Both ends say where their streams end; the sink answers once it
    // checked every byte.
    drop(ping);
    if let Conn::Ssock(st) = &mut sink {
        st.shutdown(std::net::Shutdown::Write)?;
    }
    let mut ack = [0u8; 1];
    sink.read_exact(&mut ack).context("the sink's answer")?;
    ensure!(ack[0] == ACK, "the sink answered {}", ack[0]);
    let rtts = rtts.into_inner().unwrap_or_else(|p| p.into_inner());
    let bins = bins.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok(report(&times, &rtts, &bins, markdown))
}

/// The throughput bin that time `secs` (from the start) begins (`up`:
/// the first whole one from there) or ends.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn bin_at(secs: f64, up: bool) -> usize {
    let b = (secs / BIN.as_secs_f64()).max(0.0);
    // A few hundred bins at most: far within usize, and not negative.
    (if up { b.ceil() } else { b.floor() }) as usize
}

fn report(t: &Times, rtts: &[(f64, f64)], bins: &[u64], markdown: bool) -> String {
    let within = |a: f64, b: f64| -> Vec<f64> {
        rtts.iter()
            .filter(|(at, _)| *at >= a && *at < b)
            .map(|&(_, r)| r)
            .collect()
    };
    // The stall a switch cost: the longest round trip that began between
    // the switch and 0.5 s after it completed.
    let worst = |a: f64, b: f64| within(a, b + 0.5).into_iter().fold(0.0, f64::max);
    let bin = BIN.as_secs_f64();
    let gbps = |a: f64, b: f64| -> f64 {
        let (i, j) = (bin_at(a, true), bin_at(b, false).min(bins.len()));
        if j <= i {
            return f64::NAN;
        }
        bins[i..j].iter().sum::<u64>() as f64 / ((j - i) as f64 * bin) / 1e9
    };
    let worst_bin = |a: f64, b: f64| -> f64 {
        let (i, j) = (bin_at(a, true), bin_at(b, false).min(bins.len()));
        bins.get(i..j)
            .into_iter()
            .flatten()
            .map(|&n| n as f64 / bin / 1e9)
            .fold(f64::INFINITY, f64::min)
    };
    let moved_links = t.link0_down > 0.0;
    // The phase on the link before the drop of every link starts after
    // the move between links, if there was one.
    let first = if moved_links { t.other_link + 0.5 } else { 0.0 };
    let mut out = String::new();
    if moved_links {
        let rows = [
            (
                "round trip, 64 B (us)".to_string(),
                [
                    format!("{:.1}", median(within(0.2, t.link0_down))),
                    format!("{:.0}", worst(t.link0_down, t.other_link)),
                    format!("{:.1}", median(within(t.other_link + 0.2, t.down))),
                ],
            ),
            (
                "stream, 64 KiB writes (GB/s)".to_string(),
                [
                    format!("{:.2}", gbps(0.2, t.link0_down)),
                    format!(
                        "{:.2} (worst 100 ms {:.2})",
                        gbps(t.link0_down, t.other_link + 0.5),
                        worst_bin(t.link0_down, t.other_link + 0.5)
                    ),
                    format!("{:.2}", gbps(t.other_link + 0.5, t.down)),
                ],
            ),
        ];
        let note = format!(
            "Host a's link 0 taken out of service at {:.2} s; both connections on another link {:.0} ms later, TCP untouched (docs/protocol.md 8.7); link 0 back in service {:.1} s later (the connections stay where they are). \"worst\" as below.",
            t.link0_down,
            (t.other_link - t.link0_down) * 1e3,
            PHASE.as_secs_f64()
        );
        table(
            &mut out,
            "Moving between two links (link 0 out of service)",
            &note,
            &["", "on link 0", "link 0 down: worst", "on another link"],
            &rows,
            markdown,
        );
    }
    let rows = [
        (
            "round trip, 64 B (us)".to_string(),
            [
                format!("{:.1}", median(within(first + 0.2, t.down))),
                format!("{:.0}", worst(t.down, t.moved)),
                format!("{:.1}", median(within(t.moved + 0.2, t.up))),
                format!("{:.0}", worst(t.up, t.forward)),
                format!("{:.1}", median(within(t.forward + 0.2, t.end))),
            ],
        ),
        (
            "stream, 64 KiB writes (GB/s)".to_string(),
            [
                format!("{:.2}", gbps(first + 0.2, t.down)),
                format!(
                    "{:.2} (worst 100 ms {:.2})",
                    gbps(t.down, t.moved + 0.5),
                    worst_bin(t.down, t.moved + 0.5)
                ),
                format!("{:.2}", gbps(t.moved + 0.5, t.up)),
                format!(
                    "{:.2} (worst 100 ms {:.2})",
                    gbps(t.up, t.forward + 0.5),
                    worst_bin(t.up, t.forward + 0.5)
                ),
                format!("{:.2}", gbps(t.forward + 0.5, t.end)),
            ],
        ),
    ];
    let head = [
        "",
        "on the link",
        "link down: worst",
        "on TCP",
        "link back: worst",
        "on the link again",
    ];
    let title = if moved_links {
        "Switching between the links and TCP (every link dropped and restored)"
    } else {
        "Switching between the link and TCP (one drop and restore)"
    };
    let note = format!(
        "Host a's link taken out of service at {:.2} s; both connections on their kernel sockets {:.0} ms later; back in service at {:.2} s; both on the link again {:.0} ms later (devd's fail_forward_ms hold included). \"worst\": for the round trip, the longest one that began between the switch and 0.5 s after it completed (the stall the program saw); for the stream, its throughput over that time and its worst 100 ms.",
        t.down,
        (t.moved - t.down) * 1e3,
        t.up,
        (t.forward - t.up) * 1e3
    );
    table(&mut out, title, &note, &head, &rows, markdown);
    out
}

/// One table of the report: `head` names the columns (the first is the
/// rows' names), each row a name and its cells.
fn table<const N: usize>(
    out: &mut String,
    title: &str,
    note: &str,
    head: &[&str],
    rows: &[(String, [String; N])],
    markdown: bool,
) {
    if markdown {
        out.push_str(&format!("\n### {title}\n\n{note}\n\n|"));
        for h in head {
            out.push_str(&format!(" {h} |"));
        }
        out.push_str("\n|");
        for _ in head {
            out.push_str("---|");
        }
        out.push('\n');
        for (name, cells) in rows {
            out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
        }
    } else {
        out.push_str(&format!("\n{title}\n{note}\n"));
        for (name, cells) in rows {
            out.push_str(&format!("  {name}\n"));
            for (h, c) in head[1..].iter().zip(cells) {
                out.push_str(&format!("    {h:<20} {c}\n"));
            }
        }
    }
}
