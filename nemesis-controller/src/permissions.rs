//! What a refused Kubernetes API call means for whoever runs the controller: a 403 is
//! the permission its ServiceAccount lacks, in the API server's own words (verb,
//! resource, API group, namespace), and where the controller's rules are granted; a 401
//! is a token the API server no longer takes. Pure formatting; never retries.

/// Where the controller's rules live, for the operator who must add the missing one.
const RULES: &str = "ClusterRole nemesis-controller, or Role nemesis-controller-leader for its Lease and Pod, in manifests/base/rbac.yaml";

/// The operator's reading of a failed call: the permission for a 403, the token for a
/// 401, else the API server's message (without kube's debug dump of the Status).
pub fn explain(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(s) if s.code == 403 => format!(
            "permission denied: {}; the controller's ServiceAccount needs that rule ({RULES})",
            s.message
        ),
        kube::Error::Api(s) if s.code == 401 => "the API server refused the controller's \
             credentials (401 Unauthorized): its ServiceAccount token expired, or the \
             ServiceAccount was deleted"
            .to_owned(),
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => other.to_string(),
    }
}

/// [`explain`] for the first `kube::Error` in `err`'s chain (a watcher's error wraps one).
pub fn explain_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(k) = e.downcast_ref::<kube::Error>() {
            return format!("{err_top}: {}", explain(k), err_top = top(err));
        }
        cur = e.source();
    }
    err.to_string()
}

/// `err`'s own words, before its first `: ` (a watcher error repeats its source there).
fn top(err: &dyn std::error::Error) -> String {
    let s = err.to_string();
    match s.split_once(": ") {
        Some((head, _)) => head.to_owned(),
        None => s,
    }
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
        let denied = "deployments.apps \"web\" is forbidden: User \"system:serviceaccount:nemesis-system:nemesis-controller\" cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"shop\"";
        let text = explain(&api_error(403, denied));
        assert_eq!(
            text,
            format!(
                "permission denied: {denied}; the controller's ServiceAccount needs that rule ({RULES})"
            )
        );
        let watch = kube::runtime::watcher::Error::InitialListFailed(api_error(403, denied));
        let text = explain_chain(&watch);
        assert!(
            text.starts_with(
                "failed to perform initial object list: permission denied: deployments.apps"
            ),
            "{text}"
        );
        assert!(!text.contains("Status {"), "no debug dump: {text}");
        assert!(explain(&api_error(401, "Unauthorized")).contains("401 Unauthorized"));
    }
}
