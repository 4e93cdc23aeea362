//! Conversion between a resource's served versions and its storage version: custom
//! resources only change `apiVersion` (conversion strategy None), and `events.k8s.io/v1`
//! Events are stored as core `v1` Events, which kubectl describe reads.

use serde_json::{Map, Value};

use super::registry::{Builtin, ResourceType};

/// (core v1 field, events.k8s.io/v1 field)
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn rename(obj: &mut Value, pairs: impl Iterator<Item = (&'static str, &'static str)>) {
    if let Some(m) = obj.as_object_mut() {
        let mut moved = Map::new();
        for (from, to) in pairs {
            if let Some(v) = m.remove(from) {
                moved.insert(to.to_owned(), v);
            }
        }
        m.extend(moved);
    }
}

/// A stored object as the client asked for it (`rt` is the served version).
pub fn to_served(obj: &Value, rt: &ResourceType) -> Value {
    let mut o = obj.clone();
    if rt.builtin == Some(Builtin::EventsV1) {
        rename(&mut o, EVENT_FIELDS.iter().copied());
    }
    o["apiVersion"] = Value::String(rt.api_version());
    o["kind"] = Value::String(rt.kind.clone());
    o
}

/// A client's object in the storage version (`storage` is the storage type).
pub fn to_storage(mut obj: Value, rt: &ResourceType, storage: &ResourceType) -> Value {
    if rt.builtin == Some(Builtin::EventsV1) {
        rename(&mut obj, EVENT_FIELDS.iter().map(|(a, b)| (*b, *a)));
    }
    obj["apiVersion"] = Value::String(storage.api_version());
    obj["kind"] = Value::String(storage.kind.clone());
    obj
}

/// Where objects of `rt` live: events.k8s.io Events share the core Events' slot.
pub fn storage_key(rt: &ResourceType) -> super::registry::StoreKey {
    if rt.builtin == Some(Builtin::EventsV1) {
        (String::new(), "events".into())
    } else {
        rt.key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_v1_round_trip_through_core_storage() {
        let types = super::super::registry::builtins();
        let ev1 = types
            .iter()
            .find(|t| t.builtin == Some(Builtin::EventsV1))
            .unwrap();
        let core = types
            .iter()
            .find(|t| t.builtin == Some(Builtin::CoreEvent))
            .unwrap();
        let new = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "regarding": {"kind": "Pod", "name": "p"}, "note": "hi", "reportingController": "c", "reason": "R"});
        let stored = to_storage(new.clone(), ev1, core);
        assert_eq!(stored["involvedObject"]["name"], "p");
        assert_eq!(stored["message"], "hi");
        assert_eq!(stored["apiVersion"], "v1");
        assert_eq!(to_served(&stored, ev1), new);
    }
}
