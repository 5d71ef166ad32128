//! libibverbs through `dlopen` (no build-time dependency: devd starts on a
//! host without rdma-core and says so when a config asks for verbs): the
//! library's exported functions, the ones verbs.h inlines through the
//! context's ops table (poll_cq, req_notify_cq, post_send, post_recv), and
//! the structures the backend builds or reads, laid out as
//! `<infiniband/verbs.h>` lays them out on x86_64 (checked against the
//! header by `tests.rs` where a C compiler and the header are there).
//!
//! Never here: policy, a call on an object after its destroy, a structure
//! read beyond the prefix the header guarantees.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::io;
use std::sync::OnceLock;

/// Opaque library objects.
#[repr(C)]
pub struct IbvDevice {
    _private: [u8; 0],
}
#[repr(C)]
pub struct IbvPd {
    _private: [u8; 0],
}

/// The prefix of `struct ibv_context`: the device, the ops table (of
/// which `OPS_*` index the entries used here), then the command fd the
/// provider writes its commands to.
#[repr(C)]
pub struct IbvContext {
    pub device: *mut IbvDevice,
    pub ops: [*const c_void; OPS_ALL],
    pub cmd_fd: c_int,
}
/// Entries of `struct ibv_context_ops` (the probe test checks where
/// `cmd_fd` follows them).
pub const OPS_ALL: usize = 32;
pub const OPS_POLL_CQ: usize = 11;
pub const OPS_REQ_NOTIFY_CQ: usize = 12;
pub const OPS_POST_SEND: usize = 25;
pub const OPS_POST_RECV: usize = 26;

/// The prefix of `struct ibv_mr`.
#[repr(C)]
pub struct IbvMr {
    pub context: *mut IbvContext,
    pub pd: *mut IbvPd,
    pub addr: *mut c_void,
    pub length: usize,
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
}

/// The prefix of `struct ibv_comp_channel`.
#[repr(C)]
pub struct IbvCompChannel {
    pub context: *mut IbvContext,
    pub fd: c_int,
    pub refcnt: c_int,
}

/// The prefix of `struct ibv_cq`.
#[repr(C)]
pub struct IbvCq {
    pub context: *mut IbvContext,
    pub channel: *mut IbvCompChannel,
    pub cq_context: *mut c_void,
    pub handle: u32,
    pub cqe: c_int,
}

/// The prefix of `struct ibv_qp`.
#[repr(C)]
pub struct IbvQp {
    pub context: *mut IbvContext,
    pub qp_context: *mut c_void,
    pub pd: *mut IbvPd,
    pub send_cq: *mut IbvCq,
    pub recv_cq: *mut IbvCq,
    pub srq: *mut c_void,
    pub handle: u32,
    pub qp_num: u32,
    pub state: c_uint,
    pub qp_type: c_uint,
}

/// `union ibv_gid` (16 bytes, aligned as its 64-bit member).
#[repr(C, align(8))]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct IbvGid {
    pub raw: [u8; 16],
}

/// `struct ibv_wc`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvWc {
    pub wr_id: u64,
    pub status: c_uint,
    pub opcode: c_uint,
    pub vendor_err: u32,
    pub byte_len: u32,
    /// imm_data (big-endian on the wire) or invalidated_rkey.
    pub imm_data: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: c_uint,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}

/// `struct ibv_sge`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvSge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// `struct ibv_send_wr`, with its `wr` union as the `rdma` member and the
/// unions after it as words.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IbvSendWr {
    pub wr_id: u64,
    pub next: *mut IbvSendWr,
    pub sg_list: *mut IbvSge,
    pub num_sge: c_int,
    pub opcode: c_uint,
    pub send_flags: c_uint,
    /// imm_data, big-endian.
    pub imm_data: u32,
    pub remote_addr: u64,
    pub rkey: u32,
    /// The rest of the `wr` union (its atomic member is the largest).
    pub wr_rest: [u32; 5],
    /// The `qp_type` union, then the bind_mw/tso union.
    pub tail: [u64; 7],
}

/// `struct ibv_recv_wr`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IbvRecvWr {
    pub wr_id: u64,
    pub next: *mut IbvRecvWr,
    pub sg_list: *mut IbvSge,
    pub num_sge: c_int,
}

/// `struct ibv_qp_cap`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvQpCap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// `struct ibv_qp_init_attr`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IbvQpInitAttr {
    pub qp_context: *mut c_void,
    pub send_cq: *mut IbvCq,
    pub recv_cq: *mut IbvCq,
    pub srq: *mut c_void,
    pub cap: IbvQpCap,
    pub qp_type: c_uint,
    pub sq_sig_all: c_int,
}

/// `struct ibv_global_route`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvGlobalRoute {
    pub dgid: IbvGid,
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
}

/// `struct ibv_ah_attr`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvAhAttr {
    pub grh: IbvGlobalRoute,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
}

/// `struct ibv_qp_attr`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvQpAttr {
    pub qp_state: c_uint,
    pub cur_qp_state: c_uint,
    pub path_mtu: c_uint,
    pub path_mig_state: c_uint,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: c_uint,
    pub cap: IbvQpCap,
    pub ah_attr: IbvAhAttr,
    pub alt_ah_attr: IbvAhAttr,
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
    pub rate_limit: u32,
}

/// `struct ibv_port_attr` (what the exported `ibv_query_port` fills: the
/// header's compat prefix, the rest left zero).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IbvPortAttr {
    pub state: c_uint,
    pub max_mtu: c_uint,
    pub active_mtu: c_uint,
    pub gid_tbl_len: c_int,
    pub port_cap_flags: u32,
    pub max_msg_sz: u32,
    pub bad_pkey_cntr: u32,
    pub qkey_viol_cntr: u32,
    pub pkey_tbl_len: u16,
    pub lid: u16,
    pub sm_lid: u16,
    pub lmc: u8,
    pub max_vl_num: u8,
    pub sm_sl: u8,
    pub subnet_timeout: u8,
    pub init_type_reply: u8,
    pub active_width: u8,
    pub active_speed: u8,
    pub phys_state: u8,
    pub link_layer: u8,
    pub flags: u8,
    pub port_cap_flags2: u16,
}

// Constants of verbs.h used here.
pub const IBV_ACCESS_LOCAL_WRITE: c_int = 1;
pub const IBV_ACCESS_REMOTE_WRITE: c_int = 1 << 1;
pub const IBV_QPT_RC: c_uint = 2;
pub const IBV_QPS_RESET: c_uint = 0;
pub const IBV_QPS_INIT: c_uint = 1;
pub const IBV_QPS_RTR: c_uint = 2;
pub const IBV_QPS_RTS: c_uint = 3;
pub const IBV_QP_STATE: c_int = 1;
pub const IBV_QP_ACCESS_FLAGS: c_int = 1 << 3;
pub const IBV_QP_PKEY_INDEX: c_int = 1 << 4;
pub const IBV_QP_PORT: c_int = 1 << 5;
pub const IBV_QP_AV: c_int = 1 << 7;
pub const IBV_QP_PATH_MTU: c_int = 1 << 8;
pub const IBV_QP_TIMEOUT: c_int = 1 << 9;
pub const IBV_QP_RETRY_CNT: c_int = 1 << 10;
pub const IBV_QP_RNR_RETRY: c_int = 1 << 11;
pub const IBV_QP_RQ_PSN: c_int = 1 << 12;
pub const IBV_QP_MAX_QP_RD_ATOMIC: c_int = 1 << 13;
pub const IBV_QP_MIN_RNR_TIMER: c_int = 1 << 15;
pub const IBV_QP_SQ_PSN: c_int = 1 << 16;
pub const IBV_QP_MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
pub const IBV_QP_DEST_QPN: c_int = 1 << 20;
pub const IBV_WR_RDMA_WRITE: c_uint = 0;
pub const IBV_WR_RDMA_WRITE_WITH_IMM: c_uint = 1;
pub const IBV_SEND_SIGNALED: c_uint = 1 << 1;
pub const IBV_SEND_INLINE: c_uint = 1 << 3;
pub const IBV_WC_SUCCESS: c_uint = 0;
pub const IBV_WC_RDMA_WRITE: c_uint = 1;
pub const IBV_WC_RECV_RDMA_WITH_IMM: c_uint = 1 << 7 | 1;
pub const IBV_PORT_ACTIVE: c_uint = 4;

type GetDeviceList = unsafe extern "C" fn(*mut c_int) -> *mut *mut IbvDevice;
type FreeDeviceList = unsafe extern "C" fn(*mut *mut IbvDevice);
type GetDeviceName = unsafe extern "C" fn(*mut IbvDevice) -> *const c_char;
type OpenDevice = unsafe extern "C" fn(*mut IbvDevice) -> *mut IbvContext;
type CloseDevice = unsafe extern "C" fn(*mut IbvContext) -> c_int;
type QueryPort = unsafe extern "C" fn(*mut IbvContext, u8, *mut IbvPortAttr) -> c_int;
type QueryGid = unsafe extern "C" fn(*mut IbvContext, u8, c_int, *mut IbvGid) -> c_int;
type AllocPd = unsafe extern "C" fn(*mut IbvContext) -> *mut IbvPd;
type DeallocPd = unsafe extern "C" fn(*mut IbvPd) -> c_int;
type RegMr = unsafe extern "C" fn(*mut IbvPd, *mut c_void, usize, c_int) -> *mut IbvMr;
type DeregMr = unsafe extern "C" fn(*mut IbvMr) -> c_int;
type CreateCompChannel = unsafe extern "C" fn(*mut IbvContext) -> *mut IbvCompChannel;
type DestroyCompChannel = unsafe extern "C" fn(*mut IbvCompChannel) -> c_int;
type CreateCq = unsafe extern "C" fn(
    *mut IbvContext,
    c_int,
    *mut c_void,
    *mut IbvCompChannel,
    c_int,
) -> *mut IbvCq;
type DestroyCq = unsafe extern "C" fn(*mut IbvCq) -> c_int;
type GetCqEvent =
    unsafe extern "C" fn(*mut IbvCompChannel, *mut *mut IbvCq, *mut *mut c_void) -> c_int;
type AckCqEvents = unsafe extern "C" fn(*mut IbvCq, c_uint);
type CreateQp = unsafe extern "C" fn(*mut IbvPd, *mut IbvQpInitAttr) -> *mut IbvQp;
type ModifyQp = unsafe extern "C" fn(*mut IbvQp, *mut IbvQpAttr, c_int) -> c_int;
type DestroyQp = unsafe extern "C" fn(*mut IbvQp) -> c_int;
/// The ops table's entries.
pub type PollCq = unsafe extern "C" fn(*mut IbvCq, c_int, *mut IbvWc) -> c_int;
pub type ReqNotifyCq = unsafe extern "C" fn(*mut IbvCq, c_int) -> c_int;
pub type PostSend = unsafe extern "C" fn(*mut IbvQp, *mut IbvSendWr, *mut *mut IbvSendWr) -> c_int;
pub type PostRecv = unsafe extern "C" fn(*mut IbvQp, *mut IbvRecvWr, *mut *mut IbvRecvWr) -> c_int;

/// libibverbs' functions, resolved once.
pub struct Lib {
    pub get_device_list: GetDeviceList,
    pub free_device_list: FreeDeviceList,
    pub get_device_name: GetDeviceName,
    pub open_device: OpenDevice,
    pub close_device: CloseDevice,
    pub query_port: QueryPort,
    pub query_gid: QueryGid,
    pub alloc_pd: AllocPd,
    pub dealloc_pd: DeallocPd,
    pub reg_mr: RegMr,
    pub dereg_mr: DeregMr,
    pub create_comp_channel: CreateCompChannel,
    pub destroy_comp_channel: DestroyCompChannel,
    pub create_cq: CreateCq,
    pub destroy_cq: DestroyCq,
    pub get_cq_event: GetCqEvent,
    pub ack_cq_events: AckCqEvents,
    pub create_qp: CreateQp,
    pub modify_qp: ModifyQp,
    pub destroy_qp: DestroyQp,
}

/// The library's file name (its ABI's soname).
pub const SONAME: &CStr = c"libibverbs.so.1";

/// libibverbs, loaded at the first call (never unloaded), or why not.
pub fn lib() -> io::Result<&'static Lib> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load)
        .as_ref()
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.clone()))
}

fn load() -> Result<Lib, String> {
    // SAFETY: SONAME is a NUL-terminated string; dlopen of a library
    // runs its constructors, which libibverbs has for its providers'
    // registration only.
    let h = unsafe { libc::dlopen(SONAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(format!(
            "verbs: no {} (rdma-core's libibverbs1 package)",
            SONAME.to_string_lossy()
        ));
    }
    let sym = |name: &CStr| -> Result<*mut c_void, String> {
        // SAFETY: h is the handle dlopen returned above, never closed;
        // name is NUL-terminated.
        let p = unsafe { libc::dlsym(h, name.as_ptr()) };
        if p.is_null() {
            Err(format!(
                "verbs: libibverbs lacks {}",
                name.to_string_lossy()
            ))
        } else {
            Ok(p)
        }
    };
    macro_rules! f {
        ($name:literal, $ty:ty) => {{
            let p = sym($name)?;
            // SAFETY: the symbol is libibverbs' function of that name,
            // whose C prototype in verbs.h is the one `$ty` spells.
            unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
        }};
    }
    Ok(Lib {
        get_device_list: f!(c"ibv_get_device_list", GetDeviceList),
        free_device_list: f!(c"ibv_free_device_list", FreeDeviceList),
        get_device_name: f!(c"ibv_get_device_name", GetDeviceName),
        open_device: f!(c"ibv_open_device", OpenDevice),
        close_device: f!(c"ibv_close_device", CloseDevice),
        query_port: f!(c"ibv_query_port", QueryPort),
        query_gid: f!(c"ibv_query_gid", QueryGid),
        alloc_pd: f!(c"ibv_alloc_pd", AllocPd),
        dealloc_pd: f!(c"ibv_dealloc_pd", DeallocPd),
        reg_mr: f!(c"ibv_reg_mr", RegMr),
        dereg_mr: f!(c"ibv_dereg_mr", DeregMr),
        create_comp_channel: f!(c"ibv_create_comp_channel", CreateCompChannel),
        destroy_comp_channel: f!(c"ibv_destroy_comp_channel", DestroyCompChannel),
        create_cq: f!(c"ibv_create_cq", CreateCq),
        destroy_cq: f!(c"ibv_destroy_cq", DestroyCq),
        get_cq_event: f!(c"ibv_get_cq_event", GetCqEvent),
        ack_cq_events: f!(c"ibv_ack_cq_events", AckCqEvents),
        create_qp: f!(c"ibv_create_qp", CreateQp),
        modify_qp: f!(c"ibv_modify_qp", ModifyQp),
        destroy_qp: f!(c"ibv_destroy_qp", DestroyQp),
    })
}

/// RDMA_VERBS_IOCTL: `_IOWR(0x1b, 1, struct ib_uverbs_ioctl_hdr)`, the
/// ioctl through which newer providers send some commands.
pub const RDMA_VERBS_IOCTL: u64 = 0xc018_1b01;

/// The ops-table entry `i` of `ctx`, as a function of type `T`.
///
/// # Safety
/// `ctx` is a live context from `ibv_open_device`, `i` is one of the
/// `OPS_*` indices and `T` the function type verbs.h gives that entry.
pub unsafe fn op<T: Copy>(ctx: *mut IbvContext, i: usize) -> Option<T> {
    // SAFETY: by the caller, ctx points to a live ibv_context, whose ops
    // table has OPS_ALL entries after the device pointer, and i is one
    // of the OPS_* indices, below it.
    let p = unsafe { (*ctx).ops[i] };
    if p.is_null() {
        return None;
    }
    assert_eq!(
        std::mem::size_of::<T>(),
        std::mem::size_of::<*const c_void>()
    );
    // SAFETY: T is a function pointer type of the entry's prototype (by
    // the caller), the same size as the pointer read.
    Some(unsafe { std::mem::transmute_copy::<*const c_void, T>(&p) })
}
