//! Queued: this process drives a TX and an RX split virtqueue in its own
//! region; devd is the device side and moves the bytes through a backend
//! to the peer. A blocked call spins on the used ring for its budget, then
//! sleeps on the call eventfd (devd only rings it when asked: used_event).

use super::{
    judge, liveness, liveness_poll, pipe_error, reset_error, would_block, Ctx, Liveness, Ready,
    Transport,
};
use crate::session::Session;
use crate::transport::direct::AttachError;
use ssock_rings::codec::{Attachment, Mode, Request, Side};
use ssock_rings::layout::{
    self, check_header, qhdr, QueuedLayout, RegionKind, FLAG_EOS, FLAG_RESET,
};
use ssock_rings::notify::{sleep, spin_until};
use ssock_rings::shm::Mapping;
use ssock_rings::sys::{check_sealed, EventFd, PollFd};
use ssock_rings::vq::driver::{DeviceViolation, QueueDriver};
use ssock_rings::vq::{F_WRITE, RX, TX};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// One end of a Queued connection.
#[derive(Debug)]
pub struct Queued {
    conn_id: u64,
    side: Side,
    map: Arc<Mapping>,
    layout: QueuedLayout,
    tx: QueueDriver,
    rx: QueueDriver,
    free_tx: Vec<u16>,
    /// Bytes posted in each TX slot, and their sum while in flight.
    tx_len: Vec<usize>,
    tx_inflight: usize,
    rx_cur: Option<(u16, usize, usize)>,
    kick: EventFd,
    call: EventFd,
    /// Threads asleep through `arm` (see `disarm`).
    sleepers: u32,
    session: Option<Arc<Session>>,
    peer_gone: bool,
    broken: bool,
    shut_wr: bool,
    closed: bool,
    counters: [u64; 4],
}

impl Queued {
    /// Maps this process's region and posts every RX buffer.
    /// fds: [region, kick eventfd, call eventfd].
    pub fn attach(
        a: &Attachment,
        fds: Vec<OwnedFd>,
        session: Option<Arc<Session>>,
    ) -> Result<Queued, AttachError> {
        let [region, kick, call]: [OwnedFd; 3] = fds
            .try_into()
            .map_err(|v: Vec<_>| AttachError::Fds(v.len()))?;
        let size = usize::try_from(a.region_size).unwrap_or(usize::MAX);
        let layout =
            QueuedLayout::announced(size, a.geom_a, a.geom_b).map_err(AttachError::Layout)?;
        check_sealed(region.as_fd(), size).map_err(AttachError::Region)?;
        let map = Arc::new(Mapping::map(region.as_fd(), size, true).map_err(AttachError::Region)?);
        check_header(&map, RegionKind::Queued, a.conn_id, a.geom_a, a.geom_b)
            .map_err(AttachError::Layout)?;
        layout::hold(&map, a.side as usize);
        let q = layout.qsize;
        let mut me = Queued {
            conn_id: a.conn_id,
            side: a.side,
            tx: QueueDriver::new(map.clone(), layout.queues[TX], q),
            rx: QueueDriver::new(map.clone(), layout.queues[RX], q),
            map,
            layout,
            free_tx: (0..q).rev().collect(),
            tx_len: vec![0; usize::from(q)],
            tx_inflight: 0,
            rx_cur: None,
            kick: EventFd::from_owned(kick),
            call: EventFd::from_owned(call),
            sleepers: 0,
            session,
            peer_gone: false,
            broken: false,
            shut_wr: false,
            closed: false,
            counters: [0; 4],
        };
        for i in 0..q {
            me.rx.post(
                i,
                me.layout.slot_offset(RX, i) as u64,
                me.slot_u32(),
                F_WRITE,
            );
        }
        me.kick();
        Ok(me)
    }

    fn slot_u32(&self) -> u32 {
        u32::try_from(self.layout.slot).unwrap_or(u32::MAX)
    }

    fn kick(&mut self) {
        let _ = self.kick.notify();
        self.counters[2] += 1;
    }

    fn kick_if_asked(&mut self, q: usize) {
        let want = if q == TX {
            self.tx.should_kick()
        } else {
            self.rx.should_kick()
        };
        if want {
            self.kick();
        } else {
            self.counters[3] += 1;
        }
        self.publish_counters();
    }

    fn publish_counters(&self) {
        let offs = [
            qhdr::TX_BYTES,
            qhdr::RX_BYTES,
            qhdr::KICKS,
            qhdr::KICKS_SUPPRESSED,
        ];
        for (o, v) in offs.iter().zip(self.counters) {
            // Relaxed: statistics for ringstat only.
            self.map.u64_at(*o).store(v, Ordering::Relaxed);
        }
    }

    fn violation(&mut self, v: DeviceViolation) -> io::Error {
        log::warn!("connection {}: {v}; resetting it", self.conn_id);
        self.broken = true;
        reset_error()
    }

    fn rx_flags(&self) -> u32 {
        // Acquire: pairs with devd's Release when it sets the mark after
        // its last used entry.
        self.map.u32_at(qhdr::RX_FLAGS).load(Ordering::Acquire)
    }

    /// Sleeps until devd rings, the peer's socket changes, devd's session
    /// hangs up (devd died: a Queued connection cannot go on without it,
    /// so it is reset rather than left hanging), or the deadline passes.
    fn sleep(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        let devd = self.session.as_ref().map_or(-1, |s| s.raw_fd());
        let mut fds = [
            PollFd::new(self.call.as_raw_fd(), libc::POLLIN),
            // Events 0: only POLLHUP/POLLERR, never another thread's reply.
            PollFd::new(devd, 0),
            liveness_poll(ctx.tcp.as_raw_fd()),
        ];
        let n = if self.peer_gone { 2 } else { 3 };
        let woke = sleep(&mut fds[..n], ctx.deadline)?;
        if fds[0].revents != 0 {
            self.call.drain();
        }
        if fds[1].revents != 0 {
            log::warn!("connection {}: devd is gone; resetting it", self.conn_id);
            self.broken = true;
            return Err(reset_error());
        }
        if n == 3 && judge(fds[2].revents) != Liveness::Alive {
            self.peer_gone = true;
        }
        if woke {
            Ok(())
        } else {
            Err(would_block())
        }
    }

    /// Asks, with one zero-timeout poll, whether the peer is gone (its
    /// kernel socket, unless known already) and whether devd's session
    /// hung up (devd died: a Queued connection cannot go on without it,
    /// so it is reset).
    fn check_peer_and_devd(&mut self, ctx: &Ctx<'_>) {
        let tcp = if self.peer_gone {
            -1
        } else {
            ctx.tcp.as_raw_fd()
        };
        self.check_socket_and_devd(tcp);
    }

    /// [`Queued::check_peer_and_devd`] on kernel socket `tcp` (-1: none).
    fn check_socket_and_devd(&mut self, tcp: std::os::fd::RawFd) {
        let devd = self.session.as_ref().map_or(-1, |s| s.raw_fd());
        // Events 0 on the session: only POLLHUP/POLLERR, never a reply.
        let mut fds = [liveness_poll(tcp), PollFd::new(devd, 0)];
        if !matches!(ssock_rings::sys::poll(&mut fds, Some(Duration::ZERO)), Ok(n) if n > 0) {
            return;
        }
        if matches!(judge(fds[0].revents), Liveness::Gone | Liveness::Reset) {
            self.peer_gone = true;
        }
        if fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0 && !self.broken {
            // A sleep through `arm` wakes on the session's hangup; without
            // this the waiter would arm and wake again at once, forever.
            log::warn!("connection {}: devd is gone; resetting it", self.conn_id);
            self.broken = true;
        }
    }

    fn repost(&mut self, id: u16) {
        let addr = self.layout.slot_offset(RX, id) as u64;
        let len = self.slot_u32();
        self.rx.post(id, addr, len, F_WRITE);
        self.kick_if_asked(RX);
    }

    fn take(&mut self, buf: &mut [u8], ctx: &Ctx<'_>, consume: bool) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.broken {
                return Err(reset_error());
            }
            if let Some((id, len, off)) = self.rx_cur {
                let n = buf.len().min(len - off);
                self.map
                    .read_bytes(self.layout.slot_offset(RX, id) + off, &mut buf[..n]);
                if consume {
                    self.counters[1] += n as u64;
                    if off + n == len {
                        self.rx_cur = None;
                        self.repost(id);
                    } else {
                        self.rx_cur = Some((id, len, off + n));
                    }
                }
                return Ok(n);
            }
            let slot = self.slot_u32();
            match self.rx.pop_used(slot).map_err(|v| self.violation(v))? {
                Some((id, 0)) => self.repost(id),
                Some((id, len)) => self.rx_cur = Some((id, len as usize, 0)),
                None => {
                    let f = self.rx_flags();
                    if f & FLAG_RESET != 0 {
                        self.broken = true;
                        return Err(reset_error());
                    }
                    if f & FLAG_EOS != 0 && !self.rx.has_used() {
                        return Ok(0);
                    }
                    if f & FLAG_EOS == 0 {
                        self.wait_rx(ctx)?;
                    }
                }
            }
        }
    }

    fn wait_rx(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        if ctx.nonblocking {
            return Err(would_block());
        }
        let map = &self.map;
        let rx = &self.rx;
        let ready = || {
            (rx.has_used() || map.u32_at(qhdr::RX_FLAGS).load(Ordering::Acquire) != 0).then_some(())
        };
        if spin_until(ctx.spin, ready).is_some() {
            return Ok(());
        }
        if !self.rx.arm() || self.rx_flags() != 0 {
            return Ok(());
        }
        self.sleep(ctx)
    }

    fn wait_tx(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        let tx = &self.tx;
        if spin_until(ctx.spin, || tx.has_used().then_some(())).is_some() {
            return Ok(());
        }
        if !self.tx.arm() {
            return Ok(());
        }
        self.sleep(ctx)
    }
}

impl Transport for Queued {
    fn mode(&self) -> Mode {
        Mode::Queued
    }

    fn conn_id(&self) -> Option<u64> {
        Some(self.conn_id)
    }

    fn check_devd(&mut self) {
        self.check_socket_and_devd(-1);
    }

    fn handover_words(&self) -> Option<(Arc<Mapping>, usize)> {
        Some((self.map.clone(), self.side as usize))
    }

    fn readiness(&mut self, ctx: &Ctx<'_>, check_peer: bool) -> Ready {
        if check_peer {
            self.check_peer_and_devd(ctx);
        }
        let f = self.rx_flags();
        if self.broken || f & FLAG_RESET != 0 {
            return Ready::BROKEN;
        }
        let data = self.rx_cur.is_some() || self.rx.has_used();
        let eos = f & FLAG_EOS != 0;
        Ready {
            readable: data || eos,
            writable: self.shut_wr
                || self.peer_gone
                || !self.free_tx.is_empty()
                || self.tx.has_used(),
            rdhup: eos || self.peer_gone,
            hup: (eos || self.peer_gone) && self.shut_wr,
            err: false,
            seq: [
                u64::from(self.rx.used_idx()) + u64::from(eos) + u64::from(self.peer_gone),
                u64::from(self.tx.used_idx()) + u64::from(self.peer_gone),
            ],
        }
    }

    fn arm(
        &mut self,
        ctx: &Ctx<'_>,
        read: bool,
        write: bool,
    ) -> Option<Vec<(std::os::fd::RawFd, i16)>> {
        if self.broken {
            return None;
        }
        // used_event set in both queues; what is there already is the
        // caller's to re-check.
        if read {
            self.rx.arm();
        }
        if write {
            self.tx.arm();
        }
        if read || write {
            self.sleepers += 1;
        }
        let devd = self.session.as_ref().map_or(-1, |s| s.raw_fd());
        let mut fds = vec![(self.call.as_raw_fd(), libc::POLLIN), (devd, 0)];
        if !self.peer_gone {
            fds.push((ctx.tcp.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP));
        }
        Some(fds)
    }

    fn disarm(&mut self, read: bool, write: bool) {
        // One interrupt fd serves both directions: it is drained when the
        // last sleeper leaves, so no sleeper's wake-up is taken away.
        if read || write {
            self.sleepers = self.sleepers.saturating_sub(1);
            if self.sleepers == 0 {
                self.call.drain();
            }
        }
    }

    fn wake_self(&self) {
        let _ = self.call.notify();
    }

    fn pending(&mut self, _ctx: &Ctx<'_>) -> (usize, usize) {
        // Only the RX buffer being read is known without popping the used
        // ring; bytes in devd's engine are not visible from here.
        let unread = self.rx_cur.map_or(0, |(_, len, off)| len - off);
        let slot = self.slot_u32();
        while let Ok(Some((id, _))) = self.tx.pop_used(slot) {
            self.tx_inflight -= std::mem::take(&mut self.tx_len[usize::from(id)]);
            self.free_tx.push(id);
        }
        (unread, self.tx_inflight)
    }

    fn switch_published(&mut self) {
        if !self.broken {
            self.kick();
        }
    }

    fn fork_hold(&mut self) {
        if !self.closed {
            layout::hold(&self.map, self.side as usize);
        }
    }

    fn drop_hold(&mut self) {
        if !self.closed {
            layout::unhold(&self.map, self.side as usize);
        }
    }

    fn read(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        self.take(buf, ctx, true)
    }

    fn peek(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        self.take(buf, ctx, false)
    }

    fn write(&mut self, buf: &[u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        let mut off = 0;
        let slot = self.slot_u32();
        loop {
            if self.broken || self.rx_flags() & FLAG_RESET != 0 {
                self.broken = true;
                return Err(reset_error());
            }
            if self.shut_wr || self.peer_gone {
                return if off > 0 { Ok(off) } else { Err(pipe_error()) };
            }
            while let Some((id, _)) = self.tx.pop_used(slot).map_err(|v| self.violation(v))? {
                self.tx_inflight -= std::mem::take(&mut self.tx_len[usize::from(id)]);
                self.free_tx.push(id);
            }
            let mut posted = false;
            while off < buf.len() {
                let Some(id) = self.free_tx.pop() else { break };
                let n = (buf.len() - off).min(self.layout.slot);
                self.map
                    .write_bytes(self.layout.slot_offset(TX, id), &buf[off..off + n]);
                self.tx.post(
                    id,
                    self.layout.slot_offset(TX, id) as u64,
                    u32::try_from(n).unwrap_or(slot),
                    0,
                );
                self.counters[0] += n as u64;
                self.tx_len[usize::from(id)] = n;
                self.tx_inflight += n;
                off += n;
                posted = true;
            }
            if posted {
                self.kick_if_asked(TX);
            }
            if off == buf.len() {
                return Ok(off);
            }
            if ctx.nonblocking {
                if ctx.check_peer && matches!(liveness(ctx.tcp), Liveness::Gone | Liveness::Reset) {
                    self.peer_gone = true;
                }
                return if off > 0 { Ok(off) } else { Err(would_block()) };
            }
            match self.wait_tx(ctx) {
                Ok(()) => {}
                // A call that moved bytes reports them (EINTR, timeout).
                Err(_) if off > 0 => return Ok(off),
                Err(e) => return Err(e),
            }
        }
    }

    fn shutdown_write(&mut self, _ctx: &Ctx<'_>) -> io::Result<()> {
        if !self.shut_wr {
            self.shut_wr = true;
            // Release: every post before is visible with the mark.
            self.map
                .u32_at(qhdr::TX_FLAGS)
                .fetch_or(FLAG_EOS, Ordering::Release);
            self.kick();
        }
        Ok(())
    }

    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if !layout::let_go(&self.map, self.side as usize) {
            // Another process (a child, a process it was passed to) still
            // holds this end: devd keeps it while any process holds the
            // socket.
            if let Some(s) = &self.session {
                let _ = s.post(&Request::Leave {
                    conn_id: self.conn_id,
                    side: self.side,
                });
            }
            return;
        }
        if !self.shut_wr && !self.broken {
            self.shut_wr = true;
            self.map
                .u32_at(qhdr::TX_FLAGS)
                .fetch_or(FLAG_EOS, Ordering::Release);
            self.kick();
        }
        if let Some(s) = &self.session {
            let _ = s.post(&Request::Release {
                conn_id: self.conn_id,
                side: self.side,
                park: false,
            });
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.close();
    }
}
