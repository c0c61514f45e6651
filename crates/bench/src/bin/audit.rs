//! `cargo run --release -p keywarden-bench --bin audit`: what the audit trail costs.
//!
//! 1. Audited state changes over HTTP: N key creations, then N revocations, each one
//!    transaction with its chained audit entry, from C concurrent clients.
//! 2. The trail filled to E entries, then walked three ways: hashing alone (entries in
//!    memory), read from the store page by page, and end to end the way
//!    `keywarden audit verify` does it (streamed export over HTTP, parsed, walked).
//!    With `--cli PATH` the real binary is timed too.
//!
//! A benchmark, not a test: it asserts only that the walks find the chain intact.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use keywarden_bench::{percentile, SystemClock};
use keywarden_client::{sealed_entry, AuditQuery, Client};
use keywarden_core::audit_chain::{ChainWalk, SealedEntry};
use keywarden_core::model::{Actor, AuditEntry};
use keywarden_store::{AuditFilter, AuditOrder};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Keys created and then revoked over HTTP.
    #[arg(long, default_value_t = 10_000)]
    changes: usize,
    /// Concurrent HTTP clients for the state changes.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Entries in the trail for the walks.
    #[arg(long, default_value_t = 1_000_000)]
    entries: usize,
    /// `sqlite` (default, in a temp dir) or a postgres:// URL.
    #[arg(long)]
    database_url: Option<String>,
    /// Path of a built `keywarden` binary to time `audit verify` end to end.
    #[arg(long)]
    cli: Option<std::path::PathBuf>,
}

/// Peak resident memory of this process, from /proc (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs `op(i)` for i in 0..n from `concurrency` tasks; returns (elapsed, latencies).
async fn drive<F, Fut>(n: usize, concurrency: usize, op: F) -> Result<(Duration, Vec<Duration>)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let t = Instant::now();
                op(i).await?;
                lat.push(t.elapsed());
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed();
    all.sort();
    Ok((elapsed, all))
}

fn report(what: &str, n: usize, elapsed: Duration, lat: &[Duration]) {
    println!(
        "| {what} | {n} | {:.0}/s | {:.2} ms | {:.2} ms |",
        n as f64 / elapsed.as_secs_f64(),
        percentile(lat, 0.5).as_secs_f64() * 1e3,
        percentile(lat, 0.99).as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut config = keywarden_server::Config::new(dir.path().join("data"));
    config.listen = "127.0.0.1:0".parse()?;
    config.database_url.clone_from(&args.database_url);
    let server = keywarden_server::start(config, Arc::new(SystemClock)).await?;
    let admin = server
        .bootstrap_token
        .as_ref()
        .context("fresh store has a bootstrap token")?
        .expose()
        .to_owned();
    let base = format!("http://{}", server.addr);
    let store = server.state.store.clone();
    let http = reqwest::Client::new();

    println!(
        "backend: {}",
        if args.database_url.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    );
    println!("| audited change | count | rate | p50 | p99 |");
    println!("|---|---|---|---|---|");
    let ids = Arc::new(std::sync::Mutex::new(vec![String::new(); args.changes]));
    let (elapsed, lat) = {
        let (http, base, admin, ids) = (http.clone(), base.clone(), admin.clone(), ids.clone());
        drive(args.changes, args.concurrency, move |i| {
            let (http, base, admin, ids) = (http.clone(), base.clone(), admin.clone(), ids.clone());
            async move {
                let resp = http
                    .post(format!("{base}/v1/keys"))
                    .bearer_auth(&admin)
                    .json(&json!({"name": format!("bench-{i}"), "owner": "bench@example.com",
                        "environment": "prod", "systems": ["bench"], "scopes": ["deploy:*"], "ttl": "30d"}))
                    .send()
                    .await?;
                if resp.status() != reqwest::StatusCode::CREATED {
                    bail!("create answered {}", resp.status());
                }
                let v: serde_json::Value = resp.json().await?;
                let id = v["key"]["id"].as_str().context("key id")?.to_owned();
                if let Ok(mut ids) = ids.lock() {
                    ids[i] = id;
                }
                Ok(())
            }
        })
        .await?
    };
    report("key created (HTTP)", args.changes, elapsed, &lat);
    let ids: Vec<String> = ids.lock().map(|v| v.clone()).unwrap_or_default();
    let ids = Arc::new(ids);
    let (elapsed, lat) = {
        let (http, base, admin) = (http.clone(), base.clone(), admin.clone());
        drive(args.changes, args.concurrency, move |i| {
            let (http, base, admin, ids) = (http.clone(), base.clone(), admin.clone(), ids.clone());
            async move {
                let resp = http
                    .post(format!("{base}/v1/keys/{}/revoke", ids[i]))
                    .bearer_auth(&admin)
                    .json(&json!({"reason": "bench"}))
                    .send()
                    .await?;
                if resp.status() != reqwest::StatusCode::OK {
                    bail!("revoke answered {}", resp.status());
                }
                Ok(())
            }
        })
        .await?
    };
    report("key revoked (HTTP)", args.changes, elapsed, &lat);

    // Fill the trail in bulk transactions (not measured as a state change).
    let (have, _) = store.audit_head().await?;
    let have = usize::try_from(have)?;
    let fill = args.entries.saturating_sub(have);
    eprintln!("filling the trail with {fill} entries…");
    let started = Instant::now();
    let now = server.state.now();
    let mut done = 0;
    while done < fill {
        let batch: Vec<AuditEntry> = (done..(done + 10_000).min(fill))
            .map(|i| AuditEntry {
                time: now,
                actor: Actor {
                    id: "token:benchbenchbench0".into(),
                    name: "bench".into(),
                    source_ip: Some("10.1.2.3".into()),
                    user_agent: Some("bench/1".into()),
                    request_id: Some(format!("bench-{i}")),
                },
                action: "key.revoked".into(),
                target: format!("key:bench{i:011}"),
                reason: Some("bench".into()),
                details: r#"{"state":{"before":"active","after":"revoked"}}"#.into(),
            })
            .collect();
        done += batch.len();
        store.append_audit(&batch).await?;
    }
    eprintln!(
        "filled in {:.1}s ({:.0} entries/s in 10k-entry transactions)",
        started.elapsed().as_secs_f64(),
        fill as f64 / started.elapsed().as_secs_f64().max(1e-9)
    );
    let (total, _) = store.audit_head().await?;

    println!();
    println!(
        "| audit verify over {total} entries | time | entries/s | peak RSS of the bench process |"
    );
    println!("|---|---|---|---|");
    // a) End to end first, while memory is low: streamed export over HTTP, parsed and
    //    walked as the CLI does. Peak RSS before and after shows whether it grows.
    let client = Client::new(&base, Some(admin.clone()))?;
    let rss_before = peak_rss_mib();
    let started = Instant::now();
    let mut stream = client.audit_export(&AuditQuery::default()).await?;
    let mut walk = ChainWalk::new();
    let mut bytes = 0usize;
    while let Some(line) = stream.line().await? {
        bytes += line.len() + 1;
        let v: keywarden_proto::AuditEntryView = serde_json::from_str(&line)?;
        walk.push(sealed_entry(&v));
    }
    let r = walk.finish(None);
    let http_time = started.elapsed();
    if let Some(b) = r.broken {
        bail!("the chain is broken at {}: {}", b.seq, b.detail);
    }
    let rss_after = peak_rss_mib();
    let mib = |m: Option<f64>| m.map_or("-".into(), |m| format!("{m:.0} MiB"));
    let rate = |t: Duration| r.checked as f64 / t.as_secs_f64();
    println!(
        "| export over HTTP + parse + walk (in process, {:.0} MiB streamed) | {:.2} s | {:.0} | {} → {} |",
        bytes as f64 / (1024.0 * 1024.0),
        http_time.as_secs_f64(),
        rate(http_time),
        mib(rss_before),
        mib(rss_after),
    );

    if let Some(cli) = &args.cli {
        let started = Instant::now();
        let out = tokio::process::Command::new(cli)
            .args(["audit", "verify", "--json"])
            .env("KEYWARDEN_SERVER", &base)
            .env("KEYWARDEN_TOKEN", &admin)
            .output()
            .await
            .with_context(|| format!("running {}", cli.display()))?;
        let t = started.elapsed();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
        if v["intact"] != true {
            bail!("keywarden audit verify: {v}");
        }
        println!(
            "| `keywarden audit verify` (separate process, over HTTP) | {:.2} s | {:.0} | - |",
            t.as_secs_f64(),
            rate(t)
        );
    }

    // b) The parts: reading the store page by page, and hashing alone.
    let started = Instant::now();
    let mut cursor = None;
    let mut in_memory: Vec<SealedEntry> = Vec::with_capacity(usize::try_from(total)?);
    loop {
        let (page, next) = store
            .audit_entries(
                &AuditFilter::default(),
                AuditOrder::OldestFirst,
                cursor,
                10_000,
            )
            .await?;
        in_memory.extend(page);
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    let read_time = started.elapsed();
    let started = Instant::now();
    let mut walk = ChainWalk::new();
    for e in in_memory.drain(..) {
        walk.push(e);
    }
    let r2 = walk.finish(None);
    let hash_time = started.elapsed();
    if r2.broken.is_some() || r2.checked != r.checked {
        bail!("the in-memory walk disagrees: {:?}", r2.broken);
    }
    println!(
        "| read from the store only (in process) | {:.2} s | {:.0} | - |",
        read_time.as_secs_f64(),
        rate(read_time)
    );
    println!(
        "| hash chain walk only (entries in memory) | {:.2} s | {:.0} | - |",
        hash_time.as_secs_f64(),
        rate(hash_time)
    );
    server.shutdown().await;
    Ok(())
}
