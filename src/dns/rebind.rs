//! Rebind protection: which answer addresses a public name must never resolve to.
//!
//! A name an attacker controls can be pointed at the sandbox host's own services, the cloud
//! metadata endpoint or the operator's LAN ("DNS rebinding"). With protection on, A/AAAA records
//! in these ranges are removed from upstream answers (unless a policy rule explicitly allows the
//! address). IPv6 forms that embed an IPv4 address (mapped `::ffff:a.b.c.d`, the deprecated
//! compatible `::a.b.c.d`, and NAT64 `64:ff9b::a.b.c.d`) are judged by the embedded address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// True when `ip` lies in private, shared (CGNAT), loopback, link-local, metadata, unspecified
/// or broadcast space.
pub fn is_rebind_protected(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_protected(v4),
        IpAddr::V6(v6) => v6_protected(v6),
    }
}

fn v4_protected(ip: Ipv4Addr) -> bool {
    let [a, b, _, _] = ip.octets();
    a == 0                                   // 0.0.0.0/8 "this network" (reaches the host)
        || a == 10                           // 10.0.0.0/8
        || (a == 172 && (b & 0xf0) == 16)    // 172.16.0.0/12
        || (a == 192 && b == 168)            // 192.168.0.0/16
        || (a == 100 && (b & 0xc0) == 64)    // 100.64.0.0/10 shared / CGNAT (Alibaba metadata)
        || a == 127                          // 127.0.0.0/8 loopback
        || (a == 169 && b == 254)            // 169.254.0.0/16 link-local, cloud metadata
        || ip.is_broadcast()
}

fn v6_protected(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() {
        return true;
    }
    if (seg[0] & 0xfe00) == 0xfc00 {
        // fc00::/7 unique local (includes fd00:ec2::254, a metadata address)
        return true;
    }
    if (seg[0] & 0xffc0) == 0xfe80 || (seg[0] & 0xffc0) == 0xfec0 {
        // fe80::/10 link-local, fec0::/10 deprecated site-local
        return true;
    }
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible, deprecated)
    if seg[..5] == [0, 0, 0, 0, 0] && (seg[5] == 0xffff || seg[5] == 0) {
        return v4_protected(embedded(seg[6], seg[7]));
    }
    // 64:ff9b::/96 NAT64 well-known prefix
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return v4_protected(embedded(seg[6], seg[7]));
    }
    false
}

#[cfg(test)]
mod tests {
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
        ] {
            assert!(!p(ip), "{ip} should not be protected");
        }
    }
}
