//! The records the history store keeps, as plain serde types. They carry no behaviour and
//! no I/O; the store serializes them, the report functions read them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A `ScalingPolicy` by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyId {
    pub namespace: String,
    pub name: String,
}

impl PolicyId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The store key: `namespace/name` (a `/` cannot occur in either part in Kubernetes,
    /// so the key is unambiguous).
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`unix_ms`].
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A state change of a policy's automaton.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransitionRecord {
    pub at_ms: u64,
    pub policy: PolicyId,
    pub from_state: String,
    pub to_state: String,
    pub from_replicas: i32,
    pub to_replicas: i32,
    /// Why, in words (the transition's condition as written).
    pub reason: String,
    /// The metric values the condition saw.
    #[serde(with = "f64_map")]
    pub metrics: BTreeMap<String, f64>,
}

/// A replica change the controller made through the `/scale` subresource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleRecord {
    pub at_ms: u64,
    pub policy: PolicyId,
    /// The automaton's state the scale was made in.
    pub state: String,
    pub from_replicas: i32,
    pub to_replicas: i32,
    pub reason: String,
    #[serde(with = "f64_map")]
    pub metrics: BTreeMap<String, f64>,
    /// Not made by the instance that recorded it: a leader found the target at replicas
    /// its history does not end at (the previous leader was killed between its scale and
    /// the record's commit) and recorded the change it saw when its term started. The
    /// original record may exist in another replica's store: [`super::scales`] drops a
    /// recovered record that repeats the change before it. Absent in older records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum ColdStartOutcome {
    /// A backend became ready and the held connections were released to it.
    Ready,
    /// The readiness budget ran out first.
    Timeout,
    /// Anything else that ended the wake (scale refused, policy deleted, ...).
    Failed { message: String },
}

/// One scale from zero, from the first wake-up to the first ready backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdStartRecord {
    pub wake_at_ms: u64,
    pub policy: PolicyId,
    /// `None` when no backend became ready.
    pub time_to_ready_ms: Option<u64>,
    /// Connections held by all agents while the target woke.
    pub held_connections: u64,
    pub outcome: ColdStartOutcome,
}

/// A stored metric point: a raw sample, or a one-minute bucket of folded raw samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum SampleValue {
    Raw {
        #[serde(with = "f64_any")]
        value: f64,
    },
    Minute {
        #[serde(with = "f64_any")]
        min: f64,
        #[serde(with = "f64_any")]
        max: f64,
        #[serde(with = "f64_any")]
        avg: f64,
        count: u32,
    },
}

impl SampleValue {
    /// The value a chart plots: the sample, or the bucket's average.
    pub fn mean(&self) -> f64 {
        match *self {
            SampleValue::Raw { value } => value,
            SampleValue::Minute { avg, .. } => avg,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricPoint {
    pub at_ms: u64,
    pub value: SampleValue,
}

/// JSON has no NaN or infinity (serde_json writes `null` and cannot read it back into an
/// `f64`), and a PromQL result may be either: non-finite values are written as the
/// strings `"NaN"`, `"+Inf"`, `"-Inf"`, as Prometheus itself does.
mod f64_any {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("+Inf")
        } else {
            s.serialize_str("-Inf")
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Str(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Num(v) => Ok(v),
            Repr::Str(s) => match s.as_str() {
                "NaN" => Ok(f64::NAN),
                "+Inf" => Ok(f64::INFINITY),
                "-Inf" => Ok(f64::NEG_INFINITY),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, \"NaN\", \"+Inf\" or \"-Inf\", found {other:?}"
                ))),
            },
        }
    }

    /// A newtype so maps can reuse the same encoding.
    #[derive(serde::Serialize, serde::Deserialize)]
    pub struct Any(#[serde(with = "self")] pub f64);
}

pub(crate) mod f64_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::f64_any::Any;

    pub fn serialize<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
        let m: BTreeMap<&str, Any> = m.iter().map(|(k, v)| (k.as_str(), Any(*v))).collect();
        m.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        let m = BTreeMap::<String, Any>::deserialize(d)?;
        Ok(m.into_iter().map(|(k, Any(v))| (k, v)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_metric_values_survive_a_json_round_trip() {
        let rec = TransitionRecord {
            at_ms: 1,
            policy: PolicyId::new("ns", "p"),
            from_state: "zero".into(),
            to_state: "warm".into(),
            from_replicas: 0,
            to_replicas: 1,
            reason: "demand".into(),
            metrics: BTreeMap::from([
                ("nan".to_string(), f64::NAN),
                ("inf".to_string(), f64::INFINITY),
                ("ninf".to_string(), f64::NEG_INFINITY),
                ("one".to_string(), 1.5),
            ]),
        };
        let back: TransitionRecord =
            serde_json::from_slice(&serde_json::to_vec(&rec).unwrap()).unwrap();
        assert!(back.metrics["nan"].is_nan());
        assert_eq!(back.metrics["inf"], f64::INFINITY);
        assert_eq!(back.metrics["ninf"], f64::NEG_INFINITY);
        assert_eq!(back.metrics["one"], 1.5);
    }
}
