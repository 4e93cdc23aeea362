//! The resource registry: which kinds the server serves (group, version, kind, plural,
//! scope, subresources, short names), built-in ones plus those that CustomResourceDefinitions
//! add at run time. It describes resources; it never holds objects.

use std::sync::Arc;

use serde_json::Value;

/// Built-in kinds that get kind-specific validation, defaulting and printing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Builtin {
    Namespace,
    Node,
    Pod,
    Service,
    Endpoints,
    ConfigMap,
    Secret,
    CoreEvent,
    EventsV1,
    Deployment,
    ReplicaSet,
    EndpointSlice,
    Lease,
    Crd,
    ServiceAccount,
    StatefulSet,
    DaemonSet,
    PersistentVolumeClaim,
    PodDisruptionBudget,
    HorizontalPodAutoscaler,
    Role,
    ClusterRole,
    RoleBinding,
    ClusterRoleBinding,
    // Create-only: answered at once, never stored (`ResourceType::create_only`).
    TokenReview,
    SelfSubjectReview,
    SelfSubjectAccessReview,
    SubjectAccessReview,
    LocalSubjectAccessReview,
    SelfSubjectRulesReview,
}

/// Where the `/scale` subresource reads and writes (JSON paths as `.spec.replicas`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    /// For CRDs: a path to a string selector. `None` for Deployments and ReplicaSets,
    /// whose selector is rendered from `.spec.selector`.
    pub label_selector: Option<String>,
}

/// What a CRD version adds: its schema (for validation, pruning, defaulting, OpenAPI) and
/// printer columns.
#[derive(Debug, Clone, PartialEq)]
pub struct CrdVersion {
    pub schema: Value,
    pub printer_columns: Vec<Value>,
    pub storage: bool,
    /// The CRD object's name (`<plural>.<group>`), to find it back.
    pub crd_name: String,
    /// Fields (`spec.x`) a field selector may use, from `selectableFields`.
    pub selectable: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub list_kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status: bool,
    pub scale: Option<ScalePaths>,
    pub builtin: Option<Builtin>,
    pub crd: Option<CrdVersion>,
    /// A review: only `create` on the collection, answered and never stored.
    pub create_only: bool,
}

/// Objects of every version of one resource share one storage slot.
pub type StoreKey = (String, String);

pub const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    pub fn key(&self) -> StoreKey {
        (self.group.clone(), self.plural.clone())
    }
}

#[allow(clippy::too_many_arguments)] // a table row: every column is needed
fn builtin(
    b: Builtin,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    namespaced: bool,
    short: &[&str],
    status: bool,
    scale: bool,
) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: version.into(),
        kind: kind.into(),
        list_kind: format!("{kind}List"),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: if matches!(
            b,
            Builtin::Pod
                | Builtin::Service
                | Builtin::Deployment
                | Builtin::ReplicaSet
                | Builtin::StatefulSet
                | Builtin::DaemonSet
                | Builtin::HorizontalPodAutoscaler
        ) {
            vec!["all".into()]
        } else {
            vec![]
        },
        status,
        scale: scale.then(|| ScalePaths {
            spec_replicas: ".spec.replicas".into(),
            status_replicas: ".status.replicas".into(),
            label_selector: None,
        }),
        builtin: Some(b),
        crd: None,
        create_only: matches!(
            b,
            Builtin::TokenReview
                | Builtin::SelfSubjectReview
                | Builtin::SelfSubjectAccessReview
                | Builtin::SubjectAccessReview
                | Builtin::LocalSubjectAccessReview
                | Builtin::SelfSubjectRulesReview
        ),
    }
}

/// The built-in resources, in discovery order.
pub fn builtins() -> Vec<ResourceType> {
    use Builtin::*;
    vec![
        builtin(
            ConfigMap,
            "",
            "v1",
            "ConfigMap",
            "configmaps",
            true,
            &["cm"],
            false,
            false,
        ),
        builtin(
            Endpoints,
            "",
            "v1",
            "Endpoints",
            "endpoints",
            true,
            &["ep"],
            false,
            false,
        ),
        builtin(
            CoreEvent,
            "",
            "v1",
            "Event",
            "events",
            true,
            &["ev"],
            false,
            false,
        ),
        builtin(
            Namespace,
            "",
            "v1",
            "Namespace",
            "namespaces",
            false,
            &["ns"],
            true,
            false,
        ),
        builtin(Node, "", "v1", "Node", "nodes", false, &["no"], true, false),
        builtin(Pod, "", "v1", "Pod", "pods", true, &["po"], true, false),
        builtin(
            Secret,
            "",
            "v1",
            "Secret",
            "secrets",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            Service,
            "",
            "v1",
            "Service",
            "services",
            true,
            &["svc"],
            true,
            false,
        ),
        builtin(
            Deployment,
            "apps",
            "v1",
            "Deployment",
            "deployments",
            true,
            &["deploy"],
            true,
            true,
        ),
        builtin(
            ReplicaSet,
            "apps",
            "v1",
            "ReplicaSet",
            "replicasets",
            true,
            &["rs"],
            true,
            true,
        ),
        builtin(
            StatefulSet,
            "apps",
            "v1",
            "StatefulSet",
            "statefulsets",
            true,
            &["sts"],
            true,
            true,
        ),
        builtin(
            DaemonSet,
            "apps",
            "v1",
            "DaemonSet",
            "daemonsets",
            true,
            &["ds"],
            true,
            false,
        ),
        builtin(
            PersistentVolumeClaim,
            "",
            "v1",
            "PersistentVolumeClaim",
            "persistentvolumeclaims",
            true,
            &["pvc"],
            true,
            false,
        ),
        builtin(
            PodDisruptionBudget,
            "policy",
            "v1",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
            &["pdb"],
            true,
            false,
        ),
        builtin(
            HorizontalPodAutoscaler,
            "autoscaling",
            "v2",
            "HorizontalPodAutoscaler",
            "horizontalpodautoscalers",
            true,
            &["hpa"],
            true,
            false,
        ),
        builtin(
            EventsV1,
            "events.k8s.io",
            "v1",
            "Event",
            "events",
            true,
            &["ev"],
            false,
            false,
        ),
        builtin(
            Lease,
            "coordination.k8s.io",
            "v1",
            "Lease",
            "leases",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            EndpointSlice,
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
            "endpointslices",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            Crd,
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            &["crd", "crds"],
            true,
            false,
        ),
        builtin(
            ServiceAccount,
            "",
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            true,
            &["sa"],
            false,
            false,
        ),
        builtin(
            ClusterRoleBinding,
            RBAC_GROUP,
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
            &[],
            false,
            false,
        ),
        builtin(
            ClusterRole,
            RBAC_GROUP,
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
            &[],
            false,
            false,
        ),
        builtin(
            RoleBinding,
            RBAC_GROUP,
            "v1",
            "RoleBinding",
            "rolebindings",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            Role,
            RBAC_GROUP,
            "v1",
            "Role",
            "roles",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            TokenReview,
            "authentication.k8s.io",
            "v1",
            "TokenReview",
            "tokenreviews",
            false,
            &[],
            false,
            false,
        ),
        builtin(
            SelfSubjectReview,
            "authentication.k8s.io",
            "v1",
            "SelfSubjectReview",
            "selfsubjectreviews",
            false,
            &[],
            false,
            false,
        ),
        builtin(
            LocalSubjectAccessReview,
            "authorization.k8s.io",
            "v1",
            "LocalSubjectAccessReview",
            "localsubjectaccessreviews",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            SelfSubjectAccessReview,
            "authorization.k8s.io",
            "v1",
            "SelfSubjectAccessReview",
            "selfsubjectaccessreviews",
            false,
            &[],
            false,
            false,
        ),
        builtin(
            SelfSubjectRulesReview,
            "authorization.k8s.io",
            "v1",
            "SelfSubjectRulesReview",
            "selfsubjectrulesreviews",
            false,
            &[],
            false,
            false,
        ),
        builtin(
            SubjectAccessReview,
            "authorization.k8s.io",
            "v1",
            "SubjectAccessReview",
            "subjectaccessreviews",
            false,
            &[],
            false,
            false,
        ),
    ]
}

pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// Kubernetes version priority: GA > beta > alpha, then higher numbers first; other
/// strings last, alphabetically.
pub fn version_priority(a: &str, b: &str) -> std::cmp::Ordering {
    fn parse(v: &str) -> (u8, u64, u64, String) {
        let Some(rest) = v.strip_prefix('v') else {
            return (0, 0, 0, v.into());
        };
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let Ok(major) = digits.parse::<u64>() else {
            return (0, 0, 0, v.into());
        };
        let tail = &rest[digits.len()..];
        let (rank, t) = if tail.is_empty() {
            (3, "")
        } else if let Some(t) = tail.strip_prefix("beta") {
            (2, t)
        } else if let Some(t) = tail.strip_prefix("alpha") {
            (1, t)
        } else {
            return (0, 0, 0, v.into());
        };
        let minor = if t.is_empty() {
            u64::MAX
        } else {
            t.parse().unwrap_or(0)
        };
        (rank, major, minor, String::new())
    }
    let (pa, pb) = (parse(a), parse(b));
    // Higher rank, major, minor sort first; unparsable ones by name.
    pb.0.cmp(&pa.0)
        .then(pb.1.cmp(&pa.1))
        .then(pb.2.cmp(&pa.2))
        .then(pa.3.cmp(&pb.3))
}

/// Served resources: the built-ins and every version CRDs serve.
#[derive(Debug, Clone)]
pub struct Registry {
    types: Vec<Arc<ResourceType>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            types: builtins().into_iter().map(Arc::new).collect(),
        }
    }
}

impl Registry {
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    /// The version objects of `key` are stored in (and read back from): the CRD's storage
    /// version, or the only version of a built-in.
    pub fn storage_type(&self, key: &StoreKey) -> Option<Arc<ResourceType>> {
        let mut found = self.types.iter().filter(|t| &t.key() == key);
        let first = found.next()?.clone();
        if first.crd.as_ref().is_none_or(|c| c.storage) {
            return Some(first);
        }
        found
            .find(|t| t.crd.as_ref().is_some_and(|c| c.storage))
            .cloned()
            .or(Some(first))
    }

    /// Groups in discovery order, each with its versions in priority order.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = vec![];
        for t in &self.types {
            match out.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, vs)) => {
                    if !vs.contains(&t.version) {
                        vs.push(t.version.clone());
                    }
                }
                None => out.push((t.group.clone(), vec![t.version.clone()])),
            }
        }
        for (_, vs) in &mut out {
            vs.sort_by(|a, b| version_priority(a, b));
        }
        out
    }

    pub fn in_group_version(&self, group: &str, version: &str) -> Vec<Arc<ResourceType>> {
        self.types
            .iter()
            .filter(|t| t.group == group && t.version == version)
            .cloned()
            .collect()
    }

    /// Serve what a CRD declares (replacing what it declared before).
    pub fn install_crd(&mut self, crd_name: &str, types: Vec<ResourceType>) {
        self.remove_crd(crd_name);
        self.types.extend(types.into_iter().map(Arc::new));
    }

    pub fn remove_crd(&mut self, crd_name: &str) {
        self.types
            .retain(|t| t.crd.as_ref().is_none_or(|c| c.crd_name != crd_name));
    }
}

/// The resource types a CRD object declares (one per served version).
pub fn types_from_crd(crd: &Value) -> Vec<ResourceType> {
    let spec = &crd["spec"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let names = &spec["names"];
    let kind = s(&names["kind"]);
    let list_kind = names["listKind"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{kind}List"));
    let singular = names["singular"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| kind.to_lowercase());
    let crd_name = s(&crd["metadata"]["name"]);
    let mut out = vec![];
    for v in spec["versions"].as_array().into_iter().flatten() {
        if v["served"] == Value::Bool(false) {
            continue;
        }
        let sub = &v["subresources"];
        let scale = sub
            .get("scale")
            .filter(|x| x.is_object())
            .map(|sc| ScalePaths {
                spec_replicas: s(&sc["specReplicasPath"]),
                status_replicas: s(&sc["statusReplicasPath"]),
                label_selector: sc["labelSelectorPath"].as_str().map(str::to_owned),
            });
        out.push(ResourceType {
            group: s(&spec["group"]),
            version: s(&v["name"]),
            kind: kind.clone(),
            list_kind: list_kind.clone(),
            plural: s(&names["plural"]),
            singular: singular.clone(),
            namespaced: spec["scope"] != "Cluster",
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            status: sub.get("status").is_some_and(|x| !x.is_null()),
            scale,
            builtin: None,
            create_only: false,
            crd: Some(CrdVersion {
                schema: v["schema"]["openAPIV3Schema"].clone(),
                printer_columns: v["additionalPrinterColumns"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
                storage: v["storage"] == Value::Bool(true),
                crd_name: crd_name.clone(),
                selectable: v["selectableFields"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f["jsonPath"].as_str())
                    .map(|p| p.trim_start_matches('.').to_owned())
                    .collect(),
            }),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions_sort_ga_then_beta_then_alpha() {
        let mut v = vec!["v1alpha1", "v2", "v1beta2", "v1", "v1beta1", "foo"];
        v.sort_by(|a, b| version_priority(a, b));
        assert_eq!(v, ["v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]);
    }

    #[test]
    fn crd_declares_one_type_per_served_version() {
        let crd = json!({"metadata": {"name": "widgets.example.com"}, "spec": {
        "group": "example.com", "scope": "Namespaced",
        "names": {"kind": "Widget", "plural": "widgets", "shortNames": ["wd"]},
        "versions": [
            {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
             "schema": {"openAPIV3Schema": {"type": "object"}}},
            {"name": "v1beta1", "served": false, "storage": false}
        ]}});
        let types = types_from_crd(&crd);
        assert_eq!(types.len(), 1);
        assert_eq!(types[0].list_kind, "WidgetList");
        assert!(types[0].status);
        assert!(types[0].namespaced);
        let mut r = Registry::default();
        r.install_crd("widgets.example.com", types);
        assert!(r.find("example.com", "v1", "widgets").is_some());
        r.remove_crd("widgets.example.com");
        assert!(r.find("example.com", "v1", "widgets").is_none());
    }
}
