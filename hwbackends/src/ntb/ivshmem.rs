//! The ivshmem-server protocol (QEMU docs/specs/ivshmem-spec.rst,
//! version 0), both ends: [`IvshmemWindow`], a window provider that gets
//! its shared memory and doorbells from an ivshmem server, as QEMU's
//! ivshmem-doorbell device does (so an emulated link and a guest's device
//! share one doorbell model); and [`Server`], which hands them out (Debian
//! ships no ivshmem-server).
//!
//! The protocol: over a unix stream socket, the server sends little-endian
//! i64 messages, some with one fd (SCM_RIGHTS): the version (0), the
//! client's id, -1 with the shared memory fd, then for every other client
//! its id with one eventfd per vector, and last the client's own id with
//! its own eventfds. Later: a new client's id with its eventfds, or a
//! departed client's id alone. A client is rung by writing to its
//! eventfd; it waits on its own.
//!
//! Everything the server sends is checked (a server is another process,
//! not trusted with more than the memory it hands out).
//!
//! Never here: a read of the peer's inbox, a write to this node's own.

use super::window::{Halves, Window};
use ssock_rings::shm::Mapping;
use ssock_rings::sys::{self, recv_with_fds, send_with_fds, EventFd, PollFd};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// The protocol version this speaks.
pub const PROTOCOL: i64 = 0;
/// Largest shared memory a client maps.
pub const MAX_SHM: u64 = 1 << 30;
/// Most vectors a client keeps per peer.
pub const MAX_VECTORS: usize = 64;
/// Most clients a client keeps eventfds of.
pub const MAX_PEERS: usize = 64;

fn bad(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("ivshmem-server: {what}"),
    )
}

/// Reads one message: the i64 and the fd that came with it.
fn read_msg(s: &UnixStream, flags: i32) -> io::Result<(i64, Option<OwnedFd>)> {
    let mut b = [0u8; 8];
    let mut got = 0;
    let mut fd = None;
    while got < 8 {
        let (n, mut fds) = recv_with_fds(s.as_fd(), &mut b[got..], 1, flags)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "ivshmem-server hung up",
            ));
        }
        if let Some(f) = fds.pop() {
            if fd.is_some() || got > 0 {
                return Err(bad("an fd in the middle of a message".into()));
            }
            fd = Some(f);
        }
        got += n;
    }
    Ok((i64::from_le_bytes(b), fd))
}

/// A link's window from an ivshmem server: this node's inbox is half
/// `half` (0 or 1) of the shared memory, the peer's the other; the
/// doorbell is vector `vector` of each side.
pub struct IvshmemWindow {
    sock: UnixStream,
    id: i64,
    halves: Halves,
    vector: usize,
    own: Vec<EventFd>,
    peers: BTreeMap<i64, Vec<EventFd>>,
    /// A message begun at a nonblocking read and not whole yet: its bytes
    /// so far, how many, and the fd that came with its first byte.
    part: ([u8; 8], usize, Option<OwnedFd>),
    /// The server broke the protocol: nothing more is read from it.
    broken: bool,
}

impl IvshmemWindow {
    /// Connects to the server at `path` and waits (up to `timeout`) for the
    /// memory and this client's own doorbell.
    pub fn connect(
        path: &Path,
        half: usize,
        vector: usize,
        timeout: Duration,
    ) -> io::Result<IvshmemWindow> {
        if half > 1 || vector >= MAX_VECTORS {
            return Err(bad(format!("half {half}, vector {vector}")));
        }
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(timeout))?;
        let deadline = Instant::now() + timeout;
        let (v, _) = read_msg(&sock, 0)?;
        if v != PROTOCOL {
            return Err(bad(format!("protocol version {v}, not {PROTOCOL}")));
        }
        let (id, fd) = read_msg(&sock, 0)?;
        if !(0..=0xffff).contains(&id) || fd.is_some() {
            return Err(bad(format!("client id {id}")));
        }
        let (m, shm) = read_msg(&sock, 0)?;
        let Some(shm) = shm.filter(|_| m == -1) else {
            return Err(bad("no shared memory".into()));
        };
        let len = std::fs::File::from(shm.try_clone()?).metadata()?.len();
        if !(2 * 8192..=MAX_SHM).contains(&len) || !len.is_multiple_of(8192) {
            return Err(bad(format!("shared memory of {len} bytes")));
        }
        // Another client of the server holds the same memory: unless it is
        // sealed against shrinking, one could truncate it under this
        // mapping (SIGBUS).
        let full = usize::try_from(len).map_err(|e| bad(e.to_string()))?;
        sys::check_sealed(shm.as_fd(), full)
            .map_err(|e| bad(format!("shared memory not sealed against resizing ({e})")))?;
        let size = full / 2;
        let map = Mapping::map(shm.as_fd(), 2 * size, true)?;
        let mut w = IvshmemWindow {
            sock,
            id,
            halves: Halves::new(map, half, size)?,
            vector,
            own: Vec::new(),
            part: ([0; 8], 0, None),
            broken: false,
            peers: BTreeMap::new(),
        };
        while w.own.len() <= vector {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "ivshmem-server: no doorbell",
                ));
            }
            let (peer, fd) = read_msg(&w.sock, 0)?;
            w.take(peer, fd)?;
        }
        w.sock.set_nonblocking(true)?;
        Ok(w)
    }

    /// This client's id at the server.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The ids of the other clients whose doorbells are known.
    pub fn peers(&self) -> Vec<i64> {
        self.peers.keys().copied().collect()
    }

    /// One message after the memory: an eventfd of a client, or a client
    /// gone.
    fn take(&mut self, peer: i64, fd: Option<OwnedFd>) -> io::Result<()> {
        if !(0..=0xffff).contains(&peer) {
            return Err(bad(format!("client id {peer}")));
        }
        // A doorbell is read and written in the engine's turn: whatever the
        // fd is, it must never block there.
        if let Some(f) = &fd {
            sys::set_nonblocking(f.as_fd(), true)?;
        }
        match fd {
            Some(fd) if peer == self.id => {
                if self.own.len() < MAX_VECTORS {
                    self.own.push(EventFd::from_owned(fd));
                }
            }
            Some(fd) => {
                if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEERS {
                    return Ok(()); // more peers than a link has: ignored
                }
                let v = self.peers.entry(peer).or_default();
                if v.len() < MAX_VECTORS {
                    v.push(EventFd::from_owned(fd));
                }
            }
            None => {
                self.peers.remove(&peer);
            }
        }
        Ok(())
    }

    /// Takes what the server sent since (new or departed clients).
    fn refresh(&mut self) {
        while !self.broken {
            let (mut b, got) = (self.part.0, self.part.1);
            match recv_with_fds(self.sock.as_fd(), &mut b[got..], 1, libc::MSG_DONTWAIT) {
                Ok((0, _)) => return, // the server went away: the doorbells stay
                Ok((n, mut fds)) => {
                    if let Some(f) = fds.pop() {
                        if got > 0 || self.part.2.is_some() {
                            log::warn!("ivshmem-server: an fd in the middle of a message; later messages ignored");
                            self.broken = true;
                            return;
                        }
                        self.part.2 = Some(f);
                    }
                    self.part.0 = b;
                    self.part.1 = got + n;
                    if self.part.1 < 8 {
                        continue; // the rest of the message is on its way
                    }
                    let fd = self.part.2.take();
                    self.part.1 = 0;
                    if let Err(e) = self.take(i64::from_le_bytes(b), fd) {
                        log::warn!("{e}; later messages of the ivshmem server ignored");
                        self.broken = true;
                        return;
                    }
                }
                Err(_) => return, // nothing now (WouldBlock), or the server is gone
            }
        }
    }
}

impl Window for IvshmemWindow {
    fn halves(&self) -> &Halves {
        &self.halves
    }

    fn ring(&self) {
        // A doorbell to an absent peer is dropped, as ivshmem drops it.
        for v in self.peers.values() {
            if let Some(e) = v.get(self.vector) {
                let _ = e.notify();
            }
        }
    }

    fn bell(&self) -> BorrowedFd<'_> {
        self.own[self.vector].as_fd()
    }

    fn drain(&mut self) {
        self.own[self.vector].drain();
        self.refresh();
    }

    fn syscalls(&self) -> Vec<crate::Syscall> {
        let fd = u64::try_from(self.sock.as_raw_fd()).unwrap_or(u64::MAX);
        vec![
            crate::Syscall {
                nr: libc::SYS_recvmsg,
                arg: Some((0, vec![fd])),
                why: "ivshmem: the server's news of peers that come and go, on its socket only",
            },
            crate::Syscall {
                nr: libc::SYS_fcntl,
                arg: Some((1, vec![libc::F_GETFL as u64, libc::F_SETFL as u64])),
                why: "ivshmem: a new peer's doorbell made nonblocking",
            },
        ]
    }
}

/// An ivshmem server: hands each client the shared memory and the
/// eventfds of every client, `vectors` each.
pub struct Server {
    listener: UnixListener,
    shm: OwnedFd,
    vectors: usize,
    next: i64,
    clients: HashMap<i64, (UnixStream, Vec<EventFd>)>,
}

impl Server {
    /// Serves `shm` on `listener`.
    pub fn new(listener: UnixListener, shm: OwnedFd, vectors: usize) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        Ok(Server {
            listener,
            shm,
            vectors: vectors.clamp(1, MAX_VECTORS),
            next: 0,
            clients: HashMap::new(),
        })
    }

    fn send(s: &UnixStream, v: i64, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        let n = send_with_fds(s.as_fd(), &v.to_le_bytes(), &fds)?;
        if n == 8 {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to a client",
            ))
        }
    }

    fn accept(&mut self, c: UnixStream) -> io::Result<()> {
        let id = self.next;
        self.next = (self.next + 1) % 0x1_0000;
        let fds = (0..self.vectors)
            .map(|_| EventFd::new())
            .collect::<io::Result<Vec<_>>>()?;
        Server::send(&c, PROTOCOL, None)?;
        Server::send(&c, id, None)?;
        Server::send(&c, -1, Some(self.shm.as_fd()))?;
        for (&other, (os, ofds)) in &self.clients {
            for f in &fds {
                let _ = Server::send(os, id, Some(f.as_fd()));
            }
            for f in ofds {
                Server::send(&c, other, Some(f.as_fd()))?;
            }
        }
        for f in &fds {
            Server::send(&c, id, Some(f.as_fd()))?;
        }
        self.clients.insert(id, (c, fds));
        Ok(())
    }

    /// Serves until `stop` becomes readable.
    pub fn run(&mut self, stop: BorrowedFd<'_>) -> io::Result<()> {
        loop {
            let ids: Vec<i64> = self.clients.keys().copied().collect();
            let mut set = vec![
                PollFd::new(stop.as_raw_fd(), libc::POLLIN),
                PollFd::new(self.listener.as_raw_fd(), libc::POLLIN),
            ];
            for id in &ids {
                set.push(PollFd::new(self.clients[id].0.as_raw_fd(), libc::POLLIN));
            }
            match sys::poll(&mut set, None) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if set[0].revents != 0 {
                return Ok(());
            }
            if set[1].revents != 0 {
                while let Ok((c, _)) = self.listener.accept() {
                    if let Err(e) = self.accept(c) {
                        log::warn!("ivshmem server: a client could not be set up: {e}");
                    }
                }
            }
            for (k, id) in ids.iter().enumerate() {
                if set[k + 2].revents == 0 {
                    continue;
                }
                // Clients send nothing: readable means gone.
                if let Some((s, _)) = self.clients.remove(id) {
                    drop(s);
                    for (os, _) in self.clients.values() {
                        let _ = Server::send(os, *id, None);
                    }
                }
            }
        }
    }
}
