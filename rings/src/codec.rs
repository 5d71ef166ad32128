//! The control-message codec (protocol version [`CTL_VERSION`]): what clients and devd
//! say to each other over the SOCK_SEQPACKET control socket.
//!
//! Frame: `magic u32 | version u16 | type u16 | body_len u32 | body`, all
//! little-endian. Every field is read with bounds checks; unknown types,
//! wrong versions, trailing bytes and out-of-range values are errors, never
//! panics. File descriptors travel beside the frame (SCM_RIGHTS); each
//! message type says how many it carries, and the receiver checks that.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// "SSCK".
pub const CTL_MAGIC: u32 = u32::from_le_bytes(*b"SSCK");
/// Control protocol version.
pub const CTL_VERSION: u16 = 15;
/// Largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 64 * 1024;
/// Largest number of fds one message carries.
pub const MAX_FDS: usize = 6;
const HDR: usize = 12;

/// Why a received frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Frame shorter than its header or its declared body.
    #[error("control frame truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Wrong magic.
    #[error("control frame magic {0:#x} is not ssock's")]
    Magic(u32),
    /// Peer speaks another protocol version.
    #[error("control protocol version {got}, expected {want}")]
    Version {
        /// Received.
        got: u16,
        /// Ours.
        want: u16,
    },
    /// Unknown message type.
    #[error("unknown control message type {0}")]
    Type(u16),
    /// A field had a value outside its domain.
    #[error("control message field {field} has invalid value {value}")]
    Field {
        /// Field name.
        field: &'static str,
        /// Offending value.
        value: u64,
    },
    /// Bytes left after the body.
    #[error("{0} trailing bytes after control message")]
    Trailing(usize),
    /// Wrong number of fds for the message.
    #[error("message {msg} carries {got} fds, expected {want}")]
    Fds {
        /// Message name.
        msg: &'static str,
        /// Received.
        got: usize,
        /// Expected.
        want: usize,
    },
}

/// Transport modes a connection can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Kernel TCP (no acceleration).
    Kernel = 0,
    /// Shared stream rings between the two processes.
    Direct = 1,
    /// Virtqueues served by devd through a backend.
    Queued = 2,
}

impl Mode {
    /// Lower-case name, as shown by ringstat.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            Mode::Direct => "direct",
            Mode::Queued => "queued",
        }
    }

    fn from_u8(v: u8) -> Result<Mode, DecodeError> {
        Ok(match v {
            0 => Mode::Kernel,
            1 => Mode::Direct,
            2 => Mode::Queued,
            _ => {
                return Err(DecodeError::Field {
                    field: "mode",
                    value: u64::from(v),
                })
            }
        })
    }
}

/// What a client asks for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModePref {
    /// devd's configured default.
    Auto = 0,
    /// Direct if possible.
    Direct = 1,
    /// Queued if possible.
    Queued = 2,
    /// Never accelerate.
    Kernel = 3,
}

impl ModePref {
    fn from_u8(v: u8) -> Result<ModePref, DecodeError> {
        Ok(match v {
            0 => ModePref::Auto,
            1 => ModePref::Direct,
            2 => ModePref::Queued,
            3 => ModePref::Kernel,
            _ => {
                return Err(DecodeError::Field {
                    field: "mode_pref",
                    value: u64::from(v),
                })
            }
        })
    }
}

macro_rules! reasons {
    ($( $(#[$m:meta])* $name:ident = $code:expr, $text:expr; )*) => {
        /// Why a connection stayed on (or went back to) kernel TCP.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum FallbackReason { $( $(#[$m])* $name = $code, )* }
        impl FallbackReason {
            /// All reasons, for totals.
            pub const ALL: &'static [FallbackReason] = &[$(FallbackReason::$name,)*];
            /// Stable snake_case name (ringstat, JSON).
            pub fn name(self) -> &'static str { match self { $(FallbackReason::$name => $text,)* } }
            /// From the wire code.
            pub fn from_u16(v: u16) -> Option<FallbackReason> {
                match v { $($code => Some(FallbackReason::$name),)* _ => None }
            }
        }
    };
}

reasons! {
    /// The destination is not a registered ssock listener.
    PeerNotEnabled = 1, "peer_not_enabled";
    /// Policy does not allow this user/port.
    Policy = 2, "policy";
    /// Per-user connection or memory cap reached.
    Limit = 3, "limit";
    /// The application or config asked for kernel TCP.
    Requested = 4, "requested";
    /// Not sent since version 5 (was: no Hello in time); kept so codes stay.
    HelloTimeout = 5, "hello_timeout";
    /// Not sent since version 5 (was: a bad Hello); kept so codes stay.
    BadHello = 6, "bad_hello";
    /// Not sent since version 5 (was: a Hello of another version).
    Version = 7, "version";
    /// Not sent since version 5 (was: HelloAck KERNEL).
    Refused = 8, "refused";
    /// devd failed to set the connection up.
    DevdError = 9, "devd_error";
    /// The socket uses a feature ssock keeps on the kernel (e.g. MSG_OOB).
    Unsupported = 10, "unsupported";
    /// The address is not on this host / not reachable through a backend.
    NotLocal = 11, "not_local";
    /// The connector let go of the connection (closed, exited, failed)
    /// before the acceptor claimed it: the acceptor stays on kernel TCP.
    ConnectorGone = 12, "connector_gone";
    /// The connection was to reuse a region kept by the listener's process
    /// (see [`Attachment::reuse`]) and another process accepted it.
    OtherAcceptor = 13, "other_acceptor";
    /// The listener's recent connections were too short to repay their
    /// setup: the `short_lived` policy keeps its connections on kernel TCP
    /// for a while (decided by the connector from devd's listener board,
    /// reported in batches).
    ShortLived = 14, "short_lived";
    /// The socket is (or became) one the C library's stdio may read or
    /// write behind the shim's back: named by fd 0, 1 or 2, or handed to
    /// fdopen. Its connection moved to its kernel socket.
    Stdio = 15, "stdio";
    /// The acceptor served the connection on its kernel socket without
    /// taking its end (its process could not reach devd, or accepted it
    /// where the shim does not see): the connector read its bytes there
    /// while the claim was still pending, and let its own end go.
    Unclaimed = 16, "unclaimed";
}

/// Which end of a connection a process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The end that called connect().
    Connector = 0,
    /// The end that came out of accept().
    Acceptor = 1,
}

impl Side {
    fn from_u8(v: u8) -> Result<Side, DecodeError> {
        match v {
            0 => Ok(Side::Connector),
            1 => Ok(Side::Acceptor),
            _ => Err(DecodeError::Field {
                field: "side",
                value: u64::from(v),
            }),
        }
    }
}

/// Everything a process needs to use its end of an accelerated connection.
/// Direct carries fds [region, own read doorbell, own write doorbell, peer
/// read doorbell, peer write doorbell] (a producer rings the consumer's read
/// doorbell, a consumer the producer's write doorbell); Queued carries
/// [region, kick eventfd (client -> devd), call eventfd (devd -> client)].
/// A Direct attachment with `reuse` carries no fds: the region and its
/// doorbells are the ones this process kept from an earlier connection to
/// the same peer process (it asked devd to, with Release `park`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment {
    /// devd's connection id.
    pub conn_id: u64,
    /// Direct or Queued.
    pub mode: Mode,
    /// Which end this is.
    pub side: Side,
    /// Region size in bytes.
    pub region_size: u64,
    /// Direct: ring capacity; Queued: queue size.
    pub geom_a: u64,
    /// Queued: slot size; Direct: 0.
    pub geom_b: u64,
    /// devd's id of the region (Direct: random, it outlives the connection
    /// when reused; Queued: the connection id).
    pub region: u64,
    /// Direct only: the region is one this process kept (parked) after an
    /// earlier connection; no fds travel, and devd reset its header.
    pub reuse: bool,
    /// Direct only: the common doorbell of the peer's process when devd
    /// knows it (0: not yet, as for a connector before its acceptor
    /// claims): what its rings fall back to. Its ringers' end travels after
    /// the region's unless `reuse`.
    pub peer_bell: u32,
    /// Direct, Expect only: the connecting thread's own doorbell, which
    /// its Intent named (0: none). Its ringers' end travels after
    /// `peer_bell`'s; never without `peer_bell`, never equal to it.
    pub peer_thread_bell: u32,
}

impl Attachment {
    /// Number of fds that travel with it.
    pub fn fd_count(&self) -> usize {
        match self.mode {
            _ if self.reuse => 0,
            Mode::Direct => {
                1 + usize::from(self.peer_bell != 0) + usize::from(self.peer_thread_bell != 0)
            }
            _ => 4,
        }
    }
}

/// Client -> devd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// First message of a session. No fds.
    Hello {
        /// Client's pid as it believes it (devd uses SO_PEERCRED).
        pid: u32,
    },
    /// Register a listening socket. fds: [listening socket].
    Listen,
    /// Forget a listener. fds: [listening socket].
    Unlisten,
    /// About to connect the socket to `dst`. fds: [the socket].
    Intent {
        /// Destination address.
        dst: SocketAddr,
        /// What the application asked for.
        pref: ModePref,
        /// The connecting thread's own doorbell (0: none): the acceptor
        /// is given it, so that its rings wake this thread without asking
        /// devd, which a forked server's child cannot.
        bell: u32,
    },
    /// An accepted socket: is there an intent for it? fds: [accepted socket].
    Claim,
    /// Map this socket's connection (exec'd images, fd receivers, an end
    /// reusing a region this process no longer keeps). fds: [socket].
    Attach,
    /// This process is done with its end of the connection (it closed it).
    /// devd sends no reply (see [`Request::expects_reply`]).
    Release {
        /// Connection id.
        conn_id: u64,
        /// Which end (one process may hold both ends of a connection).
        side: Side,
        /// Direct: this process keeps the region mapped (and its doorbells
        /// open) for a next connection between the same two processes.
        park: bool,
    },
    /// This process closed its end while other processes still hold its
    /// socket (a child it forked, a process it passed the socket to): devd
    /// keeps the end while any process holds the socket, and lets go of it
    /// once none does (whichever closes last, or exits without closing).
    /// No reply, like Release.
    Leave {
        /// Connection id.
        conn_id: u64,
        /// Which end.
        side: Side,
    },
    /// The peer broke the ring protocol; this end reset the connection.
    Violation {
        /// Connection id.
        conn_id: u64,
    },
    /// Record a fallback the client decided on. No fds.
    Fallback {
        /// Why.
        reason: FallbackReason,
    },
    /// Connections this process left on kernel TCP without asking devd
    /// (the listener board said so), since its last report. No fds, no
    /// reply, like Release.
    Skipped {
        /// Why (`peer_not_enabled` or `short_lived`).
        reason: FallbackReason,
        /// How many.
        count: u32,
    },
    /// The doorbell with this id (a sleeping peer named it in its wait
    /// word), or with id 0 a new spare doorbell of this session (the last
    /// one went to a forked child): answered with `Response::Bell` and its
    /// eventfd. No fds.
    Bell {
        /// devd's id of the doorbell (0: a new spare).
        id: u32,
    },
    /// Statistics page: connections with id > `after`, at most `limit`.
    Stats {
        /// Last id of the previous page (0 for the first).
        after: u64,
        /// Page size (1..=256).
        limit: u16,
    },
    /// Takes link `link` to peer `node` (None: every link to it) out of
    /// service (`up` false: this side stops its heartbeat and the
    /// connections over it move to their kernel sockets) or back in. Root
    /// or devd's own user only.
    Link {
        /// The peer's node id.
        node: u32,
        /// Which of its links (0 first, as devd's config lists them).
        link: Option<u8>,
        /// In service.
        up: bool,
    },
    /// Takes (`take`) the new end devd offered this moved end
    /// (`hov::FORWARD`, docs/protocol.md 8.6), with its socket (1 fd):
    /// answered `Attached` with the new end, or `Error` ENOENT (none
    /// offered, or not to this session); the old end is released after,
    /// as usual. Without `take`: this end will not take it, devd lets it
    /// go (answered Ok either way).
    Forward {
        /// The moved end's connection id.
        conn_id: u64,
        /// Which end.
        side: Side,
        /// Take it (else: let it go).
        take: bool,
    },
    /// An end whose other end is on another host, on a session with a
    /// devd started after the one that served it died, with its socket (1
    /// fd): ask the other host's devd where each direction goes on over
    /// the kernel socket (docs/protocol.md 8.8). `words`: this end's
    /// hand-over words ([`crate::relay::ours`]); `received`: what the
    /// dead devd gave its reader (the direction it reads is closed there).
    /// Answered `Rejoined`, or `Error` EAGAIN (the other host's devd is
    /// not connected yet: ask again) or another code (give up: reset),
    /// when the other host's devd answered, within seconds: not in turn.
    Rejoin {
        /// This end's words.
        words: [u64; 4],
        /// What its reader was given of the other end's stream.
        received: u64,
    },
    /// A rejoined end's words changed (its END, once its writes are on
    /// the kernel socket in order): devd relays them to the other host, on
    /// the session that rejoined it. No fds, no reply; the other host's
    /// changes come on that session as `Rejoined`, unasked.
    Words {
        /// This end's words.
        words: [u64; 4],
    },
}

/// devd -> client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Session accepted.
    Welcome {
        /// Spin budget the config asks clients to use, in microseconds.
        spin_us: u32,
        /// devd's default mode for Auto.
        default_mode: Mode,
        /// The listener board's fd travels with it (`board`).
        board: bool,
        /// The id of this session's doorbell (0: none), a pipe whose read
        /// and write ends travel after the board's: the process's sleepers
        /// wait on it, and its peers ring it by this id (holding only its
        /// write end).
        bell: u32,
        /// A second doorbell of this session (0: none), its two ends last:
        /// the next child this process forks takes it as its own.
        spare: u32,
    },
    /// Done.
    Ok,
    /// Intent accepted, the connection created: connect, map `attachment`
    /// (fds beside the frame) and move to it once its CLAIM word says so.
    Proceed {
        /// devd's token of the intent.
        token: u64,
        /// The connector's end.
        attachment: Attachment,
    },
    /// Stay on kernel TCP.
    Kernel {
        /// Why.
        reason: FallbackReason,
    },
    /// Claim found an intent and paired it: use `attachment` (fds beside
    /// the frame); the kernel socket carries the connector's first bytes
    /// up to its published switch.
    Expect {
        /// Token to expect.
        token: u64,
        /// The acceptor's end.
        attachment: Attachment,
    },
    /// Claim found an intent but this side may not accelerate it (policy,
    /// caps, resources, or its connector let go of it): plain TCP; devd
    /// told the connector (its CLAIM word) and counted the fallback.
    ExpectKernel {
        /// Token to expect.
        token: u64,
        /// Why.
        reason: FallbackReason,
    },
    /// The connection's resources (fds beside the frame).
    Attached(Attachment),
    /// The doorbell asked for with `Request::Bell`: its write end beside
    /// the frame, or for a new spare (`both`) its read end, then its
    /// write end.
    Bell {
        /// Its id.
        id: u32,
        /// Both ends travel (a spare of the asker's own).
        both: bool,
    },
    /// A statistics page, as JSON text (see docs/ringstat.md).
    Stats {
        /// JSON.
        json: String,
        /// Whether more pages follow.
        more: bool,
    },
    /// The request failed.
    Error {
        /// errno-like code.
        code: u32,
        /// Human-readable sentence.
        message: String,
    },
    /// The other host's part for a `Rejoin`: its end's words and what
    /// its reader was given of this end's stream.
    Rejoined {
        /// The other end's words.
        words: [u64; 4],
        /// Where the direction this end writes closes.
        closed: u64,
    },
}

struct W(Vec<u8>);

impl W {
    fn new(ty: u16) -> W {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&CTL_MAGIC.to_le_bytes());
        v.extend_from_slice(&CTL_VERSION.to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        W(v)
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let len = u32::try_from(b.len()).expect("field longer than 4 GiB");
        self.u32(len);
        self.0.extend_from_slice(b);
        self
    }
    fn addr(&mut self, a: &SocketAddr) -> &mut Self {
        match a.ip() {
            IpAddr::V4(ip) => {
                self.u8(4);
                self.0.extend_from_slice(&ip.to_ipv6_mapped().octets());
            }
            IpAddr::V6(ip) => {
                self.u8(6);
                self.0.extend_from_slice(&ip.octets());
            }
        }
        self.u16(a.port())
    }
    fn attachment(&mut self, a: &Attachment) -> &mut Self {
        self.u64(a.conn_id)
            .u8(a.mode as u8)
            .u8(a.side as u8)
            .u64(a.region_size)
            .u64(a.geom_a)
            .u64(a.geom_b)
            .u64(a.region)
            .u8(u8::from(a.reuse))
            .u32(a.peer_bell)
            .u32(a.peer_thread_bell)
    }
    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.0.len() - HDR).expect("frame too long");
        self.0[8..12].copy_from_slice(&len.to_le_bytes());
        assert!(self.0.len() <= MAX_FRAME, "control frame over MAX_FRAME");
        self.0
    }
}

struct R<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated {
            need: usize::MAX,
            have: self.b.len(),
        })?;
        let s = self.b.get(self.at..end).ok_or(DecodeError::Truncated {
            need: end,
            have: self.b.len(),
        })?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::Field {
                field,
                value: u64::from(v),
            }),
        }
    }
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        if n > MAX_FRAME {
            return Err(DecodeError::Field {
                field,
                value: n as u64,
            });
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Field {
            field,
            value: n as u64,
        })
    }
    fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let fam = self.u8()?;
        let raw: [u8; 16] = self.take(16)?.try_into().expect("16 bytes");
        let port = self.u16()?;
        let ip6 = Ipv6Addr::from(raw);
        let ip = match fam {
            4 => IpAddr::V4(ip6.to_ipv4_mapped().ok_or(DecodeError::Field {
                field: "addr",
                value: 4,
            })?),
            6 => IpAddr::V6(ip6),
            v => {
                return Err(DecodeError::Field {
                    field: "family",
                    value: u64::from(v),
                })
            }
        };
        Ok(SocketAddr::new(ip, port))
    }
    fn reason(&mut self) -> Result<FallbackReason, DecodeError> {
        let v = self.u16()?;
        FallbackReason::from_u16(v).ok_or(DecodeError::Field {
            field: "reason",
            value: u64::from(v),
        })
    }
    fn attachment(&mut self) -> Result<Attachment, DecodeError> {
        let conn_id = self.u64()?;
        let mode = Mode::from_u8(self.u8()?)?;
        if mode == Mode::Kernel {
            return Err(DecodeError::Field {
                field: "mode",
                value: 0,
            });
        }
        let a = Attachment {
            conn_id,
            mode,
            side: Side::from_u8(self.u8()?)?,
            region_size: self.u64()?,
            geom_a: self.u64()?,
            geom_b: self.u64()?,
            region: self.u64()?,
            reuse: self.bool("reuse")?,
            peer_bell: self.u32()?,
            peer_thread_bell: self.u32()?,
        };
        if a.reuse && a.mode != Mode::Direct {
            return Err(DecodeError::Field {
                field: "reuse",
                value: 1,
            });
        }
        if a.peer_bell != 0 && a.mode != Mode::Direct {
            return Err(DecodeError::Field {
                field: "peer_bell",
                value: u64::from(a.peer_bell),
            });
        }
        if a.peer_thread_bell != 0
            && (a.peer_bell == 0 || a.peer_thread_bell == a.peer_bell || a.reuse)
        {
            return Err(DecodeError::Field {
                field: "peer_thread_bell",
                value: u64::from(a.peer_thread_bell),
            });
        }
        Ok(a)
    }
    fn end(&self) -> Result<(), DecodeError> {
        match self.b.len() - self.at {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

fn open(frame: &[u8]) -> Result<(u16, R<'_>), DecodeError> {
    let mut r = R { b: frame, at: 0 };
    let magic = r.u32()?;
    if magic != CTL_MAGIC {
        return Err(DecodeError::Magic(magic));
    }
    let version = r.u16()?;
    if version != CTL_VERSION {
        return Err(DecodeError::Version {
            got: version,
            want: CTL_VERSION,
        });
    }
    let ty = r.u16()?;
    let len = r.u32()? as usize;
    if frame.len() != HDR + len {
        return Err(DecodeError::Truncated {
            need: HDR + len,
            have: frame.len(),
        });
    }
    Ok((ty, r))
}

fn check_fds(msg: &'static str, got: usize, want: usize) -> Result<(), DecodeError> {
    if got == want {
        Ok(())
    } else {
        Err(DecodeError::Fds { msg, got, want })
    }
}

impl Request {
    /// Whether devd answers this request in turn. Release and Leave go
    /// unanswered: a process closing a connection waits for nothing, and
    /// its next request's reply is the next message it reads. Rejoin is
    /// answered later, once another host's devd answered (its session
    /// asks nothing else meanwhile).
    pub fn expects_reply(&self) -> bool {
        !matches!(
            self,
            Request::Release { .. }
                | Request::Leave { .. }
                | Request::Skipped { .. }
                | Request::Rejoin { .. }
                | Request::Words { .. }
        )
    }

    /// Number of fds that must travel with this request.
    pub fn fd_count(&self) -> usize {
        match self {
            Request::Listen | Request::Unlisten | Request::Intent { .. } | Request::Claim => 1,
            Request::Attach | Request::Forward { .. } | Request::Rejoin { .. } => 1,
            _ => 0,
        }
    }

    /// Serializes the request.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Hello { pid } => {
                let mut w = W::new(1);
                w.u32(*pid);
                w.finish()
            }
            Request::Listen => W::new(2).finish(),
            Request::Unlisten => W::new(3).finish(),
            Request::Intent { dst, pref, bell } => {
                let mut w = W::new(4);
                w.addr(dst).u8(*pref as u8).u32(*bell);
                w.finish()
            }
            Request::Claim => W::new(5).finish(),
            Request::Attach => W::new(7).finish(),
            Request::Release {
                conn_id,
                side,
                park,
            } => {
                let mut w = W::new(8);
                w.u64(*conn_id).u8(*side as u8).u8(u8::from(*park));
                w.finish()
            }
            Request::Leave { conn_id, side } => {
                let mut w = W::new(12);
                w.u64(*conn_id).u8(*side as u8);
                w.finish()
            }
            Request::Violation { conn_id } => {
                let mut w = W::new(11);
                w.u64(*conn_id);
                w.finish()
            }
            Request::Fallback { reason } => {
                let mut w = W::new(9);
                w.u16(*reason as u16);
                w.finish()
            }
            Request::Skipped { reason, count } => {
                let mut w = W::new(13);
                w.u16(*reason as u16).u32(*count);
                w.finish()
            }
            Request::Bell { id } => {
                let mut w = W::new(14);
                w.u32(*id);
                w.finish()
            }
            Request::Stats { after, limit } => {
                let mut w = W::new(10);
                w.u64(*after).u16(*limit);
                w.finish()
            }
            Request::Link { node, link, up } => {
                let mut w = W::new(15);
                w.u32(*node).u8(u8::from(*up)).u8(link.unwrap_or(u8::MAX));
                w.finish()
            }
            Request::Forward {
                conn_id,
                side,
                take,
            } => {
                let mut w = W::new(16);
                w.u64(*conn_id).u8(*side as u8).u8(u8::from(*take));
                w.finish()
            }
            Request::Rejoin { words, received } => {
                let mut w = W::new(17);
                for x in words {
                    w.u64(*x);
                }
                w.u64(*received);
                w.finish()
            }
            Request::Words { words } => {
                let mut w = W::new(18);
                for x in words {
                    w.u64(*x);
                }
                w.finish()
            }
        }
    }

    /// Parses and validates a request that arrived with `fds` descriptors.
    pub fn decode(frame: &[u8], fds: usize) -> Result<Request, DecodeError> {
        let (ty, mut r) = open(frame)?;
        let req = match ty {
            1 => Request::Hello { pid: r.u32()? },
            2 => Request::Listen,
            3 => Request::Unlisten,
            4 => Request::Intent {
                dst: r.addr()?,
                pref: ModePref::from_u8(r.u8()?)?,
                bell: r.u32()?,
            },
            5 => Request::Claim,
            // 6 was Pair (protocol 2).
            7 => Request::Attach,
            8 => Request::Release {
                conn_id: r.u64()?,
                side: Side::from_u8(r.u8()?)?,
                park: r.bool("park")?,
            },
            11 => Request::Violation { conn_id: r.u64()? },
            12 => Request::Leave {
                conn_id: r.u64()?,
                side: Side::from_u8(r.u8()?)?,
            },
            9 => Request::Fallback {
                reason: r.reason()?,
            },
            14 => Request::Bell { id: r.u32()? },
            15 => Request::Link {
                node: r.u32()?,
                up: r.bool("up")?,
                link: Some(r.u8()?).filter(|&l| l != u8::MAX),
            },
            16 => Request::Forward {
                conn_id: r.u64()?,
                side: Side::from_u8(r.u8()?)?,
                take: r.bool("take")?,
            },
            17 => Request::Rejoin {
                words: [r.u64()?, r.u64()?, r.u64()?, r.u64()?],
                received: r.u64()?,
            },
            18 => Request::Words {
                words: [r.u64()?, r.u64()?, r.u64()?, r.u64()?],
            },
            13 => Request::Skipped {
                reason: r.reason()?,
                count: r.u32()?,
            },
            10 => {
                let after = r.u64()?;
                let limit = r.u16()?;
                if !(1..=256).contains(&limit) {
                    return Err(DecodeError::Field {
                        field: "limit",
                        value: u64::from(limit),
                    });
                }
                Request::Stats { after, limit }
            }
            t => return Err(DecodeError::Type(t)),
        };
        r.end()?;
        check_fds("request", fds, req.fd_count())?;
        Ok(req)
    }
}

impl Response {
    /// Number of fds that travel with this response.
    pub fn fd_count(&self) -> usize {
        match self {
            Response::Attached(a)
            | Response::Proceed { attachment: a, .. }
            | Response::Expect { attachment: a, .. } => a.fd_count(),
            Response::Welcome {
                board, bell, spare, ..
            } => usize::from(*board) + 2 * usize::from(*bell != 0) + 2 * usize::from(*spare != 0),
            Response::Bell { both, .. } => 1 + usize::from(*both),
            _ => 0,
        }
    }

    /// Serializes the response.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::Welcome {
                spin_us,
                default_mode,
                board,
                bell,
                spare,
            } => {
                let mut w = W::new(101);
                w.u32(*spin_us)
                    .u8(*default_mode as u8)
                    .u8(u8::from(*board))
                    .u32(*bell)
                    .u32(*spare);
                w.finish()
            }
            Response::Bell { id, both } => {
                let mut w = W::new(110);
                w.u32(*id).u8(u8::from(*both));
                w.finish()
            }
            Response::Ok => W::new(102).finish(),
            Response::Proceed { token, attachment } => {
                let mut w = W::new(103);
                w.u64(*token).attachment(attachment);
                w.finish()
            }
            Response::Kernel { reason } => {
                let mut w = W::new(104);
                w.u16(*reason as u16);
                w.finish()
            }
            Response::Expect { token, attachment } => {
                let mut w = W::new(105);
                w.u64(*token).attachment(attachment);
                w.finish()
            }
            Response::ExpectKernel { token, reason } => {
                let mut w = W::new(109);
                w.u64(*token).u16(*reason as u16);
                w.finish()
            }
            Response::Attached(a) => {
                let mut w = W::new(106);
                w.attachment(a);
                w.finish()
            }
            Response::Stats { json, more } => {
                let mut w = W::new(107);
                w.bytes(json.as_bytes()).u8(u8::from(*more));
                w.finish()
            }
            Response::Error { code, message } => {
                let mut w = W::new(108);
                w.u32(*code).bytes(message.as_bytes());
                w.finish()
            }
            Response::Rejoined { words, closed } => {
                let mut w = W::new(111);
                for x in words {
                    w.u64(*x);
                }
                w.u64(*closed);
                w.finish()
            }
        }
    }

    /// Parses and validates a response that arrived with `fds` descriptors.
    pub fn decode(frame: &[u8], fds: usize) -> Result<Response, DecodeError> {
        let (ty, mut r) = open(frame)?;
        let resp = match ty {
            101 => {
                let spin_us = r.u32()?;
                let default_mode = Mode::from_u8(r.u8()?)?;
                let board = r.bool("board")?;
                Response::Welcome {
                    spin_us,
                    default_mode,
                    board,
                    bell: r.u32()?,
                    spare: r.u32()?,
                }
            }
            110 => Response::Bell {
                id: r.u32()?,
                both: r.bool("both")?,
            },
            102 => Response::Ok,
            103 => Response::Proceed {
                token: r.u64()?,
                attachment: r.attachment()?,
            },
            104 => Response::Kernel {
                reason: r.reason()?,
            },
            105 => Response::Expect {
                token: r.u64()?,
                attachment: r.attachment()?,
            },
            109 => Response::ExpectKernel {
                token: r.u64()?,
                reason: r.reason()?,
            },
            106 => Response::Attached(r.attachment()?),
            107 => {
                let json = r.string("json")?;
                let more = r.bool("more")?;
                Response::Stats { json, more }
            }
            108 => {
                let code = r.u32()?;
                let message = r.string("message")?;
                Response::Error { code, message }
            }
            111 => Response::Rejoined {
                words: [r.u64()?, r.u64()?, r.u64()?, r.u64()?],
                closed: r.u64()?,
            },
            t => return Err(DecodeError::Type(t)),
        };
        r.end()?;
        check_fds("response", fds, resp.fd_count())?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Hello { pid: 42 },
            Request::Listen,
            Request::Unlisten,
            Request::Intent {
                dst: "127.0.0.1:80".parse().unwrap(),
                pref: ModePref::Queued,
                bell: 0,
            },
            Request::Intent {
                dst: "[::1]:8080".parse().unwrap(),
                pref: ModePref::Auto,
                bell: 77,
            },
            Request::Claim,
            Request::Attach,
            Request::Release {
                conn_id: 9,
                side: Side::Acceptor,
                park: true,
            },
            Request::Violation { conn_id: 10 },
            Request::Leave {
                conn_id: 11,
                side: Side::Connector,
            },
            Request::Fallback {
                reason: FallbackReason::HelloTimeout,
            },
            Request::Skipped {
                reason: FallbackReason::ShortLived,
                count: 64,
            },
            Request::Bell { id: 77 },
            Request::Stats {
                after: 3,
                limit: 100,
            },
            Request::Link {
                node: 2,
                link: None,
                up: false,
            },
            Request::Link {
                node: 7,
                link: Some(1),
                up: true,
            },
            Request::Forward {
                conn_id: 12,
                side: Side::Acceptor,
                take: true,
            },
            Request::Forward {
                conn_id: 13,
                side: Side::Connector,
                take: false,
            },
            Request::Rejoin {
                words: [1, 2, u64::MAX, 4],
                received: 1 << 40,
            },
            Request::Words {
                words: [0, 1, 2, 3],
            },
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for r in all_requests() {
            let b = r.encode();
            assert_eq!(Request::decode(&b, r.fd_count()).unwrap(), r);
        }
    }

    #[test]
    fn every_response_round_trips() {
        let a = Attachment {
            conn_id: 1,
            mode: Mode::Direct,
            side: Side::Acceptor,
            region_size: 4096,
            geom_a: 2,
            geom_b: 3,
            region: 4,
            reuse: false,
            peer_bell: 0,
            peer_thread_bell: 0,
        };
        let parked = Attachment {
            reuse: true,
            peer_bell: 9,
            ..a
        };
        assert_eq!(parked.fd_count(), 0);
        let with_bell = Attachment { peer_bell: 9, ..a };
        assert_eq!(with_bell.fd_count(), 2);
        let with_thread = Attachment {
            peer_thread_bell: 10,
            ..with_bell
        };
        assert_eq!(with_thread.fd_count(), 3);
        // A thread's doorbell needs the common one beside it, and differs.
        for bad in [
            Attachment {
                peer_thread_bell: 10,
                ..a
            },
            Attachment {
                peer_thread_bell: 9,
                ..with_bell
            },
        ] {
            let f = Response::Attached(bad).encode();
            assert!(Response::decode(&f, bad.fd_count()).is_err(), "{bad:?}");
        }
        assert_eq!(a.fd_count(), 1);
        for r in [
            Response::Attached(parked),
            Response::Attached(with_thread),
            Response::Welcome {
                spin_us: 30,
                default_mode: Mode::Direct,
                board: true,
                bell: 3,
                spare: 4,
            },
            Response::Bell { id: 3, both: false },
            Response::Bell { id: 4, both: true },
            Response::Attached(with_bell),
            Response::Ok,
            Response::Proceed {
                token: 5,
                attachment: a,
            },
            Response::Kernel {
                reason: FallbackReason::Policy,
            },
            Response::Expect {
                token: 6,
                attachment: a,
            },
            Response::ExpectKernel {
                token: 7,
                reason: FallbackReason::Limit,
            },
            Response::Attached(a),
            Response::Stats {
                json: "{}".into(),
                more: true,
            },
            Response::Error {
                code: 22,
                message: "no".into(),
            },
            Response::Rejoined {
                words: [0, 9, 8, 7],
                closed: 12345,
            },
        ] {
            let b = r.encode();
            assert_eq!(Response::decode(&b, r.fd_count()).unwrap(), r);
        }
    }

    #[test]
    fn every_truncation_of_every_request_is_an_error() {
        for r in all_requests() {
            let b = r.encode();
            for cut in 0..b.len() {
                assert!(Request::decode(&b[..cut], r.fd_count()).is_err());
            }
        }
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let mut b = Request::Hello { pid: 1 }.encode();
        b[4] = 7;
        assert!(matches!(
            Request::decode(&b, 0),
            Err(DecodeError::Version { .. })
        ));
        let mut b = Request::Hello { pid: 1 }.encode();
        b[6] = 200;
        assert!(matches!(
            Request::decode(&b, 0),
            Err(DecodeError::Type(200))
        ));
        let mut b = Request::Hello { pid: 1 }.encode();
        b.push(0);
        assert!(Request::decode(&b, 0).is_err());
        let b = Request::Listen.encode();
        assert!(matches!(
            Request::decode(&b, 0),
            Err(DecodeError::Fds { .. })
        ));
        let b = Request::Stats { after: 0, limit: 1 }.encode();
        let mut b2 = b.clone();
        b2[20] = 0;
        b2[21] = 0;
        assert!(Request::decode(&b2, 0).is_err());
    }
}
