//! `/v1/usage/chain`: what an outside verifier needs to recompute the usage log's hash
//! chain (`keywarden audit verify --usage`): where the chain stands, and every stored batch
//! with the events in its range, streamed. The server gives no verdict: a server whose
//! database was tampered with is not the one to judge it. Needs `audit:read`.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keywarden_core::audit_chain::to_hex;
use keywarden_core::role::Permission;
use keywarden_core::usage_chain::{ChainBatch, ChainEvent, ChainLine};
use keywarden_proto::{ErrorBody, UsageChainView, UsageRetentionView};
use keywarden_store::{walk_start, Store, StoredBatch};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::SharedState;

/// Batches per page read while streaming (a batch holds at most the writer's 5,000
/// events), so memory stays bounded however long the log.
const PAGE: u32 = 32;

/// The usage log's last batch, the prefixes retention removed, and the events stored
/// before the log was chained.
#[utoipa::path(get, path = "/v1/usage/chain", tag = "audit",
    responses((status = 200, body = UsageChainView), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn usage_chain(
    State(app): State<SharedState>,
    principal: Principal,
) -> Result<Json<UsageChainView>, ApiError> {
    principal.require(Permission::AuditRead)?;
    let head = app.store.usage_chain_head().await?;
    let retained = app.store.usage_retentions().await?;
    Ok(Json(UsageChainView {
        head_batch: head.batch_seq,
        head_hash: to_hex(&head.hash),
        unchained_upto: head.unchained_upto,
        retained: retained
            .iter()
            .map(|r| UsageRetentionView {
                first_batch: r.first_batch,
                last_batch: r.last_batch,
                first_seq: r.first_seq,
                last_seq: r.last_seq,
                events: r.events,
                last_hash: to_hex(&r.last_hash),
                retained_at: r.retained_at,
            })
            .collect(),
    }))
}

/// Every stored batch after the last prefix retention removed, oldest first, one JSON
/// line each (`{"batch": {…, "events": [...]}}`) with the events stored in its range, and
/// any stored event no batch covers as `{"event": {…}}` where its seq falls. A storage
/// failure mid-stream aborts the response, so a cut stream is never taken for the whole.
#[utoipa::path(get, path = "/v1/usage/chain/export", tag = "audit",
    responses((status = 200, description = "application/x-ndjson", body = String),
        (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn export_usage_chain(
    State(app): State<SharedState>,
    principal: Principal,
) -> Result<Response, ApiError> {
    principal.require(Permission::AuditRead)?;
    let retained = app.store.usage_retentions().await?;
    let head = app.store.usage_chain_head().await?;
    let (after, _) = walk_start(&retained);
    let start = Cursor {
        store: app.store.clone(),
        after,
        // Events at or below this were removed, or predate the chain.
        shown: retained
            .last()
            .map_or(0, |r| r.last_seq)
            .max(head.unchained_upto),
        done: false,
    };
    let stream = futures_util::stream::try_unfold(start, |mut c| async move {
        if c.done {
            return Ok::<_, ApiError>(None);
        }
        let page = c
            .page()
            .await
            .inspect_err(|e| tracing::error!(error = %e, "usage chain export failed mid-stream"))?;
        Ok(Some((page, c)))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

struct Cursor {
    store: Store,
    after: i64,
    shown: i64,
    done: bool,
}

impl Cursor {
    async fn page(&mut self) -> Result<Bytes, ApiError> {
        let batches = self.store.usage_batches_after(self.after, PAGE).await?;
        let mut out = Vec::new();
        let (Some(lo), Some(hi)) = (
            batches.iter().map(|b| b.header.first_seq).min(),
            batches.iter().map(|b| b.header.last_seq).max(),
        ) else {
            return self.tail().await;
        };
        let events = self
            .store
            .usage_events_between(lo.min(self.shown + 1), hi)
            .await?;
        let covered = |e: &ChainEvent| {
            batches
                .iter()
                .any(|b| b.header.first_seq <= e.seq && e.seq <= b.header.last_seq)
        };
        // Events no batch covers are shown where their seq falls, before the next batch.
        let mut strays = events
            .iter()
            .filter(|e| e.seq > self.shown && !covered(e))
            .peekable();
        for b in &batches {
            while let Some(e) = strays.next_if(|e| e.seq < b.header.first_seq) {
                line(&mut out, &ChainLine::Event(e.clone()))?;
            }
            let from = events.partition_point(|e| e.seq < b.header.first_seq);
            let to = events.partition_point(|e| e.seq <= b.header.last_seq);
            let mine = events.get(from..to).unwrap_or_default().to_vec();
            line(&mut out, &ChainLine::Batch(view(b, mine)))?;
            self.after = b.header.seq;
        }
        for e in strays {
            line(&mut out, &ChainLine::Event(e.clone()))?;
        }
        self.shown = self.shown.max(hi);
        Ok(Bytes::from(out))
    }
}

impl Cursor {
    /// Past the last batch: events stored after every batch's range. They are read
    /// first and the batches again after; a batch commits with its events, so when still
    /// no batch follows, no batch covers them: they were written around the writer.
    async fn tail(&mut self) -> Result<Bytes, ApiError> {
        let events = self.store.usage_events_after(self.shown, PAGE).await?;
        if !self
            .store
            .usage_batches_after(self.after, 1)
            .await?
            .is_empty()
        {
            // A batch was written meanwhile: page on.
            return Ok(Bytes::new());
        }
        self.done = true;
        let mut out = Vec::new();
        for e in events {
            line(&mut out, &ChainLine::Event(e))?;
        }
        Ok(Bytes::from(out))
    }
}

fn view(b: &StoredBatch, events: Vec<ChainEvent>) -> ChainBatch {
    ChainBatch {
        header: b.header,
        prev_hash: b.prev_hash.clone(),
        hash: b.hash.clone(),
        digests: hex::encode(&b.digests),
        events,
    }
}

fn line(out: &mut Vec<u8>, l: &ChainLine) -> Result<(), ApiError> {
    serde_json::to_writer(&mut *out, l)
        .map_err(|e| ApiError::internal(format!("usage chain export: {e}")))?;
    out.push(b'\n');
    Ok(())
}
