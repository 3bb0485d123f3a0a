//! End to end: the harness runs every workload on every target and writes a well-formed report,
//! and a target killed mid-run is reported as failed while the others carry on. No speed is
//! asserted: the figures are for reading, not for testing.
//!
//! Runs `portcullis-bench --smoke` (the `--quick` workloads, shortened, on a scale-1 database).
//! HAProxy and PgBouncer are installed with apt-get when missing (root); the gateway targets use
//! the `portcullis` binary next to this one, or `PORTCULLIS_BIN`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_portcullis-bench");
const TARGETS: [&str; 10] = [
    "direct",
    "gateway",
    "gateway-observe",
    "gateway-policy",
    "gateway-pooled",
    "gateway-record",
    "gateway-redirect",
    "haproxy",
    "relay",
    "pgbouncer",
];

fn report(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("bench.json")).expect("bench.json written");
    let r: Value = serde_json::from_str(&text).expect("bench.json is JSON");
    assert_eq!(r["schema"], "portcullis-bench/1");
    r
}

fn target<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["targets"]
        .as_array()
        .expect("targets is an array")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("target {name} missing from the report"))
}

fn workload_ids(r: &Value) -> Vec<String> {
    r["workloads"]
        .as_array()
        .expect("workloads is an array")
        .iter()
        .map(|w| w["id"].as_str().expect("workload id").to_string())
        .collect()
}

/// Every figure is a finite, non-negative median within [min, max].
fn assert_metrics_well_formed(target: &str, workload: &str, cell: &Value) {
    for (name, stat) in cell["metrics"].as_object().expect("metrics object") {
        let get = |k: &str| {
            stat[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{target}/{workload}/{name}.{k} is not a number"))
        };
        let (median, min, max) = (get("median"), get("min"), get("max"));
        assert!(
            min >= 0.0 && min <= median && median <= max,
            "{target}/{workload}/{name}: {min} ≤ {median} ≤ {max} does not hold"
        );
    }
}

/// The headline figure a workload must produce, by its id.
fn primary_metric(workload: &str) -> &'static str {
    if workload.starts_with("select-")
        || workload.starts_with("wide-rows-")
        || workload.starts_with("connect-per-tx-")
    {
        "tps"
    } else {
        "p50_us"
    }
}

fn assert_direct_complete(r: &Value, workloads: &[String]) {
    let direct = target(r, "direct");
    assert_eq!(
        direct["status"], "ok",
        "direct PostgreSQL must always work: {direct}"
    );
    for w in workloads {
        let cell = &direct["results"][w];
        assert!(
            cell["runs"].as_u64().unwrap_or(0) >= 1,
            "direct has no run of {w}: {cell}"
        );
        assert!(
            cell["metrics"][primary_metric(w)]["median"].is_number(),
            "direct/{w} lacks {}",
            primary_metric(w)
        );
    }
}

#[test]
fn smoke_run_reports_every_target_and_survives_a_target_killed_mid_run() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(BENCH)
        .args(["--smoke", "--out"])
        .arg(out.path())
        .status()
        .expect("running portcullis-bench");
    assert!(
        status.success(),
        "portcullis-bench --smoke failed: {status}"
    );

    let r = report(out.path());
    let workloads = workload_ids(&r);
    assert!(workloads.len() >= 10, "too few workloads: {workloads:?}");
    let names: BTreeSet<&str> = r["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        TARGETS.into_iter().collect(),
        "every target is listed"
    );
    for name in TARGETS {
        let t = target(&r, name);
        match t["status"].as_str() {
            Some("ok") => {
                for w in &workloads {
                    let cell = &t["results"][w];
                    let runs = cell["runs"].as_u64().unwrap_or(0);
                    let errors = cell["errors"].as_array().map_or(0, Vec::len);
                    assert!(
                        runs + errors as u64 >= 1,
                        "{name}/{w}: neither a result nor an error"
                    );
                    assert_metrics_well_formed(name, w, cell);
                }
            }
            Some("failed") | Some("skipped") => {
                let reason = t["reason"].as_str().unwrap_or_default();
                assert!(!reason.trim().is_empty(), "{name} has no reason: {t}");
                eprintln!("{name} {}: {reason}", t["status"]);
            }
            other => panic!("{name}: unknown status {other:?}"),
        }
    }
    assert_direct_complete(&r, &workloads);
    // The relay is built with the harness, so nothing excuses it from running.
    assert_eq!(
        target(&r, "relay")["status"],
        "ok",
        "the relay target did not run: {}",
        target(&r, "relay")
    );

    let md = std::fs::read_to_string(out.path().join("bench.md")).expect("bench.md written");
    assert!(md.contains("| `select-prepared-c8` | direct |"), "{md}");
    let svg = std::fs::read_to_string(out.path().join("latency-simple-c1.svg"))
        .expect("the closed-loop latency plot is written");
    assert!(
        svg.starts_with("<svg"),
        "not an SVG: {}",
        &svg[..svg.len().min(80)]
    );

    // Second part: kill HAProxy while the harness is using it.
    if target(&r, "haproxy")["status"] != "ok" {
        eprintln!(
            "SKIPPED the mid-run failure half: HAProxy did not run ({})",
            target(&r, "haproxy")["reason"]
        );
        return;
    }
    killed_target_is_reported_and_the_others_finish();
}

fn killed_target_is_reported_and_the_others_finish() {
    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new(BENCH)
        .args([
            "--smoke",
            "--no-install",
            "--targets",
            "direct,haproxy",
            "--out",
        ])
        .arg(out.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running portcullis-bench");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("select-extended-c1 · haproxy") {
                let _ = tx.send(());
            }
            seen.push(line);
        }
        seen
    });
    rx.recv_timeout(Duration::from_secs(240))
        .expect("the harness reached HAProxy's third workload");
    let haproxy = children_of(child.id())
        .into_iter()
        .find(|&pid| comm(pid).as_deref() == Some("haproxy"))
        .expect("HAProxy runs as a child of the harness");
    let killed = Command::new("kill")
        .args(["-KILL", &haproxy.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let status = child.wait().unwrap();
    let log = reader.join().unwrap().join("\n");
    assert!(status.success(), "the harness must finish: {status}\n{log}");
    let r = report(out.path());
    let h = target(&r, "haproxy");
    assert_eq!(h["status"], "failed", "{h}");
    assert!(h["reason"].as_str().is_some_and(|s| !s.is_empty()), "{h}");
    assert!(
        h["failed_during"].as_str().is_some(),
        "the report names the workload HAProxy failed in: {h}"
    );
    assert!(
        h["results"]["select-simple-c1"]["runs"].as_u64() == Some(1),
        "results from before the failure are kept: {h}"
    );
    assert_direct_complete(&r, &workload_ids(&r));
}

/// Direct children of a process, from /proc/PID/task/*/children.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}
