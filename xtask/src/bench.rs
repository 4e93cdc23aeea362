//! `cargo xtask bench`: runs the benchmarks and writes `target/nemesis-bench.json`, one
//! flat JSON object of named figures measured in this one run.
//!
//! Each benchmark is a binary of its own crate that prints `NAME=VALUE` lines; this
//! module runs them and collects the figures, so a figure is always from this run.

use crate::util::{cargo, root, sh};
use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};
use std::process::Command;

/// (figure-name prefix filter, package, binary) of every benchmark.
const BENCHES: &[(&str, &str, &str)] = &[
    ("wake_to_scale_ms", "nemesis-tests", "bench-wake"),
    ("proxy", "nemesis-agent", "bench-proxy"),
    ("connect_overhead", "nemesis-agent", "bench-connect"),
    ("lb_", "nemesis-agent", "bench-lb"),
    ("policy_decide", "nemesis-controller", "bench-policy"),
    ("policy_tick_status", "nemesis-tests", "bench-status"),
    ("ui_overview", "nemesis-controller", "bench-ui"),
    // controller_rss_mib_1k_agents_10k_services, api_writes_per_s_steady,
    // wake_to_scale_ms_p99_under_load: a few minutes (see tests/src/bin/bench-scale.rs).
    ("controller_rss_scale", "nemesis-tests", "bench-scale"),
    ("report_30d", "nemesis-controller", "bench-report"),
];

/// Binaries a benchmark runs besides its own (bench binary, package, binary): built in
/// release next to it.
const NEEDS: &[(&str, &str, &str)] = &[("bench-scale", "nemesis-controller", "nemesis-controller")];

/// (figure-name prefix filter, package, test target) of the benchmarks that are ignored
/// tests, because they need the test suite's environment (the sandbox, the real agent
/// and controller in-process): run with `--ignored`, their figures are the stdout lines
/// of the form `name=number`.
const TEST_BENCHES: &[(&str, &str, &str)] = &[
    (
        "wake_to_first_byte",
        "nemesis-tests",
        "bench_wake_first_byte",
    ),
    // 50 rounds of the leader SIGKILLed mid wake/sleep (the test suite runs 10).
    ("failover_ms", "nemesis-tests", "chaos_leader"),
];

/// The scale bench's size when not the acceptance one (its defaults: 1,000 agents,
/// 10,000 Services), for CI-sized runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScaleSize {
    pub agents: Option<usize>,
    pub services: Option<usize>,
}

impl ScaleSize {
    fn args(self, bin: &str) -> Vec<String> {
        if bin != "bench-scale" {
            return Vec::new();
        }
        let mut args = Vec::new();
        if let Some(a) = self.agents {
            args.extend(["--agents".to_string(), a.to_string()]);
        }
        if let Some(s) = self.services {
            args.extend(["--services".to_string(), s.to_string()]);
        }
        args
    }
}

pub fn run(only: Option<&str>, scale: ScaleSize) -> Result<()> {
    crate::setup::run_setup_steps()?;
    crate::ebpf::build()?;
    let mut figures = Map::new();
    for (name, package, bin) in BENCHES {
        if only.is_some_and(|o| !name.contains(o)) {
            continue;
        }
        for (_, pkg, needed) in NEEDS.iter().filter(|(b, _, _)| b == bin) {
            sh(cargo().args(["build", "--release", "-p", pkg, "--bin", needed]))?;
        }
        sh(cargo().args(["build", "--release", "-p", package, "--bin", bin]))?;
        let exe = root().join("target/release").join(bin);
        // Progress (stderr) shows as it comes: the scale bench runs for minutes.
        let out = Command::new(&exe)
            .args(scale.args(bin))
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "benchmark {bin} failed ({}); its output is above",
                out.status
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((k, v)) = line.split_once('=') {
                let v: f64 = v.trim().parse().with_context(|| {
                    format!("{bin} printed a figure that is not a number: {line}")
                })?;
                eprintln!("{k} = {v}");
                figures.insert(k.trim().to_string(), Value::from(v));
            }
        }
    }
    for (name, package, test) in TEST_BENCHES {
        if only.is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let out = cargo()
            .args(["test", "--release", "-p", package, "--test", test])
            .args(["--", "--ignored", "--nocapture", "--test-threads", "1"])
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running the benchmark test {test}"))?;
        if !out.status.success() {
            bail!("benchmark test {test} failed ({})", out.status);
        }
        for (k, v) in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(figure_line)
        {
            eprintln!("{k} = {v}");
            figures.insert(k, Value::from(v));
        }
    }
    let path = root().join("target/nemesis-bench.json");
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(figures))?,
    )?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// A `name=number` line of a test's output (the harness prints its own lines too).
fn figure_line(line: &str) -> Option<(String, f64)> {
    let (k, v) = line.trim().split_once('=')?;
    let named = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    Some((k.to_string(), v.parse().ok()?)).filter(|_| named)
}

#[cfg(test)]
mod tests {
    use super::figure_line;

    #[test]
    fn only_name_equals_number_lines_are_figures() {
        assert_eq!(
            figure_line("wake_to_first_byte_ms_p99=464.9"),
            Some(("wake_to_first_byte_ms_p99".into(), 464.9))
        );
        assert_eq!(figure_line("test wake_to_first_byte ... ok"), None);
        assert_eq!(figure_line("RUST_LOG=debug"), None);
        assert_eq!(figure_line("x=not a number"), None);
    }
}
