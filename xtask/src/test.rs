//! `cargo xtask test`: the README's test command, and exactly what CI runs.
//!
//! Set-up (idempotent), the eBPF build, formatting, lints, then every test with
//! nextest (each test in its own process, so tests that attach eBPF programs or start
//! servers cannot share state by accident).

use crate::util::{cargo, sh};
use anyhow::Result;

pub fn run(nextest_args: &[String]) -> Result<()> {
    crate::setup::run_setup_steps()?;
    crate::ebpf::build()?;
    sh(cargo().args(["fmt", "--all", "--check"]))?;
    // The eBPF crate is a workspace of its own; stable rustfmt formats it fine.
    sh(cargo().args([
        "fmt",
        "--manifest-path",
        "nemesis-ebpf/Cargo.toml",
        "--check",
    ]))?;
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    sh(cargo()
        .args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .args(nextest_args))
}
