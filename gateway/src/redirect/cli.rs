//! `portcullis run`, `portcullis agents [attach]`, `portcullis uninstall`.

use std::ffi::{CString, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap as BpfHashMap, MapData};
use clap::{Args, Subcommand};
use portcullis_common::{AgentInfo, MAP_AGENTS};

use super::agents::{self, Agent};
use super::{DEFAULT_PIN_PATH, Locations, kernel, loader};

/// Where interception lives; the defaults match the gateway's `[redirect]` defaults.
#[derive(Args, Debug, Clone)]
pub struct LocationArgs {
    /// bpffs directory of the pinned maps and links.
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Agent cgroup root [default: CGROUP2_MOUNT/portcullis-agents].
    #[arg(long)]
    pub agent_root: Option<PathBuf>,
}

impl LocationArgs {
    fn resolve(&self) -> Result<Locations> {
        Locations::resolve(&self.pin_path, self.agent_root.as_deref())
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Agent name: the cgroup directory under the agent root [default: run-PID].
    #[arg(long)]
    pub agent: Option<String>,
    #[command(flatten)]
    pub locations: LocationArgs,
    #[command(flatten)]
    pub token: TokenFileArgs,
    /// The command and its arguments, after `--`.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

#[derive(Args, Debug)]
pub struct AgentsArgs {
    #[command(subcommand)]
    pub action: Option<AgentsAction>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub locations: LocationArgs,
    /// The running gateway's admin socket, asked for live connections and token files.
    #[arg(long, env = "PORTCULLIS_ADMIN_SOCKET", default_value = crate::config::DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum AgentsAction {
    /// Place an existing cgroup (or a systemd unit's cgroup) under interception.
    Attach(AttachArgs),
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// The cgroup directory (absolute, or relative to the cgroup2 mount).
    #[arg(required_unless_present = "unit", conflicts_with = "unit")]
    pub path: Option<PathBuf>,
    /// A systemd unit whose cgroup to attach, e.g. `agent.service`.
    #[arg(long)]
    pub unit: Option<String>,
    /// Agent name [default: the unit name, or the cgroup directory name].
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub locations: LocationArgs,
    #[command(flatten)]
    pub token: TokenFileArgs,
}

/// The agent's identity for targets with `[target.identity]`, set in the running gateway.
#[derive(Args, Debug, Clone)]
pub struct TokenFileArgs {
    /// A file with the agent's OIDC token (a projected service-account token, a JWT-SVID...),
    /// read by the gateway at every connect, as `[[agent]] token_file` in its configuration.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The running gateway's admin socket, where --token-file is set.
    #[arg(long, env = "PORTCULLIS_ADMIN_SOCKET", default_value = crate::config::DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
}

impl TokenFileArgs {
    /// Sets the agent's token file in the gateway; without --token-file, nothing to do. Fails
    /// (and the agent does not start) when the gateway refuses or cannot be reached.
    fn apply(&self, agent: &str) -> Result<()> {
        let Some(file) = &self.token_file else {
            return Ok(());
        };
        let file =
            std::path::absolute(file).with_context(|| format!("token file {}", file.display()))?;
        let req = crate::admin::Request::SetTokenFile {
            agent: agent.to_owned(),
            token_file: Some(file.clone()),
        };
        crate::admin::client::call(&self.admin_socket, &req)
            .with_context(|| format!("setting agent {agent}'s token file {}", file.display()))?;
        Ok(())
    }

    /// Clears what [`TokenFileArgs::apply`] set, once the agent is gone (best effort).
    fn clear(&self, agent: &str) {
        if self.token_file.is_some() {
            let req = crate::admin::Request::SetTokenFile {
                agent: agent.to_owned(),
                token_file: None,
            };
            let _ = crate::admin::client::call(&self.admin_socket, &req);
        }
    }
}

#[derive(Args, Debug)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub locations: LocationArgs,
}

/// Runs the command in an agent cgroup and exits with its status (128+N if killed by signal N).
/// Refuses to start it when the agent root is not under interception: an agent must never
/// run unintercepted by mistake.
pub fn run(args: RunArgs) -> Result<()> {
    let loc = args.locations.resolve()?;
    let root_id = kernel::cgroup_id(&loc.agent_root).with_context(|| {
        format!(
            "agent cgroup root {} missing: start the gateway with [redirect] enabled = true",
            loc.agent_root.display()
        )
    })?;
    if loader::link_dirs_of(&loc, root_id).is_empty() {
        bail!(
            "{} is not under interception (no links pinned in {}): start the gateway with \
             [redirect] enabled = true first",
            loc.agent_root.display(),
            loc.pin_path.display()
        );
    }
    let name = args
        .agent
        .unwrap_or_else(|| format!("run-{}", std::process::id()));
    agents::validate_name(&name)?;
    let cgroup = loc.agent_root.join(&name);
    match fs::create_dir(&cgroup) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", cgroup.display())),
    }
    let mut registry: BpfHashMap<MapData, u64, AgentInfo> = loader::open_pinned(&loc, MAP_AGENTS)?;
    let cgroup_id = agents::register(&mut registry, &loc, &name, &cgroup)?;
    args.token.apply(&name)?;

    let (program, rest) = args.command.split_first().context("no command given")?;
    let mut command = Command::new(program);
    command.args(rest);
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    // SAFETY: the hook runs in the child between fork and exec and only makes
    // async-signal-safe calls (open, write, close) on memory prepared before the fork.
    unsafe {
        command.pre_exec(move || enter_cgroup(&procs));
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", program.to_string_lossy()))?;
    // The terminal's ^C and ^\ reach the child directly; the parent stays to clean up.
    // SAFETY: setting the disposition of two signals to SIG_IGN in this process only.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let status = child.wait().context("waiting for the agent command")?;
    // Still busy (other runs of this agent, or daemons it left) keeps the cgroup.
    if fs::remove_dir(&cgroup).is_ok() {
        agents::unregister(&mut registry, cgroup_id);
        args.token.clear(&name);
    }
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    std::process::exit(code)
}

/// Moves the calling (child) process into the cgroup: "0" means the writer itself.
fn enter_cgroup(procs: &CString) -> io::Result<()> {
    // SAFETY: `procs` is a valid NUL-terminated path.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: writing one byte from a static buffer to the fd opened above.
    let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the fd opened above, once.
    unsafe { libc::close(fd) };
    if written != 1 {
        return Err(err);
    }
    Ok(())
}

/// `portcullis agents`: list agents with their processes, and from the running gateway their
/// live connections and token files (configured or runtime).
/// `portcullis agents attach`: place a cgroup under interception.
pub fn agents(args: AgentsArgs) -> Result<()> {
    match args.action {
        Some(AgentsAction::Attach(attach_args)) => attach(attach_args),
        None => list(
            &args.locations.resolve()?,
            args.json,
            &crate::admin::client::live_agents(&args.admin_socket),
        ),
    }
}

#[derive(serde::Serialize)]
struct AgentRow {
    name: String,
    /// The agent's cgroup; `None` for an agent known only by its token file.
    path: Option<PathBuf>,
    cgroup_id: Option<u64>,
    /// Placed under interception by `agents attach` (its own links), not under the agent root.
    attached: bool,
    processes: usize,
    connections: u64,
    token_file: Option<PathBuf>,
    /// Where the token file was set: `configured` (`[[agent]]`) or `runtime` (`--token-file`).
    token_file_source: Option<crate::admin::TokenFileSource>,
}

fn list(loc: &Locations, json: bool, live: &crate::admin::client::LiveAgents) -> Result<()> {
    let registry: BpfHashMap<MapData, u64, AgentInfo> = loader::open_pinned(loc, MAP_AGENTS)?;
    let mut found = agents::list(&registry, loc);
    // Directories made by hand under the root are agents too, registered at the next start.
    if let Ok(entries) = fs::read_dir(&loc.agent_root) {
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            let Ok(cgroup_id) = kernel::cgroup_id(&path) else {
                continue;
            };
            if !found.iter().any(|a| a.cgroup_id == cgroup_id) {
                found.push(Agent {
                    name: entry.file_name().to_string_lossy().into_owned(),
                    path,
                    cgroup_id,
                    attached: false,
                });
            }
        }
    }
    let token_file = |name: &str| live.token_files.iter().find(|f| f.agent == name);
    let mut rows: Vec<AgentRow> = found
        .into_iter()
        .map(|agent| AgentRow {
            processes: count_processes(&agent.path),
            connections: live.connections.get(&agent.name).copied().unwrap_or(0),
            token_file: token_file(&agent.name).map(|f| f.token_file.clone()),
            token_file_source: token_file(&agent.name).map(|f| f.source),
            name: agent.name,
            path: Some(agent.path),
            cgroup_id: Some(agent.cgroup_id),
            attached: agent.attached,
        })
        .collect();
    // An agent with a token file and no cgroup yet: the gateway will know it when it comes.
    for f in &live.token_files {
        if !rows.iter().any(|r| r.name == f.agent) {
            rows.push(AgentRow {
                name: f.agent.clone(),
                path: None,
                cgroup_id: None,
                attached: false,
                processes: 0,
                connections: live.connections.get(&f.agent).copied().unwrap_or(0),
                token_file: Some(f.token_file.clone()),
                token_file_source: Some(f.source),
            });
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let cgroups: Vec<String> = rows
        .iter()
        .map(|r| match &r.path {
            Some(p) if r.attached => format!("{} (attached)", p.display()),
            Some(p) => p.display().to_string(),
            None => "-".into(),
        })
        .collect();
    let width = cgroups.iter().map(String::len).max().unwrap_or(0).max(6);
    println!(
        "{:<24} {:>9} {:>11}  {:<width$}  TOKEN FILE",
        "AGENT", "PROCESSES", "CONNECTIONS", "CGROUP"
    );
    for (r, cgroup) in rows.iter().zip(&cgroups) {
        let token_file = match (&r.token_file, r.token_file_source) {
            (Some(f), Some(source)) => format!("{} ({})", f.display(), source.as_str()),
            _ => "-".into(),
        };
        println!(
            "{:<24} {:>9} {:>11}  {cgroup:<width$}  {token_file}",
            r.name, r.processes, r.connections
        );
    }
    Ok(())
}

/// Processes in a cgroup and its descendants.
fn count_processes(cgroup: &Path) -> usize {
    let own = fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|s| s.lines().count())
        .unwrap_or(0);
    let children: usize = fs::read_dir(cgroup)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| count_processes(&e.path()))
                .sum()
        })
        .unwrap_or(0);
    own + children
}

fn attach(args: AttachArgs) -> Result<()> {
    let loc = args.locations.resolve()?;
    let (path, default_name) = match (&args.path, &args.unit) {
        (_, Some(unit)) => (unit_cgroup(unit, &loc.cgroup2_mount)?, unit.clone()),
        (Some(path), None) => {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                loc.cgroup2_mount.join(path)
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (path, name)
        }
        (None, None) => bail!("give a cgroup PATH or --unit NAME"),
    };
    if !path.starts_with(&loc.cgroup2_mount) {
        bail!(
            "{} is not under the cgroup2 mount {}",
            path.display(),
            loc.cgroup2_mount.display()
        );
    }
    let own = kernel::own_cgroup(&loc.cgroup2_mount)?;
    if own.starts_with(&path) {
        bail!(
            "refusing to attach {}: it contains this process (and maybe the gateway)",
            path.display()
        );
    }
    let name = args.name.unwrap_or(default_name);
    kernel::preflight(&loc)?;
    let mut loaded = loader::Loaded::load(&loc)?;
    let mut maps = loaded.take_maps()?;
    agents::register(&mut maps.agents, &loc, &name, &path)?;
    args.token.apply(&name)?;
    loaded.ensure_attached(&loc, &path)?;
    println!("agent {name}: {} is under interception", path.display());
    Ok(())
}

/// A systemd unit's cgroup, from `systemctl show -p ControlGroup`.
fn unit_cgroup(unit: &str, mount: &Path) -> Result<PathBuf> {
    let out = Command::new("systemctl")
        .args(["show", "--property=ControlGroup", "--value", unit])
        .output()
        .context("cannot run systemctl (is this a systemd host?)")?;
    let rel = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || rel.is_empty() {
        bail!("systemd unit {unit} has no cgroup (is it running?)");
    }
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Removes every pinned map and link (interception stops) and the agent cgroups that are empty.
pub fn uninstall(args: UninstallArgs) -> Result<()> {
    let loc = args.locations.resolve()?;
    match fs::remove_dir_all(&loc.pin_path) {
        Ok(()) => println!("removed {}", loc.pin_path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            println!("nothing pinned at {}", loc.pin_path.display());
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot remove {}", loc.pin_path.display()));
        }
    }
    remove_empty_cgroups(&loc.agent_root);
    Ok(())
}

/// Depth first; a cgroup with processes stays (rmdir fails with EBUSY) and is reported.
fn remove_empty_cgroups(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_cgroups(&entry.path());
            }
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => println!("removed cgroup {}", dir.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => println!("kept cgroup {}: {e}", dir.display()),
    }
}
