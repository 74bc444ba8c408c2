//! The datapath of one guest link: everything one queue-pair thread owns.
//!
//! Events come from [`crate::device::NetBackend::handle_event`]: a TX kick (guest frames to
//! drain), an RX kick (the guest gave us receive buffers), host sockets ready (the flows' epoll)
//! or the timer. Each event is handled, then [`Datapath::service`] moves bytes until nothing more
//! can move: flows pump between host sockets and smoltcp, smoltcp emits frames, frames are copied
//! into the RX queue. Nothing blocks; a side that cannot take more simply stops being read.
//!
//! New flows are decided here, once, at their first frame (TCP SYN, first UDP datagram of a
//! pair), and each decision is logged with its reason.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::socket::tcp;
use smoltcp::wire::EthernetAddress;
use tracing::{debug, info, warn};
use vhost_user_backend::VringRwLock;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

use crate::classify::{classify, Classified, DropReason, TcpHead};
use crate::config::DenyAction;
use crate::device::virtqueue::{self, RxError};
use crate::device::{GuestMemory, DNS_EVENT, RX_QUEUE, TIMER_EVENT, TX_QUEUE};
use crate::dns::{DnsService, DnsSettings};
use crate::flow::addrmap::AddressMap;
use crate::flow::icmp as icmpflow;
use crate::flow::tcp::{self as tcpflow, PumpResult, TcpPhase};
use crate::flow::udp::{self as udpflow};
use crate::flow::{FlowKey, FlowRef, FlowTable, TcpFlow, UdpFlow};
use crate::gateway_dns::GatewayDns;
use crate::policy::{canonical, Direction, FlowQuery, Policy, Protocol};
use crate::stack::dhcp::{DhcpServer, LinkAddrs};
use crate::stack::frames::{self, Link, Unreachable};
use crate::stack::ipv6::{self, LinkAddrs6};
use crate::stack::GuestStack;
use crate::timer::Timer;
use crate::tls::sni::{scan_client_hello, ClientHelloScan};

/// How long a denied flow is remembered so that retransmissions are not logged again.
const DENIED_MEMORY: Duration = Duration::from_secs(30);
/// A host connect that has not completed by then fails the guest's connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the smoltcp socket of a gracefully closed flow outlives it: longer than smoltcp's
/// ACK delay (10 ms), so the ACK of the guest's last segment and FIN still goes out.
const SOCKET_LINGER: Duration = Duration::from_millis(50);
/// Housekeeping (idle UDP sessions, connect timeouts) runs at least this often.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// Everything a link needs to know, shared by all connections of one netfence process.
#[derive(Clone)]
pub struct LinkSettings {
    pub addrs: LinkAddrs,
    pub addrs6: LinkAddrs6,
    pub gateway_mac: [u8; 6],
    pub guest_mac: [u8; 6],
    pub mtu: u16,
    pub lease_secs: u32,
    pub policy: Arc<Policy>,
    pub addrmap: Arc<AddressMap>,
    pub dns: DnsSettings,
    pub dns_intercept_all: bool,
    /// TCP ports whose first flight (TLS ClientHello) is read for the SNI before connecting.
    pub tls_ports: Vec<u16>,
}

/// A guest TLS connection whose ClientHello is awaited before the flow is decided by name.
struct HelloWait {
    handle: smoltcp::iface::SocketHandle,
    since: Instant,
}

/// Guest IPv6 addresses remembered as introduced to smoltcp (its neighbour cache holds 8).
const INTRODUCED_ADDRESSES: usize = 8;
/// How often an address is introduced again (smoltcp forgets a neighbour after 60 s).
const INTRODUCTION_REFRESH: Duration = Duration::from_secs(30);

/// Bytes of ClientHello read at most, and how long it may take to arrive.
const MAX_CLIENT_HELLO: usize = 16 * 1024;
const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `dst` must never become a host socket's peer, in whatever spelling: unspecified
/// (which the kernel would take as this host), broadcast or multicast, also when written as an
/// IPv4-mapped or -compatible IPv6 address.
fn unroutable(dst: IpAddr) -> bool {
    match canonical(dst) {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    }
}

/// Counters of what the datapath dropped or refused, by reason.
#[derive(Default, Debug, Clone)]
pub struct Counters {
    pub bad_chains: u64,
    pub tx_frames: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub dropped: HashMap<&'static str, u64>,
}

impl Counters {
    fn drop(&mut self, reason: &'static str) {
        *self.dropped.entry(reason).or_default() += 1;
    }
}

pub struct Datapath {
    settings: LinkSettings,
    link: Link,
    mem: Option<GuestMemory>,
    hdr_len: usize,
    mergeable: bool,
    stack: GuestStack,
    flows: FlowTable,
    dhcp: DhcpServer,
    timer: Timer,
    dns: GatewayDns,
    hellos: HashMap<FlowKey, HelloWait>,
    /// (src, dst) pairs whose DNS traffic was allowed, so the decision is logged once.
    dns_allowed: HashMap<(Protocol, FlowKey), Instant>,
    denied: HashMap<(Protocol, FlowKey), Instant>,
    counters: Counters,
    scratch: Vec<u8>,
    udp_buf: Vec<u8>,
    events: Vec<(FlowRef, EventSet)>,
    /// When the last router advertisement went out; `None` until the guest solicits one
    /// (a guest that never does has no IPv6 and gets no unsolicited ones).
    last_advert: Option<Instant>,
    /// smoltcp sockets of closed flows, kept until their last ACK is out (`SOCKET_LINGER`).
    lingering: Vec<(FlowKey, smoltcp::iface::SocketHandle, Instant)>,
    /// Guest IPv6 addresses smoltcp has been told the MAC of (see `introduce_guest`).
    introduced: Vec<(std::net::Ipv6Addr, Instant)>,
}

impl Datapath {
    pub fn new(settings: LinkSettings) -> io::Result<Self> {
        let stack = GuestStack::new(
            settings.gateway_mac,
            settings.addrs.gateway,
            settings.addrs.prefix_len,
            &settings.addrs6,
            settings.mtu,
        );
        let dhcp = DhcpServer {
            addrs: settings.addrs,
            mtu: settings.mtu,
            lease_secs: settings.lease_secs,
        };
        let dns = GatewayDns::new(
            DnsService::new(settings.dns.clone())?,
            settings.dns_intercept_all,
        );
        Ok(Datapath {
            dns,
            hellos: HashMap::new(),
            dns_allowed: HashMap::new(),
            link: Link {
                gateway_mac: EthernetAddress(settings.gateway_mac),
                guest_mac: EthernetAddress(settings.guest_mac),
            },
            settings,
            mem: None,
            hdr_len: 12,
            mergeable: false,
            stack,
            flows: FlowTable::new()?,
            dhcp,
            timer: Timer::new()?,
            denied: HashMap::new(),
            counters: Counters::default(),
            scratch: Vec::with_capacity(virtqueue::MAX_FRAME),
            udp_buf: vec![0u8; 65_536],
            events: Vec::new(),
            last_advert: None,
            introduced: Vec::new(),
            lingering: Vec::new(),
        })
    }

    pub fn flows_fd(&self) -> RawFd {
        self.flows.epoll_fd()
    }

    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// The DNS service's fd (its upstream sockets); fixed for the life of the datapath.
    pub fn dns_fd(&self) -> RawFd {
        self.dns.service.event_fd()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn set_acked_features(&mut self, features: u64) {
        let v1 = features & (1 << VIRTIO_F_VERSION_1) != 0;
        self.mergeable = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.hdr_len = virtqueue::header_len(v1 || self.mergeable);
    }

    pub fn set_memory(&mut self, mem: GuestMemory) {
        self.mem = Some(mem);
    }

    /// Forgets the guest's side of the link, as after a reboot: every flow (its host socket
    /// closes), every smoltcp socket and frame queued for the guest, DNS-over-TCP connections,
    /// TLS hellos awaited, and what was learned about the guest (IPv6 neighbours, router
    /// solicitation). Settings, policy, memory and the negotiated features stay.
    pub fn reset_link(&mut self) {
        let flows = self.flows.len();
        self.flows.tcp.clear();
        self.flows.udp.clear();
        self.flows.echo.clear();
        self.flows.tokens.clear();
        self.hellos.clear();
        self.lingering.clear();
        self.dns.reset_tcp();
        self.stack = GuestStack::new(
            self.settings.gateway_mac,
            self.settings.addrs.gateway,
            self.settings.addrs.prefix_len,
            &self.settings.addrs6,
            self.settings.mtu,
        );
        self.link.guest_mac = EthernetAddress(self.settings.guest_mac);
        self.dns_allowed.clear();
        self.denied.clear();
        self.introduced.clear();
        self.last_advert = None;
        info!(flows, "link reset: flows closed, queued frames dropped");
    }

    /// One event from the vring worker, then as much work as can be done.
    pub fn handle_event(&mut self, event: u16, rx: &VringRwLock, tx: &VringRwLock) {
        let Some(mem) = self.mem.clone() else {
            return;
        };
        let mem = mem.memory();
        match event {
            TX_QUEUE => {
                let mut scratch = std::mem::take(&mut self.scratch);
                let hdr_len = self.hdr_len;
                let stats = virtqueue::drain_tx(tx, &mem, hdr_len, &mut scratch, |frame| {
                    self.guest_frame(frame)
                });
                self.scratch = scratch;
                self.counters.tx_frames += stats.frames;
                if stats.bad_chains > 0 {
                    self.counters.bad_chains += stats.bad_chains;
                    warn!(
                        count = stats.bad_chains,
                        total = self.counters.bad_chains,
                        "dropped bad TX descriptor chains"
                    );
                }
            }
            RX_QUEUE => {}
            TIMER_EVENT => {
                self.timer.consume();
                self.dns_poll();
                self.housekeeping();
            }
            DNS_EVENT => self.dns_poll(),
            _ => self.host_events(),
        }
        self.service(rx, &mem);
    }

    /// Moves data until nothing more can move, then arms the timer for smoltcp's next deadline.
    fn service(&mut self, rx: &VringRwLock, mem: &vm_memory::GuestMemoryMmap<()>) {
        self.expire_lingering(None);
        for _ in 0..64 {
            self.pump_tcp();
            self.dns.pump_tcp(&self.settings.policy, &mut self.stack);
            self.check_hellos();
            self.stack.poll();
            let before = self.stack.link.to_guest.len();
            let delivered = self.flush_rx(rx, mem);
            if delivered == 0 && before == self.stack.link.to_guest.len() {
                break;
            }
            if !self.stack.link.to_guest.is_empty() && delivered == 0 {
                break;
            }
        }
        let mut delay = self
            .stack
            .poll_delay()
            .unwrap_or(HOUSEKEEPING)
            .min(HOUSEKEEPING);
        if let Some(deadline) = self.dns.service.next_deadline() {
            delay = delay.min(deadline.saturating_duration_since(Instant::now()));
        }
        if let Some((_, _, since)) = self.lingering.first() {
            let expiry = *since + SOCKET_LINGER;
            delay = delay.min(expiry.saturating_duration_since(Instant::now()));
        }
        self.timer.arm(delay);
    }

    /// Copies queued frames into the guest's RX buffers; returns how many were delivered.
    fn flush_rx(&mut self, rx: &VringRwLock, mem: &vm_memory::GuestMemoryMmap<()>) -> usize {
        let mut delivered = 0;
        let mut retried = false;
        let mut force_signal = false;
        while let Some(frame) = self.stack.link.to_guest.pop_front() {
            match virtqueue::push_rx(rx, mem, self.hdr_len, self.mergeable, &frame) {
                Ok(merged) => {
                    force_signal |= merged;
                    delivered += 1;
                    self.stack.link.recycle(frame);
                }
                Err(RxError::NoBuffers) => {
                    self.stack.link.to_guest.push_front(frame);
                    // Too few buffers for this frame: announce what was filled (so the guest
                    // can repost), ask for a kick, and wait for it. One retry covers buffers
                    // that arrived while notifications were off.
                    virtqueue::signal_if_needed(rx);
                    if retried || !virtqueue::enable_notification(rx) {
                        break;
                    }
                    retried = true;
                }
                Err(RxError::BadChain) => {
                    self.counters.bad_chains += 1;
                    self.counters.rx_dropped += 1;
                }
            }
        }
        if delivered > 0 {
            self.counters.rx_frames += delivered as u64;
            if force_signal {
                let _ = vhost_user_backend::VringT::needs_notification(rx);
                let _ = vhost_user_backend::VringT::signal_used_queue(rx);
            } else {
                virtqueue::signal_if_needed(rx);
            }
        }
        delivered
    }

    /// Whether `ip` is one of the gateway's own addresses (IPv4, IPv6 global or link-local).
    fn is_gateway(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => v4 == self.settings.addrs.gateway,
            IpAddr::V6(v6) => self.settings.addrs6.is_gateway(v6),
        }
    }

    /// The gateway address that messages to `guest` come from.
    fn gateway_for(&self, guest: IpAddr) -> IpAddr {
        match guest {
            IpAddr::V4(_) => IpAddr::V4(self.settings.addrs.gateway),
            IpAddr::V6(v6) => IpAddr::V6(self.settings.addrs6.source_for(v6)),
        }
    }

    /// A frame from the guest.
    fn guest_frame(&mut self, frame: &[u8]) {
        let gateway = self.settings.addrs.gateway;
        // The VMM may give the guest another MAC than our config space says (QEMU uses its
        // own -device mac=): frames we build go to whatever address the guest sends from.
        if let Some(src) = frame.get(6..12) {
            if src[0] & 1 == 0 && src != self.link.guest_mac.0 {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(src);
                debug!(mac = %EthernetAddress(mac), "guest MAC learned");
                self.link.guest_mac = EthernetAddress(mac);
            }
        }
        let classified = classify(frame);
        if let Some(IpAddr::V6(src)) = classified.source() {
            self.introduce_guest(src);
        }
        match classified {
            Classified::Arp { target, .. } => {
                if target == gateway {
                    self.stack.receive(frame);
                } else {
                    self.counters.drop("arp-not-gateway");
                }
            }
            Classified::Dhcp { payload } => self.dhcp(payload),
            Classified::IcmpEcho { dst, .. } if self.is_gateway(dst) => self.stack.receive(frame),
            Classified::IcmpEcho {
                src,
                dst,
                ident,
                seq,
                data,
            } => self.echo_request(src, dst, ident, seq, data, frame),
            Classified::IcmpOther { dst } if self.is_gateway(dst) => self.stack.receive(frame),
            Classified::IcmpOther { .. } => self.counters.drop("icmp-other"),
            Classified::NeighborSolicit { src, target }
                if self.settings.addrs6.is_gateway(target) =>
            {
                let advert = ipv6::neighbor_advert(&self.link, target, src);
                self.stack.link.queue_frame(advert);
            }
            // smoltcp with AnyIP would claim every address; only the gateway's are ours.
            Classified::NeighborSolicit { .. } => self.counters.drop("ndp-not-gateway"),
            Classified::RouterSolicit { src } => self.router_solicit(src),
            Classified::Tcp(head) => self.tcp_segment(head, frame),
            Classified::Udp { src, dst, payload } => self.udp_datagram(src, dst, payload, frame),
            Classified::Drop(reason) => self.count_drop(reason),
        }
    }

    fn count_drop(&mut self, reason: DropReason) {
        self.counters.drop(reason.as_str());
        debug!(reason = reason.as_str(), "dropped guest frame");
    }

    fn dhcp(&mut self, payload: &[u8]) {
        let Some(reply) = self.dhcp.handle(payload) else {
            self.counters.drop("dhcp-ignored");
            return;
        };
        let gateway = self.settings.addrs.gateway;
        let to = if reply.broadcast {
            std::net::Ipv4Addr::BROADCAST
        } else {
            self.settings.addrs.guest
        };
        let mut link = self.link;
        if let Some(mac) = DhcpServer::client_mac(payload) {
            link.guest_mac = mac;
        }
        let frame = frames::udp_to_guest(
            &link,
            SocketAddr::from((gateway, 67)),
            SocketAddr::from((to, 68)),
            reply.payload.len(),
            reply.broadcast,
            |b| b.copy_from_slice(&reply.payload),
        );
        debug!(guest = %self.settings.addrs.guest, "DHCP reply");
        self.stack.link.queue_frame(frame);
    }

    /// Tells smoltcp the guest's MAC for a guest IPv6 address it has not seen yet.
    fn introduce_guest(&mut self, src: std::net::Ipv6Addr) {
        if src.is_unspecified() || src.is_multicast() {
            return;
        }
        // A short linear search per frame; housekeeping forgets entries after the refresh time.
        if self.introduced.iter().any(|(a, _)| *a == src) {
            return;
        }
        if self.introduced.len() >= INTRODUCED_ADDRESSES {
            self.introduced.remove(0);
        }
        self.introduced.push((src, Instant::now()));
        let gateway = self.settings.addrs6.source_for(src);
        let frame = ipv6::guest_introduction(&self.link, src, gateway);
        self.stack.receive(&frame);
    }

    /// Answers a router solicitation with an advertisement of the guest's /64.
    fn router_solicit(&mut self, src: std::net::Ipv6Addr) {
        let to = if src.is_unspecified() {
            ipv6::ALL_NODES
        } else {
            src
        };
        self.send_router_advert(to);
    }

    fn send_router_advert(&mut self, to: std::net::Ipv6Addr) {
        let frame = ipv6::router_advert(&self.link, &self.settings.addrs6, self.settings.mtu, to);
        debug!(to = %to, prefix = %self.settings.addrs6.prefix, "router advertisement");
        self.last_advert = Some(Instant::now());
        self.stack.link.queue_frame(frame);
    }

    /// Decides a new flow and logs the decision. `None` = allowed.
    fn decide(&mut self, protocol: Protocol, src: SocketAddr, dst: SocketAddr) -> bool {
        let key = (src, dst);
        let now = Instant::now();
        if let Some(at) = self.denied.get(&(protocol, key)) {
            if now.duration_since(*at) < DENIED_MEMORY {
                return false;
            }
        }
        let domains = self.dns.service.cache().names_for(dst.ip(), now);
        let query = FlowQuery {
            direction: Direction::Egress,
            protocol,
            dst: dst.ip(),
            dst_port: Some(dst.port()),
            domains: &domains,
        };
        let decision = self.settings.policy.decide(&query);
        let mut allowed = decision.allowed();
        let mut reason = decision.reason.to_string();
        if allowed {
            if let Some(max) = self.settings.policy.max_connections() {
                if self.flows.len() >= max {
                    allowed = false;
                    reason = format!("max_connections ({max}) reached");
                }
            }
        }
        let proto = protocol.name();
        let action = if allowed { "allow" } else { "deny" };
        if domains.is_empty() {
            info!(action = %action, proto = %proto, src = %src, dst = %dst, reason = ?reason, "decision");
        } else {
            let names = domains.join(",");
            info!(
                action = %action, proto = %proto, src = %src, dst = %dst, reason = ?reason,
                domains = %names, domain_source = "dns-cache", "decision"
            );
        }
        if !allowed {
            if self.denied.len() > 4096 {
                self.denied
                    .retain(|_, at| now.duration_since(*at) < DENIED_MEMORY);
            }
            self.denied.insert((protocol, key), now);
        }
        allowed
    }

    /// Policy for traffic to the DNS service, decided (and logged) once per (src, dst) pair.
    fn dns_pair_allowed(&mut self, protocol: Protocol, src: SocketAddr, dst: SocketAddr) -> bool {
        let memo = (protocol, (src, dst));
        let now = Instant::now();
        if let Some(at) = self.dns_allowed.get(&memo) {
            if now.duration_since(*at) < DENIED_MEMORY {
                return true;
            }
        }
        let allowed = self.decide(protocol, src, dst);
        if allowed {
            if self.dns_allowed.len() > 4096 {
                self.dns_allowed
                    .retain(|_, at| now.duration_since(*at) < DENIED_MEMORY);
            }
            self.dns_allowed.insert(memo, now);
        }
        allowed
    }

    fn dns_poll(&mut self) {
        self.dns
            .poll(&self.settings.policy, &mut self.stack, &self.link);
    }

    fn reject_mode(&self) -> bool {
        self.settings.policy.deny_action() == DenyAction::Reject
    }

    fn tcp_segment(&mut self, head: TcpHead, frame: &[u8]) {
        let key = (head.src, head.dst);
        if self.dns.has_tcp(&key) || self.hellos.contains_key(&key) {
            self.stack.receive(frame);
            return;
        }
        if let Some(flow) = self.flows.tcp.get_mut(&key) {
            match &mut flow.phase {
                TcpPhase::Connecting { syn_frame } => {
                    if head.rst {
                        self.close_tcp(&key, "guest reset while connecting");
                    } else if head.syn && !head.ack {
                        syn_frame.clear();
                        syn_frame.extend_from_slice(frame);
                    }
                }
                TcpPhase::Open { .. } | TcpPhase::ConnectingAfterHello { .. } => {
                    // smoltcp 0.14 trims a segment to the receive window but still takes its
                    // FIN, losing the trimmed bytes. When a data+FIN segment may not fit (more
                    // than half the free buffer: the advertised window can lag behind it), data
                    // and FIN go in separately: the data first, then a bare FIN after it, which
                    // smoltcp takes only when all data before it is in (else the guest
                    // retransmits). A segment that surely fits goes in whole: a bare FIN arriving
                    // at a window the data just closed would be refused and stall the close.
                    let may_not_fit = match &flow.phase {
                        TcpPhase::Open { handle } | TcpPhase::ConnectingAfterHello { handle } => {
                            let sock = self.stack.sockets.get::<tcp::Socket>(*handle);
                            head.payload_len * 2 > sock.recv_capacity() - sock.recv_queue()
                        }
                        TcpPhase::Connecting { .. } => false,
                    };
                    if head.fin && head.payload_len > 0 && may_not_fit {
                        if let Some((data, fin)) = frames::split_fin(frame) {
                            self.stack.receive(&data);
                            self.stack.receive(&fin);
                            return;
                        }
                    }
                    self.stack.receive(frame)
                }
            }
            return;
        }
        if head.rst {
            return;
        }
        if !head.syn || head.ack {
            // A segment of no known connection: reset it, as a closed port would.
            self.counters.drop("tcp-unknown-flow");
            let rst = frames::tcp_reset(&self.link, &head);
            self.stack.link.queue_frame(rst);
            return;
        }
        self.expire_lingering(Some(&key));
        if head.dst.port() == 0 || unroutable(head.dst.ip()) {
            self.counters.drop("tcp-bad-destination");
            return;
        }
        if self.dns.serves(head.dst, self.is_gateway(head.dst.ip())) {
            if self.dns_pair_allowed(Protocol::Tcp, head.src, head.dst) {
                self.dns.accept_tcp(key, frame, &mut self.stack);
            } else if self.reject_mode() {
                let rst = frames::tcp_reset(&self.link, &head);
                self.stack.link.queue_frame(rst);
            }
            return;
        }
        if !self.decide(Protocol::Tcp, head.src, head.dst) {
            if self.reject_mode() {
                let rst = frames::tcp_reset(&self.link, &head);
                self.stack.link.queue_frame(rst);
            }
            return;
        }
        if self.settings.tls_ports.contains(&head.dst.port())
            && self.settings.policy.has_domain_rules()
        {
            // A name rule could decide this flow: read the ClientHello's SNI first.
            let handle = self.stack.sockets.add(tcpflow::listening_socket(head.dst));
            self.hellos.insert(
                key,
                HelloWait {
                    handle,
                    since: Instant::now(),
                },
            );
            self.stack.receive(frame);
            return;
        }
        let phase = TcpPhase::Connecting {
            syn_frame: frame.to_vec(),
        };
        if let Err(e) = self.connect_host_side(key, phase) {
            self.refuse_tcp(&head, frame, &e);
        }
    }

    /// Starts the host side of TCP flow `key` (a non-blocking connect to where the address map
    /// sends its destination, watched in the flows' epoll) and records the flow in `phase`.
    /// The error is logged here; the caller fails the guest's side.
    fn connect_host_side(&mut self, key: FlowKey, phase: TcpPhase) -> io::Result<()> {
        let (guest, dst) = key;
        let target = self.settings.addrmap.host_target(dst);
        let host = tcpflow::connect_host(target).inspect_err(|e| {
            info!(src = %guest, dst = %dst, host = %target, error = %e, "host connect failed");
        })?;
        let token = self
            .flows
            .register(host.as_raw_fd(), FlowRef::Tcp(key))
            .inspect_err(|e| warn!(error = %e, "cannot watch host socket"))?;
        debug!(src = %guest, dst = %dst, host = %target, "connecting host side");
        self.flows
            .tcp
            .insert(key, TcpFlow::new(token, key, target, host, phase));
        Ok(())
    }

    /// The host side could not be reached: fail the guest's connect at once.
    fn refuse_tcp(&mut self, head: &TcpHead, syn_frame: &[u8], error: &io::Error) {
        let unreachable = matches!(
            error.raw_os_error(),
            Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) | Some(libc::EAFNOSUPPORT)
        );
        let frame = if unreachable {
            let ip = &syn_frame[14..];
            frames::icmp_unreachable(
                &self.link,
                self.gateway_for(head.src.ip()),
                Unreachable::Host,
                ip,
            )
        } else {
            None
        };
        let frame = frame.unwrap_or_else(|| frames::tcp_reset(&self.link, head));
        self.stack.link.queue_frame(frame);
    }

    fn udp_datagram(&mut self, src: SocketAddr, dst: SocketAddr, payload: &[u8], frame: &[u8]) {
        let key = (src, dst);
        if self.dns.serves(dst, self.is_gateway(dst.ip())) {
            if self.dns_pair_allowed(Protocol::Udp, src, dst) {
                self.dns.udp_query(
                    src,
                    dst,
                    payload,
                    &self.settings.policy,
                    &mut self.stack,
                    &self.link,
                );
            } else if self.reject_mode() {
                self.reject_with_icmp(frame, src.ip(), Unreachable::Port);
            }
            return;
        }
        if !self.flows.udp.contains_key(&key) {
            if dst.port() == 0 || unroutable(dst.ip()) {
                self.counters.drop("udp-bad-destination");
                return;
            }
            if !self.decide(Protocol::Udp, src, dst) {
                if self.reject_mode() {
                    self.reject_with_icmp(frame, src.ip(), Unreachable::Port);
                }
                return;
            }
            let target = self.settings.addrmap.host_target(dst);
            let host = match udpflow::open_host(target) {
                Ok(s) => s,
                Err(e) => {
                    info!(src = %src, dst = %dst, host = %target, error = %e, "host UDP socket failed");
                    self.counters.drop("udp-host-socket");
                    return;
                }
            };
            let token = match self.flows.register(host.as_raw_fd(), FlowRef::Udp(key)) {
                Ok(t) => t,
                Err(_) => return,
            };
            self.flows.udp.insert(
                key,
                UdpFlow {
                    token,
                    guest: src,
                    dst,
                    host,
                    last_active: Instant::now(),
                    datagrams_to_host: 0,
                    datagrams_to_guest: 0,
                },
            );
        }
        let Some(flow) = self.flows.udp.get_mut(&key) else {
            return;
        };
        flow.last_active = Instant::now();
        match flow.host.send(payload) {
            Ok(_) => flow.datagrams_to_host += 1,
            Err(_) => self.counters.drop("udp-send-failed"),
        }
    }

    /// A ping from the guest to anywhere but the gateway: an ICMP socket on the host.
    fn echo_request(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        ident: u16,
        seq: u16,
        data: &[u8],
        frame: &[u8],
    ) {
        let key = (src, dst, ident);
        if !self.flows.echo.contains_key(&key) {
            if unroutable(dst) {
                self.counters.drop("icmp-bad-destination");
                return;
            }
            let (from, to) = (SocketAddr::new(src, ident), SocketAddr::new(dst, 0));
            let protocol = match dst {
                IpAddr::V4(_) => Protocol::Icmpv4,
                IpAddr::V6(_) => Protocol::Icmpv6,
            };
            if !self.decide(protocol, from, to) {
                if self.reject_mode() {
                    self.reject_with_icmp(frame, src, Unreachable::Prohibited);
                }
                return;
            }
            let target = self.settings.addrmap.host_target(to).ip();
            let host = match icmpflow::open_host(target) {
                Ok(s) => s,
                Err(e) => {
                    warn!(dst = %dst, error = %e, "cannot open an ICMP socket (is net.ipv4.ping_group_range set?)");
                    self.counters.drop("icmp-host-socket");
                    return;
                }
            };
            let Ok(token) = self.flows.register(host.as_raw_fd(), FlowRef::Echo(key)) else {
                return;
            };
            self.flows.echo.insert(
                key,
                icmpflow::EchoFlow {
                    token,
                    guest: src,
                    dst,
                    ident,
                    target,
                    host,
                    last_active: Instant::now(),
                },
            );
        }
        let Some(flow) = self.flows.echo.get_mut(&key) else {
            return;
        };
        flow.last_active = Instant::now();
        if flow
            .host
            .send(&icmpflow::echo_request(flow.target, seq, data))
            .is_err()
        {
            self.counters.drop("icmp-send-failed");
        }
    }

    fn echo_host_readable(&mut self, key: icmpflow::EchoKey) {
        let Some(flow) = self.flows.echo.get_mut(&key) else {
            return;
        };
        loop {
            // SAFETY of the cast: recv only writes initialised bytes into the buffer it is given.
            let buf = unsafe {
                &mut *(self.udp_buf.as_mut_slice() as *mut [u8]
                    as *mut [std::mem::MaybeUninit<u8>])
            };
            let n = match flow.host.recv(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.counters.drop("icmp-host-error");
                    continue;
                }
            };
            let Some((seq, data)) = icmpflow::parse_echo_reply(flow.target, &self.udp_buf[..n])
            else {
                continue;
            };
            flow.last_active = Instant::now();
            let frame =
                frames::icmp_echo_reply(&self.link, flow.dst, flow.guest, flow.ident, seq, data);
            if !self.stack.link.queue_frame(frame) {
                self.counters.drop("icmp-guest-queue-full");
            }
        }
    }

    /// Answers a denied packet from `guest` with a destination-unreachable from the gateway.
    fn reject_with_icmp(&mut self, frame: &[u8], guest: IpAddr, reason: Unreachable) {
        let from = self.gateway_for(guest);
        if let Some(f) = frame
            .get(frames::ETH_HDR..)
            .and_then(|ip| frames::icmp_unreachable(&self.link, from, reason, ip))
        {
            self.stack.link.queue_frame(f);
        }
    }

    /// Host sockets that became ready.
    fn host_events(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        self.flows.ready_events(&mut events);
        for (flow, set) in events.drain(..) {
            match flow {
                FlowRef::Tcp(key) => self.tcp_host_event(key, set),
                FlowRef::Udp(key) => self.udp_host_readable(key),
                FlowRef::Echo(key) => self.echo_host_readable(key),
            }
        }
        self.events = events;
    }

    fn tcp_host_event(&mut self, key: FlowKey, set: EventSet) {
        let Some(flow) = self.flows.tcp.get_mut(&key) else {
            return;
        };
        if set
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            flow.readable = true;
        }
        if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            flow.writable = true;
        }
        if let TcpPhase::ConnectingAfterHello { handle } = flow.phase {
            if !set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                return;
            }
            match tcpflow::connect_result(&flow.host) {
                Ok(()) => flow.phase = TcpPhase::Open { handle },
                Err(e) => {
                    info!(src = %flow.guest, dst = %flow.dst, host = %flow.host_target, error = %e, "host connect failed");
                    self.stack.sockets.get_mut::<tcp::Socket>(handle).abort();
                    self.stack.poll();
                    self.close_tcp(&key, "host connect failed");
                }
            }
            return;
        }
        let TcpPhase::Connecting { syn_frame } = &mut flow.phase else {
            return;
        };
        if !set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            return;
        }
        let syn = std::mem::take(syn_frame);
        match tcpflow::connect_result(&flow.host) {
            Ok(()) => {
                let handle = self.stack.sockets.add(tcpflow::listening_socket(flow.dst));
                flow.phase = TcpPhase::Open { handle };
                debug!(src = %flow.guest, dst = %flow.dst, "host connected; completing guest handshake");
                self.stack.receive(&syn);
            }
            Err(e) => {
                let head = match classify(&syn) {
                    Classified::Tcp(h) => h,
                    _ => {
                        self.flows.remove_tcp(&key);
                        return;
                    }
                };
                info!(src = %flow.guest, dst = %flow.dst, host = %flow.host_target, error = %e, "host connect failed");
                self.flows.remove_tcp(&key);
                self.refuse_tcp(&head, &syn, &e);
            }
        }
    }

    fn udp_host_readable(&mut self, key: FlowKey) {
        let Some(flow) = self.flows.udp.get_mut(&key) else {
            return;
        };
        let max_payload = usize::from(self.settings.mtu)
            .saturating_sub(frames::ip_header_len(flow.guest.ip()) + 8);
        loop {
            let n = match flow.host.recv(&mut self.udp_buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // ICMP errors surface here (e.g. connection refused): nothing to deliver.
                    self.counters.drop("udp-host-error");
                    continue;
                }
            };
            if n > max_payload {
                self.counters.drop("udp-reply-too-large");
                continue;
            }
            flow.last_active = Instant::now();
            let data = &self.udp_buf[..n];
            let frame = frames::udp_to_guest(&self.link, flow.dst, flow.guest, n, false, |b| {
                b.copy_from_slice(data)
            });
            if self.stack.link.queue_frame(frame) {
                flow.datagrams_to_guest += 1;
            } else {
                self.counters.drop("udp-guest-queue-full");
            }
        }
    }

    /// Pumps every open TCP flow and removes the finished ones.
    fn pump_tcp(&mut self) {
        let mut done: Vec<(FlowKey, &'static str)> = Vec::new();
        for (key, flow) in self.flows.tcp.iter_mut() {
            match flow.pump(&mut self.stack.sockets) {
                PumpResult::Alive => {}
                PumpResult::Finished => done.push((*key, "closed")),
                PumpResult::Aborted(why) => done.push((*key, why)),
            }
        }
        if !done.is_empty() {
            // Let smoltcp send the RSTs/FINs of aborted sockets before they go away.
            self.stack.poll();
        }
        for (key, why) in done {
            self.close_tcp(&key, why);
        }
    }

    fn close_tcp(&mut self, key: &FlowKey, why: &str) {
        if let Some(flow) = self.flows.remove_tcp(key) {
            if let TcpPhase::Open { handle } | TcpPhase::ConnectingAfterHello { handle } =
                flow.phase
            {
                let state = self.stack.sockets.get::<tcp::Socket>(handle).state();
                if state == tcp::State::TimeWait {
                    // smoltcp may still owe the guest the (delayed) ACK of its FIN.
                    self.lingering.push((*key, handle, Instant::now()));
                } else {
                    self.stack.sockets.remove(handle);
                }
            }
            debug!(
                src = %flow.guest, dst = %flow.dst, why,
                to_host = flow.bytes_to_host, to_guest = flow.bytes_to_guest,
                "TCP flow closed"
            );
        }
    }

    /// Removes the lingering sockets whose time is up, and any of `reused` (a new connection
    /// with the same addresses and ports must not meet the old socket).
    fn expire_lingering(&mut self, reused: Option<&FlowKey>) {
        if self.lingering.is_empty() {
            return;
        }
        let now = Instant::now();
        let sockets = &mut self.stack.sockets;
        self.lingering.retain(|(key, handle, since)| {
            let keep = now.duration_since(*since) < SOCKET_LINGER && Some(key) != reused;
            if !keep {
                sockets.remove(*handle);
            }
            keep
        });
    }

    /// TLS connections waiting for their ClientHello: decide those whose SNI (or timeout) is in.
    fn check_hellos(&mut self) {
        if self.hellos.is_empty() {
            return;
        }
        let now = Instant::now();
        let keys: Vec<FlowKey> = self.hellos.keys().copied().collect();
        for key in keys {
            let Some(wait) = self.hellos.get(&key) else {
                continue;
            };
            let (handle, since) = (wait.handle, wait.since);
            let sock = self.stack.sockets.get_mut::<tcp::Socket>(handle);
            if matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait) {
                self.hellos.remove(&key);
                self.stack.sockets.remove(handle);
                continue;
            }
            let scan = if sock.can_recv() {
                match sock.peek(MAX_CLIENT_HELLO) {
                    Ok(buf) => scan_client_hello(buf, MAX_CLIENT_HELLO),
                    Err(_) => ClientHelloScan::NotTls,
                }
            } else {
                ClientHelloScan::NeedMore
            };
            // Before the handshake completes smoltcp reports "may not receive": that is not the
            // guest giving up.
            let handshaking = matches!(sock.state(), tcp::State::Listen | tcp::State::SynReceived);
            let guest_gave_up = !handshaking && !sock.may_recv() && !sock.can_recv();
            let sni = match scan {
                ClientHelloScan::NeedMore
                    if !guest_gave_up && now.duration_since(since) < CLIENT_HELLO_TIMEOUT =>
                {
                    continue
                }
                ClientHelloScan::Sni(name) => Some(name),
                _ => None,
            };
            self.hellos.remove(&key);
            if self.sni_allows(key, sni.as_deref()) {
                self.connect_after_hello(key, handle);
            } else {
                self.reset_guest_socket(handle);
            }
        }
    }

    /// Resets a guest connection held only by a smoltcp socket, then drops the socket.
    fn reset_guest_socket(&mut self, handle: smoltcp::iface::SocketHandle) {
        self.stack.sockets.get_mut::<tcp::Socket>(handle).abort();
        self.stack.poll();
        self.stack.sockets.remove(handle);
    }

    /// The TLS first-flight decision: a denied SNI is denied even if the address was allowed,
    /// and an SNI allowed by a name rule must have been resolved to this address through us.
    fn sni_allows(&mut self, key: FlowKey, sni: Option<&str>) -> bool {
        let Some(name) = sni else {
            // No SNI: the decision made on the SYN (address and cached names) stands.
            return true;
        };
        let (src, dst) = key;
        let ip = dst.ip();
        let domains = vec![name.to_string()];
        let policy = self.settings.policy.clone();
        let decision = policy.decide(&FlowQuery {
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            dst: ip,
            dst_port: Some(dst.port()),
            domains: &domains,
        });
        let (allowed, reason) = if !decision.allowed() {
            (false, decision.reason.to_string())
        } else if policy.is_domain_rule(&decision.reason)
            && !self.dns.service.cache().resolved(name, ip, Instant::now())
        {
            (
                false,
                format!("SNI {name} was not resolved to {ip} through netfence"),
            )
        } else {
            (true, decision.reason.to_string())
        };
        let action = if allowed { "allow" } else { "deny" };
        info!(
            action = %action, proto = "tcp", src = %src, dst = %dst, reason = ?reason,
            domains = %name, domain_source = "sni", "decision"
        );
        allowed
    }

    /// Connects the host side of a TLS flow whose guest handshake is already complete.
    fn connect_after_hello(&mut self, key: FlowKey, handle: smoltcp::iface::SocketHandle) {
        if self
            .connect_host_side(key, TcpPhase::ConnectingAfterHello { handle })
            .is_err()
        {
            self.reset_guest_socket(handle);
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        if self
            .last_advert
            .is_some_and(|at| now.duration_since(at) >= ipv6::ADVERT_INTERVAL)
        {
            self.send_router_advert(ipv6::ALL_NODES);
        }
        let tracing_flows = tracing::enabled!(tracing::Level::TRACE);
        for flow in self.flows.tcp.values().filter(|_| tracing_flows) {
            if let TcpPhase::Open { handle } = flow.phase {
                let sock = self.stack.sockets.get::<tcp::Socket>(handle);
                tracing::trace!(
                    src = %flow.guest, dst = %flow.dst, state = %sock.state(),
                    recv_queue = sock.recv_queue(), send_queue = sock.send_queue(),
                    readable = flow.readable, writable = flow.writable, host_eof = flow.host_eof,
                    host_write_shut = flow.host_write_shut, guest_fin_seen = flow.guest_fin_seen,
                    "TCP flow state"
                );
            }
        }
        let idle: Vec<FlowKey> = self
            .flows
            .udp
            .iter()
            .filter(|(_, f)| f.idle(now))
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            if let Some(f) = self.flows.remove_udp(&key) {
                debug!(src = %f.guest, dst = %f.dst, "UDP session idle, closed");
            }
        }
        let idle_echo: Vec<icmpflow::EchoKey> = self
            .flows
            .echo
            .iter()
            .filter(|(_, f)| f.idle(now))
            .map(|(k, _)| *k)
            .collect();
        for key in idle_echo {
            self.flows.remove_echo(&key);
        }
        let stale: Vec<(FlowKey, Vec<u8>)> = self
            .flows
            .tcp
            .iter()
            .filter_map(|(k, f)| match &f.phase {
                TcpPhase::Connecting { syn_frame }
                    if now.duration_since(f.started) > CONNECT_TIMEOUT =>
                {
                    Some((*k, syn_frame.clone()))
                }
                _ => None,
            })
            .collect();
        for (key, syn) in stale {
            self.flows.remove_tcp(&key);
            if let Classified::Tcp(head) = classify(&syn) {
                info!(src = %head.src, dst = %head.dst, "host connect timed out");
                self.stack
                    .link
                    .queue_frame(frames::tcp_reset(&self.link, &head));
            }
        }
        self.introduced
            .retain(|(_, at)| now.duration_since(*at) < INTRODUCTION_REFRESH);
        self.denied
            .retain(|_, at| now.duration_since(*at) < DENIED_MEMORY);
        self.dns_allowed
            .retain(|_, at| now.duration_since(*at) < DENIED_MEMORY);
    }
}

#[cfg(test)]
mod tests {
    use super::unroutable;

    #[test]
    fn unroutable_destinations_in_every_spelling() {
        for ip in [
            "0.0.0.0",
            "::",
            "::ffff:0.0.0.0",
            "255.255.255.255",
            "::ffff:255.255.255.255",
            "224.0.0.1",
            "::ffff:239.1.2.3",
            "ff02::1",
        ] {
            assert!(unroutable(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "203.0.113.7",
            "::ffff:203.0.113.7",
            "2001:db8::7",
            "::1",
            "127.0.0.1",
        ] {
            assert!(!unroutable(ip.parse().unwrap()), "{ip}");
        }
    }
}
