//! The usage log's hash chain: every batch of usage events the writer stores is chained
//! to the batch before it, so an event edited, removed or inserted behind keywarden's
//! back, or a batch removed, inserted or moved, is found by recomputing the chain.
//!
//! A batch's hash is `SHA-256(prev_hash ‖ canonical batch)`, where the canonical batch is
//! the canonical JSON of each of its events, in seq order, each followed by a newline
//! (`\n`), and then the batch's own line (no newline after it):
//!
//! ```text
//! {"code":"VALID","counted":false,"environment":"live","key_id":"…","scope":"deploy:write","seq":41,"source_ip":"192.0.2.1","subject":null,"time":1780315200000,"user_agent":"ci/1"}
//! {"batch":7,"count":1,"first_seq":41,"last_seq":41,"time":1780315200000}
//! ```
//!
//! An event's canonical JSON holds every stored column of `usage_events` but `prev_seq`,
//! keys in byte order: `code, counted, environment, key_id, scope, seq, source_ip,
//! subject, time, user_agent`; absent values are `null`, `counted` is a boolean, `seq` and
//! `time` (unix milliseconds) integers, strings escaped as RFC 8785 says (the audit
//! chain's rules, [`crate::audit_chain`]). `prev_seq` is left out: it is the SQLite
//! log's per-key index (PostgreSQL leaves it empty), so the same events hash the same on
//! both backends. The batch line's `time` is its newest event's time, what retention
//! judges a batch by. The first batch's `prev_hash` is 32 zero bytes; after retention
//! removed a prefix, the chain starts at the hash of the last batch removed.
//!
//! Each batch also stores `digests`: each event's CRC-32 (of its canonical JSON, without
//! the newline, big-endian), in seq order. They are not part
//! of the chain; they only say which event of a batch that no longer matches its hash
//! was edited. The chain alone decides whether the log is intact.

use std::collections::VecDeque;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit_chain::{
    json_opt, json_str, Break, BreakKind, ChainHash, ChainWalk, Link, WalkReport, GENESIS,
};

/// Bytes of each event's digest kept in its batch row. Four are enough to point at the
/// edited event (another event matching by chance is one in four billion, and even then
/// the batch is still named); eight made a writer-sized batch row fill most of a SQLite
/// page, which cost 14 bytes an event instead of 5 (docs/benchmarks.md).
pub const DIGEST_LEN: usize = 4;

/// One stored usage event, borrowed: what the writer has in hand, and what a verifier
/// reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventFields<'a> {
    pub seq: i64,
    pub key_id: Option<&'a str>,
    /// Unix milliseconds.
    pub time: i64,
    pub code: &'a str,
    /// As stored: the address's `Display` form.
    pub source_ip: Option<&'a str>,
    pub scope: Option<&'a str>,
    pub environment: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub counted: bool,
}

/// Appends the canonical JSON of an event (see the module docs) to `out`.
pub fn canonical_event(out: &mut String, e: &EventFields<'_>) {
    out.push_str("{\"code\":");
    json_str(out, e.code);
    out.push_str(if e.counted {
        ",\"counted\":true,\"environment\":"
    } else {
        ",\"counted\":false,\"environment\":"
    });
    json_opt(out, e.environment);
    out.push_str(",\"key_id\":");
    json_opt(out, e.key_id);
    out.push_str(",\"scope\":");
    json_opt(out, e.scope);
    let _ = write!(out, ",\"seq\":{},\"source_ip\":", e.seq);
    json_opt(out, e.source_ip);
    out.push_str(",\"subject\":");
    json_opt(out, e.subject);
    let _ = write!(out, ",\"time\":{},\"user_agent\":", e.time);
    json_opt(out, e.user_agent);
    out.push('}');
}

/// A batch as its row stores it, without its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    pub seq: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub count: i64,
    /// The newest event's time (unix milliseconds).
    pub time: i64,
}

/// Appends the canonical JSON of a batch's own line.
pub fn canonical_header(out: &mut String, h: &BatchHeader) {
    let _ = write!(
        out,
        "{{\"batch\":{},\"count\":{},\"first_seq\":{},\"last_seq\":{},\"time\":{}}}",
        h.seq, h.count, h.first_seq, h.last_seq, h.time
    );
}

/// Hashes a batch as its events are written, one at a time, into one reused buffer: the
/// writer chains a batch without another pass over it.
#[derive(Debug)]
pub struct BatchHasher {
    chain: Sha256,
    line: String,
    digests: Vec<u8>,
    first_seq: Option<i64>,
    last_seq: i64,
    count: i64,
    time: i64,
}

/// A chained batch, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBatch {
    pub header: BatchHeader,
    pub prev_hash: ChainHash,
    pub hash: ChainHash,
    pub digests: Vec<u8>,
}

impl BatchHasher {
    pub fn new(prev_hash: &ChainHash, events: usize) -> Self {
        let mut chain = Sha256::new();
        chain.update(prev_hash);
        Self {
            chain,
            line: String::with_capacity(320),
            digests: Vec::with_capacity(events * DIGEST_LEN),
            first_seq: None,
            last_seq: 0,
            count: 0,
            time: i64::MIN,
        }
    }

    /// Adds the next event (in seq order).
    pub fn push(&mut self, e: &EventFields<'_>) {
        self.line.clear();
        canonical_event(&mut self.line, e);
        self.digests
            .extend_from_slice(&event_digest(self.line.as_bytes()));
        self.line.push('\n');
        self.chain.update(self.line.as_bytes());
        self.first_seq.get_or_insert(e.seq);
        self.last_seq = e.seq;
        self.count += 1;
        self.time = self.time.max(e.time);
    }

    /// Seals the batch as batch `seq`, chained to the `prev_hash` it was made with.
    pub fn finish(mut self, seq: i64, prev_hash: ChainHash) -> SealedBatch {
        let header = BatchHeader {
            seq,
            first_seq: self.first_seq.unwrap_or(0),
            last_seq: self.last_seq,
            count: self.count,
            time: if self.count == 0 { 0 } else { self.time },
        };
        self.line.clear();
        canonical_header(&mut self.line, &header);
        self.chain.update(self.line.as_bytes());
        SealedBatch {
            header,
            prev_hash,
            hash: self.chain.finalize().into(),
            digests: self.digests,
        }
    }
}

/// An event's locator: CRC-32 (IEEE, as zlib and `crc32` compute it) of its canonical
/// JSON, big-endian. Not a security check (the chain is): a second SHA-256 per event
/// cost the writer as much again as the chain's own hashing.
fn event_digest(canonical: &[u8]) -> [u8; DIGEST_LEN] {
    crc32fast::hash(canonical).to_be_bytes()
}

// ---------------------------------------------------------------------------------------
// Verification

/// A stored event as streamed to a verifier (`GET /v1/usage/chain/export`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainEvent {
    pub seq: i64,
    pub key_id: Option<String>,
    pub time: i64,
    pub code: String,
    pub source_ip: Option<String>,
    pub scope: Option<String>,
    pub environment: Option<String>,
    pub subject: Option<String>,
    pub user_agent: Option<String>,
    pub counted: bool,
}

impl ChainEvent {
    pub fn fields(&self) -> EventFields<'_> {
        EventFields {
            seq: self.seq,
            key_id: self.key_id.as_deref(),
            time: self.time,
            code: &self.code,
            source_ip: self.source_ip.as_deref(),
            scope: self.scope.as_deref(),
            environment: self.environment.as_deref(),
            subject: self.subject.as_deref(),
            user_agent: self.user_agent.as_deref(),
            counted: self.counted,
        }
    }
}

/// A stored batch with the events stored in its range, as a verifier reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainBatch {
    #[serde(flatten)]
    pub header: BatchHeader,
    /// Hex SHA-256.
    pub prev_hash: String,
    pub hash: String,
    /// Hex, [`DIGEST_LEN`] bytes per event.
    pub digests: String,
    pub events: Vec<ChainEvent>,
}

/// One line of the export: a batch with its events, or an event no batch covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainLine {
    Batch(ChainBatch),
    Event(ChainEvent),
}

/// A batch parsed for the walk. A hash that is not 64 hex characters becomes one no
/// batch can have, so the walk names that batch.
#[derive(Debug, Clone)]
pub struct WalkedBatch {
    pub header: BatchHeader,
    pub prev_hash: ChainHash,
    pub hash: ChainHash,
    pub digests: Vec<u8>,
    pub events: Vec<ChainEvent>,
}

impl From<ChainBatch> for WalkedBatch {
    fn from(b: ChainBatch) -> Self {
        let hash = |s: &str| crate::audit_chain::from_hex(s).unwrap_or([0xff; 32]);
        Self {
            header: b.header,
            prev_hash: hash(&b.prev_hash),
            hash: hash(&b.hash),
            digests: hex::decode(&b.digests).unwrap_or_default(),
            events: b.events,
        }
    }
}

/// The hash of a batch's events and header chained to `prev_hash`.
pub fn batch_hash(prev_hash: &ChainHash, header: &BatchHeader, events: &[ChainEvent]) -> ChainHash {
    let mut h = BatchHasher::new(prev_hash, 0);
    for e in events {
        h.push(&e.fields());
    }
    // The stored header is hashed as stored, not as the events imply: an edited range,
    // count or time is a change too.
    h.line.clear();
    canonical_header(&mut h.line, header);
    h.chain.update(h.line.as_bytes());
    h.chain.finalize().into()
}

impl Link for WalkedBatch {
    const NOUN: &'static str = "batch";
    const NOUNS: &'static str = "batches";
    const CHAIN: &'static str = "usage log";
    fn seq(&self) -> i64 {
        self.header.seq
    }
    fn prev_hash(&self) -> &ChainHash {
        &self.prev_hash
    }
    fn hash(&self) -> &ChainHash {
        &self.hash
    }
    fn hash_at(&self, seq: i64) -> ChainHash {
        let header = BatchHeader { seq, ..self.header };
        batch_hash(&self.prev_hash, &header, &self.events)
    }
}

/// The first place where the usage log is not what was written: the batch, and the event
/// inside it when one can be named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageBreak {
    pub kind: BreakKind,
    pub batch: i64,
    pub event_seq: Option<i64>,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageReport {
    pub first_batch: i64,
    pub checked_batches: u64,
    pub checked_events: u64,
    /// The last intact batch.
    pub last_batch: Option<i64>,
    pub broken: Option<UsageBreak>,
}

/// The usage chain's head as the audit trail recorded it (`usage.anchored`, written by
/// the enforcer): the chain alone cannot tell a consistent rewrite or a cut tail from
/// the log as written, but a rewrite must then also match these entries, which the audit
/// trail's own chain and signed checkpoints protect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageAnchor {
    /// The audit entry's seq.
    pub audit_seq: i64,
    pub batch: i64,
    pub hash: ChainHash,
}

/// The first anchor the log does not match, by batch: an anchored batch past the log's
/// head (its tail was cut), missing from it, or with another hash (rewritten). `seen` holds
/// the stored hash of each anchored batch the export showed, `retained` the last prefix
/// retention removed (batch and hash); anchors inside that prefix are checked against
/// its hash where they name its last batch, and are otherwise gone with it.
pub fn check_anchors(
    anchors: &[UsageAnchor],
    seen: &std::collections::HashMap<i64, ChainHash>,
    retained: Option<(i64, ChainHash)>,
    head_batch: i64,
) -> Option<UsageBreak> {
    let mut ordered: Vec<&UsageAnchor> = anchors.iter().collect();
    ordered.sort_by_key(|a| (a.batch, a.audit_seq));
    for a in ordered {
        let at = |kind, detail: String| {
            Some(UsageBreak {
                kind,
                batch: a.batch,
                event_seq: None,
                detail,
            })
        };
        if a.batch > head_batch {
            return at(
                BreakKind::Truncated,
                format!(
                    "audit entry {} anchored batch {}, past the log's last batch {head_batch}:                      batches were removed from its end",
                    a.audit_seq, a.batch
                ),
            );
        }
        if let Some((last, hash)) = retained.filter(|(last, _)| a.batch <= *last) {
            if a.batch == last && a.hash != hash {
                return at(
                    BreakKind::Replaced,
                    format!(
                        "retention's record of batch {last} holds another hash than audit                          entry {} anchored",
                        a.audit_seq
                    ),
                );
            }
            continue;
        }
        match seen.get(&a.batch) {
            None => {
                return at(
                    BreakKind::Removed,
                    format!(
                        "batch {} (anchored by audit entry {}) is not in the log",
                        a.batch, a.audit_seq
                    ),
                )
            }
            Some(h) if *h != a.hash => {
                return at(
                    BreakKind::Replaced,
                    format!(
                        "batch {}'s hash is not the one audit entry {} anchored: the log was                          rewritten up to this batch",
                        a.batch, a.audit_seq
                    ),
                )
            }
            Some(_) => {}
        }
    }
    None
}

/// Which event of a batch broke it, found from the stored digests.
#[derive(Debug, Clone)]
struct EventFinding {
    batch: i64,
    kind: BreakKind,
    seq: i64,
    detail: String,
}

/// Walks the usage log batch by batch ([`ChainWalk`] over batches), and names the event
/// inside a broken batch, or an event that no batch covers.
#[derive(Debug)]
pub struct UsageWalk {
    walk: ChainWalk<WalkedBatch>,
    /// Event findings of the last batches pushed (the walk judges one batch behind).
    findings: VecDeque<EventFinding>,
    /// The first event no batch covers, and the last batch pushed before it.
    uncovered: Option<(Option<i64>, i64)>,
    last_pushed: Option<i64>,
    prev_pushed_hash: ChainHash,
    events: u64,
    stop: bool,
}

impl UsageWalk {
    /// A walk from the first batch ever written.
    pub fn new() -> Self {
        Self::starting_after(0, GENESIS)
    }

    /// A walk that starts after batch `seq` whose hash is `hash` (the last batch that
    /// retention removed).
    pub fn starting_after(seq: i64, hash: ChainHash) -> Self {
        Self {
            walk: ChainWalk::starting_after(seq, hash),
            findings: VecDeque::new(),
            uncovered: None,
            last_pushed: None,
            prev_pushed_hash: hash,
            events: 0,
            stop: false,
        }
    }

    /// Whether more input can change the verdict no more.
    pub fn is_broken(&self) -> bool {
        self.walk.is_broken() || self.stop
    }

    pub fn push(&mut self, line: ChainLine) {
        match line {
            ChainLine::Batch(b) => self.push_batch(b.into()),
            ChainLine::Event(e) => self.push_uncovered(&e),
        }
    }

    pub fn push_batch(&mut self, b: WalkedBatch) {
        if self.is_broken() {
            return;
        }
        if let Some((after, _)) = self.uncovered {
            // Past a stray event, two more batches let the walk judge the one right after
            // it (a batch row removed there explains the strays); more tell nothing.
            if self.last_pushed.unwrap_or(0) >= after.unwrap_or(0) + 2 {
                self.stop = true;
                return;
            }
        }
        // Only a batch that does not match its hash, or no longer links, is searched for
        // the event that broke it: an intact batch costs one hash.
        let self_ok = b.hash_at(b.header.seq) == b.hash;
        if !self_ok || b.prev_hash != self.prev_pushed_hash {
            if let Some(f) = locate(&b) {
                self.findings.push_back(f);
                if self.findings.len() > 2 {
                    self.findings.pop_front();
                }
            }
        }
        self.events += b.events.len() as u64;
        self.prev_pushed_hash = b.hash;
        self.last_pushed = Some(b.header.seq);
        self.walk.push(b);
    }

    /// An event the export found in no batch's range: written around the writer.
    pub fn push_uncovered(&mut self, e: &ChainEvent) {
        if self.uncovered.is_none() {
            self.uncovered = Some((self.last_pushed, e.seq));
        }
    }

    /// Ends the walk; `head` is the (batch seq, hash) the store recorded last writing.
    pub fn finish(self, head: Option<(i64, ChainHash)>) -> UsageReport {
        let report: WalkReport = self.walk.finish(head);
        let from_walk = report.broken.map(|b: Break| {
            let finding = self
                .findings
                .iter()
                .find(|f| f.batch == b.seq && b.kind == BreakKind::Altered);
            match finding {
                Some(f) => UsageBreak {
                    kind: f.kind,
                    batch: b.seq,
                    event_seq: Some(f.seq),
                    detail: f.detail.clone(),
                },
                None => UsageBreak {
                    kind: b.kind,
                    batch: b.seq,
                    event_seq: None,
                    detail: b.detail,
                },
            }
        });
        let from_uncovered = self.uncovered.map(|(after, seq)| UsageBreak {
            kind: BreakKind::Inserted,
            batch: after.map_or(report.first_seq, |a| a + 1),
            event_seq: Some(seq),
            detail: format!("event {seq} is in no batch: it was written around the usage writer"),
        });
        // The break found first in chain order; a batch missing right where the stray
        // events lie explains them, so it is named instead.
        let broken = match (from_walk, from_uncovered) {
            (Some(w), Some(u)) if w.batch <= u.batch => Some(w),
            (_, Some(u)) => Some(u),
            (w, None) => w,
        };
        UsageReport {
            first_batch: report.first_seq,
            checked_batches: report.checked,
            checked_events: self.events,
            last_batch: report.last.map(|l| l.0),
            broken,
        }
    }
}

impl Default for UsageWalk {
    fn default() -> Self {
        Self::new()
    }
}

/// The event that breaks a batch: the first seq of its range missing, or the first event
/// whose digest differs from the one stored when it was written. `None` when every event
/// is there and matches (the batch row itself was edited).
fn locate(b: &WalkedBatch) -> Option<EventFinding> {
    let h = &b.header;
    let batch = h.seq;
    let finding = |kind, seq, detail| {
        Some(EventFinding {
            batch,
            kind,
            seq,
            detail,
        })
    };
    // The writer stores a batch's events under consecutive seqs.
    let mut expected = h.first_seq;
    for e in &b.events {
        if e.seq > expected {
            return finding(
                BreakKind::Removed,
                expected,
                format!("event {expected} of batch {batch} was removed"),
            );
        }
        expected = e.seq + 1;
    }
    if expected <= h.last_seq {
        return finding(
            BreakKind::Removed,
            expected,
            format!("event {expected} of batch {batch} was removed"),
        );
    }
    let mut line = String::with_capacity(320);
    for (e, stored) in b.events.iter().zip(b.digests.chunks(DIGEST_LEN)) {
        line.clear();
        canonical_event(&mut line, &e.fields());
        if event_digest(line.as_bytes()) != stored {
            return finding(
                BreakKind::Altered,
                e.seq,
                format!("event {} of batch {batch} was edited", e.seq),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64) -> ChainEvent {
        ChainEvent {
            seq,
            key_id: Some("0123456789abcdef".into()),
            time: 1_780_315_200_000 + seq,
            code: "VALID".into(),
            source_ip: Some("192.0.2.1".into()),
            scope: Some("deploy:write".into()),
            environment: Some("live".into()),
            subject: (seq % 2 == 0).then(|| "host \"a\"".into()),
            user_agent: None,
            counted: seq % 3 == 0,
        }
    }

    /// Batches of `per` events each, chained from genesis.
    fn chain(batches: i64, per: i64) -> Vec<WalkedBatch> {
        let mut prev = GENESIS;
        (0..batches)
            .map(|b| {
                let events: Vec<ChainEvent> = (0..per).map(|i| event(b * per + i + 1)).collect();
                let mut h = BatchHasher::new(&prev, events.len());
                events.iter().for_each(|e| h.push(&e.fields()));
                let s = h.finish(b + 1, prev);
                prev = s.hash;
                WalkedBatch {
                    header: s.header,
                    prev_hash: s.prev_hash,
                    hash: s.hash,
                    digests: s.digests,
                    events,
                }
            })
            .collect()
    }

    fn walk(batches: Vec<WalkedBatch>) -> UsageReport {
        let head = batches.last().map(|b| (b.header.seq, b.hash));
        let mut w = UsageWalk::new();
        batches.into_iter().for_each(|b| w.push_batch(b));
        w.finish(head)
    }

    fn broken(batches: Vec<WalkedBatch>) -> (BreakKind, i64, Option<i64>) {
        let b = walk(batches).broken.expect("a break");
        (b.kind, b.batch, b.event_seq)
    }

    #[test]
    fn canonical_forms_are_fixed() {
        let mut out = String::new();
        canonical_event(&mut out, &event(2).fields());
        assert_eq!(
            out,
            r#"{"code":"VALID","counted":false,"environment":"live","key_id":"0123456789abcdef","scope":"deploy:write","seq":2,"source_ip":"192.0.2.1","subject":"host \"a\"","time":1780315200002,"user_agent":null}"#
        );
        let mut out = String::new();
        canonical_header(
            &mut out,
            &BatchHeader {
                seq: 7,
                first_seq: 41,
                last_seq: 43,
                count: 3,
                time: 5,
            },
        );
        assert_eq!(
            out,
            r#"{"batch":7,"count":3,"first_seq":41,"last_seq":43,"time":5}"#
        );
    }

    #[test]
    fn the_hasher_and_the_verifier_agree_and_the_hash_is_documented() {
        let c = chain(1, 3);
        let b = &c[0];
        assert_eq!(batch_hash(&GENESIS, &b.header, &b.events), b.hash);
        let mut text = Vec::from(GENESIS);
        for e in &b.events {
            let mut line = String::new();
            canonical_event(&mut line, &e.fields());
            text.extend_from_slice(line.as_bytes());
            text.push(b'\n');
        }
        let mut line = String::new();
        canonical_header(&mut line, &b.header);
        text.extend_from_slice(line.as_bytes());
        let direct: ChainHash = Sha256::digest(&text).into();
        assert_eq!(direct, b.hash);
        assert_eq!(b.header.time, 1_780_315_200_003);
        assert_eq!(b.digests.len(), 3 * DIGEST_LEN);
    }

    #[test]
    fn an_intact_log_walks_clean() {
        let r = walk(chain(5, 4));
        assert_eq!(r.broken, None);
        assert_eq!((r.checked_batches, r.checked_events), (5, 20));
    }

    #[test]
    fn an_edited_event_is_named() {
        let mut c = chain(5, 4);
        c[2].events[1].source_ip = Some("203.0.113.9".into());
        assert_eq!(broken(c), (BreakKind::Altered, 3, Some(10)));
    }

    #[test]
    fn a_removed_event_is_named() {
        let mut c = chain(5, 4);
        c[1].events.remove(2);
        assert_eq!(broken(c), (BreakKind::Removed, 2, Some(7)));
        let mut c = chain(5, 4);
        c[1].events.pop();
        assert_eq!(broken(c), (BreakKind::Removed, 2, Some(8)));
    }

    #[test]
    fn batches_removed_inserted_or_swapped_are_named() {
        let mut c = chain(5, 2);
        c.remove(2);
        assert_eq!(broken(c), (BreakKind::Removed, 3, None));

        let mut c = chain(5, 2);
        let (a, b) = (c[1].clone(), c[2].clone());
        c[1] = WalkedBatch {
            header: BatchHeader { seq: 2, ..b.header },
            ..b
        };
        c[2] = WalkedBatch {
            header: BatchHeader { seq: 3, ..a.header },
            ..a
        };
        assert_eq!(broken(c).0, BreakKind::Reordered);
    }

    #[test]
    fn an_event_outside_every_batch_is_named() {
        let c = chain(3, 2);
        let mut w = UsageWalk::new();
        let mut it = c.into_iter();
        w.push_batch(it.next().unwrap());
        w.push_uncovered(&event(99));
        it.for_each(|b| w.push_batch(b));
        let b = w.finish(None).broken.expect("a break");
        assert_eq!(
            (b.kind, b.batch, b.event_seq),
            (BreakKind::Inserted, 2, Some(99))
        );
    }

    #[test]
    fn a_walk_continues_after_retention() {
        let c = chain(5, 2);
        let after = c[1].hash;
        let head = (5, c[4].hash);
        let mut w = UsageWalk::starting_after(2, after);
        c.into_iter().skip(2).for_each(|b| w.push_batch(b));
        let r = w.finish(Some(head));
        assert_eq!(r.broken, None);
        assert_eq!(r.checked_batches, 3);
    }

    #[test]
    fn anchors_catch_a_cut_tail_a_rewrite_and_a_missing_batch() {
        use std::collections::HashMap;
        let anchor = |audit_seq, batch, byte| UsageAnchor {
            audit_seq,
            batch,
            hash: [byte; 32],
        };
        let seen: HashMap<i64, ChainHash> = [(3, [3; 32]), (7, [7; 32])].into();
        let ok = [anchor(10, 3, 3), anchor(20, 7, 7)];
        assert_eq!(check_anchors(&ok, &seen, None, 9), None);

        let cut = check_anchors(&ok, &seen, None, 6).unwrap();
        assert_eq!((cut.kind, cut.batch), (BreakKind::Truncated, 7));
        assert!(cut.detail.contains("audit entry 20"), "{}", cut.detail);

        let rewritten = [anchor(10, 3, 3), anchor(20, 7, 8)];
        let b = check_anchors(&rewritten, &seen, None, 9).unwrap();
        assert_eq!((b.kind, b.batch), (BreakKind::Replaced, 7));

        let missing = [anchor(10, 5, 5)];
        let b = check_anchors(&missing, &seen, None, 9).unwrap();
        assert_eq!((b.kind, b.batch), (BreakKind::Removed, 5));

        // Inside a retained prefix: gone with it, except the prefix's own last batch.
        assert_eq!(check_anchors(&missing, &seen, Some((5, [5; 32])), 9), None);
        let b = check_anchors(&missing, &seen, Some((5, [6; 32])), 9).unwrap();
        assert_eq!((b.kind, b.batch), (BreakKind::Replaced, 5));
        assert_eq!(
            check_anchors(&[anchor(1, 2, 0)], &seen, Some((5, [6; 32])), 9),
            None
        );

        // The lowest batch is named first, whatever the order of the entries.
        let two = [anchor(30, 7, 9), anchor(40, 3, 9)];
        assert_eq!(check_anchors(&two, &seen, None, 9).unwrap().batch, 3);
    }
}
