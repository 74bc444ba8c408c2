//! Checksum and segmentation offloads, for every set of features a VMM may ack: none, the
//! checksum offloads only, TSO (host and guest, with their checksum offloads), and all that
//! cloud-hypervisor offers. Each run moves 1 MiB each way over TCP and UDP datagrams,
//! byte-exact; sends a 60 KB TSO segment with a partial checksum and a UDP datagram with a
//! partial checksum by hand (when acked) that must arrive byte-exact at loopback servers; checks
//! that large segments reach the guest only when it acked GUEST_TSO (the frontend fails on a
//! GSO frame or a partial checksum it did not ack, and on any frame above its MTU without GSO);
//! and sends six virtio-net headers no device should accept, which must be counted drops.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::frames::{self, parse_tcp, Flags};
use common::frontend::*;
use common::process::close_and_count;
use common::servers::*;
use common::*;
use smoltcp::wire::{checksum, IpAddress, IpProtocol};

/// Where the hand-made TSO connection goes (mapped to its own loopback sink).
const TSO_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

/// cloud-hypervisor's features with only `offloads` of the offload bits.
fn features_with(offloads: u64) -> u64 {
    (ch_features() & !OFFLOAD_BITS) | offloads
}

/// A frame's TCP checksum replaced by its pseudo-header sum, as a guest leaves it with
/// NEEDS_CSUM; returns (csum_start, the TCP header length).
fn make_partial(frame: &mut [u8], src: IpAddr, dst: IpAddr, proto: IpProtocol) -> (u16, usize) {
    let l4 = 14 + frames::ip_hdr_len(src);
    let len = frame.len() - l4;
    let pseudo = checksum::pseudo_header(
        &IpAddress::from(src),
        &IpAddress::from(dst),
        proto,
        len as u32,
    );
    let field = l4 + if proto == IpProtocol::Tcp { 16 } else { 6 };
    frame[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
    let tcp_hdr = usize::from(frame[l4 + 12] >> 4) * 4;
    (l4 as u16, tcp_hdr)
}

/// Opens a TCP connection by hand to `TSO_IP:80`, sends `payload` as one TSO segment with a
/// partial checksum, then a FIN. Returns when netfence acknowledged both.
fn send_tso_segment(g: &mut Guest, payload: &[u8]) {
    let gw = gateway_mac(g);
    let sport = g.next_port();
    let (src, dst) = (IpAddr::V4(GUEST_IP), IpAddr::V4(TSO_IP));
    let isn = 0x2000_0000u32;
    let syn = frames::tcp_syn_frame(g.mac, gw, src, dst, sport, 80, isn);
    let ours = move |f: &[u8]| {
        parse_tcp(f).is_some_and(|t| t.src == dst && t.sport == 80 && t.dport == sport)
    };
    let synack = g
        .raw_exchange(&syn, deadline(SHORT), ours)
        .and_then(|f| parse_tcp(&f))
        .expect("SYN-ACK for the hand-made connection");
    assert!(synack.flags.syn && synack.flags.ack, "{synack:?}");
    assert!(
        usize::from(synack.window) >= payload.len(),
        "window {} too small for the segment",
        synack.window
    );
    let ack_flags = Flags {
        ack: true,
        ..Flags::RST
    };
    let ack_flags = Flags {
        rst: false,
        ..ack_flags
    };
    let their = synack.seq.wrapping_add(1);
    let tcp = |seq: u32, flags: Flags, data: &[u8]| {
        let seg = frames::tcp_segment(src, dst, sport, 80, seq, their, flags, 65535, data);
        frames::ip_frame(g.mac, gw, src, dst, 6, &seg)
    };
    let ack = tcp(isn + 1, ack_flags, &[]);
    let mut data = tcp(
        isn + 1,
        Flags {
            psh: true,
            ..ack_flags
        },
        payload,
    );
    let fin = tcp(
        isn + 1 + payload.len() as u32,
        Flags {
            fin: true,
            ..ack_flags
        },
        &[],
    );
    let (csum_start, tcp_hdr) = make_partial(&mut data, src, dst, IpProtocol::Tcp);
    let hdr = NetHdr {
        flags: NET_HDR_F_NEEDS_CSUM,
        gso_type: NET_HDR_GSO_TCPV4,
        hdr_len: csum_start + tcp_hdr as u16,
        gso_size: 1448,
        csum_start,
        csum_offset: 16,
        num_buffers: 0,
    };
    g.dev.fe.send_frame(&ack);
    while !g.dev.fe.try_send_frame_with(&hdr, &data) {
        g.dev.fe.wait(Some(deadline(SHORT)));
    }
    let end = isn + 1 + payload.len() as u32;
    let acked = g.raw_wait(deadline(SHORT), |f| {
        parse_tcp(f).is_some_and(|t| ours(f) && t.flags.ack && t.ack == end)
    });
    assert!(
        acked.is_some(),
        "the TSO segment was not acknowledged\n{}",
        g.dev.fe.debug_state()
    );
    let fin_acked = g.raw_exchange(&fin, deadline(SHORT), |f| {
        parse_tcp(f).is_some_and(|t| ours(f) && t.flags.ack && t.ack == end + 1)
    });
    assert!(fin_acked.is_some(), "the FIN was not acknowledged");
}

/// The six headers no device should accept, on a plausible TSO frame: (name, header, frame).
fn bad_headers(g: &Guest, gw: [u8; 6]) -> Vec<(&'static str, NetHdr, Vec<u8>)> {
    let (src, dst) = (IpAddr::V4(GUEST_IP), IpAddr::V4(TSO_IP));
    let payload = pattern(4000, 3);
    let seg = frames::tcp_segment(src, dst, 40999, 80, 1, 1, Flags::RST, 65535, &payload);
    let mut frame = frames::ip_frame(g.mac, gw, src, dst, 6, &seg);
    let (csum_start, _) = make_partial(&mut frame, src, dst, IpProtocol::Tcp);
    let good = NetHdr {
        flags: NET_HDR_F_NEEDS_CSUM,
        gso_type: NET_HDR_GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start,
        csum_offset: 16,
        num_buffers: 0,
    };
    let mut huge = frame.clone();
    huge.resize(14 + 65_536, 0);
    vec![
        (
            "gso_size 0",
            NetHdr {
                gso_size: 0,
                ..good
            },
            frame.clone(),
        ),
        (
            "csum_start past the frame",
            NetHdr {
                gso_type: 0,
                csum_start: frame.len() as u16,
                ..good
            },
            frame.clone(),
        ),
        (
            "ECN",
            NetHdr {
                gso_type: NET_HDR_GSO_TCPV4 | NET_HDR_GSO_ECN,
                ..good
            },
            frame.clone(),
        ),
        (
            "UDP GSO",
            NetHdr {
                gso_type: NET_HDR_GSO_UDP,
                ..good
            },
            frame.clone(),
        ),
        (
            "hdr_len past the frame",
            NetHdr {
                hdr_len: frame.len() as u16 + 1,
                ..good
            },
            frame.clone(),
        ),
        ("a GSO frame above 64 KiB", good, huge),
    ]
}

/// One feature set: traffic both ways, the hand-made offloaded frames, the bad headers.
fn matrix_case(offloads: u64) {
    let acked = |bit: u64| offloads & bit != 0;
    let (csum, guest_csum) = (acked(VIRTIO_NET_F_CSUM), acked(VIRTIO_NET_F_GUEST_CSUM));
    let host_tso = csum && acked(VIRTIO_NET_F_HOST_TSO4);
    let guest_tso = guest_csum && acked(VIRTIO_NET_F_GUEST_TSO4);

    const SIZE: usize = 1 << 20;
    let up = pattern(SIZE, 21);
    let down = pattern(SIZE, 22);
    let (up2, down2) = (up.clone(), down.clone());
    let bulk = OneShotServer::exchange(up2, down2);
    let tso_payload = pattern(60_000, 23);
    let tso_expected = tso_payload.clone();
    let tso_sink =
        OneShotServer::start(move |mut s| read_to_eof(&mut s).map(|g| mismatch(&g, &tso_expected)));
    let echo = UdpEchoServer::start();
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", bulk.port()),
        "--map".to_string(),
        format!("{PUBLIC_IP}:7=127.0.0.1:{}", echo.port()),
        "--map".to_string(),
        format!("{TSO_IP}:80=127.0.0.1:{}", tso_sink.port()),
    ]);
    let opts = FrontendOptions {
        features: features_with(offloads),
        ..Default::default()
    };
    let mut g = guest_with(&nf, opts);
    let mark = nf.log_mark();
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    let wanted = OFFLOAD_BITS
        & offloads
        & !(VIRTIO_NET_F_GUEST_ECN
            | VIRTIO_NET_F_GUEST_UFO
            | VIRTIO_NET_F_HOST_ECN
            | VIRTIO_NET_F_HOST_UFO);
    assert_eq!(
        g.dev.fe.acked_features & OFFLOAD_BITS,
        wanted,
        "netfence offers CSUM, GUEST_CSUM and TSO4/6 both ways, nothing else"
    );

    // TCP, 1 MiB each way, byte-exact.
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let got = g
        .tcp_transfer(h, &up, true, deadline(LONG))
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(m) = mismatch(&got, &down) {
        panic!("downloaded bytes differ: {m}");
    }
    let (uploaded, written) = bulk.join_polling(&mut g, SHORT).unwrap();
    assert_eq!(written, Ok(()), "the server's download");
    match uploaded {
        Ok(None) => {}
        Ok(Some(m)) => panic!("uploaded bytes differ: {m}"),
        Err(e) => panic!("server: {e}"),
    }

    // UDP both ways, and one datagram with a partial checksum when the guest may send it.
    let u = g.udp_bind(40007);
    for (i, len) in [1usize, 512, 1472].into_iter().enumerate() {
        let msg = pattern(len, 30 + i as u64);
        g.udp_send(u, PUBLIC_IP, 7, &msg);
        let (back, _) = g
            .udp_recv(u, deadline(SHORT))
            .unwrap_or_else(|| panic!("no UDP echo of {len} bytes"));
        assert!(back == msg, "{len}-byte echo differs");
    }
    if csum {
        let gw = gateway_mac(&mut g);
        let (src, dst) = (IpAddr::V4(GUEST_IP), IpAddr::V4(PUBLIC_IP));
        let msg = pattern(1000, 40);
        let mut f = frames::udp_frame(g.mac, gw, src, dst, 40007, 7, &msg);
        let (csum_start, _) = make_partial(&mut f, src, dst, IpProtocol::Udp);
        let hdr = NetHdr {
            flags: NET_HDR_F_NEEDS_CSUM,
            csum_start,
            csum_offset: 6,
            ..NetHdr::default()
        };
        assert!(g.dev.fe.try_send_frame_with(&hdr, &f));
        let (back, _) = g
            .udp_recv(u, deadline(SHORT))
            .expect("the datagram with a partial checksum was not echoed");
        assert!(back == msg, "partial-checksum datagram differs");
    }

    // A TSO segment with a partial checksum, by hand.
    if host_tso {
        send_tso_segment(&mut g, &tso_payload);
        match tso_sink.join_polling(&mut g, SHORT).unwrap() {
            Ok(None) => {}
            Ok(Some(m)) => panic!("the TSO segment's bytes differ: {m}"),
            Err(e) => panic!("TSO sink: {e}"),
        }
    }

    // What reached the guest.
    let st = g.dev.fe.stats.clone();
    if guest_tso {
        assert!(
            st.rx_nonzero_gso > 0 && st.rx_largest_frame > 1514,
            "no large segment to a guest that acked GUEST_TSO: {st:?}"
        );
        assert!(
            st.rx_largest_gso_size > 0 && st.rx_largest_gso_size <= 1460,
            "gso_size {} is not an MSS of MTU 1500",
            st.rx_largest_gso_size
        );
    } else {
        assert_eq!(st.rx_nonzero_gso, 0, "{st:?}");
        assert!(st.rx_largest_frame <= 1514, "{st:?}");
    }
    if guest_csum {
        assert!(st.rx_needs_csum > 0, "GUEST_CSUM acked but unused: {st:?}");
    } else {
        assert_eq!(st.rx_needs_csum, 0, "{st:?}");
    }

    eprintln!("offloads {offloads:#x}: {st:?}");
    // Six bad headers: counted drops, and the link carries on.
    let gw = gateway_mac(&mut g);
    for (name, hdr, frame) in bad_headers(&g, gw) {
        while !g.dev.fe.try_send_frame_with(&hdr, &frame) {
            assert!(g.dev.fe.wait(Some(deadline(SHORT))), "TX stuck at {name}");
        }
    }
    g.ping(GATEWAY, SHORT).unwrap_or_else(|e| panic!("{e}"));
    let counts = close_and_count(&nf, g, mark);
    let (not_negotiated, bad) = match (csum, host_tso) {
        (false, _) => (6, 0),
        (true, false) => (5, 1),
        (true, true) => (2, 4),
    };
    assert_eq!(
        (
            counts.get("offload-not-negotiated"),
            counts.get("offload-bad-header")
        ),
        (not_negotiated, bad),
        "offload drops\n{}",
        nf.log_text()
    );
    assert_eq!(counts.get("bad-checksum"), 0, "a partial checksum verified");
}

#[test]
fn offloads_none() {
    matrix_case(0);
}

#[test]
fn offloads_checksum_only() {
    matrix_case(VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM);
}

#[test]
fn offloads_tso_both_ways() {
    matrix_case(
        VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6,
    );
}

#[test]
fn offloads_all_that_cloud_hypervisor_offers() {
    matrix_case(OFFLOAD_BITS);
}
