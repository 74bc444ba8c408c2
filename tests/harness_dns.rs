//! DNS at the gateway and domain-based policy, through the harness (issue 4):
//!
//! - the gateway's DNS service forwards UDP and DNS-over-TCP queries to the upstreams in
//!   `dns.nameservers` (fake servers on 127.0.0.1 here), fails over to the next upstream when
//!   one times out, passes big answers truncated (TC) so the client retries over TCP, and
//!   answers port-53 traffic to other addresses itself (`dns.intercept_all`);
//! - blocked names (`deny_domains`, `deny_domain_suffixes`) get NXDOMAIN without an upstream
//!   query; answers in private/loopback/metadata space are removed (rebind protection);
//!   `host.microsandbox.internal` is answered locally with the gateway address;
//! - a TCP flow is judged by the names the guest resolved for its address (the IP -> names
//!   cache, `domain_source="dns-cache"`); an address never resolved matches no name rule;
//! - TLS first flight (port 443 under name rules): netfence reads the ClientHello's SNI before
//!   connecting (`domain_source="sni"`): a denied SNI is reset even when the address was
//!   allowed, an SNI that was not resolved to that address through netfence is reset (no
//!   domain fronting), and an allowed hello reaches the loopback server byte for byte.
//!
//! Issue 9: a cached name is found under any spelling of its address (`[::ffff:a.b.c.d]`); an
//! answer binds its addresses to the question name only (a CNAME into an allowed name allows
//! nothing, a deny rule on a CNAME target still denies); rebind protection covers mapped AAAA
//! and HTTPS hints; upstream queries leave from different ports; UDP answers fit the link MTU.
//!
//! Every "public" address is in 203.0.113.0/24 or 198.51.100.0/24 and `--map`ped to a loopback
//! server, so nothing leaves the host.

mod common;
mod dnsfake;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use common::process::field;
use common::servers::{OneShotServer, TcpEchoServer};
use common::*;
use dnsfake::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;

/// A second documentation address (the first is `PUBLIC_IP`, 203.0.113.7).
const PUBLIC_IP2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 8);
const PUBLIC_IP3: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

/// Starts netfence with `toml` as its `--config` plus `args`. The scratch directory holding the
/// config lives as long as the returned guard.
fn spawn_with_config(toml: &str, args: &[String]) -> (Netfence, TempDir) {
    let dir = TempDir::new("netfence-dns-cfg");
    let cfg = write_config(dir.path(), toml);
    let nf = Netfence::builder()
        .arg("--config")
        .arg(cfg.display().to_string())
        .args(args)
        .spawn();
    (nf, dir)
}

/// `[dns]` table with these upstreams (and extra lines).
fn dns_table(nameservers: &[String], extra: &str) -> String {
    let list: Vec<String> = nameservers.iter().map(|n| format!("\"{n}\"")).collect();
    format!("[dns]\nnameservers = [{}]\n{extra}\n", list.join(", "))
}

fn map(guest: &str, host_port: u16) -> [String; 2] {
    [
        "--map".to_string(),
        format!("{guest}=127.0.0.1:{host_port}"),
    ]
}

fn lookup_ok(g: &mut Guest, nf: &Netfence, name: &str) -> UdpAnswer {
    udp_lookup(g, GATEWAY, name, RecordType::A, SHORT)
        .unwrap_or_else(|e| panic!("lookup of {name}: {e}\n{}", nf.log_text()))
}

/// Waits for a decision line for `dst` logged after `mark`, optionally with this
/// `domain_source`; returns the whole line.
fn wait_decision(nf: &Netfence, mark: usize, dst: &str, source: Option<&str>) -> String {
    nf.wait_for_line(mark, SHORT, |l| {
        l.contains("decision")
            && field(l, "dst").as_deref() == Some(dst)
            && match source {
                Some(s) => field(l, "domain_source").as_deref() == Some(s),
                None => true,
            }
    })
    .unwrap_or_else(|| {
        panic!(
            "no decision for {dst} (domain_source {source:?}) logged\n{}",
            nf.log_text()
        )
    })
}

fn action(line: &str) -> String {
    field(line, "action").unwrap_or_default()
}

/// Waits until the guest's socket is closed (an RST arrived) and returns how long it took.
fn wait_reset(g: &mut Guest, h: SocketHandle) -> Option<Duration> {
    let start = Instant::now();
    g.poll_until(deadline(SHORT), |g| {
        (g.tcp(h).state() == State::Closed).then_some(())
    })
    .map(|_| start.elapsed())
}

/// True when nothing has connected to `l` (a non-blocking listener) so far.
/// Whether no byte of a refused TLS flow reached the host side. netfence dials the host at
/// the guest's SYN, as for any TCP flow (the guest's handshake completes only once the host is
/// up), so the server may see a connection: it must see it closed or reset without one byte.
fn nothing_reached(l: &TcpListener) -> bool {
    l.set_nonblocking(true).expect("non-blocking listener");
    loop {
        let mut conn = match l.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) => panic!("accept: {e}"),
        };
        conn.set_nonblocking(false).expect("blocking");
        conn.set_read_timeout(Some(SHORT)).expect("read timeout");
        let mut buf = [0u8; 1024];
        match std::io::Read::read(&mut conn, &mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(n) => {
                eprintln!("{n} bytes reached the server");
                return false;
            }
            Err(e) => {
                eprintln!("the refused flow's host connection is still open: {e}");
                return false;
            }
        }
    }
}

fn idle_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind listener");
    let port = l.local_addr().unwrap().port();
    (l, port)
}

// ---- the DNS service ---------------------------------------------------------------------

#[test]
fn queries_are_forwarded_over_udp_and_tcp() {
    let up = FakeDns::start(&[
        ("www.fwd.example", Answer::A(vec![PUBLIC_IP3])),
        ("two.fwd.example", Answer::A(vec![PUBLIC_IP, PUBLIC_IP2])),
        ("broken.fwd.example", Answer::ServFail),
    ]);
    let (nf, _cfg) = spawn_with_config(&dns_table(&[up.nameserver()], ""), &[]);
    let mut g = guest_up(&nf);
    let lease = g.lease.clone().expect("lease");
    assert_eq!(
        lease.dns_servers,
        vec![GATEWAY],
        "DHCP must offer the gateway as resolver"
    );

    // UDP: the answer comes from the address asked, with the guest's id and question.
    let a = lookup_ok(&mut g, &nf, "www.fwd.example");
    assert_eq!(a.from, (GATEWAY, 53), "answer source");
    assert_eq!(a.message.response_code, ResponseCode::NoError);
    assert_eq!(a.message.queries.len(), 1);
    assert_eq!(
        norm(&a.message.queries[0].name.to_ascii()),
        "www.fwd.example"
    );
    assert_eq!(a_records(&a.message), vec![PUBLIC_IP3]);
    assert!(up.wait_asked(SHORT, |q| q.name == "www.fwd.example"
        && q.qtype == RecordType::A));

    // Upstream NXDOMAIN and SERVFAIL are passed back.
    let nx = lookup_ok(&mut g, &nf, "missing.fwd.example");
    assert_eq!(nx.message.response_code, ResponseCode::NXDomain);
    assert_eq!(up.times_asked("missing.fwd.example"), 1);
    let sf = lookup_ok(&mut g, &nf, "broken.fwd.example");
    assert_eq!(sf.message.response_code, ResponseCode::ServFail);

    // DNS over TCP to the gateway, two queries on one connection.
    let h = g
        .tcp_connect(GATEWAY, 53, SHORT)
        .unwrap_or_else(|e| panic!("TCP 53 to the gateway: {e:?}\n{}", nf.log_text()));
    let m = tcp_lookup(&mut g, h, "two.fwd.example", RecordType::A, SHORT)
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert_eq!(m.response_code, ResponseCode::NoError);
    let mut ips = a_records(&m);
    ips.sort();
    assert_eq!(ips, vec![PUBLIC_IP, PUBLIC_IP2]);
    let m = tcp_lookup(&mut g, h, "www.fwd.example", RecordType::AAAA, SHORT)
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert!(
        m.answers.is_empty(),
        "no AAAA in the fake zone: {:?}",
        m.answers
    );
    assert!(up.wait_asked(SHORT, |q| q.name == "two.fwd.example"));
    assert!(up.wait_asked(SHORT, |q| q.name == "www.fwd.example"
        && q.qtype == RecordType::AAAA));
    // The guest closes; the gateway closes its side too.
    g.tcp_shutdown_write(h);
    let (_, fin) = g.tcp_recv_to_eof(h, deadline(SHORT));
    assert!(
        fin,
        "the gateway did not close the DNS-over-TCP connection after the guest did"
    );
}

/// An answer bigger than the client's UDP size comes back truncated with TC set; the same
/// question over TCP gets every record.
#[test]
fn big_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let many: Vec<Ipv4Addr> = (1..=60).map(|i| Ipv4Addr::new(203, 0, 113, i)).collect();
    let up = FakeDns::start(&[("big.example", Answer::A(many.clone()))]);
    let (nf, _cfg) = spawn_with_config(&dns_table(&[up.nameserver()], ""), &[]);
    let mut g = guest_up(&nf);

    let udp = lookup_ok(&mut g, &nf, "big.example");
    assert!(
        udp.message.truncation,
        "a {}-byte answer over UDP without TC",
        udp.bytes.len()
    );
    assert!(
        udp.bytes.len() <= 512,
        "UDP answer of {} bytes to a client without EDNS",
        udp.bytes.len()
    );

    let h = g
        .tcp_connect(GATEWAY, 53, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let m = tcp_lookup(&mut g, h, "big.example", RecordType::A, SHORT)
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert!(!m.truncation, "TCP answer with TC set");
    let mut got = a_records(&m);
    got.sort();
    assert_eq!(got, many, "every record over TCP");
}

/// With `dns.intercept_all` (the default) a query to another resolver is answered by the
/// gateway's service, from the address the guest asked. The address is mapped to a loopback
/// trap so that a broken interception would still stay on this host, and show.
#[test]
fn queries_to_other_resolvers_are_intercepted() {
    let up = FakeDns::start(&[("intercept.example", Answer::A(vec![PUBLIC_IP]))]);
    let trap = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let other = Ipv4Addr::new(198, 51, 100, 53);
    let (nf, _cfg) = spawn_with_config(
        &dns_table(&[up.nameserver()], ""),
        &map(&format!("{other}:53"), trap.local_addr().unwrap().port()),
    );
    let mut g = guest_up(&nf);
    let a = udp_lookup(&mut g, other, "intercept.example", RecordType::A, SHORT)
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert_eq!(
        a.from,
        (other, 53),
        "answer must come from the address asked"
    );
    assert_eq!(a_records(&a.message), vec![PUBLIC_IP]);
    assert_eq!(up.times_asked("intercept.example"), 1);
    let mut buf = [0u8; 512];
    assert!(
        matches!(trap.recv_from(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the query went to the mapped resolver instead of the gateway's service"
    );
}

#[test]
fn upstream_timeout_fails_over_to_the_second_nameserver() {
    let silent = SilentDns::start();
    let up = FakeDns::start(&[("failover.example", Answer::A(vec![PUBLIC_IP]))]);
    let timeout = Duration::from_millis(400);
    let toml = dns_table(
        &[silent.nameserver(), up.nameserver()],
        &format!("query_timeout_ms = {}", timeout.as_millis()),
    );
    let (nf, _cfg) = spawn_with_config(&toml, &[]);
    let mut g = guest_up(&nf);
    let start = Instant::now();
    let a = lookup_ok(&mut g, &nf, "failover.example");
    let took = start.elapsed();
    assert_eq!(a.message.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&a.message), vec![PUBLIC_IP]);
    assert!(
        silent.received() >= 1,
        "the first nameserver was never asked"
    );
    assert_eq!(up.times_asked("failover.example"), 1);
    assert!(
        took >= timeout,
        "answered after {took:?}: the second nameserver was asked before the first timed out"
    );
    assert!(took < SHORT, "failover took {took:?}");
}

#[test]
fn every_upstream_silent_gives_servfail() {
    let (s1, s2) = (SilentDns::start(), SilentDns::start());
    let toml = dns_table(
        &[s1.nameserver(), s2.nameserver()],
        "query_timeout_ms = 300",
    );
    let (nf, _cfg) = spawn_with_config(&toml, &[]);
    let mut g = guest_up(&nf);
    let start = Instant::now();
    let a = lookup_ok(&mut g, &nf, "nobody.example");
    let took = start.elapsed();
    assert_eq!(a.message.response_code, ResponseCode::ServFail);
    assert!(
        s1.received() >= 1 && s2.received() >= 1,
        "both upstreams must be tried"
    );
    assert!(
        took >= Duration::from_millis(600),
        "SERVFAIL after {took:?}, before both timeouts"
    );
}

#[test]
fn blocked_names_get_nxdomain_without_an_upstream_query() {
    let public = Answer::A(vec![PUBLIC_IP]);
    let up = FakeDns::start(&[
        ("blocked.example", public.clone()),
        ("sub.blocked.example", public.clone()),
        ("ads.example", public.clone()),
        ("x.y.ads.example", public.clone()),
        ("notads.example", public.clone()),
    ]);
    let toml = format!(
        "deny_domains = [\"blocked.example\"]\ndeny_domain_suffixes = [\".ads.example\"]\n{}",
        dns_table(&[up.nameserver()], "")
    );
    let (nf, _cfg) = spawn_with_config(&toml, &[]);
    let mut g = guest_up(&nf);
    for name in [
        "blocked.example",
        "BLOCKED.Example.",
        "ads.example",
        "x.y.ads.example",
    ] {
        let a = lookup_ok(&mut g, &nf, name);
        assert_eq!(a.message.response_code, ResponseCode::NXDomain, "{name}");
        assert!(
            a.message.answers.is_empty(),
            "{name}: {:?}",
            a.message.answers
        );
        // AAAA too.
        let a = udp_lookup(&mut g, GATEWAY, name, RecordType::AAAA, SHORT).unwrap();
        assert_eq!(
            a.message.response_code,
            ResponseCode::NXDomain,
            "{name} AAAA"
        );
    }
    // deny_domains is exact; a suffix needs a label boundary.
    for name in ["sub.blocked.example", "notads.example"] {
        let a = lookup_ok(&mut g, &nf, name);
        assert_eq!(
            a.message.response_code,
            ResponseCode::NoError,
            "{name} must resolve"
        );
        assert_eq!(a_records(&a.message), vec![PUBLIC_IP], "{name}");
    }
    for name in ["blocked.example", "ads.example", "x.y.ads.example"] {
        assert_eq!(up.times_asked(name), 0, "blocked {name} was sent upstream");
    }
    assert!(
        nf.wait_for_log("dns: blocked, NXDOMAIN", SHORT).is_some(),
        "blocked queries are not logged"
    );
}

#[test]
fn rebind_protection_removes_private_answers() {
    let up = FakeDns::start(&[
        (
            "rebind.example",
            Answer::A(vec![Ipv4Addr::new(10, 0, 0, 5)]),
        ),
        ("loop.example", Answer::A(vec![Ipv4Addr::new(127, 0, 0, 1)])),
        (
            "meta.example",
            Answer::A(vec![Ipv4Addr::new(169, 254, 169, 254)]),
        ),
        (
            "lan.example",
            Answer::A(vec![Ipv4Addr::new(192, 168, 1, 10)]),
        ),
        (
            "mixed.example",
            Answer::A(vec![Ipv4Addr::new(10, 0, 0, 6), PUBLIC_IP3]),
        ),
        (
            "explicit.example",
            Answer::A(vec![Ipv4Addr::new(10, 9, 0, 5)]),
        ),
    ]);
    // An explicit allow rule for 10.9.0.0/16 lets that range through rebind protection.
    let toml = format!(
        "policy = \"public-only\"\n[[rules]]\naction = \"allow\"\ndestination = \"10.9.0.0/16\"\n{}",
        dns_table(&[up.nameserver()], "")
    );
    let (nf, _cfg) = spawn_with_config(&toml, &[]);
    let mut g = guest_up(&nf);
    for name in [
        "rebind.example",
        "loop.example",
        "meta.example",
        "lan.example",
    ] {
        let a = lookup_ok(&mut g, &nf, name);
        assert_eq!(
            a.message.response_code,
            ResponseCode::NXDomain,
            "{name} resolved to a private address: {:?}",
            a_records(&a.message)
        );
        assert!(
            a.message.answers.is_empty(),
            "{name}: {:?}",
            a.message.answers
        );
        assert_eq!(
            up.times_asked(name),
            1,
            "{name} must be asked upstream, then filtered"
        );
    }
    let a = lookup_ok(&mut g, &nf, "mixed.example");
    assert_eq!(a.message.response_code, ResponseCode::NoError);
    assert_eq!(
        a_records(&a.message),
        vec![PUBLIC_IP3],
        "only the public address is left"
    );
    let a = lookup_ok(&mut g, &nf, "explicit.example");
    assert_eq!(
        a.message.response_code,
        ResponseCode::NoError,
        "explicitly allowed range"
    );
    assert_eq!(a_records(&a.message), vec![Ipv4Addr::new(10, 9, 0, 5)]);
}

#[test]
fn host_alias_is_answered_locally_with_the_gateway() {
    let up = FakeDns::start(&[]);
    let (nf, _cfg) = spawn_with_config(&dns_table(&[up.nameserver()], ""), &[]);
    let mut g = guest_up(&nf);
    for name in ["host.microsandbox.internal", "Host.MicroSandbox.Internal."] {
        let a = lookup_ok(&mut g, &nf, name);
        assert_eq!(a.message.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(a_records(&a.message), vec![GATEWAY], "{name}");
    }
    // Over TCP as well.
    let h = g
        .tcp_connect(GATEWAY, 53, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let m = tcp_lookup(
        &mut g,
        h,
        "host.microsandbox.internal",
        RecordType::A,
        SHORT,
    )
    .unwrap();
    assert_eq!(a_records(&m), vec![GATEWAY]);
    assert!(
        up.asked().is_empty(),
        "a host alias was sent upstream: {:?}",
        up.asked()
    );
}

// ---- names in flow decisions ---------------------------------------------------------------

/// default_egress deny; DNS to the gateway allowed; tracker.example denied on tcp/80 and
/// otherwise allowed, like api.example; `up` is the upstream.
fn api_and_tracker_policy(up: &FakeDns) -> String {
    format!(
        r#"[policy]
default_egress = "deny"
rules = [
  {{ action = "allow", destination = "host", protocols = ["udp"], ports = [53] }},
  {{ action = "deny", destination = "tracker.example", protocols = ["tcp"], ports = [80] }},
  {{ action = "allow", destination = "api.example" }},
  {{ action = "allow", destination = "tracker.example" }},
]
{}"#,
        dns_table(&[up.nameserver()], "")
    )
}

/// default_egress deny; DNS to the gateway and `api.example` allowed. A TCP flow to the
/// address the guest resolved for api.example is allowed by that rule (the name comes from the
/// cache); before the lookup, and to an address never resolved, it is denied.
#[test]
fn tcp_flow_is_decided_by_the_names_the_guest_resolved() {
    let echo = TcpEchoServer::start();
    let up = FakeDns::start(&[
        ("api.example", Answer::A(vec![PUBLIC_IP])),
        ("tracker.example", Answer::A(vec![PUBLIC_IP3])),
    ]);
    let toml = api_and_tracker_policy(&up);
    let mut args = vec!["--reject".to_string()];
    for ip in [PUBLIC_IP, PUBLIC_IP2, PUBLIC_IP3] {
        args.extend(map(&ip.to_string(), echo.port()));
    }
    let (nf, _cfg) = spawn_with_config(&toml, &args);
    let mut g = guest_up(&nf);
    let dst = format!("{PUBLIC_IP}:80");

    // Not resolved yet: the address alone matches no rule.
    let mark = nf.log_mark();
    match g.tcp_connect(PUBLIC_IP, 80, SHORT) {
        Err(ConnectError::Reset { .. }) => {}
        other => panic!(
            "flow to {PUBLIC_IP} before any lookup: {other:?}\n{}",
            nf.log_text()
        ),
    }
    let line = wait_decision(&nf, mark, &dst, None);
    assert_eq!(action(&line), "deny", "{line}");

    // Resolve api.example through the gateway, then the same address is allowed by name.
    let a = lookup_ok(&mut g, &nf, "api.example");
    assert_eq!(a_records(&a.message), vec![PUBLIC_IP]);
    let mark = nf.log_mark();
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("flow to resolved api.example: {e:?}\n{}", nf.log_text()));
    g.tcp_send_all(h, b"via the cache", deadline(SHORT))
        .unwrap();
    assert_eq!(
        g.tcp_recv_exact(h, 13, deadline(SHORT)).unwrap(),
        b"via the cache"
    );
    let line = wait_decision(&nf, mark, &dst, None);
    assert_eq!(action(&line), "allow", "{line}");
    assert_eq!(
        field(&line, "domains").as_deref(),
        Some("api.example"),
        "{line}"
    );
    assert_eq!(
        field(&line, "domain_source").as_deref(),
        Some("dns-cache"),
        "{line}"
    );

    // An address the guest never resolved is not api.example.
    let mark = nf.log_mark();
    match g.tcp_connect(PUBLIC_IP2, 80, SHORT) {
        Err(ConnectError::Reset { .. }) => {}
        other => panic!(
            "flow to never-resolved {PUBLIC_IP2}: {other:?}\n{}",
            nf.log_text()
        ),
    }
    let line = wait_decision(&nf, mark, &format!("{PUBLIC_IP2}:80"), None);
    assert_eq!(action(&line), "deny", "{line}");
    assert!(!line.contains("api.example"), "{line}");

    // A name deny rule reaches flows through the cache too: tcp/80 of tracker.example is
    // denied, its other ports allowed.
    let a = lookup_ok(&mut g, &nf, "tracker.example");
    assert_eq!(a_records(&a.message), vec![PUBLIC_IP3]);
    let mark = nf.log_mark();
    match g.tcp_connect(PUBLIC_IP3, 80, SHORT) {
        Err(ConnectError::Reset { .. }) => {}
        other => panic!(
            "tracker.example:80 must be denied: {other:?}\n{}",
            nf.log_text()
        ),
    }
    let line = wait_decision(&nf, mark, &format!("{PUBLIC_IP3}:80"), None);
    assert_eq!(action(&line), "deny", "{line}");
    assert_eq!(
        field(&line, "domains").as_deref(),
        Some("tracker.example"),
        "{line}"
    );
    assert_eq!(
        field(&line, "domain_source").as_deref(),
        Some("dns-cache"),
        "{line}"
    );
    let mark = nf.log_mark();
    let h = g
        .tcp_connect(PUBLIC_IP3, 8080, SHORT)
        .unwrap_or_else(|e| panic!("tracker.example:8080: {e:?}\n{}", nf.log_text()));
    g.tcp_send_all(h, b"ok", deadline(SHORT)).unwrap();
    assert_eq!(g.tcp_recv_exact(h, 2, deadline(SHORT)).unwrap(), b"ok");
    let line = wait_decision(&nf, mark, &format!("{PUBLIC_IP3}:8080"), None);
    assert_eq!(action(&line), "allow", "{line}");

    assert_eq!(
        echo.accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "only the two allowed flows may reach the host side"
    );
}

// ---- TLS first flight ----------------------------------------------------------------------

/// Connects to `dst:443`, sends `hello`, and expects netfence to reset the connection after
/// reading it. Returns the SNI decision line.
fn hello_is_reset(g: &mut Guest, nf: &Netfence, dst: Ipv4Addr, hello: &[u8], sni: &str) -> String {
    let mark = nf.log_mark();
    let h = g.tcp_connect(dst, 443, SHORT).unwrap_or_else(|e| {
        panic!(
            "the guest handshake to {dst}:443 must complete: {e:?}\n{}",
            nf.log_text()
        )
    });
    g.tcp_send_all(h, hello, deadline(SHORT)).unwrap();
    let got = wait_reset(g, h);
    let sni_lines: Vec<String> = nf
        .log_lines()
        .into_iter()
        .skip(mark)
        .filter(|l| l.contains("domain_source=\"sni\"") || l.contains("domain_source=sni"))
        .collect();
    assert!(
        got.is_some(),
        "ClientHello for {sni} to {dst} was not reset (guest socket {}; SNI decisions: {sni_lines:?})\n{}",
        g.tcp(h).state(),
        nf.log_text()
    );
    let line = wait_decision(nf, mark, &format!("{dst}:443"), Some("sni"));
    g.sockets.remove(h);
    assert_eq!(action(&line), "deny", "{line}");
    assert_eq!(field(&line, "domains").as_deref(), Some(sni), "{line}");
    line
}

/// `deny_domains = ["evil.example"]`: the address is public (allowed by the preset), but the
/// ClientHello names evil.example, so the flow is reset and never reaches the host side.
#[test]
fn sni_of_a_denied_name_is_reset_even_when_the_address_is_allowed() {
    let up = FakeDns::start(&[]);
    let (server, port) = idle_listener();
    let toml = format!(
        "deny_domains = [\"evil.example\"]\n{}",
        dns_table(&[up.nameserver()], "")
    );
    let (nf, _cfg) = spawn_with_config(&toml, &map(&format!("{PUBLIC_IP}:443"), port));
    let mut g = guest_up(&nf);
    // The resolver would not even name it.
    let a = lookup_ok(&mut g, &nf, "evil.example");
    assert_eq!(a.message.response_code, ResponseCode::NXDomain);

    let mark = nf.log_mark();
    let hello = client_hello("evil.example");
    hello_is_reset(&mut g, &nf, PUBLIC_IP, &hello, "evil.example");
    // The SYN itself was allowed (public address), so this is the TLS layer's doing.
    let syn = wait_decision(&nf, mark, &format!("{PUBLIC_IP}:443"), None);
    assert_eq!(action(&syn), "allow", "{syn}");
    assert!(
        nothing_reached(&server),
        "a denied TLS flow sent bytes to the loopback server"
    );
}

/// Rule `allow good.example` (and `cdn.example`) under default deny. The guest resolved
/// good.example -> 203.0.113.7 and cdn.example -> 203.0.113.8.
/// - to 203.0.113.7 with SNI other.example: denied (no rule allows that name);
/// - to 203.0.113.8 with SNI good.example: denied (good.example was not resolved to that
///   address: domain fronting).
#[test]
fn sni_naming_another_host_than_the_one_resolved_is_reset() {
    let up = FakeDns::start(&[
        ("good.example", Answer::A(vec![PUBLIC_IP])),
        ("cdn.example", Answer::A(vec![PUBLIC_IP2])),
    ]);
    let (server_a, port_a) = idle_listener();
    let (server_b, port_b) = idle_listener();
    let toml = format!(
        r#"[policy]
default_egress = "deny"
rules = [
  {{ action = "allow", destination = "host", protocols = ["udp"], ports = [53] }},
  {{ action = "allow", destination = "good.example" }},
  {{ action = "allow", destination = "cdn.example" }},
]
{}"#,
        dns_table(&[up.nameserver()], "")
    );
    let mut args = map(&format!("{PUBLIC_IP}:443"), port_a).to_vec();
    args.extend(map(&format!("{PUBLIC_IP2}:443"), port_b));
    let (nf, _cfg) = spawn_with_config(&toml, &args);
    let mut g = guest_up(&nf);
    assert_eq!(
        a_records(&lookup_ok(&mut g, &nf, "good.example").message),
        vec![PUBLIC_IP]
    );
    assert_eq!(
        a_records(&lookup_ok(&mut g, &nf, "cdn.example").message),
        vec![PUBLIC_IP2]
    );

    let mark = nf.log_mark();
    hello_is_reset(
        &mut g,
        &nf,
        PUBLIC_IP,
        &client_hello("other.example"),
        "other.example",
    );
    let syn = wait_decision(&nf, mark, &format!("{PUBLIC_IP}:443"), Some("dns-cache"));
    assert_eq!(
        action(&syn),
        "allow",
        "the SYN was allowed by the cached name: {syn}"
    );

    let line = hello_is_reset(
        &mut g,
        &nf,
        PUBLIC_IP2,
        &client_hello("good.example"),
        "good.example",
    );
    assert!(
        field(&line, "reason").is_some_and(|r| r.contains("not resolved")),
        "reason should say the name was not resolved to that address: {line}"
    );

    assert!(
        nothing_reached(&server_a),
        "a denied TLS flow sent bytes to server A"
    );
    assert!(
        nothing_reached(&server_b),
        "a denied TLS flow sent bytes to server B"
    );
}

/// The positive case: SNI good.example to the address good.example resolved to. netfence
/// connects upstream after reading the hello and replays it: the loopback server reads the
/// exact bytes the guest sent, and the flow carries data both ways afterwards.
#[test]
fn allowed_sni_hello_reaches_the_server_intact() {
    let up = FakeDns::start(&[("good.example", Answer::A(vec![PUBLIC_IP]))]);
    let hello = client_hello("good.example");
    let hello_len = hello.len();
    let server = OneShotServer::start(move |mut s| -> Result<(Vec<u8>, Vec<u8>), String> {
        let mut got = vec![0u8; hello_len];
        s.read_exact(&mut got)
            .map_err(|e| format!("reading the hello: {e}"))?;
        s.write_all(b"server-flight").map_err(|e| e.to_string())?;
        let rest = common::servers::read_to_eof(&mut s)?;
        Ok((got, rest))
    });
    let toml = format!(
        r#"[policy]
default_egress = "deny"
rules = [
  {{ action = "allow", destination = "host", protocols = ["udp"], ports = [53] }},
  {{ action = "allow", destination = "good.example" }},
]
{}"#,
        dns_table(&[up.nameserver()], "")
    );
    let (nf, _cfg) = spawn_with_config(&toml, &map(&format!("{PUBLIC_IP}:443"), server.port()));
    let mut g = guest_up(&nf);
    assert_eq!(
        a_records(&lookup_ok(&mut g, &nf, "good.example").message),
        vec![PUBLIC_IP]
    );

    let mark = nf.log_mark();
    let h = g
        .tcp_connect(PUBLIC_IP, 443, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}\n{}", nf.log_text()));
    g.tcp_send_all(h, &hello, deadline(SHORT)).unwrap();
    let reply = g
        .tcp_recv_exact(h, 13, deadline(SHORT))
        .unwrap_or_else(|e| {
            panic!(
                "no answer through the allowed TLS flow: {e}\n{}",
                nf.log_text()
            )
        });
    assert_eq!(reply, b"server-flight");
    g.tcp_send_all(h, b"after the hello", deadline(SHORT))
        .unwrap();
    g.tcp_shutdown_write(h);
    let (got, rest) = server
        .join_polling(&mut g, SHORT)
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()))
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert!(
        got == hello,
        "the server read a different ClientHello ({} bytes)",
        got.len()
    );
    assert_eq!(rest, b"after the hello");

    let line = wait_decision(&nf, mark, &format!("{PUBLIC_IP}:443"), Some("sni"));
    assert_eq!(action(&line), "allow", "{line}");
    assert_eq!(
        field(&line, "domains").as_deref(),
        Some("good.example"),
        "{line}"
    );
}

// ---- issue 9: names bind to the question, canonical lookups, every address vetted ----------

fn rec(name: &str, data: hickory_proto::rr::RData) -> hickory_proto::rr::Record {
    hickory_proto::rr::Record::from_rdata(
        hickory_proto::rr::Name::from_ascii(name).expect("record name"),
        FAKE_TTL,
        data,
    )
}

fn a_rec(name: &str, ip: Ipv4Addr) -> hickory_proto::rr::Record {
    rec(name, hickory_proto::rr::RData::A(ip.into()))
}

fn cname_rec(name: &str, target: &str) -> hickory_proto::rr::Record {
    rec(
        name,
        hickory_proto::rr::RData::CNAME(hickory_proto::rr::rdata::CNAME(
            hickory_proto::rr::Name::from_ascii(target).expect("CNAME target"),
        )),
    )
}

/// A decision whose destination is `ip:port` in any spelling (`[::ffff:a.b.c.d]:p` included),
/// logged after `mark`.
fn wait_decision_to(nf: &Netfence, mark: usize, ip: IpAddr, port: u16) -> String {
    nf.wait_for_line(mark, SHORT, |l| {
        l.contains("decision")
            && field(l, "dst")
                .and_then(|d| d.parse::<std::net::SocketAddr>().ok())
                .is_some_and(|d| d.ip().to_canonical() == ip.to_canonical() && d.port() == port)
    })
    .unwrap_or_else(|| panic!("no decision for {ip}:{port} logged\n{}", nf.log_text()))
}

/// The guest resolves names over IPv4 and connects to the IPv4-mapped IPv6 spelling of the
/// address (`[::ffff:203.0.113.7]`): the names cached for 203.0.113.7 are found, so the allow
/// rule for api.example and the deny rule for tracker.example both apply, and the decision
/// names the domain.
#[test]
fn mapped_ipv6_spelling_of_a_resolved_address_is_judged_by_its_names() {
    let echo = TcpEchoServer::start();
    let up = FakeDns::start(&[
        ("api.example", Answer::A(vec![PUBLIC_IP])),
        ("tracker.example", Answer::A(vec![PUBLIC_IP3])),
    ]);
    let toml = api_and_tracker_policy(&up);
    let mut args = vec!["--reject".to_string()];
    for ip in [PUBLIC_IP, PUBLIC_IP3] {
        args.extend(map(&ip.to_string(), echo.port()));
    }
    let (nf, _cfg) = spawn_with_config(&toml, &args);
    let mut g = guest_up(&nf);
    g.set_ipv6(GUEST6, PREFIX6_LEN, GATEWAY6_LL);
    assert_eq!(
        a_records(&lookup_ok(&mut g, &nf, "api.example").message),
        vec![PUBLIC_IP]
    );
    assert_eq!(
        a_records(&lookup_ok(&mut g, &nf, "tracker.example").message),
        vec![PUBLIC_IP3]
    );

    // Allowed by name through the mapped spelling.
    let mapped = PUBLIC_IP.to_ipv6_mapped();
    let mark = nf.log_mark();
    let h = g.tcp_connect(mapped, 80, SHORT).unwrap_or_else(|e| {
        panic!(
            "[{mapped}]:80 (api.example) must be allowed: {e:?}\n{}",
            nf.log_text()
        )
    });
    g.tcp_send_all(h, b"mapped", deadline(SHORT)).unwrap();
    assert_eq!(g.tcp_recv_exact(h, 6, deadline(SHORT)).unwrap(), b"mapped");
    let line = wait_decision_to(&nf, mark, IpAddr::V4(PUBLIC_IP), 80);
    assert_eq!(action(&line), "allow", "{line}");
    assert_eq!(
        field(&line, "domains").as_deref(),
        Some("api.example"),
        "{line}"
    );

    // Denied by name through the mapped spelling.
    let mapped3 = PUBLIC_IP3.to_ipv6_mapped();
    let mark = nf.log_mark();
    match g.tcp_connect(mapped3, 80, SHORT) {
        Err(ConnectError::Reset { .. }) => {}
        other => panic!(
            "[{mapped3}]:80 (tracker.example) must be denied: {other:?}\n{}",
            nf.log_text()
        ),
    }
    let line = wait_decision_to(&nf, mark, IpAddr::V4(PUBLIC_IP3), 80);
    assert_eq!(action(&line), "deny", "{line}");
    assert_eq!(
        field(&line, "domains").as_deref(),
        Some("tracker.example"),
        "{line}"
    );
    assert_eq!(
        echo.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the allowed flow may reach the host side"
    );
}

/// Policy: only good.com (by name) is allowed. The guest asks evil.example, whose zone answers
/// `evil.example CNAME good.com` + `good.com A 203.0.113.9`; and evil2.example, answered with a
/// bare `good.com A 203.0.113.8`. Neither address counts as good.com: both flows are denied.
/// The guest's own lookup of good.com (203.0.113.7) is allowed, so the policy does work.
#[test]
fn a_cname_into_an_allowed_name_does_not_allow_the_address() {
    let echo = TcpEchoServer::start();
    let up = FakeDns::start(&[
        (
            "evil.example",
            Answer::Records(vec![
                cname_rec("evil.example.", "good.com."),
                a_rec("good.com.", PUBLIC_IP3),
            ]),
        ),
        (
            "evil2.example",
            Answer::Records(vec![a_rec("good.com.", PUBLIC_IP2)]),
        ),
        ("good.com", Answer::A(vec![PUBLIC_IP])),
    ]);
    let toml = format!(
        r#"[policy]
default_egress = "deny"
rules = [
  {{ action = "allow", destination = "host", protocols = ["udp"], ports = [53] }},
  {{ action = "allow", destination = "good.com" }},
]
{}"#,
        dns_table(&[up.nameserver()], "")
    );
    let mut args = vec!["--reject".to_string()];
    for ip in [PUBLIC_IP, PUBLIC_IP2, PUBLIC_IP3] {
        args.extend(map(&ip.to_string(), echo.port()));
    }
    let (nf, _cfg) = spawn_with_config(&toml, &args);
    let mut g = guest_up(&nf);
    let a = lookup_ok(&mut g, &nf, "evil.example");
    assert_eq!(
        a_records(&a.message),
        vec![PUBLIC_IP3],
        "the chain is passed on"
    );
    let a = lookup_ok(&mut g, &nf, "evil2.example");
    assert_eq!(a_records(&a.message), vec![PUBLIC_IP2]);

    for ip in [PUBLIC_IP3, PUBLIC_IP2] {
        let mark = nf.log_mark();
        match g.tcp_connect(ip, 80, SHORT) {
            Err(ConnectError::Reset { .. }) => {}
            other => panic!(
                "{ip}:80 came from evil's zone and must be denied: {other:?}\n{}",
                nf.log_text()
            ),
        }
        let line = wait_decision(&nf, mark, &format!("{ip}:80"), None);
        assert_eq!(action(&line), "deny", "{line}");
        assert!(
            !field(&line, "domains").is_some_and(|d| d.split(',').any(|n| n == "good.com")),
            "{ip} was judged as good.com: {line}"
        );
    }

    // The control: good.com asked by the guest itself.
    assert_eq!(
        a_records(&lookup_ok(&mut g, &nf, "good.com").message),
        vec![PUBLIC_IP]
    );
    let mark = nf.log_mark();
    let h = g
        .tcp_connect(PUBLIC_IP, 80, SHORT)
        .unwrap_or_else(|e| panic!("good.com:80: {e:?}\n{}", nf.log_text()));
    g.tcp_send_all(h, b"good", deadline(SHORT)).unwrap();
    assert_eq!(g.tcp_recv_exact(h, 4, deadline(SHORT)).unwrap(), b"good");
    let line = wait_decision(&nf, mark, &format!("{PUBLIC_IP}:80"), None);
    assert_eq!(action(&line), "allow", "{line}");
    assert_eq!(echo.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// The TLS check "SNI resolved to this address through netfence": evil.example (allowed by a
/// rule, so the SYN passes) CNAMEs to good.com. A hello for good.com to that address is reset:
/// the guest never asked good.com.
#[test]
fn a_cname_target_does_not_count_as_resolved_for_sni() {
    let up = FakeDns::start(&[(
        "evil.example",
        Answer::Records(vec![
            cname_rec("evil.example.", "good.com."),
            a_rec("good.com.", PUBLIC_IP),
        ]),
    )]);
    let (server, port) = idle_listener();
    let toml = format!(
        r#"[policy]
default_egress = "deny"
rules = [
  {{ action = "allow", destination = "host", protocols = ["udp"], ports = [53] }},
  {{ action = "allow", destination = "evil.example" }},
  {{ action = "allow", destination = "good.com" }},
]
{}"#,
        dns_table(&[up.nameserver()], "")
    );
    let (nf, _cfg) = spawn_with_config(&toml, &map(&format!("{PUBLIC_IP}:443"), port));
    let mut g = guest_up(&nf);
    assert_eq!(
        a_records(&lookup_ok(&mut g, &nf, "evil.example").message),
        vec![PUBLIC_IP]
    );
    let mark = nf.log_mark();
    let line = hello_is_reset(
        &mut g,
        &nf,
        PUBLIC_IP,
        &client_hello("good.com"),
        "good.com",
    );
    assert!(
        field(&line, "reason").is_some_and(|r| r.contains("not resolved")),
        "{line}"
    );
    let syn = wait_decision(&nf, mark, &format!("{PUBLIC_IP}:443"), Some("dns-cache"));
    assert_eq!(
        action(&syn),
        "allow",
        "the SYN passes as evil.example: {syn}"
    );
    assert!(
        nothing_reached(&server),
        "a hello for a CNAME target sent bytes to the server"
    );
}

/// Deny stays at least as strict: a port-filtered deny rule on a CNAME target (not an NXDOMAIN
/// at the resolver) still denies flows to the address the chain led to.
#[test]
fn a_deny_rule_on_a_cname_target_still_denies() {
    let echo = TcpEchoServer::start();
    let up = FakeDns::start(&[(
        "news.example",
        Answer::Records(vec![
            cname_rec("news.example.", "px.tracker.example."),
            a_rec("px.tracker.example.", PUBLIC_IP3),
        ]),
    )]);
    let toml = format!(
        r#"[policy]
default_egress = "deny"
rules = [
  {{ action = "allow", destination = "host", protocols = ["udp"], ports = [53] }},
  {{ action = "deny", destination = ".tracker.example", protocols = ["tcp"], ports = [80] }},
  {{ action = "allow", destination = "public" }},
]
{}"#,
        dns_table(&[up.nameserver()], "")
    );
    let mut args = vec!["--reject".to_string()];
    args.extend(map(&PUBLIC_IP3.to_string(), echo.port()));
    let (nf, _cfg) = spawn_with_config(&toml, &args);
    let mut g = guest_up(&nf);
    assert_eq!(
        a_records(&lookup_ok(&mut g, &nf, "news.example").message),
        vec![PUBLIC_IP3]
    );
    let mark = nf.log_mark();
    match g.tcp_connect(PUBLIC_IP3, 80, SHORT) {
        Err(ConnectError::Reset { .. }) => {}
        other => panic!(
            "px.tracker.example:80 must be denied: {other:?}\n{}",
            nf.log_text()
        ),
    }
    let line = wait_decision(&nf, mark, &format!("{PUBLIC_IP3}:80"), None);
    assert_eq!(action(&line), "deny", "{line}");
    assert!(
        line.contains("deny@.tracker.example:tcp:80"),
        "the reason must name the deny rule: {line}"
    );
    // Another port of the same address: the public rule allows it.
    let h = g
        .tcp_connect(PUBLIC_IP3, 8080, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}\n{}", nf.log_text()));
    g.sockets.remove(h);
}

/// AAAA answers spelling a private IPv4 address (`::ffff:10.0.0.1`) are removed like A records,
/// and so are private addresses in HTTPS hints (the rest of the record is kept).
#[test]
fn rebind_protection_covers_mapped_aaaa_and_https_hints() {
    use hickory_proto::rr::rdata::svcb::{Alpn, IpHint, SvcParamKey, SvcParamValue, SVCB};
    use hickory_proto::rr::rdata::HTTPS;
    use hickory_proto::rr::RData;
    let mapped_private: std::net::Ipv6Addr = "::ffff:10.0.0.1".parse().unwrap();
    let https = SVCB::new(
        1,
        hickory_proto::rr::Name::root(),
        vec![
            (
                SvcParamKey::Alpn,
                SvcParamValue::Alpn(Alpn(vec!["h2".into()])),
            ),
            (
                SvcParamKey::Ipv4Hint,
                SvcParamValue::Ipv4Hint(IpHint(vec![
                    Ipv4Addr::new(10, 0, 0, 1).into(),
                    PUBLIC_IP.into(),
                ])),
            ),
            (
                SvcParamKey::Ipv6Hint,
                SvcParamValue::Ipv6Hint(IpHint(vec![mapped_private.into(), PUBLIC6.into()])),
            ),
        ],
    );
    let up = FakeDns::start(&[
        (
            "mapped.example",
            Answer::Records(vec![rec(
                "mapped.example.",
                RData::AAAA(mapped_private.into()),
            )]),
        ),
        (
            "hints.example",
            Answer::Records(vec![rec("hints.example.", RData::HTTPS(HTTPS(https)))]),
        ),
    ]);
    let (nf, _cfg) = spawn_with_config(&dns_table(&[up.nameserver()], ""), &[]);
    let mut g = guest_up(&nf);

    let a = udp_lookup(&mut g, GATEWAY, "mapped.example", RecordType::AAAA, SHORT)
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert_eq!(
        a.message.response_code,
        ResponseCode::NXDomain,
        "::ffff:10.0.0.1 reached the guest: {:?}",
        a.message.answers
    );
    assert!(a.message.answers.is_empty());

    let a = udp_lookup(&mut g, GATEWAY, "hints.example", RecordType::HTTPS, SHORT)
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert_eq!(a.message.response_code, ResponseCode::NoError);
    assert_eq!(a.message.answers.len(), 1, "{:?}", a.message.answers);
    let RData::HTTPS(HTTPS(got)) = &a.message.answers[0].data else {
        panic!("not an HTTPS record: {:?}", a.message.answers[0]);
    };
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for (_, v) in &got.svc_params {
        match v {
            SvcParamValue::Ipv4Hint(h) => v4.extend(h.0.iter().map(|a| a.0)),
            SvcParamValue::Ipv6Hint(h) => v6.extend(h.0.iter().map(|a| a.0)),
            _ => {}
        }
    }
    assert_eq!(v4, vec![PUBLIC_IP], "only the public hints are left");
    assert_eq!(v6, vec![PUBLIC6], "only the public hints are left");
    assert!(got.svc_params.iter().any(|(k, _)| *k == SvcParamKey::Alpn));
}

/// Each upstream query leaves from its own socket: the fake upstream sees several source ports.
#[test]
fn upstream_queries_leave_from_different_ports() {
    let up = FakeDns::start(&[("port.example", Answer::A(vec![PUBLIC_IP]))]);
    let (nf, _cfg) = spawn_with_config(&dns_table(&[up.nameserver()], ""), &[]);
    let mut g = guest_up(&nf);
    for i in 0..6 {
        let name = format!("p{i}.port.example");
        let a = lookup_ok(&mut g, &nf, &name);
        assert_eq!(a.message.response_code, ResponseCode::NXDomain, "{name}");
    }
    let asked = up.asked();
    assert_eq!(asked.len(), 6, "{asked:?}");
    let mut ports: Vec<u16> = asked.iter().map(|q| q.from.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert!(
        ports.len() > 1,
        "every upstream query left from port {}",
        ports[0]
    );
}

/// `--mtu 1280` (the smallest netfence accepts): a UDP answer must fit one 1280-byte IPv4
/// packet (1252 bytes of DNS) even when the guest's EDNS size would take more; it comes back truncated with TC, and whole over TCP.
#[test]
fn udp_answers_fit_the_link_mtu() {
    // 120 A records make a ~2 KB answer: more than one 1280-byte frame holds.
    let many: Vec<Ipv4Addr> = (1..=120).map(|i| Ipv4Addr::new(203, 0, 113, i)).collect();
    let up = FakeDns::start(&[("big.mtu.example", Answer::A(many.clone()))]);
    let (nf, _cfg) = spawn_with_config(
        &dns_table(&[up.nameserver()], ""),
        &["--mtu".to_string(), "1280".to_string()],
    );
    let mut g = guest_up(&nf);
    let q = query(next_id(), "big.mtu.example", RecordType::A, Some(4096));
    let udp = udp_lookup_raw(&mut g, GATEWAY, &q, SHORT)
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert!(
        udp.bytes.len() <= 1280 - 28,
        "a {}-byte UDP answer on a 1280-byte link",
        udp.bytes.len()
    );
    assert!(udp.message.truncation, "truncated without TC");
    assert!(udp.message.answers.is_empty());

    let h = g
        .tcp_connect(GATEWAY, 53, SHORT)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let m = tcp_lookup(&mut g, h, "big.mtu.example", RecordType::A, SHORT)
        .unwrap_or_else(|e| panic!("{e}\n{}", nf.log_text()));
    assert!(!m.truncation);
    assert_eq!(a_records(&m).len(), many.len());
}

/// The extensions of a ClientHello record built by [`client_hello`]: (offset of the
/// extensions' length field, end of the hello).
fn hello_extensions(rec: &[u8]) -> (usize, usize) {
    // record header 5, handshake header 4, version 2, random 32
    let mut at = 5 + 4 + 2 + 32;
    at += 1 + usize::from(rec[at]); // session id
    at += 2 + usize::from(u16::from_be_bytes([rec[at], rec[at + 1]])); // cipher suites
    at += 1 + usize::from(rec[at]); // compression methods
    (at, rec.len())
}

/// Rewrites the three length fields (record, handshake, extensions) after `delta` bytes were
/// added to the extensions.
fn grow_hello(rec: &mut [u8], ext_len_at: usize, delta: usize) {
    let add = |b: &mut [u8], n: usize| {
        let v = b.iter().fold(0usize, |a, x| (a << 8) | usize::from(*x)) + n;
        let len = b.len();
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = (v >> (8 * (len - 1 - i))) as u8;
        }
    };
    add(&mut rec[3..5], delta);
    add(&mut rec[6..9], delta);
    add(&mut rec[ext_len_at..ext_len_at + 2], delta);
}

/// `client_hello(name)` with its server_name extension in it twice.
fn hello_with_two_server_names(name: &str) -> Vec<u8> {
    let mut rec = client_hello(name);
    let (ext_len_at, end) = hello_extensions(&rec);
    let mut at = ext_len_at + 2;
    let sni = loop {
        assert!(at + 4 <= end, "no server_name extension");
        let ty = u16::from_be_bytes([rec[at], rec[at + 1]]);
        let len = usize::from(u16::from_be_bytes([rec[at + 2], rec[at + 3]]));
        if ty == 0 {
            break rec[at..at + 4 + len].to_vec();
        }
        at += 4 + len;
    };
    rec.extend_from_slice(&sni);
    grow_hello(&mut rec, ext_len_at, sni.len());
    rec
}

/// Under domain rules the ClientHello's name is what is judged, so a hello whose name cannot
/// be read for certain is refused: two server_name extensions (ambiguous), an extensions
/// length that runs past the hello (malformed). A well-formed hello without SNI (a client
/// connecting to an IP address) keeps the SYN's decision, and says so in the log.
#[test]
fn hellos_whose_name_is_uncertain_are_refused_and_no_sni_is_logged() {
    let (server, port) = idle_listener();
    let toml = format!(
        "deny_domains = [\"evil.example\"]\n{}",
        dns_table(&[FakeDns::start(&[]).nameserver()], "")
    );
    let (nf, _cfg) = spawn_with_config(&toml, &map(&format!("{PUBLIC_IP}:443"), port));
    let mut g = guest_up(&nf);

    let mut malformed = client_hello("good.example");
    let (ext_len_at, _) = hello_extensions(&malformed);
    malformed[ext_len_at] = 0xff;
    for (what, hello, reason) in [
        (
            "two server_name extensions",
            hello_with_two_server_names("good.example"),
            "ambiguous ClientHello",
        ),
        (
            "an extensions length past the end",
            malformed,
            "malformed ClientHello",
        ),
    ] {
        let mark = nf.log_mark();
        let h = g.tcp_connect(PUBLIC_IP, 443, SHORT).expect("handshake");
        g.tcp_send_all(h, &hello, deadline(SHORT)).unwrap();
        assert!(
            wait_reset(&mut g, h).is_some(),
            "a hello with {what} was not reset\n{}",
            nf.log_text()
        );
        let line = wait_decision(&nf, mark, &format!("{PUBLIC_IP}:443"), Some("sni"));
        assert_eq!(action(&line), "deny", "{what}: {line}");
        assert!(
            field(&line, "reason").is_some_and(|r| r.contains(reason)),
            "{what}: {line}"
        );
        g.sockets.remove(h);
    }
    assert!(
        nothing_reached(&server),
        "an uncertain hello sent bytes upstream"
    );

    // No SNI at all: allowed, and the log says why.
    let mark = nf.log_mark();
    let h = g.tcp_connect(PUBLIC_IP, 443, SHORT).expect("handshake");
    g.tcp_send_all(h, &client_hello(&PUBLIC_IP.to_string()), deadline(SHORT))
        .unwrap();
    let line = g
        .poll_until(deadline(SHORT), |_| {
            nf.wait_for_line(mark, Duration::ZERO, |l| {
                l.contains("decision") && l.contains("domain_source=\"sni\"")
            })
        })
        .unwrap_or_else(|| panic!("no decision on a hello without SNI\n{}", nf.log_text()));
    assert_eq!(action(&line), "allow", "{line}");
    assert!(line.contains("without SNI"), "{line}");
}
