//! Container images: a `docker save` tarball or an OCI image layout in a tar, read as a
//! stream (never unpacked to disk). Each layer (plain, gzip or zstd tar) is read entry by
//! entry; configs and manifests (which hold `ENV` lines) are scanned as text.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::detect::Detector;
use crate::finding::{Finding, Location};
use crate::walk::{is_binary, Options, Progress};
use crate::ScanError;

pub fn scan_image(
    detector: &Detector,
    file: &Path,
    options: &Options,
    progress: &Progress,
) -> Result<Vec<Finding>, ScanError> {
    let image = file.display().to_string();
    let err = |e: std::io::Error| ScanError::Image(format!("{image}: {e}"));
    let f = std::fs::File::open(file).map_err(err)?;
    let mut outer = tar::Archive::new(BufReader::with_capacity(1 << 16, f));
    let mut findings = Vec::new();
    for entry in outer.entries().map_err(err)? {
        let entry = entry.map_err(err)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let layer = entry.path().map_err(err)?.to_string_lossy().into_owned();
        let size = entry.header().size().map_err(err)?;
        let mut reader = BufReader::with_capacity(1 << 16, entry);
        let head = reader.fill_buf().map_err(err)?;
        let kind = Kind::of(head);
        let at = |path: String| Location::Image {
            image: image.clone(),
            layer: layer.clone(),
            path,
        };
        match kind {
            Kind::Gzip => scan_layer(
                detector,
                flate2::bufread::MultiGzDecoder::new(reader),
                options,
                progress,
                &at,
                &mut findings,
            )
            .map_err(err)?,
            Kind::Zstd => {
                let decoder = ruzstd::decoding::StreamingDecoder::new(reader)
                    .map_err(|e| ScanError::Image(format!("{image}: {layer}: {e}")))?;
                scan_layer(detector, decoder, options, progress, &at, &mut findings)
                    .map_err(err)?;
            }
            Kind::Tar => {
                scan_layer(detector, reader, options, progress, &at, &mut findings).map_err(err)?
            }
            Kind::Other if size <= options.max_file_size => {
                let mut data = Vec::new();
                reader.read_to_end(&mut data).map_err(err)?;
                if !is_binary(&data) {
                    let matches = detector.scan(&data);
                    progress.add(data.len(), matches.len());
                    findings.extend(
                        matches
                            .into_iter()
                            .map(|m| Finding::new(detector, m, at(String::new()))),
                    );
                }
            }
            Kind::Other => {
                progress
                    .skipped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    Ok(findings)
}

enum Kind {
    Gzip,
    Zstd,
    Tar,
    Other,
}

impl Kind {
    fn of(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            Self::Tar
        } else {
            Self::Other
        }
    }
}

fn scan_layer(
    detector: &Detector,
    layer: impl Read,
    options: &Options,
    progress: &Progress,
    at: &dyn Fn(String) -> Location,
    findings: &mut Vec<Finding>,
) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(layer);
    let mut data = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        if entry.header().size()? > options.max_file_size {
            progress
                .skipped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        data.clear();
        entry.read_to_end(&mut data)?;
        if is_binary(&data) {
            progress
                .skipped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let matches = detector.scan(&data);
        progress.add(data.len(), matches.len());
        findings.extend(
            matches
                .into_iter()
                .map(|m| Finding::new(detector, m, at(path.clone()))),
        );
    }
    Ok(())
}
