pub mod alerts;
pub mod audit;
pub mod discovery;
pub mod events;
pub mod gateway;
pub mod health;
pub mod keys;
pub mod metrics;
pub mod owners;
pub mod policy;
pub mod scim;
pub mod services;
pub mod tokens;
pub mod usage;
pub mod usage_chain;
pub mod verify;

use keywarden_core::model::{Actor, AuditEntry};
use keywarden_core::KeyId;
use keywarden_proto::ErrorCode;
use time::OffsetDateTime;

use crate::error::ApiError;

pub fn parse_key_id(id: &str) -> Result<KeyId, ApiError> {
    KeyId::parse(id).map_err(|_| {
        ApiError::coded(
            ErrorCode::KeyIdInvalid,
            "key ids are 16 base62 characters, e.g. 7Hq2Lx9aKf3Tzp1M",
        )
    })
}

pub fn audit(
    actor: Actor,
    time: OffsetDateTime,
    action: &str,
    target: String,
    reason: Option<String>,
    details: serde_json::Value,
) -> AuditEntry {
    AuditEntry {
        time,
        actor,
        action: action.to_owned(),
        target,
        reason,
        details: details.to_string(),
    }
}

/// A free-text reason: bounded and without control characters.
pub fn reason(r: Option<String>) -> Result<Option<String>, ApiError> {
    match r {
        Some(r) if r.len() > 512 || r.chars().any(char::is_control) => Err(ApiError::invalid(
            ErrorCode::FieldInvalid,
            "reason",
            "at most 512 characters, no control characters",
        )),
        Some(r) if r.trim().is_empty() => Ok(None),
        other => Ok(other),
    }
}

pub fn parse_cursor(c: Option<&str>) -> Result<Option<i64>, ApiError> {
    c.map(|c| {
        c.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::coded(
                ErrorCode::InvalidCursor,
                "cursor must come from a previous page's next_cursor",
            )
        })
    })
    .transpose()
}

pub fn parse_limit(l: Option<u32>) -> Result<u32, ApiError> {
    match l {
        None => Ok(100),
        Some(n @ 1..=1000) => Ok(n),
        Some(_) => Err(ApiError::coded(
            ErrorCode::InvalidQuery,
            "limit must be between 1 and 1000",
        )),
    }
}
