//! Configuration: the TOML file, the quick-start flags, and the embedded default.
//!
//! Every error an operator can cause names the file, the line and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::secret::SecretSource;

pub const DEFAULT_ADMIN_SOCKET: &str = "/run/portcullis/admin.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portcullis";

/// The configuration `portcullis serve` uses when given neither `--config` nor `--target`.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// `portcullis serve`: a config file, or a single target given as flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML configuration file. Without it (and without --target), the embedded default is used.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to accept PostgreSQL clients on (quick start: one explicit listener).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Upstream PostgreSQL, as postgres://USER@HOST:PORT/DB[?sslmode=MODE&sslrootcert=FILE].
    #[arg(long, requires = "listen")]
    pub target: Option<String>,
    /// File holding the upstream password (refused when group- or world-readable).
    #[arg(long, conflicts_with = "password_env")]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the upstream password.
    #[arg(long)]
    pub password_env: Option<String>,
    /// Admin API Unix socket [default: /run/portcullis/admin.sock].
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// State directory [default: /var/lib/portcullis].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Policy: a built-in name (`default`, `observe`) or a TOML file.
    #[arg(long)]
    pub policy: Option<String>,
    /// Log format: `plain` (journald-friendly lines) or `json`.
    #[arg(long)]
    pub log_format: Option<LogFormat>,
    /// I/O worker threads, one io_uring runtime each [default: one per core].
    #[arg(long)]
    pub workers: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// The TOML file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    gateway: GatewaySection,
    #[serde(default)]
    listener: Vec<ListenerSection>,
    #[serde(default)]
    target: Vec<Spanned<TargetSection>>,
    #[serde(default)]
    redirect: Option<crate::redirect::RedirectConfig>,
    #[serde(default)]
    metrics: crate::service::MetricsConfig,
    #[serde(default)]
    recording: crate::record::RecordingConfig,
    #[serde(default)]
    agent: Vec<crate::idp::config::AgentConfig>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GatewaySection {
    admin_socket: Option<PathBuf>,
    admin_group: Option<String>,
    state_dir: Option<PathBuf>,
    policy: Option<String>,
    log_format: Option<LogFormat>,
    workers: Option<usize>,
    drain_timeout: Option<Spanned<String>>,
    max_message_bytes: Option<usize>,
    approval_retention: Option<Spanned<String>>,
    startup_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerSection {
    listen: SocketAddr,
    target: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSection {
    name: String,
    /// The wire protocol the target speaks; default `postgres`.
    protocol: Option<Spanned<String>>,
    upstream: Spanned<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    connect_timeout: Option<Spanned<String>>,
    /// Sends a cleartext or md5 password even where the server cannot be verified.
    danger_password_over_unverified_channel: Option<bool>,
    /// Destinations agents dial that route here (redirect mode): "ADDR[/PREFIX]:PORT".
    #[serde(default)]
    protect: Vec<Spanned<String>>,
    identity: Option<crate::idp::config::TargetIdentity>,
    #[serde(default)]
    role: Vec<crate::idp::config::RoleMapping>,
    /// TLS between the agent and the gateway; off unless set.
    local_tls: Option<Spanned<crate::forward::local_tls::LocalTlsConfig>>,
    /// Warm upstream connections; off unless `enabled = true`.
    pool: Option<Spanned<PoolSection>>,
    /// Upstream connections open at once, busy and idle, over every worker; none by default.
    max_upstream_connections: Option<Spanned<usize>>,
    /// How long a session waits for an upstream connection at that cap; default 10s.
    upstream_queue_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSection {
    enabled: Option<bool>,
    min_idle: Option<usize>,
    max_idle_per_key: Option<usize>,
    idle_timeout: Option<Spanned<String>>,
    max_lifetime: Option<Spanned<String>>,
    health_check_after: Option<Spanned<String>>,
}

/// The gateway's settings after merging file, flags and defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from, for messages: a path or "embedded default".
    pub origin: String,
    pub admin_socket: PathBuf,
    /// Group allowed on the admin socket besides root.
    pub admin_group: String,
    pub state_dir: PathBuf,
    pub policy: String,
    pub log_format: LogFormat,
    pub workers: usize,
    /// How long SIGTERM waits for sessions to finish before closing them.
    pub drain_timeout: Duration,
    /// Largest message the gateway buffers whole (COPY data and rows stream regardless).
    pub max_message_bytes: usize,
    /// Decided approval requests older than this are deleted from the store (default 30 days;
    /// read at start).
    pub approval_retention: Duration,
    /// How long a client has from connecting to its StartupMessage (default 60s, as
    /// PostgreSQL's authentication_timeout; reloads for new connections).
    pub startup_timeout: Duration,
    /// A session whose client sends nothing for this long, with no reply pending, is closed
    /// with 57P05. Off unless set (reloads for new sessions).
    pub idle_timeout: Option<Duration>,
    pub listeners: Vec<Listener>,
    pub targets: Vec<TargetConfig>,
    /// eBPF interception; off unless `[redirect] enabled = true`.
    pub redirect: crate::redirect::RedirectConfig,
    /// Prometheus endpoint; off unless `[metrics] listen` is set.
    pub metrics: crate::service::MetricsConfig,
    /// Session recording (`[recording]`); on by default, under `state_dir`.
    pub recording: crate::record::RecordingConfig,
    /// `[[agent]]`: agents' token files.
    pub agents: Vec<crate::idp::config::AgentConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub listen: SocketAddr,
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    pub name: String,
    /// The wire protocol its clients and upstream speak (config key `protocol`).
    pub protocol: crate::protocol::Protocol,
    pub upstream: Upstream,
    pub password: SecretSource,
    pub connect_timeout: Duration,
    /// Default false. When true, a cleartext or md5 password goes to the upstream even over
    /// plaintext or unverified TLS to a remote host, where an impostor can collect it. Logged as
    /// a warning at every start and reload.
    pub danger_password_over_unverified_channel: bool,
    /// Original destinations that route to this target when the redirect steers a connection
    /// here. Default: the upstream address itself when it is an IP literal or `localhost`.
    pub protect: Vec<crate::redirect::ProtectedTarget>,
    /// `[target.identity]` with its `[[target.role]]`s; `None`: no identity required.
    pub identity: Option<crate::idp::config::TargetIdentity>,
    /// `[target.local_tls]`: the agent's leg answers SSLRequest and direct TLS; `None`: off,
    /// SSLRequest is answered 'N' (reloads for new connections).
    pub local_tls: Option<crate::forward::local_tls::LocalTlsConfig>,
    /// `[target.pool]`: warm upstream connections (reloads: applies to connections released,
    /// taken and swept after the reload; live sessions keep theirs).
    pub pool: PoolConfig,
    /// The most upstream connections open at once, busy and idle, over every worker; `None`:
    /// no cap. A session that needs one more waits for one to close, up to
    /// `upstream_queue_timeout`, then is refused with 53300.
    pub max_upstream_connections: Option<usize>,
    pub upstream_queue_timeout: Duration,
}

/// `[target.pool]`. Each I/O worker keeps its own idle connections, per (target, database,
/// upstream login, role, protocol version, names of the client parameters passed on); a session
/// that ends at rest hands its connection back after `DISCARD ALL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Default true. False: every session dials its own upstream connection and closes it.
    pub enabled: bool,
    /// Idle connections each worker keeps ready per key it has served (default 0: none dialled
    /// ahead).
    pub min_idle: usize,
    /// Idle connections each worker keeps per key at most (default 8); more are closed.
    pub max_idle_per_key: usize,
    /// An idle connection unused for this long is closed (default 5m).
    pub idle_timeout: Duration,
    /// A connection older than this is closed instead of reused (default 1h).
    pub max_lifetime: Duration,
    /// A connection idle longer than this answers `SELECT 1` before reuse (default 30s).
    pub health_check_after: Duration,
}

/// How long a session waits at `max_upstream_connections` by default.
const DEFAULT_UPSTREAM_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: true,
            min_idle: 0,
            max_idle_per_key: 8,
            idle_timeout: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(3600),
            health_check_after: Duration::from_secs(30),
        }
    }
}

/// How the gateway reaches and authenticates to one PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
    pub sslmode: SslMode,
    /// CA bundle; `None` means the system roots.
    pub sslrootcert: Option<PathBuf>,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(
            f,
            "postgres://{}@{host}:{}/{}",
            self.user, self.port, self.database
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A configuration error: `origin:line:column: message`.
#[derive(Debug, thiserror::Error)]
#[error("{origin}:{line}:{column}: {message}")]
pub struct ConfigError {
    pub origin: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Config {
    /// Builds the configuration `serve` runs with.
    pub fn from_args(args: &ServeArgs) -> anyhow::Result<Config> {
        let mut cfg = match (&args.config, &args.target) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
                Config::parse(&text, &path.display().to_string())?
            }
            (None, Some(_)) => Config::parse("", "command line")?,
            (None, None) => Config::parse(EMBEDDED_DEFAULT, "embedded default")?,
        };
        if let Some(url) = &args.target {
            let listen = args
                .listen
                .ok_or_else(|| anyhow::anyhow!("--target needs --listen"))?;
            let upstream = parse_upstream(url).map_err(|m| anyhow::anyhow!("--target: {m}"))?;
            let password = match (&args.password_file, &args.password_env) {
                (Some(p), _) => SecretSource::File(p.clone()),
                (None, Some(v)) => SecretSource::Env(v.clone()),
                (None, None) => SecretSource::None,
            };
            let protect = default_protect(&upstream);
            cfg.targets = vec![TargetConfig {
                name: "default".into(),
                protocol: Default::default(),
                upstream,
                password,
                connect_timeout: Duration::from_secs(10),
                danger_password_over_unverified_channel: false,
                protect,
                identity: None,
                local_tls: None,
                pool: PoolConfig::default(),
                max_upstream_connections: None,
                upstream_queue_timeout: DEFAULT_UPSTREAM_QUEUE_TIMEOUT,
            }];
            cfg.listeners = vec![Listener {
                listen,
                target: "default".into(),
            }];
        } else if let Some(listen) = args.listen {
            let [only] = &mut cfg.listeners[..] else {
                anyhow::bail!(
                    "--listen without --target needs a config with exactly one [[listener]]"
                );
            };
            only.listen = listen;
        }
        if let Some(v) = &args.admin_socket {
            cfg.admin_socket = v.clone();
        }
        if let Some(v) = &args.state_dir {
            cfg.state_dir = v.clone();
        }
        if let Some(v) = &args.policy {
            cfg.policy = v.clone();
        }
        if let Some(v) = args.log_format {
            cfg.log_format = v;
        }
        if let Some(v) = args.workers {
            cfg.workers = v.max(1);
        }
        Ok(cfg)
    }

    /// Parses and validates TOML text. `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let err = |span: Option<std::ops::Range<usize>>, message: String| {
            let (line, column) = line_col(text, span.map_or(0, |s| s.start));
            ConfigError {
                origin: origin.to_owned(),
                line,
                column,
                message,
            }
        };
        let file: File = toml::from_str(text).map_err(|e| {
            let message = match e.span().and_then(|s| key_at(text, s.start)) {
                Some(key) if !e.message().contains(&key) => format!("key `{key}`: {}", e.message()),
                _ => e.message().to_owned(),
            };
            err(e.span(), message)
        })?;
        let g = file.gateway;
        let drain_timeout = match g.drain_timeout {
            Some(s) => parse_duration(s.get_ref())
                .map_err(|m| err(Some(s.span()), format!("key `gateway.drain_timeout`: {m}")))?,
            None => Duration::from_secs(30),
        };
        let duration = |v: Option<Spanned<String>>, key: &str| {
            v.map(|s| {
                parse_duration(s.get_ref())
                    .map_err(|m| err(Some(s.span()), format!("key `gateway.{key}`: {m}")))
            })
            .transpose()
        };
        let approval_retention = duration(g.approval_retention, "approval_retention")?
            .unwrap_or(crate::policy::approval::DEFAULT_RETENTION);
        let startup_timeout =
            duration(g.startup_timeout, "startup_timeout")?.unwrap_or(Duration::from_secs(60));
        let idle_timeout = duration(g.idle_timeout, "idle_timeout")?.filter(|d| !d.is_zero());
        let mut targets = Vec::new();
        for t in file.target {
            let span = t.span();
            let t = t.into_inner();
            if targets.iter().any(|x: &TargetConfig| x.name == t.name) {
                return Err(err(
                    Some(span),
                    format!("key `target.name`: duplicate target name {:?}", t.name),
                ));
            }
            let protocol = match &t.protocol {
                Some(p) => p
                    .get_ref()
                    .parse()
                    .map_err(|m| err(Some(p.span()), format!("key `target.protocol`: {m}")))?,
                None => Default::default(),
            };
            let upstream = parse_upstream(t.upstream.get_ref()).map_err(|m| {
                err(
                    Some(t.upstream.span()),
                    format!("key `target.upstream`: {m}"),
                )
            })?;
            let password = match (t.password_file, t.password_env) {
                (Some(_), Some(_)) => {
                    return Err(err(
                        Some(span),
                        "target sets both `password_file` and `password_env`; keep one".into(),
                    ));
                }
                (Some(p), None) => SecretSource::File(p),
                (None, Some(v)) => SecretSource::Env(v),
                (None, None) => SecretSource::None,
            };
            let connect_timeout = match t.connect_timeout {
                Some(s) => parse_duration(s.get_ref()).map_err(|m| {
                    err(Some(s.span()), format!("key `target.connect_timeout`: {m}"))
                })?,
                None => Duration::from_secs(10),
            };
            let mut protect = Vec::new();
            for p in &t.protect {
                protect.push(
                    parse_protect(p.get_ref())
                        .map_err(|m| err(Some(p.span()), format!("key `target.protect`: {m}")))?,
                );
            }
            if protect.is_empty() {
                protect = default_protect(&upstream);
            }
            let local_tls = match t.local_tls {
                Some(l) => {
                    let span = l.span();
                    l.into_inner()
                        .resolve(&upstream.host)
                        .map_err(|m| err(Some(span), format!("key `target.local_tls`: {m}")))?
                }
                None => None,
            };
            let identity = crate::idp::config::TargetIdentity::resolve(t.identity, t.role)
                .map_err(|m| err(Some(span.clone()), format!("target {:?}: {m}", t.name)))?;
            let pool = match t.pool {
                Some(p) => {
                    let span = p.span();
                    let p = p.into_inner();
                    let duration = |v: Option<Spanned<String>>, key: &str, default: Duration| {
                        v.map_or(Ok(default), |s| {
                            parse_duration(s.get_ref()).map_err(|m| {
                                err(Some(s.span()), format!("key `target.pool.{key}`: {m}"))
                            })
                        })
                    };
                    let d = PoolConfig::default();
                    let pool = PoolConfig {
                        enabled: p.enabled.unwrap_or(d.enabled),
                        min_idle: p.min_idle.unwrap_or(d.min_idle),
                        max_idle_per_key: p.max_idle_per_key.unwrap_or(d.max_idle_per_key),
                        idle_timeout: duration(p.idle_timeout, "idle_timeout", d.idle_timeout)?,
                        max_lifetime: duration(p.max_lifetime, "max_lifetime", d.max_lifetime)?,
                        health_check_after: duration(
                            p.health_check_after,
                            "health_check_after",
                            d.health_check_after,
                        )?,
                    };
                    if pool.min_idle > pool.max_idle_per_key {
                        return Err(err(
                            Some(span),
                            format!(
                                "key `target.pool.min_idle`: {} is more than max_idle_per_key ({})",
                                pool.min_idle, pool.max_idle_per_key
                            ),
                        ));
                    }
                    pool
                }
                None => PoolConfig::default(),
            };
            let max_upstream_connections = match t.max_upstream_connections {
                Some(m) if *m.get_ref() == 0 => {
                    return Err(err(
                        Some(m.span()),
                        "key `target.max_upstream_connections`: must be at least 1 \
                         (leave it out for no cap)"
                            .into(),
                    ));
                }
                m => m.map(Spanned::into_inner),
            };
            let upstream_queue_timeout = match t.upstream_queue_timeout {
                Some(s) => parse_duration(s.get_ref()).map_err(|m| {
                    err(
                        Some(s.span()),
                        format!("key `target.upstream_queue_timeout`: {m}"),
                    )
                })?,
                None => DEFAULT_UPSTREAM_QUEUE_TIMEOUT,
            };
            targets.push(TargetConfig {
                name: t.name,
                protocol,
                upstream,
                password,
                connect_timeout,
                danger_password_over_unverified_channel: t
                    .danger_password_over_unverified_channel
                    .unwrap_or(false),
                protect,
                identity,
                local_tls,
                pool,
                max_upstream_connections,
                upstream_queue_timeout,
            });
        }
        crate::idp::config::check_agents(&file.agent).map_err(|m| err(None, m))?;
        let mut listeners = Vec::new();
        for l in file.listener {
            if !targets.iter().any(|t| t.name == *l.target.get_ref()) {
                return Err(err(
                    Some(l.target.span()),
                    format!(
                        "key `listener.target`: no [[target]] is named {:?}",
                        l.target.get_ref()
                    ),
                ));
            }
            listeners.push(Listener {
                listen: l.listen,
                target: l.target.into_inner(),
            });
        }
        Ok(Config {
            origin: origin.to_owned(),
            admin_socket: g
                .admin_socket
                .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()),
            admin_group: g.admin_group.unwrap_or_else(|| "portcullis".into()),
            state_dir: g.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            policy: g.policy.unwrap_or_else(|| "default".into()),
            log_format: g.log_format.unwrap_or_default(),
            workers: g.workers.unwrap_or_else(default_workers).max(1),
            drain_timeout,
            max_message_bytes: g.max_message_bytes.unwrap_or(64 << 20),
            approval_retention,
            startup_timeout,
            idle_timeout,
            listeners,
            targets,
            redirect: file.redirect.unwrap_or_default(),
            metrics: file.metrics,
            recording: file.recording,
            agents: file.agent,
        })
    }

    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like \"30s\" or \"5m\": {e}"))
}

/// The dotted key whose value sits at `offset`: the `key = value` on that line, under the nearest
/// `[table]` or `[[array]]` header above it.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=')?.0.trim().trim_matches('"');
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|h| h.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Parses `postgres://USER@HOST:PORT/DB?sslmode=..&sslrootcert=..`. A password in the URL is
/// refused: it belongs in a password file or variable, where it is not shown by `ps`.
pub fn parse_upstream(url: &str) -> Result<Upstream, String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| format!("{url:?} is not a postgres:// URL"))?;
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, database) = main.split_once('/').unwrap_or((main, ""));
    let (user, hostport) = authority
        .rsplit_once('@')
        .ok_or_else(|| "the URL needs a user: postgres://USER@HOST:PORT/DB".to_string())?;
    if user.contains(':') {
        return Err(
            "the URL holds a password; put it in password_file or password_env instead".into(),
        );
    }
    if user.is_empty() {
        return Err("the URL needs a user: postgres://USER@HOST:PORT/DB".into());
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        (h.to_owned(), after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (hostport.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err("the URL needs a host".into());
    }
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("port {p:?} is not a number"))?,
        None => 5432,
    };
    let mut sslmode = None;
    let mut sslrootcert = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => {
                sslmode = Some(match v {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    _ => {
                        return Err(format!(
                            "sslmode {v:?}: expected disable, prefer, require, verify-ca or verify-full"
                        ));
                    }
                })
            }
            "sslrootcert" => sslrootcert = (v != "system").then(|| PathBuf::from(v)),
            _ => {
                return Err(format!(
                    "unknown URL parameter {k:?} (known: sslmode, sslrootcert)"
                ));
            }
        }
    }
    // libpq's `prefer` falls back to plaintext for anyone who answers 'N'; that is only safe
    // where no one else is on the path. A remote host must prove who it is by default.
    let sslmode = sslmode.unwrap_or(if is_loopback_host(&host) {
        SslMode::Prefer
    } else {
        SslMode::VerifyFull
    });
    let database = if database.is_empty() {
        user.to_owned()
    } else {
        database.to_owned()
    };
    Ok(Upstream {
        host,
        port,
        user: user.to_owned(),
        database,
        sslmode,
        sslrootcert,
    })
}

/// `localhost` or a loopback IP literal: the only hosts whose path no one else is on.
fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// The upstream's own address, when it is one a connect() can name: an IP literal, or
/// `localhost` (both loopback families).
fn default_protect(up: &Upstream) -> Vec<crate::redirect::ProtectedTarget> {
    use crate::redirect::ProtectedTarget;
    if let Ok(ip) = up.host.parse::<std::net::IpAddr>() {
        return vec![ProtectedTarget::host(SocketAddr::new(ip, up.port))];
    }
    if up.host == "localhost" {
        return vec![
            ProtectedTarget::host(SocketAddr::new(
                std::net::Ipv4Addr::LOCALHOST.into(),
                up.port,
            )),
            ProtectedTarget::host(SocketAddr::new(
                std::net::Ipv6Addr::LOCALHOST.into(),
                up.port,
            )),
        ];
    }
    Vec::new()
}

/// `"10.0.0.5:5432"`, `"10.0.0.0/24:5432"`, `"[::1]:5432"`, `"[fd00::/64]:5432"`.
pub fn parse_protect(s: &str) -> Result<crate::redirect::ProtectedTarget, String> {
    let bad =
        || format!("{s:?} is not ADDR[/PREFIX]:PORT, e.g. \"10.0.0.0/24:5432\" or \"[::1]:5432\"");
    let (net, port) = if let Some(rest) = s.strip_prefix('[') {
        let (net, port) = rest.split_once("]:").ok_or_else(bad)?;
        (net, port)
    } else {
        s.rsplit_once(':').ok_or_else(bad)?
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    let (addr, prefix) = match net.split_once('/') {
        Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
        None => (net, None),
    };
    let net: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    let prefix_len = prefix.unwrap_or(max);
    if prefix_len > max {
        return Err(format!(
            "{s:?}: prefix /{prefix_len} is longer than the address"
        ));
    }
    Ok(crate::redirect::ProtectedTarget {
        net,
        prefix_len,
        port,
    })
}

/// Reads a config file for `policy check`-style validation without starting anything.
pub fn check_file(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    Ok(Config::parse(&text, &path.display().to_string())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let c = Config::parse(EMBEDDED_DEFAULT, "embedded default").unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.policy, "default");
        assert_eq!(c.targets[0].upstream.sslmode, SslMode::Prefer);
        assert!(!c.targets[0].danger_password_over_unverified_channel);
        // Agents' drivers with any sslmode connect; plaintext ones too.
        let local_tls = c.targets[0].local_tls.as_ref().unwrap();
        assert_eq!(
            local_tls.mode,
            crate::forward::local_tls::LocalTlsMode::LocalCa
        );
        assert!(!local_tls.require_tls);
        // Pointed at a remote host, the same default verifies the server.
        let remote = EMBEDDED_DEFAULT.replace("@127.0.0.1:", "@10.20.30.40:");
        let c = Config::parse(&remote, "embedded default, remote").unwrap();
        assert_eq!(c.targets[0].upstream.sslmode, SslMode::VerifyFull);
    }

    #[test]
    fn local_tls_errors_name_their_line() {
        let target = "[[target]]\nname = \"a\"\nupstream = \"postgres://u@db.example.com/d\"\n";
        let c = Config::parse(
            &format!("{target}[target.local_tls]\nmode = \"local-ca\"\nrequire_tls = true\n"),
            "f.toml",
        )
        .unwrap();
        let l = c.targets[0].local_tls.as_ref().unwrap();
        assert!(l.require_tls);
        assert_eq!(l.hosts, ["localhost", "db.example.com"]);
        let e = Config::parse(
            &format!("{target}[target.local_tls]\nmode = \"files\"\n"),
            "f.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(
            e.message.contains("target.local_tls") && e.message.contains("cert_file"),
            "{e}"
        );
        let e = Config::parse(
            &format!("{target}[target.local_tls]\nmode = \"local-ca\"\nrequire = true\n"),
            "f.toml",
        )
        .unwrap_err();
        assert!(e.message.contains("require"), "{e}");
        assert_eq!(
            Config::parse(target, "f.toml").unwrap().targets[0].local_tls,
            None
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "[gateway]\nstate_dir = \"/tmp/x\"\n\n[[listener]]\nlistne = \"127.0.0.1:1\"\n";
        let e = Config::parse(text, "/etc/portcullis/bad.toml").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("/etc/portcullis/bad.toml:5:"), "{s}");
        assert!(s.contains("listne"), "{s}");
    }

    #[test]
    fn wrong_type_names_the_dotted_key() {
        let text = "[gateway]\nworkers = 2\n\n[[listener]]\nlisten = 6432\ntarget = \"a\"\n";
        let e = Config::parse(text, "f.toml").unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("`listener.listen`"), "{e}");
    }

    #[test]
    fn listener_to_unknown_target_is_refused_at_its_line() {
        let text = "[[target]]\nname = \"a\"\nupstream = \"postgres://u@h/d\"\n[[listener]]\nlisten = \"127.0.0.1:1\"\ntarget = \"b\"\n";
        let e = Config::parse(text, "f.toml").unwrap_err();
        assert_eq!((e.line, e.column), (6, 10), "{e}");
        assert!(e.message.contains("listener.target"));
    }

    #[test]
    fn pool_defaults_on_and_its_errors_name_their_line() {
        let target = "[[target]]\nname = \"a\"\nupstream = \"postgres://u@h/d\"\n";
        let c = Config::parse(target, "f.toml").unwrap();
        assert_eq!(c.targets[0].pool, PoolConfig::default());
        assert!(c.targets[0].pool.enabled);
        let c = Config::parse(
            &format!("{target}[target.pool]\nenabled = false\nidle_timeout = \"10s\"\n"),
            "f.toml",
        )
        .unwrap();
        assert!(!c.targets[0].pool.enabled);
        assert_eq!(c.targets[0].pool.idle_timeout, Duration::from_secs(10));
        let e = Config::parse(
            &format!("{target}[target.pool]\nmax_lifetime = \"forever\"\n"),
            "f.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("`target.pool.max_lifetime`"), "{e}");
        let e =
            Config::parse(&format!("{target}[target.pool]\nmin_idel = 1\n"), "f.toml").unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("min_idel"), "{e}");
        let e = Config::parse(
            &format!("{target}[target.pool]\nmin_idle = 9\nmax_idle_per_key = 2\n"),
            "f.toml",
        )
        .unwrap_err();
        assert!(e.message.contains("`target.pool.min_idle`"), "{e}");
    }

    #[test]
    fn the_upstream_cap_is_off_by_default_and_its_errors_name_their_line() {
        let target = "[[target]]\nname = \"a\"\nupstream = \"postgres://u@h/d\"\n";
        let c = Config::parse(target, "f.toml").unwrap();
        assert_eq!(c.targets[0].max_upstream_connections, None);
        assert_eq!(c.targets[0].upstream_queue_timeout, Duration::from_secs(10));
        let c = Config::parse(
            &format!("{target}max_upstream_connections = 20\nupstream_queue_timeout = \"2s\"\n"),
            "f.toml",
        )
        .unwrap();
        assert_eq!(c.targets[0].max_upstream_connections, Some(20));
        assert_eq!(c.targets[0].upstream_queue_timeout, Duration::from_secs(2));
        let e = Config::parse(&format!("{target}max_upstream_connections = 0\n"), "f.toml")
            .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(
            e.message.contains("`target.max_upstream_connections`"),
            "{e}"
        );
        let e = Config::parse(
            &format!("{target}upstream_queue_timeout = \"soon\"\n"),
            "f.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("`target.upstream_queue_timeout`"), "{e}");
    }

    #[test]
    fn target_protocol_defaults_to_postgres_and_unknown_ones_name_their_line() {
        let target = "[[target]]\nname = \"a\"\nupstream = \"postgres://u@h/d\"\n";
        let c = Config::parse(target, "f.toml").unwrap();
        assert_eq!(c.targets[0].protocol, crate::protocol::Protocol::Postgres);
        let c = Config::parse(&format!("{target}protocol = \"postgres\"\n"), "f.toml").unwrap();
        assert_eq!(c.targets[0].protocol, crate::protocol::Protocol::Postgres);
        let e = Config::parse(&format!("{target}protocol = \"mysql\"\n"), "f.toml").unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("`target.protocol`"), "{e}");
        assert!(e.message.contains("mysql"), "{e}");
    }

    #[test]
    fn upstream_urls() {
        let u = parse_upstream(
            "postgres://app@127.0.0.1:5433/app?sslmode=verify-full&sslrootcert=/ca.pem",
        )
        .unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.user.as_str(),
                u.database.as_str()
            ),
            ("127.0.0.1", 5433, "app", "app")
        );
        assert_eq!(u.sslmode, SslMode::VerifyFull);
        assert_eq!(u.sslrootcert, Some(PathBuf::from("/ca.pem")));
        let u = parse_upstream("postgresql://me@[::1]/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.database.as_str()),
            ("::1", 5432, "me")
        );
        let e = parse_upstream("postgres://me:hunter2@h/d").unwrap_err();
        assert!(!e.contains("hunter2"));
        assert!(parse_upstream("postgres://me@h/d?sslmode=bogus").is_err());
        // Without sslmode: plaintext fallback only where no one else is on the path.
        for (url, mode) in [
            ("postgres://me@127.0.0.1/d", SslMode::Prefer),
            ("postgres://me@[::1]/d", SslMode::Prefer),
            ("postgres://me@localhost/d", SslMode::Prefer),
            ("postgres://me@10.0.0.5/d", SslMode::VerifyFull),
            ("postgres://me@db.example.com/d", SslMode::VerifyFull),
        ] {
            assert_eq!(parse_upstream(url).unwrap().sslmode, mode, "{url}");
        }
        assert!(parse_upstream("mysql://me@h/d").is_err());
    }
}
