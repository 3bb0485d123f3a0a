//! The workloads, identical for every target: pgbench runs and latency probes, each timed with
//! the proxy's and the box's CPU around it.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::cpu::CpuSample;
use crate::probe::{self, ProbeOutput, Protocol};
use crate::settings::Settings;
use crate::targets::{Endpoint, tail};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PgbenchMode {
    Simple,
    Extended,
    Prepared,
}

impl PgbenchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PgbenchMode::Simple => "simple",
            PgbenchMode::Extended => "extended",
            PgbenchMode::Prepared => "prepared",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// pgbench -S (select-only) with a query mode and a client count.
    Select { mode: PgbenchMode, clients: u32 },
    /// Closed loop, 1 client, every query timed by the probe.
    Latency { protocol: Protocol },
    /// Fixed rate at a percentage of the direct peak, corrected for coordinated omission.
    OpenLoop { percent: u32 },
    /// ~100 rows / ~10 KB per query, 10% of rows with PII (pgbench -M prepared, custom script).
    Wide { clients: u32 },
    /// A new connection per sample: connect, authenticate, first query.
    Connect,
    /// pgbench -S -C: a new connection for every transaction, as agents connect per task.
    ConnectPerTx { clients: u32 },
}

/// Which table of the report a workload belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Group {
    Throughput,
    Latency,
    OpenLoop,
    WideRows,
    Connect,
    ConnectPerTx,
}

impl Workload {
    pub fn id(&self) -> String {
        match self {
            Workload::Select { mode, clients } => format!("select-{}-c{clients}", mode.as_str()),
            Workload::Latency { protocol } => format!("latency-{}-c1", protocol_name(*protocol)),
            Workload::OpenLoop { percent } => format!("open-loop-{percent}pct"),
            Workload::Wide { clients } => format!("wide-rows-c{clients}"),
            Workload::Connect => "connect".into(),
            Workload::ConnectPerTx { clients } => format!("connect-per-tx-c{clients}"),
        }
    }

    pub fn title(&self, s: &Settings) -> String {
        match self {
            Workload::Select { mode, clients } => {
                format!("pgbench -S -M {}, {clients} client(s)", mode.as_str())
            }
            Workload::Latency { protocol } => {
                format!(
                    "closed loop, {} protocol, 1 client",
                    protocol_name(*protocol)
                )
            }
            Workload::OpenLoop { percent } => format!(
                "open loop at {percent}% of the direct peak, prepared, {} connections",
                s.open_loop_connections
            ),
            Workload::Wide { clients } => {
                format!("wide rows (100 rows, ~10 KB, 10% PII), -M prepared, {clients} client(s)")
            }
            Workload::Connect => "connect + authenticate + first query".into(),
            Workload::ConnectPerTx { clients } => {
                format!("pgbench -S -C (a new connection per transaction), {clients} client(s)")
            }
        }
    }

    pub fn group(&self) -> Group {
        match self {
            Workload::Select { .. } => Group::Throughput,
            Workload::Latency { .. } => Group::Latency,
            Workload::OpenLoop { .. } => Group::OpenLoop,
            Workload::Wide { .. } => Group::WideRows,
            Workload::Connect => Group::Connect,
            Workload::ConnectPerTx { .. } => Group::ConnectPerTx,
        }
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Simple => "simple",
        Protocol::Prepared => "prepared",
    }
}

/// Every workload of a run, in the order they are run within one repetition.
pub fn plan(s: &Settings) -> Vec<Workload> {
    let mut w = Vec::new();
    for &mode in &s.select_modes {
        for &clients in &s.select_clients {
            w.push(Workload::Select { mode, clients });
        }
    }
    for protocol in [Protocol::Simple, Protocol::Prepared] {
        w.push(Workload::Latency { protocol });
    }
    for &percent in &s.open_loop_percents {
        w.push(Workload::OpenLoop { percent });
    }
    for &clients in &s.wide_clients {
        w.push(Workload::Wide { clients });
    }
    w.push(Workload::Connect);
    for &clients in &s.connect_per_tx_clients {
        w.push(Workload::ConnectPerTx { clients });
    }
    w
}

/// The figures of one run of one workload on one target.
#[derive(Debug)]
pub struct Measurement {
    pub metrics: BTreeMap<&'static str, f64>,
    pub histogram: Option<Histogram<u64>>,
}

/// What every workload run needs besides the target.
pub struct RunCtx<'a> {
    pub settings: &'a Settings,
    pub pg_bindir: &'a Path,
    pub probe_exe: &'a Path,
    pub wide_script: &'a Path,
    pub scratch: &'a Path,
    pub accounts: u64,
    /// Highest direct pgbench -S TPS of the first repetition: the base of the open-loop rates.
    pub direct_peak_tps: Option<f64>,
}

impl RunCtx<'_> {
    pub fn open_loop_rate(&self, percent: u32) -> Option<f64> {
        self.direct_peak_tps.map(|p| p * f64::from(percent) / 100.0)
    }
}

pub fn run(w: &Workload, ep: &Endpoint, ctx: &RunCtx) -> Result<Measurement> {
    let s = ctx.settings;
    match *w {
        Workload::Select { mode, clients } => {
            let mut args = vec!["-S".to_string()];
            args.extend(pgbench_common(mode, clients, s.pgbench_seconds));
            pgbench(ep, ctx, &args)
        }
        Workload::Wide { clients } => {
            let mut args = vec!["-f".to_string(), ctx.wide_script.display().to_string()];
            args.extend(pgbench_common(
                PgbenchMode::Prepared,
                clients,
                s.pgbench_seconds,
            ));
            pgbench(ep, ctx, &args)
        }
        Workload::ConnectPerTx { clients } => {
            let mut args = vec!["-S".to_string(), "-C".to_string()];
            args.extend(pgbench_common(
                PgbenchMode::Simple,
                clients,
                s.pgbench_seconds,
            ));
            pgbench(ep, ctx, &args)
        }
        Workload::Latency { protocol } => {
            let args = [
                "--kind",
                "closed",
                "--protocol",
                protocol_name(protocol),
                "--duration",
                &s.latency_seconds.to_string(),
                "--warmup",
                &s.warmup_seconds.to_string(),
            ];
            probe(ep, ctx, &args, s.latency_seconds + s.warmup_seconds)
        }
        Workload::OpenLoop { percent } => {
            let rate = ctx.open_loop_rate(percent).ok_or_else(|| {
                anyhow!("no direct peak to take {percent}% of: the direct target has no pgbench -S result")
            })?;
            let args = [
                "--kind",
                "open",
                "--rate",
                &format!("{rate:.0}"),
                "--connections",
                &s.open_loop_connections.to_string(),
                "--duration",
                &s.open_loop_seconds.to_string(),
                "--warmup",
                &s.warmup_seconds.to_string(),
            ];
            // The probe may drain a backlog for up to max(duration, 2 s) past the end.
            let budget = 2.0 * s.open_loop_seconds + s.warmup_seconds + 2.0;
            let mut m = probe(ep, ctx, &args, budget)?;
            m.metrics.insert("target_qps", rate);
            Ok(m)
        }
        Workload::Connect => {
            let samples = s.connect_samples.to_string();
            // The probe stops early after 30 s, so a slow handshake cannot stall the run.
            let args = [
                "--kind",
                "connect",
                "--samples",
                &samples,
                "--duration",
                "30",
            ];
            probe(ep, ctx, &args, 30.0)
        }
    }
}

/// Checks that the target answers the bench tables through both protocols.
pub fn check(ep: &Endpoint, ctx: &RunCtx) -> Result<()> {
    probe(ep, ctx, &["--kind", "check"], 20.0).map(|_| ())
}

fn pgbench_common(mode: PgbenchMode, clients: u32, seconds: u32) -> Vec<String> {
    let threads = clients.min(cpus()).max(1);
    vec![
        "-n".into(),
        "-M".into(),
        mode.as_str().into(),
        "-c".into(),
        clients.to_string(),
        "-j".into(),
        threads.to_string(),
        "-T".into(),
        seconds.to_string(),
    ]
}

pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

fn pgbench(ep: &Endpoint, ctx: &RunCtx, args: &[String]) -> Result<Measurement> {
    let mut cmd = ep.command(&ctx.pg_bindir.join("pgbench"));
    cmd.args(args)
        .args(["-h", &ep.host, "-p", &ep.port.to_string(), "-U", &ep.user])
        .arg("app");
    let cpu = CpuSample::start(ep.proxy_pid);
    let budget = f64::from(ctx.settings.pgbench_seconds) + 60.0;
    let out = run_captured(cmd, ctx.scratch, budget)?;
    let parsed = parse_pgbench(&out.stdout)
        .with_context(|| format!("pgbench printed no result; {}", tail(&out.stderr, 4)))?;
    if !out.success {
        bail!("pgbench failed: {}", tail(&out.stderr, 4));
    }
    if parsed.failed > 0 {
        bail!(
            "pgbench: {} failed transactions; {}",
            parsed.failed,
            tail(&out.stderr, 3)
        );
    }
    let cost = cpu.finish(parsed.transactions);
    let mut metrics = BTreeMap::from([
        ("tps", parsed.tps),
        ("latency_avg_us", parsed.latency_avg_ms * 1000.0),
        ("queries", parsed.transactions as f64),
    ]);
    insert_cost(&mut metrics, cost);
    Ok(Measurement {
        metrics,
        histogram: None,
    })
}

fn probe(ep: &Endpoint, ctx: &RunCtx, args: &[&str], seconds: f64) -> Result<Measurement> {
    let mut cmd = ep.command(ctx.probe_exe);
    cmd.arg("probe")
        .args(args)
        .args(["--host", &ep.host, "--port", &ep.port.to_string()])
        .args(["--user", &ep.user, "--dbname", "app"])
        .args(["--accounts", &ctx.accounts.to_string()]);
    let cpu = CpuSample::start(ep.proxy_pid);
    let out = run_captured(cmd, ctx.scratch, seconds + 60.0)?;
    if !out.success {
        bail!("{}", tail(&out.stderr, 4));
    }
    let p: ProbeOutput = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("probe output is not JSON; {}", tail(&out.stderr, 4)))?;
    let cost = cpu.finish(p.total_queries);
    let hist = probe::histogram_from_pairs(&p.histogram);
    let mut metrics = BTreeMap::from([
        ("queries", p.total_queries as f64),
        ("achieved_qps", p.achieved_per_sec),
    ]);
    if p.cut_off > 0 {
        metrics.insert("cut_off", p.cut_off as f64);
    }
    if !hist.is_empty() {
        metrics.extend(latency_metrics(&hist));
    }
    insert_cost(&mut metrics, cost);
    Ok(Measurement {
        metrics,
        histogram: (!hist.is_empty()).then_some(hist),
    })
}

/// p50, p90, p99, p99.9, max and mean in microseconds.
pub fn latency_metrics(h: &Histogram<u64>) -> Vec<(&'static str, f64)> {
    let us = |ns: u64| ns as f64 / 1000.0;
    vec![
        ("p50_us", us(h.value_at_quantile(0.50))),
        ("p90_us", us(h.value_at_quantile(0.90))),
        ("p99_us", us(h.value_at_quantile(0.99))),
        ("p999_us", us(h.value_at_quantile(0.999))),
        ("max_us", us(h.max())),
        ("mean_us", h.mean() / 1000.0),
    ]
}

fn insert_cost(metrics: &mut BTreeMap<&'static str, f64>, cost: crate::cpu::CpuCost) {
    if let Some(v) = cost.proxy_ms_per_1k_queries {
        metrics.insert("proxy_cpu_ms_per_1k_queries", v);
    }
    if let Some(v) = cost.box_us_per_query {
        metrics.insert("box_cpu_us_per_query", v);
    }
}

struct Captured {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs a command to completion with its output in files (no pipe to fill up), killing it
/// when it overruns its budget.
fn run_captured(mut cmd: Command, scratch: &Path, budget_secs: f64) -> Result<Captured> {
    let out_path: PathBuf = scratch.join("run.out");
    let err_path: PathBuf = scratch.join("run.err");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let deadline = Instant::now() + Duration::from_secs_f64(budget_secs);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "timed out after {budget_secs:.0} s (the target stopped answering?); {}",
                tail(&std::fs::read_to_string(&err_path).unwrap_or_default(), 3)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Captured {
        success: status.success(),
        stdout: std::fs::read_to_string(&out_path)?,
        stderr: std::fs::read_to_string(&err_path)?,
    })
}

#[derive(Debug, PartialEq)]
struct PgbenchResult {
    tps: f64,
    latency_avg_ms: f64,
    transactions: u64,
    failed: u64,
}

fn parse_pgbench(out: &str) -> Result<PgbenchResult> {
    let value = |prefix: &str| -> Option<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
    };
    let tps = value("tps = ").context("no `tps =` line")?.parse()?;
    let latency_avg_ms = value("latency average = ")
        .context("no `latency average` line")?
        .parse()?;
    // "N" with -T; "N/M" with -t.
    let transactions = value("number of transactions actually processed: ")
        .context("no transaction count")?
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()?;
    let failed = value("number of failed transactions: ")
        .map(str::parse)
        .transpose()?
        .unwrap_or(0);
    Ok(PgbenchResult {
        tps,
        latency_avg_ms,
        transactions,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PGBENCH_15: &str = "pgbench (15.8 (Debian 15.8-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 10
query mode: prepared
number of clients: 8
number of threads: 2
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 640123
number of failed transactions: 0 (0.000%)
latency average = 0.124 ms
initial connection time = 21.345 ms
tps = 64012.345678 (without initial connection time)
";

    #[test]
    fn pgbench_15_output_parses() {
        assert_eq!(
            parse_pgbench(PGBENCH_15).unwrap(),
            PgbenchResult {
                tps: 64012.345678,
                latency_avg_ms: 0.124,
                transactions: 640123,
                failed: 0
            }
        );
    }

    #[test]
    fn pgbench_output_without_tps_is_an_error() {
        let cut = PGBENCH_15.replace("tps = ", "");
        assert!(parse_pgbench(&cut).is_err());
    }

    #[test]
    fn every_workload_id_is_unique() {
        let w = plan(&Settings::full());
        let mut ids: Vec<String> = w.iter().map(Workload::id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), w.len());
    }
}
