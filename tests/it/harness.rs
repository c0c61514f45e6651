//! A real server on a free port, on real SQLite or real PostgreSQL, with a clock the test
//! moves.

use std::sync::Arc;

use keywarden_core::clock::ManualClock;
use keywarden_server::{Config, RunningServer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use time::macros::datetime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each listed `async fn name(b: Backend)` once per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::harness::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(b) = $crate::harness::postgres_or_skip() {
                        super::$name(b).await;
                    }
                }
            )*
        }
    };
}

pub fn postgres_url() -> String {
    std::env::var("KEYWARDEN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// PostgreSQL tests must run in CI (`CI` set): there a missing server fails the test.
/// Elsewhere a missing server is reported on stderr and the test is skipped.
pub fn postgres_or_skip() -> Option<Backend> {
    let addr = postgres_url()
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5432")
        .to_owned();
    let reachable = std::net::TcpStream::connect(&addr).is_ok();
    if reachable {
        return Some(Backend::Postgres);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "PostgreSQL is not reachable at {addr}; CI must run these tests against it"
    );
    eprintln!("SKIPPED: PostgreSQL not reachable at {addr} (set KEYWARDEN_TEST_POSTGRES)");
    None
}

/// A fresh schema per test so tests run in parallel on one database; returns its URL and
/// name.
pub async fn postgres_schema_url() -> (String, String) {
    use sqlx::Connection;
    let base = postgres_url();
    let schema = format!(
        "kw_test_{}",
        keywarden_core::base62::random(&mut rand::rngs::OsRng, 12).to_lowercase()
    );
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .expect("connect to postgres");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .expect("create schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    (
        format!("{base}{sep}options=-c%20search_path%3D{schema}"),
        schema,
    )
}

pub async fn drop_schema(schema: &str) {
    use sqlx::Connection;
    if let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_url()).await {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut conn)
            .await;
    }
}

pub struct TestServer {
    pub server: Option<RunningServer>,
    pub clock: Arc<ManualClock>,
    pub base: String,
    pub admin: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
    schema: Option<String>,
    pub config: Config,
}

pub const START: time::OffsetDateTime = datetime!(2026-06-01 12:00 UTC);

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(dir.path().join("data"));
        config.listen = "127.0.0.1:0".parse().expect("addr");
        // Tests that move the clock count audit entries; the sweep runs only where asked.
        config.enforcer_interval = std::time::Duration::from_secs(3600);
        let mut schema = None;
        if backend == Backend::Postgres {
            let (url, name) = postgres_schema_url().await;
            config.database_url = Some(url);
            schema = Some(name);
        }
        tweak(&mut config);
        let clock = Arc::new(ManualClock::new(START));
        let server = keywarden_server::start(config.clone(), clock.clone())
            .await
            .expect("server starts");
        let admin = server
            .bootstrap_token
            .as_ref()
            .expect("first start makes a bootstrap token")
            .expose()
            .to_owned();
        Self {
            base: format!("http://{}", server.addr),
            server: Some(server),
            clock,
            admin,
            http: reqwest::Client::builder()
                .user_agent("keywarden-tests/1")
                .build()
                .expect("client"),
            _dir: dir,
            schema,
            config,
        }
    }

    /// Runs SQL straight against the server's database, behind its back (tampering,
    /// failure injection).
    pub async fn sql(&self, statements: &[&str]) {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&self.config.database_url())
            .await
            .expect("connect to the test database");
        for st in statements {
            sqlx::raw_sql(st)
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{st}: {e}"));
        }
        conn.close().await.expect("close");
    }

    /// Runs the real CLI against this server as the admin; (exit code, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = tokio::process::Command::new(assert_cmd::cargo::cargo_bin("keywarden"))
            .args(args)
            .env("KEYWARDEN_SERVER", &self.base)
            .env("KEYWARDEN_TOKEN", &self.admin)
            .env(
                "KEYWARDEN_DATA_DIR",
                self.config.data_dir.join("nonexistent"),
            )
            .output()
            .await
            .expect("run keywarden");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(&self.admin), Some(body))
            .await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, Some(&self.admin), None)
            .await
    }

    /// Creates a key; returns (id, secret).
    pub async fn create_key(&self, body: Value) -> (String, String) {
        let (status, v) = self.post("/v1/keys", body).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        (
            v["key"]["id"].as_str().expect("id").to_owned(),
            v["secret"].as_str().expect("secret").to_owned(),
        )
    }

    pub async fn verify(&self, body: Value) -> Value {
        let (status, v) = self.post("/v1/verify", body).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    pub async fn verify_code(&self, key: &str) -> String {
        self.verify(json!({ "key": key })).await["code"]
            .as_str()
            .expect("code")
            .to_owned()
    }

    /// Makes a token of `role`; returns its secret.
    pub async fn token(&self, role: &str, environments: Option<Vec<&str>>) -> String {
        let mut body = json!({ "name": format!("{role}-token"), "role": role });
        if let Some(envs) = environments {
            body["environments"] = json!(envs);
        }
        let (status, v) = self.post("/v1/tokens", body).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v["secret"].as_str().expect("secret").to_owned()
    }

    /// Waits until the usage writer has stored `n` events for `key_id`.
    pub async fn wait_for_usage(&self, key_id: &str, n: usize) -> Value {
        for _ in 0..200 {
            let (_, v) = self
                .get(&format!("/v1/keys/{key_id}/usage?limit=1000"))
                .await;
            if v["events"].as_array().map_or(0, Vec::len) >= n {
                return v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("usage events for {key_id} did not reach {n}");
    }

    /// Stops the server and starts it again on the same data directory and database.
    /// Returns whether the new start made a bootstrap token.
    pub async fn restart(&mut self) -> bool {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        let server = keywarden_server::start(self.config.clone(), self.clock.clone())
            .await
            .expect("server restarts");
        let bootstrapped = server.bootstrap_token.is_some();
        self.base = format!("http://{}", server.addr);
        self.server = Some(server);
        bootstrapped
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        if let Some(schema) = self.schema.take() {
            drop_schema(&schema).await;
        }
    }
}

pub fn key_body(name: &str) -> Value {
    json!({
        "name": name,
        "owner": "alice@example.com",
        "environment": "prod",
        "systems": ["github"],
        "scopes": ["deploy:write", "db:*"],
        "ttl": "30d",
    })
}

/// The `field` of each violation in a 422 answer, in order.
pub fn violation_fields(v: &Value) -> Vec<&str> {
    v["error"]["violations"]
        .as_array()
        .expect("a violations array")
        .iter()
        .map(|x| x["field"].as_str().expect("a field name"))
        .collect()
}
