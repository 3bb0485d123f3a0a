//! Agent cgroups: the registry the programs consult (`PC_AGENTS`: cgroup id → name and path)
//! so each connection carries its agent, resolved in the kernel at connect() time.
//!
//! An agent is either a directory directly under the agent root (its name is the directory
//! name: `portcullis run --agent NAME`, or made by hand) or a cgroup placed under interception
//! with `portcullis agents attach` (its own links, its given name).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap as BpfHashMap, MapData};
use portcullis_common::{AGENT_NAME_LEN, AGENT_PATH_LEN, AgentInfo};

use super::{Locations, kernel, loader};

type AgentMap = BpfHashMap<MapData, u64, AgentInfo>;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Agent {
    pub name: String,
    pub path: PathBuf,
    pub cgroup_id: u64,
    /// Placed under interception by `agents attach` (its own links), not under the agent root.
    pub attached: bool,
}

/// Agent names become directory names and appear in logs: keep them plain.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() < AGENT_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if !ok {
        bail!(
            "agent name {name:?}: use 1-{} characters from A-Z a-z 0-9 . _ - @",
            AGENT_NAME_LEN - 1
        );
    }
    Ok(())
}

pub fn register(map: &mut AgentMap, loc: &Locations, name: &str, path: &Path) -> Result<u64> {
    validate_name(name)?;
    let id = kernel::cgroup_id(path)?;
    let rel = path
        .strip_prefix(&loc.cgroup2_mount)
        .with_context(|| format!("{} is not under the cgroup2 mount", path.display()))?;
    let rel = rel.to_string_lossy();
    if rel.len() >= AGENT_PATH_LEN {
        bail!(
            "cgroup path {} is longer than {} bytes",
            path.display(),
            AGENT_PATH_LEN - 1
        );
    }
    let info = AgentInfo {
        name: padded(name),
        path: padded(&rel),
    };
    map.insert(id, info, 0)
        .with_context(|| format!("cannot register agent {name}"))?;
    Ok(id)
}

pub fn unregister(map: &mut AgentMap, cgroup_id: u64) {
    // Absent is fine: someone else already cleaned up.
    let _ = map.remove(&cgroup_id);
}

/// Directories under the agent root made without `portcullis run` still get their name.
pub fn register_root_children(map: &mut AgentMap, loc: &Locations) -> Result<()> {
    let Ok(entries) = fs::read_dir(&loc.agent_root) else {
        return Ok(());
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() && validate_name(&name).is_ok() {
            let id = kernel::cgroup_id(&path)?;
            if map.get(&id, 0).is_err() {
                register(map, loc, &name, &path)?;
            }
        }
    }
    Ok(())
}

/// Drops entries whose cgroup is gone (a removed cgroup's id is never reused).
pub fn prune(map: &mut AgentMap, loc: &Locations) {
    let gone: Vec<u64> = list(map, loc)
        .into_iter()
        .filter(|a| kernel::cgroup_id(&a.path).ok() != Some(a.cgroup_id))
        .map(|a| a.cgroup_id)
        .collect();
    for id in gone {
        unregister(map, id);
    }
}

pub fn list(map: &AgentMap, loc: &Locations) -> Vec<Agent> {
    let mut agents: Vec<Agent> = map
        .iter()
        .filter_map(|e| e.ok())
        .map(|(cgroup_id, info)| Agent {
            name: c_str(&info.name),
            path: loc.cgroup2_mount.join(c_str(&info.path)),
            cgroup_id,
            attached: !loader::link_dirs_of(loc, cgroup_id).is_empty(),
        })
        .collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name).then(a.cgroup_id.cmp(&b.cgroup_id)));
    agents
}

/// Cgroups with their own links (besides the agent root), to re-attach after an upgrade.
pub fn attached_paths(map: &AgentMap, loc: &Locations) -> Vec<PathBuf> {
    list(map, loc)
        .into_iter()
        .filter(|a| a.attached && kernel::cgroup_id(&a.path).ok() == Some(a.cgroup_id))
        .map(|a| a.path)
        .collect()
}

/// The caller's cgroup directory, if the process still lives in the cgroup it connected from.
pub fn cgroup_path_of(pid: u32, cgroup_id: u64, loc: &Locations) -> Option<PathBuf> {
    let path = kernel::cgroup_of_pid(&pid.to_string(), &loc.cgroup2_mount).ok()?;
    (kernel::cgroup_id(&path).ok() == Some(cgroup_id)).then_some(path)
}

/// For a cgroup inside the agent root: the first directory below the root.
pub fn name_under_root(cgroup: &Path, agent_root: &Path) -> Option<String> {
    let rel = cgroup.strip_prefix(agent_root).ok()?;
    rel.components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
}

/// A NUL-padded byte field as text.
pub fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let n = s.len().min(N - 1);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        for ok in ["claude", "agent-1", "a.b_c", "svc@host"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn agent_is_the_first_directory_under_the_root() {
        let root = Path::new("/sys/fs/cgroup/portcullis-agents");
        assert_eq!(
            name_under_root(&root.join("claude/run-7"), root).as_deref(),
            Some("claude")
        );
        assert_eq!(
            name_under_root(Path::new("/sys/fs/cgroup/other"), root),
            None
        );
        assert_eq!(name_under_root(root, root), None);
    }

    #[test]
    fn fixed_fields_round_trip() {
        let f: [u8; 16] = padded("postgres");
        assert_eq!(c_str(&f), "postgres");
        let f: [u8; 4] = padded("toolong");
        assert_eq!(c_str(&f), "too");
    }
}
