//! `hbt coverage` against hostile or careless input (issue 11): endless and special files,
//! FIFOs where files are expected, sparse multi-GiB "ELF" files, a decompression bomb inside a
//! `.deb`, and a corpus without popularity. Every run is bounded in address space and time.

#[path = "../coverage/tests/common/mod.rs"]
mod common;
mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use support::{limit_memory, run_bounded};

const AS_LIMIT: u64 = 2 << 30;

fn hbt(args: &[&str], cache: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hbt"));
    cmd.args(args).env("XDG_CACHE_HOME", cache);
    limit_memory(&mut cmd, AS_LIMIT);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{args:?} panicked"
    );
    out
}

fn mkfifo(path: &Path) {
    support::mkfifo(path, 0o644)
}

#[test]
fn endless_and_special_inputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = hbt(&["coverage", "merge", "/dev/zero"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/dev/zero is a character device"), "{stderr}");
    assert_eq!(stderr.matches("character device").count(), 1, "said once: {stderr}");
    let root = common::fake_root(dir.path());
    let r = root.to_str().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    for args in [
        vec!["coverage", "merge", f],
        vec!["coverage", "--popcon", f, "--root", r, "--no-cache"],
        vec!["coverage", "--supported", f, "--root", r, "--no-cache"],
    ] {
        let out = hbt(&args, dir.path());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("is a FIFO"), "{args:?}");
    }
}

#[test]
fn fifos_in_a_scanned_root_and_as_the_cache_never_block() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::fake_root(dir.path());
    mkfifo(&root.join("var/lib/dpkg/info/trap.list"));
    let cache = dir.path().join("cache-fifo");
    mkfifo(&cache);
    let out = hbt(
        &[
            "coverage",
            "--root",
            root.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("trap.list") && stderr.contains("is a FIFO"), "{stderr}");
    assert!(stderr.contains("cache-fifo is a FIFO"), "{stderr}");
}

#[test]
fn a_sparse_giant_elf_is_reported_not_swept() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::fake_root(dir.path());
    let big = root.join("usr/bin/giant");
    let elf = std::fs::read("/bin/busybox").unwrap();
    std::fs::write(&big, &elf[..4096]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(10 << 30)
        .unwrap();
    common::dpkg_list(&root, "giant", &["/usr/bin/giant"]);
    let started = Instant::now();
    let out = hbt(
        &["coverage", "--root", root.to_str().unwrap(), "--no-cache"],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("giant") && stderr.contains("larger than the 2 GiB"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_decompression_bomb_in_a_deb_costs_no_memory() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    // A 3 GiB member with an ELF header: sparse on disk, tiny once zstd-compressed.
    let bomb = tree.join("usr/bin/bomb");
    std::fs::write(&bomb, &std::fs::read("/bin/busybox").unwrap()[..4096]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bomb)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    std::fs::copy("/bin/busybox", tree.join("usr/bin/busybox")).unwrap();
    std::fs::write(
        tree.join("DEBIAN/control"),
        "Package: bomb\nVersion: 1\nArchitecture: amd64\nMaintainer: t <t@example.org>\nDescription: t\n",
    )
    .unwrap();
    let debs = dir.path().join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    common::run(
        Command::new("dpkg-deb")
            .args(["-Zzstd", "-z1", "--root-owner-group", "--build"])
            .arg(&tree)
            .arg(debs.join("bomb.deb")),
    );
    let out = hbt(
        &["coverage", "--debs", debs.to_str().unwrap(), "--no-cache"],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("bomb") && stderr.contains("larger than the 2 GiB"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("binaries"),
        "the rest is scanned"
    );
}

#[test]
fn a_corpus_without_popularity_has_no_completeness_figure() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::fake_root(dir.path());
    let pop = common::popcon(dir.path(), 1000, &[("app", 0), ("libfoo1", 0), ("avxtool", 0)]);
    let out = hbt(
        &[
            "coverage",
            "--root",
            root.to_str().unwrap(),
            "--popcon",
            pop.to_str().unwrap(),
            "-q",
        ],
        dir.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("weighted completeness  n/a: no package of the corpus has a popularity weight"),
        "{stdout}"
    );
}
