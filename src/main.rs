//! The `keywarden` binary: server and CLI in one.

mod audit;
mod cli;
mod output;
mod scan;
mod services;

use std::collections::BTreeMap;
use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use keywarden_client::{Client, KeyQuery, PageQuery};
use keywarden_proto::{CreateKeyRequest, CreateTokenRequest, RotateRequest, VerifyRequest};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use cli::{Cli, Command, KeyCommand, ServeArgs, TokenCommand};

/// jemalloc, not glibc's malloc. Verify allocates on the runtime's workers and frees on
/// the usage writer's thread, and at 100k keys its cache lines are cold: jemalloc's
/// thread caches and its huge pages (`thp:always`, set for every build in
/// `.cargo/config.toml`) cut the CPU of a verify by about a tenth (docs/benchmarks.md). `_RJEM_MALLOC_CONF` overrides its settings at run time.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit codes: 0 success, 1 a negative answer (invalid key), 2 usage or runtime error.
const NEGATIVE: u8 = 1;
const FAILURE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(FAILURE);
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if json => {
            // Scripts that asked for JSON get the error as JSON too, on standard output
            // where they read the answers (with the API's code when the server gave one).
            let code = e
                .chain()
                .find_map(|c| c.downcast_ref::<keywarden_client::ClientError>())
                .and_then(|c| c.code())
                .unwrap_or("CLI_ERROR");
            let body = serde_json::json!({"error": {"code": code, "message": format!("{e:#}")}});
            let _ = out_line(body);
            ExitCode::from(FAILURE)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(FAILURE)
        }
    }
}

async fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Serve(ref args) => serve(&cli, args).await.map(|()| 0),
        Command::Key(ref cmd) => key(&cli, cmd).await,
        Command::Verify(ref args) => verify(&cli, args).await,
        Command::Token(ref cmd) => token(&cli, cmd).await,
        Command::Audit(ref cmd) => audit::run(&cli, cmd).await,
        Command::Policy(ref cmd) => policy(&cli, cmd).await,
        Command::Enforce(ref args) => enforce(&cli, args).await,
        Command::Owner(ref cmd) => owner(&cli, cmd).await,
        Command::Service(ref cmd) => services::service(&cli, cmd).await,
        Command::Alert(ref cmd) => services::alert(&cli, cmd).await,
        Command::Usage(ref cmd) => usage(&cli, cmd).await,
        Command::Events(ref cmd) => services::events(&cli, cmd).await,
        Command::Scan(ref args) => scan::run(&cli, args).await,
        Command::Shadow(cli::ShadowCommand::List) => scan::shadow_list(&cli).await,
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYWARDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn serve(cli: &Cli, args: &ServeArgs) -> Result<()> {
    init_logging();
    let mut config = keywarden_server::Config::new(cli.data_dir.clone());
    config.listen = args.listen;
    config.metrics_listen = args.metrics_listen;
    config.smtp_url.clone_from(&args.smtp);
    config.smtp_from.clone_from(&args.smtp_from);
    config.smtp_security_to.clone_from(&args.smtp_security_to);
    config.database_url.clone_from(&args.database_url);
    config.key_prefix.clone_from(&args.key_prefix);
    config.pepper = std::env::var("KEYWARDEN_PEPPER").ok();
    config.audit_signing_key = std::env::var("KEYWARDEN_AUDIT_SIGNING_KEY").ok();
    let every = keywarden_core::duration::parse_duration(&args.enforcer_interval)
        .ok()
        .and_then(|d| std::time::Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .with_context(|| {
            format!(
                "--enforcer-interval {:?}: expected a duration such as 60s or 5m",
                args.enforcer_interval
            )
        })?;
    config.enforcer_interval = every;
    let duration = |flag: &str, value: &str, min: std::time::Duration| {
        keywarden_core::duration::parse_duration(value)
            .ok()
            .and_then(|d| std::time::Duration::try_from(d).ok())
            .filter(|d| *d >= min && !d.is_zero())
            .with_context(|| {
                format!(
                    "{flag} {value:?}: expected a duration of at least {}s, such as 72h or 1s",
                    min.as_secs()
                )
            })
    };
    config.webhook_retry_for = duration(
        "--webhook-retry-for",
        &args.webhook_retry_for,
        std::time::Duration::from_secs(3600),
    )?;
    let retention = duration(
        "--usage-retention",
        &args.usage_retention,
        std::time::Duration::from_secs(86_400),
    )?;
    config.usage_retention = time::Duration::try_from(retention)
        .with_context(|| format!("--usage-retention {:?}: too long", args.usage_retention))?;
    config.cluster_poll = duration(
        "--cluster-poll",
        &args.cluster_poll,
        std::time::Duration::from_secs(1),
    )?;
    config.header_timeout = duration(
        "--header-timeout",
        &args.header_timeout,
        std::time::Duration::from_secs(1),
    )?;
    config.idle_timeout = duration(
        "--idle-timeout",
        &args.idle_timeout,
        std::time::Duration::from_secs(1),
    )?;
    config.max_connections = usize::try_from(args.max_connections)?;
    config.trusted_proxies = args
        .trusted_proxies
        .iter()
        .map(|c| {
            c.parse()
                .with_context(|| format!("--trusted-proxy {c:?} is not a CIDR"))
        })
        .collect::<Result<_>>()?;
    config.outbound_allow = args
        .outbound_allow
        .iter()
        .map(|c| {
            c.parse::<ipnet::IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .with_context(|| format!("--outbound-allow {c:?} is not a CIDR"))
        })
        .collect::<Result<_>>()?;
    config.outbound_proxy = args.outbound_proxy.clone();
    if let Some(path) = &args.gateway_map {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the gateway map {}", path.display()))?;
        config.gateway =
            keywarden_core::gateway::GatewayMap::from_toml(&text).map_err(|problems| {
                anyhow::anyhow!(
                    "the gateway map {} is invalid:\n  {}",
                    path.display(),
                    problems.join("\n  ")
                )
            })?;
    }
    let server = keywarden_server::start(config, Arc::new(SystemClock)).await?;
    if let Some(token) = &server.bootstrap_token {
        let path = cli.data_dir.join("admin-token");
        // Only a person at a terminal sees it: standard output is often a service's log,
        // where a live admin token must not end up.
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            println!(
                "Created the bootstrap admin token. It is shown once and saved to {} (mode 0600):\n\n    {}\n",
                path.display(),
                token.expose()
            );
        } else {
            println!(
                "Created the bootstrap admin token in {} (mode 0600); it is not printed, as standard output is not a terminal.",
                path.display()
            );
        }
    }
    println!("keywarden listening on http://{}", server.addr);
    if let Some(addr) = server.metrics_addr {
        println!("metrics (no token) on http://{addr}/metrics");
    }
    wait_for_signal().await;
    tracing::info!("shutting down: finishing requests and flushing usage events");
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

struct SystemClock;

impl keywarden_core::clock::Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one real clock
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

fn client(cli: &Cli) -> Result<Client> {
    let token = match &cli.token {
        Some(t) => t.trim().to_owned(),
        None => {
            let path = cli.data_dir.join("admin-token");
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!("no admin token: pass --token, set KEYWARDEN_TOKEN, or run from where {} exists", path.display())
                })?
                .trim()
                .to_owned()
        }
    };
    Ok(Client::new(&server_url(cli), Some(token))?)
}

/// `--server`, else the address the last `serve` on this data directory recorded, else
/// the default listen address.
fn server_url(cli: &Cli) -> String {
    if let Some(s) = &cli.server {
        return s.clone();
    }
    std::fs::read_to_string(cli.data_dir.join(keywarden_server::bootstrap::LISTEN_FILE))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| s.starts_with("http://") || s.starts_with("https://"))
        .unwrap_or_else(|| "http://127.0.0.1:8470".to_owned())
}

/// Writes a line to standard output. A closed pipe (`keywarden key list | head -1`) comes
/// back as an error, which `main` turns into a quiet exit 0, as ripgrep does.
fn out_line(text: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Whether an error is standard output's reader having gone away.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn print<T: Serialize>(cli: &Cli, value: &T, human: impl FnOnce(&T) -> String) -> Result<()> {
    if cli.json {
        out_line(serde_json::to_string_pretty(value)?)?;
    } else {
        out_line(human(value))?;
    }
    Ok(())
}

fn parse_meta(entries: &[String]) -> Result<BTreeMap<String, String>> {
    entries
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
            None => bail!("--meta {e:?}: expected KEY=VALUE"),
        })
        .collect()
}

async fn key(cli: &Cli, cmd: &KeyCommand) -> Result<u8> {
    let c = client(cli)?;
    match cmd {
        KeyCommand::Create(a) => {
            let expires_at = a
                .expires_at
                .as_deref()
                .map(|s| {
                    OffsetDateTime::parse(s, &Rfc3339)
                        .with_context(|| format!("--expires-at {s:?} is not RFC 3339"))
                })
                .transpose()?;
            let req = CreateKeyRequest {
                name: a.name.clone(),
                owner: a.owner.clone(),
                environment: a.environment.clone(),
                systems: a.systems.clone(),
                scopes: a.scopes.clone(),
                ttl: a.ttl.clone(),
                expires_at,
                allowed_cidrs: a.allowed_cidrs.clone(),
                max_uses: a.max_uses,
                rate_limit: a.rate_limit.clone(),
                canary: a.canary,
                description: a.description.clone(),
                metadata: parse_meta(&a.metadata)?,
            };
            let created = c.create_key(&req).await?;
            print(cli, &created, |c| {
                format!(
                    "{}\nSecret (shown once, store it now):\n\n    {}\n",
                    output::key_details(&c.key),
                    c.secret.0
                )
            })?;
        }
        KeyCommand::List(a) => {
            let q = KeyQuery {
                environment: a.environment.clone(),
                owner: a.owner.clone(),
                system: a.system.clone(),
                state: a.state.clone(),
                limit: a.limit,
                cursor: a.cursor.clone(),
            };
            let list = c.list_keys(&q).await?;
            print(cli, &list, |l| {
                let mut s = output::keys_table(&l.keys);
                if let Some(n) = &l.next_cursor {
                    s.push_str(&format!("\nmore: --cursor {n}"));
                }
                s
            })?;
        }
        KeyCommand::Show { id } => print(cli, &c.get_key(id).await?, output::key_details)?,
        KeyCommand::Suspend(a) => return services::change_state(cli, &c, a, "suspend").await,
        KeyCommand::Resume(a) => return services::change_state(cli, &c, a, "resume").await,
        KeyCommand::Revoke(a) => return services::change_state(cli, &c, a, "revoke").await,
        KeyCommand::Rotate(a) => {
            let rotated = c
                .rotate_key(
                    &a.id,
                    &RotateRequest {
                        grace: a.grace.clone(),
                        reason: a.reason.clone(),
                    },
                )
                .await?;
            print(cli, &rotated, |r| {
                format!(
                    "{}\nOld key {} now ends at {}.\nSecret of the successor (shown once, store it now):\n\n    {}\n",
                    output::key_details(&r.key),
                    r.previous.id,
                    output::ts(r.previous.expires_at),
                    r.secret.0
                )
            })?;
        }
        KeyCommand::Usage(a) if a.stats => {
            let q = keywarden_client::KeyStatsQuery {
                since: Some(a.since.clone().unwrap_or_else(|| "30d".to_owned())),
                until: None,
                bucket: Some("day".to_owned()),
            };
            let stats = c.key_usage_stats(&a.id, &q).await?;
            print(cli, &stats, output::key_usage_stats)?;
        }
        KeyCommand::Usage(a) => {
            let page = c
                .key_usage(
                    &a.id,
                    &PageQuery {
                        limit: a.limit,
                        cursor: a.cursor.clone(),
                    },
                )
                .await?;
            print(cli, &page, |p| output::usage_table(&p.events))?;
        }
    }
    Ok(0)
}

async fn usage(cli: &Cli, cmd: &cli::UsageCommand) -> Result<u8> {
    let c = client(cli)?;
    match cmd {
        cli::UsageCommand::Stats(a) => {
            let q = keywarden_client::UsageStatsQuery {
                since: a.since.clone(),
                until: a.until.clone(),
                group_by: a.group_by.clone(),
                environment: a.environment.clone(),
                owner: a.owner.clone(),
                system: a.system.clone(),
                code: a.code.clone(),
                network: a.network.clone(),
                limit: a.limit,
            };
            print(cli, &c.usage_stats(&q).await?, output::usage_stats_table)?;
        }
        cli::UsageCommand::Search(a) => {
            let q = keywarden_client::UsageSearchQuery {
                source: a.source.clone(),
                since: a.since.clone(),
                until: a.until.clone(),
                limit: a.limit,
            };
            print(cli, &c.usage_search(&q).await?, output::usage_search_table)?;
        }
    }
    Ok(0)
}

async fn verify(cli: &Cli, a: &cli::VerifyArgs) -> Result<u8> {
    let key = if a.key == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the key from standard input")?;
        s.trim().to_owned()
    } else {
        a.key.clone()
    };
    let c = client(cli)?;
    let answer = c
        .verify(&VerifyRequest {
            key,
            scope: a.scope.clone(),
            environment: a.environment.clone(),
            source_ip: a.source_ip.clone(),
            subject: a.subject.clone(),
        })
        .await?;
    print(cli, &answer, |r| match (&r.key_id, &r.owner) {
        (Some(id), Some(owner)) => format!("{} key {id} (owner {owner})", r.code),
        (Some(id), None) => format!("{} key {id}", r.code),
        _ => r.code.clone(),
    })?;
    Ok(if answer.valid { 0 } else { NEGATIVE })
}

async fn policy(cli: &Cli, cmd: &cli::PolicyCommand) -> Result<u8> {
    let c = client(cli)?;
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    match cmd {
        cli::PolicyCommand::Apply { file, plan, yes } => {
            let text = read(file)?;
            let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin())
                && std::io::IsTerminal::is_terminal(&std::io::stderr());
            if *plan || (interactive && !*yes && !cli.json) {
                let report = match c.plan_policy(&text).await {
                    Ok(r) => r,
                    Err(keywarden_client::ClientError::Api { body, .. })
                        if !body.error.violations.is_empty() =>
                    {
                        eprintln!("{} is not a valid policy:", file.display());
                        for v in &body.error.violations {
                            eprintln!("  - {}", v.message);
                        }
                        return Ok(FAILURE);
                    }
                    Err(e) => return Err(e.into()),
                };
                if *plan {
                    print(cli, &report, |r| {
                        format!(
                            "under {} the first enforcer pass would act on {} key(s)\n{}",
                            file.display(),
                            r.actions.len(),
                            output::enforcement_table(&r.actions)
                        )
                    })?;
                    return Ok(0);
                }
                let ending = report
                    .actions
                    .iter()
                    .filter(|a| a.action != "notify")
                    .count();
                if ending > 0 {
                    eprintln!("{}", output::enforcement_table(&report.actions));
                    eprint!(
                        "Applying {} suspends or expires {ending} key(s) at once (above). Apply? [y/N] ",
                        file.display()
                    );
                    let mut answer = String::new();
                    std::io::stdin().read_line(&mut answer)?;
                    if !matches!(answer.trim(), "y" | "Y" | "yes") {
                        eprintln!("not applied");
                        return Ok(NEGATIVE);
                    }
                }
            }
            let applied = match c.put_policy(&text).await {
                Ok(p) => p,
                Err(keywarden_client::ClientError::Api { body, .. })
                    if !body.error.violations.is_empty() =>
                {
                    eprintln!("{} is not applied:", file.display());
                    for v in &body.error.violations {
                        eprintln!("  - {}", v.message);
                    }
                    return Ok(FAILURE);
                }
                Err(e) => return Err(e.into()),
            };
            print(cli, &applied, |p| {
                format!("applied {} as policy version {}", file.display(), p.version)
            })?;
        }
        cli::PolicyCommand::Show => print(cli, &c.get_policy().await?, |p| {
            if p.version == 0 {
                "no policy applied: the built-in defaults hold (90d TTL, at most 365d, idle keys expire after 30d)".to_owned()
            } else {
                format!(
                    "# policy version {}, applied {} by {}\n{}",
                    p.version,
                    p.applied_at.map(output::ts).unwrap_or_default(),
                    p.applied_by.as_deref().unwrap_or("-"),
                    p.text
                )
            }
        })?,
        cli::PolicyCommand::Diff { file } => {
            let new = read(file)?;
            // A diff against a file that could not be applied would mislead: say why.
            if let Err(e) = keywarden_core::policy::Policy::from_toml(&new) {
                bail!(
                    "{} is not a valid policy:\n  - {}",
                    file.display(),
                    e.0.join("\n  - ")
                );
            }
            let current = c.get_policy().await?;
            let diff = similar::TextDiff::from_lines(&current.text, &new);
            if current.text == new {
                out_line(format!(
                    "{} is the policy in force (version {})",
                    file.display(),
                    current.version
                ))?;
                return Ok(0);
            }
            let text = diff
                .unified_diff()
                .header(
                    &format!("policy version {}", current.version),
                    &file.display().to_string(),
                )
                .to_string();
            out_line(text.trim_end())?;
            return Ok(NEGATIVE);
        }
    }
    Ok(0)
}

async fn enforce(cli: &Cli, a: &cli::EnforceArgs) -> Result<u8> {
    if let Some(at) = &a.at {
        OffsetDateTime::parse(at, &Rfc3339)
            .with_context(|| format!("--at {at:?} is not RFC 3339 (2027-01-01T00:00:00Z)"))?;
    }
    let c = client(cli)?;
    let report = if a.plan {
        c.enforce_plan(a.at.as_deref()).await?
    } else {
        c.enforce_now().await?
    };
    print(cli, &report, |r| {
        let what = if r.planned {
            "would act on"
        } else {
            "acted on"
        };
        format!(
            "at {} the enforcer {what} {} key(s)\n{}",
            output::ts(r.at),
            r.actions.len(),
            output::enforcement_table(&r.actions)
        )
    })?;
    Ok(0)
}

async fn owner(cli: &Cli, cmd: &cli::OwnerCommand) -> Result<u8> {
    use cli::OwnerCommand as O;
    let c = client(cli)?;
    let changed = |ch: &keywarden_proto::OwnerStatusChange| {
        let mut s = output::owners_table(std::slice::from_ref(&ch.owner));
        if !ch.keys.is_empty() {
            s.push_str(&format!("\nkeys acted on: {}", ch.keys.join(", ")));
        }
        if !ch.tokens.is_empty() {
            s.push_str(&format!("\nadmin tokens revoked: {}", ch.tokens.join(", ")));
        }
        s
    };
    match cmd {
        O::Add {
            identity,
            name,
            manager,
        } => {
            let req = keywarden_proto::PutOwnerRequest {
                identity: identity.clone(),
                display_name: name.clone(),
                manager: manager.clone(),
            };
            print(cli, &c.put_owner(&req).await?, |o| {
                output::owners_table(std::slice::from_ref(o))
            })?;
        }
        O::List => print(cli, &c.list_owners().await?, |l| {
            output::owners_table(&l.owners)
        })?,
        O::Show { identity } => print(cli, &c.get_owner(identity).await?, |o| {
            output::owners_table(std::slice::from_ref(o))
        })?,
        O::Disable { identity, reason } => print(
            cli,
            &c.set_owner_status(identity, "disable", reason.clone())
                .await?,
            changed,
        )?,
        O::Enable { identity, reason } => print(
            cli,
            &c.set_owner_status(identity, "enable", reason.clone())
                .await?,
            changed,
        )?,
    }
    Ok(0)
}

async fn token(cli: &Cli, cmd: &TokenCommand) -> Result<u8> {
    let c = client(cli)?;
    match cmd {
        TokenCommand::Create {
            name,
            owner,
            role,
            environments,
            ttl,
        } => {
            let req = CreateTokenRequest {
                name: name.clone(),
                owner: owner.clone(),
                role: role.clone(),
                environments: (!environments.is_empty()).then(|| environments.clone()),
                ttl: ttl.clone(),
            };
            let created = c.create_token(&req).await?;
            print(cli, &created, |t| {
                format!(
                    "{}\nToken secret (shown once, store it now):\n\n    {}\n",
                    output::tokens_table(std::slice::from_ref(&t.token)),
                    t.secret.0
                )
            })?;
        }
        TokenCommand::List => print(cli, &c.list_tokens().await?, |l| {
            output::tokens_table(&l.tokens)
        })?,
        TokenCommand::Revoke { id } => print(cli, &c.revoke_token(id).await?, |t| {
            output::tokens_table(std::slice::from_ref(t))
        })?,
    }
    Ok(0)
}
