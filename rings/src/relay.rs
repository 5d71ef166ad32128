//! The hand-over words of a Queued connection whose two ends are on two
//! hosts. Each host's devd made the hand-over page its own end maps; its
//! engine sends the other devd the words its end writes ([`ours`]), and
//! applies to its page what the other devd sent ([`apply`]): the
//! connector's READY and the acceptor's CLAIM, each end's SWITCH and END
//! for the direction it writes, and its TAKEN for the direction it reads
//! (docs/protocol.md section 8.4). And the fail-over's page logic
//! (8.5: `start_page`, `our_part`, `agree_page`), which devd's engine runs
//! for its side, and an end whose devd died runs itself when it rejoins a
//! devd started again (8.8).
//!
//! Never here: a word of this host's own end overwritten, or a value from
//! the other host used before it is checked against what this page allows
//! (a first value stays; TAKEN only grows, never past the bytes sent).

use crate::layout::{self, hov, Switch, Taken, CLAIM_ACCEPTED, CLAIM_PENDING, TAKEN_CLOSED};
use crate::shm::Mapping;
use std::sync::atomic::Ordering;

/// What one end's devd tells the other of its end's words: [its READY
/// (connector) or CLAIM accepted (acceptor) as 0 or 1, the SWITCH word of
/// the direction it writes, that direction's END word, and the TAKEN count
/// of the direction it reads (without the closed flag)].
pub type Words = [u64; 4];

/// Why words from the other host were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadWords {
    /// The flag word is neither 0 nor 1.
    #[error("flag word {0}")]
    Flag(u64),
    /// Its reader says it took more than was sent to it.
    #[error("taken {taken} beyond the {sent} bytes sent")]
    Taken {
        /// What the words said.
        taken: u64,
        /// What this side sent.
        sent: u64,
    },
}

/// The words end `end` (0 connector, 1 acceptor) of page `m` wrote.
pub fn ours(m: &Mapping, end: usize) -> Words {
    let end = end & 1;
    let flag = if end == 0 {
        layout::connector_ready(m)
    } else {
        layout::claim(m) == CLAIM_ACCEPTED
    };
    [
        u64::from(flag),
        m.u64_at(hov::SWITCH + 8 * end).load(Ordering::Acquire),
        m.u64_at(hov::END + 8 * end).load(Ordering::Acquire),
        m.u64_at(hov::TAKEN + 8 * (1 - end)).load(Ordering::Acquire) & !TAKEN_CLOSED,
    ]
}

/// Applies words `w` of the other host's end to page `m` of this host's
/// end `end`, whose direction's bytes sent so far are `sent`. Ok(whether
/// a word changed: this end's process is woken then).
pub fn apply(m: &Mapping, end: usize, w: &Words, sent: u64) -> Result<bool, BadWords> {
    let end = end & 1;
    let other = 1 - end;
    if w[0] > 1 {
        return Err(BadWords::Flag(w[0]));
    }
    if w[3] > sent {
        return Err(BadWords::Taken { taken: w[3], sent });
    }
    let mut changed = false;
    if w[0] == 1 {
        if end == 1 {
            if !layout::connector_ready(m) {
                layout::mark_ready(m);
                changed = true;
            }
        } else {
            // Not over a KERNEL this devd wrote.
            changed |= m
                .u32_at(hov::CLAIM)
                .compare_exchange(
                    CLAIM_PENDING,
                    CLAIM_ACCEPTED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok();
        }
    }
    for (off, v) in [(hov::SWITCH, w[1]), (hov::END, w[2])] {
        if v != 0 {
            changed |= m
                .u64_at(off + 8 * other)
                .compare_exchange(0, v, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        }
    }
    let taken = m.u64_at(hov::TAKEN + 8 * end);
    let mut cur = taken.load(Ordering::Acquire);
    while cur & TAKEN_CLOSED == 0 && cur < w[3] {
        match taken.compare_exchange_weak(cur, w[3], Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                changed = true;
                break;
            }
            Err(now) => cur = now,
        }
    }
    Ok(changed)
}

/// The start of a side's move on its page `hov` (end `end`): a writer
/// that had not moved never will, so the other host learns its final
/// SWITCH with the words sent next.
pub fn start_page(hov: &Mapping, end: usize) {
    layout::publish_switch(hov, end & 1, Switch::Never);
}

/// What a side tells the other host: its end's words, and, once it
/// `heard` the other's, where the direction it reads closed.
pub fn our_part(hov: &Mapping, end: usize, heard: bool) -> (Words, Option<u64>) {
    let end = end & 1;
    let closed = match layout::taken(hov, 1 - end) {
        Taken::Closed(at) if heard => Some(at),
        _ => None,
    };
    (ours(hov, end), closed)
}

/// Applies the other host's part (`w`, `closed`) to page `hov` of end
/// `end`, which sent `counts.0` bytes of the direction it writes and gave
/// its reader `counts.1` of the other: the words (checked as any relayed
/// ones), then, the first time (`heard`), the close of the direction it
/// reads at what its reader was given, and the close of the direction it
/// writes at `closed` once that comes. Err: the other host broke a rule
/// (the connection is reset).
pub fn agree_page(
    hov: &Mapping,
    end: usize,
    counts: (u64, u64),
    heard: &mut bool,
    w: &Words,
    closed: Option<u64>,
) -> Result<(), String> {
    let end = end & 1;
    let (sent, received) = counts;
    if w[1] == 0 {
        // Its writer's SWITCH is final at its start (moved, or NEVER).
        return Err("its words carry no SWITCH".into());
    }
    apply(hov, end, w, sent).map_err(|e| e.to_string())?;
    if !*heard {
        *heard = true;
        // The direction this side reads: what its client was given is all
        // the region will carry.
        match layout::close_taken_at(hov, 1 - end, received) {
            Ok(()) => {}
            Err(Taken::Closed(at)) if at == received => {}
            Err(t) => {
                return Err(format!(
                    "its reader's word says {t:?}, {received} bytes were given it"
                ))
            }
        }
    }
    if let Some(at) = closed {
        // The direction this side writes: the other host's reader was
        // given `at` bytes of it.
        if at > sent {
            return Err(format!("closed at {at}, beyond the {sent} bytes sent"));
        }
        match layout::close_taken_at(hov, end, at) {
            Ok(()) => {}
            Err(Taken::Closed(was)) if was == at => {}
            Err(t) => return Err(format!("closed at {at}, the page says {t:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Switch, Taken};

    fn page() -> Mapping {
        let fd = crate::sys::memfd_sealed("relay-test", layout::HOV_PAGE).unwrap();
        Mapping::map(std::os::fd::AsFd::as_fd(&fd), layout::HOV_PAGE, true).unwrap()
    }

    /// Two hosts' pages kept in step by relaying each way, as the engines
    /// do: each end sees what it would see on one shared page.
    #[test]
    fn two_pages_agree() {
        let (a, b) = (page(), page());
        layout::mark_ready(&a);
        assert!(layout::accept_claim(&b));
        assert_eq!(apply(&b, 1, &ours(&a, 0), 0), Ok(true));
        assert_eq!(apply(&a, 0, &ours(&b, 1), 0), Ok(true));
        assert!(layout::connector_ready(&b));
        assert_eq!(layout::claim(&a), CLAIM_ACCEPTED);
        layout::publish_switch(&a, 0, Switch::After(5));
        layout::publish_switch(&b, 1, Switch::After(7));
        assert_eq!(apply(&b, 1, &ours(&a, 0), 0), Ok(true));
        assert_eq!(apply(&a, 0, &ours(&b, 1), 0), Ok(true));
        assert_eq!(layout::switch_at(&b, 0), Switch::After(5));
        assert_eq!(layout::switch_at(&a, 1), Switch::After(7));
        // The acceptor took 100 of the connector's bytes; the connector
        // sent 100.
        layout::add_taken(&b, 0, 100).unwrap();
        assert_eq!(apply(&a, 0, &ours(&b, 1), 100), Ok(true));
        assert_eq!(layout::taken(&a, 0), Taken::Open(100));
        // Nothing new: no change.
        assert_eq!(apply(&a, 0, &ours(&b, 1), 100), Ok(false));
        layout::publish_end(&a, 0, 100);
        assert_eq!(apply(&b, 1, &ours(&a, 0), 0), Ok(true));
        assert_eq!(layout::end_at(&b, 0), layout::End::At(100));
    }

    /// What the other host says never overwrites this end's own words, a
    /// KERNEL this devd wrote, or a first value; TAKEN never goes back.
    #[test]
    fn first_values_stay() {
        let a = page();
        let (off, kernel) = layout::claim_kernel_bytes();
        a.u32_at(usize::try_from(off).unwrap())
            .store(u32::from_le_bytes(kernel), Ordering::Release);
        layout::publish_switch(&a, 1, Switch::After(3));
        layout::publish_switch(&a, 0, Switch::After(9));
        // Only TAKEN moves.
        assert_eq!(apply(&a, 0, &[1, 20, 0, 50], 60), Ok(true));
        assert_eq!(layout::claim(&a), layout::CLAIM_KERNEL);
        assert_eq!(layout::switch_at(&a, 1), Switch::After(3));
        assert_eq!(layout::switch_at(&a, 0), Switch::After(9));
        assert_eq!(layout::taken(&a, 0), Taken::Open(50));
        assert_eq!(apply(&a, 0, &[1, 20, 0, 40], 60), Ok(false));
        assert_eq!(layout::taken(&a, 0), Taken::Open(50));
        // A closed region part stays closed where it was.
        layout::close_taken(&a, 0, 0).unwrap();
        assert_eq!(apply(&a, 0, &[0, 0, 0, 60], 60), Ok(false));
        assert_eq!(layout::taken(&a, 0), Taken::Closed(50));
    }

    #[test]
    fn hostile_words_are_refused() {
        let a = page();
        assert_eq!(apply(&a, 0, &[2, 0, 0, 0], 0), Err(BadWords::Flag(2)));
        assert_eq!(
            apply(&a, 0, &[0, 0, 0, 11], 10),
            Err(BadWords::Taken {
                taken: 11,
                sent: 10
            })
        );
        assert_eq!(layout::taken(&a, 0), Taken::Open(0));
    }
}
