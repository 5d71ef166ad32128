//! The peer thread between two nodes on loopback TCP, and against
//! strangers: a wrong key, an unknown node, garbage, silence.

use super::wire::{self, Msg, NONCE};
use super::{spawn, Handle, PeerJson};
use crate::config::PeerConfig;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const KEY: &[u8] = b"a key of the link, 32 bytes long";

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn peer(node: u32, address: SocketAddr, key: &[u8]) -> PeerConfig {
    PeerConfig {
        node,
        address,
        key: key.to_vec(),
        ivshmem: Vec::new(),
        vfio: Vec::new(),
        verbs: Vec::new(),
        verbs_gid_index: 1,
        link_policy: Default::default(),
    }
}

/// Waits until `f` holds for node `node`'s status on `h`.
fn until(h: &Handle, node: u32, what: &str, f: impl Fn(&PeerJson) -> bool) -> PeerJson {
    let t = Instant::now();
    loop {
        let (peers, refused) = h.status();
        let p = peers
            .iter()
            .find(|p| p.node == node)
            .expect("configured")
            .clone();
        if f(&p) {
            return p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "peer {node} never {what}: {p:?}, refused {refused:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Node 2, listening on `l`, whose peer node 1 dials it with `KEY`.
fn node_2(l: TcpListener) -> Handle {
    spawn(
        2,
        vec![peer(1, "127.0.0.1:1".parse().unwrap(), KEY)],
        Some(l),
        None,
    )
    .unwrap()
}

fn refused(h: &Handle, why: &str) -> u64 {
    h.status().1.get(why).copied().unwrap_or(0)
}

#[test]
fn two_nodes_with_the_same_key_come_up_and_stay_up() {
    let (l2, a2) = listener();
    // Node 1 dials node 2, which listens.
    let n1 = spawn(1, vec![peer(2, a2, KEY)], None, None).unwrap();
    let n2 = node_2(l2);
    until(&n1, 2, "came up", |p| p.state == "up");
    until(&n2, 1, "came up", |p| p.state == "up");
    // Pings keep it up past SILENT.
    std::thread::sleep(super::SILENT + Duration::from_millis(500));
    let p = until(&n1, 2, "stayed up", |p| p.state == "up");
    assert_eq!(p.ups, 1, "it never went down: {p:?}");
    assert!(p.heard_ms_ago.is_some_and(|ms| ms < 2000), "{p:?}");
    // Node 2 stops: node 1 sees it down, and up again when it returns.
    drop(n2);
    until(&n1, 2, "went down", |p| p.state != "up");
    let l2 = TcpListener::bind(a2).unwrap();
    let n2 = node_2(l2);
    until(&n1, 2, "came back", |p| p.state == "up" && p.ups == 2);
    assert_eq!(refused(&n1, "bad_proof") + refused(&n2, "bad_proof"), 0);
}

#[test]
fn a_peer_with_another_key_is_refused_both_ways() {
    let (l2, a2) = listener();
    let n1 = spawn(1, vec![peer(2, a2, KEY)], None, None).unwrap();
    let n2 = spawn(
        2,
        vec![peer(
            1,
            "127.0.0.1:1".parse().unwrap(),
            b"another key, 32 bytes, not KEY!!",
        )],
        Some(l2),
        None,
    )
    .unwrap();
    let t = Instant::now();
    while refused(&n1, "bad_proof") == 0 || refused(&n2, "bad_proof") == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{:?} {:?}",
            n1.status(),
            n2.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(n1.status().0[0].state, "up");
    assert_ne!(n2.status().0[0].state, "up");
}

/// A stranger's connection to node 2: reads node 2's Hello, then does
/// `act`; returns what node 2 counted.
/// Writes a Hello from `node` with `nonce` (in protocol `version`).
fn say_hello(s: &mut TcpStream, version: u16, node: u32, nonce: [u8; NONCE]) {
    let m = Msg::Hello {
        version,
        node,
        nonce,
    };
    s.write_all(&wire::encode(&m)).unwrap();
}

fn stranger(act: impl FnOnce(&mut TcpStream, [u8; NONCE])) -> (Handle, TcpStream) {
    let (l2, a2) = listener();
    let n2 = node_2(l2);
    let mut s = TcpStream::connect(a2).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let hello = loop {
        let mut b = [0u8; 256];
        let n = s.read(&mut b).unwrap();
        assert!(n > 0, "node 2 hung up before its Hello");
        buf.extend_from_slice(&b[..n]);
        if let Some(m) = wire::decode(&mut buf).unwrap() {
            break m;
        }
    };
    let Msg::Hello { node: 2, nonce, .. } = hello else {
        panic!("not node 2's Hello: {hello:?}");
    };
    act(&mut s, nonce);
    (n2, s)
}

fn until_refused(h: &Handle, why: &str) {
    let t = Instant::now();
    while refused(h, why) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "not refused {why}: {:?}",
            h.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether node 2 closed `s` (EOF or reset within the 5 s read timeout;
/// still open after it: false).
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn an_unknown_node_garbage_and_a_ping_before_the_handshake_are_refused() {
    let (h, mut s) = stranger(|s, _| {
        say_hello(s, wire::VERSION, 9, [1; NONCE]);
    });
    until_refused(&h, "unknown_node");
    assert!(closed(&mut s));
    let (h, mut s) = stranger(|s, _| s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap());
    until_refused(&h, "malformed");
    assert!(closed(&mut s));
    let (h, mut s) = stranger(|s, _| s.write_all(&wire::encode(&Msg::Ping)).unwrap());
    until_refused(&h, "malformed");
    assert!(closed(&mut s));
    let (h, mut s) = stranger(|s, _| {
        say_hello(s, wire::VERSION + 1, 1, [1; NONCE]);
    });
    until_refused(&h, "version");
    assert!(closed(&mut s));
}

#[test]
fn a_replayed_or_forged_proof_is_refused() {
    // Node 1's identity without its key: a proof over the wrong nonce.
    let (h, mut s) = stranger(|s, nonce2| {
        let mine = [5u8; NONCE];
        say_hello(s, wire::VERSION, 1, mine);
        let mut wrong = nonce2;
        wrong[0] ^= 1;
        let p = wire::prove(KEY, 1, 2, &wrong, &mine);
        s.write_all(&wire::encode(&Msg::Proof(p))).unwrap();
    });
    until_refused(&h, "bad_proof");
    assert!(closed(&mut s));
    assert_ne!(h.status().0[0].state, "up");
    // With the key, the same stranger is node 1.
    let (h, _s) = stranger(|s, nonce2| {
        let mine = [6u8; NONCE];
        say_hello(s, wire::VERSION, 1, mine);
        let p = wire::prove(KEY, 1, 2, &nonce2, &mine);
        s.write_all(&wire::encode(&Msg::Proof(p))).unwrap();
    });
    until(&h, 1, "came up", |p| p.state == "up");
}

#[test]
fn after_the_proofs_an_unsealed_or_replayed_frame_ends_the_connection() {
    for replay in [false, true] {
        let (h, mut s) = stranger(|s, nonce2| {
            let mine = [7u8; NONCE];
            say_hello(s, wire::VERSION, 1, mine);
            let p = wire::prove(KEY, 1, 2, &nonce2, &mine);
            s.write_all(&wire::encode(&Msg::Proof(p))).unwrap();
            let mut sealed = wire::Session::new(KEY, 1, 2, &mine, &nonce2);
            let ping = sealed.seal(&Msg::Ping);
            s.write_all(&ping).unwrap();
            // The sealed Ping was taken (the stranger holds the key): only
            // then the bad frame.
            std::thread::sleep(Duration::from_millis(300));
            if replay {
                s.write_all(&ping).unwrap(); // the same frame again
            } else {
                s.write_all(&wire::encode(&Msg::Ping)).unwrap();
            }
        });
        until_refused(&h, "bad_seal");
        assert_eq!(
            h.status().0[0].ups,
            1,
            "the sealed Ping before it was taken: up once"
        );
        assert!(closed(&mut s));
    }
}

#[test]
fn a_stranger_that_says_nothing_is_dropped_after_the_handshake_time() {
    let (h, mut s) = stranger(|_, _| {});
    let t = Instant::now();
    until_refused(&h, "timeout");
    assert!(t.elapsed() >= super::HANDSHAKE - Duration::from_millis(500));
    assert!(closed(&mut s));
}

#[test]
fn a_hello_without_its_proof_replaces_no_live_connection() {
    let (l2, a2) = listener();
    let n1 = spawn(1, vec![peer(2, a2, KEY)], None, None).unwrap();
    let n2 = node_2(l2);
    until(&n2, 1, "came up", |p| p.state == "up");
    // A stranger says it is node 1, and proves nothing.
    let mut s = TcpStream::connect(a2).unwrap();
    say_hello(&mut s, wire::VERSION, 1, [8; NONCE]);
    std::thread::sleep(Duration::from_millis(500));
    let p = until(&n2, 1, "stayed up", |p| p.state == "up");
    assert_eq!(p.ups, 1, "the live connection was replaced: {p:?}");
    until(&n1, 2, "stayed up", |p| p.state == "up" && p.ups == 1);
    drop(s);
}

#[test]
fn a_connection_from_an_address_no_peer_has_is_refused_before_any_handshake() {
    let (l2, a2) = listener();
    let h = spawn(
        2,
        vec![peer(1, "10.9.9.9:1".parse().unwrap(), KEY)],
        Some(l2),
        None,
    )
    .unwrap();
    let mut s = TcpStream::connect(a2).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    until_refused(&h, "unknown_address");
    assert!(closed(&mut s), "no Hello for a stranger: closed at once");
}

#[test]
fn listeners_are_told_when_up_and_when_they_change_and_forgotten_with_the_peer() {
    let (l2, a2) = listener();
    let n1 = spawn(1, vec![peer(2, a2, KEY)], None, None).unwrap();
    let one: SocketAddr = "10.0.0.2:80".parse().unwrap();
    let two: SocketAddr = "[fd00::2]:81".parse().unwrap();
    let n2 = node_2(l2);
    // Before the connection is up: told when it comes up.
    n2.advertise(vec![one]);
    until(&n1, 2, "heard of one listener", |p| {
        p.listeners == ["10.0.0.2:80"]
    });
    // A change: told (coalesced, at most every 200 ms).
    n2.advertise(vec![one, two]);
    let p = until(&n1, 2, "heard of two", |p| p.listeners_total == 2);
    assert_eq!(p.listeners, ["10.0.0.2:80", "[fd00::2]:81"]);
    // Node 1 tells node 2 too.
    n1.advertise(vec!["10.0.0.1:443".parse().unwrap()]);
    until(&n2, 1, "heard of node 1's", |p| {
        p.listeners == ["10.0.0.1:443"]
    });
    // Node 2 goes: its listeners are forgotten; back, it tells them again.
    drop(n2);
    until(&n1, 2, "forgot them", |p| {
        p.state != "up" && p.listeners_total == 0
    });
    let l2 = TcpListener::bind(a2).unwrap();
    let n2 = node_2(l2);
    n2.advertise(vec![two]);
    until(&n1, 2, "heard again", |p| {
        p.state == "up" && p.listeners == ["[fd00::2]:81"]
    });
    // Many: the statistics list the first few and the count.
    let many: Vec<SocketAddr> = (1..=2000u16)
        .map(|p| SocketAddr::from(([10, 0, 0, 2], p)))
        .collect();
    n2.advertise(many);
    let p = until(&n1, 2, "heard of 2000", |p| p.listeners_total == 2000);
    assert_eq!(p.listeners.len(), super::SHOWN_LISTENERS);
}
