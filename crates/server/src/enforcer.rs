//! The enforcer: a job inside the server that acts on keys by itself, each action a
//! stored state change with an audit entry by `system:enforcer`. Today it records keys
//! whose TTL or rotation grace has ended, and active keys unused for their environment's
//! `idle_expiry`, as `expired` (verify refuses them from the moment they end or go idle;
//! the enforcer makes it a recorded change). Offboarding joins it later.
//!
//! `plan` says what a pass would do at a given time without acting; `pass` acts now.
//!
//! A pass also applies usage retention: it removes the oldest batches of the usage log
//! whose events are all past their retention. The enforcer does it, rather than the usage
//! writer in its idle time, because it already runs on one node only (its advisory lock),
//! reads the policy and the server's clock, writes audited changes, and is the seam tests
//! drive (`POST /v1/enforce`); the writer stays a short loop with nothing to decide.

use std::time::Duration;

use keywarden_core::lifecycle::OWNER_DISABLED;
use keywarden_core::lifecycle::{expiry_due, idle_due, last_activity, ExpiryReason};
use keywarden_core::model::{Actor, KeyRecord, KeyState, StateCause};
use keywarden_core::policy::{check_existing, OnOwnerDisabled, OnRotationOverdue, Policy};
use keywarden_store::{KeyFilter, RetentionRule, StateFilter, UsageRetention};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::routes::audit as audit_entry;
use crate::state::SharedState;

/// Keys handled per pass at most; a larger backlog is taken on the next passes.
const BATCH: u32 = 500;
/// Keys a plan lists at most.
pub const PLAN_LIMIT: u32 = 10_000;

pub fn actor() -> Actor {
    Actor {
        id: "system:enforcer".to_owned(),
        name: "enforcer".to_owned(),
        ..Actor::default()
    }
}

/// One thing the enforcer does (or would do) to a key, and why.
#[derive(Debug, Clone)]
pub struct Action {
    pub key: KeyRecord,
    /// `expire`, `suspend`, `revoke` (keys of disabled owners) or `notify`.
    pub action: &'static str,
    pub reason: &'static str,
    /// When the rule was broken (the key's end).
    pub due_at: OffsetDateTime,
    /// For policy violations: which rules the key breaks.
    pub detail: Option<String>,
}

fn decide(key: KeyRecord, at: OffsetDateTime) -> Option<Action> {
    let reason = expiry_due(&key, at)?;
    Some(Action {
        due_at: key.expires_at,
        key,
        action: "expire",
        reason: reason.as_str(),
        detail: None,
    })
}

/// Everything due at `at`: keys past their end, then keys idle under their
/// environment's rule (counting uses this node answered that are not stored yet).
async fn due(
    app: &SharedState,
    policy: &(i64, Policy),
    at: OffsetDateTime,
    limit: u32,
) -> Result<Vec<Action>, ApiError> {
    let mut actions: Vec<Action> = app
        .store
        .keys_past_expiry(at, limit)
        .await?
        .into_iter()
        .filter_map(|k| decide(k, at))
        .collect();
    // Keys of offboarded owners that something left live: held as disabling would have.
    for key in app.store.keys_of_disabled_owners(limit).await? {
        let action = match policy.1.rules_for(&key.environment).on_owner_disabled {
            OnOwnerDisabled::Revoke => "revoke",
            OnOwnerDisabled::Suspend => "suspend",
        };
        actions.push(Action {
            due_at: at,
            key,
            action,
            reason: OWNER_DISABLED,
            detail: None,
        });
    }
    let cutoff = at - policy.1.min_idle_expiry();
    for key in app.store.keys_unused_since(cutoff, at, limit).await? {
        let expiry = policy.1.rules_for(&key.environment).idle_expiry;
        let seen = app
            .keys
            .cached(&key.id)
            .flatten()
            .and_then(|c| c.last_seen());
        if idle_due(&key, expiry, seen, at) {
            actions.push(Action {
                due_at: last_activity(&key, seen) + expiry,
                key,
                action: "expire",
                reason: ExpiryReason::IdleExpired.as_str(),
                detail: None,
            });
        }
    }
    // Rotation deadlines and expiry notices: each notice is given once per key.
    let (rotation, notice) = policy.1.notice_horizons();
    let candidates = app
        .store
        .keys_for_notices(at, rotation.map(|p| at - p), notice.map(|n| at + n), limit)
        .await?;
    for key in candidates {
        let rules = policy.1.rules_for(&key.environment);
        let target = format!("key:{}", key.id);
        if let Some(period) = rules.rotation_period.filter(|p| at >= key.created_at + *p) {
            let action = match rules.on_rotation_overdue {
                OnRotationOverdue::Suspend => Some("suspend"),
                OnRotationOverdue::Notify => {
                    (!app.store.audit_has(&target, ROTATION_NOTICE, None).await?)
                        .then_some("notify")
                }
            };
            if let Some(action) = action {
                actions.push(Action {
                    due_at: key.created_at + period,
                    key: key.clone(),
                    action,
                    reason: ROTATION_OVERDUE,
                    detail: None,
                });
                continue;
            }
        }
        if let Some(n) = rules.expiry_notice.filter(|n| at >= key.expires_at - *n) {
            if !app.store.audit_has(&target, EXPIRY_NOTICE, None).await? {
                actions.push(Action {
                    due_at: key.expires_at - n,
                    key,
                    action: "notify",
                    reason: EXPIRES_SOON,
                    detail: None,
                });
            }
        }
    }
    // Existing keys that break the policy in force (say, after it tightened, or resumed by
    // hand): every active key is judged on every pass, as the plan judges them, so what
    // a plan shows is what the next pass does. A notice does not shadow a violation;
    // only an action that ends or holds the key does.
    {
        let taken: std::collections::HashSet<String> = actions
            .iter()
            .filter(|a| a.action != "notify")
            .map(|a| a.key.id.to_string())
            .collect();
        let note = format!("policy version {}", policy.0);
        let filter = KeyFilter {
            state: Some(StateFilter::Active),
            ..KeyFilter::default()
        };
        let mut after = None;
        loop {
            let (keys, next) = app.store.list_keys(&filter, at, 1000, after).await?;
            for key in keys {
                if taken.contains(key.id.as_str()) {
                    continue;
                }
                let rules = policy.1.rules_for(&key.environment);
                let broken = check_existing(rules, &key);
                if broken.is_empty() {
                    continue;
                }
                let action = match rules.on_violation {
                    OnRotationOverdue::Suspend => "suspend",
                    OnRotationOverdue::Notify => {
                        let target = format!("key:{}", key.id);
                        if app
                            .store
                            .audit_has(&target, VIOLATION_NOTICE, Some(&note))
                            .await?
                        {
                            continue;
                        }
                        "notify"
                    }
                };
                let detail = broken
                    .iter()
                    .map(|v| format!("{}: {}", v.code, v.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                actions.push(Action {
                    key,
                    action,
                    reason: POLICY_VIOLATION,
                    due_at: at,
                    detail: Some(detail),
                });
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
    }
    actions.sort_by(|a, b| {
        a.due_at
            .cmp(&b.due_at)
            .then_with(|| a.key.id.cmp(&b.key.id))
    });
    Ok(actions)
}

const ROTATION_OVERDUE: &str = "ROTATION_OVERDUE";
const EXPIRES_SOON: &str = "EXPIRES_SOON";
const POLICY_VIOLATION: &str = "POLICY_VIOLATION";
const VIOLATION_NOTICE: &str = "key.policy_violation";
/// The audit actions of the notices; a key gets each once.
const ROTATION_NOTICE: &str = "key.rotation_overdue";
const EXPIRY_NOTICE: &str = "key.expiry_notice";

/// What a pass at `at` would do, key by key, without acting.
pub async fn plan(app: &SharedState, at: OffsetDateTime) -> Result<Vec<Action>, ApiError> {
    let policy = app.policy().await?;
    due(app, &policy, at, PLAN_LIMIT).await
}

/// What the first pass under a candidate policy would do now, were it applied as the
/// next version (nothing is applied).
pub async fn plan_under(app: &SharedState, candidate: Policy) -> Result<Vec<Action>, ApiError> {
    let current = app.policy().await?;
    due(app, &(current.0 + 1, candidate), app.now(), PLAN_LIMIT).await
}

/// One pass now; returns what it did. A key changed concurrently (another node's
/// enforcer, an admin's revoke, a use) is left to whoever won.
pub async fn pass(app: &SharedState) -> Result<Vec<Action>, ApiError> {
    let done = pass_now(app).await;
    app.metrics.enforcer_pass(done.is_ok());
    prune_rollups(app).await;
    done
}

/// Removes usage rollups of hours older than the retention. A small job: with the hour
/// index it costs one probe when nothing is due, so it runs on every pass. A failure is
/// logged and retried on the next pass; it does not fail the pass's key actions.
async fn prune_rollups(app: &SharedState) {
    let before = keywarden_store::hour_of(keywarden_core::clock::to_millis(
        app.now() - app.config.usage_rollup_retention,
    ));
    match app.store.prune_usage_rollups(before).await {
        Ok(0) => {}
        Ok(rows) => tracing::info!(rows, "usage rollups past their retention removed"),
        Err(e) => {
            tracing::error!(error = %e, "removing old usage rollups failed; retrying on the next pass")
        }
    }
}

async fn pass_now(app: &SharedState) -> Result<Vec<Action>, ApiError> {
    let now = app.now();
    let mut done = Vec::new();
    let policy = app.policy().await?;
    let version = policy.0;
    for action in due(app, &policy, now, BATCH).await? {
        let key = &action.key;
        if action.action == "notify" {
            let (kind, why) = match action.reason {
                ROTATION_OVERDUE => (ROTATION_NOTICE, action.reason.to_owned()),
                POLICY_VIOLATION => (VIOLATION_NOTICE, format!("policy version {version}")),
                _ => (EXPIRY_NOTICE, action.reason.to_owned()),
            };
            let entry = audit_entry(
                actor(),
                now,
                kind,
                format!("key:{}", key.id),
                Some(why),
                json!({"owner": key.owner, "due_at": action.due_at.unix_timestamp(),
                       "expires_at": key.expires_at.unix_timestamp(),
                       "violations": action.detail}),
            );
            app.store.append_audit(std::slice::from_ref(&entry)).await?;
            tracing::info!(key_id = %key.id, reason = action.reason, "key notice");
            done.push(action);
            continue;
        }
        if action.action == "suspend" {
            let mut held = key.clone();
            held.state = KeyState::Suspended;
            held.state_reason = Some(action.reason.to_owned());
            held.state_cause = StateCause::from_code(action.reason);
            held.state_changed_at = Some(now);
            let entry = audit_entry(
                actor(),
                now,
                "key.suspended",
                format!("key:{}", key.id),
                Some(action.reason.to_owned()),
                json!({"state": {"before": key.state.as_str(), "after": "suspended"},
                       "due_at": action.due_at.unix_timestamp(),
                       "violations": action.detail}),
            );
            if app.store.update_key_state(&held, &entry).await? {
                app.keys.evict(&key.id);
                tracing::info!(key_id = %key.id, reason = action.reason, "key suspended");
                done.push(action);
            }
            continue;
        }
        if action.action == "revoke" {
            let mut gone = key.clone();
            gone.state = KeyState::Revoked;
            gone.state_reason = Some(action.reason.to_owned());
            gone.state_cause = StateCause::from_code(action.reason);
            gone.state_changed_at = Some(now);
            let entry = audit_entry(
                actor(),
                now,
                "key.revoked",
                format!("key:{}", key.id),
                Some(action.reason.to_owned()),
                json!({"state": {"before": key.state.as_str(), "after": "revoked"},
                       "owner": key.owner}),
            );
            if app.store.update_key_state(&gone, &entry).await? {
                app.keys.evict(&key.id);
                tracing::info!(key_id = %key.id, reason = action.reason, "key revoked");
                done.push(action);
            }
            continue;
        }
        let mut ended = key.clone();
        ended.state = KeyState::Expired;
        ended.state_reason = Some(action.reason.to_owned());
        ended.state_cause = StateCause::from_code(action.reason);
        ended.state_changed_at = Some(action.due_at);
        let entry = audit_entry(
            actor(),
            now,
            "key.expired",
            format!("key:{}", key.id),
            Some(action.reason.to_owned()),
            json!({
                "state": {"before": key.state.as_str(), "after": "expired"},
                "expires_at": key.expires_at.unix_timestamp(),
                "last_used_at": key.last_used_at.map(|t| t.unix_timestamp()),
            }),
        );
        if app.store.update_key_state(&ended, &entry).await? {
            app.keys.evict(&key.id);
            tracing::info!(key_id = %key.id, reason = action.reason, "key expired");
            done.push(action);
        }
    }
    retain_usage(app, &policy.1, now).await;
    anchor_usage(app, now).await?;
    Ok(done)
}

/// How often at most the usage chain's head is recorded in the audit trail: often enough
/// that a cut or rewritten usage log is caught up to a few minutes from its end, rarely
/// enough that anchors stay a small part of the trail (144 entries a day).
pub const USAGE_ANCHOR_EVERY: time::Duration = time::Duration::minutes(10);

/// Records the usage chain's head in the audit trail (`usage.anchored`) when it moved
/// and the last anchor is older than [`USAGE_ANCHOR_EVERY`], so that `audit verify
/// --usage` can tell a consistent rewrite of the usage log, or a cut tail, from the log
/// as written. A failure fails the pass, as any audit write does.
async fn anchor_usage(app: &SharedState, now: OffsetDateTime) -> Result<(), ApiError> {
    let head = app.store.usage_chain_head().await?;
    if head.batch_seq == 0 {
        return Ok(());
    }
    // By target first: `(target, seq)` is indexed, and few entries are about "usage".
    let filter = keywarden_store::AuditFilter {
        target: Some("usage".to_owned()),
        action: Some(USAGE_ANCHORED.to_owned()),
        ..keywarden_store::AuditFilter::default()
    };
    let (last, _) = app
        .store
        .audit_entries(&filter, keywarden_store::AuditOrder::NewestFirst, None, 1)
        .await?;
    if let Some(last) = last.first() {
        let anchored: Option<i64> = serde_json::from_str::<serde_json::Value>(&last.entry.details)
            .ok()
            .and_then(|d| d["batch"].as_i64());
        if anchored.is_some_and(|b| b >= head.batch_seq)
            || now - last.entry.time < USAGE_ANCHOR_EVERY
        {
            return Ok(());
        }
    }
    let entry = audit_entry(
        actor(),
        now,
        USAGE_ANCHORED,
        "usage".to_owned(),
        None,
        json!({
            "batch": head.batch_seq,
            "hash": keywarden_core::audit_chain::to_hex(&head.hash),
        }),
    );
    app.store.append_audit(std::slice::from_ref(&entry)).await?;
    Ok(())
}

/// The audit action of a usage chain anchor.
pub const USAGE_ANCHORED: &str = "usage.anchored";

/// Prefixes removed per pass at most (each of up to `RETENTION_CHUNK` events, in its own
/// transaction): a large backlog, such as the first pass after an upgrade, is spread over
/// passes instead of holding one up.
const RETENTION_CHUNKS: usize = 50;

/// Removes the usage batches past retention at `now`, each prefix with its
/// `usage.retained` audit entry. A failure is logged and leaves the log as it was: key
/// actions of the pass stand, and the next pass tries again.
async fn retain_usage(
    app: &SharedState,
    policy: &Policy,
    now: OffsetDateTime,
) -> Vec<UsageRetention> {
    let (default, environments) = policy.usage_retention(app.config.usage_retention);
    let rule = RetentionRule {
        default,
        environments,
    };
    let mut done = Vec::new();
    for _ in 0..RETENTION_CHUNKS {
        let entry = |r: &UsageRetention| {
            audit_entry(
                actor(),
                now,
                "usage.retained",
                "usage".to_owned(),
                Some("USAGE_RETENTION".to_owned()),
                json!({
                    "first_batch": r.first_batch,
                    "last_batch": r.last_batch,
                    "first_seq": r.first_seq,
                    "last_seq": r.last_seq,
                    "events": r.events,
                    "last_hash": keywarden_core::audit_chain::to_hex(&r.last_hash),
                }),
            )
        };
        match app.store.retain_usage(&rule, now, entry).await {
            Ok(Some(r)) => {
                tracing::info!(
                    first_batch = r.first_batch,
                    last_batch = r.last_batch,
                    events = r.events,
                    "usage events past retention removed"
                );
                done.push(r);
            }
            Ok(None) => break,
            Err(e) => {
                tracing::error!(error = %e, "usage retention failed; retrying on the next pass");
                break;
            }
        }
    }
    done
}

/// Runs a pass every `every` until `shutdown` flips.
pub async fn run(app: SharedState, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lead = crate::cluster::Lead::new(crate::cluster::ENFORCER_LOCK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        // Several nodes: one runs the passes; another takes over when it stops.
        if !lead.ensure(&app.store).await {
            continue;
        }
        if let Err(e) = pass(&app).await {
            tracing::error!(error = %e, "enforcer pass failed; retrying on the next one");
        }
    }
}
