//! The members' kernel sockets, watched through the kernel instance. A
//! member's kernel socket tells whether its peer is gone (or its peer's
//! process wrote on it after moving back to kernel TCP); a sleep must
//! watch it. Rather than putting every member's socket into each sleep's
//! poll (a cost in the kernel that grows with the members, at every
//! sleep), the instance registers it once in the kernel instance,
//! level-triggered, under the data word `key ^ fd`, at the first sleep
//! that arms the member (not at EPOLL_CTL_ADD: a program that adds and
//! removes a socket at every request would pay two system calls more
//! each time), and keeps it there while the member's arming asks for it: the sleep's poll then watches
//! the epoll fd alone for all of them. An event with such a word is taken
//! out of what the kernel reports and makes that member's next look ask
//! its kernel socket.
//!
//! An instance that a fork shares between two processes (both hold it)
//! has none: the parent removes them before the fork, and neither makes
//! new ones there (a registration one of them removed would be gone for
//! the other too); its sleeps poll the members' sockets as before. Left
//! open: an instance inherited, without close-on-exec, by a program that
//! `posix_spawn` started (no fork handlers run) and that waits on it.
//!
//! A registration goes with its member (EPOLL_CTL_DEL, close, dup2 onto
//! its fd, the socket turning plain), when it fired as one-shot, when its
//! member's arming no longer asks for its kernel socket (a peer known to
//! be gone), and with its file. One whose fd the program closed behind
//! the shim's back while another process held the socket outlives its
//! record: its events are still taken out (the key's form, and no data
//! word of the application's), but wake the waits that see them.
//!
//! Never here: a registration of the application's (those are the
//! kernel's, untouched), or an event with this key reaching the caller.

use crate::fdmap::FdMap;
use libc::{c_int, epoll_event};

/// The instance's liveness registrations (under the instance's lock).
#[derive(Default)]
pub(super) struct Live {
    /// Registered fd -> its epoll event mask.
    regs: FdMap<u32>,
    /// A fork shares the instance: no registrations.
    shared: bool,
}

/// The epoll mask for a poll mask a member's arming asked its kernel
/// socket to be watched with (HUP and ERR come always).
fn mask(events: i16) -> u32 {
    let mut m = 0;
    if events & libc::POLLIN != 0 {
        m |= libc::EPOLLIN as u32;
    }
    if events & libc::POLLRDHUP != 0 {
        m |= libc::EPOLLRDHUP as u32;
    }
    if events & libc::POLLOUT != 0 {
        m |= libc::EPOLLOUT as u32;
    }
    m
}

fn ctl(epfd: c_int, op: c_int, fd: c_int, events: u32, key: u64) -> Result<(), i32> {
    raw_ctl(epfd, op, fd, events, key ^ u64::from(fd.unsigned_abs()))
}

/// epoll_ctl of one of the shim's registrations (a member's socket, the
/// parking doorbell) in instance `epfd`, with data word `data`.
pub(super) fn raw_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    events: u32,
    data: u64,
) -> Result<(), i32> {
    let mut ev = epoll_event { events, u64: data };
    // SAFETY: plain epoll_ctl on the instance and an fd that is open (a
    // member is dropped from its instances before its fd is closed; the
    // doorbell is the shim's own); ev is a valid event for the call.
    let r = unsafe { (crate::real::get().epoll_ctl)(epfd, op, fd, &mut ev) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    }
}

impl Live {
    /// Watch `fd` with poll mask `events` through instance `epfd`: true if
    /// it is registered so now (a system call only when it was not, or
    /// with another mask); false: the sleep's poll must watch it.
    pub fn want(&mut self, epfd: c_int, key: u64, fd: c_int, events: i16) -> bool {
        if self.shared {
            return false;
        }
        let m = mask(events);
        let op = match self.regs.get(&fd) {
            Some(&had) if had == m => return true,
            Some(_) => libc::EPOLL_CTL_MOD,
            None => libc::EPOLL_CTL_ADD,
        };
        let done = match ctl(epfd, op, fd, m, key) {
            Ok(()) => true,
            // Gone meanwhile (its file closed by a path the shim did not
            // see): made again.
            Err(libc::ENOENT) => ctl(epfd, libc::EPOLL_CTL_ADD, fd, m, key).is_ok(),
            // (EEXIST: a registration that is not this record's, perhaps
            // the application's: left alone; the sleep's poll watches it.)
            Err(_) => false,
        };
        if done {
            self.regs.insert(fd, m);
        } else {
            self.drop_fd(epfd, key, fd);
        }
        done
    }

    /// `fd` no longer watched this way (its member left, or its arming no
    /// longer asks for its kernel socket).
    pub fn drop_fd(&mut self, epfd: c_int, key: u64, fd: c_int) {
        if self.regs.remove(&fd).is_some() {
            let _ = ctl(epfd, libc::EPOLL_CTL_DEL, fd, 0, key);
        }
    }

    /// Whether a fork shares the instance (no registrations any more).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Whether the kernel instance watches `fd`'s socket.
    pub fn watched(&self, fd: c_int) -> bool {
        self.regs.contains_key(&fd)
    }

    /// Before a fork that shares the instance: every registration goes,
    /// and none is made again (in the parent; the child's copy is told
    /// with `shared` alone).
    pub fn fork(&mut self, epfd: c_int, key: u64) {
        for (fd, _) in std::mem::take(&mut self.regs) {
            let _ = ctl(epfd, libc::EPOLL_CTL_DEL, fd, 0, key);
        }
        self.shared = true;
    }

    /// The instance is shared with another process (a forked child's
    /// copy of the parent's state, which `fork` emptied).
    pub fn shared(&mut self) {
        self.regs.clear();
        self.shared = true;
    }
}

/// The member fd a kernel event's data word names, if it has the key's
/// form (`key ^ fd`): one of these, or a registration of theirs that
/// outlived its record (the caller tells them from the application's by
/// the data words the application registered).
pub(super) fn named(key: u64, data: u64) -> Option<c_int> {
    c_int::try_from(data ^ key).ok()
}
