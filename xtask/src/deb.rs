//! `cargo xtask deb`: the Debian package, built by cargo-deb (installed here, once, into
//! `$CARGO_HOME/bin`). The metadata is `[package.metadata.deb]` in gateway/Cargo.toml; the unit,
//! the default config and the maintainer scripts live in packaging/.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{cmd, ebpf, setup};

const CARGO_DEB_VERSION: &str = "3.8.0";

#[derive(Args)]
pub struct DebArgs {
    /// Cargo profile to package. The tests package `dev`, whose binary they already built.
    #[arg(long, default_value = "release")]
    pub profile: String,
    /// Package the binary already built for the profile instead of building it.
    #[arg(long)]
    pub no_build: bool,
    /// Directory for the .deb [default: TARGET_DIR/debian].
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn deb(args: &DebArgs) -> Result<()> {
    let path = build(args)?;
    println!("{}", path.display());
    Ok(())
}

/// Builds the package and returns its path.
pub fn build(args: &DebArgs) -> Result<PathBuf> {
    ensure_cargo_deb()?;
    let profile_dir = cmd::target_dir()?.join(match args.profile.as_str() {
        "dev" | "test" => "debug",
        p => p,
    });
    if !args.no_build {
        setup::ensure_ebpf_toolchain()?;
        cmd::run(
            cmd::cargo()?
                .args(["build", "-p", "portcullis", "--profile", &args.profile])
                .env(ebpf::REQUIRE_EBPF_ENV, "1")
                .env_remove("AYA_BUILD_SKIP"),
        )?;
    }
    let bin = profile_dir.join("portcullis");
    if !bin.exists() {
        bail!("{} is not built (drop --no-build)", bin.display());
    }
    // Man pages and completions come from the CLI definition itself.
    cmd::run(
        Command::new(&bin)
            .arg("generate-docs")
            .arg("--out")
            .arg(profile_dir.join("generated")),
    )?;
    let output = match &args.output {
        Some(o) => o.clone(),
        None => cmd::target_dir()?.join("debian"),
    };
    std::fs::create_dir_all(&output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let mut deb = cmd::cargo()?;
    deb.args([
        "deb",
        "-p",
        "portcullis",
        "--no-build",
        "--profile",
        &args.profile,
    ])
    .arg("--output")
    .arg(&output);
    if args.profile != "release" {
        // A test package: quick to compress, nothing to strip for.
        deb.args(["--fast", "--no-strip"]);
    }
    eprintln!("xtask: running {deb:?}");
    let out = deb
        .output()
        .with_context(|| format!("cannot start {deb:?}"))?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{deb:?} failed: {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .context("cargo deb did not print the package's path")?;
    Ok(path)
}

fn ensure_cargo_deb() -> Result<()> {
    let version = cmd::output(cmd::cargo()?.args(["deb", "--version"]));
    if version.is_some_and(|v| v.contains(CARGO_DEB_VERSION)) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (a few minutes, once)");
    cmd::run(
        Command::new("cargo")
            .args([
                "install",
                "cargo-deb",
                "--locked",
                "--version",
                CARGO_DEB_VERSION,
            ])
            .env_remove("CARGO_TARGET_DIR"),
    )
}
