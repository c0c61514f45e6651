//! Human output: readable tables. `--json` output is the API's JSON as is.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use keywarden_proto::{
    AuditEntryView, EnforcementAction, KeyView, OwnerView, TokenView, UsageEventView,
};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub fn ts(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn opt_ts(t: Option<OffsetDateTime>) -> String {
    t.map_or_else(|| "-".to_owned(), ts)
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string)
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

pub fn keys_table(keys: &[KeyView]) -> String {
    let mut t = table(&[
        "ID",
        "NAME",
        "ENV",
        "OWNER",
        "SYSTEMS",
        "STATE",
        "SCOPES",
        "CREATED",
        "EXPIRES",
        "LAST USED",
    ]);
    for k in keys {
        t.add_row(vec![
            k.id.clone(),
            k.name.clone(),
            k.environment.clone(),
            k.owner.clone(),
            if k.systems.is_empty() {
                "-".to_owned()
            } else {
                k.systems.join(" ")
            },
            k.state.clone(),
            k.scopes.join(" "),
            day(k.created_at),
            day(k.expires_at),
            k.last_used_at.map_or_else(|| "never".to_owned(), ts),
        ]);
    }
    t.to_string()
}

/// A date for a table column where the time of day is noise.
fn day(t: OffsetDateTime) -> String {
    ts(t).split('T').next().unwrap_or_default().to_owned()
}

/// How many subjects a key enrolled, and the latest few: a key used by hundreds of hosts
/// must not print a line thousands of characters wide.
const SUBJECTS_SHOWN: usize = 5;

fn subjects_summary(subjects: &[keywarden_proto::SubjectView]) -> String {
    if subjects.is_empty() {
        return "none".to_owned();
    }
    let mut latest: Vec<&keywarden_proto::SubjectView> = subjects.iter().collect();
    latest.sort_by_key(|s| std::cmp::Reverse(s.last_seen));
    let names: Vec<&str> = latest
        .iter()
        .take(SUBJECTS_SHOWN)
        .map(|s| s.subject.as_str())
        .collect();
    if subjects.len() <= SUBJECTS_SHOWN {
        names.join(", ")
    } else {
        format!(
            "{} (latest: {}, …; all with --json)",
            subjects.len(),
            names.join(", ")
        )
    }
}

pub fn key_details(k: &KeyView) -> String {
    let mut t = table(&["FIELD", "VALUE"]);
    let uses = match k.max_uses {
        Some(m) => format!("{} of {m}", k.uses),
        None => k.uses.to_string(),
    };
    let rows: Vec<(&str, String)> = vec![
        ("id", k.id.clone()),
        ("name", k.name.clone()),
        ("description", k.description.clone()),
        ("owner", k.owner.clone()),
        ("environment", k.environment.clone()),
        ("systems", k.systems.join(", ")),
        ("scopes", k.scopes.join(" ")),
        ("state", k.state.clone()),
        ("state reason", opt(&k.state_reason)),
        ("state cause", opt(&k.state_cause)),
        (
            "created",
            format!("{} by {}", ts(k.created_at), k.created_by),
        ),
        ("expires", ts(k.expires_at)),
        (
            "allowed cidrs",
            if k.allowed_cidrs.is_empty() {
                "any".to_owned()
            } else {
                k.allowed_cidrs.join(", ")
            },
        ),
        ("uses", uses),
        ("rate limit", opt(&k.rate_limit)),
        (
            "canary",
            if k.canary {
                "yes: never verifies, raises CANARY_USED".to_owned()
            } else {
                "no".to_owned()
            },
        ),
        (
            "last used",
            format!("{} from {}", opt_ts(k.last_used_at), opt(&k.last_used_from)),
        ),
        ("rotated from", opt(&k.rotated_from)),
        ("rotated to", opt(&k.rotated_to)),
        ("hint", format!("…{}", k.hint)),
        (
            "metadata",
            k.metadata
                .iter()
                .map(|(a, b)| format!("{a}={b}"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        (
            "propagation",
            k.propagation.as_ref().map_or_else(
                || "-".to_owned(),
                |p| {
                    let open: Vec<String> = p
                        .services
                        .iter()
                        .filter(|d| d.state != "confirmed")
                        .map(|d| format!("{} {}", d.service, d.state))
                        .collect();
                    let mut s = if p.total == 0 {
                        format!("{} #{}: no connected services", p.event, p.seq)
                    } else {
                        format!(
                            "{} #{}: {} of {} services confirmed",
                            p.event, p.seq, p.confirmed, p.total
                        )
                    };
                    if !open.is_empty() {
                        s.push_str(&format!(" ({})", open.join(", ")));
                    }
                    s
                },
            ),
        ),
        (
            "subjects",
            k.subjects
                .as_deref()
                .map(subjects_summary)
                .unwrap_or_default(),
        ),
    ];
    for (f, v) in rows {
        t.add_row(vec![f.to_owned(), v]);
    }
    t.to_string()
}

pub fn usage_table(events: &[UsageEventView]) -> String {
    let mut t = table(&["TIME", "CODE", "SOURCE", "SCOPE", "SUBJECT", "USER AGENT"]);
    for e in events {
        t.add_row(vec![
            ts(e.time),
            e.code.clone(),
            opt(&e.source_ip),
            opt(&e.scope),
            opt(&e.subject),
            opt(&e.user_agent),
        ]);
    }
    t.to_string()
}

/// Values as a one-line chart, one character each: ▁ for none, then ▂ to █ by share
/// of the largest (any use at all shows above ▁).
pub fn sparkline(values: &[i64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    values
        .iter()
        .map(|&v| {
            let v = v.clamp(0, max);
            // Rounded up, so the smallest use is one step above none.
            let step = (v * 7 + max - 1) / max;
            BARS[usize::try_from(step).unwrap_or(0).min(7)]
        })
        .collect()
}

fn top_table(title: &str, values: &[keywarden_proto::TopValueView]) -> String {
    let mut t = table(&[title, "EVENTS", "VALID", "FIRST SEEN", "LAST SEEN"]);
    for v in values {
        t.add_row(vec![
            v.value.clone(),
            v.events.to_string(),
            v.valid.to_string(),
            ts(v.first_seen),
            ts(v.last_seen),
        ]);
    }
    t.to_string()
}

/// `key usage --stats`: daily valid uses over the window as a sparkline, then the top
/// sources and subjects.
pub fn key_usage_stats(s: &keywarden_proto::KeyUsageStats) -> String {
    // The 30 UTC days up to the window's end, as the day buckets start.
    let last = (s.until - time::Duration::MILLISECOND)
        .date()
        .midnight()
        .assume_utc();
    let daily: Vec<i64> = (0..30)
        .map(|i| {
            let day = last - time::Duration::days(29 - i);
            s.buckets
                .iter()
                .filter(|b| b.start == day)
                .map(|b| b.codes.get("VALID").copied().unwrap_or(0))
                .sum()
        })
        .collect();
    let total = &s.total;
    let mut out = format!(
        "Key {}: {} to {}\nValid uses a day, last 30 days  {}  (max {})\n{} events, {} valid; {} networks, {} subjects, {} user agents, {} scopes\n",
        s.key_id,
        ts(s.since),
        ts(s.until),
        sparkline(&daily),
        daily.iter().max().copied().unwrap_or(0),
        total.events,
        total.codes.get("VALID").copied().unwrap_or(0),
        total.distinct_networks,
        total.distinct_subjects,
        total.distinct_user_agents,
        total.distinct_scopes,
    );
    if !total.codes.is_empty() {
        let codes: Vec<String> = total
            .codes
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        out.push_str(&format!("By code: {}\n", codes.join(", ")));
    }
    out.push_str(&format!(
        "\n{}\n",
        top_table("TOP SOURCES", &s.top_networks)
    ));
    out.push_str(&top_table("TOP SUBJECTS", &s.top_subjects));
    out
}

pub fn usage_stats_table(s: &keywarden_proto::UsageStats) -> String {
    let title = s.group_by.to_uppercase();
    let mut t = table(&[
        title.as_str(),
        "NAME",
        "EVENTS",
        "VALID",
        "DENIED",
        "BY CODE",
    ]);
    for g in &s.groups {
        let valid = g.codes.get("VALID").copied().unwrap_or(0);
        let codes: Vec<String> = g.codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        t.add_row(vec![
            g.group.clone().unwrap_or_else(|| "(no key)".to_owned()),
            opt(&g.name),
            g.events.to_string(),
            valid.to_string(),
            (g.events - valid).to_string(),
            codes.join(", "),
        ]);
    }
    format!("{} to {}\n{t}", ts(s.since), ts(s.until))
}

pub fn usage_search_table(s: &keywarden_proto::UsageSearch) -> String {
    let mut t = table(&[
        "KEY",
        "NAME",
        "OWNER",
        "ENV",
        "EVENTS",
        "VALID",
        "FIRST SEEN",
        "LAST SEEN",
        "NETWORKS",
    ]);
    for h in &s.keys {
        t.add_row(vec![
            h.key_id.clone().unwrap_or_else(|| "(no key)".to_owned()),
            opt(&h.name),
            opt(&h.owner),
            opt(&h.environment),
            h.events.to_string(),
            h.valid.to_string(),
            ts(h.first_seen),
            ts(h.last_seen),
            h.networks.join(" "),
        ]);
    }
    format!(
        "Used from {} between {} and {}\n{t}",
        s.source,
        ts(s.since),
        ts(s.until)
    )
}

pub fn tokens_table(tokens: &[TokenView]) -> String {
    let mut t = table(&[
        "ID",
        "NAME",
        "OWNER",
        "ROLE",
        "ENVIRONMENTS",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "REVOKED",
    ]);
    for k in tokens {
        t.add_row(vec![
            k.id.clone(),
            k.name.clone(),
            opt(&k.owner),
            k.role.clone(),
            k.environments
                .as_ref()
                .map_or_else(|| "all".to_owned(), |e| e.join(", ")),
            ts(k.created_at),
            k.expires_at.map_or_else(|| "never".to_owned(), ts),
            k.last_used_at.map_or_else(|| "never".to_owned(), ts),
            opt_ts(k.revoked_at),
        ]);
    }
    t.to_string()
}

pub fn audit_table(entries: &[AuditEntryView]) -> String {
    let mut t = table(&["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "FROM", "REASON"]);
    for e in entries {
        t.add_row(vec![
            e.seq.to_string(),
            ts(e.time),
            format!("{} ({})", e.actor_name, e.actor),
            e.action.clone(),
            e.target.clone(),
            opt(&e.source_ip),
            opt(&e.reason),
        ]);
    }
    t.to_string()
}

pub fn enforcement_table(actions: &[EnforcementAction]) -> String {
    let mut t = table(&["KEY", "NAME", "OWNER", "ENV", "ACTION", "REASON", "DUE"]);
    for a in actions {
        t.add_row(vec![
            a.key_id.clone(),
            a.name.clone(),
            a.owner.clone(),
            a.environment.clone(),
            a.action.clone(),
            a.reason.clone(),
            ts(a.due_at),
        ]);
    }
    t.to_string()
}

pub fn owners_table(owners: &[OwnerView]) -> String {
    let mut t = table(&["IDENTITY", "NAME", "STATUS", "MANAGER", "UPDATED"]);
    for o in owners {
        t.add_row(vec![
            o.identity.clone(),
            o.display_name.clone(),
            if o.registered {
                o.status.clone()
            } else {
                format!("{} (holds keys, not registered)", o.status)
            },
            opt(&o.manager),
            ts(o.updated_at),
        ]);
    }
    t.to_string()
}

pub fn services_table(services: &[keywarden_proto::ServiceView]) -> String {
    let mut t = table(&["ID", "NAME", "DELIVERY", "EVENTS", "DELIVERIES"]);
    for s in services {
        t.add_row(vec![
            s.id.clone(),
            s.name.clone(),
            s.webhook_url
                .clone()
                .unwrap_or_else(|| "pull (/v1/events)".to_owned()),
            s.events.join(","),
            s.deliveries
                .iter()
                .map(|(state, n)| format!("{n} {state}"))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    t.to_string()
}

pub fn service_details(s: &keywarden_proto::ServiceView) -> String {
    let mut out = services_table(std::slice::from_ref(s));
    if let Some(recent) = &s.recent {
        let mut t = table(&[
            "SEQ",
            "EVENT",
            "KEY",
            "STATE",
            "ATTEMPTS",
            "CONFIRMED",
            "NEXT TRY",
            "LAST ERROR",
        ]);
        for d in recent {
            t.add_row(vec![
                d.seq.to_string(),
                d.event.clone(),
                d.key_id.clone(),
                d.state.clone(),
                d.attempts.to_string(),
                opt_ts(d.confirmed_at),
                opt_ts(d.next_attempt_at),
                opt(&d.last_error),
            ]);
        }
        out.push_str(&format!("\nlatest deliveries:\n{t}"));
    }
    out
}

pub fn alerts_table(alerts: &[keywarden_proto::AlertView]) -> String {
    let mut t = table(&[
        "SEQ",
        "TIME",
        "KIND",
        "SEVERITY",
        "STATE",
        "KEY",
        "CODE",
        "FROM",
        "USER AGENT",
        "SUBJECT",
        "DEAD FOR",
        "REPEATS",
    ]);
    for a in alerts {
        t.add_row(vec![
            a.seq.to_string(),
            ts(a.time),
            a.kind.clone(),
            a.severity.clone(),
            a.state.clone(),
            opt(&a.key_id),
            a.code.clone(),
            opt(&a.source_ip),
            opt(&a.user_agent),
            opt(&a.subject),
            a.dead_for_ms.map_or_else(
                || "-".to_owned(),
                |ms| keywarden_core::duration::format_duration(time::Duration::seconds(ms / 1000)),
            ),
            a.repeats.to_string(),
        ]);
    }
    t.to_string()
}

pub fn alert_details(a: &keywarden_proto::AlertView) -> String {
    let mut t = table(&["FIELD", "VALUE"]);
    let state = match (&a.state_changed_by, a.state_changed_at) {
        (Some(by), Some(at)) => format!("{} by {by} at {}", a.state, ts(at)),
        _ => a.state.clone(),
    };
    let rows: Vec<(&str, String)> = vec![
        ("id", a.seq.to_string()),
        ("kind", a.kind.clone()),
        ("severity", a.severity.clone()),
        ("state", state),
        ("state reason", opt(&a.state_reason)),
        ("key", opt(&a.key_id)),
        ("code", a.code.clone()),
        ("first seen", ts(a.time)),
        ("last seen", ts(a.last_seen)),
        ("repeats", a.repeats.to_string()),
        ("from", opt(&a.source_ip)),
        ("user agent", opt(&a.user_agent)),
        ("subject", opt(&a.subject)),
        ("evidence", a.evidence.to_string()),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_owned(), v]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sparkline_scales_to_the_largest_and_shows_any_use() {
        assert_eq!(super::sparkline(&[0, 1, 7, 14, 0]), "▁▂▅█▁");
        assert_eq!(super::sparkline(&[0, 0]), "▁▁");
        assert_eq!(super::sparkline(&[5]), "█");
        assert_eq!(super::sparkline(&[1, 1000]), "▂█");
    }
}
