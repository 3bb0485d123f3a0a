//! What the host must offer before interception can be a guarantee, and the cgroup2 plumbing.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::Locations;
use super::loader::EBPF_OBJECT;

/// The oldest long-term kernel with every hook the programs use: cgroup/sock_release (5.9),
/// getpeername hooks (5.8), cgroup links (5.7).
pub const MIN_KERNEL: (u32, u32) = (5, 10);
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The cgroup2 mount point from /proc/self/mounts: /sys/fs/cgroup on most hosts,
/// /sys/fs/cgroup/unified on hybrid ones.
pub fn find_cgroup2_mount() -> Result<PathBuf> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    cgroup2_mount_in(&mounts).context(
        "no cgroup2 filesystem in /proc/self/mounts (mount -t cgroup2 none /sys/fs/cgroup/unified)",
    )
}

fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/self/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(Ok(v)) = b
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .map(|o| u8::from_str_radix(o, 8))
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn has_ipv6_loopback() -> bool {
    fs::read_to_string("/proc/net/if_inet6")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("00000000000000000000000000000001"))
        })
        .unwrap_or(false)
}

/// Checks everything at once and names each missing piece, so one run tells the whole story.
pub fn preflight(loc: &Locations) -> Result<()> {
    let mut missing = Vec::new();
    if EBPF_OBJECT.is_empty() {
        missing.push(
            "the eBPF programs were not built into this binary (build with `cargo xtask build-ebpf`)"
                .to_owned(),
        );
    }
    match kernel_release() {
        Ok((major, minor, release)) if (major, minor) < MIN_KERNEL => missing.push(format!(
            "Linux {}.{} or later (this is {release}): cgroup sock_release and getpeername hooks",
            MIN_KERNEL.0, MIN_KERNEL.1
        )),
        Ok(_) => {}
        Err(e) => missing.push(format!("a readable kernel version: {e:#}")),
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("kernel BTF (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF=y)".to_owned());
    }
    if let Err(e) = ensure_bpffs(&loc.pin_path) {
        missing.push(format!("{e:#}"));
    }
    if let Err(e) = check_capabilities() {
        missing.push(format!("{e:#}"));
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "interception cannot start; missing:\n  - {}",
        missing.join("\n  - ")
    )
}

pub(crate) fn kernel_release() -> Result<(u32, u32, String)> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("cannot read /proc/sys/kernel/osrelease")?;
    let release = release.trim().to_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok());
    let minor = parts.next().and_then(|p| p.parse().ok());
    match (major, minor) {
        (Some(major), Some(minor)) => Ok((major, minor, release)),
        _ => bail!("cannot parse kernel release {release:?}"),
    }
}

/// The pin path must be on bpffs. When it lies under /sys/fs/bpf and nothing is mounted
/// there, bpffs is mounted (what systemd does at boot on most distributions).
fn ensure_bpffs(pin_path: &Path) -> Result<()> {
    let mut existing = pin_path;
    while !existing.exists() {
        existing = existing
            .parent()
            .with_context(|| format!("pin path {} has no existing parent", pin_path.display()))?;
    }
    if fs_type(existing)? == BPF_FS_MAGIC {
        return Ok(());
    }
    let bpffs = Path::new("/sys/fs/bpf");
    if pin_path.starts_with(bpffs) && existing.starts_with("/sys") {
        mount_bpffs(bpffs)?;
        if fs_type(bpffs)? == BPF_FS_MAGIC {
            return Ok(());
        }
    }
    bail!(
        "a bpf filesystem at the pin path {} (mount -t bpf bpf /sys/fs/bpf)",
        pin_path.display()
    )
}

pub(crate) fn fs_type(path: &Path) -> Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` and `st` are valid for the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64)
}

fn mount_bpffs(at: &Path) -> Result<()> {
    fs::create_dir_all(at).with_context(|| format!("cannot create {}", at.display()))?;
    let target = CString::new(at.as_os_str().as_bytes())?;
    // SAFETY: all strings are NUL-terminated and outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("a bpf filesystem at {} (mount failed)", at.display()));
    }
    Ok(())
}

fn check_capabilities() -> Result<()> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .context("no CapEff in /proc/self/status")?;
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if (has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN) {
        return Ok(());
    }
    bail!("CAP_BPF and CAP_NET_ADMIN (run the gateway as root or grant them in its unit)")
}

/// The gateway must not sit inside the cgroups it intercepts.
pub fn ensure_outside(agent_root: &Path) -> Result<()> {
    let mount = find_cgroup2_mount()?;
    let own = own_cgroup(&mount)?;
    if own.starts_with(agent_root) {
        bail!(
            "the gateway runs in {}, inside the agent cgroup root {}: it must run outside it",
            own.display(),
            agent_root.display()
        );
    }
    Ok(())
}

/// This process's cgroup2 directory.
pub fn own_cgroup(mount: &Path) -> Result<PathBuf> {
    cgroup_of_pid("self", mount)
}

/// The cgroup2 directory of a process from /proc/PID/cgroup (`0::/path` line).
pub fn cgroup_of_pid(pid: &str, mount: &Path) -> Result<PathBuf> {
    let file = format!("/proc/{pid}/cgroup");
    let text = fs::read_to_string(&file).with_context(|| format!("cannot read {file}"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .with_context(|| format!("no cgroup2 entry in {file}"))?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// A cgroup2 directory's id, as `bpf_get_current_cgroup_id` reports it: its inode number.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    let meta = fs::metadata(path).with_context(|| format!("no cgroup at {}", path.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a cgroup directory", path.display());
    }
    Ok(meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
        assert_eq!(
            cgroup2_mount_in("none /mnt/my\\040cg cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }
}
