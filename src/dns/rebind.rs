//! Rebind protection: which answer addresses a public name must never resolve to.
//!
//! A name an attacker controls can be pointed at the sandbox host's own services, the cloud
//! metadata endpoint or the operator's LAN ("DNS rebinding"). With protection on, A/AAAA records
//! with an address outside the `public` group are removed from upstream answers (unless a policy
//! rule explicitly allows the address). The ranges are the policy's own address table
//! ([`crate::policy::ranges`]), so the filter and the policy agree on every address: private,
//! loopback, link-local, metadata, multicast, the addresses in no group (0.0.0.0/8,
//! 255.255.255.255, ::), and the host's own addresses (a domain rule must not lead the guest to
//! the host's public address). IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64,
//! 6to4) are judged by the embedded address ([`crate::policy::canonical`]).

use std::net::IpAddr;

use crate::policy::{group_of, Group, HostAddrs, LocalAddrs};

/// True when `ip` is not in the `public` group: in a private, loopback, link-local, metadata or
/// multicast range, in no group at all, or one of this host's own addresses.
pub fn is_rebind_protected(ip: IpAddr) -> bool {
    let host = HostAddrs {
        local: LocalAddrs::System,
        ..HostAddrs::default()
    };
    group_of(ip, &host) != Some(Group::Public)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn p(s: &str) -> bool {
        is_rebind_protected(s.parse().unwrap())
    }

    #[test]
    fn v4_ranges() {
        for ip in [
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "100.100.100.200",
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "169.254.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "0.1.2.3",
            "224.0.0.251",
        ] {
            assert!(p(ip), "{ip} should be protected");
        }
        for ip in [
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "192.169.0.1",
            "169.253.0.1",
            "11.0.0.1",
            "203.0.113.7",
        ] {
            assert!(!p(ip), "{ip} should not be protected");
        }
    }

    #[test]
    fn v6_ranges() {
        for ip in [
            "::1",
            "::",
            "fc00::1",
            "fd00:ec2::254",
            "fdff:ffff::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:192.168.0.1",
            "::127.0.0.1",
            "64:ff9b::10.1.2.3",
            "64:ff9b:1:a01:2:300::",
            "2002:a00:1::",
            "2002:a9fe:a9fe::1",
            "ff02::1",
        ] {
            assert!(p(ip), "{ip} should be protected");
        }
        for ip in [
            "2001:db8::1",
            "2606:4700::1111",
            "fe00::1",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "fbff::1",
            "2002:808:808::1",
            "64:ff9b:1:808:8:800::",
        ] {
            assert!(!p(ip), "{ip} should not be protected");
        }
    }

    /// The rebind filter and the policy's groups agree on every address: protected is exactly
    /// "not in the public group" (no host addresses configured, none of these is the host's).
    #[test]
    fn agrees_with_the_policy_groups() {
        use crate::policy::{group_of, Group, HostAddrs};
        let none = HostAddrs::default();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let r = next();
            let v4 = Ipv4Addr::from((r >> 32) as u32);
            let [a, b, c, d] = v4.octets();
            let hi = (next() as u128) << 64 | next() as u128;
            let samples: [IpAddr; 6] = [
                IpAddr::V4(v4),
                IpAddr::V6(v4.to_ipv6_mapped()),
                IpAddr::V6(Ipv6Addr::from(
                    0x0064_ff9b_u128 << 96 | u128::from(u32::from(v4)),
                )),
                IpAddr::V6(Ipv6Addr::new(
                    0x2002,
                    u16::from_be_bytes([a, b]),
                    u16::from_be_bytes([c, d]),
                    0,
                    0,
                    0,
                    0,
                    1,
                )),
                IpAddr::V6(Ipv6Addr::from(hi)),
                // the top bits of IPv6 space where the special ranges live
                IpAddr::V6(Ipv6Addr::from(hi | 0xfc00u128 << 112)),
            ];
            for ip in samples {
                assert_eq!(
                    is_rebind_protected(ip),
                    group_of(ip, &none) != Some(Group::Public),
                    "{ip}"
                );
            }
        }
    }
}
