//! What the scanner reports back: found keys matched with the inventory
//! (`/v1/keys/identify`), and foreign secrets recorded as shadow keys
//! (`/v1/shadow-keys`).

use axum::extract::State;
use axum::Json;
use keywarden_core::key_format::{self, ADMIN_ENV};
use keywarden_core::role::Permission;
use keywarden_proto::{
    ErrorBody, ErrorCode, IdentifiedKey, IdentifyRequest, IdentifyResponse, ImportShadowKeys,
    ShadowImportResult, ShadowKeyList, ShadowKeyView,
};
use keywarden_store::ShadowKey;
use serde_json::json;

use super::audit;
use crate::auth::Principal;
use crate::error::{violation, ApiError};
use crate::extract::JsonBody;
use crate::state::SharedState;

const MAX_BATCH: usize = 1000;

/// Match keys found in the wild with the inventory: which key, whose, and whether it is
/// live (roles `admin`, `issuer`, `auditor`). Not a use of the keys.
#[utoipa::path(post, path = "/v1/keys/identify", tag = "keys", request_body = IdentifyRequest,
    responses((status = 200, body = IdentifyResponse), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn identify(
    State(app): State<SharedState>,
    principal: Principal,
    JsonBody(req): JsonBody<IdentifyRequest>,
) -> Result<Json<IdentifyResponse>, ApiError> {
    principal.require(Permission::KeysRead)?;
    if req.keys.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            ErrorCode::FieldInvalid,
            "keys",
            format!("at most {MAX_BATCH} per request"),
        ));
    }
    let now = app.now();
    let mut results = Vec::with_capacity(req.keys.len());
    for presented in &req.keys {
        let mut r = IdentifiedKey {
            key_id: None,
            kind: None,
            genuine: false,
            live: false,
            canary: false,
            name: None,
            owner: None,
            environment: None,
            state: None,
        };
        if let Ok(parsed) = key_format::parse(presented.0.trim(), &app.config.key_prefix) {
            r.key_id = Some(parsed.id.to_string());
            if parsed.environment == ADMIN_ENV {
                r.kind = Some("token".to_owned());
                if let Some(t) = app.store.get_token(&parsed.id).await? {
                    if app.hasher.matches(&parsed.plain, &t.hash) {
                        r.genuine = true;
                        r.live = t.is_usable(now);
                        r.name = Some(t.name.clone());
                        r.owner.clone_from(&t.owner);
                        r.state = Some(if r.live { "active" } else { "revoked" }.to_owned());
                    }
                }
            } else {
                r.kind = Some("key".to_owned());
                if let Some(k) = app.store.get_key(&parsed.id).await? {
                    if principal.may_act_in(&k.environment)
                        && app.hasher.matches(&parsed.plain, &k.hash)
                    {
                        let state = k.effective_state(now);
                        r.genuine = true;
                        r.canary = k.canary;
                        r.live = state == keywarden_core::KeyState::Active && !k.canary;
                        r.name = Some(k.name.clone());
                        r.owner = Some(k.owner.clone());
                        r.environment = Some(k.environment.clone());
                        r.state = Some(state.as_str().to_owned());
                    }
                }
            }
        }
        results.push(r);
    }
    Ok(Json(IdentifyResponse { results }))
}

/// Record foreign secrets found by a scan as shadow keys, by fingerprint (roles `admin`,
/// `issuer`).
#[utoipa::path(post, path = "/v1/shadow-keys", tag = "keys", request_body = ImportShadowKeys,
    responses((status = 200, body = ShadowImportResult), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn import_shadow_keys(
    State(app): State<SharedState>,
    principal: Principal,
    JsonBody(req): JsonBody<ImportShadowKeys>,
) -> Result<Json<ShadowImportResult>, ApiError> {
    principal.require(Permission::KeysWrite)?;
    let mut v = Vec::new();
    if req.shadows.len() > MAX_BATCH {
        v.push(violation(
            ErrorCode::FieldInvalid,
            "shadows",
            format!("at most {MAX_BATCH} per request"),
        ));
    }
    let text_ok =
        |s: &str, max: usize| !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control);
    for (i, s) in req.shadows.iter().enumerate() {
        if s.fingerprint.len() != 64 || !s.fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
            v.push(violation(
                ErrorCode::FieldInvalid,
                &format!("shadows[{i}].fingerprint"),
                "64 hex characters (SHA-256 of the secret)",
            ));
        }
        if !text_ok(&s.kind, 64) || !text_ok(&s.severity, 16) {
            v.push(violation(
                ErrorCode::FieldInvalid,
                &format!("shadows[{i}].kind"),
                "kind (1-64) and severity (1-16 characters), no control characters",
            ));
        }
        if !text_ok(&s.location, 1024) || s.line < 0 {
            v.push(violation(
                ErrorCode::FieldInvalid,
                &format!("shadows[{i}].location"),
                "1-1024 characters, no control characters; line not negative",
            ));
        }
    }
    if !v.is_empty() {
        return Err(ApiError::Validation(v));
    }
    let now = app.now();
    let by = principal.actor();
    let found: Vec<ShadowKey> = req
        .shadows
        .iter()
        .map(|s| ShadowKey {
            fingerprint: s.fingerprint.to_ascii_lowercase(),
            kind: s.kind.clone(),
            severity: s.severity.clone(),
            location: s.location.clone(),
            line: s.line,
            first_seen: now,
            last_seen: now,
            sightings: 1,
            imported_by: by.id.clone(),
        })
        .collect();
    let entry = audit(
        by,
        now,
        "shadow.imported",
        "shadow-keys".to_owned(),
        None,
        json!({ "count": found.len() }),
    );
    let new = app.store.import_shadow_keys(&found, &entry).await?;
    Ok(Json(ShadowImportResult {
        imported: found.len(),
        new,
    }))
}

/// Shadow keys: foreign secrets found by scans, newest sighting first.
#[utoipa::path(get, path = "/v1/shadow-keys", tag = "keys",
    responses((status = 200, body = ShadowKeyList)), security(("bearer" = [])))]
pub async fn list_shadow_keys(
    State(app): State<SharedState>,
    principal: Principal,
) -> Result<Json<ShadowKeyList>, ApiError> {
    principal.require(Permission::KeysRead)?;
    let shadow_keys = app
        .store
        .shadow_keys()
        .await?
        .into_iter()
        .map(|s| ShadowKeyView {
            fingerprint: s.fingerprint,
            kind: s.kind,
            severity: s.severity,
            location: s.location,
            line: s.line,
            first_seen: s.first_seen,
            last_seen: s.last_seen,
            sightings: s.sightings,
            imported_by: s.imported_by,
        })
        .collect();
    Ok(Json(ShadowKeyList { shadow_keys }))
}
