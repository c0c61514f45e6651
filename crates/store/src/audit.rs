//! Reading the audit trail. Writing happens only inside the transactions of the changes
//! themselves (`rows::insert_audit`). Issue 3 adds the hash chain.

use keywarden_core::clock::from_millis;
use keywarden_core::model::{Actor, AuditEntry};
use sqlx::Row;

use crate::{Result, Store};

impl Store {
    /// The audit entries of one target, oldest first.
    pub async fn audit_for(&self, target: &str) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT time, actor, actor_name, source_ip, user_agent, request_id, action, target, \
             reason, details FROM audit_events WHERE target = $1 ORDER BY seq",
        )
        .bind(target)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    time: from_millis(r.try_get("time")?),
                    actor: Actor {
                        id: r.try_get("actor")?,
                        name: r.try_get("actor_name")?,
                        source_ip: r.try_get("source_ip")?,
                        user_agent: r.try_get("user_agent")?,
                        request_id: r.try_get("request_id")?,
                    },
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    reason: r.try_get("reason")?,
                    details: r.try_get("details")?,
                })
            })
            .collect()
    }
}
