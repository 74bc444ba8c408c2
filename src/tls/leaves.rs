//! The leaf certificates of one link, cached per server name.
//!
//! Issuing a leaf costs a key generation and a signature, so the leaf made for a name is kept
//! and shown to every later connection to that name. The guest chooses the names, so the cache
//! is bounded: at most `tls-leaf-cache` names ([`crate::limits::Limits::tls_leaf_cache`]), the
//! least recently used one evicted in O(1) (an `lru::LruCache`). A cached leaf is reissued once
//! it is within [`REISSUE_MARGIN`] of its end (or the clock has gone back before its start), so
//! a guest never sees one that is about to expire. One cache per link, owned by the link's
//! thread: no lock.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lru::LruCache;
use rustls::sign::CertifiedKey;

use super::ca::{CaError, InterceptionCa, Leaf};

/// A cached leaf is replaced when it has less than this left: a day of its
/// [`super::ca::LEAF_VALIDITY`] of three.
pub const REISSUE_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// Leaves by lower-case server name, bounded, least recently used evicted.
pub struct LeafCache {
    ca: Arc<InterceptionCa>,
    leaves: LruCache<String, Leaf>,
    issued: u64,
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("len", &self.leaves.len())
            .field("capacity", &self.leaves.cap())
            .field("issued", &self.issued)
            .finish()
    }
}

impl LeafCache {
    /// A cache of at most `capacity` leaves (at least one) signed by `ca`.
    pub fn new(ca: Arc<InterceptionCa>, capacity: usize) -> LeafCache {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        LeafCache {
            ca,
            leaves: LruCache::new(capacity),
            issued: 0,
        }
    }

    /// The leaf for `name` (any case; a trailing dot is ignored) valid at `now`: the cached one
    /// while it has more than [`REISSUE_MARGIN`] left, else a new one, which replaces it (or
    /// evicts the least recently used name when the cache is full).
    pub fn certified_key(
        &mut self,
        name: &str,
        now: SystemTime,
    ) -> Result<Arc<CertifiedKey>, CaError> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if let Some(leaf) = self.leaves.get(&name) {
            let fresh = now >= leaf.not_before
                && now
                    .checked_add(REISSUE_MARGIN)
                    .is_some_and(|t| t < leaf.not_after);
            if fresh {
                return Ok(leaf.certified.clone());
            }
        }
        let leaf = self.ca.issue_leaf(&name, now)?;
        self.issued += 1;
        let key = leaf.certified.clone();
        self.leaves.put(name, leaf);
        Ok(key)
    }

    /// Names cached now.
    pub fn len(&self) -> usize {
        self.leaves.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// The most names kept.
    pub fn capacity(&self) -> usize {
        self.leaves.cap().get()
    }

    /// Leaves issued since the cache was made (misses and reissues).
    pub fn issued(&self) -> u64 {
        self.issued
    }
}

#[cfg(test)]
mod tests {
    use super::super::ca::LEAF_VALIDITY;
    use super::*;

    fn cache(capacity: usize) -> LeafCache {
        LeafCache::new(
            Arc::new(InterceptionCa::generate("leaf cache test").unwrap()),
            capacity,
        )
    }

    #[test]
    fn one_leaf_per_name_whatever_its_case() {
        let mut c = cache(8);
        let now = SystemTime::now();
        let a = c.certified_key("api.example.com", now).unwrap();
        let b = c.certified_key("API.Example.COM.", now).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!((c.len(), c.issued()), (1, 1));
        let other = c.certified_key("other.example.com", now).unwrap();
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!((c.len(), c.issued()), (2, 2));
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_the_least_recently_used() {
        let mut c = cache(3);
        let now = SystemTime::now();
        let first = c.certified_key("n0.example", now).unwrap();
        for i in 1..3 {
            c.certified_key(&format!("n{i}.example"), now).unwrap();
        }
        // Touch n0, so n1 is now the least recently used.
        assert!(Arc::ptr_eq(
            &first,
            &c.certified_key("n0.example", now).unwrap()
        ));
        for i in 3..20 {
            c.certified_key(&format!("n{i}.example"), now).unwrap();
            assert!(c.len() <= 3, "{} names cached", c.len());
        }
        assert_eq!(c.len(), 3);
        assert_eq!(c.capacity(), 3);
        // n0 went out too after enough new names; asking again issues a new one.
        let issued = c.issued();
        let again = c.certified_key("n0.example", now).unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(c.issued(), issued + 1);
    }

    #[test]
    fn a_recently_used_name_survives_a_newcomer() {
        let mut c = cache(2);
        let now = SystemTime::now();
        let a = c.certified_key("a.example", now).unwrap();
        c.certified_key("b.example", now).unwrap();
        c.certified_key("a.example", now).unwrap();
        c.certified_key("c.example", now).unwrap(); // evicts b, not a
        let issued = c.issued();
        assert!(Arc::ptr_eq(&a, &c.certified_key("a.example", now).unwrap()));
        assert_eq!(c.issued(), issued);
    }

    #[test]
    fn a_leaf_is_reissued_before_it_expires() {
        let mut c = cache(4);
        let t0 = SystemTime::now();
        let first = c.certified_key("api.example.com", t0).unwrap();
        // Just before the margin: still the same leaf.
        let before = t0 + LEAF_VALIDITY - REISSUE_MARGIN - Duration::from_secs(60);
        assert!(Arc::ptr_eq(
            &first,
            &c.certified_key("api.example.com", before).unwrap()
        ));
        // Within the margin: a new leaf, valid well past that moment.
        let within = t0 + LEAF_VALIDITY - REISSUE_MARGIN + Duration::from_secs(60);
        let second = c.certified_key("api.example.com", within).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(c.issued(), 2);
        assert_eq!(c.len(), 1);
        let (_, x) = x509_parser::parse_x509_certificate(&second.cert[0]).unwrap();
        let end = x.validity().not_after.timestamp();
        let within_secs = within
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert_eq!(end, within_secs + LEAF_VALIDITY.as_secs() as i64);
        // And it is kept from then on.
        assert!(Arc::ptr_eq(
            &second,
            &c.certified_key("api.example.com", within).unwrap()
        ));
    }

    #[test]
    fn a_clock_gone_back_before_the_leaf_gets_a_new_one() {
        let mut c = cache(4);
        let t0 = SystemTime::now();
        let first = c.certified_key("api.example.com", t0).unwrap();
        let earlier = t0 - Duration::from_secs(2 * 3600);
        let second = c.certified_key("api.example.com", earlier).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
    }

    #[test]
    fn bad_names_are_errors_and_are_not_cached() {
        let mut c = cache(4);
        assert!(c.certified_key("not a name", SystemTime::now()).is_err());
        assert!(c.is_empty());
    }
}
