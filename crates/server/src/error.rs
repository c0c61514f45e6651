//! The one API error type: every failure maps to a status and a stable code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keywarden_proto::{codes, ErrorBody, ErrorDetail, Violation};
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
    Coded {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    #[error("request has {} invalid field(s)", .0.len())]
    Validation(Vec<Violation>),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    Conflict(String),
    #[error("storage failed")]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::Coded {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(code: &str, field: &str, message: impl Into<String>) -> Self {
        Self::Validation(vec![violation(code, field, message)])
    }

    /// The status this error answers with (the same table as `into_response`).
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::KeyNotFound(_) | Self::TokenNotFound(_) => StatusCode::NOT_FOUND,
            Self::Coded { status, .. } => *status,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InvalidState(_) | Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Store(StoreError::Database(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

pub fn violation(code: &str, field: &str, message: impl Into<String>) -> Violation {
    Violation {
        code: code.to_owned(),
        field: field.to_owned(),
        message: message.into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, violations) = match self {
            Self::Unauthenticated(m) => (
                StatusCode::UNAUTHORIZED,
                codes::UNAUTHENTICATED,
                m.to_owned(),
                vec![],
            ),
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, codes::FORBIDDEN, m, vec![]),
            Self::KeyNotFound(id) => (
                StatusCode::NOT_FOUND,
                codes::KEY_NOT_FOUND,
                format!("no key with id {id}"),
                vec![],
            ),
            Self::TokenNotFound(id) => (
                StatusCode::NOT_FOUND,
                codes::TOKEN_NOT_FOUND,
                format!("no token with id {id}"),
                vec![],
            ),
            Self::Coded {
                status,
                code,
                message,
            } => (status, code, message, vec![]),
            Self::Validation(v) => {
                let code = match v.as_slice() {
                    [one] => one.code.clone(),
                    _ => codes::VALIDATION_FAILED.to_owned(),
                };
                let message = v
                    .iter()
                    .map(|x| format!("{}: {}", x.field, x.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                return error_response(StatusCode::UNPROCESSABLE_ENTITY, code, message, v);
            }
            Self::InvalidState(m) => (StatusCode::CONFLICT, codes::INVALID_STATE, m, vec![]),
            Self::Conflict(m) => (StatusCode::CONFLICT, codes::CONFLICT, m, vec![]),
            Self::Store(e) => {
                // The store never sees a secret (only keyed hashes), so its errors are safe to log.
                tracing::error!(error = %e, "store operation failed");
                match e {
                    StoreError::AuditPastHead { .. } => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        codes::AUDIT_TRAIL_TAMPERED,
                        e.to_string(),
                        vec![],
                    ),
                    StoreError::Database(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        codes::STORE_UNAVAILABLE,
                        "the key store is unavailable; nothing was changed".to_owned(),
                        vec![],
                    ),
                    _ => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        codes::INTERNAL,
                        "internal error; see the server log".to_owned(),
                        vec![],
                    ),
                }
            }
        };
        error_response(status, code.to_owned(), message, violations)
    }
}

pub fn error_response(
    status: StatusCode,
    code: impl Into<String>,
    message: String,
    violations: Vec<Violation>,
) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message,
            violations,
        },
    };
    (status, Json(body)).into_response()
}
