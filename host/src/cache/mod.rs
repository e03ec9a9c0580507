//! Prediction caches: whole responses ([`responses`]) and `wasi:nn` results
//! ([`inference`]), both on one [`ByteCache`].
//!
//! A `ByteCache` is bounded by bytes, not entries, and shares its budget fairly between
//! functions: when it is full, the least recently used entry of the function holding the
//! most bytes goes first, so one hot function can never push every other function out.
//! Entries expire by TTL, can be capped per version, and are keyed by a blake3 hash that
//! the caller derives from everything that makes an answer (the version included, so a new
//! version never sees its predecessor's entries). Concurrent identical misses coalesce:
//! the first caller computes, the others wait for its entry.

pub mod inference;
pub mod responses;
mod spec;

pub use spec::{CacheSpec, ResponsePolicy, Ttl};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::meter::CacheMetrics;

/// A cache key: a blake3 hash of everything the cached value depends on.
pub type Key = [u8; 32];

/// Builds a [`Key`]: a domain tag and the version's scope, then length-prefixed fields, so
/// that no two different lists of fields hash alike.
pub(crate) struct KeyHasher(blake3::Hasher);

impl KeyHasher {
    pub(crate) fn new(domain: &[u8], scope: u64) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(domain);
        h.update(b"\0");
        h.update(&scope.to_le_bytes());
        KeyHasher(h)
    }

    pub(crate) fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    pub(crate) fn finish(&self) -> Key {
        *self.0.finalize().as_bytes()
    }
}

/// Bookkeeping bytes charged per entry on top of the caller's size (key, links, timestamps).
const ENTRY_OVERHEAD: u64 = 128;

struct Entry<V> {
    value: V,
    size: u64,
    stored: Instant,
    expires: Instant,
    /// Global use counter at the last hit: orders entries across a function's versions.
    used: u64,
}

/// One version's entries, least recently used last.
struct Scope<V> {
    entries: LruCache<Key, Entry<V>>,
    max_entries: Option<usize>,
}

/// One function's entries, by version.
struct Owner<V> {
    scopes: HashMap<u64, Scope<V>>,
    bytes: u64,
}

struct Inner<V> {
    owners: HashMap<Arc<str>, Owner<V>>,
    bytes: u64,
    tick: u64,
    /// Keys being computed now; a waiter's receiver says whether the computation stored
    /// a value once it is over.
    inflight: HashMap<Key, tokio::sync::watch::Receiver<bool>>,
}

/// A byte-bounded, function-fair LRU with TTLs and miss coalescing.
pub struct ByteCache<V> {
    inner: Mutex<Inner<V>>,
    budget: u64,
    metrics: CacheMetrics,
}

/// Where a value goes in the cache: its function, its version and the version's cap.
#[derive(Debug, Clone)]
pub struct Placement {
    pub owner: Arc<str>,
    /// The version's globally unique id.
    pub scope: u64,
    pub ttl: Duration,
    pub max_entries: Option<usize>,
}

/// What a coalescing lookup found.
pub enum Lookup<V: Clone> {
    /// A stored value and its age.
    Hit(V, Duration),
    /// Nobody has it: compute it, then [`Fill::store`] it (dropping the fill wakes waiters).
    Miss(Fill<V>),
}

/// The right (and duty) to compute one key; waiters for the key wake when it drops.
pub struct Fill<V: Clone> {
    cache: Arc<ByteCache<V>>,
    key: Key,
    /// `None` when this caller does not lead (it gave up waiting, or the leader stored
    /// nothing): it computes for itself.
    done: Option<tokio::sync::watch::Sender<bool>>,
    stored: bool,
}

impl<V: Clone> Fill<V> {
    /// Stores the computed value for the waiters and later callers.
    pub fn store(&mut self, at: &Placement, value: V, size: u64) {
        self.stored = self.cache.insert(at, self.key, value, size);
    }
}

impl<V: Clone> Drop for Fill<V> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            self.cache.lock().inflight.remove(&self.key);
            // Waiters hit if a value was stored; otherwise each computes for itself (an
            // answer that is never stored must not make identical requests queue up).
            done.send_replace(self.stored);
        }
    }
}

impl<V: Clone> ByteCache<V> {
    /// An empty cache of at most `budget` bytes (0: stores nothing).
    pub fn new(budget: u64, metrics: CacheMetrics) -> Self {
        ByteCache {
            inner: Mutex::new(Inner {
                owners: HashMap::new(),
                bytes: 0,
                tick: 0,
                inflight: HashMap::new(),
            }),
            budget,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<V>> {
        // Every change leaves the maps consistent before it can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the cache can hold anything.
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Largest single entry: a quarter of the budget, so one answer cannot flush a cache.
    pub fn max_entry(&self) -> u64 {
        self.budget / 4
    }

    fn peek(&self, at: &Placement, key: &Key) -> Option<(V, Duration)> {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.tick += 1;
        let tick = inner.tick;
        let owner = inner.owners.get_mut(&at.owner)?;
        let scope = owner.scopes.get_mut(&at.scope)?;
        let entry = scope.entries.get_mut(key)?;
        if entry.expires > now {
            entry.used = tick;
            return Some((entry.value.clone(), now.duration_since(entry.stored)));
        }
        let size = entry.size;
        scope.entries.pop(key);
        let scope_empty = scope.entries.is_empty();
        owner.bytes -= size;
        inner.bytes -= size;
        if scope_empty {
            owner.scopes.remove(&at.scope);
        }
        if owner.scopes.is_empty() {
            inner.owners.remove(&at.owner);
        }
        self.metrics.bytes.set(inner.bytes as i64);
        None
    }

    /// Like [`get`](Self::get), but if someone is computing `key` right now, waits (up to
    /// `wait`) for their result instead of computing it again.
    pub async fn lookup(self: &Arc<Self>, at: &Placement, key: Key, wait: Duration) -> Lookup<V> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some((v, age)) = self.peek(at, &key) {
                self.metrics.hits.inc();
                return Lookup::Hit(v, age);
            }
            let waiting = {
                let mut inner = self.lock();
                match inner.inflight.get(&key) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = tokio::sync::watch::channel(false);
                        inner.inflight.insert(key, rx);
                        self.metrics.misses.inc();
                        return Lookup::Miss(Fill {
                            cache: self.clone(),
                            key,
                            done: Some(tx),
                            stored: false,
                        });
                    }
                }
            };
            let mut rx = waiting;
            let stored = match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => *rx.borrow(),
                // The leader vanished without a verdict, or it is taking too long.
                Ok(Err(_)) | Err(_) => false,
            };
            if !stored {
                self.metrics.misses.inc();
                return Lookup::Miss(Fill {
                    cache: self.clone(),
                    key,
                    done: None,
                    stored: false,
                });
            }
        }
    }

    /// Stores `value` (`size` bytes) under `key`, evicting to stay within the budget;
    /// false when it is too large to keep (or was evicted at once to make room).
    pub fn insert(&self, at: &Placement, key: Key, value: V, size: u64) -> bool {
        let size = size + ENTRY_OVERHEAD;
        if size > self.max_entry() {
            return false;
        }
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.tick += 1;
        let tick = inner.tick;
        let owner = inner
            .owners
            .entry(at.owner.clone())
            .or_insert_with(|| Owner {
                scopes: HashMap::new(),
                bytes: 0,
            });
        let scope = owner.scopes.entry(at.scope).or_insert_with(|| Scope {
            entries: LruCache::unbounded(),
            max_entries: at.max_entries,
        });
        let entry = Entry {
            value,
            size,
            stored: now,
            expires: now + at.ttl,
            used: tick,
        };
        let mut freed = 0;
        if let Some(old) = scope.entries.put(key, entry) {
            freed += old.size;
        }
        while let Some(max) = scope.max_entries
            && scope.entries.len() > max
        {
            match scope.entries.pop_lru() {
                Some((_, e)) => {
                    freed += e.size;
                    self.metrics.evictions.inc();
                }
                None => break,
            }
        }
        owner.bytes = owner.bytes + size - freed;
        inner.bytes = inner.bytes + size - freed;
        while inner.bytes > self.budget {
            if !Self::evict_one(inner) {
                break;
            }
            self.metrics.evictions.inc();
        }
        self.metrics.bytes.set(inner.bytes as i64);
        inner
            .owners
            .get(&at.owner)
            .and_then(|o| o.scopes.get(&at.scope))
            .is_some_and(|s| s.entries.contains(&key))
    }

    /// Evicts the least recently used entry of the function holding the most bytes.
    fn evict_one(inner: &mut Inner<V>) -> bool {
        let Some((name, owner)) = inner.owners.iter_mut().max_by_key(|(_, o)| o.bytes) else {
            return false;
        };
        let oldest = owner
            .scopes
            .iter()
            .filter_map(|(id, s)| s.entries.peek_lru().map(|(_, e)| (*id, e.used)))
            .min_by_key(|(_, used)| *used);
        let Some((id, _)) = oldest else {
            return false;
        };
        let Some(scope) = owner.scopes.get_mut(&id) else {
            return false;
        };
        let Some((_, e)) = scope.entries.pop_lru() else {
            return false;
        };
        owner.bytes -= e.size;
        inner.bytes -= e.size;
        if scope.entries.is_empty() {
            owner.scopes.remove(&id);
        }
        if owner.bytes == 0 {
            let name = name.clone();
            inner.owners.remove(&name);
        }
        true
    }

    /// Drops every entry of function `owner`; returns how many there were.
    pub fn clear(&self, owner: &str) -> usize {
        let mut inner = self.lock();
        let Some(o) = inner.owners.remove(owner) else {
            return 0;
        };
        inner.bytes -= o.bytes;
        self.metrics.bytes.set(inner.bytes as i64);
        o.scopes.values().map(|s| s.entries.len()).sum()
    }

    /// Bytes held now (entries plus their bookkeeping).
    #[cfg(test)]
    fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(budget: u64) -> Arc<ByteCache<u32>> {
        let m = crate::meter::Metrics::new();
        Arc::new(ByteCache::new(budget, m.cache("test")))
    }

    fn at(owner: &str, scope: u64) -> Placement {
        Placement {
            owner: owner.into(),
            scope,
            ttl: Duration::from_secs(60),
            max_entries: None,
        }
    }

    fn key(n: u8) -> Key {
        [n; 32]
    }

    #[test]
    fn stores_within_budget_and_evicts_least_recently_used() {
        let c = cache(4 * (ENTRY_OVERHEAD + 100) * 4);
        let a = at("f", 1);
        for n in 0..16 {
            c.insert(&a, key(n), u32::from(n), 100);
        }
        assert!(c.bytes() <= 16 * (ENTRY_OVERHEAD + 100));
        c.peek(&a, &key(0)).expect("0 still there");
        c.insert(&a, key(16), 16, 100);
        assert!(c.peek(&a, &key(0)).is_some(), "recently used survives");
        assert!(c.peek(&a, &key(1)).is_none(), "least recently used went");
    }

    #[test]
    fn a_hot_function_cannot_push_out_a_quiet_one() {
        let per = ENTRY_OVERHEAD + 100;
        let c = cache(10 * per * 4);
        let quiet = at("quiet", 1);
        for n in 0..5 {
            c.insert(&quiet, key(n), 0, 100);
        }
        let hot = at("hot", 2);
        for n in 100..200 {
            c.insert(&hot, key(n), 0, 100);
        }
        // The hot function was evicted from first: the quiet one keeps its share.
        for n in 0..5 {
            assert!(c.peek(&quiet, &key(n)).is_some(), "quiet entry {n} evicted");
        }
        assert!(c.bytes() <= 40 * per);
    }

    #[test]
    fn versions_ttl_caps_and_clear() {
        let c = cache(1 << 20);
        c.insert(&at("f", 1), key(1), 1, 10);
        assert!(c.peek(&at("f", 2), &key(1)).is_none(), "other version");
        let short = Placement {
            ttl: Duration::from_millis(1),
            ..at("f", 3)
        };
        c.insert(&short, key(1), 1, 10);
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.peek(&short, &key(1)).is_none(), "expired");
        let capped = Placement {
            max_entries: Some(2),
            ..at("g", 4)
        };
        for n in 0..5 {
            c.insert(&capped, key(n), 0, 10);
        }
        assert_eq!(c.clear("g"), 2);
        assert_eq!(c.clear("f"), 1);
        assert_eq!(c.bytes(), 0);
        // Too big for one entry: not stored.
        c.insert(&at("f", 1), key(9), 9, 1 << 20);
        assert!(c.peek(&at("f", 1), &key(9)).is_none());
    }

    #[tokio::test]
    async fn concurrent_misses_wait_for_one_computation() {
        let c = cache(1 << 20);
        let a = at("f", 1);
        let Lookup::Miss(mut fill) = c.lookup(&a, key(1), Duration::from_secs(5)).await else {
            panic!("first lookup must miss");
        };
        let waiter = {
            let (c, a) = (c.clone(), a.clone());
            tokio::spawn(async move { c.lookup(&a, key(1), Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "the waiter waits for the leader");
        fill.store(&a, 7, 4);
        drop(fill);
        match waiter.await.expect("join") {
            Lookup::Hit(v, _) => assert_eq!(v, 7),
            Lookup::Miss(_) => panic!("the waiter must get the leader's value"),
        }
        // A leader that stores nothing releases its waiters to compute at once (not one
        // after the other), and the next caller leads.
        let Lookup::Miss(fill) = c.lookup(&a, key(2), Duration::from_secs(5)).await else {
            panic!("miss");
        };
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let (c, a) = (c.clone(), a.clone());
                tokio::spawn(async move { c.lookup(&a, key(2), Duration::from_secs(5)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(fill);
        for w in waiters {
            let got = tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .expect("released at once")
                .expect("join");
            assert!(matches!(got, Lookup::Miss(_)));
        }
        assert!(matches!(
            c.lookup(&a, key(2), Duration::from_secs(5)).await,
            Lookup::Miss(_)
        ));
    }
}
