//! Query cancellation through the gateway: the client's CancelRequest arrives on a new
//! connection carrying the key the gateway handed out, and must reach the right backend only.

use std::process::Stdio;
use std::time::{Duration, Instant};

use testkit::Harness;
use testkit::wire::{self, RawConn};
use tokio_postgres::NoTls;

/// Generous on purpose (shared, noisy machines): the point is that cancel works at all, where a
/// broken cancel leaves the 60 s sleep running.
const CANCEL_LIMIT: Duration = Duration::from_secs(5);

fn harness() -> Harness {
    let h = Harness::start().expect("start PostgreSQL (and the gateway unless direct)");
    h.must(h.sanity(), "direct sanity check");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_pg_sleep_via_cancel_token() {
    let h = harness();
    let c = h.must(h.endpoint().connect().await, "connect");
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(60)").await;
        (r, c)
    });
    h.must(
        h.pg.wait_active("pg_sleep(60)", Duration::from_secs(20)),
        "the sleep reaches PostgreSQL",
    );

    let start = Instant::now();
    h.must(token.cancel_query(NoTls).await, "send CancelRequest");
    let (r, c) = match tokio::time::timeout(Duration::from_secs(30), sleeper).await {
        Ok(j) => j.expect("sleeper task"),
        Err(_) => panic!(
            "SELECT pg_sleep(60) still running 30 s after the cancel\n{}",
            h.context()
        ),
    };
    let elapsed = start.elapsed();
    let err = r.expect_err("the cancelled query must fail");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57014"),
        "query_canceled, got {err:?}\n{}",
        h.context()
    );
    eprintln!("cancel took {elapsed:?}");
    h.check(elapsed < CANCEL_LIMIT, format!("cancel took {elapsed:?}"));
    let v: i32 = h
        .must(c.query_one("SELECT 1", &[]).await, "query after cancel")
        .get(0);
    assert_eq!(v, 1);
}

/// With two sessions sleeping, cancelling one leaves the other running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_only_its_own_session() {
    let h = harness();
    let ep = h.endpoint();
    let a = h.must(ep.connect().await, "connect a");
    let b = h.must(ep.connect().await, "connect b");
    let (ta, tb) = (a.cancel_token(), b.cancel_token());
    let sa = tokio::spawn(async move { a.simple_query("SELECT pg_sleep(60) -- a").await });
    let sb = tokio::spawn(async move { b.simple_query("SELECT pg_sleep(60) -- b").await });
    h.must(
        h.pg.wait_active("pg_sleep(60) -- a", Duration::from_secs(20)),
        "a sleeps",
    );
    let pid_b = h.must(
        h.pg.wait_active("pg_sleep(60) -- b", Duration::from_secs(20)),
        "b sleeps",
    );

    h.must(ta.cancel_query(NoTls).await, "cancel a");
    let ra = tokio::time::timeout(Duration::from_secs(30), sa)
        .await
        .unwrap_or_else(|_| panic!("a not cancelled within 30 s\n{}", h.context()))
        .unwrap();
    assert_eq!(
        ra.expect_err("a was cancelled")
            .as_db_error()
            .map(|e| e.code().code()),
        Some("57014")
    );
    // b's backend is still sleeping.
    let still = h.must(
        h.pg.wait_active("pg_sleep(60) -- b", Duration::from_secs(5)),
        "b still sleeps after a's cancel",
    );
    assert_eq!(still, pid_b);
    assert!(
        !sb.is_finished(),
        "b finished although only a was cancelled"
    );

    h.must(tb.cancel_query(NoTls).await, "cancel b");
    let rb = tokio::time::timeout(Duration::from_secs(30), sb)
        .await
        .unwrap_or_else(|_| panic!("b not cancelled within 30 s\n{}", h.context()))
        .unwrap();
    assert_eq!(
        rb.expect_err("b was cancelled")
            .as_db_error()
            .map(|e| e.code().code()),
        Some("57014")
    );
}

/// A CancelRequest with a key nobody was given cancels nothing.
#[test]
fn cancel_with_unknown_key_cancels_nothing() {
    let h = harness();
    let ep = h.endpoint();
    let mut conn = h.must(RawConn::to(&ep), "connect");
    h.must(conn.startup(&ep, wire::PROTOCOL_3_0), "startup");
    let (pid, key) = conn.backend_key.clone().expect("BackendKeyData");
    conn.send(&wire::query("SELECT pg_sleep(2), 'done'"))
        .unwrap();
    h.must(
        h.pg.wait_active("pg_sleep(2)", Duration::from_secs(20)),
        "sleep running",
    );

    let wrong_key: Vec<u8> = key.iter().map(|b| b ^ 0x5a).collect();
    for (p, k) in [
        (pid, wrong_key),
        (pid ^ 0x0101, key.clone()),
        (0, vec![0; key.len()]),
    ] {
        let mut cancel = h.must(RawConn::to(&ep), "cancel connection");
        cancel.send(&wire::cancel_request(p, &k)).unwrap();
        // The server answers a CancelRequest by closing the connection, whatever the key.
        let answer = h.must(cancel.read_until_closed(), "cancel connection closes");
        assert!(answer.is_empty(), "no reply to a CancelRequest: {answer:?}");
    }

    let msgs = h.must(conn.read_until_ready(), "the sleep completes");
    let errors: Vec<String> = msgs
        .iter()
        .filter(|m| m.is_error())
        .map(|m| m.describe())
        .collect();
    assert!(
        errors.is_empty(),
        "a bogus CancelRequest cancelled a query: {errors:?}\n{}",
        h.context()
    );
    assert_eq!(RawConn::first_column(&msgs).len(), 1);
}

/// psql sends a CancelRequest on SIGINT (Ctrl-C).
#[test]
fn psql_ctrl_c_cancels() {
    let h = harness();
    let mut cmd = h.client_cmd("psql");
    cmd.args(["-X", "-At", "-c", "SELECT pg_sleep(60)"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = h.must(cmd.spawn(), "spawn psql");
    h.must(
        h.pg.wait_active("pg_sleep(60)", Duration::from_secs(20)),
        "psql's sleep running",
    );
    let start = Instant::now();
    let rc = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
    let out = h.must(child.wait_with_output(), "psql exits");
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "psql stderr: {stderr}\n{}",
        h.context()
    );
    h.check(
        elapsed < CANCEL_LIMIT,
        format!("psql's cancel took {elapsed:?}"),
    );
}
