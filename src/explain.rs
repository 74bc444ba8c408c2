//! `netfence check`, `lint` and `config`: explain a policy without running a guest.
//!
//! - `check` judges one flow and prints the decision and the rule (or default) behind it;
//!   exit 0 allow, 1 deny, 3 bad configuration or arguments (1 is taken by "deny", so its
//!   errors do not use the usual 2).
//! - `lint` reports rules that can never match because an earlier rule of the same direction
//!   covers them (preset rules included), rules that contradict the preset, and rules whose
//!   ports can never match, and domain rules that cannot match because the policy denies the
//!   guest DNS at the gateway; exit 1 if it finds any.
//! - `config` prints the effective configuration (presets expanded, command line merged) as
//!   TOML that `--config` accepts and that decides every flow the same way.
//!
//! `lint` and `config` exit 2 on a configuration error, `check` 3, with the message on stderr.
//! [`PolicySummary`] is the one-line account of the effective policy `run` logs at start.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::config::cli::NetworkArgs;
use crate::config::{
    self, AddressMapEntry, ConfigError, Destination, NetworkConfig, PolicySpec, PolicyTable, Preset,
};
use crate::policy::{
    canonical, group_of, preset_rules, suffix_matches, Action, CompiledRule, Direction, FlowQuery,
    Group, HostAddrs, Policy, Protocol,
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

macro_rules! check_examples {
    () => {
        "Examples:
  netfence check --config net.toml egress tcp 203.0.113.7:443 --domain api.example.com
  netfence check --policy non-local egress udp 192.168.1.10:53
  netfence check --net-rule allow:ingress@127.0.0.1 ingress tcp 127.0.0.1:8080
  netfence check --config net.toml ingress tcp 192.168.1.20 80   (a client, the guest port)
Exit status: 0 allowed, 1 denied, 3 bad configuration or arguments."
    };
}

/// Judge one flow: print the decision and the rule or default behind it (exit 0 allow,
/// 1 deny, 3 error).
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = check_examples!(),
    after_long_help = concat!(check_examples!(), "\n\n", crate::config::cli::net_help_text!())
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
    /// Destination IP[:PORT] ([IPv6]:PORT); for ingress, the host client's address (and
    /// the guest port, here or as GUEST_PORT)
    pub destination: String,
    /// For ingress: the guest port the published port leads to (`ingress tcp PEER GUEST_PORT`)
    #[arg(value_name = "GUEST_PORT")]
    pub guest_port: Option<u16>,
    /// A name the destination was resolved from (repeatable), for domain rules
    #[arg(long = "domain", value_name = "NAME")]
    pub domains: Vec<String>,
    /// Guest slot whose gateway addresses form the `host` group
    #[arg(long, default_value_t = 0)]
    pub slot: u32,
}

/// Report rules that can never match (an earlier rule covers them), rules that contradict the
/// preset, and ports on ICMP-only rules (exit 1 if any).
#[derive(clap::Args, Debug, Clone, Default)]
#[command(after_help = "Exit status: 0 no problems, 1 problems found, 2 bad configuration.")]
pub struct LintArgs {
    #[command(flatten)]
    pub net: NetworkArgs,
    /// Guest slot whose gateway addresses form the `host` group
    #[arg(long, default_value_t = 0)]
    pub slot: u32,
}

/// Print the effective configuration (presets expanded, command line merged) as TOML that
/// `--config` accepts.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub net: NetworkArgs,
}

/// The exit code of `check` for a bad configuration or bad arguments (0 and 1 are its answer).
pub const CHECK_ERROR_EXIT: i32 = 3;

fn fail(e: &ConfigError) -> i32 {
    eprintln!("netfence: {e}");
    e.exit_code()
}

/// Runs `check`; prints to stdout, returns 0 (allow), 1 (deny) or [`CHECK_ERROR_EXIT`] (bad
/// config/arguments).
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
        Err(e) => {
            eprintln!("netfence: {e}");
            CHECK_ERROR_EXIT
        }
    }
}

/// The text `check` prints and whether the flow is allowed.
pub fn check(a: &CheckArgs) -> Result<(String, bool), ConfigError> {
    let cfg = a.net.resolve()?;
    let (ip, port) = parse_endpoint(&a.destination)
        .map_err(|e| ConfigError::new("destination", Some(a.destination.clone()), e))?;
    let port = match (a.guest_port, port, a.direction) {
        (None, port, _) => port,
        (Some(_), _, Direction::Egress) => {
            return Err(ConfigError::new(
                "GUEST_PORT",
                a.guest_port.map(|p| p.to_string()),
                "a separate port is for ingress (PEER GUEST_PORT); for egress write IP:PORT",
            ))
        }
        (Some(_), Some(_), _) => {
            return Err(ConfigError::new(
                "GUEST_PORT",
                a.guest_port.map(|p| p.to_string()),
                "the port is given twice: write PEER GUEST_PORT or PEER:GUEST_PORT",
            ))
        }
        (Some(0), None, _) => {
            return Err(ConfigError::new(
                "GUEST_PORT",
                Some("0".into()),
                "port 0 is not allowed; expected 1-65535",
            ))
        }
        (Some(p), None, _) => Some(p),
    };
    if !a.protocol.is_icmp() && port.is_none() {
        // Allowed (rules with ports then do not match), but worth saying.
    }
    let host = cfg
        .gateway_addrs(a.slot)
        .with_local(crate::policy::LocalAddrs::System);
    let policy = cfg.compile_policy(&host)?;
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
    // As the datapath does: a guest flow to its own loopback is never carried.
    let never_carried =
        d.allowed() && a.direction == Direction::Egress && crate::policy::guest_loopback(ip);
    let (action, reason, allowed) = if never_carried {
        (
            crate::policy::Action::Deny,
            crate::policy::GUEST_LOOPBACK.to_string(),
            false,
        )
    } else {
        (d.action, d.reason.to_string(), d.allowed())
    };
    out.push_str(&format!(
        "{} {} {} {}: {}\n",
        action, a.direction, a.protocol, dst, reason
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
    Ok((out, allowed))
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

/// The groups a preset blocks for egress: every group its rules do not allow whole (its DNS
/// rules allow only port 53 of `host`). Presets without rules (`none`, `allow-all`) leave
/// everything to their default, and no custom rule contradicts them.
fn preset_blocks(p: Preset) -> Vec<Group> {
    let rules = preset_rules(p);
    if rules.is_empty() {
        return Vec::new();
    }
    let allows_whole = |g: Group| {
        rules.iter().any(|r| {
            r.action == Action::Allow
                && r.destination == Some(Destination::Group(g))
                && r.protocol.is_none()
                && r.protocols.is_empty()
                && r.port.is_none()
                && r.ports.is_empty()
        })
    };
    Group::ALL
        .into_iter()
        .filter(|g| !allows_whole(*g))
        .collect()
}

/// Finds rules that can never match (covered by an earlier rule, by `deny_domains`, or ports
/// on an ICMP-only rule) and custom rules that contradict the preset.
pub fn lint(cfg: &NetworkConfig, host: &HostAddrs) -> Result<Vec<Finding>, ConfigError> {
    let policy = cfg.compile_policy(host)?;
    let eff = cfg.effective_policy();
    let rules = policy.rules();
    let dns_ok = gateway_dns_allowed(&policy);
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
        if r.egress && is_domain(&r.dest) && !dns_ok {
            out.push(finding(
                r,
                format!("can never match: {}", blind_domain_rules(&eff)),
            ));
            continue;
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

fn is_domain(d: &Destination) -> bool {
    matches!(d, Destination::Domain(_) | Destination::Suffix(_))
}

/// Whether the guest may ask the gateway's DNS service, the resolver DHCP and router
/// advertisements hand out: egress UDP to port 53 of a gateway address. Domain rules match
/// only names the guest resolved through that service (the IP -> names cache; an SNI must
/// agree with it), so when it is denied they match nothing.
pub fn gateway_dns_allowed(policy: &Policy) -> bool {
    let host = policy.host_addrs();
    let gateways = host
        .ipv4
        .iter()
        .map(|a| IpAddr::V4(*a))
        .chain(host.ipv6.iter().map(|a| IpAddr::V6(*a)));
    for dst in gateways {
        let q = FlowQuery {
            direction: Direction::Egress,
            protocol: Protocol::Udp,
            dst,
            dst_port: Some(53),
            domains: &[],
        };
        if policy.decide(&q).allowed() {
            return true;
        }
    }
    false
}

/// Why domain rules match nothing when [`gateway_dns_allowed`] is false, and the rules to add.
fn blind_domain_rules(eff: &config::EffectivePolicy) -> String {
    let mut s = String::from(
        "the policy denies DNS to the gateway (udp/53 to host), the resolver DHCP gives the \
         guest, so no name is resolved through netfence for it to match; add \
         allow@host:udp:53,allow@host:tcp:53 ahead of any rule denying them",
    );
    if eff.preset.is_none() {
        s.push_str(" (rules without --policy replace the public-only preset and its DNS rules)");
    }
    s
}

/// The one-line account of the effective policy that `run` logs at start: preset, defaults,
/// rule count, what a denied flow gets, DNS interception, and whether domain rules can match.
#[derive(Clone, Debug)]
pub struct PolicySummary {
    text: String,
    blind: bool,
}

impl PolicySummary {
    pub fn new(cfg: &NetworkConfig, policy: &Policy) -> Self {
        let eff = cfg.effective_policy();
        if policy.preset() == Some(Preset::None) {
            return PolicySummary {
                text: "preset none: no network at all (every rule is ignored)".into(),
                blind: false,
            };
        }
        let mut parts = Vec::new();
        parts.push(match eff.preset {
            Some(p) if eff.implicit_preset => format!("preset {p} (the default)"),
            Some(p) => format!("preset {p}"),
            None => "custom policy (no preset)".into(),
        });
        parts.push(format!(
            "default egress {}, ingress {}",
            policy.default_action(Direction::Egress),
            policy.default_action(Direction::Ingress)
        ));
        let rules = policy.rules();
        let from_preset = rules.iter().filter(|r| r.preset.is_some()).count();
        let mut count = format!(
            "{} rule{}",
            rules.len(),
            if rules.len() == 1 { "" } else { "s" }
        );
        if from_preset > 0 {
            count.push_str(&format!(" ({from_preset} from the preset)"));
        }
        parts.push(count);
        parts.push(
            match policy.deny_action() {
                config::DenyAction::Drop => "denied flows dropped silently",
                config::DenyAction::Reject => "denied flows rejected (TCP RST / ICMP unreachable)",
            }
            .into(),
        );
        parts.push(
            if cfg.dns.intercept_all.unwrap_or(true) {
                "DNS to port 53 of any address answered by the gateway"
            } else {
                "DNS answered at the gateway's addresses only"
            }
            .into(),
        );
        let domain_rules = rules
            .iter()
            .filter(|r| r.egress && is_domain(&r.dest))
            .count();
        let blind = domain_rules > 0 && !gateway_dns_allowed(policy);
        parts.push(match domain_rules {
            0 => "domain rules: none".into(),
            n if blind => format!(
                "domain rules: {n}, which can never match: {}",
                blind_domain_rules(&eff)
            ),
            n => format!("domain rules: {n}, matched against names resolved at the gateway"),
        });
        PolicySummary {
            text: parts.join("; "),
            blind,
        }
    }

    /// True when the policy has domain rules but denies DNS to the gateway, so they can
    /// never match (worth a warning).
    pub fn domain_rules_blind(&self) -> bool {
        self.blind
    }
}

impl fmt::Display for PolicySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
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

/// The fixed ranges of a group (not `host`, not `public`): the policy's address table.
fn group_nets(g: Group) -> Vec<IpNet> {
    crate::policy::ranges::group_nets(g)
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
    head.push_str("# rules are numbered from 1 in this order, as `netfence check` reports them\n");
    // A secret value serialises as `<redacted>` whatever the path (config::SecretValue).
    let shown = effective_config(cfg);
    if shown.secrets.iter().any(|s| s.value.is_some()) {
        head.push_str("# secret values are redacted\n");
    }
    head.push('\n');
    head + &config::to_toml(&shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_str, Format};
    use clap::Parser;

    #[test]
    fn preset_blocks_are_the_groups_the_reference_lists() {
        use Group::*;
        assert_eq!(
            preset_blocks(Preset::PublicOnly),
            vec![Host, Metadata, Loopback, Private, LinkLocal, Multicast]
        );
        assert_eq!(
            preset_blocks(Preset::NonLocal),
            vec![Host, Metadata, Loopback, LinkLocal, Multicast]
        );
        assert!(preset_blocks(Preset::None).is_empty());
        assert!(preset_blocks(Preset::AllowAll).is_empty());
    }

    #[derive(Parser, Debug)]
    enum Cmd {
        Check(CheckArgs),
        Lint(LintArgs),
        Config(ConfigArgs),
    }

    fn parse(v: &[&str]) -> Cmd {
        let mut all = vec!["netfence"];
        all.extend_from_slice(v);
        Cmd::try_parse_from(all).unwrap_or_else(|e| panic!("{v:?}: {e}"))
    }

    fn check_args(v: &[&str]) -> CheckArgs {
        let mut all = vec!["check"];
        all.extend_from_slice(v);
        match parse(&all) {
            Cmd::Check(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn check_output_and_exit_codes() {
        let cases: &[(&[&str], &str, i32)] = &[
            (
                &["egress", "tcp", "203.0.113.7:443"],
                "allow egress tcp 203.0.113.7:443: rule 3 \"allow@public\" (preset public-only)\n  group: public\n",
                0,
            ),
            (
                &["egress", "tcp", "10.0.0.1:80"],
                "deny egress tcp 10.0.0.1:80: preset public-only: private blocked\n  group: private\n",
                1,
            ),
            (
                &["egress", "udp", "172.16.0.1:53"],
                "allow egress udp 172.16.0.1:53: rule 1 \"allow@host:udp:53\" (preset public-only)\n  group: host\n",
                0,
            ),
            (
                &["egress", "tcp", "[::ffff:10.0.0.1]:80"],
                "deny egress tcp [::ffff:10.0.0.1]:80: preset public-only: private blocked\n  group: private\n  judged as: 10.0.0.1\n",
                1,
            ),
            (
                &["--slot", "1", "egress", "tcp", "172.16.0.5:80", "--policy", "allow-all"],
                "allow egress tcp 172.16.0.5:80: preset allow-all: host allowed\n  group: host\n",
                0,
            ),
            (
                &["egress", "icmpv4", "192.0.2.1"],
                "allow egress icmpv4 192.0.2.1: rule 3 \"allow@public\" (preset public-only)\n  group: public\n",
                0,
            ),
            (
                &["egress", "tcp", "0.0.0.0:80", "--policy", "allow-all"],
                "deny egress tcp 0.0.0.0:80: unspecified address\n  group: none\n",
                1,
            ),
            (
                &[
                    "--net-default-egress", "deny", "--net-rule", "allow@api.example.com:tcp:443",
                    "egress", "tcp", "203.0.113.7:443", "--domain", "API.example.com.",
                ],
                "allow egress tcp 203.0.113.7:443: rule 1 \"allow@api.example.com:tcp:443\"\n  group: public\n",
                0,
            ),
            (
                &[
                    "--net-rule", "allow@api.example.com:tcp:443", "--map", "203.0.113.7:443=127.0.0.1:8443",
                    "egress", "tcp", "203.0.113.7:443",
                ],
                "deny egress tcp 203.0.113.7:443: default egress deny\n  group: public\n  host side (map): 127.0.0.1:8443\n",
                1,
            ),
            (
                &["ingress", "tcp", "127.0.0.1:8080"],
                "allow ingress tcp 127.0.0.1:8080: preset public-only: ingress allowed\n  group: loopback\n",
                0,
            ),
            (
                // The guest's own loopback is never carried to the host's, allowed or not.
                &["--net-rule", "allow@loopback", "egress", "tcp", "127.0.0.1:22"],
                "deny egress tcp 127.0.0.1:22: loopback is the guest's own, never the host's (allow `host` to reach the host)\n  group: loopback\n",
                1,
            ),
            (
                &["--no-net", "ingress", "tcp", "127.0.0.1:8080"],
                "deny ingress tcp 127.0.0.1:8080: preset none: networking disabled\n  group: loopback\n",
                1,
            ),
            (
                // PEER GUEST_PORT: the ingress rule names the guest port.
                &["--net-rule", "deny:ingress@*:tcp:22", "ingress", "tcp", "127.0.0.1", "22"],
                "deny ingress tcp 127.0.0.1:22: rule 1 \"deny:ingress@*:tcp:22\"\n  group: loopback\n",
                1,
            ),
            (
                &["--net-rule", "deny:ingress@*:tcp:22", "ingress", "tcp", "127.0.0.1", "80"],
                "allow ingress tcp 127.0.0.1:80: default ingress allow\n  group: loopback\n",
                0,
            ),
        ];
        for (argv, want, code) in cases {
            let a = check_args(argv);
            let (text, allowed) = check(&a).unwrap();
            assert_eq!(text, *want, "{argv:?}");
            assert_eq!(allowed, *code == 0, "{argv:?}");
            assert_eq!(run_check(&a), *code, "{argv:?}");
        }
    }

    #[test]
    fn check_bad_input_exits_3() {
        for argv in [
            &["egress", "tcp", "nowhere:80"][..],
            &["egress", "tcp", "10.0.0.1:0"][..],
            &[
                "--config",
                "/nonexistent/netfence.toml",
                "egress",
                "tcp",
                "10.0.0.1:80",
            ][..],
        ] {
            let a = check_args(argv);
            assert!(check(&a).is_err(), "{argv:?}");
            assert_eq!(run_check(&a), CHECK_ERROR_EXIT, "{argv:?}");
        }
        let mut all = vec!["netfence", "check", "sideways", "tcp", "10.0.0.1"];
        assert!(Cmd::try_parse_from(&all).is_err());
        all[2] = "egress";
        all[3] = "sctp";
        let e = Cmd::try_parse_from(&all).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .contains("expected tcp, udp, icmpv4 or icmpv6"),
            "{e}"
        );
    }

    fn host() -> HostAddrs {
        NetworkConfig::default().gateway_addrs(0)
    }

    fn lint_rules(preset: Option<&str>, rules: &[&str]) -> Vec<String> {
        let mut argv: Vec<&str> = vec!["lint"];
        if let Some(p) = preset {
            argv.extend(["--policy", p]);
        }
        for r in rules {
            argv.extend(["--net-rule", r]);
        }
        let Cmd::Lint(a) = parse(&argv) else {
            unreachable!()
        };
        let cfg = a.net.resolve().unwrap();
        lint(&cfg, &host())
            .unwrap()
            .iter()
            .map(|f| f.to_string())
            .collect()
    }

    /// (preset, rules, expected findings as (rule index, substring))
    type LintCase = (
        Option<&'static str>,
        &'static [&'static str],
        &'static [(usize, &'static str)],
    );

    /// A custom policy's DNS rules (what presets other than none and allow-all carry).
    const DNS: &str = "allow@host:udp:53,allow@host:tcp:53";

    #[test]
    fn lint_findings() {
        // (preset, rules, expected findings as "rule N: substring")
        let cases: &[LintCase] = &[
            (None, &[], &[]),
            (Some("public-only"), &[], &[]),
            (None, &["allow@public:tcp:443", "allow@host:udp:53"], &[]),
            (
                None,
                &["allow@10.0.0.0/8", "deny@10.0.0.5"],
                &[(2, "can never match: rule 1 \"allow@10.0.0.0/8\" comes first and covers it; put the narrower rule first")],
            ),
            (None, &["deny@10.0.0.5", "allow@10.0.0.0/8"], &[]),
            (
                Some("public-only"),
                &["deny@203.0.113.0/24"],
                &[(4, "rule 3 \"allow@public\" of preset public-only comes first and covers it; to override the preset")],
            ),
            (
                Some("public-only"),
                &["allow@private"],
                &[(4, "contradicts preset public-only, which blocks private")],
            ),
            (
                Some("public-only"),
                &["allow@10.1.0.0/16:tcp:80"],
                &[(4, "contradicts preset public-only, which blocks private")],
            ),
            (
                Some("public-only"),
                &["allow@host:tcp:8080"],
                &[(4, "contradicts preset public-only, which blocks host")],
            ),
            (
                Some("public-only"),
                &["allow@host:udp:53"],
                &[(4, "can never match: rule 1 \"allow@host:udp:53\" of preset public-only")],
            ),
            (Some("non-local"), &["allow@192.168.1.0/24"], &[(5, "can never match: rule 4 \"allow@private\"")]),
            (
                Some("non-local"),
                &["allow@169.254.169.254"],
                &[(5, "contradicts preset non-local, which blocks metadata")],
            ),
            (Some("non-local"), &["deny@127.0.0.1"], &[]),
            (Some("allow-all"), &["deny@10.0.0.0/8"], &[]),
            (
                Some("none"),
                &["allow@public", "deny@10.0.0.1"],
                &[(1, "preset none disables networking"), (2, "preset none disables networking")],
            ),
            (None, &["allow@public:icmpv4:80"], &[(1, "only ICMP protocols")]),
            (None, &["allow:ingress@*", "deny:ingress@10.0.0.1"], &[(2, "can never match")]),
            (None, &["allow@*", "deny:ingress@10.0.0.1"], &[]),
            (None, &["allow:any@*", "deny@10.0.0.1"], &[(2, "can never match")]),
            (None, &["allow@*", "deny:any@10.0.0.1"], &[]),
            (None, &["allow@*:tcp:1-1000", "deny@*:tcp:80"], &[(2, "can never match")]),
            (None, &["allow@*:tcp:80", "deny@*:tcp:1-1000"], &[]),
            (None, &["allow@*:tcp", "deny@*:tcp+udp"], &[]),
            (None, &["allow@*:tcp+udp", "deny@*:udp:53"], &[(2, "can never match")]),
            (None, &["allow@*:tcp:80", "deny@*"], &[]),
            (None, &["allow@*:tcp:80+443", "deny@*:tcp:443"], &[(2, "can never match")]),
            (None, &["allow@private", "deny@10.1.0.0/16"], &[(2, "can never match")]),
            // 172.16.0.1 is the gateway (host), so private does not cover all of 172.16/12.
            (None, &["allow@private", "deny@172.16.0.0/12"], &[]),
            (None, &["allow@private", "deny@172.16.0.2"], &[(2, "can never match")]),
            (None, &["allow@host", "deny@172.16.0.1"], &[(2, "can never match")]),
            (None, &["allow@link-local", "deny@169.254.169.254"], &[]),
            (None, &["allow@link-local", "deny@169.254.1.0/24"], &[(2, "can never match")]),
            (None, &["allow@public", "deny@8.8.8.0/24"], &[(2, "can never match")]),
            (None, &["allow@public", "deny@0.0.0.0/0"], &[]),
            (None, &["allow@0.0.0.0/0", "deny@loopback"], &[]),
            (None, &["allow@127.0.0.0/8", "deny@127.0.0.1"], &[(2, "can never match")]),
            (None, &["allow@10.0.0.0/8", "deny@private"], &[]),
            (None, &["allow@224.0.0.0/3", "deny@multicast"], &[]),
            (None, &["allow@0.0.0.0/0", "deny@metadata"], &[(2, "can never match")]),
            (None, &[DNS, "allow@.example.com", "deny@api.example.com"], &[(4, "can never match")]),
            (None, &[DNS, "allow@.example.com", "deny@.a.example.com"], &[(4, "can never match")]),
            (None, &[DNS, "allow@.example.com", "deny@example.com"], &[(4, "can never match")]),
            (None, &[DNS, "allow@api.example.com", "deny@.example.com"], &[]),
            (None, &[DNS, "allow@api.example.com", "deny@api.example.com:tcp:443"], &[(4, "can never match")]),
            // Domain rules match names the guest resolved at the gateway: a policy that denies
            // that DNS makes them dead (--net-rule without --policy drops the preset's DNS).
            (
                None,
                &["allow@api.example.com:tcp:443"],
                &[(1, "can never match: the policy denies DNS to the gateway (udp/53 to host), the resolver DHCP gives the guest, so no name is resolved through netfence for it to match; add allow@host:udp:53,allow@host:tcp:53 ahead of any rule denying them (rules without --policy replace the public-only preset and its DNS rules)")],
            ),
            (
                None,
                &["allow@public", "deny@.ads.example", "allow@host:tcp:53"],
                &[(2, "denies DNS to the gateway")],
            ),
            (None, &["deny@host:udp", "allow@*:tcp", "allow@x.example"], &[(3, "denies DNS to the gateway")]),
            (None, &["allow@host:udp:53", "allow@api.example.com:tcp:443"], &[]),
            (None, &["allow@*:udp:53", "allow@.example.com"], &[]),
            (Some("public-only"), &["allow@api.example.com"], &[]),
            (Some("non-local"), &["allow@.example.com:tcp:443"], &[]),
            (Some("allow-all"), &["deny@evil.example"], &[]),
        ];
        for (preset, rules, want) in cases {
            let got = lint_rules(*preset, rules);
            assert_eq!(got.len(), want.len(), "{preset:?} {rules:?}: {got:#?}");
            for (g, (i, sub)) in got.iter().zip(want.iter()) {
                assert!(g.starts_with(&format!("rule {i} ")), "{rules:?}: {g}");
                assert!(g.contains(sub), "{rules:?}: {g}");
            }
        }
    }

    #[test]
    fn lint_deny_domains_and_exit_codes() {
        let cfg = parse_str(
            "deny_domains = [\"evil.example\"]\ndeny_domain_suffixes = [\".ads.example\"]\n\
             [[rules]]\naction = \"allow\"\ndestination = \"evil.example\"\n\
             [[rules]]\naction = \"allow\"\ndestination = \"x.ads.example\"\n\
             [[rules]]\naction = \"allow\"\ndestination = \"good.example\"\n",
            Format::Toml,
        )
        .unwrap();
        let f = lint(&cfg, &host()).unwrap();
        assert_eq!(f.len(), 3, "{f:#?}");
        assert_eq!(f[0].rule, Some(1));
        assert_eq!(f[1].rule, Some(2));
        assert!(f[0].message.contains("deny_domains"));
        // The custom policy denies DNS to the gateway, so the third can't match either.
        assert_eq!(f[2].rule, Some(3));
        assert!(f[2].message.contains("denies DNS to the gateway"), "{f:#?}");

        let dir = std::env::temp_dir().join(format!("netfence-lint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "policy = \"public-only\"\n").unwrap();
        let shadow = dir.join("shadow.toml");
        std::fs::write(
            &shadow,
            "rules = [{ action = \"allow\", destination = \"10.0.0.0/8\" }, { action = \"deny\", destination = \"10.0.0.5\" }]\n",
        )
        .unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(
            &bad,
            "rules = [{ action = \"allow\", destination = \"publc\" }]\n",
        )
        .unwrap();
        for (file, code) in [(&good, 0), (&shadow, 1), (&bad, 2)] {
            let Cmd::Lint(a) = parse(&["lint", "--config", file.to_str().unwrap()]) else {
                unreachable!()
            };
            assert_eq!(run_lint(&a), code, "{}", file.display());
            let Cmd::Config(c) = parse(&["config", "--config", file.to_str().unwrap()]) else {
                unreachable!()
            };
            assert_eq!(run_config(&c), if code == 2 { 2 } else { 0 });
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// (direction, protocol, destination, port, names)
    type Query = (
        Direction,
        Protocol,
        &'static str,
        Option<u16>,
        &'static [&'static str],
    );

    const QUERIES: &[Query] = &[
        (
            Direction::Egress,
            Protocol::Tcp,
            "203.0.113.7",
            Some(443),
            &[],
        ),
        (
            Direction::Egress,
            Protocol::Tcp,
            "203.0.113.7",
            Some(80),
            &["api.example.com"],
        ),
        (
            Direction::Egress,
            Protocol::Udp,
            "198.51.100.1",
            Some(53),
            &[],
        ),
        (Direction::Egress, Protocol::Tcp, "10.0.0.5", Some(80), &[]),
        (Direction::Egress, Protocol::Tcp, "10.0.0.6", Some(80), &[]),
        (Direction::Egress, Protocol::Tcp, "fd00::1", Some(80), &[]),
        (
            Direction::Egress,
            Protocol::Udp,
            "172.16.0.1",
            Some(53),
            &[],
        ),
        (
            Direction::Egress,
            Protocol::Tcp,
            "172.16.0.1",
            Some(8080),
            &[],
        ),
        (
            Direction::Egress,
            Protocol::Tcp,
            "169.254.169.254",
            Some(80),
            &[],
        ),
        (Direction::Egress, Protocol::Icmpv4, "192.0.2.1", None, &[]),
        (
            Direction::Egress,
            Protocol::Icmpv6,
            "2001:db8::1",
            None,
            &[],
        ),
        (Direction::Egress, Protocol::Tcp, "127.0.0.1", Some(80), &[]),
        (
            Direction::Egress,
            Protocol::Udp,
            "224.0.0.251",
            Some(5353),
            &[],
        ),
        (
            Direction::Ingress,
            Protocol::Tcp,
            "127.0.0.1",
            Some(8080),
            &[],
        ),
        (
            Direction::Ingress,
            Protocol::Tcp,
            "10.0.0.5",
            Some(8080),
            &[],
        ),
    ];

    #[test]
    fn config_output_decides_the_same() {
        let configs: &[&[&str]] = &[
            &[],
            &["--policy", "none"],
            &["--policy", "allow-all", "--net-rule", "deny@10.0.0.0/8"],
            &["--policy", "non-local", "--net-rule", "deny@10.0.0.5"],
            &[
                "--policy",
                "public-only",
                "--net-rule",
                "allow@host:tcp:8080",
            ],
            &["--net-default-ingress", "deny"],
            &["--net-default-egress", "allow", "--policy", "public-only"],
            &[
                "--net-rule",
                "allow@api.example.com",
                "--net-rule",
                "allow:any@10.0.0.0/8:tcp:80",
            ],
            &[
                "--net-rule",
                "allow@[fd00::/8]:tcp,allow@192.0.2.0/24:icmpv4",
                "--reject",
                "-p",
                "8080:80",
            ],
        ];
        for argv in configs {
            let mut all = vec!["config"];
            all.extend_from_slice(argv);
            let Cmd::Config(a) = parse(&all) else {
                unreachable!()
            };
            let cfg = a.net.resolve().unwrap();
            let text = effective_toml(&cfg);
            let again = parse_str(&text, Format::Toml)
                .unwrap_or_else(|e| panic!("{argv:?}: printed config does not parse: {e}\n{text}"));
            again.validate().unwrap();
            assert_eq!(again.deny_action, cfg.deny_action);
            assert_eq!(again.ports, cfg.ports);
            let p1 = cfg.compile_policy(&host()).unwrap();
            let p2 = again.compile_policy(&host()).unwrap();
            for (dir, proto, dst, port, names) in QUERIES {
                let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
                let q = FlowQuery {
                    direction: *dir,
                    protocol: *proto,
                    dst: dst.parse().unwrap(),
                    dst_port: *port,
                    domains: &names,
                };
                assert_eq!(
                    p1.decide(&q).action,
                    p2.decide(&q).action,
                    "{argv:?} {dir} {proto} {dst}\n{text}"
                );
            }
        }
    }

    #[test]
    fn policy_summary_lines() {
        let cases: &[(&[&str], &str, bool)] = &[
            (
                &[],
                "preset public-only (the default); default egress deny, ingress allow; 3 rules \
                 (3 from the preset); denied flows dropped silently; DNS to port 53 of any \
                 address answered by the gateway; domain rules: none",
                false,
            ),
            (
                &["--net-rule", "allow@api.example.com:tcp:443"],
                "custom policy (no preset); default egress deny, ingress allow; 1 rule; denied \
                 flows dropped silently; DNS to port 53 of any address answered by the gateway; \
                 domain rules: 1, which can never match: the policy denies DNS to the gateway \
                 (udp/53 to host), the resolver DHCP gives the guest, so no name is resolved \
                 through netfence for it to match; add allow@host:udp:53,allow@host:tcp:53 ahead \
                 of any rule denying them (rules without --policy replace the public-only preset \
                 and its DNS rules)",
                true,
            ),
            (
                &[
                    "--policy",
                    "public-only",
                    "--net-default-egress",
                    "deny",
                    "--net-rule",
                    "allow@.example.com",
                    "--reject",
                ],
                "preset public-only; default egress deny, ingress allow; 4 rules (3 from the \
                 preset); denied flows rejected (TCP RST / ICMP unreachable); DNS to port 53 of \
                 any address answered by the gateway; domain rules: 1, matched against names \
                 resolved at the gateway",
                false,
            ),
            (
                &["--policy", "allow-all", "--net-rule", "deny@evil.example"],
                "preset allow-all; default egress allow, ingress allow; 1 rule; denied flows \
                 dropped silently; DNS to port 53 of any address answered by the gateway; \
                 domain rules: 1, matched against names resolved at the gateway",
                false,
            ),
            (
                &["--no-net", "--net-rule", "allow@x.example"],
                "preset none: no network at all (every rule is ignored)",
                false,
            ),
        ];
        for (argv, want, blind) in cases {
            let mut all = vec!["config"];
            all.extend_from_slice(argv);
            let Cmd::Config(a) = parse(&all) else {
                unreachable!()
            };
            let cfg = a.net.resolve().unwrap();
            let policy = cfg.compile_policy(&host()).unwrap();
            let summary = PolicySummary::new(&cfg, &policy);
            assert_eq!(summary.to_string(), *want, "{argv:?}");
            assert_eq!(summary.domain_rules_blind(), *blind, "{argv:?}");
        }
        let cfg = parse_str("[dns]\nintercept_all = false\n", Format::Toml).unwrap();
        let policy = cfg.compile_policy(&host()).unwrap();
        assert!(PolicySummary::new(&cfg, &policy)
            .to_string()
            .contains("; DNS answered at the gateway's addresses only;"));
    }

    #[test]
    fn config_output_redacts_secrets() {
        let cfg = parse_str(
            "[[secrets]]\nenv_var = \"K\"\nvalue = \"hunter2\"\nallowed_hosts = [\"api.example.com\"]",
            Format::Toml,
        )
        .unwrap();
        let text = effective_toml(&cfg);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("value = \"<redacted>\""), "{text}");
        assert!(text.contains("env_var = \"K\""), "{text}");
    }

    #[test]
    fn config_output_shape() {
        let text = effective_toml(&NetworkConfig::default());
        assert!(
            text.contains("# preset public-only (the default): rules 1-3 come from it"),
            "{text}"
        );
        assert!(text.contains("default_egress = \"deny\""), "{text}");
        assert!(text.contains("default_ingress = \"allow\""), "{text}");
        assert!(text.contains("destination = \"public\""), "{text}");
        assert_eq!(text.matches("action = \"allow\"").count(), 3, "{text}");
    }

    #[test]
    fn help_documents_the_grammar() {
        use clap::CommandFactory;
        let mut c = Cmd::command();
        let check = c.find_subcommand_mut("check").unwrap();
        let long = check.render_long_help().to_string();
        for s in [
            "action[:direction]@target[:proto[:ports]]",
            "allow@public:tcp:443,allow@host:udp:53",
            "netfence check --config net.toml",
            "public-only",
            "--map <GUEST=HOST>",
            "Exit status: 0 allowed, 1 denied",
        ] {
            assert!(long.contains(s), "check --help lacks {s:?}:\n{long}");
        }
        let lint = c.find_subcommand_mut("lint").unwrap();
        assert!(lint
            .render_long_help()
            .to_string()
            .contains("--net-rule <RULES>"));
    }

    #[test]
    fn endpoints() {
        let ok: &[(&str, &str, Option<u16>)] = &[
            ("10.0.0.1", "10.0.0.1", None),
            ("10.0.0.1:80", "10.0.0.1", Some(80)),
            ("2001:db8::1", "2001:db8::1", None),
            ("[2001:db8::1]:443", "2001:db8::1", Some(443)),
        ];
        for (s, ip, port) in ok {
            assert_eq!(
                parse_endpoint(s).unwrap(),
                (ip.parse().unwrap(), *port),
                "{s}"
            );
        }
        for bad in [
            "x",
            "10.0.0.1:",
            "10.0.0.1:0",
            "[2001:db8::1]",
            "10.0.0.1:70000",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}
