//! Package weights from Debian popularity-contest `by_inst` data.
//!
//! P(p) = installs(p) / submissions. A real `by_inst` file looks like
//! `#rank name inst vote old recent no-files (maintainer)` with a header line
//! `Number of submissions considered: N`; the embedded default is the 2018 Ubuntu+Debian snapshot
//! of the instruction-popularity study (9,332 packages, denominator 2,963,664) in the form
//! `rank<TAB>name<TAB>inst`. Both parse here.
//!
//! Package names drift (gcc-5 → gcc-12, python3.5 → python3.11, libssl1.1 → libssl3t64), so a
//! package is matched exactly first, then by its [`stripped_name`]: version digits removed on
//! both sides. [`Popularity::weigh`] reports how many matched each way.

use crate::error::{CoverageError, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// The embedded default snapshot.
pub const DEFAULT_SNAPSHOT: &str = include_str!("../data/popcon-2018-ubuntu+debian.tsv");
pub const DEFAULT_SNAPSHOT_NAME: &str = "embedded popcon 2018 (Ubuntu+Debian, 9,332 packages)";

#[derive(Clone, Debug)]
pub struct Popularity {
    pub source: String,
    pub submissions: u64,
    installs: HashMap<String, u64>,
    /// Stripped name → the largest install count among the names that strip to it.
    stripped: HashMap<String, u64>,
    /// Lines that were neither records nor comments: (line number, text).
    pub bad_lines: Vec<(usize, String)>,
}

/// How one package got its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchKind {
    Exact,
    Stripped,
    Missing,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Weight {
    pub installs: u64,
    /// installs / submissions, clamped to [0, 1].
    pub p: f64,
    pub matched: MatchKind,
}

impl Popularity {
    pub fn embedded() -> Self {
        Self::parse(DEFAULT_SNAPSHOT, DEFAULT_SNAPSHOT_NAME, None).expect("embedded popcon snapshot parses")
    }

    pub fn from_file(path: &Path, submissions: Option<u64>) -> Result<Self> {
        // A real by_inst file is a few MiB.
        let bytes = hbt_translator::host::files::read_regular(path, 1 << 30, "a popcon by_inst file")?;
        Self::parse(
            &String::from_utf8_lossy(&bytes),
            &path.display().to_string(),
            submissions,
        )
        .ok_or_else(|| CoverageError::EmptyPopcon {
            path: path.to_path_buf(),
        })
    }

    /// Parse popcon text. `submissions` overrides what the header says. `None` when the text
    /// holds no record at all.
    pub fn parse(text: &str, source: &str, submissions: Option<u64>) -> Option<Self> {
        let mut installs = HashMap::new();
        let mut bad_lines = Vec::new();
        let mut header_submissions = None;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with("---") {
                continue;
            }
            if line.starts_with('#') {
                header_submissions = header_submissions.or_else(|| submissions_in_header(line));
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [rank, name, inst, ..] if rank.parse::<u64>().is_ok() && inst.parse::<u64>().is_ok() => {
                    if *name == "Total" {
                        continue;
                    }
                    let inst: u64 = inst.parse().unwrap_or(0);
                    let e = installs.entry(name.to_string()).or_insert(0);
                    *e = (*e).max(inst);
                }
                ["rank", "name", ..] => {}
                _ => bad_lines.push((i + 1, line.chars().take(80).collect())),
            }
        }
        if installs.is_empty() {
            return None;
        }
        let max = installs.values().copied().max().unwrap_or(1);
        let submissions = submissions.or(header_submissions).unwrap_or(max).max(1);
        let mut stripped: HashMap<String, u64> = HashMap::new();
        for (name, &n) in &installs {
            let e = stripped.entry(stripped_name(name)).or_insert(0);
            *e = (*e).max(n);
        }
        Some(Popularity {
            source: source.to_string(),
            submissions,
            installs,
            stripped,
            bad_lines,
        })
    }

    pub fn len(&self) -> usize {
        self.installs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.installs.is_empty()
    }

    /// The weight of a package.
    pub fn weigh(&self, package: &str) -> Weight {
        let (installs, matched) = match self.installs.get(package) {
            Some(&n) => (n, MatchKind::Exact),
            None => match self.stripped.get(&stripped_name(package)) {
                Some(&n) => (n, MatchKind::Stripped),
                None => (0, MatchKind::Missing),
            },
        };
        Weight {
            installs,
            p: (installs as f64 / self.submissions as f64).clamp(0.0, 1.0),
            matched,
        }
    }
}

/// `Number of submissions considered: N` (popcon) or `totalNumInstallations = N` (the study).
fn submissions_in_header(line: &str) -> Option<u64> {
    for key in ["Number of submissions considered:", "totalNumInstallations ="] {
        if let Some(pos) = line.find(key) {
            let rest = &line[pos + key.len()..];
            let digits: String = rest.trim_start().chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

/// A package name with version numbers removed: digits and dots go, the `t64` transition suffix
/// goes, and the dashes that held them together collapse. `gcc-12` and `gcc-5` → `gcc`,
/// `python3.11` → `python`, `libssl3t64` → `libssl`, `libstdc++6` → `libstdc++`.
pub fn stripped_name(name: &str) -> String {
    let name = name.strip_suffix("t64").unwrap_or(name);
    let kept: String = name.chars().filter(|c| !c.is_ascii_digit() && *c != '.').collect();
    let mut out = String::with_capacity(kept.len());
    for part in kept.split('-').filter(|p| !p.is_empty()) {
        if !out.is_empty() {
            out.push('-');
        }
        out.push_str(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_snapshot_matches_the_study() {
        let p = Popularity::embedded();
        assert_eq!(p.len(), 9332);
        assert_eq!(p.submissions, 2_963_664);
        assert!(p.bad_lines.is_empty(), "{:?}", &p.bad_lines[..p.bad_lines.len().min(3)]);
        let w = p.weigh("coreutils");
        assert_eq!(w.matched, MatchKind::Exact);
        assert!((w.p - 2_960_564.0 / 2_963_664.0).abs() < 1e-12);
    }

    #[test]
    fn real_by_inst_format_with_garbage() {
        let text = "#Format\n#\n# Number of submissions considered: 1000\n#rank name inst vote old recent no-files (maintainer)\n\
                    1     dpkg     990   900  50  30  10 (Dpkg Developers)\n\
                    2     gcc-5    500   100 300  50  50 (Debian GCC Maintainers)\n\
                    this is garbage\n\
                    3     broken   notanumber\n\
                    ----- \n99999 Total 1234 1 1 1 1\n";
        let p = Popularity::parse(text, "test", None).unwrap();
        assert_eq!(p.submissions, 1000);
        assert_eq!(p.len(), 2);
        assert_eq!(p.bad_lines.iter().map(|b| b.0).collect::<Vec<_>>(), vec![7, 8]);
        assert_eq!(p.weigh("dpkg").p, 0.99);
        let gcc = p.weigh("gcc-12");
        assert_eq!((gcc.matched, gcc.installs), (MatchKind::Stripped, 500));
        assert_eq!(p.weigh("nonexistent").matched, MatchKind::Missing);
        assert_eq!(Popularity::parse(text, "t", Some(2000)).unwrap().weigh("dpkg").p, 0.495);
        assert!(Popularity::parse("garbage only\n", "t", None).is_none());
    }

    #[test]
    fn stripping_versions() {
        assert_eq!(stripped_name("gcc-12"), "gcc");
        assert_eq!(stripped_name("gcc-12-base"), "gcc-base");
        assert_eq!(stripped_name("python3.11-minimal"), "python-minimal");
        assert_eq!(stripped_name("libssl3t64"), "libssl");
        assert_eq!(stripped_name("libstdc++6"), "libstdc++");
    }
}
