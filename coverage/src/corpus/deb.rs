//! Read `.deb` archives directly: `ar` container, `control.tar.*` for the package name,
//! `data.tar.*` for the files, decompressed in memory (gzip, xz, zstd or none).
//!
//! An archive that is truncated or otherwise unreadable yields a [`DebError`] naming the member
//! and what went wrong; the caller counts it and moves on.

use super::{CorpusScan, Progress, ScanCounts, ScanWarning, ScannedBinary, Shard};
use crate::cache::{CachedValue, FileStamp, ScanCache};
use crate::error::CoverageError;
use crate::sweep::{is_elf, SweepOutcome, Sweeper, MAX_ELF_BYTES};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything hbt needs from one `.deb`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DebOutcome {
    pub package: String,
    pub architecture: String,
    /// Regular files in `data.tar`.
    pub files: u64,
    /// ELF members: install path and sweep result.
    pub elf_members: Vec<(String, Result<SweepOutcome, String>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("not a Debian package (no `!<arch>` ar header)")]
    NotAr,
    #[error("ar member header at offset {offset:#x}: {detail}")]
    BadMember { offset: usize, detail: String },
    #[error("missing {0} member")]
    Missing(&'static str),
    #[error("{member}: unsupported compression")]
    Compression { member: String },
    #[error("{member}: {source}")]
    Read {
        member: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control file has no Package field")]
    NoPackage,
}

struct ArMember<'a> {
    name: &'a str,
    data: &'a [u8],
}

fn ar_members(bytes: &[u8]) -> Result<Vec<ArMember<'_>>, DebError> {
    let mut rest = bytes.strip_prefix(b"!<arch>\n").ok_or(DebError::NotAr)?;
    let mut offset = 8;
    let mut members = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 60 {
            return Err(DebError::BadMember {
                offset,
                detail: "truncated header".into(),
            });
        }
        let (hdr, body) = rest.split_at(60);
        if &hdr[58..60] != b"`\n" {
            return Err(DebError::BadMember {
                offset,
                detail: "bad header terminator".into(),
            });
        }
        let name = std::str::from_utf8(&hdr[..16])
            .unwrap_or("?")
            .trim_end()
            .trim_end_matches('/');
        let size: usize = std::str::from_utf8(&hdr[48..58])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| DebError::BadMember {
                offset,
                detail: "bad size field".into(),
            })?;
        if size > body.len() {
            return Err(DebError::BadMember {
                offset,
                detail: format!(
                    "member `{name}` claims {size} bytes, {} remain: truncated archive",
                    body.len()
                ),
            });
        }
        members.push(ArMember {
            name,
            data: &body[..size],
        });
        let advance = (size + (size & 1)).min(body.len());
        rest = &body[advance..];
        offset += 60 + advance;
    }
    Ok(members)
}

fn decompress<'a>(member: &ArMember<'a>) -> Result<Box<dyn Read + 'a>, DebError> {
    let name = member.name;
    let data = member.data;
    Ok(if name.ends_with(".gz") {
        Box::new(flate2::read::GzDecoder::new(data))
    } else if name.ends_with(".xz") {
        Box::new(xz2::read::XzDecoder::new(data))
    } else if name.ends_with(".zst") {
        let d = ruzstd::decoding::StreamingDecoder::new(data).map_err(|e| DebError::Read {
            member: name.to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Box::new(d)
    } else if name.ends_with(".tar") {
        Box::new(data)
    } else {
        return Err(DebError::Compression {
            member: name.to_string(),
        });
    })
}

/// The largest `.deb` read (the biggest Debian packages are a few hundred MiB).
pub const MAX_DEB_BYTES: u64 = 4 << 30;

/// Parse and sweep one `.deb` held in memory. Members are streamed; an ELF member larger than
/// [`MAX_ELF_BYTES`] is reported, not read.
pub fn read_deb(bytes: &[u8], sweeper: &mut Sweeper) -> Result<DebOutcome, DebError> {
    let members = ar_members(bytes)?;
    let control = members
        .iter()
        .find(|m| m.name.starts_with("control.tar"))
        .ok_or(DebError::Missing("control.tar"))?;
    let data = members
        .iter()
        .find(|m| m.name.starts_with("data.tar"))
        .ok_or(DebError::Missing("data.tar"))?;
    let read_err = |member: &str| {
        let member = member.to_string();
        move |source| DebError::Read {
            member: member.clone(),
            source,
        }
    };

    let (mut package, mut architecture) = (None, String::new());
    let mut tar = tar::Archive::new(decompress(control)?);
    for entry in tar.entries().map_err(read_err(control.name))? {
        let mut entry = entry.map_err(read_err(control.name))?;
        let path = entry
            .path()
            .map_err(read_err(control.name))?
            .to_string_lossy()
            .into_owned();
        if path.trim_start_matches("./") == "control" {
            let mut text = String::new();
            (&mut entry)
                .take(1 << 20)
                .read_to_string(&mut text)
                .map_err(read_err(control.name))?;
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("Package:") {
                    package = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("Architecture:") {
                    architecture = v.trim().to_string();
                }
            }
        }
    }
    let package = package.ok_or(DebError::NoPackage)?;

    let mut outcome = DebOutcome {
        package,
        architecture,
        files: 0,
        elf_members: Vec::new(),
    };
    let mut tar = tar::Archive::new(decompress(data)?);
    for entry in tar.entries().map_err(read_err(data.name))? {
        let mut entry = entry.map_err(read_err(data.name))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        outcome.files += 1;
        let path = entry
            .path()
            .map_err(read_err(data.name))?
            .to_string_lossy()
            .into_owned();
        let path = format!("/{}", path.trim_start_matches("./").trim_start_matches('/'));
        let mut magic = [0u8; 4];
        let size = entry.header().size().unwrap_or(0);
        if size < 64 || entry.read_exact(&mut magic).is_err() || !is_elf(&magic) {
            continue;
        }
        if size > MAX_ELF_BYTES {
            // A decompression bomb costs time to skip, never memory.
            outcome.elf_members.push((
                path,
                Err(format!(
                    "{size} bytes: larger than the {} GiB an ELF member is scanned up to",
                    MAX_ELF_BYTES >> 30
                )),
            ));
            continue;
        }
        let mut content = magic.to_vec();
        (&mut entry)
            .take(MAX_ELF_BYTES)
            .read_to_end(&mut content)
            .map_err(read_err(data.name))?;
        outcome
            .elf_members
            .push((path, sweeper.sweep_elf(&content).map_err(|e| e.to_string())));
    }
    Ok(outcome)
}

/// Scan every `*.deb` directly inside `dir` (sorted, so shards and reports are stable).
pub fn scan_debs(
    dir: &Path,
    shard: Shard,
    cache: &mut ScanCache,
    progress: &dyn Progress,
) -> Result<CorpusScan, CoverageError> {
    let started = Instant::now();
    let mut debs: Vec<(PathBuf, FileStamp)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| CoverageError::io(dir, e))? {
        let entry = entry.map_err(|e| CoverageError::io(dir, e))?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "deb") {
            if let Ok(meta) = entry.metadata() {
                if meta.is_file() && shard.owns(&entry.file_name().to_string_lossy()) {
                    debs.push((path, FileStamp::of(&meta)));
                }
            }
        }
    }
    debs.sort_by(|a, b| a.0.cmp(&b.0));
    if debs.is_empty() && shard.count <= 1 {
        return Err(CoverageError::Invalid(format!("no .deb files in {}", dir.display())));
    }

    let mut counts = ScanCounts::default();
    let mut outcomes: Vec<(PathBuf, Result<DebOutcome, String>)> = Vec::new();
    let mut work = Vec::new();
    for (path, stamp) in debs {
        match cache.get(&path.to_string_lossy(), &stamp) {
            Some(CachedValue::Deb(d)) => {
                counts.cached += 1;
                outcomes.push((path, Ok((**d).clone())));
            }
            _ => work.push((path, stamp)),
        }
    }
    progress.start(work.iter().map(|(_, s)| s.size).sum());
    let fresh: Vec<_> = work
        .into_par_iter()
        .map_init(Sweeper::default, |sweeper, (path, stamp)| {
            let r = hbt_translator::host::files::read_regular(&path, MAX_DEB_BYTES, "a .deb")
                .map_err(|e| e.to_string())
                .and_then(|b| read_deb(&b, sweeper).map_err(|e| e.to_string()));
            progress.advance(stamp.size);
            (path, stamp, r)
        })
        .collect();
    progress.finish();
    for (path, stamp, r) in fresh {
        if let Ok(d) = &r {
            counts.fresh_code_bytes += d
                .elf_members
                .iter()
                .map(|(_, o)| {
                    if let Ok(SweepOutcome::X86_64(s)) = o {
                        s.code_bytes
                    } else {
                        0
                    }
                })
                .sum::<u64>();
            cache.insert(
                path.to_string_lossy().into_owned(),
                stamp,
                CachedValue::Deb(Box::new(d.clone())),
            );
        }
        outcomes.push((path, r));
    }
    outcomes.sort_by(|a, b| a.0.cmp(&b.0));

    let mut packages = BTreeSet::new();
    let mut binaries = Vec::new();
    let mut warnings = Vec::new();
    for (path, r) in outcomes {
        let deb = path.display().to_string();
        let d = match r {
            Ok(d) => d,
            Err(detail) => {
                counts.broken_debs += 1;
                warnings.push(ScanWarning { path: deb, detail });
                continue;
            }
        };
        packages.insert(d.package.clone());
        counts.files += d.files;
        for (member, outcome) in d.elf_members {
            counts.elf_files += 1;
            match outcome {
                Ok(SweepOutcome::X86_64(scan)) => binaries.push(ScannedBinary {
                    path: member,
                    package: Some(d.package.clone()),
                    scan,
                }),
                Ok(SweepOutcome::OtherArch { .. }) => counts.other_arch += 1,
                Ok(SweepOutcome::NotLoadable { .. }) => counts.not_loadable += 1,
                Err(detail) => {
                    counts.malformed += 1;
                    warnings.push(ScanWarning {
                        path: format!("{deb}:{member}"),
                        detail,
                    });
                }
            }
        }
    }
    Ok(CorpusScan {
        source: format!("debs {}", dir.display()),
        packages,
        binaries,
        counts,
        warnings,
        scan_seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_ar_and_truncated_archives() {
        let mut s = Sweeper::default();
        assert!(matches!(read_deb(b"hello", &mut s), Err(DebError::NotAr)));
        let mut deb = b"!<arch>\n".to_vec();
        deb.extend_from_slice(
            format!(
                "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                "debian-binary", 0, 0, 0, 100644, 4000
            )
            .as_bytes(),
        );
        deb.extend_from_slice(b"2.0\n");
        let err = read_deb(&deb, &mut s).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
