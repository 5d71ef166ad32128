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
//! as before), a value from the other host used unchecked (the page
//! logic of `ssock_rings::relay`), or a rejoin of an end several
//! processes hold (each has only its own view: it resets).

use super::{Queued, SHARED_CALLS};
use crate::session::{Session, SessionError};
use crate::transport::Transport;
use ssock_rings::codec::{Request, Response};
use ssock_rings::layout;
use ssock_rings::relay;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an end waits for a devd started again and the other host's
/// answer before it resets.
pub const REJOIN_FOR: Duration = Duration::from_secs(8);
/// How often it looks for that devd meanwhile.
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
    /// A session with the new devd, once one answered.
    session: Option<Arc<Session>>,
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
        // Sleeps are cut short meanwhile, so that the end looks again.
        SHARED_CALLS.insert(self.call.as_raw_fd());
        let now = Instant::now();
        self.rejoin = Some(Rejoin {
            since: now,
            next_try: now,
            path,
            received,
            session: None,
        });
        log::warn!(
            "connection {}: devd is gone and the other end is on another host; waiting up to {} s for devd to be started again",
            self.conn_id,
            REJOIN_FOR.as_secs()
        );
        true
    }

    /// Asks a devd started again (at most every `TRY_EVERY`) where each
    /// direction goes on; gives up after `REJOIN_FOR`. `tcp`: the end's
    /// kernel socket, which names the connection.
    pub(super) fn rejoin_step(&mut self, tcp: BorrowedFd<'_>) {
        let Some(r) = self.rejoin.as_mut() else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(r.since) >= REJOIN_FOR {
            log::warn!(
                "connection {}: no devd agreed where it goes on within {} s; resetting it",
                self.conn_id,
                REJOIN_FOR.as_secs()
            );
            return self.rejoin_over(false);
        }
        if now < r.next_try {
            return;
        }
        r.next_try = now + TRY_EVERY;
        if r.session.as_ref().is_none_or(|s| s.is_broken()) {
            // (Not there yet: the next look tries again.)
            r.session = Session::connect(&r.path).ok();
        }
        let (Some(session), received) = (r.session.clone(), r.received) else {
            return;
        };
        let side = self.side as usize;
        let words = relay::ours(&self.hov, side);
        match session.request(&Request::Rejoin { words, received }, &[tcp]) {
            Ok((Response::Rejoined { words, closed }, _)) => {
                let mut heard = true;
                let counts = (self.posted(), received);
                let agreed =
                    relay::agree_page(&self.hov, side, counts, &mut heard, &words, Some(closed));
                match agreed {
                    Ok(()) => {
                        log::info!(
                            "connection {}: devd was started again and the two hosts agreed where it goes on",
                            self.conn_id
                        );
                        self.relay = Some(session);
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
            Err(SessionError::Refused { code: EAGAIN, .. }) => {}
            Err(SessionError::Refused { message, .. }) => {
                log::warn!("connection {}: {message}; resetting it", self.conn_id);
                self.rejoin_over(false);
            }
            // devd went again: the next look tries a new one.
            Err(_) => {}
            Ok(_) => self.rejoin_over(false),
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

    /// A rejoined end's words changed: to the other host, through the
    /// session that rejoined it.
    pub(super) fn relay_words(&self) {
        if let Some(s) = &self.relay {
            let words = relay::ours(&self.hov, self.side as usize);
            let _ = s.post(&Request::Words { words });
        }
    }

    /// The other host's words that came on a rejoined end's relay,
    /// applied to its page (checked as any relayed words); its fd, which
    /// news makes readable.
    pub(super) fn relay_news(&mut self) -> Option<std::os::fd::RawFd> {
        let s = self.relay.clone()?;
        match s.news() {
            Ok(news) => {
                for r in news {
                    if let Response::Rejoined { words, .. } = r {
                        let side = self.side as usize;
                        if let Err(e) = relay::apply(&self.hov, side, &words, self.posted()) {
                            log::warn!("connection {}: the other host's words: {e}", self.conn_id);
                        }
                    }
                }
                Some(s.raw_fd())
            }
            Err(_) => {
                self.relay = None;
                None
            }
        }
    }
}
