//! Statistics: totals since devd started, and the per-connection view that
//! ringstat shows (see docs/ringstat.md for the JSON fields). Hot-path
//! counters live in the regions and in [`QueuedCounters`], never in logs.

use serde::Serialize;
use ssock_rings::codec::{FallbackReason, Mode};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Totals since start.
#[derive(Debug, Default)]
pub struct Totals {
    /// Accelerated connections created, by mode.
    pub direct: u64,
    /// Queued connections created.
    pub queued: u64,
    /// Connections on kernel TCP that devd saw exist: a Claim answered
    /// ExpectKernel (the acceptor has the connection), or the socket of an
    /// Intent answered Kernel (or refused with an error) seen connected
    /// ([`crate::control::watch`]). A connect that fails, and a second
    /// Intent with the same socket, add nothing.
    pub kernel: u64,
    /// Fallbacks by reason.
    pub fallbacks: BTreeMap<FallbackReason, u64>,
    /// Connections reset because a party broke a ring protocol (reported
    /// by the victim for Direct; counted by the engine for Queued).
    pub violations: u64,
    /// Control messages refused as malformed.
    pub bad_messages: u64,
    /// Sessions accepted.
    pub sessions: u64,
    /// Bytes carried (both directions) by Direct connections that are
    /// gone.
    pub bytes_closed: u64,
    /// Direct connections that reused a parked region instead of a new one.
    pub reused: u64,
    /// Sessions closed at once because their user had
    /// `max_sessions_per_user` open.
    pub sessions_refused: u64,
    /// Failed accepts on the control socket (out of fds or memory).
    pub accept_failures: u64,
    /// Times the `short_lived` policy put a listener's connections on
    /// kernel TCP for its hold.
    pub short_lived_periods: u64,
    /// Control requests handled (decoded ones, of every kind).
    pub requests: u64,
    /// Queued connections with their other end on a peer host (counted
    /// in `queued` too), and Claims of this host's acceptors that the
    /// peer found no intent for (a connector not under ssock there; one
    /// whose connector let go of it is a `connector_gone` fallback).
    pub remote: u64,
    pub remote_unmatched: u64,
    /// This host's ends that moved forward onto their link again (took
    /// the new region devd offered them), and those offered one.
    pub forwards: u64,
    pub forwards_offered: u64,
}

impl Totals {
    /// Counts `n` connections a client left on kernel TCP without asking
    /// devd (the listener board said so), with their reason.
    pub fn skipped(&mut self, r: FallbackReason, n: u32) {
        let e = self.fallbacks.entry(r).or_default();
        *e = e.saturating_add(u64::from(n));
        self.kernel = self.kernel.saturating_add(u64::from(n));
    }

    /// Counts a fallback decision by its reason. Whether a connection came
    /// of it is counted apart ([`Totals::kernel_connection`]): a connector
    /// told to stay on kernel TCP may fail to connect, or retry.
    pub fn fallback(&mut self, r: FallbackReason) {
        *self.fallbacks.entry(r).or_default() += 1;
    }

    /// Counts a connection known to exist on kernel TCP.
    pub fn kernel_connection(&mut self) {
        self.kernel += 1;
    }

    /// Counts a created accelerated connection.
    pub fn created(&mut self, m: Mode) {
        match m {
            Mode::Direct => self.direct += 1,
            Mode::Queued => self.queued += 1,
            Mode::Kernel => self.kernel += 1,
        }
    }

    /// JSON view.
    pub fn json(&self) -> TotalsJson {
        TotalsJson {
            connections: ModeCounts {
                direct: self.direct,
                queued: self.queued,
                kernel: self.kernel,
            },
            fallbacks: FallbackReason::ALL
                .iter()
                .map(|r| {
                    (
                        r.name().to_string(),
                        self.fallbacks.get(r).copied().unwrap_or(0),
                    )
                })
                .collect(),
            violations: self.violations,
            bad_messages: self.bad_messages,
            sessions: self.sessions,
            regions_reused: self.reused,
            sessions_refused: self.sessions_refused,
            accept_failures: self.accept_failures,
            short_lived_periods: self.short_lived_periods,
            requests: self.requests,
            remote: RemoteCounts {
                connections: self.remote,
                unmatched: self.remote_unmatched,
                failovers: 0,
                failover_resets: 0,
                made_while_down: 0,
                migrations: 0,
                forwards: self.forwards,
                forwards_offered: self.forwards_offered,
            },
            bytes: BytesByMode {
                direct: self.bytes_closed,
                queued: 0,
            },
        }
    }
}

/// Counters the Queued engine keeps for one connection.
#[derive(Debug, Default)]
pub struct QueuedCounters {
    /// Bytes moved from each side's TX (index: side that sent).
    pub bytes: [AtomicU64; 2],
    /// Interrupts (call eventfd writes) sent to each side.
    pub calls: [AtomicU64; 2],
    /// Interrupts suppressed by used_event.
    pub calls_suppressed: [AtomicU64; 2],
    /// Whether a side was reset for a violation.
    pub violation: [AtomicU64; 2],
    /// Of each side's stream, the bytes the other host acknowledged (its
    /// engine took them for the reader): remote sides only.
    pub acked: [AtomicU64; 2],
    /// The link under it failed and it moved to its kernel socket (1), or
    /// is moving (2: the hosts have not agreed yet): remote sides only.
    pub failover: AtomicU64,
    /// Remote sides: the link its channel crosses now (it moves to
    /// another when its link fails and another is up), and how many times
    /// it moved so.
    pub link: AtomicU64,
    /// See `link`.
    pub migrations: AtomicU64,
}

/// What the Queued engine counts over all connections, live and gone:
/// it moves a connection's last bytes after devd freed it (a side that
/// closed right after its writes), so these are not summed per connection.
#[derive(Debug, Default)]
pub struct EngineCounts {
    /// Sides reset for breaking the virtqueue protocol.
    pub violations: AtomicU64,
    /// Bytes moved, both directions, every connection.
    pub bytes: AtomicU64,
    /// Remote sides moved to their kernel sockets when their link failed
    /// (docs/protocol.md 8.5), and those reset instead (no agreement with
    /// the other host).
    pub failovers: AtomicU64,
    /// See `failovers`.
    pub failover_resets: AtomicU64,
    /// Remote sides made while their link was down that started on their
    /// kernel sockets once both hosts agreed (docs/protocol.md 8.6; in
    /// `failovers` too).
    pub made_while_down: AtomicU64,
    /// Remote sides moved from a link that failed onto another link to
    /// the same peer, with no byte on TCP (docs/protocol.md 8.7).
    pub migrations: AtomicU64,
}

impl QueuedCounters {
    /// Adds to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        // Relaxed: statistics, read by the control thread for display only.
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// JSON: counts by mode.
#[derive(Debug, Serialize)]
pub struct ModeCounts {
    /// Direct.
    pub direct: u64,
    /// Queued.
    pub queued: u64,
    /// Kernel.
    pub kernel: u64,
}

/// JSON: totals.
#[derive(Debug, Serialize)]
pub struct TotalsJson {
    /// Connections by mode since start.
    pub connections: ModeCounts,
    /// Fallbacks by reason since start.
    pub fallbacks: BTreeMap<String, u64>,
    /// Connections reset for protocol violations.
    pub violations: u64,
    /// Malformed control messages.
    pub bad_messages: u64,
    /// Sessions accepted.
    pub sessions: u64,
    /// Direct connections that reused a region kept from an earlier
    /// connection between the same two processes.
    pub regions_reused: u64,
    /// Sessions closed at once: their user had `max_sessions_per_user`.
    pub sessions_refused: u64,
    /// Failed accepts on the control socket (devd out of fds or memory).
    pub accept_failures: u64,
    /// Times the `short_lived` policy put a listener's connections on
    /// kernel TCP for a while (`fallbacks.short_lived` counts the
    /// connections that stayed there, as their connectors reported them).
    pub short_lived_periods: u64,
    /// Control requests handled: what connections cost devd (one
    /// accelerated connection: an Intent, a Claim and two Releases; one
    /// the listener board kept plain: none, but a share of a Skipped).
    pub requests: u64,
    /// Connections whose other end is on a peer host.
    pub remote: RemoteCounts,
    /// Bytes carried (both directions, live and closed connections) by mode.
    pub bytes: BytesByMode,
}

/// JSON: connections between this host and its peers.
#[derive(Debug, Serialize)]
pub struct RemoteCounts {
    /// Queued connections with one end on a peer host (also in
    /// `connections.queued`).
    pub connections: u64,
    /// Claims of this host's acceptors no intent on the peer matched:
    /// those connections stayed on kernel TCP.
    pub unmatched: u64,
    /// This host's ends moved to their kernel sockets when their link
    /// failed, at offsets both hosts agreed.
    pub failovers: u64,
    /// This host's ends reset when their link failed (the other host
    /// did not agree within 10 s, or there are no peer devds).
    pub failover_resets: u64,
    /// This host's ends of connections made while their link was down,
    /// started on their kernel sockets once both hosts agreed (also in
    /// `failovers`).
    pub made_while_down: u64,
    /// This host's ends moved from a link that failed onto another link
    /// to the same peer, TCP untouched (docs/protocol.md 8.7).
    pub migrations: u64,
    /// This host's ends that moved forward onto the link again
    /// (docs/protocol.md 8.6), and those offered to (an end whose
    /// process cannot take it stays on its kernel socket).
    pub forwards: u64,
    /// See `forwards`.
    pub forwards_offered: u64,
}

/// JSON: bytes by accelerated mode.
#[derive(Debug, Serialize)]
pub struct BytesByMode {
    /// Direct.
    pub direct: u64,
    /// Queued.
    pub queued: u64,
}

/// JSON: one ring direction.
#[derive(Debug, Serialize)]
pub struct RingJson {
    /// Producer's end.
    pub from: &'static str,
    /// Bytes produced (head) / consumed (tail).
    pub head: u64,
    /// Bytes consumed.
    pub tail: u64,
    /// Bytes in the ring.
    pub fill: u64,
    /// Capacity.
    pub cap: u64,
    /// Marks: "eos", "reset".
    pub flags: Vec<&'static str>,
    /// Whether the consumer/producer is asleep.
    pub consumer_asleep: bool,
    /// Producer asleep waiting for space.
    pub producer_asleep: bool,
    /// Consumer closed.
    pub consumer_closed: bool,
}

/// JSON: one live connection.
#[derive(Debug, Serialize)]
pub struct ConnJson {
    /// devd's id.
    pub id: u64,
    /// "direct" or "queued".
    pub mode: &'static str,
    /// "open", "half-closed", "closing".
    pub state: &'static str,
    /// Pids [connector, acceptor]: the processes that last attached each end.
    pub pids: [i32; 2],
    /// Connector's address.
    pub local: String,
    /// Acceptor's address.
    pub remote: String,
    /// Bytes connector -> acceptor.
    pub bytes_c2a: u64,
    /// Bytes acceptor -> connector.
    pub bytes_a2c: u64,
    /// Bytes waiting in each direction's ring [c2a, a2c].
    pub ring_fill: [u64; 2],
    /// Wake-ups sent.
    pub notify_sent: u64,
    /// Wake-ups suppressed.
    pub notify_suppressed: u64,
    /// Region bytes (per side for Queued).
    pub region_size: u64,
    /// Ring detail (Direct; empty for Queued).
    pub rings: Vec<RingJson>,
    /// The backend that carries it ("loopback", "ntb"; none for Direct).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<&'static str>,
    /// The peer node its other end is on, and its channel on that link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_node: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<u64>,
    /// With its other end on another host: which of the links to that
    /// peer its channel crosses (0 first), and how many times it moved
    /// from a failed link onto another (docs/protocol.md 8.7).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<u8>,
    /// See `link`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrations: Option<u64>,
    /// With its other end on another host: of the stream this host's end
    /// sent (`bytes_c2a` or `bytes_a2c`), the bytes the other host
    /// acknowledged; what lies between is in flight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked: Option<u64>,
    /// With its other end on another host: "link" while its bytes cross
    /// the link, "moving" while both hosts agree where it moves to its
    /// kernel socket, "tcp" once it did (its link failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'static str>,
    /// With its other end on another host: how many times it (as the
    /// connections it took the place of) moved to its kernel socket, and
    /// back onto the link (docs/protocol.md 8.6).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failovers: Option<u32>,
    /// See `failovers`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwards: Option<u32>,
}

/// JSON: a stats page.
#[derive(Debug, Serialize)]
pub struct Page {
    /// devd facts.
    pub devd: DevdJson,
    /// Totals since start.
    pub totals: TotalsJson,
    /// Connections in this page, by id.
    pub connections: Vec<ConnJson>,
    /// Peer devds (none without `[[peer]]` in the config).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<crate::peers::PeerJson>,
    /// Peer connections refused, by reason.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub peers_refused: std::collections::BTreeMap<&'static str, u64>,
}

/// JSON: devd facts.
#[derive(Debug, Serialize)]
pub struct DevdJson {
    /// Process id.
    pub pid: u32,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Backend name.
    pub backend: &'static str,
    /// Live sessions.
    pub sessions: usize,
    /// Doorbells devd keeps (each session's own and its recent spares).
    pub doorbells: usize,
    /// Live accelerated connections.
    pub live_connections: usize,
    /// Registered listeners.
    pub listeners: usize,
    /// Regions kept for a next connection between two processes.
    pub parked_regions: usize,
}
