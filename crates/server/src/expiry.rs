//! The expiry sweep: records keys whose TTL or rotation grace has ended as `expired`, each
//! with a `key.expired` audit entry by `system:expiry`. Verify refuses such keys from
//! the moment they end (their effective state is computed); the sweep makes the end a
//! stored, audited state change. Idle expiry joins it with the policy enforcer.

use std::time::Duration;

use keywarden_core::lifecycle::expiry_due;
use keywarden_core::model::{Actor, KeyState};
use serde_json::json;
use tokio::sync::watch;

use crate::routes::audit as audit_entry;
use crate::state::SharedState;

/// Keys handled per pass at most; a larger backlog is taken on the next passes.
const BATCH: u32 = 500;

pub fn actor() -> Actor {
    Actor {
        id: "system:expiry".to_owned(),
        name: "expiry".to_owned(),
        ..Actor::default()
    }
}

/// One pass; returns how many keys it recorded as expired. A key changed concurrently
/// (another node's sweep, an admin's revoke) is left to whoever won.
pub async fn sweep_once(app: &SharedState) -> Result<usize, keywarden_store::StoreError> {
    let now = app.now();
    let mut done = 0;
    for key in app.store.keys_past_expiry(now, BATCH).await? {
        let Some(reason) = expiry_due(&key, now) else {
            continue;
        };
        let mut ended = key.clone();
        ended.state = KeyState::Expired;
        ended.state_reason = Some(reason.as_str().to_owned());
        ended.state_changed_at = Some(key.expires_at);
        let entry = audit_entry(
            actor(),
            now,
            "key.expired",
            format!("key:{}", key.id),
            Some(reason.as_str().to_owned()),
            json!({
                "state": {"before": key.state.as_str(), "after": "expired"},
                "expires_at": key.expires_at.unix_timestamp(),
            }),
        );
        if app.store.update_key_state(&ended, &entry).await? {
            app.keys.evict(&key.id);
            tracing::info!(key_id = %key.id, reason = reason.as_str(), "key expired");
            done += 1;
        }
    }
    Ok(done)
}

/// Runs a pass every `every` until `shutdown` flips.
pub async fn run(app: SharedState, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = sweep_once(&app).await {
            tracing::error!(error = %e, "expiry sweep failed; retrying on the next pass");
        }
    }
}
