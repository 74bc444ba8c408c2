//! The gateway side of netfence as a guest sees it: vhost-user handshake and config space,
//! DHCP lease, ARP for the gateway, ping the gateway.

mod common;

use std::time::Duration;

use common::frontend::{VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_S_LINK_UP};
use common::*;

#[test]
fn handshake_like_cloud_hypervisor() {
    let nf = Netfence::spawn(&["--guest-mac", "52:54:00:aa:bb:cc", "--mtu", "1400"]);
    let fe = Frontend::connect(nf.socket_path(), FrontendOptions::default())
        .unwrap_or_else(|e| panic!("handshake: {e}"));
    assert!(
        fe.acked_features & VIRTIO_F_VERSION_1 != 0,
        "VERSION_1 not offered"
    );
    assert!(
        fe.acked_features & VIRTIO_NET_F_MRG_RXBUF != 0,
        "MRG_RXBUF not offered"
    );
    assert_eq!(fe.queue_num, Some(2), "GET_QUEUE_NUM");
    let cfg = fe
        .config
        .expect("CONFIG protocol feature acked and config read");
    assert_eq!(cfg.mac, [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
    assert_eq!(cfg.mtu, 1400);
    assert!(
        cfg.status & VIRTIO_NET_S_LINK_UP != 0,
        "link not up: {cfg:?}"
    );
    eprintln!("handshake: {:#?}", fe.handshake_log);
}

#[test]
fn dhcp_lease() {
    let nf = Netfence::spawn(&["--mtu", "1400"]);
    let mut g = guest(&nf);
    let lease = g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("lease: {lease:?}");
    assert_eq!(lease.address.address(), GUEST_IP);
    assert_eq!(lease.address.prefix_len(), 30);
    assert_eq!(lease.router, Some(GATEWAY));
    assert_eq!(lease.dns_servers, vec![GATEWAY]);
    assert_eq!(lease.server, GATEWAY);
    assert_eq!(lease.mtu, Some(1400), "DHCP option 26 (interface MTU)");
    assert!(lease.lease_time.unwrap_or(0) > 0, "lease time option 51");
}

#[test]
fn dhcp_slot_and_mac() {
    let nf = Netfence::spawn(&["--slot", "3", "--guest-mac", "02:00:00:00:00:33"]);
    let mut g = guest(&nf);
    assert_eq!(g.mac, [2, 0, 0, 0, 0, 0x33]);
    let lease = g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        lease.address.address(),
        std::net::Ipv4Addr::new(172, 16, 0, 14)
    );
    assert_eq!(lease.router, Some(std::net::Ipv4Addr::new(172, 16, 0, 13)));
}

#[test]
fn arp_for_gateway() {
    let nf = Netfence::spawn::<&str>(&[]);
    let mut g = guest_up(&nf);
    let reply = g
        .arp_raw(GATEWAY, SHORT)
        .expect("no ARP reply for the gateway");
    assert_eq!(reply.sender_ip, GATEWAY);
    assert_eq!(reply.target_ip, GUEST_IP);
    assert_ne!(reply.sender_mac, [0; 6]);
    assert_ne!(reply.sender_mac, g.mac);
    // Nobody else lives on the /30: no answer for another address.
    let other = g.arp_raw(
        std::net::Ipv4Addr::new(172, 16, 0, 3),
        Duration::from_millis(500),
    );
    assert!(other.is_none(), "ARP reply for 172.16.0.3: {other:?}");
}

#[test]
fn ping_gateway() {
    let nf = Netfence::spawn::<&str>(&[]);
    let mut g = guest_up(&nf);
    for _ in 0..3 {
        let rtt = g.ping(GATEWAY, SHORT).unwrap_or_else(|e| panic!("{e}"));
        assert!(rtt < SHORT);
    }
}
