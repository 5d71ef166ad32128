//! Giving up root once devd holds what only root may open: its control
//! socket and lock, the windows of its links, the port its peers dial.
//! devd then runs as the user of its config (`run_as`, docs/config.md)
//! with no capabilities at all (none permitted, effective, inheritable or
//! ambient, an empty bounding set, no_new_privs), before any other thread
//! starts, so that every thread serves as that user.
//!
//! Never here: anything that serves, or a way back to root.

use crate::sys;
use anyhow::{bail, Context};

/// What devd became.
#[derive(Debug, PartialEq, Eq)]
pub struct Dropped {
    pub uid: u32,
    pub gid: u32,
}

/// Becomes `user` for good when devd runs as root (Some: it did). A devd
/// that runs as `user` already, or is root and asked to stay root, has
/// nothing to do (None); any other cannot become `user`: an error.
pub fn run_as(user: &str) -> anyhow::Result<Option<Dropped>> {
    let (uid, gid) = sys::user_ids(user)
        .with_context(|| format!("run_as: cannot look up user {user:?}"))?
        .with_context(|| {
            format!(
                "run_as: there is no user {user:?} on this host; create it \
                 (useradd --system --no-create-home --shell /usr/sbin/nologin {user}) \
                 or leave run_as out to keep devd's own user"
            )
        })?;
    let euid = sys::euid();
    if euid != 0 {
        if euid == uid {
            return Ok(None);
        }
        bail!("run_as {user:?}: devd runs as uid {euid}, not root, and cannot become uid {uid}");
    }
    if uid == 0 {
        return Ok(None);
    }
    // Only root may empty the bounding set; a host that does not let it
    // (no CAP_SETPCAP) still gets a devd with no capability it can use:
    // no_new_privs means no exec gives any back.
    if let Err(e) = sys::drop_bounding_set() {
        log::warn!("run_as: the capability bounding set stays as it was: {e}");
    }
    sys::become_user(uid, gid)
        .with_context(|| format!("run_as: cannot become {user:?} (uid {uid}, gid {gid})"))?;
    sys::no_capabilities().context("run_as: cannot clear the capabilities")?;
    let status = std::fs::read_to_string("/proc/self/status")
        .context("run_as: cannot read /proc/self/status to check")?;
    check(&status, uid, gid).context("run_as: after the switch")?;
    Ok(Some(Dropped { uid, gid }))
}

/// Whether a /proc/PID/status text shows every id `uid` and `gid`, no
/// supplementary group, and no capability permitted, effective,
/// inheritable or ambient.
pub fn check(status: &str, uid: u32, gid: u32) -> anyhow::Result<()> {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .with_context(|| format!("no {key} line"))
    };
    for (key, want) in [("Uid:", uid), ("Gid:", gid)] {
        let ids = field(key)?;
        let all = ids.split_whitespace().map(str::parse::<u32>);
        if all.clone().count() != 4 || !all.into_iter().all(|v| v.ok() == Some(want)) {
            bail!("{key} {ids}, not {want} four times");
        }
    }
    let groups = field("Groups:")?;
    if !groups.is_empty() {
        bail!("supplementary groups left: {groups}");
    }
    for key in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        let v = field(key)?;
        if u64::from_str_radix(v, 16).ok() != Some(0) {
            bail!("{key} {v}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROPPED: &str = "Name:\tdevd\nUid:\t998\t998\t998\t998\nGid:\t997\t997\t997\t997\n\
        Groups:\t\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
        CapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\n";

    #[test]
    fn a_status_is_clean_only_with_every_id_switched_and_no_capability() {
        assert!(check(DROPPED, 998, 997).is_ok());
        assert!(check(DROPPED, 0, 997).is_err());
        let saved_root = DROPPED.replace("Uid:\t998\t998\t998\t998", "Uid:\t998\t998\t0\t998");
        assert!(check(&saved_root, 998, 997).is_err());
        let grouped = DROPPED.replace("Groups:\t", "Groups:\t0");
        assert!(check(&grouped, 998, 997).is_err());
        let capable = DROPPED.replace("CapEff:\t0000000000000000", "CapEff:\t0000000000000400");
        assert!(check(&capable, 998, 997).is_err());
        let inheritable = DROPPED.replace("CapInh:\t0000000000000000", "CapInh:\t0000000000000001");
        assert!(check(&inheritable, 998, 997).is_err());
        assert!(check("Uid:\t998\t998\t998\t998\n", 998, 997).is_err());
    }

    #[test]
    fn an_unknown_user_is_a_clear_error() {
        let e = run_as("no-such-ssock-user-x").unwrap_err().to_string();
        assert!(e.contains("no user \"no-such-ssock-user-x\""), "{e}");
    }
}
