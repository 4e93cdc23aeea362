//! A report as CSV (one row per Service, then a totals row) and as a printable HTML page
//! with its charts drawn as inline SVG (no script: it prints the same in any browser
//! and through Chromium's print to PDF). Escapes everything that came from users.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};

use super::{Report, Series, ServiceReport, Usage};
use crate::store::from_unix_ms;

pub const CSV_HEADER: &str = "scope,namespace,name,deployment,state,from,to,transitions,\
wakes,wakes_ready,holds_timed_out,wakes_failed,held_connections,cold_start_p50_ms,\
cold_start_p95_ms,cold_start_p99_ms,cold_start_max_ms,max_replicas,replica_hours,\
replica_hours_at_max,replica_hours_saved,cpu_core_hours,cpu_core_hours_saved,\
memory_gib_hours,memory_gib_hours_saved,gpu_hours,gpu_hours_saved,cost,cost_at_max,\
cost_saved,conns_rate_avg,conns_active_max,time_in_states_seconds,holds_refused,proxy_errors,\
measured_cpu_core_hours,measured_memory_gib_hours,latency_avg,latency_max,error_rate_avg,\
error_rate_max";

/// The policy's `spec.reports` series, as named in a report's `performance`.
pub const LATENCY_SERIES: &str = "latency";
pub const ERROR_RATE_SERIES: &str = "errorRate";

/// RFC 4180 quoting (a field with a comma, quote or line break is quoted, quotes
/// doubled); a leading `=`, `+`, `-`, `@` gets a `'` so a spreadsheet does not run it as
/// a formula (names are Kubernetes names, but states are user-written). The UI's CSV
/// summary uses it too.
pub fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// An optional value as a CSV field: empty when absent.
pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn f3(v: f64) -> String {
    format!("{v:.3}")
}

fn time(ms: u64) -> String {
    DateTime::<Utc>::from(from_unix_ms(ms)).to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn usage_cols(used: &Usage, at_max: &Usage, saved: &Usage) -> Vec<String> {
    vec![
        f3(used.replica_hours),
        f3(at_max.replica_hours),
        f3(saved.replica_hours),
        f3(used.cpu_core_hours),
        f3(saved.cpu_core_hours),
        f3(used.memory_gib_hours),
        f3(saved.memory_gib_hours),
        f3(used.gpu_hours),
        f3(saved.gpu_hours),
        opt(used.cost.map(f3)),
        opt(at_max.cost.map(f3)),
        opt(saved.cost.map(f3)),
    ]
}

pub fn csv(r: &Report) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push_str("\r\n");
    for s in &r.services {
        let w = &s.scaling.wakes;
        let states: Vec<String> = s
            .scaling
            .time_in_states_seconds
            .iter()
            .map(|(k, v)| format!("{k}={v:.3}"))
            .collect();
        let mut f = vec![
            "service".to_string(),
            csv_field(&s.namespace),
            csv_field(&s.name),
            csv_field(&s.deployment),
            csv_field(s.state.as_deref().unwrap_or("")),
            time(s.span.from_ms),
            time(s.span.to_ms),
            s.scaling.transitions.to_string(),
            w.count.to_string(),
            w.ready.to_string(),
            w.holds_timed_out.to_string(),
            w.failed.to_string(),
            w.held_connections.to_string(),
            opt(w.p50_ms),
            opt(w.p95_ms),
            opt(w.p99_ms),
            opt(w.max_ms),
            s.resources.max_replicas.to_string(),
        ];
        f.extend(usage_cols(
            &s.resources.used,
            &s.resources.at_max,
            &s.resources.saved,
        ));
        f.push(opt(s
            .performance
            .get("conns.rate")
            .and_then(|x| x.avg)
            .map(f3)));
        f.push(opt(s
            .performance
            .get("conns.active")
            .and_then(|x| x.max)
            .map(f3)));
        f.push(csv_field(&states.join(";")));
        f.extend(tail_cols(
            w.holds_refused,
            s.proxy_errors,
            s.resources.measured.as_ref(),
        ));
        for name in [LATENCY_SERIES, ERROR_RATE_SERIES] {
            let series = s.performance.get(name);
            f.push(opt(series.and_then(|x| x.avg).map(f3)));
            f.push(opt(series.and_then(|x| x.max).map(f3)));
        }
        let _ = write!(out, "{}\r\n", f.join(","));
    }
    let t = &r.totals;
    let w = &t.wakes;
    let mut f = vec![
        "total".to_string(),
        csv_field(r.namespace.as_deref().unwrap_or("")),
        csv_field(r.name.as_deref().unwrap_or("")),
        String::new(),
        String::new(),
        time(r.span.from_ms),
        time(r.span.to_ms),
        t.transitions.to_string(),
        w.count.to_string(),
        w.ready.to_string(),
        w.holds_timed_out.to_string(),
        w.failed.to_string(),
        w.held_connections.to_string(),
        opt(w.p50_ms),
        opt(w.p95_ms),
        opt(w.p99_ms),
        opt(w.max_ms),
        String::new(),
    ];
    f.extend(usage_cols(&t.used, &t.at_max, &t.saved));
    f.extend([String::new(), String::new(), String::new()]);
    f.extend(tail_cols(
        w.holds_refused,
        t.proxy_errors,
        t.measured.as_ref(),
    ));
    f.extend([String::new(), String::new(), String::new(), String::new()]);
    let _ = write!(out, "{}\r\n", f.join(","));
    out
}

/// The columns added after `time_in_states_seconds` (new columns go at the end, so a
/// reader of the older columns by position keeps working).
fn tail_cols(holds_refused: u64, proxy_errors: u64, m: Option<&super::Measured>) -> Vec<String> {
    vec![
        holds_refused.to_string(),
        proxy_errors.to_string(),
        opt(m.and_then(|m| m.cpu_core_hours).map(f3)),
        opt(m.and_then(|m| m.memory_gib_hours).map(f3)),
    ]
}

/// A plain-text summary (chat and mail): one paragraph per Service, then the totals.
pub fn text(r: &Report) -> String {
    let ms = |v: Option<u64>| v.map_or("-".into(), |v| format!("{:.1} s", v as f64 / 1000.0));
    let mut o = format!(
        "Nemesis report ({}{}), {} to {}\n",
        r.scope,
        r.namespace
            .as_deref()
            .map(|n| format!(
                " {n}{}",
                r.name
                    .as_deref()
                    .map(|x| format!("/{x}"))
                    .unwrap_or_default()
            ))
            .unwrap_or_default(),
        time(r.span.from_ms),
        time(r.span.to_ms)
    );
    for s in &r.services {
        let w = &s.scaling.wakes;
        let _ = write!(
            o,
            "\n{}/{}: {} transitions; {} wakes (p50 {}, p95 {}, p99 {}, max {}), {} holds timed out, {} refused, {} failed; \
             {} proxy errors; {:.1} replica-hours used of {:.1} at max, {:.1} saved{}\n",
            s.namespace,
            s.name,
            s.scaling.transitions,
            w.count,
            ms(w.p50_ms),
            ms(w.p95_ms),
            ms(w.p99_ms),
            ms(w.max_ms),
            w.holds_timed_out,
            w.holds_refused,
            w.failed,
            s.proxy_errors,
            s.resources.used.replica_hours,
            s.resources.at_max.replica_hours,
            s.resources.saved.replica_hours,
            s.resources
                .saved
                .cost
                .map(|c| format!(" (cost saved {c:.2})"))
                .unwrap_or_default()
        );
    }
    let t = &r.totals;
    let _ = write!(
        o,
        "\nTotal: {} Service(s), {} transitions, {} wakes, {:.1} replica-hours saved.\n",
        t.services, t.transitions, t.wakes.count, t.saved.replica_hours
    );
    o
}

pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// The page's own style: the UI's CSP allows it on this page only (no script anywhere).
const STYLE: &str = "body{font:13px/1.4 sans-serif;margin:24px;color:#111}\
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #999}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}\
th{background:#eee}td.l,th.l{text-align:left}.chart{margin:6px 0}\
section{page-break-inside:avoid}@media print{body{margin:0}}";

fn chart(title: &str, s: &Series, span: (u64, u64)) -> String {
    const W: f64 = 640.0;
    const H: f64 = 120.0;
    let max = s
        .points
        .iter()
        .map(|p| p[1])
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let (from, to) = (span.0 as f64, span.1.max(span.0 + 1) as f64);
    let pts: Vec<String> = s
        .points
        .iter()
        .map(|p| {
            let x = (p[0] - from) / (to - from) * W;
            let y = H - p[1] / max * (H - 10.0);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let title = match s.total {
        Some(t) => format!("{title}: {t} in total"),
        None => title.to_string(),
    };
    let title = title.as_str();
    format!(
        "<figure class=\"chart\"><figcaption>{} (max {:.2}, avg {})</figcaption>\
<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{}\">\
<rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" fill=\"#fafafa\" stroke=\"#ccc\"/>\
<polyline fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"1.5\" points=\"{}\"/></svg></figure>",
        escape(title),
        s.max.unwrap_or(0.0),
        s.avg.map_or("-".into(), |a| format!("{a:.2}")),
        escape(title),
        pts.join(" ")
    )
}

fn usage_table(rows: &[(&str, &Usage)]) -> String {
    let mut o = String::from(
        "<table><tr><th class=\"l\"></th><th>replica-h</th><th>CPU core-h</th><th>memory GiB-h</th><th>GPU-h</th><th>cost</th></tr>",
    );
    for (label, u) in rows {
        let _ = write!(
            o,
            "<tr><th class=\"l\">{label}</th><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td></tr>",
            u.replica_hours,
            u.cpu_core_hours,
            u.memory_gib_hours,
            u.gpu_hours,
            u.cost.map_or("-".into(), |c| format!("{c:.2}"))
        );
    }
    o.push_str("</table>");
    o
}

fn service_section(s: &ServiceReport) -> String {
    let w = &s.scaling.wakes;
    let ms = |v: Option<u64>| v.map_or("-".into(), |v| format!("{:.2} s", v as f64 / 1000.0));
    let mut o = format!(
        "<section><h2>{}/{} <small>(Deployment {}, now {})</small></h2>",
        escape(&s.namespace),
        escape(&s.name),
        escape(&s.deployment),
        escape(s.state.as_deref().unwrap_or("unknown"))
    );
    let _ = write!(
        o,
        "<p>From {} to {}.</p><h3>Scaling</h3><table><tr><th>transitions</th><th>wakes</th><th>ready</th>\
<th>holds timed out</th><th>holds refused</th><th>failed</th><th>held conns</th><th>p50</th><th>p95</th><th>p99</th><th>max</th></tr>\
<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        time(s.span.from_ms),
        time(s.span.to_ms),
        s.scaling.transitions,
        w.count,
        w.ready,
        w.holds_timed_out,
        w.holds_refused,
        w.failed,
        w.held_connections,
        ms(w.p50_ms),
        ms(w.p95_ms),
        ms(w.p99_ms),
        ms(w.max_ms)
    );
    o.push_str("<table><tr><th class=\"l\">state</th><th>time</th></tr>");
    for (st, secs) in &s.scaling.time_in_states_seconds {
        let _ = write!(
            o,
            "<tr><td class=\"l\">{}</td><td>{:.1} h</td></tr>",
            escape(st),
            secs / 3600.0
        );
    }
    o.push_str("</table>");
    if !s.scaling.transitions_listed.is_empty() {
        o.push_str("<table><tr><th class=\"l\">at</th><th class=\"l\">from</th><th class=\"l\">to</th><th class=\"l\">reason</th></tr>");
        for t in s.scaling.transitions_listed.iter().rev().take(20) {
            let _ = write!(
                o,
                "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
                time(t.at_ms),
                escape(&t.from),
                escape(&t.to),
                escape(&t.reason)
            );
        }
        o.push_str("</table>");
    }
    let r = &s.resources;
    let _ = write!(
        o,
        "<h3>Resources</h3><p>Per replica: {:.3} CPU cores, {:.3} GiB memory, {} GPUs; at most {} replicas.{}</p>",
        r.per_replica.cpu_cores,
        r.per_replica.memory_gib,
        r.per_replica.gpus,
        r.max_replicas,
        if r.known {
            ""
        } else {
            " No scale event in the history yet: usage unknown, counted as zero."
        }
    );
    o.push_str(&usage_table(&[
        ("used", &r.used),
        ("kept at max", &r.at_max),
        ("saved", &r.saved),
    ]));
    if let Some(m) = &r.measured {
        let h = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
        let _ = write!(
            o,
            "<p>Measured by Prometheus: {} CPU core-hours, {} memory GiB-hours.</p>",
            h(m.cpu_core_hours),
            h(m.memory_gib_hours)
        );
        for n in &m.notes {
            let _ = write!(o, "<p class=\"note\">{}</p>", escape(n));
        }
    }
    let _ = write!(
        o,
        "<h3>Application performance</h3><p>{} errors seen by the proxy.</p>",
        s.proxy_errors
    );
    for n in &s.notes {
        let _ = write!(o, "<p class=\"note\">{}</p>", escape(n));
    }
    for (name, series) in &s.performance {
        o.push_str(&chart(name, series, (s.span.from_ms, s.span.to_ms)));
    }
    o.push_str("</section>");
    o
}

pub fn html(r: &Report) -> String {
    let title = match (&r.namespace, &r.name) {
        (Some(ns), Some(n)) => format!("Nemesis report: {ns}/{n}"),
        (Some(ns), None) => format!("Nemesis report: namespace {ns}"),
        _ => "Nemesis report: cluster".to_string(),
    };
    let mut o = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body><h1>{}</h1>\
<p>{} Service(s), from {} to {}; generated {}.</p><h2>Totals</h2>",
        escape(&title),
        escape(&title),
        r.totals.services,
        time(r.span.from_ms),
        time(r.span.to_ms),
        time(r.generated_at_ms)
    );
    o.push_str(&usage_table(&[
        ("used", &r.totals.used),
        ("kept at max", &r.totals.at_max),
        ("saved", &r.totals.saved),
    ]));
    if r.services.is_empty() {
        o.push_str("<p>No ScalingPolicy in this scope: create one to see it here.</p>");
    }
    for s in &r.services {
        o.push_str(&service_section(s));
    }
    o.push_str("</body></html>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_text_is_escaped_and_csv_fields_defused() {
        assert_eq!(
            escape("<b a=\"x\">&'"),
            "&lt;b a=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=1+1"), "'=1+1");
    }
}
