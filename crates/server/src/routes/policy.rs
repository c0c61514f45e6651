//! `/v1/policy`: the key policy in force, and applying a new version (admin).

use axum::extract::State;
use axum::Json;
use keywarden_core::policy::Policy;
use keywarden_core::role::Permission;
use keywarden_proto::{
    ApplyPolicyRequest, EnforcementAction, EnforcementReport, ErrorBody, ErrorCode, PolicyView,
};
use keywarden_store::StoredPolicy;
use serde::Deserialize;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::IntoParams;

use super::audit;
use crate::auth::Principal;
use crate::enforcer;
use crate::error::{violation, ApiError};
use crate::extract::{JsonBody, QueryParams};
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
            ErrorCode::PolicyInvalid,
            "policy",
            format!("at most {MAX_POLICY_LEN} bytes"),
        ));
    }
    if let Err(e) = Policy::from_toml(&req.policy) {
        return Err(ApiError::Validation(
            e.0.into_iter()
                .map(|p| violation(ErrorCode::PolicyInvalid, "policy", p))
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
    // Verify reads the node's cached policy; bring it up to date at once.
    app.policy().await?;
    Ok(Json(view(Some(stored))))
}

/// What the first enforcer pass under a policy would do, were it applied now (roles
/// `admin`, `issuer`, `auditor`); nothing is applied. A token limited to environments
/// sees its environments' part.
#[utoipa::path(post, path = "/v1/policy/plan", tag = "policy", request_body = ApplyPolicyRequest,
    responses((status = 200, body = EnforcementReport), (status = 422, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn plan_policy(
    State(app): State<SharedState>,
    principal: Principal,
    JsonBody(req): JsonBody<ApplyPolicyRequest>,
) -> Result<Json<EnforcementReport>, ApiError> {
    principal.require(Permission::PolicyRead)?;
    if req.policy.len() > MAX_POLICY_LEN {
        return Err(ApiError::invalid(
            ErrorCode::PolicyInvalid,
            "policy",
            format!("at most {MAX_POLICY_LEN} bytes"),
        ));
    }
    let candidate = Policy::from_toml(&req.policy).map_err(|e| {
        ApiError::Validation(
            e.0.into_iter()
                .map(|p| violation(ErrorCode::PolicyInvalid, "policy", p))
                .collect(),
        )
    })?;
    let mut actions = enforcer::plan_under(&app, candidate).await?;
    actions.retain(|a| principal.may_act_in(&a.key.environment));
    Ok(Json(report(app.now(), true, actions)))
}

fn report(at: OffsetDateTime, planned: bool, actions: Vec<enforcer::Action>) -> EnforcementReport {
    EnforcementReport {
        at,
        planned,
        actions: actions
            .into_iter()
            .map(|a| EnforcementAction {
                key_id: a.key.id.to_string(),
                name: a.key.name,
                owner: a.key.owner,
                environment: a.key.environment,
                action: a.action.to_owned(),
                reason: a.reason.to_owned(),
                detail: a.detail,
                due_at: a.due_at,
            })
            .collect(),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PlanQuery {
    /// RFC 3339; default now.
    pub at: Option<String>,
}

/// What the enforcer would do at `at` (default now), key by key, without acting.
#[utoipa::path(get, path = "/v1/enforce/plan", tag = "policy", params(PlanQuery),
    responses((status = 200, body = EnforcementReport), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn enforce_plan(
    State(app): State<SharedState>,
    principal: Principal,
    QueryParams(q): QueryParams<PlanQuery>,
) -> Result<Json<EnforcementReport>, ApiError> {
    principal.require(Permission::PolicyRead)?;
    let at = match q.at.as_deref() {
        None => app.now(),
        Some(s) => OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
            ApiError::coded(
                ErrorCode::InvalidQuery,
                "at must be an RFC 3339 time such as 2027-01-01T00:00:00Z",
            )
        })?,
    };
    let mut actions = enforcer::plan(&app, at).await?;
    // A token limited to environments sees only its environments' part of the plan.
    actions.retain(|a| principal.may_act_in(&a.key.environment));
    Ok(Json(report(at, true, actions)))
}

/// Run one enforcer pass now (role `admin`); returns what it did.
#[utoipa::path(post, path = "/v1/enforce", tag = "policy",
    responses((status = 200, body = EnforcementReport), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn enforce_now(
    State(app): State<SharedState>,
    principal: Principal,
) -> Result<Json<EnforcementReport>, ApiError> {
    principal.require(Permission::PolicyWrite)?;
    let at = app.now();
    let actions = enforcer::pass(&app).await?;
    Ok(Json(report(at, false, actions)))
}
