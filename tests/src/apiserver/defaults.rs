//! Defaulting of built-in kinds, as the real server's `SetDefaults_X` do on every write
//! for the fields kubectl and controllers look at. Fills absent fields only.

use serde_json::{Value, json};

use super::registry::Builtin;

fn set_absent(obj: &mut Value, field: &str, v: Value) {
    if let Some(m) = obj.as_object_mut()
        && m.get(field).is_none_or(Value::is_null)
    {
        m.insert(field.to_owned(), v);
    }
}

fn image_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    let tag = last
        .split('@')
        .next()
        .unwrap_or(last)
        .split_once(':')
        .map(|(_, t)| t);
    if image.contains('@') {
        "IfNotPresent"
    } else {
        match tag {
            None | Some("latest") => "Always",
            Some(_) => "IfNotPresent",
        }
    }
}

fn pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    set_absent(spec, "restartPolicy", json!("Always"));
    set_absent(spec, "terminationGracePeriodSeconds", json!(30));
    set_absent(spec, "dnsPolicy", json!("ClusterFirst"));
    set_absent(spec, "schedulerName", json!("default-scheduler"));
    set_absent(spec, "securityContext", json!({}));
    for field in ["initContainers", "containers"] {
        for c in spec
            .get_mut(field)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            set_absent(c, "terminationMessagePath", json!("/dev/termination-log"));
            set_absent(c, "terminationMessagePolicy", json!("File"));
            let policy = image_pull_policy(c["image"].as_str().unwrap_or(""));
            set_absent(c, "imagePullPolicy", json!(policy));
            for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                if let Some(p) = c.get_mut(probe).filter(|p| p.is_object()) {
                    probe_defaults(p);
                }
            }
            for p in c
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                set_absent(p, "protocol", json!("TCP"));
            }
        }
    }
}

/// `SetDefaults_Probe` and `SetDefaults_HTTPGetAction`: without them `kubectl describe`
/// printed `http-get //:http/ timeout=0s #success=0 #failure=0` for the demo's probe.
fn probe_defaults(p: &mut Value) {
    set_absent(p, "timeoutSeconds", json!(1));
    set_absent(p, "periodSeconds", json!(10));
    set_absent(p, "successThreshold", json!(1));
    set_absent(p, "failureThreshold", json!(3));
    if let Some(h) = p.get_mut("httpGet").filter(|h| h.is_object()) {
        set_absent(h, "path", json!("/"));
        set_absent(h, "scheme", json!("HTTP"));
    }
}

fn replicated(obj: &mut Value, deployment: bool) {
    if !obj["spec"].is_object() {
        return;
    }
    let spec = &mut obj["spec"];
    set_absent(spec, "replicas", json!(1));
    if deployment {
        set_absent(spec, "revisionHistoryLimit", json!(10));
        set_absent(spec, "progressDeadlineSeconds", json!(600));
        set_absent(spec, "strategy", json!({}));
        let strategy = &mut spec["strategy"];
        set_absent(strategy, "type", json!("RollingUpdate"));
        if strategy["type"] == "RollingUpdate" {
            set_absent(strategy, "rollingUpdate", json!({}));
            set_absent(&mut strategy["rollingUpdate"], "maxSurge", json!("25%"));
            set_absent(
                &mut strategy["rollingUpdate"],
                "maxUnavailable",
                json!("25%"),
            );
        }
    }
    if let Some(ps) = spec.pointer_mut("/template/spec") {
        pod_spec(ps);
    }
}

/// Default `obj` of kind `b` in place.
pub fn apply(b: Builtin, obj: &mut Value) {
    match b {
        Builtin::Deployment => replicated(obj, true),
        Builtin::ReplicaSet => replicated(obj, false),
        Builtin::StatefulSet => {
            replicated(obj, false);
            if let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) {
                set_absent(spec, "podManagementPolicy", json!("OrderedReady"));
                set_absent(spec, "revisionHistoryLimit", json!(10));
                set_absent(spec, "updateStrategy", json!({}));
                let strategy = &mut spec["updateStrategy"];
                set_absent(strategy, "type", json!("RollingUpdate"));
                if strategy["type"] == "RollingUpdate" {
                    set_absent(strategy, "rollingUpdate", json!({"partition": 0}));
                }
                set_absent(
                    spec,
                    "persistentVolumeClaimRetentionPolicy",
                    json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
                );
            }
        }
        Builtin::DaemonSet => {
            if let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) {
                set_absent(spec, "revisionHistoryLimit", json!(10));
                set_absent(spec, "updateStrategy", json!({}));
                let strategy = &mut spec["updateStrategy"];
                set_absent(strategy, "type", json!("RollingUpdate"));
                if strategy["type"] == "RollingUpdate" {
                    set_absent(strategy, "rollingUpdate", json!({}));
                    let rolling = &mut strategy["rollingUpdate"];
                    set_absent(rolling, "maxUnavailable", json!(1));
                    set_absent(rolling, "maxSurge", json!(0));
                }
                if let Some(ps) = spec.pointer_mut("/template/spec") {
                    pod_spec(ps);
                }
            }
        }
        Builtin::PersistentVolumeClaim => {
            if let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) {
                set_absent(spec, "volumeMode", json!("Filesystem"));
            }
            if !obj["status"].is_object() {
                obj["status"] = json!({"phase": "Pending"});
            }
        }
        Builtin::Pod => {
            if let Some(ps) = obj.get_mut("spec") {
                pod_spec(ps);
            }
        }
        Builtin::Service => {
            if !obj["spec"].is_object() {
                obj["spec"] = json!({});
            }
            let spec = &mut obj["spec"];
            set_absent(spec, "type", json!("ClusterIP"));
            set_absent(spec, "sessionAffinity", json!("None"));
            set_absent(spec, "internalTrafficPolicy", json!("Cluster"));
            set_absent(spec, "ipFamilyPolicy", json!("SingleStack"));
            // `ipFamilies` is set with the ClusterIPs (lifecycle), from what they are.
            for p in spec
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                set_absent(p, "protocol", json!("TCP"));
                let port = p["port"].clone();
                set_absent(p, "targetPort", port);
            }
        }
        Builtin::EndpointSlice => {
            for p in obj
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                set_absent(p, "protocol", json!("TCP"));
            }
        }
        Builtin::Secret => {
            set_absent(obj, "type", json!("Opaque"));
            if let Some(sd) = obj.as_object_mut().and_then(|m| m.remove("stringData"))
                && let Some(sd) = sd.as_object()
            {
                use base64::Engine;
                set_absent(obj, "data", json!({}));
                for (k, v) in sd {
                    let enc =
                        base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or(""));
                    obj["data"][k] = json!(enc);
                }
            }
        }
        Builtin::Namespace => {
            set_absent(obj, "spec", json!({"finalizers": ["kubernetes"]}));
            set_absent(obj, "status", json!({"phase": "Active"}));
        }
        Builtin::RoleBinding | Builtin::ClusterRoleBinding => {
            for s in obj
                .get_mut("subjects")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if matches!(s["kind"].as_str(), Some("User" | "Group")) {
                    set_absent(s, "apiGroup", json!("rbac.authorization.k8s.io"));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployments_get_upstream_defaults() {
        let mut d = json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x:1", "ports": [{"containerPort": 80}]}]}}}});
        apply(Builtin::Deployment, &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["ports"][0]["protocol"], "TCP");
    }

    #[test]
    fn probes_get_upstream_defaults_and_keep_what_is_set() {
        let mut d = json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x:1",
            "readinessProbe": {"httpGet": {"port": "http"}, "periodSeconds": 1},
            "livenessProbe": {"tcpSocket": {"port": 80}, "failureThreshold": 5}}]}}}});
        apply(Builtin::Deployment, &mut d);
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            c["readinessProbe"],
            json!({"httpGet": {"port": "http", "path": "/", "scheme": "HTTP"}, "periodSeconds": 1,
                "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3})
        );
        assert_eq!(
            c["livenessProbe"],
            json!({"tcpSocket": {"port": 80}, "failureThreshold": 5, "periodSeconds": 10,
                "timeoutSeconds": 1, "successThreshold": 1})
        );
        assert!(c.get("startupProbe").is_none());
    }

    #[test]
    fn secrets_fold_string_data_into_data() {
        let mut s = json!({"stringData": {"a": "hi"}});
        apply(Builtin::Secret, &mut s);
        assert_eq!(s, json!({"type": "Opaque", "data": {"a": "aGk="}}));
    }

    #[test]
    fn image_pull_policy_follows_the_tag() {
        assert_eq!(image_pull_policy("nginx"), "Always");
        assert_eq!(image_pull_policy("nginx:latest"), "Always");
        assert_eq!(image_pull_policy("reg:5000/nginx:1.2"), "IfNotPresent");
    }
}
