//! What each key's valid uses normally look like, learned as they happen, and the
//! alerts for what is not normal: RATE_SPIKE (a minute well above the key's usual rate
//! and above a floor), NEW_SOURCE (a source network never seen for the key) and
//! NEW_SUBJECT (a subject never seen for the key).
//!
//! The usage writer hands every batch's valid uses here (off the verify path, one
//! message per batch). A key learns quietly for the warm-up (the policy's
//! `alert_warmup`): a new key's first networks and subjects, and its rate, are its
//! normal. Learned state lives in memory. A key this node sees for the first time but
//! that is older than its warm-up starts from its usage rollups (the networks and
//! subjects of its valid uses over the last 30 days, `Store::known_sources`), so a
//! restart neither hides a new source nor raises a false one; its rate is learned
//! again, and RATE_SPIKE needs one minute of it.

use std::collections::{HashMap, HashSet};

use ipnet::IpNet;
use keywarden_core::policy::WatchRules;
use keywarden_core::KeyId;
use serde_json::json;
use time::OffsetDateTime;

/// One valid use, as the writer reports it.
#[derive(Debug, Clone)]
pub struct Use {
    pub key_id: KeyId,
    pub time: OffsetDateTime,
    pub source_ip: Option<std::net::IpAddr>,
    pub subject: Option<String>,
}

impl Use {
    /// The valid uses of a batch of usage events.
    pub fn of(events: &[keywarden_core::model::UsageEvent]) -> Vec<Use> {
        events
            .iter()
            .filter(|e| e.code == keywarden_core::VerifyCode::Valid)
            .filter_map(|e| {
                Some(Use {
                    key_id: e.key_id.clone()?,
                    time: e.time,
                    source_ip: e.source_ip,
                    subject: e.subject.clone(),
                })
            })
            .collect()
    }
}

/// Keys followed at most; past it, keys unused for a day are forgotten first.
const MAX_KEYS: usize = 500_000;
/// Networks and subjects remembered per key at most: a key used from more is not
/// one whose sources can be told apart, and its new ones are not alerted on.
const MAX_PLACES_PER_KEY: usize = 1024;
/// The baseline's memory: each completed minute weighs 1/60 (about an hour).
const ALPHA: f64 = 1.0 / 60.0;

struct Learned {
    since: OffsetDateTime,
    last_use: OffsetDateTime,
    minute: i64,
    in_minute: u64,
    /// Uses per minute, an exponentially weighted mean of completed minutes; `None`
    /// until one minute completed.
    baseline: Option<f64>,
    networks: HashSet<IpNet>,
    subjects: HashSet<String>,
}

/// An unusual use: the alert kind, the network or subject it is about, and its numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Unusual {
    pub kind: &'static str,
    pub severity: &'static str,
    /// What makes repeats of it one alert, besides the key.
    pub about: String,
    pub evidence: serde_json::Value,
}

pub const RATE_SPIKE: &str = "RATE_SPIKE";
pub const NEW_SOURCE: &str = "NEW_SOURCE";
pub const NEW_SUBJECT: &str = "NEW_SUBJECT";

#[derive(Default)]
pub struct Behaviour {
    keys: HashMap<KeyId, Learned>,
}

impl Behaviour {
    /// Learns from one use and says what about it is unusual under `rules`.
    pub fn observe(&mut self, u: &Use, rules: &WatchRules) -> Vec<Unusual> {
        if self.keys.len() >= MAX_KEYS && !self.keys.contains_key(&u.key_id) {
            self.forget_idle(u.time);
            if self.keys.len() >= MAX_KEYS {
                return Vec::new();
            }
        }
        let minute = u.time.unix_timestamp().div_euclid(60);
        let k = self
            .keys
            .entry(u.key_id.clone())
            .or_insert_with(|| Learned {
                since: u.time,
                last_use: u.time,
                minute,
                in_minute: 0,
                baseline: None,
                networks: HashSet::new(),
                subjects: HashSet::new(),
            });
        k.last_use = k.last_use.max(u.time);
        if minute > k.minute {
            // Close the minute, and the quiet ones since, into the baseline.
            let closed = k.in_minute as f64;
            let mut b = k.baseline.map_or(closed, |b| b + ALPHA * (closed - b));
            let quiet = (minute - k.minute - 1).min(24 * 60);
            b *= (1.0 - ALPHA).powi(i32::try_from(quiet).unwrap_or(i32::MAX));
            k.baseline = Some(b);
            k.minute = minute;
            k.in_minute = 0;
        }
        if minute == k.minute {
            k.in_minute += 1;
        }
        let warm = u.time - k.since >= rules.warmup;
        let mut out = Vec::new();
        if let Some(net) = u.source_ip.map(crate::alerts::source_network) {
            let new = !k.networks.contains(&net) && k.networks.len() < MAX_PLACES_PER_KEY;
            if new {
                k.networks.insert(net);
                if warm {
                    out.push(Unusual {
                        kind: NEW_SOURCE,
                        severity: "medium",
                        about: format!("net:{net}"),
                        evidence: json!({
                            "network": net.to_string(),
                            "known_networks": k.networks.len() - 1,
                            "learning_since": k.since.unix_timestamp(),
                        }),
                    });
                }
            }
        }
        if let Some(subject) = &u.subject {
            if !k.subjects.contains(subject) && k.subjects.len() < MAX_PLACES_PER_KEY {
                k.subjects.insert(subject.clone());
                if warm {
                    out.push(Unusual {
                        kind: NEW_SUBJECT,
                        severity: "low",
                        about: "subject".to_owned(),
                        evidence: json!({
                            "subject": subject,
                            "known_subjects": k.subjects.len() - 1,
                        }),
                    });
                }
            }
        }
        if let (true, Some(baseline)) = (warm, k.baseline) {
            let floor = f64::from(rules.spike_floor);
            let threshold = (baseline * f64::from(rules.spike_factor)).max(floor);
            if k.in_minute as f64 > threshold {
                out.push(Unusual {
                    kind: RATE_SPIKE,
                    severity: "high",
                    about: "rate".to_owned(),
                    evidence: json!({
                        "uses_this_minute": k.in_minute,
                        "baseline_per_minute": (baseline * 100.0).round() / 100.0,
                        "factor": rules.spike_factor,
                        "floor_per_minute": rules.spike_floor,
                    }),
                });
            }
        }
        out
    }

    pub fn knows(&self, key: &KeyId) -> bool {
        self.keys.contains_key(key)
    }

    /// Starts a key from what it is known to have used: learning since `since` (its
    /// creation), with these networks and subjects already seen.
    pub fn seed(
        &mut self,
        key: &KeyId,
        since: OffsetDateTime,
        now: OffsetDateTime,
        networks: impl IntoIterator<Item = IpNet>,
        subjects: impl IntoIterator<Item = String>,
    ) {
        let learned = Learned {
            since,
            last_use: now,
            minute: now.unix_timestamp().div_euclid(60),
            in_minute: 0,
            baseline: None,
            networks: networks.into_iter().take(MAX_PLACES_PER_KEY).collect(),
            subjects: subjects.into_iter().take(MAX_PLACES_PER_KEY).collect(),
        };
        self.keys.insert(key.clone(), learned);
    }

    /// Forgets keys unused for a day.
    pub fn forget_idle(&mut self, now: OffsetDateTime) {
        self.keys
            .retain(|_, k| now - k.last_use < time::Duration::days(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn rules() -> WatchRules {
        WatchRules {
            warmup: time::Duration::hours(1),
            ..WatchRules::default()
        }
    }

    fn at(minutes: i64) -> OffsetDateTime {
        datetime!(2026-06-01 12:00 UTC) + time::Duration::minutes(minutes)
    }

    fn use_of(key: &KeyId, t: OffsetDateTime, net: &str) -> Use {
        let net: IpNet = net.parse().unwrap();
        Use {
            key_id: key.clone(),
            time: t,
            source_ip: Some(net.addr()),
            subject: None,
        }
    }

    fn kinds(v: &[Unusual]) -> Vec<&'static str> {
        v.iter().map(|u| u.kind).collect()
    }

    #[test]
    fn a_burst_well_above_the_baseline_is_a_spike() {
        let key = KeyId::parse("AAAAAAAAAAAAAAAA").unwrap();
        let mut b = Behaviour::default();
        // Two hours at 20 a minute: past the warm-up, the baseline is about 20.
        for m in 0..120 {
            for _ in 0..20 {
                assert_eq!(
                    kinds(&b.observe(&use_of(&key, at(m), "10.0.0.0/24"), &rules())),
                    Vec::<&str>::new()
                );
            }
        }
        // 10x: the 201st use of the minute is the first above the threshold.
        let mut first = None;
        for i in 1..=250 {
            let out = b.observe(&use_of(&key, at(120), "10.0.0.0/24"), &rules());
            if first.is_none() && kinds(&out) == [RATE_SPIKE] {
                first = Some(i);
            }
        }
        assert_eq!(first, Some(201));
    }

    #[test]
    fn new_networks_alert_after_the_warmup_only() {
        let key = KeyId::parse("BBBBBBBBBBBBBBBB").unwrap();
        let mut b = Behaviour::default();
        assert!(b
            .observe(&use_of(&key, at(0), "10.0.0.0/24"), &rules())
            .is_empty());
        assert!(
            b.observe(&use_of(&key, at(30), "10.0.1.0/24"), &rules())
                .is_empty(),
            "learning"
        );
        let out = b.observe(&use_of(&key, at(61), "192.0.2.0/24"), &rules());
        assert_eq!(kinds(&out), [NEW_SOURCE]);
        assert_eq!(out[0].evidence["known_networks"], 2);
        assert!(b
            .observe(&use_of(&key, at(62), "10.0.1.0/24"), &rules())
            .is_empty());
        // A quiet key's floor: a few uses a minute never spike.
        assert!(b
            .observe(&use_of(&key, at(62), "10.0.0.0/24"), &rules())
            .is_empty());
    }
}
