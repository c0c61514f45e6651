//! Issue, suspend, resume, rotate, revoke: each change is visible to the very next verify.

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{key_body, Backend, TestServer};

crate::on_both_backends!(
    restart_keeps_keys_tokens_and_usage,
    full_lifecycle,
    rotation_grace_then_expiry,
    invalid_transitions_conflict,
    list_filters_and_paging,
    usage_and_subjects_recorded,
    audit_entries_written
);

async fn full_lifecycle(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, secret) = s.create_key(key_body("ci-deploy")).await;
    assert!(secret.starts_with("kw_prod_"));
    assert_eq!(s.verify_code(&secret).await, "VALID");

    let (st, v) = s
        .post(
            &format!("/v1/keys/{id}/suspend"),
            json!({"reason": "investigating"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "suspended");
    assert_eq!(
        s.verify_code(&secret).await,
        "SUSPENDED",
        "cache must not serve the old state"
    );

    let (st, _) = s.post(&format!("/v1/keys/{id}/resume"), json!({})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s.verify_code(&secret).await, "VALID");

    let (st, v) = s
        .post(
            &format!("/v1/keys/{id}/revoke"),
            json!({"reason": "leaked"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["state"], "revoked");
    assert_eq!(v["state_reason"], "leaked");
    assert_eq!(s.verify_code(&secret).await, "REVOKED");

    let (_, shown) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(shown["state"], "revoked");
    assert!(shown.get("secret").is_none());
    assert!(!shown.to_string().contains(&secret));
    s.stop().await;
}

async fn rotation_grace_then_expiry(b: Backend) {
    let s = TestServer::start(b).await;
    let mut body = key_body("rotating");
    body["metadata"] = json!({"team": "infra"});
    body["allowed_cidrs"] = json!(["10.0.0.0/8"]);
    let (old_id, old_secret) = s.create_key(body).await;

    let (st, v) = s
        .post(&format!("/v1/keys/{old_id}/rotate"), json!({"grace": "1h"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let new_id = v["key"]["id"].as_str().unwrap().to_owned();
    let new_secret = v["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_id, old_id);
    assert_eq!(v["key"]["rotated_from"], old_id.as_str());
    assert_eq!(v["previous"]["rotated_to"], new_id.as_str());
    assert_eq!(v["key"]["metadata"]["team"], "infra");
    assert_eq!(v["key"]["allowed_cidrs"], json!(["10.0.0.0/8"]));
    assert_eq!(v["key"]["owner"], "alice@example.com");

    let ok = |key: &str| json!({"key": key, "source_ip": "10.1.1.1"});
    assert_eq!(
        s.verify(ok(&old_secret)).await["code"],
        "VALID",
        "old key valid during grace"
    );
    assert_eq!(s.verify(ok(&new_secret)).await["code"], "VALID");

    s.clock.advance(time::Duration::minutes(61));
    assert_eq!(
        s.verify(ok(&old_secret)).await["code"],
        "EXPIRED",
        "grace over"
    );
    assert_eq!(s.verify(ok(&new_secret)).await["code"], "VALID");
    let (_, old) = s.get(&format!("/v1/keys/{old_id}")).await;
    assert_eq!(old["state"], "expired");

    // A key cannot be rotated twice, nor once expired.
    let (st, v) = s
        .post(&format!("/v1/keys/{old_id}/rotate"), json!({}))
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "INVALID_STATE");

    // The successor keeps the original 30-day lifetime.
    s.clock.advance(time::Duration::days(30));
    assert_eq!(s.verify(ok(&new_secret)).await["code"], "EXPIRED");
    s.stop().await;
}

async fn invalid_transitions_conflict(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, _) = s.create_key(key_body("k")).await;
    let (st, v) = s.post(&format!("/v1/keys/{id}/resume"), json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "INVALID_STATE");
    s.post(&format!("/v1/keys/{id}/suspend"), json!({})).await;
    let (st, _) = s.post(&format!("/v1/keys/{id}/rotate"), json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT, "a suspended key is not rotated");
    let (st, first) = s
        .post(
            &format!("/v1/keys/{id}/revoke"),
            json!({"reason": "leaked"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    for action in ["suspend", "resume", "rotate"] {
        let (st, _) = s.post(&format!("/v1/keys/{id}/{action}"), json!({})).await;
        assert_eq!(st, StatusCode::CONFLICT, "{action} on a revoked key");
    }
    // Revoke is idempotent: 200, the key as it was, nothing written.
    let (st, again) = s
        .post(&format!("/v1/keys/{id}/revoke"), json!({"reason": "again"}))
        .await;
    assert_eq!(st, StatusCode::OK, "{again}");
    assert_eq!(again["state_changed_at"], first["state_changed_at"]);
    assert_eq!(again["state_reason"], "leaked");
    let (_, v) = s
        .get(&format!("/v1/audit?key={id}&action=key.revoked"))
        .await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 1, "{v}");
    let (rc, out, err) = s.cli(&["key", "revoke", &id]).await;
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("already revoked since"), "{out}");
    s.stop().await;
}

async fn list_filters_and_paging(b: Backend) {
    let s = TestServer::start(b).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut body = key_body(&format!("k{i}"));
        body["environment"] = json!(if i % 2 == 0 { "prod" } else { "dev" });
        body["owner"] = json!(if i < 3 {
            "alice@example.com"
        } else {
            "bob@example.com"
        });
        body["systems"] = json!(if i == 4 {
            vec!["vault", "k8s"]
        } else {
            vec!["github"]
        });
        ids.push(s.create_key(body).await.0);
    }
    s.post(&format!("/v1/keys/{}/revoke", ids[1]), json!({}))
        .await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/keys?limit=2&cursor={c}"),
            None => "/v1/keys?limit=2".to_owned(),
        };
        let (st, v) = s.get(&path).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let page = v["keys"].as_array().unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|k| k["id"].as_str().unwrap().to_owned()));
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    let count = |path: &str| {
        let path = path.to_owned();
        let s = &s;
        async move { s.get(&path).await.1["keys"].as_array().unwrap().len() }
    };
    assert_eq!(count("/v1/keys?environment=dev").await, 2);
    assert_eq!(count("/v1/keys?owner=bob@example.com").await, 2);
    assert_eq!(count("/v1/keys?system=k8s").await, 1);
    assert_eq!(count("/v1/keys?system=github").await, 4);
    assert_eq!(count("/v1/keys?state=revoked").await, 1);
    assert_eq!(count("/v1/keys?state=active").await, 4);
    s.clock.advance(time::Duration::days(31));
    assert_eq!(
        count("/v1/keys?state=expired").await,
        4,
        "expiry is derived from time too"
    );
    assert_eq!(count("/v1/keys?state=active").await, 0);
    s.stop().await;
}

async fn usage_and_subjects_recorded(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, secret) = s.create_key(key_body("enroll")).await;
    for node in ["node-1", "node-2", "node-1"] {
        let v = s
            .verify(json!({"key": secret, "scope": "deploy:write", "subject": node, "source_ip": "192.0.2.7"}))
            .await;
        assert_eq!(v["code"], "VALID");
    }
    let denied = s
        .verify(json!({"key": secret, "scope": "admin:all", "subject": "node-9"}))
        .await;
    assert_eq!(denied["code"], "SCOPE_DENIED");

    let usage = s.wait_for_usage(&id, 4).await;
    let events = usage["events"].as_array().unwrap();
    assert_eq!(events.len(), 4);
    assert_eq!(events[0]["code"], "SCOPE_DENIED", "newest first");
    assert_eq!(events[0]["scope"], "admin:all");
    assert_eq!(events[1]["source_ip"], "192.0.2.7");
    assert_eq!(events[1]["subject"], "node-1");
    assert!(events[1]["user_agent"].as_str().is_some());

    let (_, key) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(key["uses"], 3, "only valid uses count");
    assert_eq!(key["last_used_from"], "192.0.2.7");
    assert!(key["last_used_at"].is_string());
    let subjects: Vec<&str> = key["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["subject"].as_str().unwrap())
        .collect();
    assert_eq!(
        subjects,
        ["node-1", "node-2"],
        "distinct subjects, denied ones excluded"
    );
    s.stop().await;
}

async fn audit_entries_written(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, secret) = s.create_key(key_body("audited")).await;
    s.post(
        &format!("/v1/keys/{id}/suspend"),
        json!({"reason": "check"}),
    )
    .await;
    s.post(&format!("/v1/keys/{id}/resume"), json!({})).await;
    s.post(&format!("/v1/keys/{id}/rotate"), json!({"grace": "0s"}))
        .await;
    s.post(&format!("/v1/keys/{id}/revoke"), json!({"reason": "done"}))
        .await;
    let store = &s.server.as_ref().unwrap().state.store;
    let entries = store.audit_for(&format!("key:{id}")).await.unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "key.created",
            "key.suspended",
            "key.resumed",
            "key.rotated",
            "key.revoked"
        ]
    );
    assert!(entries.iter().all(|e| e.actor.id.starts_with("token:")));
    assert_eq!(entries[1].reason.as_deref(), Some("check"));
    assert!(entries[1].details.contains("\"before\":\"active\""));
    for e in &entries {
        assert!(!e.details.contains(&secret) && !format!("{e:?}").contains(&secret));
    }
    s.stop().await;
}

async fn restart_keeps_keys_tokens_and_usage(b: Backend) {
    let mut s = TestServer::start(b).await;
    let (id, secret) = s.create_key(key_body("durable")).await;
    let verifier = s.token("verifier", None).await;
    let (revoked_id, revoked) = s.create_key(key_body("gone")).await;
    s.post(&format!("/v1/keys/{revoked_id}/revoke"), json!({}))
        .await;
    for _ in 0..5 {
        assert_eq!(s.verify_code(&secret).await, "VALID");
    }
    let token_file = std::fs::read_to_string(s.config.data_dir.join("admin-token")).unwrap();

    assert!(
        !s.restart().await,
        "no second bootstrap token while one is usable"
    );
    assert_eq!(
        std::fs::read_to_string(s.config.data_dir.join("admin-token")).unwrap(),
        token_file
    );
    // The pepper was reloaded: stored hashes still match, tokens still authenticate.
    let (st, v) = s
        .call(
            reqwest::Method::POST,
            "/v1/verify",
            Some(&verifier),
            Some(json!({"key": secret})),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (StatusCode::OK, Some("VALID")));
    assert_eq!(s.verify_code(&revoked).await, "REVOKED");
    // Usage written before the stop is all there, and the new verify lands too.
    s.wait_for_usage(&id, 6).await;
    let (_, key) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(key["uses"], 6);
    s.stop().await;
}
