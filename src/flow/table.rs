//! The flow table of one link: every flow that was allowed, with its host socket and budget.
//!
//! Host sockets of one link live in one nested epoll instance (edge-triggered), which the vring
//! worker watches as a single fd; each socket is registered with its flow's token. Flows are
//! keyed by (guest source, guest-visible destination); echo sessions by (source, destination,
//! identifier). Each kind has its own budget (`tcp-flows`, `udp-flows`, `icmp-flows`, plus
//! `tcp-connecting` and `tls-hellos` for the TCP flows in those stages), and the policy's
//! `max_connections` bounds them together: [`FlowTable::room_for`] says whether one more fits.
//!
//! The maps hash with foldhash (a fast hasher, seeded at random per map) rather than SipHash:
//! a guest chooses the keys (its ports), but it cannot see the seed, and every map here is
//! bounded by a limit, so even a guest that found colliding keys could only slow its own
//! lookups within that bound, not grow anything.
//!
//! Every flow leaves through this table (`remove_*`, [`FlowTable::clear`], or the table's drop
//! when the link closes), so with `--audit` the table writes each flow's `close` line.

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::icmp::{EchoFlow, EchoKey};
use super::owners::{Counted, Owners, PairCounts};
use super::tcp::TcpFlow;
use super::udp::UdpFlow;
use super::FlowKey;
use crate::limits::Limits;
use crate::observe::audit::{AuditTag, CloseRecord};
use crate::policy::{Direction, Protocol};

/// A map of flows by key, with the table's hasher.
pub type FlowMap<V, K = FlowKey> = HashMap<K, V, foldhash::fast::RandomState>;

fn flow_map<K: Hash + Eq, V>() -> FlowMap<V, K> {
    HashMap::with_hasher(foldhash::fast::RandomState::default())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowRef {
    Tcp(FlowKey),
    Udp(FlowKey),
    Echo(EchoKey),
    /// A published port's listener (its index among the published ports).
    Listener(usize),
}

/// A kind of flow that needs room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewFlow {
    /// A TCP flow whose host connect starts now; `gated`: it will wait for a ClientHello.
    Tcp {
        gated: bool,
    },
    /// A TCP connection from a host client through a published port.
    InboundTcp,
    Udp,
    Echo,
}

pub struct FlowTable {
    epoll: Epoll,
    pub tcp: FlowMap<TcpFlow>,
    pub udp: FlowMap<UdpFlow>,
    pub echo: FlowMap<EchoFlow, EchoKey>,
    tokens: FlowMap<FlowRef, u64>,
    next_token: u64,
    /// With multiqueue: the VM's flow owners and this table's pair, told when a flow leaves.
    owners: Option<(Arc<Owners>, u16)>,
    /// With multiqueue: every pair's flow counts, for the per-VM budgets.
    counts: Option<Arc<PairCounts>>,
    /// `--audit`: where flows that end are written.
    pub audit: Option<AuditTag>,
    /// TCP payload bytes the flows that left this table carried, for the operator's totals.
    pub closed: ClosedTotals,
}

/// What TCP flows that are gone carried (`netfence_flow_bytes_total`).
#[derive(Default, Debug, Clone, Copy)]
pub struct ClosedTotals {
    pub tcp_bytes_to_host: u64,
    pub tcp_bytes_to_guest: u64,
}

impl FlowTable {
    pub fn new() -> io::Result<Self> {
        Ok(FlowTable {
            epoll: Epoll::new()?,
            tcp: flow_map(),
            udp: flow_map(),
            echo: flow_map(),
            tokens: flow_map(),
            closed: ClosedTotals::default(),
            next_token: 1,
            owners: None,
            counts: None,
            audit: None,
        })
    }

    /// With multiqueue: this table serves queue pair `pair`; a flow leaving it releases its
    /// key in `owners` (see [`super::owners`]).
    pub fn set_owners(&mut self, owners: Arc<Owners>, counts: Arc<PairCounts>, pair: u16) {
        self.owners = Some((owners, pair));
        self.counts = Some(counts);
    }

    fn released(&self, key: FlowRef) {
        if let Some((owners, pair)) = &self.owners {
            owners.release(&key, *pair);
        }
        self.publish(None);
    }

    /// With multiqueue: publishes this pair's counts as they are (a flow that was given room
    /// but never opened stops counting).
    pub fn publish_counts(&self) {
        self.publish(None);
    }

    /// With multiqueue: publishes this pair's counts, with one more flow of `opening`.
    fn publish(&self, opening: Option<NewFlow>) {
        let (Some(counts), Some((_, pair))) = (&self.counts, &self.owners) else {
            return;
        };
        let mut now = [
            self.tcp.len(),
            self.udp.len(),
            self.echo.len(),
            self.inbound_tcp(),
        ];
        let one = |c: Counted, now: &mut [usize; 4]| now[c as usize] += 1;
        match opening {
            Some(NewFlow::Tcp { .. }) => one(Counted::Tcp, &mut now),
            Some(NewFlow::InboundTcp) => {
                one(Counted::Tcp, &mut now);
                one(Counted::InboundTcp, &mut now);
            }
            Some(NewFlow::Udp) => one(Counted::Udp, &mut now),
            Some(NewFlow::Echo) => one(Counted::Echo, &mut now),
            None => {}
        }
        counts.publish(*pair, now);
    }

    /// Flows of `kind` the other pairs of a multiqueue VM hold (0 with one pair).
    fn others(&self, kind: Counted) -> usize {
        match (&self.counts, &self.owners) {
            (Some(counts), Some((_, pair))) => counts.others(*pair, kind),
            _ => 0,
        }
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Flows that count against `max_connections`.
    pub fn len(&self) -> usize {
        self.tcp.len() + self.udp.len() + self.echo.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// TCP flows whose host connect is in progress.
    pub fn tcp_connecting(&self) -> usize {
        self.tcp.values().filter(|f| f.is_dialing()).count()
    }

    /// TCP flows held at the SNI gate.
    pub fn tls_hellos(&self) -> usize {
        self.tcp
            .values()
            .filter(|f| f.middle.as_ref().is_some_and(|m| m.is_gate()))
            .count()
    }

    /// TCP flows from host clients through published ports.
    pub fn inbound_tcp(&self) -> usize {
        self.tcp.values().filter(|f| f.inbound).count()
    }

    /// Intercepted TLS flows still in their handshakes.
    pub fn tls_handshakes(&self) -> usize {
        self.tcp
            .values()
            .filter(|f| f.middle.as_ref().is_some_and(|m| m.is_tls_handshake()))
            .count()
    }

    /// Whether one more flow of `kind` fits the link's budgets; the error is the reason logged.
    pub fn room_for(
        &self,
        kind: NewFlow,
        limits: &Limits,
        max_connections: Option<usize>,
    ) -> Result<(), String> {
        let room = self.room_here(kind, limits, max_connections);
        if room.is_ok() {
            self.publish(Some(kind));
        }
        room
    }

    fn room_here(
        &self,
        kind: NewFlow,
        limits: &Limits,
        max_connections: Option<usize>,
    ) -> Result<(), String> {
        let full = |name: &str, limit: usize| Err(format!("limit {name} ({limit}) reached"));
        // Per VM: this pair's flows and (with multiqueue) the other pairs'.
        let tcp = self.tcp.len() + self.others(Counted::Tcp);
        let udp = self.udp.len() + self.others(Counted::Udp);
        let echo = self.echo.len() + self.others(Counted::Echo);
        if let Some(max) = max_connections {
            if tcp + udp + echo >= max {
                return Err(format!("max_connections ({max}) reached"));
            }
        }
        match kind {
            NewFlow::Tcp { gated } => {
                if tcp >= limits.tcp_flows {
                    return full("tcp-flows", limits.tcp_flows);
                }
                if self.tcp_connecting() >= limits.tcp_connecting {
                    return full("tcp-connecting", limits.tcp_connecting);
                }
                if gated && self.tls_hellos() >= limits.tls_hellos {
                    return full("tls-hellos", limits.tls_hellos);
                }
            }
            NewFlow::InboundTcp => {
                if tcp >= limits.tcp_flows {
                    return full("tcp-flows", limits.tcp_flows);
                }
                if self.inbound_tcp() + self.others(Counted::InboundTcp) >= limits.inbound_tcp {
                    return full("inbound-tcp", limits.inbound_tcp);
                }
            }
            NewFlow::Udp if udp >= limits.udp_flows => return full("udp-flows", limits.udp_flows),
            NewFlow::Echo if echo >= limits.icmp_flows => {
                return full("icmp-flows", limits.icmp_flows)
            }
            _ => {}
        }
        Ok(())
    }

    /// Registers a published port's listener (shared with the other links of the process, so
    /// never closed here); its events carry `FlowRef::Listener(index)`.
    pub fn register_listener(&mut self, fd: RawFd, index: usize) -> io::Result<()> {
        self.register(fd, FlowRef::Listener(index)).map(|_| ())
    }

    /// Registers a host socket and returns the token its events will carry.
    pub fn register(&mut self, fd: RawFd, flow: FlowRef) -> io::Result<u64> {
        let token = self.next_token;
        self.next_token += 1;
        let events = EventSet::IN
            | EventSet::OUT
            | EventSet::READ_HANG_UP
            | EventSet::HANG_UP
            | EventSet::ERROR
            | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        self.tokens.insert(token, flow);
        Ok(token)
    }

    /// Forgets a token whose socket is about to close without becoming a flow.
    pub fn unregister(&mut self, token: u64) {
        self.tokens.remove(&token);
    }

    /// Drains the ready host-socket events without blocking.
    pub fn ready_events(&self, out: &mut Vec<(FlowRef, EventSet)>) {
        let mut events = [EpollEvent::default(); 64];
        // Bounded: at most as many rounds as there are sockets, plus one.
        for _ in 0..=self.tokens.len() / events.len() + 1 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for ev in &events[..n] {
                if let Some(flow) = self.tokens.get(&ev.data()) {
                    out.push((*flow, ev.event_set()));
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    pub fn remove_tcp(&mut self, key: &FlowKey) -> Option<TcpFlow> {
        self.remove_tcp_because(key, "closed")
    }

    /// Removes a TCP flow that ended for `why` (the audit's `close` line says it).
    pub fn remove_tcp_because(&mut self, key: &FlowKey, why: &str) -> Option<TcpFlow> {
        let flow = self.tcp.remove(key)?;
        self.closed.tcp_bytes_to_host += flow.bytes_to_host;
        self.closed.tcp_bytes_to_guest += flow.bytes_to_guest;
        self.tokens.remove(&flow.token);
        self.released(FlowRef::Tcp(*key));
        if let Some(audit) = &self.audit {
            audit_tcp(audit, &flow, why, Instant::now());
        }
        Some(flow)
    }

    pub fn remove_echo(&mut self, key: &EchoKey) -> Option<EchoFlow> {
        self.remove_echo_because(key, "closed")
    }

    pub fn remove_echo_because(&mut self, key: &EchoKey, why: &str) -> Option<EchoFlow> {
        let flow = self.echo.remove(key)?;
        self.tokens.remove(&flow.token);
        self.released(FlowRef::Echo(*key));
        if let Some(audit) = &self.audit {
            audit_echo(audit, &flow, why, Instant::now());
        }
        Some(flow)
    }

    pub fn remove_udp(&mut self, key: &FlowKey) -> Option<UdpFlow> {
        self.remove_udp_because(key, "closed")
    }

    pub fn remove_udp_because(&mut self, key: &FlowKey, why: &str) -> Option<UdpFlow> {
        let flow = self.udp.remove(key)?;
        self.tokens.remove(&flow.token);
        self.released(FlowRef::Udp(*key));
        if let Some(audit) = &self.audit {
            audit_udp(audit, &flow, why, Instant::now());
        }
        Some(flow)
    }

    /// With `--audit`: a `close` line for every flow still here, which ends for `why`.
    fn audit_all(&self, why: &str) {
        let Some(audit) = &self.audit else {
            return;
        };
        let now = Instant::now();
        for flow in self.tcp.values() {
            audit_tcp(audit, flow, why, now);
        }
        for flow in self.udp.values() {
            audit_udp(audit, flow, why, now);
        }
        for flow in self.echo.values() {
            audit_echo(audit, flow, why, now);
        }
    }

    /// Closes every flow (their sockets leave the epoll as they close).
    pub fn clear(&mut self) {
        self.audit_all("guest restarted");
        for flow in self.tcp.values() {
            flow.host.reset_on_close();
            self.closed.tcp_bytes_to_host += flow.bytes_to_host;
            self.closed.tcp_bytes_to_guest += flow.bytes_to_guest;
        }
        self.tcp.clear();
        self.udp.clear();
        self.echo.clear();
        if let Some((owners, pair)) = &self.owners {
            owners.release_all(*pair);
        }
        self.publish(None);
        // The published ports' listeners stay watched.
        self.tokens.retain(|_, f| matches!(f, FlowRef::Listener(_)));
    }
}

impl Drop for FlowTable {
    /// The link closed (its VMM left): the flows still open end with it.
    fn drop(&mut self) {
        self.audit_all("link closed");
    }
}

fn audit_tcp(audit: &AuditTag, flow: &TcpFlow, why: &str, now: Instant) {
    // An inbound flow is the host client's (`src`) connection to the guest's port.
    let (direction, src, dst) = if flow.inbound {
        (Direction::Ingress, flow.host.target, flow.guest)
    } else {
        (Direction::Egress, flow.guest, flow.dst)
    };
    audit.flow_closed(&CloseRecord {
        direction,
        protocol: Protocol::Tcp,
        src,
        dst,
        bytes_to_host: flow.bytes_to_host,
        bytes_to_guest: flow.bytes_to_guest,
        duration: now.duration_since(flow.started),
        why,
    });
}

fn audit_udp(audit: &AuditTag, flow: &UdpFlow, why: &str, now: Instant) {
    audit.flow_closed(&CloseRecord {
        direction: Direction::Egress,
        protocol: Protocol::Udp,
        src: flow.guest,
        dst: flow.dst,
        bytes_to_host: flow.bytes_to_host,
        bytes_to_guest: flow.bytes_to_guest,
        duration: now.duration_since(flow.started),
        why,
    });
}

fn audit_echo(audit: &AuditTag, flow: &EchoFlow, why: &str, now: Instant) {
    // As the decision named it: the identifier as the source port.
    audit.flow_closed(&CloseRecord {
        direction: Direction::Egress,
        protocol: if flow.dst.is_ipv4() {
            Protocol::Icmpv4
        } else {
            Protocol::Icmpv6
        },
        src: SocketAddr::new(flow.guest, flow.ident),
        dst: SocketAddr::new(flow.dst, 0),
        bytes_to_host: flow.bytes_to_host,
        bytes_to_guest: flow.bytes_to_guest,
        duration: now.duration_since(flow.started),
        why,
    });
}
