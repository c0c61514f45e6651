//! SCIM 2.0 offboarding, driven with the request bodies Okta and Microsoft Entra send
//! (from their public SCIM provisioning docs): deactivating or deleting a user acts on
//! every key they own.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{key_body, Backend, TestServer};
use crate::on_both_backends;

on_both_backends!(okta_and_entra_drive_offboarding);

async fn scim(
    s: &TestServer,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = s
        .http
        .request(method, s.url(path))
        .bearer_auth(token)
        .header("content-type", "application/scim+json");
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    if status != StatusCode::NO_CONTENT {
        assert_eq!(
            resp.headers()["content-type"],
            "application/scim+json",
            "{path}"
        );
    }
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn okta_and_entra_drive_offboarding(b: Backend) {
    let s = TestServer::start(b).await;
    let idp = s.token("scim", None).await;
    use reqwest::Method as M;

    // Okta: create (it sends a password, which must go nowhere), look up, deactivate.
    let okta_user = json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": "test.user@okta.local",
        "name": {"givenName": "Test", "familyName": "User"},
        "emails": [{"primary": true, "value": "test.user@okta.local", "type": "work"}],
        "displayName": "Test User",
        "locale": "en-US",
        "externalId": "00ujl29u0le5T6Aj10h7",
        "groups": [],
        "password": "1mz050nqOktaSecret",
        "active": true
    });
    let (status, v) = scim(&s, &idp, M::POST, "/scim/v2/Users", Some(okta_user.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["id"].as_str(), v["active"].as_bool()),
        (Some("test.user@okta.local"), Some(true))
    );
    assert_eq!(v["displayName"], "Test User");
    let (status, v) = scim(&s, &idp, M::POST, "/scim/v2/Users", Some(okta_user)).await;
    assert_eq!(
        (status, v["scimType"].as_str()),
        (StatusCode::CONFLICT, Some("uniqueness"))
    );
    let (status, v) = scim(
        &s,
        &idp,
        M::GET,
        "/scim/v2/Users?filter=userName%20eq%20%22test.user%40okta.local%22&startIndex=1&count=100",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["totalResults"], 1);
    assert_eq!(v["Resources"][0]["userName"], "test.user@okta.local");
    let (_, v) = scim(
        &s,
        &idp,
        M::GET,
        "/scim/v2/Users?filter=userName%20eq%20%22nobody%40okta.local%22",
        None,
    )
    .await;
    assert_eq!(v["totalResults"], 0);

    let mut body = key_body("okta-key");
    body["owner"] = json!("test.user@okta.local");
    let (okta_key, okta_secret) = s.create_key(body).await;
    assert_eq!(s.verify_code(&okta_secret).await, "VALID");
    // An admin token the user owns (any spelling) goes with them.
    let (status, v) = s
        .post(
            "/v1/tokens",
            json!({"name": "their-ci", "role": "issuer", "owner": "Test.User@okta.local"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let their_token = v["secret"].as_str().unwrap().to_owned();
    let (status, _) = s.call(M::GET, "/v1/keys", Some(&their_token), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = scim(
        &s,
        &idp,
        M::PATCH,
        "/scim/v2/Users/test.user@okta.local",
        Some(json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "value": {"active": false}}]
        })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["active"], false);
    assert_eq!(s.verify_code(&okta_secret).await, "OWNER_DISABLED");
    let (_, k) = s.get(&format!("/v1/keys/{okta_key}")).await;
    assert_eq!(k["state"], "revoked");
    let (status, _) = s.call(M::GET, "/v1/keys", Some(&their_token), None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "deactivated through SCIM: token revoked"
    );

    // Entra: create with its body, deactivate with "Replace" and "False", then delete.
    let entra_name = "Test_User_ab6490ee-1e48-479e-a20b-2d77186b5dd1@testuser.com";
    let (status, v) = scim(
        &s,
        &idp,
        M::POST,
        "/scim/v2/Users",
        Some(json!({
            "schemas": [
                "urn:ietf:params:scim:schemas:core:2.0:User",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
            ],
            "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
            "userName": entra_name,
            "active": true,
            "emails": [{"primary": true, "type": "work", "value": entra_name}],
            "meta": {"resourceType": "User"},
            "name": {"formatted": "givenName familyName", "familyName": "familyName", "givenName": "givenName"},
            "roles": []
        })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["displayName"], "givenName familyName");
    let mut body = key_body("entra-key");
    body["owner"] = json!(entra_name);
    let (_, entra_secret) = s.create_key(body.clone()).await;
    let (_, entra_secret2) = s.create_key(body).await;
    let (status, v) = scim(
        &s,
        &idp,
        M::PATCH,
        &format!("/scim/v2/Users/{entra_name}"),
        Some(json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "Replace", "path": "active", "value": "False"}]
        })),
    )
    .await;
    assert_eq!(
        (status, v["active"].as_bool()),
        (StatusCode::OK, Some(false)),
        "{v}"
    );
    assert_eq!(s.verify_code(&entra_secret).await, "OWNER_DISABLED");
    assert_eq!(s.verify_code(&entra_secret2).await, "OWNER_DISABLED");
    // Reactivated and then deleted: gone from SCIM, keys still refused.
    let (status, v) = scim(
        &s,
        &idp,
        M::PUT,
        &format!("/scim/v2/Users/{entra_name}"),
        Some(
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                     "userName": entra_name, "displayName": "Renamed", "active": true}),
        ),
    )
    .await;
    assert_eq!(
        (status, v["active"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{v}"
    );
    assert_eq!(v["displayName"], "Renamed");
    let (status, _) = scim(
        &s,
        &idp,
        M::DELETE,
        &format!("/scim/v2/Users/{entra_name}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = scim(
        &s,
        &idp,
        M::GET,
        &format!("/scim/v2/Users/{entra_name}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(
        v["schemas"][0],
        "urn:ietf:params:scim:api:messages:2.0:Error"
    );
    assert_eq!(s.verify_code(&entra_secret).await, "OWNER_DISABLED");

    // Only SCIM tokens (and admins) get in; bad requests get SCIM errors.
    let verifier = s.token("verifier", None).await;
    let (status, _) = scim(&s, &verifier, M::GET, "/scim/v2/Users", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = s.call(M::GET, "/v1/keys", Some(&idp), None).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a SCIM token manages no keys"
    );
    let (status, v) = scim(
        &s,
        &idp,
        M::GET,
        "/scim/v2/Users?filter=emails%20co%20%22x%22",
        None,
    )
    .await;
    assert_eq!(
        (status, v["scimType"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalidFilter"))
    );
    let (status, v) = scim(
        &s,
        &idp,
        M::POST,
        "/scim/v2/Users",
        Some(json!({"userName": "has space"})),
    )
    .await;
    assert_eq!(
        (status, v["scimType"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalidValue"))
    );

    // The audit trail names the IdP's token, and holds no password.
    let (_, v) = s.get("/v1/audit?target=owner:test.user@okta.local").await;
    let actions: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["owner.created", "owner.disabled"]);
    let (rc, export, _) = s.cli(&["audit", "export"]).await;
    assert_eq!(rc, 0);
    assert!(!export.contains("1mz050nqOktaSecret"));
    s.stop().await;
}
