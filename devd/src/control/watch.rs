//! Which kernel-TCP connections came of devd's Kernel answers. devd
//! answers an Intent with Kernel (or an error) before its connector
//! connects, and the connector then connects on its own, fails to
//! (refused), or asks again with the same socket (a nonblocking
//! `connect()` called again). So such a connection is counted only once
//! devd sees its socket connected, and once per socket.
//!
//! devd does not keep the socket: it registers it, edge-triggered for
//! EPOLLOUT, in an epoll set and closes its own duplicate at once. A
//! registration does not hold the socket open (it goes with the socket's
//! last fd), so the application's close stays the last, as without devd.
//! The kernel removes a registration only with an fd, so sockets go into
//! a set per generation: a generation takes new sockets for [`SPAN`], and
//! is closed, with every registration in it, [`SPAN`] after that. A socket
//! is thus watched for 1 to 2 s; the wake-ups a counted socket still
//! causes (its close, write space after a full buffer) stop then.
//!
//! Not counted: a connect that takes longer than that, and a connection
//! its application closed before devd read the event (tens of
//! microseconds: the close takes the registration and its event along).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// How long a generation takes new sockets, and lives after that.
pub const SPAN: Duration = Duration::from_secs(1);

/// Sockets watched at most (over all live generations); more are not
/// watched, so their connections are not counted.
pub const MAX_WATCHED: usize = 16384;

/// What [`Watch::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The socket is watched.
    Watched,
    /// It was watched already (the same socket's earlier Intent).
    Again,
    /// Not watched (too many, or the kernel refused).
    NotWatched,
}

/// One generation's epoll set.
struct Gen {
    set: Epoll,
    born: Instant,
    /// Its tag in `top`.
    id: u64,
    /// Tags of the sockets registered in it.
    tags: Vec<u64>,
}

/// A watched socket.
struct Watched {
    inode: u64,
    counted: bool,
}

/// The watched sockets of Kernel answers (see the module doc).
pub struct Watch {
    /// The generations' sets, each registered here; the control loop
    /// waits on this one.
    top: Epoll,
    /// Oldest first.
    gens: VecDeque<Gen>,
    by_tag: HashMap<u64, Watched>,
    /// Tag by socket inode.
    by_inode: HashMap<u64, u64>,
    next: u64,
}

impl Watch {
    /// An empty watch (its top set is made now, before the sandbox; the
    /// generations' sets later, with epoll_create1).
    pub fn new() -> io::Result<Watch> {
        Ok(Watch {
            top: Epoll::new()?,
            gens: VecDeque::new(),
            by_tag: HashMap::new(),
            by_inode: HashMap::new(),
            next: 0,
        })
    }

    /// The fd the control loop waits on: readable when a watched socket
    /// changed.
    pub fn fd(&self) -> RawFd {
        self.top.as_raw_fd()
    }

    /// Watches `sock` (socket inode `inode`) until it connects.
    pub fn add(&mut self, sock: BorrowedFd<'_>, inode: u64, now: Instant) -> Added {
        if self.by_inode.contains_key(&inode) {
            return Added::Again;
        }
        if self.by_tag.len() >= MAX_WATCHED {
            return Added::NotWatched;
        }
        if self
            .gens
            .back()
            .is_none_or(|g| now.duration_since(g.born) >= SPAN)
        {
            let Ok(set) = Epoll::new() else {
                return Added::NotWatched;
            };
            let id = self.next;
            self.next += 1;
            let e = EpollEvent::new(EventSet::IN, id);
            if self
                .top
                .ctl(ControlOperation::Add, set.as_raw_fd(), e)
                .is_err()
            {
                return Added::NotWatched;
            }
            self.gens.push_back(Gen {
                set,
                born: now,
                id,
                tags: Vec::new(),
            });
        }
        let tag = self.next;
        let Some(g) = self.gens.back_mut() else {
            return Added::NotWatched;
        };
        // Edge-triggered: one event per change of the socket. EPOLLOUT
        // only (ERR and HUP come anyway): wake-ups for arriving data do
        // not reach devd.
        let e = EpollEvent::new(EventSet::OUT | EventSet::EDGE_TRIGGERED, tag);
        if g.set
            .ctl(ControlOperation::Add, sock.as_raw_fd(), e)
            .is_err()
        {
            return Added::NotWatched;
        }
        self.next += 1;
        g.tags.push(tag);
        self.by_tag.insert(
            tag,
            Watched {
                inode,
                counted: false,
            },
        );
        self.by_inode.insert(inode, tag);
        Added::Watched
    }

    /// The socket of inode `inode` is not on kernel TCP after all (a later
    /// Intent of it proceeded): its connection is counted as accelerated,
    /// not here.
    pub fn forget(&mut self, inode: u64) {
        if let Some(w) = self
            .by_inode
            .get(&inode)
            .and_then(|t| self.by_tag.get_mut(t))
        {
            w.counted = true;
        }
    }

    /// Reads what changed; returns how many watched sockets were seen
    /// connected for the first time.
    pub fn poll(&mut self) -> u64 {
        let mut ready = [EpollEvent::default(); 8];
        let mut events = [EpollEvent::default(); 64];
        let mut connected = 0;
        let Ok(n) = self.top.wait(0, &mut ready) else {
            return 0;
        };
        for r in &ready[..n] {
            let Some(g) = self.gens.iter().find(|g| g.id == r.data()) else {
                continue;
            };
            while let Ok(m) = g.set.wait(0, &mut events) {
                for ev in &events[..m] {
                    let Some(w) = self.by_tag.get_mut(&ev.data()) else {
                        continue;
                    };
                    if !w.counted && is_connected(ev.event_set()) {
                        w.counted = true;
                        connected += 1;
                    }
                }
                if m < events.len() {
                    break;
                }
            }
        }
        connected
    }

    /// Closes the generations that are over (with their registrations).
    pub fn retire(&mut self, now: Instant) {
        while self
            .gens
            .front()
            .is_some_and(|g| now.duration_since(g.born) >= 2 * SPAN)
        {
            let Some(g) = self.gens.pop_front() else {
                break;
            };
            for tag in g.tags {
                if let Some(w) = self.by_tag.remove(&tag) {
                    if self.by_inode.get(&w.inode) == Some(&tag) {
                        self.by_inode.remove(&w.inode);
                    }
                }
            }
            // Dropping the set closes it: the kernel forgets every
            // registration in it (and takes it out of `top`).
        }
    }

    /// When the oldest generation is over, if any lives.
    pub fn next_retire(&self) -> Option<Instant> {
        self.gens.front().map(|g| g.born + 2 * SPAN)
    }

    /// Sockets watched now.
    pub fn len(&self) -> usize {
        self.by_tag.len()
    }

    /// Whether no socket is watched.
    pub fn is_empty(&self) -> bool {
        self.by_tag.is_empty()
    }
}

/// A TCP socket's poll mask says connected: writable, neither hung up
/// (not connected yet, or closed) nor in error (refused).
fn is_connected(e: EventSet) -> bool {
    e.contains(EventSet::OUT) && !e.intersects(EventSet::HANG_UP | EventSet::ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    fn inode(s: &impl AsFd) -> u64 {
        ssock_rings::sys::socket_inode(s.as_fd()).unwrap()
    }

    /// Polls until `want` connections were counted, for up to a second.
    fn poll_until(w: &mut Watch, want: u64) -> u64 {
        let mut n = 0;
        let t = Instant::now();
        while n < want && t.elapsed() < Duration::from_secs(1) {
            n += w.poll();
            std::thread::sleep(Duration::from_millis(1));
        }
        n + w.poll()
    }

    #[test]
    fn a_socket_counts_once_when_it_connects_and_a_refused_one_never() {
        let mut w = Watch::new().unwrap();
        let now = Instant::now();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        // Watched before its connect (devd answers before the connector
        // connects): not connected yet.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        assert_eq!(w.add(s.as_fd(), inode(&s), now), Added::Watched);
        assert_eq!(w.poll(), 0);
        s.connect(&l.local_addr().unwrap().into()).unwrap();
        assert_eq!(poll_until(&mut w, 1), 1);
        // The same socket again (a second connect() call): not again.
        assert_eq!(w.add(s.as_fd(), inode(&s), now), Added::Again);
        // A refused connect: never counted.
        let port = {
            let t = TcpListener::bind("127.0.0.1:0").unwrap();
            t.local_addr().unwrap()
        };
        let r = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        assert_eq!(w.add(r.as_fd(), inode(&r), now), Added::Watched);
        assert!(r.connect(&port.into()).is_err());
        // Already connected when watched (a blocking connector connects
        // while devd handles its Intent): counted.
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(w.add(c.as_fd(), inode(&c), now), Added::Watched);
        assert_eq!(poll_until(&mut w, 1), 1);
        assert_eq!(poll_until(&mut w, 1), 0);
        assert_eq!(w.len(), 3);
        // Generations end: everything is forgotten.
        w.retire(now + 2 * SPAN);
        assert!(w.is_empty() && w.next_retire().is_none());
    }
}
