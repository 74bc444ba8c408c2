//! Source validation: a guest speaks only as itself.
//!
//! Every classified frame must come from the guest's MAC (`--guest-mac`, which the VMM must
//! give the guest: QEMU `-device virtio-net-pci,mac=...`, cloud-hypervisor `--net mac=...`) and,
//! when it carries an IP source, from one of the guest's addresses: its IPv4 address (0.0.0.0
//! only while it asks DHCP or probes with ARP), an address of its IPv6 /64 or a link-local one
//! (never the gateway's), and `::` only for neighbour and router solicitations (duplicate address
//! detection, start-up). Anything else is spoofed: it is dropped and counted, so a guest cannot
//! open flows, fill tables or poison caches in another host's name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::addressing::{is_link_local, Addressing};

use super::classify::Classified;

/// Why a frame failed source validation (each a counter).
pub mod reasons {
    pub const MAC: &str = "spoofed-source-mac";
    pub const IP: &str = "spoofed-source-ip";
}

/// The guest's identity on the link.
#[derive(Debug, Clone, Copy)]
pub struct SourceGuard {
    pub guest_mac: [u8; 6],
    pub addressing: Addressing,
}

impl SourceGuard {
    fn v4_ok(&self, ip: Ipv4Addr) -> bool {
        ip == self.addressing.v4.guest
    }

    /// A unicast IPv6 source the guest may use: in its /64 or link-local, never the gateway's.
    fn v6_ok(&self, ip: Ipv6Addr) -> bool {
        let v6 = &self.addressing.v6;
        (v6.prefix.contains(&ip) || is_link_local(ip))
            && !v6.is_gateway(ip)
            && ip != v6.prefix.network()
            && !ip.is_multicast()
    }

    fn ip_ok(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.v4_ok(v4),
            IpAddr::V6(v6) => self.v6_ok(v6),
        }
    }

    /// `Err(reason)` when `frame` (classified as `c`) does not come from the guest.
    pub fn check(&self, frame: &[u8], c: &Classified) -> Result<(), &'static str> {
        if let Classified::Drop(_) = c {
            // Dropped anyway, under its own reason.
            return Ok(());
        }
        if frame.get(6..12) != Some(&self.guest_mac[..]) {
            return Err(reasons::MAC);
        }
        let ok = match c {
            Classified::Arp {
                sender, sender_mac, ..
            } => *sender_mac == self.guest_mac && (sender.is_unspecified() || self.v4_ok(*sender)),
            Classified::Dhcp { src, .. } => src.is_unspecified() || self.v4_ok(*src),
            Classified::Udp { src, .. } => self.ip_ok(src.ip()),
            Classified::Tcp(head) => self.ip_ok(head.src.ip()),
            Classified::IcmpEcho { src, .. } | Classified::IcmpOther { src, .. } => {
                self.ip_ok(*src)
            }
            Classified::RouterSolicit { src } | Classified::NeighborSolicit { src, .. } => {
                src.is_unspecified() || self.v6_ok(*src)
            }
            Classified::Drop(_) => true,
        };
        if ok {
            Ok(())
        } else {
            Err(reasons::IP)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::addressing::{LinkAddrs, LinkAddrs6};
    use crate::link::classify::classify;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x4e, 0x46, 2];

    fn guard() -> SourceGuard {
        SourceGuard {
            guest_mac: GUEST_MAC,
            addressing: Addressing {
                v4: LinkAddrs::for_slot("172.16.0.0/12".parse().unwrap(), 0).unwrap(),
                v6: LinkAddrs6::for_slot("fd42:6d73:62::/48".parse().unwrap(), 0).unwrap(),
            },
        }
    }

    /// An Ethernet frame with a UDP datagram from `src` to 203.0.113.7:53 (or 2001:db8::7).
    fn udp_from(mac: [u8; 6], src: IpAddr) -> Vec<u8> {
        let dst: IpAddr = match src {
            IpAddr::V4(_) => "203.0.113.7".parse().unwrap(),
            IpAddr::V6(_) => "2001:db8::7".parse().unwrap(),
        };
        let macs = crate::stack::frames::Macs {
            gateway_mac: smoltcp::wire::EthernetAddress([0x52, 0x54, 0, 0x4e, 0x46, 1]),
            guest_mac: smoltcp::wire::EthernetAddress(mac),
        };
        // `udp_to_guest` builds gateway -> guest; swap the MACs to make it guest -> gateway.
        let mut f = crate::stack::frames::udp_to_guest(
            &macs,
            std::net::SocketAddr::new(src, 4000),
            std::net::SocketAddr::new(dst, 53),
            2,
            false,
            |b| b.copy_from_slice(b"hi"),
        );
        let (d, s) = f.split_at_mut(6);
        d.swap_with_slice(&mut s[..6]);
        f
    }

    #[test]
    fn only_the_guests_own_addresses_pass() {
        let g = guard();
        for (src, ok) in [
            ("172.16.0.2", true),
            ("172.16.0.1", false),
            ("172.16.0.6", false),
            ("10.0.0.2", false),
            ("0.0.0.0", false),
            ("fd42:6d73:62::2", true),
            ("fd42:6d73:62::abcd:1234", true),
            ("fe80::5054:ff:fe4e:4602", true),
            ("fd42:6d73:62::1", false),
            ("fe80::1", false),
            ("fd42:6d73:62:1::2", false),
            ("2001:db8::2", false),
        ] {
            let f = udp_from(GUEST_MAC, src.parse().unwrap());
            let c = classify(&f);
            assert!(matches!(c, Classified::Udp { .. }), "{src}: {c:?}");
            assert_eq!(g.check(&f, &c).is_ok(), ok, "{src}");
        }
    }

    #[test]
    fn another_mac_is_refused() {
        let g = guard();
        let f = udp_from([2, 0, 0, 0, 0, 9], "172.16.0.2".parse().unwrap());
        assert_eq!(g.check(&f, &classify(&f)), Err(reasons::MAC));
    }
}
