//! The OpenAPI document is generated from the routes; a snapshot makes every change to
//! the public contract visible in review.

use crate::harness::{Backend, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_snapshot() {
    let s = TestServer::start(Backend::Sqlite).await;
    let (status, doc) = s
        .call(reqwest::Method::GET, "/v1/openapi.json", None, None)
        .await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    for expected in [
        "/v1/keys",
        "/v1/keys/{id}",
        "/v1/keys/{id}/rotate",
        "/v1/keys/{id}/usage",
        "/v1/verify",
        "/v1/tokens",
        "/v1/audit",
        "/v1/audit/export",
        "/v1/audit/chain",
        "/v1/audit/checkpoints",
        "/v1/audit/archives",
        "/v1/policy",
        "/v1/enforce/plan",
        "/v1/owners",
        "/v1/owners/{identity}/disable",
        "/healthz",
    ] {
        assert!(
            paths.iter().any(|p| *p == expected),
            "{expected} missing from {paths:?}"
        );
    }
    insta::assert_json_snapshot!("openapi", doc);
    s.stop().await;
}
