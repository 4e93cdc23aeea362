//! Every metric the alert rules, their promtool cases and the Grafana dashboard query
//! exists in what the binaries register, with the labels it is queried by; the rules
//! pass `promtool check rules` and their unit cases (`promtool test rules`). The known
//! series come from the real registries, rendered: the agent's `metrics::Metrics` and
//! the controller's `ControllerMetrics`, with a series of every label set created
//! through their public API. A metric renamed in the code fails here, not on a
//! dashboard that silently shows nothing.

mod manifests_support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use manifests_support::monitoring::{Endpoint, PodMonitor, PrometheusRule, ServiceMonitor};
use manifests_support::{TOOL_TIMEOUT, decode_strict, find, kustomize, manifests, run_ok};
use nemesis_agent::metrics::{
    Metrics, ServiceCounters, ServiceLabels, WakeLabels, WakeResult, encode_text,
};
use nemesis_common::wire::ServiceRef;
use nemesis_controller::metrics::{ControllerMetrics, DecisionOutcome, ErrorKind};
use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr, VectorSelector};
use serde_json::Value;

/// Labels whose values are names from the cluster (free text), not a fixed set.
const FREE_FORM_LABELS: &[&str] = &["namespace", "service"];

/// Labels the Prometheus Operator puts on every target it builds from a monitor.
const OPERATOR_TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "container",
    "endpoint",
    "service",
];

/// Series from outside Nemesis that rules may use.
const EXTERNAL_SERIES: &[&str] = &["up"];

/// One sample name (`x_total`, `x_bucket`, a gauge's name) and the label values seen.
#[derive(Debug, Default)]
struct Series {
    labels: BTreeMap<String, BTreeSet<String>>,
}

/// What a scrape of each job returns, by sample name.
#[derive(Debug, Default)]
struct Known {
    /// job -> sample name -> labels.
    jobs: BTreeMap<String, BTreeMap<String, Series>>,
    /// job -> the labels its targets get (operator defaults and relabelings).
    target_labels: BTreeMap<String, BTreeSet<String>>,
}

/// Sample names and label values of an OpenMetrics text exposition.
fn parse_exposition(text: &str) -> Result<BTreeMap<String, Series>> {
    let mut out: BTreeMap<String, Series> = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, _value) = line.rsplit_once(' ').context("a sample line")?;
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').context("closing brace")?),
            None => (series, ""),
        };
        let entry = out.entry(name.to_string()).or_default();
        // Label values here never contain `,` or `"` (bounded enums, test names).
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').context("label=value")?;
            entry
                .labels
                .entry(k.to_string())
                .or_default()
                .insert(v.trim_matches('"').to_string());
        }
    }
    Ok(out)
}

fn agent_exposition() -> Result<String> {
    let m = Metrics::new();
    let svc = ServiceRef {
        namespace: "shop".into(),
        name: "api".into(),
    };
    m.proxy
        .held
        .get_or_create(&ServiceLabels::from(&svc))
        .set(1);
    for result in [
        WakeResult::Accepted,
        WakeResult::Rejected,
        WakeResult::Failed,
    ] {
        m.proxy
            .wakeups
            .get_or_create(&WakeLabels {
                namespace: svc.namespace.clone(),
                service: svc.name.clone(),
                result,
            })
            .inc();
    }
    m.proxy.open.set(1);
    m.datapath.set(
        &svc,
        ServiceCounters {
            connects_total: 1,
            open_connections: 1,
            closed_total: 1,
            accepted_total: 1,
            accepted_open: 1,
        },
    );
    Ok(encode_text(&m.into_registry())?)
}

fn controller_exposition() -> String {
    let m = ControllerMetrics::new();
    m.reconciled();
    for kind in ErrorKind::ALL {
        m.error(kind);
    }
    for outcome in [
        DecisionOutcome::Unchanged,
        DecisionOutcome::Transition,
        DecisionOutcome::Rescale,
    ] {
        m.decided(outcome);
    }
    for (from, to) in [(0, 1), (1, 2), (2, 1), (1, 0)] {
        m.scaled(from, to);
    }
    m.observe_wake_latency(std::time::Duration::from_millis(3));
    m.set_live_agents(1);
    m.set_leader(true);
    m.render()
}

/// The labels a monitor endpoint's targets carry, and its job name (from the
/// relabeling that sets `job`).
fn endpoint_targets(e: &Endpoint, default_job: &str) -> (String, BTreeSet<String>) {
    let mut labels: BTreeSet<String> = OPERATOR_TARGET_LABELS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut job = default_job.to_string();
    for r in e.relabelings.iter().flatten() {
        if let Some(t) = &r.target_label {
            labels.insert(t.clone());
            if t == "job"
                && let Some(j) = &r.replacement
            {
                job = j.clone();
            }
        }
    }
    (job, labels)
}

fn known() -> Result<Known> {
    let mon = kustomize("monitoring")?;
    let pm: PodMonitor = decode_strict(find(&mon, "PodMonitor", "nemesis-agent")?)?;
    let sm: ServiceMonitor = decode_strict(find(&mon, "ServiceMonitor", "nemesis-controller")?)?;
    let mut k = Known::default();
    for (endpoints, default_job, text) in [
        // The operator's default job names: `<namespace>/<PodMonitor>` for pods, the
        // Service's name for services (both replaced by the monitors' relabelings).
        (
            &pm.spec.pod_metrics_endpoints,
            "nemesis-system/nemesis-agent",
            agent_exposition()?,
        ),
        (
            &sm.spec.endpoints,
            "nemesis-controller-admin",
            controller_exposition(),
        ),
    ] {
        ensure!(endpoints.len() == 1, "one scrape endpoint per monitor");
        let e = &endpoints[0];
        let (job, targets) = endpoint_targets(e, default_job);
        let series = parse_exposition(&text)?;
        // A label the exposition shares with the targets is renamed `exported_<label>`
        // unless the monitor honours the scraped labels.
        let clashing: BTreeSet<&String> = series
            .values()
            .flat_map(|s| s.labels.keys())
            .filter(|l| targets.contains(*l))
            .collect();
        ensure!(
            clashing.is_empty() || e.honor_labels == Some(true),
            "job {job}: the metrics' labels {clashing:?} clash with target labels; set honorLabels: true"
        );
        k.target_labels.insert(job.clone(), targets);
        k.jobs.insert(job, series);
    }
    Ok(k)
}

/// The vector selectors of an expression, depth first.
fn selectors(e: &Expr, out: &mut Vec<VectorSelector>) {
    match e {
        Expr::Aggregate(a) => {
            selectors(&a.expr, out);
            if let Some(p) = &a.param {
                selectors(p, out);
            }
        }
        Expr::Unary(u) => selectors(&u.expr, out),
        Expr::Binary(b) => {
            selectors(&b.lhs, out);
            selectors(&b.rhs, out);
        }
        Expr::Paren(p) => selectors(&p.expr, out),
        Expr::Subquery(s) => selectors(&s.expr, out),
        Expr::VectorSelector(v) => out.push(v.clone()),
        Expr::MatrixSelector(m) => out.push(m.vs.clone()),
        Expr::Call(c) => {
            for a in &c.args.args {
                selectors(a, out);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// Checks one selector against what is known; `origin` names the expression.
fn check_selector(k: &Known, v: &VectorSelector, origin: &str) -> Result<()> {
    let name = v.name.clone().context("every selector names its metric")?;
    let matchers: Vec<_> = v
        .matchers
        .matchers
        .iter()
        .filter(|m| m.name != "__name__")
        .collect();
    let job_matcher = matchers
        .iter()
        .find(|m| m.name == "job" && matches!(m.op, MatchOp::Equal))
        .map(|m| m.value.clone());
    if EXTERNAL_SERIES.contains(&name.as_str()) {
        let job = job_matcher.with_context(|| format!("{origin}: {name} must select a job"))?;
        let targets = k
            .target_labels
            .get(&job)
            .with_context(|| format!("{origin}: no monitor sets job {job:?}"))?;
        for m in &matchers {
            ensure!(
                targets.contains(&m.name),
                "{origin}: {name} has no label {} (targets of {job} carry {targets:?})",
                m.name
            );
        }
        return Ok(());
    }
    // Nemesis' own: the job that exports it, and the job the expression names, if any.
    let exporters: Vec<&String> = k
        .jobs
        .iter()
        .filter(|(_, s)| s.contains_key(&name))
        .map(|(j, _)| j)
        .collect();
    let job = match (exporters.as_slice(), job_matcher) {
        ([], _) => bail!("{origin}: no binary exports {name}"),
        ([j], Some(want)) => {
            ensure!(
                **j == want,
                "{origin}: {name} comes from job {j}, not {want:?}"
            );
            (*j).clone()
        }
        ([j], None) => (*j).clone(),
        _ => bail!("{origin}: {name} is exported by several jobs"),
    };
    let series = &k.jobs[&job][&name];
    let targets = &k.target_labels[&job];
    for m in &matchers {
        let own = series.labels.get(&m.name);
        ensure!(
            own.is_some() || targets.contains(&m.name),
            "{origin}: {name} has no label {:?} (it has {:?}, its targets {targets:?})",
            m.name,
            series.labels.keys().collect::<Vec<_>>()
        );
        if let (Some(values), MatchOp::Equal) = (own, &m.op)
            && !FREE_FORM_LABELS.contains(&m.name.as_str())
        {
            ensure!(
                values.contains(&m.value),
                "{origin}: {name}{{{}={:?}}}: the binary exports only {values:?}",
                m.name,
                m.value
            );
        }
    }
    Ok(())
}

fn check_expr(k: &Known, expr: &str, origin: &str) -> Result<usize> {
    let parsed = parser::parse(expr)
        .map_err(|e| anyhow::anyhow!("{origin}: {expr:?} is not PromQL: {e}"))?;
    let mut found = vec![];
    selectors(&parsed, &mut found);
    ensure!(!found.is_empty(), "{origin}: {expr:?} queries no metric");
    for v in &found {
        check_selector(k, v, origin)?;
    }
    Ok(found.len())
}

fn rule_object() -> Result<Value> {
    Ok(find(&kustomize("monitoring")?, "PrometheusRule", "nemesis")?.clone())
}

#[test]
fn alert_rules_query_only_metrics_the_binaries_export() -> Result<()> {
    let k = known()?;
    let rule: PrometheusRule = decode_strict(&rule_object()?)?;
    let mut checked = 0;
    for g in &rule.spec.groups {
        for r in &g.rules {
            let name = r.alert.as_deref().or(r.record.as_deref()).unwrap_or("?");
            checked += check_expr(&k, &r.expr, &format!("rule {name}"))?;
        }
    }
    ensure!(checked > 0, "the rules query nothing");
    Ok(())
}

/// The dashboard's PromQL with Grafana's variables replaced by what they stand for.
fn substitute_variables(expr: &str, defined: &BTreeSet<String>) -> Result<String> {
    let mut out = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    while let Some(at) = out.find('$') {
        let rest = &out[at + 1..];
        let (var, len) = if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}').context("an unclosed ${")?;
            (r[..end].to_string(), end + 3)
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (rest[..end].to_string(), end + 1)
        };
        ensure!(
            defined.contains(&var),
            "{expr:?} uses ${var}, which the dashboard does not define"
        );
        // Variables stand only for label values, where any regex fits.
        out.replace_range(at..at + len, ".*");
    }
    Ok(out)
}

fn dashboard() -> Result<Value> {
    let mon = kustomize("monitoring")?;
    let cm = find(&mon, "ConfigMap", "nemesis-grafana-dashboard")?;
    let text = cm["data"]["nemesis.json"]
        .as_str()
        .context("the ConfigMap carries nemesis.json")?;
    Ok(serde_json::from_str(text)?)
}

fn panels(v: &Value) -> Vec<&Value> {
    let mut out = vec![];
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(panels(p));
    }
    out
}

#[test]
fn dashboard_queries_only_metrics_the_binaries_export() -> Result<()> {
    let k = known()?;
    let d = dashboard()?;
    let vars: Vec<&Value> = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let defined: BTreeSet<String> = vars
        .iter()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect();
    let mut checked = 0;
    // Template variables: `label_values(<selector>, <label>)`.
    for v in &vars {
        if v["type"] != "query" {
            continue;
        }
        let origin = format!("variable {}", v["name"]);
        let q = v["query"]["query"]
            .as_str()
            .with_context(|| format!("{origin}: a query"))?;
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .with_context(|| format!("{origin}: only label_values(...) is checked"))?;
        let (selector, label) = inner
            .rsplit_once(',')
            .context("label_values(selector, label)")?;
        let selector = substitute_variables(selector.trim(), &defined)?;
        checked += check_expr(&k, &selector, &origin)?;
        // The label exists on that metric.
        let metric = selector.split('{').next().unwrap_or("");
        check_expr(&k, &format!("{metric}{{{}=~\"x\"}}", label.trim()), &origin)?;
    }
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        ensure!(
            ids.insert(p["id"].to_string()),
            "panel id {} twice",
            p["id"]
        );
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().context("a target's expr")?;
            ensure!(
                t["datasource"]["uid"] == "${datasource}",
                "panel {title:?}: targets use the dashboard's data source variable"
            );
            let expr = substitute_variables(expr, &defined)?;
            checked += check_expr(&k, &expr, &format!("panel {title:?}"))?;
        }
    }
    ensure!(
        checked > 10,
        "the dashboard should query the metrics ({checked} selectors)"
    );
    Ok(())
}

#[test]
fn the_checks_refuse_a_metric_label_or_job_the_binaries_do_not_export() -> Result<()> {
    let k = known()?;
    for expr in [
        "rate(nemesis_agent_proxy_outcome_total[5m])",
        "nemesis_controller_errors_total{kind=\"no_such_kind\"}",
        "nemesis_controller_leader{job=\"nemesis-agent\"}",
        "nemesis_agent_proxy_open_connections{flavour=\"x\"}",
        "up{job=\"no-such-job\"}",
    ] {
        ensure!(check_expr(&k, expr, "test").is_err(), "{expr} was accepted");
    }
    check_expr(
        &k,
        "nemesis_agent_proxy_open_connections{job=\"nemesis-agent\",node=\"n1\"}",
        "test",
    )?;
    Ok(())
}

/// The rules as a Prometheus rule file (`groups:`), optionally without annotations.
fn rule_file(rule: &Value, annotations: bool) -> Result<String> {
    let mut spec = rule["spec"].clone();
    if !annotations {
        for g in spec["groups"].as_array_mut().into_iter().flatten() {
            for r in g["rules"].as_array_mut().into_iter().flatten() {
                r.as_object_mut().context("a rule")?.remove("annotations");
            }
        }
    }
    Ok(serde_norway::to_string(&spec)?)
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_cases() -> Result<()> {
    let object = rule_object()?;
    let rule: PrometheusRule = decode_strict(&object)?;
    let dir = tempfile::tempdir()?;
    let full = dir.path().join("full.yaml");
    std::fs::write(&full, rule_file(&object, true)?)?;
    let mut cmd = Command::new("promtool");
    cmd.args(["check", "rules"]).arg(&full);
    run_ok(cmd, TOOL_TIMEOUT)
        .context("promtool check rules (promtool comes with Debian's prometheus package)")?;

    // The unit cases would compare annotations too; they are left out (see the file).
    std::fs::write(dir.path().join("rules.yaml"), rule_file(&object, false)?)?;
    let cases = std::fs::read_to_string(manifests().join("monitoring/tests/alerts.test.yaml"))?;
    let test_file = dir.path().join("alerts.test.yaml");
    std::fs::write(&test_file, &cases)?;
    let mut cmd = Command::new("promtool");
    cmd.args(["test", "rules"]).arg(&test_file);
    run_ok(cmd, TOOL_TIMEOUT)?;

    // Every alert has a case, and the cases feed series the binaries export.
    let doc: Value = serde_norway::from_str(&cases)?;
    let tested: BTreeSet<&str> = doc["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter_map(|a| a["alertname"].as_str())
        .collect();
    for g in &rule.spec.groups {
        for r in &g.rules {
            if let Some(a) = &r.alert {
                ensure!(
                    tested.contains(a.as_str()),
                    "alert {a} has no promtool case"
                );
            }
        }
    }
    let k = known()?;
    for t in doc["tests"].as_array().into_iter().flatten() {
        for s in t["input_series"].as_array().into_iter().flatten() {
            let series = s["series"].as_str().context("a series")?;
            check_expr(&k, series, &format!("promtool case series {series}"))?;
        }
    }
    Ok(())
}
