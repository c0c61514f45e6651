//! Usage events: written in batches by the server's usage writer, read newest first.

use keywarden_core::clock::from_millis;
use keywarden_core::model::UsageEvent;
use keywarden_core::KeyId;
use sqlx::Row;

use crate::fold::{fold_last_use_sql, StatsView};
use crate::rows::decode_error;
use crate::{Engine, Result, Store, StoreError};

const USAGE_COLUMNS: &str =
    "u.seq, u.key_id, u.time, u.code, u.source_ip, u.scope, u.environment, \
    u.subject, u.user_agent, u.counted";

/// Keys per fold transaction: small enough that a fold step holds up the appends (and
/// readers of key stats) for milliseconds, not a large share of the queue's capacity.
pub const FOLD_CHUNK: usize = 2_000;

#[derive(Debug, Clone)]
pub struct StoredUsage {
    pub seq: i64,
    pub event: UsageEvent,
}

/// Follows `VALUES (key_id, batched_uses, last_used_at, last_used_from), …`. Every SET
/// expression sees the row as it was before the update, on both backends.
pub(crate) const UPSERT_KEY_USAGE_TAIL: &str = concat!(
    "ON CONFLICT (key_id) DO UPDATE SET \
     batched_uses = key_usage.batched_uses + excluded.batched_uses, ",
    fold_last_use_sql!(
        "key_usage.last_used_at",
        "key_usage.last_used_from",
        "excluded.last_used_at",
        "excluded.last_used_from"
    )
);

/// A subject's sightings span from its earliest use to its latest, by event time, in
/// whatever order and batches the events arrive (the overlay's `merge_subjects` rule).
pub(crate) const UPSERT_SUBJECT_TAIL: &str = "ON CONFLICT (key_id, subject) DO UPDATE SET \
    first_seen = CASE WHEN excluded.first_seen < key_subjects.first_seen \
    THEN excluded.first_seen ELSE key_subjects.first_seen END, \
    last_seen = CASE WHEN excluded.last_seen > key_subjects.last_seen THEN excluded.last_seen \
    ELSE key_subjects.last_seen END";

impl Store {
    /// Writes a batch of usage events in one transaction. On PostgreSQL the batch is also
    /// folded into the keys at once (`uses` for uncapped keys, `last_used_*`, subjects);
    /// on SQLite it is appended to the log and folded later by [`Store::fold_usage`], and
    /// reads add what is not folded yet. Takes the batch and hands it back, so the caller
    /// can retry it on error or reuse its allocation.
    pub async fn record_usage(&self, events: Vec<UsageEvent>) -> (Vec<UsageEvent>, Result<()>) {
        if events.is_empty() {
            return (events, Ok(()));
        }
        match &self.engine {
            Engine::Sqlite(engine) => {
                let sink = engine.usage.clone();
                let turn = engine.write_turn().await;
                match tokio::task::spawn_blocking(move || {
                    let _turn = turn;
                    let r = sink.append(&events);
                    (events, r)
                })
                .await
                {
                    Ok(done) => done,
                    Err(e) => (
                        Vec::new(),
                        Err(StoreError::Internal(format!("usage writer thread: {e}"))),
                    ),
                }
            }
            Engine::Postgres(engine) => {
                let r = engine.record_usage(&events).await;
                (events, r)
            }
        }
    }

    /// Folds the next chunk of at most `max_keys` keys of logged usage into the keys'
    /// stats; true when no fold is left in progress. On PostgreSQL, where batches are
    /// folded into the stats as they are written, it writes the usage rollups this node
    /// holds, and rolls up again those that nodes now gone held.
    pub async fn fold_usage_step(&self, max_keys: usize) -> Result<bool> {
        let engine = match &self.engine {
            Engine::Sqlite(engine) => engine,
            Engine::Postgres(engine) => {
                engine.write_held().await?;
                engine.recover_held().await?;
                return Ok(true);
            }
        };
        let _readers_wait = engine.exclude_readers().await;
        let turn = engine.write_turn().await;
        let sink = engine.usage.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            sink.fold_step(max_keys)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("usage fold thread: {e}")))?
    }

    /// Folds all logged usage into the keys' stats.
    pub async fn fold_usage(&self) -> Result<()> {
        while !self.fold_usage_step(FOLD_CHUNK).await? {}
        // A fold that was in progress ends with its own keys; fold what came after too.
        while !self.fold_usage_step(FOLD_CHUNK).await? {}
        Ok(())
    }

    /// Keys with usage logged and not folded yet (on PostgreSQL: with rollups held).
    pub fn unfolded_keys(&self) -> usize {
        match &self.engine {
            Engine::Sqlite(e) => e.usage.pending_keys().unwrap_or(0),
            Engine::Postgres(e) => e.held().keys(),
        }
    }

    /// Whether a fold has started and not finished (false on PostgreSQL).
    pub fn folding(&self) -> bool {
        match &self.engine {
            Engine::Sqlite(e) => e.usage.folding().unwrap_or(false),
            Engine::Postgres(_) => false,
        }
    }

    /// Usage stats as readers see them (see [`StatsView`]): hold it across the read of
    /// the tables and the use of the view.
    pub(crate) async fn stats_view(&self) -> StatsView<'_> {
        match &self.engine {
            Engine::Sqlite(e) => StatsView::Overlay(e.stable_stats().await),
            Engine::Postgres(_) => StatsView::Folded,
        }
    }

    /// Usage events of one key, newest first. `cursor` is the previous page's
    /// `next` (the seq the next page starts at).
    pub async fn list_usage(
        &self,
        id: &KeyId,
        limit: u32,
        cursor: Option<i64>,
    ) -> Result<(Vec<StoredUsage>, Option<i64>)> {
        let fetch = i64::from(limit) + 1;
        let rows = match &self.engine {
            Engine::Postgres(_) => {
                let sql = format!(
                    "SELECT {USAGE_COLUMNS} FROM usage_events u WHERE u.key_id = $1 \
                     AND u.seq <= $2 ORDER BY u.seq DESC LIMIT $3"
                );
                sqlx::query(&sql)
                    .bind(id.as_str())
                    .bind(cursor.unwrap_or(i64::MAX))
                    .bind(fetch)
                    .fetch_all(&self.pool)
                    .await?
            }
            // No per-key index on SQLite: walk the key's chain of prev_seq from its head.
            Engine::Sqlite(_) => {
                let start = match cursor {
                    Some(c) => Some(c),
                    None => self.usage_head(id).await?,
                };
                let Some(start) = start else {
                    return Ok((Vec::new(), None));
                };
                sqlx::query(&format!(
                    "WITH RECURSIVE chain(seq, n) AS (SELECT $1, 1 UNION ALL \
                     SELECT e.prev_seq, c.n + 1 FROM chain c JOIN usage_events e ON e.seq = c.seq \
                     WHERE e.key_id = $2 AND e.prev_seq IS NOT NULL AND c.n < $3) \
                     SELECT {USAGE_COLUMNS} FROM chain JOIN usage_events u ON u.seq = chain.seq \
                     WHERE u.key_id = $2 ORDER BY u.seq DESC"
                ))
                .bind(start)
                .bind(id.as_str())
                .bind(fetch)
                .fetch_all(&self.pool)
                .await?
            }
        };
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let code: String = row.try_get("code")?;
            out.push(StoredUsage {
                seq: row.try_get("seq")?,
                event: UsageEvent {
                    key_id: Some(id.clone()),
                    time: from_millis(row.try_get("time")?),
                    code: code.parse().map_err(|e| decode_error("code", e))?,
                    source_ip: row
                        .try_get::<Option<String>, _>("source_ip")?
                        .map(|ip| ip.parse())
                        .transpose()
                        .map_err(|e| decode_error("source_ip", e))?,
                    scope: row.try_get("scope")?,
                    environment: row.try_get("environment")?,
                    subject: row.try_get("subject")?,
                    user_agent: row.try_get("user_agent")?,
                    counted: row.try_get::<i64, _>("counted")? != 0,
                },
            });
        }
        let next = if out.len() > limit as usize {
            out.pop().map(|u| u.seq)
        } else {
            None
        };
        Ok((out, next))
    }

    /// The newest event of a key: pending in the overlay, else as last folded.
    async fn usage_head(&self, id: &KeyId) -> Result<Option<i64>> {
        let view = self.stats_view().await;
        if let Some(head) = view.pending_head(id)? {
            return Ok(Some(head));
        }
        let row = sqlx::query("SELECT last_seq FROM key_usage WHERE key_id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get::<Option<i64>, _>("last_seq")?,
            None => None,
        })
    }

    /// Number of stored usage events (all keys); used by tests and the benchmark.
    pub async fn count_usage(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM usage_events")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }
}
