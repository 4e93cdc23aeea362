//! Reports per Service (policy), per namespace and cluster-wide over a window: scaling
//! (transitions with reasons, time per state, wakes and their cold-start distribution,
//! holds timed out or failed), resources (replica-, CPU-core-, memory-GiB- and GPU-hours
//! from the pods' requests against the same Service kept at its maximum, the saving,
//! optionally priced) and application performance (connection rate and open
//! connections over time). Built by plain functions from what the store and the caller
//! read; rendered by [`render`]. Nothing here does I/O.

pub mod render;
pub mod usage;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::{ColdStartRecord, MetricPoint, TransitionRecord};

/// Transitions listed per Service at most (the counts cover the whole window).
pub const MAX_TRANSITIONS_LISTED: usize = 200;
/// Points per performance series: about one per pixel column of a printed chart.
pub const SERIES_POINTS: usize = 240;
/// Connections the agents' proxies refused at a held-connection bound, per sample (the
/// rise since the previous sample, as the actor records it).
pub const HOLDS_REFUSED_SERIES: &str = "proxy.holds.refused";
/// Errors the agents' proxies saw (failed or timed-out backend dials, forwarded
/// connections reset or failed), per sample.
pub const PROXY_ERRORS_SERIES: &str = "proxy.errors";
/// The performance series charted, as the actor samples them.
pub const PERFORMANCE_SERIES: [&str; 5] = [
    "conns.rate",
    "conns.active",
    "nemesis.replicas",
    HOLDS_REFUSED_SERIES,
    PROXY_ERRORS_SERIES,
];
/// Series whose samples are counts of events since the previous sample: their `total`
/// over the window is the sum of the samples.
pub const COUNT_SERIES: [&str; 2] = [HOLDS_REFUSED_SERIES, PROXY_ERRORS_SERIES];

/// A time window, Unix milliseconds, `from_ms < to_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Span {
    pub from_ms: u64,
    pub to_ms: u64,
}

impl Span {
    pub fn hours(&self) -> f64 {
        self.to_ms.saturating_sub(self.from_ms) as f64 / 3_600_000.0
    }
}

/// What one replica asks for (the pod template's requests, summed over containers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PerReplica {
    pub cpu_cores: f64,
    pub memory_gib: f64,
    pub gpus: f64,
}

/// Prices per unit-hour (any currency); absent: no cost figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Prices {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_hour: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_core_hour: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_gib_hour: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_hour: Option<f64>,
}

impl Prices {
    pub fn any(&self) -> bool {
        self.replica_hour.is_some()
            || self.cpu_core_hour.is_some()
            || self.memory_gib_hour.is_some()
            || self.gpu_hour.is_some()
    }

    fn cost(&self, u: &Usage) -> f64 {
        self.replica_hour.unwrap_or(0.0) * u.replica_hours
            + self.cpu_core_hour.unwrap_or(0.0) * u.cpu_core_hours
            + self.memory_gib_hour.unwrap_or(0.0) * u.memory_gib_hours
            + self.gpu_hour.unwrap_or(0.0) * u.gpu_hours
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub replica_hours: f64,
    pub cpu_core_hours: f64,
    pub memory_gib_hours: f64,
    pub gpu_hours: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
}

impl Usage {
    fn of(replica_hours: f64, r: &PerReplica, prices: &Prices) -> Self {
        let mut u = Usage {
            replica_hours,
            cpu_core_hours: replica_hours * r.cpu_cores,
            memory_gib_hours: replica_hours * r.memory_gib,
            gpu_hours: replica_hours * r.gpus,
            cost: None,
        };
        if prices.any() {
            u.cost = Some(prices.cost(&u));
        }
        u
    }

    fn minus(&self, o: &Usage) -> Usage {
        Usage {
            replica_hours: self.replica_hours - o.replica_hours,
            cpu_core_hours: self.cpu_core_hours - o.cpu_core_hours,
            memory_gib_hours: self.memory_gib_hours - o.memory_gib_hours,
            gpu_hours: self.gpu_hours - o.gpu_hours,
            cost: self.cost.zip(o.cost).map(|(a, b)| a - b),
        }
    }

    fn add(&mut self, o: &Usage) {
        self.replica_hours += o.replica_hours;
        self.cpu_core_hours += o.cpu_core_hours;
        self.memory_gib_hours += o.memory_gib_hours;
        self.gpu_hours += o.gpu_hours;
        self.cost = match (self.cost, o.cost) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        };
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    pub max_replicas: u32,
    pub per_replica: PerReplica,
    /// What the Service used (replica-hours from its scale history).
    pub used: Usage,
    /// The same Service kept at `maxReplicas` over the whole window.
    pub at_max: Usage,
    /// `atMax - used`.
    pub saved: Usage,
    /// `false` when no scale event says how many replicas there were (nothing counted).
    pub known: bool,
    /// What the pods really used, from the Prometheus usage queries; absent when the
    /// controller has no Prometheus configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
}

/// Usage measured by Prometheus over the window, beside the request-based figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Measured {
    /// CPU core-hours the Service's containers used (`None`: see `notes`).
    pub cpu_core_hours: Option<f64>,
    /// Memory GiB-hours of the containers' working sets (`None`: see `notes`).
    pub memory_gib_hours: Option<f64>,
    /// Why a figure is missing (Prometheus unreachable, an answer that is not usable).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Wakes {
    pub count: usize,
    pub ready: usize,
    /// No pod ready within the readiness budget: the held connections timed out.
    pub holds_timed_out: usize,
    /// Refused or failed wakes (scale refused, policy deleted, ...).
    pub failed: usize,
    pub held_connections: u64,
    /// Connections the agents' proxies refused at once at a held-connection bound.
    pub holds_refused: u64,
    pub p50_ms: Option<u64>,
    pub p95_ms: Option<u64>,
    pub p99_ms: Option<u64>,
    pub max_ms: Option<u64>,
}

pub fn wakes(records: &[ColdStartRecord]) -> Wakes {
    let s = crate::store::reports::cold_start_stats(records);
    Wakes {
        count: s.count,
        ready: s.ready,
        holds_timed_out: s.timeouts,
        failed: s.failures,
        held_connections: s.held_connections,
        holds_refused: 0,
        p50_ms: s.p50_ms,
        p95_ms: s.p95_ms,
        p99_ms: s.p99_ms,
        max_ms: s.max_ms,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransitionRow {
    pub at_ms: u64,
    pub from: String,
    pub to: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Scaling {
    pub transitions: usize,
    /// The latest [`MAX_TRANSITIONS_LISTED`], oldest first.
    pub transitions_listed: Vec<TransitionRow>,
    pub time_in_states_seconds: BTreeMap<String, f64>,
    pub wakes: Wakes,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Series {
    /// `[unix ms, value]`, at most [`SERIES_POINTS`].
    pub points: Vec<[f64; 2]>,
    pub avg: Option<f64>,
    pub max: Option<f64>,
    /// The sum over the window, for series that count events per sample
    /// ([`COUNT_SERIES`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<f64>,
}

/// The sum of a counting series' samples: a raw sample is its count, a minute bucket
/// the sum of the samples folded into it.
pub fn total(points: &[MetricPoint]) -> f64 {
    points
        .iter()
        .map(|p| match p.value {
            crate::store::SampleValue::Raw { value } => value,
            crate::store::SampleValue::Minute { avg, count, .. } => avg * f64::from(count),
        })
        .filter(|v| v.is_finite())
        .sum()
}

pub fn series(points: &[MetricPoint], span: Span) -> Series {
    let values: Vec<f64> = points
        .iter()
        .map(|p| p.value.mean())
        .filter(|v| v.is_finite())
        .collect();
    let avg = (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
    let max = values.iter().copied().reduce(f64::max);
    Series {
        points: crate::ui::api::downsample(points, span.from_ms..span.to_ms, SERIES_POINTS),
        avg,
        max,
        total: None,
    }
}

/// Everything read for one Service; [`service`] turns it into its report.
pub struct ServiceInput {
    pub namespace: String,
    pub name: String,
    pub deployment: String,
    pub state: Option<String>,
    /// The report's window, clipped to the policy's creation (a young policy is not
    /// credited with savings from before it existed).
    pub span: Span,
    pub transitions: Vec<TransitionRecord>,
    pub time_in_states_ms: BTreeMap<String, u64>,
    pub cold_starts: Vec<ColdStartRecord>,
    pub replica_seconds: Option<f64>,
    pub max_replicas: u32,
    pub per_replica: PerReplica,
    pub performance: BTreeMap<String, Vec<MetricPoint>>,
    /// The Prometheus usage figures, when a Prometheus is configured.
    pub measured: Option<Measured>,
    /// Series from the policy's `spec.reports` queries (`latency`, `errorRate`).
    pub user_series: BTreeMap<String, Vec<MetricPoint>>,
    /// Why a series or figure is missing.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReport {
    pub namespace: String,
    pub name: String,
    pub deployment: String,
    pub state: Option<String>,
    pub span: Span,
    pub scaling: Scaling,
    pub resources: Resources,
    /// Errors the agents' proxies saw over the window (the `proxy.errors` series'
    /// total).
    pub proxy_errors: u64,
    pub performance: BTreeMap<String, Series>,
    /// Why a series or figure of this Service is missing (a failing Prometheus query).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

pub fn service(i: ServiceInput, prices: &Prices) -> ServiceReport {
    let listed_from = i.transitions.len().saturating_sub(MAX_TRANSITIONS_LISTED);
    let scaling = Scaling {
        transitions: i.transitions.len(),
        transitions_listed: i.transitions[listed_from..]
            .iter()
            .map(|t| TransitionRow {
                at_ms: t.at_ms,
                from: t.from_state.clone(),
                to: t.to_state.clone(),
                reason: t.reason.clone(),
            })
            .collect(),
        time_in_states_seconds: i
            .time_in_states_ms
            .iter()
            .map(|(s, ms)| (s.clone(), *ms as f64 / 1000.0))
            .collect(),
        wakes: wakes(&i.cold_starts),
    };
    let hours = i.span.hours();
    let used = Usage::of(
        i.replica_seconds.unwrap_or(0.0) / 3600.0,
        &i.per_replica,
        prices,
    );
    let at_max = Usage::of(f64::from(i.max_replicas) * hours, &i.per_replica, prices);
    let resources = Resources {
        max_replicas: i.max_replicas,
        per_replica: i.per_replica,
        saved: at_max.minus(&used),
        used,
        at_max,
        known: i.replica_seconds.is_some(),
        measured: i.measured,
    };
    let mut scaling = scaling;
    let performance: BTreeMap<String, Series> = i
        .performance
        .iter()
        .chain(i.user_series.iter())
        .map(|(k, pts)| {
            let mut s = series(pts, i.span);
            if COUNT_SERIES.contains(&k.as_str()) {
                s.total = Some(total(pts));
            }
            (k.clone(), s)
        })
        .collect();
    scaling.wakes.holds_refused = performance
        .get(HOLDS_REFUSED_SERIES)
        .and_then(|s| s.total)
        .unwrap_or(0.0)
        .round() as u64;
    let proxy_errors = performance
        .get(PROXY_ERRORS_SERIES)
        .and_then(|s| s.total)
        .unwrap_or(0.0)
        .round() as u64;
    ServiceReport {
        namespace: i.namespace,
        name: i.name,
        deployment: i.deployment,
        state: i.state,
        span: i.span,
        scaling,
        resources,
        proxy_errors,
        performance,
        notes: i.notes,
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub services: usize,
    pub transitions: usize,
    /// Over every Service's wakes together.
    pub wakes: Wakes,
    pub proxy_errors: u64,
    pub used: Usage,
    pub at_max: Usage,
    pub saved: Usage,
    /// The measured usage summed over the Services that have it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `service`, `namespace` or `cluster`.
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub span: Span,
    pub generated_at_ms: u64,
    pub prices: Prices,
    pub services: Vec<ServiceReport>,
    pub totals: Totals,
}

/// What a report covers: `service`, `namespace` or `cluster`, and which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub scope: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// The report over `services` (their cold starts are passed again for the totals'
/// distribution, which cannot be merged from percentiles).
pub fn report(
    scope: Scope,
    span: Span,
    now_ms: u64,
    prices: Prices,
    services: Vec<ServiceReport>,
    all_cold_starts: &[ColdStartRecord],
) -> Report {
    let mut totals = Totals {
        services: services.len(),
        wakes: wakes(all_cold_starts),
        ..Totals::default()
    };
    for s in &services {
        totals.transitions += s.scaling.transitions;
        totals.wakes.holds_refused += s.scaling.wakes.holds_refused;
        totals.proxy_errors += s.proxy_errors;
        if let Some(m) = &s.resources.measured {
            let t = totals.measured.get_or_insert_with(Measured::default);
            let add = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
            };
            t.cpu_core_hours = add(t.cpu_core_hours, m.cpu_core_hours);
            t.memory_gib_hours = add(t.memory_gib_hours, m.memory_gib_hours);
        }
        totals.used.add(&s.resources.used);
        totals.at_max.add(&s.resources.at_max);
        totals.saved.add(&s.resources.saved);
    }
    Report {
        scope: scope.scope,
        namespace: scope.namespace,
        name: scope.name,
        span,
        generated_at_ms: now_ms,
        prices,
        services,
        totals,
    }
}

/// A Kubernetes quantity (`500m`, `2`, `1.5`, `512Mi`, `1G`, `1e3`) as a number of base
/// units; `None` when it is not one.
pub fn quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        _ => return None,
    };
    Some(n * mult)
}

/// The requests of one replica of a pod template's containers (limits when a request is
/// absent, as the scheduler defaults it); GPUs are `nvidia.com/gpu`, `amd.com/gpu` and
/// other `*/gpu` resources.
pub fn per_replica(spec: &k8s_openapi::api::core::v1::PodSpec) -> PerReplica {
    let mut r = PerReplica::default();
    for c in &spec.containers {
        let Some(res) = &c.resources else { continue };
        let mut all = res.limits.clone().unwrap_or_default();
        all.extend(res.requests.clone().unwrap_or_default());
        for (k, v) in all {
            let Some(n) = quantity(&v.0) else { continue };
            match k.as_str() {
                "cpu" => r.cpu_cores += n,
                "memory" => r.memory_gib += n / (1024.0 * 1024.0 * 1024.0),
                k if k.ends_with("/gpu") => r.gpus += n,
                _ => {}
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ColdStartOutcome, PolicyId};

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(quantity("500m"), Some(0.5));
        assert_eq!(quantity("2"), Some(2.0));
        assert_eq!(quantity("1Gi"), Some(1073741824.0));
        assert_eq!(quantity("1G"), Some(1e9));
        assert_eq!(quantity("1e3"), Some(1000.0));
        assert_eq!(quantity("1.5Mi"), Some(1.5 * 1048576.0));
        assert_eq!(quantity("lots"), None);
        assert_eq!(quantity("1Xi"), None);
    }

    fn cold(ms: Option<u64>, outcome: ColdStartOutcome) -> ColdStartRecord {
        ColdStartRecord {
            wake_at_ms: 0,
            policy: PolicyId::new("ns", "p"),
            time_to_ready_ms: ms,
            held_connections: 2,
            outcome,
        }
    }

    #[test]
    fn wakes_have_a_distribution_and_count_timeouts_and_failures_apart() {
        let mut r: Vec<ColdStartRecord> = (1..=100)
            .map(|i| cold(Some(i * 10), ColdStartOutcome::Ready))
            .collect();
        r.push(cold(None, ColdStartOutcome::Timeout));
        r.push(cold(
            None,
            ColdStartOutcome::Failed {
                message: "x".into(),
            },
        ));
        let w = wakes(&r);
        assert_eq!(
            (w.count, w.ready, w.holds_timed_out, w.failed),
            (102, 100, 1, 1)
        );
        assert_eq!(w.p50_ms, Some(500));
        assert_eq!(w.p95_ms, Some(950));
        assert_eq!(w.p99_ms, Some(990));
        assert_eq!(w.max_ms, Some(1000));
        assert_eq!(w.held_connections, 204);
    }

    #[test]
    fn refused_holds_and_proxy_errors_are_summed_over_raw_samples_and_minute_buckets() {
        use crate::store::SampleValue;
        let span = Span {
            from_ms: 0,
            to_ms: 3_600_000,
        };
        let pt = |at_ms, value| MetricPoint { at_ms, value };
        let refused = vec![
            // Three samples folded into a minute: 1 + 0 + 2.
            pt(
                0,
                SampleValue::Minute {
                    min: 0.0,
                    max: 2.0,
                    avg: 1.0,
                    count: 3,
                },
            ),
            pt(120_000, SampleValue::Raw { value: 4.0 }),
            pt(180_000, SampleValue::Raw { value: 0.0 }),
        ];
        let errors = vec![pt(60_000, SampleValue::Raw { value: 2.0 })];
        let s = service(
            ServiceInput {
                namespace: "ns".into(),
                name: "p".into(),
                deployment: "d".into(),
                state: None,
                span,
                transitions: vec![],
                time_in_states_ms: BTreeMap::new(),
                cold_starts: vec![],
                replica_seconds: None,
                max_replicas: 1,
                per_replica: PerReplica::default(),
                performance: BTreeMap::from([
                    (HOLDS_REFUSED_SERIES.to_string(), refused),
                    (PROXY_ERRORS_SERIES.to_string(), errors),
                ]),
                measured: None,
                user_series: BTreeMap::new(),
                notes: vec![],
            },
            &Prices::default(),
        );
        assert_eq!(s.scaling.wakes.holds_refused, 7);
        assert_eq!(s.proxy_errors, 2);
        assert_eq!(s.performance[HOLDS_REFUSED_SERIES].total, Some(7.0));
        let r = report(
            Scope {
                scope: "cluster".into(),
                namespace: None,
                name: None,
            },
            span,
            0,
            Prices::default(),
            vec![s.clone(), s],
            &[],
        );
        assert_eq!(
            (r.totals.wakes.holds_refused, r.totals.proxy_errors),
            (14, 4)
        );
    }

    #[test]
    fn the_saving_is_against_the_service_kept_at_its_maximum_and_priced() {
        let span = Span {
            from_ms: 0,
            to_ms: 10 * 3_600_000,
        };
        let prices = Prices {
            cpu_core_hour: Some(0.04),
            gpu_hour: Some(2.0),
            ..Prices::default()
        };
        let s = service(
            ServiceInput {
                namespace: "ns".into(),
                name: "p".into(),
                deployment: "d".into(),
                state: None,
                span,
                transitions: vec![],
                time_in_states_ms: BTreeMap::new(),
                cold_starts: vec![],
                // 2 replicas for 3 hours.
                replica_seconds: Some(2.0 * 3.0 * 3600.0),
                max_replicas: 4,
                per_replica: PerReplica {
                    cpu_cores: 0.5,
                    memory_gib: 2.0,
                    gpus: 1.0,
                },
                performance: BTreeMap::new(),
                measured: None,
                user_series: BTreeMap::new(),
                notes: vec![],
            },
            &prices,
        );
        let r = &s.resources;
        assert_eq!(r.used.replica_hours, 6.0);
        assert_eq!(r.at_max.replica_hours, 40.0);
        assert_eq!(r.saved.replica_hours, 34.0);
        assert_eq!(r.saved.cpu_core_hours, 17.0);
        assert_eq!(r.saved.memory_gib_hours, 68.0);
        assert_eq!(r.saved.gpu_hours, 34.0);
        let saved_cost = r.saved.cost.unwrap();
        assert!(
            (saved_cost - (17.0 * 0.04 + 34.0 * 2.0)).abs() < 1e-9,
            "{saved_cost}"
        );
    }
}
