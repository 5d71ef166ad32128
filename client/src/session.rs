//! A process's control session with devd: one SOCK_SEQPACKET connection,
//! request/response, shared by all threads of the process.

use ssock_rings::codec::{DecodeError, Mode, Request, Response, MAX_FDS, MAX_FRAME};
use ssock_rings::sys::SeqPacket;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Why talking to devd failed. Every variant means "this connection stays
/// on kernel TCP" (see [`SessionError::falls_back`]).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No devd listens at the path.
    #[error("cannot reach devd at {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The control socket failed mid-request.
    #[error("control socket i/o failed")]
    Io(#[source] io::Error),
    /// devd closed the session.
    #[error("devd closed the control session")]
    Closed,
    /// devd's reply was malformed.
    #[error("devd sent a malformed reply")]
    Decode(#[source] DecodeError),
    /// devd refused the request.
    #[error("devd refused the request (code {code}): {message}")]
    Refused {
        /// errno-like code.
        code: u32,
        /// devd's sentence.
        message: String,
    },
    /// devd answered with a reply that does not fit the request.
    #[error("devd answered {0} to a request that cannot take it")]
    Unexpected(&'static str),
}

impl SessionError {
    /// Whether the failure leaves the connection on kernel TCP (true) or
    /// must be reported to the application (false). Today every session
    /// failure is a fallback: the application never depends on devd.
    pub fn falls_back(&self) -> bool {
        match self {
            SessionError::Connect { .. }
            | SessionError::Io(_)
            | SessionError::Closed
            | SessionError::Decode(_)
            | SessionError::Refused { .. }
            | SessionError::Unexpected(_) => true,
        }
    }
}

/// A control session.
#[derive(Debug)]
pub struct Session {
    sock: Mutex<SeqPacket>,
    /// Spin budget devd's config suggests.
    pub spin: Duration,
    /// devd's default mode.
    pub default_mode: Mode,
    path: PathBuf,
}

impl Session {
    /// Connects to devd at `path` and says Hello.
    pub fn connect(path: &Path) -> Result<Arc<Session>, SessionError> {
        let sock = SeqPacket::connect(path).map_err(|source| SessionError::Connect {
            path: path.into(),
            source,
        })?;
        sock.set_recv_timeout(Some(Duration::from_secs(10)))
            .map_err(SessionError::Io)?;
        let s = Session {
            sock: Mutex::new(sock),
            spin: ssock_rings::notify::DEFAULT_SPIN,
            default_mode: Mode::Direct,
            path: path.into(),
        };
        match s.request(
            &Request::Hello {
                pid: std::process::id(),
            },
            &[],
        )? {
            (
                Response::Welcome {
                    spin_us,
                    default_mode,
                },
                _,
            ) => Ok(Arc::new(Session {
                spin: Duration::from_micros(u64::from(spin_us)),
                default_mode,
                ..s
            })),
            _ => Err(SessionError::Unexpected("a non-Welcome")),
        }
    }

    /// The process-wide session to the default devd (see
    /// `ssock_rings::paths`), connected on first use; None if devd is not
    /// reachable (then the next call tries again).
    pub fn global() -> Option<Arc<Session>> {
        static GLOBAL: OnceLock<Mutex<Option<Arc<Session>>>> = OnceLock::new();
        let cell = GLOBAL.get_or_init(|| Mutex::new(None));
        let mut g = cell.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Session::connect(&ssock_rings::paths::client_socket()).ok();
        }
        g.clone()
    }

    /// Socket path this session uses.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a request with its fds and waits for the reply. A `Response::Error`
    /// becomes `SessionError::Refused`.
    pub fn request(
        &self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Response, Vec<OwnedFd>), SessionError> {
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        sock.send(&req.encode(), fds).map_err(SessionError::Io)?;
        let mut buf = vec![0u8; MAX_FRAME];
        let (n, got) = sock.recv(&mut buf, MAX_FDS).map_err(SessionError::Io)?;
        if n == 0 {
            return Err(SessionError::Closed);
        }
        let resp = Response::decode(&buf[..n], got.len()).map_err(SessionError::Decode)?;
        match resp {
            Response::Error { code, message } => Err(SessionError::Refused { code, message }),
            r => Ok((r, got)),
        }
    }
}
