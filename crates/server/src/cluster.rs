//! Several nodes on one PostgreSQL database.
//!
//! `sync` keeps this node's caches true to changes made by the others: it listens for the
//! NOTIFY every audit entry sends, and on each notification, and every `cluster_poll`
//! regardless, reads the changes after the last seq it saw and evicts them. A lost
//! connection loses notifications, not changes: the next read replays from the cursor.
//! If the database cannot be read, the caches are cleared, so the node answers from the
//! store (or fails) rather than from what may be stale.
//!
//! `renew_ahead` renews verify cache entries before they end, in batches.
//!
//! `Lead` makes a background job run on one node at a time, by a session advisory lock.

use std::time::{Duration, Instant};

use keywarden_core::KeyId;
use keywarden_store::{Backend, ChangeListener, Leadership, Store};
use tokio::sync::watch;

use crate::cache::CachedKey;
use crate::state::SharedState;

/// Advisory lock ids of the jobs that must run on one node at a time.
pub const ENFORCER_LOCK: i64 = 0x6b77_0001;
pub const DISPATCHER_LOCK: i64 = 0x6b77_0002;

/// How often a held lock is checked (its connection pinged).
const RECHECK: Duration = Duration::from_secs(1);

/// One job's claim on running here.
pub struct Lead {
    lock: i64,
    held: Option<Leadership>,
    checked: Instant,
}

impl Lead {
    pub fn new(lock: i64) -> Self {
        Self {
            lock,
            held: None,
            checked: Instant::now(),
        }
    }

    /// Whether this node runs the job now: it holds the lock, or just took it (when the
    /// node that held it stopped, or died and its connection closed).
    pub async fn ensure(&mut self, store: &Store) -> bool {
        if let Some(h) = &mut self.held {
            if self.checked.elapsed() < RECHECK {
                return true;
            }
            if h.alive().await {
                self.checked = Instant::now();
                return true;
            }
            tracing::warn!(lock = self.lock, "lost the job lock's connection");
            self.held = None;
        }
        match store.try_lead(self.lock).await {
            Ok(Some(h)) => {
                if store.backend() == Backend::Postgres {
                    tracing::info!(lock = self.lock, "this node now runs the job");
                }
                self.held = Some(h);
                self.checked = Instant::now();
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(lock = self.lock, error = %e, "cannot try the job lock");
                false
            }
        }
    }
}

/// Follows other nodes' changes (PostgreSQL only; a single SQLite node evicts its own).
pub async fn sync(app: SharedState, mut stop: watch::Receiver<bool>) {
    if app.store.backend() != Backend::Postgres {
        return;
    }
    let mut cursor = match app.store.audit_head().await {
        Ok((seq, _)) => seq,
        Err(_) => 0,
    };
    let mut listener: Option<ChangeListener> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        if listener.is_none() {
            match app.store.listen_changes().await {
                Ok(l) => listener = l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for other nodes' changes; polling")
                }
            }
        }
        match app.store.changes_since(cursor).await {
            Ok(c) => {
                for id in &c.keys {
                    if let Ok(id) = keywarden_core::KeyId::parse(id) {
                        app.keys.evict(&id);
                    }
                }
                for id in &c.tokens {
                    if let Ok(id) = keywarden_core::KeyId::parse(id) {
                        app.tokens.evict(&id);
                    }
                }
                if c.policy {
                    if let Err(e) = app.policy().await {
                        tracing::warn!(error = %e, "cannot reload the policy applied elsewhere");
                    }
                }
                if c.cursor > cursor {
                    app.store.announce_change();
                }
                cursor = c.cursor;
                app.progress.followed.send_if_modified(|seen| {
                    let moved = *seen != cursor;
                    *seen = cursor;
                    moved
                });
            }
            Err(e) => {
                // Changes made elsewhere cannot be learnt: trust nothing cached.
                tracing::error!(error = %e, "cannot read changes; clearing the caches");
                app.keys.clear();
                app.tokens.clear();
                listener = None;
            }
        }
        let poll = app.config.cluster_poll;
        match &mut listener {
            Some(l) => {
                tokio::select! {
                    _ = stop.changed() => {}
                    r = l.recv() => if r.is_err() { listener = None; },
                    () = tokio::time::sleep(poll) => {}
                }
            }
            None => {
                tokio::select! {
                    _ = stop.changed() => {}
                    () = tokio::time::sleep(poll) => {}
                }
            }
        }
    }
}

/// Stamps read per statement when renewing ahead.
const RENEW_BATCH: usize = 1_000;

/// Renews verify cache entries before they end, in batches (PostgreSQL only). Each entry
/// renewed on the verify path costs a round trip to PostgreSQL (about 160 µs of this
/// process's CPU, mostly the kernel's TCP and wake-ups, plus PostgreSQL's own), and at
/// 100k keys in use with a 60 s lifetime that is 1,700 reads a second. Here they are one
/// statement per thousand keys. An entry is renewed only if the stored `version` is the
/// one it holds and nothing was evicted since the scan (`RecordCache::renew`), so no
/// change is ever served longer than without this; entries it misses are renewed on the
/// verify path as before. SQLite renews on the verify path: its point read takes a few
/// µs and no round trip.
pub async fn renew_ahead(app: SharedState, mut stop: watch::Receiver<bool>) {
    if app.store.backend() != Backend::Postgres {
        return;
    }
    let ttl = app.config.verify_cache_ttl;
    // A lifetime is at least 0.8 of the TTL; a pass every twelfth of it, for entries
    // ending within a quarter of it, sees each entry at least twice before it ends.
    let every = (ttl / 12).max(Duration::from_millis(50));
    let window = ttl / 4;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let now = app.now();
        let (generation, ending) = app.keys.ending_within(now, window);
        let cached: Vec<(KeyId, std::sync::Arc<CachedKey>)> = ending
            .into_iter()
            .filter_map(|(id, entry)| entry.map(|k| (id, k)))
            .collect();
        for chunk in cached.chunks(RENEW_BATCH) {
            let ids: Vec<KeyId> = chunk.iter().map(|(id, _)| id.clone()).collect();
            let stamps = match app.store.key_stamps(&ids).await {
                Ok(stamps) => stamps,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew verify cache entries ahead; they renew on use");
                    break;
                }
            };
            let stamps: std::collections::HashMap<KeyId, keywarden_store::KeyStamp> =
                stamps.into_iter().collect();
            for (id, key) in chunk {
                match stamps.get(id) {
                    Some(stamp) if stamp.version == key.version => {
                        if let Some(at) = stamp.last_used_at {
                            key.mark_seen(at);
                        }
                        app.keys.renew(id, generation, now);
                    }
                    _ => {}
                }
            }
        }
        app.progress.renewal_passes.send_modify(|n| *n += 1);
    }
}
