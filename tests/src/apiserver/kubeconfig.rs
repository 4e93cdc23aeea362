//! The kubeconfig file an instance writes: its URL, CA and bearer token, readable by
//! kube-rs (`Kubeconfig::read_from`) and by kubectl. Writes only that file.

use std::path::Path;

use base64::Engine;
use serde_json::json;

/// The kubeconfig document (YAML) for a server at `url`.
pub fn render(url: &str, ca_pem: &str, token: &str, namespace: &str) -> String {
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "nemesis-test", "cluster": {
            "server": url,
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca_pem),
        }}],
        "users": [{"name": "nemesis-test-admin", "user": {"token": token}}],
        "contexts": [{"name": "nemesis-test", "context": {
            "cluster": "nemesis-test", "user": "nemesis-test-admin", "namespace": namespace,
        }}],
        "current-context": "nemesis-test",
        "preferences": {},
    });
    serde_norway::to_string(&doc).expect("a JSON document always renders as YAML")
}

pub fn write(path: &Path, url: &str, ca_pem: &str, token: &str) -> std::io::Result<()> {
    std::fs::write(path, render(url, ca_pem, token, "default"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_rs_reads_the_kubeconfig() {
        let yaml = render("https://127.0.0.1:1234", "PEM", "tok", "default");
        let kc = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("nemesis-test"));
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:1234"));
    }
}
