//! The owner registry: disabling an owner acts on all their keys at once, as the policy
//! says per environment, and verify answers OWNER_DISABLED.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{key_body, Backend, TestServer};
use crate::on_both_backends;

on_both_backends!(
    disabling_an_owner_acts_on_every_key_at_once,
    owner_spellings_are_one_person,
    owners_never_registered_can_be_offboarded,
    disabling_an_owner_revokes_their_admin_tokens,
    policy_can_require_registered_owners,
    a_reason_text_is_not_a_machine_cause,
    a_disabled_owners_keys_cannot_be_revived,
    the_enforcer_takes_keys_a_disable_missed,
);

fn body(name: &str, owner: &str, env: &str) -> Value {
    let mut b = key_body(name);
    b["owner"] = json!(owner);
    b["environment"] = json!(env);
    b
}

async fn disabling_an_owner_acts_on_every_key_at_once(b: Backend) {
    let s = TestServer::start(b).await;
    // Staging suspends instead of revoking.
    let (status, _) = s
        .call(
            reqwest::Method::PUT,
            "/v1/policy",
            Some(&s.admin),
            Some(json!({"policy": "[environments.staging]\non_owner_disabled = \"suspend\"\n"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = s
        .post(
            "/v1/owners",
            json!({"identity": "alice@example.com", "display_name": "Alice", "manager": "carol@example.com"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "active");
    let alice = "alice@example.com";
    let (a1, a1_secret) = s.create_key(body("a1", alice, "prod")).await;
    let (a2, a2_secret) = s.create_key(body("a2", alice, "staging")).await;
    let (a3, _) = s.create_key(body("a3", alice, "prod")).await;
    s.post(&format!("/v1/keys/{a3}/revoke"), json!({})).await;
    let (_, bob_secret) = s.create_key(body("b1", "bob@example.com", "prod")).await;
    assert_eq!(s.verify_code(&a1_secret).await, "VALID");

    let (status, v) = s
        .post(
            "/v1/owners/alice@example.com/disable",
            json!({"reason": "left the company"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["owner"]["status"], "disabled");
    let mut acted: Vec<String> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    acted.sort();
    let mut expected = vec![a1.clone(), a2.clone()];
    expected.sort();
    assert_eq!(acted, expected, "the already revoked key is left alone");

    // At once, on the very next verify.
    assert_eq!(s.verify_code(&a1_secret).await, "OWNER_DISABLED");
    assert_eq!(s.verify_code(&a2_secret).await, "OWNER_DISABLED");
    assert_eq!(s.verify_code(&bob_secret).await, "VALID");
    let (_, k) = s.get(&format!("/v1/keys/{a1}")).await;
    assert_eq!(
        (k["state"].as_str(), k["state_reason"].as_str()),
        (Some("revoked"), Some("OWNER_DISABLED"))
    );
    let (_, k) = s.get(&format!("/v1/keys/{a2}")).await;
    assert_eq!(k["state"], "suspended", "staging's policy suspends");

    // Audited: the owner change and each key's, by the admin who disabled.
    let (_, v) = s.get("/v1/audit?target=owner:alice@example.com").await;
    let actions: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["owner.created", "owner.disabled"]);
    assert_eq!(v["entries"][1]["reason"], "left the company");
    let (_, v) = s
        .get(&format!("/v1/audit?key={a1}&action=key.revoked"))
        .await;
    assert_eq!(v["entries"][0]["reason"], "OWNER_DISABLED");

    // No new keys for a disabled owner; disabling again changes nothing.
    let (status, v) = s.post("/v1/keys", body("a4", alice, "prod")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["code"], "OWNER_DISABLED");
    let (_, v) = s
        .post("/v1/owners/alice@example.com/disable", json!({}))
        .await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 0);
    // Enabled again: new keys are allowed, old ones stay as they are.
    let (status, v) = s
        .post("/v1/owners/alice@example.com/enable", json!({}))
        .await;
    assert_eq!(
        (status, v["owner"]["status"].as_str()),
        (StatusCode::OK, Some("active"))
    );
    s.create_key(body("a5", alice, "prod")).await;
    assert_eq!(s.verify_code(&a1_secret).await, "OWNER_DISABLED");

    let (rc, out, err) = s.cli(&["owner", "list"]).await;
    assert_eq!(rc, 0, "{err}");
    assert!(
        out.contains("alice@example.com") && out.contains("carol@example.com"),
        "{out}"
    );
    let (rc, out, _) = s
        .cli(&[
            "--json",
            "owner",
            "disable",
            "alice@example.com",
            "--reason",
            "again",
        ])
        .await;
    assert_eq!(rc, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["keys"].as_array().unwrap().len(),
        1,
        "the key issued after enabling"
    );
    let (rc, _, err) = s.cli(&["owner", "show", "nobody@example.com"]).await;
    assert_eq!(rc, 2);
    assert!(err.contains("OWNER_NOT_FOUND"), "{err}");

    // Roles, unknown owners and bad input.
    let issuer = s.token("issuer", None).await;
    let (status, _) = s
        .call(reqwest::Method::GET, "/v1/owners", Some(&issuer), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = s
        .call(
            reqwest::Method::POST,
            "/v1/owners/alice@example.com/disable",
            Some(&issuer),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Offboarding someone never seen registers them, disabled: no key can be issued
    // to them later.
    let (status, v) = s
        .post("/v1/owners/nobody@example.com/disable", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["owner"]["status"], "disabled", "{v}");
    assert_eq!(v["keys"], json!([]), "{v}");
    let (status, v) = s
        .post("/v1/owners/nobody@example.com/enable", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = s
        .post("/v1/owners/never-seen@example.com/enable", json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "OWNER_NOT_FOUND");
    let (status, v) = s
        .post("/v1/owners", json!({"identity": "", "display_name": ""}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["violations"].as_array().unwrap().len(), 2, "{v}");
    s.stop().await;
}

async fn disable(s: &TestServer, identity: &str) -> (StatusCode, Value) {
    s.post(&format!("/v1/owners/{identity}/disable"), json!({}))
        .await
}

/// `Dora@example.com`, `DORA@EXAMPLE.COM` and `dora@example.com` are one owner: disabling
/// one spelling takes the keys of all, and no spelling gets a new key afterwards.
async fn owner_spellings_are_one_person(b: Backend) {
    let s = TestServer::start(b).await;
    let (status, v) = s
        .post(
            "/v1/owners",
            json!({"identity": "dora@example.com", "display_name": "Dora"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (k1, k1_secret) = s.create_key(body("k1", "Dora@example.com", "prod")).await;
    let (_, k2_secret) = s.create_key(body("k2", "DORA@EXAMPLE.COM", "prod")).await;
    let (status, v) = s.get(&format!("/v1/keys/{k1}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["owner"], "dora@example.com", "stored in one spelling");

    let (status, v) = disable(&s, "dora@example.com").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["keys"].as_array().unwrap().len(), 2, "{v}");
    for secret in [&k1_secret, &k2_secret] {
        assert_eq!(s.verify_code(secret).await, "OWNER_DISABLED");
    }
    let (status, v) = s
        .post("/v1/keys", body("k3", "DORA@example.com", "prod"))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "OWNER_DISABLED", "{v}");
    let (status, v) = s.get("/v1/owners/Dora@Example.COM").await;
    assert_eq!(
        (status, v["status"].clone()),
        (StatusCode::OK, json!("disabled"))
    );
    // Listing by owner finds the keys whatever the spelling asked for.
    let (_, v) = s.get("/v1/keys?owner=DORA@example.com").await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 2, "{v}");
    s.stop().await;
}

/// An owner who holds keys but was never registered is known: shown, listed, and
/// disabled (which registers them, disabled) with their keys.
async fn owners_never_registered_can_be_offboarded(b: Backend) {
    let s = TestServer::start(b).await;
    let (_, secret) = s.create_key(body("e1", "erin@example.com", "prod")).await;
    let (status, v) = s.get("/v1/owners/erin@example.com").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (v["registered"].clone(), v["status"].clone()),
        (json!(false), json!("active"))
    );
    let (_, v) = s.get("/v1/owners").await;
    assert!(
        v["owners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["identity"] == "erin@example.com"),
        "{v}"
    );

    let (status, v) = disable(&s, "erin@example.com").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["owner"]["registered"], true, "{v}");
    assert_eq!(v["owner"]["status"], "disabled", "{v}");
    assert_eq!(s.verify_code(&secret).await, "OWNER_DISABLED");
    let (status, v) = s
        .post("/v1/keys", body("e2", "erin@example.com", "prod"))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    // Someone with no keys and no registration is still unknown.
    let (status, _) = s.get("/v1/owners/nobody@example.com").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    s.stop().await;
}

/// Disabling an owner revokes their admin tokens in the same transaction: an issuer
/// token of theirs can no longer issue keys, and the answer names the tokens.
async fn disabling_an_owner_revokes_their_admin_tokens(b: Backend) {
    let s = TestServer::start(b).await;
    let (status, v) = s
        .post(
            "/v1/tokens",
            json!({"name": "frank-ci", "role": "issuer", "owner": "Frank@example.com"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let token = v["secret"].as_str().unwrap().to_owned();
    let token_id = v["token"]["id"].as_str().unwrap().to_owned();
    // Used once, so that a cached copy of the token exists.
    let (status, v) = s
        .call(
            reqwest::Method::POST,
            "/v1/keys",
            Some(&token),
            Some(body("f1", "frank@example.com", "prod")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");

    let (status, v) = disable(&s, "frank@example.com").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["tokens"], json!([token_id]), "{v}");
    let (status, v) = s
        .call(
            reqwest::Method::POST,
            "/v1/keys",
            Some(&token),
            Some(body("f2", "grace@example.com", "prod")),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    let (_, v) = s.get(&format!("/v1/audit?target=token:{token_id}")).await;
    let actions: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"token.revoked"), "{v}");
    s.stop().await;
}

/// `require_registered_owner` refuses keys for owners not in the registry.
async fn policy_can_require_registered_owners(b: Backend) {
    let s = TestServer::start(b).await;
    let (status, v) = s
        .call(
            reqwest::Method::PUT,
            "/v1/policy",
            Some(&s.admin),
            Some(json!({"policy": "[environments.prod]\nrequire_registered_owner = true\n"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = s
        .post("/v1/keys", body("h1", "heidi@example.com", "prod"))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "POLICY_OWNER_NOT_REGISTERED", "{v}");
    // Other environments are not bound by it.
    let (status, v) = s
        .post("/v1/keys", body("h2", "heidi@example.com", "dev"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, _) = s
        .post(
            "/v1/owners",
            json!({"identity": "Heidi@example.com", "display_name": "Heidi"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = s
        .post("/v1/keys", body("h3", "heidi@example.com", "prod"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    s.stop().await;
}

/// The verify code follows the typed cause keywarden sets, never the free-text reason a
/// person types.
async fn a_reason_text_is_not_a_machine_cause(b: Backend) {
    let s = TestServer::start(b).await;
    let (revoked, revoked_secret) = s.create_key(body("r1", "ivan@example.com", "prod")).await;
    let (suspended, suspended_secret) = s.create_key(body("r2", "ivan@example.com", "prod")).await;
    let (status, v) = s
        .post(
            &format!("/v1/keys/{revoked}/revoke"),
            json!({"reason": "OWNER_DISABLED"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["state_reason"], "OWNER_DISABLED",
        "the text is kept, as text"
    );
    assert_eq!(v["state_cause"], Value::Null, "{v}");
    let (status, _) = s
        .post(
            &format!("/v1/keys/{suspended}/suspend"),
            json!({"reason": "IDLE_EXPIRED"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.verify_code(&revoked_secret).await, "REVOKED");
    assert_eq!(s.verify_code(&suspended_secret).await, "SUSPENDED");
    // The real cause still answers its code.
    let (status, v) = disable(&s, "ivan@example.com").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(s.verify_code(&suspended_secret).await, "OWNER_DISABLED");
    assert_eq!(
        s.verify_code(&revoked_secret).await,
        "REVOKED",
        "revoked before"
    );
    s.stop().await;
}

/// Under `on_owner_disabled = "suspend"`, a disabled owner's keys, including one already
/// suspended for an overdue rotation, can be neither resumed nor rotated into a live
/// successor.
async fn a_disabled_owners_keys_cannot_be_revived(b: Backend) {
    let s = TestServer::start(b).await;
    let (status, v) = s
        .call(
            reqwest::Method::PUT,
            "/v1/policy",
            Some(&s.admin),
            Some(json!({"policy": "[environments.prod]\non_owner_disabled = \"suspend\"\nrotation_period = \"2d\"\non_rotation_overdue = \"suspend\"\n"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (overdue, overdue_secret) = s.create_key(body("o1", "judy@example.com", "prod")).await;
    s.clock.advance(time::Duration::days(3));
    let (st, _) = s.post("/v1/enforce", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let (live, _) = s.create_key(body("o2", "judy@example.com", "prod")).await;
    let (status, v) = disable(&s, "judy@example.com").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["keys"].as_array().unwrap().len(), 2, "both are held: {v}");
    for id in [&overdue, &live] {
        let (st, v) = s.post(&format!("/v1/keys/{id}/rotate"), json!({})).await;
        assert_ne!(st, StatusCode::CREATED, "{v}");
        let (st, v) = s.post(&format!("/v1/keys/{id}/resume"), json!({})).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_eq!(v["error"]["code"], "OWNER_DISABLED", "{v}");
    }
    assert_eq!(s.verify_code(&overdue_secret).await, "OWNER_DISABLED");
    s.stop().await;
}

/// A disabled owner whose key is still live (left by an older node, or by a migration
/// that merged two spellings of the owner): the plan shows it and the next pass revokes
/// it, as disabling would have.
async fn the_enforcer_takes_keys_a_disable_missed(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, secret) = s.create_key(body("k1", "kim@example.com", "prod")).await;
    s.sql(&[
        "INSERT INTO owners (identity, display_name, status, manager, created_at, updated_at) \
             VALUES ('kim@example.com', 'Kim', 'disabled', NULL, 0, 0)",
    ])
    .await;
    let (st, plan) = s.get("/v1/enforce/plan").await;
    assert_eq!(st, StatusCode::OK);
    let got: Vec<(&str, &str, &str)> = plan["actions"]
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
    assert_eq!(got, [(id.as_str(), "revoke", "OWNER_DISABLED")], "{plan}");
    let (st, v) = s.post("/v1/enforce", json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(s.verify_code(&secret).await, "OWNER_DISABLED");
    let (_, v) = s.get("/v1/enforce/plan").await;
    assert_eq!(v["actions"], json!([]), "taken once: {v}");
    s.stop().await;
}
