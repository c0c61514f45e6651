//! Every verify code that applies today, and exact usage caps under concurrency.

use keywarden_core::key_format::{assemble, parse};
use keywarden_core::KeyId;
use serde_json::json;

use crate::harness::{eventually, key_body, Backend, TestServer, WAIT};

crate::on_both_backends!(
    codes,
    one_time_key_is_exact_under_concurrency,
    capped_key_counts_exactly,
    source_from_peer_and_trusted_proxy,
    expired_cache_entries_follow_the_store,
    verifier_tokens_bound_to_environments_and_required_scopes,
);

/// A verifier token limited to `prod` answers ENVIRONMENT_MISMATCH for keys of other
/// environments even when the request names none; a policy can require a scope on
/// verify per environment.
async fn verifier_tokens_bound_to_environments_and_required_scopes(b: Backend) {
    let s = TestServer::start(b).await;
    let (_, prod) = s.create_key(key_body("prod-key")).await;
    let mut body = key_body("dev-key");
    body["environment"] = json!("dev");
    let (_, dev) = s.create_key(body).await;
    let gw = s.token("verifier", Some(vec!["prod"])).await;
    let code = |token: String, body: serde_json::Value| {
        let s = &s;
        async move {
            let (st, v) = s
                .call(
                    reqwest::Method::POST,
                    "/v1/verify",
                    Some(&token),
                    Some(body),
                )
                .await;
            assert_eq!(st, reqwest::StatusCode::OK, "{v}");
            v["code"].as_str().unwrap().to_owned()
        }
    };
    assert_eq!(code(gw.clone(), json!({"key": prod})).await, "VALID");
    assert_eq!(
        code(gw.clone(), json!({"key": dev})).await,
        "ENVIRONMENT_MISMATCH"
    );
    assert_eq!(
        code(gw.clone(), json!({"key": dev, "environment": "dev"})).await,
        "ENVIRONMENT_MISMATCH",
        "the request cannot widen the token"
    );
    // Only issuers and verifiers are limited to environments.
    let (st, v) = s
        .post(
            "/v1/tokens",
            json!({"name": "aud", "role": "auditor", "environments": ["prod"]}),
        )
        .await;
    assert_eq!(st, reqwest::StatusCode::UNPROCESSABLE_ENTITY, "{v}");

    let (st, v) = s
        .call(
            reqwest::Method::PUT,
            "/v1/policy",
            Some(&s.admin),
            Some(json!({"policy": "[environments.prod]\nrequire_scope_on_verify = true\n"})),
        )
        .await;
    assert_eq!(st, reqwest::StatusCode::OK, "{v}");
    assert_eq!(code(gw.clone(), json!({"key": prod})).await, "SCOPE_DENIED");
    assert_eq!(
        code(gw.clone(), json!({"key": prod, "scope": "deploy:write"})).await,
        "VALID"
    );
    assert_eq!(
        code(s.admin.clone(), json!({"key": dev})).await,
        "VALID",
        "dev is not bound"
    );
    s.stop().await;
}

async fn codes(b: Backend) {
    let s = TestServer::start(b).await;
    let mut body = key_body("codes");
    body["allowed_cidrs"] = json!(["10.0.0.0/8", "2001:db8::/32"]);
    let (_, secret) = s.create_key(body).await;
    let at = |extra: serde_json::Value| {
        let mut v = json!({"key": secret, "source_ip": "10.2.3.4"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };

    let ok = s
        .verify(at(
            json!({"scope": "db:orders:read", "environment": "prod"}),
        ))
        .await;
    assert_eq!(ok["valid"], true);
    assert_eq!(ok["code"], "VALID");
    assert_eq!(ok["owner"], "alice@example.com");
    assert_eq!(ok["environment"], "prod");
    assert_eq!(ok["scopes"], json!(["db:*", "deploy:write"]));
    assert!(ok["expires_at"].is_string());
    assert!(ok.get("remaining_uses").is_none());

    for (extra, expected) in [
        (json!({"scope": "deploy:read"}), "SCOPE_DENIED"),
        (json!({"scope": "db"}), "SCOPE_DENIED"),
        (json!({"environment": "dev"}), "ENVIRONMENT_MISMATCH"),
        (json!({"source_ip": "11.0.0.1"}), "SOURCE_DENIED"),
        (json!({"source_ip": "2001:db8::1"}), "VALID"),
    ] {
        assert_eq!(
            s.verify(at(extra.clone())).await["code"],
            expected,
            "{extra}"
        );
    }
    let denied = s.verify(at(json!({"source_ip": "11.0.0.1"}))).await;
    assert_eq!(denied["valid"], false);
    assert!(denied.get("owner").is_none(), "denials reveal no metadata");

    assert_eq!(s.verify_code("kw_prod_garbage").await, "MALFORMED");
    assert_eq!(s.verify_code("").await, "MALFORMED");
    let mut typo = secret.clone().into_bytes();
    typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
    assert_eq!(
        s.verify_code(&String::from_utf8(typo).unwrap()).await,
        "MALFORMED",
        "checksum catches typos"
    );

    // Well-formed keys that keywarden never issued: an unknown id, and a known id with a
    // forged secret (valid checksum, wrong hash).
    let parsed = parse(&secret, "kw").unwrap();
    let unknown = assemble(
        "kw",
        "prod",
        KeyId::parse("AAAAAAAAAAAAAAAA").unwrap(),
        &"x".repeat(32),
    );
    assert_eq!(s.verify_code(unknown.plain.expose()).await, "NOT_FOUND");
    let forged = assemble("kw", "prod", parsed.id.clone(), &"y".repeat(32));
    let v = s
        .verify(json!({"key": forged.plain.expose(), "source_ip": "10.0.0.1"}))
        .await;
    assert_eq!(v["code"], "NOT_FOUND");
    assert!(v.get("key_id").is_none());
    let other_prefix = assemble("acme", "prod", parsed.id, &"y".repeat(32));
    assert_eq!(
        s.verify_code(other_prefix.plain.expose()).await,
        "MALFORMED"
    );
    assert_eq!(
        s.verify_code(&s.admin).await,
        "NOT_FOUND",
        "admin tokens are not keys"
    );

    s.clock.advance(time::Duration::days(30));
    assert_eq!(s.verify(at(json!({}))).await["code"], "EXPIRED");
    s.stop().await;
}

async fn one_time_key_is_exact_under_concurrency(b: Backend) {
    let s = TestServer::start(b).await;
    let mut body = key_body("one-time");
    body["max_uses"] = json!(1);
    let (id, secret) = s.create_key(body).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let http = s.http.clone();
        let url = s.url("/v1/verify");
        let admin = s.admin.clone();
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            let v: serde_json::Value = http
                .post(url)
                .bearer_auth(admin)
                .json(&json!({"key": secret, "subject": format!("node-{i}")}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["code"].as_str().unwrap().to_owned()
        }));
    }
    let mut valid = 0;
    let mut exhausted = 0;
    for t in tasks {
        match t.await.unwrap().as_str() {
            "VALID" => valid += 1,
            "USAGE_EXHAUSTED" => exhausted += 1,
            other => panic!("unexpected code {other}"),
        }
    }
    assert_eq!((valid, exhausted), (1, 49));
    let usage = s.wait_for_usage(&id, 50).await;
    assert_eq!(
        usage["events"].as_array().unwrap().len(),
        50,
        "every verify is a usage event"
    );
    let (_, key) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(key["uses"], 1);
    assert_eq!(key["remaining_uses"], 0);
    assert_eq!(
        key["subjects"].as_array().unwrap().len(),
        1,
        "only the enrolment that succeeded"
    );
    s.stop().await;
}

async fn capped_key_counts_exactly(b: Backend) {
    let s = TestServer::start(b).await;
    let mut body = key_body("capped");
    body["max_uses"] = json!(3);
    let (_, secret) = s.create_key(body).await;
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let v = s.verify(json!({"key": secret})).await;
        assert_eq!(v["code"], "VALID");
        remaining.push(v["remaining_uses"].as_u64().unwrap());
    }
    assert_eq!(remaining, [2, 1, 0]);
    assert_eq!(s.verify_code(&secret).await, "USAGE_EXHAUSTED");
    s.stop().await;
}

async fn source_from_peer_and_trusted_proxy(b: Backend) {
    // Loopback is trusted here, so X-Forwarded-For from the test client is believed.
    let s = TestServer::start_with(b, |c| {
        c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()]
    })
    .await;
    let (id, secret) = s.create_key(cidr_key_body()).await;
    assert_eq!(verify_forwarded(&s, &secret, "203.0.113.9").await, "VALID");
    assert_eq!(
        verify_forwarded(&s, &secret, "198.51.100.1, 127.0.0.1").await,
        "SOURCE_DENIED"
    );
    let usage = s.wait_for_usage(&id, 2).await;
    assert_eq!(usage["events"][0]["source_ip"], "198.51.100.1");
    s.stop().await;

    // Without trusted proxies the peer address (loopback) is the source: XFF is ignored.
    let s = TestServer::start(b).await;
    let (_, secret) = s.create_key(cidr_key_body()).await;
    assert_eq!(
        verify_forwarded(&s, &secret, "203.0.113.9").await,
        "SOURCE_DENIED"
    );
    s.stop().await;
}

fn cidr_key_body() -> serde_json::Value {
    let mut body = key_body("cidr");
    body["allowed_cidrs"] = json!(["203.0.113.0/24"]);
    body
}

/// Verifies `secret` with an `X-Forwarded-For` header; returns the code.
async fn verify_forwarded(s: &TestServer, secret: &str, xff: &str) -> String {
    let v: serde_json::Value = s
        .http
        .post(s.url("/v1/verify"))
        .bearer_auth(&s.admin)
        .header("x-forwarded-for", xff)
        .json(&json!({"key": secret}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["code"].as_str().unwrap().to_owned()
}

/// A stalled store must not let verdicts out unrecorded: with the queue full for a second,
/// verify answers 503; once the store is free again, every answered verify is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_fails_closed_when_usage_cannot_be_written() {
    use sqlx::Connection;
    let s = TestServer::start_with(Backend::Sqlite, |c| c.usage_queue_capacity = 2).await;
    let (id, secret) = s.create_key(key_body("stalled")).await;
    assert_eq!(s.verify_code(&secret).await, "VALID");
    s.wait_for_usage(&id, 1).await;

    // Another process-like connection takes SQLite's write lock and holds it.
    let db = s.config.data_dir.join("keywarden.db");
    let mut blocker = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut blocker)
        .await
        .unwrap();
    // One verify first, and the writer taking it off the queue: it then holds it in a
    // batch it retries until the lock is free, and takes nothing more. Otherwise a
    // writer still draining could take all twelve below into its batch.
    assert_eq!(s.verify_code(&secret).await, "VALID");
    let queue = &s.state().usage;
    eventually(
        WAIT,
        "the usage writer to take the queued event",
        || async { queue.capacity() == queue.max_capacity() },
    )
    .await;

    let mut tasks = Vec::new();
    for _ in 0..12 {
        let http = s.http.clone();
        let url = s.url("/v1/verify");
        let admin = s.admin.clone();
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(admin)
                .json(&json!({"key": secret}))
                .send()
                .await
                .unwrap();
            (
                resp.status().as_u16(),
                resp.json::<serde_json::Value>().await.unwrap(),
            )
        }));
    }
    let mut answered = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, v) => {
                assert_eq!(v["code"], "VALID");
                answered += 1;
            }
            (503, v) => {
                assert_eq!(v["error"]["code"], "STORE_UNAVAILABLE");
                refused += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(refused > 0, "a stalled store must refuse some verifies");
    assert!(
        answered <= 2,
        "only the queue's room (2) can be answered while the writer is stalled: {answered}"
    );
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    drop(blocker);

    let usage = s.wait_for_usage(&id, 2 + answered).await;
    assert_eq!(
        usage["events"].as_array().unwrap().len(),
        2 + answered,
        "every answered verify is stored, no refused one is"
    );
    s.stop().await;
}

/// The verify cache's entry for `id` if it is fresh at the server's time.
fn fresh_entry(s: &TestServer, id: &str) -> std::sync::Arc<keywarden_server::cache::CachedKey> {
    use keywarden_core::clock::Clock;
    s.state()
        .keys
        .get(&KeyId::parse(id).unwrap(), s.clock.now())
        .flatten()
        .expect("a fresh cache entry")
}

/// Past its lifetime (the cache runs on the server's clock), a cache entry is renewed in
/// place when the stored key is unchanged, and loaded again when it changed behind this
/// node's back (another process, a restore).
async fn expired_cache_entries_follow_the_store(b: Backend) {
    const TTL: std::time::Duration = std::time::Duration::from_secs(60);
    // Lifetimes are jittered up to +20%.
    let outlived = time::Duration::seconds(90);
    let s = TestServer::start_with(b, |c| c.verify_cache_ttl = TTL).await;
    let (id, secret) = s.create_key(key_body("renewed")).await;
    // Not evicted under the test by this node's own change coming back through sync.
    s.caught_up().await;
    assert_eq!(s.verify_code(&secret).await, "VALID");
    let loaded = fresh_entry(&s, &id);
    for _ in 0..3 {
        s.clock.advance(outlived);
        assert_eq!(s.verify_code(&secret).await, "VALID");
        // A reload would answer VALID too; the entry itself tells them apart.
        assert!(
            std::sync::Arc::ptr_eq(&loaded, &fresh_entry(&s, &id)),
            "the stale entry was loaded again instead of renewed"
        );
    }
    s.wait_for_usage(&id, 4).await;

    let elsewhere = keywarden_store::Store::connect(&s.config.database_url())
        .await
        .unwrap();
    let mut key = elsewhere
        .get_key(&KeyId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    key.state = keywarden_core::model::KeyState::Suspended;
    let audit = keywarden_core::model::AuditEntry {
        time: crate::harness::START,
        actor: keywarden_core::model::Actor {
            id: "system:test".into(),
            name: "elsewhere".into(),
            ..Default::default()
        },
        action: "key.suspended".into(),
        target: format!("key:{id}"),
        reason: None,
        details: "{}".into(),
    };
    assert!(elsewhere.update_key_state(&key, &audit).await.unwrap());
    s.clock.advance(outlived);
    assert_eq!(s.verify_code(&secret).await, "SUSPENDED");
    s.stop().await;
}

/// A renewed entry takes in the uses other nodes recorded: a key used through another
/// node on day 29 is not idle on day 31 here, though this node last answered for it on
/// day 0. PostgreSQL only: it is the backend several nodes share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_entry_counts_uses_through_other_nodes() {
    let Some(b) = crate::harness::postgres_or_skip() else {
        return;
    };
    let s = TestServer::start(b).await;
    let mut body = key_body("shared");
    body["ttl"] = json!("90d");
    let (id, secret) = s.create_key(body).await;
    // This node hears of its own change through the cluster channel too, and evicts
    // the key again; wait for that, so the entry cached next stays.
    s.caught_up().await;
    assert_eq!(s.verify_code(&secret).await, "VALID");
    let loaded = fresh_entry(&s, &id);
    let other_node = keywarden_store::Store::connect(&s.config.database_url())
        .await
        .unwrap();
    let day_29 = crate::harness::START + time::Duration::days(29);
    let use_elsewhere = keywarden_core::model::UsageEvent {
        key_id: Some(KeyId::parse(&id).unwrap()),
        time: day_29,
        code: keywarden_core::verify::VerifyCode::Valid,
        source_ip: Some("192.0.2.77".parse().unwrap()),
        scope: None,
        environment: None,
        subject: None,
        user_agent: None,
        counted: false,
    };
    let (_, written) = other_node.record_usage(vec![use_elsewhere]).await;
    written.unwrap();
    // Thirty-one days outlive any cache lifetime: the entry is stale, and renewed.
    s.clock.advance(time::Duration::days(31));
    assert_eq!(s.verify_code(&secret).await, "VALID");
    assert!(
        std::sync::Arc::ptr_eq(&loaded, &fresh_entry(&s, &id)),
        "renewed in place, not loaded again"
    );
    s.stop().await;
}

/// On PostgreSQL, cache entries in use are renewed before they end, in batches, with no
/// verify asking: an unchanged key's entry stays fresh (the same entry, not reloaded)
/// however far the clock moves, and a key changed behind this node's back is left to
/// end and be loaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_renews_cache_entries_ahead_in_batches() {
    use keywarden_core::clock::Clock;
    use keywarden_server::cache::Lookup;
    let Some(b) = crate::harness::postgres_or_skip() else {
        return;
    };
    // Lifetimes of 0.96-1.44 s of the test clock; entries ending within 0.3 s are renewed.
    let s = TestServer::start_with(b, |c| {
        c.verify_cache_ttl = std::time::Duration::from_millis(1_200)
    })
    .await;
    let (kept_id, kept) = s.create_key(key_body("kept")).await;
    let (changed_id, changed) = s.create_key(key_body("changed")).await;
    s.caught_up().await;
    assert_eq!(s.verify_code(&kept).await, "VALID");
    assert_eq!(s.verify_code(&changed).await, "VALID");
    let loaded = fresh_entry(&s, &kept_id);
    let kept_key = KeyId::parse(&kept_id).unwrap();
    let fresh_ahead = |id: &KeyId| {
        let at = s.clock.now() + time::Duration::milliseconds(300);
        matches!(s.state().keys.lookup(id, at), Lookup::Fresh(Some(_)))
    };
    let changed_key = KeyId::parse(&changed_id).unwrap();
    let mut passes = s.state().progress.renewal_passes.subscribe();
    // Moves the clock a step shorter than the renewal window, then waits for two whole
    // passes that began after it: every entry within the window at the step is renewed.
    let mut step = || {
        s.clock.advance(time::Duration::milliseconds(250));
        let seen = *passes.borrow_and_update();
        let mut passes = passes.clone();
        async move {
            crate::harness::signalled(WAIT, "two renewal passes", async move {
                passes.wait_for(|n| *n >= seen + 2).await.map(|_| ())
            })
            .await
            .unwrap();
        }
    };
    // 3 s in steps: far past any lifetime.
    for _ in 0..12 {
        step().await;
        assert!(fresh_ahead(&kept_key), "renewed ahead of its end");
        assert!(fresh_ahead(&changed_key), "renewed ahead of its end");
    }
    assert!(
        std::sync::Arc::ptr_eq(&loaded, &fresh_entry(&s, &kept_id)),
        "renewed in place, not loaded again"
    );

    // A change written around keywarden: no audit entry, so no sync eviction.
    s.sql(&[&format!(
        "UPDATE keys SET version = version + 1 WHERE id = '{changed_id}'"
    )])
    .await;
    for _ in 0..8 {
        step().await;
        assert!(fresh_ahead(&kept_key), "the unchanged entry renewed ahead");
    }
    assert!(
        matches!(
            s.state().keys.lookup(&changed_key, s.clock.now()),
            Lookup::Stale(..)
        ),
        "an entry whose key changed is not renewed"
    );
    // Verify loads the changed key again.
    assert_eq!(s.verify_code(&changed).await, "VALID");
}
