//! A Queued end whose other end is on another host, when its devd dies
//! (docs/protocol.md 8.8). What the dead devd's engine knew is gone; what
//! this end needs to go on over its kernel socket is not: its reader knows
//! what it was given (the direction it reads closes there), its writer
//! still holds every TX buffer the other host did not acknowledge, and the
//! other host's devd knows the rest. So the end waits, for a bounded time,
//! for a devd started again at the same socket, and asks it (`Rejoin`,
//! with its socket) to agree with the other host's devd where each
//! direction goes on, as the two devds agree after a link failure (8.5).
//! Once agreed, both directions of its page are closed and the hand-over
//! moves it to the kernel socket as after a link failure; the session
//! that asked then relays its hand-over words both ways (the writers'
//! END) until the end is closed.
//!
//! Never here: a wait without a bound (`REJOIN_FOR`, then the end resets
//! as before), a call that blocks on devd or the other host (requests go
//! out and answers are read without waiting; a sleeper wakes on them), a
//! value from the other host used unchecked (the page logic of
//! `ssock_rings::relay`), or a rejoin of an end several processes hold
//! (each has only its own view: it resets).

use super::{Queued, SHARED_CALLS};
use crate::transport::Transport;
use ssock_rings::codec::{Request, Response};
use ssock_rings::layout;
use ssock_rings::relay;
use ssock_rings::sys::SeqPacket;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long an end waits for a devd started again and the other host's
/// answer before it resets.
pub const REJOIN_FOR: Duration = Duration::from_secs(8);
/// How often it asks meanwhile.
const TRY_EVERY: Duration = Duration::from_millis(50);
/// devd's refusal that says: ask again (the other host's devd is not
/// connected to it yet).
const EAGAIN: u32 = 11;

/// An end waiting for a devd started again.
#[derive(Debug)]
pub(super) struct Rejoin {
    since: Instant,
    next_try: Instant,
    /// devd's socket, where the dead one was.
    path: PathBuf,
    /// What this end's reader was given (the direction it reads is
    /// closed there).
    received: u64,
    /// A connection to the new devd (no Hello: none is needed), once one
    /// took it; nonblocking.
    chan: Option<SeqPacket>,
    /// Its Rejoin is out, the answer not read yet.
    asked: bool,
}

impl Rejoin {
    /// The fd an answer makes readable (-1: none awaited).
    pub(super) fn fd(&self) -> RawFd {
        match &self.chan {
            Some(c) if self.asked => c.as_raw_fd(),
            _ => -1,
        }
    }
}

/// The next message devd sent on `chan`, without waiting: Ok(None) when
/// none is there, Err when the connection ended or the message is bad.
fn next_message(chan: &SeqPacket) -> Result<Option<Response>, ()> {
    let mut buf = [0u8; 1024];
    match chan.recv_flags(&mut buf, 1, libc::MSG_DONTWAIT) {
        Ok((0, _)) => Err(()),
        Ok((n, fds)) => Response::decode(&buf[..n], fds.len())
            .map(Some)
            .map_err(|_| ()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(_) => Err(()),
    }
}

impl Queued {
    /// devd went away under this remote end: it stops where it is (a
    /// writer that had not moved never will; the direction it reads
    /// closes at what it was given) and waits for a devd started again.
    /// false: it cannot (it resets).
    pub(super) fn start_rejoin(&mut self) -> bool {
        if self.rejoin.is_some() {
            return true;
        }
        let Some(path) = self.session.as_ref().map(|s| s.path().to_path_buf()) else {
            return false;
        };
        let side = self.side as usize;
        let Ok(more) = self.delivered() else {
            return false;
        };
        relay::start_page(&self.hov, side);
        let (Ok(received) | Err(received)) = layout::close_taken(&self.hov, 1 - side, more);
        self.session = None;
        // Sleeps are cut short meanwhile, so that the end asks again.
        SHARED_CALLS.insert(self.call.as_raw_fd());
        let now = Instant::now();
        self.rejoin = Some(Rejoin {
            since: now,
            next_try: now,
            path,
            received,
            chan: None,
            asked: false,
        });
        log::warn!(
            "connection {}: devd is gone and the other end is on another host; waiting up to {} s for devd to be started again",
            self.conn_id,
            REJOIN_FOR.as_secs()
        );
        true
    }

    /// Reads the answer to its Rejoin if one came, and asks (again) when
    /// due (at most every `TRY_EVERY`); gives up after `REJOIN_FOR`.
    /// Never waits. `tcp`: the end's kernel socket, which names the
    /// connection.
    pub(super) fn rejoin_step(&mut self, tcp: BorrowedFd<'_>) {
        // (An answer that came is taken, even one read late.)
        if let Some(answer) = self.rejoin_answer() {
            return self.rejoin_answered(answer);
        }
        let Some(r) = self.rejoin.as_ref() else {
            return;
        };
        if r.since.elapsed() >= REJOIN_FOR {
            log::warn!(
                "connection {}: no devd agreed where it goes on within {} s; resetting it",
                self.conn_id,
                REJOIN_FOR.as_secs()
            );
            return self.rejoin_over(false);
        }
        if self.holders() > 1 {
            // (A child it forked holds it now: each has its own view.)
            log::warn!(
                "connection {}: shared while it waits for devd; resetting it",
                self.conn_id
            );
            return self.rejoin_over(false);
        }
        let Some(r) = self.rejoin.as_mut() else {
            return;
        };
        let now = Instant::now();
        if r.asked || now < r.next_try {
            return;
        }
        r.next_try = now + TRY_EVERY;
        if r.chan.is_none() {
            // (Not there yet, or its backlog full: the next look tries
            // again. Kept off fds 0-2, as every fd ssock holds.)
            r.chan = SeqPacket::connect_nonblocking(&r.path)
                .map(SeqPacket::into_high)
                .ok();
        }
        let words = relay::ours(&self.hov, self.side as usize);
        let req = Request::Rejoin {
            words,
            received: r.received,
        };
        if let Some(c) = &r.chan {
            match c.send(&req.encode(), &[tcp]) {
                Ok(()) => r.asked = true,
                Err(_) => r.chan = None,
            }
        }
    }

    /// The answer to this end's Rejoin, if one came; a connection that
    /// ended is dropped (the next try makes another).
    fn rejoin_answer(&mut self) -> Option<Response> {
        let r = self.rejoin.as_mut()?;
        let c = r.chan.as_ref().filter(|_| r.asked)?;
        match next_message(c) {
            Ok(a) => a,
            Err(()) => {
                r.chan = None;
                r.asked = false;
                None
            }
        }
    }

    fn rejoin_answered(&mut self, answer: Response) {
        let side = self.side as usize;
        match answer {
            Response::Rejoined { words, closed } => {
                let posted = self.posted();
                let Some(r) = self.rejoin.as_mut() else {
                    return;
                };
                let mut heard = true;
                let counts = (posted, r.received);
                let agreed =
                    relay::agree_page(&self.hov, side, counts, &mut heard, &words, Some(closed));
                match agreed {
                    Ok(()) => {
                        log::info!(
                            "connection {}: devd was started again and the two hosts agreed where it goes on",
                            self.conn_id
                        );
                        self.relay = r.chan.take();
                        // The other host has this end's words; now where
                        // the direction this end reads closed.
                        self.relay_words();
                        self.rejoin_over(true);
                    }
                    Err(e) => {
                        log::warn!(
                            "connection {}: the other host's part: {e}; resetting it",
                            self.conn_id
                        );
                        self.rejoin_over(false);
                    }
                }
            }
            Response::Error { code: EAGAIN, .. } => {
                if let Some(r) = self.rejoin.as_mut() {
                    r.asked = false;
                }
            }
            Response::Error { message, .. } => {
                log::warn!("connection {}: {message}; resetting it", self.conn_id);
                self.rejoin_over(false);
            }
            _ => self.rejoin_over(false),
        }
    }

    /// The wait is over: agreed (the hand-over moves the end to its
    /// kernel socket), or not (it resets). Sleepers look again.
    fn rejoin_over(&mut self, agreed: bool) {
        self.rejoin = None;
        if !agreed {
            self.broken = true;
        }
        if self.holders() <= 1 {
            SHARED_CALLS.remove(self.call.as_raw_fd());
        }
        let _ = self.call.notify();
    }

    /// Whether the end waits for a devd started again.
    pub(super) fn rejoining(&self) -> bool {
        self.rejoin.is_some()
    }

    /// A rejoined end's words changed (or it just rejoined): to the other
    /// host, through the connection that rejoined it.
    pub(super) fn relay_words(&self) {
        if let Some(c) = &self.relay {
            let words = relay::ours(&self.hov, self.side as usize);
            let _ = c.send(&Request::Words { words }.encode(), &[]);
        }
    }

    /// The other host's words that came on a rejoined end's relay,
    /// applied to its page (checked as any relayed words); its fd, which
    /// news makes readable.
    pub(super) fn relay_news(&mut self) -> Option<RawFd> {
        let fd = self.relay.as_ref()?.as_raw_fd();
        loop {
            let next = self.relay.as_ref().map(next_message)?;
            match next {
                Ok(None) => return Some(fd),
                Ok(Some(Response::Rejoined { words, .. })) => {
                    let side = self.side as usize;
                    if let Err(e) = relay::apply(&self.hov, side, &words, self.posted()) {
                        log::warn!("connection {}: the other host's words: {e}", self.conn_id);
                    }
                }
                Ok(Some(_)) => {}
                Err(()) => {
                    SHARED_CALLS.remove(fd);
                    self.relay = None;
                    return None;
                }
            }
        }
    }
}
