//! The sandbox cluster in one process, for `cargo xtask demo` and for trying things by
//! hand: the test Kubernetes API server (loopback only) and one simulated node (the
//! kubelet with its controllers, and with `--service-proxy` kube-proxy's part), plus
//! optional manifests applied once it serves. Ctrl-C or SIGTERM stops everything: every
//! pod process is killed and every network namespace, veth and bridge removed.
//!
//! Stdout is the interface (one `KEY=value` per line, in this order): for each port
//! of each applied Service `NEMESIS_SANDBOX_SERVICE=<ns>/<name>:<port name or
//! number>=<ClusterIP>:<port>`; with `--service-proxy`,
//! `NEMESIS_SANDBOX_FREE_CLUSTER_IPS=<first>-<last>` (the ClusterIPs of this sandbox's
//! own block that nothing applied took: a Service created later, e.g. by `kubectl
//! apply`, sets `spec.clusterIP` to one of them so that its address is this sandbox's
//! alone); `NEMESIS_SANDBOX_NODE_IP=<address>` (the node's address, as pods see it and
//! `status.hostIP` says); then `NEMESIS_KUBECONFIG=<path>` last, once every manifest is
//! applied. Logs go to stderr.
//!
//! With `--image`, the node has those OCI archives loaded (as after `kind load`): a pod
//! whose container names one runs from it, with its ServiceAccount token and a route to
//! the API server, so `kubectl apply -k manifests/sandbox/` installs Nemesis here.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use kube::ResourceExt;
use kube::api::DynamicObject;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::demo::{apply, cluster_ip};
use nemesis_tests::kubelet::images::ImageStore;
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
    /// Inject API faults on a seeded schedule (chaos tests; off by default):
    /// `seed=<u64>,for=<seconds>[,slow=<seconds>][,users=<user>+<user>]`: 500s, answers
    /// held past the client timeout, watches cut, 410 on watch resumes, 409 on updates.
    #[arg(long, env = "NEMESIS_SANDBOX_FAULTS", value_parser = nemesis_tests::apiserver::faults::FaultPlan::parse)]
    faults: Option<nemesis_tests::apiserver::faults::FaultPlan>,
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
    /// An OCI archive (`cargo xtask image` writes them) the node has loaded, known by
    /// the reference it carries; repeat for several. Containers of other images run
    /// their `command` on the host.
    #[arg(long = "image", value_name = "ARCHIVE")]
    images: Vec<PathBuf>,
    /// The cgroup v2 directory every container process joins, as a node's pods sit
    /// under the cgroup where the Nemesis agent attaches. Default: where the sandbox is.
    #[arg(long, value_name = "DIR", env = "NEMESIS_SANDBOX_POD_CGROUP")]
    pod_cgroup: Option<PathBuf>,
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
    let images = if args.images.is_empty() {
        None
    } else {
        let store = ImageStore::open(&args.images, dir.join("images"))
            .context("loading the node's images")?;
        Some(Arc::new(store))
    };
    let server = TestApiServer::start(ApiServerOptions {
        addr: SocketAddr::new(args.address, args.port),
        dir: Some(dir.clone()),
        bookmark_interval: Duration::from_secs(5),
        faults: args.faults.clone(),
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
            pod_cgroup: args.pod_cgroup.clone(),
            // What in-cluster clients find in a pod: the CA beside the ServiceAccount
            // token, and the API server at KUBERNETES_SERVICE_HOST.
            ca_pem: Some(server.ca_pem().to_string()),
            api_server: Some(server.addr()),
            images,
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
    let mut taken = 0u8;
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
        taken = ordinal;
    }
    let applied = apply::apply_all(client, &manifests).await?;
    for obj in &applied {
        for line in service_lines(obj) {
            println!("{line}");
        }
    }
    if service_proxy && let Some(line) = free_cluster_ips_line(sandbox.subnet_index(), taken) {
        println!("{line}");
    }
    println!("NEMESIS_SANDBOX_NODE_IP={}", sandbox.gateway());
    println!("NEMESIS_KUBECONFIG={}", server.kubeconfig_path().display());
    Ok(())
}

/// `NEMESIS_SANDBOX_FREE_CLUSTER_IPS=<first>-<last>`: the block's ClusterIPs from
/// ordinal `taken` on; `None` when applying took them all.
fn free_cluster_ips_line(index: u16, taken: u8) -> Option<String> {
    let first = cluster_ip::cluster_ip(index, taken)?;
    let last = cluster_ip::cluster_ip(index, cluster_ip::BLOCK_SIZE - 1)?;
    Some(format!("NEMESIS_SANDBOX_FREE_CLUSTER_IPS={first}-{last}"))
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
            "--image",
            "a.oci.tar",
            "--image",
            "b.oci.tar",
            "--pod-cgroup",
            "/sys/fs/cgroup/x",
        ])
        .unwrap();
        assert_eq!(
            a.images,
            vec![PathBuf::from("a.oci.tar"), PathBuf::from("b.oci.tar")]
        );
        assert_eq!(a.pod_cgroup, Some(PathBuf::from("/sys/fs/cgroup/x")));
        assert_eq!(a.dir, Some(PathBuf::from("/tmp/x")));
        assert!(a.service_proxy);
        assert_eq!(a.apply, vec![PathBuf::from("a.yaml"), PathBuf::from("dir")]);
        assert_eq!(a.port, 0);
    }

    #[test]
    fn the_free_cluster_ips_are_the_rest_of_the_block() {
        assert_eq!(
            free_cluster_ips_line(0, 1).as_deref(),
            Some("NEMESIS_SANDBOX_FREE_CLUSTER_IPS=127.96.128.2-127.96.128.62")
        );
        assert_eq!(free_cluster_ips_line(5, cluster_ip::BLOCK_SIZE), None);
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
