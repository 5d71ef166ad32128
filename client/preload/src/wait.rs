//! poll(2)/ppoll(2) over a mix of kernel fds and accelerated sockets:
//! accelerated sockets report ring readiness; a blocked call scans, spins
//! for the sockets' budget, then arms their rings and sleeps in the real
//! poll on their doorbell and liveness fds plus the kernel fds, and scans
//! again when woken. Kernel semantics: a count of ready entries, 0 on
//! timeout, -1/EINTR when a signal interrupts the sleep.
//!
//! Never here: a sleep with a socket armed and not disarmed afterwards, or
//! a socket's lock held across the sleep.

use crate::boundary::{borrow, errno};
use crate::epoll;
use crate::obj::{Armed, Obj};
use crate::table;
use libc::{c_int, pollfd};
use ssock_client::transport::{liveness_poll, Polled};
use ssock_rings::notify::{process_gate, spin_more};
use std::time::{Duration, Instant};

/// The shim's object behind `fd`, if any: an accelerated socket, or an
/// epoll instance with shim members.
pub fn lookup(fd: c_int) -> Option<Obj> {
    if let Some(s) = table::get(fd) {
        return Some(Obj::Sock(s));
    }
    epoll::get(fd)
        .filter(|s| s.has_members())
        .map(|s| Obj::Set(fd, s))
}

/// The accelerated sockets among `pfds` (None: kernel fd), or None if
/// there is none (the caller then hands the whole call to libc).
pub fn accelerated(pfds: &[pollfd]) -> Option<Vec<Option<Obj>>> {
    let socks: Vec<Option<Obj>> = pfds.iter().map(|p| lookup(p.fd)).collect();
    socks.iter().any(Option::is_some).then_some(socks)
}

/// The entry that asks an accelerated socket's kernel socket whether its
/// peer is gone (`liveness_poll`), with `also` asked beside it.
pub fn liveness_entry(fd: c_int, also: i16) -> pollfd {
    pollfd {
        fd,
        events: liveness_poll(fd).events | also,
        revents: 0,
    }
}

/// The answers of a poll of `liveness_entry`s, standing for the poll each
/// socket's readiness would make while the scope lives.
pub fn polled_scope<'a>(entries: impl Iterator<Item = &'a pollfd>) -> Polled {
    Polled::scope(entries.map(|p| (p.fd, p.revents)).collect())
}

/// Fills revents; returns the number of entries with something to report.
/// One real poll asks the kernel fds and, with `check_peer`, the kernel
/// sockets of the accelerated ones (whether a peer is gone, urgent data)
/// at once, not one poll per socket (`Polled`).
fn scan(
    pfds: &mut [pollfd],
    socks: &[Option<Obj>],
    check_peer: bool,
    real_poll: &dyn Fn(&mut [pollfd], c_int) -> c_int,
) -> c_int {
    let asked = |with_socks: bool| -> (Vec<pollfd>, Vec<Option<usize>>) {
        let mut kernel = Vec::new();
        let at = pfds
            .iter()
            .zip(socks)
            .map(|(p, s)| {
                kernel.push(match s {
                    None if p.fd >= 0 => pollfd {
                        fd: p.fd,
                        events: p.events,
                        revents: 0,
                    },
                    // Urgent data travels on the kernel socket (io::send).
                    Some(Obj::Sock(_)) if with_socks => {
                        liveness_entry(p.fd, p.events & libc::POLLPRI)
                    }
                    _ => return None,
                });
                Some(kernel.len() - 1)
            })
            .collect();
        (kernel, at)
    };
    let (mut kernel, mut at) = asked(check_peer);
    let mut polled = check_peer;
    if !kernel.is_empty() && real_poll(&mut kernel, 0) < 0 && check_peer {
        // (EINVAL: more fds than RLIMIT_NOFILE, sshd's sandboxed child.)
        // The kernel fds alone; each socket asks on its own.
        (kernel, at) = asked(false);
        polled = false;
        if !kernel.is_empty() {
            real_poll(&mut kernel, 0);
        }
    }
    let _polled = polled.then(|| {
        polled_scope(
            at.iter()
                .zip(socks)
                .filter_map(|(k, s)| s.as_ref().and(*k))
                .map(|k| &kernel[k]),
        )
    });
    let mut n = 0;
    for ((p, s), k) in pfds.iter_mut().zip(socks).zip(&at) {
        p.revents = match (s, k) {
            (Some(s), _) => {
                // SAFETY: p.fd is an fd the application is polling, open for
                // the duration of its poll call.
                let r = s.readiness(unsafe { borrow(p.fd) }, check_peer);
                let mut revents = r.revents(p.events);
                if let (Obj::Sock(_), Some(k)) = (s, k) {
                    revents |= kernel[*k].revents & p.events & libc::POLLPRI;
                } else if p.events & libc::POLLPRI != 0 && check_peer && matches!(s, Obj::Sock(_)) {
                    let mut u = [pollfd {
                        fd: p.fd,
                        events: libc::POLLPRI,
                        revents: 0,
                    }];
                    if real_poll(&mut u, 0) > 0 {
                        revents |= u[0].revents & libc::POLLPRI;
                    }
                }
                revents
            }
            (None, Some(k)) => kernel[*k].revents,
            (None, None) => 0,
        };
        if p.revents != 0 {
            n += 1;
        }
    }
    n
}

/// How often a sleep that cannot watch the kernel sockets of accelerated
/// connections (see `sleep_within_limit`) wakes to ask them.
const LIVENESS_EVERY: Duration = Duration::from_millis(250);

/// The sleep after poll said EINVAL: its set is larger than RLIMIT_NOFILE
/// allows (sshd's sandboxed child has a limit of 1, and an accelerated
/// socket adds its doorbell to the kernel socket). Sleeps on the program's
/// kernel fds and the doorbells only (no larger than the program's own
/// set; the thread's own doorbell without the common one if need be), for
/// at most [`LIVENESS_EVERY`]: the caller's next round asks the kernel
/// sockets whether a peer is gone. The peer's writes and closes ring the
/// doorbell; only its death, or a ring of the common doorbell, is seen
/// that late.
fn sleep_within_limit(
    pfds: &[pollfd],
    socks: &[Option<Obj>],
    set: &mut Vec<pollfd>,
    left: Option<Duration>,
    sleep: &dyn Fn(&mut [pollfd], Option<Duration>) -> c_int,
) -> c_int {
    let accelerated: Vec<c_int> = pfds
        .iter()
        .zip(socks)
        .filter(|(_, s)| matches!(s, Some(Obj::Sock(_))))
        .map(|(p, _)| p.fd)
        .collect();
    let before = set.len();
    // Out: the kernel sockets of accelerated connections and devd's
    // session (watched for hangups only, events 0).
    set.retain(|p| !accelerated.contains(&p.fd) && p.events != 0);
    if set.len() == before {
        crate::boundary::set_errno(libc::EINVAL);
        return -1;
    }
    let t = left.map_or(LIVENESS_EVERY, |l| l.min(LIVENESS_EVERY));
    if set.len() > pfds.len() {
        // Still too many: the thread's own doorbell, which its wait words
        // name, without the process's common one (rung only for a thread
        // a peer could not name: seen at the next round).
        let [own, common] = ssock_client::bells::doorbell_fds();
        if own >= 0 && own != common {
            set.retain(|p| p.fd != common);
        }
    }
    if set.len() > pfds.len() {
        // Still more than the program's own set (a socket waiting to read
        // and to write has two doorbells): short sleeps on nothing, each
        // followed by the caller's scan, rather than an EINVAL the
        // program did not cause.
        set.clear();
        return sleep(set, Some(t.min(SHORT_NAP)));
    }
    sleep(set, Some(t))
}

/// A wait that can watch nothing (see `sleep_within_limit`) looks again
/// this often.
const SHORT_NAP: Duration = Duration::from_millis(1);

/// Runs a poll over `pfds`, whose accelerated sockets are `socks`.
/// `real_poll(set, timeout_ms)` is libc's poll; `sleep(set, remaining)` is
/// the blocking call (poll or ppoll with the caller's signal mask).
/// `spin`: spin for the first socket's budget before sleeping (false when
/// the caller has just done so).
pub fn poll(
    pfds: &mut [pollfd],
    socks: &[Option<Obj>],
    timeout: Option<Duration>,
    spin: bool,
    real_poll: &dyn Fn(&mut [pollfd], c_int) -> c_int,
    sleep: &dyn Fn(&mut [pollfd], Option<Duration>) -> c_int,
) -> c_int {
    let deadline = crate::sleep::deadline(timeout);
    let mut spun = !spin;
    // Whether this call slept already. The kernel sockets of Direct ends
    // in the region are asked whether a peer is gone (one poll for all of
    // them and the kernel fds) only after a sleep: the sleep watches them
    // (a gone peer, or bytes where none belong, end it at once), so the
    // first sleep needs no
    // look before it, and one that a doorbell ended finds its answer in
    // the rings without any. Other members are looked at before every
    // sleep (their sleep leaves out what is already asserted).
    let mut slept = false;
    // With kernel fds, every scan polls: asking the kernel sockets of the
    // accelerated ones too costs nothing more.
    let kernel_fds = pfds
        .iter()
        .zip(socks)
        .any(|(p, s)| s.is_none() && p.fd >= 0);
    loop {
        // The rings first: no syscall on the path where data is there or
        // arrives while spinning. The kernel sockets are asked whether a
        // peer is gone (one poll for all) only before sleeping, or at once
        // when the caller will not wait (then all that is ready is
        // reported, as the kernel would).
        if kernel_fds && deadline.is_some_and(|d| Instant::now() >= d) {
            return scan(pfds, socks, true, real_poll);
        }
        let n = scan(pfds, socks, false, real_poll);
        if n > 0 {
            return n;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return scan(pfds, socks, true, real_poll);
        }
        if !spun {
            spun = true;
            // The budget is looked up only here: a poll that finds its
            // answer in the first scan takes no socket's lock for it.
            let spin = socks
                .iter()
                .flatten()
                .next()
                .map(Obj::spin)
                .unwrap_or_default();
            // A wait on one connection asks that connection's gate (another
            // connection's slow peer does not stop its spins); on several,
            // the process's.
            let mut accelerated = socks.iter().flatten();
            let gate = match (accelerated.next(), accelerated.next()) {
                (Some(s), None) => s.gate(),
                _ => None,
            };
            let ready = || {
                let any = pfds.iter().zip(socks).any(|(p, s)| {
                    s.as_ref().is_some_and(|s| {
                        // SAFETY: as in `scan`.
                        let fd = unsafe { borrow(p.fd) };
                        s.readiness(fd, false).any(p.events)
                    })
                });
                any.then_some(())
            };
            let gate = gate.as_deref().unwrap_or(process_gate());
            // The scan above looked already.
            if spin_more(spin, gate, ready).is_some() {
                continue;
            }
        }
        if slept || !socks.iter().flatten().all(Obj::watched_by_sleep) {
            let n = scan(pfds, socks, true, real_poll);
            if n > 0 {
                return n;
            }
        }
        let mut set: Vec<pollfd> = Vec::new();
        let mut armed: Vec<Armed> = Vec::new();
        let mut ready_meanwhile = false;
        // What arming asks to watch: accelerated sockets share their
        // process's doorbell, once in the set (sorted, not hashed).
        let mut watched: Vec<(c_int, i16)> = Vec::new();
        for (p, s) in pfds.iter().zip(socks) {
            match s {
                None if p.fd >= 0 => set.push(pollfd {
                    fd: p.fd,
                    events: p.events,
                    revents: 0,
                }),
                None => {}
                Some(s) => {
                    let read = p.events & (libc::POLLIN | libc::POLLRDNORM | libc::POLLRDHUP) != 0;
                    let write = p.events & (libc::POLLOUT | libc::POLLWRNORM) != 0;
                    // SAFETY: as in `scan`.
                    match s.arm(unsafe { borrow(p.fd) }, read, write) {
                        Some((fds, undo)) => {
                            armed.push(undo);
                            watched.extend(fds);
                            if p.events & libc::POLLPRI != 0 {
                                set.push(pollfd {
                                    fd: p.fd,
                                    events: libc::POLLPRI,
                                    revents: 0,
                                });
                            }
                        }
                        None => {
                            ready_meanwhile = true;
                            break;
                        }
                    }
                }
            }
        }
        watched.sort_unstable();
        watched.dedup();
        set.extend(watched.into_iter().map(|(fd, events)| pollfd {
            fd,
            events,
            revents: 0,
        }));
        // Armed: what was reportable already, or arrived before the wait
        // words were set, is seen here (the ring side is no syscall).
        let r = if ready_meanwhile || scan(pfds, socks, false, real_poll) > 0 {
            0
        } else {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let left = crate::sleep::capped(left, &set);
            let r = sleep(&mut set, left);
            slept = true;
            if r < 0 && errno() == libc::EINVAL {
                sleep_within_limit(pfds, socks, &mut set, left, sleep)
            } else {
                r
            }
        };
        let errno = errno();
        for a in armed {
            a.disarm();
        }
        if r < 0 {
            crate::boundary::set_errno(errno);
            return -1;
        }
    }
}
