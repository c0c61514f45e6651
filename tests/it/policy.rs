//! The key policy: applied (versioned, audited), read, and checked when keys are issued,
//! through the API and the real CLI.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{Backend, TestServer, START};
use crate::on_both_backends;

on_both_backends!(
    policy_is_checked_at_issue_time,
    policy_cli_applies_shows_and_diffs,
    enforce_plans_without_acting_and_acts_now,
    idle_keys_expire_and_a_key_used_on_day_29_survives_day_31,
    rotation_deadlines_and_expiry_notices,
    a_tightened_policy_flags_existing_keys,
    what_the_plan_says_is_what_a_pass_does,
    a_key_held_for_overdue_rotation_can_be_rotated,
);

const POLICY: &str = r#"
[default]
max_ttl = "730d"
default_ttl = "400d"
idle_expiry = "30d"

[environments.prod]
max_ttl = "30d"
default_ttl = "30d"
forbid_wildcards = true
require_cidrs = true
require_systems = true
allowed_scopes = ["deploy:*", "db:*"]
"#;

fn codes(v: &Value) -> Vec<String> {
    let mut c: Vec<String> = v["error"]["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["code"].as_str().unwrap().to_owned())
        .collect();
    c.sort();
    c
}

async fn put(s: &TestServer, text: &str) -> (StatusCode, Value) {
    s.call(
        reqwest::Method::PUT,
        "/v1/policy",
        Some(&s.admin),
        Some(json!({ "policy": text })),
    )
    .await
}

async fn policy_is_checked_at_issue_time(b: Backend) {
    let s = TestServer::start(b).await;
    let (status, v) = s.get("/v1/policy").await;
    assert_eq!((status, v["version"].as_i64()), (StatusCode::OK, Some(0)));

    // A broken file: every problem listed, nothing applied.
    let (status, v) = put(
        &s,
        "[default]\nmax_ttl = \"soon\"\nrequire_cidrs = \"yes\"\n",
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "POLICY_INVALID");
    let (status, v) = put(
        &s,
        "[default]\nmax_ttl = \"soon\"\nallowed_scopes = [\"a b\"]\n",
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["violations"].as_array().unwrap().len(), 2, "{v}");
    let (_, v) = s.get("/v1/policy").await;
    assert_eq!(v["version"], 0);

    let (status, v) = put(&s, POLICY).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 1);
    assert!(v["applied_by"].as_str().unwrap().starts_with("token:"));

    // prod: a request that breaks five rules hears of all five.
    let (status, v) = s
        .post(
            "/v1/keys",
            json!({"name": "wide", "owner": "alice@example.com", "environment": "prod",
                   "scopes": ["deploy:*", "admin:all"], "ttl": "60d"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(
        codes(&v),
        [
            "POLICY_CIDRS_REQUIRED",
            "POLICY_SCOPE_NOT_ALLOWED",
            "POLICY_SYSTEMS_REQUIRED",
            "POLICY_WILDCARD_FORBIDDEN",
            "TTL_TOO_LONG"
        ]
    );
    let (status, v) = s
        .post(
            "/v1/keys",
            json!({"name": "narrow", "owner": "alice@example.com", "environment": "prod",
                   "systems": ["github"], "scopes": ["deploy:write", "db:orders:read"],
                   "allowed_cidrs": ["10.0.0.0/8"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let expires = time::OffsetDateTime::parse(
        v["key"]["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(
        expires,
        START + time::Duration::days(30),
        "prod's default_ttl"
    );

    // Elsewhere the default section holds: longer keys than the built-in 365d cap.
    let (status, v) = s
        .post(
            "/v1/keys",
            json!({"name": "long", "owner": "bob@example.com", "environment": "dev",
                   "scopes": ["anything:*"], "ttl": "500d"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, v) = s
        .post(
            "/v1/keys",
            json!({"name": "too-long", "owner": "bob@example.com", "environment": "dev",
                   "scopes": ["anything:*"], "ttl": "800d"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(codes(&v), ["TTL_TOO_LONG"]);

    // Roles: issuers and auditors read it, only admins apply.
    let issuer = s.token("issuer", None).await;
    let (status, v) = s
        .call(reqwest::Method::GET, "/v1/policy", Some(&issuer), None)
        .await;
    assert_eq!((status, v["version"].as_i64()), (StatusCode::OK, Some(1)));
    let (status, _) = s
        .call(
            reqwest::Method::PUT,
            "/v1/policy",
            Some(&issuer),
            Some(json!({"policy": "[default]\n"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A second version; both applies are audited with the text before and after.
    let (status, v) = put(&s, "[default]\nmax_ttl = \"90d\"\n").await;
    assert_eq!((status, v["version"].as_i64()), (StatusCode::OK, Some(2)));
    let (_, v) = s.get("/v1/audit?action=policy.applied").await;
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["details"]["version"]["before"], Value::Null);
    assert_eq!(entries[0]["details"]["text"]["after"], POLICY);
    assert_eq!(entries[1]["details"]["version"]["before"], 1);
    assert_eq!(entries[1]["details"]["text"]["before"], POLICY);
    let (status, v) = s
        .post(
            "/v1/keys",
            json!({"name": "now-too-long", "owner": "bob@example.com", "environment": "dev",
                   "scopes": ["anything:*"], "ttl": "500d"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "version 2 is in force: {v}"
    );
    s.stop().await;
}

async fn cli(s: &TestServer, args: &[&str]) -> (i32, String, String) {
    s.cli(args).await
}

async fn policy_cli_applies_shows_and_diffs(b: Backend) {
    let s = TestServer::start(b).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("policy.toml");
    std::fs::write(&good, POLICY).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[default]\nmax_tll = \"30d\"\n").unwrap();

    let (rc, out, _) = cli(&s, &["policy", "show"]).await;
    assert_eq!(rc, 0);
    assert!(out.contains("no policy applied"), "{out}");
    let (rc, _, err) = cli(&s, &["policy", "apply", bad.to_str().unwrap()]).await;
    assert_eq!(rc, 2);
    assert!(err.contains("max_tll"), "{err}");
    let (rc, out, err) = cli(&s, &["policy", "diff", bad.to_str().unwrap()]).await;
    assert_eq!(rc, 2, "an invalid file is refused, not diffed: {out}");
    assert!(
        err.contains("not a valid policy") && err.contains("max_tll"),
        "{err}"
    );
    let (rc, out, _) = cli(&s, &["policy", "diff", good.to_str().unwrap()]).await;
    assert_eq!(rc, 1, "differs from the defaults");
    assert!(out.contains("+forbid_wildcards = true"), "{out}");
    let (rc, out, err) = cli(&s, &["policy", "apply", good.to_str().unwrap()]).await;
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("version 1"), "{out}");
    let (rc, out, _) = cli(&s, &["policy", "diff", good.to_str().unwrap()]).await;
    assert_eq!(rc, 0, "{out}");
    let (rc, out, _) = cli(&s, &["policy", "show"]).await;
    assert_eq!(rc, 0);
    assert!(
        out.contains("policy version 1") && out.contains("[environments.prod]"),
        "{out}"
    );
    s.stop().await;
}

async fn enforce_plans_without_acting_and_acts_now(b: Backend) {
    let s = TestServer::start(b).await;
    let mut one = crate::harness::key_body("one-hour");
    one["ttl"] = json!("1h");
    let (one_id, one_secret) = s.create_key(one).await;
    let mut two = crate::harness::key_body("two-hours");
    two["ttl"] = json!("2h");
    let (two_id, _) = s.create_key(two).await;
    s.create_key(crate::harness::key_body("month")).await;

    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let ids = |out: &str| -> Vec<String> {
        let v: Value = serde_json::from_str(out).unwrap();
        v["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["key_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let at = fmt(START + time::Duration::minutes(90));
    let (rc, out, err) = cli(&s, &["--json", "enforce", "--plan", "--at", &at]).await;
    assert_eq!(rc, 0, "{err}");
    assert_eq!(ids(&out), std::slice::from_ref(&one_id));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["planned"], true);
    assert_eq!(v["actions"][0]["reason"], "TTL_EXPIRED");
    let at = fmt(START + time::Duration::hours(3));
    let (_, out, _) = cli(&s, &["--json", "enforce", "--plan", "--at", &at]).await;
    assert_eq!(ids(&out), [one_id.clone(), two_id.clone()], "soonest first");
    // A plan changes nothing.
    let (_, key) = s.get(&format!("/v1/keys/{one_id}")).await;
    assert_eq!(key["state"], "active");
    assert_eq!(s.verify_code(&one_secret).await, "VALID");

    s.clock.advance(time::Duration::hours(3));
    let (rc, out, _) = cli(&s, &["--json", "enforce", "--now"]).await;
    assert_eq!(rc, 0);
    assert_eq!(ids(&out), [one_id.clone(), two_id.clone()]);
    let (_, key) = s.get(&format!("/v1/keys/{one_id}")).await;
    assert_eq!(key["state"], "expired");
    let (_, v) = s
        .get("/v1/audit?action=key.expired&actor=system:enforcer")
        .await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 2);
    let (_, out, _) = cli(&s, &["--json", "enforce", "--now"]).await;
    assert!(ids(&out).is_empty(), "nothing left to do");

    // Usage errors and roles.
    let (rc, _, err) = cli(&s, &["enforce", "--at", &at]).await;
    assert_eq!(rc, 2, "{err}");
    let (rc, _, err) = cli(&s, &["enforce", "--plan", "--at", "tomorrow"]).await;
    assert_eq!(rc, 2);
    assert!(err.contains("--at"), "{err}");
    let (rc, _, err) = cli(&s, &["serve", "--enforcer-interval", "soon"]).await;
    assert_eq!(rc, 2);
    assert!(err.contains("--enforcer-interval"), "{err}");
    let (status, v) = s.get("/v1/enforce/plan?at=soon").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let auditor = s.token("auditor", None).await;
    let (status, _) = s
        .call(
            reqwest::Method::GET,
            "/v1/enforce/plan",
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = s
        .call(
            reqwest::Method::POST,
            "/v1/enforce",
            Some(&auditor),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    s.stop().await;
}

async fn idle_keys_expire_and_a_key_used_on_day_29_survives_day_31(b: Backend) {
    let s = TestServer::start(b).await;
    let mut body = crate::harness::key_body("idle");
    body["ttl"] = json!("90d");
    let (idle_id, idle_secret) = s.create_key(body.clone()).await;
    body["name"] = json!("busy");
    let (busy_id, busy_secret) = s.create_key(body.clone()).await;
    body["name"] = json!("staging");
    body["environment"] = json!("staging");
    let (_, staging_secret) = s.create_key(body).await;

    s.clock.advance(time::Duration::days(29));
    assert_eq!(s.verify_code(&busy_secret).await, "VALID");
    s.wait_for_usage(&busy_id, 1).await;
    s.clock.advance(time::Duration::days(2));
    // Day 31: refused at once, before any enforcer pass; the key used on day 29 works,
    // and keeps working on its next use (its cached record is from before that use).
    assert_eq!(s.verify_code(&idle_secret).await, "IDLE_EXPIRED");
    assert_eq!(s.verify_code(&busy_secret).await, "VALID");
    assert_eq!(s.verify_code(&busy_secret).await, "VALID");
    let (_, key) = s.get(&format!("/v1/keys/{idle_id}")).await;
    assert_eq!(key["state"], "active", "not recorded yet");

    let (rc, out, err) = cli(&s, &["--json", "enforce", "--plan"]).await;
    assert_eq!(rc, 0, "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    let planned: Vec<(&str, &str)> = plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["key_id"].as_str().unwrap(), a["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(planned.len(), 2, "{plan}");
    assert!(
        planned.contains(&(idle_id.as_str(), "IDLE_EXPIRED")),
        "{plan}"
    );
    assert_eq!(
        plan["actions"][0]["due_at"], "2026-07-01T12:00:00Z",
        "due 30 days after creation"
    );
    let (rc, out, _) = cli(&s, &["--json", "enforce", "--now"]).await;
    assert_eq!(rc, 0);
    let done: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["actions"].as_array().unwrap().len(), 2, "{done}");
    let (_, key) = s.get(&format!("/v1/keys/{idle_id}")).await;
    assert_eq!(
        (key["state"].as_str(), key["state_reason"].as_str()),
        (Some("expired"), Some("IDLE_EXPIRED"))
    );
    assert_eq!(key["state_cause"], "IDLE_EXPIRED");
    // Recorded, the idle expiry keeps its code.
    assert_eq!(s.verify_code(&idle_secret).await, "IDLE_EXPIRED");
    assert_eq!(s.verify_code(&staging_secret).await, "IDLE_EXPIRED");
    let (_, key) = s.get(&format!("/v1/keys/{busy_id}")).await;
    assert_eq!(key["state"], "active");
    let (_, v) = s
        .get(&format!("/v1/audit?key={idle_id}&action=key.expired"))
        .await;
    assert_eq!(v["entries"][0]["actor"], "system:enforcer");
    assert_eq!(v["entries"][0]["reason"], "IDLE_EXPIRED");

    // A policy sets idle expiry per environment: prod 7 days.
    let (status, _) = put(&s, "[environments.prod]\nidle_expiry = \"7d\"\n").await;
    assert_eq!(status, StatusCode::OK);
    s.wait_for_usage(&busy_id, 3).await;
    s.clock.advance(time::Duration::days(8));
    assert_eq!(s.verify_code(&busy_secret).await, "IDLE_EXPIRED");
    let (status, v) = put(&s, "[default]\nidle_expiry = \"0s\"\n").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    s.stop().await;
}

async fn rotation_deadlines_and_expiry_notices(b: Backend) {
    let s = TestServer::start(b).await;
    let (status, v) = put(
        &s,
        "[default]\nrotation_period = \"20d\"\nexpiry_notice = \"5d\"\nidle_expiry = \"365d\"\n\n\
         [environments.prod]\non_rotation_overdue = \"suspend\"\n",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut body = crate::harness::key_body("prod-key");
    body["ttl"] = json!("60d");
    let (prod_id, prod_secret) = s.create_key(body.clone()).await;
    body["name"] = json!("dev-key");
    body["environment"] = json!("dev");
    let (dev_id, dev_secret) = s.create_key(body.clone()).await;
    body["name"] = json!("short");
    body["ttl"] = json!("10d");
    let (short_id, _) = s.create_key(body).await;

    // Day 6: the 10-day key is within its 5-day notice; nothing else is due.
    s.clock.advance(time::Duration::days(6));
    let (_, out, _) = cli(&s, &["--json", "enforce", "--now"]).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    let got: Vec<(&str, &str, &str)> = v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["key_id"].as_str().unwrap(),
                a["action"].as_str().unwrap(),
                a["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [(short_id.as_str(), "notify", "EXPIRES_SOON")]);
    // Given once.
    let (_, out, _) = cli(&s, &["--json", "enforce", "--now"]).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["actions"].as_array().unwrap().len(), 0, "{v}");

    // Day 21: rotation is overdue: prod suspends, dev notifies (once); the short key
    // ended on day 10.
    s.clock.advance(time::Duration::days(15));
    let (_, out, _) = cli(&s, &["--json", "enforce", "--now"]).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut got: Vec<(String, String)> = v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["key_id"].as_str().unwrap().to_owned(),
                a["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        (prod_id.clone(), "suspend".to_owned()),
        (dev_id.clone(), "notify".to_owned()),
        (short_id.clone(), "expire".to_owned()),
    ];
    want.sort();
    assert_eq!(got, want, "{v}");
    assert_eq!(s.verify_code(&prod_secret).await, "SUSPENDED");
    assert_eq!(s.verify_code(&dev_secret).await, "VALID");
    let (_, k) = s.get(&format!("/v1/keys/{prod_id}")).await;
    assert_eq!(k["state_reason"], "ROTATION_OVERDUE");
    let (_, v) = s
        .get(&format!(
            "/v1/audit?key={dev_id}&action=key.rotation_overdue"
        ))
        .await;
    assert_eq!(v["entries"][0]["actor"], "system:enforcer");
    let (_, out, _) = cli(&s, &["--json", "enforce", "--now"]).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["actions"].as_array().unwrap().len(),
        0,
        "each notice once: {v}"
    );
    // Rotating clears the deadline: the successor starts a new period.
    let (status, _) = s
        .post(&format!("/v1/keys/{dev_id}/rotate"), json!({"grace": "1h"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, out, _) = cli(&s, &["--json", "enforce", "--plan"]).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["actions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["key_id"] != json!(dev_id)),
        "{v}"
    );
    s.stop().await;
}

async fn a_tightened_policy_flags_existing_keys(b: Backend) {
    let s = TestServer::start(b).await;
    let mut body = crate::harness::key_body("wide");
    body["scopes"] = json!(["deploy:*"]);
    let (wide, wide_secret) = s.create_key(body.clone()).await;
    body["name"] = json!("narrow");
    body["scopes"] = json!(["deploy:write"]);
    body["allowed_cidrs"] = json!(["10.0.0.0/8"]);
    let (narrow, _) = s.create_key(body.clone()).await;
    body["name"] = json!("dev-wide");
    body["environment"] = json!("dev");
    body["scopes"] = json!(["deploy:*"]);
    let (dev_wide, _) = s.create_key(body).await;

    let (status, _) = put(
        &s,
        "[environments.prod]\nforbid_wildcards = true\nrequire_cidrs = true\n",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let flagged = |out: &str| -> Vec<(String, String, String)> {
        let v: Value = serde_json::from_str(out).unwrap();
        v["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["key_id"].as_str().unwrap().to_owned(),
                    a["action"].as_str().unwrap().to_owned(),
                    a["detail"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let (_, out, _) = cli(&s, &["--json", "enforce", "--plan"]).await;
    let got = flagged(&out);
    assert_eq!(got.len(), 1, "{out}");
    assert_eq!(
        (got[0].0.as_str(), got[0].1.as_str()),
        (wide.as_str(), "notify")
    );
    assert!(got[0].2.contains("POLICY_WILDCARD_FORBIDDEN"), "{out}");
    assert!(got[0].2.contains("POLICY_CIDRS_REQUIRED"), "{out}");
    assert!(!out.contains(&narrow) && !out.contains(&dev_wide));

    let (_, out, _) = cli(&s, &["--json", "enforce", "--now"]).await;
    assert_eq!(flagged(&out).len(), 1, "{out}");
    let (_, v) = s
        .get(&format!("/v1/audit?key={wide}&action=key.policy_violation"))
        .await;
    assert_eq!(v["entries"][0]["reason"], "policy version 1");
    assert_eq!(
        s.verify_code(&wide_secret).await,
        "VALID",
        "noted, not stopped"
    );
    let (_, out, _) = cli(&s, &["--json", "enforce", "--plan"]).await;
    assert!(flagged(&out).is_empty(), "noted once per version: {out}");

    // The policy says suspend: the next pass does.
    let (status, _) = put(
        &s,
        "[environments.prod]\nforbid_wildcards = true\nrequire_cidrs = true\non_violation = \"suspend\"\n",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, out, _) = cli(&s, &["--json", "enforce", "--now"]).await;
    let got = flagged(&out);
    assert_eq!(got.len(), 1, "{out}");
    assert_eq!(got[0].1, "suspend");
    assert_eq!(s.verify_code(&wide_secret).await, "SUSPENDED");
    let (_, k) = s.get(&format!("/v1/keys/{wide}")).await;
    assert_eq!(k["state_reason"], "POLICY_VIOLATION");
    s.stop().await;
}

/// A key due an expiry notice in the same pass that first judges a policy which suspends
/// it: the plan lists both, and the pass does both. Resumed by hand while it still
/// breaks the policy, the next plan and pass suspend it again.
async fn what_the_plan_says_is_what_a_pass_does(b: Backend) {
    let s = TestServer::start(b).await;
    let mut body = crate::harness::key_body("node-enroll");
    body["scopes"] = json!(["enroll:*"]);
    let (id, secret) = s.create_key(body).await;
    let (status, v) = put(
        &s,
        "[environments.prod]\nexpiry_notice = \"60d\"\nforbid_wildcards = true\non_violation = \"suspend\"\n",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let actions = |out: &str| -> Vec<(String, String)> {
        let v: Value = serde_json::from_str(out).unwrap();
        let mut got: Vec<(String, String)> = v["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["action"].as_str().unwrap().to_owned(),
                    a["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        got.sort();
        got
    };
    let both = vec![
        ("notify".to_owned(), "EXPIRES_SOON".to_owned()),
        ("suspend".to_owned(), "POLICY_VIOLATION".to_owned()),
    ];
    let (_, plan, _) = cli(&s, &["--json", "enforce", "--plan"]).await;
    assert_eq!(actions(&plan), both, "{plan}");
    let (rc, done, err) = cli(&s, &["--json", "enforce", "--now"]).await;
    assert_eq!(rc, 0, "{err}");
    assert_eq!(actions(&done), both, "{done}");
    assert_eq!(s.verify_code(&secret).await, "SUSPENDED");

    let (status, _) = s.post(&format!("/v1/keys/{id}/resume"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let suspend = vec![("suspend".to_owned(), "POLICY_VIOLATION".to_owned())];
    let (_, plan, _) = cli(&s, &["--json", "enforce", "--plan"]).await;
    assert_eq!(actions(&plan), suspend, "{plan}");
    let (_, done, _) = cli(&s, &["--json", "enforce", "--now"]).await;
    assert_eq!(actions(&done), suspend, "{done}");
    assert_eq!(s.verify_code(&secret).await, "SUSPENDED");
    s.stop().await;
}

/// A key suspended because its rotation is overdue is rotated (not resumed, which the
/// next pass would undo): the successor is active and stays so; the old key stays held.
async fn a_key_held_for_overdue_rotation_can_be_rotated(b: Backend) {
    let s = TestServer::start(b).await;
    let (status, v) = put(
        &s,
        "[environments.prod]\nrotation_period = \"2d\"\non_rotation_overdue = \"suspend\"\n",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (id, secret) = s.create_key(crate::harness::key_body("deploy")).await;
    s.clock.advance(time::Duration::days(3));
    let (rc, _, err) = cli(&s, &["enforce", "--now"]).await;
    assert_eq!(rc, 0, "{err}");
    assert_eq!(s.verify_code(&secret).await, "SUSPENDED");

    let (status, v) = s
        .post(&format!("/v1/keys/{id}/rotate"), json!({"grace": "1h"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let successor = v["secret"].as_str().unwrap().to_owned();
    assert_eq!(v["key"]["state"], "active", "{v}");
    assert_eq!(s.verify_code(&successor).await, "VALID");
    assert_eq!(
        s.verify_code(&secret).await,
        "SUSPENDED",
        "the old key stays held"
    );
    let (rc, _, err) = cli(&s, &["enforce", "--now"]).await;
    assert_eq!(rc, 0, "{err}");
    assert_eq!(s.verify_code(&successor).await, "VALID", "not held again");
    // Rotated once is rotated.
    let (status, _) = s.post(&format!("/v1/keys/{id}/rotate"), json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    // A key suspended by a person still must be resumed first.
    let (other, _) = s.create_key(crate::harness::key_body("investigated")).await;
    let (status, _) = s
        .post(
            &format!("/v1/keys/{other}/suspend"),
            json!({"reason": "looking"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = s.post(&format!("/v1/keys/{other}/rotate"), json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    s.stop().await;
}

/// `policy apply FILE --plan` shows what the first pass under the file would do and
/// applies nothing; on a terminal (a real pty through `script`), applying a policy that
/// would suspend keys asks first, and "n" applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_is_previewed_before_it_suspends() {
    let s = TestServer::start(Backend::Sqlite).await;
    let (id, secret) = s.create_key(crate::harness::key_body("old")).await;
    s.clock.advance(time::Duration::days(3));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("strict.toml");
    std::fs::write(
        &file,
        "[environments.prod]\nrotation_period = \"2m\"\non_rotation_overdue = \"suspend\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (rc, out, err) = cli(&s, &["policy", "apply", path, "--plan"]).await;
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains(&id) && out.contains("suspend"), "{out}");
    let (_, v) = s.get("/v1/policy").await;
    assert_eq!(v["version"], 0, "--plan applies nothing: {v}");

    let bin = assert_cmd::cargo::cargo_bin("keywarden");
    let command = format!("{} policy apply {path}", bin.display());
    let out = tokio::task::block_in_place(|| {
        use std::io::Write;
        let mut child = std::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .env("KEYWARDEN_SERVER", &s.base)
            .env("KEYWARDEN_TOKEN", &s.admin)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"n\n").unwrap();
        child.wait_with_output().unwrap()
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Apply? [y/N]"),
        "it asks on a terminal: {text}"
    );
    assert!(text.contains("not applied"), "{text}");
    let (_, v) = s.get("/v1/policy").await;
    assert_eq!(v["version"], 0, "answered no: {v}");
    assert_eq!(s.verify_code(&secret).await, "VALID");
    // Without a terminal (scripts), or with --yes, it applies.
    let (rc, _, err) = cli(&s, &["policy", "apply", path]).await;
    assert_eq!(rc, 0, "{err}");
    s.stop().await;
}
