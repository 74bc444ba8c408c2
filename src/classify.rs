//! Classifying a guest frame: what it is, who it is for, and whether it starts a new flow.
//!
//! Every frame from the TX queue passes through [`classify`] before anything acts on it. The
//! parsing is smoltcp's `wire` module (bounds-checked, borrowing, no allocation); checksums are
//! verified here so that later stages can trust the headers. The result tells the datapath where
//! the frame goes: the gateway's own stack (ARP, ICMP to the gateway, TCP of known flows), the
//! DHCP server, the UDP flows, or a counted drop.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, Icmpv4Message, Icmpv4Packet,
    IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};

/// A TCP segment's header facts the flow table needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpHead {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
    pub fin: bool,
    pub seq: u32,
    pub ack_number: u32,
    pub payload_len: usize,
}

/// What a guest frame is.
#[derive(Debug, PartialEq, Eq)]
pub enum Classified<'a> {
    /// ARP request or reply addressed to `target`.
    Arp { target: Ipv4Addr, request: bool },
    /// A DHCP (UDP 68 -> 67) message; the payload is the BOOTP message.
    Dhcp { payload: &'a [u8] },
    /// A UDP datagram to anywhere else.
    Udp {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &'a [u8],
    },
    /// A TCP segment.
    Tcp(TcpHead),
    /// An ICMP echo request.
    IcmpEcho {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ident: u16,
        seq: u16,
        data: &'a [u8],
    },
    /// ICMP that is not an echo request (replies, errors from the guest): for the gateway only.
    IcmpOther { dst: Ipv4Addr },
    /// IPv6: not carried yet.
    Ipv6,
    /// Not for us; counted under this reason.
    Drop(DropReason),
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
        }
    }
}

/// Classifies one Ethernet frame from the guest.
pub fn classify(frame: &[u8]) -> Classified<'_> {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Classified::Drop(DropReason::Malformed);
    };
    match eth.ethertype() {
        EthernetProtocol::Arp => classify_arp(eth.payload()),
        EthernetProtocol::Ipv4 => classify_ipv4(eth.payload()),
        EthernetProtocol::Ipv6 => Classified::Ipv6,
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
            target_protocol_addr,
            ..
        }) => Classified::Arp {
            target: target_protocol_addr,
            request: operation == ArpOperation::Request,
        },
        _ => Classified::Drop(DropReason::Malformed),
    }
}

fn classify_ipv4(payload: &[u8]) -> Classified<'_> {
    let Ok(ip) = Ipv4Packet::new_checked(payload) else {
        return Classified::Drop(DropReason::Malformed);
    };
    if !ip.verify_checksum() {
        return Classified::Drop(DropReason::BadChecksum);
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Classified::Drop(DropReason::Fragment);
    }
    let src = ip.src_addr();
    let dst = ip.dst_addr();
    let body = &payload[usize::from(ip.header_len())..usize::from(ip.total_len())];
    match ip.next_header() {
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(body) else {
                return Classified::Drop(DropReason::Malformed);
            };
            if udp.checksum() != 0 && !udp.verify_checksum(&src.into(), &dst.into()) {
                return Classified::Drop(DropReason::BadChecksum);
            }
            let data = &body[8..usize::from(udp.len()).min(body.len()).max(8)];
            if udp.dst_port() == 67 && udp.src_port() == 68 {
                return Classified::Dhcp { payload: data };
            }
            if dst.is_broadcast() || dst.is_multicast() {
                return Classified::Drop(DropReason::Broadcast);
            }
            Classified::Udp {
                src: SocketAddrV4::new(src, udp.src_port()),
                dst: SocketAddrV4::new(dst, udp.dst_port()),
                payload: data,
            }
        }
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(body) else {
                return Classified::Drop(DropReason::Malformed);
            };
            if !tcp.verify_checksum(&src.into(), &dst.into()) {
                return Classified::Drop(DropReason::BadChecksum);
            }
            if dst.is_broadcast() || dst.is_multicast() {
                return Classified::Drop(DropReason::Broadcast);
            }
            Classified::Tcp(TcpHead {
                src: SocketAddrV4::new(src, tcp.src_port()),
                dst: SocketAddrV4::new(dst, tcp.dst_port()),
                syn: tcp.syn(),
                ack: tcp.ack(),
                rst: tcp.rst(),
                fin: tcp.fin(),
                seq: tcp.seq_number().0 as u32,
                ack_number: tcp.ack_number().0 as u32,
                payload_len: tcp.payload().len(),
            })
        }
        IpProtocol::Icmp => {
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
                    src,
                    dst,
                    ident: icmp.echo_ident(),
                    seq: icmp.echo_seq_no(),
                    data: &body[8..],
                }
            } else {
                Classified::IcmpOther { dst }
            }
        }
        _ => Classified::Drop(DropReason::UnknownProtocol),
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
    }

    #[test]
    fn truncated_ipv4_header_is_malformed() {
        let mut frame = vec![0u8; 14 + 10];
        frame[12] = 0x08;
        frame[13] = 0x00;
        frame[14] = 0x45;
        assert_eq!(classify(&frame), Classified::Drop(DropReason::Malformed));
    }
}
