//! The audit trail's hash chain: the canonical form of an entry, its hash, signed
//! checkpoints, and the walk that finds the first entry that was altered, removed,
//! inserted or reordered, or a chain that was truncated or replaced.
//!
//! `hash = SHA-256(prev_hash ‖ canonical JSON of the entry)`. The canonical JSON is an
//! object with the keys `action, actor, actor_name, details, reason, request_id, seq,
//! source_ip, target, time, user_agent` in that (byte) order, no whitespace, absent values
//! as `null`, `details` embedded as JSON with its object keys sorted, and `time` as
//! `YYYY-MM-DDTHH:MM:SS.mmmZ`. Anyone can recompute it from an export (RFC 8785 for the
//! values we write: strings, integers, booleans, null).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::clock::{from_millis, to_millis};
use crate::model::AuditEntry;

pub type ChainHash = [u8; 32];

/// `prev_hash` of the first entry.
pub const GENESIS: ChainHash = [0; 32];

/// An entry with its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedEntry {
    pub seq: i64,
    pub entry: AuditEntry,
    pub prev_hash: ChainHash,
    pub hash: ChainHash,
}

impl SealedEntry {
    pub fn seal(seq: i64, entry: AuditEntry, prev_hash: ChainHash) -> Self {
        let hash = chain_hash(&prev_hash, seq, &entry);
        Self {
            seq,
            entry,
            prev_hash,
            hash,
        }
    }
}

/// Audit times are kept to the millisecond, in this one format, so that a hash
/// recomputed from an export matches.
pub fn format_time(t: OffsetDateTime) -> String {
    let t = from_millis(to_millis(t));
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

pub fn to_hex(h: &ChainHash) -> String {
    hex::encode(h)
}

pub fn from_hex(s: &str) -> Option<ChainHash> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

pub fn chain_hash(prev: &ChainHash, seq: i64, entry: &AuditEntry) -> ChainHash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical(seq, entry).as_bytes());
    h.finalize().into()
}

/// The canonical JSON of an entry (see the module docs).
pub fn canonical(seq: i64, e: &AuditEntry) -> String {
    let mut out = String::with_capacity(256 + e.details.len());
    out.push_str("{\"action\":");
    json_str(&mut out, &e.action);
    out.push_str(",\"actor\":");
    json_str(&mut out, &e.actor.id);
    out.push_str(",\"actor_name\":");
    json_str(&mut out, &e.actor.name);
    out.push_str(",\"details\":");
    canonical_details(&mut out, &e.details);
    out.push_str(",\"reason\":");
    json_opt(&mut out, e.reason.as_deref());
    out.push_str(",\"request_id\":");
    json_opt(&mut out, e.actor.request_id.as_deref());
    let _ = write!(out, ",\"seq\":{seq},\"source_ip\":");
    json_opt(&mut out, e.actor.source_ip.as_deref());
    out.push_str(",\"target\":");
    json_str(&mut out, &e.target);
    out.push_str(",\"time\":");
    json_str(&mut out, &format_time(e.time));
    out.push_str(",\"user_agent\":");
    json_opt(&mut out, e.actor.user_agent.as_deref());
    out.push('}');
    out
}

/// `details` as canonical JSON. Text that is not JSON (only a tampered row holds such)
/// is embedded as a string, so it hashes differently from any object.
pub fn canonical_details(out: &mut String, details: &str) {
    match serde_json::from_str::<serde_json::Value>(details) {
        Ok(v) => canonical_value(out, &v),
        Err(_) => json_str(out, details),
    }
}

/// `details` text in canonical form, as it is stored.
pub fn canonicalize_details(details: &str) -> String {
    let mut out = String::with_capacity(details.len());
    canonical_details(&mut out, details);
    out
}

fn canonical_value(out: &mut String, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                json_str(out, k);
                out.push(':');
                if let Some(v) = map.get(k) {
                    canonical_value(out, v);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_value(out, v);
            }
            out.push(']');
        }
        Value::String(s) => json_str(out, s),
        other => out.push_str(&other.to_string()),
    }
}

pub(crate) fn json_opt(out: &mut String, v: Option<&str>) {
    match v {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
}

/// A JSON string with RFC 8785's escapes: the short forms, `\u00xx` (lower-case) for other
/// control characters, everything else literal.
pub(crate) fn json_str(out: &mut String, s: &str) {
    out.push('"');
    // Most values need no escape: copied whole (the usage writer hashes every event).
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------
// Checkpoints

/// A signed statement "the chain's entry `seq` has hash `hash`", made at `time`, kept
/// outside the database so that a rewritten or truncated chain can be told from the
/// original.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    /// Hex SHA-256.
    pub hash: String,
    pub time: String,
    /// Hex Ed25519 public key of the signer.
    pub public_key: String,
    /// Hex Ed25519 signature over [`Checkpoint::message`].
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("the checkpoint's public key is not a valid Ed25519 key")]
    BadPublicKey,
    #[error("the checkpoint's hash is not 64 hex characters")]
    BadHash,
    #[error("the checkpoint's signature does not match its seq, hash and time")]
    BadSignature,
}

impl Checkpoint {
    /// The signed bytes: canonical JSON of `{seq, hash, time}`.
    pub fn message(seq: i64, hash: &str, time: &str) -> String {
        let mut out = String::from("{\"hash\":");
        json_str(&mut out, hash);
        let _ = write!(out, ",\"seq\":{seq},\"time\":");
        json_str(&mut out, time);
        out.push('}');
        out
    }

    pub fn verify(&self) -> Result<ChainHash, CheckpointError> {
        let mut pk = [0u8; 32];
        hex::decode_to_slice(&self.public_key, &mut pk)
            .map_err(|_| CheckpointError::BadPublicKey)?;
        let key = VerifyingKey::from_bytes(&pk).map_err(|_| CheckpointError::BadPublicKey)?;
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig)
            .map_err(|_| CheckpointError::BadSignature)?;
        let sig = ed25519_dalek::Signature::from_bytes(&sig);
        key.verify(
            Self::message(self.seq, &self.hash, &self.time).as_bytes(),
            &sig,
        )
        .map_err(|_| CheckpointError::BadSignature)?;
        from_hex(&self.hash).ok_or(CheckpointError::BadHash)
    }
}

/// The server's checkpoint signing key (an Ed25519 seed kept in the data directory).
pub struct CheckpointSigner {
    key: SigningKey,
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    pub fn generate<R: rand::RngCore + rand::CryptoRng>(rng: &mut R) -> Self {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// From the 64 hex characters of the seed.
    pub fn from_seed_hex(s: &str) -> Option<Self> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(s.trim(), seed.as_mut()).ok()?;
        Some(Self {
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn seed_hex(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(hex::encode(self.key.to_bytes()))
    }

    pub fn public_key(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, seq: i64, hash: &ChainHash, time: OffsetDateTime) -> Checkpoint {
        let hash = to_hex(hash);
        let time = format_time(time);
        let signature = self
            .key
            .sign(Checkpoint::message(seq, &hash, &time).as_bytes());
        Checkpoint {
            seq,
            hash,
            time,
            public_key: self.public_key(),
            signature: hex::encode(signature.to_bytes()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The walk

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakKind {
    Altered,
    Removed,
    Inserted,
    Reordered,
    Truncated,
    Replaced,
    /// Entries past the last one the store recorded writing: added around it.
    Appended,
}

impl BreakKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Altered => "altered",
            Self::Removed => "removed",
            Self::Inserted => "inserted",
            Self::Reordered => "reordered",
            Self::Truncated => "truncated",
            Self::Replaced => "replaced",
            Self::Appended => "appended",
        }
    }
}

/// The first place where the chain is not what was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    pub kind: BreakKind,
    /// The entry named: the altered, missing, inserted or moved one, or the first seq past
    /// a truncated end.
    pub seq: i64,
    pub detail: String,
}

/// One link of a hash chain as [`ChainWalk`] judges it: the audit trail's entries, and the
/// usage log's batches (`usage_chain`). Both hash their own seq, so a link moved or
/// renumbered no longer matches its hash.
pub trait Link {
    /// What one link is called in a break's detail ("entry", "batch").
    const NOUN: &'static str;
    const NOUNS: &'static str;
    /// What the whole chain is called ("trail", "usage log").
    const CHAIN: &'static str;
    fn seq(&self) -> i64;
    fn prev_hash(&self) -> &ChainHash;
    fn hash(&self) -> &ChainHash;
    /// The hash this link would have, were it stored at `seq` (tells a renumbered chain
    /// from an edited link).
    fn hash_at(&self, seq: i64) -> ChainHash;
}

impl Link for SealedEntry {
    const NOUN: &'static str = "entry";
    const NOUNS: &'static str = "entries";
    const CHAIN: &'static str = "trail";
    fn seq(&self) -> i64 {
        self.seq
    }
    fn prev_hash(&self) -> &ChainHash {
        &self.prev_hash
    }
    fn hash(&self) -> &ChainHash {
        &self.hash
    }
    fn hash_at(&self, seq: i64) -> ChainHash {
        chain_hash(&self.prev_hash, seq, &self.entry)
    }
}

/// Walks links in the order given, judging each once the next one is known (one link of
/// look-ahead tells an inserted or swapped link from an altered one). Memory stays
/// constant however long the chain.
#[derive(Debug)]
pub struct ChainWalk<L = SealedEntry> {
    first_seq: i64,
    expected_seq: i64,
    expected_prev: ChainHash,
    pending: Option<L>,
    checkpoints: BTreeMap<i64, ChainHash>,
    checked: u64,
    last: Option<(i64, ChainHash)>,
    broken: Option<Break>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkReport {
    pub first_seq: i64,
    pub checked: u64,
    /// The last intact entry.
    pub last: Option<(i64, ChainHash)>,
    pub broken: Option<Break>,
}

impl WalkReport {
    /// Judges the end of an intact walk against the head the store recorded once the
    /// walk's entries were read (read after them, so that entries written meanwhile by
    /// the store itself are below it): entries past it were written around the store.
    pub fn check_past_head(&mut self, head_seq: i64) {
        if self.broken.is_some() {
            return;
        }
        if let Some((last, _)) = self.last {
            if last > head_seq {
                self.broken = Some(Break {
                    kind: BreakKind::Appended,
                    seq: head_seq + 1,
                    detail: format!(
                        "entries {} to {last} lie past the last entry the store recorded \
                         writing ({head_seq}): they were written around it",
                        head_seq + 1
                    ),
                });
            }
        }
    }
}

impl<L: Link> ChainWalk<L> {
    /// A walk that starts at the beginning of the chain.
    pub fn new() -> Self {
        Self::starting_after(0, GENESIS)
    }

    /// A walk that starts after entry `seq` whose hash is `hash` (the end of an archive).
    pub fn starting_after(seq: i64, hash: ChainHash) -> Self {
        Self {
            first_seq: seq + 1,
            expected_seq: seq + 1,
            expected_prev: hash,
            pending: None,
            checkpoints: BTreeMap::new(),
            checked: 0,
            last: None,
            broken: None,
        }
    }

    /// Entry `seq` must have `hash`; a checkpoint past the end means the chain was
    /// truncated.
    pub fn expect(&mut self, seq: i64, hash: ChainHash) {
        self.checkpoints.insert(seq, hash);
    }

    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    pub fn push(&mut self, entry: L) {
        if self.broken.is_some() {
            return;
        }
        if let Some(current) = self.pending.take() {
            self.judge(&current, Some(&entry));
        }
        self.pending = Some(entry);
    }

    /// Ends the walk. `head` is the (seq, hash) the store says it last wrote, if known.
    pub fn finish(mut self, head: Option<(i64, ChainHash)>) -> WalkReport {
        if let Some(current) = self.pending.take() {
            self.judge(&current, None);
        }
        if self.broken.is_none() {
            let end = self.expected_seq - 1;
            if let Some((&seq, _)) = self.checkpoints.range(self.expected_seq..).next() {
                self.broken = Some(Break {
                    kind: BreakKind::Truncated,
                    seq: end + 1,
                    detail: format!(
                        "a checkpoint signed {one} {seq}, but the {chain} ends at {one} {end}",
                        one = L::NOUN,
                        chain = L::CHAIN
                    ),
                });
            } else if let Some((head_seq, head_hash)) = head {
                if head_seq > end {
                    self.broken = Some(Break {
                        kind: BreakKind::Truncated,
                        seq: end + 1,
                        detail: format!(
                            "the store recorded {one} {head_seq} as its last, but the {chain} ends at {one} {end}",
                            one = L::NOUN,
                            chain = L::CHAIN
                        ),
                    });
                } else if head_seq == end
                    && head_seq >= self.first_seq
                    && head_hash != self.expected_prev
                {
                    self.broken = Some(Break {
                        kind: BreakKind::Replaced,
                        seq: end,
                        detail: format!(
                            "{one} {end} does not have the hash the store recorded when it was written",
                            one = L::NOUN
                        ),
                    });
                }
            }
        }
        WalkReport {
            first_seq: self.first_seq,
            checked: self.checked,
            last: self.last,
            broken: self.broken,
        }
    }

    fn fail(&mut self, kind: BreakKind, seq: i64, detail: String) {
        self.broken = Some(Break { kind, seq, detail });
    }

    fn judge(&mut self, c: &L, next: Option<&L>) {
        let (one, many) = (L::NOUN, L::NOUNS);
        if self.broken.is_some() {
            return;
        }
        let expected = self.expected_seq;
        if c.seq() < expected {
            return self.fail(
                BreakKind::Reordered,
                c.seq(),
                format!("{one} {} comes after {one} {}", c.seq(), expected - 1),
            );
        }
        if c.seq() > expected {
            if next.is_some_and(|n| n.seq() == expected) {
                return self.fail(
                    BreakKind::Reordered,
                    expected,
                    format!("{one} {expected} comes after {one} {}", c.seq()),
                );
            }
            let detail = if c.seq() == expected + 1 {
                format!("{one} {expected} is missing")
            } else {
                format!("{many} {expected} to {} are missing", c.seq() - 1)
            };
            return self.fail(BreakKind::Removed, expected, detail);
        }
        let self_ok = c.hash_at(c.seq()) == *c.hash();
        let link_ok = *c.prev_hash() == self.expected_prev;
        if self_ok && link_ok {
            if let Some(signed) = self.checkpoints.get(&c.seq()) {
                if *signed != *c.hash() {
                    return self.fail(
                        BreakKind::Replaced,
                        c.seq(),
                        format!(
                            "{one} {} does not have the hash a checkpoint signed: the chain was rewritten",
                            c.seq()
                        ),
                    );
                }
            }
            self.expected_prev = *c.hash();
            self.expected_seq += 1;
            self.checked += 1;
            self.last = Some((c.seq(), *c.hash()));
            return;
        }
        let seq = c.seq();
        if let Some(n) = next {
            if *c.prev_hash() == *n.hash() && *n.prev_hash() == self.expected_prev {
                return self.fail(
                    BreakKind::Reordered,
                    seq,
                    format!("{many} {seq} and {} were swapped", n.seq()),
                );
            }
            if *n.prev_hash() == self.expected_prev {
                return self.fail(
                    BreakKind::Inserted,
                    seq,
                    format!(
                        "{one} {seq} was inserted: {one} {} links to the {one} before it",
                        n.seq()
                    ),
                );
            }
        }
        if !self_ok {
            if c.hash_at(seq + 1) == *c.hash() {
                return self.fail(
                    BreakKind::Removed,
                    seq,
                    format!("{one} {seq} was removed and the later {many} renumbered"),
                );
            }
            if c.hash_at(seq - 1) == *c.hash() {
                return self.fail(
                    BreakKind::Inserted,
                    seq - 1,
                    format!(
                        "{one} {} was inserted and the later {many} renumbered",
                        seq - 1
                    ),
                );
            }
            return self.fail(
                BreakKind::Altered,
                seq,
                format!("{one} {seq} no longer matches its hash: it was edited"),
            );
        }
        if seq > self.first_seq {
            self.fail(
                BreakKind::Altered,
                seq - 1,
                format!(
                    "{one} {} was rewritten with a recomputed hash: {one} {seq} no longer links to it",
                    seq - 1
                ),
            )
        } else {
            self.fail(
                BreakKind::Altered,
                seq,
                format!("{one} {seq} does not link to the end of the chain before it"),
            )
        }
    }
}

impl<L: Link> Default for ChainWalk<L> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Actor;

    fn entry(i: i64) -> AuditEntry {
        AuditEntry {
            time: from_millis(1_780_000_000_000 + i * 1000),
            actor: Actor {
                id: "token:abc".into(),
                name: "ops \"admin\"\n".into(),
                source_ip: Some("10.0.0.1".into()),
                user_agent: None,
                request_id: Some(format!("r-{i}")),
            },
            action: "key.revoked".into(),
            target: format!("key:{i}"),
            reason: if i % 2 == 0 {
                Some("leaked".into())
            } else {
                None
            },
            details: r#"{"state":{"before":"active","after":"revoked"},"a":1}"#.into(),
        }
    }

    fn chain(n: i64) -> Vec<SealedEntry> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|i| {
                let e = SealedEntry::seal(i, entry(i), prev);
                prev = e.hash;
                e
            })
            .collect()
    }

    fn walk(entries: Vec<SealedEntry>, head: Option<(i64, ChainHash)>) -> WalkReport {
        let mut w = ChainWalk::new();
        entries.into_iter().for_each(|e| w.push(e));
        w.finish(head)
    }

    fn broken(entries: Vec<SealedEntry>) -> (BreakKind, i64) {
        let b = walk(entries, None).broken.expect("a break");
        (b.kind, b.seq)
    }

    #[test]
    fn canonical_form_is_sorted_compact_and_escaped() {
        let c = canonical(7, &entry(2));
        assert_eq!(
            c,
            r#"{"action":"key.revoked","actor":"token:abc","actor_name":"ops \"admin\"\n","details":{"a":1,"state":{"after":"revoked","before":"active"}},"reason":"leaked","request_id":"r-2","seq":7,"source_ip":"10.0.0.1","target":"key:2","time":"2026-05-28T20:26:42.000Z","user_agent":null}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&c).expect("canonical is JSON");
        assert_eq!(parsed["seq"], 7);
    }

    #[test]
    fn an_intact_chain_walks_clean() {
        let c = chain(20);
        let head = (20, c[19].hash);
        let r = walk(c, Some(head));
        assert_eq!(r.broken, None);
        assert_eq!(r.checked, 20);
        assert_eq!(r.last.map(|l| l.0), Some(20));
    }

    #[test]
    fn an_edited_field_names_its_entry() {
        let mut c = chain(10);
        c[4].entry.reason = Some("nothing to see".into());
        assert_eq!(broken(c), (BreakKind::Altered, 5));
    }

    #[test]
    fn an_edit_with_a_recomputed_hash_names_the_edited_entry() {
        let mut c = chain(10);
        c[4].entry.actor.id = "token:other".into();
        c[4].hash = chain_hash(&c[4].prev_hash, 5, &c[4].entry);
        assert_eq!(broken(c), (BreakKind::Altered, 5));
    }

    #[test]
    fn a_removed_entry_is_named() {
        let mut c = chain(10);
        c.remove(3);
        assert_eq!(broken(c), (BreakKind::Removed, 4));
    }

    #[test]
    fn a_removed_entry_with_renumbering_is_named() {
        let mut c = chain(10);
        c.remove(3);
        c.iter_mut().skip(3).for_each(|e| e.seq -= 1);
        assert_eq!(broken(c), (BreakKind::Removed, 4));
    }

    #[test]
    fn an_inserted_entry_is_named_with_or_without_a_valid_hash() {
        let mut c = chain(10);
        let forged = SealedEntry {
            seq: 4,
            entry: entry(99),
            prev_hash: GENESIS,
            hash: GENESIS,
        };
        c.insert(3, forged);
        c.iter_mut().skip(4).for_each(|e| e.seq += 1);
        assert_eq!(broken(c), (BreakKind::Inserted, 4));

        let mut c = chain(10);
        let forged = SealedEntry::seal(4, entry(99), c[2].hash);
        c.insert(3, forged);
        c.iter_mut().skip(4).for_each(|e| e.seq += 1);
        assert_eq!(broken(c), (BreakKind::Inserted, 4));
    }

    #[test]
    fn swapped_entries_are_named() {
        let mut c = chain(10);
        // The rows keep their seq; everything else moves.
        let (a, b) = (c[5].clone(), c[6].clone());
        c[5] = SealedEntry { seq: 6, ..b };
        c[6] = SealedEntry { seq: 7, ..a };
        assert_eq!(broken(c), (BreakKind::Reordered, 6));
    }

    #[test]
    fn entries_out_of_order_are_named() {
        let mut c = chain(10);
        c.swap(5, 6);
        assert_eq!(broken(c), (BreakKind::Reordered, 6));
    }

    #[test]
    fn truncation_is_found_by_the_head_or_a_checkpoint() {
        let c = chain(10);
        let head = (10, c[9].hash);
        let cut: Vec<_> = c.iter().take(7).cloned().collect();
        let b = walk(cut.clone(), Some(head)).broken.expect("a break");
        assert_eq!((b.kind, b.seq), (BreakKind::Truncated, 8));

        let mut w = ChainWalk::new();
        w.expect(9, c[8].hash);
        cut.into_iter().for_each(|e| w.push(e));
        let b = w.finish(None).broken.expect("a break");
        assert_eq!((b.kind, b.seq), (BreakKind::Truncated, 8));
    }

    #[test]
    fn a_replaced_chain_is_found_by_a_checkpoint() {
        let original = chain(10);
        let mut prev = GENESIS;
        let forged: Vec<_> = (1..=10)
            .map(|i| {
                let mut e = entry(i);
                e.actor.id = "token:forger".into();
                let s = SealedEntry::seal(i, e, prev);
                prev = s.hash;
                s
            })
            .collect();
        assert_eq!(walk(forged.clone(), None).broken, None);
        let mut w = ChainWalk::new();
        w.expect(6, original[5].hash);
        forged.into_iter().for_each(|e| w.push(e));
        let b = w.finish(None).broken.expect("a break");
        assert_eq!((b.kind, b.seq), (BreakKind::Replaced, 6));
    }

    #[test]
    fn a_walk_continues_from_an_archive_end() {
        let c = chain(10);
        let mut w = ChainWalk::starting_after(4, c[3].hash);
        c.iter().skip(4).cloned().for_each(|e| w.push(e));
        let r = w.finish(Some((10, c[9].hash)));
        assert_eq!(r.broken, None);
        assert_eq!(r.checked, 6);

        let mut w = ChainWalk::starting_after(4, GENESIS);
        c.iter().skip(4).cloned().for_each(|e| w.push(e));
        assert_eq!(w.finish(None).broken.map(|b| b.seq), Some(5));
    }

    #[test]
    fn checkpoints_sign_and_verify() {
        let signer = CheckpointSigner::generate(&mut rand::rngs::OsRng);
        let c = chain(3);
        let cp = signer.sign(3, &c[2].hash, from_millis(1_780_000_000_000));
        assert_eq!(cp.verify(), Ok(c[2].hash));
        let reloaded = CheckpointSigner::from_seed_hex(&signer.seed_hex()).expect("seed");
        assert_eq!(reloaded.public_key(), signer.public_key());

        let mut forged = cp.clone();
        forged.seq = 2;
        assert_eq!(forged.verify(), Err(CheckpointError::BadSignature));
        let mut forged = cp.clone();
        forged.hash = to_hex(&c[1].hash);
        assert_eq!(forged.verify(), Err(CheckpointError::BadSignature));
        let other = CheckpointSigner::generate(&mut rand::rngs::OsRng);
        let mut forged = cp;
        forged.public_key = other.public_key();
        assert_eq!(forged.verify(), Err(CheckpointError::BadSignature));
    }
}
