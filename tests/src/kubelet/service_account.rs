//! The projected ServiceAccount token a kubelet gives each pod (upstream's
//! `kube-api-access-*` volume): a token from TokenRequest for the pod's ServiceAccount,
//! bound to the pod (it dies with it), with the namespace and the cluster CA, written to
//! a directory of the pod's own that its containers see at
//! `/var/run/secrets/kubernetes.io/serviceaccount`, where client libraries look. Skipped
//! when the pod or its ServiceAccount turns automounting off. Writes only that directory.
//!
//! Not simulated: refreshing the token (it lives [`EXPIRATION_SECS`], as the kubelet
//! asks; a pod older than that loses its access) and the `KUBERNETES_SERVICE_*`
//! environment (pods cannot reach the loopback API server from their namespaces).

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::call::{CallError, call};

/// Where containers find the token, the namespace and `ca.crt`.
pub const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// What the kubelet asks for: an hour and a few seconds.
pub const EXPIRATION_SECS: i64 = 3607;

#[derive(Debug, thiserror::Error)]
pub enum ServiceAccountError {
    #[error("reading ServiceAccount {namespace}/{name}: {source}")]
    GetServiceAccount {
        namespace: String,
        name: String,
        source: CallError,
    },
    #[error("requesting a token for ServiceAccount {namespace}/{name}: {source}")]
    RequestToken {
        namespace: String,
        name: String,
        source: CallError,
    },
    #[error("the TokenRequest for ServiceAccount {namespace}/{name} came back without a token")]
    NoToken { namespace: String, name: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<(), ServiceAccountError> {
    let tmp = path.with_extension("tmp");
    let err = |source| ServiceAccountError::Write {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, data).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Writes `pod`'s token, namespace and (when known) `ca_pem` into `dir`; `None` when
/// the pod gets no token (automounting off).
pub async fn project(
    client: &Client,
    pod: &Pod,
    dir: &Path,
    ca_pem: Option<&str>,
) -> Result<Option<PathBuf>, ServiceAccountError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let namespace = pod.namespace().unwrap_or_else(|| "default".into());
    let name = spec
        .service_account_name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let automount = match spec.automount_service_account_token {
        Some(a) => a,
        None => {
            let sa = call(accounts.get(&name)).await.map_err(|source| {
                ServiceAccountError::GetServiceAccount {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    source,
                }
            })?;
            sa.automount_service_account_token.unwrap_or(true)
        }
    };
    if !automount {
        return Ok(None);
    }
    let token = bound_token(client, pod, &[], EXPIRATION_SECS).await?;
    std::fs::create_dir_all(dir).map_err(|source| ServiceAccountError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    write_atomically(&dir.join("token"), token.as_bytes())?;
    write_atomically(&dir.join("namespace"), namespace.as_bytes())?;
    if let Some(ca) = ca_pem {
        write_atomically(&dir.join("ca.crt"), ca.as_bytes())?;
    }
    Ok(Some(dir.to_path_buf()))
}

/// A token from TokenRequest for `pod`'s ServiceAccount, bound to the pod, for
/// `audiences` (none: the API server's own), living `expiration_secs`: what the kubelet
/// writes for the default token and for a projected `serviceAccountToken` source.
pub async fn bound_token(
    client: &Client,
    pod: &Pod,
    audiences: &[String],
    expiration_secs: i64,
) -> Result<String, ServiceAccountError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let namespace = pod.namespace().unwrap_or_else(|| "default".into());
    let name = spec
        .service_account_name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let req: TokenRequest = serde_json::from_value(json!({"spec": {
        "audiences": audiences,
        "expirationSeconds": expiration_secs,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.name_any(), "uid": pod.uid()},
    }}))
    .expect("a valid TokenRequest");
    let answer = call(accounts.create_token_request(&name, &PostParams::default(), &req))
        .await
        .map_err(|source| ServiceAccountError::RequestToken {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
    answer
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or(ServiceAccountError::NoToken { namespace, name })
}
