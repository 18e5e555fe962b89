//! Builds the XDP program (src/xdp/turnpike.bpf.c) with clang, only with `--features xdp`: a build
//! without the feature needs no clang.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_XDP").is_none() {
        return;
    }
    let src = "src/xdp/turnpike.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("turnpike.bpf.o");
    // The uapi headers' <asm/types.h> lives in the multiarch directory of the build host.
    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let status = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "{clang} failed to build {src} ({s}); the xdp feature needs clang and libbpf-dev"
        ),
        Err(e) => panic!(
            "cannot run {clang} to build {src}: {e}; the xdp feature needs clang and libbpf-dev"
        ),
    }
}
