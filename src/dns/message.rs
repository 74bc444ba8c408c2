//! DNS message logic, free of sockets: checking a guest query, building local answers
//! (NXDOMAIN, FORMERR, host aliases), and vetting an upstream answer before the guest sees it
//! (blocked names in CNAME chains, rebind protection, size limits, cache entries).
//!
//! Upstream answers that need no change are passed on byte for byte (only the id is put back);
//! an answer that is changed is re-encoded with hickory-proto.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::names::name_to_string;
use super::rebind::is_rebind_protected;
use super::DomainJudge;

/// The smallest UDP answer every client accepts (RFC 1035).
pub const MIN_UDP_PAYLOAD: usize = 512;
/// The EDNS payload size netfence advertises in its own answers (the DNS flag day value).
pub const LOCAL_EDNS_PAYLOAD: u16 = 1232;
/// TTL of locally answered host alias records.
pub const HOST_ALIAS_TTL: u32 = 60;
/// How many CNAME hops are followed from the query name.
const MAX_CNAME_CHAIN: usize = 16;

/// A guest query that passed the checks.
#[derive(Clone, Debug)]
pub struct GuestQuery {
    pub id: u16,
    pub message: Message,
    pub question: Query,
    /// The query name, normalized (lower case, no trailing dot).
    pub qname: String,
    /// The largest UDP answer the client accepts (its EDNS size, at least 512).
    pub udp_limit: usize,
}

/// What to do with a guest's message.
#[derive(Debug)]
pub enum QueryCheck {
    /// A well-formed standard query.
    Query(Box<GuestQuery>),
    /// Answer at once with this message: FORMERR (`malformed`), NOTIMP or REFUSED.
    Reply { bytes: Vec<u8>, malformed: bool },
    /// Not worth an answer: too short for a header, or itself a response.
    Drop,
}

/// Checks a query from the guest.
pub fn check_query(bytes: &[u8]) -> QueryCheck {
    if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
        return QueryCheck::Drop;
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let op_code = OpCode::from_u8((bytes[2] >> 3) & 0x0f);
    let message = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => return reply_error_header(id, op_code, bytes[2] & 0x01 != 0),
    };
    if message.op_code != OpCode::Query {
        return QueryCheck::Reply {
            bytes: encode_or_empty(&error_reply(&message, ResponseCode::NotImp)),
            malformed: false,
        };
    }
    if message.queries.len() != 1 {
        return QueryCheck::Reply {
            bytes: encode_or_empty(&error_reply(&message, ResponseCode::FormErr)),
            malformed: true,
        };
    }
    let question = message.queries[0].clone();
    if matches!(question.query_type, RecordType::AXFR | RecordType::IXFR) {
        return QueryCheck::Reply {
            bytes: encode_or_empty(&error_reply(&message, ResponseCode::Refused)),
            malformed: false,
        };
    }
    let qname = name_to_string(&question.name);
    let udp_limit = usize::from(message.max_payload()).max(MIN_UDP_PAYLOAD);
    QueryCheck::Query(Box::new(GuestQuery {
        id,
        message,
        question,
        qname,
        udp_limit,
    }))
}

fn reply_error_header(id: u16, op_code: OpCode, rd: bool) -> QueryCheck {
    let mut m = Message::error_msg(id, op_code, ResponseCode::FormErr);
    m.metadata.recursion_desired = rd;
    m.metadata.recursion_available = true;
    QueryCheck::Reply {
        bytes: encode_or_empty(&m),
        malformed: true,
    }
}

fn encode_or_empty(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap_or_default()
}

/// A response to `query` carrying its question, with `rcode` and no records.
pub fn error_reply(query: &Message, rcode: ResponseCode) -> Message {
    let mut m = Message::response(query.id, query.op_code);
    m.metadata.recursion_desired = query.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = query.checking_disabled;
    m.metadata.response_code = rcode;
    m.queries = query.queries.clone();
    if query.edns.is_some() {
        m.edns = Some(local_edns(query.edns.as_ref()));
    }
    m
}

fn local_edns(client: Option<&Edns>) -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(LOCAL_EDNS_PAYLOAD);
    if let Some(c) = client {
        e.set_dnssec_ok(c.flags().dnssec_ok);
    }
    e
}

/// The local answer for a host alias: the gateway addresses of the asked family.
pub fn host_alias_reply(
    query: &GuestQuery,
    v4: &[std::net::Ipv4Addr],
    v6: &[std::net::Ipv6Addr],
) -> Message {
    let mut m = error_reply(&query.message, ResponseCode::NoError);
    m.metadata.authoritative = true;
    let name = query.question.name.clone();
    if query.question.query_class == DNSClass::IN {
        match query.question.query_type {
            RecordType::A => {
                for ip in v4 {
                    m.answers.push(Record::from_rdata(
                        name.clone(),
                        HOST_ALIAS_TTL,
                        RData::A((*ip).into()),
                    ));
                }
            }
            RecordType::AAAA => {
                for ip in v6 {
                    m.answers.push(Record::from_rdata(
                        name.clone(),
                        HOST_ALIAS_TTL,
                        RData::AAAA((*ip).into()),
                    ));
                }
            }
            _ => {}
        }
    }
    m
}

/// Parses only the header and question of an answer that does not decode as a whole, so that
/// it can still be matched to its query.
pub fn answer_header_and_question(bytes: &[u8]) -> Option<(u16, Query)> {
    let mut decoder = BinDecoder::new(bytes);
    let header = hickory_proto::op::Header::read(&mut decoder).ok()?;
    if header.metadata.message_type != MessageType::Response || header.counts.queries != 1 {
        return None;
    }
    let q = Query::read(&mut decoder).ok()?;
    Some((header.metadata.id, q))
}

/// The outcome of vetting an upstream answer.
#[derive(Debug, Default)]
pub struct Vetted {
    /// The message for the guest (its id is the guest's).
    pub bytes: Vec<u8>,
    /// Set when the answer was replaced by NXDOMAIN: the name and the judge's reason.
    pub blocked: Option<(String, String)>,
    /// Address records removed by rebind protection.
    pub rebind_removed: usize,
    /// The answer was replaced by NXDOMAIN because rebind protection left no address.
    pub rebind_blocked: bool,
    /// The answer exceeded the client's size and was cut to its question with TC set.
    pub truncated: bool,
    /// The answer exceeded `max_answer_bytes` on a stream transport: replaced by SERVFAIL.
    pub oversize: bool,
    /// (name, address, ttl) triples the guest now holds.
    pub cache: Vec<(String, IpAddr, u32)>,
}

/// Size constraints for an answer on its way to the guest.
#[derive(Clone, Copy, Debug)]
pub struct SizeLimit {
    /// Largest answer allowed.
    pub max: usize,
    /// What to do above it: truncate with TC (UDP) or SERVFAIL (TCP).
    pub truncate: bool,
}

/// Vets an upstream answer to `query`. `raw` is what upstream sent, `answer` its decoding.
pub fn vet_answer(
    raw: &[u8],
    mut answer: Message,
    query: &GuestQuery,
    judge: &dyn DomainJudge,
    rebind_protection: bool,
    limit: SizeLimit,
) -> Vetted {
    let mut out = Vetted::default();
    let mut modified = false;

    if answer.response_code == ResponseCode::NoError {
        // Blocked names anywhere in the answer section (owners and CNAME targets).
        let mut blocked = None;
        for rec in &answer.answers {
            let owner = name_to_string(&rec.name);
            if let Some(reason) = judge.domain_denied(&owner) {
                blocked = Some((owner, reason));
                break;
            }
            if let RData::CNAME(target) = &rec.data {
                let target = name_to_string(&target.0);
                if let Some(reason) = judge.domain_denied(&target) {
                    blocked = Some((target, reason));
                    break;
                }
            }
        }
        if let Some(b) = blocked {
            out.blocked = Some(b);
            let nx = error_reply(&query.message, ResponseCode::NXDomain);
            out.bytes = finish(&nx, query, limit, &mut out);
            return out;
        }

        if rebind_protection {
            let keep = |rec: &Record| match record_ip(rec) {
                Some(ip) => !is_rebind_protected(ip) || judge.explicitly_allows_ip(ip),
                None => true,
            };
            let had_addresses = answer.answers.iter().any(|r| record_ip(r).is_some());
            let before = answer.answers.len() + answer.additionals.len();
            answer.answers.retain(keep);
            answer.additionals.retain(keep);
            let removed = before - answer.answers.len() - answer.additionals.len();
            if removed > 0 {
                modified = true;
                out.rebind_removed = removed;
                let has_addresses = answer.answers.iter().any(|r| record_ip(r).is_some());
                if had_addresses && !has_addresses {
                    out.rebind_blocked = true;
                    let nx = error_reply(&query.message, ResponseCode::NXDomain);
                    out.bytes = finish(&nx, query, limit, &mut out);
                    return out;
                }
            }
        }

        // Names the guest now holds for each address: the query name and the CNAME chain
        // followed from it. Records outside that chain bind no name.
        let chain = cname_chain(&query.question.name, &answer.answers);
        for rec in &answer.answers {
            if let Some(ip) = record_ip(rec) {
                if chain.contains(&rec.name) {
                    for n in &chain {
                        out.cache.push((name_to_string(n), ip, rec.ttl));
                    }
                }
            }
        }
    }

    let bytes = if modified {
        answer.metadata.id = query.id;
        match answer.to_vec() {
            Ok(b) => b,
            Err(_) => {
                out.cache.clear();
                let fail = error_reply(&query.message, ResponseCode::ServFail);
                return Vetted {
                    bytes: encode_or_empty(&fail),
                    ..out
                };
            }
        }
    } else {
        let mut b = raw.to_vec();
        b[..2].copy_from_slice(&query.id.to_be_bytes());
        b
    };
    if bytes.len() <= limit.max {
        out.bytes = bytes;
        return out;
    }
    out.cache.clear();
    out.bytes = over_limit(&answer, query, limit, &mut out);
    out
}

/// Encodes a locally built answer, applying the size limit.
pub fn finish(m: &Message, query: &GuestQuery, limit: SizeLimit, out: &mut Vetted) -> Vec<u8> {
    match m.to_vec() {
        Ok(b) if b.len() <= limit.max => b,
        Ok(_) => {
            out.cache.clear();
            over_limit(m, query, limit, out)
        }
        Err(_) => encode_or_empty(&error_reply(&query.message, ResponseCode::ServFail)),
    }
}

fn over_limit(answer: &Message, query: &GuestQuery, limit: SizeLimit, out: &mut Vetted) -> Vec<u8> {
    if limit.truncate {
        out.truncated = true;
        truncated_reply(answer, query)
    } else {
        out.oversize = true;
        encode_or_empty(&error_reply(&query.message, ResponseCode::ServFail))
    }
}

/// The answer cut down to header and question, with TC set: the client retries over TCP.
pub fn truncated_reply(answer: &Message, query: &GuestQuery) -> Vec<u8> {
    let mut m = Message::response(query.id, answer.op_code);
    m.metadata = answer.metadata;
    m.metadata.id = query.id;
    m.metadata.truncation = true;
    m.queries = query.message.queries.clone();
    if query.message.edns.is_some() {
        m.edns = Some(local_edns(query.message.edns.as_ref()));
    }
    encode_or_empty(&m)
}

fn record_ip(rec: &Record) -> Option<IpAddr> {
    match &rec.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

/// The query name followed by the CNAME targets reachable from it, in order.
fn cname_chain(qname: &Name, answers: &[Record]) -> Vec<Name> {
    let mut chain = vec![qname.clone()];
    for _ in 0..MAX_CNAME_CHAIN {
        let Some(last) = chain.last() else { break };
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(t) if r.name == *last => Some(t.0.clone()),
            _ => None,
        });
        match next {
            Some(n) if !chain.contains(&n) => chain.push(n),
            _ => break,
        }
    }
    chain
}

/// Addresses in a decoded message's answer section (for logs and tests).
pub fn answer_ips(m: &Message) -> Vec<IpAddr> {
    m.answers.iter().filter_map(record_ip).collect()
}
