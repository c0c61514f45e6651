//! Usage rollups held in memory between writes, on PostgreSQL.
//!
//! Writing each batch's rollups in the batch's own transaction cost about five upserted
//! rows per event (a code row and one row per network, scope, subject and user agent), more
//! than the event itself: the usage writer fell behind at a fraction of the verify rate.
//! Instead a node adds each stored batch's rollups to what it holds and writes them every
//! few seconds, or before a read of the rollups; a key used many times in that window
//! costs one upsert per row.
//!
//! Each batch row names the node holding its rollups (`usage_batches.rollups_held_by`);
//! the transaction that writes them clears it (`UPDATE … RETURNING`), so a batch's
//! rollups land exactly once whoever writes them. A node holds a session advisory lock on
//! its id while it lives: when the lock is free, the node is gone (a crash, kill -9, a
//! lost connection) and any node rolls its batches up again from the logged events.
//! If that happens while the node still lives (its lock's connection dropped), the
//! node's next write finds some of its batches already taken and rolls up only the rest,
//! from the log, discarding what it held.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{MutexGuard, PoisonError};

use keywarden_core::verify::VerifyCode;
use keywarden_core::KeyId;
use sqlx::{Connection, Row};

use super::{Engine, JobLock, RollupColumns, UPSERT_ROLLUP_CODES, UPSERT_ROLLUP_VALUES};
use crate::fold::{LoggedEvent, Pending, Rollup, ValueKind};
use crate::{Result, StoreError};

/// The rollups of stored batches not written yet.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// The batches (`usage_batches.seq`) whose rollups are here.
    batches: Vec<i64>,
    keys: HashMap<KeyId, Rollup>,
    keyless: Rollup,
}

impl Held {
    pub fn add(&mut self, batch: i64, folded: Pending) {
        self.batches.push(batch);
        for (id, d) in folded.keys {
            match self.keys.get_mut(&id) {
                Some(r) => r.merge(d.rollup),
                None => {
                    self.keys.insert(id, d.rollup);
                }
            }
        }
        self.keyless.merge(folded.keyless);
    }

    /// Puts back what a failed write took out.
    fn restore(&mut self, other: Held) {
        self.batches.extend(other.batches);
        for (id, r) in other.keys {
            match self.keys.get_mut(&id) {
                Some(mine) => mine.merge(r),
                None => {
                    self.keys.insert(id, r);
                }
            }
        }
        self.keyless.merge(other.keyless);
    }

    pub fn keys(&self) -> usize {
        self.keys.len()
    }
}

/// This node's id among the nodes that hold rollups, and the connection holding the
/// advisory lock that tells other nodes it lives.
pub(crate) struct NodeLock {
    pub id: i32,
    conn: JobLock,
}

impl std::fmt::Debug for NodeLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLock").field("id", &self.id).finish()
    }
}

/// The advisory lock namespace of node ids, per schema like the job locks.
const NODE_LOCK_KEY: &str = "hashtext(current_schema() || ' usage rollups')";

/// Rows per upsert statement when writing held rollups: a statement's arrays stay a few
/// MB however many keys were used.
const ROWS_PER_STATEMENT: usize = 20_000;

impl Engine {
    pub(crate) fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The networks and subjects of a key's valid uses held here, of hours from
    /// `since_hour` and first seen before `before_ms`: what [`crate::Store::known_sources`]
    /// reads from the table for rollups already written.
    pub(crate) fn held_sources(
        &self,
        id: &KeyId,
        since_hour: i64,
        before_ms: i64,
    ) -> Vec<(&'static str, String)> {
        let held = self.held();
        let Some(rollup) = held.keys.get(id) else {
            return Vec::new();
        };
        rollup
            .rows()
            .values
            .into_iter()
            .filter(|(hour, kind, _, code, seen)| {
                *hour >= since_hour
                    && seen.first < before_ms
                    && *code == VerifyCode::Valid.as_str()
                    && matches!(kind, ValueKind::Network | ValueKind::Subject)
            })
            .map(|(_, kind, value, _, _)| (kind.as_str(), value))
            .collect()
    }

    /// The id batches are stored under: the node lock's, taken first if this node holds
    /// none yet or lost it (found by [`Engine::write_held`], not per batch).
    pub(crate) async fn node_id(&self) -> Result<i32> {
        let mut lock = self.node_lock.lock().await;
        if let Some(l) = lock.as_ref() {
            return Ok(l.id);
        }
        // A random id: nodes need no registry. Taken ids (another live node drew the
        // same one) are skipped.
        for _ in 0..8 {
            // RandomState is seeded from the OS per instance: randomness without a crate.
            let bits = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            let id = i32::try_from(bits >> 33).unwrap_or(1).max(1);
            if let Some(conn) = self.try_node_lock(id).await? {
                *lock = Some(NodeLock {
                    id,
                    conn: JobLock(conn),
                });
                return Ok(id);
            }
        }
        Err(StoreError::Internal(
            "no free node id for usage rollups after 8 draws".into(),
        ))
    }

    /// Writes the rollups this node holds. Concurrent calls write one after the other; a
    /// failed write keeps them held for the next.
    pub(crate) async fn write_held(&self) -> Result<()> {
        let _one_at_a_time = self.flushing.lock().await;
        self.check_node_lock().await;
        let held = std::mem::take(&mut *self.held());
        if held.batches.is_empty() {
            return Ok(());
        }
        match self.write_held_now(&held).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.held().restore(held);
                Err(e)
            }
        }
    }

    /// Forgets the node lock if its connection is gone, so the next batch takes a new
    /// one: other nodes may already be rolling up the batches stored under the old id.
    async fn check_node_lock(&self) {
        let mut lock = self.node_lock.lock().await;
        if let Some(l) = lock.as_mut() {
            if !l.conn.alive().await {
                tracing::warn!(
                    node = l.id,
                    "the usage rollups node lock was lost; taking a new one"
                );
                *lock = None;
            }
        }
    }

    async fn write_held_now(&self, held: &Held) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let released: Vec<i64> = sqlx::query(
            "UPDATE usage_batches SET rollups_held_by = NULL \
             WHERE seq = ANY($1) AND rollups_held_by IS NOT NULL RETURNING seq",
        )
        .bind(&held.batches)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
        if released.len() == held.batches.len() {
            write_rollups(&mut tx, &held.keys, &held.keyless).await?;
        } else {
            // Another node took some of these batches for a dead node's (this node's
            // lock was lost): what is held mixes them in, so the rest come from the log.
            tracing::warn!(
                held = held.batches.len(),
                taken = held.batches.len() - released.len(),
                "usage rollups held here were partly written by another node; \
                 rolling up the rest from the usage log"
            );
            roll_up_from_log(&mut tx, &released).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Rolls up the batches of nodes that are gone (their lock is free) from the logged
    /// events; answers how many batches.
    pub(crate) async fn recover_held(&self) -> Result<usize> {
        let mine = self.node_lock.lock().await.as_ref().map(|l| l.id);
        let nodes: Vec<i64> = sqlx::query(
            "SELECT DISTINCT rollups_held_by FROM usage_batches \
             WHERE rollups_held_by IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
        let mut recovered = 0;
        for node in nodes {
            let Ok(node) = i32::try_from(node) else {
                return Err(StoreError::Corrupt(format!(
                    "usage_batches.rollups_held_by {node} is not a node id"
                )));
            };
            if Some(node) == mine {
                continue;
            }
            // Holding the dead node's lock while rolling up keeps a second recovering
            // node out (it would find nothing left, but after reading for nothing).
            if let Some(conn) = self.try_node_lock(node).await? {
                let result = self.recover_node(node).await;
                let _ = conn.close().await;
                let n = result?;
                if n > 0 {
                    tracing::warn!(
                        node,
                        batches = n,
                        "usage rollups held by a node that is gone were rolled up from the log"
                    );
                }
                recovered += n;
            }
        }
        Ok(recovered)
    }

    /// Takes node `id`'s lock on a connection of its own, held as long as that
    /// connection lives; `None` when another session holds it.
    async fn try_node_lock(&self, id: i32) -> Result<Option<sqlx::PgConnection>> {
        let mut conn = self.pool.acquire().await?.detach();
        let got: bool = sqlx::query(&format!("SELECT pg_try_advisory_lock({NODE_LOCK_KEY}, $1)"))
            .bind(id)
            .fetch_one(&mut conn)
            .await?
            .try_get(0)?;
        if got {
            return Ok(Some(conn));
        }
        let _ = conn.close().await;
        Ok(None)
    }

    async fn recover_node(&self, node: i32) -> Result<usize> {
        let mut tx = self.pool.begin().await?;
        let seqs: Vec<i64> = sqlx::query(
            "UPDATE usage_batches SET rollups_held_by = NULL \
             WHERE rollups_held_by = $1 RETURNING seq",
        )
        .bind(i64::from(node))
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
        roll_up_from_log(&mut tx, &seqs).await?;
        tx.commit().await?;
        Ok(seqs.len())
    }
}

/// Rolls `batches` up again from their logged events, in the caller's transaction.
async fn roll_up_from_log(tx: &mut sqlx::PgConnection, batches: &[i64]) -> Result<()> {
    let folded = fold_from_log(tx, batches).await?;
    let keys: HashMap<KeyId, Rollup> = folded
        .keys
        .into_iter()
        .map(|(id, d)| (id, d.rollup))
        .collect();
    write_rollups(tx, &keys, &folded.keyless).await
}

/// The logged events of `batches`, folded. A batch whose events retention already
/// removed adds nothing: they left the rollups' window long before.
async fn fold_from_log(tx: &mut sqlx::PgConnection, batches: &[i64]) -> Result<Pending> {
    let rows = sqlx::query(
        "SELECT e.seq, e.key_id, e.time, e.code, e.counted, e.source_ip, e.subject, e.scope, \
         e.user_agent FROM usage_batches b JOIN usage_events e \
         ON e.seq BETWEEN b.first_seq AND b.last_seq WHERE b.seq = ANY($1) ORDER BY e.seq",
    )
    .bind(batches)
    .fetch_all(&mut *tx)
    .await?;
    let mut pending = Pending::default();
    for row in &rows {
        let seq: i64 = row.try_get(0)?;
        let key_id: Option<String> = row.try_get(1)?;
        let key_id = key_id.and_then(|id| KeyId::parse(&id).ok());
        let code: String = row.try_get(3)?;
        let code: VerifyCode = code.parse().map_err(|_| {
            StoreError::Corrupt(format!("usage event {seq}: unknown code {code:?}"))
        })?;
        let source_ip: Option<String> = row.try_get(5)?;
        let subject: Option<String> = row.try_get(6)?;
        let scope: Option<String> = row.try_get(7)?;
        let user_agent: Option<String> = row.try_get(8)?;
        pending.add(&LoggedEvent {
            seq,
            key_id: key_id.as_ref(),
            time: row.try_get(2)?,
            valid: code == VerifyCode::Valid,
            counted: row.try_get::<i64, _>(4)? != 0,
            source_ip: source_ip.and_then(|ip| ip.parse().ok()),
            subject: subject.as_deref(),
            code,
            scope: scope.as_deref(),
            user_agent: user_agent.as_deref(),
        });
    }
    Ok(pending)
}

/// Upserts rollups in key order (the keyless under ''), the order every node locks
/// shared rows in, a bounded number of rows per statement.
async fn write_rollups(
    tx: &mut sqlx::PgConnection,
    keys: &HashMap<KeyId, Rollup>,
    keyless: &Rollup,
) -> Result<()> {
    let mut ordered: Vec<(&str, &Rollup)> = keys.iter().map(|(id, r)| (id.as_str(), r)).collect();
    ordered.push(("", keyless));
    ordered.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut cols = RollupColumns::default();
    for (id, rollup) in ordered {
        if rollup.is_empty() {
            continue;
        }
        cols.push(id, &rollup.rows());
        if cols.key_id.len() + cols.v_key_id.len() >= ROWS_PER_STATEMENT {
            write_columns(tx, &cols).await?;
            cols = RollupColumns::default();
        }
    }
    write_columns(tx, &cols).await
}

async fn write_columns(tx: &mut sqlx::PgConnection, c: &RollupColumns<'_>) -> Result<()> {
    if !c.key_id.is_empty() {
        sqlx::query(&UPSERT_ROLLUP_CODES)
            .bind(&c.key_id)
            .bind(&c.hour)
            .bind(&c.code)
            .bind(&c.events)
            .execute(&mut *tx)
            .await?;
    }
    if !c.v_key_id.is_empty() {
        sqlx::query(&UPSERT_ROLLUP_VALUES)
            .bind(&c.v_key_id)
            .bind(&c.v_hour)
            .bind(&c.v_kind)
            .bind(&c.v_value)
            .bind(&c.v_code)
            .bind(&c.v_events)
            .bind(&c.v_first)
            .bind(&c.v_last)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}
