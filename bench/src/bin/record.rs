//! Recorder throughput, verify speed and size on disk, on real files.
//!
//! - **Throughput on wide rows**: one session hands the recorder pre-built batches of 100 rows of
//!   20 columns (~1.3 KB per row: ids, timestamps, amounts, short and long text, masked values);
//!   figures are MB of values per second of the `recorder` thread's CPU time (so other load on a
//!   shared machine does not count; the goal is ≥ 200 MB/s per core), with the wall-clock rate.
//! - **Verify**: `recordings verify` over that log, MB of segment per second of wall time.
//! - **Size per 1,000 queries**: simple queries (request, verdict, one column, one row, complete)
//!   as a session of an agent's would look, bytes on disk per 1,000; then the first search's
//!   speed, building the statements' full text from those segments, and what that adds on disk.
//!
//! Medians over `--reps` runs. `cargo run --release -p portcullis-bench --bin record -- [--reps N]
//! [--mb N] [--queries N] [--zstd-level N]`

use std::time::{Duration, Instant};

use portcullis::record::checkpoint::{Verifier, pub_path};
use portcullis::record::index::{INDEX_FILE, Index};
use portcullis::record::texts::{TEXTS_FILE, Texts};
use portcullis::record::{
    Bytes, Column, Recorder, RecordingConfig, Request, RequestKind, Row, SessionStart, Verdict,
};

fn arg<T: std::str::FromStr<Err: std::fmt::Debug>>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// CPU seconds of this process's thread named `name` (from /proc, in clock ticks).
fn thread_cpu(name: &str) -> Option<f64> {
    let ticks = unsafe_free_clk_tck();
    for e in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = e.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = after.split(' ').collect();
        let (utime, stime): (f64, f64) = (f[11].parse().ok()?, f[12].parse().ok()?);
        return Some((utime + stime) / ticks);
    }
    None
}

fn unsafe_free_clk_tck() -> f64 {
    // getconf is a process, but keeps this binary free of `unsafe` for sysconf.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn wide_row(i: u64) -> Row {
    let mut r: Row = Vec::with_capacity(20);
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    r.push(Some(Bytes(i.to_string().into_bytes())));
    for c in 0..19 {
        let v = match c % 5 {
            0 => format!(
                "2026-11-{:02} {:02}:{:02}:{:02}.{:06}+00",
                next() % 28 + 1,
                next() % 24,
                next() % 60,
                next() % 60,
                next() % 1_000_000
            ),
            1 => format!("{}.{:02}", next() % 100_000, next() % 100),
            2 => format!("customer-{:x}@example.com", next() % 1_000_000)
                .replace(|ch: char| ch.is_ascii_digit(), "*"),
            3 => {
                let words = [
                    "shipped",
                    "pending",
                    "refund",
                    "order",
                    "late",
                    "priority",
                    "warehouse",
                    "note",
                ];
                (0..24)
                    .map(|_| words[(next() % 8) as usize])
                    .collect::<Vec<_>>()
                    .join(" ")
            }
            _ => format!("{:016x}{:016x}", next(), next()),
        };
        r.push(Some(Bytes(v.into_bytes())));
    }
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Bytes of the files in `dir` whose names start with `prefix` (a SQLite file's `-wal` and `-shm`
/// with it).
fn dir_bytes(dir: &std::path::Path, prefix: &str) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn main() -> anyhow::Result<()> {
    let reps: u64 = arg("--reps", 5);
    let mb: u64 = arg("--mb", 256);
    let queries: u64 = arg("--queries", 20_000);
    let zstd_level = arg("--zstd-level", RecordingConfig::default().zstd_level);

    let batches: Vec<Vec<Row>> = {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut i = 0;
        while bytes < mb << 20 {
            let batch: Vec<Row> = (0..100)
                .map(|_| {
                    i += 1;
                    wide_row(i)
                })
                .collect();
            bytes += batch
                .iter()
                .flatten()
                .flatten()
                .map(|b| b.0.len() as u64)
                .sum::<u64>();
            out.push(batch);
        }
        out
    };
    let value_bytes: u64 = batches
        .iter()
        .flatten()
        .flatten()
        .flatten()
        .map(|b| b.0.len() as u64)
        .sum();
    let rows = batches.len() * 100;

    let (mut per_core, mut wall, mut verify_mbs, mut ratio) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        let tmp = tempfile::tempdir()?;
        let cfg = RecordingConfig {
            origin: Some("bench/portcullis".into()),
            max_queue_bytes: 1 << 30,
            zstd_level,
            ..Default::default()
        };
        let recorder = Recorder::start(&cfg, tmp.path())?;
        let h = recorder.handle();
        let mut s = h.begin(SessionStart {
            target: "bench".into(),
            ..Default::default()
        })?;
        let cpu0 = thread_cpu("recorder").unwrap_or(0.0);
        let start = Instant::now();
        for (n, batch) in batches.iter().enumerate() {
            if n % 100 == 0 {
                s.request(Request {
                    kind: RequestKind::Query,
                    statement: None,
                    text: "SELECT * FROM orders_wide".into(),
                    params: vec![],
                })?;
            }
            let mut batch = Some(batch.clone());
            // A full queue is refused; the bench waits as a session would back off.
            while let Some(b) = batch.take() {
                if let Err(e) = s.rows(b.clone()) {
                    assert_eq!(e, portcullis::record::RecordError::Overloaded);
                    batch = Some(b);
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        h.flush().wait()?;
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = thread_cpu("recorder").unwrap_or(f64::NAN) - cpu0;
        drop(s);
        recorder.shutdown();
        per_core.push(value_bytes as f64 / 1e6 / cpu);
        wall.push(value_bytes as f64 / 1e6 / elapsed);
        let dir = tmp.path().join("recordings");
        let on_disk = dir_bytes(&dir, "");
        ratio.push(value_bytes as f64 / on_disk as f64);
        let verifiers = Verifier::read_file(&pub_path(&cfg.key_file(tmp.path())))?;
        let t = Instant::now();
        let report = portcullis::record::verify::verify(&dir, &verifiers, None)?
            .map_err(|p| anyhow::anyhow!("{p}"))?;
        verify_mbs.push(report.bytes as f64 / 1e6 / t.elapsed().as_secs_f64());
    }

    // Size on disk of simple queries.
    let tmp = tempfile::tempdir()?;
    let cfg = RecordingConfig {
        origin: Some("bench/portcullis".into()),
        zstd_level,
        ..Default::default()
    };
    let recorder = Recorder::start(&cfg, tmp.path())?;
    let h = recorder.handle();
    let per_session = 50;
    for n in 0..queries / per_session {
        let mut s = h.begin(SessionStart {
            agent: Some("agent-7".into()),
            pid: Some(4000 + n as u32),
            target: "local".into(),
            database: "shop".into(),
            upstream_user: "app".into(),
            ..Default::default()
        })?;
        for q in 0..per_session {
            let id = n * per_session + q;
            s.request(Request {
                kind: RequestKind::Query,
                statement: None,
                text: format!("SELECT id, status, total FROM orders WHERE id = {id}"),
                params: vec![],
            })?;
            s.verdict(Verdict::allow(Some("default/read".into())))?;
            s.columns(vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    format: 0,
                },
                Column {
                    name: "status".into(),
                    type_oid: 25,
                    format: 0,
                },
                Column {
                    name: "total".into(),
                    type_oid: 1700,
                    format: 0,
                },
            ])?;
            s.rows(vec![vec![
                Some(Bytes(id.to_string().into_bytes())),
                Some(Bytes::from("shipped")),
                Some(Bytes(format!("{}.{:02}", id % 997, id % 100).into_bytes())),
            ]])?;
            s.complete("SELECT 1", 60, 120, Duration::from_micros(90))?;
        }
        s.end("client closed")?;
        if n % 20 == 0 {
            h.flush().wait()?;
        }
    }
    h.flush().wait()?;
    recorder.shutdown();
    let dir = tmp.path().join("recordings");
    let recorded = dir_bytes(&dir, "");
    let index = dir_bytes(&dir, INDEX_FILE);
    // The first `list --grep` over that log: the full text built from the segments.
    let segments = recorded - index;
    let started = Instant::now();
    let until = Index::open(&dir)?.indexed_seq()?;
    let mut texts = Texts::open(&dir)?;
    texts.catch_up(&dir, until)?;
    drop(texts);
    let first_search = segments as f64 / 1e6 / started.elapsed().as_secs_f64();
    let full_text = dir_bytes(&dir, TEXTS_FILE);

    println!(
        "recorder, wide rows: {rows} rows of 20 columns, {:.1} MB of values, {reps} runs",
        value_bytes as f64 / 1e6
    );
    println!(
        "  throughput         {:8.1} MB/s per core (recorder thread CPU)",
        median(per_core)
    );
    println!("  throughput, wall   {:8.1} MB/s", median(wall));
    println!("  compression        {:8.2}x values/on-disk", median(ratio));
    println!(
        "verify               {:8.1} MB/s of segments",
        median(verify_mbs)
    );
    let per_1000 = |bytes: u64| bytes as f64 / (queries as f64 / 1000.0);
    println!(
        "simple queries       {:8.0} bytes on disk per 1,000 queries ({queries} queries, segments + checkpoints)",
        per_1000(segments)
    );
    println!(
        "  with the index     {:8.0} bytes per 1,000 queries",
        per_1000(segments + index)
    );
    println!(
        "  with the full text {:8.0} bytes per 1,000 queries, once a search built it",
        per_1000(segments + index + full_text)
    );
    println!("first search         {first_search:8.1} MB/s of segments (full text built, wall)");
    Ok(())
}
