//! `cargo run --release -p keywarden-bench --bin cluster -- --database-url postgres://…`:
//! how soon a revocation made through one node is honoured by another.
//!
//! Two servers in this process on one PostgreSQL database, each with its own caches,
//! sharing a pepper. For each of N keys: node B verifies it (so B has it cached), node A
//! revokes it, and from the moment A's revoke call returns B is asked again until it
//! answers REVOKED. Reports p50, p99 and max.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use keywarden_bench::{percentile, post_json, SystemClock};
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    database_url: String,
    #[arg(long, default_value_t = 1_000)]
    revocations: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let pepper = format!("v1:{}", hex_of(&rand::random::<[u8; 32]>()));
    let signing = hex_of(&rand::random::<[u8; 32]>());
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let mut config = keywarden_server::Config::new(dir.path().join(name));
        config.listen = "127.0.0.1:0".parse()?;
        config.database_url = Some(args.database_url.clone());
        config.pepper = Some(pepper.clone());
        config.audit_signing_key = Some(signing.clone());
        nodes.push(keywarden_server::start(config, Arc::new(SystemClock)).await?);
    }
    let admin = nodes[0]
        .bootstrap_token
        .as_ref()
        .context("use an empty database: node A must bootstrap it")?
        .expose()
        .to_owned();
    let (a, b) = (
        format!("http://{}", nodes[0].addr),
        format!("http://{}", nodes[1].addr),
    );
    let http = reqwest::Client::new();
    let post = |base: String, path: String, body: Value| {
        let (http, admin) = (http.clone(), admin.clone());
        async move { post_json(&http, &format!("{base}{path}"), &admin, &body).await }
    };
    let mut seen = Vec::with_capacity(args.revocations);
    let mut polls = 0usize;
    for i in 0..args.revocations {
        let v = post(
            a.clone(),
            "/v1/keys".into(),
            json!({ "name": format!("c{i}"), "owner": "bench@example.com", "environment": "prod",
                    "systems": ["bench"], "scopes": ["deploy:write"], "ttl": "1d" }),
        )
        .await?;
        let id = v["key"]["id"].as_str().context("id")?.to_owned();
        let key = v["secret"].as_str().context("secret")?.to_owned();
        let code = post(b.clone(), "/v1/verify".into(), json!({ "key": key })).await?;
        if code["code"] != "VALID" {
            bail!("B does not see the new key: {code}");
        }
        post(a.clone(), format!("/v1/keys/{id}/revoke"), json!({})).await?;
        let returned = Instant::now();
        loop {
            polls += 1;
            let v = post(b.clone(), "/v1/verify".into(), json!({ "key": key })).await?;
            if v["code"] == "REVOKED" {
                break;
            }
            if returned.elapsed() > Duration::from_secs(10) {
                bail!("B still accepts key {id} 10 s after its revocation on A");
            }
            // A gateway asking again and again, not a spin that starves the node.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen.push(returned.elapsed());
    }
    seen.sort();
    println!(
        "revoked on A -> refused by B   p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   (n={}, {:.1} verifies on B per revocation)",
        percentile(&seen, 0.5).as_secs_f64() * 1e3,
        percentile(&seen, 0.99).as_secs_f64() * 1e3,
        seen.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        seen.len(),
        polls as f64 / seen.len() as f64
    );
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
