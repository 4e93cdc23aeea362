//! The sandbox cluster in one process, for `cargo xtask demo` and for trying things by
//! hand: the test Kubernetes API server (loopback only) and one simulated node (the
//! kubelet with its controllers, and with `--service-proxy` kube-proxy's part), plus
//! optional manifests applied once it serves. Ctrl-C or SIGTERM stops everything: every
//! pod process is killed and every network namespace, veth and bridge removed.
//!
//! Stdout is the interface (one `KEY=value` per line, in this order): for each port
//! of each applied Service `NEMESIS_SANDBOX_SERVICE=<ns>/<name>:<port name or
//! number>=<ClusterIP>:<port>`, then `NEMESIS_KUBECONFIG=<path>` last, once every
//! manifest is applied. Logs go to stderr.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use kube::ResourceExt;
use kube::api::DynamicObject;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::demo::{apply, cluster_ip};
use nemesis_tests::kubelet::{Sandbox, SandboxOptions};

#[derive(Debug, Parser)]
#[command(
    name = "nemesis-sandbox",
    about = "A sandbox Kubernetes cluster: the test API server and a simulated node (loopback only)"
)]
struct Args {
    /// Directory for the kubeconfig and the pods' scratch directories and logs
    /// (created if missing; `pods/` in it is the node's work directory). Default: a
    /// temporary directory removed on exit.
    #[arg(long, env = "NEMESIS_SANDBOX_DIR")]
    dir: Option<PathBuf>,
    /// Address the API server listens on; must be a loopback address.
    #[arg(long, env = "NEMESIS_SANDBOX_ADDRESS", default_value = "127.0.0.1")]
    address: IpAddr,
    /// API server port; 0 picks a free one.
    #[arg(long, env = "NEMESIS_SANDBOX_PORT", default_value_t = 0)]
    port: u16,
    /// The simulated node's name.
    #[arg(
        long,
        env = "NEMESIS_SANDBOX_NODE_NAME",
        default_value = "nemesis-sandbox"
    )]
    node_name: String,
    /// Serve Service ClusterIPs on loopback as kube-proxy would. Services applied with
    /// `--apply` that ask for no ClusterIP then get one of this sandbox's own, so two
    /// sandboxes never listen on the same address.
    #[arg(long, env = "NEMESIS_SANDBOX_SERVICE_PROXY")]
    service_proxy: bool,
    /// A manifest file or a directory of `*.yaml` files to server-side apply once the
    /// server serves; repeat for several, applied in order.
    #[arg(long = "apply", value_name = "PATH")]
    apply: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "nemesis_tests=info,nemesis_sandbox=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.address.is_loopback() {
        bail!(
            "--address {} is not a loopback address: the sandbox is for this machine only",
            args.address
        );
    }
    // Pods run commands by name, as containers do; the pod server and friends are
    // built next to this binary, so they resolve without anybody setting PATH.
    let path = path_with_own_dir();
    // SAFETY: no other thread exists yet (the runtime starts below), so nothing reads
    // the environment concurrently.
    unsafe { std::env::set_var("PATH", &path) };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(args))
}

fn path_with_own_dir() -> OsString {
    let old = std::env::var_os("PATH").unwrap_or_default();
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
    else {
        return old;
    };
    let mut dirs = vec![dir];
    dirs.extend(std::env::split_paths(&old));
    std::env::join_paths(dirs).unwrap_or(old)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let manifests = apply::read_manifests(&args.apply)?;
    let tempdir;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tempdir = tempfile::Builder::new()
                .prefix("nemesis-sandbox-")
                .tempdir()
                .context("creating a temporary directory")?;
            tempdir.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let server = TestApiServer::start(ApiServerOptions {
        addr: SocketAddr::new(args.address, args.port),
        dir: Some(dir.clone()),
        bookmark_interval: Duration::from_secs(5),
        ..ApiServerOptions::default()
    })
    .await
    .context("starting the test API server")?;
    let client = server.client().await.context("building the API client")?;
    let sandbox = Sandbox::start(
        client.clone(),
        SandboxOptions {
            node_name: args.node_name.clone(),
            work_dir: Some(dir.join("pods")),
            service_proxy: args.service_proxy,
            ..SandboxOptions::default()
        },
    )
    .await
    .context("starting the simulated node")?;

    let mut signals = Signals::install()?;
    let ready = tokio::select! {
        r = apply_and_announce(&client, &sandbox, manifests, args.service_proxy, &server) => r,
        sig = signals.next() => Err(anyhow::anyhow!("{sig} before the sandbox was ready")),
    };
    if ready.is_ok() {
        let sig = signals.next().await;
        tracing::info!(signal = sig, "stopping the sandbox");
    }
    let stopped = sandbox.shutdown().await;
    server.shutdown().await;
    ready?;
    stopped.context("stopping the simulated node")?;
    Ok(())
}

async fn apply_and_announce(
    client: &kube::Client,
    sandbox: &Sandbox,
    mut manifests: Vec<apply::Manifest>,
    service_proxy: bool,
    server: &TestApiServer,
) -> anyhow::Result<()> {
    if service_proxy {
        let index = sandbox.subnet_index();
        let mut ordinal = 0u8;
        apply::assign_cluster_ips(&mut manifests, || {
            let ip = cluster_ip::cluster_ip(index, ordinal);
            ordinal = ordinal.saturating_add(1);
            ip
        })
        .map_err(|origin| {
            anyhow::anyhow!(
                "{origin}: this sandbox has only {} ClusterIPs of its own",
                cluster_ip::BLOCK_SIZE
            )
        })?;
    }
    let applied = apply::apply_all(client, &manifests).await?;
    for obj in &applied {
        for line in service_lines(obj) {
            println!("{line}");
        }
    }
    println!("NEMESIS_KUBECONFIG={}", server.kubeconfig_path().display());
    Ok(())
}

/// `NEMESIS_SANDBOX_SERVICE=...` lines for an applied Service (none for other kinds).
fn service_lines(obj: &DynamicObject) -> Vec<String> {
    let is_service = obj
        .types
        .as_ref()
        .is_some_and(|t| t.kind == "Service" && t.api_version == "v1");
    if !is_service {
        return Vec::new();
    }
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let ip = obj.data["spec"]["clusterIP"].as_str().unwrap_or_default();
    obj.data["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let port = p["port"].as_u64()?;
            let key = p["name"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| port.to_string());
            Some(format!(
                "NEMESIS_SANDBOX_SERVICE={ns}/{name}:{key}={ip}:{port}"
            ))
        })
        .collect()
}

/// SIGINT and SIGTERM, whichever comes first.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse_without_the_environment() {
        let a = Args::try_parse_from([
            "nemesis-sandbox",
            "--dir",
            "/tmp/x",
            "--service-proxy",
            "--apply",
            "a.yaml",
            "--apply",
            "dir",
        ])
        .unwrap();
        assert_eq!(a.dir, Some(PathBuf::from("/tmp/x")));
        assert!(a.service_proxy);
        assert_eq!(a.apply, vec![PathBuf::from("a.yaml"), PathBuf::from("dir")]);
        assert_eq!(a.port, 0);
    }

    #[test]
    fn each_service_port_gets_a_line_and_other_kinds_none() {
        let svc: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "hello", "namespace": "demo"},
            "spec": {"clusterIP": "127.96.128.1",
                     "ports": [{"name": "http", "port": 80}, {"port": 81}]}
        }))
        .unwrap();
        assert_eq!(
            service_lines(&svc),
            vec![
                "NEMESIS_SANDBOX_SERVICE=demo/hello:http=127.96.128.1:80",
                "NEMESIS_SANDBOX_SERVICE=demo/hello:81=127.96.128.1:81",
            ]
        );
        let ns: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}
        }))
        .unwrap();
        assert!(service_lines(&ns).is_empty());
    }
}
