//! Several nodes on one PostgreSQL database: learning of changes made by other nodes
//! (LISTEN/NOTIFY plus a replay from the last seen seq), and running background jobs on
//! one node at a time (session advisory locks).

use sqlx::{Connection, Row};

use crate::{Backend, Result, Store};

/// The NOTIFY channel: a trigger on `audit_events` (migration 0011) announces every
/// entry's seq.
pub const CHANNEL: &str = "keywarden_changes";

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

/// Notifications from other nodes (PostgreSQL only).
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

/// The right to run a background job on this node, for as long as it is held.
pub struct Leadership {
    /// PostgreSQL: the connection holding the session advisory lock. It is detached from
    /// the pool, so dropping it closes it and releases the lock; a node that dies releases
    /// it the same way.
    conn: Option<sqlx::AnyConnection>,
}

impl Leadership {
    /// Whether the lock is still held (its connection still answers).
    pub async fn alive(&mut self) -> bool {
        match &mut self.conn {
            None => true,
            Some(c) => c.ping().await.is_ok(),
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
        let Some(url) = self.postgres_url.as_deref() else {
            return Ok(None);
        };
        let mut l = sqlx::postgres::PgListener::connect(url).await?;
        l.listen(CHANNEL).await?;
        Ok(Some(ChangeListener(l)))
    }

    /// Wakes this process's waiters (dispatcher, event streams) for a change another node
    /// made.
    pub fn announce_change(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Tries to become the one node running job `lock`. SQLite: always (one node).
    /// Advisory locks are per database, so the lock is keyed by the schema too: two
    /// deployments in separate schemas of one database (and parallel test servers) each
    /// run their own jobs instead of waiting on each other's.
    pub async fn try_lead(&self, lock: i64) -> Result<Option<Leadership>> {
        if self.backend == Backend::Sqlite {
            return Ok(Some(Leadership { conn: None }));
        }
        let lock = i32::try_from(lock)
            .map_err(|_| crate::StoreError::Corrupt(format!("lock id {lock} is not an int4")))?;
        let mut conn = self.pool.acquire().await?.detach();
        let got: bool =
            sqlx::query("SELECT pg_try_advisory_lock(hashtext(current_schema()), $1) AS got")
                .bind(lock)
                .fetch_one(&mut conn)
                .await?
                .try_get("got")?;
        if got {
            Ok(Some(Leadership { conn: Some(conn) }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }
}
