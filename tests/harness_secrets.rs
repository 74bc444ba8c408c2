//! Secrets end to end: the guest holds a placeholder, the upstream receives the real value, and
//! the value never enters the guest nor any log line.
//!
//! Intercepted HTTPS goes to a loopback server with the test's CA (`tls.upstream_ca_certs`);
//! plain HTTP (port 80) to a loopback server after the guest resolved its name through the
//! gateway (a fake upstream DNS). Both servers answer a request with the request itself, so
//! the test sees exactly what reached the upstream, and that the answer the guest gets back
//! carries the real value only because the server echoed it (the tests check the server's
//! side).

mod common;
mod dnsfake;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::tls::{client_config, request_end, spawn_intercepting, GuestTls, HttpsServer, TestCa};
use common::*;
use dnsfake::{udp_lookup, Answer, FakeDns};
use hickory_proto::rr::RecordType;
use netfence::config::default_placeholder;

const NAME: &str = "api.example.com";
const OTHER: &str = "other.example.com";
const KEY: &str = "sk-real-0123456789abcdef";

/// The `[[secrets]]` table for API_KEY (value KEY, for api.example.com), with `extra` lines.
fn secret_toml(extra: &str) -> String {
    format!(
        "[[secrets]]\nenv_var = \"API_KEY\"\nvalue = \"{KEY}\"\nallowed_hosts = [\"{NAME}\"]\n{extra}\n"
    )
}

/// netfence with interception (the test CA trusted upstream), `toml` added to the config and
/// `args`; returns it, its CA's PEM and the scratch directory.
fn spawn(
    up_ca: &TestCa,
    toml: &str,
    args: &[String],
    env: &[(&str, &str)],
) -> (Netfence, String, TempDir) {
    spawn_intercepting(up_ca, toml, "", args, env)
}

fn map_all(port: u16) -> Vec<String> {
    vec!["--map".to_string(), format!("{PUBLIC_IP}=127.0.0.1:{port}")]
}

fn placeholder() -> String {
    default_placeholder("API_KEY")
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn https(g: &mut Guest, nf: &Netfence, ca_pem: &str, name: &str) -> GuestTls {
    GuestTls::connect(
        g,
        IpAddr::V4(PUBLIC_IP),
        443,
        name,
        client_config(ca_pem, &[b"h2", b"http/1.1"]),
        deadline(SHORT),
    )
    .unwrap_or_else(|e| panic!("handshake with {name}: {e}\n{}", nf.log_text()))
}

/// Placeholders in headers become the real value on the way to an allowed host: a Bearer
/// token, Basic credentials (decoded, substituted, re-encoded), any other header; query and
/// body only where the secret opts in. Only http/1.1 is offered on such connections. The value
/// appears in no log line, even at trace level.
#[test]
fn placeholders_become_the_value_for_the_allowed_host() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start(&up_ca, NAME, &[b"h2", b"http/1.1"]);
    let toml = secret_toml("substitute_in = [\"headers\", \"query\", \"body\"]");
    let (nf, ca_pem, _dir) = spawn(
        &up_ca,
        &toml,
        &map_all(server.port),
        &[("RUST_LOG", "trace")],
    );
    let mut g = guest_up(&nf);
    let ph = placeholder();
    let mut s = https(&mut g, &nf, &ca_pem, NAME);
    assert_eq!(
        s.conn.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "connections that can carry secrets offer only http/1.1"
    );
    let basic = base64_encode(&format!("user:{ph}"));
    let body = format!("{{\"key\":\"{ph}\"}}");
    let request = format!(
        "POST /v1/x?key={ph} HTTP/1.1\r\nHost: {NAME}\r\nAuthorization: Bearer {ph}\r\n\
         X-Api-Key: {ph}\r\nProxy-Authorization: Basic {basic}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.request(&mut g, request.as_bytes(), deadline(SHORT))
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    let got = server.all_bytes();
    let got_text = String::from_utf8_lossy(&got);
    assert!(
        !contains(&got, &ph),
        "a placeholder reached the server: {got_text}"
    );
    assert!(
        got_text.contains(&format!("Authorization: Bearer {KEY}")),
        "{got_text}"
    );
    assert!(
        got_text.contains(&format!("X-Api-Key: {KEY}")),
        "{got_text}"
    );
    let real_basic = base64_encode(&format!("user:{KEY}"));
    assert!(
        got_text.contains(&format!("Basic {real_basic}")),
        "{got_text}"
    );
    assert!(got_text.contains(&format!("?key={KEY}")), "{got_text}");
    assert!(
        got_text.contains(&format!("{{\"key\":\"{KEY}\"}}")),
        "{got_text}"
    );
    assert!(
        got_text.contains(&format!(
            "Content-Length: {}",
            body.len() - ph.len() + KEY.len()
        )) || got_text.to_ascii_lowercase().contains(&format!(
            "content-length: {}",
            body.len() - ph.len() + KEY.len()
        )),
        "{got_text}"
    );
    drop(s);
    drop(g);
    let _ = nf.wait_for_log("link closed", SHORT);
    let lines = nf.log_lines();
    assert!(
        lines.iter().any(|l| l.contains("TRACE")),
        "the log was not at trace level"
    );
    let leaked: Vec<&String> = lines.iter().filter(|l| l.contains(KEY)).collect();
    assert!(leaked.is_empty(), "the value is in the log: {leaked:?}");
}

/// A placeholder split across TLS records (two writes, each its own record) is still found.
#[test]
fn a_placeholder_split_across_tls_records_is_substituted() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start(&up_ca, NAME, &[b"http/1.1"]);
    let (nf, ca_pem, _dir) = spawn(&up_ca, &secret_toml(""), &map_all(server.port), &[]);
    let mut g = guest_up(&nf);
    let ph = placeholder();
    let mut s = https(&mut g, &nf, &ca_pem, NAME);
    let request = format!("GET / HTTP/1.1\r\nHost: {NAME}\r\nAuthorization: Bearer {ph}\r\n\r\n");
    let cut = request.find(&ph).unwrap() + ph.len() / 2;
    // The first half goes out as its own record, and is flushed to the wire, before the rest.
    s.conn
        .writer()
        .write_all(&request.as_bytes()[..cut])
        .unwrap();
    s.pump_until(&mut g, deadline(SHORT), |c| !c.conn.wants_write())
        .unwrap();
    g.run_for(Duration::from_millis(50));
    s.request(&mut g, &request.as_bytes()[cut..], deadline(SHORT))
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    let got = server.all_bytes();
    assert!(
        contains(&got, &format!("Bearer {KEY}")),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(!contains(&got, &ph));
}

/// The same placeholder toward a host the secret does not allow is a violation: under
/// `block_and_log` (the default) the connection is reset, nothing reaches the server, and the
/// log names the secret and the host, never the value. `block` resets without the line.
#[test]
fn a_placeholder_for_another_host_is_blocked_and_logged() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start(&up_ca, OTHER, &[b"http/1.1"]);
    let (nf, ca_pem, _dir) = spawn(&up_ca, &secret_toml(""), &map_all(server.port), &[]);
    let mut g = guest_up(&nf);
    let ph = placeholder();
    let mut s = https(&mut g, &nf, &ca_pem, OTHER);
    let request = format!("GET / HTTP/1.1\r\nHost: {OTHER}\r\nAuthorization: Bearer {ph}\r\n\r\n");
    let err = s
        .request(&mut g, request.as_bytes(), deadline(SHORT))
        .expect_err("the request must not be answered");
    assert!(err.contains("closed") || err.contains("TLS"), "{err}");
    let got = server.all_bytes();
    assert!(
        !contains(&got, &ph) && !contains(&got, KEY),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let line = nf
        .wait_for_log("secret violation", SHORT)
        .unwrap_or_else(|| panic!("no violation logged\n{}", nf.log_text()));
    assert!(line.contains("API_KEY") && line.contains(OTHER), "{line}");
    assert!(!line.contains(KEY));

    // `block`: reset, no line.
    let (nf, ca_pem, _dir2) = spawn(
        &up_ca,
        &format!("on_secret_violation = \"block\"\n{}", secret_toml("")),
        &map_all(server.port),
        &[],
    );
    let mut g = guest_up(&nf);
    let mut s = https(&mut g, &nf, &ca_pem, OTHER);
    assert!(s
        .request(&mut g, request.as_bytes(), deadline(SHORT))
        .is_err());
    g.run_for(Duration::from_millis(200));
    assert!(
        !nf.log_lines()
            .iter()
            .any(|l| l.contains("secret violation")),
        "block logs nothing"
    );
}

/// A plain HTTP server on loopback that answers each request with itself and keeps them.
fn plain_http_server() -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let n = match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    log.lock().unwrap().extend_from_slice(&chunk[..n]);
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = request_end(&buf) {
                        let req: Vec<u8> = buf.drain(..end).collect();
                        let head =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", req.len());
                        let _ = stream.write_all(head.as_bytes());
                        let _ = stream.write_all(&req);
                    }
                }
            });
        }
    });
    (port, seen)
}

/// Plain HTTP on port 80: the guest resolved the name through the gateway, so the request's
/// Host is bound to the address; a placeholder split across TCP segments is substituted.
#[test]
fn plain_http_to_a_resolved_allowed_host_is_substituted() {
    let up_ca = TestCa::new("test upstream CA");
    let (port, seen) = plain_http_server();
    let dns = FakeDns::start(&[(NAME, Answer::A(vec![PUBLIC_IP]))]);
    let toml = format!(
        "{}\n[dns]\nnameservers = [\"{}\"]\n",
        secret_toml(""),
        dns.nameserver()
    );
    let (nf, _ca_pem, _dir) = spawn(&up_ca, &toml, &map_all(port), &[]);
    let mut g = guest_up(&nf);
    udp_lookup(&mut g, GATEWAY, NAME, RecordType::A, SHORT).expect("lookup");
    let ph = placeholder();
    let request = format!("GET / HTTP/1.1\r\nHost: {NAME}\r\nAuthorization: Bearer {ph}\r\n\r\n");
    let h = g.tcp_connect(PUBLIC_IP, 80, SHORT).expect("connect");
    let cut = request.find(&ph).unwrap() + 10;
    for piece in [&request.as_bytes()[..cut], &request.as_bytes()[cut..]] {
        g.tcp_send_all(h, piece, deadline(SHORT)).unwrap();
        assert!(g.tcp_flush(h, deadline(SHORT)), "a piece was not sent");
    }
    let response = g
        .tcp_recv_exact(h, 38, deadline(SHORT))
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert!(response.starts_with(b"HTTP/1.1 200 OK"));
    let got = seen.lock().unwrap().clone();
    assert!(
        contains(&got, &format!("Bearer {KEY}")),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(!contains(&got, &ph));
}

/// A placeholder in a raw (non-HTTP) stream to an address no allowed name resolved to is a
/// violation: reset, logged.
#[test]
fn a_placeholder_in_a_raw_stream_is_a_violation() {
    let up_ca = TestCa::new("test upstream CA");
    let (port, seen) = plain_http_server();
    let (nf, _ca_pem, _dir) = spawn(&up_ca, &secret_toml(""), &map_all(port), &[]);
    let mut g = guest_up(&nf);
    let h = g.tcp_connect(PUBLIC_IP, 5555, SHORT).expect("connect");
    let ph = placeholder();
    g.tcp_send_all(h, format!("hello {ph} bye").as_bytes(), deadline(SHORT))
        .unwrap();
    let reset = g.poll_until(deadline(SHORT), |g| {
        (g.tcp(h).state() == smoltcp::socket::tcp::State::Closed).then_some(())
    });
    assert!(reset.is_some(), "the raw stream was not reset");
    assert!(!contains(&seen.lock().unwrap(), &ph));
    let line = nf.wait_for_log("secret violation", SHORT).expect("logged");
    assert!(line.contains("API_KEY"), "{line}");
}

/// `block_and_terminate`: the VM's network goes down (the VMM's connection ends) and, under
/// `--once`, netfence exits with status 3.
#[test]
fn block_and_terminate_takes_the_link_down_and_exits_3_under_once() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start(&up_ca, OTHER, &[b"http/1.1"]);
    let mut args = map_all(server.port);
    args.push("--once".to_string());
    let (mut nf, ca_pem, _dir) = spawn(
        &up_ca,
        &secret_toml("on_violation = \"block_and_terminate\""),
        &args,
        &[],
    );
    let mut g = guest_up(&nf);
    let ph = placeholder();
    let mut s = https(&mut g, &nf, &ca_pem, OTHER);
    let request = format!("GET / HTTP/1.1\r\nHost: {OTHER}\r\nAuthorization: Bearer {ph}\r\n\r\n");
    assert!(s
        .request(&mut g, request.as_bytes(), deadline(SHORT))
        .is_err());
    let status = nf
        .wait_exit(SHORT)
        .unwrap_or_else(|| panic!("netfence did not exit\n{}", nf.log_text()));
    assert_eq!(status.code(), Some(3), "{}", nf.log_text());
    assert!(nf
        .log_lines()
        .iter()
        .any(|l| l.contains("block_and_terminate")));
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
