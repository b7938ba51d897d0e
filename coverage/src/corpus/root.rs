//! Scan an installed root: walk one file system, sweep every ELF file, attribute by dpkg.
//!
//! The walk never follows symlinks (so merged-/usr is seen once) and stays on the root's file
//! system (so `/proc`, `/sys` and tmpfs mounts are skipped, like `du -x`). Files smaller than an
//! ELF64 header cannot be x86-64 binaries and are not opened.

use super::dpkg::DpkgDb;
use super::{CorpusScan, Progress, ScanCounts, ScanWarning, ScannedBinary, Shard};
use crate::cache::{CachedValue, FileStamp, ScanCache};
use crate::error::CoverageError;
use crate::sweep::{is_elf, SweepOutcome, Sweeper, MAX_ELF_BYTES};
use rayon::prelude::*;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

const ELF64_HEADER_LEN: u64 = 64;

struct WalkedFile {
    /// Path inside the root, e.g. `/usr/bin/ls`.
    path: String,
    host: PathBuf,
    stamp: FileStamp,
}

/// What one file turned out to be.
enum FileResult {
    NotElf,
    Elf(Result<SweepOutcome, String>),
    Unreadable(String),
}

pub fn scan_root(
    root: &Path,
    shard: Shard,
    cache: &mut ScanCache,
    progress: &dyn Progress,
) -> Result<CorpusScan, CoverageError> {
    let started = Instant::now();
    let root = root.canonicalize().map_err(|e| CoverageError::io(root, e))?;
    let root_meta = std::fs::metadata(&root).map_err(|e| CoverageError::io(&root, e))?;
    if !root_meta.is_dir() {
        return Err(CoverageError::Invalid(format!("{} is not a directory", root.display())));
    }
    let mut warnings = Vec::new();
    let db = DpkgDb::load(&root, &mut warnings);

    let walk_warnings = Mutex::new(Vec::new());
    let mut files = walk(&root, root_meta.dev(), &walk_warnings);
    warnings.extend(walk_warnings.into_inner().unwrap_or_default());
    files.retain(|f| shard.owns(&f.path));
    files.sort_unstable_by(|a, b| a.path.cmp(&b.path));

    let mut counts = ScanCounts {
        files: files.len() as u64,
        unreadable: warnings.len() as u64,
        ..ScanCounts::default()
    };
    let mut results: Vec<(String, FileResult)> = Vec::new();
    let mut work = Vec::new();
    for f in files {
        let key = f.host.to_string_lossy();
        if cache.is_known_not_elf(&key, &f.stamp) {
            continue;
        }
        match cache.get(&key, &f.stamp) {
            Some(CachedValue::Elf(r)) => {
                counts.cached += 1;
                results.push((f.path, FileResult::Elf(r.clone())));
            }
            _ => work.push(f),
        }
    }

    progress.start(work.iter().map(|f| f.stamp.size).sum());
    let fresh: Vec<(WalkedFile, FileResult)> = work
        .into_par_iter()
        .map_init(Sweeper::default, |sweeper, f| {
            let r = scan_file(&f.host, sweeper);
            progress.advance(f.stamp.size);
            (f, r)
        })
        .collect();
    progress.finish();

    for (f, r) in fresh {
        let key = f.host.to_string_lossy().into_owned();
        match &r {
            FileResult::NotElf => cache.insert_not_elf(&key, &f.stamp),
            FileResult::Elf(outcome) => {
                if let Ok(SweepOutcome::X86_64(s)) = outcome {
                    counts.fresh_code_bytes += s.code_bytes;
                }
                cache.insert(key, f.stamp, CachedValue::Elf(outcome.clone()));
            }
            FileResult::Unreadable(_) => {}
        }
        results.push((f.path, r));
    }
    results.sort_unstable_by(|a, b| a.0.cmp(&b.0));

    let mut binaries = Vec::new();
    for (path, r) in results {
        match r {
            FileResult::NotElf => {}
            FileResult::Unreadable(detail) => {
                counts.unreadable += 1;
                warnings.push(ScanWarning { path, detail });
            }
            FileResult::Elf(outcome) => {
                counts.elf_files += 1;
                match outcome {
                    Ok(SweepOutcome::X86_64(scan)) => {
                        let package = db.owner.get(&path).cloned();
                        if package.is_none() {
                            counts.unowned += 1;
                        }
                        binaries.push(ScannedBinary { path, package, scan });
                    }
                    Ok(SweepOutcome::OtherArch { .. }) => counts.other_arch += 1,
                    Ok(SweepOutcome::NotLoadable { .. }) => counts.not_loadable += 1,
                    Err(detail) => {
                        counts.malformed += 1;
                        warnings.push(ScanWarning { path, detail });
                    }
                }
            }
        }
    }
    Ok(CorpusScan {
        source: format!("root {}", root.display()),
        packages: db.packages,
        binaries,
        counts,
        warnings,
        scan_seconds: started.elapsed().as_secs_f64(),
    })
}

fn scan_file(host: &Path, sweeper: &mut Sweeper) -> FileResult {
    // Regular files only, opened without blocking (a FIFO created after the walk never hangs).
    let (mut file, size) = match hbt_translator::host::files::open_regular(host) {
        Ok(f) => f,
        Err(e) => return FileResult::Unreadable(e.to_string()),
    };
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() || !is_elf(&magic) {
        return FileResult::NotElf;
    }
    if size > MAX_ELF_BYTES {
        // A sparse multi-GiB "ELF" would cost minutes and gigabytes to sweep.
        return FileResult::Elf(Err(format!(
            "{size} bytes: larger than the {} GiB an ELF file is scanned up to",
            MAX_ELF_BYTES >> 30
        )));
    }
    // SAFETY: the mapping is private and read-only. Another process truncating the file while
    // we read it could raise SIGBUS; package managers replace files by rename (the mapped
    // inode stays intact), so this is the accepted cost of not copying gigabytes of code.
    let map = match unsafe { memmap2::Mmap::map(&file) } {
        Ok(m) => m,
        Err(e) => return FileResult::Unreadable(format!("cannot map: {e}")),
    };
    FileResult::Elf(sweeper.sweep_elf(&map).map_err(|e| e.to_string()))
}

/// Parallel walk of `root`, staying on device `dev`.
fn walk(root: &Path, dev: u64, warnings: &Mutex<Vec<ScanWarning>>) -> Vec<WalkedFile> {
    let out = Mutex::new(Vec::new());
    rayon::scope(|s| walk_dir(s, root.to_path_buf(), "/".to_string(), dev, &out, warnings));
    out.into_inner().unwrap_or_default()
}

fn walk_dir<'s>(
    scope: &rayon::Scope<'s>,
    host: PathBuf,
    rel: String,
    dev: u64,
    out: &'s Mutex<Vec<WalkedFile>>,
    warnings: &'s Mutex<Vec<ScanWarning>>,
) {
    let entries = match std::fs::read_dir(&host) {
        Ok(e) => e,
        Err(e) => {
            warnings.lock().unwrap_or_else(|p| p.into_inner()).push(ScanWarning {
                path: rel,
                detail: format!("cannot list directory: {e}"),
            });
            return;
        }
    };
    let mut local = Vec::new();
    for entry in entries.flatten() {
        let Ok(ft) = entry.file_type() else { continue };
        let name = entry.file_name();
        let child_rel = if rel == "/" {
            format!("/{}", name.to_string_lossy())
        } else {
            format!("{rel}/{}", name.to_string_lossy())
        };
        if ft.is_dir() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.dev() == dev {
                let child_host = entry.path();
                scope.spawn(move |s| walk_dir(s, child_host, child_rel, dev, out, warnings));
            }
        } else if ft.is_file() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.len() >= ELF64_HEADER_LEN {
                local.push(WalkedFile {
                    path: child_rel,
                    host: entry.path(),
                    stamp: FileStamp::of(&meta),
                });
            }
        }
    }
    out.lock().unwrap_or_else(|p| p.into_inner()).extend(local);
}
