//! Waiting while a direction is on the kernel socket: a short look (the
//! peer on this host answers within microseconds), then one sleep on the
//! region's doorbells and the kernel socket, re-checked after 1 ms
//! doubling to 1 s.
//!
//! Never here: a sleep on events already asserted (they are reported by
//! readiness), or a wait without a bound when nothing can wake it.

use super::*;

impl Handover {
    /// The kernel socket's entry for a sleep on `ev`: events already
    /// asserted are left out (they are reported by readiness, and an
    /// edge-triggered waiter wants a change, not a level), and none at all
    /// when it is hung up or in error. None: nothing to sleep on there.
    /// Also says whether one of `wanted` is asserted now, or the socket
    /// is hung up or in error.
    pub(super) fn tcp_entry(fd: RawFd, ev: i16, wanted: i16) -> (Option<PollFd>, bool) {
        if ev == 0 {
            return (None, false);
        }
        let mut p = [PollFd::new(fd, ev)];
        let now = match ssock_rings::sys::poll(&mut p, Some(std::time::Duration::ZERO)) {
            Ok(_) => p[0].revents,
            Err(_) => 0,
        };
        if now & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            return (None, true);
        }
        let left = ev & !now;
        (
            (left != 0).then(|| PollFd::new(fd, left)),
            now & wanted != 0,
        )
    }

    /// Poll events of the kernel socket a waiter for `read`/`write` sleeps on.
    pub(super) fn tcp_events(&self, read: bool, write: bool) -> i16 {
        let mut ev = 0;
        if self.kernel {
            if read {
                ev |= libc::POLLIN | libc::POLLRDHUP;
            }
            if write {
                ev |= libc::POLLOUT;
            }
            return ev;
        }
        if read {
            // The peer's bytes, or (once they come through the region) its
            // last close.
            ev |= libc::POLLIN | libc::POLLRDHUP;
        } else if write && self.tx == Tx::Ring && !self.tcp_eof {
            // A writer into the region learns of the peer's close here;
            // the peer's bytes on the socket must not wake it.
            ev |= libc::POLLRDHUP;
        }
        if (write && matches!(self.tx, Tx::Tcp(_) | Tx::Pinned | Tx::Back)) || self.owed() {
            // (Bytes to send again go out whatever the caller waits for.)
            ev |= libc::POLLOUT;
        }
        ev
    }

    /// Whether what a waiter for `read`/`write` waits for is there in the
    /// region already.
    pub(super) fn ring_ready(&mut self, ctx: &Ctx<'_>, read: bool, write: bool) -> bool {
        if self.kernel {
            return false;
        }
        let r = self.inner.readiness(&ctx.quiet(), false);
        (read && self.rx == Rx::Ring && r.readable) || (write && self.tx == Tx::Ring && r.writable)
    }

    /// Sleeps until the kernel socket or the region may let a `read` or
    /// `write` go on, or the deadline (WouldBlock).
    pub(super) fn wait(&mut self, ctx: &Ctx<'_>, read: bool, write: bool) -> io::Result<()> {
        let tcp = ctx.tcp.as_raw_fd();
        let mut fds: Vec<PollFd> = Vec::with_capacity(4);
        self.step();
        let armed = !self.kernel && !self.lost;
        if armed {
            match self.inner.arm(&ctx.quiet(), read, write) {
                Some(v) => fds.extend(
                    v.into_iter()
                        .filter(|&(fd, _)| fd != tcp)
                        .map(|(fd, ev)| PollFd::new(fd, ev)),
                ),
                // The region stopped carrying bytes: the caller looks again.
                None if self.inner.path_lost() => return Ok(()),
                // Broken (reset).
                None => {
                    self.inner_broke();
                    return if self.kernel {
                        Ok(())
                    } else {
                        Err(reset_error())
                    };
                }
            }
        }
        match self.offer_watch(ctx) {
            OfferWatch::Taken => return Ok(()),
            OfferWatch::Fd(fd) => fds.push(PollFd::new(fd, libc::POLLIN)),
            OfferWatch::Nothing => {}
        }
        let ev = self.tcp_events(read, write);
        let wanted = ev & (libc::POLLIN | libc::POLLOUT);
        // A peer on this host answers within tens of microseconds, less
        // than a sleep and a wake-up cost: look for a while first (each
        // look at the kernel socket is a system call; this phase is short).
        let mut spin = ssock_rings::notify::Spin::new(ctx.spin.min(PHASE_SPIN));
        let before = (self.tx, self.rx, self.kernel);
        while spin.again() {
            self.step();
            if (self.tx, self.rx, self.kernel) != before
                || self.ring_ready(ctx, read, write)
                || Handover::tcp_entry(tcp, wanted, wanted).1
            {
                if armed {
                    self.inner.disarm(read, write);
                }
                return Ok(());
            }
        }
        let (entry, now) = Handover::tcp_entry(tcp, ev, wanted);
        if let Some(e) = entry {
            fds.push(e);
        }
        let before = (self.tx, self.rx, self.kernel);
        self.step();
        let r = if now
            || (self.tx, self.rx, self.kernel) != before
            || self.ring_ready(ctx, read, write)
        {
            self.recheck = RECHECK_MIN;
            Ok(true)
        } else {
            let cap = std::time::Instant::now() + self.recheck;
            let r = match ctx.deadline {
                Some(d) if d <= cap => ssock_rings::notify::sleep(&mut fds, ctx.deadline),
                _ => {
                    let r = ssock_rings::notify::sleep(&mut fds, Some(cap));
                    if matches!(r, Ok(false)) {
                        // (An end several processes hold looks again
                        // within the cut of their shared wake-ups.)
                        let max = if self.inner.holders() > 1 {
                            crate::transport::queued::SHARED_SLEEP_CAP
                        } else {
                            RECHECK_MAX
                        };
                        self.recheck = (self.recheck * 2).min(max);
                    }
                    // The caller looks again either way.
                    r.map(|_| true)
                }
            };
            // What the doorbells among them found (a ring taken off).
            crate::bells::polled(fds.iter().map(|p| (p.fd, p.revents)));
            r
        };
        if armed && !self.kernel {
            self.inner.disarm(read, write);
            // What woke it may be the transport's own (devd's session).
            self.inner.check_devd();
        }
        if self.owed() {
            self.flush_aside(ctx);
        }
        if let Some(p) = fds.last() {
            if p.fd == tcp && !read && p.revents & libc::POLLRDHUP != 0 && self.rx != Rx::Ring {
                let mark = self.inner.region_mark();
                self.step();
                if matches!(self.rx, Rx::Tcp(_) | Rx::Forever) {
                    self.kernel_end_ends(mark);
                }
            }
        }
        match r {
            Ok(true) => Ok(()),
            Ok(false) => Err(would_block()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }
}
