//! The verify decision: one closed set of reason codes.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use time::OffsetDateTime;

use crate::model::{KeyRecord, KeyState, StateCause};
use crate::scope::Scope;

/// The closed set of verify codes. Some codes belong to later features (rate limits, idle expiry,
/// owner registry); they are part of the contract from day one so clients can match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VerifyCode {
    Valid,
    Malformed,
    NotFound,
    Expired,
    IdleExpired,
    Revoked,
    Suspended,
    EnvironmentMismatch,
    ScopeDenied,
    SourceDenied,
    UsageExhausted,
    RateLimited,
    OwnerDisabled,
}

impl VerifyCode {
    pub const ALL: [VerifyCode; 13] = [
        Self::Valid,
        Self::Malformed,
        Self::NotFound,
        Self::Expired,
        Self::IdleExpired,
        Self::Revoked,
        Self::Suspended,
        Self::EnvironmentMismatch,
        Self::ScopeDenied,
        Self::SourceDenied,
        Self::UsageExhausted,
        Self::RateLimited,
        Self::OwnerDisabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Valid => "VALID",
            Self::Malformed => "MALFORMED",
            Self::NotFound => "NOT_FOUND",
            Self::Expired => "EXPIRED",
            Self::IdleExpired => "IDLE_EXPIRED",
            Self::Revoked => "REVOKED",
            Self::Suspended => "SUSPENDED",
            Self::EnvironmentMismatch => "ENVIRONMENT_MISMATCH",
            Self::ScopeDenied => "SCOPE_DENIED",
            Self::SourceDenied => "SOURCE_DENIED",
            Self::UsageExhausted => "USAGE_EXHAUSTED",
            Self::RateLimited => "RATE_LIMITED",
            Self::OwnerDisabled => "OWNER_DISABLED",
        }
    }
}

impl fmt::Display for VerifyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown verify code {0:?}")]
pub struct UnknownCode(pub String);

impl FromStr for VerifyCode {
    type Err = UnknownCode;
    fn from_str(s: &str) -> Result<Self, UnknownCode> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCode(s.chars().take(32).collect()))
    }
}

/// What the caller asked, already validated.
#[derive(Debug, Clone, Default)]
pub struct VerifyRequest {
    pub scope: Option<Scope>,
    pub environment: Option<String>,
    pub source_ip: Option<IpAddr>,
    /// The environments the asking token is limited to: a key of any other answers
    /// ENVIRONMENT_MISMATCH, whatever the request names. `None`: any.
    pub environments: Option<Vec<String>>,
}

/// The idle rule for a verify: how long an active key may go unused, and the latest use
/// this node has seen, which a cached record may not show yet.
#[derive(Debug, Clone, Copy)]
pub struct Idle {
    pub expiry: time::Duration,
    pub last_seen: Option<OffsetDateTime>,
}

/// Judges an authenticated key (its hash already matched) against a request, except for
/// usage caps, which the store decides atomically after this passes.
///
/// Order: terminal states first (so a revoked key always says REVOKED), then time, then
/// reversible state, then the request's fit (environment, source, scope).
///
/// With `idle`, an active key unused for `idle.expiry` answers IDLE_EXPIRED, whether
/// or not the enforcer has recorded it yet. The key's granted scopes are checked by
/// `covers`: the verify cache keeps them packed next to its answer (`scope::pack`),
/// where reading them costs no cache lines of their own.
pub fn decide_with(
    key: &KeyRecord,
    req: &VerifyRequest,
    now: OffsetDateTime,
    idle: Option<&Idle>,
    covers: impl Fn(&Scope) -> bool,
) -> Result<(), VerifyCode> {
    let owner_gone = key.state_cause == Some(StateCause::OwnerDisabled);
    match key.effective_state(now) {
        KeyState::Revoked | KeyState::Suspended if owner_gone => {
            return Err(VerifyCode::OwnerDisabled)
        }
        KeyState::Expired
            if key.state == KeyState::Expired
                && key.state_cause == Some(StateCause::IdleExpired) =>
        {
            return Err(VerifyCode::IdleExpired)
        }
        KeyState::Revoked => return Err(VerifyCode::Revoked),
        KeyState::Expired => return Err(VerifyCode::Expired),
        KeyState::Suspended => return Err(VerifyCode::Suspended),
        KeyState::Active => {}
    }
    if let Some(idle) = idle {
        if crate::lifecycle::idle_due(key, idle.expiry, idle.last_seen, now) {
            return Err(VerifyCode::IdleExpired);
        }
    }
    if let Some(allowed) = &req.environments {
        if !allowed.contains(&key.environment) {
            return Err(VerifyCode::EnvironmentMismatch);
        }
    }
    if let Some(env) = &req.environment {
        if *env != key.environment {
            return Err(VerifyCode::EnvironmentMismatch);
        }
    }
    if !key.allowed_cidrs.is_empty() {
        let allowed = req.source_ip.is_some_and(|ip| {
            key.allowed_cidrs
                .iter()
                .any(|net| net.contains(&canonical(ip)))
        });
        if !allowed {
            return Err(VerifyCode::SourceDenied);
        }
    }
    if let Some(scope) = &req.scope {
        if !covers(scope) {
            return Err(VerifyCode::ScopeDenied);
        }
    }
    if key.max_uses.is_some_and(|m| key.uses >= m) {
        return Err(VerifyCode::UsageExhausted);
    }
    Ok(())
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is matched as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::KeyHash;
    use crate::key_format::KeyId;
    use crate::scope::any_covers;
    use time::macros::datetime;

    fn decide(key: &KeyRecord, req: &VerifyRequest, now: OffsetDateTime) -> Result<(), VerifyCode> {
        decide_with(key, req, now, None, |scope| any_covers(&key.scopes, scope))
    }

    fn key() -> KeyRecord {
        KeyRecord {
            id: KeyId::parse("AAAAAAAAAAAAAAAA").unwrap(),
            hash: KeyHash {
                pepper_version: 1,
                digest: [0; 32],
            },
            hint: "abcd".into(),
            name: "ci".into(),
            description: String::new(),
            owner: "a@b.c".into(),
            systems: vec![],
            environment: "prod".into(),
            scopes: vec![Scope::granted("deploy:*").unwrap()],
            created_at: datetime!(2026-01-01 0:00 UTC),
            created_by: "t".into(),
            expires_at: datetime!(2026-02-01 0:00 UTC),
            state: KeyState::Active,
            state_reason: None,
            state_cause: None,
            state_changed_at: None,
            allowed_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            max_uses: None,
            uses: 0,
            last_used_at: None,
            last_used_from: None,
            rotated_from: None,
            rotated_to: None,
            metadata: Default::default(),
            rate_limit: None,
            canary: false,
            version: 1,
        }
    }

    fn req(scope: &str, ip: &str) -> VerifyRequest {
        VerifyRequest {
            scope: Some(Scope::requested(scope).unwrap()),
            environment: Some("prod".into()),
            source_ip: Some(ip.parse().unwrap()),
            environments: None,
        }
    }

    const NOW: OffsetDateTime = datetime!(2026-01-15 0:00 UTC);

    #[test]
    fn codes_in_order() {
        let k = key();
        assert_eq!(decide(&k, &req("deploy:write", "10.1.2.3"), NOW), Ok(()));
        assert_eq!(
            decide(&k, &req("deploy:write", "::ffff:10.1.2.3"), NOW),
            Ok(())
        );
        assert_eq!(
            decide(&k, &req("db:read", "10.1.2.3"), NOW),
            Err(VerifyCode::ScopeDenied)
        );
        assert_eq!(
            decide(&k, &req("deploy:write", "11.0.0.1"), NOW),
            Err(VerifyCode::SourceDenied)
        );
        let mut other_env = req("deploy:write", "10.1.2.3");
        other_env.environment = Some("dev".into());
        assert_eq!(
            decide(&k, &other_env, NOW),
            Err(VerifyCode::EnvironmentMismatch)
        );
        assert_eq!(
            decide(
                &k,
                &req("deploy:write", "10.1.2.3"),
                datetime!(2026-02-01 0:00 UTC)
            ),
            Err(VerifyCode::Expired)
        );
        let mut s = key();
        s.state = KeyState::Suspended;
        assert_eq!(
            decide(&s, &req("deploy:write", "10.1.2.3"), NOW),
            Err(VerifyCode::Suspended)
        );
        s.state = KeyState::Revoked;
        assert_eq!(
            decide(&s, &req("deploy:write", "10.1.2.3"), NOW),
            Err(VerifyCode::Revoked)
        );
        let mut capped = key();
        capped.max_uses = Some(1);
        capped.uses = 1;
        assert_eq!(
            decide(&capped, &req("deploy:write", "10.1.2.3"), NOW),
            Err(VerifyCode::UsageExhausted)
        );
    }

    #[test]
    fn cidr_key_without_source_is_denied() {
        let k = key();
        let r = VerifyRequest {
            source_ip: None,
            ..Default::default()
        };
        assert_eq!(decide(&k, &r, NOW), Err(VerifyCode::SourceDenied));
    }

    #[test]
    fn code_strings_round_trip() {
        for c in VerifyCode::ALL {
            assert_eq!(c.as_str().parse::<VerifyCode>(), Ok(c));
        }
    }
}
