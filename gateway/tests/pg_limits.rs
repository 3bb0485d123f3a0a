//! Nothing a peer does can pin the gateway: a silent client meets the startup timeout, an idle
//! session the idle timeout (when set), a held statement's upstream connection ends when its
//! client leaves, and silent admin connections are bounded and timed out.

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use testkit::wire::{PROTOCOL_3_0, RawConn, startup_message};
use testkit::{Gateway, GatewayOptions, Postgres, free_port, single_target_toml};

/// A gateway from a config file; `gateway_keys` go into its `[gateway]` table.
fn start(pg: &Postgres, gateway_keys: &str, policy: Option<&str>) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let body = format!(
        "{gateway_keys}\n{}",
        single_target_toml(listen, &pg.url(), &pw)
    );
    let mut opts = GatewayOptions::with_config(listen, body);
    if let Some(p) = policy {
        opts = opts.arg("--policy").arg(p);
    }
    (Gateway::start(opts).expect("start gateway"), dir)
}

#[test]
fn a_client_that_never_finishes_startup_is_closed() {
    let pg = Postgres::start().unwrap();
    let (gw, _d) = start(&pg, "startup_timeout = \"1s\"", None);
    let mut silent = RawConn::connect("127.0.0.1", gw.listen.port()).unwrap();
    // Half a StartupMessage, then nothing: a slow-loris.
    silent
        .send(&startup_message(PROTOCOL_3_0, &[("user", "a")])[..6])
        .unwrap();
    let heard = silent
        .read_until_closed()
        .expect("the gateway closes it instead of waiting forever");
    let err = heard.iter().find(|m| m.is_error()).expect("a FATAL first");
    assert!(
        err.describe()
            .contains("did not complete startup within 1s"),
        "{}",
        err.describe()
    );
}

#[test]
fn an_idle_session_meets_the_idle_timeout_when_one_is_set() {
    let pg = Postgres::start().unwrap();
    let (gw, _d) = start(&pg, "idle_timeout = \"1s\"", None);
    let mut c = RawConn::connect("127.0.0.1", gw.listen.port()).unwrap();
    c.send(&startup_message(
        PROTOCOL_3_0,
        &[("user", "agent"), ("database", "app")],
    ))
    .unwrap();
    c.read_until_ready().expect("startup");
    let heard = c.read_until_closed().expect("closed when idle");
    let err = heard.iter().find(|m| m.is_error()).expect("a FATAL");
    assert_eq!(
        err.sqlstate().as_deref(),
        Some("57P05"),
        "{}",
        err.describe()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_statements_upstream_connection_ends_when_its_client_leaves() {
    let pg = Postgres::start().unwrap();
    pg.app_superuser_sql("CREATE TABLE t (id int); ALTER TABLE t OWNER TO app;")
        .unwrap();
    let (gw, _d) = start(&pg, "", Some("default"));
    let backends = || {
        pg.superuser_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'",
        )
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap()
    };
    let (client, conn) = tokio_postgres::connect(&gw.conninfo("app"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let held = tokio::spawn(async move {
        let _ = client.simple_query("INSERT INTO t VALUES (1)").await;
    });
    // Held: an approval request is pending and the session's upstream backend is open.
    let mut id = None;
    for _ in 0..300 {
        let out = gw.cli(&["approvals", "--json"]).unwrap();
        let recs: Vec<portcullis::policy::ApprovalRecord> =
            serde_json::from_slice(&out.stdout).unwrap();
        if let Some(r) = recs.iter().find(|r| r.sql.contains("INSERT INTO t")) {
            id = Some(r.id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = id.expect("the INSERT is held");
    assert_eq!(backends(), 1);
    // The agent goes away without a word.
    held.abort();
    driver.abort();
    let _ = held.await;
    let _ = driver.await;
    let mut gone = false;
    for _ in 0..300 {
        if backends() == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "the upstream connection outlived its client:\n{}",
        gw.log_tail(20)
    );
    let out = gw.cli(&["approvals", "--json"]).unwrap();
    let recs: Vec<portcullis::policy::ApprovalRecord> =
        serde_json::from_slice(&out.stdout).unwrap();
    let rec = recs.iter().find(|r| r.id == id).unwrap();
    assert_eq!(
        rec.reason.as_deref(),
        Some("session closed before a decision"),
        "{rec:?}"
    );
}

/// Threads serving admin connections; counted by name, because other threads of the gateway
/// (a blocking pool, lookups) come and go on their own schedule.
fn admin_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == "admin-conn")
        .count()
}

#[test]
fn silent_admin_connections_are_capped_and_timed_out() {
    let pg = Postgres::start().unwrap();
    let (gw, _d) = start(&pg, "", None);
    let mut silent: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&gw.admin_socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let serving = admin_threads(gw.pid());
    assert!(
        (1..=portcullis::admin::server::MAX_ADMIN_CONNECTIONS).contains(&serving),
        "100 silent admin connections are served by {serving} threads"
    );
    // Each is answered ("busy") or closed by the gateway; none is held open forever.
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("the gateway ends a silent admin connection");
    }
    let out = gw.cli(&["status"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client past the cap on named prepared statements gets 54000 (program_limit_exceeded) for
/// the one too many, and its session goes on: statements it has still run, and closing some
/// makes room again.
#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_past_the_cap_fail_with_54000_and_the_session_goes_on() {
    const CAP: usize = portcullis::protocol::postgres::session::MAX_NAMED;
    let pg = Postgres::start().unwrap();
    let (gw, _d) = start(&pg, "", None);
    let (client, conn) = tokio_postgres::connect(&gw.conninfo("app"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    // tokio-postgres names each prepared statement and closes it when the handle drops.
    let mut open = Vec::with_capacity(CAP);
    for i in 0..CAP {
        open.push(client.prepare(&format!("SELECT {i}")).await.unwrap());
    }
    let err = client
        .prepare("SELECT 'one too many'")
        .await
        .expect_err("one statement past the cap");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(db.code().code(), "54000", "{db:?}");
    assert!(db.message().contains("close some"), "{db:?}");
    // The session goes on.
    let row = client.query_one(&open[7], &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    // Closing some makes room (tokio-postgres sends Close with its next message).
    open.truncate(CAP - 10);
    client.simple_query("SELECT 1").await.unwrap();
    let again = client.prepare("SELECT 'room again'").await.unwrap();
    let row = client.query_one(&again, &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "room again");
    drop((open, again, client));
    let _ = driver.await;
}
