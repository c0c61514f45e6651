//! Issue 7: two server processes on one PostgreSQL database, behind no balancer: a
//! revocation through one is honoured by the other within the bound, one-time keys stay
//! exact across both, and so are rate limits, one alert raised on both is one alert,
//! background jobs run once, and the survivor takes them over when a node dies.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{eventually, postgres_or_skip, PgSchema, WAIT};
use crate::process::serve_with;
use crate::receiver::Receiver;

struct Node {
    base: String,
    http: reqwest::Client,
    admin: String,
}

impl Node {
    async fn post(&self, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    async fn get(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    async fn verify(&self, key: &str) -> String {
        self.post("/v1/verify", json!({ "key": key })).await["code"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn key(&self, name: &str, extra: Value) -> (String, String) {
        let mut body = json!({
            "name": name, "owner": "alice@example.com", "environment": "prod",
            "systems": ["github"], "scopes": ["deploy:write"], "ttl": "1d",
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let v = self.post("/v1/keys", body).await;
        (
            v["key"]["id"].as_str().unwrap().to_owned(),
            v["secret"].as_str().unwrap().to_owned(),
        )
    }
}

/// The bound ARCHITECTURE.md states: a change is honoured by every node within the
/// cluster poll (1 s) of its commit, usually within milliseconds (NOTIFY). The test
/// allows twice that for a loaded CI machine.
const BOUND: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_share_revocations_counters_and_jobs() {
    if postgres_or_skip().is_none() {
        return;
    }
    // Dropped last, after both nodes are killed (they drop in reverse order).
    let schema = PgSchema::create().await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = [
        "--database-url",
        schema.url.as_str(),
        "--enforcer-interval",
        "1s",
    ];
    // Both nodes share the data directory's pepper and signing key, as deployments
    // share them (docs/deploy.md).
    let mut a = serve_with(&data, &args);
    let mut b = serve_with(&data, &args);
    assert!(
        b.bootstrap.is_empty(),
        "the second node finds the store bootstrapped"
    );
    let http = reqwest::Client::new();
    let node = |s: &crate::process::Served| Node {
        base: s.base.clone(),
        http: http.clone(),
        admin: a.bootstrap.clone(),
    };
    let (na, nb) = (node(&a), node(&b));
    let r = Receiver::start().await;
    na.post(
        "/v1/services",
        json!({ "name": "hooks", "webhook_url": r.url, "events": ["revoke", "expire"] }),
    )
    .await;

    // A revocation through A is refused by B, which had the key cached.
    let (id, key) = na.key("shared", json!({})).await;
    assert_eq!(nb.verify(&key).await, "VALID");
    assert_eq!(nb.verify(&key).await, "VALID");
    na.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;
    eventually(BOUND, "node B to refuse a key revoked on A", || async {
        nb.verify(&key).await == "REVOKED"
    })
    .await;

    // Exact one-time use across nodes.
    let (_, once) = na.key("once", json!({ "max_uses": 1 })).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let n = if i % 2 == 0 { node(&a) } else { node(&b) };
        let once = once.clone();
        tasks.push(tokio::spawn(async move { n.verify(&once).await }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert_eq!(
        codes.iter().filter(|c| *c == "VALID").count(),
        1,
        "{codes:?}"
    );
    assert_eq!(codes.iter().filter(|c| *c == "USAGE_EXHAUSTED").count(), 49);

    // A rate limit is one limit for the cluster, not one per node: 60 verifies spread
    // over both nodes within a few seconds pass 10 (the burst of 10/min; the next use is
    // due 6 s later), where per-node limits would pass 20.
    let (_, limited) = na.key("limited", json!({ "rate_limit": "10/min" })).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let n = if i % 2 == 0 { node(&a) } else { node(&b) };
        let limited = limited.clone();
        tasks.push(tokio::spawn(async move { n.verify(&limited).await }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    let valid = codes.iter().filter(|c| *c == "VALID").count();
    assert!(
        (10..=11).contains(&valid),
        "{valid} passed: {codes:?} (11 only if the run took over 6 s)"
    );
    assert_eq!(
        codes.iter().filter(|c| *c == "RATE_LIMITED").count(),
        60 - valid
    );

    // The same for a fast key under a concurrent burst: 200 verifies at once over both
    // nodes pass the burst of 50 plus what the elapsed time frees (one every 20 ms), where
    // per-node limits would pass 100 and more.
    let (_, fast) = na.key("fast", json!({ "rate_limit": "50/s" })).await;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let n = if i % 2 == 0 { node(&a) } else { node(&b) };
        let fast = fast.clone();
        tasks.push(tokio::spawn(async move { n.verify(&fast).await }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let valid = codes.iter().filter(|c| *c == "VALID").count();
    let bound = 50 + (50.0 * elapsed).ceil() as usize;
    assert!(
        (50..=bound).contains(&valid),
        "{valid} passed in {elapsed:.2}s, bound {bound}: {codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| *c == "RATE_LIMITED").count(),
        200 - valid
    );

    // The same alert raised on both nodes is one alert: a canary presented through A and
    // B from one network folds into a single CANARY_USED.
    let (canary_id, canary) = na.key("tripwire", json!({ "canary": true })).await;
    for n in [&na, &nb, &na, &nb] {
        let v = n
            .post(
                "/v1/verify",
                json!({ "key": canary, "source_ip": "192.0.2.10" }),
            )
            .await;
        assert_eq!(v["code"], "NOT_FOUND");
    }
    eventually(WAIT, "one CANARY_USED alert with three repeats", || async {
        let v = na.get(&format!("/v1/alerts?key={canary_id}")).await;
        let alerts = v["alerts"].as_array().unwrap().clone();
        if alerts.len() == 1 && alerts[0]["repeats"] == 3 {
            Ok(())
        } else {
            Err(v)
        }
    })
    .await;

    // The dispatcher runs on one node: the revocation is delivered once, not twice. Once
    // its delivery is recorded as confirmed no dispatcher sends it again, so a second one
    // would have sent it by then.
    r.wait_for(1, 10).await;
    eventually(
        WAIT,
        "the revocation's delivery to be confirmed",
        || async {
            let k = nb.get(&format!("/v1/keys/{id}")).await;
            if k["propagation"]["confirmed"] == 1 {
                Ok(())
            } else {
                Err(k["propagation"].clone())
            }
        },
    )
    .await;
    let revokes = r
        .received()
        .iter()
        .filter(|x| x.json["type"] == "key.revoked" && x.json["data"]["key_id"] == id.as_str())
        .count();
    assert_eq!(revokes, 1, "both nodes delivered");

    // A holds the usage rollups of its verifies for up to 10 s before writing them.
    let (held_id, held_key) = na.key("held", json!({})).await;
    for _ in 0..5 {
        assert_eq!(na.verify(&held_key).await, "VALID");
    }
    eventually(BOUND, "A's five uses to be in the usage log", || async {
        let v = nb.get(&format!("/v1/keys/{held_id}/usage?limit=100")).await;
        if v["events"].as_array().map_or(0, Vec::len) == 5 {
            Ok(())
        } else {
            Err(v)
        }
    })
    .await;

    // Node A dies (SIGKILL); B serves alone and takes the jobs over.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // What A held is rolled up by B from the log once A's node lock is gone, exactly
    // once (unless A's own 10 s write came first, which leaves the same count).
    eventually(
        Duration::from_secs(30),
        "B to roll up the uses A held when it died",
        || async {
            let v = nb.get(&format!("/v1/keys/{held_id}/usage/stats")).await;
            if v["total"]["events"] == 5 {
                Ok(())
            } else {
                Err(v["total"].clone())
            }
        },
    )
    .await;
    let (id2, key2) = nb.key("after", json!({})).await;
    assert_eq!(nb.verify(&key2).await, "VALID");
    nb.post(&format!("/v1/keys/{id2}/revoke"), json!({})).await;
    // Real time: the key's two seconds pass on the nodes' own clocks.
    let (id3, _) = nb.key("short", json!({ "ttl": "2s" })).await;
    let has = |t: &str, k: &str| {
        r.received()
            .iter()
            .any(|x| x.json["type"] == t && x.json["data"]["key_id"] == k)
    };
    eventually(
        Duration::from_secs(20),
        "B to take over the dispatcher and the enforcer",
        || async {
            if has("key.revoked", &id2) && has("key.expired", &id3) {
                Ok(())
            } else {
                Err(format!(
                    "{:?}",
                    r.received()
                        .iter()
                        .map(|x| x.json["type"].clone())
                        .collect::<Vec<_>>()
                ))
            }
        },
    )
    .await;
    let v = nb
        .get(&format!("/v1/audit?key={id3}&action=key.expired"))
        .await;
    assert_eq!(v["entries"][0]["actor"], "system:enforcer");

    b.child.kill().unwrap();
    b.child.wait().unwrap();
    drop((a, b));
    schema.drop_now().await;
}

/// Two deployments in separate schemas of one database each run their own dispatcher:
/// the job locks are keyed by schema, so neither waits for the other to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_in_separate_schemas_do_not_share_job_locks() {
    let Some(b) = postgres_or_skip() else {
        return;
    };
    let one = crate::services::start(b).await;
    let two = crate::services::start(b).await;
    for s in [&one, &two] {
        let r = Receiver::start().await;
        crate::services::add_service(s, json!({ "name": "edge", "webhook_url": r.url })).await;
        let (id, _) = s.create_key(crate::harness::key_body("k")).await;
        let (st, v) = s.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;
        assert_eq!(st, reqwest::StatusCode::OK, "{v}");
        let got = r.wait_for(1, 10).await;
        assert_eq!(
            got.len(),
            1,
            "each deployment delivers while the other runs"
        );
    }
    one.stop().await;
    two.stop().await;
}
