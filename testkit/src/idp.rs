//! A real OpenID provider for the identity tests: npm's `oidc-provider` (installed by
//! `cargo xtask setup` into `~/.cache/portcullis/oidc-provider-<version>`, or
//! `PORTCULLIS_OIDC_PROVIDER_DIR`) run by Node on a free loopback port, with RFC 8693 token
//! exchange registered through its `registerGrantType` extension (see `testkit/idp/server.mjs`).
//!
//! Its signing keys (RSA for RS256, EC P-256 for ES256) are made when it first starts and kept in
//! its state dir, so [`Idp::kill`] and [`Idp::restart`] keep them; [`Idp::rotate_keys`] makes
//! new ones (new `kid`s) without a restart. Clients: `portcullis` (client_secret_basic, secret in
//! [`Idp::client_secret_file`]) and `portcullis-jwt` (private_key_jwt, key in
//! [`Idp::client_key_file`]).

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The `oidc-provider` version `cargo xtask setup` installs.
pub const OIDC_PROVIDER_VERSION: &str = "9.13.3";
const SERVER_JS: &str = include_str!("../idp/server.mjs");

/// How long the IdP may take to answer its discovery document after it is started.
const START_LIMIT: Duration = Duration::from_secs(90);

pub struct Idp {
    dir: tempfile::TempDir,
    port: u16,
    child: Mutex<Option<Child>>,
    client_secret: String,
}

/// Where `oidc-provider` is installed.
pub fn oidc_provider_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("PORTCULLIS_OIDC_PROVIDER_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/portcullis")
            .join(format!("oidc-provider-{OIDC_PROVIDER_VERSION}")),
    };
    if !dir.join("node_modules/oidc-provider/package.json").exists() {
        bail!(
            "oidc-provider is not installed in {}: run `cargo xtask setup` (it installs it from \
             the npm registry)",
            dir.display()
        );
    }
    Ok(dir)
}

impl Idp {
    pub fn start() -> Result<Idp> {
        let modules = oidc_provider_dir()?.join("node_modules");
        let dir = tempfile::Builder::new()
            .prefix("portcullis-idp-")
            .tempdir()?;
        fs::write(dir.path().join("server.mjs"), SERVER_JS)?;
        std::os::unix::fs::symlink(&modules, dir.path().join("node_modules"))?;
        fs::create_dir(dir.path().join("state"))?;
        let client_secret = format!("idp-secret-{}", crate::random_password());
        crate::write_secret(dir.path(), "client-secret", &client_secret)?;
        let mut idp = Idp {
            dir,
            port: crate::free_port(),
            child: Mutex::new(None),
            client_secret,
        };
        // One CI run saw a node that printed its runtime warning and then did not listen for
        // 90 s. Say where it was stuck, and try once more on a fresh port before failing.
        if let Err(first) = idp.restart() {
            eprintln!("testkit: the test IdP did not start, trying once more: {first:#}");
            idp.port = crate::free_port();
            idp.restart()
                .with_context(|| format!("and before that: {first:#}"))?;
        }
        Ok(idp)
    }

    /// `http://127.0.0.1:PORT`: the issuer identifier, and where discovery is.
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The secret of client `portcullis`, for tests that check it never leaks.
    pub fn client_secret(&self) -> &str {
        &self.client_secret
    }

    /// File holding the secret of client `portcullis` (mode 0600).
    pub fn client_secret_file(&self) -> PathBuf {
        self.dir.path().join("client-secret")
    }

    /// PKCS#8 PEM key of client `portcullis-jwt`.
    pub fn client_key_file(&self) -> PathBuf {
        self.dir.path().join("state/client-key.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A token for `sub` with `groups`, for audience `aud`, as the IdP would issue it to a user
    /// or an agent: RS256, current key, five minutes.
    pub fn mint(&self, sub: &str, groups: &[&str], aud: &str) -> Result<String> {
        self.mint_with(json!({"claims": {"sub": sub, "groups": groups, "aud": aud}}))
    }

    /// A token with chosen properties: `{"claims": {..}, "alg": "RS256"|"ES256"|"none"|
    /// "HS256-public-key", "header": {..}, "ttl": secs}`. Claims default to `iss`, `iat`, `exp`
    /// and `jti`; a `null` claim removes it.
    pub fn mint_with(&self, request: Value) -> Result<String> {
        let answer = self.control("/test/mint", &request)?;
        answer["token"]
            .as_str()
            .map(str::to_owned)
            .context("no token in the mint answer")
    }

    /// New signing keys with new `kid`s; the old ones stay published when `keep_old`.
    pub fn rotate_keys(&self, keep_old: bool) -> Result<Vec<String>> {
        let answer = self.control("/test/rotate", &json!({"keep_old": keep_old}))?;
        Ok(answer["kids"]
            .as_array()
            .context("no kids")?
            .iter()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect())
    }

    /// How the exchange behaves: `{"ttl": secs, "aud": "override", "iss": "override",
    /// "refuse": "reason"}` (`null` restores the default).
    pub fn set_behaviour(&self, behaviour: Value) -> Result<()> {
        self.control("/test/behaviour", &behaviour).map(drop)
    }

    /// Counters: `exchanges` answered, `jwks` and `discovery` requests served.
    pub fn stats(&self) -> Result<Value> {
        self.control("/test/stats", &json!({}))
    }

    /// Kills the IdP (SIGKILL): its port refuses connections until [`Idp::restart`].
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same keys and clients.
    pub fn restart(&self) -> Result<()> {
        self.kill();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("idp.log"))?;
        let child = Command::new("node")
            .arg("--report-on-signal")
            .arg("--report-directory=report")
            .arg("server.mjs")
            .current_dir(self.dir.path())
            .env("PORT", self.port.to_string())
            .env("STATE_DIR", self.dir.path().join("state"))
            .env("CLIENT_SECRET", &self.client_secret)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting node (Node 20 is needed for the test IdP)")?;
        *self.child.lock().unwrap() = Some(child);
        // Node loads oidc-provider in a second or two, but tests start several IdPs at once
        // beside PostgreSQL servers; on a loaded 2-core machine 20 s was not always enough.
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if http(self.port, "GET", "/.well-known/openid-configuration", "").is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.lock().unwrap().as_mut().unwrap().try_wait()? {
                bail!("the test IdP exited ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                let stuck_at = self.where_stuck();
                self.kill();
                bail!(
                    "the test IdP on port {} did not answer within {START_LIMIT:?}:\n{}\n{stuck_at}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What a node that does not answer is doing: the kernel's view of the process and, from a
    /// diagnostic report (SIGUSR2 under `--report-on-signal`), its JavaScript stack.
    fn where_stuck(&self) -> String {
        let Some(pid) = self.child.lock().unwrap().as_ref().map(Child::id) else {
            return "node is not running".into();
        };
        let proc_file =
            |name: &str| fs::read_to_string(format!("/proc/{pid}/{name}")).unwrap_or_default();
        let mut out = format!(
            "node {pid}: stat {} wchan {}\n",
            proc_file("stat").trim(),
            proc_file("wchan")
        );
        let _ = Command::new("kill")
            .args(["-USR2", &pid.to_string()])
            .status();
        let reports = self.dir.path().join("report");
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(100));
            if let Some(report) = fs::read_dir(&reports)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok())
                .and_then(|e| fs::read_to_string(e.path()).ok())
                .filter(|r| r.trim_end().ends_with('}'))
            {
                let stack = serde_json::from_str::<Value>(&report)
                    .map(|r| r["javascriptStack"].to_string())
                    .unwrap_or(report);
                out.push_str(&format!("javascript stack: {stack}"));
                return out;
            }
        }
        out.push_str("no diagnostic report within 2 s: its event loop is busy");
        out
    }

    /// Everything the IdP printed.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("idp.log")).unwrap_or_default()
    }

    fn control(&self, path: &str, body: &Value) -> Result<Value> {
        let (status, text) = http(self.port, "POST", path, &body.to_string())?;
        if status != 200 {
            bail!("IdP control {path}: HTTP {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("IdP control {path}: {text}"))
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
fn http(port: u16, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
