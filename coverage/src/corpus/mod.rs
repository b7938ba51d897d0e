//! Corpus discovery: which ELF files exist, which package owns each, and their sweep results.
//!
//! Two sources feed the same [`CorpusScan`]:
//! - [`root`]: an installed Debian/Ubuntu system, walked on one file system, files attributed
//!   through its dpkg database ([`dpkg`]);
//! - [`deb`]: a directory of `.deb` archives read directly (ar + tar + gz/xz/zstd).
//!
//! Scanning is parallel (rayon), remembered per file in the [`crate::cache::ScanCache`], and can
//! be restricted to one [`Shard`] of the work so several machines can split a large corpus.

pub mod deb;
pub mod dpkg;
pub mod root;

use crate::error::CoverageError;
use crate::sweep::BinaryScan;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::str::FromStr;

/// One x86-64 program or shared object found in the corpus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScannedBinary {
    /// Install path, e.g. `/usr/bin/ls` (inside the root or the archive).
    pub path: String,
    /// Owning package; `None` for files no package owns.
    pub package: Option<String>,
    #[serde(flatten)]
    pub scan: BinaryScan,
}

/// A per-file problem that did not stop the scan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScanWarning {
    pub path: String,
    pub detail: String,
}

/// Counters of everything the scan saw, including what it could not use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScanCounts {
    /// Regular files (or archive members) considered.
    pub files: u64,
    /// Files with ELF magic (any machine).
    pub elf_files: u64,
    /// ELF files for other machines or classes (i386, BPF objects, firmware, …).
    pub other_arch: u64,
    /// x86-64 relocatable objects and core files (not loadable, not in footprints).
    pub not_loadable: u64,
    /// ELF files that failed to parse or were truncated.
    pub malformed: u64,
    /// Files or directories that could not be read.
    pub unreadable: u64,
    /// `.deb` archives that could not be read.
    pub broken_debs: u64,
    /// x86-64 binaries that no package owns.
    pub unowned: u64,
    /// Files whose result came from the cache.
    pub cached: u64,
    /// Code bytes decoded during this run (not from cache).
    pub fresh_code_bytes: u64,
}

/// The raw result of scanning a corpus (or one shard of it): what a part file carries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CorpusScan {
    /// Human description of the source, e.g. `root /` or `debs ./pool`.
    pub source: String,
    /// Every package of the corpus, with or without ELF files.
    pub packages: BTreeSet<String>,
    pub binaries: Vec<ScannedBinary>,
    pub counts: ScanCounts,
    pub warnings: Vec<ScanWarning>,
    /// Wall-clock seconds spent scanning (walk + read + decode).
    pub scan_seconds: f64,
}

impl CorpusScan {
    /// Code bytes of every binary in the corpus (cached or not).
    pub fn code_bytes(&self) -> u64 {
        self.binaries.iter().map(|b| b.scan.code_bytes).sum()
    }

    pub fn invalid_bytes(&self) -> u64 {
        self.binaries.iter().map(|b| b.scan.invalid_bytes).sum()
    }

    /// Fold another shard's scan into this one.
    pub fn merge(&mut self, other: CorpusScan) {
        if self.source.is_empty() {
            self.source = other.source;
        } else if self.source != other.source {
            self.source = format!("{} + {}", self.source, other.source);
        }
        self.packages.extend(other.packages);
        self.binaries.extend(other.binaries);
        self.warnings.extend(other.warnings);
        let (a, b) = (&mut self.counts, other.counts);
        a.files += b.files;
        a.elf_files += b.elf_files;
        a.other_arch += b.other_arch;
        a.not_loadable += b.not_loadable;
        a.malformed += b.malformed;
        a.unreadable += b.unreadable;
        a.broken_debs += b.broken_debs;
        a.unowned += b.unowned;
        a.cached += b.cached;
        a.fresh_code_bytes += b.fresh_code_bytes;
        self.scan_seconds += other.scan_seconds;
    }
}

/// Reports scan progress in bytes; the CLI draws a bar, libraries and tests pass [`NoProgress`].
pub trait Progress: Sync {
    fn start(&self, total_bytes: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// Shard `index` (0-based) of `count`: the work items whose path hashes to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Whether the work item named `key` belongs to this shard (by a hash stable across machines).
    pub fn owns(&self, key: &str) -> bool {
        if self.count <= 1 {
            return true;
        }
        let h = crate::fnv::Fnv1a::default().write(key.as_bytes()).finish();
        h % u64::from(self.count) == u64::from(self.index)
    }
}

impl FromStr for Shard {
    type Err = CoverageError;
    /// `K/N`, 1-based: `1/4` is the first of four shards.
    fn from_str(s: &str) -> Result<Self, CoverageError> {
        let bad = || CoverageError::BadShard(s.to_string());
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n): (u32, u32) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if k == 0 || n == 0 || k > n {
            return Err(bad());
        }
        Ok(Shard { index: k - 1, count: n })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_work() {
        let shards: Vec<Shard> = (1..=3).map(|k| format!("{k}/3").parse().unwrap()).collect();
        for i in 0..1000 {
            let key = format!("/usr/lib/file{i}");
            assert_eq!(shards.iter().filter(|s| s.owns(&key)).count(), 1);
        }
        assert!("0/3".parse::<Shard>().is_err());
        assert!("4/3".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }
}
