//! `/v1/keys`: issue, read, list, suspend, resume, revoke, rotate, usage.

use std::net::IpAddr;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use ipnet::IpNet;
use keywarden_core::duration::parse_duration;
use keywarden_core::hashing::KeyHasher;
use keywarden_core::key_format::{self, ParsedKey};
use keywarden_core::lifecycle::{self, Action};
use keywarden_core::model::KeyState;
use keywarden_core::policy::{check_issue, KeyAsk, Rules};
use keywarden_core::rate::Rate;
use keywarden_core::role::Permission;
use keywarden_core::scope::Scope;
use keywarden_core::{validate, KeyRecord};
use keywarden_proto::{
    CreateKeyRequest, CreatedKey, ErrorBody, ErrorCode, KeyList, KeyView, RotateRequest,
    RotatedKey, Secret, StateChangeRequest, UsageEventView, UsageList, Violation,
};
use keywarden_store::{KeyFilter, StateFilter};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;
use utoipa::IntoParams;

use super::{audit, parse_cursor, parse_key_id, parse_limit, reason};
use crate::auth::Principal;
use crate::error::{violation, ApiError};
use crate::extract::{JsonBody, OptionalJsonBody, QueryParams};
use crate::state::SharedState;
use crate::views::key_view;

const MAX_SCOPES: usize = 64;
const MAX_SYSTEMS: usize = 32;
const MAX_CIDRS: usize = 64;

/// Issue a key. The response carries the secret; it is never shown again.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKeyRequest,
    responses((status = 201, body = CreatedKey), (status = 422, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_key(
    State(app): State<SharedState>,
    principal: Principal,
    JsonBody(mut req): JsonBody<CreateKeyRequest>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    principal.require(Permission::KeysWrite)?;
    req.owner = validate::canonical_owner(&req.owner);
    let now = app.now();
    let policy = app.policy().await?;
    let spec = validate_create(&req, now, policy.1.rules_for(&req.environment))?;
    if !principal.may_act_in(&spec.environment) {
        return Err(ApiError::Forbidden(format!(
            "this token may not issue keys in environment `{}`",
            spec.environment
        )));
    }
    match app.store.get_owner(&spec.owner).await? {
        Some(o) if o.status != "active" => {
            return Err(ApiError::invalid(
                ErrorCode::OwnerDisabled,
                "owner",
                "this owner is disabled; keys cannot be issued to them",
            ));
        }
        None if policy
            .1
            .rules_for(&spec.environment)
            .require_registered_owner =>
        {
            return Err(ApiError::invalid(
                ErrorCode::PolicyOwnerNotRegistered,
                "owner",
                format!(
                    "the policy for `{}` requires a registered owner; register them first \
                     (`keywarden owner add`, or through SCIM)",
                    spec.environment
                ),
            ));
        }
        _ => {}
    }
    let parsed = key_format::generate(
        &mut rand::rngs::OsRng,
        &app.config.key_prefix,
        &spec.environment,
    )
    .map_err(|e| ApiError::invalid(ErrorCode::FieldInvalid, "environment", e.to_string()))?;
    let record = spec.issue(&parsed, &app.hasher, principal.actor().id, now);
    let entry = audit(
        principal.actor(),
        now,
        "key.created",
        format!("key:{}", record.id),
        None,
        json!({ "after": audit_fields(&record, now) }),
    );
    app.store.insert_key(&record, &entry).await?;
    app.keys.evict(&record.id);
    tracing::info!(key_id = %record.id, environment = %record.environment, "key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key: key_view(&record, now, Some(Vec::new())),
            secret: Secret(parsed.plain.expose().to_owned()),
        }),
    ))
}

/// A create request that passed validation: normalised (sorted, deduplicated) fields.
pub struct KeySpec {
    pub name: String,
    pub description: String,
    pub owner: String,
    pub systems: Vec<String>,
    pub environment: String,
    pub scopes: Vec<Scope>,
    pub expires_at: OffsetDateTime,
    pub allowed_cidrs: Vec<IpNet>,
    pub max_uses: Option<u64>,
    pub rate_limit: Option<Rate>,
    pub canary: bool,
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl KeySpec {
    /// The record of a newly issued key: active, unused, with the hash of `parsed`.
    pub fn issue(
        self,
        parsed: &ParsedKey,
        hasher: &KeyHasher,
        created_by: String,
        now: OffsetDateTime,
    ) -> KeyRecord {
        KeyRecord {
            id: parsed.id.clone(),
            hash: hasher.hash(&parsed.plain),
            hint: parsed.plain.hint(),
            name: self.name,
            description: self.description,
            owner: self.owner,
            systems: self.systems,
            environment: self.environment,
            scopes: self.scopes,
            created_at: now,
            created_by,
            expires_at: self.expires_at,
            state: KeyState::Active,
            state_reason: None,
            state_cause: None,
            state_changed_at: None,
            allowed_cidrs: self.allowed_cidrs,
            max_uses: self.max_uses,
            rate_limit: self.rate_limit,
            canary: self.canary,
            uses: 0,
            last_used_at: None,
            last_used_from: None,
            rotated_from: None,
            rotated_to: None,
            metadata: self.metadata,
            version: 1,
        }
    }
}

/// Validates a create request, collecting every violation.
/// Checks a key request field by field and against the policy's rules for its
/// environment; reports every violation.
pub fn validate_create(
    req: &CreateKeyRequest,
    now: OffsetDateTime,
    rules: &Rules,
) -> Result<KeySpec, ApiError> {
    let (default_ttl, max_ttl) = (rules.default_ttl, rules.max_ttl);
    let mut v: Vec<Violation> = Vec::new();
    let mut field = |r: Result<(), validate::FieldError>| {
        if let Err(e) = r {
            v.push(violation(ErrorCode::FieldInvalid, &e.field, e.message));
        }
    };
    field(validate::name("name", &req.name));
    field(validate::owner(&req.owner));
    field(validate::environment(&req.environment));
    field(validate::description(
        req.description.as_deref().unwrap_or(""),
    ));
    field(validate::metadata(&req.metadata));
    for s in &req.systems {
        field(validate::system(s));
    }
    if req.systems.len() > MAX_SYSTEMS {
        v.push(violation(
            ErrorCode::FieldInvalid,
            "systems",
            format!("at most {MAX_SYSTEMS} systems"),
        ));
    }

    let mut scopes = Vec::new();
    if req.scopes.is_empty() {
        v.push(violation(
            ErrorCode::ScopeInvalid,
            "scopes",
            "at least one scope is required (least privilege: name what the key may do)",
        ));
    }
    if req.scopes.len() > MAX_SCOPES {
        v.push(violation(
            ErrorCode::ScopeInvalid,
            "scopes",
            format!("at most {MAX_SCOPES} scopes"),
        ));
    }
    for s in &req.scopes {
        match Scope::granted(s) {
            Ok(s) => scopes.push(s),
            Err(e) => v.push(violation(ErrorCode::ScopeInvalid, "scopes", e.to_string())),
        }
    }
    scopes.sort();
    scopes.dedup();

    let mut cidrs = Vec::new();
    if req.allowed_cidrs.len() > MAX_CIDRS {
        v.push(violation(
            ErrorCode::CidrInvalid,
            "allowed_cidrs",
            format!("at most {MAX_CIDRS} CIDRs"),
        ));
    }
    for c in &req.allowed_cidrs {
        match parse_cidr(c) {
            Some(net) => cidrs.push(net),
            None => v.push(violation(
                ErrorCode::CidrInvalid,
                "allowed_cidrs",
                format!("invalid CIDR {:?}: expected e.g. 10.0.0.0/8, 2001:db8::/32 or a single address", c.chars().take(64).collect::<String>()),
            )),
        }
    }
    cidrs.sort();
    cidrs.dedup();

    if req.max_uses == Some(0) {
        v.push(violation(
            ErrorCode::FieldInvalid,
            "max_uses",
            "must be at least 1 (1 makes a one-time key)",
        ));
    }
    if req.max_uses.is_some_and(|m| i64::try_from(m).is_err()) {
        v.push(violation(ErrorCode::FieldInvalid, "max_uses", "too large"));
    }

    let rate_limit = match req.rate_limit.as_deref().map(str::parse::<Rate>) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            v.push(violation(
                ErrorCode::FieldInvalid,
                "rate_limit",
                e.to_string(),
            ));
            None
        }
        None => rules.rate_limit.or(rules.max_rate_limit),
    };

    let expires_at = match (&req.ttl, req.expires_at) {
        (Some(_), Some(_)) => {
            v.push(violation(
                ErrorCode::FieldInvalid,
                "ttl",
                "give either ttl or expires_at, not both",
            ));
            None
        }
        (Some(ttl), None) => match parse_duration(ttl) {
            Ok(d) if d <= time::Duration::ZERO => {
                v.push(violation(
                    ErrorCode::DurationInvalid,
                    "ttl",
                    "must be longer than zero",
                ));
                None
            }
            Ok(d) if d > max_ttl => {
                v.push(violation(
                    ErrorCode::TtlTooLong,
                    "ttl",
                    format!(
                        "at most {}",
                        keywarden_core::duration::format_duration(max_ttl)
                    ),
                ));
                None
            }
            Ok(d) => Some(now + d),
            Err(e) => {
                v.push(violation(ErrorCode::DurationInvalid, "ttl", e.to_string()));
                None
            }
        },
        (None, Some(at)) if at <= now => {
            v.push(violation(
                ErrorCode::FieldInvalid,
                "expires_at",
                "must be in the future",
            ));
            None
        }
        (None, Some(at)) if at > now + max_ttl => {
            v.push(violation(
                ErrorCode::TtlTooLong,
                "expires_at",
                format!(
                    "at most {} from now",
                    keywarden_core::duration::format_duration(max_ttl)
                ),
            ));
            None
        }
        (None, Some(at)) => Some(keywarden_core::clock::truncate_to_millis(at)),
        (None, None) => Some(now + default_ttl),
    };

    let ask = KeyAsk {
        owner: &req.owner,
        systems: &req.systems,
        scopes: &scopes,
        ttl: expires_at.map_or(time::Duration::ZERO, |at| at - now),
        has_cidrs: !cidrs.is_empty(),
        max_uses: req.max_uses,
        // A rate that did not parse is reported above, not as missing.
        rate_limit: rate_limit.or_else(|| req.rate_limit.as_ref().and(rules.max_rate_limit)),
    };
    // The TTL limit was checked above, with the field the caller used.
    for p in check_issue(rules, &ask)
        .into_iter()
        .filter(|p| p.code != ErrorCode::TtlTooLong.as_str())
    {
        // The policy's codes are in the table too (`policy_codes_are_in_the_table`).
        v.push(Violation {
            code: p.code.to_owned(),
            field: p.field.to_owned(),
            message: p.message,
        });
    }
    let (Some(expires_at), true) = (expires_at, v.is_empty()) else {
        return Err(ApiError::Validation(v));
    };
    let mut systems = req.systems.clone();
    systems.sort();
    systems.dedup();
    Ok(KeySpec {
        name: req.name.clone(),
        description: req.description.clone().unwrap_or_default(),
        owner: req.owner.clone(),
        systems,
        environment: req.environment.clone(),
        scopes,
        expires_at,
        allowed_cidrs: cidrs,
        max_uses: req.max_uses,
        rate_limit,
        canary: req.canary,
        metadata: req.metadata.clone(),
    })
}

/// A CIDR, or a bare address meaning just that host. Host bits are cleared.
fn parse_cidr(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// The fields an audit entry records about a key (never the hash or hint).
fn audit_fields(k: &KeyRecord, now: OffsetDateTime) -> serde_json::Value {
    json!({
        "name": k.name,
        "owner": k.owner,
        "environment": k.environment,
        "systems": k.systems,
        "scopes": k.scopes,
        "expires_at": k.expires_at.unix_timestamp(),
        "state": k.effective_state(now).as_str(),
        "allowed_cidrs": k.allowed_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "max_uses": k.max_uses,
        "rate_limit": k.rate_limit.map(|r| r.to_string()),
        "canary": k.canary,
        "rotated_from": k.rotated_from,
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub environment: Option<String>,
    pub owner: Option<String>,
    pub system: Option<String>,
    /// active, suspended, revoked or expired
    pub state: Option<String>,
    /// 1-1000, default 100
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// List keys, newest first.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", params(ListQuery),
    responses((status = 200, body = KeyList), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_keys(
    State(app): State<SharedState>,
    principal: Principal,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<KeyList>, ApiError> {
    principal.require(Permission::KeysRead)?;
    let state = q
        .state
        .as_deref()
        .map(|s| {
            s.parse::<KeyState>()
                .map(StateFilter::from)
                .map_err(|e| ApiError::coded(ErrorCode::InvalidQuery, e.to_string()))
        })
        .transpose()?;
    let filter = KeyFilter {
        environment: q.environment,
        owner: q.owner.as_deref().map(validate::canonical_owner),
        system: q.system,
        state,
        environments: principal.token.environments.clone(),
    };
    let now = app.now();
    let (keys, next) = app
        .store
        .list_keys(
            &filter,
            now,
            parse_limit(q.limit)?,
            parse_cursor(q.cursor.as_deref())?,
        )
        .await?;
    Ok(Json(KeyList {
        keys: keys.iter().map(|k| key_view(k, now, None)).collect(),
        next_cursor: next.map(|n| n.to_string()),
    }))
}

pub(crate) async fn load_in_reach(
    app: &SharedState,
    principal: &Principal,
    id: &str,
) -> Result<KeyRecord, ApiError> {
    let id = parse_key_id(id)?;
    match app.store.get_key(&id).await? {
        // Keys outside an issuer's environments are reported as absent, not forbidden.
        Some(k) if principal.may_act_in(&k.environment) => Ok(k),
        _ => Err(ApiError::KeyNotFound(id.to_string())),
    }
}

/// One key, with the distinct subjects it provisioned.
#[utoipa::path(get, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "key id")),
    responses((status = 200, body = KeyView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_key(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    principal.require(Permission::KeysRead)?;
    let key = load_in_reach(&app, &principal, &id).await?;
    let subjects = app.store.subjects(&key.id).await?;
    let mut view = key_view(&key, app.now(), Some(subjects));
    view.propagation = super::services::propagation(&app, &key).await?;
    Ok(Json(view))
}

async fn change_state(
    app: SharedState,
    principal: Principal,
    id: String,
    action: Action,
    body: StateChangeRequest,
) -> Result<Json<KeyView>, ApiError> {
    principal.require(Permission::KeysWrite)?;
    let why = reason(body.reason)?;
    // Optimistic concurrency: a concurrent change makes the update miss; decide again.
    for _ in 0..5 {
        let key = load_in_reach(&app, &principal, &id).await?;
        let now = app.now();
        // Revoking is idempotent: a revoked key answers as it is, with nothing written,
        // so scripts need not tell "revoked now" from "revoked before".
        if action == Action::Revoke && key.state == KeyState::Revoked {
            return Ok(Json(key_view(&key, now, None)));
        }
        // A disabled owner's key stays held: enable the owner first.
        if action == Action::Resume
            && app
                .store
                .get_owner(&key.owner)
                .await?
                .is_some_and(|o| o.status != "active")
        {
            return Err(ApiError::invalid(
                ErrorCode::OwnerDisabled,
                "owner",
                "this key's owner is disabled; enable the owner before resuming their keys",
            ));
        }
        let before = key.effective_state(now);
        let after = lifecycle::transition(&key, action, now)
            .map_err(|e| ApiError::InvalidState(e.to_string()))?;
        let mut updated = key.clone();
        updated.state = after;
        updated.state_reason = why.clone();
        // A person's action: no machine cause, whatever the reason's text says.
        updated.state_cause = None;
        updated.state_changed_at = Some(now);
        let entry = audit(
            principal.actor(),
            now,
            &format!("key.{}", past_tense(action)),
            format!("key:{}", key.id),
            why.clone(),
            json!({ "state": { "before": before.as_str(), "after": after.as_str() } }),
        );
        if app.store.update_key_state(&updated, &entry).await? {
            app.keys.evict(&key.id);
            tracing::info!(key_id = %key.id, action = action.as_str(), "key state changed");
            updated.version += 1;
            return Ok(Json(key_view(&updated, now, None)));
        }
    }
    Err(ApiError::Conflict(
        "the key kept changing concurrently; try again".to_owned(),
    ))
}

fn past_tense(a: Action) -> &'static str {
    match a {
        Action::Suspend => "suspended",
        Action::Resume => "resumed",
        Action::Revoke => "revoked",
        Action::Rotate => "rotated",
    }
}

/// Suspend a key (reversible).
#[utoipa::path(post, path = "/v1/keys/{id}/suspend", tag = "keys", request_body = Option<StateChangeRequest>,
    params(("id" = String, Path, description = "key id")),
    responses((status = 200, body = KeyView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn suspend_key(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<StateChangeRequest>,
) -> Result<Json<KeyView>, ApiError> {
    change_state(app, principal, id, Action::Suspend, body).await
}

/// Resume a suspended key.
#[utoipa::path(post, path = "/v1/keys/{id}/resume", tag = "keys", request_body = Option<StateChangeRequest>,
    params(("id" = String, Path, description = "key id")),
    responses((status = 200, body = KeyView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume_key(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<StateChangeRequest>,
) -> Result<Json<KeyView>, ApiError> {
    change_state(app, principal, id, Action::Resume, body).await
}

/// Revoke a key (terminal). The very next verify answers REVOKED. Revoking a revoked key
/// changes nothing and answers 200 with the key as it is (`state_changed_at` says since
/// when).
#[utoipa::path(post, path = "/v1/keys/{id}/revoke", tag = "keys", request_body = Option<StateChangeRequest>,
    params(("id" = String, Path, description = "key id")),
    responses((status = 200, body = KeyView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_key(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<StateChangeRequest>,
) -> Result<Json<KeyView>, ApiError> {
    change_state(app, principal, id, Action::Revoke, body).await
}

/// Rotate a key: a successor with the same metadata; the old key works until the grace ends.
#[utoipa::path(post, path = "/v1/keys/{id}/rotate", tag = "keys", request_body = Option<RotateRequest>,
    params(("id" = String, Path, description = "key id")),
    responses((status = 201, body = RotatedKey), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate_key(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<RotateRequest>,
) -> Result<(StatusCode, Json<RotatedKey>), ApiError> {
    principal.require(Permission::KeysWrite)?;
    let why = reason(body.reason)?;
    let grace = match body.grace.as_deref() {
        None => app.config.default_rotation_grace,
        Some(g) => {
            let d = parse_duration(g).map_err(|e| {
                ApiError::invalid(ErrorCode::DurationInvalid, "grace", e.to_string())
            })?;
            if d > time::Duration::days(30) {
                return Err(ApiError::invalid(
                    ErrorCode::DurationInvalid,
                    "grace",
                    "at most 30d",
                ));
            }
            d
        }
    };
    for _ in 0..5 {
        let old = load_in_reach(&app, &principal, &id).await?;
        let now = app.now();
        lifecycle::transition(&old, Action::Rotate, now)
            .map_err(|e| ApiError::InvalidState(e.to_string()))?;
        // A successor is a new key: not for an owner who was offboarded.
        if app
            .store
            .get_owner(&old.owner)
            .await?
            .is_some_and(|o| o.status != "active")
        {
            return Err(ApiError::invalid(
                ErrorCode::OwnerDisabled,
                "owner",
                "this key's owner is disabled; no successor can be issued to them",
            ));
        }
        let parsed = key_format::generate(
            &mut rand::rngs::OsRng,
            &app.config.key_prefix,
            &old.environment,
        )
        .map_err(|e| ApiError::InvalidState(e.to_string()))?;
        let ttl = lifecycle::successor_ttl(&old)
            .min(app.policy().await?.1.rules_for(&old.environment).max_ttl);
        let successor = KeyRecord {
            id: parsed.id.clone(),
            hash: app.hasher.hash(&parsed.plain),
            hint: parsed.plain.hint(),
            created_at: now,
            created_by: principal.actor().id,
            expires_at: now + ttl,
            state: KeyState::Active,
            state_reason: None,
            state_cause: None,
            state_changed_at: None,
            uses: 0,
            last_used_at: None,
            last_used_from: None,
            rotated_from: Some(old.id.clone()),
            rotated_to: None,
            version: 1,
            ..old.clone()
        };
        let mut ended = old.clone();
        ended.expires_at = lifecycle::rotation_end(&old, grace, now);
        ended.rotated_to = Some(successor.id.clone());
        ended.state_reason = why.clone().or_else(|| Some("rotated".to_owned()));
        ended.state_changed_at = Some(now);
        let audits = [
            audit(
                principal.actor(),
                now,
                "key.rotated",
                format!("key:{}", old.id),
                why.clone(),
                json!({ "successor": successor.id, "grace_seconds": grace.whole_seconds(),
                        "expires_at": { "before": old.expires_at.unix_timestamp(), "after": ended.expires_at.unix_timestamp() } }),
            ),
            audit(
                principal.actor(),
                now,
                "key.created",
                format!("key:{}", successor.id),
                why.clone(),
                json!({ "after": audit_fields(&successor, now) }),
            ),
        ];
        if app.store.rotate_key(&ended, &successor, &audits).await? {
            app.keys.evict(&old.id);
            app.keys.evict(&successor.id);
            tracing::info!(key_id = %old.id, successor = %successor.id, "key rotated");
            ended.version += 1;
            return Ok((
                StatusCode::CREATED,
                Json(RotatedKey {
                    key: key_view(&successor, now, Some(Vec::new())),
                    secret: Secret(parsed.plain.expose().to_owned()),
                    previous: key_view(&ended, now, None),
                }),
            ));
        }
    }
    Err(ApiError::Conflict(
        "the key kept changing concurrently; try again".to_owned(),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// 1-1000, default 100
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Usage events of a key, newest first: every verify, allowed or denied.
#[utoipa::path(get, path = "/v1/keys/{id}/usage", tag = "keys", params(("id" = String, Path, description = "key id"), UsageQuery),
    responses((status = 200, body = UsageList), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn key_usage(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<UsageQuery>,
) -> Result<Json<UsageList>, ApiError> {
    principal.require(Permission::UsageRead)?;
    let key = load_in_reach(&app, &principal, &id).await?;
    let (events, next) = app
        .store
        .list_usage(
            &key.id,
            parse_limit(q.limit)?,
            parse_cursor(q.cursor.as_deref())?,
        )
        .await?;
    Ok(Json(UsageList {
        events: events
            .into_iter()
            .map(|u| UsageEventView {
                time: u.event.time,
                code: u.event.code.as_str().to_owned(),
                source_ip: u.event.source_ip.map(|ip| ip.to_string()),
                scope: u.event.scope,
                environment: u.event.environment,
                subject: u.event.subject,
                user_agent: u.event.user_agent,
            })
            .collect(),
        next_cursor: next.map(|n| n.to_string()),
    }))
}
