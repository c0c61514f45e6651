//! Git history, through the `git` command: `git log --raw` lists, commit by commit from
//! the oldest, the blobs each commit introduced; each blob is read once (deduplicated by
//! id) through one `git cat-file --batch` process and reported with the commit that
//! introduced it. Memory holds the set of seen blob ids and one blob at a time.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::detect::Detector;
use crate::finding::{Finding, Location};
use crate::walk::{is_binary, Options, Progress};
use crate::ScanError;

struct Commit {
    id: String,
    author: String,
    date: String,
}

/// Scans every blob in the history of `repo` (all refs), or only what commits after
/// `since` introduced.
pub fn scan_git(
    detector: &Detector,
    repo: &Path,
    since: Option<&str>,
    options: &Options,
    progress: &Progress,
) -> Result<Vec<Finding>, ScanError> {
    let git_err = |what: &str, e: std::io::Error| ScanError::Git(format!("{what}: {e}"));
    let mut log = Command::new("git");
    log.arg("-C").arg(repo).args([
        "log",
        "--reverse",
        "-m",
        "--raw",
        "--no-abbrev",
        "--no-renames",
        "--format=%x01%H%x00%an <%ae>%x00%aI",
    ]);
    match since {
        Some(rev) => {
            if rev.starts_with('-') {
                return Err(ScanError::Git(format!("--since {rev:?} is not a revision")));
            }
            log.arg(format!("{rev}..HEAD"));
        }
        None => {
            log.arg("--all");
        }
    }
    let mut log = log
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| git_err("cannot run git", e))?;
    let mut cat = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| git_err("cannot run git cat-file", e))?;
    let (Some(log_out), Some(mut cat_in), Some(cat_out)) =
        (log.stdout.take(), cat.stdin.take(), cat.stdout.take())
    else {
        return Err(ScanError::Git("cannot talk to git".to_owned()));
    };
    let mut cat_out = BufReader::with_capacity(1 << 16, cat_out);
    let mut seen: HashSet<[u8; 20]> = HashSet::new();
    let mut commit: Option<Commit> = None;
    let mut findings = Vec::new();
    let mut blob = Vec::new();
    for line in BufReader::new(log_out).lines() {
        let line = line.map_err(|e| git_err("reading git log", e))?;
        if let Some(header) = line.strip_prefix('\u{1}') {
            let mut parts = header.split('\0');
            commit = Some(Commit {
                id: parts.next().unwrap_or_default().to_owned(),
                author: parts.next().unwrap_or_default().to_owned(),
                date: parts.next().unwrap_or_default().to_owned(),
            });
            continue;
        }
        // :100644 100644 <old> <new> M\t<path>
        let Some(raw) = line.strip_prefix(':') else {
            continue;
        };
        let Some((meta, path)) = raw.split_once('\t') else {
            continue;
        };
        let fields: Vec<&str> = meta.split(' ').collect();
        let (Some(mode), Some(new)) = (fields.get(1), fields.get(3)) else {
            continue;
        };
        // Deletions, submodules and symlinks introduce no text of their own.
        if new.bytes().all(|b| b == b'0') || *mode == "160000" || *mode == "120000" {
            continue;
        }
        let mut id = [0u8; 20];
        if hex::decode_to_slice(new, &mut id).is_err() || !seen.insert(id) {
            continue;
        }
        writeln!(cat_in, "{new}").map_err(|e| git_err("writing to git cat-file", e))?;
        cat_in
            .flush()
            .map_err(|e| git_err("writing to git cat-file", e))?;
        if !read_blob(&mut cat_out, options.max_file_size, &mut blob)
            .map_err(|e| git_err("reading from git cat-file", e))?
            || is_binary(&blob)
        {
            progress
                .skipped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let matches = detector.scan(&blob);
        progress.add(blob.len(), matches.len());
        if let Some(c) = &commit {
            for m in matches {
                findings.push(Finding::new(
                    detector,
                    m,
                    Location::Git {
                        commit: c.id.clone(),
                        author: c.author.clone(),
                        date: c.date.clone(),
                        path: path.to_owned(),
                    },
                ));
            }
        }
    }
    drop(cat_in);
    let status = log.wait().map_err(|e| git_err("git log", e))?;
    let _ = cat.wait();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = log.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        return Err(ScanError::Git(format!(
            "git log failed in {}: {}",
            repo.display(),
            err.trim()
        )));
    }
    Ok(findings)
}

/// Reads one `cat-file --batch` answer into `buf`. `false` when the object was missing
/// or larger than `max` (its bytes are read and dropped).
fn read_blob(out: &mut impl BufRead, max: u64, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut header = String::new();
    out.read_line(&mut header)?;
    // "<oid> blob <size>" or "<oid> missing"
    let size: u64 = match header.trim_end().rsplit(' ').next().map(str::parse) {
        Some(Ok(n)) if header.contains(" blob ") => n,
        _ => return Ok(false),
    };
    buf.clear();
    let keep = size <= max;
    if keep {
        out.by_ref().take(size).read_to_end(buf)?;
    } else {
        std::io::copy(&mut out.by_ref().take(size), &mut std::io::sink())?;
    }
    let mut newline = [0u8; 1];
    out.read_exact(&mut newline)?;
    Ok(keep)
}
