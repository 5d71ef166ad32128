//! Safe handles over libibverbs (`sys.rs`): a device's context with its
//! protection domain and the port and GID a link uses, memory regions of
//! our own memory, a completion queue with its channel (the fd an engine
//! sleeps on), and reliable-connected queue pairs that RDMA-write, with an
//! immediate as the doorbell.
//!
//! Never here: a handle used after its destroy (each owns its object and
//! keeps what it was made from alive), memory registered that this code
//! does not own for as long as the registration lives.

#![allow(unsafe_code)]

use super::sys::{self, IbvGid, IbvQpAttr, IbvWc, Lib};
use ssock_rings::shm::Mapping;
use std::ffi::{c_int, c_void, CStr};
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::ptr;
use std::sync::Arc;

fn err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("verbs: {what}: {e}"))
}

/// A call that returns its error number (the ops table's posts).
fn returned(r: c_int, what: &str) -> io::Result<()> {
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::from_raw_os_error(r);
    Err(io::Error::new(e.kind(), format!("verbs: {what}: {e}")))
}

/// Calls `f` with each RDMA device this host has and its name, until it
/// returns Some (the list is freed after).
fn each_device<T>(
    lib: &'static Lib,
    mut f: impl FnMut(*mut sys::IbvDevice, &CStr) -> Option<T>,
) -> io::Result<Option<T>> {
    let mut n: c_int = 0;
    // SAFETY: n is a valid out-pointer; the list is freed below.
    let list = unsafe { (lib.get_device_list)(&mut n) };
    if list.is_null() {
        return Err(err("ibv_get_device_list"));
    }
    let mut found = None;
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: list holds n device pointers (ibv_get_device_list).
        let d = unsafe { *list.add(i) };
        // SAFETY: d is a device of the list, alive until it is freed; its
        // name is a NUL-terminated string in it.
        let name = unsafe { CStr::from_ptr((lib.get_device_name)(d)) };
        found = f(d, name);
        if found.is_some() {
            break;
        }
    }
    // SAFETY: list came from ibv_get_device_list and is freed once; `f`
    // kept no device pointer (an opened context does not need the list).
    unsafe { (lib.free_device_list)(list) };
    Ok(found)
}

/// The names of the RDMA devices this host has (none without
/// libibverbs).
pub fn devices() -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    each_device::<()>(sys::lib()?, |_, name| {
        names.push(name.to_string_lossy().into_owned());
        None
    })?;
    Ok(names)
}

/// An open device: its context and a protection domain, and the port and
/// GID index its links use.
pub struct Context {
    lib: &'static Lib,
    ctx: *mut sys::IbvContext,
    pd: *mut sys::IbvPd,
    port: u8,
    gid_index: u8,
    gid: IbvGid,
    mtu: u32,
}

// SAFETY: libibverbs objects may be used from any thread (the library
// locks what it shares); this handle is moved to the engine's thread and
// used there only.
unsafe impl Send for Context {}
// SAFETY: see Send: the calls made through a shared reference (region
// registration, queue creation) are thread-safe in libibverbs.
unsafe impl Sync for Context {}

impl Context {
    /// Opens device `name` (None: the first), for port `port` and GID
    /// index `gid_index` (RoCE: the one of the interface's address).
    pub fn open(name: Option<&str>, port: u8, gid_index: u8) -> io::Result<Arc<Context>> {
        let lib = sys::lib()?;
        let opened = each_device(lib, |d, dn| {
            if name.is_some_and(|w| dn.to_bytes() != w.as_bytes()) {
                return None;
            }
            // SAFETY: d is a device of the list, still alive.
            let ctx = unsafe { (lib.open_device)(d) };
            Some(if ctx.is_null() {
                Err(err("ibv_open_device"))
            } else {
                Ok(ctx)
            })
        })?;
        let ctx = match opened {
            Some(r) => r?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("verbs: no RDMA device {}", name.unwrap_or("at all")),
                ))
            }
        };
        let mut c = Context {
            lib,
            ctx,
            pd: ptr::null_mut(),
            port,
            gid_index,
            gid: IbvGid::default(),
            mtu: 0,
        };
        // SAFETY: ctx is the context opened above, owned by c.
        c.pd = unsafe { (lib.alloc_pd)(ctx) };
        if c.pd.is_null() {
            return Err(err("ibv_alloc_pd"));
        }
        let mut pa = sys::IbvPortAttr::default();
        // SAFETY: pa is a zeroed ibv_port_attr, which starts with the
        // compat layout the exported function fills.
        if unsafe { (lib.query_port)(ctx, port, &mut pa) } != 0 {
            return Err(err("ibv_query_port"));
        }
        if pa.state != sys::IBV_PORT_ACTIVE {
            return Err(io::Error::other(format!(
                "verbs: port {port} is not active (state {})",
                pa.state
            )));
        }
        c.mtu = pa.active_mtu;
        // SAFETY: c.gid is a valid out-pointer for one GID.
        if unsafe { (lib.query_gid)(ctx, port, c_int::from(gid_index), &mut c.gid) } != 0 {
            return Err(err("ibv_query_gid"));
        }
        Ok(Arc::new(c))
    }

    /// This port's GID at the configured index.
    pub fn gid(&self) -> [u8; 16] {
        self.gid.raw
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: pd and ctx are this handle's; every object made from
        // them holds an Arc of it, so none is left.
        unsafe {
            if !self.pd.is_null() {
                (self.lib.dealloc_pd)(self.pd);
            }
            (self.lib.close_device)(self.ctx);
        }
    }
}

/// Our own memory (`map`), registered with the device for local access
/// and, with `remote`, for the peer's RDMA writes.
pub struct Region {
    ctx: Arc<Context>,
    mr: *mut sys::IbvMr,
    map: Mapping,
}

// SAFETY: see Context; the memory is a Mapping, Send and Sync itself.
unsafe impl Send for Region {}
// SAFETY: see Send.
unsafe impl Sync for Region {}

impl Region {
    /// Registers all of `map` (which the region keeps for as long as the
    /// registration lives).
    pub fn new(ctx: &Arc<Context>, map: Mapping, remote: bool) -> io::Result<Region> {
        let mut access = sys::IBV_ACCESS_LOCAL_WRITE;
        if remote {
            access |= sys::IBV_ACCESS_REMOTE_WRITE;
        }
        // SAFETY: the memory is map's, alive and owned by the Region
        // until after the deregistration in drop.
        let mr =
            unsafe { (ctx.lib.reg_mr)(ctx.pd, map.addr().cast::<c_void>(), map.len(), access) };
        if mr.is_null() {
            return Err(err("ibv_reg_mr"));
        }
        Ok(Region {
            ctx: ctx.clone(),
            mr,
            map,
        })
    }

    /// The memory.
    pub fn map(&self) -> &Mapping {
        &self.map
    }

    /// The key for local access and the one the peer writes with.
    pub fn keys(&self) -> (u32, u32) {
        // SAFETY: mr is this region's, alive until drop.
        unsafe { ((*self.mr).lkey, (*self.mr).rkey) }
    }

    /// The address the peer names to write here.
    pub fn addr(&self) -> u64 {
        self.map.addr() as u64
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: mr is this region's; no queue pair posts from it after
        // its owner dropped it (they are dropped first by their owners).
        unsafe { (self.ctx.lib.dereg_mr)(self.mr) };
    }
}

/// A completion queue and the channel that signals it (its fd readable
/// once a completion came after `arm`).
pub struct Cq {
    ctx: Arc<Context>,
    channel: *mut sys::IbvCompChannel,
    cq: *mut sys::IbvCq,
    poll: sys::PollCq,
    notify: sys::ReqNotifyCq,
}

// SAFETY: see Context.
unsafe impl Send for Cq {}

impl Cq {
    /// A queue of `entries` completions with its own channel (its fd
    /// nonblocking).
    pub fn new(ctx: &Arc<Context>, entries: u32) -> io::Result<Cq> {
        let lib = ctx.lib;
        // SAFETY: ctx.ctx is a live context.
        let (poll, notify) = unsafe {
            (
                sys::op::<sys::PollCq>(ctx.ctx, sys::OPS_POLL_CQ),
                sys::op::<sys::ReqNotifyCq>(ctx.ctx, sys::OPS_REQ_NOTIFY_CQ),
            )
        };
        let (Some(poll), Some(notify)) = (poll, notify) else {
            return Err(io::Error::other("verbs: the provider has no poll_cq"));
        };
        // SAFETY: ctx.ctx is a live context.
        let channel = unsafe { (lib.create_comp_channel)(ctx.ctx) };
        if channel.is_null() {
            return Err(err("ibv_create_comp_channel"));
        }
        let n = c_int::try_from(entries).unwrap_or(c_int::MAX);
        // SAFETY: channel was made above from the same context.
        let cq = unsafe { (lib.create_cq)(ctx.ctx, n, ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            let e = err("ibv_create_cq");
            // SAFETY: channel is unused and destroyed once.
            unsafe { (lib.destroy_comp_channel)(channel) };
            return Err(e);
        }
        let q = Cq {
            ctx: ctx.clone(),
            channel,
            cq,
            poll,
            notify,
        };
        ssock_rings::sys::set_nonblocking(q.fd(), true)?;
        Ok(q)
    }

    fn fd_raw(&self) -> RawFd {
        // SAFETY: channel is this queue's, alive until drop.
        unsafe { (*self.channel).fd }
    }

    /// The channel's fd: readable once a completion came after `arm`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is the channel's, open until the channel is
        // destroyed in drop, after every borrow of self ended.
        unsafe { BorrowedFd::borrow_raw(self.fd_raw()) }
    }

    /// Asks for the channel's event at the next completion.
    pub fn arm(&self) -> io::Result<()> {
        // SAFETY: cq is this queue's; notify is its context's entry.
        if unsafe { (self.notify)(self.cq, 0) } != 0 {
            return Err(err("ibv_req_notify_cq"));
        }
        Ok(())
    }

    /// Takes the channel's events (none waiting: nothing to do) and
    /// acknowledges them.
    pub fn take_events(&self) {
        let mut n = 0;
        loop {
            let mut cq = ptr::null_mut();
            let mut cq_ctx = ptr::null_mut();
            // SAFETY: channel is this queue's; the out-pointers are valid.
            // The fd is nonblocking: no event, -1 at once.
            if unsafe { (self.ctx.lib.get_cq_event)(self.channel, &mut cq, &mut cq_ctx) } != 0 {
                break;
            }
            n += 1;
        }
        if n > 0 {
            // SAFETY: cq is this queue's, the only one on its channel.
            unsafe { (self.ctx.lib.ack_cq_events)(self.cq, n) };
        }
    }

    /// Completions into `wc`: how many.
    pub fn poll(&self, wc: &mut [IbvWc]) -> io::Result<usize> {
        let n = c_int::try_from(wc.len()).unwrap_or(c_int::MAX);
        // SAFETY: wc has room for n completions; cq is this queue's.
        let got = unsafe { (self.poll)(self.cq, n, wc.as_mut_ptr()) };
        usize::try_from(got).map_err(|_| io::Error::other("verbs: ibv_poll_cq failed"))
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        self.take_events();
        // SAFETY: cq and channel are this queue's; queue pairs on it are
        // dropped before it by their owner.
        unsafe {
            (self.ctx.lib.destroy_cq)(self.cq);
            (self.ctx.lib.destroy_comp_channel)(self.channel);
        }
    }
}

/// What the other side needs to reach a queue pair and a region: sent
/// over the peers' control connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    /// The region the peer may write: where, its key, its size.
    pub addr: u64,
    pub rkey: u32,
    pub len: u64,
}

/// Bytes a write may carry inline (copied into the request when it is
/// posted, so the source may change at once after).
pub const MAX_INLINE: usize = 320;

/// A reliable-connected queue pair on `cq` (sends and receives). It must
/// be dropped before its `Cq`.
pub struct Qp {
    ctx: Arc<Context>,
    qp: *mut sys::IbvQp,
    post_send: sys::PostSend,
    post_recv: sys::PostRecv,
    psn: u32,
}

// SAFETY: see Context.
unsafe impl Send for Qp {}

impl Qp {
    /// A new queue pair with room for `depth` sends and receives.
    pub fn new(ctx: &Arc<Context>, cq: &Cq, depth: u32) -> io::Result<Qp> {
        // SAFETY: ctx.ctx is a live context.
        let (ps, pr) = unsafe {
            (
                sys::op::<sys::PostSend>(ctx.ctx, sys::OPS_POST_SEND),
                sys::op::<sys::PostRecv>(ctx.ctx, sys::OPS_POST_RECV),
            )
        };
        let (Some(post_send), Some(post_recv)) = (ps, pr) else {
            return Err(io::Error::other("verbs: the provider has no post_send"));
        };
        let mut init = sys::IbvQpInitAttr {
            qp_context: ptr::null_mut(),
            send_cq: cq.cq,
            recv_cq: cq.cq,
            srq: ptr::null_mut(),
            cap: sys::IbvQpCap {
                max_send_wr: depth,
                max_recv_wr: depth,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: u32::try_from(MAX_INLINE).unwrap_or(0),
            },
            qp_type: sys::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the pd and cq are live objects of the same context; init
        // is a valid ibv_qp_init_attr.
        let qp = unsafe { (ctx.lib.create_qp)(ctx.pd, &mut init) };
        if qp.is_null() {
            return Err(err("ibv_create_qp"));
        }
        let mut b = [0u8; 4];
        ssock_rings::sys::random(&mut b)?;
        Ok(Qp {
            ctx: ctx.clone(),
            qp,
            post_send,
            post_recv,
            psn: u32::from_le_bytes(b) & 0x00ff_ffff,
        })
    }

    /// Where the peer reaches this queue pair, and `region` to write.
    pub fn endpoint(&self, region: &Region) -> Endpoint {
        Endpoint {
            // SAFETY: qp is this handle's, alive until drop.
            qpn: unsafe { (*self.qp).qp_num },
            psn: self.psn,
            gid: self.ctx.gid(),
            addr: region.addr(),
            rkey: region.keys().1,
            len: region.map().len() as u64,
        }
    }

    fn modify(&self, attr: &mut IbvQpAttr, mask: c_int, what: &str) -> io::Result<()> {
        // SAFETY: qp is this handle's; attr is a valid ibv_qp_attr.
        if unsafe { (self.ctx.lib.modify_qp)(self.qp, attr, mask) } != 0 {
            return Err(err(what));
        }
        Ok(())
    }

    /// Takes the queue pair back to its reset state (what was posted is
    /// dropped; a provider may leave completions already made on the
    /// queue: the caller takes them) with a new starting packet number: `connect` again with the peer's new
    /// endpoint, after the peer reset its own.
    pub fn reset(&mut self) -> io::Result<()> {
        let mut a = IbvQpAttr {
            qp_state: sys::IBV_QPS_RESET,
            ..Default::default()
        };
        self.modify(&mut a, sys::IBV_QP_STATE, "ibv_modify_qp to RESET")?;
        let mut b = [0u8; 4];
        ssock_rings::sys::random(&mut b)?;
        self.psn = u32::from_le_bytes(b) & 0x00ff_ffff;
        Ok(())
    }

    /// Connects to the peer's queue pair: INIT, RTR, RTS.
    pub fn connect(&self, peer: &Endpoint) -> io::Result<()> {
        let mut a = IbvQpAttr {
            qp_state: sys::IBV_QPS_INIT,
            port_num: self.ctx.port,
            qp_access_flags: u32::try_from(sys::IBV_ACCESS_REMOTE_WRITE).unwrap_or(0),
            ..Default::default()
        };
        self.modify(
            &mut a,
            sys::IBV_QP_STATE
                | sys::IBV_QP_PKEY_INDEX
                | sys::IBV_QP_PORT
                | sys::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp to INIT",
        )?;
        let mut a = IbvQpAttr {
            qp_state: sys::IBV_QPS_RTR,
            path_mtu: self.ctx.mtu,
            dest_qp_num: peer.qpn,
            rq_psn: peer.psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ..Default::default()
        };
        a.ah_attr.is_global = 1;
        a.ah_attr.grh.dgid = IbvGid { raw: peer.gid };
        a.ah_attr.grh.sgid_index = self.ctx.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.port_num = self.ctx.port;
        self.modify(
            &mut a,
            sys::IBV_QP_STATE
                | sys::IBV_QP_AV
                | sys::IBV_QP_PATH_MTU
                | sys::IBV_QP_DEST_QPN
                | sys::IBV_QP_RQ_PSN
                | sys::IBV_QP_MAX_DEST_RD_ATOMIC
                | sys::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp to RTR",
        )?;
        let mut a = IbvQpAttr {
            qp_state: sys::IBV_QPS_RTS,
            sq_psn: self.psn,
            timeout: 14,
            // (7 would be retried for ever on rxe: a peer whose queue pair is
            // gone must fail the link.)
            retry_cnt: 6,
            rnr_retry: 7,
            max_rd_atomic: 1,
            ..Default::default()
        };
        self.modify(
            &mut a,
            sys::IBV_QP_STATE
                | sys::IBV_QP_SQ_PSN
                | sys::IBV_QP_TIMEOUT
                | sys::IBV_QP_RETRY_CNT
                | sys::IBV_QP_RNR_RETRY
                | sys::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp to RTS",
        )
    }

    /// RDMA-writes `len` bytes of `src` from `off` into the peer's region
    /// at `at` (checked against `peer.len`), with `imm` (Some: the peer's
    /// receive completes with it, its doorbell). `wr_id` names it in this
    /// side's completion if `signaled`. The device reads the source when
    /// it runs the request, later: those bytes must not change until a
    /// completion at or after it came, unless `inline` (at most
    /// `MAX_INLINE` bytes, copied at once).
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        src: &Region,
        off: usize,
        len: usize,
        peer: &Endpoint,
        at: u64,
        imm: Option<u32>,
        signaled: bool,
        inline: bool,
        wr_id: u64,
    ) -> io::Result<()> {
        if inline && len > MAX_INLINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "verbs: too long to go inline",
            ));
        }
        let end = off.checked_add(len).filter(|&e| e <= src.map().len());
        let pend = at.checked_add(len as u64).filter(|&e| e <= peer.len);
        if end.is_none() || pend.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "verbs: write beyond a region",
            ));
        }
        let mut sge = sys::IbvSge {
            addr: src.addr() + off as u64,
            length: u32::try_from(len).map_err(|_| io::Error::other("verbs: write too large"))?,
            lkey: src.keys().0,
        };
        let mut wr = sys::IbvSendWr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: i32::from(len > 0),
            opcode: if imm.is_some() {
                sys::IBV_WR_RDMA_WRITE_WITH_IMM
            } else {
                sys::IBV_WR_RDMA_WRITE
            },
            send_flags: if signaled { sys::IBV_SEND_SIGNALED } else { 0 }
                | if inline { sys::IBV_SEND_INLINE } else { 0 },
            imm_data: imm.unwrap_or(0).to_be(),
            remote_addr: peer.addr + at,
            rkey: peer.rkey,
            wr_rest: [0; 5],
            tail: [0; 7],
        };
        let mut bad = ptr::null_mut();
        // SAFETY: qp is this handle's; wr and sge live across the call
        // (the provider copies the request, and an inline one's bytes,
        // before it returns); the bytes are src's, registered, in its
        // bounds (checked above), and src outlives the request (its owner
        // drops the queue pair first).
        let r = unsafe { (self.post_send)(self.qp, &mut wr, &mut bad) };
        returned(r, "ibv_post_send")
    }

    /// Posts a receive with no buffer (what an RDMA write with immediate
    /// consumes), named `wr_id` in its completion.
    pub fn post_recv(&self, wr_id: u64) -> io::Result<()> {
        let mut wr = sys::IbvRecvWr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: ptr::null_mut(),
            num_sge: 0,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: qp is this handle's; wr lives across the call.
        let r = unsafe { (self.post_recv)(self.qp, &mut wr, &mut bad) };
        returned(r, "ibv_post_recv")
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: qp is this handle's, destroyed once.
        unsafe { (self.ctx.lib.destroy_qp)(self.qp) };
    }
}
