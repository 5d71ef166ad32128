//! A hostile client controls every field of its Queued region's queues
//! (descriptors, avail ring entries, indexes, flags) and interleaves its
//! writes with devd's device-side operations. devd must pop, read, write
//! and complete buffers or report a violation: never panic, never touch
//! memory outside the region.
//!
//! Input: a sequence of 8-byte operations [op, queue/index, value (6 bytes)].
#![no_main]
use libfuzzer_sys::fuzz_target;
use ssock_rings::layout::QueuedLayout;
use ssock_rings::shm::Mapping;
use ssock_rings::sys::memfd_sealed;
use ssock_rings::vq::device::DeviceRegion;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

const SIZE: usize = 128 * 1024;

fuzz_target!(|data: &[u8]| {
    let l = QueuedLayout::for_size(SIZE).unwrap();
    let fd = memfd_sealed("fuzz", SIZE).unwrap();
    let map = Mapping::map(fd.as_fd(), SIZE, true).unwrap();
    let Ok(mut dev) = DeviceRegion::new(fd.try_clone().unwrap(), l) else { return };
    let qn = usize::from(l.qsize);
    let mut scratch = vec![0u8; l.slot];
    for op in data.chunks_exact(8) {
        let q = usize::from(op[1] & 1);
        let i = usize::from(op[1] >> 1) % qn;
        let mut v = [0u8; 8];
        v[..6].copy_from_slice(&op[2..8]);
        let v = u64::from_le_bytes(v);
        let o = l.queues[q];
        match op[0] % 10 {
            // Client-side writes: a descriptor's fields.
            0 => map.u64_at(o.desc + 16 * i).store(
                if v & 1 == 0 { l.slot_offset(q, i as u16) as u64 + (v >> 40) } else { v },
                Ordering::Relaxed,
            ),
            1 => map.u32_at(o.desc + 16 * i + 8).store(v as u32, Ordering::Relaxed),
            2 => map.u16_at(o.desc + 16 * i + 12).store(v as u16 & 7, Ordering::Relaxed),
            3 => map.u16_at(o.desc + 16 * i + 14).store(v as u16, Ordering::Relaxed),
            // The avail ring: an entry, and the index (mostly near valid values).
            4 => map.u16_at(o.avail + 4 + 2 * i).store(v as u16 % (2 * l.qsize), Ordering::Relaxed),
            5 => {
                let cur = map.u16_at(o.avail + 2).load(Ordering::Relaxed);
                let next = if v & 0x100 == 0 { cur.wrapping_add((v % 40) as u16) } else { v as u16 };
                map.u16_at(o.avail + 2).store(next, Ordering::Release);
            }
            // devd's side.
            6 | 7 => match dev.pop(q) {
                Ok(Some(b)) => {
                    let len = b.len as usize;
                    if q == 0 {
                        dev.read(b.addr, &mut scratch[..len]).unwrap();
                    } else {
                        dev.write(b.addr, &scratch[..len]).unwrap();
                    }
                    dev.add_used(q, b.head, b.len).unwrap();
                    let _ = dev.needs_notification(q);
                }
                Ok(None) => {}
                Err(_) => return,
            },
            8 => {
                let _ = dev.enable_notification(q);
            }
            _ => {
                let _ = dev.tx_flags();
                let _ = dev.set_rx_flags(v as u32 & 3);
            }
        }
    }
});
