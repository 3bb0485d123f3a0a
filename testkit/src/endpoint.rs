//! Where an integration test connects: straight to the throwaway PostgreSQL, or through a started
//! gateway in front of it. `PORTCULLIS_TEST_DIRECT=1` runs the whole suite direct, which proves
//! each test is correct (and able to fail) independently of the gateway.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use crate::{Gateway, GatewayOptions, Postgres, PostgresBuilder};

/// How long any test client waits for a connection before calling it a hang.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Clients talk to PostgreSQL itself, with the real password (validates the tests).
    Direct,
    /// Clients talk to a `portcullis serve` in front of PostgreSQL, as user `agent` with no
    /// password: the gateway injects the upstream credential.
    Gateway,
}

impl Mode {
    /// `PORTCULLIS_TEST_DIRECT=1` (or any value but `0`/empty) selects [`Mode::Direct`].
    pub fn from_env() -> Mode {
        match std::env::var("PORTCULLIS_TEST_DIRECT") {
            Ok(v) if !v.is_empty() && v != "0" => Mode::Direct,
            _ => Mode::Gateway,
        }
    }
}

/// Prints a loud skip line and returns true in direct mode, for tests that only make sense
/// through the gateway (its memory, its log, its CLI).
pub fn skip_in_direct(test: &str, reason: &str) -> bool {
    if Mode::from_env() == Mode::Direct {
        eprintln!("SKIPPED {test} in direct mode: {reason}");
        return true;
    }
    false
}

/// One PostgreSQL server address as a client sees it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    /// Further libpq parameters (`sslmode`, `sslrootcert`, …) for psql and pgbench.
    pub params: Vec<(String, String)>,
}

impl Endpoint {
    /// A libpq keyword/value connection string (includes the password, if any: never log it).
    pub fn conninfo(&self) -> String {
        let mut parts = vec![
            kv("host", &self.host),
            kv("port", &self.port.to_string()),
            kv("user", &self.user),
            kv("dbname", &self.dbname),
            kv("connect_timeout", &CONNECT_TIMEOUT.as_secs().to_string()),
        ];
        if let Some(p) = &self.password {
            parts.push(kv("password", p));
        }
        for (k, v) in &self.params {
            parts.push(kv(k, v));
        }
        parts.join(" ")
    }

    /// Points a libpq program (psql, pgbench) at this endpoint through PG* variables, so it needs
    /// no connection arguments. Ignores ~/.pgpass and any PG* variables of the caller.
    pub fn apply_env(&self, cmd: &mut Command) {
        for (k, _) in std::env::vars() {
            if k.starts_with("PG") {
                cmd.env_remove(k);
            }
        }
        cmd.env("PGHOST", &self.host)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", &self.user)
            .env("PGDATABASE", &self.dbname)
            .env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT.as_secs().to_string())
            // A path that does not exist: libpq silently skips it (it warns about /dev/null).
            .env("PGPASSFILE", "/nonexistent/portcullis-test-pgpass");
        if let Some(p) = &self.password {
            cmd.env("PGPASSWORD", p);
        }
        for (k, v) in &self.params {
            let var = match k.as_str() {
                "sslmode" => "PGSSLMODE",
                "sslrootcert" => "PGSSLROOTCERT",
                "gssencmode" => "PGGSSENCMODE",
                "channel_binding" => "PGCHANNELBINDING",
                "application_name" => "PGAPPNAME",
                other => panic!("Endpoint::apply_env: no PG* variable for {other}"),
            };
            cmd.env(var, v);
        }
    }

    /// `psql -X -At -v ON_ERROR_STOP=1 -c SQL` against this endpoint.
    pub fn psql(&self, bindir: &Path, sql: &str) -> Result<PsqlOutput> {
        self.psql_args(bindir, &["-c", sql])
    }

    /// psql with `-X -At -v ON_ERROR_STOP=1` and then `args`.
    pub fn psql_args(&self, bindir: &Path, args: &[&str]) -> Result<PsqlOutput> {
        let mut cmd = Command::new(bindir.join("psql"));
        cmd.args(["-X", "-At", "-v", "ON_ERROR_STOP=1"]).args(args);
        self.apply_env(&mut cmd);
        cmd.stdin(Stdio::null());
        let out = cmd.output().context("running psql")?;
        Ok(PsqlOutput {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            success: out.status.success(),
        })
    }

    /// A tokio-postgres configuration (plaintext: the client leg to the gateway is loopback).
    pub fn pg_config(&self) -> Config {
        let mut c = Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .ssl_mode(SslMode::Disable)
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(p) = &self.password {
            c.password(p.as_str());
        }
        c
    }

    /// Connects with tokio-postgres (the connection is driven by a spawned task). Fails rather
    /// than hangs: the whole handshake is bounded by [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> Result<Client> {
        let (client, conn) = self.connect_raw().await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Connects and forwards the connection's asynchronous messages (notices, notifications).
    pub async fn connect_with_messages(
        &self,
    ) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>)> {
        let (client, mut conn) = self.connect_raw().await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(m)) = futures_util::future::poll_fn(|cx| conn.poll_message(cx)).await
            {
                if tx.send(m).is_err() {
                    break;
                }
            }
        });
        Ok((client, rx))
    }

    /// tokio-postgres's own handshake error, unwrapped, so tests can inspect the SQLSTATE.
    pub async fn try_connect(&self) -> Result<Client, ConnectError> {
        match self.connect_raw_inner().await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(client)
            }
            Err(e) => Err(e),
        }
    }

    async fn connect_raw(
        &self,
    ) -> Result<(
        Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    )> {
        self.connect_raw_inner()
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {}:{}: {e}", self.host, self.port))
    }

    async fn connect_raw_inner(
        &self,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        ConnectError,
    > {
        // connect_timeout bounds only the TCP connect; this bounds authentication too.
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, self.pg_config().connect(NoTls)).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(ConnectError::Postgres(e)),
            Err(_) => Err(ConnectError::Hang(CONNECT_TIMEOUT * 2)),
        }
    }
}

/// Why a connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    Postgres(tokio_postgres::Error),
    /// No answer at all within the limit: the failure mode tests exist to rule out.
    Hang(Duration),
}

impl ConnectError {
    /// The server's ErrorResponse, if the failure was one.
    pub fn db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        match self {
            ConnectError::Postgres(e) => e.as_db_error(),
            ConnectError::Hang(_) => None,
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Postgres(e) => match e.as_db_error() {
                Some(db) => write!(
                    f,
                    "{} {}: {}",
                    db.severity(),
                    db.code().code(),
                    db.message()
                ),
                None => write!(f, "{e}"),
            },
            ConnectError::Hang(d) => write!(f, "no answer within {d:?} (hang)"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// What psql printed.
#[derive(Debug, Clone)]
pub struct PsqlOutput {
    pub stdout: String,
    pub stderr: String,
    pub success: bool,
}

fn kv(k: &str, v: &str) -> String {
    format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A PostgreSQL and, unless in direct mode, a gateway in front of it, plus the files they use.
pub struct Harness {
    pub pg: Postgres,
    pub gateway: Option<Gateway>,
    pub mode: Mode,
    /// Holds the password file and any certificates.
    pub dir: tempfile::TempDir,
    /// libpq parameters a direct client needs for the upstream leg (e.g. TLS settings).
    upstream_params: Vec<(String, String)>,
    /// The password a direct client uses (the real one, or the wrong one a test asked for).
    direct_password: String,
}

/// Options for [`Harness`].
pub struct HarnessBuilder {
    pg: PostgresBuilder,
    mode: Mode,
    upstream_params: Vec<(String, String)>,
    upstream_password: Option<String>,
    gateway_args: Vec<String>,
    gateway_env: Vec<(String, String)>,
    files: Vec<(String, Vec<u8>)>,
    target_toml: Option<String>,
}

impl HarnessBuilder {
    /// Runs the gateway from a config file whose one target carries these extra tables (e.g.
    /// `[target.pool]`), instead of the quick-start flags.
    pub fn target_toml(mut self, extra: &str) -> Self {
        self.target_toml = Some(extra.into());
        self
    }

    pub fn postgres(mut self, pg: PostgresBuilder) -> Self {
        self.pg = pg;
        self
    }

    /// Forces a mode regardless of `PORTCULLIS_TEST_DIRECT`.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// A libpq parameter for the upstream leg: appended to the gateway's `--target` URL query
    /// (e.g. `sslmode=verify-full`), and used by direct clients. A value starting with `@` names a
    /// file written with [`HarnessBuilder::file`] and is replaced by its path.
    pub fn upstream_param(mut self, key: &str, value: &str) -> Self {
        self.upstream_params.push((key.into(), value.into()));
        self
    }

    /// Use this upstream password instead of the real one (to test a wrong credential).
    pub fn upstream_password(mut self, password: &str) -> Self {
        self.upstream_password = Some(password.into());
        self
    }

    /// A file in the harness directory, e.g. a CA certificate.
    pub fn file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.into(), contents.into()));
        self
    }

    pub fn gateway_arg(mut self, arg: &str) -> Self {
        self.gateway_args.push(arg.into());
        self
    }

    pub fn gateway_env(mut self, key: &str, value: &str) -> Self {
        self.gateway_env.push((key.into(), value.into()));
        self
    }

    pub fn start(self) -> Result<Harness> {
        let pg = self.pg.start()?;
        let dir = tempfile::Builder::new()
            .prefix("portcullis-harness-")
            .tempdir()?;
        for (name, contents) in &self.files {
            fs::write(dir.path().join(name), contents)?;
        }
        let upstream_params: Vec<(String, String)> = self
            .upstream_params
            .iter()
            .map(|(k, v)| match v.strip_prefix('@') {
                Some(file) => (k.clone(), dir.path().join(file).display().to_string()),
                None => (k.clone(), v.clone()),
            })
            .collect();
        let password = self
            .upstream_password
            .clone()
            .unwrap_or_else(|| pg.password.clone());
        let gateway = match self.mode {
            Mode::Direct => None,
            Mode::Gateway => {
                let pwfile = write_secret(dir.path(), "upstream.password", &password)?;
                let mut url = pg.url();
                if !upstream_params.is_empty() {
                    let q: Vec<String> = upstream_params
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    url = format!("{url}?{}", q.join("&"));
                }
                let options = match &self.target_toml {
                    Some(extra) => {
                        let listen: std::net::SocketAddr =
                            format!("127.0.0.1:{}", crate::free_port()).parse()?;
                        let body = format!(
                            "{}\n{extra}",
                            crate::single_target_toml(listen, &url, &pwfile)
                        );
                        GatewayOptions::with_config(listen, body)
                    }
                    None => GatewayOptions {
                        target: Some((url, pwfile)),
                        args: Vec::new(),
                        env: Vec::new(),
                        listen: None,
                        config: None,
                    },
                };
                Some(Gateway::start(GatewayOptions {
                    args: self.gateway_args,
                    env: self.gateway_env,
                    ..options
                })?)
            }
        };
        Ok(Harness {
            pg,
            gateway,
            mode: self.mode,
            dir,
            upstream_params,
            direct_password: password,
        })
    }
}

/// Writes a 0600 file holding `secret` and a newline.
pub fn write_secret(dir: &Path, name: &str, secret: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    fs::write(&p, format!("{secret}\n"))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600))?;
    Ok(p)
}

impl Harness {
    pub fn builder() -> HarnessBuilder {
        HarnessBuilder {
            pg: Postgres::builder(),
            mode: Mode::from_env(),
            upstream_params: Vec::new(),
            upstream_password: None,
            gateway_args: Vec::new(),
            gateway_env: Vec::new(),
            files: Vec::new(),
            target_toml: None,
        }
    }

    /// A default PostgreSQL (SCRAM, no TLS) and, unless direct, a gateway in front of it.
    pub fn start() -> Result<Harness> {
        Self::builder().start()
    }

    /// What the test's clients connect to.
    pub fn endpoint(&self) -> Endpoint {
        match &self.gateway {
            Some(gw) => Endpoint {
                host: gw.listen.ip().to_string(),
                port: gw.listen.port(),
                user: "agent".into(),
                password: None,
                dbname: self.pg.database.clone(),
                params: vec![("sslmode".into(), "disable".into())],
            },
            None => Endpoint {
                host: self.pg.host.clone(),
                port: self.pg.port,
                user: self.pg.user.clone(),
                password: Some(self.direct_password.clone()),
                dbname: self.pg.database.clone(),
                params: self.upstream_params.clone(),
            },
        }
    }

    /// Straight to PostgreSQL as `app` with the real password, whatever the mode (for setup and
    /// for comparing results with the gateway's).
    pub fn direct(&self) -> Endpoint {
        Endpoint {
            host: self.pg.host.clone(),
            port: self.pg.port,
            user: self.pg.user.clone(),
            password: Some(self.pg.password.clone()),
            dbname: self.pg.database.clone(),
            params: self.upstream_params.clone(),
        }
    }

    pub fn bindir(&self) -> &Path {
        self.pg.bindir()
    }

    pub fn is_direct(&self) -> bool {
        self.mode == Mode::Direct
    }

    /// The gateway; panics in direct mode (callers check `skip_in_direct` first).
    pub fn gw(&self) -> &Gateway {
        self.gateway
            .as_ref()
            .expect("this test needs the gateway; it should have skipped in direct mode")
    }

    /// The mode and the gateway's recent log, to append to every failure message.
    pub fn context(&self) -> String {
        match &self.gateway {
            Some(gw) => format!(
                "[mode: gateway pid {}; last gateway log lines:]\n{}",
                gw.pid(),
                gw.log_tail(40)
            ),
            None => "[mode: direct to PostgreSQL]".into(),
        }
    }

    /// Unwraps `r`, or panics naming `what` with the error and [`Harness::context`].
    #[track_caller]
    pub fn must<T, E: std::fmt::Debug>(&self, r: Result<T, E>, what: &str) -> T {
        match r {
            Ok(v) => v,
            Err(e) => panic!("{what}: {e:?}\n{}", self.context()),
        }
    }

    /// Asserts `cond`, or panics with `what` and [`Harness::context`].
    #[track_caller]
    pub fn check(&self, cond: bool, what: impl std::fmt::Display) {
        if !cond {
            panic!("{what}\n{}", self.context());
        }
    }

    /// Fails the test if the gateway process has died (a panic or crash in the data path).
    pub fn assert_gateway_alive(&mut self) {
        if let Some(gw) = self.gateway.as_mut() {
            match gw.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => panic!(
                    "the gateway exited ({status}) during the test:\n{}",
                    gw.log_tail(60)
                ),
                Err(e) => panic!("checking the gateway process: {e}"),
            }
        }
    }

    /// Runs a libpq program from the PostgreSQL install against the test endpoint.
    pub fn client_cmd(&self, program: &str) -> Command {
        let mut cmd = self.pg.client(program);
        self.endpoint().apply_env(&mut cmd);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Checks that the harness itself is sound: PostgreSQL answers directly.
    pub fn sanity(&self) -> Result<()> {
        let out = self.direct().psql(self.bindir(), "SELECT 1")?;
        if !out.success || out.stdout.trim() != "1" {
            bail!("direct psql to the test PostgreSQL failed: {}", out.stderr);
        }
        Ok(())
    }
}

/// Runs `COPY … FROM STDIN` (`sql`) feeding it `chunks`, returning the server's row count.
pub async fn copy_in<I>(client: &Client, sql: &str, chunks: I) -> Result<u64, tokio_postgres::Error>
where
    I: IntoIterator<Item = Vec<u8>>,
{
    use futures_util::SinkExt;
    let sink = client.copy_in(sql).await?;
    futures_util::pin_mut!(sink);
    for chunk in chunks {
        sink.feed(std::io::Cursor::new(chunk)).await?;
    }
    sink.as_mut().finish().await
}

/// Starts `COPY … FROM STDIN`, sends `chunks`, then abandons the copy (the driver sends
/// CopyFail). Returns what the server answered to the abandoned copy.
pub async fn copy_in_abandoned<I>(
    client: &Client,
    sql: &str,
    chunks: I,
) -> Result<(), tokio_postgres::Error>
where
    I: IntoIterator<Item = Vec<u8>>,
{
    use futures_util::SinkExt;
    let sink = client.copy_in(sql).await?;
    futures_util::pin_mut!(sink);
    for chunk in chunks {
        sink.feed(std::io::Cursor::new(chunk)).await?;
    }
    sink.flush().await?;
    Ok(())
}
