//! Baselines: findings recorded once (`--write-baseline`) and ignored after
//! (`--baseline`). Matched by rule and fingerprint, so a secret already known stays
//! quiet when its file moves; the secret itself is never written.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::finding::Finding;
use crate::ScanError;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    findings: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    rule: String,
    fingerprint: String,
    /// Where it was when recorded (informational).
    location: String,
    line: usize,
}

#[derive(Debug, Default)]
pub struct Baseline {
    known: HashSet<(String, String)>,
}

impl Baseline {
    pub fn load(path: &Path) -> Result<Self, ScanError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScanError::Baseline(format!("cannot read {}: {e}", path.display())))?;
        let file: File = serde_json::from_str(&text)
            .map_err(|e| ScanError::Baseline(format!("{}: {e}", path.display())))?;
        if file.version != 1 {
            return Err(ScanError::Baseline(format!(
                "{}: version {} is not supported (expected 1)",
                path.display(),
                file.version
            )));
        }
        Ok(Self {
            known: file
                .findings
                .into_iter()
                .map(|e| (e.rule, e.fingerprint))
                .collect(),
        })
    }

    pub fn contains(&self, f: &Finding) -> bool {
        self.known
            .contains(&(f.rule.clone(), f.fingerprint.clone()))
    }

    pub fn write(path: &Path, findings: &[Finding]) -> Result<(), ScanError> {
        let file = File {
            version: 1,
            findings: findings
                .iter()
                .map(|f| Entry {
                    rule: f.rule.clone(),
                    fingerprint: f.fingerprint.clone(),
                    location: f.location.to_string(),
                    line: f.line,
                })
                .collect(),
        };
        let text =
            serde_json::to_string_pretty(&file).map_err(|e| ScanError::Baseline(e.to_string()))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| ScanError::Baseline(format!("cannot write {}: {e}", path.display())))
    }
}
