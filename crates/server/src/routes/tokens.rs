//! `/v1/tokens`: keywarden's own admin tokens, with roles.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use keywarden_core::duration::parse_duration;
use keywarden_core::role::{Permission, Role};
use keywarden_core::validate;
use keywarden_proto::{
    CreateTokenRequest, CreatedToken, ErrorBody, ErrorCode, Secret, TokenList, TokenView,
};
use serde_json::json;

use super::{audit, parse_key_id};
use crate::auth::Principal;
use crate::bootstrap::{new_token, TokenSpec};
use crate::error::{violation, ApiError};
use crate::extract::JsonBody;
use crate::state::SharedState;
use crate::views::token_view;

/// Create an admin token (role `admin` required). The secret is returned once.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateTokenRequest,
    responses((status = 201, body = CreatedToken), (status = 422, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_token(
    State(app): State<SharedState>,
    principal: Principal,
    JsonBody(mut req): JsonBody<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    principal.require(Permission::TokensWrite)?;
    req.owner = req.owner.as_deref().map(validate::canonical_owner);
    let now = app.now();
    let mut v = Vec::new();
    if let Err(e) = validate::name("name", &req.name) {
        v.push(violation(ErrorCode::FieldInvalid, &e.field, e.message));
    }
    if let Some(Err(e)) = req.owner.as_deref().map(validate::owner) {
        v.push(violation(ErrorCode::FieldInvalid, &e.field, e.message));
    }
    let role = match req.role.parse::<Role>() {
        Ok(r) => Some(r),
        Err(e) => {
            v.push(violation(ErrorCode::FieldInvalid, "role", e.to_string()));
            None
        }
    };
    if let Some(envs) = &req.environments {
        if role.is_some_and(|r| !matches!(r, Role::Issuer | Role::Verifier)) {
            v.push(violation(
                ErrorCode::FieldInvalid,
                "environments",
                "only issuer and verifier tokens are limited to environments",
            ));
        }
        if envs.is_empty() {
            v.push(violation(
                ErrorCode::FieldInvalid,
                "environments",
                "give at least one environment, or leave it out for all",
            ));
        }
        for e in envs {
            if let Err(e) = validate::environment(e) {
                v.push(violation(
                    ErrorCode::FieldInvalid,
                    "environments",
                    e.message,
                ));
            }
        }
    }
    let max_ttl = app.policy().await?.1.max_token_ttl();
    let expires_at = match req.ttl.as_deref().map(parse_duration).transpose() {
        Ok(Some(d)) if d <= time::Duration::ZERO => {
            v.push(violation(
                ErrorCode::DurationInvalid,
                "ttl",
                "must be longer than zero",
            ));
            None
        }
        Ok(Some(d)) if max_ttl.is_some_and(|m| d > m) => {
            v.push(violation(
                ErrorCode::TtlTooLong,
                "ttl",
                format!(
                    "is longer than the policy's max_token_ttl of {}",
                    keywarden_core::duration::format_duration(max_ttl.unwrap_or(d))
                ),
            ));
            None
        }
        // Without a TTL a token lives as long as the policy allows, or forever.
        Ok(d) => d.or(max_ttl).map(|d| now + d),
        Err(e) => {
            v.push(violation(ErrorCode::DurationInvalid, "ttl", e.to_string()));
            None
        }
    };
    let (Some(role), true) = (role, v.is_empty()) else {
        return Err(ApiError::Validation(v));
    };
    let mut environments = req.environments.clone();
    if let Some(e) = environments.as_mut() {
        e.sort();
        e.dedup();
    }
    let created_by = principal.actor().id;
    let spec = TokenSpec {
        name: &req.name,
        role,
        environments: environments.clone(),
        created_by: &created_by,
        expires_at,
        owner: req.owner.clone(),
    };
    let (record, secret) = new_token(&app.hasher, &app.config.key_prefix, spec, now)
        .map_err(|e| ApiError::invalid(ErrorCode::FieldInvalid, "token", e.to_string()))?;
    let entry = audit(
        principal.actor(),
        now,
        "token.created",
        format!("token:{}", record.id),
        None,
        json!({ "name": record.name, "owner": record.owner, "role": role.as_str(), "environments": environments,
                "expires_at": expires_at.map(|t| t.unix_timestamp()) }),
    );
    app.store.insert_token(&record, &entry).await?;
    app.tokens.evict(&record.id);
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: token_view(&record),
            secret: Secret(secret.expose().to_owned()),
        }),
    ))
}

/// List admin tokens (never their secrets).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, body = TokenList), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_tokens(
    State(app): State<SharedState>,
    principal: Principal,
) -> Result<Json<TokenList>, ApiError> {
    principal.require(Permission::TokensRead)?;
    let tokens = app.store.list_tokens().await?;
    Ok(Json(TokenList {
        tokens: tokens.iter().map(token_view).collect(),
    }))
}

/// Revoke an admin token; it stops working at once.
#[utoipa::path(post, path = "/v1/tokens/{id}/revoke", tag = "tokens",
    params(("id" = String, Path, description = "token id")),
    responses((status = 200, body = TokenView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_token(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    principal.require(Permission::TokensWrite)?;
    let id = parse_key_id(&id)?;
    let now = app.now();
    let entry = audit(
        principal.actor(),
        now,
        "token.revoked",
        format!("token:{id}"),
        None,
        json!({}),
    );
    if !app.store.revoke_token(&id, now, &entry).await? {
        return match app.store.get_token(&id).await? {
            Some(_) => Err(ApiError::InvalidState(
                "token is already revoked".to_owned(),
            )),
            None => Err(ApiError::TokenNotFound(id.to_string())),
        };
    }
    app.tokens.evict(&id);
    let token = app
        .store
        .get_token(&id)
        .await?
        .ok_or_else(|| ApiError::TokenNotFound(id.to_string()))?;
    Ok(Json(token_view(&token)))
}
