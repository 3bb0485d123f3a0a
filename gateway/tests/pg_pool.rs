//! Warm upstream connections (`[target.pool] enabled = true`), end to end: a real PostgreSQL, the
//! real gateway with the shipped default policy (masking on; one rule added ahead of it so that
//! the tests may create the state they check), one I/O worker so that sequential sessions meet
//! the same pool, and real clients (tokio-postgres, psql, raw protocol).
//!
//! Each isolation test leaves session state behind on a connection, proves the next session got
//! the same backend, and checks the state is gone: it fails if the reset is skipped.

use std::path::Path;
use std::time::Duration;

use testkit::wire::{self, RawConn};
use testkit::{Endpoint, Gateway, GatewayOptions, Harness, Mode, Postgres, free_port};
use tokio_postgres::{Client, NoTls};

/// The shipped default policy with writes and DDL allowed ahead of its own rules: temporary
/// tables, COPY and INSERT are what the tests leave behind.
fn policy(dir: &Path) -> std::path::PathBuf {
    let default = include_str!("../src/policy/builtin/default.toml");
    let at = default
        .find("[[rules]]\nname = \"no-ddl\"")
        .expect("the default policy has its no-ddl rule");
    let text = format!(
        "{}[[rules]]\nname = \"pool-tests\"\nkinds = [\"ddl\", \"write\"]\naction = \"allow\"\n\n{}",
        &default[..at],
        &default[at..]
    );
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

struct Env {
    h: Harness,
    _dir: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        Env::start_with("[target.pool]\nenabled = true\n", "1")
    }

    /// A target that keeps at most `max` upstream connections, sessions waiting up to `queue`
    /// for one.
    fn capped(max: u32, queue: &str, pooling: bool, workers: &str) -> Env {
        Env::start_with(
            &format!(
                "max_upstream_connections = {max}\nupstream_queue_timeout = \"{queue}\"\n\n\
                 [target.pool]\nenabled = {pooling}\n"
            ),
            workers,
        )
    }

    /// `target_toml` goes at the end of the `[[target]]` table; `workers` I/O workers.
    fn start_with(target_toml: &str, workers: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy(dir.path());
        let h = Harness::builder()
            .mode(Mode::Gateway)
            .target_toml(target_toml)
            .gateway_arg("--workers")
            .gateway_arg(workers)
            .gateway_arg("--policy")
            .gateway_arg(policy.to_str().unwrap())
            .start()
            .expect("start PostgreSQL and the gateway");
        h.pg.app_superuser_sql("CREATE TABLE pool_t (x int); GRANT ALL ON pool_t TO app")
            .unwrap();
        Env { h, _dir: dir }
    }

    fn ep(&self) -> Endpoint {
        self.h.endpoint()
    }

    async fn connect(&self) -> Client {
        self.h
            .must(self.ep().connect().await, "connect through the gateway")
    }

    /// Ends `c` and waits until the gateway has no session left: its connection is back in the
    /// pool (or closed).
    async fn end(&self, c: Client) {
        drop(c);
        settle(self.h.gw());
    }
}

/// Waits until `portcullis sessions` lists none.
fn settle(gw: &Gateway) {
    if let Err(live) = gw.wait_sessions_gone(|_| true, Duration::from_secs(20)) {
        panic!(
            "sessions still live after 20 s: {live}\n{}",
            gw.log_tail(30)
        );
    }
}

/// After a session that ended mid-COPY: the next session gets another backend, and the COPY's
/// rows never landed.
async fn assert_copy_left_nothing(env: &Env, old_pid: i32, reused: &str) {
    settle(env.h.gw());
    let c = env.connect().await;
    assert_ne!(pid(&c).await, old_pid, "{reused}");
    let n: i64 = c
        .query_one("SELECT count(*) FROM pool_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// Target `main` as `portcullis status --json` reports it.
fn main_target(gw: &Gateway) -> serde_json::Value {
    let out = gw.cli(&["status", "--json"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    status["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == "main")
        .unwrap_or_else(|| panic!("no target main in {status:#}"))
        .clone()
}

/// The pool's counters for target `main`: `idle`, `reused`, `dialed`, `dialed_ahead` and
/// `closed` by reason, beside `enabled` (0 or 1).
fn pool(gw: &Gateway) -> serde_json::Value {
    let main = main_target(gw);
    let mut pool = main["pool"].clone();
    pool["enabled"] = u64::from(main["pool_enabled"].as_bool().unwrap()).into();
    pool
}

/// Asserts the pool's counters: `want` as (field, value), `closed.REASON` for a close reason.
/// Every reason not named must be 0.
fn assert_pool(gw: &Gateway, want: &[(&str, u64)]) {
    let pool = pool(gw);
    for (field, value) in want {
        let got = match field.strip_prefix("closed.") {
            Some(reason) => &pool["closed"][reason],
            None => &pool[*field],
        };
        assert_eq!(got.as_u64(), Some(*value), "{field} in {pool:#}");
    }
    for (reason, n) in pool["closed"].as_object().unwrap() {
        if !want
            .iter()
            .any(|(f, _)| f.strip_prefix("closed.") == Some(reason))
        {
            assert_eq!(n.as_u64(), Some(0), "closed.{reason} in {pool:#}");
        }
    }
}

async fn pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pg_backend_pid")
        .get(0)
}

async fn text(c: &Client, sql: &str) -> Option<String> {
    c.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_sessions_reuse_one_backend_with_their_own_parameters() {
    let env = Env::start();
    let mut cfg = env.ep().pg_config();
    cfg.application_name("first-agent");
    let (a, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let first = pid(&a).await;
    assert_eq!(
        text(&a, "SHOW application_name").await.as_deref(),
        Some("first-agent")
    );
    let out = env.h.gw().cli(&["sessions", "--json"]).unwrap();
    let live: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(live[0]["backend_pid"].as_i64(), Some(i64::from(first)));
    assert_eq!(
        live[0]["upstream_reused"], false,
        "the first session dialled"
    );
    env.end(a).await;
    assert_pool(
        env.h.gw(),
        &[("enabled", 1), ("idle", 1), ("dialed", 1), ("reused", 0)],
    );

    // A raw client: its startup answer must carry its own application_name and a cancel key.
    let mut raw = RawConn::to(&env.ep()).unwrap();
    raw.startup(&env.ep(), wire::PROTOCOL_3_0).unwrap();
    assert_eq!(
        raw.parameters.get("application_name").map(String::as_str),
        Some("portcullis-raw-test"),
        "the reused connection's ParameterStatus"
    );
    assert!(raw.parameters.contains_key("server_version"));
    let (gw_pid, _) = raw.backend_key.clone().expect("BackendKeyData");
    let rows = raw.simple_query("SELECT pg_backend_pid()").unwrap();
    let backend: i32 = RawConn::first_column(&rows)[0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(backend, first, "the raw session reused the connection");
    // The operator can tie the session to its row in pg_stat_activity, where every agent shows
    // the gateway's address.
    let out = env.h.gw().cli(&["sessions", "--json"]).unwrap();
    let live: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(live.len(), 1, "{live:#?}");
    assert_eq!(live[0]["backend_pid"].as_i64(), Some(i64::from(first)));
    assert_eq!(live[0]["upstream_reused"], true);
    let out = env.h.gw().cli(&["sessions"]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|row| row.split_whitespace().any(|cell| cell == first.to_string())),
        "the sessions table shows backend {first}:\n{table}"
    );
    assert_ne!(
        gw_pid as i32, backend,
        "the client sees the gateway's key, not the backend's"
    );
    let rows = raw.simple_query("SHOW application_name").unwrap();
    assert_eq!(
        RawConn::first_column(&rows),
        [Some("portcullis-raw-test".to_owned())]
    );
    raw.send(&wire::terminate()).unwrap();
    drop(raw);
    settle(env.h.gw());

    // psql, too.
    let out = env
        .ep()
        .psql(
            env.h.bindir(),
            "SELECT pg_backend_pid(), current_setting('application_name')",
        )
        .unwrap();
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), format!("{first}|psql"));
    settle(env.h.gw());
    assert_pool(
        env.h.gw(),
        &[
            ("idle", 1),
            ("dialed", 1),
            ("reused", 2),
            ("dialed_ahead", 0),
        ],
    );
    let out = env.h.gw().cli(&["status"]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("main ") && l.contains(" on "))
        .unwrap_or_else(|| panic!("no pool row for main in:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells, ["main", "on", "1", "2", "1", "0", "-"], "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_tables_do_not_survive_reuse() {
    let env = Env::start();
    let a = env.connect().await;
    a.batch_execute("CREATE TEMP TABLE leftover (secret text); INSERT INTO leftover VALUES ('x')")
        .await
        .unwrap();
    let (_, b) = reused_after_end(&env, a).await;
    assert_eq!(
        text(&b, "SELECT to_regclass('pg_temp.leftover')::text").await,
        None,
        "the previous session's temporary table is visible"
    );
}

/// Ends `a`, then opens the next session and checks it has `a`'s backend.
async fn reused_after_end(env: &Env, a: Client) -> (i32, Client) {
    let before = pid(&a).await;
    env.end(a).await;
    let b = env.connect().await;
    let after = pid(&b).await;
    assert_eq!(
        after,
        before,
        "the second session did not reuse the first one's connection\n{}",
        env.h.context()
    );
    (after, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_do_not_survive_reuse() {
    let env = Env::start();
    let a = env.connect().await;
    a.batch_execute("PREPARE leftover AS SELECT 42")
        .await
        .unwrap();
    let (_, b) = reused_after_end(&env, a).await;
    let n: i64 = b
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE name = 'leftover'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the previous session's prepared statement is visible");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_do_not_survive_reuse() {
    let env = Env::start();
    let a = env.connect().await;
    a.batch_execute("SET work_mem = '7MB'; SET DateStyle = 'German'")
        .await
        .unwrap();
    let (_, b) = reused_after_end(&env, a).await;
    assert_eq!(text(&b, "SHOW work_mem").await.as_deref(), Some("4MB"));
    assert_eq!(
        text(&b, "SHOW DateStyle").await.as_deref(),
        Some("ISO, MDY")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_locks_do_not_survive_reuse() {
    let env = Env::start();
    let a = env.connect().await;
    a.batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    let (_, b) = reused_after_end(&env, a).await;
    let held = env
        .h
        .pg
        .superuser_sql(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND granted",
        )
        .unwrap();
    assert_eq!(
        held.trim(),
        "0",
        "the previous session's advisory lock is held"
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_does_not_survive_reuse() {
    let env = Env::start();
    let a = env.connect().await;
    a.batch_execute("LISTEN leftover").await.unwrap();
    let (_, b) = reused_after_end(&env, a).await;
    let n: i64 = b
        .query_one("SELECT count(*) FROM pg_listening_channels()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the previous session still listens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_left_open_by_a_dying_client_is_rolled_back() {
    let env = Env::start();
    let ep = env.ep();
    let backend = |raw: &mut RawConn| -> String {
        let rows = raw.simple_query("SELECT pg_backend_pid()").unwrap();
        RawConn::first_column(&rows)[0].clone().unwrap()
    };
    let mut raw = RawConn::to(&ep).unwrap();
    raw.startup(&ep, wire::PROTOCOL_3_0).unwrap();
    let dead = backend(&mut raw);
    raw.simple_query("BEGIN").unwrap();
    let done = raw.simple_query("INSERT INTO pool_t VALUES (1)").unwrap();
    assert!(done.iter().all(|m| !m.is_error()), "the insert ran");
    // The client dies: no Terminate, no COMMIT.
    drop(raw);
    settle(env.h.gw());

    // The next client with the same startup parameters (the pool's key) gets that backend, with
    // the transaction rolled back: DISCARD ALL alone would fail inside it, and the connection
    // would be closed instead.
    let mut next = RawConn::to(&ep).unwrap();
    next.startup(&ep, wire::PROTOCOL_3_0).unwrap();
    assert_eq!(
        backend(&mut next),
        dead,
        "the dying client's connection was not reused\n{}",
        env.h.context()
    );
    let rows = next.simple_query("SELECT count(*) FROM pool_t").unwrap();
    assert_eq!(
        RawConn::first_column(&rows),
        [Some("0".to_owned())],
        "the dead client's insert is visible: its transaction was not rolled back"
    );
    let own = next
        .simple_query("BEGIN; INSERT INTO pool_t VALUES (2); COMMIT")
        .unwrap();
    assert!(
        own.iter().all(|m| !m.is_error()),
        "a transaction of its own: {:?}",
        own.iter().map(|m| m.describe()).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_killed_mid_copy_is_not_reused() {
    let env = Env::start();
    let ep = env.ep();
    let mut raw = RawConn::to(&ep).unwrap();
    raw.startup(&ep, wire::PROTOCOL_3_0).unwrap();
    let rows = raw.simple_query("SELECT pg_backend_pid()").unwrap();
    let before: i32 = RawConn::first_column(&rows)[0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    raw.send(&wire::query("COPY pool_t FROM STDIN")).unwrap();
    let m = raw.read_message().unwrap().expect("CopyInResponse");
    assert_eq!(m.tag, b'G', "{}", m.describe());
    raw.send(&wire::frontend(b'd', b"1\n2\n")).unwrap();
    drop(raw);
    assert_copy_left_nothing(&env, before, "a connection left mid-COPY was reused").await;
    let gone = env
        .h
        .pg
        .superuser_sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {before}"
        ))
        .unwrap();
    let gone = gone.trim() == "0" || {
        std::thread::sleep(Duration::from_secs(1));
        env.h
            .pg
            .superuser_sql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = {before}"
            ))
            .unwrap()
            .trim()
            == "0"
    };
    assert!(gone, "the backend left mid-COPY still runs");
    settle(env.h.gw());

    // An operator kills a session in the middle of its COPY: its connection is not reused
    // either.
    let mut raw = RawConn::to(&ep).unwrap();
    raw.startup(&ep, wire::PROTOCOL_3_0).unwrap();
    let rows = raw.simple_query("SELECT pg_backend_pid()").unwrap();
    let killed: i32 = RawConn::first_column(&rows)[0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    raw.send(&wire::query("COPY pool_t FROM STDIN")).unwrap();
    let m = raw.read_message().unwrap().expect("CopyInResponse");
    assert_eq!(m.tag, b'G', "{}", m.describe());
    raw.send(&wire::frontend(b'd', b"3\n")).unwrap();
    let out = env.h.gw().cli(&["sessions", "--json"]).unwrap();
    let live: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let id = live[0]["id"]
        .as_u64()
        .expect("the session's id")
        .to_string();
    let out = env
        .h
        .gw()
        .cli(&["sessions", "kill", "--session", &id])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let heard = raw.read_until_closed().unwrap();
    assert!(
        heard
            .iter()
            .any(|m| m.sqlstate().as_deref() == Some("57P01"))
    );
    assert_copy_left_nothing(&env, killed, "a connection killed mid-COPY was reused").await;
    assert_pool(env.h.gw(), &[("closed.not_at_rest", 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_a_reused_connection_reaches_its_own_backend_only() {
    let env = Env::start();
    let a = env.connect().await;
    let stale = a.cancel_token();
    let (_, b) = reused_after_end(&env, a).await;
    let other = env.connect().await;
    let other_pid = pid(&other).await;
    let b_token = b.cancel_token();
    let sb = tokio::spawn(async move { b.simple_query("SELECT pg_sleep(60) -- b").await });
    let so = tokio::spawn(async move { other.simple_query("SELECT pg_sleep(60) -- o").await });
    env.h
        .pg
        .wait_active("pg_sleep(60) -- b", Duration::from_secs(20))
        .unwrap();
    env.h
        .pg
        .wait_active("pg_sleep(60) -- o", Duration::from_secs(20))
        .unwrap();

    // The previous session's key died with it: it must not cancel the next session's query.
    stale.cancel_query(NoTls).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !sb.is_finished(),
        "a stale cancel key reached the reused connection"
    );

    b_token.cancel_query(NoTls).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), sb)
        .await
        .expect("the cancelled sleep ends")
        .unwrap();
    let err = r.expect_err("the cancelled query fails");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("57014"));
    assert!(!so.is_finished(), "the cancel reached another backend");
    let still = env
        .h
        .pg
        .superuser_sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {other_pid} AND state = 'active'"
        ))
        .unwrap();
    assert_eq!(still.trim(), "1");
    so.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_whose_server_restarted_is_replaced_unseen() {
    let env = Env::start();
    let a = env.connect().await;
    let before = pid(&a).await;
    env.end(a).await;
    env.h.pg.stop().unwrap();
    env.h.pg.start_again().unwrap();
    let b = env
        .ep()
        .connect()
        .await
        .expect("the client never hears of the dead pooled connection");
    assert_ne!(pid(&b).await, before);
    assert_eq!(text(&b, "SELECT 'ok'").await.as_deref(), Some("ok"));
    assert_pool(
        env.h.gw(),
        &[
            ("idle", 0),
            ("reused", 0),
            ("dialed", 2),
            ("closed.gone", 1),
        ],
    );
}

/// With `[target.pool] enabled = false`, every session dials its own connection; a reload turns
/// pooling on without touching the live session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooling_off_by_config_and_on_by_reload() {
    let pg = Postgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let policy = policy(dir.path());
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let body = |enabled: bool| {
        format!(
            "[metrics]\nlisten = \"{metrics}\"\n\n{}\n[target.pool]\nenabled = {enabled}\n",
            testkit::single_target_toml(listen, &pg.url(), &pw)
        )
    };
    let gw = Gateway::start(
        GatewayOptions::with_config(listen, body(false))
            .arg("--workers")
            .arg("1")
            .arg("--policy")
            .arg(policy.display().to_string()),
    )
    .unwrap();
    let ep = Endpoint {
        host: "127.0.0.1".into(),
        port: listen.port(),
        user: "agent".into(),
        password: None,
        dbname: "app".into(),
        params: vec![("sslmode".into(), "disable".into())],
    };
    let a = ep.connect().await.unwrap();
    let first = pid(&a).await;
    drop(a);
    settle(&gw);
    let live = ep.connect().await.unwrap();
    let second = pid(&live).await;
    assert_ne!(
        second, first,
        "pooling is off, yet the connection was reused"
    );
    assert_pool(
        &gw,
        &[("enabled", 0), ("idle", 0), ("reused", 0), ("dialed", 0)],
    );

    let config = gw.config_path.clone().unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("enabled = false", "enabled = true")).unwrap();
    gw.signal(1);
    assert!(
        gw.log_shows("configuration reloaded", Duration::from_secs(10)),
        "no reload: {}",
        gw.log_tail(20)
    );
    assert_eq!(pid(&live).await, second, "the reload kept the live session");
    drop(live);
    settle(&gw);
    let c = ep.connect().await.unwrap();
    let third = pid(&c).await;
    assert_ne!(
        third, second,
        "a session that began with pooling off keeps it off to its end"
    );
    drop(c);
    settle(&gw);
    let d = ep.connect().await.unwrap();
    assert_eq!(
        pid(&d).await,
        third,
        "after the reload, connections are reused"
    );
    // The session that began with pooling off, closed at its end, is not the pool's: only the
    // two sessions after the reload count.
    assert_pool(
        &gw,
        &[("enabled", 1), ("idle", 0), ("reused", 1), ("dialed", 1)],
    );
    let scrape = scrape(&metrics);
    for series in [
        r#"portcullis_pool_idle{target="main"} 0"#,
        r#"portcullis_pool_sessions_total{target="main",served="reused"} 1"#,
        r#"portcullis_pool_sessions_total{target="main",served="dialed"} 1"#,
        r#"portcullis_pool_dialed_ahead_total{target="main"} 0"#,
        r#"portcullis_pool_closed_total{target="main",reason="reset_failed"} 0"#,
        r#"portcullis_upstream_longest_wait_seconds{target="main"} 0.0"#,
    ] {
        assert!(
            scrape.lines().any(|l| l == series),
            "{series} not on /metrics:\n{scrape}"
        );
    }
}

/// The body of `GET /metrics` at `addr`.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// A gateway in front of `pg` with pooling on, one I/O worker, identities from `idp` and `roles`
/// (its `[[target.role]]` tables); and its listening address.
fn identity_gateway(
    pg: &Postgres,
    idp: &testkit::idp::Idp,
    dir: &Path,
    roles: &str,
) -> (Gateway, std::net::SocketAddr) {
    let pw = pg.write_password_file(dir).unwrap();
    let policy = policy(dir);
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        r#"{base}
[target.pool]
enabled = true

[target.identity]
issuer = "{issuer}"
audience = "pg-main"
client_id = "portcullis"
client_secret_file = "{secret}"
{roles}"#,
        base = testkit::single_target_toml(listen, &pg.url(), &pw),
        issuer = idp.issuer(),
        secret = idp.client_secret_file().display(),
    );
    let gw = Gateway::start(
        GatewayOptions::with_config(listen, config)
            .arg("--workers")
            .arg("1")
            .arg("--policy")
            .arg(policy.display().to_string()),
    )
    .expect("start the gateway");
    (gw, listen)
}

/// Sessions whose identities map to different upstream roles never share a connection: one
/// mapped to `SET ROLE reader` on the target's login, one to its own login. Each reuses its own,
/// and the mapped role is set again after the reset (which returns to the login's role).
#[test]
fn different_upstream_roles_never_share_a_connection() {
    use testkit::idp::Idp;
    let pg = Postgres::start().unwrap();
    pg.superuser_sql(
        "CREATE ROLE reader NOLOGIN; GRANT reader TO app; \
         CREATE ROLE dba_login LOGIN PASSWORD 'dba-login-pw'",
    )
    .unwrap();
    let idp = Idp::start().expect("start the test IdP (cargo xtask setup installs it)");
    let dir = tempfile::tempdir().unwrap();
    let dba_pw = testkit::write_secret(dir.path(), "dba.pw", "dba-login-pw").unwrap();
    let roles = format!(
        r#"
[[target.role]]
groups = ["dba"]
user = "dba_login"
password_file = "{dba_pw}"

[[target.role]]
groups = ["analysts"]
set_role = "reader"
"#,
        dba_pw = dba_pw.display(),
    );
    let (gw, listen) = identity_gateway(&pg, &idp, dir.path(), &roles);
    let analyst = idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let dba = idp.mint("dora", &["dba"], "portcullis").unwrap();
    let who = |token: &str| {
        let (host, port) = (listen.ip(), listen.port());
        let stdout = psql_as(
            &pg,
            &gw,
            &format!("host={host} port={port} user=agent dbname=app sslmode=disable"),
            "SELECT pg_backend_pid(), current_user, session_user",
            &[("PGPASSWORD", token)],
        );
        settle(&gw);
        let (pid, roles) = stdout.trim().split_once('|').unwrap();
        (pid.to_owned(), roles.to_owned())
    };
    let (a1, roles) = who(&analyst);
    assert_eq!(roles, "reader|app");
    let (d1, roles) = who(&dba);
    assert_eq!(roles, "dba_login|dba_login");
    assert_ne!(a1, d1, "sessions of different roles shared a connection");
    let (a2, roles) = who(&analyst);
    assert_eq!(
        roles, "reader|app",
        "the mapped role is set again after the reset"
    );
    assert_eq!(a2, a1, "the analyst's connection was reused");
    let (d2, roles) = who(&dba);
    assert_eq!(roles, "dba_login|dba_login");
    assert_eq!(d2, d1, "the dba's connection was reused");
}

/// A connection whose reset fails is closed, never reused: a session mapped to `SET ROLE reader`
/// ends after its login lost `reader`, so the reset's `SET ROLE reader` is refused. Were the
/// refusal ignored, the next analyst would get a connection left at the login's own role, with
/// more rights than the mapping gives. It gets a fresh backend at `reader` instead.
#[test]
fn a_connection_whose_reset_fails_is_closed_not_reused() {
    use testkit::idp::Idp;
    let pg = Postgres::start().unwrap();
    pg.superuser_sql("CREATE ROLE reader NOLOGIN; GRANT reader TO app")
        .unwrap();
    let idp = Idp::start().expect("start the test IdP (cargo xtask setup installs it)");
    let dir = tempfile::tempdir().unwrap();
    let roles = "[[target.role]]\ngroups = [\"analysts\"]\nset_role = \"reader\"\n";
    let (gw, listen) = identity_gateway(&pg, &idp, dir.path(), roles);
    let token = idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let ep = Endpoint {
        host: "127.0.0.1".into(),
        port: listen.port(),
        user: "agent".into(),
        password: Some(token),
        dbname: "app".into(),
        params: vec![("sslmode".into(), "disable".into())],
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let who = |c: &Client| {
        rt.block_on(async {
            let row = c
                .query_one("SELECT pg_backend_pid(), current_user::text", &[])
                .await
                .unwrap();
            (row.get::<_, i32>(0), row.get::<_, String>(1))
        })
    };

    let a = rt.block_on(ep.connect()).expect("the analyst connects");
    let (first, role) = who(&a);
    assert_eq!(role, "reader");
    pg.superuser_sql("REVOKE reader FROM app").unwrap();
    drop(a);
    settle(&gw);
    let left = |pid: i32| {
        pg.superuser_sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        ))
        .unwrap()
        .trim()
            == "0"
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !left(first) {
        assert!(
            std::time::Instant::now() < deadline,
            "the backend whose reset failed still runs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        gw.log_shows("reset refused: closed, not reused", Duration::from_secs(5)),
        "{}",
        gw.log_tail(20)
    );
    assert_pool(
        &gw,
        &[("idle", 0), ("dialed", 1), ("closed.reset_failed", 1)],
    );

    pg.superuser_sql("GRANT reader TO app").unwrap();
    let b = rt
        .block_on(ep.connect())
        .expect("the analyst connects again");
    let (second, role) = who(&b);
    assert_ne!(second, first);
    assert_eq!(role, "reader", "the next session got the login's own role");
    assert_pool(
        &gw,
        &[("reused", 0), ("dialed", 2), ("closed.reset_failed", 1)],
    );
}

/// psql's `-At` output of `sql` through `conninfo` with `env` set; the test fails, with the
/// gateway's log, when psql does.
fn psql_as(pg: &Postgres, gw: &Gateway, conninfo: &str, sql: &str, env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(pg.bindir().join("psql"))
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, conninfo])
        .envs(env.iter().copied())
        .env("PGCONNECT_TIMEOUT", "30")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_tail(30)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The upstream connections open for target `main` (busy and idle).
fn upstream_open(gw: &Gateway) -> u64 {
    main_target(gw)["upstream_open"].as_u64().unwrap()
}

/// The app login's backends PostgreSQL has now.
fn app_backends(pg: &Postgres) -> u64 {
    pg.superuser_sql(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'",
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}

/// An agent that opens connections in a burst cannot take more than `max_upstream_connections`
/// backends: twelve sessions at once, each holding its backend 0.4 s, through a cap of two and
/// two workers. Every one gets through, two at a time: PostgreSQL never sees a third backend
/// from the gateway, the burst takes at least six rounds of 0.4 s, and the waiting sessions
/// mostly get the two connections handed on rather than dialled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sessions_waits_at_max_upstream_connections() {
    let env = Env::capped(2, "60s", true, "2");
    let started = std::time::Instant::now();
    let sessions: Vec<_> = (0..12)
        .map(|i| {
            let ep = env.ep();
            tokio::spawn(async move {
                let c = ep
                    .connect()
                    .await
                    .expect("the session waits, then connects");
                c.simple_query(&format!("SELECT pg_sleep(0.4) -- {i}"))
                    .await
                    .expect("its statement runs");
            })
        })
        .collect();
    let mut most = (0, 0);
    while !sessions.iter().all(|s| s.is_finished()) {
        most.0 = most.0.max(app_backends(&env.h.pg));
        most.1 = most.1.max(upstream_open(env.h.gw()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in sessions {
        s.await.unwrap();
    }
    let took = started.elapsed();
    assert!(
        most.0 <= 2 && most.1 <= 2,
        "backends {} and upstream connections {} past the cap of 2",
        most.0,
        most.1
    );
    assert!(
        took >= Duration::from_millis(2400),
        "twelve 0.4 s sessions through two places took {took:?}"
    );
    settle(env.h.gw());
    assert!(upstream_open(env.h.gw()) <= 2);
    // A connection released while sessions wait goes to one of them on its worker, reset, not
    // closed and dialled again.
    let pool = pool(env.h.gw());
    assert!(
        pool["reused"].as_u64().unwrap() >= 6,
        "most of the burst should reuse the two connections: {pool:#}"
    );
}

/// At the cap, a session that waits past `upstream_queue_timeout` is refused with 53300 naming
/// the setting, and `status` shows it waiting meanwhile; the session holding the place goes on,
/// and the place serves the next session once it is free. With pooling off, too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_waits_too_long_at_the_cap_is_refused() {
    let env = Env::capped(1, "1s", false, "1");
    let holder = env.connect().await;
    assert_eq!(upstream_open(env.h.gw()), 1);
    let config = env.ep().pg_config();
    let second = tokio::spawn(async move { config.connect(NoTls).await.err() });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let target = main_target(env.h.gw());
    assert_eq!(target["upstream_waiting"], 1, "{target:#}");
    let longest = target["upstream_longest_wait_ms"].as_u64().unwrap();
    assert!(
        (400..1000).contains(&longest),
        "the waiting session has waited {longest} ms"
    );
    let status = env.h.gw().cli(&["status"]).unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("1/1 (1 waiting, longest 0."),
        "portcullis status should show the wait:\n{status}"
    );
    let refused = second
        .await
        .unwrap()
        .expect("a second session past the cap is refused");
    let db = refused.as_db_error().expect("a protocol-level error");
    assert_eq!(db.code().code(), "53300", "{db:?}");
    assert!(
        db.message().contains("max_upstream_connections (1)")
            && db.message().contains("upstream_queue_timeout (1s)"),
        "{}",
        db.message()
    );
    assert_eq!(
        text(&holder, "SELECT 'still here'").await.as_deref(),
        Some("still here")
    );
    env.end(holder).await;
    assert_eq!(
        upstream_open(env.h.gw()),
        0,
        "the closed connection freed its place"
    );
    let next = env.connect().await;
    assert_eq!(text(&next, "SELECT 'next'").await.as_deref(), Some("next"));
}

/// A place held by an idle pooled connection is not lost to a session that cannot use it: a
/// client with other parameters (another pool key) at a cap of one gets its backend after the
/// idle connection is closed for it, on its own worker at once or by the other worker's sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_makes_room_for_a_session_with_another_key() {
    let env = Env::capped(1, "20s", true, "2");
    let a = env.connect().await;
    let first = pid(&a).await;
    env.end(a).await;
    assert_pool(env.h.gw(), &[("idle", 1)]);
    assert_eq!(
        upstream_open(env.h.gw()),
        1,
        "the idle connection keeps its place"
    );

    // psql with PGTZ sends TimeZone: a key the idle connection does not serve.
    let ep = env.ep();
    let stdout = psql_as(
        &env.h.pg,
        env.h.gw(),
        &ep.conninfo(),
        "SELECT pg_backend_pid(), current_setting('TimeZone')",
        &[("PGTZ", "Asia/Tokyo")],
    );
    let (backend, zone) = stdout.trim().split_once('|').unwrap();
    assert_ne!(
        backend,
        first.to_string(),
        "it got the idle connection of another key"
    );
    assert_eq!(zone, "Asia/Tokyo");
    settle(env.h.gw());
    assert_pool(env.h.gw(), &[("closed.shed", 1)]);
    assert!(app_backends(&env.h.pg) <= 1);
}

/// One agent's burst cannot keep another agent out at the cap. Eight sessions of one pool key
/// loop through a cap of two, each released connection handed on to a waiting session of that
/// key on its worker; a session of another key (its own `application_name`) queued behind them
/// has waited longest after a second, and then the next connection released is closed to make
/// room for it. Without that it is refused with 53300 at its queue timeout, the burst's own
/// sessions taking every connection released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_one_key_does_not_starve_another_key_at_the_cap() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let env = Env::capped(2, "5s", true, "2");
    let stop = Arc::new(AtomicBool::new(false));
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let (ep, stop) = (env.ep(), stop.clone());
            tokio::spawn(async move {
                let mut sessions = 0;
                while !stop.load(Ordering::Relaxed) {
                    let c = ep.connect().await.expect("a burst session connects");
                    c.simple_query("SELECT pg_sleep(0.1)")
                        .await
                        .expect("its statement runs");
                    sessions += 1;
                }
                sessions
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let target = main_target(env.h.gw());
    assert!(
        target["upstream_open"] == 2 && target["upstream_waiting"].as_u64().unwrap() > 0,
        "the burst should hold the cap, with sessions waiting: {target:#}"
    );

    let started = std::time::Instant::now();
    let (other, conn) = env
        .ep()
        .pg_config()
        .application_name("other-agent")
        .connect(NoTls)
        .await
        .expect("the other agent's session gets a place before its queue timeout");
    let waited = started.elapsed();
    tokio::spawn(conn);
    assert_eq!(
        text(&other, "SELECT current_setting('application_name')")
            .await
            .as_deref(),
        Some("other-agent")
    );
    stop.store(true, Ordering::Relaxed);
    drop(other);
    let mut total = 0;
    for b in burst {
        total += b.await.unwrap();
    }
    assert!(total >= 8, "the burst ran {total} sessions");
    assert!(
        waited < Duration::from_secs(4),
        "the other agent waited {waited:?}"
    );
    assert!(app_backends(&env.h.pg) <= 2);
}
