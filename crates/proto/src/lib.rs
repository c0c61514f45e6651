//! keywarden-proto: the wire types of the `/v1` API, shared by the server and the client.
//! Requests reject unknown fields so a typo is an error, not a silently ignored option.
//! No logic lives here.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

mod error_code;

pub use error_code::ErrorCode;

/// A secret on the wire (a new key or token). Debug never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Every error the API returns has this body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code, e.g. `SCOPE_INVALID`.
    // A string, not an `ErrorCode`: a client still reads an answer with a code newer than
    // itself.
    #[schema(value_type = ErrorCode)]
    pub code: String,
    pub message: String,
    /// Every field that failed validation, when there were several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<Violation>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Violation {
    #[schema(value_type = ErrorCode)]
    pub code: String,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    pub name: String,
    pub owner: String,
    pub environment: String,
    #[serde(default)]
    pub systems: Vec<String>,
    pub scopes: Vec<String>,
    /// Lifetime such as `30d`; default 90d, at most 365d. Exclusive with `expires_at`.
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// CIDRs the key may be used from; empty means anywhere.
    #[serde(default)]
    pub allowed_cidrs: Vec<String>,
    /// Usage cap; `1` makes a one-time key.
    #[serde(default)]
    pub max_uses: Option<u64>,
    /// At most this many valid uses per period, e.g. `100/min`, `10/s`, `5000/h`;
    /// beyond it verify answers RATE_LIMITED. Default: the policy's `rate_limit`.
    #[serde(default)]
    pub rate_limit: Option<String>,
    /// A tripwire to plant where a key should never be read: it never verifies (answers
    /// NOT_FOUND like an unknown key) and any presentation raises CANARY_USED.
    #[serde(default)]
    pub canary: bool,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct SubjectView {
    pub subject: String,
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub owner: String,
    pub systems: Vec<String>,
    pub environment: String,
    pub scopes: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub created_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// `active`, `suspended`, `revoked` or `expired` (derived from `expires_at` too).
    pub state: String,
    pub state_reason: Option<String>,
    /// Set when keywarden itself changed the state (`OWNER_DISABLED`, `IDLE_EXPIRED`,
    /// `TTL_EXPIRED`, `ROTATION_GRACE_ENDED`, `ROTATION_OVERDUE`, `POLICY_VIOLATION`);
    /// `state_reason` is free text and never decides what verify answers.
    #[serde(default)]
    pub state_cause: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub state_changed_at: Option<OffsetDateTime>,
    pub allowed_cidrs: Vec<String>,
    pub max_uses: Option<u64>,
    /// Valid uses allowed per period (`100/min`); `None`: unlimited.
    #[serde(default)]
    pub rate_limit: Option<String>,
    /// A tripwire key: never verifies, raises CANARY_USED when presented.
    #[serde(default)]
    pub canary: bool,
    pub uses: u64,
    pub remaining_uses: Option<u64>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    pub last_used_from: Option<String>,
    pub rotated_from: Option<String>,
    pub rotated_to: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Last four characters of the key, to tell keys apart.
    pub hint: String,
    /// Distinct subjects (hosts, nodes, services) this key provisioned. Only on single-key reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects: Option<Vec<SubjectView>>,
    /// How the key's latest state change reached the connected services. Only on
    /// single-key reads, once the key has had an event a service subscribes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propagation: Option<PropagationView>,
}

/// One key event's delivery to the services subscribed to it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PropagationView {
    /// The event (`revoked`, `suspended`, …) and its outbox seq.
    pub event: String,
    pub seq: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Services that confirmed, of `total`.
    pub confirmed: usize,
    pub total: usize,
    pub services: Vec<DeliveryView>,
}

/// A key event's delivery to one service.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliveryView {
    pub service_id: String,
    pub service: String,
    pub seq: i64,
    pub key_id: String,
    pub event: String,
    /// `pending` (not tried yet, or awaiting the service's ack), `failing` (will be
    /// tried again at `next_attempt_at`), `confirmed`, or `abandoned` (retries ran out).
    pub state: String,
    pub attempts: i64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub confirmed_at: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateServiceRequest {
    /// 1-64 characters: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Where events are POSTed (http or https). Absent for a pull service, which reads
    /// `/v1/events` and acknowledges with `/v1/services/{id}/ack`.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Some of `revoke`, `suspend`, `rotate`, `expire`, `alert`, `create`, `notice`, or
    /// `all`. Default: revoke, suspend, rotate, expire, alert.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// `standard` (the default: Standard Webhooks JSON, for machines) or `slack` (a
    /// Slack-compatible incoming webhook: a readable message for people).
    #[serde(default)]
    pub format: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceView {
    pub id: String,
    pub name: String,
    pub webhook_url: Option<String>,
    pub events: Vec<String>,
    /// `standard` or `slack`.
    #[serde(default)]
    pub format: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub created_by: String,
    /// The highest event seq the service acknowledged.
    pub acked_seq: i64,
    /// Deliveries per state.
    pub deliveries: BTreeMap<String, i64>,
    /// The latest deliveries, newest first. Only on single-service reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent: Option<Vec<DeliveryView>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedService {
    pub service: ServiceView,
    /// The Standard Webhooks signing secret (`whsec_…`), for a service with a webhook.
    /// Shown once; keywarden derives it again from its pepper and never stores it. A
    /// pull service gets none: it signs nothing and is told nothing signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceList {
    pub services: Vec<ServiceView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceTestResult {
    /// Whether the service answered 2xx.
    pub delivered: bool,
    pub status: Option<u16>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    /// Every event up to and including this seq has been applied.
    pub seq: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AckResponse {
    pub service_id: String,
    pub acked_seq: i64,
    /// Deliveries this ack confirmed.
    pub confirmed: u64,
}

/// One event of the outbox, as `/v1/events` streams it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    pub seq: i64,
    /// `key.revoked`, `key.suspended`, … (the audit action); `source.alert` for an
    /// alert on a source network that names no key (BRUTE_FORCE).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Absent for `source.alert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    pub reason: Option<String>,
    pub actor: String,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// Pass as `after` for the next call (the last seq seen; unchanged when none came).
    pub next: i64,
}

/// Keys found in the wild (by `keywarden scan`), to be matched with the inventory.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentifyRequest {
    /// Up to 1,000 keys or admin tokens, in clear (they leaked already). Not a use: no
    /// usage event is recorded and caps are not spent.
    pub keys: Vec<Secret>,
}

/// What the inventory knows of one presented key, in the request's order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IdentifiedKey {
    /// The id the key's format names (absent when it is not a well-formed key of ours).
    pub key_id: Option<String>,
    /// `key` or `token` (an admin token).
    pub kind: Option<String>,
    /// The inventory holds this id and the presented secret hashes to it.
    pub genuine: bool,
    /// Still usable: active (keys), not revoked or expired (tokens). A canary is never
    /// live: it verifies for no one.
    pub live: bool,
    /// A canary key (a tripwire): found where it was planted, it is not a leak to revoke.
    #[serde(default)]
    pub canary: bool,
    pub name: Option<String>,
    pub owner: Option<String>,
    pub environment: Option<String>,
    pub state: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IdentifyResponse {
    pub results: Vec<IdentifiedKey>,
}

/// A foreign secret the scanner found: its fingerprint, never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShadowKeyInput {
    /// SHA-256 of the secret, 64 hex characters.
    pub fingerprint: String,
    /// The scanner rule that found it (`aws-access-key-id`, …).
    pub kind: String,
    pub severity: String,
    /// Where it was found.
    pub location: String,
    #[serde(default)]
    pub line: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportShadowKeys {
    pub shadows: Vec<ShadowKeyInput>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ShadowImportResult {
    pub imported: usize,
    /// Fingerprints not seen before.
    pub new: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ShadowKeyView {
    pub fingerprint: String,
    pub kind: String,
    pub severity: String,
    pub location: String,
    pub line: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    pub sightings: i64,
    pub imported_by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ShadowKeyList {
    pub shadow_keys: Vec<ShadowKeyView>,
}

/// An alert the monitor raised: KEY_STILL_IN_USE, CANARY_USED, ENVIRONMENT_CROSSING,
/// SECRET_GUESSING, SCOPE_PROBING or BRUTE_FORCE.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AlertView {
    /// Its id: the audit entry that raised it.
    pub seq: i64,
    /// When it was first seen.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub kind: String,
    /// `critical`, `high` or `medium`.
    pub severity: String,
    /// The key it is about; none for an alert about a source (BRUTE_FORCE).
    pub key_id: Option<String>,
    /// The verify answer of the sighting that raised it.
    pub code: String,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub subject: Option<String>,
    /// KEY_STILL_IN_USE: how long the key had been dead when presented.
    pub dead_for_ms: Option<i64>,
    /// The numbers that tripped it (events, threshold, since, sources).
    #[schema(value_type = Object)]
    pub evidence: serde_json::Value,
    /// Further sightings folded into it (same kind, key and source network, within
    /// the alert window).
    pub repeats: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// `open`, `acknowledged` or `resolved`.
    pub state: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub state_changed_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub state_changed_by: Option<String>,
    #[serde(default)]
    pub state_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AlertList {
    pub alerts: Vec<AlertView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    pub key: KeyView,
    /// The key in clear. Returned exactly once; keywarden keeps only a keyed hash.
    pub secret: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
    /// Pass as `cursor` to fetch the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StateChangeRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the old key keeps working, e.g. `24h` (the default) or `0s`.
    #[serde(default)]
    pub grace: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RotatedKey {
    /// The successor.
    pub key: KeyView,
    pub secret: Secret,
    /// The old key, now ending at the end of the grace period.
    pub previous: KeyView,
}

#[derive(Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub key: String,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub environment: Option<String>,
    /// The client address the gateway saw.
    #[serde(default)]
    pub source_ip: Option<String>,
    /// The entity being provisioned (host, node, service instance).
    #[serde(default)]
    pub subject: Option<String>,
}

impl fmt::Debug for VerifyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyRequest")
            .field("key", &"<redacted>")
            .field("scope", &self.scope)
            .field("environment", &self.environment)
            .field("source_ip", &self.source_ip)
            .field("subject", &self.subject)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VerifyResponse {
    pub valid: bool,
    /// One of VALID, MALFORMED, NOT_FOUND, EXPIRED, IDLE_EXPIRED, REVOKED, SUSPENDED,
    /// ENVIRONMENT_MISMATCH, SCOPE_DENIED, SOURCE_DENIED, USAGE_EXHAUSTED, RATE_LIMITED,
    /// OWNER_DISABLED.
    #[schema(example = "VALID")]
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_uses: Option<u64>,
    /// RATE_LIMITED: when to try again, in milliseconds (also the `Retry-After` header,
    /// in whole seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageEventView {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub code: String,
    pub source_ip: Option<String>,
    pub scope: Option<String>,
    pub environment: Option<String>,
    pub subject: Option<String>,
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageList {
    pub events: Vec<UsageEventView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    pub name: String,
    /// The person accountable for the token; audit entries name them as the actor.
    #[serde(default)]
    pub owner: Option<String>,
    /// `admin`, `issuer`, `auditor`, `verifier` or `scim` (SCIM provisioning only).
    pub role: String,
    /// For issuers: the environments they may manage keys in. Absent means all.
    #[serde(default)]
    pub environments: Option<Vec<String>>,
    /// Lifetime such as `90d`; absent means the token does not expire.
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub owner: Option<String>,
    pub role: String,
    pub environments: Option<Vec<String>>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub created_by: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// When it was last presented (to within a minute or so); `null`: never.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    pub hint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub token: TokenView,
    pub secret: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

/// One audit entry with its place in the hash chain. `hash` is SHA-256 of `prev_hash`
/// followed by the entry's canonical JSON (ARCHITECTURE.md, "Audit trail").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntryView {
    pub seq: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// `token:<id>` or `system:<job>`.
    pub actor: String,
    pub actor_name: String,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub action: String,
    pub target: String,
    pub reason: Option<String>,
    /// The changed fields, before and after.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntryView>,
    pub next_cursor: Option<String>,
}

/// A range of the chain moved into an archive file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ArchiveView {
    pub first_seq: i64,
    pub last_seq: i64,
    pub last_hash: String,
    pub entries: i64,
    pub file_sha256: String,
    #[serde(with = "time::serde::rfc3339")]
    pub archived_at: OffsetDateTime,
    pub archived_by: String,
}

/// Rows that were found past the audit trail's recorded head (written around keywarden)
/// and moved into the quarantine table, where they are kept as evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QuarantineView {
    /// The recorded head: the chain's last real entry before the repair.
    pub head_seq: i64,
    /// The seqs moved out of the audit trail.
    pub audit_seqs: Vec<i64>,
    /// The seqs moved out of the key event outbox.
    pub event_seqs: Vec<i64>,
}

/// Where the chain stands: its last entry, the archived ranges before the live table, and
/// the public key that signs checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditChainView {
    pub head_seq: i64,
    pub head_hash: String,
    pub public_key: String,
    pub archives: Vec<ArchiveView>,
}

/// Where the usage log's chain stands: its last batch, the prefixes retention removed
/// (the chain of what remains starts at the last one's hash), and the events stored
/// before the log was chained.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageChainView {
    pub head_batch: i64,
    pub head_hash: String,
    /// Events up to this seq predate the chain (0: none left).
    pub unchained_upto: i64,
    pub retained: Vec<UsageRetentionView>,
}

/// A prefix of the usage log that retention removed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageRetentionView {
    pub first_batch: i64,
    pub last_batch: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub events: i64,
    /// The hash of the last batch removed.
    pub last_hash: String,
    #[serde(with = "time::serde::rfc3339")]
    pub retained_at: OffsetDateTime,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// The entry to sign; absent means the newest.
    #[serde(default)]
    pub seq: Option<i64>,
}

/// A signed `{seq, hash, time}`: keep it outside the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointView {
    pub seq: i64,
    pub hash: String,
    pub time: String,
    pub public_key: String,
    pub signature: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArchiveRequest {
    pub first_seq: i64,
    pub last_seq: i64,
    /// Hash of entry `last_seq`, as the archive file holds it.
    pub last_hash: String,
    /// SHA-256 of the archive file, recorded with the range.
    pub file_sha256: String,
}

/// The key policy in force. Version 0: none applied yet, the built-in defaults hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyView {
    pub version: i64,
    /// The TOML as applied (empty for version 0).
    pub text: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub applied_at: Option<OffsetDateTime>,
    pub applied_by: Option<String>,
}

/// A person keys belong to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OwnerView {
    /// Lower-case: identities compare case-insensitively (`Dora@Example.com` is
    /// `dora@example.com`), as e-mail addresses and SCIM userNames do.
    pub identity: String,
    pub display_name: String,
    /// `active` or `disabled`.
    pub status: String,
    /// False for an owner who holds keys but was never registered (`owner add`, SCIM);
    /// such an owner can still be disabled, which registers them.
    #[serde(default = "registered_default")]
    pub registered: bool,
    pub manager: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OwnerList {
    pub owners: Vec<OwnerView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutOwnerRequest {
    pub identity: String,
    pub display_name: String,
    #[serde(default)]
    pub manager: Option<String>,
}

/// The owner after a status change, and the keys that change acted on.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OwnerStatusChange {
    pub owner: OwnerView,
    /// Ids of the keys revoked or suspended by a disable.
    pub keys: Vec<String>,
    /// Ids of the owner's admin tokens revoked by a disable (in the same transaction).
    #[serde(default)]
    pub tokens: Vec<String>,
}

fn registered_default() -> bool {
    true
}

/// One thing the enforcer did, or would do, to a key, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnforcementAction {
    pub key_id: String,
    pub name: String,
    pub owner: String,
    pub environment: String,
    /// `expire`, `suspend`, `revoke` (keys of disabled owners) or `notify`.
    pub action: String,
    /// `TTL_EXPIRED`, `ROTATION_GRACE_ENDED`, `IDLE_EXPIRED`, `ROTATION_OVERDUE`,
    /// `EXPIRES_SOON`, `POLICY_VIOLATION`.
    pub reason: String,
    /// For policy violations: the rules the key breaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When the rule was broken.
    #[serde(with = "time::serde::rfc3339")]
    pub due_at: OffsetDateTime,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnforcementReport {
    /// The time judged: the plan's `at`, or now for a pass.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// True for a plan (nothing was changed).
    pub planned: bool,
    pub actions: Vec<EnforcementAction>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyPolicyRequest {
    /// The policy file's TOML text.
    pub policy: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// One bucket of usage rollups (an hour or a UTC day), or a whole window.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageBucketView {
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Every verify of the bucket, allowed or denied.
    pub events: i64,
    /// Events by verify code (`VALID`, `SCOPE_DENIED`, …); codes with none are left out.
    pub codes: BTreeMap<String, i64>,
    /// Distinct source networks (/24 of IPv4, /64 of IPv6) events came from.
    pub distinct_networks: i64,
    /// Distinct scopes asked for.
    pub distinct_scopes: i64,
    /// Distinct subjects named.
    pub distinct_subjects: i64,
    /// Distinct user agents seen.
    pub distinct_user_agents: i64,
}

/// A value among the most frequent of a window.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopValueView {
    /// A network as CIDR (`10.2.3.0/24`); a scope, subject or user agent as sent.
    pub value: String,
    pub events: i64,
    /// Of those, events answered VALID.
    pub valid: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
}

/// `GET /v1/keys/{id}/usage/stats`: a key's usage rollups over a window of whole hours.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyUsageStats {
    pub key_id: String,
    /// The window, rounded out to whole hours: `since` inclusive, `until` exclusive.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    /// `hour` or `day` (UTC days).
    pub bucket: String,
    /// The whole window; its distinct counts are over the window.
    pub total: UsageBucketView,
    /// Buckets with events, oldest first.
    pub buckets: Vec<UsageBucketView>,
    pub top_networks: Vec<TopValueView>,
    pub top_scopes: Vec<TopValueView>,
    pub top_subjects: Vec<TopValueView>,
    pub top_user_agents: Vec<TopValueView>,
}

/// One group of `GET /v1/usage/stats`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageStatsGroup {
    /// The key id, owner, system, environment, network (CIDR) or code. Absent for events
    /// that named no key (grouped by key or network or code), or no stored key (grouped
    /// by a key's owner, system or environment).
    pub group: Option<String>,
    /// Grouped by key: the key's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub events: i64,
    pub codes: BTreeMap<String, i64>,
}

/// `GET /v1/usage/stats`: events over a window, grouped, most events first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageStats {
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    pub group_by: String,
    pub groups: Vec<UsageStatsGroup>,
}

/// A key used from the searched network.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageSearchHit {
    /// Absent for events that named no key (malformed keys).
    pub key_id: Option<String>,
    /// Absent when the id names no stored key (a guessed id).
    pub name: Option<String>,
    pub owner: Option<String>,
    pub environment: Option<String>,
    /// Events from the network in the window, allowed or denied.
    pub events: i64,
    /// Of those, events answered VALID.
    pub valid: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// The /24 (/64) networks inside the searched one the events came from.
    pub networks: Vec<String>,
}

/// `GET /v1/usage/search`: which keys were used from a network.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageSearch {
    pub source: String,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    pub keys: Vec<UsageSearchHit>,
}
