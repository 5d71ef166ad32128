//! Adaptive spin-then-block waiting. A blocked call first spins on the ring
//! for a bounded budget (no syscall: the fast path between two busy
//! processes), then arms its wait word and sleeps in `poll` on its eventfd
//! and the connection's liveness fd. Event suppression lives with the
//! rings ([`crate::stream`], [`crate::vq`]): the other side rings the
//! eventfd only when this side is armed.

use crate::sys::{poll, PollFd};
use std::io;
use std::time::{Duration, Instant};

/// Default spin budget before sleeping (Dolphin SuperSockets uses 30 us).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(30);

/// Spins calling `ready` until it returns Some or `budget` passes.
pub fn spin_until<T>(budget: Duration, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    if let Some(v) = ready() {
        return Some(v);
    }
    if budget.is_zero() {
        return None;
    }
    let start = Instant::now();
    loop {
        for _ in 0..32 {
            std::hint::spin_loop();
            if let Some(v) = ready() {
                return Some(v);
            }
        }
        if start.elapsed() >= budget {
            return None;
        }
    }
}

/// Sleeps in `poll` until one of `fds` is ready or `deadline` passes.
/// Returns Ok(false) on timeout. EINTR is returned to the caller.
pub fn sleep(fds: &mut [PollFd], deadline: Option<Instant>) -> io::Result<bool> {
    let timeout = match deadline {
        None => None,
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                return Ok(false);
            }
            Some(d - now)
        }
    };
    Ok(poll(fds, timeout)? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spin_returns_value_or_gives_up_after_budget() {
        let mut n = 0;
        assert_eq!(
            spin_until(Duration::from_millis(50), || {
                n += 1;
                (n > 10).then_some(n)
            }),
            Some(11)
        );
        let t = Instant::now();
        assert_eq!(spin_until(Duration::from_micros(200), || None::<()>), None);
        assert!(t.elapsed() >= Duration::from_micros(200));
    }

    #[test]
    fn sleep_wakes_on_eventfd() {
        let e = crate::sys::EventFd::new().unwrap();
        e.notify().unwrap();
        let mut fds = [PollFd::new(
            std::os::fd::AsRawFd::as_raw_fd(&e),
            libc::POLLIN,
        )];
        assert!(sleep(&mut fds, Some(Instant::now() + Duration::from_secs(5))).unwrap());
        assert!(e.drain());
        assert!(!sleep(&mut fds, Some(Instant::now() + Duration::from_millis(5))).unwrap());
    }
}
