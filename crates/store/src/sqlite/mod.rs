//! What only the SQLite engine does: the usage log's sink and its fold, point reads of
//! keys through rusqlite on the calling thread, the audit trail's bulk reader, and the
//! in-process queue of writers.

pub(crate) mod audit;
pub(crate) mod point_reads;
pub(crate) mod usage;

use std::path::Path;
use std::sync::Arc;

use keywarden_core::model::KeyRecord;
use keywarden_core::KeyId;
use tokio::sync::{Mutex, OwnedMutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::fold::Pending;
use crate::{KeyStamp, Result};

#[derive(Debug)]
pub(crate) struct Engine {
    pub usage: usage::SqliteUsageSink,
    pub audit: audit::SqliteAuditReader,
    point_reads: point_reads::SqlitePointReads,
    /// This process's writers take turns (see [`Engine::write_turn`]).
    writer: Arc<Mutex<()>>,
    /// Readers of usage stats hold it shared while they read the tables and the pending
    /// overlay; a fold holds it exclusively from its commit until the overlay is cleared,
    /// so no reader counts a use twice or not at all.
    fold_lock: RwLock<()>,
}

/// The tables' usage stats and the overlay of what is not folded into them yet, which
/// agree for as long as this is held: a fold waits for it. The only way to the overlay
/// for readers that combine it with the tables.
pub(crate) struct StableStats<'a> {
    _folds_wait: RwLockReadGuard<'a, ()>,
    sink: &'a usage::SqliteUsageSink,
}

impl StableStats<'_> {
    pub fn with_pending<R>(&self, f: impl FnOnce(&Pending) -> R) -> Result<R> {
        Ok(f(&*usage::lock(&self.sink.pending)?))
    }
}

impl Engine {
    /// Opens the engine's own connections to the file the pool created and migrated.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            usage: usage::SqliteUsageSink::open(path)?,
            audit: audit::SqliteAuditReader::open(path)?,
            point_reads: point_reads::SqlitePointReads::open(path)?,
            writer: Arc::default(),
            fold_lock: RwLock::new(()),
        })
    }

    /// This process's turn to write. SQLite lets one writer in at a time and makes the
    /// others poll with growing sleeps (up to 100 ms each), which put the p99 of audited
    /// changes near 100 ms under concurrent writes; waiting on an in-process queue instead
    /// wakes the next writer as soon as the last one commits. `busy_timeout` still covers
    /// other processes.
    pub async fn write_turn(&self) -> OwnedMutexGuard<()> {
        self.writer.clone().lock_owned().await
    }

    pub async fn stable_stats(&self) -> StableStats<'_> {
        StableStats {
            _folds_wait: self.fold_lock.read().await,
            sink: &self.usage,
        }
    }

    /// Keeps readers of [`StableStats`] out while a fold step moves usage from the
    /// overlay into the tables.
    pub async fn exclude_readers(&self) -> RwLockWriteGuard<'_, ()> {
        self.fold_lock.write().await
    }

    /// The key read on this thread, without waiting for a fold step (verify's cache
    /// misses must not queue behind one): the one reader of the overlay that does not hold
    /// [`StableStats`]. A step that ended during the read may have moved the key's usage
    /// from the overlay into the tables after the read saw them, so the read is retried; a
    /// step still running is told apart by the key's `last_seq`. `None`: read through the
    /// pool.
    pub fn point_read_key(&self, id: &KeyId) -> Result<Option<Option<KeyRecord>>> {
        for _ in 0..3 {
            let folds_before = usage::lock(&self.usage.pending)?.folds;
            let Some(read) = self.point_reads.get_key(id.as_str()) else {
                return Ok(None);
            };
            let Some((mut key, folded_upto)) = read? else {
                return Ok(Some(None));
            };
            let pending = usage::lock(&self.usage.pending)?;
            if pending.folds == folds_before {
                pending.apply_unfolded(&mut key, folded_upto);
                return Ok(Some(Some(key)));
            }
        }
        Ok(None)
    }

    /// `None` when no connection is free or SQLite is busy: read through the pool.
    pub fn point_read_stamp(&self, id: &KeyId) -> Option<Result<Option<KeyStamp>>> {
        self.point_reads.get_stamp(id.as_str())
    }
}
