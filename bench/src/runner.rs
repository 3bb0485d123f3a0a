//! One benchmark run: set up PostgreSQL and the targets, run every workload on every target with
//! the targets interleaved (A B C D A B C D ...), survive targets that fail, write the report.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use testkit::Postgres;

use crate::RunArgs;
use crate::progress::{Progress, note};
use crate::report::{self, CellReport, Host, Report, Stat, Status, TargetReport, WorkloadInfo};
use crate::settings::Settings;
use crate::targets::{self, Lab, Running, Start, TargetKind, Tools};
use crate::workloads::{self, Measurement, RunCtx, Workload};

/// A target through the run: its process while it lives, and everything it produced.
struct Slot {
    kind: TargetKind,
    running: Option<Box<Running>>,
    status: Status,
    reason: Option<String>,
    failed_during: Option<String>,
    version: Option<String>,
    rss_kib: Option<u64>,
    cells: BTreeMap<String, Cell>,
}

#[derive(Default)]
struct Cell {
    runs: Vec<Measurement>,
    errors: Vec<String>,
}

impl Slot {
    /// Marks the target failed and stops it; results so far are kept.
    fn fail(&mut self, reason: String, during: Option<&str>) {
        note(&format!("{} failed: {reason}", self.kind.name()));
        self.status = Status::Failed;
        self.reason = Some(reason);
        self.failed_during = during.map(str::to_string);
        self.running = None;
    }
}

/// When and on how busy a machine the run started.
struct Started {
    unix: u64,
    at: Instant,
    load_avg: Option<f64>,
    background_busy: Option<f64>,
}

impl Started {
    fn now() -> Started {
        Started {
            unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            at: Instant::now(),
            load_avg: report::load_avg(),
            background_busy: crate::cpu::background_busy(QUIET_WINDOW),
        }
    }
}

/// How long the harness sits idle, before setup and after the targets stop, to see other work.
const QUIET_WINDOW: Duration = Duration::from_secs(2);

pub fn run(args: RunArgs) -> Result<()> {
    crate::interrupt::install();
    let started = Started::now();
    let cpus = workloads::cpus();
    if let Some(busy) = started
        .background_busy
        .filter(|&b| b > report::BUSY_BACKGROUND)
    {
        note(&format!(
            "{:.0}% of {cpus} CPUs busy before the harness started: other work is running, \
             figures will be noisy",
            busy * 100.0
        ));
    }
    let mut settings = if args.smoke {
        Settings::smoke()
    } else if args.quick {
        Settings::quick()
    } else {
        Settings::full()
    };
    if let Some(scale) = args.scale {
        settings.scale = scale.max(1);
    }
    if let Some(reps) = args.reps {
        settings.reps = reps.max(1);
    }
    let out_dir = args.out.clone().unwrap_or_else(default_out_dir);
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let kinds: Vec<TargetKind> = if args.targets.is_empty() {
        let baseline = args
            .baseline_gateway_bin
            .iter()
            .flat_map(|_| TargetKind::BASELINE);
        TargetKind::ALL.into_iter().chain(baseline).collect()
    } else {
        let mut k = args.targets.clone();
        k.sort();
        k.dedup();
        k
    };
    let plan = chosen(workloads::plan(&settings), &args.workloads, &kinds)?;
    let gateway_bin = args
        .gateway_bin
        .clone()
        .unwrap_or_else(testkit::portcullis_bin);

    let tools = Tools::ensure(
        kinds.contains(&TargetKind::Haproxy),
        kinds.contains(&TargetKind::Pgbouncer),
        !args.no_install,
    );
    note(&format!(
        "starting PostgreSQL and loading pgbench scale {}",
        settings.scale
    ));
    let pg = Postgres::builder()
        .conf("shared_buffers = '512MB'")
        .start()
        .context("starting the throwaway PostgreSQL")?;
    load_data(&pg, settings.scale)?;
    let scratch = tempfile::Builder::new()
        .prefix("portcullis-bench-")
        .tempdir()?;
    let wide_script = scratch.path().join("wide-rows.sql");
    fs::write(&wide_script, WIDE_SCRIPT)?;
    let probe_exe = std::env::current_exe().context("locating portcullis-bench itself")?;

    let lab = Lab {
        pg: &pg,
        gateway_bin: &gateway_bin,
        baseline_bin: args.baseline_gateway_bin.as_deref(),
        tools: &tools,
    };
    let mut ctx = RunCtx {
        settings: &settings,
        pg_bindir: pg.bindir(),
        probe_exe: &probe_exe,
        wide_script: &wide_script,
        scratch: scratch.path(),
        accounts: settings.accounts(),
        direct_peak_tps: None,
    };
    let mut slots: Vec<Slot> = kinds.iter().map(|&k| start_target(k, &lab, &ctx)).collect();

    let live = slots.iter().filter(|s| s.running.is_some()).count();
    let mut progress = Progress::new(settings.reps as usize * plan.len() * live);
    let mut interrupted = false;
    'run: for rep in 1..=settings.reps {
        for w in &plan {
            if matches!(w, Workload::OpenLoop { .. }) && ctx.direct_peak_tps.is_none() {
                ctx.direct_peak_tps = direct_peak(&slots);
            }
            for slot in slots.iter_mut() {
                if crate::interrupt::requested() {
                    interrupted = true;
                    break 'run;
                }
                if slot.running.is_none() {
                    continue;
                }
                progress.step(rep, settings.reps, &w.id(), slot.kind.name());
                run_cell(slot, w, &ctx);
            }
        }
    }
    progress.finish();
    if interrupted {
        note("interrupted: stopping the targets and writing the report of what ran");
    }

    for slot in slots.iter_mut() {
        if let Some(r) = &slot.running {
            slot.rss_kib = r.rss_kib();
        }
        slot.running = None;
    }
    let background_busy_end = crate::cpu::background_busy(QUIET_WINDOW);
    let mut report = build_report(
        &settings,
        &plan,
        &ctx,
        slots,
        &pg,
        &started,
        background_busy_end,
    );
    report.interrupted = interrupted;
    drop(pg);
    write_outputs(&report, &out_dir)
}

fn default_out_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("bench")
}

fn start_target(kind: TargetKind, lab: &Lab, ctx: &RunCtx) -> Slot {
    note(&format!("starting {}", kind.name()));
    let mut slot = Slot {
        kind,
        running: None,
        status: Status::Ok,
        reason: None,
        failed_during: None,
        version: None,
        rss_kib: None,
        cells: BTreeMap::new(),
    };
    match targets::start(kind, lab) {
        Start::Running(r) => {
            slot.version = r.version.clone();
            // A target that cannot serve the bench tables would only produce errors.
            match workloads::check(&r.endpoint, ctx) {
                Ok(()) => slot.running = Some(r),
                Err(e) => slot.fail(format!("does not serve queries: {e:#}"), None),
            }
        }
        Start::Skipped(why) => {
            note(&format!("{} skipped: {why}", kind.name()));
            slot.status = Status::Skipped;
            slot.reason = Some(why);
        }
        Start::Failed(why) => slot.fail(format!("did not start: {why}"), None),
    }
    slot
}

/// Runs one workload once on one target. A failed run is recorded; a target that died, or no
/// longer answers a health check afterwards, is marked failed and left out from then on.
fn run_cell(slot: &mut Slot, w: &Workload, ctx: &RunCtx) {
    let id = w.id();
    let Some(running) = slot.running.as_mut() else {
        return;
    };
    if let Some(why) = running.exit_reason() {
        slot.fail(format!("its process {why}"), Some(&id));
        return;
    }
    match workloads::run(w, &running.endpoint, ctx) {
        Ok(m) => slot.cells.entry(id).or_default().runs.push(m),
        // Ctrl-C reaches pgbench and the probe too: their failure is not the target's.
        Err(_) if crate::interrupt::requested() => {}
        Err(e) => {
            let err = format!("{e:#}");
            if let Some(why) = running.exit_reason() {
                slot.fail(format!("its process {why}; the run saw: {err}"), Some(&id));
            } else if let Err(health) = workloads::check(&running.endpoint, ctx) {
                slot.fail(
                    format!("{err}; afterwards it failed a health check: {health:#}"),
                    Some(&id),
                );
            } else {
                note(&format!("{} · {id}: {err}", slot.kind.name()));
                slot.cells.entry(id).or_default().errors.push(err);
            }
        }
    }
}

/// The workloads of `plan` named in `ids` (all when none are), in the plan's order. Unknown ids
/// and an open-loop workload without the direct peak to base its rate on are errors.
fn chosen(plan: Vec<Workload>, ids: &[String], kinds: &[TargetKind]) -> Result<Vec<Workload>> {
    if ids.is_empty() {
        return Ok(plan);
    }
    if let Some(unknown) = ids.iter().find(|id| !plan.iter().any(|w| w.id() == **id)) {
        let known: Vec<String> = plan.iter().map(Workload::id).collect();
        bail!(
            "--workloads: no workload `{unknown}` in this profile; there are: {}",
            known.join(", ")
        );
    }
    let plan: Vec<Workload> = plan.into_iter().filter(|w| ids.contains(&w.id())).collect();
    let open_loop = plan.iter().find(|w| matches!(w, Workload::OpenLoop { .. }));
    let has_peak = kinds.contains(&TargetKind::Direct)
        && plan.iter().any(|w| matches!(w, Workload::Select { .. }));
    if let (Some(w), false) = (open_loop, has_peak) {
        bail!(
            "--workloads: `{}` runs at a fraction of the direct peak, which needs a select-* \
             workload and the direct target in the same run",
            w.id()
        );
    }
    Ok(plan)
}

/// The highest direct pgbench -S TPS measured so far (the first repetition's).
fn direct_peak(slots: &[Slot]) -> Option<f64> {
    let direct = slots.iter().find(|s| s.kind == TargetKind::Direct)?;
    direct
        .cells
        .iter()
        .filter(|(id, _)| id.starts_with("select-"))
        .filter_map(|(_, c)| c.runs.first()?.metrics.get("tps").copied())
        .reduce(f64::max)
}

fn build_report(
    settings: &Settings,
    plan: &[Workload],
    ctx: &RunCtx,
    slots: Vec<Slot>,
    pg: &Postgres,
    started: &Started,
    background_busy_end: Option<f64>,
) -> Report {
    let workloads = plan
        .iter()
        .map(|w| WorkloadInfo {
            id: w.id(),
            group: w.group(),
            title: w.title(settings),
            target_qps: match w {
                Workload::OpenLoop { percent } => ctx.open_loop_rate(*percent),
                _ => None,
            },
        })
        .collect();
    let targets = slots
        .into_iter()
        .map(|slot| TargetReport {
            name: slot.kind.name().into(),
            description: slot.kind.description().into(),
            status: slot.status,
            reason: slot.reason,
            failed_during: slot.failed_during,
            version: slot.version,
            proxy_rss_kib: slot.rss_kib,
            results: slot
                .cells
                .into_iter()
                .map(|(id, cell)| (id, summarize(cell)))
                .collect(),
        })
        .collect();
    Report {
        schema: report::SCHEMA.into(),
        started_unix: started.unix,
        duration_s: started.at.elapsed().as_secs_f64(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        settings: serde_json::to_value(settings).unwrap_or_default(),
        host: Host {
            cpus: workloads::cpus(),
            cpu_model: fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            }),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|k| k.trim().to_string()),
            postgres: targets::first_line(
                std::process::Command::new(pg.bindir().join("postgres")).arg("--version"),
            ),
            load_avg_start: started.load_avg,
            load_avg_end: report::load_avg(),
            background_busy_start: started.background_busy,
            background_busy_end,
        },
        direct_peak_tps: ctx.direct_peak_tps,
        interrupted: false,
        workloads,
        targets,
    }
}

/// Medians with min/max per metric, and the latency curve of all repetitions merged.
fn summarize(cell: Cell) -> CellReport {
    let mut values: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for m in &cell.runs {
        for (&k, &v) in &m.metrics {
            values.entry(k).or_default().push(v);
        }
    }
    let metrics = values
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), Stat::of(&v)?)))
        .collect();
    let mut merged = crate::probe::new_histogram();
    for h in cell.runs.iter().filter_map(|m| m.histogram.as_ref()) {
        // Same bounds everywhere, so adding cannot fail.
        let _ = merged.add(h);
    }
    CellReport {
        runs: cell.runs.len(),
        errors: cell.errors,
        metrics,
        percentiles: report::percentile_curve(&merged),
    }
}

fn write_outputs(report: &Report, dir: &Path) -> Result<()> {
    let json = dir.join("bench.json");
    fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md_text = report.markdown();
    let md = dir.join("bench.md");
    fs::write(&md, &md_text).with_context(|| format!("writing {}", md.display()))?;
    let plots = crate::plot::write_all(report, dir)?;
    println!("{md_text}");
    note(&format!("wrote {} and {}", json.display(), md.display()));
    for p in plots {
        note(&format!("wrote {}", p.display()));
    }
    for t in report.targets.iter().filter(|t| t.status != Status::Ok) {
        note(&format!(
            "{} {}: {}",
            t.name,
            if t.status == Status::Failed {
                "FAILED"
            } else {
                "skipped"
            },
            t.reason.as_deref().unwrap_or("")
        ));
    }
    Ok(())
}

/// ~100 rows and ~10 KB per query; one row in ten holds an email and a card number.
const WIDE_SCRIPT: &str = "\\set lo random(1, 9901)\n\
SELECT id, customer, email, card_number, city, note FROM bench_wide WHERE id BETWEEN :lo AND :lo + 99;\n";

const WIDE_TABLE: &str = "CREATE TABLE bench_wide (
    id int PRIMARY KEY,
    customer text NOT NULL,
    email text,
    card_number text,
    city text NOT NULL,
    note text NOT NULL
);
INSERT INTO bench_wide
SELECT g,
       'customer ' || g,
       CASE WHEN g % 10 = 3 THEN 'customer' || g || '@example.com' END,
       CASE WHEN g % 10 = 3 THEN (ARRAY['4111111111111111', '5555555555554444', '378282246310005',
                                        '6011111111111117', '4012888888881881'])[1 + g % 5] END,
       (ARRAY['Lisbon', 'Osaka', 'Denver', 'Nairobi', 'Oslo', 'Quito'])[1 + g % 6],
       left(md5(g::text) || md5((-g)::text), 48)
FROM generate_series(1, 10000) AS g;
ALTER TABLE bench_wide OWNER TO app;";

/// pgbench tables at the given scale (as `app`, over TCP) and the wide-row table.
fn load_data(pg: &Postgres, scale: u32) -> Result<()> {
    let out = pg
        .client("pgbench")
        .args(["-i", "-q", "-I", "dtGvp", "-s", &scale.to_string()])
        .args(["-h", &pg.host, "-p", &pg.port.to_string(), "-U", &pg.user])
        .arg(&pg.database)
        .env("PGPASSWORD", &pg.password)
        .env("PGSSLMODE", "disable")
        .output()
        .context("running pgbench -i")?;
    if !out.status.success() {
        bail!(
            "pgbench -i failed: {}",
            targets::tail(&String::from_utf8_lossy(&out.stderr), 5)
        );
    }
    // psql -c runs one transaction, and VACUUM refuses to run inside one.
    pg.app_superuser_sql(WIDE_TABLE)
        .and_then(|_| pg.app_superuser_sql("VACUUM ANALYZE bench_wide"))
        .context("creating the wide-row table")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_chosen_by_id_in_the_plans_order() {
        let plan = || workloads::plan(&Settings::full());
        let ids = |w: Vec<Workload>| w.iter().map(Workload::id).collect::<Vec<_>>();
        let all = [TargetKind::Direct, TargetKind::Haproxy];
        assert_eq!(ids(chosen(plan(), &[], &all).unwrap()), ids(plan()));
        let picked = ["wide-rows-c8".into(), "select-simple-c1".into()];
        assert_eq!(
            ids(chosen(plan(), &picked, &all).unwrap()),
            ["select-simple-c1", "wide-rows-c8"]
        );
        let e = chosen(plan(), &["wide-rows-c2".into()], &all).unwrap_err();
        assert!(e.to_string().contains("`wide-rows-c2`"), "{e}");
        assert!(e.to_string().contains("wide-rows-c8"), "{e}");
        let open = ["open-loop-50pct".into()];
        let e = chosen(plan(), &open, &all).unwrap_err();
        assert!(e.to_string().contains("direct peak"), "{e}");
        let with_peak = ["open-loop-50pct".into(), "select-prepared-c8".into()];
        assert!(chosen(plan(), &with_peak, &all).is_ok());
        assert!(chosen(plan(), &with_peak, &[TargetKind::Haproxy]).is_err());
    }

    #[test]
    fn the_direct_peak_is_the_best_select_result() {
        let cell = |tps: f64| Cell {
            runs: vec![Measurement {
                metrics: BTreeMap::from([("tps", tps)]),
                histogram: None,
            }],
            errors: Vec::new(),
        };
        let slot = Slot {
            kind: TargetKind::Direct,
            running: None,
            status: Status::Ok,
            reason: None,
            failed_during: None,
            version: None,
            rss_kib: None,
            cells: BTreeMap::from([
                ("select-simple-c1".to_string(), cell(9000.0)),
                ("select-prepared-c8".to_string(), cell(64000.0)),
                ("wide-rows-c8".to_string(), cell(90000.0)),
            ]),
        };
        assert_eq!(direct_peak(&[slot]), Some(64000.0));
    }

    #[test]
    fn summaries_keep_errors_and_take_medians() {
        let m = |p50: f64| Measurement {
            metrics: BTreeMap::from([("p50_us", p50)]),
            histogram: None,
        };
        let r = summarize(Cell {
            runs: vec![m(110.0), m(100.0), m(130.0)],
            errors: vec!["connection reset".into()],
        });
        assert_eq!(r.runs, 3);
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.metrics["p50_us"].median, 110.0);
    }
}
