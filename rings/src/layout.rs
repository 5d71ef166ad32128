//! Layout of a per-connection region (version 1). See docs/protocol.md.
//!
//! ```text
//! 0      header: magic, version, kind, region size, connection id, geometry
//! 64     Direct: per direction d (0: connector->acceptor, 1: the reverse)
//!          64 + 256*d        producer line: head, flags, prod_wait, counters,
//!                            base, prod_bell
//!          64 + 256*d + 128  consumer line: tail, closed, cons_wait, counters,
//!                            cons_bell
//!        Queued: state flags (192, 256), client counters (320..352),
//!          the driver's words per queue (384, 400)
//! 4096   Direct: ring 0 data (cap bytes), ring 1 data (cap bytes)
//!        Queued: TX and RX virtqueues, then TX slots and RX slots
//! ```
//! Producer- and consumer-written words sit on separate cache lines (128
//! bytes apart, beyond the adjacent-line prefetcher).

use crate::shm::Mapping;
use std::sync::atomic::Ordering;

/// "SSOCKRG1" in little-endian.
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"SSOCKRG1");
/// Layout version; bumped on any incompatible change.
pub const REGION_VERSION: u32 = 10;
/// Bytes reserved for the header page.
pub const HEADER_SIZE: usize = 4096;
/// Smallest region the layouts accept (devd's config also requires the
/// Queued minimum, see `QueuedLayout::for_size`).
pub const MIN_REGION: usize = 16 * 1024;
/// Largest region devd will create.
pub const MAX_REGION: usize = 64 * 1024 * 1024;

/// Header word offsets.
pub mod hdr {
    /// u64 magic.
    pub const MAGIC: usize = 0;
    /// u32 version.
    pub const VERSION: usize = 8;
    /// u32 kind (1 direct, 2 queued).
    pub const KIND: usize = 12;
    /// u64 region size in bytes.
    pub const SIZE: usize = 16;
    /// u64 connection id (devd's).
    pub const CONN_ID: usize = 24;
    /// u64 Direct ring capacity, or Queued queue size.
    pub const GEOM_A: usize = 32;
    /// u64 Queued slot size (0 for Direct).
    pub const GEOM_B: usize = 40;
    /// u32 per end (48: connector, 52: acceptor): processes holding that
    /// end (attach and fork add one, close takes one; the last close ends
    /// the stream). A Queued region uses its own end's word.
    pub const HOLDERS: usize = 48;
}

/// Hand-over words: where each direction moves from the kernel socket to
/// the region and back (docs/protocol.md sections 2.3 and 2.4). Each on a
/// cache line of its own, away from the ring words. A Direct connection
/// keeps them in its region's header page; a Queued one in a hand-over
/// page of their own that both ends map ([`HOV_PAGE`] bytes, kind
/// [`RegionKind::Handover`]): each end's Queued region is its own.
pub mod hov {
    /// u32: what became of the connection's intent (`CLAIM_*`): accepted
    /// by the acceptor once it holds its end, kernel by devd. Read by the
    /// connector.
    pub const CLAIM: usize = 1024;
    /// u64 per direction d (0: connector->acceptor, 1: the reverse) at
    /// `SWITCH + 8 d`: 0 while that direction's writer is still on the
    /// kernel socket; S + 1 once it moved to the region after writing S
    /// bytes on the kernel socket; [`super::SWITCH_NEVER`]: it stays on
    /// the kernel socket.
    pub const SWITCH: usize = 1088;
    /// u64 per side s at `TCP_READ + 8 s`: bytes that side's holders have
    /// read from the kernel socket before its peer's switch (the holders
    /// of one end may be several processes).
    pub const TCP_READ: usize = 1152;
    /// u64 per direction d at `TAKEN + 8 d` (Queued): the region bytes of
    /// direction d its reader's holders took (low 63 bits), and
    /// [`super::TAKEN_CLOSED`] once the region part of that direction is
    /// closed at that offset: the reader takes no more from the region,
    /// the writer writes the rest on the kernel socket.
    pub const TAKEN: usize = 1216;
    /// u64 per direction d at `END + 8 d` (Queued): 0 while its writer may
    /// still write; E + 1 once it ended its writes (shutdown, close) after
    /// E bytes since it moved to the region.
    pub const END: usize = 1280;
    /// u32: 1 once the connector holds its end (mapped, or kept): the
    /// acceptor's writes may move to the region. Written by the connector.
    pub const READY: usize = 1344;
    /// u32 (Direct): the doorbell of the acceptor's process, written by
    /// devd at the Claim (for a reused region, at the Intent, with the
    /// header: only that acceptor may claim it), before the acceptor says
    /// accepted: the connector gets it when it moves, before a child it
    /// forks may need to ring it.
    pub const ACCEPTOR_BELL: usize = 1348;
    /// u32 (Queued): 1 when the other end is on another host (written by
    /// devd before the end is handed out): the words of this page are
    /// relayed between the two hosts' devds (`relay`), and an end whose
    /// region stops carrying bytes moves back to the kernel socket only at
    /// the offsets the two devds agreed (docs/protocol.md 8.5).
    pub const REMOTE: usize = 1352;
    /// u32 (Queued, remote): 1 once devd offers the connection a new
    /// region on the link after it moved to its kernel socket (fail-
    /// forward, docs/protocol.md 8.6): the end takes it (or lets it go)
    /// with a Forward request. Written by devd with pwrite.
    pub const FORWARD: usize = 1356;
    /// u32 (Queued, remote; the connector's page): 1 once the connector's
    /// devd matched the acceptor's Claim from the other host, before it
    /// relays any word of this page there (READY among them): until
    /// then the acceptor's writes cannot have moved. Written by devd;
    /// never relayed.
    pub const MATCHED: usize = 1360;
    /// u64 per direction d at `POSTED + 64 d`, a cache line each (two
    /// writers store them as they write) (Queued, both ends on this
    /// host): the region bytes d's writer posted so far, stored after
    /// each write. A reader that closes after devd died, having taken
    /// fewer, resets the connection as the kernel's close with bytes
    /// unread does. Never relayed; only a reset hangs on it.
    pub const POSTED: usize = 1408;
    /// u32 per side s at `RD_SHUT + 4 s`: 1 once a holder of side s's end
    /// shut its reads down (`shutdown(SHUT_RD)`): every holder's reads
    /// then return 0 instead of waiting, as the kernel's RCV_SHUTDOWN
    /// belongs to the socket, not to a process. Written by the end's
    /// holders; never relayed (the peer is not told).
    pub const RD_SHUT: usize = 1536;
}

/// Size of a Queued connection's hand-over page.
pub const HOV_PAGE: usize = 4096;

/// TAKEN flag: the direction's region part is closed.
pub const TAKEN_CLOSED: u64 = 1 << 63;

/// CLAIM: no acceptor has claimed the connection yet.
pub const CLAIM_PENDING: u32 = 0;
/// CLAIM: the acceptor took its end (written by the acceptor,
/// [`accept_claim`]); the connector moves when it likes.
pub const CLAIM_ACCEPTED: u32 = 1;
/// CLAIM: the connection stays on the kernel socket (the acceptor was
/// refused, or the intent expired); the connector lets its end go.
pub const CLAIM_KERNEL: u32 = 2;
/// SWITCH value: this direction stays on the kernel socket for good (its
/// writer was shared by several processes before it could move).
pub const SWITCH_NEVER: u64 = u64::MAX;

/// What a direction's SWITCH word says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// Its writer is still on the kernel socket and may move later.
    NotYet,
    /// Its writer moved to the region after this many kernel bytes.
    After(u64),
    /// It stays on the kernel socket.
    Never,
}

impl Switch {
    fn word(self) -> u64 {
        match self {
            Switch::NotYet => 0,
            Switch::After(n) => n.saturating_add(1).min(SWITCH_NEVER - 1),
            Switch::Never => SWITCH_NEVER,
        }
    }

    fn from_word(w: u64) -> Switch {
        match w {
            0 => Switch::NotYet,
            SWITCH_NEVER => Switch::Never,
            n => Switch::After(n - 1),
        }
    }
}

/// Records that a holder of side `side`'s end shut its reads down
/// (Release; the holder then wakes the end's sleeping readers).
pub fn shut_reads(m: &Mapping, side: usize) {
    m.u32_at(hov::RD_SHUT + 4 * (side & 1))
        .store(1, Ordering::Release);
}

/// Whether a holder of side `side`'s end shut its reads down.
pub fn reads_shut(m: &Mapping, side: usize) -> bool {
    m.u32_at(hov::RD_SHUT + 4 * (side & 1))
        .load(Ordering::Acquire)
        != 0
}

/// The CLAIM word (Acquire: what devd wrote before it is visible too).
pub fn claim(m: &Mapping) -> u32 {
    m.u32_at(hov::CLAIM).load(Ordering::Acquire)
}

/// The SWITCH word of direction `d`, read once.
pub fn switch_at(m: &Mapping, d: usize) -> Switch {
    Switch::from_word(m.u64_at(hov::SWITCH + 8 * (d & 1)).load(Ordering::Acquire))
}

/// Publishes direction `d`'s switch if none was published yet; returns
/// what the word says afterwards (another holder may have been first).
/// Release: the kernel bytes were sent before, the ring bytes follow.
pub fn publish_switch(m: &Mapping, d: usize, s: Switch) -> Switch {
    let w = m.u64_at(hov::SWITCH + 8 * (d & 1));
    match w.compare_exchange(0, s.word(), Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => s,
        Err(cur) => Switch::from_word(cur),
    }
}

/// Bytes side `side`'s holders read from the kernel socket so far.
pub fn tcp_read(m: &Mapping, side: usize) -> &std::sync::atomic::AtomicU64 {
    m.u64_at(hov::TCP_READ + 8 * (side & 1))
}

/// The bytes devd writes with pwrite when it refuses a claim or drops an
/// intent (CLAIM = kernel: the connector lets its end go). Changes one
/// byte of a zero word, so a reader never sees a torn one.
pub fn claim_kernel_bytes() -> (u64, [u8; 4]) {
    (hov::CLAIM as u64, CLAIM_KERNEL.to_le_bytes())
}

/// The acceptor took its end (it mapped it and will read the region):
/// CLAIM says accepted, which lets the connector move. Only a process that
/// has the end in hand says so, so a Claim whose answer came too late (the
/// acceptor gave up and serves the connection plain) never moves the
/// connector. False if CLAIM said otherwise already. The acceptor's own
/// writes move once the connector says it holds its end
/// ([`connector_ready`]).
pub fn accept_claim(m: &Mapping) -> bool {
    match m.u32_at(hov::CLAIM).compare_exchange(
        CLAIM_PENDING,
        CLAIM_ACCEPTED,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => true,
        Err(cur) => cur == CLAIM_ACCEPTED,
    }
}

/// The acceptor serves the connection without its end (the connector read
/// its bytes on the kernel socket while CLAIM was pending): CLAIM says
/// kernel, so that a claim answered after all never moves anybody. True
/// if CLAIM says kernel now; false if the acceptor said accepted first.
pub fn refuse_claim(m: &Mapping) -> bool {
    match m.u32_at(hov::CLAIM).compare_exchange(
        CLAIM_PENDING,
        CLAIM_KERNEL,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => true,
        Err(cur) => cur == CLAIM_KERNEL,
    }
}

/// The connector holds its end (it will read the region once the
/// acceptor's writes move there).
pub fn mark_ready(m: &Mapping) {
    // Release: after the mapping and attach that make the end usable.
    m.u32_at(hov::READY).store(1, Ordering::Release);
}

/// Whether the connector said it holds its end ([`mark_ready`]). A
/// connector that could not take its end (its fds did not arrive, its
/// mapping failed) never says so, and reads the kernel socket only: the
/// acceptor's writes must stay there.
pub fn connector_ready(m: &Mapping) -> bool {
    m.u32_at(hov::READY).load(Ordering::Acquire) == 1
}

/// The acceptor's doorbell devd wrote (0: none). Untrusted:
/// a wrong id only rings somebody else's doorbell, or nobody's.
pub fn acceptor_bell(m: &Mapping) -> u32 {
    m.u32_at(hov::ACCEPTOR_BELL).load(Ordering::Acquire)
}

/// What a direction's TAKEN word says (Queued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Its reader took this many region bytes and may take more.
    Open(u64),
    /// The region part is closed at this offset.
    Closed(u64),
}

/// The TAKEN word of direction `d` as it is (for a comparison with an
/// earlier reading only: `taken` says what it means).
pub fn taken_raw(m: &Mapping, d: usize) -> u64 {
    taken_word(m, d).load(Ordering::Acquire)
}

fn taken_word(m: &Mapping, d: usize) -> &std::sync::atomic::AtomicU64 {
    m.u64_at(hov::TAKEN + 8 * (d & 1))
}

fn taken_of(w: u64) -> Taken {
    if w & TAKEN_CLOSED != 0 {
        Taken::Closed(w & !TAKEN_CLOSED)
    } else {
        Taken::Open(w)
    }
}

/// Direction `d`'s TAKEN word, read once (Acquire: pairs with the
/// compare-exchanges below).
pub fn taken(m: &Mapping, d: usize) -> Taken {
    taken_of(taken_word(m, d).load(Ordering::Acquire))
}

/// The reader of direction `d` takes `n` more region bytes, unless the
/// region part is closed: Ok(the new total) or Err(where it is closed).
pub fn add_taken(m: &Mapping, d: usize, n: u64) -> Result<u64, u64> {
    let w = taken_word(m, d);
    let mut cur = w.load(Ordering::Acquire);
    loop {
        if cur & TAKEN_CLOSED != 0 {
            return Err(cur & !TAKEN_CLOSED);
        }
        let next = cur.saturating_add(n).min(TAKEN_CLOSED - 1);
        match w.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(next),
            Err(now) => cur = now,
        }
    }
}

/// Closes direction `d`'s region part at what its reader took plus
/// `more` (the reader: bytes it holds and will still take from the
/// region; the writer: 0). Ok(where) if this call closed it, Err(where)
/// if another end had closed it first.
pub fn close_taken(m: &Mapping, d: usize, more: u64) -> Result<u64, u64> {
    let w = taken_word(m, d);
    let mut cur = w.load(Ordering::Acquire);
    loop {
        if cur & TAKEN_CLOSED != 0 {
            return Err(cur & !TAKEN_CLOSED);
        }
        let at = cur.saturating_add(more).min(TAKEN_CLOSED - 1);
        match w.compare_exchange_weak(cur, at | TAKEN_CLOSED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(at),
            Err(now) => cur = now,
        }
    }
}

/// Closes direction `d`'s region part at exactly `at` (devd's engine,
/// when the link under a connection between two hosts failed: `at` is
/// what it gave the reader). Err(what the word says) if it was closed
/// already, or its reader took more than `at` (then nothing changes).
pub fn close_taken_at(m: &Mapping, d: usize, at: u64) -> Result<(), Taken> {
    let w = taken_word(m, d);
    let mut cur = w.load(Ordering::Acquire);
    loop {
        if cur & TAKEN_CLOSED != 0 || cur > at || at >= TAKEN_CLOSED {
            return Err(taken_of(cur));
        }
        match w.compare_exchange_weak(cur, at | TAKEN_CLOSED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(()),
            Err(now) => cur = now,
        }
    }
}

/// What a direction's END word says (Queued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Its writer may still write.
    Open,
    /// Its writer ended its writes after this many bytes since it moved to
    /// the region.
    At(u64),
    /// Its writes end where the kernel socket's stream ends (several
    /// processes write it: nobody can count them).
    AtFin,
}

/// END word value for [`End::AtFin`].
const END_AT_FIN: u64 = u64::MAX;

/// Direction `d`'s END word, read once.
pub fn end_at(m: &Mapping, d: usize) -> End {
    match m.u64_at(hov::END + 8 * (d & 1)).load(Ordering::Acquire) {
        0 => End::Open,
        END_AT_FIN => End::AtFin,
        e => End::At(e - 1),
    }
}

/// Direction `d`'s writer ends its writes after `e` bytes since it moved
/// to the region (the first value published stays).
pub fn publish_end(m: &Mapping, d: usize, e: u64) {
    let _ = m.u64_at(hov::END + 8 * (d & 1)).compare_exchange(
        0,
        e.saturating_add(1).min(END_AT_FIN - 1),
        Ordering::AcqRel,
        Ordering::Relaxed,
    );
}

/// Direction `d`'s writer has posted `n` region bytes in all.
pub fn publish_posted(m: &Mapping, d: usize, n: u64) {
    // Release: with the posts before it (only a reader's close reads it).
    m.u64_at(hov::POSTED + 64 * (d & 1))
        .store(n, Ordering::Release);
}

/// The region bytes direction `d`'s writer says it posted. Untrusted: a
/// wrong value only turns the reader's close into a reset, which the
/// writer could have caused anyway.
pub fn posted(m: &Mapping, d: usize) -> u64 {
    m.u64_at(hov::POSTED + 64 * (d & 1)).load(Ordering::Acquire)
}

/// Direction `d`'s writes end where the kernel socket's stream ends: a
/// count is no longer possible (the end is shared by several processes).
pub fn publish_end_at_fin(m: &Mapping, d: usize) {
    m.u64_at(hov::END + 8 * (d & 1))
        .store(END_AT_FIN, Ordering::Release);
}

/// Whether devd offers this moved connection a new region on the link
/// ([`hov::FORWARD`]).
pub fn forward_offered(m: &Mapping) -> bool {
    m.u32_at(hov::FORWARD).load(Ordering::Acquire) == 1
}

/// The bytes devd writes with pwrite to offer a new region
/// ([`forward_offered`]): the word, 0 before (never torn: only its low
/// byte changes).
pub fn forward_bytes() -> (u64, [u8; 4]) {
    (hov::FORWARD as u64, 1u32.to_le_bytes())
}

/// The connector's devd matched the Claim of the acceptor on another host
/// ([`peer_matched`]). Release: before the words it relays after.
pub fn mark_matched(m: &Mapping) {
    m.u32_at(hov::MATCHED).store(1, Ordering::Release);
}

/// Whether the connector's devd matched the Claim of an acceptor on
/// another host ([`hov::MATCHED`]): its writes may have moved even while
/// its CLAIM has not been relayed here yet.
pub fn peer_matched(m: &Mapping) -> bool {
    m.u32_at(hov::MATCHED).load(Ordering::Acquire) == 1
}

/// Whether the other end is on another host ([`hov::REMOTE`]).
pub fn is_remote(m: &Mapping) -> bool {
    m.u32_at(hov::REMOTE).load(Ordering::Acquire) == 1
}

/// The holder count of end `side` (0 connector, 1 acceptor).
pub fn holders(m: &Mapping, side: usize) -> &std::sync::atomic::AtomicU32 {
    m.u32_at(hdr::HOLDERS + 4 * (side & 1))
}

/// One more process holds end `side` (attach, fork, fd passing).
/// Relaxed: a count only; attach, fork and passing order the processes.
pub fn hold(m: &Mapping, side: usize) {
    holders(m, side).fetch_add(1, Ordering::Relaxed);
}

/// Takes back a [`hold`] whose fork or passing failed.
pub fn unhold(m: &Mapping, side: usize) {
    holders(m, side).fetch_sub(1, Ordering::Relaxed);
}

/// This process lets go of end `side`; true if it was the last holder.
/// AcqRel: this process's ring writes happen before a later holder's
/// end-of-stream mark, and the last holder sees all of them.
pub fn let_go(m: &Mapping, side: usize) -> bool {
    holders(m, side).fetch_sub(1, Ordering::AcqRel) <= 1
}

/// Region kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Two stream rings shared by two endpoints.
    Direct = 1,
    /// One client's virtqueue pair, served by devd.
    Queued = 2,
    /// A Queued connection's hand-over words, shared by its two ends.
    Handover = 3,
}

/// Errors found when checking a region header against what was expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Region size outside the allowed range or not page-aligned.
    #[error("region size {0} is outside {MIN_REGION}..={MAX_REGION} or not a multiple of 4096")]
    Size(usize),
    /// Header does not describe the region we were told about.
    #[error("region header field {field} is {got}, expected {want}")]
    Header {
        /// Which field.
        field: &'static str,
        /// Value found.
        got: u64,
        /// Value expected.
        want: u64,
    },
}

fn check_size(size: usize) -> Result<(), LayoutError> {
    if !(MIN_REGION..=MAX_REGION).contains(&size) || !size.is_multiple_of(4096) {
        return Err(LayoutError::Size(size));
    }
    Ok(())
}

/// The common header words as bytes, for devd to write at offset 0 of a
/// new region without mapping it (the holder counts after them stay 0).
pub fn header_bytes(
    kind: RegionKind,
    size: usize,
    conn_id: u64,
    geom_a: u64,
    geom_b: u64,
) -> [u8; hdr::HOLDERS] {
    let mut b = [0u8; hdr::HOLDERS];
    let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
    put(hdr::MAGIC, &REGION_MAGIC.to_le_bytes());
    put(hdr::VERSION, &REGION_VERSION.to_le_bytes());
    put(hdr::KIND, &(kind as u32).to_le_bytes());
    put(hdr::SIZE, &(size as u64).to_le_bytes());
    put(hdr::CONN_ID, &conn_id.to_le_bytes());
    put(hdr::GEOM_A, &geom_a.to_le_bytes());
    put(hdr::GEOM_B, &geom_b.to_le_bytes());
    b
}

/// Writes the common header words (done by devd when it creates a region).
/// `size` is the whole region's size (the mapping may cover only the header).
pub fn write_header(
    m: &Mapping,
    kind: RegionKind,
    size: usize,
    conn_id: u64,
    geom_a: u64,
    geom_b: u64,
) {
    m.u64_at(hdr::MAGIC).store(REGION_MAGIC, Ordering::Relaxed);
    m.u32_at(hdr::VERSION)
        .store(REGION_VERSION, Ordering::Relaxed);
    m.u32_at(hdr::KIND).store(kind as u32, Ordering::Relaxed);
    m.u64_at(hdr::SIZE).store(size as u64, Ordering::Relaxed);
    m.u64_at(hdr::CONN_ID).store(conn_id, Ordering::Relaxed);
    m.u64_at(hdr::GEOM_A).store(geom_a, Ordering::Relaxed);
    m.u64_at(hdr::GEOM_B).store(geom_b, Ordering::Relaxed);
}

/// Checks the header of a mapped region against the values the control
/// message announced; a mismatch means a broken or hostile region.
pub fn check_header(
    m: &Mapping,
    kind: RegionKind,
    conn_id: u64,
    geom_a: u64,
    geom_b: u64,
) -> Result<(), LayoutError> {
    let checks = [
        (
            "magic",
            m.u64_at(hdr::MAGIC).load(Ordering::Acquire),
            REGION_MAGIC,
        ),
        (
            "version",
            u64::from(m.u32_at(hdr::VERSION).load(Ordering::Relaxed)),
            u64::from(REGION_VERSION),
        ),
        (
            "kind",
            u64::from(m.u32_at(hdr::KIND).load(Ordering::Relaxed)),
            kind as u64,
        ),
        (
            "size",
            m.u64_at(hdr::SIZE).load(Ordering::Relaxed),
            m.len() as u64,
        ),
        (
            "conn_id",
            m.u64_at(hdr::CONN_ID).load(Ordering::Relaxed),
            conn_id,
        ),
        (
            "geom_a",
            m.u64_at(hdr::GEOM_A).load(Ordering::Relaxed),
            geom_a,
        ),
        (
            "geom_b",
            m.u64_at(hdr::GEOM_B).load(Ordering::Relaxed),
            geom_b,
        ),
    ];
    for (field, got, want) in checks {
        if got != want {
            return Err(LayoutError::Header { field, got, want });
        }
    }
    Ok(())
}

/// Geometry of a Direct region: two stream rings of `cap` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectLayout {
    /// Total region size.
    pub size: usize,
    /// Capacity of each ring in bytes (a multiple of 64).
    pub cap: usize,
}

/// Offsets of one direction's control words and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirOffsets {
    /// u64: bytes ever produced (producer line).
    pub head: usize,
    /// u32: EOS/RESET marks (producer line).
    pub flags: usize,
    /// u32: producer sleep epoch, odd while asleep waiting for space.
    pub prod_wait: usize,
    /// u32: the doorbell the producer sleeps on (devd's bell id), written
    /// before `prod_wait` turns odd.
    pub prod_bell: usize,
    /// u64: wake-ups the producer sent to the consumer.
    pub prod_notify_sent: usize,
    /// u64: publishes whose wake-up was suppressed (consumer awake).
    pub prod_notify_suppressed: usize,
    /// u64: stream position stored at ring offset 0 (producer line). The
    /// producer moves it up to `head` when it finds the ring empty, so
    /// that small messages keep reusing the ring's first, cache-hot bytes.
    pub base: usize,
    /// u64: bytes ever consumed (consumer line).
    pub tail: usize,
    /// u32: non-zero once the consumer closed its end.
    pub cons_closed: usize,
    /// u32: consumer sleep epoch, odd while asleep waiting for data.
    pub cons_wait: usize,
    /// u32: the doorbell the consumer sleeps on, written before
    /// `cons_wait` turns odd.
    pub cons_bell: usize,
    /// u64: wake-ups the consumer sent to the producer.
    pub cons_notify_sent: usize,
    /// u64: consumptions whose wake-up was suppressed.
    pub cons_notify_suppressed: usize,
    /// Start of the ring's data bytes.
    pub data: usize,
}

/// Stream flag: the producer will write nothing after `head` (FIN).
pub const FLAG_EOS: u32 = 1;
/// Stream flag: the producer reset the connection.
pub const FLAG_RESET: u32 = 2;
/// Queued RX flag: the peer reset the connection and devd still holds
/// bytes it sent before (`FLAG_RESET` follows them): writes, readiness
/// and SO_ERROR report the reset now, reads take those bytes first, as
/// the kernel's error on an RST beside its receive queue.
pub const FLAG_PEER_RESET: u32 = 4;
/// Queued stream flag (RX only, set by devd with `FLAG_PEER_RESET`): that
/// reset came after the peer's end of stream, which waits behind the
/// bytes too (an abortive close after shutdown(SHUT_WR)): writes and
/// SO_ERROR take EPIPE, as the kernel's for an RST in CLOSE_WAIT. A
/// client that does not know it reports ECONNRESET.
pub const FLAG_RESET_AFTER_EOS: u32 = 8;

impl DirectLayout {
    /// Geometry for a region of `size` bytes.
    pub fn for_size(size: usize) -> Result<DirectLayout, LayoutError> {
        check_size(size)?;
        let cap = ((size - HEADER_SIZE) / 2) & !63;
        Ok(DirectLayout { size, cap })
    }

    /// Geometry announced by devd: checks it is self-consistent.
    pub fn announced(size: usize, cap: u64) -> Result<DirectLayout, LayoutError> {
        let l = DirectLayout::for_size(size)?;
        if l.cap as u64 != cap {
            return Err(LayoutError::Header {
                field: "cap",
                got: cap,
                want: l.cap as u64,
            });
        }
        Ok(l)
    }

    /// Offsets for direction `d` (0 or 1).
    pub fn dir(&self, d: usize) -> DirOffsets {
        assert!(d < 2);
        let p = 64 + 256 * d;
        let c = p + 128;
        DirOffsets {
            head: p,
            flags: p + 8,
            prod_wait: p + 12,
            prod_notify_sent: p + 16,
            prod_notify_suppressed: p + 24,
            base: p + 32,
            prod_bell: p + 40,
            tail: c,
            cons_closed: c + 8,
            cons_wait: c + 12,
            cons_notify_sent: c + 16,
            cons_notify_suppressed: c + 24,
            cons_bell: c + 32,
            data: HEADER_SIZE + d * self.cap,
        }
    }
}

/// Geometry of a Queued region: a TX and an RX split virtqueue of `qsize`
/// entries, each with `qsize` buffer slots of `slot` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedLayout {
    /// Total region size.
    pub size: usize,
    /// Entries per queue (power of two).
    pub qsize: u16,
    /// Bytes per buffer slot (multiple of 64).
    pub slot: usize,
    /// Per queue (0 TX, 1 RX): descriptor table, avail ring, used ring.
    pub queues: [QueueOffsets; 2],
    /// First TX slot; RX slots follow the TX slots.
    pub slots: usize,
}

/// Where one split virtqueue lives in the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOffsets {
    /// Descriptor table (16-byte aligned).
    pub desc: usize,
    /// Available ring (flags, idx, ring[qsize], used_event).
    pub avail: usize,
    /// Used ring (flags, idx, ring[qsize] of {id, len}, avail_event).
    pub used: usize,
    /// The driver's own words in the header (`qhdr::TX_DRIVER`,
    /// `qhdr::RX_DRIVER`): what every process holding the end has
    /// consumed, so that any of them can go on where another stopped.
    pub driver: usize,
}

/// Queued state words in the header.
pub mod qhdr {
    /// u32 written by the client: FLAG_EOS/FLAG_RESET after its last TX buffer.
    pub const TX_FLAGS: usize = 192;
    /// u32 written by devd: FLAG_EOS/FLAG_RESET after the last RX buffer.
    pub const RX_FLAGS: usize = 256;
    /// u64 written by the client: region bytes its holders posted on TX
    /// (its END is published from it; also a statistic).
    pub const TX_BYTES: usize = 320;
    /// u64 client counter: bytes taken from RX.
    pub const RX_BYTES: usize = 328;
    /// u64 client counter: kicks sent to devd.
    pub const KICKS: usize = 336;
    /// u64 client counter: kicks suppressed by event index.
    pub const KICKS_SUPPRESSED: usize = 344;
    /// The TX queue's driver words (`vq::driver`): u64 used position
    /// (used index << 32 | bytes taken of that entry), then u32 the avail
    /// index at the last kick check. Written and read by clients only.
    pub const TX_DRIVER: usize = 384;
    /// The RX queue's driver words, as [`TX_DRIVER`].
    pub const RX_DRIVER: usize = 400;
}

/// Queue entries per direction for Queued regions.
pub const QUEUED_QSIZE: u16 = 32;

impl QueuedLayout {
    /// Geometry for a region of `size` bytes.
    pub fn for_size(size: usize) -> Result<QueuedLayout, LayoutError> {
        check_size(size)?;
        let q = usize::from(QUEUED_QSIZE);
        let align = |v: usize, a: usize| (v + a - 1) & !(a - 1);
        let mut off = HEADER_SIZE;
        let mut queues = [QueueOffsets {
            desc: 0,
            avail: 0,
            used: 0,
            driver: 0,
        }; 2];
        queues[0].driver = qhdr::TX_DRIVER;
        queues[1].driver = qhdr::RX_DRIVER;
        for qo in &mut queues {
            qo.desc = align(off, 16);
            off = qo.desc + 16 * q;
            qo.avail = align(off, 2);
            off = qo.avail + 6 + 2 * q;
            qo.used = align(off, 4);
            off = qo.used + 6 + 8 * q;
        }
        let slots = align(off, 4096);
        let slot = ((size.saturating_sub(slots)) / (2 * q)) & !63;
        if slot < 1024 {
            return Err(LayoutError::Size(size));
        }
        Ok(QueuedLayout {
            size,
            qsize: QUEUED_QSIZE,
            slot,
            queues,
            slots,
        })
    }

    /// The header devd writes into a Queued region of this geometry for
    /// connection `conn_id`.
    pub fn header(&self, conn_id: u64) -> [u8; hdr::HOLDERS] {
        header_bytes(
            RegionKind::Queued,
            self.size,
            conn_id,
            u64::from(self.qsize),
            self.slot as u64,
        )
    }

    /// Geometry announced by devd: checks it is self-consistent.
    pub fn announced(size: usize, qsize: u64, slot: u64) -> Result<QueuedLayout, LayoutError> {
        let l = QueuedLayout::for_size(size)?;
        if u64::from(l.qsize) != qsize {
            return Err(LayoutError::Header {
                field: "qsize",
                got: qsize,
                want: u64::from(l.qsize),
            });
        }
        if l.slot as u64 != slot {
            return Err(LayoutError::Header {
                field: "slot",
                got: slot,
                want: l.slot as u64,
            });
        }
        Ok(l)
    }

    /// Offset of slot `i` of queue `q` (0 TX, 1 RX).
    pub fn slot_offset(&self, q: usize, i: u16) -> usize {
        self.slots + (q * usize::from(self.qsize) + usize::from(i)) * self.slot
    }

    /// Bounds of the slot area of queue `q`: devd only reads TX data from,
    /// and only writes RX data into, that queue's own slots.
    pub fn slot_area(&self, q: usize) -> std::ops::Range<usize> {
        let start = self.slot_offset(q, 0);
        start..start + usize::from(self.qsize) * self.slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_direct_region_has_two_rings_that_fit() {
        let l = DirectLayout::for_size(512 * 1024).unwrap();
        assert_eq!(l.cap % 64, 0);
        assert!(HEADER_SIZE + 2 * l.cap <= l.size);
        let d1 = l.dir(1);
        assert!(d1.cons_bell + 4 <= HEADER_SIZE);
        assert_eq!(d1.data, HEADER_SIZE + l.cap);
    }

    #[test]
    fn queued_layout_does_not_overlap_and_fits() {
        let l = QueuedLayout::for_size(512 * 1024).unwrap();
        assert!(l.queues[0].used + 6 + 8 * 32 <= l.queues[1].desc);
        assert!(l.queues[1].used + 6 + 8 * 32 <= l.slots);
        assert!(l.slot_area(1).end <= l.size);
        assert!(l.slot >= 4096);
    }

    fn page() -> Mapping {
        let fd = crate::sys::memfd_sealed("t", HOV_PAGE).unwrap();
        Mapping::map(std::os::fd::AsFd::as_fd(&fd), HOV_PAGE, true).unwrap()
    }

    #[test]
    fn a_reader_takes_until_its_writer_closes_the_region_part() {
        let m = page();
        assert_eq!(add_taken(&m, 0, 100), Ok(100));
        // The writer closes at what was taken; the reader takes no more.
        assert_eq!(close_taken(&m, 0, 0), Ok(100));
        assert_eq!(add_taken(&m, 0, 5), Err(100));
        assert_eq!(taken(&m, 0), Taken::Closed(100));
        // A later close (the reader's) learns where, and changes nothing.
        assert_eq!(close_taken(&m, 0, 40), Err(100));
        // The other direction is untouched.
        assert_eq!(taken(&m, 1), Taken::Open(0));
    }

    #[test]
    fn a_reader_that_closes_first_keeps_what_it_holds() {
        let m = page();
        assert_eq!(add_taken(&m, 1, 10), Ok(10));
        assert_eq!(close_taken(&m, 1, 30), Ok(40));
        assert_eq!(close_taken(&m, 1, 0), Err(40));
        assert_eq!(add_taken(&m, 1, 1), Err(40));
    }

    #[test]
    fn devd_closes_at_what_it_gave_the_reader_never_below_what_it_took() {
        let m = page();
        assert_eq!(add_taken(&m, 0, 10), Ok(10));
        // The reader took more than devd says it gave: refused, unchanged.
        assert_eq!(close_taken_at(&m, 0, 9), Err(Taken::Open(10)));
        assert_eq!(close_taken_at(&m, 0, 25), Ok(()));
        assert_eq!(taken(&m, 0), Taken::Closed(25));
        // The reader learns where it closed; a second close changes nothing.
        assert_eq!(add_taken(&m, 0, 1), Err(25));
        assert_eq!(close_taken_at(&m, 0, 30), Err(Taken::Closed(25)));
        assert_eq!(close_taken_at(&m, 1, TAKEN_CLOSED), Err(Taken::Open(0)));
    }

    #[test]
    fn the_first_end_published_stays() {
        let m = page();
        assert_eq!(end_at(&m, 0), End::Open);
        publish_end(&m, 0, 0);
        publish_end(&m, 0, 7);
        assert_eq!(end_at(&m, 0), End::At(0));
        // A count beyond the word saturates short of "at the FIN".
        publish_end(&m, 1, u64::MAX);
        assert_eq!(end_at(&m, 1), End::At(u64::MAX - 2));
        publish_end_at_fin(&m, 1);
        assert_eq!(end_at(&m, 1), End::AtFin);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(DirectLayout::for_size(1000).is_err());
        assert!(DirectLayout::for_size(MAX_REGION + 4096).is_err());
        assert!(DirectLayout::announced(65536, 12).is_err());
    }
}
