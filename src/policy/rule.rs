//! One policy rule as the user writes it: in a config file (the reference's wire names) or on
//! the command line (`action[:direction]@target[:proto[:ports]]`). This is the rule vocabulary
//! the engine matches on; `config` parses whole files and re-exports these names.
//!
//! Parsing is strict: a target that is neither `*`/`any`, an IP, a CIDR without host bits, a
//! group name, a `.suffix` nor a domain of at least two valid labels is an error, so that a
//! misspelt group (`publc`) never silently becomes a domain rule.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{canonical, group_names, Action, Group, Protocol};

/// Which evaluator considers a rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleDirection {
    /// Traffic leaving the guest (the default).
    #[default]
    #[serde(alias = "outbound")]
    Egress,
    /// Traffic entering the guest through published ports.
    #[serde(alias = "inbound")]
    Ingress,
    /// Both directions.
    Any,
}

impl RuleDirection {
    pub fn name(self) -> &'static str {
        match self {
            RuleDirection::Egress => "egress",
            RuleDirection::Ingress => "ingress",
            RuleDirection::Any => "any",
        }
    }
}

impl FromStr for RuleDirection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "egress" | "outbound" | "out" => Ok(RuleDirection::Egress),
            "ingress" | "inbound" | "in" => Ok(RuleDirection::Ingress),
            "any" | "*" => Ok(RuleDirection::Any),
            _ => Err(format!(
                "unknown direction `{s}`; expected egress, ingress or any"
            )),
        }
    }
}

impl fmt::Display for RuleDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a rule matches against: the reference's `destination` (string shorthand or the typed
/// `{kind, value}` table of `NetworkDestination`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// `*` or `any`: every address.
    Any,
    /// One exact address (stored canonical: a mapped IPv6 address becomes IPv4).
    Ip(IpAddr),
    /// An address range with no host bits set.
    Cidr(IpNet),
    /// An exact domain name, lowercase, without trailing dot.
    Domain(String),
    /// A domain suffix, written `.example.com`: the apex and every subdomain. Stored lowercase
    /// without the leading dot.
    Suffix(String),
    /// A well-known group.
    Group(Group),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Any => f.write_str("*"),
            Destination::Ip(ip) => write!(f, "{ip}"),
            Destination::Cidr(net) => write!(f, "{net}"),
            Destination::Domain(d) => f.write_str(d),
            Destination::Suffix(s) => write!(f, ".{s}"),
            Destination::Group(g) => write!(f, "{g}"),
        }
    }
}

const DEST_ACCEPTED: &str = "`*`/`any`, an IP (1.2.3.4, 2001:db8::1), a CIDR (10.0.0.0/8), a group \
     (host, metadata, loopback, private, link-local, multicast, public), a domain (api.example.com) \
     or a suffix (.example.com)";

impl FromStr for Destination {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(format!("empty destination; expected {DEST_ACCEPTED}"));
        }
        if s == "*" || s.eq_ignore_ascii_case("any") {
            return Ok(Destination::Any);
        }
        if let Ok(g) = s.parse::<Group>() {
            return Ok(Destination::Group(g));
        }
        let unbracketed = s
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(s);
        if unbracketed.contains('/') {
            return parse_cidr(unbracketed).map(Destination::Cidr);
        }
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(Destination::Ip(canonical(ip)));
        }
        if s.contains(':') {
            return Err(format!("`{raw}` is not a valid IP address"));
        }
        if let Some(rest) = s.strip_prefix("*.").or_else(|| s.strip_prefix('.')) {
            return parse_domain(rest)
                .map(Destination::Suffix)
                .map_err(|e| format!("invalid domain suffix `{raw}`: {e}"));
        }
        if !s.contains('.') && !s.ends_with('.') {
            return Err(format!(
                "unknown group `{raw}`; groups are: {}; a domain needs at least two labels \
                 (example.com), an IP or CIDR must be written in full",
                group_names()
            ));
        }
        parse_domain(s)
            .map(Destination::Domain)
            .map_err(|e| format!("invalid destination `{raw}`: {e}; expected {DEST_ACCEPTED}"))
    }
}

/// Parses a CIDR and rejects host bits and bad prefixes with a message that says what to write.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not a CIDR; expected ADDRESS/PREFIX like 10.0.0.0/8"))?;
    let ip: IpAddr = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| {
            format!(
                "`{s}`: `{addr}` is not an IP address; expected a CIDR like 10.0.0.0/8 or fc00::/7"
            )
        })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = prefix
        .parse()
        .ok()
        .filter(|&l: &u8| l <= max)
        .ok_or_else(|| {
            format!("`{s}`: bad prefix length `{prefix}`; expected 0-{max} for this address family")
        })?;
    let net = IpNet::new(ip, len).map_err(|e| format!("`{s}`: {e}"))?;
    if net.trunc() != net {
        return Err(format!(
            "`{s}` has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    // Policy judges IPv4-mapped addresses as IPv4, so a mapped range is an IPv4 range.
    if let IpNet::V6(v6) = net {
        if let (true, Some(v4)) = (v6.prefix_len() >= 96, v6.network().to_ipv4_mapped()) {
            let v4net = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_err(|e| e.to_string())?;
            return Ok(IpNet::V4(v4net));
        }
    }
    Ok(net)
}

/// Validates a domain name and returns it lowercase without a trailing dot. A name needs at
/// least two labels; labels are 1-63 letters, digits, `-` or `_`, not starting or ending with
/// `-`; the whole name is at most 253 characters; the last label is not all digits.
pub fn parse_domain(s: &str) -> Result<String, String> {
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if name.is_empty() {
        return Err("empty domain name".into());
    }
    if name.len() > 253 {
        return Err(format!("`{s}` is longer than 253 characters"));
    }
    let labels: Vec<&str> = name.split('.').collect();
    for label in &labels {
        if label.is_empty() {
            return Err(format!("`{s}` has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!(
                "`{s}`: label `{label}` is longer than 63 characters"
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "`{s}`: label `{label}` may hold only letters, digits, `-` and `_`"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("`{s}`: label `{label}` starts or ends with `-`"));
        }
    }
    if labels.len() < 2 {
        return Err(format!(
            "`{s}` is a single label; a domain needs at least two (example.com)"
        ));
    }
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "`{s}` looks like an IP address but is not a valid one"
        ));
    }
    Ok(name)
}

impl Serialize for Destination {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Destination;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a destination string or a {{kind, value}} table")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Destination, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Destination, A::Error> {
                let t = TypedDestination::deserialize(de::value::MapAccessDeserializer::new(map))?;
                t.into_destination().map_err(de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The reference's `NetworkDestination { kind, value }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedDestination {
    kind: String,
    #[serde(default)]
    value: Option<String>,
}

impl TypedDestination {
    fn into_destination(self) -> Result<Destination, String> {
        let kind = self.kind.to_ascii_lowercase().replace('-', "_");
        let need = |v: Option<String>| {
            v.ok_or_else(|| format!("destination kind `{}` needs a `value`", self.kind))
        };
        match kind.as_str() {
            "any" => match self.value.as_deref() {
                None | Some("") | Some("*") => Ok(Destination::Any),
                Some(v) => Err(format!("destination kind `any` takes no value, got `{v}`")),
            },
            "ip" => {
                let v = need(self.value)?;
                let raw = v.trim_start_matches('[').trim_end_matches(']');
                raw.parse::<IpAddr>()
                    .map(|ip| Destination::Ip(canonical(ip)))
                    .map_err(|_| format!("`{v}` is not an IP address (kind `ip`)"))
            }
            "cidr" => parse_cidr(&need(self.value)?).map(Destination::Cidr),
            "domain" => {
                let v = need(self.value)?;
                parse_domain(&v)
                    .map(Destination::Domain)
                    .map_err(|e| format!("invalid domain: {e}"))
            }
            "domain_suffix" | "suffix" => {
                let v = need(self.value)?;
                let rest = v
                    .strip_prefix("*.")
                    .or_else(|| v.strip_prefix('.'))
                    .unwrap_or(&v);
                parse_domain(rest)
                    .map(Destination::Suffix)
                    .map_err(|e| format!("invalid domain suffix: {e}"))
            }
            "group" => need(self.value)?.parse().map(Destination::Group),
            _ => Err(format!(
                "unknown destination kind `{}`; expected any, ip, cidr, domain, domain_suffix or group",
                self.kind
            )),
        }
    }
}

/// An inclusive port range; a single port has `start == end`. Valid ports are 1-65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn single(p: u16) -> Self {
        PortRange { start: p, end: p }
    }
    pub fn contains(&self, p: u16) -> bool {
        self.start <= p && p <= self.end
    }
    /// Whether `other` lies wholly inside this range.
    pub fn covers(&self, other: &PortRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }
    /// Why this range is invalid, if it is.
    pub fn problem(&self) -> Option<String> {
        if self.start == 0 || self.end == 0 {
            Some(format!("port `{self}` is out of range; expected 1-65535"))
        } else if self.start > self.end {
            Some(format!(
                "port range `{}-{}` is reversed; write {}-{}",
                self.start, self.end, self.end, self.start
            ))
        } else {
            None
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

fn parse_port(s: &str, whole: &str) -> Result<u16, String> {
    let t = s.trim();
    match t.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        Ok(_) => Err(format!("port `{whole}` is out of range; expected 1-65535")),
        Err(_) => Err(format!(
            "`{whole}` is not a port; expected a number 1-65535 or a range like 8000-9000"
        )),
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let r = match s.split_once('-') {
            Some((a, b)) => PortRange {
                start: parse_port(a, s)?,
                end: parse_port(b, s)?,
            },
            None => PortRange::single(parse_port(s, s)?),
        };
        match r.problem() {
            Some(p) => Err(p),
            None => Ok(r),
        }
    }
}

/// A single port serializes as a number, a range as `"8000-9000"`.
impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.start == self.end {
            s.serialize_u16(self.start)
        } else {
            s.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a port (443) or a range (\"8000-9000\")")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
                if (1..=65535).contains(&v) {
                    Ok(PortRange::single(v as u16))
                } else {
                    Err(E::custom(format!(
                        "port `{v}` is out of range; expected 1-65535"
                    )))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                if v < 0 {
                    return Err(E::custom(format!(
                        "port `{v}` is out of range; expected 1-65535"
                    )));
                }
                self.visit_u64(v as u64)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// One rule of the policy, in the reference's wire shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub action: Action,
    #[serde(default)]
    pub direction: RuleDirection,
    /// `None` matches any destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    /// Legacy single protocol; merged with `protocols`. Neither set = any protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<Protocol>,
    /// Legacy single port or range; merged with `ports`. Neither set = any port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
}

impl RuleSpec {
    /// A rule with only an action and a destination (egress, any protocol, any port).
    pub fn new(action: Action, destination: Destination) -> Self {
        RuleSpec {
            action,
            direction: RuleDirection::Egress,
            destination: Some(destination),
            protocol: None,
            protocols: Vec::new(),
            port: None,
            ports: Vec::new(),
        }
    }

    /// `protocol` and `protocols` merged, deduplicated, in order. Empty = any.
    pub fn all_protocols(&self) -> Vec<Protocol> {
        let mut v: Vec<Protocol> = Vec::new();
        for p in self.protocol.iter().chain(self.protocols.iter()) {
            if !v.contains(p) {
                v.push(*p);
            }
        }
        v
    }

    /// `port` and `ports` merged, in order. Empty = any.
    pub fn all_ports(&self) -> Vec<PortRange> {
        let mut v: Vec<PortRange> = Vec::new();
        for p in self.port.iter().chain(self.ports.iter()) {
            if !v.contains(p) {
                v.push(*p);
            }
        }
        v
    }

    /// The destination, `Any` when unset.
    pub fn dest(&self) -> Destination {
        self.destination.clone().unwrap_or(Destination::Any)
    }

    /// Parses one rule of the command-line grammar `action[:direction]@target[:proto[:ports]]`.
    /// `proto` is `tcp`, `udp`, `icmpv4`, `icmpv6` or `any`/`*`, several joined with `+`
    /// (`tcp+udp`); `ports` is a port or range, several joined with `+` (`80+443+8000-9000`).
    /// An IPv6 target is written in brackets when a protocol follows: `[2001:db8::/32]:tcp:443`.
    pub fn parse_cli(s: &str) -> Result<RuleSpec, String> {
        let s = s.trim();
        let (head, target_part) = s.split_once('@').ok_or_else(|| {
            format!(
                "rule `{s}` has no `@`; expected action[:direction]@target[:proto[:ports]], \
                 e.g. allow@public:tcp:443"
            )
        })?;
        let (action_s, dir_s) = match head.split_once(':') {
            Some((a, d)) => (a, Some(d)),
            None => (head, None),
        };
        let action: Action = action_s.parse().map_err(|e| format!("rule `{s}`: {e}"))?;
        let direction = match dir_s {
            Some(d) => d.parse().map_err(|e| format!("rule `{s}`: {e}"))?,
            None => RuleDirection::Egress,
        };
        // Split the target from the protocol and ports. An IPv6 literal either comes in
        // brackets or is the whole remainder.
        let (target, rest): (&str, Option<&str>) =
            if let Some(inner) = target_part.strip_prefix('[') {
                let close = inner
                    .find(']')
                    .ok_or_else(|| format!("rule `{s}`: `[` without `]` in the target"))?;
                let after = &inner[close + 1..];
                let rest = if after.is_empty() {
                    None
                } else {
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| format!("rule `{s}`: expected `:` after `]`"))?,
                    )
                };
                (&inner[..close], rest)
            } else if target_part.matches(':').count() >= 2
                && target_part
                    .split('/')
                    .next()
                    .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
            {
                (target_part, None)
            } else {
                match target_part.split_once(':') {
                    Some((t, r)) => (t, Some(r)),
                    None => (target_part, None),
                }
            };
        let destination: Destination = target.parse().map_err(|e| format!("rule `{s}`: {e}"))?;
        let mut rule = RuleSpec::new(action, destination);
        rule.direction = direction;
        if let Some(rest) = rest {
            let (proto_s, ports_s) = match rest.split_once(':') {
                Some((p, q)) => (p, Some(q)),
                None => (rest, None),
            };
            if !(proto_s.is_empty() || proto_s == "*" || proto_s.eq_ignore_ascii_case("any")) {
                for p in proto_s.split('+') {
                    let p: Protocol = p.parse().map_err(|e| format!("rule `{s}`: {e}"))?;
                    if !rule.protocols.contains(&p) {
                        rule.protocols.push(p);
                    }
                }
            }
            if let Some(ports_s) = ports_s {
                if ports_s.contains(':') {
                    return Err(format!(
                        "rule `{s}`: too many `:`; expected action[:direction]@target[:proto[:ports]]"
                    ));
                }
                if !(ports_s == "*" || ports_s.eq_ignore_ascii_case("any")) {
                    for p in ports_s.split('+') {
                        rule.ports
                            .push(p.parse().map_err(|e| format!("rule `{s}`: {e}"))?);
                    }
                }
            }
        }
        if let Some(p) = rule.problem() {
            return Err(format!("rule `{s}`: {p}"));
        }
        Ok(rule)
    }

    /// Why this rule is invalid, if it is (ICMP in an ingress rule, bad port ranges).
    pub fn problem(&self) -> Option<String> {
        if self.direction != RuleDirection::Egress {
            if let Some(p) = self.all_protocols().into_iter().find(|p| p.is_icmp()) {
                return Some(format!(
                    "{p} is not allowed in a rule with direction `{}`: the host has no inbound ICMP \
                     path; use direction egress for ICMP rules",
                    self.direction
                ));
            }
        }
        self.all_ports().iter().find_map(|r| r.problem())
    }

    /// Splits a `--net-rule` value (comma list) into rules.
    pub fn parse_cli_list(s: &str) -> Result<Vec<RuleSpec>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(RuleSpec::parse_cli)
            .collect()
    }
}

/// The command-line form: `allow@public:tcp:443`, `deny:ingress@10.0.0.0/8`.
impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.action)?;
        if self.direction != RuleDirection::Egress {
            write!(f, ":{}", self.direction)?;
        }
        let dest = self.dest();
        let protos = self.all_protocols();
        let ports = self.all_ports();
        match &dest {
            Destination::Ip(IpAddr::V6(_)) | Destination::Cidr(IpNet::V6(_))
                if !protos.is_empty() || !ports.is_empty() =>
            {
                write!(f, "@[{dest}]")?
            }
            _ => write!(f, "@{dest}")?,
        }
        if protos.is_empty() && ports.is_empty() {
            return Ok(());
        }
        if protos.is_empty() {
            f.write_str(":*")?;
        } else {
            let p: Vec<&str> = protos.iter().map(|p| p.name()).collect();
            write!(f, ":{}", p.join("+"))?;
        }
        if !ports.is_empty() {
            let p: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
            write!(f, ":{}", p.join("+"))?;
        }
        Ok(())
    }
}

impl FromStr for RuleSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RuleSpec::parse_cli(s)
    }
}
