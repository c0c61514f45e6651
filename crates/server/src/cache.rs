//! The verify cache: key records by id in front of the store, evicted on every change.
//!
//! A generation counter closes the race between a verify that read the store just before
//! a change committed and the eviction of that change: such a read is never left cached.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keywarden_core::{KeyId, KeyRecord};
use moka::sync::Cache;

/// `None` caches "no such key", so floods of well-formed unknown ids stay off the store.
pub type Entry = Option<Arc<KeyRecord>>;

pub struct RecordCache<T: Clone + Send + Sync + 'static> {
    entries: Cache<KeyId, T>,
    generation: AtomicU64,
}

impl<T: Clone + Send + Sync + 'static> RecordCache<T> {
    /// `ttl` bounds staleness should a change ever bypass this node (several nodes before
    /// the propagation issue lands).
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self {
            entries: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            generation: AtomicU64::new(0),
        }
    }

    pub fn get(&self, id: &KeyId) -> Option<T> {
        self.entries.get(id)
    }

    /// The cached value, or `load`'s, cached unless a change raced the load.
    pub async fn get_or_load<E, Fut>(&self, id: &KeyId, load: impl FnOnce() -> Fut) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        if let Some(v) = self.get(id) {
            return Ok(v);
        }
        let generation = self.generation();
        let v = load().await?;
        self.insert(id.clone(), v.clone(), generation);
        Ok(v)
    }

    /// Read before loading from the store; see [`Self::insert`].
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn insert(&self, id: KeyId, value: T, read_at_generation: u64) {
        if self.generation() != read_at_generation {
            return;
        }
        self.entries.insert(id.clone(), value);
        // An eviction may have run between the check and the insert: undo ours if so.
        if self.generation() != read_at_generation {
            self.entries.invalidate(&id);
        }
    }

    /// Call after a change to `id` has committed, before answering the caller.
    pub fn evict(&self, id: &KeyId) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate(id);
    }
}
