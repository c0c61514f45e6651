//! The command line: clap definitions only.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "keywarden",
    version,
    about = "Governs provisioning keys: issue, verify, govern, audit."
)]
pub struct Cli {
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Server URL for client commands [default: the address `serve` recorded in the data
    /// directory (`listen`), else http://127.0.0.1:8470]
    #[arg(long, global = true, env = "KEYWARDEN_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// Admin token for client commands; default: the file `admin-token` in the data directory.
    #[arg(long, global = true, env = "KEYWARDEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory (pepper, bootstrap token, SQLite database).
    #[arg(
        long,
        global = true,
        env = "KEYWARDEN_DATA_DIR",
        default_value = "./keywarden-data"
    )]
    pub data_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Issue and manage keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Verify a key the way a gateway would; exit 0 when valid, 1 otherwise.
    Verify(VerifyArgs),
    /// Manage keywarden's own admin tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Read, export, verify and archive the tamper-evident audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The key policy: rules per environment, checked when keys are issued.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// What the enforcer would do (--plan), or run one pass of it (--now).
    Enforce(EnforceArgs),
    /// The people keys belong to; disabling one acts on all their keys at once.
    #[command(subcommand)]
    Owner(OwnerCommand),
    /// Connected services: the gateways and apps told of every revocation (webhook or
    /// pull) and confirming it. Not a key's systems, which are what the key reaches.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// The key event stream a pull service reads, and its acknowledgements.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Usage analytics from the hourly rollups: totals grouped, and keys used from a network.
    #[command(subcommand)]
    Usage(UsageCommand),
    /// KEY_STILL_IN_USE alerts: dead keys that were presented again.
    #[command(subcommand)]
    Alert(AlertCommand),
    /// Find hardcoded keys (ours and foreign) in files, git history, images and the
    /// environment; exit 0 none, 1 findings, 2 error.
    Scan(ScanArgs),
    /// Foreign secrets recorded by `scan --import`.
    #[command(subcommand)]
    Shadow(ShadowCommand),
}

#[derive(Debug, Subcommand)]
pub enum ShadowCommand {
    /// Shadow keys, newest sighting first.
    List,
}

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Files or directories to scan (`-` for standard input). Default: `.` unless
    /// --git, --image or --env is given.
    pub paths: Vec<PathBuf>,
    /// Scan the whole history of a git repository (default: `.`), every blob once.
    #[arg(long, num_args = 0..=1, default_missing_value = ".", value_name = "REPO")]
    pub git: Option<PathBuf>,
    /// With --git: only what commits after this revision introduced.
    #[arg(long, requires = "git", value_name = "REV")]
    pub since: Option<String>,
    /// A `docker save` or OCI layout tarball (repeatable); read as a stream.
    #[arg(long = "image", value_name = "FILE.tar")]
    pub images: Vec<PathBuf>,
    /// The environment of this process (names and values), e.g. on a CI runner.
    #[arg(long)]
    pub env: bool,
    /// Scan what .gitignore and .ignore exclude too.
    #[arg(long)]
    pub no_ignore: bool,
    /// More rules (TOML, the format of the built-in ones; same id replaces). Repeatable.
    #[arg(long = "rules", value_name = "FILE")]
    pub rules: Vec<PathBuf>,
    /// Never report paths matching this glob (repeatable), e.g. 'tests/fixtures/**'.
    #[arg(long = "allow-path", value_name = "GLOB")]
    pub allow_paths: Vec<String>,
    /// Ignore findings recorded in this baseline file.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// Record every finding of this scan in a baseline file (and exit 0).
    #[arg(long, value_name = "FILE")]
    pub write_baseline: Option<PathBuf>,
    /// table, json or sarif (--json is the same as --format json).
    #[arg(long, default_value = "table")]
    pub format: String,
    /// Write the report to a file instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Print secrets in full (they are redacted by default).
    #[arg(long)]
    pub show_secrets: bool,
    /// The deployment's key prefix, for recognising our own keys.
    #[arg(long, env = "KEYWARDEN_KEY_PREFIX", default_value = "kw")]
    pub prefix: String,
    /// Files larger than this many bytes are skipped.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    pub max_file_size: u64,
    /// Match our keys with the inventory on the server (also done whenever a token is
    /// configured; this makes a failure to reach the server an error).
    #[arg(long)]
    pub inventory: bool,
    /// Revoke every live key (or admin token) found, with the location in the reason.
    #[arg(long)]
    pub revoke_leaked: bool,
    /// Record foreign secrets found in the inventory as shadow keys (fingerprint only).
    #[arg(long)]
    pub import: bool,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Register a service; its webhook signing secret is printed once.
    Add {
        /// A name for people, e.g. edge-gateway.
        name: String,
        /// Where events are POSTed; without it the service pulls /v1/events and acks.
        #[arg(long)]
        webhook: Option<String>,
        /// Events to send: revoke, suspend, rotate, expire, alert, create, notice, or all
        /// (comma-separated or repeated). Default: revoke,suspend,rotate,expire,alert.
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
        /// standard (Standard Webhooks JSON, for machines) or slack (a Slack-compatible
        /// incoming webhook: readable messages for people).
        #[arg(long)]
        format: Option<String>,
    },
    /// Connected services and their delivery health.
    List,
    /// One service (id or name) with its latest deliveries.
    Show {
        /// The service's id or name.
        id: String,
    },
    /// Remove a service; its open deliveries are dropped.
    Remove {
        /// The service's id or name.
        id: String,
    },
    /// Send a signed test message now; exit 1 unless the service answers 2xx.
    Test {
        /// The service's id or name.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print key events (revocations, suspensions, rotations, …) after a seq, one line
    /// each (one JSON object each with --json); with --follow, keep waiting for more.
    Tail {
        /// Events after this seq (default 0: everything still in the outbox).
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Keep waiting for new events until interrupted.
        #[arg(long)]
        follow: bool,
        /// Only these categories: revoke, suspend, rotate, expire, alert, create, notice
        /// (comma-separated).
        #[arg(long)]
        events: Option<String>,
    },
    /// Acknowledge, for a pull service, that every event up to SEQ was applied; what it
    /// confirms counts in `key show`'s propagation.
    Ack {
        /// The service's id or name.
        #[arg(long)]
        service: String,
        /// The last seq applied.
        seq: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Events over a window, grouped (by key unless --group-by says otherwise), most
    /// events first, with counts by verify code.
    Stats(UsageStatsArgs),
    /// Which keys were used from a network in a window, with counts and first and last
    /// sightings from there.
    Search(UsageSearchArgs),
}

#[derive(Debug, Args)]
pub struct UsageStatsArgs {
    /// From: RFC 3339 or a duration ago such as 7d (default 7d); rounded to its hour.
    #[arg(long)]
    pub since: Option<String>,
    /// Up to: RFC 3339 or a duration ago (default now).
    #[arg(long)]
    pub until: Option<String>,
    /// key, owner, system, environment, network or code (default key).
    #[arg(long)]
    pub group_by: Option<String>,
    /// Only keys of this environment.
    #[arg(long)]
    pub environment: Option<String>,
    /// Only keys of this owner.
    #[arg(long)]
    pub owner: Option<String>,
    /// Only keys that touch this system.
    #[arg(long)]
    pub system: Option<String>,
    /// Only events answered with this code, e.g. MALFORMED or SCOPE_DENIED.
    #[arg(long)]
    pub code: Option<String>,
    /// Only events from this network (CIDR; /24 or wider for IPv4, /64 for IPv6).
    #[arg(long)]
    pub network: Option<String>,
    /// How many groups to show (1-1000, default 100).
    #[arg(long)]
    pub limit: Option<u32>,
}

#[derive(Debug, Args)]
pub struct UsageSearchArgs {
    /// The network, e.g. 10.2.0.0/16 (/24 or wider for IPv4, /64 or wider for IPv6).
    #[arg(long)]
    pub source: String,
    /// From: RFC 3339 or a duration ago such as 7d (default 7d); rounded to its hour.
    #[arg(long)]
    pub since: Option<String>,
    /// Up to: RFC 3339 or a duration ago (default now).
    #[arg(long)]
    pub until: Option<String>,
    /// How many keys to show (1-1000, default 100).
    #[arg(long)]
    pub limit: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum AlertCommand {
    /// Alerts, newest first.
    List {
        /// Only about this key id.
        #[arg(long)]
        key: Option<String>,
        /// Only of this kind: KEY_STILL_IN_USE, CANARY_USED, ENVIRONMENT_CROSSING,
        /// SECRET_GUESSING, SCOPE_PROBING or BRUTE_FORCE.
        #[arg(long)]
        kind: Option<String>,
        /// Only in this state: open, acknowledged or resolved.
        #[arg(long)]
        state: Option<String>,
        /// Raised at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// How many to show (1-1000, default 100).
        #[arg(long)]
        limit: Option<u32>,
        /// Where the previous page ended (its `next_cursor`).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// One alert with its evidence.
    Show {
        /// The alert's id (SEQ in `alert list`).
        id: String,
    },
    /// Acknowledge an alert: someone is on it.
    Ack {
        /// The alert's id (SEQ in `alert list`).
        id: String,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resolve an alert; the next sighting raises a new one.
    Resolve {
        /// The alert's id (SEQ in `alert list`).
        id: String,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OwnerCommand {
    /// Register an owner, or update one's name and manager.
    Add {
        /// The owner's identity, e.g. an e-mail address (compared case-insensitively).
        identity: String,
        /// Their name, for people.
        #[arg(long)]
        name: String,
        /// Their manager's identity.
        #[arg(long)]
        manager: Option<String>,
    },
    /// Owners, registered or holding keys, by identity.
    List,
    /// One owner.
    Show {
        /// The owner's identity.
        identity: String,
    },
    /// Disable an owner: their keys are revoked (or suspended, as the policy says).
    Disable {
        /// The owner's identity.
        identity: String,
        /// Why, in words; kept in the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Enable an owner again; their keys stay as they are.
    Enable {
        /// The owner's identity.
        identity: String,
        /// Why, in words; kept in the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["plan", "now"])))]
pub struct EnforceArgs {
    /// Show, key by key, what a pass would do, without acting.
    #[arg(long)]
    pub plan: bool,
    /// Judge the keys as of this time (RFC 3339), e.g. 2027-01-01T00:00:00Z.
    #[arg(long, requires = "plan")]
    pub at: Option<String>,
    /// Run one pass now.
    #[arg(long)]
    pub now: bool,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Apply a policy file (TOML) as the next version; every problem in it is listed.
    Apply {
        /// The policy file (rules: docs/policy.md).
        file: PathBuf,
        /// Show what the first enforcer pass under it would do, key by key, and apply
        /// nothing.
        #[arg(long)]
        plan: bool,
        /// Apply without asking, even on a terminal, when the first pass would suspend
        /// or expire keys.
        #[arg(long)]
        yes: bool,
    },
    /// Print the policy in force.
    Show,
    /// Show how a policy file differs from the policy in force; exit 1 when it does.
    Diff {
        /// The policy file to compare (validated first).
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KEYWARDEN_LISTEN", default_value = "127.0.0.1:8470")]
    pub listen: SocketAddr,
    /// Also serve GET /metrics here, without a token, for a Prometheus scraper on a
    /// private interface (e.g. 10.0.0.5:9470). Whoever reaches it reads the metrics:
    /// never bind it to a public address. The main listener's /metrics needs a token.
    #[arg(long, env = "KEYWARDEN_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// SMTP relay for e-mail to key owners (services added with --format email):
    /// smtp://relay:25, smtp://user:pass@relay:587?tls=required (STARTTLS) or
    /// smtps://relay:465.
    #[arg(long, env = "KEYWARDEN_SMTP", hide_env_values = true)]
    pub smtp: Option<String>,
    /// The From address of that e-mail.
    #[arg(
        long,
        env = "KEYWARDEN_SMTP_FROM",
        default_value = "keywarden@localhost"
    )]
    pub smtp_from: String,
    /// Who is mailed alerts that name no key, such as BRUTE_FORCE from a source network
    /// (key alerts go to the key's owner).
    #[arg(long, env = "KEYWARDEN_SMTP_SECURITY_TO")]
    pub smtp_security_to: Option<String>,
    /// `sqlite://PATH` or `postgres://…`; default: SQLite in the data directory.
    #[arg(long, env = "KEYWARDEN_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Proxies whose X-Forwarded-For is trusted (repeatable CIDR).
    #[arg(
        long = "trusted-proxy",
        env = "KEYWARDEN_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// Prefix of every key this deployment issues.
    #[arg(long, env = "KEYWARDEN_KEY_PREFIX", default_value = "kw")]
    pub key_prefix: String,
    /// How often the enforcer runs a pass (expiry, idle keys, rotation deadlines,
    /// notices, policy violations), e.g. 60s or 5m.
    #[arg(long, env = "KEYWARDEN_ENFORCER_INTERVAL", default_value = "60s")]
    pub enforcer_interval: String,
    /// Networks webhooks may reach besides the public internet (repeatable CIDR), e.g.
    /// 10.0.0.0/8 for services inside your network. Private and loopback addresses are
    /// refused otherwise.
    #[arg(
        long = "outbound-allow",
        env = "KEYWARDEN_OUTBOUND_ALLOW",
        value_delimiter = ','
    )]
    pub outbound_allow: Vec<String>,
    /// Send webhooks through this HTTP proxy (http://host:port). The proxy environment
    /// variables (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY) are ignored; targets are still
    /// judged against --outbound-allow.
    #[arg(long = "outbound-proxy", env = "KEYWARDEN_OUTBOUND_PROXY")]
    pub outbound_proxy: Option<String>,
    /// How long a failing webhook delivery is retried before it is abandoned (at least
    /// 1h), e.g. 72h.
    #[arg(long, env = "KEYWARDEN_WEBHOOK_RETRY_FOR", default_value = "72h")]
    pub webhook_retry_for: String,
    /// How long raw usage events are kept at least (at least 1d), e.g. 30d or 90d. A
    /// policy's `usage_retention` keeps an environment's events longer, never shorter.
    #[arg(long, env = "KEYWARDEN_USAGE_RETENTION", default_value = "30d")]
    pub usage_retention: String,
    /// Several nodes on PostgreSQL: how often a node reads other nodes' changes even
    /// without a notification (the bound on revocation visibility), e.g. 1s.
    #[arg(long, env = "KEYWARDEN_CLUSTER_POLL", default_value = "1s")]
    pub cluster_poll: String,
    /// The gateway map for /v1/auth (TOML): the scope each method and path needs, and
    /// the callers trusted without a token. See docs/gateway.md.
    #[arg(long, env = "KEYWARDEN_GATEWAY_MAP")]
    pub gateway_map: Option<PathBuf>,
    /// How long a client has to send a request's headers (from their first byte, or
    /// from connecting); slower connections are closed, e.g. 10s.
    #[arg(long, env = "KEYWARDEN_HEADER_TIMEOUT", default_value = "10s")]
    pub header_timeout: String,
    /// How long a kept-alive connection may wait for its next request (or a response for
    /// the client to read it) before it is closed, e.g. 120s. Keep it above your
    /// gateway's upstream keep-alive timeout.
    #[arg(long, env = "KEYWARDEN_IDLE_TIMEOUT", default_value = "120s")]
    pub idle_timeout: String,
    /// Connections held open at most; beyond it the server stops accepting until one
    /// closes (lowered at start if the open-file limit cannot hold it).
    #[arg(long, env = "KEYWARDEN_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Issue a key; its secret is printed once.
    Create(CreateKeyArgs),
    /// List keys, newest first.
    List(ListKeysArgs),
    /// Show one key: metadata, uses, enrolled subjects, propagation.
    Show {
        /// The key's id (16 characters, e.g. 7Hq2Lx9aKf3Tzp1M).
        id: String,
    },
    /// Suspend a key (reversible).
    Suspend(StateArgs),
    /// Resume a suspended key.
    Resume(StateArgs),
    /// Revoke a key (final).
    Revoke(StateArgs),
    /// Make a successor; the old key works until the grace period ends.
    Rotate(RotateArgs),
    /// Show a key's usage events, newest first; with --stats, its daily valid uses as a
    /// sparkline and its top sources and subjects.
    Usage(UsageArgs),
}

#[derive(Debug, Args)]
pub struct CreateKeyArgs {
    /// A name for people, e.g. ci-deploy (1-128 characters).
    #[arg(long)]
    pub name: String,
    /// The person accountable for the key (e.g. an e-mail address).
    #[arg(long)]
    pub owner: String,
    /// The environment the key works in, e.g. prod (part of the key's text).
    #[arg(long)]
    pub environment: String,
    /// A system the key touches (repeatable), e.g. github: what it reaches, for the
    /// inventory. Not a connected service (`keywarden service`), which hears of changes.
    #[arg(long = "system")]
    pub systems: Vec<String>,
    /// A scope granted to the key (repeatable), e.g. deploy:write or db:*.
    #[arg(long = "scope", required = true)]
    pub scopes: Vec<String>,
    /// Lifetime, e.g. 30d (default 90d, at most 365d).
    #[arg(long, conflicts_with = "expires_at")]
    pub ttl: Option<String>,
    /// Expiry as RFC 3339, e.g. 2027-01-01T00:00:00Z.
    #[arg(long)]
    pub expires_at: Option<String>,
    /// CIDR the key may be used from (repeatable).
    #[arg(long = "allow-cidr")]
    pub allowed_cidrs: Vec<String>,
    /// Usage cap; 1 makes a one-time key.
    #[arg(long)]
    pub max_uses: Option<u64>,
    /// At most this many valid uses per period, e.g. 100/min, 10/s, 5000/h
    /// (RATE_LIMITED beyond it). Default: the policy's rate_limit.
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// Issue a canary: a tripwire key that looks like any other, never verifies, and
    /// raises a critical CANARY_USED alert whenever it is presented.
    #[arg(long)]
    pub canary: bool,
    /// What the key is for, in a sentence.
    #[arg(long)]
    pub description: Option<String>,
    /// Metadata entry KEY=VALUE (repeatable).
    #[arg(long = "meta")]
    pub metadata: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListKeysArgs {
    /// Only keys of this environment.
    #[arg(long)]
    pub environment: Option<String>,
    /// Only keys of this owner (any spelling of the identity).
    #[arg(long)]
    pub owner: Option<String>,
    /// Only keys that touch this system.
    #[arg(long)]
    pub system: Option<String>,
    /// active, suspended, revoked or expired.
    #[arg(long)]
    pub state: Option<String>,
    /// How many to show (1-1000, default 100).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Where the previous page ended (its `next_cursor`).
    #[arg(long)]
    pub cursor: Option<String>,
}

#[derive(Debug, Args)]
pub struct StateArgs {
    /// The key's id.
    pub id: String,
    /// Why, in words; kept in the audit trail and shown with the key.
    #[arg(long)]
    pub reason: Option<String>,
    /// Wait up to this long (e.g. 10s) until every connected service confirmed the
    /// change; exit 1 naming those that did not.
    #[arg(long)]
    pub wait: Option<String>,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The key's id.
    pub id: String,
    /// How long the old key keeps working, e.g. 24h (default) or 0s.
    #[arg(long)]
    pub grace: Option<String>,
    /// Why, in words; kept in the audit trail.
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The key's id.
    pub id: String,
    /// How many to show (1-1000, default 100).
    #[arg(long, conflicts_with = "stats")]
    pub limit: Option<u32>,
    /// Where the previous page ended (its `next_cursor`).
    #[arg(long, conflicts_with = "stats")]
    pub cursor: Option<String>,
    /// Show the rollups instead of events: daily valid uses as a sparkline, top source
    /// networks and subjects.
    #[arg(long)]
    pub stats: bool,
    /// With --stats: from when, RFC 3339 or a duration ago (default 30d).
    #[arg(long, requires = "stats")]
    pub since: Option<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The key, or `-` to read it from standard input (keeps it out of shell history).
    pub key: String,
    /// The scope the request needs, e.g. deploy:write.
    #[arg(long)]
    pub scope: Option<String>,
    /// The environment the request is in; another environment's key is refused.
    #[arg(long)]
    pub environment: Option<String>,
    /// The client's address (checked against the key's CIDR allowlist).
    #[arg(long)]
    pub source_ip: Option<String>,
    /// The host or thing being provisioned, recorded as an enrolled subject.
    #[arg(long)]
    pub subject: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an admin token; its secret is printed once.
    Create {
        /// A name for people, e.g. gateway or ci.
        #[arg(long)]
        name: String,
        /// The person accountable for it (audit entries name them as the actor).
        #[arg(long)]
        owner: Option<String>,
        /// admin, issuer, auditor, verifier or scim.
        #[arg(long)]
        role: String,
        /// For issuers and verifiers: an environment they may act in or verify keys of
        /// (repeatable; default all).
        #[arg(long = "environment")]
        environments: Vec<String>,
        /// Lifetime, e.g. 90d (default: no expiry).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List admin tokens.
    List,
    /// Revoke an admin token.
    Revoke {
        /// The token's id (see `token list`).
        id: String,
    },
}

/// Times on the command line: RFC 3339, a date (midnight UTC), or a duration ago (`24h`).
#[derive(Debug, Args)]
pub struct AuditFilterArgs {
    /// Entries about this key id.
    #[arg(long)]
    pub key: Option<String>,
    /// Actor id (`token:<id>`, `system:<job>`) or name.
    #[arg(long)]
    pub actor: Option<String>,
    /// An action (`key.revoked`) or a prefix ending in `*` (`key.*`).
    #[arg(long)]
    pub action: Option<String>,
    /// From this time on: RFC 3339, a date, or a duration ago such as 24h.
    #[arg(long)]
    pub since: Option<String>,
    /// Before this time: RFC 3339, a date, or a duration ago.
    #[arg(long)]
    pub until: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List entries, oldest first (newest first with --newest-first).
    List {
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// Newest entries first.
        #[arg(long)]
        newest_first: bool,
        /// How many to show (1-1000, default 100).
        #[arg(long)]
        limit: Option<u32>,
        /// Where the previous page ended (its `next_cursor`).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Stream entries as JSON lines or CSV, oldest first, in constant memory.
    Export {
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// jsonl or csv.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a signed checkpoint of the newest entry; keep it outside the database.
    Checkpoint {
        /// Sign this entry instead of the newest.
        #[arg(long)]
        seq: Option<i64>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Walk the hash chain; exit 0 when intact, 1 at the first altered, removed,
    /// inserted or reordered entry, or a chain truncated or replaced since a checkpoint.
    /// With --usage, walk the usage log's chain of batches instead.
    Verify {
        /// Verify the usage log (every verify's event, chained batch by batch) instead of
        /// the audit trail; names the first altered, removed, inserted or reordered batch
        /// and the event in it.
        #[arg(long, conflicts_with_all = ["checkpoints", "archives"])]
        usage: bool,
        /// Checkpoint files from `audit checkpoint` (repeatable, or several after one flag).
        #[arg(long = "checkpoint", num_args = 1..)]
        checkpoints: Vec<PathBuf>,
        /// Archive files from `audit archive`, checked with the live trail as one chain.
        #[arg(long = "archive", num_args = 1..)]
        archives: Vec<PathBuf>,
    },
    /// Move entries older than a date into a compressed, self-verifying file, and remove
    /// them from the live trail once the file is safely written.
    Archive {
        /// Archive the entries before this time (RFC 3339 or a date).
        #[arg(long)]
        before: String,
        /// The archive file to write (it must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Move rows found past the trail's recorded head (written around keywarden, which
    /// `audit verify` reports as `appended`) into the quarantine table, so that audited
    /// writes, refused while they are there, go on. The move is itself audited.
    Quarantine,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command and every flag or argument a user can type has a help line.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} <{id}>"));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "keywarden", &mut missing);
        assert!(missing.is_empty(), "no help text:\n{}", missing.join("\n"));
    }
}
