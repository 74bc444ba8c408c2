//! [`DnsService`]: the query table, the upstream sockets and their epoll.
//!
//! Every upstream attempt goes out from its own UDP socket, bound to port 0 (the kernel picks a
//! random ephemeral port) and connected to the upstream (the kernel drops datagrams from any
//! other source, and an ICMP error surfaces as ECONNREFUSED), under a random 16-bit id. The
//! socket is closed when the attempt ends: answered, timed out (the next upstream gets a fresh
//! socket), moved to TCP, or cancelled. An off-path spoofer must so guess the port as well as
//! the id, and there is at most one upstream socket per query in flight, so `max_in_flight`
//! bounds the descriptors.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use socket2::{Domain, Socket, Type};
use tracing::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::cache::NameCache;
use super::framer::TcpDnsFramer;
use super::message::{
    answer_header_and_question, answer_ips, check_query, error_reply, finish, header_only_above,
    host_alias_reply, vet_answer, GuestQuery, QueryCheck, SizeLimit, Vetted, HOST_ALIAS_TTL,
    MIN_UDP_PAYLOAD,
};
use super::names::normalize_name;
use super::{ClientKey, DnsSettings, DnsStats, DomainJudge, Transport, MAX_IN_FLIGHT_CEILING};
use crate::observe::LogGate;

/// Epoll tokens at or above this are TCP upstream connections; below are the UDP sockets of
/// queries (a serial number above the query id in the low 16 bits).
const TCP_TOKEN_BASE: u64 = 1 << 62;
/// Datagrams read from one query's socket per `poll` (the epoll is level-triggered, so any
/// rest wakes the thread again).
const RECV_BUDGET: usize = 16;
/// Epoll events fetched per wait.
const EVENT_BATCH: usize = 64;

/// The UDP socket of one upstream attempt of a query.
struct QuerySocket {
    sock: UdpSocket,
    /// Its epoll token.
    token: u64,
    /// Index of the upstream it is connected to.
    upstream: usize,
}

struct Pending {
    client: ClientKey,
    query: GuestQuery,
    /// The guest's query bytes with the upstream id in place.
    wire: Vec<u8>,
    /// Index of the first upstream tried.
    start: usize,
    /// Upstreams tried so far, minus one.
    attempt: usize,
    deadline: Instant,
    /// The socket of the current UDP attempt.
    udp: Option<QuerySocket>,
    /// A TCP connection fetching the answer again after a truncated UDP answer.
    tcp: Option<u64>,
}

struct TcpUpstream {
    stream: TcpStream,
    upstream: usize,
    id: u16,
    out: Vec<u8>,
    written: usize,
    framer: TcpDnsFramer,
}

/// The gateway DNS forwarder. See the module documentation.
pub struct DnsService {
    settings: DnsSettings,
    host_aliases: Vec<String>,
    epoll: Epoll,
    upstreams: Vec<SocketAddr>,
    pending: HashMap<u16, Pending>,
    by_client: HashMap<(ClientKey, u16), u16>,
    deadlines: BTreeSet<(Instant, u16)>,
    tcp: HashMap<u64, TcpUpstream>,
    next_tcp: u64,
    next_udp: u64,
    preferred: usize,
    rng: IdSource,
    /// Shared with the other queue pairs' services of a multiqueue VM (see `share_cache`).
    cache: Arc<RwLock<NameCache>>,
    stats: DnsStats,
    buf: Vec<u8>,
    /// Lines about single queries (blocked, SERVFAIL, rebinding): a guest asking a blocked name
    /// a million times gets a few lines and a count, not a line per query.
    query_log: LogGate,
}

impl DnsService {
    /// A service forwarding to `settings.upstreams` (no socket is opened until a query needs
    /// one). No upstreams at all is allowed (no nameserver on the host): queries that need one
    /// get SERVFAIL, blocked names and host aliases are still answered.
    pub fn new(mut settings: DnsSettings) -> io::Result<Self> {
        settings.max_in_flight = settings.max_in_flight.clamp(1, MAX_IN_FLIGHT_CEILING);
        settings.max_answer_bytes = settings.max_answer_bytes.clamp(512, 65535);
        let epoll = Epoll::new()?;
        let upstreams = settings.upstreams.clone();
        let host_aliases = settings
            .host_aliases
            .iter()
            .map(|a| normalize_name(a))
            .collect();
        Ok(Self {
            cache: Arc::new(RwLock::new(NameCache::new(settings.cache_capacity))),
            settings,
            host_aliases,
            epoll,
            upstreams,
            pending: HashMap::new(),
            by_client: HashMap::new(),
            deadlines: BTreeSet::new(),
            tcp: HashMap::new(),
            next_tcp: 0,
            next_udp: 0,
            preferred: 0,
            rng: IdSource::new(),
            stats: DnsStats::default(),
            buf: vec![0u8; 65536],
            query_log: LogGate::new(20, Duration::from_secs(10)),
        })
    }

    /// The one descriptor to register (`EPOLLIN`, level-triggered) in the queue thread's epoll;
    /// it stays the same for the life of the service. Readable means: call [`Self::poll`].
    pub fn event_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn settings(&self) -> &DnsSettings {
        &self.settings
    }

    /// The IP -> names cache, filled from every answer delivered to the guest.
    pub fn cache(&self) -> std::sync::RwLockReadGuard<'_, NameCache> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The cache, to share with the services of a multiqueue VM's other pairs.
    pub fn cache_handle(&self) -> Arc<RwLock<NameCache>> {
        self.cache.clone()
    }

    /// Uses `cache` (another pair's) instead of this service's own: a name pair 0 resolved
    /// then decides a flow opened on any pair.
    pub fn share_cache(&mut self, cache: Arc<RwLock<NameCache>>) {
        self.cache = cache;
    }

    fn cache_mut(&self) -> std::sync::RwLockWriteGuard<'_, NameCache> {
        self.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> DnsStats {
        self.stats
    }

    /// Queries waiting for an upstream answer.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Upstream sockets open now (UDP and TCP); never more than [`Self::in_flight`].
    pub fn upstream_sockets(&self) -> usize {
        self.pending.values().filter(|p| p.udp.is_some()).count() + self.tcp.len()
    }

    /// The earliest upstream deadline; call [`Self::poll`] when it has passed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.iter().next().map(|(t, _)| *t)
    }

    /// A message from the guest. Returns the answer when it is made at once (blocked name ->
    /// NXDOMAIN, host alias -> gateway addresses, malformed -> FORMERR, no upstream reachable
    /// -> SERVFAIL), or `None` when the query was forwarded, is a retransmission of one in
    /// flight, or was dropped (unparseable, over `max_in_flight`: counted).
    pub fn handle_query(
        &mut self,
        client: ClientKey,
        msg: &[u8],
        judge: &dyn DomainJudge,
        now: Instant,
    ) -> Option<Vec<u8>> {
        self.stats.queries += 1;
        let query = match check_query(msg) {
            QueryCheck::Drop => {
                self.stats.malformed += 1;
                debug!(client = %client.src, len = msg.len(), "dns: dropped malformed message");
                return None;
            }
            QueryCheck::Reply { bytes, malformed } => {
                if malformed {
                    self.stats.malformed += 1;
                } else {
                    self.stats.unsupported += 1;
                }
                // The reply echoes the guest's questions, as many as it sent (a reassembled
                // datagram can be far larger than the link MTU): over UDP it must still fit
                // what every client accepts and one frame of the link.
                let max = match client.transport {
                    Transport::Udp => {
                        MIN_UDP_PAYLOAD.min(self.settings.udp_answer_room(client.src.ip()))
                    }
                    Transport::Tcp(_) => self.settings.max_answer_bytes,
                };
                return Some(header_only_above(bytes, max));
            }
            QueryCheck::Query(q) => *q,
        };
        let limit = self.size_limit(&client, &query);

        if let Some(reason) = judge.domain_denied(&query.qname) {
            self.stats.blocked += 1;
            if let Some(suppressed) = self.query_log.admit(now) {
                info!(client = %client.src, name = %query.qname, %reason, suppressed, "dns: blocked, NXDOMAIN");
            }
            let nx = error_reply(&query.message, ResponseCode::NXDomain);
            return Some(self.finish_local(&nx, &query, limit));
        }
        if self.host_aliases.contains(&query.qname) {
            self.stats.answered_locally += 1;
            let reply =
                host_alias_reply(&query, &self.settings.gateway_v4, &self.settings.gateway_v6);
            let bytes = self.finish_local(&reply, &query, limit);
            for ip in answer_ips(&reply) {
                self.cache_mut().insert(
                    &query.qname,
                    ip,
                    Duration::from_secs(u64::from(HOST_ALIAS_TTL)),
                    now,
                );
            }
            return Some(bytes);
        }
        if self.by_client.contains_key(&(client, query.id)) {
            self.stats.duplicates += 1;
            return None;
        }
        if self.upstreams.is_empty() {
            self.stats.servfail += 1;
            debug!(client = %client.src, name = %query.qname, "dns: no upstream nameserver, SERVFAIL");
            let sf = error_reply(&query.message, ResponseCode::ServFail);
            return Some(self.finish_local(&sf, &query, limit));
        }
        if self.pending.len() >= self.settings.max_in_flight {
            self.stats.dropped_over_limit += 1;
            debug!(client = %client.src, name = %query.qname, "dns: too many queries in flight, dropped");
            return None;
        }

        let id = self.free_id();
        let mut wire = msg.to_vec();
        wire[..2].copy_from_slice(&id.to_be_bytes());
        let start = self.preferred.min(self.upstreams.len() - 1);
        self.by_client.insert((client, query.id), id);
        self.pending.insert(
            id,
            Pending {
                client,
                query,
                wire,
                start,
                attempt: 0,
                deadline: now,
                udp: None,
                tcp: None,
            },
        );
        self.stats.forwarded += 1;
        let mut out = Vec::new();
        self.send_from(id, 0, now, &mut out);
        out.pop().map(|(_, bytes)| bytes)
    }

    /// Drops the queries of a guest TCP connection that went away.
    pub fn cancel_tcp_client(&mut self, conn: u64) {
        let ids: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, p)| p.client.transport == Transport::Tcp(conn))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.remove(id);
        }
    }

    /// Reads every upstream answer ready now and handles queries whose deadline passed
    /// (failover to the next upstream; SERVFAIL after the last). Returns the answers to deliver.
    pub fn poll(&mut self, judge: &dyn DomainJudge, now: Instant) -> Vec<(ClientKey, Vec<u8>)> {
        let mut out = Vec::new();
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        // One wait: anything left over keeps the (level-triggered) descriptor readable.
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!(error = %e, "dns: epoll_wait failed");
                }
                0
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token >= TCP_TOKEN_BASE {
                self.tcp_event(token, judge, now, &mut out);
            } else {
                self.udp_readable(token, judge, now, &mut out);
            }
        }
        self.expire(now, &mut out);
        out
    }

    fn size_limit(&self, client: &ClientKey, query: &GuestQuery) -> SizeLimit {
        match client.transport {
            Transport::Udp => SizeLimit {
                max: query
                    .udp_limit
                    .min(self.settings.max_answer_bytes)
                    .min(self.settings.udp_answer_room(client.src.ip())),
                truncate: true,
            },
            Transport::Tcp(_) => SizeLimit {
                max: self.settings.max_answer_bytes,
                truncate: false,
            },
        }
    }

    fn finish_local(&mut self, m: &Message, query: &GuestQuery, limit: SizeLimit) -> Vec<u8> {
        let mut v = Vetted::default();
        let bytes = finish(m, query, limit, &mut v);
        self.count_vetted(&v);
        bytes
    }

    fn count_vetted(&mut self, v: &Vetted) {
        if v.truncated {
            self.stats.truncated += 1;
        }
        if v.oversize {
            self.stats.oversize += 1;
            self.stats.servfail += 1;
        }
    }

    fn free_id(&mut self) -> u16 {
        loop {
            let id = self.rng.next();
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    fn set_deadline(&mut self, id: u16, deadline: Instant) {
        if let Some(p) = self.pending.get_mut(&id) {
            self.deadlines.remove(&(p.deadline, id));
            p.deadline = deadline;
            self.deadlines.insert((deadline, id));
        }
    }

    fn remove(&mut self, id: u16) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        self.deadlines.remove(&(p.deadline, id));
        self.by_client.remove(&(p.client, p.query.id));
        if let Some(token) = p.tcp {
            self.drop_tcp(token);
        }
        if let Some(udp) = &p.udp {
            self.unwatch(udp);
        }
        Some(p)
    }

    /// Closes the socket of query `id`'s current UDP attempt, if any.
    fn drop_udp(&mut self, id: u16) {
        if let Some(udp) = self.pending.get_mut(&id).and_then(|p| p.udp.take()) {
            self.unwatch(&udp);
        }
    }

    fn unwatch(&self, udp: &QuerySocket) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            udp.sock.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    /// A fresh socket for query `id`'s attempt at upstream `idx`, watched by the epoll, with the
    /// query sent on it.
    fn open_attempt(&mut self, id: u16, idx: usize, wire: &[u8]) -> io::Result<QuerySocket> {
        let addr = self.upstreams[idx];
        let sock = open_udp(addr)?;
        self.next_udp = (self.next_udp + 1) % (TCP_TOKEN_BASE >> 16);
        let token = (self.next_udp << 16) | u64::from(id);
        sock.send(wire)?;
        self.epoll.ctl(
            ControlOperation::Add,
            sock.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
        Ok(QuerySocket {
            sock,
            token,
            upstream: idx,
        })
    }

    fn drop_tcp(&mut self, token: u64) {
        if let Some(conn) = self.tcp.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Sends query `id` to its upstreams from attempt `attempt` on, skipping those that fail
    /// at once; SERVFAIL to the client when none is left.
    fn send_from(
        &mut self,
        id: u16,
        mut attempt: usize,
        now: Instant,
        out: &mut Vec<(ClientKey, Vec<u8>)>,
    ) {
        let n = self.upstreams.len();
        // The previous attempt's socket goes before the next one opens.
        self.drop_udp(id);
        loop {
            let Some(p) = self.pending.get(&id) else {
                return;
            };
            if attempt >= n {
                self.servfail(id, out);
                return;
            }
            let idx = (p.start + attempt) % n;
            let wire = p.wire.clone();
            match self.open_attempt(id, idx, &wire) {
                Ok(udp) => {
                    if let Some(p) = self.pending.get_mut(&id) {
                        p.attempt = attempt;
                        p.udp = Some(udp);
                    }
                    self.set_deadline(id, now + self.settings.query_timeout);
                    return;
                }
                Err(e) => {
                    debug!(upstream = %self.upstreams[idx], error = %e, "dns: send to upstream failed");
                    self.stats.timeouts += 1;
                    attempt += 1;
                }
            }
        }
    }

    fn servfail(&mut self, id: u16, out: &mut Vec<(ClientKey, Vec<u8>)>) {
        if let Some(p) = self.remove(id) {
            self.stats.servfail += 1;
            if let Some(suppressed) = self.query_log.admit(Instant::now()) {
                info!(client = %p.client.src, name = %p.query.qname, suppressed, "dns: no upstream answered, SERVFAIL");
            }
            let m = error_reply(&p.query.message, ResponseCode::ServFail);
            if let Ok(bytes) = m.to_vec() {
                out.push((p.client, bytes));
            }
        }
    }

    /// Moves query `id` on to its next upstream.
    fn advance(&mut self, id: u16, now: Instant, out: &mut Vec<(ClientKey, Vec<u8>)>) {
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        self.stats.timeouts += 1;
        let next = p.attempt + 1;
        if let Some(token) = p.tcp.take() {
            self.drop_tcp(token);
        }
        self.send_from(id, next, now, out);
    }

    fn expire(&mut self, now: Instant, out: &mut Vec<(ClientKey, Vec<u8>)>) {
        while let Some(&(deadline, id)) = self.deadlines.iter().next() {
            if deadline > now {
                break;
            }
            self.deadlines.remove(&(deadline, id));
            if let Some(p) = self.pending.get(&id) {
                debug!(name = %p.query.qname, upstream = %self.upstreams[(p.start + p.attempt) % self.upstreams.len()], "dns: upstream timed out");
            }
            self.advance(id, now, out);
        }
    }

    /// The socket of a query's UDP attempt is readable.
    fn udp_readable(
        &mut self,
        token: u64,
        judge: &dyn DomainJudge,
        now: Instant,
        out: &mut Vec<(ClientKey, Vec<u8>)>,
    ) {
        let id = token as u16;
        for _ in 0..RECV_BUDGET {
            // The query may be answered, failed over or gone since the event was raised.
            let Some(udp) = self
                .pending
                .get(&id)
                .and_then(|p| p.udp.as_ref())
                .filter(|u| u.token == token)
            else {
                return;
            };
            let upstream = self.upstreams[udp.upstream];
            let (len, from) = match udp.sock.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::HostUnreachable
                            | io::ErrorKind::NetworkUnreachable
                    ) =>
                {
                    // An ICMP error for this upstream (nothing listens there, no route): the
                    // query moves on without waiting for its timeout.
                    debug!(%upstream, error = %e, "dns: upstream unreachable, failing over");
                    self.advance(id, now, out);
                    return;
                }
                Err(e) => {
                    debug!(%upstream, error = %e, "dns: upstream receive failed");
                    return;
                }
            };
            if !same_addr(from, upstream) {
                self.stats.mismatched += 1;
                continue;
            }
            let datagram = self.buf[..len].to_vec();
            self.upstream_answer(&datagram, Source::Udp(token), judge, now, out);
        }
    }

    /// An upstream message: match it to its query, then vet and deliver it.
    fn upstream_answer(
        &mut self,
        bytes: &[u8],
        source: Source,
        judge: &dyn DomainJudge,
        now: Instant,
        out: &mut Vec<(ClientKey, Vec<u8>)>,
    ) {
        let decoded = Message::from_vec(bytes);
        let (id, question) = match &decoded {
            Ok(m) if m.message_type == MessageType::Response && m.queries.len() == 1 => {
                (m.id, m.queries[0].clone())
            }
            Ok(_) => {
                self.stats.mismatched += 1;
                return;
            }
            Err(_) => match answer_header_and_question(bytes) {
                Some(hq) => hq,
                None => {
                    self.stats.mismatched += 1;
                    return;
                }
            },
        };
        let Some(p) = self.pending.get(&id) else {
            self.stats.mismatched += 1;
            return;
        };
        let source_ok = match source {
            Source::Udp(token) => p.udp.as_ref().is_some_and(|u| u.token == token),
            Source::Tcp(token) => p.tcp == Some(token),
        };
        if !source_ok || question != p.query.question {
            self.stats.mismatched += 1;
            debug!(id, "dns: upstream message matches no query, ignored");
            return;
        }
        let upstream_idx = match source {
            Source::Udp(_) => p.udp.as_ref().map_or(0, |u| u.upstream),
            Source::Tcp(token) => self.tcp.get(&token).map_or(0, |c| c.upstream),
        };
        let answer = match decoded {
            Ok(m) => m,
            Err(e) => {
                self.stats.upstream_malformed += 1;
                debug!(id, error = %e, "dns: undecodable upstream answer");
                self.servfail(id, out);
                return;
            }
        };
        if answer.truncation && matches!(source, Source::Udp(_)) {
            if let Transport::Tcp(_) = p.client.transport {
                self.start_tcp(id, upstream_idx, now, out);
                return;
            }
        }

        let Some(p) = self.remove(id) else { return };
        self.preferred = upstream_idx;
        let limit = self.size_limit(&p.client, &p.query);
        let vetted = vet_answer(
            bytes,
            answer,
            &p.query,
            judge,
            self.settings.rebind_protection,
            limit,
        );
        self.stats.answers += 1;
        self.count_vetted(&vetted);
        self.stats.rebind_removed += vetted.rebind_removed as u64;
        if let Some((name, reason)) = &vetted.blocked {
            self.stats.blocked += 1;
            if let Some(suppressed) = self.query_log.admit(Instant::now()) {
                info!(client = %p.client.src, query = %p.query.qname, %name, %reason, suppressed, "dns: answer reaches a blocked name, NXDOMAIN");
            }
        }
        if vetted.rebind_blocked {
            self.stats.rebind_blocked += 1;
            if let Some(suppressed) = self.query_log.admit(Instant::now()) {
                info!(client = %p.client.src, name = %p.query.qname, suppressed, "dns: rebind protection removed every address, NXDOMAIN");
            }
        } else if vetted.rebind_removed > 0 {
            debug!(name = %p.query.qname, removed = vetted.rebind_removed, "dns: rebind protection removed addresses");
        }
        if !vetted.cache.is_empty() {
            let mut cache = self.cache_mut();
            for b in &vetted.cache {
                let ttl = Duration::from_secs(u64::from(b.ttl));
                cache.insert_as(&b.name, b.role, b.ip, ttl, now);
            }
        }
        out.push((p.client, vetted.bytes));
    }

    /// Fetches query `id` again from upstream `idx` over TCP (its UDP answer was truncated).
    fn start_tcp(
        &mut self,
        id: u16,
        idx: usize,
        now: Instant,
        out: &mut Vec<(ClientKey, Vec<u8>)>,
    ) {
        let addr = self.upstreams[idx];
        // The UDP attempt is over; its socket goes.
        self.drop_udp(id);
        let Some(p) = self.pending.get(&id) else {
            return;
        };
        let Some(frame) = TcpDnsFramer::frame(&p.wire) else {
            self.advance(id, now, out);
            return;
        };
        let stream = match open_tcp(addr) {
            Ok(s) => s,
            Err(e) => {
                debug!(upstream = %addr, error = %e, "dns: TCP connect to upstream failed");
                self.advance(id, now, out);
                return;
            }
        };
        let token = TCP_TOKEN_BASE + self.next_tcp;
        self.next_tcp += 1;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::OUT | EventSet::IN, token),
        ) {
            debug!(error = %e, "dns: epoll add failed");
            self.advance(id, now, out);
            return;
        }
        self.stats.tcp_retries += 1;
        self.tcp.insert(
            token,
            TcpUpstream {
                stream,
                upstream: idx,
                id,
                out: frame,
                written: 0,
                framer: TcpDnsFramer::new(),
            },
        );
        if let Some(p) = self.pending.get_mut(&id) {
            p.tcp = Some(token);
        }
        self.set_deadline(id, now + self.settings.query_timeout);
    }

    fn tcp_event(
        &mut self,
        token: u64,
        judge: &dyn DomainJudge,
        now: Instant,
        out: &mut Vec<(ClientKey, Vec<u8>)>,
    ) {
        let Some(conn) = self.tcp.get_mut(&token) else {
            return;
        };
        let id = conn.id;
        // Write what is left of the query.
        while conn.written < conn.out.len() {
            match conn.stream.write(&conn.out[conn.written..]) {
                Ok(0) => break,
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(error = %e, "dns: TCP upstream write failed");
                    self.advance(id, now, out);
                    return;
                }
            }
        }
        if conn.written == conn.out.len() && !conn.out.is_empty() {
            conn.out = Vec::new();
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                conn.stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            );
        }
        // Read the answer.
        loop {
            let Some(conn) = self.tcp.get_mut(&token) else {
                return;
            };
            match conn.stream.read(&mut self.buf) {
                Ok(0) => {
                    debug!("dns: TCP upstream closed before answering");
                    self.advance(id, now, out);
                    return;
                }
                Ok(n) => match conn.framer.push(&self.buf[..n]) {
                    Ok(msgs) => {
                        if let Some(msg) = msgs.into_iter().next() {
                            self.upstream_answer(&msg, Source::Tcp(token), judge, now, out);
                            // Matched: the query is gone and the connection with it. Not
                            // matched: give up on this upstream.
                            if self.tcp.contains_key(&token) {
                                self.advance(id, now, out);
                            }
                            return;
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "dns: TCP upstream framing error");
                        self.advance(id, now, out);
                        return;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(error = %e, "dns: TCP upstream read failed");
                    self.advance(id, now, out);
                    return;
                }
            }
        }
    }
}

/// Where an upstream message came from: a query's UDP socket or a TCP connection (tokens).
#[derive(Clone, Copy)]
enum Source {
    Udp(u64),
    Tcp(u64),
}

fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// A non-blocking UDP socket bound to port 0 of the unspecified address of `addr`'s family
/// (the kernel picks a random ephemeral port) and connected to `addr`.
fn open_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.nonblocking(),
        Some(socket2::Protocol::UDP),
    )?;
    sock.bind(&bind.into())?;
    sock.connect(&addr.into())?;
    Ok(sock.into())
}

fn open_tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    let _ = sock.set_tcp_nodelay(true);
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}

/// Unpredictable query ids, from the kernel's random source.
struct IdSource {
    pool: [u8; 64],
    pos: usize,
}

impl IdSource {
    fn new() -> Self {
        let mut s = Self {
            pool: [0; 64],
            pos: 64,
        };
        s.refill();
        s
    }

    fn refill(&mut self) {
        let mut filled = 0;
        while filled < self.pool.len() {
            let rest = &mut self.pool[filled..];
            // SAFETY: the pointer and length describe `rest`, a live, writable buffer.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n > 0 {
                filled += n as usize;
            } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // No kernel randomness (never on Linux >= 3.17): fall back to the clock.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                for (i, b) in self.pool.iter_mut().enumerate() {
                    *b = (t.rotate_left(i as u32) as u8) ^ (i as u8).wrapping_mul(151);
                }
                break;
            }
        }
        self.pos = 0;
    }

    fn next(&mut self) -> u16 {
        if self.pos + 2 > self.pool.len() {
            self.refill();
        }
        let v = u16::from_be_bytes([self.pool[self.pos], self.pool[self.pos + 1]]);
        self.pos += 2;
        v
    }
}
