//! Benchmark: `policy_tick_status_writes_10k_ms`, one tick of 10,000 short-form policies
//! in which every policy's status changed and is written: the decision function, the
//! status the controller builds from it (`reconcile::status::build`, with its
//! `worth_writing` check) and one merge PATCH of `/status` per policy to the API server
//! (the test API server in this process, over HTTP, through kube-rs as the controller's
//! actors write it, at most 64 writes in flight). `policy_decide_10k_ms` (bench-policy)
//! times the decision function alone; this is the same tick with the writes, in the
//! worst case where nothing is coalesced away. Median of 3 ticks, each with new
//! connection counts so every status differs from the one written before.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use chrono::Utc;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, CustomResourceExt};
use nemesis_controller::engine::{ConnectionSample, Observations, State, decide};
use nemesis_controller::policy::{CompiledPolicy, ScalingPolicy, ScalingPolicyStatus, compile};
use nemesis_controller::reconcile::status;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::json;

const POLICIES: usize = 10_000;
const TICKS: usize = 3;
/// Concurrent status writes: the controller's actors write independently; kube-rs
/// multiplexes them over its connection pool.
const IN_FLIGHT: usize = 64;
const NS: &str = "default";

struct Policy {
    name: String,
    compiled: CompiledPolicy,
    state: State,
    written: ScalingPolicyStatus,
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &ScalingPolicy::crd())
        .await
        .context("installing the ScalingPolicy CRD")?;
    let api: Api<ScalingPolicy> = Api::namespaced(client.clone(), NS);
    let started = Instant::now();
    let mut policies: Vec<Policy> = stream::iter(0..POLICIES)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = format!("p{i}");
                let p: ScalingPolicy = serde_json::from_value(json!({
                    "apiVersion": "nemesis.dev/v1alpha1", "kind": "ScalingPolicy",
                    "metadata": {"name": name},
                    "spec": {"target": {"deployment": name, "service": name},
                             "minReplicas": 0, "maxReplicas": 3, "targetValue": 20,
                             "idleTimeout": "10m"},
                }))?;
                let created = api.create(&PostParams::default(), &p).await?;
                let compiled =
                    compile(&created.spec).map_err(|e| anyhow::anyhow!("policy {name}: {e:?}"))?;
                let now = Utc::now();
                let state = State::resume(&compiled, "warm", now, now);
                anyhow::Ok(Policy {
                    name,
                    compiled,
                    state,
                    written: ScalingPolicyStatus::default(),
                })
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect()
        .await?;
    eprintln!(
        "{POLICIES} policies created in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut times = Vec::with_capacity(TICKS);
    for tick in 0..TICKS {
        let now = Utc::now();
        let t = Instant::now();
        // The decisions and the statuses: what each actor computes before it writes.
        let mut writes = Vec::with_capacity(POLICIES);
        for (i, p) in policies.iter_mut().enumerate() {
            let mut obs = Observations::for_policy(&p.compiled);
            obs.replicas = 1;
            obs.ready_replicas = 1;
            let active = ((i + tick) % 7) as f64;
            obs.connections = Some(ConnectionSample {
                active,
                rate: active / 10.0 + tick as f64,
                held: 0.0,
                at: now,
            });
            let d = decide(&p.compiled, &p.state, &obs, now);
            p.state = d.state.clone();
            let new = status::build(status::Input {
                compiled: Ok(&p.compiled),
                generation: Some(1),
                previous: &p.written,
                state: Some((p.state.name(&p.compiled).to_string(), now)),
                windows: p.state.windows(),
                desired: Some(d.desired_replicas),
                last_transition: None,
                metrics: vec![
                    ("conns.active".into(), Some(active)),
                    (
                        "conns.rate".into(),
                        obs.connections.as_ref().map(|c| c.rate),
                    ),
                ],
                blocked: None,
                notes: vec![],
                sources: vec![],
                target: Some(p.compiled.workload()),
                hpa: None,
                now,
            });
            let age = (tick > 0).then_some(Duration::from_secs(3600));
            if status::worth_writing(&new, Some(&p.written), age, Duration::from_secs(10)) {
                writes.push((p.name.clone(), new));
            }
        }
        ensure!(
            writes.len() == POLICIES,
            "tick {tick}: only {} of {POLICIES} statuses changed; the figure is the every-status case",
            writes.len()
        );
        let written: Vec<(String, ScalingPolicyStatus)> = stream::iter(writes)
            .map(|(name, new)| {
                let api = api.clone();
                async move {
                    let patch = json!({ "status": new });
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .with_context(|| format!("status of {name}"))?;
                    anyhow::Ok((name, new))
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect()
            .await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        eprintln!("tick {tick}: {} status writes, {ms:.1} ms", written.len());
        times.push(ms);
        let mut by_name: std::collections::HashMap<String, ScalingPolicyStatus> =
            written.into_iter().collect();
        for p in policies.iter_mut() {
            if let Some(s) = by_name.remove(&p.name) {
                p.written = s;
            }
        }
    }
    // What a reader sees is what was written.
    let sample = api.get_status("p0").await?;
    ensure!(
        sample.status.as_ref().and_then(|s| s.state.as_deref()) == Some("warm"),
        "p0's status after the ticks: {:?}",
        sample.status
    );
    times.sort_by(f64::total_cmp);
    println!("policy_tick_status_writes_10k_ms={:.1}", times[TICKS / 2]);
    server.shutdown().await;
    Ok(())
}
