//! Admin tokens: a lifetime the policy can cap, and when each was last used.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{eventually, Backend, TestServer, WAIT};
use crate::on_both_backends;

on_both_backends!(tokens_have_a_capped_lifetime_and_a_last_use);

async fn token_list(s: &TestServer) -> Vec<Value> {
    let (st, v) = s.get("/v1/tokens").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["tokens"].as_array().unwrap().clone()
}

async fn tokens_have_a_capped_lifetime_and_a_last_use(b: Backend) {
    let s = TestServer::start(b).await;
    let (st, v) = s
        .call(
            reqwest::Method::PUT,
            "/v1/policy",
            Some(&s.admin),
            Some(json!({"policy": "[default]\nmax_token_ttl = \"30d\"\n"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = s
        .post(
            "/v1/tokens",
            json!({"name": "ci", "role": "issuer", "ttl": "90d"}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "TTL_TOO_LONG", "{v}");
    let (st, v) = s
        .post("/v1/tokens", json!({"name": "ci", "role": "issuer"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(
        v["token"]["expires_at"], "2026-07-01T12:00:00Z",
        "no TTL asked: the policy's maximum"
    );
    assert_eq!(v["token"]["last_used_at"], Value::Null);
    let secret = v["secret"].as_str().unwrap().to_owned();
    let id = v["token"]["id"].as_str().unwrap().to_owned();
    // In an environment section it would mean nothing: refused.
    let (st, v) = s
        .call(
            reqwest::Method::PUT,
            "/v1/policy",
            Some(&s.admin),
            Some(json!({"policy": "[environments.prod]\nmax_token_ttl = \"30d\"\n"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");

    s.clock.advance(time::Duration::hours(1));
    let (st, _) = s
        .call(reqwest::Method::GET, "/v1/keys", Some(&secret), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    // The use is recorded off the request path; wait for it (bounded).
    let last_used = eventually(WAIT, "the token's use to be recorded", || async {
        let tokens = token_list(&s).await;
        let t = tokens.iter().find(|t| t["id"] == id.as_str()).unwrap();
        (!t["last_used_at"].is_null()).then(|| t["last_used_at"].clone())
    })
    .await;
    assert_eq!(last_used, "2026-06-01T13:00:00Z");
    let (rc, out, err) = s.cli(&["token", "list"]).await;
    assert_eq!(rc, 0, "{err}");
    assert!(
        out.contains("LAST USED") && out.contains("2026-06-01T13:00:00Z"),
        "{out}"
    );
    s.stop().await;
}
