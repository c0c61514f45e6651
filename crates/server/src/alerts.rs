//! KEY_STILL_IN_USE: a revoked, expired or suspended key presented to verify means the
//! key is still in circulation somewhere. Verify hands each sighting to this task, off
//! the hot path; the first sighting of a key from a source network (/24, /64) raises an
//! alert (stored, audited, and delivered to services subscribed to `alert`);
//! repeats within the alert window only count up, so a client retrying a dead key in a
//! loop cannot flood the trail or the services.

use std::collections::HashMap;
use std::time::Duration;

use keywarden_core::model::{Actor, AuditEntry};
use keywarden_core::{KeyRecord, KeyState, VerifyCode};
use keywarden_store::NewAlert;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::state::SharedState;

pub const KIND: &str = "KEY_STILL_IN_USE";
const QUEUE: usize = 10_000;
/// Places remembered at most; the oldest are forgotten first when full.
const MAX_PLACES: usize = 100_000;

#[derive(Debug, Clone)]
pub struct Sighting {
    pub time: OffsetDateTime,
    pub key_id: String,
    pub code: VerifyCode,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub subject: Option<String>,
    /// Since when the key is dead (revoked, suspended, expired).
    pub dead_since: Option<OffsetDateTime>,
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

/// Where a dead key is presented from: the key and the source network (a /24 of IPv4,
/// a /64 of IPv6). The user agent and subject are left out on purpose: a client can
/// change them per request, and each change would otherwise be a new alert and a new
/// audit entry.
type Place = (String, Option<ipnet::IpNet>);

/// The network an address belongs to for alert deduplication; `None` when the
/// sighting has no (parseable) address.
fn source_network(ip: Option<&str>) -> Option<ipnet::IpNet> {
    let ip: std::net::IpAddr = ip?.parse().ok()?;
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    let prefix = if ip.is_ipv4() { 24 } else { 64 };
    ipnet::IpNet::new(ip, prefix).ok().map(|n| n.trunc())
}

struct Raised {
    seq: i64,
    at: OffsetDateTime,
    unrecorded_repeats: i64,
    last_at: OffsetDateTime,
}

pub async fn run(
    app: SharedState,
    mut rx: mpsc::Receiver<Sighting>,
    mut stop: watch::Receiver<bool>,
) {
    let mut places: HashMap<Place, Raised> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            s = rx.recv() => match s {
                Some(s) => sighting(&app, &mut places, s).await,
                None => break,
            },
            _ = tick.tick() => flush_repeats(&app, &mut places).await,
            _ = stop.changed() => {
                while let Ok(s) = rx.try_recv() {
                    sighting(&app, &mut places, s).await;
                }
                break;
            }
        }
    }
    flush_repeats(&app, &mut places).await;
}

async fn sighting(app: &SharedState, places: &mut HashMap<Place, Raised>, s: Sighting) {
    let place = (s.key_id.clone(), source_network(s.source_ip.as_deref()));
    if let Some(r) = places.get_mut(&place) {
        if s.time - r.at < app.config.alert_window {
            r.unrecorded_repeats += 1;
            r.last_at = r.last_at.max(s.time);
            return;
        }
    }
    let since_ms = s
        .dead_since
        .map(|t| i64::try_from((s.time - t).whole_milliseconds()).unwrap_or(i64::MAX));
    let alert = NewAlert {
        time: s.time,
        kind: KIND.to_owned(),
        key_id: s.key_id.clone(),
        code: s.code.as_str().to_owned(),
        source_ip: s.source_ip.clone(),
        user_agent: s.user_agent.clone(),
        subject: s.subject.clone(),
        since_ms,
    };
    let entry = AuditEntry {
        time: s.time,
        actor: s.asked_by.clone(),
        action: "key.still_in_use".to_owned(),
        target: format!("key:{}", s.key_id),
        reason: Some(format!("{} key presented to verify", s.code.as_str())),
        details: json!({
            "alert": KIND,
            "code": s.code.as_str(),
            "source_ip": s.source_ip,
            "user_agent": s.user_agent,
            "subject": s.subject,
            "since_ms": since_ms,
        })
        .to_string(),
    };
    match app.store.raise_alert(&alert, &entry).await {
        Ok(seq) => {
            tracing::warn!(key_id = %s.key_id, code = s.code.as_str(), source_ip = ?s.source_ip, seq, "KEY_STILL_IN_USE");
            if places.len() >= MAX_PLACES {
                forget_oldest(places);
            }
            places.insert(
                place,
                Raised {
                    seq,
                    at: s.time,
                    unrecorded_repeats: 0,
                    last_at: s.time,
                },
            );
        }
        // The verify itself is in the usage log either way.
        Err(e) => {
            tracing::error!(key_id = %s.key_id, error = %e, "cannot store a KEY_STILL_IN_USE alert")
        }
    }
}

async fn flush_repeats(app: &SharedState, places: &mut HashMap<Place, Raised>) {
    for r in places.values_mut().filter(|r| r.unrecorded_repeats > 0) {
        match app
            .store
            .repeat_alert(r.seq, r.unrecorded_repeats, r.last_at)
            .await
        {
            Ok(()) => r.unrecorded_repeats = 0,
            Err(e) => {
                tracing::warn!(seq = r.seq, error = %e, "cannot count alert repeats; will retry");
                return;
            }
        }
    }
    let now = app.now();
    let window = app.config.alert_window;
    places.retain(|_, r| r.unrecorded_repeats > 0 || now - r.at < window);
}

fn forget_oldest(places: &mut HashMap<Place, Raised>) {
    let oldest = places
        .iter()
        .filter(|(_, r)| r.unrecorded_repeats == 0)
        .min_by_key(|(_, r)| r.at)
        .map(|(p, _)| p.clone());
    if let Some(p) = oldest {
        places.remove(&p);
    }
}
