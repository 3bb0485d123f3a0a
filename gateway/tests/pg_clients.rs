//! Real clients through the gateway: simple and extended query, prepared statements, pipelining,
//! notices, LISTEN/NOTIFY, psql round trips and FunctionCall (large objects).
//!
//! Every test runs through a started gateway, or straight to PostgreSQL with
//! `PORTCULLIS_TEST_DIRECT=1` (which validates the test itself).

use std::time::Duration;

use futures_util::future::join_all;
use testkit::Harness;
use tokio_postgres::{AsyncMessage, SimpleQueryMessage};

fn harness() -> Harness {
    let h = Harness::start().expect("start PostgreSQL (and the gateway unless direct)");
    h.must(h.sanity(), "direct sanity check");
    h
}

/// Rows of a simple query, as text, column by column.
fn simple_rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

fn command_tags(msgs: &[SimpleQueryMessage]) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_query_protocol() {
    let h = harness();
    let c = h.must(h.endpoint().connect().await, "connect");

    h.must(
        c.batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, name text, note text);
             INSERT INTO t VALUES (1, 'one', NULL), (2, 'två', 'ünïcödé ✓'), (3, '', 'x');",
        )
        .await,
        "batch_execute DDL and INSERT",
    );

    // Several statements in one Query message: each gets its own result and CommandComplete.
    let msgs = h.must(
        c.simple_query("SELECT id, name, note FROM t ORDER BY id; UPDATE t SET note = 'y' WHERE id = 3; SELECT count(*) FROM t")
            .await,
        "multi-statement simple query",
    );
    let rows = simple_rows(&msgs);
    assert_eq!(
        rows,
        vec![
            vec![Some("1".into()), Some("one".into()), None],
            vec![
                Some("2".into()),
                Some("två".into()),
                Some("ünïcödé ✓".into())
            ],
            vec![Some("3".into()), Some("".into()), Some("x".into())],
            vec![Some("3".into())],
        ],
        "rows of the multi-statement query\n{}",
        h.context()
    );
    assert_eq!(
        command_tags(&msgs),
        vec![3, 1, 1],
        "CommandComplete counts\n{}",
        h.context()
    );

    // An error in the middle of a multi-statement query aborts the rest; the session carries on.
    let err = c
        .simple_query("SELECT 1; SELECT 1/0; SELECT 2")
        .await
        .expect_err("division by zero must fail");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("22012"),
        "division_by_zero SQLSTATE, got {err:?}\n{}",
        h.context()
    );
    let msgs = h.must(
        c.simple_query("SELECT 'still here'").await,
        "query after error",
    );
    assert_eq!(simple_rows(&msgs), vec![vec![Some("still here".into())]]);

    // A transaction rolled back leaves no trace; an empty query is fine.
    h.must(
        c.batch_execute("BEGIN; DELETE FROM t; ROLLBACK;").await,
        "rolled-back transaction",
    );
    let msgs = h.must(c.simple_query("").await, "empty query");
    assert!(simple_rows(&msgs).is_empty());
    let n: i64 = h
        .must(c.query_one("SELECT count(*) FROM t", &[]).await, "count")
        .get(0);
    assert_eq!(n, 3, "ROLLBACK must undo the DELETE\n{}", h.context());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_query_with_parameters() {
    let h = harness();
    let c = h.must(h.endpoint().connect().await, "connect");

    let big = "p".repeat(1 << 20);
    let bytes: Vec<u8> = (0..=255u8).collect();
    let row = h.must(
        c.query_one(
            "SELECT $1::int4 + 1, $2::text || '!', $3::bytea, $4::float8 * 2, NOT $5::bool, \
             $6::text IS NULL, length($7::text), $8::int8",
            &[
                &41i32,
                &"héllo",
                &bytes,
                &1.25f64,
                &false,
                &None::<String>,
                &big,
                &i64::MIN,
            ],
        )
        .await,
        "typed parameters",
    );
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "héllo!");
    assert_eq!(row.get::<_, Vec<u8>>(2), bytes);
    assert_eq!(row.get::<_, f64>(3), 2.5);
    assert!(row.get::<_, bool>(4));
    assert!(row.get::<_, bool>(5));
    assert_eq!(row.get::<_, i32>(6), 1 << 20, "1 MiB text parameter");
    assert_eq!(row.get::<_, i64>(7), i64::MIN);

    // A 1 MiB value comes back intact in a result too.
    let echoed: String = h
        .must(c.query_one("SELECT $1::text", &[&big]).await, "echo 1 MiB")
        .get(0);
    assert!(echoed == big, "1 MiB value round trip differs");

    // An error in the extended protocol (at Bind/Execute) is reported and the session recovers.
    let err = c
        .query_one("SELECT $1::int4 / 0", &[&1i32])
        .await
        .expect_err("division by zero");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("22012"),
        "{err:?}"
    );
    let err = c
        .query("SELECT * FROM no_such_table", &[])
        .await
        .expect_err("undefined table at Parse");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("42P01"),
        "{err:?}"
    );
    let v: i32 = h
        .must(c.query_one("SELECT 7", &[]).await, "after errors")
        .get(0);
    assert_eq!(v, 7);

    // Many rows through the extended protocol, with a portal row limit via a transaction cursor.
    let rows = h.must(
        c.query(
            "SELECT g, md5(g::text) FROM generate_series(1, 5000) g",
            &[],
        )
        .await,
        "5000 rows",
    );
    assert_eq!(rows.len(), 5000);
    let sum: i64 = rows.iter().map(|r| r.get::<_, i32>(0) as i64).sum();
    assert_eq!(sum, 5000 * 5001 / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_reused_across_many_executes() {
    let h = harness();
    let c = h.must(h.endpoint().connect().await, "connect");
    h.must(
        c.batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text)")
            .await,
        "create table",
    );

    let insert = h.must(
        c.prepare("INSERT INTO kv VALUES ($1, $2)").await,
        "prepare insert",
    );
    let select = h.must(
        c.prepare("SELECT v, k * 2 FROM kv WHERE k = $1").await,
        "prepare select",
    );
    const N: i32 = 1500;
    for k in 0..N {
        let n = h.must(
            c.execute(&insert, &[&k, &format!("value-{k}")]).await,
            "execute prepared insert",
        );
        assert_eq!(n, 1);
    }
    for k in 0..N {
        let row = h.must(c.query_one(&select, &[&k]).await, "execute prepared select");
        assert_eq!(row.get::<_, String>(0), format!("value-{k}"));
        assert_eq!(row.get::<_, i32>(1), k * 2);
    }
    // Each statement was parsed once on the backend and then only bound and executed.
    let prepared: i64 = h
        .must(
            c.query_one(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement IN \
                 ('INSERT INTO kv VALUES ($1, $2)', 'SELECT v, k * 2 FROM kv WHERE k = $1')",
                &[],
            )
            .await,
            "pg_prepared_statements",
        )
        .get(0);
    assert_eq!(
        prepared,
        2,
        "both statements stay prepared on one backend\n{}",
        h.context()
    );
    let count: i64 = h
        .must(c.query_one("SELECT count(*) FROM kv", &[]).await, "count")
        .get(0);
    assert_eq!(count, N as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_on_one_connection() {
    let h = harness();
    let c = h.must(h.endpoint().connect().await, "connect");
    let stmt = h.must(
        c.prepare("SELECT $1::int4 * 3, pg_backend_pid()").await,
        "prepare",
    );

    // tokio-postgres writes every query before reading any answer: a deep pipeline of
    // Bind/Execute/Sync, some of them failing, on one connection.
    const N: i32 = 600;
    let futures = (0..N).map(|i| {
        let c = &c;
        let stmt = &stmt;
        async move {
            if i % 100 == 50 {
                c.query_one("SELECT 1 / ($1::int4 - $1::int4)", &[&i])
                    .await
                    .map(|r| (r.get::<_, i32>(0), 0))
            } else {
                c.query_one(stmt, &[&i])
                    .await
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, i32>(1)))
            }
        }
    });
    let results = join_all(futures).await;
    let mut pids = std::collections::HashSet::new();
    for (i, r) in results.into_iter().enumerate() {
        let i = i as i32;
        if i % 100 == 50 {
            let e = r.expect_err("the division by zero in the pipeline must fail");
            assert_eq!(
                e.as_db_error().map(|d| d.code().code()),
                Some("22012"),
                "{e:?}"
            );
        } else {
            let (v, pid) = h.must(r, "pipelined query");
            assert_eq!(
                v,
                i * 3,
                "answer {i} out of order or wrong\n{}",
                h.context()
            );
            pids.insert(pid);
        }
    }
    assert_eq!(pids.len(), 1, "one connection, one backend: {pids:?}");

    // Pipelined simple queries and a transaction in flight together.
    let (a, b, d) = tokio::join!(
        c.simple_query("SELECT 'a'"),
        c.query_one("SELECT $1::text", &[&"b"]),
        c.simple_query("SELECT 'd'")
    );
    assert_eq!(simple_rows(&h.must(a, "a")), vec![vec![Some("a".into())]]);
    assert_eq!(h.must(b, "b").get::<_, String>(0), "b");
    assert_eq!(simple_rows(&h.must(d, "d")), vec![vec![Some("d".into())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_the_client() {
    let h = harness();
    let (c, mut rx) = h.must(
        h.endpoint().connect_with_messages().await,
        "connect with messages",
    );
    h.must(
        c.batch_execute("DO $$ BEGIN RAISE NOTICE 'portcullis notice %', 42; END $$")
            .await,
        "RAISE NOTICE",
    );
    let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no notice within 10 s\n{}", h.context()))
        .expect("connection task ended");
    match msg {
        AsyncMessage::Notice(n) => {
            assert_eq!(n.message(), "portcullis notice 42");
            assert_eq!(n.severity(), "NOTICE");
        }
        other => panic!("expected a notice, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_between_two_sessions() {
    let h = harness();
    let ep = h.endpoint();
    let (listener, mut rx) = h.must(ep.connect_with_messages().await, "connect listener");
    let notifier = h.must(ep.connect().await, "connect notifier");
    h.must(
        listener.batch_execute("LISTEN portcullis_events").await,
        "LISTEN",
    );
    let notifier_pid: i32 = h
        .must(
            notifier.query_one("SELECT pg_backend_pid()", &[]).await,
            "pid",
        )
        .get(0);

    h.must(
        notifier
            .batch_execute(
                "NOTIFY portcullis_events, 'first';
                 BEGIN; SELECT pg_notify('portcullis_events', 'second'); \
                 SELECT pg_notify('portcullis_events', 'third'); COMMIT;
                 NOTIFY other_channel, 'ignored';",
            )
            .await,
        "NOTIFY",
    );

    // The listener is idle: notifications arrive on their own, without a query from it.
    let mut got = Vec::new();
    while got.len() < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of 3 notifications within 10 s: {got:?}\n{}",
                    got.len(),
                    h.context()
                )
            })
            .expect("listener connection ended");
        if let AsyncMessage::Notification(n) = msg {
            assert_eq!(n.channel(), "portcullis_events");
            assert_eq!(n.process_id(), notifier_pid, "sender pid");
            got.push(n.payload().to_string());
        }
    }
    assert_eq!(got, ["first", "second", "third"]);

    // UNLISTEN stops delivery; the session stays usable.
    h.must(listener.batch_execute("UNLISTEN *").await, "UNLISTEN");
    h.must(
        notifier
            .batch_execute("NOTIFY portcullis_events, 'late'")
            .await,
        "NOTIFY after UNLISTEN",
    );
    let v: i32 = h
        .must(listener.query_one("SELECT 5", &[]).await, "listener query")
        .get(0);
    assert_eq!(v, 5);
    while let Ok(m) = rx.try_recv() {
        if let AsyncMessage::Notification(n) = m {
            panic!("notification after UNLISTEN: {}", n.payload());
        }
    }
}

#[test]
fn psql_round_trips_equal_direct() {
    let h = harness();
    let queries = [
        "SELECT 1",
        "SELECT g, g * g, md5(g::text) FROM generate_series(1, 200) g",
        "SELECT NULL::int, '', 'multi\nline', E'tab\\there', 'ünï ✓'",
        "SELECT current_user, current_database(), current_setting('server_version_num')",
        "SELECT 1; SELECT 2; SELECT 'three'",
        "CREATE TEMP TABLE x AS SELECT 1 AS a; SELECT * FROM x",
        "SELECT to_json(row(1, 'a', ARRAY[1,2,3]))",
    ];
    for sql in queries {
        let via = h.must(h.endpoint().psql(h.bindir(), sql), "psql");
        let direct = h.must(h.direct().psql(h.bindir(), sql), "psql direct");
        assert!(
            via.success,
            "psql -c {sql:?} failed: {}\n{}",
            via.stderr,
            h.context()
        );
        assert!(direct.success, "direct psql -c {sql:?}: {}", direct.stderr);
        assert_eq!(
            via.stdout,
            direct.stdout,
            "psql -c {sql:?}: output differs from direct\n{}",
            h.context()
        );
    }
    // current_user through the gateway is the upstream role, not what the client claimed.
    let user = h.must(h.endpoint().psql(h.bindir(), "SELECT current_user"), "psql");
    assert_eq!(user.stdout.trim(), "app");

    // Errors come back as psql errors with the same text.
    let sql = "SELECT * FROM missing_table";
    let via = h.must(h.endpoint().psql(h.bindir(), sql), "psql");
    let direct = h.must(h.direct().psql(h.bindir(), sql), "psql direct");
    assert!(!via.success && !direct.success);
    assert_eq!(
        via.stderr.lines().next(),
        direct.stderr.lines().next(),
        "error text differs\n{}",
        h.context()
    );

    // A psql script with meta-commands, variables and \gset.
    let script = "SELECT 21 AS half \\gset\nSELECT :half * 2;\n\\echo done\n";
    let path = h.dir.path().join("script.sql");
    std::fs::write(&path, script).unwrap();
    let via = h.must(
        h.endpoint()
            .psql_args(h.bindir(), &["-f", path.to_str().unwrap()]),
        "psql -f",
    );
    assert!(via.success, "psql -f: {}\n{}", via.stderr, h.context());
    assert_eq!(via.stdout, "42\ndone\n");
}

/// libpq's large-object calls use the FunctionCall ('F') message.
#[test]
fn large_objects_use_function_call() {
    let h = harness();
    let src = h.dir.path().join("blob.in");
    let dst = h.dir.path().join("blob.out");
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let script = format!(
        "\\lo_import {}\n\\lo_export :LASTOID {}\nSELECT count(*) FROM pg_largeobject_metadata;\n",
        src.display(),
        dst.display()
    );
    let path = h.dir.path().join("lo.sql");
    std::fs::write(&path, script).unwrap();
    let out = h.must(
        h.endpoint()
            .psql_args(h.bindir(), &["-f", path.to_str().unwrap()]),
        "psql large objects",
    );
    assert!(
        out.success,
        "\\lo_import/\\lo_export failed: {}\n{}",
        out.stderr,
        h.context()
    );
    assert!(
        out.stdout.lines().any(|l| l.trim() == "1"),
        "one large object: {}",
        out.stdout
    );
    let back = std::fs::read(&dst).expect("exported file");
    assert!(
        back == data,
        "large object round trip differs ({} vs {} bytes)",
        back.len(),
        data.len()
    );
}
