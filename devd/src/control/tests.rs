//! The control plane's unit tests: requests driven through `Devd::handle`
//! with real sockets and a loopback engine.

use super::*;
use ssock_hwbackends::loopback::Loopback;
use std::net::{SocketAddr, TcpListener, TcpStream};

/// A control plane with `policy` (TOML lines of the [policy] table)
/// and one session (id 1) for this process; the short_lived policy
/// off (these tests make many short connections to one listener).
fn devd(policy: &str) -> Devd {
    let off = if policy.contains("short_lived_ms") {
        ""
    } else {
        "short_lived_ms = 0\n"
    };
    let toml = format!("[policy]\n{off}{policy}");
    let cfg = Config::from_toml(&toml, Config::user()).unwrap();
    let counts = Arc::new(EngineCounts::default());
    let engine = engine::spawn(Box::new(Loopback::default()), counts.clone(), None).unwrap();
    let mut d = Devd::new(cfg, engine, "loopback", counts);
    session(&mut d, 1);
    d
}

fn listener(d: &mut Devd) -> TcpListener {
    listener_of(d, 1)
}

/// A listener registered by session `sid`.
fn listener_of(d: &mut Devd, sid: u64) -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let r = d.handle(
        sid,
        Request::Listen,
        vec![l.as_fd().try_clone_to_owned().unwrap()],
    );
    assert_eq!(r.0, Response::Ok);
    l
}

fn socket() -> socket2::Socket {
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap()
}

fn intent(d: &mut Devd, s: &socket2::Socket, dst: SocketAddr) -> Reply {
    let fd = s.as_fd().try_clone_to_owned().unwrap();
    d.handle(
        1,
        Request::Intent {
            dst,
            pref: ModePref::Direct,
            bell: 0,
        },
        vec![fd],
    )
}

fn claim(d: &mut Devd, accepted: &TcpStream) -> Reply {
    let fd = accepted.as_fd().try_clone_to_owned().unwrap();
    d.handle(1, Request::Claim, vec![fd])
}

#[test]
fn an_intent_creates_the_connection_and_its_claim_hands_out_the_other_end() {
    let mut d = devd("");
    let l = listener(&mut d);
    let dst = l.local_addr().unwrap();
    // Two connectors announce themselves to the same listener; only
    // the second connects. The claim must find the second's intent by
    // its socket, not take the first.
    let (s1, s2) = (socket(), socket());
    let (r1, f1) = intent(&mut d, &s1, dst);
    let (r2, f2) = intent(&mut d, &s2, dst);
    let (
        Response::Proceed { token: t1, .. },
        Response::Proceed {
            token: t2,
            attachment,
        },
    ) = (&r1, &r2)
    else {
        panic!("intents refused: {r1:?} {r2:?}");
    };
    assert_ne!(t1, t2);
    assert_eq!(
        (f1.len(), f2.len()),
        (1, 1),
        "a connector's end: its region"
    );
    assert_eq!(attachment.side, Side::Connector);
    s2.connect(&dst.into()).unwrap();
    let (a, _) = l.accept().unwrap();
    let (r, fds) = claim(&mut d, &a);
    match r {
        Response::Expect {
            token,
            attachment: b,
        } => {
            assert_eq!(token, *t2);
            assert_eq!(b.conn_id, attachment.conn_id);
            assert_eq!(b.side, Side::Acceptor);
            // The same region for both ends.
            let ino = |f: &Fd| sys::fstat(f.as_fd()).unwrap().st_ino;
            assert_eq!(ino(&fds[0]), ino(&f2[0]));
        }
        r => panic!("claim: {r:?}"),
    }
    assert_eq!(d.reg.conns.len(), 1);
    // The first intent still waits; a second claim of the same socket
    // finds nothing (plain).
    assert_eq!(d.reg.intents_of.get(&sys::uid()), Some(&1));
    assert_eq!(claim(&mut d, &a).0, Response::Ok);
}

#[test]
fn unclaimed_intents_give_back_what_they_held() {
    let mut d = devd("max_connections_per_user = 2");
    let l = listener(&mut d);
    let dst = l.local_addr().unwrap();
    let s: Vec<_> = (0..3).map(|_| socket()).collect();
    let id = |r: &Reply| match r.0 {
        Response::Proceed { attachment, .. } => attachment.conn_id,
        ref r => panic!("refused: {r:?}"),
    };
    let first = id(&intent(&mut d, &s[0], dst));
    id(&intent(&mut d, &s[1], dst));
    // The cap counts the connectors' ends of unclaimed intents.
    assert_eq!(
        intent(&mut d, &s[2], dst).0,
        Response::Kernel {
            reason: FallbackReason::Limit
        }
    );
    // Its connect failed: the connector releases its end.
    let r = d.handle(
        1,
        Request::Release {
            conn_id: first,
            side: Side::Connector,
            park: false,
        },
        vec![],
    );
    assert_eq!(r.0, Response::Ok);
    id(&intent(&mut d, &s[2], dst));
    // A session that ends gives back all of its intents.
    d.end_session(1);
    assert!(d.reg.intents.is_empty() && d.reg.intents_of.is_empty());
    assert!(d.reg.usage.is_empty(), "usage left: {:?}", d.reg.usage);
}

#[test]
fn a_claim_after_its_connector_let_go_consumes_the_hello_and_stays_plain() {
    let mut d = devd("");
    let l = listener(&mut d);
    let dst = l.local_addr().unwrap();
    let s = socket();
    let Response::Proceed { token, attachment } = intent(&mut d, &s, dst).0 else {
        panic!("intent refused");
    };
    s.connect(&dst.into()).unwrap();
    // The connector wrote its bytes and closed before the acceptor's
    // accept: its Release frees the intent's resources and charge.
    let r = d.handle(
        1,
        Request::Release {
            conn_id: attachment.conn_id,
            side: Side::Connector,
            park: false,
        },
        vec![],
    );
    assert_eq!(r.0, Response::Ok);
    assert!(d.reg.usage.is_empty() && d.reg.intents.is_empty());
    // devd keeps no copy of its socket: the connector's close reaches the
    // acceptor (a copy kept the connection open, and the connector's epoll
    // registrations of it alive, until the intent expired).
    drop(s);
    let (mut a, _) = l.accept().unwrap();
    a.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert_eq!(std::io::Read::read(&mut a, &mut [0u8; 8]).unwrap(), 0);
    // The acceptor is told kernel TCP, with the reason counted.
    assert_eq!(
        claim(&mut d, &a).0,
        Response::ExpectKernel {
            token,
            reason: FallbackReason::ConnectorGone
        }
    );
    assert!(d.reg.gone.is_empty());
    // A later plain connection is plain.
    let p = TcpStream::connect(dst).unwrap();
    let (b, _) = l.accept().unwrap();
    assert_eq!(claim(&mut d, &b).0, Response::Ok);
    drop(p);
}

#[test]
fn closed_connections_wait_for_a_quiet_moment_but_not_without_bound() {
    let mut d = devd("");
    let l = listener(&mut d);
    let dst = l.local_addr().unwrap();
    for n in 0..(MAX_TRASH + 8) {
        let s = socket();
        let Response::Proceed { attachment, .. } = intent(&mut d, &s, dst).0 else {
            panic!("intent refused");
        };
        s.connect(&dst.into()).unwrap();
        let (a, _) = l.accept().unwrap();
        assert!(matches!(claim(&mut d, &a).0, Response::Expect { .. }));
        for side in [Side::Connector, Side::Acceptor] {
            let conn_id = attachment.conn_id;
            d.handle(
                1,
                Request::Release {
                    conn_id,
                    side,
                    park: false,
                },
                vec![],
            );
        }
        // No chore ran (no quiet moment): freed at once past the bound.
        assert_eq!(d.trash.len(), (n + 1).min(MAX_TRASH));
    }
    assert!(d.reg.conns.is_empty() && d.reg.usage.is_empty());
    while d.has_chores() {
        d.chore();
    }
    assert!(d.trash.is_empty() && d.pool.len() == POOL);
}

#[test]
fn an_acceptor_over_its_cap_is_told_to_answer_kernel_and_the_end_is_freed() {
    // One end per user: the connector's intent takes it, so the
    // acceptor (the same user here) is over its cap at the claim.
    let mut d = devd("max_connections_per_user = 1");
    let l = listener(&mut d);
    let dst = l.local_addr().unwrap();
    let s = socket();
    let Response::Proceed { token, .. } = intent(&mut d, &s, dst).0 else {
        panic!("intent refused");
    };
    s.connect(&dst.into()).unwrap();
    let (a, _) = l.accept().unwrap();
    let (r, fds) = claim(&mut d, &a);
    assert_eq!(
        r,
        Response::ExpectKernel {
            token,
            reason: FallbackReason::Limit
        }
    );
    assert!(fds.is_empty());
    assert!(d.reg.conns.is_empty() && d.reg.usage.is_empty());
    assert_eq!(d.totals.fallbacks.get(&FallbackReason::Limit), Some(&1));
}

#[test]
fn a_doorbell_goes_to_its_user_and_to_peers_only_and_spares_on_request() {
    let mut d = devd("");
    session(&mut d, 2);
    let (own1, _) = d.bells.of(1).unwrap();
    // Same user: given.
    let (r, fds) = d.handle(2, Request::Bell { id: own1 }, vec![]);
    let both = false;
    assert_eq!((r, fds.len()), (Response::Bell { id: own1, both }, 1));
    // Another user with no connection to this one: the same answer as
    // for an id that does not exist.
    other_user_session(&mut d, 7);
    let (r, fds) = d.handle(7, Request::Bell { id: own1 }, vec![]);
    assert!(matches!(r, Response::Error { code, .. } if code == libc::ENOENT as u32));
    assert!(fds.is_empty());
    let (r2, _) = d.handle(7, Request::Bell { id: own1 ^ 0x5555 }, vec![]);
    assert!(matches!(r2, Response::Error { code, .. } if code == libc::ENOENT as u32));
    // Id 0: a new spare of the asker's own.
    let (r, fds) = d.handle(2, Request::Bell { id: 0 }, vec![]);
    let Response::Bell { id, both: true } = r else {
        panic!("{r:?}")
    };
    assert_eq!((fds.len(), d.bells.get(id).map(|(s, _)| s)), (2, Some(2)));
    // A session's doorbells go with it.
    d.end_session(2);
    assert!(d.bells.get(id).is_none());
}

#[test]
fn the_acceptor_is_given_the_connecting_threads_doorbell_if_its_session_owns_it() {
    let mut d = devd("");
    session(&mut d, 2);
    session(&mut d, 3);
    let l = listener_of(&mut d, 2);
    // A spare doorbell of session `sid`: its id and owner's end (kept: a
    // ringers' end connects only while the owner's end is open).
    let spare = |d: &mut Devd, sid| match d.handle(sid, Request::Bell { id: 0 }, vec![]) {
        (Response::Bell { id, both: true }, fds) => (id, fds[0].clone()),
        r => panic!("{r:?}"),
    };
    let ((thread1, own1), (thread3, _own3)) = (spare(&mut d, 1), spare(&mut d, 3));
    let common1 = d.bells.of(1).unwrap().0;
    // A thread of session 1 connects naming its own doorbell: the acceptor
    // gets it beside the common one (the fallback), and its ringers' end
    // (the third fd) rings that thread.
    let (_, (a, afds), _s) = connect_naming(&mut d, 1, 2, &l, thread1);
    assert_eq!(
        (a.peer_bell, a.peer_thread_bell, afds.len()),
        (common1, thread1, 3)
    );
    assert!(!sys::drain_bell(own1.as_fd()));
    assert!(sys::ring_bell(afds[2].as_fd()));
    assert!(
        sys::drain_bell(own1.as_fd()),
        "the thread's doorbell was rung"
    );
    // Another session's doorbell, one that does not exist, the common one
    // itself, or none: the common one alone.
    for other in [thread3, thread3 ^ 0x5a5a, common1, 0] {
        let (_, (a, afds), _s) = connect_naming(&mut d, 1, 2, &l, other);
        assert_eq!(
            (a.peer_bell, a.peer_thread_bell, afds.len()),
            (common1, 0, 2),
            "named {other}"
        );
    }
}

/// Adds session `sid` of another user than devd's (nobody's, as root).
fn other_user_session(d: &mut Devd, sid: u64) {
    let (sock, _peer) = sys::SeqPacket::pair().unwrap();
    let uid = if sys::uid() == 0 {
        65534
    } else {
        sys::uid() + 1
    };
    let gid = 0;
    d.add_session(
        sid,
        Session {
            sock,
            pid: 1,
            uid,
            gid,
        },
    );
}

/// Adds session `sid` (another process of this user).
fn session(d: &mut Devd, sid: u64) {
    let (sock, _peer) = sys::SeqPacket::pair().unwrap();
    d.add_session(
        sid,
        Session {
            sock,
            pid: std::process::id() as i32,
            uid: sys::uid(),
            gid: 0,
        },
    );
    // Its Welcome: its doorbells, sent to the peers of its ends.
    let (r, fds) = d.handle(sid, Request::Hello { pid: 1 }, vec![]);
    assert!(matches!(r, Response::Welcome { bell, spare, .. } if bell != 0 && spare != 0));
    assert_eq!(fds.len(), r.fd_count());
    // The process keeps its doorbells' ends (a doorbell whose owner's
    // end is closed has no address to connect a ringer to).
    std::mem::forget(fds);
}

/// A connection from session `from` to `l` (listened on by the
/// acceptor session `by`): its two attachments and their fd counts.
fn connect_as(
    d: &mut Devd,
    from: u64,
    by: u64,
    l: &TcpListener,
) -> ((Attachment, usize), (Attachment, usize), TcpStream) {
    let ((c, cfds), (a, afds), s) = connect_naming(d, from, by, l, 0);
    ((c, cfds.len()), (a, afds.len()), s)
}

/// An end's attachment and the fds that came with it.
type EndFds = (Attachment, Vec<Fd>);

/// `connect_as` with the ends' fds, the Intent naming doorbell `bell` as
/// the connecting thread's own.
fn connect_naming(
    d: &mut Devd,
    from: u64,
    by: u64,
    l: &TcpListener,
    bell: u32,
) -> (EndFds, EndFds, TcpStream) {
    let dst = l.local_addr().unwrap();
    let s = socket();
    let fd = s.as_fd().try_clone_to_owned().unwrap();
    let pref = ModePref::Direct;
    let (r, fds) = d.handle(from, Request::Intent { dst, pref, bell }, vec![fd]);
    let Response::Proceed { attachment: c, .. } = r else {
        panic!("intent: {r:?}");
    };
    s.connect(&dst.into()).unwrap();
    let (a, _) = l.accept().unwrap();
    let fd = a.as_fd().try_clone_to_owned().unwrap();
    let (r, afds) = d.handle(by, Request::Claim, vec![fd]);
    let Response::Expect { attachment: b, .. } = r else {
        panic!("claim: {r:?}");
    };
    ((c, fds), (b, afds), a)
}

#[test]
fn a_hold_ends_the_listeners_pending_intents_and_answers_new_ones_kernel() {
    let mut d = devd("short_lived_ms = 60000\nshort_lived_streak = 1");
    let l = listener(&mut d);
    let dst = l.local_addr().unwrap();
    let s1 = socket();
    let (r_pending, pending) = intent(&mut d, &s1, dst);
    assert!(
        matches!(r_pending, Response::Proceed { .. }),
        "{r_pending:?}"
    );
    // One short connection is a streak here: the hold begins when both
    // its ends are released.
    let ((c, _), (a, _), _s) = connect_as(&mut d, 1, 1, &l);
    release(&mut d, 1, &c, false);
    release(&mut d, 1, &a, false);
    assert_eq!(d.totals.short_lived_periods, 1);
    // The pending intent ended, its connector told with CLAIM = kernel.
    assert!(d.reg.intents.is_empty());
    let (off, kernel) = layout::claim_kernel_bytes();
    let mut word = vec![0u8; kernel.len()];
    sys::pread_exact(pending[0].as_fd(), &mut word, off).unwrap();
    assert_eq!(word, kernel);
    // A connector whose board could not tell is answered Kernel.
    let (r, _) = intent(&mut d, &socket(), dst);
    assert_eq!(
        r,
        Response::Kernel {
            reason: FallbackReason::ShortLived
        }
    );
    assert_eq!(d.totals.fallbacks[&FallbackReason::ShortLived], 2);
    // Nothing stays charged; the ended intent's connection, accepted
    // now, is plain; its connector's Release of it changes nothing.
    assert!(d.reg.usage.is_empty(), "{:?}", d.reg.usage);
    s1.connect(&dst.into()).unwrap();
    let (accepted, _) = l.accept().unwrap();
    assert_eq!(claim(&mut d, &accepted).0, Response::Ok);
    let Response::Proceed { attachment: a1, .. } = r_pending else {
        unreachable!()
    };
    let req = Request::Release {
        conn_id: a1.conn_id,
        side: a1.side,
        park: false,
    };
    assert!(matches!(d.handle(1, req, vec![]).0, Response::Error { .. }));
    assert!(d.reg.usage.is_empty() && d.reg.conns.is_empty());
    // The board says so to every client.
    let fd = d.board.fd().unwrap();
    let map =
        ssock_rings::shm::Mapping::map(fd.as_fd(), ssock_rings::board::BOARD_SIZE, false).unwrap();
    let found = ssock_rings::board::lookup(&map, dst);
    assert!(
        matches!(found, ssock_rings::board::Found::Served { plain_until, .. } if plain_until > sys::monotonic_ns()),
        "{found:?}"
    );
}

#[test]
fn a_streak_of_claims_from_plain_connectors_holds_the_listener_until_an_intent() {
    let mut d = devd("short_lived_ms = 50\nshort_lived_hold_ms = 60000");
    let l = listener(&mut d);
    let dst = l.local_addr().unwrap();
    let plain = |d: &mut Devd| {
        let _c = TcpStream::connect(dst).unwrap();
        let (a, _) = l.accept().unwrap();
        assert_eq!(claim(d, &a).0, Response::Ok);
    };
    for _ in 1..board::PLAIN_PEER_STREAK {
        plain(&mut d);
    }
    // A connector under ssock between them starts the count again.
    let (_, _, _s) = connect_as(&mut d, 1, 1, &l);
    for _ in 1..board::PLAIN_PEER_STREAK {
        plain(&mut d);
    }
    assert_eq!(d.totals.short_lived_periods, 0);
    plain(&mut d);
    assert_eq!(d.totals.short_lived_periods, 1);
    // The board says so, and that the hold is for connectors not under
    // ssock only.
    let fd = d.board.fd().unwrap();
    let map =
        ssock_rings::shm::Mapping::map(fd.as_fd(), ssock_rings::board::BOARD_SIZE, false).unwrap();
    let found = ssock_rings::board::lookup(&map, dst);
    assert!(
        matches!(found, ssock_rings::board::Found::Served { plain_until, peers_only: true } if plain_until > sys::monotonic_ns()),
        "{found:?}"
    );
    // A connector under ssock's Intent ends the hold (the board says so
    // before the answer) and is accelerated.
    let s = socket();
    let (r, _) = intent(&mut d, &s, dst);
    assert!(matches!(r, Response::Proceed { .. }), "{r:?}");
    assert!(
        matches!(ssock_rings::board::lookup(&map, dst), ssock_rings::board::Found::Served { plain_until, peers_only: false } if plain_until <= sys::monotonic_ns()),
        "{:?}",
        ssock_rings::board::lookup(&map, dst)
    );
    s.connect(&dst.into()).unwrap();
    let (a, _) = l.accept().unwrap();
    assert!(matches!(claim(&mut d, &a).0, Response::Expect { .. }));
    // An Intent devd refuses (here its user is not allowed) leaves the
    // hold as it is.
    let mut d = devd("short_lived_ms = 50\nshort_lived_hold_ms = 60000\nallow_uids = [4294967294]");
    let l3 = listener(&mut d);
    let dst = l3.local_addr().unwrap();
    for _ in 0..board::PLAIN_PEER_STREAK {
        let _c = TcpStream::connect(dst).unwrap();
        let (a, _) = l3.accept().unwrap();
        assert_eq!(claim(&mut d, &a).0, Response::Ok);
    }
    assert_eq!(d.totals.short_lived_periods, 1);
    let (r, _) = intent(&mut d, &socket(), dst);
    assert_eq!(
        r,
        Response::Kernel {
            reason: FallbackReason::Policy
        }
    );
    let map = ssock_rings::shm::Mapping::map(
        d.board.fd().unwrap().as_fd(),
        ssock_rings::board::BOARD_SIZE,
        false,
    )
    .unwrap();
    let found = ssock_rings::board::lookup(&map, dst);
    assert!(
        matches!(found, ssock_rings::board::Found::Served { plain_until, peers_only: true } if plain_until > sys::monotonic_ns()),
        "{found:?}"
    );
    // Off, the policy never holds.
    let mut d = devd("short_lived_ms = 0");
    let l2 = listener(&mut d);
    let dst = l2.local_addr().unwrap();
    for _ in 0..2 * board::PLAIN_PEER_STREAK {
        let _c = TcpStream::connect(dst).unwrap();
        let (a, _) = l2.accept().unwrap();
        assert_eq!(claim(&mut d, &a).0, Response::Ok);
    }
    assert_eq!(d.totals.short_lived_periods, 0);
}

fn release(d: &mut Devd, sid: u64, a: &Attachment, park: bool) {
    let req = Request::Release {
        conn_id: a.conn_id,
        side: a.side,
        park,
    };
    assert_eq!(d.handle(sid, req, vec![]).0, Response::Ok);
}

/// A connection from session 1 to `l` (session 2's), closed with
/// both ends asking to keep the region.
fn keep_one(d: &mut Devd, l: &TcpListener) {
    let ((c, _), (a, _), _s) = connect_as(d, 1, 2, l);
    release(d, 1, &c, true);
    release(d, 2, &a, true);
}

#[test]
fn a_region_both_ends_kept_goes_to_the_next_connection_of_the_same_two_sessions_only() {
    let mut d = devd("");
    session(&mut d, 2);
    session(&mut d, 3);
    let l = listener_of(&mut d, 2);
    // 1 connects to 2's listener: a new region, fds for both ends (the
    // acceptor's with the connector's doorbell).
    let ((c, nc), (a, na), _s1) = connect_as(&mut d, 1, 2, &l);
    assert_eq!((nc, na, c.reuse, a.reuse), (1, 2, false, false));
    assert_eq!(a.peer_bell, d.bells.of(1).unwrap().0);
    let memfd = match &d.reg.conns[&c.conn_id].res {
        Res::Direct(r) => r.memfd.clone(),
        Res::Queued(_) => panic!("queued"),
    };
    // The connection is used: ring words, holders and a mark set.
    let dl = DirectLayout::for_size(d.cfg.region_size).unwrap();
    let used = 12345u64.to_le_bytes();
    sys::pwrite_all(memfd.as_fd(), &used, dl.dir(0).head as u64).unwrap();
    sys::pwrite_all(memfd.as_fd(), &used, dl.dir(1).tail as u64).unwrap();
    sys::pwrite_all(memfd.as_fd(), &[1, 0, 0, 0], layout::hdr::HOLDERS as u64).unwrap();
    release(&mut d, 1, &c, true);
    release(&mut d, 2, &a, true);
    assert!(d.reg.conns.is_empty());
    assert_eq!(d.reg.parked.len(), 1);
    // Kept, its memory stays charged (no end).
    let region = d.cfg.region_size;
    assert_eq!(d.reg.usage.get(&sys::uid()), Some(&(0, region)));
    // Another process connecting to the same listener gets a new one.
    let ((c3, n3), (a3, _), _s3) = connect_as(&mut d, 3, 2, &l);
    assert!(!c3.reuse && n3 == 1 && c3.region != c.region);
    release(&mut d, 3, &c3, false);
    release(&mut d, 2, &a3, true);
    assert_eq!(d.reg.parked.len(), 1, "one end did not keep it");
    // 1 to 2 again: the kept region, no fds, its header reset.
    let ((c2, n2), (a2, m2), _s2) = connect_as(&mut d, 1, 2, &l);
    assert_eq!((n2, m2), (0, 0));
    assert!(c2.reuse && a2.reuse && c2.region == c.region && a2.region == c.region);
    // The acceptor still learns which doorbell rings the connector
    // (its ringers' end it kept from the first connection).
    assert_eq!(a2.peer_bell, a.peer_bell);
    assert_ne!(c2.conn_id, c.conn_id);
    let mut page = vec![0u8; layout::HEADER_SIZE];
    sys::pread_exact(memfd.as_fd(), &mut page, 0).unwrap();
    let word = |off: usize| u64::from_le_bytes(page[off..off + 8].try_into().unwrap());
    assert_eq!(word(layout::hdr::CONN_ID), c2.conn_id);
    assert_eq!(word(dl.dir(0).head), 0);
    assert_eq!(word(dl.dir(1).tail), 0);
    assert_eq!(word(layout::hdr::HOLDERS), 0);
    // The acceptor's doorbell is in the reused region's header.
    let at = layout::hov::ACCEPTOR_BELL;
    let bell = u32::from_le_bytes(page[at..at + 4].try_into().unwrap());
    assert_eq!(Some(bell), d.bells.common_id(2));
    assert!(d.reg.parked.is_empty());
    assert_eq!(d.totals.reused, 1);
    // Charged as any connection again: two ends, one region.
    assert_eq!(d.reg.usage.get(&sys::uid()), Some(&(2, region)));
}

#[test]
fn a_kept_region_gives_way_to_a_live_connection_at_the_memory_cap() {
    // Room for a connection and a half (a Claim checks for a whole
    // region more than the connector's half).
    let mut d = devd(&format!("max_memory_per_user = {}", 4 << 20));
    assert_eq!(d.cfg.region_size, 2 << 20);
    session(&mut d, 2);
    session(&mut d, 3);
    let l = listener_of(&mut d, 2);
    keep_one(&mut d, &l);
    assert_eq!(d.reg.parked.len(), 1);
    // Session 3's connection needs that memory: the kept one goes.
    let ((c3, n3), _, _s3) = connect_as(&mut d, 3, 2, &l);
    assert!(!c3.reuse && n3 == 1);
    assert!(d.reg.parked.is_empty());
    assert_eq!(d.reg.usage.get(&sys::uid()), Some(&(2, 2 << 20)));
}

#[test]
fn a_region_another_process_attached_to_is_not_kept_and_kept_ones_end_with_their_session() {
    let mut d = devd("");
    session(&mut d, 2);
    session(&mut d, 3);
    let l = listener_of(&mut d, 2);
    // Session 3 takes the acceptor's end over (fd passing): mapped by
    // a third process, the region is never kept.
    let ((c, _), (a, _), s) = connect_as(&mut d, 1, 2, &l);
    let fd = s.as_fd().try_clone_to_owned().unwrap();
    assert!(matches!(
        d.handle(3, Request::Attach, vec![fd]).0,
        Response::Attached(_)
    ));
    release(&mut d, 1, &c, true);
    release(&mut d, 3, &a, true);
    assert!(d.reg.parked.is_empty() && d.reg.conns.is_empty());
    // Kept, then claimed by another session than the one that kept
    // it: kernel TCP (the region is mapped in the keeper).
    keep_one(&mut d, &l);
    let dst = l.local_addr().unwrap();
    let s = socket();
    let fd = s.as_fd().try_clone_to_owned().unwrap();
    let pref = ModePref::Direct;
    let (r, fds) = d.handle(1, Request::Intent { dst, pref, bell: 0 }, vec![fd]);
    assert!(matches!(r, Response::Proceed { attachment, .. } if attachment.reuse));
    assert!(fds.is_empty());
    s.connect(&dst.into()).unwrap();
    let (acc, _) = l.accept().unwrap();
    let fd = acc.as_fd().try_clone_to_owned().unwrap();
    let (r, _) = d.handle(3, Request::Claim, vec![fd]);
    assert!(
        matches!(
            r,
            Response::ExpectKernel {
                reason: FallbackReason::OtherAcceptor,
                ..
            }
        ),
        "{r:?}"
    );
    assert!(d.reg.conns.is_empty() && d.reg.intents.is_empty());
    // A kept region goes when either session ends.
    keep_one(&mut d, &l);
    assert_eq!(d.reg.parked.len(), 1);
    d.end_session(2);
    assert!(d.reg.parked.is_empty());
}

#[test]
fn an_orphaned_end_goes_once_its_socket_is_closed_everywhere_and_not_before() {
    // Direct and Queued ends alike (a Queued end passed on by a process
    // that then exits must wait for its receiver's Attach).
    for pref in [ModePref::Direct, ModePref::Queued] {
        orphaned_end_goes_once_its_socket_is_closed_everywhere(pref);
    }
}

fn orphaned_end_goes_once_its_socket_is_closed_everywhere(pref: ModePref) {
    let mut d = devd("");
    if d.diag.is_none() {
        eprintln!("SKIP: no sock_diag socket here");
        return;
    }
    session(&mut d, 2);
    let l = listener_of(&mut d, 2);
    let dst = l.local_addr().unwrap();
    let s = socket();
    let fd = s.as_fd().try_clone_to_owned().unwrap();
    let (r, _) = d.handle(1, Request::Intent { dst, pref, bell: 0 }, vec![fd]);
    assert!(matches!(r, Response::Proceed { .. }), "{r:?}");
    s.connect(&dst.into()).unwrap();
    let (a, _) = l.accept().unwrap();
    let fd = a.as_fd().try_clone_to_owned().unwrap();
    let (r, _) = d.handle(2, Request::Claim, vec![fd]);
    assert!(matches!(r, Response::Expect { .. }), "{r:?}");
    let mode = if pref == ModePref::Queued {
        Mode::Queued
    } else {
        Mode::Direct
    };
    assert!(d.reg.conns.values().all(|c| c.mode == mode), "{pref:?}");
    assert_eq!(d.reg.usage.get(&sys::uid()).map(|u| u.0), Some(2));
    // The connector's session ends while its socket lives on (an
    // exec'd image, a process it was passed to): still attachable.
    d.end_session(1);
    assert_eq!(d.reg.orphans.len(), 1);
    look_now(&mut d);
    assert_eq!(d.reg.orphans.len(), 1, "released while its socket is open");
    // Closed everywhere: released at the next look, long before the
    // grace, and its charge with it.
    drop(s);
    look_now(&mut d);
    assert!(d.reg.orphans.is_empty(), "still orphaned after its close");
    assert_eq!(d.reg.usage.get(&sys::uid()).map(|u| u.0), Some(1));
    // The acceptor's side: its peer is gone, its own socket still
    // open (this process): it stays until its own close.
    d.end_session(2);
    assert_eq!(d.reg.orphans.len(), 1);
    drop(a);
    look_now(&mut d);
    assert!(d.reg.orphans.is_empty() && d.reg.conns.is_empty());
    assert!(d.reg.usage.is_empty(), "usage left: {:?}", d.reg.usage);
}

#[test]
fn an_orphaned_end_seen_before_goes_once_its_connection_is_reset_without_time_wait() {
    let mut d = devd("");
    if d.diag.is_none() {
        eprintln!("SKIP: no sock_diag socket here");
        return;
    }
    session(&mut d, 2);
    let l = listener_of(&mut d, 2);
    let dst = l.local_addr().unwrap();
    let s = socket();
    let (r, _) = intent(&mut d, &s, dst);
    assert!(matches!(r, Response::Proceed { .. }), "{r:?}");
    s.connect(&dst.into()).unwrap();
    let (a, _) = l.accept().unwrap();
    let fd = a.as_fd().try_clone_to_owned().unwrap();
    let (r, _) = d.handle(2, Request::Claim, vec![fd]);
    assert!(matches!(r, Response::Expect { .. }), "{r:?}");
    // Both sessions end while both sockets live on: seen held.
    d.end_session(1);
    d.end_session(2);
    look_now(&mut d);
    assert_eq!(
        d.reg.orphans.len(),
        2,
        "released while their sockets are open"
    );
    // Both closed with a reset: no TIME_WAIT socket is left to find on
    // either side, yet both ends go at the next look, not after the grace.
    s.set_linger(Some(std::time::Duration::ZERO)).unwrap();
    socket2::SockRef::from(&a)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop((s, a));
    look_now(&mut d);
    assert!(d.reg.orphans.is_empty(), "still orphaned after the reset");
    assert!(d.reg.conns.is_empty() && d.reg.usage.is_empty());
}

#[test]
fn ends_whose_sockets_a_chore_saw_go_at_once_when_both_vanish_before_their_sessions_end() {
    let mut d = devd("");
    if d.diag.is_none() {
        eprintln!("SKIP: no sock_diag socket here");
        return;
    }
    session(&mut d, 2);
    let l = listener_of(&mut d, 2);
    let dst = l.local_addr().unwrap();
    let s = socket();
    let (r, _) = intent(&mut d, &s, dst);
    assert!(matches!(r, Response::Proceed { .. }), "{r:?}");
    s.connect(&dst.into()).unwrap();
    let (a, _) = l.accept().unwrap();
    let fd = a.as_fd().try_clone_to_owned().unwrap();
    let (r, _) = d.handle(2, Request::Claim, vec![fd]);
    assert!(matches!(r, Response::Expect { .. }), "{r:?}");
    // Idle: the chore looks the new connection's sockets up.
    for _ in 0..16 {
        if !d.has_chores() {
            break;
        }
        d.chore();
    }
    let c = d.reg.conns.values().next().expect("the connection");
    assert_eq!(c.mode, Mode::Direct, "only a Direct end is orphaned");
    assert!(c.ends.iter().all(|e| e.seen), "not seen: {:?}", c.ends);
    // Both processes die at once, their sockets reset (no TIME_WAIT
    // left) before devd hears of either session's end: both ends go at
    // their first look (at the session's end), not after the grace.
    s.set_linger(Some(std::time::Duration::ZERO)).unwrap();
    socket2::SockRef::from(&a)
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop((s, a));
    d.end_session(1);
    d.end_session(2);
    assert!(d.reg.orphans.is_empty(), "still orphaned after the reset");
    assert!(d.reg.conns.is_empty() && d.reg.usage.is_empty());
}

/// Makes every orphaned end due for a look-up, and looks.
fn look_now(d: &mut Devd) {
    for l in d.reg.orphans.values_mut() {
        l.next = Instant::now();
    }
    d.release_orphans();
}

#[test]
fn an_end_left_to_other_holders_lives_until_the_last_one_lets_go() {
    let mut d = devd("");
    if d.diag.is_none() {
        eprintln!("SKIP: no sock_diag socket here");
        return;
    }
    session(&mut d, 2);
    let l = listener_of(&mut d, 2);
    let dst = l.local_addr().unwrap();
    let s = socket();
    let (r, _) = intent(&mut d, &s, dst);
    let Response::Proceed { attachment, .. } = r else {
        panic!("{r:?}")
    };
    s.connect(&dst.into()).unwrap();
    let (a, _) = l.accept().unwrap();
    let fd = a.as_fd().try_clone_to_owned().unwrap();
    let (r, _) = d.handle(2, Request::Claim, vec![fd]);
    assert!(matches!(r, Response::Expect { .. }), "{r:?}");
    // The acceptor forks a child to serve it and closes its copy:
    // Leave. The child (here: a duplicate of the socket) holds it.
    let child = a.try_clone().unwrap();
    drop(a);
    let id = attachment.conn_id;
    let leave = Request::Leave {
        conn_id: id,
        side: Side::Acceptor,
    };
    // Only the session that holds the end may leave it.
    let (r, _) = d.handle(1, leave.clone(), vec![]);
    assert!(matches!(r, Response::Error { .. }), "{r:?}");
    let (r, _) = d.handle(2, leave, vec![]);
    assert!(matches!(r, Response::Ok), "{r:?}");
    for _ in 0..3 {
        look_now(&mut d);
        assert!(
            d.reg.conns.get(&id).is_some_and(|c| !c.ends[1].released),
            "released while a child holds it"
        );
    }
    // The interval grows while it is seen held.
    assert!(d.reg.orphans[&(id, 1)].every > ORPHAN_CHECK);
    // The child exits without closing (the kernel closes it).
    drop(child);
    look_now(&mut d);
    assert!(d.reg.orphans.is_empty(), "still held after the last close");
    assert!(d.reg.conns.get(&id).is_none_or(|c| c.ends[1].released));
    // The same from a session that ends: the connector's end, whose
    // socket lives on, is released at its last close only.
    d.end_session(1);
    look_now(&mut d);
    assert_eq!(d.reg.orphans.len(), 1);
    drop(s);
    look_now(&mut d);
    assert!(d.reg.conns.is_empty() && d.reg.usage.is_empty());
}

#[test]
fn a_listener_stays_registered_while_any_process_holds_it() {
    let mut d = devd("");
    if d.diag.is_none() {
        eprintln!("SKIP: no sock_diag socket here");
        return;
    }
    session(&mut d, 2);
    let l = listener_of(&mut d, 2);
    let dst = l.local_addr().unwrap();
    // The process that listened daemonizes: its child holds the
    // listener (a duplicate here), the parent's session ends.
    let child = l.try_clone().unwrap();
    d.end_session(2);
    let s = socket();
    let (r, _) = intent(&mut d, &s, dst);
    assert!(matches!(r, Response::Proceed { .. }), "{r:?}");
    // The child closes it too (Unlisten from a new session, then the
    // close): gone at the next Intent to its address.
    session(&mut d, 3);
    let fd = child.as_fd().try_clone_to_owned().unwrap();
    let (r, _) = d.handle(3, Request::Unlisten, vec![fd]);
    assert!(matches!(r, Response::Ok), "{r:?}");
    assert_eq!(d.reg.listeners.len(), 1, "dropped while still open");
    drop((l, child));
    let s2 = socket();
    let (r, _) = intent(&mut d, &s2, dst);
    assert!(
        matches!(r, Response::Kernel { .. }),
        "a closed listener still matched: {r:?}"
    );
    assert!(d.reg.listeners.is_empty());
}

#[test]
fn sessions_over_the_per_user_cap_are_refused_and_counted() {
    let mut d = devd("max_sessions_per_user = 2");
    // Session 1 is open (this user's first).
    assert!(d.admit(sys::uid()));
    session(&mut d, 2);
    assert!(!d.admit(sys::uid()));
    assert!(d.admit(sys::uid() + 1), "another user is not held to it");
    assert_eq!(d.totals.sessions_refused, 1);
    d.end_session(2);
    assert!(d.admit(sys::uid()));
}

#[test]
fn kept_regions_are_bounded_per_pair_of_sessions() {
    let mut d = devd("");
    session(&mut d, 2);
    let l = listener_of(&mut d, 2);
    let live: Vec<_> = (0..registry::PARKED_PER_PAIR + 2)
        .map(|_| connect_as(&mut d, 1, 2, &l))
        .collect();
    for ((c, _), (a, _), _) in &live {
        release(&mut d, 1, c, true);
        release(&mut d, 2, a, true);
    }
    assert_eq!(d.reg.parked.len(), registry::PARKED_PER_PAIR);
    // The newest are kept.
    let last = &live[live.len() - 1].0 .0;
    assert!(d.reg.parked.iter().any(|p| p.res.region == last.region));
}

#[test]
fn only_root_or_devds_user_may_take_a_link_down_and_only_a_configured_peers() {
    let mut d = devd("");
    // devd's own user (this test's), a node the config does not list.
    let (r, _) = d.handle(
        1,
        Request::Link {
            node: 2,
            link: None,
            up: false,
        },
        vec![],
    );
    assert!(
        matches!(r, Response::Error { code, .. } if code == libc::ENOENT as u32),
        "{r:?}"
    );
    // Another user: refused before anything is looked at.
    other_user_session(&mut d, 9);
    let (r, _) = d.handle(
        9,
        Request::Link {
            node: 2,
            link: None,
            up: false,
        },
        vec![],
    );
    assert!(
        matches!(r, Response::Error { code, .. } if code == libc::EPERM as u32),
        "{r:?}"
    );
}

#[test]
fn a_forward_request_gets_an_end_only_where_one_was_offered() {
    let mut d = devd("");
    session(&mut d, 2);
    let l = listener_of(&mut d, 2);
    let ((c, _), _, s) = connect_as(&mut d, 1, 2, &l);
    let fd = || s.as_fd().try_clone_to_owned().unwrap();
    let forward = |conn_id, side| Request::Forward {
        conn_id,
        side,
        take: true,
    };
    let enoent =
        |r: &Response| matches!(r, Response::Error { code, .. } if *code == libc::ENOENT as u32);
    // A live local connection: nothing was offered.
    let (r, fds) = d.handle(2, forward(c.conn_id, Side::Acceptor), vec![fd()]);
    assert!(enoent(&r) && fds.is_empty(), "{r:?}");
    // Another session, another end, an unknown connection: the same.
    let (r, _) = d.handle(1, forward(c.conn_id, Side::Acceptor), vec![fd()]);
    assert!(enoent(&r), "{r:?}");
    let (r, _) = d.handle(2, forward(c.conn_id + 1000, Side::Acceptor), vec![fd()]);
    assert!(enoent(&r), "{r:?}");
    // Letting go of an end not offered changes nothing.
    let (r, _) = d.handle(
        2,
        Request::Forward {
            conn_id: c.conn_id,
            side: Side::Acceptor,
            take: false,
        },
        vec![fd()],
    );
    assert!(matches!(r, Response::Ok), "{r:?}");
    // And the connection is as it was.
    assert!(d.reg.conns.contains_key(&c.conn_id));
}

#[test]
fn a_socket_another_process_attaches_before_the_claim_keeps_its_connection_on_kernel_tcp() {
    let mut d = devd("");
    session(&mut d, 3);
    let l = listener(&mut d);
    let dst = l.local_addr().unwrap();
    let s = socket();
    let (r, fds) = intent(&mut d, &s, dst);
    assert!(matches!(r, Response::Proceed { .. }), "{r:?}");
    let claim_word = || {
        let mut w = [0u8; 4];
        sys::pread_exact(fds[0].as_fd(), &mut w, layout::hov::CLAIM as u64).unwrap();
        u32::from_le_bytes(w)
    };
    assert_ne!(claim_word(), layout::CLAIM_KERNEL);
    s.connect(&dst.into()).unwrap();
    // Session 3 (a program the connector handed its socket to) asks
    // before the acceptor claimed: nothing it could use yet, so the
    // connection is decided now, kernel TCP.
    let fd = s.as_fd().try_clone_to_owned().unwrap();
    let (r, _) = d.handle(3, Request::Attach, vec![fd]);
    assert!(
        matches!(r, Response::Error { code, .. } if code == libc::ENOENT as u32),
        "{r:?}"
    );
    assert!(d.reg.intents.is_empty());
    assert!(d.reg.intents_of.is_empty() && d.reg.usage.is_empty());
    assert_eq!(claim_word(), layout::CLAIM_KERNEL);
    // The acceptor's Claim: kernel, counted.
    let (a, _) = l.accept().unwrap();
    let (r, _) = claim(&mut d, &a);
    assert!(
        matches!(
            r,
            Response::ExpectKernel {
                reason: FallbackReason::ConnectorGone,
                ..
            }
        ),
        "{r:?}"
    );
    assert!(d.reg.conns.is_empty());
    // The connector's own session still gets its end again.
    let s = socket();
    let (r, _) = intent(&mut d, &s, dst);
    assert!(matches!(r, Response::Proceed { .. }), "{r:?}");
    let fd = s.as_fd().try_clone_to_owned().unwrap();
    assert!(matches!(
        d.handle(1, Request::Attach, vec![fd]).0,
        Response::Attached(_)
    ));
}
