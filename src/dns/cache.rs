//! The IP -> names cache that domain rules are judged against.
//!
//! Every A/AAAA record the guest receives from the DNS service is recorded here with the names
//! that led to it (the query name and every CNAME on the way). A new flow to an address is then
//! judged with the names the *guest itself* resolved for that address; an address the guest never
//! resolved through netfence has no names, so it matches no domain rule.
//!
//! Bounded: at most `capacity` addresses and `MAX_NAMES_PER_IP` names per address. An entry's
//! lifetime is the record TTL with a floor of [`MIN_CACHE_TTL`] (a guest may open its connection
//! a moment after a TTL-0 answer). When full, the address touched least recently is evicted.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::names::normalize_name;

/// Entries live at least this long, whatever the record TTL says.
pub const MIN_CACHE_TTL: Duration = Duration::from_secs(10);
/// Default number of addresses kept.
pub const DEFAULT_CACHE_CAPACITY: usize = 4096;
/// Names kept per address (a shared CDN address can have many names; the newest win).
pub const MAX_NAMES_PER_IP: usize = 16;
/// How many of the least recently updated addresses eviction looks at for an expired one.
const EVICTION_SCAN: usize = 32;

#[derive(Debug)]
struct Entry {
    names: Vec<(String, Instant)>,
    tick: u64,
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

    /// Records that `name` resolved to `ip` with the given TTL.
    pub fn insert(&mut self, name: &str, ip: IpAddr, ttl: Duration, now: Instant) {
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

        entry.names.retain(|(_, exp)| *exp > now);
        if let Some(slot) = entry.names.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = slot.1.max(expires);
            return;
        }
        if entry.names.len() >= MAX_NAMES_PER_IP {
            // Drop the name that expires first.
            if let Some(idx) = entry
                .names
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, exp))| *exp)
                .map(|(i, _)| i)
            {
                entry.names.swap_remove(idx);
            }
        }
        entry.names.push((name, expires));
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
                    .is_some_and(|e| e.names.iter().all(|(_, exp)| *exp <= now))
            })
            .copied();
        let victim = expired.or_else(|| self.order.values().next().copied());
        if let Some(ip) = victim {
            if let Some(entry) = self.entries.remove(&ip) {
                self.order.remove(&entry.tick);
            }
        }
    }

    /// The names the guest resolved to `ip` that have not expired at `now`.
    pub fn names_for(&self, ip: IpAddr, now: Instant) -> Vec<String> {
        self.entries
            .get(&ip)
            .map(|e| {
                e.names
                    .iter()
                    .filter(|(_, exp)| *exp > now)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True when the guest resolved `name` (normalized here) to `ip` and that has not expired.
    pub fn resolved(&self, name: &str, ip: IpAddr, now: Instant) -> bool {
        let name = normalize_name(name);
        self.entries
            .get(&ip)
            .is_some_and(|e| e.names.iter().any(|(n, exp)| *n == name && *exp > now))
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
}
