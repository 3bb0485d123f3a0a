//! A real systemd, booted as PID 1 of new pid, mount and cgroup namespaces, on a throwaway
//! overlay of the host's root: the gateway's package is installed, started, reloaded and stopped
//! there exactly as on a production host, while nothing it writes reaches the host.
//!
//! The network namespace is the host's, so a test talks to the sandboxed service over loopback.
//! The sandbox has its own bpffs at /sys/fs/bpf, so pinned programs never touch the host's.
//! The overlay is not optional: without it (and the tmpfs mounts over /run, /tmp and /var/tmp),
//! systemd-tmpfiles at boot would empty the host's /tmp and start the host's installed services.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The variable `cargo xtask test` sets to the package the systemd tests install.
pub const TEST_DEB_ENV: &str = "PORTCULLIS_TEST_DEB";

/// Units the host may have installed that must not start in the sandbox.
const MASKED: &[&str] = &[
    "postgresql.service",
    "haproxy.service",
    "pgbouncer.service",
    "mariadb.service",
    "console-getty.service",
    "getty@tty1.service",
];

/// Runs inside `unshare --pid --fork --mount --cgroup`: builds the overlay root and execs
/// systemd on it. `$1` is a scratch directory on the host's /run.
const BOOT_SCRIPT: &str = r#"
set -euo pipefail
scratch=$1; shift
# Nothing mounted from here on may propagate back to the host.
mount --make-rprivate /
mkdir -p "$scratch"
mount -t tmpfs -o size=2g tmpfs "$scratch"
mkdir -p "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
root=$scratch/root
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
# A cgroup2 of this cgroup namespace, where systemd is the root.
umount -l "$root/sys/fs/cgroup"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
# A bpffs of its own: the service's pins (and a purge removing them) stay in the sandbox.
mount -t bpf bpf "$root/sys/fs/bpf"
# Fresh /run, /tmp and /var/tmp: systemd-tmpfiles cleans these at boot.
for d in run tmp var/tmp; do mount -t tmpfs tmpfs "$root/$d"; done
for unit in "$@"; do ln -sf /dev/null "$root/etc/systemd/system/$unit"; done
mkdir -p "$root/oldroot"
cd "$root"
pivot_root . oldroot
umount -l /oldroot
exec /lib/systemd/systemd --system --unit=multi-user.target
"#;

/// A booted sandbox. Dropping it powers systemd off and removes its cgroup.
pub struct Systemd {
    child: Child,
    cgroup: PathBuf,
    scratch: PathBuf,
    /// PID of the sandbox's systemd, as the host sees it.
    pub init_pid: u32,
}

/// True when the systemd tests must run rather than skip: as root, or when CI requires them.
pub fn required_or_skip(test: &str) -> Result<bool> {
    if crate::is_root() {
        return Ok(true);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{test}: CI=true requires the systemd tests, and they need root");
    }
    eprintln!("SKIPPED {test}: needs root (it boots systemd in namespaces); CI runs it as root");
    Ok(false)
}

/// The package to install: `$PORTCULLIS_TEST_DEB` (set by `cargo xtask test`), else one built
/// now from the test profile's binary by `cargo xtask deb --profile dev --no-build`.
pub fn test_package() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(TEST_DEB_ENV) {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("testkit sits inside the workspace")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "run",
            "-q",
            "-p",
            "xtask",
            "--",
            "deb",
            "--profile",
            "dev",
            "--no-build",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo xtask deb")?;
    if !out.status.success() {
        bail!(
            "cargo xtask deb --profile dev --no-build failed: {}",
            out.status
        );
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(PathBuf::from(path))
}

/// A copy of `deb` with a higher version (`<version>+<suffix>`), written into `dir`: the same
/// files under a version dpkg takes as an upgrade. Returns its path and the new version.
pub fn repack_upgrade(deb: &Path, suffix: &str, dir: &Path) -> Result<(PathBuf, String)> {
    let tree = dir.join("tree");
    let status = Command::new("dpkg-deb")
        .arg("-R")
        .arg(deb)
        .arg(&tree)
        .status()?;
    if !status.success() {
        bail!("dpkg-deb -R {} failed: {status}", deb.display());
    }
    let control_path = tree.join("DEBIAN/control");
    let control = fs::read_to_string(&control_path)?;
    let old = control
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .context("the package's control file has no Version")?;
    let version = format!("{old}+{suffix}");
    fs::write(
        &control_path,
        control.replace(
            &format!("Version: {old}\n"),
            &format!("Version: {version}\n"),
        ),
    )?;
    let out = dir.join(format!("portcullis_{version}.deb"));
    // gzip -1: this package is read once, by the test.
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-z1", "-b"])
        .arg(&tree)
        .arg(&out)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("dpkg-deb -b {} failed: {status}", tree.display());
    }
    Ok((out, version))
}

impl Systemd {
    /// Boots systemd and waits until it reports `running` (or `degraded`).
    pub fn boot() -> Result<Systemd> {
        let mount = cgroup2_mount()?;
        let name = format!(
            "portcullis-sdtest-{}-{}",
            std::process::id(),
            crate::free_port()
        );
        let cgroup = mount.join(&name);
        fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        let scratch = PathBuf::from("/run").join(&name);
        // The shell puts itself in the new cgroup, then becomes the namespaces' first process.
        let child = Command::new("bash")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs"; shift; exec unshare --pid --fork --mount --cgroup bash -c "$0" boot "$@""#)
            .arg(BOOT_SCRIPT)
            .arg(&cgroup)
            .arg(&scratch)
            .args(MASKED)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting unshare")?;
        let mut sd = Systemd {
            child,
            cgroup,
            scratch,
            init_pid: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = sd.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = sd.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("the sandbox exited before systemd booted ({status}): {err}");
            }
            if sd.init_pid == 0 {
                sd.init_pid = fs::read_to_string(sd.cgroup.join("init.scope/cgroup.procs"))
                    .ok()
                    .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
                    .unwrap_or(0);
            }
            if sd.init_pid != 0 {
                let state = sd.run(&["systemctl", "is-system-running"])?;
                let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
                if state == "running" || state == "degraded" {
                    return Ok(sd);
                }
            }
            if Instant::now() > deadline {
                bail!("systemd in the sandbox did not finish booting within 60s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A command run inside the sandbox (its mount and pid namespaces).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.init_pid.to_string())
            .args(["-m", "-p", "--"])
            .args(argv)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, argv: &[&str]) -> Result<Output> {
        self.command(argv)
            .output()
            .with_context(|| format!("running {argv:?} in the sandbox"))
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, argv: &[&str]) -> Result<String> {
        let out = self.run(argv)?;
        if !out.status.success() {
            bail!(
                "{argv:?} failed in the sandbox ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A path inside the sandbox, reachable from the host through its init's root.
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.init_pid)).join(inside.trim_start_matches('/'))
    }

    pub fn write(&self, inside: &str, contents: &[u8]) -> Result<()> {
        let p = self.path(inside);
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&p, contents).with_context(|| format!("writing {inside} in the sandbox"))
    }

    /// A file only `owner` may read (mode 0600), e.g. an upstream password for the service.
    pub fn write_secret(&self, inside: &str, contents: &[u8], owner: &str) -> Result<()> {
        self.write(inside, contents)?;
        self.ok(&["chown", &format!("{owner}:{owner}"), inside])?;
        self.ok(&["chmod", "600", inside])?;
        Ok(())
    }

    /// `dpkg -i` of a package from the host.
    pub fn install_deb(&self, deb: &Path) -> Result<String> {
        let inside = format!(
            "/root/{}",
            deb.file_name().context("package path")?.to_string_lossy()
        );
        let bytes = fs::read(deb).with_context(|| format!("reading {}", deb.display()))?;
        self.write(&inside, &bytes)?;
        // Container images ship a policy-rc.d that forbids starting services on install; a real
        // host has none, and the package must start its unit there.
        self.ok(&["rm", "-f", "/usr/sbin/policy-rc.d"])?;
        self.ok(&["dpkg", "-i", &inside])
    }

    /// One `systemctl show` property of a unit.
    pub fn property(&self, unit: &str, name: &str) -> Result<String> {
        let out = self.ok(&["systemctl", "show", "--value", "-p", name, unit])?;
        Ok(out.trim().to_owned())
    }

    /// Waits until `f` holds, polling; the error names what was awaited.
    pub fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        while !f()? {
            if Instant::now() > deadline {
                bail!("timed out after {limit:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        if self.init_pid != 0 {
            let _ = self
                .command(&["systemctl", "poweroff", "--no-block"])
                .output();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever is left (a hung poweroff): the kernel kills the whole tree.
        let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_cgroup_tree(&self.cgroup);
        let _ = fs::remove_dir(&self.scratch);
    }
}

/// Removes a cgroup and its descendants, deepest first (a cgroup goes only when empty).
fn remove_cgroup_tree(dir: &Path) {
    for _ in 0..50 {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_cgroup_tree(&e.path());
                }
            }
        }
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount on this host")
}
