//! A hostile peer controls every word of a Direct region. Whatever it
//! writes, and in whatever order our side reads and writes, the ring ends
//! must return data or a violation and never touch memory outside the
//! region (the mapping's bounds checks would panic).
#![no_main]
use libfuzzer_sys::fuzz_target;
use ssock_rings::layout::DirectLayout;
use ssock_rings::shm::Mapping;
use ssock_rings::stream::{Consumer, Doorbells, Producer};
use ssock_rings::sys::memfd_sealed;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const SIZE: usize = 16 * 1024;

/// Rings whatever id the peer's bell words name (nothing to ring here).
#[derive(Debug)]
struct AnyBell;

impl Doorbells for AnyBell {
    fn ring(&self, _id: u32) -> bool {
        true
    }
}

fuzz_target!(|data: &[u8]| {
    let fd = memfd_sealed("fuzz", SIZE).unwrap();
    let map = Arc::new(Mapping::map(fd.as_fd(), SIZE, true).unwrap());
    let l = DirectLayout::for_size(SIZE).unwrap();
    let bells: Arc<dyn Doorbells> = Arc::new(AnyBell);
    let mut p = Producer::new(map.clone(), l, 0, bells.clone());
    let mut c = Consumer::new(map.clone(), l, 1, bells);
    let mut buf = vec![0u8; 4096];
    for op in data.chunks(9) {
        let v = op.get(1..9).map(|b| u64::from_le_bytes(b.try_into().unwrap())).unwrap_or(0);
        match op[0] % 11 {
            // The peer scribbles over the words it owns (and ours, which
            // our ends re-read to follow a sibling process).
            8 => map.u64_at(l.dir(1).base).store(v, Ordering::Relaxed),
            9 => map.u64_at(l.dir(0).head).store(v, Ordering::Relaxed),
            10 => map.u64_at(l.dir(1).tail).store(v, Ordering::Relaxed),
            0 => map.u64_at(l.dir(0).tail).store(v, Ordering::Relaxed),
            1 => map.u64_at(l.dir(1).head).store(v, Ordering::Relaxed),
            2 => {
                map.u32_at(l.dir(1).flags).store(v as u32, Ordering::Relaxed);
                map.u32_at(l.dir(0).cons_bell).store((v >> 32) as u32, Ordering::Relaxed);
                map.u32_at(l.dir(0).cons_wait).store(v as u32 | 1, Ordering::Relaxed);
            }
            3 => map.u32_at(l.dir(0).cons_closed).store(v as u32, Ordering::Relaxed),
            // Our side keeps using its ends.
            4 => {
                let n = (v as usize) % buf.len();
                let _ = p.write(&buf[..n]);
            }
            5 => {
                let n = (v as usize) % buf.len();
                let _ = c.read(&mut buf[..n]);
            }
            6 => {
                let _ = c.peek(&mut buf[..64]);
                let _ = c.arm(1);
                c.disarm();
            }
            _ => {
                let _ = p.arm(1);
                p.disarm();
                let _ = p.writable();
            }
        }
    }
});
