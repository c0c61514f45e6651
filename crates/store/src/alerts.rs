//! Alerts: what the monitor raised, each with the audit entry that raised it (its `seq`),
//! a severity, the evidence that tripped it, and a state people move it through.
//!
//! Repeats fold: an alert is raised with its `place` (kind, key, source network), and
//! while an alert holds that place (open or acknowledged, and younger than the window
//! the caller gives), a new sighting only counts up on it. The place is unique in the
//! table, so two nodes raising the same alert at once make one: the second insert fails
//! and is retried as a repeat.

use keywarden_core::clock::from_millis;
use keywarden_core::model::AuditEntry;
use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use crate::rows::{ms, opt_ms};
use crate::{Result, Store, StoreError};

#[derive(Debug, Clone)]
pub struct NewAlert {
    pub time: OffsetDateTime,
    pub kind: String,
    pub severity: String,
    pub key_id: Option<String>,
    pub code: String,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub subject: Option<String>,
    pub since_ms: Option<i64>,
    /// JSON: the numbers that tripped it.
    pub evidence: String,
    /// What makes later sightings repeats of this alert.
    pub place: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    Open,
    Acknowledged,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Acknowledged => "acknowledged",
            Self::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "open" => Self::Open,
            "acknowledged" => Self::Acknowledged,
            "resolved" => Self::Resolved,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRecord {
    pub seq: i64,
    pub time: OffsetDateTime,
    pub kind: String,
    pub severity: String,
    pub key_id: Option<String>,
    pub code: String,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub subject: Option<String>,
    pub since_ms: Option<i64>,
    pub evidence: String,
    pub repeats: i64,
    pub last_at: OffsetDateTime,
    pub state: AlertState,
    pub state_at: Option<OffsetDateTime>,
    pub state_by: Option<String>,
    pub state_reason: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    pub key_id: Option<String>,
    pub kind: Option<String>,
    pub state: Option<AlertState>,
    pub since: Option<OffsetDateTime>,
    /// Alerts with a seq below this (paging, newest first).
    pub before: Option<i64>,
    pub limit: u32,
    /// Only alerts about keys of these environments (a token limited to them).
    pub environments: Option<Vec<String>>,
}

/// What raising an alert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raised {
    /// A new alert, with its seq.
    New(i64),
    /// A sighting counted on the alert that holds the place.
    Repeat(i64),
}

impl Raised {
    pub fn seq(self) -> i64 {
        match self {
            Self::New(s) | Self::Repeat(s) => s,
        }
    }
}

const ALERT_COLUMNS: &str = "seq, time, kind, severity, key_id, code, source_ip, user_agent, \
    subject, since_ms, evidence, repeats, last_at, state, state_at, state_by, state_reason";

fn alert_from_row(r: &AnyRow) -> Result<AlertRecord> {
    let state: String = r.try_get("state")?;
    Ok(AlertRecord {
        seq: r.try_get("seq")?,
        time: from_millis(r.try_get("time")?),
        kind: r.try_get("kind")?,
        severity: r.try_get("severity")?,
        key_id: r.try_get("key_id")?,
        code: r.try_get("code")?,
        source_ip: r.try_get("source_ip")?,
        user_agent: r.try_get("user_agent")?,
        subject: r.try_get("subject")?,
        since_ms: r.try_get("since_ms")?,
        evidence: r.try_get("evidence")?,
        repeats: r.try_get("repeats")?,
        last_at: from_millis(r.try_get("last_at")?),
        state: AlertState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("alerts.state {state:?}")))?,
        state_at: r.try_get::<Option<i64>, _>("state_at")?.map(from_millis),
        state_by: r.try_get("state_by")?,
        state_reason: r.try_get("state_reason")?,
    })
}

impl Store {
    /// Raises an alert, or counts a repeat on the alert that holds its place if that one
    /// is not resolved and was raised after `fold_since`. A new alert is stored with the
    /// audit entry that raises it (so it is in the trail and, for a key, reaches the
    /// services subscribed to `alert` through the outbox).
    pub async fn raise_alert(
        &self,
        alert: &NewAlert,
        audit: &AuditEntry,
        fold_since: OffsetDateTime,
    ) -> Result<Raised> {
        match self.try_raise(alert, audit, fold_since).await {
            // Another node raised it between our read and our insert.
            Err(StoreError::Conflict(_)) => self.try_raise(alert, audit, fold_since).await,
            other => other,
        }
    }

    async fn try_raise(
        &self,
        alert: &NewAlert,
        audit: &AuditEntry,
        fold_since: OffsetDateTime,
    ) -> Result<Raised> {
        let mut tx = self.begin_write().await?;
        let held = sqlx::query("SELECT seq, time, state FROM alerts WHERE place = $1")
            .bind(&alert.place)
            .fetch_optional(&mut **tx)
            .await?;
        if let Some(row) = held {
            let seq: i64 = row.try_get("seq")?;
            let time: i64 = row.try_get("time")?;
            let state: String = row.try_get("state")?;
            if state != AlertState::Resolved.as_str()
                && time >= ms(fold_since)
                && count_repeats(&mut tx, seq, 1, alert.time).await?
            {
                tx.commit().await?;
                return Ok(Raised::Repeat(seq));
            }
            sqlx::query("UPDATE alerts SET place = NULL WHERE seq = $1")
                .bind(seq)
                .execute(&mut **tx)
                .await?;
        }
        let seq = crate::audit::append(&mut tx, audit).await?;
        sqlx::query(&format!(
            "INSERT INTO alerts ({ALERT_COLUMNS}, place) VALUES ($1, $2, $3, $4, $5, $6, $7, \
             $8, $9, $10, $11, 0, $12, 'open', NULL, NULL, NULL, $13)"
        ))
        .bind(seq)
        .bind(ms(alert.time))
        .bind(&alert.kind)
        .bind(&alert.severity)
        .bind(&alert.key_id)
        .bind(&alert.code)
        .bind(&alert.source_ip)
        .bind(&alert.user_agent)
        .bind(&alert.subject)
        .bind(alert.since_ms)
        .bind(&alert.evidence)
        .bind(ms(alert.time))
        .bind(&alert.place)
        .execute(&mut **tx)
        .await?;
        tx.commit().await?;
        Ok(Raised::New(seq))
    }

    /// Counts `n` more sightings on an alert; `false` when it is resolved meanwhile (the
    /// sightings then belong to a new alert).
    pub async fn repeat_alert(&self, seq: i64, n: i64, last_at: OffsetDateTime) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let counted = count_repeats(&mut tx, seq, n, last_at).await?;
        tx.commit().await?;
        Ok(counted)
    }

    /// Moves an alert to `state` with who and why, audited in the same transaction.
    /// `None` when there is no such alert; `Some(false)` when it is already resolved
    /// (a resolved alert stays resolved; a new sighting raises a new one).
    pub async fn set_alert_state(
        &self,
        seq: i64,
        state: AlertState,
        audit: &AuditEntry,
    ) -> Result<Option<bool>> {
        let mut tx = self.begin_write().await?;
        let Some(row) = sqlx::query("SELECT state FROM alerts WHERE seq = $1")
            .bind(seq)
            .fetch_optional(&mut **tx)
            .await?
        else {
            return Ok(None);
        };
        let current: String = row.try_get("state")?;
        if current == AlertState::Resolved.as_str() {
            return Ok(Some(false));
        }
        crate::audit::append(&mut tx, audit).await?;
        // A resolved alert gives up its place: the next sighting is a new alert.
        sqlx::query(
            "UPDATE alerts SET state = $1, state_at = $2, state_by = $3, state_reason = $4, \
             place = CASE WHEN $1 = 'resolved' THEN NULL ELSE place END WHERE seq = $5",
        )
        .bind(state.as_str())
        .bind(ms(audit.time))
        .bind(&audit.actor.id)
        .bind(&audit.reason)
        .bind(seq)
        .execute(&mut **tx)
        .await?;
        tx.commit().await?;
        Ok(Some(true))
    }

    /// Alerts not resolved yet, per kind.
    pub async fn alert_counts(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT kind, COUNT(*) AS n FROM alerts WHERE state <> 'resolved' \
             GROUP BY kind ORDER BY kind",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("kind")?, r.try_get("n")?)))
            .collect()
    }

    pub async fn alert(&self, seq: i64) -> Result<Option<AlertRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts WHERE seq = $1"
        ))
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(alert_from_row).transpose()
    }

    /// Alerts, newest first.
    pub async fn alerts(&self, f: &AlertFilter) -> Result<Vec<AlertRecord>> {
        let in_environments = match &f.environments {
            None => String::new(),
            Some(envs) if envs.is_empty() => " AND 1 = 0".to_owned(),
            Some(envs) => format!(
                " AND key_id IN (SELECT id FROM keys WHERE environment IN ({}))",
                (7..7 + envs.len())
                    .map(|n| format!("${n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let sql = format!(
            "SELECT {ALERT_COLUMNS} FROM alerts WHERE ($1 IS NULL OR key_id = $1) \
             AND ($2 IS NULL OR time >= $2) AND ($3 IS NULL OR seq < $3) \
             AND ($4 IS NULL OR kind = $4) AND ($5 IS NULL OR state = $5){in_environments} \
             ORDER BY seq DESC LIMIT $6"
        );
        let mut query = sqlx::query(&sql)
            .bind(&f.key_id)
            .bind(opt_ms(f.since))
            .bind(f.before)
            .bind(&f.kind)
            .bind(f.state.map(AlertState::as_str))
            .bind(i64::from(f.limit));
        for env in f.environments.iter().flatten() {
            query = query.bind(env);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(alert_from_row).collect()
    }
}

async fn count_repeats(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    seq: i64,
    n: i64,
    last_at: OffsetDateTime,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE alerts SET repeats = repeats + $1, \
         last_at = CASE WHEN last_at < $2 THEN $2 ELSE last_at END \
         WHERE seq = $3 AND state <> 'resolved'",
    )
    .bind(n)
    .bind(ms(last_at))
    .bind(seq)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}
