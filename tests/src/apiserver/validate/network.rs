//! Validation of Services, EndpointSlices and Endpoints, including the address rules a
//! real API server enforces (no loopback, link-local or unspecified endpoint addresses).
//! Pure functions; Service IP allocation lives in the lifecycle, not here.

use std::net::IpAddr;

use serde_json::{Value, json};

use super::names;
use crate::apiserver::status::Cause;

const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

pub fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

/// Why an endpoint address is refused, in upstream's words, or `None` if it is usable.
pub fn ip_is_special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() {
                Some("may not be unspecified (0.0.0.0, ::)")
            } else if v4.is_loopback() {
                Some("may not be in the loopback range (127.0.0.0/8, ::1/128)")
            } else if v4.is_link_local() {
                Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)")
            } else if v4.octets()[..3] == [224, 0, 0] {
                Some("may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if v6.is_unspecified() {
                Some("may not be unspecified (0.0.0.0, ::)")
            } else if v6.is_loopback() {
                Some("may not be in the loopback range (127.0.0.0/8, ::1/128)")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)")
            } else if seg[0] & 0xff0f == 0xff02 {
                Some("may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)")
            } else {
                None
            }
        }
    }
}

fn port_number(field: String, v: &Value, causes: &mut Vec<Cause>) {
    match v.as_i64() {
        Some(n) if (1..=65535).contains(&n) => {}
        Some(n) => causes.push(Cause::invalid(
            field,
            &json!(n),
            "must be between 1 and 65535, inclusive",
        )),
        None => causes.push(Cause::required(field)),
    }
}

pub fn service(obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = vec![];
    let spec = &obj["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP");
    if ty != "ClusterIP" {
        // NodePort, LoadBalancer and ExternalName need allocators and controllers this
        // test server does not have: refuse rather than store a Service nothing serves.
        causes.push(Cause::not_supported(
            "spec.type",
            &json!(ty),
            &["ClusterIP"],
        ));
    }
    let headless = spec["clusterIP"] == "None";
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    if ports.is_empty() && !headless {
        causes.push(Cause::required("spec.ports"));
    }
    let mut names_seen = std::collections::HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        match p["name"].as_str().filter(|n| !n.is_empty()) {
            None if ports.len() > 1 => causes.push(Cause::required(format!("{path}.name"))),
            None => {}
            Some(n) => {
                for e in names::dns1123_label_errors(n) {
                    causes.push(Cause::invalid(format!("{path}.name"), &json!(n), &e));
                }
                if !names_seen.insert(n.to_owned()) {
                    causes.push(Cause::duplicate(format!("{path}.name"), &json!(n)));
                }
            }
        }
        port_number(format!("{path}.port"), &p["port"], &mut causes);
        if let Some(proto) = p["protocol"].as_str()
            && !PROTOCOLS.contains(&proto)
        {
            causes.push(Cause::not_supported(
                format!("{path}.protocol"),
                &json!(proto),
                &PROTOCOLS,
            ));
        }
        match &p["targetPort"] {
            Value::Number(_) => {
                port_number(format!("{path}.targetPort"), &p["targetPort"], &mut causes)
            }
            Value::String(s) => {
                for e in names::port_name_errors(s) {
                    causes.push(Cause::invalid(format!("{path}.targetPort"), &json!(s), &e));
                }
            }
            _ => {}
        }
    }
    if let Some(sel) = spec["selector"].as_object() {
        for (k, v) in sel {
            for e in names::qualified_name_errors(k) {
                causes.push(Cause::invalid("spec.selector", &json!(k), &e));
            }
            for e in names::label_value_errors(v.as_str().unwrap_or("")) {
                causes.push(Cause::invalid("spec.selector", v, &e));
            }
        }
    }
    if let Some(a) = spec["sessionAffinity"].as_str()
        && !["None", "ClientIP"].contains(&a)
    {
        causes.push(Cause::not_supported(
            "spec.sessionAffinity",
            &json!(a),
            &["ClientIP", "None"],
        ));
    }
    if let Some(old) = old {
        let (n, o) = (&spec["clusterIP"], &old["spec"]["clusterIP"]);
        if !o.is_null() && o != "" && n != o {
            causes.push(Cause::invalid(
                "spec.clusterIPs[0]",
                n,
                "may not change once set",
            ));
        }
    }
    causes
}

fn endpoint_address(field: String, addr: &str, family: &str, causes: &mut Vec<Cause>) {
    match (family, parse_ip(addr)) {
        ("FQDN", _) => {
            for e in names::dns1123_subdomain_errors(addr) {
                causes.push(Cause::invalid(field.clone(), &json!(addr), &e));
            }
        }
        ("IPv4", Some(ip @ IpAddr::V4(_)))
        | ("IPv6", Some(ip @ IpAddr::V6(_)))
        | ("", Some(ip)) => {
            if let Some(why) = ip_is_special(ip) {
                causes.push(Cause::invalid(field, &json!(addr), why));
            }
        }
        ("IPv6", _) => causes.push(Cause::invalid(
            field,
            &json!(addr),
            "must be a valid IPv6 address",
        )),
        _ => causes.push(Cause::invalid(
            field,
            &json!(addr),
            "must be a valid IPv4 address",
        )),
    }
}

pub fn endpoint_slice(obj: &Value) -> Vec<Cause> {
    let mut causes = vec![];
    let family = obj["addressType"].as_str().unwrap_or("");
    if family.is_empty() {
        causes.push(Cause::required("addressType"));
    } else if !["IPv4", "IPv6", "FQDN"].contains(&family) {
        causes.push(Cause::not_supported(
            "addressType",
            &json!(family),
            &["FQDN", "IPv4", "IPv6"],
        ));
    }
    let endpoints = obj["endpoints"].as_array().cloned().unwrap_or_default();
    if endpoints.len() > 1000 {
        causes.push(Cause::too_many("endpoints", endpoints.len(), 1000));
    }
    for (i, ep) in endpoints.iter().enumerate() {
        let addrs = ep["addresses"].as_array().cloned().unwrap_or_default();
        if addrs.is_empty() {
            causes.push(Cause::required(format!("endpoints[{i}].addresses")));
        } else if addrs.len() > 100 {
            causes.push(Cause::too_many(
                format!("endpoints[{i}].addresses"),
                addrs.len(),
                100,
            ));
        }
        for (j, a) in addrs.iter().enumerate() {
            endpoint_address(
                format!("endpoints[{i}].addresses[{j}]"),
                a.as_str().unwrap_or(""),
                family,
                &mut causes,
            );
        }
        if let Some(h) = ep["hostname"].as_str() {
            for e in names::dns1123_label_errors(h) {
                causes.push(Cause::invalid(
                    format!("endpoints[{i}].hostname"),
                    &json!(h),
                    &e,
                ));
            }
        }
        if let Some(n) = ep["nodeName"].as_str() {
            for e in names::dns1123_subdomain_errors(n) {
                causes.push(Cause::invalid(
                    format!("endpoints[{i}].nodeName"),
                    &json!(n),
                    &e,
                ));
            }
        }
    }
    for (i, p) in obj["ports"].as_array().into_iter().flatten().enumerate() {
        if let Some(n) = p["name"].as_str().filter(|n| !n.is_empty()) {
            for e in names::dns1123_label_errors(n) {
                causes.push(Cause::invalid(format!("ports[{i}].name"), &json!(n), &e));
            }
        }
        if !p["port"].is_null() {
            port_number(format!("ports[{i}].port"), &p["port"], &mut causes);
        }
        if let Some(proto) = p["protocol"].as_str()
            && !PROTOCOLS.contains(&proto)
        {
            causes.push(Cause::not_supported(
                format!("ports[{i}].protocol"),
                &json!(proto),
                &PROTOCOLS,
            ));
        }
    }
    causes
}

pub fn endpoints(obj: &Value) -> Vec<Cause> {
    let mut causes = vec![];
    for (i, s) in obj["subsets"].as_array().into_iter().flatten().enumerate() {
        for field in ["addresses", "notReadyAddresses"] {
            for (j, a) in s[field].as_array().into_iter().flatten().enumerate() {
                let ip = a["ip"].as_str().unwrap_or("");
                endpoint_address(format!("subsets[{i}].{field}[{j}].ip"), ip, "", &mut causes);
            }
        }
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_slices_refuse_loopback_like_a_real_server() {
        let s = json!({"addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"]}, {"addresses": ["198.18.0.5"]}]});
        let causes = endpoint_slice(&s);
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "endpoints[0].addresses[0]");
        assert_eq!(
            causes[0].message,
            "Invalid value: \"127.0.0.1\": may not be in the loopback range (127.0.0.0/8, ::1/128)"
        );
    }

    #[test]
    fn special_addresses() {
        for (a, bad) in [
            ("::1", true),
            ("169.254.1.1", true),
            ("0.0.0.0", true),
            ("224.0.0.5", true),
            ("198.18.0.1", false),
        ] {
            assert_eq!(ip_is_special(a.parse().unwrap()).is_some(), bad, "{a}");
        }
    }

    #[test]
    fn services_need_named_ports_when_several() {
        let s = json!({"spec": {"ports": [{"port": 80}, {"port": 0, "name": "b"}]}});
        let fields: Vec<_> = service(&s, None).into_iter().map(|c| c.field).collect();
        assert_eq!(fields, ["spec.ports[0].name", "spec.ports[1].port"]);
    }

    #[test]
    fn service_cluster_ip_may_not_change() {
        let old = json!({"spec": {"clusterIP": "127.96.0.1", "ports": [{"port": 80}]}});
        let new = json!({"spec": {"clusterIP": "127.96.0.2", "ports": [{"port": 80}]}});
        assert_eq!(service(&new, Some(&old))[0].field, "spec.clusterIPs[0]");
    }
}
