//! PostgreSQL nodes hold usage rollups in memory between writes: each batch's rollups
//! must land exactly once, whether the node that stored the batch writes them, or
//! another node rolls them up from the log because the first lost its lock or died.
//! Real nodes here are two `Store`s on one schema; a node's death is its lock's backend
//! terminated by `pg_terminate_backend`, as PostgreSQL sees a killed process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use keywarden_core::model::UsageEvent;
use keywarden_core::verify::VerifyCode;
use keywarden_core::KeyId;
use keywarden_store::rollups::Window;
use keywarden_store::Store;
use sqlx::{Connection, Row};
use time::macros::datetime;

const HOUR: i64 = 3_600_000;

fn key() -> KeyId {
    KeyId::generate(&mut rand::thread_rng())
}

fn uses(id: &KeyId, n: usize, from: &str) -> Vec<UsageEvent> {
    (0..n)
        .map(|i| UsageEvent {
            key_id: Some(id.clone()),
            time: datetime!(2026-12-05 10:00 UTC) + time::Duration::seconds(i as i64),
            code: VerifyCode::Valid,
            source_ip: Some(from.parse().unwrap()),
            scope: Some("deploy:write".into()),
            environment: Some("prod".into()),
            subject: Some("ci-runner".into()),
            user_agent: Some("curl/8".into()),
            counted: false,
        })
        .collect()
}

async fn record(store: &Store, events: Vec<UsageEvent>) {
    let (_, r) = store.record_usage(events).await;
    r.unwrap();
}

/// Events of the key in its rollups, as any reader sees them.
async fn rolled_up(store: &Store, id: &KeyId) -> i64 {
    let start = keywarden_core::clock::to_millis(datetime!(2026-12-05 00:00 UTC));
    let r = store
        .key_rollups(id, Window::covering(start, start + 24 * HOUR), HOUR, 5)
        .await
        .unwrap();
    r.total.events()
}

/// What the tables hold, read directly: no node writes its held rollups first.
async fn in_tables(url: &str) -> (i64, i64, i64) {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let row = sqlx::query(
        "SELECT (SELECT COALESCE(SUM(events), 0)::bigint FROM usage_rollups), \
         (SELECT COALESCE(SUM(events), 0)::bigint FROM usage_rollup_values \
          WHERE kind = 'agent'), \
         (SELECT COUNT(*) FROM usage_batches WHERE rollups_held_by IS NOT NULL)",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Terminates the backends holding the usage rollup locks of the nodes that batches
/// still name: what PostgreSQL sees when those nodes' processes die.
async fn kill_node_locks(url: &str) -> usize {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let killed: Vec<bool> = sqlx::query(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' \
         AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database \
         WHERE datname = current_database()) AND l.objid::bigint IN \
         (SELECT rollups_held_by FROM usage_batches WHERE rollups_held_by IS NOT NULL)",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect();
    // Wait for the lock to be released: the signal, not a sleep.
    loop {
        let held: i64 = sqlx::query(
            "SELECT COUNT(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.objsubid = 2 \
             AND l.objid::bigint IN (SELECT rollups_held_by FROM usage_batches \
             WHERE rollups_held_by IS NOT NULL)",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0);
        if held == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    conn.close().await.unwrap();
    killed.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_batch_is_rolled_up_once_whichever_node_writes_it() {
    if !common::postgres_reachable() {
        return;
    }
    let schema = common::PgSchema::create().await.unwrap();
    let a = Store::connect(&schema.url).await.unwrap();
    let b = Store::connect(&schema.url).await.unwrap();
    let id = key();

    // A holds its batch: nothing is in the tables yet, and B's reads do not see it.
    record(&a, uses(&id, 3, "10.0.0.1")).await;
    assert_eq!(in_tables(&schema.url).await, (0, 0, 1));
    assert_eq!(rolled_up(&b, &id).await, 0);
    // A's own read writes what it holds first.
    assert_eq!(rolled_up(&a, &id).await, 3);
    assert_eq!(in_tables(&schema.url).await, (3, 3, 0));

    // B does not take the batches of a node that lives.
    record(&a, uses(&id, 2, "10.0.0.2")).await;
    b.fold_usage_step(100).await.unwrap();
    assert_eq!(in_tables(&schema.url).await, (3, 3, 1));

    // A's lock is lost (its backend killed): B rolls its batch up from the log...
    assert_eq!(kill_node_locks(&schema.url).await, 1);
    b.fold_usage_step(100).await.unwrap();
    assert_eq!(in_tables(&schema.url).await, (5, 5, 0));
    assert_eq!(rolled_up(&b, &id).await, 5);
    // ...and A, still holding it in memory, does not write it again.
    a.fold_usage_step(100).await.unwrap();
    assert_eq!(in_tables(&schema.url).await, (5, 5, 0));

    // A goes on under a new lock, and A's next batch lands once too.
    record(&a, uses(&id, 4, "10.0.0.3")).await;
    assert_eq!(in_tables(&schema.url).await.2, 1);
    a.fold_usage_step(100).await.unwrap();
    assert_eq!(in_tables(&schema.url).await, (9, 9, 0));

    // Only some of what A holds is taken: B rolls up A's batch while A's lock is gone,
    // and A, not yet aware, stores one more under the dead lock. A's write finds the
    // first taken and writes only the second, from the log.
    record(&a, uses(&id, 1, "10.0.0.4")).await;
    assert_eq!(kill_node_locks(&schema.url).await, 1);
    b.fold_usage_step(100).await.unwrap();
    assert_eq!(in_tables(&schema.url).await, (10, 10, 0));
    record(&a, uses(&id, 6, "10.0.0.5")).await;
    assert_eq!(in_tables(&schema.url).await.2, 1);
    a.fold_usage_step(100).await.unwrap();
    assert_eq!(in_tables(&schema.url).await, (16, 16, 0));
    assert_eq!(rolled_up(&a, &id).await, 16);
    assert_eq!(rolled_up(&b, &id).await, 16);
    assert_eq!(in_tables(&schema.url).await, (16, 16, 0));

    a.close().await;
    b.close().await;
    schema.drop().await;
}

/// A node that stops cleanly writes what it holds; one that is dropped without stopping
/// leaves its batches to the others once its lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_holding_rollups_leaves_them_to_the_others() {
    if !common::postgres_reachable() {
        return;
    }
    let schema = common::PgSchema::create().await.unwrap();
    let survivor = Store::connect(&schema.url).await.unwrap();
    let id = key();
    {
        let dying = Store::connect(&schema.url).await.unwrap();
        record(&dying, uses(&id, 7, "192.0.2.9")).await;
        record(&dying, uses(&id, 2, "192.0.2.10")).await;
        assert_eq!(in_tables(&schema.url).await.2, 2);
        assert_eq!(kill_node_locks(&schema.url).await, 1);
        // Dropped without close or fold: what a crash leaves.
    }
    survivor.fold_usage_step(100).await.unwrap();
    assert_eq!(in_tables(&schema.url).await, (9, 9, 0));
    assert_eq!(rolled_up(&survivor, &id).await, 9);
    survivor.close().await;
    schema.drop().await;
}

/// The monitor starts over on a key from `known_sources`: on the node that holds a
/// key's rollups it must see their sources without a write of the held rollups, and it
/// must keep out the uses it is about to judge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_sources_include_what_this_node_holds() {
    if !common::postgres_reachable() {
        return;
    }
    let schema = common::PgSchema::create().await.unwrap();
    let a = Store::connect(&schema.url).await.unwrap();
    let b = Store::connect(&schema.url).await.unwrap();
    let id = key();
    let start = keywarden_core::clock::to_millis(datetime!(2026-12-05 00:00 UTC));
    let after = start + 24 * HOUR;
    record(&a, uses(&id, 2, "10.9.8.7")).await;
    assert_eq!(
        in_tables(&schema.url).await.2,
        1,
        "the batch is held, not written"
    );

    let known = a.known_sources(&id, start, after).await.unwrap();
    assert_eq!(known.networks, vec!["10.9.8.0/24".to_owned()]);
    assert_eq!(known.subjects, vec!["ci-runner".to_owned()]);
    // First seen at 10:00: not before 10:00.
    let first = keywarden_core::clock::to_millis(datetime!(2026-12-05 10:00 UTC));
    let early = a.known_sources(&id, start, first).await.unwrap();
    assert!(early.networks.is_empty() && early.subjects.is_empty());
    // Another node sees them once they are written, and then not twice.
    assert!(b
        .known_sources(&id, start, after)
        .await
        .unwrap()
        .networks
        .is_empty());
    a.fold_usage_step(100).await.unwrap();
    assert_eq!(
        b.known_sources(&id, start, after).await.unwrap().networks,
        vec!["10.9.8.0/24".to_owned()]
    );
    record(&a, uses(&id, 1, "10.9.8.8")).await;
    let known = a.known_sources(&id, start, after).await.unwrap();
    assert_eq!(known.networks, vec!["10.9.8.0/24".to_owned()]);
    assert_eq!(known.subjects, vec!["ci-runner".to_owned()]);

    a.close().await;
    b.close().await;
    schema.drop().await;
}
