//! The flows of one link: every guest flow from its first frame to its last byte.
//!
//! Theory of operation. The link hands [`Flows`] each classified TCP segment, UDP datagram and
//! echo request. A frame of a known flow follows the flow; the first frame of a new one is
//! decided once ([`decide`]: policy, DNS names, budgets, bounded memo) and, if allowed, gets a
//! host socket in the flows' epoll ([`table`]). Then:
//!
//! - TCP ([`tcp`]) is a pipeline: the guest end (a smoltcp socket), an optional middle stage
//!   (the SNI gate on TLS ports under domain rules) and the host end (a host socket).
//! - UDP ([`udp`]) and echo ([`icmp`]) sessions are one connected host socket each; their
//!   replies are read only while the guest's queue has room (backpressure, not buffers).
//!   A TX drain's UDP datagrams are collected per flow and sent when the drain ends
//!   ([`Flows::flush_udp`], the first thing [`Flows::pump`] and [`Flows::housekeeping`] do).
//! - DNS to the gateway ([`dns_gateway`]) is answered by netfence's own DNS service.
//!
//! Host sockets' readiness comes in through [`Flows::host_ready`]; [`Flows::pump`] moves
//! bytes; [`Flows::housekeeping`] enforces every timeout.
//!
//! Many flows, few busy. A round pumps and counts only the awake TCP flows: a flow quiet for
//! [`tcp::QUIET`] (established, nothing held, nothing to read) has its smoltcp socket parked
//! out of the set smoltcp polls (whose every poll and every frame walks all its sockets) and
//! leaves the awake set; a segment from the guest or an event on its host socket wakes it.
//! Housekeeping still walks every flow, once a second. Everything a guest can make grow here
//! has a limit in [`crate::limits::Limits`].

pub mod addrmap;
pub mod decide;
pub mod dns_gateway;
pub mod icmp;
pub mod inbound;
pub mod operator;
pub mod owners;
pub mod table;
pub mod tcp;
pub mod udp;

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp as stcp;
use tracing::{debug, info, warn};
use vmm_sys_util::epoll::EventSet;

use crate::config::addressing::Addressing;
use crate::config::DenyAction;
use crate::dns::cache::CachedNames;
use crate::dns::{DnsService, DnsSettings};
use crate::ingress::PublishedPorts;
use crate::limits::Limits;
use crate::observe::audit::{AuditLog, AuditTag, DecisionAudit};
use crate::observe::{Counters, LogGate};
use crate::policy::{canonical, Direction, FlowQuery, Policy, Protocol};
use crate::secrets::{
    HostContext, HttpLimits, HttpRequestRewriter, PlaceholderScanner, SecretSet, StreamError,
    ViolationAction,
};
use crate::stack::frames::{self, TcpHead, Unreachable};
use crate::stack::GuestStack;
use crate::tls::sni::ClientHelloScan;
use crate::tls::{LeafCache, TlsSettings};

use self::addrmap::AddressMap;
use self::decide::{Decider, DecisionEvent, NameSource};
use self::dns_gateway::GatewayDns;
use self::icmp::{EchoFlow, EchoKey};
use self::inbound::Inbound;
use self::table::{FlowRef, FlowTable, NewFlow};
use self::tcp::host_end::{self, HostEnd};
use self::tcp::intercept::InterceptError;
use self::tcp::intercept::{InterceptStep, Interceptor};
use self::tcp::rings::RingMemory;
use self::tcp::sni_gate::{GateStatus, SniGate};
use self::tcp::{ClearFilter, ClearStage, GuestEnd, Middle, PumpResult, TcpFlow, GUEST_REFUSED};
use self::udp::{UdpBatch, UdpFlow, UdpReceiver};

/// (guest source, guest-visible destination)
pub type FlowKey = (SocketAddr, SocketAddr);

/// How long the smoltcp socket of a gracefully closed flow outlives it: well past the ACK
/// delay ([`tcp::GUEST_ACK_DELAY`]), so the ACK of the guest's last segment and FIN still goes
/// out, and a FIN the guest sends again is answered.
const SOCKET_LINGER: Duration = Duration::from_millis(50);
/// A closed flow that carried more than this gives back its rings' pages as its socket starts
/// lingering (a short one has touched a page or two: not worth the call).
const LINGER_RELEASE_BYTES: u64 = 16 * 1024;
/// The least a TCP flow may hold each way, however many flows share the link's budget.
const MIN_TCP_SHARE: usize = 16 * 1024;
/// Datagrams read from one host socket per pump before the others get their turn.
const READS_PER_PUMP: usize = 64;

/// Why a host socket could not be started.
#[derive(Debug)]
pub enum OpenError {
    /// No socket could be made (descriptor or memory limits): not the destination's fault.
    Socket(io::Error),
    /// The connect itself failed at once (refused, unreachable, ...).
    Connect(io::Error),
}

/// Whether `dst` must never become a host socket's peer, in whatever spelling: unspecified
/// (which the kernel would take as this host), broadcast or multicast, also when written as an
/// IPv4-mapped or -compatible IPv6 address.
fn unroutable(dst: IpAddr) -> bool {
    match canonical(dst) {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    }
}

/// What a judged ClientHello named, for the interception rules.
enum HelloName {
    Sni(String),
    /// A well-formed hello without a name ("no SNI"), or bytes that are not TLS ("not TLS").
    Missing(&'static str),
    /// A hello that could not be read for certain (refused in any case).
    Unreadable,
}

/// What the flows of a link need to know, shared by all connections of one netfence process.
#[derive(Clone)]
pub struct FlowSettings {
    pub policy: Arc<Policy>,
    pub addrmap: Arc<AddressMap>,
    pub addressing: Addressing,
    pub mtu: u16,
    pub dns: DnsSettings,
    pub dns_intercept_all: bool,
    /// `[tls]`: the ports whose first flight (TLS ClientHello) is read for the SNI before any
    /// byte goes upstream (under domain rules, or always with interception), and interception.
    pub tls: TlsSettings,
    /// The secrets to substitute and guard; `None` when there are none.
    pub secrets: Option<Arc<SecretSet>>,
    /// The published ports (`-p`, `ports`), bound for the whole process; `None` without any.
    pub published: Option<Arc<PublishedPorts>>,
    pub limits: Limits,
}

/// The flows of one link.
pub struct Flows {
    settings: FlowSettings,
    table: FlowTable,
    decider: Decider,
    dns: GatewayDns,
    /// smoltcp sockets of closed flows (and the memory of their buffers), kept until their
    /// last ACK is out (`SOCKET_LINGER`).
    lingering: Vec<(FlowKey, SocketHandle, Instant, RingMemory)>,
    /// Buffer memory of the sockets a reset forgot, freed at the next pump (the link resets
    /// the stack, dropping those sockets, right after the flows).
    retired_rings: Vec<RingMemory>,
    /// Drops and refusals by reason.
    pub counters: Counters,
    /// Lines about host socket failures (descriptor exhaustion and the like).
    socket_warnings: LogGate,
    /// Lines about single flows (connect failures, timeouts): a flood gets a few and a count.
    flow_events: LogGate,
    buf: Vec<u8>,
    /// Guest UDP datagrams of the current TX drain, sent when it ends.
    udp_batch: UdpBatch,
    /// `recvmmsg` buffers for UDP replies.
    udp_rx: UdpReceiver,
    events: Vec<(FlowRef, EventSet)>,
    /// The TCP flows whose guest end is not parked (all of them but those at rest): what a
    /// round pumps and counts, so that a round costs what the busy flows cost, however many
    /// rest. Housekeeping adds back any flow it finds awake and missing.
    awake: HashSet<FlowKey>,
    /// Keys of `awake`, copied for one pump round.
    awake_keys: Vec<FlowKey>,
    /// What all TCP flows held at the last pump: toward the guest (smoltcp send queues) and
    /// toward the host (receive queues), and the most either ever was.
    tcp_to_guest_bytes: usize,
    tcp_to_host_bytes: usize,
    pub tcp_buffered_peak: usize,
    /// What one TCP flow may hold each way now: the link budget shared among the open flows.
    tcp_share: usize,
    /// The link's leaf certificates, with interception on.
    leaves: Option<LeafCache>,
    /// Lines about secret violations and refused requests.
    secret_events: LogGate,
    /// A secret's `block_and_terminate` fired: the link must stop serving this VM.
    terminate: bool,
    /// The published ports, served by this link while it lives.
    inbound: Option<Inbound>,
}

impl Flows {
    pub fn new(settings: FlowSettings) -> io::Result<Self> {
        let dns = GatewayDns::new(
            DnsService::new(settings.dns.clone())?,
            settings.dns_intercept_all,
        );
        let limits = &settings.limits;
        let mut table = FlowTable::new()?;
        let inbound = match &settings.published {
            Some(ports) if !ports.is_empty() => Some(Inbound::new(ports, &mut table)?),
            _ => None,
        };
        Ok(Flows {
            inbound,
            decider: Decider::new(
                settings.policy.clone(),
                limits.denied_memo,
                limits.denied_memo_time,
                limits.decision_log_rate,
            ),
            table,
            dns,
            lingering: Vec::new(),
            retired_rings: Vec::new(),
            counters: Counters::default(),
            socket_warnings: LogGate::new(5, Duration::from_secs(10)),
            flow_events: LogGate::new(20, Duration::from_secs(10)),
            buf: vec![0u8; 65_536],
            udp_batch: UdpBatch::new(limits.udp_batch_datagrams, limits.udp_batch_bytes),
            udp_rx: UdpReceiver::default(),
            events: Vec::new(),
            awake: HashSet::new(),
            awake_keys: Vec::new(),
            tcp_to_guest_bytes: 0,
            tcp_to_host_bytes: 0,
            tcp_buffered_peak: 0,
            tcp_share: usize::MAX,
            leaves: settings
                .tls
                .interception()
                .map(|i| i.leaf_cache(&settings.limits)),
            secret_events: LogGate::new(20, Duration::from_secs(10)),
            terminate: false,
            settings,
        })
    }

    /// With multiqueue: these flows are queue pair `pair`'s; a flow leaving releases its key in
    /// `owners`, the per-VM budgets count every pair's flows (`counts`), and domain names come from the VM's one name cache `names` (filled by pair 0,
    /// which serves DNS).
    pub fn join_vm(
        &mut self,
        owners: Arc<owners::Owners>,
        counts: Arc<owners::PairCounts>,
        pair: u16,
        names: Arc<std::sync::RwLock<crate::dns::cache::NameCache>>,
    ) {
        self.table.set_owners(owners, counts, pair);
        self.dns.service.share_cache(names);
    }

    /// With `--audit`: this link's decisions, flow ends and secret violations go to `log` as
    /// those of VMM connection `link`, queue pair `pair`.
    pub fn audit_as(&mut self, log: Option<Arc<AuditLog>>, link: u64, pair: u16) {
        let tag = log.map(|log| AuditTag::new(log, link, pair));
        let rate = self.settings.limits.audit_deny_rate;
        self.decider
            .log
            .set_audit(tag.clone().map(|t| DecisionAudit::new(t, rate)));
        if let Some(inbound) = self.inbound.as_mut() {
            inbound.audit = tag.clone();
        }
        self.table.audit = tag;
    }

    /// With multiqueue: tells the other pairs this pair's flow counts as they are now.
    pub fn publish_counts(&self) {
        self.table.publish_counts();
    }

    /// Whether a flow of `key` is in this link's table.
    pub fn has_flow(&self, key: &FlowRef) -> bool {
        match key {
            FlowRef::Tcp(k) => self.table.tcp.contains_key(k),
            FlowRef::Udp(k) => self.table.udp.contains_key(k),
            FlowRef::Echo(k) => self.table.echo.contains_key(k),
            FlowRef::Listener(_) => false,
        }
    }

    /// The fds to watch: the host sockets' epoll and the DNS service's upstream sockets.
    pub fn fds(&self) -> [RawFd; 2] {
        [self.table.epoll_fd(), self.dns.service.event_fd()]
    }

    /// Open flows (all kinds, DNS-over-TCP included).
    pub fn len(&self) -> usize {
        self.table.len() + self.dns.open_tcp_connections()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flows of each kind: (tcp, udp, echo, dns-over-tcp).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.table.tcp.len(),
            self.table.udp.len(),
            self.table.echo.len(),
            self.dns.open_tcp_connections(),
        )
    }

    /// Decision lines written so far (summaries included).
    pub fn decision_lines(&self) -> u64 {
        self.decider.log.lines
    }

    /// New-flow frames answered from the denied memo.
    pub fn denied_memo_hits(&self) -> u64 {
        self.decider.memo_hits
    }

    fn reject_mode(&self) -> bool {
        self.settings.policy.deny_action() == DenyAction::Reject
    }

    fn limits(&self) -> &Limits {
        &self.settings.limits
    }

    /// Names the DNS cache holds for `ip` (looked up by its canonical spelling).
    fn names_for(&self, ip: IpAddr, now: Instant) -> CachedNames {
        self.dns.service.cache().lookup(ip, now)
    }

    /// A host socket could not be made: logged (rate-limited), counted and remembered.
    fn socket_failed(&mut self, protocol: Protocol, key: FlowKey, error: &io::Error) {
        let now = Instant::now();
        self.counters.inc("host-socket-failed");
        self.decider.remember_refused(protocol, key, now);
        if let Some(suppressed) = self.socket_warnings.admit(now) {
            warn!(proto = protocol.name(), src = %key.0, dst = %key.1, error = %error, suppressed,
                "cannot open a host socket (descriptor limit?); flow refused");
        }
    }

    // ---- TCP ----------------------------------------------------------------------------

    /// A TCP segment from the guest.
    pub fn tcp_segment(&mut self, head: TcpHead, frame: &[u8], stack: &mut GuestStack) {
        let key = (head.src, head.dst);
        if self.dns.has_tcp(&key) {
            self.dns.tcp_segment(key, frame, stack);
            return;
        }
        if let Some(flow) = self.table.tcp.get_mut(&key) {
            match &mut flow.guest_end {
                GuestEnd::Held { syn_frame, syn } => {
                    if head.rst {
                        self.close_tcp(&key, "guest reset while connecting", stack);
                    } else if head.syn && !head.ack {
                        *syn_frame = frames::syn_headers(frame);
                        *syn = head;
                    }
                }
                GuestEnd::Socket { .. } => {
                    if flow.wake(stack) {
                        self.awake.insert(key);
                    }
                    let Some(handle) = flow.handle() else {
                        return;
                    };
                    let sock = stack.sockets.get::<stcp::Socket>(handle);
                    let queued = sock.recv_queue();
                    let link_full =
                        self.tcp_to_host_bytes > self.settings.limits.tcp_link_buffer_bytes;
                    if head.payload_len > 0
                        && (queued >= self.tcp_share || (link_full && queued > 0))
                    {
                        // The flow holds its share of the link's budget toward the host: its
                        // new data waits (the guest retransmits it) until the queue drains.
                        self.counters.inc("tcp-link-buffer-full");
                        return;
                    }
                    // smoltcp 0.14 trims a segment to the receive window but still takes its
                    // FIN, losing the trimmed bytes. When a data+FIN segment may not fit (more
                    // than half the free buffer: the advertised window can lag behind it), data
                    // and FIN go in separately: the data first, then a bare FIN after it, which
                    // smoltcp takes only when all data before it is in (else the guest
                    // retransmits). A segment that surely fits goes in whole: a bare FIN arriving
                    // at a window the data just closed would be refused and stall the close.
                    let sock = stack.sockets.get::<stcp::Socket>(handle);
                    let may_not_fit =
                        head.payload_len * 2 > sock.recv_capacity() - sock.recv_queue();
                    let split = if head.fin && head.payload_len > 0 && may_not_fit {
                        frames::split_fin(frame)
                    } else {
                        None
                    };
                    let ack_delay =
                        (head.payload_len >= tcp::SMALL_SEGMENT).then_some(tcp::GUEST_ACK_DELAY);
                    stack
                        .sockets
                        .get_mut::<stcp::Socket>(handle)
                        .set_ack_delay(ack_delay);
                    match split {
                        Some((data, fin)) => {
                            stack.receive(&data);
                            stack.receive(&fin);
                        }
                        None => stack.receive(frame),
                    }
                    let sock = stack.sockets.get::<stcp::Socket>(handle);
                    let accepted = sock.recv_queue().saturating_sub(queued);
                    let synced = !matches!(
                        sock.state(),
                        stcp::State::Closed | stcp::State::Listen | stcp::State::SynSent
                    );
                    flow.guest_seq.segment(&head, accepted, synced);
                    if sock.state() == stcp::State::Listen {
                        // The guest reset the handshake and smoltcp went back to listening:
                        // a listening socket would take the next SYN to this address from
                        // any guest port, into this flow's host connection.
                        self.counters.inc("tcp-guest-reset-handshake");
                        self.close_tcp(&key, "guest reset the handshake", stack);
                    }
                }
            }
            return;
        }
        if !head.syn && self.lingering.iter().any(|(k, ..)| *k == key) {
            // A closed flow's socket still lingers: it answers (a retransmitted FIN is
            // acknowledged again, not reset).
            stack.receive(frame);
            return;
        }
        if head.rst {
            return;
        }
        if !head.syn || head.ack {
            // A segment of no known connection: reset it, as a closed port would.
            self.counters.inc("tcp-unknown-flow");
            stack
                .port
                .queue_frame(frames::tcp_reset(&stack.macs, &head));
            return;
        }
        self.expire_lingering(Some(&key), stack);
        if head.dst.port() == 0 || unroutable(head.dst.ip()) {
            self.counters.inc("tcp-bad-destination");
            return;
        }
        let now = Instant::now();
        let to_gateway = self.settings.addressing.is_gateway(head.dst.ip());
        if self.dns.serves(head.dst, to_gateway) {
            let (open, cap) = (self.dns.open_tcp_connections(), self.limits().dns_tcp);
            let capacity = || {
                if open >= cap {
                    Err(format!("limit dns-tcp ({cap}) reached"))
                } else {
                    Ok(())
                }
            };
            if self
                .decider
                .decide_dns(Protocol::Tcp, head.src, head.dst, capacity, now)
                && open < cap
            {
                self.dns.accept_tcp(key, frame, stack);
            } else {
                self.counters.inc("tcp-dns-refused");
                if self.reject_mode() || open >= cap {
                    stack
                        .port
                        .queue_frame(frames::tcp_reset(&stack.macs, &head));
                }
            }
            return;
        }
        let gated = self
            .settings
            .tls
            .intercepted_ports
            .contains(&head.dst.port())
            && (self.settings.policy.has_domain_rules() || self.leaves.is_some());
        let names = self.names_for(head.dst.ip(), now);
        let table = &self.table;
        let limits = &self.settings.limits;
        let max = self.settings.policy.max_connections();
        let allowed = self.decider.decide(
            Protocol::Tcp,
            head.src,
            head.dst,
            &names,
            || table.room_for(NewFlow::Tcp { gated }, limits, max),
            now,
        );
        if !allowed {
            self.counters.inc("tcp-denied");
            if self.reject_mode() {
                stack
                    .port
                    .queue_frame(frames::tcp_reset(&stack.macs, &head));
            }
            return;
        }
        if let Err(e) = self.dial(&head, frame, gated, &names.asked, now) {
            self.refuse_tcp(&head, frame, &e, stack);
            return;
        }
        // A connect to this host's own addresses (loopback, the usual --map target) has
        // normally completed by the time connect() returns: answer the guest's SYN now rather
        // than one epoll round later. Otherwise the socket's first writable edge says when.
        if let Some(flow) = self.table.tcp.get_mut(&key) {
            if flow.host.connected_now() {
                flow.host.writable = true;
                self.host_dialed(key, Ok(()), stack);
            }
        }
    }

    /// The context a secrets stage judges a connection to `dst` in.
    fn secret_context(&self, dst: SocketAddr, sni: Option<&str>, names: &[String]) -> HostContext {
        HostContext {
            port: dst.port(),
            sni: sni.map(str::to_string),
            sni_verified: sni.is_some()
                && self
                    .settings
                    .tls
                    .interception()
                    .is_some_and(|i| i.verify_upstream),
            resolved_names: names.to_vec(),
        }
    }

    /// The cleartext filter a new flow to `dst` gets when secrets are configured: requests
    /// are parsed and substituted on port 80, any other stream is scanned for placeholders.
    fn clear_filter(&self, dst: SocketAddr, names: &[String]) -> Option<Middle> {
        let secrets = self.settings.secrets.clone()?;
        let ctx = self.secret_context(dst, None, names);
        let stage = if dst.port() == 80 {
            ClearStage::Http(HttpRequestRewriter::new(
                secrets,
                ctx,
                HttpLimits::from(&self.settings.limits),
            ))
        } else {
            ClearStage::Scan(PlaceholderScanner::new(secrets, &ctx))
        };
        Some(Middle::Clear(Box::new(ClearFilter::new(stage))))
    }

    /// A flow's bytes broke a secret's rules (or could not be parsed as the requests they
    /// claim to be): the flow is reset both ways; the violation is logged as its action says,
    /// and `block_and_terminate` takes the link down.
    fn secret_refusal(&mut self, key: &FlowKey, err: StreamError, stack: &mut GuestStack) {
        let now = Instant::now();
        match &err {
            StreamError::Violation(v) => {
                self.counters.inc("secret-violation");
                if let Some(audit) = &self.table.audit {
                    audit.secret_violation(key.0, key.1, v);
                }
                match v.action {
                    ViolationAction::Block => {}
                    ViolationAction::BlockAndLog => {
                        if let Some(suppressed) = self.secret_events.admit(now) {
                            warn!(src = %key.0, dst = %key.1, secret = %v.secret, host = %v.host,
                                port = v.port, reason = %v.reason, suppressed,
                                "secret violation: connection reset");
                        }
                    }
                    ViolationAction::BlockAndTerminate => {
                        tracing::error!(src = %key.0, dst = %key.1, secret = %v.secret,
                            host = %v.host, port = v.port, reason = %v.reason,
                            "secret violation: this VM's network goes down (block_and_terminate)");
                        self.terminate = true;
                    }
                }
            }
            StreamError::Refused(r) => {
                self.counters.inc("secret-request-refused");
                if let Some(suppressed) = self.secret_events.admit(now) {
                    info!(src = %key.0, dst = %key.1, reason = %r, suppressed,
                        "request refused: connection reset");
                }
            }
        }
        self.abort_tcp(
            key,
            "refused by the secrets stage",
            "secret-flow-reset",
            stack,
        );
    }

    /// Whether a secret's `block_and_terminate` fired on this link.
    pub fn terminate_requested(&self) -> bool {
        self.terminate
    }

    /// Starts the host end of TCP flow `key` and records the flow with its SYN held. The
    /// error is logged here; the caller fails the guest's side.
    fn dial(
        &mut self,
        head: &TcpHead,
        syn: &[u8],
        gated: bool,
        names: &[String],
        now: Instant,
    ) -> io::Result<()> {
        let key = (head.src, head.dst);
        let (guest, dst) = key;
        let target = self.settings.addrmap.host_target(dst);
        let socket = match host_end::connect(target) {
            Ok(s) => s,
            Err(OpenError::Socket(e)) => {
                self.socket_failed(Protocol::Tcp, key, &e);
                return Err(e);
            }
            Err(OpenError::Connect(e)) => {
                self.counters.inc("tcp-host-connect-failed");
                if let Some(suppressed) = self.flow_events.admit(now) {
                    info!(src = %guest, dst = %dst, host = %target, error = %e, suppressed, "host connect failed");
                }
                return Err(e);
            }
        };
        let token = self
            .table
            .register(socket.as_raw_fd(), FlowRef::Tcp(key))
            .inspect_err(|e| {
                if let Some(suppressed) = self.socket_warnings.admit(now) {
                    warn!(error = %e, suppressed, "cannot watch host socket");
                }
            })?;
        debug!(src = %guest, dst = %dst, host = %target, "connecting host side");
        let middle = if gated {
            Some(Middle::Gate(SniGate::new(now)))
        } else {
            self.clear_filter(dst, names)
        };
        let host = HostEnd::new(socket, target);
        let mut flow = TcpFlow::new(token, *head, host, frames::syn_headers(syn), middle, now);
        flow.rule.clone_from(&self.decider.log.last_reason);
        self.table.tcp.insert(key, flow);
        self.awake.insert(key);
        Ok(())
    }

    /// The host side could not be reached: fail the guest's connect at once.
    fn refuse_tcp(
        &mut self,
        head: &TcpHead,
        syn_frame: &[u8],
        error: &io::Error,
        stack: &mut GuestStack,
    ) {
        let unreachable = matches!(
            error.raw_os_error(),
            Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) | Some(libc::EAFNOSUPPORT)
        );
        let frame = if unreachable {
            let from = self.settings.addressing.gateway_for(head.src.ip());
            syn_frame
                .get(frames::ETH_HDR..)
                .and_then(|ip| frames::icmp_unreachable(&stack.macs, from, Unreachable::Host, ip))
        } else {
            None
        };
        let frame = frame.unwrap_or_else(|| frames::tcp_reset(&stack.macs, head));
        stack.port.queue_frame(frame);
    }

    fn tcp_host_event(&mut self, key: FlowKey, set: EventSet, stack: &mut GuestStack) {
        let Some(flow) = self.table.tcp.get_mut(&key) else {
            return;
        };
        if set
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            flow.host.readable = true;
        }
        if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            flow.host.writable = true;
        }
        if flow.wake(stack) {
            self.awake.insert(key);
        }
        if flow.is_dialing() && set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR)
        {
            let result = flow.host.connect_result();
            self.host_dialed(key, result, stack);
        }
    }

    /// The host connect of a dialing flow ended with `result`: on success the guest end takes
    /// the held SYN (and answers it), on failure the guest's connect is refused.
    fn host_dialed(&mut self, key: FlowKey, result: io::Result<()>, stack: &mut GuestStack) {
        let Some(flow) = self.table.tcp.get_mut(&key) else {
            return;
        };
        let GuestEnd::Held {
            syn_frame,
            syn: head,
        } = &mut flow.guest_end
        else {
            return;
        };
        let (syn, head) = (std::mem::take(syn_frame), *head);
        match result {
            Ok(()) => {
                let (socket, rings) =
                    tcp::listening_guest_end(flow.dst, self.settings.limits.tcp_buffer_bytes);
                let handle = stack.sockets.add(socket);
                let now = Instant::now();
                flow.guest_end = GuestEnd::Socket {
                    handle,
                    since: now,
                    rings,
                    parked: false,
                };
                flow.last_active = now;
                if let Some(Middle::Gate(gate)) = &mut flow.middle {
                    // The hello's clock starts when the guest can send it.
                    *gate = SniGate::new(now);
                }
                debug!(src = %flow.guest, dst = %flow.dst, "host connected; completing guest handshake");
                stack.receive(&syn);
                let sock = stack.sockets.get::<stcp::Socket>(handle);
                if sock.state() == stcp::State::Listen {
                    // smoltcp did not take the SYN (the queue to the guest is full). The
                    // socket must not stay listening (it would take another guest port's
                    // SYN to this address): the flow goes, and the guest's next SYN opens
                    // a new one.
                    self.counters.inc("tcp-handshake-not-taken");
                    self.close_tcp(&key, "SYN not taken (queue to the guest full)", stack);
                    return;
                }
                let synced = !matches!(sock.state(), stcp::State::Closed | stcp::State::Listen);
                flow.guest_seq.segment(&head, sock.recv_queue(), synced);
            }
            Err(e) => {
                if let Some(suppressed) = self.flow_events.admit(Instant::now()) {
                    info!(src = %flow.guest, dst = %flow.dst, host = %flow.host.target, error = %e, suppressed, "host connect failed");
                }
                self.counters.inc("tcp-host-connect-failed");
                self.table.remove_tcp_because(&key, "host connect failed");
                self.refuse_tcp(&head, &syn, &e, stack);
            }
        }
    }

    /// Pumps every open TCP flow, opens or closes the SNI gates that are ready, and removes
    /// the finished flows.
    fn pump_tcp(&mut self, stack: &mut GuestStack, now: Instant) {
        let mut done: Vec<(FlowKey, &'static str)> = Vec::new();
        let mut hellos: Vec<(FlowKey, GateStatus)> = Vec::new();
        let hello_timeout = self.settings.limits.hello_timeout;
        let share = self.tcp_share;
        let mut link_room = self
            .settings
            .limits
            .tcp_link_buffer_bytes
            .saturating_sub(self.tcp_to_guest_bytes);
        let mut failed_tls: Vec<(FlowKey, String)> = Vec::new();
        let mut refused: Vec<(FlowKey, StreamError)> = Vec::new();
        let mut parked: Vec<FlowKey> = Vec::new();
        let mut keys = std::mem::take(&mut self.awake_keys);
        keys.clear();
        keys.extend(self.awake.iter().copied());
        for key in &keys {
            let Some(flow) = self.table.tcp.get_mut(key) else {
                self.awake.remove(key);
                continue;
            };
            if let (Some(Middle::Gate(gate)), Some(handle)) = (&flow.middle, flow.handle()) {
                let sock = stack.sockets.get_mut::<stcp::Socket>(handle);
                if matches!(sock.state(), stcp::State::Closed | stcp::State::TimeWait) {
                    // Nothing went upstream; the host sees a reset, not a clean close.
                    flow.host.reset_on_close();
                    done.push((*key, "guest closed before its ClientHello"));
                    continue;
                }
                match gate.poll(sock, now, hello_timeout) {
                    GateStatus::Waiting => {}
                    status => hellos.push((*key, status)),
                }
                continue;
            }
            let handle = flow.handle();
            if let (Some(Middle::Tls(tls)), Some(handle)) = (&mut flow.middle, handle) {
                let (Some(interception), Some(leaves)) =
                    (self.settings.tls.interception(), self.leaves.as_mut())
                else {
                    failed_tls.push((*key, "interception is off".to_string()));
                    continue;
                };
                let sock = stack.sockets.get_mut::<stcp::Socket>(handle);
                let before = tls.bytes_to_host + tls.bytes_to_guest;
                // Toward the guest, the same share of the link's budget as a plain flow.
                let granted = share.saturating_sub(sock.send_queue()).min(link_room);
                let mut to_guest_room = granted;
                let step = tls.pump(
                    sock,
                    &mut flow.host,
                    interception,
                    leaves,
                    &mut to_guest_room,
                );
                link_room -= granted - to_guest_room;
                match step {
                    InterceptStep::Alive => {}
                    InterceptStep::Finished => done.push((*key, "closed")),
                    InterceptStep::GuestReset => done.push((*key, "guest reset")),
                    InterceptStep::Failed(InterceptError::Secret(e)) => refused.push((*key, e)),
                    InterceptStep::Failed(e) => failed_tls.push((*key, e.to_string())),
                }
                flow.bytes_to_host = tls.bytes_to_host;
                flow.bytes_to_guest = tls.bytes_to_guest;
                if tls.bytes_to_host + tls.bytes_to_guest != before {
                    flow.last_active = now;
                }
                continue;
            }
            let held = flow
                .handle()
                .map_or(0, |h| stack.sockets.get::<stcp::Socket>(h).send_queue());
            let granted = share.saturating_sub(held).min(link_room);
            let mut to_guest_room = granted;
            let result = flow.pump(&mut stack.sockets, now, &mut to_guest_room);
            link_room -= granted - to_guest_room;
            match result {
                PumpResult::Alive => {
                    if flow.park(stack, now) {
                        parked.push(*key);
                    }
                }
                PumpResult::Finished => done.push((*key, "closed")),
                PumpResult::Aborted(why) => done.push((*key, why)),
                PumpResult::Refused(e) => refused.push((*key, e)),
            }
        }
        self.awake_keys = keys;
        self.counters.add("tcp-flows-parked", parked.len() as u64);
        for key in &parked {
            self.awake.remove(key);
        }
        for (key, status) in hellos {
            self.judge_hello(key, status, stack, now);
        }
        for (key, e) in refused {
            self.secret_refusal(&key, e, stack);
        }
        for (key, why) in failed_tls {
            self.counters.inc("tls-intercept-failed");
            if let Some(suppressed) = self.flow_events.admit(now) {
                info!(src = %key.0, dst = %key.1, error = %why, suppressed, "intercepted TLS flow failed");
            }
            self.abort_flow_now(&key, stack);
        }
        if !done.is_empty() {
            // Let smoltcp send the RSTs/FINs of aborted sockets before they go away.
            stack.poll();
        }
        for (key, why) in done {
            if why == GUEST_REFUSED {
                self.guest_refused(&key, now);
            }
            self.close_tcp(&key, why, stack);
        }
        self.count_tcp_buffers(stack);
    }

    /// Sums what the TCP flows' guest ends hold each way (gated flows included) and shares the
    /// link-wide `tcp-link-buffer-bytes` among the flows that hold bytes, with room for one
    /// more: each may hold its share (at least `MIN_TCP_SHARE`, at most its own buffer) in each
    /// direction. A flow past its share is not read from the host (toward the guest) and its
    /// new data from the guest waits (toward the host), so one stalled flow cannot take the
    /// others' room; and nothing is read from the host once the link holds its budget toward
    /// the guest, whatever the shares. Flows at rest hold nothing and take no share: one bulk
    /// flow beside thousands of idle ones still gets its whole buffer.
    fn count_tcp_buffers(&mut self, stack: &GuestStack) {
        let (mut to_guest, mut to_host, mut holding) = (0, 0, 0usize);
        // Parked flows hold nothing: the awake ones are all there is to count.
        let table = &self.table;
        let awake = self.awake.iter().filter_map(|k| table.tcp.get(k));
        for handle in awake.filter_map(|f| f.handle()) {
            let sock = stack.sockets.get::<stcp::Socket>(handle);
            let (send, recv) = (sock.send_queue(), sock.recv_queue());
            to_guest += send;
            to_host += recv;
            holding += usize::from(send + recv > 0);
        }
        self.tcp_to_guest_bytes = to_guest;
        self.tcp_to_host_bytes = to_host;
        self.tcp_buffered_peak = self.tcp_buffered_peak.max(to_guest).max(to_host);
        let limits = &self.settings.limits;
        self.tcp_share = (limits.tcp_link_buffer_bytes / (holding + 1))
            .max(MIN_TCP_SHARE)
            .min(limits.tcp_buffer_bytes);
    }

    /// The TLS first-flight decision: a denied SNI is denied even if the address was allowed,
    /// an SNI allowed by a name rule must have been resolved to this address through us, and
    /// a hello that is not a clean, single-name ClientHello is refused under domain rules.
    fn judge_hello(
        &mut self,
        key: FlowKey,
        status: GateStatus,
        stack: &mut GuestStack,
        now: Instant,
    ) {
        let (src, dst) = key;
        let hello = match &status {
            GateStatus::Ready(ClientHelloScan::Sni(name)) => HelloName::Sni(name.clone()),
            GateStatus::Ready(ClientHelloScan::NoSni) => HelloName::Missing("no SNI"),
            GateStatus::Ready(ClientHelloScan::NotTls) => HelloName::Missing("not TLS"),
            _ => HelloName::Unreadable,
        };
        let (sni, verdict): (Option<String>, Result<String, String>) = match status {
            GateStatus::Waiting => return,
            GateStatus::TimedOut => (None, Err("no ClientHello in time".to_string())),
            GateStatus::Ready(ClientHelloScan::Sni(name)) => {
                let verdict = self.sni_verdict(dst, &name, now);
                (Some(name), verdict)
            }
            // No name to judge: the decision made on the SYN (address and cached names) stands.
            GateStatus::Ready(ClientHelloScan::NoSni) => (
                None,
                Ok("ClientHello without SNI: the SYN's decision stands".to_string()),
            ),
            GateStatus::Ready(ClientHelloScan::NotTls) => (None, Err("not TLS".to_string())),
            GateStatus::Ready(ClientHelloScan::NeedMore) => (
                None,
                Err("guest closed before its ClientHello was complete".to_string()),
            ),
            // Under domain rules a hello whose name cannot be read for certain is refused:
            // the name is what the rules judge.
            GateStatus::Ready(ClientHelloScan::Malformed(why)) => {
                (None, Err(format!("malformed ClientHello: {why}")))
            }
            GateStatus::Ready(ClientHelloScan::Ambiguous(why)) => {
                (None, Err(format!("ambiguous ClientHello: {why}")))
            }
            GateStatus::Ready(ClientHelloScan::TooLarge) => (
                None,
                Err(format!(
                    "ClientHello larger than {} bytes",
                    tcp::sni_gate::MAX_CLIENT_HELLO
                )),
            ),
        };
        let (verdict, stage) = self.interception_verdict(dst, &hello, verdict, now);
        let names: Vec<String> = sni.into_iter().collect();
        let (allowed, reason) = match &verdict {
            Ok(r) => (true, r.as_str()),
            Err(r) => (false, r.as_str()),
        };
        self.decider.record(
            &DecisionEvent {
                direction: Direction::Egress,
                protocol: Protocol::Tcp,
                src,
                dst,
                allowed,
                reason,
                names: &names,
                source: NameSource::Sni,
            },
            now,
        );
        let Some(flow) = self.table.tcp.get_mut(&key) else {
            return;
        };
        if allowed {
            if stage.is_some() {
                self.counters.inc("tls-intercepted");
            }
            flow.middle = stage.map(Middle::Tls);
            flow.last_active = now;
            flow.rule = reason.to_string();
            flow.domain = names.first().cloned();
            if flow.middle.is_none() {
                // Relayed as it is (not intercepted: bypassed, interception off, or
                // allow_no_sni): whatever of it is in clear is scanned, as on any other port.
                let names = self.names_for(dst.ip(), now).asked;
                let filter = self.clear_filter(dst, &names);
                if let Some(flow) = self.table.tcp.get_mut(&key) {
                    flow.middle = filter;
                }
            }
        } else {
            self.counters.inc("tls-hello-refused");
            if let Some(handle) = flow.handle() {
                stack.sockets.get_mut::<stcp::Socket>(handle).abort();
            }
            flow.host.reset_on_close();
            stack.poll();
            self.close_tcp(&key, "SNI refused", stack);
        }
    }

    /// With interception on, what becomes of a hello the policy judged (`verdict`): a name
    /// gets an interceptor (unless `tls.bypass` lists it, or `tls-handshakes` are all taken);
    /// no name, or not TLS, is refused unless `tls.allow_no_sni` relays it as it is. Without
    /// interception the verdict stands and no stage follows.
    fn interception_verdict(
        &self,
        dst: SocketAddr,
        name: &HelloName,
        verdict: Result<String, String>,
        now: Instant,
    ) -> (Result<String, String>, Option<Box<Interceptor>>) {
        let Some(interception) = self.settings.tls.interception() else {
            return (verdict, None);
        };
        match (name, verdict) {
            (HelloName::Sni(name), Ok(reason)) => {
                if let Some(entry) = interception.bypass_entry(name) {
                    return (
                        Ok(format!("{reason}; not intercepted (tls.bypass {entry})")),
                        None,
                    );
                }
                let cap = self.settings.limits.tls_handshakes;
                if self.table.tls_handshakes() >= cap {
                    return (Err(format!("limit tls-handshakes ({cap}) reached")), None);
                }
                let rewriter = self.settings.secrets.clone().map(|secrets| {
                    let names = self.names_for(dst.ip(), now).asked;
                    HttpRequestRewriter::new(
                        secrets,
                        self.secret_context(dst, Some(name), &names),
                        HttpLimits::from(&self.settings.limits),
                    )
                });
                let stage = Interceptor::new(name, rewriter, now);
                (Ok(format!("{reason}; intercepted")), Some(Box::new(stage)))
            }
            (HelloName::Missing(what), _) => {
                if interception.allow_no_sni {
                    (
                        Ok(format!(
                            "{what} on an intercepted port: relayed unintercepted (tls.allow_no_sni)"
                        )),
                        None,
                    )
                } else {
                    (
                        Err(format!(
                            "{what} on an intercepted port (tls.allow_no_sni is off)"
                        )),
                        None,
                    )
                }
            }
            (_, verdict) => (verdict, None),
        }
    }

    fn sni_verdict(&self, dst: SocketAddr, name: &str, now: Instant) -> Result<String, String> {
        let ip = dst.ip();
        let policy = &self.settings.policy;
        let domains = [name.to_string()];
        let decision = policy.decide(&FlowQuery {
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            dst: ip,
            dst_port: Some(dst.port()),
            domains: &domains,
        });
        if !decision.allowed() {
            Err(decision.reason.to_string())
        } else if policy.is_domain_rule(&decision.reason)
            && !self.dns.service.cache().resolved(name, ip, now)
        {
            Err(format!(
                "SNI {name} was not resolved to {ip} through netfence"
            ))
        } else {
            Ok(decision.reason.to_string())
        }
    }

    fn close_tcp(&mut self, key: &FlowKey, why: &str, stack: &mut GuestStack) {
        self.awake.remove(key);
        if let Some(flow) = self.table.remove_tcp_because(key, why) {
            if let GuestEnd::Socket {
                handle,
                rings,
                parked: true,
                ..
            } = flow.guest_end
            {
                stack.parked.remove(handle);
                drop(rings);
            } else if let GuestEnd::Socket { handle, rings, .. } = flow.guest_end {
                let state = stack.sockets.get::<stcp::Socket>(handle).state();
                if state == stcp::State::TimeWait {
                    // smoltcp may still owe the guest the (delayed) ACK of its FIN. Every byte
                    // went through: the rings are dead, and a flow that carried more than a few
                    // pages gives them back now rather than when the socket goes.
                    if flow.bytes_to_host + flow.bytes_to_guest > LINGER_RELEASE_BYTES {
                        rings.release();
                    }
                    self.lingering.push((*key, handle, Instant::now(), rings));
                } else {
                    stack.sockets.remove(handle);
                    drop(rings);
                }
            }
            debug!(
                src = %flow.guest, dst = %flow.dst, why,
                to_host = flow.bytes_to_host, to_guest = flow.bytes_to_guest,
                "TCP flow closed"
            );
        }
    }

    /// Ends a flow whose middle stage failed: the host side is reset, the guest side closed
    /// after what the stage left for it (a TLS alert) goes out (the socket lingers for that).
    fn abort_flow_now(&mut self, key: &FlowKey, stack: &mut GuestStack) {
        self.awake.remove(key);
        let Some(mut flow) = self
            .table
            .remove_tcp_because(key, "its middle stage failed")
        else {
            return;
        };
        flow.wake(stack);
        flow.host.reset_on_close();
        if let GuestEnd::Socket { handle, rings, .. } = flow.guest_end {
            stack.sockets.get_mut::<stcp::Socket>(handle).close();
            stack.poll();
            self.lingering.push((*key, handle, Instant::now(), rings));
        }
    }

    /// Aborts a flow both ways (a timeout): RST to the guest, RST to the host.
    fn abort_tcp(
        &mut self,
        key: &FlowKey,
        why: &'static str,
        counter: &'static str,
        stack: &mut GuestStack,
    ) {
        let Some(flow) = self.table.tcp.get_mut(key) else {
            return;
        };
        if flow.wake(stack) {
            self.awake.insert(*key);
        }
        flow.host.reset_on_close();
        match &flow.guest_end {
            GuestEnd::Socket { handle, .. } => {
                stack.sockets.get_mut::<stcp::Socket>(*handle).abort();
                stack.poll();
            }
            GuestEnd::Held { syn, .. } => {
                stack.port.queue_frame(frames::tcp_reset(&stack.macs, syn));
            }
        }
        if let Some(suppressed) = self.flow_events.admit(Instant::now()) {
            info!(src = %key.0, dst = %key.1, why, suppressed, "TCP flow aborted");
        }
        self.counters.inc(counter);
        self.close_tcp(key, why, stack);
    }

    /// Removes the lingering sockets whose time is up, and any of `reused` (a new connection
    /// with the same addresses and ports must not meet the old socket).
    fn expire_lingering(&mut self, reused: Option<&FlowKey>, stack: &mut GuestStack) {
        if self.lingering.is_empty() {
            return;
        }
        let now = Instant::now();
        let sockets = &mut stack.sockets;
        // A socket leaves the set before the memory of its buffers is unmapped.
        self.lingering.retain(|(key, handle, since, _rings)| {
            let keep = now.duration_since(*since) < SOCKET_LINGER && Some(key) != reused;
            if !keep {
                sockets.remove(*handle);
            }
            keep
        });
    }

    // ---- UDP ----------------------------------------------------------------------------

    /// A UDP datagram from the guest.
    pub fn udp_datagram(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
        frame: &[u8],
        stack: &mut GuestStack,
    ) {
        let key = (src, dst);
        let now = Instant::now();
        let to_gateway = self.settings.addressing.is_gateway(dst.ip());
        if to_gateway && self.inbound_udp_reply(src, dst, payload, now) {
            return;
        }
        if self.dns.serves(dst, to_gateway) {
            if self
                .decider
                .decide_dns(Protocol::Udp, src, dst, || Ok(()), now)
            {
                self.dns
                    .udp_query(src, dst, payload, &self.settings.policy, stack);
            } else if self.reject_mode() {
                self.reject_with_icmp(frame, src.ip(), Unreachable::Port, stack);
            }
            return;
        }
        if !self.udp_batch.fits(payload.len()) {
            // The batch bound: what was collected goes out now, and collecting starts again.
            self.counters.inc("udp-batch-full");
            self.flush_udp(stack);
        }
        // One lookup for a datagram of a known flow; a new flow is looked up again once.
        if let Some(flow) = self.table.udp.get_mut(&key) {
            flow.last_active = now;
            self.udp_batch.push(key, flow, payload);
            return;
        }
        if !self.open_udp(key, frame, now, stack) {
            return;
        }
        if let Some(flow) = self.table.udp.get_mut(&key) {
            self.udp_batch.push(key, flow, payload);
        }
    }

    /// Sends the UDP datagrams collected so far, per flow (see [`udp`]): at the end of each TX
    /// drain, before flows can close, and when the batch is full.
    pub fn flush_udp(&mut self, stack: &mut GuestStack) {
        if self.udp_batch.is_empty() {
            return;
        }
        let counters = &mut self.counters;
        self.udp_batch.flush(&mut self.table.udp, |flow, report| {
            counters.add("udp-send-would-block", report.would_block as u64);
            counters.add("udp-send-failed", report.failed as u64);
            if report.refused {
                // An earlier datagram met a closed port: say so, as the host would.
                counters.inc("udp-port-unreachable");
                let quote = frames::udp_quote(flow.guest, flow.dst);
                if let Some(f) =
                    frames::icmp_unreachable(&stack.macs, flow.dst.ip(), Unreachable::Port, &quote)
                {
                    stack.port.queue_frame(f);
                }
            }
        });
    }

    /// Decides and opens a new UDP session; false when it was not opened.
    fn open_udp(
        &mut self,
        key: FlowKey,
        frame: &[u8],
        now: Instant,
        stack: &mut GuestStack,
    ) -> bool {
        let (src, dst) = key;
        if dst.port() == 0 || unroutable(dst.ip()) {
            self.counters.inc("udp-bad-destination");
            return false;
        }
        let quic_blocked = self
            .settings
            .tls
            .interception()
            .is_some_and(|i| i.block_quic)
            && self.settings.tls.intercepted_ports.contains(&dst.port());
        if quic_blocked {
            // QUIC would carry TLS past the interception: clients fall back to TCP.
            self.counters.inc("quic-blocked");
            if !self.decider.is_remembered(Protocol::Udp, key, now) {
                self.decider.record(
                    &DecisionEvent {
                        direction: Direction::Egress,
                        protocol: Protocol::Udp,
                        src,
                        dst,
                        allowed: false,
                        reason: "QUIC to an intercepted port (tls.block_quic)",
                        names: &[],
                        source: NameSource::DnsCache,
                    },
                    now,
                );
                self.decider.remember_refused(Protocol::Udp, key, now);
            }
            return false;
        }
        let names = self.names_for(dst.ip(), now);
        let table = &self.table;
        let limits = &self.settings.limits;
        let max = self.settings.policy.max_connections();
        if !self.decider.decide(
            Protocol::Udp,
            src,
            dst,
            &names,
            || table.room_for(NewFlow::Udp, limits, max),
            now,
        ) {
            self.counters.inc("udp-denied");
            if self.reject_mode() {
                self.reject_with_icmp(frame, src.ip(), Unreachable::Port, stack);
            }
            return false;
        }
        let target = self.settings.addrmap.host_target(dst);
        let host = match udp::open_host(target) {
            Ok(s) => s,
            Err(OpenError::Socket(e)) => {
                self.socket_failed(Protocol::Udp, key, &e);
                return false;
            }
            Err(OpenError::Connect(e)) => {
                if let Some(suppressed) = self.flow_events.admit(now) {
                    info!(src = %src, dst = %dst, host = %target, error = %e, suppressed, "host UDP connect failed");
                }
                self.counters.inc("udp-host-connect-failed");
                self.reject_with_icmp(frame, src.ip(), Unreachable::Host, stack);
                return false;
            }
        };
        let Ok(token) = self.table.register(host.as_raw_fd(), FlowRef::Udp(key)) else {
            self.counters.inc("udp-epoll-failed");
            return false;
        };
        let mut flow = UdpFlow::new(token, src, dst, host, now);
        flow.rule.clone_from(&self.decider.log.last_reason);
        self.table.udp.insert(key, flow);
        true
    }

    /// Reads replies from the UDP sessions whose sockets are readable, never more at once than
    /// the guest's queue has room for.
    fn pump_udp(&mut self, stack: &mut GuestStack) {
        let mtu = usize::from(self.settings.mtu);
        let rx = &mut self.udp_rx;
        for flow in self.table.udp.values_mut().filter(|f| f.readable) {
            let max_payload = mtu.saturating_sub(frames::ip_header_len(flow.guest.ip()) + 8);
            let mut reads = 0;
            while reads < READS_PER_PUMP {
                let room = stack.port.room();
                if room == 0 {
                    // The guest is slow: leave the rest in the host socket (backpressure).
                    return;
                }
                let n = match rx.receive(&flow.host, room.min(READS_PER_PUMP - reads), max_payload)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        flow.readable = false;
                        break;
                    }
                    Err(e) => {
                        reads += 1;
                        if e.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        if udp::is_refused(&e) {
                            // The host's port unreachable, relayed to the guest from the
                            // destination it used, as a real host would answer.
                            self.counters.inc("udp-port-unreachable");
                            let quote = frames::udp_quote(flow.guest, flow.dst);
                            if let Some(f) = frames::icmp_unreachable(
                                &stack.macs,
                                flow.dst.ip(),
                                Unreachable::Port,
                                &quote,
                            ) {
                                stack.port.queue_frame(f);
                            }
                        } else {
                            self.counters.inc("udp-host-error");
                        }
                        continue;
                    }
                };
                reads += n;
                flow.last_active = Instant::now();
                for i in 0..n {
                    let Some(data) = rx.datagram(i) else {
                        self.counters.inc("udp-reply-too-large");
                        continue;
                    };
                    let frame = frames::udp_to_guest(
                        &stack.macs,
                        flow.dst,
                        flow.guest,
                        data.len(),
                        false,
                        |b| b.copy_from_slice(data),
                    );
                    if stack.port.queue_frame(frame) {
                        flow.datagrams_to_guest += 1;
                        flow.bytes_to_guest += data.len() as u64;
                    }
                }
            }
        }
    }

    // ---- ICMP echo ------------------------------------------------------------------------

    /// A ping from the guest to anywhere but the gateway: an ICMP socket on the host.
    #[allow(clippy::too_many_arguments)]
    pub fn echo_request(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        ident: u16,
        seq: u16,
        data: &[u8],
        frame: &[u8],
        stack: &mut GuestStack,
    ) {
        let key = (src, dst, ident);
        let now = Instant::now();
        if !self.table.echo.contains_key(&key) && !self.open_echo(key, frame, now, stack) {
            return;
        }
        let Some(flow) = self.table.echo.get_mut(&key) else {
            return;
        };
        flow.last_active = now;
        if flow
            .host
            .send(&icmp::echo_request(flow.target, seq, data))
            .is_err()
        {
            self.counters.inc("icmp-send-failed");
        } else {
            flow.bytes_to_host += data.len() as u64;
        }
    }

    fn open_echo(
        &mut self,
        key: EchoKey,
        frame: &[u8],
        now: Instant,
        stack: &mut GuestStack,
    ) -> bool {
        let (src, dst, ident) = key;
        if unroutable(dst) {
            self.counters.inc("icmp-bad-destination");
            return false;
        }
        let (from, to) = (SocketAddr::new(src, ident), SocketAddr::new(dst, 0));
        let protocol = match dst {
            IpAddr::V4(_) => Protocol::Icmpv4,
            IpAddr::V6(_) => Protocol::Icmpv6,
        };
        let names = self.names_for(dst, now);
        let table = &self.table;
        let limits = &self.settings.limits;
        let max = self.settings.policy.max_connections();
        if !self.decider.decide(
            protocol,
            from,
            to,
            &names,
            || table.room_for(NewFlow::Echo, limits, max),
            now,
        ) {
            self.counters.inc("icmp-denied");
            if self.reject_mode() {
                self.reject_with_icmp(frame, src, Unreachable::Prohibited, stack);
            }
            return false;
        }
        let target = self.settings.addrmap.host_target(to).ip();
        let host = match icmp::open_host(target) {
            Ok(s) => s,
            Err(OpenError::Socket(e)) | Err(OpenError::Connect(e)) => {
                self.counters.inc("icmp-host-socket");
                self.decider.remember_refused(protocol, (from, to), now);
                if let Some(suppressed) = self.socket_warnings.admit(now) {
                    warn!(dst = %dst, error = %e, suppressed,
                        "cannot open an ICMP socket (is net.ipv4.ping_group_range set?)");
                }
                return false;
            }
        };
        let Ok(token) = self.table.register(host.as_raw_fd(), FlowRef::Echo(key)) else {
            self.counters.inc("icmp-epoll-failed");
            return false;
        };
        self.table.echo.insert(
            key,
            EchoFlow {
                token,
                guest: src,
                dst,
                ident,
                target,
                host,
                readable: false,
                last_active: now,
                rule: self.decider.log.last_reason.clone(),
                started: now,
                bytes_to_host: 0,
                bytes_to_guest: 0,
            },
        );
        true
    }

    fn pump_echo(&mut self, stack: &mut GuestStack) {
        for flow in self.table.echo.values_mut().filter(|f| f.readable) {
            for _ in 0..READS_PER_PUMP {
                if stack.port.room() == 0 {
                    return;
                }
                // SAFETY of the cast: recv only writes initialised bytes into the buffer.
                let buf = unsafe {
                    &mut *(self.buf.as_mut_slice() as *mut [u8]
                        as *mut [std::mem::MaybeUninit<u8>])
                };
                let n = match flow.host.recv(buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        flow.readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.counters.inc("icmp-host-error");
                        continue;
                    }
                };
                let Some((seq, data)) = icmp::parse_echo_reply(flow.target, &self.buf[..n]) else {
                    continue;
                };
                flow.last_active = Instant::now();
                flow.bytes_to_guest += data.len() as u64;
                let frame = frames::icmp_echo_reply(
                    &stack.macs,
                    flow.dst,
                    flow.guest,
                    flow.ident,
                    seq,
                    data,
                );
                stack.port.queue_frame(frame);
            }
        }
    }

    /// Answers a denied packet from `guest` with a destination-unreachable from the gateway.
    fn reject_with_icmp(
        &mut self,
        frame: &[u8],
        guest: IpAddr,
        reason: Unreachable,
        stack: &mut GuestStack,
    ) {
        let from = self.settings.addressing.gateway_for(guest);
        if let Some(f) = frame
            .get(frames::ETH_HDR..)
            .and_then(|ip| frames::icmp_unreachable(&stack.macs, from, reason, ip))
        {
            stack.port.queue_frame(f);
        }
    }

    // ---- Events, pumping, time -------------------------------------------------------------

    /// Host sockets that became ready.
    pub fn host_ready(&mut self, stack: &mut GuestStack) {
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        self.table.ready_events(&mut events);
        for (flow, set) in events.drain(..) {
            match flow {
                FlowRef::Tcp(key) => self.tcp_host_event(key, set, stack),
                FlowRef::Udp(key) => {
                    if let Some(f) = self.table.udp.get_mut(&key) {
                        f.readable = true;
                    }
                }
                FlowRef::Echo(key) => {
                    if let Some(f) = self.table.echo.get_mut(&key) {
                        f.readable = true;
                    }
                }
                FlowRef::Listener(index) => self.listener_ready(index),
            }
        }
        self.events = events;
    }

    /// Upstream DNS answers and timeouts.
    pub fn dns_ready(&mut self, stack: &mut GuestStack) {
        self.dns.poll(&self.settings.policy, stack);
    }

    /// Moves what can move: TCP both ways, DNS over TCP, UDP and echo replies.
    pub fn pump(&mut self, stack: &mut GuestStack) {
        self.flush_udp(stack);
        let now = Instant::now();
        self.retired_rings.clear();
        self.expire_lingering(None, stack);
        self.pump_inbound(stack, now);
        self.pump_tcp(stack, now);
        self.dns.pump_tcp(&self.settings.policy, stack);
        self.pump_udp(stack);
        self.pump_echo(stack);
    }

    /// The next time something here needs attention without an event. Lingering sockets have
    /// no deadline of their own: they go at the first pump after [`SOCKET_LINGER`] (any event,
    /// at the latest the once-a-second housekeeping tick), which spares a wake-up per closed
    /// connection; smoltcp's own timers (a delayed ACK) are armed through the stack.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.dns.service.next_deadline(),
            self.inbound_deadline(Instant::now()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Enforces every timeout: connects, handshakes, hellos (in `pump`), idle flows.
    pub fn housekeeping(&mut self, now: Instant, stack: &mut GuestStack) {
        self.flush_udp(stack);
        self.dns_ready(stack);
        let limits = self.settings.limits.clone();
        let tracing_flows = tracing::enabled!(tracing::Level::TRACE);
        let mut aborts: Vec<(FlowKey, &'static str, &'static str)> = Vec::new();
        for (key, flow) in self.table.tcp.iter() {
            match &flow.guest_end {
                GuestEnd::Held { .. } => {
                    if now.duration_since(flow.started) > limits.connect_timeout {
                        aborts.push((*key, "host connect timed out", "tcp-connect-timeout"));
                    }
                }
                GuestEnd::Socket { since, .. } => {
                    let Some(sock) = flow.socket(stack) else {
                        continue;
                    };
                    // SynSent: an inbound flow whose guest has not answered its SYN.
                    let handshaking = matches!(
                        sock.state(),
                        stcp::State::Listen | stcp::State::SynReceived | stcp::State::SynSent
                    );
                    let tls_late = matches!(&flow.middle, Some(Middle::Tls(t))
                        if t.handshaking()
                            && now.duration_since(t.started) > limits.tls_handshake_timeout);
                    if handshaking && now.duration_since(*since) > limits.handshake_timeout {
                        aborts.push((*key, "guest handshake timed out", "tcp-handshake-timeout"));
                    } else if tls_late {
                        aborts.push((*key, "TLS handshake timed out", "tls-handshake-timeout"));
                    } else if now.duration_since(flow.last_active) > limits.tcp_idle {
                        aborts.push((*key, "TCP flow idle", "tcp-idle"));
                    }
                    if tracing_flows {
                        tracing::trace!(
                            src = %flow.guest, dst = %flow.dst, state = %sock.state(),
                            recv_queue = sock.recv_queue(), send_queue = sock.send_queue(),
                            readable = flow.host.readable, writable = flow.host.writable,
                            host_eof = flow.host.eof, host_write_shut = flow.host.write_shut,
                            guest_fin_seen = flow.guest_fin_seen, gated = flow.middle.is_some(),
                            "TCP flow state"
                        );
                    }
                }
            }
        }
        for (key, why, counter) in aborts {
            self.abort_tcp(&key, why, counter, stack);
        }
        // Flows at rest give back the memory of their empty buffers.
        // Quiet flows are parked here too (else only a service round parks them).
        let (mut released, mut parked) = (0, 0);
        for (key, flow) in self.table.tcp.iter_mut() {
            released += u64::from(flow.rest(stack, now));
            if flow.is_parked() {
                continue;
            }
            if flow.park(stack, now) {
                parked += 1;
                self.awake.remove(key);
            } else {
                // Every flow not parked is pumped (a safety net for a flow added without it).
                self.awake.insert(*key);
            }
        }
        self.counters.add("tcp-flows-parked", parked);
        self.counters.add("tcp-buffers-released", released);
        let idle: Vec<FlowKey> = self
            .table
            .udp
            .iter()
            .filter(|(_, f)| f.idle(now, limits.udp_idle))
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            if let Some(f) = self.table.remove_udp_because(&key, "idle") {
                debug!(src = %f.guest, dst = %f.dst, "UDP session idle, closed");
            }
        }
        let idle_echo: Vec<EchoKey> = self
            .table
            .echo
            .iter()
            .filter(|(_, f)| f.idle(now, limits.icmp_idle))
            .map(|(k, _)| *k)
            .collect();
        for key in idle_echo {
            self.table.remove_echo_because(&key, "idle");
        }
        self.expire_inbound(now);
        let expired = self.dns.expire_tcp(now, limits.dns_tcp_idle, stack);
        self.counters.add("dns-tcp-idle", expired as u64);
        self.decider.log.flush(now);
    }

    /// Forgets every flow: the guest's rings restarted. Host connections are reset. The caller
    /// resets the stack right after (its sockets use memory freed at the next pump).
    pub fn reset(&mut self) {
        let n = self.table.len();
        self.udp_batch.clear();
        self.awake.clear();
        let keys: Vec<FlowKey> = self.table.tcp.keys().copied().collect();
        for key in keys {
            if let Some(flow) = self.table.remove_tcp_because(&key, "guest restarted") {
                flow.host.reset_on_close();
                if let GuestEnd::Socket { rings, .. } = flow.guest_end {
                    self.retired_rings.push(rings);
                }
            }
        }
        self.table.clear();
        self.dns.reset();
        let lingering = std::mem::take(&mut self.lingering);
        self.retired_rings
            .extend(lingering.into_iter().map(|(_, _, _, rings)| rings));
        self.decider.clear();
        if let Some(inbound) = self.inbound.as_mut() {
            inbound.reset();
        }
        if n > 0 {
            info!(flows = n, "guest restarted: closed its flows");
        }
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
