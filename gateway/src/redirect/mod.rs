//! Transparent interception: eBPF cgroup programs (ebpf-programs/ebpf) steer TCP connects from
//! agent cgroups to protected destinations onto the gateway's loopback listener; this module
//! loads and pins them, keeps their maps, and answers, for an accepted connection, where it was
//! going and who opened it. docs/interception.md explains the whole path.
//!
//! Pinned under `pin_path` (default `/sys/fs/bpf/portcullis`), so interception and fail-closed
//! outlive the gateway process:
//! - `maps/<NAME>`: the maps named in `portcullis_common::MAPS`;
//! - `links/<cgroup id>-<object id>/<program>`: one link per program per intercepted cgroup
//!   (the agent root and each cgroup added by `portcullis agents attach`).

mod agents;
pub mod cli;
pub(crate) mod kernel;
mod loader;
mod targets;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData};
use portcullis_common::{
    AgentInfo, CONFIG_HAS_V6_LISTENER, Config, OriginRecord, PeerKey, TargetKey, is_v4_mapped,
    v4_mapped,
};

pub use kernel::find_cgroup2_mount;

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/portcullis";
/// Name of the agent cgroup root directory under the cgroup2 mount.
pub const DEFAULT_AGENT_ROOT_NAME: &str = "portcullis-agents";
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15432);
pub const DEFAULT_LISTEN_V6: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 15432);

/// The `[redirect]` section of the gateway's TOML config.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// Load the programs and intercept agent cgroups. Default false.
    #[serde(default)]
    pub enabled: bool,
    /// Where redirected IPv4 (and v4-mapped) connections land. Default 127.0.0.1:15432.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where redirected IPv6 connections land. Default `[::1]:15432` when the host has IPv6
    /// loopback; without one, IPv6 connects are steered to `listen` through its v4-mapped form.
    #[serde(default = "default_listen_v6")]
    pub listen_v6: Option<SocketAddr>,
    /// bpffs directory for pinned maps and links. Default /sys/fs/bpf/portcullis.
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Cgroup whose descendants are agents. Default `<cgroup2 mount>/portcullis-agents`, the
    /// mount found in /proc/self/mounts.
    #[serde(default)]
    pub agent_cgroup_root: Option<PathBuf>,
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
}

fn default_listen_v6() -> Option<SocketAddr> {
    kernel::has_ipv6_loopback().then_some(DEFAULT_LISTEN_V6)
}

fn default_pin_path() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_PATH)
}

impl Default for RedirectConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: default_listen(),
            listen_v6: default_listen_v6(),
            pin_path: default_pin_path(),
            agent_cgroup_root: None,
        }
    }
}

/// A destination agents must not reach except through the gateway: an address or CIDR, and a
/// port. When the address is one of this host's own (loopback, unspecified, or an interface
/// address), every other local address on that port is refused too, since it reaches the same
/// server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProtectedTarget {
    pub net: IpAddr,
    pub prefix_len: u8,
    pub port: u16,
}

impl ProtectedTarget {
    /// Exactly one address and port.
    pub fn host(addr: SocketAddr) -> Self {
        Self {
            net: addr.ip(),
            prefix_len: if addr.is_ipv4() { 32 } else { 128 },
            port: addr.port(),
        }
    }
}

/// Where a redirected connection was going and who opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The destination the agent asked for (IPv4 for v4-mapped addresses).
    pub original_dst: SocketAddr,
    pub cgroup_id: u64,
    /// The process (tgid) that called connect().
    pub pid: u32,
    pub uid: u32,
    /// The calling thread's name at connect() time (at most 15 bytes).
    pub comm: String,
    /// The agent name: the registered agent cgroup containing the caller, i.e. the cgroup
    /// directory name under the agent root, or the name given to `agents attach`.
    pub agent: Option<String>,
    /// The caller's cgroup, absolute (best effort: read from /proc while the process lives).
    pub cgroup_path: Option<PathBuf>,
}

impl Origin {
    /// The caller's executable, read from /proc: call it at accept time, while the caller
    /// still lives (best effort: `None` once it has exited or exec'd elsewhere).
    pub fn executable(&self) -> Option<PathBuf> {
        std::fs::read_link(format!("/proc/{}/exe", self.pid)).ok()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// No record for this peer: not redirected by our programs (e.g. a direct connect to the
    /// listener), already looked up, or evicted from the LRU map. The connection is refused.
    #[error("no interception record for peer {0}: not a redirected agent connection")]
    NotRedirected(SocketAddr),
    #[error("reading the interception map failed: {0}")]
    Map(String),
}

/// Entry counts of the connection maps, to prove they do not leak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapCounts {
    pub by_cookie: usize,
    pub by_peer: usize,
}

struct Maps {
    targets: LpmTrie<MapData, TargetKey, u32>,
    config: Array<MapData, Config>,
    by_cookie: BpfHashMap<MapData, u64, OriginRecord>,
    by_peer: BpfHashMap<MapData, PeerKey, OriginRecord>,
    agents: BpfHashMap<MapData, u64, AgentInfo>,
}

/// The loaded interception. `Send + Sync`: share it through an `Arc`.
pub struct Redirector {
    maps: Mutex<Maps>,
    locations: Locations,
}

/// Where interception lives on this host.
#[derive(Debug, Clone)]
pub struct Locations {
    pub pin_path: PathBuf,
    pub cgroup2_mount: PathBuf,
    pub agent_root: PathBuf,
}

impl Locations {
    pub fn resolve(pin_path: &Path, agent_root: Option<&Path>) -> Result<Self> {
        let cgroup2_mount = find_cgroup2_mount()?;
        let agent_root = agent_root
            .map(Path::to_path_buf)
            .unwrap_or_else(|| cgroup2_mount.join(DEFAULT_AGENT_ROOT_NAME));
        if !agent_root.starts_with(&cgroup2_mount) {
            bail!(
                "agent cgroup root {} is not under the cgroup2 mount {}",
                agent_root.display(),
                cgroup2_mount.display()
            );
        }
        Ok(Self {
            pin_path: pin_path.to_path_buf(),
            cgroup2_mount,
            agent_root,
        })
    }

    fn maps_dir(&self) -> PathBuf {
        self.pin_path.join("maps")
    }

    fn links_dir(&self) -> PathBuf {
        self.pin_path.join("links")
    }
}

impl Redirector {
    /// Checks kernel features and says exactly what is missing; loads the programs or adopts
    /// the pinned ones; attaches them to the agent cgroup root; writes the protected targets
    /// and the gateway's pid and listeners into the maps.
    pub fn start(cfg: &RedirectConfig, targets: &[ProtectedTarget]) -> Result<Redirector> {
        validate_listeners(cfg)?;
        let locations = Locations::resolve(&cfg.pin_path, cfg.agent_cgroup_root.as_deref())?;
        kernel::preflight(&locations)?;
        kernel::ensure_outside(&locations.agent_root)?;
        std::fs::create_dir_all(&locations.agent_root).with_context(|| {
            format!(
                "cannot create the agent cgroup root {}",
                locations.agent_root.display()
            )
        })?;

        let mut loaded = loader::Loaded::load(&locations)?;
        let mut maps = loaded.take_maps()?;
        maps.config
            .set(0, gateway_config(cfg), 0)
            .context("cannot write the gateway config map")?;
        targets::write(&mut maps.targets, targets)?;
        agents::register_root_children(&mut maps.agents, &locations)?;
        agents::prune(&mut maps.agents, &locations);

        loaded.ensure_attached(&locations, &locations.agent_root)?;
        for path in agents::attached_paths(&maps.agents, &locations) {
            loaded.ensure_attached(&locations, &path)?;
        }
        Ok(Redirector {
            maps: Mutex::new(maps),
            locations,
        })
    }

    /// For an accepted connection's peer address: the original destination and the caller.
    /// Removes the record, so each connection is looked up once. `Err` => refuse the connection.
    pub fn lookup(&self, peer: SocketAddr) -> Result<Origin, LookupError> {
        let key = peer_key(peer);
        let (record, agent) = {
            let mut maps = self
                .maps
                .lock()
                .map_err(|_| LookupError::Map("map lock poisoned".into()))?;
            let record = match maps.by_peer.get(&key, 0) {
                Ok(r) => r,
                Err(aya::maps::MapError::KeyNotFound) => {
                    return Err(LookupError::NotRedirected(peer));
                }
                Err(e) => return Err(LookupError::Map(e.to_string())),
            };
            // Already gone means a concurrent release: the record is still ours to use.
            let _ = maps.by_peer.remove(&key);
            let agent = (record.agent_cgroup_id != 0)
                .then(|| maps.agents.get(&record.agent_cgroup_id, 0).ok())
                .flatten();
            (record, agent)
        };
        let cgroup_path = agents::cgroup_path_of(record.tgid, record.cgroup_id, &self.locations);
        let agent = agent.map(|a| agents::c_str(&a.name)).or_else(|| {
            cgroup_path
                .as_deref()
                .and_then(|p| agents::name_under_root(p, &self.locations.agent_root))
        });
        Ok(Origin {
            original_dst: socket_addr(&record.dst_addr, record.dst_port as u16),
            cgroup_id: record.cgroup_id,
            pid: record.tgid,
            uid: record.uid,
            comm: agents::c_str(&record.comm),
            agent,
            cgroup_path,
        })
    }

    /// Replaces the protected targets (SIGHUP reload). Unchanged entries are never removed, so
    /// a reload opens no window.
    pub fn update_targets(&self, targets: &[ProtectedTarget]) -> Result<()> {
        let mut maps = self
            .maps
            .lock()
            .map_err(|_| anyhow::anyhow!("map lock poisoned"))?;
        targets::write(&mut maps.targets, targets)
    }

    /// How many connection records the maps hold right now.
    pub fn map_counts(&self) -> Result<MapCounts> {
        let maps = self
            .maps
            .lock()
            .map_err(|_| anyhow::anyhow!("map lock poisoned"))?;
        Ok(MapCounts {
            by_cookie: maps.by_cookie.keys().count(),
            by_peer: maps.by_peer.keys().count(),
        })
    }

    pub fn locations(&self) -> &Locations {
        &self.locations
    }

    /// The registered agents: name → cgroup path.
    pub fn agents(&self) -> Result<HashMap<String, PathBuf>> {
        let maps = self
            .maps
            .lock()
            .map_err(|_| anyhow::anyhow!("map lock poisoned"))?;
        Ok(agents::list(&maps.agents, &self.locations)
            .into_iter()
            .map(|a| (a.name, a.path))
            .collect())
    }
}

fn validate_listeners(cfg: &RedirectConfig) -> Result<()> {
    if !cfg.listen.is_ipv4() || !cfg.listen.ip().is_loopback() || cfg.listen.port() == 0 {
        bail!(
            "redirect.listen = {}: must be an IPv4 loopback address with a port",
            cfg.listen
        );
    }
    if let Some(v6) = cfg.listen_v6
        && (!v6.is_ipv6() || !v6.ip().is_loopback() || v6.port() == 0)
    {
        bail!("redirect.listen_v6 = {v6}: must be [::1] with a port");
    }
    Ok(())
}

fn gateway_config(cfg: &RedirectConfig) -> Config {
    let mut config = Config {
        gateway_tgid: std::process::id(),
        listen_v4_addr: ip_words(cfg.listen.ip())[3],
        listen_v4_port: cfg.listen.port().into(),
        ..Config::default()
    };
    if let Some(v6) = cfg.listen_v6 {
        config.flags |= CONFIG_HAS_V6_LISTENER;
        config.listen_v6_addr = ip_words(v6.ip());
        config.listen_v6_port = v6.port().into();
    }
    config
}

/// An address as the programs see it: network-order words, IPv4 in v4-mapped form.
fn ip_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => portcullis_common::bytes_to_words(&v6.octets()),
    }
}

fn peer_key(peer: SocketAddr) -> PeerKey {
    PeerKey {
        addr: ip_words(peer.ip()),
        port: peer.port().into(),
    }
}

fn socket_addr(words: &[u32; 4], port: u16) -> SocketAddr {
    let ip = if is_v4_mapped(words) {
        IpAddr::V4(Ipv4Addr::from(words[3].to_ne_bytes()))
    } else {
        IpAddr::V6(Ipv6Addr::from(portcullis_common::words_to_bytes(words)))
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_map_words() {
        for addr in [
            "10.0.0.5:5432",
            "[::1]:5432",
            "[2001:db8::7]:1",
            "127.0.0.2:65535",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(socket_addr(&ip_words(addr.ip()), addr.port()), addr);
        }
        // A v4-mapped peer (dual-stack listener) finds the same record as the IPv4 one.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:4000".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(peer_key(mapped), peer_key(v4));
    }

    #[test]
    fn redirector_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Redirector>();
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let cfg: RedirectConfig = toml::from_str("enabled = true").unwrap();
        assert!(cfg.enabled);
        assert_eq!(cfg.listen, DEFAULT_LISTEN);
        assert_eq!(cfg.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
        assert!(cfg.agent_cgroup_root.is_none());
        let err = toml::from_str::<RedirectConfig>("enabeld = true").unwrap_err();
        assert!(err.to_string().contains("enabeld"), "{err}");
    }

    #[test]
    fn listeners_must_be_loopback() {
        let mut cfg = RedirectConfig {
            listen: "0.0.0.0:15432".parse().unwrap(),
            ..RedirectConfig::default()
        };
        assert!(validate_listeners(&cfg).is_err());
        cfg.listen = DEFAULT_LISTEN;
        cfg.listen_v6 = Some("[::]:15432".parse().unwrap());
        assert!(validate_listeners(&cfg).is_err());
        cfg.listen_v6 = Some(DEFAULT_LISTEN_V6);
        assert!(validate_listeners(&cfg).is_ok());
    }
}
