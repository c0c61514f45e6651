//! Issue 5: connected services. Signed webhooks from the outbox, retries that survive a
//! restart, per-key order, propagation on the key, pull services with /v1/events and
//! acks, the outbound address guard.

use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{eventually, key_body, signalled, Backend, TestServer, WAIT};
use crate::on_both_backends;
use crate::receiver::Receiver;

pub async fn start(b: Backend) -> TestServer {
    TestServer::start_with(b, |c| {
        c.outbound_allow = vec!["127.0.0.0/8".parse().unwrap()];
        c.dispatch_poll = Duration::from_millis(50);
        c.webhook_backoff = Duration::from_secs(1);
        c.webhook_backoff_cap = Duration::from_secs(3600);
    })
    .await
}

/// Registers a service; returns (id, secret bytes).
pub async fn add_service(s: &TestServer, body: Value) -> (String, Vec<u8>) {
    let (st, v) = s.post("/v1/services", body).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    if v["service"]["webhook_url"].is_null() {
        assert!(
            v.get("secret").is_none(),
            "a pull service signs nothing: {v}"
        );
        return (v["service"]["id"].as_str().unwrap().to_owned(), Vec::new());
    }
    let secret = v["secret"].as_str().unwrap();
    let b64 = secret
        .strip_prefix("whsec_")
        .expect("Standard Webhooks secret");
    (
        v["service"]["id"].as_str().unwrap().to_owned(),
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
}

/// Polls the key until `f` holds for its propagation.
pub async fn wait_propagation(s: &TestServer, id: &str, f: impl Fn(&Value) -> bool) -> Value {
    let path = format!("/v1/keys/{id}");
    eventually(
        WAIT,
        &format!("the propagation of {id} to reach the expected state"),
        || async {
            let (_, k) = s.get(&path).await;
            if f(&k["propagation"]) {
                Ok(k["propagation"].clone())
            } else {
                Err(k["propagation"].clone())
            }
        },
    )
    .await
}

/// Waits until the dispatcher has made two more passes, so at least one began after
/// this call and every delivery it would start is counted; returns how many
/// deliveries have been started so far. What a pass did not start, it found not due.
async fn after_two_dispatcher_passes(s: &TestServer) -> u64 {
    let mut dispatch = s.state().progress.dispatch.subscribe();
    let from = dispatch.borrow_and_update().passes;
    let progress = signalled(
        WAIT,
        "two more dispatcher passes",
        dispatch.wait_for(|p| p.passes >= from + 2),
    )
    .await
    .expect("the server is running");
    progress.started
}

async fn change(s: &TestServer, id: &str, action: &str) {
    let (st, v) = s.post(&format!("/v1/keys/{id}/{action}"), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

async fn webhooks_are_signed_ordered_and_confirmed(b: Backend) {
    let s = start(b).await;
    let r = Receiver::start().await;
    let (sid, secret) = add_service(&s, json!({ "name": "edge-gw", "webhook_url": r.url })).await;
    let (_, v) = s.get(&format!("/v1/services/{sid}")).await;
    assert_eq!(
        v["events"],
        json!(["alert", "expire", "revoke", "rotate", "suspend"])
    );
    let (id, _) = s.create_key(key_body("signed")).await;
    for action in ["suspend", "resume", "revoke"] {
        change(&s, &id, action).await;
    }
    let got = r.wait_for(3, 10).await;
    let types: Vec<&str> = got
        .iter()
        .map(|g| g.json["type"].as_str().unwrap())
        .collect();
    // `created` is not in the default subscription; the rest arrive in order.
    assert_eq!(types, ["key.suspended", "key.resumed", "key.revoked"]);
    let mut last_seq = 0;
    for g in &got {
        let seq = g.json["data"]["seq"].as_i64().unwrap();
        assert!(seq > last_seq);
        last_seq = seq;
        assert_eq!(g.id, format!("evt_{seq}"));
        let ts: i64 = g.timestamp.parse().unwrap();
        assert_eq!(
            g.signature,
            keywarden_core::webhook::sign(&secret, &g.id, ts, &g.body),
            "signature must verify with the secret shown at registration"
        );
        let mut wrong = secret.clone();
        wrong[0] ^= 1;
        assert_ne!(
            g.signature,
            keywarden_core::webhook::sign(&wrong, &g.id, ts, &g.body)
        );
        assert_eq!(g.json["data"]["key_id"], id);
        assert_eq!(g.json["data"]["key"]["environment"], "prod");
        assert_eq!(g.json["data"]["key"]["owner"], "alice@example.com");
    }
    assert_eq!(got[2].json["data"]["details"]["state"]["after"], "revoked");
    let p = wait_propagation(&s, &id, |p| p["confirmed"] == 1).await;
    assert_eq!(p["event"], "revoked");
    assert_eq!(p["total"], 1);
    assert_eq!(p["services"][0]["service"], "edge-gw");
    assert_eq!(p["services"][0]["state"], "confirmed");
    assert!(p["services"][0]["confirmed_at"].is_string());
    let (_, v) = s.get(&format!("/v1/services/{sid}")).await;
    assert_eq!(v["deliveries"]["confirmed"], 3, "{v}");
    assert_eq!(v["recent"][0]["event"], "revoked");
    // The secret is shown once and is nowhere else: not in the audit trail, not in the DB.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&secret);
    let (_, audit) = s.get("/v1/audit?action=service.*").await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1);
    let (_, all) = s.get("/v1/audit?limit=1000").await;
    assert!(!all.to_string().contains(&b64));
    let (_, list) = s.get("/v1/services").await;
    assert!(!list.to_string().contains(&b64));
    s.stop().await;
}

async fn failing_deliveries_retry_in_order_and_survive_a_restart(b: Backend) {
    let mut s = start(b).await;
    let r = Receiver::start().await;
    r.answer(503);
    let (sid, _) = add_service(&s, json!({ "name": "flaky", "webhook_url": r.url })).await;
    let (id, _) = s.create_key(key_body("retried")).await;
    change(&s, &id, "suspend").await;
    change(&s, &id, "revoke").await;
    r.wait_for(1, 10).await;
    // The first event failed; the second waits behind it (per-key order).
    let recent = eventually(WAIT, "the first delivery to be failing", || async {
        let (_, v) = s.get(&format!("/v1/services/{sid}")).await;
        if v["recent"][1]["state"] == "failing" {
            Ok(v["recent"].clone())
        } else {
            Err(v)
        }
    })
    .await;
    assert_eq!(recent[1]["event"], "suspended", "{recent}");
    assert_eq!(recent[1]["last_error"], "HTTP 503");
    assert_eq!(recent[1]["attempts"], 1);
    assert!(recent[1]["next_attempt_at"].is_string());
    assert_eq!(recent[0]["event"], "revoked");
    assert_eq!(recent[0]["state"], "pending");
    assert_eq!(recent[0]["attempts"], 0);
    // The test's clock stands still, so the backoff never ends: passes that start
    // nothing are the dispatcher holding the retry back, and the second event with it.
    let started = after_two_dispatcher_passes(&s).await;
    assert_eq!(
        after_two_dispatcher_passes(&s).await,
        started,
        "no retry before the backoff, nothing out of order"
    );
    assert_eq!(r.received().len(), 1);
    let p = wait_propagation(&s, &id, |p| p["event"] == "revoked").await;
    assert_eq!(p["confirmed"], 0);
    assert_eq!(p["services"][0]["state"], "pending");

    // Deliveries live in the database: a restart loses none.
    s.restart().await;
    r.answer(200);
    s.clock.advance(time::Duration::hours(2));
    let got = r.wait_for(3, 10).await;
    let types: Vec<&str> = got
        .iter()
        .map(|g| g.json["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["key.suspended", "key.suspended", "key.revoked"]);
    // A retry is the same message: receivers deduplicate on webhook-id.
    assert_eq!(got[0].id, got[1].id);
    let p = wait_propagation(&s, &id, |p| p["confirmed"] == 1).await;
    assert_eq!(p["services"][0]["state"], "confirmed");
    s.stop().await;
}

async fn deliveries_are_abandoned_when_the_retry_window_ends(b: Backend) {
    let s = TestServer::start_with(b, |c| {
        c.outbound_allow = vec!["127.0.0.0/8".parse().unwrap()];
        c.dispatch_poll = Duration::from_millis(50);
        c.webhook_retry_for = Duration::from_secs(24 * 3600);
    })
    .await;
    let r = Receiver::start().await;
    r.answer(500);
    add_service(&s, json!({ "name": "gone", "webhook_url": r.url })).await;
    let (id, _) = s.create_key(key_body("abandoned")).await;
    change(&s, &id, "revoke").await;
    wait_propagation(&s, &id, |p| p["services"][0]["state"] == "failing").await;
    // Still retried within the window...
    s.clock.advance(time::Duration::hours(23));
    r.wait_for(2, 10).await;
    let p = wait_propagation(&s, &id, |p| p["services"][0]["attempts"] == 2).await;
    assert_eq!(p["services"][0]["state"], "failing");
    // ...and given up after it.
    s.clock.advance(time::Duration::hours(2));
    let p = wait_propagation(&s, &id, |p| p["services"][0]["state"] == "abandoned").await;
    assert_eq!(p["services"][0]["attempts"], 3);
    assert!(p["services"][0]["next_attempt_at"].is_null());
    s.stop().await;
}

async fn private_addresses_are_refused_unless_allowed(b: Backend) {
    let s = TestServer::start_with(b, |c| c.dispatch_poll = Duration::from_millis(50)).await;
    let r = Receiver::start().await;
    for (url, why) in [
        ("http://127.0.0.1:9/hook", "private, loopback"),
        (
            "http://169.254.169.254/latest/meta-data",
            "private, loopback",
        ),
        ("http://[::1]/hook", "private, loopback"),
        ("ftp://example.com/hook", "only http and https"),
        ("not a url", "not a URL"),
        ("https://user:pw@example.com/hook", "user name or password"),
    ] {
        let (st, v) = s
            .post("/v1/services", json!({ "name": "bad", "webhook_url": url }))
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {v}");
        let d = &v["error"]["violations"][0];
        assert_eq!(d["code"], "WEBHOOK_URL_INVALID", "{v}");
        assert!(d["message"].as_str().unwrap().contains(why), "{url}: {v}");
    }
    let (st, v) = s
        .post(
            "/v1/services",
            json!({ "name": "bad name!", "events": ["revoked"] }),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["violations"].as_array().unwrap().len(), 2, "{v}");
    // A name is checked when it resolves: localhost is loopback.
    let sneaky = r.url.replace("127.0.0.1", "localhost");
    let (sid, _) = add_service(&s, json!({ "name": "sneaky", "webhook_url": sneaky })).await;
    let (st, v) = s
        .post(
            "/v1/services",
            json!({ "name": "sneaky", "webhook_url": sneaky }),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    let (id, _) = s.create_key(key_body("guarded")).await;
    change(&s, &id, "revoke").await;
    let p = wait_propagation(&s, &id, |p| p["services"][0]["state"] == "failing").await;
    let err = p["services"][0]["last_error"].as_str().unwrap();
    assert!(err.contains("private, loopback"), "{err}");
    let (st, v) = s.post(&format!("/v1/services/{sid}/test"), json!({})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["delivered"], false);
    assert!(v["error"].as_str().unwrap().contains("private, loopback"));
    assert!(
        r.received().is_empty(),
        "nothing may reach a refused address"
    );
    // Tokens in webhook URLs (Slack, Discord) are shown cut and never audited.
    let (sid, _) = add_service(
        &s,
        json!({ "name": "slackish", "webhook_url": "https://hooks.example.com/services/T0123456789ABCDEFGH/s3cr3tpart?token=qu3rys3cr3t" }),
    )
    .await;
    let (_, v) = s.get(&format!("/v1/services/{sid}")).await;
    assert_eq!(
        v["webhook_url"],
        "https://hooks.example.com/services/T012***/s3cr3tpart"
    );
    let (_, list) = s.get("/v1/services").await;
    let (_, audit) = s.get("/v1/audit?action=service.created").await;
    for text in [list.to_string(), audit.to_string()] {
        assert!(
            !text.contains("qu3rys3cr3t") && !text.contains("0123456789ABCDEFGH"),
            "{text}"
        );
    }
    assert!(audit.to_string().contains("https://hooks.example.com"));
    s.stop().await;
}

async fn pull_services_read_events_and_acknowledge(b: Backend) {
    // Event readers poll the outbox only every 30 s: within the test's bounds, only the
    // wake-up on a write can answer a waiting long poll.
    let s = TestServer::start_with(b, |c| {
        c.dispatch_poll = Duration::from_millis(50);
        c.events_poll = Duration::from_secs(30);
    })
    .await;
    let verifier = s.token("verifier", None).await;
    let issuer = s.token("issuer", None).await;
    let (sid, _) = add_service(&s, json!({ "name": "cache-gw" })).await;
    let (id, key) = s.create_key(key_body("pulled")).await;
    let get = |path: String, token: String| {
        let http = s.http.clone();
        let url = s.url(&path);
        async move {
            let resp = http.get(url).bearer_auth(token).send().await.unwrap();
            let st = resp.status();
            (st, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (st, page) = get("/v1/events?after=0&wait=0s".into(), verifier.clone()).await;
    assert_eq!(st, StatusCode::OK, "{page}");
    let head = page["next"].as_i64().unwrap();
    assert!(page["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "key.created" && e["key_id"] == id));
    let (st, _) = get("/v1/events".into(), issuer.clone()).await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    // A long poll returns as soon as the revocation commits. The revocation waits until
    // the poll has read the outbox and is waiting, so its first read cannot answer it.
    let mut waiters = s.state().progress.event_waiters.subscribe();
    let poll = tokio::spawn(get(
        format!("/v1/events?after={head}&wait=20s"),
        verifier.clone(),
    ));
    signalled(
        WAIT,
        "the long poll to wait for a change",
        waiters.wait_for(|n| *n == 1),
    )
    .await
    .unwrap();
    change(&s, &id, "revoke").await;
    let (st, page) = signalled(
        Duration::from_secs(5),
        "the waiting long poll to be woken by the revocation",
        poll,
    )
    .await
    .unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(page["events"][0]["type"], "key.revoked", "{page}");
    let revoked_seq = page["events"][0]["seq"].as_i64().unwrap();
    assert_eq!(page["next"], revoked_seq);

    // Server-Sent Events, resumed with Last-Event-ID.
    let resp = s
        .http
        .get(s.url("/v1/events"))
        .bearer_auth(&verifier)
        .header("accept", "text/event-stream")
        .header("last-event-id", head.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut resp = resp;
    let mut text = String::new();
    let read = async {
        while let Some(chunk) = resp.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains("\n\n") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap();
    assert!(text.contains(&format!("id: {revoked_seq}\n")), "{text}");
    assert!(text.contains("event: key.revoked\n"), "{text}");

    // The gateway uses the key once more: the verify is refused and an alert follows.
    assert_eq!(s.verify_code(&key).await, "REVOKED");

    // Propagation waits for the ack.
    let p = wait_propagation(&s, &id, |p| p["event"] == "revoked").await;
    assert_eq!(p["services"][0]["state"], "pending");
    let ack = |seq: i64, token: String| {
        let http = s.http.clone();
        let url = s.url(&format!("/v1/services/{sid}/ack"));
        async move {
            let resp = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({ "seq": seq }))
                .send()
                .await
                .unwrap();
            let st = resp.status();
            (st, resp.json::<Value>().await.unwrap())
        }
    };
    let (st, v) = ack(revoked_seq + 1000, verifier.clone()).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (st, _) = ack(revoked_seq, issuer.clone()).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, v) = ack(revoked_seq, verifier.clone()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["acked_seq"], revoked_seq);
    let p = wait_propagation(&s, &id, |p| p["confirmed"] == 1).await;
    assert_eq!(p["services"][0]["service"], "cache-gw");
    let (st, v) = s.post("/v1/services/nope/ack", json!({ "seq": 1 })).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "SERVICE_NOT_FOUND");
    for bad in [
        "after=-1",
        "wait=2m",
        "wait=soon",
        "events=revoked",
        "limit=0",
        "bogus=1",
    ] {
        let (st, v) = get(format!("/v1/events?{bad}"), verifier.clone()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["error"]["code"], "INVALID_QUERY", "{bad}: {v}");
    }
    // A category filter skips other events but still moves the cursor.
    let (_, page) = get("/v1/events?after=0&wait=0s&events=revoke".into(), verifier).await;
    let events = page["events"].as_array().unwrap();
    assert!(events.iter().all(|e| e["type"] == "key.revoked"), "{page}");
    assert!(page["next"].as_i64().unwrap() >= revoked_seq);
    // Removing a service is audited and drops it from propagation.
    let resp = s
        .http
        .delete(s.url(&format!("/v1/services/{sid}")))
        .bearer_auth(&s.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let (_, k) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(k["propagation"]["total"], 0);
    let (_, audit) = s.get("/v1/audit?action=service.removed").await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1);
    s.stop().await;
}

on_both_backends!(
    webhooks_are_signed_ordered_and_confirmed,
    failing_deliveries_retry_in_order_and_survive_a_restart,
    deliveries_are_abandoned_when_the_retry_window_ends,
    private_addresses_are_refused_unless_allowed,
    pull_services_read_events_and_acknowledge,
);
