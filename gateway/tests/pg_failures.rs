//! Things going wrong: malformed client bytes, a wrong upstream password, the upstream backend
//! killed mid-result, the upstream server down. Each gives the client a clear error, never a
//! hang, and leaves every other session working.

use std::time::Duration;

use futures_util::StreamExt;
use testkit::wire::{self, Message, RawConn};
use testkit::{ConnectError, Harness};

fn harness() -> Harness {
    let h = Harness::start().expect("start PostgreSQL (and the gateway unless direct)");
    h.must(h.sanity(), "direct sanity check");
    h
}

/// How a malformed input must be answered.
#[derive(Clone, Copy, PartialEq)]
enum Expect08P01 {
    /// ErrorResponse with SQLSTATE 08P01, then the connection closes (gateway and PostgreSQL).
    Always,
    /// The gateway answers 08P01 and closes; PostgreSQL itself closes silently (it logs the
    /// problem as COMMERROR), so direct mode accepts a bare close.
    OrSilentClose,
    /// Bytes that parse as a startup packet of an unknown protocol version: 08P01 or, as
    /// PostgreSQL itself answers, 0A000 (feature_not_supported).
    OrUnsupported,
    /// A well-framed message with a malformed body, followed by Sync: 08P01, then either the
    /// connection closes or (as PostgreSQL does: it is an ERROR, not FATAL) the session
    /// recovers at the Sync and keeps working.
    OrRecovery,
}

/// Reads the answer to malformed bytes until the connection closes and checks it.
fn check_rejected(h: &Harness, conn: &mut RawConn, what: &str, expect: Expect08P01) {
    if expect == Expect08P01::OrRecovery {
        return check_recoverable(h, conn, what);
    }
    let msgs = conn.read_until_closed().unwrap_or_else(|e| {
        panic!(
            "{what}: the connection must be answered and closed, not left open: {e:#}\n{}",
            h.context()
        )
    });
    let errors: Vec<&Message> = msgs.iter().filter(|m| m.is_error()).collect();
    let silent_ok = h.is_direct() && expect == Expect08P01::OrSilentClose;
    if errors.is_empty() && silent_ok {
        return;
    }
    let described: Vec<String> = msgs.iter().map(Message::describe).collect();
    assert_eq!(
        errors.len(),
        1,
        "{what}: exactly one ErrorResponse before the close, got {described:?}\n{}",
        h.context()
    );
    let code = errors[0].sqlstate().unwrap_or_default();
    let unsupported_ok = expect == Expect08P01::OrUnsupported && code == "0A000";
    assert!(
        code == "08P01" || unsupported_ok,
        "{what}: protocol_violation, got {described:?}\n{}",
        h.context()
    );
    let fields = errors[0].fields();
    assert_eq!(
        fields.get(&b'S').map(String::as_str),
        Some("FATAL"),
        "{what}: FATAL severity"
    );
    assert!(
        !fields.get(&b'M').map(String::is_empty).unwrap_or(true),
        "{what}: the error has a message"
    );
}

fn check_recoverable(h: &Harness, conn: &mut RawConn, what: &str) {
    let mut msgs = Vec::new();
    let ready = loop {
        match conn.read_message() {
            Ok(Some(m)) if m.tag == b'Z' => break true,
            Ok(Some(m)) => msgs.push(m),
            Ok(None) => break false,
            Err(e) => panic!("{what}: no answer and no close: {e:#}\n{}", h.context()),
        }
    };
    let described: Vec<String> = msgs.iter().map(Message::describe).collect();
    assert!(
        msgs.iter()
            .any(|m| m.sqlstate().as_deref() == Some("08P01")),
        "{what}: protocol_violation expected, got {described:?}\n{}",
        h.context()
    );
    if ready {
        let msgs = h.must(
            conn.simple_query("SELECT 1"),
            "query after a recovered error",
        );
        assert_eq!(RawConn::first_column(&msgs), vec![Some("1".to_string())]);
    }
}

/// A started session answers a query (proves malformed bytes elsewhere did not hurt it).
async fn assert_works(h: &Harness, c: &tokio_postgres::Client, what: &str) {
    let v: String = h
        .must(
            c.query_one("SELECT 'alive'::text", &[]).await,
            &format!("{what}: other session"),
        )
        .get(0);
    assert_eq!(v, "alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_client_bytes_get_protocol_errors() {
    let mut h = harness();
    let ep = h.endpoint();
    let bystander = h.must(ep.connect().await, "connect the bystander session");

    // Before startup.
    let startup_cases: Vec<(&str, Vec<u8>, Expect08P01)> = vec![
        (
            "absurd startup length",
            {
                let mut b = 0x7fff_fff0u32.to_be_bytes().to_vec();
                b.extend_from_slice(&wire::PROTOCOL_3_0.to_be_bytes());
                b.extend_from_slice(b"user\0agent\0");
                b
            },
            Expect08P01::OrSilentClose,
        ),
        (
            "startup length shorter than its header",
            vec![0, 0, 0, 2, 0, 3, 0, 0],
            Expect08P01::OrSilentClose,
        ),
        (
            "startup parameters without terminator",
            {
                let mut body = wire::PROTOCOL_3_0.to_be_bytes().to_vec();
                body.extend_from_slice(b"user\0agent\0database\0app");
                wire::untagged(&body)
            },
            Expect08P01::Always,
        ),
        (
            "random garbage",
            {
                let mut b = 64u32.to_be_bytes().to_vec();
                b.extend((0..60u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8));
                b
            },
            Expect08P01::OrUnsupported,
        ),
    ];
    for (what, bytes, expect) in startup_cases {
        let mut conn = h.must(RawConn::to(&ep), what);
        conn.send(&bytes).unwrap();
        check_rejected(&h, &mut conn, what, expect);
        assert_works(&h, &bystander, what).await;
    }

    // After a successful startup.
    let session_cases: Vec<(&str, Vec<u8>, Expect08P01)> = vec![
        (
            "unknown message type",
            wire::frontend(b'z', b"hello"),
            Expect08P01::Always,
        ),
        (
            "backend-only message type from a client",
            wire::frontend(b'Z', b"I"),
            Expect08P01::Always,
        ),
        (
            "Parse with an unterminated string",
            [
                wire::frontend(b'P', b"stmt\0SELECT 1"),
                wire::frontend(b'S', b""),
            ]
            .concat(),
            Expect08P01::OrRecovery,
        ),
        (
            "absurd message length",
            {
                let mut b = vec![b'Q'];
                b.extend_from_slice(&0x7fff_fff0u32.to_be_bytes());
                b.extend_from_slice(b"SELECT 1\0");
                b
            },
            Expect08P01::OrSilentClose,
        ),
        (
            "message length below 4",
            vec![b'Q', 0, 0, 0, 2, b'x'],
            Expect08P01::OrSilentClose,
        ),
    ];
    for (what, bytes, expect) in session_cases {
        let mut conn = h.must(RawConn::to(&ep), what);
        h.must(conn.startup(&ep, wire::PROTOCOL_3_0), "startup");
        conn.send(&bytes).unwrap();
        check_rejected(&h, &mut conn, what, expect);
        assert_works(&h, &bystander, what).await;
    }

    // New sessions still work, and the gateway survived all of it.
    let fresh = h.must(ep.connect().await, "connect after malformed input");
    assert_works(&h, &fresh, "fresh session").await;
    h.assert_gateway_alive();
}

/// The upstream rejects the gateway's credential: the client gets an authentication error at
/// once, not a hang, and the message carries no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_password_gives_a_clear_error() {
    let wrong = "wrong-Pa55word-not-the-real-one";
    let mut h = Harness::builder()
        .upstream_password(wrong)
        .start()
        .expect("start");
    let ep = h.endpoint();
    let err = match ep.try_connect().await {
        Ok(_) => panic!(
            "connected although the upstream password is wrong\n{}",
            h.context()
        ),
        Err(e) => e,
    };
    if let ConnectError::Hang(_) = err {
        panic!(
            "no answer to a connection with a wrong upstream password\n{}",
            h.context()
        );
    }
    let db = err.db_error().unwrap_or_else(|| {
        panic!(
            "the client gets an ErrorResponse, not a dropped connection: {err}\n{}",
            h.context()
        )
    });
    let code = db.code().code();
    assert!(
        code.starts_with("28") || code.starts_with("08"),
        "an authentication (28xxx) or connection (08xxx) SQLSTATE: {err}"
    );
    assert!(
        db.message().to_lowercase().contains("auth") || db.message().contains("password"),
        "the message says authentication failed: {err}"
    );
    assert_eq!(db.severity(), "FATAL", "{err}");
    let text = format!("{db:?}");
    assert!(
        !text.contains(wrong) && !text.contains(&h.pg.password),
        "the error leaks a password: {text}"
    );

    // psql says the same, also promptly (psql's connect_timeout bounds it).
    let out = h.must(ep.psql(h.bindir(), "SELECT 1"), "psql");
    assert!(!out.success);
    assert!(
        out.stderr.to_lowercase().contains("auth") || out.stderr.contains("password"),
        "psql error: {}\n{}",
        out.stderr,
        h.context()
    );
    assert!(!out.stderr.contains(wrong));
    h.assert_gateway_alive();
}

/// pg_terminate_backend on the backend streaming a big result: that client gets an error, and a
/// second session carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_backend_killed_mid_result() {
    let mut h = harness();
    let ep = h.endpoint();
    let victim = h.must(ep.connect().await, "connect victim");
    let survivor = h.must(ep.connect().await, "connect survivor");
    let victim_pid: i32 = h
        .must(
            victim.query_one("SELECT pg_backend_pid()", &[]).await,
            "pid",
        )
        .get(0);

    let stream = h.must(
        victim
            .query_raw(
                "SELECT g, repeat('k', 300) FROM generate_series(1, 5000000) g",
                std::iter::empty::<i32>(),
            )
            .await,
        "start the big query",
    );
    futures_util::pin_mut!(stream);
    let mut rows = 0u64;
    while rows < 1000 {
        h.must(
            stream.next().await.expect("rows before the kill"),
            "row before the kill",
        );
        rows += 1;
    }
    let killed = h.must(
        h.pg.superuser_sql(&format!("SELECT pg_terminate_backend({victim_pid})")),
        "pg_terminate_backend",
    );
    assert_eq!(killed.trim(), "t");

    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = stream.next().await {
            match r {
                Ok(_) => rows += 1,
                Err(e) => return Some(e),
            }
        }
        None
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the client hangs after its backend was killed\n{}",
            h.context()
        )
    });
    let err = outcome.unwrap_or_else(|| {
        panic!(
            "the result ended cleanly after {rows} rows although its backend was killed\n{}",
            h.context()
        )
    });
    assert!(rows < 5_000_000, "all rows arrived");
    // The backend says 57P01 when it can. A backend blocked writing rows when the signal lands
    // sends nothing (PostgreSQL's ProcessClientWriteInterrupt drops the message rather than
    // break protocol sync), so the gateway then reports the upstream's end itself, as 08006.
    if let Some(db) = err.as_db_error() {
        match db.code().code() {
            "57P01" => {}
            "08006" => assert_eq!(
                db.message(),
                "the upstream server closed the connection unexpectedly",
                "{db:?}"
            ),
            other => panic!("expected 57P01 or the gateway's 08006, got {other}: {db:?}"),
        }
    }
    eprintln!("victim error after {rows} rows: {err}");

    // The victim's connection is finished; the survivor and new sessions are not.
    assert!(
        victim.query_one("SELECT 1", &[]).await.is_err(),
        "the victim's connection must be closed"
    );
    assert_works(&h, &survivor, "survivor").await;
    let fresh = h.must(ep.connect().await, "connect after the kill");
    assert_works(&h, &fresh, "fresh").await;
    h.assert_gateway_alive();
}

/// The upstream server is down: connecting fails promptly with an error; when it is back, new
/// sessions work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_then_back() {
    let mut h = harness();
    let ep = h.endpoint();
    let idle = h.must(ep.connect().await, "connect before the outage");
    h.must(h.pg.stop(), "stop PostgreSQL");

    match ep.try_connect().await {
        Ok(_) => panic!("connected while PostgreSQL is down\n{}", h.context()),
        Err(ConnectError::Hang(d)) => panic!(
            "no answer within {d:?} while PostgreSQL is down\n{}",
            h.context()
        ),
        Err(e) => eprintln!("while down: {e}"),
    }
    let out = h.must(ep.psql(h.bindir(), "SELECT 1"), "psql while down");
    assert!(!out.success);
    assert!(!out.stderr.is_empty(), "psql explains the failure");
    // The session that was open when the server went down is over.
    assert!(
        idle.query_one("SELECT 1", &[]).await.is_err(),
        "a session survived its server's shutdown"
    );

    h.must(h.pg.start_again(), "start PostgreSQL again");
    let back = h.must(ep.connect().await, "connect after the server is back");
    assert_works(&h, &back, "after restart").await;
    h.assert_gateway_alive();
}

/// Clients that leave, politely (Terminate) or not (a dropped socket, even during startup or
/// in the middle of a result), leave no upstream backend behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnects_release_upstream_backends() {
    let mut h = harness();
    let ep = h.endpoint();
    let others = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
                  AND pid <> pg_backend_pid()";

    let mut polite = Vec::new();
    for _ in 0..10 {
        polite.push(h.must(ep.connect().await, "connect"));
    }
    let mut rude = Vec::new();
    for i in 0..15 {
        let mut conn = h.must(RawConn::to(&ep), "raw connect");
        h.must(conn.startup(&ep, wire::PROTOCOL_3_0), "startup");
        if i >= 10 {
            // Leave while a long result streams.
            conn.send(&wire::query(
                "SELECT g, repeat('r', 200) FROM generate_series(1, 5000000) g",
            ))
            .unwrap();
            conn.read_n(3).unwrap();
        }
        rude.push(conn);
    }
    let mut halfway = Vec::new();
    for _ in 0..5 {
        let mut conn = h.must(RawConn::to(&ep), "raw connect");
        conn.send(&wire::startup_message(
            wire::PROTOCOL_3_0,
            &[("user", &ep.user), ("database", &ep.dbname)],
        ))
        .unwrap();
        halfway.push(conn);
    }
    let open: u64 = h
        .must(h.pg.superuser_sql(others), "count")
        .trim()
        .parse()
        .unwrap();
    assert!(open >= 25, "{open} backends for 25 established sessions");

    // tokio-postgres sends Terminate when the client is dropped; the raw ones just close.
    drop(polite);
    drop(rude);
    drop(halfway);
    // Sessions that ended at rest leave their connection to the pool, reset and idle (at most
    // `max_idle_per_key` per I/O worker and key); every other backend goes. The three kinds of
    // client here send three sets of startup parameters, so three keys.
    let left_over = format!("{others} AND NOT (state = 'idle' AND query = 'DISCARD ALL')");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left: u64 = h
            .must(h.pg.superuser_sql(&left_over), "count")
            .trim()
            .parse()
            .unwrap();
        if left == 0 {
            let pooled: usize = h
                .must(h.pg.superuser_sql(others), "count")
                .trim()
                .parse()
                .unwrap();
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
            assert!(
                pooled <= 8 * workers * 3,
                "{pooled} idle pooled backends for {workers} workers and 3 keys"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} upstream backends still there 30 s after their clients left\n{}",
            h.context()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fresh = h.must(ep.connect().await, "connect afterwards");
    assert_works(&h, &fresh, "fresh").await;
    h.assert_gateway_alive();
}
