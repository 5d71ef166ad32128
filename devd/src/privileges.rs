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

/// A switch decided before devd opens anything: who to become.
#[derive(Debug, PartialEq, Eq)]
pub struct Switch {
    user: String,
    pub uid: u32,
    pub gid: u32,
}

/// Looks `user` up and decides, with no side effect, before devd binds
/// its socket (a wrong `run_as` leaves nothing behind): Some(switch) when
/// devd runs as root and `user` is another; None when devd runs as `user`
/// already (root asked to stay root among them); an error when there is
/// no such user, or devd runs as someone else and cannot become `user`.
pub fn plan(user: &str) -> anyhow::Result<Option<Switch>> {
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
    if euid == uid {
        return Ok(None);
    }
    if euid != 0 {
        bail!("run_as {user:?}: devd runs as uid {euid}, not root, and cannot become uid {uid}");
    }
    Ok(Some(Switch {
        user: user.to_string(),
        uid,
        gid,
    }))
}

/// Becomes the switch's user for good, with no capabilities, and checks
/// it in /proc/self/status. Call it while this is devd's only thread.
pub fn apply(s: &Switch) -> anyhow::Result<()> {
    let (user, uid, gid) = (&s.user, s.uid, s.gid);
    // Only root may empty the bounding set; a host that does not let it
    // (no CAP_SETPCAP) still gets a devd with no capability it can use:
    // no_new_privs means no exec gives any back.
    let bounded = match sys::drop_bounding_set() {
        Ok(()) => true,
        Err(e) => {
            log::warn!("run_as: the capability bounding set stays as it was: {e}");
            false
        }
    };
    sys::become_user(uid, gid)
        .with_context(|| format!("run_as: cannot become {user:?} (uid {uid}, gid {gid})"))?;
    sys::no_capabilities().context("run_as: cannot clear the capabilities")?;
    let status = std::fs::read_to_string("/proc/self/status")
        .context("run_as: cannot read /proc/self/status to check")?;
    check(&status, uid, gid, bounded).context("run_as: after the switch")
}

/// Whether a /proc/PID/status text shows every id `uid` and `gid`, no
/// supplementary group, no capability permitted, effective, inheritable
/// or ambient (nor in the bounding set, if `bounded`), and no_new_privs.
pub fn check(status: &str, uid: u32, gid: u32, bounded: bool) -> anyhow::Result<()> {
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
    let sets: &[&str] = if bounded {
        &["CapInh:", "CapPrm:", "CapEff:", "CapAmb:", "CapBnd:"]
    } else {
        &["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"]
    };
    for key in sets {
        let v = field(key)?;
        if u64::from_str_radix(v, 16).ok() != Some(0) {
            bail!("{key} {v}");
        }
    }
    let nnp = field("NoNewPrivs:")?;
    if nnp != "1" {
        bail!("NoNewPrivs: {nnp}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROPPED: &str = "Name:\tdevd\nUid:\t998\t998\t998\t998\nGid:\t997\t997\t997\t997\n\
        Groups:\t\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
        CapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\n\
        NoNewPrivs:\t1\n";

    #[test]
    fn a_status_is_clean_only_with_every_id_switched_and_no_capability() {
        let ok = |status: &str| check(status, 998, 997, true).is_ok();
        assert!(ok(DROPPED));
        assert!(check(DROPPED, 0, 997, true).is_err());
        assert!(!ok(
            &DROPPED.replace("Uid:\t998\t998\t998\t998", "Uid:\t998\t998\t0\t998")
        ));
        assert!(!ok(&DROPPED.replace("Groups:\t", "Groups:\t0")));
        for set in ["CapEff", "CapInh", "CapPrm", "CapAmb", "CapBnd"] {
            let some = format!("{set}:\t0000000000000400");
            let status = DROPPED.replace(&format!("{set}:\t0000000000000000"), &some);
            assert!(!ok(&status), "{set}");
        }
        // A bounding set devd could not empty is left out, and only it.
        let bounded = DROPPED.replace("CapBnd:\t0000000000000000", "CapBnd:\t000001ffffffffff");
        assert!(check(&bounded, 998, 997, false).is_ok());
        assert!(!ok(&DROPPED.replace("NoNewPrivs:\t1", "NoNewPrivs:\t0")));
        assert!(!ok("Uid:\t998\t998\t998\t998\n"));
    }

    #[test]
    fn an_unknown_user_is_a_clear_error() {
        let e = plan("no-such-ssock-user-x").unwrap_err().to_string();
        assert!(e.contains("no user \"no-such-ssock-user-x\""), "{e}");
    }
}
