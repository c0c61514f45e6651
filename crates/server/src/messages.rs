//! Key events as messages for people: what happened, to which key, whose it is, and what
//! to do. Shaped for a Slack-compatible incoming webhook (`{"text": ...}`, which Slack,
//! Mattermost, Rocket.Chat and Teams' Slack-compatible connectors all take) and, as
//! plain text, for e-mail. Built from the same event body machines get
//! (`dispatch::event_body`), so people and machines are told the same thing.
//!
//! No secret is ever in an event, so none can be in a message.

use serde_json::{json, Value};

/// A message for people about one key event: a subject line and a body.
pub struct Message {
    pub subject: String,
    pub body: String,
}

/// The message for the Standard Webhooks body of a key event.
pub fn for_event(event: &Value) -> Message {
    let data = &event["data"];
    let kind = event["type"].as_str().unwrap_or("key.event");
    let key_id = data["key_id"].as_str().unwrap_or("?");
    let key = &data["key"];
    let name = key["name"].as_str().unwrap_or("(unknown key)");
    let owner = key["owner"].as_str().unwrap_or("no owner");
    let environment = key["environment"].as_str().unwrap_or("?");
    let reason = data["reason"].as_str().unwrap_or("");
    let details = &data["details"];
    let alert = details["alert"].as_str();
    let what = match (kind, alert) {
        ("key.alert" | "key.still_in_use", Some(alert)) => {
            let severity = details["severity"].as_str().unwrap_or("?");
            let from = details["source_ip"].as_str().unwrap_or("an unknown source");
            format!("{alert} ({severity}) from {from}")
        }
        ("key.revoked", _) => "revoked".to_owned(),
        ("key.suspended", _) => "suspended".to_owned(),
        ("key.resumed", _) => "resumed".to_owned(),
        ("key.rotated", _) => "rotated".to_owned(),
        ("key.expired", _) => "expired".to_owned(),
        ("key.created", _) => "created".to_owned(),
        ("key.expiry_notice", _) => "expiring soon".to_owned(),
        ("key.rotation_overdue", _) => "overdue for rotation".to_owned(),
        ("key.policy_violation", _) => "breaking the policy".to_owned(),
        (other, _) => other.trim_start_matches("key.").replace('_', " "),
    };
    let todo = advice(kind, alert);
    if kind.starts_with("source.") {
        return for_source(alert.unwrap_or("alert"), details, todo);
    }
    let subject = format!("keywarden: key {name} ({environment}) {what}");
    let mut body = format!("Key {name} ({key_id}) in {environment}, owned by {owner}: {what}.\n");
    if !reason.is_empty() {
        body.push_str(&format!("Reason: {reason}\n"));
    }
    if !details["evidence"].is_null() && details["evidence"] != json!({}) {
        body.push_str(&format!("Evidence: {}\n", details["evidence"]));
    }
    body.push_str(&format!("What to do: {todo}\n"));
    body.push_str(&format!(
        "Details: keywarden key show {key_id}; keywarden alert list --key {key_id}\n"
    ));
    Message { subject, body }
}

/// An alert on a source network (BRUTE_FORCE): it names no key and no owner; the
/// people told are the security contact (`serve --smtp-security-to`) or a channel.
fn for_source(alert: &str, details: &Value, todo: &str) -> Message {
    let severity = details["severity"].as_str().unwrap_or("?");
    let from = details["source_ip"].as_str().unwrap_or("an unknown source");
    let subject = format!("keywarden: {alert} ({severity}) from {from}");
    let mut body = format!("Source {from}: {alert} ({severity}), no single key named.\n");
    if !details["evidence"].is_null() && details["evidence"] != json!({}) {
        body.push_str(&format!("Evidence: {}\n", details["evidence"]));
    }
    body.push_str(&format!("What to do: {todo}\n"));
    body.push_str(&format!("Details: keywarden alert list --kind {alert}\n"));
    Message { subject, body }
}

/// What the owner or the on-call person should do next.
fn advice(kind: &str, alert: Option<&str>) -> &'static str {
    match (kind, alert) {
        (_, Some("CANARY_USED")) => {
            "someone read where this canary was planted and tried it: find who, and rotate \
             every real secret stored alongside it"
        }
        (_, Some("SECRET_GUESSING" | "BRUTE_FORCE")) => {
            "someone is guessing secrets: check the sources in the evidence, block them at \
             the edge, and rotate the key if it may have leaked"
        }
        (_, Some("KEY_STILL_IN_USE")) => {
            "a dead key is still configured somewhere: find the source and give it the \
             successor key"
        }
        (_, Some("RATE_SPIKE" | "NEW_SOURCE" | "NEW_SUBJECT")) => {
            "if this use is not expected, suspend the key (keywarden key suspend ID) and \
             rotate it; if it is, acknowledge the alert"
        }
        (_, Some(_)) => "check who presented the key and why; acknowledge or resolve the alert",
        ("key.revoked" | "key.suspended", _) => {
            "make sure every system that used this key has been given its replacement"
        }
        ("key.rotated", _) => "deploy the successor before the old key's grace ends",
        ("key.expiry_notice" | "key.rotation_overdue", _) => {
            "rotate the key (keywarden key rotate ID) and deploy the successor"
        }
        ("key.policy_violation", _) => "bring the key within the policy, or rotate it",
        _ => "nothing, unless this change was not expected",
    }
}

/// A Slack-compatible incoming webhook body.
pub fn slack(event: &Value) -> Value {
    let m = for_event(event);
    json!({ "text": format!("*{}*\n{}", m.subject, m.body) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alert_names_the_key_the_owner_what_and_what_to_do() {
        let event = json!({
            "type": "key.alert",
            "data": {
                "key_id": "AAAAAAAAAAAAAAAA",
                "reason": "SECRET_GUESSING (high)",
                "details": {
                    "alert": "SECRET_GUESSING", "severity": "high",
                    "source_ip": "203.0.113.9", "evidence": {"events": 11}
                },
                "key": {"name": "ci-deploy", "owner": "alice@example.com", "environment": "prod"}
            }
        });
        let m = for_event(&event);
        assert_eq!(
            m.subject,
            "keywarden: key ci-deploy (prod) SECRET_GUESSING (high) from 203.0.113.9"
        );
        assert!(m.body.contains("owned by alice@example.com"), "{}", m.body);
        assert!(m.body.contains("Evidence: {\"events\":11}"), "{}", m.body);
        assert!(
            m.body.contains("What to do: someone is guessing"),
            "{}",
            m.body
        );
        let s = slack(&event);
        assert!(s["text"]
            .as_str()
            .unwrap()
            .starts_with("*keywarden: key ci-deploy"));
    }

    #[test]
    fn a_source_alert_names_the_source_and_no_key() {
        let event = json!({
            "type": "source.alert",
            "data": {
                "key_id": null,
                "reason": "BRUTE_FORCE (medium)",
                "details": {
                    "alert": "BRUTE_FORCE", "severity": "medium",
                    "source_ip": "198.51.100.7", "evidence": {"events": 51}
                },
                "key": null
            }
        });
        let m = for_event(&event);
        assert_eq!(
            m.subject,
            "keywarden: BRUTE_FORCE (medium) from 198.51.100.7"
        );
        assert!(m.body.contains("no single key named"), "{}", m.body);
        assert!(
            m.body.contains("keywarden alert list --kind BRUTE_FORCE"),
            "{}",
            m.body
        );
        assert!(!m.body.contains("unknown key"), "{}", m.body);
    }
}
