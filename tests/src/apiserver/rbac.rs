//! The RBAC authorizer, as upstream's (`plugin/pkg/auth/authorizer/rbac`): a request's
//! attributes (user, verb, group, resource/subresource, name, namespace, or a
//! non-resource path) against ClusterRoleBindings everywhere and RoleBindings in the
//! request's namespace, with `*` wildcards, `*/sub` subresource rules, resourceNames and
//! nonResourceURLs with a trailing `*`. The `system:masters` group is allowed everything,
//! as upstream's privileged-group authorizer. Pure: the objects come from the caller,
//! and the wording of reasons and refusals is upstream's.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The group whose members may do anything (upstream's `SystemPrivilegedGroup`).
pub const MASTERS: &str = "system:masters";
pub const AUTHENTICATED: &str = "system:authenticated";
pub const UNAUTHENTICATED: &str = "system:unauthenticated";
pub const ANONYMOUS: &str = "system:anonymous";
pub const SA_PREFIX: &str = "system:serviceaccount:";

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl User {
    pub fn anonymous() -> Self {
        User {
            name: ANONYMOUS.into(),
            groups: vec![UNAUTHENTICATED.into()],
            ..Default::default()
        }
    }

    /// The `user` object of TokenReview, SelfSubjectReview and SubjectAccessReview.
    pub fn to_json(&self) -> Value {
        let mut u = json!({"username": self.name, "groups": self.groups});
        if !self.uid.is_empty() {
            u["uid"] = json!(self.uid);
        }
        if !self.extra.is_empty() {
            u["extra"] = json!(self.extra);
        }
        u
    }
}

pub fn service_account_of(user: &str) -> Option<(&str, &str)> {
    let rest = user.strip_prefix(SA_PREFIX)?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
}

/// What a request does, as upstream's `authorizer.Attributes`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attributes {
    pub verb: String,
    pub resource_request: bool,
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
    pub namespace: String,
    /// The URL path of a non-resource request.
    pub path: String,
}

impl Attributes {
    pub fn resource(verb: &str, group: &str, resource: &str, namespace: &str) -> Self {
        Attributes {
            verb: verb.into(),
            resource_request: true,
            group: group.into(),
            resource: resource.into(),
            namespace: namespace.into(),
            ..Default::default()
        }
    }
    pub fn with_sub(mut self, sub: &str) -> Self {
        self.subresource = sub.into();
        self
    }
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }
    pub fn non_resource(verb: &str, path: &str) -> Self {
        Attributes {
            verb: verb.into(),
            path: path.into(),
            ..Default::default()
        }
    }
}

/// The RBAC objects a decision reads (as stored JSON).
#[derive(Debug, Default)]
pub struct Policy<'a> {
    pub cluster_roles: Vec<&'a Value>,
    pub roles: Vec<&'a Value>,
    pub cluster_role_bindings: Vec<&'a Value>,
    pub role_bindings: Vec<&'a Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Upstream's reason: `RBAC: allowed by ...`, or the errors met while looking.
    pub reason: String,
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn name_of(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("")
}

fn namespace_of(v: &Value) -> &str {
    v["metadata"]["namespace"].as_str().unwrap_or("")
}

fn has(list: &[&str], want: &str) -> bool {
    list.iter().any(|x| *x == "*" || *x == want)
}

/// Upstream's `RuleAllows`.
pub fn rule_allows(a: &Attributes, rule: &Value) -> bool {
    if !has(&strings(&rule["verbs"]), &a.verb) {
        return false;
    }
    if !a.resource_request {
        return strings(&rule["nonResourceURLs"]).iter().any(|u| {
            *u == "*"
                || *u == a.path
                || (u.ends_with('*') && a.path.starts_with(u.trim_end_matches('*')))
        });
    }
    let combined = if a.subresource.is_empty() {
        a.resource.clone()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let resources_match = strings(&rule["resources"]).iter().any(|r| {
        *r == "*"
            || *r == combined
            || (!a.subresource.is_empty()
                && r.len() == a.subresource.len() + 2
                && r.starts_with("*/")
                && r.ends_with(a.subresource.as_str()))
    });
    let names = strings(&rule["resourceNames"]);
    has(&strings(&rule["apiGroups"]), &a.group)
        && resources_match
        && (names.is_empty() || names.contains(&a.name.as_str()))
}

/// Whether `subject` (of a binding in `binding_ns`, empty for a ClusterRoleBinding)
/// names `user`.
fn applies_to(user: &User, subject: &Value, binding_ns: &str) -> bool {
    let name = subject["name"].as_str().unwrap_or("");
    match subject["kind"].as_str().unwrap_or("") {
        "User" => user.name == name,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let ns = subject["namespace"]
                .as_str()
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            !ns.is_empty() && user.name == format!("{SA_PREFIX}{ns}:{name}")
        }
        _ => false,
    }
}

fn describe_subject(s: &Value, binding_ns: &str) -> String {
    let kind = s["kind"].as_str().unwrap_or("");
    let name = s["name"].as_str().unwrap_or("");
    if kind == "ServiceAccount" {
        let ns = s["namespace"]
            .as_str()
            .filter(|n| !n.is_empty())
            .unwrap_or(binding_ns);
        return format!("{kind} \"{name}/{ns}\"");
    }
    format!("{kind} \"{name}\"")
}

/// One binding that applies to a user, with the rules its role grants.
struct Grant<'a> {
    describe: String,
    rules: Vec<&'a Value>,
}

/// Every binding that names `user` and applies in `namespace` (empty: cluster scope
/// only), with its role's rules; `errors` gets upstream's "not found" for a missing role.
fn grants<'a>(
    p: &Policy<'a>,
    user: &User,
    namespace: &str,
    errors: &mut Vec<String>,
) -> Vec<Grant<'a>> {
    let mut out = vec![];
    let role_rules = |kind: &str, name: &str, ns: &str, errors: &mut Vec<String>| {
        let found = match kind {
            "ClusterRole" => p.cluster_roles.iter().find(|r| name_of(r) == name),
            "Role" => p
                .roles
                .iter()
                .find(|r| name_of(r) == name && namespace_of(r) == ns),
            _ => None,
        };
        match found {
            Some(r) => r["rules"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default(),
            None => {
                errors.push(format!(
                    "{}.rbac.authorization.k8s.io \"{name}\" not found",
                    kind.to_lowercase()
                ));
                vec![]
            }
        }
    };
    for b in &p.cluster_role_bindings {
        for s in b["subjects"].as_array().into_iter().flatten() {
            if applies_to(user, s, "") {
                let kind = b["roleRef"]["kind"].as_str().unwrap_or("");
                let role = b["roleRef"]["name"].as_str().unwrap_or("");
                out.push(Grant {
                    describe: format!(
                        "ClusterRoleBinding \"{}\" of {kind} \"{role}\" to {}",
                        name_of(b),
                        describe_subject(s, "")
                    ),
                    rules: role_rules(kind, role, "", errors),
                });
                break;
            }
        }
    }
    if namespace.is_empty() {
        return out;
    }
    for b in p
        .role_bindings
        .iter()
        .filter(|b| namespace_of(b) == namespace)
    {
        for s in b["subjects"].as_array().into_iter().flatten() {
            if applies_to(user, s, namespace) {
                let kind = b["roleRef"]["kind"].as_str().unwrap_or("");
                let role = b["roleRef"]["name"].as_str().unwrap_or("");
                out.push(Grant {
                    describe: format!(
                        "RoleBinding \"{}/{namespace}\" of {kind} \"{role}\" to {}",
                        name_of(b),
                        describe_subject(s, namespace)
                    ),
                    rules: role_rules(kind, role, namespace, errors),
                });
                break;
            }
        }
    }
    out
}

/// Upstream's decision for `user` doing `a`.
pub fn authorize(p: &Policy, user: &User, a: &Attributes) -> Decision {
    if user.groups.iter().any(|g| g == MASTERS) {
        return Decision {
            allowed: true,
            reason: String::new(),
        };
    }
    let mut errors = vec![];
    for g in grants(p, user, &a.namespace, &mut errors) {
        if g.rules.iter().any(|r| rule_allows(a, r)) {
            return Decision {
                allowed: true,
                reason: format!("RBAC: allowed by {}", g.describe),
            };
        }
    }
    let reason = match errors.len() {
        0 => String::new(),
        1 => format!("RBAC: {}", errors[0]),
        _ => format!("RBAC: [{}]", errors.join(", ")),
    };
    Decision {
        allowed: false,
        reason,
    }
}

/// The rules that apply to `user` in `namespace`: SelfSubjectRulesReview's
/// `resourceRules` and `nonResourceRules`, and whether a role was missing.
pub fn rules_for(
    p: &Policy,
    user: &User,
    namespace: &str,
) -> (Vec<Value>, Vec<Value>, Vec<String>) {
    if user.groups.iter().any(|g| g == MASTERS) {
        return (
            vec![json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]})],
            vec![json!({"verbs": ["*"], "nonResourceURLs": ["*"]})],
            vec![],
        );
    }
    let mut errors = vec![];
    let (mut res, mut non) = (vec![], vec![]);
    for g in grants(p, user, namespace, &mut errors) {
        for r in g.rules {
            if r["nonResourceURLs"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
            {
                non.push(json!({"verbs": r["verbs"], "nonResourceURLs": r["nonResourceURLs"]}));
            } else {
                let mut rr = json!({"verbs": r["verbs"], "apiGroups": r["apiGroups"], "resources": r["resources"]});
                if r["resourceNames"].as_array().is_some_and(|a| !a.is_empty()) {
                    rr["resourceNames"] = r["resourceNames"].clone();
                }
                res.push(rr);
            }
        }
    }
    (res, non, errors)
}

/// Upstream's `forbiddenMessage` (without the resource prefix the Status adds).
pub fn forbidden_message(user: &User, a: &Attributes) -> String {
    let u = &user.name;
    if !a.resource_request {
        return format!("User \"{u}\" cannot {} path \"{}\"", a.verb, a.path);
    }
    let mut resource = a.resource.clone();
    if !a.subresource.is_empty() {
        resource = format!("{resource}/{}", a.subresource);
    }
    if a.namespace.is_empty() {
        format!(
            "User \"{u}\" cannot {} resource \"{resource}\" in API group \"{}\" at the cluster scope",
            a.verb, a.group
        )
    } else {
        format!(
            "User \"{u}\" cannot {} resource \"{resource}\" in API group \"{}\" in the namespace \"{}\"",
            a.verb, a.group, a.namespace
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(ns: &str, name: &str) -> User {
        User {
            name: format!("{SA_PREFIX}{ns}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                AUTHENTICATED.into(),
            ],
            ..Default::default()
        }
    }

    struct World {
        objs: Vec<Value>,
    }

    impl World {
        fn policy(&self) -> Policy<'_> {
            let of = |k: &str| self.objs.iter().filter(|o| o["kind"] == k).collect();
            Policy {
                cluster_roles: of("ClusterRole"),
                roles: of("Role"),
                cluster_role_bindings: of("ClusterRoleBinding"),
                role_bindings: of("RoleBinding"),
            }
        }
    }

    fn world() -> World {
        World {
            objs: vec![
                json!({"kind": "ClusterRole", "metadata": {"name": "reader"}, "rules": [
                    {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["patch"]},
                    {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]},
                    {"nonResourceURLs": ["/healthz", "/api/*"], "verbs": ["get"]},
                ]}),
                json!({"kind": "ClusterRoleBinding", "metadata": {"name": "readers"},
                       "roleRef": {"kind": "ClusterRole", "name": "reader"},
                       "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": "sys"}]}),
                json!({"kind": "Role", "metadata": {"name": "lease", "namespace": "sys"}, "rules": [
                    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "update"]},
                    {"apiGroups": [""], "resources": ["pods"], "resourceNames": ["ctl-0"], "verbs": ["patch"]},
                ]}),
                json!({"kind": "RoleBinding", "metadata": {"name": "lease", "namespace": "sys"},
                       "roleRef": {"kind": "Role", "name": "lease"},
                       "subjects": [{"kind": "ServiceAccount", "name": "ctl"}, {"kind": "Group", "name": "ops"}]}),
                json!({"kind": "RoleBinding", "metadata": {"name": "dangling", "namespace": "sys"},
                       "roleRef": {"kind": "ClusterRole", "name": "gone"},
                       "subjects": [{"kind": "User", "name": "bob"}]}),
            ],
        }
    }

    #[test]
    fn cluster_bindings_apply_everywhere_with_verbs_groups_and_subresources() {
        let w = world();
        let p = w.policy();
        let agent = sa("sys", "agent");
        let ok = |a: Attributes| authorize(&p, &agent, &a).allowed;
        assert!(ok(Attributes::resource("list", "", "pods", "shop")));
        assert!(ok(Attributes::resource("watch", "", "pods", "")));
        assert!(ok(
            Attributes::resource("get", "", "pods", "x").with_sub("log")
        ));
        assert!(!ok(Attributes::resource("delete", "", "pods", "shop")));
        assert!(!ok(Attributes::resource("list", "apps", "pods", "shop")));
        assert!(ok(Attributes::resource(
            "patch",
            "apps",
            "deployments",
            "a"
        )
        .with_sub("scale")));
        assert!(!ok(Attributes::resource(
            "patch",
            "apps",
            "deployments",
            "a"
        )));
        assert!(ok(Attributes::resource(
            "get",
            "nemesis.dev",
            "things",
            "a"
        )
        .with_sub("status")));
        assert!(!ok(Attributes::resource(
            "get",
            "nemesis.dev",
            "things",
            "a"
        )
        .with_sub("scale")));
        assert!(ok(Attributes::non_resource("get", "/healthz")));
        assert!(ok(Attributes::non_resource("get", "/api/v1")));
        assert!(!ok(Attributes::non_resource("get", "/apis")));
        assert!(!ok(Attributes::non_resource("post", "/healthz")));
        let d = authorize(&p, &agent, &Attributes::resource("list", "", "pods", "x"));
        assert_eq!(
            d.reason,
            "RBAC: allowed by ClusterRoleBinding \"readers\" of ClusterRole \"reader\" to ServiceAccount \"agent/sys\""
        );
    }

    #[test]
    fn role_bindings_apply_in_their_namespace_with_resource_names() {
        let w = world();
        let p = w.policy();
        let ctl = sa("sys", "ctl");
        let ok = |u: &User, a: Attributes| authorize(&p, u, &a).allowed;
        let lease = Attributes::resource("update", "coordination.k8s.io", "leases", "sys");
        assert!(ok(&ctl, lease.clone()));
        assert!(!ok(
            &ctl,
            Attributes {
                namespace: "shop".into(),
                ..lease.clone()
            }
        ));
        assert!(
            !ok(&sa("other", "ctl"), lease.clone()),
            "the subject's namespace is the binding's"
        );
        let ops = User {
            name: "alice".into(),
            groups: vec!["ops".into()],
            ..Default::default()
        };
        assert!(ok(&ops, lease));
        let pod = Attributes::resource("patch", "", "pods", "sys");
        assert!(ok(&ctl, pod.clone().with_name("ctl-0")));
        assert!(!ok(&ctl, pod.clone().with_name("agent-x")));
        assert!(
            !ok(&ctl, pod),
            "a named rule never allows an unnamed request"
        );
    }

    #[test]
    fn masters_may_do_anything_and_missing_roles_are_named() {
        let w = world();
        let p = w.policy();
        let admin = User {
            name: "admin".into(),
            groups: vec![MASTERS.into()],
            ..Default::default()
        };
        assert!(authorize(&p, &admin, &Attributes::resource("delete", "x", "y", "z")).allowed);
        let bob = User {
            name: "bob".into(),
            ..Default::default()
        };
        let d = authorize(&p, &bob, &Attributes::resource("get", "", "pods", "sys"));
        assert_eq!(
            d,
            Decision {
                allowed: false,
                reason: "RBAC: clusterrole.rbac.authorization.k8s.io \"gone\" not found".into()
            }
        );
    }

    #[test]
    fn refusals_read_as_upstreams() {
        let u = sa("ns", "sa");
        assert_eq!(
            forbidden_message(&u, &Attributes::resource("list", "", "pods", "x")),
            "User \"system:serviceaccount:ns:sa\" cannot list resource \"pods\" in API group \"\" in the namespace \"x\""
        );
        assert_eq!(
            forbidden_message(
                &u,
                &Attributes::resource("watch", "discovery.k8s.io", "endpointslices", "")
            ),
            "User \"system:serviceaccount:ns:sa\" cannot watch resource \"endpointslices\" in API group \"discovery.k8s.io\" at the cluster scope"
        );
        assert_eq!(
            forbidden_message(
                &u,
                &Attributes::resource("patch", "apps", "deployments", "x").with_sub("scale")
            ),
            "User \"system:serviceaccount:ns:sa\" cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"x\""
        );
        assert_eq!(
            forbidden_message(&User::anonymous(), &Attributes::non_resource("get", "/api")),
            "User \"system:anonymous\" cannot get path \"/api\""
        );
    }

    #[test]
    fn service_account_user_names_parse() {
        assert_eq!(
            service_account_of("system:serviceaccount:ns:sa"),
            Some(("ns", "sa"))
        );
        assert_eq!(service_account_of("system:serviceaccount:ns"), None);
        assert_eq!(service_account_of("alice"), None);
    }
}
