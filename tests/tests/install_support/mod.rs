//! Nemesis installed in the sandbox the way a cluster installs it: the images of
//! `cargo xtask image` (debug binaries the test build made) loaded into a sandbox node,
//! `kubectl apply -k` of `manifests/sandbox/` (the install with the node's image names)
//! plus a kustomization of the run's own (its cgroup, its bpffs, its controller
//! ClusterIP), the Secrets created by hand as manifests/README.md says, and the rollouts
//! waited for with `kubectl rollout status`. The agent DaemonSet's pod runs from its
//! image on the node's network in the run's cgroup; the controller StatefulSet's two
//! pods in their own namespaces; both as their ServiceAccounts, with exactly the
//! shipped RBAC, enforced by the test API server.

#![allow(dead_code, reason = "each test file uses its own subset")]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{DynamicObject, PostParams};
use kube::{Api, Client};
use nemesis_agent::ebpf::cgroup::ChildCgroup;
use nemesis_agent::ebpf::pins::{PinLayout, ScratchBpffs};
use nemesis_agent::ebpf::prereq;
use nemesis_agent::services::scaling_policy_resource;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::demo::cluster_ip::cluster_ip;
use nemesis_tests::kubelet::images::ImageStore;
use nemesis_tests::kubelet::{Sandbox, SandboxOptions};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::wake_support::{CLIENT, ClientResult, SERVER, eventually};

pub const SYSTEM_NS: &str = "nemesis-system";
pub const APP_NS: &str = "shop";
pub const APP: &str = "web";
pub const POD_PORT: u16 = 8080;
pub const SERVICE_PORT: u16 = 80;
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Every kubectl call but the rollouts ends within this.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
/// The rollouts: two images unpacked, three pods started, probes on a loaded machine.
pub const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(240);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is one level below the root")
        .to_path_buf()
}

/// `target/debug`, from this test binary's place (`target/debug/deps/<test>-<hash>`).
fn target_debug() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary lives in target/<profile>/deps")?
        .to_path_buf())
}

/// The debug images (built by `xtask image --debug --no-build` from the binaries the
/// test build made, or found up to date).
pub fn images() -> anyhow::Result<Vec<PathBuf>> {
    let debug = target_debug()?;
    for bin in ["xtask", "nemesis-agent", "nemesis-controller"] {
        ensure!(
            debug.join(bin).exists(),
            "{} is missing: `cargo build -p xtask -p nemesis-agent -p nemesis-controller` \
             (or build the workspace's tests) first",
            debug.join(bin).display()
        );
    }
    let out = std::process::Command::new(debug.join("xtask"))
        .args(["image", "--debug", "--no-build"])
        .output()
        .context("running xtask image")?;
    ensure!(
        out.status.success(),
        "xtask image --debug --no-build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = debug.parent().context("target/")?.join("images/debug");
    Ok(["nemesis-agent", "nemesis-controller"]
        .iter()
        .map(|c| dir.join(format!("{c}-{VERSION}.oci.tar")))
        .collect())
}

/// `<from>` relative to `<to>` (both absolute): kustomize names bases only relatively.
fn relative(to: &Path, from: &Path) -> PathBuf {
    let to: Vec<_> = to.components().collect();
    let from: Vec<_> = from.components().collect();
    let common = to.iter().zip(&from).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

pub struct Installed {
    pub server: Option<TestApiServer>,
    /// The admin's client.
    pub client: Client,
    pub sandbox: Option<Sandbox>,
    pub cgroup: Option<ChildCgroup>,
    pub bpffs: Option<ScratchBpffs>,
    pub kubeconfig: PathBuf,
    /// The run's kustomization (and scratch files).
    pub dir: tempfile::TempDir,
    /// `ClusterIP:80` of the app's Service.
    pub app_addr: SocketAddr,
    /// The node's address: the agent's proxy and admin listen there.
    pub node_ip: Ipv4Addr,
}

impl Installed {
    /// Starts the API server and a node with the images, then installs Nemesis with
    /// `kubectl apply -k` and waits for both rollouts.
    pub async fn install(name: &str) -> anyhow::Result<Self> {
        crate::wake_support::init_tracing();
        let unique = format!("{name}-{}", std::process::id());
        let archives = images()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("nemesis-install-{unique}-"))
            .tempdir()?;
        let store = ImageStore::open(&archives, dir.path().join("images"))?;
        let server = TestApiServer::start(ApiServerOptions::default()).await?;
        let client = server.client().await?;
        let mounts = std::fs::read_to_string("/proc/mounts")?;
        let root = prereq::cgroup2_mount(&mounts).context("a cgroup2 mount (run as root)")?;
        let cg_name = format!("nemesis-install-{unique}");
        let cgroup = ChildCgroup::create(&root, &cg_name).context("creating the test cgroup")?;
        let bpffs = ScratchBpffs::mount(&cg_name).context("mounting a scratch bpffs")?;
        let sandbox = Sandbox::start(
            client.clone(),
            SandboxOptions {
                service_proxy: true,
                pod_cgroup: Some(cgroup.path().to_path_buf()),
                ca_pem: Some(server.ca_pem().to_string()),
                api_server: Some(server.addr()),
                images: Some(Arc::new(store)),
                ..SandboxOptions::default()
            },
        )
        .await?;
        let index = sandbox.subnet_index();
        let controller_ip = cluster_ip(index, 0).context("a ClusterIP of the sandbox's block")?;
        let app_ip = cluster_ip(index, 1).context("a ClusterIP of the sandbox's block")?;
        let node_ip = sandbox.gateway();
        let kubeconfig = server.kubeconfig_path().to_path_buf();
        let env = Installed {
            server: Some(server),
            client,
            sandbox: Some(sandbox),
            cgroup: Some(cgroup),
            bpffs: Some(bpffs),
            kubeconfig,
            dir,
            app_addr: SocketAddr::from((app_ip, SERVICE_PORT)),
            node_ip,
        };
        env.write_kustomization(controller_ip)?;
        let run = env.dir.path().join("run");
        env.kubectl(&["apply", "-k", &run.display().to_string()])
            .await?;
        // The Secret, by hand, as the README's install does (after the apply: the pods
        // wait for them in ContainerCreating).
        env.kubectl(&[
            "-n",
            SYSTEM_NS,
            "create",
            "secret",
            "generic",
            "nemesis-ui-admin",
            "--from-literal=username=admin",
            "--from-literal=password=install-test-password",
        ])
        .await?;
        for target in ["statefulset/nemesis-controller", "daemonset/nemesis-agent"] {
            env.kubectl_within(
                ROLLOUT_TIMEOUT + Duration::from_secs(10),
                &[
                    "-n",
                    SYSTEM_NS,
                    "rollout",
                    "status",
                    target,
                    &format!("--timeout={}s", ROLLOUT_TIMEOUT.as_secs()),
                ],
            )
            .await
            .with_context(|| env.diagnostics())?;
        }
        Ok(env)
    }

    /// The run's kustomization: `manifests/sandbox/` plus this run's cgroup and bpffs
    /// for the agent and a ClusterIP of this sandbox's own for the controller.
    fn write_kustomization(&self, controller_ip: Ipv4Addr) -> anyhow::Result<()> {
        let run = self.dir.path().join("run");
        std::fs::create_dir_all(&run)?;
        let base = relative(&workspace_root().join("manifests/sandbox"), &run);
        let cgroup = self
            .cgroup
            .as_ref()
            .context("cgroup")?
            .path()
            .display()
            .to_string();
        let bpffs = self
            .bpffs
            .as_ref()
            .context("bpffs")?
            .path()
            .display()
            .to_string();
        let text = format!(
            r#"apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata: {{name: nemesis-agent, namespace: {SYSTEM_NS}}}
      spec:
        template:
          spec:
            volumes:
              - {{name: cgroup2, hostPath: {{path: "{cgroup}", type: Directory}}}}
              - {{name: bpffs, hostPath: {{path: "{bpffs}", type: Directory}}}}
  - patch: |-
      apiVersion: v1
      kind: Service
      metadata: {{name: nemesis-controller, namespace: {SYSTEM_NS}}}
      spec: {{clusterIP: "{controller_ip}"}}
"#,
            base = base.display()
        );
        std::fs::write(run.join("kustomization.yaml"), text)?;
        Ok(())
    }

    /// The uninstall's per-node cleanup (`manifests/uninstall/agent-cleanup.yaml`, as
    /// it is) with the node's image names and this run's bpffs: a kustomization in the
    /// run's directory (kustomize takes only files below its own root, hence the copy).
    /// Returns its directory, for `kubectl apply -k` / `delete -k`.
    pub fn write_cleanup_kustomization(&self) -> anyhow::Result<PathBuf> {
        let dir = self.dir.path().join("cleanup");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(
            workspace_root().join("manifests/uninstall/agent-cleanup.yaml"),
            dir.join("agent-cleanup.yaml"),
        )?;
        let bpffs = self
            .bpffs
            .as_ref()
            .context("bpffs")?
            .path()
            .display()
            .to_string();
        std::fs::write(
            dir.join("kustomization.yaml"),
            format!(
                r#"apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - agent-cleanup.yaml
images:
  - name: nemesis-agent
    newName: localhost/nemesis-agent
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata: {{name: nemesis-agent-cleanup, namespace: {SYSTEM_NS}}}
      spec:
        template:
          spec:
            volumes:
              - {{name: bpffs, hostPath: {{path: "{bpffs}", type: Directory}}}}
"#
            ),
        )?;
        Ok(dir)
    }

    /// The run's install kustomization (for `kubectl delete -k`).
    pub fn install_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// The programs attached to the run's cgroup, as `bpftool cgroup show` lists them.
    pub async fn attached_programs(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let cgroup = self.cgroup.as_ref().context("cgroup")?.path().to_path_buf();
        let out = tokio::process::Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(&cgroup)
            .output()
            .await
            .context("running bpftool")?;
        ensure!(
            out.status.success(),
            "bpftool cgroup show {}: {}",
            cgroup.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Vec::new());
        }
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(listed.as_array().cloned().unwrap_or_default())
    }

    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_within(KUBECTL_TIMEOUT, args).await
    }

    pub async fn kubectl_within(&self, within: Duration, args: &[&str]) -> anyhow::Result<String> {
        let child = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting kubectl")?;
        let out = tokio::time::timeout(within, child.wait_with_output())
            .await
            .with_context(|| format!("kubectl {args:?} did not end within {within:?}"))??;
        if !out.status.success() {
            bail!(
                "kubectl {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The pods' container logs, for a failed rollout's message.
    pub fn diagnostics(&self) -> String {
        let Some(sandbox) = &self.sandbox else {
            return String::new();
        };
        let logs = sandbox.work_dir().join("logs");
        let mut out = String::from("container logs:\n");
        for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {}\n", entry.path().display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    pub fn sandbox(&self) -> &Sandbox {
        self.sandbox.as_ref().expect("the sandbox runs")
    }

    /// A Deployment at zero (the pod server, run on the host), its Service on a
    /// ClusterIP of this sandbox's, and a short-form policy that sleeps after `idle`.
    pub async fn app(&self, idle: &str) -> anyhow::Result<()> {
        Api::<Namespace>::all(self.client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": APP_NS}}))?,
            )
            .await
            .context("creating the app's namespace")?;
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": APP, "namespace": APP_NS},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": APP}},
                "template": {
                    "metadata": {"labels": {"app": APP},
                                 "annotations": {"nemesis.test/probe-period-ms": "100"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "containers": [{
                            "name": "server",
                            "image": "local/nemesis-pod-server",
                            "command": [SERVER],
                            "args": ["--port", POD_PORT.to_string()],
                            "ports": [{"name": "http", "containerPort": POD_PORT}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": "http"},
                                               "periodSeconds": 1},
                        }],
                    },
                },
            },
        }))?;
        Api::<Deployment>::namespaced(self.client.clone(), APP_NS)
            .create(&PostParams::default(), &deployment)
            .await
            .context("creating the Deployment")?;
        let ip = self.app_addr.ip().to_string();
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": APP, "namespace": APP_NS},
            "spec": {
                "clusterIP": ip,
                "clusterIPs": [ip],
                "selector": {"app": APP},
                "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http"}],
            },
        }))?;
        Api::<Service>::namespaced(self.client.clone(), APP_NS)
            .create(&PostParams::default(), &service)
            .await
            .context("creating the Service")?;
        let policy = DynamicObject::new(APP, &scaling_policy_resource())
            .within(APP_NS)
            .data(json!({"spec": {
                "target": {"deployment": APP, "service": APP},
                "minReplicas": 0,
                "maxReplicas": 1,
                "idleTimeout": idle,
            }}));
        Api::<DynamicObject>::namespaced_with(
            self.client.clone(),
            APP_NS,
            &scaling_policy_resource(),
        )
        .create(&PostParams::default(), &policy)
        .await
        .context("creating the ScalingPolicy")?;
        Ok(())
    }

    /// The installed agent's pin directory (the DaemonSet's default instance).
    pub fn pins(&self) -> PathBuf {
        PinLayout::new(self.bpffs.as_ref().expect("bpffs").path(), "default")
            .dir()
            .to_path_buf()
    }

    /// The mode of the app's Service in the installed agent's pinned service table
    /// (read with bpftool, as an operator would): `None` when it has no row.
    pub async fn app_mode(&self) -> anyhow::Result<Option<u32>> {
        let map = PinLayout::new(self.bpffs.as_ref().context("bpffs")?.path(), "default")
            .map(nemesis_common::maps::SERVICES);
        if !map.exists() {
            return Ok(None);
        }
        let out = tokio::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&map)
            .output()
            .await
            .context("running bpftool")?;
        ensure!(
            out.status.success(),
            "bpftool map dump {}: {}",
            map.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let std::net::IpAddr::V4(ip) = self.app_addr.ip() else {
            bail!("an IPv4 Service");
        };
        let mut key = vec![0u8; 10];
        key.extend([0xff, 0xff]);
        key.extend(ip.octets());
        key.extend(SERVICE_PORT.to_be_bytes());
        key.push(6);
        for row in rows.as_array().into_iter().flatten() {
            let bytes = |v: &serde_json::Value| -> Vec<u8> {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|b| {
                        b.as_str()
                            .and_then(|s| u8::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                    })
                    .collect()
            };
            let k = bytes(&row["key"]);
            let v = bytes(&row["value"]);
            if k.len() >= key.len() && k[..key.len()] == key[..] && v.len() >= 8 {
                return Ok(Some(u32::from_le_bytes([v[4], v[5], v[6], v[7]])));
            }
        }
        Ok(None)
    }

    /// Waits until the app's Service is held by the installed agent.
    pub async fn wait_held(&self, within: Duration) -> anyhow::Result<()> {
        eventually(
            "the app's Service held in the installed agent's datapath",
            within,
            || async {
                Ok((self.app_mode().await? == Some(nemesis_common::maps::MODE_HOLD)).then_some(()))
            },
        )
        .await
    }

    /// One HTTP client from inside the run's cgroup (where the installed agent's hooks
    /// apply), to the app's ClusterIP; its result.
    pub async fn request(&self, within: Duration) -> anyhow::Result<ClientResult> {
        let mut child = tokio::process::Command::new(CLIENT)
            .args(["--http", "--clients", "1"])
            .args(["--timeout-ms", &within.as_millis().to_string()])
            .arg("--connect")
            .arg(self.app_addr.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning nemesis-test-client")?;
        let pid = child.id().context("the client's pid")?;
        self.cgroup
            .as_ref()
            .context("cgroup")?
            .add_process(pid)
            .context("moving the client into the run's cgroup")?;
        let mut stdin = child.stdin.take().context("client stdin")?;
        stdin.write_all(b"go\n").await?;
        drop(stdin);
        let out = tokio::time::timeout(within + Duration::from_secs(10), child.wait_with_output())
            .await
            .with_context(|| format!("the client did not finish within {within:?}"))??;
        ensure!(
            out.status.success(),
            "nemesis-test-client failed: {}",
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().next().context("one client result")?;
        Ok(serde_json::from_str(line)?)
    }

    pub async fn wait_replicas(&self, want: i32, within: Duration) -> anyhow::Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), APP_NS);
        eventually(&format!("the Deployment at {want}"), within, || async {
            let d = deployments.get(APP).await?;
            let spec = d.spec.replicas;
            let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            Ok((spec == Some(want) && ready == want).then_some(()))
        })
        .await
    }

    /// Stops the node (killing every pod process), the API server, then removes the
    /// cgroup and the scratch bpffs.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(sandbox) = self.sandbox.take() {
            sandbox.shutdown().await.context("stopping the sandbox")?;
        }
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        if let Some(cg) = self.cgroup.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !cg.processes().unwrap_or_default().is_empty()
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cg.remove().context("removing the test cgroup")?;
        }
        drop(self.bpffs.take());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_root() {
        assert_eq!(
            relative(
                Path::new("/work/x/manifests/sandbox"),
                Path::new("/tmp/a/run")
            ),
            PathBuf::from("../../../work/x/manifests/sandbox")
        );
    }
}
