//! Issue 18, item 5: slow and idle connections are closed, connections are limited, and
//! the open-file limit is raised at start. Raw sockets against a real server.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::harness::{key_body, Backend, TestServer};

/// How long a test waits for something the server must do within its (sub-second or
/// second) timeouts. A bound, not a measurement: it only has to end a hung test.
const BOUND: Duration = Duration::from_secs(20);

async fn start(tweak: impl FnOnce(&mut keywarden_server::Config)) -> TestServer {
    TestServer::start_with(Backend::Sqlite, |c| {
        c.header_timeout = Duration::from_millis(500);
        c.idle_timeout = Duration::from_secs(2);
        tweak(c);
    })
    .await
}

fn addr(s: &TestServer) -> String {
    s.base.trim_start_matches("http://").to_owned()
}

/// A client that opens a fresh connection per request, so that no pooled connection the
/// server has closed is reused.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Reads until the server closes the connection (EOF or reset); returns what it sent.
/// Panics if it stays open for `BOUND`.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(BOUND, read_all)
        .await
        .expect("the server closes the connection");
    got
}

/// A verify through a fresh connection answers.
async fn verify_works(s: &TestServer, key: &str) {
    let resp = fresh_client()
        .post(s.url("/v1/verify"))
        .bearer_auth(&s.admin)
        .json(&json!({ "key": key, "scope": "deploy:write" }))
        .timeout(BOUND)
        .send()
        .await
        .expect("verify answers");
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "VALID");
}

/// Slowloris: request heads sent a few bytes at a time, never finished, and connections
/// that send nothing, are closed by the server at the header timeout; verify keeps
/// answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_at_the_header_timeout() {
    let s = start(|_| {}).await;
    let (_, key) = s.create_key(key_body("slowloris")).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let addr = addr(&s);
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(&addr).await.unwrap();
            let (mut read, mut write) = stream.into_split();
            // Half of them trickle header lines forever; the other half send nothing.
            let trickle = async move {
                if i % 2 == 0 {
                    let _ = write.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
                    loop {
                        if write.write_all(b"X-Slow: 1\r\n").await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                } else {
                    std::future::pending::<()>().await;
                }
            };
            let closed = async move {
                let mut buf = [0u8; 1024];
                loop {
                    match read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            };
            tokio::select! {
                () = closed => {}
                () = trickle => {}
                () = tokio::time::sleep(BOUND) => panic!("connection {i} is still open after {BOUND:?}"),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    verify_works(&s, &key).await;
    s.stop().await;
}

/// A kept-alive connection is closed after the idle timeout, while a request in flight
/// for longer than that (a long poll) is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_long_requests_are_not() {
    let s = start(|_| {}).await;
    let mut stream = TcpStream::connect(addr(&s)).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = until_closed(&mut stream).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "answered, then closed when idle: {text}"
    );

    // A long poll that outlasts the idle timeout (2 s) is answered, not cut.
    let resp = fresh_client()
        .get(s.url("/v1/events?wait=3s"))
        .bearer_auth(&s.admin)
        .timeout(BOUND)
        .send()
        .await
        .expect("the long poll is answered");
    assert_eq!(resp.status(), StatusCode::OK);
    s.stop().await;
}

/// With every connection slot taken by clients that send nothing, the server stops
/// accepting; once the header timeout frees the slots, the waiting connections are
/// served, and verify works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_and_recovers() {
    const LIMIT: usize = 8;
    let s = start(|c| c.max_connections = LIMIT).await;
    let (_, key) = s.create_key(key_body("limit")).await;
    // `create_key` left a kept-alive connection in the harness client's pool; it takes a
    // slot until it idles out, like any other connection.
    let mut silent = Vec::new();
    for _ in 0..LIMIT + 4 {
        silent.push(TcpStream::connect(addr(&s)).await.unwrap());
    }
    // Beyond the limit: waits in the backlog, unaccepted, until slots free up.
    let mut waiting = TcpStream::connect(addr(&s)).await.unwrap();
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let first_closed = tokio::spawn(async move {
        let mut closes = Vec::new();
        for mut stream in silent {
            closes.push(tokio::spawn(async move {
                until_closed(&mut stream).await;
                Instant::now()
            }));
        }
        let mut at = Vec::new();
        for c in closes {
            at.push(c.await.unwrap());
        }
        at.into_iter().min().unwrap()
    });
    let answer = until_closed(&mut waiting).await;
    let answered = Instant::now();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let first_closed = first_closed.await.unwrap();
    assert!(
        first_closed <= answered,
        "the waiting connection was served only after silent ones were closed"
    );
    verify_works(&s, &key).await;
    s.stop().await;
}

/// `serve` raises the soft open-file limit to the hard limit.
#[test]
fn serve_raises_the_open_file_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 512 && exec \"$0\" serve --listen 127.0.0.1:0")
        .arg(assert_cmd::cargo::cargo_bin("keywarden"))
        .env("KEYWARDEN_DATA_DIR", tmp.path().join("data"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let listening = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("keywarden listening on"))
    });
    assert!(listening.join().unwrap(), "serve started");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_eq!(soft, hard, "{line}");
    assert_ne!(soft, "512", "{line}");
}

#[test]
fn serve_refuses_bad_connection_flags() {
    let tmp = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--header-timeout", "soon"),
        ("--idle-timeout", "0s"),
        ("--max-connections", "0"),
    ] {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("keywarden"))
            .args(["serve", "--listen", "127.0.0.1:0", flag, value])
            .env("KEYWARDEN_DATA_DIR", tmp.path().join("data"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{err}");
    }
}
