//! Key policy: rules per environment over a default section, read from TOML, and the
//! check a key request must pass at issue time (every violation, not the first).
//!
//! ```toml
//! [default]
//! max_ttl = "90d"
//! idle_expiry = "30d"
//! allowed_scopes = ["deploy:*", "db:*"]
//!
//! [environments.prod]
//! forbid_wildcards = true
//! require_cidrs = true
//! ```
//!
//! An environment section overrides the default rule by rule; a rule absent from both
//! takes the built-in default (`Rules::default`).

use std::collections::BTreeMap;

use serde::Deserialize;
use time::Duration;

use crate::duration::{format_duration, parse_duration};
use crate::rate::Rate;
use crate::scope::Scope;

/// What the enforcer does when a key's rotation is overdue, or when an existing key
/// breaks a policy that tightened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRotationOverdue {
    Notify,
    Suspend,
}

/// What happens to a disabled owner's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnOwnerDisabled {
    Revoke,
    Suspend,
}

/// The rules in force for one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// A key unused this long expires (`IDLE_EXPIRED`).
    pub idle_expiry: Duration,
    pub require_owner: bool,
    /// The longest lifetime of a new admin token; one asked for without a TTL gets this
    /// one. Read from `[default]` only: admin tokens belong to no environment.
    pub max_token_ttl: Option<Duration>,
    /// Keys may only be issued to owners in the registry (`owner add`, SCIM), so that
    /// every key holder is one the identity provider can offboard.
    pub require_registered_owner: bool,
    pub require_systems: bool,
    /// A verify of this environment's keys must name a scope; without one it answers
    /// SCOPE_DENIED.
    pub require_scope_on_verify: bool,
    /// Scopes a key may be granted: each granted scope must be covered by one of these.
    /// `None`: any scope.
    pub allowed_scopes: Option<Vec<Scope>>,
    pub forbid_wildcards: bool,
    pub require_cidrs: bool,
    pub max_uses_limit: Option<u64>,
    pub rotation_period: Option<Duration>,
    pub expiry_notice: Option<Duration>,
    pub on_rotation_overdue: OnRotationOverdue,
    pub on_owner_disabled: OnOwnerDisabled,
    /// What the enforcer does with an existing key that breaks these rules (after a
    /// policy tightened): note it once per policy version, or suspend it.
    pub on_violation: OnRotationOverdue,
    /// The rate limit of a new key that names none.
    pub rate_limit: Option<Rate>,
    /// A key's rate limit must be within this one (a key that names none gets
    /// `rate_limit`, or else this one).
    pub max_rate_limit: Option<Rate>,
    /// What the monitor counts as an attack on this environment's keys.
    pub watch: WatchRules,
    /// Failures (malformed keys, unknown ids, wrong secrets) one source may present
    /// before it is throttled (`RATE_LIMITED`); `None` turns throttling off. Read from
    /// `[default]` only: a malformed key names no environment.
    pub throttle_failures: Option<Rate>,
    /// How long raw usage events of this environment's keys are kept; `None`: the
    /// server's `--usage-retention`. The server keeps the longer of the two.
    pub usage_retention: Option<Duration>,
}

/// Every alert kind the monitor raises.
pub const ALERT_KINDS: [&str; 9] = [
    "KEY_STILL_IN_USE",
    "CANARY_USED",
    "ENVIRONMENT_CROSSING",
    "SECRET_GUESSING",
    "SCOPE_PROBING",
    "BRUTE_FORCE",
    "RATE_SPIKE",
    "NEW_SOURCE",
    "NEW_SUBJECT",
];

/// What the monitor does when an alert is raised, besides storing and delivering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertAction {
    /// Store it and deliver it to the services subscribed to `alert` (always done).
    Notify,
    /// Also throttle the sources in its evidence (RATE_LIMITED for one throttle period).
    Throttle,
    /// Also suspend the key (audited as `system:monitor`, propagated like any suspend).
    Suspend,
}

impl AlertAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Notify => "notify",
            Self::Throttle => "throttle",
            Self::Suspend => "suspend",
        }
    }
}

/// Thresholds of the alerts that count events in a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRules {
    /// Wrong secrets presented for one real key id (SECRET_GUESSING).
    pub secret_guessing: Rate,
    /// SCOPE_DENIED answers for one key (SCOPE_PROBING).
    pub scope_probing: Rate,
    /// MALFORMED and NOT_FOUND answers to one source (BRUTE_FORCE).
    pub brute_force: Rate,
    /// Per alert kind, what to do beyond notifying; kinds not named only notify.
    pub actions: BTreeMap<String, AlertAction>,
    /// How long a key learns its normal use quietly before RATE_SPIKE, NEW_SOURCE and
    /// NEW_SUBJECT are raised for it.
    pub warmup: Duration,
    /// RATE_SPIKE: a minute with more than this many times the key's usual uses a
    /// minute ...
    pub spike_factor: u32,
    /// ... and more than this many uses.
    pub spike_floor: u32,
}

impl WatchRules {
    pub fn action_for(&self, kind: &str) -> AlertAction {
        self.actions
            .get(kind)
            .copied()
            .unwrap_or(AlertAction::Notify)
    }
}

impl Default for WatchRules {
    /// Quiet for a misconfigured client retrying at a human pace; loud for a script.
    fn default() -> Self {
        let per_min = |count| Rate {
            count,
            per: Duration::MINUTE,
        };
        Self {
            secret_guessing: Rate {
                count: 10,
                per: Duration::minutes(5),
            },
            scope_probing: per_min(10),
            brute_force: per_min(50),
            actions: BTreeMap::new(),
            warmup: Duration::days(1),
            spike_factor: 10,
            spike_floor: 60,
        }
    }
}

/// The default throttle: a source presenting more than 30 bad keys a minute.
pub const DEFAULT_THROTTLE: Rate = Rate {
    count: 30,
    per: Duration::MINUTE,
};

impl Default for Rules {
    /// The mission's defaults: 90-day keys, at most a year, idle for 30 days expires,
    /// an owner always, departed owners' keys revoked.
    fn default() -> Self {
        Self {
            default_ttl: Duration::days(90),
            max_ttl: Duration::days(365),
            idle_expiry: Duration::days(30),
            require_owner: true,
            require_registered_owner: false,
            max_token_ttl: None,
            require_systems: false,
            require_scope_on_verify: false,
            allowed_scopes: None,
            forbid_wildcards: false,
            require_cidrs: false,
            max_uses_limit: None,
            rotation_period: None,
            // Notices are opt-in: a default would flood short-lived keys with them.
            expiry_notice: None,
            on_rotation_overdue: OnRotationOverdue::Notify,
            on_owner_disabled: OnOwnerDisabled::Revoke,
            on_violation: OnRotationOverdue::Notify,
            rate_limit: None,
            max_rate_limit: None,
            watch: WatchRules::default(),
            throttle_failures: Some(DEFAULT_THROTTLE),
            usage_retention: None,
        }
    }
}

/// One section as written: every rule optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    default_ttl: Option<String>,
    max_ttl: Option<String>,
    idle_expiry: Option<String>,
    require_owner: Option<bool>,
    require_registered_owner: Option<bool>,
    max_token_ttl: Option<String>,
    require_systems: Option<bool>,
    require_scope_on_verify: Option<bool>,
    allowed_scopes: Option<Vec<String>>,
    forbid_wildcards: Option<bool>,
    require_cidrs: Option<bool>,
    max_uses_limit: Option<u64>,
    rotation_period: Option<String>,
    expiry_notice: Option<String>,
    on_rotation_overdue: Option<OnRotationOverdue>,
    on_owner_disabled: Option<OnOwnerDisabled>,
    on_violation: Option<OnRotationOverdue>,
    rate_limit: Option<String>,
    max_rate_limit: Option<String>,
    alert_secret_guessing: Option<String>,
    alert_scope_probing: Option<String>,
    alert_brute_force: Option<String>,
    /// A rate, or `off`.
    throttle_failures: Option<String>,
    alert_actions: Option<BTreeMap<String, AlertAction>>,
    alert_warmup: Option<String>,
    alert_rate_spike_factor: Option<u32>,
    alert_rate_spike_floor: Option<u32>,
    usage_retention: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    default: Section,
    #[serde(default)]
    environments: BTreeMap<String, Section>,
}

/// A policy: the default rules and each environment's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    default: Rules,
    environments: BTreeMap<String, Rules>,
}

/// Everything wrong with a policy file, each with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy: {}", .0.join("; "))]
pub struct PolicyError(pub Vec<String>);

impl Policy {
    /// Parses and checks a policy file; reports every problem found.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let doc: Document =
            toml::from_str(text).map_err(|e| PolicyError(vec![e.message().to_owned()]))?;
        let mut problems = Vec::new();
        let default = apply(&Rules::default(), &doc.default, "default", &mut problems);
        let mut environments = BTreeMap::new();
        for (env, section) in &doc.environments {
            if let Err(e) = crate::validate::environment(env) {
                problems.push(format!("environments.{env}: {}", e.message));
                continue;
            }
            let rules = apply(
                &default,
                section,
                &format!("environments.{env}"),
                &mut problems,
            );
            environments.insert(env.clone(), rules);
        }
        if problems.is_empty() {
            Ok(Self {
                default,
                environments,
            })
        } else {
            Err(PolicyError(problems))
        }
    }

    /// The shortest idle expiry of any environment: keys unused for less are idle nowhere.
    pub fn min_idle_expiry(&self) -> Duration {
        self.environments
            .values()
            .map(|r| r.idle_expiry)
            .fold(self.default.idle_expiry, Duration::min)
    }

    /// The longest rotation period and expiry notice of any environment (`None` when
    /// no environment sets one): how far the enforcer must look.
    pub fn notice_horizons(&self) -> (Option<Duration>, Option<Duration>) {
        let all = || std::iter::once(&self.default).chain(self.environments.values());
        (
            all().filter_map(|r| r.rotation_period).min(),
            all().filter_map(|r| r.expiry_notice).max(),
        )
    }

    /// The rules in force in `environment`.
    /// The longest lifetime of a new admin token (`[default] max_token_ttl`).
    pub fn max_token_ttl(&self) -> Option<Duration> {
        self.default.max_token_ttl
    }

    /// How long usage events are kept, given the server's `floor` (`--usage-retention`):
    /// for events of keys in environments without a section, and of no known key, the
    /// longer of the floor and `[default]`'s `usage_retention`; for each environment with a
    /// section, the longer of the floor and its own (inherited from `[default]` when it
    /// sets none). Only environments that differ from the first are listed.
    pub fn usage_retention(&self, floor: Duration) -> (Duration, BTreeMap<String, Duration>) {
        let keep = |r: &Rules| r.usage_retention.map_or(floor, |d| d.max(floor));
        let default = keep(&self.default);
        let environments = self
            .environments
            .iter()
            .map(|(env, r)| (env.clone(), keep(r)))
            .filter(|(_, d)| *d != default)
            .collect();
        (default, environments)
    }

    pub fn rules_for(&self, environment: &str) -> &Rules {
        self.environments.get(environment).unwrap_or(&self.default)
    }
}

fn apply(base: &Rules, s: &Section, at: &str, problems: &mut Vec<String>) -> Rules {
    let mut r = base.clone();
    let mut duration = |field: &str, v: &Option<String>, allow_zero: bool| -> Option<Duration> {
        let text = v.as_deref()?;
        match parse_duration(text) {
            Ok(d) if d > Duration::ZERO || allow_zero => Some(d),
            Ok(_) => {
                problems.push(format!("{at}.{field}: must be longer than zero"));
                None
            }
            Err(e) => {
                problems.push(format!("{at}.{field}: {e}"));
                None
            }
        }
    };
    if let Some(d) = duration("default_ttl", &s.default_ttl, false) {
        r.default_ttl = d;
    }
    if let Some(d) = duration("max_ttl", &s.max_ttl, false) {
        r.max_ttl = d;
    }
    if let Some(d) = duration("idle_expiry", &s.idle_expiry, false) {
        r.idle_expiry = d;
    }
    if let Some(d) = duration("usage_retention", &s.usage_retention, false) {
        r.usage_retention = Some(d);
    }
    let token_ttl = duration("max_token_ttl", &s.max_token_ttl, false);
    if let Some(d) = duration("alert_warmup", &s.alert_warmup, true) {
        r.watch.warmup = d;
    }
    if let Some(d) = duration("rotation_period", &s.rotation_period, false) {
        r.rotation_period = Some(d);
    }
    if let Some(d) = duration("expiry_notice", &s.expiry_notice, true) {
        r.expiry_notice = (d > Duration::ZERO).then_some(d);
    }
    if let Some(patterns) = &s.allowed_scopes {
        let mut scopes = Vec::new();
        for p in patterns {
            match Scope::granted(p) {
                Ok(scope) => scopes.push(scope),
                Err(e) => problems.push(format!("{at}.allowed_scopes: {e}")),
            }
        }
        r.allowed_scopes = Some(scopes);
    }
    if let Some(d) = token_ttl {
        if at == "default" {
            r.max_token_ttl = Some(d);
        } else {
            problems.push(format!(
                "{at}.max_token_ttl: admin tokens belong to no environment; set it in [default]"
            ));
        }
    }
    r.require_owner = s.require_owner.unwrap_or(r.require_owner);
    r.require_registered_owner = s
        .require_registered_owner
        .unwrap_or(r.require_registered_owner);
    r.require_systems = s.require_systems.unwrap_or(r.require_systems);
    r.require_scope_on_verify = s
        .require_scope_on_verify
        .unwrap_or(r.require_scope_on_verify);
    r.forbid_wildcards = s.forbid_wildcards.unwrap_or(r.forbid_wildcards);
    r.require_cidrs = s.require_cidrs.unwrap_or(r.require_cidrs);
    if let Some(m) = s.max_uses_limit {
        if m == 0 {
            problems.push(format!("{at}.max_uses_limit: must be 1 or more"));
        } else {
            r.max_uses_limit = Some(m);
        }
    }
    r.on_rotation_overdue = s.on_rotation_overdue.unwrap_or(r.on_rotation_overdue);
    r.on_owner_disabled = s.on_owner_disabled.unwrap_or(r.on_owner_disabled);
    r.on_violation = s.on_violation.unwrap_or(r.on_violation);
    let mut rate = |field: &str, v: &Option<String>| -> Option<Rate> {
        let text = v.as_deref()?;
        text.parse()
            .map_err(|e| problems.push(format!("{at}.{field}: {e}")))
            .ok()
    };
    if let Some(x) = rate("rate_limit", &s.rate_limit) {
        r.rate_limit = Some(x);
    }
    if let Some(x) = rate("max_rate_limit", &s.max_rate_limit) {
        r.max_rate_limit = Some(x);
    }
    if let Some(x) = rate("alert_secret_guessing", &s.alert_secret_guessing) {
        r.watch.secret_guessing = x;
    }
    if let Some(x) = rate("alert_scope_probing", &s.alert_scope_probing) {
        r.watch.scope_probing = x;
    }
    let source_wide = [
        ("alert_brute_force", &s.alert_brute_force),
        ("throttle_failures", &s.throttle_failures),
    ];
    if at != "default" {
        for (field, v) in source_wide {
            if v.is_some() {
                problems.push(format!(
                    "{at}.{field}: a source is judged before its key's environment is known; \
                     set it in [default]"
                ));
            }
        }
    } else {
        if let Some(x) = rate("alert_brute_force", &s.alert_brute_force) {
            r.watch.brute_force = x;
        }
        match s.throttle_failures.as_deref() {
            Some("off") => r.throttle_failures = None,
            Some(_) => {
                if let Some(x) = rate("throttle_failures", &s.throttle_failures) {
                    r.throttle_failures = Some(x);
                }
            }
            None => {}
        }
    }
    match s.alert_rate_spike_factor {
        Some(0 | 1) => problems.push(format!(
            "{at}.alert_rate_spike_factor: must be 2 or more (times the usual rate)"
        )),
        Some(f) => r.watch.spike_factor = f,
        None => {}
    }
    if let Some(f) = s.alert_rate_spike_floor {
        r.watch.spike_floor = f;
    }
    if let Some(actions) = &s.alert_actions {
        for (kind, action) in actions {
            if !ALERT_KINDS.contains(&kind.as_str()) {
                problems.push(format!(
                    "{at}.alert_actions: unknown alert kind {kind:?}: expected one of {}",
                    ALERT_KINDS.join(", ")
                ));
                continue;
            }
            let suspends_nothing = matches!(kind.as_str(), "BRUTE_FORCE" | "CANARY_USED");
            if *action == AlertAction::Suspend && suspends_nothing {
                problems.push(format!(
                    "{at}.alert_actions.{kind}: suspend has no key to act on (a source, or a \
                     canary); use throttle or notify"
                ));
                continue;
            }
            r.watch.actions.insert(kind.clone(), *action);
        }
    }
    if let (Some(d), Some(m)) = (r.rate_limit, r.max_rate_limit) {
        if !d.within(&m) {
            problems.push(format!(
                "{at}: rate_limit ({d}) is above max_rate_limit ({m})"
            ));
        }
    }
    // A section that lowers max_ttl below the default TTL it inherits (and sets none of
    // its own) issues keys of its max_ttl by default: `max_ttl = "30d"` alone must not
    // make the policy invalid. A default_ttl written in the same section is kept, and
    // checked below.
    if s.default_ttl.is_none() && r.default_ttl > r.max_ttl {
        r.default_ttl = r.max_ttl;
    }
    if r.default_ttl > r.max_ttl {
        problems.push(format!(
            "{at}: default_ttl ({}) is longer than max_ttl ({})",
            format_duration(r.default_ttl),
            format_duration(r.max_ttl)
        ));
    }
    r
}

/// What a key request asks for, as far as policy is concerned.
#[derive(Debug, Clone)]
pub struct KeyAsk<'a> {
    pub owner: &'a str,
    pub systems: &'a [String],
    pub scopes: &'a [Scope],
    pub ttl: Duration,
    pub has_cidrs: bool,
    pub max_uses: Option<u64>,
    pub rate_limit: Option<Rate>,
}

/// One broken rule: a stable code, the request field, and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyViolation {
    pub code: &'static str,
    pub field: &'static str,
    pub message: String,
}

/// Every rule an existing key breaks under `rules`: the issue-time check applied to what
/// the key holds, its lifetime counted from its creation.
pub fn check_existing(rules: &Rules, key: &crate::model::KeyRecord) -> Vec<PolicyViolation> {
    check_issue(
        rules,
        &KeyAsk {
            owner: &key.owner,
            systems: &key.systems,
            scopes: &key.scopes,
            ttl: key.expires_at - key.created_at,
            has_cidrs: !key.allowed_cidrs.is_empty(),
            max_uses: key.max_uses,
            rate_limit: key.rate_limit,
        },
    )
}

/// Every rule `ask` breaks, in field order.
pub fn check_issue(rules: &Rules, ask: &KeyAsk<'_>) -> Vec<PolicyViolation> {
    let mut v = Vec::new();
    let mut fail = |code, field, message: String| {
        v.push(PolicyViolation {
            code,
            field,
            message,
        })
    };
    if rules.require_owner && ask.owner.trim().is_empty() {
        fail(
            "POLICY_OWNER_REQUIRED",
            "owner",
            "the policy requires an owner".into(),
        );
    }
    if rules.require_systems && ask.systems.is_empty() {
        fail(
            "POLICY_SYSTEMS_REQUIRED",
            "systems",
            "the policy requires the systems the key touches".into(),
        );
    }
    for s in ask.scopes {
        if rules.forbid_wildcards && s.is_wildcard() {
            fail(
                "POLICY_WILDCARD_FORBIDDEN",
                "scopes",
                format!("{s}: wildcard scopes are forbidden here; name each scope"),
            );
        } else if let Some(allowed) = &rules.allowed_scopes {
            if !allowed.iter().any(|a| a.covers(s)) {
                let list: Vec<&str> = allowed.iter().map(Scope::as_str).collect();
                fail(
                    "POLICY_SCOPE_NOT_ALLOWED",
                    "scopes",
                    format!("{s} is outside the allowed scopes ({})", list.join(", ")),
                );
            }
        }
    }
    if ask.ttl > rules.max_ttl {
        fail(
            "TTL_TOO_LONG",
            "ttl",
            format!(
                "{} is longer than the policy's max_ttl of {}",
                format_duration(ask.ttl),
                format_duration(rules.max_ttl)
            ),
        );
    }
    if rules.require_cidrs && !ask.has_cidrs {
        fail(
            "POLICY_CIDRS_REQUIRED",
            "allowed_cidrs",
            "the policy requires a CIDR allowlist".into(),
        );
    }
    if let Some(limit) = rules.max_uses_limit {
        match ask.max_uses {
            None => fail(
                "POLICY_MAX_USES_REQUIRED",
                "max_uses",
                format!("the policy requires a usage cap of at most {limit}"),
            ),
            Some(m) if m > limit => fail(
                "POLICY_MAX_USES_TOO_HIGH",
                "max_uses",
                format!("{m} is above the policy's max_uses_limit of {limit}"),
            ),
            Some(_) => {}
        }
    }
    if let Some(max) = rules.max_rate_limit {
        match ask.rate_limit {
            None => fail(
                "POLICY_RATE_LIMIT_REQUIRED",
                "rate_limit",
                format!("the policy requires a rate limit of at most {max}"),
            ),
            Some(r) if !r.within(&max) => fail(
                "POLICY_RATE_LIMIT_TOO_HIGH",
                "rate_limit",
                format!("{r} is above the policy's max_rate_limit of {max}"),
            ),
            Some(_) => {}
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [default]
        max_ttl = "90d"
        default_ttl = "30d"
        idle_expiry = "14d"
        allowed_scopes = ["deploy:*", "db:*"]
        on_owner_disabled = "suspend"

        [environments.prod]
        forbid_wildcards = true
        require_cidrs = true
        require_systems = true
        max_ttl = "30d"
        max_uses_limit = 100
        max_rate_limit = "6000/h"
        alert_secret_guessing = "5/min"
        alert_actions = { SECRET_GUESSING = "suspend", SCOPE_PROBING = "throttle" }
    "#;

    fn scopes(s: &[&str]) -> Vec<Scope> {
        s.iter().map(|s| Scope::granted(s).unwrap()).collect()
    }

    #[test]
    fn sections_override_rule_by_rule() {
        let p = Policy::from_toml(FILE).unwrap();
        let dev = p.rules_for("dev");
        assert_eq!(dev.max_ttl, Duration::days(90));
        assert_eq!(dev.idle_expiry, Duration::days(14));
        assert_eq!(dev.on_owner_disabled, OnOwnerDisabled::Suspend);
        assert!(!dev.forbid_wildcards);
        let prod = p.rules_for("prod");
        assert_eq!(prod.max_ttl, Duration::days(30));
        assert_eq!(
            prod.idle_expiry,
            Duration::days(14),
            "inherited from default"
        );
        assert!(prod.forbid_wildcards && prod.require_cidrs);
        assert_eq!(prod.max_uses_limit, Some(100));
        assert_eq!(prod.max_rate_limit.unwrap().to_string(), "6000/h");
        assert_eq!(prod.watch.secret_guessing, "5/min".parse().unwrap());
        assert_eq!(dev.watch, WatchRules::default());
        assert_eq!(
            prod.watch.action_for("SECRET_GUESSING"),
            AlertAction::Suspend
        );
        assert_eq!(
            prod.watch.action_for("SCOPE_PROBING"),
            AlertAction::Throttle
        );
        assert_eq!(prod.watch.action_for("BRUTE_FORCE"), AlertAction::Notify);
        assert_eq!(dev.throttle_failures, Some(DEFAULT_THROTTLE));
        assert_eq!(
            Policy::default().rules_for("x").idle_expiry,
            Duration::days(30)
        );
    }

    #[test]
    fn a_lower_max_ttl_alone_lowers_the_default_ttl() {
        let p = Policy::from_toml("[environments.prod]\nmax_ttl = \"30d\"\n").unwrap();
        assert_eq!(p.rules_for("prod").default_ttl, Duration::days(30));
        assert_eq!(p.rules_for("dev").default_ttl, Duration::days(90));
        // Written in the same section, a default longer than the maximum is a mistake.
        assert!(Policy::from_toml(
            "[environments.prod]\nmax_ttl = \"30d\"\ndefault_ttl = \"60d\"\n"
        )
        .is_err());
    }

    #[test]
    fn every_violation_is_listed() {
        let p = Policy::from_toml(FILE).unwrap();
        let ask = KeyAsk {
            owner: "alice@example.com",
            systems: &[],
            scopes: &scopes(&["deploy:*", "admin:all", "db:orders:read"]),
            ttl: Duration::days(60),
            has_cidrs: false,
            max_uses: Some(500),
            rate_limit: Some("10/s".parse().unwrap()),
        };
        let codes: Vec<&str> = check_issue(p.rules_for("prod"), &ask)
            .iter()
            .map(|v| v.code)
            .collect();
        assert_eq!(
            codes,
            [
                "POLICY_SYSTEMS_REQUIRED",
                "POLICY_WILDCARD_FORBIDDEN",
                "POLICY_SCOPE_NOT_ALLOWED",
                "TTL_TOO_LONG",
                "POLICY_CIDRS_REQUIRED",
                "POLICY_MAX_USES_TOO_HIGH",
                "POLICY_RATE_LIMIT_TOO_HIGH",
            ]
        );
        // The same request fits dev, except the scope outside the allowlist.
        let codes: Vec<&str> = check_issue(p.rules_for("dev"), &ask)
            .iter()
            .map(|v| v.code)
            .collect();
        assert_eq!(codes, ["POLICY_SCOPE_NOT_ALLOWED"]);
    }

    #[test]
    fn a_compliant_request_passes() {
        let p = Policy::from_toml(FILE).unwrap();
        let ask = KeyAsk {
            owner: "alice@example.com",
            systems: &["github".to_owned()],
            scopes: &scopes(&["deploy:write", "db:orders:read"]),
            ttl: Duration::days(30),
            has_cidrs: true,
            max_uses: Some(100),
            rate_limit: Some("100/min".parse().unwrap()),
        };
        assert_eq!(check_issue(p.rules_for("prod"), &ask), vec![]);
    }

    #[test]
    fn bad_files_report_every_problem() {
        let e = Policy::from_toml(
            r#"
            [default]
            max_ttl = "forever"
            default_ttl = "400d"
            allowed_scopes = ["ok:*", "bad scope"]
            max_uses_limit = 0
            [environments."PROD!"]
            max_ttl = "1d"
            "#,
        )
        .unwrap_err();
        assert_eq!(e.0.len(), 5, "{e}");
        assert!(e.0.iter().any(|p| p.contains("longer than max_ttl")), "{e}");
        assert!(e.0[0].contains("default.max_ttl"), "{e}");
        assert!(e.0.iter().any(|p| p.contains("allowed_scopes")), "{e}");
        assert!(e.0.iter().any(|p| p.contains("max_uses_limit")), "{e}");
        assert!(e.0.iter().any(|p| p.contains("environments.PROD!")), "{e}");

        let e = Policy::from_toml(
            "[default]\nthrottle_failures = \"off\"\n[environments.prod]\nthrottle_failures = \"1/s\"\nrate_limit = \"fast\"\n",
        )
        .unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        assert!(
            e.0.iter()
                .any(|p| p.contains("environments.prod.throttle_failures")
                    && p.contains("set it in [default]")),
            "{e}"
        );
        assert!(
            e.0.iter()
                .any(|p| p.contains("environments.prod.rate_limit")),
            "{e}"
        );
        let e = Policy::from_toml(
            "[default]\nalert_actions = { SECRET_GESSING = \"suspend\", CANARY_USED = \"suspend\" }\n",
        )
        .unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        assert!(
            e.0.iter()
                .any(|p| p.contains("unknown alert kind \"SECRET_GESSING\"")),
            "{e}"
        );
        assert!(
            e.0.iter()
                .any(|p| p.contains("CANARY_USED: suspend has no key")),
            "{e}"
        );
        let p = Policy::from_toml("[default]\nthrottle_failures = \"off\"\n").unwrap();
        assert_eq!(p.rules_for("prod").throttle_failures, None);
        let e = Policy::from_toml("[default]\nrate_limit = \"2/s\"\nmax_rate_limit = \"1/s\"\n")
            .unwrap_err();
        assert!(e.0[0].contains("above max_rate_limit"), "{e}");

        let e = Policy::from_toml("[default]\nmax_tll = \"30d\"\n").unwrap_err();
        assert!(e.0[0].contains("unknown field `max_tll`"), "{e}");
        let e = Policy::from_toml("[default]\non_owner_disabled = \"ignore\"\n").unwrap_err();
        assert!(e.0[0].contains("unknown variant"), "{e}");
        let e =
            Policy::from_toml("[default]\ndefault_ttl = \"30d\"\nmax_ttl = \"7d\"\n").unwrap_err();
        assert!(e.0[0].contains("longer than max_ttl"), "{e}");
    }
}
