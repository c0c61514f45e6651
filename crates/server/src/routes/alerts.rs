//! `GET /v1/alerts`: KEY_STILL_IN_USE alerts, newest first.

use axum::extract::State;
use axum::Json;
use keywarden_core::role::Permission;
use keywarden_proto::{AlertList, AlertView, ErrorBody, ErrorCode};
use keywarden_store::{AlertFilter, AlertRecord};
use serde::Deserialize;
use time::OffsetDateTime;

use super::{parse_cursor, parse_key_id, parse_limit};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::QueryParams;
use crate::state::SharedState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AlertQuery {
    /// Only alerts about this key.
    pub key: Option<String>,
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
        key_id: a.key_id,
        code: a.code,
        source_ip: a.source_ip,
        user_agent: a.user_agent,
        subject: a.subject,
        dead_for_ms: a.since_ms,
        repeats: a.repeats,
        last_seen: a.last_at,
    }
}

/// KEY_STILL_IN_USE alerts, newest first (roles `admin`, `issuer`, `auditor`).
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
    let limit = parse_limit(q.limit)?;
    let before = parse_cursor(q.cursor.as_deref())?;
    let alerts = app
        .store
        .alerts(&AlertFilter {
            key_id,
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
