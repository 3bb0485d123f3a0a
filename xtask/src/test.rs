//! `cargo xtask test`: the command CI runs. Setup first, so a fresh machine needs nothing else.

use anyhow::Result;
use clap::Args;

use crate::{cmd, ebpf, setup};

#[derive(Args)]
pub struct TestArgs {
    /// Passed to `cargo test --workspace`, e.g. `-- --test-threads=1`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    cargo_args: Vec<String>,
}

pub fn test(args: &TestArgs) -> Result<()> {
    setup::setup()?;
    let mut cargo = cmd::cargo()?;
    cargo
        .args(["test", "--workspace"])
        .args(&args.cargo_args)
        .env(ebpf::REQUIRE_EBPF_ENV, "1")
        .env_remove("AYA_BUILD_SKIP");
    cmd::run(&mut cargo)
}
