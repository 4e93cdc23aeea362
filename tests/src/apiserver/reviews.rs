//! The create-only API of authentication and authorization: TokenRequest
//! (`serviceaccounts/<name>/token`), TokenReview, SelfSubjectReview (`kubectl auth
//! whoami`), SelfSubjectAccessReview (`kubectl auth can-i`), SubjectAccessReview,
//! LocalSubjectAccessReview and SelfSubjectRulesReview (`kubectl auth can-i --list`).
//! Each is answered from the state and never stored.

use serde_json::{Value, json};

use super::access;
use super::meta;
use super::rbac::{self, User};
use super::registry::{Builtin, ResourceType, StoreKey};
use super::status::{ApiError, Cause};
use super::store::State;
use super::tokens::{self, Claims, KubeClaim, Ref, Signer};

fn reply(rt: &ResourceType, body: &Value, metadata: Value, status: Value) -> Value {
    json!({
        "kind": rt.kind,
        "apiVersion": rt.api_version(),
        "metadata": metadata,
        "spec": body["spec"],
        "status": status,
    })
}

fn decision_status(d: &rbac::Decision) -> Value {
    let mut s = json!({"allowed": d.allowed});
    if !d.reason.is_empty() {
        s["reason"] = json!(d.reason);
    }
    s
}

/// Answers a create of the review kind `rt` by `user` (in namespace `ns` for a local
/// review).
pub fn create(
    st: &State,
    signer: &Signer,
    admin_token: &str,
    rt: &ResourceType,
    ns: &str,
    user: &User,
    body: &Value,
) -> Result<Value, ApiError> {
    let md = json!({"creationTimestamp": null});
    let spec = &body["spec"];
    let policy = access::policy(st);
    let status = match rt.builtin {
        Some(Builtin::SelfSubjectReview) => json!({"userInfo": user.to_json()}),
        Some(Builtin::TokenReview) => token_review(st, signer, admin_token, spec),
        Some(Builtin::SelfSubjectAccessReview) => {
            let a = access::review_attributes(spec, None);
            decision_status(&rbac::authorize(&policy, user, &a))
        }
        Some(Builtin::SubjectAccessReview | Builtin::LocalSubjectAccessReview) => {
            let local = rt.builtin == Some(Builtin::LocalSubjectAccessReview);
            let asked = spec["resourceAttributes"]["namespace"]
                .as_str()
                .unwrap_or("");
            if local && !asked.is_empty() && asked != ns {
                return Err(ApiError::invalid(
                    &rt.kind,
                    &rt.group,
                    "",
                    vec![Cause::invalid(
                        "spec.resourceAttributes.namespace",
                        &json!(asked),
                        &format!("must match metadata.namespace \"{ns}\""),
                    )],
                ));
            }
            let subject = subject_of(spec);
            if subject.name.is_empty() && subject.groups.is_empty() {
                return Err(ApiError::invalid(
                    &rt.kind,
                    &rt.group,
                    "",
                    vec![Cause::invalid(
                        "spec.user",
                        &json!(""),
                        "at least one of user or group must be specified",
                    )],
                ));
            }
            let a = access::review_attributes(spec, local.then_some(ns));
            decision_status(&rbac::authorize(&policy, &subject, &a))
        }
        Some(Builtin::SelfSubjectRulesReview) => {
            let target_ns = spec["namespace"].as_str().unwrap_or("");
            let (res, non, errors) = rbac::rules_for(&policy, user, target_ns);
            let mut s = json!({"resourceRules": res, "nonResourceRules": non, "incomplete": !errors.is_empty()});
            if !errors.is_empty() {
                s["evaluationError"] = json!(errors.join(", "));
            }
            s
        }
        _ => return Err(ApiError::method_not_allowed("POST")),
    };
    let mut md = md;
    if rt.namespaced {
        md["namespace"] = json!(ns);
    }
    Ok(reply(rt, body, md, status))
}

fn subject_of(spec: &Value) -> User {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    User {
        name: spec["user"].as_str().unwrap_or("").to_owned(),
        uid: spec["uid"].as_str().unwrap_or("").to_owned(),
        groups: strings(&spec["groups"]),
        extra: spec["extra"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), strings(v))).collect())
            .unwrap_or_default(),
    }
}

fn token_review(st: &State, signer: &Signer, admin_token: &str, spec: &Value) -> Value {
    let token = spec["token"].as_str().unwrap_or("");
    let asked: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let audiences = if asked.is_empty() {
        vec![tokens::ISSUER.to_owned()]
    } else {
        asked.clone()
    };
    if token == admin_token && !token.is_empty() {
        return json!({"authenticated": true, "user": access::admin().to_json(), "audiences": audiences});
    }
    match access::service_account_user(st, signer, token, &audiences) {
        Ok((user, claims)) => {
            let matched: Vec<&String> = claims
                .aud
                .iter()
                .filter(|a| audiences.contains(a))
                .collect();
            json!({"authenticated": true, "user": user.to_json(), "audiences": matched})
        }
        Err(e) => json!({"user": {}, "error": format!("[invalid bearer token, {e}]")}),
    }
}

/// `POST serviceaccounts/<name>/token`: a token for the ServiceAccount, for the
/// audiences asked (the API server's by default), bound to a Pod when asked.
pub fn token_request(
    st: &State,
    signer: &Signer,
    ns: &str,
    name: &str,
    body: &Value,
) -> Result<Value, ApiError> {
    token_request_at(st, signer, ns, name, body, chrono::Utc::now().timestamp())
}

/// [`token_request`] as if asked at `now` (Unix seconds): tests make expired tokens
/// with a `now` in the past.
pub fn token_request_at(
    st: &State,
    signer: &Signer,
    ns: &str,
    name: &str,
    body: &Value,
    now: i64,
) -> Result<Value, ApiError> {
    let sa_key: StoreKey = (String::new(), "serviceaccounts".into());
    let sa = st
        .get(&sa_key, ns, name)
        .ok_or_else(|| ApiError::not_found("serviceaccounts", "", name))?;
    let spec = &body["spec"];
    let invalid = |field: &str, v: &Value, why: &str| {
        ApiError::invalid(
            "TokenRequest",
            "authentication.k8s.io",
            name,
            vec![Cause::invalid(field, v, why)],
        )
    };
    let expiration = spec["expirationSeconds"]
        .as_i64()
        .unwrap_or(tokens::DEFAULT_EXPIRATION_SECS);
    if expiration < tokens::MIN_EXPIRATION_SECS {
        return Err(invalid(
            "spec.expirationSeconds",
            &json!(expiration),
            "may not specify a duration less than 10 minutes",
        ));
    }
    if expiration > 1 << 32 {
        return Err(invalid(
            "spec.expirationSeconds",
            &json!(expiration),
            "may not specify a duration larger than 2^32 seconds",
        ));
    }
    let mut audiences: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if audiences.is_empty() {
        audiences = vec![tokens::ISSUER.to_owned()];
    }
    let bound = &spec["boundObjectRef"];
    let mut node = None;
    let pod = match bound["kind"].as_str() {
        None => None,
        Some("Pod") => {
            let pname = bound["name"].as_str().unwrap_or("");
            let p = st
                .get(&(String::new(), "pods".into()), ns, pname)
                .ok_or_else(|| ApiError::not_found("pods", "", pname))?;
            let uid = meta::uid(p);
            if let Some(want) = bound["uid"].as_str().filter(|u| !u.is_empty())
                && want != uid
            {
                return Err(ApiError::conflict(
                    "pods",
                    "",
                    pname,
                    &format!(
                        "the UID in the bound object reference ({want}) does not match the UID in record. The object might have been deleted and then recreated"
                    ),
                ));
            }
            // As upstream: a token bound to a scheduled pod also names its node, so a
            // TokenReview can say which node the bearer runs on.
            if let Some(n) = p["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
                let uid = st
                    .get(&(String::new(), "nodes".into()), "", n)
                    .map(|o| meta::uid(o).to_owned())
                    .unwrap_or_default();
                node = Some(Ref {
                    name: n.to_owned(),
                    uid,
                });
            }
            Some(Ref {
                name: pname.to_owned(),
                uid: uid.to_owned(),
            })
        }
        Some(other) => {
            return Err(invalid(
                "spec.boundObjectRef.kind",
                &json!(other),
                "supported kinds in this server: Pod",
            ));
        }
    };
    let claims = Claims {
        iss: tokens::ISSUER.into(),
        sub: format!("{}{ns}:{name}", rbac::SA_PREFIX),
        aud: audiences.clone(),
        exp: now + expiration,
        nbf: now,
        iat: now,
        jti: meta::new_uid(),
        kube: KubeClaim {
            namespace: ns.into(),
            serviceaccount: Ref {
                name: name.into(),
                uid: meta::uid(sa).to_owned(),
            },
            pod,
            node,
        },
    };
    let token = signer.sign(&claims);
    let expires = chrono::DateTime::from_timestamp(claims.exp, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    let mut out_spec = spec.clone();
    if !out_spec.is_object() {
        out_spec = json!({});
    }
    out_spec["audiences"] = json!(audiences);
    out_spec["expirationSeconds"] = json!(expiration);
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": meta::now_rfc3339()},
        "spec": out_spec,
        "status": {"token": token, "expirationTimestamp": expires},
    }))
}
