//! The real binary: `serve` in a child process driven by the CLI. Checks the first-start
//! files, CLI exit codes, that no secret reaches the logs, and that SIGTERM flushes every
//! usage event.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{eventually, WAIT};

/// A `keywarden serve` child process, killed on drop if still running: a test that
/// fails midway leaves no server behind holding its data directory or database.
pub struct Served {
    pub child: Child,
    pub base: String,
    pub bootstrap: String,
    stdout_rest: mpsc::Receiver<String>,
    /// Drained continuously so the server never blocks on a full pipe.
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Served {
    /// Stops the server with SIGTERM and returns everything it logged.
    pub fn terminate(self) -> String {
        self.terminate_with_output().1
    }

    /// Stops the server with SIGTERM; its exit status, everything it logged, and what it
    /// printed after its address.
    pub fn terminate_with_output(mut self) -> (std::process::ExitStatus, String, Vec<String>) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let exit = self.child.wait().expect("wait for keywarden serve");
        let logs = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let rest = self.stdout_rest.try_iter().collect();
        (exit, logs, rest)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn bin() -> Command {
    Command::new(assert_cmd::cargo::cargo_bin("keywarden"))
}

fn serve(data_dir: &Path) -> Served {
    serve_with(data_dir, &[])
}

/// `keywarden serve` in a child process with more arguments (a database, intervals).
pub fn serve_with(data_dir: &Path, extra: &[&str]) -> Served {
    serve_with_env(data_dir, extra, &[])
}

/// `serve_with`, with more environment variables for the server.
pub fn serve_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Served {
    let mut child = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--outbound-allow",
            "127.0.0.1",
        ])
        .args(extra)
        .env("KEYWARDEN_DATA_DIR", data_dir)
        .env("KEYWARDEN_LOG", "trace")
        .env_remove("KEYWARDEN_TOKEN")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keywarden serve");
    let stdout = child.stdout.take().unwrap();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr_pipe.read_to_string(&mut all);
        all
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    let base = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server prints its address");
        if let Some(addr) = line.strip_prefix("keywarden listening on ") {
            break addr.trim().to_owned();
        }
        printed.push(line);
    };
    // Standard output is a pipe here, not a terminal: the bootstrap token must not be in
    // it; it is in the data directory's token file.
    assert!(
        !printed.iter().any(|l| l.contains("kw_admin_")),
        "the bootstrap token reached a non-terminal standard output: {printed:?}"
    );
    let created = printed
        .iter()
        .any(|l| l.starts_with("Created the bootstrap admin token in"));
    let bootstrap = if created {
        std::fs::read_to_string(data_dir.join("admin-token"))
            .expect("the bootstrap token file")
            .trim()
            .to_owned()
    } else {
        String::new()
    };
    Served {
        child,
        base,
        bootstrap,
        stdout_rest: rx,
        stderr: Some(stderr),
    }
}

fn cli(s: &Served, data_dir: &Path, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut cmd = bin();
    cmd.args(args)
        .env("KEYWARDEN_SERVER", &s.base)
        .env("KEYWARDEN_DATA_DIR", data_dir)
        .env_remove("KEYWARDEN_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_cycle_keeps_secrets_out_of_logs_and_flushes_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = serve(&data);
    let mut secrets = vec![s.bootstrap.clone()];
    assert!(s.bootstrap.starts_with("kw_admin_"));

    // First start: token file and pepper are private.
    let token_file = std::fs::read_to_string(data.join("admin-token")).unwrap();
    assert_eq!(token_file.trim(), s.bootstrap);
    assert_eq!(mode(&data.join("admin-token")), 0o600);
    assert_eq!(mode(&data.join("pepper")), 0o600);
    let pepper = std::fs::read_to_string(data.join("pepper")).unwrap();
    let pepper_hex = pepper.lines().find(|l| l.starts_with("v1:")).unwrap()[3..].to_owned();
    secrets.push(pepper_hex);
    assert_eq!(mode(&data.join("audit-signing.key")), 0o600);
    let signing = std::fs::read_to_string(data.join("audit-signing.key")).unwrap();
    let seed = signing
        .lines()
        .find(|l| !l.starts_with('#'))
        .unwrap()
        .trim();
    assert_eq!(seed.len(), 64);
    secrets.push(seed.to_owned());

    // The CLI finds the token in the data directory by itself.
    let (rc, out, err) = cli(
        &s,
        &data,
        &[
            "key",
            "create",
            "--json",
            "--name",
            "ci-deploy",
            "--owner",
            "alice@example.com",
            "--environment",
            "prod",
            "--system",
            "github",
            "--scope",
            "deploy:write",
            "--ttl",
            "30d",
            "--meta",
            "team=infra",
            "--allow-cidr",
            "127.0.0.0/8",
        ],
        None,
    );
    assert_eq!(rc, 0, "{err}");
    let created = json_of(&out);
    let key = created["secret"].as_str().unwrap().to_owned();
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    secrets.push(key.clone());

    let (rc, out, _) = cli(
        &s,
        &data,
        &["verify", &key, "--scope", "deploy:write"],
        None,
    );
    assert_eq!(rc, 0, "{out}");
    assert!(out.starts_with("VALID"), "{out}");
    let (rc, out, _) = cli(&s, &data, &["verify", &key, "--scope", "db:read"], None);
    assert_eq!(
        (rc, out.trim().split(' ').next().unwrap()),
        (1, "SCOPE_DENIED")
    );
    let (rc, out, _) = cli(
        &s,
        &data,
        &["verify", "-", "--json"],
        Some(&format!("{key}\n")),
    );
    assert_eq!((rc, json_of(&out)["code"].clone()), (0, json!("VALID")));

    let (rc, out, err) = cli(
        &s,
        &data,
        &["key", "rotate", &id, "--grace", "0s", "--json"],
        None,
    );
    assert_eq!(rc, 0, "{err}");
    let successor = json_of(&out)["secret"].as_str().unwrap().to_owned();
    secrets.push(successor.clone());
    let (rc, out, _) = cli(&s, &data, &["verify", &key], None);
    assert_eq!((rc, out.trim().split(' ').next().unwrap()), (1, "EXPIRED"));
    let (rc, out, _) = cli(&s, &data, &["key", "list"], None);
    assert_eq!(rc, 0);
    assert!(
        out.contains("ci-deploy") && out.contains("expired") && out.contains("active"),
        "{out}"
    );
    let (rc, out, _) = cli(&s, &data, &["key", "usage", &id], None);
    assert_eq!(rc, 0);
    assert!(out.contains("SCOPE_DENIED"), "{out}");
    // The old key, presented after its grace: an alert, by key id only.
    let out = eventually(WAIT, "the alert on the old key", || async {
        let (rc, out, err) = cli(&s, &data, &["alert", "list"], None);
        assert_eq!(rc, 0, "{err}");
        if out.contains(&id) {
            Ok(out)
        } else {
            Err(out)
        }
    })
    .await;
    assert!(out.contains("EXPIRED"), "{out}");

    let (rc, out, err) = cli(
        &s,
        &data,
        &[
            "token", "create", "--name", "gateway", "--role", "verifier", "--json",
        ],
        None,
    );
    assert_eq!(rc, 0, "{err}");
    let verifier = json_of(&out)["secret"].as_str().unwrap().to_owned();
    secrets.push(verifier.clone());

    // Usage errors and refusals exit 2 with a message.
    let (rc, _, err) = cli(&s, &data, &["key", "create", "--name", "x"], None);
    assert_eq!(rc, 2, "{err}");
    let (rc, _, err) = cli(&s, &data, &["key", "show", "AAAAAAAAAAAAAAAA"], None);
    assert_eq!(rc, 2);
    assert!(err.contains("KEY_NOT_FOUND"), "{err}");
    let (rc, _, err) = cli(&s, &data, &["--token", &verifier, "key", "list"], None);
    assert_eq!(rc, 2);
    assert!(err.contains("FORBIDDEN"), "{err}");
    assert!(!err.contains(&verifier));

    // A connected service: its signing secret is shown once and logged nowhere; the
    // revocation reaches it, signed, before `--wait` returns.
    let receiver = crate::receiver::Receiver::start().await;
    let (rc, out, err) = cli(
        &s,
        &data,
        &[
            "service",
            "add",
            "edge",
            "--webhook",
            &receiver.url,
            "--json",
        ],
        None,
    );
    assert_eq!(rc, 0, "{err}");
    let whsec = json_of(&out)["secret"].as_str().unwrap().to_owned();
    secrets.push(whsec.trim_start_matches("whsec_").to_owned());
    let (rc, out, err) = cli(&s, &data, &["key", "revoke", &id, "--wait", "10s"], None);
    assert_eq!(rc, 0, "{out}{err}");
    assert_eq!(receiver.received()[0].json["type"], "key.revoked");

    // A burst of verifies, then SIGTERM straight away: every event must reach the store.
    let http = reqwest::Client::new();
    let burst = 300;
    for i in 0..burst {
        let v: Value = http
            .post(format!("{}/v1/verify", s.base))
            .bearer_auth(&verifier)
            .json(&json!({"key": successor, "subject": format!("host-{}", i % 7)}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["code"], "VALID");
    }
    let (exit, logs, rest) = s.terminate_with_output();
    assert!(exit.success(), "graceful exit: {exit:?}");

    let store = keywarden_store::Store::connect(&format!(
        "sqlite://{}",
        data.join("keywarden.db").display()
    ))
    .await
    .unwrap();
    // 3 CLI verifies + 1 after rotation + the burst.
    assert_eq!(store.count_usage().await.unwrap(), 4 + burst);
    let successor_id = keywarden_core::key_format::parse(&successor, "kw")
        .unwrap()
        .id;
    assert_eq!(store.subjects(&successor_id).await.unwrap().len(), 7);

    assert!(logs.contains("usage events flushed"), "shutdown is logged");
    assert!(
        logs.lines().count() > 20,
        "trace logging was on: {}",
        logs.lines().count()
    );
    // The whole audit trail, as stored, holds no secret either.
    let (entries, _) = store
        .audit_entries(
            &keywarden_store::AuditFilter::default(),
            keywarden_store::AuditOrder::OldestFirst,
            None,
            1000,
        )
        .await
        .unwrap();
    assert!(entries.len() >= 5, "the CLI cycle was audited");
    let trail: String = entries
        .iter()
        .map(|e| keywarden_core::audit_chain::canonical(e.seq, &e.entry))
        .collect();
    for secret in &secrets {
        assert!(
            !trail.contains(secret.as_str()),
            "a secret reached the audit trail"
        );
        assert!(!logs.contains(secret.as_str()), "a secret reached the logs");
        assert!(
            !rest.iter().any(|l| l.contains(secret.as_str())),
            "a secret reached stdout after start"
        );
        // Not even the secret part alone.
        let tail = &secret[secret.len().saturating_sub(38)..];
        assert!(!logs.contains(tail));
    }
    store.close().await;
}

/// `serve` refuses a bad gateway map or outbound network with every problem named,
/// before it touches the data directory.
#[test]
fn serve_refuses_bad_gateway_maps_and_networks() {
    let tmp = tempfile::tempdir().unwrap();
    let map = tmp.path().join("gateway.toml");
    std::fs::write(
        &map,
        "unmatched = \"maybe\"\n[[route]]\npath = \"deploy\"\n[[route]]\npath = \"/x\"\nscope = \"Bad Scope\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--gateway-map"])
        .arg(&map)
        .env("KEYWARDEN_DATA_DIR", tmp.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gateway map"), "{err}");
    assert!(
        err.contains("unmatched")
            && err.contains("route 1 (deploy)")
            && err.contains("route 2 (/x)"),
        "{err}"
    );
    let out = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--outbound-allow",
            "intranet",
        ])
        .env("KEYWARDEN_DATA_DIR", tmp.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--outbound-allow \"intranet\" is not a CIDR"));
    for (flag, value) in [("--webhook-retry-for", "10m"), ("--cluster-poll", "soon")] {
        let out = bin()
            .args(["serve", "--listen", "127.0.0.1:0", flag, value])
            .env("KEYWARDEN_DATA_DIR", tmp.path().join("data"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && err.contains("at least"), "{err}");
    }
}
