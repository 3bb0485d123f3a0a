//! Identity at connect, end to end: a real IdP (npm's oidc-provider, see testkit::idp), a real
//! PostgreSQL, the real gateway with the shipped default policy (plus rules by group and
//! subject), and real clients (psql, tokio-postgres). The token comes as the password over
//! loopback; the session is bound to who it names: policy by group and subject, the upstream
//! role it maps to, its expiry, and what operators see.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::idp::Idp;
use testkit::{Gateway, GatewayOptions, Postgres, free_port};

/// Rules by who the session is, ahead of the shipped default policy's own.
const WHO_RULES: &str = r#"
[[rules]]
name = "no-mallory"
subjects = ["mallory"]
action = "block"
reason = "mallory is suspended"

[[rules]]
name = "contractors-read-only"
groups = ["contractors"]
kinds = ["write"]
action = "block"
reason = "contractors may not write"

[[rules]]
name = "no-writes-through-claude"
actors = ["claude-agent"]
kinds = ["write"]
action = "block"
reason = "claude may not write on anyone's behalf"

[[rules]]
name = "dba-writes"
groups = ["dba"]
kinds = ["write"]
action = "allow"

"#;

struct Env {
    pg: Postgres,
    idp: Idp,
    gw: Gateway,
    /// Listener of target `main` (exchange mode, roles by group).
    main: String,
    /// Listener of target `direct` (validate mode, no roles).
    direct: String,
    /// `[redirect]` pin path and agent root, when started with [`Env::redirected`].
    redirect: Option<(PathBuf, PathBuf)>,
    metrics: String,
    dir: tempfile::TempDir,
}

fn policy_with_who_rules() -> String {
    let default = include_str!("../src/policy/builtin/default.toml");
    let at = default
        .find("[[rules]]\nname = \"no-ddl\"")
        .expect("the default policy has its no-ddl rule");
    format!("{}{WHO_RULES}{}", &default[..at], &default[at..])
}

impl Env {
    fn start(exchange_ttl: Option<u64>) -> Env {
        Env::start_with(exchange_ttl, |_, _| String::new(), None, "")
    }

    /// With the eBPF redirect on (root), and `[[agent]]` tables from `agents(dir, idp)`.
    fn redirected(tag: &str, agents: impl FnOnce(&Path, &Idp) -> String) -> Env {
        Env::redirected_with(tag, agents, "")
    }

    /// [`Env::redirected`], with `main_identity` added to target `main`'s `[target.identity]`.
    fn redirected_with(
        tag: &str,
        agents: impl FnOnce(&Path, &Idp) -> String,
        main_identity: &str,
    ) -> Env {
        let mount = portcullis::redirect::find_cgroup2_mount().expect("cgroup2 mount");
        let unique = format!("portcullis-identity-{tag}-{}", std::process::id());
        let redirect = (
            PathBuf::from("/sys/fs/bpf").join(&unique),
            mount.join(&unique),
        );
        Env::start_with(None, agents, Some(redirect), main_identity)
    }

    fn start_with(
        exchange_ttl: Option<u64>,
        agents: impl FnOnce(&Path, &Idp) -> String,
        redirect: Option<(PathBuf, PathBuf)>,
        main_identity: &str,
    ) -> Env {
        let pg = Postgres::start().expect("start PostgreSQL");
        pg.superuser_sql(
            "CREATE ROLE reader NOLOGIN; GRANT reader TO app; \
             CREATE ROLE dba_login LOGIN PASSWORD 'dba-login-pw'",
        )
        .unwrap();
        pg.app_superuser_sql(
            "CREATE TABLE orders (id int, state text); INSERT INTO orders VALUES (1, 'new'); \
             GRANT SELECT ON orders TO reader; GRANT ALL ON orders TO dba_login",
        )
        .unwrap();
        let idp = Idp::start().expect("start the test IdP (cargo xtask setup installs it)");
        if let Some(ttl) = exchange_ttl {
            idp.set_behaviour(json!({ "ttl": ttl })).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let pw = pg.write_password_file(dir.path()).unwrap();
        let dba_pw = testkit::write_secret(dir.path(), "dba.pw", "dba-login-pw").unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, policy_with_who_rules()).unwrap();
        let main = format!("127.0.0.1:{}", free_port());
        let direct = format!("127.0.0.1:{}", free_port());
        let mut extra = agents(dir.path(), &idp);
        if let Some((pin, root)) = &redirect {
            extra.push_str(&format!(
                "\n[redirect]\nenabled = true\nlisten = \"127.0.0.1:{}\"\npin_path = \"{}\"\n\
                 agent_cgroup_root = \"{}\"\n",
                free_port(),
                pin.display(),
                root.display()
            ));
        }
        let metrics = format!("127.0.0.1:{}", free_port());
        let config = format!(
            r#"{extra}
[metrics]
listen = "{metrics}"

[[listener]]
listen = "{main}"
target = "main"

[[listener]]
listen = "{direct}"
target = "direct"

[[target]]
name = "main"
upstream = "{url}"
password_file = "{pw}"

[target.identity]
issuer = "{issuer}"
audience = "pg-main"
client_id = "portcullis"
client_secret_file = "{secret}"
jwks_min_refresh = "0s"
leeway = "1s"
{main_identity}

[[target.role]]
groups = ["dba"]
user = "dba_login"
password_file = "{dba_pw}"

[[target.role]]
groups = ["analysts", "contractors"]
set_role = "reader"

[target.local_tls]
mode = "local-ca"
hosts = ["db.internal"]

[[target]]
name = "direct"
upstream = "{url}"
password_file = "{pw}"
protect = ["192.0.2.1:5432"]

[target.identity]
issuer = "{issuer}"
audience = "pg-direct"
mode = "validate"
leeway = "1s"
"#,
            url = pg.url(),
            pw = pw.display(),
            issuer = idp.issuer(),
            secret = idp.client_secret_file().display(),
            dba_pw = dba_pw.display(),
        );
        let gw = Gateway::start(
            GatewayOptions::with_config(main.parse().unwrap(), config)
                .arg("--policy")
                .arg(policy.display().to_string()),
        )
        .expect("start the gateway");
        Env {
            pg,
            idp,
            gw,
            main,
            direct,
            redirect,
            metrics,
            dir,
        }
    }

    /// The value of one series on /metrics, e.g. `portcullis_identity_exchanges_total{target="main"}`.
    fn metric(&self, series: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).expect("metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: {}\r\n\r\n", self.metrics).unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    /// `portcullis run --agent AGENT -- psql ... -c SQL` against PostgreSQL's own address, with
    /// `password` in PGPASSWORD: (stdout, stderr, success).
    fn agent_psql(&self, agent: &str, password: &str, sql: &str) -> (String, String, bool) {
        self.agent_psql_with(agent, &[], password, sql)
    }

    /// [`Env::agent_psql`] with more `portcullis run` options (`--admin-socket` is this
    /// gateway's unless `run_args` name one).
    fn agent_psql_with(
        &self,
        agent: &str,
        run_args: &[&str],
        password: &str,
        sql: &str,
    ) -> (String, String, bool) {
        let (pin, root) = self.redirect.as_ref().expect("started with the redirect");
        let dsn = format!(
            "host=127.0.0.1 port={} user=agent dbname=app sslmode=disable",
            self.pg.port
        );
        let out = Command::new(testkit::portcullis_bin())
            .args(["run", "--agent", agent, "--pin-path"])
            .arg(pin)
            .arg("--agent-root")
            .arg(root)
            .args(run_args)
            .env("PORTCULLIS_ADMIN_SOCKET", &self.gw.admin_socket)
            .arg("--")
            .arg(self.pg.bindir().join("psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", &dsn, "-c", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "30")
            .output()
            .expect("portcullis run");
        (
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.success(),
        )
    }

    /// psql through `listen` with `token` as its password: (stdout, stderr, success).
    fn psql(&self, listen: &str, token: &str, sql: &str) -> (String, String, bool) {
        psql_at(self.pg.bindir(), listen, token, sql)
    }

    fn sessions(&self) -> (Vec<Value>, String) {
        let out = self.gw.cli(&["sessions", "--json"]).expect("sessions");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (serde_json::from_str(&text).expect("sessions --json"), text)
    }

    /// Waits until `sessions` lists none; panics with the last list after 10 s.
    fn wait_no_sessions(&self, what: &str) {
        if let Err(left) = self
            .gw
            .wait_sessions_gone(|_| true, Duration::from_secs(10))
        {
            panic!("{what}: {left}");
        }
    }

    /// Rewrites the gateway's configuration with `edit` and reloads it (SIGHUP), waiting until
    /// the gateway reports the reload done.
    fn reload(&self, edit: impl FnOnce(String) -> String) {
        let path = self.gw.config_path.as_ref().expect("a config file");
        let before = std::fs::read_to_string(path).unwrap();
        let after = edit(before.clone());
        assert_ne!(before, after, "the edit changed nothing");
        std::fs::write(path, after).unwrap();
        self.reload_unchanged();
    }

    /// SIGHUP with the configuration as it is, through `portcullis reload`, which waits.
    fn reload_unchanged(&self) {
        let pid = self.gw.pid().to_string();
        let out = self.gw.cli(&["reload", "--pid", &pid]).unwrap();
        assert!(
            out.status.success(),
            "reload: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.context()
        );
    }

    /// Exchanges the IdP has answered, by its own count.
    fn idp_exchanges(&self) -> u64 {
        self.idp.stats().unwrap()["exchanges"]
            .as_u64()
            .expect("exchanges in the IdP's stats")
    }

    fn context(&self) -> String {
        format!(
            "--- gateway log ---\n{}\n--- idp log ---\n{}",
            self.gw.log_tail(40),
            self.idp.log()
        )
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some((pin, root)) = &self.redirect {
            let _ = Command::new(testkit::portcullis_bin())
                .arg("uninstall")
                .arg("--pin-path")
                .arg(pin)
                .arg("--agent-root")
                .arg(root)
                .output();
            let _ = std::fs::remove_dir_all(pin);
            let _ = std::fs::write(root.join("cgroup.kill"), "1");
            let _ = std::fs::remove_dir(root);
        }
    }
}

/// `[[agent]] claude` with a token file for `claude-agent` (analysts), written into `dir`.
fn claude_token_file(dir: &Path, idp: &Idp) -> String {
    let claude = idp
        .mint("claude-agent", &["analysts"], "portcullis")
        .unwrap();
    let file = testkit::write_secret(dir, "claude.jwt", &claude).unwrap();
    format!(
        "[[agent]]\nname = \"claude\"\ntoken_file = \"{}\"\n",
        file.display()
    )
}

fn psql_at(bindir: &Path, listen: &str, token: &str, sql: &str) -> (String, String, bool) {
    let (host, port) = listen.split_once(':').unwrap();
    let dsn = format!("host={host} port={port} user=agent dbname=app sslmode=disable");
    psql_dsn(bindir, &dsn, token, sql)
}

/// psql with a whole connection string and `token` as its password.
fn psql_dsn(bindir: &Path, dsn: &str, token: &str, sql: &str) -> (String, String, bool) {
    let out = Command::new(bindir.join("psql"))
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(dsn)
        .env("PGPASSWORD", token)
        .env("PGCONNECT_TIMEOUT", "30")
        .output()
        .expect("run psql");
    (
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

/// tokio-postgres settings to connect through `listen` with `token` as the password.
fn pg_config(listen: &str, token: &str) -> tokio_postgres::Config {
    let (host, port) = listen.split_once(':').unwrap();
    let mut c = tokio_postgres::Config::new();
    c.host(host)
        .port(port.parse().unwrap())
        .user("agent")
        .dbname("app")
        .password(token)
        .connect_timeout(Duration::from_secs(30));
    c
}

async fn connect(
    listen: &str,
    token: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = pg_config(listen, token)
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Like [`connect`], with the connection's own end, where an unsolicited FATAL lands.
async fn connect_watched(
    listen: &str,
    token: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, conn) = pg_config(listen, token)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through the gateway");
    (client, tokio::spawn(conn))
}

/// SQLSTATE and message of a refused connection or statement.
fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {e:?}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_as_the_password_binds_the_session_to_its_subject() {
    let env = Env::start(None);
    let alice = env.idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let c = connect(&env.main, &alice)
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", env.context()));
    let row = c
        .query_one("SELECT current_user::text, session_user::text", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("reader".to_owned(), "app".to_owned()),
        "analysts map to SET ROLE reader on the target's login"
    );

    // Operators see who, and never the token.
    let (sessions, text) = env.sessions();
    let s = sessions
        .iter()
        .find(|s| s["subject"] == "alice")
        .unwrap_or_else(|| panic!("no session for alice: {text}"));
    assert_eq!(s["groups"], json!(["analysts"]));
    assert_eq!(s["target"], "main");
    assert!(
        s["token_expires_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{s}"
    );
    assert!(s["token_jti"].as_str().is_some(), "{s}");
    let table = env.gw.cli(&["sessions"]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("alice") && table.contains("SUBJECT"),
        "{table}"
    );
    for (what, out) in [("sessions --json", &text), ("sessions", &table)] {
        assert!(!out.contains(&alice), "{what} shows the token");
    }
    drop(c);
    // The canary: neither the presented token nor the client secret in anything the gateway
    // printed (at debug, where identities are logged by hash).
    assert!(
        env.gw.log_shows("alice", Duration::from_secs(5)),
        "the log names the subject"
    );
    let log = env.gw.log();
    assert!(!log.contains(&alice), "the gateway log holds the token");
    assert!(
        !log.contains(env.idp.client_secret()),
        "the gateway log holds the client secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_subjects_decide_and_map_the_upstream_role() {
    let env = Env::start(None);
    let dba = env.idp.mint("dora", &["dba"], "portcullis").unwrap();
    let contractor = env
        .idp
        .mint("carl", &["contractors"], "portcullis")
        .unwrap();
    let mallory = env.idp.mint("mallory", &["dba"], "portcullis").unwrap();
    let nobody = env.idp.mint("nina", &["sales"], "portcullis").unwrap();
    let write = "INSERT INTO orders VALUES (2, 'paid')";

    // dba: its own upstream login, and writes allowed by group.
    let (out, err, ok) = env.psql(&env.main, &dba, "SELECT current_user, session_user");
    assert!(ok, "{err}\n{}", env.context());
    assert_eq!(out, "dba_login|dba_login");
    let (_, err, ok) = env.psql(&env.main, &dba, write);
    assert!(ok, "dba writes: {err}");

    // contractors: reads through SET ROLE reader; writes blocked by the group rule.
    let (out, err, ok) = env.psql(&env.main, &contractor, "SELECT count(*) FROM orders");
    assert!(ok, "{err}");
    assert_eq!(out, "2");
    let (_, err, ok) = env.psql(&env.main, &contractor, write);
    assert!(!ok);
    assert!(err.contains("contractors-read-only"), "{err}");

    // The agent cannot leave the role the gateway set.
    for escape in [
        "SET ROLE app",
        "SET ROLE NONE",
        "SET LOCAL ROLE app",
        "RESET ROLE",
        "reset  role",
        "SET SESSION AUTHORIZATION app",
        "RESET SESSION AUTHORIZATION",
        "SELECT set_config('role', 'app', false)",
        "DISCARD ALL",
        "RESET ALL",
    ] {
        let (out, _, ok) = env.psql(
            &env.main,
            &contractor,
            &format!("{escape}; SELECT current_user"),
        );
        // Refused, or harmless: the session is still the mapped role.
        assert!(
            !ok || out.lines().last() == Some("reader"),
            "{escape} left the role: {out}"
        );
    }
    // Alone (DISCARD ALL cannot run in the implicit transaction of a multi-statement query), and
    // under a policy that allows it: the gateway refuses it by itself.
    let c = connect(&env.main, &contractor).await.unwrap();
    for reset in ["DISCARD ALL", "RESET ROLE", "SET ROLE NONE"] {
        let e = c.simple_query(reset).await.unwrap_err();
        let (_, message) = db_error(&e);
        assert!(message.contains("identity-role"), "{reset}: {message}");
    }
    let row = c.query_one("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "reader");

    // A subject rule fires whatever the groups.
    let (_, err, ok) = env.psql(&env.main, &mallory, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("no-mallory"), "{err}");

    // No mapping for the identity's groups, and no default role: refused at connect.
    let (_, err, ok) = env.psql(&env.main, &nobody, "SELECT 1");
    assert!(!ok);
    assert!(
        err.contains("no upstream role is mapped") && err.contains("nina"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_missing_tokens_are_refused_saying_which_check_failed() {
    let env = Env::start(None);
    let alice = |aud: &str| env.idp.mint("alice", &["analysts"], aud).unwrap();

    // Validate mode: the presented token itself must be for the target.
    let (out, err, ok) = env.psql(&env.direct, &alice("pg-direct"), "SELECT current_user");
    assert!(ok, "{err}\n{}", env.context());
    assert_eq!(out, "app");
    let (_, err, ok) = env.psql(&env.direct, &alice("pg-main"), "SELECT 1");
    assert!(!ok);
    assert!(err.contains("28P01") || err.contains("audience"), "{err}");
    assert!(
        err.contains("audience does not contain \"pg-direct\""),
        "{err}"
    );

    let none = env
        .idp
        .mint_with(json!({"alg": "none", "claims": {"sub": "alice", "aud": "pg-direct"}}))
        .unwrap();
    let (_, err, ok) = env.psql(&env.direct, &none, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("algorithm"), "{err}");
    let hs = env
        .idp
        .mint_with(
            json!({"alg": "HS256-public-key", "claims": {"sub": "alice", "aud": "pg-direct"}}),
        )
        .unwrap();
    let (_, err, ok) = env.psql(&env.direct, &hs, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("algorithm"), "{err}");

    // Exchange mode: the IdP judges the subject token and says why.
    let expired = env
        .idp
        .mint_with(json!({"claims": {"sub": "alice", "exp": 1_000_000}}))
        .unwrap();
    let (_, err, ok) = env.psql(&env.main, &expired, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("subject_token"), "{err}");
    let (_, err, ok) = env.psql(&env.main, "not-a-token", "SELECT 1");
    assert!(!ok);
    assert!(err.contains("IdP refused the token exchange"), "{err}");

    // tokio-postgres sees the SQLSTATEs: a bad token is 28P01, no token at all 28000.
    let e = connect(&env.direct, &none).await.unwrap_err();
    assert_eq!(db_error(&e).0, "28P01");
    let e = connect(&env.main, "").await.unwrap_err();
    let (code, message) = db_error(&e);
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("no token"), "{message}");

    // Nothing got through upstream as anyone.
    let log = env.gw.log();
    for t in [&none, &hs, &expired] {
        assert!(!log.contains(t.as_str()), "a refused token is in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_s_expiry_bounds_the_session() {
    // Exchanged tokens live 4s: each statement after that renews the identity first.
    let env = Env::start(Some(4));
    let alice = env.idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let c = connect(&env.main, &alice)
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", env.context()));
    c.simple_query("SELECT 1").await.unwrap();
    let first = env.sessions().0[0]["token_jti"].clone();
    let exchanges = |idp: &Idp| idp.stats().unwrap()["exchanges"].as_u64().unwrap();
    let before = exchanges(&env.idp);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let row = c.query_one("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "reader");
    assert!(
        exchanges(&env.idp) > before,
        "the expired identity was renewed at the IdP"
    );
    let renewed = env.sessions().0[0]["token_jti"].clone();
    assert_ne!(first, renewed, "sessions shows the renewed token");

    // Now the IdP refuses: the next statement after expiry ends the session, with the reason.
    env.idp
        .set_behaviour(json!({"refuse": "alice's access was revoked"}))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    let (code, message) = db_error(&e);
    assert_eq!(code, "28000", "{message}");
    assert!(
        message.contains("expired") && message.contains("revoked"),
        "{message}"
    );
    assert!(
        c.simple_query("SELECT 1").await.is_err(),
        "the session ended"
    );
    env.wait_no_sessions("no session left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_idp_down_cached_identities_continue_and_new_ones_are_refused() {
    let env = Env::start(None);
    let alice = env.idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let bob = env.idp.mint("bob", &["analysts"], "portcullis").unwrap();
    let (_, err, ok) = env.psql(&env.main, &alice, "SELECT 1");
    assert!(ok, "{err}\n{}", env.context());

    env.idp.kill();
    let (_, err, ok) = env.psql(&env.main, &alice, "SELECT 1");
    assert!(ok, "alice's exchanged token is cached: {err}");
    let (_, err, ok) = env.psql(&env.main, &bob, "SELECT 1");
    assert!(!ok, "bob has nothing cached");
    assert!(err.contains("IdP unreachable"), "{err}");

    env.idp.restart().unwrap();
    let (_, err, ok) = env.psql(&env.main, &bob, "SELECT 1");
    assert!(ok, "the gateway recovers with the IdP: {err}");

    // Counted: two exchanges, alice's cached reconnect, bob's refusal by reason.
    let m = |series: &str| env.metric(series).unwrap_or(0.0);
    assert_eq!(
        m("portcullis_identity_exchanges_total{target=\"main\"}"),
        2.0
    );
    assert!(m("portcullis_identity_cache_hits_total{target=\"main\"}") >= 1.0);
    assert_eq!(
        m("portcullis_identity_failures_total{target=\"main\",reason=\"idp_unreachable\"}"),
        1.0
    );
}

/// A reload starts each target's identity service afresh: what the old settings exchanged and
/// cached is gone, and the next connect is judged by the new issuer, audience and client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_drops_cached_identities_and_the_next_connect_follows_the_new_settings() {
    let env = Env::start(None);
    let alice = env.idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let connects = |why: &str| {
        let (out, err, ok) = env.psql(&env.main, &alice, "SELECT current_user");
        assert!(ok, "{why}: {err}\n{}", env.context());
        assert_eq!(out, "reader", "{why}");
    };
    connects("first connect");
    connects("second connect");
    assert_eq!(
        env.idp_exchanges(),
        1,
        "the second connect came from the cache"
    );

    // Nothing changed, and still the cache is dropped: the next connect exchanges again.
    env.reload_unchanged();
    connects("after a reload");
    assert_eq!(
        env.idp_exchanges(),
        2,
        "a reload keeps no exchanged token: {}",
        env.context()
    );

    // Another client secret: alice's identity is cached from a moment ago, yet the new client
    // must authenticate to the IdP, and the IdP refuses it.
    let secret = env.idp.client_secret_file().display().to_string();
    let wrong = testkit::write_secret(env.dir.path(), "wrong-client.secret", "not-the-secret")
        .unwrap()
        .display()
        .to_string();
    env.reload(|c| c.replace(&secret, &wrong));
    let (out, err, ok) = env.psql(&env.main, &alice, "SELECT 1");
    assert!(
        !ok,
        "connected with a cached identity after the client changed: {out}"
    );
    assert!(err.contains("invalid_client"), "{err}");
    assert_eq!(env.idp_exchanges(), 2);

    // Another audience: a token the IdP issues for the old one no longer passes.
    env.reload(|c| {
        c.replace(&wrong, &secret)
            .replace("audience = \"pg-main\"", "audience = \"pg-main-v2\"")
    });
    env.idp.set_behaviour(json!({ "aud": "pg-main" })).unwrap();
    let (out, err, ok) = env.psql(&env.main, &alice, "SELECT 1");
    assert!(!ok, "a token for the old audience was taken: {out}");
    assert!(err.contains("pg-main-v2"), "{err}");
    env.idp.set_behaviour(json!({ "aud": null })).unwrap();
    connects("with the new audience");

    // Another issuer: nothing is asked of the old IdP, and nothing it issued is taken.
    let issuer = env.idp.issuer();
    let exchanges = env.idp_exchanges();
    env.reload(|c| {
        c.replace(
            &format!("issuer = \"{issuer}\""),
            "issuer = \"http://127.0.0.1:9\"",
        )
    });
    let (out, err, ok) = env.psql(&env.main, &alice, "SELECT 1");
    assert!(!ok, "connected with an identity from the old issuer: {out}");
    assert!(err.contains("IdP unreachable"), "{err}");
    assert_eq!(env.idp_exchanges(), exchanges);

    let log = env.gw.log();
    assert!(
        !log.contains(alice.as_str()),
        "the token is in the gateway log"
    );
    assert!(
        !log.contains(env.idp.client_secret()),
        "the client secret is in the gateway log"
    );
}

#[test]
fn an_agent_s_token_file_is_its_identity_and_is_read_at_every_connect() {
    if testkit::skip_unless_root(
        "an_agent_s_token_file_is_its_identity_and_is_read_at_every_connect",
    ) {
        return;
    }
    let env = Env::redirected("file", claude_token_file);
    let file = env.dir.path().join("claude.jwt");
    let first = std::fs::read_to_string(&file).unwrap();
    let codex = env.idp.mint("codex-agent", &["dba"], "portcullis").unwrap();

    // The agent's driver is unchanged: it dials PostgreSQL, and its token file says who it is.
    // The password it carries (another agent's token) is never asked for.
    let (out, err, ok) = env.agent_psql("claude", &codex, "SELECT current_user");
    assert!(ok, "{err}\n{}", env.context());
    assert_eq!(
        out, "reader",
        "claude's own identity (analysts), not codex's (dba)"
    );
    assert!(
        env.gw
            .log_shows("subject=\"claude-agent\"", Duration::from_secs(5)),
        "{}",
        env.context()
    );

    // Rotated by its workload-identity helper: the next connect reads the new token.
    let rotated = env
        .idp
        .mint("claude-agent", &["dba"], "portcullis")
        .unwrap();
    testkit::write_secret(env.dir.path(), "claude.jwt", &rotated).unwrap();
    let (out, err, ok) = env.agent_psql("claude", "", "SELECT current_user");
    assert!(ok, "{err}");
    assert_eq!(out, "dba_login");

    // An agent without a token file presents its token as the password, over loopback.
    let (out, err, ok) = env.agent_psql("codex", &codex, "SELECT current_user");
    assert!(ok, "{err}");
    assert_eq!(out, "dba_login");

    // The file removed: refused, naming the file, never waved through as the target's login.
    std::fs::remove_file(&file).unwrap();
    let (out, err, ok) = env.agent_psql("claude", &codex, "SELECT current_user");
    assert!(!ok, "connected without a token file: {out}");
    assert!(
        err.contains("claude.jwt") && err.contains("does not exist"),
        "{err}"
    );

    let log = env.gw.log();
    for t in [&first, &rotated, &codex] {
        assert!(!log.contains(t.trim()), "a token is in the gateway log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyst_s_write_waits_for_a_human_and_then_runs_as_the_mapped_role() {
    let env = Env::start(None);
    let alice = env.idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let c = connect(&env.main, &alice)
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", env.context()));
    let write = tokio::spawn(async move {
        c.simple_query("UPDATE orders SET state = 'held' WHERE id = 1")
            .await
    });
    let id = pending_approval(&env).await;
    // Operators see who asked: the subject the token names, not only the process.
    let pending = approval(&env, id);
    assert_eq!(pending["subject"], "alice", "{pending}");
    assert_eq!(pending["actors"], json!([]), "{pending}");
    let table = env.gw.cli(&["approvals"]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("SUBJECT") && table.contains("alice"),
        "{table}"
    );
    assert!(!table.contains(&alice), "approvals shows the token");
    let out = env.gw.cli(&["approve", &id.to_string()]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Approved by a human, the write still runs as `reader`, which may only read.
    let e = write.await.unwrap().unwrap_err();
    let (code, message) = db_error(&e);
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("orders"), "{message}");
    // Who decided: the admin socket peer's user and uid, from the kernel, not from the request.
    let decided = approval(&env, id);
    let me = my_uid();
    assert!(
        decided["decided_by"]
            .as_str()
            .is_some_and(|by| by.ends_with(&format!("(uid {me})"))),
        "{decided}"
    );
}

/// The id of the first request pending approval under rule `writes`, once there is one.
async fn pending_approval(env: &Env) -> u64 {
    for _ in 0..300 {
        let out = env.gw.cli(&["approvals", "--json"]).unwrap();
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(r) = list
            .iter()
            .find(|r| r["status"] == "pending" && r["rule"] == "writes")
        {
            return r["id"].as_u64().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no pending approval\n{}", env.context());
}

/// One approval request as `portcullis approvals --json` shows it.
fn approval(env: &Env, id: u64) -> Value {
    let out = env.gw.cli(&["approvals", "--json"]).unwrap();
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    list.into_iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no approval {id}"))
}

/// This process's uid, as the admin socket sees it (via /proc, without unsafe).
fn my_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap()
}

/// Waits until `sessions` lists `n` sessions of `subject`; returns their ids.
async fn sessions_of(env: &Env, subject: &str, n: usize) -> Vec<u64> {
    for _ in 0..100 {
        let ids: Vec<u64> = env
            .sessions()
            .0
            .iter()
            .filter(|s| s["subject"] == subject)
            .filter_map(|s| s["id"].as_u64())
            .collect();
        if ids.len() == n {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{subject} does not have {n} sessions\n{}", env.context());
}

/// The CLI's (stdout, stderr, success).
fn cli(env: &Env, args: &[&str]) -> (String, String, bool) {
    let out = env.gw.cli(args).unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_kills_a_subject_s_sessions_and_the_clients_hear_who() {
    let env = Env::start(None);
    let alice = env.idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let bob = env.idp.mint("bob", &["analysts"], "portcullis").unwrap();
    let (a1, a1_end) = connect_watched(&env.main, &alice).await;
    let (a2, a2_end) = connect_watched(&env.main, &alice).await;
    let (b, _) = connect_watched(&env.main, &bob).await;
    sessions_of(&env, "alice", 2).await;
    let bob_ids = sessions_of(&env, "bob", 1).await;

    // What an agent would try. The CLI insists on exactly one selector.
    let (_, err, ok) = cli(&env, &["sessions", "kill"]);
    assert!(!ok && err.contains("--subject"), "{err}");
    let (_, err, ok) = cli(
        &env,
        &["sessions", "kill", "--subject", "alice", "--session", "1"],
    );
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    // So does the admin API, for a client that writes its own request.
    let both = portcullis::admin::client::call(
        &env.gw.admin_socket,
        &portcullis::admin::Request::KillSessions {
            subject: Some("alice".into()),
            session: Some(bob_ids[0]),
        },
    )
    .unwrap_err();
    assert!(both.to_string().contains("exactly one"), "{both}");
    // A subject's name that matches nobody kills nothing and says so, as does a prefix.
    for nobody in ["mallory", "ali", ""] {
        let (_, err, ok) = cli(&env, &["sessions", "kill", "--subject", nobody]);
        assert!(!ok && err.contains("no live session"), "{nobody}: {err}");
    }
    // A local user outside the admin group cannot reach the admin socket at all.
    if testkit::is_root() {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(testkit::portcullis_bin())
            .args(["sessions", "kill", "--subject", "alice", "--admin-socket"])
            .arg(&env.gw.admin_socket)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("ermission denied"),
            "{err}"
        );
    } else {
        eprintln!("SKIPPED the non-admin user's kill attempt: needs root to switch users");
    }
    for c in [&a1, &a2, &b] {
        c.simple_query("SELECT 1")
            .await
            .expect("nothing was killed yet");
    }

    // The operator kills alice's sessions: both clients hear 57P01, naming who did it.
    let (out, err, ok) = cli(&env, &["sessions", "kill", "--subject", "alice"]);
    assert!(ok, "{err}\n{}", env.context());
    assert_eq!(out.matches("killed session").count(), 2, "{out}");
    for (c, end) in [(&a1, a1_end), (&a2, a2_end)] {
        // The FATAL arrives while the client is idle: its connection ends with it.
        let e = tokio::time::timeout(Duration::from_secs(10), end)
            .await
            .expect("the killed session ends")
            .unwrap()
            .unwrap_err();
        let (code, message) = db_error(&e);
        assert_eq!(code, "57P01", "{message}");
        assert!(
            message.contains("killed by") && message.contains("(uid "),
            "{message}"
        );
        assert!(c.simple_query("SELECT 1").await.is_err());
    }
    assert!(
        env.gw.log_shows("session killed", Duration::from_secs(5)),
        "{}",
        env.context()
    );
    // bob is untouched, and can be killed by session id; a second kill finds nothing.
    b.simple_query("SELECT 1")
        .await
        .expect("bob's session lives");
    let id = bob_ids[0].to_string();
    let (_, err, ok) = cli(&env, &["sessions", "kill", "--session", &id]);
    assert!(ok, "{err}");
    assert!(b.simple_query("SELECT 1").await.is_err());
    let (_, err, ok) = cli(&env, &["sessions", "kill", "--session", &id]);
    assert!(!ok && err.contains("no live session of session"), "{err}");
    sessions_of(&env, "alice", 0).await;
    sessions_of(&env, "bob", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_hears_who_killed_its_session_even_while_a_statement_waits_for_approval() {
    let env = Env::start(None);
    let alice = env.idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let (host, port) = env.main.split_once(':').unwrap();
    // psql holds a write for approval; the operator kills the session instead of deciding.
    let psql = Command::new(env.pg.bindir().join("psql"))
        .args([
            "-X",
            "-At",
            "-c",
            "UPDATE orders SET state = 'x' WHERE id = 1",
        ])
        .arg(format!(
            "host={host} port={port} user=agent dbname=app sslmode=disable"
        ))
        .env("PGPASSWORD", &alice)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = pending_approval(&env).await;
    let (_, err, ok) = cli(&env, &["sessions", "kill", "--subject", "alice"]);
    assert!(ok, "{err}");
    let out = psql.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("terminating connection due to administrator command")
            && err.contains("killed by")
            && err.contains("(uid "),
        "{err}"
    );
    // The request it held is withdrawn, not left for an operator to approve into nothing.
    for _ in 0..100 {
        if approval(&env, id)["status"] == "denied" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = approval(&env, id);
    assert_eq!(r["status"], "denied", "{r}");
    let (_, err, ok) = cli(&env, &["approve", &id.to_string()]);
    assert!(!ok && err.contains("already denied"), "{err}");
    let row = env
        .pg
        .app_superuser_sql("SELECT state FROM orders WHERE id = 1")
        .unwrap();
    assert_eq!(row.trim(), "new", "the held write ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_signing_key_is_picked_up_and_a_foreign_key_is_not() {
    let env = Env::start(None);
    let alice = env.idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let (_, err, ok) = env.psql(&env.main, &alice, "SELECT 1");
    assert!(ok, "{err}\n{}", env.context());
    let fetches = |env: &Env| {
        env.metric("portcullis_identity_jwks_fetches_total{target=\"main\"}")
            .unwrap_or(0.0)
    };
    let before = fetches(&env);

    // The IdP rotates: the old key is gone, and what it issues now carries a new `kid`.
    let kids = env.idp.rotate_keys(false).unwrap();
    let bob = env.idp.mint("bob", &["analysts"], "portcullis").unwrap();
    let (out, err, ok) = env.psql(&env.main, &bob, "SELECT current_user");
    assert!(ok, "a token under the new key: {err}\n{}", env.context());
    assert_eq!(out, "reader");
    assert!(fetches(&env) > before, "the new kid refetched the JWKS");
    env.wait_no_sessions("psql left");

    // A key the IdP never published: its own kid is unknown even after a refetch, and the
    // IdP's kid on a foreign signature does not make it valid.
    let foreign_idp = Idp::start().expect("a second IdP, for a foreign key");
    let forge = |header: Value| {
        foreign_idp
            .mint_with(json!({
                "header": header,
                "claims": {"sub": "alice", "groups": ["dba"], "aud": "pg-direct",
                           "iss": env.idp.issuer()},
            }))
            .unwrap()
    };
    let (_, err, ok) = env.psql(&env.direct, &forge(json!({})), "SELECT 1");
    assert!(!ok);
    assert!(err.contains("is not in the IdP's JWKS"), "{err}");
    let (_, err, ok) = env.psql(&env.direct, &forge(json!({"kid": kids[0]})), "SELECT 1");
    assert!(!ok);
    assert!(err.contains("signature is invalid"), "{err}");
    // And the real key still validates on the same target.
    let real = env.idp.mint("alice", &["dba"], "pg-direct").unwrap();
    let (_, err, ok) = env.psql(&env.direct, &real, "SELECT 1");
    assert!(ok, "{err}\n{}", env.context());
}

/// The host's first non-loopback IPv4 address, where one exists.
fn non_loopback_ipv4() -> Option<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let cidr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?;
    Some(cidr.split('/').next()?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_a_token_as_the_password_travels_only_over_the_local_tls_leg() {
    let Some(ip) = non_loopback_ipv4() else {
        eprintln!("SKIPPED off_loopback_...: this host has no non-loopback IPv4 address");
        return;
    };
    let port = free_port();
    let env = Env::start_with(
        None,
        |_, _| format!("[[listener]]\nlisten = \"{ip}:{port}\"\ntarget = \"main\"\n"),
        None,
        "",
    );
    let ca = env.gw.state_dir.join("local-ca/ca.pem");
    let alice = env.idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let dsn = |mode: &str| {
        format!(
            "host=db.internal hostaddr={ip} port={port} user=agent dbname=app sslmode={mode} \
             sslrootcert={}",
            ca.display()
        )
    };

    // verify-full against the certificate the local CA minted for db.internal: the token is
    // asked for, and the session is alice's.
    let (out, err, ok) = psql_dsn(
        env.pg.bindir(),
        &dsn("verify-full"),
        &alice,
        "SELECT current_user",
    );
    assert!(ok, "{err}\n{}", env.context());
    assert_eq!(out, "reader");
    assert!(
        env.gw.log_shows("client_tls=true", Duration::from_secs(5)),
        "{}",
        env.context()
    );

    // The same client in plaintext, off loopback: refused without being asked for its token.
    let (_, err, ok) = psql_dsn(env.pg.bindir(), &dsn("disable"), &alice, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("neither loopback nor TLS"), "{err}");
    // A client that trusts no CA but its own does not get to send it to an impostor either:
    // verify-full against a name the CA never minted fails before any password.
    let wrong = dsn("verify-full").replace("host=db.internal", "host=other.internal");
    let (_, err, ok) = psql_dsn(env.pg.bindir(), &wrong, &alice, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("does not match host name"), "{err}");
    assert!(
        !env.gw.log().contains(&alice),
        "the token is in the gateway log"
    );
}

#[test]
fn an_agent_acting_for_a_person_is_the_actor_and_the_person_the_subject() {
    if testkit::skip_unless_root(
        "an_agent_acting_for_a_person_is_the_actor_and_the_person_the_subject",
    ) {
        return;
    }
    // Target `main` takes delegation: claude's token file is the actor, and a person's token in
    // the password is the subject.
    let env = Env::redirected_with("delegate", claude_token_file, "delegation = true");
    let dora = env.idp.mint("dora", &["dba"], "portcullis").unwrap();
    let write = "INSERT INTO orders VALUES (3, 'via-agent')";

    // For dora: her role (dba_login), her subject, claude as the actor, seen while it runs.
    let session = {
        let (pin, root) = env.redirect.clone().unwrap();
        let (port, bindir, dora) = (env.pg.port, env.pg.bindir().to_owned(), dora.clone());
        std::thread::spawn(move || {
            Command::new(testkit::portcullis_bin())
                .args(["run", "--agent", "claude", "--pin-path"])
                .arg(pin)
                .arg("--agent-root")
                .arg(root)
                .arg("--")
                .arg(bindir.join("psql"))
                .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c"])
                .arg("SELECT current_user, pg_sleep(3)")
                .arg(format!(
                    "host=127.0.0.1 port={port} user=agent dbname=app sslmode=disable"
                ))
                .env("PGPASSWORD", dora)
                .output()
                .unwrap()
        })
    };
    let mut seen = None;
    for _ in 0..100 {
        if let Some(s) = env
            .sessions()
            .0
            .into_iter()
            .find(|s| s["subject"] == "dora")
        {
            seen = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = seen.unwrap_or_else(|| panic!("no session for dora\n{}", env.context()));
    assert_eq!(seen["actors"], json!(["claude-agent"]), "{seen}");
    assert_eq!(seen["agent"], "claude", "{seen}");
    assert_eq!(seen["groups"], json!(["dba"]), "{seen}");
    let out = session.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("dba_login|"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Policy by actor: dora may write, but not through claude.
    let (_, err, ok) = env.agent_psql("claude", &dora, write);
    assert!(!ok);
    assert!(err.contains("no-writes-through-claude"), "{err}");
    // dora herself, from an agent without a token file: no actor, and her write goes through.
    let (_, err, ok) = env.agent_psql("codex", &dora, write);
    assert!(ok, "{err}");

    // libpq sends no empty password: asked for one, psql without a person's token gives up at
    // the client, and nothing reaches upstream as claude alone.
    let (out, err, ok) = env.agent_psql("claude", "", "SELECT current_user");
    assert!(!ok && err.contains("no password supplied"), "{out}{err}");

    // What an agent would try: a made-up or expired person's token is refused, never taken for
    // claude acting alone.
    let expired = env
        .idp
        .mint_with(json!({"claims": {"sub": "dora", "groups": ["dba"], "exp": 1_000_000}}))
        .unwrap();
    for (what, token) in [("garbage", "not-a-token"), ("expired", expired.as_str())] {
        let (out, err, ok) = env.agent_psql("claude", token, "SELECT current_user");
        assert!(!ok, "{what}: connected as {out}");
        assert!(
            err.contains("subject_token") || err.contains("IdP refused"),
            "{what}: {err}"
        );
    }
    // Claude cannot claim the actor role for another agent's file, nor escape it: the actor is
    // whatever its own file says, whoever it names as the subject.
    let codex = env.idp.mint("codex-agent", &["dba"], "portcullis").unwrap();
    let (_, err, ok) = env.agent_psql("claude", &codex, write);
    assert!(!ok && err.contains("no-writes-through-claude"), "{err}");
    let log = env.gw.log();
    for t in [&dora, &codex, &expired] {
        assert!(!log.contains(t.as_str()), "a token is in the gateway log");
    }
}

#[test]
fn run_and_attach_give_an_agent_its_token_file_at_runtime() {
    if testkit::skip_unless_root("run_and_attach_give_an_agent_its_token_file_at_runtime") {
        return;
    }
    let env = Env::redirected("runtime", claude_token_file);
    let gemini = env
        .idp
        .mint("gemini-agent", &["dba"], "portcullis")
        .unwrap();
    let file = testkit::write_secret(env.dir.path(), "gemini.jwt", &gemini).unwrap();
    let file_arg = file.display().to_string();
    let alice = env.idp.mint("alice", &["analysts"], "portcullis").unwrap();

    // `run --token-file`: gemini is who its file says (dba), not the password it carries (alice).
    let (out, err, ok) = env.agent_psql_with(
        "gemini",
        &["--token-file", &file_arg],
        &alice,
        "SELECT current_user",
    );
    assert!(ok, "{err}\n{}", env.context());
    assert_eq!(out, "dba_login");
    // Gone with the run: the next gemini without --token-file is asked for its token again.
    let (out, err, ok) = env.agent_psql("gemini", &alice, "SELECT current_user");
    assert!(ok, "{err}");
    assert_eq!(out, "reader");

    // What an agent's operator would try. A runtime file cannot replace a configured one, and
    // the command does not start when the gateway refuses.
    let (out, err, ok) = env.agent_psql_with(
        "claude",
        &["--token-file", &file_arg],
        &alice,
        "SELECT 'started'",
    );
    assert!(!ok && !out.contains("started"), "{out}");
    assert!(err.contains("in the configuration"), "{err}");
    // Nor without a gateway to take it: never an agent run without the identity it was given.
    let (out, err, ok) = env.agent_psql_with(
        "gemini",
        &[
            "--token-file",
            &file_arg,
            "--admin-socket",
            "/nonexistent/admin.sock",
        ],
        &alice,
        "SELECT 'started'",
    );
    assert!(!ok && !out.contains("started"), "{out}");
    assert!(err.contains("no gateway is running"), "{err}");
    // A relative path, written straight to the admin socket, is refused.
    let relative = portcullis::admin::client::call(
        &env.gw.admin_socket,
        &portcullis::admin::Request::SetTokenFile {
            agent: "gemini".into(),
            token_file: Some("gemini.jwt".into()),
        },
    )
    .unwrap_err();
    assert!(relative.to_string().contains("absolute"), "{relative}");
    // A user outside the admin group cannot set one at all.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(testkit::portcullis_bin())
        .args([
            "agents",
            "attach",
            "/nonexistent",
            "--token-file",
            &file_arg,
        ])
        .arg("--admin-socket")
        .arg(&env.gw.admin_socket)
        .output()
        .unwrap();
    assert!(!out.status.success());

    // `agents attach --token-file`: a cgroup made elsewhere, placed under interception by name.
    let mount = portcullis::redirect::find_cgroup2_mount().unwrap();
    let cgroup = mount.join(format!("portcullis-attach-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).unwrap();
    let (pin, root) = env.redirect.clone().unwrap();
    let attach = Command::new(testkit::portcullis_bin())
        .args(["agents", "attach"])
        .arg(&cgroup)
        .args(["--name", "hermes", "--token-file", &file_arg, "--pin-path"])
        .arg(&pin)
        .arg("--agent-root")
        .arg(&root)
        .arg("--admin-socket")
        .arg(&env.gw.admin_socket)
        .output()
        .unwrap();
    assert!(
        attach.status.success(),
        "{}",
        String::from_utf8_lossy(&attach.stderr)
    );
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} -X -At -v ON_ERROR_STOP=1 -c 'SELECT current_user' \
         'host=127.0.0.1 port={} user=agent dbname=app sslmode=disable'",
        cgroup.display(),
        env.pg.bindir().join("psql").display(),
        env.pg.port
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .env("PGPASSWORD", &alice)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&cgroup);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "dba_login",
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.context()
    );
    assert!(
        env.gw
            .log_shows("agent token file set", Duration::from_secs(5)),
        "{}",
        env.context()
    );
    assert!(
        !env.gw.log().contains(gemini.as_str()),
        "the token is in the log"
    );
}

/// `portcullis agents` (table and JSON) with this gateway's redirect locations and admin socket.
fn agents_listing(env: &Env, json: bool) -> String {
    let (pin, root) = env.redirect.as_ref().expect("started with the redirect");
    let out = Command::new(testkit::portcullis_bin())
        .arg("agents")
        .args(json.then_some("--json"))
        .arg("--pin-path")
        .arg(pin)
        .arg("--agent-root")
        .arg(root)
        .arg("--admin-socket")
        .arg(&env.gw.admin_socket)
        .output()
        .expect("portcullis agents");
    assert!(
        out.status.success(),
        "agents: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn listed<'a>(agents: &'a Value, name: &str) -> &'a Value {
    agents
        .as_array()
        .expect("a JSON array")
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("agent {name} not listed: {agents}"))
}

#[test]
fn agents_lists_configured_and_runtime_token_files() {
    if testkit::skip_unless_root("agents_lists_configured_and_runtime_token_files") {
        return;
    }
    let env = Env::redirected("listing", claude_token_file);
    let (pin, root) = env.redirect.clone().unwrap();
    let claude_file = env.dir.path().join("claude.jwt").display().to_string();
    let gemini = env
        .idp
        .mint("gemini-agent", &["dba"], "portcullis")
        .unwrap();
    let gemini_file = testkit::write_secret(env.dir.path(), "gemini.jwt", &gemini)
        .unwrap()
        .display()
        .to_string();

    // Before any run: claude's configured file, though claude has no cgroup yet.
    let agents: Value = serde_json::from_str(&agents_listing(&env, true)).unwrap();
    let claude = listed(&agents, "claude");
    assert_eq!(claude["token_file"], claude_file.as_str(), "{agents}");
    assert_eq!(claude["token_file_source"], "configured", "{agents}");
    assert_eq!(claude["path"], Value::Null, "{agents}");
    assert!(
        !agents.to_string().contains("gemini"),
        "gemini listed before its run: {agents}"
    );

    // During `run --token-file`: the listing, run as the agent itself, shows its runtime file.
    let out = Command::new(testkit::portcullis_bin())
        .args(["run", "--agent", "gemini", "--pin-path"])
        .arg(&pin)
        .arg("--agent-root")
        .arg(&root)
        .args(["--token-file", &gemini_file, "--admin-socket"])
        .arg(&env.gw.admin_socket)
        .arg("--")
        .arg(testkit::portcullis_bin())
        .args(["agents", "--json", "--pin-path"])
        .arg(&pin)
        .arg("--agent-root")
        .arg(&root)
        .arg("--admin-socket")
        .arg(&env.gw.admin_socket)
        .output()
        .expect("portcullis run");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.context()
    );
    let during: Value = serde_json::from_slice(&out.stdout).unwrap();
    let g = listed(&during, "gemini");
    assert_eq!(g["token_file"], gemini_file.as_str(), "{during}");
    assert_eq!(g["token_file_source"], "runtime", "{during}");
    assert_eq!(
        g["processes"], 1,
        "the listing itself runs as gemini: {during}"
    );
    assert_eq!(listed(&during, "claude")["token_file_source"], "configured");

    // Gone with the run.
    let after: Value = serde_json::from_str(&agents_listing(&env, true)).unwrap();
    assert!(
        after
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["name"] != "gemini" || a["token_file"].is_null()),
        "gemini's runtime file outlived its run: {after}"
    );

    // `agents attach --token-file`: the attached cgroup, and its runtime file, until the gateway
    // stops.
    let mount = portcullis::redirect::find_cgroup2_mount().unwrap();
    let cgroup = mount.join(format!("portcullis-listing-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).unwrap();
    let attach = Command::new(testkit::portcullis_bin())
        .args(["agents", "attach"])
        .arg(&cgroup)
        .args([
            "--name",
            "hermes",
            "--token-file",
            &gemini_file,
            "--pin-path",
        ])
        .arg(&pin)
        .arg("--agent-root")
        .arg(&root)
        .arg("--admin-socket")
        .arg(&env.gw.admin_socket)
        .output()
        .unwrap();
    assert!(
        attach.status.success(),
        "{}",
        String::from_utf8_lossy(&attach.stderr)
    );
    let agents: Value = serde_json::from_str(&agents_listing(&env, true)).unwrap();
    let table = agents_listing(&env, false);
    let _ = std::fs::remove_dir(&cgroup);
    let hermes = listed(&agents, "hermes");
    assert_eq!(hermes["attached"], true, "{agents}");
    assert_eq!(hermes["path"], cgroup.display().to_string(), "{agents}");
    assert_eq!(hermes["token_file"], gemini_file.as_str(), "{agents}");
    assert_eq!(hermes["token_file_source"], "runtime", "{agents}");

    assert!(table.contains("TOKEN FILE"), "{table}");
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
            .to_owned()
    };
    assert!(
        line("hermes").ends_with(&format!("{gemini_file} (runtime)")),
        "{table}"
    );
    assert!(line("hermes").contains("(attached)"), "{table}");
    assert!(
        line("claude").ends_with(&format!("{claude_file} (configured)")),
        "{table}"
    );

    // Paths only: never a token.
    let claude_token = std::fs::read_to_string(&claude_file).unwrap();
    for text in [table, agents.to_string(), during.to_string()] {
        assert!(!text.contains(gemini.as_str()), "a token is listed: {text}");
        assert!(
            !text.contains(claude_token.trim()),
            "a token is listed: {text}"
        );
    }
}
