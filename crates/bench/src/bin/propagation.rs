//! `cargo run --release -p keywarden-bench --bin propagation`: how fast a revocation
//! reaches connected services.
//!
//! A real server (SQLite in a temp dir, or `--database-url`), a real webhook listener on
//! loopback registered as a service, and N keys revoked one after another over HTTP. For
//! each: the time from the revoke call returning to (a) the signed webhook arriving at
//! the listener and (b) `/v1/auth` refusing the key. Reports p50, p99 and max.
//!
//! A benchmark, not a test: it checks only that every webhook arrived and every key was
//! refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use clap::Parser;
use keywarden_bench::{percentile, post_json, SystemClock};
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// Keys revoked, one after another.
    #[arg(long, default_value_t = 1_000)]
    revocations: usize,
    /// `sqlite` (default, in a temp dir) or a postgres:// URL.
    #[arg(long)]
    database_url: Option<String>,
}

fn report(what: &str, mut d: Vec<Duration>) {
    d.sort();
    println!(
        "{what:<38} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms   (n={})",
        percentile(&d, 0.50).as_secs_f64() * 1e3,
        percentile(&d, 0.99).as_secs_f64() * 1e3,
        d.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        d.len()
    );
}

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut config = keywarden_server::Config::new(dir.path().join("data"));
    config.listen = "127.0.0.1:0".parse()?;
    config.database_url.clone_from(&args.database_url);
    config.outbound_allow = vec!["127.0.0.1/32".parse()?];
    let server = keywarden_server::start(config, Arc::new(SystemClock)).await?;
    let admin = server
        .bootstrap_token
        .as_ref()
        .context("a fresh data directory makes a bootstrap token")?
        .expose()
        .to_owned();
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;

    // The listener: when each key's revocation arrived.
    let arrivals: Arrivals = Arc::default();
    let notify = Arc::new(tokio::sync::Notify::new());
    let (a, n) = (arrivals.clone(), notify.clone());
    let hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: Bytes| {
            let (a, n) = (a.clone(), n.clone());
            async move {
                let at = Instant::now();
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    if let Some(id) = v["data"]["key_id"].as_str() {
                        if let Ok(mut m) = a.lock() {
                            m.insert(id.to_owned(), at);
                        }
                    }
                }
                n.notify_waiters();
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, hook).await;
    });

    let post = |path: String, body: Value| {
        let (http, base, admin) = (http.clone(), base.clone(), admin.clone());
        async move { post_json(&http, &format!("{base}{path}"), &admin, &body).await }
    };
    post(
        "/v1/services".into(),
        json!({ "name": "bench-listener", "webhook_url": hook_url, "events": ["revoke"] }),
    )
    .await?;
    let verifier = post(
        "/v1/tokens".into(),
        json!({ "name": "gw", "role": "verifier" }),
    )
    .await?["secret"]
        .as_str()
        .context("token secret")?
        .to_owned();

    println!("creating {} keys", args.revocations);
    let mut keys = Vec::with_capacity(args.revocations);
    for i in 0..args.revocations {
        let v = post(
            "/v1/keys".into(),
            json!({
                "name": format!("bench-{i}"), "owner": "bench@example.com", "environment": "prod",
                "systems": ["bench"], "scopes": ["deploy:write"], "ttl": "1d",
            }),
        )
        .await?;
        let id = v["key"]["id"].as_str().context("id")?.to_owned();
        let secret = v["secret"].as_str().context("secret")?.to_owned();
        keys.push((id, secret));
    }

    println!("revoking them one after another");
    let mut to_webhook = Vec::with_capacity(keys.len());
    let mut to_refusal = Vec::with_capacity(keys.len());
    let mut early = 0;
    for (id, secret) in &keys {
        post(
            format!("/v1/keys/{id}/revoke"),
            json!({ "reason": "bench" }),
        )
        .await?;
        let returned = Instant::now();
        // The gateway's next request.
        let resp = http
            .get(format!("{base}/v1/auth"))
            .header("x-keywarden-token", &verifier)
            .bearer_auth(secret)
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::FORBIDDEN {
            bail!("key {id} not refused after revocation: {}", resp.status());
        }
        to_refusal.push(returned.elapsed());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let arrived = loop {
            let wake = notify.notified();
            if let Some(at) = arrivals.lock().ok().and_then(|m| m.get(id).copied()) {
                break at;
            }
            if tokio::time::timeout_at(deadline, wake).await.is_err() {
                bail!("the webhook for key {id} did not arrive within 10 s");
            }
        };
        // The dispatcher wakes on the commit, so a webhook can beat the HTTP answer.
        if arrived < returned {
            early += 1;
        }
        to_webhook.push(arrived.saturating_duration_since(returned));
    }
    println!(
        "backend: {}",
        if args.database_url.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    );
    report("revoke returned -> webhook received", to_webhook);
    report("revoke returned -> /v1/auth refuses", to_refusal);
    println!(
        "{early} of {} webhooks arrived before the revoke call had returned (counted as 0)",
        keys.len()
    );
    server.shutdown().await;
    Ok(())
}
