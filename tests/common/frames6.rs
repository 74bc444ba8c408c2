//! What only IPv6 frames have, beside the family-generic builders and parsers of
//! [`super::frames`] (IP, TCP, UDP, ICMP and ICMPv6 echo and errors): IPv6 headers with a
//! chosen hop limit, fragment headers, multicast and link-local addresses, and neighbor
//! discovery: builders for router and neighbor solicitations, neighbor advertisements and any
//! ICMPv6 message, parsers for router advertisements (every option, RDNSS included), neighbor
//! advertisements and solicitations.
//!
//! Everything goes through `smoltcp::wire` where it has a type (Ipv6Packet, Icmpv6Repr,
//! NdiscRepr, NdiscOption); the RDNSS option (RFC 8106, type 25), which smoltcp does not know,
//! is read by hand. Builders always fill checksums; parsers always verify them and report the
//! result (`checksum_ok`) instead of hiding bad packets, so a test can say "the reply had a bad
//! checksum" rather than "no reply".

use std::net::Ipv6Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, Icmpv6Message, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet,
    NdiscNeighborFlags, NdiscOption, NdiscOptionRepr, NdiscPrefixInfoFlags, NdiscRepr,
    NdiscRouterFlags, RawHardwareAddress,
};

use super::frames::{eth, parse_icmp, parse_ip, IcmpInfo, IpInfo, ETHERTYPE_IPV6};

pub const IPV6_HDR_LEN: usize = 40;

/// IPv6 next-header values used by the tests.
pub const NH_HOP_BY_HOP: u8 = 0;
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

/// The source link-layer address option of a solicitation from `src` at `mac`: none when
/// `src` is unspecified (RFC 4861 4.1 and 4.3 forbid it then).
fn slla(mac: [u8; 6], src: Ipv6Addr) -> Option<RawHardwareAddress> {
    (!src.is_unspecified()).then(|| RawHardwareAddress::from(EthernetAddress(mac)))
}

/// A router solicitation from `src` (a link-local address, or `::`) to ff02::2, hop limit 255.
/// It carries a source link-layer address option unless `src` is unspecified (RFC 4861 4.1
/// forbids it then).
pub fn router_solicit_frame(src_mac: [u8; 6], src: Ipv6Addr) -> Vec<u8> {
    icmpv6_frame(
        src_mac,
        multicast_mac(ALL_ROUTERS),
        src,
        ALL_ROUTERS,
        255,
        &Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit {
            lladdr: slla(src_mac, src),
        }),
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
    icmpv6_frame(
        src_mac,
        dst_mac,
        src,
        dst,
        255,
        &Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: target,
            lladdr: slla(src_mac, src),
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
pub type Ipv6Info = IpInfo<Ipv6Addr>;

/// The IPv6 packet of a frame; `None` for other ethertypes and for packets whose payload
/// length does not fit the frame.
pub fn parse_ipv6(frame: &[u8]) -> Option<Ipv6Info> {
    parse_ip(frame)?.v6()
}

/// An ICMPv6 echo reply (type 129) of a frame.
pub fn parse_echo_reply6(frame: &[u8]) -> Option<IcmpInfo> {
    parse_icmp(frame).filter(|i| i.ip.src.is_ipv6() && i.msg_type == ICMPV6_ECHO_REPLY)
}

/// An ICMPv6 destination unreachable (type 1) of a frame.
pub fn parse_unreachable6(frame: &[u8]) -> Option<IcmpInfo> {
    parse_icmp(frame).filter(|i| i.ip.src.is_ipv6() && i.msg_type == ICMPV6_DST_UNREACHABLE)
}

/// The IPv6 packet of a frame that carries an ICMPv6 message of type `ty`, and whether the
/// message's checksum verified.
fn icmpv6_of_type(frame: &[u8], ty: Icmpv6Message) -> Option<(Ipv6Info, bool)> {
    let ip = parse_ipv6(frame)?;
    if ip.proto != NH_ICMPV6 {
        return None;
    }
    let p = Icmpv6Packet::new_checked(&ip.payload[..]).ok()?;
    if p.msg_type() != ty {
        return None;
    }
    let verified = p.verify_checksum(&ip.src, &ip.dst);
    Some((ip, verified))
}

/// The NDP message of an ICMPv6 packet, parsed by smoltcp without its checksum check (so that
/// a bad checksum is reported rather than hidden).
fn ndisc_of(ip: &Ipv6Info) -> Option<NdiscRepr<'_>> {
    let p = Icmpv6Packet::new_checked(&ip.payload[..]).ok()?;
    match Icmpv6Repr::parse(&ip.src, &ip.dst, &p, &ChecksumCapabilities::ignored()).ok()? {
        Icmpv6Repr::Ndisc(r) => Some(r),
        _ => None,
    }
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
    let (ip, verified) = icmpv6_of_type(frame, Icmpv6Message::RouterAdvert)?;
    let checksum_ok = verified && ndisc_of(&ip).is_some();
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
    let (ip, verified) = icmpv6_of_type(frame, Icmpv6Message::NeighborAdvert)?;
    let NdiscRepr::NeighborAdvert {
        flags,
        target_addr,
        lladdr,
    } = ndisc_of(&ip)?
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
    let (ip, verified) = icmpv6_of_type(frame, Icmpv6Message::NeighborSolicit)?;
    let NdiscRepr::NeighborSolicit {
        target_addr,
        lladdr,
    } = ndisc_of(&ip)?
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
