//! Classifying a guest frame: what it is, who it is for, and whether it starts a new flow.
//!
//! Every frame from the TX queue passes through [`classify`] before anything acts on it. The
//! parsing is smoltcp's `wire` module (bounds-checked, borrowing, no allocation); checksums are
//! verified here so that later stages can trust the headers. The result tells the link where
//! the frame goes: the gateway's own stack (ARP, neighbour discovery, ICMP to the gateway, TCP
//! of known flows), the DHCP server, the router advertiser, the flows, or a counted drop.
//! [`guard`](super::guard) then checks that the frame's sources are the guest's.
//!
//! The guest's virtio-net header comes with the frame ([`classify_offloaded`]): a frame marked
//! `NEEDS_CSUM` carries a partial L4 checksum (the guest left it to us; it is not verified), and
//! a GSO frame is one TCP segment of up to 64 KiB. A header that asks for an offload the VMM did
//! not ack, or that does not fit its frame (checksum position, GSO type against the protocol,
//! lengths), is a counted drop. Every checksum that is verified is verified here, once: smoltcp
//! is told not to verify again.
//!
//! IPv4 and IPv6 classify into the same variants. Fragments are put back together before they
//! get here ([`fragments`](super::fragments)), so the whole datagram is judged and a transport
//! header can never hide in a later fragment; a fragment that still reaches the classifier is
//! dropped. IPv6 packets whose next header is not TCP, UDP or ICMPv6 (extension headers) are
//! dropped: guests do not need them for unicast traffic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::device::{NetHeader, Offloads};
pub use crate::stack::frames::TcpHead;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, Icmpv4Message, Icmpv4Packet,
    Icmpv6Message, Icmpv6Packet, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
    UdpPacket,
};

/// What a guest frame is.
#[derive(Debug, PartialEq, Eq)]
pub enum Classified<'a> {
    /// ARP request or reply from `sender` (`sender_mac`) addressed to `target`.
    Arp {
        sender: Ipv4Addr,
        sender_mac: [u8; 6],
        target: Ipv4Addr,
        request: bool,
    },
    /// A DHCP (UDP 68 -> 67) message from `src`; the payload is the BOOTP message.
    Dhcp { src: Ipv4Addr, payload: &'a [u8] },
    /// A UDP datagram to anywhere else.
    Udp {
        src: SocketAddr,
        dst: SocketAddr,
        payload: &'a [u8],
    },
    /// A TCP segment.
    Tcp(TcpHead),
    /// An ICMP or ICMPv6 echo request.
    IcmpEcho {
        src: IpAddr,
        dst: IpAddr,
        ident: u16,
        seq: u16,
        data: &'a [u8],
    },
    /// ICMP/ICMPv6 that is not an echo request (replies, errors, neighbour advertisements from
    /// the guest): for the gateway only.
    IcmpOther { src: IpAddr, dst: IpAddr },
    /// An IPv6 router solicitation from `src` (`::` before the guest has an address).
    RouterSolicit { src: Ipv6Addr },
    /// An IPv6 neighbour solicitation from `src` for `target`.
    NeighborSolicit { src: Ipv6Addr, target: Ipv6Addr },
    /// Not for us; counted under this reason.
    Drop(DropReason),
}

impl Classified<'_> {
    /// The guest's source address, when the frame is IP and carries one.
    pub fn source(&self) -> Option<IpAddr> {
        match self {
            Classified::Udp { src, .. } => Some(src.ip()),
            Classified::Tcp(head) => Some(head.src.ip()),
            Classified::IcmpEcho { src, .. } | Classified::IcmpOther { src, .. } => Some(*src),
            Classified::Dhcp { src, .. } | Classified::Arp { sender: src, .. } => {
                Some(IpAddr::V4(*src))
            }
            Classified::RouterSolicit { src } | Classified::NeighborSolicit { src, .. } => {
                Some(IpAddr::V6(*src))
            }
            _ => None,
        }
    }
}

/// Why a frame was dropped; each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    Malformed,
    BadChecksum,
    Fragment,
    Broadcast,
    UnknownEtherType,
    UnknownProtocol,
    /// IPv6 extension headers (hop-by-hop, routing, ...): MLD reports and tunnelling tricks.
    ExtensionHeader,
    /// Router advertisements and redirects from the guest, and NDP with a hop limit other than
    /// 255 (RFC 4861: such a message did not come from the link).
    UnexpectedNdp,
    /// A virtio-net header asking for an offload the VMM did not ack (or that netfence never
    /// offers: UDP GSO, ECN).
    OffloadNotNegotiated,
    /// A virtio-net header that does not fit its frame: GSO without a segment size or
    /// `NEEDS_CSUM`, larger than 64 KiB, of another protocol than the frame's; a checksum
    /// position past the frame or not at the L4 checksum; `hdr_len` past the frame.
    OffloadBadHeader,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::BadChecksum => "bad-checksum",
            DropReason::Fragment => "fragment",
            DropReason::Broadcast => "broadcast",
            DropReason::UnknownEtherType => "unknown-ethertype",
            DropReason::UnknownProtocol => "unknown-protocol",
            DropReason::ExtensionHeader => "ipv6-extension-header",
            DropReason::UnexpectedNdp => "ndp-unexpected",
            DropReason::OffloadNotNegotiated => "offload-not-negotiated",
            DropReason::OffloadBadHeader => "offload-bad-header",
        }
    }
}

/// Largest IP packet a GSO frame may carry (64 KiB, what an IPv4 length field can say).
pub const MAX_GSO_PACKET: usize = 65_535;

/// Classifies one Ethernet frame from the guest that came without offloads (every checksum in
/// place).
pub fn classify(frame: &[u8]) -> Classified<'_> {
    classify_offloaded(frame, &NetHeader::NONE)
}

/// What the virtio-net header says of a frame's L4 part, once checked against the offloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Partial {
    /// `NEEDS_CSUM`: the L4 checksum at this frame offset (+ the protocol's offset) is partial.
    csum: Option<(usize, usize)>,
    /// GSO: the frame must be TCP of this IP version.
    gso_version: Option<u8>,
}

/// Checks a guest's virtio-net header against the acked `offloads` and its frame, without
/// parsing the frame beyond its length: what may be asked at all and whether the numbers fit.
/// Fragments and frames the classifier never sees go through this too.
pub fn check_header(
    header: &NetHeader,
    frame: &[u8],
    offloads: &Offloads,
) -> Result<(), DropReason> {
    if *header == NetHeader::NONE {
        return Ok(());
    }
    if header.needs_csum() {
        if !offloads.tx_csum {
            return Err(DropReason::OffloadNotNegotiated);
        }
        let end = usize::from(header.csum_start) + usize::from(header.csum_offset) + 2;
        if end > frame.len() {
            return Err(DropReason::OffloadBadHeader);
        }
    }
    match header.gso_type {
        NetHeader::GSO_NONE => return Ok(()),
        NetHeader::GSO_TCPV4 if offloads.tx_tso4 => {}
        NetHeader::GSO_TCPV6 if offloads.tx_tso6 => {}
        _ => return Err(DropReason::OffloadNotNegotiated),
    }
    if !header.needs_csum()
        || header.gso_size == 0
        || usize::from(header.hdr_len) > frame.len()
        || frame.len() > 14 + MAX_GSO_PACKET
    {
        return Err(DropReason::OffloadBadHeader);
    }
    Ok(())
}

/// Classifies one Ethernet frame from the guest with its virtio-net header (checked with
/// [`check_header`] before). The header decides which L4 checksum is partial and so not
/// verified, and a GSO header must match the frame's protocol.
pub fn classify_offloaded<'a>(frame: &'a [u8], header: &NetHeader) -> Classified<'a> {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Classified::Drop(DropReason::Malformed);
    };
    let partial = Partial {
        csum: header.needs_csum().then_some((
            usize::from(header.csum_start),
            usize::from(header.csum_offset),
        )),
        gso_version: match header.gso_type {
            NetHeader::GSO_TCPV4 => Some(4),
            NetHeader::GSO_TCPV6 => Some(6),
            _ => None,
        },
    };
    let offloaded = partial != Partial::default();
    match eth.ethertype() {
        EthernetProtocol::Arp if !offloaded => classify_arp(eth.payload()),
        EthernetProtocol::Ipv4 => classify_ipv4(eth.payload(), partial),
        EthernetProtocol::Ipv6 => classify_ipv6(eth.payload(), partial),
        EthernetProtocol::Arp => Classified::Drop(DropReason::OffloadBadHeader),
        _ => Classified::Drop(DropReason::UnknownEtherType),
    }
}

fn classify_arp(payload: &[u8]) -> Classified<'_> {
    let Ok(packet) = ArpPacket::new_checked(payload) else {
        return Classified::Drop(DropReason::Malformed);
    };
    match ArpRepr::parse(&packet) {
        Ok(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) => Classified::Arp {
            sender: source_protocol_addr,
            sender_mac: source_hardware_addr.0,
            target: target_protocol_addr,
            request: operation == ArpOperation::Request,
        },
        _ => Classified::Drop(DropReason::Malformed),
    }
}

fn classify_ipv4(payload: &[u8], partial: Partial) -> Classified<'_> {
    let Ok(ip) = Ipv4Packet::new_checked(payload) else {
        return Classified::Drop(DropReason::Malformed);
    };
    // smoltcp's length checks do not look at the version nibble; its parser (and so the
    // gateway's stack) and the reassembler refuse anything but 4.
    if ip.version() != 4 {
        return Classified::Drop(DropReason::Malformed);
    }
    if !ip.verify_checksum() {
        return Classified::Drop(DropReason::BadChecksum);
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Classified::Drop(DropReason::Fragment);
    }
    let src = ip.src_addr();
    let dst = ip.dst_addr();
    let body = &payload[usize::from(ip.header_len())..usize::from(ip.total_len())];
    let l4_start = 14 + usize::from(ip.header_len());
    if partial.gso_version.is_some_and(|v| v != 4) {
        return Classified::Drop(DropReason::OffloadBadHeader);
    }
    if ip.next_header() == IpProtocol::Icmp {
        if partial != Partial::default() {
            return Classified::Drop(DropReason::OffloadBadHeader);
        }
        return classify_icmpv4(src, dst, body);
    }
    let udp_to_dhcp = |udp: &UdpPacket<&[u8]>| udp.dst_port() == 67 && udp.src_port() == 68;
    let not_unicast = dst.is_broadcast() || dst.is_multicast();
    classify_transport(
        ip.next_header(),
        src.into(),
        dst.into(),
        not_unicast,
        L4 {
            body,
            start: l4_start,
            partial,
        },
        udp_to_dhcp,
    )
}

fn classify_ipv6(payload: &[u8], partial: Partial) -> Classified<'_> {
    let Ok(ip) = Ipv6Packet::new_checked(payload) else {
        return Classified::Drop(DropReason::Malformed);
    };
    if ip.version() != 6 {
        return Classified::Drop(DropReason::Malformed);
    }
    let src = ip.src_addr();
    let dst = ip.dst_addr();
    let body = ip.payload();
    let offloaded = partial != Partial::default();
    if partial.gso_version.is_some_and(|v| v != 6) {
        return Classified::Drop(DropReason::OffloadBadHeader);
    }
    match ip.next_header() {
        IpProtocol::Tcp | IpProtocol::Udp => classify_transport(
            ip.next_header(),
            src.into(),
            dst.into(),
            dst.is_multicast(),
            L4 {
                body,
                start: 14 + 40,
                partial,
            },
            |_| false,
        ),
        _ if offloaded => Classified::Drop(DropReason::OffloadBadHeader),
        IpProtocol::Icmpv6 => classify_icmpv6(src, dst, ip.hop_limit(), body),
        IpProtocol::Ipv6Frag => Classified::Drop(DropReason::Fragment),
        IpProtocol::HopByHop
        | IpProtocol::Ipv6Route
        | IpProtocol::Ipv6Opts
        | IpProtocol::IpSecEsp
        | IpProtocol::IpSecAh => Classified::Drop(DropReason::ExtensionHeader),
        _ => Classified::Drop(DropReason::UnknownProtocol),
    }
}

/// The L4 part of a packet: its bytes, where they start in the frame, and what the guest's
/// header says of them.
struct L4<'a> {
    body: &'a [u8],
    start: usize,
    partial: Partial,
}

impl L4<'_> {
    /// Whether the guest left this L4 checksum partial, at `checksum_field` of the header:
    /// `Err` when its header points anywhere else.
    fn checksum_left_to_us(&self, checksum_field: usize) -> Result<bool, DropReason> {
        match self.partial.csum {
            None => Ok(false),
            Some((start, offset)) if start == self.start && offset == checksum_field => Ok(true),
            Some(_) => Err(DropReason::OffloadBadHeader),
        }
    }
}

/// TCP and UDP of either family. `not_unicast`: the destination is broadcast or multicast.
fn classify_transport<'a>(
    protocol: IpProtocol,
    src: IpAddr,
    dst: IpAddr,
    not_unicast: bool,
    l4: L4<'a>,
    is_dhcp: impl Fn(&UdpPacket<&[u8]>) -> bool,
) -> Classified<'a> {
    let (src_ip, dst_ip) = (IpAddress::from(src), IpAddress::from(dst));
    let body = l4.body;
    match protocol {
        IpProtocol::Udp => {
            if l4.partial.gso_version.is_some() {
                return Classified::Drop(DropReason::OffloadBadHeader);
            }
            let partial = match l4.checksum_left_to_us(6) {
                Ok(partial) => partial,
                Err(reason) => return Classified::Drop(reason),
            };
            let Ok(udp) = UdpPacket::new_checked(body) else {
                return Classified::Drop(DropReason::Malformed);
            };
            // A zero checksum means "none" in IPv4 and is forbidden in IPv6 (RFC 8200);
            // smoltcp accepts it in both. A partial one is the guest's to leave to us.
            let missing_v6 = udp.checksum() == 0 && src.is_ipv6();
            if !partial && (missing_v6 || !udp.verify_checksum(&src_ip, &dst_ip)) {
                return Classified::Drop(DropReason::BadChecksum);
            }
            let data = &body[8..usize::from(udp.len()).min(body.len()).max(8)];
            if is_dhcp(&udp) {
                if let IpAddr::V4(src) = src {
                    return Classified::Dhcp { src, payload: data };
                }
            }
            if not_unicast {
                return Classified::Drop(DropReason::Broadcast);
            }
            Classified::Udp {
                src: SocketAddr::new(src, udp.src_port()),
                dst: SocketAddr::new(dst, udp.dst_port()),
                payload: data,
            }
        }
        IpProtocol::Tcp => {
            let partial = match l4.checksum_left_to_us(16) {
                Ok(partial) => partial,
                Err(reason) => return Classified::Drop(reason),
            };
            let Ok(tcp) = TcpPacket::new_checked(body) else {
                return Classified::Drop(DropReason::Malformed);
            };
            if !partial && !tcp.verify_checksum(&src_ip, &dst_ip) {
                return Classified::Drop(DropReason::BadChecksum);
            }
            if not_unicast {
                return Classified::Drop(DropReason::Broadcast);
            }
            Classified::Tcp(TcpHead {
                src: SocketAddr::new(src, tcp.src_port()),
                dst: SocketAddr::new(dst, tcp.dst_port()),
                syn: tcp.syn(),
                ack: tcp.ack(),
                rst: tcp.rst(),
                fin: tcp.fin(),
                seq: tcp.seq_number().0 as u32,
                ack_number: tcp.ack_number().0 as u32,
                payload_len: tcp.payload().len(),
            })
        }
        _ => Classified::Drop(DropReason::UnknownProtocol),
    }
}

fn classify_icmpv4(src: Ipv4Addr, dst: Ipv4Addr, body: &[u8]) -> Classified<'_> {
    let Ok(icmp) = Icmpv4Packet::new_checked(body) else {
        return Classified::Drop(DropReason::Malformed);
    };
    if !icmp.verify_checksum() {
        return Classified::Drop(DropReason::BadChecksum);
    }
    if dst.is_broadcast() || dst.is_multicast() {
        return Classified::Drop(DropReason::Broadcast);
    }
    if icmp.msg_type() == Icmpv4Message::EchoRequest {
        Classified::IcmpEcho {
            src: src.into(),
            dst: dst.into(),
            ident: icmp.echo_ident(),
            seq: icmp.echo_seq_no(),
            data: &body[8..],
        }
    } else {
        Classified::IcmpOther {
            src: src.into(),
            dst: dst.into(),
        }
    }
}

fn classify_icmpv6(src: Ipv6Addr, dst: Ipv6Addr, hop_limit: u8, body: &[u8]) -> Classified<'_> {
    let Ok(icmp) = Icmpv6Packet::new_checked(body) else {
        return Classified::Drop(DropReason::Malformed);
    };
    if !icmp.verify_checksum(&src, &dst) {
        return Classified::Drop(DropReason::BadChecksum);
    }
    let ndp = matches!(
        icmp.msg_type(),
        Icmpv6Message::RouterSolicit
            | Icmpv6Message::RouterAdvert
            | Icmpv6Message::NeighborSolicit
            | Icmpv6Message::NeighborAdvert
            | Icmpv6Message::Redirect
    );
    if ndp && hop_limit != 255 {
        return Classified::Drop(DropReason::UnexpectedNdp);
    }
    match icmp.msg_type() {
        Icmpv6Message::RouterSolicit => Classified::RouterSolicit { src },
        Icmpv6Message::NeighborSolicit if body.len() >= 24 => Classified::NeighborSolicit {
            src,
            target: icmp.target_addr(),
        },
        Icmpv6Message::RouterAdvert | Icmpv6Message::Redirect | Icmpv6Message::NeighborSolicit => {
            Classified::Drop(DropReason::UnexpectedNdp)
        }
        _ if dst.is_multicast() => Classified::Drop(DropReason::Broadcast),
        Icmpv6Message::EchoRequest => Classified::IcmpEcho {
            src: src.into(),
            dst: dst.into(),
            ident: icmp.echo_ident(),
            seq: icmp.echo_seq_no(),
            data: &body[8..],
        },
        _ => Classified::IcmpOther {
            src: src.into(),
            dst: dst.into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_dropped_not_panicking() {
        for len in 0..80 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = classify(&bytes);
        }
        assert_eq!(classify(&[0u8; 3]), Classified::Drop(DropReason::Malformed));
        // Garbage behind valid Ethernet + IP version nibbles, every next header of IPv6 and
        // every protocol of IPv4, with lengths around the header sizes.
        let mut seed = 0x9e37_79b9u32;
        for (ethertype, version) in [([0x08, 0x00], 0x45u8), ([0x86, 0xdd], 0x60)] {
            for proto in 0..=255u8 {
                for len in [20usize, 40, 41, 48, 60, 64, 100] {
                    let mut f = vec![0u8; 14 + len];
                    f[12..14].copy_from_slice(&ethertype);
                    for b in f[14..].iter_mut() {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        *b = seed as u8;
                    }
                    f[14] = version;
                    if version == 0x60 {
                        f[14 + 6] = proto;
                    } else {
                        f[14 + 9] = proto;
                    }
                    let _ = classify(&f);
                }
            }
        }
    }

    /// Found by the `classify` fuzz target: an IPv4 ethertype whose header says version 2 was
    /// classified as IPv4 (here as a fragment the reassembler, which checks the version, would
    /// never see; unfragmented, as a datagram the gateway's stack would refuse).
    #[test]
    fn a_header_of_another_ip_version_is_malformed() {
        let mut v4 = vec![0u8; 14];
        v4[12..14].copy_from_slice(&[0x08, 0x00]);
        v4.extend_from_slice(&[0x45, 0, 0, 28, 0, 1, 0x20, 0, 64, 17, 0, 0]);
        v4.extend_from_slice(&[172, 16, 0, 2, 172, 16, 0, 1]);
        v4.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
        for (version, flags) in [(2u8, 0x20u8), (6, 0), (5, 0)] {
            let mut f = v4.clone();
            f[14] = version << 4 | 5;
            f[14 + 6] = flags;
            Ipv4Packet::new_unchecked(&mut f[14..]).fill_checksum();
            assert_eq!(
                classify(&f),
                Classified::Drop(DropReason::Malformed),
                "IPv4 ethertype, version {version}"
            );
        }
        let src: Ipv6Addr = "fe80::2".parse().unwrap();
        let dst: Ipv6Addr = "fe80::1".parse().unwrap();
        for next_header in [17u8, 44] {
            let mut f = ipv6_frame(next_header, 64, src, dst, &[0; 8]);
            f[14] = 0x40;
            assert_eq!(
                classify(&f),
                Classified::Drop(DropReason::Malformed),
                "IPv6 ethertype, version 4, next header {next_header}"
            );
        }
    }

    #[test]
    fn truncated_ipv4_header_is_malformed() {
        let mut frame = vec![0u8; 14 + 10];
        frame[12] = 0x08;
        frame[13] = 0x00;
        frame[14] = 0x45;
        assert_eq!(classify(&frame), Classified::Drop(DropReason::Malformed));
    }

    /// An Ethernet + IPv6 frame with `next_header` and `body`, hop limit `hop`.
    fn ipv6_frame(next_header: u8, hop: u8, src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12] = 0x86;
        f[13] = 0xdd;
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(body.len() as u16).to_be_bytes());
        f.extend_from_slice(&[next_header, hop]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(body);
        f
    }

    fn icmpv6(src: Ipv6Addr, dst: Ipv6Addr, hop: u8, msg: &[u8]) -> Vec<u8> {
        let mut f = ipv6_frame(58, hop, src, dst, msg);
        Icmpv6Packet::new_unchecked(&mut f[54..]).fill_checksum(&src, &dst);
        f
    }

    #[test]
    fn ipv6_ndp_echo_and_extension_headers() {
        let guest: Ipv6Addr = "fe80::2".parse().unwrap();
        let gw: Ipv6Addr = "fe80::1".parse().unwrap();
        let snm: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
        let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
        ns.extend_from_slice(&gw.octets());
        assert_eq!(
            classify(&icmpv6(guest, snm, 255, &ns)),
            Classified::NeighborSolicit {
                src: guest,
                target: gw
            }
        );
        // NDP that crossed a router (hop limit below 255) is not from the link.
        assert_eq!(
            classify(&icmpv6(guest, snm, 64, &ns)),
            Classified::Drop(DropReason::UnexpectedNdp)
        );
        let rs = [133, 0, 0, 0, 0, 0, 0, 0];
        let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
        assert_eq!(
            classify(&icmpv6(Ipv6Addr::UNSPECIFIED, all_routers, 255, &rs)),
            Classified::RouterSolicit {
                src: Ipv6Addr::UNSPECIFIED
            }
        );
        let ra = [134, 0, 0, 0, 64, 0, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            classify(&icmpv6(guest, all_routers, 255, &ra)),
            Classified::Drop(DropReason::UnexpectedNdp)
        );
        let public: Ipv6Addr = "2001:db8::9".parse().unwrap();
        let echo = [128, 0, 0, 0, 0, 7, 0, 3, b'h', b'i'];
        assert_eq!(
            classify(&icmpv6(guest, public, 64, &echo)),
            Classified::IcmpEcho {
                src: guest.into(),
                dst: public.into(),
                ident: 7,
                seq: 3,
                data: b"hi"
            }
        );
        let mut bad = icmpv6(guest, public, 64, &echo);
        bad[60] ^= 1;
        assert_eq!(classify(&bad), Classified::Drop(DropReason::BadChecksum));
        let echo_to_all_nodes = icmpv6(guest, "ff02::1".parse().unwrap(), 64, &echo);
        assert_eq!(
            classify(&echo_to_all_nodes),
            Classified::Drop(DropReason::Broadcast)
        );
        for (next_header, reason) in [
            (0, DropReason::ExtensionHeader),
            (43, DropReason::ExtensionHeader),
            (60, DropReason::ExtensionHeader),
            (44, DropReason::Fragment),
            (132, DropReason::UnknownProtocol),
        ] {
            let f = ipv6_frame(next_header, 64, guest, public, &[6, 0, 0, 0, 0, 0, 0, 0]);
            assert_eq!(
                classify(&f),
                Classified::Drop(reason),
                "next header {next_header}"
            );
        }
        // A payload length beyond the frame.
        let mut long = icmpv6(guest, public, 64, &echo);
        long[18] = 0x10;
        assert_eq!(classify(&long), Classified::Drop(DropReason::Malformed));
    }

    #[test]
    fn ipv6_udp_without_checksum_is_dropped() {
        let src: Ipv6Addr = "fd42:6d73:62::2".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::8".parse().unwrap();
        let udp = [0x30, 0x39, 0, 7, 0, 10, 0, 0, b'h', b'i'];
        assert_eq!(
            classify(&ipv6_frame(17, 64, src, dst, &udp)),
            Classified::Drop(DropReason::BadChecksum)
        );
    }
}
