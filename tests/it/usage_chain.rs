//! The usage log's hash chain, end to end: the writer chains every batch, `audit verify
//! --usage` recomputes it from the export and names the first altered, removed, inserted
//! or reordered batch (and the event in it), retention removes whole old batches with a
//! record and an audit entry, and the chain of what remains still verifies.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{key_body, Backend, TestServer};
use crate::on_both_backends;

on_both_backends!(
    an_intact_log_verifies,
    an_edited_event_is_named_by_batch_and_seq,
    a_removed_event_is_named,
    a_removed_batch_row_is_named,
    swapped_batches_are_named,
    retention_removes_whole_old_batches_and_the_rest_verifies,
    retention_keeps_environments_with_a_longer_rule,
    unfolded_events_are_never_removed,
    retention_keeps_a_broken_prefix_as_evidence,
    the_audit_trail_anchors_the_head_so_a_cut_tail_is_caught,
);

/// Folds only when the test says so (SQLite), and enforces only on `POST /v1/enforce`.
/// Keys live long enough, idle or not, that a verify months later is still a use.
async fn start(b: Backend) -> TestServer {
    let s = TestServer::start_with(b, |c| {
        c.usage_fold_interval = std::time::Duration::from_secs(3600);
    })
    .await;
    apply_policy(&s, "").await;
    s
}

async fn apply_policy(s: &TestServer, extra: &str) {
    let text = format!("[default]\nidle_expiry = \"365d\"\n{extra}");
    let (status, v) = s
        .call(
            reqwest::Method::PUT,
            "/v1/policy",
            Some(&s.admin),
            Some(json!({ "policy": text })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

fn long_lived(name: &str) -> Value {
    let mut body = key_body(name);
    body["ttl"] = json!("365d");
    body
}

/// `audit verify --usage --json`: exit code and the report.
async fn verify(s: &TestServer) -> (i32, Value) {
    let (rc, out, err) = s.cli(&["audit", "verify", "--usage", "--json"]).await;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (rc, v)
}

/// The break as (kind, batch, event seq).
fn brk(v: &Value) -> (String, i64, Option<i64>) {
    let b = &v["break"];
    (
        b["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("a break: {v}"))
            .to_owned(),
        b["batch"].as_i64().unwrap(),
        b["event_seq"].as_i64(),
    )
}

/// One verify, stored as a batch of its own before this returns.
async fn use_key(s: &TestServer, id: &str, secret: &str, subject: &str) {
    let (_, before) = s.get(&format!("/v1/keys/{id}/usage?limit=1000")).await;
    let n = before["events"].as_array().map_or(0, Vec::len);
    s.verify(
        json!({"key": secret, "scope": "deploy:write", "subject": subject,
                    "source_ip": "192.0.2.1"}),
    )
    .await;
    s.wait_for_usage(id, n + 1).await;
}

/// Four batches of one event each; returns the key's (id, secret).
async fn four_batches(s: &TestServer) -> (String, String) {
    let (id, secret) = s.create_key(long_lived("chained")).await;
    for i in 0..4 {
        use_key(s, &id, &secret, &format!("host-{i}")).await;
    }
    (id, secret)
}

/// (seq, first_seq, last_seq) of every stored batch.
async fn batches(s: &TestServer) -> Vec<(i64, i64, i64)> {
    s.state()
        .store
        .usage_batches_after(0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|b| (b.header.seq, b.header.first_seq, b.header.last_seq))
        .collect()
}

async fn an_intact_log_verifies(b: Backend) {
    let s = start(b).await;
    let (rc, v) = verify(&s).await;
    assert_eq!((rc, v["intact"].as_bool()), (0, Some(true)), "empty: {v}");
    four_batches(&s).await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 0, "{v}");
    assert_eq!(v["checked_batches"], 4);
    assert_eq!(v["checked_events"], 4);
    assert_eq!(v["head_batch"], 4);
    // The human form says so too.
    let (rc, out, _) = s.cli(&["audit", "verify", "--usage"]).await;
    assert_eq!(rc, 0);
    assert!(
        out.contains("usage log intact: 4 batches (4 events)"),
        "{out}"
    );
    // An auditor may verify; a verifier may not read the log.
    let auditor = s.token("auditor", None).await;
    let (status, _) = s
        .call(
            reqwest::Method::GET,
            "/v1/usage/chain/export",
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let verifier = s.token("verifier", None).await;
    let (status, _) = s
        .call(
            reqwest::Method::GET,
            "/v1/usage/chain",
            Some(&verifier),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    s.stop().await;
}

async fn an_edited_event_is_named_by_batch_and_seq(b: Backend) {
    let s = start(b).await;
    four_batches(&s).await;
    let (batch, first, last) = three_event_batch(&s).await;
    assert_eq!((batch, last - first), (5, 2));
    assert_eq!(verify(&s).await.0, 0);

    let middle = first + 1;
    s.sql(&[&format!(
        "UPDATE usage_events SET source_ip = '203.0.113.9' WHERE seq = {middle}"
    )])
    .await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1, "{v}");
    assert_eq!(brk(&v), ("altered".into(), 5, Some(middle)), "{v}");

    // Put it back: intact again. Then the code of another batch's event.
    s.sql(&[&format!(
        "UPDATE usage_events SET source_ip = '198.51.100.7' WHERE seq = {middle}"
    )])
    .await;
    assert_eq!(verify(&s).await.0, 0);
    let (_, second, _) = batches(&s).await[1];
    s.sql(&[&format!(
        "UPDATE usage_events SET code = 'SCOPE_DENIED' WHERE seq = {second}"
    )])
    .await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1);
    assert_eq!(brk(&v), ("altered".into(), 2, Some(second)), "{v}");
    s.stop().await;
}

async fn a_removed_event_is_named(b: Backend) {
    let s = start(b).await;
    four_batches(&s).await;
    let (_, first, _) = three_event_batch(&s).await;
    // The middle event of a batch, then (once restored) a batch's only event.
    s.sql(&[&format!(
        "DELETE FROM usage_events WHERE seq = {}",
        first + 1
    )])
    .await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1);
    assert_eq!(brk(&v), ("removed".into(), 5, Some(first + 1)), "{v}");
    s.stop().await;

    let s = start(b).await;
    four_batches(&s).await;
    let (_, third, _) = batches(&s).await[2];
    s.sql(&[&format!("DELETE FROM usage_events WHERE seq = {third}")])
        .await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1);
    assert_eq!(brk(&v), ("removed".into(), 3, Some(third)), "{v}");
    s.stop().await;
}

/// A batch of three events of a new key, written as the writer writes one; returns
/// (batch, first seq, last seq).
async fn three_event_batch(s: &TestServer) -> (i64, i64, i64) {
    let (id, _) = s.create_key(long_lived("three")).await;
    let event = |n: i64| keywarden_core::model::UsageEvent {
        key_id: Some(keywarden_core::KeyId::parse(&id).unwrap()),
        time: keywarden_core::clock::Clock::now(&*s.clock) + time::Duration::milliseconds(n),
        code: keywarden_core::VerifyCode::Valid,
        source_ip: Some("198.51.100.7".parse().unwrap()),
        scope: None,
        environment: Some("prod".into()),
        subject: None,
        user_agent: Some("ci/1".into()),
        counted: false,
    };
    let (_, r) = s
        .state()
        .store
        .record_usage(vec![event(1), event(2), event(3)])
        .await;
    r.unwrap();
    let all = batches(s).await;
    *all.last().unwrap()
}

async fn a_removed_batch_row_is_named(b: Backend) {
    let s = start(b).await;
    four_batches(&s).await;
    s.sql(&["DELETE FROM usage_batches WHERE seq = 2"]).await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1);
    assert_eq!(brk(&v), ("removed".into(), 2, None), "{v}");

    // The last batch row: the head the writer recorded says the log was cut.
    s.sql(&["DELETE FROM usage_batches WHERE seq >= 2"]).await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1);
    assert_eq!(brk(&v).0, "truncated", "{v}");
    s.stop().await;

    // An event written around the writer, in no batch, is named too.
    let s = start(b).await;
    four_batches(&s).await;
    let (_, _, last) = batches(&s).await[0];
    let overriding = match b {
        Backend::Sqlite => "",
        Backend::Postgres => "OVERRIDING SYSTEM VALUE",
    };
    s.sql(&[&format!(
        "INSERT INTO usage_events (seq, key_id, time, code, counted) {overriding} \
         VALUES ({}, NULL, 0, 'VALID', 0)",
        last + 1_000
    )])
    .await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1);
    assert_eq!(brk(&v), ("inserted".into(), 5, Some(last + 1_000)), "{v}");
    s.stop().await;
}

async fn swapped_batches_are_named(b: Backend) {
    let s = start(b).await;
    four_batches(&s).await;
    s.sql(&[
        "UPDATE usage_batches SET seq = -2 WHERE seq = 2",
        "UPDATE usage_batches SET seq = 2 WHERE seq = 3",
        "UPDATE usage_batches SET seq = 3 WHERE seq = -2",
    ])
    .await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1);
    assert_eq!(brk(&v), ("reordered".into(), 2, None), "{v}");
    s.stop().await;
}

async fn fold(s: &TestServer) {
    s.state().store.fold_usage().await.unwrap();
}

async fn enforce(s: &TestServer) {
    let (status, v) = s.post("/v1/enforce", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

async fn chain(s: &TestServer) -> Value {
    let (status, v) = s.get("/v1/usage/chain").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

async fn retention_removes_whole_old_batches_and_the_rest_verifies(b: Backend) {
    let s = start(b).await;
    let (gone_id, gone) = s.create_key(long_lived("gone")).await;
    use_key(&s, &gone_id, &gone, "old").await;
    let (id, secret) = four_batches(&s).await;
    let old = batches(&s).await[1..].to_vec();
    s.clock.advance(time::Duration::days(31));
    use_key(&s, &id, &secret, "after").await;
    fold(&s).await;
    enforce(&s).await;

    let v = chain(&s).await;
    let retained = v["retained"].as_array().unwrap();
    assert_eq!(retained.len(), 1, "{v}");
    let r = &retained[0];
    assert_eq!(
        (r["first_batch"].as_i64(), r["last_batch"].as_i64()),
        (Some(1), Some(5))
    );
    assert_eq!(r["first_seq"].as_i64(), Some(1));
    assert_eq!(r["last_seq"].as_i64(), Some(old[3].2));
    assert_eq!(r["events"], 5);
    let left = batches(&s).await;
    assert_eq!(left.len(), 1, "whole batches go, the new one stays");
    assert_eq!(s.state().store.count_usage().await.unwrap(), 1);

    // Audited, with the range.
    let (_, audit) = s.get("/v1/audit?action=usage.retained").await;
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!(entries[0]["actor"], "system:enforcer");
    assert_eq!(entries[0]["details"]["last_batch"], 5);
    assert_eq!(entries[0]["details"]["last_hash"], r["last_hash"]);

    // The chain starts at the last removed hash.
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 0, "{v}");
    assert_eq!(
        (v["first_batch"].as_i64(), v["checked_batches"].as_i64()),
        (Some(6), Some(1))
    );
    assert_eq!(v["retained_batches"], 5);

    // The key's listing reads what is left (its chain points into the removed range).
    let (status, listed) = s.get(&format!("/v1/keys/{id}/usage?limit=10")).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let events = listed["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{listed}");
    assert_eq!(events[0]["subject"], "after");
    let (_, key) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(key["uses"], 5, "stats keep what retention removed");
    // A key whose every event went lists none, and keeps its stats.
    let (status, listed) = s.get(&format!("/v1/keys/{gone_id}/usage?limit=10")).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["events"], json!([]));
    let (_, key) = s.get(&format!("/v1/keys/{gone_id}")).await;
    assert_eq!(key["uses"], 1);

    // Nothing more is due; a second pass changes nothing.
    enforce(&s).await;
    assert_eq!(chain(&s).await["retained"].as_array().unwrap().len(), 1);

    // Tampering after retention is still found.
    let (_, first, _) = left[0];
    s.sql(&[&format!(
        "UPDATE usage_events SET source_ip = '10.0.0.1' WHERE seq = {first}"
    )])
    .await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1);
    assert_eq!(brk(&v), ("altered".into(), 6, Some(first)), "{v}");
    // And a retention record whose hash was rewritten no longer starts the chain.
    s.sql(&[&format!(
        "UPDATE usage_events SET source_ip = '192.0.2.1' WHERE seq = {first}"
    )])
    .await;
    assert_eq!(verify(&s).await.0, 0);
    s.sql(&["UPDATE usage_retention SET last_hash = \
             'ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff'"])
        .await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1);
    assert_eq!(brk(&v).1, 6, "{v}");
    s.stop().await;
}

async fn retention_keeps_environments_with_a_longer_rule(b: Backend) {
    let s = start(b).await;
    apply_policy(&s, "[environments.prod]\nusage_retention = \"90d\"\n").await;
    let mut staging = long_lived("staging");
    staging["environment"] = json!("staging");
    let (st_id, st) = s.create_key(staging).await;
    let (prod_id, prod) = s.create_key(long_lived("prod")).await;
    use_key(&s, &st_id, &st, "s-1").await; // batch 1
    use_key(&s, &st_id, &st, "s-2").await; // batch 2
    use_key(&s, &prod_id, &prod, "p-1").await; // batch 3: kept 90 days
    use_key(&s, &st_id, &st, "s-3").await; // batch 4
    s.clock.advance(time::Duration::days(31));
    use_key(&s, &st_id, &st, "s-4").await;
    fold(&s).await;
    enforce(&s).await;
    let v = chain(&s).await;
    let last: Vec<i64> = v["retained"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["last_batch"].as_i64().unwrap())
        .collect();
    assert_eq!(
        last,
        vec![2],
        "the prod event holds its batch and all after it: {v}"
    );
    assert_eq!(verify(&s).await.0, 0);

    s.clock.advance(time::Duration::days(60));
    use_key(&s, &st_id, &st, "s-5").await;
    fold(&s).await;
    enforce(&s).await;
    let v = chain(&s).await;
    assert_eq!(v["retained"][1]["last_batch"], 5, "{v}");
    assert_eq!(verify(&s).await.0, 0);
    s.stop().await;
}

async fn unfolded_events_are_never_removed(b: Backend) {
    let s = start(b).await;
    let (id, secret) = four_batches(&s).await;
    s.clock.advance(time::Duration::days(31));
    use_key(&s, &id, &secret, "after").await;
    enforce(&s).await;
    let retained = chain(&s).await["retained"].as_array().unwrap().len();
    match b {
        // SQLite folds later: nothing folded, nothing removed.
        Backend::Sqlite => {
            assert_eq!(retained, 0);
            assert_eq!(s.state().store.count_usage().await.unwrap(), 5);
            fold(&s).await;
            enforce(&s).await;
            assert_eq!(chain(&s).await["retained"].as_array().unwrap().len(), 1);
        }
        // PostgreSQL folds each batch as it is written.
        Backend::Postgres => assert_eq!(retained, 1),
    }
    let (_, key) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(key["uses"], 5, "every use counted once, before and after");
    assert_eq!(verify(&s).await.0, 0);
    s.stop().await;
}

async fn retention_keeps_a_broken_prefix_as_evidence(b: Backend) {
    let s = start(b).await;
    let (id, secret) = four_batches(&s).await;
    let (_, second, _) = batches(&s).await[1];
    s.sql(&[&format!(
        "UPDATE usage_events SET code = 'VALID', subject = NULL WHERE seq = {second}"
    )])
    .await;
    s.clock.advance(time::Duration::days(31));
    use_key(&s, &id, &secret, "after").await;
    fold(&s).await;
    enforce(&s).await;
    // Removing the old batches would erase the edit: they stay, and verify names it.
    assert_eq!(chain(&s).await["retained"].as_array().unwrap().len(), 0);
    assert_eq!(batches(&s).await.len(), 5);
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1);
    assert_eq!(brk(&v), ("altered".into(), 2, Some(second)), "{v}");
    s.stop().await;
}

/// The usage.anchored entries of the trail, as (batch, hash).
async fn anchors(s: &TestServer) -> Vec<(i64, String)> {
    let (_, v) = s.get("/v1/audit?action=usage.anchored").await;
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["details"]["batch"].as_i64().unwrap(),
                e["details"]["hash"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Cutting the log's last batches and moving its head back leaves a chain that holds
/// together: only the head the audit trail recorded tells.
async fn the_audit_trail_anchors_the_head_so_a_cut_tail_is_caught(b: Backend) {
    let s = start(b).await;
    let (id, secret) = four_batches(&s).await;
    enforce(&s).await;
    let head = chain(&s).await;
    assert_eq!(
        anchors(&s).await,
        [(4, head["head_hash"].as_str().unwrap().to_owned())]
    );
    // At most one anchor per 10 minutes, and none while the head stays put.
    use_key(&s, &id, &secret, "host-5").await;
    enforce(&s).await;
    s.clock.advance(time::Duration::minutes(11));
    enforce(&s).await;
    assert_eq!(anchors(&s).await.len(), 2);
    enforce(&s).await;
    assert_eq!(anchors(&s).await.len(), 2, "the head did not move");
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 0, "{v}");
    assert!(v["notes"].to_string().contains("2 anchors"), "{v}");

    // Batches 4 and 5 gone, their events too, and the head moved back to batch 3.
    s.sql(&[
        "DELETE FROM usage_events WHERE seq >= (SELECT first_seq FROM usage_batches WHERE seq = 4)",
        "DELETE FROM usage_batches WHERE seq >= 4",
        "UPDATE usage_chain_head SET batch_seq = 3, \
         hash = (SELECT hash FROM usage_batches WHERE seq = 3) WHERE id = 1",
    ])
    .await;
    let (rc, v) = verify(&s).await;
    assert_eq!(rc, 1, "{v}");
    assert_eq!(brk(&v), ("truncated".into(), 4, None), "{v}");
    assert!(
        v["break"]["detail"]
            .as_str()
            .unwrap()
            .contains("audit entry"),
        "{v}"
    );
    s.stop().await;
}
