//! Server configuration, filled by the binary from flags and environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// A second listener serving only `GET /metrics`, without a token, for a Prometheus
    /// scraper on a private interface. Anyone who reaches it reads the metrics: never a
    /// public address.
    pub metrics_listen: Option<SocketAddr>,
    /// Where e-mail to key owners goes (services of format `email`): `smtp://host:port`
    /// (plain, for a local relay), `smtp://host:587?tls=required` (STARTTLS) or
    /// `smtps://host:465`, with `user:password@` if the relay asks.
    pub smtp_url: Option<String>,
    /// The From address of that e-mail.
    pub smtp_from: String,
    /// Who is mailed alerts that name no key (BRUTE_FORCE from a source network); without
    /// it, their e-mail deliveries are abandoned with that reason.
    pub smtp_security_to: Option<String>,
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; default: SQLite in the data directory.
    pub database_url: Option<String>,
    /// The deployment's key prefix (`kw` by default).
    pub key_prefix: String,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Pepper lines (`v1:<hex>`), overriding the pepper file.
    pub pepper: Option<String>,
    /// The audit checkpoint signing key (64 hex characters of an Ed25519 seed), overriding
    /// `<data-dir>/audit-signing.key`; nodes sharing a database share it.
    pub audit_signing_key: Option<String>,
    pub default_rotation_grace: time::Duration,
    /// How often buffered usage events are written. The crash-loss window is this plus
    /// one batch write.
    pub usage_flush_interval: Duration,
    /// Usage events held in memory at most; when full for a second, verify fails closed.
    pub usage_queue_capacity: usize,
    /// How often logged usage is folded into the keys' stats (SQLite), and after how many
    /// keys with unfolded usage a fold comes early. Reads include unfolded usage either
    /// way; this bounds the overlay's memory and the refold after a crash.
    pub usage_fold_interval: Duration,
    pub usage_fold_max_keys: usize,
    /// How long usage rollups are kept; the enforcer removes older hours on each pass.
    pub usage_rollup_retention: time::Duration,
    /// How long raw usage events are kept at least. The policy's `usage_retention` can
    /// keep an environment's events longer, never shorter; the enforcer removes expired
    /// batches (whole, from the oldest) on its passes.
    pub usage_retention: time::Duration,
    /// How long a key record stays in the verify cache at most (jittered ±20%). Changes
    /// made through this node evict at once; this bounds staleness otherwise.
    pub verify_cache_ttl: Duration,
    /// How often the enforcer runs a pass (keys past their TTL or rotation grace are
    /// recorded as expired, with an audit entry; they are refused from the moment they
    /// end either way).
    pub enforcer_interval: Duration,
    /// Networks outbound requests (webhooks) may reach besides the public internet.
    /// Loopback and private addresses are refused unless listed here.
    pub outbound_allow: Vec<IpNet>,
    /// An HTTP proxy for every outbound request; the guard still judges the target.
    /// Proxy environment variables are ignored.
    pub outbound_proxy: Option<String>,
    /// How long one webhook request may take.
    pub webhook_timeout: Duration,
    /// How long a failing delivery is retried before it is abandoned.
    pub webhook_retry_for: Duration,
    /// The first retry delay; it doubles per attempt up to `webhook_backoff_cap`.
    pub webhook_backoff: Duration,
    pub webhook_backoff_cap: Duration,
    /// How often the dispatcher looks for work it was not woken for (writes by another
    /// process, retries falling due).
    pub dispatch_poll: Duration,
    /// How often a long poll or event stream reads the outbox again without being woken
    /// (writes by another process). Writes in this process wake them at once.
    pub events_poll: Duration,
    /// Several nodes: how often a node reads other nodes' changes even without a
    /// notification. A revocation made elsewhere is honoured here within this (usually
    /// within milliseconds, on the NOTIFY).
    pub cluster_poll: Duration,
    /// Sightings of the same key from the same place within this window count up one
    /// alert instead of raising another.
    pub alert_window: time::Duration,
    /// `/v1/auth`: the scope each method and path needs, and which callers may ask
    /// without a token.
    pub gateway: keywarden_core::gateway::GatewayMap,
    /// How long a client has to send a request head: from its first byte, or from the
    /// accept for a new connection. Slower connections are closed.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request, or a response
    /// wait for the client to read it, before the connection is closed.
    pub idle_timeout: Duration,
    /// Connections held open at most; beyond it the server stops accepting until one
    /// closes. Lowered at start if the open-file limit cannot hold it.
    pub max_connections: usize,
    /// Whether to print the bootstrap token to stdout (the binary does; tests read the file).
    pub print_bootstrap_token: bool,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8470)),
            metrics_listen: None,
            data_dir,
            database_url: None,
            key_prefix: keywarden_core::key_format::DEFAULT_PREFIX.to_owned(),
            trusted_proxies: Vec::new(),
            pepper: None,
            audit_signing_key: None,
            default_rotation_grace: time::Duration::hours(24),
            usage_flush_interval: Duration::from_millis(5),
            usage_queue_capacity: crate::usage::QUEUE_CAPACITY,
            usage_fold_interval: Duration::from_secs(60),
            usage_fold_max_keys: 250_000,
            usage_rollup_retention: time::Duration::days(400),
            usage_retention: time::Duration::days(30),
            verify_cache_ttl: Duration::from_secs(60),
            enforcer_interval: Duration::from_secs(60),
            outbound_allow: Vec::new(),
            smtp_url: None,
            smtp_from: "keywarden@localhost".to_owned(),
            smtp_security_to: None,
            outbound_proxy: None,
            webhook_timeout: Duration::from_secs(10),
            webhook_retry_for: Duration::from_secs(72 * 3600),
            webhook_backoff: Duration::from_secs(2),
            webhook_backoff_cap: Duration::from_secs(3600),
            dispatch_poll: Duration::from_secs(1),
            events_poll: Duration::from_secs(1),
            cluster_poll: Duration::from_secs(1),
            alert_window: time::Duration::minutes(5),
            gateway: keywarden_core::gateway::GatewayMap::default(),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 10_000,
            print_bootstrap_token: false,
        }
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("keywarden.db").display()))
    }
}
