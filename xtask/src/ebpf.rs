//! `cargo xtask build-ebpf`: builds `nemesis-ebpf` with the nightly toolchain.
//!
//! The object lands at `target/bpfel-unknown-none/release/nemesis-ebpf`, where the
//! agent's build script embeds it from.

use crate::util::{root, sh};
use anyhow::{Result, bail};
use std::process::Command;

pub const TARGET: &str = "bpfel-unknown-none";

pub fn build() -> Result<()> {
    if crate::util::output(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker is not installed (or cannot find its libLLVM): run `cargo xtask setup`");
    }
    let root = root();
    let mut cmd = nightly_cargo();
    cmd.current_dir(root.join("nemesis-ebpf"))
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(root.join("target"))
        // BTF in the object: the socket-storage map (SOCK_LIVE) is a BTF map, and the
        // iterator program is typed against the kernel's BTF.
        .env("CARGO_ENCODED_RUSTFLAGS", "-C\x1flink-arg=--btf");
    sh(&mut cmd)
}

/// `cargo` of the nightly toolchain, with the variables of the stable cargo that runs
/// xtask removed, so they cannot leak the stable rustc into the nightly build.
pub fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    // The host's linker flags or a wrapper must not be applied to BPF code.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "");
    cmd
}
