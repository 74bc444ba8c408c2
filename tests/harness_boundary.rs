//! The boundary, tried as an attacker in the guest would: spoofed sources, `none`, fragments
//! that try to hide or rewrite a transport header, and every bound on guest-driven state
//! (flows per kind, the denied memo, timeouts, the guest queue) shrunk with `--limit` and hit.
//!
//! What netfence counted is read from the one "link closed" line it logs when the VMM leaves
//! (`close_and_count`).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::frames;
use common::frames6;
use common::process::{close_and_count, field};
use common::servers::*;
use common::*;
use smoltcp::socket::tcp::State;

/// A second "public" destination (documentation range), mapped to loopback where used.
const PUBLIC_IP2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 8);

fn limit(name: &str, value: &str) -> [String; 2] {
    ["--limit".to_string(), format!("{name}={value}")]
}

fn map_arg(guest: SocketAddr, host: SocketAddr) -> [String; 2] {
    let guest = match guest {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    ["--map".to_string(), format!("{guest}={host}")]
}

/// Every frame that reached the guest within `watch` and satisfies `pred`.
fn frames_within(g: &mut Guest, watch: Duration, pred: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
    g.raw_collect(deadline(watch))
        .into_iter()
        .filter(|f| pred(f))
        .collect()
}

// ---- source validation and `none` --------------------------------------------------------------

/// Frames whose source IP or MAC is not the guest's open no flow, reach no host socket, are
/// not answered and are counted; the guest's own SYN beside them is served.
#[test]
fn spoofed_sources_open_no_flow() {
    let trip4 = Tripwire::start();
    let trip6 = Tripwire::start6();
    let mut args = trip4.map_args(&[PUBLIC_IP]);
    args.extend(trip6.map_args_ip(&[IpAddr::V6(PUBLIC6)]));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up6(&nf);
    let gw = gateway_mac(&mut g);
    let me = g.mac;
    let mark = nf.log_mark();
    let other_mac = [0x02, 0, 0, 0, 0, 0x99];
    let spoofed: Vec<(&str, Vec<u8>)> = vec![
        (
            "SYN from another IPv4 address",
            frames::tcp_syn_frame(me, gw, Ipv4Addr::new(10, 9, 9, 9), PUBLIC_IP, 40001, 80, 1),
        ),
        (
            "SYN from the gateway's address",
            frames::tcp_syn_frame(me, gw, GATEWAY, PUBLIC_IP, 40002, 80, 1),
        ),
        (
            "SYN from the next slot's guest",
            frames::tcp_syn_frame(
                me,
                gw,
                Ipv4Addr::new(172, 16, 0, 6),
                PUBLIC_IP,
                40003,
                80,
                1,
            ),
        ),
        (
            "SYN from the guest's IP with another MAC",
            frames::tcp_syn_frame(other_mac, gw, GUEST_IP, PUBLIC_IP, 40004, 80, 1),
        ),
        (
            "SYN from an IPv6 address outside the guest's /64",
            frames::tcp_syn_frame(
                me,
                gw,
                "2001:db8::66".parse::<Ipv6Addr>().unwrap(),
                PUBLIC6,
                40005,
                80,
                1,
            ),
        ),
        (
            "SYN from the gateway's IPv6 address",
            frames::tcp_syn_frame(me, gw, GATEWAY6, PUBLIC6, 40006, 80, 1),
        ),
        (
            "UDP from another IPv4 address",
            frames::udp_frame(
                me,
                gw,
                Ipv4Addr::new(10, 9, 9, 9),
                PUBLIC_IP,
                40007,
                9,
                b"x",
            ),
        ),
        (
            "ping from another IPv4 address",
            frames::icmp_echo_frame(me, gw, Ipv4Addr::new(10, 9, 9, 9), PUBLIC_IP, 7, 1, b"x"),
        ),
    ];
    for (_, f) in &spoofed {
        g.dev.fe.send_frame(f);
    }
    let answered = frames_within(&mut g, SILENCE, |f| {
        frames::parse_tcp(f).is_some_and(|t| (40001..=40006).contains(&t.dport))
            || frames::parse_udp(f).is_some_and(|u| u.dport == 40007)
            || frames::parse_icmp(f).is_some_and(|i| i.ident == 7)
    });
    assert!(
        answered.is_empty(),
        "spoofed frames were answered: {:?}",
        answered
            .iter()
            .map(|f| frames::describe(f))
            .collect::<Vec<_>>()
    );
    assert_eq!(trip4.hits(), (0, 0), "a spoofed flow reached the host");
    assert_eq!(trip6.hits(), (0, 0), "a spoofed flow reached the host");
    let decided: Vec<String> = nf
        .decisions()
        .into_iter()
        .filter(|d| d.line.contains("src=10.9.9.9") || d.line.contains("2001:db8::66"))
        .map(|d| d.line)
        .collect();
    assert!(decided.is_empty(), "spoofed flows were judged: {decided:?}");
    // The guest's own SYN beside them is served (so the silence above is not a dead link).
    let seen = common::denied::raw_syn(&mut g, gw, GUEST_IP, PUBLIC_IP, 80, SHORT);
    assert!(
        seen.first().is_some_and(|t| t.flags.syn && t.flags.ack),
        "the guest's own SYN got {seen:?}"
    );
    let counts = close_and_count(&nf, g, mark);
    assert!(counts.get("spoofed-source-ip") >= 7, "{:?}", counts.0);
    assert!(counts.get("spoofed-source-mac") >= 1, "{:?}", counts.0);
}

/// `none` is no network at all: no DHCP, no ARP, no router advertisement, no ping of the
/// gateway.
#[test]
fn network_none_answers_nothing() {
    let nf = Netfence::spawn(&["--policy", "none"]);
    let mut g = guest(&nf);
    let mark = nf.log_mark();
    assert!(g.dhcp(SILENCE).is_err(), "DHCP answered under none");
    assert!(
        g.arp_raw(GATEWAY, SILENCE).is_none(),
        "ARP answered under none"
    );
    let me = g.mac;
    let rs = frames6::router_solicit_frame(me, g.link_local6());
    let ra = g.raw_exchange(&rs, deadline(SILENCE), |f| {
        frames6::parse_router_advert(f).is_some()
    });
    assert!(ra.is_none(), "router advertisement under none");
    let ping = frames::icmp_echo_frame(me, [0xff; 6], GUEST_IP, GATEWAY, 9, 1, b"x");
    let reply = g.raw_exchange(&ping, deadline(SILENCE), |f| {
        frames::parse_icmp(f).is_some_and(|i| i.ident == 9)
    });
    assert!(reply.is_none(), "the gateway answered a ping under none");
    let counts = close_and_count(&nf, g, mark);
    assert!(counts.get("network-none") >= 4, "{:?}", counts.0);
}

// ---- fragments --------------------------------------------------------------------------------

fn recv_datagram(sock: &UdpSocket, timeout: Duration) -> Option<Vec<u8>> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = vec![0u8; 65536];
    match sock.recv(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(_) => None,
    }
}

/// A UDP datagram larger than the MTU, fragmented by the guest (sent last fragment first),
/// arrives whole at the mapped host socket, over IPv4 and IPv6; fragments whose pieces overlap
/// (a second first fragment rewriting the destination port) are dropped whole; and a fragmented
/// datagram to a denied port is judged by its port and denied.
#[test]
fn fragmented_datagrams_arrive_whole_and_are_judged_whole() {
    let sink4 = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sink6 = UdpSocket::bind("[::1]:0").unwrap();
    let trip = Tripwire::start();
    // Only port 7000 is allowed (rules without --policy: default egress deny).
    let mut args = vec![
        "--net-rule".to_string(),
        format!("allow@{PUBLIC_IP}:udp:7000"),
        "--net-rule".to_string(),
        format!("allow@[{PUBLIC6}]:udp:7000"),
    ];
    args.extend(map_arg(
        SocketAddr::new(PUBLIC_IP.into(), 7000),
        sink4.local_addr().unwrap(),
    ));
    args.extend(map_arg(
        SocketAddr::new(PUBLIC6.into(), 7000),
        sink6.local_addr().unwrap(),
    ));
    args.extend(map_arg(
        SocketAddr::new(PUBLIC_IP.into(), 7001),
        SocketAddr::new(trip.ip, trip.port),
    ));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up6(&nf);
    let gw = gateway_mac(&mut g);
    let me = g.mac;
    let mark = nf.log_mark();
    let payload = pattern(3000, 41);

    for (src, dst, sink, ident) in [
        (
            IpAddr::V4(GUEST_IP),
            IpAddr::V4(PUBLIC_IP),
            &sink4,
            0x1111u32,
        ),
        (IpAddr::V6(GUEST6), IpAddr::V6(PUBLIC6), &sink6, 0x2222),
    ] {
        let l4 = frames::udp_datagram(src, dst, 5000, 7000, &payload);
        let mut pieces = frames::even_pieces(l4.len(), 1200);
        pieces.reverse();
        for f in frames::fragment_frames(me, gw, src, dst, frames::PROTO_UDP, &l4, ident, &pieces) {
            g.dev.fe.send_frame(&f);
        }
        let got = recv_datagram(sink, SHORT)
            .unwrap_or_else(|| panic!("the {src} datagram never arrived\n{}", nf.log_text()));
        if let Some(m) = mismatch(&got, &payload) {
            panic!("the reassembled {src} datagram differs: {m}");
        }
    }

    // Overlap: the first 16 bytes from a datagram to 7000, then a second "first fragment" to
    // the denied 7001 covering the same bytes, then the rest.
    let to_7000 = frames::udp_datagram(GUEST_IP, PUBLIC_IP, 5001, 7000, &payload);
    let to_7001 = frames::udp_datagram(GUEST_IP, PUBLIC_IP, 5001, 7001, &payload);
    let ident = 0x3333;
    // Pieces of one IPv4 UDP datagram from the guest to PUBLIC_IP, all with `ident`.
    let udp4_pieces = |l4: &[u8], pieces: &[(usize, usize)]| {
        frames::fragment_frames(
            me,
            gw,
            GUEST_IP,
            PUBLIC_IP,
            frames::PROTO_UDP,
            l4,
            ident,
            pieces,
        )
    };
    let first = udp4_pieces(&to_7000, &[(0, 16)]);
    let rewrite = udp4_pieces(&to_7001, &[(0, 8)]);
    let rest = udp4_pieces(&to_7000, &[(16, to_7000.len() - 16)]);
    for f in first.iter().chain(&rewrite).chain(&rest) {
        g.dev.fe.send_frame(f);
    }

    // A fragmented datagram to the denied port: judged as a whole, denied.
    let l4 = frames::udp_datagram(GUEST_IP, PUBLIC_IP, 5002, 7001, &payload);
    for f in frames::fragment_frames(
        me,
        gw,
        GUEST_IP,
        PUBLIC_IP,
        frames::PROTO_UDP,
        &l4,
        0x4444,
        &frames::even_pieces(l4.len(), 1200),
    ) {
        g.dev.fe.send_frame(&f);
    }
    let d = nf
        .wait_for_decision(&format!("{PUBLIC_IP}:7001"), SHORT)
        .unwrap_or_else(|| panic!("no decision for the fragmented datagram\n{}", nf.log_text()));
    assert_eq!(d.action, "deny", "{}", d.line);
    assert!(
        recv_datagram(&sink4, SILENCE).is_none(),
        "the overlapping fragments were delivered"
    );
    assert_eq!(trip.hits(), (0, 0), "a denied datagram reached the host");
    let counts = close_and_count(&nf, g, mark);
    assert!(counts.get("fragments-reassembled") >= 3, "{:?}", counts.0);
    assert!(counts.get("fragment-overlap") >= 1, "{:?}", counts.0);
}

// ---- UDP ---------------------------------------------------------------------------------------

/// A UDP session whose host port is closed: the kernel's port unreachable comes back to the
/// guest as one, quoting the guest's datagram (IPv4 and IPv6).
#[test]
fn udp_port_unreachable_is_relayed() {
    let closed4 = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let closed6 = UdpSocket::bind("[::1]:0").unwrap().local_addr().unwrap();
    let mut args = Vec::new();
    args.extend(map_arg(SocketAddr::new(PUBLIC_IP.into(), 7100), closed4));
    args.extend(map_arg(SocketAddr::new(PUBLIC6.into(), 7100), closed6));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up6(&nf);
    let gw = gateway_mac(&mut g);
    let me = g.mac;
    for (src, dst, unreachable) in [
        (IpAddr::V4(GUEST_IP), IpAddr::V4(PUBLIC_IP), (3u8, 3u8)),
        (IpAddr::V6(GUEST6), IpAddr::V6(PUBLIC6), (1, 4)),
    ] {
        // The first datagram's ICMP error reaches the host socket; the next send or read
        // reports it. Send twice so a reply is due either way.
        let mut answer = None;
        for sport in [6001u16, 6001] {
            let f = frames::udp_frame(me, gw, src, dst, sport, 7100, b"anyone?");
            answer = g.raw_exchange(&f, deadline(SHORT), |f| {
                frames::parse_icmp(f).is_some_and(|i| {
                    (i.msg_type, i.code) == unreachable
                        && i.quoted.as_ref().is_some_and(|q| q.dst == dst)
                })
            });
            if answer.is_some() {
                break;
            }
        }
        let answer =
            answer.unwrap_or_else(|| panic!("no port unreachable for {dst}\n{}", nf.log_text()));
        let icmp = frames::parse_icmp(&answer).unwrap();
        assert!(icmp.checksums_ok, "{icmp:?}");
        assert_eq!(
            icmp.ip.src, dst,
            "the error comes from the destination the guest used"
        );
        let q = icmp.quoted.unwrap();
        assert_eq!(q.src, src);
        assert_eq!(q.l4.get(2..4), Some(&7100u16.to_be_bytes()[..]));
    }
}

/// Backpressure, not buffers: with room for 16 frames toward the guest and a guest that does
/// not read for a while, 200 replies wait in the host socket and all arrive once it reads.
#[test]
fn udp_replies_wait_in_the_host_socket_while_the_guest_is_slow() {
    const REPLIES: usize = 200;
    let blaster = UdpSocket::bind("127.0.0.1:0").unwrap();
    let blaster_addr = blaster.local_addr().unwrap();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        blaster.set_read_timeout(Some(LONG)).unwrap();
        if let Ok((_, peer)) = blaster.recv_from(&mut buf) {
            for i in 0..REPLIES as u32 {
                let _ = blaster.send_to(&i.to_be_bytes(), peer);
            }
            let _ = sent_tx.send(());
        }
    });
    let mut args = limit("guest-queue-frames", "16").to_vec();
    args.extend(map_arg(
        SocketAddr::new(PUBLIC_IP.into(), 7200),
        blaster_addr,
    ));
    let nf = Netfence::spawn(&args);
    // 8 receive buffers and 16 queued frames: far fewer than the 200 replies.
    let mut g = guest_with(
        &nf,
        FrontendOptions {
            rx_buffers: Some(8),
            ..Default::default()
        },
    );
    g.dhcp(SHORT * 2).unwrap_or_else(|e| panic!("{e}"));
    let gw = gateway_mac(&mut g);
    let h = g.udp_bind(6200);
    let mark = nf.log_mark();
    // The trigger goes out raw, and the guest reads nothing until the blaster has sent all.
    g.dev.fe.send_frame(&frames::udp_frame(
        g.mac, gw, GUEST_IP, PUBLIC_IP, 6200, 7200, b"go",
    ));
    sent_rx
        .recv_timeout(SHORT)
        .expect("the blaster never got the trigger");
    // Read the replies as raw frames (the guest stack's own socket buffer holds only 64).
    let _ = h;
    let mut got = std::collections::BTreeSet::new();
    let end = deadline(LONG);
    while got.len() < REPLIES && Instant::now() < end {
        let Some(f) = g.dev.fe.recv_frame(deadline(SHORT)) else {
            break;
        };
        if let Some(u) = frames::parse_udp(&f).filter(|u| u.dport == 6200) {
            got.insert(u32::from_be_bytes(u.payload[..4].try_into().unwrap()));
        }
    }
    assert_eq!(
        got.len(),
        REPLIES,
        "replies lost while the guest was slow\n{}",
        nf.log_text()
    );
    let counts = close_and_count(&nf, g, mark);
    assert_eq!(counts.get("rx-dropped"), 0, "{:?}", counts.0);
}

// ---- budgets -----------------------------------------------------------------------------------

/// `tcp-flows=3`: a fourth connection is refused with the limit as its reason, the refusal is
/// not remembered (the same connection gets through on a retransmitted SYN once a flow closed),
/// and `dns-tcp=1` refuses a second DNS-over-TCP connection with a reset.
#[test]
fn flow_budgets_refuse_the_excess_and_forget_it() {
    let echo = TcpEchoServer::start();
    let mut args = limit("tcp-flows", "3").to_vec();
    args.extend(limit("dns-tcp", "1"));
    args.extend(map_arg(
        SocketAddr::new(PUBLIC_IP.into(), 80),
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), echo.port()),
    ));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            g.tcp_connect(PUBLIC_IP, 80, SHORT)
                .expect("within the budget"),
        );
    }
    let mark = nf.log_mark();
    let fourth = g.tcp_start(PUBLIC_IP, 80);
    let refused = g
        .poll_until(deadline(SHORT), |_| {
            nf.wait_for_line(mark, Duration::ZERO, |l| {
                l.contains("decision") && l.contains("action=deny") && l.contains("tcp-flows (3)")
            })
        })
        .unwrap_or_else(|| panic!("no limit decision\n{}", nf.log_text()));
    assert!(
        refused.contains(&format!("dst={PUBLIC_IP}:80")),
        "{refused}"
    );
    assert_eq!(g.tcp(fourth).state(), State::SynSent);
    // Close one flow: the fourth gets through on its own retransmission.
    g.tcp(open[0]).abort();
    g.poll();
    let connected = g.poll_until(deadline(LONG), |g| {
        (g.tcp(fourth).state() == State::Established).then_some(())
    });
    assert!(
        connected.is_some(),
        "the refused connection stayed refused (remembered?): {:?}\n{}",
        g.tcp(fourth).state(),
        nf.log_text()
    );

    // DNS over TCP: one connection at a time.
    let first = g.tcp_connect(GATEWAY, 53, SHORT).expect("DNS over TCP");
    match g.tcp_connect(GATEWAY, 53, SHORT) {
        Err(ConnectError::Reset { .. }) => {}
        other => panic!("a second DNS-over-TCP connection got {other:?}"),
    }
    assert_eq!(g.tcp(first).state(), State::Established);
}

/// `udp-flows=2` and `icmp-flows=1`: the sessions beyond them get nothing, with the limit as
/// the logged reason.
#[test]
fn udp_and_echo_budgets() {
    let echo = UdpEchoServer::start();
    let mut args = limit("udp-flows", "2").to_vec();
    args.extend(limit("icmp-flows", "1"));
    args.extend(map_arg(SocketAddr::new(PUBLIC_IP.into(), 7300), echo.addr));
    args.extend(["--map".to_string(), format!("{PUBLIC_IP2}=127.0.0.1")]);
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    for (i, port) in [6301u16, 6302, 6303].into_iter().enumerate() {
        let h = g.udp_bind(port);
        g.udp_send(h, PUBLIC_IP, 7300, b"echo?");
        let reply = g.udp_recv(h, deadline(if i < 2 { SHORT } else { SILENCE }));
        assert_eq!(reply.is_some(), i < 2, "session {i}");
    }
    assert!(nf
        .wait_for_line(0, SHORT, |l| l.contains("udp-flows (2)"))
        .is_some());
    g.ping(PUBLIC_IP2, SHORT).expect("the first echo session");
    assert!(
        g.ping(PUBLIC_IP2, SILENCE).is_err(),
        "a second echo session"
    );
    assert!(nf
        .wait_for_line(0, SHORT, |l| l.contains("icmp-flows (1)"))
        .is_some());
}

/// `denied-memo=10`: of 20 denied SYNs, only the last 10 are remembered (their retransmissions
/// are answered from the memo); the first ones were evicted and are judged again.
#[test]
fn the_denied_memo_is_bounded() {
    let mut args = limit("denied-memo", "10").to_vec();
    args.extend(limit("decision-log-rate", "1000"));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let mark = nf.log_mark();
    let syn = |i: u8| {
        frames::tcp_syn_frame(
            g.mac,
            gw,
            GUEST_IP,
            Ipv4Addr::new(10, 0, 0, i),
            40000,
            80,
            1,
        )
    };
    let frames: Vec<Vec<u8>> = (1..=20).map(syn).collect();
    for f in &frames {
        g.dev.fe.send_frame(f);
    }
    // Retransmissions: 1..=5 were evicted, 16..=20 are remembered.
    for i in (1..=5).chain(16..=20) {
        g.dev.fe.send_frame(&frames[i - 1]);
    }
    // The last frame processed is the last one sent; wait until the guest's TX is drained.
    assert!(g.dev.fe.wait_tx_drained(deadline(SHORT)));
    let counts = close_and_count(&nf, g, mark);
    assert_eq!(counts.get("denied_memo_hits"), 5, "{:?}", counts.0);
}

// ---- timeouts ----------------------------------------------------------------------------------

/// A host server that reads until the connection ends and reports how it ended and what came.
fn reading_server() -> OneShotServer<Result<Vec<u8>, String>> {
    OneShotServer::start(|mut s| {
        s.set_read_timeout(Some(LONG)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
}

/// `handshake-timeout-secs`: a guest that never ACKs the SYN-ACK loses the flow and the host
/// connection is closed; `tcp-idle-secs`: an idle flow is reset both ways.
#[test]
fn handshake_and_idle_timeouts_close_both_sides() {
    let half_open = reading_server();
    let idle = reading_server();
    let mut args = limit("handshake-timeout-secs", "0.5").to_vec();
    args.extend(limit("tcp-idle-secs", "1"));
    args.extend(map_arg(
        SocketAddr::new(PUBLIC_IP.into(), 80),
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), half_open.port()),
    ));
    args.extend(map_arg(
        SocketAddr::new(PUBLIC_IP2.into(), 80),
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), idle.port()),
    ));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let seen = common::denied::raw_syn(&mut g, gw, GUEST_IP, PUBLIC_IP, 80, SHORT);
    assert!(
        seen.first().is_some_and(|t| t.flags.syn && t.flags.ack),
        "{seen:?}"
    );
    // Never ACKed: the host side is closed within the timeout (plus housekeeping).
    match half_open.join(SHORT) {
        Ok(Ok(bytes)) => assert!(bytes.is_empty()),
        other => panic!(
            "the half-open flow's host side: {other:?}\n{}",
            nf.log_text()
        ),
    }
    assert!(nf
        .wait_for_log("guest handshake timed out", SHORT)
        .is_some());

    let h = g.tcp_connect(PUBLIC_IP2, 80, SHORT).expect("connect");
    g.tcp_send_all(h, b"hello", deadline(SHORT)).unwrap();
    let closed = g.poll_until(deadline(SHORT), |g| {
        (g.tcp(h).state() == State::Closed).then_some(())
    });
    assert!(
        closed.is_some(),
        "the idle flow was not reset: {:?}",
        g.tcp(h).state()
    );
    match idle.join(SHORT) {
        Ok(Ok(bytes)) => assert_eq!(bytes, b"hello"),
        other => panic!("the idle flow's host side: {other:?}"),
    }
    assert!(nf.wait_for_log("TCP flow idle", SHORT).is_some());
}

/// `connect-timeout-secs`: a host that never answers the connect fails the guest's connection
/// with a reset.
#[test]
fn connect_timeout_resets_the_guest() {
    // A listener whose accept queue is full drops further SYNs: connects to it hang.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let _fillers: Vec<TcpStream> = (0..2)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    let mut args = limit("connect-timeout-secs", "0.5").to_vec();
    args.extend(map_arg(SocketAddr::new(PUBLIC_IP.into(), 80), addr));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let started = Instant::now();
    match g.tcp_connect(PUBLIC_IP, 80, SHORT) {
        Err(ConnectError::Reset { .. }) => {}
        other => panic!(
            "a connect that never completes gave {other:?}\n{}",
            nf.log_text()
        ),
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(nf.wait_for_log("host connect timed out", SHORT).is_some());
}

/// `hello-timeout-secs`: on a TLS port under domain rules, a guest that sends no ClientHello
/// is reset and nothing reaches the host; `dns-tcp-idle-secs`: an idle DNS-over-TCP connection
/// is reset.
#[test]
fn hello_and_dns_tcp_timeouts() {
    let tls = reading_server();
    let mut args = vec!["--policy".to_string(), "public-only".to_string()];
    args.extend(["--net-rule".to_string(), "deny@blocked.example".to_string()]);
    args.extend(limit("hello-timeout-secs", "0.5"));
    args.extend(limit("dns-tcp-idle-secs", "0.5"));
    args.extend(map_arg(
        SocketAddr::new(PUBLIC_IP.into(), 443),
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), tls.port()),
    ));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let h = g.tcp_connect(PUBLIC_IP, 443, SHORT).expect("connect");
    let reset = g.poll_until(deadline(SHORT), |g| {
        (g.tcp(h).state() == State::Closed).then_some(())
    });
    assert!(reset.is_some(), "a silent TLS client was not reset");
    match tls.join(SHORT) {
        Ok(Ok(bytes)) => assert!(bytes.is_empty(), "{} bytes reached the host", bytes.len()),
        other => panic!("the TLS flow's host side: {other:?}"),
    }
    let d = nf
        .wait_for_decision_where(SHORT, |d| {
            d.action == "deny" && d.line.contains(&format!("dst={PUBLIC_IP}:443"))
        })
        .expect("the hello decision");
    assert!(d.line.contains("no ClientHello in time"), "{}", d.line);

    let dns = g.tcp_connect(GATEWAY, 53, SHORT).expect("DNS over TCP");
    let reset = g.poll_until(deadline(SHORT), |g| {
        (g.tcp(dns).state() == State::Closed).then_some(())
    });
    assert!(
        reset.is_some(),
        "an idle DNS-over-TCP connection stayed open"
    );
}

/// `udp-idle-secs` and `icmp-idle-secs`: idle sessions are closed (their sockets with them).
#[test]
fn idle_udp_and_echo_sessions_are_closed() {
    let echo = UdpEchoServer::start();
    let mut args = limit("udp-idle-secs", "0.5").to_vec();
    args.extend(limit("icmp-idle-secs", "0.5"));
    args.extend(map_arg(SocketAddr::new(PUBLIC_IP.into(), 7400), echo.addr));
    args.extend(["--map".to_string(), format!("{PUBLIC_IP2}=127.0.0.1")]);
    let nf = Netfence::builder()
        .args(&args)
        .env("RUST_LOG", "netfence=debug")
        .spawn();
    let mut g = guest_up(&nf);
    let mark = nf.log_mark();
    let h = g.udp_bind(6400);
    g.udp_send(h, PUBLIC_IP, 7400, b"x");
    assert!(g.udp_recv(h, deadline(SHORT)).is_some());
    g.ping(PUBLIC_IP2, SHORT).expect("ping");
    assert!(nf
        .wait_for_log_after(mark, "UDP session idle, closed", SHORT)
        .is_some());
    let counts = close_and_count(&nf, g, mark);
    assert_eq!(counts.get("open_udp"), 0, "{:?}", counts.0);
    assert_eq!(counts.get("open_echo"), 0, "{:?}", counts.0);
}

// ---- descriptors -------------------------------------------------------------------------------

/// With few descriptors (RLIMIT_NOFILE 64, soft = hard), UDP sessions to 100 ports fail once
/// they run out: each failure is counted and remembered (a retransmission is not retried), and
/// the warning is logged a few times, not once per packet.
#[test]
fn socket_exhaustion_is_remembered_and_rate_limited() {
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut args = limit("udp-flows", "1000").to_vec();
    // Every port of the destination goes to the one loopback sink.
    args.extend([
        "--map".to_string(),
        format!("{PUBLIC_IP}={}", sink.local_addr().unwrap()),
    ]);
    let nf = Netfence::builder()
        .args(&args)
        .wrapper(&["sh", "-c", "ulimit -n 64 && exec \"$0\" \"$@\""])
        .spawn();
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let mark = nf.log_mark();
    let datagram =
        |sport: u16| frames::udp_frame(g.mac, gw, GUEST_IP, PUBLIC_IP, sport, 9000 + sport, b"x");
    let sent: Vec<Vec<u8>> = (1..=100).map(datagram).collect();
    for f in &sent {
        g.dev.fe.send_frame(f);
    }
    // The last ones failed: send them again.
    for f in &sent[90..] {
        g.dev.fe.send_frame(f);
    }
    assert!(g.dev.fe.wait_tx_drained(deadline(SHORT)));
    let counts = close_and_count(&nf, g, mark);
    let failed = counts.get("host-socket-failed");
    assert!(failed >= 10, "{:?}", counts.0);
    assert!(counts.get("denied_memo_hits") >= 10, "{:?}", counts.0);
    let warnings = nf
        .log_lines()
        .iter()
        .filter(|l| l.contains("cannot open a host socket"))
        .count();
    assert!(
        (1..=5).contains(&warnings),
        "{warnings} warnings for {failed} failures"
    );
}

// ---- a SYN flood -------------------------------------------------------------------------------

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

/// RSS stays under this much above the idle process during a flood of 10,000 SYNs.
const FLOOD_RSS_GROWTH_KIB: u64 = 64 * 1024;
/// Log written during the flood, at most.
const FLOOD_LOG_BYTES: usize = 64 * 1024;

/// 10,000 SYNs (never completed) to an open port, a closed port, a TLS port under domain
/// rules and the gateway's DNS port: netfence's memory and log stay bounded, an established
/// flow keeps working during the flood and new flows work after it.
#[test]
fn a_syn_flood_keeps_memory_and_log_bounded() {
    const SYNS: u32 = 10_000;
    let echo = TcpEchoServer::start();
    let tls = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = closed_port();
    let mut args = vec!["--policy".to_string(), "public-only".to_string()];
    args.extend(["--net-rule".to_string(), "deny@blocked.example".to_string()]);
    args.extend(limit("handshake-timeout-secs", "1"));
    args.extend(limit("hello-timeout-secs", "1"));
    for (port, target) in [
        (80u16, echo.port()),
        (81, closed),
        (443, tls.local_addr().unwrap().port()),
    ] {
        args.extend(map_arg(
            SocketAddr::new(PUBLIC_IP.into(), port),
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), target),
        ));
    }
    let nf = Netfence::spawn(&args);
    let pid = nf.pid().expect("pid");
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let me = g.mac;
    let control = g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("control flow");
    let control_port = g.tcp(control).local_endpoint().unwrap().port;
    let rss_before = rss_kib(pid);
    let log_before: usize = nf.log_lines().iter().map(|l| l.len() + 1).sum();
    let started = Instant::now();
    let mut rss_peak = rss_before;
    let targets = [
        (PUBLIC_IP, 80u16),
        (PUBLIC_IP, 81),
        (PUBLIC_IP, 443),
        (GATEWAY, 53),
    ];
    for i in 0..SYNS {
        let (dst, port) = targets[(i % 4) as usize];
        let sport = 20_000 + (i / 4) as u16;
        g.dev.fe.send_frame(&frames::tcp_syn_frame(
            me, gw, GUEST_IP, dst, sport, port, i,
        ));
        if i % 200 == 199 {
            // Keep the control flow's frames for the guest stack, discard the flood's answers.
            while let Some(f) = g.dev.fe.try_recv_frame() {
                if frames::parse_tcp(&f).is_some_and(|t| t.dport == control_port) {
                    g.dev.stash.push_back(f);
                }
            }
            if i % 2000 == 1999 {
                let msg = format!("during the flood, after {} SYNs", i + 1);
                g.tcp_send_all(control, msg.as_bytes(), deadline(SHORT))
                    .unwrap_or_else(|e| panic!("{msg}: {e}"));
                let back = g
                    .tcp_recv_exact(control, msg.len(), deadline(SHORT))
                    .unwrap_or_else(|e| panic!("{msg}: {e}\n{}", nf.log_text()));
                assert_eq!(back, msg.as_bytes());
                rss_peak = rss_peak.max(rss_kib(pid));
            }
        }
    }
    let flood_time = started.elapsed();
    let log_after: usize = nf.log_lines().iter().map(|l| l.len() + 1).sum();
    rss_peak = rss_peak.max(rss_kib(pid));
    // After the flood: the half-open flows time out, a new flow works.
    let fresh = g
        .poll_until(deadline(LONG), |g| {
            while let Some(f) = g.dev.fe.try_recv_frame() {
                g.dev.stash.push_back(f);
            }
            g.tcp_connect(PUBLIC_IP, 80, Duration::from_secs(2)).ok()
        })
        .unwrap_or_else(|| panic!("no new flow after the flood\n{}", nf.log_text()));
    let data = pattern(64 << 10, 7);
    g.tcp_send_all(fresh, &data, deadline(LONG)).unwrap();
    let back = g.tcp_recv_exact(fresh, data.len(), deadline(LONG)).unwrap();
    assert!(
        mismatch(&back, &data).is_none(),
        "the new flow's echo differs"
    );
    g.tcp_send_all(control, b"after", deadline(SHORT)).unwrap();
    assert_eq!(
        g.tcp_recv_exact(control, 5, deadline(SHORT)).unwrap(),
        b"after"
    );
    let log_bytes = log_after - log_before;
    println!(
        "SYN flood: {SYNS} SYNs in {:.2} s; netfence RSS {} KiB before, {} KiB peak (+{} KiB); log {} bytes during the flood",
        flood_time.as_secs_f64(),
        rss_before,
        rss_peak,
        rss_peak.saturating_sub(rss_before),
        log_bytes
    );
    assert!(
        rss_peak.saturating_sub(rss_before) < FLOOD_RSS_GROWTH_KIB,
        "RSS grew by {} KiB",
        rss_peak - rss_before
    );
    assert!(
        log_bytes < FLOOD_LOG_BYTES,
        "{log_bytes} bytes of log during the flood"
    );
    let mark = nf.log_mark();
    let counts = close_and_count(&nf, g, mark);
    println!("SYN flood counters: {:?}", counts.0);
}

// ---- the other limits, each shrunk and hit -------------------------------------------------------

/// A listener whose accept queue is full: connects to it hang (SYNs are dropped).
fn blackhole() -> (socket2::Socket, SocketAddr, Vec<TcpStream>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let fillers = (0..2)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    (sock, addr, fillers)
}

/// `tcp-connecting=2`: a third host connect in progress is refused; `tls-hellos=1`: a second
/// TLS flow waiting for its ClientHello is refused. Both name the limit.
#[test]
fn connecting_and_hello_budgets() {
    let (_hole, hole_addr, _fill) = blackhole();
    let tls = TcpListener::bind("127.0.0.1:0").unwrap();
    // TLS first (its dial completes at once), then the dials that hang.
    let mut args = vec!["--policy".to_string(), "public-only".to_string()];
    args.extend(["--net-rule".to_string(), "deny@blocked.example".to_string()]);
    args.extend(limit("tcp-connecting", "2"));
    args.extend(limit("tls-hellos", "1"));
    args.extend(map_arg(SocketAddr::new(PUBLIC_IP.into(), 80), hole_addr));
    args.extend(map_arg(
        SocketAddr::new(PUBLIC_IP2.into(), 443),
        tls.local_addr().unwrap(),
    ));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    // One TLS flow waits at the gate (no hello sent); the second is refused.
    let first = g
        .tcp_connect(PUBLIC_IP2, 443, SHORT)
        .expect("the first TLS flow");
    let mark = nf.log_mark();
    let second = g.tcp_start(PUBLIC_IP2, 443);
    let refused = g.poll_until(deadline(SHORT), |_| {
        nf.wait_for_line(mark, Duration::ZERO, |l| l.contains("tls-hellos (1)"))
    });
    assert!(
        refused.is_some(),
        "no tls-hellos refusal\n{}",
        nf.log_text()
    );
    assert_eq!(g.tcp(second).state(), State::SynSent);
    assert_eq!(g.tcp(first).state(), State::Established);
    for sport in [41001u16, 41002, 41003] {
        g.dev.fe.send_frame(&frames::tcp_syn_frame(
            g.mac, gw, GUEST_IP, PUBLIC_IP, sport, 80, 1,
        ));
    }
    let line = nf
        .wait_for_line(0, SHORT, |l| l.contains("tcp-connecting (2)"))
        .unwrap_or_else(|| panic!("no tcp-connecting refusal\n{}", nf.log_text()));
    assert!(line.contains("src=172.16.0.2:41003"), "{line}");
}

/// `denied-memo-secs=0.5`: a denied SYN is answered from the memo at once, and judged again
/// once the memo time has passed.
#[test]
fn the_denied_memo_expires() {
    let nf = Netfence::spawn(&limit("denied-memo-secs", "0.5"));
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let mark = nf.log_mark();
    let syn = frames::tcp_syn_frame(g.mac, gw, GUEST_IP, PRIVATE_IP, 40100, 80, 1);
    g.dev.fe.send_frame(&syn);
    g.dev.fe.send_frame(&syn); // remembered
    assert!(g.dev.fe.wait_tx_drained(deadline(SHORT)));
    // Time is what is under test here: let the memo time pass.
    g.run_for(Duration::from_millis(700));
    g.dev.fe.send_frame(&syn); // judged again
    assert!(g.dev.fe.wait_tx_drained(deadline(SHORT)));
    let counts = close_and_count(&nf, g, mark);
    assert_eq!(counts.get("denied_memo_hits"), 1, "{:?}", counts.0);
}

/// The fragment limits: `fragment-datagrams=1` evicts the older of two datagrams in progress,
/// `fragment-bytes` refuses a datagram larger than the buffer, `fragment-timeout-secs` drops an
/// incomplete one.
#[test]
fn fragment_limits() {
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut args = limit("fragment-datagrams", "1").to_vec();
    args.extend(limit("fragment-bytes", "4096"));
    args.extend(limit("fragment-timeout-secs", "0.5"));
    args.extend(map_arg(
        SocketAddr::new(PUBLIC_IP.into(), 7500),
        sink.local_addr().unwrap(),
    ));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let me = g.mac;
    let mark = nf.log_mark();
    let l4 = frames::udp_datagram(GUEST_IP, PUBLIC_IP, 5100, 7500, &pattern(2000, 3));
    let frags = |ident| {
        frames::fragment_frames(
            me,
            gw,
            GUEST_IP,
            PUBLIC_IP,
            frames::PROTO_UDP,
            &l4,
            ident,
            &frames::even_pieces(l4.len(), 1008),
        )
    };
    let (a, b) = (frags(1), frags(2));
    assert_eq!(a.len(), 2, "two fragments per datagram");
    // A's first piece, B's first piece (evicts A), B's last (B completes), A's last (a new,
    // incomplete datagram: A's first piece is gone).
    for f in [&a[0], &b[0], &b[1], &a[1]] {
        g.dev.fe.send_frame(f);
    }
    let got = recv_datagram(&sink, SHORT).expect("B completes");
    assert_eq!(got.len(), 2000);
    assert!(
        recv_datagram(&sink, SILENCE).is_none(),
        "A completed after its eviction"
    );
    // Larger than fragment-bytes.
    let big = frames::udp_datagram(GUEST_IP, PUBLIC_IP, 5101, 7500, &pattern(6000, 4));
    for f in frames::fragment_frames(
        me,
        gw,
        GUEST_IP,
        PUBLIC_IP,
        frames::PROTO_UDP,
        &big,
        3,
        &frames::even_pieces(big.len(), 1400),
    ) {
        g.dev.fe.send_frame(&f);
    }
    // One piece of a datagram that never completes: it times out.
    g.dev.fe.send_frame(&frags(4)[0]);
    assert!(
        recv_datagram(&sink, SILENCE).is_none(),
        "a datagram past the limits arrived"
    );
    // Time is what is under test: let the reassembly deadline and a housekeeping pass go by.
    g.run_for(Duration::from_millis(1500));
    let counts = close_and_count(&nf, g, mark);
    assert!(counts.get("fragment-evicted") >= 1, "{:?}", counts.0);
    assert!(counts.get("fragment-buffer-full") >= 1, "{:?}", counts.0);
    assert!(counts.get("fragment-timeout") >= 1, "{:?}", counts.0);
}

/// `ra-interval-secs`: after the guest solicited once, unsolicited advertisements follow at the
/// interval.
#[test]
fn router_advertisements_repeat_at_the_interval() {
    let nf = Netfence::spawn(&limit("ra-interval-secs", "0.5"));
    let mut g = guest_up(&nf);
    let me = g.mac;
    let rs = frames6::router_solicit_frame(me, g.link_local6());
    let solicited = g.raw_exchange(&rs, deadline(SHORT), |f| {
        frames6::parse_router_advert(f).is_some()
    });
    assert!(solicited.is_some(), "no answer to the solicitation");
    let started = Instant::now();
    let unsolicited = g.raw_wait(deadline(SHORT), |f| {
        frames6::parse_router_advert(f).is_some_and(|ra| ra.ip.dst == frames6::ALL_NODES)
    });
    assert!(unsolicited.is_some(), "no unsolicited advertisement");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// `decision-log-rate=5`: 50 SYNs to 50 different denied destinations in a burst write at most
/// 5 decision lines in that second, then one line that counts the rest.
#[test]
fn the_decision_log_is_rate_limited() {
    let nf = Netfence::spawn(&limit("decision-log-rate", "5"));
    let mut g = guest_up(&nf);
    let gw = gateway_mac(&mut g);
    let mark = nf.log_mark();
    for i in 1..=50u8 {
        g.dev.fe.send_frame(&frames::tcp_syn_frame(
            g.mac,
            gw,
            GUEST_IP,
            Ipv4Addr::new(10, 7, 0, i),
            40200,
            80,
            1,
        ));
    }
    let summary = nf
        .wait_for_line(mark, SHORT, |l| l.contains("decisions not logged"))
        .unwrap_or_else(|| panic!("no rate-limit summary\n{}", nf.log_text()));
    let denied_lines = nf
        .log_lines()
        .iter()
        .skip(mark)
        .filter(|l| l.contains(" decision ") || l.contains(": decision"))
        .filter(|l| l.contains("10.7.0."))
        .count();
    assert!(denied_lines <= 5, "{denied_lines} decision lines");
    let suppressed: u64 = field(&summary, "suppressed").unwrap().parse().unwrap();
    assert!(suppressed >= 40, "{summary}");
}

/// `tcp-link-buffer-bytes`: what all TCP flows of a link hold toward a guest that does not read
/// is bounded link-wide, not by flows x `tcp-buffer-bytes`. Eight host servers push 4 MiB each
/// at a guest that reads nothing; with 1 MiB per flow and 1 MiB for the link, netfence's peak
/// stays at the link's budget (eight flows alone would reach 8 MiB).
#[test]
fn tcp_buffers_are_bounded_link_wide() {
    const FLOWS: usize = 8;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(FLOWS) {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let chunk = vec![0x5au8; 64 << 10];
                for _ in 0..64 {
                    if conn.write_all(&chunk).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut args = limit("tcp-buffer-bytes", "1048576").to_vec();
    args.extend(limit("tcp-link-buffer-bytes", "1048576"));
    args.extend(map_arg(
        SocketAddr::new(PUBLIC_IP.into(), 80),
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
    ));
    let nf = Netfence::spawn(&args);
    let mut g = guest_up(&nf);
    let mark = nf.log_mark();
    let flows: Vec<_> = (0..FLOWS)
        .map(|_| g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("connect"))
        .collect();
    // The guest reads nothing: its receive buffers fill and its windows close.
    let filled = g.poll_until(deadline(LONG), |g| {
        let held: usize = flows.iter().map(|&h| g.tcp(h).recv_queue()).sum();
        (held >= 1 << 18).then_some(())
    });
    assert!(filled.is_some(), "the guest never received 256 KiB");
    // Let netfence fill what it may toward the closed windows.
    g.run_for(Duration::from_millis(500));
    let counts = close_and_count(&nf, g, mark);
    let peak = counts.get("tcp_buffered_peak");
    println!("tcp_buffered_peak {peak} bytes for {FLOWS} flows");
    assert!(peak <= 1 << 20, "{peak} bytes held toward the guest");
    assert!(
        peak >= 3 << 18,
        "the budget was never reached ({peak} bytes)"
    );
}
