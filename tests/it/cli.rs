//! The CLI as a newcomer meets it: it finds a server on another port through the data
//! directory, says how to point it elsewhere when it cannot reach one, exits quietly
//! when its reader goes away, and keeps `--json` for errors too.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::{key_body, Backend, TestServer};

fn bin() -> Command {
    Command::new(assert_cmd::cargo::cargo_bin("keywarden"))
}

/// `serve --listen` on another port: CLI commands from the same data directory find it
/// with no `--server`; once it is gone, the error names the fix.
#[test]
fn the_cli_finds_a_server_on_another_port() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = crate::process::serve_with(dir.path(), &[]);
    assert!(!served.base.ends_with(":8470"), "{}", served.base);
    let out = bin()
        .args(["key", "list"])
        .env("KEYWARDEN_DATA_DIR", dir.path())
        .env_remove("KEYWARDEN_SERVER")
        .env_remove("KEYWARDEN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = served.child.kill();
    let _ = served.child.wait();
    let out = bin()
        .args(["key", "list"])
        .env("KEYWARDEN_DATA_DIR", dir.path())
        .env_remove("KEYWARDEN_SERVER")
        .env_remove("KEYWARDEN_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--server"), "the error names the fix: {err}");
    assert_eq!(
        err.matches("error sending request").count(),
        1,
        "the cause once, not twice: {err}"
    );
}

/// Reads one line of a command's output, closes the pipe as `head -1` does, and returns
/// the exit code and standard error.
fn first_line_then_close(s: &TestServer, args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = bin()
        .args(args)
        .env("KEYWARDEN_SERVER", &s.base)
        .env("KEYWARDEN_TOKEN", &s.admin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        let stdout = child.stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut first).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        first,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_into_head_the_cli_exits_quietly() {
    let s = TestServer::start(Backend::Sqlite).await;
    // More output than a pipe holds (64 KiB), so the writer meets the closed pipe.
    for i in 0..300 {
        s.create_key(key_body(&format!("k{i}"))).await;
    }
    for args in [
        vec!["--json", "key", "list", "--limit", "1000"],
        vec!["audit", "export", "--format", "csv"],
    ] {
        let s = &s;
        let (code, first, err) = tokio::task::block_in_place(|| first_line_then_close(s, &args));
        assert!(!first.is_empty(), "{args:?}");
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
    }
    s.stop().await;
}

/// With `--json`, an error is a JSON object on standard output, with the API's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_covers_errors() {
    let s = TestServer::start(Backend::Sqlite).await;
    let (rc, out, _) = s.cli(&["--json", "key", "show", "AAAAAAAAAAAAAAAA"]).await;
    assert_eq!(rc, 2);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["error"]["code"], "KEY_NOT_FOUND", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("AAAAAAAAAAAAAAAA"));
    // An error before any request (a bad flag value) is JSON too.
    let (rc, out, _) = s
        .cli(&[
            "--json",
            "key",
            "revoke",
            "AAAAAAAAAAAAAAAA",
            "--wait",
            "soon",
        ])
        .await;
    assert_eq!(rc, 2);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["error"]["code"], "CLI_ERROR", "{v}");
    s.stop().await;
}

/// `key list` shows the inventory's columns; `key show` counts subjects and names the
/// latest few instead of printing hundreds in one cell, and says when no service is
/// connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_list_and_show_read_as_an_inventory() {
    let s = TestServer::start(Backend::Sqlite).await;
    let (id, secret) = s.create_key(key_body("inventory")).await;
    for i in 0..8 {
        s.clock.advance(time::Duration::seconds(1));
        let v = s
            .verify(serde_json::json!({ "key": secret, "subject": format!("host-{i:02}") }))
            .await;
        assert_eq!(v["code"], "VALID");
    }
    s.wait_for_usage(&id, 8).await;
    let (rc, out, err) = s.cli(&["key", "list"]).await;
    assert_eq!(rc, 0, "{err}");
    for column in ["SYSTEMS", "CREATED", "LAST USED", "github"] {
        assert!(out.contains(column), "{column}: {out}");
    }
    let (rc, out, err) = s.cli(&["key", "show", &id]).await;
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("8 (latest: "), "{out}");
    assert!(!out.contains("host-00"), "only the latest few: {out}");
    let (st, _) = s
        .post(&format!("/v1/keys/{id}/revoke"), serde_json::json!({}))
        .await;
    assert_eq!(st, reqwest::StatusCode::OK);
    let (_, out, _) = s.cli(&["key", "show", &id]).await;
    assert!(out.contains("no connected services"), "{out}");
    assert!(!out.contains("0 of 0"), "{out}");
    s.stop().await;
}

/// A pull service is handed no signing secret; `events tail` prints the revocation it
/// must apply and `events ack` confirms it, which `key show` then counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_service_tails_and_acknowledges_from_the_cli() {
    let s = TestServer::start(Backend::Sqlite).await;
    let (rc, out, err) = s.cli(&["service", "add", "cache-gw"]).await;
    assert_eq!(rc, 0, "{err}");
    assert!(
        !out.contains("whsec_"),
        "no signing secret for a pull service: {out}"
    );
    assert!(out.contains("events tail"), "{out}");
    let (id, _) = s.create_key(key_body("pulled")).await;
    let (st, _) = s
        .post(&format!("/v1/keys/{id}/revoke"), serde_json::json!({}))
        .await;
    assert_eq!(st, reqwest::StatusCode::OK);
    let (rc, out, err) = s.cli(&["--json", "events", "tail"]).await;
    assert_eq!(rc, 0, "{err}");
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let revoked = events
        .iter()
        .find(|e| e["type"] == "key.revoked" && e["key_id"] == id.as_str())
        .unwrap_or_else(|| panic!("the revocation is in the stream: {out}"));
    let seq = revoked["seq"].as_i64().unwrap().to_string();
    let (rc, out, _) = s.cli(&["events", "tail"]).await;
    assert_eq!(rc, 0);
    assert!(out.contains("key.revoked") && out.contains(&id), "{out}");
    let (rc, out, err) = s
        .cli(&["events", "ack", "--service", "cache-gw", &seq])
        .await;
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("acknowledged every event up to"), "{out}");
    let (_, v) = s.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(v["propagation"]["confirmed"], 1, "{v}");
    s.stop().await;
}

/// Environment names with hyphens, up to 16 characters: issued, verified, listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_may_have_hyphens() {
    let s = TestServer::start(Backend::Sqlite).await;
    for env in ["staging-eu", "pre-prod", "sandbox2eu"] {
        let (rc, out, err) = s
            .cli(&[
                "--json",
                "key",
                "create",
                "--name",
                "k",
                "--owner",
                "a@example.com",
                "--environment",
                env,
                "--scope",
                "deploy:write",
                "--ttl",
                "1d",
            ])
            .await;
        assert_eq!(rc, 0, "{env}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let secret = v["secret"].as_str().unwrap();
        assert!(secret.starts_with(&format!("kw_{env}_")), "{secret}");
        let answer = s
            .verify(serde_json::json!({"key": secret, "environment": env}))
            .await;
        assert_eq!(answer["code"], "VALID", "{answer}");
    }
    let (status, v) = s
        .post("/v1/keys", {
            let mut b = key_body("too-long");
            b["environment"] = serde_json::json!("seventeen-chars-x");
            b
        })
        .await;
    assert_eq!(status, reqwest::StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    s.stop().await;
}
