//! DNS message logic, free of sockets: checking a guest query, building local answers
//! (NXDOMAIN, FORMERR, host aliases), and vetting an upstream answer before the guest sees it
//! (blocked names in CNAME chains, rebind protection, size limits, cache entries).
//!
//! Rebind protection looks at every record that carries an address, in every section: A, AAAA
//! (judged by [`is_rebind_protected`], which sees through IPv6 spellings of IPv4 addresses),
//! and the `ipv4hint` / `ipv6hint` SvcParams of SVCB (type 64) and HTTPS (type 65) records.
//! A protected hint address is removed from its hint and the rest of the record kept (its ALPN
//! and ECH parameters stay useful); a record whose hint is left empty is dropped, since an
//! empty hint is invalid (RFC 9460 7.3) and removing the key could break a `mandatory` list.
//!
//! Addresses are bound in the cache to the *question* name only; CNAME targets on the way are
//! bound as aliases (see [`super::cache`]), and records outside the chain from the question
//! bind nothing.
//!
//! Upstream answers that need no change are passed on byte for byte (only the id is put back),
//! unless putting the id back changes what they decode to (a compression pointer into the id:
//! the guest would read other names than the ones vetted); an answer that is changed, or would
//! be, is re-encoded with hickory-proto.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::svcb::{SvcParamValue, SVCB};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::cache::NameRole;
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

/// `reply` (a local error answer) if it has at most `max` bytes, else its header alone with
/// every count zero: the guest echoed too many questions for one answer (RFC 1035 lets an
/// error answer leave the question out).
pub fn header_only_above(reply: Vec<u8>, max: usize) -> Vec<u8> {
    if reply.len() <= max {
        return reply;
    }
    let mut header = reply;
    header.truncate(12);
    if let Some(counts) = header.get_mut(4..12) {
        counts.fill(0);
    }
    header
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
    /// Names the guest now holds for addresses.
    pub cache: Vec<NameBinding>,
}

/// An address the guest received and a name it is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameBinding {
    /// Normalized.
    pub name: String,
    pub ip: IpAddr,
    pub ttl: u32,
    pub role: NameRole,
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
    }

    // Rebind protection, whatever the response code: a record carrying a protected address
    // never reaches the guest, even beside an error code.
    if rebind_protection {
        let protected = |ip: IpAddr| is_rebind_protected(ip) && !judge.explicitly_allows_ip(ip);
        let had_addresses = answer.answers.iter().any(|r| record_ip(r).is_some());
        let mut removed = 0;
        for section in [
            &mut answer.answers,
            &mut answer.authorities,
            &mut answer.additionals,
        ] {
            removed += remove_protected(section, &protected);
        }
        if removed > 0 {
            modified = true;
            out.rebind_removed = removed;
            let has_addresses = answer.answers.iter().any(|r| record_ip(r).is_some());
            if had_addresses && !has_addresses && answer.response_code == ResponseCode::NoError {
                out.rebind_blocked = true;
                let nx = error_reply(&query.message, ResponseCode::NXDomain);
                out.bytes = finish(&nx, query, limit, &mut out);
                return out;
            }
        }
    }

    if answer.response_code == ResponseCode::NoError {
        // The names the guest now holds for each address: the question name, and as aliases
        // the CNAME targets followed from it. Records outside that chain bind no name.
        let chain = cname_chain(&query.question.name, &answer.answers);
        for rec in &answer.answers {
            let Some(ip) = record_ip(rec) else { continue };
            if !chain.contains(&rec.name) {
                continue;
            }
            out.cache.push(NameBinding {
                name: query.qname.clone(),
                ip,
                ttl: rec.ttl,
                role: NameRole::Asked,
            });
            for alias in chain.iter().skip(1) {
                out.cache.push(NameBinding {
                    name: name_to_string(alias),
                    ip,
                    ttl: rec.ttl,
                    role: NameRole::Alias,
                });
            }
        }
    }

    answer.metadata.id = query.id;
    let passed_on = (!modified)
        .then(|| {
            let mut b = raw.to_vec();
            b[..2].copy_from_slice(&query.id.to_be_bytes());
            b
        })
        .filter(|b| Message::from_vec(b).is_ok_and(|m| m == answer));
    let bytes = match passed_on {
        Some(b) => b,
        None => match answer.to_vec() {
            Ok(b) => b,
            Err(_) => {
                out.cache.clear();
                let fail = error_reply(&query.message, ResponseCode::ServFail);
                return Vetted {
                    bytes: encode_or_empty(&fail),
                    ..out
                };
            }
        },
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

/// Removes protected addresses from `records`: A/AAAA records in protected space, and protected
/// addresses of SVCB/HTTPS hints (a record whose hint is left empty goes). Returns how many
/// addresses were removed.
fn remove_protected(records: &mut Vec<Record>, protected: &dyn Fn(IpAddr) -> bool) -> usize {
    let mut removed = 0;
    records.retain_mut(|rec| {
        if let Some(ip) = record_ip(rec) {
            if protected(ip) {
                removed += 1;
                return false;
            }
            return true;
        }
        match svcb_mut(&mut rec.data) {
            Some(svcb) => {
                let (n, keep) = filter_hints(svcb, protected);
                removed += n;
                keep
            }
            None => true,
        }
    });
    removed
}

fn svcb_mut(data: &mut RData) -> Option<&mut SVCB> {
    match data {
        RData::SVCB(svcb) => Some(svcb),
        RData::HTTPS(https) => Some(&mut https.0),
        _ => None,
    }
}

/// Removes protected addresses from the hints of `svcb`. Returns how many were removed and
/// whether the record can stay (false when a hint was emptied).
fn filter_hints(svcb: &mut SVCB, protected: &dyn Fn(IpAddr) -> bool) -> (usize, bool) {
    let mut removed = 0;
    let mut keep = true;
    for (_, value) in &mut svcb.svc_params {
        let (before, after) = match value {
            SvcParamValue::Ipv4Hint(hint) => {
                let before = hint.0.len();
                hint.0.retain(|a| !protected(IpAddr::V4(a.0)));
                (before, hint.0.len())
            }
            SvcParamValue::Ipv6Hint(hint) => {
                let before = hint.0.len();
                hint.0.retain(|a| !protected(IpAddr::V6(a.0)));
                (before, hint.0.len())
            }
            _ => continue,
        };
        removed += before - after;
        if after == 0 && before > 0 {
            keep = false;
        }
    }
    (removed, keep)
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
