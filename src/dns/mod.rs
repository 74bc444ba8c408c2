//! The gateway DNS service: the guest's resolver, with the policy's view of names.
//!
//! # Theory of operation
//!
//! The guest sends its queries to the gateway (UDP or TCP port 53). The datapath hands each
//! query to [`DnsService::handle_query`] together with a [`ClientKey`] that says where the answer
//! must go, and a [`DomainJudge`] that knows the policy's domain rules. A query is either
//! answered at once (NXDOMAIN for a blocked name, the gateway addresses for a host alias,
//! FORMERR for a malformed message) or forwarded to the first upstream nameserver under a fresh
//! random id, from a fresh UDP socket on a random port connected to that upstream (one socket
//! per attempt, closed when the attempt ends, so at most `max_in_flight` of them).
//!
//! The service owns its upstream sockets and watches them with its own epoll instance, whose
//! single descriptor ([`DnsService::event_fd`]) the queue thread registers once, for `EPOLLIN`,
//! in its own epoll. When it fires, or when [`DnsService::next_deadline`] passes, the thread
//! calls [`DnsService::poll`], which reads every upstream answer ready, matches it to its query
//! by id, upstream address and question (anything else is ignored: anti-spoofing), vets it, and
//! fails over timed-out queries to the next upstream (SERVFAIL after the last one). Vetting an
//! answer means: NXDOMAIN when a CNAME in it reaches a blocked name; with rebind protection,
//! removing every address in private/loopback/link-local/metadata space (A and AAAA records,
//! SVCB/HTTPS address hints; NXDOMAIN when no A/AAAA is left); truncating UDP answers that
//! exceed what reaches the client in one datagram (its EDNS size, `max_answer_bytes`, and one
//! frame of the link MTU: TC set, the client retries over TCP). A truncated upstream answer to
//! a TCP client is fetched again over TCP. Every address the guest receives is recorded in the
//! [`NameCache`] under the name the guest asked (CNAME targets only as aliases, which can deny
//! but never allow); domain rules for new flows are judged against it.
//!
//! Nothing here blocks, spawns or locks: it is driven entirely by the queue thread.

pub mod cache;
pub mod framer;
pub mod message;
pub mod names;
pub mod rebind;
mod service;
pub mod upstream;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

pub use cache::{CachedNames, NameCache, NameRole};
pub use framer::{FrameError, TcpDnsFramer};
pub use names::{normalize_name, DomainSet, StaticJudge};
pub use rebind::is_rebind_protected;
pub use service::DnsService;

/// The host alias answered locally when none is configured.
pub const DEFAULT_HOST_ALIAS: &str = "host.microsandbox.internal";
/// `dns.query_timeout_ms` default.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_millis(5000);
/// Default limit of queries waiting for an upstream answer.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// Hard ceiling of queries in flight (ids are 16 bits; keep collisions rare).
pub const MAX_IN_FLIGHT_CEILING: usize = 16384;
/// Default limit of an answer's size (the most DNS over TCP can carry).
pub const DEFAULT_MAX_ANSWER_BYTES: usize = 65535;
/// Default link MTU (netfence's `--mtu` default).
pub const DEFAULT_LINK_MTU: u16 = 1500;
/// IPv4 + UDP headers, IPv6 + UDP headers: what a UDP answer's frame carries beside it.
const UDP_IPV4_OVERHEAD: usize = 20 + 8;
const UDP_IPV6_OVERHEAD: usize = 40 + 8;

/// Configuration of a [`DnsService`].
#[derive(Clone, Debug)]
pub struct DnsSettings {
    /// Upstream nameservers, tried in order (see [`DnsSettings::resolve_upstreams`]).
    pub upstreams: Vec<SocketAddr>,
    /// How long one upstream gets to answer before the next is tried (`dns.query_timeout_ms`).
    pub query_timeout: Duration,
    /// Remove private/loopback/link-local/metadata addresses from answers (`dns.rebind_protection`).
    pub rebind_protection: bool,
    /// Names answered locally with the gateway addresses.
    pub host_aliases: Vec<String>,
    /// Gateway IPv4 addresses (A answers for host aliases).
    pub gateway_v4: Vec<Ipv4Addr>,
    /// Gateway IPv6 addresses (AAAA answers for host aliases).
    pub gateway_v6: Vec<Ipv6Addr>,
    /// Queries waiting for an upstream at once; the excess is dropped and counted.
    pub max_in_flight: usize,
    /// Largest answer delivered: UDP answers above it (or above the client's EDNS size) are
    /// truncated with TC set, TCP answers above it are replaced by SERVFAIL.
    pub max_answer_bytes: usize,
    /// Addresses kept in the IP -> names cache.
    pub cache_capacity: usize,
    /// The guest link's MTU: a UDP answer must fit in one IP packet of this size (see
    /// [`DnsSettings::udp_answer_room`]); a larger one is truncated with TC set.
    pub link_mtu: u16,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            query_timeout: DEFAULT_QUERY_TIMEOUT,
            rebind_protection: true,
            host_aliases: vec![DEFAULT_HOST_ALIAS.to_string()],
            gateway_v4: Vec::new(),
            gateway_v6: Vec::new(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_answer_bytes: DEFAULT_MAX_ANSWER_BYTES,
            cache_capacity: cache::DEFAULT_CACHE_CAPACITY,
            link_mtu: DEFAULT_LINK_MTU,
        }
    }
}

impl DnsSettings {
    /// The largest DNS message that fits in one IP packet of the link MTU to a guest at
    /// `client` (the answer goes back in the family of the query: 20 or 40 bytes of IP header,
    /// 8 of UDP).
    pub fn udp_answer_room(&self, client: IpAddr) -> usize {
        let overhead = match client {
            IpAddr::V4(_) => UDP_IPV4_OVERHEAD,
            IpAddr::V6(_) => UDP_IPV6_OVERHEAD,
        };
        usize::from(self.link_mtu).saturating_sub(overhead)
    }

    /// `dns.nameservers` entries (`IP`, `IP:PORT`, `[IPv6]:PORT`, `HOST`, `HOST:PORT`) to
    /// addresses; host names are resolved once, now. Empty: the host's /etc/resolv.conf.
    pub fn resolve_upstreams(entries: &[String]) -> Result<Vec<SocketAddr>, String> {
        upstream::resolve_upstreams(entries)
    }

    /// As [`DnsSettings::resolve_upstreams`] with another resolv.conf.
    pub fn resolve_upstreams_with(
        entries: &[String],
        resolv_conf: &Path,
    ) -> Result<Vec<SocketAddr>, String> {
        upstream::resolve_upstreams_with(entries, resolv_conf)
    }
}

/// The policy's view of names and addresses, asked by the DNS service.
pub trait DomainJudge {
    /// `Some(reason)` when `name` (normalized: lower case, no trailing dot) must not resolve:
    /// a `deny_domains` entry, a `deny_domain_suffixes` entry, or a deny rule of kind
    /// domain / domain suffix.
    fn domain_denied(&self, name: &str) -> Option<String>;
    /// True when an allow rule names this address or a range containing it explicitly (an
    /// IP or CIDR destination, not a group): such answers pass rebind protection.
    fn explicitly_allows_ip(&self, ip: IpAddr) -> bool;
}

/// How a guest query reached the service, so that its answer goes back the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    /// A guest TCP connection, named by the datapath's connection id.
    Tcp(u64),
}

/// Where an answer must be delivered: the guest's address and port, the address it sent the
/// query to (the answer's source), and the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub transport: Transport,
}

/// Counters of a [`DnsService`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Messages received from the guest.
    pub queries: u64,
    /// Queries sent upstream (first attempts; failovers count in `timeouts`).
    pub forwarded: u64,
    /// Queries answered without an upstream (host aliases).
    pub answered_locally: u64,
    /// NXDOMAIN for a blocked name (in the query or in a CNAME of the answer).
    pub blocked: u64,
    /// Addresses removed by rebind protection (A/AAAA records, SVCB/HTTPS hint addresses).
    pub rebind_removed: u64,
    /// Answers replaced by NXDOMAIN because rebind protection left no address.
    pub rebind_blocked: u64,
    /// Guest messages that could not be parsed or were not single-question queries.
    pub malformed: u64,
    /// Unsupported queries answered NOTIMP/REFUSED (other opcodes, zone transfers).
    pub unsupported: u64,
    /// Retransmissions of a query still in flight (dropped; the first one's answer serves).
    pub duplicates: u64,
    /// Queries dropped because `max_in_flight` were already waiting.
    pub dropped_over_limit: u64,
    /// Upstream attempts that timed out or failed.
    pub timeouts: u64,
    /// SERVFAIL answers made by netfence (every upstream failed, undecodable answer, ...).
    pub servfail: u64,
    /// Upstream answers delivered to the guest.
    pub answers: u64,
    /// UDP answers truncated to fit the client's size or the link MTU.
    pub truncated: u64,
    /// TCP answers above `max_answer_bytes` (replaced by SERVFAIL).
    pub oversize: u64,
    /// Upstream messages that matched no query (wrong id, source or question).
    pub mismatched: u64,
    /// Upstream answers that matched a query but could not be decoded.
    pub upstream_malformed: u64,
    /// Truncated upstream answers fetched again over TCP.
    pub tcp_retries: u64,
}

#[cfg(test)]
mod tests;
