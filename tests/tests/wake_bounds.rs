//! Issue 4, the bounds of holding end to end (real agent, real eBPF, sandbox): past the
//! policy's hold timeout an HTTP/1 client gets `503` with `Retry-After` and a client of
//! another protocol a clean close; past the policy's held-connection bound the excess
//! is refused the same way at once while the held ones are served. With the real
//! controller, the refusals reach its history: the report counts them and an AlertRule
//! on `HoldsRefused` delivers a signed alert to a webhook.

mod wake_support;

use std::time::Duration;

use std::sync::Arc;

use kube::Api;
use kube::api::PostParams;
use nemesis_controller::notify::rule::AlertRule;
use nemesis_tests::wait::eventually_every;
use nemesis_tests::{ui_client, webhook};
use serde_json::json;
use wake_support::{APP, NS, Options, Scenario, WakeEnv, eventually, slow_server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_hold_timeout_http_clients_get_503_with_retry_after_and_raw_clients_a_clean_close()
-> anyhow::Result<()> {
    let env = WakeEnv::start(Scenario {
        name: "timeout",
        pod: slow_server(),
        policy: json!({"holdTimeoutSeconds": 1}),
        // Nobody scales: the Service stays at zero and the hold budget runs out.
        scale_on_wake: false,
    })
    .await?;

    let mut sets = env
        .clients_together(&[
            &["--clients", "3", "--http"],
            &["--clients", "3", "--raw", "PING not-http\n"],
        ])
        .await?;
    let raw = sets.pop().expect("raw clients");
    let http = sets.pop().expect("http clients");
    let http = http.finish(Duration::from_secs(20)).await?;
    let raw = raw.finish(Duration::from_secs(20)).await?;

    for r in &http {
        let resp = r.http()?;
        assert_eq!(resp.status, 503, "client {}: {resp:?}", r.client);
        let retry: u64 = resp
            .headers
            .get("retry-after")
            .unwrap_or_else(|| panic!("client {}: no Retry-After in {resp:?}", r.client))
            .parse()?;
        assert!(retry >= 1, "Retry-After {retry}");
        assert!(
            r.ms >= 900,
            "client {} was refused after {} ms, before the timeout",
            r.client,
            r.ms
        );
    }
    for r in &raw {
        assert_eq!(
            (r.result.as_str(), r.text.as_str()),
            ("response", ""),
            "client {}: a clean close (EOF, nothing written), got {r:?}",
            r.client
        );
        assert!(
            r.ms >= 900,
            "client {} was closed after {} ms",
            r.client,
            r.ms
        );
    }

    let m = env.metrics().await?;
    assert_eq!(m.outcome("timeout"), 6.0, "every held connection timed out");
    assert_eq!(m.held(), 0.0);
    assert_eq!(m.proxy_open(), 0.0);
    assert_eq!(env.controller.wakes(), 1, "one wake-up for the flight");
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_held_connection_bound_the_excess_gets_503_at_once_and_the_held_are_served()
-> anyhow::Result<()> {
    const HELD: usize = 3;
    const CLIENTS: usize = 10;
    let env = WakeEnv::start(Scenario {
        name: "overflow",
        pod: slow_server(),
        policy: json!({"maxHeldConnections": HELD}),
        scale_on_wake: true,
    })
    .await?;

    let results = env
        .run_clients(
            &["--clients", &CLIENTS.to_string(), "--http"],
            Duration::from_secs(30),
        )
        .await?;
    let pods = env.pod_names().await?;
    let mut served = 0;
    let mut refused = 0;
    for r in &results {
        let resp = r.http()?;
        match resp.status {
            200 => {
                assert_eq!(resp.body, format!("{}\n", pods[0]));
                served += 1;
            }
            503 => {
                assert!(
                    resp.headers.contains_key("retry-after"),
                    "client {}: {resp:?}",
                    r.client
                );
                assert!(
                    r.ms < 1500,
                    "an overflow is refused at once, not after the cold start ({} ms)",
                    r.ms
                );
                refused += 1;
            }
            other => panic!("client {}: status {other}: {resp:?}", r.client),
        }
    }
    assert_eq!((served, refused), (HELD, CLIENTS - HELD));
    let m = env.metrics().await?;
    assert_eq!(m.outcome("overflow"), (CLIENTS - HELD) as f64);
    assert_eq!(m.outcome("forwarded"), HELD as f64);
    assert_eq!(env.controller.wakes(), 1);
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_holds_are_counted_in_the_report_and_alerted_through_a_webhook()
-> anyhow::Result<()> {
    const HELD: usize = 2;
    const CLIENTS: usize = 8;
    const HMAC_KEY: &str = "refused-holds-hmac-key-0123456789";
    const PASSWORD: &str = "refused-holds-admin-password";
    // Start-ups, heartbeats, samples and deliveries on a loaded machine.
    const WAIT: Duration = Duration::from_secs(120);

    let received = Arc::new(webhook::Received::default());
    let url = webhook::serve(HMAC_KEY.to_string(), received.clone()).await?;
    let dir = tempfile::tempdir()?;
    let sinks = dir.path().join("sinks.yaml");
    std::fs::write(
        &sinks,
        format!(
            "sinks:\n- {{name: hook, kind: webhook, url: \"{url}\", hmacKey: \"{HMAC_KEY}\"}}\n"
        ),
    )?;
    let password = dir.path().join("ui-password");
    std::fs::write(&password, PASSWORD)?;
    let env = WakeEnv::start_with(
        Scenario {
            name: "refusedrep",
            pod: slow_server(),
            policy: json!({"maxHeldConnections": HELD}),
            scale_on_wake: true,
        },
        Options {
            real_controller: Some(vec![
                "--alert-sinks-file".into(),
                sinks.display().to_string(),
                "--ui-password-file".into(),
                password.display().to_string(),
            ]),
            ..Options::default()
        },
    )
    .await?;
    let real = env.real.as_ref().expect("the real controller");

    // The rule is valid (its status says so) before any connection is refused.
    let rules: Api<AlertRule> = Api::namespaced(env.client.clone(), NS);
    let mut rule = AlertRule::new(
        "refused",
        serde_json::from_value(json!({"when": [{"event": "HoldsRefused"}], "groupWait": "1s"}))?,
    );
    rule.metadata.namespace = Some(NS.into());
    rules.create(&PostParams::default(), &rule).await?;
    eventually("the AlertRule's Ready condition", WAIT, || async {
        let r = rules.get("refused").await?;
        let ready = r.status.and_then(|s| {
            s.conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| (c.status, c.message))
        });
        Ok(match ready {
            Some((status, _)) if status == "True" => Some(()),
            Some((_, message)) => anyhow::bail!("the rule is invalid: {message}"),
            None => None,
        })
    })
    .await?;

    let results = env
        .run_clients(
            &["--clients", &CLIENTS.to_string(), "--http"],
            Duration::from_secs(60),
        )
        .await?;
    let mut refused = 0;
    for r in &results {
        match r.http()?.status {
            200 => {}
            503 => refused += 1,
            other => panic!("client {}: status {other}: {r:?}", r.client),
        }
    }
    // The bound admits HELD at a time; with a slow start nearly all the rest are refused.
    assert!(refused >= 1, "some connection beyond the bound was refused");
    let m = env.metrics().await?;
    assert_eq!(m.outcome("overflow"), refused as f64);
    assert_eq!(
        m.sum(
            "nemesis_agent_proxy_holds_refused_total",
            &[("namespace", NS), ("service", APP)]
        ),
        refused as f64,
        "the agent's per-Service counter"
    );

    // The controller's history has them: the report counts them, in scaling and as a series.
    let session = ui_client::login(real.api_addr, "admin", PASSWORD).await?;
    let path = format!("/api/reports?scope=service&namespace={NS}&name={APP}&window=1h");
    let slowly = Duration::from_millis(250);
    let report = eventually_every(slowly, "the refusals in the report", WAIT, || async {
        let (status, v) = session.get(&path).await?;
        anyhow::ensure!(status == 200, "the report: {status} {v}");
        let counted = v["services"][0]["scaling"]["wakes"]["holdsRefused"].as_u64();
        Ok((counted == Some(refused as u64)).then_some(v))
    })
    .await?;
    let s = &report["services"][0];
    assert_eq!(
        s["performance"]["proxy.holds.refused"]["total"].as_f64(),
        Some(refused as f64),
        "{s:#}"
    );
    assert!(s["performance"]["proxy.errors"].is_object(), "{s:#}");
    assert_eq!(report["totals"]["wakes"]["holdsRefused"], refused as u64);
    let (status, csv) = session.get(&format!("{path}&format=csv")).await?;
    assert_eq!(status, 200);
    let csv = csv.as_str().unwrap_or_default().to_string();
    let header: Vec<&str> = csv.lines().next().unwrap_or_default().split(',').collect();
    let row: Vec<&str> = csv.lines().nth(1).unwrap_or_default().split(',').collect();
    let col = header
        .iter()
        .position(|h| *h == "holds_refused")
        .expect("a holds_refused column");
    assert_eq!(
        row.get(col).copied(),
        Some(refused.to_string().as_str()),
        "{csv}"
    );

    // And the alert went out, signed.
    let alert = eventually_every(
        slowly,
        "the HoldsRefused alert at the webhook",
        WAIT,
        || async {
            Ok(received.accepted.lock().unwrap().iter().find_map(|body| {
                body["alerts"].as_array()?.iter().find_map(|a| {
                    (a["labels"]["alertname"] == "NemesisHoldsRefused").then(|| a.clone())
                })
            }))
        },
    )
    .await?;
    assert_eq!(alert["labels"]["policy"], APP, "{alert:#}");
    assert_eq!(alert["labels"]["namespace"], NS, "{alert:#}");
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains("refused at once")),
        "{alert:#}"
    );
    assert_eq!(*received.bad_signatures.lock().unwrap(), 0);
    env.shutdown().await
}
