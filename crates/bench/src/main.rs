//! `cargo run --release -p keywarden-bench`: drives `POST /v1/verify` with wrk (64
//! connections) against N keys, next to an axum handler that returns a fixed body, in the
//! same run, and prints requests/s and p50/p99 for both.
//!
//! Needs `wrk` (Debian package `wrk`). This is a benchmark, not a test: it asserts nothing.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use keywarden_bench::SystemClock;
use keywarden_core::clock::Clock;
use keywarden_core::key_format;
use keywarden_core::model::{Actor, AuditEntry, UsageEvent};
use keywarden_proto::CreateKeyRequest;
use keywarden_server::routes::keys::validate_create;

#[derive(Parser, Clone)]
struct Args {
    /// Keys in the store; requests pick among them at random.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    #[arg(long, default_value_t = 64)]
    connections: u32,
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Seconds per measured run.
    #[arg(long, default_value_t = 10)]
    duration: u32,
    /// Verify cache lifetime in seconds (the server's default is 60). Rounds after the
    /// first start more than 60 s after the warm-up walk, when entries it loaded expire.
    #[arg(long)]
    cache_ttl: Option<u64>,
    /// Measured verify runs, each between two ceiling runs; the median ratio is reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Usage writer flush interval in milliseconds (the server's default is 5).
    #[arg(long)]
    flush_ms: Option<u64>,
    /// `sqlite` (default, in a temp dir) or a postgres:// URL.
    #[arg(long)]
    database_url: Option<String>,
    /// Only the side lines that need no wrk: the usage writer alone, then the usage log's
    /// storage per million events before and after retention. For judging a change to
    /// the writer on a busy machine.
    #[arg(long)]
    writer_only: bool,
    /// What watching costs, in one run: keys carry a rate limit they never reach
    /// (1,000,000/min), and each round runs verify once watching (monitor, rate limits,
    /// source throttling) and once with the server's watching switch off, in alternate
    /// order. The usage chain stays on (it is in the store); its hashing is timed alone.
    /// Then the alert latency under verify load: canary keys (CANARY_USED) and keys
    /// issued two days before and never used (NEW_SOURCE), presented one at a time, each
    /// timed from its request to its alert in the store.
    #[arg(long)]
    compare_watch: bool,
}

struct WrkResult {
    requests: i64,
    rps: f64,
    p50: String,
    p99: String,
    non_2xx: u64,
    /// CPU this process (server and fixed handler; wrk is another process) spent per
    /// answered request during the run.
    cpu_per_request: Option<std::time::Duration>,
}

fn run_wrk(args: &Args, url: &str, script: &Path, seconds: u32) -> Result<WrkResult> {
    let cpu_before = keywarden_bench::process_cpu();
    let out = Command::new("wrk")
        .args([
            "-t",
            &args.threads.to_string(),
            "-c",
            &args.connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let cpu = keywarden_bench::process_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_owned()))
    };
    let rps = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .context("wrk printed no Requests/sec")?;
    let non_2xx = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // "  123456 requests in 10.00s, 12.34MB read"
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let cpu_per_request = cpu
        .zip(u32::try_from(requests).ok().filter(|n| *n > 0))
        .map(|(cpu, n)| cpu / n);
    Ok(WrkResult {
        requests,
        cpu_per_request,
        rps,
        p50: field("50%").unwrap_or_default(),
        p99: field("99%").unwrap_or_default(),
        non_2xx,
    })
}

/// How a verify script picks keys: `Walk` visits every key once per pass (thread `t` of
/// `n` takes keys t, t+n, …), to fill the cache; `Random` picks uniformly.
#[derive(Clone, Copy)]
enum Pick {
    Walk { threads: u32 },
    Random,
}

fn write_script(path: &Path, token: &str, keys: Option<(&Path, Pick)>) -> Result<()> {
    let mut f = std::fs::File::create(path)?;
    let load = match keys {
        Some((file, pick)) => {
            let choose = match pick {
                Pick::Walk { threads } => format!(
                    "i = i + 1\n  local k = keys[((tid + (i - 1) * {threads}) % #keys) + 1]"
                ),
                Pick::Random => "local k = keys[math.random(#keys)]".to_owned(),
            };
            format!(
                r#"
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end
keys = {{}}
for line in io.lines("{}") do keys[#keys + 1] = line end
math.randomseed(os.time())
i = 0
request = function()
  {choose}
  return wrk.format(nil, nil, nil, '{{"key":"' .. k .. '","scope":"deploy:write","subject":"bench-host"}}')
end
"#,
                file.display()
            )
        }
        None => String::new(),
    };
    write!(
        f,
        r#"wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
wrk.body = '{{"key":"x"}}'
{load}"#
    )?;
    Ok(())
}

/// `work`'s result, wall time and this process's CPU time (`None` where /proc is not).
async fn timed<T>(
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<(T, std::time::Duration, Option<std::time::Duration>)> {
    let cpu_before = keywarden_bench::process_cpu();
    let started = Instant::now();
    let out = work.await?;
    let wall = started.elapsed();
    let cpu = keywarden_bench::process_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    Ok((out, wall, cpu))
}

/// The usage writer alone, without wrk or workers competing for the cores: the CPU it
/// takes to append events for random keys in batches the size it sees at ~60k verifies/s
/// (5 ms of them). Steadier than the rounds, so a change to the writer can be judged here.
async fn bench_appends(
    store: &keywarden_store::Store,
    ids: &[keywarden_core::KeyId],
    args: &Args,
) -> Result<String> {
    const EVENTS: usize = 300_000;
    const BATCH: usize = 300;
    if ids.is_empty() {
        return Ok(String::new());
    }
    let now = SystemClock.now();
    let mut batches: Vec<Vec<UsageEvent>> = (0..EVENTS / BATCH)
        .map(|_| {
            (0..BATCH)
                .map(|_| UsageEvent {
                    key_id: Some(
                        ids[rand::Rng::gen_range(&mut rand::thread_rng(), 0..ids.len())].clone(),
                    ),
                    time: now,
                    code: keywarden_core::verify::VerifyCode::Valid,
                    source_ip: Some([127, 0, 0, 1].into()),
                    scope: Some("deploy:write".to_owned()),
                    environment: None,
                    subject: Some("bench-host".to_owned()),
                    user_agent: None,
                    counted: false,
                })
                .collect()
        })
        .collect();
    let ((), wall, cpu) = timed(async {
        for batch in batches.drain(..) {
            let (_, result) = store.record_usage(batch).await;
            result?;
        }
        Ok(())
    })
    .await?;
    let per_event = |d: std::time::Duration| d.as_secs_f64() * 1e6 / EVENTS as f64;
    let cpu_text = |c: Option<std::time::Duration>| {
        c.map_or("unknown".to_owned(), |c| format!("{:.2} µs", per_event(c)))
    };
    let mut text = format!(
        "usage writer alone ({} store): {EVENTS} events in batches of {BATCH}: {:.2} µs wall, {} CPU a event",
        args.database_url.as_deref().map_or("sqlite", |_| "postgres"),
        per_event(wall),
        cpu_text(cpu)
    );
    // PostgreSQL holds the batches' rollups and writes them every few seconds: part of
    // the writer's work, done here once for the whole run. (SQLite's fold is its own line.)
    if args.database_url.is_some() {
        let ((), held_wall, held_cpu) = timed(async { Ok(store.fold_usage().await?) }).await?;
        text.push_str(&format!(
            ", then writing the rollups it held: {:.2} µs wall, {} CPU a event",
            per_event(held_wall),
            cpu_text(held_cpu)
        ));
    }
    Ok(text)
}

/// A verify run with the server's watching switch off ([`AppState::watching`]), put
/// back on after it, also when the run fails.
async fn run_unwatched(
    args: &Args,
    state: &keywarden_server::state::AppState,
    url: &str,
    script: &Path,
) -> Result<WrkResult> {
    settle(state).await?;
    state
        .watching
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let run = run_wrk(args, url, script, args.duration);
    state
        .watching
        .store(true, std::sync::atomic::Ordering::Relaxed);
    run
}

/// Issues `request` as a key with `parsed`'s secret, issued at `issued`, straight into
/// the store with its audit entry: what `POST /v1/keys` does, without HTTP.
async fn insert_bench_key(
    state: &keywarden_server::state::AppState,
    parsed: &key_format::ParsedKey,
    request: &CreateKeyRequest,
    issued: time::OffsetDateTime,
) -> Result<()> {
    let spec = validate_create(request, issued, &keywarden_core::policy::Rules::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let record = spec.issue(parsed, &state.hasher, "bench".into(), issued);
    let audit = AuditEntry {
        time: issued,
        actor: Actor {
            id: "system:bench".into(),
            name: "bench".into(),
            ..Actor::default()
        },
        action: "key.created".into(),
        target: format!("key:{}", record.id),
        reason: None,
        details: "{}".into(),
    };
    state.store.insert_key(&record, &audit).await?;
    Ok(())
}

/// Keys of each alert kind timed with `--compare-watch`.
const ALERT_PROBES: usize = 200;

/// Alert latency under load: while wrk drives random verifies, each probe key is
/// presented once, from a source of its own, and timed from just before its request to
/// the moment its alert is in the store (polled every millisecond: an upper bound by at
/// most the poll's own time). CANARY_USED is raised from verify's sighting; NEW_SOURCE
/// from the batch the usage writer stored, so it includes the writer's flush and write.
async fn bench_alert_latency(
    args: &Args,
    state: &keywarden_server::state::AppState,
    verify_url: &str,
    verify_script: &Path,
    probes: &[(&'static str, String)],
    admin: &str,
) -> Result<String> {
    let load = {
        let (args, url, script) = (
            args.clone(),
            verify_url.to_owned(),
            verify_script.to_owned(),
        );
        std::thread::spawn(move || run_wrk(&args, &url, &script, args.duration))
    };
    let client = reqwest::Client::new();
    let raised = |kind: &'static str| async move {
        let counts = state.store.alert_counts().await?;
        Ok::<i64, anyhow::Error>(
            counts
                .iter()
                .find(|(k, _)| k == kind)
                .map_or(0, |(_, n)| *n),
        )
    };
    let mut latencies: std::collections::BTreeMap<&str, Vec<std::time::Duration>> =
        Default::default();
    let mut missed: std::collections::BTreeMap<&str, usize> = Default::default();
    // Starts once wrk is under way; presents probes until its run ends.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for (i, (kind, key)) in probes.iter().enumerate() {
        if load.is_finished() {
            break;
        }
        // Each from a source of its own: a canary is a bad key, and one source
        // presenting 30 a minute is throttled, after which what it presents is not
        // examined; a NEW_SOURCE needs a network the key has not seen.
        let source = format!("10.{}.{}.1", 100 + i / 256, i % 256);
        let before = raised(kind).await?;
        let started = Instant::now();
        let answer = client
            .post(verify_url)
            .bearer_auth(admin)
            .json(&serde_json::json!({ "key": key, "source_ip": source }))
            .send()
            .await?;
        anyhow::ensure!(
            answer.status().is_success(),
            "a probe's verify answered {}",
            answer.status()
        );
        loop {
            if raised(kind).await? > before {
                latencies.entry(kind).or_default().push(started.elapsed());
                break;
            }
            if started.elapsed() > std::time::Duration::from_secs(5) {
                *missed.entry(kind).or_default() += 1;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let under = load
        .join()
        .map_err(|_| anyhow::anyhow!("the wrk thread panicked"))??;
    let mut lines = Vec::new();
    for kind in ["CANARY_USED", "NEW_SOURCE"] {
        let mut l = latencies.remove(kind).unwrap_or_default();
        l.sort();
        let at = |q: f64| {
            l.get(((l.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .map_or("n/a".to_owned(), |d| {
                    format!("{:.1} ms", d.as_secs_f64() * 1e3)
                })
        };
        lines.push(format!(
            "alert latency ({kind}, request to alert stored) under {:.0} verifies/s: {} alerts, p50 {}, p99 {}, max {}; {} not raised within 5 s",
            under.rps,
            l.len(),
            at(0.5),
            at(0.99),
            at(1.0),
            missed.get(kind).copied().unwrap_or(0),
        ));
    }
    Ok(lines.join("\n"))
}

/// The usage chain's share of a verify, which the switch leaves on: the CPU the writer
/// spends hashing each event into its batch (canonical JSON, SHA-256, CRC-32 digest),
/// alone on this thread, for events like the bench's.
fn bench_chain_hashing() -> String {
    use keywarden_core::usage_chain::{BatchHasher, EventFields};
    const EVENTS: usize = 300_000;
    const BATCH: usize = 300;
    let id = keywarden_core::KeyId::generate(&mut rand::thread_rng());
    let cpu_before = keywarden_bench::process_cpu();
    let started = Instant::now();
    let mut prev = [0u8; 32];
    for b in 0..EVENTS / BATCH {
        let mut chain = BatchHasher::new(&prev, BATCH);
        for i in 0..BATCH {
            chain.push(&EventFields {
                seq: (b * BATCH + i) as i64,
                key_id: Some(id.as_str()),
                time: 1_764_900_000_000 + i as i64,
                code: "VALID",
                counted: false,
                source_ip: Some("127.0.0.1"),
                scope: Some("deploy:write"),
                environment: None,
                subject: Some("bench-host"),
                user_agent: None,
            });
        }
        prev = std::hint::black_box(chain.finish(b as i64, prev)).hash;
    }
    let wall = started.elapsed();
    let cpu = keywarden_bench::process_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let per_event = |d: std::time::Duration| d.as_secs_f64() * 1e6 / EVENTS as f64;
    format!(
        "usage chain hashing alone: {EVENTS} events in batches of {BATCH}: {:.2} µs wall, {} CPU an event",
        per_event(wall),
        cpu.map_or("unknown".to_owned(), |c| format!("{:.2} µs", per_event(c)))
    )
}

/// Bytes the usage log takes per million events (`usage_events` and `usage_batches`,
/// indexes included), once a million are stored in writer-sized batches, and again once
/// retention has removed all but the newest batch: what a month of retention holds, and
/// what is left after it. SQLite counts pages in use (freed pages are reused, not
/// returned); PostgreSQL, `pg_total_relation_size` after a VACUUM.
async fn bench_storage(
    store: &keywarden_store::Store,
    ids: &[keywarden_core::KeyId],
    args: &Args,
) -> Result<String> {
    const EVENTS: usize = 1_000_000;
    const BATCH: usize = 300;
    if ids.is_empty() {
        return Ok(String::new());
    }
    let before = store.usage_table_bytes().await?;
    let now = SystemClock.now();
    let mut rng = rand::thread_rng();
    for _ in 0..EVENTS / BATCH {
        let batch: Vec<UsageEvent> = (0..BATCH)
            .map(|_| UsageEvent {
                key_id: Some(ids[rand::Rng::gen_range(&mut rng, 0..ids.len())].clone()),
                time: now,
                code: keywarden_core::verify::VerifyCode::Valid,
                source_ip: Some([10, 1, rand::Rng::gen(&mut rng), rand::Rng::gen(&mut rng)].into()),
                scope: Some("deploy:write".to_owned()),
                environment: None,
                subject: Some("bench-host".to_owned()),
                user_agent: Some("gateway/1.4".to_owned()),
                counted: false,
            })
            .collect();
        let (_, r) = store.record_usage(batch).await;
        r?;
    }
    store.fold_usage().await?;
    let full = store.usage_table_bytes().await?;
    let later = now + time::Duration::days(31);
    let rule = keywarden_store::RetentionRule {
        default: time::Duration::days(30),
        environments: Default::default(),
    };
    let mut removed = 0;
    let ((), retention_wall, retention_cpu) = timed(async {
        while let Some(r) = store
            .retain_usage(&rule, later, |r| AuditEntry {
                time: later,
                actor: Actor {
                    id: "system:bench".into(),
                    name: "bench".into(),
                    ..Actor::default()
                },
                action: "usage.retained".into(),
                target: "usage".into(),
                reason: None,
                details: format!(r#"{{"last_batch":{}}}"#, r.last_batch),
            })
            .await?
        {
            removed += r.events;
        }
        Ok(())
    })
    .await?;
    let after = store.usage_table_bytes().await?;
    let left = store.count_usage().await?;
    let per_million = |b: (i64, i64)| {
        let (events, batches) = (b.0 as f64, b.1 as f64);
        format!(
            "{:.1} MB (events {:.1} MB, batches {:.1} MB)",
            (events + batches) / 1e6 * 1e6 / EVENTS as f64,
            events / 1e6 * 1e6 / EVENTS as f64,
            batches / 1e6 * 1e6 / EVENTS as f64,
        )
    };
    let delta = |a: (i64, i64), b: (i64, i64)| (a.0 - b.0, a.1 - b.1);
    let per_removed = |d: std::time::Duration| d.as_secs_f64() * 1e6 / removed.max(1) as f64;
    Ok(format!(
        "usage log storage ({} store): {EVENTS} events in batches of {BATCH}: {} per million \
         events\nusage retention: removed {removed} events in whole batches ({:.2} µs wall, {} \
         CPU an event); {left} left, the tables then take {:.1} MB (events {:.1} MB, batches \
         {:.1} MB)",
        args.database_url
            .as_deref()
            .map_or("sqlite", |_| "postgres"),
        per_million(delta(full, before)),
        per_removed(retention_wall),
        retention_cpu.map_or("unknown".to_owned(), |c| format!(
            "{:.2} µs",
            per_removed(c)
        )),
        (after.0 + after.1) as f64 / 1e6,
        after.0 as f64 / 1e6,
        after.1 as f64 / 1e6,
    ))
}

/// What a verify cache miss costs: reading the key from the store and building the cache
/// entry, for random keys, one after another on this thread. Once a cached entry
/// expires (60 s by default), every key pays this again.
async fn bench_misses(
    store: &keywarden_store::Store,
    ids: &[keywarden_core::KeyId],
) -> Result<String> {
    const READS: usize = 20_000;
    if ids.is_empty() {
        return Ok(String::new());
    }
    let ((), wall, cpu) = timed(async {
        for _ in 0..READS {
            let id = &ids[rand::Rng::gen_range(&mut rand::thread_rng(), 0..ids.len())];
            let key = store.get_key(id).await?.context("a bench key is missing")?;
            std::hint::black_box(keywarden_server::cache::CachedKey::new(key));
        }
        Ok(())
    })
    .await?;
    // What an expired entry of an unchanged key costs instead (`routes::verify`).
    let ((), stamp_wall, stamp_cpu) = timed(async {
        for _ in 0..READS {
            let id = &ids[rand::Rng::gen_range(&mut rand::thread_rng(), 0..ids.len())];
            let stamp = store.key_stamp(id).await?;
            std::hint::black_box(stamp.context("a bench key is missing")?);
        }
        Ok(())
    })
    .await?;
    let per_read = |d: std::time::Duration| d.as_secs_f64() * 1e6 / READS as f64;
    let cpu_text = |cpu: Option<std::time::Duration>| {
        cpu.map_or("unknown".to_owned(), |c| format!("{:.1} µs", per_read(c)))
    };
    Ok(format!(
        "cache misses alone: {READS} key reads and cache entries: {:.1} µs wall, {} CPU a miss\n\
         renewals alone: {READS} version reads of expired entries: {:.1} µs wall, {} CPU a renewal",
        per_read(wall),
        cpu_text(cpu),
        per_read(stamp_wall),
        cpu_text(stamp_cpu),
    ))
}

/// Waits until the usage writer has caught up (its queue is empty and the stored count
/// stays put for 300 ms, longer than a batch takes) and returns the count, so that a
/// count taken after a run covers that run only.
async fn settle(state: &keywarden_server::state::AppState) -> Result<i64> {
    let mut last = state.store.count_usage().await?;
    let mut still = 0;
    for _ in 0..300 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = state.store.count_usage().await?;
        let queue_empty = state.usage.capacity() == state.usage.max_capacity();
        still = if now == last && queue_empty {
            still + 1
        } else {
            0
        };
        if still >= 3 {
            break;
        }
        last = now;
    }
    Ok(last)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut config = keywarden_server::Config::new(dir.path().join("data"));
    config.listen = "127.0.0.1:0".parse()?;
    config.database_url.clone_from(&args.database_url);
    if let Some(s) = args.cache_ttl {
        config.verify_cache_ttl = std::time::Duration::from_secs(s);
    }
    if let Some(ms) = args.flush_ms {
        config.usage_flush_interval = std::time::Duration::from_millis(ms);
    }
    let server = keywarden_server::start(config, Arc::new(SystemClock)).await?;
    let admin = server
        .bootstrap_token
        .as_ref()
        .context("fresh store has a bootstrap token")?
        .expose()
        .to_owned();
    let state = server.state.clone();

    eprintln!("creating {} keys…", args.keys);
    let started = Instant::now();
    let now = state.now();
    let keys_path = dir.path().join("keys.txt");
    let mut keys_file = std::io::BufWriter::new(std::fs::File::create(&keys_path)?);
    let mut ids = Vec::with_capacity(args.keys);
    for i in 0..args.keys {
        let parsed = key_format::generate(&mut rand::rngs::OsRng, "kw", "prod")?;
        let request = CreateKeyRequest {
            name: format!("bench-{i}"),
            owner: "bench@example.com".into(),
            environment: "prod".into(),
            systems: vec!["bench".into()],
            scopes: vec!["deploy:*".into()],
            ttl: Some("30d".into()),
            rate_limit: args.compare_watch.then(|| "1000000/min".into()),
            ..CreateKeyRequest::default()
        };
        insert_bench_key(&state, &parsed, &request, now).await?;
        writeln!(keys_file, "{}", parsed.plain.expose())?;
        ids.push(parsed.id);
    }
    keys_file.flush()?;
    // Alert probes: canaries (CANARY_USED, raised from verify's sighting) and keys
    // issued two days ago and never used (their first use is from a network new to them,
    // past the one-day warm-up: NEW_SOURCE, raised from the usage writer's batch).
    let mut probes: Vec<(&'static str, String)> = Vec::new();
    if args.compare_watch {
        for i in 0..2 * ALERT_PROBES {
            let canary = i % 2 == 0;
            let issued = if canary {
                now
            } else {
                now - time::Duration::days(2)
            };
            let parsed = key_format::generate(&mut rand::rngs::OsRng, "kw", "prod")?;
            let request = CreateKeyRequest {
                name: format!("bench-probe-{i}"),
                owner: "bench@example.com".into(),
                environment: "prod".into(),
                scopes: vec!["deploy:*".into()],
                ttl: Some("30d".into()),
                canary,
                ..CreateKeyRequest::default()
            };
            insert_bench_key(&state, &parsed, &request, issued).await?;
            let kind = if canary { "CANARY_USED" } else { "NEW_SOURCE" };
            probes.push((kind, parsed.plain.expose().to_owned()));
        }
    }
    eprintln!("created in {:.1}s", started.elapsed().as_secs_f64());
    if args.writer_only {
        println!("{}", bench_appends(&state.store, &ids, &args).await?);
        println!("{}", bench_storage(&state.store, &ids, &args).await?);
        server.shutdown().await;
        return Ok(());
    }

    // The ceiling: an axum handler that returns a fixed body, on the same machine.
    let fixed = axum::Router::new().route(
        "/",
        axum::routing::post(|| async {
            (
                [("content-type", "application/json")],
                r#"{"valid":true,"code":"VALID"}"#,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let fixed_addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, fixed).await });

    let warm_script = dir.path().join("warm.lua");
    write_script(
        &warm_script,
        &admin,
        Some((
            &keys_path,
            Pick::Walk {
                threads: args.threads,
            },
        )),
    )?;
    let verify_script = dir.path().join("verify.lua");
    write_script(&verify_script, &admin, Some((&keys_path, Pick::Random)))?;
    // The ceiling is driven by the same script as verify (random key bodies built in
    // Lua), so wrk spends the same per request in both runs; a static request is cheaper
    // for wrk and leaves the server more of the two shared cores. It is reported too.
    let static_script = dir.path().join("static.lua");
    write_script(&static_script, &admin, None)?;
    let verify_url = format!("http://{}/v1/verify", server.addr);
    let fixed_url = format!("http://{fixed_addr}/");

    // Walk every key once so the measured run sees a warm cache, as a gateway's steady
    // state would. A walk that did not reach every key (cold misses are slow, more so on
    // PostgreSQL) is run again, longer; each run starts the walk from the first key.
    let mut warm_seconds = u32::try_from(args.keys / 10_000).unwrap_or(u32::MAX).max(3);
    for _ in 0..3 {
        eprintln!("warming up: walking all keys for {warm_seconds}s…");
        let warm = run_wrk(&args, &verify_url, &warm_script, warm_seconds)?;
        let walked = usize::try_from(warm.requests).unwrap_or(0);
        if walked >= args.keys {
            break;
        }
        eprintln!(
            "warm-up made {walked} requests, fewer than the {} keys",
            args.keys
        );
        let needed = f64::from(warm_seconds) * args.keys as f64 / walked.max(1) as f64;
        warm_seconds = (needed * 1.2).ceil().min(600.0) as u32;
    }
    settle(&state).await?;
    eprintln!("measuring…");
    let fixed_static = run_wrk(&args, &fixed_url, &static_script, args.duration)?;
    // Each round: the ceiling is measured before and after, and verify runs on a cache
    // walked again first (entries live 60 s, about the length of a round).
    let mut ceilings = vec![run_wrk(&args, &fixed_url, &verify_script, args.duration)?];
    let mut verifies = Vec::new();
    let mut unwatched = Vec::new();
    let mut verified = 0;
    let mut stored = 0;
    for round in 0..args.rounds {
        if round > 0 {
            run_wrk(&args, &verify_url, &warm_script, warm_seconds)?;
        }
        // Odd rounds measure without watching first, so drift within a round (cache
        // entries ageing, the table growing) does not favour one side.
        let unwatched_first = args.compare_watch && round % 2 == 1;
        if unwatched_first {
            unwatched.push(run_unwatched(&args, &state, &verify_url, &verify_script).await?);
        }
        let counted_before = settle(&state).await?;
        let verify = run_wrk(&args, &verify_url, &verify_script, args.duration)?;
        verified += verify.requests;
        // The ceiling run after it must not start while the writer still drains.
        for _ in 0..100 {
            if state.store.count_usage().await? - counted_before >= verify.requests {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        stored += state.store.count_usage().await? - counted_before;
        verifies.push(verify);
        if args.compare_watch && !unwatched_first {
            unwatched.push(run_unwatched(&args, &state, &verify_url, &verify_script).await?);
        }
        ceilings.push(run_wrk(&args, &fixed_url, &verify_script, args.duration)?);
    }
    let chain = args.compare_watch.then(bench_chain_hashing);
    let alert_latency = if args.compare_watch {
        run_wrk(&args, &verify_url, &warm_script, warm_seconds)?;
        Some(
            bench_alert_latency(&args, &state, &verify_url, &verify_script, &probes, &admin)
                .await?,
        )
    } else {
        None
    };
    let appends = bench_appends(&state.store, &ids, &args).await?;
    let misses = bench_misses(&state.store, &ids).await?;
    // What a fold costs, the part of usage that the rounds above only see when one falls
    // into them: the stats of every key with events since the last fold, written back.
    let unfolded = state.store.unfolded_keys();
    let ((), fold_wall, fold_cpu) = timed(async { Ok(state.store.fold_usage().await?) }).await?;
    server.shutdown().await;

    println!(
        "keywarden verify benchmark: {} keys, {} connections, {} wrk threads, {}s runs, {} rounds, store {}",
        args.keys,
        args.connections,
        args.threads,
        args.duration,
        args.rounds,
        args.database_url
            .as_deref()
            .map_or("sqlite", |_| "postgres")
    );
    println!(
        "| target | req/s | p50 | p99 | non-2xx | server CPU per request | verify / ceiling |"
    );
    println!("|---|---|---|---|---|---|---|");
    let row = |name: &str, r: &WrkResult, ratio: Option<f64>| {
        println!(
            "| {name} | {:.0} | {} | {} | {} | {} | {} |",
            r.rps,
            r.p50,
            r.p99,
            r.non_2xx,
            r.cpu_per_request.map_or(String::new(), |c| format!(
                "{:.1} µs",
                c.as_secs_f64() * 1e6
            )),
            ratio.map_or(String::new(), |x| format!("{x:.2}"))
        );
    };
    row(
        "fixed-body axum, static request (info)",
        &fixed_static,
        None,
    );
    row("fixed-body axum", &ceilings[0], None);
    let mut ratios = Vec::new();
    for (i, v) in verifies.iter().enumerate() {
        let ratio = v.rps / ((ceilings[i].rps + ceilings[i + 1].rps) / 2.0);
        ratios.push(ratio);
        row(&format!("POST /v1/verify, round {}", i + 1), v, Some(ratio));
        row("fixed-body axum", &ceilings[i + 1], None);
    }
    ratios.sort_by(f64::total_cmp);
    if let Some(median) = ratios.get(ratios.len() / 2) {
        println!(
            "verify / ceiling, median of {} rounds = {median:.2}",
            ratios.len()
        );
    }
    if !unwatched.is_empty() {
        let mut kept = Vec::new();
        for (i, (on, off)) in verifies.iter().zip(&unwatched).enumerate() {
            kept.push(on.rps / off.rps);
            row(&format!("verify not watching, round {}", i + 1), off, None);
        }
        let text: Vec<String> = kept.iter().map(|k| format!("{k:.2}")).collect();
        kept.sort_by(f64::total_cmp);
        if let Some(median) = kept.get(kept.len() / 2) {
            println!(
                "verify watching / not watching (monitor, rate limits, throttling), median of {} rounds = {median:.2} ({})",
                kept.len(),
                text.join(" / ")
            );
        }
    }
    if let Some(chain) = chain {
        println!("{chain}");
    }
    if let Some(latency) = alert_latency {
        println!("{latency}");
    }

    // Usage events were on: every answered verify must have been stored. wrk counts
    // completed responses only; verifies still in flight when it stopped were answered
    // and stored too, so `stored` may exceed the count by up to 64 a round.
    println!(
        "usage events stored for the measured runs: {stored} (wrk counted {verified} verify responses)"
    );
    println!("{appends}");
    println!("{misses}");
    if unfolded > 0 {
        println!(
            "a fold of {unfolded} keys' pending usage: {:.0} ms, {} of CPU",
            fold_wall.as_secs_f64() * 1e3,
            fold_cpu.map_or("unknown".to_owned(), |c| format!(
                "{:.0} ms ({:.1} µs a key)",
                c.as_secs_f64() * 1e3,
                c.as_secs_f64() * 1e6 / unfolded as f64
            ))
        );
    }
    Ok(())
}
