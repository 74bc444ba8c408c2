//! Addressing of one guest link, derived from the pools and the guest's slot.
//!
//! Slot N of `ipv4_pool` is the /30 at `pool base + 4N`: the gateway is `+1`, the guest `+2`.
//! Slot N of `ipv6_pool` is the N-th /64 of the pool: the gateway owns `prefix::1` and the
//! link-local `fe80::1`, the guest configures itself by SLAAC. The gateway addresses form the
//! policy's `host` group. The link (DHCP, router advertisements, source validation) and the
//! config (`gateway_addrs`) both derive them from here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The gateway's link-local address: the guest's default router.
pub const GATEWAY_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Addresses of one guest link, derived from the pool and the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAddrs {
    pub gateway: Ipv4Addr,
    pub guest: Ipv4Addr,
    pub prefix_len: u8,
}

impl LinkAddrs {
    /// The /30 of `slot` in `pool`; an error names the pool and the slot count it allows.
    pub fn for_slot(pool: Ipv4Net, slot: u32) -> Result<Self, String> {
        if pool.prefix_len() > 30 {
            return Err(format!(
                "ipv4_pool {pool}: prefix must be /30 or shorter (each guest needs a /30)"
            ));
        }
        let slots = 1u64 << (30 - pool.prefix_len());
        if u64::from(slot) >= slots {
            return Err(format!(
                "slot {slot} is outside ipv4_pool {pool}, which has slots 0..={}",
                slots - 1
            ));
        }
        let base = u32::from(pool.network()) + slot * 4;
        Ok(LinkAddrs {
            gateway: Ipv4Addr::from(base + 1),
            guest: Ipv4Addr::from(base + 2),
            prefix_len: 30,
        })
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix_len)))
    }
}

/// IPv6 addresses of one guest link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAddrs6 {
    /// The guest's /64.
    pub prefix: Ipv6Net,
    /// `prefix::1`, the gateway's global address (DNS service, `host` group).
    pub gateway: Ipv6Addr,
    /// `fe80::1`, the gateway's link-local address (router, NDP).
    pub link_local: Ipv6Addr,
}

impl LinkAddrs6 {
    /// The /64 of `slot` in `pool`; an error names the pool and the slot count it allows.
    pub fn for_slot(pool: Ipv6Net, slot: u32) -> Result<Self, String> {
        if pool.prefix_len() > 64 {
            return Err(format!(
                "ipv6_pool {pool}: prefix must be /64 or shorter (each guest needs a /64)"
            ));
        }
        let bits = 64 - u32::from(pool.prefix_len());
        if bits < 32 && u64::from(slot) >= 1u64 << bits {
            return Err(format!(
                "ipv6_pool {pool} has {} /64s; slot {slot} is outside it",
                1u64 << bits
            ));
        }
        let base = u128::from(pool.network()) + (u128::from(slot) << 64);
        let prefix = Ipv6Net::new(Ipv6Addr::from(base), 64).map_err(|e| e.to_string())?;
        Ok(LinkAddrs6 {
            prefix,
            gateway: Ipv6Addr::from(base + 1),
            link_local: GATEWAY_LINK_LOCAL,
        })
    }

    /// Whether `ip` is one of the gateway's own IPv6 addresses.
    pub fn is_gateway(&self, ip: Ipv6Addr) -> bool {
        ip == self.gateway || ip == self.link_local
    }

    /// The gateway address a message to `guest` comes from: link-local to link-local.
    pub fn source_for(&self, guest: Ipv6Addr) -> Ipv6Addr {
        if is_link_local(guest) {
            self.link_local
        } else {
            self.gateway
        }
    }
}

/// fe80::/10.
pub fn is_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// Both families' addresses of one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addressing {
    pub v4: LinkAddrs,
    pub v6: LinkAddrs6,
}

impl Addressing {
    /// Whether `ip` is one of the gateway's own addresses (IPv4, IPv6 global or link-local),
    /// in any spelling the policy judges as one (IPv4-mapped, NAT64, ...).
    pub fn is_gateway(&self, ip: IpAddr) -> bool {
        match crate::policy::canonical(ip) {
            IpAddr::V4(v4) => v4 == self.v4.gateway,
            IpAddr::V6(v6) => self.v6.is_gateway(v6),
        }
    }

    /// The gateway address that messages to `guest` come from.
    pub fn gateway_for(&self, guest: IpAddr) -> IpAddr {
        match guest {
            IpAddr::V4(_) => IpAddr::V4(self.v4.gateway),
            IpAddr::V6(v6) => IpAddr::V6(self.v6.source_for(v6)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_gateway_is_the_gateway() {
        let a = Addressing {
            v4: LinkAddrs::for_slot("172.16.0.0/12".parse().unwrap(), 0).unwrap(),
            v6: LinkAddrs6::for_slot("fd42:6d73:62::/48".parse().unwrap(), 0).unwrap(),
        };
        for ip in [
            "172.16.0.1",
            "::ffff:172.16.0.1",
            "64:ff9b::ac10:1",
            "fe80::1",
        ] {
            assert!(a.is_gateway(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["172.16.0.2", "::ffff:172.16.0.2", "fd42:6d73:62::2"] {
            assert!(!a.is_gateway(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn slots_carve_slash_30s() {
        let pool: Ipv4Net = "172.16.0.0/12".parse().unwrap();
        let s0 = LinkAddrs::for_slot(pool, 0).unwrap();
        assert_eq!(s0.gateway, Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(s0.guest, Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(s0.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        let s3 = LinkAddrs::for_slot(pool, 3).unwrap();
        assert_eq!(s3.guest, Ipv4Addr::new(172, 16, 0, 14));
        let last = LinkAddrs::for_slot(pool, (1 << 18) - 1).unwrap();
        assert_eq!(last.guest, Ipv4Addr::new(172, 31, 255, 254));
        assert!(LinkAddrs::for_slot(pool, 1 << 18).is_err());
        assert!(LinkAddrs::for_slot("10.0.0.0/31".parse().unwrap(), 0).is_err());
    }

    #[test]
    fn slots_are_consecutive_64s_of_the_pool() {
        let pool: Ipv6Net = "fd42:6d73:62::/48".parse().unwrap();
        let a = LinkAddrs6::for_slot(pool, 0).unwrap();
        assert_eq!(a.prefix.to_string(), "fd42:6d73:62::/64");
        assert_eq!(a.gateway.to_string(), "fd42:6d73:62::1");
        let b = LinkAddrs6::for_slot(pool, 3).unwrap();
        assert_eq!(b.prefix.to_string(), "fd42:6d73:62:3::/64");
        assert_eq!(b.gateway.to_string(), "fd42:6d73:62:3::1");
        assert!(LinkAddrs6::for_slot(pool, 65_535).is_ok());
        let e = LinkAddrs6::for_slot(pool, 65_536).unwrap_err();
        assert!(e.contains("65536 /64s"), "{e}");
        let e = LinkAddrs6::for_slot("fd00::/96".parse().unwrap(), 0).unwrap_err();
        assert!(e.contains("/64 or shorter"), "{e}");
        assert!(a.is_gateway(GATEWAY_LINK_LOCAL) && a.is_gateway(a.gateway));
        assert!(!a.is_gateway("fd42:6d73:62::2".parse().unwrap()));
        assert_eq!(a.source_for("fe80::5".parse().unwrap()), GATEWAY_LINK_LOCAL);
        assert_eq!(a.source_for("fd42:6d73:62::2".parse().unwrap()), a.gateway);
    }
}
