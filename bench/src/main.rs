//! `portcullis-bench`: what the gateway costs per query, against a direct connection, HAProxy and
//! PgBouncer, side by side in one run. See docs/benchmarks.md.

mod cpu;
mod interrupt;
mod pgclient;
mod plot;
mod probe;
mod progress;
mod report;
mod runner;
mod settings;
mod targets;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::targets::TargetKind;

#[derive(Parser)]
#[command(
    name = "portcullis-bench",
    version,
    about = "Latency benchmark: the gateway against direct PostgreSQL, HAProxy and PgBouncer"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Sub {
    /// Internal: the latency client, run once per workload under each target's wrapper.
    #[command(hide = true)]
    Probe(probe::ProbeArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Every workload once with short runs: under 3 minutes on 2 cores.
    #[arg(long, conflicts_with = "smoke")]
    pub quick: bool,
    /// Shorter still, on a scale-1 database: the end-to-end test's profile.
    #[arg(long)]
    pub smoke: bool,
    /// Where bench.json, bench.md and the SVG plots go [default: $CARGO_TARGET_DIR/bench, else target/bench].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The portcullis binary [default: next to this one, or $PORTCULLIS_BIN].
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// An older portcullis build, run as `baseline-gateway` and `baseline-gateway-policy` beside
    /// this one's targets: a before and after measured in the same run.
    #[arg(long)]
    pub baseline_gateway_bin: Option<PathBuf>,
    /// Targets to run, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub targets: Vec<TargetKind>,
    /// Workloads to run, by id (`wide-rows-c1`, `select-simple-c8`, `connect`, ...),
    /// comma-separated [default: all]. `open-loop-*` needs a `select-*` workload and the
    /// `direct` target beside it: its rates are fractions of the direct peak.
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// pgbench scale (overrides the profile's).
    #[arg(long)]
    pub scale: Option<u32>,
    /// Repetitions (overrides the profile's).
    #[arg(long)]
    pub reps: Option<u32>,
    /// Do not apt-get install missing haproxy or pgbouncer; skip those targets instead.
    #[arg(long)]
    pub no_install: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Sub::Probe(args)) => probe::run(&args),
        None => runner::run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
