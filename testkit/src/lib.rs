//! Throwaway servers for Portcullis tests and benchmarks: a real PostgreSQL in a temp dir on a free
//! port, and the real `portcullis` binary in front of it. Everything is torn down on drop.
//!
//! Integration tests start a [`Harness`] and connect to [`Harness::endpoint`]: through a started
//! gateway as user `agent` with no password (the gateway injects the credential), or, with
//! `PORTCULLIS_TEST_DIRECT=1`, straight to PostgreSQL as `app` with the real password. Running the
//! suite direct proves each test correct without the gateway; gateway-only tests call
//! [`skip_in_direct`]. [`wire::RawConn`] speaks the protocol byte by byte for what drivers never
//! send, and [`tls::TestCa`] makes certificates at test time.
//!
//! Environment: `PORTCULLIS_BIN` (the binary under test; default next to the test executable),
//! `PORTCULLIS_TEST_LOG` (the gateway's `RUST_LOG`, default `info`), `PORTCULLIS_TEST_ECHO` (echo
//! the gateway's output to stderr live), `PG_BINDIR` (PostgreSQL server binaries).

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::Rng;
use rand::distributions::Alphanumeric;

mod endpoint;
pub mod idp;
pub mod systemd;
pub mod tls;
pub mod wire;

pub use endpoint::{
    CONNECT_TIMEOUT, ConnectError, Endpoint, Harness, HarnessBuilder, Mode, PsqlOutput, copy_in,
    copy_in_abandoned, skip_in_direct, write_secret,
};

/// True when running as root: tests that need the kernel (eBPF, cgroups) check this.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints a loud skip line and returns true when the caller is not root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIPPED {test}: needs root (eBPF programs and cgroups); CI runs as root");
    true
}

/// A TCP port nobody listens on right now, on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

pub fn random_password() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// Where the PostgreSQL 15 server binaries live.
pub fn pg_bindir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    for v in ["15", "16", "17"] {
        let p = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"));
        if p.join("initdb").exists() {
            return Ok(p);
        }
    }
    bail!(
        "no PostgreSQL server binaries found under /usr/lib/postgresql/*/bin (apt-get install postgresql-15, or set PG_BINDIR)"
    )
}

/// How PostgreSQL authenticates TCP clients (pg_hba.conf method).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HbaAuth {
    Scram,
    Md5,
    Password,
    Trust,
}

impl HbaAuth {
    fn method(self) -> &'static str {
        match self {
            HbaAuth::Scram => "scram-sha-256",
            HbaAuth::Md5 => "md5",
            HbaAuth::Password => "password",
            HbaAuth::Trust => "trust",
        }
    }
}

/// A PEM certificate and key for the server's TLS, with the CA that signed it.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// When set, only `hostssl` lines are written, so plaintext connections are refused.
    pub require: bool,
}

#[derive(Clone, Debug)]
pub struct PostgresBuilder {
    auth: HbaAuth,
    tls: Option<ServerTls>,
    listen_ipv6: bool,
    max_connections: u32,
    extra_conf: Vec<String>,
}

impl Default for PostgresBuilder {
    fn default() -> Self {
        Self {
            auth: HbaAuth::Scram,
            tls: None,
            listen_ipv6: true,
            max_connections: 300,
            extra_conf: Vec::new(),
        }
    }
}

impl PostgresBuilder {
    pub fn auth(mut self, auth: HbaAuth) -> Self {
        self.auth = auth;
        self
    }
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }
    pub fn listen_ipv6(mut self, on: bool) -> Self {
        self.listen_ipv6 = on;
        self
    }
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }
    /// A raw `postgresql.conf` line, e.g. `shared_buffers = '256MB'`.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.extra_conf.push(line.into());
        self
    }

    pub fn start(self) -> Result<Postgres> {
        Postgres::start_with(self)
    }
}

/// A running throwaway PostgreSQL. Role `app` (password in `password`) owns database `app`;
/// the superuser `postgres` connects over the Unix socket in `socket_dir` without a password.
pub struct Postgres {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
    pub socket_dir: PathBuf,
    bindir: PathBuf,
    data: PathBuf,
    _root: tempfile::TempDir,
    run_as: Option<(u32, u32)>,
}

impl Postgres {
    pub fn builder() -> PostgresBuilder {
        PostgresBuilder::default()
    }

    /// SCRAM-SHA-256 over TCP on 127.0.0.1 (and ::1), no TLS.
    pub fn start() -> Result<Postgres> {
        Self::builder().start()
    }

    fn start_with(b: PostgresBuilder) -> Result<Postgres> {
        let bindir = pg_bindir()?;
        let root = tempfile::Builder::new()
            .prefix("portcullis-pg-")
            .tempdir()?;
        let data = root.path().join("data");
        let socket_dir = root.path().join("sock");
        fs::create_dir_all(&socket_dir)?;
        // initdb refuses to run as root, so as root the cluster belongs to the `postgres` user.
        let run_as = if is_root() {
            Some(postgres_ids()?)
        } else {
            None
        };
        if let Some((uid, gid)) = run_as {
            for p in [root.path(), socket_dir.as_path()] {
                chown(p, Some(uid), Some(gid))?;
            }
            fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))?;
        }
        let password = random_password();
        let pwfile = root.path().join("superpw");
        fs::write(&pwfile, "unused\n")?;
        if let Some((uid, gid)) = run_as {
            chown(&pwfile, Some(uid), Some(gid))?;
        }
        let out = run_cmd(
            Command::new(bindir.join("initdb"))
                .args(["-D"])
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=reject",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    // A throwaway cluster: skip the fsync of every file, which dominates initdb time.
                    "--no-sync",
                ])
                .arg(format!("--pwfile={}", pwfile.display())),
            run_as,
        )?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = free_port();
        let listen = if b.listen_ipv6 && ipv6_loopback_available() {
            "127.0.0.1,::1"
        } else {
            "127.0.0.1"
        };
        let mut conf = format!(
            "listen_addresses = '{listen}'\nport = {port}\nunix_socket_directories = '{}'\n\
             max_connections = {}\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = '128MB'\nlog_min_messages = warning\npassword_encryption = 'scram-sha-256'\n",
            socket_dir.display(),
            b.max_connections
        );
        if let Some(tls) = &b.tls {
            let cert = data.join("server.crt");
            let key = data.join("server.key");
            fs::write(&cert, &tls.cert_pem)?;
            fs::write(&key, &tls.key_pem)?;
            fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = run_as {
                chown(&cert, Some(uid), Some(gid))?;
                chown(&key, Some(uid), Some(gid))?;
            }
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        for line in &b.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        append(&data.join("postgresql.conf"), &conf)?;
        let host_kind = match &b.tls {
            Some(t) if t.require => "hostssl",
            _ => "host",
        };
        let m = b.auth.method();
        let hba = format!(
            "local all all trust\n{host_kind} all postgres 0.0.0.0/0 reject\n{host_kind} all all 127.0.0.0/8 {m}\n\
             {host_kind} all all ::1/128 {m}\n"
        );
        fs::write(data.join("pg_hba.conf"), hba)?;

        let log = root.path().join("postgres.log");
        let out = run_cmd(
            Command::new(bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start"]),
            run_as,
        )?;
        if !out.status.success() {
            let l = fs::read_to_string(&log).unwrap_or_default();
            bail!(
                "pg_ctl start failed: {}\n{l}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let pg = Postgres {
            host: "127.0.0.1".into(),
            port,
            user: "app".into(),
            password,
            database: "app".into(),
            socket_dir,
            bindir,
            data,
            _root: root,
            run_as,
        };
        let enc = if b.auth == HbaAuth::Md5 {
            "md5"
        } else {
            "scram-sha-256"
        };
        // psql -c runs a multi-statement string in one transaction, which CREATE DATABASE refuses.
        // The error must not echo the statement: it holds the password.
        pg.superuser_sql(&format!(
            "SET password_encryption = '{enc}'; CREATE ROLE app LOGIN PASSWORD '{}'",
            pg.password
        ))
        .map_err(|e| {
            anyhow::anyhow!(
                "creating role app: {}",
                redact(&e.to_string(), &pg.password)
            )
        })?;
        pg.superuser_sql("CREATE DATABASE app OWNER app")?;
        Ok(pg)
    }

    /// `postgres://app@127.0.0.1:PORT/app` (no password: callers pass it separately).
    pub fn url(&self) -> String {
        format!(
            "postgres://{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }

    pub fn addr(&self) -> SocketAddr {
        format!("{}:{}", self.host, self.port)
            .parse()
            .expect("valid address")
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Stops the server (fast shutdown: sessions are terminated), keeping its data.
    pub fn stop(&self) -> Result<()> {
        self.pg_ctl(&["-m", "fast", "-w", "stop"])
    }

    /// Starts the server again after [`Postgres::stop`], on the same port.
    pub fn start_again(&self) -> Result<()> {
        let log = self
            .data
            .parent()
            .expect("data dir parent")
            .join("postgres.log");
        self.pg_ctl(&[
            "-l",
            log.to_str().expect("utf8 path"),
            "-w",
            "-t",
            "60",
            "start",
        ])
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let out = run_cmd(
            Command::new(self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(args),
            self.run_as,
        )?;
        if !out.status.success() {
            bail!(
                "pg_ctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs SQL as the superuser over the Unix socket, failing on any error.
    pub fn superuser_sql(&self, sql: &str) -> Result<String> {
        let out = Command::new(self.bindir.join("psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "superuser SQL failed: {sql}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs SQL as the superuser in the `app` database.
    pub fn app_superuser_sql(&self, sql: &str) -> Result<String> {
        let out = Command::new(self.bindir.join("psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "app",
                "-c",
                sql,
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "superuser SQL failed: {sql}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until some other backend is running a statement containing `needle` (state active),
    /// returning its pid. Bounded by `limit` so a test never hangs here.
    pub fn wait_active(&self, needle: &str, limit: Duration) -> Result<u32> {
        let deadline = Instant::now() + limit;
        let sql = format!(
            "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() \
             AND position('{}' in query) > 0 LIMIT 1",
            needle.replace('\'', "''")
        );
        loop {
            let out = self.superuser_sql(&sql)?;
            if let Ok(pid) = out.trim().parse() {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!("no active backend ran {needle:?} within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes the `app` password to a 0600 file, as `portcullis serve --password-file` wants it.
    pub fn write_password_file(&self, dir: &Path) -> Result<PathBuf> {
        let p = dir.join("upstream.password");
        fs::write(&p, format!("{}\n", self.password))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600))?;
        Ok(p)
    }

    /// A psql (or pgbench, …) command from the same PostgreSQL install.
    pub fn client(&self, program: &str) -> Command {
        Command::new(self.bindir.join(program))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = run_cmd(
            Command::new(self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"]),
            self.run_as,
        );
    }
}

/// `text` with every occurrence of `secret` replaced, for error messages.
pub fn redact(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        return text.to_string();
    }
    text.replace(secret, "<redacted>")
}

fn postgres_ids() -> Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    bail!(
        "running as root, but there is no `postgres` user to own the test cluster (apt-get install postgresql-15 creates it)"
    )
}

fn run_cmd(cmd: &mut Command, run_as: Option<(u32, u32)>) -> Result<Output> {
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd.stdin(Stdio::null());
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

pub fn ipv6_loopback_available() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// Path to the `portcullis` binary: `PORTCULLIS_BIN`, else next to the running test executable's
/// target directory (`target/<profile>/portcullis`).
pub fn portcullis_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PORTCULLIS_BIN") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_portcullis") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("portcullis")
}

/// A running `portcullis serve` process. Its stdout and stderr are captured into `log()`.
pub struct Gateway {
    child: Option<Child>,
    pub listen: SocketAddr,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    /// The config file, in config-file mode (rewrite it and send SIGHUP to reload).
    pub config_path: Option<PathBuf>,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// What to start the gateway with. `args` are passed after `serve` verbatim, after the ones the
/// harness adds (`--listen`, `--admin-socket`, `--state-dir`).
pub struct GatewayOptions {
    pub target: Option<(String, PathBuf)>,
    pub args: Vec<String>,
    /// Environment for the gateway process; overrides the harness's `RUST_LOG`.
    pub env: Vec<(String, String)>,
    pub listen: Option<SocketAddr>,
    /// Config-file mode: the TOML that follows the `[gateway]` section (listeners and targets).
    /// The harness writes `[gateway]` with its own admin socket and state dir, then this text, to
    /// `portcullis.toml` and runs `portcullis serve --config FILE` with no other flags but `args`.
    pub config: Option<String>,
}

impl GatewayOptions {
    /// The quick-start form: one target given as flags.
    pub fn for_target(pg: &Postgres, password_file: PathBuf) -> Self {
        Self {
            target: Some((pg.url(), password_file)),
            args: Vec::new(),
            env: Vec::new(),
            listen: None,
            config: None,
        }
    }

    /// Config-file mode; `body` holds `[[listener]]` and `[[target]]` tables
    /// (see [`single_target_toml`]). `listen` is the address the harness waits on.
    pub fn with_config(listen: SocketAddr, body: impl Into<String>) -> Self {
        Self {
            target: None,
            args: Vec::new(),
            env: Vec::new(),
            listen: Some(listen),
            config: Some(body.into()),
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// `[[listener]]` + `[[target]]` TOML for one listener in front of one upstream.
/// A policy that allows everything and masks nothing: the proxy alone.
pub const ALLOW_ALL_POLICY: &str = "name = \"allow-all\"\nmode = \"enforce\"\nunparsable = \"allow\"\n\
default_action = \"allow\"\nfunction_call = \"allow\"\n";

pub fn single_target_toml(listen: SocketAddr, upstream_url: &str, password_file: &Path) -> String {
    format!(
        "[[listener]]\nlisten = \"{listen}\"\ntarget = \"main\"\n\n[[target]]\nname = \"main\"\n\
         upstream = \"{upstream_url}\"\npassword_file = \"{}\"\n",
        password_file.display()
    )
}

impl Gateway {
    pub fn start(opts: GatewayOptions) -> Result<Gateway> {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-gw-")
            .tempdir()?;
        let listen = opts
            .listen
            .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
        let admin_socket = dir.path().join("admin.sock");
        let state_dir = dir.path().join("state");
        fs::create_dir_all(&state_dir)?;
        let mut cmd = Command::new(portcullis_bin());
        cmd.arg("serve");
        let config_path = match &opts.config {
            Some(body) => {
                let path = dir.path().join("portcullis.toml");
                let text = format!(
                    "[gateway]\nadmin_socket = \"{}\"\nstate_dir = \"{}\"\n\n{body}",
                    admin_socket.display(),
                    state_dir.display()
                );
                fs::write(&path, text)?;
                cmd.arg("--config").arg(&path);
                Some(path)
            }
            None => {
                cmd.arg("--listen").arg(listen.to_string());
                cmd.arg("--admin-socket")
                    .arg(&admin_socket)
                    .arg("--state-dir")
                    .arg(&state_dir);
                None
            }
        };
        if let Some((url, pw)) = &opts.target {
            cmd.arg("--target").arg(url).arg("--password-file").arg(pw);
        }
        cmd.args(&opts.args);
        // Protocol tests exercise the proxy, not the rules: unless a test picks a policy, the
        // gateway runs one that allows every statement and masks nothing, so test data and
        // clients that never describe their statements pass as they would directly. Policy and
        // masking have their own end-to-end tests.
        if !opts.args.iter().any(|a| a == "--policy") {
            let policy = dir.path().join("allow-all.toml");
            fs::write(&policy, ALLOW_ALL_POLICY)?;
            cmd.arg("--policy").arg(&policy);
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("PORTCULLIS_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", portcullis_bin().display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("PORTCULLIS_TEST_ECHO").is_some() {
                        eprintln!("[gateway] {line}");
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let mut gw = Gateway {
            child: Some(child),
            listen,
            admin_socket,
            state_dir,
            config_path,
            log,
            _dir: dir,
        };
        gw.wait_ready(Duration::from_secs(30))?;
        Ok(gw)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect_timeout(&self.listen, Duration::from_millis(200))
                .is_ok()
                && self.admin_socket.exists()
            {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                std::thread::sleep(Duration::from_millis(100));
                bail!("gateway exited early with {status}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "gateway did not start listening on {} within {timeout:?}:\n{}",
                    self.listen,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the gateway printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether `needle` reaches what the gateway printed within `timeout`. Its output comes
    /// through a pipe and a reader thread, so a line can land after the effect a test saw.
    pub fn log_shows(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `lines` lines the gateway printed, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Runs `portcullis ARGS --admin-socket SOCK` (a CLI command against this gateway).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(portcullis_bin())
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()?)
    }

    /// Waits until `sessions --json` lists no session that `matches`. A session that ended
    /// stays listed, as closing, while its upstream connection is reset for the pool. After
    /// `timeout`, the last list (or the CLI's error) as the error.
    pub fn wait_sessions_gone(
        &self,
        matches: impl Fn(&serde_json::Value) -> bool,
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.cli(&["sessions", "--json"]) {
                Ok(out) if out.status.success() => {
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    match serde_json::from_str::<Vec<serde_json::Value>>(&text) {
                        Ok(live) if !live.iter().any(&matches) => return Ok(()),
                        _ => text,
                    }
                }
                Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(last);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A libpq connection string through the gateway (any user: the gateway injects its own).
    pub fn conninfo(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user=agent dbname={dbname} sslmode=disable",
            self.listen.ip(),
            self.listen.port()
        )
    }

    /// Sends SIGTERM and waits for exit, returning the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("gateway already stopped")?;
        signal(child.id(), 15);
        Ok(child.wait()?)
    }

    /// Sends SIGTERM and waits up to `limit` for the exit status; `None` if still running then
    /// (the process is killed on drop).
    pub fn terminate_within(
        &mut self,
        limit: Duration,
    ) -> Result<Option<std::process::ExitStatus>> {
        let child = self.child.as_mut().context("gateway already stopped")?;
        signal(child.id(), 15);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(None)
    }

    /// The exit status if the gateway process has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("gateway already stopped"),
        }
    }

    /// Sends a signal (e.g. 1 for SIGHUP) to the gateway.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            signal(c.id(), sig);
        }
    }
}

fn signal(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs psql with a connection string and SQL, returning (stdout, stderr, success).
pub fn psql(bindir: &Path, conninfo: &str, sql: &str) -> Result<(String, String, bool)> {
    let out = Command::new(bindir.join("psql"))
        .args([
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    ))
}

/// Raises this process's open-file soft limit towards `want` (up to the hard limit, or beyond it
/// as root may) and returns the soft limit in force.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a plain struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur >= want {
            return lim.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return want;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

/// Resident set size of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The peak resident set size of a process, against the size when watching started: proves a
/// process streams rather than buffers.
#[derive(Debug)]
pub struct RssWatch {
    pid: u32,
    pub baseline_kib: u64,
    pub peak_kib: u64,
    pub samples: usize,
}

impl RssWatch {
    pub fn new(pid: u32) -> Option<RssWatch> {
        let baseline_kib = rss_kib(pid)?;
        Some(RssWatch {
            pid,
            baseline_kib,
            peak_kib: baseline_kib,
            samples: 1,
        })
    }

    pub fn sample(&mut self) {
        if let Some(kib) = rss_kib(self.pid) {
            self.peak_kib = self.peak_kib.max(kib);
            self.samples += 1;
        }
    }

    pub fn growth_kib(&self) -> u64 {
        self.peak_kib.saturating_sub(self.baseline_kib)
    }
}

/// Runs `cmd` to completion, or kills it after `limit` and returns `None` (for commands that
/// must exit, like `portcullis serve` with a bad config).
pub fn output_within(cmd: &mut Command, limit: Duration) -> Result<Option<Output>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(Some(child.wait_with_output()?));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(None)
}
