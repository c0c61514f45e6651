//! Reading the audit trail on SQLite through rusqlite: sqlx's SQLite driver hands rows
//! over one at a time from its worker thread and capped a chain walk at about 90,000
//! entries/s; a plain read-only connection reads them several times faster
//! (`docs/benchmarks.md`). Queries are the same text as on the sqlx path.

use std::path::Path;
use std::sync::{Arc, Mutex};

use keywarden_core::audit_chain::SealedEntry;
use rusqlite::{Connection, OpenFlags};

use crate::audit::{entry_from_row, AUDIT_COLUMN_NAMES};
use crate::rows::{ByPosition, Param};
use crate::sqlite::usage::lock;
use crate::{Result, StoreError};

#[derive(Clone)]
pub(crate) struct SqliteAuditReader {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteAuditReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteAuditReader")
    }
}

fn err(e: rusqlite::Error) -> StoreError {
    StoreError::rusqlite("sqlite audit read", e)
}

impl SqliteAuditReader {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs a query built by `Store::audit_entries` (anonymous `?` placeholders).
    pub async fn query(&self, sql: String, params: Vec<Param>) -> Result<Vec<SealedEntry>> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = lock(&conn)?;
            let mut stmt = conn.prepare_cached(&sql).map_err(err)?;
            let values = params.iter().map(|p| match p {
                Param::Int(v) => rusqlite::types::Value::Integer(*v),
                Param::Text(v) => rusqlite::types::Value::Text(v.clone()),
            });
            let mut rows = stmt
                .query(rusqlite::params_from_iter(values))
                .map_err(err)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(err)? {
                out.push(entry_from_row(&ByPosition {
                    row: r,
                    names: &AUDIT_COLUMN_NAMES,
                })?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("audit read task failed: {e}")))?
    }
}
