//! Conversation affinity: key → (endpoint, model, expiry), bounded.
//!
//! When full, an insert first evicts expired entries (earliest expiry
//! first), then the least recently used one. Lookups of expired entries miss.
//! Invariants: `map`, `lru` and `by_expiry` always hold the same entries
//! (each entry's `seq` and `expires` are its keys in the two orders), and
//! `map.len() <= max`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Instant,
};

/// Where a conversation went last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinityEntry {
    /// Endpoint index.
    pub endpoint: u32,
    /// Usage slot (endpoint, tracking model).
    pub slot: u32,
    /// Tracking model name.
    pub model: Arc<str>,
    /// Expiry.
    pub expires: Instant,
    seq: u64,
}

/// The bounded table.
#[derive(Debug)]
pub struct AffinityTable {
    max: usize,
    map: HashMap<Arc<str>, AffinityEntry>,
    lru: BTreeMap<u64, Arc<str>>,
    by_expiry: BTreeMap<(Instant, u64), Arc<str>>,
    next_seq: u64,
}

impl AffinityTable {
    /// An empty table holding at most `max` entries (0 holds none).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            map: HashMap::new(),
            lru: BTreeMap::new(),
            by_expiry: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// The live entry for `key`, if any.
    pub fn get(&self, key: &str, now: Instant) -> Option<&AffinityEntry> {
        self.map.get(key).filter(|e| e.expires > now)
    }

    /// Records (or refreshes) `key` → (endpoint, slot, model) until `expires`.
    pub fn record(
        &mut self,
        key: &str,
        endpoint: u32,
        slot: u32,
        model: &Arc<str>,
        expires: Instant,
        now: Instant,
    ) {
        if self.max == 0 {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some((k, e)) = self.map.get_key_value(key) {
            let k = k.clone();
            self.lru.remove(&e.seq);
            self.by_expiry.remove(&(e.expires, e.seq));
            self.lru.insert(seq, k.clone());
            self.by_expiry.insert((expires, seq), k.clone());
            self.map.insert(
                k,
                AffinityEntry {
                    endpoint,
                    slot,
                    model: model.clone(),
                    expires,
                    seq,
                },
            );
            return;
        }
        if self.map.len() >= self.max {
            self.purge_expired(now);
        }
        while self.map.len() >= self.max {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            if let Some(e) = self.map.remove(&victim) {
                self.by_expiry.remove(&(e.expires, e.seq));
            }
        }
        let k: Arc<str> = Arc::from(key);
        self.lru.insert(seq, k.clone());
        self.by_expiry.insert((expires, seq), k.clone());
        self.map.insert(
            k,
            AffinityEntry {
                endpoint,
                slot,
                model: model.clone(),
                expires,
                seq,
            },
        );
    }

    /// Drops expired entries; returns how many.
    pub fn purge_expired(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, seq), key) = entry.remove_entry();
            self.lru.remove(&seq);
            self.map.remove(&key);
            n += 1;
        }
        n
    }

    /// Entries held (expired ones may linger until purged or evicted).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Up to `limit` live entries, most recently used first.
    pub fn sample(&self, limit: usize, now: Instant) -> Vec<(&Arc<str>, &AffinityEntry)> {
        self.lru
            .values()
            .rev()
            .filter_map(|k| self.map.get_key_value(k))
            .filter(|(_, e)| e.expires > now)
            .take(limit)
            .collect()
    }

    /// Live (unexpired) entries.
    pub fn live(&self, now: Instant) -> usize {
        self.map.values().filter(|e| e.expires > now).count()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::time::Duration;

    use super::*;

    fn sec(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn check(t: &AffinityTable) {
        assert_eq!(t.map.len(), t.lru.len());
        assert_eq!(t.map.len(), t.by_expiry.len());
        assert!(t.map.len() <= t.max);
        for (k, e) in &t.map {
            assert_eq!(t.lru.get(&e.seq), Some(k));
            assert_eq!(t.by_expiry.get(&(e.expires, e.seq)), Some(k));
        }
    }

    #[test]
    fn evicts_expired_first_then_least_recently_used() {
        let t0 = Instant::now();
        let m: Arc<str> = Arc::from("m");
        let mut t = AffinityTable::new(3);
        // "short" expires early but is the most recently recorded.
        t.record("a", 0, 0, &m, t0 + sec(100), t0);
        t.record("b", 1, 0, &m, t0 + sec(100), t0);
        t.record("short", 2, 0, &m, t0 + sec(5), t0);
        check(&t);
        // Full; at t0+10 "short" is expired: it goes, not LRU "a".
        t.record("c", 0, 0, &m, t0 + sec(110), t0 + sec(10));
        check(&t);
        assert!(t.get("short", t0 + sec(10)).is_none());
        assert!(t.map.contains_key("a") && t.map.contains_key("b"));
        // Refresh "a": now "b" is least recently used and goes next.
        t.record("a", 0, 0, &m, t0 + sec(111), t0 + sec(11));
        t.record("d", 1, 0, &m, t0 + sec(112), t0 + sec(12));
        check(&t);
        assert!(!t.map.contains_key("b"));
        assert_eq!(t.len(), 3);
        let keys: Vec<&str> = t
            .sample(10, t0 + sec(12))
            .iter()
            .map(|(k, _)| &***k)
            .collect();
        assert_eq!(keys, ["d", "a", "c"]);
        assert_eq!(t.get("a", t0 + sec(12)).unwrap().endpoint, 0);
        assert_eq!(t.purge_expired(t0 + sec(111)), 2);
        check(&t);
        assert_eq!(t.live(t0 + sec(111)), 1);
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let t0 = Instant::now();
        let mut t = AffinityTable::new(0);
        t.record("a", 0, 0, &Arc::from("m"), t0 + sec(1), t0);
        assert!(t.is_empty());
    }
}
