//! The run's results: the JSON document (schema `portcullis-bench/1`) and the Markdown built
//! from it, so the tables can always be regenerated from a stored JSON file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::workloads::Group;

pub const SCHEMA: &str = "portcullis-bench/1";

#[derive(Serialize, Deserialize, Debug)]
pub struct Report {
    pub schema: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    pub duration_s: f64,
    pub command: String,
    pub settings: serde_json::Value,
    pub host: Host,
    /// Highest direct pgbench -S TPS in the first repetition: the base of the open-loop rates.
    pub direct_peak_tps: Option<f64>,
    /// Stopped early by Ctrl-C or SIGTERM: the results are those of the steps that ran.
    #[serde(default)]
    pub interrupted: bool,
    pub workloads: Vec<WorkloadInfo>,
    pub targets: Vec<TargetReport>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Host {
    pub cpus: u32,
    pub cpu_model: Option<String>,
    pub kernel: Option<String>,
    pub postgres: Option<String>,
    /// 1-minute load average before setup and after the last workload (the latter still holds
    /// the harness's own last minute).
    pub load_avg_start: Option<f64>,
    pub load_avg_end: Option<f64>,
    /// Share of all CPUs busy during a quiet window before setup and after the targets stopped,
    /// when the harness runs nothing: other work on the machine.
    #[serde(default)]
    pub background_busy_start: Option<f64>,
    #[serde(default)]
    pub background_busy_end: Option<f64>,
}

/// Background CPU above this share of the machine is reported as other work running.
pub const BUSY_BACKGROUND: f64 = 0.15;

/// The 1-minute load average, from /proc/loadavg.
pub fn load_avg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[derive(Serialize, Deserialize, Debug)]
pub struct WorkloadInfo {
    pub id: String,
    pub group: Group,
    pub title: String,
    /// Open loop: the scheduled rate, queries per second.
    pub target_qps: Option<f64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Failed,
    Skipped,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct TargetReport {
    pub name: String,
    pub description: String,
    pub status: Status,
    /// Why the target failed or was skipped.
    pub reason: Option<String>,
    /// The workload that was running when it failed (none: it failed to start).
    pub failed_during: Option<String>,
    pub version: Option<String>,
    /// Resident memory of the proxy process at the end of the run.
    pub proxy_rss_kib: Option<u64>,
    /// Keyed by workload id. Results gathered before a failure are kept.
    pub results: BTreeMap<String, CellReport>,
}

#[derive(Serialize, Deserialize, Debug, Default)]
pub struct CellReport {
    /// Repetitions that produced figures.
    pub runs: usize,
    /// Repetitions that failed, with the reason.
    pub errors: Vec<String>,
    /// Median, min and max over the repetitions.
    pub metrics: BTreeMap<String, Stat>,
    /// (percentile, µs) of all repetitions' latencies merged, for plots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub percentiles: Vec<(f64, f64)>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// Percentiles of a merged histogram on a "nines" scale, up to what the sample count supports.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    // x = log10(1 / (1 - q)): 1 is p90, 2 is p99, 3 is p99.9.
    let max_nines = (h.len() as f64).log10().clamp(0.0, 6.0);
    let steps = (max_nines * 20.0).ceil() as usize;
    let mut curve: Vec<(f64, f64)> = (0..=steps)
        .map(|i| {
            let x = (i as f64 / 20.0).min(max_nines);
            let q = 1.0 - 10f64.powf(-x);
            (q * 100.0, h.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect();
    curve.push((100.0, h.max() as f64 / 1000.0));
    curve
}

impl Report {
    fn target(&self, name: &str) -> Option<&TargetReport> {
        self.targets.iter().find(|t| t.name == name)
    }

    fn metric(&self, target: &str, workload: &str, metric: &str) -> Option<Stat> {
        self.target(target)?
            .results
            .get(workload)?
            .metrics
            .get(metric)
            .copied()
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let s = &self.settings;
        let _ = writeln!(md, "# Portcullis latency benchmark\n");
        let _ = writeln!(
            md,
            "Profile `{}`: pgbench scale {}, {} repetition(s), targets interleaved; {} CPU(s){}; {}; {:.0} s.\n",
            s["profile"].as_str().unwrap_or("?"),
            s["scale"],
            s["reps"],
            self.host.cpus,
            self.host
                .cpu_model
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default(),
            self.host.postgres.as_deref().unwrap_or("PostgreSQL"),
            self.duration_s,
        );
        let _ = writeln!(md, "Command: `{}`\n", self.command);
        if self.interrupted {
            let _ = writeln!(
                md,
                "**Interrupted**: only the steps that ran before Ctrl-C are reported.\n"
            );
        }
        let busiest = [
            self.host.background_busy_start,
            self.host.background_busy_end,
        ]
        .into_iter()
        .flatten()
        .reduce(f64::max);
        if let Some(busy) = busiest.filter(|&b| b > BUSY_BACKGROUND) {
            let _ = writeln!(
                md,
                "**Other work was running** (up to {:.0}% of {} CPUs busy while the harness was \
                 idle): drift between targets is larger than on a quiet host, and box CPU includes \
                 that work.\n",
                busy * 100.0,
                self.host.cpus
            );
        }
        if let Some(p) = self.direct_peak_tps {
            let _ = writeln!(md, "Direct peak (open-loop base): {} TPS.\n", num(p));
        }
        self.targets_table(&mut md);
        self.headline(&mut md);
        for (group, heading) in [
            (Group::Throughput, "Throughput: pgbench -S"),
            (Group::Latency, "Closed-loop latency, 1 client"),
            (
                Group::OpenLoop,
                "Open loop (latency from the scheduled send time)",
            ),
            (Group::WideRows, "Wide rows"),
            (
                Group::Connect,
                "Connection setup: connect, authenticate, first query",
            ),
            (
                Group::ConnectPerTx,
                "A new connection per transaction: pgbench -S -C",
            ),
        ] {
            let workloads: Vec<&WorkloadInfo> =
                self.workloads.iter().filter(|w| w.group == group).collect();
            if workloads.is_empty() {
                continue;
            }
            let _ = writeln!(md, "## {heading}\n");
            self.group_table(&mut md, group, &workloads);
        }
        self.failures(&mut md);
        let _ = writeln!(
            md,
            "Ratios: TPS as target ÷ reference; latency as target ÷ reference, with Δ in µs against \
             direct. Proxy CPU: ms of the proxy process (utime + stime) per 1,000 queries, equal to \
             µs per query. Box CPU: µs of busy CPU on all cores per query, clients and PostgreSQL \
             included. Figures are medians over repetitions; [min–max] when there are several.\n"
        );
        let _ = writeln!(
            md,
            "Anchors measured on this kind of machine (2 vCPU), for comparison: direct 64k TPS \
             (prepared, c=8) and p50 107 µs (simple, c=1); PgBouncer 1.18 0.50× / +33 µs; naive \
             relay 0.53× / +21 µs. Gateway goal with policy and masking on: ≥ 0.80× direct TPS, \
             ≤ +15 µs p50, ≤ 10 µs gateway CPU per query."
        );
        md
    }

    fn targets_table(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "| target | what | status | version |\n|---|---|---|---|"
        );
        for t in &self.targets {
            let status = match (t.status, &t.reason) {
                (Status::Ok, _) => "ok".to_string(),
                (st, reason) => format!(
                    "{}{}: {}",
                    if st == Status::Failed {
                        "**failed**"
                    } else {
                        "skipped"
                    },
                    t.failed_during
                        .as_deref()
                        .map(|w| format!(" during `{w}`"))
                        .unwrap_or_default(),
                    cell_text(reason.as_deref().unwrap_or("no reason recorded"), 160)
                ),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {status} | {} |",
                t.name,
                t.description,
                cell_text(t.version.as_deref().unwrap_or("—"), 60)
            );
        }
        md.push('\n');
    }

    /// The figures the goals are stated in.
    fn headline(&self, md: &mut String) {
        let (tps_w, lat_w) = ("select-prepared-c8", "latency-simple-c1");
        let _ = writeln!(
            md,
            "## Headline\n\n| target | TPS, -M prepared, c=8 | × direct | p50, simple, c=1 | Δ direct | proxy CPU µs/query (prepared c=8) |\n|---|---|---|---|---|---|"
        );
        for t in self.targets.iter().filter(|t| !t.results.is_empty()) {
            let tps = self.metric(&t.name, tps_w, "tps");
            let p50 = self.metric(&t.name, lat_w, "p50_us");
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                t.name,
                opt(tps.map(|s| num(s.median))),
                opt(self.ratio(&t.name, "direct", tps_w, "tps")),
                opt(p50.map(|s| us(s.median))),
                opt(self.delta(&t.name, "direct", lat_w, "p50_us")),
                opt(self
                    .metric(&t.name, tps_w, "proxy_cpu_ms_per_1k_queries")
                    .map(|s| format!("{:.1}", s.median))),
            );
        }
        md.push('\n');
    }

    fn ratio(&self, target: &str, reference: &str, workload: &str, metric: &str) -> Option<String> {
        let a = self.metric(target, workload, metric)?.median;
        let b = self.metric(reference, workload, metric)?.median;
        (b > 0.0).then(|| format!("{:.2}×", a / b))
    }

    fn delta(&self, target: &str, reference: &str, workload: &str, metric: &str) -> Option<String> {
        let a = self.metric(target, workload, metric)?.median;
        let b = self.metric(reference, workload, metric)?.median;
        Some(format!("{:+.0} µs", a - b))
    }

    fn group_table(&self, md: &mut String, group: Group, workloads: &[&WorkloadInfo]) {
        let (primary, head): (&str, &str) = match group {
            Group::Throughput | Group::WideRows | Group::ConnectPerTx => (
                "tps",
                "| workload | target | TPS | × direct | × HAProxy | × PgBouncer | avg latency | proxy CPU ms/1k q | box CPU µs/q |\n|---|---|---|---|---|---|---|---|---|",
            ),
            Group::Latency | Group::Connect => (
                "p50_us",
                "| workload | target | p50 | p90 | p99 | p99.9 | max | p50 Δ direct | p50 × direct | × HAProxy | × PgBouncer | proxy CPU ms/1k q | box CPU µs/q |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ),
            Group::OpenLoop => (
                "p99_us",
                "| workload | target | rate q/s | achieved q/s | p50 | p99 | p99.9 | max | p99 × direct | × HAProxy | × PgBouncer | proxy CPU ms/1k q | box CPU µs/q |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ),
        };
        let _ = writeln!(md, "{head}");
        for w in workloads {
            for t in &self.targets {
                let Some(cell) = t.results.get(&w.id) else {
                    continue;
                };
                if cell.runs == 0 {
                    continue;
                }
                let m = |k: &str| cell.metrics.get(k).copied();
                let ratios = ["direct", "haproxy", "pgbouncer"]
                    .map(|r| opt(self.ratio(&t.name, r, &w.id, primary)));
                let cpu = format!(
                    "{} | {}",
                    opt(m("proxy_cpu_ms_per_1k_queries").map(|s| format!("{:.1}", s.median))),
                    opt(m("box_cpu_us_per_query").map(|s| format!("{:.1}", s.median))),
                );
                let row = match group {
                    Group::Throughput | Group::WideRows | Group::ConnectPerTx => format!(
                        "{} | {} | {} | {} | {} | {cpu}",
                        opt(m("tps").map(|s| spread(s, num))),
                        ratios[0],
                        ratios[1],
                        ratios[2],
                        opt(m("latency_avg_us").map(|s| us(s.median))),
                    ),
                    Group::Latency | Group::Connect => format!(
                        "{} | {} | {} | {} | {} | {} | {} | {} | {} | {cpu}",
                        opt(m("p50_us").map(|s| spread(s, us))),
                        opt(m("p90_us").map(|s| us(s.median))),
                        opt(m("p99_us").map(|s| us(s.median))),
                        opt(m("p999_us").map(|s| us(s.median))),
                        opt(m("max_us").map(|s| us(s.median))),
                        opt(self.delta(&t.name, "direct", &w.id, "p50_us")),
                        ratios[0],
                        ratios[1],
                        ratios[2],
                    ),
                    Group::OpenLoop => format!(
                        "{} | {} | {} | {} | {} | {} | {} | {} | {} | {cpu}",
                        opt(w.target_qps.map(num)),
                        opt(m("achieved_qps").map(|s| num(s.median))),
                        opt(m("p50_us").map(|s| us(s.median))),
                        opt(m("p99_us").map(|s| spread(s, us))),
                        opt(m("p999_us").map(|s| us(s.median))),
                        opt(m("max_us").map(|s| us(s.median))),
                        ratios[0],
                        ratios[1],
                        ratios[2],
                    ),
                };
                let _ = writeln!(md, "| `{}` | {} | {row} |", w.id, t.name);
            }
        }
        md.push('\n');
    }

    fn failures(&self, md: &mut String) {
        let mut lines = Vec::new();
        for t in &self.targets {
            for (w, cell) in &t.results {
                for e in &cell.errors {
                    lines.push(format!("- {} · `{w}`: {}", t.name, cell_text(e, 300)));
                }
            }
        }
        if !lines.is_empty() {
            let _ = writeln!(md, "## Failed runs\n\n{}\n", lines.join("\n"));
        }
    }
}

fn opt(v: Option<String>) -> String {
    v.unwrap_or_else(|| "—".into())
}

/// Median, with [min–max] when the repetitions differ.
fn spread(s: Stat, f: fn(f64) -> String) -> String {
    if s.min == s.max {
        f(s.median)
    } else {
        format!("{} [{}–{}]", f(s.median), f(s.min), f(s.max))
    }
}

/// A count with thousands separators.
fn num(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Microseconds, with milliseconds past 10 ms.
fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0} µs")
    } else {
        format!("{v:.1} µs")
    }
}

/// Text safe inside a Markdown table cell, cut to `max` characters.
fn cell_text(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect::<String>()
        .replace('|', "\\|");
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_takes_the_median_of_odd_and_even_counts() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Stat::of(&[]), None);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(64012.4), "64,012");
        assert_eq!(num(999.0), "999");
        assert_eq!(us(107.26), "107 µs");
        assert_eq!(us(21.04), "21.0 µs");
        assert_eq!(us(12_345.0), "12.3 ms");
        assert_eq!(cell_text("a|b\nc", 10), "a\\|b c");
    }

    #[test]
    fn the_curve_stops_where_the_samples_do() {
        let mut h = crate::probe::new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let c = percentile_curve(&h);
        let (p, _) = c[c.len() - 2];
        assert!(
            p <= 99.9 + 1e-9,
            "1,000 samples support p99.9 at most, got {p}"
        );
        assert_eq!(c.last().unwrap().0, 100.0);
        assert!(c.windows(2).all(|w| w[0].1 <= w[1].1));
    }
}
