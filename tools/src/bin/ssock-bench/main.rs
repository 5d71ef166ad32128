//! `ssock-bench`: kernel TCP, AF_UNIX, Direct and Queued side by side,
//! measured in one run with the transports interleaved round by round.
//!
//! ```text
//! ssock-bench [--rounds N] [--quick] [--clients N] [--json | --csv | --markdown]
//!             [--raw] [--plot FILE.png] [--no-pin] [--devd private|existing]
//!             [--only TEXT] [--transports LIST] [--two-hosts DIR [--switch]]
//! ```
//! - ping-pong, 1 B to 64 KiB in powers of two: the half round trip of
//!   every message (one clock read per round trip, warm-up excluded), as
//!   median, p99 and the spread of the round medians;
//! - streaming throughput for writes of 1 KiB to 64 KiB;
//! - many connections: N clients, each on its own connection and thread,
//!   ping-ponging 1 B against one server (aggregate messages/s), and N
//!   concurrent 64 KiB streams (aggregate GB/s);
//! - CPU per message: CPU time of the client's and the server's threads
//!   and of devd over the timed ping-pong iterations;
//! - connection setup: connect, 1 byte each way, close, in a loop.
//!
//! By default the single-connection tests pin the measuring thread and the
//! serving thread to two different CPUs (`--no-pin`: the scheduler's
//! choice), as two hosts would have them; the many-connection tests never
//! pin.
//!
//! A child process (this binary, `serve` role) is the server: one thread per
//! connection, behind a TCP listener registered with devd, a plain TCP
//! listener (the kernel TCP baseline: neither the ssock library nor devd
//! is involved) and a Unix listener (AF_UNIX is a reference only). Both
//! processes verify every byte they receive. A connection that did not get the transport asked for is
//! an error: a silent fallback would make the table lie.

#![forbid(unsafe_code)]

mod switch;

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::time::{clock_getcpuclockid, ClockId};
use nix::unistd::Pid;
use serde_json::json;
use ssock_client::{Listener, Mode, ModePref, Options, Stream};
use ssock_rings::idx;
use ssock_tools::pattern::{Pattern, PERIOD};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const USAGE: &str = "ssock-bench: measures ssock against kernel TCP and AF_UNIX on this host:
ping-pong latency 1 B to 64 KiB (median, p99), streaming throughput by
write size, many connections at once, CPU per message and connection
setup rate, over kernel TCP, AF_UNIX, Direct and Queued interleaved round
by round, every byte verified. A child process of this binary serves.

usage: ssock-bench [--rounds N] [--quick] [--clients N] [--json | --csv | --markdown]
                   [--raw] [--json-out FILE] [--plot FILE.png] [--no-pin]
                   [--devd private|existing] [--only TEXT] [--transports LIST]
                   [--two-hosts DIR [--switch]]
  --rounds N      rounds, each runs every test on every transport (default 5)
  --quick         about 1/20 of the work per test (CI)
  --clients N     connections of the hot-spot and multi-stream tests (default 8)
  --json          print JSON (per-round values, medians, p99, min, max, ratios)
  --json-out FILE also write that JSON to FILE, whatever is printed
  --csv           print CSV, one row per test, size and transport
  --markdown      print the report as Markdown tables (docs/performance.md)
  --raw           with --json: also every per-message latency sample
  --plot FILE     also draw latency and throughput against size into FILE (PNG)
  --no-pin        do not pin the two ends of single-connection tests to two CPUs
  --devd WHICH    private (default): start a devd of our own (its short_lived policy off); existing: use the running one
  --only TEXT     run only the tests whose name contains TEXT
  --transports L  only these transports, comma-separated: kernel,unix,direct,queued
  --two-hosts DIR run on host a of the two-host lab in DIR (tools/two-host-lab.sh),
                  against a peer on host b: kernel TCP over the veth and Queued
                  over the ntb link, ping-pong, streaming and --clients streams
                  at once (run it with
                  `two-host-lab.sh exec DIR a`: host a's devd, root)
  --switch        with --two-hosts: then one link drop and restore under a
                  ping-pong and a stream (the stall each switch cost, the
                  throughput across it; docs/protocol.md 8.5, 8.6)
  -h, --help      print this help
  -V, --version   print the version

environment:
  SSOCK_DEVD_SOCKET  with --devd existing: the devd to use (else
                     /run/ssock/devd.sock, else the per-user socket)
  XDG_RUNTIME_DIR    per-user socket $XDG_RUNTIME_DIR/ssock/devd.sock
                     (unset: /tmp/ssock-$UID/devd.sock)
  SSOCK_SPIN_US      spin budget of the Direct and Queued ends, microseconds
                     (default: devd's spin_us)";

/// The font `--plot` draws its labels with (Debian: fonts-dejavu-core).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Seed of the byte pattern both sides generate and verify.
const SEED: u64 = 7;

/// The transports, in table order; kernel TCP first: ratios are to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Kernel,
    Unix,
    Direct,
    Queued,
}

const TRANSPORTS: [Transport; 4] = [
    Transport::Kernel,
    Transport::Unix,
    Transport::Direct,
    Transport::Queued,
];

impl Transport {
    /// Name in JSON and CSV.
    fn name(self) -> &'static str {
        match self {
            Transport::Kernel => "kernel",
            Transport::Unix => "unix",
            Transport::Direct => "direct",
            Transport::Queued => "queued",
        }
    }

    /// Name in the table and the plot.
    fn title(self) -> &'static str {
        match self {
            Transport::Kernel => "kernel TCP",
            Transport::Unix => "AF_UNIX",
            Transport::Direct => "direct",
            Transport::Queued => "queued",
        }
    }

    /// What to ask ssock for and what the connection must then be; None
    /// for kernel TCP and AF_UNIX, which are a plain `TcpStream` to a
    /// plain listener and a plain `UnixStream`: the baselines involve
    /// neither the ssock library nor devd.
    fn mode(self) -> Option<(ModePref, Mode)> {
        match self {
            Transport::Direct => Some((ModePref::Direct, Mode::Direct)),
            Transport::Queued => Some((ModePref::Queued, Mode::Queued)),
            Transport::Kernel | Transport::Unix => None,
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
        // `serve [--bind IP]`: where its listeners are (default loopback).
        let bind = match args.get(1..) {
            Some([flag, ip]) if flag == "--bind" => ip.parse().context("--bind IP"),
            Some([]) => Ok(std::net::IpAddr::from([127, 0, 0, 1])),
            _ => Err(anyhow::anyhow!("usage: ssock-bench serve [--bind IP]")),
        };
        bind.and_then(serve)
    } else {
        bench(&args)
    };
    if let Err(e) = r {
        eprintln!("ssock-bench: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// Wire protocol between the measuring process and the server.
//
// The first byte of a connection says what it is for. QUIT and PROBE are
// that byte alone; PING and STREAM are followed by the rest of a 16-byte
// header: flags, a CPU number, 1 byte of padding, the size (u32 LE), the
// count (u64 LE). The server answers a header with READY once the
// connection has its thread (pinned to the CPU if the flags say PIN). After
// the last pong of a PING it sends the CPU time of that thread over the
// timed (non-warm-up) iterations, in ns (u64 LE).

/// Make the server process exit.
const QUIT: u8 = 0;
/// `count` round trips of `size`-byte messages, echoed.
const PING: u8 = 1;
/// `count` bytes read with `size`-byte reads, then one ACK byte back.
const STREAM: u8 = 2;
/// Connection setup: the server answers PROBE_REPLY and closes.
const PROBE: u8 = 3;
const PROBE_REPLY: u8 = 0x5a;
const READY: u8 = 0xa5;
const ACK: u8 = 1;
/// Header flag: pin the serving thread to the header's CPU.
const PIN: u8 = 1;

/// The warm-up part of `iters` ping-pong round trips, excluded from every
/// figure; the server uses the same split for its CPU time.
fn warm_up(iters: u64) -> u64 {
    iters / 10
}

fn header(kind: u8, pin: Option<u8>, size: usize, count: u64) -> Result<[u8; 16]> {
    let mut h = [0u8; 16];
    h[0] = kind;
    if let Some(cpu) = pin {
        h[1] = PIN;
        h[2] = cpu;
    }
    h[4..8].copy_from_slice(&u32::try_from(size)?.to_le_bytes());
    h[8..16].copy_from_slice(&count.to_le_bytes());
    Ok(h)
}

/// The server: prints "PORT UNIX_PATH PLAIN_PORT", then serves its three
/// listeners (ssock, AF_UNIX, plain kernel TCP), one
/// thread per measured connection, until a QUIT arrives. A failure in any
/// connection (a corrupt byte above all) ends the process with status 1,
/// which breaks the measuring side's connections and fails the run.
fn serve(bind: std::net::IpAddr) -> Result<()> {
    let l = Listener::bind_with(SocketAddr::new(bind, 0), &Options::default())?;
    ensure!(
        l.registered(),
        "the bench peer could not register its listener with devd"
    );
    let path = std::env::temp_dir().join(format!("ssock-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let u = UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
    let plain = TcpListener::bind(SocketAddr::new(bind, 0)).context("plain TCP listener")?;
    println!(
        "{} {} {}",
        l.local_addr()?.port(),
        path.display(),
        plain.local_addr()?.port()
    );
    std::io::stdout().flush()?;
    let pat = Arc::new(Pattern::new(SEED));
    let upat = Arc::clone(&pat);
    std::thread::spawn(move || loop {
        let r = u
            .accept()
            .context("AF_UNIX accept")
            .and_then(|(s, _)| dispatch(s, &upat));
        if let Err(e) = r {
            die(&e);
        }
    });
    let ppat = Arc::clone(&pat);
    std::thread::spawn(move || loop {
        let r = plain
            .accept()
            .context("plain TCP accept")
            .and_then(|(s, _)| {
                s.set_nodelay(true)?;
                dispatch(s, &ppat)
            });
        if let Err(e) = r {
            die(&e);
        }
    });
    loop {
        let (s, _) = l.accept().context("accept")?;
        s.tcp().set_nodelay(true)?;
        dispatch(s, &pat)?;
    }
}

fn die(e: &anyhow::Error) -> ! {
    eprintln!("ssock-bench serve: {e:#}");
    std::process::exit(1)
}

/// Reads what a new connection is for; answers a probe at once, gives a
/// test connection its own thread.
fn dispatch<S: Read + Write + Send + 'static>(mut s: S, pat: &Arc<Pattern>) -> Result<()> {
    let mut k = [0u8; 1];
    s.read_exact(&mut k).context("reading the test kind")?;
    match k[0] {
        QUIT => std::process::exit(0),
        PROBE => s.write_all(&[PROBE_REPLY]).context("probe reply")?,
        PING | STREAM | switch::ECHO | switch::SINK => {
            let mut h = [0u8; 15];
            s.read_exact(&mut h).context("reading the test header")?;
            let size = usize::try_from(u32::from_le_bytes(h[3..7].try_into()?))?;
            let count = u64::from_le_bytes(h[7..15].try_into()?);
            let pin = (h[0] & PIN != 0).then_some(usize::from(h[1]));
            let pat = Arc::clone(pat);
            let kind = k[0];
            std::thread::spawn(move || {
                let r = pin.map_or(Ok(()), pin_to).and_then(|()| match kind {
                    PING | STREAM => handle(&mut s, kind, size, count, &pat),
                    _ => switch::serve_one(&mut s, kind, size, &pat),
                });
                if let Err(e) = r {
                    die(&e);
                }
            });
        }
        other => bail!("unknown test kind {other}"),
    }
    Ok(())
}

fn handle(
    s: &mut (impl Read + Write),
    kind: u8,
    size: usize,
    count: u64,
    pat: &Pattern,
) -> Result<()> {
    ensure!(size > 0, "zero-sized messages");
    s.write_all(&[READY])?;
    let mut b = vec![0u8; size];
    if kind == PING {
        let warm = warm_up(count);
        let mut cpu0 = thread_cpu()?;
        for i in 0..count {
            if i == warm {
                cpu0 = thread_cpu()?;
            }
            s.read_exact(&mut b)
                .with_context(|| format!("ping {i} of {size} B"))?;
            ensure!(
                pat.check(i * size as u64, &b),
                "ping {i} of {size} B corrupt"
            );
            s.write_all(&b)?;
        }
        let cpu = thread_cpu()?.saturating_sub(cpu0);
        s.write_all(&u64::try_from(cpu.as_nanos())?.to_le_bytes())?;
    } else {
        let mut got = 0u64;
        while got < count {
            let n = s.read(&mut b)?;
            ensure!(n > 0, "stream ended early at byte {got} of {count}");
            ensure!(pat.check(got, &b[..n]), "stream corrupt at byte {got}");
            got += n as u64;
        }
        s.write_all(&[ACK])?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The measuring side.

/// Where the server listens.
struct Peer {
    /// The ssock listener (registered with devd).
    tcp: SocketAddr,
    /// A plain kernel TCP listener, for the kernel TCP baseline.
    plain: SocketAddr,
    unix: PathBuf,
}

/// A client connection of any transport.
enum Conn {
    Ssock(Stream),
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Ssock(s) => s.read(b),
            Conn::Tcp(t) => t.read(b),
            Conn::Unix(u) => u.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Ssock(s) => s.write(b),
            Conn::Tcp(t) => t.write(b),
            Conn::Unix(u) => u.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connects over `t`; an ssock connection on another mode is an error.
fn connect(peer: &Peer, t: Transport) -> Result<Conn> {
    let Some((pref, want)) = t.mode() else {
        if t == Transport::Kernel {
            let c = TcpStream::connect(peer.plain)
                .with_context(|| format!("connecting to {}", peer.plain))?;
            c.set_nodelay(true)?;
            return Ok(Conn::Tcp(c));
        }
        let u = UnixStream::connect(&peer.unix)
            .with_context(|| format!("connecting to {}", peer.unix.display()))?;
        return Ok(Conn::Unix(u));
    };
    let s = Stream::connect_with(
        peer.tcp,
        &Options {
            mode: pref,
            ..Options::default()
        },
    )?;
    ensure!(
        s.mode() == want,
        "asked for {} but the connection is {} (fallback: {:?})",
        want.name(),
        s.mode().name(),
        s.fallback_reason()
    );
    s.tcp().set_nodelay(true)?;
    Ok(Conn::Ssock(s))
}

/// Connects, sends a test header and waits until the server is ready.
fn open(
    peer: &Peer,
    t: Transport,
    kind: u8,
    pin: Option<u8>,
    size: usize,
    count: u64,
) -> Result<Conn> {
    let mut c = connect(peer, t)?;
    c.write_all(&header(kind, pin, size, count)?)?;
    let mut r = [0u8; 1];
    c.read_exact(&mut r).context("waiting for the server")?;
    ensure!(r[0] == READY, "the server answered {} to a header", r[0]);
    Ok(c)
}

/// CPU time of the calling thread. Exact: the kernel brings the running
/// thread's count up to date when it reads it. A process clock read from
/// another process is not: a thread that spins without sleeping is counted
/// at the next scheduler tick, which is why each side reads its own
/// threads' clocks (no other thread of either process works during a test).
fn thread_cpu() -> Result<Duration> {
    Ok(Duration::from(
        ClockId::CLOCK_THREAD_CPUTIME_ID
            .now()
            .context("reading the thread CPU clock")?,
    ))
}

/// devd's process CPU clock, read from here. Its threads sleep whenever
/// they are idle (they never spin), so the count is up to date within one
/// wake-up's work.
struct DevdCpu(ClockId);

impl DevdCpu {
    fn new(devd: Pid) -> Result<DevdCpu> {
        Ok(DevdCpu(
            clock_getcpuclockid(devd).context("devd's CPU clock")?,
        ))
    }

    fn read(&self) -> Result<Duration> {
        Ok(Duration::from(
            self.0.now().context("reading devd's CPU clock")?,
        ))
    }
}

/// Reads the 8-byte CPU time the server sends after the last pong.
fn server_cpu(c: &mut Conn) -> Result<Duration> {
    let mut b = [0u8; 8];
    c.read_exact(&mut b)
        .context("reading the server's CPU time")?;
    Ok(Duration::from_nanos(u64::from_le_bytes(b)))
}

/// CPU us per message of client, server and devd.
fn per_message(cpu: [Duration; 3], messages: u64) -> [f64; 3] {
    cpu.map(|d| d.as_secs_f64() * 1e6 / messages as f64)
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}

/// Where the single-connection tests run: unless `--no-pin`, the measuring
/// thread on the first CPU this process may use, the serving thread on the
/// second. Threads of the many-connection tests may use every CPU.
#[derive(Clone, Copy)]
struct Placement {
    all: CpuSet,
    pair: Option<(usize, u8)>,
}

impl Placement {
    fn new(pin: bool) -> Result<Placement> {
        let all = sched_getaffinity(Pid::from_raw(0))?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| all.is_set(c).unwrap_or(false))
            .collect();
        let pair = match (pin, cpus.as_slice()) {
            (true, [a, b, ..]) => Some((*a, u8::try_from(*b)?)),
            // One CPU: nothing to pin apart (the report says no thread
            // was pinned).
            (true, _) => None,
            (false, _) => None,
        };
        Ok(Placement { all, pair })
    }

    /// The serving thread's CPU, for the header.
    fn server(&self) -> Option<u8> {
        self.pair.map(|(_, b)| b)
    }

    /// Lets the calling thread use every CPU again.
    fn unpin(&self) -> Result<()> {
        sched_setaffinity(Pid::from_raw(0), &self.all).context("unpinning")
    }
}

/// The pid of the devd answering at `socket` (SO_PEERCRED), for its CPU
/// clock. devd sees a control session that closes without a word.
fn devd_pid(socket: &Path) -> Result<Pid> {
    use nix::sys::socket::{
        connect, getsockopt, socket as new_socket, sockopt, AddressFamily, SockFlag, SockType,
        UnixAddr,
    };
    use std::os::fd::AsRawFd;
    let fd = new_socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(socket)?)
        .with_context(|| format!("connecting to devd at {}", socket.display()))?;
    let cred = getsockopt(&fd, sockopt::PeerCredentials)?;
    Ok(Pid::from_raw(cred.pid()))
}

/// What every test needs.
struct Ctx {
    peer: Peer,
    pat: Pattern,
    devd: DevdCpu,
    place: Placement,
    clients: usize,
}

/// One measurement on one transport.
#[derive(Debug, Default)]
struct Measured {
    /// The round's figure in the row's unit.
    value: f64,
    /// Per-message half round trips in us (latency tests).
    samples: Vec<f64>,
    /// CPU us per message of client, server and devd (ping-pong tests).
    cpu: Option<[f64; 3]>,
}

/// One side of a ping-pong: `iters` round trips of `size` bytes, the
/// first `warm_up(iters)` untimed. `each` is called after every timed
/// round trip with its end time. Returns the client's and the server's
/// CPU time over the timed round trips.
fn ping_loop(
    c: &mut Conn,
    pat: &Pattern,
    size: usize,
    iters: u64,
    mut each: impl FnMut(Instant),
    mut at_warm: impl FnMut() -> Result<()>,
) -> Result<(Duration, Duration)> {
    let mut out = vec![0u8; size];
    let mut inb = vec![0u8; size];
    let warm = warm_up(iters);
    let mut cpu0 = thread_cpu()?;
    for i in 0..iters {
        if i == warm {
            at_warm()?;
            cpu0 = thread_cpu()?;
            each(Instant::now());
        }
        pat.fill(i * size as u64, &mut out);
        c.write_all(&out)?;
        c.read_exact(&mut inb)
            .with_context(|| format!("pong {i}"))?;
        if i >= warm {
            each(Instant::now());
        }
        ensure!(inb == out, "pong {i} differs");
    }
    let client = thread_cpu()?.saturating_sub(cpu0);
    Ok((client, server_cpu(c)?))
}

/// Ping-pong on one connection; half round trips in us.
fn ping_pong(x: &Ctx, t: Transport, size: usize, iters: u64) -> Result<Measured> {
    let mut c = open(&x.peer, t, PING, x.place.server(), size, iters)?;
    let mut samples = Vec::with_capacity(idx(iters - warm_up(iters)));
    // One clock read per round trip: each sample is the time since the
    // previous one, the fill and the check included (an application
    // producing and consuming its data pays them too). The first call
    // only starts the clock.
    let mut prev: Option<Instant> = None;
    let each = |now: Instant| {
        if let Some(p) = prev {
            samples.push((now - p).as_secs_f64() * 1e6 / 2.0);
        }
        prev = Some(now);
    };
    let mut devd0 = Duration::ZERO;
    let at_warm = || -> Result<()> {
        devd0 = x.devd.read()?;
        Ok(())
    };
    let (client, server) = ping_loop(&mut c, &x.pat, size, iters, each, at_warm)?;
    let devd = x.devd.read()?.saturating_sub(devd0);
    let messages = 2 * (iters - warm_up(iters));
    Ok(Measured {
        value: percentile(&samples, 50),
        cpu: Some(per_message([client, server, devd], messages)),
        samples,
    })
}

/// Writes `bytes` of the pattern in `chunk`-byte writes and waits for the
/// receiver's ACK. `src` holds one pattern period plus one chunk, so every
/// chunk is a slice of it (byte `o` of the stream is pattern byte
/// `o % PERIOD`); it is generated before any clock starts.
fn send_stream(c: &mut Conn, src: &[u8], chunk: usize, bytes: u64) -> Result<()> {
    let mut sent = 0u64;
    while sent < bytes {
        let off = idx(sent % PERIOD as u64);
        let n = chunk.min(usize::try_from(bytes - sent).unwrap_or(chunk));
        c.write_all(&src[off..off + n])?;
        sent += n as u64;
    }
    let mut ack = [0u8; 1];
    c.read_exact(&mut ack).context("waiting for the ACK")?;
    ensure!(ack[0] == ACK, "the receiver answered {}", ack[0]);
    Ok(())
}

fn stream_source(pat: &Pattern, chunk: usize) -> Vec<u8> {
    let mut src = vec![0u8; PERIOD + chunk];
    pat.fill(0, &mut src);
    src
}

/// Streams `bytes` in `chunk`-byte writes; GB/s.
fn stream(x: &Ctx, t: Transport, chunk: usize, bytes: u64) -> Result<Measured> {
    let mut c = open(&x.peer, t, STREAM, x.place.server(), chunk, bytes)?;
    let src = stream_source(&x.pat, chunk);
    let t0 = Instant::now();
    send_stream(&mut c, &src, chunk, bytes)?;
    Ok(Measured {
        value: bytes as f64 / t0.elapsed().as_secs_f64() / 1e9,
        ..Measured::default()
    })
}

/// What one worker of `in_parallel` measured.
struct Timed {
    start: Instant,
    end: Instant,
    /// Client and server thread CPU over the timed part.
    cpu: (Duration, Duration),
}

/// What `in_parallel` measured: the span from the first timed start to the
/// last end, the sum of the workers' CPU times, devd's CPU time.
struct Parallel {
    span: Duration,
    cpu: [Duration; 3],
}

/// Runs `work` on every connection, each in its own thread free to use
/// every CPU. A worker calls `start.wait()` exactly once, when it is ready
/// to be timed (also when it failed before, so that the others are not
/// left waiting).
fn in_parallel<F>(x: &Ctx, conns: Vec<Conn>, work: F) -> Result<Parallel>
where
    F: Fn(Conn, &Barrier) -> Result<Timed> + Sync,
{
    let start = Barrier::new(conns.len() + 1);
    let (work, startr, place) = (&work, &start, &x.place);
    std::thread::scope(|sc| {
        let threads: Vec<_> = conns
            .into_iter()
            .map(|c| {
                sc.spawn(move || match place.unpin() {
                    Ok(()) => work(c, startr),
                    Err(e) => {
                        startr.wait();
                        Err(e)
                    }
                })
            })
            .collect();
        start.wait();
        let devd0 = x.devd.read();
        let mut span: Option<(Instant, Instant)> = None;
        let mut cpu = [Duration::ZERO; 3];
        let mut failed = None;
        for th in threads {
            match th.join() {
                Ok(Ok(t)) => {
                    span = Some(
                        span.map_or((t.start, t.end), |(a, b)| (a.min(t.start), b.max(t.end))),
                    );
                    cpu[0] += t.cpu.0;
                    cpu[1] += t.cpu.1;
                }
                Ok(Err(e)) => {
                    failed.get_or_insert(e);
                }
                Err(_) => {
                    failed.get_or_insert(anyhow!("a client thread panicked"));
                }
            }
        }
        let devd1 = x.devd.read()?;
        if let Some(e) = failed {
            return Err(e);
        }
        let (a, b) = span.context("no connections")?;
        cpu[2] = devd1.saturating_sub(devd0?);
        Ok(Parallel { span: b - a, cpu })
    })
}

/// Hot spot: `x.clients` connections, each ping-ponging from its own
/// thread against the one server; thousands of messages/s.
fn hot_spot(x: &Ctx, t: Transport, size: usize, iters: u64) -> Result<Measured> {
    let conns = (0..x.clients)
        .map(|_| open(&x.peer, t, PING, None, size, iters))
        .collect::<Result<Vec<_>>>()?;
    let p = in_parallel(x, conns, |mut c, start| {
        let mut t0 = None;
        let mut t1 = None;
        let mut waited = false;
        let r = ping_loop(
            &mut c,
            &x.pat,
            size,
            iters,
            |now| {
                t0.get_or_insert(now);
                t1 = Some(now);
            },
            || {
                waited = true;
                start.wait();
                Ok(())
            },
        );
        if !waited {
            start.wait();
        }
        let (client, server) = r?;
        Ok(Timed {
            start: t0.context("no timed round trip")?,
            end: t1.context("no timed round trip")?,
            cpu: (client, server),
        })
    })?;
    let messages = 2 * x.clients as u64 * (iters - warm_up(iters));
    Ok(Measured {
        value: messages as f64 / p.span.as_secs_f64() / 1e3,
        cpu: Some(per_message(p.cpu, messages)),
        ..Measured::default()
    })
}

/// Multi-stream: `x.clients` connections streaming `bytes` each at once;
/// aggregate GB/s.
fn multi_stream(x: &Ctx, t: Transport, chunk: usize, bytes: u64) -> Result<Measured> {
    let conns = (0..x.clients)
        .map(|_| open(&x.peer, t, STREAM, None, chunk, bytes))
        .collect::<Result<Vec<_>>>()?;
    let src = stream_source(&x.pat, chunk);
    let p = in_parallel(x, conns, |mut c, start| {
        start.wait();
        let t0 = Instant::now();
        send_stream(&mut c, &src, chunk, bytes)?;
        Ok(Timed {
            start: t0,
            end: Instant::now(),
            cpu: (Duration::ZERO, Duration::ZERO),
        })
    })?;
    Ok(Measured {
        value: (x.clients as u64 * bytes) as f64 / p.span.as_secs_f64() / 1e9,
        ..Measured::default()
    })
}

/// Connection setup rate: connect, one byte each way, close; thousands of
/// connections/s, the first tenth excluded as warm-up.
fn setup(x: &Ctx, t: Transport, count: u64) -> Result<Measured> {
    let warm = warm_up(count);
    let mut t0 = Instant::now();
    for i in 0..count {
        if i == warm {
            t0 = Instant::now();
        }
        let mut c = connect(&x.peer, t).with_context(|| format!("connection {i}"))?;
        c.write_all(&[PROBE])?;
        let mut r = [0u8; 1];
        c.read_exact(&mut r)
            .with_context(|| format!("probe reply {i}"))?;
        ensure!(r[0] == PROBE_REPLY, "probe {i} answered {}", r[0]);
    }
    Ok(Measured {
        value: (count - warm) as f64 / t0.elapsed().as_secs_f64() / 1e3,
        ..Measured::default()
    })
}

// ---------------------------------------------------------------------------
// Results.

/// The `per_cent` percentile (nearest rank) of `v`; NaN if empty.
fn percentile(v: &[f64], per_cent: usize) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[(per_cent * s.len()).div_ceil(100).saturating_sub(1)]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    PingPong,
    Cpu,
    Stream,
    Connections,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::PingPong => "ping-pong",
            Family::Cpu => "cpu",
            Family::Stream => "stream",
            Family::Connections => "connections",
        }
    }
}

/// The figures of one transport in one row.
#[derive(Debug, Default)]
struct Cell {
    /// One figure per round.
    rounds: Vec<f64>,
    /// Latency rows: the p99 of each round.
    round_p99: Vec<f64>,
    /// Latency rows: every per-message sample of every round.
    samples: Vec<f64>,
    /// CPU rows: client, server, devd us per message, per round.
    parts: Vec<[f64; 3]>,
}

impl Cell {
    fn median(&self) -> f64 {
        percentile(&self.rounds, 50)
    }
    fn min(&self) -> f64 {
        self.rounds.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.rounds
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }
    /// Over the per-message samples of all rounds; None for other rows.
    fn p99(&self) -> Option<f64> {
        (!self.samples.is_empty()).then(|| percentile(&self.samples, 99))
    }
    fn part_median(&self, i: usize) -> f64 {
        percentile(&self.parts.iter().map(|p| p[i]).collect::<Vec<_>>(), 50)
    }
}

/// One test: a row of the table, one cell per transport.
#[derive(Debug)]
struct Row {
    family: Family,
    test: String,
    /// Message or write size, 0 where none applies.
    size: usize,
    unit: &'static str,
    higher_is_better: bool,
    cells: Vec<Cell>,
}

impl Row {
    fn new(family: Family, test: String, size: usize, unit: &'static str) -> Row {
        Row {
            family,
            test,
            size,
            unit,
            higher_is_better: matches!(family, Family::Stream | Family::Connections),
            cells: TRANSPORTS.iter().map(|_| Cell::default()).collect(),
        }
    }
    fn ratio(&self, ti: usize) -> f64 {
        self.cells[ti].median() / self.cells[0].median()
    }
}

/// A test of the schedule and the rows it fills.
#[derive(Debug, Clone, Copy)]
enum Job {
    PingPong { size: usize, iters: u64 },
    Stream { chunk: usize, bytes: u64 },
    HotSpot { size: usize, iters: u64 },
    MultiStream { chunk: usize, bytes: u64 },
    Setup { count: u64 },
}

struct Scheduled {
    job: Job,
    row: usize,
    cpu_row: Option<usize>,
}

/// How much work each test does (per transport and round).
struct Plan {
    clients: usize,
    /// Ping-pong round trips for small messages; fewer for large ones.
    ping_iters: u64,
    stream_bytes: u64,
    hot_iters: u64,
    multi_bytes: u64,
    setup_count: u64,
}

impl Plan {
    fn new(quick: bool, clients: usize) -> Plan {
        let div = if quick { 20 } else { 1 };
        Plan {
            clients,
            ping_iters: 5000 / div,
            stream_bytes: (256 << 20) / div,
            hot_iters: 2000 / div,
            multi_bytes: (64 << 20) / div,
            setup_count: 1000 / div,
        }
    }

    /// Round trips for `size`: at most 64 MiB each way (in full runs).
    fn ping_iters(&self, size: usize) -> u64 {
        let full_budget = (64u64 << 20) / size as u64;
        self.ping_iters
            .min(full_budget * self.ping_iters / 5000)
            .max(20)
    }

    /// The rows and the order the tests run in (every round).
    fn schedule(&self) -> (Vec<Row>, Vec<Scheduled>) {
        let mut rows = Vec::new();
        let mut jobs = Vec::new();
        let sizes: Vec<usize> = (0..=16).map(|k| 1usize << k).collect();
        for &size in &sizes {
            let name = format!("ping-pong {}", human(size));
            let row = push(
                &mut rows,
                Row::new(Family::PingPong, name.clone(), size, "us"),
            );
            let cpu_row = push(&mut rows, Row::new(Family::Cpu, name, size, "us CPU/msg"));
            jobs.push(Scheduled {
                job: Job::PingPong {
                    size,
                    iters: self.ping_iters(size),
                },
                row,
                cpu_row: Some(cpu_row),
            });
        }
        for &chunk in &sizes[10..] {
            let name = format!("stream {} writes", human(chunk));
            let row = push(&mut rows, Row::new(Family::Stream, name, chunk, "GB/s"));
            jobs.push(Scheduled {
                job: Job::Stream {
                    chunk,
                    bytes: self.stream_bytes,
                },
                row,
                cpu_row: None,
            });
        }
        let n = self.clients;
        let name = format!("hot spot {n} x 1 B");
        let row = push(
            &mut rows,
            Row::new(Family::Connections, name.clone(), 1, "k msg/s"),
        );
        let cpu_row = push(&mut rows, Row::new(Family::Cpu, name, 1, "us CPU/msg"));
        jobs.push(Scheduled {
            job: Job::HotSpot {
                size: 1,
                iters: self.hot_iters,
            },
            row,
            cpu_row: Some(cpu_row),
        });
        let name = format!("{n} streams, 64 KiB writes");
        let row = push(
            &mut rows,
            Row::new(Family::Connections, name, 65536, "GB/s"),
        );
        jobs.push(Scheduled {
            job: Job::MultiStream {
                chunk: 65536,
                bytes: self.multi_bytes,
            },
            row,
            cpu_row: None,
        });
        let name = "setup: connect, 1 B each way, close".to_string();
        let row = push(
            &mut rows,
            Row::new(Family::Connections, name, 1, "k conn/s"),
        );
        jobs.push(Scheduled {
            job: Job::Setup {
                count: self.setup_count,
            },
            row,
            cpu_row: None,
        });
        (rows, jobs)
    }
}

/// The tests whose name contains `text`, their rows renumbered.
fn only(rows: Vec<Row>, jobs: Vec<Scheduled>, text: &str) -> (Vec<Row>, Vec<Scheduled>) {
    select(rows, jobs, |t| t.contains(text), true)
}

/// The jobs whose test `keep` says yes to, with their rows (and their CPU
/// rows if `cpu`).
fn select(
    rows: Vec<Row>,
    jobs: Vec<Scheduled>,
    keep: impl Fn(&str) -> bool,
    cpu: bool,
) -> (Vec<Row>, Vec<Scheduled>) {
    let wanted: Vec<Scheduled> = jobs
        .into_iter()
        .filter(|s| keep(&rows[s.row].test))
        .collect();
    let mut slot: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
    let mut kept = Vec::new();
    let mut take = |i: usize| {
        let r = slot[i].take().expect("a row belongs to one test");
        push(&mut kept, r)
    };
    let jobs = wanted
        .into_iter()
        .map(|s| Scheduled {
            row: take(s.row),
            cpu_row: s.cpu_row.filter(|_| cpu).map(&mut take),
            ..s
        })
        .collect();
    (kept, jobs)
}

fn push(rows: &mut Vec<Row>, r: Row) -> usize {
    rows.push(r);
    rows.len() - 1
}

fn run_job(x: &Ctx, job: Job, t: Transport) -> Result<Measured> {
    match job {
        Job::PingPong { size, iters } => ping_pong(x, t, size, iters),
        Job::Stream { chunk, bytes } => stream(x, t, chunk, bytes),
        Job::HotSpot { size, iters } => hot_spot(x, t, size, iters),
        Job::MultiStream { chunk, bytes } => multi_stream(x, t, chunk, bytes),
        Job::Setup { count } => setup(x, t, count),
    }
}

/// The clock read cost in ns (one per ping-pong sample).
fn clock_read_ns() -> f64 {
    let n = 100_000u32;
    let t0 = Instant::now();
    let mut last = t0;
    for _ in 0..n {
        last = std::hint::black_box(Instant::now());
    }
    (last - t0).as_secs_f64() * 1e9 / f64::from(n)
}

// ---------------------------------------------------------------------------
// The run.

struct Args {
    rounds: usize,
    quick: bool,
    clients: usize,
    json: bool,
    csv: bool,
    markdown: bool,
    raw: bool,
    plot: Option<PathBuf>,
    /// Also write the JSON report (without raw samples) to this file.
    json_out: Option<PathBuf>,
    pin: bool,
    devd: String,
    only: Option<String>,
    transports: Vec<Transport>,
    /// The two-host lab's directory (`tools/two-host-lab.sh`): this
    /// process runs on host a, its peer on host b.
    two_hosts: Option<PathBuf>,
    /// `--switch`.
    switch: bool,
}

/// Waits (up to 10 s) until the devd at `socket` heard a peer advertise a
/// listener on `port` (within 200 ms of its registration).
fn wait_advertised(socket: &Path, port: u16) -> Result<()> {
    let s = ssock_client::Session::connect(socket)
        .map_err(|e| anyhow::anyhow!("devd at {}: {e}", socket.display()))?;
    let t = Instant::now();
    let suffix = format!(":{port}");
    loop {
        let v = ssock_tools::fetch_stats(&s)?;
        let heard = v["peers"].as_array().into_iter().flatten().any(|p| {
            p["listeners"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|a| a.as_str().is_some_and(|a| a.ends_with(&suffix)))
            })
        });
        if heard {
            return Ok(());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "host a's devd never heard of the peer's listener on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Host b of the two-host lab in `dir`: its network namespace, its
/// address and its devd's socket.
fn lab_host_b(dir: &Path) -> Result<(String, std::net::IpAddr, PathBuf)> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .with_context(|| format!("{}: not a two-host lab", dir.join(f).display()))
    };
    let ns = read("netns")?;
    let addrs = read("addresses")?;
    let ns_b = ns.split_whitespace().nth(1).context("no host b in netns")?;
    let ip_b = addrs
        .split_whitespace()
        .nth(1)
        .context("no host b address")?;
    Ok((
        ns_b.to_string(),
        ip_b.parse()?,
        dir.join("b").join("devd.sock"),
    ))
}

fn parse(args: &[String]) -> Result<Option<Args>> {
    let mut a = Args {
        rounds: 5,
        quick: false,
        clients: 8,
        json: false,
        csv: false,
        markdown: false,
        raw: false,
        plot: None,
        pin: true,
        json_out: None,
        devd: "private".into(),
        only: None,
        transports: TRANSPORTS.to_vec(),
        two_hosts: None,
        switch: false,
    };
    let mut transports_given = false;
    let mut it = args.iter();
    while let Some(x) = it.next() {
        match x.as_str() {
            "--rounds" => a.rounds = it.next().context("--rounds N")?.parse()?,
            "--clients" => a.clients = it.next().context("--clients N")?.parse()?,
            "--quick" => a.quick = true,
            "--json" => a.json = true,
            "--csv" => a.csv = true,
            "--markdown" => a.markdown = true,
            "--raw" => a.raw = true,
            "--no-pin" => a.pin = false,
            "--plot" => a.plot = Some(it.next().context("--plot FILE.png")?.into()),
            "--json-out" => a.json_out = Some(it.next().context("--json-out FILE")?.into()),
            "--devd" => a.devd = it.next().context("--devd private|existing")?.clone(),
            "--only" => a.only = Some(it.next().context("--only TEXT")?.clone()),
            "--two-hosts" => a.two_hosts = Some(it.next().context("--two-hosts DIR")?.into()),
            "--switch" => a.switch = true,
            "--transports" => {
                transports_given = true;
                let list = it.next().context("--transports LIST")?;
                a.transports = list
                    .split(',')
                    .map(|n| {
                        TRANSPORTS
                            .into_iter()
                            .find(|t| t.name() == n)
                            .with_context(|| format!("--transports: unknown transport {n}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "-h" | "--help" => {
                print_out(USAGE);
                return Ok(None);
            }
            "-V" | "--version" => {
                print_out(&format!("ssock-bench {}", env!("CARGO_PKG_VERSION")));
                return Ok(None);
            }
            _ => bail!("unknown argument {x}\n{USAGE}"),
        }
    }
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    ensure!(a.clients >= 1, "--clients must be at least 1");
    ensure!(
        [a.json, a.csv, a.markdown].iter().filter(|&&f| f).count() <= 1,
        "--json, --csv and --markdown are exclusive"
    );
    ensure!(!a.raw || a.json, "--raw needs --json");
    ensure!(
        !a.switch || (a.two_hosts.is_some() && !a.json && !a.csv),
        "--switch needs --two-hosts, and prints text or Markdown"
    );
    if a.two_hosts.is_some() {
        let two = [Transport::Kernel, Transport::Queued];
        if !transports_given {
            a.transports = two.to_vec();
        }
        ensure!(
            a.transports.iter().all(|t| two.contains(t)),
            "--two-hosts: only kernel and queued go between hosts"
        );
        a.devd = "existing".into();
    }
    Ok(Some(a))
}

/// Prints help or version text; a closed stdout (`| head`) is no error.
fn print_out(text: &str) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

fn bench(args: &[String]) -> Result<()> {
    let Some(a) = parse(args)? else {
        return Ok(());
    };
    if a.plot.is_some() {
        // Before the run: a missing font must not cost a whole run.
        load_font()?;
    }
    let _private = match a.devd.as_str() {
        "private" => {
            // The Direct and Queued rows measure those transports: the
            // short_lived policy, which would keep the setup test's
            // connections on kernel TCP, is off.
            let d = ssock_tools::start_private_devd(&["--short-lived-ms", "0"])?;
            // Set before this process starts any thread; the peer inherits it.
            std::env::set_var(ssock_rings::paths::SOCKET_ENV, &d.socket);
            Some(d)
        }
        "existing" => None,
        o => bail!("--devd {o}: expected private or existing"),
    };
    let socket = ssock_rings::paths::client_socket();
    ssock_tools::wait_for(&socket, Duration::from_secs(5))?;
    let devd = devd_pid(&socket)?;
    let clock_ns = clock_read_ns();
    // The peer: beside this process, or on the lab's host b with its devd.
    let (mut peer_cmd, peer_ip) = match &a.two_hosts {
        None => {
            let mut c = Command::new(std::env::current_exe()?);
            c.arg("serve").env(ssock_rings::paths::SOCKET_ENV, &socket);
            (c, std::net::IpAddr::from([127, 0, 0, 1]))
        }
        Some(dir) => {
            let (ns, ip, b_socket) = lab_host_b(dir)?;
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns])
                .arg(std::env::current_exe()?)
                .args(["serve", "--bind", &ip.to_string()])
                .env(ssock_rings::paths::SOCKET_ENV, b_socket);
            (c, ip)
        }
    };
    let mut child = peer_cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the bench peer")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("peer stdout")?).read_line(&mut line)?;
    let mut switch_report = None;
    let result = (|| -> Result<Run> {
        let mut words = line.split_whitespace();
        let mut next = || {
            words
                .next()
                .context("the bench peer did not report its addresses")
        };
        let (port, path, plain) = (next()?, next()?, next()?);
        let peer = Peer {
            tcp: (peer_ip, port.parse::<u16>()?).into(),
            plain: (peer_ip, plain.parse::<u16>()?).into(),
            unix: path.into(),
        };
        if a.two_hosts.is_some() {
            // Until host a's devd heard of the peer's listener, a
            // connection to it would stay on kernel TCP.
            wait_advertised(&socket, peer.tcp.port())?;
        }
        let _unix = RemoveOnDrop(peer.unix.clone());
        // After spawning the peer: it must not inherit the pinning.
        let place = Placement::new(a.pin)?;
        if let Some((cpu, _)) = place.pair {
            pin_to(cpu)?;
        }
        let x = Ctx {
            peer,
            pat: Pattern::new(SEED),
            devd: DevdCpu::new(devd)?,
            place,
            clients: a.clients,
        };
        let plan = Plan::new(a.quick, a.clients);
        let (mut rows, mut jobs) = plan.schedule();
        if a.two_hosts.is_some() {
            // Ping-pong, one stream and several (over several links,
            // spread: their aggregate); CPU per message would leave host
            // b's devd out.
            (rows, jobs) = select(
                rows,
                jobs,
                |t| {
                    t.starts_with("ping-pong")
                        || t.starts_with("stream ")
                        || t.contains(" streams, ")
                },
                false,
            );
        }
        if let Some(text) = &a.only {
            (rows, jobs) = only(rows, jobs, text);
            ensure!(
                !jobs.is_empty(),
                "--only {text}: no test has that in its name"
            );
        }
        let t_run = Instant::now();
        let r = (|| -> Result<()> {
            for _ in 0..a.rounds {
                for s in &jobs {
                    for (ti, &t) in TRANSPORTS.iter().enumerate() {
                        if !a.transports.contains(&t) {
                            continue;
                        }
                        let m = run_job(&x, s.job, t)
                            .with_context(|| format!("{} {}", t.name(), rows[s.row].test))?;
                        record(&mut rows, s, ti, m);
                    }
                }
            }
            Ok(())
        })();
        if r.is_ok() && a.switch {
            switch_report = Some(switch::measure(&x, &socket, a.markdown)?);
        }
        // Tell the peer to exit (plain kernel connection, kind QUIT).
        if let Ok(mut c) = connect(&x.peer, Transport::Kernel) {
            let _ = c.write_all(&[QUIT]);
        }
        r?;
        Ok(Run {
            command: std::iter::once("ssock-bench")
                .chain(args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" "),
            rounds: a.rounds,
            clients: a.clients,
            quick: a.quick,
            pinned: place.pair,
            clock_ns,
            seconds: t_run.elapsed().as_secs_f64(),
            rows,
        })
    })();
    // The peer exits on QUIT, or when a connection breaks; do not wait
    // for it forever.
    let t = Instant::now();
    while matches!(child.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    let run = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&run, a.raw))?);
    } else if a.csv {
        print!("{}", to_csv(&run));
    } else {
        print!("{}", to_report(&run, a.markdown));
        if let Some(s) = &switch_report {
            print!("{s}");
        }
    }
    if let Some(p) = &a.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&to_json(&run, false))?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        plot(p, &run)?;
        eprintln!("ssock-bench: wrote {}", p.display());
    }
    Ok(())
}

fn record(rows: &mut [Row], s: &Scheduled, ti: usize, m: Measured) {
    let cell = &mut rows[s.row].cells[ti];
    cell.rounds.push(m.value);
    if !m.samples.is_empty() {
        cell.round_p99.push(percentile(&m.samples, 99));
        cell.samples.extend_from_slice(&m.samples);
    }
    if let (Some(r), Some(parts)) = (s.cpu_row, m.cpu) {
        let cell = &mut rows[r].cells[ti];
        cell.rounds.push(parts.iter().sum());
        cell.parts.push(parts);
    }
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A finished run.
struct Run {
    command: String,
    rounds: usize,
    clients: usize,
    quick: bool,
    /// Measuring and serving CPU of the single-connection tests.
    pinned: Option<(usize, u8)>,
    clock_ns: f64,
    seconds: f64,
    rows: Vec<Row>,
}

// ---------------------------------------------------------------------------
// Output.

fn to_json(run: &Run, raw: bool) -> serde_json::Value {
    let results: Vec<_> = run
        .rows
        .iter()
        .map(|r| {
            let transports: Vec<_> = TRANSPORTS
                .iter()
                .zip(&r.cells)
                .enumerate()
                .map(|(ti, (t, c))| {
                    let mut v = json!({
                        "transport": t.name(),
                        "median": c.median(),
                        "p99": c.p99(),
                        "min": c.min(),
                        "max": c.max(),
                        "ratio_to_kernel": r.ratio(ti),
                        "samples": c.rounds,
                    });
                    if !c.round_p99.is_empty() {
                        v["round_p99"] = json!(c.round_p99);
                        v["messages"] = json!(c.samples.len());
                    }
                    if !c.parts.is_empty() {
                        v["client"] = json!(c.part_median(0));
                        v["server"] = json!(c.part_median(1));
                        v["devd"] = json!(c.part_median(2));
                    }
                    if raw && !c.samples.is_empty() {
                        v["raw"] = json!(c.samples);
                    }
                    v
                })
                .collect();
            json!({
                "family": r.family.name(),
                "test": r.test,
                "size": r.size,
                "unit": r.unit,
                "higher_is_better": r.higher_is_better,
                "transports": transports,
            })
        })
        .collect();
    json!({
        "command": run.command,
        "rounds": run.rounds,
        "clients": run.clients,
        "quick": run.quick,
        "pinned": run.pinned.map(|(c, s)| json!({ "client_cpu": c, "server_cpu": s })),
        "clock_read_ns": run.clock_ns,
        "seconds": run.seconds,
        "notes": "samples, per round: ping-pong the median half round trip of the round (us); \
                    cpu: client + server + devd CPU us per message; other rows their unit",
        "results": results,
    })
}

fn to_csv(run: &Run) -> String {
    let mut s =
        String::from("family,test,size,transport,unit,median,p99,min,max,ratio_to_kernel,rounds\n");
    for r in &run.rows {
        for (ti, (t, c)) in TRANSPORTS.iter().zip(&r.cells).enumerate() {
            s.push_str(&format!(
                "{},\"{}\",{},{},{},{},{},{},{},{},{}\n",
                r.family.name(),
                r.test,
                r.size,
                t.name(),
                r.unit,
                c.median(),
                c.p99().map(|p| p.to_string()).unwrap_or_default(),
                c.min(),
                c.max(),
                r.ratio(ti),
                c.rounds.len()
            ));
        }
    }
    s
}

/// Three significant digits, about.
fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// median [min-max], and the ratio to kernel TCP for the other transports.
fn spread_cell(r: &Row, ti: usize) -> String {
    let c = &r.cells[ti];
    if c.rounds.is_empty() {
        // A transport this run left out (`--transports`, `--two-hosts`).
        return "-".to_string();
    }
    let mut s = format!("{} [{}-{}]", num(c.median()), num(c.min()), num(c.max()));
    // No ratio when kernel TCP was left out of the run.
    if ti > 0 && !r.cells[0].rounds.is_empty() {
        s.push_str(&format!(" {}x", num(r.ratio(ti))));
    }
    s
}

/// The human report, as plain text or as Markdown.
struct Report {
    out: String,
    markdown: bool,
}

impl Report {
    fn para(&mut self, text: &str) {
        self.out.push_str(text);
        self.out.push_str(if self.markdown { "\n\n" } else { "\n" });
    }

    /// A section: a heading and what its cells are.
    fn section(&mut self, heading: &str, what: &str) {
        if self.markdown {
            let mut chars = what.chars();
            let first = chars.next().map(|c| c.to_uppercase().to_string());
            let what = first.unwrap_or_default() + chars.as_str();
            self.out.push_str(&format!("## {heading}\n\n{what}.\n\n"));
        } else {
            self.out.push_str(&format!("\n{heading}: {what}\n"));
        }
    }

    /// A table with a column per transport. Plain: first column
    /// left-aligned, the others right-aligned.
    fn grid(&mut self, head: &str, rows: Vec<(String, Vec<String>)>) {
        let mut all = vec![(
            head.to_string(),
            TRANSPORTS.iter().map(|t| t.title().to_string()).collect(),
        )];
        all.extend(rows);
        if self.markdown {
            for (n, (label, cells)) in all.iter().enumerate() {
                self.out
                    .push_str(&format!("| {label} | {} |\n", cells.join(" | ")));
                if n == 0 {
                    self.out
                        .push_str(&format!("|---|{}\n", "---:|".repeat(cells.len())));
                }
            }
            self.out.push('\n');
            return;
        }
        let w0 = all.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let ws: Vec<usize> = (0..TRANSPORTS.len())
            .map(|i| all.iter().map(|(_, c)| c[i].len()).max().unwrap_or(0))
            .collect();
        for (label, cells) in &all {
            let mut line = format!("{label:<w0$}");
            for (c, w) in cells.iter().zip(&ws) {
                line.push_str(&format!("   {c:>w$}"));
            }
            self.out.push_str(line.trim_end());
            self.out.push('\n');
        }
    }
}

fn to_report(run: &Run, markdown: bool) -> String {
    let mut o = Report {
        out: String::new(),
        markdown,
    };
    let family = |f: Family| run.rows.iter().filter(move |r| r.family == f);
    let spread_rows = |f: Family, label: &dyn Fn(&Row) -> String| -> Vec<(String, Vec<String>)> {
        family(f)
            .map(|r| {
                let cells = (0..TRANSPORTS.len()).map(|ti| spread_cell(r, ti)).collect();
                (label(r), cells)
            })
            .collect()
    };
    let code = |t: &str| {
        if markdown {
            format!("`{t}`")
        } else {
            t.to_string()
        }
    };
    o.para(&format!(
        "{}: {} round{}, the transports interleaved round by round; every byte verified by both \
         processes.",
        code(&run.command),
        run.rounds,
        if run.rounds == 1 { "" } else { "s" },
    ));
    o.para(
        "Cells: median [min-max of the round medians], then the ratio median / kernel TCP median \
         of this run.",
    );
    o.para(&match run.pinned {
        Some((c, s)) => format!(
            "Single-connection tests pinned: client thread on CPU {c}, server thread on CPU {s} \
             ({} lets the scheduler place them); many-connection tests not pinned.",
            code("--no-pin")
        ),
        None => "No thread pinned: the scheduler places them.".to_string(),
    });

    o.section(
        "Ping-pong latency",
        "half round trip per message in us, 1 B to 64 KiB (lower is better)",
    );
    o.grid("size", spread_rows(Family::PingPong, &|r| human(r.size)));

    o.section(
        "Ping-pong p99",
        &format!(
            "99th percentile of the half round trip in us, over every message of every round, \
             warm-up excluded; each sample includes one clock read ({:.0} ns)",
            run.clock_ns
        ),
    );
    let rows = family(Family::PingPong)
        .map(|r| {
            let cells = r
                .cells
                .iter()
                .map(|c| c.p99().map_or_else(String::new, num))
                .collect();
            (human(r.size), cells)
        })
        .collect();
    o.grid("size", rows);

    o.section(
        "CPU per message",
        &format!(
            "us of CPU time per message (a round trip is two): the client's and the server's \
             threads plus devd, over the timed messages; lower is better; every size in {}",
            code("--json/--csv")
        ),
    );
    let shown = [1, 64, 1024, 16384, 65536];
    let rows = spread_rows(Family::Cpu, &|r| r.test.clone())
        .into_iter()
        .filter(|(label, _)| {
            label.starts_with("hot spot")
                || shown
                    .iter()
                    .any(|&n| *label == format!("ping-pong {}", human(n)))
        })
        .collect();
    o.grid("test", rows);

    o.section("Streaming", "GB/s by write size (higher is better)");
    o.grid(
        "write size",
        spread_rows(Family::Stream, &|r| human(r.size)),
    );

    o.section(
        "Many connections and connection setup",
        &format!(
            "higher is better. Hot spot: {n} client threads, each on its own connection, \
             ping-pong 1 B at once against one server process, messages/s counting both \
             directions; streams: {n} connections streaming at once, aggregate; setup: connect, \
             1 byte each way, close, one connection after another",
            n = run.clients
        ),
    );
    o.grid(
        "test",
        spread_rows(Family::Connections, &|r| format!("{} ({})", r.test, r.unit)),
    );
    o.out.push_str(if markdown { "" } else { "\n" });
    o.para(&format!("Run time {:.0} s.", run.seconds));
    o.out
}

/// Registers the plot font with plotters.
fn load_font() -> Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| {
        format!("--plot needs the font {FONT}: install the Debian package fonts-dejavu-core")
    })?;
    // plotters keeps the font for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a usable TrueType font"))
}

/// Latency against message size (log-log) and throughput against write
/// size (log x), one line per transport, medians.
fn plot(path: &Path, run: &Run) -> Result<()> {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let panels = root.split_evenly((1, 2));
    let rows = |f: Family| -> Vec<&Row> { run.rows.iter().filter(|r| r.family == f).collect() };
    let (ping, streams) = (rows(Family::PingPong), rows(Family::Stream));
    let (lo, hi) = y_extent(&ping)?;
    panel(
        &panels[0],
        &ping,
        "ping-pong, half round trip (median of the rounds)",
        "message size",
        "us (log scale)",
        (lo / 1.5..hi * 1.5).log_scale(),
        SeriesLabelPosition::LowerRight,
    )?;
    let (_, hi) = y_extent(&streams)?;
    panel(
        &panels[1],
        &streams,
        "streaming throughput (median of the rounds)",
        "write size",
        "GB/s",
        0.0..hi * 1.1,
        SeriesLabelPosition::UpperLeft,
    )?;
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}

/// The smallest and largest positive median of `rows`.
fn y_extent(rows: &[&Row]) -> Result<(f64, f64)> {
    let (lo, hi) = rows
        .iter()
        .flat_map(|r| r.cells.iter().map(Cell::median))
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    ensure!(hi > 0.0, "nothing to plot");
    Ok((lo, hi))
}

/// One chart: x is log2 of the size (a tick per power of two), y as given.
fn panel<DB, Y>(
    area: &plotters::drawing::DrawingArea<DB, plotters::coord::Shift>,
    rows: &[&Row],
    caption: &str,
    xdesc: &str,
    ydesc: &str,
    y: Y,
    legend: plotters::chart::SeriesLabelPosition,
) -> Result<()>
where
    DB: plotters::prelude::DrawingBackend,
    DB::ErrorType: 'static,
    Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    Y::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
{
    use plotters::prelude::*;
    let colors = [BLACK, RGBColor(0, 150, 70), RED, BLUE];
    let xs: Vec<f64> = rows.iter().map(|r| (r.size as f64).log2()).collect();
    let (x0, x1) = (xs[0], xs[xs.len() - 1]);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x0 - 0.3..x1 + 0.3, y)
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_labels(xs.len())
        .x_desc(xdesc)
        .y_desc(ydesc)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .x_label_formatter(&|k| {
            let v = 2f64.powf(*k);
            if v >= 1024.0 {
                format!("{:.0}K", v / 1024.0)
            } else {
                format!("{v:.0}")
            }
        })
        // Shortest decimal form of the tick, to 3 decimals.
        .y_label_formatter(&|v| format!("{}", (v * 1000.0).round() / 1000.0))
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    for (ti, t) in TRANSPORTS.iter().enumerate() {
        let color = colors[ti];
        let pts: Vec<(f64, f64)> = xs
            .iter()
            .zip(rows)
            .map(|(&x, r)| (x, r.cells[ti].median()))
            .filter(|(_, y)| y.is_finite() && *y > 0.0)
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("plot: {e}"))?
            .label(t.title())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow!("plot: {e}"))?;
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}
