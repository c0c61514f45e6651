//! `/v1/auth`: forward authentication for gateways: nginx `auth_request`, Traefik
//! ForwardAuth, Envoy HTTP ext_authz.
//!
//! The gateway forwards the client's request headers; we read the key from
//! `Authorization: Bearer` or `X-API-Key`, and the original method and URI from where the
//! caller's configured kind (the map's `gateway`, or its `[[caller]]` entry) puts them:
//! `X-Original-Method`/`X-Original-URI` (nginx), `X-Forwarded-Method`/`X-Forwarded-Uri`
//! (Traefik), or the request itself below `/v1/auth` (Envoy's path prefix). Never from
//! whichever header happens to be there: Traefik passes the client's own headers on, so
//! a client could otherwise add `X-Original-URI` and be judged on a path of its choosing.
//! Missing headers of the caller's kind are a refusal, not a fallback. Then we look up
//! the scope the gateway map requires, and verify exactly as `/v1/verify` does (usage
//! event, alerts). 200 carries `X-Keywarden-Key-Id` and `X-Keywarden-Owner`; 401 (no or
//! unknown key) and 403 (known key refused, or a request that cannot be judged) carry
//! `X-Keywarden-Code`. nginx turns any other status into a 500, so every refusal is one
//! of these two.
//!
//! The caller is the gateway, not the client: it sends a verifier token in
//! `X-Keywarden-Token`, or is listed in the map's `trusted_callers`.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keywarden_core::gateway::{GatewayKind, Need};
use keywarden_core::model::Actor;
use keywarden_core::role::Permission;
use keywarden_core::verify::{VerifyCode, VerifyRequest};
use keywarden_proto::{ErrorCode, VerifyResponse};

use crate::auth::{authenticate_token, client_ip, header_text};
use crate::error::ApiError;
use crate::state::SharedState;

const CODE: &str = "x-keywarden-code";
const KEY_ID: &str = "x-keywarden-key-id";
const OWNER: &str = "x-keywarden-owner";
const ENVIRONMENT: &str = "x-keywarden-environment";

/// Documents `/v1/auth` in the OpenAPI document; the route itself answers every method.
#[utoipa::path(get, path = "/v1/auth", tag = "verify",
    params(
        ("Authorization" = Option<String>, Header, description = "`Bearer <key>`: the client's key"),
        ("X-API-Key" = Option<String>, Header, description = "the client's key, when not in Authorization"),
        ("X-Original-Method" = Option<String>, Header, description = "the client's method, from callers of kind nginx (kind traefik: X-Forwarded-Method; envoy: the request's method)"),
        ("X-Original-URI" = Option<String>, Header, description = "the client's URI, from callers of kind nginx (kind traefik: X-Forwarded-Uri; envoy: the path below /v1/auth)"),
        ("X-Real-IP" = Option<String>, Header, description = "the client's address, believed from trusted callers"),
        ("X-Keywarden-Token" = Option<String>, Header, description = "the gateway's verifier token (unless it is a trusted caller)"),
    ),
    responses(
        (status = 200, body = VerifyResponse, description = "allowed; X-Keywarden-Key-Id, X-Keywarden-Owner, X-Keywarden-Environment"),
        (status = 401, body = VerifyResponse, description = "no key, malformed or unknown key; X-Keywarden-Code"),
        (status = 403, body = VerifyResponse, description = "the key is refused for this request, or the request cannot be judged (GATEWAY_HEADERS_MISSING, GATEWAY_HEADERS_INVALID, ROUTE_NOT_MAPPED, PATH_REJECTED); X-Keywarden-Code"),
    ))]
pub async fn auth_doc() {}

pub async fn auth(
    State(app): State<SharedState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    match decide(&app, peer.ip(), &method, &uri, &headers).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn decide(
    app: &SharedState,
    peer: IpAddr,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let map = &app.config.gateway;
    let caller = map.caller(peer);
    let gateway_token = match headers.get("x-keywarden-token") {
        Some(v) => {
            let t = v
                .to_str()
                .map_err(|_| ApiError::Unauthenticated("malformed X-Keywarden-Token"))?;
            let token = authenticate_token(app, t.trim()).await?;
            if !token.role.allows(Permission::Verify) {
                return Err(ApiError::Forbidden(format!(
                    "role `{}` may not verify keys",
                    token.role
                )));
            }
            Some(token)
        }
        None if caller.trusted => None,
        None => return Err(ApiError::Unauthenticated(
            "the gateway must send a verifier token in X-Keywarden-Token, or be a trusted caller",
        )),
    };
    let trusted_proxy =
        caller.trusted || app.config.trusted_proxies.iter().any(|n| n.contains(&peer));
    let source_ip = if trusted_proxy {
        gateway_client_ip(caller.kind, headers)
    } else {
        None
    }
    .or_else(|| client_ip(Some(peer), headers, &app.config.trusted_proxies));
    let need = match caller.kind {
        // Without a map the method and URI decide nothing: any valid key passes.
        None if !map.decides_by_path() => Need::Key {
            scope: None,
            environment: None,
        },
        None => return Ok(refusal(ErrorCode::GatewayUnknown)),
        Some(kind) => match original_request(kind, method, uri, headers) {
            Ok((method, uri)) => map.need(&method, &uri),
            Err(code) => return Ok(refusal(code)),
        },
    };
    let (scope, environment) = match need {
        Need::Key { scope, environment } => (scope.cloned(), environment.map(str::to_owned)),
        Need::Unmapped => {
            return Ok(refusal(ErrorCode::RouteNotMapped));
        }
        Need::Suspicious => return Ok(refusal(ErrorCode::PathRejected)),
    };
    let Some(key) = presented_key(headers) else {
        return Ok(refusal(ErrorCode::KeyMissing));
    };
    let ask = VerifyRequest {
        scope,
        environment,
        source_ip,
        environments: gateway_token.as_ref().and_then(|t| t.environments.clone()),
    };
    let user_agent = header_text(headers, "user-agent", 256);
    let outcome = super::verify::judge(app, &key, ask, None, user_agent, || match &gateway_token {
        Some(t) => Actor {
            id: format!("token:{}", t.id),
            name: t.owner.clone().unwrap_or_else(|| t.name.clone()),
            source_ip: source_ip.map(|ip| ip.to_string()),
            user_agent: None,
            request_id: None,
        },
        None => Actor {
            id: format!("gateway:{peer}"),
            name: "trusted gateway".to_owned(),
            source_ip: source_ip.map(|ip| ip.to_string()),
            user_agent: None,
            request_id: None,
        },
    })
    .await?;
    let code = outcome.code;
    let retry_after = outcome.retry_after_header();
    let body = outcome.into_response();
    let status = match code {
        VerifyCode::Valid => StatusCode::OK,
        VerifyCode::Malformed | VerifyCode::NotFound => StatusCode::UNAUTHORIZED,
        _ => StatusCode::FORBIDDEN,
    };
    let mut headers = HeaderMap::new();
    put(&mut headers, CODE, code.as_str());
    if let Some(v) = retry_after {
        headers.insert(axum::http::header::RETRY_AFTER, v);
    }
    if code == VerifyCode::Valid {
        if let Some(id) = &body.key_id {
            put(&mut headers, KEY_ID, id);
        }
        if let Some(owner) = &body.owner {
            put(&mut headers, OWNER, owner);
        }
        if let Some(env) = &body.environment {
            put(&mut headers, ENVIRONMENT, env);
        }
    }
    Ok((status, headers, Json(body)).into_response())
}

/// The longest original URI read from a gateway header. A longer one is refused, never
/// cut: a cut could drop the part of the path that decides the route.
const MAX_ORIGINAL_URI: usize = 8192;

/// The client's method and URI, from where the caller's kind puts them and nowhere else.
/// A missing header is refused (`GATEWAY_HEADERS_MISSING`), as is one sent twice or not
/// readable as text (`GATEWAY_HEADERS_INVALID`): another kind's headers may come from
/// the client (Traefik copies them), so there is no falling back to them.
fn original_request(
    kind: GatewayKind,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(String, String), ErrorCode> {
    let (method_header, uri_header) = match kind {
        GatewayKind::Nginx => ("x-original-method", "x-original-uri"),
        GatewayKind::Traefik => ("x-forwarded-method", "x-forwarded-uri"),
        GatewayKind::Envoy => {
            // Envoy appends the original path to `path_prefix` and keeps the method.
            let below = uri.path().strip_prefix("/v1/auth").unwrap_or("");
            if below.is_empty() {
                return Err(ErrorCode::GatewayHeadersMissing);
            }
            let uri = match uri.query() {
                Some(q) => format!("{below}?{q}"),
                None => below.to_owned(),
            };
            return Ok((method.as_str().to_owned(), uri));
        }
    };
    let method = exactly_one(headers, method_header, 16)?;
    if !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(ErrorCode::GatewayHeadersInvalid);
    }
    let uri = exactly_one(headers, uri_header, MAX_ORIGINAL_URI)?;
    Ok((method.to_owned(), uri.to_owned()))
}

/// The one value of `name`: present once, visible ASCII, at most `max` bytes.
fn exactly_one<'h>(headers: &'h HeaderMap, name: &str, max: usize) -> Result<&'h str, ErrorCode> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Err(ErrorCode::GatewayHeadersMissing);
    };
    if values.next().is_some() {
        return Err(ErrorCode::GatewayHeadersInvalid);
    }
    let text = value
        .to_str()
        .map_err(|_| ErrorCode::GatewayHeadersInvalid)?
        .trim();
    if text.is_empty() {
        return Err(ErrorCode::GatewayHeadersMissing);
    }
    if text.len() > max || text.bytes().any(|b| b.is_ascii_control()) {
        return Err(ErrorCode::GatewayHeadersInvalid);
    }
    Ok(text)
}

/// The client's address as a trusted gateway of this kind passes it: nginx and Envoy set
/// `X-Real-IP` (each overwrites a client's own); Traefik and Caddy append the address they
/// saw to `X-Forwarded-For` and pass the client's `X-Real-IP` on untouched, so for them
/// only the last `X-Forwarded-For` entry counts.
fn gateway_client_ip(kind: Option<GatewayKind>, headers: &HeaderMap) -> Option<IpAddr> {
    match kind {
        Some(GatewayKind::Traefik) => headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse::<IpAddr>().ok()),
        Some(GatewayKind::Nginx | GatewayKind::Envoy) | None => headers
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<IpAddr>().ok()),
    }
}

/// The client's key: `Authorization: Bearer …`, else `X-API-Key`.
fn presented_key(headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_credentials);
    let api_key = || {
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    bearer
        .or_else(api_key)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
}

fn put(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

/// A refusal before any key is judged, in the verify answer's shape; its status is the
/// code's.
fn refusal(code: ErrorCode) -> Response {
    let mut headers = HeaderMap::new();
    put(&mut headers, CODE, code.as_str());
    let body = VerifyResponse {
        valid: false,
        code: code.as_str().to_owned(),
        key_id: None,
        owner: None,
        environment: None,
        scopes: None,
        expires_at: None,
        remaining_uses: None,
        retry_after_ms: None,
    };
    (crate::error::status_of(code), headers, Json(body)).into_response()
}
