//! Issue 6: `keywarden scan` end to end: the real binary against a real server, matching
//! our keys with the inventory, revoking live leaked keys, recording shadow keys.

use std::path::Path;

use serde_json::Value;
use sha2::Digest;

use crate::harness::{key_body, Backend, TestServer};
use crate::on_both_backends;

const GH: &str = "ghp_R8wq2Ld7Xk4PzN9vT3mB6yH1cJ5sF0aGe2Ku";
const AWS: &str = "AKIA7KLFYYLBEG3RHDSV";

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

pub async fn run(
    s: &TestServer,
    args: &[&str],
    stdin: Option<&str>,
    token: bool,
) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(assert_cmd::cargo::cargo_bin("keywarden"));
    cmd.args(args)
        .env("KEYWARDEN_SERVER", &s.base)
        .env("KEYWARDEN_DATA_DIR", s.config.data_dir.join("nonexistent"))
        .env_remove("KEYWARDEN_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if token {
        cmd.env("KEYWARDEN_TOKEN", &s.admin);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn scan_finds_matches_revokes_and_imports(b: Backend) {
    let s = TestServer::start(b).await;
    let (live_id, live) = s.create_key(key_body("leaky")).await;
    let (dead_id, dead) = s.create_key(key_body("already-dead")).await;
    let (st, _) = s
        .post(&format!("/v1/keys/{dead_id}/revoke"), serde_json::json!({}))
        .await;
    assert!(st.is_success());
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(
        d,
        "deploy.sh",
        &format!("#!/bin/sh\nset -e\nexport KW={live}\n"),
    );
    write(d, "old.env", &format!("KW={dead}\n"));
    write(
        d,
        "cloud.env",
        &format!("AWS_ACCESS_KEY_ID={AWS}\nGH={GH}\npassword = \"your-password-here\"\n"),
    );
    write(
        d,
        "allowed.txt",
        &format!("token = {GH} # keywarden:allow\n"),
    );
    write(d, "fixtures/sample.txt", &format!("{GH}\n"));
    write(d, ".gitignore", "secret.log\n");
    write(d, "secret.log", &format!("{AWS}\n"));
    let dir = d.to_str().unwrap();

    let (rc, out, err) = run(&s, &["scan", dir, "--json"], None, true).await;
    assert_eq!(rc, 1, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let findings = v["findings"].as_array().unwrap();
    let at = |name: &str| -> Vec<&Value> {
        findings
            .iter()
            .filter(|f| f["location"]["path"].as_str().unwrap().ends_with(name))
            .collect()
    };
    let ours = at("deploy.sh");
    assert_eq!(ours.len(), 1);
    assert_eq!(ours[0]["rule"], "keywarden-key");
    assert_eq!(ours[0]["line"], 3);
    assert_eq!(ours[0]["keywarden_key"]["id"], live_id.as_str());
    assert_eq!(ours[0]["inventory"]["genuine"], true);
    assert_eq!(ours[0]["inventory"]["live"], true);
    assert_eq!(ours[0]["inventory"]["owner"], "alice@example.com");
    assert_eq!(at("old.env")[0]["inventory"]["state"], "revoked");
    assert_eq!(at("old.env")[0]["inventory"]["live"], false);
    let cloud: Vec<&str> = at("cloud.env")
        .iter()
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    assert_eq!(cloud, ["aws-access-key-id", "github-pat"]);
    assert!(at("allowed.txt").is_empty(), "inline keywarden:allow");
    assert!(at("secret.log").is_empty(), ".gitignore is respected");
    assert_eq!(at("sample.txt").len(), 1);
    for secret in [live.as_str(), dead.as_str(), GH, AWS] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "secrets are redacted"
        );
    }

    let (_, out, _) = run(
        &s,
        &[
            "scan",
            dir,
            "--json",
            "--no-ignore",
            "--allow-path",
            "**/fixtures/**",
            "--show-secrets",
        ],
        None,
        false,
    )
    .await;
    let v: Value = serde_json::from_str(&out).unwrap();
    let paths: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["location"]["path"].as_str().unwrap())
        .collect();
    assert!(paths.iter().any(|p| p.ends_with("secret.log")));
    assert!(!paths.iter().any(|p| p.contains("fixtures")));
    assert!(out.contains(GH), "--show-secrets shows them");
    assert!(
        v["findings"][0].get("inventory").is_none(),
        "no token: no inventory match"
    );

    // SARIF for code-scanning UIs.
    let (rc, out, _) = run(&s, &["scan", dir, "--format", "sarif"], None, false).await;
    assert_eq!(rc, 1);
    let sarif: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(sarif["version"], "2.1.0");
    let results = sarif["runs"][0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    let gh = results
        .iter()
        .find(|r| r["ruleId"] == "github-pat")
        .unwrap();
    assert_eq!(gh["level"], "error");
    assert_eq!(
        gh["locations"][0]["physicalLocation"]["region"]["startLine"],
        2
    );
    assert!(sarif["runs"][0]["tool"]["driver"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == "keywarden-key"));

    // Baseline: record, then nothing new is a clean run.
    let base = d.join("../baseline.json");
    let base = base.to_str().unwrap();
    let (rc, _, err) = run(&s, &["scan", dir, "--write-baseline", base], None, false).await;
    assert_eq!(rc, 0, "{err}");
    let (rc, out, _) = run(&s, &["scan", dir, "--baseline", base], None, false).await;
    assert_eq!(rc, 0);
    assert!(out.contains("no secrets found"));
    assert!(
        !std::fs::read_to_string(base).unwrap().contains(GH),
        "baselines hold fingerprints"
    );

    // --revoke-leaked: the live key is revoked, with where it was found.
    let (rc, _, err) = run(&s, &["scan", dir, "--revoke-leaked"], None, true).await;
    assert_eq!(rc, 1);
    assert!(err.contains(&format!("revoked key {live_id}")), "{err}");
    assert!(!err.contains(&dead_id), "only live keys are revoked: {err}");
    assert_eq!(s.verify_code(&live).await, "REVOKED");
    let (_, audit) = s
        .get(&format!("/v1/audit?key={live_id}&action=key.revoked"))
        .await;
    let reason = audit["entries"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("deploy.sh") && reason.contains("line 3"),
        "{reason}"
    );

    // --import: foreign secrets become shadow keys, by fingerprint only.
    let (rc, _, err) = run(&s, &["scan", dir, "--import"], None, true).await;
    assert_eq!(rc, 1, "{err}");
    assert!(
        err.contains("recorded 2 shadow key(s) in the inventory (2 new)"),
        "{err}"
    );
    run(&s, &["scan", dir, "--import"], None, true).await;
    let (_, shadows) = s.get("/v1/shadow-keys").await;
    let list = shadows["shadow_keys"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let fp = hex::encode(sha2::Sha256::digest(GH.as_bytes()));
    let gh = list
        .iter()
        .find(|x| x["fingerprint"] == fp.as_str())
        .unwrap();
    assert_eq!(gh["kind"], "github-pat");
    assert_eq!(gh["sightings"], 2);
    assert!(gh["location"].as_str().unwrap().ends_with("cloud.env"));
    assert!(!shadows.to_string().contains(GH));
    let (rc, out, _) = s.cli(&["shadow", "list"]).await;
    assert_eq!(rc, 0);
    assert!(out.contains("aws-access-key-id"), "{out}");
    s.stop().await;
}

async fn scan_sources_and_errors(b: Backend) {
    let s = TestServer::start(b).await;
    // Standard input.
    let (rc, out, _) = run(
        &s,
        &["scan", "-", "--json"],
        Some(&format!("x = {GH}\n")),
        false,
    )
    .await;
    assert_eq!(rc, 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["findings"][0]["location"]["source"], "stdin");
    // The environment.
    let out = tokio::process::Command::new(assert_cmd::cargo::cargo_bin("keywarden"))
        .args(["scan", "--env", "--json"])
        .env("CI_DEPLOY_TOKEN", GH)
        .env("PWD", "/home/runner/work/keywarden-builds/keywarden")
        .env_remove("KEYWARDEN_TOKEN")
        .env("KEYWARDEN_DATA_DIR", "/nonexistent")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["location"]["name"] == "CI_DEPLOY_TOKEN"));
    assert!(
        !v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["location"]["name"] == "PWD"),
        "the working directory is not a secret: {v}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("0 file(s) and") && err.contains("environment variable(s)"),
        "variables are not counted as files: {err}"
    );
    // Clean trees exit 0; errors exit 2.
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "ok.txt", "nothing to see\n");
    let dir = tmp.path().to_str().unwrap();
    assert_eq!(run(&s, &["scan", dir], None, false).await.0, 0);
    let (rc, _, err) = run(&s, &["scan", "/nonexistent/path"], None, false).await;
    assert_eq!(rc, 2);
    assert!(err.contains("does not exist"), "{err}");
    let (rc, _, err) = run(&s, &["scan", dir, "--format", "xml"], None, false).await;
    assert_eq!(rc, 2);
    assert!(err.contains("--format"), "{err}");
    write(tmp.path(), "../rules.toml", "[[rule]]\nid = \"x\"\ndescription = \"d\"\nseverity = \"big\"\nregex = \"(a)\"\nkeywords = [\"a\"]\n");
    let rules = tmp.path().join("../rules.toml");
    let (rc, _, err) = run(
        &s,
        &["scan", dir, "--rules", rules.to_str().unwrap()],
        None,
        false,
    )
    .await;
    assert_eq!(rc, 2);
    assert!(err.contains("severity must be"), "{err}");
    // A user rule extends the defaults.
    write(tmp.path(), "../rules.toml", "[[rule]]\nid = \"acme-token\"\ndescription = \"ACME\"\nseverity = \"high\"\nregex = '''\\b(acme_[0-9a-f]{16})\\b'''\nkeywords = [\"acme_\"]\n");
    write(tmp.path(), "acme.txt", "t = acme_0f1e2d3c4b5a6978\n");
    let (rc, out, _) = run(
        &s,
        &["scan", dir, "--rules", rules.to_str().unwrap(), "--json"],
        None,
        false,
    )
    .await;
    assert_eq!(rc, 1);
    assert!(out.contains("\"acme-token\""), "{out}");
    // --revoke-leaked needs the server: without a token it is an error, not a silent skip.
    let tmp2 = tempfile::tempdir().unwrap();
    let key = keywarden_core::key_format::generate(&mut rand::rngs::OsRng, "kw", "prod").unwrap();
    write(tmp2.path(), "k.txt", key.plain.expose());
    let (rc, _, err) = run(
        &s,
        &["scan", tmp2.path().to_str().unwrap(), "--revoke-leaked"],
        None,
        false,
    )
    .await;
    assert_eq!(rc, 2, "{err}");
    s.stop().await;
}

async fn discovery_api_rejects_bad_input(b: Backend) {
    let s = TestServer::start(b).await;
    let (id, key) = s.create_key(key_body("k")).await;
    // A different last character (1 in 62 keys already ends in any given one).
    let last = if key.ends_with('A') { 'B' } else { 'A' };
    let wrong = format!("{}{last}", &key[..key.len() - 1]);
    let (st, v) = s
        .post(
            "/v1/keys/identify",
            serde_json::json!({ "keys": [key, wrong, "junk"] }),
        )
        .await;
    assert!(st.is_success(), "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["genuine"], true);
    assert_eq!(r[0]["key_id"], id.as_str());
    assert_eq!(
        r[1]["genuine"], false,
        "a wrong secret (or checksum) is not genuine"
    );
    assert_eq!(r[2]["genuine"], false);
    assert_eq!(r[2]["key_id"], Value::Null);
    assert!(
        !v.to_string().contains(&key),
        "the answer never echoes a key"
    );
    // Identifying is not a use.
    let (_, k) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(k["uses"], 0);
    let many: Vec<&str> = std::iter::repeat_n("x", 1001).collect();
    let (st, v) = s
        .post("/v1/keys/identify", serde_json::json!({ "keys": many }))
        .await;
    assert_eq!(st.as_u16(), 422, "{v}");
    let (st, v) = s
        .post(
            "/v1/shadow-keys",
            serde_json::json!({ "shadows": [{ "fingerprint": "abc", "kind": "", "severity": "high", "location": "a\nb", "line": -1 }] }),
        )
        .await;
    assert_eq!(st.as_u16(), 422, "{v}");
    let fields = crate::harness::violation_fields(&v);
    assert_eq!(
        fields,
        [
            "shadows[0].fingerprint",
            "shadows[0].kind",
            "shadows[0].location"
        ]
    );
    let (st, v) = s
        .post(
            "/v1/shadow-keys",
            serde_json::json!({ "shadows": [], "extra": 1 }),
        )
        .await;
    assert_eq!(st.as_u16(), 400, "{v}");
    s.stop().await;
}

on_both_backends!(
    scan_finds_matches_revokes_and_imports,
    scan_sources_and_errors,
    discovery_api_rejects_bad_input
);
