//! keywarden-scan: finds hardcoded secrets, keywarden's own keys (validated offline by
//! their checksum) and foreign ones (rules in TOML), in directory trees, standard input,
//! the environment, git history and container image tarballs.
//!
//! Knows nothing of HTTP or SQL: matching found keys to the inventory is the binary's
//! job, with the client.
//!
//! Detection is two passes per file: one Aho-Corasick pass over the bytes finds which
//! rules' keywords occur at all; only those rules' regexes then run. Files are scanned
//! in parallel.

pub mod baseline;
pub mod corpus;
pub mod detect;
pub mod finding;
pub mod git;
pub mod image;
pub mod report;
pub mod rules;
pub mod walk;

pub use detect::Detector;
pub use finding::{Finding, Location};
pub use rules::{Rule, RuleSet};

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("rules: {0}")]
    Rules(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("git: {0}")]
    Git(String),
    #[error("image: {0}")]
    Image(String),
    #[error("baseline: {0}")]
    Baseline(String),
}
