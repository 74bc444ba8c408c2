//! Building the frames netfence sends to the guest outside smoltcp's sockets: DHCP and UDP
//! replies, TCP resets for refused or rejected connections, ICMP/ICMPv6 unreachable and echo
//! replies, router advertisements. Every builder takes either address family; all headers are
//! written with smoltcp's `wire` types, checksums included.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4DstUnreachable,
    Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr, IpAddress,
    IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
};

pub const ETH_HDR: usize = 14;
const IPV4_HDR: usize = 20;
const IPV6_HDR: usize = 40;
/// Hop limit of the frames we originate (NDP messages use 255, see `ip_frame_with_hop_limit`).
const HOP_LIMIT: u8 = 64;

/// A TCP segment's header facts the flow table needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpHead {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
    pub fin: bool,
    pub seq: u32,
    pub ack_number: u32,
    pub payload_len: usize,
}

/// The two Ethernet addresses of one guest link.
#[derive(Debug, Clone, Copy)]
pub struct Macs {
    pub gateway_mac: EthernetAddress,
    pub guest_mac: EthernetAddress,
}

/// Why a guest packet is answered with a destination-unreachable, in both ICMP versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// The host side could not be routed to.
    Host,
    /// Nothing listens on the port (UDP rejected by policy).
    Port,
    /// Denied by policy.
    Prohibited,
}

impl Unreachable {
    fn v4(self) -> Icmpv4DstUnreachable {
        match self {
            Unreachable::Host => Icmpv4DstUnreachable::HostUnreachable,
            Unreachable::Port => Icmpv4DstUnreachable::PortUnreachable,
            Unreachable::Prohibited => Icmpv4DstUnreachable::CommProhibited,
        }
    }
    fn v6(self) -> Icmpv6DstUnreachable {
        match self {
            Unreachable::Host => Icmpv6DstUnreachable::AddrUnreachable,
            Unreachable::Port => Icmpv6DstUnreachable::PortUnreachable,
            Unreachable::Prohibited => Icmpv6DstUnreachable::AdminProhibit,
        }
    }
}

/// The IP header length for `addr`'s family.
pub fn ip_header_len(addr: IpAddr) -> usize {
    match addr {
        IpAddr::V4(_) => IPV4_HDR,
        IpAddr::V6(_) => IPV6_HDR,
    }
}

/// An IP frame from the gateway side to the guest with `payload_len` bytes of L4 data filled
/// by `fill`. Both addresses must be of one family (an IPv4 one is widened to its mapped IPv6
/// form if they are not, which the datapath never asks for).
fn ip_frame(
    dst_mac: EthernetAddress,
    src_mac: EthernetAddress,
    src: IpAddr,
    dst: IpAddr,
    protocol: IpProtocol,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    ip_frame_with_hop_limit(
        dst_mac,
        src_mac,
        src,
        dst,
        protocol,
        HOP_LIMIT,
        payload_len,
        fill,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn ip_frame_with_hop_limit(
    dst_mac: EthernetAddress,
    src_mac: EthernetAddress,
    src: IpAddr,
    dst: IpAddr,
    protocol: IpProtocol,
    hop_limit: u8,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let hdr = ip_header_len(src);
    let mut buf = vec![0u8; ETH_HDR + hdr + payload_len];
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    let ethertype = match src {
        IpAddr::V4(_) => EthernetProtocol::Ipv4,
        IpAddr::V6(_) => EthernetProtocol::Ipv6,
    };
    EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype,
    }
    .emit(&mut eth);
    match (src, dst) {
        (IpAddr::V4(src_addr), IpAddr::V4(dst_addr)) => {
            let repr = Ipv4Repr {
                src_addr,
                dst_addr,
                next_header: protocol,
                payload_len,
                hop_limit,
            };
            let mut ip = Ipv4Packet::new_unchecked(&mut buf[ETH_HDR..]);
            repr.emit(&mut ip, &ChecksumCapabilities::default());
        }
        (src_addr, dst_addr) => {
            let repr = Ipv6Repr {
                src_addr: v6(src_addr),
                dst_addr: v6(dst_addr),
                next_header: protocol,
                payload_len,
                hop_limit,
            };
            let mut ip = Ipv6Packet::new_unchecked(&mut buf[ETH_HDR..]);
            repr.emit(&mut ip);
        }
    }
    fill(&mut buf[ETH_HDR + hdr..]);
    buf
}

fn v6(a: IpAddr) -> std::net::Ipv6Addr {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

fn same_family(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    match (a, b) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (a, b),
        _ => (IpAddr::V6(v6(a)), IpAddr::V6(v6(b))),
    }
}

/// A UDP datagram from `src` (as the guest will see it) to the guest's `dst`.
/// `broadcast` sends it to the Ethernet broadcast address (DHCP to an unconfigured client).
pub fn udp_to_guest(
    macs: &Macs,
    src: SocketAddr,
    dst: SocketAddr,
    payload_len: usize,
    broadcast: bool,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let dst_mac = if broadcast {
        EthernetAddress::BROADCAST
    } else {
        macs.guest_mac
    };
    let (src_ip, dst_ip) = same_family(src.ip(), dst.ip());
    ip_frame(
        dst_mac,
        macs.gateway_mac,
        src_ip,
        dst_ip,
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
                &IpAddress::from(src_ip),
                &IpAddress::from(dst_ip),
                payload_len,
                fill,
                &ChecksumCapabilities::default(),
            );
        },
    )
}

/// The IP packet of an empty UDP datagram from `src` to `dst`: what an ICMP error about a
/// session quotes when the datagram itself is gone.
pub fn udp_quote(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let none = Macs {
        gateway_mac: EthernetAddress([0; 6]),
        guest_mac: EthernetAddress([0; 6]),
    };
    let frame = udp_to_guest(&none, src, dst, 0, false, |_| {});
    frame[ETH_HDR..].to_vec()
}

/// A TCP RST answering a segment from the guest (`from` -> `to`) so its connect fails at once.
pub fn tcp_reset(macs: &Macs, seg: &TcpHead) -> Vec<u8> {
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
    let (src, dst) = same_family(seg.dst.ip(), seg.src.ip());
    ip_frame(
        macs.guest_mac,
        macs.gateway_mac,
        src,
        dst,
        IpProtocol::Tcp,
        repr.buffer_len(),
        |l4| {
            let mut tcp = TcpPacket::new_unchecked(l4);
            repr.emit(
                &mut tcp,
                &IpAddress::from(src),
                &IpAddress::from(dst),
                &ChecksumCapabilities::default(),
            );
        },
    )
}

/// A destination-unreachable about `original` (the guest's IP packet, header first), sent from
/// `from` (the gateway address of the packet's family). ICMPv6 quotes as much of the packet as
/// fits in the minimum MTU (RFC 4443); ICMPv4 the header and 8 bytes.
pub fn icmp_unreachable(
    macs: &Macs,
    from: IpAddr,
    reason: Unreachable,
    original: &[u8],
) -> Option<Vec<u8>> {
    match original.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(original).ok()?;
            let header = Ipv4Repr::parse(&ip, &ChecksumCapabilities::ignored()).ok()?;
            let body_start = usize::from(ip.header_len());
            let data_end = (body_start + 8).min(original.len());
            let repr = Icmpv4Repr::DstUnreachable {
                reason: reason.v4(),
                header,
                data: &original[body_start..data_end],
            };
            Some(icmpv4_to_guest(macs, from, header.src_addr.into(), &repr))
        }
        6 => {
            let ip = Ipv6Packet::new_checked(original).ok()?;
            let header = Ipv6Repr::parse(&ip).ok()?;
            // 1280 (IPv6 minimum MTU) - 40 (IPv6) - 8 (ICMPv6) - 40 (quoted header).
            let data_end = (IPV6_HDR + 1192).min(original.len());
            let repr = Icmpv6Repr::DstUnreachable {
                reason: reason.v6(),
                header,
                data: &original[IPV6_HDR..data_end],
            };
            Some(icmpv6_to_guest(macs, v6(from), header.src_addr, &repr))
        }
        _ => None,
    }
}

/// An echo reply from `from` to the guest, ICMP or ICMPv6 by the addresses' family.
pub fn icmp_echo_reply(
    macs: &Macs,
    from: IpAddr,
    to: IpAddr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
) -> Vec<u8> {
    match same_family(from, to) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let repr = Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            icmpv4_to_guest(macs, from.into(), to.into(), &repr)
        }
        (from, to) => {
            let repr = Icmpv6Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            icmpv6_to_guest(macs, v6(from), v6(to), &repr)
        }
    }
}

/// An ICMP message from `from` to the guest.
fn icmpv4_to_guest(macs: &Macs, from: IpAddr, to: IpAddr, repr: &Icmpv4Repr) -> Vec<u8> {
    ip_frame(
        macs.guest_mac,
        macs.gateway_mac,
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

/// An ICMPv6 message from `from` to the guest.
fn icmpv6_to_guest(
    macs: &Macs,
    from: std::net::Ipv6Addr,
    to: std::net::Ipv6Addr,
    repr: &Icmpv6Repr,
) -> Vec<u8> {
    ip_frame(
        macs.guest_mac,
        macs.gateway_mac,
        from.into(),
        to.into(),
        IpProtocol::Icmpv6,
        repr.buffer_len(),
        |l4| {
            let mut icmp = Icmpv6Packet::new_unchecked(l4);
            repr.emit(&from, &to, &mut icmp, &ChecksumCapabilities::default());
        },
    )
}

/// The IP header of a TCP frame: (header length, src, dst, total length of header + payload).
/// `None` for anything but TCP.
fn tcp_ip_parts(frame: &[u8]) -> Option<(usize, IpAddr, IpAddr, usize)> {
    let ip = frame.get(ETH_HDR..)?;
    match ip.first()? >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(ip).ok()?;
            if p.next_header() != IpProtocol::Tcp {
                return None;
            }
            Some((
                usize::from(p.header_len()),
                p.src_addr().into(),
                p.dst_addr().into(),
                usize::from(p.total_len()),
            ))
        }
        6 => {
            let p = Ipv6Packet::new_checked(ip).ok()?;
            if p.next_header() != IpProtocol::Tcp {
                return None;
            }
            Some((
                IPV6_HDR,
                p.src_addr().into(),
                p.dst_addr().into(),
                IPV6_HDR + usize::from(p.payload_len()),
            ))
        }
        _ => None,
    }
}

/// Sets the IP length field of `ip` (header first) to `total` bytes of header and payload.
fn set_ip_total_len(ip: &mut [u8], hdr: usize, total: usize) {
    if ip[0] >> 4 == 4 {
        let mut p = Ipv4Packet::new_unchecked(ip);
        p.set_total_len(total as u16);
        p.fill_checksum();
    } else {
        Ipv6Packet::new_unchecked(ip).set_payload_len((total - hdr) as u16);
    }
}

/// A guest's SYN without the data it may carry, as a flow holds it while its host side
/// connects: smoltcp takes no data from a SYN (the guest sends it again once its SYN is
/// acknowledged), and a SYN can carry up to 64 KiB (a TSO frame, or a frame past the MTU), so
/// keeping it whole would let `tcp-connecting` SYNs hold 64 KiB each. A frame that is not
/// TCP comes back whole.
pub fn syn_headers(frame: &[u8]) -> Vec<u8> {
    let trimmed = || {
        let (ip_hdr, src, dst, ip_total) = tcp_ip_parts(frame)?;
        let tcp = TcpPacket::new_checked(frame.get(ETH_HDR + ip_hdr..ETH_HDR + ip_total)?).ok()?;
        let tcp_hdr = usize::from(tcp.header_len());
        let mut out = frame[..ETH_HDR + ip_hdr + tcp_hdr].to_vec();
        set_ip_total_len(&mut out[ETH_HDR..], ip_hdr, ip_hdr + tcp_hdr);
        TcpPacket::new_unchecked(&mut out[ETH_HDR + ip_hdr..])
            .fill_checksum(&IpAddress::from(src), &IpAddress::from(dst));
        Some(out)
    };
    trimmed().unwrap_or_else(|| frame.to_vec())
}

/// Splits a guest TCP segment carrying data and FIN into the same segment without FIN and a
/// bare FIN at the sequence number after the data. `None` if the frame is not such a segment.
pub fn split_fin(frame: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (ip_hdr, src, dst, ip_total) = tcp_ip_parts(frame)?;
    let (src, dst) = (IpAddress::from(src), IpAddress::from(dst));
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
        t.fill_checksum(&src, &dst);
    }

    let mut fin = frame[..ETH_HDR + ip_hdr + tcp_hdr].to_vec();
    set_ip_total_len(&mut fin[ETH_HDR..], ip_hdr, ip_hdr + tcp_hdr);
    {
        let mut t = TcpPacket::new_unchecked(&mut fin[ETH_HDR + ip_hdr..]);
        t.set_seq_number(seq_after);
        t.set_psh(false);
        t.fill_checksum(&src, &dst);
    }
    Some((data, fin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::classify::{classify, Classified};

    fn macs() -> Macs {
        Macs {
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
        let frame = tcp_reset(&macs(), &syn);
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
        let src: SocketAddr = "172.16.0.2:40000".parse().unwrap();
        let dst: SocketAddr = "203.0.113.7:80".parse().unwrap();
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
        let l = macs();
        let frame = ip_frame(
            l.gateway_mac,
            l.guest_mac,
            src.ip(),
            dst.ip(),
            IpProtocol::Tcp,
            repr.buffer_len(),
            |b| {
                repr.emit(
                    &mut TcpPacket::new_unchecked(b),
                    &IpAddress::from(src.ip()),
                    &IpAddress::from(dst.ip()),
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
        // Not TCP: a UDP datagram whose payload would read as a data+FIN segment is left alone.
        let mut tcp_bytes = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut TcpPacket::new_unchecked(&mut tcp_bytes[..]),
            &IpAddress::from(src.ip()),
            &IpAddress::from(dst.ip()),
            &ChecksumCapabilities::default(),
        );
        let udp = udp_to_guest(&l, src, dst, tcp_bytes.len(), false, |b| {
            b.copy_from_slice(&tcp_bytes)
        });
        let mut as_ip = udp.clone();
        // Make the IP payload start at the TCP bytes: drop the UDP header, as a parser that
        // ignored the protocol would read it.
        as_ip.drain(ETH_HDR + 20..ETH_HDR + 28);
        {
            let mut ip = Ipv4Packet::new_unchecked(&mut as_ip[ETH_HDR..]);
            ip.set_total_len((20 + tcp_bytes.len()) as u16);
            ip.fill_checksum();
        }
        assert!(split_fin(&as_ip).is_none(), "a non-TCP packet was split");
    }

    #[test]
    fn udp_frames_of_both_families_round_trip_through_the_classifier() {
        for (src, dst) in [
            ("203.0.113.8:7", "172.16.0.2:5555"),
            ("[2001:db8::8]:7", "[fd42:6d73:62::2]:5555"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let frame = udp_to_guest(&macs(), src, dst, 5, false, |b| b.copy_from_slice(b"hello"));
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

    #[test]
    fn ipv6_reset_and_echo_reply_round_trip_through_the_classifier() {
        let src: SocketAddr = "[2001:db8::8]:7".parse().unwrap();
        let dst: SocketAddr = "[fd42:6d73:62::2]:5555".parse().unwrap();
        let syn = TcpHead {
            src: dst,
            dst: "[2001:db8::7]:443".parse().unwrap(),
            syn: true,
            ack: false,
            rst: false,
            fin: false,
            seq: 9,
            ack_number: 0,
            payload_len: 0,
        };
        match classify(&tcp_reset(&macs(), &syn)) {
            Classified::Tcp(h) => assert!(h.rst && h.ack_number == 10 && h.dst == syn.src),
            other => panic!("not a TCP reset: {other:?}"),
        }
        let reply = icmp_echo_reply(&macs(), src.ip(), dst.ip(), 3, 4, b"x");
        assert_eq!(
            classify(&reply),
            Classified::IcmpOther {
                src: src.ip(),
                dst: dst.ip()
            },
            "an echo reply to the guest is ICMPv6, checksummed"
        );
    }

    #[test]
    fn ipv6_unreachable_quotes_the_packet_from_the_gateway() {
        let guest: SocketAddr = "[fd42:6d73:62::2]:40000".parse().unwrap();
        let denied: SocketAddr = "[fd12::1]:53".parse().unwrap();
        let original = udp_to_guest(&macs(), guest, denied, 3, false, |b| {
            b.copy_from_slice(b"abc")
        });
        let gateway: IpAddr = "fd42:6d73:62::1".parse().unwrap();
        let frame = icmp_unreachable(
            &macs(),
            gateway,
            Unreachable::Prohibited,
            &original[ETH_HDR..],
        )
        .expect("an IPv6 packet is quoted");
        let ip = Ipv6Packet::new_checked(&frame[ETH_HDR..]).unwrap();
        assert_eq!(
            (ip.src_addr(), ip.dst_addr()),
            (
                "fd42:6d73:62::1".parse().unwrap(),
                "fd42:6d73:62::2".parse().unwrap()
            )
        );
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
        assert_eq!((icmp.msg_type().into(), icmp.msg_code()), (1u8, 1u8));
        assert_eq!(icmp.payload(), &original[ETH_HDR..]);
    }
}
