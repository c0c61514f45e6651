//! Usage rollups through the API: they agree with a recount of the raw events, day
//! buckets sum the hours, groupings and filters total right, search by network finds
//! exactly the keys used from it, a token limited to environments sees only its keys,
//! bad parameters are refused precisely, old rollups are removed, and (SQLite) a crash
//! before or during a fold counts every event exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use reqwest::StatusCode;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;

use crate::harness::{key_body, Backend, TestServer, START};
use crate::on_both_backends;

on_both_backends!(
    rollups_match_a_recount_of_the_events,
    groups_and_filters_total_right,
    search_finds_exactly_the_keys_used_from_a_network,
    environment_limited_tokens_see_only_their_keys,
    rollups_past_their_retention_are_removed,
);

struct Seeded {
    a: String,
    b: String,
    /// The id of a verify of a key that does not exist (NOT_FOUND under its id).
    unknown: String,
}

async fn verify_with(s: &TestServer, body: Value, agent: &str) {
    let resp = s
        .http
        .post(s.url("/v1/verify"))
        .bearer_auth(&s.admin)
        .header("user-agent", agent)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Two keys used over three hours from several networks, with several scopes, subjects,
/// agents and codes, plus junk that names no key.
async fn seed(s: &TestServer) -> Seeded {
    let mut body = key_body("alpha");
    body["systems"] = json!(["github", "vault"]);
    let (a_id, a) = s.create_key(body).await;
    let mut body = key_body("beta");
    body["owner"] = json!("bob@example.com");
    body["environment"] = json!("staging");
    body["systems"] = json!(["vault"]);
    let (b_id, b) = s.create_key(body).await;
    // Right id, wrong secret: recorded against the key as NOT_FOUND.
    let guessed = keywarden_core::key_format::assemble(
        "kw",
        "prod",
        keywarden_core::KeyId::parse(&a_id).unwrap(),
        &"0".repeat(keywarden_core::key_format::SECRET_LEN),
    );
    let unknown =
        keywarden_core::key_format::generate(&mut rand::rngs::OsRng, "kw", "prod").unwrap();
    let a_uses = [
        ("10.2.1.5", "deploy:write", "host-1", "agent/1"),
        ("10.2.1.77", "deploy:write", "host-2", "agent/1"),
        ("10.2.9.1", "db:read", "host-1", "agent/2"),
        ("2001:db8:0:1::5", "nope:never", "host-3", "agent/1"),
    ];
    for round in 0..3 {
        for (ip, scope, subject, agent) in a_uses {
            verify_with(
                s,
                json!({"key": a, "scope": scope, "subject": subject, "source_ip": ip}),
                agent,
            )
            .await;
        }
        verify_with(
            s,
            json!({"key": b, "scope": "deploy:write", "subject": "b-host", "source_ip": "192.0.2.10"}),
            "agent/b",
        )
        .await;
        if round == 1 {
            verify_with(
                s,
                json!({"key": guessed.plain.expose(), "source_ip": "10.2.200.1"}),
                "guesser",
            )
            .await;
            verify_with(
                s,
                json!({"key": "kw_prod_not-a-key", "source_ip": "203.0.113.7"}),
                "junk",
            )
            .await;
            verify_with(
                s,
                json!({"key": unknown.plain.expose(), "source_ip": "203.0.113.8"}),
                "junk",
            )
            .await;
        }
        // 40 minutes: the rounds fall into three different hours.
        s.clock.advance(time::Duration::minutes(40));
    }
    s.wait_for_usage(&a_id, 13).await;
    s.wait_for_usage(&b_id, 3).await;
    // The keyless events have no key to list them by: wait for them in the rollups.
    crate::harness::eventually(
        crate::harness::WAIT,
        "the junk verifies in the rollups",
        || async {
            let (_, v) = s
                .get(&format!("/v1/usage/stats?group_by=code&{}", window()))
                .await;
            let total: i64 = v["groups"]
                .as_array()
                .map(|g| g.iter().map(|g| g["events"].as_i64().unwrap_or(0)).sum())
                .unwrap_or(0);
            if total == 13 + 3 + 2 {
                Ok(())
            } else {
                Err(format!("{total} events: {v}"))
            }
        },
    )
    .await;
    Seeded {
        a: a_id,
        b: b_id,
        unknown: unknown.id.to_string(),
    }
}

/// The whole seeded period (and an hour either side).
fn window() -> String {
    let since = (START - time::Duration::hours(1)).format(&Rfc3339).unwrap();
    let until = (START + time::Duration::hours(4)).format(&Rfc3339).unwrap();
    format!("since={since}&until={until}")
}

/// The /24 (/64) of an address, as the API shows it.
fn network(ip: &str) -> String {
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        IpAddr::V6(v6) => {
            let n = u128::from(v6) >> 64 << 64;
            format!("{}/64", std::net::Ipv6Addr::from(n))
        }
    }
}

async fn all_events(s: &TestServer, id: &str) -> Vec<Value> {
    let (st, v) = s.get(&format!("/v1/keys/{id}/usage?limit=1000")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["next_cursor"].is_null());
    v["events"].as_array().unwrap().clone()
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Recount {
    codes: BTreeMap<String, i64>,
    networks: BTreeSet<String>,
    scopes: BTreeSet<String>,
    subjects: BTreeSet<String>,
    agents: BTreeSet<String>,
}

fn bucket_start(time: &str, bucket_secs: i64) -> String {
    let t = time::OffsetDateTime::parse(time, &Rfc3339).unwrap();
    let secs = t.unix_timestamp();
    time::OffsetDateTime::from_unix_timestamp(secs - secs.rem_euclid(bucket_secs))
        .unwrap()
        .format(&Rfc3339)
        .unwrap()
}

fn recount(events: &[Value], bucket_secs: i64) -> BTreeMap<String, Recount> {
    let mut out: BTreeMap<String, Recount> = BTreeMap::new();
    for e in events {
        let r = out
            .entry(bucket_start(e["time"].as_str().unwrap(), bucket_secs))
            .or_default();
        *r.codes
            .entry(e["code"].as_str().unwrap().to_owned())
            .or_default() += 1;
        let put = |set: &mut BTreeSet<String>, v: &Value| {
            if let Some(v) = v.as_str() {
                set.insert(v.to_owned());
            }
        };
        if let Some(ip) = e["source_ip"].as_str() {
            r.networks.insert(network(ip));
        }
        put(&mut r.scopes, &e["scope"]);
        put(&mut r.subjects, &e["subject"]);
        put(&mut r.agents, &e["user_agent"]);
    }
    out
}

fn as_recount(bucket: &Value, want: &Recount) -> (BTreeMap<String, i64>, [i64; 4]) {
    let codes: BTreeMap<String, i64> = serde_json::from_value(bucket["codes"].clone()).unwrap();
    let _ = want;
    (
        codes,
        [
            bucket["distinct_networks"].as_i64().unwrap(),
            bucket["distinct_scopes"].as_i64().unwrap(),
            bucket["distinct_subjects"].as_i64().unwrap(),
            bucket["distinct_user_agents"].as_i64().unwrap(),
        ],
    )
}

fn distinct(r: &Recount) -> [i64; 4] {
    [
        r.networks.len() as i64,
        r.scopes.len() as i64,
        r.subjects.len() as i64,
        r.agents.len() as i64,
    ]
}

async fn rollups_match_a_recount_of_the_events(b: Backend) {
    let s = TestServer::start(b).await;
    let seeded = seed(&s).await;
    for id in [&seeded.a, &seeded.b] {
        let events = all_events(&s, id).await;
        for (bucket, secs) in [("hour", 3600), ("day", 86_400)] {
            let want = recount(&events, secs);
            let (st, v) = s
                .get(&format!(
                    "/v1/keys/{id}/usage/stats?bucket={bucket}&{}",
                    window()
                ))
                .await;
            assert_eq!(st, StatusCode::OK, "{v}");
            let buckets = v["buckets"].as_array().unwrap();
            let starts: Vec<&str> = buckets
                .iter()
                .map(|b| b["start"].as_str().unwrap())
                .collect();
            let want_starts: Vec<&str> = want.keys().map(String::as_str).collect();
            assert_eq!(starts, want_starts, "{bucket} buckets of {id}");
            for b in buckets {
                let r = &want[b["start"].as_str().unwrap()];
                let (codes, got) = as_recount(b, r);
                assert_eq!(codes, r.codes, "{bucket} {b}");
                assert_eq!(got, distinct(r), "{bucket} {b}");
                assert_eq!(b["events"].as_i64().unwrap(), r.codes.values().sum::<i64>());
            }
            // The window's total: distinct over the window, not summed over buckets.
            let all = recount(&events, 86_400 * 365);
            let whole = all.values().next().unwrap();
            let (codes, got) = as_recount(&v["total"], whole);
            assert_eq!(codes, whole.codes);
            assert_eq!(got, distinct(whole));
        }
    }
    // Day buckets are the sums of their hours.
    let (_, hours) = s
        .get(&format!(
            "/v1/keys/{}/usage/stats?bucket=hour&{}",
            seeded.a,
            window()
        ))
        .await;
    let (_, days) = s
        .get(&format!(
            "/v1/keys/{}/usage/stats?bucket=day&{}",
            seeded.a,
            window()
        ))
        .await;
    let mut summed: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for h in hours["buckets"].as_array().unwrap() {
        let day = bucket_start(h["start"].as_str().unwrap(), 86_400);
        for (code, n) in h["codes"].as_object().unwrap() {
            *summed
                .entry(day.clone())
                .or_default()
                .entry(code.clone())
                .or_default() += n.as_i64().unwrap();
        }
    }
    let by_day: BTreeMap<String, BTreeMap<String, i64>> = days["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["start"].as_str().unwrap().to_owned(),
                serde_json::from_value(d["codes"].clone()).unwrap(),
            )
        })
        .collect();
    assert_eq!(summed, by_day);
    // The top values: the busiest network of key a is 10.2.1.0/24 (two uses a round).
    let top = &days["top_networks"][0];
    assert_eq!(top["value"], "10.2.1.0/24", "{days}");
    assert_eq!(top["events"], 6);
    assert_eq!(top["valid"], 6);
    assert_eq!(days["top_subjects"][0]["value"], "host-1");
    assert_eq!(days["top_subjects"][0]["events"], 6);
    s.stop().await;
}

fn groups(v: &Value) -> BTreeMap<String, i64> {
    v["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|g| {
            (
                g["group"].as_str().unwrap_or("(none)").to_owned(),
                g["events"].as_i64().unwrap(),
            )
        })
        .collect()
}

async fn stats(s: &TestServer, query: &str) -> BTreeMap<String, i64> {
    let (st, v) = s
        .get(&format!("/v1/usage/stats?{query}&{}", window()))
        .await;
    assert_eq!(st, StatusCode::OK, "{query}: {v}");
    groups(&v)
}

fn map(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

async fn groups_and_filters_total_right(b: Backend) {
    let s = TestServer::start(b).await;
    let Seeded { a, b: bk, unknown } = seed(&s).await;
    // Key a: 12 verifies (9 valid, 3 scope denied) and one wrong secret; key b: 3 valid;
    // an unknown id under its own id; a malformed key under no key.
    assert_eq!(
        stats(&s, "group_by=key").await,
        map(&[(&a, 13), (&bk, 3), (&unknown, 1), ("(none)", 1)]),
    );
    assert_eq!(
        stats(&s, "group_by=owner").await,
        map(&[
            ("alice@example.com", 13),
            ("bob@example.com", 3),
            ("(none)", 2)
        ])
    );
    assert_eq!(
        stats(&s, "group_by=environment").await,
        map(&[("prod", 13), ("staging", 3), ("(none)", 2)])
    );
    assert_eq!(
        stats(&s, "group_by=system").await,
        map(&[("github", 13), ("vault", 16), ("(none)", 2)]),
        "a key counts under each of its systems"
    );
    assert_eq!(
        stats(&s, "group_by=code").await,
        map(&[
            ("VALID", 12),
            ("SCOPE_DENIED", 3),
            ("NOT_FOUND", 2),
            ("MALFORMED", 1)
        ])
    );
    assert_eq!(
        stats(&s, "group_by=network").await,
        map(&[
            ("10.2.1.0/24", 6),
            ("10.2.9.0/24", 3),
            ("2001:db8:0:1::/64", 3),
            ("192.0.2.0/24", 3),
            ("10.2.200.0/24", 1),
            ("203.0.113.0/24", 2),
        ])
    );
    // Filters.
    assert_eq!(
        stats(&s, "group_by=code&environment=staging").await,
        map(&[("VALID", 3)])
    );
    assert_eq!(
        stats(&s, "group_by=key&owner=Alice@Example.com").await,
        map(&[(&a, 13)])
    );
    assert_eq!(
        stats(&s, "group_by=environment&system=vault").await,
        map(&[("prod", 13), ("staging", 3)])
    );
    assert_eq!(
        stats(&s, "group_by=network&code=NOT_FOUND").await,
        map(&[("10.2.200.0/24", 1), ("203.0.113.0/24", 1)]),
        "which networks sent junk"
    );
    assert_eq!(
        stats(&s, "group_by=key&network=10.2.0.0/16").await,
        map(&[(&a, 10)])
    );
    assert_eq!(
        stats(&s, "group_by=code&network=10.2.0.0/16&code=VALID").await,
        map(&[("VALID", 9)])
    );
    // Key groups carry the key's name.
    let (_, v) = s
        .get(&format!(
            "/v1/usage/stats?group_by=key&limit=1&{}",
            window()
        ))
        .await;
    assert_eq!(v["groups"].as_array().unwrap().len(), 1);
    assert_eq!(v["groups"][0]["name"], "alpha");
    assert_eq!(v["groups"][0]["codes"]["VALID"], 9);
    // The CLI shows the same.
    let (code, out, err) = s
        .cli(&[
            "--json",
            "usage",
            "stats",
            "--group-by",
            "code",
            "--since",
            &(START - time::Duration::hours(1)).format(&Rfc3339).unwrap(),
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["groups"][0]["group"], "VALID", "{v}");
    assert_eq!(v["groups"][0]["events"], 12);
    s.stop().await;
}

async fn search_finds_exactly_the_keys_used_from_a_network(b: Backend) {
    let s = TestServer::start(b).await;
    let Seeded { a, b: bk, .. } = seed(&s).await;
    let search = |q: String| {
        let s = &s;
        async move {
            let (st, v) = s.get(&format!("/v1/usage/search?{q}")).await;
            assert_eq!(st, StatusCode::OK, "{q}: {v}");
            v
        }
    };
    let v = search(format!("source=10.2.0.0/16&{}", window())).await;
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{v}");
    let hit = &keys[0];
    assert_eq!(hit["key_id"], a.as_str());
    assert_eq!(hit["name"], "alpha");
    assert_eq!(hit["owner"], "alice@example.com");
    // 3 rounds of three verifies from 10.2/16, and the wrong secret from 10.2.200.1.
    assert_eq!(hit["events"], 10);
    assert_eq!(hit["valid"], 9);
    assert_eq!(hit["first_seen"], START.format(&Rfc3339).unwrap());
    assert_eq!(
        hit["last_seen"],
        (START + time::Duration::minutes(80))
            .format(&Rfc3339)
            .unwrap()
    );
    assert_eq!(hit["networks"][0], "10.2.1.0/24");
    let v = search(format!("source=192.0.2.0/24&{}", window())).await;
    let ids: Vec<&str> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [bk.as_str()]);
    let v = search(format!("source=2001:db8::/32&{}", window())).await;
    assert_eq!(v["keys"][0]["key_id"], a.as_str());
    assert_eq!(v["keys"][0]["events"], 3);
    // Junk from a network: listed without a key.
    let v = search(format!("source=203.0.113.0/24&{}", window())).await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 2, "{v}");
    assert!(v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["name"].is_null()));
    // The window: a week later, the default 7d window no longer holds them.
    s.clock.advance(time::Duration::days(8));
    let v = search("source=10.2.0.0/16".to_owned()).await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 0, "{v}");
    let v = search("source=10.2.0.0/16&since=9d".to_owned()).await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 1, "{v}");
    let (code, out, err) = s
        .cli(&[
            "usage",
            "search",
            "--source",
            "10.2.0.0/16",
            "--since",
            "9d",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&a) && !out.contains(&bk), "{out}");
    s.stop().await;
}

async fn environment_limited_tokens_see_only_their_keys(b: Backend) {
    let s = TestServer::start(b).await;
    let Seeded { a, b: bk, .. } = seed(&s).await;
    let staging = s.token("issuer", Some(vec!["staging"])).await;
    let get = |path: String| {
        let s = &s;
        let staging = staging.clone();
        async move {
            s.call(reqwest::Method::GET, &path, Some(&staging), None)
                .await
        }
    };
    let (st, v) = get(format!("/v1/usage/stats?group_by=key&{}", window())).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        groups(&v),
        map(&[(&bk, 3)]),
        "no other key, no keyless events"
    );
    let (_, v) = get(format!("/v1/usage/stats?group_by=network&{}", window())).await;
    assert_eq!(groups(&v), map(&[("192.0.2.0/24", 3)]));
    let (st, v) = get(format!("/v1/keys/{a}/usage/stats?{}", window())).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let (st, _) = get(format!("/v1/keys/{bk}/usage/stats?{}", window())).await;
    assert_eq!(st, StatusCode::OK);
    let (_, v) = get(format!("/v1/usage/search?source=10.0.0.0/8&{}", window())).await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 0, "{v}");
    let (_, v) = get(format!(
        "/v1/usage/search?source=203.0.113.0/24&{}",
        window()
    ))
    .await;
    assert_eq!(v["keys"].as_array().unwrap().len(), 0, "{v}");
    let verifier = s.token("verifier", None).await;
    let (st, _) = s
        .call(
            reqwest::Method::GET,
            "/v1/usage/stats",
            Some(&verifier),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    s.stop().await;
}

async fn rollups_past_their_retention_are_removed(b: Backend) {
    let s = TestServer::start(b).await;
    let Seeded { a, .. } = seed(&s).await;
    let path = format!("/v1/keys/{a}/usage/stats?{}", window());
    s.clock.advance(time::Duration::days(399));
    let (st, _) = s.post("/v1/enforce", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let (_, v) = s.get(&path).await;
    assert_eq!(v["total"]["events"], 13, "kept for 400 days");
    s.clock.advance(time::Duration::days(2));
    let (st, _) = s.post("/v1/enforce", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let (_, v) = s.get(&path).await;
    assert_eq!(v["total"]["events"], 0, "{v}");
    assert_eq!(v["buckets"].as_array().unwrap().len(), 0);
    s.stop().await;
}

/// Every parameter is checked, and the answer says what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_refused_precisely() {
    let s = TestServer::start(Backend::Sqlite).await;
    let (id, _) = s.create_key(key_body("k")).await;
    let cases = [
        (
            format!("/v1/keys/{id}/usage/stats?since=yesterday"),
            "since must be an RFC 3339 time",
        ),
        (
            format!("/v1/keys/{id}/usage/stats?until=soon"),
            "until must be an RFC 3339 time",
        ),
        (
            format!("/v1/keys/{id}/usage/stats?since=1h&until=2h"),
            "since must be before until",
        ),
        (
            format!("/v1/keys/{id}/usage/stats?bucket=week"),
            "bucket must be hour or day",
        ),
        (
            format!("/v1/keys/{id}/usage/stats?bucket=hour&since=40d"),
            "bucket=hour covers at most 31 days",
        ),
        (
            format!("/v1/keys/{id}/usage/stats?top=3"),
            "unknown field `top`",
        ),
        (
            "/v1/usage/stats?group_by=team".to_owned(),
            "group_by must be one of key, owner, system, environment, network, code",
        ),
        (
            "/v1/usage/stats?code=OK".to_owned(),
            "code must be one of VALID, MALFORMED",
        ),
        (
            "/v1/usage/stats?network=10.2.3.0/28".to_owned(),
            "network 10.2.3.0/28 is narrower than the rollups keep sources",
        ),
        (
            "/v1/usage/stats?network=2001:db8::/96".to_owned(),
            "is narrower than the rollups keep sources",
        ),
        (
            "/v1/usage/stats?network=10.2".to_owned(),
            "network must be a network in CIDR notation",
        ),
        (
            "/v1/usage/stats?environment=".to_owned(),
            "environment must be 1-256 characters",
        ),
        (
            "/v1/usage/stats?limit=0".to_owned(),
            "limit must be between 1 and 1000",
        ),
        ("/v1/usage/search?since=7d".to_owned(), "source is required"),
        (
            "/v1/usage/search?source=10.0.0.1".to_owned(),
            "source must be a network in CIDR notation",
        ),
        (
            "/v1/usage/search?source=10.0.0.0/8&since=-3d".to_owned(),
            "since must be an RFC 3339 time",
        ),
    ];
    for (path, message) in cases {
        let (st, v) = s.get(&path).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path}: {v}");
        let got = v["error"]["message"].as_str().unwrap_or_default();
        assert!(got.contains(message), "{path}: {got}");
    }
    let (st, v) = s.get("/v1/keys/not-an-id/usage/stats").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    s.stop().await;
}

/// `key usage --stats` draws the daily valid uses and lists the top sources and subjects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_usage_stats_on_the_command_line() {
    let s = TestServer::start(Backend::Sqlite).await;
    let Seeded { a, .. } = seed(&s).await;
    let (code, out, err) = s.cli(&["key", "usage", &a, "--stats"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Valid uses a day"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("Valid uses a day, last 30 days"))
        .unwrap();
    let spark: String = line.chars().filter(|c| ('▁'..='█').contains(c)).collect();
    assert_eq!(spark.chars().count(), 30, "{line}");
    assert!(spark.ends_with('█'), "today's uses are the most: {line}");
    assert!(
        out.contains("TOP SOURCES") && out.contains("10.2.1.0/24"),
        "{out}"
    );
    assert!(
        out.contains("TOP SUBJECTS") && out.contains("host-1"),
        "{out}"
    );
    let (code, out, _) = s.cli(&["--json", "key", "usage", &a, "--stats"]).await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"]["codes"]["VALID"], 9);
    s.stop().await;
}

/// A crash before any fold, and one in the middle of a fold: the reopened store (what a
/// restart would do) refolds the log's tail, and every event is in the rollups once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_crash_before_or_during_a_fold_counts_each_event_once_in_rollups() {
    use keywarden_store::rollups::{GroupBy, StatsFilter, Window};
    let s = TestServer::start_with(Backend::Sqlite, |c| {
        c.usage_fold_interval = std::time::Duration::from_secs(3600);
    })
    .await;
    let url = s.config.database_url();
    let Seeded { a, b: bk, .. } = seed(&s).await;
    let window = Window::covering(
        keywarden_core::clock::to_millis(START - time::Duration::hours(1)),
        keywarden_core::clock::to_millis(START + time::Duration::hours(4)),
    );
    let codes = |g: GroupBy| StatsFilter {
        window,
        group_by: g,
        environment: None,
        owner: None,
        system: None,
        code: None,
        network: None,
        environments: None,
    };
    // seed() read the rollups through the server, which folded everything so far. A
    // tail of events after that stays in the log and the server's overlay only: a key
    // whose id sorts first (so the crashed fold below takes it), a, b and junk.
    let first = keywarden_core::key_format::assemble(
        "kw",
        "prod",
        keywarden_core::KeyId::parse("0000000000000000").unwrap(),
        &"0".repeat(keywarden_core::key_format::SECRET_LEN),
    );
    let secrets = {
        // The seeded keys' secrets are not kept; new keys of the same owners instead.
        let (c_id, c) = s.create_key(key_body("gamma")).await;
        (c_id, c)
    };
    let before = s.state().store.count_usage().await.unwrap();
    for body in [
        json!({"key": first.plain.expose(), "source_ip": "198.51.100.1"}),
        json!({"key": secrets.1, "scope": "deploy:write", "source_ip": "10.2.1.9"}),
        json!({"key": secrets.1, "scope": "deploy:write", "source_ip": "10.2.1.9"}),
        json!({"key": "kw_prod_junk", "source_ip": "198.51.100.2"}),
    ] {
        verify_with(&s, body, "tail").await;
    }
    let store = s.state().store.clone();
    crate::harness::eventually(
        crate::harness::WAIT,
        "the tail stored in the log",
        || async { store.count_usage().await.unwrap() >= before + 4 },
    )
    .await;
    assert_eq!(store.unfolded_keys(), 2, "the tail is not folded");

    let (a, bk, c) = (a.clone(), bk.clone(), secrets.0.clone());
    let check = |store: keywarden_store::Store| {
        let (a, bk, c) = (a.clone(), bk.clone(), c.clone());
        let (by_key, by_code) = (codes(GroupBy::Key), codes(GroupBy::Code));
        async move {
            let totals = |groups: Vec<keywarden_store::rollups::StatsGroup>| {
                groups
                    .into_iter()
                    .map(|g| (g.group.unwrap_or_else(|| "(none)".to_owned()), g.events))
                    .collect::<BTreeMap<_, _>>()
            };
            let got = totals(store.usage_stats(&by_key, 100).await.unwrap());
            assert_eq!(got.get(&a), Some(&13), "{got:?}");
            assert_eq!(got.get(&bk), Some(&3), "{got:?}");
            assert_eq!(got.get(&c), Some(&2), "{got:?}");
            assert_eq!(got.get("0000000000000000"), Some(&1), "{got:?}");
            assert_eq!(got.get("(none)"), Some(&2), "{got:?}");
            let got = totals(store.usage_stats(&by_code, 100).await.unwrap());
            assert_eq!(
                got,
                map(&[
                    ("VALID", 14),
                    ("SCOPE_DENIED", 3),
                    ("NOT_FOUND", 3),
                    ("MALFORMED", 2)
                ])
            );
            let id = keywarden_core::KeyId::parse(&c).unwrap();
            let r = store.key_rollups(&id, window, 3_600_000, 10).await.unwrap();
            assert_eq!(r.total.events(), 2);
            let nets: Vec<(&str, i64)> = r
                .top
                .iter()
                .filter(|t| t.kind == keywarden_store::ValueKind::Network)
                .map(|t| (t.value.as_str(), t.events))
                .collect();
            assert_eq!(nets, [("10.2.1.0/24", 2)]);
            store
        }
    };
    // Crash before any fold of the tail, then in the middle of one: the reopened store
    // folds one key of the two and stops before the step that writes the keyless events
    // and moves folded_seq.
    let reopened = keywarden_store::Store::connect(&url).await.unwrap();
    assert_eq!(reopened.unfolded_keys(), 2);
    assert!(!reopened.fold_usage_step(1).await.unwrap());
    let again = check(keywarden_store::Store::connect(&url).await.unwrap()).await;
    // And once everything is folded, nothing is counted again on the next start.
    let last = check(keywarden_store::Store::connect(&url).await.unwrap()).await;
    assert_eq!(last.unfolded_keys(), 0);
    for st in [reopened, again, last] {
        st.close().await;
    }
    s.stop().await;
}
