//! The key as the domain sees it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use time::OffsetDateTime;

use crate::hashing::KeyHash;
use crate::key_format::KeyId;
use crate::scope::Scope;

/// Why keywarden itself (not a person) moved a key to its state. Kept apart from the
/// free-text `state_reason`, so no reason a person types (`--reason OWNER_DISABLED`) can
/// change what verify answers. Stored as the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateCause {
    /// Its owner was disabled (verify: OWNER_DISABLED).
    OwnerDisabled,
    /// It went unused for the policy's idle expiry (verify: IDLE_EXPIRED).
    IdleExpired,
    TtlExpired,
    RotationGraceEnded,
    RotationOverdue,
    PolicyViolation,
    /// The monitor suspended it in response to an alert (the policy's `alert_actions`).
    AlertResponse,
}

impl StateCause {
    pub const ALL: [StateCause; 7] = [
        Self::OwnerDisabled,
        Self::IdleExpired,
        Self::TtlExpired,
        Self::RotationGraceEnded,
        Self::RotationOverdue,
        Self::PolicyViolation,
        Self::AlertResponse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OwnerDisabled => "OWNER_DISABLED",
            Self::IdleExpired => "IDLE_EXPIRED",
            Self::TtlExpired => "TTL_EXPIRED",
            Self::RotationGraceEnded => "ROTATION_GRACE_ENDED",
            Self::RotationOverdue => "ROTATION_OVERDUE",
            Self::PolicyViolation => "POLICY_VIOLATION",
            Self::AlertResponse => "ALERT_RESPONSE",
        }
    }

    /// The cause whose code is `code`, if any.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == code)
    }
}

/// The stored state. `Expired` is also *derived*: an `Active` or `Suspended` key whose
/// `expires_at` has passed is effectively expired (see [`KeyRecord::effective_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    Active,
    Suspended,
    Revoked,
    Expired,
}

impl KeyState {
    pub const ALL: [KeyState; 4] = [Self::Active, Self::Suspended, Self::Revoked, Self::Expired];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key state {0:?}: expected active, suspended, revoked or expired")]
pub struct UnknownState(pub String);

impl FromStr for KeyState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, UnknownState> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.chars().take(32).collect()))
    }
}

/// Everything keywarden knows about a key, except its secret (which it never knows).
///
/// `repr(C)` keeps the fields in the order written: the ones every verify reads come
/// first, so a cached record costs a few cache lines, not one per field scattered over
/// the whole struct. At 100k keys those lines are cold on almost every verify.
#[derive(Debug, Clone)]
#[repr(C)]
pub struct KeyRecord {
    // Read by every verify.
    pub id: KeyId,
    pub hash: KeyHash,
    pub state: KeyState,
    pub max_uses: Option<u64>,
    pub uses: u64,
    pub expires_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
    pub last_used_at: Option<OffsetDateTime>,
    /// The reason a person gave, or the machine cause's code; shown, never decided on.
    pub state_reason: Option<String>,
    /// Why the system itself moved the key to its state; what verify decides on.
    pub state_cause: Option<StateCause>,
    pub allowed_cidrs: Vec<IpNet>,
    pub scopes: Vec<Scope>,
    pub environment: String,
    /// At most this many valid uses per period (`RATE_LIMITED` beyond).
    pub rate_limit: Option<crate::rate::Rate>,
    /// A tripwire: never verifies (answers like an unknown key), and any presentation
    /// raises a critical CANARY_USED alert.
    pub canary: bool,
    /// Optimistic-concurrency counter, bumped by every stored change.
    pub version: i64,
    // The rest.
    pub hint: String,
    pub name: String,
    pub description: String,
    pub owner: String,
    pub systems: Vec<String>,
    pub created_by: String,
    pub state_changed_at: Option<OffsetDateTime>,
    pub last_used_from: Option<String>,
    pub rotated_from: Option<KeyId>,
    pub rotated_to: Option<KeyId>,
    pub metadata: BTreeMap<String, String>,
}

impl KeyRecord {
    pub fn effective_state(&self, now: OffsetDateTime) -> KeyState {
        match self.state {
            KeyState::Active | KeyState::Suspended if now >= self.expires_at => KeyState::Expired,
            s => s,
        }
    }

    pub fn remaining_uses(&self) -> Option<u64> {
        self.max_uses.map(|m| m.saturating_sub(self.uses))
    }
}

/// One of keywarden's own admin tokens. Same format as keys, environment tag `admin`.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub id: KeyId,
    pub hash: KeyHash,
    pub hint: String,
    pub name: String,
    /// The person accountable for the token (an e-mail address, say); audit entries name
    /// them as the actor. `None` for tokens made before owners existed, and the bootstrap.
    pub owner: Option<String>,
    pub role: crate::role::Role,
    /// For issuers: the environments they may act in. `None` means all.
    pub environments: Option<Vec<String>>,
    pub created_at: OffsetDateTime,
    pub created_by: String,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    /// When it was last presented, to within the token cache's lifetime (a use is
    /// recorded when a worker loads or refreshes its copy, not on every request).
    pub last_used_at: Option<OffsetDateTime>,
}

impl TokenRecord {
    pub fn is_usable(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }

    pub fn may_act_in(&self, environment: &str) -> bool {
        self.environments
            .as_ref()
            .is_none_or(|envs| envs.iter().any(|e| e == environment))
    }
}

/// Who did something, from where: attached to every audit entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actor {
    /// `token:<id>` (with the token's name) or `system:<job>`.
    pub id: String,
    pub name: String,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
}

/// One audit entry, never holding a secret. The store chains them by hash
/// (`audit_chain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub time: OffsetDateTime,
    pub actor: Actor,
    pub action: String,
    pub target: String,
    pub reason: Option<String>,
    /// Changed fields, before and after, as JSON text.
    pub details: String,
}

/// One verify, allowed or not.
#[derive(Debug, Clone)]
pub struct UsageEvent {
    pub key_id: Option<KeyId>,
    pub time: OffsetDateTime,
    pub code: crate::verify::VerifyCode,
    /// Kept as an address, not text: the verify path formats nothing it does not answer.
    pub source_ip: Option<std::net::IpAddr>,
    pub scope: Option<String>,
    pub environment: Option<String>,
    pub subject: Option<String>,
    pub user_agent: Option<String>,
    /// The use was already counted against a usage cap, atomically, at verify time.
    pub counted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub subject: String,
    pub first_seen: OffsetDateTime,
    pub last_seen: OffsetDateTime,
}
