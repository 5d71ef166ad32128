//! epoll_ctl on an instance the shim knows: a kernel fd's registration is
//! the kernel's (the shim remembers it, so that a socket can move between
//! the two), an accelerated socket's or a nested shim instance's is the
//! shim's (an accelerated socket's kernel socket registered in the kernel
//! instance too, for its liveness: `live`), with the kernel's errors
//! (EEXIST, ENOENT, ELOOP, EINVAL).
//!
//! Never here: a wait, or a registration of the application's made
//! anywhere but where the kernel would keep it.

use super::{created, get, Set, EPOLLEXCLUSIVE, REGISTERED};
use crate::obj::{Nested, Obj};
use crate::table;
use libc::{c_int, epoll_event};
use std::sync::atomic::Ordering;

/// Whether `target` can be reached from `from` through nested members
/// (or the nesting is too deep, as the kernel's limit of 5 levels).
fn reaches(from: &dyn Nested, target: &Set, depth: usize) -> bool {
    if std::ptr::addr_eq(from, target) || depth > 4 {
        return true;
    }
    let nested = from.nested();
    nested
        .iter()
        .any(|s| reaches(s.as_ref(), target, depth + 1))
}

/// Whether `fd` is an epoll instance (for one created before the shim saw it).
fn is_epoll(fd: c_int) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|p| p.as_os_str() == "anon_inode:[eventpoll]")
}

/// epoll_ctl(2). `real` performs the call on the kernel instance. (The
/// caller sent a socket left to the kernel for good, in no instance the
/// shim knows of and not an instance itself, straight to the kernel:
/// `fdstate::kernel_member`. It never moves to the shim, so the kernel's
/// registration is all there is: no lock, no record.)
pub fn ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    ev: *mut epoll_event,
    real: &dyn Fn() -> c_int,
) -> Result<c_int, i32> {
    let obj = table::get(fd)
        .map(Obj::Sock)
        .or_else(|| get(fd).map(|s| Obj::Set(fd, s)));
    let set = match get(epfd) {
        Some(s) => s,
        None if obj.is_some() && is_epoll(epfd) => {
            created(epfd);
            get(epfd).ok_or(libc::ENOMEM)?
        }
        None => return Ok(real()),
    };
    // Loop check first, without holding this set's lock (it locks the
    // nested sets; holding ours meanwhile could deadlock against a waiter).
    if let Some(Obj::Set(_, inner)) = &obj {
        if op == libc::EPOLL_CTL_ADD && fd != epfd && reaches(inner.as_ref(), &set, 0) {
            return Err(libc::ELOOP);
        }
    }
    let mut i = set.lock();
    let shim_member = i.members.iter().position(|m| m.fd == fd);
    // (Looked up again under the set's lock: a socket that became
    // accelerated meanwhile is in the table before it moves into a set.)
    let obj = obj.or_else(|| table::get(fd).map(Obj::Sock));
    if let (None, Some(k)) = (&obj, shim_member) {
        if i.members[k].obj.is_kernel() {
            // A member whose socket turned plain (a call on it was sent to
            // the kernel: `dispatch`) since the last wait, which would have
            // given it back to the kernel instance: given back now, so that
            // the kernel's answer to this call is about its registration
            // there.
            set.give_back(epfd, &mut i, k);
            set.any.store(!i.members.is_empty(), Ordering::SeqCst);
        }
    }
    let Some(obj) = obj else {
        // A kernel fd: the kernel decides; the shim remembers.
        let r = real();
        if r == 0 {
            REGISTERED.insert(fd);
            // SAFETY: for ADD/MOD, ev is the caller's valid epoll_event.
            let e = unsafe { ev.as_ref() }.map(|e| (e.events, e.u64));
            match (op, e) {
                (libc::EPOLL_CTL_DEL, _) => {
                    i.kernel.remove(&fd);
                }
                (_, Some(e)) => {
                    i.kernel.insert(fd, e);
                }
                _ => {}
            }
        }
        return Ok(r);
    };
    if fd == epfd {
        return Err(libc::EINVAL);
    }

    // SAFETY: for ADD/MOD, ev is the caller's epoll_event (epoll_ctl(2)).
    let want = unsafe { ev.as_ref() }.map(|e| (e.events, e.u64));
    match op {
        libc::EPOLL_CTL_ADD => {
            let (events, data) = want.ok_or(libc::EFAULT)?;
            if shim_member.is_some() || i.kernel.contains_key(&fd) {
                return Err(libc::EEXIST);
            }
            REGISTERED.insert(fd);
            i.add(fd, obj, events, data);
        }
        libc::EPOLL_CTL_MOD => {
            let (events, data) = want.ok_or(libc::EFAULT)?;
            let k = shim_member.ok_or(libc::ENOENT)?;
            if events & EPOLLEXCLUSIVE != 0 || i.members[k].events & EPOLLEXCLUSIVE != 0 {
                return Err(libc::EINVAL);
            }
            let m = &mut i.members[k];
            m.unpark();
            m.events = events;
            m.data = data;
            m.seen = None;
            m.disabled = false;
            m.quiet = None;
        }
        libc::EPOLL_CTL_DEL => {
            let k = shim_member.ok_or(libc::ENOENT)?;
            i.remove_at(k);
            i.live.drop_fd(epfd, set.live_key, fd);
            i.member_left(epfd, set.park_tag);
        }
        _ => return Err(libc::EINVAL),
    }
    set.any.store(!i.members.is_empty(), Ordering::SeqCst);
    drop(i);
    set.ring();
    Ok(0)
}
