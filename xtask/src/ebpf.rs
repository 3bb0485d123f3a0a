//! `cargo xtask build-ebpf`: the gateway with its eBPF object. gateway/build.rs does the
//! compiling (aya-build); this makes sure the toolchain is there first and insists the object
//! is really built rather than stubbed.

use anyhow::Result;
use clap::Args;

use crate::{cmd, setup};

/// Tells gateway/build.rs to fail instead of embedding an empty object when it cannot build.
pub const REQUIRE_EBPF_ENV: &str = "PORTCULLIS_REQUIRE_EBPF";

#[derive(Args)]
pub struct BuildEbpfArgs {
    /// Build the release profile.
    #[arg(long)]
    release: bool,
}

pub fn build_ebpf(args: &BuildEbpfArgs) -> Result<()> {
    setup::ensure_ebpf_toolchain()?;
    let mut cargo = cmd::cargo()?;
    cargo.args(["build", "--package", "portcullis"]);
    if args.release {
        cargo.arg("--release");
    }
    cargo
        .env(REQUIRE_EBPF_ENV, "1")
        .env_remove("AYA_BUILD_SKIP");
    cmd::run(&mut cargo)
}
