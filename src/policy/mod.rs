//! The policy engine and the vocabulary every other layer shares.
//!
//! `policy` depends on nothing else in the crate: `config` (files, command line, validation)
//! depends on it and hands it a [`PolicyParts`] to build a [`Policy`] from
//! (`NetworkConfig::compile_policy`). The vocabulary: [`Action`], [`Protocol`], [`Direction`],
//! [`DenyAction`], [`Preset`], the rule words ([`RuleSpec`], [`Destination`], [`PortRange`],
//! [`RuleDirection`]), destination [`Group`]s with their address table ([`ranges`]),
//! [`canonical`] addresses and the host's own addresses ([`LocalAddrs`]).
//!
//! Theory of operation. [`Policy::new`] lays out one ordered rule list: the preset's rules
//! first (for `public-only` and `non-local`: DNS to the gateway over UDP and TCP 53, then the
//! allowed groups), then the custom rules in the order `config` gives them (the `policy`
//! table's, then the top-level `rules`, the command line's `--net-rule`s last).
//! [`Policy::decide`] then judges a [`FlowQuery`]:
//!
//! 1. The destination is canonicalised (`::ffff:10.0.0.1`, `64:ff9b::a00:1` and
//!    `2002:a00:1::` are `10.0.0.1`). The addresses in no group (unspecified, 0.0.0.0/8,
//!    255.255.255.255) are denied outright. Under the `none` preset everything is denied.
//! 2. Egress to a name in `deny_domains` / `deny_domain_suffixes` is denied.
//! 3. The first rule whose direction (`any` counts for both), destination, protocol and port
//!    all match decides.
//! 4. Otherwise the direction's default decides (egress deny, ingress allow, unless the preset
//!    or the config says otherwise).
//!
//! Every [`Decision`] carries a [`Reason`] that says which of these produced it; its `Display`
//! is what the decision log and `netfence check` print.

mod canonical;
mod domains;
mod group;
pub mod local;
pub mod ranges;
pub mod rule;
#[cfg(test)]
pub(crate) mod tests;
mod vocab;

use std::cell::OnceCell;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

pub use canonical::{canonical, embedded_ipv4};
pub use group::{group_names, group_of, guest_loopback, Group, HostAddrs, GUEST_LOOPBACK};
pub use local::LocalAddrs;
pub use rule::{parse_cidr, parse_domain, Destination, PortRange, RuleDirection, RuleSpec};
pub use vocab::{Action, DenyAction, Direction, Preset, Protocol};

use ranges::{NoGroup, RangeClass};

/// A new flow to judge.
#[derive(Clone, Copy, Debug)]
pub struct FlowQuery<'a> {
    pub direction: Direction,
    pub protocol: Protocol,
    /// Egress: the destination the guest addressed (before any address map). Ingress: the
    /// remote peer connecting to a published port.
    pub dst: IpAddr,
    /// Egress: the destination port. Ingress: the guest port being reached. `None` for ICMP.
    pub dst_port: Option<u16>,
    /// Names known for `dst` (from the guest's DNS answers or the TLS SNI), for domain rules.
    pub domains: &'a [String],
}

/// Why a decision came out as it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A rule matched. `index` is 1-based in the effective rule list (preset rules first), as
    /// `netfence config` prints it.
    Rule {
        index: usize,
        text: String,
        preset: Option<Preset>,
    },
    /// The flow's name is in `deny_domains`.
    DenyDomain(String),
    /// The flow's name is covered by `deny_domain_suffixes` (apex or subdomain).
    DenyDomainSuffix(String),
    /// No rule matched; the preset's own default for the direction decided.
    Preset {
        preset: Preset,
        direction: Direction,
        group: Option<Group>,
        action: Action,
    },
    /// No rule matched; the configured default decided.
    Default {
        direction: Direction,
        action: Action,
    },
    /// The `none` preset: nothing in or out.
    NetworkDisabled,
    /// 0.0.0.0 or :: (never reaches a host socket).
    Unspecified,
    /// 0.0.0.0/8 other than 0.0.0.0 ("this network"; never reaches a host socket).
    ThisNetwork,
    /// 255.255.255.255.
    Broadcast,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Rule {
                index,
                text,
                preset,
            } => {
                write!(f, "rule {index} {text:?}")?;
                if let Some(p) = preset {
                    write!(f, " (preset {p})")?;
                }
                Ok(())
            }
            Reason::DenyDomain(d) => write!(f, "deny_domains {d:?}"),
            Reason::DenyDomainSuffix(d) => write!(f, "deny_domain_suffixes \".{d}\""),
            Reason::Preset {
                preset,
                direction,
                group,
                action,
            } => {
                let verb = match action {
                    Action::Allow => "allowed",
                    Action::Deny => "blocked",
                };
                match (direction, group) {
                    (Direction::Egress, Some(g)) => write!(f, "preset {preset}: {g} {verb}"),
                    _ => write!(f, "preset {preset}: {direction} {verb}"),
                }
            }
            Reason::Default { direction, action } => write!(f, "default {direction} {action}"),
            Reason::NetworkDisabled => f.write_str("preset none: networking disabled"),
            Reason::Unspecified => f.write_str("unspecified address"),
            Reason::ThisNetwork => f.write_str("this-network address (0.0.0.0/8)"),
            Reason::Broadcast => f.write_str("broadcast address"),
        }
    }
}

/// The outcome for one flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: Reason,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.action == Action::Allow
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.action, self.reason)
    }
}

/// One rule ready for matching.
#[derive(Clone, Debug)]
pub struct CompiledRule {
    /// 1-based position in the effective list.
    pub index: usize,
    /// The preset that contributed this rule, if any.
    pub preset: Option<Preset>,
    pub spec: RuleSpec,
    pub text: String,
    pub action: Action,
    pub egress: bool,
    pub ingress: bool,
    pub dest: Destination,
    /// Empty = any.
    pub protocols: Vec<Protocol>,
    /// Empty = any.
    pub ports: Vec<PortRange>,
}

impl CompiledRule {
    fn new(index: usize, preset: Option<Preset>, spec: RuleSpec) -> Self {
        CompiledRule {
            index,
            preset,
            text: spec.to_string(),
            action: spec.action,
            egress: spec.direction != RuleDirection::Ingress,
            ingress: spec.direction != RuleDirection::Egress,
            dest: spec.dest(),
            protocols: spec.all_protocols(),
            ports: spec.all_ports(),
            spec,
        }
    }

    /// Whether this rule takes part in `dir`.
    pub fn applies_to(&self, dir: Direction) -> bool {
        match dir {
            Direction::Egress => self.egress,
            Direction::Ingress => self.ingress,
        }
    }

    /// Whether this rule matches `q`, whose destination is judged as `dst` (canonical) and
    /// whose group `group` computes (only when a group rule asks: it may probe the kernel).
    fn matches(
        &self,
        q: &FlowQuery,
        dst: IpAddr,
        group: &dyn Fn() -> Option<Group>,
        names: &[String],
    ) -> bool {
        if !self.applies_to(q.direction) {
            return false;
        }
        if !self.protocols.is_empty() && !self.protocols.contains(&q.protocol) {
            return false;
        }
        if !self.ports.is_empty() {
            match q.dst_port {
                Some(p) if self.ports.iter().any(|r| r.contains(p)) => {}
                _ => return false,
            }
        }
        dest_matches(&self.dest, q.dst, dst, group, names)
    }

    fn reason(&self) -> Reason {
        Reason::Rule {
            index: self.index,
            text: self.text.clone(),
            preset: self.preset,
        }
    }
}

/// `written` is the destination as the guest wrote it, `dst` its canonical form.
fn dest_matches(
    d: &Destination,
    written: IpAddr,
    dst: IpAddr,
    group: &dyn Fn() -> Option<Group>,
    names: &[String],
) -> bool {
    match d {
        Destination::Any => true,
        Destination::Ip(ip) => canonical(*ip) == dst,
        Destination::Cidr(net) => cidr_matches(net, written),
        Destination::Group(g) => group() == Some(*g),
        Destination::Domain(n) => names.iter().any(|x| x == n),
        Destination::Suffix(s) => names.iter().any(|x| suffix_matches(x, s)),
    }
}

/// A CIDR rule covers an address judged as the IPv4 address it carries, and also the address
/// as written (an IPv6 range rule such as `[2002::/16]` means what it says).
fn cidr_matches(net: &IpNet, written: IpAddr) -> bool {
    net.contains(&canonical(written)) || net.contains(&written)
}

/// `name` is `suffix` itself or a subdomain of it (both normalised).
pub fn suffix_matches(name: &str, suffix: &str) -> bool {
    name == suffix
        || (name.len() > suffix.len()
            && name.ends_with(suffix)
            && name.as_bytes()[name.len() - suffix.len() - 1] == b'.')
}

/// Lowercase, without a trailing dot.
pub fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// The rules a preset contributes, in order.
pub fn preset_rules(p: Preset) -> Vec<RuleSpec> {
    let dns = |proto: Protocol| {
        let mut r = RuleSpec::new(Action::Allow, Destination::Group(Group::Host));
        r.protocols = vec![proto];
        r.ports = vec![PortRange::single(53)];
        r
    };
    let allow = |g: Group| RuleSpec::new(Action::Allow, Destination::Group(g));
    match p {
        Preset::None | Preset::AllowAll => Vec::new(),
        Preset::PublicOnly => vec![dns(Protocol::Udp), dns(Protocol::Tcp), allow(Group::Public)],
        Preset::NonLocal => vec![
            dns(Protocol::Udp),
            dns(Protocol::Tcp),
            allow(Group::Public),
            allow(Group::Private),
        ],
    }
}

/// A compiled, immutable policy. Cheap to share between queue threads (`Send + Sync`).
#[derive(Clone, Debug)]
pub struct Policy {
    preset: Option<Preset>,
    default_egress: Action,
    default_ingress: Action,
    /// Whether each default is the preset's own (so reasons name the preset).
    preset_egress_default: bool,
    preset_ingress_default: bool,
    rules: Vec<CompiledRule>,
    deny_domains: Vec<String>,
    deny_suffixes: Vec<String>,
    deny_action: DenyAction,
    max_connections: Option<usize>,
    host: HostAddrs,
}

/// What a policy is built from: the policy part of a validated configuration with everything
/// implicit made explicit. `config` fills it in (`NetworkConfig::compile_policy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyParts {
    /// The preset in force; its rules come first.
    pub preset: Option<Preset>,
    pub default_egress: Action,
    pub default_ingress: Action,
    /// Whether each default is the preset's own (so reasons name the preset).
    pub preset_egress_default: bool,
    pub preset_ingress_default: bool,
    /// The custom rules, in order, after the preset's.
    pub rules: Vec<RuleSpec>,
    /// Exact names whose flows and resolution are denied (any case, trailing dot allowed).
    pub deny_domains: Vec<String>,
    /// Suffixes (without a leading `.` or `*.`) whose apex and subdomains are denied.
    pub deny_suffixes: Vec<String>,
    pub deny_action: DenyAction,
    pub max_connections: Option<usize>,
}

impl Policy {
    /// Builds the policy from its parts. `host` are the gateway addresses and how the host's
    /// own addresses are recognised (the `host` group).
    pub fn new(parts: PolicyParts, host: &HostAddrs) -> Policy {
        let mut rules = Vec::new();
        if let Some(p) = parts.preset {
            for spec in preset_rules(p) {
                rules.push(CompiledRule::new(rules.len() + 1, Some(p), spec));
            }
        }
        for spec in parts.rules {
            rules.push(CompiledRule::new(rules.len() + 1, None, spec));
        }
        Policy {
            preset: parts.preset,
            default_egress: parts.default_egress,
            default_ingress: parts.default_ingress,
            preset_egress_default: parts.preset_egress_default,
            preset_ingress_default: parts.preset_ingress_default,
            rules,
            deny_domains: parts
                .deny_domains
                .iter()
                .map(|d| normalize_name(d))
                .collect(),
            deny_suffixes: parts
                .deny_suffixes
                .iter()
                .map(|d| normalize_name(d))
                .collect(),
            deny_action: parts.deny_action,
            max_connections: parts.max_connections,
            host: host.clone(),
        }
    }

    /// Judges one new flow.
    pub fn decide(&self, q: &FlowQuery) -> Decision {
        let deny = |reason| Decision {
            action: Action::Deny,
            reason,
        };
        let dst = canonical(q.dst);
        if let RangeClass::NoGroup(why) = ranges::classify(dst) {
            return deny(match why {
                NoGroup::Unspecified => Reason::Unspecified,
                NoGroup::ThisNetwork => Reason::ThisNetwork,
                NoGroup::Broadcast => Reason::Broadcast,
            });
        }
        if self.preset == Some(Preset::None) {
            return deny(Reason::NetworkDisabled);
        }
        let names: Vec<String> = q.domains.iter().map(|d| normalize_name(d)).collect();
        if q.direction == Direction::Egress {
            if let Some(r) = self.listed_domain(&names) {
                return deny(r);
            }
        }
        let group_cell = OnceCell::new();
        let group = || *group_cell.get_or_init(|| group_of(q.dst, &self.host));
        if let Some(rule) = self
            .rules
            .iter()
            .find(|r| r.matches(q, dst, &group, &names))
        {
            return Decision {
                action: rule.action,
                reason: rule.reason(),
            };
        }
        let (action, from_preset) = match q.direction {
            Direction::Egress => (self.default_egress, self.preset_egress_default),
            Direction::Ingress => (self.default_ingress, self.preset_ingress_default),
        };
        let reason = match self.preset {
            Some(preset) if from_preset => Reason::Preset {
                preset,
                direction: q.direction,
                group: group(),
                action,
            },
            _ => Reason::Default {
                direction: q.direction,
                action,
            },
        };
        Decision { action, reason }
    }

    fn listed_domain(&self, names: &[String]) -> Option<Reason> {
        for n in names {
            if self.deny_domains.iter().any(|d| d == n) {
                return Some(Reason::DenyDomain(n.clone()));
            }
            if let Some(s) = self.deny_suffixes.iter().find(|s| suffix_matches(n, s)) {
                return Some(Reason::DenyDomainSuffix(s.clone()));
            }
        }
        None
    }

    /// Whether the guest may not resolve `name` (NXDOMAIN): `deny_domains`,
    /// `deny_domain_suffixes`, or a deny rule of kind domain/suffix without protocol or port
    /// filter that no earlier allow rule for the name precedes. Case-insensitive; a trailing
    /// dot is ignored.
    pub fn domain_denied(&self, name: &str) -> Option<Reason> {
        if self.preset == Some(Preset::None) {
            return Some(Reason::NetworkDisabled);
        }
        let n = normalize_name(name);
        if let Some(r) = self.listed_domain(std::slice::from_ref(&n)) {
            return Some(r);
        }
        for r in self.rules.iter().filter(|r| r.egress) {
            let hit = match &r.dest {
                Destination::Domain(d) => *d == n,
                Destination::Suffix(s) => suffix_matches(&n, s),
                _ => false,
            };
            if !hit {
                continue;
            }
            match r.action {
                Action::Allow => return None,
                Action::Deny if r.protocols.is_empty() && r.ports.is_empty() => {
                    return Some(r.reason())
                }
                Action::Deny => {}
            }
        }
        None
    }

    /// Whether an egress allow rule names `ip` exactly or a CIDR containing it (rebind
    /// protection lets such answers through).
    pub fn explicitly_allows_ip(&self, ip: IpAddr) -> bool {
        let judged = canonical(ip);
        self.rules.iter().any(|r| {
            r.action == Action::Allow
                && r.egress
                && match &r.dest {
                    Destination::Ip(x) => canonical(*x) == judged,
                    Destination::Cidr(net) => cidr_matches(net, ip),
                    _ => false,
                }
        })
    }

    pub fn deny_action(&self) -> DenyAction {
        self.deny_action
    }

    pub fn max_connections(&self) -> Option<usize> {
        self.max_connections
    }

    /// The preset in force (`public-only` when nothing was configured).
    pub fn preset(&self) -> Option<Preset> {
        self.preset
    }

    /// False under the `none` preset: the guest gets no network at all.
    pub fn network_enabled(&self) -> bool {
        self.preset != Some(Preset::None)
    }

    /// The default action for a direction.
    pub fn default_action(&self, dir: Direction) -> Action {
        match dir {
            Direction::Egress => self.default_egress,
            Direction::Ingress => self.default_ingress,
        }
    }

    /// The effective rules, preset rules first.
    pub fn rules(&self) -> &[CompiledRule] {
        &self.rules
    }

    /// The gateway addresses this policy calls `host`.
    pub fn host_addrs(&self) -> &HostAddrs {
        &self.host
    }
}
