//! The verify cache: key records by id in front of the store, evicted on every change.
//!
//! A generation counter closes the race between a verify that read the store just before
//! a change committed and the eviction of that change: such a read is never left cached.
//!
//! Sharded maps behind read-write locks, with a time-to-live and a size bound, and no
//! recency bookkeeping: at 100k keys moka's `get` (its concurrent table plus the LRU
//! bookkeeping it does on every read) took 8-10% of the server's CPU in the verify
//! benchmark. An entry here costs a hash and a read lock. When a shard is full an insert
//! drops an arbitrary entry: a miss only costs a store read, so recency is not worth
//! paying for on every hit.
//!
//! Time is the server's [`Clock`](keywarden_core::clock::Clock), read by the caller and
//! passed in: verify reads it once per request anyway, so the cache adds no clock read,
//! and a test that moves its clock moves the cache's lifetimes with it.
//!
//! An entry past its lifetime is not dropped: [`RecordCache::lookup`] hands it back as
//! stale, for the caller to [`RecordCache::renew`] once the store says it is current
//! (verify compares the key's `version`). At 100k keys in use, entries expire about as
//! often as keys are used, and a renewal costs a fraction of a load.
//!
//! Lifetimes are jittered (±20%): entries loaded together, say by the first requests
//! after a start, would otherwise all expire together and send a burst of store reads.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use keywarden_core::{KeyId, KeyRecord};
use time::OffsetDateTime;

/// `None` caches "no such key", so floods of well-formed unknown ids stay off the store.
pub type Entry = Option<Arc<CachedKey>>;

/// A cached record and the latest valid use this node has answered for it. The record's
/// `last_used_at` is as of its load; without the stamp, a key used just before its idle
/// deadline would read as idle on its next use, until the entry is reloaded.
///
/// `repr(C)`: the fields verify reads sit next to the reference count and to the
/// record's own verify fields, which come first in [`KeyRecord`].
#[derive(Debug)]
#[repr(C)]
pub struct CachedKey {
    seen_ms: std::sync::atomic::AtomicI64,
    /// The granted scopes, packed (`scope::pack`), then what a VALID answer says of the
    /// key (`"key_id":…,"expires_at":…`), serialized once here: building it per answer
    /// read the record's scattered strings, cold at 100k keys, and allocated each of them
    /// again (`routes::verify::Outcome::body`). One allocation: a verify checks the scope
    /// and then answers, and the scopes' own `Vec` and strings were two more cold lines.
    text: Box<str>,
    /// Where the answer's fields start in `text`.
    scopes_end: usize,
    record: KeyRecord,
}

/// The head that every VALID answer starts with; [`CachedKey::valid_fields`] follows it.
pub const VALID_HEAD: &str = r#"{"valid":true,"code":"VALID","#;

impl CachedKey {
    pub fn new(record: KeyRecord) -> Self {
        let valid_fields = serde_json::to_string(&keywarden_proto::VerifyResponse {
            valid: true,
            code: "VALID".to_owned(),
            key_id: Some(record.id.to_string()),
            owner: Some(record.owner.clone()),
            environment: Some(record.environment.clone()),
            scopes: Some(record.scopes.iter().map(ToString::to_string).collect()),
            expires_at: Some(record.expires_at),
            remaining_uses: None,
            retry_after_ms: None,
        })
        .ok()
        .and_then(|json| {
            let fields = json.strip_prefix(VALID_HEAD)?.strip_suffix('}')?;
            Some(fields.to_owned())
        })
        .unwrap_or_default();
        let mut text = keywarden_core::scope::pack(&record.scopes);
        let scopes_end = text.len();
        text.push_str(&valid_fields);
        Self {
            record,
            seen_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            text: text.into_boxed_str(),
            scopes_end,
        }
    }

    /// The fields of a VALID answer, JSON without braces; empty if they could not be
    /// serialized (the caller then builds the answer field by field).
    pub fn valid_fields(&self) -> &str {
        self.text.get(self.scopes_end..).unwrap_or_default()
    }

    /// Whether the key's granted scopes cover `requested`.
    pub fn covers(&self, requested: &keywarden_core::scope::Scope) -> bool {
        let packed = self.text.get(..self.scopes_end).unwrap_or_default();
        keywarden_core::scope::packed_covers(packed, requested)
    }

    pub fn mark_seen(&self, at: time::OffsetDateTime) {
        self.seen_ms
            .fetch_max(keywarden_core::clock::to_millis(at), Ordering::Relaxed);
    }

    pub fn last_seen(&self) -> Option<time::OffsetDateTime> {
        let ms = self.seen_ms.load(Ordering::Relaxed);
        (ms != i64::MIN).then(|| keywarden_core::clock::from_millis(ms))
    }
}

impl std::ops::Deref for CachedKey {
    type Target = KeyRecord;
    fn deref(&self) -> &KeyRecord {
        &self.record
    }
}

const SHARDS: usize = 64;

/// What the cache holds for an id. The `u64`s are the generation read before the
/// entry, for [`RecordCache::load`] and [`RecordCache::renew`].
pub enum Lookup<T> {
    Fresh(T),
    /// Past its lifetime: to be checked against the store before it is used.
    Stale(T, u64),
    Missing(u64),
}

/// When an entry stops being fresh, in unix nanoseconds of the server's clock.
///
/// The clock is a wall clock, which can be stepped back: an entry also counts as stale
/// when more than the longest lifetime is left, or a step back of an hour would serve
/// it for an hour longer than the lifetime that bounds its staleness.
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    at: i64,
    longest: i64,
}

impl Expiry {
    pub fn is_fresh(self, now: OffsetDateTime) -> bool {
        let left = self.at.saturating_sub(nanos(now));
        left > 0 && left <= self.longest
    }
}

fn nanos(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

fn nanos_of(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

struct Slot<T> {
    value: T,
    expires: Expiry,
}

pub struct RecordCache<T: Clone + Send + Sync + 'static> {
    /// `KeyId` is inline: comparing one reads the map's own bucket, where a `String` key
    /// sent every lookup to a cold heap allocation at 100k keys.
    shards: Vec<RwLock<HashMap<KeyId, Slot<T>>>>,
    hasher: RandomState,
    per_shard: usize,
    ttl: Duration,
    generation: AtomicU64,
    instance: u64,
}

static INSTANCES: AtomicU64 = AtomicU64::new(0);

impl<T: Clone + Send + Sync + 'static> RecordCache<T> {
    /// `ttl` bounds staleness should a change ever reach this node neither directly nor
    /// through `cluster::sync` (which evicts other nodes' changes within a second).
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        let per_shard = usize::try_from(capacity)
            .unwrap_or(usize::MAX)
            .div_ceil(SHARDS)
            .max(1);
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard,
            ttl,
            generation: AtomicU64::new(0),
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn shard(&self, id: &KeyId) -> &RwLock<HashMap<KeyId, Slot<T>>> {
        // The low bits pick the shard; the map inside hashes again with its own keys.
        let i = (self.hasher.hash_one(id) as usize) % SHARDS;
        &self.shards[i]
    }

    pub fn get(&self, id: &KeyId, now: OffsetDateTime) -> Option<T> {
        match self.lookup(id, now) {
            Lookup::Fresh(v) => Some(v),
            Lookup::Stale(..) | Lookup::Missing(_) => None,
        }
    }

    /// The entry for `id` however old: what it says of this node's own answers (the
    /// uses [`CachedKey`] stamps) does not go stale with the record.
    pub fn cached(&self, id: &KeyId) -> Option<T> {
        self.peek(id).1.map(|(value, _)| value)
    }

    /// The entry for `id`, and if it has outlived its time at `now`, what a caller needs
    /// to [`Self::renew`] it.
    pub fn lookup(&self, id: &KeyId, now: OffsetDateTime) -> Lookup<T> {
        match self.peek(id) {
            (generation, None) => Lookup::Missing(generation),
            (_, Some((value, expires))) if expires.is_fresh(now) => Lookup::Fresh(value),
            (generation, Some((value, _))) => Lookup::Stale(value, generation),
        }
    }

    /// The fresh entry for `id`, when it expires, and the generation read before it: a
    /// per-thread memo of the entry stays good while [`Self::is_current`] and the time
    /// last (`auth` keeps one of the admin token, which every request presents).
    pub fn get_for_memo(&self, id: &KeyId, now: OffsetDateTime) -> Option<(T, Expiry, u64)> {
        let (generation, (value, expires)) = match self.peek(id) {
            (generation, Some(entry)) => (generation, entry),
            (_, None) => return None,
        };
        expires
            .is_fresh(now)
            .then_some((value, expires, generation))
    }

    /// The entry and when it expires, with the generation read before it: a change
    /// evicted after that read moves it, so a renewal of what the change replaced is
    /// refused.
    fn peek(&self, id: &KeyId) -> (u64, Option<(T, Expiry)>) {
        let generation = self.generation();
        // A poisoned shard only means a panic elsewhere mid-insert; treat it as a miss.
        let entry = self
            .shard(id)
            .read()
            .ok()
            .and_then(|shard| shard.get(id).map(|slot| (slot.value.clone(), slot.expires)));
        (generation, entry)
    }

    /// True while nothing has been evicted since `generation` was read.
    pub fn is_current(&self, generation: u64) -> bool {
        self.generation() == generation
    }

    /// Tells caches apart, for memos kept per thread across several servers.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// The cached value, or `load`'s, cached unless a change raced the load.
    pub async fn get_or_load<E, Fut>(
        &self,
        id: &KeyId,
        now: OffsetDateTime,
        load: impl FnOnce() -> Fut,
    ) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let generation = match self.lookup(id, now) {
            Lookup::Fresh(v) => return Ok(v),
            Lookup::Stale(_, generation) | Lookup::Missing(generation) => generation,
        };
        self.load(id, generation, now, load).await
    }

    /// Loads `id` and caches it unless a change since `generation` raced the load. The
    /// lifetime counts from `now`, read before the load: an entry may end early, never
    /// late.
    pub async fn load<E, Fut>(
        &self,
        id: &KeyId,
        generation: u64,
        now: OffsetDateTime,
        load: impl FnOnce() -> Fut,
    ) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let v = load().await?;
        self.insert(id.clone(), v.clone(), generation, now);
        Ok(v)
    }

    /// Gives a stale entry a new lifetime from `now`, once the caller has checked with
    /// the store that it is still current; refused if anything was evicted since
    /// `generation`. The entry is kept as it is, with what it has learnt since its load.
    pub fn renew(&self, id: &KeyId, generation: u64, now: OffsetDateTime) {
        let Ok(mut shard) = self.shard(id).write() else {
            return;
        };
        if !self.is_current(generation) {
            return;
        }
        if let Some(slot) = shard.get_mut(id) {
            slot.expires = self.expiry(now);
        }
    }

    /// Entries fresh at `now` that end within `within`, with the generation read before
    /// the scan: what a renewer may [`Self::renew`] ahead of their end, in one batch of
    /// store reads instead of one read on the verify path each.
    pub fn ending_within(&self, now: OffsetDateTime, within: Duration) -> (u64, Vec<(KeyId, T)>) {
        let generation = self.generation();
        let horizon = nanos(now).saturating_add(nanos_of(within));
        let mut out = Vec::new();
        for shard in &self.shards {
            let Ok(shard) = shard.read() else { continue };
            out.extend(
                shard
                    .iter()
                    .filter(|(_, slot)| slot.expires.is_fresh(now) && slot.expires.at <= horizon)
                    .map(|(id, slot)| (id.clone(), slot.value.clone())),
            );
        }
        (generation, out)
    }

    /// Entries held, fresh or not: a read lock on each shard in turn, for a scrape.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().map_or(0, |s| s.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read before loading from the store; see [`Self::insert`].
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn lifetime(&self) -> Duration {
        self.ttl
            .mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.8..1.2))
    }

    fn expiry(&self, now: OffsetDateTime) -> Expiry {
        Expiry {
            at: nanos(now).saturating_add(nanos_of(self.lifetime())),
            longest: nanos_of(self.ttl.mul_f64(1.2)),
        }
    }

    fn insert(&self, id: KeyId, value: T, read_at_generation: u64, now: OffsetDateTime) {
        let Ok(mut shard) = self.shard(&id).write() else {
            return;
        };
        // Checked under the shard lock that `evict` also takes: an eviction either ran
        // before this check (and the generation moved) or runs after the insert.
        if self.generation() != read_at_generation {
            return;
        }
        if shard.len() >= self.per_shard && !shard.contains_key(&id) {
            if let Some(victim) = shard.keys().next().cloned() {
                shard.remove(&victim);
            }
        }
        shard.insert(
            id,
            Slot {
                value,
                expires: self.expiry(now),
            },
        );
    }

    /// Drops everything: when this node can no longer learn of changes made elsewhere,
    /// nothing cached may be trusted.
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        for shard in &self.shards {
            let mut shard = match shard.write() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            shard.clear();
        }
    }

    /// Call after a change to `id` has committed, before answering the caller.
    pub fn evict(&self, id: &KeyId) {
        // A poisoned shard is still evicted from: a stale entry must never survive.
        let mut shard = match self.shard(id).write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.generation.fetch_add(1, Ordering::SeqCst);
        shard.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-06-01 12:00 UTC);

    fn id(n: usize) -> KeyId {
        KeyId::parse(&format!("{n:0>16}")).unwrap()
    }

    fn at(ms: i64) -> OffsetDateTime {
        T0 + time::Duration::milliseconds(ms)
    }

    #[test]
    fn evicted_and_raced_entries_are_not_served() {
        let c: RecordCache<u32> = RecordCache::new(100, Duration::from_secs(60));
        let g = c.generation();
        c.insert(id(1), 1, g, T0);
        assert_eq!(c.get(&id(1), T0), Some(1));
        c.evict(&id(1));
        assert_eq!(c.get(&id(1), T0), None);
        // A load that started before the eviction is not cached.
        c.insert(id(1), 1, g, T0);
        assert_eq!(c.get(&id(1), T0), None);
    }

    #[test]
    fn stale_entries_are_renewed_unless_a_change_intervened() {
        let c: RecordCache<u32> = RecordCache::new(100, Duration::from_millis(20));
        c.insert(id(1), 1, c.generation(), T0);
        assert!(matches!(c.lookup(&id(1), T0), Lookup::Fresh(1)));
        let Lookup::Stale(1, generation) = c.lookup(&id(1), at(30)) else {
            panic!("expected a stale entry");
        };
        assert_eq!(
            c.get(&id(1), at(30)),
            None,
            "a stale entry is not served as is"
        );
        assert_eq!(c.cached(&id(1)), Some(1), "but is still there to renew");
        c.renew(&id(1), generation, at(30));
        assert!(matches!(c.lookup(&id(1), at(30)), Lookup::Fresh(1)));

        let Lookup::Stale(1, generation) = c.lookup(&id(1), at(60)) else {
            panic!("expected a stale entry");
        };
        // A change to any key between the check and the renewal: not renewed.
        c.evict(&id(2));
        c.renew(&id(1), generation, at(60));
        assert!(matches!(c.lookup(&id(1), at(60)), Lookup::Stale(1, _)));
        c.evict(&id(1));
        assert!(matches!(c.lookup(&id(1), at(60)), Lookup::Missing(_)));
    }

    /// A wall clock stepped back must not stretch an entry past its longest lifetime.
    #[test]
    fn a_clock_stepped_back_does_not_keep_entries_fresh() {
        let c: RecordCache<u32> = RecordCache::new(100, Duration::from_secs(60));
        c.insert(id(1), 1, c.generation(), T0);
        assert!(matches!(c.lookup(&id(1), T0), Lookup::Fresh(1)));
        assert!(matches!(
            c.lookup(&id(1), T0 - time::Duration::hours(1)),
            Lookup::Stale(1, _)
        ));
        assert!(matches!(
            c.lookup(&id(1), T0 + time::Duration::minutes(2)),
            Lookup::Stale(1, _)
        ));
    }

    #[test]
    fn entries_expire_and_the_size_stays_bounded() {
        let c: RecordCache<u32> = RecordCache::new(128, Duration::ZERO);
        c.insert(id(1), 1, c.generation(), T0);
        assert_eq!(c.get(&id(1), T0), None, "expired at once");
        let c: RecordCache<u32> = RecordCache::new(128, Duration::from_secs(60));
        for n in 0..10_000 {
            c.insert(id(n), 1, c.generation(), T0);
        }
        let held: usize = c.shards.iter().map(|s| s.read().unwrap().len()).sum();
        assert!(held <= 128, "held {held}");
        assert_eq!(c.get(&id(9_999), T0), Some(1), "the newest entry is kept");
    }

    #[test]
    fn lifetimes_are_spread() {
        let ttl = Duration::from_secs(100);
        let c: RecordCache<u32> = RecordCache::new(1_000, ttl);
        for n in 0..200 {
            c.insert(id(n), 1, c.generation(), T0);
        }
        let left: Vec<Duration> = c
            .shards
            .iter()
            .flat_map(|s| {
                let s = s.read().unwrap();
                s.values()
                    .map(|slot| {
                        Duration::from_nanos(u64::try_from(slot.expires.at - nanos(T0)).unwrap())
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(left.len(), 200);
        assert!(left
            .iter()
            .all(|d| *d <= ttl.mul_f64(1.2) && *d >= ttl.mul_f64(0.79)));
        let spread =
            left.iter().max().unwrap().as_secs_f64() - left.iter().min().unwrap().as_secs_f64();
        assert!(spread > 20.0, "expiries spread over {spread:.1}s");
    }
}
