//! devd configuration: built from command-line flags and, for the system
//! service, a TOML file (every key is documented in docs/config.md).
//! Unknown keys and out-of-range values are errors that name the key.

use crate::dataplane::engine::LinkPolicy;
use serde::Deserialize;
use ssock_rings::codec::Mode;
use ssock_rings::layout::{MAX_REGION, MIN_REGION};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("config file {path} is invalid")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("config key {key}: {why}")]
    Value {
        /// Key.
        key: &'static str,
        /// Explanation with the value.
        why: String,
    },
}

/// Which mode `Auto` connections get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultMode {
    /// Shared rings between the two processes.
    Direct,
    /// Through devd's engine and backend.
    Queued,
    /// No acceleration.
    Kernel,
}

impl DefaultMode {
    /// As a wire mode.
    pub fn mode(self) -> Mode {
        match self {
            DefaultMode::Direct => Mode::Direct,
            DefaultMode::Queued => Mode::Queued,
            DefaultMode::Kernel => Mode::Kernel,
        }
    }
}

/// The file format (all keys optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    default_mode: Option<DefaultMode>,
    region_size: Option<usize>,
    spin_us: Option<u32>,
    backend: Option<String>,
    policy: Option<FilePolicy>,
    node: Option<u32>,
    peer_listen: Option<String>,
    fail_forward_ms: Option<u64>,
    run_as: Option<String>,
    peer: Option<Vec<FilePeer>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePeer {
    node: u32,
    address: String,
    key_file: PathBuf,
    ivshmem: Option<OneOrMore>,
    vfio: Option<Names>,
    verbs: Option<Names>,
    verbs_gid_index: Option<u8>,
    link_policy: Option<String>,
}

/// One name, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Names {
    One(String),
    More(Vec<String>),
}

/// One path, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMore {
    One(PathBuf),
    More(Vec<PathBuf>),
}

/// A peer devd: its node id, its control address, the key both prove
/// they hold (docs/config.md, `[[peer]]`).
#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its node id.
    pub node: u32,
    /// Its control address on the management network.
    pub address: SocketAddr,
    /// The link's key (from `key_file`).
    pub key: Vec<u8>,
    /// The ivshmem servers that hand out the windows of the ntb links to
    /// it, link 0 first (both hosts list their links to each other in one
    /// order); with no `vfio` either, no interconnect to this peer: the
    /// control connection only.
    pub ivshmem: Vec<PathBuf>,
    /// PCI addresses (`0000:00:02.0`) of devices bound to vfio-pci whose
    /// windows are the ntb links to it after the `ivshmem` ones: QEMU's
    /// ivshmem-doorbell device in a guest (docs/hardware.md).
    pub vfio: Vec<String>,
    /// RDMA devices (`rxe0`, `mlx5_0`: port 1) whose reliable-connected
    /// queue pairs are the ntb links to it after the VFIO ones, set up
    /// over the control connection (docs/hardware.md).
    pub verbs: Vec<String>,
    /// The GID index those devices' links use (RoCE v2 over IPv4 on
    /// rxe: 1, the default).
    pub verbs_gid_index: u8,
    /// How new connections with it are put on its links, and where a
    /// connection whose link failed moves (when this devd names their
    /// channels).
    pub link_policy: LinkPolicy,
}

impl PeerConfig {
    /// How many ntb links to it are configured (ivshmem windows, then VFIO
    /// devices, then RDMA devices).
    pub fn links(&self) -> usize {
        self.ivshmem.len() + self.vfio.len() + self.verbs.len()
    }

    /// What link `i` goes over, for the statistics: "ivshmem PATH",
    /// "vfio PCI-ADDRESS" or "verbs DEVICE".
    pub fn link_name(&self, i: usize) -> String {
        let (v, f) = (self.vfio.len(), self.ivshmem.len());
        match i {
            i if i < f => format!("ivshmem {}", self.ivshmem[i].display()),
            i if i < f + v => format!("vfio {}", self.vfio[i - f]),
            i => match self.verbs.get(i - f - v) {
                Some(d) => format!("verbs {d}"),
                None => String::new(),
            },
        }
    }
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("node", &self.node)
            .field("address", &self.address)
            .field("key", &format_args!("({} bytes)", self.key.len()))
            .field("ivshmem", &self.ivshmem)
            .field("vfio", &self.vfio)
            .field("verbs", &self.verbs)
            .field("verbs_gid_index", &self.verbs_gid_index)
            .field("link_policy", &self.link_policy)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    allow_uids: Option<Vec<u32>>,
    allow_gids: Option<Vec<u32>>,
    allow_ports: Option<Vec<String>>,
    max_connections_per_user: Option<usize>,
    max_memory_per_user: Option<usize>,
    max_sessions_per_user: Option<usize>,
    short_lived_ms: Option<u64>,
    short_lived_streak: Option<u32>,
    short_lived_hold_ms: Option<u64>,
}

/// Who may accelerate what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Empty: every user.
    pub allow_uids: Vec<u32>,
    /// Empty: every group (a user passes if uid or gid is allowed).
    pub allow_gids: Vec<u32>,
    /// Inclusive port ranges of the destination; empty: every port.
    pub allow_ports: Vec<(u16, u16)>,
    /// Live accelerated connection ends per user.
    pub max_connections_per_user: usize,
    /// Region bytes per user.
    pub max_memory_per_user: usize,
    /// Open control sessions per user (one per client process); more are
    /// closed at once.
    pub max_sessions_per_user: usize,
    /// The `short_lived` policy (docs/config.md): a connection that ended
    /// within this many milliseconds (and carried under
    /// `SHORT_LIVED_BYTES`) was short; 0 turns the policy off.
    pub short_lived_ms: u64,
    /// After this many short connections in a row, the listener's
    /// connections stay on kernel TCP ...
    pub short_lived_streak: u32,
    /// ... for this many milliseconds, then one is accelerated again to
    /// see (a short one puts the listener back at once, a long one ends
    /// the streak).
    pub short_lived_hold_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            allow_ports: Vec::new(),
            max_connections_per_user: 16384,
            max_memory_per_user: 8 << 30,
            max_sessions_per_user: 1024,
            short_lived_ms: 50,
            short_lived_streak: 8,
            short_lived_hold_ms: 1000,
        }
    }
}

impl Policy {
    /// Whether `uid`/`gid` may accelerate a connection to `port`.
    pub fn allows(&self, uid: u32, gid: u32, port: u16) -> bool {
        let who = (self.allow_uids.is_empty() && self.allow_gids.is_empty())
            || self.allow_uids.contains(&uid)
            || self.allow_gids.contains(&gid);
        let port_ok = self.allow_ports.is_empty()
            || self
                .allow_ports
                .iter()
                .any(|(a, b)| (*a..=*b).contains(&port));
        who && port_ok
    }
}

/// The running configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Control socket path.
    pub socket: PathBuf,
    /// Permission bits of the control socket.
    pub socket_mode: u32,
    /// Whether to create the socket's directory (0700) for a user devd.
    pub user_mode: bool,
    /// Mode for Auto connections.
    pub default_mode: DefaultMode,
    /// Bytes per connection region.
    pub region_size: usize,
    /// Spin budget clients use before sleeping.
    pub spin_us: u32,
    /// Backend name ("loopback").
    pub backend: String,
    /// Access policy.
    pub policy: Policy,
    /// The seccomp filters' mode; None only for debugging (`--no-sandbox`).
    pub sandbox: Option<crate::sandbox::Mode>,
    /// This devd's node id among its peers (0: it has none).
    pub node: u32,
    /// Where peers with a lower node id dial this devd.
    pub peer_listen: Option<SocketAddr>,
    /// The peer devds.
    pub peers: Vec<PeerConfig>,
    /// How long a peer's link must stay up before connections that moved
    /// to their kernel sockets when it failed move back onto it (fail-
    /// forward, docs/protocol.md 8.6); 0: they never do.
    pub fail_forward_ms: u64,
    /// The user devd becomes, with no capabilities, once it holds what
    /// only root may open (None: it stays who started it).
    pub run_as: Option<String>,
}

/// Default `fail_forward_ms`: a link that flaps is not used again at once.
pub const DEFAULT_FAIL_FORWARD_MS: u64 = 3000;

/// Default region size (2 MiB): a Direct ring of about 1 MiB per
/// direction. Streaming throughput grows steeply with the ring (measured:
/// 512 KiB regions 8.5 GB/s, 2 MiB 14.7 GB/s, 4 MiB 18.6 GB/s, 64 KiB
/// writes); a connection's pages are only allocated as data reaches them.
pub const DEFAULT_REGION: usize = 2 * 1024 * 1024;

impl Config {
    /// Defaults for a private per-user devd.
    pub fn user() -> Config {
        Config {
            socket: ssock_rings::paths::user_socket(),
            socket_mode: 0o600,
            user_mode: true,
            default_mode: DefaultMode::Direct,
            region_size: DEFAULT_REGION,
            spin_us: 30,
            backend: "loopback".into(),
            policy: Policy::default(),
            sandbox: Some(crate::sandbox::Mode::Enforce),
            node: 0,
            peer_listen: None,
            peers: Vec::new(),
            fail_forward_ms: DEFAULT_FAIL_FORWARD_MS,
            run_as: None,
        }
    }

    /// Defaults for the system service.
    pub fn system() -> Config {
        Config {
            socket: PathBuf::from(ssock_rings::paths::SYSTEM_SOCKET),
            socket_mode: 0o666,
            user_mode: false,
            ..Config::user()
        }
    }

    /// Reads a TOML file on top of the system defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::from_toml(&text, Config::system()).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.into(),
                source,
            },
            e => e,
        })
    }

    /// Applies TOML text to `base`.
    pub fn from_toml(text: &str, base: Config) -> Result<Config, ConfigError> {
        let f: FileConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        let mut c = base;
        if let Some(s) = f.socket {
            c.socket = s;
        }
        if let Some(m) = f.socket_mode {
            c.socket_mode = u32::from_str_radix(m.trim_start_matches("0o"), 8).map_err(|_| {
                ConfigError::Value {
                    key: "socket_mode",
                    why: format!("{m:?} is not an octal mode"),
                }
            })?;
        }
        if let Some(m) = f.default_mode {
            c.default_mode = m;
        }
        if let Some(r) = f.region_size {
            c.region_size = r;
        }
        if let Some(s) = f.spin_us {
            c.spin_us = s;
        }
        if let Some(b) = f.backend {
            c.backend = b;
        }
        if let Some(n) = f.node {
            c.node = n;
        }
        if let Some(a) = f.peer_listen {
            c.peer_listen = Some(a.parse().map_err(|_| ConfigError::Value {
                key: "peer_listen",
                why: format!("{a:?} is not an IP address and port"),
            })?);
        }
        if let Some(u) = f.run_as {
            c.run_as = Some(u);
        }
        if let Some(ms) = f.fail_forward_ms {
            c.fail_forward_ms = ms;
        }
        for p in f.peer.unwrap_or_default() {
            let address = p.address.parse().map_err(|_| ConfigError::Value {
                key: "peer.address",
                why: format!("{:?} is not an IP address and port", p.address),
            })?;
            c.peers.push(PeerConfig {
                node: p.node,
                address,
                key: read_key(&p.key_file)?,
                ivshmem: match p.ivshmem {
                    None => Vec::new(),
                    Some(OneOrMore::One(p)) => vec![p],
                    Some(OneOrMore::More(v)) => v,
                },
                vfio: match p.vfio {
                    None => Vec::new(),
                    Some(Names::One(n)) => vec![n],
                    Some(Names::More(v)) => v,
                },
                verbs: match p.verbs {
                    None => Vec::new(),
                    Some(Names::One(n)) => vec![n],
                    Some(Names::More(v)) => v,
                },
                verbs_gid_index: p.verbs_gid_index.unwrap_or(1),
                link_policy: match p.link_policy.as_deref() {
                    None | Some("active-backup") => LinkPolicy::ActiveBackup,
                    Some("spread") => LinkPolicy::Spread,
                    Some(other) => {
                        return Err(ConfigError::Value {
                            key: "peer.link_policy",
                            why: format!("{other:?} is neither \"active-backup\" nor \"spread\""),
                        })
                    }
                },
            });
        }
        if let Some(p) = f.policy {
            if let Some(v) = p.allow_uids {
                c.policy.allow_uids = v;
            }
            if let Some(v) = p.allow_gids {
                c.policy.allow_gids = v;
            }
            if let Some(v) = p.allow_ports {
                c.policy.allow_ports =
                    v.iter().map(|s| parse_range(s)).collect::<Result<_, _>>()?;
            }
            if let Some(v) = p.max_connections_per_user {
                c.policy.max_connections_per_user = v;
            }
            if let Some(v) = p.max_memory_per_user {
                c.policy.max_memory_per_user = v;
            }
            if let Some(v) = p.max_sessions_per_user {
                c.policy.max_sessions_per_user = v;
            }
            if let Some(v) = p.short_lived_ms {
                c.policy.short_lived_ms = v;
            }
            if let Some(v) = p.short_lived_streak {
                c.policy.short_lived_streak = v;
            }
            if let Some(v) = p.short_lived_hold_ms {
                c.policy.short_lived_hold_ms = v;
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_REGION..=MAX_REGION).contains(&self.region_size)
            || !self.region_size.is_multiple_of(4096)
        {
            return Err(ConfigError::Value {
                key: "region_size",
                why: format!(
                    "{} is not a multiple of 4096 in {MIN_REGION}..={MAX_REGION}",
                    self.region_size
                ),
            });
        }
        if ssock_rings::layout::QueuedLayout::for_size(self.region_size).is_err() {
            return Err(ConfigError::Value {
                key: "region_size",
                why: format!(
                    "{} is too small for a Queued region's queues and slots",
                    self.region_size
                ),
            });
        }
        if let Some(u) = &self.run_as {
            if u.is_empty()
                || u.len() > 64
                || u.contains(['\0', '/', ':'])
                || u.contains(char::is_whitespace)
            {
                return Err(ConfigError::Value {
                    key: "run_as",
                    why: format!("{u:?} is not a user name"),
                });
            }
        }
        if self.socket_mode > 0o777 {
            return Err(ConfigError::Value {
                key: "socket_mode",
                why: format!(
                    "{:o} is not a permission mode (at most 777)",
                    self.socket_mode
                ),
            });
        }
        if self.policy.short_lived_ms > 60_000 {
            return Err(ConfigError::Value {
                key: "policy.short_lived_ms",
                why: format!("{} exceeds a minute", self.policy.short_lived_ms),
            });
        }
        if !(1..=4096).contains(&self.policy.short_lived_streak) {
            return Err(ConfigError::Value {
                key: "policy.short_lived_streak",
                why: format!("{} is not within 1..=4096", self.policy.short_lived_streak),
            });
        }
        if !(1..=3_600_000).contains(&self.policy.short_lived_hold_ms) {
            return Err(ConfigError::Value {
                key: "policy.short_lived_hold_ms",
                why: format!(
                    "{} is not within 1..=3600000",
                    self.policy.short_lived_hold_ms
                ),
            });
        }
        if self.spin_us > 1_000_000 {
            return Err(ConfigError::Value {
                key: "spin_us",
                why: format!("{} exceeds one second", self.spin_us),
            });
        }
        if self.policy.max_sessions_per_user == 0 {
            return Err(ConfigError::Value {
                key: "policy.max_sessions_per_user",
                why: "0 would refuse every client (at least 1)".into(),
            });
        }
        if !self.peers.is_empty() && !(1..=65535).contains(&self.node) {
            return Err(ConfigError::Value {
                key: "node",
                why: format!(
                    "{} is not within 1..=65535 (required with peers)",
                    self.node
                ),
            });
        }
        for (i, p) in self.peers.iter().enumerate() {
            if p.node == self.node || !(1..=65535).contains(&p.node) {
                return Err(ConfigError::Value {
                    key: "peer.node",
                    why: format!("{} is not another node within 1..=65535", p.node),
                });
            }
            if self.peers[..i].iter().any(|q| q.node == p.node) {
                return Err(ConfigError::Value {
                    key: "peer.node",
                    why: format!("node {} is listed twice", p.node),
                });
            }
            if p.links() > ssock_hwbackends::MAX_LINKS {
                return Err(ConfigError::Value {
                    key: "peer.ivshmem, peer.vfio, peer.verbs",
                    why: format!(
                        "node {}: {} links, at most {}",
                        p.node,
                        p.links(),
                        ssock_hwbackends::MAX_LINKS
                    ),
                });
            }
            if let Some(bad) = p.verbs.iter().find(|d| {
                d.is_empty()
                    || d.len() > 63
                    || !d
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            }) {
                return Err(ConfigError::Value {
                    key: "peer.verbs",
                    why: format!("node {}: {bad:?} is no RDMA device name", p.node),
                });
            }
            listed_once("peer.verbs", p.node, &p.verbs)?;
            if let Some(bad) = p
                .vfio
                .iter()
                .find(|a| !ssock_hwbackends::ntb::vfio::pci_address(a))
            {
                return Err(ConfigError::Value {
                    key: "peer.vfio",
                    why: format!(
                        "node {}: {bad:?} is no PCI address (0000:00:02.0, lower case)",
                        p.node
                    ),
                });
            }
            listed_once("peer.vfio", p.node, &p.vfio)?;
            if p.node < self.node && self.peer_listen.is_none() {
                return Err(ConfigError::Value {
                    key: "peer_listen",
                    why: format!(
                        "node {} dials this node (a lower id dials): say where",
                        p.node
                    ),
                });
            }
        }
        if self.backend != "loopback" {
            return Err(ConfigError::Value {
                key: "backend",
                why: format!(
                    "{:?} is not available in this build (available: \"loopback\")",
                    self.backend
                ),
            });
        }
        Ok(())
    }
}

/// A link's key: the file's bytes, surrounding whitespace trimmed, at
/// least `MIN_KEY`; the file readable by its owner only.
/// Refuses a list (a peer's `vfio` or `verbs`) naming the same thing
/// twice: two links over one device.
fn listed_once(key: &'static str, node: u32, list: &[String]) -> Result<(), ConfigError> {
    match (1..list.len()).find(|&k| list[..k].contains(&list[k])) {
        Some(k) => Err(ConfigError::Value {
            key,
            why: format!("node {node}: {} is listed twice (entry {k})", list[k]),
        }),
        None => Ok(()),
    }
}

fn read_key(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |why: String| ConfigError::Value {
        key: "peer.key_file",
        why: format!("{}: {why}", path.display()),
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(bad("readable by group or others (chmod 600)".into()));
    }
    let raw = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let key = raw.trim_ascii().to_vec();
    if key.len() < crate::peers::wire::MIN_KEY {
        return Err(bad(format!(
            "{} bytes, at least {} needed",
            key.len(),
            crate::peers::wire::MIN_KEY
        )));
    }
    Ok(key)
}

fn parse_range(s: &str) -> Result<(u16, u16), ConfigError> {
    let bad = || ConfigError::Value {
        key: "policy.allow_ports",
        why: format!("{s:?} is not PORT or LOW-HIGH"),
    };
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        ),
        None => {
            let p = s.trim().parse().map_err(|_| bad())?;
            (p, p)
        }
    };
    if a > b {
        return Err(bad());
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let c = Config::from_toml(
            r#"
            socket = "/tmp/x.sock"
            socket_mode = "0660"
            default_mode = "queued"
            region_size = 1048576
            spin_us = 50
            backend = "loopback"
            [policy]
            allow_uids = [1000]
            allow_ports = ["80", "6000-7000"]
            max_connections_per_user = 10
            max_memory_per_user = 1000000
            short_lived_ms = 0
            short_lived_streak = 3
            short_lived_hold_ms = 50
            "#,
            Config::system(),
        )
        .unwrap();
        assert_eq!(c.default_mode, DefaultMode::Queued);
        assert_eq!(c.socket_mode, 0o660);
        assert!(c.policy.allows(1000, 5, 6500));
        assert!(!c.policy.allows(1001, 5, 6500));
        assert!(!c.policy.allows(1000, 5, 81));
        assert_eq!(
            (
                c.policy.short_lived_ms,
                c.policy.short_lived_streak,
                c.policy.short_lived_hold_ms
            ),
            (0, 3, 50)
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = Config::from_toml("bogus = 1", Config::system()).unwrap_err();
        assert!(e.to_string().contains("invalid"), "{e}");
        let e = Config::from_toml("region_size = 1000", Config::system()).unwrap_err();
        assert!(e.to_string().contains("region_size"), "{e}");
        let e = Config::from_toml("backend = \"ntb\"", Config::system()).unwrap_err();
        assert!(e.to_string().contains("backend"), "{e}");
        for bad in ["", "a b", "x/y", "root:0"] {
            let e = Config::from_toml(&format!("run_as = {bad:?}"), Config::system()).unwrap_err();
            assert!(e.to_string().contains("run_as"), "{e}");
        }
        let c = Config::from_toml("run_as = \"ssock\"", Config::system()).unwrap();
        assert_eq!(c.run_as.as_deref(), Some("ssock"));
        assert_eq!(Config::system().run_as, None);
        let e =
            Config::from_toml("[policy]\nallow_ports = [\"9-1\"]", Config::system()).unwrap_err();
        assert!(e.to_string().contains("allow_ports"), "{e}");
        let e =
            Config::from_toml("[policy]\nshort_lived_streak = 0", Config::system()).unwrap_err();
        assert!(e.to_string().contains("short_lived_streak"), "{e}");
    }

    #[test]
    fn peers_need_a_node_a_private_key_and_a_listener_for_lower_nodes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ssock-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("k");
        std::fs::write(&key, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let peer = |node: u32| {
            format!(
                "[[peer]]\nnode = {node}\naddress = \"10.0.0.{node}:7455\"\nkey_file = \"{}\"\n",
                key.display()
            )
        };
        let c = Config::from_toml(&format!("node = 1\n{}", peer(2)), Config::system()).unwrap();
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].key, b"0123456789abcdef0123");
        assert!(
            !format!("{:?}", c.peers[0]).contains("0123"),
            "the key stays out of logs"
        );
        let err = |text: String| {
            Config::from_toml(&text, Config::system())
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(peer(2)).contains("node"),
            "a node id is required with peers"
        );
        assert!(err(format!("node = 3\n{}", peer(2))).contains("peer_listen"));
        let c = Config::from_toml(
            &format!("node = 3\npeer_listen = \"10.0.0.3:7455\"\n{}", peer(2)),
            Config::system(),
        )
        .unwrap();
        assert_eq!(c.peer_listen, Some("10.0.0.3:7455".parse().unwrap()));
        assert!(err(format!("node = 1\n{}{}", peer(2), peer(2))).contains("twice"));
        // One window, or a list: link 0 first.
        let c = Config::from_toml(
            &format!("node = 1\n{}ivshmem = \"/run/a.sock\"\n", peer(2)),
            Config::system(),
        )
        .unwrap();
        assert_eq!(c.peers[0].ivshmem, [PathBuf::from("/run/a.sock")]);
        let c = Config::from_toml(
            &format!(
                "node = 1\n{}ivshmem = [\"/run/a.sock\", \"/run/b.sock\"]\n",
                peer(2)
            ),
            Config::system(),
        )
        .unwrap();
        assert_eq!(c.peers[0].ivshmem.len(), 2);
        let c = Config::from_toml(
            &format!("node = 1\n{}vfio = \"0000:00:02.0\"\n", peer(2)),
            Config::system(),
        )
        .unwrap();
        assert_eq!(c.peers[0].vfio, ["0000:00:02.0"]);
        assert_eq!(c.peers[0].links(), 1);
        for bad in ["00:02.0", "0000:00:02.0/..", "0000:00:02:0", "zzzz:00:02.0"] {
            let e = Config::from_toml(
                &format!("node = 1\n{}vfio = {bad:?}\n", peer(2)),
                Config::system(),
            )
            .unwrap_err();
            assert!(e.to_string().contains("peer.vfio"), "{bad}: {e}");
        }
        let twice = "vfio = [\"0000:00:02.0\", \"0000:00:03.0\", \"0000:00:02.0\"]\n";
        let e = err(format!("node = 1\n{}{twice}", peer(2)));
        assert!(e.contains("peer.vfio") && e.contains("(entry 2)"), "{e}");
        assert_eq!(c.peers[0].link_policy, LinkPolicy::ActiveBackup);
        // RDMA devices: after the windows, GID index 1 unless said.
        let c = Config::from_toml(
            &format!(
                "node = 1\n{}vfio = \"0000:00:02.0\"\nverbs = \"rxe0\"\n",
                peer(2)
            ),
            Config::system(),
        )
        .unwrap();
        assert_eq!(c.peers[0].verbs, ["rxe0"]);
        assert_eq!(c.peers[0].link_name(0), "vfio 0000:00:02.0");
        assert_eq!(c.peers[0].link_name(1), "verbs rxe0");
        assert_eq!(c.peers[0].verbs_gid_index, 1);
        assert_eq!(c.peers[0].links(), 2);
        let c = Config::from_toml(
            &format!(
                "node = 1\n{}verbs = [\"rxe0\", \"mlx5_1\"]\nverbs_gid_index = 3\n",
                peer(2)
            ),
            Config::system(),
        )
        .unwrap();
        assert_eq!((c.peers[0].verbs.len(), c.peers[0].verbs_gid_index), (2, 3));
        for bad in ["\"\"", "\"../rxe0\"", "\"rxe 0\"", "[\"rxe0\", \"rxe0\"]"] {
            assert!(
                err(format!("node = 1\n{}verbs = {bad}\n", peer(2))).contains("peer.verbs"),
                "{bad}"
            );
        }
        let c = Config::from_toml(
            &format!("node = 1\n{}link_policy = \"spread\"\n", peer(2)),
            Config::system(),
        )
        .unwrap();
        assert_eq!(c.peers[0].link_policy, LinkPolicy::Spread);
        assert!(
            err(format!("node = 1\n{}link_policy = \"both\"\n", peer(2)))
                .contains("peer.link_policy")
        );
        let nine: Vec<String> = (0..9).map(|i| format!("\"/run/{i}.sock\"")).collect();
        assert!(err(format!(
            "node = 1\n{}ivshmem = [{}]\n",
            peer(2),
            nine.join(", ")
        ))
        .contains("at most 8"));
        assert!(err(format!("node = 2\n{}", peer(2))).contains("peer.node"));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(err(format!("node = 1\n{}", peer(2))).contains("chmod 600"));
        std::fs::write(&key, "short").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(err(format!("node = 1\n{}", peer(2))).contains("at least 16"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
