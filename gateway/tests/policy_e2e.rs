//! Policy in the data path, end to end: a real PostgreSQL, the real gateway binary, a real client
//! (tokio-postgres) and the operator CLI. Blocked statements get SQLSTATE 42501 and the session
//! stays usable; held statements wait for `portcullis approve`/`deny` while a transaction is open.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::policy::{ApprovalRecord, Status};
use testkit::{Gateway, GatewayOptions, Postgres};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

struct Setup {
    pg: Postgres,
    gw: Gateway,
    _dir: tempfile::TempDir,
}

fn start(policy: &str) -> Setup {
    let pg = Postgres::start().expect("start PostgreSQL");
    pg.app_superuser_sql(
        "CREATE TABLE t (id int PRIMARY KEY, a text); ALTER TABLE t OWNER TO app; \
         INSERT INTO t VALUES (0, 'seed');",
    )
    .expect("create the test table");
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let policy_arg = if policy.contains('\n') {
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, policy).unwrap();
        path.to_str().unwrap().to_owned()
    } else {
        policy.to_owned()
    };
    let gw = Gateway::start(
        GatewayOptions::for_target(&pg, pw)
            .arg("--policy")
            .arg(policy_arg),
    )
    .expect("start the gateway");
    Setup { pg, gw, _dir: dir }
}

/// A client through the gateway, and the notices it receives.
async fn connect(gw: &Gateway) -> (Client, Arc<Mutex<Vec<String>>>) {
    let (client, mut connection) = tokio_postgres::connect(&gw.conninfo("app"), NoTls)
        .await
        .expect("connect through the gateway");
    let notices = Arc::new(Mutex::new(Vec::new()));
    let sink = notices.clone();
    tokio::spawn(async move {
        while let Some(msg) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match msg {
                Ok(AsyncMessage::Notice(n)) => sink.lock().unwrap().push(n.message().to_owned()),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, notices)
}

fn assert_blocked(e: &tokio_postgres::Error, rule: &str) -> String {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    assert_eq!(db.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{db:?}");
    assert!(
        db.message().contains(rule),
        "message should name rule {rule}: {db:?}"
    );
    db.detail().unwrap_or_default().to_owned()
}

/// The first column of the first row (tokio-postgres reports the RowDescription first).
fn first_value(messages: &[SimpleQueryMessage]) -> Option<&str> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0),
        _ => None,
    })
}

async fn select_one(client: &Client) {
    let rows = client
        .simple_query("SELECT 1")
        .await
        .expect("session still usable");
    assert_eq!(first_value(&rows), Some("1"));
}

fn approvals(gw: &Gateway) -> Vec<ApprovalRecord> {
    let out = gw
        .cli(&["approvals", "--json"])
        .expect("run portcullis approvals");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("approvals --json is a list of records")
}

/// Waits (bounded) for a pending request whose SQL contains `needle`; returns its id.
async fn pending(gw: &Gateway, needle: &str) -> u64 {
    for _ in 0..300 {
        if let Some(r) = approvals(gw)
            .into_iter()
            .find(|r| r.status == Status::Pending && r.sql.contains(needle))
        {
            return r.id;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no pending approval for {needle:?}:\n{}", gw.log());
}

fn cli_ok(gw: &Gateway, args: &[&str]) {
    let out = gw.cli(args).expect("run the CLI");
    assert!(
        out.status.success(),
        "portcullis {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn count(pg: &Postgres, sql: &str) -> String {
    pg.app_superuser_sql(sql).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn blocked_statements_get_42501_and_the_session_stays_usable() {
    let s = start("default");
    let (client, _) = connect(&s.gw).await;
    let detail = assert_blocked(
        &client.simple_query("DROP TABLE t").await.unwrap_err(),
        "no-ddl",
    );
    assert!(detail.contains("DROP TABLE"), "{detail}");
    select_one(&client).await;
    // Smuggling: the whole string is refused, nothing in it runs.
    assert_blocked(
        &client
            .simple_query("SELECT 1; DROP TABLE t")
            .await
            .unwrap_err(),
        "no-ddl",
    );
    assert_blocked(
        &client
            .simple_query("/* hi */ select 1; -- x\n drop table T")
            .await
            .unwrap_err(),
        "no-ddl",
    );
    for sql in [
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT PG_CATALOG.PG_LS_DIR('.')",
        "COPY t TO PROGRAM 'id'",
        "SET ROLE postgres",
        "DO $$ BEGIN END $$",
    ] {
        assert_blocked(&client.simple_query(sql).await.unwrap_err(), "dangerous");
        select_one(&client).await;
    }
    assert_blocked(
        &client.simple_query("SELEKT 1").await.unwrap_err(),
        "unparsable",
    );
    select_one(&client).await;
    assert_eq!(count(&s.pg, "SELECT count(*) FROM t"), "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn extended_protocol_statements_are_judged_at_parse() {
    let s = start("default");
    let (client, _) = connect(&s.gw).await;
    let e = client.prepare("SELECT pg_read_file($1)").await.unwrap_err();
    assert_blocked(&e, "dangerous");
    let e = client
        .query("SELECT pg_ls_dir($1)", &[&"."])
        .await
        .unwrap_err();
    assert_blocked(&e, "dangerous");
    let rows = client
        .query("SELECT a FROM t WHERE id = $1", &[&0i32])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, &str>(0), "seed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_block_inside_a_transaction_aborts_it() {
    let s = start("default");
    let (client, _) = connect(&s.gw).await;
    client.simple_query("BEGIN").await.unwrap();
    assert_blocked(
        &client
            .simple_query("TRUNCATE t; DROP TABLE t")
            .await
            .unwrap_err(),
        "no-ddl",
    );
    let e = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION), "{e}");
    client.simple_query("ROLLBACK").await.unwrap();
    select_one(&client).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn approved_statement_runs_in_the_open_transaction() {
    let s = start("default");
    let (client, notices) = connect(&s.gw).await;
    let client = Arc::new(client);
    client.simple_query("BEGIN").await.unwrap();
    client.simple_query("SELECT a FROM t").await.unwrap();
    let held = {
        let c = client.clone();
        tokio::spawn(async move { c.simple_query("INSERT INTO t VALUES (1, 'approved')").await })
    };
    let id = pending(&s.gw, "INSERT INTO t VALUES (1, 'approved')").await;
    assert!(
        !held.is_finished(),
        "the statement must wait for the operator"
    );
    // The request is in the store a moment before its notice reaches the client.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !notices
        .lock()
        .unwrap()
        .iter()
        .any(|n| n.contains(&id.to_string()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "a notice names the approval request id: {:?}",
            notices.lock().unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    cli_ok(&s.gw, &["approve", &id.to_string()]);
    held.await.unwrap().expect("the approved INSERT runs");
    // Same session, same transaction: the row is visible here and not yet outside.
    let rows = client
        .simple_query("SELECT a FROM t WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(first_value(&rows), Some("approved"));
    assert_eq!(count(&s.pg, "SELECT count(*) FROM t WHERE id = 1"), "0");
    client.simple_query("COMMIT").await.unwrap();
    assert_eq!(count(&s.pg, "SELECT count(*) FROM t WHERE id = 1"), "1");
    let rec = approvals(&s.gw).into_iter().find(|r| r.id == id).unwrap();
    assert_eq!(rec.status, Status::Approved);
    assert_eq!(rec.rule, "writes");
    assert_eq!(rec.database, "app");
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_statement_gets_42501_with_the_reason() {
    let s = start("default");
    let (client, _) = connect(&s.gw).await;
    let client = Arc::new(client);
    client.simple_query("BEGIN").await.unwrap();
    let held = {
        let c = client.clone();
        tokio::spawn(async move { c.simple_query("DELETE FROM t WHERE id = 0").await })
    };
    let id = pending(&s.gw, "DELETE FROM t WHERE id = 0").await;
    cli_ok(
        &s.gw,
        &["deny", &id.to_string(), "--reason", "not on a Friday"],
    );
    let detail = assert_blocked(&held.await.unwrap().unwrap_err(), "writes");
    assert!(detail.contains("not on a Friday"), "{detail}");
    // Like any error inside a transaction block, the transaction is aborted.
    let e = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION), "{e}");
    client.simple_query("ROLLBACK").await.unwrap();
    select_one(&client).await;
    assert_eq!(count(&s.pg, "SELECT count(*) FROM t WHERE id = 0"), "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn unanswered_statement_times_out_denied() {
    let policy = include_str!("../src/policy/builtin/default.toml")
        .replace("approval_timeout = \"5m\"", "approval_timeout = \"2s\"");
    assert!(policy.contains("\"2s\""));
    let s = start(&policy);
    let (client, _) = connect(&s.gw).await;
    client.simple_query("BEGIN").await.unwrap();
    let e = client
        .simple_query("UPDATE t SET a = 'x' WHERE id = 0")
        .await
        .unwrap_err();
    let detail = assert_blocked(&e, "writes");
    assert!(detail.contains("timed out after 2s"), "{detail}");
    client.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(count(&s.pg, "SELECT a FROM t WHERE id = 0"), "seed");
}

#[tokio::test(flavor = "multi_thread")]
async fn fingerprint_grant_lets_the_same_statement_shape_through() {
    let s = start("default");
    let (client, _) = connect(&s.gw).await;
    let client = Arc::new(client);
    let held = {
        let c = client.clone();
        tokio::spawn(async move { c.simple_query("INSERT INTO t VALUES (10, 'a')").await })
    };
    let id = pending(&s.gw, "VALUES (10, 'a')").await;
    cli_ok(
        &s.gw,
        &[
            "approve",
            &id.to_string(),
            "--scope",
            "fingerprint",
            "--for",
            "10m",
        ],
    );
    held.await.unwrap().unwrap();
    // Same shape, other literals: no hold.
    client
        .simple_query("INSERT INTO t VALUES (11, 'b')")
        .await
        .unwrap();
    assert!(
        !approvals(&s.gw).iter().any(|r| r.sql.contains("(11, 'b')")),
        "a granted fingerprint is not held again"
    );
    assert_eq!(
        count(&s.pg, "SELECT count(*) FROM t WHERE id IN (10, 11)"),
        "2"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_mode_blocks_nothing_and_logs_what_it_would_do() {
    let s = start("observe");
    let (client, _) = connect(&s.gw).await;
    client.simple_query("CREATE TABLE u (a int)").await.unwrap();
    client
        .simple_query("INSERT INTO u VALUES (1)")
        .await
        .unwrap();
    assert_eq!(count(&s.pg, "SELECT count(*) FROM u"), "1");
    assert!(approvals(&s.gw).iter().all(|r| r.status != Status::Pending));
    for needle in ["would block", "would hold"] {
        assert!(
            s.gw.log_shows(needle, Duration::from_secs(5)),
            "{}",
            s.gw.log()
        );
    }
}
