//! SCIM 2.0 `/scim/v2/Users` (RFC 7643/7644) over the owner registry, so an identity
//! provider drives offboarding: deactivating or deleting a user revokes (or suspends, as
//! the policy says) every key they own, at once. `userName` is the owner's identity and
//! also the resource `id`. Authenticated by a token with role `scim`.
//!
//! Accepts what Okta and Microsoft Entra send: PATCH with `op` in any case, `active` as a
//! boolean or the strings "True"/"False", set through `path` or inside `value`.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use keywarden_core::role::Permission;
use keywarden_core::validate;
use keywarden_store::Owner;
use serde_json::{json, Value};

use super::audit;
use super::owners::change_status;
use crate::auth::Principal;
use crate::error::{ApiError, ErrorCause, StoreFailure};
use crate::state::SharedState;

const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

/// A SCIM answer: `application/scim+json`, errors in SCIM's own shape.
pub struct Scim(StatusCode, Value, Option<Failure>);

/// What an error answer carries for the layers outside (the 5xx log, the store error
/// count), as [`ApiError::into_response`] does.
pub struct Failure {
    cause: Option<ErrorCause>,
    store: Option<StoreFailure>,
}

impl IntoResponse for Scim {
    fn into_response(self) -> Response {
        let mut resp = (
            self.0,
            [(header::CONTENT_TYPE, "application/scim+json")],
            self.1.to_string(),
        )
            .into_response();
        if let Some(failure) = self.2 {
            if let Some(cause) = failure.cause {
                resp.extensions_mut().insert(cause);
            }
            if let Some(store) = failure.store {
                resp.extensions_mut().insert(store);
            }
        }
        resp
    }
}

fn error(status: StatusCode, scim_type: Option<&str>, detail: impl Into<String>) -> Scim {
    let mut body = json!({
        "schemas": [ERROR_SCHEMA],
        "status": status.as_u16().to_string(),
        "detail": detail.into(),
    });
    if let Some(t) = scim_type {
        body["scimType"] = json!(t);
    }
    Scim(status, body, None)
}

impl From<ApiError> for Scim {
    fn from(e: ApiError) -> Self {
        let detail = match &e {
            ApiError::Store(_) | ApiError::Internal(_) => e.public_message(),
            other => other.to_string(),
        };
        let Scim(status, body, _) = error(e.status(), None, detail);
        let failure = Failure {
            cause: e.cause(),
            store: e.store_failure(),
        };
        Scim(status, body, Some(failure))
    }
}

fn user(o: &Owner) -> Value {
    json!({
        "schemas": [USER_SCHEMA],
        "id": o.identity,
        "userName": o.identity,
        "displayName": o.display_name,
        "name": {"formatted": o.display_name},
        "active": o.status == "active",
        "emails": [{"value": o.identity, "primary": true}],
        "meta": {
            "resourceType": "User",
            "created": keywarden_core::audit_chain::format_time(o.created_at),
            "lastModified": keywarden_core::audit_chain::format_time(o.updated_at),
            "location": format!("/scim/v2/Users/{}", o.identity),
        },
    })
}

fn parse_body(bytes: &Bytes) -> Result<Value, Scim> {
    if let Some(field) = crate::extract::key_field(bytes, &[]) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            Some("invalidValue"),
            format!(
                "{field}: holds a keywarden key or admin token, which no SCIM attribute may \
                 hold; nothing was stored (the value is not shown)"
            ),
        ));
    }
    serde_json::from_slice(bytes).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            Some("invalidSyntax"),
            "the body is not JSON",
        )
    })
}

/// `active` as IdPs send it: a boolean, or Entra's "True"/"False".
fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// The display name a user body carries: displayName, else name.formatted, else given
/// and family names, else the userName.
fn display_name(body: &Value, user_name: &str) -> String {
    if let Some(d) = body["displayName"]
        .as_str()
        .filter(|d| !d.trim().is_empty())
    {
        return d.trim().to_owned();
    }
    if let Some(f) = body["name"]["formatted"]
        .as_str()
        .filter(|f| !f.trim().is_empty())
    {
        return f.trim().to_owned();
    }
    let given = body["name"]["givenName"].as_str().unwrap_or("");
    let family = body["name"]["familyName"].as_str().unwrap_or("");
    let full = format!("{given} {family}");
    if full.trim().is_empty() {
        user_name.to_owned()
    } else {
        full.trim().to_owned()
    }
}

async fn require(principal: &Principal) -> Result<(), Scim> {
    principal
        .require(Permission::Scim)
        .map_err(|_| error(StatusCode::FORBIDDEN, None, "this token may not use SCIM"))
}

async fn live_owner(app: &SharedState, id: &str) -> Result<Owner, Scim> {
    match app
        .store
        .get_owner(&validate::canonical_owner(id))
        .await
        .map_err(ApiError::from)?
    {
        Some(o) if o.status != "deleted" => Ok(o),
        _ => Err(error(
            StatusCode::NOT_FOUND,
            None,
            format!("no user {id:?}"),
        )),
    }
}

/// Applies `active` (when the body says) and a new display name; returns the owner after.
async fn apply(
    app: &SharedState,
    principal: &Principal,
    owner: Owner,
    display: Option<String>,
    active: Option<bool>,
) -> Result<Owner, Scim> {
    let mut owner = owner;
    if let Some(d) = display.filter(|d| *d != owner.display_name) {
        if let Err(e) = validate::display_name("displayName", &d) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                Some("invalidValue"),
                e.message,
            ));
        }
        let now = app.now();
        let entry = audit(
            principal.actor(),
            now,
            "owner.updated",
            format!("owner:{}", owner.identity),
            Some("scim".to_owned()),
            json!({"display_name": {"before": owner.display_name, "after": d}}),
        );
        owner.display_name = d;
        owner.updated_at = now;
        app.store
            .put_owner(&owner, &entry)
            .await
            .map_err(ApiError::from)?;
    }
    match active {
        Some(false) if owner.status == "active" => {
            let why = Some("deactivated through SCIM".to_owned());
            owner = change_status(app, principal.actor(), &owner.identity, "disabled", why)
                .await?
                .0;
        }
        Some(true) if owner.status != "active" => {
            let why = Some("activated through SCIM".to_owned());
            owner = change_status(app, principal.actor(), &owner.identity, "active", why)
                .await?
                .0;
        }
        _ => {}
    }
    Ok(owner)
}

pub async fn create_user(
    State(app): State<SharedState>,
    principal: Principal,
    body: Bytes,
) -> Result<Scim, Scim> {
    require(&principal).await?;
    let body = parse_body(&body)?;
    let Some(user_name) = body["userName"]
        .as_str()
        .map(|u| validate::canonical_owner(u.trim()))
    else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            Some("invalidValue"),
            "userName is required",
        ));
    };
    let user_name = user_name.as_str();
    if let Err(e) = validate::owner(user_name) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            Some("invalidValue"),
            e.message,
        ));
    }
    if let Some(existing) = app
        .store
        .get_owner(user_name)
        .await
        .map_err(ApiError::from)?
    {
        if existing.status != "deleted" {
            return Err(error(
                StatusCode::CONFLICT,
                Some("uniqueness"),
                format!("user {user_name:?} exists"),
            ));
        }
    }
    let now = app.now();
    let owner = Owner {
        identity: user_name.to_owned(),
        display_name: display_name(&body, user_name),
        status: "active".to_owned(),
        manager: body["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]["manager"]
            ["value"]
            .as_str()
            .filter(|m| validate::owner(m).is_ok())
            .map(validate::canonical_owner),
        created_at: now,
        updated_at: now,
    };
    if let Err(e) = validate::display_name("displayName", &owner.display_name) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            Some("invalidValue"),
            e.message,
        ));
    }
    let entry = audit(
        principal.actor(),
        now,
        "owner.created",
        format!("owner:{}", owner.identity),
        Some("scim".to_owned()),
        json!({"display_name": {"before": null, "after": owner.display_name}}),
    );
    app.store
        .put_owner(&owner, &entry)
        .await
        .map_err(ApiError::from)?;
    // A user re-created after a delete comes back active.
    let mut owner = app
        .store
        .get_owner(user_name)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| error(StatusCode::INTERNAL_SERVER_ERROR, None, "user vanished"))?;
    if owner.status != "active" {
        owner = change_status(
            &app,
            principal.actor(),
            user_name,
            "active",
            Some("scim".into()),
        )
        .await?
        .0;
    }
    let active = body.get("active").and_then(as_bool);
    let owner = apply(&app, &principal, owner, None, active).await?;
    Ok(Scim(StatusCode::CREATED, user(&owner), None))
}

pub async fn get_user(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Scim, Scim> {
    require(&principal).await?;
    Ok(Scim(
        StatusCode::OK,
        user(&live_owner(&app, &id).await?),
        None,
    ))
}

#[derive(Debug, serde::Deserialize)]
pub struct ListQuery {
    filter: Option<String>,
    #[serde(rename = "startIndex")]
    start_index: Option<usize>,
    count: Option<usize>,
}

/// `userName eq "value"`, the filter IdPs send to look a user up.
fn user_name_filter(f: &str) -> Option<String> {
    let mut parts = f.trim().splitn(3, char::is_whitespace);
    let attr = parts.next()?;
    let op = parts.next()?;
    let value = parts.next()?.trim();
    if !attr.eq_ignore_ascii_case("userName") || !op.eq_ignore_ascii_case("eq") {
        return None;
    }
    let inner = value.strip_prefix('"')?.strip_suffix('"')?;
    Some(validate::canonical_owner(&inner.replace("\\\"", "\"")))
}

pub async fn list_users(
    State(app): State<SharedState>,
    principal: Principal,
    Query(q): Query<ListQuery>,
) -> Result<Scim, Scim> {
    require(&principal).await?;
    let owners: Vec<Owner> = match q.filter.as_deref() {
        Some(f) => {
            let Some(name) = user_name_filter(f) else {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    Some("invalidFilter"),
                    "only `userName eq \"…\"` filters are supported",
                ));
            };
            app.store
                .get_owner(&name)
                .await
                .map_err(ApiError::from)?
                .into_iter()
                .collect()
        }
        None => app.store.list_owners().await.map_err(ApiError::from)?,
    };
    let owners: Vec<&Owner> = owners.iter().filter(|o| o.status != "deleted").collect();
    let start = q.start_index.unwrap_or(1).max(1);
    let count = q.count.unwrap_or(100).min(1000);
    let page: Vec<Value> = owners
        .iter()
        .skip(start - 1)
        .take(count)
        .map(|o| user(o))
        .collect();
    Ok(Scim(
        StatusCode::OK,
        json!({
            "schemas": [LIST_SCHEMA],
            "totalResults": owners.len(),
            "startIndex": start,
            "itemsPerPage": page.len(),
            "Resources": page,
        }),
        None,
    ))
}

pub async fn replace_user(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Scim, Scim> {
    require(&principal).await?;
    let body = parse_body(&body)?;
    let owner = live_owner(&app, &id).await?;
    if body["userName"]
        .as_str()
        .is_some_and(|u| validate::canonical_owner(u.trim()) != owner.identity)
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            Some("mutability"),
            "userName cannot change: it is the owner's identity",
        ));
    }
    let display = Some(display_name(&body, &owner.identity));
    let active = body.get("active").and_then(as_bool);
    let owner = apply(&app, &principal, owner, display, active).await?;
    Ok(Scim(StatusCode::OK, user(&owner), None))
}

pub async fn patch_user(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Scim, Scim> {
    require(&principal).await?;
    let body = parse_body(&body)?;
    if !body["schemas"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s == PATCH_SCHEMA))
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            Some("invalidSyntax"),
            "not a PatchOp",
        ));
    }
    let Some(ops) = body["Operations"].as_array() else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            Some("invalidSyntax"),
            "Operations is required",
        ));
    };
    let owner = live_owner(&app, &id).await?;
    let (mut active, mut display) = (None, None);
    for op in ops {
        let kind = op["op"].as_str().unwrap_or("").to_ascii_lowercase();
        if kind != "replace" && kind != "add" {
            continue;
        }
        match op["path"].as_str() {
            Some(p) if p.eq_ignore_ascii_case("active") => active = as_bool(&op["value"]),
            Some(p) if p.eq_ignore_ascii_case("displayName") => {
                display = op["value"].as_str().map(str::to_owned);
            }
            Some(_) => {}
            None => {
                if let Some(a) = op["value"].get("active").and_then(as_bool) {
                    active = Some(a);
                }
                if let Some(d) = op["value"]["displayName"].as_str() {
                    display = Some(d.to_owned());
                }
            }
        }
    }
    let owner = apply(&app, &principal, owner, display, active).await?;
    Ok(Scim(StatusCode::OK, user(&owner), None))
}

pub async fn delete_user(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, Scim> {
    require(&principal).await?;
    let owner = live_owner(&app, &id).await?;
    change_status(
        &app,
        principal.actor(),
        &owner.identity,
        "deleted",
        Some("deleted through SCIM".to_owned()),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
