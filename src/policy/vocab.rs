//! The words every layer shares: the direction and protocol of a flow, allow/deny, what a
//! denied flow gets, and the canned policy shapes (presets). `config` parses them from files
//! and the command line; the engine, the datapath and the explain commands use them as is.

use std::fmt;
use std::str::FromStr;

use serde::de;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Direction of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the guest outwards.
    Egress,
    /// Into the guest (published ports).
    Ingress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Direction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "egress" | "outbound" | "out" => Ok(Direction::Egress),
            "ingress" | "inbound" | "in" => Ok(Direction::Ingress),
            _ => Err(format!(
                "unknown direction `{s}`; expected egress or ingress"
            )),
        }
    }
}

/// Transport protocol of a flow or a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmpv4,
    Icmpv6,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmpv4 => "icmpv4",
            Protocol::Icmpv6 => "icmpv6",
        }
    }
    pub fn is_icmp(self) -> bool {
        matches!(self, Protocol::Icmpv4 | Protocol::Icmpv6)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmpv4" => Ok(Protocol::Icmpv4),
            "icmpv6" => Ok(Protocol::Icmpv6),
            _ => Err(format!(
                "unknown protocol `{s}`; expected tcp, udp, icmpv4 or icmpv6"
            )),
        }
    }
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            _ => Err(format!("unknown action `{s}`; expected allow or deny")),
        }
    }
}

/// What a denied flow gets. The reference denies silently; `reject` makes clients fail fast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DenyAction {
    /// Drop silently (the default).
    #[default]
    Drop,
    /// Answer with TCP RST or ICMP unreachable.
    Reject,
}

/// A canned policy shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    /// Nothing in or out.
    None,
    /// DNS to the gateway, then public egress; private, loopback, link-local, metadata, host
    /// and multicast blocked. The default.
    PublicOnly,
    /// Everything, the host included.
    AllowAll,
    /// DNS to the gateway, public and private/LAN egress; loopback, link-local, metadata, host
    /// and multicast blocked.
    NonLocal,
}

impl Preset {
    pub const ALL: [Preset; 4] = [
        Preset::None,
        Preset::PublicOnly,
        Preset::AllowAll,
        Preset::NonLocal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::None => "none",
            Preset::PublicOnly => "public-only",
            Preset::AllowAll => "allow-all",
            Preset::NonLocal => "non-local",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let n = s.trim().to_ascii_lowercase().replace('_', "-");
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == n)
            .ok_or_else(|| {
                format!(
                    "unknown policy preset `{s}`; expected none, public-only, allow-all or non-local \
                     (or a table {{ default_egress, default_ingress, rules }})"
                )
            })
    }
}

impl Serialize for Preset {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Preset {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}
