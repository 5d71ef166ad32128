//! Plain kernel TCP: the fallback, and what unaccelerated peers get. Only
//! the Rust API uses this transport (the preload shim hands kernel sockets
//! straight to libc); it owns a duplicate of the stream's socket.

use super::{Ctx, Transport};
use ssock_rings::codec::Mode;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};

/// Kernel TCP transport: bytes go through the TCP socket itself.
#[derive(Debug)]
pub struct Kernel {
    tcp: TcpStream,
}

impl Kernel {
    /// Kernel transport over (a duplicate of) `tcp`.
    pub fn new(tcp: &TcpStream) -> io::Result<Kernel> {
        Ok(Kernel {
            tcp: tcp.try_clone()?,
        })
    }
}

impl Transport for Kernel {
    fn mode(&self) -> Mode {
        Mode::Kernel
    }
    fn conn_id(&self) -> Option<u64> {
        None
    }
    fn read(&mut self, buf: &mut [u8], _ctx: &Ctx<'_>) -> io::Result<usize> {
        self.tcp.read(buf)
    }
    fn peek(&mut self, buf: &mut [u8], _ctx: &Ctx<'_>) -> io::Result<usize> {
        self.tcp.peek(buf)
    }
    fn write(&mut self, buf: &[u8], _ctx: &Ctx<'_>) -> io::Result<usize> {
        self.tcp.write(buf)
    }
    fn shutdown_write(&mut self, _ctx: &Ctx<'_>) -> io::Result<()> {
        self.tcp.shutdown(Shutdown::Write)
    }
    fn close(&mut self) {}
}
