//! The one API error type: every failure maps to a code, and the code to its status
//! ([`ErrorCode`], one table in `keywarden-proto`).

use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keywarden_proto::{ErrorBody, ErrorCode, ErrorDetail, Violation};
use keywarden_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("no key with id {0}")]
    KeyNotFound(String),
    #[error("no token with id {0}")]
    TokenNotFound(String),
    #[error("{message}")]
    Coded { code: ErrorCode, message: String },
    #[error("request has {} invalid field(s)", .0.len())]
    Validation(Vec<Violation>),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    Conflict(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A failure of the server's own, not the store's: an export that cannot be written,
    /// a signing secret that cannot be derived, a stored policy that no longer parses.
    /// The text goes to the log; the client is told only that it failed.
    #[error("{0}")]
    Internal(String),
}

/// The kind of store error an answer was made from, in its extensions, for the store
/// error count of [`crate::errlog`].
#[derive(Debug, Clone, Copy)]
pub struct StoreFailure(pub keywarden_store::StoreErrorKind);

/// Why a 5xx answer failed, put in the response's extensions for the line the
/// [`crate::errlog`] layer writes; never in the body. It holds no secret: the store sees
/// only keyed hashes, and the server's own failures name what failed, not the values.
#[derive(Debug, Clone)]
pub struct ErrorCause {
    pub code: ErrorCode,
    /// What failed, when the error knows more than its code.
    pub detail: Option<String>,
}

impl ApiError {
    pub fn coded(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Coded {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(code: ErrorCode, field: &str, message: impl Into<String>) -> Self {
        Self::Validation(vec![violation(code, field, message)])
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::Internal(detail.into())
    }

    /// The code this error answers with; its status comes with it.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::KeyNotFound(_) => ErrorCode::KeyNotFound,
            Self::TokenNotFound(_) => ErrorCode::TokenNotFound,
            Self::Coded { code, .. } => *code,
            // One invalid field answers with its own code, several with the summary.
            Self::Validation(v) => match v.as_slice() {
                [one] => ErrorCode::parse(&one.code).unwrap_or(ErrorCode::ValidationFailed),
                _ => ErrorCode::ValidationFailed,
            },
            Self::InvalidState(_) => ErrorCode::InvalidState,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::Store(e) => store_code(e),
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        status_of(self.code())
    }

    /// What a client may be told: store and internal failures say what kind of failure
    /// it was, not the driver's text.
    pub fn public_message(&self) -> String {
        match self {
            Self::Store(e @ StoreError::AuditPastHead { .. }) => e.to_string(),
            Self::Store(e) => match store_code(e) {
                ErrorCode::StoreUnavailable => {
                    "the key store is unavailable; nothing was changed".to_owned()
                }
                ErrorCode::StoreBusy => {
                    "the key store is busy; nothing was changed; try again".to_owned()
                }
                ErrorCode::Conflict => {
                    "the change conflicts with stored data; nothing was changed".to_owned()
                }
                ErrorCode::StoreCorrupt => "stored data is invalid; see the server log".to_owned(),
                _ => "internal error; see the server log".to_owned(),
            },
            Self::Internal(_) => "internal error; see the server log".to_owned(),
            Self::KeyNotFound(id) => format!("no key with id {id}"),
            Self::TokenNotFound(id) => format!("no token with id {id}"),
            Self::Validation(v) => v
                .iter()
                .map(|x| format!("{}: {}", x.field, x.message))
                .collect::<Vec<_>>()
                .join("; "),
            other => other.to_string(),
        }
    }

    /// The store error this answers, if it is one.
    pub fn store_failure(&self) -> Option<StoreFailure> {
        match self {
            Self::Store(e) => Some(StoreFailure(e.kind())),
            _ => None,
        }
    }

    /// What the log line of a 5xx answer says about it; `None` for other answers.
    pub fn cause(&self) -> Option<ErrorCause> {
        let code = self.code();
        if !status_of(code).is_server_error() {
            return None;
        }
        let detail = match self {
            Self::Store(_) | Self::Internal(_) => Some(self.to_string()),
            Self::Coded { message, .. } => Some(message.clone()),
            _ => None,
        };
        Some(ErrorCause { code, detail })
    }
}

/// Store errors by kind; every variant is named, so a new kind needs a decision here.
fn store_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::Unavailable(_) => ErrorCode::StoreUnavailable,
        StoreError::Busy(_) => ErrorCode::StoreBusy,
        StoreError::Conflict(_) => ErrorCode::Conflict,
        StoreError::Corrupt(_) => ErrorCode::StoreCorrupt,
        StoreError::AuditPastHead { .. } => ErrorCode::AuditTrailTampered,
        StoreError::Migrate(_) | StoreError::UnsupportedUrl | StoreError::Internal(_) => {
            ErrorCode::Internal
        }
    }
}

/// The status of `code`, from the table.
pub fn status_of(code: ErrorCode) -> StatusCode {
    // The table's statuses are all valid (a test in the proto crate checks the range).
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

pub fn violation(code: ErrorCode, field: &str, message: impl Into<String>) -> Violation {
    Violation {
        code: code.as_str().to_owned(),
        field: field.to_owned(),
        message: message.into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.code();
        let message = self.public_message();
        let cause = self.cause();
        let store = self.store_failure();
        let violations = match self {
            Self::Validation(v) => v,
            _ => Vec::new(),
        };
        let mut resp = error_response(code, message, violations);
        if let Some(cause) = cause {
            resp.extensions_mut().insert(cause);
        }
        if let Some(store) = store {
            resp.extensions_mut().insert(store);
        }
        resp
    }
}

/// An error answer with `code`'s status.
pub fn error_response(code: ErrorCode, message: String, violations: Vec<Violation>) -> Response {
    respond(status_of(code), code, message, violations)
}

/// An error answer with a status of its own: for statuses the HTTP layer chose, which
/// only the catch-all codes (`INVALID_REQUEST`, `INTERNAL`) stand for.
pub(crate) fn respond(
    status: StatusCode,
    code: ErrorCode,
    message: String,
    violations: Vec<Violation>,
) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.as_str().to_owned(),
            message,
            violations,
        },
    };
    let mut resp = (status, Json(body)).into_response();
    if let Some(secs) = retry_after(code) {
        resp.headers_mut().insert(RETRY_AFTER, secs);
    }
    resp
}

/// When a client should try again: a busy store frees up within a second; an
/// unavailable one needs longer than a client should hammer it.
fn retry_after(code: ErrorCode) -> Option<HeaderValue> {
    match code {
        ErrorCode::StoreBusy => Some(HeaderValue::from_static("1")),
        ErrorCode::StoreUnavailable => Some(HeaderValue::from_static("5")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use keywarden_core::policy::{check_issue, KeyAsk, Policy};
    use keywarden_core::scope::Scope;

    use super::*;

    #[test]
    fn every_status_in_the_table_is_an_http_status() {
        for code in ErrorCode::ALL {
            let status = StatusCode::from_u16(code.status()).unwrap();
            assert_eq!(status_of(*code), status, "{code}");
        }
    }

    /// Key issue passes the policy's own codes through as violations: each is in the
    /// table, so the answer's code and status come from it like every other.
    #[test]
    fn policy_codes_are_in_the_table() {
        let mut rules = Policy::default().rules_for("prod").clone();
        rules.require_owner = true;
        rules.require_systems = true;
        rules.forbid_wildcards = true;
        rules.allowed_scopes = Some(vec![Scope::granted("deploy:write").unwrap()]);
        rules.require_cidrs = true;
        rules.max_uses_limit = Some(10);
        rules.max_rate_limit = Some("1/s".parse().unwrap());
        let scopes = [
            Scope::granted("db:*").unwrap(),
            Scope::granted("db:read").unwrap(),
        ];
        let mut seen = Vec::new();
        for (max_uses, rate_limit) in [(None, None), (Some(11), Some("2/s".parse().unwrap()))] {
            let ask = KeyAsk {
                owner: " ",
                systems: &[],
                scopes: &scopes,
                ttl: rules.max_ttl + time::Duration::days(1),
                has_cidrs: false,
                max_uses,
                rate_limit,
            };
            seen.extend(check_issue(&rules, &ask).into_iter().map(|v| v.code));
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 10, "every rule broken once: {seen:?}");
        for code in seen {
            let known = ErrorCode::parse(code).unwrap_or_else(|| panic!("{code} not in the table"));
            assert_eq!(known.status(), 422, "{code}");
        }
    }

    /// A failure of the server's own answers 500 INTERNAL; what failed goes into the
    /// response's extensions for the log line, not into the body.
    #[tokio::test]
    async fn internal_errors_keep_their_detail_out_of_the_body() {
        let resp = ApiError::internal("audit export: csv writer failed").into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let cause = resp.extensions().get::<ErrorCause>().cloned().unwrap();
        assert_eq!(cause.code, ErrorCode::Internal);
        assert_eq!(
            cause.detail.as_deref(),
            Some("audit export: csv writer failed")
        );
        let body = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.contains("\"INTERNAL\""), "{body}");
        assert!(!body.contains("csv"), "{body}");

        let resp = ApiError::invalid(ErrorCode::FieldInvalid, "name", "empty").into_response();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(resp.extensions().get::<ErrorCause>().is_none());
    }
}
