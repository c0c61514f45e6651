//! keywarden-store: the only crate that knows SQL.
//!
//! One implementation serves both backends through sqlx's `Any` driver: the queries use
//! `$N` placeholders and types both SQLite and PostgreSQL share (BIGINT unix milliseconds,
//! TEXT, JSON as TEXT), so the dialects differ only in `migrations/{sqlite,postgres}`,
//! except for usage: on SQLite it goes through its own sink (`usage_sqlite`), an
//! append-only log read per key by its `prev_seq` chain; PostgreSQL indexes it by key.
//! The API suites in `tests/it` run against both (`on_both_backends!`).

mod audit;
mod cluster;
mod error;
mod fold;
mod keys;
mod owners;
mod policies;
mod rows;
mod services;
mod shadow;
mod sqlite;
mod tokens;
mod usage;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Connection, Executor};

pub use audit::{
    ArchiveOutcome, ArchiveRecord, ArchiveRequest, AuditFilter, AuditOrder, KeyEvent, Quarantined,
};
pub use cluster::{ChangeListener, Changes, Leadership, CHANNEL};
pub use keys::{KeyFilter, KeyStamp, StateFilter};
pub use owners::Owner;
pub use policies::StoredPolicy;
pub use services::{
    AlertFilter, AlertRecord, DeliveryOutcome, DeliveryRecord, DueDelivery, NewAlert, ServiceRecord,
};
pub use shadow::ShadowKey;
pub use usage::FOLD_CHUNK;

pub use error::{DriverError, Result, StoreError};

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
    backend: Backend,
    usage_sqlite: Option<sqlite::usage::SqliteUsageSink>,
    audit_sqlite: Option<sqlite::audit::SqliteAuditReader>,
    key_reads: Option<std::sync::Arc<sqlite::point_reads::SqlitePointReads>>,
    /// This process's writers take turns on SQLite (see [`Store::write_turn`]).
    sqlite_writer: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
    /// Readers of usage stats hold it shared while they read the tables and the pending
    /// overlay; a fold holds it exclusively from its commit until the overlay is cleared,
    /// so no reader counts a use twice or not at all.
    fold_lock: std::sync::Arc<tokio::sync::RwLock<()>>,
    /// Counts this process's committed writes, so the dispatcher and event streams wake
    /// on a change instead of polling for it.
    changes: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// For LISTEN, which needs a connection of its own (PostgreSQL only).
    postgres_url: Option<String>,
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
                Backend::Postgres => 16,
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
        let (usage_sqlite, audit_sqlite, key_reads) = match backend {
            Backend::Sqlite => {
                SQLITE_MIGRATIONS.run(&pool).await?;
                let path = sqlite_path(&url)?;
                (
                    Some(sqlite::usage::SqliteUsageSink::open(&path)?),
                    Some(sqlite::audit::SqliteAuditReader::open(&path)?),
                    Some(std::sync::Arc::new(
                        sqlite::point_reads::SqlitePointReads::open(&path)?,
                    )),
                )
            }
            Backend::Postgres => {
                POSTGRES_MIGRATIONS.run(&pool).await?;
                (None, None, None)
            }
        };
        let store = Self {
            pool,
            backend,
            usage_sqlite,
            audit_sqlite,
            key_reads,
            sqlite_writer: (backend == Backend::Sqlite).then(std::sync::Arc::default),
            fold_lock: std::sync::Arc::default(),
            changes: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
            postgres_url: (backend == Backend::Postgres).then(|| url.clone()),
        };
        store.seal_unchained_audit().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// On SQLite, this process's turn to write. SQLite lets one writer in at a time and
    /// makes the others poll with growing sleeps (up to 100 ms each), which put the p99
    /// of audited changes near 100 ms under concurrent writes; waiting on an in-process
    /// queue instead wakes the next writer as soon as the last one commits. `busy_timeout`
    /// still covers other processes. `None` on PostgreSQL, which queues writers itself.
    pub(crate) async fn write_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match &self.sqlite_writer {
            Some(m) => Some(m.clone().lock_owned().await),
            None => None,
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
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
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
    }
}
