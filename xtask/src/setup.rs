//! `cargo xtask setup`: install what a fresh machine lacks to build and test Portcullis.
//! Every step checks first, so a second run does nothing. Extend [`setup`] with new steps.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The toolchain that builds the eBPF programs (aya-build runs `rustup run nightly cargo`).
pub const EBPF_TOOLCHAIN: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13";

/// The OpenID provider the identity tests start (testkit::idp looks for this version).
const OIDC_PROVIDER_VERSION: &str = "9.13.3";

pub fn setup() -> Result<()> {
    ensure_postgres()?;
    ensure_oidc_provider()?;
    ensure_ebpf_toolchain()
}

/// npm's `oidc-provider`, the real IdP of the identity tests, installed from the npm registry
/// into `~/.cache/portcullis/oidc-provider-<version>` (never into the repository).
fn ensure_oidc_provider() -> Result<()> {
    let dir = cmd::home()?
        .join(".cache/portcullis")
        .join(format!("oidc-provider-{OIDC_PROVIDER_VERSION}"));
    if dir.join("node_modules/oidc-provider/package.json").exists() {
        return Ok(());
    }
    if Command::new("node").arg("--version").output().is_err() {
        eprintln!("xtask: installing nodejs and npm");
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "nodejs", "npm"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    eprintln!(
        "xtask: installing oidc-provider {OIDC_PROVIDER_VERSION} into {}",
        dir.display()
    );
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::write(
        dir.join("package.json"),
        "{\"private\": true, \"type\": \"module\"}\n",
    )?;
    cmd::run(
        Command::new("npm")
            .current_dir(&dir)
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--omit=dev",
                "--save-exact",
            ])
            .arg(format!("oidc-provider@{OIDC_PROVIDER_VERSION}")),
    )
}

/// The tests start a throwaway PostgreSQL 15 and drive it with psql and pgbench.
fn ensure_postgres() -> Result<()> {
    if Path::new("/usr/lib/postgresql/15/bin/initdb").exists()
        && Path::new("/usr/lib/postgresql/15/bin/pgbench").exists()
    {
        return Ok(());
    }
    eprintln!("xtask: installing postgresql-15 (server, psql, pgbench)");
    cmd::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "postgresql-15",
                "postgresql-client-15",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Nightly with rust-src (for `-Z build-std=core`) and a bpf-linker that runs.
pub fn ensure_ebpf_toolchain() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()
}

fn ensure_rust_src() -> Result<()> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]));
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => Ok(()),
        Some(_) => cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])),
        None => cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ])),
    }
}

fn bpf_linker_path() -> Result<PathBuf> {
    Ok(cmd::cargo_home()?.join("bin").join("bpf-linker"))
}

/// A bpf-linker is usable when it runs under the nightly toolchain, which puts its lib/ (and
/// so the libLLVM bpf-linker links dynamically) on LD_LIBRARY_PATH, as aya-build's
/// `rustup run nightly cargo` does. A nightly update that replaces that library breaks it;
/// it is then rebuilt.
fn bpf_linker_works(path: &Path) -> bool {
    cmd::output(
        Command::new("rustup")
            .args(["run", EBPF_TOOLCHAIN])
            .arg(path)
            .arg("--version"),
    )
    .is_some_and(|v| v.contains(&format!(" {BPF_LINKER_VERSION}.")))
}

fn ensure_bpf_linker() -> Result<()> {
    let linker = bpf_linker_path()?;
    if bpf_linker_works(&linker) {
        return Ok(());
    }
    // bpf-linker must use the same LLVM as the rustc that emits the bitcode. The nightly
    // toolchain ships its libLLVM; llvm-sys finds it through LLVM_PREFIX/lib/libLLVM.so.
    let sysroot = cmd::output(Command::new("rustup").args([
        "run",
        EBPF_TOOLCHAIN,
        "rustc",
        "--print",
        "sysroot",
    ]))
    .context("cannot find the nightly toolchain's sysroot (rustup run nightly rustc)")?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let (libllvm, major) = find_libllvm(&lib_dir)?;
    let prefix = cmd::home()?
        .join(".cache/portcullis")
        .join(format!("llvm-{EBPF_TOOLCHAIN}"));
    let link = prefix.join("lib").join("libLLVM.so");
    fs::create_dir_all(prefix.join("lib"))
        .with_context(|| format!("cannot create {}", prefix.display()))?;
    if fs::symlink_metadata(&link).is_ok() {
        fs::remove_file(&link).with_context(|| format!("cannot replace {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("cannot link {} to {}", link.display(), libllvm.display()))?;
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        libllvm.display()
    );
    cmd::run(
        Command::new("cargo")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .args(["install", "bpf-linker", "--locked", "--force", "--version"])
            .arg(format!("~{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_works(&linker) {
        bail!(
            "bpf-linker was installed but `rustup run {EBPF_TOOLCHAIN} {} --version` fails",
            linker.display()
        );
    }
    Ok(())
}

/// The toolchain's `libLLVM.so.<major>.<minor>-rust-*` and its LLVM major version.
fn find_libllvm(lib_dir: &Path) -> Result<(PathBuf, u32)> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("cannot read {}", lib_dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(version) = name
            .to_str()
            .and_then(|n| n.strip_prefix("libLLVM.so."))
            .filter(|v| v.contains("-rust-"))
        else {
            continue;
        };
        if let Some(major) = version.split('.').next().and_then(|m| m.parse().ok()) {
            return Ok((entry.path(), major));
        }
    }
    bail!(
        "no libLLVM.so.<version>-rust-* in {}: is the {EBPF_TOOLCHAIN} toolchain complete?",
        lib_dir.display()
    )
}
