//! `keywarden audit …`: list, export, checkpoint, verify and archive the trail.
//!
//! `verify` recomputes the chain here, from what the server streams, rather than asking
//! the server for a verdict: a server whose database was tampered with is not trusted
//! to judge itself. Archive files are gzip'd JSON lines: a header, the entries exactly as
//! the export wrote them, and a trailer with a signed checkpoint of the last entry.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use keywarden_client::{sealed_entry, AuditQuery, Client};
use keywarden_core::audit_chain::{
    from_hex, to_hex, ChainHash, ChainWalk, Checkpoint, WalkReport, GENESIS,
};
use keywarden_proto::{ArchiveRequest, AuditChainView, AuditEntryView, CheckpointView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::cli::{AuditCommand, AuditFilterArgs, Cli};
use crate::{client, output, print, NEGATIVE};

pub async fn run(cli: &Cli, cmd: &AuditCommand) -> Result<u8> {
    let c = client(cli)?;
    match cmd {
        AuditCommand::List {
            filter,
            newest_first,
            limit,
            cursor,
        } => {
            let mut q = query(filter)?;
            q.order = newest_first.then(|| "desc".to_owned());
            q.limit = *limit;
            q.cursor.clone_from(cursor);
            let page = c.audit_list(&q).await?;
            print(cli, &page, |p| {
                let mut s = output::audit_table(&p.entries);
                if let Some(n) = &p.next_cursor {
                    s.push_str(&format!("\nmore: --cursor {n}"));
                }
                s
            })?;
            Ok(0)
        }
        AuditCommand::Export {
            filter,
            format,
            out,
        } => {
            if format != "jsonl" && format != "csv" {
                bail!("--format {format:?}: expected jsonl or csv");
            }
            let mut q = query(filter)?;
            q.format = Some(format.clone());
            export(&c, &q, out.as_deref()).await?;
            Ok(0)
        }
        AuditCommand::Checkpoint { seq, out } => {
            let cp = c.audit_checkpoint(*seq).await?;
            let text = serde_json::to_string_pretty(&cp)?;
            match out {
                Some(path) => {
                    write_new(path, format!("{text}\n").as_bytes())?;
                    eprintln!(
                        "checkpoint of entry {} written to {}",
                        cp.seq,
                        path.display()
                    );
                }
                None => crate::out_line(text)?,
            }
            Ok(0)
        }
        AuditCommand::Verify { usage: true, .. } => verify_usage(cli, &c).await,
        AuditCommand::Verify {
            checkpoints,
            archives,
            ..
        } => verify(cli, &c, checkpoints, archives).await,
        AuditCommand::Archive { before, out } => archive(cli, &c, before, out).await,
        AuditCommand::Quarantine => quarantine(cli, &c).await,
    }
}

async fn quarantine(cli: &Cli, c: &Client) -> Result<u8> {
    let q = c.audit_quarantine().await?;
    print(cli, &q, |q| {
        if q.audit_seqs.is_empty() && q.event_seqs.is_empty() {
            format!("nothing past the recorded head (seq {})", q.head_seq)
        } else {
            format!(
                "moved to quarantine: {} audit entr{} ({}) and {} outbox event(s) past seq {}",
                q.audit_seqs.len(),
                if q.audit_seqs.len() == 1 { "y" } else { "ies" },
                q.audit_seqs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                q.event_seqs.len(),
                q.head_seq
            )
        }
    })?;
    Ok(0)
}

/// A command-line time: RFC 3339, a date (midnight UTC), or a duration ago (`24h`).
fn parse_when(flag: &str, s: &str) -> Result<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(d) = time::Date::parse(s, &date_format) {
        return Ok(d.midnight().assume_utc());
    }
    if let Ok(ago) = keywarden_core::duration::parse_duration(s) {
        #[allow(clippy::disallowed_methods)] // the CLI's own notion of "now"
        return Ok(OffsetDateTime::now_utc() - ago);
    }
    bail!("{flag} {s:?}: expected RFC 3339 (2026-11-01T00:00:00Z), a date (2026-11-01) or a duration ago (24h)")
}

fn rfc3339(t: OffsetDateTime) -> Result<String> {
    Ok(t.format(&Rfc3339)?)
}

fn query(f: &AuditFilterArgs) -> Result<AuditQuery> {
    Ok(AuditQuery {
        key: f.key.clone(),
        actor: f.actor.clone(),
        action: f.action.clone(),
        since: f
            .since
            .as_deref()
            .map(|s| parse_when("--since", s).and_then(rfc3339))
            .transpose()?,
        until: f
            .until
            .as_deref()
            .map(|s| parse_when("--until", s).and_then(rfc3339))
            .transpose()?,
        ..AuditQuery::default()
    })
}

async fn export(c: &Client, q: &AuditQuery, out: Option<&Path>) -> Result<()> {
    let mut stream = c.audit_export(q).await?;
    let mut sink: Box<dyn Write> = match out {
        Some(path) => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    while let Some(chunk) = stream.chunk().await? {
        sink.write_all(&chunk)?;
    }
    sink.flush()?;
    Ok(())
}

/// Creates `path` only if it does not exist, writing through a temporary file that is
/// synced before it takes the name.
fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.exists() {
        bail!("{} exists; not overwriting it", path.display());
    }
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

fn checkpoint(v: &CheckpointView) -> Checkpoint {
    Checkpoint {
        seq: v.seq,
        hash: v.hash.clone(),
        time: v.time.clone(),
        public_key: v.public_key.clone(),
        signature: v.signature.clone(),
    }
}

// ---------------------------------------------------------------------------------------
// Archive files

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchiveHeader {
    keywarden_audit_archive: u32,
    first_seq: i64,
    /// Hash of the entry before `first_seq` (the genesis hash for seq 1).
    prev_hash: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchiveTrailer {
    end: ArchiveEnd,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchiveEnd {
    last_seq: i64,
    last_hash: String,
    entries: i64,
    /// Signed by the server when the file was made.
    checkpoint: CheckpointView,
}

const ARCHIVE_VERSION: u32 = 1;

/// One archive file, read back and checked on its own: header, entries in order, trailer
/// that matches them, and a valid checkpoint signature.
struct ArchiveFile {
    path: PathBuf,
    first_seq: i64,
    prev_hash: ChainHash,
    end: ArchiveEnd,
}

fn open_archive(path: &Path) -> Result<(ArchiveHeader, impl Iterator<Item = Result<String>>)> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut lines = BufReader::new(GzDecoder::new(BufReader::new(f))).lines();
    let first = lines
        .next()
        .transpose()
        .with_context(|| format!("{}: not a gzip'd keywarden archive", path.display()))?
        .with_context(|| format!("{}: empty archive", path.display()))?;
    let header: ArchiveHeader = serde_json::from_str(&first).with_context(|| {
        format!(
            "{}: the first line is not an archive header",
            path.display()
        )
    })?;
    if header.keywarden_audit_archive != ARCHIVE_VERSION {
        bail!(
            "{}: archive format {} is not supported (this keywarden reads {ARCHIVE_VERSION})",
            path.display(),
            header.keywarden_audit_archive
        );
    }
    let display = path.display().to_string();
    Ok((
        header,
        lines.map(move |l| l.with_context(|| format!("{display}: reading"))),
    ))
}

/// Reads an archive's header and trailer (a first pass; entries are walked later).
fn scan_archive(path: &Path) -> Result<ArchiveFile> {
    let (header, lines) = open_archive(path)?;
    let mut last = None;
    for line in lines {
        last = Some(line?);
    }
    let last = last.with_context(|| format!("{}: no trailer", path.display()))?;
    let trailer: ArchiveTrailer = serde_json::from_str(&last).with_context(|| {
        format!(
            "{}: the last line is not an archive trailer (cut short?)",
            path.display()
        )
    })?;
    let prev_hash = from_hex(&header.prev_hash)
        .with_context(|| format!("{}: header prev_hash is not a hash", path.display()))?;
    Ok(ArchiveFile {
        path: path.to_owned(),
        first_seq: header.first_seq,
        prev_hash,
        end: trailer.end,
    })
}

/// Feeds an archive's entries to the walk; returns how many it held.
fn walk_archive(a: &ArchiveFile, walk: &mut ChainWalk) -> Result<i64> {
    let (_, lines) = open_archive(&a.path)?;
    let mut n = 0;
    let mut lines = lines.peekable();
    while let Some(line) = lines.next() {
        let line = line?;
        if lines.peek().is_none() {
            break; // the trailer
        }
        let v: AuditEntryView = serde_json::from_str(&line).with_context(|| {
            format!("{}: line {} is not an audit entry", a.path.display(), n + 2)
        })?;
        walk.push(sealed_entry(&v));
        n += 1;
        if walk.is_broken() {
            break;
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------
// verify

#[derive(Debug, Serialize)]
struct VerifyOutcome {
    intact: bool,
    checked: u64,
    first_seq: i64,
    last_seq: Option<i64>,
    head_seq: i64,
    checkpoints_checked: usize,
    archives_checked: usize,
    notes: Vec<String>,
    #[serde(rename = "break")]
    broken: Option<keywarden_core::audit_chain::Break>,
}

async fn verify(
    cli: &Cli,
    c: &Client,
    checkpoint_files: &[PathBuf],
    archive_files: &[PathBuf],
) -> Result<u8> {
    // The head first: entries written while the walk runs then only extend the chain.
    let chain: AuditChainView = c.audit_chain().await?;
    let head_hash = from_hex(&chain.head_hash).context("the server's head hash is not a hash")?;
    let mut notes = Vec::new();

    let mut checkpoints = Vec::new();
    for path in checkpoint_files {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let view: CheckpointView = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a checkpoint", path.display()))?;
        let cp = checkpoint(&view);
        let hash = match cp.verify() {
            Ok(h) => h,
            Err(e) => {
                return report_unusable(cli, &format!("checkpoint {}: {e}", path.display()));
            }
        };
        if cp.public_key != chain.public_key {
            notes.push(format!(
                "checkpoint {} was signed by key {}, not the server's current key {}",
                path.display(),
                cp.public_key,
                chain.public_key
            ));
        }
        checkpoints.push((cp.seq, hash));
    }

    let mut archives = archive_files
        .iter()
        .map(|p| scan_archive(p))
        .collect::<Result<Vec<_>>>()?;
    archives.sort_by_key(|a| a.first_seq);
    for a in &archives {
        let cp = checkpoint(&a.end.checkpoint);
        match cp.verify() {
            Ok(h) if cp.seq == a.end.last_seq && to_hex(&h) == a.end.last_hash => {}
            Ok(_) => {
                return report_unusable(
                    cli,
                    &format!(
                        "archive {}: its signed checkpoint does not name its last entry",
                        a.path.display()
                    ),
                )
            }
            Err(e) => {
                return report_unusable(cli, &format!("archive {}: {e}", a.path.display()));
            }
        }
    }

    // Where the walk starts: the first archive given (at seq 1, or right after a recorded
    // archive it continues), else after the last recorded archive.
    let recorded_end = chain
        .archives
        .last()
        .map(|r| (r.last_seq, r.last_hash.clone()));
    let (mut walk, start) = match (archives.first(), &recorded_end) {
        (Some(a), _) if a.first_seq == 1 && a.prev_hash == GENESIS => (ChainWalk::new(), 1),
        (Some(a), _) => {
            let known = chain.archives.iter().any(|r| {
                r.last_seq == a.first_seq - 1 && from_hex(&r.last_hash) == Some(a.prev_hash)
            });
            if known {
                notes.push(format!(
                    "entries before {} are archived in files not given; not checked",
                    a.first_seq
                ));
                (
                    ChainWalk::starting_after(a.first_seq - 1, a.prev_hash),
                    a.first_seq,
                )
            } else {
                // The walk then reports the entries before this archive as missing.
                (ChainWalk::new(), 1)
            }
        }
        (None, Some((seq, hash))) => {
            notes.push(format!(
                "entries 1 to {seq} are archived; pass --archive FILE to check them too"
            ));
            (
                ChainWalk::starting_after(*seq, from_hex(hash).unwrap_or([0xff; 32])),
                seq + 1,
            )
        }
        (None, None) => (ChainWalk::new(), 1),
    };
    let mut checkpoints_checked = 0;
    for (seq, hash) in &checkpoints {
        if *seq < start {
            notes.push(format!(
                "the checkpoint of entry {seq} falls in the archived range; pass its archive to check it"
            ));
        } else {
            walk.expect(*seq, *hash);
            checkpoints_checked += 1;
        }
    }
    // What the server recorded about archived ranges must agree with the files.
    for r in &chain.archives {
        if r.last_seq >= start {
            if let Some(h) = from_hex(&r.last_hash) {
                walk.expect(r.last_seq, h);
            }
        }
    }
    for a in &archives {
        if let Some(h) = from_hex(&a.end.last_hash) {
            walk.expect(a.end.last_seq, h);
        }
    }

    for a in &archives {
        let n = walk_archive(a, &mut walk)?;
        if !walk.is_broken() && n != a.end.entries {
            return report_unusable(
                cli,
                &format!(
                    "archive {} holds {n} entries, its trailer says {}",
                    a.path.display(),
                    a.end.entries
                ),
            );
        }
        if walk.is_broken() {
            break;
        }
    }

    if !walk.is_broken() {
        let mut stream = c.audit_export(&AuditQuery::default()).await?;
        let mut line_no = 0u64;
        while let Some(line) = stream.line().await? {
            line_no += 1;
            if line.is_empty() {
                continue;
            }
            let v: AuditEntryView = serde_json::from_str(&line)
                .with_context(|| format!("export line {line_no} is not an audit entry"))?;
            walk.push(sealed_entry(&v));
            if walk.is_broken() {
                break;
            }
        }
    }
    let mut report: WalkReport = walk.finish(Some((chain.head_seq, head_hash)));
    // The head read before the export bounds truncation; the one read after it bounds
    // what the store itself can have written (entries past it were forged).
    report.check_past_head(c.audit_chain().await?.head_seq);
    let outcome = VerifyOutcome {
        intact: report.broken.is_none(),
        checked: report.checked,
        first_seq: report.first_seq,
        last_seq: report.last.map(|l| l.0),
        head_seq: chain.head_seq,
        checkpoints_checked,
        archives_checked: archives.len(),
        notes,
        broken: report.broken,
    };
    print(cli, &outcome, |o| {
        let mut s = String::new();
        for n in &o.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        match &o.broken {
            None => s.push_str(&format!(
                "audit trail intact: {} entries checked ({}), {} checkpoint(s), {} archive(s)",
                o.checked,
                match o.last_seq {
                    Some(l) => format!("seq {} to {l}", o.first_seq),
                    None => "none".to_owned(),
                },
                o.checkpoints_checked,
                o.archives_checked
            )),
            Some(b) => s.push_str(&format!(
                "audit trail BROKEN at seq {}: {}: {}",
                b.seq,
                b.kind.as_str(),
                b.detail
            )),
        }
        s
    })?;
    Ok(if outcome.intact { 0 } else { NEGATIVE })
}

#[derive(Debug, Serialize)]
struct UsageVerifyOutcome {
    intact: bool,
    checked_batches: u64,
    checked_events: u64,
    first_batch: i64,
    last_batch: Option<i64>,
    head_batch: i64,
    /// Batches removed by retention: the walk starts at the last one's hash.
    retained_batches: i64,
    retained_events: i64,
    notes: Vec<String>,
    #[serde(rename = "break")]
    broken: Option<keywarden_core::usage_chain::UsageBreak>,
}

/// `audit verify --usage`: recomputes the usage log's chain here from the streamed
/// batches and events, from where retention left it.
/// Every `usage.anchored` entry of the audit trail, oldest first.
async fn usage_anchors(c: &Client) -> Result<Vec<keywarden_core::usage_chain::UsageAnchor>> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = c
            .audit_list(&keywarden_client::AuditQuery {
                target: Some("usage".to_owned()),
                action: Some("usage.anchored".to_owned()),
                limit: Some(1000),
                cursor: cursor.take(),
                ..keywarden_client::AuditQuery::default()
            })
            .await?;
        for e in &page.entries {
            let (Some(batch), Some(hash)) = (
                e.details["batch"].as_i64(),
                e.details["hash"].as_str().and_then(from_hex),
            ) else {
                bail!(
                    "audit entry {} (usage.anchored) holds no batch and hash",
                    e.seq
                );
            };
            out.push(keywarden_core::usage_chain::UsageAnchor {
                audit_seq: e.seq,
                batch,
                hash,
            });
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(out),
        }
    }
}

async fn verify_usage(cli: &Cli, c: &Client) -> Result<u8> {
    use keywarden_core::usage_chain::{ChainLine, UsageWalk};
    // The anchors first, then the head: an anchor written meanwhile names a batch at or
    // below the head, and batches written while the walk runs only extend the chain.
    let anchors = usage_anchors(c).await?;
    let chain = c.usage_chain().await?;
    let head_hash = from_hex(&chain.head_hash).context("the server's head hash is not a hash")?;
    let mut notes = Vec::new();
    let mut walk = match chain.retained.last() {
        Some(r) => {
            UsageWalk::starting_after(r.last_batch, from_hex(&r.last_hash).unwrap_or([0xff; 32]))
        }
        None => UsageWalk::new(),
    };
    let retained_batches = chain.retained.last().map_or(0, |r| r.last_batch);
    let retained_events = chain.retained.iter().map(|r| r.events).sum();
    if retained_batches > 0 {
        notes.push(format!(
            "batches 1 to {retained_batches} ({retained_events} events) were removed by \
             retention; the chain is checked from the hash of the last"
        ));
    }
    if chain.unchained_upto > 0 {
        notes.push(format!(
            "events up to {} were stored before the log was chained; not checked",
            chain.unchained_upto
        ));
    }
    let anchored: std::collections::HashSet<i64> = anchors.iter().map(|a| a.batch).collect();
    let mut seen = std::collections::HashMap::new();
    let mut stream = c.usage_chain_export().await?;
    let mut line_no = 0u64;
    while let Some(line) = stream.line().await? {
        line_no += 1;
        if line.is_empty() {
            continue;
        }
        let l: ChainLine = serde_json::from_str(&line)
            .with_context(|| format!("export line {line_no} is not a usage batch or event"))?;
        if let ChainLine::Batch(b) = &l {
            if anchored.contains(&b.header.seq) {
                seen.insert(b.header.seq, from_hex(&b.hash).unwrap_or([0xff; 32]));
            }
        }
        walk.push(l);
        if walk.is_broken() {
            break;
        }
    }
    let mut report = walk.finish(Some((chain.head_batch, head_hash)));
    // The chain holds together; it must also hold what the audit trail anchored.
    if report.broken.is_none() {
        let retained = chain
            .retained
            .last()
            .map(|r| (r.last_batch, from_hex(&r.last_hash).unwrap_or([0xff; 32])));
        report.broken =
            keywarden_core::usage_chain::check_anchors(&anchors, &seen, retained, chain.head_batch);
    }
    if !anchors.is_empty() {
        notes.push(format!(
            "checked against {} anchors of the usage log in the audit trail (run `keywarden \
             audit verify` to check the trail itself)",
            anchors.len()
        ));
    }
    let outcome = UsageVerifyOutcome {
        intact: report.broken.is_none(),
        checked_batches: report.checked_batches,
        checked_events: report.checked_events,
        first_batch: report.first_batch,
        last_batch: report.last_batch,
        head_batch: chain.head_batch,
        retained_batches,
        retained_events,
        notes,
        broken: report.broken,
    };
    print(cli, &outcome, |o| {
        let mut s = String::new();
        for n in &o.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        match &o.broken {
            None => s.push_str(&format!(
                "usage log intact: {} batches ({} events) checked ({})",
                o.checked_batches,
                o.checked_events,
                match o.last_batch {
                    Some(l) => format!("batch {} to {l}", o.first_batch),
                    None => "none".to_owned(),
                }
            )),
            Some(b) => s.push_str(&format!(
                "usage log BROKEN at batch {}{}: {}: {}",
                b.batch,
                b.event_seq
                    .map(|e| format!(", event {e}"))
                    .unwrap_or_default(),
                b.kind.as_str(),
                b.detail
            )),
        }
        s
    })?;
    Ok(if outcome.intact { 0 } else { NEGATIVE })
}

/// A checkpoint or archive that cannot be trusted is itself a negative answer.
fn report_unusable(cli: &Cli, message: &str) -> Result<u8> {
    if cli.json {
        crate::out_line(serde_json::json!({"intact": false, "error": message}))?;
    } else {
        crate::out_line(format!("audit trail NOT VERIFIED: {message}"))?;
    }
    Ok(NEGATIVE)
}

// ---------------------------------------------------------------------------------------
// archive

#[derive(Debug, Serialize)]
struct ArchiveOutcome {
    file: String,
    first_seq: i64,
    last_seq: i64,
    entries: i64,
    file_sha256: String,
}

async fn archive(cli: &Cli, c: &Client, before: &str, out: &Path) -> Result<u8> {
    let before = parse_when("--before", before)?;
    if out.exists() {
        bail!("{} exists; not overwriting it", out.display());
    }
    let chain = c.audit_chain().await?;
    let (start_seq, start_hash) = match chain.archives.last() {
        Some(r) => (
            r.last_seq,
            from_hex(&r.last_hash).context("the server's archive record has no valid hash")?,
        ),
        None => (0, GENESIS),
    };
    let q = AuditQuery {
        until: Some(rfc3339(before)?),
        ..AuditQuery::default()
    };
    let mut stream = c.audit_export(&q).await?;
    let tmp = tmp_path(out);
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut gz = GzEncoder::new(BufWriter::new(file), flate2::Compression::default());
    let mut walk = ChainWalk::starting_after(start_seq, start_hash);
    let mut expected = start_seq + 1;
    let mut last: Option<(i64, ChainHash)> = None;
    let result: Result<()> = async {
        while let Some(line) = stream.line().await? {
            if line.is_empty() {
                continue;
            }
            let v: AuditEntryView = serde_json::from_str(&line)
                .context("the export sent a line that is not an entry")?;
            // Only a whole prefix of the live trail is archived: a later entry that is
            // older than --before (clocks differ between nodes) waits for the next archive.
            if v.seq != expected {
                break;
            }
            if expected == start_seq + 1 {
                let header = ArchiveHeader {
                    keywarden_audit_archive: ARCHIVE_VERSION,
                    first_seq: v.seq,
                    prev_hash: to_hex(&start_hash),
                };
                serde_json::to_writer(&mut gz, &header)?;
                gz.write_all(b"\n")?;
            }
            let s = sealed_entry(&v);
            last = Some((s.seq, s.hash));
            walk.push(s);
            if let Some(b) = walk_break(&walk) {
                bail!(b);
            }
            gz.write_all(line.as_bytes())?;
            gz.write_all(b"\n")?;
            expected += 1;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let report = walk.finish(None);
    let Some((last_seq, last_hash)) = last else {
        let _ = std::fs::remove_file(&tmp);
        print(cli, &serde_json::json!({"archived": 0}), |_| {
            format!(
                "nothing to archive: the live trail has no entries before {}",
                output::ts(before)
            )
        })?;
        return Ok(0);
    };
    if let Some(b) = report.broken {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "not archiving: the trail is broken at seq {} ({}: {}); run `keywarden audit verify`",
            b.seq,
            b.kind.as_str(),
            b.detail
        );
    }
    let entries = last_seq - start_seq;
    let cp = c.audit_checkpoint(Some(last_seq)).await?;
    if cp.hash != to_hex(&last_hash) {
        let _ = std::fs::remove_file(&tmp);
        bail!("the server signed a different hash for entry {last_seq} than it exported");
    }
    let trailer = ArchiveTrailer {
        end: ArchiveEnd {
            last_seq,
            last_hash: to_hex(&last_hash),
            entries,
            checkpoint: cp,
        },
    };
    serde_json::to_writer(&mut gz, &trailer)?;
    gz.write_all(b"\n")?;
    let file = gz.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, out)?;
    // Read back what is on disk before anything is removed from the live trail.
    let written = scan_archive(out)?;
    let mut check = ChainWalk::starting_after(start_seq, start_hash);
    let n = walk_archive(&written, &mut check)?;
    let check = check.finish(Some((last_seq, last_hash)));
    if n != entries || check.broken.is_some() {
        bail!(
            "{} did not read back intact; nothing was removed",
            out.display()
        );
    }
    let file_sha256 = {
        let mut h = Sha256::new();
        let mut f = File::open(out)?;
        std::io::copy(&mut f, &mut h)?;
        hex::encode(h.finalize())
    };
    let record = c
        .audit_archive(&ArchiveRequest {
            first_seq: start_seq + 1,
            last_seq,
            last_hash: to_hex(&last_hash),
            file_sha256: file_sha256.clone(),
        })
        .await
        .with_context(|| {
            format!(
                "{} is written, but the server did not remove the entries",
                out.display()
            )
        })?;
    let outcome = ArchiveOutcome {
        file: out.display().to_string(),
        first_seq: record.first_seq,
        last_seq: record.last_seq,
        entries: record.entries,
        file_sha256,
    };
    print(cli, &outcome, |o| {
        format!(
            "archived entries {} to {} ({} entries) to {}\nsha256 {}",
            o.first_seq, o.last_seq, o.entries, o.file, o.file_sha256
        )
    })?;
    Ok(0)
}

fn walk_break(walk: &ChainWalk) -> Option<String> {
    walk.is_broken().then(|| {
        "the trail is broken inside the range to archive; run `keywarden audit verify`".to_owned()
    })
}
