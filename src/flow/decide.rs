//! Deciding a new flow: the policy, the names the guest resolved, the link's budgets, and a
//! bounded memory of what was denied.
//!
//! Theory of operation. A flow is decided once, at its first frame. [`Decider::decide`] asks
//! the compiled policy (with the names the DNS cache holds for the destination, looked up by
//! the canonical address), then, for an allowed flow, the caller's capacity check (flow
//! budgets, `max_connections`). A policy denial is remembered in an LRU of `denied-memo`
//! entries for `denied-memo-secs`, so a guest retransmitting a denied SYN is neither re-judged
//! nor re-logged; a capacity denial is *not* remembered (the flow may fit a moment later).
//! Allowed DNS pairs are remembered the same way so DNS traffic is decided once per pair.
//!
//! Every decision is logged with its reason, through [`DecisionLog`]: the first decision for a
//! (protocol, destination, action) is written at once, repeats within the aggregation window are
//! counted and summarised in one line, and at most `decision-log-rate` lines a second are
//! written (the rest counted and reported). A guest flooding SYNs gets a few lines, not one per
//! packet. With `--audit`, every decision that reaches the log also goes to the audit file,
//! before aggregation (see `observe::audit` for its own bound on denials).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;
use tracing::info;

use crate::dns::cache::CachedNames;
use crate::observe::audit::{DecisionAudit, DecisionRecord};
use crate::policy::{guest_loopback, Direction, FlowQuery, Policy, Protocol, GUEST_LOOPBACK};

use super::FlowKey;

/// Repeats of one (protocol, destination, action) within this window share one summary line.
pub const AGGREGATION_WINDOW: Duration = Duration::from_secs(10);
/// (protocol, destination, action) keys tracked for aggregation at once.
pub const AGGREGATION_KEYS: usize = 1024;

/// Where the names of a decision came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NameSource {
    DnsCache,
    Sni,
}

impl NameSource {
    pub fn as_str(self) -> &'static str {
        match self {
            NameSource::DnsCache => "dns-cache",
            NameSource::Sni => "sni",
        }
    }
}

/// One decision to log.
pub struct DecisionEvent<'a> {
    /// Egress (the guest's flows) or ingress (a host client through a published port: `src` is
    /// the client, `dst` the guest's address and port).
    pub direction: Direction,
    pub protocol: Protocol,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub allowed: bool,
    pub reason: &'a str,
    pub names: &'a [String],
    pub source: NameSource,
}

/// (protocol, destination, action, where the names came from, reason): the SYN and the SNI
/// decision of one TLS flow are two decisions, and a new reason is always worth a line.
type AggKey = (Protocol, SocketAddr, bool, NameSource, String);

/// The decision log with aggregation and a rate limit.
pub struct DecisionLog {
    lines_per_sec: usize,
    second_start: Option<Instant>,
    lines_this_second: usize,
    /// Decisions not written because of the rate limit, since the last report.
    rate_suppressed: u64,
    /// Per key: when its line was written, and how many repeats were not.
    recent: LruCache<AggKey, (Instant, u64)>,
    /// Lines written in all (for tests and counters).
    pub lines: u64,
    /// `--audit`: where every decision is written too.
    audit: Option<DecisionAudit>,
    /// Decisions by (allowed, reason), for the operator's metrics; at most
    /// [`DECISION_REASONS`] reasons, the rest count as "other".
    pub counts: std::collections::BTreeMap<(bool, String), u64>,
    /// The reason of the last decision recorded (what a new flow was allowed by).
    pub last_reason: String,
}

/// Distinct (action, reason) pairs counted (reasons may carry names a guest chose).
pub const DECISION_REASONS: usize = 128;

impl DecisionLog {
    pub fn new(lines_per_sec: usize) -> Self {
        DecisionLog {
            lines_per_sec: lines_per_sec.max(1),
            second_start: None,
            lines_this_second: 0,
            rate_suppressed: 0,
            recent: LruCache::new(NonZeroUsize::new(AGGREGATION_KEYS).expect("nonzero")),
            lines: 0,
            audit: None,
            counts: std::collections::BTreeMap::new(),
            last_reason: String::new(),
        }
    }

    /// Writes every decision to the audit too (`--audit`).
    pub fn set_audit(&mut self, audit: Option<DecisionAudit>) {
        self.audit = audit;
    }

    fn rate_allows(&mut self, now: Instant) -> bool {
        if self
            .second_start
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1))
        {
            self.second_start = Some(now);
            self.lines_this_second = 0;
        }
        if self.lines_this_second < self.lines_per_sec {
            self.lines_this_second += 1;
            true
        } else {
            false
        }
    }

    /// Logs `ev` now, or counts it toward a summary.
    pub fn record(&mut self, ev: &DecisionEvent, now: Instant) {
        if let Some(audit) = &mut self.audit {
            audit.decision(
                &DecisionRecord {
                    direction: ev.direction,
                    protocol: ev.protocol,
                    src: ev.src,
                    dst: ev.dst,
                    allowed: ev.allowed,
                    reason: ev.reason,
                    domains: ev.names,
                    domain_source: (!ev.names.is_empty() || ev.source == NameSource::Sni)
                        .then(|| ev.source.as_str()),
                },
                now,
            );
        }
        self.last_reason.clear();
        self.last_reason.push_str(ev.reason);
        let counted = (ev.allowed, ev.reason.to_string());
        if let Some(n) = self.counts.get_mut(&counted) {
            *n += 1;
        } else if self.counts.len() < DECISION_REASONS {
            self.counts.insert(counted, 1);
        } else {
            *self
                .counts
                .entry((ev.allowed, "other".to_string()))
                .or_default() += 1;
        }
        let key = (
            ev.protocol,
            ev.dst,
            ev.allowed,
            ev.source,
            ev.reason.to_string(),
        );
        if let Some((at, repeats)) = self.recent.get_mut(&key) {
            if now.duration_since(*at) < AGGREGATION_WINDOW {
                *repeats += 1;
                return;
            }
        }
        if let Some((old_key, (_, repeats))) = self.recent.pop_entry(&key) {
            self.summarise(old_key, repeats, now);
        }
        if !self.rate_allows(now) {
            self.rate_suppressed += 1;
            return;
        }
        if let Some((old_key, (_, repeats))) = self.recent.push(key.clone(), (now, 0)) {
            if old_key != key {
                self.summarise(old_key, repeats, now);
            }
        }
        self.lines += 1;
        let action = if ev.allowed { "allow" } else { "deny" };
        let proto = ev.protocol.name();
        if ev.direction == Direction::Ingress {
            info!(action = %action, direction = %ev.direction, proto = %proto, src = %ev.src,
                dst = %ev.dst, reason = ?ev.reason, "decision");
        } else if ev.names.is_empty() && ev.source == NameSource::Sni {
            // The TLS decision on a hello without a (readable) name: still say it is that one.
            info!(action = %action, proto = %proto, src = %ev.src, dst = %ev.dst, reason = ?ev.reason,
                domain_source = ev.source.as_str(), "decision");
        } else if ev.names.is_empty() {
            info!(action = %action, proto = %proto, src = %ev.src, dst = %ev.dst, reason = ?ev.reason, "decision");
        } else {
            let names = ev.names.join(",");
            info!(
                action = %action, proto = %proto, src = %ev.src, dst = %ev.dst, reason = ?ev.reason,
                domains = %names, domain_source = ev.source.as_str(), "decision"
            );
        }
    }

    /// A summary line for `repeats` decisions of `key` that were not logged one by one.
    fn summarise(&mut self, key: AggKey, repeats: u64, now: Instant) {
        if repeats == 0 {
            return;
        }
        if !self.rate_allows(now) {
            self.rate_suppressed += repeats;
            return;
        }
        self.lines += 1;
        let (protocol, dst, allowed, _, reason) = key;
        let action = if allowed { "allow" } else { "deny" };
        info!(action = %action, proto = %protocol.name(), dst = %dst, reason = ?reason, repeats, window_secs = AGGREGATION_WINDOW.as_secs(), "decision repeated");
    }

    /// Writes the summaries of windows that ended, and the rate-limit report.
    pub fn flush(&mut self, now: Instant) {
        if let Some(audit) = &mut self.audit {
            audit.flush(now);
        }
        let ended: Vec<AggKey> = self
            .recent
            .iter()
            .filter(|(_, (at, _))| now.duration_since(*at) >= AGGREGATION_WINDOW)
            .map(|(k, _)| k.clone())
            .collect();
        for key in ended {
            if let Some((_, repeats)) = self.recent.pop(&key) {
                self.summarise(key, repeats, now);
            }
        }
        if self.rate_suppressed > 0 && self.rate_allows(now) {
            self.lines += 1;
            info!(
                suppressed = self.rate_suppressed,
                limit_per_sec = self.lines_per_sec,
                "decisions not logged (decision-log-rate)"
            );
            self.rate_suppressed = 0;
        }
    }
}

/// What the flow's caller says about room for it.
pub type Capacity = Result<(), String>;

/// The policy judge of one link, with its memories and its log.
pub struct Decider {
    policy: Arc<Policy>,
    denied: LruCache<(Protocol, FlowKey), Instant>,
    dns_allowed: LruCache<(Protocol, FlowKey), Instant>,
    memo_time: Duration,
    pub log: DecisionLog,
    /// New-flow frames answered from the denied memo (not judged again).
    pub memo_hits: u64,
}

impl Decider {
    pub fn new(
        policy: Arc<Policy>,
        memo_entries: usize,
        memo_time: Duration,
        log_rate: usize,
    ) -> Self {
        let cap = NonZeroUsize::new(memo_entries.max(1)).expect("nonzero");
        Decider {
            policy,
            denied: LruCache::new(cap),
            dns_allowed: LruCache::new(cap),
            memo_time,
            log: DecisionLog::new(log_rate),
            memo_hits: 0,
        }
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Denied flows remembered now.
    pub fn denied_memo_len(&self) -> usize {
        self.denied.len()
    }

    fn remembered(
        memo: &mut LruCache<(Protocol, FlowKey), Instant>,
        key: &(Protocol, FlowKey),
        memo_time: Duration,
        now: Instant,
    ) -> bool {
        match memo.get(key) {
            Some(at) if now.duration_since(*at) < memo_time => true,
            Some(_) => {
                memo.pop(key);
                false
            }
            None => false,
        }
    }

    /// Decides a new flow from `src` to `dst`; `names` are the DNS cache's names for `dst`
    /// (the names the guest asked decide; CNAME targets on the way can only deny).
    /// `capacity` is asked only for a flow the policy allows.
    pub fn decide(
        &mut self,
        protocol: Protocol,
        src: SocketAddr,
        dst: SocketAddr,
        names: &CachedNames,
        capacity: impl FnOnce() -> Capacity,
        now: Instant,
    ) -> bool {
        let memo = (protocol, (src, dst));
        if Self::remembered(&mut self.denied, &memo, self.memo_time, now) {
            self.memo_hits += 1;
            return false;
        }
        // A policy denial is remembered; a capacity denial is not (room may come back).
        let (allowed, reason, remember) = match self.judge_open(protocol, dst, names) {
            Ok(rule) => match capacity() {
                Ok(()) => (true, rule, false),
                Err(why) => (false, why, false),
            },
            Err(reason) => (false, reason, true),
        };
        self.log.record(
            &DecisionEvent {
                direction: Direction::Egress,
                protocol,
                src,
                dst,
                allowed,
                reason: &reason,
                names: &names.asked,
                source: NameSource::DnsCache,
            },
            now,
        );
        if remember {
            self.denied.put(memo, now);
        }
        allowed
    }

    /// Decides a connection (or a UDP peer) from host client `peer` through a published port
    /// to `guest` (the guest's address and port): the ingress rules on the peer's address and
    /// the guest port, then `ready` (the guest has an address of that family) and `capacity`,
    /// each asked only while the answer is still yes. Logged like egress decisions
    /// (`direction=ingress`); nothing is remembered (each connection is judged).
    pub fn decide_ingress(
        &mut self,
        protocol: Protocol,
        peer: SocketAddr,
        guest: SocketAddr,
        ready: impl FnOnce() -> Capacity,
        capacity: impl FnOnce() -> Capacity,
        now: Instant,
    ) -> bool {
        let query = FlowQuery {
            direction: Direction::Ingress,
            protocol,
            dst: peer.ip(),
            dst_port: Some(guest.port()),
            domains: &[],
        };
        let decision = self.policy.decide(&query);
        let (allowed, reason) = if !decision.allowed() {
            (false, decision.reason.to_string())
        } else {
            match ready().and_then(|()| capacity()) {
                Ok(()) => (true, decision.reason.to_string()),
                Err(why) => (false, why),
            }
        };
        self.log.record(
            &DecisionEvent {
                direction: Direction::Ingress,
                protocol,
                src: peer,
                dst: guest,
                allowed,
                reason: &reason,
                names: &[],
                source: NameSource::DnsCache,
            },
            now,
        );
        allowed
    }

    /// Whether a flow is remembered as denied (without counting it as a memo hit).
    pub fn is_remembered(&mut self, protocol: Protocol, key: FlowKey, now: Instant) -> bool {
        Self::remembered(&mut self.denied, &(protocol, key), self.memo_time, now)
    }

    /// Remembers a flow as refused without a policy decision (its host socket could not be
    /// opened): its retransmissions are not retried for `denied-memo-secs`.
    pub fn remember_refused(&mut self, protocol: Protocol, key: FlowKey, now: Instant) {
        self.denied.put((protocol, key), now);
    }

    /// Decides traffic to the DNS service once per (src, dst) pair.
    pub fn decide_dns(
        &mut self,
        protocol: Protocol,
        src: SocketAddr,
        dst: SocketAddr,
        capacity: impl FnOnce() -> Capacity,
        now: Instant,
    ) -> bool {
        let memo = (protocol, (src, dst));
        if Self::remembered(&mut self.dns_allowed, &memo, self.memo_time, now) {
            return true;
        }
        let allowed = self.decide(protocol, src, dst, &CachedNames::default(), capacity, now);
        if allowed {
            self.dns_allowed.put(memo, now);
        }
        allowed
    }

    /// Logs a decision made elsewhere (the SNI of a TLS flow).
    pub fn record(&mut self, ev: &DecisionEvent, now: Instant) {
        self.log.record(ev, now);
    }

    /// Judges a flow that is already open against the policy in force (after a reload): as
    /// [`Decider::decide`] would, but nothing is remembered, logged or counted. `Ok` carries
    /// the rule that allows it, `Err` the one that denies it.
    pub fn judge_open(
        &self,
        protocol: Protocol,
        dst: SocketAddr,
        names: &CachedNames,
    ) -> Result<String, String> {
        let query = FlowQuery {
            direction: Direction::Egress,
            protocol,
            dst: dst.ip(),
            dst_port: Some(dst.port()),
            domains: &names.asked,
        };
        let decision = names.decide(&self.policy, &query);
        if decision.allowed() && !guest_loopback(dst.ip()) {
            Ok(decision.reason.to_string())
        } else if decision.allowed() {
            Err(GUEST_LOOPBACK.to_string())
        } else {
            Err(decision.reason.to_string())
        }
    }

    /// Judges an open connection from host client `peer` through a published port to the
    /// guest's `guest_port` against the ingress rules in force (after a reload).
    pub fn judge_ingress_open(
        &self,
        protocol: Protocol,
        peer: SocketAddr,
        guest_port: u16,
    ) -> Result<String, String> {
        let decision = self.policy.decide(&FlowQuery {
            direction: Direction::Ingress,
            protocol,
            dst: peer.ip(),
            dst_port: Some(guest_port),
            domains: &[],
        });
        if decision.allowed() {
            Ok(decision.reason.to_string())
        } else {
            Err(decision.reason.to_string())
        }
    }

    /// Judges from now on with `policy` (a reload); what was remembered under the old one is
    /// forgotten.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
        self.clear();
    }

    /// Forgets every memory (the guest restarted).
    pub fn clear(&mut self) {
        self.denied.clear();
        self.dns_allowed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_counts_keep_a_bounded_number_of_reasons() {
        let mut log = DecisionLog::new(1000);
        let now = Instant::now();
        let reasons: Vec<String> = (0..DECISION_REASONS * 2)
            .map(|i| format!("SNI n{i}.example was not resolved"))
            .collect();
        for reason in &reasons {
            let mut e = ev("203.0.113.7:443", false);
            e.reason = reason;
            log.record(&e, now);
        }
        assert!(log.counts.len() <= DECISION_REASONS + 1);
        assert_eq!(log.counts.values().sum::<u64>(), reasons.len() as u64);
        assert_eq!(log.last_reason, *reasons.last().unwrap());
    }

    fn ev(dst: &str, allowed: bool) -> DecisionEvent<'static> {
        DecisionEvent {
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            src: "172.16.0.2:4000".parse().unwrap(),
            dst: dst.parse().unwrap(),
            allowed,
            reason: "test",
            names: &[],
            source: NameSource::DnsCache,
        }
    }

    #[test]
    fn repeats_are_aggregated_and_summarised_once() {
        let mut log = DecisionLog::new(1000);
        let t0 = Instant::now();
        for _ in 0..500 {
            log.record(&ev("203.0.113.7:80", false), t0);
        }
        assert_eq!(log.lines, 1);
        log.flush(t0 + AGGREGATION_WINDOW);
        assert_eq!(log.lines, 2, "one summary line for the 499 repeats");
        log.flush(t0 + AGGREGATION_WINDOW * 2);
        assert_eq!(log.lines, 2, "nothing more to summarise");
    }

    #[test]
    fn distinct_destinations_are_rate_limited() {
        let mut log = DecisionLog::new(10);
        let t0 = Instant::now();
        for port in 0..10_000u32 {
            let dst = format!("203.0.113.{}:{}", port % 250, 1000 + port / 250);
            log.record(&ev(&dst, false), t0);
        }
        assert!(log.lines <= 10, "{} lines", log.lines);
        log.flush(t0 + Duration::from_secs(1));
        assert!(log.lines <= 20, "{} lines", log.lines);
    }

    #[test]
    fn the_denied_memo_is_a_bounded_lru_and_capacity_denials_are_not_remembered() {
        let cfg = crate::config::NetworkConfig::default();
        let policy = Arc::new(
            cfg.compile_policy(&crate::policy::HostAddrs::default())
                .unwrap(),
        );
        let mut d = Decider::new(policy, 100, Duration::from_secs(30), 10);
        let t0 = Instant::now();
        let src: SocketAddr = "172.16.0.2:4000".parse().unwrap();
        let names = CachedNames::default();
        // 100k distinct private destinations, all denied: the memo never grows past 100.
        for i in 0..100_000u32 {
            let dst = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 80));
            assert!(!d.decide(Protocol::Tcp, src, dst, &names, || Ok(()), t0));
            assert!(d.denied_memo_len() <= 100);
        }
        // The last one is remembered, the first long forgotten.
        let last = SocketAddr::from(([10, 1, 134, 159], 80));
        let first = SocketAddr::from(([10, 0, 0, 0], 80));
        d.memo_hits = 0;
        assert!(!d.decide(Protocol::Tcp, src, last, &names, || Ok(()), t0));
        assert_eq!(d.memo_hits, 1);
        assert!(!d.decide(Protocol::Tcp, src, first, &names, || Ok(()), t0));
        assert_eq!(d.memo_hits, 1);
        // A public destination refused for capacity is not remembered: it passes next time.
        let public: SocketAddr = "203.0.113.7:80".parse().unwrap();
        let full = || Err("limit tcp-flows (0) reached".to_string());
        assert!(!d.decide(Protocol::Tcp, src, public, &names, full, t0));
        assert!(d.decide(Protocol::Tcp, src, public, &names, || Ok(()), t0));
    }

    #[test]
    fn the_guests_loopback_is_never_allowed() {
        use crate::policy::{Action, DenyAction, PolicyParts};
        // A policy that allows everything still never carries a flow to the guest's loopback.
        let parts = PolicyParts {
            preset: None,
            default_egress: Action::Allow,
            default_ingress: Action::Allow,
            preset_egress_default: false,
            preset_ingress_default: false,
            rules: Vec::new(),
            deny_domains: Vec::new(),
            deny_suffixes: Vec::new(),
            deny_action: DenyAction::Drop,
            max_connections: None,
        };
        let allow_all = Arc::new(Policy::new(parts, &crate::policy::HostAddrs::default()));
        let mut d = Decider::new(allow_all, 100, Duration::from_secs(30), 10);
        let t0 = Instant::now();
        let src: SocketAddr = "172.16.0.2:4000".parse().unwrap();
        let names = CachedNames::default();
        for dst in [
            "127.0.0.1:22",
            "127.9.9.9:80",
            "[::1]:22",
            "[::ffff:127.0.0.1]:22",
        ] {
            let dst: SocketAddr = dst.parse().unwrap();
            assert!(
                !d.decide(Protocol::Tcp, src, dst, &names, || Ok(()), t0),
                "{dst}"
            );
        }
        let public: SocketAddr = "203.0.113.7:80".parse().unwrap();
        assert!(d.decide(Protocol::Tcp, src, public, &names, || Ok(()), t0));
    }

    #[test]
    fn aggregation_keys_are_bounded() {
        let mut log = DecisionLog::new(usize::MAX);
        let t0 = Instant::now();
        for port in 0..5000u16 {
            log.record(&ev(&format!("203.0.113.7:{port}"), true), t0);
        }
        assert!(log.recent.len() <= AGGREGATION_KEYS);
    }
}
