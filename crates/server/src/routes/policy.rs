//! `/v1/policy`: the key policy in force, and applying a new version (admin).

use axum::extract::State;
use axum::Json;
use keywarden_core::policy::Policy;
use keywarden_core::role::Permission;
use keywarden_proto::{codes, ApplyPolicyRequest, ErrorBody, PolicyView};
use keywarden_store::StoredPolicy;
use serde_json::json;

use super::audit;
use crate::auth::Principal;
use crate::error::{violation, ApiError};
use crate::extract::JsonBody;
use crate::state::SharedState;

/// Policy files are small; this bounds what one may hold.
const MAX_POLICY_LEN: usize = 32 * 1024;

fn view(p: Option<StoredPolicy>) -> PolicyView {
    match p {
        Some(p) => PolicyView {
            version: p.version,
            text: p.text,
            applied_at: Some(p.applied_at),
            applied_by: Some(p.applied_by),
        },
        None => PolicyView {
            version: 0,
            text: String::new(),
            applied_at: None,
            applied_by: None,
        },
    }
}

/// The policy in force (version 0 and no text: the built-in defaults).
#[utoipa::path(get, path = "/v1/policy", tag = "policy",
    responses((status = 200, body = PolicyView), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_policy(
    State(app): State<SharedState>,
    principal: Principal,
) -> Result<Json<PolicyView>, ApiError> {
    principal.require(Permission::PolicyRead)?;
    Ok(Json(view(app.store.current_policy().await?)))
}

/// Apply a policy (TOML) as the next version (role `admin`). Every problem in the file
/// is listed in the 422; nothing is applied then. Audited with the text before and after.
#[utoipa::path(put, path = "/v1/policy", tag = "policy", request_body = ApplyPolicyRequest,
    responses((status = 200, body = PolicyView), (status = 422, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_policy(
    State(app): State<SharedState>,
    principal: Principal,
    JsonBody(req): JsonBody<ApplyPolicyRequest>,
) -> Result<Json<PolicyView>, ApiError> {
    principal.require(Permission::PolicyWrite)?;
    if req.policy.len() > MAX_POLICY_LEN {
        return Err(ApiError::invalid(
            codes::POLICY_INVALID,
            "policy",
            format!("at most {MAX_POLICY_LEN} bytes"),
        ));
    }
    if let Err(e) = Policy::from_toml(&req.policy) {
        return Err(ApiError::Validation(
            e.0.into_iter()
                .map(|p| violation(codes::POLICY_INVALID, "policy", p))
                .collect(),
        ));
    }
    let now = app.now();
    let actor = principal.actor();
    let stored = app
        .store
        .apply_policy(&req.policy, now, &actor.id, |version, previous| {
            audit(
                actor.clone(),
                now,
                "policy.applied",
                "policy".to_owned(),
                None,
                json!({
                    "version": {"before": previous.map(|p| p.version), "after": version},
                    "text": {"before": previous.map(|p| p.text.as_str()), "after": req.policy},
                }),
            )
        })
        .await?;
    tracing::info!(version = stored.version, "policy applied");
    Ok(Json(view(Some(stored))))
}
