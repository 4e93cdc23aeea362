//! ClusterIPs for a sandbox whose Service proxy listens on them. Test API servers all
//! allocate from the bottom of 127.96.0.0/16, so two of them hand out the same address;
//! a sandbox that serves its ClusterIPs takes them instead from a block of the upper
//! half that belongs to its pod subnet index (unique on the machine while it lives).

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::apiserver::SERVICE_CIDR_V6;
use crate::netns::SUBNETS;

/// Addresses per block: 4 blocks share a /24 of 127.96.128.0/17.
pub const BLOCK_SIZE: u8 = 62;

/// The `ordinal`-th (0-based) ClusterIP of the sandbox holding subnet `index`, or `None`
/// past the block's [`BLOCK_SIZE`] addresses. Block `index` is
/// `127.96.(128 + index / 4).((index % 4) * 64 + 1 ..= +62)`.
pub fn cluster_ip(index: u16, ordinal: u8) -> Option<Ipv4Addr> {
    if index >= SUBNETS || ordinal >= BLOCK_SIZE {
        return None;
    }
    let third = 128 + (index / 4) as u8;
    let fourth = (index % 4) as u8 * 64 + 1 + ordinal;
    Some(Ipv4Addr::new(127, 96, third, fourth))
}

/// The `ordinal`-th IPv6 ClusterIP of the sandbox holding subnet `index`, or `None` past
/// the block's [`BLOCK_SIZE`] addresses: `fd6e:6d00:ffff::<index * 64 + 1 + ordinal>`
/// (hex), inside the IPv6 service range, one block per subnet index, so two live
/// sandboxes never put the same address on `lo` (nor remove each other's).
pub fn cluster_ip_v6(index: u16, ordinal: u8) -> Option<Ipv6Addr> {
    if index >= SUBNETS || ordinal >= BLOCK_SIZE {
        return None;
    }
    let offset = u128::from(index) * 64 + 1 + u128::from(ordinal);
    Some(Ipv6Addr::from(u128::from(SERVICE_CIDR_V6.0) + offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn blocks_of_all_subnets_are_disjoint_and_inside_the_upper_half_of_the_service_range() {
        let mut seen = BTreeSet::new();
        for index in 0..SUBNETS {
            for ordinal in 0..BLOCK_SIZE {
                let ip = cluster_ip(index, ordinal).unwrap();
                let [a, b, c, d] = ip.octets();
                assert_eq!((a, b), (127, 96));
                assert!(c >= 128, "{ip}");
                assert!(d != 0 && d != 255, "{ip}");
                assert!(seen.insert(ip), "{ip} handed out twice");
            }
        }
    }

    #[test]
    fn ipv6_blocks_are_disjoint_and_inside_the_ipv6_service_range() {
        let mut seen = BTreeSet::new();
        for index in 0..SUBNETS {
            for ordinal in 0..BLOCK_SIZE {
                let ip = cluster_ip_v6(index, ordinal).unwrap();
                assert!(crate::apiserver::in_service_range(ip.into()), "{ip}");
                assert!(seen.insert(ip), "{ip} handed out twice");
            }
        }
        assert_eq!(
            cluster_ip_v6(1, 0),
            Some("fd6e:6d00:ffff::41".parse().unwrap())
        );
        assert_eq!(cluster_ip_v6(0, BLOCK_SIZE), None);
    }

    #[test]
    fn out_of_range_inputs_get_none() {
        assert_eq!(cluster_ip(SUBNETS, 0), None);
        assert_eq!(cluster_ip(0, BLOCK_SIZE), None);
        assert_eq!(cluster_ip(0, 0), Some(Ipv4Addr::new(127, 96, 128, 1)));
        assert_eq!(cluster_ip(511, 61), Some(Ipv4Addr::new(127, 96, 255, 254)));
    }
}
