//! Object lifecycle rules on top of the store: create, update (main and status),
//! delete with finalizers, graceful pod deletion, garbage collection of dependents,
//! namespace termination, Service ClusterIP allocation, CRD installation. Every write
//! of the API goes through here; it never speaks HTTP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use super::convert;
use super::defaults;
use super::meta;
use super::registry::{Builtin, ResourceType, StoreKey, types_from_crd};
use super::schemas::builtin_schemas;
use super::status::{ApiError, Cause};
use super::store::State;
use super::structural;
use super::validate;

/// The Service ClusterIP range: loopback, so nothing addressed to a Service ever leaves
/// the machine (a real kube-apiserver accepts a loopback service CIDR).
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(127, 96, 0, 0), 16);
/// The IPv6 Service ClusterIP range: inside the sandbox's unique local range
/// (fd6e:6d00::/32), which the sandbox routes nowhere; the server is dual-stack, IPv4
/// first, as a cluster started with both service CIDRs.
pub const SERVICE_CIDR_V6: (Ipv6Addr, u8) =
    (Ipv6Addr::new(0xfd6e, 0x6d00, 0xffff, 0, 0, 0, 0, 0), 108);
/// The `spec.ipFamilyPolicy` values upstream accepts, in its order of listing.
const IP_FAMILY_POLICIES: [&str; 3] = ["PreferDualStack", "RequireDualStack", "SingleStack"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

#[derive(Clone, Debug, Default)]
pub struct WriteOpts {
    pub dry_run: bool,
    pub field_validation: FieldValidation,
    /// Recorded in managedFields for non-apply writes.
    pub field_manager: String,
}

#[derive(Debug)]
pub struct Written {
    /// The object as stored (storage version).
    pub object: Value,
    pub warnings: Vec<String>,
    pub created: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sub {
    Main,
    Status,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Propagation {
    #[default]
    Background,
    Foreground,
    Orphan,
}

#[derive(Clone, Debug, Default)]
pub struct DeleteOpts {
    pub grace_period: Option<i64>,
    pub propagation: Propagation,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

fn has_generation(rt: &ResourceType) -> bool {
    matches!(
        rt.builtin,
        None | Some(
            Builtin::Deployment
                | Builtin::ReplicaSet
                | Builtin::StatefulSet
                | Builtin::DaemonSet
                | Builtin::PodDisruptionBudget
                | Builtin::HorizontalPodAutoscaler
                | Builtin::Pod
                | Builtin::Crd
        )
    )
}

/// Everything but metadata and status: what a generation counts changes of.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.remove(k);
        }
    }
    o
}

fn storage_type(st: &State, rt: &ResourceType) -> ResourceType {
    st.registry
        .storage_type(&convert::storage_key(rt))
        .map(|t| (*t).clone())
        .unwrap_or_else(|| rt.clone())
}

/// Check `obj` (in the served version) against its schema: prune unknown fields (warn or
/// refuse per `fieldValidation`), refuse type errors.
fn check_schema(
    rt: &ResourceType,
    obj: &mut Value,
    fv: FieldValidation,
) -> Result<Vec<String>, ApiError> {
    let name = meta::name(obj).to_owned();
    let out = if let Some(crd) = &rt.crd {
        let opts = structural::Options {
            defaults: true,
            root_meta_known: true,
            opaque_empty_objects: false,
        };
        structural::check(&crd.schema, &serde_json::Map::new(), obj, &opts)
    } else if let Some(b) = rt.builtin {
        let s = builtin_schemas();
        let Some(root) = s.roots.get(&b).and_then(|r| s.defs.get(r)) else {
            return Ok(vec![]);
        };
        let opts = structural::Options {
            defaults: false,
            root_meta_known: false,
            opaque_empty_objects: true,
        };
        structural::check(root, &s.defs, obj, &opts)
    } else {
        return Ok(vec![]);
    };
    let decode_prefix = format!(
        "{} in version \"{}\" cannot be handled as a {}",
        rt.kind, rt.version, rt.kind
    );
    if !out.causes.is_empty() {
        if rt.crd.is_some() {
            return Err(ApiError::invalid(&rt.kind, &rt.group, &name, out.causes));
        }
        let lines: Vec<String> = out.causes.iter().map(Cause::line).collect();
        return Err(ApiError::bad_request(format!(
            "{decode_prefix}: {}",
            lines.join("; ")
        )));
    }
    let mut unknown: Vec<String> = out
        .unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    // CEL rules are not evaluated here: say so rather than pass silently.
    let cel = |schema: &Value| schema.to_string().contains("\"x-kubernetes-validations\"");
    let cel_here = rt.crd.as_ref().is_some_and(|c| cel(&c.schema))
        || (rt.builtin == Some(Builtin::Crd) && cel(&obj["spec"]["versions"]));
    let cel_warning = cel_here.then(|| {
        "x-kubernetes-validations (CEL) rules are not evaluated by the Nemesis test API server"
            .to_owned()
    });
    match fv {
        FieldValidation::Strict if !unknown.is_empty() => Err(ApiError::bad_request(format!(
            "{decode_prefix}: strict decoding error: {}",
            unknown.join(", ")
        ))),
        FieldValidation::Warn => {
            unknown.extend(cel_warning);
            Ok(unknown)
        }
        _ => Ok(cel_warning.into_iter().collect()),
    }
}

/// The apiVersion/kind in a body must name the resource of the URL.
fn check_type(rt: &ResourceType, obj: &mut Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON or YAML object",
        ));
    }
    let av = rt.api_version();
    match obj["apiVersion"].as_str() {
        None | Some("") => obj["apiVersion"] = json!(av),
        Some(a) if a == av => {}
        Some(a) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({a}) does not match the expected API version ({av})"
            )));
        }
    }
    match obj["kind"].as_str() {
        None | Some("") => obj["kind"] = json!(rt.kind),
        Some(k) if k == rt.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
    }
    Ok(())
}

fn invalid(rt: &ResourceType, name: &str, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid(&rt.kind, &rt.group, name, causes)
}

fn generate_name(prefix: &str) -> String {
    // The alphabet upstream uses: no vowels, no confusable characters.
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let suffix: String = (0..5)
        .map(|_| ALPHA[rand::random_range(0..ALPHA.len())] as char)
        .collect();
    format!("{prefix}{suffix}")
}

/// The namespace a namespaced write goes to must exist and not be terminating.
fn check_namespace(st: &State, rt: &ResourceType, ns: &str, name: &str) -> Result<(), ApiError> {
    let key: StoreKey = (String::new(), "namespaces".into());
    match st.get(&key, "", ns) {
        None => Err(ApiError::not_found("namespaces", "", ns)),
        Some(n) if meta::is_deleting(n) => Err(ApiError::forbidden(
            &rt.plural,
            &rt.group,
            name,
            &format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// Whether `ip` is in the service range of its family.
pub fn in_service_range(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            let (net, bits) = SERVICE_CIDR;
            let mask = u32::MAX << (32 - bits);
            u32::from(ip) & mask == u32::from(net)
        }
        IpAddr::V6(ip) => {
            let (net, bits) = SERVICE_CIDR_V6;
            let mask = u128::MAX << (128 - bits);
            u128::from(ip) & mask == u128::from(net)
        }
    }
}

fn service_range(family: &str) -> String {
    if family == "IPv6" {
        format!("{}/{}", SERVICE_CIDR_V6.0, SERVICE_CIDR_V6.1)
    } else {
        format!("{}/{}", SERVICE_CIDR.0, SERVICE_CIDR.1)
    }
}

fn family_of(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// The lowest free address of `family`'s service range (network and last address left
/// out), or `None` when the range is full.
fn next_free_ip(st: &State, family: &str) -> Option<IpAddr> {
    if family == "IPv6" {
        let base = u128::from(SERVICE_CIDR_V6.0);
        let size = 1u128 << (128 - SERVICE_CIDR_V6.1);
        (1..size - 1)
            .map(|i| IpAddr::V6(Ipv6Addr::from(base + i)))
            .find(|ip| !st.cluster_ips.contains_key(ip))
    } else {
        let base = u32::from(SERVICE_CIDR.0);
        let size = 1u32 << (32 - SERVICE_CIDR.1);
        (1..size - 1)
            .map(|i| IpAddr::V4(Ipv4Addr::from(base + i)))
            .find(|ip| !st.cluster_ips.contains_key(ip))
    }
}

/// The families a new Service gets, checked as kube-apiserver checks them: `ipFamilies`
/// as given, completed from the requested ClusterIPs, IPv4 when nothing says, and the
/// other family added for a dual-stack policy (this server is dual-stack).
fn service_families(spec: &Value, ips: &[IpAddr]) -> Result<Vec<&'static str>, Cause> {
    let policy = spec["ipFamilyPolicy"].as_str().unwrap_or("SingleStack");
    if !IP_FAMILY_POLICIES.contains(&policy) {
        return Err(Cause::not_supported(
            "spec.ipFamilyPolicy",
            &json!(policy),
            &IP_FAMILY_POLICIES,
        ));
    }
    let given = spec["ipFamilies"].as_array().cloned().unwrap_or_default();
    if given.len() > 2 {
        return Err(Cause::invalid(
            "spec.ipFamilies",
            &spec["ipFamilies"],
            "may not have more than two entries",
        ));
    }
    let mut families: Vec<&'static str> = Vec::new();
    for (i, f) in given.iter().enumerate() {
        let family = match f.as_str() {
            Some("IPv4") => "IPv4",
            Some("IPv6") => "IPv6",
            _ => {
                return Err(Cause::not_supported(
                    format!("spec.ipFamilies[{i}]"),
                    f,
                    &["IPv4", "IPv6"],
                ));
            }
        };
        if families.contains(&family) {
            return Err(Cause::duplicate(format!("spec.ipFamilies[{i}]"), f));
        }
        families.push(family);
    }
    if policy == "SingleStack" && (families.len() > 1 || ips.len() > 1) {
        return Err(Cause::invalid(
            "spec.ipFamilyPolicy",
            &json!(policy),
            "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified",
        ));
    }
    if ips.len() == 2 && ips[0].is_ipv4() == ips[1].is_ipv4() {
        return Err(Cause::invalid(
            "spec.clusterIPs",
            &spec["clusterIPs"],
            "may specify no more than one IP for each IP family",
        ));
    }
    for (i, ip) in ips.iter().enumerate() {
        let family = family_of(*ip);
        match families.get(i) {
            Some(f) if *f != family => {
                return Err(Cause::invalid(
                    format!("spec.clusterIPs[{i}]"),
                    &json!(ip.to_string()),
                    &format!("expected an {f} value as indicated by `ipFamilies[{i}]`"),
                ));
            }
            Some(_) => {}
            None => families.push(family),
        }
    }
    if families.is_empty() {
        families.push("IPv4");
    }
    if policy != "SingleStack" && families.len() == 1 {
        families.push(if families[0] == "IPv4" {
            "IPv6"
        } else {
            "IPv4"
        });
    }
    Ok(families)
}

/// Give a Service its ClusterIPs (allocated or the ones it asked for, checked) and its
/// `ipFamilies`; returns the addresses to record as taken.
fn allocate_cluster_ip(
    st: &State,
    obj: &mut Value,
    old: Option<&Value>,
) -> Result<Vec<IpAddr>, Cause> {
    let requested = obj["spec"]["clusterIP"].as_str().unwrap_or("").to_owned();
    if let Some(old) = old {
        if requested.is_empty() {
            obj["spec"]["clusterIP"] = old["spec"]["clusterIP"].clone();
            obj["spec"]["clusterIPs"] = old["spec"]["clusterIPs"].clone();
        }
        for field in ["ipFamilies", "ipFamilyPolicy"] {
            if obj["spec"][field].is_null() && !old["spec"][field].is_null() {
                obj["spec"][field] = old["spec"][field].clone();
            }
        }
        return Ok(vec![]);
    }
    let mut asked: Vec<String> = obj["spec"]["clusterIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    if !requested.is_empty() {
        match asked.first() {
            None => asked.push(requested.clone()),
            Some(first) if *first != requested => {
                return Err(Cause::invalid(
                    "spec.clusterIPs",
                    &obj["spec"]["clusterIPs"],
                    "first value must match `clusterIP`",
                ));
            }
            Some(_) => {}
        }
    }
    if asked.first().map(String::as_str) == Some("None") {
        obj["spec"]["clusterIPs"] = json!(["None"]);
        let families = service_families(&obj["spec"], &[])?;
        obj["spec"]["ipFamilies"] = json!(families);
        return Ok(vec![]);
    }
    let mut ips = Vec::new();
    for (i, s) in asked.iter().enumerate() {
        let ip: IpAddr = s.parse().map_err(|_| {
            Cause::invalid(
                format!("spec.clusterIPs[{i}]"),
                &json!(s),
                "must be a valid IP address, (e.g. 127.77.0.10 or fd6e:6d00:ffff::a)",
            )
        })?;
        ips.push(ip);
    }
    let families = service_families(&obj["spec"], &ips)?;
    for (i, ip) in ips.iter().enumerate() {
        let s = ip.to_string();
        if !in_service_range(*ip) {
            let range = service_range(family_of(*ip));
            return Err(Cause::invalid(
                format!("spec.clusterIPs[{i}]"),
                &json!(s),
                &format!(
                    "failed to allocate IP {s}: the provided IP ({s}) is not in the valid range. The range of valid IPs is {range}"
                ),
            ));
        }
        if st.cluster_ips.contains_key(ip) {
            return Err(Cause::invalid(
                format!("spec.clusterIPs[{i}]"),
                &json!(s),
                &format!("failed to allocate IP {s}: provided IP is already allocated"),
            ));
        }
    }
    for family in families.iter().skip(ips.len()) {
        let ip = next_free_ip(st, family).ok_or_else(|| {
            Cause::invalid(
                "spec.clusterIPs",
                &json!([]),
                &format!(
                    "failed to allocate IP: range is full ({})",
                    service_range(family)
                ),
            )
        })?;
        ips.push(ip);
    }
    let texts: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
    obj["spec"]["clusterIP"] = json!(texts[0]);
    obj["spec"]["clusterIPs"] = json!(texts);
    obj["spec"]["ipFamilies"] = json!(families);
    Ok(ips)
}

/// The status a CRD gets: its names accepted and established at once.
fn crd_status(obj: &mut Value, old: Option<&Value>) {
    let now = meta::now_rfc3339();
    let mut names = obj["spec"]["names"].clone();
    let kind = names["kind"].as_str().unwrap_or("").to_owned();
    if names["singular"].is_null() {
        names["singular"] = json!(kind.to_lowercase());
    }
    if names["listKind"].is_null() {
        names["listKind"] = json!(format!("{kind}List"));
    }
    let mut stored: Vec<Value> = old
        .and_then(|o| o["status"]["storedVersions"].as_array().cloned())
        .unwrap_or_default();
    for v in obj["spec"]["versions"].as_array().into_iter().flatten() {
        if v["storage"] == true && !stored.contains(&v["name"]) {
            stored.push(v["name"].clone());
        }
    }
    let cond = |t: &str, reason: &str, msg: &str| json!({"type": t, "status": "True", "lastTransitionTime": now, "reason": reason, "message": msg});
    obj["status"] = json!({
        "conditions": [
            cond("NamesAccepted", "NoConflicts", "no conflicts found"),
            cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "acceptedNames": names,
        "storedVersions": stored,
    });
}

/// Create `obj` of `rt` in namespace `ns` (empty for cluster-scoped).
pub fn create(
    st: &mut State,
    rt: &ResourceType,
    ns: &str,
    mut obj: Value,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    check_type(rt, &mut obj)?;
    {
        let md = meta::metadata_mut(&mut obj);
        if rt.namespaced {
            match md.get("namespace").and_then(Value::as_str) {
                None | Some("") => {
                    md.insert("namespace".into(), json!(ns));
                }
                Some(n) if n == ns => {}
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
        } else {
            md.remove("namespace");
        }
        if md
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|r| !r.is_empty())
        {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let name = md
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if name.is_empty()
            && let Some(g) = md
                .get("generateName")
                .and_then(Value::as_str)
                .filter(|g| !g.is_empty())
        {
            let g = generate_name(g);
            md.insert("name".into(), json!(g));
        }
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "selfLink",
        ] {
            md.remove(k);
        }
    }
    let name = meta::name(&obj).to_owned();
    if rt.namespaced {
        check_namespace(st, rt, ns, &name)?;
    }
    let warnings = check_schema(rt, &mut obj, opts.field_validation)?;
    let storage = storage_type(st, rt);
    let mut obj = convert::to_storage(obj, rt, &storage);
    if let Some(b) = storage.builtin {
        defaults::apply(b, &mut obj);
    }
    if rt.status {
        let m = obj.as_object_mut().expect("checked object");
        m.remove("status");
        if rt.builtin == Some(Builtin::Pod) {
            m.insert(
                "status".into(),
                json!({"phase": "Pending", "qosClass": "BestEffort"}),
            );
        }
        if rt.builtin == Some(Builtin::Namespace) {
            m.insert("status".into(), json!({"phase": "Active"}));
        }
    }
    {
        let md = meta::metadata_mut(&mut obj);
        md.insert("uid".into(), json!(meta::new_uid()));
        md.insert("creationTimestamp".into(), json!(meta::now_rfc3339()));
        if has_generation(rt) {
            md.insert("generation".into(), json!(1));
        }
    }
    let mut causes = validate::validate(&storage, rt, &obj, None);
    let mut ips = Vec::new();
    if storage.builtin == Some(Builtin::Service) && causes.is_empty() {
        match allocate_cluster_ip(st, &mut obj, None) {
            Ok(a) => ips = a,
            Err(c) => causes.push(c),
        }
    }
    if !causes.is_empty() {
        return Err(invalid(rt, &name, causes));
    }
    if storage.builtin == Some(Builtin::Crd) {
        crd_status(&mut obj, None);
    }
    let key = convert::storage_key(rt);
    if st.get(&key, meta::namespace(&obj), &name).is_some() {
        return Err(ApiError::already_exists(&rt.plural, &rt.group, &name));
    }
    let (root, defs) = super::fields::schema_for(&storage);
    let schema = super::fields::Schema {
        root: root.as_ref(),
        defs,
    };
    super::fields::record_update(
        &mut obj,
        None,
        &opts.field_manager,
        &rt.api_version(),
        None,
        schema,
    );
    if opts.dry_run {
        return Ok(Written {
            object: obj,
            warnings,
            created: true,
        });
    }
    for ip in ips {
        st.cluster_ips
            .insert(ip, (meta::namespace(&obj).to_owned(), name.clone()));
    }
    let stored = st.insert(&key, obj);
    if storage.builtin == Some(Builtin::Crd) {
        st.registry.install_crd(&name, types_from_crd(&stored));
    }
    if storage.builtin == Some(Builtin::Namespace) {
        create_default_service_account(st, &name);
    }
    Ok(Written {
        object: stored,
        warnings,
        created: true,
    })
}

/// Replace object `name` with `new` (a PUT, or the result of a patch), on the main
/// resource or the status subresource.
pub fn update(
    st: &mut State,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    mut new: Value,
    sub: Sub,
    opts: &WriteOpts,
) -> Result<Written, ApiError> {
    check_type(rt, &mut new)?;
    let key = convert::storage_key(rt);
    let old = st
        .get(&key, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&rt.plural, &rt.group, name))?;
    {
        let md = meta::metadata_mut(&mut new);
        match md.get("name").and_then(Value::as_str) {
            None | Some("") => {
                md.insert("name".into(), json!(name));
            }
            Some(n) if n == name => {}
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        if rt.namespaced {
            match md.get("namespace").and_then(Value::as_str) {
                None | Some("") => {
                    md.insert("namespace".into(), json!(ns));
                }
                Some(n) if n == ns => {}
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
        } else {
            md.remove("namespace");
        }
        let rv = md
            .get("resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !rv.is_empty() && rv != meta::resource_version(&old) {
            return Err(ApiError::stale(&rt.plural, &rt.group, name));
        }
        let uid = md.get("uid").and_then(Value::as_str).unwrap_or("");
        if !uid.is_empty() && uid != meta::uid(&old) {
            return Err(ApiError::conflict(
                &rt.plural,
                &rt.group,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta::uid(&old)
                ),
            ));
        }
    }
    let warnings = check_schema(rt, &mut new, opts.field_validation)?;
    let storage = storage_type(st, rt);
    let mut new = convert::to_storage(new, rt, &storage);
    if let Some(b) = storage.builtin {
        defaults::apply(b, &mut new);
    }
    match sub {
        Sub::Main if rt.status => {
            let old_status = old.get("status").cloned();
            let m = new.as_object_mut().expect("checked object");
            match old_status {
                Some(s) => m.insert("status".into(), s),
                None => m.remove("status"),
            };
        }
        Sub::Main => {}
        Sub::Status => {
            let status = new.get("status").cloned();
            let mut merged = old.clone();
            let m = merged.as_object_mut().expect("stored objects are objects");
            match status {
                Some(s) => m.insert("status".into(), s),
                None => m.remove("status"),
            };
            // Only status changes through this path, but the metadata the caller sent
            // is otherwise ignored, as upstream's status strategies do.
            if let Some(mf) = new.pointer("/metadata/managedFields").cloned() {
                meta::metadata_mut(&mut merged).insert("managedFields".into(), mf);
            }
            new = merged;
        }
    }
    {
        let om = old["metadata"].as_object().cloned().unwrap_or_default();
        let md = meta::metadata_mut(&mut new);
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match om.get(k) {
                Some(v) => md.insert(k.into(), v.clone()),
                None => md.remove(k),
            };
        }
        md.remove("selfLink");
    }
    if has_generation(rt) && spec_part(&new) != spec_part(&old) {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + 1;
        meta::metadata_mut(&mut new).insert("generation".into(), json!(g));
    }
    if meta::is_deleting(&old) {
        let before = meta::finalizers(&old);
        let added: Vec<String> = meta::finalizers(&new)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if !added.is_empty() {
            return Err(invalid(
                rt,
                name,
                vec![Cause::forbidden(
                    "metadata.finalizers",
                    &format!(
                        "no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
                    ),
                )],
            ));
        }
    }
    let mut causes = validate::validate(&storage, rt, &new, Some(&old));
    if storage.builtin == Some(Builtin::Service)
        && let Err(c) = allocate_cluster_ip(st, &mut new, Some(&old))
    {
        causes.push(c);
    }
    if !causes.is_empty() {
        return Err(invalid(rt, name, causes));
    }
    if storage.builtin == Some(Builtin::Crd) {
        crd_status(&mut new, Some(&old));
        // Keep the conditions' transition times when nothing changed.
        if new["status"]["acceptedNames"] == old["status"]["acceptedNames"] {
            new["status"]["conditions"] = old["status"]["conditions"].clone();
        }
    }
    let (root, defs) = super::fields::schema_for(&storage);
    let schema = super::fields::Schema {
        root: root.as_ref(),
        defs,
    };
    let sub_name = (sub == Sub::Status).then_some("status");
    super::fields::record_update(
        &mut new,
        Some(&old),
        &opts.field_manager,
        &rt.api_version(),
        sub_name,
        schema,
    );
    // A write that changes nothing is not a write: same resourceVersion, no event.
    let mut cmp = new.clone();
    meta::metadata_mut(&mut cmp).insert(
        "resourceVersion".into(),
        json!(meta::resource_version(&old)),
    );
    if cmp == old {
        return Ok(Written {
            object: old,
            warnings,
            created: false,
        });
    }
    if opts.dry_run {
        return Ok(Written {
            object: new,
            warnings,
            created: false,
        });
    }
    let stored = st.replace(&key, new);
    if storage.builtin == Some(Builtin::Crd) {
        st.registry.install_crd(name, types_from_crd(&stored));
    }
    if meta::is_deleting(&stored) && ready_to_remove(&stored) {
        remove_and_cascade(st, &key, ns, name);
    }
    Ok(Written {
        object: stored,
        warnings,
        created: false,
    })
}

/// Removed once no finalizer and no grace period is left.
fn ready_to_remove(obj: &Value) -> bool {
    meta::finalizers(obj).is_empty()
        && obj
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            == 0
}

fn pod_is_graceful(obj: &Value) -> bool {
    let bound = obj["spec"]["nodeName"]
        .as_str()
        .is_some_and(|n| !n.is_empty());
    let done = matches!(
        obj["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    );
    bound && !done
}

/// Delete object `name`. Returns the object as it is after the call (marked for
/// deletion, or as it was when removed).
pub fn delete(
    st: &mut State,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    opts: &DeleteOpts,
) -> Result<Value, ApiError> {
    let key = convert::storage_key(rt);
    let obj = st
        .get(&key, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&rt.plural, &rt.group, name))?;
    if let Some(uid) = &opts.uid
        && uid != meta::uid(&obj)
    {
        return Err(ApiError::conflict(
            &rt.plural,
            &rt.group,
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta::uid(&obj)
            ),
        ));
    }
    if let Some(rv) = &opts.resource_version
        && rv != meta::resource_version(&obj)
    {
        return Err(ApiError::conflict(
            &rt.plural,
            &rt.group,
            name,
            &format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                meta::resource_version(&obj)
            ),
        ));
    }
    if opts.dry_run {
        return Ok(obj);
    }
    match opts.propagation {
        Propagation::Orphan => orphan_dependents(st, meta::uid(&obj)),
        Propagation::Foreground => collect_dependents(st, meta::uid(&obj)),
        Propagation::Background => {}
    }
    let storage = storage_type(st, rt);
    if storage.builtin == Some(Builtin::Namespace) {
        return Ok(terminate_namespace(st, &key, obj));
    }
    let grace = if storage.builtin == Some(Builtin::Pod) && pod_is_graceful(&obj) {
        opts.grace_period
            .or_else(|| {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
            .max(0)
    } else {
        0
    };
    let finalizers = meta::finalizers(&obj);
    if finalizers.is_empty() && grace == 0 {
        remove_and_cascade(st, &key, ns, name);
        let mut gone = obj;
        meta::metadata_mut(&mut gone)
            .insert("deletionTimestamp".into(), json!(meta::now_rfc3339()));
        return Ok(gone);
    }
    let mut marked = obj.clone();
    let current_grace = obj
        .pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64);
    if meta::is_deleting(&obj) && current_grace.is_some_and(|g| g <= grace) {
        return Ok(obj);
    }
    {
        let md = meta::metadata_mut(&mut marked);
        let when = chrono::Utc::now() + chrono::Duration::seconds(grace);
        md.insert(
            "deletionTimestamp".into(),
            json!(when.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        );
        md.insert("deletionGracePeriodSeconds".into(), json!(grace));
    }
    let stored = st.replace(&key, marked);
    if ready_to_remove(&stored) {
        remove_and_cascade(st, &key, ns, name);
    }
    Ok(stored)
}

/// Remove an object for good, then let go of what it held and of what it owned.
fn remove_and_cascade(st: &mut State, key: &StoreKey, ns: &str, name: &str) {
    let Some(obj) = st.remove(key, ns, name) else {
        return;
    };
    let rt = st.registry.storage_type(key).map(|t| (*t).clone());
    match rt.as_ref().and_then(|t| t.builtin) {
        Some(Builtin::Service) => {
            for ip in obj["spec"]["clusterIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(std::iter::once(&obj["spec"]["clusterIP"]))
                .filter_map(|v| v.as_str()?.parse::<IpAddr>().ok())
            {
                st.cluster_ips.remove(&ip);
            }
        }
        Some(Builtin::Crd) => {
            let group = obj["spec"]["group"].as_str().unwrap_or("").to_owned();
            let plural = obj["spec"]["names"]["plural"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            // The custom resources go with their definition, and what they owned
            // with them (a real API server's garbage collector does the same).
            let removed = st.remove_all(&(group, plural));
            st.registry.remove_crd(name);
            for cr in removed {
                collect_dependents(st, meta::uid(&cr));
            }
        }
        _ => {}
    }
    collect_dependents(st, meta::uid(&obj));
    if !ns.is_empty() {
        finish_namespace_if_empty(st, ns);
    }
}

/// Garbage-collect what `uid` owned: dependents with no other owner are deleted, the
/// others lose the reference.
fn collect_dependents(st: &mut State, uid: &str) {
    if uid.is_empty() {
        return;
    }
    for (key, dep) in st.dependents_of(uid) {
        let others = meta::owner_uids(&dep)
            .into_iter()
            .filter(|u| u != uid)
            .count();
        if others > 0 {
            drop_owner_ref(st, &key, &dep, uid);
        } else if let Some(rt) = st.registry.storage_type(&key).map(|t| (*t).clone())
            && !meta::is_deleting(&dep)
        {
            let _ = delete(
                st,
                &rt,
                meta::namespace(&dep),
                meta::name(&dep),
                &DeleteOpts::default(),
            );
        }
    }
}

fn orphan_dependents(st: &mut State, uid: &str) {
    for (key, dep) in st.dependents_of(uid) {
        drop_owner_ref(st, &key, &dep, uid);
    }
}

fn drop_owner_ref(st: &mut State, key: &StoreKey, dep: &Value, uid: &str) {
    let mut d = dep.clone();
    if let Some(refs) = d
        .pointer_mut("/metadata/ownerReferences")
        .and_then(Value::as_array_mut)
    {
        refs.retain(|r| r["uid"] != uid);
        if refs.is_empty() {
            meta::metadata_mut(&mut d).remove("ownerReferences");
        }
    }
    st.replace(key, d);
}

/// Mark a namespace Terminating and delete everything in it; it goes once empty.
fn terminate_namespace(st: &mut State, key: &StoreKey, ns_obj: Value) -> Value {
    let ns = meta::name(&ns_obj).to_owned();
    let mut marked = ns_obj.clone();
    if !meta::is_deleting(&ns_obj) {
        meta::metadata_mut(&mut marked)
            .insert("deletionTimestamp".into(), json!(meta::now_rfc3339()));
        meta::metadata_mut(&mut marked).insert("deletionGracePeriodSeconds".into(), json!(0));
        marked["status"] = json!({"phase": "Terminating"});
        marked = st.replace(key, marked);
    }
    for (k, obj) in st.in_namespace(&ns) {
        if meta::is_deleting(&obj) {
            continue;
        }
        if let Some(rt) = st.registry.storage_type(&k).map(|t| (*t).clone()) {
            let _ = delete(st, &rt, &ns, meta::name(&obj), &DeleteOpts::default());
        }
    }
    finish_namespace_if_empty(st, &ns);
    st.get(key, "", &ns).cloned().unwrap_or(marked)
}

fn finish_namespace_if_empty(st: &mut State, ns: &str) {
    let key: StoreKey = (String::new(), "namespaces".into());
    let terminating = st
        .get(&key, "", ns)
        .is_some_and(|n| meta::is_deleting(n) && meta::finalizers(n).is_empty());
    if terminating && st.in_namespace(ns).is_empty() {
        st.remove(&key, "", ns);
    }
}

/// Every namespace gets a `default` ServiceAccount, as the ServiceAccount controller
/// makes one (at once here rather than a moment later).
fn create_default_service_account(st: &mut State, ns: &str) {
    let Some(rt) = builtin_type(Builtin::ServiceAccount) else {
        return;
    };
    let obj = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}});
    let opts = WriteOpts {
        field_manager: "kube-controller-manager".into(),
        ..Default::default()
    };
    if let Err(e) = create(st, &rt, ns, obj, &opts) {
        tracing::warn!(namespace = ns, err = %e, "creating the default ServiceAccount");
    }
}

fn builtin_type(b: Builtin) -> Option<ResourceType> {
    super::registry::builtins()
        .into_iter()
        .find(|t| t.builtin == Some(b))
}

/// Upstream's bootstrap policy, the part a client meets: `cluster-admin` for
/// `system:masters`, discovery and the public info for everyone authenticated (the
/// health and version paths for anyone), and self reviews (`kubectl auth can-i`,
/// `whoami`) for everyone authenticated.
fn bootstrap_rbac(st: &mut State) {
    let role = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
               "rules": rules})
    };
    let binding = |name: &str, groups: &[&str]| {
        let subjects: Vec<Value> = groups
            .iter()
            .map(|g| json!({"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": g}))
            .collect();
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
               "subjects": subjects})
    };
    let public_paths = json!(["/healthz", "/livez", "/readyz", "/version", "/version/"]);
    let objects = [
        (
            Builtin::ClusterRole,
            role(
                "cluster-admin",
                json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                       {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
            ),
        ),
        (
            Builtin::ClusterRole,
            role(
                "system:discovery",
                json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez",
                                            "/openapi", "/openapi/*", "/readyz", "/version", "/version/"],
                        "verbs": ["get"]}]),
            ),
        ),
        (
            Builtin::ClusterRole,
            role(
                "system:basic-user",
                json!([{"apiGroups": ["authorization.k8s.io"],
                        "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
                       {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]),
            ),
        ),
        (
            Builtin::ClusterRole,
            role(
                "system:public-info-viewer",
                json!([{"nonResourceURLs": public_paths, "verbs": ["get"]}]),
            ),
        ),
        (
            Builtin::ClusterRoleBinding,
            binding("cluster-admin", &[super::rbac::MASTERS]),
        ),
        (
            Builtin::ClusterRoleBinding,
            binding("system:discovery", &[super::rbac::AUTHENTICATED]),
        ),
        (
            Builtin::ClusterRoleBinding,
            binding("system:basic-user", &[super::rbac::AUTHENTICATED]),
        ),
        (
            Builtin::ClusterRoleBinding,
            binding(
                "system:public-info-viewer",
                &[super::rbac::AUTHENTICATED, super::rbac::UNAUTHENTICATED],
            ),
        ),
    ];
    let opts = WriteOpts {
        field_manager: "kube-apiserver".into(),
        ..Default::default()
    };
    for (b, obj) in objects {
        let rt = builtin_type(b).expect("built-in");
        create(st, &rt, "", obj, &opts).expect("the bootstrap policy is valid");
    }
}

/// The namespaces and RBAC policy every cluster starts with.
pub fn bootstrap(st: &mut State) {
    bootstrap_rbac(st);
    let rt = super::registry::builtins()
        .into_iter()
        .find(|t| t.builtin == Some(Builtin::Namespace))
        .expect("built-in");
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        let opts = WriteOpts {
            field_manager: "nemesis-apiserver".into(),
            ..Default::default()
        };
        create(st, &rt, "", obj, &opts).expect("bootstrap namespaces are valid");
    }
}
