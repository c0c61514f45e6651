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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleSet;

    fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_plain_gzip_and_zstd_are_read_as_streams() {
        use std::io::Write;
        let gh = "ghp_R8wq2Ld7Xk4PzN9vT3mB6yH1cJ5sF0aGe2Ku";
        let layer1 = tar_of(&[
            (
                "etc/app/config.yaml",
                format!("github:\n  token: {gh}\n").into_bytes(),
            ),
            ("usr/bin/tool", vec![0u8, 1, 2, 3]),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&layer1).unwrap();
        let layer1 = gz.finish().unwrap();
        let layer2 = tar_of(&[(
            "root/.env",
            b"STRIPE=sk_live_R8wq2Ld7Xk4PzN9vT3mB6yH1\n".to_vec(),
        )]);
        let layer2 = ruzstd::encoding::compress_to_vec(
            layer2.as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let layer3 = tar_of(&[("srv/plain.txt", b"AKIA7KLFYYLBEG3RHDSV\n".to_vec())]);
        let config = br#"{"config":{"Env":["PATH=/usr/bin","NPM_TOKEN=npm_R8wq2Ld7Xk4PzN9vT3mB6yH1cJ5sF0aGe2Ku"]}}"#;
        let image = tar_of(&[
            (
                "manifest.json",
                br#"[{"Config":"cfg.json","Layers":["l1/layer.tar"]}]"#.to_vec(),
            ),
            ("cfg.json", config.to_vec()),
            ("blobs/sha256/aaa", layer1),
            ("blobs/sha256/bbb", layer2),
            ("l3/layer.tar", layer3),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.tar");
        std::fs::write(&path, image).unwrap();
        let detector = Detector::new(RuleSet::defaults().unwrap(), "kw").unwrap();
        let found =
            scan_image(&detector, &path, &Options::default(), &Progress::default()).unwrap();
        let mut seen: Vec<(String, String, String)> = found
            .iter()
            .map(|f| match &f.location {
                Location::Image { layer, path, .. } => {
                    (f.rule.clone(), layer.clone(), path.clone())
                }
                other => panic!("{other:?}"),
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (
                    "aws-access-key-id".into(),
                    "l3/layer.tar".into(),
                    "srv/plain.txt".into()
                ),
                (
                    "github-pat".into(),
                    "blobs/sha256/aaa".into(),
                    "etc/app/config.yaml".into()
                ),
                ("npm-access-token".into(), "cfg.json".into(), String::new()),
                (
                    "stripe-secret-key".into(),
                    "blobs/sha256/bbb".into(),
                    "root/.env".into()
                ),
            ]
        );
        std::fs::write(&path, b"not a tarball at all, just text").unwrap();
        assert!(scan_image(&detector, &path, &Options::default(), &Progress::default()).is_err());
    }
}
