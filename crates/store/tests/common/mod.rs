//! What the store's own test binaries share: PostgreSQL is required in CI and optional
//! elsewhere, and each test gets a schema of its own so tests run in parallel on one
//! database (the same approach as the API suites' harness in `tests/it`).

use sqlx::Connection;

pub fn postgres_url() -> String {
    std::env::var("KEYWARDEN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// True when PostgreSQL answers. In CI (`CI` set) a missing server fails the test, since
/// a skipped parity test there would pass without comparing anything; elsewhere it is
/// reported on stderr and the caller skips.
pub fn postgres_reachable() -> bool {
    let addr = postgres_url()
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5432")
        .to_owned();
    if std::net::TcpStream::connect(&addr).is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "PostgreSQL is not reachable at {addr}; CI must run these tests against it"
    );
    eprintln!("SKIPPED: PostgreSQL not reachable at {addr} (set KEYWARDEN_TEST_POSTGRES)");
    false
}

/// A fresh schema, and the URL that makes it the connection's `search_path`.
pub struct PgSchema {
    pub name: String,
    pub url: String,
}

impl PgSchema {
    pub async fn create() -> Result<Self, sqlx::Error> {
        let base = postgres_url();
        let name = format!("kw_store_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::PgConnection::connect(&base).await?;
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{name}");
        Ok(Self { name, url })
    }

    /// Best effort: a schema left behind costs disk space, not correctness, and the
    /// test's own verdict matters more than a failed cleanup.
    pub async fn drop(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_url()).await {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }
}
