//! Raw IPv6 Ethernet frames: builders for single well-formed packets (TCP SYN, UDP, ICMPv6
//! echo, router and neighbor solicitations, any ICMPv6 message) and parsers for what netfence
//! sends back (router and neighbor advertisements, echo replies, ICMPv6 errors with the quoted
//! packet, TCP and UDP). The IPv6 twin of [`super::frames`].
//!
//! Everything goes through `smoltcp::wire` where it has a type (Ipv6Packet, Icmpv6Repr,
//! NdiscRepr, NdiscOption, TcpPacket, UdpPacket); the RDNSS option (RFC 8106, type 25), which
//! smoltcp does not know, is read by hand. Builders always fill checksums; parsers always verify
//! them and report the result (`checksums_ok`) instead of hiding bad packets, so a test can
//! say "the reply had a bad checksum" rather than "no reply".

use std::net::Ipv6Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, Icmpv6Message, Icmpv6Packet, Icmpv6Repr,
    IpAddress, IpProtocol, Ipv6Packet, NdiscNeighborFlags, NdiscOption, NdiscOptionRepr,
    NdiscPrefixInfoFlags, NdiscRepr, NdiscRouterFlags, RawHardwareAddress, TcpPacket, TcpSeqNumber,
    UdpPacket,
};

use super::frames::{eth, Flags};

pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const IPV6_HDR_LEN: usize = 40;

/// IPv6 next-header values used by the tests.
pub const NH_HOP_BY_HOP: u8 = 0;
pub const NH_TCP: u8 = 6;
pub const NH_UDP: u8 = 17;
pub const NH_FRAGMENT: u8 = 44;
pub const NH_ICMPV6: u8 = 58;
pub const NH_NO_NEXT: u8 = 59;
/// RFC 3692 experimental next header: nothing should act on it.
pub const NH_EXPERIMENTAL: u8 = 253;

/// ICMPv6 message types.
pub const ICMPV6_DST_UNREACHABLE: u8 = 1;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub const ICMPV6_ROUTER_SOLICIT: u8 = 133;
pub const ICMPV6_ROUTER_ADVERT: u8 = 134;
pub const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
pub const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;
/// Destination unreachable code 1: communication administratively prohibited.
pub const ICMPV6_CODE_ADMIN_PROHIBITED: u8 = 1;

/// NDP option type of the Recursive DNS Server option (RFC 8106).
pub const NDP_OPT_RDNSS: u8 = 25;

/// ff02::1, all nodes.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// ff02::2, all routers.
pub const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

pub fn ip6(a: Ipv6Addr) -> IpAddress {
    IpAddress::Ipv6(a)
}

/// The Ethernet multicast address of an IPv6 multicast group (33:33 + its last 32 bits).
pub fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The solicited-node multicast group of `addr` (ff02::1:ffXX:XXXX).
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    let mut s = [0u8; 16];
    s[..2].copy_from_slice(&[0xff, 0x02]);
    s[11] = 0x01;
    s[12] = 0xff;
    s[13..].copy_from_slice(&o[13..]);
    Ipv6Addr::from(s)
}

/// The modified EUI-64 link-local address of a MAC (fe80::XXXX:XXff:feXX:XXXX, U/L bit
/// flipped), as a Linux guest would form it.
pub fn link_local_from_mac(mac: [u8; 6]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o[..2].copy_from_slice(&[0xfe, 0x80]);
    o[8] = mac[0] ^ 0x02;
    o[9] = mac[1];
    o[10] = mac[2];
    o[11] = 0xff;
    o[12] = 0xfe;
    o[13..].copy_from_slice(&mac[3..]);
    Ipv6Addr::from(o)
}

/// A 40-byte IPv6 header (traffic class and flow label 0) then `payload`. The payload length
/// field is the payload's length. IPv6 has no header checksum; upper layers carry theirs.
pub fn ipv6_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut buf = vec![0u8; IPV6_HDR_LEN + payload.len()];
    {
        let mut p = Ipv6Packet::new_unchecked(&mut buf[..]);
        p.set_version(6);
        p.set_traffic_class(0);
        p.set_flow_label(0);
        p.set_payload_len(payload.len() as u16);
        p.set_next_header(IpProtocol::from(next_header));
        p.set_hop_limit(hop_limit);
        p.set_src_addr(src);
        p.set_dst_addr(dst);
    }
    buf[IPV6_HDR_LEN..].copy_from_slice(payload);
    buf
}

/// Ethernet header (ethertype IPv6) + an IPv6 packet.
pub fn eth6(dst_mac: [u8; 6], src_mac: [u8; 6], ipv6: &[u8]) -> Vec<u8> {
    eth(dst_mac, src_mac, ETHERTYPE_IPV6, ipv6)
}

/// A TCP segment between IPv6 addresses (MSS option 1440 on SYN), checksum filled.
#[allow(clippy::too_many_arguments)]
pub fn tcp6_segment(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: Flags,
    window: u16,
    payload: &[u8],
) -> Vec<u8> {
    let opts: &[u8] = if flags.syn { &[2, 4, 0x05, 0xa0] } else { &[] };
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
    p.fill_checksum(&ip6(src), &ip6(dst));
    buf
}

/// A whole Ethernet frame carrying one TCP SYN over IPv6.
#[allow(clippy::too_many_arguments)]
pub fn tcp6_syn_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    seq: u32,
) -> Vec<u8> {
    let seg = tcp6_segment(src, dst, sport, dport, seq, 0, Flags::SYN, 64240, &[]);
    eth6(dst_mac, src_mac, &ipv6_packet(src, dst, NH_TCP, 64, &seg))
}

/// A UDP datagram between IPv6 addresses (checksum filled; it is mandatory over IPv6).
pub fn udp6_datagram(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut buf = vec![0u8; 8 + payload.len()];
    let mut p = UdpPacket::new_unchecked(&mut buf[..]);
    p.set_src_port(sport);
    p.set_dst_port(dport);
    p.set_len((8 + payload.len()) as u16);
    p.payload_mut().copy_from_slice(payload);
    p.fill_checksum(&ip6(src), &ip6(dst));
    buf
}

/// A whole Ethernet frame carrying one UDP datagram over IPv6.
#[allow(clippy::too_many_arguments)]
pub fn udp6_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let dgram = udp6_datagram(src, dst, sport, dport, payload);
    eth6(dst_mac, src_mac, &ipv6_packet(src, dst, NH_UDP, 64, &dgram))
}

/// The bytes of one ICMPv6 message (checksum over the pseudo-header of `src`, `dst`).
pub fn icmpv6_message(src: Ipv6Addr, dst: Ipv6Addr, repr: &Icmpv6Repr<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(
        &src,
        &dst,
        &mut Icmpv6Packet::new_unchecked(&mut buf[..]),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// A whole Ethernet frame carrying one ICMPv6 message with the given IPv6 hop limit.
pub fn icmpv6_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    repr: &Icmpv6Repr<'_>,
) -> Vec<u8> {
    let msg = icmpv6_message(src, dst, repr);
    eth6(
        dst_mac,
        src_mac,
        &ipv6_packet(src, dst, NH_ICMPV6, hop_limit, &msg),
    )
}

/// The ICMPv6 bytes of an echo request (checksum filled).
pub fn icmpv6_echo_request(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    icmpv6_message(
        src,
        dst,
        &Icmpv6Repr::EchoRequest {
            ident,
            seq_no: seq,
            data,
        },
    )
}

/// A whole Ethernet frame carrying one ICMPv6 echo request (hop limit 64).
#[allow(clippy::too_many_arguments)]
pub fn icmpv6_echo_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Vec<u8> {
    let msg = icmpv6_echo_request(src, dst, ident, seq, data);
    eth6(
        dst_mac,
        src_mac,
        &ipv6_packet(src, dst, NH_ICMPV6, 64, &msg),
    )
}

/// A router solicitation from `src` (a link-local address, or `::`) to ff02::2, hop limit 255.
/// It carries a source link-layer address option unless `src` is unspecified (RFC 4861 4.1
/// forbids it then).
pub fn router_solicit_frame(src_mac: [u8; 6], src: Ipv6Addr) -> Vec<u8> {
    let lladdr =
        (!src.is_unspecified()).then(|| RawHardwareAddress::from(EthernetAddress(src_mac)));
    icmpv6_frame(
        src_mac,
        multicast_mac(ALL_ROUTERS),
        src,
        ALL_ROUTERS,
        255,
        &Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr }),
    )
}

/// A neighbor solicitation for `target` from `src` (with a source link-layer address option
/// unless `src` is `::`), hop limit 255, to `target`'s solicited-node multicast group.
pub fn neighbor_solicit_frame(src_mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let group = solicited_node(target);
    neighbor_solicit_frame_to(src_mac, multicast_mac(group), src, group, target)
}

/// A neighbor solicitation for `target` sent to an explicit IPv6 and Ethernet destination
/// (e.g. unicast to the target, as neighbor unreachability detection does).
pub fn neighbor_solicit_frame_to(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
) -> Vec<u8> {
    let lladdr =
        (!src.is_unspecified()).then(|| RawHardwareAddress::from(EthernetAddress(src_mac)));
    icmpv6_frame(
        src_mac,
        dst_mac,
        src,
        dst,
        255,
        &Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: target,
            lladdr,
        }),
    )
}

/// An 8-byte fragment header: `offset` in 8-byte units, `more` = the M flag.
pub fn fragment_header(next_header: u8, offset: u16, more: bool, ident: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0] = next_header;
    let off = (offset << 3) | u16::from(more);
    h[2..4].copy_from_slice(&off.to_be_bytes());
    h[4..8].copy_from_slice(&ident.to_be_bytes());
    h
}

// ---- parsing -------------------------------------------------------------------------------

/// One IPv6 packet of a frame, with its Ethernet addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6Info {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next_header: u8,
    pub hop_limit: u8,
    /// Exactly `payload length` bytes (Ethernet padding cut off).
    pub payload: Vec<u8>,
}

/// The IPv6 packet of a frame; `None` for other ethertypes and for packets whose payload
/// length does not fit the frame.
pub fn parse_ipv6(frame: &[u8]) -> Option<Ipv6Info> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv6 {
        return None;
    }
    let p = Ipv6Packet::new_checked(eth.payload()).ok()?;
    if p.version() != 6 {
        return None;
    }
    Some(Ipv6Info {
        eth_src: eth.src_addr().0,
        eth_dst: eth.dst_addr().0,
        src: p.src_addr(),
        dst: p.dst_addr(),
        next_header: u8::from(p.next_header()),
        hop_limit: p.hop_limit(),
        payload: p.payload().to_vec(),
    })
}

/// The start of the packet an ICMPv6 error quotes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quoted6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next_header: u8,
    /// What follows the quoted IPv6 header (possibly truncated).
    pub l4: Vec<u8>,
}

impl Quoted6 {
    /// TCP/UDP ports of the quoted packet (or ICMPv6 type/code + checksum, read the same way).
    pub fn ports(&self) -> Option<(u16, u16)> {
        let b = self.l4.get(..4)?;
        Some((
            u16::from_be_bytes([b[0], b[1]]),
            u16::from_be_bytes([b[2], b[3]]),
        ))
    }

    /// The echo identifier of a quoted ICMPv6 echo request.
    pub fn echo_ident(&self) -> Option<u16> {
        let b = self.l4.get(4..6)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Any ICMPv6 message of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmpv6Info {
    pub ip: Ipv6Info,
    pub msg_type: u8,
    pub code: u8,
    /// Echo request/reply only.
    pub ident: u16,
    pub seq: u16,
    /// Echo data (echo messages only).
    pub data: Vec<u8>,
    /// Error messages (types 1-4): the offending packet's header.
    pub quoted: Option<Quoted6>,
    pub checksum_ok: bool,
}

pub fn parse_icmpv6(frame: &[u8]) -> Option<Icmpv6Info> {
    let ip = parse_ipv6(frame)?;
    if ip.next_header != NH_ICMPV6 {
        return None;
    }
    let p = Icmpv6Packet::new_checked(&ip.payload[..]).ok()?;
    let msg_type = u8::from(p.msg_type());
    let echo = msg_type == ICMPV6_ECHO_REQUEST || msg_type == ICMPV6_ECHO_REPLY;
    let checksum_ok = p.verify_checksum(&ip.src, &ip.dst);
    // Errors: 4 bytes of type-specific data, then as much of the packet as fits.
    let quoted = if (1..=4).contains(&msg_type) {
        ip.payload.get(8..).and_then(|q| {
            let h = Ipv6Packet::new_unchecked(q);
            (q.len() >= IPV6_HDR_LEN && h.version() == 6).then(|| Quoted6 {
                src: h.src_addr(),
                dst: h.dst_addr(),
                next_header: u8::from(h.next_header()),
                l4: q[IPV6_HDR_LEN..].to_vec(),
            })
        })
    } else {
        None
    };
    Some(Icmpv6Info {
        msg_type,
        code: p.msg_code(),
        ident: if echo { p.echo_ident() } else { 0 },
        seq: if echo { p.echo_seq_no() } else { 0 },
        data: if echo {
            p.payload().to_vec()
        } else {
            Vec::new()
        },
        quoted,
        checksum_ok,
        ip,
    })
}

/// An echo reply (type 129) of a frame.
pub fn parse_echo_reply6(frame: &[u8]) -> Option<Icmpv6Info> {
    parse_icmpv6(frame).filter(|i| i.msg_type == ICMPV6_ECHO_REPLY)
}

/// A destination unreachable (type 1) of a frame.
pub fn parse_unreachable6(frame: &[u8]) -> Option<Icmpv6Info> {
    parse_icmpv6(frame).filter(|i| i.msg_type == ICMPV6_DST_UNREACHABLE)
}

/// A prefix information option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixInfo {
    pub prefix: Ipv6Addr,
    pub prefix_len: u8,
    pub on_link: bool,
    pub autonomous: bool,
    pub valid_lifetime_secs: u64,
    pub preferred_lifetime_secs: u64,
}

/// A recursive DNS server option (RFC 8106).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rdnss {
    pub lifetime_secs: u32,
    pub servers: Vec<Ipv6Addr>,
}

/// A router advertisement, every option kept (smoltcp's NdiscRepr keeps only the last prefix
/// and drops options it does not know, such as RDNSS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterAdvert {
    pub ip: Ipv6Info,
    /// The RA's "cur hop limit" field (what hosts should use; 0 = unspecified).
    pub cur_hop_limit: u8,
    pub managed: bool,
    pub other: bool,
    pub router_lifetime_secs: u64,
    pub reachable_time_ms: u64,
    pub retrans_time_ms: u64,
    /// Source link-layer address option.
    pub slla: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub prefixes: Vec<PrefixInfo>,
    pub rdnss: Vec<Rdnss>,
    /// (type, length in bytes) of every option, in order.
    pub options: Vec<(u8, usize)>,
    /// ICMPv6 checksum verified and smoltcp's NdiscRepr parse succeeded.
    pub checksum_ok: bool,
}

/// The options area of an NDP message, split into whole options; `None` if an option has
/// length 0 or runs past the end (RFC 4861 says to drop such a message).
pub fn ndp_options(mut opts: &[u8]) -> Option<Vec<&[u8]>> {
    let mut v = Vec::new();
    while !opts.is_empty() {
        let len = *opts.get(1)? as usize * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        v.push(&opts[..len]);
        opts = &opts[len..];
    }
    Some(v)
}

fn mac_of(raw: RawHardwareAddress) -> Option<[u8; 6]> {
    raw.as_bytes().try_into().ok()
}

pub fn parse_router_advert(frame: &[u8]) -> Option<RouterAdvert> {
    let ip = parse_ipv6(frame)?;
    if ip.next_header != NH_ICMPV6 {
        return None;
    }
    let p = Icmpv6Packet::new_checked(&ip.payload[..]).ok()?;
    if p.msg_type() != Icmpv6Message::RouterAdvert {
        return None;
    }
    let repr = Icmpv6Repr::parse(&ip.src, &ip.dst, &p, &ChecksumCapabilities::default());
    let checksum_ok = p.verify_checksum(&ip.src, &ip.dst) && repr.is_ok();
    // The fixed part: type, code, checksum, cur hop limit, flags, lifetime, reachable, retrans.
    let b = &ip.payload;
    if b.len() < 16 {
        return None;
    }
    let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let flags = NdiscRouterFlags::from_bits_truncate(b[5]);
    let mut ra = RouterAdvert {
        cur_hop_limit: b[4],
        managed: flags.contains(NdiscRouterFlags::MANAGED),
        other: flags.contains(NdiscRouterFlags::OTHER),
        router_lifetime_secs: u16::from_be_bytes([b[6], b[7]]) as u64,
        reachable_time_ms: be32(8) as u64,
        retrans_time_ms: be32(12) as u64,
        slla: None,
        mtu: None,
        prefixes: Vec::new(),
        rdnss: Vec::new(),
        options: Vec::new(),
        checksum_ok,
        ip: ip.clone(),
    };
    for opt in ndp_options(&ip.payload[16..])? {
        ra.options.push((opt[0], opt.len()));
        if opt[0] == NDP_OPT_RDNSS {
            // type, length, reserved (2), lifetime (4), then addresses.
            if opt.len() >= 24 {
                let lifetime = u32::from_be_bytes([opt[4], opt[5], opt[6], opt[7]]);
                let servers = opt[8..]
                    .chunks_exact(16)
                    .map(|c| Ipv6Addr::from(<[u8; 16]>::try_from(c).unwrap()))
                    .collect();
                ra.rdnss.push(Rdnss {
                    lifetime_secs: lifetime,
                    servers,
                });
            }
            continue;
        }
        let Ok(o) = NdiscOption::new_checked(opt) else {
            continue;
        };
        match NdiscOptionRepr::parse(&o) {
            Ok(NdiscOptionRepr::SourceLinkLayerAddr(a)) => ra.slla = mac_of(a),
            Ok(NdiscOptionRepr::Mtu(m)) => ra.mtu = Some(m),
            Ok(NdiscOptionRepr::PrefixInformation(pi)) => ra.prefixes.push(PrefixInfo {
                prefix: pi.prefix,
                prefix_len: pi.prefix_len,
                on_link: pi.flags.contains(NdiscPrefixInfoFlags::ON_LINK),
                autonomous: pi.flags.contains(NdiscPrefixInfoFlags::ADDRCONF),
                valid_lifetime_secs: pi.valid_lifetime.secs(),
                preferred_lifetime_secs: pi.preferred_lifetime.secs(),
            }),
            _ => {}
        }
    }
    Some(ra)
}

/// A neighbor advertisement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighborAdvert {
    pub ip: Ipv6Info,
    pub router: bool,
    pub solicited: bool,
    pub override_: bool,
    pub target: Ipv6Addr,
    /// Target link-layer address option.
    pub tlla: Option<[u8; 6]>,
    /// ICMPv6 checksum verified and smoltcp's NdiscRepr parse succeeded.
    pub checksum_ok: bool,
}

pub fn parse_neighbor_advert(frame: &[u8]) -> Option<NeighborAdvert> {
    let ip = parse_ipv6(frame)?;
    if ip.next_header != NH_ICMPV6 {
        return None;
    }
    let p = Icmpv6Packet::new_checked(&ip.payload[..]).ok()?;
    if p.msg_type() != Icmpv6Message::NeighborAdvert {
        return None;
    }
    let verified = p.verify_checksum(&ip.src, &ip.dst);
    // Parse without the checksum check so that a bad one is reported rather than hidden.
    let repr = Icmpv6Repr::parse(&ip.src, &ip.dst, &p, &ChecksumCapabilities::ignored()).ok()?;
    let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
        flags,
        target_addr,
        lladdr,
    }) = repr
    else {
        return None;
    };
    Some(NeighborAdvert {
        router: flags.contains(NdiscNeighborFlags::ROUTER),
        solicited: flags.contains(NdiscNeighborFlags::SOLICITED),
        override_: flags.contains(NdiscNeighborFlags::OVERRIDE),
        target: target_addr,
        tlla: lladdr.and_then(mac_of),
        checksum_ok: verified,
        ip,
    })
}

/// A neighbor solicitation (what netfence sends to resolve or confirm the guest's address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighborSolicit {
    pub ip: Ipv6Info,
    pub target: Ipv6Addr,
    /// Source link-layer address option.
    pub slla: Option<[u8; 6]>,
    pub checksum_ok: bool,
}

pub fn parse_neighbor_solicit(frame: &[u8]) -> Option<NeighborSolicit> {
    let ip = parse_ipv6(frame)?;
    if ip.next_header != NH_ICMPV6 {
        return None;
    }
    let p = Icmpv6Packet::new_checked(&ip.payload[..]).ok()?;
    if p.msg_type() != Icmpv6Message::NeighborSolicit {
        return None;
    }
    let verified = p.verify_checksum(&ip.src, &ip.dst);
    let repr = Icmpv6Repr::parse(&ip.src, &ip.dst, &p, &ChecksumCapabilities::ignored()).ok()?;
    let Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr,
        lladdr,
    }) = repr
    else {
        return None;
    };
    Some(NeighborSolicit {
        target: target_addr,
        slla: lladdr.and_then(mac_of),
        checksum_ok: verified,
        ip,
    })
}

/// The neighbor advertisement a host with `mac` sends for its own address `target` in
/// answer to a solicitation from `to` (`::` for duplicate address detection: then to ff02::1,
/// not solicited) at `to_mac`.
pub fn neighbor_advert_frame(
    mac: [u8; 6],
    to_mac: [u8; 6],
    target: Ipv6Addr,
    to: Ipv6Addr,
) -> Vec<u8> {
    let (dst, dst_mac, flags) = if to.is_unspecified() {
        (
            ALL_NODES,
            multicast_mac(ALL_NODES),
            NdiscNeighborFlags::OVERRIDE,
        )
    } else {
        (
            to,
            to_mac,
            NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE,
        )
    };
    icmpv6_frame(
        mac,
        dst_mac,
        target,
        dst,
        255,
        &Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags,
            target_addr: target,
            lladdr: Some(RawHardwareAddress::from(EthernetAddress(mac))),
        }),
    )
}

/// A TCP segment over IPv6.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp6Info {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: Flags,
    pub window: u16,
    pub payload: Vec<u8>,
    pub checksum_ok: bool,
}

pub fn parse_tcp6(frame: &[u8]) -> Option<Tcp6Info> {
    let ip = parse_ipv6(frame)?;
    if ip.next_header != NH_TCP {
        return None;
    }
    let t = TcpPacket::new_checked(&ip.payload[..]).ok()?;
    Some(Tcp6Info {
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
        checksum_ok: t.verify_checksum(&ip6(ip.src), &ip6(ip.dst)),
    })
}

/// A UDP datagram over IPv6.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp6Info {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    pub checksum_ok: bool,
}

pub fn parse_udp6(frame: &[u8]) -> Option<Udp6Info> {
    let ip = parse_ipv6(frame)?;
    if ip.next_header != NH_UDP {
        return None;
    }
    let u = UdpPacket::new_checked(&ip.payload[..]).ok()?;
    Some(Udp6Info {
        src: ip.src,
        dst: ip.dst,
        sport: u.src_port(),
        dport: u.dst_port(),
        payload: u.payload().to_vec(),
        checksum_ok: u.verify_checksum(&ip6(ip.src), &ip6(ip.dst)),
    })
}

/// One line describing an IPv6 frame, for failure messages (`None` if not IPv6).
pub fn describe6(frame: &[u8]) -> Option<String> {
    if let Some(t) = parse_tcp6(frame) {
        return Some(format!(
            "TCP [{}]:{} -> [{}]:{} {:?} seq={} ack={} win={} len={}",
            t.src,
            t.sport,
            t.dst,
            t.dport,
            t.flags,
            t.seq,
            t.ack,
            t.window,
            t.payload.len()
        ));
    }
    if let Some(u) = parse_udp6(frame) {
        return Some(format!(
            "UDP [{}]:{} -> [{}]:{} len={}",
            u.src,
            u.sport,
            u.dst,
            u.dport,
            u.payload.len()
        ));
    }
    if let Some(i) = parse_icmpv6(frame) {
        return Some(format!(
            "ICMPv6 {} -> {} type={} code={} hop_limit={}",
            i.ip.src, i.ip.dst, i.msg_type, i.code, i.ip.hop_limit
        ));
    }
    parse_ipv6(frame).map(|ip| {
        format!(
            "IPv6 {} -> {} next_header={} len={}",
            ip.src,
            ip.dst,
            ip.next_header,
            ip.payload.len()
        )
    })
}
