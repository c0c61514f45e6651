//! `cargo run --release -p keywarden-bench --bin scan -- --keywarden target/release/keywarden
//! [--gitleaks PATH]`: the scanner on a labelled corpus, beside gitleaks when it is there.
//!
//! Generates a corpus of mixed source and config (`keywarden_scan::corpus`: fake secrets
//! of every rule and keywarden keys at known lines, among hard negatives), runs each
//! scanner on the directory (best of `--runs`), and reports MB/s, precision and recall
//! from the labels. A finding counts when it is on a planted line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use keywarden_scan::corpus::{generate, score, Labels, Score};
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// Corpus size in MB.
    #[arg(long, default_value_t = 50)]
    mb: u64,
    /// The keywarden binary (build it with `cargo build --release` first).
    #[arg(long, default_value = "target/release/keywarden")]
    keywarden: PathBuf,
    /// A gitleaks binary; without it only keywarden is measured.
    #[arg(long)]
    gitleaks: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = 20261123)]
    seed: u64,
}

fn relative(root: &Path, path: &str) -> String {
    let p = Path::new(path);
    p.strip_prefix(root)
        .or_else(|_| p.strip_prefix("./"))
        .map(|r| r.to_string_lossy().into_owned())
        .unwrap_or_else(|_| path.to_owned())
}

/// Runs `cmd` `runs` times; returns the best time and the last report file's text.
fn timed(
    mut make: impl FnMut() -> Command,
    runs: usize,
    report: &Path,
) -> Result<(Duration, String)> {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let _ = std::fs::remove_file(report);
        let started = Instant::now();
        let out = make().output().context("run the scanner")?;
        let took = started.elapsed();
        if !matches!(out.status.code(), Some(0 | 1)) {
            bail!(
                "scanner failed: {:?}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        best = best.min(took);
    }
    Ok((best, std::fs::read_to_string(report)?))
}

fn line(name: &str, bytes: u64, took: Duration, s: &Score) {
    println!(
        "{name:<10} {:>7.1} MB/s  ({:.2} s)  precision {:.3}  recall {:.3}  (tp {}, fp {}, fn {}, on hard negatives {})",
        bytes as f64 / 1e6 / took.as_secs_f64(),
        took.as_secs_f64(),
        s.precision,
        s.recall,
        s.true_positives,
        s.false_positives,
        s.false_negatives,
        s.on_negatives
    );
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("corpus");
    println!("generating a {} MB corpus", args.mb);
    let labels: Labels = generate(&root, args.mb * 1_000_000, args.seed)?;
    println!(
        "{} bytes, {} planted secrets, {} hard negatives",
        labels.bytes,
        labels.secrets.len(),
        labels.negatives.len()
    );
    let report = dir.path().join("report.json");

    let (took, text) = timed(
        || {
            let mut c = Command::new(&args.keywarden);
            c.arg("scan")
                .arg(&root)
                .args(["--format", "json", "--out"])
                .arg(&report)
                .env_remove("KEYWARDEN_TOKEN")
                .env("KEYWARDEN_DATA_DIR", "/nonexistent");
            c
        },
        args.runs,
        &report,
    )?;
    let v: Value = serde_json::from_str(&text)?;
    let found: Vec<(String, usize)> = v["findings"]
        .as_array()
        .context("findings")?
        .iter()
        .map(|f| {
            (
                relative(&root, f["location"]["path"].as_str().unwrap_or_default()),
                f["line"].as_u64().unwrap_or(0) as usize,
            )
        })
        .collect();
    let ours = score(&labels, &found);
    line("keywarden", labels.bytes, took, &ours);
    let missed: Vec<_> = ours
        .per_rule
        .iter()
        .filter(|(_, (hit, planted))| hit < planted)
        .collect();
    if !missed.is_empty() {
        println!("  keywarden misses: {missed:?}");
    }

    if let Some(gl) = &args.gitleaks {
        let (gl_took, text) = timed(
            || {
                let mut c = Command::new(gl);
                c.arg("dir")
                    .arg(&root)
                    .args(["--no-banner", "--exit-code", "0", "--report-format", "json"])
                    .arg("--report-path")
                    .arg(&report);
                c
            },
            args.runs,
            &report,
        )?;
        let v: Value = serde_json::from_str(&text)?;
        let found: Vec<(String, usize)> = v
            .as_array()
            .context("gitleaks findings")?
            .iter()
            .map(|f| {
                (
                    relative(&root, f["File"].as_str().unwrap_or_default()),
                    f["StartLine"].as_u64().unwrap_or(0) as usize,
                )
            })
            .collect();
        let theirs = score(&labels, &found);
        line("gitleaks", labels.bytes, gl_took, &theirs);
        println!(
            "keywarden / gitleaks throughput: {:.1}x",
            gl_took.as_secs_f64() / took.as_secs_f64()
        );
        let missed: Vec<_> = theirs
            .per_rule
            .iter()
            .filter(|(_, (hit, planted))| hit < planted)
            .map(|(r, (hit, planted))| format!("{r} {hit}/{planted}"))
            .collect();
        println!("  gitleaks misses: {}", missed.join(", "));
    }
    Ok(())
}
