//! What the agent knows of its node's own network identity: the addresses of the host
//! network namespace it runs in (a DaemonSet with `hostNetwork`). Connections a backend
//! pod accepts from these come from the node itself (the kubelet's probes), which the
//! server-side count leaves out. Reads interfaces only; never changes them.
#![deny(unsafe_code)]

use std::net::IpAddr;

/// How often the addresses are read again (an interface can come up after the agent).
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// Every address of every interface of this network namespace, loopback included.
pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map_err(std::io::Error::from)?
        .filter_map(|i| i.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_address_is_one_of_the_hosts() {
        let addrs = host_addresses().unwrap();
        assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
    }
}
