//! Connected services and the delivery of key events to them.
//!
//! The outbox (`key_events`) is written with each change; the dispatcher fans it out
//! into one `deliveries` row per subscribed service ([`Store::fan_out`]), takes the due
//! ones ([`Store::due_deliveries`]) and records each answer. A delivery is due only when
//! no earlier delivery of the same key to the same service is still open, so per key,
//! events arrive in order.

use keywarden_core::clock::from_millis;
use keywarden_core::model::AuditEntry;
use keywarden_core::webhook::category;
use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use crate::audit::{key_event_from_row, KeyEvent};
use crate::rows::{ms, opt_ms};
use crate::{Result, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    pub id: String,
    pub name: String,
    pub webhook_url: Option<String>,
    pub events: Vec<String>,
    pub secret_salt: String,
    pub pepper_version: u32,
    pub created_at: OffsetDateTime,
    pub created_by: String,
    /// Events after this seq are delivered (set at registration: no history replay).
    pub start_seq: i64,
    pub fanout_seq: i64,
    pub acked_seq: i64,
    /// `standard` or `slack`: how its webhook messages are shaped.
    pub format: String,
}

impl ServiceRecord {
    pub fn subscribes_to(&self, event: &str) -> bool {
        category(event).is_some_and(|c| self.events.iter().any(|e| e == c))
    }
}

/// One event's delivery to one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub service_id: String,
    pub seq: i64,
    pub key_id: String,
    pub event: String,
    /// `pending`, `failing`, `confirmed` or `abandoned`.
    pub state: String,
    pub attempts: i64,
    pub next_at: OffsetDateTime,
    pub last_error: Option<String>,
    pub created_at: OffsetDateTime,
    pub confirmed_at: Option<OffsetDateTime>,
}

/// A delivery the dispatcher should attempt now, with what it needs to send it.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub service_id: String,
    pub service_name: String,
    pub webhook_url: String,
    pub secret_salt: String,
    pub pepper_version: u32,
    pub format: String,
    pub attempts: i64,
    pub created_at: OffsetDateTime,
    pub event: KeyEvent,
}

#[derive(Debug, Clone)]
pub enum DeliveryOutcome {
    Confirmed {
        at: OffsetDateTime,
    },
    Failed {
        error: String,
        /// `None`: the retry window is over; the delivery is abandoned.
        next_at: Option<OffsetDateTime>,
    },
}

const SERVICE_COLUMNS: &str = "id, name, webhook_url, events, secret_salt, pepper_version, \
    created_at, created_by, start_seq, fanout_seq, acked_seq, format";
const DELIVERY_COLUMNS: &str = "service_id, seq, key_id, event, state, attempts, next_at, \
    last_error, created_at, confirmed_at";
fn service_from_row(r: &AnyRow) -> Result<ServiceRecord> {
    let events: String = r.try_get("events")?;
    let pv: i64 = r.try_get("pepper_version")?;
    Ok(ServiceRecord {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        webhook_url: r.try_get("webhook_url")?,
        events: events.split(',').map(str::to_owned).collect(),
        secret_salt: r.try_get("secret_salt")?,
        pepper_version: u32::try_from(pv)
            .map_err(|_| StoreError::Corrupt(format!("services.pepper_version {pv}")))?,
        created_at: from_millis(r.try_get("created_at")?),
        created_by: r.try_get("created_by")?,
        start_seq: r.try_get("start_seq")?,
        fanout_seq: r.try_get("fanout_seq")?,
        acked_seq: r.try_get("acked_seq")?,
        format: r.try_get("format")?,
    })
}

fn delivery_from_row(r: &AnyRow) -> Result<DeliveryRecord> {
    Ok(DeliveryRecord {
        service_id: r.try_get("service_id")?,
        seq: r.try_get("seq")?,
        key_id: r.try_get("key_id")?,
        event: r.try_get("event")?,
        state: r.try_get("state")?,
        attempts: r.try_get("attempts")?,
        next_at: from_millis(r.try_get("next_at")?),
        last_error: r.try_get("last_error")?,
        created_at: from_millis(r.try_get("created_at")?),
        confirmed_at: r
            .try_get::<Option<i64>, _>("confirmed_at")?
            .map(from_millis),
    })
}

/// How many outbox events one fan-out pass reads per service.
const FAN_OUT_BATCH: i64 = 1000;

impl Store {
    /// Registers a service; it hears of events after the current outbox head. `false` when
    /// the name is taken.
    pub async fn create_service(&self, s: &ServiceRecord, audit: &AuditEntry) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let taken = sqlx::query("SELECT 1 AS one FROM services WHERE name = $1")
            .bind(&s.name)
            .fetch_optional(&mut **tx)
            .await?
            .is_some();
        if taken {
            return Ok(false);
        }
        // Rows past the audit head were written around keywarden (see
        // `check_nothing_past_head`): never a service's starting point, never sent.
        let head: i64 = sqlx::query(
            "SELECT COALESCE(MAX(seq), 0) AS head FROM key_events \
             WHERE seq <= (SELECT seq FROM audit_head WHERE id = 1)",
        )
        .fetch_one(&mut **tx)
        .await?
        .try_get("head")?;
        sqlx::query(&format!(
            "INSERT INTO services ({SERVICE_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&s.id)
        .bind(&s.name)
        .bind(&s.webhook_url)
        .bind(s.events.join(","))
        .bind(&s.secret_salt)
        .bind(i64::from(s.pepper_version))
        .bind(ms(s.created_at))
        .bind(&s.created_by)
        .bind(head)
        .bind(head)
        .bind(0_i64)
        .bind(&s.format)
        .execute(&mut **tx)
        .await?;
        crate::audit::append(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn list_services(&self) -> Result<Vec<ServiceRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {SERVICE_COLUMNS} FROM services ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(service_from_row).collect()
    }

    /// A service by id or by name.
    pub async fn get_service(&self, id_or_name: &str) -> Result<Option<ServiceRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {SERVICE_COLUMNS} FROM services WHERE id = $1 OR name = $1"
        ))
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(service_from_row).transpose()
    }

    /// Removes a service and its deliveries. `false` when there was none.
    pub async fn delete_service(&self, id: &str, audit: &AuditEntry) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM deliveries WHERE service_id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        let gone = sqlx::query("DELETE FROM services WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        if gone == 0 {
            return Ok(false);
        }
        crate::audit::append(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Deliveries of a service per state.
    pub async fn delivery_counts(&self, service_id: &str) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM deliveries WHERE service_id = $1 GROUP BY state \
             ORDER BY state",
        )
        .bind(service_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }

    /// Deliveries across all services in the states worth watching (`pending`, `failing`,
    /// `abandoned`), per state; a state with none is left out. For the metrics endpoint:
    /// `deliveries_open` (state, next_at) serves the first two, and abandoned rows stay
    /// few unless services are gone for days.
    pub async fn delivery_state_counts(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM deliveries \
             WHERE state IN ('pending', 'failing', 'abandoned') GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }

    /// The latest deliveries of a service, newest first.
    pub async fn recent_deliveries(
        &self,
        service_id: &str,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE service_id = $1 \
             ORDER BY seq DESC LIMIT $2"
        ))
        .bind(service_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    /// The deliveries of one event, one per service that has a row for it.
    pub async fn deliveries_of(&self, seq: i64) -> Result<Vec<DeliveryRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE seq = $1"
        ))
        .bind(seq)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    /// Turns new outbox events into deliveries for each subscribed service. Returns how
    /// many deliveries it made. Idempotent: a row that exists is left as it is.
    pub async fn fan_out(&self, now: OffsetDateTime) -> Result<u64> {
        // The common case, nothing new, costs two reads and no write.
        let head = self.key_events_head().await?;
        let behind = sqlx::query("SELECT COUNT(*) AS n FROM services WHERE fanout_seq < $1")
            .bind(head)
            .fetch_one(&self.pool)
            .await?
            .try_get::<i64, _>("n")?;
        if behind == 0 {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let services = sqlx::query(&format!(
            "SELECT {SERVICE_COLUMNS} FROM services WHERE fanout_seq < $1"
        ))
        .bind(head)
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(service_from_row)
        .collect::<Result<Vec<_>>>()?;
        let mut made = 0;
        for s in services {
            let events = sqlx::query(&format!(
                "SELECT {} FROM key_events WHERE seq > $1 \
                 AND seq <= (SELECT seq FROM audit_head WHERE id = 1) ORDER BY seq LIMIT $2",
                crate::audit::KEY_EVENT_COLUMNS
            ))
            .bind(s.fanout_seq)
            .bind(FAN_OUT_BATCH)
            .fetch_all(&mut **tx)
            .await?
            .iter()
            .map(key_event_from_row)
            .collect::<Result<Vec<_>>>()?;
            let Some(last) = events.last().map(|e| e.seq) else {
                continue;
            };
            for e in events.iter().filter(|e| s.subscribes_to(&e.event)) {
                // A pull service may have acknowledged past this event already.
                let acked = e.seq <= s.acked_seq;
                made += sqlx::query(&format!(
                    "INSERT INTO deliveries ({DELIVERY_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, 0, $6, NULL, $7, $8) \
                     ON CONFLICT (service_id, seq) DO NOTHING"
                ))
                .bind(&s.id)
                .bind(e.seq)
                .bind(&e.key_id)
                .bind(&e.event)
                .bind(if acked { "confirmed" } else { "pending" })
                .bind(ms(now))
                .bind(ms(now))
                .bind(acked.then(|| ms(now)))
                .execute(&mut **tx)
                .await?
                .rows_affected();
            }
            sqlx::query("UPDATE services SET fanout_seq = $1 WHERE id = $2 AND fanout_seq < $1")
                .bind(last)
                .bind(&s.id)
                .execute(&mut **tx)
                .await?;
        }
        tx.commit().await?;
        Ok(made)
    }

    /// Webhook deliveries to attempt now, oldest first, at most one open per key and
    /// service (the earliest).
    pub async fn due_deliveries(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<DueDelivery>> {
        let rows = sqlx::query(
            "SELECT d.service_id, d.attempts, d.created_at AS d_created, s.name, \
                    COALESCE(s.webhook_url, '') AS webhook_url, \
                    s.secret_salt, s.pepper_version, s.format, \
                    e.seq, e.time, e.key_id, e.event, e.reason, e.actor, e.details \
             FROM deliveries d \
             JOIN services s ON s.id = d.service_id \
             JOIN key_events e ON e.seq = d.seq \
             WHERE d.state IN ('pending', 'failing') AND d.next_at <= $1 \
               AND (s.webhook_url IS NOT NULL OR s.format = 'email') \
               AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.key_id = d.key_id \
                   AND p.service_id = d.service_id AND p.seq < d.seq \
                   AND p.state IN ('pending', 'failing')) \
             ORDER BY d.seq LIMIT $2",
        )
        .bind(ms(now))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let pv: i64 = r.try_get("pepper_version")?;
                Ok(DueDelivery {
                    service_id: r.try_get("service_id")?,
                    service_name: r.try_get("name")?,
                    webhook_url: r.try_get("webhook_url")?,
                    secret_salt: r.try_get("secret_salt")?,
                    pepper_version: u32::try_from(pv).map_err(|_| {
                        StoreError::Corrupt(format!("services.pepper_version {pv}"))
                    })?,
                    format: r.try_get("format")?,
                    attempts: r.try_get("attempts")?,
                    created_at: from_millis(r.try_get("d_created")?),
                    event: key_event_from_row(r)?,
                })
            })
            .collect()
    }

    /// Whether a delivery is still due: open (pending or failing) and its time come.
    pub async fn delivery_due(
        &self,
        service_id: &str,
        seq: i64,
        now: OffsetDateTime,
    ) -> Result<bool> {
        Ok(sqlx::query(
            "SELECT 1 AS one FROM deliveries WHERE service_id = $1 AND seq = $2 \
             AND state IN ('pending', 'failing') AND next_at <= $3",
        )
        .bind(service_id)
        .bind(seq)
        .bind(ms(now))
        .fetch_optional(&self.pool)
        .await?
        .is_some())
    }

    /// Records the answer to one attempt. Does nothing to a delivery that is no longer
    /// open (an ack may have confirmed it meanwhile).
    pub async fn record_delivery(
        &self,
        service_id: &str,
        seq: i64,
        outcome: &DeliveryOutcome,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let q = match outcome {
            DeliveryOutcome::Confirmed { at } => sqlx::query(
                "UPDATE deliveries SET state = 'confirmed', attempts = attempts + 1, \
                 confirmed_at = $1, last_error = NULL \
                 WHERE service_id = $2 AND seq = $3 AND state IN ('pending', 'failing')",
            )
            .bind(ms(*at)),
            DeliveryOutcome::Failed { error, next_at } => sqlx::query(
                "UPDATE deliveries SET state = $1, attempts = attempts + 1, last_error = $2, \
                 next_at = COALESCE($3, next_at) \
                 WHERE service_id = $4 AND seq = $5 AND state IN ('pending', 'failing')",
            )
            .bind(if next_at.is_some() {
                "failing"
            } else {
                "abandoned"
            })
            .bind(error.as_str())
            .bind(opt_ms(*next_at)),
        };
        q.bind(service_id).bind(seq).execute(&mut **tx).await?;
        tx.commit().await
    }

    /// A pull service confirms every event up to `seq`. Returns how many deliveries this
    /// confirmed, or `None` when the service does not exist.
    pub async fn ack_service(
        &self,
        service_id: &str,
        seq: i64,
        at: OffsetDateTime,
    ) -> Result<Option<u64>> {
        let mut tx = self.begin_write().await?;
        let found = sqlx::query(
            "UPDATE services SET acked_seq = CASE WHEN acked_seq < $1 THEN $1 ELSE acked_seq END \
             WHERE id = $2",
        )
        .bind(seq)
        .bind(service_id)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if found == 0 {
            return Ok(None);
        }
        let confirmed = sqlx::query(
            "UPDATE deliveries SET state = 'confirmed', confirmed_at = $1, last_error = NULL \
             WHERE service_id = $2 AND seq <= $3 AND state IN ('pending', 'failing')",
        )
        .bind(ms(at))
        .bind(service_id)
        .bind(seq)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(Some(confirmed))
    }
}
