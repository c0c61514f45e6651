//! What is decided about a request before a handler reads its path, query or body:
//!
//! - the permission its route needs ([`permission`]), checked as the caller is
//!   authenticated, so a caller without it gets 403 however malformed the rest is;
//! - no key of ours in a path segment or query parameter ([`check_uri`]), and path
//!   parameters that decode to UTF-8;
//! - every error answer a JSON body with a code, whoever made it (axum's
//!   own rejections, the body limit, a URI too long), in SCIM's shape under `/scim/`
//!   ([`JsonErrorsLayer`]);
//! - URIs in log lines with any key in them redacted ([`redact_uri`]).

use std::borrow::Cow;
use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::extract::{MatchedPath, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use keywarden_core::key_format::find_key;
use keywarden_core::model::TokenRecord;
use keywarden_core::role::Permission;
use keywarden_proto::ErrorCode;

use futures_util::future::{ready, BoxFuture, Either, Ready, Then};
use futures_util::FutureExt;

use crate::error::{error_response, respond, ApiError};
use crate::extract::{redact_quoted, secret_in_field};

/// The longest path and query read (hyper itself refuses request lines over 64 KiB).
pub const MAX_URI: usize = 8 * 1024;

/// The permission a route needs (by its template, as `MatchedPath` gives it). Handlers
/// check it again; this copy lets the check come before the extractors that read the
/// path, query and body. `None` for routes that decide for themselves.
pub fn permission(method: &Method, route: &str) -> Option<Permission> {
    use Permission::*;
    let write = !matches!(*method, Method::GET | Method::HEAD);
    let read_or_write = |read, write_p| if write { write_p } else { read };
    Some(match route {
        "/v1/keys" | "/v1/shadow-keys" => read_or_write(KeysRead, KeysWrite),
        "/v1/keys/{id}" | "/v1/keys/identify" => KeysRead,
        "/v1/keys/{id}/suspend"
        | "/v1/keys/{id}/resume"
        | "/v1/keys/{id}/revoke"
        | "/v1/keys/{id}/rotate" => KeysWrite,
        "/v1/keys/{id}/usage"
        | "/v1/keys/{id}/usage/stats"
        | "/v1/usage/stats"
        | "/v1/usage/search" => UsageRead,
        "/v1/verify" => Verify,
        "/v1/tokens" => read_or_write(TokensRead, TokensWrite),
        "/v1/tokens/{id}/revoke" => TokensWrite,
        "/v1/audit" | "/v1/audit/export" | "/v1/audit/chain" | "/v1/audit/checkpoints" => AuditRead,
        "/v1/usage/chain" | "/v1/usage/chain/export" => AuditRead,
        "/v1/audit/archives" | "/v1/audit/quarantine" => AuditArchive,
        "/v1/policy" => read_or_write(PolicyRead, PolicyWrite),
        "/v1/enforce/plan" | "/v1/policy/plan" => PolicyRead,
        "/v1/enforce" => PolicyWrite,
        "/v1/owners" => read_or_write(OwnersRead, OwnersWrite),
        "/v1/owners/{identity}" => OwnersRead,
        "/v1/owners/{identity}/disable" | "/v1/owners/{identity}/enable" => OwnersWrite,
        "/v1/services" | "/v1/services/{id}" => read_or_write(ServicesRead, ServicesWrite),
        "/v1/services/{id}/test" => ServicesWrite,
        "/v1/services/{id}/ack" | "/v1/events" => Events,
        "/v1/alerts" | "/v1/alerts/{seq}" => AlertsRead,
        "/v1/alerts/{seq}/ack" | "/v1/alerts/{seq}/resolve" => AlertsWrite,
        "/metrics" => MetricsRead,
        r if r.starts_with("/scim/") => Scim,
        _ => return None,
    })
}

/// Run as the caller is authenticated: the route's permission, then the URI.
pub(crate) fn before_handler(parts: &Parts, token: &TokenRecord) -> Result<(), ApiError> {
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    if let Some(p) = route.and_then(|r| permission(&parts.method, r)) {
        if !token.role.allows(p) {
            return Err(ApiError::Forbidden(format!(
                "role `{}` may not do this",
                token.role
            )));
        }
    }
    check_uri(&parts.uri, route)
}

/// Refuses a path segment or query parameter that holds one of our keys (naming the
/// parameter, never the value), and a path parameter that is not UTF-8 once decoded.
pub(crate) fn check_uri(uri: &Uri, route: Option<&str>) -> Result<(), ApiError> {
    let template: Vec<&str> = route.map(|r| r.split('/').collect()).unwrap_or_default();
    for (i, segment) in uri.path().split('/').enumerate() {
        let decoded = percent_decode(segment.as_bytes());
        let param = template
            .get(i)
            .and_then(|t| t.strip_prefix('{'))
            .map(|t| t.trim_start_matches('*').trim_end_matches('}'));
        if find_key(&decoded).is_some() {
            return Err(secret_in_field(param.unwrap_or("path"), "path segment"));
        }
        if let Some(name) = param {
            if std::str::from_utf8(&decoded).is_err() {
                return Err(ApiError::coded(
                    ErrorCode::InvalidPath,
                    format!("path parameter `{name}` is not UTF-8 once percent-decoded"),
                ));
            }
        }
    }
    if let Some(query) = uri.query() {
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if find_key(name.as_bytes()).is_some() {
                return Err(secret_in_field("query", "query parameter name"));
            }
            if find_key(value.as_bytes()).is_some() {
                let name: String = name.chars().take(64).collect();
                return Err(secret_in_field(&name, "query parameter"));
            }
        }
    }
    Ok(())
}

fn percent_decode(s: &[u8]) -> Cow<'_, [u8]> {
    if !s.contains(&b'%') {
        return Cow::Borrowed(s);
    }
    let hex = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        if b == b'%' {
            if let (Some(h), Some(l)) = (
                s.get(i + 1).copied().and_then(hex),
                s.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    Cow::Owned(out)
}

/// The URI as a log line may show it: unchanged, unless a key is in it (percent-encoded
/// or not), in which case each path segment and query parameter holding one becomes
/// `<redacted>`.
pub fn redact_uri(uri: &Uri) -> Cow<'_, str> {
    let whole = uri.path_and_query().map_or("/", |p| p.as_str());
    let is_key = |s: &str| find_key(&percent_decode(s.as_bytes())).is_some();
    if !is_key(whole) && uri.authority().is_none() {
        return Cow::Borrowed(whole);
    }
    let path = uri
        .path()
        .split('/')
        .map(|seg| if is_key(seg) { "<redacted>" } else { seg })
        .collect::<Vec<_>>()
        .join("/");
    let mut out = path;
    if let Some(query) = uri.query() {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                _ if !is_key(pair) => pair.to_owned(),
                Some((name, _)) if !is_key(name) => format!("{name}=<redacted>"),
                _ => "<redacted>".to_owned(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    Cow::Owned(out)
}

/// Layer over every route and fallback: refuses a URI longer than [`MAX_URI`], and turns
/// any error answer that is not our JSON (axum's plain-text rejections: a path that is
/// not UTF-8, a body over the limit, a query SCIM cannot read) into one. A plain tower
/// service rather than `middleware::from_fn`, which boxes every request's service and
/// future: a successful answer passes through with no allocation.
#[derive(Clone, Copy, Debug)]
pub struct JsonErrorsLayer;

impl<S> tower::Layer<S> for JsonErrorsLayer {
    type Service = JsonErrors<S>;

    fn layer(&self, inner: S) -> JsonErrors<S> {
        JsonErrors { inner }
    }
}

#[derive(Clone, Debug)]
pub struct JsonErrors<S> {
    inner: S,
}

type Answer = Result<Response, Infallible>;
type Finished = Either<Ready<Answer>, BoxFuture<'static, Answer>>;

impl<S> tower::Service<Request> for JsonErrors<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Answer>, Then<S::Future, Finished, fn(Answer) -> Finished>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let too_long = req
            .uri()
            .path_and_query()
            .is_some_and(|p| p.as_str().len() > MAX_URI);
        if too_long {
            return Either::Left(ready(Ok(error_response(
                ErrorCode::UriTooLong,
                format!("the path and query are longer than {MAX_URI} bytes"),
                vec![],
            ))));
        }
        let finish: fn(Answer) -> Finished = if req.uri().path().starts_with("/scim/") {
            |answer| finish(answer, true)
        } else {
            |answer| finish(answer, false)
        };
        Either::Right(self.inner.call(req).then(finish))
    }
}

fn finish(answer: Answer, scim: bool) -> Finished {
    let resp = match answer {
        Ok(resp) => resp,
        Err(never) => match never {},
    };
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return Either::Left(ready(Ok(resp)));
    }
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let ours = content_type.starts_with("application/json");
    if (!scim && ours) || content_type.starts_with("application/scim+json") {
        return Either::Left(ready(Ok(resp)));
    }
    Either::Right(Box::pin(async move { Ok(rewrite(resp, scim, ours).await) }))
}

/// An error answer in our JSON shape (or SCIM's), keeping its status, what its text said
/// (quoted values left out) and its other headers.
async fn rewrite(resp: Response, scim: bool, ours: bool) -> Response {
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, 16 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    };
    let message = if ours {
        // Our own error body, read again to say it in SCIM's shape.
        serde_json::from_str::<keywarden_proto::ErrorBody>(&text)
            .map(|b| b.error.message)
            .unwrap_or_default()
    } else {
        // axum's texts say what was wrong; a value quoted in them is not repeated.
        redact_quoted(text.trim()).chars().take(512).collect()
    };
    let (code, default) = describe(status);
    let message = if message.trim().is_empty() {
        default.to_owned()
    } else {
        message
    };
    let mut out = if scim {
        scim_error(status, message)
    } else {
        respond(status, code, message, vec![])
    };
    // Keep what the answer said besides its body (Allow, Retry-After, request id).
    for (name, value) in &parts.headers {
        if name != CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// The code and a default message for an error status that came without our body.
fn describe(status: StatusCode) -> (ErrorCode, &'static str) {
    match status {
        StatusCode::UNAUTHORIZED => (ErrorCode::Unauthenticated, "authentication required"),
        StatusCode::FORBIDDEN => (ErrorCode::Forbidden, "not allowed"),
        StatusCode::NOT_FOUND => (ErrorCode::RouteNotFound, "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => (
            ErrorCode::MethodNotAllowed,
            "method not allowed on this route",
        ),
        StatusCode::REQUEST_TIMEOUT => (ErrorCode::RequestTimeout, "the request took too long"),
        StatusCode::PAYLOAD_TOO_LARGE => (ErrorCode::BodyTooLarge, "the request body is too large"),
        StatusCode::URI_TOO_LONG => (ErrorCode::UriTooLong, "the URI is too long"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            (ErrorCode::UnsupportedMediaType, "unsupported content type")
        }
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            ErrorCode::HeadersTooLarge,
            "the request headers are too large",
        ),
        StatusCode::SERVICE_UNAVAILABLE => (ErrorCode::Unavailable, "unavailable; try again"),
        s if s.is_server_error() => (ErrorCode::Internal, "internal error"),
        _ => (ErrorCode::InvalidRequest, "the request could not be read"),
    }
}

/// An error in SCIM's shape (RFC 7644 §3.12).
fn scim_error(status: StatusCode, detail: String) -> Response {
    let mut body = serde_json::json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
        "status": status.as_u16().to_string(),
        "detail": detail,
    });
    if status == StatusCode::BAD_REQUEST {
        body["scimType"] = serde_json::json!("invalidValue");
    }
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/scim+json"),
    );
    resp
}

/// Request spans for the per-request trace layer: method, URI (keys redacted) and
/// version; never headers.
#[derive(Clone, Copy, Debug)]
pub struct RedactedSpan;

impl<B> tower_http::trace::MakeSpan<B> for RedactedSpan {
    fn make_span(&mut self, req: &axum::http::Request<B>) -> tracing::Span {
        tracing::debug_span!(
            "request",
            method = %req.method(),
            uri = %redact_uri(req.uri()),
            version = ?req.version(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        keywarden_core::key_format::generate(&mut rand::rngs::OsRng, "kw", "prod")
            .unwrap()
            .plain
            .expose()
            .to_owned()
    }

    #[test]
    fn uris_with_keys_are_redacted_for_logs() {
        let k = key();
        let enc = k.replace('_', "%5F");
        for (uri, expected) in [
            ("/v1/keys?limit=5".to_owned(), "/v1/keys?limit=5".to_owned()),
            (
                format!("/v1/owners/{k}/disable"),
                "/v1/owners/<redacted>/disable".to_owned(),
            ),
            (
                format!("/v1/owners/x{enc}"),
                "/v1/owners/<redacted>".to_owned(),
            ),
            (
                format!("/v1/keys?owner={enc}&limit=5"),
                "/v1/keys?owner=<redacted>&limit=5".to_owned(),
            ),
            (format!("/v1/keys?{k}=1"), "/v1/keys?<redacted>".to_owned()),
        ] {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(redact_uri(&uri), expected);
        }
    }

    #[test]
    fn path_and_query_checks_name_the_parameter() {
        let k = key();
        let field = |e: ApiError| match e {
            ApiError::Validation(v) => v[0].field.clone(),
            other => other.code().as_str().to_owned(),
        };
        let check = |uri: String, route: Option<&str>| {
            check_uri(&uri.parse::<Uri>().unwrap(), route).map_err(field)
        };
        assert_eq!(
            check(format!("/v1/owners/{k}"), Some("/v1/owners/{identity}")),
            Err("identity".to_owned())
        );
        assert_eq!(
            check(format!("/v1/nothing/{k}"), None),
            Err("path".to_owned())
        );
        assert_eq!(
            check(
                format!("/v1/keys?owner={}", k.replace('_', "%5F")),
                Some("/v1/keys")
            ),
            Err("owner".to_owned())
        );
        assert_eq!(
            check("/v1/keys?owner=a%40b".to_owned(), Some("/v1/keys")),
            Ok(())
        );
        assert!(check("/v1/keys/%FF".to_owned(), Some("/v1/keys/{id}"))
            .unwrap_err()
            .eq("INVALID_PATH"));
    }
}
