//! A controller that starts (or takes over) with policies already in the cluster runs
//! them at once, not at its next periodic resync: until a policy runs, wake-ups for its
//! Service are refused as unmanaged and held clients get a 503.

mod controller_support;

use std::time::Duration;

use controller_support::*;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::PostParams;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::json;

/// Under the supervisor's 10 s resync (its first tick after leading comes 10 s after
/// the term began), well over a start on a loaded machine.
const RUNS_WITHIN: Duration = Duration::from_secs(7);

/// Which of the two initial listings (Deployments, policies) the supervisor sees
/// finish first is a race, so one start proves little: without the fix, 1 of 5 runs
/// of this test caught it on a quiet machine, and a loaded one catches it more often.
const STARTS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_present_at_start_run_without_waiting_for_the_resync() -> anyhow::Result<()> {
    init_tracing();
    for start in 0..STARTS {
        let server = TestApiServer::start(ApiServerOptions::default()).await?;
        let client = server.client().await?;
        install_crd(&client).await?;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
        let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), "default");
        deployments
            .create(&PostParams::default(), &deployment("web", 1))
            .await?;
        policies
            .create(
                &PostParams::default(),
                &policy(
                    "web",
                    json!({
                        "target": {"deployment": "web"},
                        "metrics": {"alerts": ["Busy"]},
                        "initialState": "calm",
                        "states": [
                            {"name": "calm", "replicas": 1},
                            {"name": "busy", "replicas": 2},
                        ],
                        "transitions": [
                            {"from": "calm", "to": "busy", "when": "alert(Busy)"},
                        ],
                    }),
                ),
            )
            .await?;
        let dir = tempfile::tempdir()?;
        let c = start_controller(&server, dir.path(), &[]).await?;
        wait_leading(&c, Duration::from_secs(10)).await?;
        let led = tokio::time::Instant::now();
        wait_state(&policies, "web", "calm", RUNS_WITHIN)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "start {start}: the policy was not run {:?} after leading: {e:#}",
                    led.elapsed()
                )
            })?;
        c.shutdown().await;
    }
    Ok(())
}
