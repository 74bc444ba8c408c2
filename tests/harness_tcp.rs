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
    let echo = TcpEchoServer::start();
    let nf = Netfence::spawn(&["--policy", "allow-all"]);
    let mut g = guest_up(&nf);
    let h = g
        .tcp_connect(GATEWAY, echo.port(), SHORT)
        .unwrap_or_else(|e| panic!("connect to gateway:{}: {e:?}", echo.port()));
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
    let d = nf
        .wait_for_decision(&format!("{GATEWAY}:{}", echo.port()), SHORT)
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
    let server = OneShotServer::start(move |mut s| {
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&down2)
                .map_err(|e| format!("server write: {e}"))?;
            w.shutdown(Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))
        });
        let got = read_to_eof(&mut s);
        let wr = writer.join().unwrap();
        (got.map(|g| mismatch(&g, &up2)), wr)
    });
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
