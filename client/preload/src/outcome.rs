//! `Outcome`: how a call on an accelerated socket ended, as the dispatch
//! paths see it: served by the shim, handed to libc because the socket's
//! negotiation ended on kernel TCP after all, or failed with an errno for
//! the application. (It replaces an errno-like sentinel that meant "go to
//! libc" inside `Result<_, i32>`.)
//!
//! Never here: any decision or side effect; this is a type and its
//! plumbing.

/// How a call on an accelerated socket ended.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<T> {
    /// Served by the shim: what the call returns to the application.
    Done(T),
    /// The socket is kernel TCP after all (devd said so after the connect:
    /// the transport let its end go). The caller forgets the socket and
    /// hands the call to libc, on the same fd.
    Kernel,
    /// Failed: the errno the application sees (never a shim-private code).
    Errno(i32),
}

impl<T> Outcome<T> {
    /// The value of a served call turned into another.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Done(v) => Outcome::Done(f(v)),
            Outcome::Kernel => Outcome::Kernel,
            Outcome::Errno(e) => Outcome::Errno(e),
        }
    }
}

impl<T> From<Result<T, i32>> for Outcome<T> {
    /// A call that cannot end on kernel TCP: its value or its errno.
    fn from(r: Result<T, i32>) -> Outcome<T> {
        match r {
            Ok(v) => Outcome::Done(v),
            Err(e) => Outcome::Errno(e),
        }
    }
}
