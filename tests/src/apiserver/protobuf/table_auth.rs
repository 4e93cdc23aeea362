// The protobuf fields of the ServiceAccount, RBAC, authentication and authorization kinds,
// transcribed by hand from k8s.io/api `core/v1`, `rbac/v1`, `authentication/v1` and
// `authorization/v1` generated.proto (the k8s-pb sources gen_table.py reads were not at
// hand). Message names follow `package()`: `rbac.authorization.k8s.io/v1` is
// `api.rbac.authorization.v1`. `extra` maps (ExtraValue) are left out: kubectl never sends
// them, and an unknown field is refused rather than dropped.

use super::decode::{Field, Kind::*};

const META: &str = "apimachinery.pkg.apis.meta.v1.ObjectMeta";

#[rustfmt::skip]
pub static MESSAGES: &[(&str, &[Field])] = &[
    ("api.core.v1.ServiceAccount", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: true, name: "secrets", target: "api.core.v1.ObjectReference" },
        Field { tag: 3, kind: Msg, repeated: true, name: "image_pull_secrets", target: "api.core.v1.LocalObjectReference" },
        Field { tag: 4, kind: Bool, repeated: false, name: "automount_service_account_token", target: "" },
    ]),
    ("api.rbac.authorization.v1.Role", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: true, name: "rules", target: "api.rbac.authorization.v1.PolicyRule" },
    ]),
    ("api.rbac.authorization.v1.ClusterRole", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: true, name: "rules", target: "api.rbac.authorization.v1.PolicyRule" },
        Field { tag: 3, kind: Msg, repeated: false, name: "aggregation_rule", target: "api.rbac.authorization.v1.AggregationRule" },
    ]),
    ("api.rbac.authorization.v1.AggregationRule", &[
        Field { tag: 1, kind: Msg, repeated: true, name: "cluster_role_selectors", target: "apimachinery.pkg.apis.meta.v1.LabelSelector" },
    ]),
    ("api.rbac.authorization.v1.PolicyRule", &[
        Field { tag: 1, kind: Str, repeated: true, name: "verbs", target: "" },
        Field { tag: 2, kind: Str, repeated: true, name: "api_groups", target: "" },
        Field { tag: 3, kind: Str, repeated: true, name: "resources", target: "" },
        Field { tag: 4, kind: Str, repeated: true, name: "resource_names", target: "" },
        Field { tag: 5, kind: Str, repeated: true, name: "non_resource_u_r_ls", target: "" },
    ]),
    ("api.rbac.authorization.v1.RoleBinding", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: true, name: "subjects", target: "api.rbac.authorization.v1.Subject" },
        Field { tag: 3, kind: Msg, repeated: false, name: "role_ref", target: "api.rbac.authorization.v1.RoleRef" },
    ]),
    ("api.rbac.authorization.v1.ClusterRoleBinding", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: true, name: "subjects", target: "api.rbac.authorization.v1.Subject" },
        Field { tag: 3, kind: Msg, repeated: false, name: "role_ref", target: "api.rbac.authorization.v1.RoleRef" },
    ]),
    ("api.rbac.authorization.v1.Subject", &[
        Field { tag: 1, kind: Str, repeated: false, name: "kind", target: "" },
        Field { tag: 2, kind: Str, repeated: false, name: "api_group", target: "" },
        Field { tag: 3, kind: Str, repeated: false, name: "name", target: "" },
        Field { tag: 4, kind: Str, repeated: false, name: "namespace", target: "" },
    ]),
    ("api.rbac.authorization.v1.RoleRef", &[
        Field { tag: 1, kind: Str, repeated: false, name: "api_group", target: "" },
        Field { tag: 2, kind: Str, repeated: false, name: "kind", target: "" },
        Field { tag: 3, kind: Str, repeated: false, name: "name", target: "" },
    ]),
    ("api.authentication.v1.TokenReview", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: false, name: "spec", target: "api.authentication.v1.TokenReviewSpec" },
        Field { tag: 3, kind: Msg, repeated: false, name: "status", target: "api.authentication.v1.TokenReviewStatus" },
    ]),
    ("api.authentication.v1.TokenReviewSpec", &[
        Field { tag: 1, kind: Str, repeated: false, name: "token", target: "" },
        Field { tag: 2, kind: Str, repeated: true, name: "audiences", target: "" },
    ]),
    ("api.authentication.v1.SelfSubjectReview", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: false, name: "status", target: "api.authentication.v1.SelfSubjectReviewStatus" },
    ]),
    ("api.authentication.v1.TokenRequest", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: false, name: "spec", target: "api.authentication.v1.TokenRequestSpec" },
        Field { tag: 3, kind: Msg, repeated: false, name: "status", target: "api.authentication.v1.TokenRequestStatus" },
    ]),
    ("api.authentication.v1.TokenRequestSpec", &[
        Field { tag: 1, kind: Str, repeated: true, name: "audiences", target: "" },
        Field { tag: 3, kind: Msg, repeated: false, name: "bound_object_ref", target: "api.authentication.v1.BoundObjectReference" },
        Field { tag: 4, kind: I64, repeated: false, name: "expiration_seconds", target: "" },
    ]),
    ("api.authentication.v1.BoundObjectReference", &[
        Field { tag: 1, kind: Str, repeated: false, name: "kind", target: "" },
        Field { tag: 2, kind: Str, repeated: false, name: "api_version", target: "" },
        Field { tag: 3, kind: Str, repeated: false, name: "name", target: "" },
        Field { tag: 4, kind: Str, repeated: false, name: "uid", target: "" },
    ]),
    ("api.authorization.v1.SelfSubjectAccessReview", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: false, name: "spec", target: "api.authorization.v1.SelfSubjectAccessReviewSpec" },
        Field { tag: 3, kind: Msg, repeated: false, name: "status", target: "api.authorization.v1.SubjectAccessReviewStatus" },
    ]),
    ("api.authorization.v1.SelfSubjectAccessReviewSpec", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "resource_attributes", target: "api.authorization.v1.ResourceAttributes" },
        Field { tag: 2, kind: Msg, repeated: false, name: "non_resource_attributes", target: "api.authorization.v1.NonResourceAttributes" },
    ]),
    ("api.authorization.v1.SubjectAccessReview", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: false, name: "spec", target: "api.authorization.v1.SubjectAccessReviewSpec" },
        Field { tag: 3, kind: Msg, repeated: false, name: "status", target: "api.authorization.v1.SubjectAccessReviewStatus" },
    ]),
    ("api.authorization.v1.LocalSubjectAccessReview", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: false, name: "spec", target: "api.authorization.v1.SubjectAccessReviewSpec" },
        Field { tag: 3, kind: Msg, repeated: false, name: "status", target: "api.authorization.v1.SubjectAccessReviewStatus" },
    ]),
    ("api.authorization.v1.SubjectAccessReviewSpec", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "resource_attributes", target: "api.authorization.v1.ResourceAttributes" },
        Field { tag: 2, kind: Msg, repeated: false, name: "non_resource_attributes", target: "api.authorization.v1.NonResourceAttributes" },
        Field { tag: 3, kind: Str, repeated: false, name: "user", target: "" },
        Field { tag: 4, kind: Str, repeated: true, name: "groups", target: "" },
        Field { tag: 6, kind: Str, repeated: false, name: "uid", target: "" },
    ]),
    ("api.authorization.v1.ResourceAttributes", &[
        Field { tag: 1, kind: Str, repeated: false, name: "namespace", target: "" },
        Field { tag: 2, kind: Str, repeated: false, name: "verb", target: "" },
        Field { tag: 3, kind: Str, repeated: false, name: "group", target: "" },
        Field { tag: 4, kind: Str, repeated: false, name: "version", target: "" },
        Field { tag: 5, kind: Str, repeated: false, name: "resource", target: "" },
        Field { tag: 6, kind: Str, repeated: false, name: "subresource", target: "" },
        Field { tag: 7, kind: Str, repeated: false, name: "name", target: "" },
    ]),
    ("api.authorization.v1.NonResourceAttributes", &[
        Field { tag: 1, kind: Str, repeated: false, name: "path", target: "" },
        Field { tag: 2, kind: Str, repeated: false, name: "verb", target: "" },
    ]),
    ("api.authorization.v1.SelfSubjectRulesReview", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "metadata", target: META },
        Field { tag: 2, kind: Msg, repeated: false, name: "spec", target: "api.authorization.v1.SelfSubjectRulesReviewSpec" },
        Field { tag: 3, kind: Msg, repeated: false, name: "status", target: "api.authorization.v1.SubjectRulesReviewStatus" },
    ]),
    ("api.authorization.v1.SelfSubjectRulesReviewSpec", &[
        Field { tag: 1, kind: Str, repeated: false, name: "namespace", target: "" },
    ]),
    ("api.authorization.v1.SubjectAccessReviewStatus", &[
        Field { tag: 1, kind: Bool, repeated: false, name: "allowed", target: "" },
        Field { tag: 2, kind: Str, repeated: false, name: "reason", target: "" },
        Field { tag: 3, kind: Str, repeated: false, name: "evaluation_error", target: "" },
        Field { tag: 4, kind: Bool, repeated: false, name: "denied", target: "" },
    ]),
    ("api.authorization.v1.SubjectRulesReviewStatus", &[
        Field { tag: 1, kind: Msg, repeated: true, name: "resource_rules", target: "api.authorization.v1.ResourceRule" },
        Field { tag: 2, kind: Msg, repeated: true, name: "non_resource_rules", target: "api.authorization.v1.NonResourceRule" },
        Field { tag: 3, kind: Bool, repeated: false, name: "incomplete", target: "" },
        Field { tag: 4, kind: Str, repeated: false, name: "evaluation_error", target: "" },
    ]),
    ("api.authorization.v1.ResourceRule", &[
        Field { tag: 1, kind: Str, repeated: true, name: "verbs", target: "" },
        Field { tag: 2, kind: Str, repeated: true, name: "api_groups", target: "" },
        Field { tag: 3, kind: Str, repeated: true, name: "resources", target: "" },
        Field { tag: 4, kind: Str, repeated: true, name: "resource_names", target: "" },
    ]),
    ("api.authorization.v1.NonResourceRule", &[
        Field { tag: 1, kind: Str, repeated: true, name: "verbs", target: "" },
        Field { tag: 2, kind: Str, repeated: true, name: "non_resource_u_r_ls", target: "" },
    ]),
    ("api.authentication.v1.TokenReviewStatus", &[
        Field { tag: 1, kind: Bool, repeated: false, name: "authenticated", target: "" },
        Field { tag: 2, kind: Msg, repeated: false, name: "user", target: "api.authentication.v1.UserInfo" },
        Field { tag: 3, kind: Str, repeated: false, name: "error", target: "" },
        Field { tag: 4, kind: Str, repeated: true, name: "audiences", target: "" },
    ]),
    ("api.authentication.v1.SelfSubjectReviewStatus", &[
        Field { tag: 1, kind: Msg, repeated: false, name: "user_info", target: "api.authentication.v1.UserInfo" },
    ]),
    ("api.authentication.v1.UserInfo", &[
        Field { tag: 1, kind: Str, repeated: false, name: "username", target: "" },
        Field { tag: 2, kind: Str, repeated: false, name: "uid", target: "" },
        Field { tag: 3, kind: Str, repeated: true, name: "groups", target: "" },
    ]),
    ("api.authentication.v1.TokenRequestStatus", &[
        Field { tag: 1, kind: Str, repeated: false, name: "token", target: "" },
        Field { tag: 2, kind: Msg, repeated: false, name: "expiration_timestamp", target: "apimachinery.pkg.apis.meta.v1.Time" },
    ]),
];
