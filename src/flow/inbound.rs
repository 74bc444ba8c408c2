//! Inbound flows: host clients reaching the guest's services through published ports.
//!
//! Theory of operation. The link's worker watches the published ports' listeners (see
//! [`crate::ingress`]) in the flows' epoll while its link holds their claim. A ready listener
//! is drained a bounded number of connections (or datagrams) per pump; what is left waits for
//! the next round (the flows' deadline asks for one at once), and a listener whose accept fails
//! for want of descriptors is left alone for a moment, so nothing spins on it.
//!
//! Each accepted connection is judged once by the ingress rules (the client's address and
//! group, the guest port, the protocol; `default_ingress` allows), then needs the guest to
//! have an address of the listener's family (IPv4: it took its DHCP lease or sent from its
//! address; IPv6: an address of its /64 seen in its traffic or its duplicate-address check) and
//! room (`inbound-tcp`, `tcp-flows`, `max_connections`). A refusal is an RST to the client at
//! once (SO_LINGER 0) and a decision line with its reason, as for egress. An allowed connection
//! becomes a TCP flow like any other: the guest end is a smoltcp socket that connects from the
//! gateway (`gateway:port`, a port of [`GATEWAY_PORTS`]) to the guest's port, the host end is
//! the accepted socket, and the flow engine carries it with the same backpressure, half-close
//! and reset rules. A guest that answers the SYN with an RST (nothing listens) resets the
//! client; one that does not answer within `handshake-timeout-secs` too.
//!
//! A published UDP port keeps one session per client address (`inbound-udp`, idle after
//! `udp-idle-secs`): the client's datagrams go to the guest's port from `gateway:port`, and the
//! guest's answers to that address go back to that client from the published port.

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::wire::{IpAddress, IpEndpoint, IpListenEndpoint};
use socket2::{Socket, TcpKeepalive};
use tracing::{debug, info, warn};

use super::table::{FlowRef, FlowTable, NewFlow};
use super::tcp::host_end::HostEnd;
use super::tcp::{guest_socket, ClearFilter, ClearStage, Middle, TcpFlow};
use super::Flows;
use crate::ingress::{self, Claim, Listening, PublishedPorts};
use crate::observe::audit::{AuditTag, CloseRecord};
use crate::observe::LogGate;
use crate::policy::{Direction, Protocol};
use crate::secrets::PlaceholderScanner;
use crate::stack::frames;
use crate::stack::GuestStack;

/// Connections (or datagrams) taken from one ready listener per pump.
const ACCEPTS_PER_PUMP: usize = 64;
/// After an accept failed for want of descriptors, the listener is left alone this long.
const ACCEPT_RETRY: Duration = Duration::from_millis(250);
/// The gateway-side ports of inbound flows: the guest sees its clients come from
/// `gateway:port` with a port from here.
pub const GATEWAY_PORTS: std::ops::RangeInclusive<u16> = 40000..=59999;
/// Keep-alive on accepted connections, as on outbound ones.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(120);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// A listener's state in this link.
#[derive(Default)]
struct ListenerState {
    /// Its epoll edge said something waits, and it has not reported `WouldBlock` since.
    pending: bool,
    /// Accepting failed for want of descriptors: not before this.
    retry_at: Option<Instant>,
}

/// One client of a published UDP port.
struct UdpSession {
    /// The guest's address and port, as the datagrams reach it.
    guest: SocketAddr,
    /// The gateway's address and port they come from.
    gateway: SocketAddr,
    last_active: Instant,
    started: Instant,
    /// Payload bytes carried to the guest (the client's) and to the host (the guest's answers).
    bytes_to_guest: u64,
    bytes_to_host: u64,
}

/// The published ports as one link serves them.
pub struct Inbound {
    claim: Claim,
    listeners: Vec<ListenerState>,
    /// UDP sessions by (published port index, client address).
    udp: HashMap<(usize, SocketAddr), UdpSession>,
    /// The same, by the gateway port the guest answers to.
    udp_by_gateway_port: HashMap<u16, (usize, SocketAddr)>,
    next_port: u16,
    /// The guest took its IPv4 lease (or sent from its IPv4 address).
    guest_v4: bool,
    /// An IPv6 address of the guest's /64 it uses.
    guest_v6: Option<Ipv6Addr>,
    /// Lines about accept failures.
    warnings: LogGate,
    /// `--audit`: where UDP sessions that end are written (TCP flows go through the table).
    pub audit: Option<AuditTag>,
}

impl Inbound {
    /// Claims `ports` for this link and watches their listeners in `table`'s epoll.
    pub fn new(ports: &Arc<PublishedPorts>, table: &mut FlowTable) -> io::Result<Self> {
        let claim = ports.claim();
        for (index, port) in ports.ports().iter().enumerate() {
            table.register_listener(port.fd(), index)?;
        }
        Ok(Inbound {
            listeners: ports
                .ports()
                .iter()
                .map(|_| ListenerState {
                    // Whatever waited before this link came is taken at its first pump.
                    pending: true,
                    retry_at: None,
                })
                .collect(),
            claim,
            udp: HashMap::new(),
            udp_by_gateway_port: HashMap::new(),
            next_port: *GATEWAY_PORTS.start(),
            guest_v4: false,
            guest_v6: None,
            warnings: LogGate::new(5, Duration::from_secs(10)),
            audit: None,
        })
    }

    /// UDP sessions open now.
    pub fn udp_sessions(&self) -> usize {
        self.udp.len()
    }

    /// Forgets the guest's addresses and the UDP sessions (the guest restarted).
    pub fn reset(&mut self) {
        self.end_all_sessions("guest restarted");
        self.guest_v4 = false;
        self.guest_v6 = None;
    }

    /// Ends the UDP session of `client` on published port `index` (its `close` line with
    /// `--audit`).
    fn end_session(&mut self, key: (usize, SocketAddr), why: &str, now: Instant) {
        if let Some(s) = self.udp.remove(&key) {
            self.udp_by_gateway_port.remove(&s.gateway.port());
            self.audit_session(key.1, &s, why, now);
        }
    }

    /// Ends every UDP session (their `close` lines with `--audit`).
    fn end_all_sessions(&mut self, why: &str) {
        let now = Instant::now();
        for ((_, client), s) in std::mem::take(&mut self.udp) {
            self.audit_session(client, &s, why, now);
        }
        self.udp_by_gateway_port.clear();
    }

    fn audit_session(&self, client: SocketAddr, s: &UdpSession, why: &str, now: Instant) {
        if let Some(audit) = &self.audit {
            audit.flow_closed(&CloseRecord {
                direction: Direction::Ingress,
                protocol: Protocol::Udp,
                src: client,
                dst: s.guest,
                bytes_to_host: s.bytes_to_host,
                bytes_to_guest: s.bytes_to_guest,
                duration: now.duration_since(s.started),
                why,
            });
        }
    }
}

impl Drop for Inbound {
    /// The link closed: the sessions still open end with it.
    fn drop(&mut self) {
        self.end_all_sessions("link closed");
    }
}

/// The accepted connection as a host end: non-blocking, no Nagle, keep-alive.
fn host_end(stream: TcpStream, peer: SocketAddr) -> io::Result<HostEnd> {
    let socket = Socket::from(stream);
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL),
    )?;
    Ok(HostEnd::new(socket, peer))
}

/// Whether an accept error means "out of descriptors or memory" (retry later), not a single
/// connection that went away before it was taken.
fn accept_exhausted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

impl Flows {
    /// A source address the guest used (or announced) passed the link's checks: an inbound
    /// flow of that family can now reach it.
    pub fn guest_address_seen(&mut self, ip: IpAddr) {
        let addressing = self.settings.addressing;
        let Some(inbound) = self.inbound.as_mut() else {
            return;
        };
        match ip {
            IpAddr::V4(v4) => {
                if v4 == addressing.v4.guest {
                    inbound.guest_v4 = true;
                }
            }
            IpAddr::V6(v6) => {
                let ours = addressing.v6.prefix.contains(&v6) && !addressing.v6.is_gateway(v6);
                if ours && inbound.guest_v6.is_none() {
                    debug!(guest = %v6, "guest IPv6 address for published ports");
                    inbound.guest_v6 = Some(v6);
                }
            }
        }
    }

    /// A published port's listener reported readiness.
    pub(super) fn listener_ready(&mut self, index: usize) {
        if let Some(l) = self
            .inbound
            .as_mut()
            .and_then(|i| i.listeners.get_mut(index))
        {
            l.pending = true;
        }
    }

    /// UDP sessions of published ports open now.
    pub fn inbound_udp_sessions(&self) -> usize {
        self.inbound.as_ref().map_or(0, Inbound::udp_sessions)
    }

    /// When the published ports need a pump without an event: at once while a TCP listener
    /// still has connections waiting, at its retry time after descriptors ran out.
    pub(super) fn inbound_deadline(&self, now: Instant) -> Option<Instant> {
        let inbound = self.inbound.as_ref()?;
        inbound
            .listeners
            .iter()
            .zip(inbound.claim.ports().ports())
            .filter(|(l, p)| l.pending && matches!(p.socket, Listening::Tcp(_)))
            .map(|(l, _)| l.retry_at.unwrap_or(now))
            .min()
    }

    /// The guest address a published port bound to `bind` reaches, or why there is none yet.
    fn guest_ip_for(&self, bind: IpAddr) -> Result<IpAddr, String> {
        let Some(inbound) = self.inbound.as_ref() else {
            return Err("no published ports".into());
        };
        if bind.is_ipv4() {
            if inbound.guest_v4 {
                Ok(IpAddr::V4(self.settings.addressing.v4.guest))
            } else {
                Err("the guest has no IPv4 address yet (no DHCP lease, no traffic from it)".into())
            }
        } else {
            inbound.guest_v6.map(IpAddr::V6).ok_or_else(|| {
                "the guest has no IPv6 address yet (none seen in its traffic)".into()
            })
        }
    }

    /// A gateway port no flow between `guest` and `gateway_ip` uses, TCP or UDP.
    fn free_gateway_port(&mut self, guest: SocketAddr, gateway_ip: IpAddr) -> Option<u16> {
        let span = usize::from(GATEWAY_PORTS.end() - GATEWAY_PORTS.start()) + 1;
        let inbound = self.inbound.as_mut()?;
        for _ in 0..span.min(4096) {
            let port = inbound.next_port;
            inbound.next_port = if port >= *GATEWAY_PORTS.end() {
                *GATEWAY_PORTS.start()
            } else {
                port + 1
            };
            let key = (guest, SocketAddr::new(gateway_ip, port));
            let taken = self.table.tcp.contains_key(&key)
                || self.table.udp.contains_key(&key)
                || self.lingering.iter().any(|(k, ..)| *k == key)
                || inbound.udp_by_gateway_port.contains_key(&port);
            if !taken {
                return Some(port);
            }
        }
        None
    }

    /// Takes what waits on the published ports, as far as this pump's budget goes.
    pub(super) fn pump_inbound(&mut self, stack: &mut GuestStack, now: Instant) {
        let Some(ports) = self.inbound.as_ref().map(|i| i.claim.ports().clone()) else {
            return;
        };
        for (index, port) in ports.ports().iter().enumerate() {
            let Some(state) = self
                .inbound
                .as_mut()
                .and_then(|i| i.listeners.get_mut(index))
            else {
                continue;
            };
            if !state.pending || state.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            state.retry_at = None;
            match &port.socket {
                Listening::Tcp(listener) => {
                    for _ in 0..ACCEPTS_PER_PUMP {
                        match listener.accept() {
                            Ok((stream, peer)) => self.accept_tcp(index, stream, peer, stack, now),
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                self.set_pending(index, false, None);
                                break;
                            }
                            Err(e) if accept_exhausted(&e) => {
                                self.accept_failed(index, port.local, &e, now);
                                break;
                            }
                            // The client left before it was taken, or a signal: go on.
                            Err(_) => {}
                        }
                    }
                }
                Listening::Udp(socket) => {
                    let mut buf = std::mem::take(&mut self.buf);
                    for _ in 0..ACCEPTS_PER_PUMP {
                        if stack.port.room() == 0 {
                            // The guest is slow: the datagrams wait in the socket.
                            break;
                        }
                        match socket.recv_from(&mut buf) {
                            Ok((n, peer)) => {
                                self.udp_from_client(index, peer, &buf[..n], stack, now)
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                self.set_pending(index, false, None);
                                break;
                            }
                            Err(e) if accept_exhausted(&e) => {
                                self.accept_failed(index, port.local, &e, now);
                                break;
                            }
                            Err(_) => {}
                        }
                    }
                    self.buf = buf;
                }
            }
        }
    }

    fn set_pending(&mut self, index: usize, pending: bool, retry_at: Option<Instant>) {
        if let Some(l) = self
            .inbound
            .as_mut()
            .and_then(|i| i.listeners.get_mut(index))
        {
            l.pending = pending;
            l.retry_at = retry_at;
        }
    }

    fn accept_failed(&mut self, index: usize, local: SocketAddr, e: &io::Error, now: Instant) {
        self.counters.inc("inbound-accept-failed");
        self.set_pending(index, true, Some(now + ACCEPT_RETRY));
        if let Some(suppressed) = self.inbound.as_mut().and_then(|i| i.warnings.admit(now)) {
            warn!(listen = %local, error = %e, suppressed,
                "published port: cannot take a connection (descriptor limit?); retrying shortly");
        }
    }

    /// A connection from `peer` on published port `index`: judged, then carried or reset.
    fn accept_tcp(
        &mut self,
        index: usize,
        stream: TcpStream,
        peer: SocketAddr,
        stack: &mut GuestStack,
        now: Instant,
    ) {
        let Some(spec) = self
            .inbound
            .as_ref()
            .and_then(|i| i.claim.ports().ports().get(index))
            .map(|p| p.spec)
        else {
            ingress::reset(stream);
            return;
        };
        let guest_ip = self.guest_ip_for(spec.bind);
        let unknown = match spec.bind {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let shown = SocketAddr::new(guest_ip.clone().unwrap_or(unknown), spec.guest_port);
        let table = &self.table;
        let limits = &self.settings.limits;
        let max = self.settings.policy.max_connections();
        let ready = guest_ip.clone().map(|_| ());
        let allowed = self.decider.decide_ingress(
            Protocol::Tcp,
            peer,
            shown,
            || ready,
            || table.room_for(NewFlow::InboundTcp, limits, max),
            now,
        );
        let Ok(guest_ip) =
            guest_ip.and_then(|ip| if allowed { Ok(ip) } else { Err(String::new()) })
        else {
            self.counters.inc("inbound-tcp-refused");
            ingress::reset(stream);
            return;
        };
        let guest = SocketAddr::new(guest_ip, spec.guest_port);
        let gateway_ip = self.settings.addressing.gateway_for(guest_ip);
        let Some(gateway_port) = self.free_gateway_port(guest, gateway_ip) else {
            self.counters.inc("inbound-no-gateway-port");
            ingress::reset(stream);
            return;
        };
        let dst = SocketAddr::new(gateway_ip, gateway_port);
        let key = (guest, dst);
        let host = match host_end(stream, peer) {
            Ok(h) => h,
            Err(e) => {
                self.counters.inc("inbound-tcp-setup-failed");
                debug!(peer = %peer, error = %e, "cannot set up an accepted connection");
                return;
            }
        };
        let token = match self
            .table
            .register(host.socket.as_raw_fd(), FlowRef::Tcp(key))
        {
            Ok(t) => t,
            Err(e) => {
                host.reset_on_close();
                self.counters.inc("inbound-tcp-setup-failed");
                if let Some(suppressed) = self.socket_warnings.admit(now) {
                    warn!(error = %e, suppressed, "cannot watch an accepted connection");
                }
                return;
            }
        };
        let (mut socket, rings) = guest_socket(self.settings.limits.tcp_buffer_bytes);
        let remote = IpEndpoint::new(IpAddress::from(guest_ip), spec.guest_port);
        let local = IpListenEndpoint {
            addr: Some(IpAddress::from(gateway_ip)),
            port: gateway_port,
        };
        if let Err(e) = socket.connect(stack.iface.context(), remote, local) {
            host.reset_on_close();
            self.table.unregister(token);
            self.counters.inc("inbound-tcp-setup-failed");
            debug!(peer = %peer, guest = %guest, error = ?e, "cannot connect to the guest");
            return;
        }
        let handle = stack.sockets.add(socket);
        let middle = self.scan_filter(peer);
        debug!(peer = %peer, guest = %guest, from = %dst, "published port: connecting to the guest");
        let mut flow = TcpFlow::inbound(token, guest, dst, host, handle, rings, middle, now);
        flow.rule.clone_from(&self.decider.log.last_reason);
        self.table.tcp.insert(key, flow);
        self.awake.insert(key);
    }

    /// With secrets, what the guest sends to a host client is scanned for placeholders like
    /// any other cleartext stream.
    fn scan_filter(&self, peer: SocketAddr) -> Option<Middle> {
        let secrets = self.settings.secrets.clone()?;
        let ctx = self.secret_context(peer, None, &[]);
        Some(Middle::Clear(Box::new(ClearFilter::new(ClearStage::Scan(
            PlaceholderScanner::new(secrets, &ctx),
        )))))
    }

    /// A datagram from client `peer` on published UDP port `index`.
    fn udp_from_client(
        &mut self,
        index: usize,
        peer: SocketAddr,
        data: &[u8],
        stack: &mut GuestStack,
        now: Instant,
    ) {
        let key = (index, peer);
        let known = self
            .inbound
            .as_ref()
            .is_some_and(|i| i.udp.contains_key(&key));
        if !known && !self.open_udp_session(index, peer, now) {
            self.counters.inc("inbound-udp-refused");
            return;
        }
        let Some(session) = self.inbound.as_mut().and_then(|i| i.udp.get_mut(&key)) else {
            return;
        };
        let max_payload = usize::from(self.settings.mtu)
            .saturating_sub(frames::ip_header_len(session.guest.ip()) + 8);
        if data.len() > max_payload {
            self.counters.inc("inbound-udp-too-large");
            return;
        }
        session.last_active = now;
        session.bytes_to_guest += data.len() as u64;
        let frame = frames::udp_to_guest(
            &stack.macs,
            session.gateway,
            session.guest,
            data.len(),
            false,
            |b| b.copy_from_slice(data),
        );
        stack.port.queue_frame(frame);
    }

    /// Judges a new client of a published UDP port and opens its session.
    fn open_udp_session(&mut self, index: usize, peer: SocketAddr, now: Instant) -> bool {
        let Some(spec) = self
            .inbound
            .as_ref()
            .and_then(|i| i.claim.ports().ports().get(index))
            .map(|p| p.spec)
        else {
            return false;
        };
        let guest_ip = self.guest_ip_for(spec.bind);
        let unknown = match spec.bind {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let shown = SocketAddr::new(guest_ip.clone().unwrap_or(unknown), spec.guest_port);
        let sessions = self.inbound_udp_sessions();
        let (cap, flows) = (self.settings.limits.inbound_udp, self.table.len());
        let max = self.settings.policy.max_connections();
        let ready = guest_ip.clone().map(|_| ());
        let capacity = || {
            if sessions >= cap {
                Err(format!("limit inbound-udp ({cap}) reached"))
            } else if max.is_some_and(|m| flows + sessions >= m) {
                Err(format!("max_connections ({}) reached", max.unwrap_or(0)))
            } else {
                Ok(())
            }
        };
        let allowed =
            self.decider
                .decide_ingress(Protocol::Udp, peer, shown, || ready, capacity, now);
        let Ok(guest_ip) = guest_ip else {
            return false;
        };
        if !allowed {
            return false;
        }
        let guest = SocketAddr::new(guest_ip, spec.guest_port);
        let gateway_ip = self.settings.addressing.gateway_for(guest_ip);
        let Some(port) = self.free_gateway_port(guest, gateway_ip) else {
            self.counters.inc("inbound-no-gateway-port");
            return false;
        };
        let Some(inbound) = self.inbound.as_mut() else {
            return false;
        };
        inbound.udp.insert(
            (index, peer),
            UdpSession {
                guest,
                gateway: SocketAddr::new(gateway_ip, port),
                last_active: now,
                started: now,
                bytes_to_guest: 0,
                bytes_to_host: 0,
            },
        );
        inbound.udp_by_gateway_port.insert(port, (index, peer));
        true
    }

    /// A datagram from the guest to the gateway: if it answers a published UDP port's client,
    /// it goes back to that client (true); otherwise it is not ours (false).
    pub(super) fn inbound_udp_reply(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
        now: Instant,
    ) -> bool {
        let Some(inbound) = self.inbound.as_mut() else {
            return false;
        };
        let Some(&(index, peer)) = inbound.udp_by_gateway_port.get(&dst.port()) else {
            return false;
        };
        let Some(session) = inbound.udp.get_mut(&(index, peer)) else {
            return false;
        };
        if session.guest != src || session.gateway != dst {
            return false;
        }
        session.last_active = now;
        let sent = match inbound.claim.ports().ports().get(index).map(|p| &p.socket) {
            Some(Listening::Udp(socket)) => socket.send_to(payload, peer).is_ok(),
            _ => false,
        };
        if sent {
            session.bytes_to_host += payload.len() as u64;
        } else {
            // The client's socket buffer is full or it went away: UDP may drop.
            self.counters.inc("inbound-udp-send-failed");
        }
        true
    }

    /// Closes the UDP sessions of published ports idle past `udp-idle-secs`.
    pub(super) fn expire_inbound(&mut self, now: Instant) {
        let idle = self.settings.limits.udp_idle;
        let Some(inbound) = self.inbound.as_mut() else {
            return;
        };
        let expired: Vec<(usize, SocketAddr)> = inbound
            .udp
            .iter()
            .filter(|(_, s)| now.duration_since(s.last_active) > idle)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            debug!(peer = %key.1, "published UDP session idle, closed");
            inbound.end_session(key, "idle", now);
        }
    }

    /// Logs a refused inbound connection the guest answered with a reset.
    pub(super) fn guest_refused(&mut self, key: &super::FlowKey, now: Instant) {
        self.counters.inc("inbound-guest-refused");
        if let Some(suppressed) = self.flow_events.admit(now) {
            info!(guest = %key.0, suppressed,
                "published port: the guest refused the connection (nothing listens on its port?); client reset");
        }
    }
}
