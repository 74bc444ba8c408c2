//! The address policy judges: an IPv6 spelling of an IPv4 address is judged as that address.
//!
//! A guest may write an IPv4 destination in IPv6 form, and the host or its network turns it
//! back into IPv4: a dual-stack socket does so for mapped addresses, a NAT64 gateway for its
//! prefix, a 6to4 relay for 2002::/16. If policy judged such an address as IPv6 (public, as a
//! rule), `::ffff:10.0.0.1` or `64:ff9b::a9fe:a9fe` would walk around every private or
//! metadata block. So [`canonical`] turns these spellings into the IPv4 address they carry:
//!
//! | spelling | standard | where the IPv4 address is |
//! |---|---|---|
//! | `::ffff:a.b.c.d` | IPv4-mapped | bits 96..127 |
//! | `::a.b.c.d` (not `::`, `::1`) | IPv4-compatible (deprecated) | bits 96..127 |
//! | `64:ff9b::/96` | NAT64 well-known prefix, RFC 6052 | bits 96..127 |
//! | `64:ff9b:1::/48` | NAT64 local-use prefix, RFC 8215 | RFC 6052's layout for a /48: bits 48..63 and 72..87 |
//! | `2002::/16` | 6to4, RFC 3056 | bits 16..47 |
//!
//! The bits around the IPv4 address (the u octet and suffix of NAT64, the subnet and interface
//! of 6to4) do not matter: whatever they hold, the translator delivers to that IPv4 address.
//! Operators may carve longer prefixes out of the local-use /48 (RFC 6052 allows /56, /64,
//! /96 layouts there); netfence reads the /48 layout only, so such an address is judged as
//! whatever the /48 layout yields, typically something in 0.0.0.0/8, which is denied outright.
//!
//! How the rest of policy uses it, so that every spelling is judged alike:
//! - the group of an address ([`super::group_of`]) and the `host` addresses compare canonical
//!   forms; an IP rule is stored canonical (`deny@64:ff9b::a00:1` is `deny@10.0.0.1`), so it
//!   matches every spelling;
//! - a CIDR rule matches if it contains the canonical address *or* the address as the guest
//!   wrote it: `deny@10.0.0.0/8` catches `64:ff9b::a00:1`, and `deny@[2002::/16]` still
//!   catches `2002:a00:1::` (an IPv6 range rule means what it says);
//! - the address map (`config` `map`) covers a guest destination in every spelling of its key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address as policy judges it: an IPv6 address that carries an IPv4 address (see the
/// module table) becomes that IPv4 address; every other address is itself.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(ip, IpAddr::V4),
    }
}

/// The IPv4 address an IPv6 address carries, if it is a mapped, compatible, NAT64 or 6to4
/// address.
pub fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let last32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..6] == [0, 0, 0, 0, 0, 0xffff] {
        return Some(last32);
    }
    if s[..6] == [0; 6] && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST {
        return Some(last32);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(last32);
    }
    if s[..3] == [0x64, 0xff9b, 1] {
        // RFC 6052 section 2.2, prefix length 48: v4 bits 0..15 at 48..63, the u octet at
        // 64..71, v4 bits 16..31 at 72..87, then the suffix.
        return Some(Ipv4Addr::new(o[6], o[7], o[9], o[10]));
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}
