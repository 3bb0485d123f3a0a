//! What recording adds to a simple query's CPU, the "at most 3 µs per simple query".
//!
//! One session runs `--queries` simple queries the way the record stage sees them: the statement
//! text through the detectors, its request and verdict records, then the masked response (one
//! RowDescription, one DataRow, CommandComplete, ReadyForQuery) through the response tap. Queries
//! are spaced by `--pace-us` of sleep, as a client at c=1 spaces them, so the recorder thread goes
//! idle between them as it does in the gateway. Each repetition runs the same loop twice, with
//! recording and without (the sleeps alone), and the figure is the difference in CPU time per
//! query. The session's thread is clocked around each query's work, so that the sleeps' timer
//! wakeups, which swing by microseconds a query on a VM, stay out of the difference; the
//! recorder's share is the CPU of the process's other threads over the whole loop. Medians over
//! `--reps`; the segments go to a temporary directory on the disk `TMPDIR` names.
//!
//! With `--rows N` each query instead reads N rows of the harness's wide-row table (`bench_wide`,
//! as `default` masks them): what recording adds to the `wide-rows` workload.
//!
//! `cargo run --release -p portcullis-bench --bin record_query -- [--reps N] [--queries N]
//! [--pace-us N] [--rows N]`

use std::time::Duration;

#[path = "../wide.rs"]
mod wide;

use portcullis::mask::{MaskRules, Masker};
use portcullis::pipeline::record::{Answer, Responses};
use portcullis::protocol::postgres::frame::write_message;
use portcullis::protocol::postgres::messages::{
    FieldDesc, encode_data_row, encode_ready_for_query, encode_row_description,
};
use portcullis::record::{Recorder, RecordingConfig, RequestKind, SessionStart, Verdict};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn cpu(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU of the whole process and of this thread.
fn now() -> (Duration, Duration) {
    (
        cpu(libc::CLOCK_PROCESS_CPUTIME_ID),
        cpu(libc::CLOCK_THREAD_CPUTIME_ID),
    )
}

/// A simple query's result as the client receives it: `SELECT id, status, total ...`, one row.
fn response(id: u64) -> Vec<u8> {
    let mut wire = Vec::new();
    row_description(&mut wire, &[("id", 20), ("status", 25), ("total", 1700)]);
    let (id_text, total) = (id.to_string(), format!("{}.{:02}", id % 997, id % 100));
    let values = [id_text.as_str(), "shipped", total.as_str()];
    encode_data_row(&values.map(|v| Some(v.as_bytes())), &mut wire);
    write_message(&mut wire, b'C', |o| o.extend_from_slice(b"SELECT 1\0"));
    encode_ready_for_query(b'I', &mut wire);
    wire
}

/// The harness's wide-row result (`bench_wide`, `rows` of them from `first`) as the client
/// receives it after `default`'s masking: one row in ten has a masked email and card number.
fn wide_response(first: u64, rows: u64) -> Vec<u8> {
    let mut wire = Vec::new();
    row_description(&mut wire, &wide::COLUMNS);
    let cities = ["Lisbon", "Osaka", "Denver", "Nairobi", "Oslo", "Quito"];
    for g in first..first + rows {
        let masked = g % 10 == 3;
        let (id, customer) = (g.to_string(), format!("customer {g}"));
        // 48 hex digits, as `left(md5(g) || md5(-g), 48)`.
        let note = format!(
            "{:016x}{:016x}{:016x}",
            g.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            !g,
            g << 7
        );
        let values = [
            Some(id.as_str()),
            Some(customer.as_str()),
            masked.then_some("c*******@example.com"),
            masked.then_some("************1111"),
            Some(cities[(g % 6) as usize]),
            Some(note.as_str()),
        ];
        encode_data_row(&values.map(|v| v.map(str::as_bytes)), &mut wire);
    }
    write_message(&mut wire, b'C', |o| {
        o.extend_from_slice(format!("SELECT {rows}\0").as_bytes())
    });
    encode_ready_for_query(b'I', &mut wire);
    wire
}

/// How many distinct wide results a run cycles through.
const WIDE_DISTINCT: u64 = 64;

/// A RowDescription of text-format columns from no table.
fn row_description(wire: &mut Vec<u8>, columns: &[(&str, u32)]) {
    let fields: Vec<FieldDesc<'_>> = columns
        .iter()
        .map(|&(name, type_oid)| FieldDesc {
            name: name.as_bytes(),
            table_oid: 0,
            attnum: 0,
            type_oid,
            type_len: -1,
            type_mod: -1,
            format: 0,
        })
        .collect();
    encode_row_description(&fields, wire);
}

struct Run {
    /// CPU per query, with recording minus without.
    added: f64,
    /// Of which on the session's thread.
    session: f64,
}

fn run(queries: u64, pace: Duration, rows: u64, masker: &Masker) -> anyhow::Result<Run> {
    let texts: Vec<String> = (0..queries)
        .map(|i| format!("SELECT id, status, total FROM orders WHERE id = {i}"))
        .collect();
    // Wide results cycle through a few distinct ones, so that a result is in the cache when the
    // tap reads it, as the gateway's just-received buffer is: 50 MB of distinct results would
    // time the memory instead.
    let results: Vec<Vec<u8>> = match rows {
        0 => (0..queries).map(response).collect(),
        _ => (0..queries.min(WIDE_DISTINCT))
            .map(|i| wide_response(1 + i * rows % 9_900, rows))
            .collect(),
    };
    let statements: Vec<(&String, &Vec<u8>)> = texts.iter().zip(results.iter().cycle()).collect();

    // Without recording: the sleeps, the loop and the clock reads.
    let (p0, t0) = now();
    let mut off_work = Duration::ZERO;
    for &(sql, wire) in &statements {
        let start = cpu(libc::CLOCK_THREAD_CPUTIME_ID);
        std::hint::black_box((sql, wire));
        off_work += cpu(libc::CLOCK_THREAD_CPUTIME_ID) - start;
        std::thread::sleep(pace);
    }
    let (p1, t1) = now();
    let off_others = (p1 - p0).saturating_sub(t1 - t0);

    // With recording, as `RecordGate::check` and `ResponseTap::written` call it.
    let tmp = tempfile::tempdir()?;
    let cfg = RecordingConfig {
        origin: Some("bench/portcullis".into()),
        ..Default::default()
    };
    let recorder = Recorder::start(&cfg, tmp.path())?;
    let handle = recorder.handle();
    let mut rec = handle.begin(SessionStart {
        agent: Some("agent-7".into()),
        target: "local".into(),
        database: "shop".into(),
        upstream_user: "app".into(),
        ..Default::default()
    })?;
    handle.flush().wait()?;
    let mut responses = Responses::new(1 << 20);
    let (p0, t0) = now();
    let mut on_work = Duration::ZERO;
    for &(sql, wire) in &statements {
        let start = cpu(libc::CLOCK_THREAD_CPUTIME_ID);
        // As the gate does: the statement's own text unless the detectors redacted some of it.
        let redacted = (masker.redact_detected(sql.as_bytes()))
            .map(String::from_utf8)
            .transpose()?;
        let text = redacted.as_deref().unwrap_or(sql);
        let bytes_in = 6 + text.len() as u64;
        rec.hold();
        rec.request_of(RequestKind::Query, None, text, &[])?;
        responses.request(Answer::Query, rec.stmt(), bytes_in);
        rec.verdict(Verdict::allow(Some("default/read".into())))?;
        rec.hand_over()?;
        let mut batch = rec.batch();
        responses.feed(wire, &mut batch);
        responses.flush(&mut batch);
        drop(batch);
        on_work += cpu(libc::CLOCK_THREAD_CPUTIME_ID) - start;
        std::thread::sleep(pace);
    }
    handle.flush().wait()?;
    let (p1, t1) = now();
    let on_others = (p1 - p0).saturating_sub(t1 - t0);
    rec.end("done")?;
    recorder.shutdown();
    let per_query = |d: Duration| d.as_secs_f64() * 1e6 / queries as f64;
    let session = per_query(on_work) - per_query(off_work);
    Ok(Run {
        added: session + per_query(on_others) - per_query(off_others),
        session,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let reps = arg("--reps", 5);
    let queries = arg("--queries", 20_000);
    let pace = Duration::from_micros(arg("--pace-us", 100));
    let rows = arg("--rows", 0);
    let masker = Masker::new(&MaskRules::builtin_pii())?;
    let (mut added, mut session) = (vec![], vec![]);
    for _ in 0..reps {
        let r = run(queries, pace, rows, &masker)?;
        added.push(r.added);
        session.push(r.session);
    }
    let (added, session) = (median(added), median(session));
    let what = match rows {
        0 => "simple queries".to_owned(),
        n => format!("wide-row queries ({n} rows of bench_wide each)"),
    };
    println!(
        "recording, {what}: {queries} per run, {} µs apart, {reps} runs (medians)",
        pace.as_micros()
    );
    println!("  added CPU per query       {added:6.2} µs (every thread, recording on minus off)");
    println!("    on the session's thread {session:6.2} µs");
    println!("    on the recorder thread  {:6.2} µs", added - session);
    Ok(())
}
