//! Scopes: `:`-separated segments (`deploy:write`, `db:orders:read`). A granted scope may
//! end in a `*` segment to cover a subtree (`db:*` covers `db:orders:read`, not `db`).

use std::fmt;
use thiserror::Error;

const MAX_LEN: usize = 128;
const MAX_SEGMENTS: usize = 8;
const MAX_SEGMENT_LEN: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid scope {scope:?}: {why}")]
pub struct ScopeError {
    pub scope: String,
    pub why: &'static str,
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scope(String);

impl Scope {
    /// A scope as granted to a key: a trailing `*` segment is allowed.
    pub fn granted(s: &str) -> Result<Self, ScopeError> {
        validate(s, true).map(|()| Self(s.to_owned()))
    }

    /// A scope as asked for at verify time: concrete, no wildcard.
    pub fn requested(s: &str) -> Result<Self, ScopeError> {
        validate(s, false).map(|()| Self(s.to_owned()))
    }

    /// [`Scope::requested`] without copying: verify hands the string on to its usage event.
    pub fn requested_owned(s: String) -> Result<Self, ScopeError> {
        validate(&s, false).map(|()| Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_wildcard(&self) -> bool {
        self.0 == "*" || self.0.ends_with(":*")
    }

    /// Does this granted scope cover the requested one?
    pub fn covers(&self, requested: &Scope) -> bool {
        covers_text(&self.0, &requested.0)
    }
}

impl TryFrom<String> for Scope {
    type Error = ScopeError;
    fn try_from(s: String) -> Result<Self, ScopeError> {
        Self::granted(&s)
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> String {
        s.0
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({})", self.0)
    }
}

fn validate(s: &str, allow_wildcard: bool) -> Result<(), ScopeError> {
    let err = |why| ScopeError {
        scope: s.chars().take(MAX_LEN + 8).collect(),
        why,
    };
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s.len() > MAX_LEN {
        return Err(err("longer than 128 characters"));
    }
    let segments: Vec<&str> = s.split(':').collect();
    if segments.len() > MAX_SEGMENTS {
        return Err(err("more than 8 segments"));
    }
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if *seg == "*" {
            if !allow_wildcard {
                return Err(err("a requested scope cannot contain a wildcard"));
            }
            if i != last {
                return Err(err("`*` may only be the last segment"));
            }
            continue;
        }
        if seg.is_empty() {
            return Err(err("empty segment"));
        }
        if seg.len() > MAX_SEGMENT_LEN {
            return Err(err("segment longer than 64 characters"));
        }
        let first_ok = seg.as_bytes()[0].is_ascii_lowercase() || seg.as_bytes()[0].is_ascii_digit();
        let rest_ok = seg
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
        if !first_ok || !rest_ok {
            return Err(err(
                "segments are lowercase letters, digits, `_`, `.` or `-`, starting with a letter or digit",
            ));
        }
    }
    Ok(())
}

/// Does any of `granted` cover `requested`?
pub fn any_covers(granted: &[Scope], requested: &Scope) -> bool {
    granted.iter().any(|g| g.covers(requested))
}

/// Granted scopes packed into one string, one per line (no scope contains a newline),
/// for callers that keep them next to other data rather than in a `Vec` of strings.
pub fn pack(granted: &[Scope]) -> String {
    granted
        .iter()
        .map(Scope::as_str)
        .collect::<Vec<_>>()
        .join("\n")
}

/// [`any_covers`] over scopes [`pack`]ed into one string.
pub fn packed_covers(packed: &str, requested: &Scope) -> bool {
    packed
        .split('\n')
        .any(|g| !g.is_empty() && covers_text(g, &requested.0))
}

fn covers_text(granted: &str, requested: &str) -> bool {
    match granted.strip_suffix('*') {
        Some(base) => requested.starts_with(base) && requested.len() > base.len(),
        None => granted == requested,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> Scope {
        Scope::granted(s).unwrap()
    }
    fn r(s: &str) -> Scope {
        Scope::requested(s).unwrap()
    }

    /// Packed scopes answer exactly as the scopes they were packed from.
    #[test]
    fn packed_scopes_cover_as_the_scopes_do() {
        let sets: [&[&str]; 5] = [
            &["deploy:write"],
            &["db:*", "deploy:write"],
            &["*"],
            &["a:b:*", "a", "x.y-z_0:read"],
            &[],
        ];
        let asks = [
            "deploy:write",
            "deploy:read",
            "db",
            "db:orders:read",
            "a",
            "a:b",
            "a:b:c",
            "x.y-z_0:read",
            "dbx:read",
        ];
        for set in sets {
            let granted: Vec<Scope> = set.iter().map(|s| g(s)).collect();
            let packed = pack(&granted);
            for ask in asks {
                assert_eq!(
                    packed_covers(&packed, &r(ask)),
                    any_covers(&granted, &r(ask)),
                    "{set:?} asked {ask}"
                );
            }
        }
    }

    #[test]
    fn exact_and_subtree() {
        assert!(g("deploy:write").covers(&r("deploy:write")));
        assert!(!g("deploy:write").covers(&r("deploy:read")));
        assert!(g("db:*").covers(&r("db:orders:read")));
        assert!(!g("db:*").covers(&r("db")));
        assert!(!g("db:*").covers(&r("dbx:read")));
        assert!(g("*").covers(&r("anything:at:all")));
    }

    #[test]
    fn validation() {
        for bad in [
            "", ":", "a::b", "Deploy", "a:*:b", "a b", "a:b*", "-a", "*x",
        ] {
            assert!(Scope::granted(bad).is_err(), "{bad}");
        }
        assert!(Scope::requested("db:*").is_err());
        assert!(Scope::granted("a:".repeat(9).trim_end_matches(':')).is_err());
        assert!(Scope::granted("db:orders-v2.read_x").is_ok());
    }
}
