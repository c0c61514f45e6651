//! `/v1/audit`: read, export, checkpoint and archive the tamper-evident audit trail.
//! Reading needs `audit:read` (roles auditor and admin); archiving, which removes rows
//! from the live table, needs admin.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keywarden_core::audit_chain::{from_hex, to_hex, SealedEntry};
use keywarden_core::role::Permission;
use keywarden_proto::{
    ArchiveRequest, ArchiveView, AuditChainView, AuditEntryView, AuditPage, CheckpointRequest,
    CheckpointView, ErrorBody, ErrorCode, QuarantineView,
};
use keywarden_store::{ArchiveOutcome, ArchiveRecord, AuditFilter, AuditOrder, Store};
use serde::Deserialize;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::IntoParams;

use super::{audit, parse_cursor, parse_key_id, parse_limit};
use crate::auth::Principal;
use crate::error::{violation, ApiError};
use crate::extract::{OptionalJsonBody, QueryParams};
use crate::state::SharedState;

/// Rows per page read while streaming an export: memory stays constant however long the
/// trail.
const EXPORT_PAGE: u32 = 2_000;

pub fn entry_view(s: &SealedEntry) -> AuditEntryView {
    let e = &s.entry;
    AuditEntryView {
        seq: s.seq,
        time: e.time,
        actor: e.actor.id.clone(),
        actor_name: e.actor.name.clone(),
        source_ip: e.actor.source_ip.clone(),
        user_agent: e.actor.user_agent.clone(),
        request_id: e.actor.request_id.clone(),
        action: e.action.clone(),
        target: e.target.clone(),
        reason: e.reason.clone(),
        // Only a tampered row holds text that is not JSON; it is shown as it is, a string,
        // which is also how its hash is computed.
        details: serde_json::from_str(&e.details)
            .unwrap_or_else(|_| serde_json::Value::String(e.details.clone())),
        prev_hash: to_hex(&s.prev_hash),
        hash: to_hex(&s.hash),
    }
}

fn archive_view(a: &ArchiveRecord) -> ArchiveView {
    ArchiveView {
        first_seq: a.first_seq,
        last_seq: a.last_seq,
        last_hash: to_hex(&a.last_hash),
        entries: a.entries,
        file_sha256: a.file_sha256.clone(),
        archived_at: a.archived_at,
        archived_by: a.archived_by.clone(),
    }
}

fn parse_time(field: &str, v: Option<&str>) -> Result<Option<OffsetDateTime>, ApiError> {
    v.map(|s| {
        OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
            ApiError::coded(
                ErrorCode::InvalidQuery,
                format!("{field} must be an RFC 3339 time such as 2026-11-01T00:00:00Z"),
            )
        })
    })
    .transpose()
}

/// Filters shared by the list and the export.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Entries about this key id.
    pub key: Option<String>,
    /// Entries about this target (`key:<id>`, `token:<id>`, …).
    pub target: Option<String>,
    /// Actor id (`token:<id>`, `system:<job>`) or name.
    pub actor: Option<String>,
    /// An action (`key.revoked`) or a prefix ending in `*` (`key.*`).
    pub action: Option<String>,
    /// RFC 3339, inclusive.
    pub since: Option<String>,
    /// RFC 3339, exclusive.
    pub until: Option<String>,
    /// `asc` (oldest first, the default) or `desc`.
    pub order: Option<String>,
    /// 1-1000, default 100 (list only).
    pub limit: Option<u32>,
    /// From a previous page's `next_cursor` (list); for an export, the seq to start after.
    pub cursor: Option<String>,
    /// Export only: `jsonl` (default) or `csv`.
    pub format: Option<String>,
}

impl AuditQuery {
    fn filter(&self) -> Result<AuditFilter, ApiError> {
        let target = match (&self.key, &self.target) {
            (Some(_), Some(_)) => {
                return Err(ApiError::coded(
                    ErrorCode::InvalidQuery,
                    "give key or target, not both",
                ))
            }
            (Some(k), None) => Some(format!("key:{}", parse_key_id(k)?)),
            (None, t) => t.clone(),
        };
        for (name, v) in [("actor", &self.actor), ("action", &self.action)] {
            if v.as_ref().is_some_and(|v| v.is_empty() || v.len() > 256) {
                return Err(ApiError::coded(
                    ErrorCode::InvalidQuery,
                    format!("{name} must be 1-256 characters"),
                ));
            }
        }
        Ok(AuditFilter {
            target,
            actor: self.actor.clone(),
            action: self.action.clone(),
            since: parse_time("since", self.since.as_deref())?,
            until: parse_time("until", self.until.as_deref())?,
        })
    }

    fn order(&self) -> Result<AuditOrder, ApiError> {
        match self.order.as_deref() {
            None | Some("asc") => Ok(AuditOrder::OldestFirst),
            Some("desc") => Ok(AuditOrder::NewestFirst),
            Some(_) => Err(ApiError::coded(
                ErrorCode::InvalidQuery,
                "order must be asc or desc",
            )),
        }
    }
}

/// Audit entries, oldest first unless `order=desc`, with the same filters as the export.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_audit(
    State(app): State<SharedState>,
    principal: Principal,
    QueryParams(q): QueryParams<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    principal.require(Permission::AuditRead)?;
    if q.format.is_some() {
        return Err(ApiError::coded(
            ErrorCode::InvalidQuery,
            "format applies to /v1/audit/export",
        ));
    }
    let (entries, next) = app
        .store
        .audit_entries(
            &q.filter()?,
            q.order()?,
            parse_cursor(q.cursor.as_deref())?,
            parse_limit(q.limit)?,
        )
        .await?;
    Ok(Json(AuditPage {
        entries: entries.iter().map(entry_view).collect(),
        next_cursor: next.map(|n| n.to_string()),
    }))
}

#[derive(Debug, Clone, Copy)]
enum Format {
    Jsonl,
    Csv,
}

const CSV_HEADER: [&str; 13] = [
    "seq",
    "time",
    "actor",
    "actor_name",
    "source_ip",
    "user_agent",
    "request_id",
    "action",
    "target",
    "reason",
    "details",
    "prev_hash",
    "hash",
];

fn write_page(format: Format, entries: &[SealedEntry], header: bool) -> Result<Bytes, ApiError> {
    let mut out = Vec::with_capacity(entries.len() * 512);
    match format {
        Format::Jsonl => {
            for e in entries {
                serde_json::to_writer(&mut out, &entry_view(e))
                    .map_err(|e| ApiError::internal(format!("audit export: {e}")))?;
                out.push(b'\n');
            }
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(&mut out);
            let csv_err = |e: csv::Error| ApiError::internal(format!("audit export: {e}"));
            if header {
                w.write_record(CSV_HEADER).map_err(csv_err)?;
            }
            for s in entries {
                let v = entry_view(s);
                let time = v.time.format(&Rfc3339).unwrap_or_default();
                let seq = v.seq.to_string();
                let cells = [
                    seq.as_str(),
                    &time,
                    &v.actor,
                    &v.actor_name,
                    v.source_ip.as_deref().unwrap_or(""),
                    v.user_agent.as_deref().unwrap_or(""),
                    v.request_id.as_deref().unwrap_or(""),
                    &v.action,
                    &v.target,
                    v.reason.as_deref().unwrap_or(""),
                    &s.entry.details,
                    &v.prev_hash,
                    &v.hash,
                ]
                .map(defuse_formula);
                w.write_record(cells.iter().map(|c| c.as_bytes()))
                    .map_err(csv_err)?;
            }
            w.flush()
                .map_err(|e| ApiError::internal(format!("audit export: {e}")))?;
            drop(w);
        }
    }
    Ok(Bytes::from(out))
}

/// A CSV cell a spreadsheet will not run as a formula (OWASP, "CSV Injection"): a cell
/// that starts with `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'`.
/// The CSV export is for reading; the chain is verified from the JSON lines export,
/// which keeps every value as it is.
fn defuse_formula(cell: &str) -> std::borrow::Cow<'_, str> {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{cell}"))
    } else {
        std::borrow::Cow::Borrowed(cell)
    }
}

struct ExportCursor {
    store: Store,
    filter: AuditFilter,
    format: Format,
    after: Option<i64>,
    first: bool,
    done: bool,
}

/// The trail as JSON lines (one `AuditEntryView` per line, the form `audit verify` reads)
/// or CSV, oldest first, streamed page by page: a million entries export in constant
/// memory. A storage failure mid-stream aborts the response, so a cut export is never
/// mistaken for a complete one.
#[utoipa::path(get, path = "/v1/audit/export", tag = "audit", params(AuditQuery),
    responses((status = 200, description = "application/x-ndjson or text/csv", body = String),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn export_audit(
    State(app): State<SharedState>,
    principal: Principal,
    QueryParams(q): QueryParams<AuditQuery>,
) -> Result<Response, ApiError> {
    principal.require(Permission::AuditRead)?;
    let format = match q.format.as_deref() {
        None | Some("jsonl") => Format::Jsonl,
        Some("csv") => Format::Csv,
        Some(_) => {
            return Err(ApiError::coded(
                ErrorCode::InvalidQuery,
                "format must be jsonl or csv",
            ))
        }
    };
    if q.limit.is_some() || q.order.is_some() {
        return Err(ApiError::coded(
            ErrorCode::InvalidQuery,
            "an export is the whole range, oldest first: limit and order do not apply",
        ));
    }
    let after = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(c.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::coded(ErrorCode::InvalidCursor, "cursor must be a seq (0 or more)")
        })?),
    };
    let start = ExportCursor {
        store: app.store.clone(),
        filter: q.filter()?,
        format,
        after,
        first: true,
        done: false,
    };
    let stream = futures_util::stream::try_unfold(start, |mut c| async move {
        if c.done {
            return Ok::<_, ApiError>(None);
        }
        let (entries, next) = c
            .store
            .audit_entries(&c.filter, AuditOrder::OldestFirst, c.after, EXPORT_PAGE)
            .await
            .inspect_err(|e| tracing::error!(error = %e, "audit export failed mid-stream"))?;
        let bytes = write_page(c.format, &entries, c.first)?;
        c.first = false;
        c.done = next.is_none();
        c.after = next;
        Ok(Some((bytes, c)))
    });
    let content_type = match format {
        Format::Jsonl => "application/x-ndjson",
        Format::Csv => "text/csv; charset=utf-8",
    };
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The chain's head, its archived ranges and the checkpoint public key: what
/// `audit verify` needs besides the entries.
#[utoipa::path(get, path = "/v1/audit/chain", tag = "audit",
    responses((status = 200, body = AuditChainView), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit_chain(
    State(app): State<SharedState>,
    principal: Principal,
) -> Result<Json<AuditChainView>, ApiError> {
    principal.require(Permission::AuditRead)?;
    let (seq, hash) = app.store.audit_head().await?;
    let archives = app.store.audit_archives().await?;
    Ok(Json(AuditChainView {
        head_seq: seq,
        head_hash: to_hex(&hash),
        public_key: app.signer.public_key(),
        archives: archives.iter().map(archive_view).collect(),
    }))
}

/// Sign `{seq, hash, time}` of the newest entry (or of `seq`) with the server's Ed25519
/// key. Keep the result outside the database: `audit verify --checkpoint` then detects a
/// chain truncated or rewritten since.
#[utoipa::path(post, path = "/v1/audit/checkpoints", tag = "audit", request_body = CheckpointRequest,
    responses((status = 200, body = CheckpointView), (status = 404, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_checkpoint(
    State(app): State<SharedState>,
    principal: Principal,
    OptionalJsonBody(req): OptionalJsonBody<CheckpointRequest>,
) -> Result<Json<CheckpointView>, ApiError> {
    principal.require(Permission::AuditRead)?;
    let (seq, hash) = match req.seq {
        None => app.store.audit_head().await?,
        Some(seq) => match app.store.audit_entry(seq).await? {
            Some(e) => (e.seq, e.hash),
            None => {
                return Err(ApiError::Coded {
                    code: ErrorCode::AuditEntryNotFound,
                    message: format!("no live audit entry with seq {seq}"),
                })
            }
        },
    };
    let cp = app.signer.sign(seq, &hash, app.now());
    Ok(Json(CheckpointView {
        seq: cp.seq,
        hash: cp.hash,
        time: cp.time,
        public_key: cp.public_key,
        signature: cp.signature,
    }))
}

/// Record that entries `first_seq..=last_seq` were written to an archive file and remove
/// them from the live table (role `admin`). Refused with 409 unless the live chain still
/// starts at `first_seq` and entry `last_seq` still has `last_hash`, so the file holds
/// exactly what is removed.
#[utoipa::path(post, path = "/v1/audit/archives", tag = "audit", request_body = ArchiveRequest,
    responses((status = 201, body = ArchiveView), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn archive_audit(
    State(app): State<SharedState>,
    principal: Principal,
    crate::extract::JsonBody(req): crate::extract::JsonBody<ArchiveRequest>,
) -> Result<(StatusCode, Json<ArchiveView>), ApiError> {
    principal.require(Permission::AuditArchive)?;
    let mut v = Vec::new();
    if req.first_seq < 1 {
        v.push(violation(
            ErrorCode::FieldInvalid,
            "first_seq",
            "must be 1 or more",
        ));
    }
    if req.last_seq < req.first_seq {
        v.push(violation(
            ErrorCode::FieldInvalid,
            "last_seq",
            "must not be below first_seq",
        ));
    }
    let last_hash = from_hex(&req.last_hash);
    if last_hash.is_none() {
        v.push(violation(
            ErrorCode::FieldInvalid,
            "last_hash",
            "must be 64 hex characters",
        ));
    }
    if from_hex(&req.file_sha256).is_none() {
        v.push(violation(
            ErrorCode::FieldInvalid,
            "file_sha256",
            "must be 64 hex characters",
        ));
    }
    let (Some(last_hash), true) = (last_hash, v.is_empty()) else {
        return Err(ApiError::Validation(v));
    };
    let now = app.now();
    let actor = principal.actor();
    let entries = req.last_seq - req.first_seq + 1;
    let entry = audit(
        actor.clone(),
        now,
        "audit.archived",
        format!("audit:{}-{}", req.first_seq, req.last_seq),
        None,
        json!({
            "first_seq": req.first_seq,
            "last_seq": req.last_seq,
            "last_hash": req.last_hash,
            "entries": entries,
            "file_sha256": req.file_sha256,
        }),
    );
    let request = keywarden_store::ArchiveRequest {
        first_seq: req.first_seq,
        last_seq: req.last_seq,
        last_hash,
        file_sha256: req.file_sha256.to_ascii_lowercase(),
        at: now,
        by: actor.id,
    };
    let mismatch = |message: String| ApiError::Coded {
        code: ErrorCode::ArchiveMismatch,
        message,
    };
    match app.store.archive_audit(&request, &entry).await? {
        ArchiveOutcome::Archived(record) => {
            tracing::info!(
                first = record.first_seq,
                last = record.last_seq,
                "audit entries archived"
            );
            Ok((StatusCode::CREATED, Json(archive_view(&record))))
        }
        ArchiveOutcome::RangeMismatch { live_first } => Err(mismatch(match live_first {
            Some(f) => format!(
                "the live trail starts at seq {f}, and {}..={} is not a whole prefix of it",
                req.first_seq, req.last_seq
            ),
            None => format!("no live entries up to seq {}", req.last_seq),
        })),
        ArchiveOutcome::HashMismatch => Err(mismatch(format!(
            "entry {} does not have the hash the archive holds",
            req.last_seq
        ))),
    }
}

/// Move rows that sit past the recorded head out of the audit trail and the key event
/// outbox (role `admin`). Such rows were written around keywarden; while they are
/// there every audited write is refused (AUDIT_TRAIL_TAMPERED). They are kept in the
/// quarantine table as evidence, and the move is itself an audit entry.
#[utoipa::path(post, path = "/v1/audit/quarantine", tag = "audit",
    responses((status = 200, body = QuarantineView), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn quarantine_audit(
    State(app): State<SharedState>,
    principal: Principal,
) -> Result<Json<QuarantineView>, ApiError> {
    principal.require(Permission::AuditArchive)?;
    let now = app.now();
    let actor = principal.actor();
    let moved = app
        .store
        .quarantine_past_head(now, |q| {
            audit(
                actor.clone(),
                now,
                "audit.quarantined",
                "audit:quarantine".to_owned(),
                Some("rows past the recorded head, written around keywarden".to_owned()),
                json!({"head_seq": q.head, "audit_seqs": q.audit_rows, "event_seqs": q.event_rows}),
            )
        })
        .await?;
    if !moved.audit_rows.is_empty() || !moved.event_rows.is_empty() {
        tracing::warn!(
            head = moved.head,
            audit_rows = moved.audit_rows.len(),
            event_rows = moved.event_rows.len(),
            "rows past the audit head moved to quarantine"
        );
    }
    Ok(Json(QuarantineView {
        head_seq: moved.head,
        audit_seqs: moved.audit_rows,
        event_seqs: moved.event_rows,
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn formula_cells_are_defused() {
        for (cell, out) in [
            ("=1+2", "'=1+2"),
            ("+1", "'+1"),
            ("-1", "'-1"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("\rx", "'\rx"),
            ("key.revoked", "key.revoked"),
            ("1+1", "1+1"),
            ("", ""),
        ] {
            assert_eq!(super::defuse_formula(cell), out);
        }
    }
}
