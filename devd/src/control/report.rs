//! Statistics: the Stats reply (totals and one page of connections, each
//! user seeing its own) and a connection's JSON.
//!
//! Never here: changing state.

use super::*;

impl Devd {
    /// A statistics page. A devd serving several users (as root) shows a
    /// non-root session only the connections one of whose ends is theirs.
    pub(super) fn stats(&self, sid: u64, after: u64, limit: u16) -> Reply {
        let uid = self.session(sid).uid;
        let sees_all = uid == 0 || uid == sys::uid();
        let visible = |c: &&Conn| sees_all || c.ends.iter().any(|e| e.uid == uid);
        let mut page = Page {
            devd: DevdJson {
                pid: std::process::id(),
                uptime_s: self.started.elapsed().as_secs(),
                backend: self.backend,
                sessions: self.sessions.len(),
                doorbells: self.bells.count(),
                live_connections: self.reg.conns.len(),
                listeners: self.reg.listeners.len(),
                parked_regions: self.reg.parked.len(),
            },
            totals: {
                let mut t = self.totals.json();
                let e = &self.engine_counts;
                t.violations += QueuedCounters::get(&e.violations);
                t.bytes.queued = QueuedCounters::get(&e.bytes);
                t.remote.failovers = QueuedCounters::get(&e.failovers);
                t.remote.failover_resets = QueuedCounters::get(&e.failover_resets);
                t.remote.made_while_down = QueuedCounters::get(&e.made_while_down);
                t.remote.migrations = QueuedCounters::get(&e.migrations);
                for c in self.reg.conns.values().filter(|c| c.mode != Mode::Queued) {
                    let j = conn_json(c);
                    let b = j.bytes_c2a.saturating_add(j.bytes_a2c);
                    t.bytes.direct = t.bytes.direct.saturating_add(b);
                }
                t
            },
            connections: Vec::new(),
            peers: Vec::new(),
            peers_refused: Default::default(),
        };
        if let Some(p) = &self.peers {
            (page.peers, page.peers_refused) = p.status();
            let links = self.engine.link_history();
            let now = Instant::now();
            let state = |up| if up { "up" } else { "down" };
            for (peer, cfg) in page.peers.iter_mut().zip(&self.cfg.peers) {
                if cfg.links() == 0 {
                    continue;
                }
                let mut history = Vec::new();
                for i in 0..cfg.links() {
                    let link = u8::try_from(i).unwrap_or(u8::MAX);
                    let l = links.get(&(peer.node, link)).cloned().unwrap_or_default();
                    peer.links.push(crate::peers::LinkJson {
                        link,
                        over: cfg.link_name(i),
                        state: state(l.up),
                        changes: l.changes,
                    });
                    peer.link_changes += l.changes;
                    history.extend(
                        l.history
                            .iter()
                            .map(|&(up, at, channels)| (at, link, up, channels)),
                    );
                }
                peer.link = Some(state(peer.links.iter().any(|l| l.state == "up")));
                history.sort_by_key(|h| std::cmp::Reverse(h.0));
                peer.link_history = history
                    .into_iter()
                    .map(|(at, link, up, channels)| crate::peers::LinkChangeJson {
                        link,
                        state: state(up),
                        ago_ms: u64::try_from(now.duration_since(at).as_millis())
                            .unwrap_or(u64::MAX),
                        channels,
                    })
                    .collect();
            }
        }
        // A page must fit one control frame: stop adding connections
        // before the JSON could outgrow it and say there is more (what is
        // not a connection counted first, with room to spare).
        let base = serde_json::to_string(&page).map_or(MAX_FRAME, |s| s.len());
        let mut budget = MAX_FRAME.saturating_sub(16 * 1024 + base);
        let mut more = false;
        for c in self
            .reg
            .conns
            .range(after.saturating_add(1)..)
            .map(|(_, c)| c)
            .filter(visible)
        {
            let j = conn_json(c);
            let len = serde_json::to_string(&j).map_or(usize::MAX, |s| s.len() + 1);
            if page.connections.len() == usize::from(limit) || len > budget {
                more = true;
                break;
            }
            budget -= len;
            page.connections.push(j);
        }
        let json =
            serde_json::to_string(&page).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        (Response::Stats { json, more }, vec![])
    }
}

pub(super) fn conn_json(c: &Conn) -> ConnJson {
    // The stand-in for an end on another host is released from the start.
    let here = |i: &usize| c.remote.is_none() || c.ends[*i].session != 0;
    let state = if (0..2).filter(here).any(|i| c.ends[i].released) {
        "closing"
    } else {
        "open"
    };
    let pids = [c.ends[0].pid, c.ends[1].pid];
    let (local, remote) = (c.ends[0].addr.to_string(), c.ends[1].addr.to_string());
    match &c.res {
        Res::Direct(d) => {
            // A region that cannot be read shows zeros (never happens: devd
            // owns the memfd).
            let mut header = vec![0u8; layout::HEADER_SIZE];
            let _ = sys::pread_exact(d.memfd.as_fd(), &mut header, 0);
            let snaps = [
                stream::snapshot(&header, d.layout, 0),
                stream::snapshot(&header, d.layout, 1),
            ];
            let fill = |s: &stream::DirSnapshot| s.head.saturating_sub(s.tail);
            let rings = snaps
                .iter()
                .enumerate()
                .map(|(i, s)| RingJson {
                    from: if i == 0 { "connector" } else { "acceptor" },
                    head: s.head,
                    tail: s.tail,
                    fill: fill(s),
                    cap: d.layout.cap as u64,
                    flags: flag_names(s.flags),
                    consumer_asleep: s.cons_wait & 1 == 1,
                    producer_asleep: s.prod_wait & 1 == 1,
                    consumer_closed: s.cons_closed,
                })
                .collect();
            let half = snaps.iter().any(|s| s.flags & FLAG_EOS != 0);
            ConnJson {
                id: c.id,
                mode: "direct",
                state: if state == "open" && half {
                    "half-closed"
                } else {
                    state
                },
                pids,
                local,
                remote,
                bytes_c2a: snaps[0].head,
                bytes_a2c: snaps[1].head,
                ring_fill: [fill(&snaps[0]), fill(&snaps[1])],
                notify_sent: snaps[0].notify_sent.wrapping_add(snaps[1].notify_sent),
                notify_suppressed: snaps[0]
                    .notify_suppressed
                    .wrapping_add(snaps[1].notify_suppressed),
                region_size: d.layout.size as u64,
                rings,
                backend: None,
                peer_node: None,
                channel: None,
                link: None,
                migrations: None,
                acked: None,
                path: None,
                failovers: None,
                forwards: None,
            }
        }
        Res::Queued(q) => {
            let k = &q.counters;
            let g = QueuedCounters::get;
            ConnJson {
                id: c.id,
                mode: "queued",
                state,
                pids,
                local,
                remote,
                bytes_c2a: g(&k.bytes[0]),
                bytes_a2c: g(&k.bytes[1]),
                ring_fill: [0, 0],
                notify_sent: g(&k.calls[0]) + g(&k.calls[1]),
                notify_suppressed: g(&k.calls_suppressed[0]) + g(&k.calls_suppressed[1]),
                region_size: q.layout.size as u64,
                rings: Vec::new(),
                backend: Some(if c.remote.is_some() {
                    "ntb"
                } else {
                    "loopback"
                }),
                peer_node: c.remote.map(|r| r.0),
                channel: c.remote.map(|r| r.1),
                link: c
                    .remote
                    .map(|_| u8::try_from(g(&k.link)).unwrap_or(u8::MAX)),
                migrations: c.remote.map(|_| g(&k.migrations)),
                // The end on this host is the one with a session.
                acked: c
                    .remote
                    .map(|_| g(&k.acked[usize::from(c.ends[0].session == 0)])),
                path: c.remote.map(|_| match g(&k.failover) {
                    0 => "link",
                    1 => "tcp",
                    _ => "moving",
                }),
                failovers: c
                    .remote
                    .map(|_| c.moves.failovers + u32::from(g(&k.failover) == 1)),
                forwards: c.remote.map(|_| c.moves.forwards),
            }
        }
    }
}

pub(super) fn flag_names(f: u32) -> Vec<&'static str> {
    let mut v = Vec::new();
    if f & layout::FLAG_EOS != 0 {
        v.push("eos");
    }
    if f & layout::FLAG_RESET != 0 {
        v.push("reset");
    }
    v
}
