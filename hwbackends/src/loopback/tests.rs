//! The conformance suite on the loopback, then what only the loopback
//! does (no remote peer).

use super::Loopback;
use crate::conformance::{self, End, Lab};
use crate::{Backend, BackendError, Peer};

/// One loopback instance; pairs are channels 2k and 2k+1.
struct Local {
    b: Loopback,
    next: u64,
}

impl Lab for Local {
    fn pair(&mut self) -> [End; 2] {
        let (x, y) = (self.next, self.next + 1);
        self.next += 2;
        self.b.open(x, Peer::Local(y)).unwrap();
        self.b.open(y, Peer::Local(x)).unwrap();
        [End { at: 0, ch: x }, End { at: 0, ch: y }]
    }

    fn backend(&mut self, _: usize) -> &mut dyn Backend {
        &mut self.b
    }

    fn settle(&mut self) {}

    fn poll(&mut self, _: usize) -> Vec<crate::ChannelId> {
        let mut r = Vec::new();
        self.b.poll(&mut r);
        r
    }
}

#[test]
fn the_loopback_passes_the_conformance_suite() {
    for window in [4096, 100_000, super::DEFAULT_WINDOW] {
        conformance::run_all(&mut || {
            Box::new(Local {
                b: Loopback::new(window),
                next: 2,
            })
        });
    }
}

#[test]
fn a_remote_peer_is_unreachable_and_nothing_is_asked_of_the_sandbox() {
    let mut l = Loopback::default();
    let r = l.open(
        1,
        Peer::Remote {
            node: 2,
            channel: 1,
        },
    );
    assert_eq!(r, Err(BackendError::Unreachable(1)));
    assert_eq!(l.send(1, b"x"), Err(BackendError::NoChannel(1)));
    assert!(l.readiness().is_empty());
    assert!(l.deadline().is_none());
    assert!(l.syscalls().is_empty());
    assert!(!l.capabilities().remote);
    assert!(l.capabilities().passive);
}
