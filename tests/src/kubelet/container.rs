//! Turns a pod's container spec into a [`Launch`]: the environment (the pod's identity as
//! `POD_NAME`/`POD_NAMESPACE`/`POD_IP`, then the spec's `env` with the downward-API
//! fields the sandbox knows, `secretKeyRef` and `configMapKeyRef` from what the volume
//! step read), `$(VAR)` expansion of command and args as Kubernetes does it, the
//! start-delay annotation, and for a container run from an image its root, user,
//! working directory and mounts. Pure: no I/O, so every rule is tested alone.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};

use super::images::{Image, image_user};
use super::process::{ImageLaunch, Launch, MountSpec};
use super::volumes::PodVolumes;

/// Milliseconds a container spends before running its command, to play a slow starter
/// (an ML server loading its model): the process runs but does not listen yet.
pub const START_DELAY_ANNOTATION: &str = "nemesis.test/start-delay-ms";

/// Why a container's configuration cannot be turned into a process; reported in the
/// container status as `CreateContainerConfigError`, as a kubelet does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "container {container}: `command` is empty; the sandbox runs no images, so the command must be given"
    )]
    NoCommand { container: String },
    #[error(
        "container {container}: env {var}: {source_kind} is not supported by the sandbox kubelet"
    )]
    UnsupportedEnvSource {
        container: String,
        var: String,
        source_kind: &'static str,
    },
    #[error("container {container}: env {var}: unsupported fieldRef `{field}`")]
    UnsupportedFieldRef {
        container: String,
        var: String,
        field: String,
    },
    #[error("container {container}: envFrom is not supported by the sandbox kubelet")]
    UnsupportedEnvFrom { container: String },
    #[error("annotation {key}: `{value}` is not a whole number of milliseconds")]
    BadAnnotation { key: String, value: String },
    #[error("container {container}: env {var}: {message}")]
    EnvSource {
        container: String,
        var: String,
        message: String,
    },
    #[error("container {container}: volumeMount {volume}: no volume of that name in the pod")]
    NoVolume { container: String, volume: String },
    #[error("container {container}: image {image}: {message}")]
    ImageUser {
        container: String,
        image: String,
        message: String,
    },
}

/// Where and as what the pod runs on this node.
#[derive(Debug, Clone)]
pub struct PodPlacement<'a> {
    pub netns: &'a str,
    pub pod_ip: Ipv4Addr,
    /// The pod's second address (the sandbox is dual-stack, IPv4 first).
    pub pod_ip_v6: std::net::Ipv6Addr,
    pub node_name: &'a str,
    pub host_ip: Ipv4Addr,
    pub host_ip_v6: std::net::Ipv6Addr,
    /// The pod's scratch directory: default working directory.
    pub pod_dir: &'a Path,
    pub log_path: PathBuf,
    /// The cgroup the container's processes join, if any.
    pub cgroup: Option<&'a Path>,
    /// The pod's projected ServiceAccount token directory, if it has one.
    pub service_account: Option<&'a Path>,
    /// The pod runs in the node's network namespace (`hostNetwork`).
    pub host_network: bool,
    /// What the volume step made ready and read.
    pub volumes: &'a PodVolumes,
    /// The container's image, when the node has it; `None`: run `command` on the host.
    pub image: Option<&'a Image>,
    /// Where the pod reaches the API server (`KUBERNETES_SERVICE_HOST`/`_PORT`).
    pub api_server: Option<std::net::SocketAddr>,
}

/// The launch description for `container` of `pod`.
pub fn launch(
    pod: &Pod,
    container: &Container,
    place: &PodPlacement<'_>,
) -> Result<Launch, ConfigError> {
    let mut env = environment(pod, container, place)?;
    if let Some(image) = place.image {
        // The image's Env comes first; the pod's own wins over it.
        let mut merged: Vec<(String, String)> = image
            .env
            .iter()
            .filter(|(k, _)| !env.iter().any(|(e, _)| e == k))
            .cloned()
            .collect();
        merged.append(&mut env);
        env = merged;
    }
    let lookup: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let given_command = container.command.as_ref().filter(|c| !c.is_empty());
    let (command, args): (Vec<String>, Vec<String>) = match (place.image, given_command) {
        (_, Some(cmd)) => (cmd.clone(), container.args.clone().unwrap_or_default()),
        (Some(image), None) => (
            image.entrypoint.clone(),
            container.args.clone().unwrap_or_else(|| image.cmd.clone()),
        ),
        (None, None)
            if container
                .image
                .as_deref()
                .is_some_and(super::images::is_pause) =>
        {
            (
                super::images::PAUSE_ARGV.map(String::from).to_vec(),
                Vec::new(),
            )
        }
        (None, None) => {
            return Err(ConfigError::NoCommand {
                container: container.name.clone(),
            });
        }
    };
    let argv: Vec<String> = command
        .iter()
        .chain(args.iter())
        .map(|a| expand(a, &lookup))
        .collect();
    if argv.is_empty() {
        return Err(ConfigError::NoCommand {
            container: container.name.clone(),
        });
    }
    let image = place
        .image
        .map(|image| image_launch(pod, container, place, image))
        .transpose()?;
    Ok(Launch {
        netns: place.netns.to_string(),
        host_network: place.host_network,
        argv,
        env,
        working_dir: match image {
            // The host side of an image's container runs where the pod's files are.
            Some(_) => place.pod_dir.to_path_buf(),
            None => container
                .working_dir
                .as_ref()
                .map(PathBuf::from)
                .unwrap_or_else(|| place.pod_dir.to_path_buf()),
        },
        start_delay: annotation_ms(pod, START_DELAY_ANNOTATION)?.unwrap_or_default(),
        log_path: place.log_path.clone(),
        cgroup: place.cgroup.map(Path::to_path_buf),
        service_account: place.service_account.map(Path::to_path_buf),
        image,
    })
}

/// Root, user, working directory and mounts of a container run from `image`.
fn image_launch(
    pod: &Pod,
    container: &Container,
    place: &PodPlacement<'_>,
    image: &Image,
) -> Result<ImageLaunch, ConfigError> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = container.security_context.as_ref();
    let (image_uid, image_gid) = image_user(image).map_err(|message| ConfigError::ImageUser {
        container: container.name.clone(),
        image: image.reference.clone(),
        message,
    })?;
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user))
        .map_or(image_uid, |u| u as u32);
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|s| s.run_as_group))
        .map_or(image_gid, |g| g as u32);
    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let ready = place
            .volumes
            .volumes
            .get(&m.name)
            .ok_or_else(|| ConfigError::NoVolume {
                container: container.name.clone(),
                volume: m.name.clone(),
            })?;
        let source = match m.sub_path.as_deref().filter(|p| !p.is_empty()) {
            Some(sub) => ready.path.join(sub),
            None => ready.path.clone(),
        };
        mounts.push(MountSpec {
            source,
            target: m.mount_path.clone(),
            read_only: ready.read_only || m.read_only.unwrap_or(false),
        });
    }
    if let Some(dir) = place.service_account {
        mounts.push(MountSpec {
            source: dir.to_path_buf(),
            target: super::service_account::MOUNT_PATH.into(),
            read_only: true,
        });
    }
    if let Some(hosts) = &place.volumes.hosts {
        mounts.push(MountSpec {
            source: hosts.clone(),
            target: "/etc/hosts".into(),
            read_only: false,
        });
    }
    let working_dir = container
        .working_dir
        .clone()
        .filter(|d| !d.is_empty())
        .or_else(|| Some(image.working_dir.clone()).filter(|d| !d.is_empty()))
        .unwrap_or_else(|| "/".into());
    Ok(ImageLaunch {
        rootfs: image.rootfs.clone(),
        scratch: place.pod_dir.join(format!("rootfs-{}", container.name)),
        mounts,
        uid,
        gid,
        working_dir,
        read_only_root: sc
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
    })
}

/// A millisecond annotation of the pod, if present.
pub fn annotation_ms(pod: &Pod, key: &str) -> Result<Option<Duration>, ConfigError> {
    let Some(value) = pod.metadata.annotations.as_ref().and_then(|a| a.get(key)) else {
        return Ok(None);
    };
    value
        .trim()
        .parse::<u64>()
        .map(|ms| Some(Duration::from_millis(ms)))
        .map_err(|_| ConfigError::BadAnnotation {
            key: key.to_string(),
            value: value.clone(),
        })
}

fn environment(
    pod: &Pod,
    container: &Container,
    place: &PodPlacement<'_>,
) -> Result<Vec<(String, String)>, ConfigError> {
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(ConfigError::UnsupportedEnvFrom {
            container: container.name.clone(),
        });
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut env: Vec<(String, String)> = vec![
        ("HOSTNAME".into(), name.clone()),
        ("POD_NAME".into(), name),
        ("POD_NAMESPACE".into(), namespace),
        ("POD_IP".into(), place.pod_ip.to_string()),
    ];
    if let Some(api) = place.api_server {
        // What in-cluster clients read, as the kubelet sets it for the `kubernetes` Service.
        env.push(("KUBERNETES_SERVICE_HOST".into(), api.ip().to_string()));
        env.push(("KUBERNETES_SERVICE_PORT".into(), api.port().to_string()));
        env.push((
            "KUBERNETES_SERVICE_PORT_HTTPS".into(),
            api.port().to_string(),
        ));
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => {
                let unsupported = |source_kind| ConfigError::UnsupportedEnvSource {
                    container: container.name.clone(),
                    var: var.name.clone(),
                    source_kind,
                };
                if let Some(field) = &from.field_ref {
                    field_value(pod, place, &field.field_path).ok_or_else(|| {
                        ConfigError::UnsupportedFieldRef {
                            container: container.name.clone(),
                            var: var.name.clone(),
                            field: field.field_path.clone(),
                        }
                    })?
                } else if let Some(r) = &from.secret_key_ref {
                    match key_ref(
                        &place.volumes.secrets,
                        "secret",
                        &r.name,
                        &r.key,
                        r.optional,
                    ) {
                        Ok(Some(v)) => v,
                        Ok(None) => continue,
                        Err(message) => {
                            return Err(ConfigError::EnvSource {
                                container: container.name.clone(),
                                var: var.name.clone(),
                                message,
                            });
                        }
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    match key_ref(
                        &place.volumes.config_maps,
                        "configmap",
                        &r.name,
                        &r.key,
                        r.optional,
                    ) {
                        Ok(Some(v)) => v,
                        Ok(None) => continue,
                        Err(message) => {
                            return Err(ConfigError::EnvSource {
                                container: container.name.clone(),
                                var: var.name.clone(),
                                message,
                            });
                        }
                    }
                } else if from.resource_field_ref.is_some() {
                    return Err(unsupported("resourceFieldRef"));
                } else {
                    return Err(unsupported("this valueFrom"));
                }
            }
            (Some(value), None) => {
                let lookup: HashMap<&str, &str> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                expand(value, &lookup)
            }
            (None, None) => String::new(),
        };
        // A later definition wins, as with Kubernetes' env list.
        env.retain(|(k, _)| *k != var.name);
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

/// A `secretKeyRef` / `configMapKeyRef`: the value, `None` when optional and absent.
fn key_ref(
    objects: &HashMap<String, std::collections::BTreeMap<String, String>>,
    kind: &str,
    name: &str,
    key: &str,
    optional: Option<bool>,
) -> Result<Option<String>, String> {
    let optional = optional.unwrap_or(false);
    match objects.get(name) {
        None if optional => Ok(None),
        None => Err(format!("{kind} \"{name}\" not found")),
        Some(data) => match data.get(key) {
            Some(v) => Ok(Some(v.clone())),
            None if optional => Ok(None),
            None => Err(format!("couldn't find key {key} in {kind} {name}")),
        },
    }
}

/// The downward-API fields a pod may reference in `fieldRef` that the sandbox knows.
fn field_value(pod: &Pod, place: &PodPlacement<'_>, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let keyed = |prefix: &str, map: &Option<std::collections::BTreeMap<String, String>>| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.as_ref()?.get(key).cloned().unwrap_or_default())
    };
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => Some(place.node_name.to_string()),
        "spec.serviceAccountName" => Some(
            pod.spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
        ),
        "status.podIP" => Some(place.pod_ip.to_string()),
        // The plural fields list every family, comma-separated, as the kubelet does.
        "status.podIPs" => Some(format!("{},{}", place.pod_ip, place.pod_ip_v6)),
        "status.hostIP" => Some(place.host_ip.to_string()),
        "status.hostIPs" => Some(format!("{},{}", place.host_ip, place.host_ip_v6)),
        _ => keyed("metadata.labels['", &meta.labels)
            .or_else(|| keyed("metadata.annotations['", &meta.annotations)),
    }
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an undefined one is
/// left as written, and `$$` is an escaped `$`.
pub fn expand(input: &str, vars: &HashMap<&str, &str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        EnvVar, EnvVarSource, ObjectFieldSelector, SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                namespace: Some("demo".into()),
                uid: Some("u-1".into()),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn place(dir: &Path) -> PodPlacement<'_> {
        PodPlacement {
            netns: "nm3p2",
            pod_ip: Ipv4Addr::new(198, 18, 3, 2),
            pod_ip_v6: "fd6e:6d00:0:3::2".parse().unwrap(),
            node_name: "node-a",
            host_ip: Ipv4Addr::new(198, 18, 3, 1),
            host_ip_v6: "fd6e:6d00:0:3::1".parse().unwrap(),
            pod_dir: dir,
            log_path: dir.join("c.log"),
            cgroup: None,
            service_account: None,
            host_network: false,
            volumes: Box::leak(Box::default()),
            image: None,
            api_server: None,
        }
    }

    fn env_var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn field_var(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    api_version: None,
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn expansion_replaces_defined_keeps_undefined_and_unescapes() {
        let vars = HashMap::from([("POD_IP", "198.18.3.2"), ("PORT", "8080")]);
        assert_eq!(expand("$(POD_IP):$(PORT)", &vars), "198.18.3.2:8080");
        assert_eq!(
            expand("$(NOPE) $$(PORT) $x $", &vars),
            "$(NOPE) $(PORT) $x $"
        );
        assert_eq!(expand("$(unclosed", &vars), "$(unclosed");
    }

    #[test]
    fn launch_has_pod_identity_spec_env_and_expanded_args() {
        let dir = Path::new("/tmp/x");
        let container = Container {
            name: "web".into(),
            command: Some(vec!["server".into()]),
            args: Some(vec!["--bind".into(), "$(POD_IP):$(PORT)".into()]),
            env: Some(vec![
                env_var("PORT", "8080"),
                env_var("URL", "http://$(POD_IP):$(PORT)/"),
                field_var("APP", "metadata.labels['app']"),
                field_var("NODE", "spec.nodeName"),
            ]),
            ..Default::default()
        };
        let launch = launch(
            &pod(&[(START_DELAY_ANNOTATION, "1500")]),
            &container,
            &place(dir),
        )
        .unwrap();
        assert_eq!(launch.argv, ["server", "--bind", "198.18.3.2:8080"]);
        let env: HashMap<_, _> = launch.env.iter().cloned().collect();
        assert_eq!(env["POD_NAME"], "web-abc");
        assert_eq!(env["POD_NAMESPACE"], "demo");
        assert_eq!(env["POD_IP"], "198.18.3.2");
        assert_eq!(env["URL"], "http://198.18.3.2:8080/");
        assert_eq!(env["APP"], "web");
        assert_eq!(env["NODE"], "node-a");
        assert_eq!(launch.start_delay, Duration::from_millis(1500));
        assert_eq!(launch.working_dir, dir);
        assert_eq!(launch.netns, "nm3p2");
    }

    #[test]
    fn an_image_gives_entrypoint_env_and_user_that_the_pod_overrides() {
        use super::super::images::Image;
        use super::super::volumes::Ready;
        let image = Image {
            reference: "localhost/app:1".into(),
            rootfs: "/images/app".into(),
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["run".into()],
            env: vec![
                ("PATH".into(), "/bin".into()),
                ("MODE".into(), "image".into()),
            ],
            user: "65532:65532".into(),
            working_dir: String::new(),
        };
        let mut volumes = PodVolumes::default();
        volumes.volumes.insert(
            "token".into(),
            Ready {
                path: "/pod/volumes/token".into(),
                read_only: true,
            },
        );
        let dir = Path::new("/pod");
        let mut placed = place(dir);
        placed.image = Some(&image);
        placed.volumes = &volumes;
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "app",
            "args": ["serve", "--ip", "$(POD_IP)"],
            "env": [{"name": "MODE", "value": "pod"}],
            "securityContext": {"runAsUser": 1000, "readOnlyRootFilesystem": true},
            "volumeMounts": [{"name": "token", "mountPath": "/var/run/token"}],
        }))
        .unwrap();
        let launch = launch(&pod(&[]), &container, &placed).unwrap();
        assert_eq!(launch.argv, ["/bin/app", "serve", "--ip", "198.18.3.2"]);
        let env: HashMap<_, _> = launch.env.iter().cloned().collect();
        assert_eq!(env["MODE"], "pod");
        assert_eq!(env["PATH"], "/bin");
        let image = launch.image.expect("run from the image");
        assert_eq!((image.uid, image.gid), (1000, 65532));
        assert!(image.read_only_root);
        assert_eq!(image.working_dir, "/");
        assert_eq!(
            image.mounts,
            [MountSpec {
                source: "/pod/volumes/token".into(),
                target: "/var/run/token".into(),
                read_only: true,
            }]
        );
        // No args: the image's cmd. A mount of a volume the pod lacks is named.
        let bare = Container {
            name: "app".into(),
            ..Default::default()
        };
        assert_eq!(
            launch_of_bare(&bare, &placed),
            ["/bin/app".to_string(), "run".to_string()]
        );
        let unknown: Container = serde_json::from_value(serde_json::json!({
            "name": "app",
            "volumeMounts": [{"name": "nope", "mountPath": "/x"}],
        }))
        .unwrap();
        let err = super::launch(&pod(&[]), &unknown, &placed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "container app: volumeMount nope: no volume of that name in the pod"
        );
    }

    fn launch_of_bare(c: &Container, placed: &PodPlacement<'_>) -> Vec<String> {
        launch(&pod(&[]), c, placed).unwrap().argv
    }

    #[test]
    fn a_container_without_command_is_refused_with_its_name() {
        let container = Container {
            name: "web".into(),
            args: Some(vec!["x".into()]),
            ..Default::default()
        };
        let err = launch(&pod(&[]), &container, &place(Path::new("/tmp"))).unwrap_err();
        assert_eq!(
            err,
            ConfigError::NoCommand {
                container: "web".into()
            }
        );
    }

    #[test]
    fn a_missing_secret_in_env_is_named_rather_than_left_empty() {
        let container = Container {
            name: "web".into(),
            command: Some(vec!["x".into()]),
            env: Some(vec![EnvVar {
                name: "TOKEN".into(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: "s".into(),
                        key: "k".into(),
                        optional: None,
                    }),
                    ..Default::default()
                }),
            }]),
            ..Default::default()
        };
        let err = launch(&pod(&[]), &container, &place(Path::new("/tmp"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "container web: env TOKEN: secret \"s\" not found"
        );
        let mut volumes = PodVolumes::default();
        volumes
            .secrets
            .insert("s".into(), [("k".to_string(), "v4lue".to_string())].into());
        let mut placed = place(Path::new("/tmp"));
        placed.volumes = &volumes;
        let launch = launch(&pod(&[]), &container, &placed).unwrap();
        assert!(launch.env.contains(&("TOKEN".into(), "v4lue".into())));
    }

    #[test]
    fn a_malformed_start_delay_names_the_annotation() {
        let container = Container {
            name: "web".into(),
            command: Some(vec!["x".into()]),
            ..Default::default()
        };
        let err = launch(
            &pod(&[(START_DELAY_ANNOTATION, "2s")]),
            &container,
            &place(Path::new("/tmp")),
        )
        .unwrap_err();
        assert!(err.to_string().contains(START_DELAY_ANNOTATION), "{err}");
    }
}
