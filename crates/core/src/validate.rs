//! Validation of the free-form fields of a key request. Every failure names its field so
//! the API can report all of them at once.

use std::collections::BTreeMap;

use crate::key_format::{is_valid_env_tag, ADMIN_ENV};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

fn is_label(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// Names of keys and tokens: 1-64 of `[A-Za-z0-9._-]`, starting alphanumeric.
pub fn name(field: &str, s: &str) -> Result<(), FieldError> {
    if is_label(s, 64, b"._-") {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "1-64 characters of letters, digits, `.`, `_` or `-`, starting with a letter or digit",
        ))
    }
}

/// Systems a key touches, e.g. `github`, `k8s-prod`, `db.orders`.
pub fn system(s: &str) -> Result<(), FieldError> {
    if is_label(s, 64, b"._-/") {
        Ok(())
    } else {
        Err(FieldError::new(
            "systems",
            format!(
                "invalid system {:?}: 1-64 of letters, digits, `.`, `_`, `-`, `/`",
                trunc(s)
            ),
        ))
    }
}

/// A person's display name: free text, 1-128 characters, no control characters.
pub fn display_name(field: &str, s: &str) -> Result<(), FieldError> {
    let n = s.chars().count();
    if (1..=128).contains(&n) && !s.trim().is_empty() && !s.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "1-128 characters, not only spaces, no control characters",
        ))
    }
}

/// The one spelling of an owner identity that keywarden stores and compares: identities
/// are ASCII (see [`owner`]) and compare case-insensitively, as e-mail addresses and SCIM
/// userNames do in practice, so `Dora@Example.com` and `dora@example.com` are one person
/// (offboarding one must take the keys of both spellings).
pub fn canonical_owner(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// An owner identity: an e-mail address or a user name.
pub fn owner(s: &str) -> Result<(), FieldError> {
    if is_label(s, 254, b"._-+@") && s.matches('@').count() <= 1 && !s.ends_with('@') {
        Ok(())
    } else {
        Err(FieldError::new(
            "owner",
            "an identity such as an e-mail address: 1-254 of letters, digits, `.`, `_`, `-`, `+`, one `@`",
        ))
    }
}

pub fn environment(s: &str) -> Result<(), FieldError> {
    if !is_valid_env_tag(s) {
        return Err(FieldError::new(
            "environment",
            "1-16 lowercase letters, digits and inner hyphens (e.g. staging-eu)",
        ));
    }
    if s == ADMIN_ENV {
        return Err(FieldError::new(
            "environment",
            "`admin` is reserved for keywarden's own admin tokens",
        ));
    }
    Ok(())
}

pub fn description(s: &str) -> Result<(), FieldError> {
    if s.len() > 1024 || s.chars().any(|c| c.is_control() && c != '\n') {
        Err(FieldError::new(
            "description",
            "at most 1024 characters, no control characters",
        ))
    } else {
        Ok(())
    }
}

pub fn metadata(m: &BTreeMap<String, String>) -> Result<(), FieldError> {
    if m.len() > 32 {
        return Err(FieldError::new("metadata", "at most 32 entries"));
    }
    for (k, v) in m {
        if !is_label(k, 64, b"._-") {
            return Err(FieldError::new(
                "metadata",
                format!(
                    "invalid metadata key {:?}: 1-64 of letters, digits, `.`, `_`, `-`",
                    trunc(k)
                ),
            ));
        }
        if v.len() > 512 || v.chars().any(char::is_control) {
            return Err(FieldError::new(
                "metadata",
                format!("metadata value of {k:?}: at most 512 characters, no control characters"),
            ));
        }
    }
    Ok(())
}

fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners() {
        assert!(owner("alice@example.com").is_ok());
        assert!(owner("svc-ci").is_ok());
        assert!(owner("a@b@c").is_err());
        assert!(owner("").is_err());
        assert!(owner("alice@").is_err());
    }

    #[test]
    fn environments() {
        assert!(environment("prod").is_ok());
        assert!(environment("admin").is_err());
        assert!(environment("Prod").is_err());
        assert!(environment("production").is_ok());
        assert!(environment("stage01").is_ok());
        assert!(environment("staging-eu").is_ok());
        assert!(environment("pre-prod").is_ok());
        assert!(environment("sandbox2eu").is_ok());
        assert!(environment("sixteen-chars-ok").is_ok());
        assert!(environment("seventeen-chars-x").is_err());
        assert!(environment("-prod").is_err());
        assert!(environment("prod-").is_err());
        assert!(environment("pre--prod").is_err());
        assert!(environment("pre_prod").is_err());
    }
}
