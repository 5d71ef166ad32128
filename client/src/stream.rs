//! `Stream` and `Listener`: TCP-like sockets whose bytes move over the
//! transport chosen at negotiation (DESIGN 3.2). The kernel TCP socket is
//! always real: it carries the handshake and, until each direction moves to
//! the region, that direction's bytes; afterwards it is the liveness
//! channel.

use crate::negotiate::{accept_on, connect_start, register_listener, Accepted, Started};
pub use crate::options::{Options, SPIN_ENV};
use crate::session::Session;
use crate::transport::kernel::Kernel;
use crate::transport::{Ctx, Transport};
use ssock_rings::codec::{FallbackReason, Mode, Request};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A connected stream.
#[derive(Debug)]
pub struct Stream {
    // Field order is drop order: the transport closes (end-of-stream mark,
    // release) before the kernel socket does.
    transport: Box<dyn Transport>,
    tcp: TcpStream,
    fallback: Option<FallbackReason>,
    nonblocking: bool,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    spin: Duration,
    read_shut: bool,
}

impl Stream {
    /// Connects with default options (the process's devd, devd's default mode).
    pub fn connect(addr: impl ToSocketAddrs) -> io::Result<Stream> {
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to");
        for a in addr.to_socket_addrs()? {
            match Stream::connect_with(a, &Options::default()) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Connects to `dst`, accelerated if devd and the peer agree.
    pub fn connect_with(dst: SocketAddr, opts: &Options) -> io::Result<Stream> {
        let session = opts.session();
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(dst),
            socket2::Type::STREAM,
            None,
        )?;
        let spin = opts.spin(session.as_ref());
        let r = connect_start(sock.as_fd(), dst, opts, session.as_ref())?;
        let tcp: TcpStream = sock.into();
        match r {
            Started::Up {
                transport,
                under_way: None,
            } => Ok(Stream::new(transport, tcp, None, spin)),
            Started::Up {
                under_way: Some(e), ..
            } => Err(e),
            Started::Kernel(reason) => Stream::kernel(tcp, reason, spin),
        }
    }

    fn kernel(
        tcp: TcpStream,
        reason: Option<FallbackReason>,
        spin: Duration,
    ) -> io::Result<Stream> {
        Ok(Stream::new(Box::new(Kernel::new(&tcp)?), tcp, reason, spin))
    }

    fn new(
        transport: Box<dyn Transport>,
        tcp: TcpStream,
        fallback: Option<FallbackReason>,
        spin: Duration,
    ) -> Stream {
        Stream {
            // Paired by devd: not a kernel stream from the start.
            transport,
            tcp,
            fallback,
            nonblocking: false,
            read_timeout: None,
            write_timeout: None,
            spin,
            read_shut: false,
        }
    }

    /// Which transport the connection uses.
    pub fn mode(&self) -> Mode {
        self.transport.mode()
    }

    /// Whether the connection moved back to its kernel socket after its
    /// region stopped carrying bytes (a Queued connection whose devd is
    /// gone), and how many bytes this end sent again there.
    pub fn moved_back(&self) -> Option<u64> {
        self.transport.moved_back()
    }

    /// devd's connection id, if accelerated.
    pub fn conn_id(&self) -> Option<u64> {
        self.transport.conn_id()
    }

    /// Why the connection is on kernel TCP, when known.
    pub fn fallback_reason(&self) -> Option<FallbackReason> {
        match self.fallback {
            // devd paired it (a hand-over end, also once it turned
            // plain), and said kernel TCP after the connect.
            None if self.transport.handover_words().is_some() && self.mode() == Mode::Kernel => {
                Some(FallbackReason::Refused)
            }
            r => r,
        }
    }

    /// The kernel socket (addresses, options; never read or write it).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Peer address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    /// Nonblocking mode: calls return EWOULDBLOCK instead of waiting.
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        self.tcp.set_nonblocking(on)?;
        self.nonblocking = on;
        Ok(())
    }

    /// Like SO_RCVTIMEO.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)?;
        self.read_timeout = t;
        Ok(())
    }

    /// Like SO_SNDTIMEO.
    pub fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(t)?;
        self.write_timeout = t;
        Ok(())
    }

    /// Sets the spin budget for this stream's blocking calls.
    pub fn set_spin(&mut self, d: Duration) {
        self.spin = d;
    }

    /// Reads without consuming (MSG_PEEK).
    pub fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read_shut {
            return Ok(0);
        }
        let ctx = ctx(&self.tcp, self.nonblocking, self.read_timeout, self.spin);
        self.transport.peek(buf, &ctx)
    }

    /// Shuts down reading, writing or both, like `shutdown(2)`.
    pub fn shutdown(&mut self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            self.read_shut = true;
            if self.mode() == Mode::Kernel {
                self.tcp.shutdown(Shutdown::Read)?;
            }
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            let ctx = ctx(&self.tcp, self.nonblocking, None, self.spin);
            self.transport.shutdown_write(&ctx)?;
        }
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read_shut {
            return Ok(0);
        }
        let ctx = ctx(&self.tcp, self.nonblocking, self.read_timeout, self.spin);
        self.transport.read(buf, &ctx)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let ctx = ctx(&self.tcp, self.nonblocking, self.write_timeout, self.spin);
        self.transport.write(buf, &ctx)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The context a transport call gets: the kernel socket and how to wait.
fn ctx(tcp: &TcpStream, nonblocking: bool, timeout: Option<Duration>, spin: Duration) -> Ctx<'_> {
    let tcp = tcp.as_fd();
    Ctx {
        tcp,
        nonblocking,
        // A timeout too large for the clock waits for ever.
        deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
        spin,
        check_peer: true,
        plain: false,
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let c = ctx(&self.tcp, false, None, Duration::ZERO);
        self.transport.close_on(&c);
    }
}

/// A listening socket whose accepted connections are accelerated when the
/// connecting process announced itself to devd.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    /// The address it is bound to (an accepted socket's, unless a wildcard).
    at: Option<SocketAddr>,
    session: Option<Arc<Session>>,
    opts: Options,
}

impl Listener {
    /// Binds with default options.
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<Listener> {
        Listener::bind_with(addr, &Options::default())
    }

    /// Binds and registers the listener with devd (if reachable).
    pub fn bind_with(addr: impl ToSocketAddrs, opts: &Options) -> io::Result<Listener> {
        let tcp = TcpListener::bind(addr)?;
        let session = opts.session().filter(|s| register_listener(s, tcp.as_fd()));
        Ok(Listener {
            at: tcp.local_addr().ok(),
            tcp,
            session,
            opts: opts.clone(),
        })
    }

    /// Local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Whether devd knows this listener (connections can be accelerated).
    pub fn registered(&self) -> bool {
        self.session.is_some()
    }

    /// Accepts a connection; negotiates if the connector announced itself.
    pub fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        let (tcp, peer) = self.tcp.accept()?;
        Ok((self.negotiate(tcp)?, peer))
    }

    /// Negotiates one accepted socket.
    fn negotiate(&self, tcp: TcpStream) -> io::Result<Stream> {
        let spin = self.opts.spin(self.session.as_ref());
        let Some(session) = &self.session else {
            return Stream::kernel(tcp, None, spin);
        };
        match accept_on(session, tcp.as_fd(), self.at)? {
            Accepted::Attached(t) => Ok(Stream::new(t, tcp, None, spin)),
            Accepted::Kernel(reason) => Stream::kernel(tcp, reason, spin),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(s) = &self.session {
            let _ = s.request(&Request::Unlisten, &[self.tcp.as_fd()]);
        }
    }
}
