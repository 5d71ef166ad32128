//! A hostile client controls every byte of its Queued region's queue area
//! (descriptors, avail ring, indexes). devd's device side must pop,
//! read, write and complete buffers or report a violation: never panic,
//! never access outside the region.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ssock_rings::layout::{QueuedLayout, HEADER_SIZE};
use ssock_rings::shm::Mapping;
use ssock_rings::sys::memfd_sealed;
use ssock_rings::vq::device::DeviceRegion;
use ssock_rings::vq::{RX, TX};
use std::os::fd::AsFd;

const SIZE: usize = 128 * 1024;

fuzz_target!(|data: &[u8]| {
    let l = QueuedLayout::for_size(SIZE).unwrap();
    let fd = memfd_sealed("fuzz", SIZE).unwrap();
    let map = Mapping::map(fd.as_fd(), SIZE, true).unwrap();
    let area = l.slots - HEADER_SIZE;
    let n = data.len().min(area);
    map.write_bytes(HEADER_SIZE, &data[..n]);
    let Ok(mut dev) = DeviceRegion::new(fd.try_clone().unwrap(), l) else { return };
    let mut scratch = vec![0u8; l.slot];
    for _ in 0..(2 * usize::from(l.qsize)) {
        for q in [TX, RX] {
            match dev.pop(q) {
                Ok(Some(b)) => {
                    let len = b.len as usize;
                    if q == TX {
                        dev.read(b.addr, &mut scratch[..len]).unwrap();
                    } else {
                        dev.write(b.addr, &scratch[..len]).unwrap();
                    }
                    let _ = dev.add_used(q, b.head, b.len);
                    let _ = dev.needs_notification(q);
                }
                Ok(None) | Err(_) => {
                    let _ = dev.enable_notification(q);
                }
            }
        }
    }
    let _ = dev.tx_flags();
});
