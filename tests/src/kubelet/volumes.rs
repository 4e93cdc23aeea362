//! A pod's volumes and the API objects its environment reads, made ready before any
//! container starts, as the kubelet mounts volumes first: Secret and ConfigMap volumes
//! become files in the pod's directory (`items` or every key, `defaultMode`), `emptyDir`
//! a directory of the pod, `hostPath` the host's path (created for
//! `DirectoryOrCreate`), a `persistentVolumeClaim` a directory of the node that outlives
//! the pod (a local-path provisioner's job), owned by the pod's `fsGroup`, a `projected`
//! volume one directory of pod-bound ServiceAccount tokens (audience, lifetime, path as
//! asked; not refreshed before they expire) and Secret and ConfigMap keys. A missing
//! Secret, ConfigMap or claim is a retryable failure (the pod waits in
//! `ContainerCreating`, as on a cluster until the Secret is created); an unsupported
//! volume type is said by name. Also writes the pod's `/etc/hosts`: localhost, the pod's
//! own name, and every Service as `<name>.<namespace>.svc[.cluster.local]` (the
//! sandbox's stand-in for cluster DNS, as of the pod's start).
//! Writes only under the pod's directory and the node's claim directory, plus the
//! `DirectoryOrCreate` host paths a pod asks for.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMap, KeyToPath, PersistentVolumeClaim, Pod, ProjectedVolumeSource, Secret, Service,
    Volume,
};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::call::{CallError, call};
use super::service_account;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{kind} \"{name}\" not found")]
    Missing { kind: &'static str, name: String },
    #[error("reading {kind} \"{name}\": {source}")]
    Read {
        kind: &'static str,
        name: String,
        source: CallError,
    },
    #[error("volume \"{volume}\": {what} is not supported by the sandbox kubelet")]
    Unsupported { volume: String, what: &'static str },
    #[error("volume \"{volume}\": key \"{key}\" is not in {kind} \"{name}\"")]
    MissingKey {
        volume: String,
        kind: &'static str,
        name: String,
        key: String,
    },
    #[error("volume \"{volume}\": hostPath {path}: {message}")]
    HostPath {
        volume: String,
        path: String,
        message: String,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("volume \"{volume}\": requesting the ServiceAccount token: {message}")]
    Token { volume: String, message: String },
    #[error("listing Services for /etc/hosts: {0}")]
    ListServices(CallError),
}

/// A volume ready to be mounted: where its files are, and whether it is read-only
/// whatever the mount says (Secrets and ConfigMaps are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Everything the pod's containers read from the API or the node.
#[derive(Debug, Clone, Default)]
pub struct PodVolumes {
    pub volumes: HashMap<String, Ready>,
    /// Secrets and ConfigMaps by name, for `secretKeyRef` / `configMapKeyRef`; a missing
    /// one the pod marks optional is absent here.
    pub secrets: HashMap<String, BTreeMap<String, String>>,
    pub config_maps: HashMap<String, BTreeMap<String, String>>,
    /// The pod's `/etc/hosts`.
    pub hosts: Option<PathBuf>,
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Write {
        path: path.to_path_buf(),
        source,
    }
}

async fn secret_data(
    api: &Api<Secret>,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, VolumeError> {
    match call(api.get(name)).await {
        Ok(s) => Ok(Some(
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
        )),
        Err(e) if e.is_not_found() => Ok(None),
        Err(source) => Err(VolumeError::Read {
            kind: "secret",
            name: name.into(),
            source,
        }),
    }
}

async fn config_map_data(
    api: &Api<ConfigMap>,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, VolumeError> {
    match call(api.get(name)).await {
        Ok(c) => {
            let mut data: BTreeMap<String, Vec<u8>> = c
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                c.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            Ok(Some(data))
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(source) => Err(VolumeError::Read {
            kind: "configmap",
            name: name.into(),
            source,
        }),
    }
}

fn as_strings(data: BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    data.into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect()
}

/// Writes `data` (only `items` when given) into `dir` with `mode`.
#[allow(clippy::too_many_arguments, reason = "one volume's source, all needed")]
fn write_keys(
    volume: &str,
    kind: &'static str,
    name: &str,
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    mode: u32,
    optional: bool,
) -> Result<(), VolumeError> {
    let files = select_keys(volume, kind, name, data, items, mode, optional)?;
    write_files(dir, files)
}

/// The files one Secret or ConfigMap source makes: `(relative path, bytes, mode)`.
#[allow(clippy::too_many_arguments, reason = "one volume's source, all needed")]
fn select_keys(
    volume: &str,
    kind: &'static str,
    name: &str,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    mode: u32,
    optional: bool,
) -> Result<Vec<(String, Vec<u8>, u32)>, VolumeError> {
    match items {
        Some(items) => {
            let mut out = Vec::new();
            for item in items {
                match data.get(&item.key) {
                    Some(v) => out.push((
                        item.path.clone(),
                        v.clone(),
                        item.mode.map_or(mode, |m| m as u32),
                    )),
                    None if optional => {}
                    None => {
                        return Err(VolumeError::MissingKey {
                            volume: volume.into(),
                            kind,
                            name: name.into(),
                            key: item.key.clone(),
                        });
                    }
                }
            }
            Ok(out)
        }
        None => Ok(data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone(), mode))
            .collect()),
    }
}

/// Replaces `dir` with exactly `files`.
fn write_files(dir: &Path, files: Vec<(String, Vec<u8>, u32)>) -> Result<(), VolumeError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(write_err(dir))?;
    for (rel, bytes, mode) in files {
        let path = dir.join(rel.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(write_err(parent))?;
        }
        std::fs::write(&path, bytes).map_err(write_err(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(write_err(&path))?;
    }
    Ok(())
}

/// The files of a `projected` volume: ServiceAccount tokens bound to `pod` for the
/// audience asked (as the kubelet's token manager requests them), and Secret and
/// ConfigMap keys, all in one directory.
async fn projected_files(
    client: &Client,
    pod: &Pod,
    volume: &str,
    p: &ProjectedVolumeSource,
    secrets: &Api<Secret>,
    config_maps: &Api<ConfigMap>,
) -> Result<Vec<(String, Vec<u8>, u32)>, VolumeError> {
    let mode = p.default_mode.unwrap_or(0o644) as u32;
    let mut files = Vec::new();
    for source in p.sources.iter().flatten() {
        if let Some(t) = &source.service_account_token {
            let audiences: Vec<String> = t.audience.iter().cloned().collect();
            let expiration = t
                .expiration_seconds
                .unwrap_or(service_account::EXPIRATION_SECS);
            let token = service_account::bound_token(client, pod, &audiences, expiration)
                .await
                .map_err(|e| VolumeError::Token {
                    volume: volume.into(),
                    message: e.to_string(),
                })?;
            files.push((t.path.clone(), token.into_bytes(), mode));
        } else if let Some(s) = &source.secret {
            let optional = s.optional.unwrap_or(false);
            match secret_data(secrets, &s.name).await? {
                Some(d) => files.extend(select_keys(
                    volume,
                    "secret",
                    &s.name,
                    &d,
                    s.items.as_ref(),
                    mode,
                    optional,
                )?),
                None if optional => {}
                None => {
                    return Err(VolumeError::Missing {
                        kind: "secret",
                        name: s.name.clone(),
                    });
                }
            }
        } else if let Some(c) = &source.config_map {
            let optional = c.optional.unwrap_or(false);
            match config_map_data(config_maps, &c.name).await? {
                Some(d) => files.extend(select_keys(
                    volume,
                    "configmap",
                    &c.name,
                    &d,
                    c.items.as_ref(),
                    mode,
                    optional,
                )?),
                None if optional => {}
                None => {
                    return Err(VolumeError::Missing {
                        kind: "configmap",
                        name: c.name.clone(),
                    });
                }
            }
        } else {
            return Err(VolumeError::Unsupported {
                volume: volume.into(),
                what: "this projected source (supported: serviceAccountToken, secret, configMap)",
            });
        }
    }
    Ok(files)
}

/// A directory writable by the pod's `fsGroup`, as the kubelet's ownership management
/// makes it (group-owned, setgid, group-writable).
fn own_dir(dir: &Path, fs_group: Option<u32>) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    if let Some(gid) = fs_group {
        std::os::unix::fs::chown(dir, None, Some(gid)).map_err(write_err(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2775))
            .map_err(write_err(dir))?;
    }
    Ok(())
}

fn host_path(volume: &str, path: &str, ty: &str) -> Result<PathBuf, VolumeError> {
    let p = PathBuf::from(path);
    let fail = |message: String| VolumeError::HostPath {
        volume: volume.into(),
        path: path.into(),
        message,
    };
    match ty {
        "DirectoryOrCreate" => {
            std::fs::create_dir_all(&p).map_err(|e| fail(e.to_string()))?;
        }
        "Directory" if !p.is_dir() => return Err(fail("is not a directory".into())),
        "File" if !p.is_file() => return Err(fail("is not a file".into())),
        "" | "Directory" | "File" => {}
        "FileOrCreate" if !p.exists() => {
            std::fs::write(&p, b"").map_err(|e| fail(e.to_string()))?;
        }
        "FileOrCreate" => {}
        other => {
            if !p.exists() {
                return Err(fail(format!("does not exist (type {other})")));
            }
        }
    }
    Ok(p)
}

/// The directory a claim's data lives in on this node.
pub fn claim_dir(claims_dir: &Path, namespace: &str, claim: &str) -> PathBuf {
    claims_dir.join(format!("{namespace}_{claim}"))
}

/// Makes every volume of `pod` ready under `pod_dir` (claims under `claims_dir`), reads
/// the Secrets and ConfigMaps its containers' env refers to, and writes its hosts file.
pub async fn prepare(
    client: &Client,
    pod: &Pod,
    pod_dir: &Path,
    claims_dir: &Path,
    pod_ip: std::net::Ipv4Addr,
) -> Result<PodVolumes, VolumeError> {
    let namespace = pod.namespace().unwrap_or_else(|| "default".into());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    let spec = pod.spec.clone().unwrap_or_default();
    let fs_group = spec
        .security_context
        .as_ref()
        .and_then(|s| s.fs_group)
        .map(|g| g as u32);
    let mut out = PodVolumes::default();
    for Volume {
        name,
        secret,
        config_map,
        host_path: host,
        empty_dir,
        persistent_volume_claim,
        projected,
        ..
    } in spec.volumes.iter().flatten().cloned()
    {
        let dir = pod_dir.join("volumes").join(&name);
        let ready = if let Some(s) = secret {
            let secret_name = s.secret_name.clone().unwrap_or_default();
            let optional = s.optional.unwrap_or(false);
            let data = match secret_data(&secrets, &secret_name).await? {
                Some(d) => d,
                None if optional => BTreeMap::new(),
                None => {
                    return Err(VolumeError::Missing {
                        kind: "secret",
                        name: secret_name,
                    });
                }
            };
            let mode = s.default_mode.unwrap_or(0o644) as u32;
            write_keys(
                &name,
                "secret",
                &secret_name,
                &dir,
                &data,
                s.items.as_ref(),
                mode,
                optional,
            )?;
            Ready {
                path: dir,
                read_only: true,
            }
        } else if let Some(c) = config_map {
            let cm_name = c.name.clone();
            let optional = c.optional.unwrap_or(false);
            let data = match config_map_data(&config_maps, &cm_name).await? {
                Some(d) => d,
                None if optional => BTreeMap::new(),
                None => {
                    return Err(VolumeError::Missing {
                        kind: "configmap",
                        name: cm_name,
                    });
                }
            };
            let mode = c.default_mode.unwrap_or(0o644) as u32;
            write_keys(
                &name,
                "configmap",
                &cm_name,
                &dir,
                &data,
                c.items.as_ref(),
                mode,
                optional,
            )?;
            Ready {
                path: dir,
                read_only: true,
            }
        } else if let Some(h) = host {
            Ready {
                path: host_path(&name, &h.path, h.type_.as_deref().unwrap_or(""))?,
                read_only: false,
            }
        } else if let Some(p) = projected {
            let files = projected_files(client, pod, &name, &p, &secrets, &config_maps).await?;
            write_files(&dir, files)?;
            Ready {
                path: dir,
                read_only: true,
            }
        } else if empty_dir.is_some() {
            own_dir(&dir, fs_group)?;
            Ready {
                path: dir,
                read_only: false,
            }
        } else if let Some(pvc) = persistent_volume_claim {
            match call(claims.get(&pvc.claim_name)).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {
                    return Err(VolumeError::Missing {
                        kind: "persistentvolumeclaim",
                        name: pvc.claim_name,
                    });
                }
                Err(source) => {
                    return Err(VolumeError::Read {
                        kind: "persistentvolumeclaim",
                        name: pvc.claim_name,
                        source,
                    });
                }
            }
            let dir = claim_dir(claims_dir, &namespace, &pvc.claim_name);
            own_dir(&dir, fs_group)?;
            Ready {
                path: dir,
                read_only: pvc.read_only.unwrap_or(false),
            }
        } else {
            return Err(VolumeError::Unsupported {
                volume: name,
                what: "this volume type (supported: secret, configMap, projected, hostPath, emptyDir, persistentVolumeClaim)",
            });
        };
        out.volumes.insert(name, ready);
    }
    // What env's valueFrom refers to.
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for var in c.env.iter().flatten() {
            let Some(from) = &var.value_from else {
                continue;
            };
            if let Some(r) = &from.secret_key_ref
                && !out.secrets.contains_key(&r.name)
            {
                match secret_data(&secrets, &r.name).await? {
                    Some(d) => {
                        out.secrets.insert(r.name.clone(), as_strings(d));
                    }
                    None if r.optional.unwrap_or(false) => {}
                    None => {
                        return Err(VolumeError::Missing {
                            kind: "secret",
                            name: r.name.clone(),
                        });
                    }
                }
            }
            if let Some(r) = &from.config_map_key_ref
                && !out.config_maps.contains_key(&r.name)
            {
                match config_map_data(&config_maps, &r.name).await? {
                    Some(d) => {
                        out.config_maps.insert(r.name.clone(), as_strings(d));
                    }
                    None if r.optional.unwrap_or(false) => {}
                    None => {
                        return Err(VolumeError::Missing {
                            kind: "configmap",
                            name: r.name.clone(),
                        });
                    }
                }
            }
        }
    }
    let services: Api<Service> = Api::all(client.clone());
    let listed = call(services.list(&ListParams::default()))
        .await
        .map_err(VolumeError::ListServices)?;
    let hostname = spec.hostname.clone().unwrap_or_else(|| pod.name_any());
    let hosts = hosts_file(&hostname, pod_ip, &listed.items);
    let path = pod_dir.join("etc-hosts");
    std::fs::create_dir_all(pod_dir).map_err(write_err(pod_dir))?;
    std::fs::write(&path, hosts).map_err(write_err(&path))?;
    out.hosts = Some(path);
    Ok(out)
}

/// The pod's `/etc/hosts`: localhost, the pod's hostname at its IP, then every Service
/// with a ClusterIP under its cluster DNS names.
pub fn hosts_file(hostname: &str, pod_ip: std::net::Ipv4Addr, services: &[Service]) -> String {
    let mut out = format!(
        "# Kubernetes-managed hosts file (the sandbox kubelet).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{pod_ip}\t{hostname}\n"
    );
    for s in services {
        let ip = s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
        let Some(ip) = ip.filter(|ip| !ip.is_empty() && *ip != "None") else {
            continue;
        };
        let (name, ns) = (s.name_any(), s.namespace().unwrap_or_default());
        out.push_str(&format!(
            "{ip}\t{name}.{ns}.svc {name}.{ns}.svc.cluster.local\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_the_pod_and_every_service_with_a_cluster_ip() {
        let svc = |name: &str, ip: &str| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "sys"},
                "spec": {"clusterIP": ip},
            }))
            .unwrap()
        };
        let text = hosts_file(
            "web-0",
            "198.18.3.2".parse().unwrap(),
            &[svc("ctl", "127.96.128.1"), svc("headless", "None")],
        );
        assert!(text.contains("198.18.3.2\tweb-0\n"), "{text}");
        assert!(
            text.contains("127.96.128.1\tctl.sys.svc ctl.sys.svc.cluster.local\n"),
            "{text}"
        );
        assert!(!text.contains("headless"), "{text}");
    }

    #[test]
    fn secret_items_pick_keys_and_a_missing_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let data = BTreeMap::from([("token".to_string(), b"t0k".to_vec())]);
        let items = vec![KeyToPath {
            key: "token".into(),
            path: "sub/token".into(),
            mode: None,
            ..Default::default()
        }];
        let vol = dir.path().join("v");
        write_keys("v", "secret", "s", &vol, &data, Some(&items), 0o644, false).unwrap();
        assert_eq!(std::fs::read(vol.join("sub/token")).unwrap(), b"t0k");
        let missing = vec![KeyToPath {
            key: "nope".into(),
            path: "x".into(),
            mode: None,
            ..Default::default()
        }];
        let err = write_keys(
            "v",
            "secret",
            "s",
            &vol,
            &data,
            Some(&missing),
            0o644,
            false,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "volume \"v\": key \"nope\" is not in secret \"s\""
        );
    }
}
