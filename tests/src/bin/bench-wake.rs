//! Benchmark: wake-up received by the controller -> scale PATCH acknowledged by the API
//! server, over many distinct targets. Starts the test API server and a controller in
//! this process, gives it one short-form policy per Deployment (all at zero), posts one
//! wake-up per target over the agents' HTTP API, and reads the latency the controller
//! itself measured (the `wake_latency_us` field of its "scaled from zero" log event).
//! Prints `wake_to_scale_ms_p99=<ms>` (goal <= 10) and the median.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::{Api, CustomResourceExt};
use nemesis_common::stats::percentile;
use nemesis_controller::config::RunArgs;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::json;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Distinct targets, one wake-up each: enough for a stable 99th percentile (the two
/// slowest of 200), few enough to set up in seconds.
const TARGETS: usize = 200;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// Collects the `wake_latency_us` field of the controller's log events.
struct Latencies(Arc<Mutex<Vec<u64>>>);

struct Find(Option<u64>);

impl Visit for Find {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "wake_latency_us" {
            self.0 = Some(value);
        }
    }
    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

impl<S: tracing::Subscriber> Layer<S> for Latencies {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = Find(None);
        event.record(&mut f);
        if let Some(us) = f.0 {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(us);
        }
    }
}

/// A percentile of microsecond samples, in milliseconds.
fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    percentile(sorted_us, p).map_or(f64::NAN, |us| us as f64 / 1000.0)
}

fn main() -> anyhow::Result<()> {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    tracing_subscriber::registry()
        .with(Latencies(latencies.clone()))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "warn".into()),
                ),
        )
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(latencies))
}

async fn run(latencies: Arc<Mutex<Vec<u64>>>) -> anyhow::Result<()> {
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &ScalingPolicy::crd())
        .await
        .context("installing the ScalingPolicy CRD")?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), "default");
    for i in 0..TARGETS {
        let name = format!("t{i}");
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}},
                             "spec": {"containers": [{"name": "app", "image": "local/app"}]}},
            },
        }))?;
        deployments.create(&PostParams::default(), &d).await?;
        let p: ScalingPolicy = serde_json::from_value(json!({
            "apiVersion": "nemesis.dev/v1alpha1", "kind": "ScalingPolicy",
            "metadata": {"name": name},
            "spec": {"target": {"deployment": name, "service": name},
                     "minReplicas": 0, "maxReplicas": 1, "idleTimeout": "1h"},
        }))?;
        policies.create(&PostParams::default(), &p).await?;
    }

    let dir = tempfile::tempdir()?;
    let args = Cli::try_parse_from([
        "bench-wake".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--lease-namespace".into(),
        "default".into(),
        "--store-path".into(),
        dir.path().join("history.redb").display().to_string(),
    ])?
    .run;
    let controller = nemesis_controller::app::start(&args, client.clone()).await?;
    // The wake-ups come as the agent of node `bench` sends them, with its own token.
    let token = nemesis_tests::agent_token::mint_agent_token(&client, "bench").await?;
    let mut leading = controller.leading();
    tokio::time::timeout(Duration::from_secs(30), leading.wait_for(|l| *l))
        .await
        .context("the controller did not lead")??;
    // Every policy adopted at zero (its actor runs, its Service is managed).
    let start = Instant::now();
    loop {
        let ready = policies
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.state.as_deref()) == Some("zero"))
            .count();
        if ready == TARGETS {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("only {ready} of {TARGETS} policies running after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let http: HttpClient<_, Full<Bytes>> = HttpClient::builder(TokioExecutor::new()).build_http();
    for i in 0..TARGETS {
        let body = json!({"node": "bench", "heldConnections": 1,
                          "service": {"namespace": "default", "name": format!("t{i}")}});
        let req = http::Request::post(format!("http://{}/v1/agents/wake", controller.api_addr))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
        let resp = tokio::time::timeout(Duration::from_secs(5), http.request(req)).await??;
        let status = resp.status();
        let answer = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "wake-up {i} refused: {status} {}",
                String::from_utf8_lossy(&answer)
            );
        }
        // One wake at a time: the figure is the latency of a wake, not of a queue.
        let deadline = Instant::now() + Duration::from_secs(5);
        while latencies.lock().unwrap_or_else(|e| e.into_inner()).len() <= i {
            if Instant::now() > deadline {
                bail!("wake-up {i} was never scaled");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut all = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    all.sort_unstable();
    println!("wake_to_scale_ms_p99={:.3}", percentile_ms(&all, 99.0));
    println!("wake_to_scale_ms_p50={:.3}", percentile_ms(&all, 50.0));
    controller.shutdown().await;
    server.shutdown().await;
    Ok(())
}
