//! `/v1/services`: the services that trust our keys and must hear when one dies. A
//! webhook service is pushed signed events; a pull service (a caching gateway) reads
//! `/v1/events` and acknowledges with `/ack`. Either way each key event's delivery to
//! each service is tracked until confirmed.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use keywarden_core::role::Permission;
use keywarden_core::webhook::{category, parse_categories, DEFAULT_CATEGORIES};
use keywarden_core::{base62, KeyRecord};
use keywarden_proto::{
    AckRequest, AckResponse, CreateServiceRequest, CreatedService, DeliveryView, ErrorBody,
    ErrorCode, PropagationView, Secret, ServiceList, ServiceTestResult, ServiceView,
};
use keywarden_store::{DeliveryRecord, ServiceRecord};
use serde_json::json;

use super::audit;
use crate::auth::Principal;
use crate::dispatch::{send, service_secret, shown_secret};
use crate::error::{violation, ApiError};
use crate::extract::JsonBody;
use crate::state::{AppState, SharedState};

/// The events whose delivery `GET /v1/keys/{id}` reports: the key's state changes.
pub const STATE_EVENTS: [&str; 6] = [
    "created",
    "suspended",
    "resumed",
    "revoked",
    "rotated",
    "expired",
];

fn not_found(id: &str) -> ApiError {
    ApiError::Coded {
        code: ErrorCode::ServiceNotFound,
        message: format!("no service {:?}", id.chars().take(64).collect::<String>()),
    }
}

/// A service by id or name, or 404.
async fn find(app: &AppState, id: &str) -> Result<ServiceRecord, ApiError> {
    app.store
        .get_service(id)
        .await?
        .ok_or_else(|| not_found(id))
}

pub(crate) fn delivery_view(d: DeliveryRecord, service: &str) -> DeliveryView {
    let open = matches!(d.state.as_str(), "pending" | "failing");
    DeliveryView {
        service_id: d.service_id,
        service: service.to_owned(),
        seq: d.seq,
        key_id: d.key_id,
        event: d.event,
        attempts: d.attempts,
        confirmed_at: d.confirmed_at,
        last_error: d.last_error,
        next_attempt_at: (open && d.state == "failing").then_some(d.next_at),
        state: d.state,
    }
}

async fn view(app: &AppState, s: ServiceRecord, recent: bool) -> Result<ServiceView, ApiError> {
    let deliveries: BTreeMap<String, i64> = app
        .store
        .delivery_counts(&s.id)
        .await?
        .into_iter()
        .collect();
    let recent = if recent {
        Some(
            app.store
                .recent_deliveries(&s.id, 20)
                .await?
                .into_iter()
                .map(|d| delivery_view(d, &s.name))
                .collect(),
        )
    } else {
        None
    };
    Ok(ServiceView {
        id: s.id,
        name: s.name,
        webhook_url: s.webhook_url.as_deref().map(shown_url),
        events: s.events,
        format: s.format,
        created_at: s.created_at,
        created_by: s.created_by,
        acked_seq: s.acked_seq,
        deliveries,
        recent,
    })
}

/// A webhook URL as shown: without its query, and with long path segments cut to their
/// first characters. Receivers such as Slack and Discord put their token in the URL, and
/// those URLs are secrets in themselves (`keywarden scan` reports them).
fn shown_url(url: &str) -> String {
    let Ok(mut u) = reqwest::Url::parse(url) else {
        return String::new();
    };
    u.set_query(None);
    u.set_fragment(None);
    let path: Vec<String> = u
        .path_segments()
        .map(|segs| {
            segs.map(|seg| {
                if seg.len() > 12 {
                    format!("{}***", &seg[..4])
                } else {
                    seg.to_owned()
                }
            })
            .collect()
        })
        .unwrap_or_default();
    u.set_path(&path.join("/"));
    u.to_string()
}

/// Scheme, host and port: all the audit trail keeps of a webhook URL.
fn origin(url: &str) -> String {
    reqwest::Url::parse(url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default()
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Register a connected service (role `admin`). The signing secret is returned once.
#[utoipa::path(post, path = "/v1/services", tag = "services", request_body = CreateServiceRequest,
    responses((status = 201, body = CreatedService), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_service(
    State(app): State<SharedState>,
    principal: Principal,
    JsonBody(req): JsonBody<CreateServiceRequest>,
) -> Result<(StatusCode, Json<CreatedService>), ApiError> {
    principal.require(Permission::ServicesWrite)?;
    let mut v = Vec::new();
    if !valid_name(&req.name) {
        v.push(violation(
            ErrorCode::FieldInvalid,
            "name",
            "1-64 characters: letters, digits, `.`, `_`, `-`",
        ));
    }
    let events = match &req.events {
        None => Ok(DEFAULT_CATEGORIES.iter().map(|c| (*c).to_owned()).collect()),
        Some(list) => parse_categories(list),
    };
    let events = events.unwrap_or_else(|e| {
        v.push(violation(ErrorCode::FieldInvalid, "events", e));
        Vec::new()
    });
    let webhook_url = match req.webhook_url.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(u) => match reqwest::Url::parse(u) {
            Err(e) => {
                v.push(violation(
                    ErrorCode::WebhookUrlInvalid,
                    "webhook_url",
                    format!("not a URL: {e}"),
                ));
                None
            }
            Ok(url) => match app.outbound.check_url(&url) {
                Err(e) => {
                    v.push(violation(
                        ErrorCode::WebhookUrlInvalid,
                        "webhook_url",
                        e.to_string(),
                    ));
                    None
                }
                Ok(()) if u.len() > 2048 => {
                    v.push(violation(
                        ErrorCode::WebhookUrlInvalid,
                        "webhook_url",
                        "at most 2048 characters",
                    ));
                    None
                }
                Ok(()) => Some(url.to_string()),
            },
        },
    };
    let format = match req.format.as_deref().unwrap_or("standard") {
        f @ ("standard" | "slack" | "email") => f.to_owned(),
        _ => {
            v.push(violation(
                ErrorCode::FieldInvalid,
                "format",
                "standard (Standard Webhooks JSON), slack (a Slack-compatible incoming \
                 webhook) or email (to each key's owner)",
            ));
            String::new()
        }
    };
    if format == "email" {
        if req.webhook_url.is_some() {
            v.push(violation(
                ErrorCode::FieldInvalid,
                "webhook_url",
                "an email service mails each key's owner; it has no webhook",
            ));
        }
        if app.mailer.is_none() {
            v.push(violation(
                ErrorCode::FieldInvalid,
                "format",
                "email needs an SMTP relay: start the server with --smtp URL",
            ));
        }
    }
    if format == "slack" && webhook_url.is_none() && req.webhook_url.is_none() {
        v.push(violation(
            ErrorCode::FieldInvalid,
            "format",
            "a slack service needs a webhook_url: messages are posted to it",
        ));
    }
    if !v.is_empty() {
        return Err(ApiError::Validation(v));
    }
    let now = app.now();
    let rng = &mut rand::rngs::OsRng;
    let record = ServiceRecord {
        id: base62::random(rng, 16),
        name: req.name.clone(),
        webhook_url,
        events,
        secret_salt: base62::random(rng, 32),
        pepper_version: app.hasher.current_version(),
        created_at: now,
        created_by: principal.actor().id,
        start_seq: 0,
        fanout_seq: 0,
        acked_seq: 0,
        format,
    };
    let secret = service_secret(&app, &record.id, &record.secret_salt, record.pepper_version)
        .ok_or_else(|| ApiError::internal("the current pepper cannot derive a signing secret"))?;
    let entry = audit(
        principal.actor(),
        now,
        "service.created",
        format!("service:{}", record.id),
        None,
        json!({
            "name": record.name,
            "webhook": record.webhook_url.as_deref().map(origin),
            "events": record.events,
            "format": record.format,
        }),
    );
    if !app.store.create_service(&record, &entry).await? {
        return Err(ApiError::Conflict(format!(
            "a service named {:?} exists",
            record.name
        )));
    }
    tracing::info!(service = %record.name, "service registered");
    let pull = record.webhook_url.is_none();
    let service = view(&app, record, false).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedService {
            service,
            secret: (!pull).then(|| Secret(shown_secret(&secret))),
        }),
    ))
}

/// The connected services (role `admin` or `auditor`).
#[utoipa::path(get, path = "/v1/services", tag = "services",
    responses((status = 200, body = ServiceList)), security(("bearer" = [])))]
pub async fn list_services(
    State(app): State<SharedState>,
    principal: Principal,
) -> Result<Json<ServiceList>, ApiError> {
    principal.require(Permission::ServicesRead)?;
    let mut services = Vec::new();
    for s in app.store.list_services().await? {
        services.push(view(&app, s, false).await?);
    }
    Ok(Json(ServiceList { services }))
}

/// One service, by id or name, with its latest deliveries.
#[utoipa::path(get, path = "/v1/services/{id}", tag = "services",
    params(("id" = String, Path, description = "service id or name")),
    responses((status = 200, body = ServiceView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_service(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    principal.require(Permission::ServicesRead)?;
    let s = find(&app, &id).await?;
    Ok(Json(view(&app, s, true).await?))
}

/// Remove a service and its open deliveries (role `admin`).
#[utoipa::path(delete, path = "/v1/services/{id}", tag = "services",
    params(("id" = String, Path, description = "service id or name")),
    responses((status = 204), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_service(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Permission::ServicesWrite)?;
    let s = find(&app, &id).await?;
    let entry = audit(
        principal.actor(),
        app.now(),
        "service.removed",
        format!("service:{}", s.id),
        None,
        json!({ "name": s.name }),
    );
    if !app.store.delete_service(&s.id, &entry).await? {
        return Err(not_found(&id));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Send a signed `service.test` message now and report the answer (role `admin`).
#[utoipa::path(post, path = "/v1/services/{id}/test", tag = "services",
    params(("id" = String, Path, description = "service id or name")),
    responses((status = 200, body = ServiceTestResult), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn test_service(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<ServiceTestResult>, ApiError> {
    principal.require(Permission::ServicesWrite)?;
    let s = find(&app, &id).await?;
    let Some(url) = &s.webhook_url else {
        return Err(ApiError::InvalidState(
            "a pull service has no webhook to test; it reads /v1/events".to_owned(),
        ));
    };
    let secret =
        service_secret(&app, &s.id, &s.secret_salt, s.pepper_version).ok_or_else(|| {
            ApiError::InvalidState(format!(
                "pepper version {} is not loaded; the signing secret cannot be derived",
                s.pepper_version
            ))
        })?;
    let now = app.now();
    let body = json!({
        "type": "service.test",
        "timestamp": now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "data": { "service": s.name },
    });
    let msg_id = format!("test_{}", base62::random(&mut rand::rngs::OsRng, 16));
    Ok(Json(match send(&app, url, &secret, &msg_id, &body).await {
        Ok(status) => ServiceTestResult {
            delivered: (200..300).contains(&status),
            status: Some(status),
            error: None,
        },
        Err(e) => ServiceTestResult {
            delivered: false,
            status: None,
            error: Some(e),
        },
    }))
}

/// A pull service confirms it has applied every event up to `seq` (role `verifier` or
/// `admin`).
#[utoipa::path(post, path = "/v1/services/{id}/ack", tag = "services", request_body = AckRequest,
    params(("id" = String, Path, description = "service id or name")),
    responses((status = 200, body = AckResponse), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn ack_service(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<AckRequest>,
) -> Result<Json<AckResponse>, ApiError> {
    principal.require(Permission::Events)?;
    if req.seq < 0 {
        return Err(ApiError::invalid(
            ErrorCode::FieldInvalid,
            "seq",
            "must not be negative",
        ));
    }
    let head = app.store.key_events_head().await?;
    if req.seq > head {
        return Err(ApiError::invalid(
            ErrorCode::FieldInvalid,
            "seq",
            format!("no event {} yet: the latest is {head}", req.seq),
        ));
    }
    let s = find(&app, &id).await?;
    // Events not yet fanned out are covered too: fan-out confirms what the ack passed.
    let confirmed = app
        .store
        .ack_service(&s.id, req.seq, app.now())
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(AckResponse {
        service_id: s.id,
        acked_seq: s.acked_seq.max(req.seq),
        confirmed,
    }))
}

/// How the key's latest state change reached the services subscribed to it. Services
/// registered after the event are not expected to have it.
pub async fn propagation(
    app: &AppState,
    key: &KeyRecord,
) -> Result<Option<PropagationView>, ApiError> {
    let Some(event) = app
        .store
        .latest_key_event(key.id.as_str(), &STATE_EVENTS)
        .await?
    else {
        return Ok(None);
    };
    let Some(cat) = category(&event.event) else {
        return Ok(None);
    };
    let mut rows: BTreeMap<String, DeliveryRecord> = app
        .store
        .deliveries_of(event.seq)
        .await?
        .into_iter()
        .map(|d| (d.service_id.clone(), d))
        .collect();
    let mut services = Vec::new();
    for s in app.store.list_services().await? {
        if !s.events.iter().any(|e| e == cat) || s.start_seq >= event.seq {
            continue;
        }
        let d = rows.remove(&s.id).unwrap_or_else(|| DeliveryRecord {
            // Not fanned out yet: pending.
            service_id: s.id.clone(),
            seq: event.seq,
            key_id: event.key_id.clone(),
            event: event.event.clone(),
            state: "pending".to_owned(),
            attempts: 0,
            next_at: event.time,
            last_error: None,
            created_at: event.time,
            confirmed_at: None,
        });
        services.push(delivery_view(d, &s.name));
    }
    Ok(Some(PropagationView {
        confirmed: services.iter().filter(|d| d.state == "confirmed").count(),
        total: services.len(),
        event: event.event,
        seq: event.seq,
        time: event.time,
        services,
    }))
}
