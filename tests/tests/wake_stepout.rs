//! Issue 9 point 4 end to end (real agent, real eBPF, sandbox, real HTTP clients and
//! server from hyper): a connection held while its Service was at zero leaves the
//! agent's proxy once the Service is warm. A keep-alive HTTP/1.1 client gets
//! `Connection: close` on the response in flight and its follow-up requests connect
//! direct; an HTTP/2 client (prior knowledge) gets a GOAWAY and its next request
//! connects direct; the proxy's forwarded connections and bytes stop growing. An agent
//! update (a second agent taking over on the same port, as a DaemonSet rollout does)
//! steps held HTTP connections out the same way instead of cutting them at the end of
//! `--shutdown-grace`.

mod wake_support;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};
use wake_support::{
    ClientResult, Metrics, Options, POD_PORT, SERVER, Scenario, WakeEnv, eventually, http_get,
};

/// A pod serving keep-alive HTTP/1.1 and HTTP/2 (hyper), ready half a second after it
/// starts.
fn hyper_server() -> Value {
    json!({
        "annotations": {
            "nemesis.test/start-delay-ms": "500",
            "nemesis.test/probe-period-ms": "100",
        },
        "container": {
            "name": "server",
            "image": "local/nemesis-pod-server",
            "command": [SERVER],
            "args": ["--port", POD_PORT.to_string(), "--hyper"],
            "ports": [{"name": "http", "containerPort": POD_PORT}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        }
    })
}

fn stepped_out(m: &Metrics, how: &str) -> f64 {
    m.sum("nemesis_agent_proxy_stepped_out_total", &[("how", how)])
}

fn proxied_bytes(m: &Metrics) -> f64 {
    m.sum("nemesis_agent_proxy_transferred_bytes_total", &[])
}

/// Every request answered 200 by the one pod; returns the connection (client's end)
/// of each.
async fn all_served(env: &WakeEnv, results: &[ClientResult]) -> anyhow::Result<Vec<String>> {
    let pods = env.pod_names().await?;
    anyhow::ensure!(pods.len() == 1, "{pods:?}");
    let expected = format!("{}\n", pods[0]);
    let mut locals = Vec::new();
    for r in results {
        anyhow::ensure!(
            r.result == "response" && r.status == Some(200) && r.text == expected,
            "request {} not served: {r:?}",
            r.client
        );
        locals.push(r.local.clone().context("the connection's local address")?);
    }
    Ok(locals)
}

/// The connections the requests ran on, one after the other (a client never goes back
/// to an earlier one): how many requests each carried.
fn connections_in_turn(locals: &[String]) -> anyhow::Result<Vec<usize>> {
    let mut runs: Vec<(&String, usize)> = Vec::new();
    for l in locals {
        match runs.last_mut() {
            Some((last, n)) if *last == l => *n += 1,
            _ => {
                anyhow::ensure!(
                    runs.iter().all(|(seen, _)| *seen != l),
                    "back to an earlier connection: {locals:?}"
                );
                runs.push((l, 1));
            }
        }
    }
    Ok(runs.into_iter().map(|(_, n)| n).collect())
}

/// Runs one held client of `mode` (`--keep-alive` or `--h2`) through a wake-up and
/// checks that it steps out: returns its results.
async fn held_client_steps_out(
    name: &'static str,
    mode: &str,
    how: &str,
) -> anyhow::Result<Vec<ClientResult>> {
    let env = WakeEnv::start(Scenario {
        name,
        pod: hyper_server(),
        policy: json!({}),
        scale_on_wake: true,
    })
    .await?;
    // Held at zero, woken, forwarded; the Service goes direct 2 s after its pod is
    // ready (--direct-after-ready), well before the last request.
    let clients = env
        .clients(&[mode, "30", "--interval-ms", "300", "--timeout-ms", "30000"])
        .await?;
    let frozen = eventually(
        "the held connection to step out of the proxy",
        Duration::from_secs(30),
        || async {
            let m = env.metrics().await?;
            Ok((stepped_out(&m, how) == 1.0 && m.proxy_open() == 0.0).then(|| proxied_bytes(&m)))
        },
    )
    .await?;
    let results = clients.finish(Duration::from_secs(60)).await?;
    let locals = all_served(&env, &results).await?;
    let runs = connections_in_turn(&locals)?;
    assert_eq!(runs.len(), 2, "held, then direct: {locals:?}");
    assert!(
        runs[1] >= 3,
        "follow-up requests on the new connection: {} of {}",
        runs[1],
        results.len()
    );

    let m = env.metrics().await?;
    assert_eq!(
        m.outcome("forwarded"),
        1.0,
        "only the held connection went through the proxy"
    );
    assert_eq!(
        proxied_bytes(&m),
        frozen,
        "the proxy moved no byte once the connection stepped out"
    );
    assert_eq!(m.ebpf_connects(), 2.0, "two connects: held, then direct");
    assert_eq!(m.proxy_open(), 0.0);
    env.shutdown().await?;
    Ok(results)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_keep_alive_client_gets_connection_close_and_its_next_requests_go_direct()
-> anyhow::Result<()> {
    let results = held_client_steps_out("so-http1", "--keep-alive", "connection_close").await?;
    let closes: Vec<usize> = results
        .iter()
        .filter(|r| r.connection.as_deref() == Some("close"))
        .map(|r| r.client)
        .collect();
    assert_eq!(
        closes.len(),
        1,
        "one response carried the close: {closes:?}"
    );
    let locals: Vec<&Option<String>> = results.iter().map(|r| &r.local).collect();
    assert_ne!(
        locals[closes[0]],
        locals[closes[0] + 1],
        "the request after it opened a new connection"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_h2_client_gets_goaway_and_its_next_request_goes_direct() -> anyhow::Result<()> {
    held_client_steps_out("so-h2", "--h2", "goaway").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_update_steps_held_http_connections_out_instead_of_cutting_them()
-> anyhow::Result<()> {
    const GRACE: Duration = Duration::from_secs(30);
    // The Service stays held all along (the hand-over to the Service proxy is never
    // over), so only the agent's update can move the connections out of A's proxy.
    // Passthrough: balance mode goes direct at readiness whatever
    // `--direct-after-ready` says.
    let mut env = WakeEnv::start_with_agent_flags(
        Scenario {
            name: "so-update",
            pod: hyper_server(),
            policy: json!({}),
            scale_on_wake: true,
        },
        Options::default(),
        &[
            ("--direct-after-ready", "10m".into()),
            ("--direct-mode", "passthrough".into()),
        ],
    )
    .await?;
    // Busy clients (a request every 200 ms) for longer than A's stop may take: without
    // stepping out, A would wait for them to end (or for the grace).
    let args = ["90", "--interval-ms", "200", "--timeout-ms", "30000"];
    let mut sets = env
        .clients_together(&[
            &[&["--keep-alive"][..], &args].concat(),
            &[&["--h2"][..], &args].concat(),
        ])
        .await?;
    let h2 = sets.pop().context("h2 client")?;
    let http1 = sets.pop().context("keep-alive client")?;
    eventually(
        "A to forward both held connections",
        Duration::from_secs(30),
        || async {
            let m = env.metrics().await?;
            Ok((m.outcome("forwarded") == 2.0 && m.proxy_open() == 2.0).then_some(()))
        },
    )
    .await?;

    // B beside A on the same port, ready; then A is stopped as the kubelet stops it.
    let port = env.agent().proxy_v4();
    let b = env
        .start_second_agent(&[("--proxy-v4", port.to_string())])
        .await?;
    eventually("B to be ready", Duration::from_secs(10), || async {
        Ok((http_get(b.admin_addr(), "/readyz").await?.0 == 200).then_some(()))
    })
    .await?;
    let mut a = env.agent.take().context("agent A")?;
    a.set_detach_on_exit(false);
    a.set_shutdown_grace(GRACE);
    let a_stopping = tokio::spawn(async move {
        let started = Instant::now();
        a.shutdown().await.map(|()| started.elapsed())
    });
    eventually("B to take over", Duration::from_secs(10), || async {
        Ok(b.is_active().then_some(()))
    })
    .await?;
    env.agent = Some(b);
    let took = tokio::time::timeout(GRACE + Duration::from_secs(10), a_stopping)
        .await
        .context("A did not stop")???;
    assert!(
        took < Duration::from_secs(10),
        "A stopped after {took:?}: its HTTP connections stepped out instead of being cut at \
         the {GRACE:?} grace"
    );

    // Every request served, none cut: the clients moved on to new connections (through
    // B's proxy while the Service is held there, or direct once B has it go direct).
    let http1 = http1.finish(Duration::from_secs(60)).await?;
    let h2 = h2.finish(Duration::from_secs(60)).await?;
    for results in [&http1, &h2] {
        let locals = all_served(&env, results).await?;
        let runs = connections_in_turn(&locals)?;
        assert!(runs.len() >= 2, "A's connection ended: {locals:?}");
    }
    // The keep-alive client is busy (a request every 200 ms): A's connection ended with
    // the close on a response, not by being closed under it.
    let first_run = connections_in_turn(&all_served(&env, &http1).await?)?[0];
    assert_eq!(
        http1[first_run - 1].connection.as_deref(),
        Some("close"),
        "the last response on A's connection: {:?}",
        http1[first_run - 1]
    );
    tracing::info!(?took, "A stopped once its HTTP connections stepped out");
    env.shutdown().await
}
