//! Usage analytics from the rollups (`keywarden_store::rollups`): a key's usage by hour
//! or day, usage over every key grouped, and which keys were used from a network. All of
//! it reads rollups, never the event log, so a window of months costs what a day does.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::Json;
use ipnet::IpNet;
use keywarden_core::clock::{from_millis, to_millis};
use keywarden_core::duration::parse_duration;
use keywarden_core::role::Permission;
use keywarden_core::{validate, VerifyCode};
use keywarden_proto::{
    ErrorBody, ErrorCode, KeyUsageStats, TopValueView, UsageBucketView, UsageSearch,
    UsageSearchHit, UsageStats, UsageStatsGroup,
};
use keywarden_store::rollups::{Bucket, GroupBy, StatsFilter, Window};
use keywarden_store::{ValueKind, HOUR_MS};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::IntoParams;

use super::keys::load_in_reach;
use super::{parse_key_id, parse_limit};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::QueryParams;
use crate::state::SharedState;

const DAY_MS: i64 = 24 * HOUR_MS;
/// Hour buckets over a longer window would be thousands of mostly empty rows.
const MAX_HOUR_BUCKETS_DAYS: i64 = 31;
/// Most frequent values shown per kind.
const TOP: usize = 10;
/// The default window: the last week.
const DEFAULT_SINCE: &str = "7d";

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::coded(ErrorCode::InvalidQuery, message)
}

/// A time parameter: RFC 3339, or a duration ago such as `7d` or `12h`.
fn parse_when(field: &str, s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, ApiError> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    if let Ok(ago) = parse_duration(s) {
        return Ok(now - ago);
    }
    Err(bad(format!(
        "{field} must be an RFC 3339 time such as 2026-06-01T00:00:00Z or a duration ago \
         such as 7d, 12h or 30m"
    )))
}

/// The window of whole hours `since..until` names (default: the last 7 days up to now).
fn window(
    since: Option<&str>,
    until: Option<&str>,
    now: OffsetDateTime,
) -> Result<Window, ApiError> {
    let until = until.map_or(Ok(now), |u| parse_when("until", u, now))?;
    let since = parse_when("since", since.unwrap_or(DEFAULT_SINCE), now)?;
    if since >= until {
        return Err(bad("since must be before until"));
    }
    Ok(Window::covering(to_millis(since), to_millis(until)))
}

/// A network parameter: a CIDR no narrower than a rollup network.
fn parse_network(field: &str, s: &str) -> Result<IpNet, ApiError> {
    let net: IpNet = s.parse().map_err(|_| {
        bad(format!(
            "{field} must be a network in CIDR notation, such as 10.2.0.0/16 or 2001:db8::/48"
        ))
    })?;
    if keywarden_store::Network::stored_range(net).is_none() {
        return Err(bad(format!(
            "{field} {net} is narrower than the rollups keep sources: by /24 for IPv4 and /64 \
             for IPv6; give a /24 (/64) or a wider network"
        )));
    }
    Ok(net.trunc())
}

fn parse_code(s: &str) -> Result<String, ApiError> {
    s.parse::<VerifyCode>()
        .map(|c| c.as_str().to_owned())
        .map_err(|_| {
            let all: Vec<&str> = VerifyCode::ALL.iter().map(|c| c.as_str()).collect();
            bad(format!("code must be one of {}", all.join(", ")))
        })
}

/// A free-text filter (environment, system): 1-256 characters.
fn text_filter(field: &str, v: Option<String>) -> Result<Option<String>, ApiError> {
    match v {
        Some(v) if v.is_empty() || v.len() > 256 => {
            Err(bad(format!("{field} must be 1-256 characters")))
        }
        other => Ok(other),
    }
}

fn bucket_view(b: &Bucket) -> UsageBucketView {
    UsageBucketView {
        start: from_millis(b.start),
        events: b.events(),
        codes: b.codes.iter().cloned().collect::<BTreeMap<_, _>>(),
        distinct_networks: b.distinct(ValueKind::Network),
        distinct_scopes: b.distinct(ValueKind::Scope),
        distinct_subjects: b.distinct(ValueKind::Subject),
        distinct_user_agents: b.distinct(ValueKind::Agent),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct KeyStatsQuery {
    /// From (rounded down to its hour): RFC 3339 or a duration ago such as 7d (default).
    pub since: Option<String>,
    /// Up to (rounded up to the next hour): RFC 3339 or a duration ago; default now.
    pub until: Option<String>,
    /// `hour` or `day` (UTC days, the default). Hour buckets cover at most 31 days.
    pub bucket: Option<String>,
}

/// A key's usage from the rollups: events by code per hour or day, distinct networks,
/// scopes, subjects and user agents, and the most frequent of each.
#[utoipa::path(get, path = "/v1/keys/{id}/usage/stats", tag = "usage",
    params(("id" = String, Path, description = "key id"), KeyStatsQuery),
    responses((status = 200, body = KeyUsageStats), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn key_usage_stats(
    State(app): State<SharedState>,
    principal: Principal,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<KeyStatsQuery>,
) -> Result<Json<KeyUsageStats>, ApiError> {
    principal.require(Permission::UsageRead)?;
    let now = app.now();
    let w = window(q.since.as_deref(), q.until.as_deref(), now)?;
    let (bucket, bucket_ms) = match q.bucket.as_deref() {
        None | Some("day") => ("day", DAY_MS),
        Some("hour") => ("hour", HOUR_MS),
        Some(_) => return Err(bad("bucket must be hour or day")),
    };
    if bucket_ms == HOUR_MS && w.until - w.since > MAX_HOUR_BUCKETS_DAYS * DAY_MS {
        return Err(bad(format!(
            "bucket=hour covers at most {MAX_HOUR_BUCKETS_DAYS} days; use bucket=day for a \
             longer window"
        )));
    }
    let key = load_in_reach(&app, &principal, &id).await?;
    let r = app.store.key_rollups(&key.id, w, bucket_ms, TOP).await?;
    let top = |kind: ValueKind| -> Vec<TopValueView> {
        r.top
            .iter()
            .filter(|t| t.kind == kind)
            .map(|t| TopValueView {
                value: t.value.clone(),
                events: t.events,
                valid: t.valid,
                first_seen: from_millis(t.first_seen),
                last_seen: from_millis(t.last_seen),
            })
            .collect()
    };
    Ok(Json(KeyUsageStats {
        key_id: key.id.to_string(),
        since: from_millis(w.since),
        until: from_millis(w.until),
        bucket: bucket.to_owned(),
        total: bucket_view(&r.total),
        buckets: r.buckets.iter().map(bucket_view).collect(),
        top_networks: top(ValueKind::Network),
        top_scopes: top(ValueKind::Scope),
        top_subjects: top(ValueKind::Subject),
        top_user_agents: top(ValueKind::Agent),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// From (rounded down to its hour): RFC 3339 or a duration ago such as 7d (default).
    pub since: Option<String>,
    /// Up to (rounded up to the next hour): RFC 3339 or a duration ago; default now.
    pub until: Option<String>,
    /// key (default), owner, system, environment, network or code.
    pub group_by: Option<String>,
    /// Only keys of this environment.
    pub environment: Option<String>,
    /// Only keys of this owner.
    pub owner: Option<String>,
    /// Only keys that touch this system.
    pub system: Option<String>,
    /// Only events answered with this code, e.g. MALFORMED.
    pub code: Option<String>,
    /// Only events from this network (CIDR, /24 or wider for IPv4, /64 or wider for IPv6).
    pub network: Option<String>,
    /// Groups shown, 1-1000, default 100.
    pub limit: Option<u32>,
}

/// Usage over every key in reach, from the rollups, grouped, most events first. A key
/// with several systems counts under each.
#[utoipa::path(get, path = "/v1/usage/stats", tag = "usage", params(StatsQuery),
    responses((status = 200, body = UsageStats), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn usage_stats(
    State(app): State<SharedState>,
    principal: Principal,
    QueryParams(q): QueryParams<StatsQuery>,
) -> Result<Json<UsageStats>, ApiError> {
    principal.require(Permission::UsageRead)?;
    let now = app.now();
    let w = window(q.since.as_deref(), q.until.as_deref(), now)?;
    let group_by = match q.group_by.as_deref() {
        None => GroupBy::Key,
        Some(g) => GroupBy::parse(g).ok_or_else(|| {
            let all: Vec<&str> = GroupBy::ALL.iter().map(|g| g.as_str()).collect();
            bad(format!("group_by must be one of {}", all.join(", ")))
        })?,
    };
    let filter = StatsFilter {
        window: w,
        group_by,
        environment: text_filter("environment", q.environment)?,
        owner: text_filter("owner", q.owner)?.map(|o| validate::canonical_owner(&o)),
        system: text_filter("system", q.system)?,
        code: q.code.as_deref().map(parse_code).transpose()?,
        network: q
            .network
            .as_deref()
            .map(|n| parse_network("network", n))
            .transpose()?,
        environments: principal.token.environments.clone(),
    };
    let limit = parse_limit(q.limit)?;
    let groups = app.store.usage_stats(&filter, limit as usize).await?;
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let name = match (&g.group, group_by) {
            (Some(id), GroupBy::Key) => match parse_key_id(id) {
                Ok(id) => app.store.get_key(&id).await?.map(|k| k.name),
                Err(_) => None,
            },
            _ => None,
        };
        out.push(UsageStatsGroup {
            group: g.group,
            name,
            events: g.events,
            codes: g.codes.into_iter().collect(),
        });
    }
    Ok(Json(UsageStats {
        since: from_millis(w.since),
        until: from_millis(w.until),
        group_by: group_by.as_str().to_owned(),
        groups: out,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    /// The network (CIDR, /24 or wider for IPv4, /64 or wider for IPv6). Required.
    pub source: Option<String>,
    /// From (rounded down to its hour): RFC 3339 or a duration ago such as 7d (default).
    pub since: Option<String>,
    /// Up to (rounded up to the next hour): RFC 3339 or a duration ago; default now.
    pub until: Option<String>,
    /// Keys shown, 1-1000, default 100.
    pub limit: Option<u32>,
}

/// Which keys were used from a network in a window, from the rollups: each with its
/// events (allowed or denied) and first and last sighting from there.
#[utoipa::path(get, path = "/v1/usage/search", tag = "usage", params(SearchQuery),
    responses((status = 200, body = UsageSearch), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn usage_search(
    State(app): State<SharedState>,
    principal: Principal,
    QueryParams(q): QueryParams<SearchQuery>,
) -> Result<Json<UsageSearch>, ApiError> {
    principal.require(Permission::UsageRead)?;
    let now = app.now();
    let source = q
        .source
        .as_deref()
        .ok_or_else(|| bad("source is required: a network such as 10.2.0.0/16"))?;
    let net = parse_network("source", source)?;
    let w = window(q.since.as_deref(), q.until.as_deref(), now)?;
    let limit = parse_limit(q.limit)?;
    let hits = app
        .store
        .usage_search(
            net,
            w,
            principal.token.environments.as_deref(),
            limit as usize,
        )
        .await?;
    let mut keys = Vec::with_capacity(hits.len());
    for h in hits {
        let key = match h.key_id.as_deref().map(parse_key_id) {
            Some(Ok(id)) => app.store.get_key(&id).await?,
            _ => None,
        };
        keys.push(UsageSearchHit {
            key_id: h.key_id,
            name: key.as_ref().map(|k| k.name.clone()),
            owner: key.as_ref().map(|k| k.owner.clone()),
            environment: key.map(|k| k.environment),
            events: h.events,
            valid: h.valid,
            first_seen: from_millis(h.first_seen),
            last_seen: from_millis(h.last_seen),
            networks: h.networks,
        });
    }
    Ok(Json(UsageSearch {
        source: net.to_string(),
        since: from_millis(w.since),
        until: from_millis(w.until),
        keys,
    }))
}
