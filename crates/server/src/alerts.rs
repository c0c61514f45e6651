//! The monitor: verify hands it a sighting of every answer worth a look (a dead key, a
//! canary, a wrong secret, an unknown or malformed key, a denied scope, a key presented
//! for another environment), off the hot path; it raises alerts within the second.
//!
//! - KEY_STILL_IN_USE: a revoked, expired or suspended key presented (high).
//! - CANARY_USED: a canary key presented, by anyone (critical).
//! - ENVIRONMENT_CROSSING: a key presented for another environment (medium).
//! - SECRET_GUESSING: wrong secrets for a real key id beyond the environment's
//!   `alert_secret_guessing` rate, from any number of sources (high).
//! - SCOPE_PROBING: SCOPE_DENIED answers for one key beyond `alert_scope_probing` (medium).
//! - BRUTE_FORCE: malformed keys, unknown ids and wrong secrets from one source beyond
//!   `alert_brute_force` (medium).
//!
//! Counting uses one GCRA cell per key or source: a threshold `N/T` trips on more than
//! `N` events at once or a sustained rate above it. An alert folds its repeats: every
//! alert has a place (kind, key, source network), and while an alert holds its place
//! (unresolved, raised within the alert window) sightings only count up on it, in
//! memory, written every second, so a client retrying in a loop cannot flood the trail
//! or the services. The store makes the place unique, so nodes fold into one alert too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use keywarden_core::model::StateCause;
use keywarden_core::model::{Actor, AuditEntry};
use keywarden_core::policy::{AlertAction, DEFAULT_THROTTLE};
use keywarden_core::rate::Rate;
use keywarden_core::{KeyRecord, KeyState, VerifyCode};
use keywarden_store::{NewAlert, Raised};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::behaviour::{Behaviour, Use};
use crate::cache::Lookup;
use crate::limits::micros;
use crate::state::SharedState;

pub const KEY_STILL_IN_USE: &str = "KEY_STILL_IN_USE";
pub const CANARY_USED: &str = "CANARY_USED";
pub const ENVIRONMENT_CROSSING: &str = "ENVIRONMENT_CROSSING";
pub const SECRET_GUESSING: &str = "SECRET_GUESSING";
pub const SCOPE_PROBING: &str = "SCOPE_PROBING";
pub const BRUTE_FORCE: &str = "BRUTE_FORCE";

/// Every kind the monitor raises.
pub const KINDS: [&str; 9] = keywarden_core::policy::ALERT_KINDS;

const QUEUE: usize = 10_000;
/// Places and counters remembered at most; the oldest are forgotten first when full.
const MAX_PLACES: usize = 100_000;
/// Sources named in an alert's evidence at most.
const MAX_EVIDENCE_SOURCES: usize = 10;

/// What a verify answer showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// A dead key (revoked, expired, suspended, owner disabled), dead since then.
    Dead(Option<OffsetDateTime>),
    Canary,
    /// The right id with a wrong secret.
    WrongSecret,
    /// A malformed key or an id that does not exist.
    Unknown,
    ScopeDenied,
    /// The key's environment is not the one asked for (the asked one).
    EnvironmentCrossing(Option<String>),
    /// A valid use unlike the key's usual ones (`behaviour`).
    Unusual,
}

#[derive(Debug, Clone)]
pub struct Sighting {
    pub time: OffsetDateTime,
    pub what: What,
    pub key_id: Option<String>,
    /// The key's environment, when the key is known.
    pub environment: Option<String>,
    pub code: VerifyCode,
    pub source_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub subject: Option<String>,
    pub scope: Option<String>,
    /// Who asked (the gateway's token).
    pub asked_by: Actor,
}

/// Whether a verify answer means a dead key is still being presented.
pub fn is_still_in_use(code: VerifyCode) -> bool {
    matches!(
        code,
        VerifyCode::Revoked
            | VerifyCode::Expired
            | VerifyCode::IdleExpired
            | VerifyCode::Suspended
            | VerifyCode::OwnerDisabled
    )
}

/// When the key stopped being usable, as well as the record tells.
pub fn dead_since(k: &KeyRecord, code: VerifyCode, now: OffsetDateTime) -> Option<OffsetDateTime> {
    match code {
        VerifyCode::Expired if k.expires_at <= now && k.state != KeyState::Expired => {
            Some(k.expires_at)
        }
        _ => k
            .state_changed_at
            .or(Some(k.expires_at).filter(|t| *t <= now)),
    }
}

pub fn channel() -> (mpsc::Sender<Sighting>, mpsc::Receiver<Sighting>) {
    mpsc::channel(QUEUE)
}

/// Batches of valid uses from the usage writer, for `behaviour`.
pub fn uses_channel() -> (mpsc::Sender<Vec<Use>>, mpsc::Receiver<Vec<Use>>) {
    mpsc::channel(1024)
}

/// The network an address belongs to for alert places (a /24 of IPv4, a /64 of IPv6).
/// A client can change its user agent and subject per request, so neither is part of
/// a place: each change would otherwise be a new alert.
pub fn source_network(ip: IpAddr) -> ipnet::IpNet {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let prefix = if ip.is_ipv4() { 24 } else { 64 };
    ipnet::IpNet::new(ip, prefix).map_or_else(|_| ipnet::IpNet::from(ip), |n| n.trunc())
}

fn network_text(ip: Option<IpAddr>) -> String {
    ip.map_or_else(|| "unknown".to_owned(), |ip| source_network(ip).to_string())
}

struct Held {
    seq: i64,
    at: OffsetDateTime,
    unrecorded_repeats: i64,
    last_at: OffsetDateTime,
    /// The latest sighting counted in memory: raised as a new alert in the alert's
    /// place if it was resolved meanwhile (here or on another node). Kept as it came,
    /// and built into an alert only then: a flood repeats thousands of times a second.
    latest: Option<Box<(Sighting, Trip)>>,
}

/// A GCRA cell counting one key's or source's events, and what the evidence names.
struct Counter {
    tat: i64,
    events: u64,
    first_at: OffsetDateTime,
    sources: Vec<String>,
}

#[derive(Default)]
struct Monitor {
    held: HashMap<String, Held>,
    counters: HashMap<String, Counter>,
    behaviour: Behaviour,
}

/// An alert to raise (or count a repeat of).
#[derive(Clone)]
struct Trip {
    kind: &'static str,
    severity: &'static str,
    place: String,
    evidence: serde_json::Value,
}

pub async fn run(
    app: SharedState,
    mut rx: mpsc::Receiver<Sighting>,
    mut uses: mpsc::Receiver<Vec<Use>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut m = Monitor::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            s = rx.recv() => match s {
                Some(s) => m.sighting(&app, s).await,
                None => break,
            },
            Some(batch) = uses.recv() => {
                if app.watching() {
                    m.uses(&app, batch).await;
                }
            }
            _ = tick.tick() => {
                m.flush_repeats(&app).await;
                let dropped = app.alerts_dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
                if dropped > 0 {
                    tracing::warn!(dropped, "monitor queue full: sightings were dropped (their uses are in the usage log)");
                }
                let now = app.now();
                m.counters.retain(|_, c| c.tat > micros(now));
                app.limits.sweep(micros(now));
                ticks += 1;
                if ticks % 60 == 0 {
                    m.behaviour.forget_idle(now);
                }
            }
            _ = stop.changed() => {
                while let Ok(s) = rx.try_recv() {
                    m.sighting(&app, s).await;
                }
                break;
            }
        }
    }
    m.flush_repeats(&app).await;
}

impl Monitor {
    /// Learns from a batch of valid uses; raises what is unusual about them.
    async fn uses(&mut self, app: &SharedState, batch: Vec<Use>) {
        for u in batch {
            // The key's environment picks its rules. Evicted from the cache (another
            // node's change, this node's own alert on it), it is read from the store:
            // judging it by the default rules would be judging it by the wrong ones.
            let record = match app.keys.lookup(&u.key_id, u.time) {
                Lookup::Fresh(Some(k)) | Lookup::Stale(Some(k), _) => Some(k),
                _ => match app.store.get_key(&u.key_id).await {
                    Ok(k) => k.map(|k| std::sync::Arc::new(crate::cache::CachedKey::new(k))),
                    Err(e) => {
                        tracing::warn!(key_id = %u.key_id, error = %e, "cannot read a key the monitor judges; its use is skipped");
                        continue;
                    }
                },
            };
            let environment = record.as_ref().map(|k| k.environment.clone());
            let rules = app.with_cached_policy(|p| {
                p.rules_for(environment.as_deref().unwrap_or_default())
                    .watch
                    .clone()
            });
            if let Some(k) = record
                .filter(|k| !self.behaviour.knows(&k.id) && u.time - k.created_at >= rules.warmup)
            {
                self.seed(app, &k, u.time).await;
            }
            let unusual = self.behaviour.observe(&u, &rules);
            if unusual.is_empty() {
                continue;
            }
            let key = u.key_id.to_string();
            let s = Sighting {
                time: u.time,
                what: What::Unusual,
                key_id: Some(key.clone()),
                environment,
                code: VerifyCode::Valid,
                source_ip: u.source_ip,
                user_agent: None,
                subject: u.subject.clone(),
                scope: None,
                asked_by: monitor_actor(),
            };
            for x in unusual {
                let trip = Trip {
                    kind: x.kind,
                    severity: x.severity,
                    place: format!("{} key:{key} {}", x.kind, x.about),
                    evidence: x.evidence,
                };
                self.raise(app, &s, trip).await;
            }
        }
    }

    /// Starts a key past its warm-up from its rollups; on a store error it learns afresh
    /// (quiet for a warm-up) rather than alert on every source.
    async fn seed(&mut self, app: &SharedState, k: &crate::cache::CachedKey, now: OffsetDateTime) {
        let since = now - time::Duration::days(30);
        let ms =
            |t: OffsetDateTime| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        match app.store.known_sources(&k.id, ms(since), ms(now)).await {
            Ok(known) => self.behaviour.seed(
                &k.id,
                k.created_at,
                now,
                known.networks.iter().filter_map(|n| n.parse().ok()),
                known.subjects,
            ),
            Err(e) => {
                tracing::warn!(key_id = %k.id, error = %e, "cannot read a key's usage rollups; it learns afresh");
            }
        }
    }

    async fn sighting(&mut self, app: &SharedState, s: Sighting) {
        for trip in self.judge(app, &s) {
            self.raise(app, &s, trip).await;
        }
    }

    /// The alerts this sighting raises or repeats.
    fn judge(&mut self, app: &SharedState, s: &Sighting) -> Vec<Trip> {
        let key = s.key_id.as_deref().unwrap_or("-");
        let net = network_text(s.source_ip);
        let mut trips = Vec::new();
        let (watch_key, watch_source) = app.with_cached_policy(|p| {
            (
                p.rules_for(s.environment.as_deref().unwrap_or_default())
                    .watch
                    .clone(),
                p.rules_for("").watch.brute_force,
            )
        });
        match &s.what {
            What::Dead(since) => trips.push(Trip {
                kind: KEY_STILL_IN_USE,
                severity: "high",
                place: format!("{KEY_STILL_IN_USE} key:{key} net:{net}"),
                evidence: json!({
                    "dead_for_ms": since.map(|t| ms_between(t, s.time)),
                }),
            }),
            What::Canary => trips.push(Trip {
                kind: CANARY_USED,
                severity: "critical",
                place: format!("{CANARY_USED} key:{key} net:{net}"),
                evidence: json!({}),
            }),
            What::EnvironmentCrossing(asked) => trips.push(Trip {
                kind: ENVIRONMENT_CROSSING,
                severity: "medium",
                place: format!(
                    "{ENVIRONMENT_CROSSING} key:{key} asked:{}",
                    asked.as_deref().unwrap_or("-")
                ),
                evidence: json!({
                    "key_environment": s.environment,
                    "asked_environment": asked,
                }),
            }),
            What::ScopeDenied => {
                if let Some(evidence) =
                    self.count(format!("scope key:{key}"), &watch_key.scope_probing, s)
                {
                    trips.push(Trip {
                        kind: SCOPE_PROBING,
                        severity: "medium",
                        place: format!("{SCOPE_PROBING} key:{key}"),
                        evidence,
                    });
                }
            }
            What::WrongSecret | What::Unknown | What::Unusual => {}
        }
        if s.what == What::WrongSecret {
            if let Some(evidence) =
                self.count(format!("secret key:{key}"), &watch_key.secret_guessing, s)
            {
                trips.push(Trip {
                    kind: SECRET_GUESSING,
                    severity: "high",
                    place: format!("{SECRET_GUESSING} key:{key}"),
                    evidence,
                });
            }
        }
        if matches!(s.what, What::WrongSecret | What::Unknown | What::Canary) {
            if let Some(ip) = s.source_ip {
                if let Some(evidence) = self.count(format!("source:{ip}"), &watch_source, s) {
                    trips.push(Trip {
                        kind: BRUTE_FORCE,
                        severity: "medium",
                        place: format!("{BRUTE_FORCE} net:{net}"),
                        evidence,
                    });
                }
            }
        }
        trips
    }

    /// Counts one event on a counter; the evidence when the threshold is crossed.
    fn count(&mut self, name: String, rate: &Rate, s: &Sighting) -> Option<serde_json::Value> {
        let now = micros(s.time);
        if self.counters.len() >= MAX_PLACES && !self.counters.contains_key(&name) {
            self.counters.retain(|_, c| c.tat > now);
            if self.counters.len() >= MAX_PLACES {
                return None;
            }
        }
        let c = self.counters.entry(name).or_insert_with(|| Counter {
            tat: 0,
            events: 0,
            first_at: s.time,
            sources: Vec::new(),
        });
        if c.tat <= now {
            // At rest again: a new episode.
            c.events = 0;
            c.first_at = s.time;
            c.sources.clear();
        }
        c.events += 1;
        let source = s.source_ip.map(|ip| ip.to_string());
        if let Some(src) = source {
            if c.sources.len() < MAX_EVIDENCE_SOURCES && !c.sources.contains(&src) {
                c.sources.push(src);
            }
        }
        match rate.admit(c.tat, now) {
            Ok(tat) => {
                c.tat = tat;
                None
            }
            Err(_) => Some(json!({
                "events": c.events,
                "threshold": rate.to_string(),
                "since": c.first_at.unix_timestamp(),
                "sources": c.sources,
            })),
        }
    }

    async fn raise(&mut self, app: &SharedState, s: &Sighting, trip: Trip) {
        let window = app.config.alert_window;
        let held = self
            .held
            .get_mut(&trip.place)
            .filter(|h| s.time - h.at < window);
        let action = app.with_cached_policy(|p| {
            p.rules_for(s.environment.as_deref().unwrap_or_default())
                .watch
                .action_for(trip.kind)
        });
        if let Some(h) = held {
            h.unrecorded_repeats += 1;
            h.last_at = h.last_at.max(s.time);
            h.latest = Some(Box::new((s.clone(), trip.clone())));
            if action == AlertAction::Throttle {
                throttle(app, s);
            }
            return;
        }
        let (alert, entry) = new_alert(s, &trip);
        match app.store.raise_alert(&alert, &entry, s.time - window).await {
            Ok(raised) => {
                if let Raised::New(seq) = raised {
                    tracing::warn!(kind = trip.kind, severity = trip.severity, key_id = ?s.key_id,
                        source_ip = ?alert.source_ip, seq, "alert raised");
                }
                match action {
                    AlertAction::Notify => {}
                    AlertAction::Throttle => throttle(app, s),
                    AlertAction::Suspend => {
                        if let Err(e) = suspend(app, s, trip.kind, raised.seq()).await {
                            tracing::error!(kind = trip.kind, key_id = ?s.key_id, error = %e,
                                "cannot suspend the key an alert names");
                        }
                    }
                }
                if self.held.len() >= MAX_PLACES {
                    self.forget_oldest();
                }
                self.held.insert(
                    trip.place,
                    Held {
                        seq: raised.seq(),
                        at: s.time,
                        unrecorded_repeats: 0,
                        last_at: s.time,
                        latest: None,
                    },
                );
            }
            // The verify itself is in the usage log either way.
            Err(e) => {
                tracing::error!(kind = trip.kind, key_id = ?s.key_id, error = %e, "cannot store an alert")
            }
        }
    }

    async fn flush_repeats(&mut self, app: &SharedState) {
        let window = app.config.alert_window;
        for h in self.held.values_mut().filter(|h| h.unrecorded_repeats > 0) {
            let result = match app
                .store
                .repeat_alert(h.seq, h.unrecorded_repeats, h.last_at)
                .await
            {
                Ok(true) => Ok(()),
                // Resolved meanwhile: the latest sighting opens a new alert, which the
                // others (all after the resolve, or close to it) repeat.
                Ok(false) => match h.latest.take() {
                    Some(latest) => {
                        let (s, trip) = *latest;
                        let (alert, entry) = new_alert(&s, &trip);
                        let n = h.unrecorded_repeats - 1;
                        match app
                            .store
                            .raise_alert(&alert, &entry, alert.time - window)
                            .await
                        {
                            Ok(raised) => {
                                h.seq = raised.seq();
                                h.at = alert.time;
                                if n > 0 {
                                    let _ = app.store.repeat_alert(h.seq, n, h.last_at).await;
                                }
                                Ok(())
                            }
                            Err(e) => Err(e),
                        }
                    }
                    None => Ok(()),
                },
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => h.unrecorded_repeats = 0,
                Err(e) => {
                    tracing::warn!(seq = h.seq, error = %e, "cannot count alert repeats; will retry");
                    return;
                }
            }
        }
        let now = app.now();
        self.held
            .retain(|_, h| h.unrecorded_repeats > 0 || now - h.at < window);
    }

    fn forget_oldest(&mut self) {
        let oldest = self
            .held
            .iter()
            .filter(|(_, h)| h.unrecorded_repeats == 0)
            .min_by_key(|(_, h)| h.at)
            .map(|(p, _)| p.clone());
        if let Some(p) = oldest {
            self.held.remove(&p);
        }
    }
}

/// A sighting as a new alert, with the audit entry that raises it.
fn new_alert(s: &Sighting, trip: &Trip) -> (NewAlert, AuditEntry) {
    let source_ip = s.source_ip.map(|ip| ip.to_string());
    let since_ms = match &s.what {
        What::Dead(since) => since.map(|t| ms_between(t, s.time)),
        _ => None,
    };
    let entry = audit_entry(s, trip, source_ip.as_deref(), since_ms);
    let alert = NewAlert {
        time: s.time,
        kind: trip.kind.to_owned(),
        severity: trip.severity.to_owned(),
        key_id: s.key_id.clone(),
        code: s.code.as_str().to_owned(),
        source_ip,
        user_agent: s.user_agent.clone(),
        subject: s.subject.clone(),
        since_ms,
        evidence: trip.evidence.to_string(),
        place: trip.place.clone(),
    };
    (alert, entry)
}

/// The audit entry of a new alert. A dead key's keeps the action it always had
/// (`key.still_in_use`, by the asking gateway); the others are the monitor's.
fn audit_entry(
    s: &Sighting,
    trip: &Trip,
    source_ip: Option<&str>,
    since_ms: Option<i64>,
) -> AuditEntry {
    let details = json!({
        "alert": trip.kind,
        "severity": trip.severity,
        "code": s.code.as_str(),
        "source_ip": source_ip,
        "user_agent": s.user_agent,
        "subject": s.subject,
        "scope": s.scope,
        "since_ms": since_ms,
        "evidence": trip.evidence,
        "asked_by": s.asked_by.id,
    })
    .to_string();
    let target = match &s.key_id {
        Some(k) => format!("key:{k}"),
        None => format!("source:{}", network_text(s.source_ip)),
    };
    if trip.kind == KEY_STILL_IN_USE {
        return AuditEntry {
            time: s.time,
            actor: s.asked_by.clone(),
            action: "key.still_in_use".to_owned(),
            target,
            reason: Some(format!("{} key presented to verify", s.code.as_str())),
            details,
        };
    }
    let action = if s.key_id.is_some() {
        "key.alert"
    } else {
        "source.alert"
    };
    AuditEntry {
        time: s.time,
        actor: monitor_actor(),
        action: action.to_owned(),
        target,
        reason: Some(format!("{} ({})", trip.kind, trip.severity)),
        details,
    }
}

pub fn monitor_actor() -> Actor {
    Actor {
        id: "system:monitor".to_owned(),
        name: "monitor".to_owned(),
        source_ip: None,
        user_agent: None,
        request_id: None,
    }
}

/// The `throttle` response: the sighting's source answers RATE_LIMITED on this node for
/// one throttle period.
fn throttle(app: &SharedState, s: &Sighting) {
    let Some(ip) = s.source_ip else {
        return;
    };
    let rate = app
        .with_cached_policy(|p| p.rules_for("").throttle_failures)
        .unwrap_or(DEFAULT_THROTTLE);
    app.limits.penalize(ip, &rate, micros(s.time));
}

/// The `suspend` response: the key the alert names is suspended, as a person's suspend
/// would be (audited, evicted, delivered to services), by `system:monitor`, with the
/// cause ALERT_RESPONSE so that it is told apart from a person's.
async fn suspend(
    app: &SharedState,
    s: &Sighting,
    kind: &str,
    seq: i64,
) -> Result<(), crate::error::ApiError> {
    let Some(id) = s.key_id.as_deref() else {
        return Ok(());
    };
    let id = keywarden_core::KeyId::parse(id)
        .map_err(|e| crate::error::ApiError::Internal(format!("alert key id: {e}")))?;
    // A few tries: a concurrent change (a person's suspend, a use folded) moves the
    // version under us.
    for _ in 0..3 {
        let Some(key) = app.store.get_key(&id).await? else {
            return Ok(());
        };
        if key.effective_state(s.time) != KeyState::Active {
            return Ok(());
        }
        let mut held = key.clone();
        held.state = KeyState::Suspended;
        held.state_reason = Some(format!("{kind} alert {seq}"));
        held.state_cause = Some(StateCause::AlertResponse);
        held.state_changed_at = Some(s.time);
        let entry = AuditEntry {
            time: s.time,
            actor: monitor_actor(),
            action: "key.suspended".to_owned(),
            target: format!("key:{id}"),
            reason: held.state_reason.clone(),
            details: json!({
                "state": {"before": key.state.as_str(), "after": "suspended"},
                "alert": kind,
                "alert_seq": seq,
            })
            .to_string(),
        };
        if app.store.update_key_state(&held, &entry).await? {
            app.keys.evict(&id);
            tracing::warn!(key_id = %id, kind, seq, "key suspended in response to an alert");
            return Ok(());
        }
    }
    Err(crate::error::ApiError::Internal(
        "the key kept changing while the monitor tried to suspend it".to_owned(),
    ))
}

fn ms_between(from: OffsetDateTime, to: OffsetDateTime) -> i64 {
    i64::try_from((to - from).whole_milliseconds()).unwrap_or(i64::MAX)
}
