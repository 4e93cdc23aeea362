//! Balance mode's same-zone preference with the sandbox's real topology: the agent's
//! node is in zone A (its Node's `topology.kubernetes.io/zone` label, which the agent
//! reads at start), one backend runs on another node of zone A and one on a node of
//! zone B (two more sandbox kubelets on the same API server). The sandbox's
//! EndpointSlice controller gives each endpoint its pod's `nodeName` and that Node's
//! zone, as Kubernetes does; from those the agent tiers the backends, and with
//! `preferSameZone` its balanced connects go to the zone-A backend until it carries
//! well above the other (twice its load plus four), then spill over to zone B.

mod wake_support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, PostParams};
use nemesis_agent::ebpf::{Mode, Proto};
use nemesis_tests::kubelet::{Sandbox, SandboxOptions};
use serde_json::json;
use wake_support::{
    APP, Clients, NS, Options, POD_PORT, Scenario, WakeEnv, eventually, quick_server,
};

const ZONE_A: &str = "zone-a";
const ZONE_B: &str = "zone-b";

/// A second kubelet on the test's API server: runs only the pods bound to it.
async fn node(env: &WakeEnv, name: &str, zone: &str) -> anyhow::Result<Sandbox> {
    Ok(Sandbox::start(
        env.client.clone(),
        SandboxOptions {
            node_name: name.into(),
            namespace: Some(NS.into()),
            controllers: false,
            adopt_unbound_pods: false,
            zone: Some(zone.into()),
            ..SandboxOptions::default()
        },
    )
    .await?)
}

/// A pod of the Service (the app's labels and server) bound to `node`.
async fn backend(env: &WakeEnv, name: &str, node: &str) -> anyhow::Result<()> {
    let server = quick_server();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NS, "labels": {"app": APP},
                     "annotations": server["annotations"]},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [server["container"]],
        },
    }))?;
    Api::<Pod>::namespaced(env.client.clone(), NS)
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {name} on {node}"))?;
    Ok(())
}

/// `(nodeName, zone)` of the Service's ready endpoints, by address.
async fn placements(
    env: &WakeEnv,
) -> anyhow::Result<Vec<(String, Option<String>, Option<String>)>> {
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={APP}"));
    let mut out: Vec<_> = Api::<EndpointSlice>::namespaced(env.client.clone(), NS)
        .list(&lp)
        .await?
        .items
        .into_iter()
        .flat_map(|s| s.endpoints.unwrap_or_default())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .map(|e| (e.addresses[0].clone(), e.node_name, e.zone))
        .collect();
    out.sort();
    Ok(out)
}

/// Open connections the agent's datapath counts on `near` and `far`.
fn loads(env: &WakeEnv, near: SocketAddr, far: SocketAddr) -> anyhow::Result<(u64, u64)> {
    let list = env
        .agent()
        .datapath()
        .backends(env.service_addr, Proto::Tcp)?;
    let of = |a: SocketAddr| list.iter().find(|b| b.addr == a).map_or(0, |b| b.open_now);
    Ok((of(near), of(far)))
}

/// Waits until the datapath counts `n` open connections in all.
async fn wait_total(
    env: &WakeEnv,
    near: SocketAddr,
    far: SocketAddr,
    n: u64,
) -> anyhow::Result<(u64, u64)> {
    eventually(
        &format!("{n} open connections counted"),
        Duration::from_secs(30),
        || async {
            let (a, b) = loads(env, near, far)?;
            Ok((a + b == n).then_some((a, b)))
        },
    )
    .await
}

/// Long connections (open for two minutes) from the test's cgroup.
async fn long_connections(env: &WakeEnv, n: usize) -> anyhow::Result<Clients> {
    env.clients(&["--clients", &n.to_string(), "--give-up-after", "120000"])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_connects_prefer_the_agents_zone_then_spill_over() -> anyhow::Result<()> {
    let env = WakeEnv::start_with_agent_flags(
        Scenario {
            name: "lb-zones",
            pod: quick_server(),
            policy: json!({"loadBalancing": {"preferSameZone": true}}),
            scale_on_wake: false,
        },
        Options {
            node_zone: Some(ZONE_A.into()),
            ..Options::default()
        },
        &[("--direct-mode", "balance".to_string())],
    )
    .await?;
    // The Deployment stays at zero: no backend on the agent's own node, so what is
    // preferred is the zone, not the node.
    let near_node = format!("lbz-a-{}", std::process::id());
    let far_node = format!("lbz-b-{}", std::process::id());
    let node_a = node(&env, &near_node, ZONE_A).await?;
    let node_b = node(&env, &far_node, ZONE_B).await?;
    backend(&env, "near", &near_node).await?;
    backend(&env, "far", &far_node).await?;

    // The slices say where each endpoint runs, from the pods and their Nodes.
    let placed = eventually(
        "two ready endpoints in the Service's slices",
        Duration::from_secs(60),
        || async {
            let p = placements(&env).await?;
            Ok((p.len() == 2).then_some(p))
        },
    )
    .await?;
    let ip_of = |node: &str| -> anyhow::Result<SocketAddr> {
        let (ip, _, _) = placed
            .iter()
            .find(|(_, n, _)| n.as_deref() == Some(node))
            .with_context(|| format!("an endpoint on {node}: {placed:?}"))?;
        Ok(SocketAddr::new(ip.parse()?, POD_PORT))
    };
    let (near, far) = (ip_of(&near_node)?, ip_of(&far_node)?);
    for (node, zone) in [(&near_node, ZONE_A), (&far_node, ZONE_B)] {
        assert!(
            placed
                .iter()
                .any(|(_, n, z)| n.as_deref() == Some(node.as_str()) && z.as_deref() == Some(zone)),
            "the endpoint on {node} has zone {zone}: {placed:?}"
        );
    }

    env.wait_mode(Mode::Balance).await?;
    eventually(
        "both backends in the datapath",
        Duration::from_secs(60),
        || async {
            let list = env
                .agent()
                .datapath()
                .backends(env.service_addr, Proto::Tcp)?;
            let mut addrs: Vec<SocketAddr> = list.iter().map(|b| b.addr).collect();
            addrs.sort();
            let mut want = vec![near, far];
            want.sort();
            Ok((addrs == want).then_some(()))
        },
    )
    .await?;

    // Below the spill-over bound every connect stays in the zone (two choices over the
    // two backends alone would split them about evenly).
    let mut held = vec![long_connections(&env, 5).await?];
    let (a, b) = wait_total(&env, near, far, 5).await?;
    assert_eq!(
        (a, b),
        (5, 0),
        "five connects from zone A: (zone A, zone B)"
    );

    // Then, one by one (so each sees the last one counted), the zone-A backend takes
    // connects while it carries at most twice zone B's plus four: the rest spill over.
    for i in 0..10u64 {
        held.push(long_connections(&env, 1).await?);
        wait_total(&env, near, far, 6 + i).await?;
    }
    let (a, b) = loads(&env, near, far)?;
    assert!(
        b >= 2,
        "connects spilled over to zone B once zone A was loaded: ({a}, {b})"
    );
    assert!(
        a > 2 * b && a <= 2 * b + 5,
        "zone A kept the connects up to twice zone B's load plus four: ({a}, {b})"
    );

    drop(held);
    node_a
        .shutdown()
        .await
        .context("stopping the zone-A node")?;
    node_b
        .shutdown()
        .await
        .context("stopping the zone-B node")?;
    env.shutdown().await
}
