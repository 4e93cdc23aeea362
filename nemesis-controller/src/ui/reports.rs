//! `GET /api/reports?scope=service|namespace|cluster&namespace=&name=&from=&to=&window=
//! &format=json|csv|html&priceReplicaHour=&priceCpuCoreHour=&priceMemoryGibHour=&priceGpuHour=`:
//! the report of one Service's policy, a namespace or the cluster over a window (`from`
//! and `to` in RFC 3339, or `window=30d` ending now; 24 h by default), as JSON, CSV or a
//! printable HTML page. Reads the policy cache, the Deployments' pod requests (when the
//! UI has a client) and the store; the figures are `reports`' plain functions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::DateTime;
use http::StatusCode;
use http::header::{CONTENT_DISPOSITION, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{Api, ResourceExt};
use serde::Deserialize;

use super::api::{MAX_WINDOW, MIN_WINDOW, Window, blocking, now_ms, query_error};
use super::error::HttpError;
use super::policies::id_of;
use super::{UiSources, UiState};
use crate::policy::compile::Replicas;
use crate::policy::{ScalingPolicy, compile};
use crate::prometheus::{PromClient, PromError};
use crate::reports::render::{ERROR_RATE_SERIES, LATENCY_SERIES};
use crate::reports::usage::{self, UsageQueries};
use crate::reports::{
    self, Measured, PERFORMANCE_SERIES, PerReplica, Prices, ServiceInput, Span, per_replica, render,
};
use crate::store::{ColdStartRecord, MetricPoint, PolicyId, SampleValue, Store, StoreError};

/// One Deployment read for its pod requests.
const DEPLOYMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The printable page styles itself and runs nothing.
const REPORT_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportQuery {
    pub scope: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub window: Option<String>,
    pub format: Option<String>,
    pub price_replica_hour: Option<f64>,
    pub price_cpu_core_hour: Option<f64>,
    pub price_memory_gib_hour: Option<f64>,
    pub price_gpu_hour: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
    Html,
}

fn rfc3339(field: &str, v: &str) -> Result<u64, HttpError> {
    DateTime::parse_from_rfc3339(v)
        .ok()
        .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
        .ok_or_else(|| {
            HttpError::bad_request(format!(
                "{field}: {v:?} is not an RFC 3339 time (e.g. 2026-01-31T00:00:00Z)"
            ))
        })
}

/// The window: `from`/`to` when given (`to` defaults to now), else `window` ending now.
fn span(q: &ReportQuery, now: u64) -> Result<Span, HttpError> {
    if q.from.is_none() && q.to.is_none() {
        let w = Window::parse(q.window.as_deref(), now)?;
        return Ok(Span {
            from_ms: w.from_ms,
            to_ms: w.to_ms,
        });
    }
    if q.window.is_some() {
        return Err(HttpError::bad_request(
            "give either window or from/to, not both",
        ));
    }
    let from = q
        .from
        .as_deref()
        .ok_or_else(|| HttpError::bad_request("from: required with to"))
        .and_then(|v| rfc3339("from", v))?;
    let to = match q.to.as_deref() {
        Some(v) => rfc3339("to", v)?.min(now),
        None => now,
    };
    let len = to.saturating_sub(from);
    if from >= to || len < MIN_WINDOW.as_millis() as u64 || len > MAX_WINDOW.as_millis() as u64 {
        return Err(HttpError::bad_request(
            "from/to: from must be before to (and not in the future), 1m to 400d apart",
        ));
    }
    Ok(Span {
        from_ms: from,
        to_ms: to,
    })
}

fn format(q: &ReportQuery) -> Result<Format, HttpError> {
    match q.format.as_deref() {
        None | Some("json") => Ok(Format::Json),
        Some("csv") => Ok(Format::Csv),
        Some("html") => Ok(Format::Html),
        Some(other) => Err(HttpError::bad_request(format!(
            "format: {other:?} is not one of json, csv, html"
        ))),
    }
}

fn prices(q: &ReportQuery) -> Result<Prices, HttpError> {
    for (field, v) in [
        ("priceReplicaHour", q.price_replica_hour),
        ("priceCpuCoreHour", q.price_cpu_core_hour),
        ("priceMemoryGibHour", q.price_memory_gib_hour),
        ("priceGpuHour", q.price_gpu_hour),
    ] {
        if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
            return Err(HttpError::bad_request(format!(
                "{field}: must be a number >= 0"
            )));
        }
    }
    Ok(Prices {
        replica_hour: q.price_replica_hour,
        cpu_core_hour: q.price_cpu_core_hour,
        memory_gib_hour: q.price_memory_gib_hour,
        gpu_hour: q.price_gpu_hour,
    })
}

/// The policies in scope: (scope name, namespace, name, policies).
fn select(
    q: &ReportQuery,
    all: Vec<Arc<ScalingPolicy>>,
) -> Result<(&'static str, Vec<Arc<ScalingPolicy>>), HttpError> {
    let scope = match q.scope.as_deref() {
        Some("service") => "service",
        Some("namespace") => "namespace",
        Some("cluster") => "cluster",
        None if q.name.is_some() => "service",
        None if q.namespace.is_some() => "namespace",
        None => "cluster",
        Some(other) => {
            return Err(HttpError::bad_request(format!(
                "scope: {other:?} is not one of service, namespace, cluster"
            )));
        }
    };
    let ns = q.namespace.as_deref();
    let picked: Vec<Arc<ScalingPolicy>> = match scope {
        "service" => {
            let (Some(ns), Some(name)) = (ns, q.name.as_deref()) else {
                return Err(HttpError::bad_request(
                    "scope=service needs namespace and name (the ScalingPolicy's)",
                ));
            };
            let p: Vec<_> = all
                .into_iter()
                .filter(|p| p.namespace().as_deref() == Some(ns) && p.name_any() == name)
                .collect();
            if p.is_empty() {
                return Err(HttpError::not_found(format!(
                    "no ScalingPolicy {ns}/{name}"
                )));
            }
            p
        }
        "namespace" => {
            let Some(ns) = ns else {
                return Err(HttpError::bad_request("scope=namespace needs namespace"));
            };
            all.into_iter()
                .filter(|p| p.namespace().as_deref() == Some(ns))
                .collect()
        }
        _ => all,
    };
    Ok((scope, picked))
}

fn max_replicas(p: &ScalingPolicy) -> u32 {
    match compile(&p.spec) {
        Ok(c) => c
            .states()
            .iter()
            .map(|s| match &s.replicas {
                Replicas::Fixed(n) => *n,
                Replicas::Range(r) => r.max,
            })
            .max()
            .unwrap_or(1),
        Err(_) => p.spec.max_replicas.map_or(1, |m| m.max(0) as u32),
    }
}

async fn requests(sources: &UiSources, namespace: &str, deployment: &str) -> PerReplica {
    let Some(client) = sources.kube.clone() else {
        return PerReplica::default();
    };
    let api: Api<Deployment> = Api::namespaced(client, namespace);
    match tokio::time::timeout(DEPLOYMENT_TIMEOUT, api.get_opt(deployment)).await {
        Ok(Ok(Some(d))) => d
            .spec
            .template
            .spec
            .map(|s| per_replica(&s))
            .unwrap_or_default(),
        Ok(Ok(None)) => PerReplica::default(),
        Ok(Err(e)) => {
            tracing::warn!(%namespace, %deployment, err = %e, "report: reading the Deployment's requests failed");
            PerReplica::default()
        }
        Err(_) => {
            tracing::warn!(%namespace, %deployment, "report: reading the Deployment's requests timed out");
            PerReplica::default()
        }
    }
}

/// The Prometheus reports read measured usage and the policies' `spec.reports` series
/// from (the controller's `--prometheus-url`).
#[derive(Debug, Clone)]
pub struct ReportPrometheus {
    pub client: PromClient,
    pub usage: UsageQueries,
}

/// What one Service's report asks Prometheus.
struct PromAsk {
    namespace: String,
    pod: String,
    span: Span,
    /// `(series name, query)` from the policy's `spec.reports`.
    user: Vec<(&'static str, String)>,
}

/// What Prometheus answered for one Service.
#[derive(Default)]
struct PromAnswers {
    measured: Option<Measured>,
    series: BTreeMap<String, Vec<MetricPoint>>,
    notes: Vec<String>,
}

/// A dead Prometheus is asked once per report, not once per query: after a transport
/// failure the rest of the report's queries are skipped with the same reason.
struct PromRun<'a> {
    prom: &'a ReportPrometheus,
    dead: Option<String>,
}

impl PromRun<'_> {
    async fn range(&mut self, query: &str, steps: usage::Steps) -> Result<Vec<(f64, f64)>, String> {
        if let Some(why) = &self.dead {
            return Err(format!("skipped: {why}"));
        }
        match self
            .prom
            .client
            .query_range(query, steps.start, steps.end, steps.step)
            .await
        {
            Ok(points) => Ok(points),
            Err(e @ (PromError::Unreachable { .. } | PromError::Timeout { .. })) => {
                let why = e.to_string();
                self.dead = Some(why.clone());
                Err(why)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    async fn ask(&mut self, a: &PromAsk) -> PromAnswers {
        let steps = usage::usage_steps(a.span);
        let fill = |t: &str, s: usage::Steps| usage::fill(t, &a.namespace, &a.pod, s.range_ms);
        let mut out = PromAnswers::default();
        let mut measured = Measured::default();
        let usage = self.prom.usage.clone();
        for (what, template) in [("CPU", &usage.cpu), ("memory", &usage.memory)] {
            let figure = match self.range(&fill(template, steps), steps).await {
                Ok(points) => {
                    if points.is_empty() {
                        measured.notes.push(format!(
                            "Prometheus has no {what} usage samples for pods matching `{}` in this window (counted as 0; is cAdvisor scraped?)",
                            a.pod
                        ));
                    }
                    Some(if what == "CPU" {
                        usage::cpu_core_hours(&points, steps.step)
                    } else {
                        usage::memory_gib_hours(&points, steps.step)
                    })
                }
                Err(e) => {
                    measured
                        .notes
                        .push(format!("{what} usage from Prometheus unavailable: {e}"));
                    None
                }
            };
            if what == "CPU" {
                measured.cpu_core_hours = figure;
            } else {
                measured.memory_gib_hours = figure;
            }
        }
        out.measured = Some(measured);
        let chart = usage::series_steps(a.span);
        for (name, template) in &a.user {
            match self.range(&fill(template, chart), chart).await {
                Ok(points) => {
                    out.series.insert(
                        name.to_string(),
                        points
                            .into_iter()
                            .map(|(t, value)| MetricPoint {
                                at_ms: (t * 1000.0).round() as u64,
                                value: SampleValue::Raw { value },
                            })
                            .collect(),
                    );
                }
                Err(e) => out.notes.push(format!(
                    "the {name} series (spec.reports) from Prometheus is unavailable: {e}"
                )),
            }
        }
        out
    }
}

fn user_queries(p: &ScalingPolicy) -> Vec<(&'static str, String)> {
    let Some(r) = &p.spec.reports else {
        return Vec::new();
    };
    [
        (LATENCY_SERIES, r.latency.clone()),
        (ERROR_RATE_SERIES, r.error_rate.clone()),
    ]
    .into_iter()
    .filter_map(|(n, q)| q.filter(|q| !q.trim().is_empty()).map(|q| (n, q)))
    .collect()
}

struct Meta {
    id: PolicyId,
    deployment: String,
    state: Option<String>,
    span: Span,
    max_replicas: u32,
    per_replica: PerReplica,
}

fn read(store: &Store, m: Meta) -> Result<(ServiceInput, Vec<ColdStartRecord>), StoreError> {
    let range = m.span.from_ms..m.span.to_ms;
    let cold_starts = store.cold_starts(&m.id, range.clone())?;
    let mut performance = BTreeMap::new();
    for s in PERFORMANCE_SERIES {
        let pts = store.samples(&m.id, s, range.clone())?;
        if !pts.is_empty() {
            performance.insert(s.to_string(), pts);
        }
    }
    Ok((
        ServiceInput {
            namespace: m.id.namespace.clone(),
            name: m.id.name.clone(),
            deployment: m.deployment,
            state: m.state,
            span: m.span,
            transitions: store.transitions(&m.id, range.clone())?,
            time_in_states_ms: store.time_in_states(&m.id, range.clone())?,
            cold_starts: cold_starts.clone(),
            replica_seconds: store.replica_seconds(&m.id, range)?,
            max_replicas: m.max_replicas,
            per_replica: m.per_replica,
            performance,
            measured: None,
            user_series: BTreeMap::new(),
            notes: Vec::new(),
        },
        cold_starts,
    ))
}

/// The report of `q`'s scope over `span`, from `sources`.
pub async fn build(
    sources: &UiSources,
    q: &ReportQuery,
    span: Span,
    prices: Prices,
    now: u64,
) -> Result<reports::Report, HttpError> {
    let (scope, policies) = select(q, sources.policies.list())?;
    let mut metas = Vec::with_capacity(policies.len());
    let mut asks = Vec::with_capacity(policies.len());
    for p in &policies {
        let created = p
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| u64::try_from(t.0.as_millisecond()).ok());
        // A young policy is counted from its creation, not credited before it.
        let from = created.filter(|c| *c > span.from_ms && *c < span.to_ms);
        let t = &p.spec.target;
        let deployment = t.deployment.clone().or(t.name.clone()).unwrap_or_default();
        let ns = p.namespace().unwrap_or_default();
        // Requests are read from Deployments; other kinds count replicas only (for now).
        let is_deployment = t.kind.as_deref().is_none_or(|k| k == "Deployment");
        let per_replica = if is_deployment {
            requests(sources, &ns, &deployment).await
        } else {
            PerReplica::default()
        };
        let service_span = Span {
            from_ms: from.unwrap_or(span.from_ms),
            to_ms: span.to_ms,
        };
        asks.push(PromAsk {
            pod: usage::pod_regex(t.kind.as_deref(), &deployment),
            namespace: ns.clone(),
            span: service_span,
            user: user_queries(p),
        });
        metas.push(Meta {
            id: id_of(p),
            per_replica,
            deployment,
            state: p.status.as_ref().and_then(|s| s.state.clone()),
            span: service_span,
            max_replicas: max_replicas(p),
        });
    }
    let store = sources.store.clone();
    let inputs = blocking("reading the report's history", move || {
        metas
            .into_iter()
            .map(|m| read(&store, m))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let mut all_colds = Vec::new();
    let mut services = Vec::with_capacity(inputs.len());
    let mut prom = sources
        .prometheus
        .as_ref()
        .map(|prom| PromRun { prom, dead: None });
    for ((mut input, colds), ask) in inputs.into_iter().zip(asks) {
        all_colds.extend(colds);
        match &mut prom {
            Some(run) => {
                let a = run.ask(&ask).await;
                input.measured = a.measured;
                input.user_series = a.series;
                input.notes.extend(a.notes);
            }
            None if !ask.user.is_empty() => input.notes.push(
                "spec.reports names Prometheus queries, but the controller has no --prometheus-url"
                    .to_string(),
            ),
            None => {}
        }
        services.push(reports::service(input, &prices));
    }
    Ok(reports::report(
        reports::Scope {
            scope: scope.to_string(),
            namespace: q.namespace.clone(),
            name: q.name.clone().filter(|_| scope == "service"),
        },
        span,
        now,
        prices,
        services,
        &all_colds,
    ))
}

/// Scheduled reports (sent through the alert sinks) are built like the UI's.
pub struct ScheduledReports(pub UiSources);

impl crate::notify::ReportSource for ScheduledReports {
    fn build<'a>(
        &'a self,
        namespace: Option<&'a str>,
        policy: Option<&'a str>,
        from_ms: u64,
        to_ms: u64,
    ) -> futures::future::BoxFuture<'a, Result<reports::Report, String>> {
        Box::pin(async move {
            let q = ReportQuery {
                scope: None,
                namespace: namespace.map(str::to_string),
                name: policy.map(str::to_string),
                from: None,
                to: None,
                window: None,
                format: None,
                price_replica_hour: None,
                price_cpu_core_hour: None,
                price_memory_gib_hour: None,
                price_gpu_hour: None,
            };
            build(
                &self.0,
                &q,
                Span { from_ms, to_ms },
                Prices::default(),
                now_ms(),
            )
            .await
            .map_err(|e| e.message.to_string())
        })
    }
}

pub async fn report(
    State(ui): State<UiState>,
    query: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(q) = query.map_err(query_error)?;
    let now = now_ms();
    let fmt = format(&q)?;
    let span = span(&q, now)?;
    let prices = prices(&q)?;
    let r = build(&ui.sources, &q, span, prices, now).await?;
    let file = match (&r.namespace, &r.name) {
        (Some(ns), Some(n)) => format!("nemesis-report-{ns}-{n}"),
        (Some(ns), None) => format!("nemesis-report-{ns}"),
        _ => "nemesis-report-cluster".to_string(),
    };
    Ok(match fmt {
        Format::Json => axum::Json(r).into_response(),
        Format::Csv => (
            [
                (CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (
                    CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{file}.csv\""),
                ),
            ],
            render::csv(&r),
        )
            .into_response(),
        Format::Html => (
            StatusCode::OK,
            [
                (CONTENT_TYPE, "text/html; charset=utf-8".to_string()),
                (CONTENT_SECURITY_POLICY, REPORT_CSP.to_string()),
            ],
            render::html(&r),
        )
            .into_response(),
    })
}
