//! The address table: the fixed ranges of each destination group, and the addresses in none.
//!
//! One table, read by everything that sorts addresses: [`super::group_of`] (policy decisions),
//! the DNS rebind filter (`dns::rebind`: protected = not `public`), [`super::Group::describe`]
//! (the text of help and error messages) and [`group_nets`] (lint's range reasoning). Entries
//! are tried in order and the first that contains the (canonical) address wins, so a more
//! specific range comes before the range it lies in (metadata before link-local). An address
//! in no entry is `public`. The `host` group has no fixed range: it is the gateway addresses
//! and the host's own addresses (see [`super::HostAddrs`]), checked before this table's groups.
//!
//! The addresses in no group never reach a host socket and are denied outright: the
//! unspecified addresses (which the kernel takes as "this host"), the rest of 0.0.0.0/8 ("this
//! network", RFC 1122; Linux routes some of it to the host itself) and the limited broadcast
//! address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{canonical, Group};

/// Why an address is in no group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoGroup {
    /// 0.0.0.0 or ::.
    Unspecified,
    /// 0.0.0.0/8 other than 0.0.0.0.
    ThisNetwork,
    /// 255.255.255.255.
    Broadcast,
}

/// What the table says about an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RangeClass {
    /// A group (never [`Group::Host`]: that is not a fixed range).
    Group(Group),
    /// No group: denied outright.
    NoGroup(NoGroup),
}

/// One entry of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub net: IpNet,
    pub class: RangeClass,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8, class: RangeClass) -> Range {
    Range {
        net: IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)),
        class,
    }
}

const fn v6(first: u16, last: u16, len: u8, class: RangeClass) -> Range {
    Range {
        net: IpNet::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(first, 0, 0, 0, 0, 0, 0, last),
            len,
        )),
        class,
    }
}

const UNSPECIFIED: RangeClass = RangeClass::NoGroup(NoGroup::Unspecified);
const THIS_NETWORK: RangeClass = RangeClass::NoGroup(NoGroup::ThisNetwork);
const BROADCAST: RangeClass = RangeClass::NoGroup(NoGroup::Broadcast);
const METADATA: RangeClass = RangeClass::Group(Group::Metadata);
const LOOPBACK: RangeClass = RangeClass::Group(Group::Loopback);
const PRIVATE: RangeClass = RangeClass::Group(Group::Private);
const LINK_LOCAL: RangeClass = RangeClass::Group(Group::LinkLocal);
const MULTICAST: RangeClass = RangeClass::Group(Group::Multicast);

/// The table, first match wins.
pub const TABLE: &[Range] = &[
    v4(0, 0, 0, 0, 32, UNSPECIFIED),
    v4(0, 0, 0, 0, 8, THIS_NETWORK),
    v4(255, 255, 255, 255, 32, BROADCAST),
    v4(169, 254, 169, 254, 32, METADATA),
    v4(127, 0, 0, 0, 8, LOOPBACK),
    v4(10, 0, 0, 0, 8, PRIVATE),
    v4(172, 16, 0, 0, 12, PRIVATE),
    v4(192, 168, 0, 0, 16, PRIVATE),
    v4(100, 64, 0, 0, 10, PRIVATE), // shared address space (CGN)
    v4(169, 254, 0, 0, 16, LINK_LOCAL),
    v4(224, 0, 0, 0, 4, MULTICAST),
    v6(0, 0, 128, UNSPECIFIED),
    v6(0, 1, 128, LOOPBACK),
    v6(0xfc00, 0, 7, PRIVATE),  // unique local
    v6(0xfec0, 0, 10, PRIVATE), // site-local (deprecated, RFC 3879)
    v6(0xfe80, 0, 10, LINK_LOCAL),
    v6(0xff00, 0, 8, MULTICAST),
];

/// The class of `ip`, judged as its canonical form (`::ffff:10.0.0.1` is private).
pub fn classify(ip: IpAddr) -> RangeClass {
    let ip = canonical(ip);
    TABLE
        .iter()
        .find(|r| r.net.contains(&ip))
        .map_or(RangeClass::Group(Group::Public), |r| r.class)
}

/// The fixed ranges of group `g`, in table order (none for `host` and `public`).
pub fn group_nets(g: Group) -> Vec<IpNet> {
    TABLE
        .iter()
        .filter(|r| r.class == RangeClass::Group(g))
        .map(|r| r.net)
        .collect()
}

/// A range as people write it: a single address without its prefix length.
fn net_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// The ranges of `g` as text, naming the groups carved out of them (`169.254.0.0/16,
/// fe80::/10 (excluding metadata)`).
pub(super) fn group_text(g: Group) -> String {
    let mine: Vec<(usize, &Range)> = TABLE
        .iter()
        .enumerate()
        .filter(|(_, r)| r.class == RangeClass::Group(g))
        .collect();
    let mut text = mine
        .iter()
        .map(|(_, r)| net_text(&r.net))
        .collect::<Vec<_>>()
        .join(", ");
    let mut carved: Vec<&str> = Vec::new();
    for (i, r) in &mine {
        for earlier in &TABLE[..*i] {
            if let RangeClass::Group(other) = earlier.class {
                if other != g && r.net.contains(&earlier.net) && !carved.contains(&other.name()) {
                    carved.push(other.name());
                }
            }
        }
    }
    if !carved.is_empty() {
        text.push_str(&format!(" (excluding {})", carved.join(", ")));
    }
    text
}

/// The addresses in no group as text (`0.0.0.0/8, 255.255.255.255, ::`), without ranges that
/// lie inside another listed one.
pub(super) fn no_group_text() -> String {
    let none: Vec<&IpNet> = TABLE
        .iter()
        .filter(|r| matches!(r.class, RangeClass::NoGroup(_)))
        .map(|r| &r.net)
        .collect();
    none.iter()
        .filter(|n| !none.iter().any(|m| m != *n && m.contains(**n)))
        .map(|n| net_text(n))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry that lies inside a later one must come first; one that lies inside an earlier
    /// one would never be reached.
    #[test]
    fn every_entry_is_reachable() {
        for (i, r) in TABLE.iter().enumerate() {
            for earlier in &TABLE[..i] {
                assert!(
                    !earlier.net.contains(&r.net),
                    "{} is hidden by the earlier {}",
                    r.net,
                    earlier.net
                );
            }
            assert_eq!(r.net.trunc(), r.net, "{} has host bits", r.net);
            assert_ne!(r.class, RangeClass::Group(Group::Host));
            assert_ne!(r.class, RangeClass::Group(Group::Public));
        }
    }

    #[test]
    fn classify_edges() {
        let c = |s: &str| classify(s.parse().unwrap());
        assert_eq!(c("0.0.0.0"), UNSPECIFIED);
        assert_eq!(c("::"), UNSPECIFIED);
        assert_eq!(c("0.0.0.1"), THIS_NETWORK);
        assert_eq!(c("64:ff9b::1"), THIS_NETWORK);
        assert_eq!(c("255.255.255.255"), BROADCAST);
        assert_eq!(c("::ffff:255.255.255.255"), BROADCAST);
        assert_eq!(c("169.254.169.254"), METADATA);
        assert_eq!(c("169.254.169.253"), LINK_LOCAL);
        assert_eq!(c("fec0::1"), PRIVATE);
        assert_eq!(c("fe7f::1"), RangeClass::Group(Group::Public));
        assert_eq!(c("1.0.0.0"), RangeClass::Group(Group::Public));
    }

    #[test]
    fn group_nets_follow_the_table() {
        let nets = |g| {
            group_nets(g)
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(nets(Group::Loopback), ["127.0.0.0/8", "::1/128"]);
        assert_eq!(nets(Group::Metadata), ["169.254.169.254/32"]);
        assert!(nets(Group::Host).is_empty());
        assert!(nets(Group::Public).is_empty());
        assert_eq!(no_group_text(), "0.0.0.0/8, 255.255.255.255, ::");
    }
}
