//! Who is asking and whether they may: the bearer token (the admin token, a member of
//! `system:masters`; a ServiceAccount JWT this server signed, whose ServiceAccount and
//! bound Pod still exist; none: `system:anonymous`), `Impersonate-*` headers checked as
//! upstream does, the request's attributes (verb, group, resource, subresource, name,
//! namespace, or a non-resource path), and the RBAC decision with upstream's 401 and
//! 403 answers. It reads the state; it never writes it.

use std::collections::{BTreeMap, HashMap};

use http::{HeaderMap, Method};
use serde_json::Value;

use super::rbac::{self, AUTHENTICATED, Attributes, MASTERS, Policy, User};
use super::registry::{RBAC_GROUP, StoreKey};
use super::routes::Route;
use super::status::ApiError;
use super::store::State;
use super::tokens::{self, Claims, Signer, TokenError};

/// The user the admin token (the kubeconfig's) authenticates as.
pub const ADMIN_USER: &str = "kubernetes-admin";

pub fn admin() -> User {
    User {
        name: ADMIN_USER.into(),
        groups: vec![MASTERS.into(), AUTHENTICATED.into()],
        ..Default::default()
    }
}

fn key(group: &str, plural: &str) -> StoreKey {
    (group.into(), plural.into())
}

/// The user a ServiceAccount token stands for, when `token` is one this server signed
/// for `audiences`, within its lifetime, and its ServiceAccount (and Pod, when bound to
/// one) still exist with the uids it names.
pub fn service_account_user(
    st: &State,
    signer: &Signer,
    token: &str,
    audiences: &[String],
) -> Result<(User, Claims), TokenError> {
    let now = chrono::Utc::now().timestamp();
    let claims = signer.verify(token, audiences, now)?;
    let k = &claims.kube;
    let sa = st
        .get(
            &key("", "serviceaccounts"),
            &k.namespace,
            &k.serviceaccount.name,
        )
        .filter(|sa| super::meta::uid(sa) == k.serviceaccount.uid)
        .ok_or_else(|| {
            TokenError::Gone(format!(
                "service account {}/{} has been deleted",
                k.namespace, k.serviceaccount.name
            ))
        })?;
    let mut extra = BTreeMap::new();
    if let Some(pod) = &k.pod {
        let live = st
            .get(&key("", "pods"), &k.namespace, &pod.name)
            .is_some_and(|p| super::meta::uid(p) == pod.uid);
        if !live {
            return Err(TokenError::Gone(format!(
                "pod {}/{} has been deleted",
                k.namespace, pod.name
            )));
        }
        extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            vec![pod.name.clone()],
        );
        extra.insert(
            "authentication.kubernetes.io/pod-uid".into(),
            vec![pod.uid.clone()],
        );
    }
    if let Some(node) = &k.node {
        extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            vec![node.name.clone()],
        );
        if !node.uid.is_empty() {
            extra.insert(
                "authentication.kubernetes.io/node-uid".into(),
                vec![node.uid.clone()],
            );
        }
    }
    extra.insert(
        "authentication.kubernetes.io/credential-id".into(),
        vec![format!("JTI={}", claims.jti)],
    );
    let user = User {
        name: format!(
            "{}{}:{}",
            rbac::SA_PREFIX,
            k.namespace,
            k.serviceaccount.name
        ),
        uid: super::meta::uid(sa).to_owned(),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{}", k.namespace),
            AUTHENTICATED.into(),
        ],
        extra,
    };
    Ok((user, claims))
}

/// The requester: anonymous without a token, 401 for a token that is not valid.
pub fn authenticate(
    st: &State,
    signer: &Signer,
    admin_token: &str,
    headers: &HeaderMap,
) -> Result<User, ApiError> {
    let Some(v) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(User::anonymous());
    };
    let token = v
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(ApiError::unauthorized)?;
    if token == admin_token {
        return Ok(admin());
    }
    match service_account_user(st, signer, token, &[tokens::ISSUER.to_owned()]) {
        Ok((u, _)) => Ok(u),
        Err(e) => {
            tracing::debug!(err = %e, "bearer token refused");
            Err(ApiError::unauthorized())
        }
    }
}

/// The RBAC objects of `st`.
pub fn policy(st: &State) -> Policy<'_> {
    Policy {
        cluster_roles: st.list(&key(RBAC_GROUP, "clusterroles"), None),
        roles: st.list(&key(RBAC_GROUP, "roles"), None),
        cluster_role_bindings: st.list(&key(RBAC_GROUP, "clusterrolebindings"), None),
        role_bindings: st.list(&key(RBAC_GROUP, "rolebindings"), None),
    }
}

/// The 403 for `user` refused `a`, as upstream's `responsewriters.Forbidden`.
pub fn forbidden(user: &User, a: &Attributes, reason: &str) -> ApiError {
    let mut why = rbac::forbidden_message(user, a);
    if !reason.is_empty() {
        why = format!("{why}: {reason}");
    }
    if a.resource_request {
        ApiError::forbidden_resource(&a.resource, &a.group, &a.name, &why)
    } else {
        ApiError::forbidden_resource("", "", "", &why)
    }
}

/// Allowed, or upstream's 403.
pub fn authorize(st: &State, user: &User, a: &Attributes) -> Result<(), ApiError> {
    let d = rbac::authorize(&policy(st), user, a);
    if d.allowed {
        Ok(())
    } else {
        Err(forbidden(user, a, &d.reason))
    }
}

/// `Impersonate-User`/`-Group`/`-Uid`/`-Extra-*`: the user to act as, once `user` may
/// impersonate each part (upstream's `WithImpersonation`).
pub fn impersonate(st: &State, user: User, headers: &HeaderMap) -> Result<User, ApiError> {
    let all = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    };
    let name = all("impersonate-user").into_iter().next();
    let groups = all("impersonate-group");
    let uid = all("impersonate-uid").into_iter().next();
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in headers {
        if let Some(key) = k.as_str().strip_prefix("impersonate-extra-")
            && let Ok(v) = v.to_str()
        {
            let key = percent_decode(key);
            extra.entry(key).or_default().push(v.to_owned());
        }
    }
    let Some(name) = name else {
        if !groups.is_empty() || uid.is_some() || !extra.is_empty() {
            return Err(ApiError::internal(
                "requested Impersonate-Group or Impersonate-Extra without Impersonate-User",
            ));
        }
        return Ok(user);
    };
    let check = |a: Attributes| authorize_impersonation(st, &user, a);
    match rbac::service_account_of(&name) {
        Some((ns, sa)) => {
            check(Attributes::resource("impersonate", "", "serviceaccounts", ns).with_name(sa))?
        }
        None => check(Attributes::resource("impersonate", "", "users", "").with_name(&name))?,
    }
    for g in &groups {
        check(Attributes::resource("impersonate", "", "groups", "").with_name(g))?;
    }
    if let Some(u) = &uid {
        check(
            Attributes::resource("impersonate", "authentication.k8s.io", "uids", "").with_name(u),
        )?;
    }
    for (k, vs) in &extra {
        for v in vs {
            check(
                Attributes::resource("impersonate", "authentication.k8s.io", "userextras", "")
                    .with_sub(k)
                    .with_name(v),
            )?;
        }
    }
    let mut groups = groups;
    if let Some((ns, _)) = rbac::service_account_of(&name)
        && groups.is_empty()
    {
        groups = vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
        ];
    }
    let anonymous = name == rbac::ANONYMOUS;
    let implied = if anonymous {
        rbac::UNAUTHENTICATED
    } else {
        AUTHENTICATED
    };
    if !groups.iter().any(|g| g == implied) {
        groups.push(implied.into());
    }
    Ok(User {
        name,
        uid: uid.unwrap_or_default(),
        groups,
        extra,
    })
}

fn authorize_impersonation(st: &State, user: &User, a: Attributes) -> Result<(), ApiError> {
    authorize(st, user, &a)
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("k={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_owned())
}

/// The attributes of a request, as upstream's `RequestInfoFactory` reads them.
pub fn attributes(
    route: &Route,
    method: &Method,
    path: &str,
    q: &HashMap<String, String>,
) -> Attributes {
    let Route::Resource(p) = route else {
        return Attributes::non_resource(&method.as_str().to_lowercase(), path);
    };
    let watch = q
        .get("watch")
        .is_some_and(|w| matches!(w.as_str(), "true" | "1"));
    let verb = match (method.clone(), p.name.is_some()) {
        (Method::GET | Method::HEAD, _) if watch => "watch",
        (Method::GET | Method::HEAD, true) => "get",
        (Method::GET | Method::HEAD, false) => "list",
        (Method::POST, _) => "create",
        (Method::PUT, _) => "update",
        (Method::PATCH, _) => "patch",
        (Method::DELETE, true) => "delete",
        (Method::DELETE, false) => "deletecollection",
        (m, _) => return Attributes::non_resource(&m.as_str().to_lowercase(), path),
    };
    // A list or watch of one object by field selector is authorized by its name.
    let mut name = p.name.clone().unwrap_or_default();
    if name.is_empty()
        && matches!(verb, "list" | "watch")
        && let Some(fs) = q.get("fieldSelector")
        && let Some(n) = fs.strip_prefix("metadata.name=")
        && !n.contains(',')
    {
        name = n.to_owned();
    }
    let namespace = match (&p.namespace, p.plural.as_str()) {
        (Some(ns), _) => ns.clone(),
        (None, "namespaces") => p.name.clone().unwrap_or_default(),
        (None, _) => String::new(),
    };
    Attributes {
        verb: verb.into(),
        resource_request: true,
        group: p.group.clone(),
        version: p.version.clone(),
        resource: p.plural.clone(),
        subresource: p.sub.clone().unwrap_or_default(),
        name,
        namespace,
        path: path.into(),
    }
}

/// The attributes an access review asks about (`spec.resourceAttributes` or
/// `spec.nonResourceAttributes`), with `namespace` forced for a local review.
pub fn review_attributes(spec: &Value, namespace: Option<&str>) -> Attributes {
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    if let Some(r) = spec.get("resourceAttributes").filter(|r| r.is_object()) {
        return Attributes {
            verb: s(&r["verb"]),
            resource_request: true,
            group: s(&r["group"]),
            version: s(&r["version"]),
            resource: s(&r["resource"]),
            subresource: s(&r["subresource"]),
            name: s(&r["name"]),
            namespace: namespace
                .map(str::to_owned)
                .unwrap_or_else(|| s(&r["namespace"])),
            path: String::new(),
        };
    }
    let n = &spec["nonResourceAttributes"];
    Attributes::non_resource(&s(&n["verb"]), &s(&n["path"]))
}

#[cfg(test)]
mod tests {
    use super::super::routes;
    use super::*;

    fn attrs(method: Method, path: &str, query: &str) -> Attributes {
        let q = routes::query(Some(query));
        attributes(&routes::route(path), &method, path, &q)
    }

    #[test]
    fn request_attributes_read_as_upstreams() {
        let a = attrs(Method::GET, "/api/v1/namespaces/x/pods", "");
        assert_eq!(
            (a.verb.as_str(), a.resource.as_str(), a.namespace.as_str()),
            ("list", "pods", "x")
        );
        let a = attrs(Method::GET, "/api/v1/pods", "watch=true");
        assert_eq!((a.verb.as_str(), a.namespace.as_str()), ("watch", ""));
        let a = attrs(
            Method::GET,
            "/apis/coordination.k8s.io/v1/namespaces/s/leases",
            "fieldSelector=metadata.name%3Dctl&watch=1",
        );
        assert_eq!((a.verb.as_str(), a.name.as_str()), ("watch", "ctl"));
        let a = attrs(
            Method::PATCH,
            "/apis/apps/v1/namespaces/s/deployments/web/scale",
            "",
        );
        assert_eq!(
            (
                a.verb.as_str(),
                a.group.as_str(),
                a.resource.as_str(),
                a.subresource.as_str(),
                a.name.as_str()
            ),
            ("patch", "apps", "deployments", "scale", "web")
        );
        let a = attrs(Method::DELETE, "/api/v1/namespaces/s/configmaps", "");
        assert_eq!(a.verb, "deletecollection");
        let a = attrs(Method::GET, "/api/v1/namespaces/s", "");
        assert_eq!(
            (a.verb.as_str(), a.namespace.as_str(), a.name.as_str()),
            ("get", "s", "s")
        );
        let a = attrs(Method::GET, "/apis", "");
        assert!(!a.resource_request);
        assert_eq!((a.verb.as_str(), a.path.as_str()), ("get", "/apis"));
    }

    #[test]
    fn forbidden_answers_name_the_resource_and_the_permission() {
        let u = User {
            name: "system:serviceaccount:ns:sa".into(),
            ..Default::default()
        };
        let e = forbidden(&u, &Attributes::resource("list", "", "pods", "x"), "");
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "pods is forbidden: User \"system:serviceaccount:ns:sa\" cannot list resource \"pods\" in API group \"\" in the namespace \"x\""
        );
        let e = forbidden(
            &u,
            &Attributes::resource("patch", "apps", "deployments", "x")
                .with_sub("scale")
                .with_name("web"),
            "",
        );
        assert_eq!(
            e.message,
            "deployments.apps \"web\" is forbidden: User \"system:serviceaccount:ns:sa\" cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"x\""
        );
        let e = forbidden(
            &User::anonymous(),
            &Attributes::non_resource("get", "/api"),
            "",
        );
        assert_eq!(
            e.message,
            "forbidden: User \"system:anonymous\" cannot get path \"/api\""
        );
    }
}
