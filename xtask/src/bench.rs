//! `cargo xtask bench [-- BENCH_ARGS]`: build the release gateway and harness, then run the
//! harness (`--quick` for the 3-minute profile; see docs/benchmarks.md).

use anyhow::Result;
use clap::Args;

use crate::{cmd, setup};

#[derive(Args)]
pub struct BenchArgs {
    /// Passed to `portcullis-bench`, e.g. `--quick` or `--targets direct,gateway`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    bench_args: Vec<String>,
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    setup::setup()?;
    cmd::run(cmd::cargo()?.args([
        "build",
        "--release",
        "-p",
        "portcullis",
        "-p",
        "portcullis-bench",
    ]))?;
    let release = cmd::target_dir()?.join("release");
    cmd::run(
        std::process::Command::new(release.join("portcullis-bench"))
            .arg("--gateway-bin")
            .arg(release.join("portcullis"))
            .args(&args.bench_args),
    )
}
