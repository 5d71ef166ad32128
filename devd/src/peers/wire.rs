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
//!
//! Never here: a socket, a clock, what a message leads to.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// "SSOCKPER".
pub const MAGIC: [u8; 8] = *b"SSOCKPER";
/// The peer protocol's version.
pub const VERSION: u16 = 1;
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
}

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
    let body: Vec<u8> = buf.drain(..4 + len).skip(4).collect();
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
        t => return Err(WireError::Type(t)),
    };
    Ok(Some(m))
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
