//! Developer tasks: `cargo xtask <task>`. Each task lives in its own module; add a variant to
//! [`Task`] and a module beside the others to add one.

mod bench;
mod cmd;
mod deb;
mod ebpf;
mod fuzz;
mod run;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Portcullis developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need and is missing (nightly rust-src, bpf-linker).
    Setup,
    /// Build the eBPF programs into the gateway (installs the toolchain first if needed).
    BuildEbpf(ebpf::BuildEbpfArgs),
    /// Set up, then run the whole workspace's tests: `cargo xtask test [-- CARGO_TEST_ARGS]`.
    Test(test::TestArgs),
    /// Set up, build, and run the gateway with the embedded default configuration.
    Run(run::RunArgs),
    /// Build in release and run the latency harness: `cargo xtask bench [-- --quick]`.
    Bench(bench::BenchArgs),
    /// Build the Debian package (binary, hardened unit, default config, man pages, completions).
    Deb(deb::DebArgs),
    /// Run every fuzz target for a while, minimize the corpora: `cargo xtask fuzz [--minutes N]`.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf(args) => ebpf::build_ebpf(&args),
        Task::Test(args) => test::test(&args),
        Task::Run(args) => run::run(&args),
        Task::Bench(args) => bench::bench(&args),
        Task::Deb(args) => deb::deb(&args),
        Task::Fuzz(args) => fuzz::fuzz(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
