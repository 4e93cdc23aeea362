//! The agent API's messages: a sequence of heartbeats, wake-ups and load reports (split at 0xFF, a
//! byte no JSON text holds; each message's first byte says which) decoded as axum's
//! `Json` extractor does, checked by the handlers' checks and applied to one agent
//! registry and wake gate, as the controller's handlers do; and the controller's
//! replies as the agent decodes them. Two more kinds drive the directives: one changes
//! them (sleep, follow, hold ports, removal) as the core does, the other is a heartbeat
//! of an agent that keeps its copy by delta replies in pages (through JSON, as the agent
//! decodes them) and sends its reports as deltas: its copy must then equal the
//! registry's whole set, and the registry's reports its own.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use libfuzzer_sys::fuzz_target;
use nemesis_common::wire::{
    AppliedMode, DirectiveView, Heartbeat, HeartbeatReply, HoldPort, LoadReply, LoadReport,
    ReportDeltas, ServiceRef, ServiceReport, ViewUpdate, WakeReply, WakeRequest,
};
use nemesis_controller::agents::http::{check_heartbeat, check_loads, check_wake};
use nemesis_controller::agents::{AgentRegistry, RegistryConfig, WakeGate};
use tokio::time::Instant;

const DELTA_NODE: &str = "delta-agent";

fn report(service: ServiceRef, open: u64) -> ServiceReport {
    ServiceReport {
        service,
        mode: AppliedMode::Hold,
        applied_epoch: 0,
        connects_total: 0,
        open_connections: open,
        closed_total: 0,
        held_connections: 0,
        accepted_total: 0,
        accepted_open: 0,
        hold_ports: vec![],
        holds_total: 0,
        holds_refused_total: 0,
        proxy_errors: Default::default(),
    }
}

fuzz_target!(|data: &[u8]| {
    let registry = Arc::new(AgentRegistry::new(RegistryConfig::default()));
    let (wakes, _rx) = WakeGate::new(8, Duration::from_secs(60));
    let start = Instant::now();
    let mut view = DirectiveView::default();
    let mut deltas = ReportDeltas::default();
    let mut instance = 0u32;
    let mut reports: BTreeMap<ServiceRef, ServiceReport> = BTreeMap::new();
    for (i, message) in data.split(|b| *b == 0xff).enumerate() {
        let Some((&kind, body)) = message.split_first() else {
            continue;
        };
        // Time moves on between messages, so leases expire and state changes.
        let now = start + Duration::from_secs(i as u64 * 7);
        match kind % 8 {
            0 => {
                // Not as the delta-following agent: its reports are its own.
                if let Ok(Json(hb)) = Json::<Heartbeat>::from_bytes(body)
                    && check_heartbeat(&hb).is_ok()
                    && hb.node != DELTA_NODE
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
            6 => {
                let &[op, name, port, ..] = body else {
                    continue;
                };
                let svc = ServiceRef {
                    namespace: "ns".into(),
                    name: format!("s{}", name % 16),
                };
                match op % 4 {
                    0 => {
                        registry.request_sleep(&svc, None);
                    }
                    1 => {
                        registry.follow(&svc);
                    }
                    2 => registry.set_hold_ports(
                        &svc,
                        vec![HoldPort {
                            name: String::new(),
                            port: 20000 + u16::from(port),
                        }],
                    ),
                    _ => registry.remove(&svc),
                }
            }
            7 => {
                // The delta-following agent; a body byte may make it restart (copy and
                // reports lost), another changes its reports.
                if body.first().is_some_and(|b| b % 5 == 0) {
                    view = DirectiveView::default();
                    deltas = ReportDeltas::default();
                    instance += 1;
                }
                if let Some(&b) = body.get(1) {
                    let svc = ServiceRef {
                        namespace: "ns".into(),
                        name: format!("s{}", b % 16),
                    };
                    if b & 0x80 != 0 {
                        reports.remove(&svc);
                    } else {
                        reports.insert(svc.clone(), report(svc, u64::from(b % 3)));
                    }
                }
                // Pages until the run ends, as the agent asks at once.
                for _ in 0..64 {
                    let mut hb = Heartbeat {
                        node: DELTA_NODE.into(),
                        instance: instance.to_string(),
                        services: vec![],
                        addresses: vec![],
                        ready: true,
                        directives_cursor: view.cursor(),
                        pages: true,
                        reports_seq: None,
                        reports_since: None,
                        gone: vec![],
                    };
                    deltas.prepare(&mut hb, reports.values().cloned().collect());
                    assert!(
                        check_heartbeat(&hb).is_ok(),
                        "the agent's own heartbeat is valid"
                    );
                    let json =
                        serde_json::to_vec(&registry.heartbeat(hb, now)).expect("reply encodes");
                    let reply: HeartbeatReply =
                        serde_json::from_slice(&json).expect("reply decodes");
                    let again = deltas.acknowledge(&reply);
                    let update = view.apply(&reply);
                    assert_ne!(
                        update,
                        ViewUpdate::Resync,
                        "one controller's replies always continue"
                    );
                    if reply.reports_seq.is_some() {
                        let held = registry
                            .agents(now)
                            .into_iter()
                            .find(|a| a.node == DELTA_NODE)
                            .map(|a| a.services)
                            .unwrap_or_default();
                        let mine: Vec<_> = reports.values().cloned().collect();
                        assert_eq!(held, mine, "the delta-kept reports drifted");
                    }
                    if update != ViewUpdate::Partial && !again {
                        break;
                    }
                }
                let mine: Vec<_> = view.directives().cloned().collect();
                assert_eq!(mine, registry.directives(), "the delta-kept copy drifted");
            }
            _ => {
                let _ = serde_json::from_slice::<WakeReply>(body);
            }
        }
    }
});
