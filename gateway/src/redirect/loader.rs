//! Loading the embedded object, adopting or creating the pinned maps, and attaching the
//! programs to a cgroup with pinned links.
//!
//! Links are pinned per cgroup and per object: `links/<cgroup id>-<object id>/<program>`. A
//! restarted gateway built from the same object finds its links complete and adopts them (the
//! programs never stop running). A different build attaches its own next to them (cgroup
//! multi-attach) and only then unpins the old ones, so an upgrade opens no window.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, Program};
use aya::{Ebpf, EbpfLoader};
use portcullis_common::{
    MAP_AGENTS, MAP_BY_COOKIE, MAP_BY_PEER, MAP_CONFIG, MAP_TARGETS, MAPS, PROG_CONNECT4,
    PROG_CONNECT6, PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_SENDMSG4, PROG_SENDMSG6,
    PROG_SOCK_OPS, PROG_SOCK_RELEASE,
};
use sha2::{Digest, Sha256};

use super::{Locations, Maps, kernel};

/// The programs, built by gateway/build.rs. Empty when the toolchain was missing at build time
/// (`kernel::preflight` reports that).
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis-ebpf"));

pub(super) const PROGRAMS: [&str; 8] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_SOCK_OPS,
    PROG_SOCK_RELEASE,
];

pub(super) struct Loaded {
    ebpf: Ebpf,
    object_id: String,
}

impl Loaded {
    /// Loads the object; maps already pinned under `maps/` are reused, missing ones are
    /// created and pinned. Programs are loaded into the kernel only when they must be attached.
    pub fn load(loc: &Locations) -> Result<Self> {
        let maps_dir = loc.maps_dir();
        fs::create_dir_all(&maps_dir)
            .with_context(|| format!("cannot create {}", maps_dir.display()))?;
        let mut loader = EbpfLoader::new();
        for name in MAPS {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        let ebpf = loader.load(EBPF_OBJECT).context(
            "loading the eBPF object failed (maps pinned by an incompatible build? \
             `portcullis uninstall` removes them)",
        )?;
        Ok(Self {
            ebpf,
            object_id: object_id(),
        })
    }

    pub fn take_maps(&mut self) -> Result<Maps> {
        Ok(Maps {
            targets: self.take(MAP_TARGETS)?,
            config: self.take(MAP_CONFIG)?,
            by_cookie: self.take(MAP_BY_COOKIE)?,
            by_peer: self.take(MAP_BY_PEER)?,
            agents: self.take(MAP_AGENTS)?,
        })
    }

    fn take<T>(&mut self, name: &str) -> Result<T>
    where
        T: TryFrom<Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .take_map(name)
            .with_context(|| format!("the eBPF object has no map {name}"))?;
        T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
    }

    /// Makes sure every program is attached to `cgroup` by a link pinned for this object, then
    /// removes the links other builds pinned for the same cgroup.
    pub fn ensure_attached(&mut self, loc: &Locations, cgroup: &Path) -> Result<()> {
        let cgroup_id = kernel::cgroup_id(cgroup)?;
        let dir = link_dir(loc, cgroup_id, &self.object_id);
        let missing: Vec<&str> = PROGRAMS
            .into_iter()
            .filter(|p| !dir.join(p).exists())
            .collect();
        if !missing.is_empty() {
            fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let cgroup_fd =
                File::open(cgroup).with_context(|| format!("cannot open {}", cgroup.display()))?;
            for name in missing {
                let program = self
                    .ebpf
                    .program_mut(name)
                    .with_context(|| format!("the eBPF object has no program {name}"))?;
                let link = attach(program, &cgroup_fd)
                    .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
                let pin = dir.join(name);
                link.pin(&pin)
                    .with_context(|| format!("cannot pin {}", pin.display()))?;
            }
        }
        remove_other_builds(loc, cgroup_id, &dir)
    }
}

fn attach(program: &mut Program, cgroup: &File) -> Result<FdLink> {
    // Through bpf_link (kernel >= 5.7, which aya uses there) cgroup attachments are always
    // multi: other tools' programs keep running, and an upgrade attaches the new build before
    // detaching the old one. The link API takes no flags, hence `Single` (flags 0).
    let mode = CgroupAttachMode::Single;
    let link: FdLink = match program {
        Program::CgroupSockAddr(p) => {
            load_once(p.fd().is_ok(), || p.load())?;
            let id = p.attach(cgroup, mode)?;
            p.take_link(id)?.try_into()?
        }
        Program::SockOps(p) => {
            load_once(p.fd().is_ok(), || p.load())?;
            let id = p.attach(cgroup, mode)?;
            p.take_link(id)?.try_into()?
        }
        Program::CgroupSock(p) => {
            load_once(p.fd().is_ok(), || p.load())?;
            let id = p.attach(cgroup, mode)?;
            p.take_link(id)?.try_into()?
        }
        other => anyhow::bail!("unexpected program type {:?}", other.prog_type()),
    };
    Ok(link)
}

fn load_once(
    loaded: bool,
    load: impl FnOnce() -> Result<(), aya::programs::ProgramError>,
) -> Result<()> {
    if !loaded {
        load().map_err(verifier_error)?;
    }
    Ok(())
}

/// The verifier log is the only useful part of a load failure: keep it in the message.
fn verifier_error(e: aya::programs::ProgramError) -> anyhow::Error {
    anyhow::anyhow!("loading the program failed: {e:#}")
}

pub(super) fn link_dir(loc: &Locations, cgroup_id: u64, object_id: &str) -> PathBuf {
    loc.links_dir().join(format!("{cgroup_id}-{object_id}"))
}

/// Link directories of `cgroup_id`, whatever build pinned them.
pub(super) fn link_dirs_of(loc: &Locations, cgroup_id: u64) -> Vec<PathBuf> {
    let prefix = format!("{cgroup_id}-");
    let Ok(entries) = fs::read_dir(loc.links_dir()) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

fn remove_other_builds(loc: &Locations, cgroup_id: u64, keep: &Path) -> Result<()> {
    for dir in link_dirs_of(loc, cgroup_id) {
        if dir != keep {
            // Unpinning drops the last reference to those links: the old programs detach.
            fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove old links {}", dir.display()))?;
        }
    }
    Ok(())
}

/// Identifies the embedded object so pinned links can be matched to the build that made them.
fn object_id() -> String {
    let digest = Sha256::digest(EBPF_OBJECT);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens a pinned map by name without loading the object (CLI commands).
pub(super) fn open_pinned<T>(loc: &Locations, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = loc.maps_dir().join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "no pinned map at {}: interception is not installed (start the gateway with \
             [redirect] enabled = true)",
            path.display()
        )
    })?;
    let map = Map::from_map_data(data).with_context(|| format!("map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}
