//! The body Alertmanager's webhook receiver sends (version 4), for tests that post an
//! alert to the controller as Alertmanager would. Owns the payload only.

use serde_json::{Value, json};

/// One alert named `alert`, firing or resolved now. As Alertmanager: one fingerprint per
/// label set, and a firing that follows a resolution is a new instance that starts now
/// (an older start would be taken for a late copy of the resolved one and ignored).
pub fn webhook(alert: &str, firing: bool) -> Value {
    let now = chrono::Utc::now();
    let status = if firing { "firing" } else { "resolved" };
    let fingerprint = format!(
        "{:016x}",
        alert.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    );
    let (starts_at, ends_at) = if firing {
        (now.to_rfc3339(), "0001-01-01T00:00:00Z".to_string())
    } else {
        (
            (now - chrono::Duration::seconds(60)).to_rfc3339(),
            now.to_rfc3339(),
        )
    };
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{alert}\"}}"),
        "status": status,
        "receiver": "nemesis",
        "alerts": [{
            "status": status,
            "labels": {"alertname": alert},
            "startsAt": starts_at,
            "endsAt": ends_at,
            "fingerprint": fingerprint,
        }],
    })
}
