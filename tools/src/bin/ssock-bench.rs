//! `ssock-bench`: kernel TCP, Direct and Queued side by side, measured in
//! one run with the transports interleaved round by round.
//!
//! ```text
//! ssock-bench [--rounds N] [--quick] [--json] [--devd private|existing]
//! ```
//! Ping-pong half round trip (1 B, 1 KiB, 64 KiB) and 64 KiB streaming
//! throughput. A child process (this binary, `serve` role) is the peer; it
//! verifies every byte it receives, and so does the measuring side. A
//! connection that did not get the transport asked for is an error: a
//! silent fallback would make the table lie.

#![forbid(unsafe_code)]

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use ssock_client::{Listener, Mode, ModePref, Options, Stream};
use ssock_tools::pattern::{Pattern, PERIOD};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KINDS: [(&str, ModePref); 3] = [
    ("kernel", ModePref::Kernel),
    ("direct", ModePref::Direct),
    ("queued", ModePref::Queued),
];

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
enum Test {
    PingPong { size: usize, iters: u64 },
    Stream { chunk: usize, bytes: u64 },
}

impl Test {
    fn name(&self) -> String {
        match self {
            Test::PingPong { size, .. } => format!("ping-pong {}", human(*size)),
            Test::Stream { chunk, .. } => format!("stream {} writes", human(*chunk)),
        }
    }
    fn unit(&self) -> &'static str {
        match self {
            Test::PingPong { .. } => "us",
            Test::Stream { .. } => "GB/s",
        }
    }
}

fn human(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} B")
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = if args.first().map(String::as_str) == Some("serve") {
        serve()
    } else {
        bench(&args)
    };
    if let Err(e) = r {
        eprintln!("ssock-bench: {e:#}");
        std::process::exit(1);
    }
}

/// The peer: accepts one connection at a time and runs what its header asks.
fn serve() -> Result<()> {
    let l = Listener::bind_with("127.0.0.1:0", &Options::default())?;
    ensure!(
        l.registered(),
        "the bench peer could not register its listener with devd"
    );
    println!("{}", l.local_addr()?.port());
    std::io::stdout().flush()?;
    let pat = Pattern::new(7);
    loop {
        let (mut s, _) = l.accept()?;
        s.tcp().set_nodelay(true)?;
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let kind = h[0];
        let size = u32::from_le_bytes(h[4..8].try_into()?) as usize;
        let count = u64::from_le_bytes(h[8..16].try_into()?);
        match kind {
            0 => return Ok(()),
            1 => {
                let mut b = vec![0u8; size];
                for i in 0..count {
                    s.read_exact(&mut b)?;
                    ensure!(pat.check(i * size as u64, &b), "ping {i} corrupt");
                    s.write_all(&b)?;
                }
            }
            2 => {
                let mut b = vec![0u8; size];
                let mut got = 0u64;
                while got < count {
                    let n = s.read(&mut b)?;
                    ensure!(n > 0, "stream ended early at {got}");
                    ensure!(pat.check(got, &b[..n]), "stream corrupt at {got}");
                    got += n as u64;
                }
                s.write_all(&[1])?;
            }
            k => bail!("unknown test kind {k}"),
        }
    }
}

fn connect(addr: SocketAddr, kind: &str, pref: ModePref, test: &Test) -> Result<Stream> {
    let s = Stream::connect_with(
        addr,
        &Options {
            mode: pref,
            ..Options::default()
        },
    )?;
    let want = match pref {
        ModePref::Kernel => Mode::Kernel,
        ModePref::Queued => Mode::Queued,
        _ => Mode::Direct,
    };
    ensure!(
        s.mode() == want,
        "{kind}: asked for {} but the connection is {} (fallback: {:?})",
        want.name(),
        s.mode().name(),
        s.fallback_reason()
    );
    s.tcp().set_nodelay(true)?;
    let _ = test;
    Ok(s)
}

/// Runs one test on a fresh connection; returns half round trip in us or GB/s.
fn run_one(addr: SocketAddr, kind: &str, pref: ModePref, test: Test, pat: &Pattern) -> Result<f64> {
    let mut s = connect(addr, kind, pref, &test)?;
    let mut h = [0u8; 16];
    match test {
        Test::PingPong { size, iters } => {
            h[0] = 1;
            h[4..8].copy_from_slice(&u32::try_from(size)?.to_le_bytes());
            h[8..16].copy_from_slice(&iters.to_le_bytes());
            s.write_all(&h)?;
            let mut out = vec![0u8; size];
            let mut inb = vec![0u8; size];
            // Warm-up excluded: the first 1/10 of the iterations.
            let warm = iters / 10;
            let mut t0 = Instant::now();
            for i in 0..iters {
                if i == warm {
                    t0 = Instant::now();
                }
                pat.fill(i * size as u64, &mut out);
                s.write_all(&out)?;
                s.read_exact(&mut inb)?;
                ensure!(inb == out, "pong {i} differs");
            }
            let dt = t0.elapsed();
            Ok(dt.as_secs_f64() * 1e6 / ((iters - warm) as f64 * 2.0))
        }
        Test::Stream { chunk, bytes } => {
            h[0] = 2;
            h[4..8].copy_from_slice(&u32::try_from(chunk)?.to_le_bytes());
            h[8..16].copy_from_slice(&bytes.to_le_bytes());
            s.write_all(&h)?;
            // The payload is generated before the clock starts: byte `o` of
            // the stream is the pattern's byte `o % PERIOD`, so one period
            // plus one chunk holds every chunk the stream can need. The
            // receiver verifies every byte.
            let mut src = vec![0u8; PERIOD + chunk];
            pat.fill(0, &mut src);
            let t0 = Instant::now();
            let mut sent = 0u64;
            while sent < bytes {
                let off = ssock_rings::idx(sent % PERIOD as u64);
                let n = chunk.min(usize::try_from(bytes - sent).unwrap_or(chunk));
                s.write_all(&src[off..off + n])?;
                sent += n as u64;
            }
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack)?;
            Ok(bytes as f64 / t0.elapsed().as_secs_f64() / 1e9)
        }
    }
}

#[derive(Debug, Serialize)]
struct Row {
    test: String,
    unit: &'static str,
    /// Per transport: samples of every round.
    samples: Vec<(String, Vec<f64>)>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn bench(args: &[String]) -> Result<()> {
    let mut rounds = 5;
    let mut quick = false;
    let mut json = false;
    let mut devd_choice = "private".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => rounds = it.next().context("--rounds N")?.parse()?,
            "--quick" => quick = true,
            "--json" => json = true,
            "--devd" => devd_choice = it.next().context("--devd private|existing")?.clone(),
            "-h" | "--help" => {
                println!(
                    "usage: ssock-bench [--rounds N] [--quick] [--json] [--devd private|existing]"
                );
                return Ok(());
            }
            _ => bail!("unknown argument {a}"),
        }
    }
    ensure!(rounds >= 1, "--rounds must be at least 1");
    let _private = match devd_choice.as_str() {
        "private" => {
            let d = ssock_tools::start_private_devd(&[])?;
            // Set before this process starts any thread; the peer inherits it.
            std::env::set_var(ssock_rings::paths::SOCKET_ENV, &d.socket);
            Some(d)
        }
        "existing" => None,
        o => bail!("--devd {o}: expected private or existing"),
    };
    let socket = ssock_rings::paths::client_socket();
    ssock_tools::wait_for(&socket, Duration::from_secs(5))?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .env(ssock_rings::paths::SOCKET_ENV, &socket)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the bench peer")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("peer stdout")?).read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .parse()
        .context("peer did not report its port")?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let scale = if quick { 20 } else { 1 };
    let tests = [
        Test::PingPong {
            size: 1,
            iters: 20_000 / scale,
        },
        Test::PingPong {
            size: 1024,
            iters: 20_000 / scale,
        },
        Test::PingPong {
            size: 65536,
            iters: 2_000 / scale,
        },
        Test::Stream {
            chunk: 65536,
            bytes: (1024 / scale) << 20,
        },
    ];
    let pat = Pattern::new(7);
    let mut rows: Vec<Row> = tests
        .iter()
        .map(|t| Row {
            test: t.name(),
            unit: t.unit(),
            samples: KINDS.iter().map(|(k, _)| (k.to_string(), vec![])).collect(),
        })
        .collect();
    let result = (|| -> Result<()> {
        for _ in 0..rounds {
            for (ti, t) in tests.iter().enumerate() {
                for (ki, (k, pref)) in KINDS.iter().enumerate() {
                    let v = run_one(addr, k, *pref, *t, &pat)
                        .with_context(|| format!("{k} {}", t.name()))?;
                    rows[ti].samples[ki].1.push(v);
                }
            }
        }
        Ok(())
    })();
    // Tell the peer to exit (plain connection, header kind 0).
    if let Ok(mut s) = Stream::connect_with(
        addr,
        &Options {
            mode: ModePref::Kernel,
            ..Options::default()
        },
    ) {
        let _ = s.write_all(&[0u8; 16]);
    }
    // The peer exits on the quit header, or when its connection breaks;
    // do not wait for it forever.
    let t = Instant::now();
    while matches!(child.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    result?;
    if json {
        let out: Vec<_> = rows
            .iter()
            .map(|r| {
                let k = median(&r.samples[0].1);
                serde_json::json!({
                    "test": r.test,
                    "unit": r.unit,
                    "transports": r.samples.iter().map(|(name, s)| {
                        let m = median(s);
                        serde_json::json!({
                            "transport": name,
                            "median": m,
                            "min": s.iter().copied().fold(f64::INFINITY, f64::min),
                            "max": s.iter().copied().fold(0.0, f64::max),
                            "samples": s,
                            "ratio_to_kernel": m / k,
                        })
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "rounds": rounds, "results": out }))?
        );
    } else {
        println!("ssock-bench: {rounds} rounds, transports interleaved; median [min-max], ratio = median / kernel median");
        println!(
            "{:<22} {:>26} {:>34} {:>34}",
            "test", "kernel TCP", "direct", "queued"
        );
        for r in &rows {
            let k = median(&r.samples[0].1);
            let cell = |s: &Vec<f64>| {
                let lo = s.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = s.iter().copied().fold(0.0, f64::max);
                (median(s), lo, hi)
            };
            let (km, klo, khi) = cell(&r.samples[0].1);
            let mut line = format!(
                "{:<22} {:>26}",
                format!("{} ({})", r.test, r.unit),
                format!("{km:.2} [{klo:.2}-{khi:.2}]")
            );
            for (_, s) in &r.samples[1..] {
                let (m, lo, hi) = cell(s);
                line.push_str(&format!(
                    " {:>34}",
                    format!("{m:.2} [{lo:.2}-{hi:.2}] {:.3}x", m / k)
                ));
            }
            println!("{line}");
        }
    }
    Ok(())
}
