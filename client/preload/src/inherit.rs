//! Inheritance at load: the library's constructor takes over the
//! accelerated sockets this process inherited across exec (each socket
//! once, however many fds name it) and registers the listeners again;
//! `SSOCK_LOG` is set up first.
//!
//! Never here: anything after load, or any fd that is not a socket.

use crate::boundary::{borrow, enter};
use crate::{fdpass, logging, real, sock, table};
use libc::c_int;

/// At load time (the library's constructor): sockets inherited across
/// exec are taken over.
pub fn inherit_at_load() {
    enter(
        || {
            logging::init();
            if sock::disabled() {
                return 0;
            }
            let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
                return 0;
            };
            let fds: Vec<c_int> = dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            let mut seen: Vec<(Option<u64>, c_int)> = Vec::new();
            for fd in fds {
                // The directory's own fd is in the list, closed by now.
                // SAFETY: F_GETFD on any number only reads its flags.
                if unsafe { (real::get().fcntl)(fd, libc::F_GETFD) } < 0 {
                    continue;
                }
                // SAFETY: fd is open (just checked) and stays so: nothing
                // else runs in this process yet.
                let b = unsafe { borrow(fd) };
                if ssock_rings::sys::socket_type(b).is_err() {
                    continue;
                }
                // Several fds of one socket (dup2 onto 0 and 1, inetd
                // style) are one socket here too: taken over once.
                let inode = ssock_rings::sys::socket_inode(b).ok();
                match seen.iter().find(|(i, _)| inode.is_some() && *i == inode) {
                    Some((_, first)) => {
                        table::duplicate(*first, fd);
                        crate::stdio::check(fd);
                    }
                    None => {
                        fdpass::adopt(fd);
                        seen.push((inode, fd));
                    }
                }
            }
            0
        },
        || 0,
    );
}
