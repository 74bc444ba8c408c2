//! Table-driven tests of groups, presets and rule matching.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;
use crate::config::{NetworkConfig, PolicySpec, Preset};

fn host() -> HostAddrs {
    HostAddrs {
        ipv4: vec![Ipv4Addr::new(172, 16, 0, 1)],
        ipv6: vec!["fd42:6d73:62::1".parse().unwrap()],
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn preset(p: Preset) -> Policy {
    let cfg = NetworkConfig {
        policy: Some(PolicySpec::Preset(p)),
        ..Default::default()
    };
    Policy::compile(&cfg, &host()).unwrap()
}

fn egress(p: &Policy, proto: Protocol, dst: &str, port: Option<u16>) -> Decision {
    p.decide(&FlowQuery {
        direction: Direction::Egress,
        protocol: proto,
        dst: ip(dst),
        dst_port: port,
        domains: &[],
    })
}

#[test]
fn policy_is_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Policy>();
    f::<NetworkConfig>();
}

#[test]
fn smoke_presets() {
    let po = preset(Preset::PublicOnly);
    assert!(egress(&po, Protocol::Tcp, "203.0.113.7", Some(443)).allowed());
    let d = egress(&po, Protocol::Tcp, "10.0.0.1", Some(80));
    assert!(!d.allowed());
    assert_eq!(d.reason.to_string(), "preset public-only: private blocked");
    assert!(egress(&po, Protocol::Udp, "172.16.0.1", Some(53)).allowed());
    assert!(!egress(&po, Protocol::Tcp, "172.16.0.1", Some(80)).allowed());
    let aa = preset(Preset::AllowAll);
    assert!(egress(&aa, Protocol::Tcp, "172.16.0.1", Some(80)).allowed());
    let none = preset(Preset::None);
    assert!(!egress(&none, Protocol::Tcp, "203.0.113.7", Some(443)).allowed());
    let _ = Ipv6Addr::LOCALHOST;
}
