//! `GET /metrics`: the Prometheus text format, read with a real parser. Verdict counts
//! and latency by code, the usage writer, who may scrape (and `--metrics-listen`, which
//! needs no token), gauges read from the store at scrape time, and a store that cannot
//! be read answering 503 rather than zeros.

use std::time::Duration;

use keywarden_core::key_format::{assemble, parse};
use prometheus_parse::{Sample, Scrape, Value as Metric};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{eventually, key_body, Backend, TestServer, WAIT};
use crate::on_both_backends;
use crate::receiver::Receiver;
use crate::services::add_service;

const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// GET `url` with `token`: the status and the body, parsed when it is the exposition.
async fn get(
    s: &TestServer,
    url: &str,
    token: Option<&str>,
) -> (StatusCode, Result<Scrape, Value>) {
    let mut req = s.http.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = resp.text().await.expect("body");
    if status != StatusCode::OK {
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        return (status, Err(body));
    }
    assert_eq!(content_type, TEXT_FORMAT);
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    (status, Ok(scrape))
}

/// A scrape of the main listener as the admin.
async fn scrape(s: &TestServer) -> Scrape {
    match get(s, &s.url("/metrics"), Some(&s.admin)).await {
        (StatusCode::OK, Ok(scrape)) => scrape,
        (status, other) => panic!("scrape answered {status}: {other:?}"),
    }
}

fn matches(sample: &Sample, name: &str, labels: &[(&str, &str)]) -> bool {
    sample.metric == name && labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
}

/// The value of the one counter, gauge or untyped sample `name` with `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| matches(s, name, labels))
        .collect();
    assert_eq!(found.len(), 1, "one sample {name}{labels:?}: {found:?}");
    match found[0].value {
        Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => v,
        ref other => panic!("{name} is not a single value: {other:?}"),
    }
}

/// Whether `name` is a counter (it must be one to be summed by `rate()`).
fn is_counter(scrape: &Scrape, name: &str) -> bool {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .all(|s| matches!(s.value, Metric::Counter(_)))
}

/// The histogram's `+Inf` bucket and its `_count`, which must agree.
fn histogram_count(scrape: &Scrape, name: &str) -> f64 {
    let buckets = scrape
        .samples
        .iter()
        .find_map(|s| match &s.value {
            Metric::Histogram(b) if s.metric == name => Some(b.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{name} is a histogram"));
    let inf = buckets
        .iter()
        .find(|b| b.less_than.is_infinite())
        .map(|b| b.count)
        .expect("a +Inf bucket");
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "buckets are cumulative: {buckets:?}"
    );
    assert_eq!(value(scrape, &format!("{name}_count"), &[]), inf);
    inf
}

fn code_count(scrape: &Scrape, code: &str) -> f64 {
    value(scrape, "keywarden_verify_total", &[("code", code)])
}

async fn verdicts_are_counted_by_code_with_their_latency(b: Backend) {
    let s = TestServer::start(b).await;
    let (_, key) = s.create_key(key_body("counted")).await;
    s.caught_up().await;
    // The right id with a forged secret (and a valid checksum): NOT_FOUND.
    let id = parse(&key, "kw").unwrap().id;
    let wrong = assemble("kw", "prod", id, &"y".repeat(32));
    let wrong = wrong.plain.expose();
    let before = scrape(&s).await;
    for code in ["VALID", "NOT_FOUND", "MALFORMED", "REVOKED"] {
        assert_eq!(code_count(&before, code), 0.0, "{code} before any verify");
    }
    let (n, m, junk) = (5, 3, 2);
    for _ in 0..n {
        assert_eq!(s.verify_code(&key).await, "VALID");
    }
    for _ in 0..m {
        assert_eq!(s.verify_code(wrong).await, "NOT_FOUND");
    }
    for _ in 0..junk {
        assert_eq!(s.verify_code("not-a-key").await, "MALFORMED");
    }

    let after = scrape(&s).await;
    assert_eq!(code_count(&after, "VALID"), f64::from(n));
    assert_eq!(code_count(&after, "NOT_FOUND"), f64::from(m));
    assert_eq!(code_count(&after, "MALFORMED"), f64::from(junk));
    assert_eq!(code_count(&after, "REVOKED"), 0.0);
    assert!(is_counter(&after, "keywarden_verify_total"));
    assert_eq!(
        histogram_count(&after, "keywarden_verify_duration_seconds"),
        f64::from(n + m + junk),
        "one latency per verdict"
    );
    // Junk never reaches the cache; every other verify looks its id up once.
    let hits = value(&after, "keywarden_verify_cache_hits_total", &[]);
    let misses = value(&after, "keywarden_verify_cache_misses_total", &[]);
    assert_eq!(hits + misses, f64::from(n + m));
    assert!(misses >= 1.0, "the first verify loads the key");
    assert!(value(&after, "keywarden_verify_cache_entries", &[]) >= 1.0);

    // The writer stores all ten usage events, in batches the histogram counts.
    let written = eventually(WAIT, "ten usage events written", || async {
        let now = scrape(&s).await;
        let events = value(&now, "keywarden_usage_events_written_total", &[]);
        if events == f64::from(n + m + junk) {
            Ok(now)
        } else {
            Err(format!("{events} events written"))
        }
    })
    .await;
    let batches = value(&written, "keywarden_usage_batches_written_total", &[]);
    assert!(batches >= 1.0);
    assert_eq!(
        histogram_count(&written, "keywarden_usage_batch_size"),
        batches
    );
    assert_eq!(
        value(&written, "keywarden_usage_batch_size_sum", &[]),
        f64::from(n + m + junk)
    );
    assert_eq!(
        value(&written, "keywarden_usage_write_failures_total", &[]),
        0.0
    );
    assert_eq!(value(&written, "keywarden_usage_queue_depth", &[]), 0.0);
    assert_eq!(
        value(&written, "keywarden_usage_queue_capacity", &[]),
        s.config.usage_queue_capacity as f64
    );
    assert_eq!(
        value(
            &written,
            "keywarden_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // Every metric says what it is.
    let names: std::collections::BTreeSet<String> = written
        .samples
        .iter()
        .map(|s| s.metric.clone())
        .filter(|m| !m.ends_with("_sum") && !m.ends_with("_count"))
        .collect();
    for name in &names {
        assert!(name.starts_with("keywarden_"), "{name}");
        assert!(written.docs.contains_key(name), "{name} has no HELP");
    }
    s.stop().await;
}

async fn scraping_needs_metrics_read(b: Backend) {
    let s = TestServer::start(b).await;
    let url = s.url("/metrics");
    let (status, body) = get(&s, &url, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body:?}");
    assert_eq!(body.unwrap_err()["error"]["code"], "UNAUTHENTICATED");
    for role in ["verifier", "issuer", "scim"] {
        let token = s.token(role, None).await;
        let (status, body) = get(&s, &url, Some(&token)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{role}: {body:?}");
        assert_eq!(body.unwrap_err()["error"]["code"], "FORBIDDEN");
    }
    let auditor = s.token("auditor", None).await;
    let (status, scrape) = get(&s, &url, Some(&auditor)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(code_count(&scrape.unwrap(), "VALID"), 0.0);
    // A key is not an admin token.
    let (_, key) = s.create_key(key_body("not-a-token")).await;
    let (status, _) = get(&s, &url, Some(&key)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    s.stop().await;
}

async fn the_metrics_listener_needs_no_token(b: Backend) {
    let s = TestServer::start_with(b, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let addr = s
        .server
        .as_ref()
        .and_then(|r| r.metrics_addr)
        .expect("the metrics listener is bound");
    assert_ne!(addr.to_string(), s.base.trim_start_matches("http://"));
    let (_, key) = s.create_key(key_body("scraped")).await;
    assert_eq!(s.verify_code(&key).await, "VALID");
    let open = format!("http://{addr}/metrics");
    let (status, scrape) = get(&s, &open, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(code_count(&scrape.unwrap(), "VALID"), 1.0);
    // Only /metrics there; the API is not reachable through it, with a token or not.
    for path in ["/v1/keys", "/healthz", "/v1/openapi.json"] {
        let (status, body) = get(&s, &format!("http://{addr}{path}"), Some(&s.admin)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body:?}");
        assert_eq!(body.unwrap_err()["error"]["code"], "ROUTE_NOT_FOUND");
    }
    let posted = s.http.post(&open).send().await.expect("request");
    assert_eq!(posted.status(), StatusCode::METHOD_NOT_ALLOWED);
    // The main listener's /metrics still wants a token.
    let (status, _) = get(&s, &s.url("/metrics"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(code_count(&scrape_open(&s, &open).await, "VALID"), 1.0);
    s.stop().await;
}

async fn scrape_open(s: &TestServer, url: &str) -> Scrape {
    match get(s, url, None).await {
        (StatusCode::OK, Ok(scrape)) => scrape,
        (status, other) => panic!("scrape answered {status}: {other:?}"),
    }
}

fn deliveries(scrape: &Scrape, state: &str) -> f64 {
    value(scrape, "keywarden_deliveries", &[("state", state)])
}

fn alerts_open(scrape: &Scrape) -> f64 {
    value(
        scrape,
        "keywarden_alerts_open",
        &[("kind", "KEY_STILL_IN_USE")],
    )
}

/// Scrapes until `what` holds of the scrape.
async fn scraped_until(s: &TestServer, what: &str, f: impl Fn(&Scrape) -> bool) -> Scrape {
    eventually(WAIT, what, || async {
        let now = scrape(s).await;
        if f(&now) {
            Ok(now)
        } else {
            let seen: Vec<String> = now
                .samples
                .iter()
                .filter(|x| x.metric.contains("deliveries") || x.metric.contains("alerts"))
                .map(|x| format!("{}{:?} {:?}", x.metric, x.labels, x.value))
                .collect();
            Err(seen.join("; "))
        }
    })
    .await
}

async fn delivery_and_alert_gauges_follow_the_store(b: Backend) {
    let s = TestServer::start_with(b, |c| {
        c.outbound_allow = vec!["127.0.0.0/8".parse().unwrap()];
        c.dispatch_poll = Duration::from_millis(50);
        c.webhook_backoff = Duration::from_secs(1);
        c.webhook_retry_for = Duration::from_secs(24 * 3600);
    })
    .await;
    let r = Receiver::start().await;
    r.answer(500);
    let first = scrape(&s).await;
    for state in ["pending", "failing", "abandoned"] {
        assert_eq!(deliveries(&first, state), 0.0, "{state}");
    }
    assert_eq!(
        alerts_open(&first),
        0.0,
        "the kind is there before any alert"
    );

    add_service(&s, json!({ "name": "siem", "webhook_url": r.url })).await;
    let (id, key) = s.create_key(key_body("leaked")).await;
    let (st, v) = s
        .post(
            &format!("/v1/keys/{id}/revoke"),
            json!({ "reason": "leaked" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    scraped_until(&s, "the revocation's delivery to be failing", |m| {
        deliveries(m, "failing") == 1.0
    })
    .await;

    // The dead key presented: an alert, and its event waits behind the failing one.
    assert_eq!(s.verify_code(&key).await, "REVOKED");
    let both = scraped_until(&s, "an alert, and its delivery pending", |m| {
        alerts_open(m) == 1.0 && deliveries(m, "pending") == 1.0
    })
    .await;
    assert_eq!(deliveries(&both, "failing"), 1.0);
    assert_eq!(deliveries(&both, "abandoned"), 0.0);

    // Past the retry window both are given up.
    s.clock.advance(time::Duration::hours(25));
    let done = scraped_until(&s, "both deliveries abandoned", |m| {
        deliveries(m, "abandoned") == 2.0
    })
    .await;
    assert_eq!(deliveries(&done, "pending"), 0.0);
    assert_eq!(deliveries(&done, "failing"), 0.0);
    assert_eq!(alerts_open(&done), 1.0);
    s.stop().await;
}

/// A scrape that cannot read the store says so (503, the store's error), never zeros;
/// the failure is counted as a store error once the store is back.
async fn an_unreadable_store_fails_the_scrape(b: Backend) {
    let s = TestServer::start(b).await;
    s.sql(&["ALTER TABLE alerts RENAME TO alerts_away"]).await;
    let (status, body) = get(&s, &s.url("/metrics"), Some(&s.admin)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(body.unwrap_err()["error"]["code"], "STORE_UNAVAILABLE");
    s.sql(&["ALTER TABLE alerts_away RENAME TO alerts"]).await;
    let back = scrape(&s).await;
    assert_eq!(
        value(
            &back,
            "keywarden_store_errors_total",
            &[("kind", "unavailable")]
        ),
        1.0
    );
    assert_eq!(
        value(&back, "keywarden_store_errors_total", &[("kind", "busy")]),
        0.0
    );
    assert!(is_counter(&back, "keywarden_store_errors_total"));
    s.stop().await;
}

/// The enforcer's passes, scheduled or asked for, are counted.
async fn enforcer_passes_are_counted(b: Backend) {
    let s = TestServer::start(b).await;
    let passes = |m: &Scrape| {
        value(
            m,
            "keywarden_enforcer_passes_total",
            &[("outcome", "completed")],
        )
    };
    // The scheduled enforcer makes its first pass as the server starts: once it is
    // counted, nothing else passes for an hour but what is asked for.
    let before = eventually(WAIT, "the first scheduled pass", || async {
        let n = passes(&scrape(&s).await);
        (n >= 1.0).then_some(n)
    })
    .await;
    let (st, v) = s.post("/v1/enforce", json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let after = scrape(&s).await;
    assert_eq!(passes(&after), before + 1.0);
    assert_eq!(
        value(
            &after,
            "keywarden_enforcer_passes_total",
            &[("outcome", "failed")]
        ),
        0.0
    );
    s.stop().await;
}

on_both_backends!(
    verdicts_are_counted_by_code_with_their_latency,
    scraping_needs_metrics_read,
    the_metrics_listener_needs_no_token,
    delivery_and_alert_gauges_follow_the_store,
    an_unreadable_store_fails_the_scrape,
    enforcer_passes_are_counted,
);
