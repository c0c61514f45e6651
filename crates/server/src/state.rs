//! Shared state of a running server.

use std::sync::Arc;
use std::time::Duration;

use keywarden_core::audit_chain::CheckpointSigner;
use keywarden_core::clock::{truncate_to_millis, Clock};
use keywarden_core::hashing::KeyHasher;
use keywarden_core::model::{TokenRecord, UsageEvent};
use keywarden_store::Store;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::cache::{Entry, RecordCache};
use crate::config::Config;

pub struct AppState {
    pub store: Store,
    pub hasher: KeyHasher,
    pub clock: Arc<dyn Clock>,
    pub config: Config,
    pub keys: RecordCache<Entry>,
    pub tokens: RecordCache<Option<Arc<TokenRecord>>>,
    pub usage: mpsc::Sender<UsageEvent>,
    pub signer: CheckpointSigner,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn new(
        store: Store,
        hasher: KeyHasher,
        clock: Arc<dyn Clock>,
        config: Config,
        usage: mpsc::Sender<UsageEvent>,
        signer: CheckpointSigner,
    ) -> Self {
        Self {
            store,
            hasher,
            clock,
            keys: RecordCache::new(1_000_000, config.verify_cache_ttl),
            config,
            tokens: RecordCache::new(10_000, Duration::from_secs(30)),
            usage,
            signer,
        }
    }

    /// The current time, at the millisecond precision the store keeps.
    pub fn now(&self) -> OffsetDateTime {
        truncate_to_millis(self.clock.now())
    }
}
