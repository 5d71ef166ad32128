//! The structures against verbs.h (where a C compiler and the header are
//! there), then two queue pairs on one RDMA device (where there is one:
//! the QEMU lab's `verbs` step runs this in a guest with rdma_rxe, with
//! `SSOCK_VERBS_REQUIRED=1`, where a missing device fails).

use super::sys::*;
use super::window::{Setup, OFFER, SETUP_LEN};
use super::*;
use crate::ntb::window::Window as _;
use crate::Backend as _;
use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::time::{Duration, Instant};

/// Offsets and sizes in this crate's structures, named as the C probe
/// below prints them.
fn ours() -> Vec<(&'static str, usize)> {
    let ops = offset_of!(IbvContext, ops);
    vec![
        ("ctx.poll_cq", ops + 8 * OPS_POLL_CQ),
        ("ctx.req_notify_cq", ops + 8 * OPS_REQ_NOTIFY_CQ),
        ("ctx.post_send", ops + 8 * OPS_POST_SEND),
        ("ctx.post_recv", ops + 8 * OPS_POST_RECV),
        ("ctx.cmd_fd", offset_of!(IbvContext, cmd_fd)),
        ("mr.lkey", offset_of!(IbvMr, lkey)),
        ("mr.rkey", offset_of!(IbvMr, rkey)),
        ("channel.fd", offset_of!(IbvCompChannel, fd)),
        ("cq.context", offset_of!(IbvCq, context)),
        ("qp.context", offset_of!(IbvQp, context)),
        ("qp.qp_num", offset_of!(IbvQp, qp_num)),
        ("wc", size_of::<IbvWc>()),
        ("wc.byte_len", offset_of!(IbvWc, byte_len)),
        ("wc.imm_data", offset_of!(IbvWc, imm_data)),
        ("wc.wc_flags", offset_of!(IbvWc, wc_flags)),
        ("sge", size_of::<IbvSge>()),
        ("send_wr", size_of::<IbvSendWr>()),
        ("send_wr.opcode", offset_of!(IbvSendWr, opcode)),
        ("send_wr.send_flags", offset_of!(IbvSendWr, send_flags)),
        ("send_wr.imm_data", offset_of!(IbvSendWr, imm_data)),
        ("send_wr.remote_addr", offset_of!(IbvSendWr, remote_addr)),
        ("send_wr.rkey", offset_of!(IbvSendWr, rkey)),
        ("recv_wr", size_of::<IbvRecvWr>()),
        ("qp_init_attr", size_of::<IbvQpInitAttr>()),
        ("qp_init_attr.cap", offset_of!(IbvQpInitAttr, cap)),
        ("qp_init_attr.qp_type", offset_of!(IbvQpInitAttr, qp_type)),
        ("qp_attr", size_of::<IbvQpAttr>()),
        (
            "qp_attr.qp_access_flags",
            offset_of!(IbvQpAttr, qp_access_flags),
        ),
        ("qp_attr.ah_attr", offset_of!(IbvQpAttr, ah_attr)),
        ("qp_attr.pkey_index", offset_of!(IbvQpAttr, pkey_index)),
        (
            "qp_attr.max_rd_atomic",
            offset_of!(IbvQpAttr, max_rd_atomic),
        ),
        ("qp_attr.port_num", offset_of!(IbvQpAttr, port_num)),
        ("qp_attr.rnr_retry", offset_of!(IbvQpAttr, rnr_retry)),
        ("qp_attr.rate_limit", offset_of!(IbvQpAttr, rate_limit)),
        ("ah_attr", size_of::<IbvAhAttr>()),
        ("ah_attr.dlid", offset_of!(IbvAhAttr, dlid)),
        ("ah_attr.is_global", offset_of!(IbvAhAttr, is_global)),
        ("ah_attr.port_num", offset_of!(IbvAhAttr, port_num)),
        ("grh.sgid_index", offset_of!(IbvGlobalRoute, sgid_index)),
        ("port_attr.active_mtu", offset_of!(IbvPortAttr, active_mtu)),
        ("port_attr.link_layer", offset_of!(IbvPortAttr, link_layer)),
    ]
}

const PROBE: &str = r#"
#include <stddef.h>
#include <stdio.h>
#include <infiniband/verbs.h>
#define O(n, s, f) printf("%s %zu\n", n, offsetof(struct s, f))
#define S(n, s) printf("%s %zu\n", n, sizeof(struct s))
int main(void) {
  O("ctx.poll_cq", ibv_context, ops.poll_cq);
  O("ctx.req_notify_cq", ibv_context, ops.req_notify_cq);
  O("ctx.post_send", ibv_context, ops.post_send);
  O("ctx.post_recv", ibv_context, ops.post_recv);
  O("ctx.cmd_fd", ibv_context, cmd_fd);
  O("mr.lkey", ibv_mr, lkey);
  O("mr.rkey", ibv_mr, rkey);
  O("channel.fd", ibv_comp_channel, fd);
  O("cq.context", ibv_cq, context);
  O("qp.context", ibv_qp, context);
  O("qp.qp_num", ibv_qp, qp_num);
  S("wc", ibv_wc);
  O("wc.byte_len", ibv_wc, byte_len);
  O("wc.imm_data", ibv_wc, imm_data);
  O("wc.wc_flags", ibv_wc, wc_flags);
  S("sge", ibv_sge);
  S("send_wr", ibv_send_wr);
  O("send_wr.opcode", ibv_send_wr, opcode);
  O("send_wr.send_flags", ibv_send_wr, send_flags);
  O("send_wr.imm_data", ibv_send_wr, imm_data);
  O("send_wr.remote_addr", ibv_send_wr, wr.rdma.remote_addr);
  O("send_wr.rkey", ibv_send_wr, wr.rdma.rkey);
  S("recv_wr", ibv_recv_wr);
  S("qp_init_attr", ibv_qp_init_attr);
  O("qp_init_attr.cap", ibv_qp_init_attr, cap);
  O("qp_init_attr.qp_type", ibv_qp_init_attr, qp_type);
  S("qp_attr", ibv_qp_attr);
  O("qp_attr.qp_access_flags", ibv_qp_attr, qp_access_flags);
  O("qp_attr.ah_attr", ibv_qp_attr, ah_attr);
  O("qp_attr.pkey_index", ibv_qp_attr, pkey_index);
  O("qp_attr.max_rd_atomic", ibv_qp_attr, max_rd_atomic);
  O("qp_attr.port_num", ibv_qp_attr, port_num);
  O("qp_attr.rnr_retry", ibv_qp_attr, rnr_retry);
  O("qp_attr.rate_limit", ibv_qp_attr, rate_limit);
  S("ah_attr", ibv_ah_attr);
  O("ah_attr.dlid", ibv_ah_attr, dlid);
  O("ah_attr.is_global", ibv_ah_attr, is_global);
  O("ah_attr.port_num", ibv_ah_attr, port_num);
  O("grh.sgid_index", ibv_global_route, sgid_index);
  O("port_attr.active_mtu", ibv_port_attr, active_mtu);
  O("port_attr.link_layer", ibv_port_attr, link_layer);
  printf("WR_RDMA_WRITE_WITH_IMM %d\n", IBV_WR_RDMA_WRITE_WITH_IMM);
  printf("WC_RECV_RDMA_WITH_IMM %d\n", IBV_WC_RECV_RDMA_WITH_IMM);
  printf("QP_DEST_QPN %d\n", IBV_QP_DEST_QPN);
  printf("QP_MAX_DEST_RD_ATOMIC %d\n", IBV_QP_MAX_DEST_RD_ATOMIC);
  return 0;
}
"#;

#[test]
fn the_structures_are_laid_out_as_verbs_h_lays_them_out() {
    let header = std::path::Path::new("/usr/include/infiniband/verbs.h");
    let cc = std::process::Command::new("cc").arg("--version").output();
    if !header.exists() || !cc.is_ok_and(|o| o.status.success()) {
        let why = "no verbs.h or no C compiler (Debian: libibverbs-dev, gcc)";
        assert!(
            std::env::var("SSOCK_REQUIRE_APPS").as_deref() != Ok("1"),
            "required (SSOCK_REQUIRE_APPS=1): {why}"
        );
        eprintln!("SKIP: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ssock-verbs-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, bin) = (dir.join("probe.c"), dir.join("probe"));
    std::fs::write(&src, PROBE).unwrap();
    let st = std::process::Command::new("cc")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "the probe did not compile");
    let out = std::process::Command::new(&bin).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8(out.stdout).unwrap();
    let c: HashMap<&str, usize> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    for (name, v) in ours() {
        assert_eq!(c.get(name), Some(&v), "{name}");
    }
    for (name, v) in [
        (
            "WR_RDMA_WRITE_WITH_IMM",
            IBV_WR_RDMA_WRITE_WITH_IMM as usize,
        ),
        ("WC_RECV_RDMA_WITH_IMM", IBV_WC_RECV_RDMA_WITH_IMM as usize),
        ("QP_DEST_QPN", IBV_QP_DEST_QPN as usize),
        ("QP_MAX_DEST_RD_ATOMIC", IBV_QP_MAX_DEST_RD_ATOMIC as usize),
    ] {
        assert_eq!(c.get(name), Some(&v), "{name}");
    }
}

/// The device the test uses: `SSOCK_VERBS_DEVICE`, else the first; None
/// (SKIP) without one, unless `SSOCK_VERBS_REQUIRED=1`.
fn device() -> Option<Arc<Context>> {
    let required = std::env::var("SSOCK_VERBS_REQUIRED").is_ok_and(|v| v == "1");
    let name = std::env::var("SSOCK_VERBS_DEVICE").ok();
    match Context::open(name.as_deref(), 1, 1) {
        Ok(c) => Some(c),
        Err(e) if !required => {
            eprintln!("SKIP: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

use std::sync::Arc;

/// A region of `len` bytes of our own memory (a sealed memfd mapped),
/// registered with `ctx` (`remote`: the peer may write it).
fn region(ctx: &Arc<Context>, len: usize, remote: bool) -> std::io::Result<Region> {
    let fd = ssock_rings::sys::memfd_sealed("ssock-verbs-test", len)?;
    let map = ssock_rings::shm::Mapping::map(std::os::fd::AsFd::as_fd(&fd), len, true)?;
    Region::new(ctx, map, remote)
}

/// Waits up to 10 s for `n` completions on `cq`.
fn completions(cq: &Cq, n: usize) -> Vec<IbvWc> {
    let t = Instant::now();
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} of {n} completions",
            got.len()
        );
        let mut wc = [IbvWc::default(); 8];
        let k = cq.poll(&mut wc).unwrap();
        got.extend_from_slice(&wc[..k]);
    }
    got
}

#[test]
fn two_queue_pairs_on_one_device_write_into_each_others_region_and_ring_with_the_immediate() {
    let Some(ctx) = device() else {
        return;
    };
    let (cq_a, cq_b) = (Cq::new(&ctx, 64).unwrap(), Cq::new(&ctx, 64).unwrap());
    let (qa, qb) = (
        Qp::new(&ctx, &cq_a, 32).unwrap(),
        Qp::new(&ctx, &cq_b, 32).unwrap(),
    );
    let (ra, rb) = (
        region(&ctx, 1 << 20, true).unwrap(),
        region(&ctx, 1 << 20, true).unwrap(),
    );
    let (ea, eb) = (qa.endpoint(&ra), qb.endpoint(&rb));
    qa.connect(&eb).unwrap();
    qb.connect(&ea).unwrap();
    qb.post_recv(7).unwrap();
    cq_b.arm().unwrap();
    // 200 KB from a's region at 1000 into b's at 5000, then the doorbell.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 251) as u8).collect();
    ra.map().write_bytes(1000, &data);
    qa.write(&ra, 1000, data.len(), &eb, 5000, None, false, false, 1)
        .unwrap();
    qa.write(&ra, 0, 0, &eb, 0, Some(0xfeed_beef), true, false, 2)
        .unwrap();
    let sent = completions(&cq_a, 1);
    assert_eq!(
        (sent[0].status, sent[0].wr_id),
        (IBV_WC_SUCCESS, 2),
        "{sent:?}"
    );
    let got = completions(&cq_b, 1);
    assert_eq!(got[0].status, IBV_WC_SUCCESS, "{got:?}");
    assert_eq!(got[0].opcode, IBV_WC_RECV_RDMA_WITH_IMM);
    assert_eq!(
        (got[0].wr_id, u32::from_be(got[0].imm_data)),
        (7, 0xfeed_beef)
    );
    let mut back = vec![0u8; data.len()];
    rb.map().read_bytes(5000, &mut back);
    assert!(back == data, "the bytes written are not the bytes sent");
    // The channel said so: its fd is readable, and quiet once taken.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&cq_b.fd());
    let mut p = [ssock_rings::sys::PollFd::new(fd, libc::POLLIN)];
    assert_eq!(
        ssock_rings::sys::poll(&mut p, Some(Duration::from_secs(5))).unwrap(),
        1
    );
    cq_b.take_events();
    // A write beyond the peer's region is refused here, never posted.
    assert!(qa
        .write(&ra, 0, 4096, &eb, (1 << 20) - 100, None, false, false, 3)
        .is_err());
}

/// Two ntb nodes over verbs windows on one device, connected to each
/// other; `settle` waits for the writes in flight (the device moves them
/// after the call that posted them).
struct VerbsLab(crate::conformance::Linked<crate::ntb::Ntb>);

impl crate::conformance::Lab for VerbsLab {
    fn pair(&mut self) -> [crate::conformance::End; 2] {
        self.0.pair()
    }
    fn backend(&mut self, i: usize) -> &mut dyn crate::Backend {
        self.0.backend(i)
    }
    fn settle(&mut self) {
        for _ in 0..8 {
            self.0.settle();
            std::thread::sleep(Duration::from_millis(2));
        }
        self.0.settle();
    }
    fn poll(&mut self, at: usize) -> Vec<crate::ChannelId> {
        self.0.poll(at)
    }
}

/// The setup's round, as the peers' control connection carries it:
/// `offers` offers when the connection comes up, `answers` answers.
fn set_up(offers: &mut VerbsWindow, answers: &mut VerbsWindow) {
    assert_eq!(
        answers.setup(None).unwrap(),
        None,
        "the answering side spoke first"
    );
    let offer = offers.setup(None).unwrap().expect("no offer");
    let answer = answers.setup(Some(&offer)).unwrap().expect("no answer");
    assert_eq!(offers.setup(Some(&answer)).unwrap(), None);
}

/// Waits up to 10 s for word `off` of `to`'s inbox to be `v`, taking
/// both windows' completions meanwhile.
fn arrives(from: &mut VerbsWindow, to: &mut VerbsWindow, off: usize, v: u64) {
    let t = Instant::now();
    while to.load(off) != v {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "word {off}: {} where {v} was written",
            to.load(off)
        );
        from.drain();
        to.drain();
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn setup_messages_connect_two_windows_again_after_one_is_made_anew_and_garbage_is_refused() {
    let Some(ctx) = device() else {
        return;
    };
    let size = 64 * 1024;
    let (mut w1, mut w2) = (
        VerbsWindow::new(&ctx, size, true).unwrap(),
        VerbsWindow::new(&ctx, size, false).unwrap(),
    );
    // Written before the link is set up: sent once it is.
    w1.store(64, 1);
    w1.write(8192, b"before");
    set_up(&mut w1, &mut w2);
    arrives(&mut w1, &mut w2, 64, 1);
    let mut b = [0u8; 6];
    w2.read(8192, &mut b);
    assert_eq!(&b, b"before");
    w2.store(64, 2);
    w2.publish();
    arrives(&mut w2, &mut w1, 64, 2);

    // An offer said again to a side already connected to it: answered,
    // the link kept.
    let offer = Setup {
        kind: OFFER,
        from: w1.endpoint(),
        answers: (0, 0),
    }
    .encode();
    assert!(w2.setup(Some(&offer)).unwrap().is_some());
    w1.store(64, 3);
    w1.publish();
    arrives(&mut w1, &mut w2, 64, 3);

    // Garbage, the wrong kind for a side, a wrong size: refused, nothing
    // changed.
    for junk in [&b"junk"[..], &[0u8; SETUP_LEN], &[9u8; SETUP_LEN]] {
        assert!(w1.setup(Some(junk)).is_err());
        assert!(w2.setup(Some(junk)).is_err());
    }
    assert!(
        w1.setup(Some(&offer)).is_err(),
        "an offer to the offering side"
    );
    let mut other = Setup::decode(&offer).unwrap();
    other.from.len = 2 * size as u64;
    assert!(w2.setup(Some(&other.encode())).is_err(), "another size");
    let mut wide = offer.clone();
    wide[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(
        w2.setup(Some(&wide)).is_err(),
        "a queue pair number past 24 bits"
    );
    w1.store(64, 4);
    w1.publish();
    arrives(&mut w1, &mut w2, 64, 4);

    // The answering side's devd started again: a new window, the old
    // one gone. The offering side's writes find no queue pair there and
    // fail; its link asks for a new setup once.
    let answer_before = w2.setup(Some(&offer)).unwrap().unwrap();
    drop(w2);
    let mut w3 = VerbsWindow::new(&ctx, size, false).unwrap();
    let t = Instant::now();
    let due = loop {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the link never broke"
        );
        w1.store(64, 5);
        w1.publish();
        w1.ring();
        w1.drain();
        if let Some(m) = w1.setup_due() {
            break m;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(w1.setup_due(), None, "asked twice");
    // The old answer, come late, changes nothing.
    assert_eq!(w1.setup(Some(&answer_before)).unwrap(), None);
    // The new offer answered by the new window: the whole inbox is sent
    // again, both ways.
    let answer = w3.setup(Some(&due)).unwrap().expect("no answer");
    assert_eq!(w1.setup(Some(&answer)).unwrap(), None);
    arrives(&mut w1, &mut w3, 64, 5);
    let mut b = [0u8; 6];
    w3.read(8192, &mut b);
    assert_eq!(&b, b"before", "the inbox was not sent again whole");
    w3.store(64, 6);
    w3.publish();
    arrives(&mut w3, &mut w1, 64, 6);

    // The control connection came up again: a new round on both live
    // queue pairs, and the link carries on.
    set_up(&mut w1, &mut w3);
    w1.store(64, 7);
    w1.publish();
    arrives(&mut w1, &mut w3, 64, 7);
    w3.store(64, 8);
    w3.publish();
    arrives(&mut w3, &mut w1, 64, 8);
}

fn verbs_lab(ctx: &Arc<Context>, half: usize, window: usize) -> VerbsLab {
    let (mut w1, mut w2) = (
        VerbsWindow::new(ctx, half, true).unwrap(),
        VerbsWindow::new(ctx, half, false).unwrap(),
    );
    set_up(&mut w1, &mut w2);
    let mut lab = VerbsLab(crate::conformance::Linked::new(
        [
            crate::ntb::Ntb::new(2, 0, Box::new(w1), window),
            crate::ntb::Ntb::new(1, 0, Box::new(w2), window),
        ],
        false,
    ));
    // Up once both heartbeats crossed.
    let t = Instant::now();
    while !(lab.0.b[0].link_up() && lab.0.b[1].link_up()) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the link did not come up"
        );
        crate::conformance::Lab::settle(&mut lab);
    }
    lab
}

#[test]
fn two_ntb_nodes_over_verbs_windows_pass_the_conformance_suite() {
    let Some(ctx) = device() else {
        return;
    };
    for (half, window) in [(1 << 20, 64 * 1024), (64 * 1024, 16384)] {
        crate::conformance::run_all(&mut || Box::new(verbs_lab(&ctx, half, window)));
    }
}

#[test]
fn a_verbs_window_sends_nothing_before_it_is_connected_and_refuses_another_size() {
    let Some(ctx) = device() else {
        return;
    };
    let (mut a, b) = (
        VerbsWindow::new(&ctx, 1 << 20, true).unwrap(),
        VerbsWindow::new(&ctx, 64 * 1024, false).unwrap(),
    );
    // Written and published before any connect: nothing posted, no error.
    crate::ntb::window::Window::store(&a, 128, 7);
    crate::ntb::window::Window::publish(&mut a);
    crate::ntb::window::Window::ring(&a);
    assert!(a.connect(b.endpoint()).is_err(), "another size was taken");
}

#[test]
fn a_node_is_woken_through_its_completion_channel_when_the_peer_sends() {
    let Some(ctx) = device() else {
        return;
    };
    let mut lab = verbs_lab(&ctx, 1 << 20, 64 * 1024);
    let [a, b] = crate::conformance::Lab::pair(&mut lab);
    crate::conformance::Lab::settle(&mut lab);
    // Node 2 takes what came and would sleep: its bell is quiet.
    let mut r = Vec::new();
    lab.0.b[1].poll(&mut r);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&lab.0.b[1].readiness()[0]);
    let mut p = [ssock_rings::sys::PollFd::new(fd, libc::POLLIN)];
    assert_eq!(
        ssock_rings::sys::poll(&mut p, Some(Duration::ZERO)).unwrap(),
        0
    );
    // Node 1 sends and ends its turn (publish, then the doorbell).
    assert_eq!(lab.0.b[0].send(a.ch, b"wake").unwrap(), 4);
    lab.0.b[0].poll(&mut r);
    let mut p = [ssock_rings::sys::PollFd::new(fd, libc::POLLIN)];
    assert_eq!(
        ssock_rings::sys::poll(&mut p, Some(Duration::from_secs(5))).unwrap(),
        1,
        "not woken"
    );
    lab.0.b[1].poll(&mut r);
    let mut buf = [0u8; 16];
    assert_eq!(
        lab.0.b[1].recv(b.ch, &mut buf).unwrap(),
        crate::Recv::Data(4)
    );
    assert_eq!(&buf[..4], b"wake");
    assert!(lab.0.b[0].counters().doorbells >= 1);
}

#[test]
fn a_window_that_only_publishes_words_keeps_its_send_queue_and_many_frames_fit_a_turn() {
    let Some(ctx) = device() else {
        return;
    };
    let (mut w1, mut w2) = (
        VerbsWindow::new(&ctx, 1 << 20, true).unwrap(),
        VerbsWindow::new(&ctx, 1 << 20, false).unwrap(),
    );
    let (e1, e2) = (w1.endpoint(), w2.endpoint());
    w1.connect(e2).unwrap();
    w2.connect(e1).unwrap();
    // Far more publishes than the send queue has entries, none rung (a
    // link that only beats), each turn's completions taken.
    for i in 1..=2000u64 {
        w1.store(64, i);
        w1.publish();
        w1.drain();
    }
    // 600 frames' worth of ranges in one turn, each written payload
    // first, header after (as the ntb backend does), then the words.
    for k in 0..600usize {
        let at = 4096 + k * 16;
        w1.write(at + 8, &[u8::try_from(k % 251).unwrap(); 8]);
        w1.write(at, &(k as u64).to_le_bytes());
    }
    w1.store(128, 600);
    w1.publish();
    w1.ring();
    let t = Instant::now();
    while w2.load(128) != 600 || w2.load(64) != 2000 {
        assert!(t.elapsed() < Duration::from_secs(10), "not all arrived");
        w1.drain();
        std::thread::sleep(Duration::from_millis(1));
    }
    for k in 0..600usize {
        let mut b = [0u8; 16];
        w2.read(4096 + k * 16, &mut b);
        assert_eq!(u64::from_le_bytes(b[..8].try_into().unwrap()), k as u64);
        assert_eq!(b[8..], [u8::try_from(k % 251).unwrap(); 8]);
    }
}
