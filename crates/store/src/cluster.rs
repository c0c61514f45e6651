//! Several nodes on one PostgreSQL database: learning of changes made by other nodes
//! (LISTEN/NOTIFY plus a replay from the last seen seq), and running background jobs on
//! one node at a time (session advisory locks, `postgres::Engine::try_lock_job`).

use sqlx::Row;

use crate::postgres::{ChangeListener, CHANNEL};
use crate::{Engine, Result, Store};

/// What changed after a seq: what nodes must drop from their caches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Where the next read starts.
    pub cursor: i64,
    pub keys: Vec<String>,
    pub tokens: Vec<String>,
    /// A policy was applied.
    pub policy: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.tokens.is_empty() && !self.policy
    }
}

/// How many changes one read takes at most; the rest come with the next.
const BATCH: i64 = 10_000;

/// The right to run a background job on this node, for as long as it is held.
pub struct Leadership(Option<crate::postgres::JobLock>);

impl Leadership {
    /// Whether the lock is still held. SQLite has one node, which always leads.
    pub async fn alive(&mut self) -> bool {
        match &mut self.0 {
            None => true,
            Some(lock) => lock.alive().await,
        }
    }
}

impl Store {
    /// Changes after `cursor`, up to the newest committed audit entry.
    pub async fn changes_since(&self, cursor: i64) -> Result<Changes> {
        // The head first: entries commit in seq order (each audited transaction holds the
        // head row until it commits), so everything up to the head is visible.
        let head: i64 = sqlx::query("SELECT seq FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get("seq")?;
        let mut out = Changes {
            cursor: head.max(cursor),
            ..Changes::default()
        };
        if head <= cursor {
            return Ok(out);
        }
        let keys = sqlx::query(
            "SELECT seq, key_id FROM key_events WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
        )
        .bind(cursor)
        .bind(head)
        .bind(BATCH)
        .fetch_all(&self.pool)
        .await?;
        let others = sqlx::query(
            "SELECT seq, target, action FROM audit_events WHERE seq > $1 AND seq <= $2 \
             AND (target LIKE 'token:%' OR action LIKE 'policy.%') ORDER BY seq LIMIT $3",
        )
        .bind(cursor)
        .bind(head)
        .bind(BATCH)
        .fetch_all(&self.pool)
        .await?;
        // A full batch stops the cursor at the last seq both reads covered.
        let mut stop = head;
        if keys.len() as i64 == BATCH {
            stop = stop.min(
                keys.last()
                    .map_or(head, |r| r.try_get("seq").unwrap_or(head)),
            );
        }
        if others.len() as i64 == BATCH {
            stop = stop.min(
                others
                    .last()
                    .map_or(head, |r| r.try_get("seq").unwrap_or(head)),
            );
        }
        out.cursor = stop;
        for r in &keys {
            if r.try_get::<i64, _>("seq")? <= stop {
                out.keys.push(r.try_get("key_id")?);
            }
        }
        for r in &others {
            if r.try_get::<i64, _>("seq")? > stop {
                continue;
            }
            let target: String = r.try_get("target")?;
            let action: String = r.try_get("action")?;
            if let Some(id) = target.strip_prefix("token:") {
                out.tokens.push(id.to_owned());
            }
            out.policy |= action.starts_with("policy.");
        }
        out.keys.sort();
        out.keys.dedup();
        Ok(out)
    }

    /// Listens for other nodes' changes; `None` on SQLite (one node).
    pub async fn listen_changes(&self) -> Result<Option<ChangeListener>> {
        match &self.engine {
            Engine::Sqlite(_) => Ok(None),
            Engine::Postgres(e) => Ok(Some(e.listen(CHANNEL).await?)),
        }
    }

    /// Wakes this process's waiters (dispatcher, event streams) for a change another node
    /// made.
    pub fn announce_change(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Tries to become the one node running job `lock`. SQLite: always (one node).
    pub async fn try_lead(&self, lock: i64) -> Result<Option<Leadership>> {
        match &self.engine {
            Engine::Sqlite(_) => Ok(Some(Leadership(None))),
            Engine::Postgres(e) => Ok(e.try_lock_job(lock).await?.map(|l| Leadership(Some(l)))),
        }
    }
}
