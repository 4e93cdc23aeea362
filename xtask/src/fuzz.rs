//! `cargo xtask fuzz [--seconds N] [--only NAME]`: builds the cargo-fuzz targets in
//! `fuzz/` (nightly, libFuzzer) and runs each for a bounded time from its committed seed
//! corpus (`fuzz/seeds/<target>`); fails on the first crash, naming the reproducer.
//! What libFuzzer learns goes to `fuzz/corpus/<target>` (ignored by git, kept between
//! runs); crashes to `fuzz/artifacts/<target>/`.

use crate::util::{root, sh};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

/// Every target, in the order they run.
pub const TARGETS: [&str; 5] = [
    "policy_condition",
    "policy_draft",
    "alertmanager",
    "agent_api",
    "proxy_sniff",
];

/// Per target by default: long enough to get past the seeds' neighbourhood, short
/// enough that five targets and their build fit CI's fuzz budget (a few minutes).
pub const DEFAULT_SECONDS: u64 = 20;

/// The build every run shares: the dev profile of `fuzz/Cargo.toml` (opt-level 1),
/// without a sanitizer (the code under test is safe Rust: what libFuzzer finds there are
/// panics, which abort without one). `-O` would build in release, several minutes more.
fn fuzz_command(sub: &str) -> Command {
    let mut cmd = crate::ebpf::nightly_cargo();
    cmd.current_dir(root().join("fuzz"))
        .args(["fuzz", sub, "--dev", "--sanitizer", "none"])
        // cargo-fuzz passes its instrumentation in RUSTFLAGS, which this would override.
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    crate::setup::cargo_fuzz()?;
    // The agent embeds the eBPF object.
    crate::ebpf::build()?;
    let targets: Vec<&str> = TARGETS
        .into_iter()
        .filter(|t| only.is_none_or(|o| t.contains(o)))
        .collect();
    if targets.is_empty() {
        bail!(
            "no fuzz target matches {only:?}; the targets: {}",
            TARGETS.join(", ")
        );
    }
    sh(&mut fuzz_command("build"))?;
    for target in targets {
        run_one(target, seconds)?;
    }
    Ok(())
}

fn run_one(target: &str, seconds: u64) -> Result<()> {
    let fuzz = root().join("fuzz");
    let corpus = fuzz.join("corpus").join(target);
    let seeds = fuzz.join("seeds").join(target);
    let artifacts = fuzz.join("artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let before = crashes(&artifacts)?;
    let result = sh(fuzz_command("run")
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // Inputs past 64 KiB only slow the search; the messages are far smaller.
        .arg("-max_len=65536")
        .arg(format!("-artifact_prefix={}/", artifacts.display())));
    if let Err(err) = result {
        let found: Vec<String> = crashes(&artifacts)?
            .into_iter()
            .filter(|c| !before.contains(c))
            .collect();
        if found.is_empty() {
            return Err(err.context(format!("fuzz target {target} failed")));
        }
        bail!(
            "fuzz target {target} crashed; reproducer(s):\n  {}\n\
             replay with: cd fuzz && cargo +nightly fuzz run --dev --sanitizer none {target} <reproducer>\n\
             then make it a regression test in the crate's normal tests, with the fix",
            found.join("\n  ")
        );
    }
    Ok(())
}

/// The reproducers in `dir`.
fn crashes(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        out.push(entry?.path().display().to_string());
    }
    out.sort();
    Ok(out)
}
