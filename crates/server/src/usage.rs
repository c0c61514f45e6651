//! The usage pipeline: verify handlers enqueue events; one writer drains the queue on a
//! short tick and writes each drain as one batch. Waking a writer per event costs a large
//! share of throughput (docs/benchmarks.md); a tick of a few milliseconds does not. The same task
//! folds the logged usage into the keys' stats every few seconds (see the store's
//! `sqlite::usage`), so appends and folds never overlap.

use std::time::Duration;

use keywarden_core::model::UsageEvent;
use keywarden_store::Store;
use tokio::sync::{mpsc, watch};

use crate::metrics::UsageMeters;

/// Default bound of the queue: a stalled store pushes back on verify instead of eating
/// memory, and the events held in memory stay a fraction of a second's worth at full load.
pub const QUEUE_CAPACITY: usize = 16_384;
const MAX_BATCH: usize = 5_000;
/// How long a PostgreSQL node holds usage rollups before writing them: what other nodes'
/// readers may lag by, and the window in which a key's repeated uses share their rows.
const HELD_ROLLUPS_INTERVAL: Duration = Duration::from_secs(10);

pub fn channel(capacity: usize) -> (mpsc::Sender<UsageEvent>, mpsc::Receiver<UsageEvent>) {
    mpsc::channel(capacity.max(1))
}

/// When the writer writes and folds.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub flush: Duration,
    pub fold: Duration,
    pub fold_max_keys: usize,
}

/// Runs until `shutdown` flips to true, then drains every queued event, folds, and returns.
pub async fn run_writer(
    store: Store,
    mut rx: mpsc::Receiver<UsageEvent>,
    schedule: Schedule,
    meters: UsageMeters,
    uses: Option<mpsc::Sender<Vec<crate::behaviour::Use>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let sinks = Sinks { meters, uses };
    let mut tick = tokio::time::interval(schedule.flush);
    let mut last_fold = tokio::time::Instant::now();
    let mut fold_retry_at: Option<tokio::time::Instant> = None;
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let beside = store.backend() == keywarden_store::Backend::Postgres;
    let fold_every = if beside {
        schedule.fold.min(HELD_ROLLUPS_INTERVAL)
    } else {
        schedule.fold
    };
    let mut background: Option<tokio::task::JoinHandle<keywarden_store::Result<bool>>> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => break,
        }
        // Drain what is queued now, in batches; stop once a drain comes back short.
        loop {
            let full = drain(&mut rx, &mut batch);
            write(&store, &mut batch, None, &sinks).await;
            if !full {
                break;
            }
        }
        // PostgreSQL writes held rollups beside the appends, in a task of its own: after
        // a busy interval a write can take a second or more, and appends must not queue
        // behind it.
        if let Some(done) = background.take_if(|h| h.is_finished()) {
            match done.await {
                Ok(Ok(_)) => {
                    last_fold = tokio::time::Instant::now();
                    fold_retry_at = None;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "writing usage rollups failed; retrying in 1s");
                    fold_retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::error!(error = %e, "the usage rollups task ended abnormally; retrying in 1s");
                    fold_retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
        }
        // A fold goes a chunk per tick, so appends never wait long behind it.
        let due = store.folding()
            || last_fold.elapsed() >= fold_every
            || store.unfolded_keys() >= schedule.fold_max_keys;
        if due
            && background.is_none()
            && fold_retry_at.is_none_or(|t| tokio::time::Instant::now() >= t)
        {
            if beside {
                let store = store.clone();
                background = Some(tokio::spawn(async move {
                    store.fold_usage_step(keywarden_store::FOLD_CHUNK).await
                }));
                continue;
            }
            match store.fold_usage_step(keywarden_store::FOLD_CHUNK).await {
                Ok(true) => last_fold = tokio::time::Instant::now(),
                Ok(false) => {}
                // The chunk stays in the overlay; retried after a pause, not every tick.
                Err(e) => {
                    tracing::error!(error = %e, "folding usage into key stats failed; retrying in 1s");
                    fold_retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    continue;
                }
            }
            fold_retry_at = None;
        }
    }
    if let Some(task) = background {
        // Its rollups are written again below if it failed.
        let _ = task.await;
    }
    rx.close();
    // Stopping: keep retrying a broken store for a while, but do not hang the shutdown.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_PATIENCE;
    let mut lost = 0;
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        lost += write(&store, &mut batch, Some(deadline), &sinks).await;
    }
    if lost > 0 {
        tracing::error!(lost, "usage events could not be written before shutdown");
    } else {
        tracing::info!("usage events flushed");
    }
    // Not folding is safe (the next start refolds from the log), only slower to start.
    if let Err(e) = store.fold_usage().await {
        tracing::error!(error = %e, "folding usage at shutdown failed; the next start refolds");
    }
}

const SHUTDOWN_PATIENCE: Duration = Duration::from_secs(30);

/// Who hears of each stored batch besides the store: the metrics, and the monitor's
/// learning of normal use (`behaviour`), one message per batch.
struct Sinks {
    meters: UsageMeters,
    uses: Option<mpsc::Sender<Vec<crate::behaviour::Use>>>,
}

/// Writes a batch, retrying until it lands (usage is an audit record, not telemetry) or
/// until `deadline`; returns how many events were given up.
async fn write(
    store: &Store,
    batch: &mut Vec<UsageEvent>,
    deadline: Option<tokio::time::Instant>,
    sinks: &Sinks,
) -> usize {
    let meters = &sinks.meters;
    let mut backoff = Duration::from_millis(50);
    while !batch.is_empty() {
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            let lost = batch.len();
            batch.clear();
            return lost;
        }
        let (events, result) = store.record_usage(std::mem::take(batch)).await;
        *batch = events;
        match result {
            Ok(()) => {
                let n = batch.len();
                meters.events.increment(n as u64);
                meters.batches.increment(1);
                meters.batch_size.record(n as f64);
                if let Some(tx) = &sinks.uses {
                    let uses = crate::behaviour::Use::of(batch);
                    // A monitor that cannot keep up misses uses to learn from; the uses
                    // themselves are stored.
                    if !uses.is_empty() && tx.try_send(uses).is_err() {
                        tracing::debug!("the monitor's queue of uses is full; a batch was skipped");
                    }
                }
                batch.clear();
            }
            Err(e) => {
                meters.failures.increment(1);
                tracing::error!(error = %e, events = batch.len(), "writing usage events failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    0
}

/// Moves queued events into `batch` without waiting; true when it stopped because the
/// batch is full (so more may be queued).
fn drain(rx: &mut mpsc::Receiver<UsageEvent>, batch: &mut Vec<UsageEvent>) -> bool {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(e) => batch.push(e),
            Err(_) => return false,
        }
    }
    true
}
