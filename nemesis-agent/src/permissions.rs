//! What a refused Kubernetes API call means for whoever runs the agent: a 403 is the
//! permission its ServiceAccount lacks, in the API server's own words (verb, resource,
//! API group, namespace), and where the agent's rules are granted; a 401 is a token the
//! API server no longer takes. Pure formatting over an error chain; never retries.

/// Where the agent's rules live, for the operator who must add the missing one.
const RULES: &str = "ClusterRole nemesis-agent in manifests/base/rbac.yaml";

/// The operator's reading of `err` (any error whose chain holds a `kube::Error`).
pub fn explain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(kube::Error::Api(s)) = e.downcast_ref::<kube::Error>() {
            match s.code {
                403 => {
                    return format!(
                        "permission denied: {}; the agent's ServiceAccount needs that rule ({RULES})",
                        s.message
                    );
                }
                401 => {
                    return "the API server refused the agent's credentials (401 Unauthorized): \
                            its ServiceAccount token expired, or the ServiceAccount was deleted"
                        .to_owned();
                }
                _ => {}
            }
        }
        cur = e.source();
    }
    crate::services::error_chain(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.into(),
            reason: "Forbidden".into(),
            ..Default::default()
        }))
    }

    #[test]
    fn a_refusal_names_the_missing_permission_and_where_rules_are_granted() {
        let denied = "endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:nemesis-system:nemesis-agent\" cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\" at the cluster scope";
        let err = kube::runtime::watcher::Error::InitialListFailed(api_error(403, denied));
        let text = explain(&err);
        assert!(
            text.starts_with("permission denied: endpointslices.discovery.k8s.io is forbidden"),
            "{text}"
        );
        assert!(
            text.contains("cannot list resource \"endpointslices\""),
            "{text}"
        );
        assert!(
            text.ends_with("(ClusterRole nemesis-agent in manifests/base/rbac.yaml)"),
            "{text}"
        );
        assert!(explain(&api_error(401, "Unauthorized")).contains("401 Unauthorized"));
        let other = explain(&api_error(500, "boom"));
        assert!(other.contains("boom"), "{other}");
    }
}
