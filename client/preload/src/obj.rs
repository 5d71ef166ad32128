//! What a wait watches that the kernel cannot see: an accelerated socket,
//! or a shim epoll instance that has such sockets among its members (nested
//! in poll or in another epoll instance), and what arming one for a sleep
//! did, to be undone exactly. Below both the poll path (`wait`) and epoll
//! (`epoll`): an epoll instance enters here as a [`Nested`], which `epoll`
//! implements.
//!
//! Never here: looking an fd up, sleeping, or any epoll bookkeeping.

use crate::sock::{lock, Entry};
use libc::c_int;
use ssock_client::transport::{QuietSig, Ready};
use ssock_rings::notify::Gate;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

/// A shim epoll instance as a member of a wait (poll, or another epoll
/// instance): `epoll::Set`.
pub trait Nested: Send + Sync {
    /// Readiness of the instance itself: readable when a wait on it would
    /// report something.
    fn readiness(&self, epfd: c_int, check_peer: bool) -> Ready;
    /// Arms every member for a sleep: the fds to sleep on, and what was
    /// armed, for `disarm`.
    fn arm(&self, epfd: c_int) -> (Vec<(c_int, i16)>, Vec<Armed>);
    /// Ends a sleep prepared by `arm`.
    fn disarm(&self, armed: Vec<Armed>);
    /// The instances among its members (for the nesting loop check).
    fn nested(&self) -> Vec<Arc<dyn Nested>>;
}

/// Something whose readiness the kernel cannot see: an accelerated socket,
/// or an epoll instance (with its fd) that has such sockets among its
/// members (nested in poll or in another epoll).
#[derive(Clone)]
pub enum Obj {
    Sock(Entry),
    Set(c_int, Arc<dyn Nested>),
}

/// What one `Obj::arm` armed, to be undone exactly (another thread may have
/// changed the registrations meanwhile).
pub enum Armed {
    Nothing,
    /// A socket's transport armed for reading, writing, at a generation.
    Sock(Entry, bool, bool, u64),
    Set(Arc<dyn Nested>, Vec<Armed>),
    /// The calling thread's doorbell sleep (an epoll set whose parked
    /// members are woken through it): ended when dropped.
    Bell(#[allow(dead_code, reason = "held for its drop")] ssock_client::bells::Sleep),
}

impl Armed {
    /// Ends the sleep this arming prepared.
    pub fn disarm(self) {
        drop(self);
    }
}

impl Drop for Armed {
    /// Disarms (also when a panic unwinds past a sleep: a count of
    /// sleepers left behind would stay for good).
    fn drop(&mut self) {
        match self {
            Armed::Nothing | Armed::Bell(_) => {}
            Armed::Sock(s, read, write, gen) => lock(s).disarm(*read, *write, *gen),
            Armed::Set(s, members) => s.disarm(std::mem::take(members)),
        }
    }
}

impl Obj {
    pub fn readiness(&self, fd: BorrowedFd<'_>, check_peer: bool) -> Ready {
        match self {
            Obj::Sock(s) => lock(s).readiness(fd, check_peer),
            Obj::Set(epfd, s) => s.readiness(*epfd, check_peer),
        }
    }

    /// Arms for a sleep (see `Sock::arm`): the fds to sleep on and what to
    /// undo afterwards (exactly what was armed); None: ready now.
    pub fn arm(
        &self,
        fd: BorrowedFd<'_>,
        read: bool,
        write: bool,
    ) -> Option<(Vec<(c_int, i16)>, Armed)> {
        match self {
            Obj::Sock(s) => {
                let (fds, armed) = lock(s).arm(fd, read, write)?;
                let undo = match armed {
                    Some(gen) => Armed::Sock(s.clone(), read, write, gen),
                    None => Armed::Nothing,
                };
                Some((fds, undo))
            }
            Obj::Set(epfd, s) if read => {
                let (fds, members) = s.arm(*epfd);
                Some((fds, Armed::Set(s.clone(), members)))
            }
            // An epoll instance is never writable: nothing to wait for.
            Obj::Set(..) => Some((Vec::new(), Armed::Nothing)),
        }
    }

    /// Parks an accelerated socket (see `Sock::park`).
    pub fn park(
        &self,
        sleep: ssock_client::bells::Sleep,
        read: bool,
        write: bool,
    ) -> Option<(u64, u64)> {
        match self {
            Obj::Sock(s) => lock(s).park(sleep, read, write),
            Obj::Set(..) => None,
        }
    }

    /// Arms a parking again (see `Sock::repark`).
    pub fn repark(&self, id: u32, gen: u64) -> bool {
        match self {
            Obj::Sock(s) => lock(s).repark(id, gen),
            Obj::Set(..) => false,
        }
    }

    /// Ends a parking (see `Sock::unpark`).
    pub fn unpark(&self, id: u32, gen: u64) {
        if let Obj::Sock(s) = self {
            lock(s).unpark(id, gen);
        }
    }

    /// `readiness`, unless `quiet` is what a look at the rings alone
    /// (`sig`) reads now: None then (nothing changed since a look found
    /// nothing). With `sig`, what it read, before the look: what a look
    /// that finds nothing records as its `quiet`. One lock of the socket.
    pub fn look(
        &self,
        fd: BorrowedFd<'_>,
        check_peer: bool,
        sig: bool,
        quiet: Option<&QuietSig>,
    ) -> Option<(Ready, Option<QuietSig>)> {
        match self {
            Obj::Sock(s) => {
                let mut s = lock(s);
                let now = if sig && !check_peer {
                    s.quiet_sig()
                } else {
                    None
                };
                if now.is_some() && now.as_ref() == quiet {
                    return None;
                }
                Some((s.readiness(fd, check_peer), now))
            }
            Obj::Set(epfd, s) => Some((s.readiness(*epfd, check_peer), None)),
        }
    }

    pub fn spin(&self) -> Duration {
        match self {
            Obj::Sock(s) => lock(s).spin(),
            Obj::Set(..) => ssock_rings::notify::DEFAULT_SPIN,
        }
    }

    /// The spin gate of a wait on this alone: the connection's own (None:
    /// an epoll instance or a plain socket, whose waits ask the process's).
    pub fn gate(&self) -> Option<Arc<Gate>> {
        match self {
            Obj::Sock(s) => lock(s).gate(),
            Obj::Set(..) => None,
        }
    }

    /// Whether a sleep that arms it watches all a peer check would find
    /// (see `Sock::watched_by_sleep`; never a nested epoll instance).
    pub fn watched_by_sleep(&self) -> bool {
        match self {
            Obj::Sock(s) => lock(s).watched_by_sleep(),
            Obj::Set(..) => false,
        }
    }

    /// Whether negotiation ended on kernel TCP (an accelerated socket only).
    pub fn is_kernel(&self) -> bool {
        match self {
            Obj::Sock(s) => lock(s).is_kernel(),
            Obj::Set(..) => false,
        }
    }
}
