//! Store failures answer by kind, whichever driver failed: a constraint the write breaks
//! is 409 `CONFLICT`, stored data that does not decode 500 `STORE_CORRUPT` (verify too:
//! never `VALID`), a lock the write cannot get 503 `STORE_BUSY`, a database that refuses
//! the work 503 `STORE_UNAVAILABLE`. Every 5xx is logged once, with its request id and
//! route template, and no secret.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{key_body, Backend, TestServer};

async fn conflicts_and_corrupt_rows_answer_by_kind(b: Backend) {
    let s = TestServer::start(b).await;
    s.create_key(key_body("first")).await;
    // A constraint keywarden does not know of: a second key in the environment breaks it.
    s.sql(&["CREATE UNIQUE INDEX kw_test_one_per_env ON keys (environment)"])
        .await;
    let (status, v) = s.post("/v1/keys", key_body("second")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "CONFLICT");
    assert!(!v.to_string().contains("kw_test_one_per_env"), "{v}");
    s.sql(&["DROP INDEX kw_test_one_per_env"]).await;

    // A key row garbled behind keywarden's back, before anything cached it.
    let (id, secret) = s.create_key(key_body("garbled")).await;
    s.sql(&[&format!("UPDATE keys SET scopes = '[' WHERE id = '{id}'")])
        .await;
    let (status, v) = s.post("/v1/verify", json!({ "key": secret })).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["error"]["code"], "STORE_CORRUPT");
    let (status, v) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["error"]["code"], "STORE_CORRUPT");
    s.stop().await;
}

crate::on_both_backends!(conflicts_and_corrupt_rows_answer_by_kind);

/// PostgreSQL: a write that cannot get its lock within `lock_timeout` (55P03) is
/// STORE_BUSY with `Retry-After: 1`, and the change does not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lock_wait_answers_store_busy() {
    use sqlx::{Connection, Executor};
    let Some(b) = crate::harness::postgres_or_skip() else {
        return;
    };
    let s = TestServer::start_with(b, |c| {
        let url = c.database_url.take().expect("a PostgreSQL url");
        c.database_url = Some(url.replace("options=", "options=-c%20lock_timeout%3D200ms%20"));
    })
    .await;
    let (id, secret) = s.create_key(key_body("locked")).await;
    let mut holder = sqlx::PgConnection::connect(&s.config.database_url())
        .await
        .expect("connect");
    holder.execute("BEGIN").await.expect("begin");
    holder
        .execute("LOCK TABLE keys IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let resp = s
        .http
        .post(s.url(&format!("/v1/keys/{id}/revoke")))
        .bearer_auth(&s.admin)
        .json(&json!({ "reason": "x" }))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["code"], "STORE_BUSY", "{v}");
    holder.execute("ROLLBACK").await.expect("rollback");
    drop(holder);
    assert_eq!(
        s.verify_code(&secret).await,
        "VALID",
        "the revoke did not happen"
    );
    s.stop().await;
}

/// The real binary's log: each 5xx is one error line with the request id (the client's
/// or the one the server gave), the method and the route template, the code and the
/// cause; never the key, the admin token or the path's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_logged_once_with_request_id_and_route() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let served = crate::process::serve_with(&data, &[]);
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Value, request_id: Option<&str>| {
        let mut req = http
            .request(method, format!("{}{path}", served.base))
            .bearer_auth(&served.bootstrap)
            .json(&body);
        if let Some(id) = request_id {
            req = req.header("x-request-id", id);
        }
        req.send()
    };
    let create = |name: &str| call(reqwest::Method::POST, "/v1/keys", key_body(name), None);
    let created: Value = create("garbled").await.unwrap().json().await.unwrap();
    let (garbled_id, secret) = (
        created["key"]["id"].as_str().unwrap().to_owned(),
        created["secret"].as_str().unwrap().to_owned(),
    );
    let created: Value = create("kept").await.unwrap().json().await.unwrap();
    let (kept_id, kept_secret) = (
        created["key"]["id"].as_str().unwrap().to_owned(),
        created["secret"].as_str().unwrap().to_owned(),
    );
    let admin = served.bootstrap.clone();

    sqlx::any::install_default_drivers();
    let db = format!("sqlite://{}", data.join("keywarden.db").display());
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&db)
        .await
        .unwrap();
    for st in [
        format!("UPDATE keys SET scopes = '[' WHERE id = '{garbled_id}'"),
        "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events \
         BEGIN SELECT RAISE(ABORT, 'audit device full'); END"
            .to_owned(),
    ] {
        sqlx::raw_sql(&st).execute(&mut conn).await.unwrap();
    }
    sqlx::Connection::close(conn).await.unwrap();

    // The client's request id, on a verify whose body holds a key.
    let resp = call(
        reqwest::Method::POST,
        "/v1/verify",
        json!({ "key": secret }),
        Some("errors-test-verify"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    // The server's own request id, on a route with an id in its path.
    let resp = call(
        reqwest::Method::POST,
        &format!("/v1/keys/{kept_id}/revoke"),
        json!({ "reason": "x" }),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"5"[..])
    );
    let revoke_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("a request id")
        .to_owned();

    // Log lines are written before the answer leaves; give the writer a moment anyway.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = served.terminate();
    for secret_text in [&secret, &kept_secret, &admin] {
        assert!(
            !log.contains(secret_text.as_str()),
            "a secret reached the log"
        );
    }
    let failed: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "request failed")
        .collect();
    let line_of = |request_id: &str| {
        let lines: Vec<&Value> = failed
            .iter()
            .filter(|l| l["fields"]["request_id"] == request_id)
            .collect();
        assert_eq!(lines.len(), 1, "one line for {request_id}: {failed:?}");
        lines[0]["fields"].clone()
    };

    let verify = line_of("errors-test-verify");
    assert_eq!(verify["method"], "POST");
    assert_eq!(verify["route"], "/v1/verify");
    assert_eq!(verify["status"], 500);
    assert_eq!(verify["code"], "STORE_CORRUPT");
    assert!(
        verify["cause"].as_str().unwrap().contains("scopes"),
        "{verify}"
    );

    let revoke = line_of(&revoke_id);
    assert_eq!(revoke["method"], "POST");
    assert_eq!(revoke["route"], "/v1/keys/{id}/revoke");
    assert_eq!(revoke["status"], 503);
    assert_eq!(revoke["code"], "STORE_UNAVAILABLE");
    assert!(
        revoke["cause"]
            .as_str()
            .unwrap()
            .contains("audit device full"),
        "{revoke}"
    );
    assert!(!revoke.to_string().contains(&kept_id), "{revoke}");
    assert_eq!(failed.len(), 2, "{failed:?}");
    for l in &failed {
        assert_eq!(l["level"], "ERROR");
    }
}
