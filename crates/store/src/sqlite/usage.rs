//! The SQLite usage sink: a dedicated rusqlite connection to the same database file.
//!
//! Appending is the hot part: one insert per event at the end of the `usage_events` rowid
//! table, nothing else. Random b-tree writes per event (a `(key_id, seq)` index, the key's
//! stats row, its subject row) cost more than the rest of a verify (docs/benchmarks.md),
//! so instead each event carries `prev_seq`, the key's previous event, and the stats are
//! folded every few seconds, in key order, from the in-memory [`Pending`] overlay.
//! `usage_state.folded_seq` moves in the fold's transaction, so after a crash [`recover`]
//! refolds exactly the events that were logged and not folded.
//!
//! Each append also chains its batch (`usage_batches`, see `keywarden_core::usage_chain`)
//! in the same transaction: the events are hashed as they are inserted, from the text
//! already formatted for the insert, so chaining adds one hash per event and two small
//! writes per batch.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keywarden_core::audit_chain::{from_hex, to_hex};
use keywarden_core::model::UsageEvent;
use keywarden_core::usage_chain::{BatchHasher, EventFields};
use keywarden_core::verify::VerifyCode;
use keywarden_core::KeyId;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::fold::fold_last_use_sql;
use crate::fold::{LoggedEvent, Pending, Rollup, RollupRows, HEADS_CACHED};
use crate::rollups::{UPSERT_ROLLUP_CODES, UPSERT_ROLLUP_VALUES};
use crate::rows::ms;
use crate::usage::UPSERT_SUBJECT_TAIL;
use crate::{Result, StoreError};

#[derive(Clone)]
pub(crate) struct SqliteUsageSink {
    conn: Arc<Mutex<Connection>>,
    pub pending: Arc<Mutex<Pending>>,
}

impl std::fmt::Debug for SqliteUsageSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteUsageSink")
    }
}

fn err(e: rusqlite::Error) -> StoreError {
    StoreError::rusqlite("sqlite usage write", e)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| StoreError::Internal("usage sink lock poisoned".to_owned()))
}

/// Every id the log names gets a row, also one that names no stored key (a NOT_FOUND of
/// a guessed id, which never has a use): its `last_seq` says which of its events the
/// usage rollups already hold, so a refold after a crash counts none of them twice.
/// Readers reach `key_usage` only from `keys`, so such rows show nowhere.
const FOLD_KEY: &str = concat!(
    "INSERT INTO key_usage (key_id, batched_uses, last_used_at, last_used_from, last_seq) \
     VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT (key_id) DO UPDATE SET \
     batched_uses = key_usage.batched_uses + excluded.batched_uses, ",
    fold_last_use_sql!(
        "key_usage.last_used_at",
        "key_usage.last_used_from",
        "excluded.last_used_at",
        "excluded.last_used_from"
    ),
    ", last_seq = MAX(COALESCE(key_usage.last_seq, 0), excluded.last_seq)"
);

/// [`FOLD_KEY`] for a key whose stats row exists, which after its first fold every key's
/// does: one descent into `key_usage` instead of the existence check in `keys`, the
/// insert's conflict and then the update. Same parameters, same rules.
const FOLD_KNOWN_KEY: &str = concat!(
    "UPDATE key_usage SET batched_uses = batched_uses + ?2, ",
    fold_last_use_sql!("last_used_at", "last_used_from", "?3", "?4"),
    ", last_seq = MAX(COALESCE(last_seq, 0), ?5) WHERE key_id = ?1"
);

impl SqliteUsageSink {
    /// Opens the database file the pool already created and migrated, and rebuilds the
    /// overlay of events logged but not folded before the last stop.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA cache_size = -65536;")
            .map_err(err)?;
        let pending = recover(&conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            pending: Arc::new(Mutex::new(pending)),
        })
    }

    /// Appends a batch in one transaction. Blocking: call from a blocking thread.
    pub fn append(&self, events: &[UsageEvent]) -> Result<()> {
        let mut conn = lock(&self.conn)?;
        // Heads of the batch's keys: pending ones from the overlay, the rest from the table.
        let mut heads: HashMap<&KeyId, Option<i64>> = HashMap::with_capacity(events.len());
        {
            let pending = lock(&self.pending)?;
            for id in events.iter().filter_map(|e| e.key_id.as_ref()) {
                heads.entry(id).or_insert_with(|| {
                    pending
                        .head(id)
                        .or_else(|| pending.folded_heads.get(id).copied())
                });
            }
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let mut seqs = Vec::with_capacity(events.len());
        {
            // The head first: taking it is what orders batches in the chain.
            let (batch_seq, prev_text): (i64, String) = tx
                .prepare_cached(
                    "UPDATE usage_chain_head SET batch_seq = batch_seq + 1 WHERE id = 1 \
                     RETURNING batch_seq, hash",
                )
                .map_err(err)?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(err)?;
            let prev_hash = from_hex(&prev_text).ok_or_else(|| {
                StoreError::Corrupt("usage_chain_head.hash is not a SHA-256 hex".into())
            })?;
            let mut chain = BatchHasher::new(&prev_hash, events.len());
            let mut stored_head = tx
                .prepare_cached("SELECT last_seq FROM key_usage WHERE key_id = ?1")
                .map_err(err)?;
            for (id, head) in heads.iter_mut().filter(|(_, h)| h.is_none()) {
                *head = stored_head
                    .query_row([id.as_str()], |r| r.get::<_, Option<i64>>(0))
                    .optional()
                    .map_err(err)?
                    .flatten();
            }
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO usage_events (key_id, time, code, source_ip, scope, environment, \
                     subject, user_agent, counted, prev_seq) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(err)?;
            // Addresses are formatted here, off the verify path, into one reused buffer.
            let mut ip_text = String::with_capacity(48);
            for e in events {
                let id = e.key_id.as_ref();
                let prev = id.and_then(|id| heads.get(id).copied().flatten());
                let source_ip = e.source_ip.map(|ip| {
                    ip_text.clear();
                    let _ = write!(ip_text, "{ip}");
                    ip_text.as_str()
                });
                let time = ms(e.time);
                insert
                    .execute(params![
                        id.map(KeyId::as_str),
                        time,
                        e.code.as_str(),
                        source_ip,
                        e.scope,
                        e.environment,
                        e.subject,
                        e.user_agent,
                        i64::from(e.counted),
                        prev,
                    ])
                    .map_err(err)?;
                let seq = tx.last_insert_rowid();
                chain.push(&EventFields {
                    seq,
                    key_id: id.map(KeyId::as_str),
                    time,
                    code: e.code.as_str(),
                    source_ip,
                    scope: e.scope.as_deref(),
                    environment: e.environment.as_deref(),
                    subject: e.subject.as_deref(),
                    user_agent: e.user_agent.as_deref(),
                    counted: e.counted,
                });
                if let Some(id) = id {
                    heads.insert(id, Some(seq));
                }
                seqs.push(seq);
            }
            let sealed = chain.finish(batch_seq, prev_hash);
            let hash = to_hex(&sealed.hash);
            tx.prepare_cached(
                "INSERT INTO usage_batches (seq, first_seq, last_seq, events, time, prev_hash, \
                 hash, digests) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(err)?
            .execute(params![
                sealed.header.seq,
                sealed.header.first_seq,
                sealed.header.last_seq,
                sealed.header.count,
                sealed.header.time,
                prev_text,
                hash,
                sealed.digests,
            ])
            .map_err(err)?;
            tx.prepare_cached("UPDATE usage_chain_head SET hash = ?1 WHERE id = 1")
                .map_err(err)?
                .execute([&hash])
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        let mut pending = lock(&self.pending)?;
        for (e, seq) in events.iter().zip(seqs) {
            pending.add(&LoggedEvent::of(seq, e));
        }
        Ok(())
    }

    /// Folds the next chunk of at most `max_keys` keys of the overlay into `key_usage`
    /// and `key_subjects`, in key order, in one transaction; returns true when no fold is
    /// left in progress. A fold starts with the keys pending now and ends when all of
    /// them are folded; then `folded_seq` moves to where it started. Each folded key's
    /// `last_seq` says which of its events are in its stats, so a crash in between
    /// refolds nothing twice. Blocking. The caller keeps appends and most readers out
    /// until this returns (see `Store::fold_usage_step`); point reads go on, so the
    /// overlay is not locked during the transaction: the chunk waits in `in_flight`.
    pub fn fold_step(&self, max_keys: usize) -> Result<bool> {
        let mut conn = lock(&self.conn)?;
        let (chunk, last_chunk, fold_upto, keyless) = {
            let mut pending = lock(&self.pending)?;
            if pending.fold_queue.is_empty() {
                if pending.is_empty() && pending.keyless_folding.is_empty() {
                    return Ok(true);
                }
                let mut queue: Vec<KeyId> = pending.keys.keys().cloned().collect();
                queue.sort_unstable_by(|a, b| b.cmp(a));
                pending.fold_queue = queue;
                pending.fold_upto = pending.max_seq;
                // Exactly the keyless events up to fold_upto (plus any a failed last step
                // left), written with folded_seq by the fold's last step.
                let keyless = std::mem::take(&mut pending.keyless);
                pending.keyless_folding.merge(keyless);
            }
            let at = pending.fold_queue.len().saturating_sub(max_keys.max(1));
            let ids: Vec<KeyId> = pending.fold_queue.drain(at..).rev().collect();
            let mut chunk = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(d) = pending.keys.remove(&id) {
                    // Shared, not copied: a delta holds its subjects' strings.
                    let d = Arc::new(d);
                    pending.in_flight.insert(id.clone(), Arc::clone(&d));
                    chunk.push((id, d));
                }
            }
            let last_chunk = pending.fold_queue.is_empty();
            let keyless = last_chunk.then(|| pending.keyless_folding.rows());
            (chunk, last_chunk, pending.fold_upto, keyless)
        };
        let result = (|| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(err)?;
            {
                let mut fold_known_key = tx.prepare_cached(FOLD_KNOWN_KEY).map_err(err)?;
                let mut fold_key = tx.prepare_cached(FOLD_KEY).map_err(err)?;
                let mut fold_subject = tx
                    .prepare_cached(&format!(
                        "INSERT INTO key_subjects (key_id, subject, first_seen, last_seen) \
                         VALUES (?1, ?2, ?3, ?4) {UPSERT_SUBJECT_TAIL}"
                    ))
                    .map_err(err)?;
                for (id, d) in &chunk {
                    let last_from = d.last_from.map(|ip| ip.to_string());
                    let stats = params![id.as_str(), d.uses, d.last_at, last_from, d.head];
                    if fold_known_key.execute(stats).map_err(err)? == 0 {
                        fold_key.execute(stats).map_err(err)?;
                    }
                    // With the key's last_seq: the crash-recovery refold covers them.
                    write_rollup(&tx, id.as_str(), &d.rollup.rows())?;
                    // Subjects only come with valid uses, so the key exists.
                    for (subject, first, last) in &d.subjects {
                        fold_subject
                            .execute(params![id.as_str(), subject, first, last])
                            .map_err(err)?;
                    }
                }
                if let Some(rows) = &keyless {
                    write_rollup(&tx, "", rows)?;
                }
                if last_chunk {
                    tx.execute(
                        "UPDATE usage_state SET folded_seq = MAX(folded_seq, ?1) WHERE id = 1",
                        [fold_upto],
                    )
                    .map_err(err)?;
                }
            }
            tx.commit().map_err(err)
        })();
        let mut pending = lock(&self.pending)?;
        pending.in_flight.clear();
        pending.folds += 1;
        if let Err(e) = result {
            // Put the chunk back; the next step retries it. Appends wait for this step
            // (they need the connection), so no key of the chunk has come back meanwhile.
            for (id, d) in chunk.into_iter().rev() {
                pending.fold_queue.push(id.clone());
                pending.keys.insert(id, Arc::unwrap_or_clone(d));
            }
            return Err(e);
        }
        if pending.folded_heads.len() + chunk.len() > HEADS_CACHED {
            pending.folded_heads.clear();
        }
        for (id, d) in chunk {
            pending.folded_heads.insert(id, d.head);
        }
        if last_chunk {
            pending.keyless_folding = Rollup::default();
        }
        Ok(last_chunk)
    }

    /// How many keys have usage not folded yet.
    pub fn pending_keys(&self) -> Result<usize> {
        Ok(lock(&self.pending)?.keys.len())
    }

    /// Whether a fold has started and not finished.
    pub fn folding(&self) -> Result<bool> {
        Ok(!lock(&self.pending)?.fold_queue.is_empty())
    }
}

/// Adds a rollup's rows to the rollup tables under `key_id` ('' for no key).
fn write_rollup(tx: &rusqlite::Transaction<'_>, key_id: &str, rows: &RollupRows) -> Result<()> {
    if !rows.codes.is_empty() {
        let mut codes = tx.prepare_cached(&UPSERT_ROLLUP_CODES).map_err(err)?;
        for (hour, code, n) in &rows.codes {
            codes.execute(params![key_id, hour, code, n]).map_err(err)?;
        }
    }
    if !rows.values.is_empty() {
        let mut values = tx.prepare_cached(&UPSERT_ROLLUP_VALUES).map_err(err)?;
        for (hour, kind, value, code, seen) in &rows.values {
            values
                .execute(params![
                    key_id,
                    hour,
                    kind.as_str(),
                    value,
                    code,
                    seen.events,
                    seen.first,
                    seen.last
                ])
                .map_err(err)?;
        }
    }
    Ok(())
}

/// The overlay of events after `folded_seq`: empty after a clean stop (the writer folds
/// on shutdown), the unfolded tail after a crash.
fn recover(conn: &Connection) -> Result<Pending> {
    let folded: i64 = conn
        .query_row("SELECT folded_seq FROM usage_state WHERE id = 1", [], |r| {
            r.get(0)
        })
        .map_err(err)?;
    let mut pending = Pending {
        max_seq: folded,
        ..Pending::default()
    };
    let mut stmt = conn
        .prepare(
            "SELECT seq, key_id, time, code, counted, source_ip, subject, scope, user_agent \
             FROM usage_events WHERE seq > ?1 ORDER BY seq",
        )
        .map_err(err)?;
    let mut folded_upto = conn
        .prepare("SELECT last_seq FROM key_usage WHERE key_id = ?1")
        .map_err(err)?;
    // Keys folded by an unfinished fold hold events past folded_seq already.
    let mut key_folded: HashMap<KeyId, i64> = HashMap::new();
    let mut rows = stmt.query([folded]).map_err(err)?;
    while let Some(row) = rows.next().map_err(err)? {
        let seq: i64 = row.get(0).map_err(err)?;
        // Every logged id was a `KeyId`; text that is not one names no key, so it has
        // no stats to fold.
        let key_id: Option<KeyId> = row
            .get::<_, Option<String>>(1)
            .map_err(err)?
            .and_then(|id| KeyId::parse(&id).ok());
        if let Some(id) = &key_id {
            let upto = match key_folded.get(id) {
                Some(upto) => *upto,
                None => {
                    let upto = folded_upto
                        .query_row([id.as_str()], |r| r.get::<_, Option<i64>>(0))
                        .optional()
                        .map_err(err)?
                        .flatten()
                        .unwrap_or(0);
                    key_folded.insert(id.clone(), upto);
                    upto
                }
            };
            if seq <= upto {
                continue;
            }
        }
        let code: String = row.get(3).map_err(err)?;
        let source_ip: Option<String> = row.get(5).map_err(err)?;
        let source_ip = source_ip.and_then(|ip| ip.parse().ok());
        let subject: Option<String> = row.get(6).map_err(err)?;
        let scope: Option<String> = row.get(7).map_err(err)?;
        let user_agent: Option<String> = row.get(8).map_err(err)?;
        let code: VerifyCode = code.parse().map_err(|_| {
            StoreError::Corrupt(format!("usage event {seq}: unknown code {code:?}"))
        })?;
        pending.add(&LoggedEvent {
            seq,
            key_id: key_id.as_ref(),
            time: row.get(2).map_err(err)?,
            valid: code == VerifyCode::Valid,
            counted: row.get::<_, i64>(4).map_err(err)? != 0,
            source_ip,
            subject: subject.as_deref(),
            code,
            scope: scope.as_deref(),
            user_agent: user_agent.as_deref(),
        });
    }
    if !pending.is_empty() {
        tracing::info!(
            after_seq = folded,
            keys = pending.keys.len(),
            "usage events logged but not folded before the last stop were refolded"
        );
    }
    Ok(pending)
}
