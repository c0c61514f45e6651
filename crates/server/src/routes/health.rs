use axum::extract::State;
use axum::Json;
use keywarden_proto::Health;

use crate::error::ApiError;
use crate::state::SharedState;

/// Liveness and store reachability.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, body = Health), (status = 503, body = keywarden_proto::ErrorBody)))]
pub async fn healthz(State(app): State<SharedState>) -> Result<Json<Health>, ApiError> {
    app.store.ping().await?;
    Ok(Json(Health {
        status: "ok".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }))
}
