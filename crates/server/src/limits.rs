//! Limits enforced on the verify path, in memory: per-key rate limits (`RATE_LIMITED`
//! for a key used faster than its `rate_limit`) and the throttle of sources that keep
//! presenting bad keys (malformed, unknown ids, wrong secrets).
//!
//! Both are GCRA cells ([`Rate::admit`]): one timestamp per key or source. A key with no
//! limit, and a source that has presented nothing bad, cost nothing: the key check is
//! skipped, and the source check is one atomic load while no source is being tracked.
//!
//! On PostgreSQL a key's limit is shared by every node: this node's cell refuses first
//! (what one node alone let through already exceeds the limit), and what it admits is
//! spent again in the store (`Store::spend_rate`), so the cluster as a whole admits at
//! most the limit. The throttle stays per node: it protects this node's callers.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use keywarden_core::rate::Rate;
use keywarden_core::KeyId;

const SHARDS: usize = 16;
/// Cells kept at most per map; past it, cells at rest are dropped first, then a new
/// source is not tracked (its failures are still logged and alerted on).
const MAX_CELLS: usize = 200_000;

/// GCRA cells by key or source, in shards behind mutexes: only keys with a limit and
/// sources that failed come here, so contention is rare.
struct Cells<K> {
    shards: Vec<Mutex<HashMap<K, i64>>>,
    hasher: RandomState,
    len: AtomicUsize,
}

impl<K: Hash + Eq + Clone> Cells<K> {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            len: AtomicUsize::new(0),
        }
    }

    fn shard(&self, k: &K) -> &Mutex<HashMap<K, i64>> {
        // The shard count divides the hash space evenly; the modulo cannot panic.
        let i = usize::try_from(self.hasher.hash_one(k) % SHARDS as u64).unwrap_or(0);
        &self.shards[i]
    }

    /// Spends one event of `k` at `now_us`: `Ok(())`, or `Err(retry_after_us)`.
    fn admit(&self, k: &K, rate: &Rate, now_us: i64) -> Result<(), i64> {
        let mut shard = self
            .shard(k)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match shard.get_mut(k) {
            Some(tat) => {
                *tat = rate.admit(*tat, now_us)?;
            }
            None => {
                if self.len.load(Ordering::Relaxed) >= MAX_CELLS {
                    shard.retain(|_, tat| *tat > now_us);
                    self.recount();
                    if self.len.load(Ordering::Relaxed) >= MAX_CELLS {
                        return Ok(());
                    }
                }
                let tat = rate.admit(0, now_us)?;
                shard.insert(k.clone(), tat);
                self.len.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// When `k` may present again, if it may not now: the next event would be refused.
    fn blocked(&self, k: &K, rate: &Rate, now_us: i64) -> Option<i64> {
        let shard = self
            .shard(k)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tat = *shard.get(k)?;
        rate.admit(tat, now_us).err()
    }

    /// Drops cells back at rest (their next event would start afresh).
    fn sweep(&self, now_us: i64) {
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|_, tat| *tat > now_us);
        }
        self.recount();
    }

    fn recount(&self) {
        let n = self
            .shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum();
        self.len.store(n, Ordering::Relaxed);
    }

    fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }
}

/// The in-memory limits of one node.
pub struct Limits {
    keys: Cells<KeyId>,
    sources: Cells<IpAddr>,
}

impl Default for Limits {
    fn default() -> Self {
        Self::new()
    }
}

impl Limits {
    pub fn new() -> Self {
        Self {
            keys: Cells::new(),
            sources: Cells::new(),
        }
    }

    /// Spends one use of `key` under its `rate`: `Err(retry_after_us)` when over it.
    pub fn spend_key(&self, key: &KeyId, rate: &Rate, now_us: i64) -> Result<(), i64> {
        self.keys.admit(key, rate, now_us)
    }

    /// Whether `source` is throttled now, and for how long.
    pub fn throttled(&self, source: IpAddr, rate: &Rate, now_us: i64) -> Option<i64> {
        if self.sources.is_empty() {
            return None;
        }
        self.sources.blocked(&canonical(source), rate, now_us)
    }

    /// Counts one bad key presented by `source`; `true` when this one trips the throttle.
    pub fn count_failure(&self, source: IpAddr, rate: &Rate, now_us: i64) -> bool {
        self.sources
            .admit(&canonical(source), rate, now_us)
            .is_err()
    }

    /// Throttles `source` at once, for one period of `rate` (an alert's response).
    pub fn penalize(&self, source: IpAddr, rate: &Rate, now_us: i64) {
        // A cell this far ahead refuses until one period from now.
        let until = now_us
            .saturating_add(rate.burst_us())
            .saturating_add(rate.interval_us().saturating_mul(i64::from(rate.count)));
        let k = canonical(source);
        let mut shard = self
            .sources
            .shard(&k)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if shard.insert(k, until).is_none() {
            self.sources.len.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets cells at rest; the monitor calls it every few seconds.
    pub fn sweep(&self, now_us: i64) {
        self.keys.sweep(now_us);
        self.sources.sweep(now_us);
    }

    /// Sources tracked now (for tests and metrics).
    pub fn sources_tracked(&self) -> usize {
        self.sources.len.load(Ordering::Relaxed)
    }
}

/// An IPv4 client seen through an IPv6 socket is the same client.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Microseconds since the Unix epoch: the scale of every cell.
pub fn micros(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_failing_source_is_throttled_and_no_other() {
        let l = Limits::new();
        let rate: Rate = "3/min".parse().unwrap();
        let now = 1_000_000_000_000;
        assert_eq!(l.throttled(ip("10.0.0.1"), &rate, now), None);
        assert!(!l.count_failure(ip("10.0.0.1"), &rate, now));
        assert!(!l.count_failure(ip("10.0.0.1"), &rate, now));
        assert!(!l.count_failure(ip("10.0.0.1"), &rate, now));
        let wait = l.throttled(ip("10.0.0.1"), &rate, now).unwrap();
        assert_eq!(wait, 20_000_000);
        // The same client through an IPv6 socket.
        assert!(l.throttled(ip("::ffff:10.0.0.1"), &rate, now).is_some());
        assert_eq!(l.throttled(ip("10.0.0.2"), &rate, now), None);
        assert!(l.count_failure(ip("10.0.0.1"), &rate, now));
        assert_eq!(l.throttled(ip("10.0.0.1"), &rate, now + wait), None);
        l.sweep(now + 60_000_000);
        assert_eq!(l.sources_tracked(), 0);
    }

    #[test]
    fn keys_are_limited_each_on_its_own() {
        let l = Limits::new();
        let rate: Rate = "2/s".parse().unwrap();
        let a = KeyId::parse("AAAAAAAAAAAAAAAA").unwrap();
        let b = KeyId::parse("BBBBBBBBBBBBBBBB").unwrap();
        let now = 5_000_000;
        assert!(l.spend_key(&a, &rate, now).is_ok());
        assert!(l.spend_key(&a, &rate, now).is_ok());
        assert_eq!(l.spend_key(&a, &rate, now), Err(500_000));
        assert!(l.spend_key(&b, &rate, now).is_ok());
        assert!(l.spend_key(&a, &rate, now + 500_000).is_ok());
    }
}
