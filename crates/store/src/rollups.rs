//! Usage rollups: per key and hour, events by verify code and the distinct values they
//! carried (source networks, scopes, subjects, user agents), so that usage over months
//! is read without scanning the log.
//!
//! They are written by the usage pipeline: on PostgreSQL from what a node holds in memory
//! for a few seconds, each batch's rollups exactly once whichever node writes them
//! (`postgres::held`); on SQLite in the fold step that moves the key's `last_seq`
//! (keyless events: the step that moves `folded_seq`), so the crash-recovery refold
//! covers them and every logged event is counted exactly once. [`crate::fold::Rollup`] is how a batch or an overlay counts
//! them, once for both backends.

use std::collections::HashMap;

use keywarden_core::KeyId;
use sqlx::Row;

pub use crate::fold::hour_of;
use crate::fold::{Network, ValueKind, HOUR_MS};
use crate::rows::Params;
use crate::{Engine, Result, Store};

/// Follows `VALUES (key_id, hour, code, events)` or an `UNNEST` of them.
pub(crate) const UPSERT_ROLLUP_CODES_TAIL: &str = "ON CONFLICT (key_id, hour, code) DO UPDATE \
    SET events = usage_rollups.events + excluded.events";

/// Follows `VALUES (key_id, hour, kind, value, code, events, first_seen, last_seen)`.
pub(crate) const UPSERT_ROLLUP_VALUES_TAIL: &str =
    "ON CONFLICT (key_id, hour, kind, value, code) DO UPDATE \
    SET events = usage_rollup_values.events + excluded.events, \
    first_seen = CASE WHEN excluded.first_seen < usage_rollup_values.first_seen \
    THEN excluded.first_seen ELSE usage_rollup_values.first_seen END, \
    last_seen = CASE WHEN excluded.last_seen > usage_rollup_values.last_seen \
    THEN excluded.last_seen ELSE usage_rollup_values.last_seen END";

/// SQLite's fold, one row at a time through rusqlite (the statements are SQLite's only).
pub(crate) static UPSERT_ROLLUP_CODES: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| {
        format!(
            "INSERT INTO usage_rollups (key_id, hour, code, events) VALUES (?1, ?2, ?3, ?4) \
             {UPSERT_ROLLUP_CODES_TAIL}"
        )
    });

pub(crate) static UPSERT_ROLLUP_VALUES: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| {
        format!(
            "INSERT INTO usage_rollup_values (key_id, hour, kind, value, code, events, \
             first_seen, last_seen) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
             {UPSERT_ROLLUP_VALUES_TAIL}"
        )
    });

/// A window of whole hours, unix ms: `since` inclusive, `until` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub since: i64,
    pub until: i64,
}

impl Window {
    /// The whole hours covering `since..until`: `since` rounded down to its hour,
    /// `until` up to the next one.
    pub fn covering(since: i64, until: i64) -> Self {
        let up = hour_of(until);
        Self {
            since: hour_of(since),
            until: if up == until { up } else { up + HOUR_MS },
        }
    }
}

/// One bucket (an hour or a UTC day) of a key's rollups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Unix ms of the bucket's start.
    pub start: i64,
    /// Events by verify code, in code order.
    pub codes: Vec<(String, i64)>,
    /// Distinct values seen, by kind (network, scope, subject, agent).
    pub distinct: Vec<(ValueKind, i64)>,
}

impl Bucket {
    pub fn events(&self) -> i64 {
        self.codes.iter().map(|(_, n)| n).sum()
    }

    pub fn code(&self, code: &str) -> i64 {
        self.codes
            .iter()
            .find(|(c, _)| c == code)
            .map_or(0, |(_, n)| *n)
    }

    pub fn distinct(&self, kind: ValueKind) -> i64 {
        self.distinct
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n)
    }
}

/// What a key's valid uses came from, by `known_sources`.
#[derive(Debug, Clone, Default)]
pub struct KnownSources {
    /// CIDRs (`10.2.3.0/24`, `2001:db8::/64`).
    pub networks: Vec<String>,
    pub subjects: Vec<String>,
}

/// A value among the most frequent of a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopValue {
    pub kind: ValueKind,
    /// As people write it: a network as CIDR (`10.2.3.0/24`), other values as sent.
    pub value: String,
    pub events: i64,
    pub valid: i64,
    pub first_seen: i64,
    pub last_seen: i64,
}

/// A key's rollups over a window.
#[derive(Debug, Clone, Default)]
pub struct KeyRollups {
    /// Only buckets with events, oldest first.
    pub buckets: Vec<Bucket>,
    /// The whole window as one bucket (its distinct counts are over the window, not a
    /// sum of the buckets').
    pub total: Bucket,
    /// The most frequent values of each kind, most events first.
    pub top: Vec<TopValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Key,
    Owner,
    System,
    Environment,
    Network,
    Code,
}

impl GroupBy {
    pub const ALL: [Self; 6] = [
        Self::Key,
        Self::Owner,
        Self::System,
        Self::Environment,
        Self::Network,
        Self::Code,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Owner => "owner",
            Self::System => "system",
            Self::Environment => "environment",
            Self::Network => "network",
            Self::Code => "code",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// What `usage_stats` counts and how it groups.
#[derive(Debug, Clone)]
pub struct StatsFilter {
    pub window: Window,
    pub group_by: GroupBy,
    pub environment: Option<String>,
    pub owner: Option<String>,
    pub system: Option<String>,
    pub code: Option<String>,
    /// Only events from the rollup networks inside this CIDR (/24 or /64 or wider).
    pub network: Option<ipnet::IpNet>,
    /// The caller's reach: only keys of these environments. `None`: every key, and the
    /// events that named no key.
    pub environments: Option<Vec<String>>,
}

/// One group of `usage_stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsGroup {
    /// The key id, owner, system, environment, network (CIDR) or code; `None` for events
    /// that named no key (or no stored key, grouped by a key's attribute).
    pub group: Option<String>,
    pub events: i64,
    pub codes: Vec<(String, i64)>,
}

/// One key used from a network, by `usage_search`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceHit {
    /// `None`: events that named no key.
    pub key_id: Option<String>,
    pub events: i64,
    pub valid: i64,
    pub first_seen: i64,
    pub last_seen: i64,
    /// The rollup networks (CIDR) the events came from, most events first.
    pub networks: Vec<String>,
}

/// A network filter's range of stored values; callers validate the prefix first.
fn network_range(net: ipnet::IpNet) -> Result<(String, String)> {
    Network::stored_range(net).ok_or_else(|| {
        crate::StoreError::Internal(format!(
            "{net} is narrower than a rollup network (/24, /64)"
        ))
    })
}

/// The display form of a stored value.
fn shown(kind: ValueKind, value: String) -> String {
    match kind {
        ValueKind::Network => Network::from_stored(&value).map_or(value, Network::cidr),
        _ => value,
    }
}

/// `r.key_id IN (…)` for key attribute filters and the caller's reach; `None` when no
/// filter applies.
fn key_clause(p: &mut Params, f: &StatsFilter) -> Option<String> {
    let mut conds = Vec::new();
    if let Some(env) = &f.environment {
        conds.push(format!("environment = {}", p.push_text(env)));
    }
    if let Some(owner) = &f.owner {
        conds.push(format!("owner = {}", p.push_text(owner)));
    }
    if let Some(system) = &f.system {
        conds.push(format!(
            "id IN (SELECT key_id FROM key_systems WHERE system = {})",
            p.push_text(system)
        ));
    }
    if let Some(envs) = &f.environments {
        if envs.is_empty() {
            conds.push("1 = 0".to_owned());
        } else {
            let list: Vec<String> = envs.iter().map(|e| p.push_text(e)).collect();
            conds.push(format!("environment IN ({})", list.join(", ")));
        }
    }
    (!conds.is_empty()).then(|| {
        format!(
            "r.key_id IN (SELECT id FROM keys WHERE {})",
            conds.join(" AND ")
        )
    })
}

impl Store {
    /// The rollups of events still in SQLite's overlay, or held by this PostgreSQL node,
    /// are written by the next fold step; a reader writes them first, so answers are
    /// exact to the last event this node wrote (on PostgreSQL, other nodes' held rollups
    /// land within their fold interval). It does what the usage writer would do within
    /// its interval, once for all.
    async fn rollups_current(&self) -> Result<()> {
        match &self.engine {
            Engine::Sqlite(_) => self.fold_usage().await,
            Engine::Postgres(e) => e.write_held().await,
        }
    }

    /// The source networks (as CIDR) and subjects of a key's valid uses from `since_ms`
    /// and first seen before `before_ms`, as far as its rollups have them (up to the last
    /// fold, or on PostgreSQL the last write of held rollups): what the monitor starts
    /// from for a key it has not seen since it started. `before_ms` keeps out the uses it
    /// is about to judge, should their rollups be written already.
    pub async fn known_sources(
        &self,
        id: &KeyId,
        since_ms: i64,
        before_ms: i64,
    ) -> Result<KnownSources> {
        let rows = sqlx::query(
            "SELECT DISTINCT kind, value FROM usage_rollup_values WHERE key_id = $1 \
             AND hour >= $2 AND first_seen < $3 AND code = 'VALID' \
             AND kind IN ('network', 'subject')",
        )
        .bind(id.as_str())
        .bind(hour_of(since_ms))
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut found: Vec<(String, String)> = Vec::with_capacity(rows.len());
        for row in &rows {
            found.push((row.try_get("kind")?, row.try_get("value")?));
        }
        // A PostgreSQL node's held rollups are not in the table yet; reading them here
        // keeps a monitor that starts over on a key from taking its last seconds of
        // sources for new ones, without writing the held rollups on a verify's path.
        if let Engine::Postgres(e) = &self.engine {
            for (kind, value) in e.held_sources(id, hour_of(since_ms), before_ms) {
                if !found.iter().any(|(k, v)| k == kind && *v == value) {
                    found.push((kind.to_owned(), value));
                }
            }
        }
        let mut out = KnownSources::default();
        for (kind, value) in found {
            match kind.as_str() {
                "network" => out
                    .networks
                    .extend(Network::from_stored(&value).map(Network::cidr)),
                _ => out.subjects.push(value),
            }
        }
        Ok(out)
    }

    /// A key's rollups over `window`, in buckets of `bucket_ms` (an hour or a day), with
    /// the `top` most frequent values of each kind.
    pub async fn key_rollups(
        &self,
        id: &KeyId,
        window: Window,
        bucket_ms: i64,
        top: usize,
    ) -> Result<KeyRollups> {
        self.rollups_current().await?;
        let mut out = KeyRollups::default();
        let rows = sqlx::query(
            "SELECT r.hour - (r.hour % $4) AS bucket, r.code AS code, \
             CAST(SUM(r.events) AS BIGINT) AS n FROM usage_rollups r \
             WHERE r.key_id = $1 AND r.hour >= $2 AND r.hour < $3 GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .bind(id.as_str())
        .bind(window.since)
        .bind(window.until)
        .bind(bucket_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut buckets: Vec<Bucket> = Vec::new();
        for row in &rows {
            let start: i64 = row.try_get("bucket")?;
            let code: String = row.try_get("code")?;
            let n: i64 = row.try_get("n")?;
            if buckets.last().is_none_or(|b| b.start != start) {
                buckets.push(Bucket {
                    start,
                    ..Bucket::default()
                });
            }
            if let Some(b) = buckets.last_mut() {
                b.codes.push((code.clone(), n));
            }
            match out.total.codes.iter_mut().find(|(c, _)| *c == code) {
                Some((_, m)) => *m += n,
                None => out.total.codes.push((code, n)),
            }
        }
        out.total.codes.sort();
        out.total.start = window.since;
        let rows = sqlx::query(
            "SELECT r.hour - (r.hour % $4) AS bucket, r.kind AS kind, \
             COUNT(DISTINCT r.value) AS n FROM usage_rollup_values r \
             WHERE r.key_id = $1 AND r.hour >= $2 AND r.hour < $3 GROUP BY 1, 2",
        )
        .bind(id.as_str())
        .bind(window.since)
        .bind(window.until)
        .bind(bucket_ms)
        .fetch_all(&self.pool)
        .await?;
        for row in &rows {
            let start: i64 = row.try_get("bucket")?;
            let Some(kind) = ValueKind::parse(&row.try_get::<String, _>("kind")?) else {
                continue;
            };
            let n: i64 = row.try_get("n")?;
            if let Some(b) = buckets.iter_mut().find(|b| b.start == start) {
                b.distinct.push((kind, n));
                b.distinct.sort();
            }
        }
        let rows = sqlx::query(
            "SELECT r.kind AS kind, r.value AS value, CAST(SUM(r.events) AS BIGINT) AS n, \
             CAST(SUM(CASE WHEN r.code = 'VALID' THEN r.events ELSE 0 END) AS BIGINT) AS valid, \
             MIN(r.first_seen) AS first_seen, MAX(r.last_seen) AS last_seen \
             FROM usage_rollup_values r \
             WHERE r.key_id = $1 AND r.hour >= $2 AND r.hour < $3 \
             GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2",
        )
        .bind(id.as_str())
        .bind(window.since)
        .bind(window.until)
        .fetch_all(&self.pool)
        .await?;
        let mut per_kind: HashMap<ValueKind, i64> = HashMap::new();
        for row in &rows {
            let Some(kind) = ValueKind::parse(&row.try_get::<String, _>("kind")?) else {
                continue;
            };
            let seen = per_kind.entry(kind).or_default();
            *seen += 1;
            if usize::try_from(*seen).unwrap_or(usize::MAX) > top {
                continue;
            }
            out.top.push(TopValue {
                kind,
                value: shown(kind, row.try_get("value")?),
                events: row.try_get("n")?,
                valid: row.try_get("valid")?,
                first_seen: row.try_get("first_seen")?,
                last_seen: row.try_get("last_seen")?,
            });
        }
        out.total.distinct = per_kind.into_iter().collect();
        out.total.distinct.sort();
        out.buckets = buckets;
        Ok(out)
    }

    /// Events over a window, grouped, most events first; at most `limit` groups.
    pub async fn usage_stats(&self, f: &StatsFilter, limit: usize) -> Result<Vec<StatsGroup>> {
        self.rollups_current().await?;
        let mut p = Params::new(self.backend());
        let by_network = f.network.is_some() || f.group_by == GroupBy::Network;
        let (from, mut conds) = if by_network {
            (
                "usage_rollup_values r",
                vec![format!("r.kind = {}", p.push_text("network"))],
            )
        } else {
            ("usage_rollups r", Vec::new())
        };
        let (group, join) = match f.group_by {
            GroupBy::Key => ("r.key_id", ""),
            GroupBy::Code => ("r.code", ""),
            GroupBy::Network => ("r.value", ""),
            GroupBy::Environment => ("k.environment", " LEFT JOIN keys k ON k.id = r.key_id"),
            GroupBy::Owner => ("k.owner", " LEFT JOIN keys k ON k.id = r.key_id"),
            GroupBy::System => (
                "s.system",
                " LEFT JOIN key_systems s ON s.key_id = r.key_id",
            ),
        };
        conds.push(format!("r.hour >= {}", p.push_int(f.window.since)));
        conds.push(format!("r.hour < {}", p.push_int(f.window.until)));
        if let Some(code) = &f.code {
            conds.push(format!("r.code = {}", p.push_text(code)));
        }
        if let Some(net) = f.network {
            let (lo, hi) = network_range(net)?;
            conds.push(format!("r.value >= {}", p.push_text(lo)));
            conds.push(format!("r.value <= {}", p.push_text(hi)));
        }
        if let Some(c) = key_clause(&mut p, f) {
            conds.push(c);
        }
        let sql = format!(
            "SELECT {group} AS g, r.code AS code, CAST(SUM(r.events) AS BIGINT) AS n \
             FROM {from}{join} WHERE {} GROUP BY 1, 2",
            conds.join(" AND ")
        );
        let rows = p.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        let mut groups: HashMap<Option<String>, StatsGroup> = HashMap::new();
        for row in &rows {
            let mut g: Option<String> = row.try_get("g")?;
            // Events that named no key are stored under ''.
            if g.as_deref() == Some("") {
                g = None;
            }
            if f.group_by == GroupBy::Network {
                g = g.map(|v| shown(ValueKind::Network, v));
            }
            let code: String = row.try_get("code")?;
            let n: i64 = row.try_get("n")?;
            let entry = groups.entry(g.clone()).or_insert_with(|| StatsGroup {
                group: g,
                events: 0,
                codes: Vec::new(),
            });
            entry.events += n;
            entry.codes.push((code, n));
        }
        let mut out: Vec<StatsGroup> = groups.into_values().collect();
        for g in &mut out {
            g.codes.sort();
        }
        out.sort_by(|a, b| b.events.cmp(&a.events).then_with(|| a.group.cmp(&b.group)));
        out.truncate(limit);
        Ok(out)
    }

    /// The keys used from the networks inside `net` over `window`, most events first.
    /// `environments` limits the keys to the caller's reach (and leaves out events that
    /// named no key).
    pub async fn usage_search(
        &self,
        net: ipnet::IpNet,
        window: Window,
        environments: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<SourceHit>> {
        self.rollups_current().await?;
        let (lo, hi) = network_range(net)?;
        let f = StatsFilter {
            window,
            group_by: GroupBy::Key,
            environment: None,
            owner: None,
            system: None,
            code: None,
            network: Some(net),
            environments: environments.map(<[String]>::to_vec),
        };
        let mut p = Params::new(self.backend());
        let mut conds = vec![
            format!("r.kind = {}", p.push_text("network")),
            format!("r.value >= {}", p.push_text(lo)),
            format!("r.value <= {}", p.push_text(hi)),
            format!("r.hour >= {}", p.push_int(window.since)),
            format!("r.hour < {}", p.push_int(window.until)),
        ];
        if let Some(c) = key_clause(&mut p, &f) {
            conds.push(c);
        }
        let sql = format!(
            "SELECT r.key_id AS key_id, r.value AS value, CAST(SUM(r.events) AS BIGINT) AS n, \
             CAST(SUM(CASE WHEN r.code = 'VALID' THEN r.events ELSE 0 END) AS BIGINT) AS valid, \
             MIN(r.first_seen) AS first_seen, MAX(r.last_seen) AS last_seen \
             FROM usage_rollup_values r WHERE {} GROUP BY 1, 2",
            conds.join(" AND ")
        );
        let rows = p.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        let mut hits: HashMap<String, (SourceHit, Vec<(i64, String)>)> = HashMap::new();
        for row in &rows {
            let key_id: String = row.try_get("key_id")?;
            let value: String = row.try_get("value")?;
            let n: i64 = row.try_get("n")?;
            let valid: i64 = row.try_get("valid")?;
            let first: i64 = row.try_get("first_seen")?;
            let last: i64 = row.try_get("last_seen")?;
            let (hit, nets) = hits.entry(key_id.clone()).or_insert_with(|| {
                (
                    SourceHit {
                        key_id: (!key_id.is_empty()).then_some(key_id),
                        events: 0,
                        valid: 0,
                        first_seen: first,
                        last_seen: last,
                        networks: Vec::new(),
                    },
                    Vec::new(),
                )
            });
            hit.events += n;
            hit.valid += valid;
            hit.first_seen = hit.first_seen.min(first);
            hit.last_seen = hit.last_seen.max(last);
            nets.push((n, shown(ValueKind::Network, value)));
        }
        let mut out: Vec<SourceHit> = hits
            .into_values()
            .map(|(mut hit, mut nets)| {
                nets.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                hit.networks = nets.into_iter().map(|(_, n)| n).collect();
                hit
            })
            .collect();
        out.sort_by(|a, b| {
            b.events
                .cmp(&a.events)
                .then_with(|| a.key_id.cmp(&b.key_id))
        });
        out.truncate(limit);
        Ok(out)
    }

    /// Removes the rollups of hours before `before` (unix ms); returns how many rows.
    pub async fn prune_usage_rollups(&self, before: i64) -> Result<u64> {
        let mut tx = self.begin_quiet_write().await?;
        let mut removed = 0;
        for sql in [
            "DELETE FROM usage_rollups WHERE hour < $1",
            "DELETE FROM usage_rollup_values WHERE hour < $1",
        ] {
            removed += sqlx::query(sql)
                .bind(before)
                .execute(&mut **tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(removed)
    }
}
