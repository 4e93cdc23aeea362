//! Prometheus down, slow, or answering garbage, with the real controller and a real
//! Prometheus (Debian's `/usr/bin/prometheus`) scraping a gauge this test serves. A
//! seeded fault-injecting proxy stands between the controller and Prometheus: in an
//! order drawn from the seed, Prometheus is killed (the proxy stops listening: connection
//! refused) and restarted, and the proxy answers slower than the source's timeout,
//! answers with something that is not JSON, JSON of the wrong shape, or an HTTP 5xx.
//! For each fault: the policy runs on the source's declared fallback (the Deployment
//! goes to the fallback's replicas), its `PrometheusQueries` condition names the kind
//! of failure, `nemesis_controller_prometheus_errors_total{reason}` counts it, and an
//! AlertRule's `PrometheusFailing` alert reaches a webhook; once Prometheus answers
//! again the policy follows the real value, the condition is `True` again and the alert
//! is resolved. Nothing is timed: every step waits for what it checks.

mod controller_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use controller_support::*;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::PostParams;
use nemesis_controller::notify::rule::AlertRule;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_controller::store::PolicyId;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::faultproxy::{Answer, Fault, FaultProxy};
use nemesis_tests::webhook::{self, Received};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GAUGE: &str = "nemesis_test_jobs_queued";
/// The queue the exporter reports: 4 replicas at 10 per replica.
const QUEUE: f64 = 35.0;
/// The source's declared fallback: 2 replicas.
const FALLBACK: f64 = 20.0;
/// The source's timeout: generous, so a healthy query on a loaded machine answers
/// within it; the slow fault answers later than this.
const SOURCE_TIMEOUT_S: u64 = 5;
/// Every wait: start-ups, scrapes and ticks on a loaded machine.
const WAIT: Duration = Duration::from_secs(120);
const HMAC_KEY: &str = "prometheus-chaos-hmac-key-0123456789";

/// Serves the gauge at any path, one answer per connection.
async fn serve_exporter() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = 0;
                while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                    if got == buf.len() {
                        return;
                    }
                }
                let body = format!("# TYPE {GAUGE} gauge\n{GAUGE}{{queue=\"jobs\"}} {QUEUE}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// One fault and what the controller must say about it.
#[derive(Debug, Clone)]
struct Phase {
    what: String,
    fault: Fault,
    /// The `PrometheusQueries` condition's reason.
    reason: &'static str,
    /// The `reason` label of `nemesis_controller_prometheus_errors_total`.
    label: &'static str,
    /// Words the condition's message contains.
    says: String,
    /// Words the alert's summary contains (raised at the first failed query: a pooled
    /// connection the proxy closed may fail as "unreachable" before connects are refused).
    alert_says: String,
}

fn answer(status: u16, content_type: &'static str, body: &str) -> Fault {
    Fault::Answer(Answer {
        status,
        content_type,
        body: body.to_string(),
    })
}

/// The faults in an order drawn from `rng`, each a variant drawn from it too. `None`
/// fault: Prometheus is killed.
fn phases(rng: &mut StdRng) -> Vec<Phase> {
    let not_json = [
        (
            "text/html",
            "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
        ),
        ("text/plain", "prometheus is warming up, try later"),
        // Cut short: it claims JSON and is not.
        (
            "application/json",
            r#"{"status":"success","data":{"resultType":"vec"#,
        ),
    ];
    let wrong_shape = [
        r#"{"hello":"world"}"#,
        r#"[1,2,3]"#,
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":"35"}]}}"#,
    ];
    let statuses = [500, 502, 503, 504];
    let (ct, body) = not_json[rng.random_range(0..not_json.len())];
    let shape = wrong_shape[rng.random_range(0..wrong_shape.len())];
    let status = statuses[rng.random_range(0..statuses.len())];
    let slow = Duration::from_secs(SOURCE_TIMEOUT_S + rng.random_range(2..=5));
    let mut out = vec![
        Phase {
            what: "Prometheus killed".into(),
            fault: Fault::Down,
            reason: "ConnectionRefused",
            label: "refused",
            says: "connection refused".into(),
            alert_says: "unreachable".into(),
        },
        Phase {
            what: format!("answers {slow:?} late"),
            fault: Fault::Slow(slow),
            reason: "Timeout",
            label: "timeout",
            says: format!("did not answer within {SOURCE_TIMEOUT_S}s"),
            alert_says: String::new(),
        },
        Phase {
            what: format!("not JSON: {body:?}"),
            fault: answer(200, ct, body),
            reason: "NotJSON",
            label: "not_json",
            says: "not JSON at all".into(),
            alert_says: String::new(),
        },
        Phase {
            what: format!("JSON of the wrong shape: {shape}"),
            fault: answer(200, "application/json", shape),
            reason: "WrongShape",
            label: "wrong_shape",
            says: "is not the query API's JSON".into(),
            alert_says: String::new(),
        },
        Phase {
            what: format!("HTTP {status}"),
            fault: answer(status, "text/plain", "upstream connect error"),
            reason: "HTTPError",
            label: "http_status",
            says: format!("answered HTTP {status}"),
            alert_says: String::new(),
        },
    ];
    for p in &mut out {
        if p.alert_says.is_empty() {
            p.alert_says = p.says.clone();
        }
    }
    out.shuffle(rng);
    out
}

/// The `PrometheusQueries` condition: (status, reason, message).
fn prom_condition(p: &ScalingPolicy) -> Option<(String, String, String)> {
    let c = p
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "PrometheusQueries")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn queue_in_status(p: &ScalingPolicy) -> Option<f64> {
    p.status
        .as_ref()?
        .metrics
        .iter()
        .find(|m| m.name == "queue")?
        .value
}

/// The first alert of `NemesisPrometheusFailing` in state `state` whose summary
/// contains `says` among the webhook bodies from index `from`: (its index, the alert).
/// (A healthy query slower than the timeout on a loaded machine may raise one of its
/// own; it says something else.)
fn alert_at_hook(hook: &Received, from: usize, state: &str, says: &str) -> Option<(usize, Value)> {
    let bodies = hook.accepted.lock().unwrap().clone();
    bodies.iter().enumerate().skip(from).find_map(|(i, b)| {
        b["alerts"].as_array()?.iter().find_map(|a| {
            (a["labels"]["alertname"] == "NemesisPrometheusFailing"
                && a["labels"]["source"] == "queue"
                && a["status"] == state
                && a["annotations"]["summary"]
                    .as_str()
                    .is_some_and(|s| s.contains(says)))
            .then(|| (i, a.clone()))
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_down_slow_or_garbage_runs_the_fallback_alerts_and_resumes() -> anyhow::Result<()>
{
    init_tracing();
    let seed = nemesis_tests::chaos::seed("chaos_prometheus");
    let mut rng = StdRng::seed_from_u64(seed);
    let phases = phases(&mut rng);
    println!(
        "phases: {:?}",
        phases.iter().map(|p| p.what.as_str()).collect::<Vec<_>>()
    );

    let prom_dir = tempfile::tempdir()?;
    let exporter = serve_exporter().await?;
    let (prom, prom_addr) = start_prometheus(prom_dir.path(), exporter).await?;
    let mut prom = Some(prom);
    let proxy = FaultProxy::start(prom_addr).await?;

    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    nemesis_tests::crds::install_alert_rule_crd(&client).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), "default");
    let rules: Api<AlertRule> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("worker", 1))
        .await?;
    let log = ReplicaLog::start(deployments.clone(), "worker");

    let hook = Arc::new(Received::default());
    let hook_url = webhook::serve(HMAC_KEY.to_owned(), hook.clone()).await?;
    let ctl_dir = tempfile::tempdir()?;
    let sinks = ctl_dir.path().join("sinks.yaml");
    std::fs::write(
        &sinks,
        format!(
            "sinks:\n- {{name: hook, kind: webhook, url: \"{hook_url}\", hmacKey: \"{HMAC_KEY}\"}}\n"
        ),
    )?;
    let prom_url = format!("http://{}", proxy.addr());
    let sinks_flag = sinks.display().to_string();
    let c = start_controller(
        &server,
        ctl_dir.path(),
        &[
            "--prometheus-url",
            &prom_url,
            "--alert-sinks-file",
            &sinks_flag,
        ],
    )
    .await?;
    wait_leading(&c, WAIT).await?;

    let mut rule = AlertRule::new(
        "prometheus",
        serde_json::from_value(json!({
            "policy": "worker",
            "when": [{"event": "PrometheusFailing"}],
            "groupWait": "1s",
        }))?,
    );
    rule.metadata.namespace = Some("default".into());
    rules.create(&PostParams::default(), &rule).await?;
    policies
        .create(
            &PostParams::default(),
            &policy(
                "worker",
                json!({
                    "target": {"deployment": "worker"},
                    "metrics": {"prometheus": [{
                        "name": "queue",
                        "query": format!("sum({GAUGE})"),
                        "interval": "1s",
                        "timeout": format!("{SOURCE_TIMEOUT_S}s"),
                        "fallback": FALLBACK,
                    }]},
                    "initialState": "busy",
                    "states": [{
                        "name": "busy",
                        "range": {
                            "min": 1, "max": 6, "metric": "queue", "target": 10,
                            "targetType": "AverageValue",
                            "scaleUp": {"maxStep": 6, "period": "1s"},
                            "scaleDown": {"maxStep": 6, "period": "1s"},
                        },
                    }],
                }),
            ),
        )
        .await?;

    // Healthy: the real queue, 4 replicas, the condition True.
    let healthy = |what: &'static str| {
        let policies = policies.clone();
        async move {
            eventually(what, WAIT, || async {
                let p = policies.get("worker").await?;
                let ok = prom_condition(&p).is_some_and(|(s, ..)| s == "True")
                    && queue_in_status(&p) == Some(QUEUE);
                Ok(ok.then_some(()))
            })
            .await
        }
    };
    healthy("the policy on the real queue").await?;
    wait_replicas(&deployments, "worker", 4, WAIT).await?;

    for phase in &phases {
        println!("fault: {}", phase.what);
        let series = format!(
            "nemesis_controller_prometheus_errors_total{{reason=\"{}\"}}",
            phase.label
        );
        let errors_before = scrape(&c, &series).await?;
        let hook_from = hook.accepted.lock().unwrap().len();

        if phase.fault == Fault::Down {
            proxy.set(Fault::Down).await?;
            drop(prom.take());
        } else {
            proxy.set(phase.fault.clone()).await?;
        }

        // The declared fallback is taken: 20 queued, 2 replicas.
        let (_, reason, message) = eventually(
            &format!("the condition to say {} ({})", phase.reason, phase.what),
            WAIT,
            || async {
                let p = policies.get("worker").await?;
                Ok(prom_condition(&p).filter(|(s, r, _)| s == "False" && r == phase.reason))
            },
        )
        .await?;
        assert_eq!(reason, phase.reason);
        assert!(
            message.contains("source `queue` on its fallback 20") && message.contains(&phase.says),
            "{}: {message}",
            phase.what
        );
        wait_replicas(&deployments, "worker", 2, WAIT).await?;
        eventually("the fallback in status.metrics", WAIT, || async {
            Ok((queue_in_status(&policies.get("worker").await?) == Some(FALLBACK)).then_some(()))
        })
        .await?;
        assert!(
            scrape(&c, &series).await? > errors_before,
            "{}: {series} counts it",
            phase.what
        );
        assert_eq!(
            scrape(&c, "nemesis_controller_prometheus_failing_sources").await?,
            1.0
        );
        // People are told, through the controller's own sinks.
        let (fired_at, alert) = eventually(
            &format!(
                "the PrometheusFailing alert at the webhook ({})",
                phase.what
            ),
            WAIT,
            || async { Ok(alert_at_hook(&hook, hook_from, "firing", &phase.alert_says)) },
        )
        .await?;
        let summary = alert["annotations"]["summary"].as_str().unwrap_or_default();
        assert!(
            summary.contains("default/worker")
                && summary.contains("declared fallback 20")
                && summary.contains(&phase.alert_says),
            "{}: {summary}",
            phase.what
        );

        // Prometheus is back.
        if phase.fault == Fault::Down {
            let (p, addr) = start_prometheus(prom_dir.path(), exporter).await?;
            prom = Some(p);
            proxy.set_upstream(addr);
        }
        proxy.set(Fault::Pass).await?;
        healthy("the policy back on the real queue").await?;
        wait_replicas(&deployments, "worker", 4, WAIT).await?;
        let (_, resolved) = eventually(
            &format!("the alert resolved at the webhook ({})", phase.what),
            WAIT,
            || async { Ok(alert_at_hook(&hook, fired_at + 1, "resolved", "")) },
        )
        .await?;
        assert_eq!(resolved["id"], alert["id"]);
        eventually("no source failing", WAIT, || async {
            Ok(
                (scrape(&c, "nemesis_controller_prometheus_failing_sources").await? == 0.0)
                    .then_some(()),
            )
        })
        .await?;
    }

    // Only the real value's and the fallback's counts, never zero or anything else.
    let seen = log.seen();
    assert!(
        seen.iter().all(|r| [1, 2, 4].contains(r)),
        "replicas seen: {seen:?}"
    );
    let id = PolicyId::new("default", "worker");
    let on_fallback = c
        .store
        .scale_events(&id, 0..u64::MAX)?
        .iter()
        .filter(|s| s.to_replicas == 2 && s.metrics.get("queue") == Some(&FALLBACK))
        .count();
    assert!(
        on_fallback >= phases.len(),
        "every fault scaled to the fallback's replicas, recorded with queue=20 ({on_fallback})"
    );
    println!("proxy (passed, faulted): {:?}", proxy.counts());
    c.shutdown().await;
    Ok(())
}
