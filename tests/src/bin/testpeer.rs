//! `ssock-testpeer`: a real client process for the integration tests.
//!
//! ```text
//! ssock-testpeer serve ADDR MODE SCRIPT [N]    prints "PORT p", accepts, runs SCRIPT
//! ssock-testpeer connect ADDR MODE SCRIPT [N]  connects, runs SCRIPT
//! MODE: auto | direct | queued | kernel
//! SCRIPT: exchange N | send N | send-forever | recv | echo | hold N | hostile-direct | hostile-queued
//! ```
//! Every accepted/connected stream prints "MODE <mode> <conn id or 0> [reason]"
//! (the reason: why it stayed on kernel TCP, when there is one).
//! Results are printed as lines starting with OK, RECV or ERR.

#![forbid(unsafe_code)]

use anyhow::{bail, ensure, Context, Result};
use ssock_client::{
    negotiate_connect, Listener, Mode, ModePref, Options, Outcome, Session, Stream,
};
use ssock_rings::codec::Request;
use ssock_rings::layout::{self, DirectLayout, QueuedLayout};
use ssock_rings::shm::Mapping;
use ssock_rings::sys::EventFd;
use ssock_tests::pattern::Pattern;
use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

const CHUNK: usize = 64 * 1024;

fn main() {
    if let Err(e) = run() {
        println!("ERR {e:#}");
        std::process::exit(1);
    }
}

fn mode(s: &str) -> Result<ModePref> {
    Ok(match s {
        "auto" => ModePref::Auto,
        "direct" => ModePref::Direct,
        "queued" => ModePref::Queued,
        "kernel" => ModePref::Kernel,
        _ => bail!("unknown mode {s}"),
    })
}

fn announce(s: &Stream) {
    let why = s.fallback_reason().map_or("", |r| r.name());
    println!(
        "MODE {} {} {why}",
        s.mode().name(),
        s.conn_id().unwrap_or(0)
    );
}

fn wait_stdin() {
    let mut l = String::new();
    let _ = std::io::stdin().lock().read_line(&mut l);
}

fn run() -> Result<()> {
    let _ = ssock_rings::sys::raise_nofile_limit();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [role, addr, m, script, rest @ ..] = args.as_slice() else {
        bail!("usage: ssock-testpeer serve|connect ADDR MODE SCRIPT [N]");
    };
    let addr: SocketAddr = addr.parse()?;
    let opts = Options {
        mode: mode(m)?,
        ..Options::default()
    };
    let n: u64 = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(0);
    match role.as_str() {
        "serve" => {
            let l = Listener::bind_with(addr, &opts)?;
            println!(
                "PORT {} {}",
                l.local_addr()?.port(),
                if l.registered() {
                    "registered"
                } else {
                    "plain"
                }
            );
            if script == "hold" {
                let mut held = Vec::new();
                for _ in 0..n {
                    held.push(l.accept()?.0);
                }
                let direct = held.iter().filter(|s| s.mode() == Mode::Direct).count();
                println!("OK held {} direct {direct}", held.len());
                wait_stdin();
                return Ok(());
            }
            let (s, _) = l.accept()?;
            announce(&s);
            script_run(s, script, n, 2, 1)
        }
        "connect" => match script.as_str() {
            "hold" => {
                let mut held = Vec::new();
                for _ in 0..n {
                    held.push(Stream::connect_with(addr, &opts)?);
                }
                let direct = held.iter().filter(|s| s.mode() == Mode::Direct).count();
                println!("OK held {} direct {direct}", held.len());
                wait_stdin();
                Ok(())
            }
            "hostile-direct" | "hostile-queued" => hostile(addr, &opts, script),
            _ => {
                let s = Stream::connect_with(addr, &opts)?;
                announce(&s);
                script_run(s, script, n, 1, 2)
            }
        },
        _ => bail!("unknown role {role}"),
    }
}

/// `SSOCK_TEST_PACE_US`: a pause after each chunk read (exchange, recv),
/// so that a test can act while bytes are in flight.
fn pace() {
    let us: u64 = std::env::var("SSOCK_TEST_PACE_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if us > 0 {
        std::thread::sleep(std::time::Duration::from_micros(us));
    }
}

fn script_run(mut s: Stream, script: &str, n: u64, my_seed: u64, peer_seed: u64) -> Result<()> {
    let mine = Pattern::new(my_seed);
    let theirs = Pattern::new(peer_seed);
    match script {
        "exchange" => {
            // Lockstep: each round both sides write one chunk, then read
            // one; a chunk always fits the ring, so this cannot deadlock.
            let mut out = vec![0u8; CHUNK];
            let mut inb = vec![0u8; CHUNK];
            let (mut sent, mut got) = (0u64, 0u64);
            while sent < n {
                let k = CHUNK.min(usize::try_from(n - sent).unwrap_or(CHUNK));
                mine.fill(sent, &mut out[..k]);
                s.write_all(&out[..k])?;
                sent += k as u64;
                s.read_exact(&mut inb[..k])
                    .context("reading the peer's chunk")?;
                if !theirs.check(got, &inb[..k]) {
                    bail!("corrupt bytes at offset {got}");
                }
                got += k as u64;
                if got >= 1 << 20 && got - (k as u64) < 1 << 20 {
                    println!("EXCHANGING");
                }
                pace();
            }
            s.shutdown(Shutdown::Write)?;
            let tail = s.read(&mut inb)?;
            if tail != 0 {
                bail!("{tail} unexpected bytes after the exchange");
            }
            println!("OK exchange {sent} {got}");
            match s.moved_back() {
                Some(again) => println!("MOVED-BACK {again}"),
                None => println!("MOVED-BACK no"),
            }
            Ok(())
        }
        "send" | "send-forever" => {
            let mut out = vec![0u8; CHUNK];
            let mut sent = 0u64;
            while script == "send-forever" || sent < n {
                let k = if script == "send" {
                    CHUNK.min(usize::try_from(n - sent).unwrap_or(CHUNK))
                } else {
                    CHUNK
                };
                mine.fill(sent, &mut out[..k]);
                if let Err(e) = s.write_all(&out[..k]) {
                    println!("ERR write after {sent}: {e}");
                    return Ok(());
                }
                sent += k as u64;
                if sent >= 1 << 20 && sent - (k as u64) < 1 << 20 {
                    println!("SENDING");
                }
            }
            println!("OK send {sent}");
            match s.moved_back() {
                Some(again) => println!("MOVED-BACK {again}"),
                None => println!("MOVED-BACK no"),
            }
            Ok(())
        }
        "trickle" => {
            // n bytes in 64 KiB chunks, 5 ms apart: slow enough to watch.
            let mut out = vec![0u8; CHUNK];
            let mut sent = 0u64;
            while sent < n {
                let k = CHUNK.min(usize::try_from(n - sent).unwrap_or(CHUNK));
                mine.fill(sent, &mut out[..k]);
                s.write_all(&out[..k])?;
                sent += k as u64;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            println!("OK trickle {sent}");
            Ok(())
        }
        "recv" => {
            let mut inb = vec![0u8; CHUNK];
            let mut got = 0u64;
            loop {
                match s.read(&mut inb) {
                    Ok(0) => {
                        println!("RECV {got} EOF");
                        match s.moved_back() {
                            Some(again) => println!("MOVED-BACK {again}"),
                            None => println!("MOVED-BACK no"),
                        }
                        return Ok(());
                    }
                    Ok(k) => {
                        if !theirs.check(got, &inb[..k]) {
                            bail!("corrupt bytes at offset {got}");
                        }
                        got += k as u64;
                        pace();
                    }
                    Err(e) => {
                        println!(
                            "RECV {got} ERR {}",
                            e.raw_os_error().map_or(e.kind().to_string(), errno_name)
                        );
                        return Ok(());
                    }
                }
            }
        }
        "echo" => {
            let mut b = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                let k = s.read(&mut b)?;
                if k == 0 {
                    break;
                }
                s.write_all(&b[..k])?;
                total += k as u64;
            }
            s.shutdown(Shutdown::Write)?;
            println!("OK echo {total}");
            Ok(())
        }
        "halfclose" => {
            // Send n bytes, shut down writing, then read the echo to EOF.
            let mut out = vec![0u8; usize::try_from(n)?];
            mine.fill(0, &mut out);
            s.write_all(&out)?;
            s.shutdown(Shutdown::Write)?;
            let mut back = Vec::new();
            s.read_to_end(&mut back)?;
            if back != out {
                bail!("echo differs: {} bytes back of {}", back.len(), out.len());
            }
            println!("OK halfclose {}", back.len());
            Ok(())
        }
        _ => bail!("unknown script {script}"),
    }
}

fn errno_name(e: i32) -> String {
    match e {
        libc::ECONNRESET => "ECONNRESET".into(),
        libc::EPIPE => "EPIPE".into(),
        _ => format!("errno {e}"),
    }
}

/// Negotiates like a real client, then breaks the ring protocol.
fn hostile(addr: SocketAddr, opts: &Options, script: &str) -> Result<()> {
    let n = negotiate_connect(addr, opts)?;
    // A fresh process: its first connection gets a new region with fds.
    let Outcome::Attached(ssock_client::negotiate::Pending {
        attachment: a, fds, ..
    }) = n.outcome
    else {
        bail!("hostile peer was not attached: {:?}", n.outcome);
    };
    let size = usize::try_from(a.region_size)?;
    let map = Mapping::map(fds[0].as_fd(), size, true)?;
    println!("MODE {} {}", a.mode.name(), a.conn_id);
    // Like a real connector: once devd says the acceptor claimed the
    // connection, this side's writes move to the region (after 0 bytes on
    // the kernel socket), where the acceptor then reads.
    // The hand-over words: Direct's region, or Queued's shared page.
    let words = if script == "hostile-direct" {
        None
    } else {
        Some(Mapping::map(fds[3].as_fd(), layout::HOV_PAGE, true)?)
    };
    let words = words.as_ref().unwrap_or(&map);
    let start = std::time::Instant::now();
    while layout::claim(words) != layout::CLAIM_ACCEPTED {
        if start.elapsed() > std::time::Duration::from_secs(10) {
            bail!("the acceptor never claimed the connection");
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    layout::publish_switch(words, 0, layout::Switch::After(0));
    if script == "hostile-direct" {
        let l = DirectLayout::announced(size, a.geom_a)?;
        // Claim more bytes than the ring holds, then wake the peer.
        map.u64_at(l.dir(0).head)
            .store(l.cap as u64 * 3 + 17, Ordering::Release);
        // Then wake the acceptor if it sleeps, as a real connector would:
        // by the doorbell its wait word names, asked of devd.
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(2) {
            if map.u32_at(l.dir(0).cons_wait).load(Ordering::Acquire) & 1 == 1 {
                let id = map.u32_at(l.dir(0).cons_bell).load(Ordering::Relaxed);
                let s = opts
                    .session
                    .clone()
                    .or_else(Session::global)
                    .context("no session")?;
                let (_, bell) = s.request(&Request::Bell { id }, &[])?;
                let bell = bell.into_iter().next().context("no doorbell")?;
                ensure!(
                    ssock_rings::sys::ring_bell(bell.as_fd()),
                    "the doorbell did not ring"
                );
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    } else {
        let l = QueuedLayout::announced(size, a.geom_a, a.geom_b)?;
        let q = l.queues[0];
        // A descriptor that chains to itself, pointing outside the region.
        map.u64_at(q.desc).store(u64::MAX - 4096, Ordering::Relaxed);
        map.u32_at(q.desc + 8).store(4096, Ordering::Relaxed);
        map.u16_at(q.desc + 12)
            .store(ssock_rings::vq::F_NEXT, Ordering::Relaxed);
        map.u16_at(q.desc + 14).store(0, Ordering::Relaxed);
        map.u16_at(q.avail + 4).store(0, Ordering::Relaxed);
        map.u16_at(q.avail + 2).store(1, Ordering::Release);
        let kick = EventFd::from_owned(fds[1].try_clone()?);
        kick.notify()?;
    }
    println!("OK hostile");
    wait_stdin();
    drop(n.tcp);
    Ok(())
}
