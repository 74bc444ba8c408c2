//! TCP through netfence: host alias (gateway address -> 127.0.0.1), mapped documentation
//! addresses, refused connections, half-close, bulk transfer both ways.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use common::servers::*;
use common::*;
use smoltcp::socket::tcp::State;

#[test]
fn tcp_echo_via_gateway_address() {
    echo_through_gateway(std::net::IpAddr::V4(GATEWAY));
}

/// The gateway's IPv6 address is the host's ::1, as its IPv4 address is 127.0.0.1.
#[test]
fn tcp_echo_via_gateway_ipv6_address() {
    echo_through_gateway(std::net::IpAddr::V6(GATEWAY6));
}

/// Under allow-all, a TCP connection to the gateway address reaches the host's loopback of
/// the same family, and echoes byte-exact.
fn echo_through_gateway(gateway: std::net::IpAddr) {
    let echo = if gateway.is_ipv4() {
        TcpEchoServer::start()
    } else {
        TcpEchoServer::start6()
    };
    let nf = Netfence::spawn(&["--policy", "allow-all"]);
    let mut g = if gateway.is_ipv4() {
        guest_up(&nf)
    } else {
        guest_up6(&nf)
    };
    let h = g
        .tcp_connect(gateway, echo.port(), SHORT)
        .unwrap_or_else(|e| panic!("connect to gateway {gateway} port {}: {e:?}", echo.port()));
    for round in 0..5u64 {
        let msg = pattern(1000 + round as usize * 3000, round);
        g.tcp_send_all(h, &msg, deadline(SHORT)).unwrap();
        let back = g.tcp_recv_exact(h, msg.len(), deadline(SHORT)).unwrap();
        assert!(back == msg, "echo round {round} differs");
    }
    g.tcp_shutdown_write(h);
    let (rest, fin) = g.tcp_recv_to_eof(h, deadline(SHORT));
    assert!(
        rest.is_empty() && fin,
        "expected a clean FIN after echo, got {} bytes fin={fin}",
        rest.len()
    );
    assert_eq!(echo.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    let dst = std::net::SocketAddr::new(gateway, echo.port());
    let d = nf
        .wait_for_decision(&dst.to_string(), SHORT)
        .expect("decision logged");
    assert_eq!(d.action, "allow", "{}", d.line);
}

#[test]
fn gateway_alias_denied_by_default_policy() {
    let echo = TcpEchoServer::start();
    let nf = Netfence::spawn::<&str>(&[]);
    let mut g = guest_up(&nf);
    let r = g.tcp_connect(GATEWAY, echo.port(), Duration::from_secs(2));
    assert!(
        matches!(r, Err(ConnectError::Timeout(State::SynSent))),
        "{r:?}"
    );
    let d = nf
        .wait_for_decision(&format!("{GATEWAY}:{}", echo.port()), SHORT)
        .expect("decision logged");
    assert_eq!(d.action, "deny", "{}", d.line);
    assert_eq!(echo.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// 4 MiB each way at once to a mapped documentation address, byte-exact: the server checks
/// what the guest sent, the guest checks what the server sent.
#[test]
fn tcp_bulk_both_ways_to_mapped_public_address() {
    const N: usize = 4 << 20;
    let up = pattern(N, 1);
    let down = pattern(N, 2);
    let (up2, down2) = (up.clone(), down.clone());
    let server = OneShotServer::exchange(up2, down2);
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:80=127.0.0.1:{}", server.port()),
    ]);
    let mut g = guest_up(&nf);
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let start = Instant::now();
    let got = g
        .tcp_transfer(h, &up, true, deadline(LONG))
        .unwrap_or_else(|e| panic!("{e}"));
    let took = start.elapsed();
    assert_eq!(got.len(), N, "guest received {} of {N} bytes", got.len());
    if let Some(m) = mismatch(&got, &down) {
        panic!("guest received different bytes: {m}");
    }
    let (up_ok, wr) = server.join_polling(&mut g, SHORT).unwrap();
    assert_eq!(
        up_ok,
        Ok(None),
        "server did not receive the guest's bytes exactly"
    );
    assert_eq!(wr, Ok(()));
    eprintln!(
        "8 MiB in {took:?} ({:.1} MB/s), frontend stats {:?}",
        (2 * N) as f64 / took.as_secs_f64() / 1e6,
        g.dev.fe.stats
    );
    let d = nf
        .wait_for_decision(&format!("{PUBLIC_IP}:80"), SHORT)
        .expect("decision logged");
    assert_eq!(d.action, "allow", "{}", d.line);
}

#[test]
fn refused_connection_gets_rst_fast() {
    let port = closed_port();
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:81=127.0.0.1:{port}"),
    ]);
    let mut g = guest_up(&nf);
    match g.tcp_connect(PUBLIC_IP, 81, SHORT) {
        Err(ConnectError::Reset { after }) => {
            assert!(after < Duration::from_secs(1), "RST took {after:?}");
        }
        other => panic!("expected an RST for a refused host connection, got {other:?}"),
    }
}

/// The guest shuts down its write side; the server still sends, then closes.
#[test]
fn half_close_guest_first() {
    let server = OneShotServer::start(|mut s| {
        let got = read_to_eof(&mut s)?; // guest's FIN arrives as EOF
        let reply = format!("got {} bytes after your FIN", got.len());
        for _ in 0..50 {
            s.write_all(reply.as_bytes()).map_err(|e| e.to_string())?;
        }
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        Ok::<_, String>(got)
    });
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:82=127.0.0.1:{}", server.port()),
    ]);
    let mut g = guest_up(&nf);
    let h = g
        .tcp_connect(PUBLIC_IP, 82, SHORT)
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    g.tcp_send_all(h, b"hello, then FIN", deadline(SHORT))
        .unwrap();
    g.tcp_shutdown_write(h);
    let (data, fin) = g.tcp_recv_to_eof(h, deadline(SHORT));
    let expect = "got 15 bytes after your FIN".repeat(50);
    assert_eq!(String::from_utf8_lossy(&data), expect);
    assert!(fin, "no FIN from netfence after the server closed");
    assert_eq!(
        server.join_polling(&mut g, SHORT).unwrap(),
        Ok(b"hello, then FIN".to_vec())
    );
    let st = g.tcp_wait_state(h, &[State::TimeWait, State::Closed], deadline(SHORT));
    assert!(
        st.is_some(),
        "connection did not finish closing: {}",
        g.tcp(h).state()
    );
}

/// The server shuts down its write side first; the guest keeps sending, then closes.
#[test]
fn half_close_server_first() {
    let server = OneShotServer::start(|mut s| {
        s.write_all(b"banner").map_err(|e| e.to_string())?;
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        read_to_eof(&mut s)
    });
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:83=127.0.0.1:{}", server.port()),
    ]);
    let mut g = guest_up(&nf);
    let h = g
        .tcp_connect(PUBLIC_IP, 83, SHORT)
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let (banner, fin) = g.tcp_recv_to_eof(h, deadline(SHORT));
    assert_eq!(banner, b"banner");
    assert!(fin);
    assert!(
        g.tcp(h).may_send(),
        "guest can no longer send after the peer's FIN"
    );
    let body = pattern(200_000, 9);
    g.tcp_send_all(h, &body, deadline(SHORT)).unwrap();
    g.tcp_shutdown_write(h);
    assert!(g.tcp_flush(h, deadline(SHORT)));
    let got = server.join_polling(&mut g, SHORT).unwrap().unwrap();
    assert!(
        got == body,
        "server got {} bytes, want {}",
        got.len(),
        body.len()
    );
}

/// The server resets the connection: the guest gets an RST.
#[test]
fn server_reset_reaches_guest() {
    let server = OneShotServer::start(|s| {
        // SO_LINGER 0 + close = RST.
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        use std::os::fd::AsRawFd;
        // SAFETY: valid socket and option struct.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &l as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as u32,
            );
        }
        let mut s = s;
        let mut b = [0u8; 5];
        let _ = s.read_exact(&mut b);
        drop(s);
        b
    });
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:84=127.0.0.1:{}", server.port()),
    ]);
    let mut g = guest_up(&nf);
    let h = g
        .tcp_connect(PUBLIC_IP, 84, SHORT)
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    g.tcp_send_all(h, b"hello", deadline(SHORT)).unwrap();
    assert_eq!(&server.join_polling(&mut g, SHORT).unwrap(), b"hello");
    let st = g.tcp_wait_state(h, &[State::Closed], deadline(SHORT));
    assert_eq!(
        st,
        Some(State::Closed),
        "server's RST did not reach the guest (state {})",
        g.tcp(h).state()
    );
}

/// The server half-closes first and reads slowly (a small receive buffer, and it starts reading
/// only after the guest has closed): everything the guest sent before its FIN must still reach
/// the server, even though netfence's side of the connection is done from the guest's view.
#[test]
fn guest_data_buffered_at_close_still_reaches_server() {
    use std::sync::mpsc;
    const UP: usize = 192 << 10;
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    {
        // A small receive buffer on the listener (inherited by the accepted socket) keeps most
        // of the guest's data inside netfence instead of in the kernel.
        use std::os::fd::AsRawFd;
        let v: libc::c_int = 4096;
        // SAFETY: valid socket fd and option value.
        unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &v as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
    }
    let server = OneShotServer::start_on(listener, move |mut s| {
        s.write_all(b"bye").map_err(|e| e.to_string())?;
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        go_rx.recv_timeout(LONG).map_err(|e| e.to_string())?;
        read_to_eof(&mut s)
    });
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:85=127.0.0.1:{}", server.port()),
    ]);
    let mut g = guest_up(&nf);
    let h = g
        .tcp_connect(PUBLIC_IP, 85, SHORT)
        .unwrap_or_else(|e| panic!("connect: {e:?}"));
    let (bye, fin) = g.tcp_recv_to_eof(h, deadline(SHORT));
    assert_eq!((bye.as_slice(), fin), (&b"bye"[..], true));
    let up = pattern(UP, 21);
    // Send what the windows take; the rest moves once the server reads.
    let mut off = 0;
    let sent_fin = g.poll_until(deadline(SHORT), |g| {
        let s = g.tcp(h);
        if s.can_send() && off < up.len() {
            off += s.send_slice(&up[off..]).unwrap_or(0);
        }
        if off == up.len() && s.state() == State::CloseWait {
            s.close();
        }
        // Our FIN acknowledged: netfence has everything.
        matches!(s.state(), State::TimeWait | State::Closed).then_some(())
    });
    eprintln!(
        "guest queued {off} of {UP} bytes; FIN acknowledged before the server read: {}",
        sent_fin.is_some()
    );
    go_tx.send(()).unwrap();
    // Keep the guest running while the server drains.
    let got = server
        .join_polling(&mut g, LONG)
        .unwrap()
        .unwrap_or_else(|e| panic!("server: {e}"));
    if let Some(m) = mismatch(&got, &up) {
        panic!(
            "server did not get the guest's bytes: {m}\n{}",
            nf.log_text()
        );
    }
}

/// A raw TCP client: a segment carrying data *and* FIN that runs one byte past netfence's
/// advertised window must be trimmed to the window, and its FIN must not be taken (it lies
/// past the accepted data). If netfence acknowledged that FIN, the byte beyond the window is
/// lost: the server sees EOF one byte short.
#[test]
fn fin_on_segment_beyond_window_is_not_taken() {
    use common::frames::{self, Flags};
    use std::sync::mpsc;
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    set_rcvbuf(&listener, 4096);
    let server = OneShotServer::start_on(listener, move |mut s| {
        go_rx.recv_timeout(LONG).map_err(|e| e.to_string())?;
        read_to_eof(&mut s)
    });
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!("{PUBLIC_IP}:86=127.0.0.1:{}", server.port()),
    ]);
    let mut g = guest_up(&nf);
    let gw = g.arp_raw(GATEWAY, SHORT).expect("ARP").sender_mac;
    let me = g.mac;
    let sport = 45086;
    let iss: u32 = 1_000_000;
    let fe = &mut g.dev.fe;
    let seg = |seq: u32, ack: u32, flags: Flags, payload: &[u8]| {
        let t = frames::tcp_segment(
            GUEST_IP, PUBLIC_IP, sport, 86, seq, ack, flags, 65535, payload,
        );
        frames::eth(
            gw,
            me,
            0x0800,
            &frames::ipv4_packet(GUEST_IP, PUBLIC_IP, 6, 1, &t),
        )
    };
    let ours = |f: &[u8]| frames::parse_tcp(f).filter(|t| t.dport == sport && t.sport == 86);
    // Handshake.
    let syn = frames::tcp_syn_frame(me, gw, GUEST_IP, PUBLIC_IP, sport, 86, iss);
    fe.send_frame(&syn);
    let sa = fe
        .recv_matching(deadline(SHORT), |f| {
            ours(f).map(|t| t.flags.syn && t.flags.ack).unwrap_or(false)
        })
        .and_then(|f| ours(&f))
        .expect("no SYN-ACK");
    let rcv = sa.seq.wrapping_add(1);
    let mut seq = iss.wrapping_add(1);
    fe.send_frame(&seg(seq, rcv, Flags::ACK, &[]));
    // Fill netfence's buffers (the server does not read) with stop-and-wait segments, until
    // the advertised window is small but not zero.
    let mut window = sa.window as u32;
    let mut sent: Vec<u8> = Vec::new();
    let mut rng = frames::Rng::new(86);
    // Sends one segment; with `wait`, returns the first ACK that follows (which may not cover
    // everything).
    let mut send =
        |fe: &mut Frontend, seq: &mut u32, sent: &mut Vec<u8>, n: usize, fin: bool, wait: bool| {
            let data = rng.bytes(n);
            let flags = Flags {
                ack: true,
                psh: true,
                fin,
                ..Default::default()
            };
            fe.send_frame(&seg(*seq, rcv, flags, &data));
            sent.extend_from_slice(&data);
            *seq = seq.wrapping_add(n as u32);
            let want = *seq;
            if !wait {
                return (want, 0, want);
            }
            fe.recv_matching(deadline(SHORT), |f| {
                ours(f).map(|t| t.flags.ack).unwrap_or(false)
            })
            .and_then(|f| ours(&f))
            .map(|t| (t.ack, t.window as u32, want))
            .expect("no ACK from netfence")
        };
    let mut rounds = 0;
    // Two segments per round: netfence acknowledges every second full segment at once (the
    // first alone would wait for the delayed-ACK timer).
    // A round takes 2920 bytes of window: stop while at least 300 would be left after one.
    while window >= 2920 + 300 {
        send(fe, &mut seq, &mut sent, 1460, false, false);
        let (ack, win, want) = send(fe, &mut seq, &mut sent, 1460, false, true);
        assert_eq!(ack, want, "netfence did not take an in-window segment");
        window = win;
        rounds += 1;
        assert!(
            rounds < 8000,
            "window never closed (host side took everything?)"
        );
    }
    assert!(
        window > 200,
        "window closed completely ({window}); cannot place a partial segment"
    );
    let (ack, win, want) = send(fe, &mut seq, &mut sent, window as usize - 100, false, true);
    assert_eq!(ack, want);
    assert!(win >= 100, "window {win} after leaving 100 bytes");
    let w = win as usize;
    // The segment under test: w + 1 bytes and FIN.
    let start = seq;
    let (ack, _, _) = send(fe, &mut seq, &mut sent, w + 1, true, true);
    let taken = ack.wrapping_sub(start);
    assert!(
        taken <= w as u32,
        "netfence acknowledged {taken} sequence numbers of a segment of {} bytes + FIN with a \
         window of {w}: it took the FIN although the segment was cut to the window",
        w + 1
    );
    // Let the server read; retransmit what was not taken (with FIN) until the FIN is acked.
    go_tx.send(()).unwrap();
    let mut acked = ack;
    let end = seq; // sequence number of our FIN
    let t_end = deadline(LONG);
    while acked != end.wrapping_add(1) {
        assert!(std::time::Instant::now() < t_end, "FIN never acknowledged");
        let off = acked.wrapping_sub(iss.wrapping_add(1)) as usize;
        let rest = &sent[off..];
        let n = rest.len().min(1000);
        let fin = n == rest.len();
        let flags = Flags {
            ack: true,
            psh: true,
            fin,
            ..Default::default()
        };
        fe.send_frame(&seg(acked, rcv, flags, &rest[..n]));
        if let Some(t) = fe
            .recv_matching(deadline(Duration::from_millis(200)), |f| {
                ours(f).map(|t| t.flags.ack).unwrap_or(false)
            })
            .and_then(|f| ours(&f))
        {
            acked = t.ack;
        }
    }
    let got = server
        .join(SHORT)
        .unwrap()
        .unwrap_or_else(|e| panic!("server: {e}"));
    if let Some(m) = mismatch(&got, &sent) {
        panic!("server did not get the bytes the guest sent: {m}");
    }
}

fn set_rcvbuf(l: &std::net::TcpListener, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: valid socket fd and option value.
    unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &bytes as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
}

/// A guest that resets its own half-open connection ends that flow: netfence closes the
/// host connection, and the next connection to the same address (from another port) runs on
/// a host connection of its own. smoltcp returns a socket reset in SYN-RECEIVED to listening;
/// kept, it took the next SYN to that address and carried the new connection's bytes into the
/// old flow's host connection (and, once parked, reset it).
#[test]
fn a_handshake_the_guest_resets_ends_its_flow() {
    use common::frames::{self, Flags};
    use std::net::TcpListener;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!(
            "{PUBLIC_IP}:87=127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        ),
    ]);
    let mut g = guest_up(&nf);
    let gw = g.arp_raw(GATEWAY, SHORT).expect("ARP").sender_mac;
    let me = g.mac;
    let fe = &mut g.dev.fe;
    let seg = |sport: u16, seq: u32, ack: u32, flags: Flags, payload: &[u8]| {
        let t = frames::tcp_segment(
            GUEST_IP, PUBLIC_IP, sport, 87, seq, ack, flags, 65535, payload,
        );
        frames::eth(
            gw,
            me,
            0x0800,
            &frames::ipv4_packet(GUEST_IP, PUBLIC_IP, 6, 1, &t),
        )
    };
    let syn_ack = |fe: &mut Frontend, sport: u16| {
        fe.recv_matching(deadline(SHORT), |f| {
            frames::parse_tcp(f)
                .is_some_and(|t| t.dport == sport && t.sport == 87 && t.flags.syn && t.flags.ack)
        })
        .and_then(|f| frames::parse_tcp(&f))
        .unwrap_or_else(|| panic!("no SYN-ACK for guest port {sport}"))
    };
    // The first connection: SYN, SYN-ACK (the host side is connected by then), then RST.
    let (first_port, first_iss) = (41001, 7_000_000u32);
    fe.send_frame(&frames::tcp_syn_frame(
        me, gw, GUEST_IP, PUBLIC_IP, first_port, 87, first_iss,
    ));
    syn_ack(fe, first_port);
    let (mut first_host, _) = listener.accept().unwrap();
    fe.send_frame(&seg(
        first_port,
        first_iss.wrapping_add(1),
        0,
        Flags::RST,
        &[],
    ));
    // The second connection, from another port: handshake, then bytes.
    let (second_port, second_iss) = (41002, 9_000_000u32);
    fe.send_frame(&frames::tcp_syn_frame(
        me,
        gw,
        GUEST_IP,
        PUBLIC_IP,
        second_port,
        87,
        second_iss,
    ));
    let sa = syn_ack(fe, second_port);
    let (mut second_host, _) = listener.accept().unwrap();
    let flags = Flags {
        ack: true,
        psh: true,
        ..Default::default()
    };
    let seq = second_iss.wrapping_add(1);
    fe.send_frame(&seg(
        second_port,
        seq,
        sa.seq.wrapping_add(1),
        flags,
        b"second",
    ));
    second_host.set_read_timeout(Some(SHORT)).unwrap();
    let mut got = [0u8; 6];
    second_host.read_exact(&mut got).unwrap_or_else(|e| {
        panic!(
            "the second connection's bytes did not reach its own host connection: {e}\n{}",
            nf.log_text()
        )
    });
    assert_eq!(&got, b"second");
    // The reset flow's host connection ends (EOF or reset), carrying nothing.
    first_host.set_read_timeout(Some(SHORT)).unwrap();
    let mut rest = Vec::new();
    match first_host.read_to_end(&mut rest) {
        Ok(_) | Err(_) if !rest.is_empty() => {
            panic!(
                "the reset flow's host connection carried {:?}",
                String::from_utf8_lossy(&rest)
            )
        }
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the reset flow's host connection stayed open: {other:?}"),
    }
}

/// A guest that writes twice before it reads waits for the ACK of its first small write
/// (Nagle's algorithm holds the second until then). netfence's guest end ACKs a small segment
/// at once (`tcp::SMALL_SEGMENT`), not after its ACK delay (1 ms, which the timer never fires
/// sooner than) nor smoltcp's default 10 ms: a lone one-byte segment, which the host never
/// answers, is acknowledged in well under a millisecond. (The best of ten tries is compared,
/// so a loaded machine does not fail it; with any delay even the best waits 1 ms.)
#[test]
fn a_lone_small_segment_is_acknowledged_at_once() {
    use common::frames::{self, Flags};
    use std::net::TcpListener;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let nf = Netfence::spawn(&[
        "--map".to_string(),
        format!(
            "{PUBLIC_IP}:88=127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        ),
    ]);
    let mut g = guest_up(&nf);
    let gw = g.arp_raw(GATEWAY, SHORT).expect("ARP").sender_mac;
    let me = g.mac;
    let fe = &mut g.dev.fe;
    let (sport, iss) = (41088, 3_000_000u32);
    let ours = |f: &[u8]| frames::parse_tcp(f).filter(|t| t.dport == sport && t.sport == 88);
    fe.send_frame(&frames::tcp_syn_frame(
        me, gw, GUEST_IP, PUBLIC_IP, sport, 88, iss,
    ));
    let sa = fe
        .recv_matching(deadline(SHORT), |f| {
            ours(f).is_some_and(|t| t.flags.syn && t.flags.ack)
        })
        .and_then(|f| ours(&f))
        .expect("no SYN-ACK");
    let (_host, _) = listener.accept().unwrap();
    let rcv = sa.seq.wrapping_add(1);
    let seg = |seq: u32, flags: Flags, payload: &[u8]| {
        let t = frames::tcp_segment(
            GUEST_IP, PUBLIC_IP, sport, 88, seq, rcv, flags, 65535, payload,
        );
        frames::eth(
            gw,
            me,
            0x0800,
            &frames::ipv4_packet(GUEST_IP, PUBLIC_IP, 6, 1, &t),
        )
    };
    let mut seq = iss.wrapping_add(1);
    fe.send_frame(&seg(seq, Flags::ACK, &[]));
    let push = Flags {
        ack: true,
        psh: true,
        ..Default::default()
    };
    let mut waits = Vec::new();
    for _ in 0..10 {
        let sent = Instant::now();
        fe.send_frame(&seg(seq, push, b"x"));
        seq = seq.wrapping_add(1);
        let want = seq;
        fe.recv_matching(deadline(SHORT), |f| {
            ours(f).is_some_and(|t| t.flags.ack && t.ack == want)
        })
        .unwrap_or_else(|| panic!("the byte was never acknowledged\n{}", nf.log_text()));
        waits.push(sent.elapsed());
    }
    let best = waits.iter().min().copied().unwrap();
    assert!(
        best < Duration::from_millis(1),
        "a lone small segment waited at least {best:?} for its ACK (all waits: {waits:?}): a \
         guest under Nagle's algorithm would stall that long per exchange"
    );
}

/// The guest's SYN is answered only when the host side has connected. A loopback connect
/// usually completes within `connect()`, and netfence answers the SYN at once then; this one
/// cannot (the listener's accept queue is full, so the kernel drops the host-side SYN and
/// retries it a second later): netfence holds the guest's SYN, sends no SYN-ACK while the host
/// side waits, and completes the guest's handshake when its socket reports the connect done.
#[test]
fn a_host_connect_that_completes_late_completes_the_handshake_then() {
    use common::frames::{self, Flags};
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) on our own socket, to shrink its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    while let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        queued.push(s);
        assert!(queued.len() < 16, "the accept queue does not fill");
    }
    let nf = Netfence::spawn(&["--map".to_string(), format!("{PUBLIC_IP}:89={addr}")]);
    let mut g = guest_up(&nf);
    let gw = g.arp_raw(GATEWAY, SHORT).expect("ARP").sender_mac;
    let me = g.mac;
    let fe = &mut g.dev.fe;
    let (sport, iss) = (41089, 5_000_000u32);
    let ours = |f: &[u8]| frames::parse_tcp(f).filter(|t| t.dport == sport && t.sport == 89);
    fe.send_frame(&frames::tcp_syn_frame(
        me, gw, GUEST_IP, PUBLIC_IP, sport, 89, iss,
    ));
    let early = fe.recv_matching(deadline(Duration::from_millis(300)), |f| ours(f).is_some());
    assert!(
        early.is_none(),
        "netfence answered the SYN while its host connect could not have completed: {:?}",
        early.as_deref().and_then(&ours)
    );
    // Make room: the kernel's retry of the host-side SYN now gets through.
    for _ in 0..queued.len() {
        let _ = listener.accept().unwrap();
    }
    drop(queued);
    let sa = fe
        .recv_matching(deadline(SHORT), |f| ours(f).is_some())
        .and_then(|f| ours(&f))
        .unwrap_or_else(|| panic!("no answer to the held SYN\n{}", nf.log_text()));
    assert!(
        sa.flags.syn && sa.flags.ack,
        "the held SYN was answered with {sa:?}"
    );
    let (mut host, _) = listener.accept().unwrap();
    let rcv = sa.seq.wrapping_add(1);
    let seq = iss.wrapping_add(1);
    let flags = Flags {
        ack: true,
        psh: true,
        ..Default::default()
    };
    let t = frames::tcp_segment(
        GUEST_IP, PUBLIC_IP, sport, 89, seq, rcv, flags, 65535, b"late",
    );
    fe.send_frame(&frames::eth(
        gw,
        me,
        0x0800,
        &frames::ipv4_packet(GUEST_IP, PUBLIC_IP, 6, 1, &t),
    ));
    host.set_read_timeout(Some(SHORT)).unwrap();
    let mut got = [0u8; 4];
    host.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("the guest's bytes did not arrive: {e}\n{}", nf.log_text()));
    assert_eq!(&got, b"late");
}
