//! Point reads of one key on SQLite, through rusqlite on the calling thread.
//!
//! Verify loads a key from the store on every cache miss, and when entries expire many
//! misses come together. Through sqlx (its Any driver, a worker thread per connection and
//! two thread handoffs per query) a miss cost about 50 µs of CPU under load; a prepared
//! statement on a read-only connection reads the row in a few, without leaving the
//! thread. The read is a primary-key lookup in a WAL database: it never waits for a
//! writer, and with no busy handler it never sleeps. When every connection is in use, or
//! SQLite answers busy, the caller reads through the pool instead.
//!
//! Each usage commit (every few ms) empties these connections' page caches, so a read
//! copies its few b-tree pages in again from the OS. Mapping the file instead
//! (`mmap_size`) was slower: the file grows with the usage log, and each remap cost TLB
//! shootdowns and page faults.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, TryLockError};

use keywarden_core::clock::from_millis;
use keywarden_core::model::KeyRecord;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

use crate::rows::{key_from_row, ByPosition, KEY_COLUMNS, KEY_FROM, STAMP_SQL_ONE_NODE};
use crate::{KeyStamp, Result, StoreError};

/// A key as stored, and `key_usage.last_seq`: the last event its stats include.
pub(crate) type KeyRow = (KeyRecord, Option<i64>);

pub(crate) struct SqlitePointReads {
    conns: Box<[Mutex<Connection>]>,
    next: AtomicUsize,
    sql: String,
}

impl std::fmt::Debug for SqlitePointReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqlitePointReads")
    }
}

/// One per thread that may read at once: the runtime's workers, with room to spare.
const CONNECTIONS: usize = 4;

impl SqlitePointReads {
    pub fn open(path: &Path) -> Result<Self> {
        let conns = (0..CONNECTIONS)
            .map(|_| {
                let conn = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(|e| StoreError::rusqlite("sqlite point read", e))?;
                // rusqlite sets a 5 s busy handler; a reader here must never sleep.
                conn.busy_timeout(std::time::Duration::ZERO)
                    .map_err(|e| StoreError::rusqlite("sqlite point read", e))?;
                Ok(Mutex::new(conn))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conns: conns.into_boxed_slice(),
            next: AtomicUsize::new(0),
            sql: format!("SELECT {KEY_COLUMNS}, last_seq FROM {KEY_FROM} WHERE id = ?1"),
        })
    }

    /// The key's row as stored, with the last usage event its stats include (usage not
    /// folded yet is the caller's to add); `None` when no connection is free or SQLite
    /// is busy: read through the pool then.
    pub fn get_key(&self, id: &str) -> Option<Result<Option<KeyRow>>> {
        self.read(|conn| {
            conn.prepare_cached(&self.sql).and_then(|mut stmt| {
                stmt.query_row([id], |row| {
                    let cols = ByPosition::key(row);
                    let folded_upto = row.get::<_, Option<i64>>(cols.after())?;
                    Ok(key_from_row(&cols).map(|k| (k, folded_upto)))
                })
                .optional()
            })
        })
        .map(|read| read.and_then(Option::transpose))
    }

    /// The key's `version` (see [`STAMP_SQL_ONE_NODE`]); `None` as for [`Self::get_key`].
    pub fn get_stamp(&self, id: &str) -> Option<Result<Option<KeyStamp>>> {
        self.read(|conn| {
            conn.prepare_cached(STAMP_SQL_ONE_NODE)
                .and_then(|mut stmt| {
                    stmt.query_row([id], |row| {
                        Ok(KeyStamp {
                            version: row.get(0)?,
                            last_used_at: row.get::<_, Option<i64>>(1)?.map(from_millis),
                        })
                    })
                    .optional()
                })
        })
    }

    /// Runs `read` on the first free connection.
    fn read<T>(&self, read: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Option<Result<T>> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.conns.len() {
            let conn = match self.conns[(start + i) % self.conns.len()].try_lock() {
                Ok(conn) => conn,
                // Poisoned: a panic mid-read elsewhere; leave that connection alone.
                Err(TryLockError::WouldBlock | TryLockError::Poisoned(_)) => continue,
            };
            return match read(&conn) {
                Ok(v) => Some(Ok(v)),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
                {
                    None
                }
                Err(e) => Some(Err(StoreError::rusqlite("sqlite point read", e))),
            };
        }
        None
    }
}
