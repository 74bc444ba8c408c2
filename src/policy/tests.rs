//! Tests of the policy vocabulary that need no config: groups and name matching.

use std::net::{IpAddr, Ipv4Addr};

use super::*;

fn host() -> HostAddrs {
    HostAddrs {
        ipv4: vec![Ipv4Addr::new(172, 16, 0, 1)],
        ipv6: vec!["fd42:6d73:62::1".parse().unwrap()],
    }
}

fn ip(s: &str) -> IpAddr {
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
        ("::2", Some(Public)), // IPv4-compatible 0.0.0.2
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
        ("fec0::", Some(Public)),
        // multicast 224/4, ff00::/8
        ("223.255.255.255", Some(Public)),
        ("224.0.0.0", Some(Multicast)),
        ("239.255.255.255", Some(Multicast)),
        ("240.0.0.0", Some(Public)),
        ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(Public)),
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
        ("255.255.255.255", Some(Public)),
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
