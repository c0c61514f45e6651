//! The dispatcher: delivers the key event outbox to connected services as signed
//! webhooks (Standard Webhooks), with retries.
//!
//! Each pass fans new outbox events out into deliveries, then sends every due one
//! concurrently. It wakes when a write commits in this process, when a delivery finishes,
//! and on a short poll (writes by other processes, retries falling due). Deliveries live
//! in the database, so a restart loses none: an attempt cut off by shutdown is simply
//! made again (at least once; receivers deduplicate on `webhook-id`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keywarden_core::webhook::{backoff, secret_text, sign};
use keywarden_store::{DeliveryOutcome, DueDelivery, KeyEvent};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::state::{AppState, SharedState};

/// Deliveries in flight at once, across services, and to one service: a service that
/// hangs until the timeout cannot take every slot.
const MAX_IN_FLIGHT: usize = 64;
const MAX_IN_FLIGHT_PER_SERVICE: usize = 16;
/// Due deliveries read per pass.
const BATCH: u32 = 256;
const WEBHOOK_SECRET_LABEL: &str = "keywarden webhook signing secret v1";

/// The signing secret of a service: derived from the pepper and the service's salt, so
/// the database never holds it.
pub fn service_secret(
    app: &AppState,
    service_id: &str,
    salt: &str,
    pepper_version: u32,
) -> Option<[u8; 32]> {
    let context = format!("{service_id}\0{salt}");
    app.hasher
        .derive(pepper_version, WEBHOOK_SECRET_LABEL, context.as_bytes())
}

/// The secret as shown to the service once, at registration.
pub fn shown_secret(secret: &[u8; 32]) -> String {
    secret_text(secret)
}

/// The webhook body of an outbox event, in the Standard Webhooks shape (`type`,
/// `timestamp`, `data`).
pub async fn event_body(app: &AppState, e: &KeyEvent) -> Value {
    let key = match keywarden_core::KeyId::parse(&e.key_id) {
        Ok(id) => app.store.get_key(&id).await.ok().flatten(),
        Err(_) => None,
    };
    let details: Value = serde_json::from_str(&e.details).unwrap_or(Value::Null);
    let time = e
        .time
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    json!({
        "type": e.kind(),
        "timestamp": time,
        "data": {
            "seq": e.seq,
            "key_id": e.key(),
            "event": e.event,
            "reason": e.reason,
            "actor": e.actor,
            "details": details,
            "key": key.map(|k| json!({
                "name": k.name,
                "owner": k.owner,
                "environment": k.environment,
                "systems": k.systems,
                "state": k.effective_state(app.now()).as_str(),
            })),
        }
    })
}

/// Sends one signed message; `Ok` carries the HTTP status.
pub async fn send(
    app: &AppState,
    url: &str,
    secret: &[u8; 32],
    msg_id: &str,
    body: &Value,
) -> Result<u16, String> {
    let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    let timestamp = app.now().unix_timestamp();
    let headers = [
        ("webhook-id", msg_id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", sign(secret, msg_id, timestamp, &bytes)),
    ];
    match app.outbound.post(url, &headers, bytes).await {
        Ok(status) => Ok(status.as_u16()),
        Err(e) => Err(e.to_string()),
    }
}

pub async fn run(app: SharedState, mut stop: watch::Receiver<bool>) {
    let mut changes = app.store.changes();
    let in_flight: Arc<Mutex<HashSet<(String, i64)>>> = Arc::default();
    let mut tasks = JoinSet::new();
    let mut lead = crate::cluster::Lead::new(crate::cluster::DISPATCHER_LOCK);
    loop {
        if *stop.borrow() {
            break;
        }
        // Several nodes: one delivers; another takes over within a poll when it stops.
        if lead.ensure(&app.store).await {
            let before = tasks.len();
            if let Err(e) = pass(&app, &in_flight, &mut tasks).await {
                tracing::warn!(error = %e, "dispatcher pass failed; retrying");
            }
            let started = tasks.len().saturating_sub(before) as u64;
            app.progress.dispatch.send_modify(|p| {
                p.passes += 1;
                p.started += started;
            });
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = changes.changed() => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = tokio::time::sleep(app.config.dispatch_poll) => {}
        }
    }
    // Give attempts under way a moment to record their answer; any cut off stay open
    // and are made again after the restart.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
}

async fn pass(
    app: &SharedState,
    in_flight: &Arc<Mutex<HashSet<(String, i64)>>>,
    tasks: &mut JoinSet<()>,
) -> Result<(), keywarden_store::StoreError> {
    let now = app.now();
    app.store.fan_out(now).await?;
    if tasks.len() >= MAX_IN_FLIGHT {
        return Ok(());
    }
    for d in app.store.due_deliveries(now, BATCH).await? {
        if tasks.len() >= MAX_IN_FLIGHT {
            break;
        }
        let id = (d.service_id.clone(), d.event.seq);
        let fresh = in_flight
            .lock()
            .map(|mut s| {
                let busy = s.iter().filter(|(svc, _)| *svc == id.0).count();
                busy < MAX_IN_FLIGHT_PER_SERVICE && s.insert(id.clone())
            })
            .unwrap_or(false);
        if !fresh {
            continue;
        }
        let app = app.clone();
        let in_flight = in_flight.clone();
        tasks.spawn(async move {
            deliver(&app, d).await;
            if let Ok(mut s) = in_flight.lock() {
                s.remove(&id);
            }
        });
    }
    Ok(())
}

async fn deliver(app: &AppState, d: DueDelivery) {
    let seq = d.event.seq;
    // The due list may predate an attempt that finished since: its answer is recorded
    // before it leaves the in-flight set, so this read sees it, and a delivery is never
    // sent twice (or a key's events out of order) by one dispatcher.
    match app.store.delivery_due(&d.service_id, seq, app.now()).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot check a delivery; trying later");
            return;
        }
    }
    if d.format == "email" {
        let event = event_body(app, &d.event).await;
        let sent = match &app.mailer {
            Some(m) => m.send_event(&event).await,
            None => Err(crate::mail::MailError {
                message: "no SMTP relay is set (serve --smtp)".to_owned(),
                retry: true,
            }),
        };
        let outcome = match sent {
            Ok(()) => DeliveryOutcome::Confirmed { at: app.now() },
            Err(e) => failed(app, &d, e.message, e.retry),
        };
        record(app, &d, &outcome).await;
        return;
    }
    let answer = match service_secret(app, &d.service_id, &d.secret_salt, d.pepper_version) {
        None => Err(format!(
            "pepper version {} is not loaded; the signing secret cannot be derived",
            d.pepper_version
        )),
        Some(secret) => {
            let mut body = event_body(app, &d.event).await;
            if d.format == "slack" {
                body = crate::messages::slack(&body);
            }
            send(app, &d.webhook_url, &secret, &format!("evt_{seq}"), &body).await
        }
    };
    let outcome = match answer {
        Ok(status) if (200..300).contains(&status) => DeliveryOutcome::Confirmed { at: app.now() },
        Ok(status) => failed(app, &d, format!("HTTP {status}"), true),
        Err(e) => failed(app, &d, e, true),
    };
    record(app, &d, &outcome).await;
}

/// A failed attempt: tried again after a jittered backoff while the retry window lasts
/// and trying again can help, abandoned otherwise.
fn failed(app: &AppState, d: &DueDelivery, error: String, retry: bool) -> DeliveryOutcome {
    let now = app.now();
    let attempts = u32::try_from(d.attempts + 1).unwrap_or(u32::MAX);
    let window =
        time::Duration::try_from(app.config.webhook_retry_for).unwrap_or(time::Duration::days(3));
    let next_at = (retry && now - d.created_at < window).then(|| {
        let wait = backoff(
            app.config.webhook_backoff,
            app.config.webhook_backoff_cap,
            attempts,
            rand::thread_rng().gen::<f64>(),
        );
        now + time::Duration::try_from(wait).unwrap_or(time::Duration::hours(1))
    });
    tracing::warn!(
        service = %d.service_name,
        seq = d.event.seq,
        attempts,
        error = %error,
        abandoned = next_at.is_none(),
        "delivery failed"
    );
    DeliveryOutcome::Failed { error, next_at }
}

async fn record(app: &AppState, d: &DueDelivery, outcome: &DeliveryOutcome) {
    if let Err(e) = app
        .store
        .record_delivery(&d.service_id, d.event.seq, outcome)
        .await
    {
        // The delivery stays open and is made again: at least once, never lost.
        tracing::error!(service = %d.service_name, seq = d.event.seq, error = %e, "cannot record a delivery");
    }
}
