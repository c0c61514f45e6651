//! What only the PostgreSQL engine does: verify's hot paths through sqlx's native driver,
//! listening for other nodes' changes, and advisory locks for background jobs.
//!
//! Through sqlx's `Any` driver a key read on a verify cache miss cost about 121 µs of CPU
//! (every row is converted into `Any` values and every statement is re-described); the
//! native driver reads it with a prepared statement and decodes it in place. Usage
//! batches go in as one `UNNEST` statement per table, with the batch as arrays, instead
//! of SQL text assembled per batch; their usage rollups are held in memory and written
//! every few seconds ([`held`]).

use std::str::FromStr;
use std::time::Duration;

use keywarden_core::audit_chain::{from_hex, to_hex};
use keywarden_core::clock::from_millis;
use keywarden_core::model::{KeyRecord, UsageEvent};
use keywarden_core::usage_chain::{BatchHasher, EventFields};
use keywarden_core::KeyId;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};

use crate::fold::Pending;
use crate::fold::RollupRows;
use crate::rollups::{UPSERT_ROLLUP_CODES_TAIL, UPSERT_ROLLUP_VALUES_TAIL};
use crate::rows::{decode_error, key_from_row, ms, KEY_COLUMNS, KEY_FROM, STAMP_SQL};
use crate::usage::{UPSERT_KEY_USAGE_TAIL, UPSERT_SUBJECT_TAIL};
use crate::{KeyStamp, Result, StoreError};

mod held;
pub(crate) use held::Held;

/// The NOTIFY channel: a trigger on `audit_events` (migration 0011) announces every
/// entry's seq.
pub const CHANNEL: &str = "keywarden_changes";

#[derive(Debug)]
pub(crate) struct Engine {
    pool: PgPool,
    /// For LISTEN, which needs a connection of its own.
    url: String,
    /// Usage rollups of stored batches, written every few seconds ([`held`]).
    held: std::sync::Mutex<Held>,
    node_lock: tokio::sync::Mutex<Option<held::NodeLock>>,
    flushing: tokio::sync::Mutex<()>,
}

/// The right to run a background job on this node, for as long as it is held: the
/// connection holding the session advisory lock. It is detached from the pool, so
/// dropping it closes it and releases the lock; a node that dies releases it the same way.
pub(crate) struct JobLock(sqlx::PgConnection);

impl JobLock {
    pub async fn alive(&mut self) -> bool {
        self.0.ping().await.is_ok()
    }
}

/// Notifications from other nodes.
pub struct ChangeListener(sqlx::postgres::PgListener);

impl ChangeListener {
    /// Waits for the next notification. An error means the connection was lost: make a
    /// new listener, and replay from the last seen seq, since notifications sent while it
    /// was down are gone.
    pub async fn recv(&mut self) -> Result<()> {
        self.0.recv().await?;
        Ok(())
    }
}

impl Engine {
    pub async fn connect(url: &str) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            url: url.to_owned(),
            held: std::sync::Mutex::default(),
            node_lock: tokio::sync::Mutex::default(),
            flushing: tokio::sync::Mutex::default(),
        })
    }

    pub async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>> {
        let row = sqlx::query(&KEY_BY_ID)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    pub async fn key_stamp(&self, id: &KeyId) -> Result<Option<KeyStamp>> {
        let row = sqlx::query(STAMP_SQL)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(KeyStamp {
                version: row.try_get(0)?,
                last_used_at: row.try_get::<Option<i64>, _>(1)?.map(from_millis),
            })
        })
        .transpose()
    }

    /// The stamps of many keys in one statement (keys not stored are left out).
    pub async fn key_stamps(&self, ids: &[KeyId]) -> Result<Vec<(KeyId, KeyStamp)>> {
        let ids: Vec<&str> = ids.iter().map(KeyId::as_str).collect();
        let rows = sqlx::query(STAMPS_SQL)
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get(0)?;
                let id = KeyId::parse(&id).map_err(|e| decode_error("id", e))?;
                Ok((
                    id,
                    KeyStamp {
                        version: row.try_get(1)?,
                        last_used_at: row.try_get::<Option<i64>, _>(2)?.map(from_millis),
                    },
                ))
            })
            .collect()
    }

    /// One statement in autocommit: PostgreSQL reports a failed commit (a deferred
    /// constraint, a full disk) as the statement's error, so a use is never answered as
    /// spent unless it is.
    pub async fn consume_use(&self, id: &KeyId) -> Result<Option<i64>> {
        let row = sqlx::query(CONSUME_USE)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok(r.try_get::<i64, _>(0)?)).transpose()
    }

    /// Spends one use of a rate-limited key in the cell all nodes share (GCRA, times in
    /// microseconds): `Ok(())`, or `Err(retry_after_us)`.
    pub async fn spend_rate(
        &self,
        id: &KeyId,
        now_us: i64,
        interval_us: i64,
        burst_us: i64,
    ) -> Result<std::result::Result<(), i64>> {
        let spent = sqlx::query(SPEND_RATE)
            .bind(id.as_str())
            .bind(now_us)
            .bind(interval_us)
            .bind(burst_us)
            .fetch_optional(&self.pool)
            .await?;
        if spent.is_some() {
            return Ok(Ok(()));
        }
        let tat: Option<i64> = sqlx::query("SELECT tat FROM key_rates WHERE key_id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        let retry = tat.map_or(interval_us, |t| t.saturating_sub(burst_us) - now_us);
        Ok(Err(retry.max(1)))
    }

    /// Writes a batch of usage events, chains it, and folds it into the keys' stats, in
    /// one transaction: four statements whatever the batch's size. The events' insert
    /// takes the chain's head row first, so batches from every node are chained one at a
    /// time and each batch's seqs are consecutive; it returns the seqs, which the batch's
    /// hash covers. The batch's rollups are held in memory and written later
    /// ([`held`]); its row names this node until they are.
    pub async fn record_usage(&self, events: &[UsageEvent]) -> Result<()> {
        let node = self.node_id().await?;
        let mut batch = EventColumns::default();
        for e in events {
            batch.push(e);
        }
        // The fold rule applied to this batch alone. Keys with only denied events (no
        // use) get no stats row, so unknown ids leave no trace there.
        let folded = Pending::of_batch(events);
        let mut stats = StatsColumns::default();
        let mut used: Vec<_> = folded
            .keys
            .iter()
            .filter_map(|(id, d)| d.last_at.map(|at| (id, d, at)))
            .collect();
        // Key order: concurrent batches lock the rows they share in the same order.
        used.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (id, d, at) in &used {
            stats.key_id.push(id.as_str());
            stats.uses.push(d.uses);
            stats.last_at.push(*at);
            stats.last_from.push(d.last_from.map(|ip| ip.to_string()));
            for (subject, first, last) in &d.subjects {
                stats.subject_key.push(id.as_str());
                stats.subject.push(subject.as_str());
                stats.first_seen.push(*first);
                stats.last_seen.push(*last);
            }
        }
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(INSERT_EVENTS)
            .bind(&batch.key_id)
            .bind(&batch.time)
            .bind(&batch.code)
            .bind(&batch.source_ip)
            .bind(&batch.scope)
            .bind(&batch.environment)
            .bind(&batch.subject)
            .bind(&batch.user_agent)
            .bind(&batch.counted)
            .fetch_one(&mut *tx)
            .await?;
        let head_seq: i64 = inserted.try_get(0)?;
        let prev_text: String = inserted.try_get(1)?;
        let mut seqs: Vec<i64> = inserted.try_get(2)?;
        let prev_hash = from_hex(&prev_text).ok_or_else(|| {
            StoreError::Corrupt("usage_chain_head.hash is not a SHA-256 hex".into())
        })?;
        if seqs.len() != events.len() {
            return Err(StoreError::Internal(format!(
                "{} usage events inserted, {} returned",
                events.len(),
                seqs.len()
            )));
        }
        // Rows are numbered in the order UNNEST yields them, which is the batch's order.
        seqs.sort_unstable();
        let mut chain = BatchHasher::new(&prev_hash, events.len());
        for (i, (e, seq)) in events.iter().zip(&seqs).enumerate() {
            chain.push(&EventFields {
                seq: *seq,
                key_id: batch.key_id[i],
                time: batch.time[i],
                code: batch.code[i],
                source_ip: batch.source_ip[i].as_deref(),
                scope: batch.scope[i],
                environment: batch.environment[i],
                subject: batch.subject[i],
                user_agent: batch.user_agent[i],
                counted: e.counted,
            });
        }
        let sealed = chain.finish(head_seq + 1, prev_hash);
        sqlx::query(INSERT_BATCH)
            .bind(sealed.header.seq)
            .bind(sealed.header.first_seq)
            .bind(sealed.header.last_seq)
            .bind(sealed.header.count)
            .bind(sealed.header.time)
            .bind(&prev_text)
            .bind(to_hex(&sealed.hash))
            .bind(&sealed.digests)
            .bind(i64::from(node))
            .execute(&mut *tx)
            .await?;
        if !stats.key_id.is_empty() {
            sqlx::query(&UPSERT_KEY_USAGE)
                .bind(&stats.key_id)
                .bind(&stats.uses)
                .bind(&stats.last_at)
                .bind(&stats.last_from)
                .execute(&mut *tx)
                .await?;
        }
        if !stats.subject.is_empty() {
            sqlx::query(&UPSERT_SUBJECTS)
                .bind(&stats.subject_key)
                .bind(&stats.subject)
                .bind(&stats.first_seen)
                .bind(&stats.last_seen)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let batch = sealed.header.seq;
        drop(stats);
        self.held().add(batch, folded);
        Ok(())
    }

    pub async fn listen(&self, channel: &str) -> Result<ChangeListener> {
        let mut l = sqlx::postgres::PgListener::connect(&self.url).await?;
        l.listen(channel).await?;
        Ok(ChangeListener(l))
    }

    /// Advisory locks are per database, so the lock is keyed by the schema too: two
    /// deployments in separate schemas of one database (and parallel test servers) each
    /// run their own jobs instead of waiting on each other's.
    pub async fn try_lock_job(&self, lock: i64) -> Result<Option<JobLock>> {
        let lock = i32::try_from(lock)
            .map_err(|_| StoreError::Corrupt(format!("lock id {lock} is not an int4")))?;
        let mut conn = self.pool.acquire().await?.detach();
        let got: bool =
            sqlx::query("SELECT pg_try_advisory_lock(hashtext(current_schema()), $1) AS got")
                .bind(lock)
                .fetch_one(&mut conn)
                .await?
                .try_get("got")?;
        if got {
            Ok(Some(JobLock(conn)))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

static KEY_BY_ID: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {KEY_COLUMNS} FROM {KEY_FROM} WHERE id = $1"));

/// [`STAMP_SQL`] for many keys.
const STAMPS_SQL: &str = "SELECT id, version, last_used_at FROM keys \
    LEFT JOIN key_usage ON key_usage.key_id = keys.id WHERE id = ANY($1)";

const CONSUME_USE: &str = "UPDATE keys SET uses = uses + 1 WHERE id = $1 \
    AND max_uses IS NOT NULL AND uses < max_uses RETURNING max_uses - uses";

/// GCRA in one statement: the update happens (and returns a row) only when the cell
/// admits the use; a row lock orders concurrent spends of one key across nodes.
const SPEND_RATE: &str =
    "INSERT INTO key_rates (key_id, tat) VALUES ($1, $2::bigint + $3::bigint) \
    ON CONFLICT (key_id) DO UPDATE SET tat = GREATEST(key_rates.tat, $2::bigint) + $3::bigint \
    WHERE GREATEST(key_rates.tat, $2::bigint) - $4::bigint <= $2::bigint RETURNING tat";

/// Takes the chain's head row before any event is numbered (each inserted row needs the
/// head's row, locked), so a batch's seqs are consecutive and later batches' are higher;
/// answers the head and the seqs.
const INSERT_EVENTS: &str = "WITH head AS (SELECT batch_seq, hash FROM usage_chain_head \
    WHERE id = 1 FOR UPDATE), ins AS (INSERT INTO usage_events (key_id, time, code, source_ip, \
    scope, environment, subject, user_agent, counted) SELECT u.* FROM head, \
    UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], \
    $7::text[], $8::text[], $9::bigint[]) AS u RETURNING seq) \
    SELECT (SELECT batch_seq FROM head), (SELECT hash FROM head), \
    ARRAY(SELECT seq FROM ins ORDER BY seq)";

/// The batch's row and the head, in one statement.
const INSERT_BATCH: &str = "WITH b AS (INSERT INTO usage_batches (seq, first_seq, last_seq, \
    events, time, prev_hash, hash, digests, rollups_held_by) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)) \
    UPDATE usage_chain_head SET batch_seq = $1, hash = $7 WHERE id = 1";

static UPSERT_KEY_USAGE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO key_usage (key_id, batched_uses, last_used_at, last_used_from) \
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[]) \
         {UPSERT_KEY_USAGE_TAIL}"
    )
});

static UPSERT_SUBJECTS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO key_subjects (key_id, subject, first_seen, last_seen) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
         {UPSERT_SUBJECT_TAIL}"
    )
});

static UPSERT_ROLLUP_CODES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO usage_rollups (key_id, hour, code, events) \
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bigint[]) \
         {UPSERT_ROLLUP_CODES_TAIL}"
    )
});

static UPSERT_ROLLUP_VALUES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO usage_rollup_values (key_id, hour, kind, value, code, events, first_seen, \
         last_seen) SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], \
         $5::text[], $6::bigint[], $7::bigint[], $8::bigint[]) {UPSERT_ROLLUP_VALUES_TAIL}"
    )
});

/// A batch's rollup rows, one array per column of `usage_rollups` and
/// `usage_rollup_values`.
#[derive(Default)]
struct RollupColumns<'a> {
    key_id: Vec<&'a str>,
    hour: Vec<i64>,
    code: Vec<&'static str>,
    events: Vec<i64>,
    v_key_id: Vec<&'a str>,
    v_hour: Vec<i64>,
    v_kind: Vec<&'static str>,
    v_value: Vec<String>,
    v_code: Vec<&'static str>,
    v_events: Vec<i64>,
    v_first: Vec<i64>,
    v_last: Vec<i64>,
}

impl<'a> RollupColumns<'a> {
    fn push(&mut self, key_id: &'a str, rows: &RollupRows) {
        for (hour, code, n) in &rows.codes {
            self.key_id.push(key_id);
            self.hour.push(*hour);
            self.code.push(code);
            self.events.push(*n);
        }
        for (hour, kind, value, code, seen) in &rows.values {
            self.v_key_id.push(key_id);
            self.v_hour.push(*hour);
            self.v_kind.push(kind.as_str());
            self.v_value.push(value.clone());
            self.v_code.push(code);
            self.v_events.push(seen.events);
            self.v_first.push(seen.first);
            self.v_last.push(seen.last);
        }
    }
}

/// A batch of usage events as one array per column.
#[derive(Default)]
struct EventColumns<'a> {
    key_id: Vec<Option<&'a str>>,
    time: Vec<i64>,
    code: Vec<&'a str>,
    source_ip: Vec<Option<String>>,
    scope: Vec<Option<&'a str>>,
    environment: Vec<Option<&'a str>>,
    subject: Vec<Option<&'a str>>,
    user_agent: Vec<Option<&'a str>>,
    counted: Vec<i64>,
}

impl<'a> EventColumns<'a> {
    fn push(&mut self, e: &'a UsageEvent) {
        self.key_id.push(e.key_id.as_ref().map(KeyId::as_str));
        self.time.push(ms(e.time));
        self.code.push(e.code.as_str());
        self.source_ip.push(e.source_ip.map(|ip| ip.to_string()));
        self.scope.push(e.scope.as_deref());
        self.environment.push(e.environment.as_deref());
        self.subject.push(e.subject.as_deref());
        self.user_agent.push(e.user_agent.as_deref());
        self.counted.push(i64::from(e.counted));
    }
}

/// A batch's folded stats, one array per column of `key_usage` and `key_subjects`.
#[derive(Default)]
struct StatsColumns<'a> {
    key_id: Vec<&'a str>,
    uses: Vec<i64>,
    last_at: Vec<i64>,
    last_from: Vec<Option<String>>,
    subject_key: Vec<&'a str>,
    subject: Vec<&'a str>,
    first_seen: Vec<i64>,
    last_seen: Vec<i64>,
}
