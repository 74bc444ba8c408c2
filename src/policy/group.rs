//! Destination groups: the named address classes of the reference's policy model.
//!
//! Every address belongs to exactly one group, chosen by specificity: `host` (the gateway
//! addresses netfence answers on, which it maps to the host's loopback), then `metadata`,
//! `loopback`, `private`, `link-local`, `multicast`, and finally `public`, which is everything
//! else. The unspecified addresses (`0.0.0.0`, `::`) are in no group: they never reach a host
//! socket. An IPv4-mapped (`::ffff:a.b.c.d`) or IPv4-compatible (`::a.b.c.d`) IPv6 address is
//! judged as the IPv4 address it carries, so no group can be bypassed by spelling.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A well-known destination group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Group {
    /// The host machine, reached through the gateway addresses (`host.microsandbox.internal`).
    Host,
    /// Cloud metadata endpoints (169.254.169.254).
    Metadata,
    /// The guest's own loopback (127.0.0.0/8, ::1), not the host's.
    Loopback,
    /// RFC 1918, CGN and ULA space (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7).
    Private,
    /// Link-local (169.254/16, fe80::/10), excluding metadata.
    #[serde(alias = "link_local")]
    LinkLocal,
    /// Multicast (224/4, ff00::/8).
    Multicast,
    /// Every address in no other group.
    Public,
}

impl Group {
    /// All groups, most specific first.
    pub const ALL: [Group; 7] = [
        Group::Host,
        Group::Metadata,
        Group::Loopback,
        Group::Private,
        Group::LinkLocal,
        Group::Multicast,
        Group::Public,
    ];

    /// The name the reference uses for this group.
    pub fn name(self) -> &'static str {
        match self {
            Group::Host => "host",
            Group::Metadata => "metadata",
            Group::Loopback => "loopback",
            Group::Private => "private",
            Group::LinkLocal => "link-local",
            Group::Multicast => "multicast",
            Group::Public => "public",
        }
    }

    /// The address ranges of this group as text, for messages and `--help`.
    pub fn describe(self) -> &'static str {
        match self {
            Group::Host => "the gateway addresses (the host machine)",
            Group::Metadata => "169.254.169.254",
            Group::Loopback => "127.0.0.0/8, ::1",
            Group::Private => "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7",
            Group::LinkLocal => "169.254.0.0/16, fe80::/10 (excluding metadata)",
            Group::Multicast => "224.0.0.0/4, ff00::/8",
            Group::Public => "every address in no other group",
        }
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Group {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        let norm = lower.replace('_', "-");
        Group::ALL
            .into_iter()
            .find(|g| g.name() == norm)
            .ok_or_else(|| format!("unknown group `{s}`; groups are: {}", group_names()))
    }
}

/// The group names joined for messages: `host, metadata, ...`.
pub fn group_names() -> String {
    Group::ALL
        .iter()
        .map(|g| g.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The addresses of the gateway, i.e. the members of the `host` group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAddrs {
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
}

impl HostAddrs {
    /// Every gateway address, IPv4 first.
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.ipv4.iter().map(|a| IpAddr::V4(*a));
        v4.chain(self.ipv6.iter().map(|a| IpAddr::V6(*a)))
    }

    /// Whether `ip` (already canonical) is one of the gateway addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match canonical(ip) {
            IpAddr::V4(v4) => self.ipv4.contains(&v4),
            IpAddr::V6(v6) => self.ipv6.contains(&v6),
        }
    }
}

/// The address as policy judges it: an IPv4-mapped or IPv4-compatible IPv6 address becomes the
/// IPv4 address it carries (`::` and `::1` stay IPv6: they are not compatible addresses).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            let compat = s[..6].iter().all(|&x| x == 0);
            if compat && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST {
                let o = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            ip
        }
    }
}

/// The group an address belongs to; `None` for the unspecified addresses (0.0.0.0, ::) and for
/// mapped/compatible spellings of 0.0.0.0.
pub fn group_of(ip: IpAddr, host: &HostAddrs) -> Option<Group> {
    let ip = canonical(ip);
    if ip.is_unspecified() {
        return None;
    }
    if host.contains(ip) {
        return Some(Group::Host);
    }
    Some(match ip {
        IpAddr::V4(v4) => v4_group(v4),
        IpAddr::V6(v6) => v6_group(v6),
    })
}

fn v4_group(ip: Ipv4Addr) -> Group {
    let o = ip.octets();
    if o == [169, 254, 169, 254] {
        Group::Metadata
    } else if o[0] == 127 {
        Group::Loopback
    } else if o[0] == 10
        || (o[0] == 172 && (o[1] & 0xf0) == 16)
        || (o[0] == 192 && o[1] == 168)
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
    {
        Group::Private
    } else if o[0] == 169 && o[1] == 254 {
        Group::LinkLocal
    } else if (o[0] & 0xf0) == 224 {
        Group::Multicast
    } else {
        Group::Public
    }
}

fn v6_group(ip: Ipv6Addr) -> Group {
    let s0 = ip.segments()[0];
    if ip == Ipv6Addr::LOCALHOST {
        Group::Loopback
    } else if (s0 & 0xfe00) == 0xfc00 {
        Group::Private
    } else if (s0 & 0xffc0) == 0xfe80 {
        Group::LinkLocal
    } else if (s0 & 0xff00) == 0xff00 {
        Group::Multicast
    } else {
        Group::Public
    }
}
