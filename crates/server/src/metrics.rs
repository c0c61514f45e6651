//! Prometheus metrics, served as text by `GET /metrics` (see docs/metrics.md).
//!
//! Each server has a recorder of its own, never the process-wide one: tests run several
//! servers in one process, and a global recorder can be installed once. Every handle is
//! registered here at start and kept, so recording is an atomic add on a handle already
//! in hand: verify pays no name formatting, map lookup or allocation per request (its
//! counters are an array indexed by the code).
//!
//! What the store or a queue can tell at any moment (deliveries, alerts, the usage
//! queue, the cache) is read when scraped, into gauges set just before rendering. If the
//! store cannot be read, the scrape fails with the store's error: a gauge of zero would
//! say there is nothing pending when nobody knows.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use keywarden_core::VerifyCode;
use keywarden_store::StoreErrorKind;
use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::error::ApiError;
use crate::state::AppState;

/// What the exposition is served as (the text format, version 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// From a tenth of a millisecond (a cache hit) to a few seconds (a stalled store, or the
/// second verify waits on a full usage queue before it answers 503).
const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Up to the writer's largest batch (`usage::MAX_BATCH`).
const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 500.0, 1_000.0, 2_500.0, 5_000.0];

/// Histogram samples are buffered until drained; draining every second bounds that buffer
/// to a second of verifies whether or not anyone scrapes.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(1);

const VERIFY_TOTAL: &str = "keywarden_verify_total";
const VERIFY_SECONDS: &str = "keywarden_verify_duration_seconds";
const CACHE_HITS: &str = "keywarden_verify_cache_hits_total";
const CACHE_MISSES: &str = "keywarden_verify_cache_misses_total";
const CACHE_ENTRIES: &str = "keywarden_verify_cache_entries";
const USAGE_QUEUE_DEPTH: &str = "keywarden_usage_queue_depth";
const USAGE_QUEUE_CAPACITY: &str = "keywarden_usage_queue_capacity";
const USAGE_EVENTS: &str = "keywarden_usage_events_written_total";
const USAGE_BATCHES: &str = "keywarden_usage_batches_written_total";
const USAGE_BATCH_SIZE: &str = "keywarden_usage_batch_size";
const USAGE_FAILURES: &str = "keywarden_usage_write_failures_total";
const DELIVERIES: &str = "keywarden_deliveries";
const ALERTS: &str = "keywarden_alerts_open";
const ENFORCER_PASSES: &str = "keywarden_enforcer_passes_total";
const STORE_ERRORS: &str = "keywarden_store_errors_total";
const BUILD_INFO: &str = "keywarden_build_info";

/// The delivery states a gauge is kept for; confirmed deliveries are history, not load.
pub const DELIVERY_STATES: [&str; 3] = ["pending", "failing", "abandoned"];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// What the usage writer records; cloned into its task, which starts before the state.
#[derive(Clone)]
pub struct UsageMeters {
    pub events: Counter,
    pub batches: Counter,
    pub batch_size: Histogram,
    pub failures: Counter,
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// By `VerifyCode as usize`, which is its place in `VerifyCode::ALL` (a test checks).
    verify: [Counter; VerifyCode::ALL.len()],
    verify_seconds: Histogram,
    cache_hits: Counter,
    cache_misses: Counter,
    pub usage: UsageMeters,
    enforcer_completed: Counter,
    enforcer_failed: Counter,
    /// By `StoreErrorKind as usize`, its place in `StoreErrorKind::ALL`.
    store_errors: [Counter; StoreErrorKind::ALL.len()],
    cache_entries: Gauge,
    usage_queue_depth: Gauge,
    usage_queue_capacity: Gauge,
    /// In the order of [`DELIVERY_STATES`].
    deliveries: [Gauge; DELIVERY_STATES.len()],
    /// Registered as kinds appear in the store; a kind that disappears is set to zero.
    alerts: Mutex<HashMap<String, Gauge>>,
    /// One scrape at a time sets the gauges and renders, so a rendering never mixes two
    /// scrapes' reads.
    scrape: tokio::sync::Mutex<()>,
}

fn labels(pairs: &[(&'static str, &'static str)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(k, v)| Label::from_static_parts(k, v))
        .collect()
}

impl Metrics {
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new();
        // Both calls fail only on an empty bucket list.
        let builder = builder
            .set_buckets_for_metric(Matcher::Full(VERIFY_SECONDS.to_owned()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(USAGE_BATCH_SIZE.to_owned()), BATCH_BUCKETS)
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let r = &recorder;
        let describe = |name: &'static str, help: &'static str| {
            // The same call for each type: the exporter keeps one help text per name.
            r.describe_counter(
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            );
        };
        let counter = |name: &'static str, l: &[(&'static str, &'static str)]| {
            r.register_counter(&Key::from_parts(name, labels(l)), &METADATA)
        };
        let gauge = |name: &'static str, l: &[(&'static str, &'static str)]| {
            r.register_gauge(&Key::from_parts(name, labels(l)), &METADATA)
        };
        let histogram =
            |name: &'static str| r.register_histogram(&Key::from_static_name(name), &METADATA);
        describe(
            VERIFY_TOTAL,
            "Verdicts of /v1/verify and /v1/auth, by verify code.",
        );
        describe(
            VERIFY_SECONDS,
            "Time to reach a verdict and queue its usage event (HTTP and token check excluded).",
        );
        describe(
            CACHE_HITS,
            "Verify cache lookups answered from a fresh entry.",
        );
        describe(
            CACHE_MISSES,
            "Verify cache lookups that read the store: no entry, or one past its lifetime.",
        );
        describe(
            CACHE_ENTRIES,
            "Key records (and known-unknown ids) in the verify cache.",
        );
        describe(
            USAGE_QUEUE_DEPTH,
            "Usage events queued for the writer; verify fails closed when it stays full for 1s.",
        );
        describe(
            USAGE_QUEUE_CAPACITY,
            "Usage events the queue holds at most.",
        );
        describe(USAGE_EVENTS, "Usage events stored.");
        describe(USAGE_BATCHES, "Usage batches stored.");
        describe(USAGE_BATCH_SIZE, "Events per stored usage batch.");
        describe(
            USAGE_FAILURES,
            "Failed attempts to store a usage batch (each is retried).",
        );
        describe(
            DELIVERIES,
            "Webhook deliveries by state: pending, failing (to be retried), abandoned.",
        );
        describe(
            ALERTS,
            "Alerts not resolved yet (open or acknowledged), by kind.",
        );
        describe(
            ENFORCER_PASSES,
            "Enforcer passes by outcome: completed or failed (scheduled and POST /v1/enforce).",
        );
        describe(
            STORE_ERRORS,
            "Store errors that became an API answer, by kind.",
        );
        describe(BUILD_INFO, "Always 1; the version is a label.");

        let verify = VerifyCode::ALL.map(|code| counter(VERIFY_TOTAL, &[("code", code.as_str())]));
        let store_errors =
            StoreErrorKind::ALL.map(|kind| counter(STORE_ERRORS, &[("kind", kind.as_str())]));
        let deliveries = DELIVERY_STATES.map(|state| gauge(DELIVERIES, &[("state", state)]));
        // Every kind's series exists (at 0) before its first alert.
        let alerts: HashMap<_, _> = crate::alerts::KINDS
            .iter()
            .map(|kind| ((*kind).to_owned(), gauge(ALERTS, &[("kind", kind)])))
            .collect();
        gauge(BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]).set(1.0);
        Self {
            verify,
            verify_seconds: histogram(VERIFY_SECONDS),
            cache_hits: counter(CACHE_HITS, &[]),
            cache_misses: counter(CACHE_MISSES, &[]),
            usage: UsageMeters {
                events: counter(USAGE_EVENTS, &[]),
                batches: counter(USAGE_BATCHES, &[]),
                batch_size: histogram(USAGE_BATCH_SIZE),
                failures: counter(USAGE_FAILURES, &[]),
            },
            enforcer_completed: counter(ENFORCER_PASSES, &[("outcome", "completed")]),
            enforcer_failed: counter(ENFORCER_PASSES, &[("outcome", "failed")]),
            store_errors,
            cache_entries: gauge(CACHE_ENTRIES, &[]),
            usage_queue_depth: gauge(USAGE_QUEUE_DEPTH, &[]),
            usage_queue_capacity: gauge(USAGE_QUEUE_CAPACITY, &[]),
            deliveries,
            alerts: Mutex::new(alerts),
            scrape: tokio::sync::Mutex::new(()),
            handle,
            recorder,
        }
    }

    /// A verdict and how long it took.
    #[inline]
    pub fn verified(&self, code: VerifyCode, took: Duration) {
        if let Some(c) = self.verify.get(code as usize) {
            c.increment(1);
        }
        self.verify_seconds.record(took.as_secs_f64());
    }

    #[inline]
    pub fn cache_lookup(&self, hit: bool) {
        if hit {
            self.cache_hits.increment(1);
        } else {
            self.cache_misses.increment(1);
        }
    }

    pub fn enforcer_pass(&self, completed: bool) {
        if completed {
            self.enforcer_completed.increment(1);
        } else {
            self.enforcer_failed.increment(1);
        }
    }

    pub fn store_error(&self, kind: StoreErrorKind) {
        if let Some(c) = self.store_errors.get(kind as usize) {
            c.increment(1);
        }
    }

    /// Moves buffered histogram samples into their buckets.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    fn set_alerts(&self, counts: Vec<(String, i64)>) {
        let Ok(mut gauges) = self.alerts.lock() else {
            return;
        };
        let mut seen: Vec<&str> = Vec::with_capacity(counts.len());
        for (kind, n) in &counts {
            let gauge = gauges.entry(kind.clone()).or_insert_with(|| {
                self.recorder.register_gauge(
                    &Key::from_parts(ALERTS, vec![Label::new("kind", kind.clone())]),
                    &METADATA,
                )
            });
            gauge.set(*n as f64);
            seen.push(kind);
        }
        for (kind, gauge) in gauges.iter() {
            if !seen.contains(&kind.as_str()) {
                gauge.set(0.0);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads what is read at scrape time and renders every metric.
pub async fn scrape(app: &AppState) -> Result<String, ApiError> {
    let m = &*app.metrics;
    let _one = m.scrape.lock().await;
    let deliveries = app.store.delivery_state_counts().await?;
    let alerts = app.store.alert_counts().await?;
    for (state, gauge) in DELIVERY_STATES.iter().zip(&m.deliveries) {
        let n = deliveries
            .iter()
            .find(|(s, _)| s == state)
            .map_or(0, |(_, n)| *n);
        gauge.set(n as f64);
    }
    m.set_alerts(alerts);
    let capacity = app.usage.max_capacity();
    m.usage_queue_depth
        .set(capacity.saturating_sub(app.usage.capacity()) as f64);
    m.usage_queue_capacity.set(capacity as f64);
    m.cache_entries.set(app.keys.len() as f64);
    Ok(m.handle.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arrays are indexed by discriminant: each must be its place in `ALL`.
    #[test]
    fn codes_and_kinds_index_their_arrays() {
        for (i, code) in VerifyCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "{code}");
        }
        for (i, kind) in StoreErrorKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i, "{}", kind.as_str());
        }
    }
}
