//! The sandbox cleans up after itself: `shutdown` and a plain drop (a test that panics)
//! both leave no process, no network namespace, no veth and no bridge behind, while the
//! pod objects stay in the API as they were. Root required.

mod kubelet_support;

use std::process::Command;
use std::time::Duration;

use kube::api::PostParams;
use kubelet_support::{Env, pod_ready, server_deployment, wait_for};
use serde_json::json;

/// Network namespaces and links of the sandbox on subnet `index`: its bridge, and the
/// `nm<index>p<N>` namespaces and `nm<index>v<N>` veths of its pods.
fn net_objects(index: u16) -> Vec<String> {
    let ours = |name: &str| {
        name == nemesis_tests::netns::bridge_name(index)
            || ["p", "v"].iter().any(|kind| {
                name.strip_prefix(&format!("nm{index}{kind}"))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
    };
    let mut names = Vec::new();
    for args in [&["netns", "list"][..], &["-o", "link", "show"][..]] {
        let out = Command::new("ip").args(args).output().unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = if args[0] == "netns" {
                line.split_whitespace().next()
            } else {
                line.split_whitespace()
                    .nth(1)
                    .map(|n| n.trim_end_matches(':').split('@').next().unwrap_or(""))
            };
            if let Some(n) = name.filter(|n| ours(n)) {
                names.push(n.to_string());
            }
        }
    }
    names
}

/// The subnet index X of a sandbox on 198.(18|19).Y.0/24.
fn subnet_index(subnet: &str) -> u16 {
    let octets: Vec<u16> = subnet
        .split('/')
        .next()
        .unwrap()
        .split('.')
        .map(|o| o.parse().unwrap())
        .collect();
    (octets[1] - 18) * 256 + octets[2]
}

async fn two_ready_pods(env: &Env) -> anyhow::Result<()> {
    env.deployments()
        .create(
            &PostParams::default(),
            &server_deployment("app", 2, &[], json!({}), 30),
        )
        .await?;
    wait_for("two ready pods", Duration::from_secs(30), || async {
        let pods = env.running_pods().await?;
        Ok((pods.len() == 2 && pods.iter().all(pod_ready)).then_some(()))
    })
    .await?;
    assert_eq!(env.processes().len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_every_process_and_removes_every_namespace() -> anyhow::Result<()> {
    let env = Env::start("kubelet-shutdown").await?;
    two_ready_pods(&env).await?;
    let index = subnet_index(&env.sandbox.subnet());
    // Bridge, two namespaces, two veths.
    assert_eq!(net_objects(index).len(), 5, "{:?}", net_objects(index));
    let Env {
        server,
        client,
        sandbox,
        ns,
    } = env;
    let work_dir = sandbox.work_dir().to_path_buf();
    // Shutdown is quick even with a 30 s grace period: the node goes, not the pods.
    tokio::time::timeout(Duration::from_secs(10), sandbox.shutdown()).await??;
    assert_eq!(
        kubelet_support::processes_with_env(&format!("POD_NAMESPACE={ns}")),
        Vec::<u32>::new()
    );
    assert_eq!(net_objects(index), Vec::<String>::new());
    assert!(!work_dir.exists(), "{} left behind", work_dir.display());
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, &ns);
    assert_eq!(
        pods.list(&Default::default()).await?.items.len(),
        2,
        "pods stay in the API"
    );
    server.shutdown().await;
    Ok(())
}

#[test]
fn dropping_the_sandbox_without_shutdown_still_cleans_up() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (index, ns, work_dir) = runtime.block_on(async {
        let env = Env::start("kubelet-drop").await?;
        two_ready_pods(&env).await?;
        let found = (
            subnet_index(&env.sandbox.subnet()),
            env.ns.clone(),
            env.sandbox.work_dir().to_path_buf(),
        );
        drop(env);
        anyhow::Ok(found)
    })?;
    // As when a test panics: the runtime goes down with the sandbox's tasks in it.
    drop(runtime);
    assert_eq!(
        kubelet_support::processes_with_env(&format!("POD_NAMESPACE={ns}")),
        Vec::<u32>::new()
    );
    assert_eq!(net_objects(index), Vec::<String>::new());
    assert!(!work_dir.exists(), "{} left behind", work_dir.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_api_server_run_their_own_pods_on_their_own_subnets() -> anyhow::Result<()>
{
    use kubelet_support::{PORT, SERVER, http_get, pod_ip};
    use nemesis_tests::kubelet::{Sandbox, SandboxOptions};

    let env = Env::start("kubelet-nodes").await?;
    let second = Sandbox::start(
        env.client.clone(),
        SandboxOptions {
            node_name: "node-b".into(),
            controllers: false,
            adopt_unbound_pods: false,
            ..Default::default()
        },
    )
    .await?;
    assert_ne!(second.subnet(), env.sandbox.subnet());
    env.deployments()
        .create(
            &PostParams::default(),
            &server_deployment("on-a", 1, &[], json!({}), 5),
        )
        .await?;
    let bare: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "on-b", "labels": {"app": "on-b"}},
        "spec": {
            "nodeName": "node-b",
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "server",
                "image": "local/nemesis-pod-server",
                "command": [SERVER],
                "args": ["--port", PORT.to_string()],
                "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 1},
            }],
        },
    }))?;
    env.pods().create(&PostParams::default(), &bare).await?;
    let pods = wait_for("two ready pods", Duration::from_secs(30), || async {
        let pods = env.running_pods().await?;
        Ok((pods.len() == 2 && pods.iter().all(pod_ready)).then_some(pods))
    })
    .await?;
    let in_subnet = |ip: std::net::Ipv4Addr, subnet: &str| {
        subnet.starts_with(&format!(
            "{}.{}.{}.",
            ip.octets()[0],
            ip.octets()[1],
            ip.octets()[2]
        ))
    };
    for pod in &pods {
        let ip = pod_ip(pod).unwrap();
        let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
        let expected = if node == "node-b" {
            second.subnet()
        } else {
            assert_eq!(node, env.sandbox.node_name());
            env.sandbox.subnet()
        };
        assert!(
            in_subnet(ip, &expected),
            "{ip} of a pod on {node} is not in {expected}"
        );
        let body = http_get(std::net::SocketAddr::from((ip, PORT)))?;
        assert_eq!(body.trim(), pod.metadata.name.as_deref().unwrap());
    }
    second.shutdown().await?;
    env.shutdown().await
}
