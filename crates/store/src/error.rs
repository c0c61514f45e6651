//! Store errors by kind, not by driver: the caller decides how to answer (retry later,
//! report a conflict, raise an alarm) from the kind alone, whichever driver failed. The
//! driver's error stays attached as the source, for the log.

use std::borrow::Cow;
use std::fmt;

use rusqlite::ffi;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or written: no connection within the pool's wait,
    /// a connection lost, I/O failing, a full disk, a read-only file, a server shutting
    /// down or out of resources. Also any refusal no other kind names (an exception a
    /// trigger raised, a failed COMMIT): the work was not done, and the driver's error in
    /// the log tells whether trying again can help.
    #[error("the database is unavailable: {0}")]
    Unavailable(#[source] DriverError),
    /// Another writer holds what this one needs (SQLite BUSY or LOCKED, a PostgreSQL
    /// serialization failure, deadlock or lock wait refused); trying again soon may work.
    #[error("the database is busy: {0}")]
    Busy(#[source] DriverError),
    /// The write breaks a constraint of the stored data (unique, foreign key, check, not
    /// null).
    #[error("the write conflicts with stored data: {0}")]
    Conflict(#[source] DriverError),
    /// Stored data that does not decode, or a database file the engine calls corrupt.
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Rows sit in the audit trail (or the key event outbox) past the head the store
    /// recorded: written around keywarden. Audited writes refuse to chain onto them.
    #[error(
        "the audit trail holds entries past its recorded head (seq {head}, found up to \
         {found}): they were written around keywarden; nothing was changed. Run \
         `keywarden audit verify` to see them and `keywarden audit quarantine` to move them \
         out of the trail"
    )]
    AuditPastHead { head: i64, found: i64 },
    #[error("unsupported database url: expected sqlite://PATH (a file) or postgres://")]
    UnsupportedUrl,
    /// The store's own machinery failed, not the database: a worker thread panicked, or a
    /// lock was poisoned by one that did.
    #[error("store internal failure: {0}")]
    Internal(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The kinds of [`StoreError`], without their payload: for counting failures by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreErrorKind {
    Unavailable,
    Busy,
    Conflict,
    Corrupt,
    Migrate,
    AuditPastHead,
    UnsupportedUrl,
    Internal,
}

impl StoreErrorKind {
    pub const ALL: [StoreErrorKind; 8] = [
        Self::Unavailable,
        Self::Busy,
        Self::Conflict,
        Self::Corrupt,
        Self::Migrate,
        Self::AuditPastHead,
        Self::UnsupportedUrl,
        Self::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::Busy => "busy",
            Self::Conflict => "conflict",
            Self::Corrupt => "corrupt",
            Self::Migrate => "migrate",
            Self::AuditPastHead => "audit_past_head",
            Self::UnsupportedUrl => "unsupported_url",
            Self::Internal => "internal",
        }
    }
}

impl StoreError {
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            Self::Unavailable(_) => StoreErrorKind::Unavailable,
            Self::Busy(_) => StoreErrorKind::Busy,
            Self::Conflict(_) => StoreErrorKind::Conflict,
            Self::Corrupt(_) => StoreErrorKind::Corrupt,
            Self::Migrate(_) => StoreErrorKind::Migrate,
            Self::AuditPastHead { .. } => StoreErrorKind::AuditPastHead,
            Self::UnsupportedUrl => StoreErrorKind::UnsupportedUrl,
            Self::Internal(_) => StoreErrorKind::Internal,
        }
    }
}

/// A driver's error, with what the store was doing when it came when that says more
/// than the error itself (the rusqlite connections: the usage sink, point reads).
#[derive(Debug)]
pub struct DriverError {
    doing: Option<Cow<'static, str>>,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.doing {
            Some(doing) => write!(f, "{doing}: {}", self.source),
            None => write!(f, "{}", self.source),
        }
    }
}

impl std::error::Error for DriverError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// The kinds a driver's error can be, before it is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unavailable,
    Busy,
    Conflict,
    Corrupt,
}

impl StoreError {
    /// A rusqlite error, classified, with what the store was doing.
    pub(crate) fn rusqlite(doing: impl Into<Cow<'static, str>>, e: rusqlite::Error) -> Self {
        let kind = rusqlite_kind(&e);
        Self::of_kind(kind, Some(doing.into()), Box::new(e))
    }

    fn of_kind(
        kind: Kind,
        doing: Option<Cow<'static, str>>,
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    ) -> Self {
        if kind == Kind::Corrupt {
            return Self::Corrupt(match doing {
                Some(doing) => format!("{doing}: {source}"),
                None => source.to_string(),
            });
        }
        let e = DriverError { doing, source };
        match kind {
            Kind::Busy => Self::Busy(e),
            Kind::Conflict => Self::Conflict(e),
            Kind::Unavailable | Kind::Corrupt => Self::Unavailable(e),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let kind = rusqlite_kind(&e);
        Self::of_kind(kind, None, Box::new(e))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        let e = match e {
            E::Migrate(m) => return Self::Migrate(*m),
            e => e,
        };
        let kind = match &e {
            // SQLite's codes are numbers and so are many SQLSTATEs: the driver tells them
            // apart, not the code.
            E::Database(db) => match (
                db.code(),
                db.try_downcast_ref::<sqlx::sqlite::SqliteError>(),
            ) {
                (None, _) => Kind::Unavailable,
                (Some(code), Some(_)) => code.parse().map_or(Kind::Unavailable, sqlite_kind),
                (Some(code), None) => sqlstate_kind(&code),
            },
            E::RowNotFound
            | E::TypeNotFound { .. }
            | E::ColumnIndexOutOfBounds { .. }
            | E::ColumnNotFound(_)
            | E::ColumnDecode { .. }
            | E::Decode(_)
            | E::AnyDriverError(_) => Kind::Corrupt,
            _ => Kind::Unavailable,
        };
        Self::of_kind(kind, None, Box::new(e))
    }
}

fn rusqlite_kind(e: &rusqlite::Error) -> Kind {
    use rusqlite::Error as E;
    match e {
        E::SqliteFailure(f, _) => sqlite_kind(f.extended_code),
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::Utf8Error(_)
        | E::InvalidColumnIndex(_)
        | E::InvalidColumnName(_)
        | E::InvalidColumnType(..)
        | E::QueryReturnedNoRows => Kind::Corrupt,
        _ => Kind::Unavailable,
    }
}

/// By SQLite's extended result code.
fn sqlite_kind(extended: i32) -> Kind {
    match extended {
        // A trigger's RAISE(ABORT), a commit hook or a function refusing is the database
        // declining the work, not the data conflicting: those stay Unavailable.
        ffi::SQLITE_CONSTRAINT
        | ffi::SQLITE_CONSTRAINT_UNIQUE
        | ffi::SQLITE_CONSTRAINT_PRIMARYKEY
        | ffi::SQLITE_CONSTRAINT_ROWID
        | ffi::SQLITE_CONSTRAINT_FOREIGNKEY
        | ffi::SQLITE_CONSTRAINT_CHECK
        | ffi::SQLITE_CONSTRAINT_NOTNULL => Kind::Conflict,
        _ => match extended & 0xff {
            ffi::SQLITE_BUSY | ffi::SQLITE_LOCKED => Kind::Busy,
            ffi::SQLITE_CORRUPT | ffi::SQLITE_NOTADB => Kind::Corrupt,
            _ => Kind::Unavailable,
        },
    }
}

/// By PostgreSQL's SQLSTATE.
fn sqlstate_kind(code: &str) -> Kind {
    match code {
        // serialization_failure, deadlock_detected, lock_not_available
        "40001" | "40P01" | "55P03" => Kind::Busy,
        // data_corrupted, index_corrupted
        "XX001" | "XX002" => Kind::Corrupt,
        // integrity_constraint_violation: unique, foreign key, check, not null, exclusion
        c if c.starts_with("23") => Kind::Conflict,
        // 08 connection, 53 insufficient resources (disk full), 57 operator intervention
        // (admin shutdown, cannot connect now), 58 system errors, and the rest.
        _ => Kind::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rusqlite::Connection;

    use super::*;

    /// A database file removed (with its WAL) when dropped.
    struct TempDb(std::path::PathBuf);

    impl Drop for TempDb {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = self.0.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn db() -> (TempDb, std::path::PathBuf) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "keywarden-store-error-{}-{}.db",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; \
             CREATE TABLE t (id TEXT PRIMARY KEY, body TEXT NOT NULL, n INTEGER CHECK (n > 0)); \
             CREATE TABLE u (tag TEXT UNIQUE); INSERT INTO u VALUES ('x');",
        )
        .unwrap();
        (TempDb(path.clone()), path)
    }

    /// A write while another connection holds the write lock, with no busy wait.
    #[test]
    fn sqlite_busy_is_busy() {
        let (_dir, path) = db();
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let writer = Connection::open(&path).unwrap();
        writer.busy_timeout(Duration::ZERO).unwrap();
        let e = writer
            .execute("INSERT INTO t VALUES ('a', '{}', 1)", [])
            .unwrap_err();
        assert!(
            matches!(StoreError::rusqlite("test write", e), StoreError::Busy(_)),
            "a held write lock is Busy"
        );
    }

    #[test]
    fn sqlite_constraints_are_conflicts() {
        let (_dir, path) = db();
        let conn = Connection::open(&path).unwrap();
        conn.execute("INSERT INTO t VALUES ('a', '{}', 1)", [])
            .unwrap();
        for sql in [
            "INSERT INTO t VALUES ('a', '{}', 1)",
            "INSERT INTO u VALUES ('x')",
            "INSERT INTO t VALUES ('b', NULL, 1)",
            "INSERT INTO t VALUES ('c', '{}', 0)",
        ] {
            let e = StoreError::from(conn.execute(sql, []).unwrap_err());
            assert!(matches!(e, StoreError::Conflict(_)), "{sql}: {e:?}");
        }
    }

    /// A trigger refusing the write says nothing about the data: it stays Unavailable.
    #[test]
    fn sqlite_trigger_refusal_is_unavailable() {
        let (_dir, path) = db();
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TRIGGER down BEFORE INSERT ON t BEGIN SELECT RAISE(ABORT, 'device full'); END",
        )
        .unwrap();
        let e = StoreError::from(
            conn.execute("INSERT INTO t VALUES ('a', '{}', 1)", [])
                .unwrap_err(),
        );
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(e.to_string().contains("device full"), "{e}");
    }

    #[test]
    fn sqlite_read_only_file_is_unavailable() {
        let (_dir, path) = db();
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap();
        let e = conn
            .execute("INSERT INTO t VALUES ('a', '{}', 1)", [])
            .unwrap_err();
        assert!(matches!(
            StoreError::rusqlite("read-only write", e),
            StoreError::Unavailable(_)
        ));
    }

    /// Stored JSON that does not parse and a column of the wrong type are Corrupt, with
    /// what was being read.
    #[test]
    fn undecodable_rows_are_corrupt() {
        let (_dir, path) = db();
        let conn = Connection::open(&path).unwrap();
        conn.execute("INSERT INTO t VALUES ('a', '{\"scopes\": [', 1)", [])
            .unwrap();
        let body: String = conn
            .query_row("SELECT body FROM t", [], |r| r.get(0))
            .unwrap();
        let e = serde_json::from_str::<serde_json::Value>(&body)
            .map_err(|e| crate::rows::decode_error("scopes", e))
            .unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
        let e = conn
            .query_row("SELECT body FROM t", [], |r| r.get::<_, i64>(0))
            .unwrap_err();
        match StoreError::rusqlite("body", e) {
            StoreError::Corrupt(m) => assert!(m.starts_with("body: "), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    /// The same through sqlx, as the pool meets them: a duplicate key and a busy database.
    #[tokio::test]
    async fn sqlx_sqlite_errors_have_the_same_kinds() {
        use sqlx::{Connection as _, Executor as _};
        let (_dir, path) = db();
        let url = format!("sqlite://{}", path.display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        conn.execute("INSERT INTO t VALUES ('a', '{}', 1)")
            .await
            .unwrap();
        let e = StoreError::from(
            conn.execute("INSERT INTO t VALUES ('a', '{}', 1)")
                .await
                .unwrap_err(),
        );
        assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");

        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        conn.execute("PRAGMA busy_timeout = 0").await.unwrap();
        let e = StoreError::from(
            conn.execute("INSERT INTO t VALUES ('b', '{}', 1)")
                .await
                .unwrap_err(),
        );
        assert!(matches!(e, StoreError::Busy(_)), "{e:?}");
        drop(holder);

        let e = StoreError::from(
            sqlx::query_scalar::<_, i64>("SELECT body FROM t")
                .fetch_one(&mut conn)
                .await
                .unwrap_err(),
        );
        assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
    }

    #[test]
    fn sqlstates_by_class() {
        for (code, kind) in [
            ("23505", Kind::Conflict),
            ("23503", Kind::Conflict),
            ("23514", Kind::Conflict),
            ("40001", Kind::Busy),
            ("40P01", Kind::Busy),
            ("55P03", Kind::Busy),
            ("08006", Kind::Unavailable),
            ("53100", Kind::Unavailable),
            ("57P01", Kind::Unavailable),
            ("P0001", Kind::Unavailable),
            ("XX001", Kind::Corrupt),
        ] {
            assert_eq!(sqlstate_kind(code), kind, "{code}");
        }
    }

    /// A real PostgreSQL answer, when one is reachable: a duplicate key is a Conflict,
    /// a lock wait cut short by `lock_timeout` is Busy.
    #[tokio::test]
    async fn postgres_errors_by_kind() {
        use sqlx::{Connection as _, Executor as _};
        let url = std::env::var("KEYWARDEN_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let Ok(mut a) = sqlx::PgConnection::connect(&url).await else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL must be reachable in CI"
            );
            eprintln!("SKIPPED: PostgreSQL not reachable");
            return;
        };
        let mut b = sqlx::PgConnection::connect(&url).await.unwrap();
        a.execute("CREATE TEMP TABLE t (id TEXT PRIMARY KEY)")
            .await
            .unwrap();
        a.execute("INSERT INTO t VALUES ('a')").await.unwrap();
        let e = StoreError::from(a.execute("INSERT INTO t VALUES ('a')").await.unwrap_err());
        assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");

        // A lock only a second session can wait on: an advisory lock of this test's own.
        let key = (i64::from(std::process::id()) << 16) | 0x6b77;
        a.execute(&*format!("SELECT pg_advisory_lock({key})"))
            .await
            .unwrap();
        b.execute("SET lock_timeout = '10ms'").await.unwrap();
        let e = StoreError::from(
            b.execute(&*format!("SELECT pg_advisory_lock({key})"))
                .await
                .unwrap_err(),
        );
        assert!(matches!(e, StoreError::Busy(_)), "{e:?}");
        a.execute(&*format!("SELECT pg_advisory_unlock({key})"))
            .await
            .unwrap();
    }
}
