//! The fold rule: how usage events become a key's stats (`uses`, `last_used_at`,
//! `last_used_from`, subjects), written once here for both backends and mirrored in SQL by
//! [`newest_use_wins_sql!`].
//!
//! PostgreSQL folds each batch as it writes it ([`Pending::of_batch`]). SQLite keeps the
//! events not yet folded into `key_usage` and `key_subjects` in a [`Pending`] overlay:
//! folding every event as it comes costs several random b-tree writes per event, more
//! than the rest of a verify; folding a few seconds of events at once, in key order, costs
//! one write per key and page. Until then readers add the overlay to what the tables hold
//! (through [`StatsView`]), so reads stay as fresh as the log.

use std::collections::HashMap;
use std::net::IpAddr;

use keywarden_core::clock::{from_millis, to_millis};
use keywarden_core::model::{KeyRecord, Subject, UsageEvent};
use keywarden_core::verify::VerifyCode;
use keywarden_core::KeyId;

/// One key's events since the last fold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyDelta {
    /// Valid uses not already counted against a cap at verify time.
    pub uses: i64,
    pub last_at: Option<i64>,
    pub last_from: Option<IpAddr>,
    /// The key's newest event (head of its chain in the log).
    pub head: i64,
    /// (subject, first seen, last seen), unix ms; a key enrolls few subjects.
    pub subjects: Vec<(String, i64, i64)>,
}

#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// Keyed by inline ids: a lookup compares in the table, not through a pointer to a
    /// cold string, which at 100k keys was a cache miss per event.
    pub keys: HashMap<KeyId, KeyDelta>,
    /// Every event up to this seq is reflected in the tables or here.
    pub max_seq: i64,
    /// Heads of keys already folded: saves the append a read of `key_usage.last_seq`.
    /// A cache, cleared when it grows past [`HEADS_CACHED`].
    pub folded_heads: HashMap<KeyId, i64>,
    /// The fold in progress, folded a chunk at a time between appends: the keys still to
    /// fold (in reverse key order, taken from the end), and the `max_seq` it started at.
    pub fold_queue: Vec<KeyId>,
    pub fold_upto: i64,
    /// The chunk a fold step is writing right now, out of `keys`: its deltas are in the
    /// tables once the step commits, and here until the step ends. Only point reads
    /// (which do not wait for folds) ever see it non-empty.
    pub in_flight: HashMap<KeyId, std::sync::Arc<KeyDelta>>,
    /// Fold steps that have ended; a point read that saw this move while it read the
    /// tables reads again.
    pub folds: u64,
}

pub(crate) const HEADS_CACHED: usize = 1_000_000;

/// The event's fields that stats are made of, as stored in the log.
pub(crate) struct LoggedEvent<'a> {
    pub seq: i64,
    pub key_id: Option<&'a KeyId>,
    pub time: i64,
    pub valid: bool,
    pub counted: bool,
    pub source_ip: Option<IpAddr>,
    pub subject: Option<&'a str>,
}

impl<'a> LoggedEvent<'a> {
    pub fn of(seq: i64, e: &'a UsageEvent) -> Self {
        Self {
            seq,
            key_id: e.key_id.as_ref(),
            time: to_millis(e.time),
            valid: e.code == VerifyCode::Valid,
            counted: e.counted,
            source_ip: e.source_ip,
            subject: e.subject.as_deref(),
        }
    }
}

impl Pending {
    /// One batch's events folded by themselves.
    pub fn of_batch(events: &[UsageEvent]) -> Self {
        let mut folded = Self::default();
        for e in events {
            folded.add(&LoggedEvent::of(0, e));
        }
        folded
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key's newest event, if it is pending.
    pub fn head(&self, key_id: &KeyId) -> Option<i64> {
        self.keys.get(key_id).map(|d| d.head)
    }

    /// Adds one logged event; events must come in `seq` order.
    pub fn add(&mut self, e: &LoggedEvent<'_>) {
        self.max_seq = self.max_seq.max(e.seq);
        let Some(id) = e.key_id else { return };
        let d = self.keys.entry(id.clone()).or_default();
        d.head = d.head.max(e.seq);
        if !e.valid {
            return;
        }
        if !e.counted {
            d.uses += 1;
        }
        if newest_use_wins(d.last_at, e.time) {
            d.last_at = Some(e.time);
            d.last_from = e.source_ip;
        }
        if let Some(s) = e.subject {
            match d.subjects.iter_mut().find(|(known, _, _)| known == s) {
                Some(seen) => {
                    seen.1 = seen.1.min(e.time);
                    seen.2 = seen.2.max(e.time);
                }
                None => d.subjects.push((s.to_owned(), e.time, e.time)),
            }
        }
    }

    /// `key` as stored, plus what is pending for it. For readers that hold off folds.
    pub fn apply_to(&self, key: &mut KeyRecord) {
        if let Some(d) = self.keys.get(&key.id) {
            apply(d, key);
        }
    }

    /// `key` as read from the tables, whose stats include its events up to
    /// `folded_upto` (`key_usage.last_seq`), plus what is not in them: the chunk being
    /// folded, unless the read already saw it committed, then what is pending. The
    /// caller checked that no fold step ended while it read.
    pub fn apply_unfolded(&self, key: &mut KeyRecord, folded_upto: Option<i64>) {
        if let Some(d) = self.in_flight.get(&key.id) {
            if folded_upto.is_none_or(|upto| d.head > upto) {
                apply(d, key);
            }
        }
        if let Some(d) = self.keys.get(&key.id) {
            apply(d, key);
        }
    }

    /// `stored` subjects of `key_id`, plus pending sightings, in first-seen order.
    pub fn merge_subjects(&self, key_id: &KeyId, mut stored: Vec<Subject>) -> Vec<Subject> {
        let pending = self.keys.get(key_id).map_or(&[][..], |d| &d.subjects[..]);
        for (subject, first, last) in pending {
            let (first, last) = (from_millis(*first), from_millis(*last));
            match stored.iter_mut().find(|s| &s.subject == subject) {
                Some(s) => {
                    s.first_seen = s.first_seen.min(first);
                    s.last_seen = s.last_seen.max(last);
                }
                None => stored.push(Subject {
                    subject: subject.clone(),
                    first_seen: first,
                    last_seen: last,
                }),
            }
        }
        stored.sort_by(|a, b| (a.first_seen, &a.subject).cmp(&(b.first_seen, &b.subject)));
        stored
    }
}

/// Adds one key's delta to its record, by the fold's rules.
fn apply(d: &KeyDelta, key: &mut KeyRecord) {
    key.uses += u64::try_from(d.uses).unwrap_or(0);
    if let Some(at) = d.last_at {
        if newest_use_wins(key.last_used_at.map(to_millis), at) {
            key.last_used_at = Some(from_millis(at));
            key.last_used_from = d.last_from.map(|ip| ip.to_string());
        }
    }
}

/// The fold rule for the last use: a use replaces the one recorded when it is at least as
/// recent (ties go to the later event), and `last_used_at` and `last_used_from` always
/// describe that same use, so a newest use without an address clears the address.
pub(crate) fn newest_use_wins(recorded_at: Option<i64>, at: i64) -> bool {
    recorded_at.is_none_or(|recorded| at >= recorded)
}

/// [`newest_use_wins`] in SQL, for the upserts that fold stats into `key_usage`: true when
/// the use at `$at` (NULL: no use) replaces the one recorded at `$recorded`.
macro_rules! newest_use_wins_sql {
    ($recorded:literal, $at:literal) => {
        concat!(
            "(",
            $at,
            " IS NOT NULL AND (",
            $recorded,
            " IS NULL OR ",
            $at,
            " >= ",
            $recorded,
            "))"
        )
    };
}
pub(crate) use newest_use_wins_sql;

/// The SET clauses that fold a use at `$at` from `$from` into the last use recorded in
/// `$recorded_at` and `$recorded_from`, by [`newest_use_wins`].
macro_rules! fold_last_use_sql {
    ($recorded_at:literal, $recorded_from:literal, $at:literal, $from:literal) => {
        concat!(
            "last_used_from = CASE WHEN ",
            $crate::fold::newest_use_wins_sql!($recorded_at, $at),
            " THEN ",
            $from,
            " ELSE ",
            $recorded_from,
            " END, last_used_at = CASE WHEN ",
            $crate::fold::newest_use_wins_sql!($recorded_at, $at),
            " THEN ",
            $at,
            " ELSE ",
            $recorded_at,
            " END"
        )
    };
}
pub(crate) use fold_last_use_sql;

/// Usage stats as readers see them: the tables, plus on SQLite the overlay of what is
/// not folded into them yet. Holding a view keeps folds out, so the two agree; it is the
/// only way for such readers to reach the overlay.
pub(crate) enum StatsView<'a> {
    /// PostgreSQL: every batch is folded as it is written.
    Folded,
    Overlay(crate::sqlite::StableStats<'a>),
}

impl StatsView<'_> {
    /// Adds what is not folded yet to keys read from the tables.
    pub fn apply(&self, keys: &mut [KeyRecord]) -> crate::Result<()> {
        match self {
            Self::Folded => Ok(()),
            Self::Overlay(s) => s.with_pending(|p| keys.iter_mut().for_each(|k| p.apply_to(k))),
        }
    }

    pub fn merge_subjects(
        &self,
        key_id: &KeyId,
        stored: Vec<Subject>,
    ) -> crate::Result<Vec<Subject>> {
        match self {
            Self::Folded => Ok(stored),
            Self::Overlay(s) => s.with_pending(|p| p.merge_subjects(key_id, stored)),
        }
    }

    /// The key's newest event if it is not folded yet.
    pub fn pending_head(&self, key_id: &KeyId) -> crate::Result<Option<i64>> {
        match self {
            Self::Folded => Ok(None),
            Self::Overlay(s) => s.with_pending(|p| p.head(key_id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> &'static KeyId {
        static KEY: std::sync::OnceLock<KeyId> = std::sync::OnceLock::new();
        KEY.get_or_init(|| KeyId::parse("k000000000000001").expect("a valid id"))
    }

    fn ev(seq: i64, time: i64, valid: bool, from: Option<&'static str>) -> LoggedEvent<'static> {
        LoggedEvent {
            seq,
            key_id: Some(key()),
            time,
            valid,
            counted: false,
            source_ip: from.map(|ip| ip.parse().expect("an address")),
            subject: Some("host-a"),
        }
    }

    #[test]
    fn denied_events_move_the_head_but_not_the_stats() {
        let mut p = Pending::default();
        p.add(&ev(1, 10, true, Some("10.0.0.1")));
        p.add(&ev(2, 20, false, Some("10.0.0.2")));
        let d = &p.keys[key()];
        assert_eq!((d.uses, d.last_at, d.head), (1, Some(10), 2));
        assert_eq!(
            d.last_from.map(|ip| ip.to_string()).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(d.subjects, vec![("host-a".to_owned(), 10, 10)]);
        assert_eq!(p.max_seq, 2);
    }

    #[test]
    fn counted_uses_are_not_counted_twice() {
        let mut p = Pending::default();
        let mut e = ev(1, 10, true, None);
        e.counted = true;
        p.add(&e);
        assert_eq!(p.keys[key()].uses, 0);
        assert_eq!(p.keys[key()].last_at, Some(10));
    }
}
