//! Usage events: written in batches by the server's usage writer, read newest first.

use std::collections::HashMap;

use keywarden_core::clock::from_millis;
use keywarden_core::model::UsageEvent;
use keywarden_core::verify::VerifyCode;
use keywarden_core::KeyId;
use sqlx::Row;
use time::OffsetDateTime;

use crate::rows::{decode_error, ms, Params};
use crate::{Result, Store};

/// Rows per INSERT statement: 9 parameters each stays far below both backends' limits.
const ROWS_PER_INSERT: usize = 100;

#[derive(Debug, Clone)]
pub struct StoredUsage {
    pub seq: i64,
    pub event: UsageEvent,
}

/// What a batch changes on keys (in `key_usage` and `key_subjects`): valid uses per key (the newest time and address win),
/// and first/last sighting per (key, subject).
pub(crate) struct Folds<'a> {
    pub keys: Vec<(&'a str, KeyFold<'a>)>,
    pub subjects: Vec<SubjectFold<'a>>,
}

pub(crate) struct SubjectFold<'a> {
    pub key_id: &'a str,
    pub subject: &'a str,
    pub first: OffsetDateTime,
    pub last: OffsetDateTime,
}

pub(crate) struct KeyFold<'a> {
    pub uncounted: i64,
    pub last_at: OffsetDateTime,
    pub last_from: Option<&'a str>,
}

pub(crate) fn fold(events: &[UsageEvent]) -> Folds<'_> {
    let mut keys: HashMap<&str, KeyFold<'_>> = HashMap::new();
    let mut subjects: HashMap<(&str, &str), (OffsetDateTime, OffsetDateTime)> = HashMap::new();
    for e in events.iter().filter(|e| e.code == VerifyCode::Valid) {
        let Some(id) = &e.key_id else { continue };
        let f = keys.entry(id.as_str()).or_insert(KeyFold {
            uncounted: 0,
            last_at: e.time,
            last_from: None,
        });
        if !e.counted {
            f.uncounted += 1;
        }
        if e.time >= f.last_at {
            f.last_at = e.time;
            f.last_from = e.source_ip.as_deref().or(f.last_from);
        }
        if let Some(subject) = &e.subject {
            let seen = subjects
                .entry((id.as_str(), subject.as_str()))
                .or_insert((e.time, e.time));
            seen.0 = seen.0.min(e.time);
            seen.1 = seen.1.max(e.time);
        }
    }
    Folds {
        keys: keys.into_iter().collect(),
        subjects: subjects
            .into_iter()
            .map(|((key_id, subject), (first, last))| SubjectFold {
                key_id,
                subject,
                first,
                last,
            })
            .collect(),
    }
}

/// Follows `VALUES (key_id, batched_uses, last_used_at, last_used_from), …`. Every SET
/// expression sees the row as it was before the update, on both backends.
pub(crate) const UPSERT_KEY_USAGE_TAIL: &str = "ON CONFLICT (key_id) DO UPDATE SET \
    batched_uses = key_usage.batched_uses + excluded.batched_uses, \
    last_used_from = CASE WHEN excluded.last_used_at >= key_usage.last_used_at \
    THEN excluded.last_used_from ELSE key_usage.last_used_from END, \
    last_used_at = CASE WHEN excluded.last_used_at >= key_usage.last_used_at \
    THEN excluded.last_used_at ELSE key_usage.last_used_at END";

pub(crate) const UPSERT_SUBJECT_TAIL: &str = "ON CONFLICT (key_id, subject) DO UPDATE SET \
    last_seen = CASE WHEN excluded.last_seen > key_subjects.last_seen THEN excluded.last_seen \
    ELSE key_subjects.last_seen END";

impl Store {
    /// Writes a batch of usage events in one transaction, and folds them into the keys:
    /// `uses` (for uncapped keys; capped ones were counted at verify time), `last_used_*`,
    /// and the distinct subjects a key enrolled. Takes the batch and hands it back, so the
    /// caller can retry it on error or reuse its allocation.
    pub async fn record_usage(&self, events: Vec<UsageEvent>) -> (Vec<UsageEvent>, Result<()>) {
        if events.is_empty() {
            return (events, Ok(()));
        }
        match &self.usage_sqlite {
            // SQLite: one connection of our own driving prepared statements, about three
            // times cheaper per event than assembling multi-row statements through sqlx.
            Some(sink) => {
                let sink = sink.clone();
                match tokio::task::spawn_blocking(move || {
                    let r = sink.write(&events);
                    (events, r)
                })
                .await
                {
                    Ok(done) => done,
                    Err(e) => (Vec::new(), Err(decode_error("usage writer thread", e))),
                }
            }
            None => {
                let r = self.record_usage_sql(&events).await;
                (events, r)
            }
        }
    }

    async fn record_usage_sql(&self, events: &[UsageEvent]) -> Result<()> {
        let mut tx = self.begin_write().await?;
        for chunk in events.chunks(ROWS_PER_INSERT) {
            let mut p = Params::new(self.backend);
            let mut tuples = Vec::with_capacity(chunk.len());
            for e in chunk {
                let cols = [
                    e.key_id
                        .as_ref()
                        .map_or_else(|| "NULL".to_owned(), |k| p.push_text(k.as_str())),
                    p.push_int(ms(e.time)),
                    p.push_text(e.code.as_str()),
                    opt_text(&mut p, &e.source_ip),
                    opt_text(&mut p, &e.scope),
                    opt_text(&mut p, &e.environment),
                    opt_text(&mut p, &e.subject),
                    opt_text(&mut p, &e.user_agent),
                ];
                tuples.push(format!("({})", cols.join(", ")));
            }
            let sql = format!(
                "INSERT INTO usage_events (key_id, time, code, source_ip, scope, environment, \
                 subject, user_agent) VALUES {}",
                tuples.join(", ")
            );
            p.bind(sqlx::query(&sql)).execute(&mut *tx).await?;
        }
        let folds = fold(events);
        for chunk in folds.keys.chunks(ROWS_PER_INSERT) {
            let mut p = Params::new(self.backend);
            let rows: Vec<String> = chunk
                .iter()
                .map(|(id, f)| {
                    format!(
                        "({}, {}, {}, {})",
                        p.push_text(*id),
                        p.push_int(f.uncounted),
                        p.push_int(ms(f.last_at)),
                        f.last_from
                            .map_or_else(|| "NULL".to_owned(), |s| p.push_text(s)),
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO key_usage (key_id, batched_uses, last_used_at, last_used_from) \
                 VALUES {} {UPSERT_KEY_USAGE_TAIL}",
                rows.join(", ")
            );
            p.bind(sqlx::query(&sql)).execute(&mut *tx).await?;
        }
        for chunk in folds.subjects.chunks(ROWS_PER_INSERT) {
            let mut p = Params::new(self.backend);
            let rows: Vec<String> = chunk
                .iter()
                .map(|f| {
                    format!(
                        "({}, {}, {}, {})",
                        p.push_text(f.key_id),
                        p.push_text(f.subject),
                        p.push_int(ms(f.first)),
                        p.push_int(ms(f.last)),
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO key_subjects (key_id, subject, first_seen, last_seen) VALUES {} \
                 {UPSERT_SUBJECT_TAIL}",
                rows.join(", ")
            );
            p.bind(sqlx::query(&sql)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Usage events of one key, newest first; `before` is the previous page's cursor.
    pub async fn list_usage(
        &self,
        id: &KeyId,
        limit: u32,
        before: Option<i64>,
    ) -> Result<(Vec<StoredUsage>, Option<i64>)> {
        let rows = sqlx::query(
            "SELECT seq, key_id, time, code, source_ip, scope, environment, subject, user_agent \
             FROM usage_events WHERE key_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
        )
        .bind(id.as_str())
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows.iter().take(limit as usize) {
            let code: String = row.try_get("code")?;
            out.push(StoredUsage {
                seq: row.try_get("seq")?,
                event: UsageEvent {
                    key_id: Some(id.clone()),
                    time: from_millis(row.try_get("time")?),
                    code: code.parse().map_err(|e| decode_error("code", e))?,
                    source_ip: row.try_get("source_ip")?,
                    scope: row.try_get("scope")?,
                    environment: row.try_get("environment")?,
                    subject: row.try_get("subject")?,
                    user_agent: row.try_get("user_agent")?,
                    counted: false,
                },
            });
        }
        let next = if rows.len() > limit as usize {
            out.last().map(|u| u.seq)
        } else {
            None
        };
        Ok((out, next))
    }

    /// Number of stored usage events (all keys); used by tests and the benchmark.
    pub async fn count_usage(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM usage_events")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }
}

fn opt_text(p: &mut Params, v: &Option<String>) -> String {
    match v {
        Some(s) => p.push_text(s.as_str()),
        None => "NULL".to_owned(),
    }
}
