//! Shared state of a running server.

use std::sync::Arc;
use std::time::Duration;

use keywarden_core::audit_chain::CheckpointSigner;
use keywarden_core::clock::{truncate_to_millis, Clock};
use keywarden_core::hashing::KeyHasher;
use keywarden_core::model::{TokenRecord, UsageEvent};
use keywarden_core::policy::Policy;
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
    /// The one client for outbound requests (webhooks), with its address guard.
    pub outbound: crate::outbound::Outbound,
    /// E-mail to key owners (services of format `email`), when an SMTP relay is set.
    pub mailer: Option<crate::mail::Mailer>,
    /// What verify saw that the monitor must judge (`alerts::run`).
    pub alerts: mpsc::Sender<crate::alerts::Sighting>,
    /// Sightings dropped because the monitor's queue was full.
    pub alerts_dropped: std::sync::atomic::AtomicU64,
    /// Cleared only by the benchmark (`keywarden-bench --compare-watch`), to measure in
    /// one run what watching costs verify: while clear, verify sends the monitor nothing,
    /// spends no key's rate limit and throttles no source, and the monitor learns from no
    /// batch. No flag, route or setting reaches it; a server always watches.
    pub watching: std::sync::atomic::AtomicBool,
    /// Per-key rate limits and the throttle of failing sources.
    pub limits: crate::limits::Limits,
    /// Set when the server shuts down, so long polls and event streams end.
    closing: tokio::sync::watch::Sender<bool>,
    /// The policy in force, with its version (0: none applied, built-in defaults).
    policy: std::sync::RwLock<Arc<(i64, Policy)>>,
    /// Moves after every change of `policy`, for the per-thread copies of verify.
    policy_generation: std::sync::atomic::AtomicU64,
    /// How far the background work has got.
    pub progress: Progress,
    /// This server's metrics (a recorder of its own; see `metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// What the background work has done so far, each a watch, so that whoever must know
/// that a job has run since some point (the integration tests, say, before asserting
/// that it did nothing) waits for the signal instead of for time to pass.
#[derive(Default)]
pub struct Progress {
    /// Dispatcher passes completed, and the deliveries they started.
    pub dispatch: tokio::sync::watch::Sender<DispatchProgress>,
    /// The audit seq through which `cluster::sync` has applied the changes it read to
    /// this node's caches (PostgreSQL; a SQLite node evicts its own changes as it makes
    /// them, and this stays 0).
    pub followed: tokio::sync::watch::Sender<i64>,
    /// Passes of `cluster::renew_ahead` completed (PostgreSQL).
    pub renewal_passes: tokio::sync::watch::Sender<u64>,
    /// Long polls and event streams that have read everything and wait for a change.
    pub event_waiters: tokio::sync::watch::Sender<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchProgress {
    pub passes: u64,
    pub started: u64,
}

/// Counts a waiter in [`Progress::event_waiters`] while it lives.
pub struct EventWaiter<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> EventWaiter<'a> {
    pub fn enter(waiters: &'a tokio::sync::watch::Sender<usize>) -> Self {
        waiters.send_modify(|n| *n += 1);
        Self(waiters)
    }
}

impl Drop for EventWaiter<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

pub type SharedState = Arc<AppState>;

/// A thread's reference to the policy, as of `generation`, of the server whose key cache
/// is `instance` (one process may run several servers, in tests).
struct PolicyMemo {
    instance: u64,
    generation: u64,
    policy: Arc<(i64, Policy)>,
}

thread_local! {
    static POLICY_MEMO: std::cell::RefCell<Option<PolicyMemo>> = const { std::cell::RefCell::new(None) };
}

/// What the server's state talks to besides the store: its background tasks' queues
/// and the outbound HTTP client.
pub struct Links {
    pub usage: mpsc::Sender<UsageEvent>,
    pub alerts: mpsc::Sender<crate::alerts::Sighting>,
    pub outbound: crate::outbound::Outbound,
    /// Made before the state: the usage writer, started first, records into it.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// E-mail to key owners, when `serve --smtp` is set.
    pub mailer: Option<crate::mail::Mailer>,
}

impl AppState {
    pub fn new(
        store: Store,
        hasher: KeyHasher,
        clock: Arc<dyn Clock>,
        config: Config,
        signer: CheckpointSigner,
        links: Links,
    ) -> Self {
        let Links {
            usage,
            alerts,
            outbound,
            metrics,
            mailer,
        } = links;
        Self {
            store,
            hasher,
            clock,
            keys: RecordCache::new(1_000_000, config.verify_cache_ttl),
            config,
            tokens: RecordCache::new(10_000, Duration::from_secs(30)),
            usage,
            signer,
            outbound,
            mailer,
            alerts,
            alerts_dropped: std::sync::atomic::AtomicU64::new(0),
            watching: std::sync::atomic::AtomicBool::new(true),
            limits: crate::limits::Limits::new(),
            closing: tokio::sync::watch::Sender::new(false),
            policy: std::sync::RwLock::new(Arc::new((0, Policy::default()))),
            policy_generation: std::sync::atomic::AtomicU64::new(0),
            progress: Progress::default(),
            metrics,
        }
    }

    /// The policy in force. Asks the store for its version first, so an apply through
    /// another node is followed; the text is parsed again only when the version moved.
    /// Whether verify feeds the monitor and enforces rate limits: always, but in the
    /// benchmark's comparison ([`AppState::watching`]).
    pub fn watching(&self) -> bool {
        self.watching.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn policy(&self) -> Result<Arc<(i64, Policy)>, crate::error::ApiError> {
        let version = self.store.policy_version().await?;
        if let Ok(cached) = self.policy.read() {
            if cached.0 == version {
                return Ok(cached.clone());
            }
        }
        let loaded = match self.store.current_policy().await? {
            None => (0, Policy::default()),
            Some(stored) => match Policy::from_toml(&stored.text) {
                Ok(p) => (stored.version, p),
                // It parsed when applied; refusing to issue beats issuing unchecked.
                Err(e) => {
                    return Err(crate::error::ApiError::internal(format!(
                        "stored policy version {} no longer parses: {e}",
                        stored.version
                    )));
                }
            },
        };
        let loaded = Arc::new(loaded);
        if let Ok(mut cached) = self.policy.write() {
            *cached = loaded.clone();
            self.policy_generation
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        Ok(loaded)
    }

    /// The policy this node last loaded, without asking the store: for verify's hot path.
    /// Refreshed by every [`AppState::policy`] call (each key issue, each enforcer pass),
    /// so an apply through another node reaches verify within one enforcer interval.
    pub fn policy_cached(&self) -> Arc<(i64, Policy)> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Runs `read` on [`AppState::policy_cached`] without touching the shared lock or
    /// reference count: each thread keeps its own reference until the policy moves.
    /// Verify reads the policy on every request, and those shared writes bounced
    /// between the cores.
    pub fn with_cached_policy<R>(&self, read: impl FnOnce(&Policy) -> R) -> R {
        let generation = self
            .policy_generation
            .load(std::sync::atomic::Ordering::Acquire);
        let instance = self.keys.instance();
        POLICY_MEMO.with(|memo| {
            let Ok(mut memo) = memo.try_borrow_mut() else {
                return read(&self.policy_cached().1);
            };
            let good = memo
                .as_ref()
                .is_some_and(|m| m.instance == instance && m.generation == generation);
            if !good {
                *memo = Some(PolicyMemo {
                    instance,
                    generation,
                    policy: self.policy_cached(),
                });
            }
            match memo.as_ref() {
                Some(m) => read(&m.policy.1),
                None => read(&self.policy_cached().1),
            }
        })
    }

    /// Becomes true when the server starts shutting down.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub fn begin_closing(&self) {
        self.closing.send_replace(true);
    }

    /// The current time, at the millisecond precision the store keeps.
    pub fn now(&self) -> OffsetDateTime {
        truncate_to_millis(self.clock.now())
    }
}
