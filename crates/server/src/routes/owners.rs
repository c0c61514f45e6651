//! `/v1/owners`: the people keys belong to. Disabling an owner revokes or suspends all
//! their live keys in the same transaction, as the policy's `on_owner_disabled` says for
//! each key's environment.

use axum::extract::{Path, State};
use axum::Json;
use keywarden_core::lifecycle::OWNER_DISABLED;
use keywarden_core::model::{Actor, KeyRecord, KeyState, StateCause};
use keywarden_core::policy::OnOwnerDisabled;
use keywarden_core::role::Permission;
use keywarden_core::validate;
use keywarden_proto::{
    ErrorBody, ErrorCode, OwnerList, OwnerStatusChange, OwnerView, PutOwnerRequest,
    StateChangeRequest,
};
use keywarden_store::Owner;
use serde_json::json;

use super::{audit, reason};
use crate::auth::Principal;
use crate::error::{violation, ApiError};
use crate::extract::{JsonBody, OptionalJsonBody};
use crate::state::SharedState;

fn view(o: Owner) -> OwnerView {
    OwnerView {
        identity: o.identity,
        display_name: o.display_name,
        status: o.status,
        registered: true,
        manager: o.manager,
        created_at: o.created_at,
        updated_at: o.updated_at,
    }
}

pub(crate) fn not_found(identity: &str) -> ApiError {
    ApiError::Coded {
        code: ErrorCode::OwnerNotFound,
        message: format!(
            "no owner {:?} is registered",
            identity.chars().take(64).collect::<String>()
        ),
    }
}

/// Register an owner, or update a registered one's name and manager (role `admin`).
#[utoipa::path(post, path = "/v1/owners", tag = "owners", request_body = PutOwnerRequest,
    responses((status = 200, body = OwnerView), (status = 422, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_owner(
    State(app): State<SharedState>,
    principal: Principal,
    JsonBody(mut req): JsonBody<PutOwnerRequest>,
) -> Result<Json<OwnerView>, ApiError> {
    principal.require(Permission::OwnersWrite)?;
    req.identity = validate::canonical_owner(&req.identity);
    req.manager = req.manager.as_deref().map(validate::canonical_owner);
    let mut v = Vec::new();
    if let Err(e) = validate::owner(&req.identity) {
        v.push(violation(ErrorCode::FieldInvalid, "identity", e.message));
    }
    if let Err(e) = validate::display_name("display_name", &req.display_name) {
        v.push(violation(ErrorCode::FieldInvalid, &e.field, e.message));
    }
    if let Some(Err(e)) = req.manager.as_deref().map(validate::owner) {
        v.push(violation(ErrorCode::FieldInvalid, "manager", e.message));
    }
    if !v.is_empty() {
        return Err(ApiError::Validation(v));
    }
    let now = app.now();
    let existing = app.store.get_owner(&req.identity).await?;
    let owner = Owner {
        identity: req.identity.clone(),
        display_name: req.display_name.clone(),
        status: existing
            .as_ref()
            .map_or_else(|| "active".to_owned(), |o| o.status.clone()),
        manager: req.manager.clone(),
        created_at: existing.as_ref().map_or(now, |o| o.created_at),
        updated_at: now,
    };
    let entry = audit(
        principal.actor(),
        now,
        if existing.is_some() {
            "owner.updated"
        } else {
            "owner.created"
        },
        format!("owner:{}", owner.identity),
        None,
        json!({
            "display_name": {"before": existing.as_ref().map(|o| &o.display_name), "after": owner.display_name},
            "manager": {"before": existing.as_ref().map(|o| &o.manager), "after": owner.manager},
        }),
    );
    app.store.put_owner(&owner, &entry).await?;
    Ok(Json(view(owner)))
}

/// Registered owners, by identity.
#[utoipa::path(get, path = "/v1/owners", tag = "owners",
    responses((status = 200, body = OwnerList), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_owners(
    State(app): State<SharedState>,
    principal: Principal,
) -> Result<Json<OwnerList>, ApiError> {
    principal.require(Permission::OwnersRead)?;
    let mut owners: Vec<OwnerView> = app
        .store
        .list_owners()
        .await?
        .into_iter()
        .map(view)
        .collect();
    let now = app.now();
    for identity in app.store.unregistered_key_owners().await? {
        owners.push(unregistered(identity, now));
    }
    owners.sort_by(|a, b| a.identity.cmp(&b.identity));
    Ok(Json(OwnerList { owners }))
}

/// An owner who holds keys nobody registered: active (nothing disabled them), named by
/// their identity; the times are those of the answer.
fn unregistered(identity: String, now: time::OffsetDateTime) -> OwnerView {
    OwnerView {
        display_name: identity.clone(),
        identity,
        status: "active".to_owned(),
        registered: false,
        manager: None,
        created_at: now,
        updated_at: now,
    }
}

#[utoipa::path(get, path = "/v1/owners/{identity}", tag = "owners",
    params(("identity" = String, Path, description = "the owner's identity, e.g. an e-mail address")),
    responses((status = 200, body = OwnerView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_owner(
    State(app): State<SharedState>,
    principal: Principal,
    Path(identity): Path<String>,
) -> Result<Json<OwnerView>, ApiError> {
    principal.require(Permission::OwnersRead)?;
    let identity = validate::canonical_owner(&identity);
    match app.store.get_owner(&identity).await? {
        Some(o) => Ok(Json(view(o))),
        None if app.store.owner_key_count(&identity).await? > 0 => {
            Ok(Json(unregistered(identity, app.now())))
        }
        None => Err(not_found(&identity)),
    }
}

async fn set_status(
    app: SharedState,
    principal: Principal,
    identity: String,
    disable: bool,
    why: Option<String>,
) -> Result<Json<OwnerStatusChange>, ApiError> {
    principal.require(Permission::OwnersWrite)?;
    let why = reason(why)?;
    let status = if disable { "disabled" } else { "active" };
    let identity = validate::canonical_owner(&identity);
    let (owner, keys, tokens) =
        change_status(&app, principal.actor(), &identity, status, why).await?;
    Ok(Json(OwnerStatusChange {
        owner: view(owner),
        keys: keys.iter().map(|k| k.id.to_string()).collect(),
        tokens,
    }))
}

/// Moves an owner to `status` (`active`, `disabled`, or `deleted`, which SCIM uses and
/// acts like `disabled`); leaving `active` revokes or suspends every live key of theirs
/// as the policy says and revokes their admin tokens, in the same transaction. An owner
/// who was never registered is registered by leaving `active` (offboarding must reach
/// keys nobody registered an owner for, and keep new keys from being issued to them).
/// Returns the owner after the change, the keys acted on and the tokens revoked (none
/// when the status was already that). `identity` must be canonical.
pub(crate) async fn change_status(
    app: &SharedState,
    actor: Actor,
    identity: &str,
    status: &str,
    why: Option<String>,
) -> Result<(Owner, Vec<KeyRecord>, Vec<String>), ApiError> {
    let now = app.now();
    let (before, register) = match app.store.get_owner(identity).await? {
        Some(o) => (o, None),
        None if status == "active" => return Err(not_found(identity)),
        None => {
            let o = Owner {
                identity: identity.to_owned(),
                display_name: identity.to_owned(),
                status: "active".to_owned(),
                manager: None,
                created_at: now,
                updated_at: now,
            };
            (o.clone(), Some(o))
        }
    };
    let action = match status {
        "active" => "owner.enabled",
        "deleted" => "owner.deleted",
        _ => "owner.disabled",
    };
    let policy = app.policy().await?;
    let entry = audit(
        actor.clone(),
        now,
        action,
        format!("owner:{identity}"),
        why,
        json!({"status": {"before": before.status, "after": status},
               "registered": register.is_some()}),
    );
    let token_entry = |id: &str| {
        audit(
            actor.clone(),
            now,
            "token.revoked",
            format!("token:{id}"),
            Some(OWNER_DISABLED.to_owned()),
            json!({"owner": identity}),
        )
    };
    let changed = app
        .store
        .set_owner_status(
            identity,
            status,
            now,
            register.as_ref(),
            &entry,
            |key| {
                let next_state = match policy.1.rules_for(&key.environment).on_owner_disabled {
                    OnOwnerDisabled::Revoke => KeyState::Revoked,
                    OnOwnerDisabled::Suspend if key.state == KeyState::Active => {
                        KeyState::Suspended
                    }
                    // Already suspended (for a reason of its own): held now because the
                    // owner is gone, so that it cannot be resumed or rotated out of it.
                    OnOwnerDisabled::Suspend
                        if key.state_cause != Some(StateCause::OwnerDisabled) =>
                    {
                        KeyState::Suspended
                    }
                    OnOwnerDisabled::Suspend => return None,
                };
                let mut next = key.clone();
                next.state = next_state;
                next.state_reason = Some(OWNER_DISABLED.to_owned());
                next.state_cause = Some(StateCause::OwnerDisabled);
                next.state_changed_at = Some(now);
                let entry = audit(
                    actor.clone(),
                    now,
                    if next_state == KeyState::Revoked {
                        "key.revoked"
                    } else {
                        "key.suspended"
                    },
                    format!("key:{}", key.id),
                    Some(OWNER_DISABLED.to_owned()),
                    json!({"state": {"before": key.state.as_str(), "after": next_state.as_str()},
                       "owner": identity}),
                );
                Some((next, entry))
            },
            token_entry,
        )
        .await?;
    let (keys, tokens) = changed.unwrap_or_default();
    for k in &keys {
        app.keys.evict(&k.id);
    }
    for t in &tokens {
        if let Ok(id) = keywarden_core::key_format::KeyId::parse(t) {
            app.tokens.evict(&id);
        }
    }
    if !keys.is_empty() {
        tracing::info!(keys = keys.len(), "owner disabled: keys acted on");
    }
    let after = app
        .store
        .get_owner(identity)
        .await?
        .ok_or_else(|| not_found(identity))?;
    Ok((after, keys, tokens))
}

/// Disable an owner (role `admin`): every live key of theirs is revoked, or suspended,
/// as the policy's `on_owner_disabled` says, in the same transaction; verify answers
/// OWNER_DISABLED for them. Disabling a disabled owner changes nothing.
#[utoipa::path(post, path = "/v1/owners/{identity}/disable", tag = "owners",
    params(("identity" = String, Path, description = "the owner's identity")),
    request_body = StateChangeRequest,
    responses((status = 200, body = OwnerStatusChange), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn disable_owner(
    State(app): State<SharedState>,
    principal: Principal,
    Path(identity): Path<String>,
    OptionalJsonBody(req): OptionalJsonBody<StateChangeRequest>,
) -> Result<Json<OwnerStatusChange>, ApiError> {
    set_status(app, principal, identity, true, req.reason).await
}

/// Enable an owner again (role `admin`). Their revoked keys stay revoked; suspended ones
/// stay suspended until someone resumes them.
#[utoipa::path(post, path = "/v1/owners/{identity}/enable", tag = "owners",
    params(("identity" = String, Path, description = "the owner's identity")),
    request_body = StateChangeRequest,
    responses((status = 200, body = OwnerStatusChange), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn enable_owner(
    State(app): State<SharedState>,
    principal: Principal,
    Path(identity): Path<String>,
    OptionalJsonBody(req): OptionalJsonBody<StateChangeRequest>,
) -> Result<Json<OwnerStatusChange>, ApiError> {
    set_status(app, principal, identity, false, req.reason).await
}
