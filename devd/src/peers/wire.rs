//! What peer devds say to each other over their TCP control connection:
//! frames (u32 little-endian length of what follows, then a type byte and
//! the payload), the handshake that proves both hold the link's key, and
//! the messages after it. Everything a peer sends is checked here before
//! anything acts on it (another host is not trusted).
//!
//! Handshake, both sides at once: each sends Hello (magic, version, its
//! node id, 32 random bytes); on the other's Hello, each sends Proof:
//! HMAC-SHA256 under the key of `"ssock peer proof" | sender node |
//! receiver node | receiver's nonce | sender's nonce`. A side is up once
//! it checked the other's Proof (in constant time) and sent its own.
//! Every frame after a side's Proof is sealed ([`Session`]): its body ends
//! with 16 bytes of HMAC-SHA256, under a key both derive from the link's
//! key and both nonces, over the sender's node, the frame's number in its
//! direction (counted, not sent) and the body; a frame changed, dropped,
//! replayed or reordered on the way does not check.
//!
//! Never here: a socket, a clock, what a message leads to.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// "SSOCKPER".
pub const MAGIC: [u8; 8] = *b"SSOCKPER";
/// The peer protocol's version.
pub const VERSION: u16 = 7;
/// The longest frame body accepted.
pub const MAX_FRAME: usize = 64 * 1024;
/// Bytes of a Hello's nonce.
pub const NONCE: usize = 32;
/// Bytes of a Proof.
pub const PROOF: usize = 32;
/// The shortest key a link may have.
pub const MIN_KEY: usize = 16;

/// A message between peer devds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Who is speaking, and a challenge.
    Hello {
        /// The protocol version.
        version: u16,
        /// The sender's node id.
        node: u32,
        /// The challenge the other side's Proof must cover.
        nonce: [u8; NONCE],
    },
    /// The answer to the other side's Hello.
    Proof([u8; PROOF]),
    /// Still here (sent every `PING_EVERY`).
    Ping,
    /// Every listener the sender's devd has registered now (the whole
    /// set each time it changes, and when the connection comes up).
    Listeners(Vec<std::net::SocketAddr>),
    /// An acceptor on the sender's host claimed a connection that came
    /// from the receiver's host: `from` is its connector's address and
    /// `to` the acceptor's, as the acceptor's socket sees them. The
    /// sender's end already listens on `channel`; the receiver's end uses
    /// the same id.
    Claim {
        /// The connector's address.
        from: std::net::SocketAddr,
        /// The acceptor's address.
        to: std::net::SocketAddr,
        /// The connection's channel on the link, both ends.
        channel: u64,
    },
    /// The answer to a Claim.
    Claimed {
        /// The Claim's channel.
        channel: u64,
        /// What became of it.
        answer: Answer,
    },
    /// The link under the connection on `channel` failed: it goes on over
    /// its kernel TCP socket (docs/protocol.md 8.5). `words` are the
    /// sender's end's hand-over words (`relay::Words`, SWITCH final: a
    /// writer that had not moved never will), and `closed` where the
    /// sender closed the region part of the direction it reads, once it
    /// heard the receiver's words (its writer resends from there).
    Failover {
        /// The connection's channel on the link, both ends.
        channel: u64,
        /// The sender's end's words.
        words: [u64; 4],
        /// Where the direction the sender reads closed, once it did.
        closed: Option<u64>,
    },
    /// The link is back: the connection on channel `old`, which moved to
    /// its kernel socket, may move forward to a new region on the link
    /// (docs/protocol.md 8.6). Sent by the acceptor's devd, whose end
    /// listens on channel `new` already (of its range).
    Forward {
        /// The moved connection's channel.
        old: u64,
        /// The new channel, both ends.
        new: u64,
    },
    /// The answer to a Forward: whether the connector's end is open on
    /// the new channel (its process is offered the new region).
    Forwarded {
        /// The Forward's new channel.
        channel: u64,
        /// Open there.
        ok: bool,
    },
    /// The link under the connection on `channel` failed and another
    /// link to the same peer is up: the connection moves onto that one
    /// with no byte on TCP (docs/protocol.md 8.7). `received` is what the
    /// sender's end was given of the other end's stream when it stopped
    /// (the other end sends again from there), `marked` whether that
    /// included the other end's mark. `link`: the link it moves to, which
    /// the devd that named the channel picks and opens first; from the
    /// other devd, the link it has opened too (None: not yet).
    Migrate {
        /// The connection's channel on the failed link.
        channel: u64,
        /// The link it moves to.
        link: Option<u8>,
        /// Bytes of the other end's stream the sender's end was given.
        received: u64,
        /// Its end mark among them.
        marked: bool,
    },
    /// Link `link`'s setup (a verbs link's queue pair endpoint:
    /// docs/protocol.md 8.9), opaque here, for the receiver's backend; at
    /// most `MAX_SETUP` bytes.
    Setup {
        /// The link.
        link: u8,
        /// The backend's message.
        data: Vec<u8>,
    },
    /// The sender's devd was started again after the one that served an
    /// end of a connection with the receiver died, and that end's process
    /// asks where each direction goes on over the kernel socket
    /// (docs/protocol.md 8.8): the connection whose two ends' addresses
    /// are `sender` (the sender's host's end) and `receiver`; `words` that
    /// end's hand-over words. Answered `Rejoined`, then, for a connection
    /// found, the receiver's Failover on its channel (its part), to which
    /// the sender's Failover with its closing offset follows.
    Rejoin {
        /// The local address of the sender's host's end.
        sender: std::net::SocketAddr,
        /// The local address of the receiver's host's end.
        receiver: std::net::SocketAddr,
        /// The sender's end's words.
        words: [u64; 4],
    },
    /// The answer to a Rejoin: the connection's channel (None: no such
    /// connection here).
    Rejoined {
        /// The Rejoin's sender address.
        sender: std::net::SocketAddr,
        /// The Rejoin's receiver address.
        receiver: std::net::SocketAddr,
        /// The connection's channel, if found.
        channel: Option<u64>,
    },
}

/// The longest link setup message a Setup carries.
pub const MAX_SETUP: usize = 1024;

/// What a Claim found on the connector's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A connector's intent: its end is open on the channel now.
    Matched,
    /// No intent: a connector not under ssock (or one refused there).
    NoIntent,
    /// An intent its connector let go of before the Claim came.
    ConnectorGone,
}

/// Most listeners one Listeners message carries (it fits a frame).
pub const MAX_LISTENERS: usize = 3000;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Longer than `MAX_FRAME` or empty.
    #[error("a frame of {0} bytes")]
    Length(usize),
    /// An unknown type byte.
    #[error("unknown message type {0}")]
    Type(u8),
    /// A known type with the wrong payload size or contents.
    #[error("a malformed {0} message")]
    Malformed(&'static str),
}

const HELLO: u8 = 1;
const PROOF_T: u8 = 2;
const PING: u8 = 3;
const LISTENERS: u8 = 4;
const CLAIM: u8 = 5;
const CLAIMED: u8 = 6;
const FAILOVER: u8 = 7;
const FORWARD: u8 = 8;
const FORWARDED: u8 = 9;
const MIGRATE: u8 = 10;
const REJOIN: u8 = 11;
const REJOINED: u8 = 12;
const SETUP: u8 = 13;

/// Appends address `a`: a family byte (4 or 6), its address bytes and a
/// u16 port.
fn put_addr(body: &mut Vec<u8>, a: &std::net::SocketAddr) {
    match a {
        std::net::SocketAddr::V4(v) => {
            body.push(4);
            body.extend_from_slice(&v.ip().octets());
        }
        std::net::SocketAddr::V6(v) => {
            body.push(6);
            body.extend_from_slice(&v.ip().octets());
        }
    }
    body.extend_from_slice(&a.port().to_le_bytes());
}

/// The address at `p[*at..]` (see `put_addr`), moving `at` past it.
fn get_addr(p: &[u8], at: &mut usize) -> Option<std::net::SocketAddr> {
    let fam = *p.get(*at)?;
    let len = match fam {
        4 => 4,
        6 => 16,
        _ => return None,
    };
    let ip = p.get(*at + 1..*at + 1 + len)?;
    let port = p.get(*at + 1 + len..*at + 3 + len)?;
    let port = u16::from_le_bytes([port[0], port[1]]);
    let ip: std::net::IpAddr = if fam == 4 {
        <[u8; 4]>::try_from(ip).ok()?.into()
    } else {
        <[u8; 16]>::try_from(ip).ok()?.into()
    };
    *at += 3 + len;
    Some(std::net::SocketAddr::new(ip, port))
}

/// The frame that carries `m`.
pub fn encode(m: &Msg) -> Vec<u8> {
    let mut body = Vec::new();
    match m {
        Msg::Hello {
            version,
            node,
            nonce,
        } => {
            body.push(HELLO);
            body.extend_from_slice(&MAGIC);
            body.extend_from_slice(&version.to_le_bytes());
            body.extend_from_slice(&node.to_le_bytes());
            body.extend_from_slice(nonce);
        }
        Msg::Proof(p) => {
            body.push(PROOF_T);
            body.extend_from_slice(p);
        }
        Msg::Ping => body.push(PING),
        Msg::Listeners(l) => {
            body.push(LISTENERS);
            let n = l.len().min(MAX_LISTENERS);
            body.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_le_bytes());
            for a in &l[..n] {
                put_addr(&mut body, a);
            }
        }
        Msg::Claim { from, to, channel } => {
            body.push(CLAIM);
            put_addr(&mut body, from);
            put_addr(&mut body, to);
            body.extend_from_slice(&channel.to_le_bytes());
        }
        Msg::Claimed { channel, answer } => {
            body.push(CLAIMED);
            body.extend_from_slice(&channel.to_le_bytes());
            body.push(match answer {
                Answer::Matched => 1,
                Answer::NoIntent => 0,
                Answer::ConnectorGone => 2,
            });
        }
        Msg::Failover {
            channel,
            words,
            closed,
        } => {
            body.push(FAILOVER);
            body.extend_from_slice(&channel.to_le_bytes());
            for w in words {
                body.extend_from_slice(&w.to_le_bytes());
            }
            body.push(u8::from(closed.is_some()));
            body.extend_from_slice(&closed.unwrap_or(0).to_le_bytes());
        }
        Msg::Forward { old, new } => {
            body.push(FORWARD);
            body.extend_from_slice(&old.to_le_bytes());
            body.extend_from_slice(&new.to_le_bytes());
        }
        Msg::Forwarded { channel, ok } => {
            body.push(FORWARDED);
            body.extend_from_slice(&channel.to_le_bytes());
            body.push(u8::from(*ok));
        }
        Msg::Migrate {
            channel,
            link,
            received,
            marked,
        } => {
            body.push(MIGRATE);
            body.extend_from_slice(&channel.to_le_bytes());
            body.push(link.unwrap_or(u8::MAX));
            body.extend_from_slice(&received.to_le_bytes());
            body.push(u8::from(*marked));
        }
        Msg::Rejoin {
            sender,
            receiver,
            words,
        } => {
            body.push(REJOIN);
            put_addr(&mut body, sender);
            put_addr(&mut body, receiver);
            for w in words {
                body.extend_from_slice(&w.to_le_bytes());
            }
        }
        Msg::Setup { link, data } => {
            body.push(SETUP);
            body.push(*link);
            // (Backends' messages are far shorter; a longer one is cut,
            // and the peer's backend refuses it.)
            let n = data.len().min(MAX_SETUP);
            body.extend_from_slice(&u16::try_from(n).unwrap_or(0).to_le_bytes());
            body.extend_from_slice(&data[..n]);
        }
        Msg::Rejoined {
            sender,
            receiver,
            channel,
        } => {
            body.push(REJOINED);
            put_addr(&mut body, sender);
            put_addr(&mut body, receiver);
            body.push(u8::from(channel.is_some()));
            body.extend_from_slice(&channel.unwrap_or(0).to_le_bytes());
        }
    }
    let mut f = u32::try_from(body.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes()
        .to_vec();
    f.extend_from_slice(&body);
    f
}

/// Takes one frame off the front of `buf` if it holds a whole one:
/// `Ok(None)` while more bytes are needed. A version other than ours is
/// not refused here (the caller says so to the operator).
pub fn decode(buf: &mut Vec<u8>) -> Result<Option<Msg>, WireError> {
    match take(buf)? {
        Some(body) => parse(&body).map(Some),
        None => Ok(None),
    }
}

/// One whole frame's body off the front of `buf`, if there.
pub fn take(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len =
        usize::try_from(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]])).unwrap_or(usize::MAX);
    if len == 0 || len > MAX_FRAME {
        return Err(WireError::Length(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some(buf.drain(..4 + len).skip(4).collect()))
}

/// A frame body's message.
pub fn parse(body: &[u8]) -> Result<Msg, WireError> {
    let (t, p) = (body[0], &body[1..]);
    let m = match t {
        HELLO => {
            if p.len() != 8 + 2 + 4 + NONCE || p[..8] != MAGIC {
                return Err(WireError::Malformed("Hello"));
            }
            let mut nonce = [0u8; NONCE];
            nonce.copy_from_slice(&p[14..]);
            Msg::Hello {
                version: u16::from_le_bytes([p[8], p[9]]),
                node: u32::from_le_bytes([p[10], p[11], p[12], p[13]]),
                nonce,
            }
        }
        PROOF_T => {
            let proof: [u8; PROOF] = p.try_into().map_err(|_| WireError::Malformed("Proof"))?;
            Msg::Proof(proof)
        }
        PING if p.is_empty() => Msg::Ping,
        PING => return Err(WireError::Malformed("Ping")),
        LISTENERS => Msg::Listeners(listeners(p).ok_or(WireError::Malformed("Listeners"))?),
        CLAIM => claim(p).ok_or(WireError::Malformed("Claim"))?,
        CLAIMED => match *p {
            [c0, c1, c2, c3, c4, c5, c6, c7, a @ 0..=2] => Msg::Claimed {
                channel: u64::from_le_bytes([c0, c1, c2, c3, c4, c5, c6, c7]),
                answer: match a {
                    1 => Answer::Matched,
                    2 => Answer::ConnectorGone,
                    _ => Answer::NoIntent,
                },
            },
            _ => return Err(WireError::Malformed("Claimed")),
        },
        FAILOVER => failover(p).ok_or(WireError::Malformed("Failover"))?,
        FORWARD => match <[u8; 16]>::try_from(p) {
            Ok(b) => Msg::Forward {
                old: u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])),
                new: u64::from_le_bytes(b[8..].try_into().unwrap_or([0; 8])),
            },
            Err(_) => return Err(WireError::Malformed("Forward")),
        },
        FORWARDED => match *p {
            [c0, c1, c2, c3, c4, c5, c6, c7, ok @ 0..=1] => Msg::Forwarded {
                channel: u64::from_le_bytes([c0, c1, c2, c3, c4, c5, c6, c7]),
                ok: ok == 1,
            },
            _ => return Err(WireError::Malformed("Forwarded")),
        },
        MIGRATE => migrate(p).ok_or(WireError::Malformed("Migrate"))?,
        REJOIN => rejoin(p).ok_or(WireError::Malformed("Rejoin"))?,
        REJOINED => rejoined(p).ok_or(WireError::Malformed("Rejoined"))?,
        SETUP => setup(p).ok_or(WireError::Malformed("Setup"))?,
        t => return Err(WireError::Type(t)),
    };
    Ok(m)
}

/// A Listeners payload's addresses: a u16 count, then each a family byte
/// (4 or 6), its address bytes and a u16 port; nothing after them.
fn listeners(p: &[u8]) -> Option<Vec<std::net::SocketAddr>> {
    let n = usize::from(u16::from_le_bytes([*p.first()?, *p.get(1)?]));
    if n > MAX_LISTENERS {
        return None;
    }
    let mut at = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(get_addr(p, &mut at)?);
    }
    (at == p.len()).then_some(out)
}

/// A Claim payload: two addresses and the channel; nothing after them.
fn claim(p: &[u8]) -> Option<Msg> {
    let mut at = 0;
    let from = get_addr(p, &mut at)?;
    let to = get_addr(p, &mut at)?;
    let c: [u8; 8] = p.get(at..at + 8)?.try_into().ok()?;
    (at + 8 == p.len()).then_some(Msg::Claim {
        from,
        to,
        channel: u64::from_le_bytes(c),
    })
}

/// A Failover payload: the channel, four words, a flag byte (0 or 1)
/// and the closed offset (0 when the flag is 0); nothing after them.
fn failover(p: &[u8]) -> Option<Msg> {
    if p.len() != 8 * 5 + 1 + 8 {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(p[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]));
    let at = u64::from_le_bytes(p[41..49].try_into().ok()?);
    let closed = match p[40] {
        0 if at == 0 => None,
        1 => Some(at),
        _ => return None,
    };
    Some(Msg::Failover {
        channel: word(0),
        words: [word(1), word(2), word(3), word(4)],
        closed,
    })
}

/// A Migrate payload: the channel, the link (255: none; else below
/// `ssock_hwbackends::MAX_LINKS`), what was received, a flag byte (0 or
/// 1); nothing after them.
fn migrate(p: &[u8]) -> Option<Msg> {
    if p.len() != 8 + 1 + 8 + 1 {
        return None;
    }
    let link = match p[8] {
        u8::MAX => None,
        l if usize::from(l) < ssock_hwbackends::MAX_LINKS => Some(l),
        _ => return None,
    };
    let marked = match p[17] {
        0 => false,
        1 => true,
        _ => return None,
    };
    Some(Msg::Migrate {
        channel: u64::from_le_bytes(p[..8].try_into().ok()?),
        link,
        received: u64::from_le_bytes(p[9..17].try_into().ok()?),
        marked,
    })
}

/// A Setup payload: the link, a u16 length, that many bytes (at most
/// `MAX_SETUP`); nothing after them.
fn setup(p: &[u8]) -> Option<Msg> {
    let link = *p.first()?;
    let n = usize::from(u16::from_le_bytes([*p.get(1)?, *p.get(2)?]));
    if usize::from(link) >= ssock_hwbackends::MAX_LINKS || n > MAX_SETUP || p.len() != 3 + n {
        return None;
    }
    Some(Msg::Setup {
        link,
        data: p[3..].to_vec(),
    })
}

/// A u64 at `p[*at..]`, moving `at` past it.
fn get_u64(p: &[u8], at: &mut usize) -> Option<u64> {
    let b: [u8; 8] = p.get(*at..*at + 8)?.try_into().ok()?;
    *at += 8;
    Some(u64::from_le_bytes(b))
}

/// A Rejoin payload: two addresses, four words; nothing after them.
fn rejoin(p: &[u8]) -> Option<Msg> {
    let mut at = 0;
    let sender = get_addr(p, &mut at)?;
    let receiver = get_addr(p, &mut at)?;
    let mut words = [0u64; 4];
    for w in &mut words {
        *w = get_u64(p, &mut at)?;
    }
    (at == p.len()).then_some(Msg::Rejoin {
        sender,
        receiver,
        words,
    })
}

/// A Rejoined payload: two addresses, a flag byte (0 or 1) and the
/// channel (0 when the flag is 0); nothing after them.
fn rejoined(p: &[u8]) -> Option<Msg> {
    let mut at = 0;
    let sender = get_addr(p, &mut at)?;
    let receiver = get_addr(p, &mut at)?;
    let flag = *p.get(at)?;
    at += 1;
    let ch = get_u64(p, &mut at)?;
    let channel = match flag {
        0 if ch == 0 => None,
        1 => Some(ch),
        _ => return None,
    };
    (at == p.len()).then_some(Msg::Rejoined {
        sender,
        receiver,
        channel,
    })
}

/// Bytes of a sealed frame's tag.
pub const TAG: usize = 16;

/// The sealing of an up connection's frames, both directions.
pub struct Session {
    key: [u8; 32],
    me: u32,
    them: u32,
    sent: u64,
    got: u64,
}

impl Session {
    /// Node `me` (whose Hello carried `mine`) and node `them` (`theirs`)
    /// derive the same key from the link's.
    pub fn new(
        link: &[u8],
        me: u32,
        them: u32,
        mine: &[u8; NONCE],
        theirs: &[u8; NONCE],
    ) -> Session {
        let (lo, hi) = if me < them {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(link).expect("HMAC takes any key length");
        m.update(b"ssock peer session");
        m.update(&me.min(them).to_le_bytes());
        m.update(&me.max(them).to_le_bytes());
        m.update(lo);
        m.update(hi);
        Session {
            key: m.finalize().into_bytes().into(),
            me,
            them,
            sent: 0,
            got: 0,
        }
    }

    fn tag(&self, from: u32, n: u64, body: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("any key length");
        m.update(&from.to_le_bytes());
        m.update(&n.to_le_bytes());
        m.update(body);
        m.finalize().into_bytes().into()
    }

    /// The frame that carries `m`, sealed as this side's next.
    pub fn seal(&mut self, m: &Msg) -> Vec<u8> {
        let mut f = encode(m);
        let tag = self.tag(self.me, self.sent, &f[4..]);
        self.sent += 1;
        f.extend_from_slice(&tag[..TAG]);
        let len = u32::try_from(f.len() - 4).unwrap_or(u32::MAX);
        f[..4].copy_from_slice(&len.to_le_bytes());
        f
    }

    /// The message in `body`, the other side's next sealed frame, if its
    /// tag checks (in constant time).
    pub fn open(&mut self, body: &[u8]) -> Result<Msg, WireError> {
        if body.len() < 1 + TAG {
            return Err(WireError::Malformed("sealed frame"));
        }
        let (inner, tag) = body.split_at(body.len() - TAG);
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("any key length");
        m.update(&self.them.to_le_bytes());
        m.update(&self.got.to_le_bytes());
        m.update(inner);
        m.verify_truncated_left(tag)
            .map_err(|_| WireError::Malformed("sealed frame (its tag)"))?;
        self.got += 1;
        parse(inner)
    }
}

fn mac(key: &[u8], from: u32, to: u32, their: &[u8; NONCE], mine: &[u8; NONCE]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(b"ssock peer proof");
    m.update(&from.to_le_bytes());
    m.update(&to.to_le_bytes());
    m.update(their);
    m.update(mine);
    m
}

/// The Proof node `from` sends node `to`, whose Hello carried `their`
/// nonce, its own Hello having carried `mine`.
pub fn prove(
    key: &[u8],
    from: u32,
    to: u32,
    their: &[u8; NONCE],
    mine: &[u8; NONCE],
) -> [u8; PROOF] {
    mac(key, from, to, their, mine)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `proof` is what node `from` (whose Hello carried `theirs`)
/// owes node `to` (whose Hello carried `mine`); in constant time.
pub fn check(
    key: &[u8],
    from: u32,
    to: u32,
    mine: &[u8; NONCE],
    theirs: &[u8; NONCE],
    proof: &[u8; PROOF],
) -> bool {
    mac(key, from, to, mine, theirs).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_arrive_whole() {
        let hello = Msg::Hello {
            version: VERSION,
            node: 7,
            nonce: [9; NONCE],
        };
        let mut buf = encode(&hello);
        buf.extend(encode(&Msg::Ping));
        buf.extend(encode(&Msg::Proof([3; PROOF])));
        let tail = buf.split_off(5);
        let mut got = buf;
        assert_eq!(decode(&mut got), Ok(None), "a partial frame waits");
        got.extend(tail);
        assert_eq!(decode(&mut got), Ok(Some(hello)));
        assert_eq!(decode(&mut got), Ok(Some(Msg::Ping)));
        assert_eq!(decode(&mut got), Ok(Some(Msg::Proof([3; PROOF]))));
        assert_eq!(decode(&mut got), Ok(None));
    }

    #[test]
    fn garbage_is_refused() {
        let mut b = vec![0, 0, 0, 0];
        assert_eq!(decode(&mut b), Err(WireError::Length(0)));
        let mut b = u32::try_from(MAX_FRAME + 1).unwrap().to_le_bytes().to_vec();
        assert_eq!(decode(&mut b), Err(WireError::Length(MAX_FRAME + 1)));
        let mut b = vec![1, 0, 0, 0, 99];
        assert_eq!(decode(&mut b), Err(WireError::Type(99)));
        let mut b = vec![2, 0, 0, 0, PING, 0];
        assert_eq!(decode(&mut b), Err(WireError::Malformed("Ping")));
        let mut h = encode(&Msg::Hello {
            version: 1,
            node: 1,
            nonce: [0; NONCE],
        });
        h[5] = b'X';
        assert_eq!(decode(&mut h), Err(WireError::Malformed("Hello")));
        let mut p = vec![4, 0, 0, 0, PROOF_T, 1, 2, 3];
        assert_eq!(decode(&mut p), Err(WireError::Malformed("Proof")));
    }

    #[test]
    fn sealed_frames_open_only_in_order_unchanged_and_from_the_other_side() {
        let (a, b) = ([1u8; NONCE], [2u8; NONCE]);
        let key = b"0123456789abcdef";
        let mut n1 = Session::new(key, 1, 2, &a, &b);
        let mut n2 = Session::new(key, 2, 1, &b, &a);
        let body = |f: Vec<u8>| {
            let mut f = f;
            take(&mut f).unwrap().unwrap()
        };
        let f1 = body(n1.seal(&Msg::Ping));
        let f2 = body(n1.seal(&Msg::Ping));
        assert_eq!(n2.open(&f1), Ok(Msg::Ping));
        assert!(n2.open(&f1).is_err(), "a replay");
        assert_eq!(n2.open(&f2), Ok(Msg::Ping));
        let f3 = body(n1.seal(&Msg::Ping));
        let mut bad = f3.clone();
        bad[0] ^= 1;
        assert!(n2.open(&bad).is_err(), "a changed frame");
        // A frame node 2 sealed does not pass as node 1's.
        let mut n2b = Session::new(key, 2, 1, &b, &a);
        let own = body(n2b.seal(&Msg::Ping));
        let mut n2c = Session::new(key, 2, 1, &b, &a);
        assert!(n2c.open(&own).is_err(), "reflected back");
        assert!(n2.open(&f3).is_ok());
        // Frame 0 of a fresh session opens only under the same key and
        // nonces.
        let first = body(Session::new(key, 1, 2, &a, &b).seal(&Msg::Ping));
        assert!(Session::new(key, 2, 1, &b, &a).open(&first).is_ok());
        let other_key = b"0123456789abcdeX";
        assert!(Session::new(other_key, 2, 1, &b, &a).open(&first).is_err());
        assert!(Session::new(key, 2, 1, &[3u8; NONCE], &a)
            .open(&first)
            .is_err());
        assert!(
            Session::new(key, 2, 1, &a, &b).open(&first).is_err(),
            "nonces swapped"
        );
        assert!(
            n2.open(&body(encode(&Msg::Ping))).is_err(),
            "an unsealed Ping"
        );
    }

    #[test]
    fn listeners_round_trip_and_bad_lists_are_refused() {
        let l = vec![
            "0.0.0.0:80".parse().unwrap(),
            "[::1]:6379".parse().unwrap(),
            "10.77.3.2:5432".parse().unwrap(),
        ];
        let mut f = encode(&Msg::Listeners(l.clone()));
        assert_eq!(decode(&mut f), Ok(Some(Msg::Listeners(l))));
        for m in [
            Msg::Claim {
                from: "10.0.0.1:40000".parse().unwrap(),
                to: "[fd00::2]:6379".parse().unwrap(),
                channel: 1 << 63 | 77,
            },
            Msg::Claimed {
                channel: 5,
                answer: Answer::Matched,
            },
            Msg::Claimed {
                channel: 6,
                answer: Answer::NoIntent,
            },
            Msg::Claimed {
                channel: 7,
                answer: Answer::ConnectorGone,
            },
            Msg::Failover {
                channel: 1 << 63 | 9,
                words: [1, 17, 0, 4096],
                closed: None,
            },
            Msg::Failover {
                channel: 3,
                words: [0, u64::MAX, 5, 0],
                closed: Some(123_456),
            },
            Msg::Forward {
                old: 1 << 63 | 9,
                new: 1 << 63 | 10,
            },
            Msg::Forwarded {
                channel: 1 << 63 | 10,
                ok: true,
            },
            Msg::Forwarded {
                channel: 4,
                ok: false,
            },
            Msg::Migrate {
                channel: 1 << 63 | 11,
                link: Some(1),
                received: 1 << 40,
                marked: false,
            },
            Msg::Migrate {
                channel: 12,
                link: None,
                received: 0,
                marked: true,
            },
            Msg::Rejoin {
                sender: "10.0.0.2:6379".parse().unwrap(),
                receiver: "[fd00::1]:41000".parse().unwrap(),
                words: [1, 2, 3, u64::MAX],
            },
            Msg::Rejoined {
                sender: "10.0.0.2:6379".parse().unwrap(),
                receiver: "10.0.0.1:41000".parse().unwrap(),
                channel: Some(1 << 63 | 5),
            },
            Msg::Rejoined {
                sender: "10.0.0.2:6379".parse().unwrap(),
                receiver: "10.0.0.1:41000".parse().unwrap(),
                channel: None,
            },
            Msg::Setup {
                link: 2,
                data: vec![1, 2, 3],
            },
            Msg::Setup {
                link: 0,
                data: vec![7; MAX_SETUP],
            },
        ] {
            let mut f = encode(&m);
            assert_eq!(decode(&mut f), Ok(Some(m.clone())));
            // Cut short or with a byte too many, it is malformed.
            let mut short = encode(&m);
            short.pop();
            short[0] -= 1;
            assert!(matches!(decode(&mut short), Err(WireError::Malformed(_))));
            let mut long = encode(&m);
            long.push(0);
            long[0] += 1;
            assert!(matches!(decode(&mut long), Err(WireError::Malformed(_))));
        }
        let mut bad = encode(&Msg::Claimed {
            channel: 1,
            answer: Answer::Matched,
        });
        *bad.last_mut().unwrap() = 3;
        assert!(matches!(decode(&mut bad), Err(WireError::Malformed(_))));
        // A Migrate names a link below 8 (or none) and a flag of 0 or 1.
        let m = |link, flag| {
            let mut f = encode(&Msg::Migrate {
                channel: 1,
                link: Some(0),
                received: 2,
                marked: false,
            });
            let n = f.len();
            f[4 + 1 + 8] = link;
            f[n - 1] = flag;
            decode(&mut f)
        };
        assert!(m(7, 1).is_ok() && m(255, 0).is_ok());
        assert!(matches!(m(8, 0), Err(WireError::Malformed(_))));
        assert!(matches!(m(0, 2), Err(WireError::Malformed(_))));
        // A Failover's flag byte is 0 or 1, and 0 comes with offset 0.
        let good = encode(&Msg::Failover {
            channel: 1,
            words: [0; 4],
            closed: None,
        });
        let mut two = good.clone();
        two[4 + 1 + 40] = 2;
        assert!(matches!(decode(&mut two), Err(WireError::Malformed(_))));
        let mut stray = good;
        stray[4 + 1 + 41] = 1;
        assert!(matches!(decode(&mut stray), Err(WireError::Malformed(_))));
        // A Forwarded's flag byte is 0 or 1.
        let mut f = encode(&Msg::Forwarded {
            channel: 1,
            ok: true,
        });
        *f.last_mut().unwrap() = 2;
        assert!(matches!(decode(&mut f), Err(WireError::Malformed(_))));
        let mut f = encode(&Msg::Listeners(vec![]));
        assert_eq!(decode(&mut f), Ok(Some(Msg::Listeners(vec![]))));
        for bad in [
            vec![LISTENERS, 1, 0],
            vec![LISTENERS, 1, 0, 5, 1, 2, 3, 4, 0, 80],
            vec![LISTENERS, 0, 0, 9],
            vec![LISTENERS, 0xff, 0xff],
        ] {
            let mut f = u32::try_from(bad.len()).unwrap().to_le_bytes().to_vec();
            f.extend(bad);
            assert_eq!(decode(&mut f), Err(WireError::Malformed("Listeners")));
        }
    }

    #[test]
    fn a_proof_checks_only_with_the_same_key_nodes_and_nonces() {
        let (a, b) = ([1u8; NONCE], [2u8; NONCE]);
        let key = b"0123456789abcdef";
        // Node 1 answers node 2's Hello (nonce b); its own Hello had a.
        let p = prove(key, 1, 2, &b, &a);
        assert!(check(key, 1, 2, &b, &a, &p));
        assert!(!check(b"0123456789abcdeX", 1, 2, &b, &a, &p), "another key");
        assert!(!check(key, 3, 2, &b, &a, &p), "another sender");
        assert!(!check(key, 1, 2, &a, &b, &p), "nonces swapped: a replay");
        let mut q = p;
        q[0] ^= 1;
        assert!(!check(key, 1, 2, &b, &a, &q));
    }
}
