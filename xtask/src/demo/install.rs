//! The demo's default mode: Nemesis installed in the sandbox the way a cluster installs
//! it. The images of `cargo xtask image` (built from the demo's binaries) are loaded into
//! the sandbox's node; `kubectl apply -k` of a kustomization of the demo's own over
//! `manifests/sandbox/` (its cgroup, bpffs, agent instance and controller ClusterIP)
//! brings up the agent DaemonSet and the controller StatefulSet; the Secrets are created
//! with `kubectl create secret` as manifests/README.md says. Owns that kustomization and
//! the kubectl calls; the processes, cgroup and bpffs stay the parent module's.

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{
    Demo, POLL, UI_USER, bpffs, cgroup, http_get, random_hex, signals, spawn_child, write_secret,
};
use crate::util::{describe, root};

const SYSTEM_NS: &str = "nemesis-system";
/// The controller's API port (the UI too), as its Service `nemesis-controller` has it.
const CONTROLLER_PORT: u16 = 8080;
/// One kubectl call against the local sandbox: well under a second when idle.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Both rollouts: two images unpacked, two pods started and probed, eBPF loaded, a
/// Lease won, on a loaded machine.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(300);
/// After the rollouts: the agent's programs pinned, the leader's label on its pod, the
/// policy's first evaluation and the hold published.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The label the controller puts on the EndpointSlices that hold a Service at zero.
const HOLD_SLICE_SELECTOR: &str = "endpointslice.kubernetes.io/managed-by=controller.nemesis.dev";

impl Demo {
    /// Images, sandbox with them loaded, `kubectl apply -k`, the Secrets, the rollouts,
    /// the demo's policy; then the contract lines.
    pub(super) fn start_installed(
        &mut self,
        agent_bin: &Path,
        controller_bin: &Path,
    ) -> Result<()> {
        for bin in [agent_bin, controller_bin] {
            if !bin.exists() {
                bail!("{} is missing: the images are built from it", bin.display());
            }
        }
        let started = Instant::now();
        let images_dir = self.layout.images_dir();
        note!(
            "demo: images from {} into {}",
            self.layout.bin_dir.display(),
            images_dir.display()
        );
        let archives = crate::image::build_from(&self.layout.bin_dir, &images_dir)
            .context("building the images")?;
        note!("demo: images ready in {:.1?}", started.elapsed());
        signals::check()?;

        // The pods' cgroup (the agent's "node root") and bpffs exist before the sandbox:
        // the DaemonSet mounts them as hostPath directories. A previous run killed before
        // its clean-up left its cgroup (its pins went with its bpffs, unmounted by
        // `prepare`).
        let cgroup = cgroup::path(&self.layout.cgroup_name())?;
        if cgroup.exists() {
            cgroup::remove(&cgroup).context("removing the previous run's cgroup")?;
        }
        bpffs::mount(&self.layout.bpffs())?;
        self.bpffs_mounted = true;
        cgroup::create(&cgroup)?;
        self.cgroup = Some(cgroup.clone());

        let root = root();
        let mut extra = vec!["--pod-cgroup".into(), cgroup.clone().into_os_string()];
        for a in &archives {
            extra.push("--image".into());
            extra.push(a.clone().into_os_string());
        }
        // The demo app only: the CRDs come with the install, the policy after it.
        let sandbox = self.start_sandbox(
            &[
                root.join("manifests/demo/00-namespace.yaml"),
                root.join("manifests/demo/10-hello.yaml"),
            ],
            &extra,
        )?;
        let controller_ip = sandbox.free_cluster_ip.with_context(|| {
            format!(
                "the sandbox named no free ClusterIP for the controller; its log: {}",
                self.layout.log("sandbox").display()
            )
        })?;

        let install = self.layout.dir.join("install");
        std::fs::create_dir_all(&install)
            .with_context(|| format!("creating {}", install.display()))?;
        let text = kustomization(&KustomizationParams {
            base: &relative(&root.join("manifests/sandbox"), &install),
            instance: &self.layout.instance,
            cgroup: &cgroup,
            bpffs: &self.layout.bpffs(),
            controller_ip,
        });
        std::fs::write(install.join("kustomization.yaml"), text)
            .with_context(|| format!("writing {}", install.display()))?;

        let kubectl = Kubectl {
            kubeconfig: sandbox.kubeconfig.clone(),
            scratch: self.layout.dir.clone(),
        };
        kubectl.run(
            &["apply", "-k", &install.display().to_string()],
            KUBECTL_TIMEOUT,
        )?;
        // The Secret, by hand as manifests/README.md says (from files: no secret on a
        // command line). The pods wait for them in ContainerCreating.
        let password = random_hex(12);
        let password_file = self.layout.dir.join("ui-password");
        write_secret(&password_file, &password)?;
        kubectl.run(
            &[
                "-n",
                SYSTEM_NS,
                "create",
                "secret",
                "generic",
                "nemesis-ui-admin",
                &format!("--from-literal=username={UI_USER}"),
                &format!("--from-file=password={}", password_file.display()),
            ],
            KUBECTL_TIMEOUT,
        )?;
        let pod_logs = self.layout.dir.join("sandbox/pods/logs");
        for target in ["statefulset/nemesis-controller", "daemonset/nemesis-agent"] {
            kubectl
                .run(
                    &[
                        "-n",
                        SYSTEM_NS,
                        "rollout",
                        "status",
                        target,
                        &format!("--timeout={}s", ROLLOUT_TIMEOUT.as_secs()),
                    ],
                    ROLLOUT_TIMEOUT + Duration::from_secs(10),
                )
                .with_context(|| format!("the pods' logs: {}", pod_logs.display()))?;
            self.check_sandbox()?;
        }
        note!("demo: the agent and the controller are ready");

        // Ready pods; then what the contract lines promise: an intercepted cgroup (the
        // programs attached and pinned) and a UI answering at the printed address.
        let attached = self.layout.pins().join("links/connect4");
        self.settle("the agent's programs attached", &pod_logs, || {
            Ok(attached.exists())
        })?;
        let ui = SocketAddr::from((controller_ip, CONTROLLER_PORT));
        self.settle("the UI at the controller's ClusterIP", &pod_logs, || {
            Ok(http_get(ui, "/")?.0 > 0)
        })?;
        kubectl.run(
            &[
                "apply",
                "-f",
                &root
                    .join("manifests/demo/20-policy.yaml")
                    .display()
                    .to_string(),
            ],
            KUBECTL_TIMEOUT,
        )?;
        // The app at zero is held from the first request on: the controller publishes
        // its hold EndpointSlice once the policy is at zero and the agent is ready.
        self.settle("the demo app held at zero", &pod_logs, || {
            let slices = kubectl.run(
                &[
                    "-n",
                    "demo",
                    "get",
                    "endpointslices",
                    "-l",
                    HOLD_SLICE_SELECTOR,
                    "-o",
                    "name",
                ],
                KUBECTL_TIMEOUT,
            )?;
            Ok(!slices.trim().is_empty())
        })?;

        let logs = format!(
            "Pod logs: {} (or `kubectl logs -n {SYSTEM_NS} ...`); the install: {}.",
            pod_logs.display(),
            install.display()
        );
        self.print_contract(
            &sandbox,
            &cgroup,
            Ok((format!("http://{ui}/"), format!("{UI_USER}:{password}"))),
            &[],
            &logs,
        )
    }

    /// An error once the sandbox has exited.
    fn check_sandbox(&mut self) -> Result<()> {
        if let Some(why) = self.exited("sandbox") {
            bail!(
                "the sandbox {why}; its log: {}",
                self.layout.log("sandbox").display()
            );
        }
        Ok(())
    }

    /// Polls `ready` until it says yes, the sandbox exits, a signal comes or
    /// [`SETTLE_TIMEOUT`] runs out.
    fn settle(
        &mut self,
        what: &str,
        logs: &Path,
        mut ready: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            signals::check()?;
            self.check_sandbox()?;
            let last = match ready() {
                Ok(true) => return Ok(()),
                Ok(false) => None,
                Err(e) => Some(e),
            };
            if Instant::now() > deadline {
                let detail = last
                    .map(|e| format!(" (last try: {e:#})"))
                    .unwrap_or_default();
                bail!(
                    "{what}: not within {SETTLE_TIMEOUT:?}{detail}; the pods' logs: {}",
                    logs.display()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

/// The real kubectl on the sandbox's kubeconfig, as a user runs it.
pub(super) struct Kubectl {
    pub(super) kubeconfig: PathBuf,
    /// Where its output goes while it runs.
    pub(super) scratch: PathBuf,
}

impl Kubectl {
    /// Runs `kubectl args`: its stdout, or an error with its output. Stops it when
    /// `within` runs out or a signal comes (start-up then ends).
    pub(super) fn run(&self, args: &[&str], within: Duration) -> Result<String> {
        let out_path = self.scratch.join("kubectl.out");
        let err_path = self.scratch.join("kubectl.err");
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdout(Stdio::from(File::create(&out_path)?))
            .stderr(Stdio::from(File::create(&err_path)?));
        let line = format!("kubectl {}", args.join(" "));
        // `get` is the demo's own polling: only what changes the cluster is shown.
        if !args.contains(&"get") {
            note!("demo: {line}");
        }
        let mut child = spawn_child(&mut cmd)
            .with_context(|| format!("`{}` (is kubectl installed?)", describe(&cmd)))?;
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            let stop = signals::check().err().or_else(|| {
                (Instant::now() > deadline)
                    .then(|| anyhow::anyhow!("{line}: no answer within {within:?}"))
            });
            if let Some(e) = stop {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = std::fs::read_to_string(&out_path).unwrap_or_default();
        if !status.success() {
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            bail!("`{line}` failed ({status}): {}{}", out.trim(), err.trim());
        }
        Ok(out)
    }
}

/// What the demo's kustomization puts on top of `manifests/sandbox/`.
struct KustomizationParams<'a> {
    /// `manifests/sandbox/`, relative to the kustomization (kustomize names bases so).
    base: &'a Path,
    instance: &'a str,
    /// The demo's cgroup: the agent's cgroup2 "root", where its programs attach.
    cgroup: &'a Path,
    /// The demo's own bpffs: the agent pins there.
    bpffs: &'a Path,
    /// A ClusterIP of the sandbox's own block for the controller's Service (the API
    /// server's default ones are shared by every sandbox on the machine).
    controller_ip: Ipv4Addr,
}

/// The demo's kustomization: the sandbox install with this demo's own names and places,
/// so demos and tests run side by side.
fn kustomization(p: &KustomizationParams) -> String {
    format!(
        r#"# Written by `cargo xtask demo --instance {instance}`: manifests/sandbox/ with this
# demo's own cgroup, bpffs, pin directory and controller ClusterIP.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
patches:
  # The demo's cgroup is the agent's node root and its bpffs the host's; the pins are
  # named after the instance. Agents acknowledge a sleep on their controller heartbeat:
  # every second, so the demo's app sleeps right after its idle window.
  - patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata: {{name: nemesis-agent, namespace: {ns}}}
      spec:
        template:
          spec:
            containers:
              - name: agent
                env:
                  - {{name: NEMESIS_AGENT_INSTANCE, value: "{instance}"}}
                  - {{name: NEMESIS_AGENT_CONTROLLER_HEARTBEAT_INTERVAL, value: "1s"}}
            volumes:
              - {{name: cgroup2, hostPath: {{path: "{cgroup}", type: Directory}}}}
              - {{name: bpffs, hostPath: {{path: "{bpffs}", type: Directory}}}}
  - patch: |-
      apiVersion: v1
      kind: Service
      metadata: {{name: nemesis-controller, namespace: {ns}}}
      spec: {{clusterIP: "{ip}"}}
  # One controller: the demo's history is one instance's store, and a hand-over in the
  # middle of the demo would split it.
  - patch: |-
      apiVersion: apps/v1
      kind: StatefulSet
      metadata: {{name: nemesis-controller, namespace: {ns}}}
      spec: {{replicas: 1}}
"#,
        instance = p.instance,
        base = p.base.display(),
        ns = SYSTEM_NS,
        cgroup = p.cgroup.display(),
        bpffs = p.bpffs.display(),
        ip = p.controller_ip,
    )
}

/// `to` relative to the directory `from` (both absolute).
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

/// The token the agent of `node` would have from its projected volume, for the agent run
/// as a host process (`--processes`): the agents' ServiceAccount, a pod of theirs on
/// `node` for it to be bound to (the controller ties the token to that pod's node), and
/// a TokenRequest for the controller's audience, as the kubelet makes one. A day of
/// life: longer than a demo runs.
pub(super) fn agent_token(kubectl: &Kubectl, scratch: &Path, node: &str) -> Result<String> {
    let pod = "nemesis-agent-demo";
    let manifest = scratch.join("agent-identity.yaml");
    std::fs::write(
        &manifest,
        format!(
            r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: nemesis-agent, namespace: {SYSTEM_NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: {SYSTEM_NS}}}
spec:
  nodeName: {node}
  serviceAccountName: nemesis-agent
  terminationGracePeriodSeconds: 1
  containers:
    - {{name: agent, image: local/nemesis-agent, command: ["sleep", "86400"]}}
"#
        ),
    )
    .with_context(|| format!("writing {}", manifest.display()))?;
    kubectl.run(
        &["apply", "-f", &manifest.display().to_string()],
        KUBECTL_TIMEOUT,
    )?;
    let uid = kubectl.run(
        &[
            "-n",
            SYSTEM_NS,
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.metadata.uid}",
        ],
        KUBECTL_TIMEOUT,
    )?;
    let token = kubectl.run(
        &[
            "-n",
            SYSTEM_NS,
            "create",
            "token",
            "nemesis-agent",
            "--audience",
            "nemesis-controller",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            pod,
            "--bound-object-uid",
            uid.trim(),
            "--duration",
            "24h",
        ],
        KUBECTL_TIMEOUT,
    )?;
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("kubectl create token answered no token");
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_root() {
        assert_eq!(
            relative(
                Path::new("/w/x/manifests/sandbox"),
                Path::new("/w/x/target/nemesis-demo/demo/install")
            ),
            PathBuf::from("../../../../manifests/sandbox")
        );
        assert_eq!(
            relative(Path::new("/w/m"), Path::new("/tmp/a")),
            PathBuf::from("../../w/m")
        );
    }

    #[test]
    fn the_kustomization_names_the_demos_own_cgroup_bpffs_instance_and_address() {
        let text = kustomization(&KustomizationParams {
            base: Path::new("../../manifests/sandbox"),
            instance: "t42",
            cgroup: Path::new("/sys/fs/cgroup/unified/nemesis-t42"),
            bpffs: Path::new("/w/target/nemesis-demo/t42/bpffs"),
            controller_ip: Ipv4Addr::new(127, 96, 128, 2),
        });
        for want in [
            "  - ../../manifests/sandbox\n",
            r#"{name: NEMESIS_AGENT_INSTANCE, value: "t42"}"#,
            r#"hostPath: {path: "/sys/fs/cgroup/unified/nemesis-t42", type: Directory}"#,
            r#"hostPath: {path: "/w/target/nemesis-demo/t42/bpffs", type: Directory}"#,
            r#"spec: {clusterIP: "127.96.128.2"}"#,
            "spec: {replicas: 1}",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }
}
