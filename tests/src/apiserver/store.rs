//! The object store: every object as JSON, keyed by resource and (namespace, name), one
//! global resourceVersion counter, and the event log watches read from. It stamps
//! resourceVersions and records events; every API rule lives in `lifecycle`, not here.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use super::meta;
use super::registry::{Registry, StoreKey};
use super::watch::{EventLog, EventType, StoredEvent};

type ObjKey = (String, String);

pub struct State {
    pub registry: Registry,
    objects: HashMap<StoreKey, BTreeMap<ObjKey, Value>>,
    rv: u64,
    pub log: EventLog,
    /// Service ClusterIPs in use, with the Service that holds each.
    pub cluster_ips: BTreeMap<std::net::IpAddr, (String, String)>,
}

impl State {
    pub fn new(history: usize) -> Self {
        State {
            registry: Registry::default(),
            objects: HashMap::new(),
            rv: 1,
            log: EventLog::new(history),
            cluster_ips: BTreeMap::new(),
        }
    }

    /// The current (latest) resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn get(&self, key: &StoreKey, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(key)?
            .get(&(ns.to_owned(), name.to_owned()))
    }

    /// Objects of `key`, in one namespace or all, ordered by namespace then name.
    pub fn list(&self, key: &StoreKey, ns: Option<&str>) -> Vec<&Value> {
        let Some(m) = self.objects.get(key) else {
            return vec![];
        };
        match ns {
            Some(ns) => m
                .range((ns.to_owned(), String::new())..)
                .take_while(|((n, _), _)| n == ns)
                .map(|(_, v)| v)
                .collect(),
            None => m.values().collect(),
        }
    }

    /// Objects of `key` as they were at resourceVersion `rv` (in one namespace or all)
    /// for which `keep` holds, ordered by namespace then name, rebuilt from the current
    /// state by undoing the history after `rv`, as etcd reads at a revision; `410
    /// Expired` once that history is no longer kept. Only the objects changed since
    /// `rv` are looked up in the history, and only kept ones are cloned: every page of
    /// a paged list reads its snapshot, and cloning all 10,000 objects of a kind for
    /// each 500-object page held the server up for seconds.
    pub fn list_at(
        &self,
        key: &StoreKey,
        ns: Option<&str>,
        rv: u64,
        keep: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Cow<'_, Value>>, super::status::ApiError> {
        // Per object changed since `rv`: how it was at `rv` (None: absent). Undoing the
        // events newest first leaves each object as its oldest event after `rv` found
        // it, so the first event (oldest) that says something wins.
        let mut then: BTreeMap<ObjKey, Option<Value>> = BTreeMap::new();
        for ev in self.log.since(rv, self.rv)?.iter() {
            if &ev.key != key {
                continue;
            }
            let k = (
                meta::namespace(&ev.object).to_owned(),
                meta::name(&ev.object).to_owned(),
            );
            let before = match (ev.etype, &ev.old) {
                (EventType::Added, _) => None,
                (EventType::Modified | EventType::Deleted, Some(old)) => Some(old.clone()),
                (_, None) => continue,
            };
            then.entry(k).or_insert(before);
        }
        let in_ns = |k: &ObjKey| ns.is_none_or(|ns| k.0 == ns);
        let mut out: Vec<(ObjKey, Cow<'_, Value>)> = self
            .objects
            .get(key)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(k, v)| in_ns(k) && !then.contains_key(*k) && keep(v))
            .map(|(k, v)| (k.clone(), Cow::Borrowed(v)))
            .collect();
        out.extend(
            then.into_iter()
                .filter(|(k, v)| in_ns(k) && v.as_ref().is_some_and(&keep))
                .filter_map(|(k, v)| v.map(|v| (k, Cow::Owned(v)))),
        );
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out.into_iter().map(|(_, v)| v).collect())
    }

    /// Every object of every resource in namespace `ns`, with its key.
    pub fn in_namespace(&self, ns: &str) -> Vec<(StoreKey, Value)> {
        let mut out = vec![];
        for (k, m) in &self.objects {
            for ((n, _), v) in m {
                if n == ns {
                    out.push((k.clone(), v.clone()));
                }
            }
        }
        out
    }

    /// Objects anywhere that list `uid` among their owners.
    pub fn dependents_of(&self, uid: &str) -> Vec<(StoreKey, Value)> {
        let mut out = vec![];
        for (k, m) in &self.objects {
            for v in m.values() {
                if meta::owner_uids(v).iter().any(|u| u == uid) {
                    out.push((k.clone(), v.clone()));
                }
            }
        }
        out
    }

    fn stamp(&mut self, obj: &mut Value) -> u64 {
        let rv = self.next_rv();
        meta::metadata_mut(obj).insert("resourceVersion".into(), json!(rv.to_string()));
        rv
    }

    /// Store a new object (the caller checked it does not exist) and record `ADDED`.
    pub fn insert(&mut self, key: &StoreKey, mut obj: Value) -> Value {
        let rv = self.stamp(&mut obj);
        let k = (
            meta::namespace(&obj).to_owned(),
            meta::name(&obj).to_owned(),
        );
        self.objects
            .entry(key.clone())
            .or_default()
            .insert(k, obj.clone());
        self.log.push(StoredEvent {
            rv,
            key: key.clone(),
            etype: EventType::Added,
            object: obj.clone(),
            old: None,
        });
        obj
    }

    /// Replace an existing object and record `MODIFIED`.
    pub fn replace(&mut self, key: &StoreKey, mut obj: Value) -> Value {
        let rv = self.stamp(&mut obj);
        let k = (
            meta::namespace(&obj).to_owned(),
            meta::name(&obj).to_owned(),
        );
        let old = self
            .objects
            .entry(key.clone())
            .or_default()
            .insert(k, obj.clone());
        self.log.push(StoredEvent {
            rv,
            key: key.clone(),
            etype: EventType::Modified,
            object: obj.clone(),
            old,
        });
        obj
    }

    /// Remove an object and record `DELETED` (carrying a new resourceVersion, as upstream).
    pub fn remove(&mut self, key: &StoreKey, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self
            .objects
            .get_mut(key)?
            .remove(&(ns.to_owned(), name.to_owned()))?;
        let before = obj.clone();
        let rv = self.stamp(&mut obj);
        self.log.push(StoredEvent {
            rv,
            key: key.clone(),
            etype: EventType::Deleted,
            object: obj.clone(),
            old: Some(before),
        });
        Some(obj)
    }

    /// Drop every object of a resource (its CRD went away), recording `DELETED`s.
    /// Removes every object of a type; returns them.
    pub fn remove_all(&mut self, key: &StoreKey) -> Vec<Value> {
        let names: Vec<ObjKey> = self
            .objects
            .get(key)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        names
            .into_iter()
            .filter_map(|(ns, name)| self.remove(key, &ns, &name))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StoreKey {
        ("".into(), "configmaps".into())
    }

    #[test]
    fn resource_versions_increase_across_writes_and_deletes() {
        let mut s = State::new(10);
        let a = s.insert(&key(), json!({"metadata": {"name": "a", "namespace": "x"}}));
        let b = s.replace(&key(), a.clone());
        let c = s.remove(&key(), "x", "a").unwrap();
        let rv = |v: &Value| meta::resource_version(v).parse::<u64>().unwrap();
        assert!(rv(&a) < rv(&b) && rv(&b) < rv(&c));
        assert_eq!(rv(&c), s.rv());
        assert!(s.get(&key(), "x", "a").is_none());
    }

    #[test]
    fn list_is_scoped_to_a_namespace_and_ordered() {
        let mut s = State::new(10);
        for (ns, n) in [("b", "z"), ("a", "y"), ("b", "a")] {
            s.insert(&key(), json!({"metadata": {"name": n, "namespace": ns}}));
        }
        let names: Vec<_> = s
            .list(&key(), Some("b"))
            .iter()
            .map(|v| meta::name(v).to_owned())
            .collect();
        assert_eq!(names, ["a", "z"]);
        assert_eq!(s.list(&key(), None).len(), 3);
    }
}
