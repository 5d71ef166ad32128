//! Listener registrations: Listen and Unlisten, and letting go of a
//! listener nobody holds any more (sock_diag's dump of listening sockets).
//!
//! Never here: pairing connections, or a registration without the socket
//! that proves it.

use super::*;

impl Devd {
    pub(super) fn listen(&mut self, sid: u64, fd: &OwnedFd) -> Result<Reply, RequestError> {
        let end = self.end(sid, fd)?;
        if end.addr.port() == 0 {
            return Err(RequestError::Unbound);
        }
        let listening = sys::sockopt_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
            .map_err(RequestError::NotSocket)?;
        if listening == 0 {
            return Err(RequestError::NotListening);
        }
        let dual_stack = end.addr.is_ipv6()
            && sys::sockopt_int(fd.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
                .is_ok_and(|v| v == 0);
        let l = registry::Listener {
            session: Some(sid),
            addr: end.addr,
            dual_stack,
            seen: None,
            short: Default::default(),
        };
        self.reg.listeners.insert(end.inode, l);
        self.listeners_changed();
        Ok((Response::Ok, vec![]))
    }

    /// A process closes its listener (the fd it sends proves it holds
    /// it). Others may hold it still (pre-fork workers, a daemon's child):
    /// the registration stays with the socket, looked up with sock_diag at
    /// the next Intent to its address ([`Devd::check_listeners`]).
    pub(super) fn unlisten(&mut self, _sid: u64, fd: &OwnedFd) -> Result<Reply, RequestError> {
        let inode = sys::socket_inode(fd.as_fd()).map_err(RequestError::NotSocket)?;
        self.let_go_of_listener(inode);
        Ok((Response::Ok, vec![]))
    }

    /// The registration of listener `inode` no longer has a session:
    /// it belongs to the socket alone, or, without sock_diag to tell
    /// whether anyone holds the socket, it is dropped.
    pub(super) fn let_go_of_listener(&mut self, inode: u64) {
        if self.diag.is_none() {
            self.reg.listeners.remove(&inode);
            self.listeners_changed();
        } else if let Some(l) = self.reg.listeners.get_mut(&inode) {
            l.session = None;
            l.seen = None;
        }
    }

    /// Looks up, with one sock_diag dump, the sessionless listeners that
    /// `stale` selects, and drops those no process holds any more (on a
    /// failed look-up, all of them: a connection to them stays on kernel
    /// TCP, which is never wrong).
    pub(super) fn check_listeners(&mut self, stale: impl Fn(&registry::Listener) -> bool) {
        let now = Instant::now();
        let concerned: Vec<u64> = self
            .reg
            .listeners
            .iter()
            .filter(|(_, l)| l.session.is_none() && stale(l))
            .map(|(&inode, _)| inode)
            .collect();
        if concerned.is_empty() {
            return;
        }
        let held = match &self.diag {
            Some(diag) => {
                self.diag_seq = self.diag_seq.wrapping_add(1);
                crate::sys::tcp_listeners(diag.as_fd(), self.diag_seq)
            }
            None => Err(io::Error::other("no sock_diag")),
        };
        for inode in concerned {
            match &held {
                Ok(set) if set.contains(&inode) => {
                    if let Some(l) = self.reg.listeners.get_mut(&inode) {
                        l.seen = Some(now);
                    }
                }
                Ok(_) => {
                    self.reg.listeners.remove(&inode);
                }
                Err(e) => {
                    log::debug!("listener {inode}: sock_diag: {e}");
                    self.reg.listeners.remove(&inode);
                }
            }
        }
        self.listeners_changed();
    }
}
