//! The usage log: a key's events are read newest first across folds and pages, stats are
//! exact before and after a fold, and (SQLite) a crash between the log and the fold loses
//! nothing and counts nothing twice.

use serde_json::{json, Value};

use crate::harness::{key_body, Backend, TestServer};
use crate::on_both_backends;

on_both_backends!(events_and_stats_across_folds_and_pages);

/// Folds only when the test says so.
async fn start(b: Backend) -> TestServer {
    TestServer::start_with(b, |c| {
        c.usage_fold_interval = std::time::Duration::from_secs(3600);
    })
    .await
}

async fn all_events(s: &TestServer, id: &str, page: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/keys/{id}/usage?limit={page}&cursor={c}"),
            None => format!("/v1/keys/{id}/usage?limit={page}"),
        };
        let (status, v) = s.get(&path).await;
        assert_eq!(status, 200, "{v}");
        let events = v["events"].as_array().unwrap();
        assert!(events.len() <= page);
        out.extend(events.iter().cloned());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
}

async fn verify_as(s: &TestServer, secret: &str, subject: &str, scope: &str) {
    s.verify(json!({"key": secret, "scope": scope, "subject": subject, "source_ip": "192.0.2.1"}))
        .await;
}

async fn events_and_stats_across_folds_and_pages(b: Backend) {
    let s = start(b).await;
    let (a_id, a) = s.create_key(key_body("a")).await;
    let (b_id, bk) = s.create_key(key_body("b")).await;
    // Interleaved, so each key's chain skips the other's events.
    for i in 0..4 {
        verify_as(&s, &a, &format!("a-{i}"), "deploy:write").await;
        verify_as(&s, &bk, "b-0", "deploy:write").await;
    }
    verify_as(&s, &a, "a-x", "nope:nope").await; // denied: an event, not a use
    s.wait_for_usage(&a_id, 5).await;
    s.wait_for_usage(&b_id, 4).await;

    let check = |events: Vec<Value>, n: usize, subject_prefix: &str| {
        assert_eq!(events.len(), n);
        let times: Vec<&str> = events.iter().map(|e| e["time"].as_str().unwrap()).collect();
        let mut sorted = times.clone();
        sorted.sort_by(|x, y| y.cmp(x));
        assert_eq!(times, sorted, "newest first");
        assert!(events
            .iter()
            .all(|e| e["subject"].as_str().unwrap().starts_with(subject_prefix)));
    };
    let a_events = all_events(&s, &a_id, 2).await;
    assert_eq!(a_events[0]["code"], "SCOPE_DENIED", "newest first");
    check(a_events, 5, "a-");
    check(all_events(&s, &b_id, 3).await, 4, "b-");

    let uses = |v: &Value| v["uses"].as_u64().unwrap();
    let (_, key_a) = s.get(&format!("/v1/keys/{a_id}")).await;
    assert_eq!(uses(&key_a), 4);
    assert_eq!(key_a["subjects"].as_array().unwrap().len(), 4);

    let store = s.server.as_ref().unwrap().state.store.clone();
    store.fold_usage().await.unwrap();
    assert_eq!(store.unfolded_keys(), 0);
    let (_, folded) = s.get(&format!("/v1/keys/{a_id}")).await;
    assert_eq!(folded["uses"], key_a["uses"], "a fold counts nothing twice");
    assert_eq!(folded["subjects"], key_a["subjects"]);
    assert_eq!(folded["last_used_at"], key_a["last_used_at"]);

    // After the fold, new events chain onto the folded ones.
    verify_as(&s, &a, "a-4", "deploy:write").await;
    s.wait_for_usage(&a_id, 6).await;
    let a_events = all_events(&s, &a_id, 4).await;
    assert_eq!(a_events[0]["subject"], "a-4");
    check(a_events, 6, "a-");
    let (_, key_a) = s.get(&format!("/v1/keys/{a_id}")).await;
    assert_eq!(uses(&key_a), 5);

    // A second fold adds to the stats the first one wrote.
    store.fold_usage().await.unwrap();
    assert_eq!(store.unfolded_keys(), 0);
    let (_, folded) = s.get(&format!("/v1/keys/{a_id}")).await;
    assert_eq!(uses(&folded), 5);
    assert_eq!(folded["subjects"].as_array().unwrap().len(), 5);
    assert_eq!(folded["last_used_at"], key_a["last_used_at"]);
    assert_eq!(folded["last_used_from"], "192.0.2.1");
    let reopened = keywarden_store::Store::connect(&s.config.database_url())
        .await
        .unwrap();
    let stored = reopened
        .get_key(&keywarden_core::KeyId::parse(&a_id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.uses, 5, "as stored, with nothing pending");
    s.stop().await;
}

/// A second store opened on the same file sees what a restart after a crash would: the
/// log holds events the fold never saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_crash_before_or_during_a_fold_loses_and_doubles_nothing() {
    let s = start(Backend::Sqlite).await;
    let url = s.config.database_url();
    let (a_id, a) = s.create_key(key_body("a")).await;
    let (b_id, bk) = s.create_key(key_body("b")).await;
    for i in 0..3 {
        verify_as(&s, &a, &format!("a-{i}"), "deploy:write").await;
    }
    for _ in 0..2 {
        verify_as(&s, &bk, "b-0", "deploy:write").await;
    }
    s.wait_for_usage(&a_id, 3).await;
    s.wait_for_usage(&b_id, 2).await;
    let a_key = keywarden_core::KeyId::parse(&a_id).unwrap();
    let b_key = keywarden_core::KeyId::parse(&b_id).unwrap();

    // Crash before any fold: the reopened store refolds the log.
    let reopened = keywarden_store::Store::connect(&url).await.unwrap();
    assert_eq!(reopened.unfolded_keys(), 2);
    let got = reopened.get_key(&a_key).await.unwrap().unwrap();
    assert_eq!(got.uses, 3);
    assert_eq!(got.last_used_from.as_deref(), Some("192.0.2.1"));
    assert_eq!(reopened.subjects(&a_key).await.unwrap().len(), 3);

    // Crash in the middle of a fold: one key folded, the fold not finished.
    assert!(!reopened.fold_usage_step(1).await.unwrap());
    let again = keywarden_store::Store::connect(&url).await.unwrap();
    assert_eq!(again.unfolded_keys(), 1, "the folded key is not refolded");
    for (id, uses) in [(&a_key, 3), (&b_key, 2)] {
        assert_eq!(again.get_key(id).await.unwrap().unwrap().uses, uses);
    }
    let (events, next) = again.list_usage(&a_key, 10, None).await.unwrap();
    assert_eq!((events.len(), next), (3, None));

    // Finish the fold: nothing pending, the same numbers from the tables alone.
    again.fold_usage().await.unwrap();
    let last = keywarden_store::Store::connect(&url).await.unwrap();
    assert_eq!(last.unfolded_keys(), 0);
    for (id, uses) in [(&a_key, 3), (&b_key, 2)] {
        assert_eq!(last.get_key(id).await.unwrap().unwrap().uses, uses);
    }
    assert_eq!(last.subjects(&b_key).await.unwrap().len(), 1);
    for st in [reopened, again, last] {
        st.close().await;
    }
    s.stop().await;
}

/// A database written by the first release (migration 0001 only, usage indexed by key)
/// keeps its events, stats and subjects through 0002, and new events chain onto old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_usage_from_0001_survives_the_log_migration() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first-release");
    std::fs::create_dir(&first).unwrap();
    let sql_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/store/migrations/sqlite");
    std::fs::copy(sql_dir.join("0001_init.sql"), first.join("0001_init.sql")).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("kw.db").display());
    let id = "AAAAAAAAAAAAAAAA";
    {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::migrate::Migrator::new(first.as_path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO keys (id, hash, pepper_version, hint, name, description, owner, systems, \
             environment, scopes, created_at, created_by, expires_at, state, allowed_cidrs, \
             metadata) VALUES (?1, ?2, 1, 'abcd', 'old', '', 'a@example.com', '[]', 'prod', \
             '[\"deploy:write\"]', 0, 'test', 99999999999999, 'active', '[]', '{}')",
        )
        .bind(id)
        .bind("0".repeat(64))
        .execute(&pool)
        .await
        .unwrap();
        for (time, code) in [(1_000, "VALID"), (2_000, "SCOPE_DENIED"), (3_000, "VALID")] {
            sqlx::query(
                "INSERT INTO usage_events (key_id, time, code, subject) VALUES (?1, ?2, ?3, 'n1')",
            )
            .bind(id)
            .bind(time)
            .bind(code)
            .execute(&pool)
            .await
            .unwrap();
        }
        sqlx::query("INSERT INTO key_usage VALUES (?1, 2, 3000, '192.0.2.9')")
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO key_subjects VALUES (?1, 'n1', 1000, 3000)")
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }

    let store = keywarden_store::Store::connect(&url).await.unwrap();
    let key_id = keywarden_core::KeyId::parse(id).unwrap();
    assert_eq!(
        store.unfolded_keys(),
        0,
        "the first release's usage was folded"
    );
    let key = store.get_key(&key_id).await.unwrap().unwrap();
    assert_eq!(key.uses, 2);
    assert_eq!(key.last_used_from.as_deref(), Some("192.0.2.9"));
    assert_eq!(store.subjects(&key_id).await.unwrap().len(), 1);
    let (events, _) = store.list_usage(&key_id, 10, None).await.unwrap();
    let codes: Vec<&str> = events.iter().map(|e| e.event.code.as_str()).collect();
    assert_eq!(codes, ["VALID", "SCOPE_DENIED", "VALID"]);

    let mut new = events[0].event.clone();
    new.time = time::OffsetDateTime::from_unix_timestamp(4).unwrap();
    new.subject = Some("n2".to_owned());
    let (_, written) = store.record_usage(vec![new]).await;
    written.unwrap();
    let (events, _) = store.list_usage(&key_id, 10, None).await.unwrap();
    assert_eq!(
        events.len(),
        4,
        "the new event chains onto the migrated ones"
    );
    assert_eq!(events[0].event.subject.as_deref(), Some("n2"));
    let key = store.get_key(&key_id).await.unwrap().unwrap();
    assert_eq!(key.uses, 3);
    assert_eq!(store.subjects(&key_id).await.unwrap().len(), 2);
    store.close().await;
}

/// Verify's cache misses read a key on SQLite without waiting for a fold step. While
/// steps move usage from the overlay into the tables, every read must count each use
/// exactly once: never less than the appends finished before it, never more than those
/// started by its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_point_reads_count_each_use_once_while_folds_run() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let s = TestServer::start_with(Backend::Sqlite, |c| {
        c.usage_fold_interval = std::time::Duration::from_secs(3600);
        c.usage_fold_max_keys = usize::MAX;
    })
    .await;
    let store = s.server.as_ref().unwrap().state.store.clone();
    let mut ids = Vec::new();
    for i in 0..24 {
        let (id, _) = s.create_key(key_body(&format!("k{i}"))).await;
        ids.push(keywarden_core::KeyId::parse(&id).unwrap());
    }
    let ids = Arc::new(ids);
    let started = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    const ROUNDS: u64 = 150;

    let writer = {
        let (store, ids, started, done) =
            (store.clone(), ids.clone(), started.clone(), done.clone());
        tokio::spawn(async move {
            for round in 0..ROUNDS {
                let batch = ids
                    .iter()
                    .map(|id| keywarden_core::model::UsageEvent {
                        key_id: Some(id.clone()),
                        time: crate::harness::START + time::Duration::seconds(round as i64),
                        code: keywarden_core::verify::VerifyCode::Valid,
                        source_ip: Some([192, 0, 2, 7].into()),
                        scope: None,
                        environment: None,
                        subject: None,
                        user_agent: None,
                        counted: false,
                    })
                    .collect();
                started.fetch_add(1, Ordering::SeqCst);
                let (_, written) = store.record_usage(batch).await;
                written.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
                // Small steps, so reads land before, during and after each one.
                while !store.fold_usage_step(5).await.unwrap() {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut reads = 0u64;
    while !writer.is_finished() {
        for id in ids.iter() {
            let lo = done.load(Ordering::SeqCst);
            let uses = store.get_key(id).await.unwrap().unwrap().uses;
            let hi = started.load(Ordering::SeqCst);
            assert!(
                (lo..=hi).contains(&uses),
                "key {id}: {uses} uses read, between {lo} and {hi} appended"
            );
            reads += 1;
        }
    }
    writer.await.unwrap();
    for id in ids.iter() {
        assert_eq!(store.get_key(id).await.unwrap().unwrap().uses, ROUNDS);
    }
    assert!(
        reads > ROUNDS,
        "the reads ran alongside the folds ({reads} reads)"
    );
    s.stop().await;
}

/// On SQLite, verify's cache misses read keys through rusqlite by column position, and
/// everything else through sqlx by name: both must decode every field alike.
#[tokio::test]
async fn sqlite_point_reads_decode_every_field_as_pooled_reads_do() {
    let s = TestServer::start(Backend::Sqlite).await;
    let store = s.server.as_ref().unwrap().state.store.clone();
    let mut body = key_body("every-field");
    body["description"] = json!("reads the same both ways");
    body["allowed_cidrs"] = json!(["192.0.2.0/24", "2001:db8::/32"]);
    body["max_uses"] = json!(10);
    body["metadata"] = json!({"team": "infra", "ticket": "OPS-1"});
    body["systems"] = json!(["github", "vault"]);
    let (id, secret) = s.create_key(body).await;
    let answer = s
        .verify(
            json!({"key": secret, "scope": "deploy:write", "source_ip": "192.0.2.9",
                       "subject": "host-1"}),
        )
        .await;
    assert_eq!(answer["code"], "VALID");
    let (status, _) = s
        .post(&format!("/v1/keys/{id}/rotate"), json!({"grace": "1h"}))
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED);
    s.post(
        &format!("/v1/keys/{id}/suspend"),
        json!({"reason": "checking"}),
    )
    .await;
    let id = keywarden_core::KeyId::parse(&id).unwrap();
    // Fold half of the usage into the tables, so both the stored and the pending parts
    // are read.
    store.fold_usage().await.unwrap();
    s.verify(json!({"key": secret, "source_ip": "198.51.100.1"}))
        .await;

    let point = store.get_key(&id).await.unwrap().expect("the key");
    let (listed, _) = store
        .list_keys(&Default::default(), crate::harness::START, 500, None)
        .await
        .unwrap();
    let pooled = listed.into_iter().find(|k| k.id == id).expect("listed");
    assert_eq!(format!("{point:?}"), format!("{pooled:?}"));
    assert_eq!(point.metadata.len(), 2);
    assert_eq!(point.allowed_cidrs.len(), 2);
    assert_eq!(point.max_uses, Some(10));
    assert_eq!(point.uses, 1);
    assert!(point.rotated_to.is_some());
    assert_eq!(point.state_reason.as_deref(), Some("checking"));
    assert_eq!(point.last_used_from.as_deref(), Some("192.0.2.9"));
    s.stop().await;
}
