//! The Prometheus side of a report, as plain functions: the usage queries (cAdvisor's
//! series for the Service's pods by default, overridable), the steps a window is queried
//! at, and how the answers integrate into core-hours and GiB-hours. No I/O: the report
//! handler runs the queries these describe.

use super::{SERIES_POINTS, Span};

/// The CPU cores the Service's containers used on average over each step (`$range` is
/// the step): cAdvisor's counter of CPU seconds as a rate. `container!=""` drops the
/// pod-level cgroup series and `container!="POD"` the pause container, which would count
/// the same usage twice.
pub const DEFAULT_CPU_USAGE_QUERY: &str = r#"sum(rate(container_cpu_usage_seconds_total{namespace="$namespace",pod=~"$pod",container!="",container!="POD"}[$range]))"#;

/// The memory bytes the Service's containers used on average over each step (the working
/// set, what the kubelet evicts on).
pub const DEFAULT_MEMORY_USAGE_QUERY: &str = r#"sum(avg_over_time(container_memory_working_set_bytes{namespace="$namespace",pod=~"$pod",container!="",container!="POD"}[$range]))"#;

/// Usage steps are at least a minute: `rate()` needs two scrapes inside its range, and a
/// minute covers the usual 15 s and 30 s scrape intervals. The range of a usage query is
/// its step, so the steps tile the window without overlap: a pod that starts or stops
/// inside a step counts only for what it used there.
pub const MIN_USAGE_STEP_MS: u64 = 60_000;
/// Chart steps are at least a second; their `$range` at least [`MIN_USAGE_STEP_MS`].
pub const MIN_SERIES_STEP_MS: u64 = 1_000;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The usage queries a report runs (templates with `$namespace`, `$pod`, `$range`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQueries {
    pub cpu: String,
    pub memory: String,
}

impl Default for UsageQueries {
    fn default() -> Self {
        Self {
            cpu: DEFAULT_CPU_USAGE_QUERY.to_string(),
            memory: DEFAULT_MEMORY_USAGE_QUERY.to_string(),
        }
    }
}

/// Where and how often a window is queried: points at `start + k*step` up to `end`
/// (Unix seconds), each standing for the step that ends at it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Steps {
    pub start: f64,
    pub end: f64,
    pub step: f64,
    /// What `$range` becomes, in milliseconds.
    pub range_ms: u64,
}

/// Equal steps tiling `span`: at most [`SERIES_POINTS`] of them, each at least
/// `min_step_ms`; `$range` is the step, at least `min_range_ms`.
pub fn steps(span: Span, min_step_ms: u64, min_range_ms: u64) -> Steps {
    let window = span.to_ms.saturating_sub(span.from_ms).max(1);
    let wanted = (window / SERIES_POINTS as u64).max(min_step_ms).max(1);
    let n = (window / wanted).max(1);
    let step_ms = window / n;
    Steps {
        start: (span.from_ms + step_ms) as f64 / 1000.0,
        end: (span.from_ms + n * step_ms) as f64 / 1000.0,
        step: step_ms as f64 / 1000.0,
        range_ms: step_ms.max(min_range_ms),
    }
}

/// The steps of the usage queries over `span` (see [`MIN_USAGE_STEP_MS`]).
pub fn usage_steps(span: Span) -> Steps {
    steps(span, MIN_USAGE_STEP_MS, 0)
}

/// The steps of a chart's series over `span`.
pub fn series_steps(span: Span) -> Steps {
    steps(span, MIN_SERIES_STEP_MS, MIN_USAGE_STEP_MS)
}

/// The regular expression matching the pods of a target: a Deployment's are
/// `<name>-<template hash>-<suffix>`, a StatefulSet's `<name>-<ordinal>`, anything else
/// `<name>-...`.
pub fn pod_regex(kind: Option<&str>, name: &str) -> String {
    // Object names are DNS subdomains: `.` is the only regex metacharacter they can hold.
    let name = name.replace('.', "\\\\.");
    match kind {
        None | Some("Deployment") => format!("{name}-[a-z0-9]+-[a-z0-9]+"),
        Some("StatefulSet") => format!("{name}-[0-9]+"),
        Some(_) => format!("{name}-.+"),
    }
}

/// `template` with its placeholders filled in.
pub fn fill(template: &str, namespace: &str, pod: &str, range_ms: u64) -> String {
    template
        .replace("$namespace", namespace)
        .replace("$pod", pod)
        .replace("$range", &format!("{range_ms}ms"))
}

/// The integral of a stepped series (each point stands for the step ending at it) in
/// unit-hours.
pub fn unit_hours(points: &[(f64, f64)], step: f64) -> f64 {
    points
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .sum::<f64>()
        * step
        / 3600.0
}

/// CPU core-hours from the CPU query's points (cores at each step).
pub fn cpu_core_hours(points: &[(f64, f64)], step: f64) -> f64 {
    unit_hours(points, step)
}

/// Memory GiB-hours from the memory query's points (bytes at each step).
pub fn memory_gib_hours(points: &[(f64, f64)], step: f64) -> f64 {
    unit_hours(points, step) / GIB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_steps_tile_the_window_in_minutes_and_charts_step_finer() {
        let day = Span {
            from_ms: 1_000_000,
            to_ms: 1_000_000 + 24 * 3_600_000,
        };
        let s = usage_steps(day);
        assert_eq!((s.step, s.range_ms), (360.0, 360_000));
        assert_eq!((s.start, s.end), (1_000.0 + 360.0, 1_000.0 + 24.0 * 3600.0));
        // A minute: one step of a minute, its range the same minute.
        let minute = Span {
            from_ms: 0,
            to_ms: 60_000,
        };
        let s = usage_steps(minute);
        assert_eq!(
            (s.start, s.end, s.step, s.range_ms),
            (60.0, 60.0, 60.0, 60_000)
        );
        // 90 s: one step of 90 s (steps never shorter than a minute, and never a gap).
        let s = usage_steps(Span {
            from_ms: 0,
            to_ms: 90_000,
        });
        assert_eq!((s.end, s.step, s.range_ms), (90.0, 90.0, 90_000));
        let s = series_steps(minute);
        assert_eq!((s.step, s.range_ms), (1.0, 60_000));
    }

    #[test]
    fn queries_are_filled_for_the_targets_pods() {
        let q = fill(
            DEFAULT_CPU_USAGE_QUERY,
            "shop",
            &pod_regex(None, "web.v2"),
            60_000,
        );
        assert!(q.contains(r#"namespace="shop""#), "{q}");
        assert!(q.contains(r#"pod=~"web\\.v2-[a-z0-9]+-[a-z0-9]+""#), "{q}");
        assert!(q.contains("[60000ms]"), "{q}");
        assert_eq!(pod_regex(Some("StatefulSet"), "db"), "db-[0-9]+");
    }

    #[test]
    fn usage_integrates_over_the_steps() {
        // Half a core and 2 GiB for an hour of 10 s steps.
        let cpu: Vec<(f64, f64)> = (1..=360).map(|i| (f64::from(i) * 10.0, 0.5)).collect();
        assert!((cpu_core_hours(&cpu, 10.0) - 0.5).abs() < 1e-9);
        let mem: Vec<(f64, f64)> = (1..=360)
            .map(|i| (f64::from(i) * 10.0, 2.0 * GIB))
            .collect();
        assert!((memory_gib_hours(&mem, 10.0) - 2.0).abs() < 1e-9);
    }
}
