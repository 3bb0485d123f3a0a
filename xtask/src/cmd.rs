//! Running commands with their output visible and their failure named.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `cmd` with inherited stdio; a non-zero exit is an error that shows the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout, or `None` if it cannot start or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// `$CARGO_HOME`, default `~/.cargo`: where `cargo install` puts binaries.
pub fn cargo_home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(h));
    }
    Ok(home()?.join(".cargo"))
}

pub fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// A `cargo` command that finds binaries installed by `cargo install` (bpf-linker) even when
/// `$CARGO_HOME/bin` is not on the caller's PATH.
pub fn cargo() -> Result<Command> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd.env("PATH", path_with_cargo_bin()?);
    Ok(cmd)
}

pub fn path_with_cargo_bin() -> Result<OsString> {
    let bin = cargo_home()?.join("bin");
    let mut dirs = vec![bin.clone()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path).filter(|d| *d != bin));
    }
    std::env::join_paths(dirs).context("PATH contains an invalid entry")
}

/// Where cargo puts build output: `CARGO_TARGET_DIR`, else `target/` in the workspace.
pub fn target_dir() -> Result<PathBuf> {
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target")))
}
