//! The fold rule: how usage events become a key's stats (`uses`, `last_used_at`,
//! `last_used_from`, subjects), written once here for both backends and mirrored in SQL by
//! [`newest_use_wins_sql!`].
//!
//! PostgreSQL folds each batch into the stats as it writes it ([`Pending::of_batch`]; its
//! rollups are held a few seconds, see `postgres::held`). SQLite keeps the
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
    /// Every event of the key (valid or not), by hour: what the rollups gain.
    pub rollup: Rollup,
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
    /// Events that named no key, rolled up under no key. They have no `last_seq` to
    /// say which are folded, so they go with `folded_seq`: when a fold starts, what is
    /// here then (exactly the keyless events up to `fold_upto`) moves to
    /// `keyless_folding`, and the fold's last step writes it in the transaction that
    /// moves `folded_seq` to `fold_upto`.
    pub keyless: Rollup,
    pub keyless_folding: Rollup,
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
    pub code: VerifyCode,
    pub scope: Option<&'a str>,
    pub user_agent: Option<&'a str>,
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
            code: e.code,
            scope: e.scope.as_deref(),
            user_agent: e.user_agent.as_deref(),
        }
    }
}

/// An hour in unix ms: the rollups' unit.
pub const HOUR_MS: i64 = 3_600_000;

/// The start of the hour (UTC) that `ms` falls in.
pub fn hour_of(ms: i64) -> i64 {
    ms - ms.rem_euclid(HOUR_MS)
}

/// A source network as rollups keep it: the /24 of an IPv4 address, the /64 of an IPv6
/// one (an IPv4-mapped IPv6 address counts as the IPv4 address). Finer than that, one
/// client's addresses spread over many rows; coarser, unrelated clients merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Network {
    V4(u32),
    V6(u64),
}

impl Network {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(u32::from(v4) & 0xffff_ff00),
            IpAddr::V6(v6) => Self::V6(u64::try_from(u128::from(v6) >> 64).unwrap_or(0)),
        }
    }

    /// The stored text: sortable, so that the networks inside a CIDR are one range.
    pub fn stored(self) -> String {
        match self {
            Self::V4(n) => format!("4{n:08x}"),
            Self::V6(n) => format!("6{n:016x}"),
        }
    }

    pub fn from_stored(s: &str) -> Option<Self> {
        match (s.get(..1), s.get(1..)) {
            (Some("4"), Some(hex)) if hex.len() == 8 => {
                u32::from_str_radix(hex, 16).ok().map(Self::V4)
            }
            (Some("6"), Some(hex)) if hex.len() == 16 => {
                u64::from_str_radix(hex, 16).ok().map(Self::V6)
            }
            _ => None,
        }
    }

    /// The network as people write it: `10.2.3.0/24`, `2001:db8:0:1::/64`.
    pub fn cidr(self) -> String {
        match self {
            Self::V4(n) => format!("{}/24", std::net::Ipv4Addr::from(n)),
            Self::V6(n) => format!("{}/64", std::net::Ipv6Addr::from(u128::from(n) << 64)),
        }
    }

    /// The stored values of the rollup networks inside `net`, as an inclusive range; `None`
    /// when `net` is narrower than a rollup network (/24, /64), which rollups cannot tell.
    pub fn stored_range(net: ipnet::IpNet) -> Option<(String, String)> {
        match net.trunc() {
            ipnet::IpNet::V4(v4) if v4.prefix_len() <= 24 => Some((
                Self::V4(u32::from(v4.network())).stored(),
                Self::V4(u32::from(v4.broadcast()) & 0xffff_ff00).stored(),
            )),
            ipnet::IpNet::V6(v6) if v6.prefix_len() <= 64 => {
                let hi = |a: std::net::Ipv6Addr| u64::try_from(u128::from(a) >> 64).unwrap_or(0);
                Some((
                    Self::V6(hi(v6.network())).stored(),
                    Self::V6(hi(v6.broadcast())).stored(),
                ))
            }
            _ => None,
        }
    }
}

/// What the rollups keep of a value an event carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ValueKind {
    Network,
    Scope,
    Subject,
    Agent,
}

impl ValueKind {
    pub const ALL: [Self; 4] = [Self::Network, Self::Scope, Self::Subject, Self::Agent];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Scope => "scope",
            Self::Subject => "subject",
            Self::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Sightings of one value: how many events, the first and the last (unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen {
    pub events: i64,
    pub first: i64,
    pub last: i64,
}

impl Seen {
    fn new(at: i64) -> Self {
        Self {
            events: 1,
            first: at,
            last: at,
        }
    }

    fn add(&mut self, at: i64) {
        self.events += 1;
        self.first = self.first.min(at);
        self.last = self.last.max(at);
    }
}

/// One hour of one key's events as rollups count them.
#[derive(Debug, Clone, Default)]
pub(crate) struct HourRollup {
    /// Events by verify code; a key sees few codes in an hour.
    pub codes: Vec<(VerifyCode, i64)>,
    /// By code, since a network's events may be allowed and denied alike.
    pub networks: HashMap<(Network, VerifyCode), Seen>,
    /// Scope, subject and user agent by [`value_key`] (kind, code and the text as the
    /// client sent it in one string), so a value already seen is found without
    /// allocating.
    pub values: HashMap<String, Seen>,
}

/// The key of [`HourRollup::values`]: the kind's letter, the code's index in
/// `VerifyCode::ALL` as two digits, then the value.
fn value_key(out: &mut String, kind: ValueKind, code: VerifyCode, value: &str) {
    out.clear();
    out.push(match kind {
        ValueKind::Network => 'n',
        ValueKind::Scope => 's',
        ValueKind::Subject => 'u',
        ValueKind::Agent => 'a',
    });
    let idx = VerifyCode::ALL.iter().position(|c| *c == code).unwrap_or(0);
    out.push(char::from(b'0' + u8::try_from(idx / 10).unwrap_or(0)));
    out.push(char::from(b'0' + u8::try_from(idx % 10).unwrap_or(0)));
    out.push_str(value);
}

fn split_value_key(key: &str) -> Option<(ValueKind, VerifyCode, &str)> {
    let kind = match key.get(..1)? {
        "n" => ValueKind::Network,
        "s" => ValueKind::Scope,
        "u" => ValueKind::Subject,
        "a" => ValueKind::Agent,
        _ => return None,
    };
    let idx: usize = key.get(1..3)?.parse().ok()?;
    Some((kind, *VerifyCode::ALL.get(idx)?, key.get(3..)?))
}

/// A key's (or the keyless) events by hour, not yet written to the rollup tables.
#[derive(Debug, Clone, Default)]
pub(crate) struct Rollup {
    pub hours: HashMap<i64, HourRollup>,
    /// Reused for [`value_key`]s.
    scratch: String,
}

impl Rollup {
    pub fn is_empty(&self) -> bool {
        self.hours.is_empty()
    }

    /// Counts one event. Events that named no key keep only their code and network:
    /// what a client sends along with junk is junk too, and would fill the tables.
    pub fn add(&mut self, e: &LoggedEvent<'_>) {
        let h = self.hours.entry(hour_of(e.time)).or_default();
        match h.codes.iter_mut().find(|(c, _)| *c == e.code) {
            Some((_, n)) => *n += 1,
            None => h.codes.push((e.code, 1)),
        }
        if let Some(ip) = e.source_ip {
            h.networks
                .entry((Network::of(ip), e.code))
                .and_modify(|s| s.add(e.time))
                .or_insert_with(|| Seen::new(e.time));
        }
        if e.key_id.is_none() {
            return;
        }
        for (kind, value) in [
            (ValueKind::Scope, e.scope),
            (ValueKind::Subject, e.subject),
            (ValueKind::Agent, e.user_agent),
        ] {
            let Some(value) = value else { continue };
            value_key(&mut self.scratch, kind, e.code, value);
            match h.values.get_mut(self.scratch.as_str()) {
                Some(seen) => seen.add(e.time),
                None => {
                    h.values.insert(self.scratch.clone(), Seen::new(e.time));
                }
            }
        }
    }

    /// Adds another rollup's counts to this one.
    pub fn merge(&mut self, other: Rollup) {
        for (hour, o) in other.hours {
            let h = self.hours.entry(hour).or_default();
            for (code, n) in o.codes {
                match h.codes.iter_mut().find(|(c, _)| *c == code) {
                    Some((_, m)) => *m += n,
                    None => h.codes.push((code, n)),
                }
            }
            for (k, s) in o.networks {
                merge_seen(h.networks.entry(k).or_insert(Seen { events: 0, ..s }), s);
            }
            for (k, s) in o.values {
                merge_seen(h.values.entry(k).or_insert(Seen { events: 0, ..s }), s);
            }
        }
    }

    /// The rows this rollup adds, in one order whatever the maps': codes as (hour, code,
    /// events), values as (hour, kind, value, code, seen). Concurrent writers of shared
    /// rows (PostgreSQL nodes) lock them in this order.
    pub fn rows(&self) -> RollupRows {
        let mut out = RollupRows::default();
        for (hour, h) in &self.hours {
            for (code, n) in &h.codes {
                out.codes.push((*hour, code.as_str(), *n));
            }
            for ((net, code), s) in &h.networks {
                out.values
                    .push((*hour, ValueKind::Network, net.stored(), code.as_str(), *s));
            }
            for (k, s) in &h.values {
                if let Some((kind, code, v)) = split_value_key(k) {
                    out.values
                        .push((*hour, kind, v.to_owned(), code.as_str(), *s));
                }
            }
        }
        out.sort();
        out
    }
}

impl PartialEq for Rollup {
    fn eq(&self, other: &Self) -> bool {
        self.rows() == other.rows()
    }
}

impl Eq for Rollup {}

fn merge_seen(into: &mut Seen, s: Seen) {
    into.events += s.events;
    into.first = into.first.min(s.first);
    into.last = into.last.max(s.last);
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct RollupRows {
    pub codes: Vec<(i64, &'static str, i64)>,
    pub values: Vec<(i64, ValueKind, String, &'static str, Seen)>,
}

impl RollupRows {
    pub fn sort(&mut self) {
        self.codes
            .sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        self.values
            .sort_unstable_by(|a, b| (a.0, a.1, &a.2, a.3).cmp(&(b.0, b.1, &b.2, b.3)));
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

    /// Nothing to fold: no key's events, and no keyless ones.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.keyless.is_empty()
    }

    /// The key's newest event, if it is pending.
    pub fn head(&self, key_id: &KeyId) -> Option<i64> {
        self.keys.get(key_id).map(|d| d.head)
    }

    /// Adds one logged event; events must come in `seq` order.
    pub fn add(&mut self, e: &LoggedEvent<'_>) {
        self.max_seq = self.max_seq.max(e.seq);
        let Some(id) = e.key_id else {
            self.keyless.add(e);
            return;
        };
        let d = self.keys.entry(id.clone()).or_default();
        d.head = d.head.max(e.seq);
        d.rollup.add(e);
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
            code: if valid {
                VerifyCode::Valid
            } else {
                VerifyCode::ScopeDenied
            },
            scope: Some("deploy:write"),
            user_agent: None,
        }
    }

    #[test]
    fn rollups_count_every_event_by_hour_code_and_value() {
        let mut p = Pending::default();
        p.add(&ev(1, 10, true, Some("10.0.0.1")));
        p.add(&ev(2, 20, true, Some("10.0.0.200")));
        p.add(&ev(3, HOUR_MS + 5, false, Some("2001:db8::1")));
        let mut junk = ev(4, 30, false, Some("192.0.2.9"));
        junk.key_id = None;
        junk.code = VerifyCode::Malformed;
        p.add(&junk);
        let rows = p.keys[key()].rollup.rows();
        assert_eq!(
            rows.codes,
            vec![(0, "VALID", 2), (HOUR_MS, "SCOPE_DENIED", 1)]
        );
        let nets: Vec<(i64, String, i64)> = rows
            .values
            .iter()
            .filter(|v| v.1 == ValueKind::Network)
            .map(|v| {
                (
                    v.0,
                    Network::from_stored(&v.2).expect("stored").cidr(),
                    v.4.events,
                )
            })
            .collect();
        assert_eq!(
            nets,
            vec![
                (0, "10.0.0.0/24".to_owned(), 2),
                (HOUR_MS, "2001:db8::/64".to_owned(), 1)
            ]
        );
        let keyless = p.keyless.rows();
        assert_eq!(keyless.codes, vec![(0, "MALFORMED", 1)]);
        assert_eq!(
            keyless.values.len(),
            1,
            "only the network of a keyless event"
        );
    }

    #[test]
    fn networks_sort_as_their_addresses_and_cidrs_are_ranges() {
        let net = |s: &str| Network::of(s.parse().expect("an address"));
        assert_eq!(net("::ffff:10.1.2.3"), net("10.1.2.77"));
        let (lo, hi) = Network::stored_range("10.2.0.0/16".parse().expect("cidr")).expect("range");
        for (ip, inside) in [
            ("10.2.0.1", true),
            ("10.2.255.9", true),
            ("10.3.0.1", false),
            ("10.1.255.255", false),
        ] {
            let s = net(ip).stored();
            assert_eq!(s >= lo && s <= hi, inside, "{ip}");
        }
        assert!(Network::stored_range("10.2.3.0/25".parse().expect("cidr")).is_none());
        assert!(Network::stored_range("2001:db8::/48".parse().expect("cidr")).is_some());
        assert!(Network::stored_range("2001:db8::/65".parse().expect("cidr")).is_none());
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
