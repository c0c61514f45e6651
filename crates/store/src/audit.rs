//! The audit trail: a hash chain (core's `audit_chain`) in `audit_events`, its head in
//! `audit_head`, and the ranges moved to archive files in `audit_archives`.
//!
//! Entries are written only inside the transactions of the changes themselves
//! (`rows::insert_audit` → [`append`]): if the entry cannot be written, the change rolls
//! back with it.

use keywarden_core::audit_chain::{
    canonicalize_details, from_hex, to_hex, ChainHash, SealedEntry, GENESIS,
};
use keywarden_core::clock::from_millis;
use keywarden_core::model::{Actor, AuditEntry};
use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use crate::rows::{column_names, ms, Columns, Params};
use crate::{Engine, Result, Store, StoreError};

pub(crate) const COLUMNS: &str =
    "seq, time, actor, actor_name, source_ip, user_agent, request_id, action, \
    target, reason, details, prev_hash, hash";

/// Which entries to read. Every filter is optional.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub target: Option<String>,
    /// Matches the actor's id (`token:…`, `system:…`) or its name.
    pub actor: Option<String>,
    /// An action (`key.revoked`), or a prefix ending in `*` (`key.*`).
    pub action: Option<String>,
    pub since: Option<OffsetDateTime>,
    /// Exclusive.
    pub until: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOrder {
    OldestFirst,
    NewestFirst,
}

/// A range of the chain moved out to an archive file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveRecord {
    pub first_seq: i64,
    pub last_seq: i64,
    pub last_hash: ChainHash,
    pub entries: i64,
    pub file_sha256: String,
    pub archived_at: OffsetDateTime,
    pub archived_by: String,
}

/// What an archive request asks: remove `first_seq..=last_seq` provided the live chain
/// still starts at `first_seq` and entry `last_seq` still has `last_hash` (the file was
/// made from exactly these entries).
#[derive(Debug, Clone)]
pub struct ArchiveRequest {
    pub first_seq: i64,
    pub last_seq: i64,
    pub last_hash: ChainHash,
    pub file_sha256: String,
    pub at: OffsetDateTime,
    pub by: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveOutcome {
    Archived(ArchiveRecord),
    /// The live chain does not start at `first_seq` or does not reach `last_seq`.
    RangeMismatch {
        live_first: Option<i64>,
    },
    /// Entry `last_seq` no longer has the hash the file holds.
    HashMismatch,
}

/// A stored hash column as bytes; a value that is not 64 hex characters (only tampering
/// writes one) becomes a hash no entry can have, so the walk reports it.
fn stored_hash(s: Option<String>) -> ChainHash {
    s.as_deref().and_then(from_hex).unwrap_or([0xff; 32])
}

/// One stored row, decoded.
pub(crate) struct RawAuditRow {
    pub seq: i64,
    pub time: i64,
    pub actor: String,
    pub actor_name: String,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub action: String,
    pub target: String,
    pub reason: Option<String>,
    pub details: String,
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
}

impl RawAuditRow {
    pub fn sealed(self) -> SealedEntry {
        SealedEntry {
            seq: self.seq,
            entry: AuditEntry {
                time: from_millis(self.time),
                actor: Actor {
                    id: self.actor,
                    name: self.actor_name,
                    source_ip: self.source_ip,
                    user_agent: self.user_agent,
                    request_id: self.request_id,
                },
                action: self.action,
                target: self.target,
                reason: self.reason,
                details: self.details,
            },
            prev_hash: stored_hash(self.prev_hash),
            hash: stored_hash(self.hash),
        }
    }
}

/// The one decoder of audit rows, for either driver (see [`Columns`]).
pub(crate) fn entry_from_row(r: &impl Columns) -> Result<SealedEntry> {
    Ok(RawAuditRow {
        seq: r.int("seq")?,
        time: r.int("time")?,
        actor: r.text("actor")?,
        actor_name: r.text("actor_name")?,
        source_ip: r.opt_text("source_ip")?,
        user_agent: r.opt_text("user_agent")?,
        request_id: r.opt_text("request_id")?,
        action: r.text("action")?,
        target: r.text("target")?,
        reason: r.opt_text("reason")?,
        details: r.text("details")?,
        prev_hash: r.opt_text("prev_hash")?,
        hash: r.opt_text("hash")?,
    }
    .sealed())
}

pub(crate) static AUDIT_COLUMN_NAMES: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| column_names(COLUMNS));

/// Appends `e` to the chain inside `tx`; returns its seq.
pub(crate) async fn append(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    e: &AuditEntry,
) -> Result<i64> {
    append_many(tx, std::slice::from_ref(e)).await
}

/// Appends `entries`, in order, inside `tx`. Taking the head row first serialises chained
/// writers; each entry's hash covers its seq, so its place cannot change unnoticed.
/// Returns the seq of the last entry (0 when there were none).
async fn append_many(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    entries: &[AuditEntry],
) -> Result<i64> {
    let Some(n) = i64::try_from(entries.len()).ok().filter(|n| *n > 0) else {
        return Ok(0);
    };
    let head = sqlx::query("UPDATE audit_head SET seq = seq + $1 WHERE id = 1 RETURNING seq, hash")
        .bind(n)
        .fetch_one(&mut **tx)
        .await?;
    let end: i64 = head.try_get("seq")?;
    check_nothing_past_head(tx, end - n).await?;
    let prev_text: String = head.try_get("hash")?;
    let mut prev = from_hex(&prev_text)
        .ok_or_else(|| StoreError::Corrupt("audit_head.hash is not a SHA-256 hex".into()))?;
    for (seq, e) in (end - n + 1..).zip(entries) {
        let entry = AuditEntry {
            details: canonicalize_details(&e.details),
            ..e.clone()
        };
        let sealed = SealedEntry::seal(seq, entry, prev);
        insert_sealed(tx, &sealed).await?;
        insert_key_event(tx, &sealed).await?;
        prev = sealed.hash;
    }
    sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
        .bind(to_hex(&prev))
        .execute(&mut **tx)
        .await?;
    Ok(end)
}

/// The newest seq in the trail and in the outbox, each 0 when empty.
async fn newest_rows(tx: &mut sqlx::Transaction<'static, sqlx::Any>) -> Result<(i64, i64)> {
    let row = sqlx::query(
        "SELECT (SELECT COALESCE(MAX(seq), 0) FROM audit_events) AS audit, \
         (SELECT COALESCE(MAX(seq), 0) FROM key_events) AS events",
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok((row.try_get("audit")?, row.try_get("events")?))
}

/// Refuses to chain onto rows past the head: a forged entry (or outbox event) there
/// would otherwise collide with the next real one, or sit in the trail unverified.
/// Two primary-key lookups; the caller holds the head row, so no writer races it.
async fn check_nothing_past_head(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    head: i64,
) -> Result<()> {
    let (audit, events) = newest_rows(tx).await?;
    let found = audit.max(events);
    if found > head {
        return Err(StoreError::AuditPastHead { head, found });
    }
    Ok(())
}

async fn quarantine_row(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    batch: i64,
    source: &str,
    seq: i64,
    row: &serde_json::Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_quarantine (id, source, seq, row_json, quarantined_at) \
         VALUES ($1, $2, $3, $4, $1)",
    )
    .bind(batch)
    .bind(source)
    .bind(seq)
    .bind(row.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What `quarantine_past_head` moved out of the trail and the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub head: i64,
    pub audit_rows: Vec<i64>,
    pub event_rows: Vec<i64>,
}

/// A key's entry (`key.*` on `key:<id>`) is also an event for connected services,
/// written with it; so is an alert on a source (`source.alert` on `source:<network>`,
/// such as BRUTE_FORCE), stored with an empty key id ([`KeyEvent::kind`]).
async fn insert_key_event(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    s: &SealedEntry,
) -> Result<()> {
    let e = &s.entry;
    let (key_id, event) = match (e.target.strip_prefix("key:"), e.action.strip_prefix("key.")) {
        (Some(key_id), Some(event)) => (key_id, event),
        _ if e.action == "source.alert" && e.target.starts_with("source:") => ("", "alert"),
        _ => return Ok(()),
    };
    sqlx::query(
        "INSERT INTO key_events (seq, time, key_id, event, reason, actor, details) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(s.seq)
    .bind(ms(e.time))
    .bind(key_id)
    .bind(event)
    .bind(&e.reason)
    .bind(&e.actor.id)
    .bind(&e.details)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One row of the key event outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEvent {
    pub seq: i64,
    pub time: OffsetDateTime,
    /// Empty for an alert on a source, which names no key.
    pub key_id: String,
    /// `created`, `suspended`, `resumed`, `revoked`, `rotated`, `expired`,
    /// `expiry_notice`, `rotation_overdue`, `policy_violation`.
    pub event: String,
    pub reason: Option<String>,
    pub actor: String,
    /// The audit entry's details, canonical JSON.
    pub details: String,
}

impl KeyEvent {
    /// The event's type as services see it: `key.<event>`, or `source.<event>` for an
    /// event that names no key (an alert on a source network).
    pub fn kind(&self) -> String {
        if self.key_id.is_empty() {
            format!("source.{}", self.event)
        } else {
            format!("key.{}", self.event)
        }
    }

    /// The key the event is about; `None` for a source's event.
    pub fn key(&self) -> Option<&str> {
        Some(self.key_id.as_str()).filter(|k| !k.is_empty())
    }
}

pub(crate) const KEY_EVENT_COLUMNS: &str = "seq, time, key_id, event, reason, actor, details";

pub(crate) fn key_event_from_row(r: &AnyRow) -> Result<KeyEvent> {
    Ok(KeyEvent {
        seq: r.try_get("seq")?,
        time: from_millis(r.try_get("time")?),
        key_id: r.try_get("key_id")?,
        event: r.try_get("event")?,
        reason: r.try_get("reason")?,
        actor: r.try_get("actor")?,
        details: r.try_get("details")?,
    })
}

impl Store {
    /// Events after `seq`, oldest first.
    pub async fn key_events_after(&self, seq: i64, limit: u32) -> Result<Vec<KeyEvent>> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_EVENT_COLUMNS} FROM key_events WHERE seq > $1 \
             AND seq <= (SELECT seq FROM audit_head WHERE id = 1) ORDER BY seq LIMIT $2"
        ))
        .bind(seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_event_from_row).collect()
    }

    /// The newest event about `key_id` among `events`.
    pub async fn latest_key_event(
        &self,
        key_id: &str,
        events: &[&str],
    ) -> Result<Option<KeyEvent>> {
        let mut p = Params::new(self.backend());
        let key = p.push_text(key_id);
        let list: Vec<String> = events.iter().map(|e| p.push_text(*e)).collect();
        if list.is_empty() {
            return Ok(None);
        }
        let sql = format!(
            "SELECT {KEY_EVENT_COLUMNS} FROM key_events WHERE key_id = {key} AND event IN ({}) \
             ORDER BY seq DESC LIMIT 1",
            list.join(", ")
        );
        let row = p.bind(sqlx::query(&sql)).fetch_optional(&self.pool).await?;
        row.as_ref().map(key_event_from_row).transpose()
    }

    /// The highest seq in the outbox (0 when empty).
    pub async fn key_events_head(&self) -> Result<i64> {
        let row = sqlx::query(
            "SELECT COALESCE(MAX(seq), 0) AS head FROM key_events \
             WHERE seq <= (SELECT seq FROM audit_head WHERE id = 1)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("head")?)
    }
}

async fn insert_sealed(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    s: &SealedEntry,
) -> Result<()> {
    let e = &s.entry;
    sqlx::query(&format!(
        "INSERT INTO audit_events ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
         $11, $12, $13)"
    ))
    .bind(s.seq)
    .bind(ms(e.time))
    .bind(&e.actor.id)
    .bind(&e.actor.name)
    .bind(&e.actor.source_ip)
    .bind(&e.actor.user_agent)
    .bind(&e.actor.request_id)
    .bind(&e.action)
    .bind(&e.target)
    .bind(&e.reason)
    .bind(&e.details)
    .bind(to_hex(&s.prev_hash))
    .bind(to_hex(&s.hash))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Chains entries written before the trail had a chain (migration 0003), oldest first,
    /// renumbered without gaps. Only while the chain has never been started (head at seq
    /// 0): once it has, a row without a hash is tampering, left for `audit verify` to
    /// name, and opening the store reads nothing from the trail.
    pub(crate) async fn seal_unchained_audit(&self) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&mut **tx)
            .await?;
        let mut seq: i64 = head.try_get("seq")?;
        if seq != 0 {
            return Ok(0);
        }
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM audit_events WHERE hash IS NULL ORDER BY seq"
        ))
        .fetch_all(&mut **tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut prev = from_hex(&head.try_get::<String, _>("hash")?)
            .ok_or_else(|| StoreError::Corrupt("audit_head.hash is not a SHA-256 hex".into()))?;
        for row in &rows {
            let old = entry_from_row(row)?;
            seq += 1;
            let entry = AuditEntry {
                details: canonicalize_details(&old.entry.details),
                ..old.entry
            };
            let sealed = SealedEntry::seal(seq, entry, prev);
            sqlx::query(
                "UPDATE audit_events SET seq = $1, details = $2, prev_hash = $3, hash = $4 \
                 WHERE seq = $5",
            )
            .bind(seq)
            .bind(&sealed.entry.details)
            .bind(to_hex(&sealed.prev_hash))
            .bind(to_hex(&sealed.hash))
            .bind(old.seq)
            .execute(&mut **tx)
            .await?;
            prev = sealed.hash;
        }
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(seq)
            .bind(to_hex(&prev))
            .execute(&mut **tx)
            .await?;
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    /// Appends entries that accompany no other change (imports, bulk jobs), in order, in
    /// one transaction.
    pub async fn append_audit(&self, entries: &[AuditEntry]) -> Result<()> {
        let mut tx = self.begin_write().await?;
        append_many(&mut tx, entries).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The entries of one target, oldest first.
    pub async fn audit_for(&self, target: &str) -> Result<Vec<AuditEntry>> {
        let filter = AuditFilter {
            target: Some(target.to_owned()),
            ..AuditFilter::default()
        };
        let (entries, _) = self
            .audit_entries(&filter, AuditOrder::OldestFirst, None, 100_000)
            .await?;
        Ok(entries.into_iter().map(|s| s.entry).collect())
    }

    /// One page of entries. `cursor` is the seq the previous page ended at (exclusive);
    /// the returned cursor is set when there may be more.
    pub async fn audit_entries(
        &self,
        filter: &AuditFilter,
        order: AuditOrder,
        cursor: Option<i64>,
        limit: u32,
    ) -> Result<(Vec<SealedEntry>, Option<i64>)> {
        let mut p = Params::new(self.backend());
        let mut clauses: Vec<String> = Vec::new();
        if let Some(t) = &filter.target {
            clauses.push(format!("target = {}", p.push_text(t)));
        }
        if let Some(a) = &filter.actor {
            let id = p.push_text(a);
            let name = p.push_text(a);
            clauses.push(format!("(actor = {id} OR actor_name = {name})"));
        }
        if let Some(a) = &filter.action {
            match a.strip_suffix('*') {
                Some(prefix) => {
                    let escaped = prefix
                        .replace('\\', "\\\\")
                        .replace('%', "\\%")
                        .replace('_', "\\_");
                    let pattern = p.push_text(format!("{escaped}%"));
                    clauses.push(format!("action LIKE {pattern} ESCAPE '\\'"));
                }
                None => clauses.push(format!("action = {}", p.push_text(a))),
            }
        }
        if let Some(t) = filter.since {
            clauses.push(format!("time >= {}", p.push_int(ms(t))));
        }
        if let Some(t) = filter.until {
            clauses.push(format!("time < {}", p.push_int(ms(t))));
        }
        let (cmp, dir) = match order {
            AuditOrder::OldestFirst => (">", "ASC"),
            AuditOrder::NewestFirst => ("<", "DESC"),
        };
        if let Some(c) = cursor {
            clauses.push(format!("seq {cmp} {}", p.push_int(c)));
        }
        let where_clause = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_events {where_clause} ORDER BY seq {dir} LIMIT {}",
            u64::from(limit) + 1
        );
        let mut entries = match &self.engine {
            Engine::Sqlite(e) => e.audit.query(sql, p.values).await?,
            Engine::Postgres(_) => {
                let rows = p.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
                rows.iter()
                    .map(entry_from_row)
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let more = entries.len() > limit as usize;
        entries.truncate(limit as usize);
        let next = if more {
            entries.last().map(|e| e.seq)
        } else {
            None
        };
        Ok((entries, next))
    }

    /// Whether `target` has an entry with `action` (and `reason`, when given): say, a
    /// notice already given.
    pub async fn audit_has(
        &self,
        target: &str,
        action: &str,
        reason: Option<&str>,
    ) -> Result<bool> {
        let base = "SELECT COUNT(*) AS n FROM audit_events WHERE target = $1 AND action = $2";
        let row = match reason {
            Some(r) => {
                sqlx::query(&format!("{base} AND reason = $3"))
                    .bind(target)
                    .bind(action)
                    .bind(r)
                    .fetch_one(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(base)
                    .bind(target)
                    .bind(action)
                    .fetch_one(&self.pool)
                    .await?
            }
        };
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// Moves every row past the recorded head out of `audit_events` and `key_events`
    /// into `audit_quarantine` (as JSON, kept as evidence), then appends `audit` (which
    /// should name what was moved, see `describe`) to the chain, all in one transaction.
    /// Returns what was moved; with nothing past the head, nothing is written.
    pub async fn quarantine_past_head(
        &self,
        at: OffsetDateTime,
        audit: impl FnOnce(&Quarantined) -> AuditEntry,
    ) -> Result<Quarantined> {
        let mut tx = self.begin_write().await?;
        let head: i64 = sqlx::query("SELECT seq FROM audit_head WHERE id = 1")
            .fetch_one(&mut **tx)
            .await?
            .try_get("seq")?;
        let text = |r: &AnyRow, c: &str| r.try_get::<Option<String>, _>(c).ok().flatten();
        let num = |r: &AnyRow, c: &str| r.try_get::<Option<i64>, _>(c).ok().flatten();
        let audit_rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq"
        ))
        .bind(head)
        .fetch_all(&mut **tx)
        .await?;
        let event_rows = sqlx::query(
            "SELECT seq, time, key_id, event, reason, actor, details FROM key_events \
             WHERE seq > $1 ORDER BY seq",
        )
        .bind(head)
        .fetch_all(&mut **tx)
        .await?;
        let mut moved = Quarantined {
            head,
            audit_rows: Vec::new(),
            event_rows: Vec::new(),
        };
        let batch = ms(at);
        for r in &audit_rows {
            let seq: i64 = r.try_get("seq")?;
            let json = serde_json::json!({
                "seq": seq, "time": num(r, "time"), "actor": text(r, "actor"),
                "actor_name": text(r, "actor_name"), "source_ip": text(r, "source_ip"),
                "user_agent": text(r, "user_agent"), "request_id": text(r, "request_id"),
                "action": text(r, "action"), "target": text(r, "target"),
                "reason": text(r, "reason"), "details": text(r, "details"),
                "prev_hash": text(r, "prev_hash"), "hash": text(r, "hash"),
            });
            quarantine_row(&mut tx, batch, "audit_events", seq, &json).await?;
            moved.audit_rows.push(seq);
        }
        for r in &event_rows {
            let seq: i64 = r.try_get("seq")?;
            let json = serde_json::json!({
                "seq": seq, "time": num(r, "time"), "key_id": text(r, "key_id"),
                "event": text(r, "event"), "reason": text(r, "reason"),
                "actor": text(r, "actor"), "details": text(r, "details"),
            });
            quarantine_row(&mut tx, batch, "key_events", seq, &json).await?;
            moved.event_rows.push(seq);
        }
        if moved.audit_rows.is_empty() && moved.event_rows.is_empty() {
            return Ok(moved);
        }
        for table in ["audit_events", "key_events"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE seq > $1"))
                .bind(head)
                .execute(&mut **tx)
                .await?;
        }
        append(&mut tx, &audit(&moved)).await?;
        tx.commit().await?;
        Ok(moved)
    }

    /// The seq and hash of the last entry written (seq 0 and the genesis hash when none).
    pub async fn audit_head(&self) -> Result<(i64, ChainHash)> {
        let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        let hash: String = row.try_get("hash")?;
        Ok((row.try_get("seq")?, from_hex(&hash).unwrap_or(GENESIS)))
    }

    pub async fn audit_entry(&self, seq: i64) -> Result<Option<SealedEntry>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM audit_events WHERE seq = $1"
        ))
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(entry_from_row).transpose()
    }

    /// Archived ranges, oldest first.
    pub async fn audit_archives(&self) -> Result<Vec<ArchiveRecord>> {
        let rows = sqlx::query(
            "SELECT first_seq, last_seq, last_hash, entries, file_sha256, archived_at, \
             archived_by FROM audit_archives ORDER BY last_seq",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ArchiveRecord {
                    first_seq: r.try_get("first_seq")?,
                    last_seq: r.try_get("last_seq")?,
                    last_hash: stored_hash(r.try_get("last_hash")?),
                    entries: r.try_get("entries")?,
                    file_sha256: r.try_get("file_sha256")?,
                    archived_at: from_millis(r.try_get("archived_at")?),
                    archived_by: r.try_get("archived_by")?,
                })
            })
            .collect()
    }

    /// Removes an archived range from the live table and records it, with its own audit
    /// entry, in one transaction; refuses when the live chain no longer matches the file.
    pub async fn archive_audit(
        &self,
        req: &ArchiveRequest,
        audit: &AuditEntry,
    ) -> Result<ArchiveOutcome> {
        let mut tx = self.begin_write().await?;
        let bounds = sqlx::query(
            "SELECT MIN(seq) AS first, COUNT(*) AS n FROM audit_events WHERE seq <= $1",
        )
        .bind(req.last_seq)
        .fetch_one(&mut **tx)
        .await?;
        let live_first: Option<i64> = bounds.try_get("first")?;
        let n: i64 = bounds.try_get("n")?;
        if live_first != Some(req.first_seq) || n != req.last_seq - req.first_seq + 1 {
            return Ok(ArchiveOutcome::RangeMismatch { live_first });
        }
        let last: Option<String> = sqlx::query("SELECT hash FROM audit_events WHERE seq = $1")
            .bind(req.last_seq)
            .fetch_optional(&mut **tx)
            .await?
            .map(|r| r.try_get("hash"))
            .transpose()?;
        if last.as_deref().and_then(from_hex) != Some(req.last_hash) {
            return Ok(ArchiveOutcome::HashMismatch);
        }
        sqlx::query("DELETE FROM audit_events WHERE seq <= $1")
            .bind(req.last_seq)
            .execute(&mut **tx)
            .await?;
        let record = ArchiveRecord {
            first_seq: req.first_seq,
            last_seq: req.last_seq,
            last_hash: req.last_hash,
            entries: n,
            file_sha256: req.file_sha256.clone(),
            archived_at: req.at,
            archived_by: req.by.clone(),
        };
        sqlx::query(
            "INSERT INTO audit_archives (first_seq, last_seq, last_hash, entries, file_sha256, \
             archived_at, archived_by) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(record.first_seq)
        .bind(record.last_seq)
        .bind(to_hex(&record.last_hash))
        .bind(record.entries)
        .bind(&record.file_sha256)
        .bind(ms(record.archived_at))
        .bind(&record.archived_by)
        .execute(&mut **tx)
        .await?;
        append(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(ArchiveOutcome::Archived(record))
    }
}
