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

/// How long a spin goes between yields of the CPU (sched_yield, one system
/// call): a peer that shares this CPU waits at most that long.
pub const YIELD_EVERY: Duration = Duration::from_micros(4);

/// A yield that kept this thread off the CPU longer than this means other
/// work wants the CPU (not only the peer): the waiter stops spinning.
const YIELD_LONG: Duration = Duration::from_micros(10);

/// Yields the CPU once (sched_yield); false if it came back only after
/// [`YIELD_LONG`], when spinning on would take the CPU from others.
fn yield_cpu() -> bool {
    let t = Instant::now();
    std::thread::yield_now();
    t.elapsed() < YIELD_LONG
}

/// A polling loop's spin budget. The peer may be waiting for this very
/// CPU (the scheduler put both on it), so the spin yields the CPU every
/// [`YIELD_EVERY`]; a yield that kept it off the CPU a while (other work
/// wants it) ends the spin, and the caller sleeps.
#[derive(Debug)]
pub struct Spin {
    start: Instant,
    budget: Duration,
    next_yield: Duration,
}

impl Spin {
    /// A spin of `budget`, starting now.
    pub fn new(budget: Duration) -> Spin {
        Spin {
            start: Instant::now(),
            budget,
            next_yield: YIELD_EVERY,
        }
    }

    /// Whether to poll once more (yielding the CPU first when it is time).
    pub fn again(&mut self) -> bool {
        let spent = self.start.elapsed();
        if spent >= self.budget {
            return false;
        }
        if spent >= self.next_yield {
            if !yield_cpu() {
                self.budget = Duration::ZERO;
                return false;
            }
            self.next_yield = self.start.elapsed() + YIELD_EVERY;
        }
        true
    }
}

/// Whether this process has more runnable threads than there are CPUs:
/// spinning then only takes a core from a thread of ours that has work (a
/// third spinner on two cores costs milliseconds). Looked at most every
/// 10 ms per process: /proc/self/stat's thread count (one small read), and
/// only when that exceeds the CPUs, each thread's state.
fn overloaded() -> bool {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::OnceLock;
    // One sample for the whole process (a per-thread one would make every
    // thread of a busy many-threaded process scan all threads' states).
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    static SAMPLED_MS: AtomicU64 = AtomicU64::new(u64::MAX);
    static VALUE: AtomicBool = AtomicBool::new(false);
    let now_ms = u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis())
        .unwrap_or(u64::MAX - 1);
    let last = SAMPLED_MS.load(Ordering::Relaxed);
    if last != u64::MAX && now_ms.saturating_sub(last) < 10 {
        return VALUE.load(Ordering::Relaxed);
    }
    // One thread refreshes; the others use the previous value meanwhile.
    if SAMPLED_MS
        .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        VALUE.store(runnable_threads_exceed_cpus(), Ordering::Relaxed);
    }
    VALUE.load(Ordering::Relaxed)
}

fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// The fields of a /proc stat line after the command name: [0] is the
/// state, [17] the number of threads.
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = s.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn runnable_threads_exceed_cpus() -> bool {
    let cpus = cpus();
    let threads = stat_fields("/proc/self/stat")
        .and_then(|f| f.get(17)?.parse::<usize>().ok())
        .unwrap_or(1);
    if threads <= cpus {
        return false;
    }
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    let running = dir
        .filter_map(Result::ok)
        .filter(|e| {
            let p = e.path().join("stat");
            stat_fields(&p.to_string_lossy()).is_some_and(|f| f.first().is_some_and(|s| s == "R"))
        })
        .count();
    running > cpus
}

/// Spins calling `ready` until it returns Some or `budget` passes. No
/// spinning at all while this process has more runnable threads than
/// there are CPUs.
pub fn spin_until<T>(budget: Duration, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    if let Some(v) = ready() {
        return Some(v);
    }
    if overloaded() {
        return None;
    }
    spin_for(budget, ready)
}

/// Spins calling `ready` until it returns Some or `budget` passes.
fn spin_for<T>(budget: Duration, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    if let Some(v) = ready() {
        return Some(v);
    }
    if budget.is_zero() {
        return None;
    }
    let mut spin = Spin::new(budget);
    loop {
        for _ in 0..32 {
            std::hint::spin_loop();
            if let Some(v) = ready() {
                return Some(v);
            }
        }
        if !spin.again() {
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
            spin_for(Duration::from_millis(50), || {
                n += 1;
                (n > 10).then_some(n)
            }),
            Some(11)
        );
        let t = Instant::now();
        assert_eq!(spin_for(Duration::from_micros(200), || None::<()>), None);
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
