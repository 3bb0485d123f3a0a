//! COPY through the gateway: more than 100 MB each way with every row checked, COPY errors and
//! CopyFail mid-stream, binary COPY, and psql's \copy.

use futures_util::StreamExt;
use testkit::{Harness, RssWatch, copy_in, copy_in_abandoned};

/// Rows whose text form totals a little over 100 MB.
const ROWS: i64 = 520_000;
/// Payload of row `id`: its zero-padded id, 19 times (190 bytes). PostgreSQL recomputes the
/// same with `repeat(lpad(id::text, 10, '0'), 19)`, so every row's content is checked.
fn payload(id: i64) -> String {
    format!("{id:010}").repeat(19)
}
const PAYLOAD_SQL: &str = "repeat(lpad(id::text, 10, '0'), 19)";
const MIN_BYTES: u64 = 100_000_000;
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

fn harness() -> Harness {
    let h = Harness::start().expect("start PostgreSQL (and the gateway unless direct)");
    h.must(h.sanity(), "direct sanity check");
    h
}

/// The COPY text for rows `from..to`, in chunks of about 64 KiB like a real client sends.
fn copy_chunks(from: i64, to: i64) -> impl Iterator<Item = Vec<u8>> {
    let mut id = from;
    std::iter::from_fn(move || {
        if id >= to {
            return None;
        }
        let mut chunk = Vec::with_capacity(70_000);
        while id < to && chunk.len() < 64 * 1024 {
            chunk.extend_from_slice(format!("{id}\t{}\n", payload(id)).as_bytes());
            id += 1;
        }
        Some(chunk)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_over_100mb() {
    let h = harness();
    let c = h.must(h.endpoint().connect().await, "connect");
    h.must(
        c.batch_execute("CREATE TABLE big (id int8 PRIMARY KEY, payload text NOT NULL)")
            .await,
        "create table",
    );

    // COPY FROM STDIN.
    let sent: u64 = copy_chunks(0, ROWS).map(|c| c.len() as u64).sum();
    assert!(sent >= MIN_BYTES, "test data is only {sent} bytes");
    let rows = h.must(
        copy_in(
            &c,
            "COPY big (id, payload) FROM STDIN",
            copy_chunks(0, ROWS),
        )
        .await,
        "COPY FROM STDIN",
    );
    assert_eq!(rows, ROWS as u64, "rows COPY reports\n{}", h.context());
    let check = h.must(
        c.query_one(
            &format!(
                "SELECT count(*), sum(id)::int8, count(*) FILTER (WHERE payload <> {PAYLOAD_SQL}), \
                 sum(length(payload))::int8 FROM big"
            ),
            &[],
        )
        .await,
        "verify copied rows",
    );
    assert_eq!(check.get::<_, i64>(0), ROWS);
    assert_eq!(check.get::<_, i64>(1), ROWS * (ROWS - 1) / 2);
    assert_eq!(
        check.get::<_, i64>(2),
        0,
        "rows whose payload arrived altered\n{}",
        h.context()
    );
    assert_eq!(check.get::<_, i64>(3), ROWS * 190);

    // COPY TO STDOUT, every line checked, the gateway's memory watched.
    let mut rss = h.gateway.as_ref().and_then(|gw| RssWatch::new(gw.pid()));
    let stream = h.must(
        c.copy_out("COPY (SELECT id, payload FROM big ORDER BY id) TO STDOUT")
            .await,
        "COPY TO STDOUT",
    );
    futures_util::pin_mut!(stream);
    let mut received: u64 = 0;
    let mut next_id: i64 = 0;
    let mut partial: Vec<u8> = Vec::new();
    let mut chunks = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = h.must(chunk, "COPY data");
        if chunks == 0 {
            // Stop reading for a while: a gateway without backpressure would take in the whole
            // COPY now.
            for _ in 0..30 {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                if let Some(w) = rss.as_mut() {
                    w.sample();
                }
            }
        }
        received += chunk.len() as u64;
        partial.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(nl) = partial[start..].iter().position(|&b| b == b'\n') {
            let line = std::str::from_utf8(&partial[start..start + nl]).expect("utf8 line");
            let expected = format!("{next_id}\t{}", payload(next_id));
            assert!(
                line == expected,
                "line {next_id} differs: {:?}\n{}",
                &line[..line.len().min(80)],
                h.context()
            );
            next_id += 1;
            start += nl + 1;
        }
        partial.drain(..start);
        chunks += 1;
        if chunks.is_multiple_of(200)
            && let Some(w) = rss.as_mut()
        {
            w.sample();
        }
    }
    assert!(partial.is_empty(), "trailing partial line");
    assert_eq!(next_id, ROWS, "rows out\n{}", h.context());
    assert_eq!(received, sent, "bytes out equal bytes in");
    if let Some(w) = rss {
        eprintln!(
            "gateway RSS during COPY TO: growth {} KiB over {} samples",
            w.growth_kib(),
            w.samples
        );
        h.check(
            w.growth_kib() < RSS_GROWTH_LIMIT_KIB,
            format!(
                "gateway RSS grew by {} KiB during a 100 MB COPY TO STDOUT",
                w.growth_kib()
            ),
        );
    }
    let v: i32 = h
        .must(c.query_one("SELECT 3", &[]).await, "after COPY")
        .get(0);
    assert_eq!(v, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_errors_leave_the_session_usable() {
    let h = harness();
    let c = h.must(h.endpoint().connect().await, "connect");
    h.must(
        c.batch_execute("CREATE TABLE t (id int8 PRIMARY KEY, payload text)")
            .await,
        "create table",
    );

    // Bad data in the middle of the stream: the server rejects the COPY with 22P02.
    let mut chunks: Vec<Vec<u8>> = copy_chunks(0, 5000).collect();
    chunks.push(b"not-a-number\tboom\n".to_vec());
    chunks.extend(copy_chunks(5000, 10_000));
    let err = copy_in(&c, "COPY t FROM STDIN", chunks)
        .await
        .expect_err("COPY with a malformed row must fail");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("22P02"),
        "invalid_text_representation, got {err:?}\n{}",
        h.context()
    );
    let n: i64 = h
        .must(
            c.query_one("SELECT count(*) FROM t", &[]).await,
            "count after failed COPY",
        )
        .get(0);
    assert_eq!(n, 0, "a failed COPY inserts nothing");

    // The client abandons a COPY half way: the driver sends CopyFail and the server rolls back.
    let r = copy_in_abandoned(&c, "COPY t FROM STDIN", copy_chunks(0, 1000)).await;
    h.must(r, "feeding the abandoned COPY");
    let n: i64 = h
        .must(
            c.query_one("SELECT count(*) FROM t", &[]).await,
            "count after CopyFail",
        )
        .get(0);
    assert_eq!(n, 0, "an abandoned COPY inserts nothing\n{}", h.context());

    // (No COPY into a missing table here: tokio-postgres 0.7 desynchronises after that one.)
    let rows = h.must(
        copy_in(&c, "COPY t FROM STDIN", copy_chunks(0, 1000)).await,
        "good COPY after failures",
    );
    assert_eq!(rows, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_copy_round_trip() {
    let h = harness();
    let c = h.must(h.endpoint().connect().await, "connect");
    h.must(
        c.batch_execute(
            "CREATE TABLE src AS SELECT g AS id, g * 1.5 AS f, md5(g::text)::bytea AS b, \
             now() - g * interval '1 second' AS ts FROM generate_series(1, 50000) g;
             CREATE TABLE dst (LIKE src);",
        )
        .await,
        "tables",
    );
    let stream = h.must(
        c.copy_out("COPY src TO STDOUT (FORMAT binary)").await,
        "binary COPY TO",
    );
    futures_util::pin_mut!(stream);
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.push(h.must(chunk, "binary COPY data").to_vec());
    }
    let rows = h.must(
        copy_in(&c, "COPY dst FROM STDIN (FORMAT binary)", data).await,
        "binary COPY FROM",
    );
    assert_eq!(rows, 50_000);
    let diff: i64 = h
        .must(
            c.query_one(
                "SELECT count(*) FROM ((TABLE src EXCEPT ALL TABLE dst) UNION ALL (TABLE dst EXCEPT ALL TABLE src)) d",
                &[],
            )
            .await,
            "compare",
        )
        .get(0);
    assert_eq!(
        diff,
        0,
        "binary COPY round trip altered rows\n{}",
        h.context()
    );
}

#[test]
fn psql_copy_round_trip() {
    let h = harness();
    let input = h.dir.path().join("in.tsv");
    let output = h.dir.path().join("out.tsv");
    let data: Vec<u8> = copy_chunks(0, 50_000).flatten().collect();
    std::fs::write(&input, &data).unwrap();
    let script = format!(
        "CREATE TABLE p (id int8, payload text);\n\\copy p FROM '{}'\n\\copy (SELECT * FROM p ORDER BY id) TO '{}'\nSELECT count(*) FROM p;\n",
        input.display(),
        output.display()
    );
    let path = h.dir.path().join("copy.sql");
    std::fs::write(&path, script).unwrap();
    let out = h.must(
        h.endpoint()
            .psql_args(h.bindir(), &["-f", path.to_str().unwrap()]),
        "psql \\copy",
    );
    assert!(out.success, "psql \\copy: {}\n{}", out.stderr, h.context());
    assert!(
        out.stdout.lines().any(|l| l == "50000"),
        "count: {}",
        out.stdout
    );
    let back = std::fs::read(&output).unwrap();
    assert!(back == data, "\\copy out differs from \\copy in");

    // COPY TO STDOUT through psql -c equals direct.
    let sql = "COPY (SELECT id, payload FROM p WHERE id % 1000 = 0 ORDER BY id) TO STDOUT";
    let via = h.must(h.endpoint().psql(h.bindir(), sql), "psql COPY TO STDOUT");
    let direct = h.must(h.direct().psql(h.bindir(), sql), "direct");
    assert!(via.success, "{}", via.stderr);
    assert_eq!(via.stdout, direct.stdout);
    assert_eq!(via.stdout.lines().count(), 50);
}
