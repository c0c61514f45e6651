//! `GET /v1/events`: the key event outbox for gateways that cache, as a long poll or,
//! with `Accept: text/event-stream`, as Server-Sent Events. A gateway remembers the last
//! seq it applied, resumes after it (`after`, or SSE's `Last-Event-ID`), and confirms
//! with `POST /v1/services/{id}/ack`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::ACCEPT;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keywarden_core::role::Permission;
use keywarden_core::webhook::{category, parse_categories};
use keywarden_proto::{ErrorBody, ErrorCode, EventPage, EventView};
use keywarden_store::KeyEvent;
use serde::Deserialize;
use tokio::sync::watch;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::QueryParams;
use crate::state::{AppState, EventWaiter, SharedState};

/// Longest long poll.
const MAX_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Events after this seq (default 0: everything still in the outbox). SSE clients
    /// may send `Last-Event-ID` instead.
    pub after: Option<i64>,
    /// Long poll: how long to wait when nothing is new (`0s`-`60s`, default `30s`).
    pub wait: Option<String>,
    /// At most this many events per answer (1-1000, default 100).
    pub limit: Option<u32>,
    /// Only these categories (`revoke,suspend,…`); default all.
    pub events: Option<String>,
}

fn view(e: KeyEvent) -> EventView {
    EventView {
        seq: e.seq,
        kind: e.kind(),
        time: e.time,
        key_id: e.key().map(str::to_owned),
        reason: e.reason,
        actor: e.actor,
        details: serde_json::from_str(&e.details).unwrap_or(serde_json::Value::Null),
    }
}

struct Reader {
    after: i64,
    limit: u32,
    only: Option<Vec<String>>,
}

impl Reader {
    /// The next events after the cursor that pass the filter; moves the cursor past
    /// every event read, shown or not.
    async fn next(&mut self, app: &AppState) -> Result<Vec<EventView>, ApiError> {
        loop {
            let batch = app.store.key_events_after(self.after, self.limit).await?;
            let Some(last) = batch.last().map(|e| e.seq) else {
                return Ok(Vec::new());
            };
            let full = batch.len() == self.limit as usize;
            self.after = last;
            let shown: Vec<EventView> = batch
                .into_iter()
                .filter(|e| match &self.only {
                    None => true,
                    Some(only) => category(&e.event).is_some_and(|c| only.iter().any(|o| o == c)),
                })
                .map(view)
                .collect();
            if !shown.is_empty() || !full {
                return Ok(shown);
            }
        }
    }
}

/// Waits for a write in this process, the poll interval (writes by others), or shutdown.
async fn wait_for_change(
    changes: &mut watch::Receiver<u64>,
    closing: &mut watch::Receiver<bool>,
    poll: Duration,
) {
    tokio::select! {
        _ = changes.changed() => {}
        _ = closing.changed() => {}
        () = tokio::time::sleep(poll) => {}
    }
}

/// Key events after a seq: a long poll, or a Server-Sent Events stream with
/// `Accept: text/event-stream` (role `verifier` or `admin`).
#[utoipa::path(get, path = "/v1/events", tag = "services", params(EventsQuery),
    responses((status = 200, body = EventPage, description = "JSON, or text/event-stream with one `id: seq` event per key event"),
        (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    State(app): State<SharedState>,
    principal: Principal,
    headers: HeaderMap,
    QueryParams(q): QueryParams<EventsQuery>,
) -> Result<Response, ApiError> {
    principal.require(Permission::Events)?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim().parse::<i64>().map_err(|_| {
                ApiError::coded(
                    ErrorCode::InvalidQuery,
                    "Last-Event-ID must be an event seq",
                )
            })
        })
        .transpose()?;
    let after = q.after.or(last_event_id).unwrap_or(0);
    if after < 0 {
        return Err(ApiError::coded(
            ErrorCode::InvalidQuery,
            "after must not be negative",
        ));
    }
    let limit = super::parse_limit(q.limit)?;
    let only = q
        .events
        .map(|e| parse_categories(&[e]).map_err(|m| ApiError::coded(ErrorCode::InvalidQuery, m)))
        .transpose()?;
    let wait = match q.wait.as_deref() {
        None => Duration::from_secs(30),
        Some(w) => keywarden_core::duration::parse_duration(w)
            .ok()
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| *d <= MAX_WAIT)
            .ok_or_else(|| {
                ApiError::coded(
                    ErrorCode::InvalidQuery,
                    "wait must be a duration from 0s to 60s, e.g. 30s",
                )
            })?,
    };
    let reader = Reader { after, limit, only };
    let wants_sse = headers
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_sse {
        Ok(stream(app, reader).into_response())
    } else {
        Ok(long_poll(app, reader, wait).await?.into_response())
    }
}

async fn long_poll(
    app: SharedState,
    mut reader: Reader,
    wait: Duration,
) -> Result<Json<EventPage>, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = app.store.changes();
    let mut closing = app.closing();
    loop {
        let events = reader.next(&app).await?;
        let now = tokio::time::Instant::now();
        if !events.is_empty() || now >= deadline || *closing.borrow() {
            return Ok(Json(EventPage {
                events,
                next: reader.after,
            }));
        }
        let poll = app.config.events_poll.min(deadline - now);
        let _waiting = EventWaiter::enter(&app.progress.event_waiters);
        wait_for_change(&mut changes, &mut closing, poll).await;
    }
}

fn stream(
    app: SharedState,
    reader: Reader,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let changes = app.store.changes();
    let closing = app.closing();
    let state = (app, reader, VecDeque::<EventView>::new(), changes, closing);
    let events = futures_util::stream::unfold(
        state,
        |(app, mut reader, mut buf, mut changes, mut closing)| async move {
            loop {
                if let Some(e) = buf.pop_front() {
                    let event = Event::default()
                        .id(e.seq.to_string())
                        .event(e.kind.clone())
                        .json_data(&e)
                        .unwrap_or_else(|_| Event::default().comment("unencodable event"));
                    return Some((Ok(event), (app, reader, buf, changes, closing)));
                }
                if *closing.borrow() {
                    return None;
                }
                match reader.next(&app).await {
                    Ok(events) if !events.is_empty() => buf.extend(events),
                    Ok(_) => {
                        let _waiting = EventWaiter::enter(&app.progress.event_waiters);
                        wait_for_change(&mut changes, &mut closing, app.config.events_poll).await
                    }
                    Err(e) => {
                        // The client reconnects with Last-Event-ID and misses nothing.
                        tracing::warn!(error = %e, "event stream cannot read the outbox; closing it");
                        return None;
                    }
                }
            }
        },
    );
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
