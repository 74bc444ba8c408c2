//! The network options of the command line, shared by `run`, `check`, `lint` and `config`.
//! The command line adds to or overrides the config file: a preset or defaults given here
//! replace the file's, rules given here follow the file's, published ports and map entries
//! given here replace the file's entry for the same port or destination.

use std::path::PathBuf;

use super::{
    load_unvalidated, AddressMapEntry, ConfigError, DenyAction, NetworkConfig, PolicySpec,
    PolicyTable, Preset, PublishSpec, RuleSpec,
};
use crate::policy::Action;

/// The rules of one `--net-rule` value (a comma list).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleList(pub Vec<RuleSpec>);

fn parse_rule_list(s: &str) -> Result<RuleList, String> {
    let rules = RuleSpec::parse_cli_list(s)?;
    if rules.is_empty() {
        return Err("empty rule list; expected e.g. allow@public:tcp:443".into());
    }
    Ok(RuleList(rules))
}

fn parse_preset(s: &str) -> Result<Preset, String> {
    s.parse()
}

fn parse_action(s: &str) -> Result<Action, String> {
    s.parse()
}

fn parse_publish(s: &str) -> Result<PublishSpec, String> {
    s.parse()
}

fn parse_map(s: &str) -> Result<AddressMapEntry, String> {
    s.parse()
}

/// The policy grammar and examples shown by `--help` of every command that takes
/// [`NetworkArgs`].
macro_rules! net_help_text {
    () => {
        "\
Policy model (first match wins, per direction; `any` rules count in both):
  presets   none        nothing in or out
            public-only DNS to the gateway, then public egress; private, loopback,
                        link-local, metadata, host and multicast blocked (the default)
            non-local   like public-only, plus private/LAN egress
            allow-all   everything, the host included
  rule      action[:direction]@target[:proto[:ports]]
            action    allow | deny
            direction egress (default) | ingress | any
            target    * | IP | CIDR | [IPv6 or IPv6 CIDR] | domain | .suffix |
                      host | metadata | loopback | private | link-local | multicast | public
            proto     tcp | udp | icmpv4 | icmpv6 | * ; several joined with + (tcp+udp)
            ports     443 | 8000-9000 ; several joined with + (80+443)
  examples  --net-rule allow@public:tcp:443,allow@host:udp:53
            --net-rule deny@10.0.0.5 --net-rule allow@10.0.0.0/8
            --net-rule 'allow@[2001:db8::/32]:tcp:443' --net-rule allow@.example.com
            --net-default-egress deny --net-rule allow@api.example.com:tcp:443
            --map 203.0.113.7:80=127.0.0.1:8080
            --map '[2001:db8::7]:443=[::1]:8443' --map 2001:db8::9=::1

Guest addressing (slot N): IPv4 by DHCP, the N-th /30 of ipv4_pool (default 172.16.0.0/12:
gateway 172.16.0.1, guest 172.16.0.2 for slot 0); IPv6 by SLAAC from router advertisements,
the N-th /64 of ipv6_pool (default fd42:6d73:62::/48). The gateway's addresses (172.16.0.1,
fd42:6d73:62::1, fe80::1) are the `host` group, DNS server and default router."
    };
}
pub(crate) use net_help_text;

/// The text of [`net_help_text!`].
pub const NET_HELP: &str = net_help_text!();

/// Network options. Flatten into a subcommand with `#[command(flatten)]`.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(after_long_help = NET_HELP)]
pub struct NetworkArgs {
    /// Network config file: TOML or JSON (by extension), the reference's wire names
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Policy preset: none, public-only, allow-all, non-local (default public-only)
    #[arg(long, value_name = "PRESET", value_parser = parse_preset, conflicts_with = "no_net")]
    pub policy: Option<Preset>,

    /// Rules, action[:direction]@target[:proto[:ports]], comma-separated, repeatable;
    /// they follow the config file's rules (see --help for the grammar)
    #[arg(long = "net-rule", value_name = "RULES", value_parser = parse_rule_list)]
    pub net_rule: Vec<RuleList>,

    /// Egress fall-through when no rule matches: allow or deny
    #[arg(long = "net-default-egress", value_name = "ACTION", value_parser = parse_action)]
    pub net_default_egress: Option<Action>,

    /// Ingress fall-through when no rule matches: allow or deny
    #[arg(long = "net-default-ingress", value_name = "ACTION", value_parser = parse_action)]
    pub net_default_ingress: Option<Action>,

    /// No network at all (the `none` preset)
    #[arg(long = "no-net")]
    pub no_net: bool,

    /// Cap on concurrent flows from the guest
    #[arg(long = "max-connections", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Publish a guest port on the host: [BIND:]HOST_PORT:GUEST_PORT[/udp] (BIND default
    /// 127.0.0.1; IPv6 as [::1]:8080:80); repeatable. Host clients reach the guest's port
    /// under the ingress rules; bound at start (in use or privileged: exit 2)
    #[arg(short = 'p', long = "publish", value_name = "SPEC", value_parser = parse_publish)]
    pub publish: Vec<PublishSpec>,

    /// Send the host side of flows to a guest destination elsewhere:
    /// GUEST_IP[:PORT]=HOST_IP[:PORT] (IPv6 as [addr]:port); policy judges the guest address
    #[arg(long = "map", value_name = "GUEST=HOST", value_parser = parse_map)]
    pub map: Vec<AddressMapEntry>,

    /// Answer denied flows with TCP RST / ICMP unreachable instead of dropping them silently
    #[arg(long)]
    pub reject: bool,
}

impl NetworkArgs {
    /// Loads `--config` if given (else starts from the defaults), merges the command line on
    /// top and validates the result.
    pub fn resolve(&self) -> Result<NetworkConfig, ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => {
                let cfg = load_unvalidated(path)?;
                cfg.validate().map_err(|e| e.in_file(path))?;
                cfg
            }
            None => NetworkConfig::default(),
        };
        self.merge_into(&mut cfg);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies the command-line options to `cfg`.
    pub fn merge_into(&self, cfg: &mut NetworkConfig) {
        let cli_rules: Vec<RuleSpec> = self.net_rule.iter().flat_map(|l| l.0.clone()).collect();
        let preset = if self.no_net {
            Some(Preset::None)
        } else {
            self.policy
        };
        if let Some(p) = preset {
            cfg.policy = Some(match cfg.policy.take() {
                None | Some(PolicySpec::Preset(_)) => PolicySpec::Preset(p),
                Some(PolicySpec::Table(mut t)) => {
                    t.preset = Some(p);
                    PolicySpec::Table(t)
                }
            });
        }
        if self.net_default_egress.is_some() || self.net_default_ingress.is_some() {
            let mut t = match cfg.policy.take() {
                Some(PolicySpec::Table(t)) => t,
                Some(PolicySpec::Preset(p)) => PolicyTable {
                    preset: Some(p),
                    ..Default::default()
                },
                None => PolicyTable {
                    // Nothing but defaults configured: keep the implicit preset explicit so
                    // that a default alone does not turn the policy into a custom one.
                    preset: (cfg.rules.is_empty() && cli_rules.is_empty())
                        .then_some(Preset::PublicOnly),
                    ..Default::default()
                },
            };
            if let Some(a) = self.net_default_egress {
                t.default_egress = Some(a);
            }
            if let Some(a) = self.net_default_ingress {
                t.default_ingress = Some(a);
            }
            cfg.policy = Some(PolicySpec::Table(t));
        }
        cfg.rules.extend(cli_rules);
        if let Some(n) = self.max_connections {
            cfg.max_connections = Some(n);
        }
        // A command-line binding replaces the file's binding of the same host port; two
        // command-line bindings of one port stay, and validation reports them.
        cfg.ports.retain(|q| {
            !self
                .publish
                .iter()
                .any(|p| q.host_port == p.host_port && q.protocol == p.protocol && q.bind == p.bind)
        });
        cfg.ports.extend(self.publish.iter().copied());
        for m in &self.map {
            cfg.map.retain(|o| {
                !(crate::policy::canonical(o.guest) == crate::policy::canonical(m.guest)
                    && o.guest_port == m.guest_port)
            });
        }
        // Command-line entries come first, so they win over broader file entries.
        let mut map = self.map.clone();
        map.append(&mut cfg.map);
        cfg.map = map;
        if self.reject {
            cfg.deny_action = DenyAction::Reject;
        }
    }
}
