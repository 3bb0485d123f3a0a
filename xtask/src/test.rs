//! `cargo xtask test`: the command CI runs. Setup first, so a fresh machine needs nothing else.

use anyhow::Result;
use clap::Args;

use crate::{cmd, deb, ebpf, setup};

#[derive(Args)]
pub struct TestArgs {
    /// Passed to `cargo test --workspace`, e.g. `-- --test-threads=1`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    cargo_args: Vec<String>,
}

pub fn test(args: &TestArgs) -> Result<()> {
    setup::setup()?;
    // The systemd tests install a package of the binary the tests run. `cargo build` would
    // resolve features without the dev-dependencies and build a second copy of the gateway and
    // its dependencies; building the tests builds the binary once, as the test run uses it.
    cmd::run(
        cmd::cargo()?
            .args(["test", "--workspace", "--no-run"])
            .env(ebpf::REQUIRE_EBPF_ENV, "1")
            .env_remove("AYA_BUILD_SKIP"),
    )?;
    let package = deb::build(&deb::DebArgs {
        profile: "dev".into(),
        no_build: true,
        output: None,
    })?;
    let mut cargo = cmd::cargo()?;
    cargo.env(testkit::systemd::TEST_DEB_ENV, &package);
    cargo
        // Every failing test binary is reported, not only the first: one CI run shows them all.
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(&args.cargo_args)
        .env(ebpf::REQUIRE_EBPF_ENV, "1")
        .env_remove("AYA_BUILD_SKIP");
    cmd::run(&mut cargo)
}
