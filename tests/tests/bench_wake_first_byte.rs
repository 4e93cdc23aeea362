//! Benchmark (ignored by the test suite; `cargo xtask bench` runs it):
//! `wake_to_first_byte_ms_p99`, end to end in the sandbox with the real controller, the
//! real agent (real eBPF on a child cgroup) and the test API server: a client in the
//! intercepted cgroup connects to the Service's ClusterIP at zero and sends a request;
//! the figure is its time to the response (one small segment, so its first byte) minus
//! the pod's own start-to-ready time (from the moment the pod object appears to the
//! moment its Ready condition turns true, both seen by a watch in this process). What
//! is left is what Nemesis adds to a cold start: hold, wake-up, scale, the Deployment
//! and ReplicaSet controllers, and the release once the endpoint is ready.
//! Prints `wake_to_first_byte_ms_p99`, `wake_to_first_byte_ms_p50` and, for context,
//! `pod_start_to_ready_ms_p50`, over ROUNDS wakes from zero (p99 of 12 is the largest).

mod wake_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher;
use nemesis_common::stats::percentile_or_nan;
use serde_json::json;
use tokio::time::Instant;
use wake_support::{APP, NS, Options, Scenario, WakeEnv, eventually, pod_server};

const ROUNDS: usize = 12;
/// Short, so a round (wake, idle window, sleep) takes seconds.
const IDLE: &str = "2s";

/// When this process saw each pod appear and turn Ready.
#[derive(Default)]
struct Seen {
    created: Option<Instant>,
    ready: Option<Instant>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark: cargo xtask bench runs it"]
async fn wake_to_first_byte() -> anyhow::Result<()> {
    let env = WakeEnv::start_with(
        Scenario {
            name: "bench-ttfb",
            pod: pod_server(50, &[]),
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: Some(json!({
                "target": {"deployment": APP, "service": APP},
                "minReplicas": 0,
                "maxReplicas": 1,
                "idleTimeout": IDLE,
                "metrics": {"connections": {"rateWindow": IDLE}},
                "holdTimeoutSeconds": 60,
            })),
            real_controller: Some(vec![]),
            ..Options::default()
        },
    )
    .await?;
    let result = run(&env).await;
    env.shutdown().await?;
    result
}

async fn run(env: &WakeEnv) -> anyhow::Result<()> {
    let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
    let watch = {
        let seen = seen.clone();
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), NS);
        tokio::spawn(async move {
            let mut events = watcher(pods, watcher::Config::default()).boxed();
            while let Some(ev) = events.next().await {
                let now = Instant::now();
                let pods = match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => vec![p],
                    _ => continue,
                };
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                for p in pods {
                    let Some(name) = p.metadata.name.clone() else {
                        continue;
                    };
                    let s = seen.entry(name).or_default();
                    s.created.get_or_insert(now);
                    let ready = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    if ready {
                        s.ready.get_or_insert(now);
                    }
                }
            }
        })
    };

    let mut overhead = Vec::with_capacity(ROUNDS);
    let mut start_to_ready = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        // At zero, with no pod left from the round before.
        eventually(
            "the app asleep with no pods",
            Duration::from_secs(90),
            || async {
                let asleep = env.policy_state().await?.as_deref() == Some("zero")
                    && env.replicas().await? == 0
                    && env.pod_names().await?.is_empty();
                Ok(asleep.then_some(()))
            },
        )
        .await?;
        let before: Vec<String> = seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let result = env
            .clients(&[])
            .await?
            .finish(Duration::from_secs(90))
            .await?;
        let response = result[0]
            .http()
            .with_context(|| format!("round {round}: {result:?}"))?;
        ensure!(response.status == 200, "round {round}: {response:?}");
        let total_ms = result[0].ms as f64;
        // The pod this wake started: the one that was not there before.
        let pod_ms = eventually(
            "the woken pod seen ready",
            Duration::from_secs(10),
            || async {
                let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                Ok(seen
                    .iter()
                    .filter(|(name, _)| !before.contains(name))
                    .find_map(|(_, s)| Some((s.ready? - s.created?).as_secs_f64() * 1000.0)))
            },
        )
        .await?;
        eprintln!(
            "round {round}: response after {total_ms:.0} ms, pod start-to-ready {pod_ms:.1} ms"
        );
        overhead.push((total_ms - pod_ms).max(0.0));
        start_to_ready.push(pod_ms);
    }
    watch.abort();
    overhead.sort_by(f64::total_cmp);
    start_to_ready.sort_by(f64::total_cmp);
    println!(
        "wake_to_first_byte_ms_p99={:.1}",
        percentile_or_nan(&overhead, 99.0)
    );
    println!(
        "wake_to_first_byte_ms_p50={:.1}",
        percentile_or_nan(&overhead, 50.0)
    );
    println!(
        "pod_start_to_ready_ms_p50={:.1}",
        percentile_or_nan(&start_to_ready, 50.0)
    );
    Ok(())
}
