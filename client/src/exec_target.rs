//! What exec will run, and whether the loader can preload the shim into
//! it: a program found as exec finds it (PATH search for a bare name), and
//! the reasons it cannot be intercepted (set-id or file capabilities: the
//! loader ignores LD_PRELOAD; a static ELF or one of another class or
//! machine: nothing loads the 64-bit library; a script: its interpreter's
//! reasons). Used by `ssock-run` to warn, and by the shim before an exec
//! to decide whether the new program takes its connections over.
//!
//! Never here: a decision that a program can be intercepted when it
//! cannot tell (an unreadable file, a malformed ELF say "cannot").

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// How many `#!` interpreters deep a script is followed (the kernel's
/// own limit is about as far).
const SCRIPT_DEPTH: usize = 4;

/// `prog` as exec would find it (PATH search for a bare name, `path`
/// being the PATH value; unset: the C library's default): an executable
/// file, or None.
pub fn resolve(prog: &OsStr, path: Option<&OsStr>) -> Option<PathBuf> {
    // As the C library's search: a file this process may execute.
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file()) && ssock_rings::sys::executable(p)
    };
    if prog.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(prog)).filter(|p| runnable(p));
    }
    let default = OsString::from("/bin:/usr/bin");
    std::env::split_paths(path.unwrap_or(&default))
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            }
            .join(prog)
        })
        .find(|p| runnable(p))
}

/// Why the loader cannot preload the shim into the program at `path`, if
/// it cannot.
pub fn not_interceptable(path: &Path) -> Option<String> {
    not_interceptable_at(path, 0)
}

fn not_interceptable_at(path: &Path, depth: usize) -> Option<String> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Some(format!("{} cannot be read", path.display()));
    };
    if meta.permissions().mode() & 0o6000 != 0 {
        return Some("it is setuid/setgid: the loader ignores LD_PRELOAD".into());
    }
    if has_file_caps(path) {
        return Some("it has file capabilities: the loader ignores LD_PRELOAD".into());
    }
    let mut head = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(64 * 1024).read_to_end(&mut head));
    if read.is_err() {
        return Some(format!("{} cannot be read", path.display()));
    }
    if head.starts_with(b"#!") {
        if depth >= SCRIPT_DEPTH {
            return Some("its #! interpreters nest too deep".into());
        }
        let line = head[2..].split(|&b| b == b'\n').next().unwrap_or(&[]);
        let interp = line
            .split(|&b| b == b' ' || b == b'\t')
            .find(|w| !w.is_empty())?;
        return not_interceptable_at(Path::new(OsStr::from_bytes(interp)), depth + 1)
            .map(|why| format!("its interpreter {}: {why}", String::from_utf8_lossy(interp)));
    }
    elf_reason(&head)
}

/// Whether the file carries capabilities (the loader then runs it in
/// secure-execution mode).
fn has_file_caps(path: &Path) -> bool {
    ssock_rings::sys::has_xattr(path, c"security.capability")
}

/// Why an ELF image (its first bytes) cannot load the shim, if it cannot.
fn elf_reason(elf: &[u8]) -> Option<String> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Some("it is neither an ELF program nor a script".into());
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Some("it is not a 64-bit little-endian program (libssock.so is)".into());
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let malformed = || Some("its ELF header cannot be read".to_string());
    let Some(machine) = u16_at(0x12) else {
        return malformed();
    };
    if machine != own_machine() {
        return Some("it is built for another machine".into());
    }
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return malformed();
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return malformed();
    };
    let mut interp = None;
    for i in 0..usize::from(count) {
        let o = phoff.saturating_add(i.saturating_mul(usize::from(size)));
        match elf.get(o..o.saturating_add(4)) {
            // PT_INTERP: the loader's path, at p_offset, p_filesz long.
            Some(t) if t == 3u32.to_le_bytes() => {
                let (Some(off), Some(len)) = (u64_at(o + 8), u64_at(o + 32)) else {
                    return malformed();
                };
                let at = usize::try_from(off).unwrap_or(usize::MAX);
                let end = at.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
                let Some(name) = elf.get(at..end) else {
                    return malformed();
                };
                interp = Some(name);
            }
            Some(_) => {}
            None => return malformed(),
        }
    }
    match interp {
        None => Some("it is statically linked: there is no loader to preload into".into()),
        // The C library's loader (libssock.so is built against it); another
        // one (musl's) would not load it.
        Some(name) if !name.windows(6).any(|w| w == b"ld-lin") => Some(format!(
            "its loader {} is not the GNU C library's",
            String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(name))
        )),
        Some(_) => None,
    }
}

/// This library's ELF machine number (e_machine).
fn own_machine() -> u16 {
    if cfg!(target_arch = "x86_64") {
        62
    } else if cfg!(target_arch = "aarch64") {
        183
    } else if cfg!(target_arch = "riscv64") {
        243
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_program_can_be_intercepted_and_a_script_is_judged_by_its_interpreter() {
        let sh = resolve(OsStr::new("sh"), Some(OsStr::new("/usr/bin:/bin"))).unwrap();
        assert_eq!(not_interceptable(&sh), None);
        let dir = std::env::temp_dir().join(format!("ssock-exec-target-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("s");
        std::fs::write(&script, format!("#!{} -e\necho\n", sh.display())).unwrap();
        assert_eq!(not_interceptable(&script), None);
        let bad = dir.join("b");
        std::fs::write(&bad, "#!/nonexistent/interp\n").unwrap();
        assert!(not_interceptable(&bad)
            .unwrap()
            .contains("/nonexistent/interp"));
        let junk = dir.join("j");
        std::fs::write(&junk, "\x7fELF\x01\x01").unwrap();
        assert!(not_interceptable(&junk).unwrap().contains("64-bit"));
        let cut = dir.join("c");
        let mut elf = std::fs::read(&sh).unwrap();
        elf.truncate(0x40);
        std::fs::write(&cut, elf).unwrap();
        assert!(not_interceptable(&cut).unwrap().contains("ELF header"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(resolve(
            OsStr::new("no-such-program-here"),
            Some(OsStr::new("/usr/bin"))
        )
        .is_none());
    }
}
