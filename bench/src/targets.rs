//! The targets under test: how each is started, where clients connect, which process is the proxy.
//!
//! Every target is one `TargetKind`; adding a mode is one variant, one arm in `start`, and a name.
//! A target that cannot exist on this host or build is *skipped* with a reason; one that should
//! work but does not is *failed* with a reason. Either way the others run.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use testkit::Postgres;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// Clients connect to PostgreSQL itself: the baseline.
    Direct,
    /// `portcullis serve`: an explicit listener and one target, pooling off. The gateway's
    /// default policy is the built-in `default`, so this is `GatewayPolicy` without naming it:
    /// the gap between the two is the run's noise.
    Gateway,
    /// The gateway with `--policy observe`: policy evaluated and recorded, nothing blocked.
    GatewayObserve,
    /// The gateway with `--policy default`: policy enforced and results masked; upstream pooling
    /// off in its config, so every connect dials.
    GatewayPolicy,
    /// `GatewayPolicy` with warm upstream connections (`[target.pool] enabled = true`).
    GatewayPooled,
    /// `GatewayPolicy` with session recording on, as shipped: what recording costs. The other
    /// gateway targets run with recording off (`danger_disable`), so they measure the rest.
    GatewayRecord,
    /// eBPF redirect: clients dial PostgreSQL's own address under `portcullis run`.
    GatewayRedirect,
    /// HAProxy in TCP mode: a plain forwarder, the cost of one hop.
    Haproxy,
    /// `relay` (this package's bare TCP relay on the gateway's own io_uring runtime, one
    /// thread): the floor under the gateway's proxy core, measured in the same run.
    Relay,
    /// PgBouncer in session pooling mode.
    Pgbouncer,
    /// `Gateway` run by the `--baseline-gateway-bin` build: before and after in one run.
    BaselineGateway,
    /// `GatewayPolicy` run by the `--baseline-gateway-bin` build.
    BaselineGatewayPolicy,
}

impl TargetKind {
    /// Every target but the baseline ones, which run when a baseline binary is given.
    pub const ALL: [TargetKind; 10] = [
        TargetKind::Direct,
        TargetKind::Gateway,
        TargetKind::GatewayObserve,
        TargetKind::GatewayPolicy,
        TargetKind::GatewayPooled,
        TargetKind::GatewayRecord,
        TargetKind::GatewayRedirect,
        TargetKind::Haproxy,
        TargetKind::Relay,
        TargetKind::Pgbouncer,
    ];
    pub const BASELINE: [TargetKind; 2] = [
        TargetKind::BaselineGateway,
        TargetKind::BaselineGatewayPolicy,
    ];

    /// The gateway mode a baseline target runs: the same as its current counterpart.
    fn mode(self) -> TargetKind {
        match self {
            TargetKind::BaselineGateway => TargetKind::Gateway,
            TargetKind::BaselineGatewayPolicy => TargetKind::GatewayPolicy,
            other => other,
        }
    }

    fn is_baseline(self) -> bool {
        self.mode() != self
    }

    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::Gateway => "gateway",
            TargetKind::GatewayObserve => "gateway-observe",
            TargetKind::GatewayPolicy => "gateway-policy",
            TargetKind::GatewayPooled => "gateway-pooled",
            TargetKind::GatewayRecord => "gateway-record",
            TargetKind::GatewayRedirect => "gateway-redirect",
            TargetKind::Haproxy => "haproxy",
            TargetKind::Relay => "relay",
            TargetKind::Pgbouncer => "pgbouncer",
            TargetKind::BaselineGateway => "baseline-gateway",
            TargetKind::BaselineGatewayPolicy => "baseline-gateway-policy",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            TargetKind::Direct => "PostgreSQL itself, no hop",
            TargetKind::Gateway => {
                "portcullis, explicit listener, no upstream pooling (built-in default policy)"
            }
            TargetKind::GatewayObserve => "portcullis --policy observe",
            TargetKind::GatewayPolicy => "portcullis --policy default (policy and masking on)",
            TargetKind::GatewayPooled => {
                "portcullis --policy default (policy and masking on), warm upstream connections"
            }
            TargetKind::GatewayRecord => {
                "portcullis --policy default with session recording (policy, masking, recording)"
            }
            TargetKind::GatewayRedirect => {
                "portcullis, eBPF redirect, clients under `portcullis run`"
            }
            TargetKind::Haproxy => "HAProxy, TCP mode (plain forwarder)",
            TargetKind::Relay => {
                "bare TCP relay on the gateway's io_uring runtime (compio, one thread): the floor"
            }
            TargetKind::Pgbouncer => "PgBouncer, session pooling, SCRAM",
            TargetKind::BaselineGateway => "the baseline build, as `gateway`",
            TargetKind::BaselineGatewayPolicy => "the baseline build, as `gateway-policy`",
        }
    }
}

/// Where a client connects and how it is launched.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Sent only when the target asks (PGPASSWORD for pgbench and the probe).
    pub password: Option<String>,
    /// Command prefix every client runs under (eBPF-redirect mode: `portcullis run ... --`).
    pub wrap: Vec<OsString>,
    pub wrap_env: Vec<(String, String)>,
    /// The proxy process whose CPU is charged to the target.
    pub proxy_pid: Option<u32>,
}

impl Endpoint {
    /// `program args...`, under the target's wrapper when it has one.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.envs(self.wrap_env.iter().map(|(k, v)| (k, v)));
        match &self.password {
            Some(p) => cmd.env("PGPASSWORD", p),
            None => cmd.env_remove("PGPASSWORD"),
        };
        // Same handshake for every target: no SSLRequest round trip (the loopback legs are plain).
        cmd.env("PGSSLMODE", "disable")
            .env("PGCONNECT_TIMEOUT", "10");
        cmd
    }
}

/// A started target: its endpoint, and the processes and files that live as long as it does.
pub struct Running {
    pub endpoint: Endpoint,
    pub version: Option<String>,
    process: Option<ChildProc>,
    _dir: Option<tempfile::TempDir>,
}

impl Running {
    /// Why the target's process is gone, if it is.
    pub fn exit_reason(&mut self) -> Option<String> {
        self.process.as_mut().and_then(|p| p.exit_reason())
    }

    pub fn rss_kib(&self) -> Option<u64> {
        self.endpoint.proxy_pid.and_then(testkit::rss_kib)
    }
}

pub enum Start {
    Running(Box<Running>),
    Skipped(String),
    Failed(String),
}

/// What targets are built from: the database, the gateway binary, the Debian tools.
pub struct Lab<'a> {
    pub pg: &'a Postgres,
    pub gateway_bin: &'a Path,
    /// An older build to compare against in the same run (`--baseline-gateway-bin`).
    pub baseline_bin: Option<&'a Path>,
    pub tools: &'a Tools,
}

pub fn start(kind: TargetKind, lab: &Lab) -> Start {
    let started = match kind {
        TargetKind::Direct => Ok(direct(lab.pg)),
        TargetKind::Haproxy => match &lab.tools.haproxy {
            Ok(bin) => haproxy(bin, lab.pg),
            Err(why) => return Start::Skipped(why.clone()),
        },
        TargetKind::Pgbouncer => match &lab.tools.pgbouncer {
            Ok(bin) => pgbouncer(bin, lab.pg),
            Err(why) => return Start::Skipped(why.clone()),
        },
        TargetKind::Relay => match relay_bin() {
            Some(bin) => relay(&bin, lab.pg),
            None => {
                return Start::Skipped(
                    "no `relay` binary beside portcullis-bench \
                     (cargo build --release -p portcullis-bench builds both)"
                        .into(),
                );
            }
        },
        TargetKind::Gateway
        | TargetKind::GatewayObserve
        | TargetKind::GatewayPolicy
        | TargetKind::GatewayPooled
        | TargetKind::GatewayRecord
        | TargetKind::GatewayRedirect => {
            if let Some(why) = gateway_unavailable(kind, lab.gateway_bin) {
                return Start::Skipped(why);
            }
            gateway(kind, lab.gateway_bin, lab)
        }
        TargetKind::BaselineGateway | TargetKind::BaselineGatewayPolicy => {
            let Some(bin) = lab.baseline_bin else {
                return Start::Skipped("no --baseline-gateway-bin given".into());
            };
            if !bin.exists() {
                return Start::Failed(format!("no baseline gateway binary at {}", bin.display()));
            }
            if let Some(why) = gateway_unavailable(kind.mode(), bin) {
                return Start::Skipped(why);
            }
            gateway(kind, bin, lab)
        }
    };
    match started {
        Ok(r) => Start::Running(Box::new(r)),
        Err(e) => Start::Failed(format!("{e:#}")),
    }
}

fn direct(pg: &Postgres) -> Running {
    Running {
        endpoint: Endpoint {
            host: pg.host.clone(),
            port: pg.port,
            user: pg.user.clone(),
            password: Some(pg.password.clone()),
            wrap: Vec::new(),
            wrap_env: Vec::new(),
            proxy_pid: None,
        },
        version: first_line(Command::new(pg.bindir().join("postgres")).arg("--version")),
        process: None,
        _dir: None,
    }
}

fn haproxy(bin: &Path, pg: &Postgres) -> Result<Running> {
    let dir = scratch_dir("haproxy")?;
    let port = testkit::free_port();
    let cfg = dir.path().join("haproxy.cfg");
    fs::write(
        &cfg,
        format!(
            "global\n    maxconn 2000\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\n\
             listen postgres\n    bind 127.0.0.1:{port}\n    server pg {}:{}\n",
            pg.host, pg.port
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("-db").arg("-f").arg(&cfg);
    let mut proc = ChildProc::spawn(cmd, dir.path().join("haproxy.log"))?;
    proc.wait_listening(([127, 0, 0, 1], port).into(), Duration::from_secs(15))?;
    Ok(forwarder(
        pg,
        port,
        proc,
        first_line(Command::new(bin).arg("-v")),
        dir,
    ))
}

/// `relay`, built with this package: beside the running `portcullis-bench`.
fn relay_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.join("relay");
    bin.exists().then_some(bin)
}

fn relay(bin: &Path, pg: &Postgres) -> Result<Running> {
    let dir = scratch_dir("relay")?;
    let port = testkit::free_port();
    let mut cmd = Command::new(bin);
    cmd.arg(format!("127.0.0.1:{port}"))
        .arg(format!("{}:{}", pg.host, pg.port));
    let mut proc = ChildProc::spawn(cmd, dir.path().join("relay.log"))?;
    proc.wait_listening(([127, 0, 0, 1], port).into(), Duration::from_secs(15))?;
    let version = Some(format!("portcullis-bench {}", env!("CARGO_PKG_VERSION")));
    Ok(forwarder(pg, port, proc, version, dir))
}

/// PgBouncer authenticates clients with SCRAM against the role's own SCRAM secret (copied from
/// pg_authid into the userlist), and reuses the client's SCRAM proof to log in to PostgreSQL:
/// no plaintext password on disk, as in a production setup.
fn pgbouncer(bin: &Path, pg: &Postgres) -> Result<Running> {
    let secret = pg
        .superuser_sql(&format!(
            "SELECT rolpassword FROM pg_authid WHERE rolname = '{}'",
            pg.user
        ))?
        .trim()
        .to_string();
    if !secret.starts_with("SCRAM-SHA-256$") {
        bail!(
            "role {} has no SCRAM secret to put in PgBouncer's userlist",
            pg.user
        );
    }
    let dir = scratch_dir("pgbouncer")?;
    let port = testkit::free_port();
    let userlist = dir.path().join("userlist.txt");
    fs::write(&userlist, format!("\"{}\" \"{secret}\"\n", pg.user))?;
    fs::set_permissions(&userlist, fs::Permissions::from_mode(0o600))?;
    let ini = dir.path().join("pgbouncer.ini");
    fs::write(
        &ini,
        format!(
            "[databases]\n{db} = host={host} port={pgport} dbname={db}\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {userlist}\npool_mode = session\n\
             max_client_conn = 1000\ndefault_pool_size = 100\nserver_tls_sslmode = disable\n\
             ignore_startup_parameters = extra_float_digits\n\
             log_connections = 0\nlog_disconnections = 0\n",
            db = pg.database,
            host = pg.host,
            pgport = pg.port,
            userlist = userlist.display(),
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg(&ini);
    // PgBouncer refuses to run as root.
    if testkit::is_root() {
        let (uid, gid) = postgres_ids()?;
        for p in [dir.path(), &userlist, &ini] {
            chown(p, Some(uid), Some(gid))?;
        }
        cmd.uid(uid).gid(gid);
    }
    let mut proc = ChildProc::spawn(cmd, dir.path().join("pgbouncer.log"))?;
    proc.wait_listening(([127, 0, 0, 1], port).into(), Duration::from_secs(15))?;
    Ok(forwarder(
        pg,
        port,
        proc,
        first_line(Command::new(bin).arg("--version")),
        dir,
    ))
}

/// A forwarder on 127.0.0.1:`port` that clients log in through with PostgreSQL's own role.
fn forwarder(
    pg: &Postgres,
    port: u16,
    proc: ChildProc,
    version: Option<String>,
    dir: tempfile::TempDir,
) -> Running {
    Running {
        endpoint: Endpoint {
            host: "127.0.0.1".into(),
            port,
            user: pg.user.clone(),
            password: Some(pg.password.clone()),
            wrap: Vec::new(),
            wrap_env: Vec::new(),
            proxy_pid: Some(proc.pid()),
        },
        version,
        process: Some(proc),
        _dir: Some(dir),
    }
}

fn succeeds(bin: &Path, args: &[&str]) -> bool {
    Command::new(bin)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn serve_help(bin: &Path) -> String {
    Command::new(bin)
        .args(["serve", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Why this gateway mode cannot run here, if it cannot.
fn gateway_unavailable(kind: TargetKind, bin: &Path) -> Option<String> {
    if !bin.exists() {
        // Not a skip for the plain gateway: the gateway is what the harness is for.
        return None;
    }
    let help = |args: &[&str]| -> Option<String> {
        let out = Command::new(bin).args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    match kind {
        TargetKind::GatewayObserve
        | TargetKind::GatewayPolicy
        | TargetKind::GatewayPooled
        | TargetKind::GatewayRecord => match help(&["serve", "--help"]) {
            Some(h) if h.contains("--policy") => None,
            _ => Some(format!("{} has no `serve --policy` flag", bin.display())),
        },
        TargetKind::GatewayRedirect => {
            if !testkit::is_root() {
                Some("needs root (eBPF cgroup programs); CI runs as root".into())
            } else if help(&["run", "--help"]).is_none() {
                Some(format!(
                    "{} has no `run` subcommand (the eBPF redirect has not landed)",
                    bin.display()
                ))
            } else {
                None
            }
        }
        _ => None,
    }
}

fn gateway(target: TargetKind, bin: &Path, lab: &Lab) -> Result<Running> {
    let kind = target.mode();
    if !bin.exists() {
        bail!(
            "no gateway binary at {} (cargo build --release -p portcullis, or pass --gateway-bin)",
            bin.display()
        );
    }
    let pg = lab.pg;
    let dir = scratch_dir("gateway")?;
    let password_file = pg.write_password_file(dir.path())?;
    let admin_socket = dir.path().join("admin.sock");
    let state_dir = dir.path().join("state");
    fs::create_dir_all(&state_dir)?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve");
    let port = testkit::free_port();
    // The redirect listener is the gateway's own business; agents dial PostgreSQL. Recording
    // is measured by its own target; elsewhere it is off, so it does not blur the others.
    // A baseline build may predate `[recording]` (no `recordings` command) or `--state-dir`.
    let records = !target.is_baseline() || succeeds(bin, &["recordings", "--help"]);
    let state_dir_flag = !target.is_baseline() || serve_help(bin).contains("--state-dir");
    let mut config = String::new();
    if kind == TargetKind::GatewayRedirect {
        config.push_str("[redirect]\nenabled = true\n");
    }
    if kind != TargetKind::GatewayRecord && records {
        config.push_str("[recording]\nenabled = false\ndanger_disable = true\n");
    }
    // Upstream pooling is on by default: only `gateway-pooled` keeps warm connections, the
    // others dial upstream per connect as before pooling, so the target goes in the file with
    // `[target.pool]`. A baseline build may predate the key and would refuse it: it gets
    // `--target`, and its own default.
    let pooled = target == TargetKind::GatewayPooled;
    let in_file = !target.is_baseline();
    if in_file {
        config.push_str(&format!(
            "[[listener]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"main\"\n\n[[target]]\n\
             name = \"main\"\nupstream = \"{}\"\npassword_file = \"{}\"\n\n[target.pool]\n\
             enabled = {pooled}\n",
            pg.url(),
            password_file.display()
        ));
    }
    let cfg = dir.path().join("portcullis.toml");
    fs::write(&cfg, config)?;
    cmd.arg("--config").arg(&cfg);
    if !in_file {
        // An explicit listener too: --target needs one, and it tells when the gateway is up.
        cmd.arg("--listen").arg(format!("127.0.0.1:{port}"));
        cmd.arg("--target")
            .arg(pg.url())
            .arg("--password-file")
            .arg(&password_file);
    }
    cmd.arg("--admin-socket").arg(&admin_socket);
    if state_dir_flag {
        cmd.arg("--state-dir").arg(&state_dir);
    }
    match kind {
        TargetKind::GatewayObserve => {
            cmd.args(["--policy", "observe"]);
        }
        TargetKind::GatewayPolicy | TargetKind::GatewayPooled | TargetKind::GatewayRecord => {
            cmd.args(["--policy", "default"]);
        }
        _ => {}
    }
    // Per-session log lines would be part of what we measure; warnings and errors still show.
    cmd.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
    );
    let mut proc = ChildProc::spawn(cmd, dir.path().join("gateway.log"))?;
    let mut endpoint = Endpoint {
        host: "127.0.0.1".into(),
        port,
        // The gateway injects its own credential: the agent's name and password are its own.
        user: "agent".into(),
        password: Some("agent-password-not-used-upstream".into()),
        wrap: Vec::new(),
        wrap_env: Vec::new(),
        proxy_pid: Some(proc.pid()),
    };
    if kind == TargetKind::GatewayRedirect {
        proc.wait_for_path(&admin_socket, Duration::from_secs(30))?;
        endpoint.host = pg.host.clone();
        endpoint.port = pg.port;
        endpoint.wrap = ["run", "--agent", "bench", "--"]
            .iter()
            .map(OsString::from)
            .collect();
        endpoint.wrap.insert(0, bin.as_os_str().to_owned());
        endpoint.wrap_env = vec![(
            "PORTCULLIS_ADMIN_SOCKET".into(),
            admin_socket.display().to_string(),
        )];
    } else {
        proc.wait_listening(([127, 0, 0, 1], port).into(), Duration::from_secs(30))?;
    }
    Ok(Running {
        endpoint,
        version: first_line(Command::new(bin).arg("--version")),
        process: Some(proc),
        _dir: Some(dir),
    })
}

/// The Debian tools the proxies come from: found, installed, or the reason they are not there.
pub struct Tools {
    pub haproxy: Result<PathBuf, String>,
    pub pgbouncer: Result<PathBuf, String>,
}

impl Tools {
    /// Finds haproxy and pgbouncer; installs the missing ones with apt-get when `install` is set
    /// and we are root. Tools of targets not selected are neither looked for nor installed.
    pub fn ensure(want_haproxy: bool, want_pgbouncer: bool, install: bool) -> Tools {
        let mut missing = Vec::new();
        if want_haproxy && find_program("haproxy").is_none() {
            missing.push("haproxy");
        }
        if want_pgbouncer && find_program("pgbouncer").is_none() {
            missing.push("pgbouncer");
        }
        let install_error = if missing.is_empty() {
            None
        } else if !install {
            Some("not installed (and --no-install was given)".to_string())
        } else if !testkit::is_root() {
            Some("not installed, and installing it needs root (apt-get)".to_string())
        } else {
            crate::progress::note(&format!("installing {} with apt-get", missing.join(" ")));
            apt_install(&missing)
                .err()
                .map(|e| format!("apt-get install failed: {e:#}"))
        };
        let resolve = |name: &str, wanted: bool| -> Result<PathBuf, String> {
            if !wanted {
                return Err("not selected".into());
            }
            find_program(name).ok_or_else(|| {
                format!(
                    "{name} {}",
                    install_error
                        .clone()
                        .unwrap_or_else(|| "not found after installing".into())
                )
            })
        };
        Tools {
            haproxy: resolve("haproxy", want_haproxy),
            pgbouncer: resolve("pgbouncer", want_pgbouncer),
        }
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .context("running apt-get")?;
        if !out.status.success() {
            bail!(
                "apt-get {}: {}",
                args.join(" "),
                tail(&String::from_utf8_lossy(&out.stderr), 5)
            );
        }
        Ok(())
    };
    run(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    run(&args)
}

/// A child process with its output in a log file; killed when dropped.
pub struct ChildProc {
    child: Child,
    log: PathBuf,
}

impl ChildProc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Result<ChildProc> {
        let f = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
        Ok(ChildProc { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exit_reason(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("exited with {status}; {}", self.log_tail())),
            Ok(None) => None,
            Err(e) => Some(format!("cannot be waited for: {e}")),
        }
    }

    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(why) = self.exit_reason() {
                bail!("{why}");
            }
            if Instant::now() > deadline {
                bail!("not {what} within {timeout:?}; {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_listening(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        self.wait_until(&format!("listening on {addr}"), timeout, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    }

    pub fn wait_for_path(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        self.wait_until(
            &format!("ready ({} missing)", path.display()),
            timeout,
            || path.exists(),
        )
    }

    pub fn log_tail(&self) -> String {
        let lines: Vec<String> = File::open(&self.log)
            .map(|f| BufReader::new(f).lines().map_while(Result::ok).collect())
            .unwrap_or_default();
        if lines.is_empty() {
            return "its log is empty".into();
        }
        let from = lines.len().saturating_sub(8);
        format!("last log lines: {}", lines[from..].join(" / "))
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temp dir that the `postgres` user can read too (PgBouncer runs as that user).
fn scratch_dir(what: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("portcullis-bench-{what}-"))
        .tempdir()?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

fn postgres_ids() -> Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == "postgres")
        .map(|f| Ok((f[2].parse()?, f[3].parse()?)))
        .unwrap_or_else(|| bail!("no `postgres` user to run PgBouncer as (it refuses root)"))
}

/// First line of a command's output (stdout, else stderr): a version string.
pub fn first_line(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(Stdio::null()).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

/// The last `n` non-empty lines of a text, joined on one line.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}
