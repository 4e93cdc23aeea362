//! `cargo xtask test`: the README's test command, and exactly what CI runs.
//!
//! Set-up (idempotent), the eBPF build, formatting, lints, then every test with
//! nextest (each test in its own process, so tests that attach eBPF programs or start
//! servers cannot share state by accident).

use crate::util::{cargo, sh};
use anyhow::Result;

pub fn run_all(nextest_args: &[String]) -> Result<()> {
    crate::setup::run_setup_steps()?;
    crate::ebpf::build()?;
    sh(cargo().args(["fmt", "--all", "--check"]))?;
    sh(crate::ebpf::nightly_cargo()
        .current_dir(crate::util::root().join("nemesis-ebpf"))
        .args(["fmt", "--check"]))?;
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

pub fn run(nextest_args: &[String]) -> Result<()> {
    run_all(nextest_args)
}
