//! Applying YAML manifests through the API, as `kubectl apply --server-side -f` does:
//! each document is resolved by discovery and server-side applied; a
//! CustomResourceDefinition is waited for until it is Established, so that documents
//! after it may use its kind. It only reads the files it is given and writes through
//! the API; it never guesses a kind the server does not serve.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::api::{DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::Scope;
use kube::{Api, Client, ResourceExt};

/// The field manager the demo's objects are applied with.
pub const FIELD_MANAGER: &str = "nemesis-demo";
/// One API call; the test API server answers in milliseconds, so this means it is gone.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A CRD is Established at once by the test API server; a real one takes a moment.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("reading manifest {path}: {source}")]
    ReadManifest {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {origin}: {message}")]
    ParseManifest { origin: String, message: String },
    #[error("{origin}: `{field}` is missing")]
    MissingField { origin: String, field: &'static str },
    #[error("{origin}: the server does not serve {gvk:?}: {source}")]
    Discover {
        origin: String,
        gvk: GroupVersionKind,
        source: Box<kube::Error>,
    },
    #[error("{origin}: applying {kind} {name}: {source}")]
    Apply {
        origin: String,
        kind: String,
        name: String,
        source: Box<kube::Error>,
    },
    #[error("{origin}: applying {kind} {name}: no answer within {CALL_TIMEOUT:?}")]
    ApplyTimeout {
        origin: String,
        kind: String,
        name: String,
    },
    #[error("CustomResourceDefinition {name} was not Established within {ESTABLISH_TIMEOUT:?}")]
    CrdNotEstablished { name: String },
}

/// One document of a manifest file, with where it came from (`path#n`) for errors.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub origin: String,
    pub object: DynamicObject,
}

impl Manifest {
    pub fn kind(&self) -> &str {
        self.object
            .types
            .as_ref()
            .map(|t| t.kind.as_str())
            .unwrap_or_default()
    }
}

/// The documents of `paths` in order: a file's documents as written, a directory's
/// `*.yaml` / `*.yml` files by name (not recursive; `kustomization.yaml` left out). Empty
/// documents are skipped.
pub fn read_manifests(paths: &[PathBuf]) -> Result<Vec<Manifest>, ApplyError> {
    let mut out = Vec::new();
    for path in paths {
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| ApplyError::ReadManifest {
                    path: path.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                // A kustomization in the directory configures kustomize; it is no object.
                .filter(|p| {
                    p.is_file()
                        && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                        && !matches!(
                            p.file_name().and_then(|n| n.to_str()),
                            Some("kustomization.yaml" | "kustomization.yml")
                        )
                })
                .collect();
            files.sort();
            files
        } else {
            vec![path.clone()]
        };
        for file in files {
            let text =
                std::fs::read_to_string(&file).map_err(|source| ApplyError::ReadManifest {
                    path: file.clone(),
                    source,
                })?;
            out.extend(parse_documents(&file, &text)?);
        }
    }
    Ok(out)
}

/// The non-empty documents of one YAML stream.
pub fn parse_documents(file: &Path, text: &str) -> Result<Vec<Manifest>, ApplyError> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (n, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let origin = format!("{}#{}", file.display(), n + 1);
        let value =
            serde_norway::Value::deserialize(doc).map_err(|e| ApplyError::ParseManifest {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(value).map_err(|e| ApplyError::ParseManifest {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        for field in ["apiVersion", "kind"] {
            if !json.get(field).is_some_and(|v| v.is_string()) {
                return Err(ApplyError::MissingField { origin, field });
            }
        }
        if !json
            .pointer("/metadata/name")
            .is_some_and(|v| v.is_string())
        {
            return Err(ApplyError::MissingField {
                origin,
                field: "metadata.name",
            });
        }
        let object: DynamicObject =
            serde_json::from_value(json).map_err(|e| ApplyError::ParseManifest {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
        out.push(Manifest { origin, object });
    }
    Ok(out)
}

/// Server-side applies every manifest in order (`force`, as one owner of these objects
/// should) and returns what the server stored. Namespaced objects without a namespace
/// go to `default`.
pub async fn apply_all(
    client: &Client,
    manifests: &[Manifest],
) -> Result<Vec<DynamicObject>, ApplyError> {
    let mut applied = Vec::with_capacity(manifests.len());
    for m in manifests {
        applied.push(apply_one(client, m).await?);
    }
    Ok(applied)
}

async fn apply_one(client: &Client, m: &Manifest) -> Result<DynamicObject, ApplyError> {
    let types = m.object.types.clone().unwrap_or_default();
    let gvk = GroupVersionKind::try_from(&types).map_err(|e| ApplyError::ParseManifest {
        origin: m.origin.clone(),
        message: e.to_string(),
    })?;
    let discover =
        tokio::time::timeout(CALL_TIMEOUT, kube::discovery::pinned_kind(client, &gvk)).await;
    let (resource, caps) = match discover {
        Ok(Ok(found)) => found,
        Ok(Err(source)) => {
            return Err(ApplyError::Discover {
                origin: m.origin.clone(),
                gvk,
                source: Box::new(source),
            });
        }
        Err(_) => {
            return Err(ApplyError::ApplyTimeout {
                origin: m.origin.clone(),
                kind: gvk.kind,
                name: m.object.name_any(),
            });
        }
    };
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => {
            let ns = m.object.namespace().unwrap_or_else(|| "default".into());
            Api::namespaced_with(client.clone(), &ns, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let name = m.object.name_any();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let answer = tokio::time::timeout(
        CALL_TIMEOUT,
        api.patch(&name, &params, &Patch::Apply(&m.object)),
    )
    .await;
    let stored = match answer {
        Ok(Ok(obj)) => obj,
        Ok(Err(source)) => {
            return Err(ApplyError::Apply {
                origin: m.origin.clone(),
                kind: gvk.kind,
                name,
                source: Box::new(source),
            });
        }
        Err(_) => {
            return Err(ApplyError::ApplyTimeout {
                origin: m.origin.clone(),
                kind: gvk.kind,
                name,
            });
        }
    };
    tracing::info!(origin = %m.origin, kind = %gvk.kind, %name, "applied");
    if gvk.group == "apiextensions.k8s.io" && gvk.kind == "CustomResourceDefinition" {
        wait_established(&api, &name).await?;
    }
    Ok(stored)
}

async fn wait_established(api: &Api<DynamicObject>, name: &str) -> Result<(), ApplyError> {
    let deadline = tokio::time::Instant::now() + ESTABLISH_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if let Ok(Ok(crd)) = tokio::time::timeout(CALL_TIMEOUT, api.get(name)).await
            && is_established(&crd.data)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(ApplyError::CrdNotEstablished {
        name: name.to_string(),
    })
}

fn is_established(crd: &serde_json::Value) -> bool {
    crd.pointer("/status/conditions")
        .and_then(|c| c.as_array())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        })
}

/// Gives every Service in `manifests` that asks for no ClusterIP (and is not headless)
/// the next address from `next_ip`, so the Service proxy can listen on it. Returns
/// how many were given one, or the origin of the first Service left without one.
pub fn assign_cluster_ips(
    manifests: &mut [Manifest],
    mut next_ip: impl FnMut() -> Option<std::net::Ipv4Addr>,
) -> Result<usize, String> {
    let mut given = 0;
    for m in manifests.iter_mut() {
        if m.kind() != "Service"
            || m.object.types.as_ref().map(|t| t.api_version.as_str()) != Some("v1")
        {
            continue;
        }
        let spec = &mut m.object.data["spec"];
        let asked = spec["clusterIP"].as_str().unwrap_or_default();
        if !asked.is_empty() || spec["type"] == "ExternalName" {
            continue;
        }
        let ip = next_ip().ok_or_else(|| m.origin.clone())?;
        spec["clusterIP"] = serde_json::json!(ip.to_string());
        spec["clusterIPs"] = serde_json::json!([ip.to_string()]);
        given += 1;
    }
    Ok(given)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_DOCS: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
# only a comment
---
apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: demo
spec:
  ports:
  - port: 80
";

    #[test]
    fn documents_keep_their_order_and_origin_and_empty_ones_are_skipped() {
        let docs = parse_documents(Path::new("x.yaml"), TWO_DOCS).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].kind(), "Namespace");
        assert_eq!(docs[0].origin, "x.yaml#1");
        assert_eq!(docs[1].kind(), "Service");
        assert_eq!(docs[1].origin, "x.yaml#3");
    }

    #[test]
    fn a_document_without_a_name_says_which_and_what() {
        let err = parse_documents(
            Path::new("bad.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {}\n",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "bad.yaml#1: `metadata.name` is missing");
        let err = parse_documents(Path::new("bad.yaml"), "kind: Service\n").unwrap_err();
        assert_eq!(err.to_string(), "bad.yaml#1: `apiVersion` is missing");
    }

    #[test]
    fn services_without_a_cluster_ip_get_the_next_one_and_others_keep_theirs() {
        let mut docs = parse_documents(Path::new("x.yaml"), TWO_DOCS).unwrap();
        let mut fixed = parse_documents(
            Path::new("y.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: None}\n",
        )
        .unwrap();
        docs.append(&mut fixed);
        let mut ips = vec!["127.96.200.1".parse().unwrap()].into_iter();
        assert_eq!(assign_cluster_ips(&mut docs, || ips.next()), Ok(1));
        assert_eq!(docs[1].object.data["spec"]["clusterIP"], "127.96.200.1");
        assert_eq!(docs[2].object.data["spec"]["clusterIP"], "None");
    }

    #[test]
    fn running_out_of_cluster_ips_names_the_service_left_without() {
        let mut docs = parse_documents(Path::new("x.yaml"), TWO_DOCS).unwrap();
        assert_eq!(
            assign_cluster_ips(&mut docs, || None),
            Err("x.yaml#3".to_string())
        );
    }
}
