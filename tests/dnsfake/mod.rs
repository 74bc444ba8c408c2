//! DNS test kit shared by `harness_dns.rs` and `guest_dns.rs`:
//!
//! - [`FakeDns`]: a fake upstream nameserver on 127.0.0.1 (UDP and TCP on one port) that answers
//!   from a fixed zone (A records, or any records given) and records every question it was
//!   asked and where from; like a real server it truncates UDP answers that exceed the client's
//!   size (512 bytes, or its EDNS size) and sets TC.
//! - [`SilentDns`]: a bound UDP socket that reads queries and never answers (an upstream that
//!   times out), counting what it received.
//! - guest-side lookups over the harness guest's smoltcp stack, UDP ([`udp_lookup`]) and DNS
//!   over TCP ([`tcp_lookup`]), built and parsed with hickory-proto.
//! - [`client_hello`]: the first flight of a rustls client for a server name, written into a
//!   buffer (no network), for the TLS SNI tests.
//! - [`write_config`]: a `--config` TOML file in a scratch directory.
//!
//! Everything binds 127.0.0.1 only (the one network rule). Threads block on sockets with short
//! read timeouts so that they notice when the test is done; the tests themselves wait on
//! condition variables and deadlines, never on sleeps.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::common::Guest;

/// TTL of every record the fake server hands out.
pub const FAKE_TTL: u32 = 300;
/// How often server threads look at their stop flag.
const TICK: Duration = Duration::from_millis(100);

/// What the fake upstream answers for one name.
#[derive(Clone, Debug)]
pub enum Answer {
    /// NOERROR with these A records (an AAAA or other question gets NOERROR without records).
    A(Vec<Ipv4Addr>),
    /// NXDOMAIN.
    NxDomain,
    /// SERVFAIL.
    ServFail,
    /// NOERROR with exactly these records in the answer section, whatever the question type
    /// (a CNAME chain, AAAA or HTTPS records, records for other names: what a hostile zone
    /// can send).
    Records(Vec<Record>),
}

/// One question the fake upstream received.
#[derive(Clone, Debug)]
pub struct Asked {
    /// Lower case, no trailing dot.
    pub name: String,
    pub qtype: RecordType,
    pub tcp: bool,
    pub from: SocketAddr,
}

#[derive(Default)]
struct AskedLog {
    list: Mutex<Vec<Asked>>,
    changed: Condvar,
}

impl AskedLog {
    fn push(&self, a: Asked) {
        self.list.lock().unwrap().push(a);
        self.changed.notify_all();
    }
}

/// Lower case without the trailing dot.
pub fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A fake upstream nameserver on 127.0.0.1:PORT (UDP and TCP).
pub struct FakeDns {
    pub addr: SocketAddr,
    asked: Arc<AskedLog>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl FakeDns {
    /// Starts a server answering from `zone` (names in any case, with or without a trailing
    /// dot); names not in the zone get NXDOMAIN.
    pub fn start(zone: &[(&str, Answer)]) -> FakeDns {
        let zone: Arc<HashMap<String, Answer>> =
            Arc::new(zone.iter().map(|(n, a)| (norm(n), a.clone())).collect());
        let (udp, tcp) = bind_udp_and_tcp();
        let addr = udp.local_addr().expect("fake DNS address");
        let asked = Arc::new(AskedLog::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (zone, asked, stop) = (zone.clone(), asked.clone(), stop.clone());
            udp.set_read_timeout(Some(TICK)).ok();
            threads.push(thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::SeqCst) {
                    let Ok((n, from)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some(reply) = answer(&zone, &asked, &buf[..n], from, false) {
                        let _ = udp.send_to(&reply, from);
                    }
                }
            }));
        }
        {
            let (zone, asked, stop) = (zone, asked.clone(), stop.clone());
            tcp.set_nonblocking(true).ok();
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match tcp.accept() {
                        Ok((conn, from)) => {
                            let (zone, asked) = (zone.clone(), asked.clone());
                            thread::spawn(move || serve_tcp(conn, from, &zone, &asked));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            wait_readable(tcp_fd(&tcp), TICK);
                        }
                        Err(_) => continue,
                    }
                }
            }));
        }
        FakeDns {
            addr,
            asked,
            stop,
            threads,
        }
    }

    /// `127.0.0.1:PORT` as written in `dns.nameservers`.
    pub fn nameserver(&self) -> String {
        self.addr.to_string()
    }

    /// Every question received so far.
    pub fn asked(&self) -> Vec<Asked> {
        self.asked.list.lock().unwrap().clone()
    }

    /// How many times `name` was asked (any type, any transport).
    pub fn times_asked(&self, name: &str) -> usize {
        let n = norm(name);
        self.asked().iter().filter(|a| a.name == n).count()
    }

    /// Waits until a question satisfying `pred` has arrived.
    pub fn wait_asked(&self, timeout: Duration, mut pred: impl FnMut(&Asked) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut list = self.asked.list.lock().unwrap();
        loop {
            if list.iter().any(&mut pred) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            list = self
                .asked
                .changed
                .wait_timeout(list, deadline - now)
                .unwrap()
                .0;
        }
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_fd(l: &TcpListener) -> i32 {
    use std::os::fd::AsRawFd;
    l.as_raw_fd()
}

/// poll(2) for readability, bounded by `timeout`.
fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    r > 0
}

/// A UDP socket and a TCP listener on the same 127.0.0.1 port.
fn bind_udp_and_tcp() -> (UdpSocket, TcpListener) {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind fake DNS (UDP)");
        let port = udp.local_addr().expect("UDP address").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            return (udp, tcp);
        }
    }
    panic!("no 127.0.0.1 port free for both UDP and TCP");
}

fn serve_tcp(
    mut conn: TcpStream,
    from: SocketAddr,
    zone: &HashMap<String, Answer>,
    asked: &AskedLog,
) {
    conn.set_nonblocking(false).ok();
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if conn.read_exact(&mut msg).is_err() {
            return;
        }
        let Some(reply) = answer(zone, asked, &msg, from, true) else {
            return;
        };
        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if conn.write_all(&framed).is_err() {
            return;
        }
    }
}

/// The fake server's answer to one message (None: not a query, ignored).
fn answer(
    zone: &HashMap<String, Answer>,
    asked: &AskedLog,
    bytes: &[u8],
    from: SocketAddr,
    tcp: bool,
) -> Option<Vec<u8>> {
    let q = Message::from_vec(bytes).ok()?;
    if q.message_type != MessageType::Query || q.queries.len() != 1 {
        return None;
    }
    let question = q.queries[0].clone();
    let name = norm(&question.name.to_ascii());
    asked.push(Asked {
        name: name.clone(),
        qtype: question.query_type,
        tcp,
        from,
    });
    let mut m = Message::response(q.id, OpCode::Query);
    m.metadata.recursion_desired = q.recursion_desired;
    m.metadata.recursion_available = true;
    m.queries = q.queries.clone();
    if let Some(e) = &q.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(e.max_payload().max(512));
        m.set_edns(edns);
    }
    match zone.get(&name) {
        Some(Answer::A(ips)) => {
            if question.query_type == RecordType::A {
                for ip in ips {
                    m.add_answer(Record::from_rdata(
                        question.name.clone(),
                        FAKE_TTL,
                        RData::A(A(*ip)),
                    ));
                }
            }
        }
        Some(Answer::Records(records)) => m.answers.extend(records.iter().cloned()),
        Some(Answer::NxDomain) | None => m.metadata.response_code = ResponseCode::NXDomain,
        Some(Answer::ServFail) => m.metadata.response_code = ResponseCode::ServFail,
    }
    let full = m.to_vec().ok()?;
    let limit = usize::from(q.max_payload()).max(512);
    if !tcp && full.len() > limit {
        // As a real server does: no records, TC set; the client asks again over TCP.
        m.answers.clear();
        m.metadata.truncation = true;
        return m.to_vec().ok();
    }
    Some(full)
}

/// A UDP "nameserver" on 127.0.0.1 that reads queries and never answers.
pub struct SilentDns {
    pub addr: SocketAddr,
    received: Arc<(Mutex<usize>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SilentDns {
    pub fn start() -> SilentDns {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind silent DNS");
        let addr = sock.local_addr().expect("silent DNS address");
        sock.set_read_timeout(Some(TICK)).ok();
        let received = Arc::new((Mutex::new(0usize), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (received.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                if sock.recv_from(&mut buf).is_ok() {
                    *r.0.lock().unwrap() += 1;
                    r.1.notify_all();
                }
            }
        });
        SilentDns {
            addr,
            received,
            stop,
            thread: Some(thread),
        }
    }

    pub fn nameserver(&self) -> String {
        self.addr.to_string()
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        *self.received.0.lock().unwrap()
    }
}

impl Drop for SilentDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- the guest's side ----------------------------------------------------------------------

/// A standard recursive query for `name`/`rtype` with id `id`, optionally with EDNS.
pub fn query(id: u16, name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).expect("valid query name"),
        rtype,
    ));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().expect("encode query")
}

/// The IPv4 addresses of the A records in the answer section.
pub fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// Every address (A and AAAA) in the answer section.
pub fn answer_ips(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// A UDP answer as the guest received it.
pub struct UdpAnswer {
    pub message: Message,
    pub bytes: Vec<u8>,
    /// The answer's source address and port.
    pub from: (Ipv4Addr, u16),
}

static NEXT_ID: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0x2a00);

/// A fresh query id.
pub fn next_id() -> u16 {
    NEXT_ID.fetch_add(1, Ordering::SeqCst)
}

/// Sends one UDP query from a fresh guest port to `server:53` and waits for the answer with
/// the same id (anything else on that port is a test failure).
pub fn udp_lookup(
    g: &mut Guest,
    server: Ipv4Addr,
    name: &str,
    rtype: RecordType,
    timeout: Duration,
) -> Result<UdpAnswer, String> {
    udp_lookup_raw(g, server, &query(next_id(), name, rtype, None), timeout)
}

/// As [`udp_lookup`] with the query bytes given.
pub fn udp_lookup_raw(
    g: &mut Guest,
    server: Ipv4Addr,
    q: &[u8],
    timeout: Duration,
) -> Result<UdpAnswer, String> {
    let id = u16::from_be_bytes([q[0], q[1]]);
    let port = g.next_port();
    let h = g.udp_bind(port);
    g.udp_send(h, server, 53, q);
    let got = g.udp_recv(h, Instant::now() + timeout);
    g.sockets.remove(h);
    let (bytes, ep) =
        got.ok_or_else(|| format!("no DNS answer from {server}:53 within {timeout:?}"))?;
    let from = match ep.addr {
        smoltcp::wire::IpAddress::Ipv4(a) => (a, ep.port),
        #[allow(unreachable_patterns)]
        other => return Err(format!("answer from a non-IPv4 address {other}")),
    };
    let message = Message::from_vec(&bytes).map_err(|e| format!("undecodable DNS answer: {e}"))?;
    if message.id != id {
        return Err(format!("answer id {} for query id {id}", message.id));
    }
    Ok(UdpAnswer {
        message,
        bytes,
        from,
    })
}

/// Sends one query over an established guest TCP connection to port 53 and reads the framed
/// answer (length prefix, then the message).
pub fn tcp_lookup(
    g: &mut Guest,
    h: smoltcp::iface::SocketHandle,
    name: &str,
    rtype: RecordType,
    timeout: Duration,
) -> Result<Message, String> {
    let id = next_id();
    let q = query(id, name, rtype, None);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let deadline = Instant::now() + timeout;
    g.tcp_send_all(h, &framed, deadline)?;
    let len = g.tcp_recv_exact(h, 2, deadline)?;
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let body = g.tcp_recv_exact(h, len, deadline)?;
    let m =
        Message::from_vec(&body).map_err(|e| format!("undecodable DNS answer over TCP: {e}"))?;
    if m.id != id {
        return Err(format!("TCP answer id {} for query id {id}", m.id));
    }
    Ok(m)
}

// ---- TLS -----------------------------------------------------------------------------------

/// The first flight (one ClientHello record) of a rustls client connecting to `server_name`,
/// SNI included. Written into a buffer; nothing is sent anywhere.
pub fn client_hello(server_name: &str) -> Vec<u8> {
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("rustls protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_string()).expect("valid server name");
    let mut conn = ClientConnection::new(Arc::new(config), name).expect("rustls client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)
            .expect("write ClientHello into a buffer");
    }
    assert!(
        out.len() > 5 && out[0] == 0x16 && out[5] == 0x01,
        "rustls did not produce a ClientHello record"
    );
    out
}

// ---- config --------------------------------------------------------------------------------

/// Writes `toml` to `dir/netfence.toml` and returns the path (for `--config`).
pub fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let p = dir.join("netfence.toml");
    std::fs::write(&p, toml).expect("write netfence config");
    p
}
