//! `netfence check`, `lint` and `config`: explain a policy without running a guest.
//!
//! - `check` judges one flow and prints the decision and the rule (or default) behind it;
//!   exit 0 allow, 1 deny.
//! - `lint` reports rules that can never match because an earlier rule of the same direction
//!   covers them (preset rules included), rules that contradict the preset, and rules whose
//!   ports can never match; exit 1 if it finds any.
//! - `config` prints the effective configuration (presets expanded, command line merged) as
//!   TOML that `--config` accepts and that decides every flow the same way.
//!
//! All three exit 2 on a configuration error, with the message on stderr.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::config::cli::NetworkArgs;
use crate::config::{
    self, AddressMapEntry, ConfigError, Destination, NetworkConfig, PolicySpec, PolicyTable, Preset,
};
use crate::policy::{
    canonical, group_of, suffix_matches, Action, CompiledRule, Direction, FlowQuery, Group,
    HostAddrs, Policy, Protocol,
};

fn parse_direction(s: &str) -> Result<Direction, String> {
    s.parse()
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    s.parse()
}

/// `IP`, `IP:PORT`, `[IPv6]:PORT` or bare IPv6.
pub fn parse_endpoint(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!("`{s}`: port 0 is not allowed; expected 1-65535"));
        }
        return Ok((sa.ip(), Some(sa.port())));
    }
    Err(format!(
        "`{s}` is not IP[:PORT]; expected e.g. 203.0.113.7:443, [2001:db8::1]:443 or 10.0.0.1"
    ))
}

/// `netfence check`: judge one flow.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  netfence check --config net.toml egress tcp 203.0.113.7:443 --domain api.example.com\n  netfence check --policy non-local egress udp 192.168.1.10:53\n  netfence check --net-rule allow:ingress@127.0.0.1 ingress tcp 127.0.0.1:8080"
)]
pub struct CheckArgs {
    #[command(flatten)]
    pub net: NetworkArgs,
    /// egress or ingress
    #[arg(value_parser = parse_direction)]
    pub direction: Direction,
    /// tcp, udp, icmpv4 or icmpv6
    #[arg(value_parser = parse_protocol)]
    pub protocol: Protocol,
    /// Destination IP[:PORT] ([IPv6]:PORT); for ingress, the remote peer and the guest port
    pub destination: String,
    /// A name the destination was resolved from (repeatable), for domain rules
    #[arg(long = "domain", value_name = "NAME")]
    pub domains: Vec<String>,
    /// Guest slot whose gateway addresses form the `host` group
    #[arg(long, default_value_t = 0)]
    pub slot: u32,
}

/// `netfence lint`: find rules that can never match or contradict the preset.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LintArgs {
    #[command(flatten)]
    pub net: NetworkArgs,
    /// Guest slot whose gateway addresses form the `host` group
    #[arg(long, default_value_t = 0)]
    pub slot: u32,
}

/// `netfence config`: print the effective configuration as TOML.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub net: NetworkArgs,
}

fn fail(e: &ConfigError) -> i32 {
    eprintln!("netfence: {e}");
    e.exit_code()
}

/// Runs `check`; prints to stdout, returns 0 (allow), 1 (deny) or 2 (bad config/arguments).
pub fn run_check(a: &CheckArgs) -> i32 {
    match check(a) {
        Ok((text, allowed)) => {
            print!("{text}");
            if allowed {
                0
            } else {
                1
            }
        }
        Err(e) => fail(&e),
    }
}

/// The text `check` prints and whether the flow is allowed.
pub fn check(a: &CheckArgs) -> Result<(String, bool), ConfigError> {
    let cfg = a.net.resolve()?;
    let (ip, port) = parse_endpoint(&a.destination)
        .map_err(|e| ConfigError::new("destination", Some(a.destination.clone()), e))?;
    if !a.protocol.is_icmp() && port.is_none() {
        // Allowed (rules with ports then do not match), but worth saying.
    }
    let host = cfg.gateway_addrs(a.slot);
    let policy = Policy::compile(&cfg, &host)?;
    let q = FlowQuery {
        direction: a.direction,
        protocol: a.protocol,
        dst: ip,
        dst_port: if a.protocol.is_icmp() { None } else { port },
        domains: &a.domains,
    };
    let d = policy.decide(&q);
    let mut out = String::new();
    let dst = match port {
        Some(p) => SocketAddr::new(ip, p).to_string(),
        None => ip.to_string(),
    };
    out.push_str(&format!(
        "{} {} {} {}: {}\n",
        d.action, a.direction, a.protocol, dst, d.reason
    ));
    let group = group_of(ip, &host)
        .map(|g| g.to_string())
        .unwrap_or_else(|| "none".into());
    out.push_str(&format!("  group: {group}\n"));
    if canonical(ip) != ip {
        out.push_str(&format!("  judged as: {}\n", canonical(ip)));
    }
    if let (Direction::Egress, Some(p)) = (a.direction, port) {
        if let Some(h) = AddressMapEntry::lookup(&cfg.map, SocketAddr::new(ip, p)) {
            out.push_str(&format!("  host side (map): {h}\n"));
        }
    }
    Ok((out, d.allowed()))
}

/// One problem `lint` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// 1-based index of the rule in the effective list, if the finding is about a rule.
    pub rule: Option<usize>,
    pub text: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            Some(i) => write!(f, "rule {i} {:?}: {}", self.text, self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Runs `lint`; prints findings to stdout, returns 0 (none), 1 (some) or 2 (bad config).
pub fn run_lint(a: &LintArgs) -> i32 {
    let cfg = match a.net.resolve() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let host = cfg.gateway_addrs(a.slot);
    match lint(&cfg, &host) {
        Ok(findings) if findings.is_empty() => {
            println!("no problems found");
            0
        }
        Ok(findings) => {
            for f in &findings {
                println!("{f}");
            }
            println!("{} problem(s) found", findings.len());
            1
        }
        Err(e) => fail(&e),
    }
}

/// The groups a preset blocks for egress (beyond its DNS rules).
fn preset_blocks(p: Preset) -> &'static [Group] {
    match p {
        Preset::PublicOnly => &[
            Group::Host,
            Group::Metadata,
            Group::Loopback,
            Group::Private,
            Group::LinkLocal,
            Group::Multicast,
        ],
        Preset::NonLocal => &[
            Group::Host,
            Group::Metadata,
            Group::Loopback,
            Group::LinkLocal,
            Group::Multicast,
        ],
        Preset::None | Preset::AllowAll => &[],
    }
}

/// Finds rules that can never match (covered by an earlier rule, by `deny_domains`, or ports
/// on an ICMP-only rule) and custom rules that contradict the preset.
pub fn lint(cfg: &NetworkConfig, host: &HostAddrs) -> Result<Vec<Finding>, ConfigError> {
    let policy = Policy::compile(cfg, host)?;
    let eff = cfg.effective_policy();
    let rules = policy.rules();
    let mut out = Vec::new();
    let finding = |r: &CompiledRule, message: String| Finding {
        rule: Some(r.index),
        text: r.text.clone(),
        message,
    };
    if policy.preset() == Some(Preset::None) {
        for r in rules {
            out.push(finding(
                r,
                "has no effect: preset none disables networking (nothing in or out); \
                 drop the rule or choose another preset"
                    .into(),
            ));
        }
        return Ok(out);
    }
    for (j, r) in rules.iter().enumerate() {
        if !r.ports.is_empty() && !r.protocols.is_empty() && r.protocols.iter().all(|p| p.is_icmp())
        {
            out.push(finding(
                r,
                "can never match: it has ports but only ICMP protocols, which carry no ports"
                    .into(),
            ));
            continue;
        }
        if let Some(i) = rules[..j].iter().find(|i| rule_covers(i, r, host)) {
            let by = match i.preset {
                Some(p) => format!(
                    "rule {} {:?} of preset {p} comes first and covers it{}",
                    i.index,
                    i.text,
                    if i.action != r.action {
                        "; to override the preset, write a custom policy without it"
                    } else {
                        ""
                    }
                ),
                None => format!(
                    "rule {} {:?} comes first and covers it{}",
                    i.index,
                    i.text,
                    if i.action != r.action {
                        "; put the narrower rule first"
                    } else {
                        ""
                    }
                ),
            };
            out.push(finding(r, format!("can never match: {by}")));
            continue;
        }
        if r.egress && !r.ingress {
            if let Destination::Domain(d) | Destination::Suffix(d) = &r.dest {
                let listed = cfg.deny_domains.iter().any(|x| {
                    crate::policy::normalize_name(x) == *d
                        && matches!(r.dest, Destination::Domain(_))
                }) || cfg.deny_domain_suffixes.iter().any(|x| {
                    suffix_matches(
                        d,
                        &crate::policy::normalize_name(config::strip_suffix_marker(x)),
                    )
                });
                if listed {
                    out.push(finding(
                        r,
                        "can never match: deny_domains / deny_domain_suffixes deny that name first"
                            .into(),
                    ));
                    continue;
                }
            }
        }
        if let (Some(p), None, Action::Allow, true) = (
            eff.preset,
            r.preset,
            r.action,
            r.egress && !eff.explicit_egress,
        ) {
            if let Some(g) = preset_blocks(p)
                .iter()
                .find(|g| dest_covered_by(&Destination::Group(**g), &r.dest, host))
            {
                out.push(finding(
                    r,
                    format!(
                        "contradicts preset {p}, which blocks {g}; if {g} should be reachable, \
                         write a custom policy (rules without the preset) instead"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Whether every flow rule `j` matches, rule `i` matches too.
fn rule_covers(i: &CompiledRule, j: &CompiledRule, host: &HostAddrs) -> bool {
    if (j.egress && !i.egress) || (j.ingress && !i.ingress) {
        return false;
    }
    if !i.protocols.is_empty()
        && (j.protocols.is_empty() || !j.protocols.iter().all(|p| i.protocols.contains(p)))
    {
        return false;
    }
    if !i.ports.is_empty()
        && (j.ports.is_empty() || !j.ports.iter().all(|q| i.ports.iter().any(|p| p.covers(q))))
    {
        return false;
    }
    dest_covered_by(&i.dest, &j.dest, host)
}

fn net(s: &str) -> IpNet {
    s.parse().expect("static CIDR")
}

/// The fixed ranges of a group (not `host`, not `public`).
fn group_nets(g: Group) -> Vec<IpNet> {
    let v: &[&str] = match g {
        Group::Private => &[
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "fc00::/7",
        ],
        Group::Loopback => &["127.0.0.0/8", "::1/128"],
        Group::LinkLocal => &["169.254.0.0/16", "fe80::/10"],
        Group::Metadata => &["169.254.169.254/32"],
        Group::Multicast => &["224.0.0.0/4", "ff00::/8"],
        Group::Host | Group::Public => &[],
    };
    v.iter().map(|s| net(s)).collect()
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn host_nets(host: &HostAddrs) -> Vec<IpNet> {
    host.ipv4
        .iter()
        .map(|a| IpNet::from(IpAddr::V4(*a)))
        .chain(host.ipv6.iter().map(|a| IpNet::from(IpAddr::V6(*a))))
        .collect()
}

/// Whether every address of `n` is in group `g`.
fn cidr_in_group(n: &IpNet, g: Group, host: &HostAddrs) -> bool {
    let hosts = host_nets(host);
    match g {
        Group::Host => n.prefix_len() == n.max_prefix_len() && host.contains(n.network()),
        Group::Public => {
            !hosts.iter().any(|h| overlaps(h, n))
                && !Group::ALL
                    .iter()
                    .flat_map(|g| group_nets(*g))
                    .any(|m| overlaps(&m, n))
                && !n.contains(&IpAddr::from([0u8, 0, 0, 0]))
                && !n.contains(&IpAddr::from([0u16; 8]))
        }
        _ => {
            let more_specific: Vec<IpNet> = Group::ALL
                .iter()
                .take_while(|x| **x != g)
                .flat_map(|x| group_nets(*x))
                .chain(hosts)
                .collect();
            group_nets(g).iter().any(|m| m.contains(n))
                && !more_specific.iter().any(|m| overlaps(m, n))
        }
    }
}

/// Whether destination `i` matches every address/name that destination `j` matches.
fn dest_covered_by(i: &Destination, j: &Destination, host: &HostAddrs) -> bool {
    use Destination::*;
    match (i, j) {
        (Any, _) => true,
        (_, Any) => false,
        (Group(a), Group(b)) => a == b,
        (Group(g), Ip(x)) => group_of(*x, host) == Some(*g),
        (Group(g), Cidr(n)) => cidr_in_group(n, *g, host),
        (Cidr(n), Ip(x)) => n.contains(&canonical(*x)),
        (Cidr(n), Cidr(m)) => n.contains(m),
        (Cidr(n), Group(g)) => match g {
            crate::policy::Group::Host => {
                let hs = host_nets(host);
                !hs.is_empty() && hs.iter().all(|h| n.contains(h))
            }
            crate::policy::Group::Public => false,
            _ => group_nets(*g).iter().all(|m| n.contains(m)),
        },
        (Ip(a), Ip(b)) => canonical(*a) == canonical(*b),
        (Domain(a), Domain(b)) => a == b,
        (Suffix(s), Domain(d)) => suffix_matches(d, s),
        (Suffix(s), Suffix(t)) => suffix_matches(t, s),
        _ => false,
    }
}

/// Runs `config`; prints the effective configuration as TOML.
pub fn run_config(a: &ConfigArgs) -> i32 {
    match a.net.resolve() {
        Ok(cfg) => {
            print!("{}", effective_toml(&cfg));
            0
        }
        Err(e) => fail(&e),
    }
}

/// The effective configuration: presets expanded into the rule list, defaults explicit.
pub fn effective_config(cfg: &NetworkConfig) -> NetworkConfig {
    let eff = cfg.effective_policy();
    let mut out = cfg.clone();
    out.rules.clear();
    if eff.preset == Some(Preset::None) {
        out.policy = Some(PolicySpec::Preset(Preset::None));
        return out;
    }
    let mut rules = eff
        .preset
        .map(crate::policy::preset_rules)
        .unwrap_or_default();
    rules.extend(eff.rules);
    out.policy = Some(PolicySpec::Table(PolicyTable {
        preset: None,
        default_egress: Some(eff.default_egress),
        default_ingress: Some(eff.default_ingress),
        rules,
    }));
    out
}

/// [`effective_config`] as commented TOML.
pub fn effective_toml(cfg: &NetworkConfig) -> String {
    let eff = cfg.effective_policy();
    let mut head = String::from("# netfence effective configuration (command line merged)\n");
    match eff.preset {
        Some(Preset::None) => head.push_str("# preset none: no network; rules are ignored\n"),
        Some(p) => {
            let n = crate::policy::preset_rules(p).len();
            head.push_str(&format!(
                "# preset {p}{}: {}\n",
                if eff.implicit_preset {
                    " (the default)"
                } else {
                    ""
                },
                if n == 0 {
                    "defaults only".to_string()
                } else {
                    format!("rules 1-{n} come from it")
                }
            ));
        }
        None => head.push_str("# custom policy (no preset)\n"),
    }
    head.push_str(
        "# rules are numbered from 1 in this order, as `netfence check` reports them\n\n",
    );
    head + &config::to_toml(&effective_config(cfg))
}
