//! The control thread's event loop: accepts sessions on the control socket
//! and serves their requests, all from one epoll set (sessions are
//! nonblocking; a client that does not read its replies is dropped).

use super::{Devd, Reply, Session};
use crate::sys as dsys;
use ssock_rings::codec::{Request, Response, MAX_FDS, MAX_FRAME};
use ssock_rings::sys::SeqPacket;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const LISTENER: u64 = 0;
const SIGNALS: u64 = 1;
const FIRST_SESSION: u64 = 2;

/// Serves the control socket until SIGTERM/SIGINT/SIGHUP.
pub fn serve(
    devd: &mut Devd,
    listener: &SeqPacket,
    signals: &OwnedFd,
    sandbox: Option<crate::sandbox::Mode>,
) -> io::Result<()> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, LISTENER),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        signals.as_raw_fd(),
        EpollEvent::new(EventSet::IN, SIGNALS),
    )?;
    // Readiness first: sd_notify needs socket/sendto, which the control
    // filter (rightly) does not allow.
    dsys::sd_notify_ready();
    if let Some(mode) = sandbox {
        crate::sandbox::apply(crate::sandbox::ThreadKind::Control, mode)
            .map_err(io::Error::other)?;
    }
    let mut next = FIRST_SESSION;
    let mut events = vec![EpollEvent::default(); 64];
    let mut buf = vec![0u8; MAX_FRAME];
    let mut last_expiry = std::time::Instant::now();
    let mut claims: Vec<Held> = Vec::new();
    loop {
        // Chores (freeing closed connections, refilling the pool) wait
        // for a moment when no request does. Orphaned ends are released on
        // time: wake every 500 ms while any waits.
        let timeout = if devd.has_chores() {
            0
        } else if devd.has_orphans() {
            500
        } else {
            5000
        };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 && devd.has_chores() {
            devd.chore();
            continue;
        }
        if !devd.engine_alive() {
            return Err(io::Error::other("the engine thread died"));
        }
        devd.release_orphans();
        if last_expiry.elapsed() >= std::time::Duration::from_secs(5) {
            devd.expire();
            last_expiry = std::time::Instant::now();
        }
        for ev in &events[..n] {
            match ev.data() {
                LISTENER => loop {
                    match listener.accept() {
                        Ok(sock) => {
                            let Ok((pid, uid, gid)) = sock.peer_cred() else {
                                continue;
                            };
                            let sid = next;
                            next += 1;
                            let e = EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, sid);
                            if epoll
                                .ctl(ControlOperation::Add, sock.as_raw_fd(), e)
                                .is_ok()
                            {
                                log::debug!("session {sid}: pid {pid} uid {uid}");
                                devd.add_session(
                                    sid,
                                    Session {
                                        sock,
                                        pid,
                                        uid,
                                        gid,
                                    },
                                );
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // EMFILE and friends: log, let the backlog wait.
                            log::warn!("accepting a control session failed: {e}");
                            break;
                        }
                    }
                },
                SIGNALS => {
                    if let Some(sig) = dsys::read_signal(signals.as_raw_fd()) {
                        log::info!("signal {sig}: shutting down");
                        return Ok(());
                    }
                }
                sid => serve_session(devd, &epoll, sid, &mut buf, &mut claims, 64),
            }
        }
        if !claims.is_empty() {
            answer_claims(devd, &epoll, &mut buf, &mut claims)?;
        }
    }
}

/// Serves session `sid` (at most `max` messages); ends it if it is gone.
fn serve_session(
    devd: &mut Devd,
    epoll: &Epoll,
    sid: u64,
    buf: &mut [u8],
    claims: &mut Vec<Held>,
    max: usize,
) {
    if !serve_one(devd, sid, buf, claims, max) {
        end_session(devd, epoll, sid);
    }
}

/// Drops session `sid` (its socket leaves the epoll set first).
fn end_session(devd: &mut Devd, epoll: &Epoll, sid: u64) {
    if let Some(s) = devd.session_sock(sid) {
        let _ = epoll.ctl(
            ControlOperation::Delete,
            s.as_raw_fd(),
            EpollEvent::default(),
        );
    }
    devd.end_session(sid);
    log::debug!("session {sid} ended");
}

/// A Claim read but not answered yet: (session, the request, its fds).
type Held = (u64, Request, Vec<OwnedFd>);

/// Answers the Claims read in this round, after reading every message
/// that was waiting in any session when they were read. A connector sends
/// its Intent before it connects (and may connect before devd has read
/// it), so an Intent that precedes a Claim causally is in its session's
/// queue by the time the Claim is read: one pass over all readable
/// sessions handles it, and the Claim then finds its intent.
fn answer_claims(
    devd: &mut Devd,
    epoll: &Epoll,
    buf: &mut [u8],
    claims: &mut Vec<Held>,
) -> io::Result<()> {
    let mut events = vec![EpollEvent::default(); devd.session_count() + 2];
    let n = loop {
        match epoll.wait(0, &mut events) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    for ev in &events[..n] {
        let sid = ev.data();
        if sid >= FIRST_SESSION {
            // The socket buffer holds a few hundred messages at most.
            serve_session(devd, epoll, sid, buf, claims, DRAIN_MAX);
        }
    }
    for (sid, req, fds) in std::mem::take(claims) {
        // The session may have ended meanwhile (then nobody waits).
        if devd.session_sock(sid).is_none() {
            continue;
        }
        let sent = match answer(devd, sid, req, fds) {
            Ok(Some(r)) => reply(devd, sid, &r.0, &r.1),
            Ok(None) => true,
            Err(()) => false,
        };
        if !sent {
            end_session(devd, epoll, sid);
        }
    }
    Ok(())
}

/// Messages read from one session when draining before Claims are
/// answered: more than its socket buffer can hold.
const DRAIN_MAX: usize = 4096;

/// Reads and answers the messages waiting on session `sid` (at most
/// `max`); Claims are held in `claims`, answered by [`answer_claims`].
/// false ends the session.
fn serve_one(
    devd: &mut Devd,
    sid: u64,
    buf: &mut [u8],
    claims: &mut Vec<Held>,
    max: usize,
) -> bool {
    for _ in 0..max {
        let Some(sock) = devd.session_sock(sid) else {
            return false;
        };
        let (n, fds) = match sock.recv(buf, MAX_FDS) {
            Ok((0, _)) => return false,
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                devd.bad_message();
                let r = Response::Error {
                    code: 22,
                    message: format!("control message refused: {e}"),
                };
                if !reply(devd, sid, &r, &[]) {
                    return false;
                }
                continue;
            }
            Err(_) => return false,
        };
        let resp = match Request::decode(&buf[..n], fds.len()) {
            // A bug in one request's handling must not take devd down:
            // the session gets an error and is dropped, others go on.
            Ok(req @ Request::Claim) => {
                claims.push((sid, req, fds));
                continue;
            }
            Ok(req) => match answer(devd, sid, req, fds) {
                // Release is not answered (its failure is logged by handle).
                Ok(None) => continue,
                Ok(Some(r)) => r,
                Err(()) => return false,
            },
            Err(e) => {
                devd.bad_message();
                log::warn!("session {sid}: malformed control message: {e}");
                (
                    Response::Error {
                        code: 22,
                        message: format!("control message refused: {e}"),
                    },
                    vec![],
                )
            }
        };
        if !reply(devd, sid, &resp.0, &resp.1) {
            return false;
        }
    }
    true
}

/// Handles one request: Ok(None) when it gets no reply, Err when its
/// handling panicked (a bug in one request's handling must not take devd
/// down: the session is dropped, others go on).
fn answer(devd: &mut Devd, sid: u64, req: Request, fds: Vec<OwnedFd>) -> Result<Option<Reply>, ()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let wanted = req.expects_reply();
        let r = devd.handle(sid, req, fds);
        wanted.then_some(r)
    }))
    .map_err(|_| log::error!("session {sid}: request handling panicked; dropping the session"))
}

fn reply(devd: &Devd, sid: u64, r: &Response, fds: &[std::sync::Arc<OwnedFd>]) -> bool {
    let Some(sock) = devd.session_sock(sid) else {
        return false;
    };
    let b: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    match sock.send(&r.encode(), &b) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("session {sid}: reply failed, dropping it: {e}");
            false
        }
    }
}
