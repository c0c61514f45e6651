//! `GET /metrics`: every metric in the Prometheus text format (docs/metrics.md).

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use keywarden_core::role::Permission;
use keywarden_proto::ErrorBody;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::SharedState;

/// Metrics in the Prometheus text exposition format (roles `admin`, `auditor`). A
/// scraper without a token uses `--metrics-listen` instead. 503 when the store cannot
/// be read: its gauges are not guessed.
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4", body = String,
            content_type = "text/plain; version=0.0.4; charset=utf-8"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn metrics(
    State(app): State<SharedState>,
    principal: Principal,
) -> Result<Response, ApiError> {
    principal.require(Permission::MetricsRead)?;
    exposition(&app).await
}

/// The same on the `--metrics-listen` listener, which has no token to check: whoever
/// can reach that address may read it.
pub async fn open_metrics(State(app): State<SharedState>) -> Result<Response, ApiError> {
    exposition(&app).await
}

async fn exposition(app: &SharedState) -> Result<Response, ApiError> {
    let text = crate::metrics::scrape(app).await?;
    Ok((
        [(
            CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        text,
    )
        .into_response())
}
