//! Moving back (docs/protocol.md section 2.4): when the region stops
//! carrying bytes (a Queued end whose devd is gone), each direction goes
//! back to the kernel socket at the offset its reader took, and what the
//! writer still holds is sent there again, then the rest of its writes.
//!
//! Never here: a byte sent twice or skipped at the offset where a
//! direction moved back.

use super::*;

impl Handover {
    /// The region stopped carrying bytes (devd is gone under a Queued end,
    /// or the peer found that first): each direction goes back to the
    /// kernel socket at the offset where its region part closes.
    pub(super) fn fail_back(&mut self) {
        self.lost = true;
        // Sleepers armed on the region so far wait for devd's ring on the
        // call eventfd, which must not be emptied under them (`offer_watch`).
        self.next_generation();
        let claim = layout::claim(&self.map);
        match self.tx {
            Tx::Tcp(_)
                if self.side == 0
                    && (claim == CLAIM_KERNEL
                        || (claim != CLAIM_ACCEPTED && !layout::is_remote(&self.map))) =>
            {
                // Never claimed: a plain connection on the kernel socket.
                // (Between hosts, devd moved it to the kernel socket: its
                // acceptor's claim may still come, or never; either way
                // this end's writes never moved, and it keeps counting
                // its socket's bytes to move forward later, 8.6.)
                self.stay_on_kernel();
                return;
            }
            // Not moved yet: it never will (the region is dead).
            Tx::Tcp(_) => self.pin_writes(),
            _ => {}
        }
        if self.tx == Tx::Ring
            && layout::end_at(&self.map, self.side) == End::AtFin
            && self.adopted_at == Some(self.inner.region_written())
        {
            // A process this end came from (by exec or fd passing) moved
            // its writes back and sent all it owed (END says so only
            // then), and this one wrote nothing into the region since:
            // the kernel socket carries them in order from here. (Bytes
            // another holder wrote into the region after that are its
            // own to send, or its reset.)
            self.writes_back(Vec::new());
        }
        if self.tx == Tx::Ring {
            match self.inner.close_writes() {
                Ok((_, rest)) if !rest.is_empty() && self.inner.holders() > 1 => {
                    // Each process holding this end would send them again.
                    log::warn!(
                        "connection {}: {} bytes to send again, and the end is held by several processes; resetting it",
                        self.inner.conn_id().unwrap_or(0),
                        rest.len()
                    );
                    self.inner.abort_on_close();
                    self.broken = true;
                    return;
                }
                Ok((at, rest)) => {
                    log::info!(
                        "connection {}: writes back on the kernel socket at region offset {at} ({} bytes again)",
                        self.inner.conn_id().unwrap_or(0),
                        rest.len()
                    );
                    self.writes_back(rest);
                    if self.resend.is_empty() {
                        self.resent_all();
                    }
                }
                Err(_) => {
                    self.broken = true;
                    return;
                }
            }
        }
        if matches!(self.rx, Rx::Tcp(Some(_)) | Rx::Ring) {
            self.close_reads();
        }
    }

    /// The process is about to exec a program that will not take this end
    /// over, or hands it to the C library's stdio (docs/protocol.md
    /// section 2.6): a Direct end leaves the region now. Reads first, at
    /// exactly what this end read (its peer sends the rest again on the
    /// kernel socket, where the new program reads); then writes, at what
    /// it wrote (its peer reads the ring up to there, then the socket,
    /// where the new program writes); a direction that has not moved never
    /// will. What it owes goes out before the exec; bytes the new program
    /// could not get (owed and unsendable, region bytes the peer will
    /// never send again), or a connection already broken, reset it now.
    /// What it did (see [`Transport::before_plain_exec`]); a Queued end is
    /// left as it is (a limit, written down there).
    pub(super) fn leave_for_plain(&mut self, ctx: &Ctx<'_>) -> Leave {
        self.step();
        if self.kernel {
            return Leave::Kernel;
        }
        if self.closed || self.inner.mode() != Mode::Direct {
            return Leave::Stays;
        }
        if self.broken {
            self.abort_now(ctx, "the connection was broken");
            return Leave::Left;
        }
        if !self.lost {
            self.lost = true;
            self.next_generation();
            if !self.close_for_plain() {
                self.abort_now(ctx, "the region broke the hand-over's rules");
                return Leave::Left;
            }
        }
        if matches!(self.rx, Rx::Ring | Rx::Tcp(Some(_)))
            && self.inner.reads_left().is_some_and(|l| l > 0)
        {
            // The peer left the region first (it exec'd a plain program
            // too, or is leaving now), closing what this end reads at all
            // it wrote, with bytes this end had not read: it will not send
            // them again, and nobody else can hand them on.
            self.abort_now(ctx, "region bytes this process had not read");
            return Leave::Left;
        }
        // This end's close won, with bytes in the ring it did not read:
        // its peer sends them again.
        let unread = self.reads_closed.is_some() && self.inner.pending(ctx).0 > 0;
        if self.tx == Tx::Back {
            let c = Ctx {
                tcp: ctx.tcp,
                nonblocking: false,
                deadline: Some(std::time::Instant::now() + CLOSE_FLUSH),
                spin: std::time::Duration::ZERO,
                check_peer: false,
                plain: false,
            };
            if !matches!(self.flush(&c, true), Ok(true)) {
                self.abort_now(ctx, "bytes it owed could not go out");
                return Leave::Left;
            }
            // From here the kernel socket carries every write, the new
            // program's too, whoever else holds the end: its end is the
            // stream's.
            if layout::end_at(&self.map, self.side) == End::Open {
                layout::publish_end_at_fin(&self.map, self.side);
            }
        }
        if unread {
            self.await_peer_resend(ctx);
        }
        Leave::Left
    }

    /// `leave_for_plain`'s closes: false if the end broke.
    fn close_for_plain(&mut self) -> bool {
        if self.rx == Rx::Tcp(None) {
            self.rx = match layout::publish_switch(&self.map, 1 - self.side, Switch::Never) {
                Switch::After(u) => Rx::Tcp(Some(u)),
                _ => Rx::Forever,
            };
        }
        if matches!(self.rx, Rx::Tcp(Some(_)) | Rx::Ring) {
            // At this end's own tail, even if the peer is leaving too: it
            // then sends the rest again before its own exec.
            match self.inner.close_reads_here() {
                Ok(at) => self.reads_closed = Some(at),
                Err(_) => {
                    self.broken = true;
                    return false;
                }
            }
            if self.rx == Rx::Ring && self.inner.reads_left() == Some(0) {
                if let Some(at) = self.reads_closed {
                    self.rx = Rx::Back { at, after: 0 };
                }
            }
        }
        if let Tx::Tcp(_) = self.tx {
            self.pin_writes();
        }
        if self.tx == Tx::Ring {
            match self.inner.close_writes() {
                Ok((at, rest)) => {
                    log::info!(
                        "connection {}: leaves the region: writes back on the kernel socket at region offset {at} ({} bytes again)",
                        self.inner.conn_id().unwrap_or(0),
                        rest.len()
                    );
                    self.writes_back(rest);
                }
                Err(_) => {
                    self.broken = true;
                    return false;
                }
            }
        }
        true
    }

    /// The ring still held bytes this end did not read when it closed its
    /// reads: its peer sends them again on the kernel socket once it
    /// looks (woken by the close). Waits up to `CLOSE_FLUSH` for its END
    /// (published once they are out); a peer whose socket ended meanwhile
    /// without it (it closed or died before the close, with those bytes
    /// in the ring only) resets the connection, rather than let the new
    /// program read a stream with a hole. A peer that does not look in
    /// time sends them when it next does.
    fn await_peer_resend(&mut self, ctx: &Ctx<'_>) {
        let d = 1 - self.side;
        let until = std::time::Instant::now() + CLOSE_FLUSH;
        while layout::end_at(&self.map, d) == End::Open {
            let mut p = [PollFd::new(ctx.tcp.as_raw_fd(), libc::POLLRDHUP)];
            let ended = matches!(ssock_rings::sys::poll(&mut p, Some(std::time::Duration::ZERO)), Ok(n) if n > 0);
            // (END is published before the peer's socket can end.)
            if ended && layout::end_at(&self.map, d) == End::Open {
                self.abort_now(ctx, "its peer left with bytes only the region had");
                return;
            }
            if std::time::Instant::now() >= until {
                log::warn!(
                    "connection {}: its peer has not sent the bytes this process did not read again yet; the new program gets them when it does",
                    self.inner.conn_id().unwrap_or(0)
                );
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Resets the connection now (its socket survives the exec, so a
    /// close's SO_LINGER would come too late): the new program and the
    /// peer get an error instead of a stream with a hole.
    fn abort_now(&mut self, ctx: &Ctx<'_>, why: &str) {
        log::warn!(
            "connection {}: reset before an exec: {why}",
            self.inner.conn_id().unwrap_or(0)
        );
        let _ = ssock_rings::sys::disconnect(ctx.tcp);
        self.disconnected = true;
        self.broken = true;
    }

    /// This end's writes go on the kernel socket for good: first `rest`
    /// (written into the region and not taken), then the rest.
    fn writes_back(&mut self, rest: Vec<u8>) {
        self.resend_total = rest.len() as u64;
        self.resend = rest;
        self.resent = 0;
        self.tail = self.inner.region_written();
        self.tx = Tx::Back;
    }

    /// Closes this end's reads from the region (see [`Handover::fail_back`]).
    pub(super) fn close_reads(&mut self) {
        match self.inner.close_reads() {
            Ok(at) => {
                log::info!(
                    "connection {}: reads back on the kernel socket after region offset {at} ({} bytes still to read from the region)",
                    self.inner.conn_id().unwrap_or(0),
                    self.inner.reads_left().unwrap_or(0)
                );
                self.reads_closed = Some(at);
            }
            // The peer closes it itself in a moment (Direct: it is leaving
            // the region): `step` asks again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.broken = true,
        }
    }

    /// Whether the region stopped carrying bytes (looked at again, and
    /// acted on: `step`).
    pub(super) fn lost_now(&mut self) -> bool {
        self.step();
        self.lost
    }

    /// [`Handover::flush`] without blocking, for a call that reports
    /// something else (a read, a readiness look, a wait): an error the
    /// send took from the kernel socket, which reports a reset once, is
    /// kept for the read that finds the socket's end (`tcp_err`), as the
    /// kernel would have given it that read. (EPIPE is not one: a read
    /// after the peer's FIN and reset ends the stream; nor is an error of
    /// the call itself, as ENOBUFS.)
    pub(super) fn flush_aside(&mut self, ctx: &Ctx<'_>) {
        if let Err(e) = self.flush(ctx, false) {
            // A socket's own errors, which a read would have reported.
            let kept = matches!(
                e.raw_os_error(),
                Some(
                    libc::ECONNRESET
                        | libc::ETIMEDOUT
                        | libc::EHOSTUNREACH
                        | libc::ENETUNREACH
                        | libc::ECONNREFUSED
                )
            );
            if kept && self.tcp_err.is_none() {
                self.tcp_err = e.raw_os_error();
            }
        }
    }

    /// Sends what `resend` still holds; Ok(true) once it is all out (and the
    /// kernel socket shut down if that was asked meanwhile). `block`: waits
    /// for room until the deadline.
    pub(super) fn flush(&mut self, ctx: &Ctx<'_>, block: bool) -> io::Result<bool> {
        while self.resent < self.resend.len() {
            let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
            match ssock_rings::sys::send(ctx.tcp, &self.resend[self.resent..], flags) {
                Ok(n) => {
                    self.resent += n;
                    self.sock_out += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !block {
                        return Ok(false);
                    }
                    let mut p = [PollFd::new(ctx.tcp.as_raw_fd(), libc::POLLOUT)];
                    match ssock_rings::notify::sleep(&mut p, ctx.deadline) {
                        Ok(true) => {}
                        Ok(false) => return Err(would_block()),
                        // A signal: look again until the deadline.
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if !self.resend.is_empty() {
            self.resend = Vec::new();
            self.resent = 0;
            self.resent_all();
        }
        if self.wr_shut && self.tx == Tx::Back && !self.back_shut {
            self.back_shut = true;
            self.end_back_writes(ctx)?;
        }
        Ok(true)
    }

    /// The last close of an end whose writes moved back, its kernel socket
    /// still open (`ctx`; None: not known here): what is still owed goes
    /// out (waiting for room up to `CLOSE_FLUSH`), then END says where the
    /// stream ends. If it cannot all go, the connection is reset (SO_LINGER
    /// 0 on the socket) rather than ended short.
    pub(super) fn close_back(&mut self, ctx: Option<&Ctx<'_>>) {
        if self.owed() {
            let sent = match ctx {
                Some(c) => {
                    let c = Ctx {
                        tcp: c.tcp,
                        nonblocking: false,
                        deadline: Some(std::time::Instant::now() + CLOSE_FLUSH),
                        spin: std::time::Duration::ZERO,
                        check_peer: false,
                        plain: false,
                    };
                    let done = matches!(self.flush(&c, true), Ok(true));
                    if !done {
                        let _ = socket2::SockRef::from(&c.tcp)
                            .set_linger(Some(std::time::Duration::ZERO));
                    }
                    done
                }
                None => false,
            };
            if !sent {
                log::warn!(
                    "connection {}: closed with {} bytes owed since devd went; resetting it",
                    self.inner.conn_id().unwrap_or(0),
                    self.resend.len() - self.resent
                );
                return;
            }
        }
        layout::publish_end(&self.map, self.side, self.tail);
    }

    /// The close of this process's hold (see [`Transport::close`]); `ctx`
    /// while the kernel socket is still open.
    pub(super) fn close_with(&mut self, ctx: Option<&Ctx<'_>>) {
        if self.kernel || self.closed {
            return;
        }
        self.closed = true;
        self.step();
        if self.kernel {
            return;
        }
        if let Tx::Tcp(w) = self.tx {
            // Nothing more comes: a claim that comes later knows where the
            // kernel bytes end. The region never carried anything.
            self.publish(Switch::After(w));
            self.inner.discard_region();
        }
        // Region bytes left unread after the region stopped carrying any
        // (devd gone): the peer reads the kernel socket now, whose close
        // must be the reset, with no END that would end its reads first.
        // Unread are those delivered here and not read, and those its
        // writer posted beyond where this end closed the region part (it
        // sends them again on the kernel socket, to a closed socket).
        // (The last holder's close only: another process holding the end
        // may read them still, and each counts only its own reads.)
        let reset_back = ctx.is_some_and(|c| {
            let unread = self.lost
                && self.inner.holders() <= 1
                && match self.rx {
                    Rx::Ring | Rx::Tcp(Some(_)) => {
                        self.inner.reads_left().is_some_and(|l| l > 0) || self.peer_posted_beyond(0)
                    }
                    Rx::Back { after, .. } => self.peer_posted_beyond(after),
                    _ => false,
                };
            if unread {
                let _ = socket2::SockRef::from(&c.tcp).set_linger(Some(std::time::Duration::ZERO));
            }
            unread
        });
        if self.tx == Tx::Back && self.inner.holders() <= 1 && !reset_back {
            self.close_back(ctx);
        }
        if self.broken {
            self.inner.abort_on_close();
            if let Some(c) = ctx {
                self.broken_with(c);
            }
        }
        // Bytes the peer wrote on the kernel socket left unread here make
        // the kernel's close a reset, which the peer would not see while
        // it reads this end's writes from the region: the region says so.
        // (Looked at by the last holder only, once the others let go: a
        // forked child may be reading them meanwhile.)
        match ctx {
            Some(c) if matches!(self.rx, Rx::Tcp(_) | Rx::Forever) => self
                .inner
                .close_or_reset(&|| ssock_rings::sys::socket_queues(c.tcp).0 > 0),
            _ => self.inner.close(),
        }
    }

    /// The writer of the direction this end reads, on this host, posted
    /// region bytes beyond where that direction's region part closed and
    /// the `read` bytes this end read of them on the kernel socket since.
    fn peer_posted_beyond(&self, read: u64) -> bool {
        let d = 1 - self.side;
        !layout::is_remote(&self.map)
            && matches!(layout::taken(&self.map, d),
                layout::Taken::Closed(at) if layout::posted(&self.map, d) > at.saturating_add(read))
    }

    /// Reads moved back and reached where the writer's END says its
    /// writes end.
    pub(super) fn back_at_end(&self) -> bool {
        match self.rx {
            Rx::Back { at, after } if !self.kernel => {
                layout::end_at(&self.map, 1 - self.side) == End::At(at.saturating_add(after))
            }
            _ => false,
        }
    }

    /// What was sent again is all out: from here on the kernel socket
    /// carries this end's writes in order, so its end (whenever it comes,
    /// even at this process's death) is the stream's: END says so at once
    /// (a reader that finds the socket ended before END came would have
    /// to take it for bytes missing).
    fn resent_all(&mut self) {
        // (An END published before, at a shutdown, stays: the first value
        // does, and the socket's end comes right after it.)
        if self.tx == Tx::Back
            && self.inner.holders() <= 1
            && layout::end_at(&self.map, self.side) == End::Open
        {
            layout::publish_end_at_fin(&self.map, self.side);
            self.inner.words_changed();
        }
    }

    /// Whether `flush` has something to do: bytes to send again, or a
    /// shutdown asked for before they were out.
    pub(super) fn owed(&self) -> bool {
        self.resent < self.resend.len() || (self.wr_shut && self.tx == Tx::Back && !self.back_shut)
    }

    /// `Tx::Back` writes end: END says how many there were, then the
    /// kernel socket is shut down.
    pub(super) fn end_back_writes(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        layout::publish_end(&self.map, self.side, self.tail);
        socket2::SockRef::from(&ctx.tcp).shutdown(std::net::Shutdown::Write)
    }
}
