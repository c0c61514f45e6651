//! Outbound requests (webhooks) go where the guard allows, and only through a proxy the
//! operator names: the proxy environment variables are ignored, and a named proxy does
//! not carry requests to targets the guard refuses.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{Backend, TestServer};
use crate::receiver::Receiver;

/// `POST /v1/services/{id}/test` with a new service for `url`: the answer.
async fn test_delivery(base: &str, admin: &str, url: &str) -> Value {
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/v1/services"))
        .bearer_auth(admin)
        .json(&json!({ "name": "edge", "webhook_url": url }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v: Value = resp.json().await.unwrap();
    let id = v["service"]["id"].as_str().unwrap();
    let resp = http
        .post(format!("{base}/v1/services/{id}/test"))
        .bearer_auth(admin)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

/// The real binary with HTTP_PROXY, HTTPS_PROXY and ALL_PROXY pointing at a recording
/// "proxy": the webhook goes straight to its (allowed) target, never to the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_variables_are_ignored() {
    let proxy = Receiver::start().await;
    let target = Receiver::start().await;
    let proxy_url = proxy.url.trim_end_matches("/hook").to_owned();
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("HTTP_PROXY", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
        ("HTTPS_PROXY", proxy_url.as_str()),
        ("ALL_PROXY", proxy_url.as_str()),
    ];
    let mut served = crate::process::serve_with_env(dir.path(), &[], &vars);
    let v = test_delivery(&served.base, &served.bootstrap, &target.url).await;
    let _ = served.child.kill();
    let _ = served.child.wait();
    assert_eq!(v["delivered"], true, "{v}");
    assert_eq!(target.received().len(), 1);
    assert!(
        proxy.received().is_empty(),
        "a proxy from the environment was used"
    );
}

/// `--outbound-proxy`: requests go through it, and the guard still judges the target
/// (a name that resolves to loopback is refused before anything is sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_proxy_does_not_bypass_the_guard() {
    let proxy = Receiver::start().await;
    let proxy_url = proxy.url.trim_end_matches("/hook").to_owned();
    let target = "http://localhost:9/hook";

    let s = TestServer::start_with(Backend::Sqlite, |c| {
        c.outbound_proxy = Some(proxy_url.clone());
    })
    .await;
    let v = test_delivery(&s.base, &s.admin, target).await;
    assert_eq!(v["delivered"], false, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("private, loopback"),
        "{v}"
    );
    assert!(
        proxy.received().is_empty(),
        "the proxy carried a refused target"
    );
    s.stop().await;

    // Allowed targets do go through the proxy.
    let s = TestServer::start_with(Backend::Sqlite, |c| {
        c.outbound_proxy = Some(proxy_url.clone());
        c.outbound_allow = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    })
    .await;
    let v = test_delivery(&s.base, &s.admin, target).await;
    assert_eq!(v["delivered"], true, "{v}");
    assert_eq!(proxy.received().len(), 1);
    s.stop().await;
}
