//! What the benchmark binaries share.

use std::time::Duration;

use keywarden_core::clock::Clock;
use time::OffsetDateTime;

/// The allocator the `keywarden` binary ships with (see its `main.rs`), for every bench
/// binary: in the verify bench both sides of the ratio run on it. (The scan bench runs
/// the real binary instead.)
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Benchmarks run on real time.
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // a benchmark runs on real time
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// The `p` quantile (0..=1) of sorted durations, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// POSTs JSON with an admin token; the answer's JSON, or an error naming the status.
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let resp = http.post(url).bearer_auth(token).json(body).send().await?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await?;
    if !status.is_success() {
        anyhow::bail!("{url}: {status} {v}");
    }
    Ok(v)
}

/// CPU time this process has used so far (user + system, all threads), from
/// `/proc/self/stat`; `None` where there is no procfs. Clock ticks are 10 ms, fine for
/// runs of seconds.
pub fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace();
    // utime and stime are fields 14 and 15 of the whole line: 12th and 13th after ')'.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux target the bench runs on.
    Some(Duration::from_millis((utime + stime) * 10))
}
