//! Table-driven tests of presets and rule matching: configs compiled into policies.

use crate::config::{NetworkConfig, PolicySpec, PolicyTable, Preset};
use crate::policy::tests::{host, ip};
use crate::policy::*;

fn compile(cfg: &NetworkConfig) -> Policy {
    cfg.compile_policy(&host()).unwrap()
}

fn preset(p: Preset) -> Policy {
    compile(&NetworkConfig {
        policy: Some(PolicySpec::Preset(p)),
        ..Default::default()
    })
}

/// A custom policy from command-line rule strings, with the given defaults.
fn custom(rules: &[&str], egress: Action, ingress: Action) -> Policy {
    compile(&NetworkConfig {
        policy: Some(PolicySpec::Table(PolicyTable {
            preset: None,
            default_egress: Some(egress),
            default_ingress: Some(ingress),
            rules: rules
                .iter()
                .map(|r| crate::config::RuleSpec::parse_cli(r).unwrap())
                .collect(),
        })),
        ..Default::default()
    })
}

fn q<'a>(
    dir: Direction,
    proto: Protocol,
    dst: &str,
    port: Option<u16>,
    domains: &'a [String],
) -> FlowQuery<'a> {
    FlowQuery {
        direction: dir,
        protocol: proto,
        dst: ip(dst),
        dst_port: port,
        domains,
    }
}

fn egress(p: &Policy, proto: Protocol, dst: &str, port: Option<u16>) -> Decision {
    p.decide(&q(Direction::Egress, proto, dst, port, &[]))
}

#[test]
fn policy_is_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Policy>();
    f::<NetworkConfig>();
}

/// Destinations of the preset matrix: (label, protocol, address, port).
const MATRIX: &[(&str, Protocol, &str, Option<u16>)] = &[
    ("public", Protocol::Tcp, "203.0.113.7", Some(443)),
    ("public-v6", Protocol::Tcp, "2001:db8::1", Some(443)),
    ("public-udp", Protocol::Udp, "198.51.100.1", Some(123)),
    ("public-icmp", Protocol::Icmpv4, "192.0.2.1", None),
    ("public-icmpv6", Protocol::Icmpv6, "2001:db8::2", None),
    ("private", Protocol::Tcp, "10.0.0.1", Some(80)),
    ("private-v6", Protocol::Tcp, "fd00::1", Some(80)),
    ("cgn", Protocol::Tcp, "100.64.0.1", Some(80)),
    (
        "mapped-private",
        Protocol::Tcp,
        "::ffff:192.168.1.1",
        Some(80),
    ),
    ("loopback", Protocol::Tcp, "127.0.0.1", Some(80)),
    ("loopback-v6", Protocol::Tcp, "::1", Some(80)),
    ("link-local", Protocol::Tcp, "169.254.1.1", Some(80)),
    ("link-local-v6", Protocol::Tcp, "fe80::1", Some(80)),
    ("metadata", Protocol::Tcp, "169.254.169.254", Some(80)),
    ("multicast", Protocol::Udp, "224.0.0.251", Some(5353)),
    ("host-http", Protocol::Tcp, "172.16.0.1", Some(80)),
    ("host-v6-http", Protocol::Tcp, "fd42:6d73:62::1", Some(80)),
    ("host-dns-udp", Protocol::Udp, "172.16.0.1", Some(53)),
    ("host-dns-tcp", Protocol::Tcp, "172.16.0.1", Some(53)),
    ("host-dns-v6", Protocol::Udp, "fd42:6d73:62::1", Some(53)),
    ("host-ntp", Protocol::Udp, "172.16.0.1", Some(123)),
    ("unspecified", Protocol::Tcp, "0.0.0.0", Some(80)),
    ("unspecified-v6", Protocol::Tcp, "::", Some(80)),
    ("broadcast", Protocol::Udp, "255.255.255.255", Some(67)),
];

fn expect_preset(p: Preset, label: &str) -> bool {
    let host_dns = label.starts_with("host-dns");
    let never = matches!(label, "unspecified" | "unspecified-v6" | "broadcast");
    if never {
        return false;
    }
    match p {
        Preset::None => false,
        Preset::AllowAll => true,
        Preset::PublicOnly => label.starts_with("public") || host_dns,
        Preset::NonLocal => {
            label.starts_with("public")
                || host_dns
                || matches!(label, "private" | "private-v6" | "cgn" | "mapped-private")
        }
    }
}

#[test]
fn preset_matrix() {
    for p in Preset::ALL {
        let pol = preset(p);
        for (label, proto, dst, port) in MATRIX {
            let d = egress(&pol, *proto, dst, *port);
            assert_eq!(
                d.allowed(),
                expect_preset(p, label),
                "preset {p}, {label} ({proto} {dst} {port:?}): {d}"
            );
        }
        // Ingress: allowed through published ports unless the preset is none.
        let d = pol.decide(&q(
            Direction::Ingress,
            Protocol::Tcp,
            "127.0.0.1",
            Some(80),
            &[],
        ));
        assert_eq!(d.allowed(), p != Preset::None, "preset {p} ingress: {d}");
    }
}

#[test]
fn default_config_is_public_only() {
    let pol = compile(&NetworkConfig::default());
    assert_eq!(pol.preset(), Some(Preset::PublicOnly));
    for (label, proto, dst, port) in MATRIX {
        let d = egress(&pol, *proto, dst, *port);
        assert_eq!(
            d.allowed(),
            expect_preset(Preset::PublicOnly, label),
            "{label}"
        );
    }
}

#[test]
fn reasons_display() {
    let po = preset(Preset::PublicOnly);
    let cases: &[(Protocol, &str, Option<u16>, &str)] = &[
        (
            Protocol::Tcp,
            "10.0.0.1",
            Some(80),
            "preset public-only: private blocked",
        ),
        (
            Protocol::Tcp,
            "172.16.0.1",
            Some(80),
            "preset public-only: host blocked",
        ),
        (
            Protocol::Udp,
            "172.16.0.1",
            Some(53),
            "rule 1 \"allow@host:udp:53\" (preset public-only)",
        ),
        (
            Protocol::Tcp,
            "172.16.0.1",
            Some(53),
            "rule 2 \"allow@host:tcp:53\" (preset public-only)",
        ),
        (
            Protocol::Tcp,
            "203.0.113.7",
            Some(443),
            "rule 3 \"allow@public\" (preset public-only)",
        ),
        (Protocol::Tcp, "0.0.0.0", Some(80), "unspecified address"),
        (
            Protocol::Udp,
            "255.255.255.255",
            Some(67),
            "broadcast address",
        ),
    ];
    for (proto, dst, port, want) in cases {
        assert_eq!(egress(&po, *proto, dst, *port).reason.to_string(), *want);
    }
    let none = preset(Preset::None);
    assert_eq!(
        egress(&none, Protocol::Tcp, "203.0.113.7", Some(443))
            .reason
            .to_string(),
        "preset none: networking disabled"
    );
    let c = custom(&["allow@public:tcp:443"], Action::Deny, Action::Allow);
    assert_eq!(
        egress(&c, Protocol::Tcp, "203.0.113.7", Some(443))
            .reason
            .to_string(),
        "rule 1 \"allow@public:tcp:443\""
    );
    assert_eq!(
        egress(&c, Protocol::Tcp, "203.0.113.7", Some(80))
            .reason
            .to_string(),
        "default egress deny"
    );
    let d = c.decide(&q(
        Direction::Ingress,
        Protocol::Tcp,
        "127.0.0.1",
        Some(80),
        &[],
    ));
    assert_eq!(d.reason.to_string(), "default ingress allow");
    assert_eq!(d.to_string(), "allow (default ingress allow)");
}

#[test]
fn first_match_wins() {
    let a = custom(
        &["allow@10.0.0.0/8", "deny@10.0.0.5"],
        Action::Deny,
        Action::Allow,
    );
    let d = egress(&a, Protocol::Tcp, "10.0.0.5", Some(80));
    assert!(d.allowed());
    assert_eq!(d.reason.to_string(), "rule 1 \"allow@10.0.0.0/8\"");
    let b = custom(
        &["deny@10.0.0.5", "allow@10.0.0.0/8"],
        Action::Deny,
        Action::Allow,
    );
    let d = egress(&b, Protocol::Tcp, "10.0.0.5", Some(80));
    assert!(!d.allowed());
    assert_eq!(d.reason.to_string(), "rule 1 \"deny@10.0.0.5\"");
    assert!(egress(&b, Protocol::Tcp, "10.0.0.6", Some(80)).allowed());
    assert!(!egress(&b, Protocol::Tcp, "11.0.0.6", Some(80)).allowed());
    // Preset rules come first, custom rules follow.
    let cfg = NetworkConfig {
        policy: Some(PolicySpec::Preset(Preset::PublicOnly)),
        rules: vec![
            crate::config::RuleSpec::parse_cli("deny@203.0.113.7").unwrap(),
            crate::config::RuleSpec::parse_cli("allow@host:tcp:8080").unwrap(),
        ],
        ..Default::default()
    };
    let p = compile(&cfg);
    assert!(egress(&p, Protocol::Tcp, "203.0.113.7", Some(80)).allowed());
    let d = egress(&p, Protocol::Tcp, "172.16.0.1", Some(8080));
    assert!(d.allowed());
    assert_eq!(d.reason.to_string(), "rule 5 \"allow@host:tcp:8080\"");
    assert!(!egress(&p, Protocol::Tcp, "172.16.0.1", Some(8081)).allowed());
}

#[test]
fn ports_and_ranges() {
    let p = custom(
        &["allow@public:tcp:443", "allow@public:udp:8000-9000+53"],
        Action::Deny,
        Action::Allow,
    );
    let cases: &[(Protocol, Option<u16>, bool)] = &[
        (Protocol::Tcp, Some(443), true),
        (Protocol::Tcp, Some(442), false),
        (Protocol::Tcp, Some(444), false),
        (Protocol::Tcp, None, false),
        (Protocol::Tcp, Some(8000), false),
        (Protocol::Udp, Some(443), false),
        (Protocol::Udp, Some(7999), false),
        (Protocol::Udp, Some(8000), true),
        (Protocol::Udp, Some(8500), true),
        (Protocol::Udp, Some(9000), true),
        (Protocol::Udp, Some(9001), false),
        (Protocol::Udp, Some(53), true),
        (Protocol::Udp, Some(54), false),
        (Protocol::Icmpv4, None, false),
    ];
    for (proto, port, want) in cases {
        let d = egress(&p, *proto, "203.0.113.7", *port);
        assert_eq!(d.allowed(), *want, "{proto} {port:?}: {d}");
    }
    let full = custom(&["allow@*:tcp:1-65535"], Action::Deny, Action::Allow);
    assert!(egress(&full, Protocol::Tcp, "203.0.113.7", Some(1)).allowed());
    assert!(egress(&full, Protocol::Tcp, "203.0.113.7", Some(65535)).allowed());
}

#[test]
fn protocols() {
    let p = custom(
        &[
            "allow@public:tcp+udp",
            "allow@192.0.2.0/24:icmpv4",
            "allow@2001:db8::/32",
        ],
        Action::Deny,
        Action::Allow,
    );
    let cases: &[(Protocol, &str, bool)] = &[
        (Protocol::Tcp, "203.0.113.7", true),
        (Protocol::Udp, "203.0.113.7", true),
        (Protocol::Icmpv4, "203.0.113.7", false),
        (Protocol::Icmpv4, "192.0.2.9", true),
        (Protocol::Tcp, "192.0.2.9", true),      // rule 1: public
        (Protocol::Icmpv6, "2001:db8::9", true), // rule 3 has no protocol filter
        (Protocol::Icmpv6, "2001:db9::9", false),
    ];
    for (proto, dst, want) in cases {
        let port = if proto.is_icmp() { None } else { Some(80) };
        let d = egress(&p, *proto, dst, port);
        assert_eq!(d.allowed(), *want, "{proto} {dst}: {d}");
    }
}

#[test]
fn directions() {
    let p = custom(
        &[
            "deny@203.0.113.1",
            "deny:ingress@198.51.100.1",
            "deny:any@192.0.2.1",
        ],
        Action::Allow,
        Action::Allow,
    );
    let cases: &[(Direction, &str, bool)] = &[
        (Direction::Egress, "203.0.113.1", false),
        (Direction::Ingress, "203.0.113.1", true),
        (Direction::Egress, "198.51.100.1", true),
        (Direction::Ingress, "198.51.100.1", false),
        (Direction::Egress, "192.0.2.1", false),
        (Direction::Ingress, "192.0.2.1", false),
        (Direction::Egress, "192.0.2.2", true),
    ];
    for (dir, dst, want) in cases {
        let d = p.decide(&q(*dir, Protocol::Tcp, dst, Some(80), &[]));
        assert_eq!(d.allowed(), *want, "{dir} {dst}: {d}");
    }
}

#[test]
fn defaults() {
    for (e, i) in [
        (Action::Allow, Action::Allow),
        (Action::Allow, Action::Deny),
        (Action::Deny, Action::Allow),
        (Action::Deny, Action::Deny),
    ] {
        let p = custom(&[], e, i);
        let de = egress(&p, Protocol::Tcp, "203.0.113.7", Some(80));
        assert_eq!(de.action, e);
        assert_eq!(de.reason.to_string(), format!("default egress {e}"));
        let di = p.decide(&q(
            Direction::Ingress,
            Protocol::Tcp,
            "203.0.113.7",
            Some(80),
            &[],
        ));
        assert_eq!(di.action, i);
        assert_eq!(di.reason.to_string(), format!("default ingress {i}"));
    }
    // A table without a preset and without defaults: egress deny, ingress allow.
    let p = compile(&NetworkConfig {
        policy: Some(PolicySpec::Table(PolicyTable::default())),
        ..Default::default()
    });
    assert!(!egress(&p, Protocol::Tcp, "203.0.113.7", Some(80)).allowed());
    assert!(p
        .decide(&q(
            Direction::Ingress,
            Protocol::Tcp,
            "203.0.113.7",
            Some(80),
            &[]
        ))
        .allowed());
    // Top-level rules without a preset: custom policy, no implicit allow-public.
    let p = compile(&NetworkConfig {
        rules: vec![crate::config::RuleSpec::parse_cli("allow@host").unwrap()],
        ..Default::default()
    });
    assert_eq!(p.preset(), None);
    assert!(egress(&p, Protocol::Tcp, "172.16.0.1", Some(80)).allowed());
    assert!(!egress(&p, Protocol::Tcp, "203.0.113.7", Some(80)).allowed());
    // A preset with an explicit default: the reason names the default, not the preset.
    let p = compile(&NetworkConfig {
        policy: Some(PolicySpec::Table(PolicyTable {
            preset: Some(Preset::PublicOnly),
            default_egress: Some(Action::Allow),
            ..Default::default()
        })),
        ..Default::default()
    });
    let d = egress(&p, Protocol::Tcp, "10.0.0.1", Some(80));
    assert!(d.allowed());
    assert_eq!(d.reason.to_string(), "default egress allow");
}

#[test]
fn mapped_addresses_cannot_bypass() {
    let p = custom(
        &["deny@10.0.0.0/8", "deny@192.0.2.1"],
        Action::Allow,
        Action::Allow,
    );
    for dst in [
        "10.1.2.3",
        "::ffff:10.1.2.3",
        "::10.1.2.3",
        "192.0.2.1",
        "::ffff:192.0.2.1",
    ] {
        assert!(!egress(&p, Protocol::Tcp, dst, Some(80)).allowed(), "{dst}");
    }
    // A rule written with a mapped range or address is judged as IPv4 too.
    let p = custom(
        &["deny@[::ffff:10.0.0.0/104]"],
        Action::Allow,
        Action::Allow,
    );
    assert!(!egress(&p, Protocol::Tcp, "10.9.9.9", Some(80)).allowed());
    assert!(!egress(&p, Protocol::Tcp, "::ffff:10.9.9.9", Some(80)).allowed());
    // A rule written with a mapped address is judged as the IPv4 address too.
    let p = custom(&["deny@::ffff:192.0.2.7"], Action::Allow, Action::Allow);
    assert!(!egress(&p, Protocol::Tcp, "192.0.2.7", Some(80)).allowed());
    let po = preset(Preset::PublicOnly);
    for dst in [
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:172.16.0.1",
    ] {
        assert!(
            !egress(&po, Protocol::Tcp, dst, Some(80)).allowed(),
            "{dst}"
        );
    }
    let aa = preset(Preset::AllowAll);
    for dst in ["0.0.0.0", "::", "::ffff:0.0.0.0"] {
        let d = egress(&aa, Protocol::Tcp, dst, Some(80));
        assert_eq!(d.reason, Reason::Unspecified, "{dst}");
    }
}

#[test]
fn domain_rules() {
    let p = custom(
        &[
            "allow@api.example.com:tcp:443",
            "allow@.example.org",
            "deny@*",
        ],
        Action::Deny,
        Action::Allow,
    );
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cases: &[(&[&str], u16, bool)] = &[
        (&["api.example.com"], 443, true),
        (&["API.Example.COM."], 443, true),
        (&["api.example.com"], 80, false),
        (&["www.example.com"], 443, false),
        (&["example.com"], 443, false),
        (&["example.org"], 80, true), // suffix: the apex
        (&["a.b.example.org"], 80, true),
        (&["badexample.org"], 80, false),
        (&["other.test", "x.example.org"], 80, true), // any of the names
        (&[], 443, false),
    ];
    for (names, port, want) in cases {
        let names = s(names);
        let d = p.decide(&q(
            Direction::Egress,
            Protocol::Tcp,
            "203.0.113.7",
            Some(*port),
            &names,
        ));
        assert_eq!(d.allowed(), *want, "{names:?}:{port}: {d}");
    }
}

#[test]
fn deny_domain_lists() {
    let cfg = NetworkConfig {
        deny_domains: vec!["Evil.Example".into()],
        deny_domain_suffixes: vec![".ads.example".into(), "*.track.example".into()],
        rules: vec![crate::config::RuleSpec::parse_cli("allow@*").unwrap()],
        ..Default::default()
    };
    let p = compile(&cfg);
    let s = |x: &str| vec![x.to_string()];
    let cases: &[(&str, Option<&str>)] = &[
        ("evil.example", Some("deny_domains \"evil.example\"")),
        ("EVIL.example.", Some("deny_domains \"evil.example\"")),
        ("www.evil.example", None),
        ("ads.example", Some("deny_domain_suffixes \".ads.example\"")),
        (
            "x.y.ads.example",
            Some("deny_domain_suffixes \".ads.example\""),
        ),
        ("bads.example", None),
        (
            "a.track.example",
            Some("deny_domain_suffixes \".track.example\""),
        ),
        ("good.example", None),
    ];
    for (name, want) in cases {
        let names = s(name);
        let d = p.decide(&q(
            Direction::Egress,
            Protocol::Tcp,
            "203.0.113.7",
            Some(443),
            &names,
        ));
        match want {
            Some(r) => {
                assert!(!d.allowed(), "{name}");
                assert_eq!(d.reason.to_string(), *r);
                assert_eq!(
                    p.domain_denied(name).map(|r| r.to_string()).as_deref(),
                    Some(*r)
                );
            }
            None => {
                assert!(d.allowed(), "{name}: {d}");
                assert_eq!(p.domain_denied(name), None, "{name}");
            }
        }
    }
    // Ingress is not judged by names.
    let names = s("evil.example");
    assert!(p
        .decide(&q(
            Direction::Ingress,
            Protocol::Tcp,
            "203.0.113.7",
            Some(443),
            &names
        ))
        .allowed());
}

#[test]
fn domain_denied_by_rules() {
    let p = custom(
        &[
            "allow@ok.bad.example",
            "deny@.bad.example",
            "deny@api.example.com:tcp:443",
            "deny:ingress@ingress.example",
            "deny@blocked.example",
        ],
        Action::Allow,
        Action::Allow,
    );
    let cases: &[(&str, Option<&str>)] = &[
        ("bad.example", Some("rule 2 \"deny@.bad.example\"")),
        ("x.bad.example.", Some("rule 2 \"deny@.bad.example\"")),
        ("OK.bad.example", None),  // an earlier allow rule
        ("api.example.com", None), // a port-limited deny does not stop resolution
        ("ingress.example", None), // ingress rules do not apply to DNS
        ("Blocked.Example", Some("rule 5 \"deny@blocked.example\"")),
        ("example.com", None),
    ];
    for (name, want) in cases {
        assert_eq!(
            p.domain_denied(name).map(|r| r.to_string()).as_deref(),
            *want,
            "{name}"
        );
    }
    assert_eq!(
        preset(Preset::None).domain_denied("example.com"),
        Some(Reason::NetworkDisabled)
    );
    assert_eq!(
        preset(Preset::PublicOnly).domain_denied("example.com"),
        None
    );
}

#[test]
fn explicit_ip_allows() {
    let p = custom(
        &[
            "allow@10.0.0.5",
            "allow@192.168.0.0/16:tcp:443",
            "deny@172.20.0.1",
            "allow:ingress@172.21.0.1",
            "allow@private",
            "allow@fd00::/8",
        ],
        Action::Deny,
        Action::Allow,
    );
    let cases: &[(&str, bool)] = &[
        ("10.0.0.5", true),
        ("::ffff:10.0.0.5", true),
        ("10.0.0.6", false), // only the group rule covers it
        ("192.168.7.7", true),
        ("172.20.0.1", false),
        ("172.21.0.1", false),
        ("fd12::1", true),
        ("fe80::1", false),
    ];
    for (addr, want) in cases {
        assert_eq!(p.explicitly_allows_ip(ip(addr)), *want, "{addr}");
    }
}

#[test]
fn accessors() {
    let cfg = NetworkConfig {
        max_connections: Some(7),
        deny_action: crate::config::DenyAction::Reject,
        ..Default::default()
    };
    let p = compile(&cfg);
    assert_eq!(p.max_connections(), Some(7));
    assert_eq!(p.deny_action(), crate::config::DenyAction::Reject);
    assert!(p.network_enabled());
    assert!(!preset(Preset::None).network_enabled());
    assert_eq!(p.rules().len(), 3);
    assert_eq!(
        compile(&NetworkConfig::default()).deny_action(),
        crate::config::DenyAction::Drop
    );
}
