//! `Options`: how a connection should be set up (the devd session, the
//! transport to ask for, the spin budget). Shared by the negotiation
//! (`negotiate.rs`) and the socket API over it (`stream.rs`), below both.
//!
//! Never here: negotiation, sockets, or any request to devd.

use crate::session::Session;
use ssock_rings::codec::ModePref;
use std::sync::Arc;
use std::time::Duration;

/// Environment variable: spin budget in microseconds for blocking calls.
pub const SPIN_ENV: &str = "SSOCK_SPIN_US";

/// How a connection should be set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// devd session; None: the process-wide one (found by path), if any.
    pub session: Option<Arc<Session>>,
    /// Which transport to ask for.
    pub mode: ModePref,
    /// Spin budget; None: `SSOCK_SPIN_US`, else devd's config.
    pub spin: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            session: None,
            mode: ModePref::Auto,
            spin: None,
        }
    }
}

impl Options {
    /// Options using a given session.
    pub fn with_session(session: Arc<Session>) -> Options {
        Options {
            session: Some(session),
            ..Options::default()
        }
    }

    pub(crate) fn session(&self) -> Option<Arc<Session>> {
        if self.mode == ModePref::Kernel {
            return None;
        }
        self.session.clone().or_else(Session::global)
    }

    /// The spin budget: the explicit one, else `SSOCK_SPIN_US`, else devd's.
    pub fn spin(&self, s: Option<&Arc<Session>>) -> Duration {
        if let Some(d) = self.spin {
            return d;
        }
        if let Some(us) = ssock_rings::env::var(SPIN_ENV).and_then(|v| v.parse::<u64>().ok()) {
            return Duration::from_micros(us);
        }
        s.map_or(ssock_rings::notify::DEFAULT_SPIN, |s| s.spin)
    }
}
