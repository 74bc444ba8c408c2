//! Multiqueue (`--queues N`, VIRTIO_NET_F_MQ) through the harness frontend with two queue pairs:
//! what the device offers, flows spread over the pairs byte-exact both ways and answered on the
//! pair that carries them, a flow that moves between TX queues, the gateway's services reached
//! from pair 1, a pair the guest never enables, teardown with both pairs busy, and the bound on
//! frames handed between pairs.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::field;
use common::servers::*;
use common::*;
use vhost::vhost_user::VhostUserFrontend;

fn spawn_mq(extra: &[String]) -> Netfence {
    Netfence::builder()
        .args(&["--queues", "2"])
        .args(extra)
        .spawn()
}

fn two_pairs() -> FrontendOptions {
    FrontendOptions {
        pairs: 2,
        ..FrontendOptions::default()
    }
}

/// The guest-side port of an IPv4 TCP/UDP frame: its source (`to_host`) or destination port.
fn guest_port(frame: &[u8], to_host: bool) -> Option<u16> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ihl = usize::from(frame.get(14)? & 0x0f) * 4;
    if !matches!(frame.get(23)?, 6 | 17) {
        return None;
    }
    let at = 14 + ihl + if to_host { 0 } else { 2 };
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

/// Records, per guest port, the pairs its frames arrived on.
fn observe_rx(g: &mut Guest) -> Arc<Mutex<HashMap<u16, HashSet<usize>>>> {
    let seen = Arc::new(Mutex::new(HashMap::<u16, HashSet<usize>>::new()));
    let s = seen.clone();
    g.fe().rx_observer = Some(Box::new(move |pair, frame| {
        if let Some(port) = guest_port(frame, false) {
            s.lock().unwrap().entry(port).or_default().insert(pair);
        }
    }));
    seen
}

/// What each pair's link counted ("link closed" lines after `mark`, by pair).
fn counts_by_pair(nf: &Netfence, mark: usize, pairs: usize) -> Vec<HashMap<String, u64>> {
    let mut out = vec![HashMap::new(); pairs];
    let mut found = 0;
    let mut from = mark;
    while found < pairs {
        let line = nf
            .wait_for_log_after(from, "link closed", SHORT)
            .unwrap_or_else(|| panic!("{found} of {pairs} 'link closed' lines\n{}", nf.log_text()));
        from = nf
            .log_lines()
            .iter()
            .position(|l| *l == line)
            .map_or(from + 1, |i| i.max(from) + 1);
        let pair: usize = field(&line, "pair")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        for kv in field(&line, "drops").unwrap_or_default().split(',') {
            if let Some((k, v)) = kv.split_once('=') {
                out[pair].insert(k.to_string(), v.parse().unwrap_or(0));
            }
        }
        found += 1;
    }
    out
}

fn get(counts: &HashMap<String, u64>, name: &str) -> u64 {
    counts.get(name).copied().unwrap_or(0)
}

#[test]
fn queues_above_one_are_offered_as_mq_pairs() {
    let nf = spawn_mq(&[]);
    let fe = Frontend::connect(nf.socket_path(), two_pairs()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        fe.queue_num,
        Some(4),
        "GET_QUEUE_NUM counts queues: 2 pairs"
    );
    assert_eq!(fe.config.unwrap().max_virtqueue_pairs, 2);
    let mq = 1u64 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ;
    let ctrl = 1u64 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
    assert_eq!(fe.backend_features & (mq | ctrl), mq | ctrl);
    drop(fe);
    // One pair (the default): no MQ, no control queue, one pair in the config space.
    let nf1 = Netfence::spawn::<&str>(&[]);
    let fe = Frontend::connect_default(nf1.socket_path());
    assert_eq!(fe.queue_num, Some(2));
    assert_eq!(fe.config.unwrap().max_virtqueue_pairs, 1);
    assert_eq!(fe.backend_features & (mq | ctrl), 0);
}

/// 8 TCP flows (source ports alternate between the pairs) and 8 UDP sessions, byte-exact both
/// ways; every flow's frames to the guest come on the pair that carried it, and no frame had
/// to be handed between pairs.
#[test]
fn mq_flows_spread_byte_exact() {
    let echo = TcpEchoServer::start();
    let udp = UdpEchoServer::start();
    let nf = spawn_mq(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", echo.port()),
        "--map".to_string(),
        format!("{PUBLIC_IP}:7=127.0.0.1:{}", udp.port()),
    ]);
    let mut g = guest_with(&nf, two_pairs());
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    // Frames of a flow go out on the pair of its source port's parity (DHCP, from port 68,
    // and ARP go on pair 0).
    g.fe().tx_steer = Some(Box::new(|f| {
        guest_port(f, true).map_or(0, |p| usize::from(p % 2))
    }));
    let seen = observe_rx(&mut g);
    let mark = nf.log_mark();
    let mut flows = Vec::new();
    for i in 0..8u64 {
        let h = g
            .tcp_connect(PUBLIC_IP, 80, SHORT)
            .unwrap_or_else(|e| panic!("connect {i}: {e:?}"));
        flows.push((h, pattern(256 << 10, i)));
    }
    let ports: Vec<u16> = flows
        .iter()
        .map(|(h, _)| g.tcp(*h).local_endpoint().unwrap().port)
        .collect();
    assert!(ports.iter().any(|p| p % 2 == 0) && ports.iter().any(|p| p % 2 == 1));
    for (i, (h, data)) in flows.iter().enumerate() {
        let got = g
            .tcp_transfer(*h, data, true, deadline(LONG))
            .unwrap_or_else(|e| panic!("flow {i}: {e}"));
        assert!(got == *data, "flow {i}: echo differs ({} bytes)", got.len());
    }
    let mut udp_ports = Vec::new();
    for i in 0..8u16 {
        let port = 40000 + i;
        let h = g.udp_bind(port);
        let msg = pattern(1000 + usize::from(i), u64::from(i));
        g.udp_send(h, PUBLIC_IP, 7, &msg);
        let (back, _) = g
            .udp_recv(h, deadline(SHORT))
            .unwrap_or_else(|| panic!("UDP session {i}: no echo"));
        assert_eq!(back, msg, "UDP session {i}");
        udp_ports.push(port);
    }
    let tx = g.fe().stats.tx_frames_by_pair.clone();
    let rx = g.fe().stats.rx_frames_by_pair.clone();
    assert!(tx.iter().all(|&n| n > 100), "TX frames by pair {tx:?}");
    assert!(rx.iter().all(|&n| n > 100), "RX frames by pair {rx:?}");
    {
        let seen = seen.lock().unwrap();
        for port in ports.iter().chain(&udp_ports) {
            let pairs = seen.get(port).cloned().unwrap_or_default();
            assert_eq!(
                pairs,
                HashSet::from([usize::from(port % 2)]),
                "guest port {port}: answered on pairs {pairs:?}"
            );
        }
    }
    drop(g);
    let counts = counts_by_pair(&nf, mark, 2);
    for (pair, c) in counts.iter().enumerate() {
        assert_eq!(get(c, "handoff"), 0, "pair {pair}: {c:?}");
        assert_eq!(get(c, "handoff-full"), 0, "pair {pair}: {c:?}");
    }
}

/// A flow opened on pair 0 whose frames then go out on pair 1 (and back), as a Linux flow does
/// when its sender moves to another CPU between bursts: byte-exact, answered on pair 0 (its
/// owner) only, with the frames from pair 1 handed over.
#[test]
fn mq_flow_switches_queue() {
    let echo = TcpEchoServer::start();
    let nf = spawn_mq(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_with(&nf, two_pairs());
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    let queue = Arc::new(AtomicUsize::new(0));
    let q = queue.clone();
    g.fe().tx_steer = Some(Box::new(move |_| q.load(Ordering::SeqCst)));
    let seen = observe_rx(&mut g);
    let mark = nf.log_mark();
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let port = g.tcp(h).local_endpoint().unwrap().port;
    for (round, pair) in [0usize, 1, 0, 1].into_iter().enumerate() {
        queue.store(pair, Ordering::SeqCst);
        let msg = pattern(200 << 10, round as u64);
        g.tcp_send_all(h, &msg, deadline(LONG))
            .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        let back = g
            .tcp_recv_exact(h, msg.len(), deadline(LONG))
            .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        assert!(back == msg, "round {round} on pair {pair}: echo differs");
    }
    g.tcp_shutdown_write(h);
    let (rest, fin) = g.tcp_recv_to_eof(h, deadline(SHORT));
    assert!(
        rest.is_empty() && fin,
        "clean close: {} bytes, fin {fin}",
        rest.len()
    );
    assert_eq!(
        seen.lock().unwrap().get(&port).cloned().unwrap_or_default(),
        HashSet::from([0]),
        "the flow's owner (pair 0) answers it"
    );
    drop(g);
    let counts = counts_by_pair(&nf, mark, 2);
    assert!(
        get(&counts[1], "handoff") > 10,
        "pair 1 handed the flow's frames over: {counts:?}"
    );
    assert_eq!(get(&counts[0], "handoff"), 0, "{counts:?}");
    assert_eq!(get(&counts[1], "handoff-full"), 0, "{counts:?}");
    assert_eq!(
        get(&counts[0], "tcp-denied") + get(&counts[1], "tcp-denied"),
        0
    );
}

/// Everything the guest sends goes out on pair 1: DHCP, ARP and a ping to the gateway are
/// served (by pair 0, answered on pair 0), and a TCP flow opened there is pair 1's own,
/// answered on pair 1 (its stack knows the guest's MAC without having seen an ARP).
#[test]
fn mq_gateway_services_from_queue1() {
    let echo = TcpEchoServer::start();
    let nf = spawn_mq(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_with(&nf, two_pairs());
    g.fe().tx_steer = Some(Box::new(|_| 1));
    let seen = observe_rx(&mut g);
    let lease = g
        .dhcp(SHORT * 2)
        .unwrap_or_else(|e| panic!("DHCP from pair 1: {e}"));
    assert_eq!(lease.address.address(), GUEST_IP);
    assert!(gateway_mac(&mut g) != [0; 6]);
    g.ping(GATEWAY, SHORT)
        .unwrap_or_else(|e| panic!("ping gateway from pair 1: {e}"));
    let rx_before = g.fe().stats.rx_frames_by_pair.clone();
    assert!(
        rx_before[0] >= 3 && rx_before[1] == 0,
        "gateway answers on pair 0: {rx_before:?}"
    );
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("TCP from pair 1: {e:?}"));
    let port = g.tcp(h).local_endpoint().unwrap().port;
    let msg = pattern(64 << 10, 9);
    let back = g
        .tcp_transfer(h, &msg, true, deadline(LONG))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(back == msg);
    assert_eq!(
        seen.lock().unwrap().get(&port).cloned().unwrap_or_default(),
        HashSet::from([1])
    );
}

/// The guest uses one pair of the two offered (pair 1's rings are set up but never enabled,
/// as QEMU leaves them until the guest asks for more pairs): everything works on pair 0.
#[test]
fn mq_pair1_never_enabled() {
    let echo = TcpEchoServer::start();
    let nf = spawn_mq(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_with(
        &nf,
        FrontendOptions {
            enabled_pairs: Some(1),
            ..two_pairs()
        },
    );
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..3u64 {
        let h = g
            .tcp_connect(PUBLIC_IP, 80, SHORT)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let msg = pattern(100 << 10, i);
        let back = g
            .tcp_transfer(h, &msg, true, deadline(LONG))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(back == msg);
    }
    assert_eq!(g.fe().stats.rx_frames_by_pair[1], 0);
}

/// The VMM leaves while flows on both pairs are moving data: both workers stop, and the
/// next VMM is served.
#[test]
fn mq_teardown_in_flight_then_next_vmm() {
    let echo = TcpEchoServer::start();
    let nf = spawn_mq(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_with(&nf, two_pairs());
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    g.fe().tx_steer = Some(Box::new(|f| {
        guest_port(f, true).map_or(0, |p| usize::from(p % 2))
    }));
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(
            g.tcp_connect(PUBLIC_IP, 80, SHORT)
                .unwrap_or_else(|e| panic!("{e:?}")),
        );
    }
    let data = pattern(4 << 20, 3);
    for h in &handles {
        let _ = g.tcp(*h).send_slice(&data);
    }
    g.run_for(Duration::from_millis(200));
    let rx = g.fe().stats.rx_frames_by_pair.clone();
    assert!(rx.iter().all(|&n| n > 0), "both pairs busy: {rx:?}");
    let mark = nf.log_mark();
    drop(g);
    counts_by_pair(&nf, mark, 2);
    assert!(
        nf.wait_for_log_after(mark, "VMM disconnected", SHORT)
            .is_some(),
        "{}",
        nf.log_text()
    );
    // The next VMM gets fresh links on both pairs.
    let mut g = guest_with(&nf, two_pairs());
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    g.fe().tx_steer = Some(Box::new(|_| 1));
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let msg = pattern(64 << 10, 4);
    let back = g
        .tcp_transfer(h, &msg, true, deadline(LONG))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(back == msg);
    assert!(!nf.log_text().contains("did not stop"));
}

/// `handoff-frames` bounds the frames one pair has handed to another and not yet served: a
/// burst of a pair-0 UDP flow's datagrams sent on pair 1 overflows an inbox of 1, and every
/// datagram is either handed over or counted as dropped.
#[test]
fn mq_handoff_bound_hit_and_counted() {
    let udp = UdpEchoServer::start();
    let nf = spawn_mq(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:7=127.0.0.1:{}", udp.port()),
        "--limit".to_string(),
        "handoff-frames=1".to_string(),
    ]);
    let mut g = guest_with(&nf, two_pairs());
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    let mark = nf.log_mark();
    // The session opens on pair 0.
    let h = g.udp_bind(41000);
    g.udp_send(h, PUBLIC_IP, 7, b"open");
    g.udp_recv(h, deadline(SHORT))
        .expect("echo of the first datagram");
    // Then a burst of its datagrams, all in one TX drain of pair 1.
    const BURST: u64 = 200;
    let gw_mac = gateway_mac(&mut g);
    let frame = common::frames::udp_frame(
        g.fe().guest_mac(),
        gw_mac,
        GUEST_IP,
        PUBLIC_IP,
        41000,
        7,
        b"burst",
    );
    let frames: Vec<Vec<u8>> = (0..BURST).map(|_| frame.clone()).collect();
    g.fe().with_pair(1, |fe| fe.send_burst(&frames));
    g.run_for(Duration::from_millis(300));
    drop(g);
    let counts = counts_by_pair(&nf, mark, 2);
    let handed = get(&counts[1], "handoff");
    let full = get(&counts[1], "handoff-full");
    assert_eq!(handed + full, BURST, "{counts:?}");
    assert!(
        full > 0,
        "an inbox of 1 overflows under a burst of {BURST}: {counts:?}"
    );
}

/// `tcp-flows` is a budget of the VM, not of each pair: with a limit of 4, three flows opened
/// on pair 0 and three on pair 1 make exactly 4.
#[test]
fn mq_flow_budget_is_per_vm() {
    let echo = TcpEchoServer::start();
    let nf = spawn_mq(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", echo.port()),
        "--limit".to_string(),
        "tcp-flows=4".to_string(),
    ]);
    let mut g = guest_with(&nf, two_pairs());
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    let queue = Arc::new(AtomicUsize::new(0));
    let q = queue.clone();
    g.fe().tx_steer = Some(Box::new(move |_| q.load(Ordering::SeqCst)));
    let mut open = Vec::new();
    let mut refused = 0;
    for pair in [0usize, 0, 0, 1, 1, 1] {
        queue.store(pair, Ordering::SeqCst);
        match g.tcp_connect(PUBLIC_IP, 80, Duration::from_millis(1500)) {
            Ok(h) => open.push((pair, h)),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(open.len(), 4, "opened {open:?}, refused {refused}");
    assert_eq!(refused, 2);
    let denied: Vec<_> = nf
        .decisions()
        .into_iter()
        .filter(|d| d.action == "deny")
        .collect();
    assert!(
        denied.iter().all(|d| d.line.contains("tcp-flows")),
        "{denied:?}"
    );
    // The flows open on both pairs carry data.
    for (pair, h) in open {
        queue.store(pair, Ordering::SeqCst);
        let msg = pattern(10_000, pair as u64);
        let back = g
            .tcp_transfer(h, &msg, true, deadline(SHORT))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(back == msg);
    }
}

/// The guest stops using pair 1 (QEMU after `ethtool -L eth0 combined 1`: SET_VRING_ENABLE 0
/// on rings 2 and 3, which stay started): pair 1's flows are reset (their host connections
/// closed) and their keys released; new flows open on pair 0.
#[test]
fn mq_pair1_disabled_midstream() {
    let server = OneShotServer::start(|mut s| {
        let mut buf = vec![0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return "eof",
                Err(_) => return "reset",
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return "reset";
                    }
                }
            }
        }
    });
    let echo = TcpEchoServer::start();
    let nf = spawn_mq(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", server.port()),
        "--map".to_string(),
        format!("{PUBLIC_IP}:81=127.0.0.1:{}", echo.port()),
    ]);
    let mut g = guest_with(&nf, two_pairs());
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    let queue = Arc::new(AtomicUsize::new(1));
    let q = queue.clone();
    g.fe().tx_steer = Some(Box::new(move |_| q.load(Ordering::SeqCst)));
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let msg = pattern(10_000, 1);
    g.tcp_send_all(h, &msg, deadline(SHORT)).unwrap();
    assert!(g.tcp_recv_exact(h, msg.len(), deadline(SHORT)).unwrap() == msg);
    let mark = nf.log_mark();
    for q in [2, 3] {
        g.fe().vu.set_vring_enable(q, false).unwrap();
    }
    queue.store(0, Ordering::SeqCst);
    nf.wait_for_log_after(mark, "stopped using this queue pair", SHORT)
        .unwrap_or_else(|| panic!("pair 1 not dropped\n{}", nf.log_text()));
    // Its host connection was closed.
    let ended = server
        .join_polling(&mut g, SHORT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ended == "reset" || ended == "eof", "{ended}");
    g.tcp(h).abort();
    g.poll();
    // A new flow, from pair 0, works.
    let h = g
        .tcp_connect(PUBLIC_IP, 81, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let back = g
        .tcp_transfer(h, &msg, true, deadline(SHORT))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(back == msg);
}

/// `--queues` outside 1-16 is a bad argument: exit 2, naming the flag and the accepted range.
#[test]
fn queues_out_of_range_are_refused() {
    for bad in ["0", "17", "two"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_netfence"))
            .args(["run", "--socket", "/nonexistent/nf.sock", "--queues", bad])
            .output()
            .expect("run netfence");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--queues {bad}: {stderr}");
        assert!(
            stderr.contains("--queues") && stderr.contains("1-16"),
            "--queues {bad}: {stderr}"
        );
    }
}
