//! keywarden-store: the only crate that knows SQL.
//!
//! A [`Store`] is an sqlx `Any` pool for the SQL both backends share (`$N` placeholders,
//! types both have: BIGINT unix milliseconds, TEXT, JSON as TEXT) and an [`Engine`] for
//! what differs, so each difference is a `match` the compiler checks:
//! - `sqlite/`: usage goes to an append-only log through its own connection and is folded
//!   into the keys' stats every few seconds ([`fold`] holds the rule and the overlay of
//!   what is not folded yet); verify's key reads and bulk audit reads go through rusqlite.
//! - `postgres/`: verify's hot paths (key reads, use caps, usage batches) through sqlx's
//!   native driver with prepared statements; LISTEN/NOTIFY and advisory locks.
//!
//! Migrations live in `migrations/{sqlite,postgres}`. The store's own tests in
//! `crates/store/tests` and the API suites in `tests/it` run against both backends.

mod alerts;
mod audit;
mod cluster;
mod error;
mod fold;
mod keys;
mod owners;
mod policies;
mod postgres;
pub mod rollups;
mod rows;
mod services;
mod shadow;
mod sqlite;
mod tokens;
mod usage;
mod usage_chain;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Connection, Executor};

pub use alerts::{AlertFilter, AlertRecord, AlertState, NewAlert, Raised};
pub use audit::{
    ArchiveOutcome, ArchiveRecord, ArchiveRequest, AuditFilter, AuditOrder, KeyEvent, Quarantined,
};
pub use cluster::{Changes, Leadership};
pub use fold::{hour_of, Network, ValueKind, HOUR_MS};
pub use keys::{KeyFilter, KeyStamp, StateFilter};
pub use owners::Owner;
pub use policies::StoredPolicy;
pub use postgres::{ChangeListener, CHANNEL};
pub use services::{DeliveryOutcome, DeliveryRecord, DueDelivery, ServiceRecord};
pub use shadow::ShadowKey;
pub use usage::FOLD_CHUNK;
pub use usage_chain::{
    walk_start, RetentionRule, StoredBatch, UsageChainHead, UsageRetention, RETENTION_CHUNK,
};

pub use error::{DriverError, Result, StoreError, StoreErrorKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A write transaction with, on SQLite, the process's write turn: released after the
/// transaction ends (fields drop in order).
pub(crate) struct WriteTx {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    /// Told of the commit; `None` for writes nothing waits on (usage batches).
    changes: Option<std::sync::Arc<tokio::sync::watch::Sender<u64>>>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTx {
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        if let Some(c) = &self.changes {
            c.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::Transaction<'static, sqlx::Any>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    engine: Engine,
    /// Counts this process's committed writes, so the dispatcher and event streams wake
    /// on a change instead of polling for it.
    changes: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

/// What one backend does differently from the other.
#[derive(Debug, Clone)]
pub(crate) enum Engine {
    Sqlite(std::sync::Arc<sqlite::Engine>),
    Postgres(std::sync::Arc<postgres::Engine>),
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The database file of a SQLite URL; `None` for any other URL.
pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    sqlite_path(url).ok()
}

/// The file behind `sqlite://PATH?…` or `sqlite:PATH`.
fn sqlite_path(url: &str) -> Result<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or(StoreError::UnsupportedUrl)?;
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path == ":memory:" {
        return Err(StoreError::UnsupportedUrl);
    }
    Ok(std::path::PathBuf::from(path))
}

impl Store {
    /// Connects to `sqlite://path` (created if missing) or `postgres://…` and migrates.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        let url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 8,
                // Verify's hot paths have the engine's own pool (`postgres/`).
                Backend::Postgres => 8,
            })
            .acquire_timeout(Duration::from_secs(10))
            .after_release(|conn, _| {
                Box::pin(async move {
                    // A transaction whose COMMIT or ROLLBACK failed (a full disk makes SQLite
                    // roll back by itself, and then ROLLBACK fails too) leaves sqlx counting
                    // an open transaction, and every later `begin` on that connection fails.
                    // The ping waits for the rollback queued on drop; a connection still in
                    // a transaction after it is closed, not reused.
                    if !conn.is_in_transaction() {
                        return Ok(true);
                    }
                    conn.ping().await?;
                    Ok(!conn.is_in_transaction())
                })
            })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL with synchronous=NORMAL survives a process crash; only a power
                        // loss can drop the last commits. busy_timeout lets writers queue.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        // SQLite's default 2 MiB page cache. Usage (the heavy writer) has
                        // its own connection; these serve admin writes and cache misses,
                        // and each read after another connection's commit drops the page
                        // cache, at a cost that grows with it (1.5% of verify's CPU at
                        // 64 MiB, in the profile).
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let engine = match backend {
            Backend::Sqlite => {
                SQLITE_MIGRATIONS.run(&pool).await?;
                Engine::Sqlite(std::sync::Arc::new(sqlite::Engine::open(&sqlite_path(
                    &url,
                )?)?))
            }
            Backend::Postgres => {
                POSTGRES_MIGRATIONS.run(&pool).await?;
                Engine::Postgres(std::sync::Arc::new(postgres::Engine::connect(&url).await?))
            }
        };
        let store = Self {
            pool,
            engine,
            changes: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        store.seal_unchained_audit().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        match self.engine {
            Engine::Sqlite(_) => Backend::Sqlite,
            Engine::Postgres(_) => Backend::Postgres,
        }
    }

    /// On SQLite, this process's turn to write (see `sqlite::Engine::write_turn`); `None`
    /// on PostgreSQL, which queues writers itself.
    pub(crate) async fn write_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match &self.engine {
            Engine::Sqlite(e) => Some(e.write_turn().await),
            Engine::Postgres(_) => None,
        }
    }

    /// A write transaction. On SQLite it holds this process's write turn and takes the
    /// database's write lock up front (`BEGIN IMMEDIATE`), so writers never fail on a
    /// lock upgrade.
    async fn begin_write(&self) -> Result<WriteTx> {
        let mut tx = self.begin_quiet_write().await?;
        tx.changes = Some(self.changes.clone());
        Ok(tx)
    }

    /// A write transaction whose commit wakes no one: usage batches, which commit every
    /// few milliseconds under load and change nothing the dispatcher or event streams
    /// wait for.
    async fn begin_quiet_write(&self) -> Result<WriteTx> {
        let turn = self.write_turn().await;
        let tx = match self.engine {
            Engine::Sqlite(_) => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Engine::Postgres(_) => self.pool.begin().await?,
        };
        Ok(WriteTx {
            tx,
            changes: None,
            _turn: turn,
        })
    }

    /// Changes whenever a write through this store commits.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
        if let Engine::Postgres(e) = &self.engine {
            e.close().await;
        }
    }
}
