//! Per-file scan cache, so a re-run over an unchanged tree only walks it.
//!
//! A file's result is reused when its host path, size, mtime and inode are unchanged. Sweep
//! results (a few thousand ELF files) are stored in full; the hundreds of thousands of files
//! that turned out *not* to be ELF are stored as 64-bit hashes of (path, stamp) so that the warm
//! run does not even open them. The file is written atomically (temp + rename) and ignored —
//! never trusted — when its version, shape or checksum does not match: a stale or damaged cache
//! costs a cold scan, not a wrong answer. (FNV-1a detects every single-byte change: each step
//! is a bijection of the running hash.) Only a regular file of bounded size is read: a FIFO or
//! a device given as `--cache` is reported and ignored, never waited on.
//!
//! Layout: `MAGIC`, u64 LE length, JSON body, u64 LE count, that many u64 LE hashes, and the
//! u64 LE FNV-1a of everything before it.

use crate::corpus::deb::DebOutcome;
use crate::sweep::SweepOutcome;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"HBTCOV\x00\x03";
/// The largest cache file read back (a full system's is a few MiB).
const MAX_CACHE_BYTES: u64 = 1 << 30;

/// What identifies one version of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileStamp {
    pub size: u64,
    pub mtime_s: i64,
    pub mtime_ns: u32,
    pub ino: u64,
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            size: meta.len(),
            mtime_s: meta.mtime(),
            mtime_ns: meta.mtime_nsec() as u32,
            ino: meta.ino(),
        }
    }

    fn hash_with(&self, path: &str) -> u64 {
        crate::fnv::Fnv1a::default()
            .write(path.as_bytes())
            .write(&self.size.to_le_bytes())
            .write(&self.mtime_s.to_le_bytes())
            .write(&self.mtime_ns.to_le_bytes())
            .write(&self.ino.to_le_bytes())
            .finish()
    }
}

/// A remembered result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CachedValue {
    /// An ELF file: its classification and sweep, or the error message it produced.
    Elf(Result<SweepOutcome, String>),
    /// A whole `.deb` archive.
    Deb(Box<DebOutcome>),
}

#[derive(Serialize, Deserialize)]
struct Body {
    version: String,
    entries: Vec<(String, FileStamp, CachedValue)>,
}

pub struct ScanCache {
    file: Option<PathBuf>,
    entries: HashMap<String, (FileStamp, CachedValue)>,
    not_elf: HashSet<u64>,
    dirty: bool,
}

fn version() -> String {
    format!(
        "hbt-coverage {} codes {}",
        env!("CARGO_PKG_VERSION"),
        crate::keys::code_count()
    )
}

impl ScanCache {
    /// A cache that remembers nothing and writes nothing (`--no-cache`).
    pub fn disabled() -> Self {
        ScanCache {
            file: None,
            entries: HashMap::new(),
            not_elf: HashSet::new(),
            dirty: false,
        }
    }

    /// Default location: `$XDG_CACHE_HOME/hbt/coverage.cache` or `~/.cache/hbt/coverage.cache`.
    pub fn default_path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("hbt").join("coverage.cache"))
    }

    /// Open the cache at `file`. A missing, foreign or damaged file gives an empty cache and
    /// (for damage) a note in `problem`.
    pub fn open(file: &Path) -> (Self, Option<String>) {
        let mut cache = ScanCache {
            file: Some(file.to_path_buf()),
            ..ScanCache::disabled()
        };
        if !file.exists() && file.symlink_metadata().is_err() {
            return (cache, None);
        }
        let bytes = match hbt_translator::host::files::read_regular(file, MAX_CACHE_BYTES, "a scan cache") {
            Ok(b) => b,
            Err(e) => return (cache, Some(format!("{e}; scanning cold"))),
        };
        if !bytes.starts_with(MAGIC) && bytes.starts_with(&MAGIC[..6]) {
            return (cache, None); // another hbt cache format: rebuild silently
        }
        match parse(&bytes) {
            Some((body, hashes)) if body.version == version() => {
                cache.entries = body.entries.into_iter().map(|(p, s, v)| (p, (s, v))).collect();
                cache.not_elf = hashes;
                (cache, None)
            }
            Some(_) => (cache, None), // another hbt version: rebuild silently
            None => (
                cache,
                Some(format!(
                    "cache {} is damaged; scanning cold and rewriting it",
                    file.display()
                )),
            ),
        }
    }

    pub fn get(&self, path: &str, stamp: &FileStamp) -> Option<&CachedValue> {
        self.entries.get(path).filter(|(s, _)| s == stamp).map(|(_, v)| v)
    }

    pub fn is_known_not_elf(&self, path: &str, stamp: &FileStamp) -> bool {
        self.not_elf.contains(&stamp.hash_with(path))
    }

    pub fn insert(&mut self, path: String, stamp: FileStamp, value: CachedValue) {
        self.entries.insert(path, (stamp, value));
        self.dirty = true;
    }

    pub fn insert_not_elf(&mut self, path: &str, stamp: &FileStamp) {
        if self.file.is_some() && self.not_elf.insert(stamp.hash_with(path)) {
            self.dirty = true;
        }
    }

    /// Write the cache back if anything changed. Failure to write is reported, not fatal.
    pub fn save(&mut self) -> Result<(), String> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let body = Body {
            version: version(),
            entries: self
                .entries
                .iter()
                .map(|(p, (s, v))| (p.clone(), *s, v.clone()))
                .collect(),
        };
        let json = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(json.len() + self.not_elf.len() * 8 + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&(self.not_elf.len() as u64).to_le_bytes());
        for h in &self.not_elf {
            out.extend_from_slice(&h.to_le_bytes());
        }
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        let write = || -> std::io::Result<()> {
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = file.with_extension(format!("tmp{}", std::process::id()));
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&out)?;
            f.sync_all()?;
            std::fs::rename(&tmp, file)
        };
        write().map_err(|e| format!("cannot write cache {}: {e}", file.display()))?;
        self.dirty = false;
        Ok(())
    }
}

fn checksum(bytes: &[u8]) -> u64 {
    crate::fnv::Fnv1a::default().write(bytes).finish()
}

fn parse(bytes: &[u8]) -> Option<(Body, HashSet<u64>)> {
    let (bytes, sum) = bytes.split_last_chunk::<8>()?;
    if checksum(bytes) != u64::from_le_bytes(*sum) {
        return None;
    }
    let rest = bytes.strip_prefix(MAGIC)?;
    let (len, rest) = take_u64(rest)?;
    let len = usize::try_from(len).ok().filter(|&l| l <= rest.len())?;
    let body: Body = serde_json::from_slice(&rest[..len]).ok()?;
    let (count, mut rest) = take_u64(&rest[len..])?;
    if count.checked_mul(8)? != rest.len() as u64 {
        return None;
    }
    let mut hashes = HashSet::with_capacity(count as usize);
    while let Some((h, r)) = take_u64(rest) {
        hashes.insert(h);
        rest = r;
    }
    Some((body, hashes))
}

fn take_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let (head, rest) = b.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*head), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(size: u64) -> FileStamp {
        FileStamp {
            size,
            mtime_s: 1,
            mtime_ns: 2,
            ino: 3,
        }
    }

    #[test]
    fn round_trip_and_staleness() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c/coverage.cache");
        let (mut c, problem) = ScanCache::open(&file);
        assert!(problem.is_none());
        c.insert("/bin/x".into(), stamp(10), CachedValue::Elf(Err("bad".into())));
        c.insert_not_elf("/etc/passwd", &stamp(5));
        c.save().unwrap();
        let (c, problem) = ScanCache::open(&file);
        assert!(problem.is_none());
        assert_eq!(c.get("/bin/x", &stamp(10)), Some(&CachedValue::Elf(Err("bad".into()))));
        assert_eq!(c.get("/bin/x", &stamp(11)), None, "changed size must miss");
        assert!(c.is_known_not_elf("/etc/passwd", &stamp(5)));
        assert!(!c.is_known_not_elf("/etc/passwd", &stamp(6)));
    }

    #[test]
    fn every_single_byte_edit_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coverage.cache");
        let (mut c, _) = ScanCache::open(&file);
        for i in 0..20 {
            c.insert(
                format!("/bin/x{i}"),
                stamp(10 + i),
                CachedValue::Elf(Err(format!("e{i}"))),
            );
        }
        c.save().unwrap();
        let good = std::fs::read(&file).unwrap();
        let mut rng = hbt_translator::harness::rng::Rng::new(0xcace);
        for _ in 0..400 {
            let mut b = good.clone();
            let at = rng.below(b.len() as u64) as usize;
            let digit = b"0123456789"[rng.below(10) as usize];
            b[at] = if b[at] == digit { digit ^ 1 } else { digit };
            std::fs::write(&file, &b).unwrap();
            let (c, problem) = ScanCache::open(&file);
            assert!(problem.is_some(), "edit at byte {at} not reported");
            assert!(c.entries.is_empty(), "edit at byte {at} trusted");
        }
    }

    /// Fuzz target: 20,000 mutants of a real cache file, parsed in memory. Each is either
    /// rejected or (if the mutation happened to be a no-op) identical to the original.
    #[test]
    fn fuzz_cache_parse() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coverage.cache");
        let (mut c, _) = ScanCache::open(&file);
        for i in 0..30 {
            c.insert(
                format!("/usr/lib/x{i}.so"),
                stamp(100 + i),
                CachedValue::Elf(Err(format!("e{i}"))),
            );
            c.insert_not_elf(&format!("/etc/f{i}"), &stamp(i));
        }
        c.save().unwrap();
        let good = std::fs::read(&file).unwrap();
        let mut m = hbt_translator::harness::mutate::Mutator::new(0xc0ffee, 0..64);
        const RUNS: usize = 20_000;
        let mut accepted = 0;
        for i in 0..RUNS {
            let input = m.mutate(&good);
            let r = std::panic::catch_unwind(|| parse(&input).is_some());
            assert!(r.is_ok(), "parse panicked on mutant {i} (seed 0xc0ffee)");
            if r.unwrap() {
                assert_eq!(input, good, "mutant {i} was accepted but differs");
                accepted += 1;
            }
        }
        hbt_translator::harness::ci_summary(&format!(
            "fuzz: scan cache, {RUNS} mutants, no panic, none trusted ({accepted} were no-op mutations)"
        ));
    }

    #[test]
    fn a_fifo_cache_is_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path in our temp directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (_, problem) = ScanCache::open(&fifo);
        assert!(problem.unwrap().contains("is a FIFO"));
    }

    #[test]
    fn damaged_cache_is_reported_and_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coverage.cache");
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage");
        std::fs::write(&file, bad).unwrap();
        let (c, problem) = ScanCache::open(&file);
        assert!(problem.is_some());
        assert!(c.get("/x", &stamp(1)).is_none());
    }
}
