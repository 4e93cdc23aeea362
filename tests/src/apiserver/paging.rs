//! Chunked lists: `limit` and `continue` as the real server pages from etcd. A continue
//! token is upstream's (base64 of `{"v":"meta.k8s.io/v1","rv":N,"start":"<key>\0"}`);
//! every page of one list shows the snapshot at the first page's resourceVersion, and a
//! token older than the kept history is `410 Expired` with upstream's message and a
//! token that continues inconsistently at the latest state. Pure: the store builds the
//! snapshot, the handler renders the page.

use base64::Engine;
use serde_json::{Value, json};

use super::meta;
use super::status::ApiError;

/// Upstream's `continueExpired`/`inconsistentContinue` (storage/etcd3/errors): the
/// message of a 410 for a continue token whose snapshot was compacted away.
pub const INCONSISTENT_CONTINUE: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

const TOKEN_VERSION: &str = "meta.k8s.io/v1";

/// Where a list resumes: the snapshot's resourceVersion (`-1`: the latest state, an
/// inconsistent continuation) and the key of the last object already returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continue {
    pub rv: i64,
    /// `namespace/name`, or `name` for cluster-scoped objects.
    pub after: String,
}

/// The key lists are ordered by and continue after (etcd's, without the prefix).
pub fn key_of(obj: &Value) -> String {
    match meta::namespace(obj) {
        "" => meta::name(obj).to_owned(),
        ns => format!("{ns}/{}", meta::name(obj)),
    }
}

pub fn encode(c: &Continue) -> String {
    let body = json!({"v": TOKEN_VERSION, "rv": c.rv, "start": format!("{}\u{0}", c.after)});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body.to_string())
}

fn invalid(why: &str) -> ApiError {
    ApiError::bad_request(format!(
        "invalid continue token: continue key is not valid: {why}"
    ))
}

/// Reads a continue token back (400 `invalid continue token` for anything else).
pub fn decode(token: &str) -> Result<Continue, ApiError> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| invalid("not base64"))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| invalid("not JSON"))?;
    if v["v"] != TOKEN_VERSION {
        return Err(invalid(&format!(
            "server does not recognize this encoded key version {}",
            v["v"]
        )));
    }
    let rv = v["rv"]
        .as_i64()
        .filter(|rv| *rv == -1 || *rv > 0)
        .ok_or_else(|| {
            invalid("incorrect encoded start resourceVersion (version meta.k8s.io/v1)")
        })?;
    let start = v["start"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("encoded start key empty"))?;
    if start.contains("..") || start.starts_with('/') {
        return Err(invalid("path traversal attempt detected"));
    }
    Ok(Continue {
        rv,
        after: start.trim_end_matches('\u{0}').to_owned(),
    })
}

/// `limit`: absent, empty, zero or negative means everything (as upstream).
pub fn parse_limit(v: Option<&str>) -> Result<Option<usize>, ApiError> {
    match v {
        None | Some("") => Ok(None),
        Some(s) => {
            let n: i64 = s.parse().map_err(|_| {
                ApiError::bad_request(format!("limit: Invalid value: \"{s}\": must be an integer"))
            })?;
            Ok(usize::try_from(n).ok().filter(|n| *n > 0))
        }
    }
}

/// One page of a list.
#[derive(Debug, PartialEq)]
pub struct Page {
    pub items: Vec<Value>,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// The page of `matching` (already filtered; ordered here by [`key_of`]) after `after`, at
/// most `limit` long. `filtered` lists (selectors) get no remaining count: upstream
/// cannot know it without reading everything either. The reference [`page_of`] (what
/// the server uses) is checked against.
#[cfg(test)]
pub fn page(
    mut matching: Vec<Value>,
    after: Option<&str>,
    limit: Option<usize>,
    rv: i64,
    filtered: bool,
) -> Page {
    // etcd orders by the key string (`a-b/x` before `a/z`), not by (namespace, name).
    matching.sort_by_cached_key(key_of);
    let mut items: Vec<Value> = match after {
        Some(a) => matching
            .into_iter()
            .filter(|o| key_of(o).as_str() > a)
            .collect(),
        None => matching,
    };
    let Some(limit) = limit.filter(|l| items.len() > *l) else {
        return Page {
            items,
            continue_token: None,
            remaining: None,
        };
    };
    let rest = items.split_off(limit);
    let last = key_of(items.last().expect("limit is positive"));
    Page {
        items,
        continue_token: Some(encode(&Continue { rv, after: last })),
        remaining: (!filtered).then_some(rest.len()),
    }
}

/// [`page`] over borrowed objects: only the page is cloned (a list of 10,000 objects
/// in 500-object pages cloned every object past the continue point for each page).
pub fn page_of<T: std::ops::Deref<Target = Value>>(
    matching: Vec<T>,
    after: Option<&str>,
    limit: Option<usize>,
    rv: i64,
    filtered: bool,
) -> Page {
    let mut keyed: Vec<(String, T)> = matching
        .into_iter()
        .map(|o| (key_of(&o), o))
        .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let total = keyed.len();
    let Some(limit) = limit.filter(|l| total > *l) else {
        return Page {
            items: keyed.into_iter().map(|(_, o)| (*o).clone()).collect(),
            continue_token: None,
            remaining: None,
        };
    };
    keyed.truncate(limit);
    let last = keyed.last().expect("limit is positive").0.clone();
    Page {
        items: keyed.into_iter().map(|(_, o)| (*o).clone()).collect(),
        continue_token: Some(encode(&Continue { rv, after: last })),
        remaining: (!filtered).then_some(total - limit),
    }
}

/// The 410 for a token whose snapshot is gone: carries a token that continues at the
/// latest state, as upstream's `handleCompactedErrorForPaging`.
pub fn expired(after: &str) -> (ApiError, String) {
    let token = encode(&Continue {
        rv: -1,
        after: after.to_owned(),
    });
    (ApiError::gone(INCONSISTENT_CONTINUE), token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(ns: &str, name: &str) -> Value {
        json!({"metadata": {"namespace": ns, "name": name}})
    }

    #[test]
    fn tokens_round_trip_and_look_like_upstreams() {
        let c = Continue {
            rv: 42,
            after: "shop/web".into(),
        };
        let t = encode(&c);
        assert_eq!(decode(&t).unwrap(), c);
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&t)
            .unwrap();
        assert_eq!(
            String::from_utf8(raw).unwrap(),
            r#"{"rv":42,"start":"shop/web\u0000","v":"meta.k8s.io/v1"}"#
        );
    }

    #[test]
    fn bad_tokens_are_bad_requests() {
        for t in [
            "%%%",
            "bm90IGpzb24",
            &encode(&Continue {
                rv: 0,
                after: "a".into(),
            }),
        ] {
            let e = decode(t).unwrap_err();
            assert_eq!(e.code, 400, "{t}");
            assert!(e.message.starts_with("invalid continue token"), "{e}");
        }
    }

    /// Paging borrowed objects (only the page cloned) gives the pages paging owned ones
    /// gives, across namespaces whose key order is not (namespace, name) order.
    #[test]
    fn borrowed_pages_are_the_owned_pages() {
        let all: Vec<Value> = [("a-b", "x"), ("a", "z"), ("a", "b"), ("", "n"), ("b", "a")]
            .iter()
            .map(|(ns, n)| obj(ns, n))
            .collect();
        for after in [None, Some("a/b"), Some("a-b/x"), Some("zz")] {
            for limit in [None, Some(1), Some(2), Some(5), Some(9)] {
                for filtered in [false, true] {
                    let owned = page(all.clone(), after, limit, 3, filtered);
                    let borrowed = page_of(all.iter().collect(), after, limit, 3, filtered);
                    assert_eq!(
                        (owned.items, owned.continue_token, owned.remaining),
                        (borrowed.items, borrowed.continue_token, borrowed.remaining),
                        "after {after:?}, limit {limit:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn pages_split_in_key_order_with_remaining_counts() {
        let all: Vec<Value> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| obj("x", n))
            .collect();
        let p = page(all.clone(), None, Some(2), 7, false);
        assert_eq!(p.items, all[..2]);
        assert_eq!(p.remaining, Some(3));
        let c = decode(p.continue_token.as_deref().unwrap()).unwrap();
        assert_eq!(
            c,
            Continue {
                rv: 7,
                after: "x/b".into()
            }
        );
        let p = page(all.clone(), Some(&c.after), Some(2), 7, true);
        assert_eq!(p.items, all[2..4]);
        assert_eq!(p.remaining, None, "no count for a filtered list");
        let p = page(all.clone(), Some("x/d"), Some(2), 7, false);
        assert_eq!(p.items, all[4..]);
        assert_eq!(p.continue_token, None);
        assert_eq!(page(all.clone(), None, None, 7, false).items, all);
    }

    #[test]
    fn limits_parse_as_upstream() {
        assert_eq!(parse_limit(None).unwrap(), None);
        assert_eq!(parse_limit(Some("0")).unwrap(), None);
        assert_eq!(parse_limit(Some("-3")).unwrap(), None);
        assert_eq!(parse_limit(Some("500")).unwrap(), Some(500));
        assert_eq!(parse_limit(Some("many")).unwrap_err().code, 400);
    }
}
