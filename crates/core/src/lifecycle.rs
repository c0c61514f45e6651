//! The lifecycle state machine: `active` ⇄ `suspended` → `revoked` (terminal);
//! `expired` when time passes. Rotation makes a successor and ends the old key after a grace.

use thiserror::Error;
use time::{Duration, OffsetDateTime};

use crate::model::{KeyRecord, KeyState, StateCause};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Suspend,
    Resume,
    Revoke,
    Rotate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Suspend => "suspend",
            Self::Resume => "resume",
            Self::Revoke => "revoke",
            Self::Rotate => "rotate",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("cannot {action} a key that is {state}{detail}")]
pub struct TransitionError {
    pub action: &'static str,
    pub state: KeyState,
    pub detail: &'static str,
}

/// The state a key moves to when `action` is applied at `now`, or why it cannot.
pub fn transition(
    key: &KeyRecord,
    action: Action,
    now: OffsetDateTime,
) -> Result<KeyState, TransitionError> {
    let state = key.effective_state(now);
    let refuse = |detail| TransitionError {
        action: action.as_str(),
        state,
        detail,
    };
    match (action, state) {
        (Action::Suspend, KeyState::Active) => Ok(KeyState::Suspended),
        (Action::Resume, KeyState::Suspended) => Ok(KeyState::Active),
        (Action::Revoke, KeyState::Active | KeyState::Suspended | KeyState::Expired) => {
            Ok(KeyState::Revoked)
        }
        (Action::Rotate, KeyState::Active | KeyState::Suspended) if key.rotated_to.is_some() => {
            Err(refuse(" and was already rotated"))
        }
        (Action::Rotate, KeyState::Active) => Ok(state),
        // Held because its rotation is overdue: rotating is the way out (resuming would
        // only be held again). The old key stays suspended; the successor is active.
        (Action::Rotate, KeyState::Suspended)
            if key.state_cause == Some(StateCause::RotationOverdue) =>
        {
            Ok(state)
        }
        // Any other suspended key is under investigation: resume it before handing out a
        // successor.
        _ => Err(refuse("")),
    }
}

/// The state reason of keys revoked or suspended because their owner was disabled; verify
/// answers `OWNER_DISABLED` for them.
pub const OWNER_DISABLED: &str = "OWNER_DISABLED";

/// Why a key whose time has passed is recorded as expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryReason {
    /// Its TTL ran out.
    TtlExpired,
    /// It was rotated and its grace period ended.
    RotationGraceEnded,
    /// It went unused for the policy's `idle_expiry`.
    IdleExpired,
}

impl ExpiryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TtlExpired => "TTL_EXPIRED",
            Self::RotationGraceEnded => "ROTATION_GRACE_ENDED",
            Self::IdleExpired => "IDLE_EXPIRED",
        }
    }
}

/// Whether a key is past its end but still stored as active or suspended, and why. The
/// key is already refused (its effective state is expired); recording it makes the
/// expiry a state change with an audit entry.
pub fn expiry_due(key: &KeyRecord, now: OffsetDateTime) -> Option<ExpiryReason> {
    match key.state {
        KeyState::Active | KeyState::Suspended if now >= key.expires_at => {
            Some(if key.rotated_to.is_some() {
                ExpiryReason::RotationGraceEnded
            } else {
                ExpiryReason::TtlExpired
            })
        }
        _ => None,
    }
}

/// When an active key last showed activity: its last use (the later of the stored one and
/// `seen`, a use not stored yet), else its creation.
pub fn last_activity(key: &KeyRecord, seen: Option<OffsetDateTime>) -> OffsetDateTime {
    key.last_used_at.max(seen).unwrap_or(key.created_at)
}

/// Whether an active key has gone unused for `expiry` at `now`.
pub fn idle_due(
    key: &KeyRecord,
    expiry: Duration,
    seen: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> bool {
    key.state == KeyState::Active && now >= last_activity(key, seen) + expiry
}

/// When a rotated key stops working: after the grace, but never later than it would have.
pub fn rotation_end(key: &KeyRecord, grace: Duration, now: OffsetDateTime) -> OffsetDateTime {
    (now + grace).min(key.expires_at)
}

/// The successor keeps the predecessor's lifetime length, counted from now.
pub fn successor_ttl(key: &KeyRecord) -> Duration {
    key.expires_at - key.created_at
}
