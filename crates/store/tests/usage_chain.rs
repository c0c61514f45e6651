//! The usage log's chain does not depend on the backend: the same batches of events give
//! the same batch rows and hashes on SQLite and PostgreSQL, and both equal what an
//! outside verifier recomputes from the canonical form alone. Retention removes whole
//! old batches, never an unfolded event, and what remains still verifies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use keywarden_core::audit_chain::{to_hex, GENESIS};
use keywarden_core::model::{Actor, AuditEntry, UsageEvent};
use keywarden_core::usage_chain::{batch_hash, UsageWalk};
use keywarden_core::{KeyId, VerifyCode};
use keywarden_store::{walk_start, RetentionRule, Store};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const START: OffsetDateTime = datetime!(2026-06-01 12:00 UTC);

fn event(i: i64) -> UsageEvent {
    UsageEvent {
        key_id: (i % 4 != 0).then(|| KeyId::parse("0123456789abcdeF").unwrap()),
        time: START + Duration::seconds(i),
        code: if i % 3 == 0 {
            VerifyCode::ScopeDenied
        } else {
            VerifyCode::Valid
        },
        source_ip: match i % 3 {
            0 => None,
            1 => Some("192.0.2.1".parse().unwrap()),
            _ => Some("2001:db8::5".parse().unwrap()),
        },
        scope: Some("deploy:write".into()),
        environment: Some(if i % 2 == 0 { "live" } else { "test" }.into()),
        subject: (i % 5 == 0).then(|| format!("host \"{i}\"\n")),
        user_agent: Some("ci/1".into()),
        counted: i % 7 == 0,
    }
}

/// Writes batches of 1, 2, 3, 4 and 5 events; returns (seq, first, last, hash) of each.
async fn write_and_read(store: &Store) -> Vec<(i64, i64, i64, String)> {
    let mut i = 0;
    for n in 1..=5 {
        let batch: Vec<UsageEvent> = (0..n)
            .map(|_| {
                i += 1;
                event(i)
            })
            .collect();
        let (_, r) = store.record_usage(batch).await;
        r.unwrap();
    }
    let batches = store.usage_batches_after(0, 100).await.unwrap();
    let mut prev = GENESIS;
    let mut out = Vec::new();
    for b in batches {
        let events = store
            .usage_events_between(b.header.first_seq, b.header.last_seq)
            .await
            .unwrap();
        assert_eq!(events.len() as i64, b.header.count);
        assert_eq!(b.prev_hash, to_hex(&prev));
        assert_eq!(
            to_hex(&batch_hash(&prev, &b.header, &events)),
            b.hash,
            "the stored hash is what the canonical form gives"
        );
        prev = batch_hash(&prev, &b.header, &events);
        out.push((b.header.seq, b.header.first_seq, b.header.last_seq, b.hash));
    }
    assert_eq!(store.usage_chain_head().await.unwrap().hash, prev);
    out
}

#[tokio::test]
async fn the_same_events_chain_to_the_same_hashes_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::connect(&format!("sqlite://{}", dir.path().join("db").display()))
        .await
        .unwrap();
    let on_sqlite = write_and_read(&sqlite).await;
    assert_eq!(on_sqlite.len(), 5);
    assert_eq!(on_sqlite[4], (5, 11, 15, on_sqlite[4].3.clone()));
    if !common::postgres_reachable() {
        return;
    }
    let schema = common::PgSchema::create().await.unwrap();
    let pg = Store::connect(&schema.url).await.unwrap();
    let on_pg = write_and_read(&pg).await;
    pg.close().await;
    schema.drop().await;
    assert_eq!(on_sqlite, on_pg);
}

fn retained_entry(r: &keywarden_store::UsageRetention) -> AuditEntry {
    AuditEntry {
        time: r.retained_at,
        actor: Actor {
            id: "system:test".into(),
            name: "test".into(),
            ..Actor::default()
        },
        action: "usage.retained".into(),
        target: "usage".into(),
        reason: None,
        details: format!(r#"{{"last_batch":{}}}"#, r.last_batch),
    }
}

#[tokio::test]
async fn sqlite_retention_keeps_unfolded_events_and_the_rest_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("db").display()))
        .await
        .unwrap();
    for i in 0..4 {
        let (_, r) = store
            .record_usage(vec![event(2 * i), event(2 * i + 1)])
            .await;
        r.unwrap();
    }
    let rule = RetentionRule {
        default: Duration::days(30),
        environments: Default::default(),
    };
    let later = START + Duration::days(31);
    // Nothing folded yet: nothing may go.
    assert_eq!(
        store
            .retain_usage(&rule, later, retained_entry)
            .await
            .unwrap(),
        None
    );
    store.fold_usage().await.unwrap();
    let r = store
        .retain_usage(&rule, later, retained_entry)
        .await
        .unwrap()
        .expect("a prefix is due");
    // Whole batches, never the newest.
    assert_eq!((r.first_batch, r.last_batch), (1, 3));
    assert_eq!((r.first_seq, r.last_seq, r.events), (1, 6, 6));
    assert_eq!(store.count_usage().await.unwrap(), 2);
    assert_eq!(
        store
            .retain_usage(&rule, later, retained_entry)
            .await
            .unwrap(),
        None
    );

    let retentions = store.usage_retentions().await.unwrap();
    let (after, hash) = walk_start(&retentions);
    let mut walk = UsageWalk::starting_after(after, hash);
    for b in store.usage_batches_after(after, 100).await.unwrap() {
        let events = store
            .usage_events_between(b.header.first_seq, b.header.last_seq)
            .await
            .unwrap();
        walk.push_batch(b.walked(events));
    }
    let head = store.usage_chain_head().await.unwrap();
    let report = walk.finish(Some((head.batch_seq, head.hash)));
    assert_eq!(report.broken, None);
    assert_eq!(report.checked_batches, 1);
}
