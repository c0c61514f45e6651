//! Shadow keys: foreign secrets the scanner found, by fingerprint only.

use keywarden_core::clock::from_millis;
use keywarden_core::model::AuditEntry;
use sqlx::Row;
use time::OffsetDateTime;

use crate::rows::{insert_audit, ms};
use crate::{Result, Store};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowKey {
    pub fingerprint: String,
    pub kind: String,
    pub severity: String,
    pub location: String,
    pub line: i64,
    pub first_seen: OffsetDateTime,
    pub last_seen: OffsetDateTime,
    pub sightings: i64,
    pub imported_by: String,
}

const COLUMNS: &str =
    "fingerprint, kind, severity, location, line, first_seen, last_seen, sightings, imported_by";

impl Store {
    /// Records sightings: a new fingerprint is added, a known one gets its latest place.
    /// Returns how many were new.
    pub async fn import_shadow_keys(&self, found: &[ShadowKey], audit: &AuditEntry) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let mut new = 0;
        for s in found {
            let known = sqlx::query("SELECT 1 AS one FROM shadow_keys WHERE fingerprint = $1")
                .bind(&s.fingerprint)
                .fetch_optional(&mut **tx)
                .await?
                .is_some();
            if known {
                sqlx::query(
                    "UPDATE shadow_keys SET location = $1, line = $2, last_seen = $3, \
                     sightings = sightings + 1 WHERE fingerprint = $4",
                )
                .bind(&s.location)
                .bind(s.line)
                .bind(ms(s.last_seen))
                .bind(&s.fingerprint)
                .execute(&mut **tx)
                .await?;
            } else {
                sqlx::query(&format!(
                    "INSERT INTO shadow_keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8)"
                ))
                .bind(&s.fingerprint)
                .bind(&s.kind)
                .bind(&s.severity)
                .bind(&s.location)
                .bind(s.line)
                .bind(ms(s.first_seen))
                .bind(ms(s.last_seen))
                .bind(&s.imported_by)
                .execute(&mut **tx)
                .await?;
                new += 1;
            }
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(new)
    }

    pub async fn shadow_keys(&self) -> Result<Vec<ShadowKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM shadow_keys ORDER BY last_seen DESC, fingerprint"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ShadowKey {
                    fingerprint: r.try_get("fingerprint")?,
                    kind: r.try_get("kind")?,
                    severity: r.try_get("severity")?,
                    location: r.try_get("location")?,
                    line: r.try_get("line")?,
                    first_seen: from_millis(r.try_get("first_seen")?),
                    last_seen: from_millis(r.try_get("last_seen")?),
                    sightings: r.try_get("sightings")?,
                    imported_by: r.try_get("imported_by")?,
                })
            })
            .collect()
    }
}
