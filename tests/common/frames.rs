//! Raw Ethernet frames of either IP family: builders for well-formed single packets (ARP
//! request, IP packets, TCP segments and SYNs, UDP, ICMP and ICMPv6 echo) and for garbage, and
//! parsers for what netfence sends back (IP, TCP, UDP, ICMP errors with the quoted packet).
//! The family follows from the addresses (`impl Into<IpAddr>`): the IP header, the ethertype,
//! the checksum pseudo-header and the SYN's MSS come from it. Built by hand or with
//! `smoltcp::wire`; checksums are always filled, and always verified on parse and reported
//! (`checksums_ok`) rather than hidden. What only IPv6 has (neighbor discovery, router
//! advertisements, extension headers) is in [`super::frames6`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Message, Icmpv4Packet, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv6Packet, TcpPacket, TcpSeqNumber, UdpPacket,
};

use super::frames6::{self, IPV6_HDR_LEN, NH_ICMPV6};

pub const ETH_HDR_LEN: usize = 14;
pub const IPV4_HDR_LEN: usize = 20;
pub const BROADCAST: [u8; 6] = [0xff; 6];
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// IEEE 802 local experimental ethertype: something no stack should act on.
pub const ETHERTYPE_EXPERIMENTAL: u16 = 0x88b5;

/// IP protocol numbers (IPv6 next header values) of the transports.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The IPv4 identification of the packets [`ip_packet`] builds.
pub const IPV4_IDENT: u16 = 0x1234;

/// A small deterministic PRNG (xorshift64*), so garbage is reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// `src` and `dst` as one family; panics on a mixed pair (a harness bug).
fn pair(src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> (IpAddr, IpAddr) {
    let (src, dst) = (src.into(), dst.into());
    assert_eq!(
        src.is_ipv4(),
        dst.is_ipv4(),
        "one packet, two IP families: {src} -> {dst}"
    );
    (src, dst)
}

/// The ethertype of an IP packet of `addr`'s family.
pub fn ethertype_of(addr: IpAddr) -> u16 {
    if addr.is_ipv4() {
        ETHERTYPE_IPV4
    } else {
        ETHERTYPE_IPV6
    }
}

/// The ICMP of `addr`'s family: ICMP (1) for IPv4, ICMPv6 (58) for IPv6.
pub fn icmp_proto(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        PROTO_ICMP
    } else {
        NH_ICMPV6
    }
}

/// The length of `addr`'s family's IP header (without options or extension headers).
pub fn ip_hdr_len(addr: IpAddr) -> usize {
    if addr.is_ipv4() {
        IPV4_HDR_LEN
    } else {
        IPV6_HDR_LEN
    }
}

/// The MSS a SYN announces: a 1500-byte MTU less the IP and TCP headers (1460 over IPv4,
/// 1440 over IPv6).
pub fn syn_mss(addr: IpAddr) -> u16 {
    (1500 - ip_hdr_len(addr) - 20) as u16
}

/// Ethernet header + payload.
pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HDR_LEN + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Broadcast ARP who-has `target` from (`mac`, `src_ip`).
pub fn arp_request(mac: [u8; 6], src_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: src_ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut buf = vec![0u8; ETH_HDR_LEN + repr.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    EthernetRepr {
        src_addr: EthernetAddress(mac),
        dst_addr: EthernetAddress(BROADCAST),
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut frame);
    repr.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    buf
}

/// A 20-byte IPv4 header (DF set, TTL 64) with a correct checksum, then `payload`.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ident: u16, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; IPV4_HDR_LEN + payload.len()];
    {
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        p.set_version(4);
        p.set_header_len(IPV4_HDR_LEN as u8);
        p.set_dscp(0);
        p.set_ecn(0);
        p.set_total_len((IPV4_HDR_LEN + payload.len()) as u16);
        p.set_ident(ident);
        p.clear_flags();
        p.set_dont_frag(true);
        p.set_frag_offset(0);
        p.set_hop_limit(64);
        p.set_next_header(IpProtocol::from(proto));
        p.set_src_addr(src);
        p.set_dst_addr(dst);
        p.fill_checksum();
    }
    buf[IPV4_HDR_LEN..].copy_from_slice(payload);
    buf
}

/// An IP packet of the addresses' family, then `payload`: an IPv4 header as
/// [`ipv4_packet`] writes it (ident [`IPV4_IDENT`]) or an IPv6 header with hop limit 64.
pub fn ip_packet(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    match pair(src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_packet(s, d, proto, IPV4_IDENT, payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => frames6::ipv6_packet(s, d, proto, 64, payload),
        _ => unreachable!(),
    }
}

/// A whole Ethernet frame (ethertype by family) carrying one [`ip_packet`].
pub fn ip_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let (src, dst) = pair(src, dst);
    let packet = ip_packet(src, dst, proto, payload);
    eth(dst_mac, src_mac, ethertype_of(src), &packet)
}

/// Fragments of one IP datagram carrying `l4` (a transport header and payload of `proto`), as
/// whole Ethernet frames: one per `(offset, len)` piece of `l4` (offsets multiples of 8; the
/// more-fragments flag is set unless the piece reaches the end). IPv4 pieces carry `ident`'s
/// low 16 bits, IPv6 pieces a fragment header with `ident`. Pieces may overlap.
#[allow(clippy::too_many_arguments)]
pub fn fragment_frames(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    proto: u8,
    l4: &[u8],
    ident: u32,
    pieces: &[(usize, usize)],
) -> Vec<Vec<u8>> {
    let (src, dst) = pair(src, dst);
    pieces
        .iter()
        .map(|&(off, len)| {
            let part = &l4[off..off + len];
            let more = off + len < l4.len();
            let packet = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    let mut p = ipv4_packet(s, d, proto, ident as u16, part);
                    let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
                    ip.clear_flags();
                    ip.set_more_frags(more);
                    ip.set_frag_offset(off as u16);
                    ip.fill_checksum();
                    p
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    let mut body =
                        frames6::fragment_header(proto, (off / 8) as u16, more, ident).to_vec();
                    body.extend_from_slice(part);
                    frames6::ipv6_packet(s, d, frames6::NH_FRAGMENT, 64, &body)
                }
                _ => unreachable!(),
            };
            eth(dst_mac, src_mac, ethertype_of(src), &packet)
        })
        .collect()
}

/// `len` bytes split into pieces of at most `piece` bytes (a multiple of 8): `(offset, len)`.
pub fn even_pieces(len: usize, piece: usize) -> Vec<(usize, usize)> {
    (0..len)
        .step_by(piece)
        .map(|off| (off, piece.min(len - off)))
        .collect()
}

/// TCP flags for [`tcp_segment`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
    pub fin: bool,
    pub psh: bool,
}

impl Flags {
    pub const SYN: Flags = Flags {
        syn: true,
        ack: false,
        rst: false,
        fin: false,
        psh: false,
    };
    pub const ACK: Flags = Flags {
        syn: false,
        ack: true,
        rst: false,
        fin: false,
        psh: false,
    };
    pub const RST: Flags = Flags {
        syn: false,
        ack: false,
        rst: true,
        fin: false,
        psh: false,
    };
}

/// A TCP segment (with an MSS option of [`syn_mss`] on SYN) and a correct checksum.
#[allow(clippy::too_many_arguments)]
pub fn tcp_segment(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: Flags,
    window: u16,
    payload: &[u8],
) -> Vec<u8> {
    let (src, dst) = pair(src, dst);
    let mss = syn_mss(src).to_be_bytes();
    let opts = if flags.syn {
        vec![2, 4, mss[0], mss[1]]
    } else {
        Vec::new()
    };
    let hl = 20 + opts.len();
    let mut buf = vec![0u8; hl + payload.len()];
    buf[20..hl].copy_from_slice(&opts);
    buf[hl..].copy_from_slice(payload);
    let mut p = TcpPacket::new_unchecked(&mut buf[..]);
    p.set_src_port(sport);
    p.set_dst_port(dport);
    p.set_seq_number(TcpSeqNumber(seq as i32));
    p.set_ack_number(TcpSeqNumber(ack as i32));
    p.set_header_len(hl as u8);
    p.clear_flags();
    p.set_syn(flags.syn);
    p.set_ack(flags.ack);
    p.set_rst(flags.rst);
    p.set_fin(flags.fin);
    p.set_psh(flags.psh);
    p.set_window_len(window);
    p.set_urgent_at(0);
    p.fill_checksum(&IpAddress::from(src), &IpAddress::from(dst));
    buf
}

/// A whole Ethernet frame carrying one TCP SYN (window 64240).
#[allow(clippy::too_many_arguments)]
pub fn tcp_syn_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    sport: u16,
    dport: u16,
    seq: u32,
) -> Vec<u8> {
    let (src, dst) = pair(src, dst);
    let seg = tcp_segment(src, dst, sport, dport, seq, 0, Flags::SYN, 64240, &[]);
    ip_frame(src_mac, dst_mac, src, dst, PROTO_TCP, &seg)
}

/// A UDP datagram with its checksum filled (optional over IPv4, mandatory over IPv6).
pub fn udp_datagram(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let (src, dst) = pair(src, dst);
    let mut buf = vec![0u8; 8 + payload.len()];
    let mut p = UdpPacket::new_unchecked(&mut buf[..]);
    p.set_src_port(sport);
    p.set_dst_port(dport);
    p.set_len((8 + payload.len()) as u16);
    p.payload_mut().copy_from_slice(payload);
    p.fill_checksum(&IpAddress::from(src), &IpAddress::from(dst));
    buf
}

/// A whole Ethernet frame carrying one UDP datagram.
#[allow(clippy::too_many_arguments)]
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let (src, dst) = pair(src, dst);
    let dgram = udp_datagram(src, dst, sport, dport, payload);
    ip_frame(src_mac, dst_mac, src, dst, PROTO_UDP, &dgram)
}

/// The bytes of an echo request: ICMP over IPv4, ICMPv6 (checksum over the pseudo-header of
/// `src`, `dst`) over IPv6; checksum filled.
pub fn icmp_echo_request(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    match pair(src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => frames6::icmpv6_message(
            s,
            d,
            &Icmpv6Repr::EchoRequest {
                ident,
                seq_no: seq,
                data,
            },
        ),
        _ => {
            let mut buf = vec![0u8; 8 + data.len()];
            let mut p = Icmpv4Packet::new_unchecked(&mut buf[..]);
            p.set_msg_type(Icmpv4Message::EchoRequest);
            p.set_msg_code(0);
            p.set_echo_ident(ident);
            p.set_echo_seq_no(seq);
            p.data_mut().copy_from_slice(data);
            p.fill_checksum();
            buf
        }
    }
}

/// A whole Ethernet frame carrying one ICMP (IPv4) or ICMPv6 (IPv6) echo request.
#[allow(clippy::too_many_arguments)]
pub fn icmp_echo_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    let (src, dst) = pair(src, dst);
    let msg = icmp_echo_request(src, dst, ident, seq, data);
    ip_frame(src_mac, dst_mac, src, dst, icmp_proto(src), &msg)
}

/// A frame of `len` bytes total with an experimental ethertype and patterned payload.
pub fn garbage_ethernet(src_mac: [u8; 6], len: usize) -> Vec<u8> {
    let len = len.max(ETH_HDR_LEN);
    let payload: Vec<u8> = (0..len - ETH_HDR_LEN).map(|i| (i * 7) as u8).collect();
    eth(BROADCAST, src_mac, ETHERTYPE_EXPERIMENTAL, &payload)
}

// ---- parsing -------------------------------------------------------------------------------

pub fn ethertype(frame: &[u8]) -> Option<u16> {
    (frame.len() >= ETH_HDR_LEN).then(|| u16::from_be_bytes([frame[12], frame[13]]))
}

pub fn eth_dst(frame: &[u8]) -> Option<[u8; 6]> {
    frame.get(0..6).map(|s| s.try_into().unwrap())
}

pub fn eth_src(frame: &[u8]) -> Option<[u8; 6]> {
    frame.get(6..12).map(|s| s.try_into().unwrap())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpInfo {
    pub request: bool,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

pub fn parse_arp(frame: &[u8]) -> Option<ArpInfo> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Arp {
        return None;
    }
    let pkt = ArpPacket::new_checked(eth.payload()).ok()?;
    match ArpRepr::parse(&pkt).ok()? {
        ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_hardware_addr,
            target_protocol_addr,
        } => Some(ArpInfo {
            request: operation == ArpOperation::Request,
            sender_mac: source_hardware_addr.0,
            sender_ip: source_protocol_addr,
            target_mac: target_hardware_addr.0,
            target_ip: target_protocol_addr,
        }),
        _ => None,
    }
}

/// One IP packet of a frame, with its Ethernet addresses. `A` is the address type: `IpAddr`
/// (either family, from [`parse_ip`]) or `Ipv6Addr` (from [`frames6::parse_ipv6`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpInfo<A = IpAddr> {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub src: A,
    pub dst: A,
    /// IPv4 protocol / IPv6 next header.
    pub proto: u8,
    /// IPv4 TTL / IPv6 hop limit.
    pub hop_limit: u8,
    /// The IPv4 header checksum verified (IPv6 has none: always true).
    pub header_ok: bool,
    /// Exactly the length the IP header gives (Ethernet padding cut off).
    pub payload: Vec<u8>,
}

impl IpInfo {
    /// The same packet with its IPv6 addresses, if it is IPv6.
    pub fn v6(self) -> Option<IpInfo<Ipv6Addr>> {
        let (IpAddr::V6(src), IpAddr::V6(dst)) = (self.src, self.dst) else {
            return None;
        };
        Some(IpInfo {
            eth_src: self.eth_src,
            eth_dst: self.eth_dst,
            src,
            dst,
            proto: self.proto,
            hop_limit: self.hop_limit,
            header_ok: self.header_ok,
            payload: self.payload,
        })
    }
}

/// The IPv4 or IPv6 packet of a frame; `None` for other ethertypes and for packets whose
/// length fields do not fit the frame (or an IPv6 ethertype with another IP version).
pub fn parse_ip(frame: &[u8]) -> Option<IpInfo> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let (src, dst, proto, hop_limit, header_ok, payload): (IpAddr, IpAddr, _, _, _, _) =
        match eth.ethertype() {
            EthernetProtocol::Ipv4 => {
                let p = Ipv4Packet::new_checked(eth.payload()).ok()?;
                (
                    p.src_addr().into(),
                    p.dst_addr().into(),
                    p.next_header(),
                    p.hop_limit(),
                    p.verify_checksum(),
                    p.payload(),
                )
            }
            EthernetProtocol::Ipv6 => {
                let p = Ipv6Packet::new_checked(eth.payload()).ok()?;
                if p.version() != 6 {
                    return None;
                }
                (
                    p.src_addr().into(),
                    p.dst_addr().into(),
                    p.next_header(),
                    p.hop_limit(),
                    true,
                    p.payload(),
                )
            }
            _ => return None,
        };
    Some(IpInfo {
        eth_src: eth.src_addr().0,
        eth_dst: eth.dst_addr().0,
        src,
        dst,
        proto: u8::from(proto),
        hop_limit,
        header_ok,
        payload: payload.to_vec(),
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: Flags,
    pub window: u16,
    pub payload: Vec<u8>,
    /// The IPv4 header checksum (if IPv4) and the TCP checksum verified.
    pub checksums_ok: bool,
}

pub fn parse_tcp(frame: &[u8]) -> Option<TcpInfo> {
    let ip = parse_ip(frame).filter(|ip| ip.proto == PROTO_TCP)?;
    let t = TcpPacket::new_checked(&ip.payload[..]).ok()?;
    Some(TcpInfo {
        src: ip.src,
        dst: ip.dst,
        sport: t.src_port(),
        dport: t.dst_port(),
        seq: t.seq_number().0 as u32,
        ack: t.ack_number().0 as u32,
        flags: Flags {
            syn: t.syn(),
            ack: t.ack(),
            rst: t.rst(),
            fin: t.fin(),
            psh: t.psh(),
        },
        window: t.window_len(),
        payload: t.payload().to_vec(),
        checksums_ok: ip.header_ok
            && t.verify_checksum(&IpAddress::from(ip.src), &IpAddress::from(ip.dst)),
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    /// The IPv4 header checksum (if IPv4) and the UDP checksum verified.
    pub checksums_ok: bool,
}

pub fn parse_udp(frame: &[u8]) -> Option<UdpInfo> {
    let ip = parse_ip(frame).filter(|ip| ip.proto == PROTO_UDP)?;
    let u = UdpPacket::new_checked(&ip.payload[..]).ok()?;
    Some(UdpInfo {
        src: ip.src,
        dst: ip.dst,
        sport: u.src_port(),
        dport: u.dst_port(),
        payload: u.payload().to_vec(),
        checksums_ok: ip.header_ok
            && u.verify_checksum(&IpAddress::from(ip.src), &IpAddress::from(ip.dst)),
    })
}

/// The start of the packet an ICMP or ICMPv6 error quotes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 protocol / IPv6 next header.
    pub proto: u8,
    /// What follows the quoted IP header (possibly truncated).
    pub l4: Vec<u8>,
}

impl Quoted {
    /// The quoted IP header at the start of `q`, of the family of the error (`v6`); the quote
    /// is truncated, so its length fields cannot be checked against the buffer.
    fn parse(q: &[u8], v6: bool) -> Option<Quoted> {
        let version = *q.first()? >> 4;
        if v6 {
            let h = Ipv6Packet::new_unchecked(q);
            (q.len() >= IPV6_HDR_LEN && version == 6).then(|| Quoted {
                src: h.src_addr().into(),
                dst: h.dst_addr().into(),
                proto: u8::from(h.next_header()),
                l4: q[IPV6_HDR_LEN..].to_vec(),
            })
        } else {
            let ihl = ((q[0] & 0x0f) as usize) * 4;
            let addr = |i: usize| IpAddr::from(Ipv4Addr::new(q[i], q[i + 1], q[i + 2], q[i + 3]));
            (q.len() >= IPV4_HDR_LEN && version == 4).then(|| Quoted {
                src: addr(12),
                dst: addr(16),
                proto: q[9],
                l4: q.get(ihl..).unwrap_or_default().to_vec(),
            })
        }
    }

    /// TCP/UDP ports of the quoted packet (or ICMP type/code + checksum, read the same way).
    pub fn ports(&self) -> Option<(u16, u16)> {
        let b = self.l4.get(..4)?;
        Some((
            u16::from_be_bytes([b[0], b[1]]),
            u16::from_be_bytes([b[2], b[3]]),
        ))
    }

    /// The echo identifier of a quoted echo request.
    pub fn echo_ident(&self) -> Option<u16> {
        let b = self.l4.get(4..6)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Any ICMP (IPv4) or ICMPv6 (IPv6) message of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpInfo {
    pub ip: IpInfo,
    pub msg_type: u8,
    pub code: u8,
    /// Echo request/reply only.
    pub ident: u16,
    pub seq: u16,
    /// Echo data (echo messages only).
    pub data: Vec<u8>,
    /// Error messages (ICMP: all but echo; ICMPv6: types 1-4): the offending packet's header.
    pub quoted: Option<Quoted>,
    /// The IPv4 header checksum (if IPv4) and the ICMP checksum verified.
    pub checksums_ok: bool,
}

pub fn parse_icmp(frame: &[u8]) -> Option<IcmpInfo> {
    let ip = parse_ip(frame)?;
    let l4 = &ip.payload[..];
    // (type, code, echo ident and seq, is an error, checksum verified)
    let (msg_type, code, echo, error, verified) = match (ip.src, ip.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) if ip.proto == PROTO_ICMP => {
            let p = Icmpv4Packet::new_checked(l4).ok()?;
            let t = u8::from(p.msg_type());
            let echo = (t == 0 || t == 8).then(|| (p.echo_ident(), p.echo_seq_no()));
            (t, p.msg_code(), echo, echo.is_none(), p.verify_checksum())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) if ip.proto == NH_ICMPV6 => {
            let p = Icmpv6Packet::new_checked(l4).ok()?;
            let t = u8::from(p.msg_type());
            let echo = (t == frames6::ICMPV6_ECHO_REQUEST || t == frames6::ICMPV6_ECHO_REPLY)
                .then(|| (p.echo_ident(), p.echo_seq_no()));
            let error = (1..=4).contains(&t);
            (t, p.msg_code(), echo, error, p.verify_checksum(&s, &d))
        }
        _ => return None,
    };
    // Echo and error messages alike have an 8-byte header: the data or the quote follows.
    let rest = l4.get(8..).unwrap_or_default();
    let (ident, seq) = echo.unwrap_or_default();
    Some(IcmpInfo {
        msg_type,
        code,
        ident,
        seq,
        data: if echo.is_some() {
            rest.to_vec()
        } else {
            Vec::new()
        },
        quoted: if error {
            Quoted::parse(rest, ip.src.is_ipv6())
        } else {
            None
        },
        checksums_ok: ip.header_ok && verified,
        ip,
    })
}

/// One line describing a frame, for test failure messages.
pub fn describe(frame: &[u8]) -> String {
    if let Some(a) = parse_arp(frame) {
        return format!(
            "ARP {} {}({:02x?}) -> {}",
            if a.request { "who-has" } else { "reply" },
            a.sender_ip,
            a.sender_mac,
            a.target_ip
        );
    }
    if let Some(t) = parse_tcp(frame) {
        return format!(
            "TCP {} -> {} {:?} seq={} ack={} win={} len={}",
            SocketAddr::new(t.src, t.sport),
            SocketAddr::new(t.dst, t.dport),
            t.flags,
            t.seq,
            t.ack,
            t.window,
            t.payload.len()
        );
    }
    if let Some(u) = parse_udp(frame) {
        return format!(
            "UDP {} -> {} len={}",
            SocketAddr::new(u.src, u.sport),
            SocketAddr::new(u.dst, u.dport),
            u.payload.len()
        );
    }
    if let Some(i) = parse_icmp(frame) {
        return format!(
            "{} {} -> {} type={} code={} hop_limit={}",
            if i.ip.src.is_ipv6() { "ICMPv6" } else { "ICMP" },
            i.ip.src,
            i.ip.dst,
            i.msg_type,
            i.code,
            i.ip.hop_limit
        );
    }
    if let Some(ip) = parse_ip(frame) {
        return format!(
            "IP {} -> {} proto={} len={}",
            ip.src,
            ip.dst,
            ip.proto,
            ip.payload.len()
        );
    }
    format!("{} bytes ethertype={:04x?}", frame.len(), ethertype(frame))
}
