//! Balance mode's cluster-wide load: each agent's latest open connections per backend,
//! and for each reporter the sum of everyone else's. It only adds up what agents say;
//! it never decides where a connection goes (each node's kernel does).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use nemesis_common::wire::{BackendLoad, LoadReply, LoadReport, ServiceLoads, ServiceRef};
use tokio::time::Instant;

/// A node's report counts for this long: two of the agents' one-second reports, so one
/// late report does not drop its load, and a node gone silent (stopped, cut off) stops
/// weighing on the others' choices within seconds.
pub const LOAD_MAX_AGE: Duration = Duration::from_secs(2);
/// Balanced Services one report may carry, and backends per Service (balance mode's
/// limit): bounds the board's memory per node.
pub const MAX_REPORT_SERVICES: usize = 16_384;
pub const MAX_REPORT_BACKENDS: usize = 1024;

#[derive(Debug)]
struct NodeLoads {
    at: Instant,
    services: BTreeMap<ServiceRef, Vec<BackendLoad>>,
}

/// The latest report of every node.
#[derive(Debug, Default)]
pub struct LoadBoard {
    nodes: Mutex<BTreeMap<String, NodeLoads>>,
}

impl LoadBoard {
    /// Keeps `report` as its node's latest and answers the other nodes' sums for the
    /// Services it names.
    pub fn report(&self, report: LoadReport, now: Instant) -> LoadReply {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|_, n| now.saturating_duration_since(n.at) <= LOAD_MAX_AGE);
        let wanted: Vec<ServiceRef> = report.services.iter().map(|s| s.service.clone()).collect();
        let services = report
            .services
            .into_iter()
            .map(|s| (s.service, s.backends))
            .collect();
        nodes.insert(report.node.clone(), NodeLoads { at: now, services });
        LoadReply {
            services: others(&nodes, &report.node, &wanted),
        }
    }
}

/// For each of `wanted`, the sum per backend over every node but `node`; Services and
/// backends nobody else has connections to are left out.
fn others(
    nodes: &BTreeMap<String, NodeLoads>,
    node: &str,
    wanted: &[ServiceRef],
) -> Vec<ServiceLoads> {
    let mut out = vec![];
    for svc in wanted {
        let mut sums: BTreeMap<SocketAddr, u64> = BTreeMap::new();
        for (_, n) in nodes.iter().filter(|(name, _)| name.as_str() != node) {
            for b in n.services.get(svc).into_iter().flatten() {
                *sums.entry(b.addr).or_default() += b.open;
            }
        }
        let backends: Vec<BackendLoad> = sums
            .into_iter()
            .filter(|(_, open)| *open > 0)
            .map(|(addr, open)| BackendLoad { addr, open })
            .collect();
        if !backends.is_empty() {
            out.push(ServiceLoads {
                service: svc.clone(),
                backends,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> ServiceRef {
        ServiceRef {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn load(port: u16, open: u64) -> BackendLoad {
        BackendLoad {
            addr: SocketAddr::from(([198, 18, 0, 5], port)),
            open,
        }
    }

    fn report(node: &str, loads: &[(&str, Vec<BackendLoad>)]) -> LoadReport {
        LoadReport {
            node: node.into(),
            services: loads
                .iter()
                .map(|(s, b)| ServiceLoads {
                    service: svc(s),
                    backends: b.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn each_node_gets_the_sum_of_the_others_never_its_own() {
        let board = LoadBoard::default();
        let t0 = Instant::now();
        let first = board.report(report("a", &[("web", vec![load(80, 5), load(81, 1)])]), t0);
        assert_eq!(first.services, vec![], "nobody else yet");
        board.report(report("c", &[("web", vec![load(80, 2)])]), t0);
        let b = board.report(
            report("b", &[("web", vec![load(80, 9)]), ("db", vec![])]),
            t0,
        );
        assert_eq!(
            b.services,
            vec![ServiceLoads {
                service: svc("web"),
                backends: vec![load(80, 7), load(81, 1)],
            }],
            "a's and c's, not b's own 9; db has no load elsewhere"
        );
        let a = board.report(report("a", &[("web", vec![load(80, 0)])]), t0);
        assert_eq!(a.services[0].backends, vec![load(80, 11)], "b's 9 + c's 2");
    }

    #[test]
    fn a_node_that_stopped_reporting_stops_counting() {
        let board = LoadBoard::default();
        let t0 = Instant::now();
        board.report(report("a", &[("web", vec![load(80, 5)])]), t0);
        let soon = t0 + LOAD_MAX_AGE;
        let b = board.report(report("b", &[("web", vec![])]), soon);
        assert_eq!(b.services[0].backends, vec![load(80, 5)], "still fresh");
        let later = soon + Duration::from_millis(1);
        let b = board.report(report("b", &[("web", vec![])]), later);
        assert_eq!(b.services, vec![], "a's report is too old to count");
    }
}
