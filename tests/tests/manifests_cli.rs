//! The command lines the manifests give the agent and the controller are parsed by the
//! binaries' real clap definitions, environment included, and what they name (ports,
//! mounted files, host paths, the controller's Service, the Lease's namespace, the
//! leader label) agrees with the rest of the rendering. A flag renamed in the code, or a
//! port or path changed on one side only, fails here instead of in a cluster.
//!
//! clap reads `env = "NEMESIS_..."` values from the process environment only, which a
//! parallel test must not change. So each `NEMESIS_*` entry of a container is turned
//! into the `--flag value` of the argument whose `env` it is (found through clap's own
//! `Command` introspection; an entry no argument reads is an error), which is how clap
//! would take it, except that giving both is refused here rather than letting the flag win.

mod manifests_support;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::{CommandFactory, Parser, Subcommand};
use manifests_support::{
    NAMESPACE, container, container_port, find, id, kustomize, volume_at, yaml_file,
};
use nemesis_agent::config::{Cli as AgentCli, Command as AgentCommand, RunArgs as AgentRun};
use nemesis_controller::config::RunArgs as ControllerRun;
use serde_json::Value;

/// `nemesis-controller`'s command line. Its `Cli` is private to the binary's main.rs;
/// this has the same shape (`run` with the library's real `RunArgs`, and `crd`), so
/// every flag and variable is the real one.
#[derive(Debug, Parser)]
#[command(name = "nemesis-controller")]
struct ControllerCli {
    #[command(subcommand)]
    command: ControllerCommand,
}

#[derive(Debug, Subcommand)]
enum ControllerCommand {
    Run(Box<ControllerRun>),
    Crd,
}

/// Variables that are not flags: tracing's filter, and the node IP the agent's
/// proxy address is built from (`$(NODE_IP)`).
const NON_FLAG_ENV: &[&str] = &["RUST_LOG", "NODE_IP", "POD_IP"];

/// A node name for `spec.nodeName`.
const NODE: &str = "node-a";
/// A node IP for `status.hostIP` (198.18.0.0/15: never a real network).
const NODE_IP: &str = "198.18.0.1";
/// A Pod IP for `status.podIP` (same range).
const POD_IP: &str = "198.18.1.7";
/// The node's IPv6 address, second in `status.hostIPs` on a dual-stack node (unique
/// local: never a real network).
const NODE_IP_V6: &str = "fd6e:6d00::1";

/// `$(VAR)` in `value` replaced as the kubelet does, with variables defined earlier in
/// the container's env; an unknown one stays as written (and then fails to parse).
fn expand(value: &str, earlier: &[(String, String)]) -> String {
    let mut out = value.to_string();
    for (name, v) in earlier {
        out = out.replace(&format!("$({name})"), v);
    }
    out
}

/// The environment of `c` as the kubelet would set it for the first Pod of `workload`:
/// downward API fields resolved, `RUST_LOG` checked as tracing would parse it.
fn pod_env(workload: &Value, c: &Value) -> Result<Vec<(String, String)>> {
    let pod_name = match manifests_support::kind(workload) {
        "StatefulSet" => format!("{}-0", manifests_support::name(workload)),
        _ => format!("{}-x7k2p", manifests_support::name(workload)),
    };
    let mut out = vec![];
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("an env entry without a name")?;
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &out)
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match path {
                "metadata.name" => pod_name.clone(),
                "metadata.namespace" => workload["metadata"]["namespace"]
                    .as_str()
                    .context("a namespaced workload")?
                    .to_string(),
                "spec.nodeName" => NODE.to_string(),
                "status.hostIP" => NODE_IP.to_string(),
                "status.podIP" => POD_IP.to_string(),
                // A dual-stack node; the downward API joins the list with commas.
                "status.hostIPs" => format!("{NODE_IP},{NODE_IP_V6}"),
                other => bail!("{name}: the test does not resolve fieldPath {other}"),
            }
        } else if let Some(r) = e["valueFrom"].get("secretKeyRef") {
            // The placeholder's value: the Secret and key must be documented.
            let secret = r["name"]
                .as_str()
                .context("a secretKeyRef names its Secret")?;
            let key = r["key"].as_str().context("a secretKeyRef names its key")?;
            documented_secret_value(secret, key).with_context(|| name.to_string())?
        } else {
            bail!("{name}: neither a value nor a fieldRef: {e}");
        };
        if name == "RUST_LOG" {
            tracing_subscriber::EnvFilter::try_new(&value)
                .with_context(|| format!("RUST_LOG={value:?} is not a valid tracing filter"))?;
        }
        out.push((name.to_string(), value));
    }
    Ok(out)
}

/// argv for `cmd`: the container's command (its file name) and args, then each
/// `NEMESIS_*` variable as the flag that reads it.
fn argv(cmd: &clap::Command, c: &Value, env: &[(String, String)]) -> Result<Vec<String>> {
    let command: Vec<&str> = c["command"]
        .as_array()
        .context("the container names its command")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        command.len() == 1,
        "command {command:?}: the binary alone, arguments in args"
    );
    let bin = Path::new(command[0]).file_name().and_then(OsStr::to_str);
    ensure!(
        bin == Some(cmd.get_name()),
        "command {command:?} does not run {}",
        cmd.get_name()
    );
    let args: Vec<String> = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    let sub_name = args.first().context("args name the subcommand")?;
    let sub = cmd
        .find_subcommand(sub_name)
        .with_context(|| format!("{} has no subcommand {sub_name}", cmd.get_name()))?;
    let mut argv = vec![cmd.get_name().to_string()];
    argv.extend(args.iter().cloned());
    for (name, value) in env {
        if NON_FLAG_ENV.contains(&name.as_str()) {
            continue;
        }
        let arg = sub
            .get_arguments()
            .find(|a| a.get_env() == Some(OsStr::new(name)))
            .with_context(|| {
                format!(
                    "{name} is read by no argument of `{} {sub_name}`",
                    cmd.get_name()
                )
            })?;
        let long = arg.get_long().context("env arguments have a long flag")?;
        ensure!(
            !args
                .iter()
                .any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}="))),
            "--{long} is given both in args and as {name}"
        );
        if arg.get_action().takes_values() {
            argv.push(format!("--{long}={value}"));
        } else {
            match value.as_str() {
                "true" => argv.push(format!("--{long}")),
                "false" => {}
                other => bail!("{name}={other:?}: a switch takes true or false"),
            }
        }
    }
    Ok(argv)
}

fn agent_run(argv: &[String]) -> Result<AgentRun> {
    match AgentCli::try_parse_from(argv)
        .map_err(|e| anyhow::anyhow!("`{}` does not parse:\n{e}", argv.join(" ")))?
        .command
    {
        AgentCommand::Run(run) => Ok(run),
        other => bail!("expected `run`, got {other:?}"),
    }
}

fn controller_run(argv: &[String]) -> Result<ControllerRun> {
    match ControllerCli::try_parse_from(argv)
        .map_err(|e| anyhow::anyhow!("`{}` does not parse:\n{e}", argv.join(" ")))?
        .command
    {
        ControllerCommand::Run(run) => Ok(*run),
        other => bail!("expected `run`, got {other:?}"),
    }
}

fn env_entry<'a>(c: &'a Value, name: &str) -> Result<&'a Value> {
    c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .with_context(|| format!("container {} sets no {name}", c["name"]))
}

/// The file at `path` comes from Secret `secret`, key `key`, through a volume of `workload`.
fn secret_file(workload: &Value, c: &Value, path: &Path) -> Result<(String, String)> {
    let dir = path.parent().context("a file path")?;
    let file = path
        .file_name()
        .and_then(OsStr::to_str)
        .context("a file name")?;
    let (volume, mount) = volume_at(workload, c, dir)?;
    ensure!(
        mount["subPath"].is_null(),
        "{}: a Secret mounted with subPath is never updated, so a rotated token never arrives",
        path.display()
    );
    let secret = volume["secret"]["secretName"]
        .as_str()
        .with_context(|| format!("{} is not on a Secret volume", path.display()))?;
    let key = match volume["secret"]["items"].as_array() {
        Some(items) => items
            .iter()
            .find(|i| i["path"] == file)
            .and_then(|i| i["key"].as_str())
            .with_context(|| format!("no item of Secret {secret} is mounted as {file}"))?,
        None => file,
    };
    Ok((secret.to_string(), key.to_string()))
}

/// The Secret placeholders document every Secret and key the workloads read.
fn documented_secret_value(secret: &str, key: &str) -> Result<String> {
    let examples = yaml_file("base/secrets.example.yaml")?;
    let s = find(&examples, "Secret", secret)
        .context("base/secrets.example.yaml must document every Secret a workload reads")?;
    s["stringData"][key]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("base/secrets.example.yaml: Secret {secret} has no key {key}"))
}

/// The container port a Service port reaches (by name or number) in `c`.
fn service_target(svc: &Value, port: u16, c: &Value) -> Result<u16> {
    let p = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["port"].as_u64() == Some(u64::from(port)))
        .with_context(|| format!("{} has no port {port}", id(svc)))?;
    match &p["targetPort"] {
        Value::String(name) => container_port(c, name),
        Value::Number(n) => Ok(u16::try_from(n.as_u64().context("a port number")?)?),
        Value::Null => Ok(port),
        other => bail!("targetPort {other}"),
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

/// `selector` (a map of labels) selects `pod_labels`.
fn selects(selector: &BTreeMap<String, String>, pod_labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
}

fn probe_port(c: &Value, probe: &str) -> Result<u16> {
    let port = &c[probe]["httpGet"]["port"];
    match port {
        Value::String(name) => container_port(c, name),
        Value::Number(n) => Ok(u16::try_from(n.as_u64().context("a port")?)?),
        _ => bail!("container {} has no HTTP {probe}", c["name"]),
    }
}

#[test]
fn agent_daemonset_command_line_parses_and_matches_its_mounts_ports_and_the_controller()
-> Result<()> {
    let objs = kustomize("")?;
    let ds = find(&objs, "DaemonSet", "nemesis-agent")?;
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(ds, "agent")?;
    let env = pod_env(ds, c)?;
    let argv = argv(&AgentCli::command(), c, &env)?;
    let run = agent_run(&argv)?;

    // Updates surge: the new agent starts beside the old one on the same host ports
    // (SO_REUSEPORT). A declared port of a host-network Pod is a hostPort, which would
    // keep the scheduler from placing the new Pod on the node: none is declared.
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(rolling["maxSurge"], 1, "the new agent starts first");
    assert_eq!(rolling["maxUnavailable"], 0, "the old agent stops last");
    assert!(
        c["ports"].as_array().is_none_or(|p| p.is_empty()),
        "the agent declares no ports (hostPorts forbid the surge)"
    );

    // Probes and the scrape target reach the admin listener.
    let admin = probe_port(c, "readinessProbe")?;
    assert_eq!(
        run.admin_listen.port(),
        admin,
        "--admin-listen vs the probes' port"
    );
    let monitoring = kustomize("monitoring")?;
    let pm = find(&monitoring, "PodMonitor", "nemesis-agent")?;
    let scrape_port = pm["spec"]["podMetricsEndpoints"][0]["relabelings"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["targetLabel"] == "__address__")
        .and_then(|r| r["replacement"].as_str())
        .and_then(|r| r.rsplit_once(':'))
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .context("the PodMonitor sets __address__ to <pod IP>:<admin port>")?;
    assert_eq!(scrape_port, admin, "the PodMonitor scrapes the admin port");
    assert!(
        run.admin_listen.ip().is_unspecified(),
        "--admin-listen {} must take the kubelet's probes on the node address",
        run.admin_listen
    );
    assert_eq!(probe_port(c, "readinessProbe")?, admin);
    assert_eq!(probe_port(c, "livenessProbe")?, admin);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");

    // The programs redirect held connects, in the client's network namespace, to the
    // node IP: pods reach it, and the proxy listens there on the host's network.
    assert_eq!(
        pod["hostNetwork"], true,
        "the proxy must be on the host network"
    );
    assert_eq!(
        run.datapath.proxy_v4.ip().to_string(),
        NODE_IP,
        "--proxy-v4 must be the node IP (status.hostIP): a pod's loopback is its own"
    );
    assert_eq!(
        pod["dnsPolicy"], "ClusterFirstWithHostNet",
        "a host-network Pod resolves the controller's Service name only with ClusterFirstWithHostNet"
    );

    // The node's cgroup2 root, from the host.
    let cgroup = run.datapath.cgroup.clone().context(
        "--cgroup must be set in a container: \
        the container's own cgroup2 mount is only its cgroup namespace",
    )?;
    let (vol, _) = volume_at(ds, c, &cgroup)?;
    assert_eq!(
        vol["hostPath"]["path"],
        "/sys/fs/cgroup",
        "{}",
        cgroup.display()
    );

    // The host's bpffs, seen by the agent, mounted by the init step when missing.
    let bpffs = run.datapath.instance.bpffs.clone().context("--bpffs")?;
    let (vol, mount) = volume_at(ds, c, &bpffs)?;
    assert_eq!(vol["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(mount["mountPropagation"], "HostToContainer");
    assert!(
        !bpffs.starts_with("/sys"),
        "{}: container runtimes' AppArmor profiles deny writes under /sys/fs, pins included",
        bpffs.display()
    );
    let init = container(ds, "mount-bpffs")?;
    let (init_vol, init_mount) = volume_at(ds, init, &bpffs)?;
    assert_eq!(init_vol["name"], vol["name"]);
    assert_eq!(init_mount["mountPropagation"], "Bidirectional");
    assert_eq!(init["securityContext"]["privileged"], true);
    let script = init["command"].to_string();
    assert!(
        script.contains(&format!(" {} bpf ", bpffs.display())),
        "the init step checks {} in /proc/mounts: {script}",
        bpffs.display()
    );

    // The agent's own ServiceAccount token, projected for the controller's audience.
    let token = run.agent_token_file.clone().context("--agent-token-file")?;
    let (vol, mount) = volume_at(ds, c, token.parent().context("the token file's directory")?)?;
    ensure!(
        mount["subPath"].is_null(),
        "a projected token mounted with subPath is never rotated"
    );
    let projected_token = vol["projected"]["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| {
            s["serviceAccountToken"]["path"].as_str() == token.file_name().and_then(OsStr::to_str)
        })
        .map(|s| &s["serviceAccountToken"])
        .with_context(|| format!("{} is no projected ServiceAccount token", token.display()))?
        .clone();
    // The controller URL is the controller's API Service over TLS, on the port that
    // reaches the controller's --agent-listen, by a name its certificate carries.
    let url = run.controller_url.clone().context("--controller-url")?;
    let rest = url.strip_prefix("https://").context("an https:// URL")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = authority
        .rsplit_once(':')
        .context("the URL names its port")?;
    let port: u16 = port.parse()?;
    let mut parts = host.split('.');
    let (svc_name, svc_ns) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    assert_eq!(svc_ns, NAMESPACE, "{url}");
    let svc = find(&objs, "Service", svc_name)?;
    assert_eq!(svc["metadata"]["namespace"], NAMESPACE);
    let sts = find(&objs, "StatefulSet", "nemesis-controller")?;
    let cc = container(sts, "controller")?;
    let controller = controller_run(&argv_of(sts, cc)?)?;
    // The controller reviews exactly these tokens: this audience, this ServiceAccount.
    assert_eq!(
        projected_token["audience"].as_str(),
        Some(controller.agent_token_audience.as_str()),
        "the agent's token audience vs the controller's --agent-token-audience"
    );
    // No shared agent token: the controller has no flag for one (parsing would fail).
    assert_eq!(
        (
            controller.agent_namespace.as_str(),
            controller.agent_service_account.as_str()
        ),
        (
            ds["metadata"]["namespace"].as_str().unwrap_or(""),
            pod["serviceAccountName"].as_str().unwrap_or("")
        ),
        "the controller accepts the agents' ServiceAccount"
    );
    assert_eq!(
        service_target(svc, port, cc)?,
        controller.agent_listen.port(),
        "{url} must reach the controller's --agent-listen"
    );
    assert!(
        controller.agent_tls_secret.is_some() && !controller.agent_tls_provided,
        "the controller serves the agents over TLS with a certificate it issues"
    );
    assert!(
        controller
            .agent_tls_names
            .iter()
            .any(|n| n.as_str() == host),
        "the issued certificate names {host}: {:?}",
        controller.agent_tls_names
    );
    // The agent checks it against the CA the controller publishes (the ConfigMap's
    // ca.crt, no key).
    let ca = run
        .controller_ca_file
        .clone()
        .context("--controller-ca-file")?;
    let (vol, mount) = volume_at(ds, c, ca.parent().context("the CA file's directory")?)?;
    ensure!(
        mount["subPath"].is_null(),
        "a ConfigMap mounted with subPath is never updated"
    );
    assert_eq!(
        vol["configMap"]["name"].as_str(),
        Some(controller.agent_ca_configmap.as_str())
    );
    let file = ca
        .file_name()
        .and_then(OsStr::to_str)
        .context("a file name")?;
    assert!(
        vol["configMap"]["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["key"] == "ca.crt" && i["path"] == file),
        "the ConfigMap's ca.crt is mounted as {file}"
    );

    // IPv6 and dual-stack Services are held and counted by default: the node's
    // addresses of both families come from status.hostIPs, the hold listeners bind
    // each, and the IPv6 proxy listener the IPv6 one at the IPv4 listener's port.
    assert_eq!(
        env_entry(c, "NEMESIS_AGENT_NODE_ADDRESSES")?["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIPs"
    );
    let v6: std::net::IpAddr = NODE_IP_V6.parse()?;
    assert_eq!(
        run.hold_addresses(),
        vec![NODE_IP.parse::<std::net::IpAddr>()?, v6],
        "hold listeners on both of the node's addresses"
    );
    assert_eq!(
        run.proxy_v6()
            .map(|a| (std::net::IpAddr::V6(*a.ip()), a.port())),
        Some((v6, run.datapath.proxy_v4.port())),
        "the IPv6 proxy listener on the node's IPv6 address"
    );

    // Each node reports under its own name.
    assert_eq!(run.node_name.as_deref(), Some(NODE));
    assert_eq!(
        env_entry(c, "NEMESIS_AGENT_NODE_NAME")?["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );

    // A rolling restart keeps the datapath for the next agent: nothing detaches it.
    assert!(
        !run.detach_on_exit,
        "--detach-on-exit would drop held traffic on every restart"
    );
    assert!(
        c["lifecycle"]["preStop"].is_null(),
        "no preStop hook: `nemesis-agent cleanup` belongs to an uninstall, not a restart"
    );
    // The proxy gets its grace period before the kubelet's SIGKILL.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .context("a grace period")?;
    assert!(
        Duration::from_secs(grace) > run.shutdown_grace,
        "terminationGracePeriodSeconds {grace} must exceed --shutdown-grace {:?}",
        run.shutdown_grace
    );
    // Exactly the capabilities, not a privileged container.
    let caps = &c["securityContext"]["capabilities"];
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
    for cap in ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"] {
        assert!(
            caps["add"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c == cap),
            "CAP_{cap} missing"
        );
    }
    // Its ServiceAccount is the one the RBAC binds.
    assert_eq!(pod["serviceAccountName"], "nemesis-agent");
    find(&objs, "ServiceAccount", "nemesis-agent")?;
    Ok(())
}

fn argv_of(workload: &Value, c: &Value) -> Result<Vec<String>> {
    let env = pod_env(workload, c)?;
    let cmd = match manifests_support::kind(workload) {
        "StatefulSet" => ControllerCli::command(),
        _ => AgentCli::command(),
    };
    argv(&cmd, c, &env)
}

#[test]
fn controller_statefulset_command_line_parses_and_matches_its_volume_services_and_rbac()
-> Result<()> {
    let objs = kustomize("")?;
    let sts = find(&objs, "StatefulSet", "nemesis-controller")?;
    let pod = &sts["spec"]["template"]["spec"];
    let pod_labels = labels(&sts["spec"]["template"]["metadata"]["labels"]);
    let c = container(sts, "controller")?;
    let run = controller_run(&argv_of(sts, c)?)?;
    run.validate()
        .context("the controller's settings must validate")?;

    // Ports: the API Service reaches --listen, the admin Service and probes
    // --admin-listen.
    assert_eq!(container_port(c, "http")?, run.listen.port());
    assert_eq!(container_port(c, "admin")?, run.admin_listen.port());
    assert_eq!(container_port(c, "agents")?, run.agent_listen.port());
    assert_eq!(probe_port(c, "readinessProbe")?, run.admin_listen.port());
    assert_eq!(probe_port(c, "livenessProbe")?, run.admin_listen.port());

    // The API Service selects the leader only, by the label the leader puts on itself.
    let api = find(&objs, "Service", "nemesis-controller")?;
    let sel = labels(&api["spec"]["selector"]);
    assert_eq!(
        sel.get(nemesis_controller::leader::LEADER_LABEL)
            .map(String::as_str),
        Some("true"),
        "the API Service must select the leader label"
    );
    let mut leader_labels = pod_labels.clone();
    leader_labels.insert(
        nemesis_controller::leader::LEADER_LABEL.into(),
        "true".into(),
    );
    assert!(
        selects(&sel, &leader_labels),
        "the API Service selects no controller Pod"
    );
    assert!(
        !selects(&sel, &pod_labels),
        "the API Service must not select a standby"
    );
    assert!(
        run.pod_name.is_some(),
        "without --pod-name no Pod carries the leader label"
    );
    assert_eq!(
        env_entry(c, "NEMESIS_CONTROLLER_POD_NAME")?["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    // The admin Service: every instance, headless, the StatefulSet's governing Service.
    let admin = find(&objs, "Service", "nemesis-controller-admin")?;
    assert!(selects(&labels(&admin["spec"]["selector"]), &pod_labels));
    assert_eq!(admin["spec"]["clusterIP"], "None");
    assert_eq!(sts["spec"]["serviceName"], "nemesis-controller-admin");
    assert_eq!(
        service_target(admin, run.admin_listen.port(), c)?,
        run.admin_listen.port()
    );

    // The history lives on the claim template's volume.
    let store_dir = run.store_path.parent().context("a store file")?;
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"].as_str().map(Path::new) == Some(store_dir))
        .with_context(|| format!("nothing is mounted at {}", store_dir.display()))?;
    assert!(
        sts["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["metadata"]["name"] == mount["name"]),
        "{} must be a volumeClaimTemplate's volume",
        store_dir.display()
    );

    // No shared agent token: the controller has no flag for one, so the parse above
    // would have failed on it; agents' own tokens are reviewed.
    // The web UI is served (only with --ui-password-file), its login from the Secret
    // documented for it: the password (or its hash) as a file, the user name as a variable.
    let password = run
        .ui_password_file
        .clone()
        .context("--ui-password-file: without it the controller serves no UI")?;
    let (secret, key) = secret_file(sts, c, &password)?;
    assert_eq!(
        (secret.as_str(), key.as_str()),
        ("nemesis-ui-admin", "password")
    );
    let placeholder = documented_secret_value(&secret, &key)?;
    let user = &env_entry(c, "NEMESIS_CONTROLLER_UI_USER")?["valueFrom"]["secretKeyRef"];
    assert_eq!(
        (user["name"].as_str(), user["key"].as_str()),
        (Some("nemesis-ui-admin"), Some("username"))
    );
    assert_eq!(
        run.ui_user,
        documented_secret_value("nemesis-ui-admin", "username")?
    );
    // The placeholder applied unchanged must stop the controller, not open the UI.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join(&key);
    std::fs::write(&file, &placeholder)?;
    let refused = nemesis_controller::ui::AdminPassword::from_file(&file)
        .expect_err("the placeholder password must be refused at start")
        .to_string();
    assert!(refused.contains("shorter than"), "{refused}");

    // RBAC: the Lease in --lease-namespace, and a patch of each replica's own Pod.
    assert_eq!(run.lease_namespace, NAMESPACE);
    let role = find(&objs, "Role", "nemesis-controller-leader")?;
    assert_eq!(role["metadata"]["namespace"], run.lease_namespace.as_str());
    let rules = role["rules"].as_array().context("rules")?;
    let lease_rule = rules
        .iter()
        .find(|r| r["resources"] == serde_json::json!(["leases"]))
        .context("a leases rule")?;
    for verb in ["get", "create", "update"] {
        assert!(
            lease_rule["verbs"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v == verb),
            "leases {verb}"
        );
    }
    let replicas = sts["spec"]["replicas"].as_u64().context("replicas")?;
    assert!(replicas >= 2, "a standby must be ready to take the Lease");
    let pod_rule = rules
        .iter()
        .find(|r| r["resources"] == serde_json::json!(["pods"]))
        .context("a pods rule")?;
    let named: Vec<&str> = pod_rule["resourceNames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let expected: Vec<String> = (0..replicas)
        .map(|i| format!("{}-{i}", manifests_support::name(sts)))
        .collect();
    assert_eq!(
        named, expected,
        "the pods rule must name every replica's Pod"
    );
    let binding = find(&objs, "RoleBinding", "nemesis-controller-leader")?;
    assert_eq!(binding["subjects"][0]["name"], pod["serviceAccountName"]);

    // History replication: the standby reaches the leader's API port at its Pod IP,
    // and every instance may read the replicas' token Secret.
    assert!(run.history_replication);
    assert_eq!(
        run.history_url.as_deref(),
        Some(format!("http://{POD_IP}:{}", run.listen.port()).as_str())
    );
    assert!(
        rules.iter().any(|r| {
            r["resources"] == serde_json::json!(["secrets"])
                && r["resourceNames"]
                    .as_array()
                    .is_some_and(|n| n.iter().any(|n| *n == run.replica_token_secret.as_str()))
                && r["verbs"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|v| v == "get"))
        }),
        "the Role must let the controller read {}",
        run.replica_token_secret
    );

    // The agents' TLS Secret: read and replaced by name; the CA's ConfigMap: created,
    // read and replaced by name.
    let allows = |resource: &str, name: &str, verb: &str| {
        rules.iter().any(|r| {
            r["resources"] == serde_json::json!([resource])
                && r["resourceNames"]
                    .as_array()
                    .is_none_or(|n| n.iter().any(|n| n == name))
                && r["verbs"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|v| v == verb))
        })
    };
    let tls_secret = run.agent_tls_secret.clone().context("--agent-tls-secret")?;
    for verb in ["create", "get", "update"] {
        assert!(
            allows("secrets", &tls_secret, verb),
            "secrets {tls_secret} {verb}"
        );
        assert!(
            allows("configmaps", &run.agent_ca_configmap, verb),
            "configmaps {} {verb}",
            run.agent_ca_configmap
        );
    }

    // A stopping leader finishes before the kubelet's SIGKILL.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .context("a grace period")?;
    assert!(Duration::from_secs(grace) > run.renew_deadline);
    // The disruption budget keeps one instance.
    let pdb = find(&objs, "PodDisruptionBudget", "nemesis-controller")?;
    assert!(selects(
        &labels(&pdb["spec"]["selector"]["matchLabels"]),
        &pod_labels
    ));
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    Ok(())
}

#[test]
fn uninstall_cleanup_parses_and_removes_the_instance_the_agent_pins() -> Result<()> {
    let objs = kustomize("")?;
    let ds = find(&objs, "DaemonSet", "nemesis-agent")?;
    let run = agent_run(&argv_of(ds, container(ds, "agent")?)?)?;
    let cleanup_objs = yaml_file("uninstall/agent-cleanup.yaml")?;
    let cds = find(&cleanup_objs, "DaemonSet", "nemesis-agent-cleanup")?;
    let c = container(cds, "cleanup")?;
    let argv = argv_of(cds, c)?;
    let parsed = AgentCli::try_parse_from(&argv)
        .map_err(|e| anyhow::anyhow!("`{}` does not parse:\n{e}", argv.join(" ")))?;
    let AgentCommand::Cleanup(cleanup) = parsed.command else {
        bail!("expected `cleanup`, got {:?}", parsed.command)
    };
    assert_eq!(cleanup.instance.instance, run.datapath.instance.instance);
    assert_eq!(cleanup.instance.bpffs, run.datapath.instance.bpffs);
    // The same host directory under that path.
    let bpffs: PathBuf = cleanup.instance.bpffs.context("--bpffs")?;
    let (vol, _) = volume_at(cds, c, &bpffs)?;
    let (agent_vol, _) = volume_at(ds, container(ds, "agent")?, &bpffs)?;
    assert_eq!(vol["hostPath"]["path"], agent_vol["hostPath"]["path"]);
    assert_eq!(cds["metadata"]["namespace"], NAMESPACE);
    Ok(())
}

#[test]
fn env_translation_refuses_variables_no_flag_reads() -> Result<()> {
    // The check itself must fail on drift: a variable the CLI does not know.
    let c = serde_json::json!({
        "name": "agent", "command": ["nemesis-agent"], "args": ["run"],
        "env": [{"name": "NEMESIS_AGENT_NO_SUCH_SETTING", "value": "1"}]
    });
    let env = vec![("NEMESIS_AGENT_NO_SUCH_SETTING".to_string(), "1".to_string())];
    let err = argv(&AgentCli::command(), &c, &env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("read by no argument"), "{err}");
    // And a known one becomes its flag, which clap then parses.
    let env = vec![(
        "NEMESIS_AGENT_ADMIN_LISTEN".to_string(),
        "127.0.0.1:1".to_string(),
    )];
    let run = agent_run(&argv(&AgentCli::command(), &c, &env)?)?;
    assert_eq!(run.admin_listen, "127.0.0.1:1".parse()?);
    let ip: IpAddr = "127.0.0.1".parse()?;
    assert_eq!(run.admin_listen.ip(), ip);
    Ok(())
}
