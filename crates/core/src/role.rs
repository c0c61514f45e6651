//! Roles of keywarden's own admin tokens and what each may do (least privilege).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything, including managing admin tokens.
    Admin,
    /// Create and manage keys, optionally only in some environments.
    Issuer,
    /// Read only: keys, usage, tokens, the audit trail, metrics.
    Auditor,
    /// A gateway: `/v1/verify`, `/v1/auth`, and the event stream with its acks.
    Verifier,
    /// Only `/scim/v2`: an identity provider provisioning and offboarding owners.
    Scim,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    KeysRead,
    KeysWrite,
    UsageRead,
    Verify,
    TokensRead,
    TokensWrite,
    /// Read the audit trail, export it, sign checkpoints.
    AuditRead,
    /// Move old entries out of the live trail into an archive file.
    AuditArchive,
    /// Read the key policy in force.
    PolicyRead,
    /// Apply a key policy.
    PolicyWrite,
    /// Read the owner registry.
    OwnersRead,
    /// Register, disable and enable owners.
    OwnersWrite,
    /// The SCIM endpoint (role `scim`; admin may do everything).
    Scim,
    /// Read connected services and their deliveries.
    ServicesRead,
    /// Register and remove connected services.
    ServicesWrite,
    /// Read the key event stream (`/v1/events`) and acknowledge events for a service.
    Events,
    /// Read alerts.
    AlertsRead,
    /// Acknowledge and resolve alerts.
    AlertsWrite,
    /// Scrape `/metrics`: operational counts (verdicts by code, queue depths, deliveries,
    /// alerts), no key or owner.
    MetricsRead,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Self::Admin,
        Self::Issuer,
        Self::Auditor,
        Self::Verifier,
        Self::Scim,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Issuer => "issuer",
            Self::Auditor => "auditor",
            Self::Verifier => "verifier",
            Self::Scim => "scim",
        }
    }

    pub fn allows(self, p: Permission) -> bool {
        use Permission::*;
        match self {
            Self::Admin => true,
            Self::Issuer => {
                matches!(
                    p,
                    KeysRead
                        | KeysWrite
                        | UsageRead
                        | PolicyRead
                        | OwnersRead
                        | AlertsRead
                        | AlertsWrite
                )
            }
            Self::Auditor => {
                matches!(
                    p,
                    KeysRead
                        | UsageRead
                        | TokensRead
                        | AuditRead
                        | PolicyRead
                        | OwnersRead
                        | ServicesRead
                        | AlertsRead
                        | MetricsRead
                )
            }
            Self::Verifier => matches!(p, Verify | Events),
            Self::Scim => matches!(p, Scim),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected admin, issuer, auditor, verifier or scim")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, UnknownRole> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.chars().take(32).collect()))
    }
}
