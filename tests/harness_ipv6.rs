//! IPv6 through netfence, as a dual-stack guest sees it (slot 0, default ipv6_pool
//! fd42:6d73:62::/48): router solicitation and advertisement (SLLA, MTU, prefix, RDNSS),
//! neighbor discovery for the gateway's two addresses and for nothing else, ping of the
//! gateway, TCP, UDP and ICMPv6 echo to mapped documentation addresses (2001:db8::/32 sent to
//! servers on [::1]), the policy on private and IPv4-mapped destinations, and malformed IPv6
//! packets.
//!
//! Written ahead of the IPv6 datapath (test-driven): on a netfence that drops IPv6 these fail.
//! The guest side is smoltcp with a static address (`guest_up6`: GUEST6/64, its EUI-64
//! link-local address, default route via fe80::1); protocol details are checked on hand-built
//! frames parsed with `common::frames` (either family) and `common::frames6` (neighbor
//! discovery); the denied-destination steps are shared with IPv4 (`common::denied`). "No
//! answer" is watched for [`SILENCE`]; everything else waits on events with a deadline. Every destination that must not be reached is mapped
//! to a loopback tripwire, so a wrongly allowed flow is counted there and never leaves the host.

mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::time::Duration;

use common::frames::{self, parse_icmp, parse_tcp};
use common::frames6::{self, parse_neighbor_advert, parse_router_advert};
use common::process::{field, DecisionLine};
use common::*;
use smoltcp::socket::tcp::State;
use smoltcp::wire::{IpAddress, IpEndpoint};

/// Router lifetime the spec gives netfence's router advertisements.
const ROUTER_LIFETIME_SECS: u64 = 1800;

/// Mapped "public" addresses of the UDP and ICMPv6 tests (PUBLIC6, 2001:db8::7, is TCP's).
const PUBLIC6_UDP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 8);
const PUBLIC6_PING: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);

/// A dual-stack guest and the gateway MAC.
fn guest6(nf: &Netfence) -> (Guest, [u8; 6]) {
    let mut g = guest_up6(nf);
    let gw = gateway_mac(&mut g);
    (g, gw)
}

fn is_gateway6(a: impl Into<IpAddr>) -> bool {
    let a = a.into();
    a == GATEWAY6 || a == GATEWAY6_LL
}

/// The address of a decision's `dst` (`[v6]:port`, `v4:port`, or a bare address).
fn decision_ip(d: &DecisionLine) -> Option<IpAddr> {
    if let Ok(sa) = d.dst.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    d.dst
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

fn decision_port(d: &DecisionLine) -> Option<u16> {
    d.dst.parse::<SocketAddr>().ok().map(|s| s.port())
}

/// Waits for a decision whose destination is `ip` (compared canonically, so `::ffff:a.b.c.d`
/// and `a.b.c.d` are the same) and, if given, `port`.
fn decision_to(nf: &Netfence, ip: IpAddr, port: Option<u16>) -> Option<DecisionLine> {
    nf.wait_for_decision_where(SHORT, |d| {
        decision_ip(d).map(|a| a.to_canonical()) == Some(ip.to_canonical())
            && port.is_none_or(|p| decision_port(d) == Some(p))
    })
}

fn proto_of(d: &DecisionLine) -> String {
    field(&d.line, "proto").unwrap_or_default()
}

// ---- router and neighbor discovery -------------------------------------------------------

/// Sends `rs` and waits for a router advertisement to `to`; on timeout the message lists the
/// advertisements that did arrive (e.g. one sent to another address).
fn solicit_advert(g: &mut Guest, rs: &[u8], to: Ipv6Addr) -> frames6::RouterAdvert {
    let mut others = Vec::new();
    let f = g.raw_exchange(rs, deadline(SHORT), |f| match parse_router_advert(f) {
        Some(ra) if ra.ip.dst == to => true,
        Some(ra) => {
            others.push(ra);
            false
        }
        None => false,
    });
    match f {
        Some(f) => parse_router_advert(&f).unwrap(),
        None => panic!(
            "no router advertisement to {to} within {SHORT:?}; advertisements seen: {others:#?}"
        ),
    }
}

#[test]
fn router_solicitation_gets_router_advertisement() {
    let nf = Netfence::spawn(&["--mtu", "1400"]);
    let (mut g, gw) = guest6(&nf);
    let ll = g.link_local6();
    let rs = frames6::router_solicit_frame(g.mac, ll);
    let ra = solicit_advert(&mut g, &rs, ll);
    eprintln!("router advertisement: {ra:#?}");
    assert!(ra.checksum_ok, "RA with a bad ICMPv6 checksum: {ra:?}");
    assert_eq!(ra.ip.src, GATEWAY6_LL, "RA must come from fe80::1");
    assert_eq!(ra.ip.hop_limit, 255, "RA hop limit (RFC 4861 drops others)");
    assert_eq!(ra.ip.eth_src, gw, "RA from another MAC than the gateway's");
    assert_eq!(
        ra.ip.eth_dst, g.mac,
        "RA to a unicast source goes to its MAC"
    );
    assert_eq!(
        ra.router_lifetime_secs, ROUTER_LIFETIME_SECS,
        "router lifetime (0 would mean: not a default router)"
    );
    assert_eq!(
        ra.slla,
        Some(gw),
        "source link-layer address option must be the gateway MAC"
    );
    let mtu = g.fe().mtu() as u32;
    assert_eq!(
        mtu, 1400,
        "the frontend's MTU is the one netfence was given"
    );
    assert_eq!(ra.mtu, Some(mtu), "MTU option must be the link MTU");
    let p = ra
        .prefixes
        .iter()
        .find(|p| p.prefix == PREFIX6)
        .unwrap_or_else(|| panic!("no prefix information for {PREFIX6}/64: {:?}", ra.prefixes));
    assert_eq!(p.prefix_len, PREFIX6_LEN, "{p:?}");
    assert!(p.on_link, "prefix without the on-link (L) flag: {p:?}");
    assert!(
        p.autonomous,
        "prefix without the autonomous (A) flag: {p:?}"
    );
    assert!(p.valid_lifetime_secs > 0, "{p:?}");
    assert!(
        p.preferred_lifetime_secs > 0 && p.preferred_lifetime_secs <= p.valid_lifetime_secs,
        "preferred lifetime must be positive and at most the valid lifetime: {p:?}"
    );
    assert_eq!(
        ra.prefixes.len(),
        1,
        "only the slot's prefix: {:?}",
        ra.prefixes
    );
    let dns = ra
        .rdnss
        .iter()
        .find(|r| r.servers.contains(&GATEWAY6))
        .unwrap_or_else(|| {
            panic!(
                "no RDNSS option listing {GATEWAY6}: {:?} (options {:?})",
                ra.rdnss, ra.options
            )
        });
    assert!(
        dns.lifetime_secs > 0,
        "RDNSS lifetime 0 means: do not use: {dns:?}"
    );
}

#[test]
fn router_solicitation_from_unspecified_gets_multicast_advertisement() {
    let nf = Netfence::spawn::<&str>(&[]);
    let (mut g, gw) = guest6(&nf);
    let rs = frames6::router_solicit_frame(g.mac, Ipv6Addr::UNSPECIFIED);
    let ra = solicit_advert(&mut g, &rs, frames6::ALL_NODES);
    assert!(ra.checksum_ok, "{ra:?}");
    assert_eq!(ra.ip.src, GATEWAY6_LL);
    assert_eq!(ra.ip.hop_limit, 255);
    assert_eq!(ra.ip.eth_src, gw);
    assert_eq!(
        ra.ip.eth_dst,
        frames6::multicast_mac(frames6::ALL_NODES),
        "an RA to ff02::1 goes to 33:33:00:00:00:01"
    );
    assert!(ra.router_lifetime_secs > 0);
    assert_eq!(ra.slla, Some(gw));
    assert!(ra
        .prefixes
        .iter()
        .any(|p| p.prefix == PREFIX6 && p.autonomous));
}

/// Sends an NS and returns the NA for `target` (None after `wait`).
fn solicit_neighbor(
    g: &mut Guest,
    ns: &[u8],
    target: Ipv6Addr,
    wait: Duration,
) -> Option<frames6::NeighborAdvert> {
    let f = g.raw_exchange(ns, deadline(wait), |f| {
        parse_neighbor_advert(f)
            .map(|na| na.target == target)
            .unwrap_or(false)
    })?;
    parse_neighbor_advert(&f)
}

fn check_gateway_na(na: &frames6::NeighborAdvert, gw: [u8; 6], me: [u8; 6], to: Ipv6Addr) {
    assert!(na.checksum_ok, "NA with a bad checksum: {na:?}");
    assert_eq!(na.tlla, Some(gw), "NA must carry the gateway MAC: {na:?}");
    assert_eq!(na.ip.eth_src, gw, "{na:?}");
    assert_eq!(na.ip.eth_dst, me, "{na:?}");
    assert_eq!(
        na.ip.dst, to,
        "NA must go to the soliciting address: {na:?}"
    );
    assert!(
        is_gateway6(na.ip.src),
        "NA from an address that is not the gateway's: {na:?}"
    );
    assert_eq!(na.ip.hop_limit, 255, "{na:?}");
    assert!(
        na.solicited,
        "answer to a solicitation without the S flag: {na:?}"
    );
    // A host that sees R=0 from its default router removes it from its router list
    // (RFC 4861 7.2.5); Linux drops the default route.
    assert!(na.router, "the gateway is a router (R flag): {na:?}");
}

#[test]
fn neighbor_solicitation_for_gateway_addresses_answered() {
    let nf = Netfence::spawn::<&str>(&[]);
    let (mut g, gw) = guest6(&nf);
    let ll = g.link_local6();
    for (src, target) in [(ll, GATEWAY6_LL), (ll, GATEWAY6), (GUEST6, GATEWAY6)] {
        let ns = frames6::neighbor_solicit_frame(g.mac, src, target);
        let na = solicit_neighbor(&mut g, &ns, target, SHORT)
            .unwrap_or_else(|| panic!("no neighbor advertisement for {target} (asked from {src})"));
        check_gateway_na(&na, gw, g.mac, src);
    }
}

/// Neighbor unreachability detection (RFC 4861 7.3.3): a Linux guest confirms its router with
/// NS sent unicast to the router's address and MAC; unanswered, it declares the router dead.
/// (Beyond the written spec, which names the solicited-node group only.)
#[test]
fn unicast_neighbor_solicitation_for_gateway_answered() {
    let nf = Netfence::spawn::<&str>(&[]);
    let (mut g, gw) = guest6(&nf);
    let ll = g.link_local6();
    for target in [GATEWAY6_LL, GATEWAY6] {
        let ns = frames6::neighbor_solicit_frame_to(g.mac, gw, ll, target, target);
        let na = solicit_neighbor(&mut g, &ns, target, SHORT)
            .unwrap_or_else(|| panic!("no answer to a unicast NS for {target}"));
        check_gateway_na(&na, gw, g.mac, ll);
    }
}

#[test]
fn neighbor_solicitation_for_other_addresses_unanswered() {
    let nf = Netfence::spawn::<&str>(&[]);
    let mut g = guest_up6(&nf);
    let ll = g.link_local6();
    let others = [
        // In the guest's prefix but nobody's.
        Ipv6Addr::new(0xfd42, 0x6d73, 0x62, 0, 0, 0, 0, 0x99),
        // Off-link: reached through the router, never claimed on the link.
        PUBLIC6,
    ];
    for target in others {
        g.dev
            .fe
            .send_frame(&frames6::neighbor_solicit_frame(g.mac, ll, target));
    }
    // Duplicate address detection for the guest's own address (from ::): an answer would make
    // the guest give its address up.
    g.dev.fe.send_frame(&frames6::neighbor_solicit_frame(
        g.mac,
        Ipv6Addr::UNSPECIFIED,
        GUEST6,
    ));
    let claimed = g.raw_wait(deadline(SILENCE), |f| {
        parse_neighbor_advert(f)
            .map(|na| others.contains(&na.target) || na.target == GUEST6)
            .unwrap_or(false)
    });
    if let Some(f) = claimed {
        panic!(
            "netfence claimed an address it does not own: {:?}",
            parse_neighbor_advert(&f)
        );
    }
    // Control: the same kind of solicitation for the gateway is answered.
    let ns = frames6::neighbor_solicit_frame(g.mac, ll, GATEWAY6_LL);
    let na = solicit_neighbor(&mut g, &ns, GATEWAY6_LL, SHORT);
    assert!(
        na.is_some(),
        "no NA for fe80::1 either: is NDP answered at all?"
    );
}

#[test]
fn ping6_gateway_global_and_link_local() {
    let nf = Netfence::spawn::<&str>(&[]);
    let mut g = guest_up6(&nf);
    for dst in [GATEWAY6, GATEWAY6_LL, GATEWAY6] {
        let rtt = g
            .ping(dst, SHORT)
            .unwrap_or_else(|e| panic!("ping {dst}: {e}"));
        assert!(rtt < SHORT);
    }
    // And IPv4 still works beside it.
    g.ping(GATEWAY, SHORT)
        .unwrap_or_else(|e| panic!("ping {GATEWAY}: {e}"));
}

// ---- flows to mapped public addresses ----------------------------------------------------

#[test]
fn tcp6_to_mapped_address_both_ways_and_close() {
    let up = servers::pattern(300 * 1024, 61);
    let down = servers::pattern(300 * 1024, 62);
    let down_srv = down.clone();
    // Full duplex: the server writes its body while it reads the guest's, then closes.
    let srv = servers::OneShotServer::start6(move |mut s| -> Result<Vec<u8>, String> {
        let mut w = s.try_clone().map_err(|e| format!("clone: {e}"))?;
        let writer = std::thread::spawn(move || {
            w.write_all(&down_srv)
                .and_then(|_| w.shutdown(Shutdown::Write))
                .map_err(|e| format!("server write: {e}"))
        });
        let got = servers::read_to_eof(&mut s)?;
        writer.join().map_err(|_| "server writer panicked")??;
        Ok(got)
    });
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("[{PUBLIC6}]:80=[::1]:{}", srv.port()),
    ]);
    let mut g = guest_up6(&nf);
    let h = g
        .tcp_connect(PUBLIC6, 80, SHORT)
        .unwrap_or_else(|e| panic!("connect [{PUBLIC6}]:80: {e:?}"));
    let got_down = g
        .tcp_transfer(h, &up, true, deadline(LONG))
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(m) = servers::mismatch(&got_down, &down) {
        panic!("host->guest bytes differ: {m}");
    }
    let got_up = srv
        .join_polling(&mut g, SHORT)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(m) = servers::mismatch(&got_up, &up) {
        panic!("guest->host bytes differ: {m}");
    }
    // Both FINs were exchanged: our side ends in TIME-WAIT (or CLOSED).
    let st = g.tcp_wait_state(h, &[State::TimeWait, State::Closed], deadline(SHORT));
    assert!(
        st.is_some(),
        "connection did not close: {}",
        g.tcp(h).state()
    );
    let d = nf
        .wait_for_decision(&format!("[{PUBLIC6}]:80"), SHORT)
        .expect("decision logged with dst [2001:db8::7]:80");
    assert_eq!(d.action, "allow", "{}", d.line);
    assert_eq!(proto_of(&d), "tcp", "{}", d.line);
}

#[test]
fn udp6_echo_via_mapped_address() {
    let echo = servers::UdpEchoServer::start6();
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("[{PUBLIC6_UDP}]:7=[::1]:{}", echo.port()),
    ]);
    let mut g = guest_up6(&nf);
    let h = g.udp_bind(40607);
    // Up to the largest unfragmented datagram at MTU 1500 (1500 - 40 - 8).
    for (i, len) in [1usize, 64, 512, 1000, 1452].into_iter().enumerate() {
        let msg = servers::pattern(len, 600 + i as u64);
        g.udp_send(h, PUBLIC6_UDP, 7, &msg);
        let (back, from) = g
            .udp_recv(h, deadline(SHORT))
            .unwrap_or_else(|| panic!("no UDP echo for a {len}-byte datagram"));
        assert_eq!(
            from,
            IpEndpoint::new(IpAddress::Ipv6(PUBLIC6_UDP), 7),
            "reply source must be the guest-visible address"
        );
        assert!(back == msg, "{len}-byte echo differs");
    }
    let d = nf
        .wait_for_decision(&format!("[{PUBLIC6_UDP}]:7"), SHORT)
        .expect("decision logged");
    assert_eq!(d.action, "allow", "{}", d.line);
    assert_eq!(proto_of(&d), "udp", "{}", d.line);
}

#[test]
fn icmpv6_echo_to_mapped_address_answered() {
    let nf = Netfence::spawn(&["--map".to_string(), format!("{PUBLIC6_PING}=::1")]);
    let mut g = guest_up6(&nf);
    for _ in 0..2 {
        g.ping(PUBLIC6_PING, SHORT)
            .unwrap_or_else(|e| panic!("ping {PUBLIC6_PING} (mapped to ::1): {e}"));
    }
    let d = decision_to(&nf, IpAddr::V6(PUBLIC6_PING), None).expect("ICMPv6 decision logged");
    assert_eq!(d.action, "allow", "{}", d.line);
    assert_eq!(proto_of(&d), "icmpv6", "{}", d.line);
}

/// The rule list of the ICMPv6 deny tests: ICMPv6 to public addresses denied by rule 1, the
/// rest of the public group allowed (so it is the rule, not a default, that denies).
fn icmpv6_deny_args(extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--net-rule",
        "deny@public:icmpv6",
        "--net-rule",
        "allow@public",
        // Mapped, so that even a wrongly allowed echo only reaches ::1.
        "--map",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("{PUBLIC6_PING}=::1"));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn icmpv6_echo_denied_by_rule_dropped_and_logged() {
    let nf = Netfence::spawn(&icmpv6_deny_args(&[]));
    let mut g = guest_up6(&nf);
    let r = g.ping(PUBLIC6_PING, SILENCE);
    assert!(r.is_err(), "a denied ICMPv6 echo was answered: {r:?}");
    let d = decision_to(&nf, IpAddr::V6(PUBLIC6_PING), None).expect("ICMPv6 deny logged");
    assert_eq!(d.action, "deny", "{}", d.line);
    assert_eq!(proto_of(&d), "icmpv6", "{}", d.line);
    assert!(
        d.reason.contains("rule 1"),
        "denied by something else than the icmpv6 rule: {}",
        d.line
    );
    // The gateway still answers.
    g.ping(GATEWAY6_LL, SHORT).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn icmpv6_echo_denied_with_reject_gets_admin_prohibited() {
    let nf = Netfence::spawn(&icmpv6_deny_args(&["--reject"]));
    let (mut g, gw) = guest6(&nf);
    let ping = frames::icmp_echo_frame(g.mac, gw, GUEST6, PUBLIC6_PING, 0x6161, 1, b"rejected?");
    let f = g
        .raw_exchange(&ping, deadline(SHORT), |f| {
            parse_icmp(f)
                .map(|i| {
                    i.msg_type == frames6::ICMPV6_DST_UNREACHABLE
                        || i.msg_type == frames6::ICMPV6_ECHO_REPLY
                })
                .unwrap_or(false)
        })
        .expect("no ICMPv6 answer to a rejected echo request");
    let u = parse_icmp(&f).unwrap();
    assert_eq!(
        (u.msg_type, u.code),
        (
            frames6::ICMPV6_DST_UNREACHABLE,
            frames6::ICMPV6_CODE_ADMIN_PROHIBITED
        ),
        "want destination unreachable / administratively prohibited: {u:?}"
    );
    assert!(u.checksums_ok, "{u:?}");
    assert_eq!(u.ip.dst, GUEST6, "{u:?}");
    assert_eq!(u.ip.eth_src, gw, "{u:?}");
    assert!(
        is_gateway6(u.ip.src),
        "unreachable should come from the gateway: {u:?}"
    );
    assert!(
        frames6::IPV6_HDR_LEN + u.ip.payload.len() <= 1280,
        "ICMPv6 errors must fit the minimum MTU (RFC 4443 2.4)"
    );
    let q = u
        .quoted
        .as_ref()
        .expect("the error quotes the echo request");
    assert_eq!(q.src, GUEST6, "{q:?}");
    assert_eq!(q.dst, PUBLIC6_PING, "{q:?}");
    assert_eq!(q.proto, frames6::NH_ICMPV6, "{q:?}");
    assert_eq!(q.echo_ident(), Some(0x6161), "{q:?}");
    let d = decision_to(&nf, IpAddr::V6(PUBLIC6_PING), None).expect("ICMPv6 deny logged");
    assert_eq!(d.action, "deny", "{}", d.line);
    assert_eq!(proto_of(&d), "icmpv6", "{}", d.line);
}

// ---- policy ------------------------------------------------------------------------------

/// netfence with PRIVATE6 mapped to an IPv6 tripwire.
fn netfence_with_tripwire6(extra: &[&str]) -> (Netfence, servers::Tripwire) {
    denied::netfence_with_tripwire(extra, IpAddr::V6(PRIVATE6))
}

#[test]
fn private_ipv6_destination_dropped_silently() {
    let (nf, trip) = netfence_with_tripwire6(&[]);
    let (mut g, gw) = guest6(&nf);
    let d = denied::denied_syn_dropped(&nf, &mut g, gw, GUEST6, PRIVATE6, 80);
    assert!(
        d.reason.contains("private"),
        "fc00::/7 is private: {}",
        d.line
    );
    g.ping(GATEWAY6_LL, SHORT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(trip.hits(), (0, 0), "a denied destination was connected to");
}

#[test]
fn private_ipv6_destination_rejected_with_rst() {
    let (nf, trip) = netfence_with_tripwire6(&["--reject"]);
    let (mut g, gw) = guest6(&nf);
    let rst = denied::denied_syn_rejected(&nf, &mut g, gw, GUEST6, PRIVATE6, 443);
    assert_eq!(rst.dst, GUEST6, "{rst:?}");
    assert_eq!(trip.hits(), (0, 0), "a denied destination was connected to");
}

/// `::ffff:a.b.c.d` is the IPv4 address a.b.c.d to the host's sockets, so the policy must
/// judge it as that: ::ffff:10.0.0.1 is private, ::ffff:127.0.0.1 is loopback; both denied.
#[test]
fn ipv4_mapped_ipv6_destinations_judged_as_ipv4() {
    let private4 = Ipv4Addr::new(10, 0, 0, 1);
    let loop4 = Ipv4Addr::LOCALHOST;
    let cases = [(private4, "private"), (loop4, "loopback")];
    // Both go to a tripwire. One map entry covers both spellings of an address (netfence
    // refuses a second one), and a host side in the entry's own family is the safe one.
    let trip4 = servers::Tripwire::start();
    let args = trip4.map_args(&[private4, loop4]);
    let nf = Netfence::spawn(&args);
    let (mut g, gw) = guest6(&nf);
    for (v4, group) in cases {
        let dst = v4.to_ipv6_mapped();
        let seen = denied::raw_syn(&mut g, gw, GUEST6, dst, 80, SILENCE);
        assert!(seen.is_empty(), "SYN to {dst} was answered: {seen:?}");
        let d = decision_to(&nf, IpAddr::V4(v4), Some(80))
            .unwrap_or_else(|| panic!("no decision logged for [{dst}]:80"));
        assert_eq!(d.action, "deny", "{}", d.line);
        assert!(
            d.reason.contains(group),
            "{dst} must be judged as {v4} ({group}): {}",
            d.line
        );
    }
    assert_eq!(
        trip4.hits(),
        (0, 0),
        "an IPv4-mapped destination was connected to"
    );
}

// ---- robustness --------------------------------------------------------------------------

/// Frames netfence may send on its own (neighbor discovery, MLD) rather than as an answer.
fn is_housekeeping(f: &[u8]) -> bool {
    if frames::parse_arp(f).is_some() {
        return true;
    }
    match parse_icmp(f) {
        Some(i) => i.ip.src.is_ipv6() && ((130..=137).contains(&i.msg_type) || i.msg_type == 143),
        None => false,
    }
}

/// Sends `bad` (unless empty), then a control ping of fe80::1 with `ident`, and waits for the control reply.
/// Returns the other IPv6 frames that arrived meanwhile (netfence handles a queue's frames in
/// order, so an answer to `bad` would come before the control reply).
fn send_with_control(
    g: &mut Guest,
    gw: [u8; 6],
    bad: &[u8],
    ident: u16,
    what: &str,
) -> Vec<Vec<u8>> {
    let ll = g.link_local6();
    if !bad.is_empty() {
        g.dev.fe.send_frame(bad);
    }
    let control = frames::icmp_echo_frame(g.mac, gw, ll, GATEWAY6_LL, ident, 1, b"control");
    let mut others = Vec::new();
    let got = g.raw_exchange(&control, deadline(SHORT), |f| {
        if frames6::parse_echo_reply6(f).is_some_and(|r| r.ident == ident) {
            return true;
        }
        if !is_housekeeping(f) {
            others.push(f.to_vec());
        }
        false
    });
    assert!(
        got.is_some(),
        "fe80::1 stopped answering pings after {what}"
    );
    others
}

/// What the first control ping follows: nothing (is the raw ping answered at all?).
const BEFORE_GARBAGE: &str = "nothing yet (the control before any bad packet)";

/// Sends a control ping alone (is a raw ping answered at all?), then each bad packet of
/// `cases` followed by a control ping (idents from `first_ident` on), checking after each that
/// netfence still runs; then watches [`SILENCE`] for late frames (a SYN-ACK or RST would only
/// follow a host connect). Returns every frame that answered, described and named by its case
/// (or "late").
fn answers_to_bad_packets(
    nf: &mut Netfence,
    g: &mut Guest,
    gw: [u8; 6],
    cases: &[(&str, Vec<u8>)],
    first_ident: u16,
) -> Vec<String> {
    assert!(
        send_with_control(g, gw, &[], 0x5000, BEFORE_GARBAGE).is_empty(),
        "unexpected frames before any bad packet"
    );
    let mut answered = Vec::new();
    for (k, (name, f)) in cases.iter().enumerate() {
        let others = send_with_control(g, gw, f, first_ident + k as u16, name);
        nf.assert_running(name);
        for o in others {
            answered.push(format!("{name}: {}", frames::describe(&o)));
        }
    }
    for f in g.raw_collect(deadline(SILENCE)) {
        if !is_housekeeping(&f) {
            answered.push(format!("late: {}", frames::describe(&f)));
        }
    }
    answered
}

#[test]
fn malformed_ipv6_headers_get_no_reply_and_netfence_keeps_serving() {
    let mut nf = Netfence::spawn::<&str>(&[]);
    let (mut g, gw) = guest6(&nf);
    let me = g.mac;
    let ll = g.link_local6();
    // Each bad packet is an echo request to fe80::1 with its own ident: a reply names it.
    let echo = |ident: u16| frames::icmp_echo_request(ll, GATEWAY6_LL, ident, 1, b"bad");
    let pkt = |nh: u8, payload: &[u8]| frames6::ipv6_packet(ll, GATEWAY6_LL, nh, 64, payload);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let good = pkt(frames6::NH_ICMPV6, &echo(0x5101));
    cases.push((
        "Ethernet header only (IPv6 ethertype)",
        frames6::eth6(gw, me, &[]),
    ));
    cases.push((
        "truncated IPv6 header (20 of 40 bytes)",
        frames6::eth6(gw, me, &good[..20]),
    ));
    cases.push((
        "truncated IPv6 header (39 of 40 bytes)",
        frames6::eth6(gw, me, &good[..39]),
    ));
    {
        let mut p = pkt(frames6::NH_ICMPV6, &echo(0x5102));
        let len = (p.len() - frames6::IPV6_HDR_LEN + 100) as u16;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        cases.push((
            "payload length 100 beyond the frame",
            frames6::eth6(gw, me, &p),
        ));
        let mut p = pkt(frames6::NH_ICMPV6, &echo(0x5103));
        p[4..6].copy_from_slice(&0xffffu16.to_be_bytes());
        cases.push(("payload length 65535", frames6::eth6(gw, me, &p)));
        let mut p = pkt(frames6::NH_ICMPV6, &echo(0x5104));
        p[0] = 0x40 | (p[0] & 0x0f);
        cases.push(("IP version 4 in an IPv6 frame", frames6::eth6(gw, me, &p)));
    }
    {
        let mut frag = frames6::fragment_header(frames6::NH_ICMPV6, 0, true, 0xabcd).to_vec();
        frag.extend_from_slice(&echo(0x5105));
        cases.push((
            "fragment header, first fragment (M set)",
            frames6::eth6(gw, me, &pkt(frames6::NH_FRAGMENT, &frag)),
        ));
        let mut frag = frames6::fragment_header(frames6::NH_ICMPV6, 1, false, 0xabce).to_vec();
        frag.extend_from_slice(&echo(0x5106));
        cases.push((
            "fragment header, last fragment (offset 8)",
            frames6::eth6(gw, me, &pkt(frames6::NH_FRAGMENT, &frag)),
        ));
    }
    cases.push((
        "unknown next header 253 (experimental)",
        frames6::eth6(gw, me, &pkt(frames6::NH_EXPERIMENTAL, &echo(0x5107))),
    ));
    cases.push((
        "no next header (59) followed by an echo request",
        frames6::eth6(gw, me, &pkt(frames6::NH_NO_NEXT, &echo(0x5108))),
    ));
    {
        // An extension header of an unknown type (254) chained in front of the echo.
        let mut ext = vec![frames6::NH_ICMPV6, 0, 1, 4, 0, 0, 0, 0];
        ext.extend_from_slice(&echo(0x5109));
        cases.push((
            "unknown extension header 254 before ICMPv6",
            frames6::eth6(gw, me, &pkt(254, &ext)),
        ));
    }
    let answered = answers_to_bad_packets(&mut nf, &mut g, gw, &cases, 0x5200);
    assert!(
        answered.is_empty(),
        "malformed IPv6 packets were answered: {answered:#?}"
    );
    // The smoltcp guest still gets through to the gateway.
    g.ping(GATEWAY6_LL, SHORT)
        .unwrap_or_else(|e| panic!("after all the garbage: {e}"));
    nf.assert_running("all the garbage");
}

#[test]
fn bad_ipv6_checksums_get_no_reply_and_open_no_flow() {
    // PUBLIC6 (all ports) to a tripwire: a flow opened from a bad packet is counted there.
    let trip = servers::Tripwire::start6();
    let mut nf = Netfence::spawn(&trip.map_args_ip(&[IpAddr::V6(PUBLIC6)]));
    let (mut g, gw) = guest6(&nf);
    let me = g.mac;
    let ll = g.link_local6();
    let corrupt = |mut f: Vec<u8>, at: usize| {
        f[14 + frames6::IPV6_HDR_LEN + at] ^= 0x5a;
        f
    };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "ICMPv6 echo to fe80::1, bad checksum",
            corrupt(
                frames::icmp_echo_frame(me, gw, ll, GATEWAY6_LL, 0x5301, 1, b"x"),
                2,
            ),
        ),
        (
            "ICMPv6 echo to fd42:6d73:62::1, bad checksum",
            corrupt(
                frames::icmp_echo_frame(me, gw, GUEST6, GATEWAY6, 0x5302, 1, b"x"),
                2,
            ),
        ),
        (
            "ICMPv6 echo to a public address, bad checksum",
            corrupt(
                frames::icmp_echo_frame(me, gw, GUEST6, PUBLIC6, 0x5303, 1, b"x"),
                2,
            ),
        ),
        (
            "TCP SYN, bad checksum",
            corrupt(
                frames::tcp_syn_frame(me, gw, GUEST6, PUBLIC6, 42001, 80, 7),
                16,
            ),
        ),
        (
            "UDP, bad checksum",
            corrupt(
                frames::udp_frame(me, gw, GUEST6, PUBLIC6, 42002, 53, b"x"),
                6,
            ),
        ),
    ];
    {
        // A zero UDP checksum means "none" over IPv4 but is invalid over IPv6 (RFC 8200 8.1).
        let mut f = frames::udp_frame(me, gw, GUEST6, PUBLIC6, 42003, 53, b"x");
        let at = 14 + frames6::IPV6_HDR_LEN + 6;
        f[at..at + 2].copy_from_slice(&[0, 0]);
        cases.push(("UDP, zero checksum", f));
        // UDP length field beyond the payload.
        let mut f = frames::udp_frame(me, gw, GUEST6, PUBLIC6, 42004, 53, b"x");
        let at = 14 + frames6::IPV6_HDR_LEN + 4;
        f[at..at + 2].copy_from_slice(&600u16.to_be_bytes());
        cases.push(("UDP length beyond the packet", f));
    }
    let answered = answers_to_bad_packets(&mut nf, &mut g, gw, &cases, 0x5400);
    assert!(
        answered.is_empty(),
        "packets with bad checksums were answered: {answered:#?}"
    );
    // Every flow-opening packet here (TCP, UDP, echo) went to PUBLIC6 and was bad.
    let decided: Vec<String> = nf
        .decisions()
        .into_iter()
        .filter(|d| decision_ip(d) == Some(IpAddr::V6(PUBLIC6)))
        .map(|d| d.line)
        .collect();
    assert!(
        decided.is_empty(),
        "bad packets were decided as flows: {decided:#?}"
    );
    assert_eq!(trip.hits(), (0, 0), "a bad packet reached the host side");
    g.ping(GATEWAY6_LL, SHORT).unwrap_or_else(|e| panic!("{e}"));
}

// ---- harness self-check ------------------------------------------------------------------

/// The IPv6 frame builders and parsers agree with smoltcp and with each other, so a failure
/// above is netfence's, not the harness's. Needs no netfence.
#[test]
fn frames6_builders_and_parsers_self_check() {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::time::Duration as SmolDuration;
    use smoltcp::wire::{
        EthernetAddress, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Repr,
        NdiscNeighborFlags, NdiscPrefixInfoFlags, NdiscPrefixInformation, NdiscRepr,
        NdiscRouterFlags, RawHardwareAddress,
    };

    let me = [0x52, 0x54, 0x00, 0x4e, 0x46, 0x02];
    let gw = [0x52, 0x54, 0x00, 0x4e, 0x46, 0x01];
    let ll = frames6::link_local_from_mac(me);
    assert_eq!(ll, "fe80::5054:ff:fe4e:4602".parse::<Ipv6Addr>().unwrap());
    assert_eq!(
        frames6::solicited_node(GUEST6),
        "ff02::1:ff00:2".parse::<Ipv6Addr>().unwrap()
    );
    let caps = ChecksumCapabilities::default();
    let icmp_of = |f: &[u8]| frames6::parse_ipv6(f).unwrap();

    // RS, with and without the source link-layer address option.
    for (src, lladdr) in [
        (ll, Some(RawHardwareAddress::from(EthernetAddress(me)))),
        (Ipv6Addr::UNSPECIFIED, None),
    ] {
        let f = frames6::router_solicit_frame(me, src);
        let ip = icmp_of(&f);
        assert_eq!((ip.dst, ip.hop_limit), (frames6::ALL_ROUTERS, 255));
        assert_eq!(ip.eth_dst, [0x33, 0x33, 0, 0, 0, 2]);
        let p = Icmpv6Packet::new_checked(&ip.payload[..]).unwrap();
        assert_eq!(
            Icmpv6Repr::parse(&ip.src, &ip.dst, &p, &caps),
            Ok(Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr }))
        );
    }

    // NS to the solicited-node group.
    let f = frames6::neighbor_solicit_frame(me, ll, GATEWAY6_LL);
    let ip = icmp_of(&f);
    assert_eq!(ip.dst, "ff02::1:ff00:1".parse::<Ipv6Addr>().unwrap());
    assert_eq!(ip.eth_dst, [0x33, 0x33, 0xff, 0, 0, 1]);
    let p = Icmpv6Packet::new_checked(&ip.payload[..]).unwrap();
    assert!(matches!(
        Icmpv6Repr::parse(&ip.src, &ip.dst, &p, &caps),
        Ok(Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr, lladdr: Some(_) }))
            if target_addr == GATEWAY6_LL
    ));

    let ns = frames6::parse_neighbor_solicit(&f).expect("NS parses");
    assert!(ns.checksum_ok && ns.target == GATEWAY6_LL && ns.slla == Some(me));
    // The guest's answer to an NS (unicast, and for duplicate address detection).
    let na = parse_neighbor_advert(&frames6::neighbor_advert_frame(me, gw, GUEST6, GATEWAY6))
        .expect("NA parses");
    assert!(na.checksum_ok && na.solicited && na.override_ && !na.router);
    assert_eq!(
        (na.ip.dst, na.ip.eth_dst, na.tlla),
        (GATEWAY6, gw, Some(me))
    );
    let na = parse_neighbor_advert(&frames6::neighbor_advert_frame(
        me,
        gw,
        GUEST6,
        Ipv6Addr::UNSPECIFIED,
    ))
    .expect("NA parses");
    assert!(na.checksum_ok && !na.solicited && na.ip.dst == frames6::ALL_NODES);

    // RA emitted by smoltcp, plus an RDNSS option by hand, then the checksum redone.
    let ra = NdiscRepr::RouterAdvert {
        hop_limit: 64,
        flags: NdiscRouterFlags::empty(),
        router_lifetime: SmolDuration::from_secs(1800),
        reachable_time: SmolDuration::from_millis(0),
        retrans_time: SmolDuration::from_millis(0),
        lladdr: Some(RawHardwareAddress::from(EthernetAddress(gw))),
        mtu: Some(1400),
        prefix_info: Some(NdiscPrefixInformation {
            prefix_len: 64,
            flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
            valid_lifetime: SmolDuration::from_secs(86400),
            preferred_lifetime: SmolDuration::from_secs(14400),
            prefix: PREFIX6,
        }),
    };
    let mut msg = frames6::icmpv6_message(GATEWAY6_LL, ll, &Icmpv6Repr::Ndisc(ra));
    msg.extend_from_slice(&[frames6::NDP_OPT_RDNSS, 3, 0, 0, 0, 0, 0x0e, 0x10]);
    msg.extend_from_slice(&GATEWAY6.octets());
    Icmpv6Packet::new_unchecked(&mut msg[..]).fill_checksum(&GATEWAY6_LL, &ll);
    let f = frames6::eth6(
        me,
        gw,
        &frames6::ipv6_packet(GATEWAY6_LL, ll, 58, 255, &msg),
    );
    let got = parse_router_advert(&f).expect("RA parses");
    assert!(got.checksum_ok, "{got:?}");
    assert_eq!(got.ip.src, GATEWAY6_LL);
    assert_eq!(got.ip.hop_limit, 255);
    assert_eq!(got.cur_hop_limit, 64);
    assert_eq!(got.router_lifetime_secs, 1800);
    assert_eq!(got.slla, Some(gw));
    assert_eq!(got.mtu, Some(1400));
    assert_eq!(
        got.prefixes,
        vec![frames6::PrefixInfo {
            prefix: PREFIX6,
            prefix_len: 64,
            on_link: true,
            autonomous: true,
            valid_lifetime_secs: 86400,
            preferred_lifetime_secs: 14400,
        }]
    );
    assert_eq!(
        got.rdnss,
        vec![frames6::Rdnss {
            lifetime_secs: 3600,
            servers: vec![GATEWAY6],
        }]
    );
    let mut bad = f.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert!(!parse_router_advert(&bad).unwrap().checksum_ok);

    // NA.
    let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
        flags: NdiscNeighborFlags::ROUTER | NdiscNeighborFlags::SOLICITED,
        target_addr: GATEWAY6_LL,
        lladdr: Some(RawHardwareAddress::from(EthernetAddress(gw))),
    });
    let f = frames6::icmpv6_frame(gw, me, GATEWAY6_LL, ll, 255, &na);
    let got = parse_neighbor_advert(&f).expect("NA parses");
    assert!(got.checksum_ok && got.router && got.solicited && !got.override_);
    assert_eq!((got.target, got.tlla), (GATEWAY6_LL, Some(gw)));

    // Echo request and reply.
    let f = frames::icmp_echo_frame(me, gw, ll, GATEWAY6_LL, 0x1234, 7, b"abc");
    let got = parse_icmp(&f).unwrap();
    assert!(got.checksums_ok);
    assert_eq!((got.msg_type, got.ident, got.seq), (128, 0x1234, 7));
    assert_eq!(got.data, b"abc");
    let reply = Icmpv6Repr::EchoReply {
        ident: 0x1234,
        seq_no: 7,
        data: b"abc",
    };
    let f = frames6::icmpv6_frame(gw, me, GATEWAY6_LL, ll, 64, &reply);
    assert!(frames6::parse_echo_reply6(&f).is_some_and(|r| r.checksums_ok && r.ident == 0x1234));

    // Destination unreachable quoting an echo request.
    let quoted = frames6::ipv6_packet(
        GUEST6,
        PUBLIC6_PING,
        58,
        64,
        &frames::icmp_echo_request(GUEST6, PUBLIC6_PING, 0x6161, 1, b"q"),
    );
    let unreach = Icmpv6Repr::DstUnreachable {
        reason: Icmpv6DstUnreachable::AdminProhibit,
        header: Ipv6Repr {
            src_addr: GUEST6,
            dst_addr: PUBLIC6_PING,
            next_header: IpProtocol::Icmpv6,
            payload_len: quoted.len() - 40,
            hop_limit: 64,
        },
        data: &quoted[40..],
    };
    let f = frames6::icmpv6_frame(gw, me, GATEWAY6, GUEST6, 64, &unreach);
    let got = frames6::parse_unreachable6(&f).expect("unreachable parses");
    assert!(got.checksums_ok);
    assert_eq!(got.code, frames6::ICMPV6_CODE_ADMIN_PROHIBITED);
    let q = got.quoted.unwrap();
    assert_eq!(
        (q.src, q.dst, q.proto),
        (IpAddr::V6(GUEST6), IpAddr::V6(PUBLIC6_PING), 58)
    );
    assert_eq!(q.echo_ident(), Some(0x6161));

    // TCP and UDP, and their checksums detected as bad after a flipped byte.
    let f = frames::tcp_syn_frame(me, gw, GUEST6, PUBLIC6, 40000, 80, 99);
    let t = parse_tcp(&f).unwrap();
    assert!(t.checksums_ok && t.flags.syn && t.seq == 99 && t.dport == 80);
    let mut bad = f.clone();
    bad[14 + 40 + 16] ^= 0x5a;
    assert!(!parse_tcp(&bad).unwrap().checksums_ok);
    let f = frames::udp_frame(me, gw, GUEST6, PUBLIC6, 40000, 53, b"hello");
    let u = frames::parse_udp(&f).unwrap();
    assert!(u.checksums_ok && u.payload == b"hello");
    let mut bad = f.clone();
    bad[14 + 40 + 6] ^= 0x5a;
    assert!(!frames::parse_udp(&bad).unwrap().checksums_ok);

    // Payload length beyond the frame: not an IPv6 packet to the parser.
    let mut p = frames6::ipv6_packet(GUEST6, PUBLIC6, 17, 64, &[0; 8]);
    p[4..6].copy_from_slice(&100u16.to_be_bytes());
    assert!(frames6::parse_ipv6(&frames6::eth6(gw, me, &p)).is_none());
}
