//! The gateway's DNS service as a kind of flow: UDP and TCP port 53, terminated at the gateway.
//!
//! `dns::DnsService` does the DNS work (blocking, rebind protection, forwarding, the IP -> names
//! cache). This module connects it to the guest: datagrams from the guest become queries and
//! answers become frames from the address the guest asked; DNS over TCP is terminated in a
//! smoltcp socket (no host socket) with one length-prefix framer per connection, at most
//! `dns-tcp` connections per link, each closed after `dns-tcp-idle-secs` without a query. The
//! policy is the service's judge of names.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use tracing::debug;

use crate::dns::{ClientKey, DnsService, DomainJudge, TcpDnsFramer, Transport};
use crate::flow::tcp::listening_socket;
use crate::flow::FlowKey;
use crate::policy::Policy;
use crate::stack::frames;
use crate::stack::GuestStack;

/// The policy as the DNS service's judge of names and addresses.
pub struct PolicyJudge<'a>(pub &'a Policy);

impl DomainJudge for PolicyJudge<'_> {
    fn domain_denied(&self, name: &str) -> Option<String> {
        self.0.domain_denied(name).map(|r| r.to_string())
    }
    fn explicitly_allows_ip(&self, ip: IpAddr) -> bool {
        self.0.explicitly_allows_ip(ip)
    }
}

/// Buffer per direction of a DNS-over-TCP connection: one largest message and its length.
const DNS_TCP_BUFFER_BYTES: usize = 64 * 1024 + 2;

struct DnsTcpConn {
    id: u64,
    handle: SocketHandle,
    framer: TcpDnsFramer,
    last_active: Instant,
}

pub struct GatewayDns {
    pub service: DnsService,
    pub intercept_all: bool,
    tcp: HashMap<FlowKey, DnsTcpConn>,
    next_id: u64,
    buf: Vec<u8>,
}

impl GatewayDns {
    pub fn new(service: DnsService, intercept_all: bool) -> Self {
        GatewayDns {
            service,
            intercept_all,
            tcp: HashMap::new(),
            next_id: 1,
            buf: vec![0u8; 16 * 1024],
        }
    }

    /// Whether traffic to `dst` is for the DNS service: port 53 of a gateway address
    /// (`to_gateway`), or of any address with intercept-all.
    pub fn serves(&self, dst: SocketAddr, to_gateway: bool) -> bool {
        dst.port() == 53 && (to_gateway || self.intercept_all)
    }

    pub fn has_tcp(&self, key: &FlowKey) -> bool {
        self.tcp.contains_key(key)
    }

    pub fn open_tcp_connections(&self) -> usize {
        self.tcp.len()
    }

    /// A UDP query from the guest; an immediate answer is queued at once.
    pub fn udp_query(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
        policy: &Policy,
        stack: &mut GuestStack,
    ) {
        let key = ClientKey {
            src,
            dst,
            transport: Transport::Udp,
        };
        let judge = PolicyJudge(policy);
        if let Some(answer) = self
            .service
            .handle_query(key, payload, &judge, Instant::now())
        {
            queue_udp_answer(stack, dst, src, &answer);
        }
    }

    /// The guest opens DNS over TCP: a smoltcp socket takes the handshake, no host socket.
    pub fn accept_tcp(&mut self, key: FlowKey, syn_frame: &[u8], stack: &mut GuestStack) {
        let handle = stack
            .sockets
            .add(listening_socket(key.1, DNS_TCP_BUFFER_BYTES));
        let id = self.next_id;
        self.next_id += 1;
        self.tcp.insert(
            key,
            DnsTcpConn {
                id,
                handle,
                framer: TcpDnsFramer::new(),
                last_active: Instant::now(),
            },
        );
        stack.receive(syn_frame);
        self.forget_if_listening(&key, stack);
    }

    /// A segment of an open DNS-over-TCP connection from the guest.
    pub fn tcp_segment(&mut self, key: FlowKey, frame: &[u8], stack: &mut GuestStack) {
        stack.receive(frame);
        self.forget_if_listening(&key, stack);
    }

    /// Removes connection `key` if its socket listens (again): its SYN was not taken (the
    /// queue to the guest was full), or the guest reset the handshake, which smoltcp answers
    /// by returning the socket to listening. A listening socket takes the next SYN to the
    /// same address and port from any guest port: it must never stay in the set.
    fn forget_if_listening(&mut self, key: &FlowKey, stack: &mut GuestStack) {
        let listening = self.tcp.get(key).is_some_and(|c| {
            stack.sockets.get::<tcp::Socket>(c.handle).state() == tcp::State::Listen
        });
        if listening {
            self.remove_tcp(key, stack);
        }
    }

    /// Closes (resets) the DNS-over-TCP connections idle for longer than `idle`; returns how
    /// many.
    pub fn expire_tcp(&mut self, now: Instant, idle: Duration, stack: &mut GuestStack) -> usize {
        let stale: Vec<FlowKey> = self
            .tcp
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_active) > idle)
            .map(|(k, _)| *k)
            .collect();
        for key in &stale {
            if let Some(conn) = self.tcp.get(key) {
                stack.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
            }
        }
        if !stale.is_empty() {
            // Let smoltcp send the resets; `pump_tcp` removes the closed sockets.
            stack.poll();
            self.pump_tcp_closed(stack);
        }
        stale.len()
    }

    /// Removes the connections whose socket is closed.
    fn pump_tcp_closed(&mut self, stack: &mut GuestStack) {
        let closed: Vec<FlowKey> = self
            .tcp
            .iter()
            .filter(|(_, c)| {
                matches!(
                    stack.sockets.get::<tcp::Socket>(c.handle).state(),
                    tcp::State::Closed | tcp::State::TimeWait | tcp::State::Listen
                )
            })
            .map(|(k, _)| *k)
            .collect();
        for key in closed {
            self.remove_tcp(&key, stack);
        }
    }

    fn remove_tcp(&mut self, key: &FlowKey, stack: &mut GuestStack) {
        if let Some(conn) = self.tcp.remove(key) {
            stack.sockets.remove(conn.handle);
            self.service.cancel_tcp_client(conn.id);
        }
    }

    /// Forgets every DNS-over-TCP connection (the guest restarted; its sockets are gone).
    pub fn reset(&mut self) {
        let ids: Vec<u64> = self.tcp.values().map(|c| c.id).collect();
        for id in ids {
            self.service.cancel_tcp_client(id);
        }
        self.tcp.clear();
    }

    /// Reads queries from the TCP connections, answers what can be answered now, and closes
    /// the connections the guest is done with.
    pub fn pump_tcp(&mut self, policy: &Policy, stack: &mut GuestStack) {
        let judge = PolicyJudge(policy);
        let mut finished = Vec::new();
        for (key, conn) in self.tcp.iter_mut() {
            let sock = stack.sockets.get_mut::<tcp::Socket>(conn.handle);
            while sock.can_recv() {
                let n = match sock.recv_slice(&mut self.buf) {
                    Ok(n) => n,
                    Err(_) => break,
                };
                conn.last_active = Instant::now();
                let messages = match conn.framer.push(&self.buf[..n]) {
                    Ok(m) => m,
                    Err(e) => {
                        debug!(src = %key.0, error = ?e, "bad DNS-over-TCP framing; closing");
                        sock.abort();
                        break;
                    }
                };
                for msg in messages {
                    let client = ClientKey {
                        src: key.0,
                        dst: key.1,
                        transport: Transport::Tcp(conn.id),
                    };
                    if let Some(answer) =
                        self.service
                            .handle_query(client, &msg, &judge, Instant::now())
                    {
                        send_framed(sock, &answer);
                    }
                }
            }
            // The guest closed its side: nothing more to answer once in-flight queries are done.
            if sock.state() == tcp::State::CloseWait && self.service.in_flight() == 0 {
                sock.close();
            }
            if matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait) {
                finished.push(*key);
            }
        }
        for key in finished {
            self.remove_tcp(&key, stack);
        }
    }

    /// Upstream answers and timeouts: delivers whatever is ready.
    pub fn poll(&mut self, policy: &Policy, stack: &mut GuestStack) {
        let judge = PolicyJudge(policy);
        for (client, answer) in self.service.poll(&judge, Instant::now()) {
            let (src, dst) = (client.src, client.dst);
            match client.transport {
                Transport::Udp => queue_udp_answer(stack, dst, src, &answer),
                Transport::Tcp(id) => {
                    if let Some(conn) = self.tcp.values().find(|c| c.id == id) {
                        let sock = stack.sockets.get_mut::<tcp::Socket>(conn.handle);
                        send_framed(sock, &answer);
                    }
                }
            }
        }
    }
}

fn queue_udp_answer(stack: &mut GuestStack, from: SocketAddr, to: SocketAddr, answer: &[u8]) {
    let frame = frames::udp_to_guest(&stack.macs, from, to, answer.len(), false, |b| {
        b.copy_from_slice(answer)
    });
    stack.port.queue_frame(frame);
}

fn send_framed(sock: &mut tcp::Socket<'static>, answer: &[u8]) {
    if let Some(framed) = TcpDnsFramer::frame(answer) {
        if sock.send_capacity() - sock.send_queue() >= framed.len() {
            let _ = sock.send_slice(&framed);
        }
    }
}
