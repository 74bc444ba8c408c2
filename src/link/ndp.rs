//! Neighbour discovery for the gateway: the router advertisements that hand the guest its /64
//! (see `config::addressing`), and the neighbour advertisements for the gateway's addresses.
//!
//! The gateway advertises itself from the link-local `fe80::1` as the default router. A guest configures itself by SLAAC from the
//! advertised prefix (on-link, autonomous), learns the link MTU, and finds the DNS service at
//! `prefix::1` through the RDNSS option (RFC 8106). This module builds the router and neighbour
//! advertisements for the gateway's addresses, which smoltcp, being a host stack, does not send
//! (routers) or sends without the Router flag (neighbours); smoltcp still resolves the guest's
//! addresses when it has segments for them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use smoltcp::wire::{EthernetAddress, Icmpv6Packet, IpProtocol};

use crate::config::addressing::LinkAddrs6;
use crate::stack::frames::{self, Macs};
/// All-nodes multicast, the destination of unsolicited advertisements.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// Router lifetime advertised (RFC 4861 default: 3 x the max advertisement interval).
pub const ROUTER_LIFETIME: Duration = Duration::from_secs(1800);
/// Prefix lifetimes: the prefix belongs to this link for as long as netfence runs.
const PREFIX_VALID_SECS: u32 = 86_400;
const PREFIX_PREFERRED_SECS: u32 = 14_400;

/// The Ethernet address an IPv6 destination goes to: 33:33 + low 32 bits for multicast.
fn dst_mac(macs: &Macs, dst: Ipv6Addr) -> EthernetAddress {
    if dst.is_multicast() {
        let o = dst.octets();
        EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
    } else {
        macs.guest_mac
    }
}

/// A router advertisement from `fe80::1` to `dst` (the soliciting guest, or all-nodes):
/// the gateway's MAC, the link MTU, the guest's prefix (on-link, autonomous) and the DNS
/// server (RDNSS).
pub fn router_advert(macs: &Macs, addrs: &LinkAddrs6, mtu: u16, dst: Ipv6Addr) -> Vec<u8> {
    let mut msg = Vec::with_capacity(88);
    // Type, code, checksum (filled below), current hop limit, flags (no DHCPv6).
    msg.extend_from_slice(&[134, 0, 0, 0, 64, 0]);
    msg.extend_from_slice(&(ROUTER_LIFETIME.as_secs() as u16).to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes()); // reachable time: unspecified
    msg.extend_from_slice(&0u32.to_be_bytes()); // retrans timer: unspecified
                                                // Source link-layer address.
    msg.extend_from_slice(&[1, 1]);
    msg.extend_from_slice(macs.gateway_mac.as_bytes());
    // MTU.
    msg.extend_from_slice(&[5, 1, 0, 0]);
    msg.extend_from_slice(&u32::from(mtu).to_be_bytes());
    // Prefix information: on-link (L) and autonomous (A).
    msg.extend_from_slice(&[3, 4, addrs.prefix.prefix_len(), 0xc0]);
    msg.extend_from_slice(&PREFIX_VALID_SECS.to_be_bytes());
    msg.extend_from_slice(&PREFIX_PREFERRED_SECS.to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes());
    msg.extend_from_slice(&addrs.prefix.network().octets());
    // Recursive DNS server.
    msg.extend_from_slice(&[25, 3, 0, 0]);
    msg.extend_from_slice(&(ROUTER_LIFETIME.as_secs() as u32).to_be_bytes());
    msg.extend_from_slice(&addrs.gateway.octets());
    ndp_frame(macs, addrs.link_local, dst, &msg)
}

/// A neighbour advertisement for the gateway's `target` address, answering a solicitation
/// from `solicitor` (`::` during the guest's duplicate address detection: then to all-nodes).
///
/// netfence answers these itself rather than letting smoltcp do it: smoltcp is a host and
/// leaves out the Router flag, and a guest that sees its default router's advertisement without
/// it removes the default route (RFC 4861 7.2.5).
pub fn neighbor_advert(macs: &Macs, target: Ipv6Addr, solicitor: Ipv6Addr) -> Vec<u8> {
    let (dst, flags) = if solicitor.is_unspecified() {
        (ALL_NODES, 0xa0) // Router | Override
    } else {
        (solicitor, 0xe0) // Router | Solicited | Override
    };
    let mut msg = Vec::with_capacity(32);
    msg.extend_from_slice(&[136, 0, 0, 0, flags, 0, 0, 0]);
    msg.extend_from_slice(&target.octets());
    // Target link-layer address.
    msg.extend_from_slice(&[2, 1]);
    msg.extend_from_slice(macs.gateway_mac.as_bytes());
    ndp_frame(macs, target, dst, &msg)
}

/// A neighbour advertisement as if the guest had sent it for its own address `guest`, for
/// smoltcp's neighbour cache: every guest frame comes from one MAC, so smoltcp need not ask
/// (with AnyIP its first echo reply to a new address would otherwise be lost while it does).
pub fn guest_introduction(macs: &Macs, guest: Ipv6Addr, gateway: Ipv6Addr) -> Vec<u8> {
    let mut msg = Vec::with_capacity(32);
    msg.extend_from_slice(&[136, 0, 0, 0, 0x20, 0, 0, 0]); // Override
    msg.extend_from_slice(&guest.octets());
    msg.extend_from_slice(&[2, 1]);
    msg.extend_from_slice(macs.guest_mac.as_bytes());
    let reversed = Macs {
        gateway_mac: macs.guest_mac,
        guest_mac: macs.gateway_mac,
    };
    ndp_frame(&reversed, guest, gateway, &msg)
}

/// An ARP reply as if the guest had sent it to the gateway for its IPv4 address `guest`, for
/// smoltcp's neighbour cache. With multiqueue, ARP is served by pair 0 only, so the stacks of
/// the other pairs would never learn the guest's MAC; this tells them (it fills the cache and
/// makes smoltcp send nothing).
pub fn arp_introduction(macs: &Macs, guest: Ipv4Addr, gateway: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(macs.gateway_mac.as_bytes());
    f.extend_from_slice(macs.guest_mac.as_bytes());
    f.extend_from_slice(&[0x08, 0x06]);
    // Ethernet, IPv4, 6- and 4-byte addresses, operation 2 (reply).
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]);
    f.extend_from_slice(macs.guest_mac.as_bytes());
    f.extend_from_slice(&guest.octets());
    f.extend_from_slice(macs.gateway_mac.as_bytes());
    f.extend_from_slice(&gateway.octets());
    f
}

/// An NDP message (`msg`, checksum left zero) from `src` to `dst` with hop limit 255.
fn ndp_frame(macs: &Macs, src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> Vec<u8> {
    frames::ip_frame_with_hop_limit(
        dst_mac(macs, dst),
        macs.gateway_mac,
        IpAddr::V6(src),
        IpAddr::V6(dst),
        IpProtocol::Icmpv6,
        255,
        msg.len(),
        |l4| {
            l4.copy_from_slice(msg);
            Icmpv6Packet::new_unchecked(l4).fill_checksum(&src, &dst);
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::addressing::GATEWAY_LINK_LOCAL;
    use ipnet::Ipv6Net;
    use smoltcp::wire::{
        EthernetFrame, Icmpv6Repr, Ipv6Packet, NdiscNeighborFlags, NdiscPrefixInfoFlags, NdiscRepr,
        RawHardwareAddress,
    };

    #[test]
    fn arp_introduction_is_a_well_formed_reply() {
        use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol};
        let m = macs();
        let guest = Ipv4Addr::new(10, 0, 0, 2);
        let gateway = Ipv4Addr::new(10, 0, 0, 1);
        let f = arp_introduction(&m, guest, gateway);
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(eth.ethertype(), EthernetProtocol::Arp);
        assert_eq!(eth.src_addr(), m.guest_mac);
        let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
        assert_eq!(
            arp,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: m.guest_mac,
                source_protocol_addr: guest,
                target_hardware_addr: m.gateway_mac,
                target_protocol_addr: gateway,
            }
        );
    }

    fn macs() -> Macs {
        Macs {
            gateway_mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
            guest_mac: EthernetAddress([2, 0, 0, 0, 0, 2]),
        }
    }

    /// An NDP message's (src, dst, hop limit) and its parsed form; the checksum must hold.
    fn parse_ndp(ip: &[u8]) -> ((Ipv6Addr, Ipv6Addr, u8), NdiscRepr<'_>) {
        let ip = Ipv6Packet::new_checked(ip).unwrap();
        let header = (ip.src_addr(), ip.dst_addr(), ip.hop_limit());
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&header.0, &header.1));
        let checksums = smoltcp::phy::ChecksumCapabilities::default();
        match Icmpv6Repr::parse(&header.0, &header.1, &icmp, &checksums).unwrap() {
            Icmpv6Repr::Ndisc(repr) => (header, repr),
            other => panic!("not NDP: {other:?}"),
        }
    }

    #[test]
    fn neighbor_advert_claims_the_router_and_its_mac() {
        let solicitor: Ipv6Addr = "fe80::5054:ff:fe12:3456".parse().unwrap();
        for (from, dst, solicited) in [
            (solicitor, solicitor, true),
            (Ipv6Addr::UNSPECIFIED, ALL_NODES, false),
        ] {
            let frame = neighbor_advert(&macs(), GATEWAY_LINK_LOCAL, from);
            let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
            let (header, repr) = parse_ndp(eth.payload());
            assert_eq!(header, (GATEWAY_LINK_LOCAL, dst, 255));
            let NdiscRepr::NeighborAdvert {
                flags,
                target_addr,
                lladdr,
            } = repr
            else {
                panic!("not a neighbour advertisement: {repr:?}");
            };
            assert_eq!(target_addr, GATEWAY_LINK_LOCAL);
            assert!(flags.contains(NdiscNeighborFlags::ROUTER | NdiscNeighborFlags::OVERRIDE));
            assert_eq!(flags.contains(NdiscNeighborFlags::SOLICITED), solicited);
            assert_eq!(
                lladdr,
                Some(RawHardwareAddress::from_bytes(&[2, 0, 0, 0, 0, 1]))
            );
        }
    }

    #[test]
    fn router_advert_parses_with_every_option() {
        let pool: Ipv6Net = "fd42:6d73:62::/48".parse().unwrap();
        let addrs = LinkAddrs6::for_slot(pool, 0).unwrap();
        let frame = router_advert(&macs(), &addrs, 1500, ALL_NODES);
        let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
        assert_eq!(eth.dst_addr(), EthernetAddress([0x33, 0x33, 0, 0, 0, 1]));
        let (header, repr) = parse_ndp(eth.payload());
        assert_eq!(header, (GATEWAY_LINK_LOCAL, ALL_NODES, 255));
        let NdiscRepr::RouterAdvert {
            router_lifetime,
            lladdr,
            mtu,
            prefix_info,
            ..
        } = repr
        else {
            panic!("not a router advertisement: {repr:?}");
        };
        assert_eq!(router_lifetime.secs(), 1800);
        assert_eq!(
            lladdr,
            Some(RawHardwareAddress::from_bytes(&[2, 0, 0, 0, 0, 1]))
        );
        assert_eq!(mtu, Some(1500));
        let prefix = prefix_info.expect("prefix information");
        assert_eq!(prefix.prefix, addrs.prefix.network());
        assert_eq!(prefix.prefix_len, 64);
        assert!(prefix
            .flags
            .contains(NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF));
        // RDNSS is the last option: type 25, length 3, then the gateway address.
        let body = Ipv6Packet::new_checked(eth.payload()).unwrap().payload();
        let rdnss = &body[body.len() - 24..];
        assert_eq!(&rdnss[..2], &[25, 3]);
        assert_eq!(&rdnss[8..], &addrs.gateway.octets());
    }
}
