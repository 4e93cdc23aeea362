//! Hold ports: the node port each managed Service port's hold listener uses on every
//! agent, handed out from a configured range. One port per Service port, the same on
//! every node, because an EndpointSlice's ports apply to all of its endpoints. Pure
//! bookkeeping; it never binds anything (agents do).

use std::collections::{BTreeMap, BTreeSet};

use nemesis_common::wire::{HoldPort, ServiceRef};

/// The default range: below the NodePort range (30000-32767) and the ephemeral ports
/// (32768 and up on Linux), wide enough for 10,000 Service ports.
pub const DEFAULT_RANGE: (u16, u16) = (20000, 29999);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no hold port left in {first}-{last} for Service {service} port {name:?} ({used} in use): widen --hold-ports"
)]
pub struct PortsExhausted {
    pub service: ServiceRef,
    pub name: String,
    pub first: u16,
    pub last: u16,
    pub used: usize,
}

/// Who has which hold port.
#[derive(Debug, Clone)]
pub struct HoldPorts {
    first: u16,
    last: u16,
    by_port: BTreeMap<(ServiceRef, String), u16>,
    used: BTreeSet<u16>,
}

impl HoldPorts {
    pub fn new((first, last): (u16, u16)) -> Self {
        Self {
            first,
            last,
            by_port: BTreeMap::new(),
            used: BTreeSet::new(),
        }
    }

    /// Keeps what an earlier controller handed out (read back from the hold slices it
    /// left), so that a slice in place stays right: ports outside the range or taken
    /// already are ignored.
    pub fn seed(&mut self, svc: &ServiceRef, name: &str, port: u16) {
        if port < self.first || port > self.last || self.used.contains(&port) {
            return;
        }
        let key = (svc.clone(), name.to_string());
        if self.by_port.contains_key(&key) {
            return;
        }
        self.by_port.insert(key, port);
        self.used.insert(port);
    }

    /// The hold ports of `svc`'s ports named `names`, handing out free ones where
    /// needed, and giving back those of ports the Service no longer has.
    pub fn assign(
        &mut self,
        svc: &ServiceRef,
        names: &[String],
    ) -> Result<Vec<HoldPort>, PortsExhausted> {
        let wanted: BTreeSet<&String> = names.iter().collect();
        let stale: Vec<(ServiceRef, String)> = self
            .keys_of(svc)
            .filter(|(_, n)| !wanted.contains(n))
            .cloned()
            .collect();
        for k in stale {
            if let Some(p) = self.by_port.remove(&k) {
                self.used.remove(&p);
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let key = (svc.clone(), name.clone());
            let port = match self.by_port.get(&key) {
                Some(p) => *p,
                None => {
                    let free = self.free_port();
                    let Some(p) = free else {
                        return Err(PortsExhausted {
                            service: svc.clone(),
                            name: name.clone(),
                            first: self.first,
                            last: self.last,
                            used: self.used.len(),
                        });
                    };
                    self.by_port.insert(key, p);
                    self.used.insert(p);
                    p
                }
            };
            out.push(HoldPort {
                name: name.clone(),
                port,
            });
        }
        Ok(out)
    }

    /// Gives back every port of a Service no policy manages any more.
    pub fn release(&mut self, svc: &ServiceRef) {
        let mine: Vec<(ServiceRef, String)> = self.keys_of(svc).cloned().collect();
        for k in mine {
            if let Some(p) = self.by_port.remove(&k) {
                self.used.remove(&p);
            }
        }
    }

    /// `svc`'s keys: a range of the map (it is ordered by Service first), so each pass
    /// over 10,000 Services costs a lookup per Service, not a scan of every port.
    fn keys_of<'a>(
        &'a self,
        svc: &'a ServiceRef,
    ) -> impl Iterator<Item = &'a (ServiceRef, String)> + 'a {
        self.by_port
            .range((svc.clone(), String::new())..)
            .map(|(k, _)| k)
            .take_while(move |(s, _)| s == svc)
    }

    /// The lowest free port of the range: the first gap in the ordered set of used ones
    /// (a walk of the used ports below it, not a lookup per candidate).
    fn free_port(&self) -> Option<u16> {
        let mut candidate = self.first;
        for &p in self.used.range(self.first..=self.last) {
            if p != candidate {
                break;
            }
            candidate = candidate.checked_add(1)?;
        }
        (candidate <= self.last).then_some(candidate)
    }

    /// Every Service that has ports now.
    pub fn services(&self) -> BTreeSet<ServiceRef> {
        self.by_port.keys().map(|(s, _)| s.clone()).collect()
    }
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

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn each_service_port_keeps_its_own_port_until_it_goes() {
        let mut p = HoldPorts::new((100, 103));
        let a = p.assign(&svc("a"), &names(&["http", "grpc"])).unwrap();
        assert_eq!(a.iter().map(|h| h.port).collect::<Vec<_>>(), [100, 101]);
        let b = p.assign(&svc("b"), &names(&[""])).unwrap();
        assert_eq!(b[0].port, 102);
        // Asked again: the same ports.
        assert_eq!(p.assign(&svc("a"), &names(&["http", "grpc"])).unwrap(), a);
        // A port the Service dropped is given back and reused.
        p.assign(&svc("a"), &names(&["http"])).unwrap();
        let c = p.assign(&svc("c"), &names(&["x", "y"])).unwrap();
        assert_eq!(c.iter().map(|h| h.port).collect::<Vec<_>>(), [101, 103]);
        p.release(&svc("b"));
        assert_eq!(p.assign(&svc("d"), &names(&["z"])).unwrap()[0].port, 102);
    }

    /// Services whose names sort next to each other (one a prefix of the other, in
    /// other namespaces) keep their own ports: the per-Service range stops at the
    /// Service.
    #[test]
    fn neighbouring_services_in_the_ordered_map_do_not_touch_each_others_ports() {
        let mut p = HoldPorts::new((100, 199));
        let other_ns = ServiceRef {
            namespace: "nt".into(),
            name: "a".into(),
        };
        let a = p.assign(&svc("a"), &names(&["http"])).unwrap();
        let ab = p.assign(&svc("a-b"), &names(&["http", "grpc"])).unwrap();
        let o = p.assign(&other_ns, &names(&[""])).unwrap();
        // `a` drops nothing of `a-b` when it changes its ports, nor when it goes.
        p.assign(&svc("a"), &names(&["grpc"])).unwrap();
        assert_eq!(
            p.assign(&svc("a-b"), &names(&["http", "grpc"])).unwrap(),
            ab
        );
        p.release(&svc("a"));
        assert_eq!(
            p.assign(&svc("a-b"), &names(&["http", "grpc"])).unwrap(),
            ab
        );
        assert_eq!(p.assign(&other_ns, &names(&[""])).unwrap(), o);
        // The freed ports are the lowest free again.
        let e = p.assign(&svc("e"), &names(&["1", "2", "3"])).unwrap();
        assert_eq!(
            e.iter().map(|h| h.port).collect::<Vec<_>>(),
            [a[0].port, 104, 105]
        );
    }

    #[test]
    fn a_full_range_is_a_clear_error() {
        let mut p = HoldPorts::new((100, 100));
        p.assign(&svc("a"), &names(&["http"])).unwrap();
        let e = p.assign(&svc("b"), &names(&["http"])).unwrap_err();
        assert!(
            e.to_string()
                .contains("no hold port left in 100-100 for Service ns/b port \"http\""),
            "{e}"
        );
    }

    #[test]
    fn seeded_ports_are_kept_and_bad_seeds_ignored() {
        let mut p = HoldPorts::new((100, 110));
        p.seed(&svc("a"), "http", 105);
        p.seed(&svc("b"), "http", 105); // taken
        p.seed(&svc("c"), "http", 999); // outside
        assert_eq!(p.assign(&svc("a"), &names(&["http"])).unwrap()[0].port, 105);
        assert_eq!(p.assign(&svc("b"), &names(&["http"])).unwrap()[0].port, 100);
    }
}
