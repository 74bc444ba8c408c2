//! Where the host side of a flow connects: the address map.
//!
//! The guest always sees the destination it asked for, and the policy judges that address. The
//! host-side connection goes to the first `--map` entry that covers the destination, else to the
//! host's own loopback when the destination is the gateway (the `host` group), else to the
//! destination itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::config::AddressMapEntry;
use crate::policy::canonical;

#[derive(Debug, Clone)]
pub struct AddressMap {
    entries: Vec<AddressMapEntry>,
    gateways: Vec<IpAddr>,
}

impl AddressMap {
    pub fn new(entries: Vec<AddressMapEntry>, gateways: Vec<IpAddr>) -> Self {
        AddressMap { entries, gateways }
    }

    /// The host-side address for a guest-visible destination.
    pub fn host_target(&self, dst: SocketAddr) -> SocketAddr {
        if let Some(mapped) = self.entries.iter().find_map(|e| e.map(dst)) {
            return mapped;
        }
        // Any spelling of a gateway address (IPv4-mapped, NAT64, ...) is the gateway, as the
        // policy judges it.
        let ip = canonical(dst.ip());
        if self.gateways.iter().any(|g| canonical(*g) == ip) {
            let loopback = match dst {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            };
            return SocketAddr::new(loopback, dst.port());
        }
        dst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_gateway_goes_to_loopback() {
        let map = AddressMap::new(Vec::new(), vec!["172.16.0.1".parse().unwrap()]);
        for dst in [
            "[::ffff:172.16.0.1]:80",
            "[64:ff9b::ac10:1]:80",
            "172.16.0.1:80",
        ] {
            let target = map.host_target(dst.parse().unwrap());
            assert!(target.ip().is_loopback(), "{dst} -> {target}");
        }
    }

    #[test]
    fn map_then_gateway_then_identity() {
        let map = AddressMap::new(
            vec![
                "203.0.113.7:80=127.0.0.1:8080".parse().unwrap(),
                "203.0.113.9=127.0.0.2".parse().unwrap(),
            ],
            vec!["172.16.0.1".parse().unwrap()],
        );
        let t = |s: &str| map.host_target(s.parse().unwrap()).to_string();
        assert_eq!(t("203.0.113.7:80"), "127.0.0.1:8080");
        assert_eq!(t("203.0.113.7:81"), "203.0.113.7:81");
        assert_eq!(t("203.0.113.9:5201"), "127.0.0.2:5201");
        assert_eq!(t("172.16.0.1:22"), "127.0.0.1:22");
        assert_eq!(t("198.51.100.1:443"), "198.51.100.1:443");
    }
}
