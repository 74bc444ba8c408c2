//! Fuzz bodies for the link's input path: the classifier with source validation, the fragment
//! reassembler, a whole [`Link`] fed frame sequences, and the DHCP server.
//!
//! Guest frames are mostly refused for a bad checksum or a foreign source long before anything
//! interesting happens, so a frame in an input carries a flags byte asking to repair it first
//! ([`repair`]): the guest's MAC, the guest's source address, correct checksums. The fuzzer then
//! spends its time past the checks.
//!
//! # No connection leaves the machine
//!
//! The [`link`] body builds a real `Link`, which opens host sockets for allowed flows. Its
//! settings make that impossible three times over:
//! - the policy denies every destination except the gateway's own DNS (UDP and TCP port 53),
//!   which the link answers in-process (no `allow` rule names any other address, group or
//!   domain, and both defaults are `deny`);
//! - the DNS service has no upstream nameserver (every query it cannot answer locally gets
//!   SERVFAIL), so no DNS socket is opened either;
//! - the flow budgets are zero (`tcp-flows`, `tcp-connecting`, `udp-flows`, `icmp-flows`,
//!   `tls-hellos`) and `max_connections` is 0, so even a flow the policy allowed by mistake is
//!   refused for capacity before any socket exists.
//!
//! After every frame the body asserts that the link holds no TCP, UDP or echo flow: a policy
//! or budget bypass is a finding, not a connection. `scripts/fuzz.sh` also runs the fuzzers in
//! a network namespace of their own when it can, where no address but loopback exists.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::wire::{
    DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    Icmpv4Packet, Icmpv6Packet, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
    UdpPacket,
};

use super::{push_record, Input};
use crate::config::addressing::{Addressing, LinkAddrs, LinkAddrs6};
use crate::device::{GuestRx, LinkDriver, NetHeader, Offloads, RxOutcome};
use crate::dns::DnsSettings;
use crate::flow::addrmap::AddressMap;
use crate::flow::FlowSettings;
use crate::limits::Limits;
use crate::link::classify::{self as classifier, Classified, DropReason};
use crate::link::dhcp::DhcpServer;
use crate::link::fragments::{is_fragment, Reassembler, Reassembly, ReassemblyLimits};
use crate::link::guard::SourceGuard;
use crate::link::{Link, LinkSettings};
use crate::policy::{Action, HostAddrs, Policy, PolicyParts};
use crate::policy::{DenyAction, RuleSpec};

pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x4e, 0x46, 0x01];
const MTU: u16 = 1500;

/// Repair flag: source MAC = the guest's, destination MAC = the gateway's.
pub const FIX_MAC: u8 = 0x01;
/// Repair flag: IP source = the guest's address of that family (ARP sender too).
pub const FIX_SOURCE: u8 = 0x02;
/// Repair flag: IPv4 header checksum, and the TCP/UDP/ICMP checksum of unfragmented packets.
pub const FIX_CHECKSUMS: u8 = 0x04;
pub const FIX_ALL: u8 = FIX_MAC | FIX_SOURCE | FIX_CHECKSUMS;

/// The addressing of guest slot 0 in the default pools (guest 172.16.0.2, fd42:6d73:62::/64).
pub fn addressing() -> Addressing {
    Addressing {
        v4: LinkAddrs::for_slot("172.16.0.0/12".parse().expect("valid pool"), 0)
            .expect("slot 0 exists"),
        v6: LinkAddrs6::for_slot("fd42:6d73:62::/48".parse().expect("valid pool"), 0)
            .expect("slot 0 exists"),
    }
}

fn guest_v6(addressing: &Addressing) -> Ipv6Addr {
    let mut octets = addressing.v6.prefix.network().octets();
    octets[15] = 2;
    Ipv6Addr::from(octets)
}

/// Applies the repair `flags` to a guest frame in place (whatever of it parses).
pub fn repair(frame: &mut [u8], flags: u8, addressing: &Addressing) {
    if flags & FIX_MAC != 0 && frame.len() >= 12 {
        frame[..6].copy_from_slice(&GATEWAY_MAC);
        frame[6..12].copy_from_slice(&GUEST_MAC);
    }
    if flags & FIX_SOURCE != 0 {
        set_source(frame, addressing);
    }
    if flags & FIX_CHECKSUMS != 0 {
        fill_checksums(frame);
    }
}

fn ethertype(frame: &[u8]) -> Option<u16> {
    frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]))
}

fn set_source(frame: &mut [u8], addressing: &Addressing) {
    let v4 = addressing.v4.guest.octets();
    match ethertype(frame) {
        Some(0x0800) => {
            if let Some(src) = frame.get_mut(14 + 12..14 + 16) {
                src.copy_from_slice(&v4);
            }
        }
        Some(0x86dd) => {
            let v6 = guest_v6(addressing).octets();
            if let Some(src) = frame.get_mut(14 + 8..14 + 24) {
                src.copy_from_slice(&v6);
            }
        }
        Some(0x0806) => {
            // Ethernet/IPv4 ARP: sender hardware address at 8, sender protocol address at 14.
            if let Some(sender) = frame.get_mut(14 + 8..14 + 18) {
                sender[..6].copy_from_slice(&GUEST_MAC);
                sender[6..].copy_from_slice(&v4);
            }
        }
        _ => {}
    }
}

/// Fills the IPv4 header checksum and the transport checksum of an unfragmented packet.
pub fn fill_checksums(frame: &mut [u8]) {
    let kind = ethertype(frame);
    let Some(ip) = frame.get_mut(14..) else {
        return;
    };
    match kind {
        Some(0x0800) => {
            let Ok(mut packet) = Ipv4Packet::new_checked(&mut *ip) else {
                return;
            };
            packet.fill_checksum();
            if packet.more_frags() || packet.frag_offset() != 0 {
                return;
            }
            let (src, dst) = (packet.src_addr(), packet.dst_addr());
            let protocol = packet.next_header();
            let (start, end) = (
                usize::from(packet.header_len()),
                usize::from(packet.total_len()),
            );
            if let Some(body) = ip.get_mut(start..end) {
                fill_transport(protocol, src.into(), dst.into(), body);
            }
        }
        Some(0x86dd) => {
            let Ok(mut packet) = Ipv6Packet::new_checked(&mut *ip) else {
                return;
            };
            let (src, dst) = (packet.src_addr(), packet.dst_addr());
            let protocol = packet.next_header();
            fill_transport(protocol, src.into(), dst.into(), packet.payload_mut());
        }
        _ => {}
    }
}

fn fill_transport(protocol: IpProtocol, src: IpAddress, dst: IpAddress, body: &mut [u8]) {
    match protocol {
        IpProtocol::Tcp => {
            if let Ok(mut tcp) = TcpPacket::new_checked(body) {
                tcp.fill_checksum(&src, &dst);
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut udp) = UdpPacket::new_checked(body) {
                udp.fill_checksum(&src, &dst);
            }
        }
        IpProtocol::Icmp => {
            if let Ok(mut icmp) = Icmpv4Packet::new_checked(body) {
                icmp.fill_checksum();
            }
        }
        IpProtocol::Icmpv6 => {
            if let (Ok(mut icmp), IpAddress::Ipv6(s), IpAddress::Ipv6(d)) =
                (Icmpv6Packet::new_checked(body), src, dst)
            {
                icmp.fill_checksum(&s, &d);
            }
        }
        _ => {}
    }
}

// ---- classify + source guard ---------------------------------------------------------------

/// Input: a flags byte ([`repair`]; with [`STEP_HEADER`] a virtio-net header of 10 bytes and
/// an offloads byte follow) and one guest frame.
///
/// Holds: no panic; a header the offloads do not allow is refused as an offload drop; a GSO
/// frame classifies as TCP or a drop, a partial checksum is accepted on TCP or UDP only; a frame the reassembler would take never classifies as anything but a
/// drop (no fragment reaches the flows); what the guard passes comes from the guest's MAC and
/// one of the guest's addresses (0.0.0.0 only for DHCP and ARP probes, `::` only for router
/// and neighbour solicitations), never from a gateway address.
pub fn classify(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let addressing = addressing();
    let (header, offloads) = if flags & STEP_HEADER != 0 {
        let header = NetHeader::parse(input.bytes(10));
        (header, offloads_from_bits(input.byte()))
    } else {
        (NetHeader::NONE, Offloads::default())
    };
    let mut frame = input.rest().to_vec();
    repair(&mut frame, flags, &addressing);
    if let Err(reason) = classifier::check_header(&header, &frame, &offloads) {
        assert!(
            matches!(
                reason,
                DropReason::OffloadBadHeader | DropReason::OffloadNotNegotiated
            ),
            "header refused as {reason:?}"
        );
        return;
    }
    let classified = classifier::classify_offloaded(&frame, &header);
    if header.is_gso() {
        assert!(
            matches!(classified, Classified::Tcp(_) | Classified::Drop(_)),
            "a GSO frame classified as {classified:?}"
        );
    }
    if header.needs_csum() {
        assert!(
            matches!(
                classified,
                Classified::Tcp(_)
                    | Classified::Udp { .. }
                    | Classified::Dhcp { .. }
                    | Classified::Drop(_)
            ),
            "a partial checksum accepted on {classified:?}"
        );
    }
    if is_fragment(&frame) {
        assert!(
            matches!(classified, Classified::Drop(_)),
            "a fragment classified as {classified:?}"
        );
    }
    if classified == Classified::Drop(DropReason::Fragment) {
        assert!(
            is_fragment(&frame),
            "the classifier drops a fragment the link would not reassemble"
        );
    }
    if let Classified::Tcp(head) = &classified {
        assert!(head.payload_len <= frame.len());
    }
    let guard = SourceGuard {
        guest_mac: GUEST_MAC,
        addressing,
    };
    if guard.check(&frame, &classified).is_err() || matches!(classified, Classified::Drop(_)) {
        return;
    }
    assert_eq!(frame.get(6..12), Some(&GUEST_MAC[..]), "foreign source MAC");
    let Some(source) = classified.source() else {
        return;
    };
    assert!(!addressing.is_gateway(source), "gateway source {source}");
    match source {
        IpAddr::V4(v4) if v4.is_unspecified() => assert!(
            matches!(classified, Classified::Dhcp { .. } | Classified::Arp { .. }),
            "0.0.0.0 as the source of {classified:?}"
        ),
        IpAddr::V4(v4) => assert_eq!(v4, addressing.v4.guest, "spoofed IPv4 source"),
        IpAddr::V6(v6) if v6.is_unspecified() => assert!(
            matches!(
                classified,
                Classified::RouterSolicit { .. } | Classified::NeighborSolicit { .. }
            ),
            ":: as the source of {classified:?}"
        ),
        IpAddr::V6(v6) => {
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            assert!(
                addressing.v6.prefix.contains(&v6) || link_local,
                "spoofed IPv6 source {v6}"
            );
            assert!(!v6.is_multicast(), "multicast source {v6}");
        }
    }
}

// ---- fragment reassembly -------------------------------------------------------------------

/// Input: three bytes choosing the limits (small, so they are reached), then steps: a time
/// byte (low 6 bits: 50 ms ticks to advance; 0x40: call `expire`; 0x80: `take_evicted`), a
/// flags byte ([`repair`]) and a frame record.
///
/// Holds: no panic; after every step the datagrams, bytes and pieces held stay within the
/// limits and the bookkeeping adds up (`Reassembler::assert_invariants`); a completed datagram
/// is an unfragmented packet whose IP length matches the frame, within 65535 bytes of IP
/// payload, that the classifier never calls a fragment.
pub fn fragments(data: &[u8]) {
    let mut input = Input::new(data);
    let (a, b, c) = (input.byte(), input.byte(), input.byte());
    let limits = ReassemblyLimits {
        max_datagrams: usize::from(a % 6),
        max_fragments: 1 + usize::from(b % 12),
        max_bytes: 40 + usize::from(c) * 24,
        timeout: Duration::from_millis(500 + 500 * u64::from(a >> 5)),
    };
    let addressing = addressing();
    let mut reassembler = Reassembler::new(limits);
    let mut now = Instant::now();
    while !input.is_empty() {
        let time = input.byte();
        let flags = input.byte();
        let mut frame = input.record().to_vec();
        now += Duration::from_millis(50 * u64::from(time & 0x3f));
        if time & 0x40 != 0 {
            reassembler.expire(now);
        }
        if time & 0x80 != 0 {
            reassembler.take_evicted();
        }
        repair(&mut frame, flags, &addressing);
        if is_fragment(&frame) {
            if let Reassembly::Complete(whole) = reassembler.push(&frame, now) {
                check_reassembled(&whole);
            }
        }
        reassembler.assert_invariants();
        assert!(reassembler.len() <= limits.max_datagrams);
        assert!(reassembler.buffered_bytes() <= limits.max_bytes);
    }
}

fn check_reassembled(frame: &[u8]) {
    assert!(!is_fragment(frame), "reassembled into a fragment");
    assert_ne!(
        classifier::classify(frame),
        Classified::Drop(DropReason::Fragment),
        "the classifier sees a fragment in a reassembled datagram"
    );
    let ip = &frame[14..];
    match ethertype(frame) {
        Some(0x0800) => {
            let packet = Ipv4Packet::new_checked(ip).expect("reassembled IPv4 header");
            assert_eq!(usize::from(packet.total_len()), ip.len());
            assert!(!packet.more_frags() && packet.frag_offset() == 0);
        }
        Some(0x86dd) => {
            let packet = Ipv6Packet::new_checked(ip).expect("reassembled IPv6 header");
            assert_eq!(usize::from(packet.payload_len()) + 40, ip.len());
            assert_ne!(packet.next_header(), IpProtocol::Ipv6Frag);
        }
        other => panic!("reassembled frame of ethertype {other:?}"),
    }
}

// ---- a whole link --------------------------------------------------------------------------

/// The guest's receive queue in the fuzz link: takes every frame (or refuses some, to exercise
/// the link's queue) and checks it.
struct CheckingRx {
    refuse: bool,
    delivered: usize,
    /// What the link was told the guest acked.
    offloads: Offloads,
}

impl GuestRx for CheckingRx {
    fn push(&mut self, header: &NetHeader, frame: &[u8]) -> RxOutcome {
        check_frame_to_guest(header, &self.offloads, frame);
        if self.refuse {
            return RxOutcome::NoRoom;
        }
        self.delivered += 1;
        RxOutcome::Delivered
    }
}

/// What every frame netfence writes to the guest must be: within the MTU (or a TCP GSO frame
/// of at most 64 KiB the guest acked), from the gateway's MAC, to the guest (or broadcast / IPv6
/// multicast), with a parsable header (IPv4 checksum right), and a virtio-net header that uses
/// only what the guest acked and points at the frame's TCP checksum.
fn check_frame_to_guest(header: &NetHeader, offloads: &Offloads, frame: &[u8]) {
    if header.needs_csum() {
        assert!(offloads.rx_csum, "a partial checksum the guest did not ack");
        assert_eq!(header.csum_offset, 16, "partial checksum not TCP's");
        assert!(usize::from(header.csum_start) + 18 <= frame.len());
    }
    match header.gso_type {
        NetHeader::GSO_NONE => assert!(
            frame.len() <= 14 + usize::from(MTU),
            "{} bytes to the guest",
            frame.len()
        ),
        NetHeader::GSO_TCPV4 | NetHeader::GSO_TCPV6 => {
            let acked = if header.gso_type == NetHeader::GSO_TCPV4 {
                offloads.rx_tso4
            } else {
                offloads.rx_tso6
            };
            assert!(acked && header.needs_csum(), "GSO the guest did not ack");
            assert!(frame.len() <= crate::stack::TSO_FRAME);
            assert!(header.gso_size > 0 && usize::from(header.gso_size) < usize::from(MTU));
        }
        other => panic!("GSO type {other} to the guest"),
    }
    let eth = EthernetFrame::new_checked(frame).expect("an Ethernet frame to the guest");
    assert_eq!(eth.src_addr(), EthernetAddress(GATEWAY_MAC), "source MAC");
    let dst = eth.dst_addr();
    assert!(
        dst == EthernetAddress(GUEST_MAC)
            || dst.is_broadcast()
            || dst.as_bytes()[..2] == [0x33, 0x33],
        "frame to {dst}"
    );
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).expect("IPv4 to the guest");
            assert!(ip.verify_checksum(), "IPv4 header checksum to the guest");
        }
        EthernetProtocol::Ipv6 => {
            Ipv6Packet::new_checked(eth.payload()).expect("IPv6 to the guest");
        }
        EthernetProtocol::Arp => {}
        other => panic!("ethertype {other} to the guest"),
    }
}

/// The policy of the fuzz link: DNS to the gateway only, everything else denied (see the
/// module documentation), with a denied domain so blocked names are answered too.
fn deny_policy(host: &HostAddrs) -> Policy {
    let rules = RuleSpec::parse_cli_list("allow@host:udp:53,allow@host:tcp:53,deny@blocked.test")
        .expect("valid rules");
    let parts = PolicyParts {
        preset: None,
        default_egress: Action::Deny,
        default_ingress: Action::Deny,
        preset_egress_default: false,
        preset_ingress_default: false,
        rules,
        deny_domains: vec!["denied.test".into()],
        deny_suffixes: vec!["ads".into()],
        deny_action: DenyAction::Reject,
        max_connections: Some(0),
    };
    Policy::new(parts, host)
}

/// Settings of a link that can open no host socket (see the module documentation).
pub fn sealed_link_settings() -> LinkSettings {
    let addressing = addressing();
    let host = HostAddrs {
        ipv4: vec![addressing.v4.gateway],
        ipv6: vec![addressing.v6.gateway, addressing.v6.link_local],
        ..HostAddrs::default()
    };
    let limits = Limits {
        tcp_flows: 0,
        tcp_connecting: 0,
        tls_hellos: 0,
        udp_flows: 0,
        icmp_flows: 0,
        dns_tcp: 2,
        guest_queue_frames: 64,
        fragment_datagrams: 4,
        fragment_bytes: 16 * 1024,
        ..Limits::default()
    };
    let dns = DnsSettings {
        upstreams: Vec::new(),
        host_aliases: vec![crate::dns::DEFAULT_HOST_ALIAS.into(), "alias.test".into()],
        gateway_v4: vec![addressing.v4.gateway],
        gateway_v6: vec![addressing.v6.gateway],
        link_mtu: MTU,
        ..DnsSettings::default()
    };
    let flows = FlowSettings {
        policy: Arc::new(deny_policy(&host)),
        addrmap: Arc::new(AddressMap::new(Vec::new(), host.addrs().collect())),
        addressing,
        mtu: MTU,
        dns,
        dns_intercept_all: true,
        tls: crate::tls::TlsSettings::default(),
        secrets: None,
        published: None,
        limits,
    };
    LinkSettings {
        addressing,
        gateway_mac: GATEWAY_MAC,
        guest_mac: GUEST_MAC,
        mtu: MTU,
        lease_secs: 3600,
        flows,
        pairs: 1,
        hub: None,
        settings_generation: 0,
        vm: 0,
        pcap: None,
        audit: None,
    }
}

/// Step flag: run the link's service (deliver frames to the guest) after the frame.
pub const STEP_SERVICE: u8 = 0x08;
/// Step flag: the guest's receive queue has no room during this step's service.
pub const STEP_RX_FULL: u8 = 0x10;
/// Step flag: reset the link (the guest's rings restarted) before the frame.
pub const STEP_RESET: u8 = 0x20;
/// Step flag: a virtio-net header (10 bytes) comes with the frame, before its record.
pub const STEP_HEADER: u8 = 0x40;
/// Step flag: the VMM acks features again before the frame: one byte of [`Offloads`] bits
/// (see [`offloads_from_bits`]) follows the flags.
pub const STEP_OFFLOADS: u8 = 0x80;

/// [`Offloads`] from six bits: tx_csum, tx_tso4, tx_tso6, rx_csum, rx_tso4, rx_tso6, made
/// consistent as a device makes them (TSO only with the checksum offload of its direction).
pub fn offloads_from_bits(bits: u8) -> Offloads {
    let bit = |i: u8| bits & (1 << i) != 0;
    Offloads {
        tx_csum: bit(0),
        tx_tso4: bit(0) && bit(1),
        tx_tso6: bit(0) && bit(2),
        rx_csum: bit(3),
        rx_tso4: bit(3) && bit(4),
        rx_tso6: bit(3) && bit(5),
    }
}

/// Input: steps, each a flags byte ([`repair`] flags and the `STEP_*` flags), an offloads byte
/// with [`STEP_OFFLOADS`], a virtio-net header with [`STEP_HEADER`], and a frame record, fed to
/// one fresh link that can open no host socket.
///
/// Holds: no panic; no TCP, UDP or echo flow ever exists (the policy denies, the budgets are
/// zero); every frame to the guest passes `check_frame_to_guest`.
pub fn link(data: &[u8]) {
    let settings = sealed_link_settings();
    let addressing = settings.addressing;
    let Ok(mut link) = Link::new(settings, crate::link::Terminator::default()) else {
        // Out of descriptors or the like: nothing to fuzz.
        return;
    };
    let mut input = Input::new(data);
    let mut rx = CheckingRx {
        refuse: false,
        delivered: 0,
        offloads: Offloads::default(),
    };
    while !input.is_empty() {
        let flags = input.byte();
        if flags & STEP_OFFLOADS != 0 {
            rx.offloads = offloads_from_bits(input.byte());
            LinkDriver::set_offloads(&mut link, rx.offloads);
        }
        let header = if flags & STEP_HEADER != 0 {
            NetHeader::parse(input.bytes(10))
        } else {
            NetHeader::NONE
        };
        let mut frame = input.record().to_vec();
        repair(&mut frame, flags, &addressing);
        if flags & STEP_RESET != 0 {
            LinkDriver::reset(&mut link);
        }
        LinkDriver::guest_frame(&mut link, &header, &frame);
        let (tcp, udp, echo, _dns_tcp) = link.flows().counts();
        assert_eq!((tcp, udp, echo), (0, 0, 0), "a host flow in a sealed link");
        if flags & STEP_SERVICE != 0 {
            rx.refuse = flags & STEP_RX_FULL != 0;
            LinkDriver::service(&mut link, &mut rx);
        }
    }
    rx.refuse = false;
    LinkDriver::service(&mut link, &mut rx);
    let (tcp, udp, echo, _dns_tcp) = link.flows().counts();
    assert_eq!((tcp, udp, echo), (0, 0, 0), "a host flow in a sealed link");
}

// ---- DHCP ----------------------------------------------------------------------------------

/// Input: one DHCP (BOOTP) message from the guest.
///
/// Holds: no panic; a reply parses as DHCP, echoes the transaction id and client MAC, names the
/// gateway as server, and hands out the guest's address or none: ACK with the address only
/// for a request of exactly that address, NAK otherwise.
pub fn dhcp(data: &[u8]) {
    let addressing = addressing();
    let server = DhcpServer {
        addrs: addressing.v4,
        mtu: MTU,
        lease_secs: 3600,
    };
    let _ = DhcpServer::client_mac(data);
    let Some(reply) = server.handle(data) else {
        return;
    };
    let request_packet = DhcpPacket::new_checked(data).expect("answered a message");
    let request = DhcpRepr::parse(&request_packet).expect("answered a message");
    let packet = DhcpPacket::new_checked(&reply.payload[..]).expect("reply parses");
    let answer = DhcpRepr::parse(&packet).expect("reply parses");
    assert_eq!(answer.transaction_id, request.transaction_id);
    assert_eq!(
        answer.client_hardware_address,
        request.client_hardware_address
    );
    assert_eq!(answer.server_identifier, Some(addressing.v4.gateway));
    let guest = addressing.v4.guest;
    assert!(answer.your_ip == guest || answer.your_ip.is_unspecified());
    match answer.message_type {
        DhcpMessageType::Offer => {
            assert_eq!(request.message_type, DhcpMessageType::Discover);
            assert_eq!(answer.your_ip, guest);
        }
        DhcpMessageType::Ack if request.message_type == DhcpMessageType::Inform => {
            assert!(answer.your_ip.is_unspecified());
        }
        DhcpMessageType::Ack => {
            assert_eq!(request.message_type, DhcpMessageType::Request);
            let wanted = request.requested_ip.or(Some(request.client_ip));
            assert_eq!(wanted, Some(guest), "ACK for another address");
            assert_eq!(answer.your_ip, guest);
        }
        DhcpMessageType::Nak => {
            assert!(answer.your_ip.is_unspecified());
            assert!(reply.broadcast, "a NAK is broadcast");
        }
        other => panic!("DHCP reply of type {other:?}"),
    }
}

// ---- seeds ---------------------------------------------------------------------------------

const PUBLIC_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const PUBLIC_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);

fn eth(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet; `fragment` is the flags/offset field (0x2000 = more fragments).
fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ident: u16,
    fragment: u16,
    body: &[u8],
) -> Vec<u8> {
    let total = u16::try_from(20 + body.len()).unwrap_or(u16::MAX);
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&fragment.to_be_bytes());
    p.extend_from_slice(&[64, protocol, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(body);
    p
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, hop_limit: u8, body: &[u8]) -> Vec<u8> {
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[next, hop_limit]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(body);
    p
}

fn udp(src_port: u16, dst_port: u16, data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + data.len()).unwrap_or(u16::MAX);
    let mut d = Vec::new();
    for v in [src_port, dst_port, len, 0] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d.extend_from_slice(data);
    d
}

/// A TCP segment; `flags`: 0x02 SYN, 0x10 ACK, 0x01 FIN, 0x04 RST, 0x08 PSH.
fn tcp(src_port: u16, dst_port: u16, seq: u32, ack: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&src_port.to_be_bytes());
    s.extend_from_slice(&dst_port.to_be_bytes());
    s.extend_from_slice(&seq.to_be_bytes());
    s.extend_from_slice(&ack.to_be_bytes());
    s.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    s.extend_from_slice(data);
    s
}

fn icmp_echo(kind: u8, ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&ident.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn finished(mut frame: Vec<u8>) -> Vec<u8> {
    fill_checksums(&mut frame);
    frame
}

/// A DHCP message from the guest's MAC of type `kind`, asking for `requested`.
pub fn dhcp_message(
    kind: DhcpMessageType,
    requested: Option<Ipv4Addr>,
    client_ip: Ipv4Addr,
) -> Vec<u8> {
    let repr = DhcpRepr {
        message_type: kind,
        transaction_id: 0x1234_5678,
        secs: 0,
        client_hardware_address: EthernetAddress(GUEST_MAC),
        client_ip,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: false,
        requested_ip: requested,
        client_identifier: Some(EthernetAddress(GUEST_MAC)),
        server_identifier: None,
        parameter_request_list: Some(&[1, 3, 6, 26]),
        dns_servers: None,
        max_size: Some(1500),
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut out = vec![0u8; repr.buffer_len()];
    let mut packet = DhcpPacket::new_unchecked(&mut out[..]);
    repr.emit(&mut packet).expect("seed DHCP message fits");
    out
}

/// A DNS query for `name` (type A) as the guest sends it.
fn dns_query_bytes(name: &str) -> Vec<u8> {
    super::dns::query_bytes(name, hickory_proto::rr::RecordType::A, 0x4242, false)
}

/// Frames a guest sends, every one repaired and valid: ARP, DHCP, pings, DNS over UDP, TCP
/// SYNs, IPv6 solicitations.
fn guest_frames() -> Vec<Vec<u8>> {
    let a = addressing();
    let (guest, gateway) = (a.v4.guest, a.v4.gateway);
    let (guest6, gateway6) = (guest_v6(&a), a.v6.gateway);
    let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&guest.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&gateway.octets());
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&gateway6.octets());
    ns.extend_from_slice(&[1, 1]);
    ns.extend_from_slice(&GUEST_MAC);
    let solicited = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 1);
    let all_routers = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
    let discover = dhcp_message(DhcpMessageType::Discover, None, Ipv4Addr::UNSPECIFIED);
    let request = dhcp_message(DhcpMessageType::Request, Some(guest), Ipv4Addr::UNSPECIFIED);
    let bcast = [0xff; 6];
    vec![
        eth(bcast, 0x0806, &arp),
        eth(
            bcast,
            0x0800,
            &ipv4(
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::BROADCAST,
                17,
                1,
                0,
                &udp(68, 67, &discover),
            ),
        ),
        eth(
            bcast,
            0x0800,
            &ipv4(
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::BROADCAST,
                17,
                2,
                0,
                &udp(68, 67, &request),
            ),
        ),
        eth(
            GATEWAY_MAC,
            0x0800,
            &ipv4(guest, gateway, 1, 3, 0, &icmp_echo(8, 7, 1, b"ping")),
        ),
        eth(
            GATEWAY_MAC,
            0x0800,
            &ipv4(guest, PUBLIC_V4, 1, 4, 0, &icmp_echo(8, 7, 2, b"ping")),
        ),
        eth(
            GATEWAY_MAC,
            0x0800,
            &ipv4(
                guest,
                gateway,
                17,
                5,
                0,
                &udp(40000, 53, &dns_query_bytes("alias.test")),
            ),
        ),
        eth(
            GATEWAY_MAC,
            0x0800,
            &ipv4(
                guest,
                gateway,
                17,
                6,
                0,
                &udp(40001, 53, &dns_query_bytes("www.blocked.test")),
            ),
        ),
        eth(
            GATEWAY_MAC,
            0x0800,
            &ipv4(
                guest,
                PUBLIC_V4,
                17,
                7,
                0,
                &udp(40002, 53, &dns_query_bytes("example.com")),
            ),
        ),
        eth(
            GATEWAY_MAC,
            0x0800,
            &ipv4(guest, PUBLIC_V4, 17, 8, 0, &udp(40003, 9999, b"datagram")),
        ),
        eth(
            GATEWAY_MAC,
            0x0800,
            &ipv4(
                guest,
                PUBLIC_V4,
                6,
                9,
                0,
                &tcp(50000, 443, 1000, 0, 0x02, &[]),
            ),
        ),
        eth(
            GATEWAY_MAC,
            0x0800,
            &ipv4(
                guest,
                gateway,
                6,
                10,
                0,
                &tcp(50001, 53, 2000, 0, 0x02, &[]),
            ),
        ),
        eth(
            GATEWAY_MAC,
            0x0800,
            &ipv4(
                guest,
                gateway,
                6,
                11,
                0,
                &tcp(50002, 22, 3000, 0, 0x02, &[]),
            ),
        ),
        eth(
            GATEWAY_MAC,
            0x0800,
            &ipv4(
                guest,
                PUBLIC_V4,
                6,
                12,
                0,
                &tcp(50003, 80, 4000, 1, 0x10, b"GET /"),
            ),
        ),
        eth(
            [0x33, 0x33, 0, 0, 0, 2],
            0x86dd,
            &ipv6(
                link_local,
                all_routers,
                58,
                255,
                &[133, 0, 0, 0, 0, 0, 0, 0],
            ),
        ),
        eth(
            [0x33, 0x33, 0xff, 0, 0, 1],
            0x86dd,
            &ipv6(guest6, solicited, 58, 255, &ns),
        ),
        eth(
            GATEWAY_MAC,
            0x86dd,
            &ipv6(guest6, gateway6, 58, 64, &icmp_echo(128, 9, 1, b"ping6")),
        ),
        eth(
            GATEWAY_MAC,
            0x86dd,
            &ipv6(
                guest6,
                gateway6,
                17,
                64,
                &udp(40004, 53, &dns_query_bytes("alias.test")),
            ),
        ),
        eth(
            GATEWAY_MAC,
            0x86dd,
            &ipv6(
                guest6,
                PUBLIC_V6,
                6,
                64,
                &tcp(50004, 443, 5000, 0, 0x02, &[]),
            ),
        ),
    ]
    .into_iter()
    .map(finished)
    .collect()
}

/// Fragments (IPv4 and IPv6) of one UDP datagram, in order, of `size` payload bytes, cut into
/// pieces of `piece` bytes (a multiple of 8).
fn fragment_frames(v6: bool, size: usize, piece: usize, ident: u16) -> Vec<Vec<u8>> {
    let a = addressing();
    let data: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut datagram = udp(40010, 53, &data);
    // The checksum of the whole datagram, as the guest computes it.
    let (src, dst): (IpAddress, IpAddress) = if v6 {
        (guest_v6(&a).into(), a.v6.gateway.into())
    } else {
        (a.v4.guest.into(), a.v4.gateway.into())
    };
    if let Ok(mut packet) = UdpPacket::new_checked(&mut datagram[..]) {
        packet.fill_checksum(&src, &dst);
    }
    let mut frames = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let end = (offset + piece).min(datagram.len());
        let more = end < datagram.len();
        let chunk = &datagram[offset..end];
        let frame = if v6 {
            let mut body = vec![17, 0];
            let field = (offset as u16) | u16::from(more);
            body.extend_from_slice(&field.to_be_bytes());
            body.extend_from_slice(&u32::from(ident).to_be_bytes());
            body.extend_from_slice(chunk);
            eth(
                GATEWAY_MAC,
                0x86dd,
                &ipv6(guest_v6(&a), a.v6.gateway, 44, 64, &body),
            )
        } else {
            let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            eth(
                GATEWAY_MAC,
                0x0800,
                &ipv4(a.v4.guest, a.v4.gateway, 17, ident, field, chunk),
            )
        };
        frames.push(finished(frame));
        offset = end;
    }
    frames
}

/// Every offload acked, as [`offloads_from_bits`] reads it.
const ALL_OFFLOADS: u8 = 0x3f;

/// A virtio-net header for a TCP/IPv4 frame that leaves the checksum to netfence and asks for
/// TSO (as a Linux guest sends a large segment), in its 10-byte wire form.
fn tso_header() -> [u8; 10] {
    let header = NetHeader {
        flags: NetHeader::F_NEEDS_CSUM,
        gso_type: NetHeader::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    let mut out = [0u8; 10];
    out.copy_from_slice(&header.to_bytes(0)[..10]);
    out
}

/// The TCP/IPv4 frames of [`guest_frames`].
fn tcp_v4_frames() -> Vec<Vec<u8>> {
    guest_frames()
        .into_iter()
        .filter(|f| f.get(12..14) == Some(&[0x08, 0x00][..]) && f.get(14 + 9) == Some(&6))
        .collect()
}

pub fn classify_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for frame in guest_frames()
        .into_iter()
        .chain(fragment_frames(false, 64, 32, 1))
    {
        let mut seed = vec![0];
        seed.extend_from_slice(&frame);
        seeds.push(seed);
    }
    for frame in tcp_v4_frames() {
        let mut seed = vec![STEP_HEADER];
        seed.extend_from_slice(&tso_header());
        seed.push(ALL_OFFLOADS);
        seed.extend_from_slice(&frame);
        seeds.push(seed);
    }
    seeds
}

/// A fragments input: default-ish limits, then the frames at one tick each.
fn fragment_sequence(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![0x43, 0x07, 0x40];
    for frame in frames {
        out.extend_from_slice(&[1, 0]);
        push_record(&mut out, frame);
    }
    out
}

pub fn fragments_seeds() -> Vec<Vec<u8>> {
    let v4 = fragment_frames(false, 200, 64, 7);
    let v6 = fragment_frames(true, 200, 64, 8);
    let mut reversed = v4.clone();
    reversed.reverse();
    let mut overlapping = v6.clone();
    overlapping.insert(1, v6[0].clone());
    let atomic = fragment_frames(true, 24, 64, 9);
    let mut mixed = Vec::new();
    for (x, y) in v4.iter().zip(&v6) {
        mixed.push(x.clone());
        mixed.push(y.clone());
    }
    vec![
        fragment_sequence(&v4),
        fragment_sequence(&v6),
        fragment_sequence(&reversed),
        fragment_sequence(&overlapping),
        fragment_sequence(&atomic),
        fragment_sequence(&mixed),
    ]
}

/// A link input: every frame as one step, the service run after each.
fn link_sequence(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        out.push(STEP_SERVICE);
        push_record(&mut out, frame);
    }
    out
}

pub fn link_seeds() -> Vec<Vec<u8>> {
    let frames = guest_frames();
    let mut seeds: Vec<Vec<u8>> = frames.chunks(4).map(link_sequence).collect();
    seeds.push(link_sequence(&fragment_frames(false, 100, 48, 3)));
    seeds.push(link_sequence(&fragment_frames(true, 100, 48, 4)));
    // Offloads acked, then TCP frames with a TSO header (a DNS-over-TCP SYN to the gateway
    // gets a SYN-ACK with a partial checksum back).
    let mut offloaded = Vec::new();
    for (i, frame) in tcp_v4_frames().iter().enumerate() {
        if i == 0 {
            offloaded.push(STEP_OFFLOADS | STEP_HEADER | STEP_SERVICE);
            offloaded.push(ALL_OFFLOADS);
        } else {
            offloaded.push(STEP_HEADER | STEP_SERVICE);
        }
        offloaded.extend_from_slice(&tso_header());
        push_record(&mut offloaded, frame);
    }
    seeds.push(offloaded);
    seeds
}

pub fn dhcp_seeds() -> Vec<Vec<u8>> {
    let guest = addressing().v4.guest;
    vec![
        dhcp_message(DhcpMessageType::Discover, None, Ipv4Addr::UNSPECIFIED),
        dhcp_message(DhcpMessageType::Request, Some(guest), Ipv4Addr::UNSPECIFIED),
        dhcp_message(
            DhcpMessageType::Request,
            Some(Ipv4Addr::new(10, 0, 0, 9)),
            Ipv4Addr::UNSPECIFIED,
        ),
        dhcp_message(DhcpMessageType::Request, None, guest),
        dhcp_message(DhcpMessageType::Inform, None, guest),
        dhcp_message(DhcpMessageType::Release, None, guest),
    ]
}
