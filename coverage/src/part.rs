//! Part files: the raw scan of one shard (`--shard K/N`), merged by `hbt coverage merge`.
//!
//! A part is JSON: `{"format": "hbt-coverage-part", "version": 1, "shard": {...}, "scan": {...}}`.
//! Parts are merged before analysis because footprints cross shard boundaries (an executable in
//! one shard loads a library scanned in another).

use crate::corpus::{CorpusScan, Shard};
use crate::error::{CoverageError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The largest part file `merge` reads (a whole distribution's is tens of MiB).
pub const MAX_PART_BYTES: u64 = 4 << 30;
const FORMAT: &str = "hbt-coverage-part";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
pub struct Part {
    pub format: String,
    pub version: u32,
    pub shard: Shard,
    pub scan: CorpusScan,
}

impl Part {
    pub fn new(shard: Shard, scan: CorpusScan) -> Self {
        Part {
            format: FORMAT.to_string(),
            version: VERSION,
            shard,
            scan,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a part file (a regular file of at most [`MAX_PART_BYTES`]).
    pub fn load(path: &Path) -> Result<Part> {
        let bytes = hbt_translator::host::files::read_regular(path, MAX_PART_BYTES, "a coverage part file")?;
        let bad = |detail: String| CoverageError::BadPart {
            path: path.to_path_buf(),
            detail,
        };
        let part: Part = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if part.format != FORMAT || part.version != VERSION {
            return Err(bad(format!(
                "format {} version {}, expected {FORMAT} version {VERSION}",
                part.format, part.version
            )));
        }
        Ok(part)
    }
}

/// Merge parts into one corpus. Every shard of one split must be present exactly once.
pub fn merge(parts: Vec<Part>) -> Result<CorpusScan> {
    let Some(count) = parts.first().map(|p| p.shard.count) else {
        return Err(CoverageError::IncompatibleParts("no part files given".into()));
    };
    let mut seen = vec![false; count as usize];
    for p in &parts {
        if p.shard.count != count {
            return Err(CoverageError::IncompatibleParts(format!(
                "shard counts differ ({} and {})",
                count, p.shard.count
            )));
        }
        if std::mem::replace(&mut seen[p.shard.index as usize], true) {
            return Err(CoverageError::IncompatibleParts(format!(
                "shard {}/{} given twice",
                p.shard.index + 1,
                count
            )));
        }
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(CoverageError::IncompatibleParts(format!(
            "shard {}/{count} is missing",
            missing + 1
        )));
    }
    let mut merged = CorpusScan::default();
    let mut scan_seconds: f64 = 0.0;
    for p in parts {
        scan_seconds = scan_seconds.max(p.scan.scan_seconds);
        merged.merge(p.scan);
    }
    // Shards run side by side: the corpus took as long as the slowest one.
    merged.scan_seconds = scan_seconds;
    merged.binaries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(merged)
}
