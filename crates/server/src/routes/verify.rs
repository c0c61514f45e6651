//! `POST /v1/verify`: the hot path for gateways and services.
//!
//! Parse and checksum first (no IO for junk), then the cache (store only on a miss), a
//! constant-time hash comparison, the pure decision, and for capped keys one atomic
//! decrement in the store. Every answer is queued as a usage event.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use keywarden_core::key_format::{self, ADMIN_ENV};
use keywarden_core::model::UsageEvent;
use keywarden_core::role::Permission;
use keywarden_core::scope::Scope;
use keywarden_core::verify::{decide_with, Idle, VerifyCode, VerifyRequest};
use keywarden_core::{validate, KeyId};
use keywarden_proto::{ErrorBody, ErrorCode, VerifyRequest as WireRequest, VerifyResponse};
use time::OffsetDateTime;
use tokio::sync::mpsc::error::TrySendError;

use crate::auth::Principal;
use crate::cache::{CachedKey, Entry, Lookup, VALID_HEAD};
use crate::error::{violation, ApiError};
use crate::extract::JsonBody;
use crate::limits::micros;
use crate::state::{AppState, SharedState};

const USAGE_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Verify a key. Always 200 for a well-formed request; `valid` and `code` say the verdict.
#[utoipa::path(post, path = "/v1/verify", tag = "verify", request_body = keywarden_proto::VerifyRequest,
    responses((status = 200, body = VerifyResponse), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn verify(
    State(app): State<SharedState>,
    principal: Principal,
    JsonBody(mut req): JsonBody<WireRequest>,
) -> Result<axum::response::Response, ApiError> {
    principal.require(Permission::Verify)?;
    let mut ask = validate_request(&mut req, principal.client_ip)?;
    ask.environments.clone_from(&principal.token.environments);
    let outcome = judge(
        &app,
        &req.key,
        ask,
        req.subject,
        principal.user_agent.clone(),
        || principal.actor(),
    )
    .await?;
    let retry_after = outcome.retry_after_header();
    let mut response = (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        outcome.body(),
    )
        .into_response();
    if let Some(v) = retry_after {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, v);
    }
    Ok(response)
}

/// Decides on a key and records the decision: its usage event (before the answer
/// leaves) and, for an answer the monitor watches, a sighting. Shared by `/v1/verify` and
/// the gateway's `/v1/auth`.
pub(crate) async fn judge(
    app: &AppState,
    key: &str,
    ask: VerifyRequest,
    subject: Option<String>,
    user_agent: Option<String>,
    asked_by: impl FnOnce() -> keywarden_core::model::Actor,
) -> Result<Outcome, ApiError> {
    // One monotonic clock pair per verdict, for the latency histogram.
    let started = std::time::Instant::now();
    let now = app.now();
    let now_us = micros(now);
    let watching = app.watching();
    let throttle = app.with_cached_policy(|p| p.rules_for("").throttle_failures);
    let throttle = throttle.zip(ask.source_ip).filter(|_| watching);
    let blocked = throttle.and_then(|(rate, ip)| app.limits.throttled(ip, &rate, now_us));
    let outcome = match blocked {
        // A source that keeps presenting bad keys is not heard until it waits.
        Some(wait) => Outcome::rate_limited(
            key_format::parse_parts(key, &app.config.key_prefix)
                .ok()
                .map(|p| p.id),
            wait,
        ),
        None => check(app, key, &ask, now).await?,
    };
    if let Some(what) = outcome.what(&ask, now).filter(|_| watching) {
        if outcome.is_bad_key() {
            if let Some((rate, ip)) = throttle {
                app.limits.count_failure(ip, &rate, now_us);
            }
        }
        let seen = outcome.seen();
        let sighting = crate::alerts::Sighting {
            time: now,
            what,
            key_id: outcome.key_id.as_ref().map(ToString::to_string),
            environment: seen.map(|k| k.environment.clone()),
            code: outcome.code,
            source_ip: ask.source_ip,
            user_agent: user_agent.clone(),
            subject: subject.clone(),
            scope: ask.scope.as_ref().map(ToString::to_string),
            asked_by: asked_by(),
        };
        if app.alerts.try_send(sighting).is_err() {
            // The use itself is in the usage log; only the alert is lost. Counted, and
            // logged by the monitor once a second, not once per verify of a flood.
            app.alerts_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let event = UsageEvent {
        key_id: outcome.key_id.clone(),
        time: now,
        code: outcome.code,
        source_ip: ask.source_ip,
        scope: ask.scope.map(String::from),
        environment: ask.environment,
        subject,
        user_agent,
        counted: outcome.counted,
    };
    // No verdict leaves without its usage event queued. A full queue means the store has
    // stalled: wait up to a second, then fail closed rather than answer unrecorded.
    let unavailable = |message: &str| ApiError::coded(ErrorCode::StoreUnavailable, message);
    // try_send first: the queue has room almost always, and a timeout costs a clock read.
    let queued = match app.usage.try_send(event) {
        Ok(()) => Ok(Ok(())),
        Err(TrySendError::Closed(_)) => Ok(Err(())),
        Err(TrySendError::Full(event)) => {
            tokio::time::timeout(USAGE_QUEUE_WAIT, app.usage.send(event))
                .await
                .map(|sent| sent.map_err(|_| ()))
        }
    };
    match queued {
        Ok(Ok(())) => {}
        Ok(Err(())) => return Err(unavailable("server is shutting down")),
        // The 5xx log line (`errlog`) says this once per refused verify.
        Err(_) => {
            return Err(unavailable(
                "the usage queue has been full for 1s (the store is not keeping up): usage \
                 events cannot be recorded right now; try again",
            ));
        }
    }
    app.metrics.verified(outcome.code, started.elapsed());
    Ok(outcome)
}

/// Takes the scope and environment out of `req`: they go on into the usage event.
fn validate_request(
    req: &mut WireRequest,
    client_ip: Option<IpAddr>,
) -> Result<VerifyRequest, ApiError> {
    let mut v = Vec::new();
    let scope = match req.scope.take().map(Scope::requested_owned).transpose() {
        Ok(s) => s,
        Err(e) => {
            v.push(violation(ErrorCode::ScopeInvalid, "scope", e.to_string()));
            None
        }
    };
    if let Some(env) = &req.environment {
        if let Err(e) = validate::environment(env) {
            v.push(violation(ErrorCode::FieldInvalid, &e.field, e.message));
        }
    }
    let source_ip = match req.source_ip.as_deref() {
        None => client_ip,
        Some(s) => match s.trim().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                v.push(violation(
                    ErrorCode::FieldInvalid,
                    "source_ip",
                    "not an IPv4 or IPv6 address",
                ));
                None
            }
        },
    };
    if let Some(s) = &req.subject {
        if s.is_empty() || s.len() > 255 || s.chars().any(char::is_control) {
            v.push(violation(
                ErrorCode::FieldInvalid,
                "subject",
                "1-255 characters, no control characters",
            ));
        }
    }
    if !v.is_empty() {
        return Err(ApiError::Validation(v));
    }
    Ok(VerifyRequest {
        scope,
        environment: req.environment.take(),
        source_ip,
        environments: None,
    })
}

pub(crate) struct Outcome {
    pub code: VerifyCode,
    key_id: Option<KeyId>,
    /// Set when the caller proved possession of the key (hash matched).
    pub key: Option<Arc<CachedKey>>,
    remaining_uses: Option<u64>,
    counted: bool,
    /// RATE_LIMITED: microseconds until the caller may try again.
    pub retry_after_us: Option<i64>,
    /// What the answer hides from the caller but the monitor must know.
    hidden: Hidden,
}

/// Answers that look like an unknown key to the caller.
enum Hidden {
    Nothing,
    /// The id exists; the secret was wrong.
    WrongSecret(Arc<CachedKey>),
    /// A canary: the secret was right, and it never verifies.
    Canary(Arc<CachedKey>),
}

impl Outcome {
    fn unknown(code: VerifyCode, key_id: Option<KeyId>) -> Self {
        Self {
            code,
            key_id,
            key: None,
            remaining_uses: None,
            counted: false,
            retry_after_us: None,
            hidden: Hidden::Nothing,
        }
    }

    fn rate_limited(key_id: Option<KeyId>, wait_us: i64) -> Self {
        Self {
            retry_after_us: Some(wait_us.max(1)),
            ..Self::unknown(VerifyCode::RateLimited, key_id)
        }
    }

    /// `Retry-After` in whole seconds, rounded up, for a RATE_LIMITED answer.
    pub fn retry_after_header(&self) -> Option<axum::http::HeaderValue> {
        let us = self.retry_after_us?;
        let seconds = u64::try_from(us).unwrap_or(0).div_ceil(1_000_000).max(1);
        Some(axum::http::HeaderValue::from(seconds))
    }

    /// A malformed key, an unknown id or a wrong secret: what a source is throttled for.
    fn is_bad_key(&self) -> bool {
        matches!(self.code, VerifyCode::Malformed | VerifyCode::NotFound)
    }

    /// The record behind the answer, proven or not.
    fn seen(&self) -> Option<&Arc<CachedKey>> {
        match &self.hidden {
            Hidden::WrongSecret(k) | Hidden::Canary(k) => Some(k),
            Hidden::Nothing => self.key.as_ref(),
        }
    }

    /// What the monitor is told of this answer; `None` for answers it does not watch.
    fn what(&self, ask: &VerifyRequest, now: OffsetDateTime) -> Option<crate::alerts::What> {
        use crate::alerts::What;
        Some(match (self.code, &self.hidden) {
            (VerifyCode::NotFound, Hidden::WrongSecret(_)) => What::WrongSecret,
            (VerifyCode::NotFound, Hidden::Canary(_)) => What::Canary,
            (VerifyCode::NotFound | VerifyCode::Malformed, _) => What::Unknown,
            (VerifyCode::ScopeDenied, _) => What::ScopeDenied,
            (VerifyCode::EnvironmentMismatch, _) => {
                What::EnvironmentCrossing(ask.environment.clone())
            }
            (code, _) if crate::alerts::is_still_in_use(code) => {
                let k = self.key.as_ref()?;
                What::Dead(crate::alerts::dead_since(k, code, now))
            }
            _ => return None,
        })
    }

    /// The answer's JSON, exactly as `serde_json` writes [`Self::into_response`]. A VALID
    /// answer splices the fields its key serialized when it was cached.
    pub fn body(self) -> Vec<u8> {
        if let Some(k) = self.key.as_ref().filter(|_| self.code == VerifyCode::Valid) {
            let fields = k.valid_fields();
            if !fields.is_empty() {
                let mut out = Vec::with_capacity(VALID_HEAD.len() + fields.len() + 32);
                out.extend_from_slice(VALID_HEAD.as_bytes());
                out.extend_from_slice(fields.as_bytes());
                if let Some(n) = self.remaining_uses {
                    // Writing to a Vec cannot fail.
                    let _ = std::io::Write::write_fmt(
                        &mut out,
                        format_args!(",\"remaining_uses\":{n}"),
                    );
                }
                out.push(b'}');
                return out;
            }
        }
        // Serializing these plain structs cannot fail; the fallback keeps the answer
        // well-formed anyway.
        serde_json::to_vec(&self.into_response())
            .unwrap_or_else(|_| br#"{"valid":false,"code":"NOT_FOUND"}"#.to_vec())
    }

    pub fn into_response(self) -> VerifyResponse {
        let valid = self.code == VerifyCode::Valid;
        let mut r = VerifyResponse {
            valid,
            code: self.code.as_str().to_owned(),
            key_id: None,
            owner: None,
            environment: None,
            scopes: None,
            expires_at: None,
            remaining_uses: None,
            retry_after_ms: self
                .retry_after_us
                .map(|us| u64::try_from(us.saturating_add(999) / 1000).unwrap_or(u64::MAX)),
        };
        if let Some(k) = self.key {
            r.key_id = Some(k.id.to_string());
            if valid {
                r.owner = Some(k.owner.clone());
                r.environment = Some(k.environment.clone());
                r.scopes = Some(k.scopes.iter().map(ToString::to_string).collect());
                r.expires_at = Some(k.expires_at);
                r.remaining_uses = self.remaining_uses;
            }
        }
        r
    }
}

async fn check(
    app: &AppState,
    key: &str,
    ask: &VerifyRequest,
    now: OffsetDateTime,
) -> Result<Outcome, ApiError> {
    let Ok(parsed) = key_format::parse_parts(key, &app.config.key_prefix) else {
        return Ok(Outcome::unknown(VerifyCode::Malformed, None));
    };
    if parsed.environment == ADMIN_ENV {
        // Admin tokens authenticate to keywarden; they are not keys for other systems.
        return Ok(Outcome::unknown(VerifyCode::NotFound, None));
    }
    let record = match app.keys.lookup(&parsed.id, now) {
        Lookup::Fresh(record) => {
            app.metrics.cache_lookup(true);
            record
        }
        Lookup::Stale(record, generation) => {
            app.metrics.cache_lookup(false);
            Box::pin(renew_or_load(app, &parsed.id, record, generation, now)).await?
        }
        Lookup::Missing(generation) => {
            app.metrics.cache_lookup(false);
            Box::pin(load(app, &parsed.id, generation, now)).await?
        }
    };
    let Some(record) = record else {
        return Ok(Outcome::unknown(VerifyCode::NotFound, Some(parsed.id)));
    };
    if !app.hasher.matches_text(parsed.plain, &record.hash) {
        // Right id, wrong secret: recorded against the key id, answered as unknown.
        return Ok(Outcome {
            hidden: Hidden::WrongSecret(record),
            ..Outcome::unknown(VerifyCode::NotFound, Some(parsed.id))
        });
    }
    if record.canary {
        // Whatever its state: a canary presented is the alarm, and it answers exactly
        // as an unknown key does.
        return Ok(Outcome {
            hidden: Hidden::Canary(record),
            ..Outcome::unknown(VerifyCode::NotFound, Some(parsed.id))
        });
    }
    let mut outcome = Outcome {
        code: VerifyCode::Valid,
        key_id: Some(record.id.clone()),
        key: Some(record.clone()),
        remaining_uses: None,
        counted: false,
        retry_after_us: None,
        hidden: Hidden::Nothing,
    };
    let (expiry, scope_required) = app.with_cached_policy(|p| {
        let rules = p.rules_for(&record.environment);
        (rules.idle_expiry, rules.require_scope_on_verify)
    });
    let idle = Idle {
        expiry,
        last_seen: record.last_seen(),
    };
    if let Err(code) = decide_with(&record, ask, now, Some(&idle), |s| record.covers(s)) {
        outcome.code = code;
        return Ok(outcome);
    }
    // The policy can insist that a verify of this environment's keys names the scope it
    // needs: a gateway that asks "is this key valid?" grants whatever the key can do.
    if scope_required && ask.scope.is_none() {
        outcome.code = VerifyCode::ScopeDenied;
        return Ok(outcome);
    }
    if let Some(rate) = record.rate_limit.filter(|_| app.watching()) {
        // This node's cell first: what it refuses, the cluster refuses too; what it
        // admits is spent again in the cell all nodes share (PostgreSQL).
        let now_us = micros(now);
        let spent = match app.limits.spend_key(&record.id, &rate, now_us) {
            Err(wait) => Err(wait),
            Ok(()) => Box::pin(app.store.spend_rate(&record.id, &rate, now_us))
                .await?
                .unwrap_or(Ok(())),
        };
        if let Err(wait) = spent {
            outcome.code = VerifyCode::RateLimited;
            outcome.retry_after_us = Some(wait.max(1));
            return Ok(outcome);
        }
    }
    if record.max_uses.is_some() {
        // Caps are spent in the store, atomically, never in the cache.
        match Box::pin(app.store.consume_use(&record.id)).await? {
            Some(left) => {
                outcome.remaining_uses = Some(left);
                outcome.counted = true;
            }
            None => {
                outcome.code = VerifyCode::UsageExhausted;
                app.keys.evict(&record.id);
            }
        }
    }
    if outcome.code == VerifyCode::Valid {
        record.mark_seen(now);
    }
    Ok(outcome)
}

// The store's futures are boxed by the caller: they are large and rare here (misses,
// renewals, capped keys), and inline they made every verify future large enough that
// moving it showed up in the profile.

async fn load(
    app: &AppState,
    id: &KeyId,
    generation: u64,
    now: OffsetDateTime,
) -> Result<Entry, ApiError> {
    app.keys
        .load(id, generation, now, || async {
            Ok::<_, ApiError>(
                app.store
                    .get_key(id)
                    .await?
                    .map(|k| Arc::new(CachedKey::new(k))),
            )
        })
        .await
}

/// An entry past its lifetime is kept if the stored key has not changed since it was
/// cached, which one small read tells; only a changed key is loaded and parsed again.
/// With many keys in use, entries expire all the time, and a full load costs several
/// times the read. `uses` is not compared: caps are spent in the store, never judged
/// from a cached count alone.
async fn renew_or_load(
    app: &AppState,
    id: &KeyId,
    stale: Entry,
    generation: u64,
    now: OffsetDateTime,
) -> Result<Entry, ApiError> {
    let Some(cached) = stale else {
        return load(app, id, generation, now).await;
    };
    match app.store.key_stamp(id).await? {
        Some(stamp) if stamp.version == cached.version => {
            // Uses answered by other nodes, folded since the entry was loaded.
            if let Some(at) = stamp.last_used_at {
                cached.mark_seen(at);
            }
            app.keys.renew(id, generation, now);
            Ok(Some(cached))
        }
        _ => load(app, id, generation, now).await,
    }
}

#[cfg(test)]
mod tests {
    use keywarden_core::hashing::{KeyHasher, Pepper};
    use keywarden_proto::CreateKeyRequest;
    use time::macros::datetime;

    use super::*;

    fn cached(owner: &str, scopes: &[&str]) -> Arc<CachedKey> {
        let now = datetime!(2026-06-01 12:00 UTC);
        let hasher = KeyHasher::new(&[Pepper::new(1, [7; 32])]).unwrap();
        let parsed = key_format::generate(&mut rand::rngs::OsRng, "kw", "prod").unwrap();
        let spec = crate::routes::keys::validate_create(
            &CreateKeyRequest {
                name: "k".into(),
                owner: owner.into(),
                environment: "prod".into(),
                systems: vec!["github".into()],
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                ttl: Some("30d".into()),
                ..CreateKeyRequest::default()
            },
            now,
            &keywarden_core::policy::Rules::default(),
        )
        .unwrap();
        Arc::new(CachedKey::new(spec.issue(
            &parsed,
            &hasher,
            "t".into(),
            now,
        )))
    }

    fn outcome(code: VerifyCode, key: Option<Arc<CachedKey>>, left: Option<u64>) -> Outcome {
        Outcome {
            code,
            key_id: key.as_ref().map(|k| k.id.clone()),
            key,
            remaining_uses: left,
            counted: false,
            retry_after_us: None,
            hidden: Hidden::Nothing,
        }
    }

    /// The spliced body of a VALID answer is byte for byte what serde writes for the
    /// documented response, with and without a cap, and so is every other answer.
    #[test]
    fn bodies_are_what_serde_writes() {
        let keys = [
            cached("alice@example.com", &["deploy:write", "db:*"]),
            cached("ci+deploy_bot@example.com", &["*"]),
        ];
        for k in &keys {
            assert!(!k.valid_fields().is_empty());
            for (code, left) in [
                (VerifyCode::Valid, None),
                (VerifyCode::Valid, Some(0)),
                (VerifyCode::Valid, Some(41)),
                (VerifyCode::Revoked, None),
                (VerifyCode::ScopeDenied, None),
            ] {
                let expected =
                    serde_json::to_vec(&outcome(code, Some(k.clone()), left).into_response())
                        .unwrap();
                let body = outcome(code, Some(k.clone()), left).body();
                assert_eq!(
                    String::from_utf8(body).unwrap(),
                    String::from_utf8(expected).unwrap()
                );
            }
        }
        // The packed scopes sit before the answer's fields and answer like the record's.
        let ask = |s: &str| Scope::requested(s).unwrap();
        assert!(keys[0].covers(&ask("db:orders:read")) && keys[0].covers(&ask("deploy:write")));
        assert!(!keys[0].covers(&ask("deploy:read")) && !keys[0].covers(&ask("db")));
        assert!(keys[1].covers(&ask("anything:at:all")));
        let body = outcome(VerifyCode::Malformed, None, None).body();
        assert_eq!(body, br#"{"valid":false,"code":"MALFORMED"}"#);
    }
}
