//! What a scan reports. The secret itself is kept for matching and `--show-secrets`, but
//! never printed by `Debug` and never serialised except on request.

use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::detect::{Detector, Match, OwnKey};
use crate::rules::Severity;

/// Where a secret was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum Location {
    File {
        path: String,
    },
    Stdin,
    Env {
        name: String,
    },
    Git {
        commit: String,
        author: String,
        date: String,
        path: String,
    },
    Image {
        image: String,
        layer: String,
        path: String,
    },
}

impl Location {
    /// A path-like name: what SARIF calls the artifact, and what baselines and path
    /// allowlists match.
    pub fn artifact(&self) -> String {
        match self {
            Self::File { path } => path.clone(),
            Self::Stdin => "-".to_owned(),
            Self::Env { name } => format!("env:{name}"),
            Self::Git { path, .. } => path.clone(),
            Self::Image { layer, path, .. } => format!("{layer}/{path}"),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path } => f.write_str(path),
            Self::Stdin => f.write_str("(stdin)"),
            Self::Env { name } => write!(f, "environment variable {name}"),
            Self::Git {
                commit,
                author,
                date,
                path,
            } => write!(
                f,
                "{path} in commit {} by {author} on {date}",
                &commit[..commit.len().min(12)]
            ),
            Self::Image { image, layer, path } => write!(f, "{image} layer {layer}: {path}"),
        }
    }
}

#[derive(Clone, Serialize)]
pub struct Finding {
    pub rule: String,
    pub description: String,
    pub severity: Severity,
    pub location: Location,
    pub line: usize,
    pub column: usize,
    /// First and last characters only.
    pub redacted: String,
    /// SHA-256 of the secret, hex: to recognise it again (baselines, the inventory's
    /// shadow keys) without keeping it.
    pub fingerprint: String,
    /// Set when the secret is one of keywarden's own keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keywarden_key: Option<OwnKey>,
    #[serde(skip)]
    pub secret: String,
}

impl fmt::Debug for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Finding")
            .field("rule", &self.rule)
            .field("location", &self.location)
            .field("line", &self.line)
            .field("redacted", &self.redacted)
            .finish_non_exhaustive()
    }
}

impl Finding {
    pub fn new(d: &Detector, m: Match, location: Location) -> Self {
        let (rule, description, severity) = d.describe(m.rule);
        Self {
            rule: rule.to_owned(),
            description: description.to_owned(),
            severity,
            location,
            line: m.line,
            column: m.column,
            redacted: redact(&m.secret, m.own.as_ref()),
            fingerprint: fingerprint(&m.secret),
            keywarden_key: m.own,
            secret: m.secret,
        }
    }
}

pub fn fingerprint(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// First and last characters only. Our own keys keep their public part (prefix,
/// environment, id), which names the key without revealing it.
pub fn redact(secret: &str, own: Option<&OwnKey>) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if let Some(o) = own {
        let public = secret.find(&o.id).map(|i| i + o.id.len() + 1).unwrap_or(0);
        let tail: String = chars[chars.len().saturating_sub(2)..].iter().collect();
        return format!("{}…{tail}", &secret[..public.min(secret.len())]);
    }
    let (head, tail) = match chars.len() {
        0..=5 => (0, 0),
        6..=11 => (1, 1),
        12..=31 => (3, 2),
        _ => (4, 4),
    };
    let first: String = chars[..head].iter().collect();
    let last: String = chars[chars.len() - tail..].iter().collect();
    format!("{first}…{last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_only_the_ends() {
        assert_eq!(redact("AKIA7KLFYYLBEG3RHDSV", None), "AKI…SV");
        assert_eq!(redact("short", None), "…");
        assert_eq!(
            redact("ghp_0123abcdEFGH4567ijklMNOP8901qrstUVWX", None),
            "ghp_…UVWX"
        );
        let own = OwnKey {
            id: "7Hq2Lx9aKf3Tzp1M".into(),
            environment: "prod".into(),
            admin_token: false,
        };
        let key = "kw_prod_7Hq2Lx9aKf3Tzp1M_0123456789abcdefghij0123456789ABCDEF";
        assert_eq!(redact(key, Some(&own)), "kw_prod_7Hq2Lx9aKf3Tzp1M_…EF");
    }
}
