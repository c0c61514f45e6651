//! The examples in README.md and docs/ run here, as written, so that they cannot drift
//! from what keywarden does: every policy file applies, every gateway map loads, the
//! verify request of the README answers as shown, and the README's tour of the CLI runs
//! line by line against a real server.

use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{Backend, TestServer};

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn docs() -> Vec<(String, String)> {
    let mut files = vec![("README.md".to_owned(), repo_file("README.md"))];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    names.sort();
    for p in names {
        let rel = format!("docs/{}", p.file_name().unwrap().to_string_lossy());
        files.push((rel.clone(), repo_file(&rel)));
    }
    files
}

/// Code blocks: fenced (```lang … ```), and indented by four spaces after a blank line.
/// Returns (language or "", text).
fn blocks(markdown: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let lines: Vec<&str> = markdown.lines().collect();
    let mut i = 0;
    let mut prev_blank = true;
    while i < lines.len() {
        let line = lines[i];
        if let Some(lang) = line.strip_prefix("```") {
            let mut text = String::new();
            i += 1;
            while i < lines.len() && !lines[i].starts_with("```") {
                text.push_str(lines[i]);
                text.push('\n');
                i += 1;
            }
            out.push((lang.trim().to_owned(), text));
            i += 1;
            prev_blank = false;
            continue;
        }
        if prev_blank && line.starts_with("    ") && !line.trim().is_empty() {
            let mut text = String::new();
            while i < lines.len() && (lines[i].starts_with("    ") || lines[i].trim().is_empty()) {
                text.push_str(lines[i].strip_prefix("    ").unwrap_or(""));
                text.push('\n');
                i += 1;
            }
            out.push((String::new(), text));
            prev_blank = true;
            continue;
        }
        prev_blank = line.trim().is_empty();
        i += 1;
    }
    out
}

fn is_policy(text: &str) -> bool {
    text.lines()
        .any(|l| l.trim() == "[default]" || l.trim().starts_with("[environments."))
}

fn is_gateway_map(lang: &str, text: &str) -> bool {
    lang == "toml" && text.contains("[[route]]")
}

/// Every policy example applies; every gateway map example loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_and_gateway_map_example_is_valid() {
    let s = TestServer::start(Backend::Sqlite).await;
    let (mut policies, mut maps) = (0, 0);
    for (file, text) in docs() {
        for (lang, block) in blocks(&text) {
            if is_policy(&block) {
                let (status, v) = s
                    .call(
                        reqwest::Method::PUT,
                        "/v1/policy",
                        Some(&s.admin),
                        Some(json!({ "policy": block })),
                    )
                    .await;
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "{file}: the policy example\n{block}\n{v}"
                );
                policies += 1;
            } else if is_gateway_map(&lang, &block) {
                if let Err(problems) = keywarden_core::gateway::GatewayMap::from_toml(&block) {
                    panic!("{file}: the gateway map example\n{block}\n{problems:?}");
                }
                maps += 1;
            }
        }
    }
    assert!(policies >= 1, "the README shows a policy");
    assert!(maps >= 1, "docs/gateway.md shows a gateway map");
    s.stop().await;
}

/// The README's `POST /v1/verify` example, with its placeholders filled, answers with the
/// fields the README shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_verify_example_answers_as_shown() {
    let s = TestServer::start(Backend::Sqlite).await;
    let mut body = crate::harness::key_body("gw");
    body["scopes"] = json!(["deploy:write"]);
    let (_, secret) = s.create_key(body).await;
    let readme = repo_file("README.md");
    let all = blocks(&readme);
    let request = all
        .iter()
        .map(|(_, b)| b)
        .find(|b| b.starts_with("POST /v1/verify"))
        .expect("the README shows a verify request");
    let json_text: String = request.lines().skip(2).collect::<Vec<_>>().join("\n");
    let json_text = json_text
        .replace("<the presented key>", &secret)
        .replace("<client address the gateway saw>", "10.1.2.3")
        .replace("<host being provisioned>", "node-1");
    let req: Value =
        serde_json::from_str(&json_text).unwrap_or_else(|e| panic!("{e}: {json_text}"));
    let answer = s.verify(req).await;
    assert_eq!(answer["code"], "VALID", "{answer}");
    let shown = all
        .iter()
        .map(|(_, b)| b)
        .find(|b| b.starts_with("{\"valid\": true"))
        .expect("the README shows a verify answer");
    let shown: Value = serde_json::from_str(&shown.replace('…', "x")).unwrap();
    for field in shown.as_object().unwrap().keys() {
        assert!(
            answer.get(field).is_some(),
            "the answer lacks {field}: {answer}"
        );
    }
    s.stop().await;
}

/// The lines of the README's tour, continuation lines joined.
fn tour() -> Vec<String> {
    let readme = repo_file("README.md");
    let start = readme.find("## A tour of the CLI").expect("the tour");
    let block = blocks(&readme[start..])
        .into_iter()
        .next()
        .expect("the tour's commands")
        .1;
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.trim_end();
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            continue;
        }
        if line.trim_start().starts_with('#') {
            continue;
        }
        current.push_str(line);
        if !current.trim().is_empty() {
            lines.push(current.trim().to_owned());
        }
        current.clear();
    }
    lines
}

/// Every line of the README's tour, run by a shell as a reader would paste it, against a
/// real server: `$KEY` is a key's secret, `ID` its id, files go to a scratch directory
/// that is a git repository. Each line must succeed, except where the README itself
/// says the answer is negative.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour_runs() {
    let s = TestServer::start(Backend::Sqlite).await;
    let mut body = crate::harness::key_body("tour");
    body["scopes"] = json!(["deploy:write"]);
    let (id, secret) = s.create_key(body).await;
    let dir = tempfile::tempdir().unwrap();
    let readme = repo_file("README.md");
    let policy = blocks(&readme)
        .into_iter()
        .map(|(_, b)| b)
        .find(|b| is_policy(b))
        .expect("the README's policy");
    std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
    for args in [
        vec!["init", "-q"],
        vec![
            "-c",
            "user.email=t@example.com",
            "-c",
            "user.name=t",
            "add",
            ".",
        ],
        vec![
            "-c",
            "user.email=t@example.com",
            "-c",
            "user.name=t",
            "commit",
            "-qm",
            "x",
        ],
    ] {
        let st = Command::new("git")
            .args(&args)
            .current_dir(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "git {args:?}");
    }
    let bin_dir = assert_cmd::cargo::cargo_bin("keywarden")
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let lines = tour();
    assert!(lines.len() >= 15, "{lines:?}");
    for line in &lines {
        assert!(
            line.starts_with("keywarden "),
            "a tour line is a command: {line}"
        );
        let command: String = line
            .split(' ')
            .map(|w| if w == "ID" { id.as_str() } else { w })
            .collect::<Vec<_>>()
            .join(" ");
        let s_ref = &s;
        let out = tokio::task::block_in_place(|| {
            Command::new("bash")
                .args(["-c", &command])
                .current_dir(dir.path())
                .env("PATH", &path)
                .env("KEY", &secret)
                .env("KEYWARDEN_SERVER", &s_ref.base)
                .env("KEYWARDEN_TOKEN", &s_ref.admin)
                .env("KEYWARDEN_DATA_DIR", dir.path().join("no-data-dir"))
                .output()
                .unwrap()
        });
        let code = out.status.code();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The README says `--wait` exits 1 unless every service confirmed: the tour's
        // service is at an address that does not resolve here.
        let expected = if line.contains("--wait") { 1 } else { 0 };
        assert_eq!(code, Some(expected), "{line}\n{stderr}");
    }
    s.stop().await;
}

/// `docs/errors.md` lists every error code with the status the server answers it with,
/// and no code the server does not have.
#[test]
fn the_error_code_table_matches_the_server() {
    let page = repo_file("docs/errors.md");
    let mut listed = Vec::new();
    for line in page.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [_, code, status, ..] = cells.as_slice() {
            if let Some(code) = code.strip_prefix('`').and_then(|c| c.strip_suffix('`')) {
                listed.push((code.to_owned(), status.parse::<u16>().expect(code)));
            }
        }
    }
    let table: Vec<(String, u16)> = keywarden_proto::ErrorCode::ALL
        .iter()
        .map(|c| (c.as_str().to_owned(), c.status()))
        .collect();
    assert_eq!(listed, table, "docs/errors.md and ErrorCode::ALL differ");
}
