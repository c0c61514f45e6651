//! `keywarden scan`: the scanner (keywarden-scan) plus what only the CLI can do: match
//! our keys found with the server's inventory, revoke the live ones, record foreign
//! secrets as shadow keys.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use keywarden_proto::{IdentifiedKey, IdentifyRequest, ImportShadowKeys, Secret, ShadowKeyInput};
use keywarden_scan::baseline::Baseline;
use keywarden_scan::walk::{Options, Progress};
use keywarden_scan::{report, Detector, Finding, RuleSet};
use serde_json::json;

use crate::cli::{Cli, ScanArgs};
use crate::{client, print, NEGATIVE};

const BATCH: usize = 1000;

pub async fn run(cli: &Cli, a: &ScanArgs) -> Result<u8> {
    let format = if cli.json { "json" } else { a.format.as_str() };
    if !matches!(format, "table" | "json" | "sarif") {
        bail!("--format {format:?}: expected table, json or sarif");
    }
    let mut rules = RuleSet::defaults()?;
    for f in &a.rules {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the rules file {}", f.display()))?;
        rules.extend(RuleSet::parse(&text, &f.display().to_string())?);
    }
    let detector = Arc::new(Detector::new(rules, &a.prefix)?);
    let mut globs = globset::GlobSetBuilder::new();
    for g in &a.allow_paths {
        globs.add(globset::Glob::new(g).with_context(|| format!("--allow-path {g:?}"))?);
    }
    let options = Options {
        no_ignore: a.no_ignore,
        max_file_size: a.max_file_size,
        allow_paths: globs.build()?,
        ..Options::default()
    };
    let baseline = a.baseline.as_deref().map(Baseline::load).transpose()?;

    let progress = Arc::new(Progress::default());
    let bar = ProgressBar::start(progress.clone());
    let job = {
        let (detector, progress, options) = (detector.clone(), progress.clone(), options.clone());
        let (mut paths, git, since, images, env) = (
            a.paths.clone(),
            a.git.clone(),
            a.since.clone(),
            a.images.clone(),
            a.env,
        );
        move || -> Result<Vec<Finding>> {
            if paths.is_empty() && git.is_none() && images.is_empty() && !env {
                paths.push(PathBuf::from("."));
            }
            let (stdin, files): (Vec<PathBuf>, Vec<PathBuf>) =
                paths.into_iter().partition(|p| p.as_os_str() == "-");
            let mut all = Vec::new();
            if !stdin.is_empty() {
                all.extend(keywarden_scan::walk::scan_reader(
                    &detector,
                    std::io::stdin().lock(),
                    &options,
                    &progress,
                )?);
            }
            for f in &files {
                if !f.exists() {
                    bail!("{} does not exist", f.display());
                }
            }
            if !files.is_empty() {
                all.extend(keywarden_scan::walk::scan_paths(
                    &detector, &files, &options, &progress,
                ));
            }
            if let Some(repo) = &git {
                all.extend(keywarden_scan::git::scan_git(
                    &detector,
                    repo,
                    since.as_deref(),
                    &options,
                    &progress,
                )?);
            }
            for image in &images {
                all.extend(keywarden_scan::image::scan_image(
                    &detector, image, &options, &progress,
                )?);
            }
            if env {
                all.extend(keywarden_scan::walk::scan_env(
                    &detector,
                    std::env::vars(),
                    &progress,
                ));
            }
            Ok(all)
        }
    };
    let scanned = tokio::task::spawn_blocking(job).await;
    bar.finish();
    let mut findings = scanned.context("the scan stopped")??;
    // Git and image findings are judged by path here; files were skipped during the walk.
    findings.retain(|f| !options.allow_paths.is_match(f.location.artifact()));
    if let Some(b) = &baseline {
        findings.retain(|f| !b.contains(f));
    }
    if let Some(path) = &a.write_baseline {
        Baseline::write(path, &findings)?;
        eprintln!(
            "wrote {} finding(s) to the baseline {}",
            findings.len(),
            path.display()
        );
        return Ok(0);
    }

    let inventory = match_inventory(cli, a, &findings).await?;
    let mut revoked: HashMap<String, String> = HashMap::new();
    if a.revoke_leaked {
        revoked = revoke_leaked(cli, &findings, &inventory).await?;
    }
    if a.import {
        import(cli, &findings).await?;
    }

    let rendered = match format {
        "sarif" => serde_json::to_string_pretty(&report::sarif(&findings))?,
        "json" => {
            let mut v = report::json(&findings, a.show_secrets);
            if let Some(list) = v["findings"].as_array_mut() {
                for (item, f) in list.iter_mut().zip(&findings) {
                    if let Some(k) = inventory.get(&f.secret) {
                        item["inventory"] = serde_json::to_value(k)?;
                        if let Some(id) = &k.key_id {
                            item["inventory"]["revoked_now"] = json!(revoked.contains_key(id));
                        }
                    }
                }
            }
            serde_json::to_string_pretty(&v)?
        }
        _ => table(&findings, &inventory, &revoked, a.show_secrets),
    };
    match &a.out {
        Some(path) => std::fs::write(path, rendered + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => crate::out_line(rendered)?,
    }
    let p = &progress;
    let vars = p.env_vars.load(Ordering::Relaxed);
    eprintln!(
        "{} finding(s); {} file(s){}, {:.1} MB scanned, {} skipped",
        findings.len(),
        p.files.load(Ordering::Relaxed),
        if vars > 0 {
            format!(" and {vars} environment variable(s)")
        } else {
            String::new()
        },
        p.bytes.load(Ordering::Relaxed) as f64 / 1e6,
        p.skipped.load(Ordering::Relaxed)
    );
    Ok(if findings.is_empty() { 0 } else { NEGATIVE })
}

/// Asks the server about every one of our keys found, when a token is at hand (or when
/// asked to, in which case not reaching the server is an error). Keyed by the secret.
async fn match_inventory(
    cli: &Cli,
    a: &ScanArgs,
    findings: &[Finding],
) -> Result<HashMap<String, IdentifiedKey>> {
    let mut ours: Vec<&str> = findings
        .iter()
        .filter(|f| f.keywarden_key.is_some())
        .map(|f| f.secret.as_str())
        .collect();
    ours.sort_unstable();
    ours.dedup();
    let required = a.inventory || a.revoke_leaked;
    let token_at_hand = cli.token.is_some() || cli.data_dir.join("admin-token").exists();
    if ours.is_empty() || !(required || token_at_hand) {
        return Ok(HashMap::new());
    }
    let asked = async {
        let c = client(cli)?;
        let mut out = HashMap::new();
        for chunk in ours.chunks(BATCH) {
            let req = IdentifyRequest {
                keys: chunk.iter().map(|s| Secret((*s).to_owned())).collect(),
            };
            let answer = c.identify_keys(&req).await?;
            for (s, r) in chunk.iter().zip(answer.results) {
                out.insert((*s).to_owned(), r);
            }
        }
        Ok::<_, anyhow::Error>(out)
    };
    match asked.await {
        Ok(m) => Ok(m),
        Err(e) if required => Err(e.context("cannot match the keys found with the inventory")),
        Err(e) => {
            eprintln!("warning: keys found were not matched with the inventory: {e:#}");
            Ok(HashMap::new())
        }
    }
}

/// Revokes each live key or admin token found, once, naming where it was found.
/// Returns the ids revoked, with the reason given.
async fn revoke_leaked(
    cli: &Cli,
    findings: &[Finding],
    inventory: &HashMap<String, IdentifiedKey>,
) -> Result<HashMap<String, String>> {
    let c = client(cli)?;
    let mut done = HashMap::new();
    for f in findings {
        let Some(k) = inventory.get(&f.secret) else {
            continue;
        };
        let Some(id) = k.key_id.clone().filter(|_| k.genuine && k.live) else {
            continue;
        };
        if done.contains_key(&id) {
            continue;
        }
        let mut reason = format!("leaked: found by keywarden scan at {}", f.location);
        if f.line > 0 {
            reason.push_str(&format!(" line {}", f.line));
        }
        let reason: String = reason
            .chars()
            .filter(|c| !c.is_control())
            .take(500)
            .collect();
        if k.kind.as_deref() == Some("token") {
            c.revoke_token(&id).await?;
        } else {
            c.change_state(&id, "revoke", Some(reason.clone())).await?;
        }
        eprintln!(
            "revoked {} {id} ({}) found at {}",
            k.kind.as_deref().unwrap_or("key"),
            k.owner.as_deref().unwrap_or("no owner"),
            f.location
        );
        done.insert(id, reason);
    }
    Ok(done)
}

/// Records the foreign secrets found as shadow keys, by fingerprint.
async fn import(cli: &Cli, findings: &[Finding]) -> Result<()> {
    let mut by_fingerprint: BTreeMap<&str, &Finding> = BTreeMap::new();
    for f in findings.iter().filter(|f| f.keywarden_key.is_none()) {
        by_fingerprint.entry(f.fingerprint.as_str()).or_insert(f);
    }
    if by_fingerprint.is_empty() {
        return Ok(());
    }
    let c = client(cli)?;
    let all: Vec<ShadowKeyInput> = by_fingerprint
        .values()
        .map(|f| ShadowKeyInput {
            fingerprint: f.fingerprint.clone(),
            kind: f.rule.clone(),
            severity: f.severity.as_str().to_owned(),
            location: f
                .location
                .to_string()
                .chars()
                .filter(|c| !c.is_control())
                .take(1024)
                .collect(),
            line: i64::try_from(f.line).unwrap_or(0),
        })
        .collect();
    let mut new = 0;
    for chunk in all.chunks(BATCH) {
        let r = c
            .import_shadow_keys(&ImportShadowKeys {
                shadows: chunk.to_vec(),
            })
            .await
            .context("cannot record shadow keys")?;
        new += r.new;
    }
    eprintln!(
        "recorded {} shadow key(s) in the inventory ({new} new)",
        all.len()
    );
    Ok(())
}

fn table(
    findings: &[Finding],
    inventory: &HashMap<String, IdentifiedKey>,
    revoked: &HashMap<String, String>,
    show_secrets: bool,
) -> String {
    if findings.is_empty() {
        return "no secrets found".to_owned();
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "SEVERITY",
        "RULE",
        "WHERE",
        "LINE",
        "SECRET",
        "INVENTORY",
    ]);
    for f in findings {
        let inv = match (inventory.get(&f.secret), &f.keywarden_key) {
            (Some(k), _) if k.genuine => {
                let id = k.key_id.clone().unwrap_or_default();
                let state = if revoked.contains_key(&id) {
                    "REVOKED NOW".to_owned()
                } else if k.canary {
                    "CANARY (a tripwire, not revoked)".to_owned()
                } else if k.live {
                    "LIVE".to_owned()
                } else {
                    k.state.clone().unwrap_or_default()
                };
                format!(
                    "{} {id} of {} ({}): {state}",
                    k.kind.as_deref().unwrap_or("key"),
                    k.owner.as_deref().unwrap_or("-"),
                    k.environment.as_deref().unwrap_or("admin")
                )
            }
            (Some(_), _) => "not in the inventory".to_owned(),
            (None, Some(own)) => format!("ours: {} ({}), not matched", own.id, own.environment),
            (None, None) => "-".to_owned(),
        };
        t.add_row(vec![
            f.severity.as_str().to_owned(),
            f.rule.clone(),
            f.location.to_string(),
            if f.line > 0 {
                f.line.to_string()
            } else {
                "-".to_owned()
            },
            if show_secrets {
                f.secret.clone()
            } else {
                f.redacted.clone()
            },
            inv,
        ]);
    }
    t.to_string()
}

/// A spinner with files, bytes and findings on a terminal; nothing otherwise.
struct ProgressBar {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProgressBar {
    fn start(p: Arc<Progress>) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self {
                stop: None,
                thread: None,
            };
        }
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let bar = indicatif::ProgressBar::new_spinner();
            loop {
                bar.set_message(format!(
                    "{} files, {:.1} MB, {} findings",
                    p.files.load(Ordering::Relaxed),
                    p.bytes.load(Ordering::Relaxed) as f64 / 1e6,
                    p.findings.load(Ordering::Relaxed)
                ));
                bar.tick();
                if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                    break;
                }
            }
            bar.finish_and_clear();
        });
        Self {
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn finish(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub async fn shadow_list(cli: &Cli) -> Result<u8> {
    let c = client(cli)?;
    let list = c.list_shadow_keys().await?;
    print(cli, &list, |l| {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
            "KIND",
            "SEVERITY",
            "WHERE (LATEST)",
            "LINE",
            "SIGHTINGS",
            "LAST SEEN",
            "FINGERPRINT",
        ]);
        for s in &l.shadow_keys {
            t.add_row(vec![
                s.kind.clone(),
                s.severity.clone(),
                s.location.clone(),
                s.line.to_string(),
                s.sightings.to_string(),
                crate::output::ts(s.last_seen),
                s.fingerprint[..16.min(s.fingerprint.len())].to_owned(),
            ]);
        }
        t.to_string()
    })?;
    Ok(0)
}
