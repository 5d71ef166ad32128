//! The listener board: a small read-only mapping devd publishes to every
//! client (its fd comes with Welcome) saying which addresses registered
//! ssock listeners serve, and until when the `short_lived` policy keeps a
//! listener's connections on kernel TCP. With it a connector to an address
//! no ssock listener serves, or to a listener kept on kernel TCP, connects
//! plainly without asking devd, and such an acceptor does not claim: a
//! connection ssock does not accelerate costs it nothing
//! (docs/protocol.md section 2.5).
//!
//! devd writes it under a sequence word (odd while it writes, the usual
//! seqlock); readers copy what they need, check the word again and
//! validate every field. A reader that cannot get a steady copy, or finds
//! the board malformed or full, answers [`Found::Unknown`] and its caller
//! asks devd as before: the board only ever saves a request, and both ends
//! stay correct whatever it says (a connector that skipped devd makes its
//! acceptor's Claim find no intent, which keeps the connection plain; an
//! acceptor that skipped its Claim leaves its connector on the kernel
//! socket). devd renews a deadline in it while it runs and clears it when
//! it stops: a board whose devd died says unknown within [`ALIVE_FOR`], so
//! that its clients ask (and find the new devd).
//!
//! Never here: a value used before it was validated, or a wait.

use crate::shm::Mapping;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{fence, Ordering};

/// The board's size in bytes.
pub const BOARD_SIZE: usize = 16384;
/// Its format version (in its header).
pub const BOARD_VERSION: u32 = 1;
const MAGIC: u64 = u64::from_le_bytes(*b"SSOCKBRD");
const HDR: usize = 64;
const ENTRY: usize = 32;
/// How many listeners it lists at most (more: it says overflow, and
/// connectors ask devd).
pub const CAPACITY: usize = (BOARD_SIZE - HDR) / ENTRY;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_SEQ: usize = 16;
const OFF_COUNT: usize = 24;
/// The latest `plain_until` of any entry: an acceptor looks further only
/// while the clock is below it.
const OFF_PLAIN_MAX: usize = 32;
/// CLOCK_MONOTONIC ns after which the board is stale (devd renews it).
const OFF_ALIVE: usize = 40;
const FLAG_OVERFLOW: u64 = 1 << 32;

const F_V6: u64 = 1 << 16;
const F_DUAL: u64 = 1 << 17;
const F_PEERS: u64 = 1 << 18;

/// How far ahead devd sets the board's deadline each time it renews it
/// (every 5-10 s: its control loop's expiry round).
pub const ALIVE_FOR: u64 = 30_000_000_000;

/// How often a reader tries for a steady copy before it gives up.
const TRIES: usize = 16;

/// One registered listener as the board lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Its bound address.
    pub addr: SocketAddr,
    /// An IPv6 wildcard listener that also takes IPv4 (IPV6_V6ONLY off).
    pub dual_stack: bool,
    /// CLOCK_MONOTONIC nanoseconds until which its connections stay on
    /// kernel TCP (`short_lived` policy); 0: accelerated.
    pub plain_until: u64,
    /// The hold is for its connectors not under ssock (a streak of Claims
    /// that found no Intent): a connector under ssock asks devd anyway,
    /// waiting for the answer before it connects, and its Intent ends the
    /// hold; an acceptor does not claim while it lasts.
    pub peers_only: bool,
}

/// What the board says about a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// It cannot tell (being written, malformed, full, or no board): ask devd.
    Unknown,
    /// No registered listener serves it: a plain connection.
    Nothing,
    /// A registered listener serves it; its connections stay on kernel TCP
    /// until `plain_until` (CLOCK_MONOTONIC ns; 0: accelerated). With
    /// several (SO_REUSEPORT), the earliest.
    Served {
        /// See above.
        plain_until: u64,
        /// That hold is for connectors not under ssock only
        /// ([`Entry::peers_only`]).
        peers_only: bool,
    },
}

/// An address as the registry compares it: IPv4-mapped IPv6 as IPv4, a
/// wildcard as its family's loopback.
pub fn canon(ip: IpAddr) -> IpAddr {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        match ip {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    } else {
        ip
    }
}

/// Whether a connection to `dst` may reach a listener bound to `listener`
/// (the same port; the same address, or a wildcard of the destination's
/// family, or an IPv6 wildcard that takes IPv4 too).
pub fn reaches(listener: SocketAddr, dual_stack: bool, dst: SocketAddr) -> bool {
    let dip = canon(dst.ip());
    let lip = listener.ip().to_canonical();
    let addr_ok = if lip.is_unspecified() {
        lip.is_ipv4() == dip.is_ipv4() || (dual_stack && dip.is_ipv4())
    } else {
        canon(lip) == dip
    };
    listener.port() == dst.port() && addr_ok
}

/// CLOCK_MONOTONIC now, in nanoseconds (the board's clock).
pub fn now_ns() -> u64 {
    crate::sys::monotonic_ns()
}

/// Writes a fresh board's header into `map` (devd's own writable mapping).
pub fn init(map: &Mapping) {
    map.u64_at(OFF_VERSION).store(
        u64::from(BOARD_VERSION) | ((CAPACITY as u64) << 32),
        Ordering::Relaxed,
    );
    map.u64_at(OFF_COUNT).store(0, Ordering::Relaxed);
    map.u64_at(OFF_PLAIN_MAX).store(0, Ordering::Relaxed);
    beat(map, now_ns());
    map.u64_at(OFF_MAGIC).store(MAGIC, Ordering::Release);
}

/// devd is alive at `now`: the board holds until `now + ALIVE_FOR`.
pub fn beat(map: &Mapping, now: u64) {
    map.u64_at(OFF_ALIVE)
        .store(now.saturating_add(ALIVE_FOR), Ordering::Relaxed);
}

/// devd stops: readers say unknown from now on.
pub fn retire(map: &Mapping) {
    map.u64_at(OFF_MAGIC).store(0, Ordering::Release);
}

/// Publishes `entries` (devd, the only writer): the sequence word odd
/// while the table changes.
pub fn publish(map: &Mapping, entries: &[Entry]) {
    let seq = map.u64_at(OFF_SEQ);
    let s = seq.load(Ordering::Relaxed);
    seq.store(s.wrapping_add(1), Ordering::Relaxed);
    fence(Ordering::Release);
    let n = entries.len().min(CAPACITY);
    for (k, e) in entries.iter().take(n).enumerate() {
        let at = HDR + k * ENTRY;
        let (ip, mut flags) = match e.addr {
            SocketAddr::V4(a) => (a.ip().to_ipv6_mapped(), 0),
            SocketAddr::V6(a) => (*a.ip(), F_V6),
        };
        if e.dual_stack {
            flags |= F_DUAL;
        }
        if e.peers_only {
            flags |= F_PEERS;
        }
        let b = ip.octets();
        let (hi, lo) = b.split_at(8);
        map.u64_at(at).store(
            u64::from_le_bytes(hi.try_into().unwrap_or([0; 8])),
            Ordering::Relaxed,
        );
        map.u64_at(at + 8).store(
            u64::from_le_bytes(lo.try_into().unwrap_or([0; 8])),
            Ordering::Relaxed,
        );
        map.u64_at(at + 16)
            .store(u64::from(e.addr.port()) | flags, Ordering::Relaxed);
        map.u64_at(at + 24).store(e.plain_until, Ordering::Relaxed);
    }
    let overflow = if entries.len() > CAPACITY {
        FLAG_OVERFLOW
    } else {
        0
    };
    map.u64_at(OFF_COUNT)
        .store(n as u64 | overflow, Ordering::Relaxed);
    let max = entries.iter().map(|e| e.plain_until).max().unwrap_or(0);
    map.u64_at(OFF_PLAIN_MAX).store(max, Ordering::Relaxed);
    seq.store(s.wrapping_add(2), Ordering::Release);
}

/// One entry read back, validated (None: malformed).
fn entry_at(map: &Mapping, k: usize) -> Option<Entry> {
    let at = HDR + k * ENTRY;
    let hi = map.u64_at(at).load(Ordering::Relaxed).to_le_bytes();
    let lo = map.u64_at(at + 8).load(Ordering::Relaxed).to_le_bytes();
    let w = map.u64_at(at + 16).load(Ordering::Relaxed);
    let plain_until = map.u64_at(at + 24).load(Ordering::Relaxed);
    if w >> 19 != 0 {
        return None;
    }
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi);
    b[8..].copy_from_slice(&lo);
    let ip = Ipv6Addr::from(b);
    let port = (w & 0xffff) as u16;
    let addr = if w & F_V6 != 0 {
        SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
    } else {
        SocketAddr::V4(SocketAddrV4::new(ip.to_ipv4_mapped()?, port))
    };
    Some(Entry {
        addr,
        dual_stack: w & F_DUAL != 0,
        plain_until,
        peers_only: w & F_PEERS != 0,
    })
}

/// Reads the board under its sequence word: `f` over the entries, on a
/// steady copy, or None (being written for too long, or malformed).
fn steady<T>(map: &Mapping, f: impl Fn(&mut dyn Iterator<Item = Option<Entry>>) -> T) -> Option<T> {
    if map.len() < BOARD_SIZE || map.u64_at(OFF_MAGIC).load(Ordering::Acquire) != MAGIC {
        return None;
    }
    let v = map.u64_at(OFF_VERSION).load(Ordering::Relaxed);
    if v != u64::from(BOARD_VERSION) | ((CAPACITY as u64) << 32) {
        return None;
    }
    // devd's beat, against the coarse clock (at most a tick behind: a board
    // left by a devd that died counts a few milliseconds longer).
    if map.u64_at(OFF_ALIVE).load(Ordering::Relaxed) < crate::sys::monotonic_coarse_ns() {
        return None;
    }
    let seq = map.u64_at(OFF_SEQ);
    for _ in 0..TRIES {
        let s1 = seq.load(Ordering::Acquire);
        if s1 & 1 != 0 {
            std::hint::spin_loop();
            continue;
        }
        let c = map.u64_at(OFF_COUNT).load(Ordering::Relaxed);
        let n = usize::try_from(c & 0xffff_ffff).unwrap_or(usize::MAX);
        let overflow = c & FLAG_OVERFLOW != 0;
        let out = (n <= CAPACITY && !overflow).then(|| f(&mut (0..n).map(|k| entry_at(map, k))));
        fence(Ordering::Acquire);
        if seq.load(Ordering::Relaxed) == s1 {
            return out;
        }
    }
    None
}

/// What the board says about connections to `dst`.
pub fn lookup(map: &Mapping, dst: SocketAddr) -> Found {
    let r = steady(map, |entries| {
        let mut found = Found::Nothing;
        for e in entries {
            let Some(e) = e else {
                return Found::Unknown;
            };
            if reaches(e.addr, e.dual_stack, dst) {
                // The earliest hold's end, and its kind.
                let this = Found::Served {
                    plain_until: e.plain_until,
                    peers_only: e.peers_only,
                };
                found = match found {
                    Found::Served { plain_until, .. } if plain_until <= e.plain_until => found,
                    _ => this,
                };
            }
        }
        found
    });
    r.unwrap_or(Found::Unknown)
}

/// Whether every listener on `port` (and at least one) is kept on kernel
/// TCP at `now`: then so is a connection to any address on that port, and
/// an acceptor of a wildcard listener need not ask its socket's address.
/// False when the board cannot tell.
pub fn port_plain(map: &Mapping, port: u16, now: u64) -> bool {
    let r = steady(map, |entries| {
        let mut any = false;
        for e in entries {
            let Some(e) = e else {
                return false;
            };
            if e.addr.port() == port {
                if e.plain_until <= now {
                    return false;
                }
                any = true;
            }
        }
        any
    });
    r.unwrap_or(false)
}

/// Whether any listener is kept on kernel TCP at `now` (a cheap look, so
/// that an acceptor asks for its socket's address only then).
pub fn any_plain(map: &Mapping, now: u64) -> bool {
    map.len() >= BOARD_SIZE && map.u64_at(OFF_PLAIN_MAX).load(Ordering::Relaxed) > now
}

/// Every entry (for tests and ringstat), or None as for [`lookup`].
pub fn entries(map: &Mapping) -> Option<Vec<Entry>> {
    steady(map, |it| it.collect::<Option<Vec<Entry>>>()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board() -> Mapping {
        let fd = crate::sys::memfd_sealed("board-test", BOARD_SIZE).unwrap();
        let m = Mapping::map(std::os::fd::AsFd::as_fd(&fd), BOARD_SIZE, true).unwrap();
        init(&m);
        m
    }

    fn e(addr: &str, dual_stack: bool, plain_until: u64) -> Entry {
        Entry {
            addr: addr.parse().unwrap(),
            dual_stack,
            plain_until,
            peers_only: false,
        }
    }

    #[test]
    fn an_empty_board_serves_nothing() {
        let m = board();
        assert_eq!(lookup(&m, "127.0.0.1:80".parse().unwrap()), Found::Nothing);
    }

    #[test]
    fn entries_round_trip_and_match_like_the_registry() {
        let m = board();
        let all = [
            e("127.0.0.1:80", false, 0),
            e("[::]:81", true, 7),
            e("0.0.0.0:82", false, 0),
            e("[::1]:83", false, 0),
            Entry {
                peers_only: true,
                ..e("127.0.0.1:84", false, 5)
            },
        ];
        publish(&m, &all);
        assert_eq!(entries(&m).unwrap(), all);
        let at = |s: &str| lookup(&m, s.parse().unwrap());
        assert_eq!(
            at("127.0.0.1:80"),
            Found::Served {
                plain_until: 0,
                peers_only: false
            }
        );
        assert_eq!(at("127.0.0.2:80"), Found::Nothing);
        assert_eq!(
            at("127.0.0.1:81"),
            Found::Served {
                plain_until: 7,
                peers_only: false
            }
        );
        assert_eq!(
            at("[::1]:81"),
            Found::Served {
                plain_until: 7,
                peers_only: false
            }
        );
        assert_eq!(
            at("10.1.2.3:82"),
            Found::Served {
                plain_until: 0,
                peers_only: false
            }
        );
        assert_eq!(at("[::1]:82"), Found::Nothing);
        assert_eq!(
            at("[::1]:83"),
            Found::Served {
                plain_until: 0,
                peers_only: false
            }
        );
        assert_eq!(
            at("127.0.0.1:84"),
            Found::Served {
                plain_until: 5,
                peers_only: true
            }
        );
        assert!(any_plain(&m, 6) && !any_plain(&m, 7));
    }

    #[test]
    fn several_listeners_on_one_port_answer_the_earliest() {
        let m = board();
        publish(&m, &[e("0.0.0.0:80", false, 9), e("0.0.0.0:80", false, 0)]);
        assert_eq!(
            lookup(&m, "127.0.0.1:80".parse().unwrap()),
            Found::Served {
                plain_until: 0,
                peers_only: false
            }
        );
    }

    #[test]
    fn a_board_being_written_full_or_garbled_is_unknown() {
        let m = board();
        publish(&m, &[e("127.0.0.1:80", false, 0)]);
        let dst = "127.0.0.1:80".parse().unwrap();
        let seq = m.u64_at(OFF_SEQ);
        seq.fetch_add(1, Ordering::Relaxed);
        assert_eq!(lookup(&m, dst), Found::Unknown);
        seq.fetch_add(1, Ordering::Relaxed);
        // An entry with bits no writer sets.
        m.u64_at(HDR + 16).fetch_or(1 << 40, Ordering::Relaxed);
        assert_eq!(lookup(&m, dst), Found::Unknown);
        let many: Vec<Entry> = (0..=CAPACITY)
            .map(|k| e(&format!("127.0.0.1:{}", 1000 + k), false, 0))
            .collect();
        publish(&m, &many);
        assert_eq!(lookup(&m, dst), Found::Unknown);
        m.u64_at(OFF_MAGIC).store(0, Ordering::Relaxed);
        publish(&m, &[]);
        assert_eq!(lookup(&m, dst), Found::Unknown);
    }

    #[test]
    fn a_board_its_devd_stopped_renewing_or_retired_is_unknown() {
        let m = board();
        let dst = "127.0.0.1:80".parse().unwrap();
        assert_eq!(lookup(&m, dst), Found::Nothing);
        m.u64_at(OFF_ALIVE).store(1, Ordering::Relaxed);
        assert_eq!(lookup(&m, dst), Found::Unknown);
        beat(&m, now_ns());
        assert_eq!(lookup(&m, dst), Found::Nothing);
        retire(&m);
        assert_eq!(lookup(&m, dst), Found::Unknown);
    }
}
