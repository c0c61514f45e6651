//! Rules: a TOML data file users can extend. The defaults ship in `rules/default.toml`.

use regex::bytes::Regex;
use serde::Deserialize;

use crate::ScanError;

pub const DEFAULT_RULES: &str = include_str!("../rules/default.toml");

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    #[default]
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "low" => Self::Low,
            "medium" => Self::Medium,
            "high" => Self::High,
            "critical" => Self::Critical,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub description: String,
    pub severity: Severity,
    pub regex: Regex,
    /// The capture group holding the secret.
    pub group: usize,
    /// Lower-case; at least one must occur for the regex to run.
    pub keywords: Vec<String>,
    /// Minimum Shannon entropy (bits per character) of the secret.
    pub entropy: Option<f64>,
    pub positive: Vec<String>,
    pub negative: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<FileRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    id: String,
    description: String,
    severity: String,
    regex: String,
    #[serde(default = "one")]
    group: usize,
    keywords: Vec<String>,
    entropy: Option<f64>,
    #[serde(default)]
    positive: Vec<String>,
    #[serde(default)]
    negative: Vec<String>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
}

impl RuleSet {
    /// The rules that ship with keywarden.
    pub fn defaults() -> Result<Self, ScanError> {
        Self::parse(DEFAULT_RULES, "default rules")
    }

    /// Parses a rules file; every problem is reported, each naming its rule.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ScanError> {
        let file: File = toml::from_str(text)
            .map_err(|e| ScanError::Rules(format!("{origin}: {}", e.message())))?;
        let mut problems = Vec::new();
        let mut rules = Vec::new();
        for r in file.rule {
            let at = format!("{origin}: rule {:?}", r.id);
            let valid_id = !r.id.is_empty()
                && r.id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid_id {
                problems.push(format!("{at}: ids are lower-case letters, digits and -"));
            }
            let severity = Severity::parse(&r.severity).unwrap_or_else(|| {
                problems.push(format!(
                    "{at}: severity must be low, medium, high or critical"
                ));
                Severity::Medium
            });
            if r.keywords.is_empty() || r.keywords.iter().any(|k| k.trim().is_empty()) {
                problems.push(format!("{at}: at least one keyword, none empty"));
            }
            let regex = match Regex::new(&r.regex) {
                Ok(re) => {
                    if r.group == 0 || r.group >= re.captures_len() {
                        problems.push(format!(
                            "{at}: group {} does not exist (the regex has {})",
                            r.group,
                            re.captures_len() - 1
                        ));
                    }
                    re
                }
                Err(e) => {
                    problems.push(format!("{at}: regex: {e}"));
                    continue;
                }
            };
            rules.push(Rule {
                id: r.id,
                description: r.description,
                severity,
                regex,
                group: r.group,
                keywords: r.keywords.iter().map(|k| k.to_ascii_lowercase()).collect(),
                entropy: r.entropy,
                positive: r.positive,
                negative: r.negative,
            });
        }
        if problems.is_empty() {
            Ok(Self { rules })
        } else {
            Err(ScanError::Rules(problems.join("\n")))
        }
    }

    /// Adds `other`'s rules; one with an id already here replaces it.
    pub fn extend(&mut self, other: RuleSet) {
        for r in other.rules {
            match self.rules.iter_mut().find(|x| x.id == r.id) {
                Some(x) => *x = r,
                None => self.rules.push(r),
            }
        }
    }
}
