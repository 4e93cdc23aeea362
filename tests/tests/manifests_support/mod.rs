//! Shared by the `manifests_*` tests: renders `manifests/` with the real
//! `kubectl kustomize`, reads plain YAML files, and finds objects and containers in what
//! was rendered. Reads files and runs kubectl; never talks to a cluster.
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

/// `kubectl kustomize` of the whole install takes well under a second.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Other tools (promtool) get as long.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

pub const NAMESPACE: &str = "nemesis-system";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository")
        .to_path_buf()
}

pub fn manifests() -> PathBuf {
    repo_root().join("manifests")
}

/// Runs `cmd` to completion within `timeout`, with its output captured; fails with
/// stderr when it exits non-zero.
pub fn run_ok(mut cmd: Command, timeout: Duration) -> Result<String> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    // Read the pipes on threads, so a large output cannot block the child.
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).map(|_| s)
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).map(|_| s)
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_t.join().expect("stdout reader")?;
    let stderr = err_t.join().expect("stderr reader")?;
    if !status.success() {
        bail!("{shown} failed ({status}):\n{stderr}{stdout}");
    }
    Ok(stdout)
}

fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// `kubectl kustomize <manifests/dir>`, as `kubectl apply -k` would build it.
pub fn kustomize(dir: &str) -> Result<Vec<Value>> {
    let path = manifests().join(dir);
    let mut cmd = Command::new(kubectl());
    cmd.arg("kustomize").arg(&path);
    let text = run_ok(cmd, KUBECTL_TIMEOUT)
        .with_context(|| "rendering with kubectl kustomize (is kubectl installed? set KUBECTL)")?;
    parse_documents(&text).with_context(|| format!("the rendering of {}", path.display()))
}

/// The objects of a YAML file under `manifests/` (not kustomized).
pub fn yaml_file(rel: &str) -> Result<Vec<Value>> {
    let path = manifests().join(rel);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_documents(&text).with_context(|| format!("parsing {}", path.display()))
}

fn parse_documents(text: &str) -> Result<Vec<Value>> {
    let mut out = vec![];
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc).with_context(|| format!("YAML document {}", i + 1))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

pub fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or("")
}

pub fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

/// `Kind/name`, for messages.
pub fn id(o: &Value) -> String {
    format!("{}/{}", kind(o), name(o))
}

pub fn find<'a>(objs: &'a [Value], kind_: &str, name_: &str) -> Result<&'a Value> {
    objs.iter()
        .find(|o| kind(o) == kind_ && name(o) == name_)
        .with_context(|| format!("no {kind_}/{name_} among the rendered objects"))
}

pub fn container<'a>(workload: &'a Value, name_: &str) -> Result<&'a Value> {
    let spec = &workload["spec"]["template"]["spec"];
    spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten()
        .find(|c| c["name"] == name_)
        .with_context(|| format!("{} has no container {name_}", id(workload)))
}

/// The container port called `port_name`.
pub fn container_port(c: &Value, port_name: &str) -> Result<u16> {
    c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == port_name)
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .with_context(|| format!("container {} has no port named {port_name}", c["name"]))
}

/// The pod volume mounted at exactly `mount_path` in container `c`.
pub fn volume_at<'a>(
    workload: &'a Value,
    c: &Value,
    mount_path: &Path,
) -> Result<(&'a Value, Value)> {
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"].as_str().map(Path::new) == Some(mount_path))
        .with_context(|| {
            format!(
                "container {} of {} mounts nothing at {}",
                c["name"],
                id(workload),
                mount_path.display()
            )
        })?;
    let vol_name = &mount["name"];
    let volume = workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == *vol_name)
        .with_context(|| format!("{} has no volume {vol_name}", id(workload)))?;
    Ok((volume, mount.clone()))
}

// === Prometheus Operator kinds ===
//
// The fields of monitoring.coreos.com/v1 the manifests use, named as the operator's CRDs
// name them. Decoded through `serde_ignored` (see `manifests_apply`), so a field
// outside this list is reported, as the operator's CRD schema would prune it.

pub mod monitoring {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Object<S> {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: S,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct NamespaceSelector {
        pub any: Option<bool>,
        pub match_names: Option<Vec<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PodMonitorSpec {
        pub selector: LabelSelector,
        pub namespace_selector: Option<NamespaceSelector>,
        pub job_label: Option<String>,
        pub pod_metrics_endpoints: Vec<Endpoint>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ServiceMonitorSpec {
        pub selector: LabelSelector,
        pub namespace_selector: Option<NamespaceSelector>,
        pub job_label: Option<String>,
        pub endpoints: Vec<Endpoint>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Endpoint {
        pub port: Option<String>,
        pub path: Option<String>,
        pub scheme: Option<String>,
        pub interval: Option<String>,
        pub scrape_timeout: Option<String>,
        pub honor_labels: Option<bool>,
        pub relabelings: Option<Vec<Relabel>>,
        pub metric_relabelings: Option<Vec<Relabel>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Relabel {
        pub source_labels: Option<Vec<String>>,
        pub separator: Option<String>,
        pub target_label: Option<String>,
        pub regex: Option<String>,
        pub modulus: Option<u64>,
        pub replacement: Option<String>,
        pub action: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PrometheusRuleSpec {
        pub groups: Vec<RuleGroup>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct RuleGroup {
        pub name: String,
        pub interval: Option<String>,
        pub rules: Vec<Rule>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Rule {
        pub alert: Option<String>,
        pub record: Option<String>,
        pub expr: String,
        #[serde(rename = "for")]
        pub for_: Option<String>,
        pub labels: Option<BTreeMap<String, String>>,
        pub annotations: Option<BTreeMap<String, String>>,
    }

    pub type PodMonitor = Object<PodMonitorSpec>;
    pub type ServiceMonitor = Object<ServiceMonitorSpec>;
    pub type PrometheusRule = Object<PrometheusRuleSpec>;
}

/// Decodes `obj` as `T`, failing on any field `T` does not know (with its path), as an
/// API server does with `fieldValidation=Strict`.
pub fn decode_strict<T: serde::de::DeserializeOwned>(obj: &Value) -> Result<T> {
    let mut unknown = vec![];
    let decoded: T = serde_ignored::deserialize(obj, |path| {
        // `?` marks an Option on the way; it is not a field.
        let p = path.to_string().replace(".?", "");
        unknown.push(p.trim_start_matches("?.").to_string())
    })
    .with_context(|| format!("{} does not decode", id(obj)))?;
    if !unknown.is_empty() {
        bail!("{}: unknown fields {}", id(obj), unknown.join(", "));
    }
    Ok(decoded)
}
