//! Split virtqueues in a Queued region: our own driver side for clients,
//! and the device side for devd built on `virtio-queue` over `vm-memory`.
//!
//! Each queue uses one-descriptor chains whose descriptor id equals the
//! buffer slot number, posted in rotation and returned in order (the
//! driver's state is in the region: every holder of an end drives it), and
//! the EVENT_IDX notification scheme in both directions (avail_event /
//! used_event).

pub mod device;
pub mod driver;

/// Descriptor flag: chain continues.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device writes this buffer.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: indirect table.
pub const F_INDIRECT: u16 = 4;

/// `vring_need_event` from the virtio spec: notify if `event` lies in
/// (old, new].
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Queue index of TX (client -> devd).
pub const TX: usize = 0;
/// Queue index of RX (devd -> client).
pub const RX: usize = 1;

#[cfg(test)]
mod tests {
    use super::device::{DeviceError, DeviceRegion};
    use super::driver::QueueDriver;
    use super::*;
    use crate::layout::QueuedLayout;
    use crate::shm::Mapping;
    use crate::sys::memfd_sealed;
    use std::os::fd::AsFd;
    use std::sync::Arc;

    fn slot32(l: &QueuedLayout) -> u32 {
        u32::try_from(l.slot).unwrap()
    }

    fn setup() -> (Arc<Mapping>, QueuedLayout, DeviceRegion) {
        let l = QueuedLayout::for_size(128 * 1024).unwrap();
        let fd = memfd_sealed("vq", l.size).unwrap();
        let m = Arc::new(Mapping::map(fd.as_fd(), l.size, true).unwrap());
        let dev = DeviceRegion::new(fd.try_clone().unwrap(), l).unwrap();
        (m, l, dev)
    }

    #[test]
    fn driver_posts_device_pops_and_completes_with_data() {
        let (m, l, mut dev) = setup();
        let tx = QueueDriver::new(m.clone(), l.queues[TX], l.qsize);
        let rx = QueueDriver::new(m.clone(), l.queues[RX], l.qsize);
        m.write_bytes(l.slot_offset(TX, 0), b"hello");
        tx.post(
            tx.next().unwrap().unwrap(),
            l.slot_offset(TX, 0) as u64,
            5,
            0,
        );
        rx.post(
            rx.next().unwrap().unwrap(),
            l.slot_offset(RX, 0) as u64,
            slot32(&l),
            F_WRITE,
        );
        let b = dev.pop(TX).unwrap().unwrap();
        assert_eq!((b.head, b.len), (0, 5));
        let mut data = [0u8; 5];
        dev.read(b.addr, &mut data).unwrap();
        assert_eq!(&data, b"hello");
        dev.add_used(TX, b.head, 0).unwrap();
        let r = dev.pop(RX).unwrap().unwrap();
        dev.write(r.addr, b"world!").unwrap();
        dev.add_used(RX, r.head, 6).unwrap();
        assert_eq!(tx.pop_used(slot32(&l)).unwrap(), Some((0, 0)));
        assert_eq!(rx.pop_used(slot32(&l)).unwrap(), Some((0, 6)));
        let mut got = [0u8; 6];
        m.read_bytes(l.slot_offset(RX, 0), &mut got);
        assert_eq!(&got, b"world!");
        assert!(dev.pop(TX).unwrap().is_none());
    }

    #[test]
    fn a_second_driver_on_the_same_region_goes_on_where_the_first_stopped() {
        // Two processes holding one end (after fork) each make their own
        // driver over the same mapping; they take turns.
        let (m, l, mut dev) = setup();
        let slot = slot32(&l);
        let (tx1, rx1) = (
            QueueDriver::new(m.clone(), l.queues[TX], l.qsize),
            QueueDriver::new(m.clone(), l.queues[RX], l.qsize),
        );
        for _ in 0..l.qsize {
            let n = rx1.next().unwrap().unwrap();
            rx1.post(n, l.slot_offset(RX, n.id) as u64, slot, F_WRITE);
        }
        assert_eq!(rx1.next().unwrap(), None, "every RX buffer is posted");
        let n = tx1.next().unwrap().unwrap();
        let id = n.id;
        m.write_bytes(l.slot_offset(TX, id), b"one");
        tx1.post(n, l.slot_offset(TX, id) as u64, 3, 0);
        let r = dev.pop(RX).unwrap().unwrap();
        dev.write(r.addr, b"abcdef").unwrap();
        dev.add_used(RX, r.head, 6).unwrap();
        let u = rx1.peek_used(slot).unwrap().unwrap();
        assert!(!rx1.consume(u, 2), "two of six bytes read");

        let (tx2, rx2) = (
            QueueDriver::new(m.clone(), l.queues[TX], l.qsize),
            QueueDriver::new(m.clone(), l.queues[RX], l.qsize),
        );
        let n2 = tx2.next().unwrap().unwrap();
        let id2 = n2.id;
        assert_ne!(id2, id, "the first driver's buffer is still in flight");
        m.write_bytes(l.slot_offset(TX, id2), b"two");
        tx2.post(n2, l.slot_offset(TX, id2) as u64, 3, 0);
        assert_eq!(tx2.unreturned_len(), 6);
        let mut got = Vec::new();
        while let Some(b) = dev.pop(TX).unwrap() {
            let mut d = [0u8; 3];
            dev.read(b.addr, &mut d).unwrap();
            got.extend_from_slice(&d);
            dev.add_used(TX, b.head, 0).unwrap();
        }
        assert_eq!(got, b"onetwo", "the device saw both posts, in order");
        assert_eq!(tx2.pop_used(slot).unwrap(), Some((id, 0)));
        assert_eq!(tx1.pop_used(slot).unwrap(), Some((id2, 0)));
        assert_eq!(tx2.in_flight(), 0);
        let u = rx2.peek_used(slot).unwrap().unwrap();
        assert_eq!((u.id, u.len, u.off), (r.head, 6, 2));
        assert_eq!(rx2.unconsumed(slot).unwrap(), 4);
        assert!(rx2.consume(u, 4), "the rest of the entry");
        assert_eq!(rx1.unconsumed(slot).unwrap(), 0);
        assert_eq!(
            rx1.next().unwrap().map(|n| n.id),
            Some(r.head),
            "its buffer is free again"
        );
    }

    #[test]
    fn an_entry_out_of_order_or_a_bad_read_position_is_a_violation() {
        let (m, l, mut dev) = setup();
        let slot = slot32(&l);
        let rx = QueueDriver::new(m.clone(), l.queues[RX], l.qsize);
        for _ in 0..2 {
            let n = rx.next().unwrap().unwrap();
            rx.post(n, l.slot_offset(RX, n.id) as u64, slot, F_WRITE);
        }
        let a = dev.pop(RX).unwrap().unwrap();
        let b = dev.pop(RX).unwrap().unwrap();
        dev.add_used(RX, b.head, 1).unwrap();
        dev.add_used(RX, a.head, 1).unwrap();
        assert!(rx.peek_used(slot).is_err(), "buffer 1 came back before 0");
        assert!(rx.unconsumed(slot).is_err());

        let (m, l, mut dev) = setup();
        let rx = QueueDriver::new(m.clone(), l.queues[RX], l.qsize);
        rx.post(
            rx.next().unwrap().unwrap(),
            l.slot_offset(RX, 0) as u64,
            slot,
            F_WRITE,
        );
        let a = dev.pop(RX).unwrap().unwrap();
        dev.add_used(RX, a.head, 5).unwrap();
        // Another holder of the end wrote a read position past the entry.
        m.u64_at(l.queues[RX].driver)
            .store(9, std::sync::atomic::Ordering::Relaxed);
        assert!(rx.peek_used(slot).is_err());
        // Or an avail index that posts more buffers than there are.
        let tx = QueueDriver::new(m.clone(), l.queues[TX], l.qsize);
        m.u16_at(l.queues[TX].avail + 2)
            .store(l.qsize + 1, std::sync::atomic::Ordering::Relaxed);
        assert!(tx.next().is_err());
    }

    #[test]
    fn kicks_are_suppressed_until_the_device_asks() {
        let (m, l, mut dev) = setup();
        let tx = QueueDriver::new(m.clone(), l.queues[TX], l.qsize);
        // The device asks for a kick on the next post.
        assert!(!dev.enable_notification(TX).unwrap());
        tx.post(
            tx.next().unwrap().unwrap(),
            l.slot_offset(TX, 0) as u64,
            1,
            0,
        );
        assert!(tx.should_kick());
        // It has not re-armed: further posts need no kick.
        tx.post(
            tx.next().unwrap().unwrap(),
            l.slot_offset(TX, 1) as u64,
            1,
            0,
        );
        assert!(!tx.should_kick());
    }

    #[test]
    fn a_device_that_looks_itself_takes_no_kick_until_it_asks_again() {
        let (m, l, mut dev) = setup();
        let tx = QueueDriver::new(m.clone(), l.queues[TX], l.qsize);
        let post = |n: u16| {
            assert!(tx.post(
                tx.next().unwrap().unwrap(),
                l.slot_offset(TX, n) as u64,
                1,
                0,
            ))
        };
        assert!(!dev.enable_notification(TX).unwrap());
        dev.suppress_kicks(TX).unwrap();
        // Posts while the device looks: no kick, whatever their number.
        for n in 0..l.qsize {
            post(n);
            assert!(!tx.should_kick(), "kicked for post {n}");
        }
        // Asking again says posts came (the device must not sleep).
        assert!(dev.enable_notification(TX).unwrap());
        for _ in 0..l.qsize {
            let b = dev.pop(TX).unwrap().unwrap();
            dev.add_used(TX, b.head, 1).unwrap();
        }
        assert!(!dev.enable_notification(TX).unwrap());
        while tx.pop_used(1).unwrap().is_some() {}
        // Asked again and idle: the next post kicks.
        post(0);
        assert!(tx.should_kick());
    }

    #[test]
    fn device_interrupts_only_an_armed_driver() {
        let (m, l, mut dev) = setup();
        let rx = QueueDriver::new(m.clone(), l.queues[RX], l.qsize);
        rx.post(
            rx.next().unwrap().unwrap(),
            l.slot_offset(RX, 0) as u64,
            slot32(&l),
            F_WRITE,
        );
        rx.post(
            rx.next().unwrap().unwrap(),
            l.slot_offset(RX, 1) as u64,
            slot32(&l),
            F_WRITE,
        );
        assert!(rx.arm(), "nothing used yet: safe to sleep");
        let b = dev.pop(RX).unwrap().unwrap();
        dev.add_used(RX, b.head, 0).unwrap();
        assert!(dev.needs_notification(RX).unwrap());
        // The driver has not re-armed: no second interrupt.
        let b = dev.pop(RX).unwrap().unwrap();
        dev.add_used(RX, b.head, 0).unwrap();
        assert!(!dev.needs_notification(RX).unwrap());
    }

    #[test]
    fn chained_wrong_direction_or_foreign_slot_descriptors_are_violations() {
        let (m, l, mut dev) = setup();
        let tx = QueueDriver::new(m.clone(), l.queues[TX], l.qsize);
        tx.post(
            tx.next().unwrap().unwrap(),
            l.slot_offset(TX, 0) as u64,
            1,
            F_NEXT,
        );
        assert!(matches!(dev.pop(TX), Err(DeviceError::Violation(_))));
        let (m, l, mut dev) = setup();
        let tx = QueueDriver::new(m.clone(), l.queues[TX], l.qsize);
        tx.post(
            tx.next().unwrap().unwrap(),
            l.slot_offset(TX, 0) as u64,
            1,
            F_WRITE,
        );
        assert!(matches!(dev.pop(TX), Err(DeviceError::Violation(_))));
        let (m, l, mut dev) = setup();
        let tx = QueueDriver::new(m.clone(), l.queues[TX], l.qsize);
        tx.post(
            tx.next().unwrap().unwrap(),
            l.slot_offset(TX, 1) as u64,
            1,
            0,
        );
        assert!(matches!(dev.pop(TX), Err(DeviceError::Violation(_))));
        let (m, l, mut dev) = setup();
        let tx = QueueDriver::new(m.clone(), l.queues[TX], l.qsize);
        tx.post(
            tx.next().unwrap().unwrap(),
            l.slot_offset(TX, 0) as u64,
            slot32(&l) + 1,
            0,
        );
        assert!(matches!(dev.pop(TX), Err(DeviceError::Violation(_))));
    }

    #[test]
    fn an_avail_index_running_ahead_is_a_violation() {
        let (m, l, mut dev) = setup();
        m.u16_at(l.queues[TX].avail + 2)
            .store(l.qsize + 5, std::sync::atomic::Ordering::Release);
        assert!(matches!(dev.pop(TX), Err(DeviceError::Violation(_))));
    }

    #[test]
    fn unsealed_or_wrongly_sized_regions_are_refused() {
        let l = QueuedLayout::for_size(128 * 1024).unwrap();
        let fd = memfd_sealed("vq", 64 * 1024).unwrap();
        assert!(matches!(
            DeviceRegion::new(fd, l),
            Err(DeviceError::Region(_))
        ));
        let f = std::fs::File::from(std::os::fd::OwnedFd::from(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(std::env::temp_dir().join(format!("ssock-vq-{}", std::process::id())))
                .unwrap(),
        ));
        f.set_len(l.size as u64).unwrap();
        let _ = std::fs::remove_file(
            std::env::temp_dir().join(format!("ssock-vq-{}", std::process::id())),
        );
        assert!(matches!(
            DeviceRegion::new(f.into(), l),
            Err(DeviceError::Region(_))
        ));
    }
}
