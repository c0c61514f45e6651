//! Bad input gets a precise 4xx with a stable code, never a panic or a 500.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{key_body, Backend, TestServer};

crate::on_both_backends!(bad_bodies, bad_fields, bad_paths_and_queries);

async fn raw(
    s: &TestServer,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let resp = s
        .http
        .post(s.url(path))
        .bearer_auth(&s.admin)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

async fn bad_bodies(b: Backend) {
    let s = TestServer::start(b).await;
    let cases: Vec<(&str, &str, String, StatusCode, &str)> = vec![
        (
            "/v1/keys",
            "application/json",
            "{\"name\": ".into(),
            StatusCode::BAD_REQUEST,
            "MALFORMED_JSON",
        ),
        (
            "/v1/keys",
            "application/json",
            "[1,2]".into(),
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
        ),
        (
            "/v1/keys",
            "application/json",
            "".into(),
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
        ),
        (
            "/v1/keys",
            "text/plain",
            key_body("x").to_string(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "/v1/verify",
            "application/json",
            "{\"key\": \"k\", \"scopes\": []}".into(),
            StatusCode::BAD_REQUEST,
            "UNKNOWN_FIELD",
        ),
        (
            "/v1/verify",
            "application/json",
            "{\"key\": 5}".into(),
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
        ),
        (
            "/v1/tokens",
            "application/json",
            "{\"name\": \"t\"}".into(),
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
        ),
    ];
    for (path, ct, body, status, expected) in cases {
        let (st, v) = raw(&s, path, ct, body.clone()).await;
        assert_eq!((st, code(&v)), (status, expected), "{path} {body}: {v}");
    }
    // Over 64 KiB.
    let mut big = key_body("big");
    big["description"] = json!("x".repeat(70 * 1024));
    let (st, v) = raw(&s, "/v1/keys", "application/json", big.to_string()).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "BODY_TOO_LARGE")
    );

    // A key put in a wrongly typed field is not echoed back.
    let (_, secret) = s.create_key(key_body("k")).await;
    let mut wrong = key_body("k2");
    wrong["max_uses"] = json!(secret);
    let (st, v) = raw(&s, "/v1/keys", "application/json", wrong.to_string()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(!v.to_string().contains(&secret), "{v}");
    // Nor when it is sent as a field name.
    let (st, v) = raw(
        &s,
        "/v1/verify",
        "application/json",
        format!("{{\"{secret}\": 1}}"),
    )
    .await;
    assert_eq!((st, code(&v)), (StatusCode::BAD_REQUEST, "UNKNOWN_FIELD"));
    assert!(!v.to_string().contains(&secret), "{v}");
    assert!(!v.to_string().contains(&secret[secret.len() - 38..]), "{v}");
    s.stop().await;
}

async fn bad_fields(b: Backend) {
    let s = TestServer::start(b).await;
    let with = |field: &str, value: Value| {
        let mut body = key_body("k");
        body[field] = value;
        body
    };
    let cases = vec![
        (with("scopes", json!(["Deploy:Write"])), "SCOPE_INVALID"),
        (with("scopes", json!([])), "SCOPE_INVALID"),
        (with("scopes", json!(["a:*:b"])), "SCOPE_INVALID"),
        (
            with("allowed_cidrs", json!(["10.0.0.0/33"])),
            "CIDR_INVALID",
        ),
        (
            with("allowed_cidrs", json!(["example.com"])),
            "CIDR_INVALID",
        ),
        (with("ttl", json!("3 weeks")), "DURATION_INVALID"),
        (with("ttl", json!("0d")), "DURATION_INVALID"),
        (with("ttl", json!("366d")), "TTL_TOO_LONG"),
        (
            with("ttl", json!("30d"))
                .as_object()
                .map(|o| {
                    let mut o = o.clone();
                    o.remove("ttl");
                    o.insert("expires_at".into(), json!("2020-01-01T00:00:00Z"));
                    Value::Object(o)
                })
                .unwrap(),
            "FIELD_INVALID",
        ),
        (
            with("expires_at", json!("2027-01-01T00:00:00Z")),
            "FIELD_INVALID",
        ),
        (with("name", json!("")), "FIELD_INVALID"),
        (with("owner", json!("a@b@c")), "FIELD_INVALID"),
        (with("environment", json!("admin")), "FIELD_INVALID"),
        (with("max_uses", json!(0)), "FIELD_INVALID"),
        (with("metadata", json!({"bad key": "v"})), "FIELD_INVALID"),
        (with("systems", json!(["has space"])), "FIELD_INVALID"),
    ];
    for (body, expected) in cases {
        let (st, v) = s.post("/v1/keys", body.clone()).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(code(&v), expected, "{body}: {v}");
        assert!(!v["error"]["violations"].as_array().unwrap().is_empty());
    }
    // Every violation is reported at once.
    let mut many = key_body("k");
    many["scopes"] = json!(["BAD"]);
    many["allowed_cidrs"] = json!(["nope"]);
    many["ttl"] = json!("forever");
    let (st, v) = s.post("/v1/keys", many).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(code(&v), "VALIDATION_FAILED");
    let fields = crate::harness::violation_fields(&v);
    assert_eq!(fields, ["scopes", "allowed_cidrs", "ttl"]);

    // Verify rejects malformed request fields with 422, not a verdict.
    for (body, expected) in [
        (json!({"key": "k", "scope": "db:*"}), "SCOPE_INVALID"),
        (
            json!({"key": "k", "source_ip": "300.1.1.1"}),
            "FIELD_INVALID",
        ),
        (json!({"key": "k", "environment": "PROD"}), "FIELD_INVALID"),
        (json!({"key": "k", "subject": ""}), "FIELD_INVALID"),
    ] {
        let (st, v) = s.post("/v1/verify", body.clone()).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::UNPROCESSABLE_ENTITY, expected),
            "{body}: {v}"
        );
    }
    for (body, expected) in [
        (json!({"name": "t", "role": "root"}), "FIELD_INVALID"),
        (
            json!({"name": "t", "role": "auditor", "ttl": "1y"}),
            "DURATION_INVALID",
        ),
    ] {
        let (st, v) = s.post("/v1/tokens", body.clone()).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::UNPROCESSABLE_ENTITY, expected),
            "{body}: {v}"
        );
    }
    let (id, _) = s.create_key(key_body("k")).await;
    let (st, v) = s
        .post(&format!("/v1/keys/{id}/rotate"), json!({"grace": "soon"}))
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "DURATION_INVALID")
    );
    let (st, v) = s
        .post(
            &format!("/v1/keys/{id}/revoke"),
            json!({"reason": "x", "force": true}),
        )
        .await;
    assert_eq!((st, code(&v)), (StatusCode::BAD_REQUEST, "UNKNOWN_FIELD"));
    s.stop().await;
}

async fn bad_paths_and_queries(b: Backend) {
    let s = TestServer::start(b).await;
    let cases = vec![
        (
            Method::GET,
            "/v1/keys/AAAAAAAAAAAAAAAA",
            StatusCode::NOT_FOUND,
            "KEY_NOT_FOUND",
        ),
        (
            Method::GET,
            "/v1/keys/not-an-id",
            StatusCode::BAD_REQUEST,
            "KEY_ID_INVALID",
        ),
        (
            Method::POST,
            "/v1/keys/AAAAAAAAAAAAAAAA/revoke",
            StatusCode::NOT_FOUND,
            "KEY_NOT_FOUND",
        ),
        (
            Method::GET,
            "/v1/keys/AAAAAAAAAAAAAAAA/usage",
            StatusCode::NOT_FOUND,
            "KEY_NOT_FOUND",
        ),
        (
            Method::POST,
            "/v1/tokens/AAAAAAAAAAAAAAAA/revoke",
            StatusCode::NOT_FOUND,
            "TOKEN_NOT_FOUND",
        ),
        (
            Method::GET,
            "/v1/keys?env=prod",
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY",
        ),
        (
            Method::GET,
            "/v1/keys?state=dead",
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY",
        ),
        (
            Method::GET,
            "/v1/keys?limit=0",
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY",
        ),
        (
            Method::GET,
            "/v1/keys?limit=x",
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY",
        ),
        (
            Method::GET,
            "/v1/keys?cursor=abc",
            StatusCode::BAD_REQUEST,
            "INVALID_CURSOR",
        ),
        (
            Method::GET,
            "/v1/nothing",
            StatusCode::NOT_FOUND,
            "ROUTE_NOT_FOUND",
        ),
        (
            Method::DELETE,
            "/v1/keys",
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
        ),
    ];
    for (method, path, status, expected) in cases {
        let body = (method == Method::POST).then(|| json!({}));
        let (st, v) = s.call(method.clone(), path, Some(&s.admin), body).await;
        assert_eq!((st, code(&v)), (status, expected), "{method} {path}: {v}");
    }
    s.stop().await;
}
