//! The IP -> names cache that domain rules are judged against.
//!
//! Every A/AAAA record the guest receives from the DNS service is recorded here under the name
//! the guest *asked* (the question). The CNAME targets on the way from the question to the
//! record are recorded too, but as *aliases*: the zone of the asked name chose them, so they
//! may be anything (`evil.example CNAME good.com` is one line in the attacker's zone). An alias
//! can therefore only make a decision stricter, never satisfy an allow rule:
//!
//! - [`NameCache::names_for`] and [`NameCache::resolved`] see asked names only: what `allow`
//!   rules and the TLS "SNI resolved through netfence" check are judged with;
//! - [`NameCache::lookup`] returns both, and [`CachedNames::decide`] judges a flow with the
//!   asked names, then lets a domain deny rule that matches an alias override an allow.
//!
//! A new flow to an address is judged with the names the *guest itself* resolved for that
//! address; an address the guest never resolved through netfence has no names, so it matches
//! no domain rule. Addresses are stored and looked up in their canonical form
//! ([`crate::policy::canonical`]): `::ffff:203.0.113.7` finds what `203.0.113.7` resolved to.
//!
//! Bounded: at most `capacity` addresses and `MAX_NAMES_PER_IP` names per address. An entry's
//! lifetime is the record TTL with a floor of [`MIN_CACHE_TTL`] (a guest may open its connection
//! a moment after a TTL-0 answer). When full, the address touched least recently is evicted;
//! within an address, alias-only names go before asked ones, the soonest to expire first.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::names::normalize_name;
use crate::policy::{canonical, Decision, FlowQuery, Policy};

/// Entries live at least this long, whatever the record TTL says.
pub const MIN_CACHE_TTL: Duration = Duration::from_secs(10);
/// Default number of addresses kept.
pub const DEFAULT_CACHE_CAPACITY: usize = 4096;
/// Names kept per address (a shared CDN address can have many names; the newest win).
pub const MAX_NAMES_PER_IP: usize = 16;
/// How many of the least recently updated addresses eviction looks at for an expired one.
const EVICTION_SCAN: usize = 32;

/// How a name came to be bound to an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NameRole {
    /// The name the guest asked (the question of the query the address answered).
    Asked,
    /// A CNAME target on the chain from the asked name to the address: chosen by the asked
    /// name's zone, so it may only make a decision stricter.
    Alias,
}

#[derive(Debug)]
struct NameSlot {
    name: String,
    /// Until when the name is held as asked / as an alias (`None`: never bound that way).
    asked_until: Option<Instant>,
    alias_until: Option<Instant>,
}

impl NameSlot {
    fn asked_at(&self, now: Instant) -> bool {
        self.asked_until.is_some_and(|t| t > now)
    }

    fn alias_at(&self, now: Instant) -> bool {
        self.alias_until.is_some_and(|t| t > now)
    }

    fn live_at(&self, now: Instant) -> bool {
        self.asked_at(now) || self.alias_at(now)
    }

    /// Eviction order within an address: alias-only names first, then the soonest to expire.
    fn keep_rank(&self) -> (bool, Option<Instant>) {
        (
            self.asked_until.is_some(),
            self.asked_until.max(self.alias_until),
        )
    }
}

#[derive(Debug)]
struct Entry {
    names: Vec<NameSlot>,
    tick: u64,
}

/// The names the guest holds for one address (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CachedNames {
    /// Names the guest asked that resolved to the address.
    pub asked: Vec<String>,
    /// CNAME targets on the way to the address that are not also asked names.
    pub aliases: Vec<String>,
}

impl CachedNames {
    pub fn is_empty(&self) -> bool {
        self.asked.is_empty() && self.aliases.is_empty()
    }

    /// Judges a flow with these names: `query.domains` is replaced by the asked names; when that
    /// allows, the aliases are judged alone and a denial by a domain rule (or deny list) wins.
    /// So an alias never satisfies an allow rule, and a deny rule naming a CNAME target still
    /// blocks the flow, as when every name on the chain counted.
    pub fn decide(&self, policy: &Policy, query: &FlowQuery) -> Decision {
        let asked = FlowQuery {
            domains: &self.asked,
            ..*query
        };
        let decision = policy.decide(&asked);
        if !decision.allowed() || self.aliases.is_empty() {
            return decision;
        }
        let aliases = FlowQuery {
            domains: &self.aliases,
            ..*query
        };
        let by_alias = policy.decide(&aliases);
        if !by_alias.allowed() && policy.is_domain_rule(&by_alias.reason) {
            return by_alias;
        }
        decision
    }
}

/// Bounded IP -> names map with TTLs and least-recently-updated eviction.
#[derive(Debug)]
pub struct NameCache {
    capacity: usize,
    entries: HashMap<IpAddr, Entry>,
    /// update tick -> address; the first entry is the eviction candidate.
    order: BTreeMap<u64, IpAddr>,
    tick: u64,
}

impl Default for NameCache {
    fn default() -> Self {
        Self::new(DEFAULT_CACHE_CAPACITY)
    }
}

impl NameCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
        }
    }

    /// Records that the guest asked `name` and it resolved to `ip` with the given TTL.
    pub fn insert(&mut self, name: &str, ip: IpAddr, ttl: Duration, now: Instant) {
        self.insert_as(name, NameRole::Asked, ip, ttl, now);
    }

    /// Records that `name` was bound to `ip` in the given role.
    pub fn insert_as(
        &mut self,
        name: &str,
        role: NameRole,
        ip: IpAddr,
        ttl: Duration,
        now: Instant,
    ) {
        let ip = canonical(ip);
        let name = normalize_name(name);
        let ttl = ttl.max(MIN_CACHE_TTL);
        let expires = now.checked_add(ttl).unwrap_or(now + MIN_CACHE_TTL);
        self.tick += 1;
        let tick = self.tick;

        if !self.entries.contains_key(&ip) && self.entries.len() >= self.capacity {
            self.evict_one(now);
        }
        let entry = self.entries.entry(ip).or_insert(Entry {
            names: Vec::new(),
            tick,
        });
        self.order.remove(&entry.tick);
        entry.tick = tick;
        self.order.insert(tick, ip);

        entry.names.retain(|slot| slot.live_at(now));
        let slot = match entry.names.iter().position(|slot| slot.name == name) {
            Some(i) => &mut entry.names[i],
            None => {
                if entry.names.len() >= MAX_NAMES_PER_IP {
                    if let Some(idx) = entry
                        .names
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, slot)| slot.keep_rank())
                        .map(|(i, _)| i)
                    {
                        entry.names.swap_remove(idx);
                    }
                }
                entry.names.push(NameSlot {
                    name,
                    asked_until: None,
                    alias_until: None,
                });
                let last = entry.names.len() - 1;
                &mut entry.names[last]
            }
        };
        let until = match role {
            NameRole::Asked => &mut slot.asked_until,
            NameRole::Alias => &mut slot.alias_until,
        };
        *until = Some(until.map_or(expires, |t| t.max(expires)));
    }

    fn evict_one(&mut self, now: Instant) {
        // Prefer an address whose names have all expired; otherwise the least recently updated.
        // Only the oldest few are examined, to keep an insert cheap when the cache is full.
        let expired = self
            .order
            .values()
            .take(EVICTION_SCAN)
            .find(|ip| {
                self.entries
                    .get(ip)
                    .is_some_and(|e| e.names.iter().all(|slot| !slot.live_at(now)))
            })
            .copied();
        let victim = expired.or_else(|| self.order.values().next().copied());
        if let Some(ip) = victim {
            if let Some(entry) = self.entries.remove(&ip) {
                self.order.remove(&entry.tick);
            }
        }
    }

    /// The names the guest asked that resolved to `ip` (any spelling of it) and have not
    /// expired at `now`. CNAME targets are not among them (see [`Self::lookup`]).
    pub fn names_for(&self, ip: IpAddr, now: Instant) -> Vec<String> {
        self.lookup(ip, now).asked
    }

    /// Every live name bound to `ip` (any spelling of it), by role.
    pub fn lookup(&self, ip: IpAddr, now: Instant) -> CachedNames {
        let mut out = CachedNames::default();
        if let Some(entry) = self.entries.get(&canonical(ip)) {
            for slot in &entry.names {
                if slot.asked_at(now) {
                    out.asked.push(slot.name.clone());
                } else if slot.alias_at(now) {
                    out.aliases.push(slot.name.clone());
                }
            }
        }
        out
    }

    /// True when the guest asked `name` (normalized here) and it resolved to `ip` (any spelling
    /// of it), not expired. A name seen only as a CNAME target does not count.
    pub fn resolved(&self, name: &str, ip: IpAddr, now: Instant) -> bool {
        let name = normalize_name(name);
        self.entries.get(&canonical(ip)).is_some_and(|e| {
            e.names
                .iter()
                .any(|slot| slot.name == name && slot.asked_at(now))
        })
    }

    /// Number of addresses held (expired ones included until evicted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn insert_and_lookup_normalized() {
        let mut cache = NameCache::new(8);
        let now = Instant::now();
        cache.insert(
            "API.Example.com.",
            ip("203.0.113.5"),
            Duration::from_secs(60),
            now,
        );
        assert_eq!(
            cache.names_for(ip("203.0.113.5"), now),
            vec!["api.example.com"]
        );
        assert!(cache.resolved("api.example.COM", ip("203.0.113.5"), now));
        assert!(!cache.resolved("other.example.com", ip("203.0.113.5"), now));
        assert!(!cache.resolved("api.example.com", ip("203.0.113.6"), now));
        assert!(cache.names_for(ip("198.51.100.1"), now).is_empty());
    }

    #[test]
    fn ttl_has_a_floor_and_expires() {
        let mut cache = NameCache::new(8);
        let now = Instant::now();
        cache.insert("a.example", ip("203.0.113.1"), Duration::ZERO, now);
        assert!(cache.resolved("a.example", ip("203.0.113.1"), now + MIN_CACHE_TTL / 2));
        assert!(!cache.resolved("a.example", ip("203.0.113.1"), now + MIN_CACHE_TTL));
        cache.insert(
            "b.example",
            ip("203.0.113.2"),
            Duration::from_secs(100),
            now,
        );
        assert!(cache.resolved(
            "b.example",
            ip("203.0.113.2"),
            now + Duration::from_secs(99)
        ));
        assert!(cache
            .names_for(ip("203.0.113.2"), now + Duration::from_secs(100))
            .is_empty());
    }

    #[test]
    fn bounded_by_capacity_evicting_least_recent() {
        let mut cache = NameCache::new(3);
        let now = Instant::now();
        let ttl = Duration::from_secs(300);
        cache.insert("a", ip("203.0.113.1"), ttl, now);
        cache.insert("b", ip("203.0.113.2"), ttl, now);
        cache.insert("c", ip("203.0.113.3"), ttl, now);
        // refresh .1 so that .2 is now the oldest
        cache.insert("a2", ip("203.0.113.1"), ttl, now);
        cache.insert("d", ip("203.0.113.4"), ttl, now);
        assert_eq!(cache.len(), 3);
        assert!(cache.names_for(ip("203.0.113.2"), now).is_empty());
        let mut names = cache.names_for(ip("203.0.113.1"), now);
        names.sort();
        assert_eq!(names, vec!["a", "a2"]);
        assert!(cache.resolved("d", ip("203.0.113.4"), now));
    }

    #[test]
    fn expired_entries_are_evicted_first() {
        let mut cache = NameCache::new(2);
        let now = Instant::now();
        cache.insert("old", ip("203.0.113.1"), Duration::from_secs(1000), now);
        cache.insert("short", ip("203.0.113.2"), Duration::ZERO, now);
        let later = now + MIN_CACHE_TTL + Duration::from_secs(1);
        cache.insert("new", ip("203.0.113.3"), Duration::from_secs(60), later);
        assert!(cache.resolved("old", ip("203.0.113.1"), later));
        assert!(cache.resolved("new", ip("203.0.113.3"), later));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn names_per_ip_are_bounded() {
        let mut cache = NameCache::new(2);
        let now = Instant::now();
        for i in 0..(MAX_NAMES_PER_IP + 5) {
            cache.insert(
                &format!("n{i}.example"),
                ip("203.0.113.9"),
                Duration::from_secs(100 + i as u64),
                now,
            );
        }
        let names = cache.names_for(ip("203.0.113.9"), now);
        assert_eq!(names.len(), MAX_NAMES_PER_IP);
        assert!(names.contains(&format!("n{}.example", MAX_NAMES_PER_IP + 4)));
        assert!(!names.contains(&"n0.example".to_string()));
    }
    #[test]
    fn any_spelling_of_an_address_finds_its_names() {
        let mut cache = NameCache::new(8);
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        cache.insert("v4.example", ip("203.0.113.7"), ttl, now);
        for spelling in ["203.0.113.7", "::ffff:203.0.113.7", "::ffff:cb00:7107"] {
            assert_eq!(
                cache.names_for(ip(spelling), now),
                vec!["v4.example"],
                "{spelling}"
            );
            assert!(
                cache.resolved("v4.example", ip(spelling), now),
                "{spelling}"
            );
        }
        // Inserted under the mapped spelling: one entry, found by the plain one.
        cache.insert("mapped.example", ip("::ffff:198.51.100.1"), ttl, now);
        assert!(cache.resolved("mapped.example", ip("198.51.100.1"), now));
        cache.insert("again.example", ip("198.51.100.1"), ttl, now);
        assert_eq!(cache.len(), 2);
        // A real IPv6 address stays itself.
        cache.insert("v6.example", ip("2001:db8::7"), ttl, now);
        assert!(cache.resolved("v6.example", ip("2001:db8::7"), now));
        assert!(!cache.resolved("v6.example", ip("0.0.0.7"), now));
    }

    #[test]
    fn aliases_are_not_asked_names() {
        let mut cache = NameCache::new(8);
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let addr = ip("203.0.113.9");
        cache.insert("evil.example", addr, ttl, now);
        cache.insert_as("good.com", NameRole::Alias, addr, ttl, now);
        assert_eq!(cache.names_for(addr, now), vec!["evil.example"]);
        assert!(!cache.resolved("good.com", addr, now));
        assert_eq!(
            cache.lookup(addr, now),
            CachedNames {
                asked: vec!["evil.example".into()],
                aliases: vec!["good.com".into()],
            }
        );
        // Once the guest asks good.com itself, it is an asked name.
        cache.insert("good.com", addr, ttl, now);
        assert!(cache.resolved("good.com", addr, now));
        let names = cache.lookup(addr, now);
        assert!(names.aliases.is_empty(), "{names:?}");
        assert_eq!(names.asked.len(), 2);
    }

    #[test]
    fn alias_names_are_evicted_before_asked_ones() {
        let mut cache = NameCache::new(2);
        let now = Instant::now();
        let addr = ip("203.0.113.10");
        cache.insert("asked.example", addr, Duration::from_secs(20), now);
        for i in 0..(MAX_NAMES_PER_IP + 4) {
            cache.insert_as(
                &format!("alias{i}.example"),
                NameRole::Alias,
                addr,
                Duration::from_secs(1000),
                now,
            );
        }
        assert!(cache.resolved("asked.example", addr, now));
        assert_eq!(cache.lookup(addr, now).aliases.len(), MAX_NAMES_PER_IP - 1);
    }
    fn policy(rules: &[&str]) -> Policy {
        use crate::config::{NetworkConfig, PolicySpec, PolicyTable, RuleSpec};
        use crate::policy::{Action, HostAddrs};
        let cfg = NetworkConfig {
            policy: Some(PolicySpec::Table(PolicyTable {
                preset: None,
                default_egress: Some(Action::Deny),
                default_ingress: Some(Action::Allow),
                rules: rules
                    .iter()
                    .map(|r| RuleSpec::parse_cli(r).unwrap())
                    .collect(),
            })),
            ..Default::default()
        };
        cfg.compile_policy(&HostAddrs::default()).unwrap()
    }

    fn tcp_to(dst: &str, port: u16) -> FlowQuery<'static> {
        use crate::policy::{Direction, Protocol};
        FlowQuery {
            direction: Direction::Egress,
            protocol: Protocol::Tcp,
            dst: ip(dst),
            dst_port: Some(port),
            domains: &[],
        }
    }

    #[test]
    fn an_alias_never_satisfies_an_allow_rule() {
        let p = policy(&["allow@good.com"]);
        let names = CachedNames {
            asked: vec!["evil.example".into()],
            aliases: vec!["good.com".into()],
        };
        let d = names.decide(&p, &tcp_to("203.0.113.9", 443));
        assert!(!d.allowed(), "{d}");
        // Asked, it does.
        let names = CachedNames {
            asked: vec!["good.com".into()],
            aliases: vec![],
        };
        assert!(names.decide(&p, &tcp_to("203.0.113.9", 443)).allowed());
    }

    #[test]
    fn a_deny_rule_on_an_alias_still_blocks() {
        // The port-filtered deny is not an NXDOMAIN at the resolver; the flow must be denied.
        let p = policy(&["deny@tracker.example:tcp:80", "allow@public"]);
        let names = CachedNames {
            asked: vec!["news.example".into()],
            aliases: vec!["tracker.example".into()],
        };
        let d = names.decide(&p, &tcp_to("203.0.113.9", 80));
        assert!(!d.allowed(), "{d}");
        assert!(p.is_domain_rule(&d.reason), "{d}");
        // Other ports of the same address stay allowed.
        assert!(names.decide(&p, &tcp_to("203.0.113.9", 443)).allowed());
        // First match still wins, as when every name on the chain counted: an earlier allow
        // rule for the address is not overridden by a later deny naming the alias.
        let p = policy(&["allow@public", "deny@tracker.example"]);
        assert!(names.decide(&p, &tcp_to("203.0.113.9", 80)).allowed());
    }
}
