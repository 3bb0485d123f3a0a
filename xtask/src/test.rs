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
    warn_if_disk_is_short();
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

/// What a clean run writes under the target directory (about 2.3 GiB measured), with margin.
const CLEAN_RUN_GIB: u64 = 4;

/// Says so up front when the target directory's filesystem has less room than a clean run
/// takes: otherwise the run fails late, in a linker, with "No space left on device".
fn warn_if_disk_is_short() {
    let Ok(target) = cmd::target_dir() else {
        return;
    };
    let existing = target.ancestors().find(|p| p.exists()).unwrap_or(&target);
    let Ok(out) = std::process::Command::new("df")
        .arg("-Pk")
        .arg(existing)
        .output()
    else {
        return;
    };
    // `df -P`: a header, then `filesystem blocks used available capacity mount`.
    let free_kib = String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok());
    if let Some(kib) = free_kib
        && kib < CLEAN_RUN_GIB << 20
    {
        eprintln!(
            "xtask: warning: {:.1} GiB free for {}; a clean build and test run needs about \
             {CLEAN_RUN_GIB} GiB there",
            kib as f64 / (1 << 20) as f64,
            target.display()
        );
    }
}
