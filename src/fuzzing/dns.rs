//! Fuzz bodies for the gateway DNS: guest queries through [`DnsService::handle_query`] (no
//! upstream, so every answer is made locally), upstream answers through
//! [`message::vet_answer`], and the DNS-over-TCP framer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamKey, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::{CNAME, HTTPS};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::{push_record, Input};
use crate::dns::message::{self, check_query, vet_answer, GuestQuery, QueryCheck, SizeLimit};
use crate::dns::names::name_to_string;
use crate::dns::{
    is_rebind_protected, ClientKey, DnsService, DnsSettings, DomainJudge, FrameError, NameRole,
    StaticJudge, TcpDnsFramer, Transport, DEFAULT_HOST_ALIAS,
};

const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd42, 0x6d73, 0x62, 0, 0, 0, 0, 1);
const ALIAS: &str = "alias.test";

/// A guest query for `name` of type `rtype`, optionally with EDNS.
pub fn query_bytes(name: &str, rtype: RecordType, id: u16, edns: bool) -> Vec<u8> {
    query_message(name, rtype, id, edns)
        .to_vec()
        .expect("seed query encodes")
}

fn query_message(name: &str, rtype: RecordType, id: u16, edns: bool) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).expect("seed name"),
        rtype,
    ));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

/// The judge of both DNS bodies: two denied names, one denied suffix, and (when `allow_ips`)
/// an explicitly allowed private range whose addresses pass rebind protection.
fn judge(allow_ips: bool) -> StaticJudge {
    let mut judge = StaticJudge::default();
    judge.deny.add_exact("blocked.test");
    judge.deny.add_exact("evil.example");
    judge.deny.add_suffix(".ads");
    if allow_ips {
        judge
            .allow_ips
            .push("10.9.0.0/16".parse().expect("valid range"));
    }
    judge
}

const MTUS: [u16; 4] = [1280, 1500, 576, 9000];
const MAX_ANSWERS: [usize; 4] = [512, 1232, 4096, 65535];

// ---- guest queries -------------------------------------------------------------------------

/// Input: a flags byte (bit 0: over TCP; bit 1: an IPv6 client; bits 2-3: link MTU; bits 4-5:
/// `max_answer_bytes`) and one message from the guest.
///
/// Holds: no panic; without upstreams every message but a non-query gets an answer at once;
/// every answer decodes, is a response with the query's id, fits the transport (one datagram
/// of the link MTU over UDP, a framable message within `max_answer_bytes` over TCP); a blocked
/// name gets NXDOMAIN, a host alias only the gateway's addresses, anything else SERVFAIL.
pub fn query(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let msg = input.rest();
    let tcp = flags & 1 != 0;
    let client_ip: IpAddr = if flags & 2 != 0 {
        Ipv6Addr::new(0xfd42, 0x6d73, 0x62, 0, 0, 0, 0, 2).into()
    } else {
        Ipv4Addr::new(172, 16, 0, 2).into()
    };
    let settings = DnsSettings {
        upstreams: Vec::new(),
        host_aliases: vec![DEFAULT_HOST_ALIAS.into(), ALIAS.into()],
        gateway_v4: vec![GATEWAY_V4],
        gateway_v6: vec![GATEWAY_V6],
        link_mtu: MTUS[usize::from(flags >> 2) & 3],
        max_answer_bytes: MAX_ANSWERS[usize::from(flags >> 4) & 3],
        ..DnsSettings::default()
    };
    let Ok(mut service) = DnsService::new(settings) else {
        return;
    };
    let settings = service.settings().clone();
    let client = ClientKey {
        src: SocketAddr::new(client_ip, 40000),
        dst: SocketAddr::new(GATEWAY_V4.into(), 53),
        transport: if tcp {
            Transport::Tcp(1)
        } else {
            Transport::Udp
        },
    };
    let judge = judge(false);
    let checked = check_query(msg);
    let answer = service.handle_query(client, msg, &judge, Instant::now());
    let Some(answer) = answer else {
        assert!(
            matches!(checked, QueryCheck::Drop),
            "no answer (no upstream) to {checked:?}"
        );
        return;
    };
    assert!(
        !matches!(checked, QueryCheck::Drop),
        "an answer to a dropped message"
    );
    if tcp {
        assert!(
            answer.len() <= settings.max_answer_bytes,
            "{} bytes over TCP",
            answer.len()
        );
        assert!(TcpDnsFramer::frame(&answer).is_some(), "unframable answer");
    } else {
        let room = settings.udp_answer_room(client_ip);
        assert!(
            answer.len() <= room,
            "a {}-byte UDP answer for a link with room for {room}",
            answer.len()
        );
    }
    let reply = Message::from_vec(&answer).expect("the answer decodes");
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    assert_eq!(reply.metadata.id, u16::from_be_bytes([msg[0], msg[1]]));
    let QueryCheck::Query(query) = checked else {
        return;
    };
    let rcode = reply.metadata.response_code;
    if reply.metadata.truncation {
        assert!(reply.answers.is_empty(), "a truncated answer with records");
    }
    if judge.domain_denied(&query.qname).is_some() {
        assert_eq!(rcode, ResponseCode::NXDomain, "blocked {}", query.qname);
        assert!(reply.answers.is_empty());
    } else if query.qname == ALIAS || query.qname == DEFAULT_HOST_ALIAS {
        assert_eq!(rcode, ResponseCode::NoError);
        for ip in message::answer_ips(&reply) {
            assert!(
                ip == IpAddr::V4(GATEWAY_V4) || ip == IpAddr::V6(GATEWAY_V6),
                "host alias answered with {ip}"
            );
        }
        assert_eq!(message::answer_ips(&reply).len(), reply.answers.len());
    } else {
        assert_eq!(rcode, ResponseCode::ServFail, "{}", query.qname);
    }
}

// ---- upstream answers ----------------------------------------------------------------------

/// A guest query with `question`, as the guest would have sent it (`None` when such a query
/// would not pass `check_query`).
fn query_for(question: &Query, edns: bool) -> Option<GuestQuery> {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(question.clone());
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    match check_query(&m.to_vec().ok()?) {
        QueryCheck::Query(q) => Some(*q),
        _ => None,
    }
}

/// Every address a message carries: A and AAAA records and SVCB/HTTPS hints, in all sections.
fn carried_addresses(m: &Message) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for rec in m.answers.iter().chain(&m.authorities).chain(&m.additionals) {
        let svcb = match &rec.data {
            RData::A(a) => {
                out.push(IpAddr::V4(a.0));
                continue;
            }
            RData::AAAA(a) => {
                out.push(IpAddr::V6(a.0));
                continue;
            }
            RData::SVCB(svcb) => svcb,
            RData::HTTPS(https) => &https.0,
            _ => continue,
        };
        for (_, value) in &svcb.svc_params {
            match value {
                SvcParamValue::Ipv4Hint(hint) => {
                    out.extend(hint.0.iter().map(|a| IpAddr::V4(a.0)));
                }
                SvcParamValue::Ipv6Hint(hint) => {
                    out.extend(hint.0.iter().map(|a| IpAddr::V6(a.0)));
                }
                _ => {}
            }
        }
    }
    out
}

/// Input: a flags byte (bit 0: rebind protection; bit 1: truncate rather than SERVFAIL; bits
/// 2-3: the size limit; bit 4: the judge explicitly allows 10.9.0.0/16; bit 5: EDNS in the
/// made-up query), a record holding the guest's query, then the upstream answer. The service
/// vets only responses with one question, the question of the guest's query: other answers
/// are skipped, and a guest query that does not check or ask that question is replaced by one
/// that does.
///
/// Holds: no panic; the vetted message decodes, is a response with the guest's id and fits the
/// limit; with rebind protection it carries no protected address (A, AAAA, SVCB/HTTPS hints,
/// any section) that the judge does not allow; a NOERROR answer naming a blocked name becomes
/// NXDOMAIN; every cache binding is for an address the guest receives, under the query name or
/// an alias, and a cut or replaced answer binds nothing.
pub fn answer(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let guest_bytes = input.record();
    let raw = input.rest();
    let Ok(upstream) = Message::from_vec(raw) else {
        return;
    };
    if upstream.metadata.message_type != MessageType::Response || upstream.queries.len() != 1 {
        return;
    }
    let question = &upstream.queries[0];
    let query = match check_query(guest_bytes) {
        QueryCheck::Query(q) if q.question == *question => *q,
        _ => match query_for(question, flags & 0x20 != 0) {
            Some(q) => q,
            None => return,
        },
    };
    let rebind = flags & 1 != 0;
    let limit = SizeLimit {
        max: MAX_ANSWERS[usize::from(flags >> 2) & 3],
        truncate: flags & 2 != 0,
    };
    let judge = judge(flags & 0x10 != 0);
    let upstream_rcode = upstream.metadata.response_code;
    let blocked_name = upstream_rcode == ResponseCode::NoError
        && upstream.answers.iter().any(|rec| {
            let cname_blocked = match &rec.data {
                RData::CNAME(target) => judge.domain_denied(&name_to_string(&target.0)).is_some(),
                _ => false,
            };
            cname_blocked || judge.domain_denied(&name_to_string(&rec.name)).is_some()
        });
    let vetted = vet_answer(raw, upstream, &query, &judge, rebind, limit);
    assert!(
        vetted.bytes.len() <= limit.max,
        "{} bytes over a limit of {}",
        vetted.bytes.len(),
        limit.max
    );
    let out = Message::from_vec(&vetted.bytes).expect("the vetted answer decodes");
    assert_eq!(out.metadata.id, query.id);
    assert_eq!(out.metadata.message_type, MessageType::Response);
    if blocked_name {
        assert!(vetted.blocked.is_some(), "a blocked name passed");
        assert_eq!(out.metadata.response_code, ResponseCode::NXDomain);
    }
    let delivered = carried_addresses(&out);
    if rebind {
        for ip in &delivered {
            assert!(
                !is_rebind_protected(*ip) || judge.explicitly_allows_ip(*ip),
                "rebind protection let {ip} through"
            );
        }
    }
    if vetted.truncated || vetted.oversize || vetted.blocked.is_some() || vetted.rebind_blocked {
        assert!(vetted.cache.is_empty(), "a replaced answer binds names");
    }
    let answer_ips = message::answer_ips(&out);
    for binding in &vetted.cache {
        assert!(
            answer_ips.contains(&binding.ip),
            "bound {} to {}, which the guest never received",
            binding.name,
            binding.ip
        );
        if binding.role == NameRole::Asked {
            assert_eq!(
                binding.name, query.qname,
                "an address bound to another name"
            );
        }
    }
}

// ---- DNS over TCP framing ------------------------------------------------------------------

/// A whole stream framed in one go: each message with the offset where it ends, and the
/// error with the offset where its length prefix ends. The model the framer must agree with.
type Framed = (Vec<(usize, Vec<u8>)>, Option<(usize, FrameError)>);

fn frame_whole(stream: &[u8], max: usize) -> Framed {
    let mut messages = Vec::new();
    let mut at = 0;
    while let Some(prefix) = stream.get(at..at + 2) {
        let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
        if len == 0 {
            return (messages, Some((at + 2, FrameError::Empty)));
        }
        if len > max {
            return (messages, Some((at + 2, FrameError::TooLarge { len, max })));
        }
        let Some(message) = stream.get(at + 2..at + 2 + len) else {
            break;
        };
        at += 2 + len;
        messages.push((at, message.to_vec()));
    }
    (messages, None)
}

/// Input: a byte choosing the framer's limit, then chunks (a length byte and that many bytes)
/// pushed one by one.
///
/// Holds: no panic; the messages and the error are those of the whole stream framed at once,
/// however it is cut, except that the push that meets an error returns only the error (the
/// messages it completed before it are dropped with the connection); the framer never holds
/// more than one message and its prefix; after an error it keeps returning it.
pub fn tcp_framer(data: &[u8]) {
    let mut input = Input::new(data);
    let choice = input.byte();
    let max = if choice == 0 {
        crate::dns::framer::DEFAULT_MAX_TCP_MESSAGE
    } else {
        usize::from(choice) * 4
    };
    let mut framer = TcpDnsFramer::with_max_message(max);
    let mut stream = Vec::new();
    let mut push_starts = Vec::new();
    let mut messages = Vec::new();
    let mut error = None;
    while !input.is_empty() {
        let len = usize::from(input.byte());
        let chunk = input.bytes(len);
        push_starts.push(stream.len());
        stream.extend_from_slice(chunk);
        match framer.push(chunk) {
            Ok(done) => {
                assert!(error.is_none(), "the framer recovered from {error:?}");
                messages.extend(done);
            }
            Err(e) => {
                if let Some(first) = error {
                    assert_eq!(e, first, "a poisoned framer changed its error");
                }
                error = Some(e);
            }
        }
        assert!(
            framer.buffered() <= max + 2,
            "{} bytes held",
            framer.buffered()
        );
    }
    let (framed, framed_error) = frame_whole(&stream, max);
    // Messages completed by the push that met the error went with it.
    let cut = framed_error.map_or(usize::MAX, |(end, _)| {
        push_starts
            .iter()
            .copied()
            .filter(|start| *start < end)
            .max()
            .unwrap_or(0)
    });
    let expected: Vec<Vec<u8>> = framed
        .into_iter()
        .filter(|(end, _)| *end <= cut)
        .map(|(_, m)| m)
        .collect();
    assert_eq!(messages, expected);
    assert_eq!(error, framed_error.map(|(_, e)| e));
}

// ---- seeds ---------------------------------------------------------------------------------

pub fn query_seeds() -> Vec<Vec<u8>> {
    let mut two = query_message("a.example", RecordType::A, 7, false);
    two.add_query(Query::query(
        Name::from_ascii("b.example").expect("seed name"),
        RecordType::AAAA,
    ));
    let mut status = query_message("example.com", RecordType::A, 8, false);
    status.metadata.op_code = OpCode::Status;
    // Many long questions: a FORMERR that echoed them all would not fit the link.
    let label = "a".repeat(60);
    let mut many = query_message(&format!("{label}.{label}.test"), RecordType::A, 9, false);
    for i in 0..20 {
        let name = format!("{}{i:02}.{label}.{label}.test", "b".repeat(58));
        many.add_query(Query::query(
            Name::from_ascii(&name).expect("seed name"),
            RecordType::A,
        ));
    }
    let messages = [
        query_bytes(ALIAS, RecordType::A, 1, false),
        query_bytes(ALIAS, RecordType::AAAA, 2, true),
        query_bytes("www.blocked.test", RecordType::A, 3, false),
        query_bytes("tracker.ads", RecordType::HTTPS, 4, true),
        query_bytes("example.com", RecordType::MX, 5, false),
        query_bytes("example.com", RecordType::AXFR, 6, false),
        two.to_vec().expect("seed encodes"),
        status.to_vec().expect("seed encodes"),
        many.to_vec().expect("seed encodes"),
    ];
    let mut seeds = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        let mut seed = vec![(i as u8 * 5) & 0x3f];
        seed.extend_from_slice(&m);
        seeds.push(seed);
    }
    seeds
}

fn record(name: &str, data: RData) -> Record {
    Record::from_rdata(Name::from_ascii(name).expect("seed name"), 300, data)
}

fn a(name: &str, ip: [u8; 4]) -> Record {
    record(name, RData::A(Ipv4Addr::from(ip).into()))
}

fn https_hints(name: &str, v4: &[[u8; 4]], v6: &[Ipv6Addr]) -> Record {
    let mut params = vec![];
    if !v4.is_empty() {
        let hint = v4.iter().map(|ip| Ipv4Addr::from(*ip).into()).collect();
        params.push((SvcParamKey::Ipv4Hint, SvcParamValue::Ipv4Hint(IpHint(hint))));
    }
    if !v6.is_empty() {
        let hint = v6.iter().map(|ip| (*ip).into()).collect();
        params.push((SvcParamKey::Ipv6Hint, SvcParamValue::Ipv6Hint(IpHint(hint))));
    }
    record(
        name,
        RData::HTTPS(HTTPS(SVCB::new(1, Name::root(), params))),
    )
}

/// An answer input: flags, the query, the upstream answer with `records`.
fn answer_seed(flags: u8, q: &Message, records: Vec<Record>) -> Vec<u8> {
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_available = true;
    m.queries = q.queries.clone();
    m.answers = records;
    let mut seed = vec![flags];
    push_record(&mut seed, &q.to_vec().expect("seed encodes"));
    seed.extend_from_slice(&m.to_vec().expect("seed encodes"));
    seed
}

pub fn answer_seeds() -> Vec<Vec<u8>> {
    let q = query_message("www.example.com", RecordType::A, 9, true);
    let name = "www.example.com";
    let cname = |from: &str, to: &str| {
        record(
            from,
            RData::CNAME(CNAME(Name::from_ascii(to).expect("seed name"))),
        )
    };
    let many: Vec<Record> = (0..80).map(|i| a(name, [198, 51, 100, i])).collect();
    let mapped = Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a00, 1);
    vec![
        answer_seed(0x01, &q, vec![a(name, [203, 0, 113, 5])]),
        answer_seed(
            0x01,
            &q,
            vec![a(name, [10, 0, 0, 5]), a(name, [203, 0, 113, 6])],
        ),
        answer_seed(0x11, &q, vec![a(name, [10, 9, 1, 1])]),
        answer_seed(
            0x01,
            &q,
            vec![
                cname(name, "cdn.evil.example"),
                a("cdn.evil.example", [203, 0, 113, 7]),
            ],
        ),
        answer_seed(
            0x01,
            &q,
            vec![
                cname(name, "edge.example.net"),
                a("edge.example.net", [203, 0, 113, 8]),
            ],
        ),
        answer_seed(0x01, &q, vec![record(name, RData::AAAA(mapped.into()))]),
        answer_seed(
            0x01,
            &q,
            vec![https_hints(
                name,
                &[[192, 168, 1, 1], [203, 0, 113, 9]],
                &[mapped],
            )],
        ),
        answer_seed(0x03, &q, many.clone()),
        answer_seed(0x00, &q, many),
    ]
}

pub fn tcp_framer_seeds() -> Vec<Vec<u8>> {
    let query = query_bytes(ALIAS, RecordType::A, 1, false);
    let framed = TcpDnsFramer::frame(&query).expect("seed frames");
    let mut two = framed.clone();
    two.extend_from_slice(&framed);
    let cut = |stream: &[u8], size: usize| -> Vec<u8> {
        let mut out = vec![0];
        for chunk in stream.chunks(size) {
            out.push(chunk.len() as u8);
            out.extend_from_slice(chunk);
        }
        out
    };
    vec![
        cut(&framed, 255),
        cut(&two, 1),
        cut(&two, 7),
        cut(&[0, 0, 1], 3),
        {
            let mut s = cut(&two, 13);
            s[0] = 4;
            s
        },
    ]
}
