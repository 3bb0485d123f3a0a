//! A huge statement is classified off the I/O worker: another session on the same worker keeps
//! its latency while a 60 MB Query is decided (medians printed, no timed assertion), and the
//! huge statement's verdict is as strict as a small one's.

use std::time::{Duration, Instant};

use testkit::{Gateway, GatewayOptions, Postgres};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

async fn connect(gw: &Gateway) -> Client {
    let (client, conn) = tokio_postgres::connect(&gw.conninfo("app"), NoTls)
        .await
        .expect("connect through the gateway");
    tokio::spawn(conn);
    client
}

fn start(pg: &Postgres, policy: Option<&str>) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    // One worker: both sessions share it, as they would under load.
    let mut opts = GatewayOptions::for_target(pg, pw).arg("--workers").arg("1");
    if let Some(p) = policy {
        opts = opts.arg("--policy").arg(p);
    }
    (Gateway::start(opts).expect("start gateway"), dir)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

async fn ping(c: &Client) -> Duration {
    let t = Instant::now();
    c.simple_query("SELECT 1").await.expect("SELECT 1");
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn another_sessions_latency_while_a_60mb_statement_is_decided() {
    let pg = Postgres::start().unwrap();
    let (gw, _d) = start(&pg, None);
    let probe = connect(&gw).await;
    let mut quiet: Vec<Duration> = Vec::new();
    for _ in 0..200 {
        quiet.push(ping(&probe).await);
    }

    let big = connect(&gw).await;
    let sql = format!("SELECT length('{}')", "x".repeat(60_000_000));
    let started = Instant::now();
    let task = tokio::spawn(async move { big.simple_query(&sql).await });
    let mut busy: Vec<Duration> = Vec::new();
    while !task.is_finished() {
        busy.push(ping(&probe).await);
    }
    let big_took = started.elapsed();
    let rows = task.await.unwrap().expect("the 60 MB statement runs");
    let n = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(n.as_deref(), Some("60000000"));
    assert!(!busy.is_empty(), "the probe session got answers meanwhile");
    let (q_max, b_max) = (
        quiet.iter().max().copied().unwrap_or_default(),
        busy.iter().max().copied().unwrap_or_default(),
    );
    eprintln!(
        "60 MB statement took {big_took:?}; other session: quiet median {:?} max {q_max:?} \
         ({} queries), during median {:?} max {b_max:?} ({} queries)",
        median(&mut quiet),
        quiet.len(),
        median(&mut busy),
        busy.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_statement_is_decided_as_strictly_as_a_small_one() {
    let pg = Postgres::start().unwrap();
    pg.app_superuser_sql("CREATE TABLE t (id int); ALTER TABLE t OWNER TO app;")
        .unwrap();
    let (gw, _d) = start(&pg, Some("default"));
    let c = connect(&gw).await;
    let sql = format!(
        "SELECT length('{}'); DROP TABLE t",
        "x".repeat(2 * 1024 * 1024)
    );
    let err = c
        .simple_query(&sql)
        .await
        .expect_err("the DROP at the end of 2 MB is still seen");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "42501", "{db:?}");
    assert!(db.message().contains("no-ddl"), "{db:?}");
    // The session goes on, and small statements are decided inline as before.
    let rows = c.simple_query("SELECT 1").await.expect("still usable");
    assert!(!rows.is_empty());
    assert_eq!(
        pg.app_superuser_sql("SELECT count(*) FROM t")
            .unwrap()
            .trim(),
        "0"
    );
}
