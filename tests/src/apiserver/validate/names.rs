//! Name, label and key syntax exactly as `k8s.io/apimachinery/pkg/util/validation` checks
//! them, with the same messages. Pure functions over strings.

const DNS1123_LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_SUBDOMAIN_FMT: &str =
    "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1035_LABEL_FMT: &str = "[a-z]([-a-z0-9]*[a-z0-9])?";
const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";

fn is_label_shape(s: &str, first: impl Fn(char) -> bool) -> bool {
    let b: Vec<char> = s.chars().collect();
    !b.is_empty()
        && first(b[0])
        && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
}

/// `path.IsValidPathSegmentName`: RBAC object names may hold `:` and upper case.
pub fn path_segment_errors(s: &str) -> Vec<String> {
    let mut e = vec![];
    match s {
        "." => e.push("may not be '.'".to_owned()),
        ".." => e.push("may not be '..'".to_owned()),
        _ => {}
    }
    for c in ['/', '%'] {
        if s.contains(c) {
            e.push(format!("may not contain '{c}'"));
        }
    }
    e
}

pub fn dns1123_label_errors(s: &str) -> Vec<String> {
    let mut e = vec![];
    if s.len() > 63 {
        e.push("must be no more than 63 characters".to_owned());
    }
    if !is_label_shape(s, |c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        e.push(format!(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '{DNS1123_LABEL_FMT}')"
        ));
    }
    e
}

pub fn dns1123_subdomain_errors(s: &str) -> Vec<String> {
    let mut e = vec![];
    if s.len() > 253 {
        e.push("must be no more than 253 characters".to_owned());
    }
    if s.is_empty()
        || !s
            .split('.')
            .all(|p| is_label_shape(p, |c| c.is_ascii_lowercase() || c.is_ascii_digit()))
    {
        e.push(format!(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '{DNS1123_SUBDOMAIN_FMT}')"
        ));
    }
    e
}

pub fn dns1035_label_errors(s: &str) -> Vec<String> {
    let mut e = vec![];
    if s.len() > 63 {
        e.push("must be no more than 63 characters".to_owned());
    }
    if !is_label_shape(s, |c| c.is_ascii_lowercase()) {
        e.push(format!(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '{DNS1035_LABEL_FMT}')"
        ));
    }
    e
}

fn is_qualified_part(s: &str) -> bool {
    let b: Vec<char> = s.chars().collect();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Label and annotation keys: `[prefix/]name`.
pub fn qualified_name_errors(s: &str) -> Vec<String> {
    let mut e = vec![];
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            e.push("prefix part must be non-empty".to_owned());
        } else {
            e.extend(
                dns1123_subdomain_errors(p)
                    .into_iter()
                    .map(|m| format!("prefix part {m}")),
            );
        }
    }
    if name.is_empty() {
        e.push("name part must be non-empty".to_owned());
    } else {
        if name.len() > 63 {
            e.push("name part must be no more than 63 characters".to_owned());
        }
        if !is_qualified_part(name) || name.contains('/') {
            e.push(format!(
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '{QUALIFIED_NAME_FMT}')"
            ));
        }
    }
    e
}

pub fn label_value_errors(s: &str) -> Vec<String> {
    let mut e = vec![];
    if s.len() > 63 {
        e.push("must be no more than 63 characters".to_owned());
    }
    if !s.is_empty() && !is_qualified_part(s) {
        e.push(format!(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '{LABEL_VALUE_FMT}')"
        ));
    }
    e
}

/// ConfigMap and Secret keys.
pub fn config_key_errors(s: &str) -> Vec<String> {
    let mut e = vec![];
    if s.len() > 253 {
        e.push("must be no more than 253 characters".to_owned());
    }
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        e.push("a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')".to_owned());
    }
    if s == "." || s == ".." {
        e.push(format!("must not be '{s}'"));
    } else if s.starts_with("..") {
        e.push("must not start with '..'".to_owned());
    }
    e
}

/// IANA service names, as container and service port names must be.
pub fn port_name_errors(s: &str) -> Vec<String> {
    let mut e = vec![];
    if s.len() > 15 {
        e.push("must be no more than 15 characters".to_owned());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        e.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".to_owned());
    }
    if s.contains("--") {
        e.push("must not contain consecutive hyphens".to_owned());
    }
    if !s.chars().any(|c| c.is_ascii_lowercase()) {
        e.push("must contain at least one letter (a-z)".to_owned());
    }
    if s.starts_with('-') || s.ends_with('-') {
        e.push("must not begin or end with a hyphen".to_owned());
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_follow_upstream_rules() {
        assert!(dns1123_label_errors("web-1").is_empty());
        assert!(!dns1123_label_errors("Web").is_empty());
        assert!(!dns1123_label_errors("-web").is_empty());
        assert!(!dns1123_label_errors("a.b").is_empty());
        assert!(dns1123_subdomain_errors("a.b-c.d").is_empty());
        assert!(!dns1123_subdomain_errors("a..b").is_empty());
        assert!(!dns1123_subdomain_errors("").is_empty());
        assert!(dns1035_label_errors("svc-1").is_empty());
        assert!(!dns1035_label_errors("1svc").is_empty());
        assert!(!dns1123_label_errors(&"a".repeat(64)).is_empty());
    }

    #[test]
    fn label_keys_and_values() {
        assert!(qualified_name_errors("app.kubernetes.io/name").is_empty());
        assert!(qualified_name_errors("App_1").is_empty());
        assert!(!qualified_name_errors("bad key").is_empty());
        assert!(!qualified_name_errors("/x").is_empty());
        assert!(label_value_errors("").is_empty());
        assert!(label_value_errors("v1.2_x").is_empty());
        assert!(!label_value_errors("-x").is_empty());
    }

    #[test]
    fn port_names() {
        assert!(port_name_errors("http").is_empty());
        assert!(!port_name_errors("80").is_empty());
        assert!(!port_name_errors("a--b").is_empty());
    }
}
