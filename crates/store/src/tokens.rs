//! keywarden's own admin tokens.

use keywarden_core::model::{AuditEntry, TokenRecord};
use keywarden_core::KeyId;
use sqlx::Row;
use time::OffsetDateTime;

use crate::rows::{insert_audit, json, ms, opt_ms, token_from_row};
use crate::{Result, Store};

const TOKEN_COLUMNS: &str = "id, hash, pepper_version, hint, name, role, environments, \
    created_at, created_by, expires_at, revoked_at, owner, last_used_at";

impl Store {
    pub async fn insert_token(&self, t: &TokenRecord, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(&format!(
            "INSERT INTO admin_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ))
        .bind(t.id.as_str())
        .bind(t.hash.to_hex())
        .bind(i64::from(t.hash.pepper_version))
        .bind(&t.hint)
        .bind(&t.name)
        .bind(t.role.as_str())
        .bind(t.environments.as_ref().map(json).transpose()?)
        .bind(ms(t.created_at))
        .bind(&t.created_by)
        .bind(opt_ms(t.expires_at))
        .bind(opt_ms(t.revoked_at))
        .bind(&t.owner)
        .bind(opt_ms(t.last_used_at))
        .execute(&mut **tx)
        .await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_token(&self, id: &KeyId) -> Result<Option<TokenRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM admin_tokens WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM admin_tokens ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Records that a token was presented at `at` (never moving it back). A use, not a
    /// state change: no audit entry.
    pub async fn mark_token_used(&self, id: &KeyId, at: OffsetDateTime) -> Result<()> {
        let _turn = self.write_turn().await;
        sqlx::query(
            "UPDATE admin_tokens SET last_used_at = $1 WHERE id = $2 \
             AND (last_used_at IS NULL OR last_used_at < $1)",
        )
        .bind(ms(at))
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Returns false when the token does not exist or was already revoked.
    pub async fn revoke_token(
        &self,
        id: &KeyId,
        at: OffsetDateTime,
        audit: &AuditEntry,
    ) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(ms(at))
        .bind(id.as_str())
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Tokens that can still be used at `now`; zero means the deployment needs a bootstrap.
    pub async fn count_usable_tokens(&self, now: OffsetDateTime) -> Result<i64> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM admin_tokens WHERE revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $1) AND role = 'admin'",
        )
        .bind(ms(now))
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?)
    }
}
