//! Shared set-up for the kubelet tests: a test API server with a sandbox on it, a
//! namespace of the test's own (so processes can be found by their `POD_NAMESPACE`),
//! and small waits and probes of the real system (/proc, sockets).

#![allow(dead_code, reason = "each test file uses its own subset")]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::kubelet::{Sandbox, SandboxOptions};
use serde_json::json;

/// The pod server binary the manifests run.
pub const SERVER: &str = env!("CARGO_BIN_EXE_nemesis-pod-server");
pub const PORT: u16 = 8080;

pub struct Env {
    pub server: TestApiServer,
    pub client: Client,
    pub sandbox: Sandbox,
    pub ns: String,
}

impl Env {
    pub async fn start(prefix: &str) -> anyhow::Result<Self> {
        Self::start_with(prefix, SandboxOptions::default()).await
    }

    pub async fn start_with(prefix: &str, mut opts: SandboxOptions) -> anyhow::Result<Self> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "nemesis_tests=info".into()),
            )
            .with_test_writer()
            .try_init();
        let server = TestApiServer::start(ApiServerOptions::default()).await?;
        let client = server.client().await?;
        let ns = format!("{prefix}-{}", std::process::id());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
            )
            .await
            .context("creating the test namespace")?;
        opts.ca_pem
            .get_or_insert_with(|| server.ca_pem().to_owned());
        let sandbox = Sandbox::start(client.clone(), opts).await?;
        Ok(Self {
            server,
            client,
            sandbox,
            ns,
        })
    }

    pub fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn slices(&self) -> Api<EndpointSlice> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Scales through the `/scale` subresource, as `kubectl scale` and Nemesis do.
    pub async fn scale(&self, name: &str, replicas: i32) -> anyhow::Result<()> {
        self.deployments()
            .patch_scale(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .with_context(|| format!("scaling {name} to {replicas}"))?;
        Ok(())
    }

    pub async fn running_pods(&self) -> anyhow::Result<Vec<Pod>> {
        Ok(self.pods().list(&ListParams::default()).await?.items)
    }

    /// The endpoints (address, ready, serving, terminating) of the Service's slices.
    pub async fn endpoints(
        &self,
        service: &str,
    ) -> anyhow::Result<Vec<(String, bool, bool, bool)>> {
        let slices = self
            .slices()
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
            .await?;
        let mut out = Vec::new();
        for slice in slices.items {
            for e in slice.endpoints.into_iter().flatten() {
                let c = e.conditions.unwrap_or_default();
                out.push((
                    e.addresses.join(","),
                    c.ready.unwrap_or(false),
                    c.serving.unwrap_or(false),
                    c.terminating.unwrap_or(false),
                ));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Processes started for pods of this test's namespace, found in /proc by their env.
    pub fn processes(&self) -> Vec<u32> {
        processes_with_env(&format!("POD_NAMESPACE={}", self.ns))
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.sandbox.shutdown().await?;
        self.server.shutdown().await;
        Ok(())
    }
}

/// A Deployment running the pod server with an HTTP readiness probe on a 100 ms period.
pub fn server_deployment(
    name: &str,
    replicas: i32,
    extra_args: &[&str],
    annotations: serde_json::Value,
    grace_seconds: i64,
) -> Deployment {
    let mut annotations = annotations;
    annotations["nemesis.test/probe-period-ms"] = json!("100");
    let mut args = vec!["--port".to_string(), PORT.to_string()];
    args.extend(extra_args.iter().map(|a| a.to_string()));
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": annotations},
                "spec": {
                    "terminationGracePeriodSeconds": grace_seconds,
                    "containers": [{
                        "name": "server",
                        "image": "local/nemesis-pod-server",
                        "command": [SERVER],
                        "args": args,
                        "ports": [{"name": "http", "containerPort": PORT}],
                        "readinessProbe": {
                            "httpGet": {"path": "/", "port": "http"},
                            "periodSeconds": 1,
                        },
                    }],
                },
            },
        },
    }))
    .expect("valid deployment")
}

pub fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "web", "port": 80, "targetPort": "http"}],
        },
    }))
    .expect("valid service")
}

/// Polls `check` every 50 ms until it yields `Some`, or fails after `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > within {
            anyhow::bail!(
                "timed out after {within:?} waiting for {what} (last error: {last_err:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One HTTP GET to `addr`, returning the body.
pub fn http_get(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP response from {addr}: {response:?}"))?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{addr} answered {head}");
    Ok(body.to_string())
}

/// Pids whose environment holds `entry` (`NAME=value`).
pub fn processes_with_env(entry: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for proc_entry in dir.flatten() {
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(proc_entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|v| v == entry.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

pub fn pod_ip(pod: &Pod) -> Option<std::net::Ipv4Addr> {
    pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
