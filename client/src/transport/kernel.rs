//! Plain kernel TCP: the fallback, and what unaccelerated peers get.

use super::{Ctx, Transport};
use ssock_rings::codec::Mode;
use std::io::{self, Read, Write};
use std::net::Shutdown;

/// Kernel TCP transport: bytes go through the TCP socket itself.
#[derive(Debug, Default)]
pub struct Kernel;

impl Transport for Kernel {
    fn mode(&self) -> Mode {
        Mode::Kernel
    }
    fn conn_id(&self) -> Option<u64> {
        None
    }
    fn read(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        let mut t = ctx.tcp;
        t.read(buf)
    }
    fn peek(&mut self, buf: &mut [u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        ctx.tcp.peek(buf)
    }
    fn write(&mut self, buf: &[u8], ctx: &Ctx<'_>) -> io::Result<usize> {
        let mut t = ctx.tcp;
        t.write(buf)
    }
    fn shutdown_write(&mut self, ctx: &Ctx<'_>) -> io::Result<()> {
        ctx.tcp.shutdown(Shutdown::Write)
    }
    fn close(&mut self) {}
}
