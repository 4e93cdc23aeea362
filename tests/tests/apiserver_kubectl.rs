//! The real kubectl against the test API server: get, describe, apply (client-side and
//! server-side), scale, delete, custom resources after applying their CRD, validation
//! errors and authentication. kubectl must be installed (it is on the project's image);
//! these tests fail, rather than skip, without it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::json;

/// Every kubectl call ends within this.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);

struct Kubectl {
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    fn new(kubeconfig: &Path) -> Result<Self> {
        Ok(Kubectl {
            kubeconfig: kubeconfig.to_path_buf(),
            dir: tempfile::tempdir()?,
        })
    }

    fn binary() -> String {
        std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
    }

    async fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<Out> {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(Self::binary());
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .env("HOME", self.dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "running {} (is kubectl installed? set KUBECTL)",
                Self::binary()
            )
        })?;
        let mut input = child.stdin.take().context("kubectl stdin")?;
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).await?;
        }
        drop(input);
        let out = tokio::time::timeout(KUBECTL_TIMEOUT, child.wait_with_output())
            .await
            .with_context(|| {
                format!("kubectl {args:?} did not finish within {KUBECTL_TIMEOUT:?}")
            })??;
        Ok(Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Run and require success.
    async fn ok(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let o = self.run(args, stdin).await?;
        if !o.ok {
            bail!("kubectl {args:?} failed:\n{}{}", o.stdout, o.stderr);
        }
        Ok(o.stdout)
    }
}

async fn setup() -> Result<(TestApiServer, kube::Client, Kubectl)> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let c = s.client().await?;
    let k = Kubectl::new(s.kubeconfig_path())?;
    Ok((s, c, k))
}

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: app
        image: demo:1
        ports:
        - containerPort: 8080
        env:
        - {name: MODE, value: one}
      - name: sidecar
        image: side:1
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
"#;

#[tokio::test]
async fn kubectl_get_lists_namespaces_and_resources() -> Result<()> {
    let (_s, _c, k) = setup().await?;
    let out = k.ok(&["get", "namespaces"], None).await?;
    assert!(
        out.lines()
            .any(|l| l.starts_with("default ") && l.contains("Active")),
        "{out}"
    );
    let res = k.ok(&["api-resources"], None).await?;
    for r in [
        "deployments",
        "endpointslices",
        "leases",
        "customresourcedefinitions",
    ] {
        assert!(res.contains(r), "{r} missing from:\n{res}");
    }
    let version = k.ok(&["version"], None).await?;
    assert!(version.contains("Server Version: v1.32"), "{version}");
    Ok(())
}

#[tokio::test]
async fn kubectl_apply_creates_then_configures_and_describe_shows_it() -> Result<()> {
    let (_s, c, k) = setup().await?;
    let out = k.ok(&["apply", "-f", "-"], Some(WEB)).await?;
    assert!(
        out.contains("deployment.apps/web created") && out.contains("service/web created"),
        "{out}"
    );
    let svc = Api::<Service>::namespaced(c.clone(), "default")
        .get("web")
        .await?;
    let ip: std::net::Ipv4Addr = svc.spec.unwrap().cluster_ip.unwrap().parse()?;
    assert_eq!(ip.octets()[..2], [127, 96]);
    let get = k.ok(&["get", "service", "web"], None).await?;
    assert!(
        get.contains(&ip.to_string()) && get.contains("80/TCP"),
        "{get}"
    );
    // Change the image and the env var: a three-way strategic merge, sidecar kept.
    let changed = WEB
        .replace("demo:1", "demo:2")
        .replace("value: one", "value: two");
    let out = k.ok(&["apply", "-f", "-"], Some(&changed)).await?;
    assert!(
        out.contains("deployment.apps/web configured") && out.contains("service/web unchanged"),
        "{out}"
    );
    let d = Api::<Deployment>::namespaced(c.clone(), "default")
        .get("web")
        .await?;
    let cs = d.spec.template.spec.unwrap().containers;
    assert_eq!(cs.len(), 2);
    assert_eq!(cs[0].image.as_deref(), Some("demo:2"));
    assert_eq!(cs[0].env.as_ref().unwrap()[0].value.as_deref(), Some("two"));
    assert_eq!(d.metadata.generation, Some(2));
    let out = k.ok(&["apply", "-f", "-"], Some(&changed)).await?;
    assert!(out.contains("deployment.apps/web unchanged"), "{out}");
    let get = k.ok(&["get", "deployment", "web"], None).await?;
    assert!(
        get.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("web") && l.contains("0/2")),
        "{get}"
    );
    let described = k.ok(&["describe", "deployment", "web"], None).await?;
    for want in [
        "Name:                   web",
        "Replicas:               2 desired",
        "Image:      demo:2",
        "MODE:  two",
    ] {
        assert!(
            described.contains(want),
            "{want:?} missing from:\n{described}"
        );
    }
    let described = k.ok(&["describe", "service", "web"], None).await?;
    let ip_line = described
        .lines()
        .find(|l| l.starts_with("IP:"))
        .unwrap_or("");
    assert!(ip_line.ends_with(&ip.to_string()), "{described}");
    Ok(())
}

#[tokio::test]
async fn kubectl_server_side_apply_reports_conflicts_and_forces() -> Result<()> {
    let (_s, c, k) = setup().await?;
    let out = k
        .ok(&["apply", "--server-side", "-f", "-"], Some(WEB))
        .await?;
    assert!(
        out.contains("deployment.apps/web serverside-applied"),
        "{out}"
    );
    // Another manager takes the replica count.
    let api = Api::<Deployment>::namespaced(c, "default");
    let patch = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 5}});
    api.patch(
        "web",
        &PatchParams::apply("autoscaler").force(),
        &Patch::Apply(patch),
    )
    .await?;
    let o = k
        .run(&["apply", "--server-side", "-f", "-"], Some(WEB))
        .await?;
    assert!(!o.ok, "re-applying replicas=2 must conflict");
    assert!(
        o.stderr.contains("conflict with \"autoscaler\"") && o.stderr.contains(".spec.replicas"),
        "{}",
        o.stderr
    );
    let out = k
        .ok(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(WEB),
        )
        .await?;
    assert!(out.contains("serverside-applied"), "{out}");
    assert_eq!(api.get("web").await?.spec.replicas, Some(2));
    Ok(())
}

#[tokio::test]
async fn kubectl_scale_goes_through_the_scale_subresource() -> Result<()> {
    let (s, c, k) = setup().await?;
    k.ok(&["apply", "-f", "-"], Some(WEB)).await?;
    let out = k
        .ok(&["scale", "deployment", "web", "--replicas=0"], None)
        .await?;
    assert!(out.contains("deployment.apps/web scaled"), "{out}");
    assert_eq!(
        Api::<Deployment>::namespaced(c, "default")
            .get("web")
            .await?
            .spec
            .replicas,
        Some(0)
    );
    assert!(
        s.requests().iter().any(|r| r.path
            == "/apis/apps/v1/namespaces/default/deployments/web/scale"
            && r.method != "GET"
            && r.status == 200),
        "kubectl scale did not write /scale"
    );
    let get = k
        .ok(
            &["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"],
            None,
        )
        .await?;
    assert_eq!(get, "0");
    Ok(())
}

#[tokio::test]
async fn kubectl_delete_removes_what_it_names() -> Result<()> {
    let (_s, c, k) = setup().await?;
    k.ok(&["apply", "-f", "-"], Some(WEB)).await?;
    let out = k.ok(&["delete", "-f", "-"], Some(WEB)).await?;
    assert!(
        out.contains("deployment.apps \"web\" deleted") && out.contains("service \"web\" deleted"),
        "{out}"
    );
    assert!(
        Api::<Deployment>::namespaced(c, "default")
            .get_opt("web")
            .await?
            .is_none()
    );
    let o = k.run(&["delete", "deployment", "web"], None).await?;
    assert!(
        !o.ok && o.stderr.contains("deployments.apps \"web\" not found"),
        "{}",
        o.stderr
    );
    Ok(())
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.nemesis.dev
spec:
  group: example.nemesis.dev
  scope: Namespaced
  names: {kind: Widget, plural: widgets, singular: widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 0}
          status:
            type: object
            properties:
              phase: {type: string}
"#;

#[tokio::test]
async fn kubectl_gets_custom_resources_with_printer_columns_after_applying_the_crd() -> Result<()> {
    let (_s, _c, k) = setup().await?;
    let out = k.ok(&["apply", "-f", "-"], Some(WIDGET_CRD)).await?;
    assert!(
        out.contains(
            "customresourcedefinition.apiextensions.k8s.io/widgets.example.nemesis.dev created"
        ),
        "{out}"
    );
    let w =
        "apiVersion: example.nemesis.dev/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3}\n";
    k.ok(&["apply", "-f", "-"], Some(w)).await?;
    let get = k.ok(&["get", "widgets"], None).await?;
    let header: Vec<&str> = get
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "SIZE", "PHASE", "AGE"], "{get}");
    assert!(
        get.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("w1") && l.contains(" 3 ")),
        "{get}"
    );
    // Short names and server-side apply work for custom kinds too.
    let by_short = k
        .ok(&["get", "wd", "w1", "-o", "jsonpath={.spec.size}"], None)
        .await?;
    assert_eq!(by_short, "3");
    // As upstream: a server-side apply changing a field the client-side apply set
    // conflicts with "kubectl-client-side-apply" until forced.
    let o = k
        .run(
            &["apply", "--server-side", "-f", "-"],
            Some(&w.replace("size: 3", "size: 4")),
        )
        .await?;
    assert!(
        !o.ok
            && o.stderr
                .contains("conflict with \"kubectl-client-side-apply\""),
        "{}",
        o.stderr
    );
    k.ok(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&w.replace("size: 3", "size: 4")),
    )
    .await?;
    let described = k.ok(&["describe", "widget", "w1"], None).await?;
    assert!(described.contains("Size:  4"), "{described}");
    // Schema validation through kubectl.
    let o = k
        .run(
            &["apply", "-f", "-"],
            Some(&w.replace("size: 3", "size: -1")),
        )
        .await?;
    assert!(!o.ok && o.stderr.contains("spec.size"), "{}", o.stderr);
    let o = k
        .run(
            &["apply", "-f", "-"],
            Some(&w.replace("size: 3", "size: 3, sise: 4")),
        )
        .await?;
    assert!(
        !o.ok && o.stderr.contains("unknown field \"spec.sise\""),
        "kubectl's strict validation: {}",
        o.stderr
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_applies_the_scaling_policy_crd_of_this_repository() -> Result<()> {
    let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crd/scalingpolicy.yaml");
    let yaml =
        std::fs::read_to_string(&crd).with_context(|| format!("reading {}", crd.display()))?;
    let (_s, _c, k) = setup().await?;
    k.ok(&["apply", "-f", "-"], Some(&yaml)).await?;
    let o = k.run(&["get", "scalingpolicies", "-A"], None).await?;
    assert!(
        o.ok && o.stderr.contains("No resources found"),
        "{}{}",
        o.stdout,
        o.stderr
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_sees_the_loopback_endpoint_slice_refusal() -> Result<()> {
    let (_s, _c, k) = setup().await?;
    let slice = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- addresses: ["127.0.0.1"]
  conditions: {ready: true}
ports:
- {port: 8080}
"#;
    let o = k.run(&["apply", "-f", "-"], Some(slice)).await?;
    assert!(!o.ok);
    assert!(o.stderr.contains("is invalid: endpoints[0].addresses[0]: Invalid value: \"127.0.0.1\": may not be in the loopback range (127.0.0.0/8, ::1/128)"), "{}", o.stderr);
    let out = k
        .ok(
            &["apply", "-f", "-"],
            Some(&slice.replace("127.0.0.1", "198.18.0.7")),
        )
        .await?;
    assert!(
        out.contains("endpointslice.discovery.k8s.io/web-abc created"),
        "{out}"
    );
    let get = k.ok(&["get", "endpointslices"], None).await?;
    assert!(get.contains("198.18.0.7") && get.contains("IPv4"), "{get}");
    Ok(())
}

#[tokio::test]
async fn kubectl_with_a_wrong_token_is_unauthorized() -> Result<()> {
    let (s, _c, _k) = setup().await?;
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("kubeconfig");
    let text = std::fs::read_to_string(s.kubeconfig_path())?.replace(s.token(), "not-the-token");
    std::fs::write(&bad, text)?;
    let k = Kubectl::new(&bad)?;
    let o = k.run(&["get", "pods"], None).await?;
    assert!(!o.ok);
    assert!(
        o.stderr.contains("You must be logged in to the server")
            || o.stderr.contains("Unauthorized"),
        "{}",
        o.stderr
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_describe_shows_events_recorded_through_events_k8s_io() -> Result<()> {
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let (_s, c, k) = setup().await?;
    k.ok(&["apply", "-f", "-"], Some(WEB)).await?;
    let d = Api::<Deployment>::namespaced(c.clone(), "default")
        .get("web")
        .await?;
    let recorder = Recorder::new(
        c,
        Reporter {
            controller: "nemesis-test".into(),
            instance: None,
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "ScaledToZero".into(),
        note: Some("no connections for 10m".into()),
        action: "Scale".into(),
        secondary: None,
    };
    recorder.publish(&ev, &d.object_ref(&())).await?;
    let described = k.ok(&["describe", "deployment", "web"], None).await?;
    let events = described.split("Events:").nth(1).unwrap_or("");
    assert!(
        events.contains("ScaledToZero") && events.contains("no connections for 10m"),
        "{described}"
    );
    let listed = k.ok(&["get", "events"], None).await?;
    assert!(
        listed.contains("ScaledToZero") && listed.contains("deployment/web"),
        "{listed}"
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_create_generators_send_protobuf_that_the_server_decodes() -> Result<()> {
    let (_s, c, k) = setup().await?;
    k.ok(&["create", "namespace", "team-a"], None).await?;
    let out = k
        .ok(
            &[
                "create",
                "deployment",
                "d1",
                "-n",
                "team-a",
                "--image=demo:1",
                "--replicas=0",
                "--port=8080",
            ],
            None,
        )
        .await?;
    assert!(out.contains("deployment.apps/d1 created"), "{out}");
    k.ok(
        &[
            "create",
            "configmap",
            "c1",
            "-n",
            "team-a",
            "--from-literal=a=b",
        ],
        None,
    )
    .await?;
    k.ok(
        &[
            "create",
            "secret",
            "generic",
            "s1",
            "-n",
            "team-a",
            "--from-literal=k=v",
        ],
        None,
    )
    .await?;
    let out = k
        .ok(
            &[
                "expose",
                "deployment",
                "d1",
                "-n",
                "team-a",
                "--port=80",
                "--target-port=8080",
            ],
            None,
        )
        .await?;
    assert!(out.contains("service/d1 exposed"), "{out}");
    let d = Api::<Deployment>::namespaced(c.clone(), "team-a")
        .get("d1")
        .await?;
    assert_eq!(
        d.spec.replicas,
        Some(0),
        "an explicit zero survives the protobuf decoding"
    );
    let pod = d.spec.template.spec.unwrap();
    assert_eq!(pod.containers[0].image.as_deref(), Some("demo:1"));
    assert_eq!(
        pod.containers[0].ports.as_ref().unwrap()[0].container_port,
        8080
    );
    assert!(pod.init_containers.is_none());
    let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(c.clone(), "team-a")
        .get("c1")
        .await?;
    assert_eq!(cm.data.unwrap()["a"], "b");
    let s = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c, "team-a")
        .get("s1")
        .await?;
    assert_eq!(s.data.unwrap()["k"].0, b"v");
    Ok(())
}
