//! A real server on a free port, on real SQLite or real PostgreSQL, with a clock the test
//! moves.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keywarden_core::clock::ManualClock;
use keywarden_server::state::SharedState;
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

/// How long a test waits for something the server does promptly (a background write, a
/// delivery, a wake-up). A bound, not a measurement: it only has to end a hung test.
pub const WAIT: Duration = Duration::from_secs(10);

/// What a probe of [`eventually`] answers: done, with a value, or not yet, with what it
/// saw (for the message should the wait run out).
pub trait Probe {
    type Value;
    fn settled(self) -> Result<Self::Value, String>;
}

impl Probe for bool {
    type Value = ();
    fn settled(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err(String::new())
        }
    }
}

impl<T> Probe for Option<T> {
    type Value = T;
    fn settled(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

/// `Err` is "not yet", and says what was seen instead.
impl<T, E: std::fmt::Display> Probe for Result<T, E> {
    type Value = T;
    fn settled(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

fn gave_up(within: Duration, what: &str, last: &str) -> ! {
    if last.is_empty() {
        panic!("waited {within:?} for {what}, in vain");
    }
    panic!("waited {within:?} for {what}, in vain; last saw: {last}");
}

/// Probes until `probe` settles (`true`, `Some`, `Ok`) and returns its value; panics
/// naming `what` once `within` has passed. For state the server reaches by itself with
/// no signal to wait on; where there is one, [`signalled`] waits on it.
pub async fn eventually<P: Probe, F: Future<Output = P>>(
    within: Duration,
    what: &str,
    probe: impl FnMut() -> F,
) -> P::Value {
    match poll_until(within, probe).await {
        Ok(v) => v,
        Err(last) => gave_up(within, what, &last),
    }
}

/// [`eventually`] for a caller that handles the timeout itself: the value, or what the
/// probe last saw.
pub async fn poll_until<P: Probe, F: Future<Output = P>>(
    within: Duration,
    mut probe: impl FnMut() -> F,
) -> Result<P::Value, String> {
    let mut last = String::new();
    let probing = async {
        let mut pause = Duration::from_millis(2);
        loop {
            match probe().await.settled() {
                Ok(v) => return v,
                Err(seen) => last = seen,
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    };
    let outcome = tokio::time::timeout(within, probing).await;
    outcome.map_err(|_| last)
}

/// Awaits `signal`; panics naming `what` if it has not come within `within`.
pub async fn signalled<T>(within: Duration, what: &str, signal: impl Future<Output = T>) -> T {
    match tokio::time::timeout(within, signal).await {
        Ok(v) => v,
        Err(_) => gave_up(within, what, ""),
    }
}

/// A schema of its own for one test, so tests run in parallel on one database. Dropped
/// with everything in it when this goes out of scope, also when a failed assertion
/// unwinds the test.
pub struct PgSchema {
    pub url: String,
    pub name: String,
    dropped: bool,
}

impl PgSchema {
    pub async fn create() -> Self {
        use sqlx::Connection;
        let base = postgres_url();
        let name = format!(
            "kw_test_{}",
            keywarden_core::base62::random(&mut rand::rngs::OsRng, 12).to_lowercase()
        );
        let mut conn = sqlx::PgConnection::connect(&base)
            .await
            .expect("connect to postgres");
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut conn)
            .await
            .expect("create schema");
        let _ = conn.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        Self {
            url: format!("{base}{sep}options=-c%20search_path%3D{name}"),
            name,
            dropped: false,
        }
    }

    /// Drops the schema now, on the caller's runtime.
    pub async fn drop_now(mut self) {
        self.dropped = true;
        drop_schema(&self.name).await;
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Drop cannot await, and blocking on a future from a thread that drives the
        // test's runtime panics: a thread of its own with a runtime of its own, joined.
        let name = self.name.clone();
        let dropping =
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(drop_schema(&name)),
                    Err(e) => eprintln!("cannot drop the test schema {name}: no runtime: {e}"),
                }
            });
        let _ = dropping.join();
    }
}

async fn drop_schema(schema: &str) {
    use sqlx::Connection;
    let dropping = async {
        let mut conn = sqlx::PgConnection::connect(&postgres_url()).await?;
        // A connection of a server stopped mid-transaction holds its tables' locks until
        // its rollback: worth waiting for, not forever.
        sqlx::query("SET lock_timeout = '10s'")
            .execute(&mut conn)
            .await?;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut conn)
            .await?;
        conn.close().await
    };
    if let Err(e) = dropping.await {
        eprintln!("cannot drop the test schema {schema}: {e}");
    }
}

/// Stopped by [`TestServer::stop`]; a test that fails before it still stops the server
/// and drops its schema, on drop.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub backend: Backend,
    pub clock: Arc<ManualClock>,
    pub base: String,
    pub admin: String,
    pub http: reqwest::Client,
    schema: Option<PgSchema>,
    _dir: tempfile::TempDir,
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
            let created = PgSchema::create().await;
            config.database_url = Some(created.url.clone());
            schema = Some(created);
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
            backend,
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

    /// The running server's state: its caches and the signals of its background work.
    pub fn state(&self) -> &SharedState {
        &self.server.as_ref().expect("the server is running").state
    }

    /// Waits until this node has applied every change committed so far to its caches
    /// (PostgreSQL: a node evicts its own changes again when `cluster::sync` reads them;
    /// an entry cached before that is dropped under the test).
    pub async fn caught_up(&self) {
        if self.backend == Backend::Sqlite {
            return;
        }
        let (head, _) = self.state().store.audit_head().await.expect("audit head");
        let mut followed = self.state().progress.followed.subscribe();
        signalled(
            WAIT,
            &format!("cluster sync to apply the changes through seq {head}"),
            followed.wait_for(|seq| *seq >= head),
        )
        .await
        .expect("the server is running");
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
        let path = format!("/v1/keys/{key_id}/usage?limit=1000");
        eventually(
            WAIT,
            &format!("{n} stored usage events of {key_id}"),
            || async {
                let (_, v) = self.get(&path).await;
                let stored = v["events"].as_array().map_or(0, Vec::len);
                if stored >= n {
                    Ok(v)
                } else {
                    Err(format!("{stored} events"))
                }
            },
        )
        .await
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
            schema.drop_now().await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Not stopped: the test failed (or forgot). The tasks go first, so that none of
        // them holds a lock the schema's drop (a field, dropped next) would wait for.
        if let Some(server) = self.server.take() {
            server.abort();
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
