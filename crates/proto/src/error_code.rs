//! Every error code the API answers with, and its HTTP status: one table, from which the
//! server takes both, the OpenAPI document lists them, and `docs/errors.md` is checked.

use std::borrow::Cow;
use std::fmt;

use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;

macro_rules! error_codes {
    ($( $(#[doc = $doc:literal])+ $variant:ident = $text:literal, $status:literal; )+) => {
        /// A stable machine-readable error code, the `code` of every error answer.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[doc = $doc])+ $variant, )+
        }

        impl ErrorCode {
            /// Every code, in the order of the table.
            pub const ALL: &'static [ErrorCode] = &[$(Self::$variant),+];

            /// The code as it is written on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            /// The HTTP status an answer with this code has.
            pub const fn status(self) -> u16 {
                match self {
                    $(Self::$variant => $status,)+
                }
            }

            /// What the code means, as its documentation says.
            pub fn description(self) -> &'static str {
                match self {
                    $(Self::$variant => concat!($($doc),+).trim_start(),)+
                }
            }
        }
    };
}

error_codes! {
    /// No admin token, or one that is unknown, expired or revoked.
    Unauthenticated = "UNAUTHENTICATED", 401;
    /// The token's role or environments do not allow this.
    Forbidden = "FORBIDDEN", 403;
    /// No key with this id.
    KeyNotFound = "KEY_NOT_FOUND", 404;
    /// No admin token with this id.
    TokenNotFound = "TOKEN_NOT_FOUND", 404;
    /// No such route.
    RouteNotFound = "ROUTE_NOT_FOUND", 404;
    /// The route does not take this method.
    MethodNotAllowed = "METHOD_NOT_ALLOWED", 405;
    /// The body is not JSON.
    MalformedJson = "MALFORMED_JSON", 400;
    /// The body is JSON of the wrong shape, or could not be read.
    InvalidBody = "INVALID_BODY", 400;
    /// The body has a field the request does not take.
    UnknownField = "UNKNOWN_FIELD", 400;
    /// The body is not `application/json`.
    UnsupportedMediaType = "UNSUPPORTED_MEDIA_TYPE", 415;
    /// A field, path segment or query parameter holds one of our keys (or admin tokens).
    /// The answer names the field, never the value.
    SecretInField = "SECRET_IN_FIELD", 422;
    /// A path segment is not valid percent-encoded UTF-8.
    InvalidPath = "INVALID_PATH", 400;
    /// The request line's URI is longer than the server reads (8 KiB).
    UriTooLong = "URI_TOO_LONG", 414;
    /// A request the server could not read, refused before any route saw it (400, or
    /// the other 4xx status the HTTP layer refused it with).
    InvalidRequest = "INVALID_REQUEST", 400;
    /// The request took too long to arrive.
    RequestTimeout = "REQUEST_TIMEOUT", 408;
    /// The request's headers are larger than the server reads.
    HeadersTooLarge = "HEADERS_TOO_LARGE", 431;
    /// The server cannot take the request now (overloaded or shutting down).
    Unavailable = "UNAVAILABLE", 503;
    /// The body is larger than 64 KiB.
    BodyTooLarge = "BODY_TOO_LARGE", 413;
    /// A query parameter is not valid.
    InvalidQuery = "INVALID_QUERY", 400;
    /// The pagination cursor is not valid.
    InvalidCursor = "INVALID_CURSOR", 400;
    /// Several fields are invalid; `violations` names each.
    ValidationFailed = "VALIDATION_FAILED", 422;
    /// A scope is not valid.
    ScopeInvalid = "SCOPE_INVALID", 422;
    /// A CIDR is not valid.
    CidrInvalid = "CIDR_INVALID", 422;
    /// A duration is not valid.
    DurationInvalid = "DURATION_INVALID", 422;
    /// The lifetime asked for is longer than the policy allows.
    TtlTooLong = "TTL_TOO_LONG", 422;
    /// A field is not valid.
    FieldInvalid = "FIELD_INVALID", 422;
    /// A key id in the path is not valid.
    KeyIdInvalid = "KEY_ID_INVALID", 400;
    /// The key's state does not allow this change.
    InvalidState = "INVALID_STATE", 409;
    /// The change conflicts with what is stored; nothing was changed.
    Conflict = "CONFLICT", 409;
    /// The key store cannot be reached or written (or verify cannot record its usage
    /// event); nothing was changed. Retry after the `Retry-After` seconds.
    StoreUnavailable = "STORE_UNAVAILABLE", 503;
    /// The key store is busy with other writers; nothing was changed. Retry after the
    /// `Retry-After` seconds.
    StoreBusy = "STORE_BUSY", 503;
    /// Stored data does not decode; the server log says which.
    StoreCorrupt = "STORE_CORRUPT", 500;
    /// An internal error; the server log says which (500, or the other 5xx status the
    /// HTTP layer answered with).
    Internal = "INTERNAL", 500;
    /// No live audit entry with this seq.
    AuditEntryNotFound = "AUDIT_ENTRY_NOT_FOUND", 404;
    /// The archive does not match the audit trail it claims to hold.
    ArchiveMismatch = "ARCHIVE_MISMATCH", 409;
    /// The environment's policy requires the owner to be registered first.
    PolicyOwnerNotRegistered = "POLICY_OWNER_NOT_REGISTERED", 422;
    /// Rows past the audit trail's recorded head: audited writes are refused until
    /// `POST /v1/audit/quarantine` moves them out.
    AuditTrailTampered = "AUDIT_TRAIL_TAMPERED", 500;
    /// The policy does not parse or is not valid.
    PolicyInvalid = "POLICY_INVALID", 422;
    /// The environment's policy requires an owner.
    PolicyOwnerRequired = "POLICY_OWNER_REQUIRED", 422;
    /// The environment's policy requires the systems the key touches.
    PolicySystemsRequired = "POLICY_SYSTEMS_REQUIRED", 422;
    /// The environment's policy forbids wildcard scopes.
    PolicyWildcardForbidden = "POLICY_WILDCARD_FORBIDDEN", 422;
    /// A scope is outside the environment's allowed scopes.
    PolicyScopeNotAllowed = "POLICY_SCOPE_NOT_ALLOWED", 422;
    /// The environment's policy requires a CIDR allowlist.
    PolicyCidrsRequired = "POLICY_CIDRS_REQUIRED", 422;
    /// The environment's policy requires a usage cap.
    PolicyMaxUsesRequired = "POLICY_MAX_USES_REQUIRED", 422;
    /// The usage cap is above the environment's `max_uses_limit`.
    PolicyMaxUsesTooHigh = "POLICY_MAX_USES_TOO_HIGH", 422;
    /// The environment's policy requires a rate limit.
    PolicyRateLimitRequired = "POLICY_RATE_LIMIT_REQUIRED", 422;
    /// The rate limit is above the environment's `max_rate_limit`.
    PolicyRateLimitTooHigh = "POLICY_RATE_LIMIT_TOO_HIGH", 422;
    /// No owner with this identity.
    OwnerNotFound = "OWNER_NOT_FOUND", 404;
    /// The owner is disabled.
    OwnerDisabled = "OWNER_DISABLED", 422;
    /// No alert with this id.
    AlertNotFound = "ALERT_NOT_FOUND", 404;
    /// No service with this id.
    ServiceNotFound = "SERVICE_NOT_FOUND", 404;
    /// The webhook URL is not valid or not allowed.
    WebhookUrlInvalid = "WEBHOOK_URL_INVALID", 422;
    /// `/v1/auth`: the gateway map has no route for the request.
    RouteNotMapped = "ROUTE_NOT_MAPPED", 403;
    /// `/v1/auth`: the headers the caller's gateway kind carries the client's method and
    /// URI in are missing.
    GatewayHeadersMissing = "GATEWAY_HEADERS_MISSING", 403;
    /// `/v1/auth`: those headers are sent twice, too long or unreadable.
    GatewayHeadersInvalid = "GATEWAY_HEADERS_INVALID", 403;
    /// `/v1/auth`: the caller has no gateway kind, and the map decides by path.
    GatewayUnknown = "GATEWAY_UNKNOWN", 403;
    /// `/v1/auth`: the path is spelled in a way that is refused (dot segments, encoded
    /// separators, another route's spelling).
    PathRejected = "PATH_REJECTED", 403;
    /// `/v1/auth`: the client presented no key.
    KeyMissing = "KEY_MISSING", 401;
}

impl ErrorCode {
    /// The code written as `text`, if it is one.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_str() == text)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Built from the table: the codes as an enum, and each one's status and meaning in the
/// description (OpenAPI has no place for a status per enum value).
impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> RefOr<Schema> {
        let mut description = String::from(
            "A stable machine-readable code. Each code comes with the HTTP status shown \
             here:\n",
        );
        for c in Self::ALL {
            description.push_str(&format!(
                "\n- `{}` ({}): {}",
                c.as_str(),
                c.status(),
                c.description()
            ));
        }
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .enum_values(Some(Self::ALL.iter().map(|c| c.as_str())))
            .description(Some(description))
            .into()
    }
}

impl utoipa::ToSchema for ErrorCode {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ErrorCode")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_screaming_snake_case_with_error_statuses() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            let text = c.as_str();
            assert!(seen.insert(text), "{text} twice");
            assert!(
                text.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{text}"
            );
            assert!((400..600).contains(&c.status()), "{text}: {}", c.status());
            assert!(!c.description().is_empty(), "{text}");
            assert_eq!(ErrorCode::parse(text), Some(*c));
        }
        assert_eq!(ErrorCode::parse("NOPE"), None);
    }
}
