//! Which queue pair owns each flow of a multiqueue VM.
//!
//! With `--queues N` every pair has its own link and flow table on its own thread. A flow
//! belongs to the pair that saw its opening frame (the guest's own spreading decides: Linux
//! keeps a flow on the TX queue of the CPU that sent it). A frame that reaches another pair,
//! because its sender moved to another CPU, is handed to the owner, which it finds here.
//!
//! The map is sharded behind mutexes: a pair looks here only when a frame misses its own
//! table (a new flow, or a flow that switched queues), and the table releases a key when its
//! flow leaves, so the common path (a frame of a flow the pair owns) never takes a lock. The
//! map holds at most as many keys as the pairs' tables hold flows, each bounded by its limits.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::table::FlowRef;

const SHARDS: usize = 16;

/// Owners of the flows of one VM: flow key -> queue pair.
pub struct Owners {
    shards: Vec<Mutex<HashMap<FlowRef, u16, foldhash::fast::RandomState>>>,
    hasher: foldhash::fast::RandomState,
}

impl Default for Owners {
    fn default() -> Self {
        Owners {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(Default::default())))
                .collect(),
            hasher: Default::default(),
        }
    }
}

impl Owners {
    fn shard(
        &self,
        key: &FlowRef,
    ) -> std::sync::MutexGuard<'_, HashMap<FlowRef, u16, foldhash::fast::RandomState>> {
        let mut h = self.hasher.build_hasher();
        key.hash(&mut h);
        let i = (std::hash::Hasher::finish(&h) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pair that owns `key`, if any.
    pub fn get(&self, key: &FlowRef) -> Option<u16> {
        self.shard(key).get(key).copied()
    }

    /// Makes `pair` the owner of `key` unless another pair already is; returns the owner.
    pub fn claim(&self, key: FlowRef, pair: u16) -> u16 {
        *self.shard(&key).entry(key).or_insert(pair)
    }

    /// Forgets `key` if `pair` owns it (the flow left that pair's table).
    pub fn release(&self, key: &FlowRef, pair: u16) {
        let mut shard = self.shard(key);
        if shard.get(key) == Some(&pair) {
            shard.remove(key);
        }
    }

    /// Forgets every key `pair` owns (its table was cleared).
    pub fn release_all(&self, pair: u16) {
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, owner| *owner != pair);
        }
    }

    /// Keys owned, all pairs together.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The flow counts of every pair of a multiqueue VM, so that the per-VM budgets (`tcp-flows`,
/// `udp-flows`, `icmp-flows`, `inbound-tcp`, `max_connections`) hold for the VM as a whole.
///
/// Each pair publishes its own counts (one writer per slot) when it asks for room and when a
/// flow leaves, counting the flow it is about to open; a pair asking for room adds the others'
/// published counts to its own. Two pairs opening flows at the very same moment may each miss
/// the other's newest flow, so the VM may exceed a budget by at most one flow per other pair.
pub struct PairCounts {
    slots: Vec<[AtomicUsize; KINDS]>,
}

/// What [`PairCounts`] counts.
#[derive(Clone, Copy, Debug)]
pub enum Counted {
    Tcp = 0,
    Udp = 1,
    Echo = 2,
    InboundTcp = 3,
}
const KINDS: usize = 4;

impl PairCounts {
    pub fn new(pairs: usize) -> Self {
        PairCounts {
            slots: (0..pairs).map(|_| Default::default()).collect(),
        }
    }

    /// Pair `pair`'s counts now.
    pub fn publish(&self, pair: u16, counts: [usize; KINDS]) {
        if let Some(slot) = self.slots.get(usize::from(pair)) {
            for (a, n) in slot.iter().zip(counts) {
                a.store(n, Ordering::Release);
            }
        }
    }

    /// What the pairs other than `pair` published of `kind`.
    pub fn others(&self, pair: u16, kind: Counted) -> usize {
        self.slots
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != usize::from(pair))
            .map(|(_, s)| s[kind as usize].load(Ordering::Acquire))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(port: u16) -> FlowRef {
        FlowRef::Tcp((([10, 0, 0, 2], port).into(), ([192, 0, 2, 1], 80).into()))
    }

    #[test]
    fn first_claim_wins_and_only_the_owner_releases() {
        let owners = Owners::default();
        assert_eq!(owners.claim(key(1), 1), 1);
        assert_eq!(owners.claim(key(1), 0), 1);
        owners.release(&key(1), 0);
        assert_eq!(owners.get(&key(1)), Some(1));
        owners.release(&key(1), 1);
        assert_eq!(owners.get(&key(1)), None);
        assert!(owners.is_empty());
    }

    #[test]
    fn racing_claims_agree_on_one_owner() {
        let owners = Arc::new(Owners::default());
        let threads: Vec<_> = (0..2u16)
            .map(|pair| {
                let owners = owners.clone();
                std::thread::spawn(move || {
                    (0..2000u16)
                        .map(|p| owners.claim(key(p), pair))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let seen: Vec<Vec<u16>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(
            seen[0], seen[1],
            "both threads must see the same owner of each key"
        );
        assert_eq!(owners.len(), 2000);
        owners.release_all(0);
        owners.release_all(1);
        assert!(owners.is_empty());
    }
}
