//! Untrusted input from the guest: malformed descriptor chains and garbage frames must be
//! counted and dropped, and the next good frame must still be served (the gateway answers a
//! ping). netfence must never crash or stop serving the connection.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::frames::{self, Rng};
use common::frontend::{self, BadChain, VIRTIO_RING_F_INDIRECT_DESC};
use common::*;

fn assert_alive(nf: &mut Netfence, g: &mut Guest, after: &str) {
    if let Err(e) = g.ping(GATEWAY, SHORT) {
        panic!("gateway stopped answering after {after}: {e}");
    }
    nf.assert_running(after);
}

fn bad_chains(opts: FrontendOptions) {
    let mut nf = Netfence::builder().env("RUST_LOG", "debug").spawn();
    let mut g = guest_with(&nf, opts);
    g.dhcp(SHORT * 2).unwrap();
    for kind in BadChain::ALL {
        g.dev.fe.send_bad_chain(kind);
        assert_alive(&mut nf, &mut g, &format!("bad chain {kind:?}"));
    }
    // All of them at once, twice, then good traffic again.
    for _ in 0..2 {
        for kind in BadChain::ALL {
            g.dev.fe.send_bad_chain(kind);
        }
    }
    assert_alive(&mut nf, &mut g, "a burst of bad chains");
    // Every chain we published should come back in the used ring (else its descriptors leak
    // and a guest could wedge its own TX queue).
    let drained = g.dev.fe.wait_tx_drained(deadline(SHORT));
    let st = g.dev.fe.stats.clone();
    assert!(
        drained,
        "{} TX chains never returned by the device ({} bad chains sent, {} returned)",
        g.dev.fe.tx.num_in_flight(),
        st.tx_bad_chains_sent,
        st.tx_bad_chains_returned
    );
}

#[test]
fn malformed_descriptor_chains() {
    bad_chains(FrontendOptions::default());
}

#[test]
fn malformed_descriptor_chains_with_indirect_negotiated() {
    let o = FrontendOptions {
        features: frontend::ch_features() | VIRTIO_RING_F_INDIRECT_DESC,
        ..Default::default()
    };
    bad_chains(o);
}

/// Destinations garbage frames may name; all are mapped to a loopback tripwire so that even a
/// misparsed frame cannot make netfence connect anywhere but loopback. (0.0.0.0, also used,
/// cannot be mapped and would only ever reach this host.)
const ODD_DESTINATIONS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(224, 0, 0, 1),
    Ipv4Addr::new(255, 255, 255, 255),
];

/// Every flow netfence allowed must have gone to a mapped address or loopback.
fn assert_only_mapped_allowed(nf: &Netfence, mapped: &[Ipv4Addr]) {
    for d in nf.decisions() {
        if d.action != "allow" {
            continue;
        }
        let ip: Ipv4Addr = d
            .dst
            .rsplit_once(':')
            .and_then(|(ip, _)| ip.parse().ok())
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        assert!(
            mapped.contains(&ip) || ip.is_loopback() || ip.is_unspecified() || ip == GATEWAY,
            "netfence allowed a flow to unmapped {}: {}",
            d.dst,
            d.line
        );
    }
}

#[test]
fn garbage_frames() {
    let trip = servers::Tripwire::start();
    let mut mapped = vec![PUBLIC_IP];
    mapped.extend(ODD_DESTINATIONS);
    let mut nf = Netfence::builder()
        .env("RUST_LOG", "debug")
        .args(&trip.map_args(&mapped))
        .spawn();
    let mut g = guest_up(&nf);
    let gw = g.arp_raw(GATEWAY, SHORT).expect("ARP").sender_mac;
    let me = g.mac;
    let good_syn = frames::tcp_syn_frame(me, gw, GUEST_IP, PUBLIC_IP, 40100, 9, 1);
    let good_udp = frames::udp_frame(me, gw, GUEST_IP, PUBLIC_IP, 40101, 9, b"x");
    let ip_of = |f: &[u8]| f[14..].to_vec();

    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty frame".into(), vec![]),
        ("1 byte".into(), vec![0x42]),
        (
            "truncated Ethernet header (13 bytes)".into(),
            good_syn[..13].to_vec(),
        ),
        ("Ethernet header only".into(), good_syn[..14].to_vec()),
        (
            "IPv4 ethertype, 10 bytes of IP".into(),
            good_syn[..24].to_vec(),
        ),
        ("unknown ethertype".into(), frames::garbage_ethernet(me, 60)),
        (
            "oversized 9000-byte frame".into(),
            frames::garbage_ethernet(me, 9000),
        ),
        (
            "oversized 65535-byte frame".into(),
            frames::garbage_ethernet(me, 65535),
        ),
        (
            "oversized IPv4 (total length 9000)".into(),
            frames::eth(
                gw,
                me,
                0x0800,
                &frames::ipv4_packet(GUEST_IP, PUBLIC_IP, 17, 1, &vec![0u8; 8980]),
            ),
        ),
    ];
    // IPv4 header corruptions of a valid SYN.
    let mut corrupt = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut ip = ip_of(&good_syn);
        f(&mut ip);
        cases.push((name.to_string(), frames::eth(gw, me, 0x0800, &ip)));
    };
    corrupt("IP version 6 in an IPv4 frame", &|ip| ip[0] = 0x65);
    corrupt("IHL 3 (shorter than a header)", &|ip| ip[0] = 0x43);
    corrupt("IHL 15 beyond the packet", &|ip| ip[0] = 0x4f);
    corrupt("total length larger than frame", &|ip| {
        ip[2..4].copy_from_slice(&4000u16.to_be_bytes())
    });
    corrupt("total length smaller than header", &|ip| {
        ip[2..4].copy_from_slice(&10u16.to_be_bytes())
    });
    corrupt("bad IP checksum", &|ip| ip[10] ^= 0xff);
    corrupt("bad TCP checksum", &|ip| ip[36] ^= 0xff);
    corrupt("TCP data offset 2", &|ip| ip[32] = 0x20);
    corrupt("TCP data offset 15 beyond segment", &|ip| ip[32] = 0xf0);
    corrupt("fragment (MF set)", &|ip| ip[6] = 0x20);
    corrupt("fragment offset", &|ip| {
        ip[6] = 0x00;
        ip[7] = 0x10
    });
    corrupt("TTL 0", &|ip| ip[8] = 0);
    corrupt("source is the gateway", &|ip| {
        ip[12..16].copy_from_slice(&GATEWAY.octets())
    });
    corrupt("broadcast destination", &|ip| {
        ip[16..20].copy_from_slice(&[255, 255, 255, 255])
    });
    corrupt("multicast destination", &|ip| {
        ip[16..20].copy_from_slice(&[224, 0, 0, 1])
    });
    corrupt("loopback destination", &|ip| {
        ip[16..20].copy_from_slice(&[127, 0, 0, 1])
    });
    corrupt("zero destination", &|ip| {
        ip[16..20].copy_from_slice(&[0, 0, 0, 0])
    });
    {
        let mut ip = ip_of(&good_udp);
        ip[24..26].copy_from_slice(&3u16.to_be_bytes()); // UDP length < 8
        cases.push(("UDP length 3".into(), frames::eth(gw, me, 0x0800, &ip)));
        let mut ip = ip_of(&good_udp);
        ip[24..26].copy_from_slice(&60000u16.to_be_bytes()); // UDP length > packet
        cases.push((
            "UDP length beyond packet".into(),
            frames::eth(gw, me, 0x0800, &ip),
        ));
    }
    // ARP nonsense.
    let mut arp = frames::arp_request(me, GUEST_IP, GATEWAY);
    arp[18] = 9; // hardware length 9
    cases.push(("ARP with hardware length 9".into(), arp));
    let arp = frames::arp_request(me, GUEST_IP, GATEWAY);
    cases.push(("ARP truncated".into(), arp[..30].to_vec()));
    // IPv6 garbage.
    let mut v6 = vec![0x60, 0, 0, 0, 0xff, 0xff, 58, 64];
    v6.extend_from_slice(&[0u8; 32]);
    cases.push((
        "IPv6 with payload length beyond frame".into(),
        frames::eth(gw, me, 0x86dd, &v6),
    ));
    // Random bytes, with and without a plausible Ethernet header.
    let mut rng = Rng::new(0x5eed);
    for i in 0..40 {
        let len = (rng.next_u64() % 1600) as usize;
        let mut f = rng.bytes(len);
        if i % 2 == 0 && len >= 14 {
            f[0..6].copy_from_slice(&gw);
            f[6..12].copy_from_slice(&me);
            f[12..14].copy_from_slice(if i % 4 == 0 {
                &[0x08, 0x00]
            } else {
                &[0x08, 0x06]
            });
        }
        cases.push((format!("random frame #{i} ({len} bytes)"), f));
    }

    for (name, f) in &cases {
        g.dev.fe.send_frame(f);
        assert_alive(&mut nf, &mut g, name);
    }
    // Garbage with a wrong virtio-net header: GSO/checksum flags we never negotiated.
    let mut hdr = vec![0u8; 12];
    hdr[0] = 1; // NEEDS_CSUM
    hdr[1] = 1; // GSO_TCPV4
    hdr[2..4].copy_from_slice(&54u16.to_le_bytes());
    hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
    hdr[6..8].copy_from_slice(&9000u16.to_le_bytes()); // csum_start beyond the frame
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    let mut raw = hdr.clone();
    raw.extend_from_slice(&good_syn);
    g.dev.fe.send_raw_chain_bytes(&raw);
    assert_alive(
        &mut nf,
        &mut g,
        "a virtio-net header with unnegotiated GSO/csum flags",
    );

    // All at once, then a real TCP exchange works too.
    for (_, f) in &cases {
        g.dev.fe.send_frame(f);
    }
    assert_alive(&mut nf, &mut g, "all garbage at once");
    for d in nf.decisions() {
        eprintln!("garbage decision: {}", d.line);
    }
    assert_only_mapped_allowed(&nf, &mapped);
    let echo = servers::TcpEchoServer::start();
    drop(nf);
    let mut args = trip.map_args(&ODD_DESTINATIONS);
    args.extend([
        "--map".to_string(),
        format!("{PUBLIC_IP}:9=127.0.0.1:{}", echo.port()),
    ]);
    let mut nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let gw = g.arp_raw(GATEWAY, SHORT).unwrap().sender_mac;
    for (_, f) in &cases {
        let mut f = f.clone();
        if f.len() >= 12 {
            f[0..6].copy_from_slice(&gw);
        }
        g.dev.fe.send_frame(&f);
    }
    let h = g
        .tcp_connect(PUBLIC_IP, 9, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}"));
    g.tcp_send_all(h, b"still fine", deadline(SHORT)).unwrap();
    assert_eq!(
        g.tcp_recv_exact(h, 10, deadline(SHORT)).unwrap(),
        b"still fine"
    );
    assert_alive(&mut nf, &mut g, "garbage followed by TCP");
    assert_only_mapped_allowed(&nf, &mapped);
}

/// Hundreds of bad chains: if the device did not return them, the TX ring would run dry and
/// good frames could no longer be sent.
#[test]
fn bad_chains_do_not_exhaust_the_tx_ring() {
    let mut nf = Netfence::spawn::<&str>(&[]);
    let o = FrontendOptions {
        queue_size: 64,
        ..Default::default()
    };
    let mut g = guest_with(&nf, o);
    g.dhcp(SHORT * 2).unwrap();
    for i in 0..300 {
        let kind = BadChain::ALL[i % BadChain::ALL.len()];
        // send_bad_chain needs free descriptors: wait for the device to give them back.
        let end = deadline(SHORT);
        while g.dev.fe.tx.num_free() < 2 {
            g.dev.fe.reclaim_tx();
            if g.dev.fe.tx.num_free() >= 2 {
                break;
            }
            if !g.dev.fe.wait(Some(end)) && std::time::Instant::now() >= end {
                panic!("TX ring exhausted after {i} bad chains: the device keeps them");
            }
        }
        g.dev.fe.send_bad_chain(kind);
    }
    assert_alive(&mut nf, &mut g, "300 bad chains on a 64-entry ring");
}

/// A malformed chain whose readable bytes are a valid ping of the gateway must be dropped as a
/// whole, not delivered: a loop or a bad `next` must not be read as "end of chain".
#[test]
fn bad_chains_carrying_a_ping_are_not_delivered() {
    let mut nf = Netfence::builder().env("RUST_LOG", "debug").spawn();
    let mut g = guest_up(&nf);
    let gw = g.arp_raw(GATEWAY, SHORT).expect("ARP").sender_mac;
    let me = g.mac;
    let is_reply = |ident: u16| {
        move |f: &[u8]| {
            frames::parse_icmp(f)
                .map(|i| i.msg_type == 0 && i.ident == ident)
                .unwrap_or(false)
        }
    };
    // Control: the same kind of frame, sent properly, is answered.
    let ping = frames::icmp_echo_frame(me, gw, GUEST_IP, GATEWAY, 0x7700, 1, b"control");
    assert!(
        g.raw_exchange(&ping, deadline(SHORT), is_reply(0x7700))
            .is_some(),
        "a well-formed raw ping is not answered"
    );
    let mut delivered = Vec::new();
    for (k, kind) in Frontend::CARRYING.into_iter().enumerate() {
        let ident = 0x7701 + k as u16;
        let ping = frames::icmp_echo_frame(me, gw, GUEST_IP, GATEWAY, ident, 1, b"poisoned chain");
        g.dev.fe.send_bad_chain_carrying(kind, &ping);
        if g.raw_wait(deadline(Duration::from_millis(700)), is_reply(ident))
            .is_some()
        {
            delivered.push(kind);
        }
        assert_alive(&mut nf, &mut g, &format!("bad chain {kind:?}"));
    }
    assert!(
        delivered.is_empty(),
        "frames from malformed chains were delivered (the gateway answered them): {delivered:?}"
    );
}

/// A SYN that is malformed at the IP or TCP layer must not open a flow (no decision, no
/// SYN-ACK, no host connection): netfence would otherwise act on bytes it did not validate.
#[test]
fn malformed_syns_open_no_flow() {
    let trip = servers::Tripwire::start();
    let nf = Netfence::builder()
        .args(&trip.map_args(&[PUBLIC_IP]))
        .spawn();
    let mut g = guest_up(&nf);
    let gw = g.arp_raw(GATEWAY, SHORT).expect("ARP").sender_mac;
    let me = g.mac;
    type Corrupt = fn(&mut Vec<u8>);
    let corruptions: Vec<(&str, Corrupt)> = vec![
        ("bad IP checksum", |ip| ip[10] ^= 0xff),
        ("bad TCP checksum", |ip| ip[36] ^= 0xff),
        ("IP version 6", |ip| ip[0] = 0x65),
        ("IHL 3", |ip| ip[0] = 0x43),
        ("IHL 15 beyond the packet", |ip| ip[0] = 0x4f),
        ("total length beyond the frame", |ip| {
            ip[2..4].copy_from_slice(&4000u16.to_be_bytes())
        }),
        ("total length below the header", |ip| {
            ip[2..4].copy_from_slice(&10u16.to_be_bytes())
        }),
        ("TCP data offset 2", |ip| ip[32] = 0x20),
        ("TCP data offset beyond the segment", |ip| ip[32] = 0xf0),
        ("first fragment (MF)", |ip| ip[6] = 0x20),
        ("later fragment (offset 8)", |ip| {
            ip[6] = 0;
            ip[7] = 1
        }),
    ];
    let mut opened = Vec::new();
    for (k, (name, corrupt)) in corruptions.iter().enumerate() {
        let sport = 41000 + k as u16;
        let syn = frames::tcp_syn_frame(me, gw, GUEST_IP, PUBLIC_IP, sport, 80, 7);
        let mut ip = syn[14..].to_vec();
        corrupt(&mut ip);
        g.dev.fe.send_frame(&frames::eth(gw, me, 0x0800, &ip));
        let answer = g.raw_wait(deadline(Duration::from_millis(300)), |f| {
            frames::parse_tcp(f)
                .map(|t| t.dport == sport)
                .unwrap_or(false)
        });
        let decided = nf
            .decisions()
            .into_iter()
            .any(|d| d.line.contains(&format!("src={GUEST_IP}:{sport}")));
        if answer.is_some() || decided {
            opened.push(format!(
                "{name} (decision: {decided}, answer: {})",
                answer
                    .map(|f| frames::describe(&f))
                    .unwrap_or_else(|| "none".into())
            ));
        }
    }
    // A well-formed one for contrast: decided and answered.
    let syn = frames::tcp_syn_frame(me, gw, GUEST_IP, PUBLIC_IP, 41999, 80, 7);
    let answer = g.raw_exchange(&syn, deadline(SHORT), |f| {
        frames::parse_tcp(f)
            .map(|t| t.dport == 41999)
            .unwrap_or(false)
    });
    assert!(
        answer.is_some(),
        "a well-formed SYN to a mapped address got no answer"
    );
    assert!(
        opened.is_empty(),
        "malformed SYNs opened flows: {opened:#?}"
    );
}
