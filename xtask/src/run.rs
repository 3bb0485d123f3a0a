//! `cargo xtask run [-- SERVE_ARGS]`: set up, build the release gateway, and serve with the
//! embedded default configuration (or the arguments given).

use anyhow::Result;
use clap::Args;

use crate::{cmd, setup};

#[derive(Args)]
pub struct RunArgs {
    /// Passed to `portcullis serve`, e.g. `-- --config /etc/portcullis/portcullis.toml`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    serve_args: Vec<String>,
}

pub fn run(args: &RunArgs) -> Result<()> {
    setup::setup()?;
    cmd::run(cmd::cargo()?.args(["build", "--release", "-p", "portcullis"]))?;
    let bin = cmd::target_dir()?.join("release").join("portcullis");
    cmd::run(
        std::process::Command::new(bin)
            .arg("serve")
            .args(&args.serve_args),
    )
}
