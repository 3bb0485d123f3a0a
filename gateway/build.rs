//! Compiles the eBPF programs (ebpf-programs/ebpf) with aya-build: nightly cargo,
//! `-Z build-std=core`, target bpfel-unknown-none, linked by bpf-linker. The object lands in
//! OUT_DIR and `redirect` embeds it with `include_bytes_aligned!`.
//!
//! Without the toolchain (or with AYA_BUILD_SKIP=1 for a quick check) an empty object is
//! embedded and a warning printed: everything builds, and `Redirector::start` reports that
//! interception was not built in. `cargo xtask build-ebpf` / `cargo xtask test` install the
//! toolchain first and set PORTCULLIS_REQUIRE_EBPF=1, which turns the stub into an error.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const EBPF_PACKAGE: &str = "portcullis-ebpf";
const TOOLCHAIN: &str = "nightly";

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let programs = manifest_dir.join("../ebpf-programs");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=PORTCULLIS_REQUIRE_EBPF");
    println!(
        "cargo:rerun-if-changed={}",
        programs.join("common").display()
    );

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let missing = if skip {
        Some("AYA_BUILD_SKIP is set".to_owned())
    } else {
        missing_toolchain()
    };
    if let Some(why) = missing {
        if env::var_os("PORTCULLIS_REQUIRE_EBPF").is_some_and(|v| v == "1") {
            panic!("cannot build the eBPF programs: {why}");
        }
        println!(
            "cargo:warning=eBPF programs not built ({why}); this gateway cannot intercept. \
             Run `cargo xtask build-ebpf`."
        );
        // Rebuild once the toolchain appears (bpf-linker is installed last).
        if let Some(bin) = cargo_bin() {
            println!("cargo:rerun-if-changed={}", bin.display());
        }
        std::fs::write(out_dir.join(EBPF_PACKAGE), []).expect("write the empty eBPF stub");
        return;
    }

    let root_dir = programs.join("ebpf");
    let root_dir = root_dir.to_str().expect("workspace path is UTF-8");
    // aya-build turns every line the nested cargo prints into a warning, replayed on every
    // later build; quiet keeps only real diagnostics.
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    let package = aya_build::Package {
        name: EBPF_PACKAGE,
        root_dir,
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(TOOLCHAIN)) {
        panic!("building the eBPF programs failed: {e:#}");
    }
}

fn cargo_bin() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|h| h.join("bin"))
}

/// What is missing to build the eBPF object, if anything.
fn missing_toolchain() -> Option<String> {
    let on_path = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !on_path {
        return Some("bpf-linker is not on PATH".to_owned());
    }
    let Some(sysroot) = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
    else {
        return Some(format!(
            "no {TOOLCHAIN} toolchain (rustup run {TOOLCHAIN} rustc)"
        ));
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Some(format!("the {TOOLCHAIN} toolchain has no rust-src"));
    }
    None
}
