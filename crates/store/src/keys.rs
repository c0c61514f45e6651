//! Keys: insert, read, list, change state (optimistically), rotate, count capped uses.

use keywarden_core::clock::from_millis;
use keywarden_core::model::{AuditEntry, KeyRecord, KeyState, StateCause, Subject};
use keywarden_core::KeyId;
use sqlx::Row;
use time::OffsetDateTime;

use crate::rows::{
    insert_audit, json, key_from_row, ms, opt_ms, Params, KEY_COLUMNS, KEY_FROM, STAMP_SQL_ONE_NODE,
};
use crate::{Engine, Result, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    Active,
    Suspended,
    Revoked,
    Expired,
}

impl From<KeyState> for StateFilter {
    fn from(s: KeyState) -> Self {
        match s {
            KeyState::Active => Self::Active,
            KeyState::Suspended => Self::Suspended,
            KeyState::Revoked => Self::Revoked,
            KeyState::Expired => Self::Expired,
        }
    }
}

/// A key's change counter and folded last use; see [`Store::key_stamp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStamp {
    pub version: i64,
    pub last_used_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    pub environment: Option<String>,
    pub owner: Option<String>,
    pub system: Option<String>,
    pub state: Option<StateFilter>,
    /// Restricts to these environments (an issuer's reach). `None`: no restriction.
    pub environments: Option<Vec<String>>,
}

impl Store {
    pub async fn insert_key(&self, key: &KeyRecord, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin_write().await?;
        insert_key_row(&mut tx, key).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>> {
        match &self.engine {
            Engine::Postgres(e) => e.get_key(id).await,
            Engine::Sqlite(e) => {
                if let Some(key) = e.point_read_key(id)? {
                    return Ok(key);
                }
                let view = self.stats_view().await;
                let row = sqlx::query(&format!(
                    "SELECT {KEY_COLUMNS} FROM {KEY_FROM} WHERE id = $1"
                ))
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?;
                let mut key: Vec<KeyRecord> = row
                    .as_ref()
                    .map(key_from_row)
                    .transpose()?
                    .into_iter()
                    .collect();
                view.apply(&mut key)?;
                Ok(key.pop())
            }
        }
    }

    /// What tells a cached copy of the key apart from the stored one, for the verify
    /// cache to renew an entry with one small read instead of loading the key again.
    pub async fn key_stamp(&self, id: &KeyId) -> Result<Option<KeyStamp>> {
        match &self.engine {
            Engine::Postgres(e) => e.key_stamp(id).await,
            Engine::Sqlite(e) => {
                if let Some(read) = e.point_read_stamp(id) {
                    return read;
                }
                let row = sqlx::query(STAMP_SQL_ONE_NODE)
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
        }
    }

    /// [`Store::key_stamp`] of many keys at once, for renewing cache entries in batches:
    /// one statement on PostgreSQL; on SQLite, point reads (a few µs each, no round trip
    /// to save). Keys not stored are left out.
    pub async fn key_stamps(&self, ids: &[KeyId]) -> Result<Vec<(KeyId, KeyStamp)>> {
        match &self.engine {
            Engine::Postgres(e) => e.key_stamps(ids).await,
            Engine::Sqlite(_) => {
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(stamp) = self.key_stamp(id).await? {
                        out.push((id.clone(), stamp));
                    }
                }
                Ok(out)
            }
        }
    }

    /// Newest first. `after` is the `seq` cursor returned by the previous page.
    pub async fn list_keys(
        &self,
        filter: &KeyFilter,
        now: OffsetDateTime,
        limit: u32,
        after: Option<i64>,
    ) -> Result<(Vec<KeyRecord>, Option<i64>)> {
        let mut p = Params::new(self.backend());
        let mut clauses: Vec<String> = Vec::new();
        if let Some(env) = &filter.environment {
            clauses.push(format!("environment = {}", p.push_text(env)));
        }
        if let Some(owner) = &filter.owner {
            clauses.push(format!("owner = {}", p.push_text(owner)));
        }
        if let Some(system) = &filter.system {
            clauses.push(format!(
                "id IN (SELECT key_id FROM key_systems WHERE system = {})",
                p.push_text(system)
            ));
        }
        if let Some(envs) = &filter.environments {
            if envs.is_empty() {
                return Ok((Vec::new(), None));
            }
            let list: Vec<String> = envs.iter().map(|e| p.push_text(e)).collect();
            clauses.push(format!("environment IN ({})", list.join(", ")));
        }
        if let Some(state) = filter.state {
            let now = p.push_int(ms(now));
            clauses.push(match state {
                StateFilter::Active => format!("(state = 'active' AND expires_at > {now})"),
                StateFilter::Suspended => format!("(state = 'suspended' AND expires_at > {now})"),
                StateFilter::Revoked => "state = 'revoked'".to_owned(),
                StateFilter::Expired => format!(
                    "(state = 'expired' OR (state IN ('active', 'suspended') AND expires_at <= {now}))"
                ),
            });
        }
        if let Some(after) = after {
            clauses.push(format!("seq < {}", p.push_int(after)));
        }
        let where_clause = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        // One extra row tells whether there is a next page.
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM {KEY_FROM} {where_clause} ORDER BY seq DESC LIMIT {}",
            u64::from(limit) + 1
        );
        let view = self.stats_view().await;
        let rows = p.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        let mut keys = Vec::with_capacity(rows.len());
        let mut last_seq = None;
        for row in rows.iter().take(limit as usize) {
            keys.push(key_from_row(row)?);
            last_seq = Some(row.try_get::<i64, _>("seq")?);
        }
        view.apply(&mut keys)?;
        let next = if rows.len() > limit as usize {
            last_seq
        } else {
            None
        };
        Ok((keys, next))
    }

    /// Saves the mutable lifecycle fields of `key` if nobody changed it since `key.version`
    /// was read. Returns false on a lost race; the caller re-reads and decides again.
    pub async fn update_key_state(&self, key: &KeyRecord, audit: &AuditEntry) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        if !update_lifecycle(&mut tx, key).await? {
            return Ok(false);
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Ends `old` (already updated by the caller: new expiry, `rotated_to`) and inserts its
    /// successor in one transaction, with both audit entries.
    pub async fn rotate_key(
        &self,
        old: &KeyRecord,
        successor: &KeyRecord,
        audits: &[AuditEntry],
    ) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        if !update_lifecycle(&mut tx, old).await? {
            return Ok(false);
        }
        insert_key_row(&mut tx, successor).await?;
        for a in audits {
            insert_audit(&mut tx, a).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Keys stored as active or suspended whose end has passed, soonest first.
    pub async fn keys_past_expiry(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyRecord>> {
        let view = self.stats_view().await;
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM {KEY_FROM} WHERE state IN ('active', 'suspended') \
             AND expires_at <= $1 ORDER BY expires_at, id LIMIT $2"
        ))
        .bind(ms(now))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut keys = rows.iter().map(key_from_row).collect::<Result<Vec<_>>>()?;
        view.apply(&mut keys)?;
        Ok(keys)
    }

    /// Live keys (active or suspended) whose owner is disabled or deleted but which are
    /// not yet held for it: left by an older node, a migration that merged spellings of
    /// an owner, or any path that missed the disable. The enforcer takes them.
    pub async fn keys_of_disabled_owners(&self, limit: u32) -> Result<Vec<KeyRecord>> {
        let view = self.stats_view().await;
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM {KEY_FROM} WHERE state IN ('active', 'suspended') \
             AND (state_cause IS NULL OR state_cause <> 'OWNER_DISABLED') \
             AND owner IN (SELECT identity FROM owners WHERE status <> 'active') \
             ORDER BY id LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut keys = rows.iter().map(key_from_row).collect::<Result<Vec<_>>>()?;
        view.apply(&mut keys)?;
        Ok(keys)
    }

    /// Active, unexpired keys whose last stored use (or creation, if never used) is at or
    /// before `cutoff`, longest unused first, with unfolded usage applied: the caller
    /// judges each against its environment's idle rule.
    pub async fn keys_unused_since(
        &self,
        cutoff: OffsetDateTime,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyRecord>> {
        let view = self.stats_view().await;
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM {KEY_FROM} WHERE state = 'active' AND expires_at > $1 \
             AND canary = 0 AND COALESCE(key_usage.last_used_at, keys.created_at) <= $2 \
             ORDER BY COALESCE(key_usage.last_used_at, keys.created_at), id LIMIT $3"
        ))
        .bind(ms(now))
        .bind(ms(cutoff))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut keys = rows.iter().map(key_from_row).collect::<Result<Vec<_>>>()?;
        view.apply(&mut keys)?;
        Ok(keys)
    }

    /// Active, unexpired keys not rotated yet, matching `created_at <= created_by` or
    /// `expires_at <= expiring_by` (either bound optional), oldest first: candidates for
    /// rotation deadlines and expiry notices.
    pub async fn keys_for_notices(
        &self,
        now: OffsetDateTime,
        created_by: Option<OffsetDateTime>,
        expiring_by: Option<OffsetDateTime>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>> {
        let mut p = Params::new(self.backend());
        let now_p = p.push_int(ms(now));
        let mut either = Vec::new();
        if let Some(t) = created_by {
            either.push(format!("created_at <= {}", p.push_int(ms(t))));
        }
        if let Some(t) = expiring_by {
            either.push(format!("expires_at <= {}", p.push_int(ms(t))));
        }
        if either.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM {KEY_FROM} WHERE state = 'active' AND expires_at > {now_p} \
             AND rotated_to IS NULL AND canary = 0 AND ({}) ORDER BY created_at, id LIMIT {}",
            either.join(" OR "),
            limit
        );
        let view = self.stats_view().await;
        let rows = p.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        let mut keys = rows.iter().map(key_from_row).collect::<Result<Vec<_>>>()?;
        view.apply(&mut keys)?;
        Ok(keys)
    }

    /// Counts one use against a key's cap, atomically in the database so that concurrent
    /// verifies (on any node) cannot overspend it. Returns the uses left after this one,
    /// or `None` when the cap was already reached.
    ///
    /// Spends one use of a capped key. `Some(remaining)` only once the spend is durably
    /// committed: in autocommit, SQLite commits an `UPDATE … RETURNING` only when the
    /// statement is reset after its row was read, and that commit's error (a full disk, a
    /// read-only file) never reached the caller, so a cap could answer VALID without
    /// being spent. An explicit transaction makes the commit's failure an error.
    pub async fn consume_use(&self, id: &KeyId) -> Result<Option<u64>> {
        let remaining = match &self.engine {
            Engine::Postgres(e) => e.consume_use(id).await?,
            Engine::Sqlite(_) => {
                let mut tx = self.begin_quiet_write().await?;
                let row = sqlx::query(
                    "UPDATE keys SET uses = uses + 1 WHERE id = $1 AND max_uses IS NOT NULL \
                     AND uses < max_uses RETURNING max_uses - uses AS remaining",
                )
                .bind(id.as_str())
                .fetch_optional(&mut **tx)
                .await?;
                tx.commit().await?;
                row.map(|row| row.try_get::<i64, _>("remaining"))
                    .transpose()?
            }
        };
        Ok(remaining.map(|r| u64::try_from(r).unwrap_or(0)))
    }

    /// Spends one use of a key under `rate` in the cell every node shares, at `now_us`
    /// (microseconds since the epoch): `Some(Err(retry_after_us))` when over the limit.
    /// `None` on SQLite, where one node serves and its own cell is the whole truth.
    pub async fn spend_rate(
        &self,
        id: &KeyId,
        rate: &keywarden_core::rate::Rate,
        now_us: i64,
    ) -> Result<Option<std::result::Result<(), i64>>> {
        match &self.engine {
            Engine::Sqlite(_) => Ok(None),
            Engine::Postgres(e) => {
                let interval = rate.interval_us();
                let burst = rate.burst_us();
                e.spend_rate(id, now_us, interval, burst).await.map(Some)
            }
        }
    }

    pub async fn subjects(&self, id: &KeyId) -> Result<Vec<Subject>> {
        let view = self.stats_view().await;
        let rows = sqlx::query(
            "SELECT subject, first_seen, last_seen FROM key_subjects WHERE key_id = $1 \
             ORDER BY first_seen, subject",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await?;
        let stored = rows
            .iter()
            .map(|r| {
                Ok(Subject {
                    subject: r.try_get("subject")?,
                    first_seen: from_millis(r.try_get("first_seen")?),
                    last_seen: from_millis(r.try_get("last_seen")?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        view.merge_subjects(id, stored)
    }
}

async fn insert_key_row(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    key: &KeyRecord,
) -> Result<()> {
    let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
    let cidrs: Vec<String> = key.allowed_cidrs.iter().map(ToString::to_string).collect();
    sqlx::query(
        "INSERT INTO keys (id, hash, pepper_version, hint, name, description, owner, systems, \
         environment, scopes, created_at, created_by, expires_at, state, state_reason, \
         state_changed_at, allowed_cidrs, max_uses, uses, rotated_from, rotated_to, metadata, \
         version, state_cause, rate_limit, canary) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
         $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26)",
    )
    .bind(key.id.as_str())
    .bind(key.hash.to_hex())
    .bind(i64::from(key.hash.pepper_version))
    .bind(&key.hint)
    .bind(&key.name)
    .bind(&key.description)
    .bind(&key.owner)
    .bind(json(&key.systems)?)
    .bind(&key.environment)
    .bind(json(&scopes)?)
    .bind(ms(key.created_at))
    .bind(&key.created_by)
    .bind(ms(key.expires_at))
    .bind(key.state.as_str())
    .bind(&key.state_reason)
    .bind(opt_ms(key.state_changed_at))
    .bind(json(&cidrs)?)
    .bind(key.max_uses.map(|m| i64::try_from(m).unwrap_or(i64::MAX)))
    .bind(i64::try_from(key.uses).unwrap_or(i64::MAX))
    .bind(key.rotated_from.as_ref().map(|k| k.as_str().to_owned()))
    .bind(key.rotated_to.as_ref().map(|k| k.as_str().to_owned()))
    .bind(json(&key.metadata)?)
    .bind(key.version)
    .bind(key.state_cause.map(StateCause::as_str))
    .bind(key.rate_limit.map(|r| r.to_string()))
    .bind(i64::from(key.canary))
    .execute(&mut **tx)
    .await?;
    for system in &key.systems {
        sqlx::query("INSERT INTO key_systems (key_id, system) VALUES ($1, $2)")
            .bind(key.id.as_str())
            .bind(system)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

pub(crate) async fn update_lifecycle(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    key: &KeyRecord,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE keys SET state = $1, state_reason = $2, state_changed_at = $3, expires_at = $4, \
         rotated_to = $5, state_cause = $8, version = version + 1 WHERE id = $6 AND version = $7",
    )
    .bind(key.state.as_str())
    .bind(&key.state_reason)
    .bind(opt_ms(key.state_changed_at))
    .bind(ms(key.expires_at))
    .bind(key.rotated_to.as_ref().map(|k| k.as_str().to_owned()))
    .bind(key.id.as_str())
    .bind(key.version)
    .bind(key.state_cause.map(StateCause::as_str))
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}
