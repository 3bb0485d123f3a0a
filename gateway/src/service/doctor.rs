//! `portcullis doctor`: what this host offers against what the configuration needs, each missing
//! piece with its fix. `--json` prints the same for machines.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, ServeArgs};
use crate::redirect::kernel;

/// Capabilities interception needs and the unit grants (see packaging/portcullis.service and
/// docs/operations.md for how the set was found).
pub const REDIRECT_CAPS: &[(u32, &str)] =
    &[(39, "CAP_BPF"), (12, "CAP_NET_ADMIN"), (38, "CAP_PERFMON")];
const CAP_SYS_ADMIN: u32 = 21;
const CAP_NET_BIND_SERVICE: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// Not needed by this configuration, or worth knowing but not fatal.
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    /// What to do about it; absent when it passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            outcome: Outcome::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn bad(
        name: &'static str,
        fatal: bool,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name,
            outcome: if fatal { Outcome::Fail } else { Outcome::Warn },
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub config: String,
    pub ok: bool,
    pub checks: Vec<Check>,
}

/// `portcullis doctor [--config FILE] [--json]`. Fails (non-zero exit) when a check fails.
pub fn run(args: &ServeArgs, json: bool) -> anyhow::Result<()> {
    let cfg = Config::from_args(args)?;
    let report = examine(&cfg);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    if !report.ok {
        anyhow::bail!("some checks failed; see the fixes above");
    }
    Ok(())
}

pub fn examine(cfg: &Config) -> Report {
    let redirect = cfg.redirect.enabled;
    let caps = effective_caps();
    let mut checks = vec![
        check_kernel(redirect),
        check_btf(redirect),
        check_bpffs(cfg, redirect),
        check_cgroup2(redirect),
        check_io_uring(),
        check_caps(cfg, caps, redirect),
    ];
    checks.extend(cfg.targets.iter().map(|t| {
        check_upstream(
            &t.name,
            &t.upstream.host,
            t.upstream.port,
            t.connect_timeout,
        )
    }));
    checks.push(check_admin_group(cfg));
    Report {
        config: cfg.origin.clone(),
        ok: checks.iter().all(|c| c.outcome != Outcome::Fail),
        checks,
    }
}

pub fn render(report: &Report) -> String {
    let mut out = format!("portcullis doctor: {}\n", report.config);
    for c in &report.checks {
        let mark = match c.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        };
        out.push_str(&format!("{mark}  {:<16} {}\n", c.name, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("      {:<16} fix: {fix}\n", ""));
        }
    }
    out.push_str(if report.ok {
        "everything this configuration needs is here\n"
    } else {
        "this host cannot run this configuration yet\n"
    });
    out
}

const NEEDED_FOR_REDIRECT: &str = "needed only with [redirect] enabled";

fn check_kernel(redirect: bool) -> Check {
    let (want_major, want_minor) = kernel::MIN_KERNEL;
    match kernel::kernel_release() {
        Ok((major, minor, release)) if (major, minor) >= (want_major, want_minor) => {
            Check::ok("kernel", format!("Linux {release}"))
        }
        Ok((_, _, release)) => Check::bad(
            "kernel",
            redirect,
            format!("Linux {release} is older than {want_major}.{want_minor}"),
            format!("boot Linux {want_major}.{want_minor} or later ({NEEDED_FOR_REDIRECT})"),
        ),
        Err(e) => Check::bad("kernel", redirect, format!("{e:#}"), "mount /proc"),
    }
}

fn check_btf(redirect: bool) -> Check {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Check::ok("btf", "/sys/kernel/btf/vmlinux")
    } else {
        Check::bad(
            "btf",
            redirect,
            "no kernel BTF at /sys/kernel/btf/vmlinux",
            format!("use a kernel built with CONFIG_DEBUG_INFO_BTF=y ({NEEDED_FOR_REDIRECT})"),
        )
    }
}

fn check_bpffs(cfg: &Config, redirect: bool) -> Check {
    let pin = &cfg.redirect.pin_path;
    let mut existing = pin.as_path();
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    match kernel::fs_type(existing) {
        Ok(t) if t == kernel::BPF_FS_MAGIC => {
            Check::ok("bpffs", format!("{} is on bpffs", existing.display()))
        }
        _ => Check::bad(
            "bpffs",
            redirect,
            format!("no bpf filesystem at {}", existing.display()),
            "mount -t bpf bpf /sys/fs/bpf (systemd does this at boot on most distributions)",
        ),
    }
}

fn check_cgroup2(redirect: bool) -> Check {
    match kernel::find_cgroup2_mount() {
        Ok(m) => Check::ok("cgroup2", format!("mounted at {}", m.display())),
        Err(e) => Check::bad(
            "cgroup2",
            redirect,
            format!("{e:#}"),
            "mount -t cgroup2 none /sys/fs/cgroup (or boot with systemd.unified_cgroup_hierarchy=1)",
        ),
    }
}

fn check_io_uring() -> Check {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
        .unwrap_or(0);
    match crate::daemon::io_runtime() {
        Ok(_) => Check::ok(
            "io_uring",
            format!("a runtime starts (kernel.io_uring_disabled = {sysctl})"),
        ),
        Err(e) => Check::bad(
            "io_uring",
            true,
            format!(
                "cannot create an io_uring instance: {e} (kernel.io_uring_disabled = {sysctl})"
            ),
            match sysctl {
                2 => {
                    "sysctl kernel.io_uring_disabled=0 (or 1 with the gateway's user in kernel.io_uring_group)"
                }
                1 => {
                    "add the gateway's user to the group in kernel.io_uring_group, or sysctl kernel.io_uring_disabled=0"
                }
                _ => {
                    "allow io_uring_setup/io_uring_enter/io_uring_register in the seccomp filter (SystemCallFilter=)"
                }
            },
        ),
    }
}

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn check_caps(cfg: &Config, eff: u64, redirect: bool) -> Check {
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let mut missing: Vec<&str> = Vec::new();
    if redirect && !has(CAP_SYS_ADMIN) {
        missing.extend(
            REDIRECT_CAPS
                .iter()
                .filter(|(c, _)| !has(*c))
                .map(|(_, n)| *n),
        );
    }
    let low_port = cfg
        .listeners
        .iter()
        .map(|l| l.listen)
        .chain(redirect.then_some(cfg.redirect.listen))
        .chain(cfg.metrics.listen)
        .any(|a| a.port() != 0 && a.port() < 1024);
    if low_port && !has(CAP_NET_BIND_SERVICE) {
        missing.push("CAP_NET_BIND_SERVICE");
    }
    if missing.is_empty() {
        let needed = if redirect {
            "interception's capabilities are held"
        } else {
            "no capability is needed without [redirect]"
        };
        Check::ok("capabilities", needed)
    } else {
        Check::bad(
            "capabilities",
            true,
            format!("missing {}", missing.join(", ")),
            format!(
                "run under the packaged unit (AmbientCapabilities={}) or as root",
                missing.join(" ")
            ),
        )
    }
}

fn check_upstream(name: &str, host: &str, port: u16, timeout: Duration) -> Check {
    let timeout = timeout.min(Duration::from_secs(5));
    let label = format!("target {name}: {host}:{port}");
    let addrs = match (host, port).to_socket_addrs() {
        Ok(a) => a.collect::<Vec<_>>(),
        Err(e) => {
            return Check::bad(
                "upstream",
                true,
                format!("{label}: cannot resolve: {e}"),
                "fix `upstream` in the [[target]] or the host's DNS",
            );
        }
    };
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(_) => return Check::ok("upstream", format!("{label} accepts connections")),
            Err(e) => last = Some(e),
        }
    }
    Check::bad(
        "upstream",
        true,
        format!(
            "{label}: {}",
            last.map_or("no address".to_owned(), |e| e.to_string())
        ),
        "start the upstream, or fix `upstream` in the [[target]] (and any firewall between)",
    )
}

fn check_admin_group(cfg: &Config) -> Check {
    let group = &cfg.admin_group;
    let exists = std::fs::read_to_string("/etc/group")
        .map(|t| {
            t.lines()
                .any(|l| l.split(':').next() == Some(group.as_str()))
        })
        .unwrap_or(false);
    if exists {
        Check::ok(
            "admin group",
            format!("group {group} exists for {}", cfg.admin_socket.display()),
        )
    } else {
        Check::bad(
            "admin group",
            false,
            format!(
                "no group {group}: only root and the gateway's user can use {}",
                cfg.admin_socket.display()
            ),
            format!(
                "systemd-sysusers (the package's sysusers.d entry) or groupadd --system {group}"
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_that_listens_passes_and_one_that_does_not_fails_with_a_fix() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap().port();
        let ok = check_upstream("a", "127.0.0.1", open, Duration::from_secs(2));
        assert_eq!(ok.outcome, Outcome::Ok, "{ok:?}");
        drop(listener);
        let bad = check_upstream("a", "127.0.0.1", open, Duration::from_secs(2));
        assert_eq!(bad.outcome, Outcome::Fail, "{bad:?}");
        assert!(bad.fix.is_some());
    }

    #[test]
    fn the_embedded_default_is_examined_and_rendered() {
        let cfg = Config::parse(crate::config::EMBEDDED_DEFAULT, "embedded default").unwrap();
        let report = examine(&cfg);
        let text = render(&report);
        for name in [
            "kernel",
            "btf",
            "bpffs",
            "cgroup2",
            "io_uring",
            "capabilities",
            "upstream",
            "admin group",
        ] {
            assert!(
                report.checks.iter().any(|c| c.name == name),
                "{name} missing:\n{text}"
            );
        }
        // Without [redirect], the eBPF prerequisites never fail the report.
        for c in report
            .checks
            .iter()
            .filter(|c| ["kernel", "btf", "bpffs", "cgroup2"].contains(&c.name))
        {
            assert_ne!(c.outcome, Outcome::Fail, "{text}");
        }
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["checks"].as_array().unwrap().len(),
            report.checks.len()
        );
    }
}
