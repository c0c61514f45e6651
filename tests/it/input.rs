//! Bad input gets a precise 4xx with a stable code, never a panic or a 500.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{key_body, Backend, TestServer};

crate::on_both_backends!(
    bad_bodies,
    bad_fields,
    bad_paths_and_queries,
    bodies_must_be_objects,
    keys_in_fields_are_refused,
    csv_export_defuses_formulas
);

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

    // A key put in a wrongly typed field is refused as a key (keys_in_fields_are_refused),
    // and a near miss (a checksum that does not match) is not echoed back either.
    let (_, secret) = s.create_key(key_body("k")).await;
    let near_miss = format!(
        "{}{}",
        &secret[..secret.len() - 1],
        if secret.ends_with('A') { 'B' } else { 'A' }
    );
    for (value, status, expected) in [
        (&secret, StatusCode::UNPROCESSABLE_ENTITY, "SECRET_IN_FIELD"),
        (&near_miss, StatusCode::BAD_REQUEST, "INVALID_BODY"),
    ] {
        let mut wrong = key_body("k2");
        wrong["max_uses"] = json!(value);
        let (st, v) = raw(&s, "/v1/keys", "application/json", wrong.to_string()).await;
        assert_eq!((st, code(&v)), (status, expected), "{v}");
        assert!(!v.to_string().contains(value.as_str()), "{v}");
        assert!(!v.to_string().contains(&value[value.len() - 38..]), "{v}");
    }
    // Nor when it is sent as a field name.
    for (value, status, expected) in [
        (&secret, StatusCode::UNPROCESSABLE_ENTITY, "SECRET_IN_FIELD"),
        (&near_miss, StatusCode::BAD_REQUEST, "UNKNOWN_FIELD"),
    ] {
        let (st, v) = raw(
            &s,
            "/v1/verify",
            "application/json",
            format!("{{\"{value}\": 1}}"),
        )
        .await;
        assert_eq!((st, code(&v)), (status, expected), "{v}");
        assert!(!v.to_string().contains(value.as_str()), "{v}");
        assert!(!v.to_string().contains(&value[value.len() - 38..]), "{v}");
    }
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

/// A JSON array (or any non-object) is not a request body, even where serde would read
/// a struct from a sequence of its fields in order.
async fn bodies_must_be_objects(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, _) = s.create_key(key_body("k")).await;
    let positional = json!([
        "n",
        "alice@example.com",
        "prod",
        ["github"],
        ["deploy:write"]
    ]);
    let cases = [
        ("/v1/keys".to_owned(), positional.to_string()),
        (format!("/v1/keys/{id}/revoke"), "[]".to_owned()),
        (format!("/v1/keys/{id}/suspend"), "[\"why\"]".to_owned()),
        (format!("/v1/keys/{id}/rotate"), "[\"0s\"]".to_owned()),
        ("/v1/verify".to_owned(), "[\"kw_prod_x\"]".to_owned()),
        ("/v1/tokens".to_owned(), "[\"t\", \"admin\"]".to_owned()),
        ("/v1/audit/checkpoints".to_owned(), "[]".to_owned()),
        ("/v1/keys/identify".to_owned(), "[[]]".to_owned()),
        (
            "/v1/owners".to_owned(),
            "[\"dora@example.com\", \"Dora\"]".to_owned(),
        ),
        ("/v1/keys".to_owned(), "\"text\"".to_owned()),
        ("/v1/keys".to_owned(), "5".to_owned()),
        (format!("/v1/keys/{id}/revoke"), "null".to_owned()),
        (format!("/v1/keys/{id}/revoke"), " true ".to_owned()),
    ];
    for (path, body) in cases {
        let (st, v) = raw(&s, &path, "application/json", body.clone()).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::BAD_REQUEST, "INVALID_BODY"),
            "{path} {body}: {v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("JSON object"),
            "{v}"
        );
    }
    // Nothing happened: one key, still active, no owner registered.
    let (_, v) = s.get("/v1/keys").await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["keys"][0]["state"], "active");
    let (_, v) = s.get("/v1/owners").await;
    assert!(
        v["owners"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["registered"] == false),
        "only the key's owner, unregistered: {v}"
    );
    // An object still works, and an optional body may still be empty.
    let (st, v) = raw(
        &s,
        &format!("/v1/keys/{id}/suspend"),
        "application/json",
        "",
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    s.stop().await;
}

/// The secret of a key, and its secret part alone (what a log line might keep).
fn key_texts(key: &str) -> [String; 2] {
    [key.to_owned(), key[key.len() - 38..].to_owned()]
}

fn assert_not_echoed(v: &Value, keys: &[&str]) {
    let text = v.to_string();
    for k in keys {
        for t in key_texts(k) {
            assert!(!text.contains(&t), "echoed: {text}");
        }
    }
}

/// One of our keys (any prefix, any field, any depth) is refused with SECRET_IN_FIELD
/// naming the field, never echoed, and so never stored or audited; except where a key
/// belongs (`/v1/verify`'s `key`, `/v1/keys/identify`'s `keys`).
async fn keys_in_fields_are_refused(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, key) = s.create_key(key_body("k")).await;
    let foreign = keywarden_core::key_format::generate(&mut rand::rngs::OsRng, "acme", "dev")
        .unwrap()
        .plain
        .expose()
        .to_owned();
    let admin = s.admin.clone();
    let secrets = [key.as_str(), foreign.as_str(), admin.as_str()];
    let with = |field: &str, value: Value| {
        let mut body = key_body("k2");
        body[field] = value;
        body
    };
    let cases = vec![
        (with("systems", json!(["github", key])), "systems[1]"),
        (with("metadata", json!({"note": key})), "metadata.note"),
        (with("metadata", json!({ key.as_str(): "x" })), "metadata"),
        (
            with("description", json!(format!("ours: {key}; keep it"))),
            "description",
        ),
        (with("description", json!(foreign)), "description"),
        (with("description", json!(admin)), "description"),
        (with("allowed_cidrs", json!([key])), "allowed_cidrs[0]"),
        (with("ttl", json!(key)), "ttl"),
        (with("scopes", json!(["deploy:write", key])), "scopes[1]"),
        (with("name", json!(key)), "name"),
        (with("owner", json!(key)), "owner"),
        (with("max_uses", json!(key)), "max_uses"),
    ];
    for (body, field) in cases {
        let (st, v) = s.post("/v1/keys", body.clone()).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::UNPROCESSABLE_ENTITY, "SECRET_IN_FIELD"),
            "{body}: {v}"
        );
        assert_eq!(crate::harness::violation_fields(&v), [field], "{v}");
        assert_not_echoed(&v, &secrets);
    }
    // Hidden behind JSON escapes, it is still found.
    let escaped = key_body("k3").to_string().replacen(
        "\"ttl\":\"30d\"",
        &format!("\"description\":\"{}\"", key.replace('_', "\\u005f")),
        1,
    );
    assert!(escaped.contains("\\u005f"), "{escaped}");
    let (st, v) = raw(&s, "/v1/keys", "application/json", escaped).await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "SECRET_IN_FIELD"),
        "{v}"
    );

    // Reasons, owners, tokens, services, policy text.
    let posts = vec![
        (
            format!("/v1/keys/{id}/revoke"),
            json!({"reason": format!("see {key}")}),
            "reason",
        ),
        (
            format!("/v1/keys/{id}/suspend"),
            json!({"reason": key}),
            "reason",
        ),
        (
            format!("/v1/keys/{id}/rotate"),
            json!({"grace": key}),
            "grace",
        ),
        (
            "/v1/owners".to_owned(),
            json!({"identity": "dora@example.com", "display_name": key}),
            "display_name",
        ),
        (
            "/v1/tokens".to_owned(),
            json!({"name": "t", "role": "auditor", "ttl": key}),
            "ttl",
        ),
        (
            "/v1/services".to_owned(),
            json!({"name": "edge", "webhook_url": format!("https://edge.example/?k={key}")}),
            "webhook_url",
        ),
        (
            "/v1/verify".to_owned(),
            json!({"key": key, "subject": key}),
            "subject",
        ),
    ];
    for (path, body, field) in posts {
        let (st, v) = s.post(&path, body.clone()).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::UNPROCESSABLE_ENTITY, "SECRET_IN_FIELD"),
            "{path} {body}: {v}"
        );
        assert_eq!(crate::harness::violation_fields(&v), [field], "{v}");
        assert_not_echoed(&v, &secrets);
    }
    let (st, v) = s
        .call(
            Method::PUT,
            "/v1/policy",
            Some(&s.admin),
            Some(json!({"policy": format!("[default]\nmax_ttl = \"{key}\"\n")})),
        )
        .await;
    assert_eq!(
        (st, code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "SECRET_IN_FIELD"),
        "{v}"
    );
    assert_eq!(crate::harness::violation_fields(&v), ["policy"]);
    assert_not_echoed(&v, &secrets);

    // Path segments and query parameters, of any route.
    for (method, path, field) in [
        (Method::GET, format!("/v1/owners/{key}"), "identity"),
        (
            Method::POST,
            format!("/v1/owners/{key}/disable"),
            "identity",
        ),
        (Method::GET, format!("/v1/keys/{key}"), "id"),
        (Method::GET, format!("/v1/keys?owner={key}"), "owner"),
        (
            Method::GET,
            format!("/v1/keys?owner=x%20{}", key.replace('_', "%5F")),
            "owner",
        ),
        (Method::GET, format!("/v1/audit?actor={key}"), "actor"),
        (Method::GET, format!("/v1/services/{key}"), "id"),
    ] {
        let (st, v) = s.call(method.clone(), &path, Some(&s.admin), None).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::UNPROCESSABLE_ENTITY, "SECRET_IN_FIELD"),
            "{method} {path}: {v}"
        );
        assert_eq!(crate::harness::violation_fields(&v), [field], "{v}");
        assert_not_echoed(&v, &secrets);
    }

    // SCIM bodies too, in SCIM's shape.
    let idp = s.token("scim", None).await;
    let resp = s
        .http
        .post(s.url("/scim/v2/Users"))
        .bearer_auth(&idp)
        .header("content-type", "application/scim+json")
        .body(json!({"userName": "erin@example.com", "displayName": key}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["scimType"], "invalidValue", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("displayName"), "{v}");
    assert_not_echoed(&v, &secrets);

    // Where a key belongs, it is taken.
    assert_eq!(s.verify_code(&key).await, "VALID");
    let (st, v) = s.post("/v1/keys/identify", json!({"keys": [key]})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["results"][0]["key_id"], id.as_str());

    // A key in a header the trail keeps (User-Agent, X-Request-Id) is kept redacted.
    let resp = s
        .http
        .post(s.url(&format!("/v1/keys/{id}/suspend")))
        .bearer_auth(&s.admin)
        .header("user-agent", format!("curl {key}"))
        .header("x-request-id", key.as_str())
        .json(&json!({"reason": "check"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (st, v) = s.post(&format!("/v1/keys/{id}/resume"), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    // Nothing of it was stored: not the key, not the audit trail.
    let (_, v) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(v["state"], "active", "{v}");
    let (_, v) = s.get("/v1/keys").await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 1, "{v}");
    let trail = s
        .http
        .get(s.url("/v1/audit/export"))
        .bearer_auth(&s.admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(trail.lines().count() >= 4, "{trail}");
    assert!(trail.contains("\"curl <redacted>\""), "{trail}");
    for k in secrets {
        for t in key_texts(k) {
            assert!(
                !trail.contains(&t),
                "a key reached the audit trail: {trail}"
            );
        }
    }
    s.stop().await;
}

/// Cells an attacker controls (reasons, user agents, request ids) cannot become
/// spreadsheet formulas in the CSV export (OWASP: a leading `'`); the JSON lines export,
/// which `audit verify` reads, keeps them as they were.
async fn csv_export_defuses_formulas(b: Backend) {
    let s = TestServer::start(b).await;
    let reasons = [
        "=1+2",
        "+SUM(A1)",
        "-2+3",
        "@cmd",
        "=HYPERLINK(\"http://x\",\"y\")",
    ];
    for (i, reason) in reasons.iter().enumerate() {
        let (id, _) = s.create_key(key_body(&format!("k{i}"))).await;
        let resp = s
            .http
            .post(s.url(&format!("/v1/keys/{id}/revoke")))
            .bearer_auth(&s.admin)
            .header("user-agent", format!("=ua{i}"))
            .header("x-request-id", format!("+rid{i}"))
            .json(&json!({ "reason": reason }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let csv = s
        .http
        .get(s.url("/v1/audit/export?format=csv"))
        .bearer_auth(&s.admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (i, reason) in reasons.iter().enumerate() {
        let cell = if reason.contains('"') {
            format!(",\"'{}\",", reason.replace('"', "\"\""))
        } else {
            format!(",'{reason},")
        };
        assert!(csv.contains(&cell), "{cell} missing from {csv}");
        assert!(csv.contains(&format!(",'=ua{i},")), "{csv}");
        assert!(csv.contains(&format!(",'+rid{i},")), "{csv}");
    }
    // No cell starts with a formula character.
    for line in csv.lines().skip(1) {
        for cell in line.split(',') {
            let cell = cell.trim_start_matches('"');
            assert!(
                !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
                "{cell:?} in {line}"
            );
        }
    }
    // The JSON lines export is unchanged, and the chain still verifies from it.
    let jsonl = s
        .http
        .get(s.url("/v1/audit/export"))
        .bearer_auth(&s.admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in reasons {
        assert!(
            jsonl.contains(&serde_json::to_string(reason).unwrap()),
            "{reason} in {jsonl}"
        );
    }
    let (rc, out, err) = s.cli(&["audit", "verify"]).await;
    assert_eq!(rc, 0, "{out}{err}");
    s.stop().await;
}

async fn send(
    s: &TestServer,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Option<(&str, String)>,
) -> (StatusCode, String, Value) {
    let mut req = s.http.request(method, s.url(path));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if let Some((ct, b)) = body {
        req = req.header("content-type", ct).body(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = resp.text().await.unwrap();
    (
        status,
        ct,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Every error the router answers (a body over the limit on SCIM, a path that is not
/// UTF-8, a URI too long, no route, a wrong method) has a JSON body with a code; SCIM's
/// in SCIM's own shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_with_a_code() {
    let s = TestServer::start(Backend::Sqlite).await;
    let admin = format!("Bearer {}", s.admin);
    let long = format!("/v1/keys?owner={}", "a".repeat(20 * 1024));
    let cases = [
        (
            Method::GET,
            "/v1/keys/%FF%FE".to_owned(),
            StatusCode::BAD_REQUEST,
            "INVALID_PATH",
        ),
        (
            Method::GET,
            "/v1/owners/%C3%28".to_owned(),
            StatusCode::BAD_REQUEST,
            "INVALID_PATH",
        ),
        (
            Method::POST,
            "/v1/owners/%FF/disable".to_owned(),
            StatusCode::BAD_REQUEST,
            "INVALID_PATH",
        ),
        (
            Method::GET,
            "/v1/services/%FF".to_owned(),
            StatusCode::BAD_REQUEST,
            "INVALID_PATH",
        ),
        (Method::GET, long, StatusCode::URI_TOO_LONG, "URI_TOO_LONG"),
        (
            Method::GET,
            "/v1/nothing/%FF".to_owned(),
            StatusCode::NOT_FOUND,
            "ROUTE_NOT_FOUND",
        ),
        (
            Method::PATCH,
            "/v1/keys".to_owned(),
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
        ),
    ];
    for (method, path, status, expected) in cases {
        let (st, ct, v) = send(&s, method.clone(), &path, Some(&admin), None).await;
        assert_eq!(
            (st, code(&v)),
            (status, expected),
            "{method} {}: {v}",
            &path[..path.len().min(80)]
        );
        assert!(ct.starts_with("application/json"), "{ct}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
    }
    // SCIM: a body over the limit, a path that is not UTF-8, a bad query.
    let idp = format!("Bearer {}", s.token("scim", None).await);
    let big =
        json!({"userName": "a@example.com", "displayName": "x".repeat(70 * 1024)}).to_string();
    for (method, path, body, status) in [
        (
            Method::POST,
            "/scim/v2/Users",
            Some(big),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            Method::GET,
            "/scim/v2/Users/%FF",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/scim/v2/Users?count=many",
            None,
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let body = body.map(|b| ("application/scim+json", b));
        let (st, ct, v) = send(&s, method.clone(), path, Some(&idp), body).await;
        assert_eq!(st, status, "{method} {path}: {v}");
        assert!(ct.starts_with("application/scim+json"), "{path}: {ct}");
        assert_eq!(
            v["schemas"][0], "urn:ietf:params:scim:api:messages:2.0:Error",
            "{v}"
        );
        assert_eq!(v["status"], status.as_u16().to_string(), "{v}");
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{v}");
    }
    s.stop().await;
}

/// `Bearer` is case-insensitive (RFC 9110 §11.1, RFC 6750).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let s = TestServer::start(Backend::Sqlite).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} {}", s.admin);
        let (st, _, v) = send(&s, Method::GET, "/v1/keys", Some(&auth), None).await;
        assert_eq!(st, StatusCode::OK, "{scheme}: {v}");
    }
    for bad in [
        format!("Basic {}", s.admin),
        format!("Bearer{}", s.admin),
        s.admin.clone(),
    ] {
        let (st, _, v) = send(&s, Method::GET, "/v1/keys", Some(&bad), None).await;
        assert_eq!(
            (st, code(&v)),
            (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
            "{v}"
        );
    }
    s.stop().await;
}

/// A caller without the permission gets 403 (and no caller 401) before any check of the
/// path, query or body: on every route of the OpenAPI document, and on SCIM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_is_decided_before_validation() {
    let s = TestServer::start(Backend::Sqlite).await;
    let verifier = format!("Bearer {}", s.token("verifier", None).await);
    let auditor = format!("Bearer {}", s.token("auditor", None).await);
    let (_, doc) = s.get("/v1/openapi.json").await;
    let verifier_may = ["/v1/verify", "/v1/events", "/v1/services/{id}/ack"];
    let mut checked = 0;
    for (template, ops) in doc["paths"].as_object().unwrap() {
        if template == "/healthz" || template == "/v1/auth" {
            continue;
        }
        // A path parameter that is not UTF-8, a query parameter that does not exist, a
        // body that is not JSON.
        let path = template
            .split('/')
            .map(|seg| if seg.starts_with('{') { "%FF" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        let path = format!("{path}?bogus=1&limit=x");
        let token = if verifier_may.contains(&template.as_str()) {
            &auditor
        } else {
            &verifier
        };
        for method in ops.as_object().unwrap().keys() {
            let method: Method = method.to_uppercase().parse().unwrap();
            let body = matches!(method, Method::POST | Method::PUT | Method::PATCH)
                .then(|| ("application/json", "[{".to_owned()));
            let (st, _, v) = send(&s, method.clone(), &path, Some(token), body.clone()).await;
            assert_eq!(
                (st, code(&v)),
                (StatusCode::FORBIDDEN, "FORBIDDEN"),
                "{method} {template}: {v}"
            );
            let (st, _, v) = send(&s, method.clone(), &path, None, body).await;
            assert_eq!(
                (st, code(&v)),
                (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
                "{method} {template} without a token: {v}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 35, "{checked}");
    for (method, path) in [
        (Method::GET, "/scim/v2/Users?count=many"),
        (Method::GET, "/scim/v2/Users/%FF"),
        (Method::POST, "/scim/v2/Users"),
        (Method::PATCH, "/scim/v2/Users/x"),
    ] {
        // The server answers 403 before reading the 70 KB body and may close the
        // connection while the client still writes it (EPIPE on the client's side): such
        // a send is tried again, the answer it gets is what is asserted.
        let mut answer = None;
        for _ in 0..5 {
            let mut req = s
                .http
                .request(method.clone(), s.url(path))
                .header("authorization", verifier.as_str());
            if method != Method::GET {
                req = req
                    .header("content-type", "application/scim+json")
                    .body("x".repeat(70 * 1024));
            }
            if let Ok(resp) = req.send().await {
                answer = Some(resp.status());
                break;
            }
        }
        assert_eq!(answer, Some(StatusCode::FORBIDDEN), "{method} {path}");
    }
    s.stop().await;
}

/// Query parameters are documented in the query, path parameters only when the path
/// template has them; each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_parameters_are_where_they_are_sent() {
    let s = TestServer::start(Backend::Sqlite).await;
    let (_, doc) = s.get("/v1/openapi.json").await;
    let mut queries = 0;
    for (template, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let mut seen = std::collections::HashSet::new();
            for p in op["parameters"].as_array().into_iter().flatten() {
                let (name, place) = (p["name"].as_str().unwrap(), p["in"].as_str().unwrap());
                assert!(
                    seen.insert((name, place)),
                    "{method} {template}: {name} twice"
                );
                match place {
                    "path" => {
                        assert!(
                            template.contains(&format!("{{{name}}}")),
                            "{method} {template}: {p}"
                        );
                        assert_eq!(p["required"], true, "{p}");
                    }
                    "query" => {
                        queries += 1;
                        assert_ne!(p["required"], true, "{method} {template}: {p}");
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(queries >= 30, "{queries}");
    s.stop().await;
}

/// A key in a request's path or query never reaches a log line, even at `trace`, where
/// every request is logged with its URI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_uris_stay_out_of_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let served = crate::process::serve_with(&data, &[]);
    let http = reqwest::Client::new();
    let key = keywarden_core::key_format::generate(&mut rand::rngs::OsRng, "kw", "prod")
        .unwrap()
        .plain
        .expose()
        .to_owned();
    let encoded = key.replace('_', "%5F");
    for path in [
        format!("/v1/owners/{key}"),
        format!("/v1/keys?owner={key}"),
        format!("/v1/keys?owner={encoded}"),
        format!("/v1/nothing/{key}"),
        format!("/v1/keys/x{encoded}y"),
        format!("/healthz?k={key}"),
    ] {
        let resp = http
            .get(format!("{}{path}", served.base))
            .bearer_auth(&served.bootstrap)
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_client_error() || resp.status().is_success(),
            "{path}"
        );
        let text = resp.text().await.unwrap();
        assert!(!text.contains(&key), "{path}: {text}");
    }
    let logs = served.terminate();
    assert!(logs.contains("/v1/owners/"), "requests were logged: {logs}");
    for t in key_texts(&key) {
        assert!(
            !logs.contains(&t),
            "a key in a URI reached the logs: {logs}"
        );
    }
    assert!(!logs.contains(&encoded[encoded.len() - 38..]), "{logs}");
}
