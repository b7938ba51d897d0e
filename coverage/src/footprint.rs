//! Package footprints: the instruction forms a package needs to run.
//!
//! footprint(p) = ⋃ codes(b) over b in closure(roots(p)), where roots(p) are p's executables
//! (or, for a package that ships only libraries, all of its ELF objects) and the closure follows
//! `PT_INTERP` and `DT_NEEDED` edges to libraries found *inside the same corpus*.
//!
//! A `DT_NEEDED` name is resolved like the dynamic loader would, restricted to what was scanned:
//! candidates are objects whose `DT_SONAME` or file name equals the name; among several, one in
//! the binary's `DT_RUNPATH` (with `$ORIGIN`) wins, then the standard multiarch directories.
//! Names that match nothing are counted as unresolved and reported.

use crate::corpus::dpkg::normalize;
use crate::corpus::CorpusScan;
use crate::keys::{code_count, KeySet};
use crate::sweep::ElfKind;
use std::collections::{BTreeMap, HashMap};

const DEFAULT_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
    "/lib",
    "/usr/local/lib",
];

#[derive(Clone, Debug)]
pub struct PackageFootprint {
    pub name: String,
    /// Executables (or objects, for library-only packages) the footprint starts from.
    pub roots: usize,
    /// Binaries in the closure, the package's own included.
    pub closure: usize,
    /// Code-granularity footprint, before any CPU-model filter.
    pub codes: KeySet,
}

#[derive(Clone, Debug, Default)]
pub struct Footprints {
    /// Packages with at least one x86-64 binary holding code, sorted by name.
    pub packages: Vec<PackageFootprint>,
    /// Needed names that matched no scanned object → number of binaries asking for them.
    pub unresolved: BTreeMap<String, u64>,
}

fn dir_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

fn base_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

struct LibraryIndex<'a> {
    by_path: HashMap<&'a str, usize>,
    by_name: HashMap<&'a str, Vec<usize>>,
}

impl<'a> LibraryIndex<'a> {
    fn new(corpus: &'a CorpusScan) -> Self {
        let mut by_path = HashMap::new();
        let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, b) in corpus.binaries.iter().enumerate() {
            by_path.entry(b.path.as_str()).or_insert(i);
            by_name.entry(base_of(&b.path)).or_default().push(i);
            if let Some(so) = &b.scan.soname {
                if so != base_of(&b.path) {
                    by_name.entry(so.as_str()).or_default().push(i);
                }
            }
        }
        LibraryIndex { by_path, by_name }
    }

    fn resolve(&self, corpus: &CorpusScan, from: usize, name: &str) -> Option<usize> {
        if name.contains('/') {
            if let Some(&i) = self.by_path.get(normalize(name).as_str()) {
                return Some(i);
            }
        }
        let candidates = self.by_name.get(base_of(name))?;
        if candidates.len() == 1 {
            return Some(candidates[0]);
        }
        let origin = dir_of(&corpus.binaries[from].path);
        let runpath: Vec<String> = corpus.binaries[from]
            .scan
            .runpath
            .iter()
            .map(|d| normalize(&d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)))
            .collect();
        let preferred = runpath.iter().map(String::as_str).chain(DEFAULT_DIRS.iter().copied());
        for dir in preferred {
            if let Some(&i) = candidates.iter().find(|&&i| dir_of(&corpus.binaries[i].path) == dir) {
                return Some(i);
            }
        }
        candidates.first().copied()
    }
}

/// Compute every package's footprint.
pub fn footprints(corpus: &CorpusScan) -> Footprints {
    let index = LibraryIndex::new(corpus);
    let mut unresolved: BTreeMap<String, u64> = BTreeMap::new();
    let deps: Vec<Vec<usize>> = corpus
        .binaries
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let names = b.scan.interp.iter().chain(&b.scan.needed);
            names
                .filter_map(|n| {
                    let r = index.resolve(corpus, i, n);
                    if r.is_none() {
                        *unresolved.entry(n.clone()).or_default() += 1;
                    }
                    r
                })
                .collect()
        })
        .collect();
    let own_codes: Vec<KeySet> = corpus
        .binaries
        .iter()
        .map(|b| {
            let mut s = KeySet::with_capacity(code_count());
            b.scan
                .counts
                .iter()
                .filter(|(c, _)| (*c as usize) < code_count())
                .for_each(|&(c, _)| s.insert(c as usize));
            s
        })
        .collect();

    let mut by_package: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, b) in corpus.binaries.iter().enumerate() {
        if let Some(p) = &b.package {
            by_package.entry(p.as_str()).or_default().push(i);
        }
    }
    let mut packages = Vec::new();
    for (name, members) in by_package {
        let executables: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&i| corpus.binaries[i].scan.kind == Some(ElfKind::Executable))
            .collect();
        let roots = if executables.is_empty() { members } else { executables };
        let mut seen = vec![false; corpus.binaries.len()];
        let mut stack = roots.clone();
        let mut codes = KeySet::with_capacity(code_count());
        let mut closure = 0;
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            closure += 1;
            codes.union_with(&own_codes[i]);
            stack.extend(deps[i].iter().copied().filter(|&d| !seen[d]));
        }
        // A package whose ELF files hold no code at all (data-only objects) needs nothing.
        if !codes.is_empty() {
            packages.push(PackageFootprint {
                name: name.to_string(),
                roots: roots.len(),
                closure,
                codes,
            });
        }
    }
    Footprints { packages, unresolved }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::ScannedBinary;
    use crate::sweep::BinaryScan;

    fn bin(
        path: &str,
        package: &str,
        kind: ElfKind,
        codes: &[u16],
        needed: &[&str],
        soname: Option<&str>,
    ) -> ScannedBinary {
        ScannedBinary {
            path: path.into(),
            package: Some(package.into()),
            scan: BinaryScan {
                counts: codes.iter().map(|&c| (c, 1)).collect(),
                kind: Some(kind),
                needed: needed.iter().map(|s| s.to_string()).collect(),
                soname: soname.map(str::to_owned),
                ..BinaryScan::default()
            },
        }
    }

    #[test]
    fn closure_follows_needed_through_sonames() {
        let corpus = CorpusScan {
            binaries: vec![
                bin(
                    "/usr/lib/x86_64-linux-gnu/libc.so.6",
                    "libc6",
                    ElfKind::SharedObject,
                    &[1, 2],
                    &[],
                    Some("libc.so.6"),
                ),
                bin(
                    "/usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
                    "zlib1g",
                    ElfKind::SharedObject,
                    &[3],
                    &["libc.so.6"],
                    Some("libz.so.1"),
                ),
                bin(
                    "/usr/bin/gzip",
                    "gzip",
                    ElfKind::Executable,
                    &[4],
                    &["libz.so.1", "libmissing.so.9"],
                    None,
                ),
                bin(
                    "/usr/bin/true",
                    "coreutils",
                    ElfKind::Executable,
                    &[5],
                    &["libc.so.6"],
                    None,
                ),
            ],
            ..CorpusScan::default()
        };
        let f = footprints(&corpus);
        let get = |n: &str| f.packages.iter().find(|p| p.name == n).unwrap();
        assert_eq!(get("gzip").codes.iter().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(get("gzip").closure, 3);
        assert_eq!(get("coreutils").codes.iter().collect::<Vec<_>>(), vec![1, 2, 5]);
        // Library-only packages start from their own objects.
        assert_eq!(get("zlib1g").codes.iter().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(f.unresolved.get("libmissing.so.9"), Some(&1));
    }
}
