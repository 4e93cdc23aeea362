//! The agent API's messages: a sequence of heartbeats, wake-ups and load reports (split at 0xFF, a
//! byte no JSON text holds; each message's first byte says which) decoded as axum's
//! `Json` extractor does, checked by the handlers' checks and applied to one agent
//! registry and wake gate, as the controller's handlers do; and the controller's
//! replies as the agent decodes them.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use libfuzzer_sys::fuzz_target;
use nemesis_common::wire::{Heartbeat, HeartbeatReply, LoadReply, LoadReport, WakeReply, WakeRequest};
use nemesis_controller::agents::http::{check_heartbeat, check_loads, check_wake};
use nemesis_controller::agents::{AgentRegistry, RegistryConfig, WakeGate};
use tokio::time::Instant;

fuzz_target!(|data: &[u8]| {
    let registry = Arc::new(AgentRegistry::new(RegistryConfig::default()));
    let (wakes, _rx) = WakeGate::new(8, Duration::from_secs(60));
    let start = Instant::now();
    for (i, message) in data.split(|b| *b == 0xff).enumerate() {
        let Some((&kind, body)) = message.split_first() else {
            continue;
        };
        // Time moves on between messages, so leases expire and state changes.
        let now = start + Duration::from_secs(i as u64 * 7);
        match kind % 6 {
            0 => {
                if let Ok(Json(hb)) = Json::<Heartbeat>::from_bytes(body)
                    && check_heartbeat(&hb).is_ok()
                {
                    let _ = registry.heartbeat(hb, now);
                }
            }
            1 => {
                if let Ok(Json(req)) = Json::<WakeRequest>::from_bytes(body)
                    && check_wake(&req).is_ok()
                {
                    let _ = wakes.wake(&req, now);
                }
            }
            2 => {
                let _ = serde_json::from_slice::<HeartbeatReply>(body);
            }
            4 => {
                if let Ok(Json(report)) = Json::<LoadReport>::from_bytes(body)
                    && check_loads(&report).is_ok()
                {
                    let _ = registry.loads().report(report, now);
                }
            }
            5 => {
                let _ = serde_json::from_slice::<LoadReply>(body);
            }
            _ => {
                let _ = serde_json::from_slice::<WakeReply>(body);
            }
        }
    }
});
