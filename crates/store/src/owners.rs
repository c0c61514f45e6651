//! The owner registry, and disabling an owner together with what it does to their keys.

use keywarden_core::clock::from_millis;
use keywarden_core::model::{AuditEntry, KeyRecord};
use sqlx::Row;
use time::OffsetDateTime;

use crate::keys::update_lifecycle;
use crate::rows::{insert_audit, key_from_row, ms, KEY_COLUMNS, KEY_FROM};
use crate::{Result, Store};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub identity: String,
    pub display_name: String,
    /// `active` or `disabled`.
    pub status: String,
    pub manager: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

const COLUMNS: &str = "identity, display_name, status, manager, created_at, updated_at";

fn owner_from_row(r: &sqlx::any::AnyRow) -> Result<Owner> {
    Ok(Owner {
        identity: r.try_get("identity")?,
        display_name: r.try_get("display_name")?,
        status: r.try_get("status")?,
        manager: r.try_get("manager")?,
        created_at: from_millis(r.try_get("created_at")?),
        updated_at: from_millis(r.try_get("updated_at")?),
    })
}

impl Store {
    /// Registers an owner, or updates the name and manager of a registered one.
    pub async fn put_owner(&self, o: &Owner, audit: &AuditEntry) -> Result<()> {
        let mut tx = self.begin_write().await?;
        insert_owner(
            &mut tx,
            o,
            "DO UPDATE SET display_name = excluded.display_name, \
             manager = excluded.manager, updated_at = excluded.updated_at",
        )
        .await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await
    }

    pub async fn get_owner(&self, identity: &str) -> Result<Option<Owner>> {
        sqlx::query(&format!("SELECT {COLUMNS} FROM owners WHERE identity = $1"))
            .bind(identity)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(owner_from_row)
            .transpose()
    }

    pub async fn list_owners(&self) -> Result<Vec<Owner>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM owners ORDER BY identity"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(owner_from_row).collect()
    }

    /// How many keys (in any state) name `identity` as their owner: an owner who holds
    /// keys is known whether or not someone registered them.
    pub async fn owner_key_count(&self, identity: &str) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) AS n FROM keys WHERE owner = $1")
                .bind(identity)
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?,
        )
    }

    /// Owners that hold keys but were never registered, by identity.
    pub async fn unregistered_key_owners(&self) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT DISTINCT owner FROM keys WHERE owner <> '' AND owner NOT IN \
             (SELECT identity FROM owners) ORDER BY owner",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>("owner")?))
            .collect()
    }

    /// Sets an owner's status, registering `register` first when the owner is not in
    /// the registry (offboarding someone who holds keys nobody registered them for). When
    /// it moves to `disabled`, `act` is asked about each of the owner's live keys (active
    /// or suspended) and returns the changed key with its audit entry, or `None` to leave
    /// it, and every live admin token the owner holds is revoked with `token_audit`'s
    /// entry; all of it commits with the status or not at all. Returns the changed keys
    /// and revoked tokens, or `None` when the status was already that.
    #[allow(clippy::too_many_arguments)]
    pub async fn set_owner_status(
        &self,
        identity: &str,
        status: &str,
        at: OffsetDateTime,
        register: Option<&Owner>,
        audit: &AuditEntry,
        act: impl Fn(&KeyRecord) -> Option<(KeyRecord, AuditEntry)>,
        token_audit: impl Fn(&str) -> AuditEntry,
    ) -> Result<Option<(Vec<KeyRecord>, Vec<String>)>> {
        let mut tx = self.begin_write().await?;
        if let Some(o) = register {
            insert_owner(&mut tx, o, "DO NOTHING").await?;
        }
        let done = sqlx::query(
            "UPDATE owners SET status = $1, updated_at = $2 WHERE identity = $3 AND status <> $1",
        )
        .bind(status)
        .bind(ms(at))
        .bind(identity)
        .execute(&mut **tx)
        .await?;
        let moved = done.rows_affected() == 1;
        if moved {
            insert_audit(&mut tx, audit).await?;
        } else if status == "active" {
            return Ok(None);
        }
        // Disabling a disabled owner sweeps again: keys issued under another spelling
        // of the identity before identities were compared case-insensitively, or
        // resumed by hand, are taken as the first disable would have.
        let mut changed = Vec::new();
        let mut tokens = Vec::new();
        // Any status but active (disabled, or deleted through SCIM) takes the keys.
        if status != "active" {
            let rows = sqlx::query(&format!(
                "SELECT {KEY_COLUMNS} FROM {KEY_FROM} WHERE owner = $1 \
                 AND state IN ('active', 'suspended') ORDER BY seq"
            ))
            .bind(identity)
            .fetch_all(&mut **tx)
            .await?;
            for row in &rows {
                let key = key_from_row(row)?;
                if let Some((next, entry)) = act(&key) {
                    if update_lifecycle(&mut tx, &next).await? {
                        insert_audit(&mut tx, &entry).await?;
                        changed.push(next);
                    }
                }
            }
            let live = sqlx::query(
                "SELECT id FROM admin_tokens WHERE owner = $1 AND revoked_at IS NULL ORDER BY id",
            )
            .bind(identity)
            .fetch_all(&mut **tx)
            .await?;
            for row in &live {
                let id: String = row.try_get("id")?;
                sqlx::query(
                    "UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                )
                .bind(ms(at))
                .bind(&id)
                .execute(&mut **tx)
                .await?;
                insert_audit(&mut tx, &token_audit(&id)).await?;
                tokens.push(id);
            }
        }
        if !moved && changed.is_empty() && tokens.is_empty() {
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some((changed, tokens)))
    }
}

/// Inserts `o`; `on_conflict` says what an existing row of the same identity gets.
async fn insert_owner(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    o: &Owner,
    on_conflict: &str,
) -> Result<()> {
    sqlx::query(&format!(
        "INSERT INTO owners ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (identity) {on_conflict}"
    ))
    .bind(&o.identity)
    .bind(&o.display_name)
    .bind(&o.status)
    .bind(&o.manager)
    .bind(ms(o.created_at))
    .bind(ms(o.updated_at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}
