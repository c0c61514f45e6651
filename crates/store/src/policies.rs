//! Applied policies: each version kept as the TOML text that was applied.

use keywarden_core::clock::from_millis;
use keywarden_core::model::AuditEntry;
use sqlx::Row;
use time::OffsetDateTime;

use crate::rows::{insert_audit, ms};
use crate::{Result, Store};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    pub version: i64,
    pub text: String,
    pub applied_at: OffsetDateTime,
    pub applied_by: String,
}

impl Store {
    /// Stores `text` as the next version, with its audit entry, in one transaction.
    /// `audit` is built by the caller from the version it is told: the closure receives
    /// the new version and the previous policy, if any.
    pub async fn apply_policy(
        &self,
        text: &str,
        at: OffsetDateTime,
        by: &str,
        audit: impl FnOnce(i64, Option<&StoredPolicy>) -> AuditEntry,
    ) -> Result<StoredPolicy> {
        let mut tx = self.begin_write().await?;
        let previous = sqlx::query(
            "SELECT version, text, applied_at, applied_by FROM policies \
             ORDER BY version DESC LIMIT 1",
        )
        .fetch_optional(&mut **tx)
        .await?
        .map(|r| policy_from_row(&r))
        .transpose()?;
        let version = previous.as_ref().map_or(1, |p| p.version + 1);
        sqlx::query(
            "INSERT INTO policies (version, text, applied_at, applied_by) VALUES ($1, $2, $3, $4)",
        )
        .bind(version)
        .bind(text)
        .bind(ms(at))
        .bind(by)
        .execute(&mut **tx)
        .await?;
        let entry = audit(version, previous.as_ref());
        insert_audit(&mut tx, &entry).await?;
        tx.commit().await?;
        Ok(StoredPolicy {
            version,
            text: text.to_owned(),
            applied_at: at,
            applied_by: by.to_owned(),
        })
    }

    /// The policy in force, if one was ever applied.
    pub async fn current_policy(&self) -> Result<Option<StoredPolicy>> {
        sqlx::query(
            "SELECT version, text, applied_at, applied_by FROM policies \
             ORDER BY version DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?
        .map(|r| policy_from_row(&r))
        .transpose()
    }

    /// The version in force (0: none applied). Cheap enough to ask before each issue, so
    /// every node follows an apply made through another.
    pub async fn policy_version(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM policies")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("v")?)
    }
}

fn policy_from_row(r: &sqlx::any::AnyRow) -> Result<StoredPolicy> {
    Ok(StoredPolicy {
        version: r.try_get("version")?,
        text: r.try_get("text")?,
        applied_at: from_millis(r.try_get("applied_at")?),
        applied_by: r.try_get("applied_by")?,
    })
}
