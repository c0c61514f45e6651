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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleSet;

    fn git(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=Mallory", "-c", "user.email=m@example.com"])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn history_is_scanned_blob_by_blob_with_the_introducing_commit() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        git(d, &["init", "-q", "-b", "main"]);
        let secret = "ghp_R8wq2Ld7Xk4PzN9vT3mB6yH1cJ5sF0aGe2Ku";
        std::fs::write(
            d.join("deploy.sh"),
            format!("#!/bin/sh\n\nexport GH={secret}\n"),
        )
        .unwrap();
        git(d, &["add", "."]);
        git(d, &["commit", "-q", "-m", "add deploy"]);
        // The same content under another name is the same blob: read once.
        std::fs::write(
            d.join("copy.sh"),
            format!("#!/bin/sh\n\nexport GH={secret}\n"),
        )
        .unwrap();
        git(d, &["add", "."]);
        git(d, &["commit", "-q", "-m", "copy"]);
        git(d, &["rm", "-q", "deploy.sh", "copy.sh"]);
        git(d, &["commit", "-q", "-m", "remove the leak"]);
        std::fs::write(
            d.join("later.env"),
            "AWS_ACCESS_KEY_ID=AKIA7KLFYYLBEG3RHDSV\n",
        )
        .unwrap();
        git(d, &["add", "."]);
        git(d, &["commit", "-q", "-m", "later"]);

        let detector = Detector::new(RuleSet::defaults().unwrap(), "kw").unwrap();
        let p = Progress::default();
        let all = scan_git(&detector, d, None, &Options::default(), &p).unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        let gh = all.iter().find(|f| f.rule == "github-pat").unwrap();
        let Location::Git {
            commit,
            author,
            date,
            path,
        } = &gh.location
        else {
            panic!("{:?}", gh.location);
        };
        assert_eq!(path, "deploy.sh");
        assert_eq!(author, "Mallory <m@example.com>");
        assert_eq!(commit.len(), 40);
        assert!(date.starts_with("20"));
        assert_eq!(gh.line, 3);
        assert_eq!(
            p.files.load(std::sync::atomic::Ordering::Relaxed),
            2,
            "two distinct blobs"
        );

        // --since: only what came after the removal.
        let out = Command::new("git")
            .args(["-C"])
            .arg(d)
            .args(["rev-parse", "HEAD~1"])
            .output()
            .unwrap();
        let rev = String::from_utf8(out.stdout).unwrap();
        let since = scan_git(
            &detector,
            d,
            Some(rev.trim()),
            &Options::default(),
            &Progress::default(),
        )
        .unwrap();
        assert_eq!(since.len(), 1);
        assert_eq!(since[0].rule, "aws-access-key-id");
        assert!(scan_git(
            &detector,
            d,
            Some("--exec=x"),
            &Options::default(),
            &Progress::default()
        )
        .is_err());
        assert!(scan_git(
            &detector,
            &d.join("nope"),
            None,
            &Options::default(),
            &Progress::default()
        )
        .is_err());
    }
}
