//! Raw Ethernet frames: builders for well-formed single packets (ARP request, TCP SYN, UDP,
//! ICMP echo) and for garbage, and parsers for what netfence sends back. Built by hand or with
//! `smoltcp::wire`; checksums are always filled and always verified on parse.

use std::net::Ipv4Addr;

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Message, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, TcpPacket,
    TcpSeqNumber, UdpPacket,
};

pub const ETH_HDR_LEN: usize = 14;
pub const BROADCAST: [u8; 6] = [0xff; 6];
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// IEEE 802 local experimental ethertype: something no stack should act on.
pub const ETHERTYPE_EXPERIMENTAL: u16 = 0x88b5;

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

pub fn ip(a: Ipv4Addr) -> IpAddress {
    IpAddress::Ipv4(a)
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
    let mut buf = vec![0u8; 20 + payload.len()];
    {
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        p.set_version(4);
        p.set_header_len(20);
        p.set_dscp(0);
        p.set_ecn(0);
        p.set_total_len((20 + payload.len()) as u16);
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
    buf[20..].copy_from_slice(payload);
    buf
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

/// A TCP segment (with an MSS option of 1460 on SYN) and a correct checksum.
#[allow(clippy::too_many_arguments)]
pub fn tcp_segment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: Flags,
    window: u16,
    payload: &[u8],
) -> Vec<u8> {
    let opts: &[u8] = if flags.syn { &[2, 4, 0x05, 0xb4] } else { &[] };
    let hl = 20 + opts.len();
    let mut buf = vec![0u8; hl + payload.len()];
    buf[20..hl].copy_from_slice(opts);
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
    p.fill_checksum(&ip(src), &ip(dst));
    buf
}

/// A whole Ethernet frame carrying one TCP SYN.
#[allow(clippy::too_many_arguments)]
pub fn tcp_syn_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
) -> Vec<u8> {
    let seg = tcp_segment(src, dst, sport, dport, seq, 0, Flags::SYN, 64240, &[]);
    eth(
        dst_mac,
        src_mac,
        ETHERTYPE_IPV4,
        &ipv4_packet(src, dst, 6, 0x1234, &seg),
    )
}

/// A whole Ethernet frame carrying one UDP datagram.
#[allow(clippy::too_many_arguments)]
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut buf = vec![0u8; 8 + payload.len()];
    {
        let mut p = UdpPacket::new_unchecked(&mut buf[..]);
        p.set_src_port(sport);
        p.set_dst_port(dport);
        p.set_len((8 + payload.len()) as u16);
        p.payload_mut().copy_from_slice(payload);
        p.fill_checksum(&ip(src), &ip(dst));
    }
    eth(
        dst_mac,
        src_mac,
        ETHERTYPE_IPV4,
        &ipv4_packet(src, dst, 17, 0x4321, &buf),
    )
}

/// A whole Ethernet frame carrying one ICMP echo request.
#[allow(clippy::too_many_arguments)]
pub fn icmp_echo_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    let mut buf = vec![0u8; 8 + data.len()];
    {
        let mut p = Icmpv4Packet::new_unchecked(&mut buf[..]);
        p.set_msg_type(Icmpv4Message::EchoRequest);
        p.set_msg_code(0);
        p.set_echo_ident(ident);
        p.set_echo_seq_no(seq);
        p.data_mut().copy_from_slice(data);
        p.fill_checksum();
    }
    eth(
        dst_mac,
        src_mac,
        ETHERTYPE_IPV4,
        &ipv4_packet(src, dst, 1, 0x5555, &buf),
    )
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

/// The IPv4 packet of a frame: (src, dst, protocol, header checksum ok, L4 bytes).
pub fn parse_ipv4(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8, bool, Vec<u8>)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let p = Ipv4Packet::new_checked(eth.payload()).ok()?;
    Some((
        p.src_addr(),
        p.dst_addr(),
        u8::from(p.next_header()),
        p.verify_checksum(),
        p.payload().to_vec(),
    ))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpInfo {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: Flags,
    pub window: u16,
    pub payload: Vec<u8>,
    /// Both the IPv4 header and the TCP checksums verified.
    pub checksums_ok: bool,
}

pub fn parse_tcp(frame: &[u8]) -> Option<TcpInfo> {
    let (src, dst, proto, ip_ok, l4) = parse_ipv4(frame)?;
    if proto != 6 {
        return None;
    }
    let t = TcpPacket::new_checked(&l4[..]).ok()?;
    Some(TcpInfo {
        src,
        dst,
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
        checksums_ok: ip_ok && t.verify_checksum(&ip(src), &ip(dst)),
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpInfo {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    pub checksums_ok: bool,
}

pub fn parse_udp(frame: &[u8]) -> Option<UdpInfo> {
    let (src, dst, proto, ip_ok, l4) = parse_ipv4(frame)?;
    if proto != 17 {
        return None;
    }
    let u = UdpPacket::new_checked(&l4[..]).ok()?;
    Some(UdpInfo {
        src,
        dst,
        sport: u.src_port(),
        dport: u.dst_port(),
        payload: u.payload().to_vec(),
        checksums_ok: ip_ok && u.verify_checksum(&ip(src), &ip(dst)),
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpInfo {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub msg_type: u8,
    pub code: u8,
    /// Echo ident/seq (echo messages only).
    pub ident: u16,
    pub seq: u16,
    /// For errors (dest unreachable...): the quoted packet's dst and L4 ports if present.
    pub quoted: Option<(Ipv4Addr, u8, u16, u16)>,
    pub checksums_ok: bool,
}

pub fn parse_icmp(frame: &[u8]) -> Option<IcmpInfo> {
    let (src, dst, proto, ip_ok, l4) = parse_ipv4(frame)?;
    if proto != 1 {
        return None;
    }
    let p = Icmpv4Packet::new_checked(&l4[..]).ok()?;
    let msg_type = u8::from(p.msg_type());
    let echo = msg_type == 0 || msg_type == 8;
    // ICMP errors quote the IP header and the first 8 bytes of the offending packet; the
    // quote is truncated, so its total length field cannot be checked against the buffer.
    let quoted = if !echo {
        let q = p.data();
        if q.len() >= 20 && q[0] >> 4 == 4 {
            let ihl = ((q[0] & 0x0f) as usize) * 4;
            let dst = Ipv4Addr::new(q[16], q[17], q[18], q[19]);
            let (sp, dp) = match q.get(ihl..ihl + 4) {
                Some(b) => (
                    u16::from_be_bytes([b[0], b[1]]),
                    u16::from_be_bytes([b[2], b[3]]),
                ),
                None => (0, 0),
            };
            Some((dst, q[9], sp, dp))
        } else {
            None
        }
    } else {
        None
    };
    Some(IcmpInfo {
        src,
        dst,
        msg_type,
        code: p.msg_code(),
        ident: if echo { p.echo_ident() } else { 0 },
        seq: if echo { p.echo_seq_no() } else { 0 },
        quoted,
        checksums_ok: ip_ok && p.verify_checksum(),
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
            "TCP {}:{} -> {}:{} {:?} seq={} ack={} win={} len={}",
            t.src,
            t.sport,
            t.dst,
            t.dport,
            t.flags,
            t.seq,
            t.ack,
            t.window,
            t.payload.len()
        );
    }
    if let Some(u) = parse_udp(frame) {
        return format!(
            "UDP {}:{} -> {}:{} len={}",
            u.src,
            u.sport,
            u.dst,
            u.dport,
            u.payload.len()
        );
    }
    if let Some(i) = parse_icmp(frame) {
        return format!(
            "ICMP {} -> {} type={} code={}",
            i.src, i.dst, i.msg_type, i.code
        );
    }
    if let Some(s) = super::frames6::describe6(frame) {
        return s;
    }
    format!("{} bytes ethertype={:04x?}", frame.len(), ethertype(frame))
}
