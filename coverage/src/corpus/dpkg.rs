//! The dpkg database of an installed root: which package owns which path.
//!
//! `var/lib/dpkg/info/<package>[:<arch>].list` lists every path a package installed. Paths are
//! as the package shipped them (`/lib/x86_64-linux-gnu/libc.so.6`), but on a merged-/usr
//! system `/lib` is a symlink to `usr/lib`, so each listed directory is resolved through the
//! root's symlinks ([`RootPaths`]) before it is compared with what the walk found.

use super::ScanWarning;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Path → owning package, with the canonical (symlink-free) path as key.
#[derive(Default)]
pub struct DpkgDb {
    pub owner: HashMap<String, String>,
    pub packages: BTreeSet<String>,
}

impl DpkgDb {
    /// Read the dpkg database under `root`. A root without one yields an empty database and a
    /// warning: every file is then "unowned".
    pub fn load(root: &Path, warnings: &mut Vec<ScanWarning>) -> DpkgDb {
        let info = root.join("var/lib/dpkg/info");
        let mut db = DpkgDb::default();
        let entries = match std::fs::read_dir(&info) {
            Ok(e) => e,
            Err(e) => {
                warnings.push(ScanWarning {
                    path: info.display().to_string(),
                    detail: format!("no dpkg database ({e}); files cannot be attributed to packages"),
                });
                return db;
            }
        };
        let mut resolver = RootPaths::new(root);
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".list") else {
                continue;
            };
            let package = stem.split(':').next().unwrap_or(stem).to_string();
            // A hostile root may hold a FIFO or a device here: refused, never waited on.
            let text = match hbt_translator::host::files::read_regular(&entry.path(), 1 << 30, "a dpkg file list") {
                Ok(t) => t,
                Err(e) => {
                    warnings.push(ScanWarning {
                        path: entry.path().display().to_string(),
                        detail: format!("skipped: {e}"),
                    });
                    continue;
                }
            };
            db.packages.insert(package.clone());
            for line in String::from_utf8_lossy(&text).lines() {
                let line = line.trim_end();
                if !line.starts_with('/') || line == "/." {
                    continue;
                }
                db.owner.insert(resolver.canonical_file(line), package.clone());
            }
        }
        db
    }
}

/// Resolves paths inside a root through the root's own symlinks (absolute link targets are
/// taken relative to the root, never the host), memoised per directory.
pub struct RootPaths {
    root: PathBuf,
    memo: HashMap<String, String>,
}

impl RootPaths {
    pub fn new(root: &Path) -> Self {
        RootPaths {
            root: root.to_path_buf(),
            memo: HashMap::new(),
        }
    }

    /// Canonical form of a file path: its directory resolved, its last component kept.
    pub fn canonical_file(&mut self, path: &str) -> String {
        let (dir, name) = split_last(path);
        let dir = self.canonical_dir(dir, 0);
        join(&dir, name)
    }

    fn canonical_dir(&mut self, dir: &str, depth: u32) -> String {
        if dir == "/" || dir.is_empty() {
            return "/".to_string();
        }
        if let Some(c) = self.memo.get(dir) {
            return c.clone();
        }
        let (parent, name) = split_last(dir);
        let parent = self.canonical_dir(parent, depth + 1);
        let candidate = join(&parent, name);
        let on_disk = self.root.join(candidate.trim_start_matches('/'));
        let resolved = match std::fs::read_link(&on_disk) {
            Ok(target) if depth < 40 => {
                let target = target.to_string_lossy();
                let joined = if target.starts_with('/') {
                    target.to_string()
                } else {
                    join(&parent, &target)
                };
                self.canonical_dir(&normalize(&joined), depth + 1)
            }
            _ => candidate,
        };
        self.memo.insert(dir.to_string(), resolved.clone());
        resolved
    }
}

fn split_last(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(0) => ("/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("/", path),
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Lexically remove `.` and `..` components.
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_merged_usr_inside_root() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("usr/lib/x86_64-linux-gnu")).unwrap();
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", r.join("abs")).unwrap();
        let mut p = RootPaths::new(r);
        assert_eq!(
            p.canonical_file("/lib/x86_64-linux-gnu/libc.so.6"),
            "/usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert_eq!(
            p.canonical_file("/abs/x86_64-linux-gnu/libc.so.6"),
            "/usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert_eq!(p.canonical_file("/usr/bin/ls"), "/usr/bin/ls");
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        let _ = p.canonical_file("/loop/x"); // terminates
    }

    #[test]
    fn normalizes_dots() {
        assert_eq!(normalize("/usr/lib/../bin/./x"), "/usr/bin/x");
        assert_eq!(normalize("/../.."), "/");
    }
}
