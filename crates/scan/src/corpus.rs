//! A labelled corpus for measuring the scanner: files of plausible source and config with
//! fake secrets of every rule (and keywarden keys) at known lines, among hard negatives
//! (placeholders, examples, references), and a scorer that compares findings with the
//! labels. Used by the test suite (per-rule recall, no finding on negatives) and by the
//! comparison benchmark.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::detect::Detector;
use crate::rules::RuleSet;

/// A secret planted in the corpus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// Relative to the corpus root.
    pub path: String,
    pub line: usize,
    pub rule: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Labels {
    pub secrets: Vec<Label>,
    /// Lines holding hard negatives (placeholders and the like), per path.
    pub negatives: Vec<Label>,
    pub bytes: u64,
}

const FILLER: [&str; 16] = [
    "def handle(request, context):",
    "    result = compute(request.payload, retries=3)",
    "    return Response(status=200, body=json.dumps(result))",
    "const config = require('./config');",
    "export function parse(input) { return input.split(',').map(Number); }",
    "  timeout: 30s",
    "  replicas: 3",
    "func (s *Server) Start(ctx context.Context) error {",
    "\tif err := s.listen(); err != nil { return err }",
    "# Configure the retry policy for outbound calls",
    "LOG_LEVEL=info",
    "    \"name\": \"service-a\", \"port\": 8080,",
    "SELECT id, name FROM users WHERE active = true;",
    "  image: registry.example.com/app:1.4.2",
    "let token_count = tokens.iter().filter(|t| t.is_word()).count();",
    "// The password field is validated by the form, see validate_password()",
];

const HARD_NEGATIVES: [&str; 12] = [
    "password = \"your-password-here\"",
    "api_key: ${API_KEY}",
    "secret = os.environ[\"SECRET\"]",
    "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
    "token = get_token_from_vault(client)",
    "DATABASE_URL=postgres://user:password@localhost/db",
    "GITHUB_TOKEN=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "password: <password>",
    "stripe_key = \"sk_live_xxxxxxxxxxxxxxxxxxxxxxxx\"",
    "Authorization: Bearer <token>",
    "client_secret = \"changeme\"",
    "kw_prod_AAAAAAAAAAAAAAAA_0000000000000000000000000000000000000",
];

const EXTENSIONS: [&str; 7] = ["py", "js", "yaml", "env", "go", "json", "md"];

/// A fake secret in the shape of `example`: letters and digits replaced by others of the
/// same kind (hex stays hex, base32 digits stay base32), so the format holds.
fn mutate(example: &str, span: (usize, usize), rng: &mut StdRng) -> String {
    let mut out = String::with_capacity(example.len());
    for (i, c) in example.char_indices() {
        if i < span.0 || i >= span.1 {
            out.push(c);
            continue;
        }
        let pick = |set: &[u8], rng: &mut StdRng| set[rng.gen_range(0..set.len())] as char;
        out.push(match c {
            'a'..='f' => pick(b"abcdef", rng),
            'g'..='z' => pick(b"ghijklmnopqrstuvwxyz", rng),
            'A'..='F' => pick(b"ABCDEF", rng),
            'G'..='Z' => pick(b"GHIJKLMNOPQRSTUVWXYZ", rng),
            '2'..='7' => pick(b"234567", rng),
            '0'..='9' => pick(b"0123456789", rng),
            other => other,
        });
    }
    out
}

/// Writes about `target_bytes` of corpus under `dir` and returns its labels.
pub fn generate(dir: &Path, target_bytes: u64, seed: u64) -> std::io::Result<Labels> {
    let rules = RuleSet::defaults().map_err(std::io::Error::other)?;
    let detector = Detector::new(rules.clone(), "kw").map_err(std::io::Error::other)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut labels = Labels::default();
    let mut file_no = 0usize;
    while labels.bytes < target_bytes {
        let ext = EXTENSIONS[file_no % EXTENSIONS.len()];
        let rel = format!("d{:03}/file{file_no:05}.{ext}", file_no / 200);
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut text = String::new();
        let mut line = 1usize;
        let lines = rng.gen_range(200..1200);
        for _ in 0..lines {
            let roll = rng.gen_range(0..1000);
            if roll < 6 {
                // A secret of a random rule, or one of our keys.
                let pick = rng.gen_range(0..=rules.rules.len());
                let (planted, rule) = if pick == rules.rules.len() {
                    let env = ["prod", "staging", "ci", "dev"][rng.gen_range(0..4)];
                    let key =
                        keywarden_core::key_format::generate(&mut rand::rngs::OsRng, "kw", env)
                            .map_err(std::io::Error::other)?;
                    (
                        format!("DEPLOY_KEY={}", key.plain.expose()),
                        crate::detect::OWN_RULE.to_owned(),
                    )
                } else {
                    let r = &rules.rules[pick];
                    let example = &r.positive[rng.gen_range(0..r.positive.len())];
                    let span = r
                        .regex
                        .captures(example.as_bytes())
                        .and_then(|c| c.get(r.group))
                        .map_or((0, 0), |g| (g.start(), g.end()));
                    let fresh = mutate(example, span, &mut rng);
                    // Keep the fresh one only if it is still a finding of its rule.
                    let still = detector
                        .scan(fresh.as_bytes())
                        .iter()
                        .any(|m| detector.describe(m.rule).0 == r.id);
                    (if still { fresh } else { example.clone() }, r.id.clone())
                };
                labels.secrets.push(Label {
                    path: rel.clone(),
                    line,
                    rule,
                });
                line += planted.matches('\n').count() + 1;
                text.push_str(&planted);
            } else if roll < 12 {
                let n = HARD_NEGATIVES[rng.gen_range(0..HARD_NEGATIVES.len())];
                labels.negatives.push(Label {
                    path: rel.clone(),
                    line,
                    rule: String::new(),
                });
                text.push_str(n);
                line += 1;
            } else {
                text.push_str(FILLER[rng.gen_range(0..FILLER.len())]);
                line += 1;
            }
            text.push('\n');
        }
        labels.bytes += text.len() as u64;
        std::fs::write(&path, text)?;
        file_no += 1;
    }
    Ok(labels)
}

/// How findings compare with the labels.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Score {
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
    pub precision: f64,
    pub recall: f64,
    /// Per planted rule: (found, planted).
    pub per_rule: BTreeMap<String, (usize, usize)>,
    /// Findings on hard-negative lines.
    pub on_negatives: usize,
}

/// Scores findings given as (path relative to the corpus root, line). A finding counts
/// when it is on a planted line, whatever its rule (other scanners name rules
/// differently); several findings on one planted line count once.
pub fn score(labels: &Labels, findings: &[(String, usize)]) -> Score {
    let planted: HashSet<(&str, usize)> = labels
        .secrets
        .iter()
        .map(|l| (l.path.as_str(), l.line))
        .collect();
    let negatives: HashSet<(&str, usize)> = labels
        .negatives
        .iter()
        .map(|l| (l.path.as_str(), l.line))
        .collect();
    let found: HashSet<(&str, usize)> = findings.iter().map(|(p, l)| (p.as_str(), *l)).collect();
    let mut s = Score::default();
    for f in &found {
        if planted.contains(f) {
            s.true_positives += 1;
        } else {
            s.false_positives += 1;
            if negatives.contains(f) {
                s.on_negatives += 1;
            }
        }
    }
    for l in &labels.secrets {
        let e = s.per_rule.entry(l.rule.clone()).or_default();
        e.1 += 1;
        if found.contains(&(l.path.as_str(), l.line)) {
            e.0 += 1;
        } else {
            s.false_negatives += 1;
        }
    }
    let tp = s.true_positives as f64;
    s.precision = if found.is_empty() {
        1.0
    } else {
        tp / found.len() as f64
    };
    s.recall = if labels.secrets.is_empty() {
        1.0
    } else {
        tp / planted.len() as f64
    };
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::walk::{scan_paths, Options, Progress};

    #[test]
    fn every_rule_is_recalled_and_no_negative_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let labels = generate(dir.path(), 3_000_000, 7).unwrap();
        let detector = Detector::new(RuleSet::defaults().unwrap(), "kw").unwrap();
        let findings = scan_paths(
            &detector,
            &[dir.path().to_path_buf()],
            &Options::default(),
            &Progress::default(),
        );
        let found: Vec<(String, usize)> = findings
            .iter()
            .map(|f| {
                let path = f.location.artifact();
                let rel = Path::new(&path)
                    .strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                (rel, f.line)
            })
            .collect();
        let s = score(&labels, &found);
        let rules = RuleSet::defaults().unwrap();
        for r in rules
            .rules
            .iter()
            .map(|r| r.id.as_str())
            .chain([crate::detect::OWN_RULE])
        {
            let (hit, planted) = s.per_rule.get(r).copied().unwrap_or_default();
            assert!(planted > 0, "{r} was never planted");
            assert_eq!(hit, planted, "{r}: recall {hit}/{planted}");
        }
        assert_eq!(s.on_negatives, 0, "a hard negative was reported");
        assert_eq!(s.false_positives, 0, "{s:?}");
        assert!(s.precision == 1.0 && s.recall == 1.0, "{s:?}");
    }

    #[test]
    fn the_scorer_counts_misses_and_false_alarms() {
        let labels = Labels {
            secrets: vec![
                Label {
                    path: "a".into(),
                    line: 1,
                    rule: "x".into(),
                },
                Label {
                    path: "a".into(),
                    line: 5,
                    rule: "y".into(),
                },
            ],
            negatives: vec![Label {
                path: "a".into(),
                line: 3,
                rule: String::new(),
            }],
            bytes: 0,
        };
        let s = score(
            &labels,
            &[("a".into(), 1), ("a".into(), 3), ("b".into(), 1)],
        );
        assert_eq!(
            (s.true_positives, s.false_positives, s.false_negatives),
            (1, 2, 1)
        );
        assert_eq!(s.on_negatives, 1);
        assert_eq!(s.per_rule["y"], (0, 1));
        assert!((s.precision - 1.0 / 3.0).abs() < 1e-9);
        assert!((s.recall - 0.5).abs() < 1e-9);
    }
}
