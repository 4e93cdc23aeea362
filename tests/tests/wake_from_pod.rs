//! A held connect from a POD's network namespace reaches the proxy. The hook rewrites
//! the connect in the client's own namespace, where 127.0.0.1 is the pod's loopback, so
//! the agent redirects to the node IP as pods see it: here the sandbox bridge's address
//! (what the sandbox reports as `status.hostIP`), with the proxy listening there. The
//! client is a process in a namespace of its own, attached to the sandbox's bridge like
//! a pod (an address from its 198.18.0.0/15 subnet) and in the intercepted cgroup; a
//! host-network client goes through the same node-IP redirect beside it.
//!
//! Only the hold path is covered: once the Service is warm (passthrough), a client in a
//! pod namespace cannot reach the sandbox's loopback ClusterIP at all (the sandbox has
//! no kube-proxy inside pod namespaces), which says nothing about the agent.

mod wake_support;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context as _;
use nemesis_agent::ebpf::Mode;
use nemesis_tests::netns::{bridge_name, netns_name, pod_address, veth_name};
use serde_json::json;
use wake_support::{Scenario, WakeEnv, slow_server};

/// Host number of the client's namespace in the sandbox's /24: the sandbox hands out
/// pod addresses from .2 upwards, so the top one stays clear of its pods.
const CLIENT_HOST: u8 = 254;
const POD_CLIENTS: usize = 3;
const HOST_CLIENTS: usize = 2;

/// A network namespace wired as the sandbox wires a pod's: a veth into the sandbox's
/// bridge, `eth0` with an address of its subnet, a default route via the bridge. Named
/// as the sandbox names its own, so a sandbox that outlives a failed test removes it.
struct ClientNetns {
    name: String,
    veth: String,
}

impl ClientNetns {
    async fn create(subnet: u16, gateway: Ipv4Addr) -> anyhow::Result<(Self, Ipv4Addr)> {
        let ns = Self {
            name: netns_name(subnet, CLIENT_HOST),
            veth: veth_name(subnet, CLIENT_HOST),
        };
        let addr = pod_address(subnet, CLIENT_HOST);
        let cidr = format!("{addr}/24");
        let gw = gateway.to_string();
        let (n, v, bridge) = (ns.name.as_str(), ns.veth.as_str(), bridge_name(subnet));
        let steps: [&[&str]; 7] = [
            &["netns", "add", n],
            &[
                "link", "add", v, "type", "veth", "peer", "name", "eth0", "netns", n,
            ],
            &["link", "set", v, "master", &bridge, "up"],
            &["-n", n, "addr", "add", &cidr, "dev", "eth0"],
            &["-n", n, "link", "set", "eth0", "up"],
            &["-n", n, "link", "set", "lo", "up"],
            &["-n", n, "route", "add", "default", "via", &gw],
        ];
        for args in steps {
            ip(args).await?;
        }
        Ok((ns, addr))
    }
}

impl Drop for ClientNetns {
    fn drop(&mut self) {
        for args in [["link", "del", &self.veth], ["netns", "del", &self.name]] {
            let _ = std::process::Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

async fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new("ip")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("`ip {}` timed out", args.join(" ")))??;
    anyhow::ensure!(
        out.status.success(),
        "`ip {}`: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_connect_from_a_pod_namespace_is_redirected_to_the_node_ip_and_served()
-> anyhow::Result<()> {
    let mut env = WakeEnv::start(Scenario {
        name: "frompod",
        pod: slow_server(),
        policy: json!({}),
        scale_on_wake: true,
    })
    .await?;
    let sandbox = env.sandbox.as_ref().context("the sandbox")?;
    let (subnet, node_ip) = (sandbox.subnet_index(), sandbox.gateway());

    // The agent as the DaemonSet runs it: `--proxy-v4 $(NODE_IP):<port>`.
    env.restart_agent_with(&[("--proxy-v4", format!("{node_ip}:0"))])
        .await?;
    env.wait_mode(Mode::Hold).await?;
    assert_eq!(*env.agent().proxy_v4().ip(), node_ip);

    let (netns, client_ip) = ClientNetns::create(subnet, node_ip).await?;
    tracing::info!(%client_ip, %node_ip, "client namespace ready");

    // Both at once, so that one wake-up serves them all.
    let from_pod = env
        .clients_in_netns(
            &netns.name,
            &["--clients", &POD_CLIENTS.to_string(), "--http"],
        )
        .await?;
    let from_host = env
        .clients(&["--clients", &HOST_CLIENTS.to_string(), "--http"])
        .await?;
    let from_pod = from_pod.finish(Duration::from_secs(30)).await?;
    let from_host = from_host.finish(Duration::from_secs(30)).await?;

    let pods = env.pod_names().await?;
    assert_eq!(pods.len(), 1, "one pod woken: {pods:?}");
    let expected = format!("{}\n", pods[0]);
    assert_eq!(from_pod.len(), POD_CLIENTS);
    assert_eq!(from_host.len(), HOST_CLIENTS);
    for (side, r) in from_pod
        .iter()
        .map(|r| ("pod", r))
        .chain(from_host.iter().map(|r| ("host", r)))
    {
        let resp = r.http().with_context(|| format!("a {side} client"))?;
        assert_eq!(resp.status, 200, "{side} client {}: {resp:?}", r.client);
        assert_eq!(resp.body, expected, "{side} client {}", r.client);
    }

    let m = env.metrics().await?;
    assert_eq!(
        m.outcome("forwarded"),
        (POD_CLIENTS + HOST_CLIENTS) as f64,
        "every client went through the proxy"
    );
    assert_eq!(
        m.outcome("unknown_destination"),
        0.0,
        "the pod's connects were found under the pod's own address"
    );
    assert_eq!(env.controller.wakes(), 1, "one wake-up");

    drop(netns);
    env.shutdown().await
}
