//! The resource verbs: get, list, watch, create, update, patch (all four kinds), delete,
//! deletecollection, and the status, scale and binding subresources. Parses parameters
//! and bodies, takes the state lock, calls the lifecycle, renders the answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};

use super::convert;
use super::faults::{self, Fault};
use super::fields;
use super::http::{Body, Format, Shared, error, respond};
use super::lifecycle::{self, DeleteOpts, FieldValidation, Propagation, Sub, WriteOpts};
use super::meta;
use super::paging;
use super::patch::{self, PatchType};
use super::registry::{Builtin, ResourceType};
use super::reviews;
use super::routes::ResourcePath;
use super::scale;
use super::schemas::builtin_schemas;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::State;
use super::table::{self, IncludeObject};
use super::watch::{self, WatchSpec};

/// Upper bound on a watch's `timeoutSeconds`.
const MAX_WATCH_TIMEOUT: Duration = Duration::from_secs(3600);

pub struct Ctx<'a> {
    pub shared: &'a Arc<Shared>,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub q: &'a HashMap<String, String>,
    pub body: &'a Bytes,
    pub format: &'a Format,
    pub user_agent: &'a str,
    /// The requester, authenticated and allowed this request.
    pub user: &'a super::rbac::User,
}

impl Ctx<'_> {
    fn param(&self, k: &str) -> Option<&str> {
        self.q.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }
    fn flag(&self, k: &str) -> bool {
        matches!(self.param(k), Some("true" | "1"))
    }
    fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

struct Reply {
    status: u16,
    body: Value,
    warnings: Vec<String>,
}

fn ok(body: Value) -> Reply {
    Reply {
        status: 200,
        body,
        warnings: vec![],
    }
}

pub async fn resource(ctx: Ctx<'_>, p: ResourcePath) -> Response<Body> {
    if p.sub.as_deref() == Some("log") && p.plural == "pods" && p.group.is_empty() {
        let url = {
            let st = ctx.shared.lock();
            resolve(&st, &p).and_then(|_| super::logs::kubelet_url(&st, &p, ctx.q))
        };
        let answer = match (ctx.method.clone(), url) {
            (Method::GET, Ok(url)) => super::logs::proxy(&url).await,
            (Method::GET, Err(e)) => Err(e),
            (m, _) => Err(ApiError::method_not_allowed(m.as_str())),
        };
        return answer.unwrap_or_else(|e| error(&e));
    }
    // `?watch=true` on an object's own path is the legacy single-object watch.
    let is_watch = *ctx.method == Method::GET && p.sub.is_none() && ctx.flag("watch");
    let fault = ctx.shared.faults.decide(&faults::RequestInfo {
        user: &ctx.user.name,
        watch: is_watch,
        resume: is_watch
            && ctx.param("resourceVersion").is_some_and(|rv| rv != "0")
            && ctx.param("sendInitialEvents") != Some("true"),
        update: matches!(*ctx.method, Method::PUT | Method::PATCH),
        subresource: p.sub.as_deref(),
    });
    match fault {
        Some(Fault::ServerError) => {
            return error(&ApiError::internal(
                "injected fault: the server failed to handle this request",
            ));
        }
        Some(Fault::Conflict) => {
            let name = p.name.as_deref().unwrap_or_default();
            return error(&ApiError::stale(&p.plural, &p.group, name));
        }
        Some(Fault::Gone) => return gone_watch(),
        Some(Fault::Slow(by)) => {
            // Carried out now, answered late: the client times out not knowing.
            let answer = match sync_resource(&ctx, &p) {
                Ok(r) => respond(r.status, &r.body, ctx.format, &r.warnings),
                Err(e) => error(&e),
            };
            tokio::time::sleep(by).await;
            return answer;
        }
        None => {}
    }
    if is_watch {
        return match start_watch(&ctx, &p).await {
            Ok(r) => r,
            Err(e) => error(&e),
        };
    }
    match sync_resource(&ctx, &p) {
        Ok(r) => respond(r.status, &r.body, ctx.format, &r.warnings),
        Err(e) => error(&e),
    }
}

/// The served type `p` names, checked against how the path is scoped.
fn resolve(st: &State, p: &ResourcePath) -> Result<Arc<ResourceType>, ApiError> {
    let rt = st
        .registry
        .find(&p.group, &p.version, &p.plural)
        .ok_or_else(ApiError::path_not_found)?;
    if p.namespace.is_some() && !rt.namespaced {
        return Err(ApiError::path_not_found());
    }
    if rt.namespaced && p.namespace.is_none() && p.name.is_some() {
        return Err(ApiError::path_not_found());
    }
    Ok(rt)
}

fn write_opts(ctx: &Ctx) -> Result<WriteOpts, ApiError> {
    let dry_run = match ctx.param("dryRun") {
        None => false,
        Some("All") => true,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: \"{v}\": supported values: \"All\""
            )));
        }
    };
    let field_validation = match ctx.param("fieldValidation") {
        None | Some("Warn") => FieldValidation::Warn,
        Some("Ignore") => FieldValidation::Ignore,
        Some("Strict") => FieldValidation::Strict,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "fieldValidation: Unsupported value: \"{v}\": supported values: \"Ignore\", \"Strict\", \"Warn\""
            )));
        }
    };
    let field_manager = match ctx.param("fieldManager") {
        Some(m) if m.len() > 128 => {
            return Err(ApiError::bad_request(
                "fieldManager: Too long: may not be more than 128 bytes",
            ));
        }
        Some(m) => m.to_owned(),
        // Upstream names an unnamed writer after its User-Agent's product.
        None => ctx
            .user_agent
            .split('/')
            .next()
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown")
            .to_owned(),
    };
    Ok(WriteOpts {
        dry_run,
        field_validation,
        field_manager,
    })
}

/// A create/update body: JSON or YAML.
fn decode_body(ctx: &Ctx) -> Result<Value, ApiError> {
    let ct = ctx
        .content_type()
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    match ct.as_str() {
        "" | "application/json" | "*/*" => serde_json::from_slice(ctx.body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}"))),
        "application/yaml" => serde_norway::from_slice(ctx.body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}"))),
        "application/vnd.kubernetes.protobuf" => {
            super::protobuf::decode_object(ctx.body).map_err(|e| match e {
                super::protobuf::ProtoError::UnknownKind { .. }
                | super::protobuf::ProtoError::UnknownField { .. } => {
                    let mut err = ApiError::unsupported_media_type(
                        &ct,
                        &["application/json", "application/yaml"],
                    );
                    err.message
                        .push_str(&format!(" ({e}; send JSON or YAML instead)"));
                    err
                }
                other => ApiError::bad_request(format!("decoding the protobuf body: {other}")),
            })
        }
        other => Err(ApiError::unsupported_media_type(
            other,
            &["application/json", "application/yaml"],
        )),
    }
}

fn selectors(ctx: &Ctx, rt: &ResourceType) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let ls = LabelSelector::parse(ctx.param("labelSelector").unwrap_or(""))?;
    let fs = FieldSelector::parse(ctx.param("fieldSelector").unwrap_or(""))?;
    fs.check_supported(rt)?;
    Ok((ls, fs))
}

fn matches(
    rt: &ResourceType,
    ns: Option<&str>,
    ls: &LabelSelector,
    fs: &FieldSelector,
    obj: &Value,
) -> bool {
    ns.is_none_or(|n| meta::namespace(obj) == n)
        && ls.matches(&meta::labels(obj))
        && fs.matches(rt, obj)
}

fn partial(obj: &Value, av: &str) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": av, "metadata": obj["metadata"]})
}

fn render_one(ctx: &Ctx, rt: &ResourceType, obj: &Value, rv: &str) -> Result<Value, ApiError> {
    Ok(match ctx.format {
        Format::Table(av) => {
            table::table(rt, std::slice::from_ref(obj), rv, include_object(ctx)?, av)
        }
        Format::PartialMeta(av) => partial(obj, av),
        _ => obj.clone(),
    })
}

fn include_object(ctx: &Ctx) -> Result<IncludeObject, ApiError> {
    let v = ctx.param("includeObject").unwrap_or("");
    IncludeObject::parse(v)
        .ok_or_else(|| ApiError::bad_request(format!("includeObject: Unsupported value: \"{v}\"")))
}

fn sync_resource(ctx: &Ctx, p: &ResourcePath) -> Result<Reply, ApiError> {
    let mut st = ctx.shared.lock();
    let rt = resolve(&st, p)?;
    let ns = p.namespace.clone().unwrap_or_default();
    let m = ctx.method.clone();
    if rt.create_only {
        return match (&m, p.name.as_deref()) {
            (&Method::POST, None) => {
                let body = decode_body(ctx)?;
                let shared = ctx.shared;
                let out = reviews::create(
                    &st,
                    &shared.signer,
                    &shared.token,
                    &rt,
                    &ns,
                    ctx.user,
                    &body,
                )?;
                Ok(Reply {
                    status: 201,
                    body: out,
                    warnings: vec![],
                })
            }
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        };
    }
    match (p.name.as_deref(), p.sub.as_deref()) {
        (None, None) => match m {
            Method::GET => list(ctx, &st, &rt, p.namespace.as_deref()),
            Method::POST if rt.namespaced && p.namespace.is_none() => {
                Err(ApiError::method_not_allowed("POST"))
            }
            Method::POST => {
                let opts = write_opts(ctx)?;
                let obj = decode_body(ctx)?;
                let w = lifecycle::create(&mut st, &rt, &ns, obj, &opts)?;
                Ok(Reply {
                    status: 201,
                    body: convert::to_served(&w.object, &rt),
                    warnings: w.warnings,
                })
            }
            Method::DELETE => delete_collection(ctx, &mut st, &rt, p.namespace.as_deref()),
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        },
        (Some(name), None) => match m {
            Method::GET => get(ctx, &st, &rt, &ns, name),
            Method::PUT => {
                let opts = write_opts(ctx)?;
                let obj = decode_body(ctx)?;
                let w = lifecycle::update(&mut st, &rt, &ns, name, obj, Sub::Main, &opts)?;
                Ok(Reply {
                    status: 200,
                    body: convert::to_served(&w.object, &rt),
                    warnings: w.warnings,
                })
            }
            Method::PATCH => patch(ctx, &mut st, &rt, &ns, name, Sub::Main),
            Method::DELETE => delete(ctx, &mut st, &rt, &ns, name),
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        },
        (Some(name), Some("status")) if rt.status => match m {
            Method::GET => get(ctx, &st, &rt, &ns, name),
            Method::PUT => {
                let opts = write_opts(ctx)?;
                let obj = decode_body(ctx)?;
                let w = lifecycle::update(&mut st, &rt, &ns, name, obj, Sub::Status, &opts)?;
                Ok(Reply {
                    status: 200,
                    body: convert::to_served(&w.object, &rt),
                    warnings: w.warnings,
                })
            }
            Method::PATCH => patch(ctx, &mut st, &rt, &ns, name, Sub::Status),
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        },
        (Some(name), Some("scale")) if rt.scale.is_some() => {
            scale_sub(ctx, &mut st, &rt, &ns, name)
        }
        (Some(name), Some("token")) if rt.builtin == Some(Builtin::ServiceAccount) => match m {
            Method::POST => {
                let body = decode_body(ctx)?;
                let out = reviews::token_request(&st, &ctx.shared.signer, &ns, name, &body)?;
                Ok(Reply {
                    status: 201,
                    body: out,
                    warnings: vec![],
                })
            }
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        },
        (Some(name), Some("binding")) if rt.builtin == Some(Builtin::Pod) => match m {
            Method::POST => bind(ctx, &mut st, &rt, &ns, name),
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        },
        _ => Err(ApiError::path_not_found()),
    }
}

fn get(ctx: &Ctx, st: &State, rt: &ResourceType, ns: &str, name: &str) -> Result<Reply, ApiError> {
    let obj = st
        .get(&convert::storage_key(rt), ns, name)
        .ok_or_else(|| ApiError::not_found(&rt.plural, &rt.group, name))?;
    let served = convert::to_served(obj, rt);
    let rv = meta::resource_version(&served).to_owned();
    Ok(ok(render_one(ctx, rt, &served, &rv)?))
}

fn list(ctx: &Ctx, st: &State, rt: &ResourceType, ns: Option<&str>) -> Result<Reply, ApiError> {
    let (ls, fs) = selectors(ctx, rt)?;
    let current = st.rv();
    let key = convert::storage_key(rt);
    let mut limit = paging::parse_limit(ctx.param("limit"))?;
    let resume = match ctx.param("continue") {
        Some(token) => {
            if ctx.param("resourceVersion").is_some() {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            Some(paging::decode(token)?)
        }
        None => None,
    };
    // The snapshot this page shows: the continued list's, an exact older one, or now.
    let snapshot = match (&resume, ctx.param("resourceVersion")) {
        (Some(c), _) => u64::try_from(c.rv).ok(),
        (None, None) => None,
        (None, Some(rv)) => {
            let n: u64 = rv.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "resourceVersion: Invalid value: \"{rv}\": must be an integer"
                ))
            })?;
            match ctx.param("resourceVersionMatch") {
                Some("Exact") if n > current => {
                    return Err(ApiError::timeout(format!(
                        "Too large resource version: {n}, current: {current}"
                    )));
                }
                Some("Exact") => Some(n),
                Some("NotOlderThan") | None if n > current => {
                    return Err(ApiError::timeout(format!(
                        "Too large resource version: {n}, current: {current}"
                    )));
                }
                // "0" is served from the watch cache, which ignores `limit`.
                None if n == 0 => {
                    limit = None;
                    None
                }
                Some("NotOlderThan") | None => None,
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "resourceVersionMatch: Unsupported value: \"{other}\""
                    )));
                }
            }
        }
    };
    // Only what the page may show is cloned and converted: the objects the selectors
    // match past the continue point (each page of a 10,000-object list cloned all).
    let after = resume.as_ref().map(|c| c.after.as_str());
    let wanted = |o: &Value| {
        matches(rt, ns, &ls, &fs, o) && after.is_none_or(|a| paging::key_of(o).as_str() > a)
    };
    let stored: Vec<std::borrow::Cow<'_, Value>> = match snapshot {
        Some(at) => match st.list_at(&key, ns, at, wanted) {
            Ok(objs) => objs,
            Err(e) => {
                return match &resume {
                    Some(c) => {
                        let (err, token) = paging::expired(&c.after);
                        Err(err.with_continue(token))
                    }
                    None => Err(e),
                };
            }
        },
        None => st
            .list(&key, ns)
            .into_iter()
            .filter(|o| wanted(o))
            .map(std::borrow::Cow::Borrowed)
            .collect(),
    };
    let rv_num = snapshot.unwrap_or(current);
    let filtered = ctx.param("labelSelector").is_some() || ctx.param("fieldSelector").is_some();
    let mut page = paging::page_of(
        stored,
        resume.as_ref().map(|c| c.after.as_str()),
        limit,
        i64::try_from(rv_num).unwrap_or(i64::MAX),
        filtered,
    );
    page.items = page
        .items
        .iter()
        .map(|o| convert::to_served(o, rt))
        .collect();
    let rv = rv_num.to_string();
    let mut list_meta = json!({"resourceVersion": rv});
    if let Some(t) = &page.continue_token {
        list_meta["continue"] = json!(t);
    }
    if let Some(n) = page.remaining {
        list_meta["remainingItemCount"] = json!(n);
    }
    let items = page.items;
    let body = match ctx.format {
        Format::Table(av) => {
            let mut t = table::table(rt, &items, &rv, include_object(ctx)?, av);
            t["metadata"] = list_meta;
            t
        }
        Format::PartialMeta(av) => json!({
            "kind": "PartialObjectMetadataList", "apiVersion": av, "metadata": list_meta,
            "items": items.iter().map(|o| partial(o, av)).collect::<Vec<_>>(),
        }),
        _ => {
            json!({"kind": rt.list_kind, "apiVersion": rt.api_version(), "metadata": list_meta, "items": items})
        }
    };
    Ok(ok(body))
}

fn delete_opts(ctx: &Ctx) -> Result<DeleteOpts, ApiError> {
    let body: Value = if ctx.body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(ctx.body).map_err(|e| {
            ApiError::bad_request(format!("the DeleteOptions body is not valid JSON: {e}"))
        })?
    };
    let grace = match ctx.param("gracePeriodSeconds") {
        Some(g) => Some(g.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!("gracePeriodSeconds: Invalid value: \"{g}\""))
        })?),
        None => body["gracePeriodSeconds"].as_i64(),
    };
    let prop = ctx
        .param("propagationPolicy")
        .map(str::to_owned)
        .or_else(|| body["propagationPolicy"].as_str().map(str::to_owned));
    let orphan = ctx
        .param("orphanDependents")
        .map(|v| v == "true")
        .or_else(|| body["orphanDependents"].as_bool());
    let propagation = match (prop.as_deref(), orphan) {
        (Some("Background") | None, None | Some(false)) => Propagation::Background,
        (Some("Foreground"), _) => Propagation::Foreground,
        (Some("Orphan"), _) | (None, Some(true)) => Propagation::Orphan,
        (Some("Background"), Some(true)) => Propagation::Orphan,
        (Some(other), _) => {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\""
            )));
        }
    };
    let dry_run = match ctx.param("dryRun").map(str::to_owned).or_else(|| {
        body["dryRun"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(str::to_owned)
    }) {
        None => false,
        Some(v) if v == "All" => true,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: \"{v}\": supported values: \"All\""
            )));
        }
    };
    Ok(DeleteOpts {
        grace_period: grace,
        propagation,
        uid: body["preconditions"]["uid"].as_str().map(str::to_owned),
        resource_version: body["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_owned),
        dry_run,
    })
}

fn delete(
    ctx: &Ctx,
    st: &mut State,
    rt: &ResourceType,
    ns: &str,
    name: &str,
) -> Result<Reply, ApiError> {
    let opts = delete_opts(ctx)?;
    let obj = lifecycle::delete(st, rt, ns, name, &opts)?;
    let key = convert::storage_key(rt);
    if st.get(&key, ns, name).is_some() || opts.dry_run {
        // Still there: marked for deletion (finalizers or graceful termination).
        let status = if opts.dry_run { 200 } else { 202 };
        return Ok(Reply {
            status,
            body: convert::to_served(&obj, rt),
            warnings: vec![],
        });
    }
    Ok(ok(convert::to_served(&obj, rt)))
}

fn delete_collection(
    ctx: &Ctx,
    st: &mut State,
    rt: &ResourceType,
    ns: Option<&str>,
) -> Result<Reply, ApiError> {
    let (ls, fs) = selectors(ctx, rt)?;
    let opts = delete_opts(ctx)?;
    let targets: Vec<(String, String)> = st
        .list(&convert::storage_key(rt), ns)
        .into_iter()
        .filter(|o| matches(rt, ns, &ls, &fs, o))
        .map(|o| (meta::namespace(o).to_owned(), meta::name(o).to_owned()))
        .collect();
    let mut items = vec![];
    for (n, name) in targets {
        items.push(convert::to_served(
            &lifecycle::delete(st, rt, &n, &name, &opts)?,
            rt,
        ));
    }
    Ok(ok(
        json!({"kind": rt.list_kind, "apiVersion": rt.api_version(), "metadata": {"resourceVersion": st.rv().to_string()}, "items": items}),
    ))
}

fn patch_type(ctx: &Ctx) -> Result<PatchType, ApiError> {
    let ct = ctx.content_type();
    PatchType::from_content_type(ct).ok_or_else(|| {
        ApiError::unsupported_media_type(
            ct,
            &[
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/apply-patch+yaml",
                "application/strategic-merge-patch+json",
            ],
        )
    })
}

/// Apply a non-apply patch of `ctx`'s body to `doc`, with `smp_root` the schema for a
/// strategic merge patch (`None`: this type does not take one).
fn apply_patch_body(
    ctx: &Ctx,
    pt: PatchType,
    doc: &mut Value,
    smp_root: Option<&Value>,
) -> Result<(), ApiError> {
    match pt {
        PatchType::Json => patch::json_patch(doc, ctx.body),
        PatchType::Merge => patch::merge_patch(doc, ctx.body),
        PatchType::Strategic => match smp_root {
            Some(root) => {
                patch::strategic_merge_patch(doc, ctx.body, root, &builtin_schemas().defs)
            }
            None => Err(ApiError::unsupported_media_type(
                "application/strategic-merge-patch+json",
                &[
                    "application/json-patch+json",
                    "application/merge-patch+json",
                    "application/apply-patch+yaml",
                ],
            )),
        },
        PatchType::Apply => Err(ApiError::unsupported_media_type(
            "application/apply-patch+yaml",
            &[
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ],
        )),
    }
}

fn smp_root(rt: &ResourceType) -> Option<&'static Value> {
    let s = builtin_schemas();
    rt.builtin
        .and_then(|b| s.roots.get(&b))
        .and_then(|r| s.defs.get(r))
}

fn patch(
    ctx: &Ctx,
    st: &mut State,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    sub: Sub,
) -> Result<Reply, ApiError> {
    let pt = patch_type(ctx)?;
    let mut opts = write_opts(ctx)?;
    let key = convert::storage_key(rt);
    let current = st.get(&key, ns, name).map(|o| convert::to_served(o, rt));
    if pt == PatchType::Apply {
        let manager = ctx.param("fieldManager").ok_or_else(|| {
            ApiError::invalid(
                "PatchOptions",
                "meta.k8s.io",
                "",
                vec![super::status::Cause::required_because(
                    "fieldManager",
                    "is required for apply patch",
                )],
            )
        })?;
        let cfg: Value = serde_norway::from_slice(ctx.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        if !cfg.is_object() {
            return Err(ApiError::bad_request(
                "the apply configuration must be an object",
            ));
        }
        if cfg["apiVersion"].as_str().is_none_or(str::is_empty)
            || cfg["kind"].as_str().is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request(
                "apiVersion and kind must be set in an apply configuration",
            ));
        }
        if let Some(n) = cfg["metadata"]["name"].as_str().filter(|n| *n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        let (root, defs) = fields::schema_for(rt);
        let schema = fields::Schema {
            root: root.as_ref(),
            defs,
        };
        let force = ctx.flag("force");
        let subname = (sub == Sub::Status).then_some("status");
        let mut cfg = cfg;
        meta::metadata_mut(&mut cfg).remove("managedFields");
        opts.field_manager = String::new();
        let w = match current {
            None if sub == Sub::Status => {
                return Err(ApiError::not_found(&rt.plural, &rt.group, name));
            }
            None => {
                let mut obj =
                    fields::apply(None, &cfg, manager, force, &rt.api_version(), None, schema)?;
                meta::metadata_mut(&mut obj).insert("name".into(), json!(name));
                lifecycle::create(st, rt, ns, obj, &opts)?
            }
            Some(cur) => {
                let obj = fields::apply(
                    Some(&cur),
                    &cfg,
                    manager,
                    force,
                    &rt.api_version(),
                    subname,
                    schema,
                )?;
                lifecycle::update(st, rt, ns, name, obj, sub, &opts)?
            }
        };
        let status = if w.created { 201 } else { 200 };
        return Ok(Reply {
            status,
            body: convert::to_served(&w.object, rt),
            warnings: w.warnings,
        });
    }
    let mut doc = current.ok_or_else(|| ApiError::not_found(&rt.plural, &rt.group, name))?;
    apply_patch_body(ctx, pt, &mut doc, smp_root(rt))?;
    let w = lifecycle::update(st, rt, ns, name, doc, sub, &opts)?;
    Ok(Reply {
        status: 200,
        body: convert::to_served(&w.object, rt),
        warnings: w.warnings,
    })
}

fn scale_sub(
    ctx: &Ctx,
    st: &mut State,
    rt: &ResourceType,
    ns: &str,
    name: &str,
) -> Result<Reply, ApiError> {
    let key = convert::storage_key(rt);
    let current = st
        .get(&key, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&rt.plural, &rt.group, name))?;
    let new_scale = match ctx.method.clone() {
        Method::GET => return Ok(ok(scale::to_scale(rt, &current))),
        Method::PUT => decode_body(ctx)?,
        Method::PATCH => {
            let pt = patch_type(ctx)?;
            let mut s = scale::to_scale(rt, &current);
            let s_schema = builtin_schemas()
                .defs
                .get("io.k8s.api.autoscaling.v1.Scale");
            apply_patch_body(ctx, pt, &mut s, s_schema)?;
            s
        }
        m => return Err(ApiError::method_not_allowed(m.as_str())),
    };
    if let Some(rv) = new_scale["metadata"]["resourceVersion"]
        .as_str()
        .filter(|r| !r.is_empty())
        && rv != meta::resource_version(&current)
    {
        return Err(ApiError::stale(&rt.plural, &rt.group, name));
    }
    let mut obj = convert::to_served(&current, rt);
    scale::apply_scale(rt, &mut obj, &new_scale)?;
    let opts = write_opts(ctx)?;
    let w = lifecycle::update(st, rt, ns, name, obj, Sub::Main, &opts)?;
    Ok(Reply {
        status: 200,
        body: scale::to_scale(rt, &w.object),
        warnings: w.warnings,
    })
}

fn bind(
    ctx: &Ctx,
    st: &mut State,
    rt: &ResourceType,
    ns: &str,
    name: &str,
) -> Result<Reply, ApiError> {
    let binding = decode_body(ctx)?;
    let node = binding["target"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                "Binding",
                "",
                name,
                vec![super::status::Cause::required("target.name")],
            )
        })?;
    let key = convert::storage_key(rt);
    let mut pod = st
        .get(&key, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&rt.plural, &rt.group, name))?;
    if let Some(n) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
        return Err(ApiError::conflict(
            "pods/binding",
            "",
            name,
            &format!("pod {name} is already assigned to node \"{n}\""),
        ));
    }
    if meta::is_deleting(&pod) {
        return Err(ApiError::conflict(
            "pods/binding",
            "",
            name,
            &format!("pod {name} is being deleted, cannot be assigned to a host"),
        ));
    }
    pod["spec"]["nodeName"] = json!(node);
    st.replace(&key, pod);
    Ok(Reply {
        status: 201,
        body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        warnings: vec![],
    })
}

/// A watch refused as upstream refuses one from a compacted resourceVersion: `200` and
/// a single `ERROR` event with `410 Expired`.
fn gone_watch() -> Response<Body> {
    let e = ApiError::gone("injected fault: too old resource version (the history was compacted)");
    let line = watch::error_line(&e);
    let stream =
        futures::stream::once(async move { Ok::<_, std::convert::Infallible>(Frame::data(line)) });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn start_watch(ctx: &Ctx<'_>, p: &ResourcePath) -> Result<Response<Body>, ApiError> {
    // A paused server holds new watches (as a partitioned client would see it).
    let mut gate = ctx.shared.watch_gate.subscribe();
    while *gate.borrow_and_update() {
        tokio::select! {
            r = gate.changed() => if r.is_err() { break },
            _ = ctx.shared.shutdown.cancelled() => return Err(ApiError::internal("the server is shutting down")),
        }
    }
    let timeout = match ctx.param("timeoutSeconds") {
        Some(t) => Duration::from_secs(t.parse().map_err(|_| {
            ApiError::bad_request(format!("timeoutSeconds: Invalid value: \"{t}\""))
        })?),
        None => ctx.shared.settings.default_watch_timeout,
    }
    .min(MAX_WATCH_TIMEOUT);
    let bookmarks = ctx.flag("allowWatchBookmarks");
    let send_initial = ctx.param("sendInitialEvents");
    let (spec, backlog, rx, failed) = {
        let st = ctx.shared.lock();
        let rt = resolve(&st, p)?;
        let (ls, fs) = selectors(ctx, &rt)?;
        let ns = p.namespace.clone();
        let only = p.name.clone();
        let key = convert::storage_key(&rt);
        let current = st.rv();
        let rv = ctx.param("resourceVersion");
        let initial_events_end = match send_initial {
            Some("true") => {
                if ctx.param("resourceVersionMatch") != Some("NotOlderThan") || !bookmarks {
                    return Err(ApiError::invalid(
                        "ListOptions",
                        "meta.k8s.io",
                        "",
                        vec![super::status::Cause::forbidden(
                            "sendInitialEvents",
                            "sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan and allowWatchBookmarks is true",
                        )],
                    ));
                }
                true
            }
            Some("false") | None => false,
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "sendInitialEvents: Invalid value: \"{v}\""
                )));
            }
        };
        let initial_from_state = initial_events_end || matches!(rv, None | Some("0"));
        let (backlog, failed) = if initial_from_state {
            (vec![], None)
        } else {
            let rv = rv.unwrap_or_default();
            let n: u64 = rv.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "resourceVersion: Invalid value: \"{rv}\": must be an integer"
                ))
            })?;
            match st.log.since(n, current) {
                Ok(b) => (b, None),
                Err(e) => (vec![], Some(e)),
            }
        };
        let start_rv = if initial_from_state {
            current
        } else {
            rv.and_then(|r| r.parse().ok()).unwrap_or(current)
        };
        let initial: Vec<Value> = if initial_from_state {
            st.list(&key, ns.as_deref())
                .into_iter()
                .filter(|o| only.as_deref().is_none_or(|n| meta::name(o) == n))
                .filter(|o| matches(&rt, ns.as_deref(), &ls, &fs, o))
                .cloned()
                .collect()
        } else {
            vec![]
        };
        let filter_rt = rt.clone();
        let filter: watch::Filter = Box::new(move |o| {
            only.as_deref().is_none_or(|n| meta::name(o) == n)
                && matches(&filter_rt, ns.as_deref(), &ls, &fs, o)
        });
        let render_rt = rt.clone();
        let format = ctx.format.clone();
        let include = include_object(ctx)?;
        let render: watch::Render = Box::new(move |o| {
            let served = convert::to_served(o, &render_rt);
            match &format {
                Format::Table(av) => table::table(
                    &render_rt,
                    std::slice::from_ref(&served),
                    meta::resource_version(&served),
                    include,
                    av,
                ),
                Format::PartialMeta(av) => partial(&served, av),
                _ => served,
            }
        });
        let spec = WatchSpec {
            key,
            filter,
            render,
            api_version: rt.api_version(),
            kind: rt.kind.clone(),
            bookmarks,
            bookmark_interval: ctx.shared.settings.bookmark_interval,
            timeout,
            initial,
            initial_events_end,
            start_rv,
        };
        (spec, backlog, st.log.subscribe(), failed)
    };
    let (tx, rx_bytes) = tokio::sync::mpsc::channel::<Bytes>(64);
    if let Some(e) = failed {
        let _ = tx.try_send(watch::error_line(&e));
        drop(tx);
    } else {
        let cancel = ctx
            .shared
            .watch_epoch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let hold = watch::HoldWatch {
            user: ctx.user.name.clone(),
            rx: ctx.shared.watch_hold.subscribe(),
        };
        tokio::spawn(watch::run(spec, backlog, rx, cancel, tx, hold));
    }
    let stream = futures::stream::unfold(rx_bytes, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
    });
    let ct = match ctx.format {
        Format::Table(_) => "application/json;as=Table;v=v1;g=meta.k8s.io",
        _ => "application/json",
    };
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ct),
    );
    Ok(resp)
}
