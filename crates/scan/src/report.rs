//! Machine output: JSON and SARIF 2.1.0 (for code-scanning UIs).

use serde_json::{json, Value};

use crate::finding::Finding;
use crate::rules::Severity;

fn with_secret(f: &Finding, show: bool) -> Value {
    let mut v = serde_json::to_value(f).unwrap_or(Value::Null);
    if show {
        v["secret"] = json!(f.secret);
    }
    v
}

pub fn json(findings: &[Finding], show_secrets: bool) -> Value {
    json!({
        "findings": findings.iter().map(|f| with_secret(f, show_secrets)).collect::<Vec<_>>(),
        "count": findings.len(),
    })
}

fn level(s: Severity) -> &'static str {
    match s {
        Severity::Critical | Severity::High => "error",
        Severity::Medium => "warning",
        Severity::Low => "note",
    }
}

/// SARIF 2.1.0: one run, the rules that fired, one result per finding with a partial
/// fingerprint so that code-scanning UIs track it across commits.
pub fn sarif(findings: &[Finding]) -> Value {
    let mut ids: Vec<&str> = findings.iter().map(|f| f.rule.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let rules: Vec<Value> = ids
        .iter()
        .map(|id| {
            let (desc, sev) = findings
                .iter()
                .find(|f| f.rule == *id)
                .map(|f| (f.description.clone(), f.severity))
                .unwrap_or_default();
            json!({
                "id": id,
                "shortDescription": { "text": desc },
                "defaultConfiguration": { "level": level(sev) },
                "properties": { "severity": sev.as_str(), "tags": ["security", "secret"] },
            })
        })
        .collect();
    let results: Vec<Value> = findings
        .iter()
        .map(|f| {
            let mut region = json!({});
            if f.line > 0 {
                region = json!({ "startLine": f.line, "startColumn": f.column.max(1) });
            }
            json!({
                "ruleId": f.rule,
                "ruleIndex": ids.iter().position(|i| *i == f.rule).unwrap_or(0),
                "level": level(f.severity),
                "message": { "text": format!("{} ({}) at {}", f.description, f.redacted, f.location) },
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": { "uri": f.location.artifact() },
                        "region": region,
                    }
                }],
                "partialFingerprints": { "keywarden/v1": f.fingerprint },
            })
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": { "driver": {
                "name": "keywarden",
                "informationUri": "https://github.com/keywarden/keywarden",
                "version": env!("CARGO_PKG_VERSION"),
                "rules": rules,
            }},
            "results": results,
        }],
    })
}
