//! Balance mode's cluster-wide load: each agent's latest open connections per backend,
//! and for each reporter the sum of everyone else's (kept as a running total). It only adds up what agents say;
//! it never decides where a connection goes (each node's kernel does).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use nemesis_common::wire::{BackendLoad, LoadReply, LoadReport, ServiceLoads, ServiceRef};
use tokio::time::Instant;

/// A node's report counts for this long: four of the agents' half-second reports, so a
/// late report or two does not drop its load, and a node gone silent (stopped, cut off) stops
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

/// Open connections per backend per Service.
type Totals = BTreeMap<ServiceRef, BTreeMap<SocketAddr, u64>>;

/// The latest report of every node, and their running sum: a reply is the sum minus
/// the asker's own report, so answering costs the size of that report, not the number
/// of nodes (every agent asks every half second).
#[derive(Debug, Default)]
pub struct LoadBoard {
    inner: Mutex<Board>,
}

#[derive(Debug, Default)]
struct Board {
    nodes: BTreeMap<String, NodeLoads>,
    totals: Totals,
}

impl Board {
    fn add(&mut self, loads: &NodeLoads, sign: i8) {
        for (svc, backends) in &loads.services {
            let per = self.totals.entry(svc.clone()).or_default();
            for b in backends {
                let t = per.entry(b.addr).or_default();
                *t = if sign > 0 {
                    t.saturating_add(b.open)
                } else {
                    t.saturating_sub(b.open)
                };
                if *t == 0 {
                    per.remove(&b.addr);
                }
            }
            if per.is_empty() {
                self.totals.remove(svc);
            }
        }
    }
}

impl LoadBoard {
    /// Keeps `report` as its node's latest and answers the other nodes' sums for the
    /// Services it names.
    pub fn report(&self, report: LoadReport, now: Instant) -> LoadReply {
        let mut board = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<String> = board
            .nodes
            .iter()
            .filter(|(_, n)| now.saturating_duration_since(n.at) > LOAD_MAX_AGE)
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale.iter().chain(std::iter::once(&report.node)) {
            if let Some(old) = board.nodes.remove(name) {
                board.add(&old, -1);
            }
        }
        let mut services: BTreeMap<ServiceRef, Vec<BackendLoad>> = BTreeMap::new();
        for s in report.services {
            // Merged per backend: a Service listed twice must not count twice.
            let list = services.entry(s.service).or_default();
            for b in s.backends {
                match list.iter_mut().find(|x| x.addr == b.addr) {
                    Some(x) => x.open = x.open.saturating_add(b.open),
                    None => list.push(b),
                }
            }
        }
        let mine = NodeLoads { at: now, services };
        let reply = LoadReply {
            services: others(&board.totals, &mine),
        };
        board.add(&mine, 1);
        board.nodes.insert(report.node, mine);
        reply
    }
}

/// For each Service of `mine`, the sum per backend over every other node (`totals`
/// holds them all, `mine` not yet); Services and backends nobody else has connections
/// to are left out.
fn others(totals: &Totals, mine: &NodeLoads) -> Vec<ServiceLoads> {
    let mut out = vec![];
    for svc in mine.services.keys() {
        let Some(per) = totals.get(svc) else { continue };
        let backends: Vec<BackendLoad> = per
            .iter()
            .filter(|(_, open)| **open > 0)
            .map(|(addr, open)| BackendLoad {
                addr: *addr,
                open: *open,
            })
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
        // a's new report replaced its old one in the sums.
        let b = board.report(report("b", &[("web", vec![load(80, 9)])]), t0);
        assert_eq!(b.services[0].backends, vec![load(80, 2)], "c's 2 only");
        // A Service listed twice in one report counts once per backend entry.
        board.report(
            report(
                "c",
                &[("web", vec![load(80, 1)]), ("web", vec![load(80, 1)])],
            ),
            t0,
        );
        let b = board.report(report("b", &[("web", vec![])]), t0);
        assert_eq!(b.services[0].backends, vec![load(80, 2)], "c's 1 + 1");
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
