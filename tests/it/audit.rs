//! The tamper-evident audit trail: what a lifecycle writes, that a failed audit write
//! rolls the change back, that each way of tampering with the database is named by
//! `keywarden audit verify` (the real binary, over real HTTP), export, roles and archives.

use std::io::{BufRead, Write};
use std::path::Path;

use keywarden_core::audit_chain::{to_hex, SealedEntry, GENESIS};
use keywarden_core::role::Role;
use keywarden_server::bootstrap::{new_token, TokenSpec};
use keywarden_store::{AuditFilter, AuditOrder};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{eventually, key_body, Backend, TestServer, WAIT};
use crate::on_both_backends;

on_both_backends!(
    lifecycle_writes_exactly_the_expected_entries,
    each_way_of_tampering_is_named,
    failed_audit_write_rolls_the_change_back,
    export_streams_every_entry_and_filters,
    roles_and_bad_queries,
    archive_moves_old_entries_and_verifies_across_files,
    entries_from_before_the_chain_are_sealed_on_open,
    expiry_is_a_recorded_state_change,
    concurrent_changes_keep_one_chain,
    forged_entry_past_the_head_is_named_and_quarantined,
);

async fn cli(s: &TestServer, args: &[&str]) -> (i32, String, String) {
    s.cli(args).await
}

/// `audit verify --json`: exit code and the (kind, seq) of the break, if any.
async fn verify(s: &TestServer, extra: &[&str]) -> (i32, Option<(String, i64)>, Value) {
    let mut args = vec!["audit", "verify", "--json"];
    args.extend_from_slice(extra);
    let (rc, out, err) = cli(s, &args).await;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    let brk = v["break"].as_object().map(|b| {
        (
            b["kind"].as_str().unwrap().to_owned(),
            b["seq"].as_i64().unwrap(),
        )
    });
    (rc, brk, v)
}

async fn all_entries(s: &TestServer) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/audit?limit=1000&cursor={c}"),
            None => "/v1/audit?limit=1000".to_owned(),
        };
        let (status, v) = s.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        out.extend(v["entries"].as_array().unwrap().iter().cloned());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
}

async fn lifecycle_writes_exactly_the_expected_entries(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, secret) = s.create_key(key_body("audited")).await;
    let post = |path: String, body: Value| {
        let s = &s;
        async move {
            let (status, v) = s.post(&path, body).await;
            assert!(status.is_success(), "{path}: {v}");
            v
        }
    };
    post(format!("/v1/keys/{id}/suspend"), json!({"reason": "check"})).await;
    post(format!("/v1/keys/{id}/resume"), json!({})).await;
    let rotated = post(format!("/v1/keys/{id}/rotate"), json!({"grace": "1h"})).await;
    let successor = rotated["key"]["id"].as_str().unwrap().to_owned();
    let successor_secret = rotated["secret"].as_str().unwrap().to_owned();
    post(
        format!("/v1/keys/{successor}/revoke"),
        json!({"reason": "leaked"}),
    )
    .await;
    let (_, t) = s
        .post("/v1/tokens", json!({"name": "ci-audit", "role": "auditor"}))
        .await;
    let token_id = t["token"]["id"].as_str().unwrap().to_owned();
    let token_secret = t["secret"].as_str().unwrap().to_owned();
    post(format!("/v1/tokens/{token_id}/revoke"), json!({})).await;

    let entries = all_entries(&s).await;
    let got: Vec<(i64, &str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["seq"].as_i64().unwrap(),
                e["action"].as_str().unwrap(),
                e["target"].as_str().unwrap(),
            )
        })
        .collect();
    let key = format!("key:{id}");
    let succ = format!("key:{successor}");
    let tok = format!("token:{token_id}");
    let expected: Vec<(i64, &str, &str)> = vec![
        (2, "key.created", &key),
        (3, "key.suspended", &key),
        (4, "key.resumed", &key),
        (5, "key.rotated", &key),
        (6, "key.created", &succ),
        (7, "key.revoked", &succ),
        (8, "token.created", &tok),
        (9, "token.revoked", &tok),
    ];
    assert_eq!(got[0].1, "token.created", "the bootstrap token comes first");
    assert_eq!(got[0].0, 1);
    assert_eq!(&got[1..], expected.as_slice());

    // Every entry names who and from where; the chain links each to the one before.
    let admin_id = entries[1]["actor"].as_str().unwrap().to_owned();
    assert!(admin_id.starts_with("token:"));
    assert_eq!(entries[0]["actor"], "system:bootstrap");
    let mut prev = to_hex(&GENESIS);
    for e in &entries {
        assert_eq!(e["prev_hash"].as_str().unwrap(), prev);
        prev = e["hash"].as_str().unwrap().to_owned();
    }
    for e in &entries[1..] {
        assert_eq!(e["actor"].as_str().unwrap(), admin_id);
        assert_eq!(e["actor_name"], "bootstrap");
        assert_eq!(e["source_ip"], "127.0.0.1");
        assert_eq!(e["user_agent"], "keywarden-tests/1");
        assert!(e["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    }
    assert_eq!(entries[2]["reason"], "check");
    assert_eq!(entries[2]["details"]["state"]["before"], "active");
    assert_eq!(entries[2]["details"]["state"]["after"], "suspended");
    assert_eq!(entries[6]["reason"], "leaked");
    // The key's own history, through the filter.
    let (_, v) = s.get(&format!("/v1/audit?key={id}")).await;
    let actions: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["key.created", "key.suspended", "key.resumed", "key.rotated"]
    );

    // No secret anywhere in the trail, in any export format.
    let text = serde_json::to_string(&entries).unwrap();
    let (rc, csv, _) = cli(&s, &["audit", "export", "--format", "csv"]).await;
    assert_eq!(rc, 0);
    for secret in [&secret, &successor_secret, &token_secret, &s.admin] {
        let tail = &secret[secret.len() - 38..];
        assert!(
            !text.contains(tail) && !csv.contains(tail),
            "a secret reached the trail"
        );
    }
    let (rc, brk, v) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (0, None), "{v}");
    assert_eq!(v["checked"], 9);

    // Each key entry is also an event in the outbox, written with it, in order.
    let store = &s.server.as_ref().unwrap().state.store;
    let events: Vec<(i64, String, String)> = store
        .key_events_after(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.key_id, e.event))
        .collect();
    assert_eq!(
        events,
        [
            (2, id.clone(), "created".to_owned()),
            (3, id.clone(), "suspended".to_owned()),
            (4, id.clone(), "resumed".to_owned()),
            (5, id.clone(), "rotated".to_owned()),
            (6, successor.clone(), "created".to_owned()),
            (7, successor.clone(), "revoked".to_owned()),
        ]
    );
    assert_eq!(store.key_events_after(6, 100).await.unwrap().len(), 1);
    s.stop().await;
}

/// A server with 9 entries (the bootstrap token and 8 keys) and a checkpoint of the last.
async fn trail_of_nine(b: Backend) -> (TestServer, tempfile::TempDir) {
    let s = TestServer::start(b).await;
    for i in 0..8 {
        s.create_key(key_body(&format!("k{i}"))).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let cp = dir.path().join("cp.json");
    let (rc, _, err) = cli(&s, &["audit", "checkpoint", "--out", cp.to_str().unwrap()]).await;
    assert_eq!(rc, 0, "{err}");
    let (rc, brk, _) = verify(&s, &["--checkpoint", cp.to_str().unwrap()]).await;
    assert_eq!((rc, brk), (0, None), "intact before tampering");
    (s, dir)
}

const DATA_COLUMNS: &str =
    "time, actor, actor_name, source_ip, user_agent, request_id, action, target, reason, details, prev_hash, hash";

/// The SQL that writes `e` into `audit_events` behind the server's back.
fn insert_sql(e: &SealedEntry) -> String {
    let q = |v: &str| format!("'{}'", v.replace('\'', "''"));
    let opt = |v: &Option<String>| v.as_deref().map_or("NULL".to_owned(), q);
    format!(
        "INSERT INTO audit_events (seq, {DATA_COLUMNS}) VALUES ({}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {})",
        e.seq,
        keywarden_core::clock::to_millis(e.entry.time),
        q(&e.entry.actor.id),
        q(&e.entry.actor.name),
        opt(&e.entry.actor.source_ip),
        opt(&e.entry.actor.user_agent),
        opt(&e.entry.actor.request_id),
        q(&e.entry.action),
        q(&e.entry.target),
        opt(&e.entry.reason),
        q(&e.entry.details),
        q(&to_hex(&e.prev_hash)),
        q(&to_hex(&e.hash)),
    )
}

/// Writes the chain `entries` over the table and the head, as a careful forger would.
async fn rewrite(s: &TestServer, entries: &[SealedEntry]) {
    let mut sql = vec!["DELETE FROM audit_events".to_owned()];
    for e in entries {
        sql.push(insert_sql(e));
    }
    let last = entries.last().unwrap();
    sql.push(format!(
        "UPDATE audit_head SET seq = {}, hash = '{}'",
        last.seq,
        to_hex(&last.hash)
    ));
    let refs: Vec<&str> = sql.iter().map(String::as_str).collect();
    s.sql(&refs).await;
}

async fn stored(s: &TestServer) -> Vec<SealedEntry> {
    let store = &s.server.as_ref().unwrap().state.store;
    store
        .audit_entries(&AuditFilter::default(), AuditOrder::OldestFirst, None, 1000)
        .await
        .unwrap()
        .0
}

async fn each_way_of_tampering_is_named(b: Backend) {
    // Through a copy: SQLite's subqueries would see the first row already updated.
    let swap = vec![
        "CREATE TEMP TABLE swapped AS SELECT * FROM audit_events WHERE seq IN (4, 5)".to_owned(),
        format!(
            "UPDATE audit_events SET ({DATA_COLUMNS}) = (SELECT {DATA_COLUMNS} FROM swapped o \
             WHERE o.seq = 9 - audit_events.seq) WHERE seq IN (4, 5)"
        ),
    ];
    let cases: Vec<(&str, Vec<String>, &str, i64)> = vec![
        (
            "edit a field",
            vec!["UPDATE audit_events SET reason = 'routine' WHERE seq = 4".into()],
            "altered",
            4,
        ),
        (
            "edit the actor",
            vec!["UPDATE audit_events SET actor = 'token:someoneelse00' WHERE seq = 6".into()],
            "altered",
            6,
        ),
        (
            "delete a row",
            vec!["DELETE FROM audit_events WHERE seq = 5".into()],
            "removed",
            5,
        ),
        (
            "delete a row and renumber",
            vec![
                "DELETE FROM audit_events WHERE seq = 5".into(),
                "UPDATE audit_events SET seq = seq + 1000 WHERE seq > 5".into(),
                "UPDATE audit_events SET seq = seq - 1001 WHERE seq > 1000".into(),
            ],
            "removed",
            5,
        ),
        (
            "insert a row",
            vec![
                "UPDATE audit_events SET seq = seq + 1000 WHERE seq >= 4".into(),
                "UPDATE audit_events SET seq = seq - 999 WHERE seq > 1000".into(),
                format!(
                    "INSERT INTO audit_events (seq, {DATA_COLUMNS}) SELECT 4, {} FROM audit_events WHERE seq = 3",
                    DATA_COLUMNS.replace("target", "'key:forged0000000000'")
                ),
            ],
            "inserted",
            4,
        ),
        ("swap two rows", swap, "reordered", 4),
    ];
    for (what, sql, kind, seq) in cases {
        let (s, dir) = trail_of_nine(b).await;
        let refs: Vec<&str> = sql.iter().map(String::as_str).collect();
        s.sql(&refs).await;
        let cp = dir.path().join("cp.json");
        for extra in [vec![], vec!["--checkpoint", cp.to_str().unwrap()]] {
            let (rc, brk, v) = verify(&s, &extra).await;
            assert_eq!(rc, 1, "{what}: {v}");
            assert_eq!(brk, Some((kind.to_owned(), seq)), "{what}: {v}");
        }
        s.stop().await;
    }

    // Truncation done carefully (the head moved back too) passes a bare walk, and is
    // named by the checkpoint.
    let (s, dir) = trail_of_nine(b).await;
    let kept = stored(&s).await;
    s.sql(&[
        "DELETE FROM audit_events WHERE seq >= 7",
        &format!(
            "UPDATE audit_head SET seq = 6, hash = '{}'",
            to_hex(&kept[5].hash)
        ),
    ])
    .await;
    let (rc, brk, _) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (0, None), "no checkpoint, no way to tell");
    let cp = dir.path().join("cp.json");
    let (rc, brk, v) = verify(&s, &["--checkpoint", cp.to_str().unwrap()]).await;
    assert_eq!((rc, brk), (1, Some(("truncated".into(), 7))), "{v}");
    s.stop().await;

    // Truncation that leaves the head: found without a checkpoint.
    let (s, _dir) = trail_of_nine(b).await;
    s.sql(&["DELETE FROM audit_events WHERE seq >= 8"]).await;
    let (rc, brk, _) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (1, Some(("truncated".into(), 8))));
    s.stop().await;

    // The whole chain replaced by a consistent forgery: only the checkpoint tells.
    let (s, dir) = trail_of_nine(b).await;
    let mut prev = GENESIS;
    let forged: Vec<SealedEntry> = stored(&s)
        .await
        .into_iter()
        .map(|e| {
            let mut entry = e.entry;
            entry.actor.name = "nobody".into();
            let sealed = SealedEntry::seal(e.seq, entry, prev);
            prev = sealed.hash;
            sealed
        })
        .collect();
    rewrite(&s, &forged).await;
    let (rc, brk, _) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (0, None), "a consistent forgery walks clean");
    let cp = dir.path().join("cp.json");
    let (rc, brk, v) = verify(&s, &["--checkpoint", cp.to_str().unwrap()]).await;
    assert_eq!((rc, brk), (1, Some(("replaced".into(), 9))), "{v}");

    // A checkpoint whose signature does not hold is refused, not trusted.
    let mut cpv: Value = serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    cpv["seq"] = json!(3);
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, cpv.to_string()).unwrap();
    let (rc, out, _) = cli(
        &s,
        &["audit", "verify", "--checkpoint", bad.to_str().unwrap()],
    )
    .await;
    assert_eq!(rc, 1);
    assert!(out.contains("signature"), "{out}");
    s.stop().await;
}

async fn failed_audit_write_rolls_the_change_back(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, secret) = s.create_key(key_body("guarded")).await;
    assert_eq!(s.verify_code(&secret).await, "VALID");
    match b {
        Backend::Sqlite => {
            s.sql(&["CREATE TRIGGER audit_down BEFORE INSERT ON audit_events \
                     BEGIN SELECT RAISE(ABORT, 'audit device full'); END"])
                .await
        }
        Backend::Postgres => {
            s.sql(&[
                "CREATE FUNCTION audit_down() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'audit device full'; END $$",
                "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events \
                 FOR EACH ROW EXECUTE FUNCTION audit_down()",
            ])
            .await
        }
    }
    let (status, v) = s
        .post(&format!("/v1/keys/{id}/revoke"), json!({"reason": "x"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "STORE_UNAVAILABLE");
    assert!(
        !v.to_string().contains("audit device full"),
        "no internals leak"
    );
    let (_, key) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(key["state"], "active", "the revocation rolled back");
    assert_eq!(s.verify_code(&secret).await, "VALID");

    let (status, _) = s.post("/v1/keys", key_body("unaudited")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (_, list) = s.get("/v1/keys").await;
    assert_eq!(
        list["keys"].as_array().unwrap().len(),
        1,
        "no key without its entry"
    );
    let (status, _) = s
        .post("/v1/tokens", json!({"name": "t", "role": "auditor"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (_, tokens) = s.get("/v1/tokens").await;
    assert_eq!(tokens["tokens"].as_array().unwrap().len(), 1);

    s.sql(&[match b {
        Backend::Sqlite => "DROP TRIGGER audit_down",
        Backend::Postgres => "DROP TRIGGER audit_down ON audit_events",
    }])
    .await;
    let (status, _) = s
        .post(&format!("/v1/keys/{id}/revoke"), json!({"reason": "x"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    // Only the changes that happened are events: created, then the final revoke.
    let events: Vec<String> = s
        .server
        .as_ref()
        .unwrap()
        .state
        .store
        .key_events_after(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(events, ["created", "revoked"]);
    // The refused writes left no gap in the chain.
    let (rc, brk, v) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (0, None), "{v}");
    assert_eq!(v["checked"], 3);
    assert_eq!(s.verify_code(&secret).await, "REVOKED");
    s.stop().await;
}

async fn export_streams_every_entry_and_filters(b: Backend) {
    let s = TestServer::start(b).await;
    let state = &s.server.as_ref().unwrap().state;
    // 2,500 audited token creations straight through the store: more than one export page.
    let n = 2_500;
    for i in 0..n {
        let (record, _) = new_token(
            &state.hasher,
            "kw",
            TokenSpec {
                name: &format!("bulk-{i}"),
                role: Role::Verifier,
                environments: None,
                created_by: "system:test",
                expires_at: None,
                owner: None,
            },
            crate::harness::START,
        )
        .unwrap();
        let audit = keywarden_core::model::AuditEntry {
            time: crate::harness::START + time::Duration::seconds(i),
            actor: keywarden_core::model::Actor {
                id: "system:test".into(),
                name: if i % 2 == 0 { "even" } else { "odd" }.into(),
                ..Default::default()
            },
            action: "token.created".into(),
            target: format!("token:{}", record.id),
            reason: None,
            details: json!({"n": i}).to_string(),
        };
        state.store.insert_token(&record, &audit).await.unwrap();
    }
    let (rc, out, err) = cli(&s, &["audit", "export"]).await;
    assert_eq!(rc, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as i64, n + 1);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"].as_i64().unwrap(), i as i64 + 1);
    }
    let (rc, csv, _) = cli(&s, &["audit", "export", "--format", "csv"]).await;
    assert_eq!(rc, 0);
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len() as i64, n + 2, "header and every entry");
    assert!(rows[0].starts_with("seq,time,actor,actor_name,"));
    assert!(rows[2].contains(r#""{""n"":0}""#), "{}", rows[2]);

    // Filters: time range (since inclusive, until exclusive), actor name, action prefix.
    let since = crate::harness::START + time::Duration::seconds(100);
    let until = crate::harness::START + time::Duration::seconds(200);
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let (rc, out, _) = cli(
        &s,
        &[
            "audit",
            "export",
            "--since",
            &fmt(since),
            "--until",
            &fmt(until),
            "--actor",
            "odd",
        ],
    )
    .await;
    assert_eq!(rc, 0);
    let got: Vec<i64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["details"]["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(got, (100..200).filter(|i| i % 2 == 1).collect::<Vec<_>>());
    let (_, v) = s.get("/v1/audit?action=token.*&order=desc&limit=3").await;
    let seqs: Vec<i64> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [n + 1, n, n - 1]);
    let (_, v) = s.get("/v1/audit?action=key.*").await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 0);
    let (_, v) = s.get("/v1/audit?action=token_*").await;
    assert_eq!(
        v["entries"].as_array().unwrap().len(),
        0,
        "_ is not a wildcard"
    );

    let (rc, brk, v) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (0, None), "{v}");
    assert_eq!(v["checked"].as_i64().unwrap(), n + 1);
    s.stop().await;
}

async fn roles_and_bad_queries(b: Backend) {
    let s = TestServer::start(b).await;
    let auditor = s.token("auditor", None).await;
    let issuer = s.token("issuer", None).await;
    let verifier = s.token("verifier", None).await;
    let get = |tok: String, path: &'static str| {
        let s = &s;
        async move { s.call(reqwest::Method::GET, path, Some(&tok), None).await.0 }
    };
    for path in ["/v1/audit", "/v1/audit/export", "/v1/audit/chain"] {
        assert_eq!(get(auditor.clone(), path).await, StatusCode::OK, "{path}");
        assert_eq!(
            get(issuer.clone(), path).await,
            StatusCode::FORBIDDEN,
            "{path}"
        );
        assert_eq!(
            get(verifier.clone(), path).await,
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    let (status, cp) = s
        .call(
            reqwest::Method::POST,
            "/v1/audit/checkpoints",
            Some(&auditor),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cp["seq"], 4, "bootstrap and three tokens");
    let (_, chain) = s.get("/v1/audit/chain").await;
    assert_eq!(cp["public_key"], chain["public_key"]);
    assert_eq!(cp["hash"], chain["head_hash"]);
    let archive = json!({"first_seq": 1, "last_seq": 1, "last_hash": "00".repeat(32), "file_sha256": "00".repeat(32)});
    let (status, _) = s
        .call(
            reqwest::Method::POST,
            "/v1/audit/archives",
            Some(&auditor),
            Some(archive.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "archiving is for admins");
    let (status, v) = s.post("/v1/audit/archives", archive).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "ARCHIVE_MISMATCH");
    let (status, v) = s
        .post(
            "/v1/audit/archives",
            json!({"first_seq": 0, "last_seq": -1, "last_hash": "zz", "file_sha256": ""}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["violations"].as_array().unwrap().len(), 4, "{v}");
    let (status, v) = s.post("/v1/audit/checkpoints", json!({"seq": 99})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "AUDIT_ENTRY_NOT_FOUND");

    for (path, code) in [
        ("/v1/audit?since=yesterday", "INVALID_QUERY"),
        ("/v1/audit?order=sideways", "INVALID_QUERY"),
        ("/v1/audit?key=short", "KEY_ID_INVALID"),
        (
            "/v1/audit?key=AAAAAAAAAAAAAAAA&target=key:x",
            "INVALID_QUERY",
        ),
        ("/v1/audit?cursor=-3", "INVALID_CURSOR"),
        ("/v1/audit?limit=0", "INVALID_QUERY"),
        ("/v1/audit?colour=red", "INVALID_QUERY"),
        ("/v1/audit?format=csv", "INVALID_QUERY"),
        ("/v1/audit/export?format=xml", "INVALID_QUERY"),
        ("/v1/audit/export?limit=5", "INVALID_QUERY"),
        ("/v1/audit/export?cursor=x", "INVALID_CURSOR"),
    ] {
        let (status, v) = s.get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["error"]["code"], code, "{path}");
    }
    // A token that names its owner: entries by it name the person.
    let (status, t) = s
        .post(
            "/v1/tokens",
            json!({"name": "deploy-bot", "role": "issuer", "owner": "ivy@example.com"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{t}");
    assert_eq!(t["token"]["owner"], "ivy@example.com");
    let ivy = t["secret"].as_str().unwrap().to_owned();
    let ivy_id = t["token"]["id"].as_str().unwrap().to_owned();
    let (status, k) = s
        .call(
            reqwest::Method::POST,
            "/v1/keys",
            Some(&ivy),
            Some(key_body("by-ivy")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{k}");
    let (_, v) = s
        .get(&format!(
            "/v1/audit?key={}",
            k["key"]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(v["entries"][0]["actor"], format!("token:{ivy_id}"));
    assert_eq!(v["entries"][0]["actor_name"], "ivy@example.com");
    let (_, v) = s.get("/v1/audit?actor=ivy@example.com").await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
    let (_, v) = s.get(&format!("/v1/audit?target=token:{ivy_id}")).await;
    assert_eq!(v["entries"][0]["details"]["owner"], "ivy@example.com");
    let (status, v) = s
        .post(
            "/v1/tokens",
            json!({"name": "x", "role": "issuer", "owner": ""}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");

    let (rc, _, err) = cli(&s, &["audit", "list", "--since", "last tuesday"]).await;
    assert_eq!(rc, 2);
    assert!(err.contains("--since"), "{err}");
    let (rc, _, err) = cli(&s, &["audit", "export", "--format", "xml"]).await;
    assert_eq!(rc, 2);
    assert!(err.contains("jsonl or csv"), "{err}");
    s.stop().await;
}

fn rewrite_archive(path: &Path, edit: impl Fn(usize, String) -> String) {
    let file = std::fs::File::open(path).unwrap();
    let lines: Vec<String> = std::io::BufReader::new(flate2::read::GzDecoder::new(file))
        .lines()
        .map(Result::unwrap)
        .collect();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::default(),
    );
    for (i, l) in lines.into_iter().enumerate() {
        writeln!(gz, "{}", edit(i, l)).unwrap();
    }
    gz.finish().unwrap();
}

async fn archive_moves_old_entries_and_verifies_across_files(b: Backend) {
    let s = TestServer::start(b).await;
    for i in 0..5 {
        s.create_key(key_body(&format!("early-{i}"))).await;
    }
    s.clock.advance(time::Duration::days(400));
    for i in 0..3 {
        s.create_key(key_body(&format!("late-{i}"))).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.jsonl.gz");
    let cutoff = (crate::harness::START + time::Duration::days(200))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (rc, out, err) = cli(
        &s,
        &[
            "--json",
            "audit",
            "archive",
            "--before",
            &cutoff,
            "--out",
            first.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(rc, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["first_seq"].as_i64(), v["last_seq"].as_i64()),
        (Some(1), Some(6))
    );
    // The file is written and the entries are gone from the live table; the archive is
    // itself an audited event.
    let live = all_entries(&s).await;
    assert_eq!(live[0]["seq"], 7);
    let last = live.last().unwrap();
    assert_eq!(last["action"], "audit.archived");
    assert_eq!(last["target"], "audit:1-6");
    let (_, chain) = s.get("/v1/audit/chain").await;
    assert_eq!(chain["archives"][0]["last_seq"], 6);
    assert_eq!(chain["archives"][0]["file_sha256"], v["file_sha256"]);

    let (rc, brk, v) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (0, None), "{v}");
    assert_eq!(v["first_seq"], 7, "{v}");
    assert!(v["notes"][0].as_str().unwrap().contains("archived"));
    let (rc, brk, v) = verify(&s, &["--archive", first.to_str().unwrap()]).await;
    assert_eq!((rc, brk), (0, None), "{v}");
    assert_eq!(
        (v["first_seq"].as_i64(), v["checked"].as_i64()),
        (Some(1), Some(10))
    );

    // Nothing more before the cutoff: no file, nothing removed.
    let again = dir.path().join("again.jsonl.gz");
    let (rc, out, _) = cli(
        &s,
        &[
            "audit",
            "archive",
            "--before",
            &cutoff,
            "--out",
            again.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(rc, 0);
    assert!(out.contains("nothing to archive"), "{out}");
    assert!(!again.exists());
    // An existing file is never overwritten.
    let (rc, _, err) = cli(
        &s,
        &[
            "audit",
            "archive",
            "--before",
            "2030-01-01",
            "--out",
            first.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(rc, 2);
    assert!(err.contains("exists"), "{err}");

    // A second archive continues the first; both together check the whole chain.
    let second = dir.path().join("second.jsonl.gz");
    let (rc, _, err) = cli(
        &s,
        &[
            "audit",
            "archive",
            "--before",
            "2030-01-01",
            "--out",
            second.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(rc, 0, "{err}");
    let (rc, brk, v) = verify(
        &s,
        // Several files after one flag, in any order.
        &[
            "--archive",
            second.to_str().unwrap(),
            first.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!((rc, brk), (0, None), "{v}");
    assert_eq!(v["checked"].as_i64(), Some(11), "{v}");

    // An entry edited inside an archive file is named.
    rewrite_archive(&first, |i, l| {
        if i == 3 {
            l.replace("early-1", "early-X")
        } else {
            l
        }
    });
    let (rc, brk, v) = verify(
        &s,
        &[
            "--archive",
            first.to_str().unwrap(),
            "--archive",
            second.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!((rc, brk), (1, Some(("altered".into(), 3))), "{v}");
    // A trailer that was tampered with is refused.
    rewrite_archive(&second, |_, l| l.replace("\"entries\":", "\"entries\":1"));
    let (rc, out, _) = cli(
        &s,
        &["audit", "verify", "--archive", second.to_str().unwrap()],
    )
    .await;
    assert_eq!(rc, 1, "{out}");
    s.stop().await;
}

async fn entries_from_before_the_chain_are_sealed_on_open(b: Backend) {
    let mut s = TestServer::start(b).await;
    for i in 0..4 {
        s.create_key(key_body(&format!("old-{i}"))).await;
    }
    // As a database written before migration 0003 looks: no hashes, a gap in seq.
    s.sql(&[
        "UPDATE audit_events SET prev_hash = NULL, hash = NULL",
        // Nor an event outbox (migration 0008 comes later still).
        "DELETE FROM key_events",
        "DELETE FROM audit_events WHERE seq = 3",
        "UPDATE audit_events SET details = '{\"b\": 1,  \"a\": [2]}' WHERE seq = 2",
        &format!(
            "UPDATE audit_head SET seq = 0, hash = '{}'",
            to_hex(&GENESIS)
        ),
    ])
    .await;
    s.restart().await;
    let entries = all_entries(&s).await;
    let seqs: Vec<i64> = entries.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4], "renumbered without the gap");
    assert_eq!(entries[1]["details"], json!({"a": [2], "b": 1}));
    let (rc, brk, v) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (0, None), "{v}");
    // Once the chain has started, a row whose hash was removed is tampering: a restart
    // leaves it for verify to name instead of sealing it again.
    s.sql(&["UPDATE audit_events SET hash = NULL, reason = 'hidden' WHERE seq = 2"])
        .await;
    s.restart().await;
    let (rc, brk, v) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (1, Some(("altered".into(), 2))), "{v}");
    let restore = entries[1]["hash"].as_str().unwrap().to_owned();
    s.sql(&[&format!(
        "UPDATE audit_events SET hash = '{restore}', reason = NULL WHERE seq = 2"
    )])
    .await;

    // New entries continue the sealed chain, one at a time or in bulk.
    s.create_key(key_body("new")).await;
    let bulk: Vec<_> = (0..3)
        .map(|i| keywarden_core::model::AuditEntry {
            time: crate::harness::START,
            actor: keywarden_core::model::Actor {
                id: "system:import".into(),
                name: "import".into(),
                ..Default::default()
            },
            action: "key.imported".into(),
            target: format!("key:imported{i}"),
            reason: None,
            details: "{}".into(),
        })
        .collect();
    let store = &s.server.as_ref().unwrap().state.store;
    store.append_audit(&bulk).await.unwrap();
    store.append_audit(&[]).await.unwrap();
    let (rc, brk, v) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (0, None), "{v}");
    assert_eq!(v["checked"], 8);
    assert_eq!(store.audit_head().await.unwrap().0, 8);
    s.stop().await;
}

async fn expiry_is_a_recorded_state_change(b: Backend) {
    let s = TestServer::start_with(b, |c| {
        c.enforcer_interval = std::time::Duration::from_millis(50);
    })
    .await;
    let mut short = key_body("short");
    short["ttl"] = json!("1h");
    let (short_id, short_secret) = s.create_key(short).await;
    let (old_id, _) = s.create_key(key_body("rotated")).await;
    let (status, v) = s
        .post(
            &format!("/v1/keys/{old_id}/rotate"),
            json!({"grace": "10m"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let successor = v["key"]["id"].as_str().unwrap().to_owned();
    s.clock.advance(time::Duration::hours(2));

    let expired = eventually(WAIT, "the enforcer to record both expiries", || async {
        let (_, v) = s.get("/v1/audit?action=key.expired").await;
        let expired = v["entries"].as_array().unwrap().clone();
        if expired.len() >= 2 {
            Ok(expired)
        } else {
            Err(v)
        }
    })
    .await;
    let got: Vec<(&str, &str, &str)> = expired
        .iter()
        .map(|e| {
            (
                e["target"].as_str().unwrap(),
                e["reason"].as_str().unwrap(),
                e["actor"].as_str().unwrap(),
            )
        })
        .collect();
    let (short_t, old_t) = (format!("key:{short_id}"), format!("key:{old_id}"));
    // Soonest end first: the rotated key ended after 10 minutes, the short one after 1h.
    assert_eq!(
        got,
        [
            (old_t.as_str(), "ROTATION_GRACE_ENDED", "system:enforcer"),
            (short_t.as_str(), "TTL_EXPIRED", "system:enforcer"),
        ]
    );
    assert_eq!(expired[1]["details"]["state"]["after"], "expired");
    let (_, key) = s.get(&format!("/v1/keys/{short_id}")).await;
    assert_eq!(key["state"], "expired");
    assert_eq!(key["state_reason"], "TTL_EXPIRED");
    assert_eq!(s.verify_code(&short_secret).await, "EXPIRED");
    let (_, key) = s.get(&format!("/v1/keys/{successor}")).await;
    assert_eq!(key["state"], "active", "the successor lives on");

    // Later passes find nothing more to record.
    for _ in 0..2 {
        let (status, report) = s.post("/v1/enforce", json!({})).await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(report["actions"], json!([]), "{report}");
    }
    let (_, v) = s.get("/v1/audit?action=key.expired").await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 2);
    let (rc, brk, v) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (0, None), "{v}");
    s.stop().await;
}

async fn concurrent_changes_keep_one_chain(b: Backend) {
    let s = std::sync::Arc::new(TestServer::start(b).await);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (id, _) = s.create_key(key_body(&format!("race-{i}"))).await;
            let (status, v) = s
                .post(&format!("/v1/keys/{id}/revoke"), json!({"reason": "race"}))
                .await;
            assert_eq!(status, StatusCode::OK, "{v}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let entries = all_entries(&s).await;
    let seqs: Vec<i64> = entries.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=81).collect::<Vec<_>>(), "no gaps, no duplicates");
    let (rc, brk, v) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (0, None), "{v}");
    assert_eq!(v["checked"], 81);
    let s = std::sync::Arc::into_inner(s).expect("tasks are done");
    s.stop().await;
}

/// A forger appends a correctly chained entry past the stored head. Verify names it
/// (`appended`), every audited write refuses with a message naming the repair, and
/// `audit quarantine` moves it out (kept as evidence, itself audited) so writes go on.
async fn forged_entry_past_the_head_is_named_and_quarantined(b: Backend) {
    let (s, _dir) = trail_of_nine(b).await;
    let (id, secret) = s.create_key(key_body("victim")).await;
    let auditor = s.token("auditor", None).await;
    let entries = stored(&s).await;
    let last = entries.last().unwrap().clone();
    let mut forged_entry = last.entry.clone();
    forged_entry.action = "key.created".to_owned();
    forged_entry.target = "key:forged0000000000".to_owned();
    let forged = SealedEntry::seal(last.seq + 1, forged_entry, last.hash);
    s.sql(&[&insert_sql(&forged)]).await;

    let (rc, brk, v) = verify(&s, &[]).await;
    assert_eq!(
        (rc, brk),
        (1, Some(("appended".to_owned(), forged.seq))),
        "{v}"
    );

    let (status, v) = s
        .post(&format!("/v1/keys/{id}/revoke"), json!({"reason": "test"}))
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["error"]["code"], "AUDIT_TRAIL_TAMPERED", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("keywarden audit quarantine"), "{message}");
    assert_eq!(s.verify_code(&secret).await, "VALID", "nothing was changed");

    // Only an admin may repair.
    let (status, _) = s
        .call(
            reqwest::Method::POST,
            "/v1/audit/quarantine",
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (rc, out, err) = cli(&s, &["audit", "quarantine"]).await;
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains(&forged.seq.to_string()), "{out}");
    let (status, v) = s
        .post(&format!("/v1/keys/{id}/revoke"), json!({"reason": "test"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (rc, brk, v) = verify(&s, &[]).await;
    assert_eq!((rc, brk), (0, None), "{v}");
    let all = all_entries(&s).await;
    let repair = all
        .iter()
        .find(|e| e["action"] == "audit.quarantined")
        .expect("the repair is audited");
    assert_eq!(
        repair["details"]["audit_seqs"],
        json!([forged.seq]),
        "{repair}"
    );
    s.stop().await;
}
