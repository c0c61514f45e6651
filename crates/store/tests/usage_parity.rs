//! Usage stats must not depend on the backend, on how events were cut into batches, or on
//! when SQLite folded its log: the same events give every key the same `uses`,
//! `last_used_*` and subjects, and the same history, on SQLite (before and after a fold)
//! and on PostgreSQL, and both agree with a reference model written here.
//!
//! The model's rules:
//! - `uses` counts valid uses not already counted against a cap at verify time (this
//!   test spends no cap, so counted uses add nothing anywhere);
//! - `last_used_at` and `last_used_from` describe one event, the newest valid use (ties go
//!   to the event written later): when that use carried no address, `last_used_from` is
//!   empty rather than an older use's address;
//! - a subject's `first_seen` and `last_seen` are its earliest and latest valid use, in
//!   event time, whatever order the events arrived in.
//!
//! Times repeat and go backwards on purpose: several nodes, or one node's retried
//! batches, deliver events out of time order.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fmt::{self, Write as _};
use std::ops::Range;

use keywarden_core::clock::to_millis;
use keywarden_core::hashing::KeyHash;
use keywarden_core::model::{Actor, AuditEntry, KeyRecord, KeyState, UsageEvent};
use keywarden_core::{KeyId, VerifyCode};
use keywarden_store::{KeyFilter, Store};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use time::macros::datetime;
use time::OffsetDateTime;

const START: OffsetDateTime = datetime!(2026-06-01 12:00 UTC);
const KEYS: usize = 3;
const ADDRS: [&str; 3] = ["192.0.2.1", "198.51.100.7", "2001:db8::5"];
const SUBJECTS: [&str; 3] = ["host-a", "host-b", "runner-1"];
const DENIED: [VerifyCode; 4] = [
    VerifyCode::ScopeDenied,
    VerifyCode::SourceDenied,
    VerifyCode::Revoked,
    VerifyCode::UsageExhausted,
];

/// What happens after an event is queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// The next event joins the same batch.
    Next,
    /// The batch is written.
    Write,
    /// The batch is written, then SQLite folds all of its log.
    WriteFold,
    /// The batch is written, then SQLite folds one key, leaving a fold in progress that
    /// later batches are appended behind.
    WriteFoldOneKey,
}

#[derive(Clone)]
struct Ev {
    /// `None`: a verify of a malformed key, which names no key.
    key: Option<usize>,
    /// Seconds after [`START`].
    at: i64,
    code: VerifyCode,
    counted: bool,
    from: Option<usize>,
    subject: Option<usize>,
    then: After,
}

impl fmt::Debug for Ev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.key {
            Some(k) => write!(f, "key {k}")?,
            None => f.write_str("no key")?,
        }
        write!(f, " +{}s {}", self.at, self.code)?;
        if self.counted {
            f.write_str(" counted")?;
        }
        match self.from {
            Some(a) => write!(f, " from {}", ADDRS[a])?,
            None => f.write_str(" from nowhere")?,
        }
        if let Some(s) = self.subject {
            write!(f, " as {}", SUBJECTS[s])?;
        }
        f.write_str(match self.then {
            After::Next => "",
            After::Write => " | write",
            After::WriteFold => " | write, fold",
            After::WriteFoldOneKey => " | write, fold one key",
        })
    }
}

impl Ev {
    fn usage(&self, ids: &[KeyId]) -> UsageEvent {
        UsageEvent {
            key_id: self.key.map(|k| ids[k].clone()),
            time: START + time::Duration::seconds(self.at),
            code: self.code,
            source_ip: self.from.map(|a| ADDRS[a].parse().unwrap()),
            scope: None,
            environment: None,
            subject: self.subject.map(|s| SUBJECTS[s].to_owned()),
            user_agent: None,
            counted: self.counted,
        }
    }

    fn millis(&self) -> i64 {
        to_millis(START) + self.at * 1000
    }
}

fn event() -> impl Strategy<Value = Ev> {
    (
        prop_oneof![6 => (0..KEYS).prop_map(Some), 1 => Just(None)],
        0i64..5,
        prop_oneof![3 => Just(VerifyCode::Valid), 1 => select(DENIED.to_vec())],
        any::<bool>(),
        option::of(0..ADDRS.len()),
        option::of(0..SUBJECTS.len()),
        prop_oneof![
            4 => Just(After::Next),
            2 => Just(After::Write),
            1 => Just(After::WriteFold),
            1 => Just(After::WriteFoldOneKey),
        ],
    )
        .prop_map(|(key, at, code, counted, from, subject, then)| Ev {
            key,
            at,
            code: if key.is_some() {
                code
            } else {
                VerifyCode::Malformed
            },
            counted,
            from,
            subject,
            then,
        })
}

/// The batches: each ends with an event that is not [`After::Next`], or with the last.
fn batches(events: &[Ev]) -> Vec<(Range<usize>, After)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, e) in events.iter().enumerate() {
        let last = i + 1 == events.len();
        if e.then != After::Next || last {
            let then = if e.then == After::Next {
                After::Write
            } else {
                e.then
            };
            out.push((start..i + 1, then));
            start = i + 1;
        }
    }
    out
}

/// A key's usage stats as read back, times in unix ms.
#[derive(Clone, Default, PartialEq, Eq)]
struct Stats {
    uses: u64,
    last_used_at: Option<i64>,
    last_used_from: Option<String>,
    /// In the store's order: first seen, then name.
    subjects: Vec<(String, i64, i64)>,
}

fn offset(ms: i64) -> String {
    let d = ms - to_millis(START);
    if d % 1000 == 0 {
        format!("+{}s", d / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uses {}, last used ", self.uses)?;
        match self.last_used_at {
            Some(at) => write!(f, "{}", offset(at))?,
            None => f.write_str("never")?,
        }
        write!(
            f,
            " from {}, subjects [",
            self.last_used_from.as_deref().unwrap_or("nowhere")
        )?;
        for (i, (s, first, last)) in self.subjects.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{s} {}..{}", offset(*first), offset(*last))?;
        }
        f.write_str("]")
    }
}

/// One event of a key's history as read back.
#[derive(Clone, PartialEq, Eq)]
struct Logged {
    at: i64,
    code: VerifyCode,
    from: Option<String>,
    subject: Option<String>,
    counted: bool,
}

impl fmt::Debug for Logged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}{} from {} as {}",
            offset(self.at),
            self.code,
            if self.counted { " counted" } else { "" },
            self.from.as_deref().unwrap_or("nowhere"),
            self.subject.as_deref().unwrap_or("-"),
        )
    }
}

/// The reference: what every key's stats and history must be after `events`.
fn model(events: &[Ev]) -> Vec<(Stats, Vec<Logged>)> {
    let mut keys = vec![(Stats::default(), Vec::new()); KEYS];
    for e in events {
        let Some(k) = e.key else { continue };
        let (stats, history) = &mut keys[k];
        history.push(Logged {
            at: e.millis(),
            code: e.code,
            from: e.from.map(|a| ADDRS[a].to_owned()),
            subject: e.subject.map(|s| SUBJECTS[s].to_owned()),
            counted: e.counted,
        });
        if e.code != VerifyCode::Valid {
            continue;
        }
        if !e.counted {
            stats.uses += 1;
        }
        let at = e.millis();
        if stats.last_used_at.is_none_or(|last| at >= last) {
            stats.last_used_at = Some(at);
            stats.last_used_from = e.from.map(|a| ADDRS[a].to_owned());
        }
        if let Some(s) = e.subject {
            let name = SUBJECTS[s];
            match stats.subjects.iter_mut().find(|(n, _, _)| n == name) {
                Some(seen) => {
                    seen.1 = seen.1.min(at);
                    seen.2 = seen.2.max(at);
                }
                None => stats.subjects.push((name.to_owned(), at, at)),
            }
        }
    }
    for (stats, history) in &mut keys {
        stats.subjects.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        history.reverse();
    }
    keys
}

/// Every key as one backend reads it back: through `get_key` and through `list_keys`
/// (two read paths: SQLite's point reads and the pool each add unfolded usage their own
/// way), with `subjects`, and the history by `list_usage` in small pages.
struct Read {
    by_id: Vec<Stats>,
    listed: Vec<Stats>,
    history: Vec<Vec<Logged>>,
}

async fn read(store: &Store, ids: &[KeyId]) -> Result<Read, String> {
    let err = |what: &'static str| move |e: keywarden_store::StoreError| format!("{what}: {e}");
    let (listed, _) = store
        .list_keys(&KeyFilter::default(), START, 100, None)
        .await
        .map_err(err("list_keys"))?;
    let mut out = Read {
        by_id: Vec::new(),
        listed: Vec::new(),
        history: Vec::new(),
    };
    for id in ids {
        let subjects: Vec<(String, i64, i64)> = store
            .subjects(id)
            .await
            .map_err(err("subjects"))?
            .into_iter()
            .map(|s| (s.subject, to_millis(s.first_seen), to_millis(s.last_seen)))
            .collect();
        let stats = |k: &KeyRecord| Stats {
            uses: k.uses,
            last_used_at: k.last_used_at.map(to_millis),
            last_used_from: k.last_used_from.clone(),
            subjects: subjects.clone(),
        };
        let key = store
            .get_key(id)
            .await
            .map_err(err("get_key"))?
            .ok_or_else(|| format!("get_key: {id} is missing"))?;
        out.by_id.push(stats(&key));
        let key = listed
            .iter()
            .find(|k| &k.id == id)
            .ok_or_else(|| format!("list_keys: {id} is missing"))?;
        out.listed.push(stats(key));

        let mut history = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = store
                .list_usage(id, 3, cursor)
                .await
                .map_err(err("list_usage"))?;
            history.extend(page.into_iter().map(|u| Logged {
                at: to_millis(u.event.time),
                code: u.event.code,
                from: u.event.source_ip.map(|ip| ip.to_string()),
                subject: u.event.subject,
                counted: u.event.counted,
            }));
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        out.history.push(history);
    }
    Ok(out)
}

/// Compares each backend's reads with the model; a readable report of every key that
/// differs, lines that differ from the model marked with `!`.
fn check(
    when: &str,
    model: &[(Stats, Vec<Logged>)],
    reads: &[(&str, &Read)],
) -> Result<(), String> {
    let mut report = String::new();
    for (k, (want, want_history)) in model.iter().enumerate() {
        let mut rows: Vec<(String, &Stats)> = vec![("model".to_owned(), want)];
        for (name, r) in reads {
            rows.push((format!("{name} get_key"), &r.by_id[k]));
            rows.push((format!("{name} list_keys"), &r.listed[k]));
        }
        if rows.iter().any(|(_, s)| *s != want) {
            let _ = writeln!(report, "{when}, key {k} stats:");
            for (label, s) in &rows {
                let mark = if *s == want { ' ' } else { '!' };
                let _ = writeln!(report, "  {mark} {label:<40} {s}");
            }
        }
        if reads.iter().any(|(_, r)| r.history[k] != *want_history) {
            let _ = writeln!(report, "{when}, key {k} history (newest first):");
            let _ = writeln!(report, "    {:<40} {want_history:?}", "model");
            for (name, r) in reads {
                let mark = if r.history[k] == *want_history {
                    ' '
                } else {
                    '!'
                };
                let _ = writeln!(
                    report,
                    "  {mark} {:<40} {:?}",
                    format!("{name} list_usage"),
                    r.history[k]
                );
            }
        }
    }
    if report.is_empty() {
        Ok(())
    } else {
        Err(report)
    }
}

fn key_record(i: usize) -> KeyRecord {
    KeyRecord {
        id: KeyId::parse(&format!("UsageParityKey{i:02}")).unwrap(),
        hash: KeyHash {
            pepper_version: 1,
            digest: [u8::try_from(i).unwrap(); 32],
        },
        state: KeyState::Active,
        max_uses: None,
        uses: 0,
        expires_at: START + time::Duration::days(30),
        created_at: START - time::Duration::days(1),
        last_used_at: None,
        state_reason: None,
        state_cause: None,
        allowed_cidrs: Vec::new(),
        scopes: Vec::new(),
        environment: "prod".to_owned(),
        rate_limit: None,
        canary: false,
        version: 1,
        hint: "abcd".to_owned(),
        name: format!("parity-{i}"),
        description: String::new(),
        owner: "owner@example.com".to_owned(),
        systems: Vec::new(),
        created_by: "system:usage-parity".to_owned(),
        state_changed_at: None,
        last_used_from: None,
        rotated_from: None,
        rotated_to: None,
        metadata: Default::default(),
    }
}

fn created(key: &KeyRecord) -> AuditEntry {
    AuditEntry {
        time: key.created_at,
        actor: Actor {
            id: "system:usage-parity".to_owned(),
            name: "usage parity".to_owned(),
            ..Actor::default()
        },
        action: "key.created".to_owned(),
        target: format!("key:{}", key.id),
        reason: None,
        details: "{}".to_owned(),
    }
}

/// Writes `events` to both stores batch by batch, folding SQLite where the events say,
/// and checks every key after each batch and after the final fold.
async fn scenario(sqlite: &Store, pg: &Store, events: &[Ev]) -> Result<(), String> {
    let keys: Vec<KeyRecord> = (0..KEYS).map(key_record).collect();
    let ids: Vec<KeyId> = keys.iter().map(|k| k.id.clone()).collect();
    for store in [sqlite, pg] {
        for k in &keys {
            store
                .insert_key(k, &created(k))
                .await
                .map_err(|e| format!("insert_key: {e}"))?;
        }
    }
    let fold_err = |e: keywarden_store::StoreError| format!("fold: {e}");
    let batches = batches(events);
    let mut before_final_fold = None;
    for (n, (range, then)) in batches.iter().enumerate() {
        let batch: Vec<UsageEvent> = events[range.clone()]
            .iter()
            .map(|e| e.usage(&ids))
            .collect();
        for (name, store) in [("sqlite", sqlite), ("postgres", pg)] {
            let (_, written) = store.record_usage(batch.clone()).await;
            written.map_err(|e| format!("{name} record_usage: {e}"))?;
        }
        let folded = match then {
            After::WriteFold => {
                sqlite.fold_usage().await.map_err(fold_err)?;
                ", then SQLite folded"
            }
            After::WriteFoldOneKey => {
                sqlite.fold_usage_step(1).await.map_err(fold_err)?;
                ", then SQLite folded one key"
            }
            After::Next | After::Write => "",
        };
        let when = format!(
            "after batch {} of {} (events {}..={}){folded}",
            n + 1,
            batches.len(),
            range.start,
            range.end - 1
        );
        let s = read(sqlite, &ids).await?;
        let p = read(pg, &ids).await?;
        check(
            &when,
            &model(&events[..range.end]),
            &[("sqlite", &s), ("postgres", &p)],
        )?;
        before_final_fold = Some(s);
    }
    let before = before_final_fold.ok_or("no batch was written")?;
    sqlite.fold_usage().await.map_err(fold_err)?;
    let after = read(sqlite, &ids).await?;
    let p = read(pg, &ids).await?;
    check(
        "after the final fold",
        &model(events),
        &[
            ("sqlite before final fold", &before),
            ("sqlite after final fold", &after),
            ("postgres", &p),
        ],
    )
}

/// One case on a fresh SQLite file and a fresh PostgreSQL schema, dropped afterwards
/// whatever the verdict.
async fn run_case(events: &[Ev]) -> Result<(), TestCaseError> {
    let fail = |what: &str, e: &dyn fmt::Display| TestCaseError::fail(format!("{what}: {e}"));
    let dir = tempfile::tempdir().map_err(|e| fail("tempdir", &e))?;
    let url = format!("sqlite://{}", dir.path().join("usage.db").display());
    let sqlite = Store::connect(&url)
        .await
        .map_err(|e| fail("connect sqlite", &e))?;
    let schema = common::PgSchema::create()
        .await
        .map_err(|e| fail("create schema", &e))?;
    let verdict = match Store::connect(&schema.url).await {
        Ok(pg) => {
            let verdict = scenario(&sqlite, &pg, events).await;
            pg.close().await;
            verdict
        }
        Err(e) => Err(format!("connect postgres: {e}")),
    };
    sqlite.close().await;
    schema.drop().await;
    verdict.map_err(TestCaseError::fail)
}

#[test]
fn usage_stats_agree_across_backends_batches_and_folds() {
    if !common::postgres_reachable() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Each case migrates a PostgreSQL schema; a few dozen keep the test to seconds.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&vec(event(), 1..32), |events| {
        rt.block_on(run_case(&events))
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, events)) => panic!(
            "usage stats disagree; minimal failing events ({}), in arrival order:\n{events:#?}\n\n{why}",
            events.len()
        ),
        Err(TestError::Abort(why)) => panic!("property test aborted: {why}"),
    }
}
