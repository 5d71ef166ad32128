//! Which fds ssock itself opened in this process (the devd session, the
//! shim's log, doorbells, regions): the preload shim keeps them out of the
//! application's reach. A program that closes every fd it does not know
//! (`close_range`, `closefrom`, a close loop: ssh and many daemons do)
//! would otherwise close them, and the next fd it opens would get the
//! number while ssock still writes to it.
//!
//! Bit 0 of the fd flags ([`crate::fdflags`]), set when an fd is created or
//! received through [`crate::sys`] and cleared when ssock closes it (the
//! shim's `close` sees its own calls).
//!
//! Never here: closing, duplicating or moving an fd (see
//! [`crate::sys::move_high`]).

use crate::fdflags::Flag;
pub use crate::fdflags::LIMIT;
use std::os::fd::RawFd;

/// Its bit of the fd flags.
pub static OWN: Flag = Flag::new(crate::fdflags::OWN_BIT);

/// `fd` is ssock's from now on.
pub fn own(fd: RawFd) {
    OWN.insert(fd);
}

/// `fd` is no longer ssock's (it is being closed, or was taken over).
pub fn disown(fd: RawFd) {
    OWN.remove(fd);
}

/// Whether `fd` is ssock's.
pub fn owned(fd: RawFd) -> bool {
    OWN.contains(fd)
}

/// ssock's fds from `first` to `last` (both included), in order.
pub fn owned_in(first: u32, last: u32) -> Vec<RawFd> {
    OWN.within(first, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_fds_are_found_in_their_range_and_forgotten_when_disowned() {
        for fd in [70_001, 70_063, 70_064, 70_200] {
            own(fd);
        }
        assert!(owned(70_063));
        assert!(!owned(70_002));
        assert_eq!(owned_in(70_002, 70_199), vec![70_063, 70_064]);
        assert_eq!(
            owned_in(70_000, 70_300),
            vec![70_001, 70_063, 70_064, 70_200]
        );
        for fd in [70_001, 70_063, 70_064, 70_200] {
            disown(fd);
        }
        assert!(owned_in(70_000, 70_300).is_empty());
        own(-1);
        own(RawFd::try_from(LIMIT).unwrap());
        assert!(!owned(-1));
    }
}
