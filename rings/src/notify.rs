//! Adaptive spin-then-block waiting. A blocked call first spins on the ring
//! for a bounded budget (no syscall: the fast path between two busy
//! processes), then arms its wait word and sleeps in `poll` on its eventfd
//! and the connection's liveness fd. Event suppression lives with the
//! rings ([`crate::stream`], [`crate::vq`]): the other side rings the
//! eventfd only when this side is armed.

use crate::sys::{poll, PollFd};
use std::io;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Default spin budget before sleeping (Dolphin SuperSockets uses 30 us).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(30);

/// How long a yielding spin goes between yields of the CPU (sched_yield,
/// one system call): a peer that shares this CPU waits at most that long.
pub const YIELD_EVERY: Duration = Duration::from_micros(4);

/// A yield, or a gap between two looks at the clock, that kept this
/// thread off the CPU longer than this means other work wants the CPU
/// (not only the peer): the waiter stops spinning.
const OFF_CPU: Duration = Duration::from_micros(10);

/// Yields the CPU once (sched_yield); false if it came back only after
/// [`OFF_CPU`], when spinning on would take the CPU from others.
fn yield_cpu() -> bool {
    let t = Instant::now();
    std::thread::yield_now();
    t.elapsed() < OFF_CPU
}

/// A polling loop's spin budget, in one of two kinds:
/// - [`Spin::new`] (the negotiation's polls, inside connect and accept):
///   the peer may be waiting for this very CPU (the scheduler put both on
///   it), so the spin yields the CPU every [`YIELD_EVERY`]; a yield that
///   kept it off the CPU a while (other work wants it) ends the spin.
/// - [`Spin::quiet`] (the data path: receive, send, poll and epoll waits):
///   no system call at all, since the application may run under a seccomp
///   filter that allows only the calls its own socket calls make (sshd's
///   privilege-separated child dies on anything else). Reading the clock
///   is the vDSO. The spin ends when two looks at the clock are more than
///   [`OFF_CPU`] apart: this thread was preempted, so another thread wants
///   the CPU, and the caller sleeps instead.
#[derive(Debug)]
pub struct Spin {
    start: Instant,
    budget: Duration,
    /// When to yield next; None for a quiet spin.
    next_yield: Option<Duration>,
    /// The time spent at the last look (quiet spins).
    last: Duration,
}

impl Spin {
    /// A yielding spin of `budget`, starting now.
    pub fn new(budget: Duration) -> Spin {
        Spin {
            start: Instant::now(),
            budget,
            next_yield: Some(YIELD_EVERY),
            last: Duration::ZERO,
        }
    }

    /// A spin of `budget` that makes no system call, starting now.
    pub fn quiet(budget: Duration) -> Spin {
        Spin {
            next_yield: None,
            ..Spin::new(budget)
        }
    }

    /// Whether to poll once more (yielding the CPU first when it is time).
    pub fn again(&mut self) -> bool {
        let spent = self.start.elapsed();
        if spent >= self.budget {
            return false;
        }
        match self.next_yield {
            Some(at) if spent >= at => {
                if !yield_cpu() {
                    self.budget = Duration::ZERO;
                    return false;
                }
                self.next_yield = Some(self.start.elapsed() + YIELD_EVERY);
            }
            Some(_) => {}
            None => {
                if self.off_cpu(spent) {
                    self.budget = Duration::ZERO;
                    return false;
                }
                self.last = spent;
            }
        }
        true
    }

    /// Whether this thread was off the CPU for over [`OFF_CPU`] since the
    /// spin last looked at the clock. Quiet spins only: a yielding spin's
    /// gaps include its yields. A look at the clock comes every 32 calls
    /// of the caller's `ready`, so a `ready` that costs over 300 ns reads
    /// as preempted.
    fn preempted(&self) -> bool {
        self.off_cpu(self.start.elapsed())
    }

    /// Whether `spent` (since the spin's start) is over [`OFF_CPU`] past
    /// the last look at the clock.
    fn off_cpu(&self, spent: Duration) -> bool {
        spent.saturating_sub(self.last) > OFF_CPU
    }
}

/// This process's threads spinning in [`spin_until`] now.
static SPINNERS: AtomicUsize = AtomicUsize::new(0);

/// Takes what the waits need from the system once: the CPUs online
/// (sysconf, which reads /sys). The preload shim calls it at load,
/// before the application can have installed a seccomp filter; otherwise
/// it happens at the first wait.
pub fn init() {
    cpus();
}

/// The machine's online CPUs, not this thread's affinity: a waiter pinned
/// to one CPU still has a peer spinning or working on another.
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(crate::sys::online_cpus)
}

/// A place among the spinners, given back on drop.
struct SpinSlot;

impl SpinSlot {
    /// One more spinner, unless as many threads of this process as there
    /// are CPUs spin already: spinning then only takes a core from a
    /// thread that has work (a third spinner on two cores costs
    /// milliseconds). A counter, not a look at /proc: no system call.
    fn take() -> Option<SpinSlot> {
        let cap = cpus();
        if cap < 2 {
            // The peer can only run once this thread lets go of the CPU,
            // and a quiet spin never yields it.
            return None;
        }
        SPINNERS
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| SpinSlot)
    }
}

/// In a child after fork: the threads that were spinning are not there.
pub(crate) fn forget_spinners() {
    SPINNERS.store(0, Ordering::Relaxed);
}

impl Drop for SpinSlot {
    fn drop(&mut self) {
        SPINNERS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Spins calling `ready` until it returns Some or `budget` passes, with
/// no system call ([`Spin::quiet`]), if `gate` says spinning pays. No
/// spinning at all while as many threads of this process as there are
/// CPUs spin already, or on a machine with one CPU.
pub fn spin_until<T>(
    budget: Duration,
    gate: &Gate,
    mut ready: impl FnMut() -> Option<T>,
) -> Option<T> {
    if let Some(v) = ready() {
        return Some(v);
    }
    spin_permit(budget, gate)?.spin(ready)
}

/// [`spin_until`] for a caller that has just looked itself and found
/// nothing: no first look, and none at all when the gate says spinning
/// does not pay (the caller arms and looks again before it sleeps).
pub fn spin_more<T>(budget: Duration, gate: &Gate, ready: impl FnMut() -> Option<T>) -> Option<T> {
    spin_permit(budget, gate)?.spin(ready)
}

/// Leave to spin, asked before the spin itself: the caller learns
/// whether a spin will run before it looks at anything more (an epoll
/// wait asks the kernel's instance before a spin, and not before a
/// sleep, whose poll watches the epoll fd anyway). None, as in
/// [`spin_more`]: no budget, the gate closed, or as many spinners as
/// CPUs.
pub fn spin_permit(budget: Duration, gate: &Gate) -> Option<SpinPermit<'_>> {
    if budget.is_zero() || !gate.pays() {
        return None;
    }
    let slot = SpinSlot::take()?;
    Some(SpinPermit {
        budget,
        gate,
        _slot: slot,
    })
}

/// A spin [`spin_permit`] allowed: the place among the spinners is held
/// until it is spent or dropped.
pub struct SpinPermit<'a> {
    budget: Duration,
    gate: &'a Gate,
    _slot: SpinSlot,
}

impl SpinPermit<'_> {
    /// Spins as [`spin_more`] does (no first look), scoring the gate.
    pub fn spin<T>(self, ready: impl FnMut() -> Option<T>) -> Option<T> {
        let (r, paid) = spin_for(self.budget, ready);
        self.gate.scored(paid);
        r
    }
}

/// The gate of waits that span several connections (a poll or epoll set
/// with more than one): whether spinning paid in this process lately.
pub fn process_gate() -> &'static Gate {
    static GATE: Gate = Gate::new();
    &GATE
}

/// Whether spinning pays, for the waits of one connection (each end has
/// its own: a slow peer on one connection does not stop another's spins)
/// or of a whole process ([`process_gate`]): one point for a spin that
/// ended with the peer's answer, two off for one that ran out (its caller
/// slept anyway) or whose answer came only once the spinner had been
/// preempted, within `-SCORE_MAX..=SCORE_MAX`. When more processes wait
/// than there are CPUs (four database backends and their client on two
/// cores), spins run out while taking the CPU from the very peer they
/// wait for: the score goes below zero and waits sleep at once, but a
/// probe still spins now and then, to see whether it pays again: one
/// wait in 16 at first, each probe that runs out halving how often (down
/// to one in 256: with the CPUs saturated a probe in 16 took 3% of each
/// waiter's CPU, its whole budget every time), one that is answered
/// starting over (an answer that came only once the spinner had been
/// preempted counts as running out). A ping-pong between two processes answers within a
/// spin and keeps spinning.
#[derive(Debug)]
pub struct Gate {
    score: AtomicI32,
    /// Waits that asked while the score was below zero (for the probes).
    skipped: AtomicU32,
    /// One wait in 2^`probe_shift` probes while the score is below zero.
    probe_shift: AtomicU32,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}

const SCORE_MAX: i32 = 16;
/// Probes at first: one wait in 16.
const PROBE_SHIFT_FIRST: u32 = 4;
/// Probes at the rarest: one wait in 256.
const PROBE_SHIFT_LAST: u32 = 8;

impl Gate {
    /// A gate that lets the first waits spin.
    pub const fn new() -> Gate {
        Gate {
            score: AtomicI32::new(0),
            skipped: AtomicU32::new(0),
            probe_shift: AtomicU32::new(PROBE_SHIFT_FIRST),
        }
    }

    /// Whether this wait spins.
    fn pays(&self) -> bool {
        if self.score.load(Ordering::Relaxed) >= 0 {
            return true;
        }
        let every = 1u32
            << self
                .probe_shift
                .load(Ordering::Relaxed)
                .min(PROBE_SHIFT_LAST);
        self.skipped
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(every)
    }

    /// Counts how a spin ended.
    fn scored(&self, answered: bool) {
        let before = self
            .score
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(if answered {
                    (s + 1).min(SCORE_MAX)
                } else {
                    (s - 2).max(-SCORE_MAX)
                })
            })
            .unwrap_or(0);
        // A new period counts from this spin: the next probe comes a
        // whole period later.
        if answered {
            if self.probe_shift.swap(PROBE_SHIFT_FIRST, Ordering::Relaxed) != PROBE_SHIFT_FIRST {
                self.skipped.store(1, Ordering::Relaxed);
            }
        } else if before < 0 {
            // A probe that ran out: the next comes half as often.
            let _ = self
                .probe_shift
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some((n + 1).min(PROBE_SHIFT_LAST))
                });
            self.skipped.store(1, Ordering::Relaxed);
        }
    }
}

/// Spins calling `ready` until it returns Some or `budget` passes; and
/// whether the spin paid: it was answered without this thread being
/// preempted meanwhile. An answer that came while this thread was off
/// the CPU came because it was: the peer needed this CPU (a database
/// backend and its client on one core), and spinning only delayed it.
fn spin_for<T>(budget: Duration, mut ready: impl FnMut() -> Option<T>) -> (Option<T>, bool) {
    if let Some(v) = ready() {
        return (Some(v), true);
    }
    if budget.is_zero() {
        return (None, false);
    }
    let mut spin = Spin::quiet(budget);
    loop {
        for _ in 0..32 {
            std::hint::spin_loop();
            if let Some(v) = ready() {
                let paid = !spin.preempted();
                return (Some(v), paid);
            }
        }
        if !spin.again() {
            return (None, false);
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

    #[test]
    fn spins_that_run_out_stop_spinning_but_for_probes_and_answered_ones_resume() {
        let g = Gate::default();
        assert!(g.pays());
        // One answered spin; then one that ran out pushes it below zero.
        g.scored(true);
        g.scored(false);
        assert_eq!(g.score.load(Ordering::Relaxed), -1);
        // Waits sleep at once then, but for one probe in 16: the gaps
        // between the waits that spin.
        let gaps = |n: usize| -> Vec<usize> {
            let at: Vec<usize> = (0..n).filter(|_| g.pays()).collect();
            at.windows(2).map(|w| w[1] - w[0]).collect()
        };
        assert_eq!(gaps(64), [16, 16, 16]);
        // Each probe that runs out makes the next come half as often, down
        // to one wait in 256.
        g.scored(false);
        assert_eq!(gaps(128), [32, 32, 32]);
        for _ in 0..10 {
            g.scored(false);
        }
        assert_eq!(gaps(1024), [256, 256, 256]);
        // The score is bounded: as many answered probes as the floor is
        // deep bring spinning back; the first makes probes one in 16 again.
        assert_eq!(g.score.load(Ordering::Relaxed), -SCORE_MAX);
        g.scored(true);
        assert_eq!(gaps(64), [16, 16, 16]);
        for _ in 1..SCORE_MAX {
            g.scored(true);
        }
        assert!(g.pays());
    }

    use super::*;

    #[test]
    fn a_wait_asks_the_gate_it_is_given_and_no_other() {
        // One connection's spins ran out (a slow peer): its gate is closed.
        let slow = Gate::new();
        for _ in 0..3 {
            slow.scored(false);
        }
        let looks = |gate: &Gate| {
            let mut n = 0;
            let got = spin_until(Duration::from_secs(5), gate, || {
                n += 1;
                (n == 5).then_some(())
            });
            (got, n)
        };
        // A wait on it looks once and sleeps ...
        assert_eq!(looks(&slow), (None, 1));
        // ... while a wait on another connection spins until its answer.
        // (Unless this machine has one CPU, where nothing spins.)
        let fresh = Gate::new();
        let expect = if cpus() < 2 { (None, 1) } else { (Some(()), 5) };
        assert_eq!(looks(&fresh), expect);
        assert!(fresh.pays() && !slow.pays());
    }

    #[test]
    fn spin_returns_value_or_gives_up_after_budget() {
        let mut n = 0;
        let (got, _) = spin_for(Duration::from_millis(50), || {
            n += 1;
            (n > 10).then_some(n)
        });
        assert_eq!(got, Some(11));
        // An answer that came while the spinner was off the CPU (here: it
        // slept) is had, but the spin did not pay.
        let mut first = true;
        let (got, paid) = spin_for(Duration::from_millis(50), || {
            if std::mem::take(&mut first) {
                return None;
            }
            std::thread::sleep(Duration::from_micros(100));
            Some(())
        });
        assert_eq!((got, paid), (Some(()), false));
        // A quiet spin ends early when this thread was preempted (other
        // work wants the CPU): of a few tries, one runs its whole budget.
        let full = (0..5).any(|_| {
            let t = Instant::now();
            assert_eq!(
                spin_for(Duration::from_micros(200), || None::<()>),
                (None, false)
            );
            t.elapsed() >= Duration::from_micros(200)
        });
        assert!(full, "no spin ran its budget");
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
