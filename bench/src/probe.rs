//! `portcullis-bench probe`: the latency client, run as a child process so that a target can wrap
//! it like any other agent (`portcullis run --agent bench -- portcullis-bench probe ...`).
//!
//! It prints one JSON `ProbeOutput` on stdout. Latencies are recorded in nanoseconds into an
//! hdrhistogram and sent back as (value, count) pairs for the parent to merge across repetitions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::pgclient::{Conn, ConnectParams};

/// The query of pgbench's built-in `select-only` script.
pub const SELECT_SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
const STATEMENT: &str = "bench_select";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// One Query message with the literal inlined (pgbench -M simple).
    Simple,
    /// Parse once, then Bind/Execute/Sync per query (pgbench -M prepared).
    Prepared,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// One connection, next query as soon as the previous answer arrives.
    Closed,
    /// Queries scheduled at a fixed rate; latency counts from the scheduled send time.
    Open,
    /// New connection per sample: connect, authenticate, first query.
    Connect,
    /// One connection that checks the bench tables answer through the target.
    Check,
}

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    #[arg(long, value_enum)]
    pub kind: ProbeKind,
    #[arg(long)]
    pub host: String,
    #[arg(long)]
    pub port: u16,
    #[arg(long)]
    pub user: String,
    #[arg(long)]
    pub dbname: String,
    #[arg(long, value_enum, default_value = "prepared")]
    pub protocol: Protocol,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 1.0)]
    pub duration: f64,
    /// Seconds of traffic before measurement starts.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Open loop: queries per second across all connections.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: connections (one thread each).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Connect: number of connections to time.
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// Rows in pgbench_accounts (scale × 100,000): the range of random aids.
    #[arg(long)]
    pub accounts: u64,
}

#[derive(Serialize, Deserialize, Debug, Default)]
pub struct ProbeOutput {
    /// Queries executed, warm-up included (the denominator for CPU cost).
    pub total_queries: u64,
    /// Queries (or connections) whose latency was recorded.
    pub measured: u64,
    /// Measured completions per second over the measured window, drain included.
    pub achieved_per_sec: f64,
    /// Open loop: scheduled queries never sent because the target fell too far behind; each is
    /// recorded with the time it had waited when the run was cut off (a lower bound).
    pub cut_off: u64,
    /// Recorded latencies in nanoseconds, as (value, count) pairs.
    pub histogram: Vec<(u64, u64)>,
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 600_000_000_000, 3).expect("valid histogram bounds")
}

pub fn histogram_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub fn histogram_from_pairs(pairs: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = new_histogram();
    for &(v, n) in pairs {
        h.saturating_record_n(v, n);
    }
    h
}

pub fn run(args: &ProbeArgs) -> Result<()> {
    let params = ConnectParams {
        host: args.host.clone(),
        port: args.port,
        user: args.user.clone(),
        database: args.dbname.clone(),
        password: std::env::var("PGPASSWORD").ok(),
        timeout: Duration::from_secs(15),
    };
    let out = match args.kind {
        ProbeKind::Closed => closed_loop(&params, args)?,
        ProbeKind::Open => open_loop(&params, args)?,
        ProbeKind::Connect => connect_times(&params, args)?,
        ProbeKind::Check => check(&params, args)?,
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// One query of the select-only workload on a random account.
fn select(conn: &mut Conn, protocol: Protocol, accounts: u64, rng: &mut impl Rng) -> Result<()> {
    let aid = rng.gen_range(1..=accounts);
    let rows = match protocol {
        Protocol::Simple => conn.simple_query(&format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"
        ))?,
        Protocol::Prepared => conn.execute_prepared(STATEMENT, &[&aid.to_string()])?,
    };
    if rows != 1 {
        bail!("account {aid}: expected 1 row, got {rows}");
    }
    Ok(())
}

fn open_session(params: &ConnectParams, protocol: Protocol) -> Result<Conn> {
    let mut conn = Conn::connect(params)?;
    if protocol == Protocol::Prepared {
        conn.prepare(STATEMENT, SELECT_SQL)?;
    }
    Ok(conn)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn closed_loop(params: &ConnectParams, args: &ProbeArgs) -> Result<ProbeOutput> {
    let mut conn = open_session(params, args.protocol)?;
    let mut rng = rand::thread_rng();
    let mut hist = new_histogram();
    let start = Instant::now();
    let measure_from = start + secs(args.warmup);
    let end = measure_from + secs(args.duration);
    let mut total = 0;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        select(&mut conn, args.protocol, args.accounts, &mut rng)?;
        let t1 = Instant::now();
        total += 1;
        if t0 >= measure_from {
            hist.saturating_record(nanos(t1 - t0));
        }
    }
    conn.terminate();
    Ok(ProbeOutput {
        total_queries: total,
        measured: hist.len(),
        achieved_per_sec: hist.len() as f64 / args.duration.max(1e-9),
        cut_off: 0,
        histogram: histogram_pairs(&hist),
    })
}

/// Open loop with coordinated-omission correction: query `i` is due at `start + i / rate`
/// whichever connection sends it, and its latency is measured from that due time. When every
/// connection is busy, due queries wait, and the wait is part of their latency.
fn open_loop(params: &ConnectParams, args: &ProbeArgs) -> Result<ProbeOutput> {
    let rate = args.rate.context("--kind open needs --rate")?;
    if rate <= 0.0 || args.connections == 0 {
        bail!("--rate and --connections must be positive");
    }
    let conns = (0..args.connections)
        .map(|_| open_session(params, Protocol::Prepared))
        .collect::<Result<Vec<_>>>()?;
    let interval_ns = 1e9 / rate;
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + secs(args.warmup);
    let end = measure_from + secs(args.duration);
    // A target far slower than the rate would drain its backlog for ever: cut the run off.
    let cutoff = end + secs(args.duration.max(2.0));
    let next = AtomicU64::new(0);
    let results: Vec<Result<Worker>> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                let next = &next;
                s.spawn(move || -> Result<Worker> {
                    set_fine_timer_slack();
                    let mut w = Worker::new();
                    let mut rng = rand::thread_rng();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let due = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
                        if due >= end {
                            break;
                        }
                        let now = Instant::now();
                        if now >= cutoff {
                            if due >= measure_from {
                                w.cut_off += 1;
                                w.hist.saturating_record(nanos(now - due));
                            }
                            continue;
                        }
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        select(&mut conn, Protocol::Prepared, args.accounts, &mut rng)?;
                        let done = Instant::now();
                        w.total += 1;
                        if due >= measure_from {
                            w.hist.saturating_record(nanos(done - due));
                            w.last_done = w.last_done.max(Some(done));
                        }
                    }
                    conn.terminate();
                    Ok(w)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
            })
            .collect()
    });
    let mut hist = new_histogram();
    let (mut total, mut cut_off, mut last_done) = (0, 0, None);
    for r in results {
        let w = r?;
        hist.add(&w.hist).context("merging histograms")?;
        total += w.total;
        cut_off += w.cut_off;
        last_done = last_done.max(w.last_done);
    }
    let window = last_done
        .map(|t| (t - measure_from).as_secs_f64())
        .unwrap_or(args.duration)
        .max(1e-9);
    let answered = hist.len().saturating_sub(cut_off);
    Ok(ProbeOutput {
        total_queries: total,
        measured: hist.len(),
        achieved_per_sec: answered as f64 / window,
        cut_off,
        histogram: histogram_pairs(&hist),
    })
}

struct Worker {
    hist: Histogram<u64>,
    total: u64,
    cut_off: u64,
    last_done: Option<Instant>,
}

impl Worker {
    fn new() -> Worker {
        Worker {
            hist: new_histogram(),
            total: 0,
            cut_off: 0,
            last_done: None,
        }
    }
}

fn connect_times(params: &ConnectParams, args: &ProbeArgs) -> Result<ProbeOutput> {
    let mut hist = new_histogram();
    let start = Instant::now();
    let deadline = start + secs(args.duration.max(1.0));
    for _ in 0..args.samples {
        if Instant::now() >= deadline && !hist.is_empty() {
            break;
        }
        let t0 = Instant::now();
        let mut conn = Conn::connect(params)?;
        conn.simple_query("SELECT 1")?;
        hist.saturating_record(nanos(t0.elapsed()));
        conn.terminate();
    }
    Ok(ProbeOutput {
        total_queries: hist.len(),
        measured: hist.len(),
        achieved_per_sec: hist.len() as f64 / start.elapsed().as_secs_f64().max(1e-9),
        cut_off: 0,
        histogram: histogram_pairs(&hist),
    })
}

/// Both protocols answer with the rows the setup created: the target really proxies.
fn check(params: &ConnectParams, args: &ProbeArgs) -> Result<ProbeOutput> {
    let mut conn = open_session(params, Protocol::Prepared)?;
    let last = args.accounts.to_string();
    let rows = conn.execute_prepared(STATEMENT, &[&last])?;
    if rows != 1 {
        bail!("pgbench_accounts has no aid {last}: got {rows} rows");
    }
    let wide = conn.simple_query("SELECT * FROM bench_wide WHERE id BETWEEN 1 AND 100")?;
    if wide != 100 {
        bail!("bench_wide: expected 100 rows, got {wide}");
    }
    conn.terminate();
    Ok(ProbeOutput {
        total_queries: 2,
        measured: 0,
        ..ProbeOutput::default()
    })
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Sleeps of a few microseconds would otherwise overshoot by the default 50 µs timer slack,
/// which would show up as latency in every open-loop target alike.
fn set_fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}
