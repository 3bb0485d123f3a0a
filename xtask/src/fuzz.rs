//! `cargo xtask fuzz [--minutes N] [--target NAME]...`: run every cargo-fuzz target in `fuzz/`
//! for N minutes each on its corpus under `fuzz/corpus/<target>`, minimize the corpus, and print
//! executions and crashes per target. Installs cargo-fuzz (into `$CARGO_HOME/bin`) when missing.
//! Fails when any target crashed; the crashing input is left in `fuzz/artifacts/<target>/`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{cmd, setup};

#[derive(Args)]
pub struct FuzzArgs {
    /// Minutes per target.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Run only these targets (default: every target `cargo fuzz list` names).
    #[arg(long = "target")]
    targets: Vec<String>,
}

/// What one target's campaign came to.
struct Outcome {
    target: String,
    executions: u64,
    crashed: bool,
    corpus_files: usize,
}

pub fn fuzz(args: &FuzzArgs) -> Result<()> {
    setup::ensure_ebpf_toolchain()?;
    ensure_cargo_fuzz()?;
    let dir = cmd::workspace_root().join("fuzz");
    let targets = if args.targets.is_empty() {
        let list = cmd::output(cargo_fuzz(&dir)?.arg("list"))
            .context("`cargo fuzz list` failed in fuzz/")?;
        list.lines().map(str::to_owned).collect()
    } else {
        args.targets.clone()
    };
    let mut outcomes = Vec::new();
    for target in &targets {
        outcomes.push(campaign(&dir, target, args.minutes)?);
    }
    eprintln!(
        "\n{:<20} {:>14} {:>8} {:>8}",
        "TARGET", "EXECUTIONS", "CRASHES", "CORPUS"
    );
    for o in &outcomes {
        eprintln!(
            "{:<20} {:>14} {:>8} {:>8}",
            o.target,
            o.executions,
            u8::from(o.crashed),
            o.corpus_files
        );
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crashed)
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "crashes in {}: see fuzz/artifacts/<target>/",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// Runs one target for `minutes`, then minimizes its corpus.
fn campaign(dir: &Path, target: &str, minutes: u64) -> Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    let mut run = cargo_fuzz(dir)?;
    run.args(["run", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={}", minutes * 60))
        .arg("-print_final_stats=1");
    eprintln!("xtask: running {run:?}");
    let out = run
        .output()
        .with_context(|| format!("cannot start {run:?}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    // libFuzzer's last lines say how it ended; keep them visible.
    for line in log
        .lines()
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        eprintln!("  {line}");
    }
    let executions = log
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let crashed = !out.status.success();
    if !crashed {
        cmd::run(cargo_fuzz(dir)?.args(["cmin", target]).arg(&corpus))?;
    }
    let corpus_files = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
    Ok(Outcome {
        target: target.to_owned(),
        executions,
        crashed,
        corpus_files,
    })
}

/// `cargo +nightly fuzz` in `fuzz/`.
fn cargo_fuzz(dir: &Path) -> Result<Command> {
    let mut c = Command::new("cargo");
    c.arg(format!("+{}", setup::EBPF_TOOLCHAIN))
        .arg("fuzz")
        .current_dir(dir)
        // The protocol cores need no eBPF object.
        .env("AYA_BUILD_SKIP", "1")
        .env("PATH", cmd::path_with_cargo_bin()?);
    Ok(c)
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = cmd::output(
        Command::new("cargo")
            .args(["fuzz", "--version"])
            .env("PATH", cmd::path_with_cargo_bin()?),
    );
    if installed.is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (a few minutes, once)");
    cmd::run(
        Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .env("PATH", cmd::path_with_cargo_bin()?),
    )
}
