//! The detector: one multi-pattern pass for keywords, then only the rules whose keywords
//! occurred, then filters (entropy, placeholders, inline `keywarden:allow`).

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use keywarden_core::key_format;
use regex::bytes::Regex;

use crate::rules::{Rule, RuleSet, Severity};
use crate::ScanError;

/// The rule id of keywarden's own keys, found by format and validated by checksum.
pub const OWN_RULE: &str = "keywarden-key";
/// A comment on the line of a finding that suppresses it.
pub const ALLOW_MARKER: &[u8] = b"keywarden:allow";

/// One of our keys, as far as can be told offline.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OwnKey {
    pub id: String,
    pub environment: String,
    /// A keywarden admin token rather than a key.
    pub admin_token: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    /// Index into [`Detector::rule`]; `None` for keywarden's own keys.
    pub rule: Option<usize>,
    pub secret: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in bytes.
    pub column: usize,
    pub own: Option<OwnKey>,
}

/// A secret's bytes in the scanned data: (start, end, rule, secret, own key).
type Span = (usize, usize, Option<usize>, String, Option<OwnKey>);

pub struct Detector {
    rules: Vec<Rule>,
    keywords: AhoCorasick,
    /// Keyword pattern index → rules (`usize::MAX`: our own keys).
    keyword_rules: Vec<Vec<usize>>,
    own: Regex,
    prefix: String,
}

const OWN: usize = usize::MAX;

impl Detector {
    pub fn new(rules: RuleSet, prefix: &str) -> Result<Self, ScanError> {
        key_format::validate_prefix(prefix).map_err(|e| ScanError::Rules(e.to_string()))?;
        let mut patterns: Vec<String> = Vec::new();
        let mut keyword_rules: Vec<Vec<usize>> = Vec::new();
        let mut add = |kw: &str, rule: usize| match patterns.iter().position(|p| p == kw) {
            Some(i) => keyword_rules[i].push(rule),
            None => {
                patterns.push(kw.to_owned());
                keyword_rules.push(vec![rule]);
            }
        };
        for (i, r) in rules.rules.iter().enumerate() {
            for k in &r.keywords {
                add(k, i);
            }
        }
        add(&format!("{prefix}_"), OWN);
        let keywords = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::Standard)
            .build(&patterns)
            .map_err(|e| ScanError::Rules(e.to_string()))?;
        let own = Regex::new(&format!(
            r"\b({prefix}_[a-z0-9](?:[a-z0-9-]{{0,14}}[a-z0-9])?_[0-9A-Za-z]{{16}}_[0-9A-Za-z]{{38}})\b"
        ))
        .map_err(|e| ScanError::Rules(e.to_string()))?;
        Ok(Self {
            rules: rules.rules,
            keywords,
            keyword_rules,
            own,
            prefix: prefix.to_owned(),
        })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// (id, description, severity) of a match's rule.
    pub fn describe(&self, rule: Option<usize>) -> (&str, &str, Severity) {
        match rule.and_then(|i| self.rules.get(i)) {
            Some(r) => (&r.id, &r.description, r.severity),
            None => (
                OWN_RULE,
                "keywarden key (format and checksum valid)",
                Severity::Critical,
            ),
        }
    }

    /// Every secret in `data`.
    pub fn scan(&self, data: &[u8]) -> Vec<Match> {
        let mut wanted = vec![false; self.rules.len()];
        let mut own = false;
        let mut any = false;
        for m in self.keywords.find_overlapping_iter(data) {
            for &r in &self.keyword_rules[m.pattern().as_usize()] {
                if r == OWN {
                    own = true;
                } else {
                    wanted[r] = true;
                }
                any = true;
            }
        }
        if !any {
            return Vec::new();
        }
        let mut spans: Vec<Span> = Vec::new();
        if own {
            for m in self.own.find_iter(data) {
                let Ok(text) = std::str::from_utf8(m.as_bytes()) else {
                    continue;
                };
                if let Ok(parsed) = key_format::parse(text, &self.prefix) {
                    spans.push((
                        m.start(),
                        m.end(),
                        None,
                        text.to_owned(),
                        Some(OwnKey {
                            id: parsed.id.to_string(),
                            admin_token: parsed.environment == key_format::ADMIN_ENV,
                            environment: parsed.environment,
                        }),
                    ));
                }
            }
        }
        for (i, rule) in self.rules.iter().enumerate().filter(|(i, _)| wanted[*i]) {
            for caps in rule.regex.captures_iter(data) {
                let Some(g) = caps.get(rule.group) else {
                    continue;
                };
                let secret = String::from_utf8_lossy(g.as_bytes()).into_owned();
                // Rules judged by entropy guess from a name; a path there is a place or
                // a reference. (Format rules keep them: base64 may start with `/`.)
                if rule
                    .entropy
                    .is_some_and(|min| entropy(secret.as_bytes()) < min || is_file_path(&secret))
                    || is_placeholder(&secret)
                {
                    continue;
                }
                spans.push((g.start(), g.end(), Some(i), secret, None));
            }
        }
        // One secret, one finding: a specific rule (or our own format) wins over a
        // generic one on the same bytes.
        let generic = |r: Option<usize>| {
            r.and_then(|i| self.rules.get(i))
                .is_some_and(|r| r.id.starts_with("generic-"))
        };
        let specific: Vec<(usize, usize)> = spans
            .iter()
            .filter(|s| !generic(s.2))
            .map(|s| (s.0, s.1))
            .collect();
        spans.retain(|s| !generic(s.2) || !specific.iter().any(|&(a, b)| a < s.1 && s.0 < b));
        spans.sort_by_key(|s| (s.0, s.2));
        spans.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1 && a.2 == b.2);
        let lines = LineIndex::new(data);
        spans
            .into_iter()
            .filter_map(|(start, _, rule, secret, own)| {
                let (line, column, text) = lines.locate(start);
                if memchr::memmem::find(text, ALLOW_MARKER).is_some() {
                    return None;
                }
                Some(Match {
                    rule,
                    secret,
                    line,
                    column,
                    own,
                })
            })
            .collect()
    }
}

/// Line starts, found only for files that have findings.
struct LineIndex<'a> {
    data: &'a [u8],
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(data: &'a [u8]) -> Self {
        let mut starts = vec![0];
        starts.extend(memchr::memchr_iter(b'\n', data).map(|i| i + 1));
        Self { data, starts }
    }

    /// (line, column, the line's bytes) of a byte offset.
    fn locate(&self, at: usize) -> (usize, usize, &'a [u8]) {
        let i = self.starts.partition_point(|&s| s <= at).saturating_sub(1);
        let start = self.starts[i];
        let end = self.starts.get(i + 1).copied().unwrap_or(self.data.len());
        (i + 1, at - start + 1, &self.data[start..end])
    }
}

/// Shannon entropy in bits per byte.
pub fn entropy(s: &[u8]) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in s {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// An absolute file path (`PWD=/home/ci/build/app`, `password_file: /run/secrets/db`):
/// a place, or a reference to where a secret is kept, not a secret. Segments of
/// letters, digits, `.`, `_` and `-` under a leading `/` or `~/`, at least two of them,
/// one a lower-case word of three letters or more (`home`, `run`, `etc`): base64 that
/// happens to start with `/` has none.
fn is_file_path(s: &str) -> bool {
    let rest = s
        .strip_prefix("~/")
        .or_else(|| s.strip_prefix('/'))
        .unwrap_or("");
    let segments: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    segments.len() >= 2
        && segments.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        && segments
            .iter()
            .any(|p| p.len() >= 3 && p.bytes().all(|b| b.is_ascii_lowercase()))
}

/// Examples, templates and references that look like secrets but are not.
pub fn is_placeholder(secret: &str) -> bool {
    let l = secret.to_ascii_lowercase();
    const MARKERS: [&str; 24] = [
        "example",
        "xxxx",
        "your",
        "placeholder",
        "changeme",
        "change_me",
        "change-me",
        "dummy",
        "redacted",
        "sample",
        "<",
        ">",
        "${",
        "$(",
        "{{",
        "%(",
        "...",
        "****",
        "insert",
        "replace",
        "todo",
        "fixme",
        "os.environ",
        "process.env",
    ];
    if MARKERS.iter().any(|m| l.contains(m)) {
        return true;
    }
    if l.starts_with('$') || l.starts_with('%') || l == "password" || l == "secret" {
        return true;
    }
    let mut distinct: Vec<u8> = l.bytes().collect();
    distinct.sort_unstable();
    distinct.dedup();
    distinct.len() <= 3 || l.contains("123456789") || l.contains("abcdefgh")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_finds_its_positives_and_none_of_its_negatives() {
        let set = RuleSet::defaults().unwrap();
        assert!(set.rules.len() >= 40, "{} rules", set.rules.len());
        let d = Detector::new(set.clone(), "kw").unwrap();
        for (i, r) in set.rules.iter().enumerate() {
            assert!(!r.positive.is_empty(), "{}: no positive test case", r.id);
            assert!(!r.negative.is_empty(), "{}: no negative test case", r.id);
            for p in &r.positive {
                let found = d.scan(p.as_bytes());
                assert!(
                    found.iter().any(|m| m.rule == Some(i)),
                    "{} misses its positive {p:?}: {found:?}",
                    r.id
                );
            }
            for n in &r.negative {
                let found = d.scan(n.as_bytes());
                assert!(
                    found.iter().all(|m| m.rule != Some(i)),
                    "{} finds its negative {n:?}",
                    r.id
                );
            }
        }
    }

    #[test]
    fn own_keys_are_found_only_with_a_valid_checksum() {
        let d = Detector::new(RuleSet { rules: vec![] }, "kw").unwrap();
        let key = key_format::generate(&mut rand::rngs::OsRng, "kw", "prod").unwrap();
        let text = format!("line one\n  DEPLOY_KEY={}\n", key.plain.expose());
        let found = d.scan(text.as_bytes());
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].line, found[0].column), (2, 14));
        let own = found[0].own.as_ref().unwrap();
        assert_eq!(own.id, key.id.to_string());
        assert_eq!(own.environment, "prod");
        assert!(!own.admin_token);
        // One character changed: the checksum no longer matches; not ours.
        let mut broken = key.plain.expose().to_owned().into_bytes();
        let last = broken.len() - 10;
        broken[last] = if broken[last] == b'a' { b'b' } else { b'a' };
        assert!(d.scan(&broken).is_empty());
        // An environment with a hyphen is ours too.
        let hyphen = key_format::generate(&mut rand::rngs::OsRng, "kw", "staging-eu").unwrap();
        let found = d.scan(format!("X={}", hyphen.plain.expose()).as_bytes());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].own.as_ref().unwrap().environment, "staging-eu");
        // Another deployment's prefix is not ours.
        let other = Detector::new(RuleSet { rules: vec![] }, "acme").unwrap();
        assert!(other.scan(text.as_bytes()).is_empty());
    }

    #[test]
    fn paths_are_not_generic_secrets() {
        let d = Detector::new(RuleSet::defaults().unwrap(), "kw").unwrap();
        for line in [
            "PWD=/home/runner/work/keywarden/keywarden",
            "password_file: /run/secrets/db-password",
            "secret = ~/.config/app/secret.key",
        ] {
            assert!(d.scan(line.as_bytes()).is_empty(), "{line}");
        }
        assert_eq!(
            d.scan(b"PWD=Zk3/Qx9m+Tb7Lw2vNc8R").len(),
            1,
            "not a path: a secret with a slash in it"
        );
        assert_eq!(
            d.scan(b"api_key = \"/9jQx4AAQSkZJRg/Tb7Lw2vNc8R\"").len(),
            1,
            "base64 that starts with a slash is still a secret"
        );
    }

    #[test]
    fn inline_allow_and_placeholders_suppress() {
        let d = Detector::new(RuleSet::defaults().unwrap(), "kw").unwrap();
        let real = "ghp_R8wq2Ld7Xk4PzN9vT3mB6yH1cJ5sF0aGe2Ku";
        assert_eq!(d.scan(format!("t = {real}").as_bytes()).len(), 1);
        assert!(d
            .scan(format!("t = {real} # keywarden:allow").as_bytes())
            .is_empty());
        for p in [
            "AKIAIOSFODNN7EXAMPLE",
            "your-api-key-here",
            "xxxxxxxxxxxxxxxx",
            "${VAR}",
            "<token>",
        ] {
            assert!(is_placeholder(p), "{p}");
            assert!(
                d.scan(format!("api_key = {p}").as_bytes()).is_empty(),
                "{p}"
            );
        }
    }

    #[test]
    fn a_specific_rule_wins_over_the_generic_one() {
        let d = Detector::new(RuleSet::defaults().unwrap(), "kw").unwrap();
        let found = d.scan(b"api_key = ghp_R8wq2Ld7Xk4PzN9vT3mB6yH1cJ5sF0aGe2Ku\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(d.describe(found[0].rule).0, "github-pat");
    }

    #[test]
    fn bad_rule_files_report_every_problem() {
        let err = RuleSet::parse(
            "[[rule]]\nid = \"Bad\"\ndescription = \"d\"\nseverity = \"huge\"\nregex = \"(a\"\nkeywords = []\n\
             [[rule]]\nid = \"ok\"\ndescription = \"d\"\nseverity = \"low\"\nregex = \"a\"\nkeywords = [\"a\"]\n",
            "mine.toml",
        )
        .unwrap_err()
        .to_string();
        for part in [
            "ids are lower-case",
            "severity must be",
            "at least one keyword",
            "regex:",
            "group 1 does not exist",
        ] {
            assert!(err.contains(part), "{part}: {err}");
        }
    }
}
