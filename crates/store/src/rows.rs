//! Row <-> domain conversions. A row that does not decode is reported as corrupt data,
//! never unwrapped.

use std::collections::BTreeMap;

use keywarden_core::clock::{from_millis, to_millis};
use keywarden_core::hashing::KeyHash;
use keywarden_core::model::{KeyRecord, KeyState, StateCause, TokenRecord};
use keywarden_core::scope::Scope;
use keywarden_core::KeyId;
use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use crate::{Backend, Result, StoreError};

pub(crate) fn decode_error(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {detail}"))
}

pub(crate) fn ms(t: OffsetDateTime) -> i64 {
    to_millis(t)
}

pub(crate) fn opt_ms(t: Option<OffsetDateTime>) -> Option<i64> {
    t.map(to_millis)
}

pub(crate) fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| decode_error("encode json", e))
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| decode_error(what, e))
}

fn key_id(what: &str, s: &str) -> Result<KeyId> {
    KeyId::parse(s).map_err(|e| decode_error(what, e))
}

/// Columns by name, from any driver: keys and audit entries decode the same from sqlx's
/// rows (Any and native PostgreSQL) and from rusqlite's (SQLite point reads and bulk audit
/// reads), through one decoder each.
pub(crate) trait Columns {
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn int(&self, col: &str) -> Result<i64>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
}

impl Columns for AnyRow {
    fn text(&self, col: &str) -> Result<String> {
        Ok(self.try_get(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>> {
        Ok(self.try_get(col)?)
    }
    fn int(&self, col: &str) -> Result<i64> {
        Ok(self.try_get(col)?)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>> {
        Ok(self.try_get(col)?)
    }
}

impl Columns for sqlx::postgres::PgRow {
    fn text(&self, col: &str) -> Result<String> {
        Ok(self.try_get(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>> {
        Ok(self.try_get(col)?)
    }
    fn int(&self, col: &str) -> Result<i64> {
        Ok(self.try_get(col)?)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>> {
        Ok(self.try_get(col)?)
    }
}

/// A rusqlite row of a statement that selects `names` first, read by position.
/// rusqlite finds a column by name by scanning them all with `strlen` and a compare,
/// which for the 28 key columns took a quarter of a verify cache miss's CPU.
pub(crate) struct ByPosition<'r, 's> {
    pub row: &'r rusqlite::Row<'s>,
    pub names: &'static [&'static str],
}

/// The names of a column list written as `a, b, c`.
pub(crate) fn column_names(list: &'static str) -> Vec<&'static str> {
    list.split(',').map(str::trim).collect()
}

pub(crate) static KEY_COLUMN_NAMES: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| column_names(KEY_COLUMNS));

impl<'r, 's> ByPosition<'r, 's> {
    /// A row of a statement that selects [`KEY_COLUMNS`] first.
    pub fn key(row: &'r rusqlite::Row<'s>) -> Self {
        Self {
            row,
            names: &KEY_COLUMN_NAMES,
        }
    }

    /// The position of the first column after `names`.
    pub fn after(&self) -> usize {
        self.names.len()
    }

    fn get<T: rusqlite::types::FromSql>(&self, col: &str) -> Result<T> {
        let at = self
            .names
            .iter()
            .position(|name| *name == col)
            .ok_or_else(|| decode_error(col, "not among the selected columns"))?;
        self.row
            .get(at)
            .map_err(|e| StoreError::rusqlite(col.to_owned(), e))
    }
}

impl Columns for ByPosition<'_, '_> {
    fn text(&self, col: &str) -> Result<String> {
        self.get(col)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>> {
        self.get(col)
    }
    fn int(&self, col: &str) -> Result<i64> {
        self.get(col)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>> {
        self.get(col)
    }
}

fn hash(row: &impl Columns) -> Result<KeyHash> {
    let version: i64 = row.int("pepper_version")?;
    let hex: String = row.text("hash")?;
    let version = u32::try_from(version).map_err(|e| decode_error("pepper_version", e))?;
    KeyHash::from_hex(version, &hex).ok_or_else(|| decode_error("hash", "not 64 hex characters"))
}

fn u64_of(what: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|e| decode_error(what, e))
}

pub(crate) const KEY_COLUMNS: &str = "seq, id, hash, pepper_version, hint, name, description, \
    owner, systems, environment, scopes, created_at, created_by, expires_at, state, state_reason, \
    state_changed_at, allowed_cidrs, max_uses, uses, batched_uses, last_used_at, last_used_from, \
    rotated_from, rotated_to, metadata, version, state_cause, rate_limit, canary";

/// Keys with their usage stats; column names do not overlap, so filters need no prefix.
pub(crate) const KEY_FROM: &str = "keys LEFT JOIN key_usage ON key_usage.key_id = keys.id";

/// What tells a cached key apart from the stored one: its `version` (bumped by every
/// lifecycle change) and its folded `last_used_at` (uses through other nodes).
pub(crate) const STAMP_SQL: &str = "SELECT version, last_used_at FROM keys \
    LEFT JOIN key_usage ON key_usage.key_id = keys.id WHERE id = $1";

/// SQLite serves one node, which answered every use itself, so only the version is read,
/// from the `keys_id_version` index alone.
pub(crate) const STAMP_SQL_ONE_NODE: &str = "SELECT version, NULL FROM keys WHERE id = $1";

pub(crate) fn key_from_row(row: &impl Columns) -> Result<KeyRecord> {
    let state = row.text("state")?;
    let scopes: Vec<String> = from_json("scopes", &row.text("scopes")?)?;
    let cidrs: Vec<String> = from_json("allowed_cidrs", &row.text("allowed_cidrs")?)?;
    Ok(KeyRecord {
        id: key_id("id", &row.text("id")?)?,
        hash: hash(row)?,
        hint: row.text("hint")?,
        name: row.text("name")?,
        description: row.text("description")?,
        owner: row.text("owner")?,
        systems: from_json("systems", &row.text("systems")?)?,
        environment: row.text("environment")?,
        scopes: scopes
            .iter()
            .map(|s| Scope::granted(s).map_err(|e| decode_error("scopes", e)))
            .collect::<Result<_>>()?,
        created_at: from_millis(row.int("created_at")?),
        created_by: row.text("created_by")?,
        expires_at: from_millis(row.int("expires_at")?),
        state: state
            .parse::<KeyState>()
            .map_err(|e| decode_error("state", e))?,
        state_reason: row.opt_text("state_reason")?,
        state_cause: row
            .opt_text("state_cause")?
            .map(|c| {
                StateCause::from_code(&c)
                    .ok_or_else(|| decode_error("state_cause", "unknown cause"))
            })
            .transpose()?,
        state_changed_at: row.opt_int("state_changed_at")?.map(from_millis),
        allowed_cidrs: cidrs
            .iter()
            .map(|c| c.parse().map_err(|e| decode_error("allowed_cidrs", e)))
            .collect::<Result<_>>()?,
        max_uses: row
            .opt_int("max_uses")?
            .map(|v| u64_of("max_uses", v))
            .transpose()?,
        uses: u64_of("uses", row.int("uses")?)?
            + u64_of("batched_uses", row.opt_int("batched_uses")?.unwrap_or(0))?,
        last_used_at: row.opt_int("last_used_at")?.map(from_millis),
        last_used_from: row.opt_text("last_used_from")?,
        rotated_from: row
            .opt_text("rotated_from")?
            .map(|s| key_id("rotated_from", &s))
            .transpose()?,
        rotated_to: row
            .opt_text("rotated_to")?
            .map(|s| key_id("rotated_to", &s))
            .transpose()?,
        metadata: from_json::<BTreeMap<String, String>>("metadata", &row.text("metadata")?)?,
        rate_limit: row
            .opt_text("rate_limit")?
            .map(|r| r.parse().map_err(|e| decode_error("rate_limit", e)))
            .transpose()?,
        canary: row.int("canary")? != 0,
        version: row.int("version")?,
    })
}

pub(crate) fn token_from_row(row: &AnyRow) -> Result<TokenRecord> {
    let role: String = row.try_get("role")?;
    Ok(TokenRecord {
        id: key_id("id", &row.try_get::<String, _>("id")?)?,
        hash: hash(row)?,
        hint: row.try_get("hint")?,
        name: row.try_get("name")?,
        owner: row.try_get("owner")?,
        role: role.parse().map_err(|e| decode_error("role", e))?,
        environments: row
            .try_get::<Option<String>, _>("environments")?
            .map(|s| from_json("environments", &s))
            .transpose()?,
        created_at: from_millis(row.try_get("created_at")?),
        created_by: row.try_get("created_by")?,
        expires_at: row
            .try_get::<Option<i64>, _>("expires_at")?
            .map(from_millis),
        revoked_at: row
            .try_get::<Option<i64>, _>("revoked_at")?
            .map(from_millis),
        last_used_at: row
            .try_get::<Option<i64>, _>("last_used_at")?
            .map(from_millis),
    })
}

/// Collects the parameters of a query assembled at run time, and writes its placeholders:
/// `$N` for PostgreSQL, anonymous `?` for SQLite. (SQLite resolves named and numbered
/// parameters through a list scanned linearly, so a 4000-parameter batch insert written with
/// `$N` spends its time in prepare and bind: quadratic. Fixed queries keep `$N`.)
/// Placeholders must be pushed in the order they appear in the SQL text.
pub(crate) struct Params {
    backend: Backend,
    pub values: Vec<Param>,
}

pub(crate) enum Param {
    Int(i64),
    Text(String),
}

impl Params {
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            values: Vec::new(),
        }
    }

    fn placeholder(&self) -> String {
        match self.backend {
            Backend::Sqlite => "?".to_owned(),
            Backend::Postgres => format!("${}", self.values.len()),
        }
    }

    pub fn push_int(&mut self, v: i64) -> String {
        self.values.push(Param::Int(v));
        self.placeholder()
    }

    pub fn push_text(&mut self, v: impl Into<String>) -> String {
        self.values.push(Param::Text(v.into()));
        self.placeholder()
    }

    pub fn bind<'q>(
        self,
        mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        for p in self.values {
            q = match p {
                Param::Int(v) => q.bind(v),
                Param::Text(v) => q.bind(v),
            };
        }
        q
    }
}

pub(crate) use keywarden_core::model::AuditEntry;

/// Writes one audit entry inside the caller's transaction: the change and its audit row
/// commit together or not at all. The entry is chained to the head, which this
/// transaction then holds until it ends, so chained writes take turns.
pub(crate) async fn insert_audit(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    e: &AuditEntry,
) -> Result<()> {
    crate::audit::append(tx, e).await.map(|_| ())
}
