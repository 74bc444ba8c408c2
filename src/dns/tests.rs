//! Tests of the DNS service: message vetting with hickory-built messages, and the whole
//! service against fake upstream servers on 127.0.0.1 (no other network).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::svcb::{Alpn, IpHint, SvcParamKey, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::HTTPS;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::message::{check_query, vet_answer, GuestQuery, NameBinding, QueryCheck, SizeLimit};
use super::*;

// ---------------------------------------------------------------------------------------------
// helpers

fn judge(deny_exact: &[&str], deny_suffix: &[&str]) -> StaticJudge {
    let mut j = StaticJudge::default();
    for d in deny_exact {
        j.deny.add_exact(d);
    }
    for s in deny_suffix {
        j.deny.add_suffix(s);
    }
    j
}

fn query_msg(id: u16, name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

fn query_bytes(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    query_msg(id, name, rtype, None).to_vec().unwrap()
}

fn a(name: &str, ip: &str, ttl: u32) -> Record {
    Record::from_rdata(
        Name::from_ascii(name).unwrap(),
        ttl,
        RData::A(Ipv4Addr::from_str(ip).unwrap().into()),
    )
}

fn aaaa(name: &str, ip: &str) -> Record {
    Record::from_rdata(
        Name::from_ascii(name).unwrap(),
        300,
        RData::AAAA(Ipv6Addr::from_str(ip).unwrap().into()),
    )
}

fn cname(name: &str, target: &str) -> Record {
    Record::from_rdata(
        Name::from_ascii(name).unwrap(),
        300,
        RData::CNAME(hickory_proto::rr::rdata::CNAME(
            Name::from_ascii(target).unwrap(),
        )),
    )
}

/// An upstream answer to `q` (a decoded query) with the given records.
fn answer_to(q: &Message, records: Vec<Record>) -> Message {
    let mut m = Message::response(q.id, OpCode::Query);
    m.metadata.recursion_desired = q.recursion_desired;
    m.metadata.recursion_available = true;
    m.queries = q.queries.clone();
    m.answers = records;
    if let Some(e) = &q.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(e.max_payload());
        m.set_edns(edns);
    }
    m
}

fn bound(name: &str, ip: IpAddr, ttl: u32, role: NameRole) -> NameBinding {
    NameBinding {
        name: name.to_string(),
        ip,
        ttl,
        role,
    }
}

fn guest_query(m: &Message) -> GuestQuery {
    match check_query(&m.to_vec().unwrap()) {
        QueryCheck::Query(q) => *q,
        other => panic!("not a query: {other:?}"),
    }
}

const UDP512: SizeLimit = SizeLimit {
    max: 512,
    truncate: true,
};

fn decode(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).expect("decodable answer")
}

fn ips(m: &Message) -> Vec<IpAddr> {
    message::answer_ips(m)
}

fn client(port: u16) -> ClientKey {
    ClientKey {
        src: SocketAddr::from(([10, 0, 2, 15], port)),
        dst: SocketAddr::from(([10, 0, 2, 2], 53)),
        transport: Transport::Udp,
    }
}

fn tcp_client(conn: u64) -> ClientKey {
    ClientKey {
        src: SocketAddr::from(([10, 0, 2, 15], 40000 + conn as u16)),
        dst: SocketAddr::from(([10, 0, 2, 2], 53)),
        transport: Transport::Tcp(conn),
    }
}

/// Waits until `fd` is readable or `timeout` passes; true when readable.
fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// Drives the service the way the queue thread does (its fd and its deadline) until it has
/// answers, or fails the test after `limit`.
fn drive(svc: &mut DnsService, j: &dyn DomainJudge, limit: Duration) -> Vec<(ClientKey, Vec<u8>)> {
    let give_up = Instant::now() + limit;
    loop {
        let now = Instant::now();
        assert!(
            now < give_up,
            "no answer from the DNS service within {limit:?}"
        );
        let wake = svc.next_deadline().map_or(give_up, |d| d.min(give_up));
        wait_readable(svc.event_fd(), wake.saturating_duration_since(now));
        let out = svc.poll(j, Instant::now());
        if !out.is_empty() {
            return out;
        }
    }
}

/// A fake upstream nameserver on 127.0.0.1 (UDP, and TCP on the same port).
struct FakeUpstream {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl FakeUpstream {
    fn new() -> Self {
        for _ in 0..50 {
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
                return Self { udp, tcp };
            }
        }
        panic!("no port free for both UDP and TCP");
    }

    fn addr(&self) -> SocketAddr {
        self.udp.local_addr().unwrap()
    }

    /// The next query sent to it (fails the test after 5 s).
    fn recv(&self) -> (Message, SocketAddr) {
        self.recv_within(Duration::from_secs(5))
            .expect("the fake upstream got no query")
    }

    fn recv_within(&self, timeout: Duration) -> Option<(Message, SocketAddr)> {
        if !wait_readable(self.udp.as_raw_fd(), timeout) {
            return None;
        }
        let mut buf = [0u8; 65536];
        let (n, from) = self.udp.recv_from(&mut buf).unwrap();
        Some((Message::from_vec(&buf[..n]).unwrap(), from))
    }

    fn reply(&self, m: &Message, to: SocketAddr) {
        self.udp.send_to(&m.to_vec().unwrap(), to).unwrap();
    }

    /// Accepts one TCP connection, driving `svc` meanwhile, and returns the framed query read
    /// from it.
    fn accept_tcp(&self, svc: &mut DnsService, j: &dyn DomainJudge) -> (Message, TcpStream) {
        let give_up = Instant::now() + Duration::from_secs(5);
        let mut conn: Option<TcpStream> = None;
        let mut framer = TcpDnsFramer::new();
        loop {
            assert!(
                Instant::now() < give_up,
                "no TCP query at the fake upstream"
            );
            wait_readable(svc.event_fd(), Duration::from_millis(20));
            assert!(svc.poll(j, Instant::now()).is_empty());
            match &mut conn {
                None => {
                    if wait_readable(self.tcp.as_raw_fd(), Duration::ZERO) {
                        let (s, _) = self.tcp.accept().unwrap();
                        s.set_nonblocking(true).unwrap();
                        conn = Some(s);
                    }
                }
                Some(s) => {
                    let mut buf = [0u8; 4096];
                    match s.read(&mut buf) {
                        Ok(0) => panic!("the service closed the TCP connection"),
                        Ok(n) => {
                            if let Some(msg) = framer.push(&buf[..n]).unwrap().pop() {
                                let s = conn.take().unwrap();
                                s.set_nonblocking(false).unwrap();
                                return (Message::from_vec(&msg).unwrap(), s);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }
    }
}

fn settings(upstreams: Vec<SocketAddr>) -> DnsSettings {
    DnsSettings {
        upstreams,
        gateway_v4: vec![Ipv4Addr::new(10, 0, 2, 2)],
        gateway_v6: vec![Ipv6Addr::from_str("fd42::1").unwrap()],
        ..DnsSettings::default()
    }
}

/// A service whose only upstream never gets a query (for local-answer tests).
fn local_service() -> (DnsService, FakeUpstream) {
    let up = FakeUpstream::new();
    (DnsService::new(settings(vec![up.addr()])).unwrap(), up)
}

// ---------------------------------------------------------------------------------------------
// local answers: blocked names, host aliases, malformed queries

#[test]
fn blocked_exact_name_gets_nxdomain() {
    let (mut svc, up) = local_service();
    let j = judge(&["blocked.example"], &[]);
    let q = query_bytes(0x1234, "blocked.example.", RecordType::A);
    let ans = svc
        .handle_query(client(1000), &q, &j, Instant::now())
        .unwrap();
    let m = decode(&ans);
    assert_eq!(m.id, 0x1234);
    assert_eq!(m.message_type, MessageType::Response);
    assert_eq!(m.response_code, ResponseCode::NXDomain);
    assert_eq!(
        m.queries[0].name,
        Name::from_ascii("blocked.example.").unwrap()
    );
    assert!(m.answers.is_empty());
    assert_eq!(svc.stats().blocked, 1);
    assert_eq!(svc.stats().forwarded, 0);
    // Exact entries cover only the name itself: a subdomain is forwarded.
    let q = query_bytes(1, "www.blocked.example.", RecordType::A);
    assert!(svc
        .handle_query(client(1001), &q, &j, Instant::now())
        .is_none());
    assert!(up.recv_within(Duration::from_secs(5)).is_some());
}

#[test]
fn blocked_suffix_covers_apex_and_subdomains_only() {
    let (mut svc, up) = local_service();
    let j = judge(&[], &[".tracking.com"]);
    for (i, name) in ["tracking.com.", "a.tracking.com.", "x.y.z.tracking.com."]
        .iter()
        .enumerate()
    {
        for rtype in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::MX,
            RecordType::HTTPS,
        ] {
            let q = query_bytes(i as u16, name, rtype);
            let ans = svc
                .handle_query(client(2000), &q, &j, Instant::now())
                .expect("answered locally");
            assert_eq!(
                decode(&ans).response_code,
                ResponseCode::NXDomain,
                "{name} {rtype}"
            );
        }
    }
    // Not label-aligned: forwarded.
    let q = query_bytes(77, "nottracking.com.", RecordType::A);
    assert!(svc
        .handle_query(client(2001), &q, &j, Instant::now())
        .is_none());
    let (fwd, _) = up.recv();
    assert_eq!(fwd.queries[0].name.to_ascii(), "nottracking.com.");
}

#[test]
fn blocking_ignores_case_and_trailing_dot() {
    let (mut svc, _up) = local_service();
    let j = judge(&["Blocked.Example."], &["ADS.net"]);
    for name in [
        "BLOCKED.example.",
        "blocked.EXAMPLE",
        "bLoCkEd.ExAmPlE.",
        "Sub.Ads.Net.",
        "ads.NET",
    ] {
        let q = query_bytes(9, name, RecordType::A);
        let ans = svc
            .handle_query(client(3000), &q, &j, Instant::now())
            .unwrap();
        let m = decode(&ans);
        assert_eq!(m.response_code, ResponseCode::NXDomain, "{name}");
        // The question is echoed as asked (case kept).
        assert_eq!(
            m.queries[0].name.to_ascii().trim_end_matches('.'),
            name.trim_end_matches('.')
        );
    }
}

#[test]
fn host_alias_answers_with_gateway_addresses() {
    let (mut svc, _up) = local_service();
    let j = judge(&[], &[]);
    let now = Instant::now();
    let q = query_bytes(5, "Host.Microsandbox.Internal.", RecordType::A);
    let m = decode(&svc.handle_query(client(4000), &q, &j, now).unwrap());
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert_eq!(ips(&m), vec![IpAddr::from([10, 0, 2, 2])]);
    let q = query_bytes(6, "host.microsandbox.internal", RecordType::AAAA);
    let m = decode(&svc.handle_query(client(4000), &q, &j, now).unwrap());
    assert_eq!(ips(&m), vec![IpAddr::from_str("fd42::1").unwrap()]);
    let q = query_bytes(7, "host.microsandbox.internal", RecordType::MX);
    let m = decode(&svc.handle_query(client(4000), &q, &j, now).unwrap());
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(svc.stats().answered_locally, 3);
    assert_eq!(svc.stats().forwarded, 0);
    assert!(svc.cache().resolved(
        "host.microsandbox.internal",
        IpAddr::from([10, 0, 2, 2]),
        now
    ));
}

#[test]
fn configured_host_aliases_and_deny_wins_over_alias() {
    let up = FakeUpstream::new();
    let mut s = settings(vec![up.addr()]);
    s.host_aliases = vec!["gateway.local".into(), "host.docker.internal.".into()];
    let mut svc = DnsService::new(s).unwrap();
    let open = judge(&[], &[]);
    let q = query_bytes(1, "host.docker.internal", RecordType::A);
    let m = decode(
        &svc.handle_query(client(1), &q, &open, Instant::now())
            .unwrap(),
    );
    assert_eq!(ips(&m), vec![IpAddr::from([10, 0, 2, 2])]);
    let deny = judge(&[], &["internal"]);
    let m = decode(
        &svc.handle_query(client(1), &q, &deny, Instant::now())
            .unwrap(),
    );
    assert_eq!(m.response_code, ResponseCode::NXDomain);
}

/// A FORMERR echoes every question the guest sent; a guest that sends many (in a datagram
/// reassembled from fragments, or over TCP) must not get an answer over UDP larger than 512
/// bytes or one frame of the link. Such an error answer keeps only its header. (The
/// `dns_query` fuzz target's size property, checked by hand with long names.)
#[test]
fn error_answers_that_echo_many_questions_fit_the_link() {
    let mut s = settings(Vec::new());
    s.link_mtu = 1280;
    let mut svc = DnsService::new(s).unwrap();
    let j = judge(&[], &[]);
    let label = "a".repeat(60);
    let mut many = query_msg(
        0x0b0b,
        &format!("{label}.{label}.test."),
        RecordType::A,
        None,
    );
    for i in 0..24 {
        let name = format!("{}{i:02}.{label}.{label}.test.", "b".repeat(58));
        many.add_query(Query::query(
            Name::from_ascii(&name).unwrap(),
            RecordType::A,
        ));
    }
    let wire = many.to_vec().unwrap();
    assert!(
        wire.len() > 1232,
        "the query must not fit the link: {}",
        wire.len()
    );
    let answer = svc
        .handle_query(client(1), &wire, &j, Instant::now())
        .unwrap();
    assert!(answer.len() <= 512, "{} bytes over UDP", answer.len());
    let m = decode(&answer);
    assert_eq!((m.id, m.response_code), (0x0b0b, ResponseCode::FormErr));
    assert!(m.queries.is_empty());
    // Over TCP it fits max_answer_bytes and keeps the questions.
    let answer = svc
        .handle_query(tcp_client(1), &wire, &j, Instant::now())
        .unwrap();
    assert_eq!(decode(&answer).queries.len(), 25);
    // A small error answer is untouched.
    let mut two = query_msg(8, "a.example.", RecordType::A, None);
    two.add_query(Query::query(
        Name::from_ascii("b.example.").unwrap(),
        RecordType::A,
    ));
    let answer = svc
        .handle_query(client(1), &two.to_vec().unwrap(), &j, Instant::now())
        .unwrap();
    assert_eq!(decode(&answer).queries.len(), 2);
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped() {
    let (mut svc, up) = local_service();
    let j = judge(&[], &[]);
    let now = Instant::now();
    // Too short for a header: dropped.
    assert!(svc.handle_query(client(1), &[1, 2, 3], &j, now).is_none());
    assert!(svc.handle_query(client(1), &[], &j, now).is_none());
    // A response sent to us: dropped (no reflection loops).
    let mut resp = query_bytes(3, "example.com.", RecordType::A);
    resp[2] |= 0x80;
    assert!(svc.handle_query(client(1), &resp, &j, now).is_none());
    // A header claiming a question that is not there: FORMERR with the same id.
    let hdr = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let m = decode(&svc.handle_query(client(1), &hdr, &j, now).unwrap());
    assert_eq!((m.id, m.response_code), (0xabcd, ResponseCode::FormErr));
    assert_eq!(m.message_type, MessageType::Response);
    // A name with a compression pointer loop.
    let mut looped = vec![0x00, 0x07, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let m = decode(&svc.handle_query(client(1), &looped, &j, now).unwrap());
    assert_eq!(m.response_code, ResponseCode::FormErr);
    // Two questions: FORMERR.
    let mut two = query_msg(8, "a.example.", RecordType::A, None);
    two.add_query(Query::query(
        Name::from_ascii("b.example.").unwrap(),
        RecordType::A,
    ));
    let m = decode(
        &svc.handle_query(client(1), &two.to_vec().unwrap(), &j, now)
            .unwrap(),
    );
    assert_eq!(m.response_code, ResponseCode::FormErr);
    // No question at all: FORMERR.
    let none = Message::new(9, MessageType::Query, OpCode::Query)
        .to_vec()
        .unwrap();
    let m = decode(&svc.handle_query(client(1), &none, &j, now).unwrap());
    assert_eq!(m.response_code, ResponseCode::FormErr);
    assert_eq!(svc.stats().malformed, 7);
    // Other opcodes and zone transfers are refused, not forwarded.
    let mut status = query_msg(10, "a.example.", RecordType::A, None);
    status.metadata.op_code = OpCode::Status;
    let m = decode(
        &svc.handle_query(client(1), &status.to_vec().unwrap(), &j, now)
            .unwrap(),
    );
    assert_eq!(m.response_code, ResponseCode::NotImp);
    let axfr = query_bytes(11, "example.com.", RecordType::AXFR);
    let m = decode(&svc.handle_query(client(1), &axfr, &j, now).unwrap());
    assert_eq!(m.response_code, ResponseCode::Refused);
    assert_eq!(svc.stats().unsupported, 2);
    assert_eq!(svc.stats().forwarded, 0);
    assert!(up.recv_within(Duration::from_millis(50)).is_none());
}

#[test]
fn random_garbage_never_panics() {
    let (mut svc, _up) = local_service();
    let j = judge(&["x.example"], &[]);
    let valid = query_msg(1, "www.example.com.", RecordType::A, Some(1232))
        .to_vec()
        .unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let now = Instant::now();
    for i in 0..5000 {
        let mut msg = if i % 2 == 0 {
            valid.clone()
        } else {
            (0..(next() % 80) as usize).map(|_| next() as u8).collect()
        };
        if !msg.is_empty() {
            for _ in 0..3 {
                let pos = next() as usize % msg.len();
                msg[pos] = next() as u8;
            }
        }
        // Keep the QR bit clear half of the time so that parsing goes deep.
        if msg.len() > 2 && i % 4 == 0 {
            msg[2] &= 0x7f;
        }
        let _ = svc.handle_query(client((i % 60000) as u16 + 1), &msg, &j, now);
        // Also as an upstream answer would be vetted.
        if let Ok(m) = Message::from_vec(&msg) {
            let gq = guest_query(&query_msg(1, "www.example.com.", RecordType::A, None));
            let _ = vet_answer(&msg, m, &gq, &j, true, UDP512);
        }
    }
    assert_eq!(svc.stats().queries, 5000);
}

// ---------------------------------------------------------------------------------------------
// vetting upstream answers

#[test]
fn rebind_protection_removes_each_private_range() {
    let j = judge(&[], &[]);
    let v4 = [
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "100.64.0.1",
        "127.0.0.1",
        "169.254.169.254",
        "0.0.0.0",
    ];
    for ip in v4 {
        let q = query_msg(1, "rebind.example.", RecordType::A, None);
        let ans = answer_to(&q, vec![a("rebind.example.", ip, 60)]);
        let raw = ans.to_vec().unwrap();
        let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
        assert!(v.rebind_blocked, "{ip}");
        assert_eq!(v.rebind_removed, 1);
        assert_eq!(
            decode(&v.bytes).response_code,
            ResponseCode::NXDomain,
            "{ip}"
        );
        assert!(v.cache.is_empty());
    }
    let v6 = [
        "::1",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
    ];
    for ip in v6 {
        let q = query_msg(2, "rebind6.example.", RecordType::AAAA, None);
        let ans = answer_to(&q, vec![aaaa("rebind6.example.", ip)]);
        let raw = ans.to_vec().unwrap();
        let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
        assert!(v.rebind_blocked, "{ip}");
        assert_eq!(
            decode(&v.bytes).response_code,
            ResponseCode::NXDomain,
            "{ip}"
        );
    }
}

#[test]
fn rebind_keeps_public_addresses_and_explicit_allows() {
    let mut j = judge(&[], &[]);
    let q = query_msg(0x55, "mixed.example.", RecordType::A, None);
    let ans = answer_to(
        &q,
        vec![
            a("mixed.example.", "10.0.0.5", 60),
            a("mixed.example.", "203.0.113.10", 60),
            a("mixed.example.", "192.168.0.9", 60),
        ],
    );
    let raw = ans.to_vec().unwrap();
    let v = vet_answer(&raw, ans.clone(), &guest_query(&q), &j, true, UDP512);
    assert!(!v.rebind_blocked);
    assert_eq!(v.rebind_removed, 2);
    let m = decode(&v.bytes);
    assert_eq!(m.id, 0x55);
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert_eq!(ips(&m), vec![IpAddr::from([203, 0, 113, 10])]);
    assert_eq!(v.cache.len(), 1);

    // An explicit allow for the range lets the address through.
    j.allow_ips.push("10.0.0.0/24".parse().unwrap());
    let v = vet_answer(&raw, ans.clone(), &guest_query(&q), &j, true, UDP512);
    assert_eq!(v.rebind_removed, 1);
    assert_eq!(
        ips(&decode(&v.bytes)),
        vec![IpAddr::from([10, 0, 0, 5]), IpAddr::from([203, 0, 113, 10])]
    );

    // Protection off: untouched, byte for byte.
    let v = vet_answer(&raw, ans, &guest_query(&q), &judge(&[], &[]), false, UDP512);
    assert_eq!(v.bytes, raw);
    assert_eq!(v.cache.len(), 3);
}

/// Found by the `dns_answer` fuzz target: an answer whose record name is a compression
/// pointer into the header's id decoded to one name here and, once the guest's id was put in
/// its place, to another (or to nothing) at the guest. Such an answer is re-encoded instead.
#[test]
fn a_name_pointing_into_the_id_is_re_encoded() {
    let q = query_msg(0x1201, "www.example.com", RecordType::A, None);
    // Upstream id 0xab00: the pointer to offset 1 reads a root name there.
    let mut raw = vec![0xab, 0x00, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    raw.extend_from_slice(b"\x03www\x07example\x03com\x00\x00\x01\x00\x01");
    raw.extend_from_slice(&[0xc0, 0x01, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 203, 0, 113, 5]);
    let upstream = decode(&raw);
    assert_eq!(upstream.answers[0].name, Name::root());
    let v = vet_answer(
        &raw,
        upstream,
        &guest_query(&q),
        &judge(&[], &[]),
        true,
        UDP512,
    );
    let delivered = Message::from_vec(&v.bytes).expect("the guest can decode the answer");
    assert_eq!(delivered.id, 0x1201);
    assert_eq!(delivered.answers.len(), 1);
    assert_eq!(
        delivered.answers[0].name,
        Name::root(),
        "the name that was vetted"
    );
    assert_eq!(ips(&delivered), vec![IpAddr::from([203, 0, 113, 5])]);
}

#[test]
fn unchanged_answers_pass_byte_for_byte_with_the_client_id() {
    let j = judge(&[], &[]);
    let q = query_msg(0x0102, "pub.example.", RecordType::A, None);
    let mut ans = answer_to(&q, vec![a("pub.example.", "198.51.100.4", 120)]);
    ans.metadata.id = 0xfeed; // the upstream-side id
    let raw = ans.to_vec().unwrap();
    let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
    assert_eq!(&v.bytes[..2], &[0x01, 0x02]);
    assert_eq!(&v.bytes[2..], &raw[2..]);
    assert_eq!(
        v.cache,
        vec![bound(
            "pub.example",
            IpAddr::from([198, 51, 100, 4]),
            120,
            NameRole::Asked
        )]
    );
}

#[test]
fn cname_chain_to_a_blocked_name_is_nxdomain() {
    let j = judge(&["evil.example"], &["tracker.net"]);
    for target in ["evil.example.", "x.tracker.net.", "TRACKER.NET."] {
        let q = query_msg(3, "www.good.example.", RecordType::A, None);
        let ans = answer_to(
            &q,
            vec![
                cname("www.good.example.", "cdn.good.example."),
                cname("cdn.good.example.", target),
                a(target, "203.0.113.99", 60),
            ],
        );
        let raw = ans.to_vec().unwrap();
        let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
        let (name, _) = v.blocked.clone().expect("blocked");
        assert_eq!(name, normalize_name(target));
        let m = decode(&v.bytes);
        assert_eq!(m.response_code, ResponseCode::NXDomain);
        assert!(m.answers.is_empty());
        assert!(v.cache.is_empty());
    }
}

#[test]
fn cname_chain_to_a_private_address_is_nxdomain() {
    let j = judge(&[], &[]);
    let q = query_msg(4, "app.example.", RecordType::A, None);
    let ans = answer_to(
        &q,
        vec![
            cname("app.example.", "internal.corp.example."),
            a("internal.corp.example.", "10.20.30.40", 60),
        ],
    );
    let raw = ans.to_vec().unwrap();
    let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
    assert!(v.rebind_blocked);
    assert_eq!(decode(&v.bytes).response_code, ResponseCode::NXDomain);
}

#[test]
fn cache_binds_the_question_name_and_cname_targets_only_as_aliases() {
    let j = judge(&[], &[]);
    let q = query_msg(5, "WWW.Shop.Example.", RecordType::A, None);
    let ans = answer_to(
        &q,
        vec![
            cname("www.shop.example.", "shop.cdn.example."),
            a("shop.cdn.example.", "203.0.113.20", 30),
            // Not on the chain from the query name: binds no name.
            a("bank.example.", "203.0.113.66", 30),
        ],
    );
    let raw = ans.to_vec().unwrap();
    let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
    let ip = IpAddr::from([203, 0, 113, 20]);
    assert_eq!(
        v.cache,
        vec![
            bound("www.shop.example", ip, 30, NameRole::Asked),
            bound("shop.cdn.example", ip, 30, NameRole::Alias),
        ]
    );
}

/// Question `evil.example`; the attacker's zone answers with a CNAME to good.com and good.com's
/// address, or with good.com records outright. Neither makes the address count as good.com.
#[test]
fn an_answer_cannot_bind_an_address_to_a_name_the_guest_did_not_ask() {
    let j = judge(&[], &[]);
    let good = IpAddr::from([203, 0, 113, 9]);
    let q = query_msg(0x51, "evil.example.", RecordType::A, None);
    let answers = [
        vec![
            cname("evil.example.", "good.com."),
            a("good.com.", "203.0.113.9", 300),
        ],
        vec![a("good.com.", "203.0.113.9", 300)],
        vec![
            a("good.com.", "203.0.113.9", 300),
            a("evil.example.", "203.0.113.9", 300),
        ],
    ];
    for records in answers {
        let ans = answer_to(&q, records.clone());
        let raw = ans.to_vec().unwrap();
        let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
        let mut cache = NameCache::new(8);
        let now = Instant::now();
        for b in &v.cache {
            assert_ne!(
                (b.name.as_str(), b.role),
                ("good.com", NameRole::Asked),
                "{records:?}"
            );
            cache.insert_as(&b.name, b.role, b.ip, Duration::from_secs(300), now);
        }
        assert!(!cache.resolved("good.com", good, now), "{records:?}");
        assert!(
            !cache.names_for(good, now).contains(&"good.com".to_string()),
            "{records:?}"
        );
    }
}

/// The same through the service: the cache it fills does not call the address good.com.
#[test]
fn the_service_binds_answers_to_the_question_only() {
    let up = FakeUpstream::new();
    let mut svc = DnsService::new(settings(vec![up.addr()])).unwrap();
    let j = judge(&[], &[]);
    svc.handle_query(
        client(1),
        &query_bytes(0x52, "evil.example.", RecordType::A),
        &j,
        Instant::now(),
    );
    let (f, from) = up.recv();
    up.reply(
        &answer_to(
            &f,
            vec![
                cname("evil.example.", "good.com."),
                a("good.com.", "203.0.113.9", 300),
            ],
        ),
        from,
    );
    let out = drive(&mut svc, &j, Duration::from_secs(5));
    assert_eq!(
        ips(&decode(&out[0].1)),
        vec![IpAddr::from([203, 0, 113, 9])]
    );
    let now = Instant::now();
    let good = IpAddr::from([203, 0, 113, 9]);
    assert_eq!(svc.cache().names_for(good, now), vec!["evil.example"]);
    assert!(!svc.cache().resolved("good.com", good, now));
    assert_eq!(svc.cache().lookup(good, now).aliases, vec!["good.com"]);
}

#[test]
fn large_udp_answers_are_truncated_to_the_client_size() {
    let j = judge(&[], &[]);
    let records: Vec<Record> = (0..60)
        .map(|i| a("many.example.", &format!("203.0.113.{i}"), 60))
        .collect();

    // No EDNS: 512 bytes.
    let q = query_msg(6, "many.example.", RecordType::A, None);
    let ans = answer_to(&q, records.clone());
    let raw = ans.to_vec().unwrap();
    assert!(raw.len() > 512);
    let v = vet_answer(&raw, ans.clone(), &guest_query(&q), &j, true, UDP512);
    assert!(v.truncated);
    assert!(v.bytes.len() <= 512);
    let m = decode(&v.bytes);
    assert!(m.truncation);
    assert_eq!(m.id, 6);
    assert!(m.answers.is_empty());
    assert_eq!(m.queries, q.queries);
    assert!(m.edns.is_none());
    assert!(v.cache.is_empty(), "the guest received no address");

    // EDNS 4096: fits.
    let q = query_msg(7, "many.example.", RecordType::A, Some(4096));
    let gq = guest_query(&q);
    assert_eq!(gq.udp_limit, 4096);
    let ans = answer_to(&q, records.clone());
    let raw = ans.to_vec().unwrap();
    let limit = SizeLimit {
        max: gq.udp_limit,
        truncate: true,
    };
    let v = vet_answer(&raw, ans.clone(), &gq, &j, true, limit);
    assert!(!v.truncated);
    assert_eq!(decode(&v.bytes).answers.len(), 60);

    // EDNS 1232 but max_answer_bytes smaller: truncated, OPT kept.
    let limit = SizeLimit {
        max: 700,
        truncate: true,
    };
    let v = vet_answer(&raw, ans.clone(), &gq, &j, true, limit);
    let m = decode(&v.bytes);
    assert!(m.truncation && m.edns.is_some() && m.answers.is_empty());

    // A stream transport above max_answer_bytes: SERVFAIL.
    let limit = SizeLimit {
        max: 700,
        truncate: false,
    };
    let v = vet_answer(&raw, ans, &gq, &j, true, limit);
    assert!(v.oversize);
    assert_eq!(decode(&v.bytes).response_code, ResponseCode::ServFail);
}

#[test]
fn edns_below_512_counts_as_512() {
    let q = query_msg(8, "x.example.", RecordType::A, Some(100));
    assert_eq!(guest_query(&q).udp_limit, 512);
}

// ---------------------------------------------------------------------------------------------
// the service against fake upstreams on 127.0.0.1

#[test]
fn forwards_to_upstream_and_delivers_the_answer() {
    let up = FakeUpstream::new();
    let mut svc = DnsService::new(settings(vec![up.addr()])).unwrap();
    let j = judge(&["blocked.example"], &[]);
    let q = query_bytes(0x4242, "API.example.org.", RecordType::A);
    assert!(svc
        .handle_query(client(5353), &q, &j, Instant::now())
        .is_none());
    assert_eq!(svc.in_flight(), 1);
    assert!(svc.next_deadline().is_some());

    let (fwd, from) = up.recv();
    assert_eq!(fwd.queries[0].name.to_ascii(), "API.example.org.");
    assert!(fwd.recursion_desired);
    up.reply(
        &answer_to(&fwd, vec![a("api.example.org.", "203.0.113.80", 300)]),
        from,
    );

    let out = drive(&mut svc, &j, Duration::from_secs(5));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, client(5353));
    let m = decode(&out[0].1);
    assert_eq!(m.id, 0x4242);
    assert_eq!(ips(&m), vec![IpAddr::from([203, 0, 113, 80])]);
    let now = Instant::now();
    assert!(svc
        .cache()
        .resolved("api.example.org", IpAddr::from([203, 0, 113, 80]), now));
    assert_eq!(
        svc.cache().names_for(IpAddr::from([203, 0, 113, 80]), now),
        vec!["api.example.org"]
    );
    let st = svc.stats();
    assert_eq!((st.queries, st.forwarded, st.answers), (1, 1, 1));
    assert_eq!(svc.in_flight(), 0);
    assert_eq!(svc.next_deadline(), None);
}

#[test]
fn clients_with_the_same_id_do_not_collide_upstream() {
    let up = FakeUpstream::new();
    let mut svc = DnsService::new(settings(vec![up.addr()])).unwrap();
    let j = judge(&[], &[]);
    let now = Instant::now();
    // Two clients, same id, different names.
    svc.handle_query(
        client(1),
        &query_bytes(7, "one.example.", RecordType::A),
        &j,
        now,
    );
    svc.handle_query(
        client(2),
        &query_bytes(7, "two.example.", RecordType::A),
        &j,
        now,
    );
    let (f1, from1) = up.recv();
    let (f2, from2) = up.recv();
    assert_ne!(f1.id, f2.id, "upstream ids must be distinct");
    assert_ne!(from1, from2, "each query has its own socket");
    // Answer in reverse order.
    for (f, from) in [(&f2, from2), (&f1, from1)] {
        let name = f.queries[0].name.to_ascii();
        let ip = if name.starts_with("one") {
            "203.0.113.1"
        } else {
            "203.0.113.2"
        };
        up.reply(&answer_to(f, vec![a(&name, ip, 60)]), from);
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(drive(&mut svc, &j, Duration::from_secs(5)));
    }
    for (c, bytes) in got {
        let m = decode(&bytes);
        assert_eq!(m.id, 7);
        let want = if c == client(1) {
            [203, 0, 113, 1]
        } else {
            [203, 0, 113, 2]
        };
        assert_eq!(ips(&m), vec![IpAddr::from(want)]);
    }
}

#[test]
fn answers_must_match_id_source_and_question() {
    let up = FakeUpstream::new();
    let mut svc = DnsService::new(settings(vec![up.addr()])).unwrap();
    let j = judge(&[], &[]);
    svc.handle_query(
        client(9),
        &query_bytes(1, "victim.example.", RecordType::A),
        &j,
        Instant::now(),
    );
    let (fwd, svc_addr) = up.recv();

    // Wrong id.
    let mut bad = answer_to(&fwd, vec![a("victim.example.", "198.51.100.66", 60)]);
    bad.metadata.id = fwd.id.wrapping_add(1);
    up.reply(&bad, svc_addr);
    // Right id, other question.
    let mut other_q = query_msg(fwd.id, "other.example.", RecordType::A, None);
    other_q.metadata.id = fwd.id;
    up.reply(
        &answer_to(&other_q, vec![a("other.example.", "198.51.100.66", 60)]),
        svc_addr,
    );
    // Right id, right type, other name class... and right question but AAAA type.
    let aaaa_q = query_msg(fwd.id, "victim.example.", RecordType::AAAA, None);
    up.reply(&answer_to(&aaaa_q, vec![]), svc_addr);
    // Right everything but from another address: the connected socket never sees it.
    let spoofer = UdpSocket::bind("127.0.0.1:0").unwrap();
    spoofer
        .send_to(
            &answer_to(&fwd, vec![a("victim.example.", "198.51.100.66", 60)])
                .to_vec()
                .unwrap(),
            svc_addr,
        )
        .unwrap();
    // A query (not a response) with the right id.
    let mut not_resp = fwd.clone();
    not_resp.metadata.message_type = MessageType::Query;
    up.reply(&not_resp, svc_addr);
    // Finally the real answer (the resolver changed the case of the name: still a match).
    let mut real_q = fwd.clone();
    real_q.queries[0].name = Name::from_ascii("VICTIM.example.").unwrap();
    up.reply(
        &answer_to(&real_q, vec![a("victim.example.", "203.0.113.7", 60)]),
        svc_addr,
    );

    let out = drive(&mut svc, &j, Duration::from_secs(5));
    assert_eq!(out.len(), 1);
    assert_eq!(
        ips(&decode(&out[0].1)),
        vec![IpAddr::from([203, 0, 113, 7])]
    );
    assert_eq!(svc.stats().mismatched, 4);
    assert!(svc
        .cache()
        .names_for(IpAddr::from([198, 51, 100, 66]), Instant::now())
        .is_empty());
}

#[test]
fn timeout_fails_over_to_the_second_upstream() {
    let silent = FakeUpstream::new();
    let good = FakeUpstream::new();
    let mut s = settings(vec![silent.addr(), good.addr()]);
    s.query_timeout = Duration::from_millis(200);
    let mut svc = DnsService::new(s).unwrap();
    let j = judge(&[], &[]);
    let t0 = Instant::now();
    svc.handle_query(
        client(1),
        &query_bytes(0x77, "fail.example.", RecordType::A),
        &j,
        t0,
    );
    let (first, _) = silent.recv();
    assert_eq!(first.queries[0].name.to_ascii(), "fail.example.");
    assert!(good.recv_within(Duration::ZERO).is_none());

    // The thread waits on the service's fd until its deadline; then poll fails over.
    let deadline = svc.next_deadline().unwrap();
    assert!(deadline >= t0 + Duration::from_millis(200));
    assert!(!wait_readable(
        svc.event_fd(),
        deadline.saturating_duration_since(Instant::now())
    ));
    assert!(svc.poll(&j, Instant::now().max(deadline)).is_empty());
    assert_eq!(svc.stats().timeouts, 1);

    let (second, from) = good.recv();
    assert_eq!(second.queries, first.queries);
    assert_eq!(second.id, first.id);
    good.reply(
        &answer_to(&second, vec![a("fail.example.", "203.0.113.30", 60)]),
        from,
    );
    let out = drive(&mut svc, &j, Duration::from_secs(5));
    let m = decode(&out[0].1);
    assert_eq!(m.id, 0x77);
    assert_eq!(ips(&m), vec![IpAddr::from([203, 0, 113, 30])]);

    // The upstream that answered is asked first from now on.
    svc.handle_query(
        client(2),
        &query_bytes(0x78, "next.example.", RecordType::A),
        &j,
        Instant::now(),
    );
    assert!(good.recv_within(Duration::from_secs(5)).is_some());
    assert!(silent.recv_within(Duration::ZERO).is_none());
}

/// A timed-out attempt's socket is closed (one socket per query in flight): a late answer
/// from the first upstream goes nowhere, the second upstream's answer is delivered.
#[test]
fn a_timed_out_attempt_is_closed_and_the_next_upstream_answers() {
    let slow = FakeUpstream::new();
    let other = FakeUpstream::new();
    let mut svc = DnsService::new(settings(vec![slow.addr(), other.addr()])).unwrap();
    let j = judge(&[], &[]);
    let t0 = Instant::now();
    svc.handle_query(
        client(1),
        &query_bytes(1, "late.example.", RecordType::A),
        &j,
        t0,
    );
    let (q1, from1) = slow.recv();
    // Time passes (a clock the test controls): fail over.
    let later = t0 + svc.settings().query_timeout + Duration::from_millis(1);
    assert!(svc.poll(&j, later).is_empty());
    assert_eq!(svc.upstream_sockets(), 1);
    let (q2, from2) = other.recv();
    assert_ne!(from1, from2, "the second attempt has a fresh socket");
    assert_eq!(q1.id, q2.id);
    slow.reply(
        &answer_to(&q1, vec![a("late.example.", "198.51.100.31", 60)]),
        from1,
    );
    other.reply(
        &answer_to(&q2, vec![a("late.example.", "203.0.113.31", 60)]),
        from2,
    );
    let out = drive(&mut svc, &j, Duration::from_secs(5));
    assert_eq!(
        ips(&decode(&out[0].1)),
        vec![IpAddr::from([203, 0, 113, 31])]
    );
    assert_eq!(svc.upstream_sockets(), 0);
}

#[test]
fn every_upstream_timing_out_gives_servfail() {
    let a_up = FakeUpstream::new();
    let b_up = FakeUpstream::new();
    let mut s = settings(vec![a_up.addr(), b_up.addr()]);
    s.query_timeout = Duration::from_millis(100);
    let mut svc = DnsService::new(s).unwrap();
    let j = judge(&[], &[]);
    svc.handle_query(
        client(1),
        &query_bytes(0x99, "dead.example.", RecordType::A),
        &j,
        Instant::now(),
    );
    let out = drive(&mut svc, &j, Duration::from_secs(5));
    assert!(a_up.recv_within(Duration::ZERO).is_some());
    assert!(b_up.recv_within(Duration::ZERO).is_some());
    let m = decode(&out[0].1);
    assert_eq!((m.id, m.response_code), (0x99, ResponseCode::ServFail));
    let st = svc.stats();
    assert_eq!((st.timeouts, st.servfail), (2, 1));
    assert_eq!(svc.in_flight(), 0);
}

#[test]
fn refused_port_fails_over_without_waiting() {
    // A port nobody listens on: ICMP port unreachable -> ECONNREFUSED on the connected socket.
    let closed = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let good = FakeUpstream::new();
    let mut s = settings(vec![closed, good.addr()]);
    s.query_timeout = Duration::from_secs(30);
    let mut svc = DnsService::new(s).unwrap();
    let j = judge(&[], &[]);
    svc.handle_query(
        client(1),
        &query_bytes(5, "quick.example.", RecordType::A),
        &j,
        Instant::now(),
    );
    // Driven by the fd only: the 30 s deadline must not be needed.
    let give_up = Instant::now() + Duration::from_secs(5);
    let (fwd, from) = loop {
        assert!(Instant::now() < give_up, "no failover after ECONNREFUSED");
        wait_readable(svc.event_fd(), Duration::from_millis(100));
        assert!(svc.poll(&j, Instant::now()).is_empty());
        if let Some(got) = good.recv_within(Duration::ZERO) {
            break got;
        }
    };
    good.reply(
        &answer_to(&fwd, vec![a("quick.example.", "203.0.113.32", 60)]),
        from,
    );
    let out = drive(&mut svc, &j, Duration::from_secs(5));
    assert_eq!(
        ips(&decode(&out[0].1)),
        vec![IpAddr::from([203, 0, 113, 32])]
    );
}

#[test]
fn upstream_servfail_and_refused_are_passed_back() {
    for rcode in [
        ResponseCode::ServFail,
        ResponseCode::Refused,
        ResponseCode::NXDomain,
    ] {
        let first = FakeUpstream::new();
        let second = FakeUpstream::new();
        let mut svc = DnsService::new(settings(vec![first.addr(), second.addr()])).unwrap();
        let j = judge(&[], &[]);
        svc.handle_query(
            client(1),
            &query_bytes(0x31, "sf.example.", RecordType::A),
            &j,
            Instant::now(),
        );
        let (fwd, from) = first.recv();
        let mut ans = answer_to(&fwd, vec![]);
        ans.metadata.response_code = rcode;
        first.reply(&ans, from);
        let out = drive(&mut svc, &j, Duration::from_secs(5));
        let m = decode(&out[0].1);
        assert_eq!((m.id, m.response_code), (0x31, rcode));
        assert!(
            second.recv_within(Duration::ZERO).is_none(),
            "no failover on {rcode}"
        );
        assert_eq!(svc.stats().servfail, 0, "passed back, not made");
    }
}

#[test]
fn upstream_answers_are_vetted_end_to_end() {
    let up = FakeUpstream::new();
    let mut svc = DnsService::new(settings(vec![up.addr()])).unwrap();
    let j = judge(&[], &[".tracker.example"]);
    let now = Instant::now();
    // CNAME to a blocked suffix.
    svc.handle_query(
        client(1),
        &query_bytes(1, "news.example.", RecordType::A),
        &j,
        now,
    );
    let (f, from) = up.recv();
    up.reply(
        &answer_to(
            &f,
            vec![
                cname("news.example.", "px.tracker.example."),
                a("px.tracker.example.", "203.0.113.50", 60),
            ],
        ),
        from,
    );
    let out = drive(&mut svc, &j, Duration::from_secs(5));
    assert_eq!(decode(&out[0].1).response_code, ResponseCode::NXDomain);
    // A private address: rebind protection.
    svc.handle_query(
        client(1),
        &query_bytes(2, "rebind.example.", RecordType::A),
        &j,
        now,
    );
    let (f, from) = up.recv();
    up.reply(
        &answer_to(&f, vec![a("rebind.example.", "192.168.1.1", 60)]),
        from,
    );
    let out = drive(&mut svc, &j, Duration::from_secs(5));
    assert_eq!(decode(&out[0].1).response_code, ResponseCode::NXDomain);
    let st = svc.stats();
    assert_eq!(
        (st.blocked, st.rebind_blocked, st.rebind_removed),
        (1, 1, 1)
    );
    assert!(svc.cache().is_empty());
}

#[test]
fn in_flight_limit_drops_and_counts_the_excess() {
    let up = FakeUpstream::new();
    let mut s = settings(vec![up.addr()]);
    s.max_in_flight = 2;
    let mut svc = DnsService::new(s).unwrap();
    let j = judge(&[], &[]);
    let now = Instant::now();
    for i in 0..5u16 {
        assert!(svc
            .handle_query(
                client(100 + i),
                &query_bytes(i, "x.example.", RecordType::A),
                &j,
                now
            )
            .is_none());
    }
    let st = svc.stats();
    assert_eq!((st.forwarded, st.dropped_over_limit), (2, 3));
    assert_eq!(svc.in_flight(), 2);
    // Local answers do not count against the limit.
    let blocked = judge(&["x.example"], &[]);
    assert!(svc
        .handle_query(
            client(200),
            &query_bytes(1, "x.example.", RecordType::A),
            &blocked,
            now
        )
        .is_some());
    // After an answer, there is room again.
    let (f, from) = up.recv();
    up.reply(
        &answer_to(&f, vec![a("x.example.", "203.0.113.1", 60)]),
        from,
    );
    drive(&mut svc, &j, Duration::from_secs(5));
    assert!(svc
        .handle_query(
            client(300),
            &query_bytes(9, "x.example.", RecordType::A),
            &j,
            now
        )
        .is_none());
    assert_eq!(svc.stats().forwarded, 3);
}

#[test]
fn retransmissions_are_not_forwarded_twice() {
    let up = FakeUpstream::new();
    let mut svc = DnsService::new(settings(vec![up.addr()])).unwrap();
    let j = judge(&[], &[]);
    let q = query_bytes(0x10, "dup.example.", RecordType::A);
    assert!(svc
        .handle_query(client(1), &q, &j, Instant::now())
        .is_none());
    assert!(svc
        .handle_query(client(1), &q, &j, Instant::now())
        .is_none());
    assert_eq!(svc.stats().duplicates, 1);
    up.recv();
    assert!(up.recv_within(Duration::from_millis(50)).is_none());
}

#[test]
fn tcp_clients_get_a_truncated_answer_fetched_again_over_tcp() {
    let up = FakeUpstream::new();
    let mut svc = DnsService::new(settings(vec![up.addr()])).unwrap();
    let j = judge(&[], &[]);
    let records: Vec<Record> = (0..80)
        .map(|i| a("big.example.", &format!("203.0.113.{i}"), 60))
        .collect();

    // Over UDP the client gets TC and retries over TCP itself.
    let mut framer = TcpDnsFramer::new();
    svc.handle_query(
        client(1),
        &query_bytes(0x21, "big.example.", RecordType::A),
        &j,
        Instant::now(),
    );
    let (f, from) = up.recv();
    let mut tc = answer_to(&f, vec![]);
    tc.metadata.truncation = true;
    up.reply(&tc, from);
    let out = drive(&mut svc, &j, Duration::from_secs(5));
    assert!(decode(&out[0].1).truncation);

    // Its TCP query, framed as on the wire.
    let stream = TcpDnsFramer::frame(&query_bytes(0x22, "big.example.", RecordType::A)).unwrap();
    let msgs = framer.push(&stream).unwrap();
    assert!(svc
        .handle_query(tcp_client(7), &msgs[0], &j, Instant::now())
        .is_none());
    let (f, from) = up.recv();
    up.reply(&tc_of(&f), from);
    // The service now connects to the upstream over TCP.
    let (tq, mut conn) = up.accept_tcp(&mut svc, &j);
    assert_eq!(tq.id, f.id);
    let full = answer_to(&tq, records).to_vec().unwrap();
    assert!(full.len() > 1232);
    conn.write_all(&TcpDnsFramer::frame(&full).unwrap())
        .unwrap();
    let out = drive(&mut svc, &j, Duration::from_secs(5));
    assert_eq!(out[0].0, tcp_client(7));
    let m = decode(&out[0].1);
    assert_eq!(m.id, 0x22);
    assert!(!m.truncation);
    assert_eq!(m.answers.len(), 80);
    assert_eq!(svc.stats().tcp_retries, 1);
    assert!(svc.cache().resolved(
        "big.example",
        IpAddr::from([203, 0, 113, 79]),
        Instant::now()
    ));
}

fn tc_of(q: &Message) -> Message {
    let mut m = answer_to(q, vec![]);
    m.metadata.truncation = true;
    m
}

#[test]
fn a_closed_tcp_client_cancels_its_queries() {
    let up = FakeUpstream::new();
    let mut svc = DnsService::new(settings(vec![up.addr()])).unwrap();
    let j = judge(&[], &[]);
    svc.handle_query(
        tcp_client(3),
        &query_bytes(1, "gone.example.", RecordType::A),
        &j,
        Instant::now(),
    );
    svc.handle_query(
        client(3),
        &query_bytes(1, "stay.example.", RecordType::A),
        &j,
        Instant::now(),
    );
    assert_eq!(svc.in_flight(), 2);
    svc.cancel_tcp_client(3);
    assert_eq!(svc.in_flight(), 1);
    assert_eq!(
        svc.upstream_sockets(),
        1,
        "the cancelled query's socket is closed"
    );
    // Each query went out from its own socket; answer both where they came from.
    for _ in 0..2 {
        let (f, from) = up.recv();
        let name = f.queries[0].name.to_ascii();
        up.reply(&answer_to(&f, vec![a(&name, "203.0.113.9", 60)]), from);
    }
    let out = drive(&mut svc, &j, Duration::from_secs(5));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, client(3));
    assert_eq!(decode(&out[0].1).response_code, ResponseCode::NoError);
}

// ---------------------------------------------------------------------------------------------
// no upstream at all (empty resolv.conf, no dns.nameservers)

#[test]
fn without_upstreams_queries_get_servfail_and_local_answers_still_work() {
    let mut svc = DnsService::new(settings(Vec::new())).expect("a service without upstreams");
    let j = judge(&["blocked.example"], &[]);
    let now = Instant::now();
    let q = query_bytes(0x4242, "www.example.com.", RecordType::A);
    let m = decode(
        &svc.handle_query(client(3000), &q, &j, now)
            .expect("answered at once"),
    );
    assert_eq!(m.id, 0x4242);
    assert_eq!(m.response_code, ResponseCode::ServFail);
    assert_eq!(svc.in_flight(), 0);
    assert_eq!(svc.stats().servfail, 1);
    assert_eq!(svc.stats().forwarded, 0);
    assert!(svc.poll(&j, now).is_empty());
    assert_eq!(svc.next_deadline(), None);

    let q = query_bytes(7, "blocked.example.", RecordType::A);
    let m = decode(&svc.handle_query(client(3001), &q, &j, now).unwrap());
    assert_eq!(m.response_code, ResponseCode::NXDomain);
    let q = query_bytes(8, "host.microsandbox.internal.", RecordType::A);
    let m = decode(&svc.handle_query(client(3002), &q, &j, now).unwrap());
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert!(!m.answers.is_empty());
}

// ---------------------------------------------------------------------------------------------
// rebind protection of every record that carries an address

fn svcb_params(v4: &[&str], v6: &[&str]) -> Vec<(SvcParamKey, SvcParamValue)> {
    let mut params = vec![(
        SvcParamKey::Alpn,
        SvcParamValue::Alpn(Alpn(vec!["h2".to_string()])),
    )];
    if !v4.is_empty() {
        let hint = v4
            .iter()
            .map(|s| Ipv4Addr::from_str(s).unwrap().into())
            .collect();
        params.push((SvcParamKey::Ipv4Hint, SvcParamValue::Ipv4Hint(IpHint(hint))));
    }
    if !v6.is_empty() {
        let hint = v6
            .iter()
            .map(|s| Ipv6Addr::from_str(s).unwrap().into())
            .collect();
        params.push((SvcParamKey::Ipv6Hint, SvcParamValue::Ipv6Hint(IpHint(hint))));
    }
    params
}

fn https(name: &str, v4: &[&str], v6: &[&str]) -> Record {
    let svcb = SVCB::new(1, Name::root(), svcb_params(v4, v6));
    Record::from_rdata(
        Name::from_ascii(name).unwrap(),
        300,
        RData::HTTPS(HTTPS(svcb)),
    )
}

fn svcb(name: &str, v4: &[&str], v6: &[&str]) -> Record {
    let svcb = SVCB::new(
        1,
        Name::from_ascii("svc.example.").unwrap(),
        svcb_params(v4, v6),
    );
    Record::from_rdata(Name::from_ascii(name).unwrap(), 300, RData::SVCB(svcb))
}

/// Every hint address of the SVCB/HTTPS records in `records`.
fn hint_ips(records: &[Record]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for r in records {
        let svcb = match &r.data {
            RData::HTTPS(h) => &h.0,
            RData::SVCB(s) => s,
            _ => continue,
        };
        for (_, v) in &svcb.svc_params {
            match v {
                SvcParamValue::Ipv4Hint(h) => out.extend(h.0.iter().map(|a| IpAddr::V4(a.0))),
                SvcParamValue::Ipv6Hint(h) => out.extend(h.0.iter().map(|a| IpAddr::V6(a.0))),
                _ => {}
            }
        }
    }
    out
}

/// AAAA records whose address spells a protected IPv4 address are removed like A records.
#[test]
fn aaaa_embedding_a_private_ipv4_is_removed() {
    let j = judge(&[], &[]);
    for embedded in ["::ffff:10.0.0.1", "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe"] {
        let q = query_msg(0x61, "mapped.example.", RecordType::AAAA, None);
        let ans = answer_to(&q, vec![aaaa("mapped.example.", embedded)]);
        let raw = ans.to_vec().unwrap();
        let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
        assert!(v.rebind_blocked, "{embedded} passed");
        assert_eq!(
            decode(&v.bytes).response_code,
            ResponseCode::NXDomain,
            "{embedded}"
        );
        assert!(v.cache.is_empty(), "{embedded}");
    }
    // Mixed with a public AAAA: only the embedded private one goes.
    let q = query_msg(0x62, "mixed6.example.", RecordType::AAAA, None);
    let ans = answer_to(
        &q,
        vec![
            aaaa("mixed6.example.", "::ffff:10.0.0.1"),
            aaaa("mixed6.example.", "2001:db8::5"),
        ],
    );
    let raw = ans.to_vec().unwrap();
    let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
    assert_eq!(v.rebind_removed, 1);
    assert_eq!(
        ips(&decode(&v.bytes)),
        vec![IpAddr::from_str("2001:db8::5").unwrap()]
    );
}

/// Address records in the authority section are vetted too.
#[test]
fn address_records_in_every_section_are_vetted() {
    let j = judge(&[], &[]);
    let q = query_msg(0x63, "ns.example.", RecordType::A, None);
    let mut ans = answer_to(&q, vec![a("ns.example.", "203.0.113.63", 60)]);
    ans.authorities.push(a("glue.example.", "192.168.0.1", 60));
    ans.additionals
        .push(aaaa("glue.example.", "::ffff:169.254.169.254"));
    let raw = ans.to_vec().unwrap();
    let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
    assert_eq!(v.rebind_removed, 2);
    let m = decode(&v.bytes);
    assert!(m.authorities.is_empty(), "{:?}", m.authorities);
    assert!(m.additionals.is_empty(), "{:?}", m.additionals);
    assert_eq!(ips(&m), vec![IpAddr::from([203, 0, 113, 63])]);
}

/// An error answer carrying addresses anyway: they are vetted too, the code is kept.
#[test]
fn addresses_beside_an_error_code_are_vetted() {
    let j = judge(&[], &[]);
    for rcode in [ResponseCode::ServFail, ResponseCode::NXDomain] {
        let q = query_msg(0x67, "err.example.", RecordType::A, None);
        let mut ans = answer_to(
            &q,
            vec![
                a("err.example.", "10.1.1.1", 60),
                a("err.example.", "203.0.113.67", 60),
            ],
        );
        ans.metadata.response_code = rcode;
        let raw = ans.to_vec().unwrap();
        let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
        let m = decode(&v.bytes);
        assert_eq!(m.response_code, rcode);
        assert_eq!(ips(&m), vec![IpAddr::from([203, 0, 113, 67])], "{rcode}");
        assert!(v.cache.is_empty(), "an error answer binds no name");
    }
}

/// HTTPS (65) and SVCB (64) hints: a protected hint address is removed and the rest of the
/// record kept; a record whose hint is left empty is dropped; explicitly allowed addresses
/// stay; nothing protected reaches the guest in any section.
#[test]
fn svcb_and_https_hints_are_vetted() {
    let mut j = judge(&[], &[]);
    let q = query_msg(0x64, "svc.example.", RecordType::HTTPS, None);
    let ans = answer_to(
        &q,
        vec![
            https(
                "svc.example.",
                &["10.0.0.1", "203.0.113.5"],
                &["::ffff:10.0.0.1", "2001:db8::5"],
            ),
            https("svc.example.", &["203.0.113.6"], &["::1"]),
        ],
    );
    let raw = ans.to_vec().unwrap();
    let v = vet_answer(&raw, ans.clone(), &guest_query(&q), &j, true, UDP512);
    assert_eq!(v.rebind_removed, 3);
    assert!(!v.rebind_blocked);
    let m = decode(&v.bytes);
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert_eq!(
        m.answers.len(),
        1,
        "the record left with an empty hint goes"
    );
    assert_eq!(
        hint_ips(&m.answers),
        vec![
            IpAddr::from([203, 0, 113, 5]),
            IpAddr::from_str("2001:db8::5").unwrap()
        ]
    );
    let RData::HTTPS(kept) = &m.answers[0].data else {
        panic!("{:?}", m.answers[0]);
    };
    assert!(kept
        .0
        .svc_params
        .iter()
        .any(|(k, _)| *k == SvcParamKey::Alpn));

    // SVCB in the additional section of an A answer, all hints protected: dropped.
    let q = query_msg(0x65, "svc.example.", RecordType::A, None);
    let mut ans = answer_to(&q, vec![a("svc.example.", "203.0.113.65", 60)]);
    ans.additionals
        .push(svcb("_dns.svc.example.", &["169.254.169.254"], &[]));
    let raw = ans.to_vec().unwrap();
    let v = vet_answer(&raw, ans, &guest_query(&q), &j, true, UDP512);
    let m = decode(&v.bytes);
    assert!(m.additionals.is_empty(), "{:?}", m.additionals);
    assert_eq!(ips(&m), vec![IpAddr::from([203, 0, 113, 65])]);

    // Explicitly allowed ranges stay; protection off leaves everything.
    j.allow_ips.push("10.0.0.0/24".parse().unwrap());
    let v = vet_answer(
        &raw_of(&ans_https()),
        ans_https(),
        &guest_query(&q_https()),
        &j,
        true,
        UDP512,
    );
    assert_eq!(
        hint_ips(&decode(&v.bytes).answers),
        vec![IpAddr::from([10, 0, 0, 1])]
    );
    let v = vet_answer(
        &raw_of(&ans_https()),
        ans_https(),
        &guest_query(&q_https()),
        &judge(&[], &[]),
        false,
        UDP512,
    );
    assert_eq!(v.bytes[2..], raw_of(&ans_https())[2..]);
}

fn q_https() -> Message {
    query_msg(0x66, "lan.example.", RecordType::HTTPS, None)
}

fn ans_https() -> Message {
    answer_to(&q_https(), vec![https("lan.example.", &["10.0.0.1"], &[])])
}

fn raw_of(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap()
}

// ---------------------------------------------------------------------------------------------
// upstream sockets: a fresh random port per query, bounded by max_in_flight

#[test]
fn each_query_goes_out_from_its_own_port_with_a_random_id() {
    let up = FakeUpstream::new();
    let mut svc = DnsService::new(settings(vec![up.addr()])).unwrap();
    let j = judge(&[], &[]);
    let mut ports = Vec::new();
    let mut ids = Vec::new();
    for i in 0..8u16 {
        svc.handle_query(
            client(10),
            &query_bytes(i, &format!("p{i}.example."), RecordType::A),
            &j,
            Instant::now(),
        );
        let (f, from) = up.recv();
        assert_eq!(from.ip(), IpAddr::from([127, 0, 0, 1]));
        ports.push(from.port());
        ids.push(f.id);
        // Answered before the next query: a closed socket's port could be reused, so the
        // ports differ only by the kernel's random choice.
        up.reply(&answer_to(&f, vec![]), from);
        drive(&mut svc, &j, Duration::from_secs(5));
        assert_eq!(
            svc.upstream_sockets(),
            0,
            "the socket closes with the answer"
        );
    }
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(
        distinct.len() > 1,
        "every query left from port {}",
        ports[0]
    );
    let mut distinct_ids = ids.clone();
    distinct_ids.sort_unstable();
    distinct_ids.dedup();
    assert!(distinct_ids.len() > 1, "ids {ids:?}");
    assert_ne!(
        ids,
        (ids[0]..ids[0].wrapping_add(8)).collect::<Vec<_>>(),
        "sequential ids"
    );
}

#[test]
fn upstream_sockets_are_bounded_by_max_in_flight() {
    let up = FakeUpstream::new();
    let mut s = settings(vec![up.addr()]);
    s.max_in_flight = 4;
    s.query_timeout = Duration::from_millis(300);
    let mut svc = DnsService::new(s).unwrap();
    let j = judge(&[], &[]);
    let now = Instant::now();
    for i in 0..10u16 {
        svc.handle_query(
            client(20 + i),
            &query_bytes(i, &format!("f{i}.example."), RecordType::A),
            &j,
            now,
        );
    }
    assert_eq!(svc.in_flight(), 4);
    assert_eq!(svc.upstream_sockets(), 4);
    let st = svc.stats();
    assert_eq!((st.forwarded, st.dropped_over_limit), (4, 6));
    // Four queries, from four sockets open at once: four different ports.
    let mut ports: Vec<u16> = (0..4).map(|_| up.recv().1.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 4);
    assert!(up.recv_within(Duration::from_millis(50)).is_none());
    // They time out (one upstream: SERVFAIL) and every socket is closed.
    let mut answered = 0;
    while answered < 4 {
        answered += drive(&mut svc, &j, Duration::from_secs(5)).len();
    }
    assert_eq!(svc.in_flight(), 0);
    assert_eq!(svc.upstream_sockets(), 0);
}

// ---------------------------------------------------------------------------------------------
// answers fit one frame of the link MTU

fn v6_client(port: u16) -> ClientKey {
    ClientKey {
        src: SocketAddr::from((Ipv6Addr::from_str("fd42::2").unwrap(), port)),
        dst: SocketAddr::from((Ipv6Addr::from_str("fd42::1").unwrap(), 53)),
        transport: Transport::Udp,
    }
}

#[test]
fn udp_answer_room_follows_the_mtu_and_family() {
    let s = DnsSettings {
        link_mtu: 576,
        ..DnsSettings::default()
    };
    assert_eq!(s.udp_answer_room(IpAddr::from([10, 0, 2, 15])), 548);
    assert_eq!(s.udp_answer_room(Ipv6Addr::LOCALHOST.into()), 528);
    assert_eq!(
        DnsSettings::default().udp_answer_room(IpAddr::from([10, 0, 2, 15])),
        1472
    );
}

/// With a 576-byte MTU, an answer the client's EDNS size (4096) would take is truncated with TC
/// when it does not fit one frame: 548 bytes over IPv4, 528 over IPv6.
#[test]
fn udp_answers_are_truncated_to_the_link_mtu() {
    // An answer of 529..=548 bytes: fits an IPv4 frame, not an IPv6 one.
    let q = query_msg(0x71, "mtu.example.", RecordType::A, Some(4096));
    let mut n = 0;
    let size = loop {
        n += 1;
        let records = (0..n)
            .map(|i| a("mtu.example.", &format!("203.0.113.{i}"), 60))
            .collect();
        let len = answer_to(&q, records).to_vec().unwrap().len();
        if len > 528 {
            break len;
        }
    };
    assert!(
        size <= 548,
        "no record count gives a 529..=548 byte answer ({size})"
    );
    let mid: Vec<Record> = (0..n)
        .map(|i| a("mtu.example.", &format!("203.0.113.{i}"), 60))
        .collect();
    let big: Vec<Record> = (0..60)
        .map(|i| a("mtu.example.", &format!("203.0.113.{i}"), 60))
        .collect();

    for (client_key, records, fits) in [
        (client(1), mid.clone(), true),
        (v6_client(1), mid, false),
        (client(2), big.clone(), false),
        (v6_client(2), big, false),
    ] {
        let up = FakeUpstream::new();
        let mut s = settings(vec![up.addr()]);
        s.link_mtu = 576;
        let room = s.udp_answer_room(client_key.src.ip());
        let mut svc = DnsService::new(s).unwrap();
        let j = judge(&[], &[]);
        let query = query_msg(0x72, "mtu.example.", RecordType::A, Some(4096));
        svc.handle_query(client_key, &query.to_vec().unwrap(), &j, Instant::now());
        let (f, from) = up.recv();
        up.reply(&answer_to(&f, records.clone()), from);
        let out = drive(&mut svc, &j, Duration::from_secs(5));
        let m = decode(&out[0].1);
        assert!(
            out[0].1.len() <= room,
            "{} bytes for {}",
            out[0].1.len(),
            client_key.src
        );
        assert_eq!(
            m.truncation,
            !fits,
            "{} records to {}",
            records.len(),
            client_key.src
        );
        assert_eq!(m.answers.len(), if fits { records.len() } else { 0 });
        assert_eq!(svc.stats().truncated, u64::from(!fits));
    }
}
