//! `/v1/alerts`: what the monitor raised, newest first, and the states people move an
//! alert through (acknowledged: someone is on it; resolved: done, and the next sighting
//! raises a new alert).

use axum::extract::{Path, State};
use axum::Json;
use keywarden_core::model::AuditEntry;
use keywarden_core::role::Permission;
use keywarden_proto::{AlertList, AlertView, ErrorBody, ErrorCode, StateChangeRequest};
use keywarden_store::{AlertFilter, AlertRecord, AlertState};
use serde::Deserialize;
use time::OffsetDateTime;

use super::{parse_cursor, parse_key_id, parse_limit, reason};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{OptionalJsonBody, QueryParams};
use crate::state::SharedState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AlertQuery {
    /// Only alerts about this key.
    pub key: Option<String>,
    /// Only alerts of this kind (e.g. SECRET_GUESSING).
    pub kind: Option<String>,
    /// Only alerts in this state: open, acknowledged or resolved.
    pub state: Option<String>,
    /// Only alerts raised at or after this time (RFC 3339).
    pub since: Option<String>,
    /// 1-1000, default 100
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

fn view(a: AlertRecord) -> AlertView {
    AlertView {
        seq: a.seq,
        time: a.time,
        kind: a.kind,
        severity: a.severity,
        key_id: a.key_id,
        code: a.code,
        source_ip: a.source_ip,
        user_agent: a.user_agent,
        subject: a.subject,
        dead_for_ms: a.since_ms,
        // Written by the monitor from a `json!` value; an unreadable one is shown as text.
        evidence: serde_json::from_str(&a.evidence)
            .unwrap_or(serde_json::Value::String(a.evidence)),
        repeats: a.repeats,
        last_seen: a.last_at,
        state: a.state.as_str().to_owned(),
        state_changed_at: a.state_at,
        state_changed_by: a.state_by,
        state_reason: a.state_reason,
    }
}

/// Alerts, newest first (roles `admin`, `issuer`, `auditor`).
#[utoipa::path(get, path = "/v1/alerts", tag = "alerts", params(AlertQuery),
    responses((status = 200, body = AlertList), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_alerts(
    State(app): State<SharedState>,
    principal: Principal,
    QueryParams(q): QueryParams<AlertQuery>,
) -> Result<Json<AlertList>, ApiError> {
    principal.require(Permission::AlertsRead)?;
    let key_id = q
        .key
        .as_deref()
        .map(|k| parse_key_id(k).map(|id| id.to_string()))
        .transpose()?;
    let since = q
        .since
        .as_deref()
        .map(|s| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|_| {
                ApiError::coded(
                    ErrorCode::InvalidQuery,
                    "since must be an RFC 3339 time, e.g. 2026-06-01T12:00:00Z",
                )
            })
        })
        .transpose()?;
    let kind = q
        .kind
        .map(|k| {
            crate::alerts::KINDS
                .iter()
                .find(|known| **known == k)
                .map(|k| (*k).to_owned())
                .ok_or_else(|| {
                    ApiError::coded(
                        ErrorCode::InvalidQuery,
                        format!("kind must be one of {}", crate::alerts::KINDS.join(", ")),
                    )
                })
        })
        .transpose()?;
    let state = q
        .state
        .map(|s| {
            AlertState::parse(&s).ok_or_else(|| {
                ApiError::coded(
                    ErrorCode::InvalidQuery,
                    "state must be open, acknowledged or resolved",
                )
            })
        })
        .transpose()?;
    let limit = parse_limit(q.limit)?;
    let before = parse_cursor(q.cursor.as_deref())?;
    let alerts = app
        .store
        .alerts(&AlertFilter {
            key_id,
            kind,
            state,
            since,
            before,
            limit,
            environments: principal.token.environments.clone(),
        })
        .await?;
    let next_cursor = (alerts.len() == limit as usize)
        .then(|| alerts.last().map(|a| a.seq.to_string()))
        .flatten();
    Ok(Json(AlertList {
        alerts: alerts.into_iter().map(view).collect(),
        next_cursor,
    }))
}

/// One alert, by its id (`seq`).
#[utoipa::path(get, path = "/v1/alerts/{seq}", tag = "alerts",
    params(("seq" = i64, Path, description = "alert id")),
    responses((status = 200, body = AlertView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn show_alert(
    State(app): State<SharedState>,
    principal: Principal,
    Path(seq): Path<String>,
) -> Result<Json<AlertView>, ApiError> {
    principal.require(Permission::AlertsRead)?;
    let alert = visible(&app, &principal, parse_seq(&seq)?).await?;
    Ok(Json(view(alert)))
}

/// Acknowledge an alert: someone is on it. Repeats keep folding into it.
#[utoipa::path(post, path = "/v1/alerts/{seq}/ack", tag = "alerts", request_body = Option<StateChangeRequest>,
    params(("seq" = i64, Path, description = "alert id")),
    responses((status = 200, body = AlertView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn ack_alert(
    State(app): State<SharedState>,
    principal: Principal,
    Path(seq): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<StateChangeRequest>,
) -> Result<Json<AlertView>, ApiError> {
    move_alert(app, principal, seq, AlertState::Acknowledged, body).await
}

/// Resolve an alert. It stays resolved; the next sighting raises a new alert.
#[utoipa::path(post, path = "/v1/alerts/{seq}/resolve", tag = "alerts", request_body = Option<StateChangeRequest>,
    params(("seq" = i64, Path, description = "alert id")),
    responses((status = 200, body = AlertView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resolve_alert(
    State(app): State<SharedState>,
    principal: Principal,
    Path(seq): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<StateChangeRequest>,
) -> Result<Json<AlertView>, ApiError> {
    move_alert(app, principal, seq, AlertState::Resolved, body).await
}

async fn move_alert(
    app: SharedState,
    principal: Principal,
    seq: String,
    to: AlertState,
    body: StateChangeRequest,
) -> Result<Json<AlertView>, ApiError> {
    principal.require(Permission::AlertsWrite)?;
    let reason = reason(body.reason)?;
    let seq = parse_seq(&seq)?;
    let alert = visible(&app, &principal, seq).await?;
    let action = match to {
        AlertState::Acknowledged => "alert.acknowledged",
        AlertState::Resolved => "alert.resolved",
        AlertState::Open => "alert.opened",
    };
    let entry = AuditEntry {
        time: app.now(),
        actor: principal.actor(),
        action: action.to_owned(),
        target: format!("alert:{seq}"),
        reason,
        details: serde_json::json!({
            "kind": alert.kind,
            "key_id": alert.key_id,
            "from": alert.state.as_str(),
        })
        .to_string(),
    };
    match app.store.set_alert_state(seq, to, &entry).await? {
        None => return Err(not_found(seq)),
        Some(false) => {
            return Err(ApiError::coded(
                ErrorCode::InvalidState,
                format!("alert {seq} is resolved; a new sighting raises a new alert"),
            ))
        }
        Some(true) => {}
    }
    let alert = visible(&app, &principal, seq).await?;
    Ok(Json(view(alert)))
}

fn parse_seq(s: &str) -> Result<i64, ApiError> {
    s.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::coded(
            ErrorCode::InvalidPath,
            "an alert id is a positive whole number (the seq `alert list` shows)",
        )
    })
}

fn not_found(seq: i64) -> ApiError {
    ApiError::coded(ErrorCode::AlertNotFound, format!("no alert {seq}"))
}

/// The alert, if the caller's token may see it (a token limited to environments sees
/// only alerts about keys of those).
async fn visible(
    app: &SharedState,
    principal: &Principal,
    seq: i64,
) -> Result<AlertRecord, ApiError> {
    let alert = app.store.alert(seq).await?.ok_or_else(|| not_found(seq))?;
    if let Some(envs) = &principal.token.environments {
        let Some(key_id) = alert.key_id.as_deref() else {
            return Err(not_found(seq));
        };
        let key = app.store.get_key(&parse_key_id(key_id)?).await?;
        if !key.is_some_and(|k| envs.contains(&k.environment)) {
            return Err(not_found(seq));
        }
    }
    Ok(alert)
}
