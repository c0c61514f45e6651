//! Every endpoint checks the caller's role: the matrix below is the contract.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{key_body, Backend, TestServer};

crate::on_both_backends!(
    role_matrix,
    unauthenticated_requests_rejected,
    issuer_limited_to_environments
);

const Y: bool = true;
const N: bool = false;

async fn role_matrix(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, secret) = s.create_key(key_body("matrix")).await;
    let tokens = [
        ("admin", s.admin.clone()),
        ("issuer", s.token("issuer", None).await),
        ("auditor", s.token("auditor", None).await),
        ("verifier", s.token("verifier", None).await),
    ];
    let none = "AAAAAAAAAAAAAAAA";
    // (method, path, body, [admin, issuer, auditor, verifier])
    let matrix: Vec<(Method, String, Option<Value>, [bool; 4])> = vec![
        (Method::GET, "/v1/keys".into(), None, [Y, Y, Y, N]),
        (
            Method::POST,
            "/v1/keys".into(),
            Some(key_body("m2")),
            [Y, Y, N, N],
        ),
        (Method::GET, format!("/v1/keys/{id}"), None, [Y, Y, Y, N]),
        (
            Method::GET,
            format!("/v1/keys/{id}/usage"),
            None,
            [Y, Y, Y, N],
        ),
        (
            Method::POST,
            format!("/v1/keys/{id}/suspend"),
            Some(json!({})),
            [Y, Y, N, N],
        ),
        (
            Method::POST,
            format!("/v1/keys/{id}/resume"),
            Some(json!({})),
            [Y, Y, N, N],
        ),
        (
            Method::POST,
            format!("/v1/keys/{id}/rotate"),
            Some(json!({})),
            [Y, Y, N, N],
        ),
        (
            Method::POST,
            format!("/v1/keys/{id}/revoke"),
            Some(json!({})),
            [Y, Y, N, N],
        ),
        (
            Method::POST,
            "/v1/verify".into(),
            Some(json!({"key": secret})),
            [Y, N, N, Y],
        ),
        (Method::GET, "/v1/tokens".into(), None, [Y, N, Y, N]),
        (
            Method::POST,
            "/v1/tokens".into(),
            Some(json!({"name": "x", "role": "auditor"})),
            [Y, N, N, N],
        ),
        (
            Method::POST,
            format!("/v1/tokens/{none}/revoke"),
            None,
            [Y, N, N, N],
        ),
        (Method::GET, "/v1/services".into(), None, [Y, N, Y, N]),
        (
            Method::POST,
            "/v1/services".into(),
            Some(json!({"name": "matrix-svc"})),
            [Y, N, N, N],
        ),
        (
            Method::GET,
            "/v1/services/matrix-svc".into(),
            None,
            [Y, N, Y, N],
        ),
        (
            Method::POST,
            "/v1/services/matrix-svc/test".into(),
            None,
            [Y, N, N, N],
        ),
        (
            Method::POST,
            "/v1/services/matrix-svc/ack".into(),
            Some(json!({"seq": 0})),
            [Y, N, N, Y],
        ),
        (
            Method::DELETE,
            format!("/v1/services/{none}"),
            None,
            [Y, N, N, N],
        ),
        (Method::GET, "/v1/events?wait=0s".into(), None, [Y, N, N, Y]),
        (Method::GET, "/v1/alerts".into(), None, [Y, Y, Y, N]),
        (
            Method::POST,
            "/v1/keys/identify".into(),
            Some(json!({"keys": [secret]})),
            [Y, Y, Y, N],
        ),
        (Method::GET, "/v1/shadow-keys".into(), None, [Y, Y, Y, N]),
        (
            Method::POST,
            "/v1/shadow-keys".into(),
            Some(json!({"shadows": []})),
            [Y, Y, N, N],
        ),
    ];
    for (method, path, body, allowed) in &matrix {
        for ((role, token), ok) in tokens.iter().zip(allowed) {
            let (status, v) = s
                .call(method.clone(), path, Some(token), body.clone())
                .await;
            if *ok {
                assert!(
                    status != StatusCode::FORBIDDEN && status != StatusCode::UNAUTHORIZED,
                    "{role} should be allowed {method} {path}: {status} {v}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{role} must be refused {method} {path}: {v}"
                );
                assert_eq!(v["error"]["code"], "FORBIDDEN");
            }
        }
    }
    // Public routes need no token.
    for path in ["/healthz", "/v1/openapi.json"] {
        let (status, _) = s.call(Method::GET, path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    s.stop().await;
}

async fn unauthenticated_requests_rejected(b: Backend) {
    let s = TestServer::start(b).await;
    let (_, key_secret) = s.create_key(key_body("k")).await;
    let auditor = s.token("auditor", None).await;
    let (st, v) = s
        .post(
            "/v1/tokens",
            json!({"name": "short", "role": "auditor", "ttl": "1h"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let short = v["secret"].as_str().unwrap().to_owned();
    let auditor_id = auditor.split('_').nth(2).unwrap().to_owned();

    let check = |token: Option<String>, why: &'static str| {
        let s = &s;
        async move {
            let (status, v) = s
                .call(Method::GET, "/v1/keys", token.as_deref(), None)
                .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{why}: {v}");
            assert_eq!(v["error"]["code"], "UNAUTHENTICATED");
            assert!(!v.to_string().contains("kw_"), "no token echoed: {v}");
        }
    };
    check(None, "no token").await;
    check(Some("not-a-token".into()), "malformed").await;
    check(Some(key_secret.clone()), "a key is not an admin token").await;
    let mut forged = s.admin.clone();
    forged.replace_range(30..31, if &forged[30..31] == "a" { "b" } else { "a" });
    check(Some(forged), "tampered token").await;

    let (status, _) = s.call(Method::GET, "/v1/keys", Some(&short), None).await;
    assert_eq!(status, StatusCode::OK);
    s.clock.advance(time::Duration::minutes(61));
    check(Some(short), "expired token").await;

    // Every worker thread keeps its own copy of the token it last saw: warm them all.
    for _ in 0..16 {
        let (status, _) = s.call(Method::GET, "/v1/keys", Some(&auditor), None).await;
        assert_eq!(status, StatusCode::OK, "warm the token cache");
    }
    let (st, v) = s
        .post(&format!("/v1/tokens/{auditor_id}/revoke"), json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["revoked_at"].is_string());
    check(Some(auditor), "revoked token, next request").await;
    let (st, v) = s
        .post(&format!("/v1/tokens/{auditor_id}/revoke"), json!({}))
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");

    let (_, list) = s.get("/v1/tokens").await;
    assert!(
        !list.to_string().contains(&s.admin),
        "token list never holds secrets"
    );
    assert_eq!(list["tokens"].as_array().unwrap().len(), 3);
    s.stop().await;
}

async fn issuer_limited_to_environments(b: Backend) {
    let s = TestServer::start(b).await;
    let (prod_id, _) = s.create_key(key_body("prod-key")).await;
    let issuer = s.token("issuer", Some(vec!["dev"])).await;

    let (st, v) = s
        .call(
            Method::POST,
            "/v1/keys",
            Some(&issuer),
            Some(key_body("nope")),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    let mut dev = key_body("dev-key");
    dev["environment"] = json!("dev");
    let (st, v) = s
        .call(Method::POST, "/v1/keys", Some(&issuer), Some(dev))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");

    let (_, list) = s.call(Method::GET, "/v1/keys", Some(&issuer), None).await;
    let envs: Vec<&str> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["environment"].as_str().unwrap())
        .collect();
    assert_eq!(envs, ["dev"]);
    for path in [
        format!("/v1/keys/{prod_id}"),
        format!("/v1/keys/{prod_id}/usage"),
    ] {
        let (st, _) = s.call(Method::GET, &path, Some(&issuer), None).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{path}");
    }
    let (st, _) = s
        .call(
            Method::POST,
            &format!("/v1/keys/{prod_id}/revoke"),
            Some(&issuer),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, key) = s.get(&format!("/v1/keys/{prod_id}")).await;
    assert_eq!(key["state"], "active");

    // Only issuers take environments.
    let (st, v) = s
        .post(
            "/v1/tokens",
            json!({"name": "a", "role": "auditor", "environments": ["dev"]}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    s.stop().await;
}
