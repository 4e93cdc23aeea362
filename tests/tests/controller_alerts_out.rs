//! Alerts out across a change of leader, on the test API server: two controllers share a
//! Lease; an AlertRule (validated, its status written by the leader) raises an alert for
//! an invalid ScalingPolicy; the leader keeps the alert in its outbox Secret and is
//! refused by the sink, then dies without a word; the next leader loads the outbox and
//! delivers the alert (signed; the receiver checks the HMAC), and the Secret shows it
//! delivered.

mod controller_support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use controller_support::*;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use nemesis_controller::notify::outbox::{DeliveryState, Outbox};
use nemesis_controller::notify::rule::AlertRule;
use nemesis_controller::notify::{DEFAULT_OUTBOX_SECRET, OUTBOX_KEY};
use nemesis_controller::policy::ScalingPolicy;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::webhook::{self, Received};
use serde_json::json;

const HMAC_KEY: &str = "failover-test-hmac-key-0123456789";
/// Start-ups, leases and backoffs on a loaded machine.
const WAIT: Duration = Duration::from_secs(90);

async fn outbox(secrets: &Api<Secret>) -> Option<Outbox> {
    let s = secrets.get_opt(DEFAULT_OUTBOX_SECRET).await.ok()??;
    serde_json::from_slice(&s.data?.get(OUTBOX_KEY)?.0).ok()
}

fn ready(rule: &AlertRule) -> Option<(String, String)> {
    let c = rule
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_raised_before_the_leader_dies_is_delivered_by_the_next_leader()
-> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    nemesis_tests::crds::install_alert_rule_crd(&client).await?;
    let ns = "default";

    let hook = Arc::new(Received::default());
    hook.refuse.store(true, Ordering::SeqCst);
    let url = webhook::serve(HMAC_KEY.to_owned(), hook.clone()).await?;
    let sinks_dir = tempfile::tempdir()?;
    let sinks = sinks_dir.path().join("sinks.yaml");
    std::fs::write(
        &sinks,
        format!(
            "sinks:\n- {{name: hook, kind: webhook, url: \"{url}\", hmacKey: \"{HMAC_KEY}\"}}\n"
        ),
    )?;
    let sinks_flag = sinks.display().to_string();
    let extra = ["--alert-sinks-file", sinks_flag.as_str()];

    let dir_a = tempfile::tempdir()?;
    let dir_b = tempfile::tempdir()?;
    let a = start_controller(&server, dir_a.path(), &extra).await?;
    wait_leading(&a, Duration::from_secs(30)).await?;
    let b = start_controller(&server, dir_b.path(), &extra).await?;

    // Rules: the leader writes whether each is valid, with field and column.
    let rules: Api<AlertRule> = Api::namespaced(client.clone(), ns);
    let rule = |name: &str, spec: serde_json::Value| -> AlertRule {
        let mut r = AlertRule::new(name, serde_json::from_value(spec).unwrap());
        r.metadata.namespace = Some(ns.into());
        r
    };
    rules
        .create(
            &PostParams::default(),
            &rule(
                "invalid-policies",
                json!({"when": [{"event": "InvalidPolicy"}], "groupWait": "1s", "severity": "critical"}),
            ),
        )
        .await?;
    rules
        .create(
            &PostParams::default(),
            &rule(
                "typo",
                json!({"when": [{"threshold": "conns.active >> 3"}]}),
            ),
        )
        .await?;
    let valid = eventually("the valid rule's status", WAIT, || async {
        Ok(ready(&rules.get("invalid-policies").await?))
    })
    .await?;
    assert_eq!(valid.0, "True", "{valid:?}");
    let typo = eventually("the invalid rule's status", WAIT, || async {
        Ok(ready(&rules.get("typo").await?))
    })
    .await?;
    assert_eq!(typo.0, "False");
    assert!(
        typo.1.starts_with("spec.when[0].threshold: column "),
        "{typo:?}"
    );

    // An invalid policy: A raises the alert, keeps it in the Secret, is refused.
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), ns);
    policies
        .create(
            &PostParams::default(),
            &policy(
                "broken",
                json!({
                    "target": {"deployment": "broken"},
                    "initialState": "low",
                    "states": [{"name": "low", "replicas": 1}],
                    "transitions": [{"from": "low", "to": "low", "when": "conns.active > > 1"}],
                }),
            ),
        )
        .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let id = eventually("A's refused attempt in the outbox Secret", WAIT, || async {
        let Some(o) = outbox(&secrets).await else {
            return Ok(None);
        };
        Ok(o.alerts.values().find_map(|a| {
            (a.labels.get("policy").map(String::as_str) == Some("broken")
                && a.deliveries["hook"].attempts >= 1)
                .then(|| a.id.clone())
        }))
    })
    .await?;
    assert!(*hook.refused.lock().unwrap() >= 1);
    assert!(hook.accepted.lock().unwrap().is_empty());

    // A dies without releasing anything; the sink comes back; B takes over and delivers.
    a.kill();
    hook.refuse.store(false, Ordering::SeqCst);
    wait_leading(&b, WAIT).await?;
    let body = eventually("B's delivery", WAIT, || async {
        Ok(hook.accepted.lock().unwrap().first().cloned())
    })
    .await?;
    assert_eq!(body["sender"], b.identity.as_str(), "{body:#}");
    assert_eq!(body["status"], "firing");
    assert_eq!(body["alerts"][0]["id"], id.as_str());
    assert_eq!(
        body["alerts"][0]["labels"]["alertname"],
        "NemesisInvalidPolicy"
    );
    assert_eq!(body["alerts"][0]["labels"]["severity"], "critical");
    assert!(
        body["alerts"][0]["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("default/broken is invalid"),
        "{body:#}"
    );
    eventually("the Secret to show it delivered", WAIT, || async {
        let Some(o) = outbox(&secrets).await else {
            return Ok(None);
        };
        Ok(o.alerts
            .get(&id)
            .is_some_and(|a| a.deliveries["hook"].state == DeliveryState::Delivered)
            .then_some(()))
    })
    .await?;
    // Exactly one delivery: B does not send it twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(hook.accepted.lock().unwrap().len(), 1);
    Ok(())
}
