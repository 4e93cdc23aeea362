//! Agents are who they say they are: each presents its own ServiceAccount token,
//! projected for the controller's audience and bound to its pod; the controller checks it
//! with a TokenReview against the (test) API server and ties it to the pod's node. A
//! forged token, an expired one, one for another audience, another ServiceAccount's, or
//! a real agent token used for another node is refused and counted in
//! `nemesis_controller_agent_auth_refused_total{reason}`.

mod controller_support;

use std::time::Duration;

use controller_support::*;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;
use nemesis_common::wire::{Heartbeat, ServiceRef};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::{Value, json};

fn heartbeat(node: &str) -> Value {
    serde_json::to_value(Heartbeat {
        node: node.into(),
        instance: format!("{node}-1"),
        services: vec![],
        addresses: vec![],
        ready: true,
        directives_cursor: None,
        pages: false,
        reports_seq: None,
        reports_since: None,
        gone: vec![],
    })
    .expect("heartbeat serializes")
}

fn refused(text: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!("nemesis_controller_agent_auth_refused_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(-1.0)
}

/// The body of a TokenRequest for the agents' ServiceAccount bound to `pod`.
async fn bound_request(client: &kube::Client, pod: &str, audience: &str) -> anyhow::Result<Value> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let uid = pods.get(pod).await?.metadata.uid;
    Ok(json!({"spec": {
        "audiences": [audience],
        "expirationSeconds": 3600,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid},
    }}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_agents_own_token_speaks_for_its_own_node() -> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let dir = tempfile::tempdir()?;
    let c = start_controller(&server, dir.path(), &[]).await?;
    let http = Http::default();
    let api = c.api_addr;
    let post = |token: String, path: &'static str, body: Value| {
        let http = &http;
        async move { http.post(api, path, &token, &body).await }
    };

    // The agent of node-a: its heartbeat and wake-up for node-a pass.
    let a = agent_token(api, "node-a").await?;
    let b = agent_token(api, "node-b").await?;
    let (code, body) = post(a.clone(), "/v1/agents/heartbeat", heartbeat("node-a")).await?;
    assert_eq!(code, 200, "node-a's own heartbeat: {body}");
    let svc = ServiceRef {
        namespace: "default".into(),
        name: "web".into(),
    };
    let wake = |node: &str| json!({"node": node, "service": svc, "heldConnections": 1});
    let (code, body) = post(a.clone(), "/v1/agents/wake", wake("node-a")).await?;
    assert_eq!(code, 200, "node-a's own wake-up: {body}");
    let (code, _) = post(b.clone(), "/v1/agents/heartbeat", heartbeat("node-b")).await?;
    assert_eq!(code, 200, "node-b's own heartbeat");

    // node-a's token for node-b: heartbeat (and the acknowledgements it carries) and
    // wake-up refused.
    let (code, body) = post(a.clone(), "/v1/agents/heartbeat", heartbeat("node-b")).await?;
    assert_eq!(code, 403, "node-a's token for node-b's heartbeat: {body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("node-a"),
        "the refusal says whose token it is: {body}"
    );
    let (code, body) = post(a.clone(), "/v1/agents/wake", wake("node-b")).await?;
    assert_eq!(code, 403, "node-a's token for node-b's wake-up: {body}");

    // A forged token: not a JWT, and a JWT the API server did not sign (node-a's token
    // with its payload swapped for one claiming node-b).
    let (code, _) = post("forged".into(), "/v1/agents/heartbeat", heartbeat("node-a")).await?;
    assert_eq!(code, 401, "a token that is no JWT");
    let mut parts: Vec<&str> = a.split('.').collect();
    let other: Vec<&str> = b.split('.').collect();
    parts[1] = other[1];
    let spliced = parts.join(".");
    let (code, body) = post(spliced, "/v1/agents/heartbeat", heartbeat("node-b")).await?;
    assert_eq!(
        code, 401,
        "a token with a signature of another payload: {body}"
    );

    // An expired token of node-a's pod, signed by the API server.
    let req = bound_request(&client, "nemesis-agent-node-a", "nemesis-controller").await?;
    let two_hours_ago = chrono::Utc::now().timestamp() - 7200;
    let expired = server.service_account_token_issued_at(
        AGENT_NAMESPACE,
        AGENT_SERVICE_ACCOUNT,
        &req,
        two_hours_ago,
    )?;
    let (code, body) = post(expired, "/v1/agents/heartbeat", heartbeat("node-a")).await?;
    assert_eq!(code, 401, "an expired token: {body}");

    // node-a's pod's token for the API server's audience, not the controller's.
    let req = bound_request(
        &client,
        "nemesis-agent-node-a",
        "https://kubernetes.default.svc.cluster.local",
    )
    .await?;
    let now = chrono::Utc::now().timestamp();
    let wrong_aud = server.service_account_token_issued_at(
        AGENT_NAMESPACE,
        AGENT_SERVICE_ACCOUNT,
        &req,
        now,
    )?;
    let (code, body) = post(wrong_aud, "/v1/agents/heartbeat", heartbeat("node-a")).await?;
    assert_eq!(code, 401, "a token for another audience: {body}");

    // Another ServiceAccount's token for the right audience, bound to the same pod.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "intruder"}}))?,
    )
    .await?;
    let req = bound_request(&client, "nemesis-agent-node-a", "nemesis-controller").await?;
    let intruder =
        server.service_account_token_issued_at(AGENT_NAMESPACE, "intruder", &req, now)?;
    let (code, body) = post(intruder, "/v1/agents/heartbeat", heartbeat("node-a")).await?;
    assert_eq!(code, 403, "another ServiceAccount's token: {body}");

    // No token at all.
    let req = http::Request::post(format!("http://{api}/v1/agents/heartbeat"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            heartbeat("node-a").to_string(),
        )))?;
    let client_http =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let resp = tokio::time::timeout(Duration::from_secs(10), client_http.request(req)).await??;
    assert_eq!(resp.status(), 401, "no Authorization header");

    // Every refusal counted by its reason.
    let (_, text) = http.get(c.admin_addr, "/metrics").await?;
    for (reason, want) in [
        ("other_node", 2.0),
        ("invalid_token", 2.0),
        ("expired_token", 1.0),
        ("wrong_audience", 1.0),
        ("wrong_service_account", 1.0),
        ("missing", 1.0),
        ("no_node", 0.0),
    ] {
        assert_eq!(
            refused(&text, reason),
            want,
            "refusals for {reason}:\n{text}"
        );
    }
    c.shutdown().await;
    Ok(())
}

/// A token bound to a pod that has no node yet (or was deleted) speaks for no node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_a_deleted_pod_is_refused() -> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let dir = tempfile::tempdir()?;
    let c = start_controller(&server, dir.path(), &[]).await?;
    let api = c.api_addr;
    let token = mint_agent_token(&client, "node-gone").await?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(client.clone(), AGENT_NAMESPACE);
    // No kubelet runs it: delete at once rather than wait for a graceful end.
    pods.delete(
        "nemesis-agent-node-gone",
        &kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    eventually("the agent pod deleted", Duration::from_secs(60), || async {
        Ok(pods
            .get_opt("nemesis-agent-node-gone")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    let (code, body) = Http::default()
        .post(api, "/v1/agents/heartbeat", &token, &heartbeat("node-gone"))
        .await?;
    assert_eq!(code, 401, "the token of a deleted pod: {body}");
    c.shutdown().await;
    Ok(())
}

/// Calls presenting one token the controller has not reviewed yet cost one TokenReview
/// between them (an agent's heartbeat, wake-up and load report arrive together; all of
/// a thousand agents' calls arrive together after a controller start), and the verdict
/// then answers without another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_with_one_new_token_cost_one_review() -> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let dir = tempfile::tempdir()?;
    let c = start_controller(&server, dir.path(), &[]).await?;
    let api = c.api_addr;
    let token = mint_agent_token(&client, "node-busy").await?;
    let http = Http::default();
    let before = server.request_counts().reviews;
    let hb = heartbeat("node-busy");
    let calls = (0..16).map(|_| http.post(api, "/v1/agents/heartbeat", &token, &hb));
    for (code, body) in futures::future::try_join_all(calls).await? {
        assert_eq!(code, 200, "a heartbeat with the agent's own token: {body}");
    }
    assert_eq!(
        server.request_counts().reviews - before,
        1,
        "16 concurrent heartbeats with one new token: one review"
    );
    for _ in 0..5 {
        let (code, body) = http.post(api, "/v1/agents/heartbeat", &token, &hb).await?;
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(
        server.request_counts().reviews - before,
        1,
        "heartbeats within the verdict's minute: no review more"
    );
    c.shutdown().await;
    Ok(())
}
