//! UDP through netfence: echo via a mapped documentation address and via the gateway alias.

mod common;

use std::sync::atomic::Ordering;

use common::process::close_and_count;
use common::servers::*;
use common::*;
use std::net::IpAddr;
use std::time::Instant;

use smoltcp::wire::{IpAddress, IpEndpoint};

#[test]
fn udp_echo_via_mapped_address() {
    let echo = UdpEchoServer::start();
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:7=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_up(&nf);
    let h = g.udp_bind(40007);
    // Sizes up to the largest unfragmented datagram at MTU 1500.
    for (i, len) in [1usize, 64, 512, 1000, 1472].into_iter().enumerate() {
        let msg = pattern(len, i as u64);
        g.udp_send(h, PUBLIC_IP, 7, &msg);
        let (back, from) = g
            .udp_recv(h, deadline(SHORT))
            .unwrap_or_else(|| panic!("no UDP echo for a {len}-byte datagram"));
        assert_eq!(
            from,
            IpEndpoint::new(IpAddress::Ipv4(PUBLIC_IP), 7),
            "reply source must be the guest-visible address"
        );
        assert!(back == msg, "{len}-byte echo differs");
    }
    assert_eq!(echo.received.load(Ordering::SeqCst), 5);
    let d = nf
        .wait_for_decision(&format!("{PUBLIC_IP}:7"), SHORT)
        .expect("decision logged");
    assert_eq!(d.action, "allow", "{}", d.line);
}

#[test]
fn udp_echo_many_datagrams_one_flow() {
    let echo = UdpEchoServer::start();
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:9=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_up(&nf);
    let h = g.udp_bind(40009);
    let mut got = 0;
    for i in 0..200u32 {
        g.udp_send(h, PUBLIC_IP, 9, &i.to_be_bytes());
        let (back, _) = g
            .udp_recv(h, deadline(SHORT))
            .unwrap_or_else(|| panic!("datagram {i} not echoed"));
        assert_eq!(back, i.to_be_bytes());
        got += 1;
    }
    assert_eq!(got, 200);
    // One flow, one decision.
    let n = nf
        .decisions()
        .iter()
        .filter(|d| d.dst == format!("{PUBLIC_IP}:9"))
        .count();
    assert_eq!(
        n,
        1,
        "one UDP flow should be decided once:\n{}",
        nf.log_text()
    );
}

#[test]
fn udp_echo_via_gateway_address() {
    let echo = UdpEchoServer::start();
    let nf = Netfence::spawn(&["--policy", "allow-all"]);
    let mut g = guest_up(&nf);
    let h = g.udp_bind(40008);
    g.udp_send(h, GATEWAY, echo.port(), b"hello host");
    let (back, from) = g
        .udp_recv(h, deadline(SHORT))
        .expect("no UDP echo via the gateway");
    assert_eq!(back, b"hello host");
    assert_eq!(from, IpEndpoint::new(IpAddress::Ipv4(GATEWAY), echo.port()));
}

// ---- batching: many datagrams in one TX drain ---------------------------------------------------

/// `--limit NAME=VALUE`.
fn limit(name: &str, value: &str) -> [String; 2] {
    ["--limit".to_string(), format!("{name}={value}")]
}

/// A loopback sink, mapped from `PUBLIC_IP:guest_port`.
fn sink_mapped(guest_port: u16, args: &mut Vec<String>) -> std::net::UdpSocket {
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    args.push("--map".to_string());
    args.push(format!(
        "{PUBLIC_IP}:{guest_port}={}",
        sink.local_addr().unwrap()
    ));
    sink
}

/// A payload that names its flow and place: [flow, seq (4 bytes)] then filler, `len` long.
fn tagged(flow: u8, seq: u32, len: usize) -> Vec<u8> {
    let mut p = vec![flow; len.max(5)];
    p[1..5].copy_from_slice(&seq.to_be_bytes());
    p.truncate(len.max(5));
    p
}

/// Reads `count` datagrams from `sink` (failing after SHORT without one).
fn read_all(sink: &std::net::UdpSocket, count: usize) -> Vec<Vec<u8>> {
    sink.set_read_timeout(Some(SHORT)).unwrap();
    let mut buf = vec![0u8; 65536];
    (0..count)
        .map_while(|_| sink.recv(&mut buf).ok().map(|n| buf[..n].to_vec()))
        .collect()
}

/// The sizes a flow sends in the burst: a run of 64-byte datagrams (one GSO send), one of odd
/// size, a run of 1400-byte ones ended by a shorter one, and single odd ones.
const BURST_SIZES: [usize; 14] = [
    64, 64, 64, 64, 64, 64, 37, 1400, 1400, 1400, 900, 5, 64, 1200,
];

/// Four flows interleave a 56-datagram burst, published at once so that netfence takes it in
/// one TX drain: each sink gets its flow's datagrams complete, in order, at their sizes.
#[test]
fn udp_burst_across_flows_arrives_complete_and_in_order() {
    let mut args = Vec::new();
    let sinks: Vec<_> = (0..4u16)
        .map(|k| sink_mapped(7300 + k, &mut args))
        .collect();
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let mark = nf.log_mark();
    let mut burst = Vec::new();
    let mut expected: Vec<Vec<Vec<u8>>> = vec![Vec::new(); sinks.len()];
    for (seq, &len) in BURST_SIZES.iter().enumerate() {
        for (k, want) in expected.iter_mut().enumerate() {
            let payload = tagged(k as u8, seq as u32, len);
            burst.push(frames::udp_frame(
                g.mac,
                gw,
                GUEST_IP,
                PUBLIC_IP,
                40300 + k as u16,
                7300 + k as u16,
                &payload,
            ));
            want.push(payload);
        }
    }
    g.dev.fe.send_burst(&burst);
    for (k, sink) in sinks.iter().enumerate() {
        let got = read_all(sink, expected[k].len());
        assert_eq!(got.len(), expected[k].len(), "flow {k}: datagrams missing");
        for (i, (got, want)) in got.iter().zip(&expected[k]).enumerate() {
            assert!(
                got == want,
                "flow {k}, datagram {i}: got {} bytes starting {:?}, want {} starting {:?}",
                got.len(),
                &got[..5.min(got.len())],
                want.len(),
                &want[..5]
            );
        }
    }
    let counts = close_and_count(&nf, g, mark);
    assert_eq!(counts.get("udp-send-failed"), 0, "{:?}", counts.0);
    assert_eq!(counts.get("udp-send-would-block"), 0, "{:?}", counts.0);
}

/// In one burst, a flow whose host port is closed gets its port unreachable back to the guest,
/// and the flows beside it lose nothing.
#[test]
fn udp_burst_with_a_closed_sink_spares_the_other_flows() {
    let mut args = Vec::new();
    let open = sink_mapped(7400, &mut args);
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    args.push("--map".to_string());
    args.push(format!("{PUBLIC_IP}:7401={closed}"));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let mark = nf.log_mark();
    let mut want = Vec::new();
    // Two bursts: the first meets the closed port, the second sends after the kernel said so.
    for round in 0..2u32 {
        let mut burst = Vec::new();
        for i in 0..30u32 {
            let seq = round * 30 + i;
            let to_open = tagged(0, seq, 64);
            burst.push(frames::udp_frame(
                g.mac, gw, GUEST_IP, PUBLIC_IP, 40400, 7400, &to_open,
            ));
            want.push(to_open);
            burst.push(frames::udp_frame(
                g.mac,
                gw,
                GUEST_IP,
                PUBLIC_IP,
                40401,
                7401,
                &tagged(1, seq, 64),
            ));
        }
        g.dev.fe.send_burst(&burst);
        assert!(g.dev.fe.wait_tx_drained(deadline(SHORT)));
    }
    let unreachable = g.dev.fe.recv_matching(deadline(SHORT), |f| {
        frames::parse_icmp(f).is_some_and(|i| {
            (i.msg_type, i.code) == (3, 3)
                && i.ip.src == IpAddr::V4(PUBLIC_IP)
                && i.quoted
                    .as_ref()
                    .is_some_and(|q| q.l4.get(2..4) == Some(&7401u16.to_be_bytes()[..]))
        })
    });
    assert!(
        unreachable.is_some(),
        "no port unreachable for the closed sink\n{}",
        nf.log_text()
    );
    let got = read_all(&open, want.len());
    assert_eq!(got, want, "the open flow lost or reordered datagrams");
    let counts = close_and_count(&nf, g, mark);
    assert!(counts.get("udp-port-unreachable") >= 1, "{:?}", counts.0);
}

/// `udp-batch-datagrams` and `udp-batch-bytes`: a burst larger than the batch goes out in
/// several batches, counted, with nothing lost or reordered.
#[test]
fn udp_batch_bounds_are_hit_counted_and_lose_nothing() {
    for (name, value, len, expect_full) in [
        ("udp-batch-datagrams", "8", 64usize, 5u64),
        ("udp-batch-bytes", "4096", 1400, 10),
    ] {
        let mut args = limit(name, value).to_vec();
        let sink = sink_mapped(7500, &mut args);
        let nf = Netfence::spawn(&args);
        let mut g = guest_up(&nf);
        let gw = gateway_mac(&mut g);
        let mark = nf.log_mark();
        let want: Vec<Vec<u8>> = (0..48u32).map(|i| tagged(0, i, len)).collect();
        let burst: Vec<Vec<u8>> = want
            .iter()
            .map(|p| frames::udp_frame(g.mac, gw, GUEST_IP, PUBLIC_IP, 40500, 7500, p))
            .collect();
        g.dev.fe.send_burst(&burst);
        let got = read_all(&sink, want.len());
        assert!(
            got == want,
            "{name}={value}: {} of {} datagrams, or out of order",
            got.len(),
            want.len()
        );
        let counts = close_and_count(&nf, g, mark);
        assert!(
            counts.get("udp-batch-full") >= expect_full,
            "{name}={value}: {:?}",
            counts.0
        );
    }
}

/// Host to guest: a burst of 200 replies (what a default host socket buffer holds) read with recvmmsg reaches a guest that has 8 receive
/// buffers and room for 16 queued frames, complete and in order; nothing is read that the
/// guest's queue could not take (nothing dropped toward the guest).
#[test]
fn udp_reply_burst_reaches_a_small_guest_queue_in_order() {
    const REPLIES: u32 = 200;
    let blaster = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let blaster_addr = blaster.local_addr().unwrap();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        blaster.set_read_timeout(Some(LONG)).unwrap();
        if let Ok((_, peer)) = blaster.recv_from(&mut buf) {
            for i in 0..REPLIES {
                let _ = blaster.send_to(&i.to_be_bytes(), peer);
            }
            let _ = sent_tx.send(());
        }
    });
    let mut args = limit("guest-queue-frames", "16").to_vec();
    args.extend([
        "--map".to_string(),
        format!("{PUBLIC_IP}:7600={blaster_addr}"),
    ]);
    let nf = Netfence::spawn(&args);
    let mut g = guest_with(
        &nf,
        common::frontend::FrontendOptions {
            rx_buffers: Some(8),
            ..Default::default()
        },
    );
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    let gw = gateway_mac(&mut g);
    let mark = nf.log_mark();
    g.dev.fe.send_frame(&frames::udp_frame(
        g.mac, gw, GUEST_IP, PUBLIC_IP, 6600, 7600, b"go",
    ));
    sent_rx
        .recv_timeout(SHORT)
        .expect("the blaster never got the trigger");
    let mut got = Vec::new();
    let end = deadline(LONG);
    while got.len() < REPLIES as usize && Instant::now() < end {
        let Some(f) = g.dev.fe.recv_frame(deadline(SHORT)) else {
            break;
        };
        if let Some(u) = frames::parse_udp(&f).filter(|u| u.dport == 6600) {
            assert!(u.checksums_ok);
            got.push(u32::from_be_bytes(u.payload[..4].try_into().unwrap()));
        }
    }
    let want: Vec<u32> = (0..REPLIES).collect();
    assert!(
        got == want,
        "{} of {REPLIES} replies, first out of place: {:?}\n{}",
        got.len(),
        got.iter().zip(&want).position(|(a, b)| a != b),
        nf.log_text()
    );
    let counts = close_and_count(&nf, g, mark);
    assert_eq!(counts.get("rx-dropped"), 0, "{:?}", counts.0);
}
