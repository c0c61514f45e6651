//! The usage log's chain as stored: reading batches and events for a verifier, and
//! retention, which removes whole batches from the front of the log only.
//!
//! Batches are written by the usage sinks (`sqlite/usage.rs`, `postgres/mod.rs`), in the
//! transaction of their events.

use std::collections::BTreeMap;

use keywarden_core::audit_chain::{from_hex, to_hex, ChainHash, GENESIS};
use keywarden_core::model::AuditEntry;
use keywarden_core::usage_chain::{BatchHeader, ChainEvent, UsageWalk, WalkedBatch};
use sqlx::Row;
use time::OffsetDateTime;

use crate::audit::append;
use crate::rows::ms;
use crate::{Engine, Result, Store, StoreError};

/// Events removed per retention transaction at most (whole batches, so one batch larger
/// than this goes alone): the usage writer waits for the write lock meanwhile on SQLite.
pub const RETENTION_CHUNK: i64 = 20_000;

/// The chain's last batch, as the writers recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageChainHead {
    pub batch_seq: i64,
    pub hash: ChainHash,
    /// Events up to this seq were stored before the log was chained (0: none left).
    pub unchained_upto: i64,
}

/// A batch row, without its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    pub header: BatchHeader,
    pub prev_hash: String,
    pub hash: String,
    pub digests: Vec<u8>,
}

/// A prefix of the log that retention removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRetention {
    pub first_batch: i64,
    pub last_batch: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub events: i64,
    /// The hash of the last batch removed: where the chain of what remains starts.
    pub last_hash: ChainHash,
    pub retained_at: OffsetDateTime,
}

/// How long events are kept: events of keys in each listed environment for its own
/// duration, all others (and events of no known key) for `default`. An event is due once it is
/// older than its own; a batch once all of its events are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRule {
    pub default: time::Duration,
    pub environments: BTreeMap<String, time::Duration>,
}

const BATCH_COLUMNS: &str = "seq, first_seq, last_seq, events, time, prev_hash, hash, digests";
const EVENT_COLUMNS: &str =
    "seq, key_id, time, code, source_ip, scope, environment, subject, user_agent, counted";

fn batch_from_row(r: &sqlx::any::AnyRow) -> Result<StoredBatch> {
    Ok(StoredBatch {
        header: BatchHeader {
            seq: r.try_get("seq")?,
            first_seq: r.try_get("first_seq")?,
            last_seq: r.try_get("last_seq")?,
            count: r.try_get("events")?,
            time: r.try_get("time")?,
        },
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
        digests: r.try_get("digests")?,
    })
}

fn event_from_row(r: &sqlx::any::AnyRow) -> Result<ChainEvent> {
    Ok(ChainEvent {
        seq: r.try_get("seq")?,
        key_id: r.try_get("key_id")?,
        time: r.try_get("time")?,
        code: r.try_get("code")?,
        source_ip: r.try_get("source_ip")?,
        scope: r.try_get("scope")?,
        environment: r.try_get("environment")?,
        subject: r.try_get("subject")?,
        user_agent: r.try_get("user_agent")?,
        counted: r.try_get::<i64, _>("counted")? != 0,
    })
}

fn hash_of(column: &str, text: &str) -> Result<ChainHash> {
    from_hex(text).ok_or_else(|| StoreError::Corrupt(format!("{column} is not a SHA-256 hex")))
}

impl StoredBatch {
    pub fn walked(self, events: Vec<ChainEvent>) -> WalkedBatch {
        WalkedBatch {
            header: self.header,
            prev_hash: from_hex(&self.prev_hash).unwrap_or([0xff; 32]),
            hash: from_hex(&self.hash).unwrap_or([0xff; 32]),
            digests: self.digests,
            events,
        }
    }
}

impl Store {
    pub async fn usage_chain_head(&self) -> Result<UsageChainHead> {
        let r = sqlx::query(
            "SELECT batch_seq, hash, unchained_upto FROM usage_chain_head WHERE id = 1",
        )
        .fetch_one(&self.pool)
        .await?;
        let hash: String = r.try_get("hash")?;
        Ok(UsageChainHead {
            batch_seq: r.try_get("batch_seq")?,
            hash: hash_of("usage_chain_head.hash", &hash)?,
            unchained_upto: r.try_get("unchained_upto")?,
        })
    }

    /// The prefixes retention removed, oldest first.
    pub async fn usage_retentions(&self) -> Result<Vec<UsageRetention>> {
        let rows = sqlx::query(
            "SELECT first_batch, last_batch, first_seq, last_seq, events, last_hash, \
             retained_at FROM usage_retention ORDER BY last_batch",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let hash: String = r.try_get("last_hash")?;
                Ok(UsageRetention {
                    first_batch: r.try_get("first_batch")?,
                    last_batch: r.try_get("last_batch")?,
                    first_seq: r.try_get("first_seq")?,
                    last_seq: r.try_get("last_seq")?,
                    events: r.try_get("events")?,
                    last_hash: hash_of("usage_retention.last_hash", &hash)?,
                    retained_at: keywarden_core::clock::from_millis(r.try_get("retained_at")?),
                })
            })
            .collect()
    }

    /// Batches after `after`, oldest first, at most `limit`.
    pub async fn usage_batches_after(&self, after: i64, limit: u32) -> Result<Vec<StoredBatch>> {
        let rows = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM usage_batches WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(batch_from_row).collect()
    }

    /// Stored events with `lo <= seq <= hi`, in seq order, as the chain hashes them.
    pub async fn usage_events_between(&self, lo: i64, hi: i64) -> Result<Vec<ChainEvent>> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM usage_events WHERE seq >= $1 AND seq <= $2 ORDER BY seq"
        ))
        .bind(lo)
        .bind(hi)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Bytes the usage log's tables take, indexes included: (`usage_events`,
    /// `usage_batches`). SQLite: the pages they fill (dbstat); PostgreSQL: the relations'
    /// files, dead rows included until a VACUUM lets later inserts reuse them. For the
    /// benchmark's storage figures.
    pub async fn usage_table_bytes(&self) -> Result<(i64, i64)> {
        let sql = match self.engine {
            Engine::Sqlite(_) => {
                "SELECT (SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name = 'usage_events') \
                 AS events, (SELECT COALESCE(SUM(pgsize), 0) FROM dbstat \
                 WHERE name = 'usage_batches') AS batches"
            }
            Engine::Postgres(_) => {
                "SELECT pg_total_relation_size('usage_events')::bigint AS events, \
                 pg_total_relation_size('usage_batches')::bigint AS batches"
            }
        };
        let r = sqlx::query(sql).fetch_one(&self.pool).await?;
        Ok((r.try_get("events")?, r.try_get("batches")?))
    }

    /// Stored events after `after`, in seq order, at most `limit`.
    pub async fn usage_events_after(&self, after: i64, limit: u32) -> Result<Vec<ChainEvent>> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM usage_events WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Removes the next prefix of the log that is past retention at `now`, in one
    /// transaction with its `usage_retention` row and its audit entry (made by `audit`
    /// from the record); `None` when nothing is due. A prefix is whole batches, never the
    /// newest (so SQLite, which numbers rows after the highest one left, never reuses a
    /// seq), never an event not yet folded into its key's stats, and only one whose chain
    /// still verifies: a broken prefix is kept as evidence and the error names it.
    pub async fn retain_usage(
        &self,
        rule: &RetentionRule,
        now: OffsetDateTime,
        audit: impl FnOnce(&UsageRetention) -> AuditEntry,
    ) -> Result<Option<UsageRetention>> {
        let mut tx = self.begin_write().await?;
        let head =
            sqlx::query("SELECT batch_seq, unchained_upto FROM usage_chain_head WHERE id = 1")
                .fetch_one(&mut **tx)
                .await?;
        let head_batch: i64 = head.try_get("batch_seq")?;
        let unchained_upto: i64 = head.try_get("unchained_upto")?;
        // SQLite folds the log later; what is past folded_seq may not be counted yet.
        let folded: i64 = match self.engine {
            Engine::Sqlite(_) => sqlx::query("SELECT folded_seq FROM usage_state WHERE id = 1")
                .fetch_one(&mut **tx)
                .await?
                .try_get("folded_seq")?,
            Engine::Postgres(_) => i64::MAX,
        };
        // No event is due before the shortest retention says so.
        let shortest = rule
            .environments
            .values()
            .fold(rule.default, |a, b| a.min(*b));
        let floor = ms(now - shortest);
        let rows = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM usage_batches WHERE seq < $1 ORDER BY seq LIMIT 1000"
        ))
        .bind(head_batch)
        .fetch_all(&mut **tx)
        .await?;
        let mut prefix = Vec::new();
        let mut events = 0;
        for r in &rows {
            let b = batch_from_row(r)?;
            let h = b.header;
            if h.time >= floor
                || h.last_seq > folded
                || (events > 0 && events + h.count > RETENTION_CHUNK)
            {
                break;
            }
            events += h.count;
            prefix.push(b);
        }
        // Environments kept for other durations: the first event of the prefix not due
        // under its own ends the prefix before its batch.
        if let (Some(first), Some(last)) = (prefix.first(), prefix.last()) {
            if !rule.environments.is_empty() {
                // By the environment of the event's key (the event's own `environment` is
                // what the caller asked to check, not where the key lives); events of no
                // known key take the default.
                let mut sql = String::from(
                    "SELECT MIN(e.seq) AS keep FROM usage_events e LEFT JOIN keys k \
                     ON k.id = e.key_id WHERE e.seq >= $1 AND e.seq <= $2 AND e.time >= CASE",
                );
                for i in 0..rule.environments.len() {
                    let n = 4 + 2 * i;
                    sql.push_str(&format!(" WHEN k.environment = ${n} THEN ${}", n + 1));
                }
                sql.push_str(" ELSE $3 END");
                let mut q = sqlx::query(&sql)
                    .bind(first.header.first_seq)
                    .bind(last.header.last_seq)
                    .bind(ms(now - rule.default));
                for (env, keep) in &rule.environments {
                    q = q.bind(env.as_str()).bind(ms(now - *keep));
                }
                let keep: Option<i64> = q.fetch_one(&mut **tx).await?.try_get("keep")?;
                if let Some(keep) = keep {
                    prefix.retain(|b| b.header.last_seq < keep);
                }
            }
        }
        let (Some(first), Some(last)) = (prefix.first(), prefix.last()) else {
            return Ok(None);
        };
        let (first_batch, last_batch) = (first.header.seq, last.header.seq);
        let (first_seq, last_seq) = (first.header.first_seq, last.header.last_seq);
        let last_hash = hash_of("usage_batches.hash", &last.hash)?;

        // The prefix must verify from where the chain starts now.
        let start = sqlx::query(
            "SELECT last_batch, last_hash FROM usage_retention ORDER BY last_batch DESC LIMIT 1",
        )
        .fetch_optional(&mut **tx)
        .await?;
        let mut walk = match start {
            Some(r) => {
                let hash: String = r.try_get("last_hash")?;
                UsageWalk::starting_after(
                    r.try_get("last_batch")?,
                    hash_of("usage_retention.last_hash", &hash)?,
                )
            }
            None => UsageWalk::new(),
        };
        let stored = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM usage_events WHERE seq >= $1 AND seq <= $2 ORDER BY seq"
        ))
        .bind(first_seq)
        .bind(last_seq)
        .fetch_all(&mut **tx)
        .await?;
        let mut stored = stored
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>>>()?;
        let mut removed_events = 0;
        for b in prefix {
            let h = b.header;
            let split = stored.partition_point(|e| e.seq <= h.last_seq);
            let mine: Vec<ChainEvent> = stored.drain(..split).collect();
            for stray in mine.iter().filter(|e| e.seq < h.first_seq) {
                walk.push_uncovered(stray);
            }
            let mine: Vec<ChainEvent> = mine.into_iter().filter(|e| e.seq >= h.first_seq).collect();
            removed_events += mine.len() as i64;
            walk.push_batch(b.walked(mine));
        }
        let report = walk.finish(Some((last_batch, last_hash)));
        if let Some(b) = report.broken {
            return Err(StoreError::Corrupt(format!(
                "usage retention stopped: the log is broken at batch {}{}: {}: {}; the batches \
                 are kept as evidence (`keywarden audit verify --usage`)",
                b.batch,
                b.event_seq
                    .map(|s| format!(" (event {s})"))
                    .unwrap_or_default(),
                b.kind.as_str(),
                b.detail
            )));
        }
        // Events stored before the log was chained go with the first prefix after them.
        let mut lowest = first_seq;
        if unchained_upto > 0 && unchained_upto < first_seq {
            let pre = sqlx::query(
                "SELECT COUNT(*) AS n, MIN(seq) AS lo FROM usage_events WHERE seq <= $1",
            )
            .bind(unchained_upto)
            .fetch_one(&mut **tx)
            .await?;
            removed_events += pre.try_get::<i64, _>("n")?;
            if let Some(lo) = pre.try_get::<Option<i64>, _>("lo")? {
                lowest = lo;
            }
            sqlx::query("DELETE FROM usage_events WHERE seq <= $1")
                .bind(unchained_upto)
                .execute(&mut **tx)
                .await?;
            sqlx::query("UPDATE usage_chain_head SET unchained_upto = 0 WHERE id = 1")
                .execute(&mut **tx)
                .await?;
        }
        sqlx::query("DELETE FROM usage_events WHERE seq >= $1 AND seq <= $2")
            .bind(first_seq)
            .bind(last_seq)
            .execute(&mut **tx)
            .await?;
        sqlx::query("DELETE FROM usage_batches WHERE seq <= $1")
            .bind(last_batch)
            .execute(&mut **tx)
            .await?;
        let record = UsageRetention {
            first_batch,
            last_batch,
            first_seq: lowest,
            last_seq,
            events: removed_events,
            last_hash,
            retained_at: now,
        };
        sqlx::query(
            "INSERT INTO usage_retention (first_batch, last_batch, first_seq, last_seq, events, \
             last_hash, retained_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(record.first_batch)
        .bind(record.last_batch)
        .bind(record.first_seq)
        .bind(record.last_seq)
        .bind(record.events)
        .bind(to_hex(&record.last_hash))
        .bind(ms(now))
        .execute(&mut **tx)
        .await?;
        append(&mut tx, &audit(&record)).await?;
        tx.commit().await?;
        Ok(Some(record))
    }
}

/// Where a verifier's walk starts: after the last prefix retention removed.
pub fn walk_start(retentions: &[UsageRetention]) -> (i64, ChainHash) {
    retentions
        .last()
        .map_or((0, GENESIS), |r| (r.last_batch, r.last_hash))
}
