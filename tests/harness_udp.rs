//! UDP through netfence: echo via a mapped documentation address and via the gateway alias.

mod common;

use std::sync::atomic::Ordering;

use common::servers::*;
use common::*;
use smoltcp::wire::{IpAddress, IpEndpoint};

#[test]
fn udp_echo_via_mapped_address() {
    let echo = UdpEchoServer::start();
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:7=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_up(&nf);
    let h = g.udp_bind(40007);
    // Sizes up to the largest unfragmented datagram at MTU 1500.
    for (i, len) in [1usize, 64, 512, 1000, 1472].into_iter().enumerate() {
        let msg = pattern(len, i as u64);
        g.udp_send(h, PUBLIC_IP, 7, &msg);
        let (back, from) = g
            .udp_recv(h, deadline(SHORT))
            .unwrap_or_else(|| panic!("no UDP echo for a {len}-byte datagram"));
        assert_eq!(
            from,
            IpEndpoint::new(IpAddress::Ipv4(PUBLIC_IP), 7),
            "reply source must be the guest-visible address"
        );
        assert!(back == msg, "{len}-byte echo differs");
    }
    assert_eq!(echo.received.load(Ordering::SeqCst), 5);
    let d = nf
        .wait_for_decision(&format!("{PUBLIC_IP}:7"), SHORT)
        .expect("decision logged");
    assert_eq!(d.action, "allow", "{}", d.line);
}

#[test]
fn udp_echo_many_datagrams_one_flow() {
    let echo = UdpEchoServer::start();
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:9=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_up(&nf);
    let h = g.udp_bind(40009);
    let mut got = 0;
    for i in 0..200u32 {
        g.udp_send(h, PUBLIC_IP, 9, &i.to_be_bytes());
        let (back, _) = g
            .udp_recv(h, deadline(SHORT))
            .unwrap_or_else(|| panic!("datagram {i} not echoed"));
        assert_eq!(back, i.to_be_bytes());
        got += 1;
    }
    assert_eq!(got, 200);
    // One flow, one decision.
    let n = nf
        .decisions()
        .iter()
        .filter(|d| d.dst == format!("{PUBLIC_IP}:9"))
        .count();
    assert_eq!(
        n,
        1,
        "one UDP flow should be decided once:\n{}",
        nf.log_text()
    );
}

#[test]
fn udp_echo_via_gateway_address() {
    let echo = UdpEchoServer::start();
    let nf = Netfence::spawn(&["--policy", "allow-all"]);
    let mut g = guest_up(&nf);
    let h = g.udp_bind(40008);
    g.udp_send(h, GATEWAY, echo.port(), b"hello host");
    let (back, from) = g
        .udp_recv(h, deadline(SHORT))
        .expect("no UDP echo via the gateway");
    assert_eq!(back, b"hello host");
    assert_eq!(from, IpEndpoint::new(IpAddress::Ipv4(GATEWAY), echo.port()));
}
