//! Large results stream through the gateway: a 1,000,000-row result with the gateway's memory
//! bounded, and a client that stops reading stalls nobody else.

use std::time::Duration;

use futures_util::StreamExt;
use testkit::{Harness, RssWatch};

/// Memory the gateway may grow by while a result streams through it. A gateway that buffered the
/// ~220 MB result would blow far past this.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

const ROWS: i64 = 1_000_000;
const PAD: usize = 200;

fn harness() -> Harness {
    let h = Harness::start().expect("start PostgreSQL (and the gateway unless direct)");
    h.must(h.sanity(), "direct sanity check");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn million_row_result_streams_with_bounded_memory() {
    let h = harness();
    let c = h.must(h.endpoint().connect().await, "connect");
    let mut rss = h.gateway.as_ref().and_then(|gw| RssWatch::new(gw.pid()));
    if rss.is_none() {
        eprintln!("direct mode: rows and sums are checked, the gateway memory bound is not");
    }

    let sql = format!("SELECT g, repeat('x', {PAD}) FROM generate_series(1, {ROWS}) g");
    let stream = h.must(
        c.query_raw(&sql, std::iter::empty::<i32>()).await,
        "start the 1M-row query",
    );
    futures_util::pin_mut!(stream);

    // Take one row, then stop reading for a while: the server keeps producing, and a gateway that
    // buffers instead of applying backpressure would swallow the whole result now.
    let first = h.must(stream.next().await.expect("at least one row"), "first row");
    let mut count: i64 = 1;
    let mut sum: i64 = first.get::<_, i32>(0) as i64;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(w) = rss.as_mut() {
            w.sample();
        }
    }

    while let Some(row) = stream.next().await {
        let row = h.must(row, "row of the 1M-row result");
        let g: i32 = row.get(0);
        let pad: &str = row.get(1);
        assert_eq!(pad.len(), PAD, "row {g}: padding");
        sum += g as i64;
        count += 1;
        if count % 25_000 == 0
            && let Some(w) = rss.as_mut()
        {
            w.sample();
        }
    }
    assert_eq!(count, ROWS, "row count\n{}", h.context());
    assert_eq!(sum, ROWS * (ROWS + 1) / 2, "sum of g\n{}", h.context());
    if let Some(w) = rss {
        eprintln!(
            "gateway RSS: baseline {} KiB, peak {} KiB, growth {} KiB over {} samples",
            w.baseline_kib,
            w.peak_kib,
            w.growth_kib(),
            w.samples
        );
        h.check(
            w.growth_kib() < RSS_GROWTH_LIMIT_KIB,
            format!(
                "gateway RSS grew by {} KiB (limit {RSS_GROWTH_LIMIT_KIB} KiB) while streaming {ROWS} rows: \
                 it buffers results instead of streaming them",
                w.growth_kib()
            ),
        );
    }

    // The session is still in sync after the big result.
    let v: i32 = h.must(c.query_one("SELECT 11", &[]).await, "after").get(0);
    assert_eq!(v, 11);
}

/// A million rows through psql (libpq collects the whole result): the client-visible outcome
/// equals direct.
#[test]
fn psql_million_rows_equal_direct() {
    let h = harness();
    let sql = format!(
        "SELECT count(*), sum(length(t)) FROM (SELECT repeat('y', 50) AS t FROM generate_series(1, {ROWS})) s"
    );
    let direct = h.must(h.direct().psql(h.bindir(), &sql), "direct").stdout;
    let via = h.must(h.endpoint().psql(h.bindir(), &sql), "psql");
    assert!(via.success, "psql: {}\n{}", via.stderr, h.context());
    assert_eq!(via.stdout, direct);

    // The rows themselves travel to the client: count the lines psql prints.
    let out = h.must(
        h.endpoint().psql(
            h.bindir(),
            &format!("SELECT g FROM generate_series(1, {ROWS}) g"),
        ),
        "psql 1M rows",
    );
    assert!(out.success, "psql: {}\n{}", out.stderr, h.context());
    let lines = out.stdout.lines().count() as i64;
    assert_eq!(lines, ROWS);
    let last = out.stdout.lines().last().unwrap_or_default();
    assert_eq!(last, ROWS.to_string());
}

/// One connection whose client stops reading a big result must not stall the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_does_not_block_other_sessions() {
    let h = harness();
    let ep = h.endpoint();
    let slow = h.must(ep.connect().await, "connect the slow client");
    let stream = h.must(
        slow.query_raw(
            "SELECT g, repeat('z', 500) FROM generate_series(1, 2000000) g",
            std::iter::empty::<i32>(),
        )
        .await,
        "start the big query",
    );
    futures_util::pin_mut!(stream);
    h.must(stream.next().await.expect("one row"), "first row");
    // The slow client now reads nothing: the server fills every buffer on its path.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let others = async {
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(ep.connect().await?);
        }
        for round in 0..50i32 {
            for c in &clients {
                let v: i32 = c.query_one("SELECT $1::int4 + 1", &[&round]).await?.get(0);
                anyhow::ensure!(v == round + 1, "wrong answer");
            }
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(60), others).await {
        Ok(r) => h.must(r, "other sessions while one reader is stalled"),
        Err(_) => panic!(
            "other sessions made no progress in 60 s while one client stalled\n{}",
            h.context()
        ),
    }
    // The stalled one resumes and reads everything.
    let mut n = 1u64;
    while let Some(r) = stream.next().await {
        h.must(r, "stalled stream resumes");
        n += 1;
    }
    assert_eq!(n, 2_000_000);
}

/// Single values far larger than any sensible read buffer, in a result and in a parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_single_values_both_ways() {
    let h = harness();
    let c = h.must(h.endpoint().connect().await, "connect");
    let mut rss = h.gateway.as_ref().and_then(|gw| RssWatch::new(gw.pid()));

    const OUT: i32 = 100 << 20;
    let row = h.must(
        within(
            &h,
            c.query_one("SELECT repeat('ab', $1::int4 / 2) || 'END'", &[&OUT]),
        )
        .await,
        "a 100 MiB value in a DataRow",
    );
    let v: &str = row.get(0);
    assert_eq!(v.len(), OUT as usize + 3);
    assert!(v.ends_with("abEND") && v.starts_with("abab"));
    assert!(
        v.as_bytes()[..OUT as usize].chunks(2).all(|p| p == b"ab"),
        "the value arrived altered\n{}",
        h.context()
    );
    drop(row);
    if let Some(w) = rss.as_mut() {
        w.sample();
    }

    // A 32 MiB Bind parameter passes intact.
    let param = format!("{}END", "q".repeat(32 << 20));
    let row = h.must(
        within(
            &h,
            c.query_one(
                "SELECT length($1::text), right($1::text, 4), strpos($1::text, 'x')",
                &[&param],
            ),
        )
        .await,
        "a 32 MiB Bind parameter",
    );
    assert_eq!(row.get::<_, i32>(0) as usize, param.len());
    assert_eq!(row.get::<_, &str>(1), "qEND");
    assert_eq!(row.get::<_, i32>(2), 0);

    // An 80 MiB one: PostgreSQL takes it (its limit is 1 GiB); a gateway that must see a whole
    // client message to inspect it may cap their size, but then refuses with a clear 54000
    // (program_limit_exceeded) rather than hanging or corrupting the value, and the session
    // goes on.
    let param = format!("{}END", "w".repeat(80 << 20));
    let fresh = h.must(h.endpoint().connect().await, "connect");
    match within(
        &h,
        fresh.query_one("SELECT length($1::text), right($1::text, 4)", &[&param]),
    )
    .await
    {
        Ok(row) => {
            assert_eq!(row.get::<_, i32>(0) as usize, param.len());
            assert_eq!(row.get::<_, &str>(1), "wEND");
        }
        Err(e) => {
            let db = e.as_db_error().unwrap_or_else(|| {
                panic!(
                    "an oversized client message must get an ErrorResponse, got {e:?}\n{}",
                    h.context()
                )
            });
            assert_eq!(db.code().code(), "54000", "{db:?}");
            eprintln!("80 MiB Bind refused: {}", db.message());
            h.check(!h.is_direct(), "PostgreSQL itself refused an 80 MiB Bind");
            let row = h.must(
                within(&h, fresh.query_one("SELECT 41 + 1", &[])).await,
                "the session goes on after an oversized Bind",
            );
            assert_eq!(row.get::<_, i32>(0), 42);
        }
    }
    if let Some(mut w) = rss {
        w.sample();
        // Reported, not asserted: a gateway may hold one whole message while it frames it.
        eprintln!(
            "gateway RSS growth with 100 MiB / 32 MiB / 80 MiB single messages: {} KiB",
            w.growth_kib()
        );
    }
}

/// Awaits `f`, failing the test rather than hanging if nothing happens for two minutes.
async fn within<T>(h: &Harness, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .unwrap_or_else(|_| panic!("no answer within 120 s (hang)\n{}", h.context()))
}
