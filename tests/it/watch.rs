//! Watching keys: per-key rate limits, the throttle of sources presenting bad keys,
//! canary keys, and the alerts the monitor raises (SECRET_GUESSING, BRUTE_FORCE,
//! SCOPE_PROBING, ENVIRONMENT_CROSSING, CANARY_USED) with their states.

use keywarden_core::key_format::{assemble, parse};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{eventually, key_body, Backend, TestServer, WAIT};
use crate::on_both_backends;

on_both_backends!(
    a_key_past_its_rate_limit_answers_rate_limited,
    wrong_secrets_raise_secret_guessing_and_throttle_only_their_source,
    a_canary_never_verifies_and_raises_a_critical_alert,
    junk_from_one_source_raises_brute_force,
    denied_scopes_and_other_environments_raise_alerts,
    alerts_are_acknowledged_and_resolved,
    the_policy_suspends_or_throttles_in_response,
    unusual_use_raises_rate_spike_new_source_and_new_subject,
    a_scan_finds_a_canary_and_leaves_it_alone,
    alerts_reach_people_as_slack_messages,
    owners_are_mailed_about_their_keys,
    source_alerts_reach_services_and_the_security_contact,
);

async fn put_policy(s: &TestServer, text: &str) {
    let (st, v) = s
        .call(
            reqwest::Method::PUT,
            "/v1/policy",
            Some(&s.admin),
            Some(json!({ "policy": text })),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

/// A verify answer with its `Retry-After` header.
async fn verify_raw(s: &TestServer, body: Value) -> (Value, Option<String>) {
    let resp = s
        .http
        .post(s.url("/v1/verify"))
        .bearer_auth(&s.admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (resp.json().await.unwrap(), retry)
}

/// The key's id with another secret and a valid checksum: a guess that reaches the hash.
fn wrong_secret(key: &str) -> String {
    let parsed = parse(key, "kw").unwrap();
    assemble("kw", &parsed.environment, parsed.id, &"y".repeat(32))
        .plain
        .expose()
        .to_owned()
}

async fn alerts_of(s: &TestServer, query: &str, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let path = format!("/v1/alerts?{query}");
    eventually(WAIT, &format!("the expected alerts at {path}"), || async {
        let (st, v) = s.get(&path).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let alerts = v["alerts"].as_array().unwrap().clone();
        if ready(&alerts) {
            Ok(alerts)
        } else {
            Err(v)
        }
    })
    .await
}

async fn a_key_past_its_rate_limit_answers_rate_limited(b: Backend) {
    let s = TestServer::start(b).await;
    let mut body = key_body("limited");
    body["rate_limit"] = json!("5/min");
    let (id, key) = s.create_key(body).await;
    let (_, other) = s.create_key(key_body("unlimited")).await;
    let (_, shown) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(shown["rate_limit"], "5/min");

    for i in 0..5 {
        assert_eq!(s.verify_code(&key).await, "VALID", "use {i}");
    }
    let (v, retry) = verify_raw(&s, json!({ "key": key })).await;
    assert_eq!(v["code"], "RATE_LIMITED", "{v}");
    assert_eq!(v["valid"], false);
    assert_eq!(v["key_id"], id.as_str());
    // One use every 12 s once the burst of 5 is spent.
    assert_eq!(v["retry_after_ms"], 12_000, "{v}");
    assert_eq!(retry.as_deref(), Some("12"));
    // Other keys are not held back.
    for _ in 0..10 {
        assert_eq!(s.verify_code(&other).await, "VALID");
    }
    s.clock.advance(time::Duration::seconds(11));
    assert_eq!(s.verify_code(&key).await, "RATE_LIMITED");
    s.clock.advance(time::Duration::seconds(1));
    assert_eq!(s.verify_code(&key).await, "VALID");
    assert_eq!(s.verify_code(&key).await, "RATE_LIMITED");
    // The refusals are in the usage log.
    let usage = s.wait_for_usage(&id, 9).await;
    let limited = usage["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["code"] == "RATE_LIMITED")
        .count();
    assert_eq!(limited, 3, "{usage}");

    // The policy's maximum is checked at issue time, and its default applied.
    put_policy(
        &s,
        "[environments.prod]\nrate_limit = \"60/min\"\nmax_rate_limit = \"100/min\"\n",
    )
    .await;
    let mut fast = key_body("fast");
    fast["rate_limit"] = json!("10/s");
    let (st, v) = s.post("/v1/keys", fast).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(
        v["error"]["violations"][0]["code"], "POLICY_RATE_LIMIT_TOO_HIGH",
        "{v}"
    );
    let mut junk = key_body("junk");
    junk["rate_limit"] = json!("lots");
    let (st, v) = s.post("/v1/keys", junk).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["violations"][0]["field"], "rate_limit", "{v}");
    assert!(
        v["error"]["violations"][0]["message"]
            .as_str()
            .unwrap()
            .contains("COUNT/PERIOD"),
        "{v}"
    );
    let (st, v) = s.post("/v1/keys", key_body("defaulted")).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["key"]["rate_limit"], "60/min");
    s.stop().await;
}

async fn wrong_secrets_raise_secret_guessing_and_throttle_only_their_source(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, key) = s.create_key(key_body("target")).await;
    let guess = wrong_secret(&key);
    let attacker = |k: &str| json!({ "key": k, "source_ip": "203.0.113.9" });
    let honest = json!({ "key": key, "source_ip": "198.51.100.1" });
    let mut codes = Vec::new();
    let mut retry_after = None;
    for _ in 0..50 {
        let (v, retry) = verify_raw(&s, attacker(&guess)).await;
        codes.push(v["code"].as_str().unwrap().to_owned());
        if retry.is_some() {
            retry_after = retry;
        }
        // The key's owner, elsewhere, is never held back.
        assert_eq!(s.verify(honest.clone()).await["code"], "VALID");
    }
    // The default throttle: 30 bad keys a minute, then one every 2 s.
    assert!(codes[..30].iter().all(|c| c == "NOT_FOUND"), "{codes:?}");
    assert!(codes[30..].iter().all(|c| c == "RATE_LIMITED"), "{codes:?}");
    assert_eq!(retry_after.as_deref(), Some("2"));
    // Throttled is throttled, even with the right key.
    assert_eq!(
        s.verify(attacker(&key)).await["code"],
        "RATE_LIMITED",
        "a throttled source is not heard"
    );
    s.clock.advance(time::Duration::seconds(2));
    assert_eq!(s.verify(attacker(&key)).await["code"], "VALID");

    let alerts = alerts_of(&s, "kind=SECRET_GUESSING", |a| {
        a.len() == 1 && a[0]["repeats"].as_i64() >= Some(19)
    })
    .await;
    let a = &alerts[0];
    assert_eq!(a["severity"], "high");
    assert_eq!(a["key_id"], id.as_str());
    assert_eq!(a["code"], "NOT_FOUND");
    assert_eq!(a["state"], "open");
    // The default threshold is 10 in 5 minutes: the 11th wrong secret trips it.
    assert_eq!(a["evidence"]["events"], 11, "{a}");
    assert_eq!(a["evidence"]["threshold"], "10/5m");
    assert_eq!(a["evidence"]["sources"], json!(["203.0.113.9"]));
    // Raised by the monitor, in the trail.
    let (_, trail) = s.get(&format!("/v1/audit?target=key:{id}")).await;
    let raised = trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "key.alert")
        .cloned()
        .unwrap_or_else(|| panic!("no key.alert entry: {trail}"));
    assert_eq!(raised["actor"], "system:monitor");
    assert!(
        !raised.to_string().contains(&guess[10..]),
        "no secret in the trail"
    );
    s.stop().await;
}

async fn a_canary_never_verifies_and_raises_a_critical_alert(b: Backend) {
    let s = TestServer::start(b).await;
    let mut body = key_body("tripwire");
    body["canary"] = json!(true);
    body["ttl"] = json!("365d");
    let (id, canary) = s.create_key(body).await;
    let (_, shown) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(shown["canary"], true);
    assert!(canary.starts_with("kw_prod_"), "looks like any key");

    // It answers exactly as a key that does not exist.
    let presented = s
        .verify(json!({ "key": canary, "source_ip": "192.0.2.44", "scope": "deploy:write" }))
        .await;
    let unknown = s
        .verify(json!({ "key": wrong_secret(&canary), "source_ip": "192.0.2.45" }))
        .await;
    assert_eq!(presented, unknown);
    assert_eq!(presented, json!({ "valid": false, "code": "NOT_FOUND" }));

    let alerts = alerts_of(&s, "kind=CANARY_USED", |a| a.len() == 1).await;
    let a = &alerts[0];
    assert_eq!(a["severity"], "critical");
    assert_eq!(a["key_id"], id.as_str());
    assert_eq!(a["source_ip"], "192.0.2.44");
    assert_eq!(a["user_agent"], "keywarden-tests/1");

    // A canary is never used, by design: idle expiry and rotation leave it alone.
    s.clock.advance(time::Duration::days(40));
    let (st, _) = s.post("/v1/enforce", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let (_, shown) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(shown["state"], "active", "{shown}");
    // Presented again later: the alarm again, folded into a new alert past the window.
    s.verify(json!({ "key": canary, "source_ip": "192.0.2.44" }))
        .await;
    alerts_of(&s, "kind=CANARY_USED", |a| a.len() == 2).await;
    s.stop().await;
}

async fn junk_from_one_source_raises_brute_force(b: Backend) {
    let s = TestServer::start(b).await;
    put_policy(&s, "[default]\nthrottle_failures = \"off\"\n").await;
    for i in 0..60 {
        let junk = if i % 2 == 0 {
            "not-a-key".to_owned()
        } else {
            format!("kw_prod_{:016}_{}", i, "a".repeat(38))
        };
        let v = s
            .verify(json!({ "key": junk, "source_ip": "2001:db8::7" }))
            .await;
        assert_ne!(v["code"], "RATE_LIMITED", "throttling is off");
    }
    let alerts = alerts_of(&s, "kind=BRUTE_FORCE", |a| a.len() == 1).await;
    let a = &alerts[0];
    assert_eq!(a["severity"], "medium");
    assert_eq!(a["key_id"], Value::Null);
    assert_eq!(a["source_ip"], "2001:db8::7");
    assert_eq!(a["evidence"]["events"], 51, "{a}");
    assert_eq!(a["evidence"]["threshold"], "50/min");
    let (_, trail) = s.get("/v1/audit?action=source.alert").await;
    assert_eq!(
        trail["entries"][0]["target"], "source:2001:db8::/64",
        "{trail}"
    );
    s.stop().await;
}

async fn denied_scopes_and_other_environments_raise_alerts(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, key) = s.create_key(key_body("prober")).await;
    for i in 0..12 {
        let v = s
            .verify(json!({ "key": key, "scope": format!("admin:thing{i}") }))
            .await;
        assert_eq!(v["code"], "SCOPE_DENIED");
    }
    let alerts = alerts_of(&s, "kind=SCOPE_PROBING", |a| a.len() == 1).await;
    assert_eq!(alerts[0]["key_id"], id.as_str());
    assert_eq!(alerts[0]["evidence"]["events"], 11);

    let v = s
        .verify(json!({ "key": key, "environment": "staging" }))
        .await;
    assert_eq!(v["code"], "ENVIRONMENT_MISMATCH");
    let alerts = alerts_of(&s, "kind=ENVIRONMENT_CROSSING", |a| a.len() == 1).await;
    assert_eq!(alerts[0]["evidence"]["key_environment"], "prod");
    assert_eq!(alerts[0]["evidence"]["asked_environment"], "staging");
    // Valid uses raise nothing.
    assert_eq!(s.verify_code(&key).await, "VALID");
    let (_, all) = s.get(&format!("/v1/alerts?key={id}")).await;
    assert_eq!(all["alerts"].as_array().unwrap().len(), 2, "{all}");
    s.stop().await;
}

async fn alerts_are_acknowledged_and_resolved(b: Backend) {
    let s = TestServer::start(b).await;
    let mut body = key_body("tripwire");
    body["canary"] = json!(true);
    let (_, canary) = s.create_key(body).await;
    s.verify(json!({ "key": canary, "source_ip": "192.0.2.1" }))
        .await;
    let alerts = alerts_of(&s, "state=open", |a| a.len() == 1).await;
    let seq = alerts[0]["seq"].as_i64().unwrap();

    let auditor = s.token("auditor", None).await;
    let (st, v) = s
        .call(
            reqwest::Method::POST,
            &format!("/v1/alerts/{seq}/ack"),
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "auditors see, never act: {v}");
    let (st, v) = s
        .call(
            reqwest::Method::GET,
            &format!("/v1/alerts/{seq}"),
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!((st, v["state"].as_str()), (StatusCode::OK, Some("open")));

    let (st, v) = s
        .post(
            &format!("/v1/alerts/{seq}/ack"),
            json!({ "reason": "looking at the CI logs" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "acknowledged");
    assert_eq!(v["state_reason"], "looking at the CI logs");
    assert!(v["state_changed_by"]
        .as_str()
        .unwrap()
        .starts_with("token:"));
    // Repeats still fold into an acknowledged alert.
    s.verify(json!({ "key": canary, "source_ip": "192.0.2.1" }))
        .await;
    alerts_of(&s, "", |a| a.len() == 1 && a[0]["repeats"] == 1).await;

    let (st, v) = s
        .post(
            &format!("/v1/alerts/{seq}/resolve"),
            json!({ "reason": "planted by the red team" }),
        )
        .await;
    assert_eq!(
        (st, v["state"].as_str()),
        (StatusCode::OK, Some("resolved"))
    );
    let (st, v) = s
        .post(&format!("/v1/alerts/{seq}/resolve"), json!({}))
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "INVALID_STATE");
    let (st, v) = s.post("/v1/alerts/999999/ack", json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "ALERT_NOT_FOUND");
    let (st, _) = s.post("/v1/alerts/abc/ack", json!({})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, v) = s.get("/v1/alerts?state=closed").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    // The next sighting after the resolve is a new alert.
    s.verify(json!({ "key": canary, "source_ip": "192.0.2.1" }))
        .await;
    alerts_of(&s, "state=open", |a| {
        a.len() == 1 && a[0]["seq"].as_i64() != Some(seq)
    })
    .await;
    let (_, trail) = s.get(&format!("/v1/audit?target=alert:{seq}")).await;
    let actions: Vec<&str> = trail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["alert.acknowledged", "alert.resolved"], "{trail}");
    s.stop().await;
}

async fn the_policy_suspends_or_throttles_in_response(b: Backend) {
    let s = crate::services::start(b).await;
    let r = crate::receiver::Receiver::start().await;
    crate::services::add_service(
        &s,
        json!({ "name": "siem", "webhook_url": r.url, "events": ["alert", "suspend"] }),
    )
    .await;
    put_policy(
        &s,
        "[environments.prod]\nalert_actions = { SECRET_GUESSING = \"suspend\", \
         SCOPE_PROBING = \"throttle\" }\n",
    )
    .await;
    let (id, key) = s.create_key(key_body("guessed")).await;
    let guess = wrong_secret(&key);
    for _ in 0..11 {
        s.verify(json!({ "key": guess, "source_ip": "203.0.113.50" }))
            .await;
    }
    // Suspended by the monitor, within the second, for everyone.
    eventually(WAIT, "the guessed key to be suspended", || async {
        let code = s.verify_code(&key).await;
        if code == "SUSPENDED" {
            Ok(())
        } else {
            Err(code)
        }
    })
    .await;
    let (_, k) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(k["state_cause"], "ALERT_RESPONSE", "{k}");
    assert!(
        k["state_reason"]
            .as_str()
            .unwrap()
            .starts_with("SECRET_GUESSING alert "),
        "{k}"
    );
    let (_, trail) = s
        .get(&format!("/v1/audit?key={id}&action=key.suspended"))
        .await;
    assert_eq!(trail["entries"][0]["actor"], "system:monitor", "{trail}");
    // Delivered like any suspend, after the alert that caused it (and the suspended key
    // presented above is a KEY_STILL_IN_USE of its own).
    let got = r.wait_for(2, 10).await;
    let types: Vec<&str> = got
        .iter()
        .map(|x| x.json["type"].as_str().unwrap())
        .collect();
    assert_eq!(types[..2], ["key.alert", "key.suspended"], "{types:?}");

    // Throttle: the probing source is held back at once, before its own failures would.
    let (_, other) = s.create_key(key_body("probed")).await;
    for i in 0..11 {
        let v = s
            .verify(
                json!({ "key": other, "scope": format!("x:{i}"), "source_ip": "198.51.100.77" }),
            )
            .await;
        assert_eq!(v["code"], "SCOPE_DENIED");
    }
    eventually(WAIT, "the probing source to be throttled", || async {
        let v = s
            .verify(json!({ "key": other, "scope": "deploy:write", "source_ip": "198.51.100.77" }))
            .await;
        if v["code"] == "RATE_LIMITED" {
            Ok(())
        } else {
            Err(v)
        }
    })
    .await;
    let v = s
        .verify(json!({ "key": other, "scope": "deploy:write", "source_ip": "198.51.100.78" }))
        .await;
    assert_eq!(v["code"], "VALID", "only that source");
    s.stop().await;
}

async fn unusual_use_raises_rate_spike_new_source_and_new_subject(b: Backend) {
    let s = TestServer::start(b).await;
    put_policy(&s, "[environments.prod]\nalert_warmup = \"1h\"\n").await;
    let (id, key) = s.create_key(key_body("steady")).await;
    let from = |ip: &str, subject: &str| json!({ "key": key, "source_ip": ip, "subject": subject });
    // Seventy minutes of steady use, 10 a minute from two networks and one host; a
    // third network shows up during the warm-up, which learns it quietly.
    for minute in 0..70 {
        for i in 0..10 {
            let ip = if i % 2 == 0 { "10.0.0.1" } else { "10.0.1.1" };
            assert_eq!(s.verify(from(ip, "host-1")).await["code"], "VALID");
        }
        if minute == 5 {
            s.verify(from("172.16.0.9", "host-1")).await;
        }
        s.clock.advance(time::Duration::minutes(1));
    }
    s.verify(from("10.0.0.1", "host-1")).await;
    s.verify(from("192.0.2.1", "host-1")).await;
    s.verify(from("10.0.0.1", "host-2")).await;
    let alerts = alerts_of(&s, &format!("key={id}"), |a| a.len() == 2).await;
    let new_source = alerts.iter().find(|a| a["kind"] == "NEW_SOURCE").unwrap();
    assert_eq!(new_source["source_ip"], "192.0.2.1");
    assert_eq!(new_source["evidence"]["network"], "192.0.2.0/24");
    assert_eq!(
        new_source["evidence"]["known_networks"], 3,
        "two steady, one in the warm-up"
    );
    let new_subject = alerts.iter().find(|a| a["kind"] == "NEW_SUBJECT").unwrap();
    assert_eq!(new_subject["subject"], "host-2");
    assert_eq!(new_subject["severity"], "low");

    // Then ten times the usual rate in one minute.
    s.clock.advance(time::Duration::minutes(1));
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..150 {
        let v = s.verify(from("10.0.0.1", "host-1")).await;
        *codes
            .entry(v["code"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(codes.get("VALID"), Some(&150), "{codes:?}");
    // The threshold: 10 times a baseline of about 10 a minute. Every use past it is a
    // repeat of the one alert.
    let alerts = alerts_of(&s, &format!("key={id}&kind=RATE_SPIKE"), |a| {
        a.len() == 1
            && a[0]["evidence"]["uses_this_minute"]
                .as_i64()
                .is_some_and(|first| a[0]["repeats"].as_i64() == Some(150 - first))
    })
    .await;
    let spike = &alerts[0];
    assert_eq!(spike["severity"], "high");
    let first = spike["evidence"]["uses_this_minute"].as_u64().unwrap();
    assert!((95..=105).contains(&first), "{spike}");
    assert_eq!(spike["evidence"]["factor"], 10);
    let (_, all) = s.get(&format!("/v1/alerts?key={id}")).await;
    assert_eq!(all["alerts"].as_array().unwrap().len(), 3, "{all}");

    // After a restart the key starts from its rollups: its known networks raise
    // nothing, a new one is still new.
    let mut s = s;
    s.restart().await;
    s.clock.advance(time::Duration::minutes(10));
    s.verify(from("10.0.1.1", "host-1")).await;
    s.verify(from("192.0.2.1", "host-2")).await;
    s.verify(from("198.51.100.9", "host-1")).await;
    let alerts = alerts_of(&s, &format!("key={id}&kind=NEW_SOURCE"), |a| a.len() == 2).await;
    assert_eq!(
        alerts[0]["evidence"]["network"], "198.51.100.0/24",
        "{alerts:?}"
    );
    let (_, all) = s.get(&format!("/v1/alerts?key={id}")).await;
    assert_eq!(all["alerts"].as_array().unwrap().len(), 4, "{all}");
    s.stop().await;
}

async fn a_scan_finds_a_canary_and_leaves_it_alone(b: Backend) {
    let s = TestServer::start(b).await;
    let mut body = key_body("planted");
    body["canary"] = json!(true);
    let (id, canary) = s.create_key(body).await;
    let (live_id, live) = s.create_key(key_body("leaked")).await;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("ci.env"),
        format!("DEPLOY_KEY={canary}\nOTHER={live}\n"),
    )
    .unwrap();
    let dir = tmp.path().to_str().unwrap();
    let (rc, out, err) =
        crate::scan::run(&s, &["scan", dir, "--revoke-leaked", "--json"], None, true).await;
    assert_eq!(rc, 1, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let found = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["keywarden_key"]["id"] == id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("the canary is found: {out}"));
    assert_eq!(found["inventory"]["canary"], true);
    assert_eq!(found["inventory"]["live"], false);
    assert!(err.contains(&format!("revoked key {live_id}")), "{err}");
    assert!(!err.contains(&id), "the canary is not revoked: {err}");
    let (_, k) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(k["state"], "active", "a canary stays planted");
    // The table names it for what it is.
    let (_, table, _) = crate::scan::run(&s, &["scan", dir], None, true).await;
    assert!(table.contains("CANARY"), "{table}");
    // Identifying is not presenting: no CANARY_USED.
    let (_, alerts) = s.get("/v1/alerts?kind=CANARY_USED").await;
    assert_eq!(alerts["alerts"], json!([]));
    s.stop().await;
}

async fn alerts_reach_people_as_slack_messages(b: Backend) {
    let s = crate::services::start(b).await;
    let r = crate::receiver::Receiver::start().await;
    let (st, v) = s
        .post(
            "/v1/services",
            json!({ "name": "chat", "webhook_url": r.url, "events": ["alert"], "format": "slack" }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["service"]["format"], "slack");
    let (st, v) = s
        .post(
            "/v1/services",
            json!({ "name": "odd", "webhook_url": r.url, "format": "teams" }),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["violations"][0]["field"], "format");

    let mut body = key_body("tripwire");
    body["canary"] = json!(true);
    let (id, canary) = s.create_key(body).await;
    s.verify(json!({ "key": canary, "source_ip": "192.0.2.44" }))
        .await;
    let got = r.wait_for(1, 10).await;
    let text = got[0].json["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{:?}", got[0].json));
    assert!(
        text.starts_with("*keywarden: key tripwire (prod) CANARY_USED (critical) from 192.0.2.44*"),
        "{text}"
    );
    assert!(text.contains(&format!("({id})")), "{text}");
    assert!(text.contains("owned by alice@example.com"), "{text}");
    assert!(
        text.contains("What to do: someone read where this canary was planted"),
        "{text}"
    );
    assert!(!text.contains(&canary[20..]), "no secret in a message");
    s.stop().await;
}

async fn owners_are_mailed_about_their_keys(b: Backend) {
    // Without a relay, an email service is refused with what to do.
    let plain = TestServer::start(b).await;
    let (st, v) = plain
        .post(
            "/v1/services",
            json!({ "name": "owners", "format": "email" }),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v.to_string().contains("--smtp"), "{v}");
    plain.stop().await;

    let sink = crate::smtp::SmtpSink::start().await;
    let url = sink.url();
    let s = TestServer::start_with(b, |c| {
        c.smtp_url = Some(url);
        c.smtp_from = "keywarden@example.com".to_owned();
        c.dispatch_poll = std::time::Duration::from_millis(50);
    })
    .await;
    let (st, v) = s
        .post(
            "/v1/services",
            json!({ "name": "owners", "format": "email", "events": ["alert", "notice"] }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert!(v.get("secret").is_none(), "nothing to sign: {v}");
    let (id, key) = s.create_key(key_body("mailed")).await;
    let guess = wrong_secret(&key);
    for _ in 0..11 {
        s.verify(json!({ "key": guess, "source_ip": "203.0.113.60" }))
            .await;
    }
    let mails = sink.wait_for(1, 10).await;
    let m = &mails[0];
    assert_eq!(m.to, ["<alice@example.com>"]);
    assert_eq!(m.from, "<keywarden@example.com>");
    let text = m.readable();
    assert!(
        text.contains(
            "Subject: keywarden: key mailed (prod) SECRET_GUESSING (high) from 203.0.113.60"
        ),
        "{text}"
    );
    assert!(text.contains(&format!("({id})")), "{text}");
    assert!(
        text.contains("What to do: someone is guessing secrets"),
        "{text}"
    );
    assert!(!text.contains(&key[20..]) && !text.contains(&guess[20..]));
    // Confirmed like any delivery.
    eventually(WAIT, "the mail's delivery to be confirmed", || async {
        let (_, v) = s.get("/v1/services/owners").await;
        if v["deliveries"]["confirmed"] == 1 {
            Ok(())
        } else {
            Err(v)
        }
    })
    .await;
    s.stop().await;
}

/// BRUTE_FORCE names a source network, not a key: it still reaches services that take
/// alerts (webhook, Slack, the pull feed) as `source.alert`, and e-mail goes to the
/// security contact, since there is no key owner to tell.
async fn source_alerts_reach_services_and_the_security_contact(b: Backend) {
    let sink = crate::smtp::SmtpSink::start().await;
    let url = sink.url();
    let s = TestServer::start_with(b, |c| {
        c.outbound_allow = vec!["127.0.0.0/8".parse().unwrap()];
        c.dispatch_poll = std::time::Duration::from_millis(50);
        c.smtp_url = Some(url);
        c.smtp_from = "keywarden@example.com".to_owned();
        c.smtp_security_to = Some("security@example.com".to_owned());
    })
    .await;
    let hook = crate::receiver::Receiver::start().await;
    let chat = crate::receiver::Receiver::start().await;
    for body in [
        json!({ "name": "edge", "webhook_url": hook.url, "events": ["alert"] }),
        json!({ "name": "chat", "webhook_url": chat.url, "events": ["alert"], "format": "slack" }),
        json!({ "name": "mail", "format": "email", "events": ["alert"] }),
    ] {
        let (st, v) = s.post("/v1/services", body).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    put_policy(&s, "[default]\nthrottle_failures = \"off\"\n").await;
    for i in 0..60 {
        let junk = format!("kw_prod_{:016}_{}", i, "a".repeat(38));
        s.verify(json!({ "key": junk, "source_ip": "2001:db8::7" }))
            .await;
    }

    let got = hook.wait_for(1, 10).await;
    let event = &got[0].json;
    assert_eq!(event["type"], "source.alert", "{event}");
    assert_eq!(event["data"]["key_id"], Value::Null, "{event}");
    assert_eq!(event["data"]["key"], Value::Null, "{event}");
    assert_eq!(event["data"]["details"]["alert"], "BRUTE_FORCE", "{event}");
    assert_eq!(
        event["data"]["details"]["source_ip"], "2001:db8::7",
        "{event}"
    );

    let got = chat.wait_for(1, 10).await;
    let text = got[0].json["text"].as_str().unwrap_or_default().to_owned();
    assert!(
        text.starts_with("*keywarden: BRUTE_FORCE (medium) from 2001:db8::7*"),
        "{text}"
    );
    assert!(
        text.contains("What to do: someone is guessing secrets"),
        "{text}"
    );

    let mails = sink.wait_for(1, 10).await;
    assert_eq!(mails[0].to, ["<security@example.com>"]);
    let mail = mails[0].readable();
    assert!(
        mail.contains("Subject: keywarden: BRUTE_FORCE (medium) from 2001:db8::7"),
        "{mail}"
    );

    // The pull feed shows it too, with no key id.
    let (st, page) = s.get("/v1/events?events=alert&wait=0s").await;
    assert_eq!(st, StatusCode::OK, "{page}");
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{page}");
    assert_eq!(events[0]["type"], "source.alert");
    assert!(events[0].get("key_id").is_none(), "{page}");
    for name in ["edge", "chat", "mail"] {
        eventually(
            WAIT,
            "the source alert's delivery to be confirmed",
            || async {
                let (_, v) = s.get(&format!("/v1/services/{name}")).await;
                if v["deliveries"]["confirmed"] == 1 {
                    Ok(())
                } else {
                    Err(v)
                }
            },
        )
        .await;
    }
    s.stop().await;
}
