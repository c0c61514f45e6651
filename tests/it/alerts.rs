//! Issue 5: KEY_STILL_IN_USE alerts when a dead key is presented, and `--wait` on a
//! state change until every connected service confirmed it.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{eventually, key_body, Backend, TestServer, WAIT};
use crate::on_both_backends;
use crate::receiver::Receiver;
use crate::services::{add_service, start};

async fn wait_for_alerts(s: &TestServer, query: &str, f: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let path = format!("/v1/alerts?{query}");
    eventually(WAIT, &format!("the expected alerts at {path}"), || async {
        let (st, v) = s.get(&path).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let alerts = v["alerts"].as_array().unwrap().clone();
        if f(&alerts) {
            Ok(alerts)
        } else {
            Err(v)
        }
    })
    .await
}

async fn dead_keys_presented_raise_alerts(b: Backend) {
    let s = start(b).await;
    let r = Receiver::start().await;
    add_service(
        &s,
        json!({ "name": "siem", "webhook_url": r.url, "events": ["alert"] }),
    )
    .await;
    let (id, key) = s.create_key(key_body("leaked")).await;
    let (live_id, live) = s.create_key(key_body("live")).await;
    let (st, _) = s
        .post(
            &format!("/v1/keys/{id}/revoke"),
            json!({ "reason": "leaked" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    s.clock.advance(time::Duration::hours(1));
    let from = |ip: &str| json!({ "key": key, "source_ip": ip, "subject": "host-1" });
    for _ in 0..3 {
        assert_eq!(s.verify(from("203.0.113.7")).await["code"], "REVOKED");
    }
    assert_eq!(s.verify(from("198.51.100.2")).await["code"], "REVOKED");
    // Neither a live key nor a wrong secret is an alert.
    assert_eq!(s.verify_code(&live).await, "VALID");
    let last = if key.ends_with('x') { 'y' } else { 'x' };
    let wrong = format!("{}{last}", &key[..key.len() - 1]);
    assert_ne!(s.verify_code(&wrong).await, "REVOKED");

    let alerts = wait_for_alerts(&s, &format!("key={id}"), |a| {
        a.len() == 2 && a.iter().any(|x| x["repeats"] == 2)
    })
    .await;
    let first = alerts
        .iter()
        .find(|a| a["source_ip"] == "203.0.113.7")
        .unwrap();
    assert_eq!(first["kind"], "KEY_STILL_IN_USE");
    assert_eq!(first["code"], "REVOKED");
    assert_eq!(first["subject"], "host-1");
    assert_eq!(first["user_agent"], "keywarden-tests/1");
    assert_eq!(
        first["dead_for_ms"], 3_600_000,
        "how long since the revocation"
    );
    assert_eq!(
        first["repeats"], 2,
        "repeats from one place count up one alert"
    );
    let (_, none) = s.get(&format!("/v1/alerts?key={live_id}")).await;
    assert_eq!(none["alerts"], json!([]));

    // Delivered to the service subscribed to `alert`, and in the audit trail.
    let got = r.wait_for(2, 10).await;
    assert!(got.iter().all(|g| g.json["type"] == "key.still_in_use"));
    assert_eq!(got[0].json["data"]["details"]["alert"], "KEY_STILL_IN_USE");
    assert_eq!(got[0].json["data"]["key_id"], id);
    let (_, audit) = s.get("/v1/audit?action=key.still_in_use").await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 2);

    // Suspended keys too; after the window a place raises a new alert.
    let (st, _) = s
        .post(&format!("/v1/keys/{live_id}/suspend"), json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s.verify_code(&live).await, "SUSPENDED");
    wait_for_alerts(&s, &format!("key={live_id}"), |a| {
        a.len() == 1 && a[0]["code"] == "SUSPENDED"
    })
    .await;
    s.clock.advance(time::Duration::minutes(10));
    assert_eq!(s.verify(from("203.0.113.7")).await["code"], "REVOKED");
    wait_for_alerts(&s, &format!("key={id}"), |a| a.len() == 3).await;

    // The CLI lists them.
    let (rc, out, err) = s.cli(&["alert", "list", "--key", &id, "--json"]).await;
    assert_eq!(rc, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["alerts"].as_array().unwrap().len(), 3);
    let (rc, out, _) = s.cli(&["alert", "list"]).await;
    assert_eq!(rc, 0);
    assert!(
        out.contains("203.0.113.7") && out.contains("SUSPENDED"),
        "{out}"
    );
    for bad in [
        "key=nope",
        "since=yesterday",
        "limit=0",
        "cursor=x",
        "what=1",
    ] {
        let (st, v) = s.get(&format!("/v1/alerts?{bad}")).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    s.stop().await;
}

async fn services_through_the_cli_and_revoke_wait(b: Backend) {
    let s = start(b).await;
    let r = Receiver::start().await;
    let (rc, out, err) = s
        .cli(&[
            "service",
            "add",
            "edge",
            "--webhook",
            &r.url,
            "--events",
            "revoke,alert",
        ])
        .await;
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("whsec_"), "the secret is shown once: {out}");
    let (rc, out, _) = s.cli(&["service", "test", "edge"]).await;
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("HTTP 200"), "{out}");
    let got = r.wait_for(1, 5).await;
    assert_eq!(got[0].json["type"], "service.test");

    // Every service confirms: --wait exits 0.
    let (id, _) = s.create_key(key_body("waited")).await;
    let (rc, out, err) = s
        .cli(&[
            "key",
            "revoke",
            &id,
            "--reason",
            "rotated out",
            "--wait",
            "10s",
        ])
        .await;
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("1 of 1 services confirmed"), "{out}");

    // A pull service that never acks: --wait exits 1 and names it.
    let (rc, _, err) = s.cli(&["service", "add", "cache"]).await;
    assert_eq!(rc, 0, "{err}");
    let (id2, _) = s.create_key(key_body("unconfirmed")).await;
    let (rc, out, err) = s.cli(&["key", "revoke", &id2, "--wait", "1s"]).await;
    assert_eq!(rc, 1, "{out}{err}");
    assert!(err.contains("cache (pending)"), "{err}");
    assert!(!err.contains("edge"), "edge confirmed: {err}");

    let (rc, out, _) = s.cli(&["service", "list", "--json"]).await;
    assert_eq!(rc, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["services"].as_array().unwrap().len(), 2);
    let (rc, out, _) = s.cli(&["service", "show", "edge"]).await;
    assert_eq!(rc, 0);
    assert!(
        out.contains("revoked") && out.contains("confirmed"),
        "{out}"
    );
    let (rc, _, err) = s.cli(&["service", "test", "cache"]).await;
    assert_eq!(rc, 2, "a pull service has no webhook: {err}");
    let (rc, _, err) = s
        .cli(&["service", "add", "bad", "--events", "revoked"])
        .await;
    assert_eq!(rc, 2);
    assert!(err.contains("unknown event \"revoked\""), "{err}");
    let (rc, _, err) = s.cli(&["key", "revoke", &id2, "--wait", "soon"]).await;
    assert_eq!(rc, 2);
    assert!(err.contains("--wait"), "{err}");
    let (rc, _, _) = s.cli(&["service", "remove", "cache"]).await;
    assert_eq!(rc, 0);
    let (rc, _, err) = s.cli(&["service", "remove", "cache"]).await;
    assert_eq!(rc, 2);
    assert!(
        err.contains("SERVICE_NOT_FOUND") || err.contains("no service"),
        "{err}"
    );
    s.stop().await;
}

on_both_backends!(
    dead_keys_presented_raise_alerts,
    services_through_the_cli_and_revoke_wait,
    alerts_deduplicate_on_the_source_network,
    environment_limits_apply_to_alerts_and_the_plan,
);

/// An issuer token limited to `dev` reads neither prod alerts (addresses, user agents,
/// subjects) nor the prod part of the enforcement plan.
async fn environment_limits_apply_to_alerts_and_the_plan(b: Backend) {
    let s = start(b).await;
    let mut ids = Vec::new();
    for env in ["prod", "dev"] {
        let mut body = key_body(&format!("{env}-key"));
        body["environment"] = json!(env);
        let (id, key) = s.create_key(body).await;
        let (st, _) = s
            .post(&format!("/v1/keys/{id}/revoke"), json!({ "reason": "x" }))
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            s.verify(json!({ "key": key, "source_ip": "198.51.100.9" }))
                .await["code"],
            "REVOKED"
        );
        ids.push(id);
    }
    let mut body = key_body("prod-live");
    body["environment"] = json!("prod");
    s.create_key(body).await;
    let mut body = key_body("dev-live");
    body["environment"] = json!("dev");
    let (dev_live, _) = s.create_key(body).await;
    wait_for_alerts(&s, "", |a| a.len() == 2).await;

    let dev = s.token("issuer", Some(vec!["dev"])).await;
    let (st, v) = s
        .call(reqwest::Method::GET, "/v1/alerts", Some(&dev), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let seen: Vec<&str> = v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(seen, vec![ids[1].as_str()], "only the dev key's alert: {v}");
    let (st, v) = s
        .call(
            reqwest::Method::GET,
            &format!("/v1/alerts?key={}", ids[0]),
            Some(&dev),
            None,
        )
        .await;
    assert_eq!(
        (st, v["alerts"].clone()),
        (StatusCode::OK, json!([])),
        "{v}"
    );

    // Far in the future every live key has ended: the plan shows only dev's.
    let (st, v) = s
        .call(
            reqwest::Method::GET,
            "/v1/enforce/plan?at=2030-01-01T00:00:00Z",
            Some(&dev),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let planned: Vec<&str> = v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(planned, vec![dev_live.as_str()], "{v}");
    let (_, all) = s.get("/v1/enforce/plan?at=2030-01-01T00:00:00Z").await;
    assert_eq!(
        all["actions"].as_array().unwrap().len(),
        2,
        "the admin sees both: {all}"
    );
    s.stop().await;
}

/// A client that changes its user agent, subject and address within one network on
/// every request raises one alert, whose repeats count the rest; another network is
/// another alert.
async fn alerts_deduplicate_on_the_source_network(b: Backend) {
    let s = start(b).await;
    let (id, key) = s.create_key(key_body("dead")).await;
    let (st, _) = s
        .post(
            &format!("/v1/keys/{id}/revoke"),
            json!({ "reason": "leaked" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    for i in 0..60 {
        let resp = s
            .http
            .post(s.url("/v1/verify"))
            .bearer_auth(&s.admin)
            .header("user-agent", format!("scanner/{i}"))
            .json(
                &json!({ "key": key, "source_ip": format!("203.0.113.{}", i + 1),
                           "subject": format!("host-{i}") }),
            )
            .send()
            .await
            .unwrap();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["code"], "REVOKED");
    }
    for ip in ["2001:db8::1", "2001:db8::2:3"] {
        assert_eq!(
            s.verify(json!({ "key": key, "source_ip": ip })).await["code"],
            "REVOKED"
        );
    }
    let alerts = wait_for_alerts(&s, &format!("key={id}"), |a| {
        a.len() == 2 && a.iter().any(|x| x["repeats"] == 59) && a.iter().any(|x| x["repeats"] == 1)
    })
    .await;
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    let (_, v) = s
        .get(&format!("/v1/audit?key={id}&action=key.still_in_use"))
        .await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 2, "{v}");
    s.stop().await;
}
