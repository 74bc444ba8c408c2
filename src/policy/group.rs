//! Destination groups: the named address classes of the reference's policy model.
//!
//! Every address belongs to at most one group, chosen by specificity: `host` (the gateway
//! addresses netfence answers on, which it maps to the host's loopback, and the host's own
//! addresses), then the fixed ranges of [`super::ranges`] (`metadata`, `loopback`, `private`,
//! `link-local`, `multicast`), and finally `public`, which is everything else. The addresses
//! the table puts in no group (unspecified, 0.0.0.0/8, 255.255.255.255) never reach a host
//! socket. An IPv6 spelling of an IPv4 address (mapped, compatible, NAT64, 6to4) is judged as
//! the IPv4 address it carries ([`super::canonical`]), so no group can be bypassed by spelling.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::canonical;
use super::local::LocalAddrs;
use super::ranges::{self, RangeClass};

/// A well-known destination group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Group {
    /// The host machine: the gateway addresses (`host.microsandbox.internal`) and the host's own
    /// addresses (its interfaces' addresses, which reach services bound to 0.0.0.0 or [::]).
    Host,
    /// Cloud metadata endpoints (169.254.169.254).
    Metadata,
    /// The guest's own loopback (127.0.0.0/8, ::1), not the host's.
    Loopback,
    /// RFC 1918, CGN, ULA and site-local space (10/8, 172.16/12, 192.168/16, 100.64/10,
    /// fc00::/7, fec0::/10).
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

    /// The address ranges of this group as text, for messages and `--help`; generated from
    /// the address table.
    pub fn describe(self) -> String {
        match self {
            Group::Host => {
                "the gateway addresses and the host's own addresses (the host machine)".into()
            }
            Group::Public => format!(
                "every address in no other group ({} are in none)",
                ranges::no_group_text()
            ),
            g => ranges::group_text(g),
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

/// The members of the `host` group: the gateway addresses, and how the host's own addresses
/// are recognised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAddrs {
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
    /// The host's own addresses (`LocalAddrs::System` when running; none by default).
    pub local: LocalAddrs,
}

impl HostAddrs {
    /// Every gateway address, IPv4 first.
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.ipv4.iter().map(|a| IpAddr::V4(*a));
        v4.chain(self.ipv6.iter().map(|a| IpAddr::V6(*a)))
    }

    /// Whether `ip`, in any spelling, is one of the gateway addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let judged = canonical(ip);
        self.addrs().any(|a| a == ip || canonical(a) == judged)
    }

    /// The same gateway addresses with another way of recognising the host's own addresses.
    pub fn with_local(mut self, local: LocalAddrs) -> Self {
        self.local = local;
        self
    }
}

/// The group an address belongs to, judged as its canonical form; `None` for the addresses in
/// no group (unspecified, 0.0.0.0/8, 255.255.255.255, in any spelling). A private or public
/// address that is one of the host's own (`host.local`, as written and as judged) is `host`.
pub fn group_of(ip: IpAddr, host: &HostAddrs) -> Option<Group> {
    let judged = canonical(ip);
    let group = match ranges::classify(judged) {
        RangeClass::NoGroup(_) => return None,
        RangeClass::Group(g) => g,
    };
    if host.contains(ip) {
        return Some(Group::Host);
    }
    // Only where the answer can change the group: private and public addresses, and IPv4
    // link-local ones (a host can carry one: zeroconf, container runtimes, Kubernetes'
    // node-local DNS cache at 169.254.20.10). An IPv6 link-local address needs a scope to be
    // dialled at all, so it never reaches a host service and is not asked about.
    let may_be_local = match group {
        Group::Private | Group::Public => true,
        Group::LinkLocal => judged.is_ipv4(),
        _ => false,
    };
    if may_be_local {
        // A 6to4 or NAT64 address may itself be configured on the host: probe the written
        // form too (a mapped one is the same socket address as the IPv4 one).
        let written_differs = match ip {
            IpAddr::V6(v6) => judged != ip && v6.to_ipv4_mapped().is_none(),
            IpAddr::V4(_) => false,
        };
        if host.local.is_local(judged) || (written_differs && host.local.is_local(ip)) {
            return Some(Group::Host);
        }
    }
    Some(group)
}

/// The reason of a flow to the guest's own loopback that the policy allowed.
pub const GUEST_LOOPBACK: &str =
    "loopback is the guest's own, never the host's (allow `host` to reach the host)";

/// Whether `ip`, in any spelling, is in the `loopback` group: the guest's *own* 127.0.0.0/8
/// and ::1 (the reference: "not the host"), which a real guest never puts on the wire. A flow
/// there is never carried, whatever the policy says about `loopback`: its host socket would
/// reach the host's loopback, so `allow@loopback` (or a default allow beside `deny@host`)
/// would open every host service bound to localhost. The host is reached through the
/// gateway addresses (`host`).
pub fn guest_loopback(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}
