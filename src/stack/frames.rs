//! Building the frames netfence sends to the guest outside smoltcp's sockets: DHCP and UDP
//! replies, TCP resets for refused or rejected connections, ICMP unreachable and echo replies.
//! All headers are written with smoltcp's `wire` types, checksums included.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4DstUnreachable,
    Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

const ETH_HDR: usize = 14;
const IPV4_HDR: usize = 20;

/// Link-layer addresses of one guest link.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub gateway_mac: EthernetAddress,
    pub guest_mac: EthernetAddress,
}

/// An IPv4 frame from the gateway side to the guest with `payload_len` bytes of L4 data filled
/// by `fill`.
fn ipv4_frame(
    dst_mac: EthernetAddress,
    src_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpProtocol,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let mut buf = vec![0u8; ETH_HDR + IPV4_HDR + payload_len];
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let ip_repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len,
        hop_limit: 64,
    };
    let mut ip = Ipv4Packet::new_unchecked(&mut buf[ETH_HDR..]);
    ip_repr.emit(&mut ip, &ChecksumCapabilities::default());
    fill(&mut buf[ETH_HDR + IPV4_HDR..]);
    buf
}

/// A UDP datagram from `src` (as the guest will see it) to the guest's `dst`.
/// `broadcast` sends it to the Ethernet broadcast address (DHCP to an unconfigured client).
pub fn udp_to_guest(
    link: &Link,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload_len: usize,
    broadcast: bool,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let dst_mac = if broadcast {
        EthernetAddress::BROADCAST
    } else {
        link.guest_mac
    };
    ipv4_frame(
        dst_mac,
        link.gateway_mac,
        *src.ip(),
        *dst.ip(),
        IpProtocol::Udp,
        8 + payload_len,
        |l4| {
            let mut udp = UdpPacket::new_unchecked(l4);
            UdpRepr {
                src_port: src.port(),
                dst_port: dst.port(),
            }
            .emit(
                &mut udp,
                &IpAddress::Ipv4(*src.ip()),
                &IpAddress::Ipv4(*dst.ip()),
                payload_len,
                fill,
                &ChecksumCapabilities::default(),
            );
        },
    )
}

/// A TCP RST answering a segment from the guest (`from` -> `to`) so its connect fails at once.
pub fn tcp_reset(link: &Link, seg: &crate::classify::TcpHead) -> Vec<u8> {
    // RFC 9293: if the segment had ACK, RST seq = its ack; else seq 0 and ACK what it occupied.
    let (seq, ack) = if seg.ack {
        (seg.ack_number, None)
    } else {
        let len = seg.payload_len as u32 + u32::from(seg.syn) + u32::from(seg.fin);
        (0, Some(seg.seq.wrapping_add(len)))
    };
    let repr = TcpRepr {
        src_port: seg.dst.port(),
        dst_port: seg.src.port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (src, dst) = (*seg.dst.ip(), *seg.src.ip());
    ipv4_frame(
        link.guest_mac,
        link.gateway_mac,
        src,
        dst,
        IpProtocol::Tcp,
        repr.buffer_len(),
        |l4| {
            let mut tcp = TcpPacket::new_unchecked(l4);
            repr.emit(
                &mut tcp,
                &IpAddress::Ipv4(src),
                &IpAddress::Ipv4(dst),
                &ChecksumCapabilities::default(),
            );
        },
    )
}

/// An ICMP destination-unreachable about `original` (the guest's IPv4 packet, header first),
/// sent from `from` (the gateway).
pub fn icmp_unreachable(
    link: &Link,
    from: Ipv4Addr,
    reason: Icmpv4DstUnreachable,
    original: &[u8],
) -> Option<Vec<u8>> {
    let ip = Ipv4Packet::new_checked(original).ok()?;
    let header = Ipv4Repr::parse(&ip, &ChecksumCapabilities::ignored()).ok()?;
    let body_start = usize::from(ip.header_len());
    let data_end = (body_start + 8).min(original.len());
    let repr = Icmpv4Repr::DstUnreachable {
        reason,
        header,
        data: &original[body_start..data_end],
    };
    Some(icmp_to_guest(link, from, header.src_addr, &repr))
}

/// An ICMP echo reply from `from` to the guest.
pub fn icmp_echo_reply(
    link: &Link,
    from: Ipv4Addr,
    to: Ipv4Addr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
) -> Vec<u8> {
    let repr = Icmpv4Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    icmp_to_guest(link, from, to, &repr)
}

/// An ICMP message from `from` to the guest.
fn icmp_to_guest(link: &Link, from: Ipv4Addr, to: Ipv4Addr, repr: &Icmpv4Repr) -> Vec<u8> {
    ipv4_frame(
        link.guest_mac,
        link.gateway_mac,
        from,
        to,
        IpProtocol::Icmp,
        repr.buffer_len(),
        |l4| {
            let mut icmp = Icmpv4Packet::new_unchecked(l4);
            repr.emit(&mut icmp, &ChecksumCapabilities::default());
        },
    )
}

/// Splits a guest TCP segment carrying data and FIN into the same segment without FIN and a
/// bare FIN at the sequence number after the data. `None` if the frame is not such a segment.
pub fn split_fin(frame: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let ip = Ipv4Packet::new_checked(frame.get(ETH_HDR..)?).ok()?;
    let ip_hdr = usize::from(ip.header_len());
    let ip_total = usize::from(ip.total_len());
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let tcp = TcpPacket::new_checked(frame.get(ETH_HDR + ip_hdr..ETH_HDR + ip_total)?).ok()?;
    let tcp_hdr = usize::from(tcp.header_len());
    let payload_len = tcp.payload().len();
    if !tcp.fin() || payload_len == 0 {
        return None;
    }
    let seq_after = tcp.seq_number() + payload_len;

    let mut data = frame[..ETH_HDR + ip_total].to_vec();
    {
        let mut t = TcpPacket::new_unchecked(&mut data[ETH_HDR + ip_hdr..]);
        t.set_fin(false);
        t.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
    }

    let mut fin = frame[..ETH_HDR + ip_hdr + tcp_hdr].to_vec();
    {
        let mut i = Ipv4Packet::new_unchecked(&mut fin[ETH_HDR..]);
        i.set_total_len((ip_hdr + tcp_hdr) as u16);
        i.fill_checksum();
        let mut t = TcpPacket::new_unchecked(&mut fin[ETH_HDR + ip_hdr..]);
        t.set_seq_number(seq_after);
        t.set_psh(false);
        t.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
    }
    Some((data, fin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{classify, Classified, TcpHead};

    fn link() -> Link {
        Link {
            gateway_mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
            guest_mac: EthernetAddress([2, 0, 0, 0, 0, 2]),
        }
    }

    #[test]
    fn reset_for_a_syn_acks_the_syn() {
        let syn = TcpHead {
            src: "172.16.0.2:40000".parse().unwrap(),
            dst: "203.0.113.7:80".parse().unwrap(),
            syn: true,
            ack: false,
            rst: false,
            fin: false,
            seq: 1000,
            ack_number: 0,
            payload_len: 0,
        };
        let frame = tcp_reset(&link(), &syn);
        match classify(&frame) {
            Classified::Tcp(h) => {
                assert!(h.rst && h.ack);
                assert_eq!(h.ack_number, 1001);
                assert_eq!(h.src, syn.dst);
                assert_eq!(h.dst, syn.src);
            }
            other => panic!("not a TCP reset: {other:?}"),
        }
    }

    #[test]
    fn split_fin_separates_data_and_fin() {
        let src: SocketAddrV4 = "172.16.0.2:40000".parse().unwrap();
        let dst: SocketAddrV4 = "203.0.113.7:80".parse().unwrap();
        let repr = TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            control: TcpControl::Fin,
            seq_number: TcpSeqNumber(500),
            ack_number: Some(TcpSeqNumber(9)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: b"abcde",
        };
        let l = link();
        let frame = ipv4_frame(
            l.gateway_mac,
            l.guest_mac,
            *src.ip(),
            *dst.ip(),
            IpProtocol::Tcp,
            repr.buffer_len(),
            |b| {
                repr.emit(
                    &mut TcpPacket::new_unchecked(b),
                    &IpAddress::Ipv4(*src.ip()),
                    &IpAddress::Ipv4(*dst.ip()),
                    &ChecksumCapabilities::default(),
                )
            },
        );
        let (data, fin) = split_fin(&frame).expect("a data+FIN segment splits");
        match (classify(&data), classify(&fin)) {
            (Classified::Tcp(d), Classified::Tcp(f)) => {
                assert!(!d.fin && d.payload_len == 5 && d.seq == 500);
                assert!(f.fin && f.payload_len == 0 && f.seq == 505 && f.ack_number == 9);
            }
            other => panic!("split frames do not classify as TCP: {other:?}"),
        }
        assert!(split_fin(&data).is_none());
    }

    #[test]
    fn udp_frame_round_trips_through_the_classifier() {
        let src: SocketAddrV4 = "203.0.113.8:7".parse().unwrap();
        let dst: SocketAddrV4 = "172.16.0.2:5555".parse().unwrap();
        let frame = udp_to_guest(&link(), src, dst, 5, false, |b| b.copy_from_slice(b"hello"));
        assert_eq!(
            classify(&frame),
            Classified::Udp {
                src,
                dst,
                payload: b"hello"
            }
        );
    }
}
