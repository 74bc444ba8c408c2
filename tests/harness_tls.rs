//! TLS interception end to end through the harness guest: a loopback HTTPS server with a CA of
//! the test's own (given to netfence as `tls.upstream_ca_certs`), and a rustls client in the
//! guest that trusts only netfence's CA (written by `--ca-out`).
//!
//! "api.example.com" resolves nowhere: the guest connects to 203.0.113.7 (mapped to the
//! server) and names api.example.com in its ClientHello.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::time::Duration;

use common::process::close_and_count;
use common::tls::{
    client_config, dns_names, issuer_cn, spawn_intercepting, GuestTls, HttpsServer, TestCa,
};
use common::*;
use smoltcp::socket::tcp::State;

const NAME: &str = "api.example.com";
/// A second "public" destination (documentation range), mapped to loopback where used.
const PUBLIC_IP2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 8);

/// netfence with interception on, `extra` lines in `[tls]` and `args`; returns it, the PEM of
/// its CA (from `--ca-out`) and the scratch directory.
fn intercepting(
    upstream_ca: &TestCa,
    tls_extra: &str,
    args: &[String],
) -> (Netfence, String, TempDir) {
    intercepting_logged(upstream_ca, tls_extra, args, "info")
}

/// [`intercepting`] with `RUST_LOG` = `log`.
fn intercepting_logged(
    upstream_ca: &TestCa,
    tls_extra: &str,
    args: &[String],
    log: &str,
) -> (Netfence, String, TempDir) {
    spawn_intercepting(upstream_ca, "", tls_extra, args, &[("RUST_LOG", log)])
}

fn map_443(port: u16) -> Vec<String> {
    vec![
        "--map".to_string(),
        format!("{PUBLIC_IP}:443=127.0.0.1:{port}"),
    ]
}

fn get(host: &str) -> Vec<u8> {
    format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nUser-Agent: harness\r\n\r\n").into_bytes()
}

/// The guest fetches through interception: the certificate it sees names api.example.com and
/// chains to netfence's CA (the client trusts nothing else), the request reaches the server
/// byte-exact, and the answer comes back. ALPN: the guest gets what the upstream accepted.
#[test]
fn intercepted_https_request_reaches_the_server() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start(&up_ca, NAME, &[b"h2", b"http/1.1"]);
    let (nf, ca_pem, _dir) = intercepting(&up_ca, "", &map_443(server.port));
    let mut g = guest_up(&nf);
    let dst = IpAddr::V4(PUBLIC_IP);
    let config = client_config(&ca_pem, &[b"h2", b"http/1.1"]);
    let s = GuestTls::connect(&mut g, dst, 443, NAME, config, deadline(SHORT))
        .unwrap_or_else(|e| panic!("handshake: {e}\n{}", nf.log_text()));
    let leaf = s.peer_leaf().expect("a certificate");
    assert_eq!(dns_names(&leaf), vec![NAME.to_string()]);
    assert_eq!(issuer_cn(&leaf), "netfence interception CA");
    assert_eq!(
        s.conn.alpn_protocol(),
        Some(&b"h2"[..]),
        "what the upstream accepted"
    );
    drop(s);

    // http/1.1 only: a request and its answer.
    let config = client_config(&ca_pem, &[b"http/1.1"]);
    let mut s = GuestTls::connect(&mut g, dst, 443, NAME, config, deadline(SHORT))
        .unwrap_or_else(|e| panic!("handshake: {e}\n{}", nf.log_text()));
    assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let request = get(NAME);
    let response = s
        .request(&mut g, &request, deadline(SHORT))
        .unwrap_or_else(|e| panic!("request: {e}\n{}", nf.log_text()));
    assert!(response.starts_with(b"HTTP/1.1 200 OK"), "{response:?}");
    assert!(
        response.ends_with(&request),
        "the server saw another request"
    );
    let d = nf
        .wait_for_decision_where(SHORT, |d| d.line.contains("intercepted"))
        .expect("the interception decision");
    assert_eq!(d.action, "allow", "{}", d.line);
}

/// `tls.bypass`: the guest talks to the upstream itself and sees its own certificate.
#[test]
fn bypassed_names_see_the_upstreams_certificate() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start(&up_ca, NAME, &[b"http/1.1"]);
    let (nf, ca_pem, _dir) = intercepting(
        &up_ca,
        &format!("bypass = [{NAME:?}]"),
        &map_443(server.port),
    );
    let mut g = guest_up(&nf);
    let dst = IpAddr::V4(PUBLIC_IP);
    // Trusting only netfence's CA fails: the certificate is the upstream's.
    let err = GuestTls::connect(
        &mut g,
        dst,
        443,
        NAME,
        client_config(&ca_pem, &[]),
        deadline(SHORT),
    )
    .expect_err("netfence's CA must not verify a bypassed name");
    assert!(err.contains("TLS"), "{err}");
    let mut s = GuestTls::connect(
        &mut g,
        dst,
        443,
        NAME,
        client_config(&up_ca.cert_pem, &[]),
        deadline(SHORT),
    )
    .unwrap_or_else(|e| panic!("bypass handshake: {e}\n{}", nf.log_text()));
    assert_eq!(issuer_cn(&s.peer_leaf().unwrap()), "test upstream CA");
    let response = s.request(&mut g, &get(NAME), deadline(SHORT)).unwrap();
    assert!(response.starts_with(b"HTTP/1.1 200 OK"));
    assert!(nf
        .wait_for_log("not intercepted (tls.bypass", SHORT)
        .is_some());
}

/// `verify_upstream` (the default): an upstream whose certificate does not verify makes the
/// guest's handshake fail with an alert, logged with the reason; nothing is downgraded.
#[test]
fn an_untrusted_upstream_fails_the_guests_handshake() {
    let up_ca = TestCa::new("test upstream CA");
    let rogue_ca = TestCa::new("rogue CA");
    let rogue = HttpsServer::start(&rogue_ca, NAME, &[b"http/1.1"]);
    let (nf, ca_pem, _dir) = intercepting(&up_ca, "", &map_443(rogue.port));
    let mut g = guest_up(&nf);
    let err = GuestTls::connect(
        &mut g,
        IpAddr::V4(PUBLIC_IP),
        443,
        NAME,
        client_config(&ca_pem, &[]),
        deadline(SHORT),
    )
    .expect_err("the handshake must fail");
    assert!(
        err.contains("HandshakeFailure") || err.contains("handshake") || err.contains("closed"),
        "{err}"
    );
    let line = nf
        .wait_for_log("intercepted TLS flow failed", SHORT)
        .unwrap_or_else(|| panic!("no failure logged\n{}", nf.log_text()));
    assert!(
        line.contains("certificate") || line.contains("Certificate"),
        "{line}"
    );
    assert!(
        rogue.all_bytes().is_empty(),
        "plaintext reached an untrusted upstream"
    );
}

/// `verify_upstream = false` accepts the rogue upstream (the operator's choice).
#[test]
fn verify_upstream_false_accepts_any_upstream() {
    let up_ca = TestCa::new("test upstream CA");
    let rogue_ca = TestCa::new("rogue CA");
    let rogue = HttpsServer::start(&rogue_ca, NAME, &[b"http/1.1"]);
    let (nf, ca_pem, _dir) = intercepting(&up_ca, "verify_upstream = false", &map_443(rogue.port));
    let mut g = guest_up(&nf);
    let mut s = GuestTls::connect(
        &mut g,
        IpAddr::V4(PUBLIC_IP),
        443,
        NAME,
        client_config(&ca_pem, &[]),
        deadline(SHORT),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    let response = s.request(&mut g, &get(NAME), deadline(SHORT)).unwrap();
    assert!(response.starts_with(b"HTTP/1.1 200 OK"));
}

/// QUIC to an intercepted port is dropped (`block_quic`, the default), logged once per flow.
#[test]
fn quic_to_intercepted_ports_is_blocked() {
    let up_ca = TestCa::new("test upstream CA");
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut args = vec![
        "--map".to_string(),
        format!("{PUBLIC_IP}:443={}", sink.local_addr().unwrap()),
    ];
    args.extend(["--limit".to_string(), "decision-log-rate=1000".to_string()]);
    let (nf, _ca_pem, _dir) = intercepting(&up_ca, "", &args);
    let mut g = guest_up(&nf);
    let h = g.udp_bind(7443);
    for _ in 0..5 {
        g.udp_send(h, PUBLIC_IP, 443, b"quic initial");
    }
    g.run_for(Duration::from_millis(300));
    sink.set_read_timeout(Some(SILENCE)).unwrap();
    let mut buf = [0u8; 64];
    assert!(sink.recv(&mut buf).is_err(), "a QUIC datagram got through");
    let lines: Vec<String> = nf
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("tls.block_quic"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
}

/// Not TLS on an intercepted port: closed, with the reason logged; nothing reaches the server.
#[test]
fn plain_text_on_an_intercepted_port_is_closed() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start(&up_ca, NAME, &[]);
    let (nf, _ca_pem, _dir) = intercepting(&up_ca, "", &map_443(server.port));
    let mut g = guest_up(&nf);
    let h = g
        .tcp_connect(PUBLIC_IP, 443, SHORT)
        .expect("the TCP handshake");
    g.tcp_send_all(h, &get(NAME), deadline(SHORT)).unwrap();
    let closed = g.poll_until(deadline(SHORT), |g| {
        (!g.tcp(h).may_recv() || g.tcp(h).state() == smoltcp::socket::tcp::State::Closed)
            .then_some(())
    });
    assert!(closed.is_some(), "a plain-text client on 443 stayed open");
    let d = nf
        .wait_for_decision_where(SHORT, |d| d.line.contains("not TLS on an intercepted port"))
        .unwrap_or_else(|| panic!("no decision\n{}", nf.log_text()));
    assert_eq!(d.action, "deny");
    assert!(server.all_bytes().is_empty());
}

/// A guest that starts a handshake and never finishes it is cut off after
/// `tls-handshake-timeout-secs`.
#[test]
fn an_unfinished_handshake_times_out() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start(&up_ca, NAME, &[]);
    let mut args = map_443(server.port);
    args.extend([
        "--limit".to_string(),
        "tls-handshake-timeout-secs=1".to_string(),
    ]);
    let (nf, _ca_pem, _dir) = intercepting(&up_ca, "", &args);
    let mut g = guest_up(&nf);
    // Only the ClientHello: the guest never answers the server's flight.
    let hello = {
        let config = client_config(&up_ca.cert_pem, &[]);
        let mut c = rustls::ClientConnection::new(
            config,
            rustls::pki_types::ServerName::try_from(NAME).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        out
    };
    let h = g.tcp_connect(PUBLIC_IP, 443, SHORT).expect("TCP");
    g.tcp_send_all(h, &hello, deadline(SHORT)).unwrap();
    let reset = g.poll_until(deadline(SHORT), |g| {
        (g.tcp(h).state() == smoltcp::socket::tcp::State::Closed).then_some(())
    });
    assert!(
        reset.is_some(),
        "the stalled handshake was not cut off\n{}",
        nf.log_text()
    );
    assert!(nf.wait_for_log("TLS handshake timed out", SHORT).is_some());
}

/// A guest that sends its request and closes its side at once (close_notify and FIN) still
/// gets the whole answer, however long, and the close ends cleanly: netfence keeps the flow
/// until the guest acknowledged its last byte and FIN, so nothing is cut off and no segment of
/// the guest meets a forgotten flow (`tcp-unknown-flow`).
#[test]
fn a_half_closed_guest_gets_the_whole_answer() {
    let body: &'static [u8] = Box::leak(vec![b'z'; 1 << 20].into_boxed_slice());
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start_with(&up_ca, &[NAME], &[b"http/1.1"], Some(body));
    let (nf, ca_pem, _dir) = intercepting(&up_ca, "", &map_443(server.port));
    let mut g = guest_up(&nf);
    let mark = nf.log_mark();
    let config = client_config(&ca_pem, &[b"http/1.1"]);
    let mut s = GuestTls::connect(
        &mut g,
        IpAddr::V4(PUBLIC_IP),
        443,
        NAME,
        config,
        deadline(SHORT),
    )
    .unwrap_or_else(|e| panic!("handshake: {e}\n{}", nf.log_text()));
    s.conn.writer().write_all(&get(NAME)).unwrap();
    s.conn.send_close_notify();
    let mut out = Vec::new();
    while s.conn.wants_write() {
        s.conn.write_tls(&mut out).unwrap();
    }
    g.tcp_send_all(s.handle, &out, deadline(SHORT)).unwrap();
    g.tcp_shutdown_write(s.handle);
    let mut response = Vec::new();
    let mut ended = false;
    s.pump_until(&mut g, deadline(LONG), |c| {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match c.conn.reader().read(&mut buf) {
                Ok(0) => {
                    ended = true;
                    return true;
                }
                Ok(n) => response.extend_from_slice(&buf[..n]),
                Err(_) => return false,
            }
        }
    })
    .unwrap_or_else(|e| panic!("after {} bytes: {e}\n{}", response.len(), nf.log_text()));
    assert!(ended, "no close_notify");
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    assert_eq!(response.len() - head_end, body.len(), "the answer was cut");
    let state = g.tcp_wait_state(s.handle, &[State::TimeWait, State::Closed], deadline(SHORT));
    assert_eq!(
        state,
        Some(State::TimeWait),
        "the close did not end cleanly"
    );
    let counts = close_and_count(&nf, g, mark);
    assert_eq!(counts.get("tcp-unknown-flow"), 0, "{}", nf.log_text());
}

/// A guest that resets an intercepted connection, in the relay or during the handshakes, ends
/// the flow at once (the upstream is reset too), not at a timeout.
#[test]
fn a_guest_reset_ends_an_intercepted_flow_at_once() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start(&up_ca, NAME, &[b"http/1.1"]);
    // An upstream that accepts and never answers: the handshakes stay open.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut args = map_443(server.port);
    args.extend([
        "--map".to_string(),
        format!(
            "{PUBLIC_IP2}:443=127.0.0.1:{}",
            mute.local_addr().unwrap().port()
        ),
    ]);
    let (nf, ca_pem, _dir) = intercepting_logged(&up_ca, "", &args, "info,netfence::flow=debug");
    let mut g = guest_up(&nf);

    // In the relay: the server keeps the connection open after answering.
    let config = client_config(&ca_pem, &[b"http/1.1"]);
    let mut s = GuestTls::connect(
        &mut g,
        IpAddr::V4(PUBLIC_IP),
        443,
        NAME,
        config.clone(),
        deadline(SHORT),
    )
    .unwrap_or_else(|e| panic!("handshake: {e}\n{}", nf.log_text()));
    s.request(&mut g, &get(NAME), deadline(SHORT)).unwrap();
    let port = g.tcp(s.handle).local_endpoint().unwrap().port;
    let mark = nf.log_mark();
    g.tcp(s.handle).abort();
    g.poll();
    let closed = nf.wait_for_line(mark, SHORT, |l| {
        l.contains("TCP flow closed")
            && l.contains(&format!(":{port} "))
            && l.contains("guest reset")
    });
    assert!(
        closed.is_some(),
        "the relay outlived the guest's reset\n{}",
        nf.log_text()
    );

    // During the handshakes: the ClientHello is in, the upstream never answers.
    let mut c = rustls::ClientConnection::new(
        config,
        rustls::pki_types::ServerName::try_from(NAME).unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    c.write_tls(&mut hello).unwrap();
    let h = g.tcp_connect(PUBLIC_IP2, 443, SHORT).expect("TCP");
    g.tcp_send_all(h, &hello, deadline(SHORT)).unwrap();
    assert!(
        g.tcp_flush(h, deadline(SHORT)),
        "the ClientHello was not acknowledged"
    );
    let port = g.tcp(h).local_endpoint().unwrap().port;
    let (_upstream, _) = mute.accept().unwrap();
    let intercepted = nf.wait_for_decision_where(SHORT, |d| {
        d.line.contains(&format!(":{port} ")) && d.line.contains("intercepted")
    });
    assert!(intercepted.is_some(), "{}", nf.log_text());
    let mark = nf.log_mark();
    g.tcp(h).abort();
    g.poll();
    let closed = nf.wait_for_line(mark, SHORT, |l| {
        l.contains("TCP flow closed")
            && l.contains(&format!(":{port} "))
            && l.contains("guest reset")
    });
    assert!(
        closed.is_some(),
        "the handshake outlived the guest's reset\n{}",
        nf.log_text()
    );
}
