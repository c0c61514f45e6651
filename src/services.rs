//! `service`, `alert`, and key state changes that wait for the services to confirm.

use std::time::Duration;

use anyhow::{Context, Result};
use keywarden_client::{AlertQuery, Client};
use keywarden_proto::{CreateServiceRequest, KeyView};

use crate::cli::{AlertCommand, Cli, ServiceCommand, StateArgs};
use crate::{client, output, print, NEGATIVE};

pub async fn service(cli: &Cli, cmd: &ServiceCommand) -> Result<u8> {
    let c = client(cli)?;
    match cmd {
        ServiceCommand::Add {
            name,
            webhook,
            events,
            format,
        } => {
            let req = CreateServiceRequest {
                name: name.clone(),
                webhook_url: webhook.clone(),
                events: (!events.is_empty()).then(|| events.clone()),
                format: format.clone(),
            };
            let created = c.create_service(&req).await?;
            print(cli, &created, |c| {
                match &c.secret {
                Some(secret) => format!(
                    "{}\nSigning secret (Standard Webhooks; shown once, give it to the service):\n\n    {}\n",
                    output::services_table(std::slice::from_ref(&c.service)),
                    secret.0
                ),
                None => format!(
                    "{}\nA pull service: it reads `keywarden events tail` (GET /v1/events) with a \
                     verifier token and acknowledges with `keywarden events ack`.",
                    output::services_table(std::slice::from_ref(&c.service)),
                ),
            }
            })?;
        }
        ServiceCommand::List => {
            print(cli, &c.list_services().await?, |l| {
                output::services_table(&l.services)
            })?;
        }
        ServiceCommand::Show { id } => {
            print(cli, &c.get_service(id).await?, output::service_details)?;
        }
        ServiceCommand::Remove { id } => {
            c.remove_service(id).await?;
            print(cli, &serde_json::json!({ "removed": id }), |_| {
                format!("removed service {id}")
            })?;
        }
        ServiceCommand::Test { id } => {
            let r = c.test_service(id).await?;
            print(cli, &r, |r| match (r.status, &r.error) {
                (Some(s), _) => format!("the service answered HTTP {s}"),
                (None, Some(e)) => format!("no answer: {e}"),
                (None, None) => "no answer".to_owned(),
            })?;
            if !r.delivered {
                return Ok(NEGATIVE);
            }
        }
    }
    Ok(0)
}

pub async fn alert(cli: &Cli, cmd: &AlertCommand) -> Result<u8> {
    let c = client(cli)?;
    let (id, action, reason) = match cmd {
        AlertCommand::List { .. } => return list_alerts(cli, &c, cmd).await,
        AlertCommand::Show { id } => (id, None, &None),
        AlertCommand::Ack { id, reason } => (id, Some("ack"), reason),
        AlertCommand::Resolve { id, reason } => (id, Some("resolve"), reason),
    };
    let alert = match action {
        None => c.get_alert(id).await?,
        Some(action) => c.move_alert(id, action, reason.clone()).await?,
    };
    print(cli, &alert, output::alert_details)?;
    Ok(0)
}

async fn list_alerts(cli: &Cli, c: &Client, cmd: &AlertCommand) -> Result<u8> {
    let AlertCommand::List {
        key,
        kind,
        state,
        since,
        limit,
        cursor,
    } = cmd
    else {
        return Ok(0);
    };
    let q = AlertQuery {
        key: key.clone(),
        kind: kind.clone(),
        state: state.clone(),
        since: since.clone(),
        limit: *limit,
        cursor: cursor.clone(),
    };
    let list = c.list_alerts(&q).await?;
    print(cli, &list, |l| {
        let mut s = output::alerts_table(&l.alerts);
        if let Some(n) = &l.next_cursor {
            s.push_str(&format!("\nmore: --cursor {n}"));
        }
        s
    })?;
    Ok(0)
}

/// Suspend, resume or revoke; with `--wait`, then wait until every connected service
/// subscribed to the change confirmed it.
pub async fn change_state(cli: &Cli, c: &Client, a: &StateArgs, action: &str) -> Result<u8> {
    let wait = a
        .wait
        .as_deref()
        .map(|w| {
            keywarden_core::duration::parse_duration(w)
                .ok()
                .and_then(|d| Duration::try_from(d).ok())
                .with_context(|| format!("--wait {w:?}: expected a duration such as 10s"))
        })
        .transpose()?;
    if action == "revoke" && wait.is_none() && !cli.json {
        let key = c.get_key(&a.id).await?;
        if key.state == "revoked" {
            crate::out_line(format!(
                "{} already revoked since {}",
                key.id,
                key.state_changed_at
                    .map_or_else(|| "?".to_owned(), output::ts)
            ))?;
            return Ok(0);
        }
    }
    let changed = c.change_state(&a.id, action, a.reason.clone()).await?;
    let Some(wait) = wait else {
        print(cli, &changed, output::key_details)?;
        return Ok(0);
    };
    let event = match action {
        "suspend" => "suspended",
        "resume" => "resumed",
        _ => "revoked",
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut key = c.get_key(&a.id).await?;
    loop {
        if done(&key, event) || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        key = c.get_key(&a.id).await?;
    }
    print(cli, &key, output::key_details)?;
    if done(&key, event) {
        return Ok(0);
    }
    let missing: Vec<String> = key
        .propagation
        .iter()
        .flat_map(|p| &p.services)
        .filter(|d| d.state != "confirmed")
        .map(|d| match &d.last_error {
            Some(e) => format!("{} ({}: {e})", d.service, d.state),
            None => format!("{} ({})", d.service, d.state),
        })
        .collect();
    eprintln!(
        "not confirmed within {}: {}",
        a.wait.as_deref().unwrap_or_default(),
        missing.join(", ")
    );
    Ok(NEGATIVE)
}

/// Whether every service subscribed to `event` confirmed it (true when none is).
fn done(key: &KeyView, event: &str) -> bool {
    match &key.propagation {
        None => true,
        Some(p) => p.event == event && p.confirmed == p.total,
    }
}

/// `events tail` and `events ack`.
pub async fn events(cli: &Cli, cmd: &crate::cli::EventsCommand) -> Result<u8> {
    use crate::cli::EventsCommand as E;
    let c = client(cli)?;
    match cmd {
        E::Tail {
            after,
            follow,
            events,
        } => {
            let mut after = *after;
            loop {
                let page = c
                    .events(&keywarden_client::EventsQuery {
                        after: Some(after),
                        wait: Some(if *follow { "30s" } else { "0s" }.to_owned()),
                        limit: Some(1000),
                        events: events.clone(),
                    })
                    .await?;
                for e in &page.events {
                    if cli.json {
                        crate::out_line(serde_json::to_string(e)?)?;
                    } else {
                        crate::out_line(format!(
                            "{}  {}  {}  {}  by {}{}",
                            e.seq,
                            output::ts(e.time),
                            e.kind,
                            e.key_id
                                .as_deref()
                                .map_or_else(|| "no key".to_owned(), |k| format!("key {k}")),
                            e.actor,
                            e.reason
                                .as_deref()
                                .map(|r| format!("  ({r})"))
                                .unwrap_or_default()
                        ))?;
                    }
                }
                after = page.next;
                if !*follow && page.events.len() < 1000 {
                    return Ok(0);
                }
            }
        }
        E::Ack { service, seq } => {
            let done = c.ack(service, *seq).await?;
            print(cli, &done, |d| {
                format!(
                    "{} acknowledged every event up to {} ({} deliver{} confirmed)",
                    d.service_id,
                    d.acked_seq,
                    d.confirmed,
                    if d.confirmed == 1 { "y" } else { "ies" }
                )
            })?;
            Ok(0)
        }
    }
}
