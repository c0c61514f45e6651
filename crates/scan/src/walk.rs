//! Directory trees (respecting `.gitignore` unless told not to), standard input and the
//! environment. Files are scanned in parallel; binaries, symlinks and files over the size
//! limit are skipped.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use globset::GlobSet;

use crate::detect::Detector;
use crate::finding::{Finding, Location};

/// Counters a progress bar reads while a scan runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub files: AtomicU64,
    /// Environment variables scanned (`--env`); not files.
    pub env_vars: AtomicU64,
    pub bytes: AtomicU64,
    pub findings: AtomicU64,
    pub skipped: AtomicU64,
}

impl Progress {
    pub fn add(&self, bytes: usize, findings: usize) {
        self.files.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.findings.fetch_add(findings as u64, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Scan what `.gitignore` and `.ignore` exclude too.
    pub no_ignore: bool,
    /// Files larger than this are skipped.
    pub max_file_size: u64,
    /// Paths (relative to the scanned root, or as shown) never reported.
    pub allow_paths: GlobSet,
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            no_ignore: false,
            max_file_size: 10 * 1024 * 1024,
            allow_paths: GlobSet::empty(),
            threads: std::thread::available_parallelism().map_or(2, usize::from),
        }
    }
}

/// Whether bytes look binary: a NUL in the first 8 KiB, as git judges it.
pub fn is_binary(data: &[u8]) -> bool {
    memchr::memchr(0, &data[..data.len().min(8192)]).is_some()
}

/// Scans the trees under `roots` (files may be named directly).
pub fn scan_paths(
    detector: &Detector,
    roots: &[PathBuf],
    options: &Options,
    progress: &Progress,
) -> Vec<Finding> {
    let Some(first) = roots.first() else {
        return Vec::new();
    };
    let mut builder = ignore::WalkBuilder::new(first);
    for r in &roots[1..] {
        builder.add(r);
    }
    builder
        .hidden(false)
        .follow_links(false)
        .git_ignore(!options.no_ignore)
        .git_global(!options.no_ignore)
        .git_exclude(!options.no_ignore)
        .ignore(!options.no_ignore)
        .parents(!options.no_ignore)
        .require_git(false)
        .threads(options.threads)
        .filter_entry(|e| e.file_name() != ".git");
    let found = Mutex::new(Vec::new());
    builder.build_parallel().run(|| {
        Box::new(|entry| {
            let Ok(entry) = entry else {
                progress.skipped.fetch_add(1, Ordering::Relaxed);
                return ignore::WalkState::Continue;
            };
            // Symlinks are never followed: a link may point out of the tree.
            if !entry.file_type().is_some_and(|t| t.is_file()) {
                return ignore::WalkState::Continue;
            }
            let path = entry.path();
            let shown = path.to_string_lossy().into_owned();
            if options.allow_paths.is_match(path) || options.allow_paths.is_match(&shown) {
                return ignore::WalkState::Continue;
            }
            if entry
                .metadata()
                .map_or(true, |m| m.len() > options.max_file_size)
            {
                progress.skipped.fetch_add(1, Ordering::Relaxed);
                return ignore::WalkState::Continue;
            }
            let Ok(data) = std::fs::read(path) else {
                progress.skipped.fetch_add(1, Ordering::Relaxed);
                return ignore::WalkState::Continue;
            };
            if is_binary(&data) {
                progress.skipped.fetch_add(1, Ordering::Relaxed);
                return ignore::WalkState::Continue;
            }
            let matches = detector.scan(&data);
            progress.add(data.len(), matches.len());
            if !matches.is_empty() {
                let mut out: Vec<Finding> = matches
                    .into_iter()
                    .map(|m| {
                        Finding::new(
                            detector,
                            m,
                            Location::File {
                                path: shown.clone(),
                            },
                        )
                    })
                    .collect();
                if let Ok(mut f) = found.lock() {
                    f.append(&mut out);
                }
            }
            ignore::WalkState::Continue
        })
    });
    let mut findings = found.into_inner().unwrap_or_default();
    sort(&mut findings);
    findings
}

/// Standard input, read to the end (up to the size limit).
pub fn scan_reader(
    detector: &Detector,
    mut input: impl Read,
    options: &Options,
    progress: &Progress,
) -> std::io::Result<Vec<Finding>> {
    let mut data = Vec::new();
    input
        .by_ref()
        .take(options.max_file_size)
        .read_to_end(&mut data)?;
    let matches = detector.scan(&data);
    progress.add(data.len(), matches.len());
    Ok(matches
        .into_iter()
        .map(|m| Finding::new(detector, m, Location::Stdin))
        .collect())
}

/// Environment variables, as `NAME=value` lines, so that rules keyed on the name
/// (`AWS_SECRET_ACCESS_KEY=…`) see it.
pub fn scan_env(
    detector: &Detector,
    vars: impl IntoIterator<Item = (String, String)>,
    progress: &Progress,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for (name, value) in vars {
        let line = format!("{name}={value}");
        let matches = detector.scan(line.as_bytes());
        progress.env_vars.fetch_add(1, Ordering::Relaxed);
        progress
            .bytes
            .fetch_add(line.len() as u64, Ordering::Relaxed);
        progress
            .findings
            .fetch_add(matches.len() as u64, Ordering::Relaxed);
        out.extend(matches.into_iter().map(|mut m| {
            m.line = 0;
            m.column = 0;
            Finding::new(detector, m, Location::Env { name: name.clone() })
        }));
    }
    out
}

/// Stable order: by location, then line.
pub fn sort(findings: &mut [Finding]) {
    findings.sort_by(|a, b| {
        (a.location.artifact(), a.line, a.column, &a.rule).cmp(&(
            b.location.artifact(),
            b.line,
            b.column,
            &b.rule,
        ))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleSet;

    #[test]
    fn trees_skip_ignored_binary_oversized_and_symlinked_files() {
        let outside = tempfile::tempdir().unwrap();
        let secret = "GH=ghp_R8wq2Ld7Xk4PzN9vT3mB6yH1cJ5sF0aGe2Ku\n";
        std::fs::write(outside.path().join("elsewhere.txt"), secret).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("found.txt"), secret).unwrap();
        std::fs::write(d.join(".hidden.env"), secret).unwrap();
        let mut binary = b"\x00\x01ELF".to_vec();
        binary.extend_from_slice(secret.as_bytes());
        std::fs::write(d.join("tool.bin"), binary).unwrap();
        std::fs::write(d.join("big.txt"), format!("{secret}{}", "x".repeat(2000))).unwrap();
        std::fs::write(d.join(".gitignore"), "ignored.txt\n").unwrap();
        std::fs::write(d.join("ignored.txt"), secret).unwrap();
        std::os::unix::fs::symlink(outside.path().join("elsewhere.txt"), d.join("link.txt"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), d.join("linkdir")).unwrap();
        let detector = Detector::new(RuleSet::defaults().unwrap(), "kw").unwrap();
        let options = Options {
            max_file_size: 1000,
            ..Options::default()
        };
        let names = |found: Vec<Finding>| -> Vec<String> {
            let mut n: Vec<String> = found
                .iter()
                .map(|f| f.location.artifact().rsplit('/').next().unwrap().to_owned())
                .collect();
            n.sort();
            n
        };
        let p = Progress::default();
        let found = scan_paths(&detector, &[d.to_path_buf()], &options, &p);
        assert_eq!(names(found), [".hidden.env", "found.txt"]);
        assert_eq!(
            p.skipped.load(Ordering::Relaxed),
            2,
            "the binary and the big file"
        );
        let all = Options {
            no_ignore: true,
            ..options
        };
        let found = scan_paths(&detector, &[d.to_path_buf()], &all, &Progress::default());
        assert_eq!(names(found), [".hidden.env", "found.txt", "ignored.txt"]);
    }
}
