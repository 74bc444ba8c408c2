//! Tests of the policy vocabulary that need no config: groups and name matching.

use std::net::{IpAddr, Ipv4Addr};

use super::*;

/// The gateway addresses of slot 0, for the tests of policy and of compiled configs.
pub(crate) fn host() -> HostAddrs {
    HostAddrs {
        ipv4: vec![Ipv4Addr::new(172, 16, 0, 1)],
        ipv6: vec!["fd42:6d73:62::1".parse().unwrap()],
        ..HostAddrs::default()
    }
}

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn group_boundaries() {
    use Group::*;
    let h = host();
    let table: &[(&str, Option<Group>)] = &[
        // unspecified: no group, in any spelling
        ("0.0.0.0", None),
        ("::", None),
        ("::ffff:0.0.0.0", None),
        // host (the gateway) beats private
        ("172.16.0.1", Some(Host)),
        ("fd42:6d73:62::1", Some(Host)),
        ("::ffff:172.16.0.1", Some(Host)),
        ("172.16.0.2", Some(Private)),
        ("fd42:6d73:62::2", Some(Private)),
        // metadata beats link-local
        ("169.254.169.254", Some(Metadata)),
        ("169.254.169.253", Some(LinkLocal)),
        ("169.254.169.255", Some(LinkLocal)),
        ("::ffff:169.254.169.254", Some(Metadata)),
        // loopback 127/8, ::1
        ("126.255.255.255", Some(Public)),
        ("127.0.0.0", Some(Loopback)),
        ("127.255.255.255", Some(Loopback)),
        ("128.0.0.0", Some(Public)),
        ("::1", Some(Loopback)),
        ("::2", None), // IPv4-compatible 0.0.0.2, in 0.0.0.0/8
        ("::ffff:127.0.0.1", Some(Loopback)),
        ("::127.0.0.1", Some(Loopback)), // IPv4-compatible
        // private 10/8
        ("9.255.255.255", Some(Public)),
        ("10.0.0.0", Some(Private)),
        ("10.255.255.255", Some(Private)),
        ("11.0.0.0", Some(Public)),
        // private 172.16/12
        ("172.15.255.255", Some(Public)),
        ("172.16.0.0", Some(Private)),
        ("172.31.255.255", Some(Private)),
        ("172.32.0.0", Some(Public)),
        // private 192.168/16
        ("192.167.255.255", Some(Public)),
        ("192.168.0.0", Some(Private)),
        ("192.168.255.255", Some(Private)),
        ("192.169.0.0", Some(Public)),
        // CGN 100.64/10
        ("100.63.255.255", Some(Public)),
        ("100.64.0.0", Some(Private)),
        ("100.127.255.255", Some(Private)),
        ("100.128.0.0", Some(Public)),
        // ULA fc00::/7
        ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(Public)),
        ("fc00::", Some(Private)),
        ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(Private)),
        ("fe00::", Some(Public)),
        // link-local 169.254/16, fe80::/10
        ("169.253.255.255", Some(Public)),
        ("169.254.0.0", Some(LinkLocal)),
        ("169.254.255.255", Some(LinkLocal)),
        ("169.255.0.0", Some(Public)),
        ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(Public)),
        ("fe80::", Some(LinkLocal)),
        ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(LinkLocal)),
        // deprecated site-local fec0::/10 is private
        ("fec0::", Some(Private)),
        // multicast 224/4, ff00::/8
        ("223.255.255.255", Some(Public)),
        ("224.0.0.0", Some(Multicast)),
        ("239.255.255.255", Some(Multicast)),
        ("240.0.0.0", Some(Public)),
        ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(Private)),
        ("ff00::", Some(Multicast)),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(Multicast)),
        ("::ffff:224.0.0.1", Some(Multicast)),
        // public, both families, and mapped/compatible spellings of private addresses
        ("203.0.113.7", Some(Public)),
        ("1.1.1.1", Some(Public)),
        ("2001:db8::1", Some(Public)),
        ("::ffff:10.0.0.1", Some(Private)),
        ("::10.0.0.1", Some(Private)),
        ("::ffff:192.168.1.1", Some(Private)),
        ("::ffff:8.8.8.8", Some(Public)),
        // "this network" 0.0.0.0/8 and the limited broadcast address: no group
        ("0.0.0.1", None),
        ("0.255.255.255", None),
        ("1.0.0.0", Some(Public)),
        ("255.255.255.255", None),
        ("255.255.255.254", Some(Public)),
        ("::ffff:0.1.2.3", None),
        ("::ffff:255.255.255.255", None),
        // NAT64 (RFC 6052 /96, RFC 8215 local-use /48) and 6to4 spellings
        ("64:ff9b::a00:1", Some(Private)),
        ("64:ff9b::7f00:1", Some(Loopback)),
        ("64:ff9b::a9fe:a9fe", Some(Metadata)),
        ("64:ff9b::ac10:1", Some(Host)),
        ("64:ff9b::e000:fb", Some(Multicast)),
        ("64:ff9b::", None),
        ("64:ff9b::cb00:7107", Some(Public)),
        ("64:ff9b:1:a01:2:300::", Some(Private)),
        ("64:ff9b:1:7f00:0:100::", Some(Loopback)),
        ("64:ff9b:1:cb00:71:700::", Some(Public)),
        ("2002:a01:203::", Some(Private)),
        ("2002:a9fe:a9fe:1::2", Some(Metadata)),
        ("2002:ac10:1::", Some(Host)),
        ("2002:cb00:7107::1", Some(Public)),
        ("2002::1", None),
    ];
    for (addr, want) in table {
        assert_eq!(group_of(ip(addr), &h), *want, "group_of({addr})");
    }
    // Without gateway addresses, the gateway is just a private address.
    assert_eq!(
        group_of(ip("172.16.0.1"), &HostAddrs::default()),
        Some(Private)
    );
}

#[test]
fn group_names_round_trip() {
    for g in Group::ALL {
        assert_eq!(g.to_string().parse::<Group>(), Ok(g));
    }
    assert_eq!("link_local".parse::<Group>(), Ok(Group::LinkLocal));
    assert_eq!("PUBLIC".parse::<Group>(), Ok(Group::Public));
    assert!("publc".parse::<Group>().unwrap_err().contains("link-local"));
}

#[test]
fn suffix_matching() {
    let cases: &[(&str, &str, bool)] = &[
        ("example.com", "example.com", true),
        ("a.example.com", "example.com", true),
        ("a.b.example.com", "example.com", true),
        ("badexample.com", "example.com", false),
        ("example.com.evil", "example.com", false),
        ("com", "example.com", false),
    ];
    for (n, s, want) in cases {
        assert_eq!(suffix_matches(n, s), *want, "{n} ~ {s}");
    }
}

/// (written, judged as): every IPv6 spelling that carries an IPv4 address is judged as it.
const CANONICAL: &[(&str, &str)] = &[
    // mapped and compatible
    ("::ffff:10.0.0.1", "10.0.0.1"),
    ("::10.0.0.1", "10.0.0.1"),
    ("::", "::"),
    ("::1", "::1"),
    ("::ffff:0:0", "0.0.0.0"),
    // NAT64 well-known prefix 64:ff9b::/96: the last 32 bits
    ("64:ff9b::a00:1", "10.0.0.1"),
    ("64:ff9b::8.8.8.8", "8.8.8.8"),
    ("64:ff9b::", "0.0.0.0"),
    ("64:ff9b::ffff:ffff", "255.255.255.255"),
    // outside the /96 (bits 64..95 not zero): not NAT64 (but see 64:ff9b:1::/48)
    ("64:ff9b:0:0:1::a00:1", "64:ff9b:0:0:1::a00:1"),
    ("64:ff9b:0:0:0:1:a00:1", "64:ff9b:0:0:0:1:a00:1"),
    ("64:ff9a::a00:1", "64:ff9a::a00:1"),
    // NAT64 local-use 64:ff9b:1::/48 (RFC 8215), RFC 6052 layout for a /48 prefix: the first
    // two octets in bits 48..63, the u octet (bits 64..71) skipped, the last two in 72..87
    ("64:ff9b:1:a01:2:300::", "10.1.2.3"),
    ("64:ff9b:1:a01:ff02:300::", "10.1.2.3"), // u octet not zero: still judged
    ("64:ff9b:1:a01:2:3ff:ffff:ffff", "10.1.2.3"), // suffix not zero: still judged
    ("64:ff9b:1:c000:2:3200::", "192.0.2.50"),
    ("64:ff9b:1:ffff:ff:ff00::", "255.255.255.255"),
    ("64:ff9b:1::", "0.0.0.0"),
    ("64:ff9b:1::a01:203", "0.0.0.0"), // the /96 layout does not apply inside the /48
    ("64:ff9b:2:a01:2:300::", "64:ff9b:2:a01:2:300::"),
    // 6to4 2002::/16: bits 16..47, whatever follows
    ("2002:a01:203::", "10.1.2.3"),
    ("2002:c000:232:1:2:3:4:5", "192.0.2.50"),
    ("2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "255.255.255.255"),
    ("2002::", "0.0.0.0"),
    ("2003:a01:203::", "2003:a01:203::"),
    ("2001:ffff:ffff::", "2001:ffff:ffff::"),
    // plain addresses of either family are themselves
    ("10.0.0.1", "10.0.0.1"),
    ("2001:db8::1", "2001:db8::1"),
];

#[test]
fn canonical_spellings() {
    for (written, judged) in CANONICAL {
        assert_eq!(canonical(ip(written)), ip(judged), "canonical({written})");
        // Idempotent: the judged address is its own canonical form.
        assert_eq!(canonical(ip(judged)), ip(judged), "canonical({judged})");
    }
}

#[test]
fn describe_lists_the_table() {
    let private = Group::Private.describe().to_string();
    for net in [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
        "fec0::/10",
    ] {
        assert!(private.contains(net), "private: {private}");
    }
    assert_eq!(Group::Metadata.describe().to_string(), "169.254.169.254");
    assert_eq!(Group::Loopback.describe().to_string(), "127.0.0.0/8, ::1");
    assert_eq!(
        Group::LinkLocal.describe().to_string(),
        "169.254.0.0/16, fe80::/10 (excluding metadata)"
    );
    assert_eq!(
        Group::Multicast.describe().to_string(),
        "224.0.0.0/4, ff00::/8"
    );
    let public = Group::Public.describe().to_string();
    for net in ["0.0.0.0/8", "255.255.255.255", "::"] {
        assert!(public.contains(net), "public: {public}");
    }
}

fn parts(rules: &[&str], egress: Action, ingress: Action) -> PolicyParts {
    PolicyParts {
        preset: None,
        default_egress: egress,
        default_ingress: ingress,
        preset_egress_default: false,
        preset_ingress_default: false,
        rules: rules
            .iter()
            .map(|r| RuleSpec::parse_cli(r).unwrap())
            .collect(),
        deny_domains: Vec::new(),
        deny_suffixes: Vec::new(),
        deny_action: DenyAction::Drop,
        max_connections: None,
    }
}

fn custom(rules: &[&str], egress: Action) -> Policy {
    Policy::new(parts(rules, egress, Action::Allow), &host())
}

fn public_only() -> Policy {
    let mut p = parts(&[], Action::Deny, Action::Allow);
    p.preset = Some(Preset::PublicOnly);
    p.preset_egress_default = true;
    p.preset_ingress_default = true;
    Policy::new(p, &host())
}

fn judge(p: &Policy, dir: Direction, dst: &str) -> Decision {
    p.decide(&FlowQuery {
        direction: dir,
        protocol: Protocol::Tcp,
        dst: ip(dst),
        dst_port: Some(80),
        domains: &[],
    })
}

fn egress(p: &Policy, dst: &str) -> Decision {
    judge(p, Direction::Egress, dst)
}

#[test]
fn embedded_ipv4_rules_match_every_spelling() {
    let v4_spellings = [
        "10.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
        "64:ff9b:1:a00:0:100::",
        "2002:a00:1::",
        "2002:a00:1:ffff::1",
    ];
    let deny = custom(&["deny@10.0.0.0/8"], Action::Allow);
    let allow = custom(&["allow@10.0.0.0/8"], Action::Deny);
    let deny_ip = custom(&["deny@10.0.0.1"], Action::Allow);
    for dst in v4_spellings {
        assert!(!egress(&deny, dst).allowed(), "deny@10.0.0.0/8 vs {dst}");
        assert!(egress(&allow, dst).allowed(), "allow@10.0.0.0/8 vs {dst}");
        assert!(!egress(&deny_ip, dst).allowed(), "deny@10.0.0.1 vs {dst}");
        assert!(allow.explicitly_allows_ip(ip(dst)), "{dst}");
    }
    // A rule written with an embedding spelling is judged as the IPv4 address too.
    let p = custom(&["deny@64:ff9b::a00:1"], Action::Allow);
    assert!(!egress(&p, "10.0.0.1").allowed());
    assert!(!egress(&p, "2002:a00:1::").allowed());
    // An IPv6 CIDR rule matches the addresses it contains as written.
    for (rule, inside, outside) in [
        ("deny@[64:ff9b::/96]", "64:ff9b::cb00:7107", "203.0.113.7"),
        ("deny@[64:ff9b::a00:0/104]", "64:ff9b::a00:1", "10.0.0.1"),
        ("deny@[2002::/16]", "2002:cb00:7107::1", "203.0.113.7"),
        ("deny@[64:ff9b:1::/48]", "64:ff9b:1:a01:2:300::", "10.1.2.3"),
        ("deny@[::/0]", "64:ff9b::cb00:7107", "203.0.113.7"),
    ] {
        let p = custom(&[rule], Action::Allow);
        assert!(!egress(&p, inside).allowed(), "{rule} vs {inside}");
        assert!(egress(&p, outside).allowed(), "{rule} vs {outside}");
    }
    let p = custom(&["allow@[2002::/16]"], Action::Deny);
    assert!(p.explicitly_allows_ip(ip("2002:a00:1::")));
    assert!(!p.explicitly_allows_ip(ip("10.0.0.1")));
}

#[test]
fn preset_judges_embedded_ipv4() {
    let po = public_only();
    for (dst, want) in [
        ("64:ff9b::a00:1", "preset public-only: private blocked"),
        ("64:ff9b::7f00:1", "preset public-only: loopback blocked"),
        ("64:ff9b::a9fe:a9fe", "preset public-only: metadata blocked"),
        ("2002:ac10:1::", "preset public-only: host blocked"),
        (
            "64:ff9b:1:a9fe:0:100::",
            "preset public-only: link-local blocked",
        ),
        ("2002:e000:1::", "preset public-only: multicast blocked"),
        ("fec0::1", "preset public-only: private blocked"),
    ] {
        let d = egress(&po, dst);
        assert!(!d.allowed(), "{dst}: {d}");
        assert_eq!(d.reason.to_string(), want, "{dst}");
    }
    for dst in [
        "64:ff9b::cb00:7107",
        "2002:cb00:7107::",
        "64:ff9b:1:cb00:71:700::",
    ] {
        assert!(egress(&po, dst).allowed(), "{dst}");
    }
}

#[test]
fn no_group_addresses_are_denied_outright() {
    let allow_all = custom(&["allow@*"], Action::Allow);
    for (dir, dst, want) in [
        (Direction::Egress, "0.0.0.0", "unspecified address"),
        (Direction::Egress, "::", "unspecified address"),
        (
            Direction::Egress,
            "0.1.2.3",
            "this-network address (0.0.0.0/8)",
        ),
        (
            Direction::Egress,
            "64:ff9b::0.1.2.3",
            "this-network address (0.0.0.0/8)",
        ),
        (Direction::Egress, "2002::1", "unspecified address"),
        (Direction::Egress, "255.255.255.255", "broadcast address"),
        (Direction::Ingress, "255.255.255.255", "broadcast address"),
        (
            Direction::Ingress,
            "0.1.2.3",
            "this-network address (0.0.0.0/8)",
        ),
    ] {
        let d = judge(&allow_all, dir, dst);
        assert!(!d.allowed(), "{dir} {dst}: {d}");
        assert_eq!(d.reason.to_string(), want, "{dir} {dst}");
    }
}

/// The host's own addresses (here a fixed list) are `host`, in every spelling; only private,
/// public and IPv4 link-local addresses are asked about.
#[test]
fn host_own_addresses_are_host() {
    use Group::*;
    let local = |addrs: &[&str]| {
        host().with_local(LocalAddrs::Fixed(addrs.iter().map(|a| ip(a)).collect()))
    };
    let h = local(&[
        "192.0.2.50",
        "10.9.9.9",
        "2001:db8::50",
        "2002:c633:6401::1",
        "127.0.0.5",
        "169.254.7.7",
        "fe80::7",
        "224.0.0.7",
        "169.254.169.254",
    ]);
    for (addr, want) in [
        ("192.0.2.50", Some(Host)),
        ("::ffff:192.0.2.50", Some(Host)),
        ("64:ff9b::c000:232", Some(Host)),
        ("2002:c000:232::9", Some(Host)),
        ("192.0.2.51", Some(Public)),
        ("10.9.9.9", Some(Host)),
        ("10.9.9.8", Some(Private)),
        ("2001:db8::50", Some(Host)),
        ("2001:db8::51", Some(Public)),
        // a 6to4 address of the host's own: as written it is the host's
        ("2002:c633:6401::1", Some(Host)),
        ("2002:c633:6401::2", Some(Public)),
        ("198.51.100.1", Some(Public)),
        // an IPv4 link-local address of the host's own reaches its services too
        ("169.254.7.7", Some(Host)),
        ("169.254.7.8", Some(LinkLocal)),
        // groups where the host's addresses do not matter are not asked about
        ("127.0.0.5", Some(Loopback)),
        ("fe80::7", Some(LinkLocal)),
        ("224.0.0.7", Some(Multicast)),
        ("169.254.169.254", Some(Metadata)),
    ] {
        assert_eq!(group_of(ip(addr), &h), want, "group_of({addr})");
    }
    assert_eq!(group_of(ip("192.0.2.50"), &host()), Some(Public));

    let po = public_only();
    let po_local = Policy::new(
        PolicyParts {
            preset: Some(Preset::PublicOnly),
            preset_egress_default: true,
            preset_ingress_default: true,
            ..parts(&[], Action::Deny, Action::Allow)
        },
        &local(&["192.0.2.50", "2001:db8::50"]),
    );
    for dst in ["192.0.2.50", "64:ff9b::c000:232", "2001:db8::50"] {
        assert!(egress(&po, dst).allowed(), "{dst} without local addresses");
        let d = egress(&po_local, dst);
        assert!(!d.allowed(), "{dst}: {d}");
        assert_eq!(d.reason.to_string(), "preset public-only: host blocked");
    }
    assert!(egress(&po_local, "192.0.2.51").allowed());
    // An explicit rule for the address still decides.
    let explicit = Policy::new(
        parts(&["allow@192.0.2.50"], Action::Deny, Action::Allow),
        &local(&["192.0.2.50"]),
    );
    assert!(egress(&explicit, "192.0.2.50").allowed());
}
