//! `cargo xtask test`: the README's test command, and exactly what CI runs.
//!
//! Set-up (idempotent), the eBPF build, formatting, lints, a bounded run of every fuzz
//! target, then every test with nextest (each test in its own process, so tests that
//! attach eBPF programs or start servers cannot share state by accident).

use crate::util::{cargo, sh};
use anyhow::Result;

/// Per fuzz target in the test run: five targets and their build stay within a few
/// minutes of CI (longer runs: `cargo xtask fuzz --seconds N`).
const CI_FUZZ_SECONDS: u64 = 15;

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
    // Before the tests: a crash fails the run in minutes rather than after the suite.
    crate::fuzz::run(CI_FUZZ_SECONDS, None)?;
    sh(cargo()
        .args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .args(nextest_args))
}
