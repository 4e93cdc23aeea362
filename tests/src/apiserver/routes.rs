//! Request routing: what an URL path names (discovery, OpenAPI, health, or a resource
//! path with group, version, namespace, plural, name and subresource) and the query
//! parameters. Syntax only; whether a resource exists is the handlers' question.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourcePath {
    pub group: String,
    pub version: String,
    /// `Some` when the path went through `/namespaces/<ns>/`.
    pub namespace: Option<String>,
    pub plural: String,
    pub name: Option<String>,
    pub sub: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Api,
    Apis,
    Group(String),
    GroupVersion(String, String),
    Resource(ResourcePath),
    Version,
    Health,
    OpenApiV3Index,
    OpenApiV3(String, String),
    NotFound,
}

fn decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn resource(group: &str, version: &str, rest: &[&str]) -> Route {
    let r = |ns: Option<&str>, plural: &str, name: Option<&str>, sub: Option<&str>| {
        Route::Resource(ResourcePath {
            group: group.into(),
            version: version.into(),
            namespace: ns.map(decode),
            plural: plural.into(),
            name: name.map(decode),
            sub: sub.map(str::to_owned),
        })
    };
    match rest {
        [] => Route::GroupVersion(group.into(), version.into()),
        // `/namespaces/<name>/status|finalize` is the Namespace object's subresource.
        ["namespaces", ns, sub @ ("status" | "finalize")] => {
            r(None, "namespaces", Some(ns), Some(sub))
        }
        ["namespaces", ns, plural] => r(Some(ns), plural, None, None),
        ["namespaces", ns, plural, name] => r(Some(ns), plural, Some(name), None),
        ["namespaces", ns, plural, name, sub] => r(Some(ns), plural, Some(name), Some(sub)),
        [plural] => r(None, plural, None, None),
        [plural, name] => r(None, plural, Some(name), None),
        [plural, name, sub] => r(None, plural, Some(name), Some(sub)),
        _ => Route::NotFound,
    }
}

pub fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segs.as_slice() {
        ["api"] => Route::Api,
        ["api", "v1", rest @ ..] => resource("", "v1", rest),
        ["apis"] => Route::Apis,
        ["apis", g] => Route::Group((*g).into()),
        ["apis", g, v, rest @ ..] => resource(g, v, rest),
        ["version"] => Route::Version,
        ["healthz" | "livez" | "readyz", ..] => Route::Health,
        ["openapi", "v3"] => Route::OpenApiV3Index,
        ["openapi", "v3", "api", v] => Route::OpenApiV3(String::new(), (*v).into()),
        ["openapi", "v3", "apis", g, v] => Route::OpenApiV3((*g).into(), (*v).into()),
        _ => Route::NotFound,
    }
}

/// Query parameters (the last value of a repeated one wins).
pub fn query(q: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(
        group: &str,
        ns: Option<&str>,
        plural: &str,
        name: Option<&str>,
        sub: Option<&str>,
    ) -> Route {
        Route::Resource(ResourcePath {
            group: group.into(),
            version: "v1".into(),
            namespace: ns.map(Into::into),
            plural: plural.into(),
            name: name.map(Into::into),
            sub: sub.map(Into::into),
        })
    }

    #[test]
    fn resource_paths() {
        assert_eq!(
            route("/api/v1/namespaces"),
            res("", None, "namespaces", None, None)
        );
        assert_eq!(
            route("/api/v1/namespaces/default"),
            res("", None, "namespaces", Some("default"), None)
        );
        assert_eq!(
            route("/api/v1/namespaces/x/status"),
            res("", None, "namespaces", Some("x"), Some("status"))
        );
        assert_eq!(
            route("/api/v1/namespaces/x/pods"),
            res("", Some("x"), "pods", None, None)
        );
        assert_eq!(
            route("/apis/apps/v1/namespaces/x/deployments/web/scale"),
            res("apps", Some("x"), "deployments", Some("web"), Some("scale"))
        );
        assert_eq!(
            route("/apis/apps/v1/deployments"),
            res("apps", None, "deployments", None, None)
        );
        assert_eq!(
            route("/apis/apps/v1"),
            Route::GroupVersion("apps".into(), "v1".into())
        );
        assert_eq!(route("/apis/apps"), Route::Group("apps".into()));
        assert_eq!(
            route("/openapi/v3/apis/apps/v1"),
            Route::OpenApiV3("apps".into(), "v1".into())
        );
        assert_eq!(route("/openapi/v2"), Route::NotFound);
    }

    #[test]
    fn query_is_decoded() {
        let q = query(Some("labelSelector=app%3Dweb%2Ctier+in+(a)&watch=1"));
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["watch"], "1");
    }
}
