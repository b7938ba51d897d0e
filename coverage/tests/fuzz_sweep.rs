//! Mutation fuzzing of the ELF sweep and the .deb reader: thousands of corrupted versions of
//! real files (bit flips, byte stores, truncations, header field overwrites) must each give
//! a result or an error — never a panic or a hang. Deterministic (seeded), so a failure
//! reproduces; the seed and mutation are printed on failure.

use hbt_coverage::corpus::deb::read_deb;
use hbt_coverage::sweep::Sweeper;
use hbt_translator::harness::ci_summary;
use hbt_translator::harness::mutate::Mutator;
use std::panic::{catch_unwind, AssertUnwindSafe};

fn seeds() -> Vec<Vec<u8>> {
    ["/usr/bin/true", "/usr/bin/ls", "/usr/lib/x86_64-linux-gnu/libz.so.1"]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

#[test]
fn mutated_elf_files_never_panic() {
    let seeds = seeds();
    assert!(!seeds.is_empty(), "no seed binaries found");
    let mut sweeper = Sweeper::default();
    let mut m = Mutator::new(0x5eed_0001, 0..64);
    const RUNS: usize = 20_000;
    for i in 0..RUNS {
        let seed = &seeds[i % seeds.len()];
        let input = m.mutate(seed);
        let r = catch_unwind(AssertUnwindSafe(|| {
            let _ = sweeper.sweep_elf(&input);
        }));
        assert!(
            r.is_ok(),
            "sweep_elf panicked on mutation {i} (seed 0x5eed0001, {} bytes)",
            input.len()
        );
    }
    ci_summary(&format!(
        "fuzz: ELF sweep, {RUNS} mutants of {} binaries, no panic",
        seeds.len()
    ));
}

#[test]
fn mutated_debs_never_panic() {
    // A tiny but real .deb built with dpkg-deb.
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::fs::copy("/usr/bin/true", tree.join("usr/bin/true")).unwrap();
    std::fs::write(
        tree.join("DEBIAN/control"),
        "Package: t\nVersion: 1\nArchitecture: amd64\nMaintainer: t <t@example.org>\nDescription: t\n",
    )
    .unwrap();
    let deb = dir.path().join("t.deb");
    let st = std::process::Command::new("dpkg-deb")
        .args(["-Zgzip", "--root-owner-group", "--build"])
        .arg(&tree)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(st.status.success());
    let seed = std::fs::read(&deb).unwrap();
    let mut sweeper = Sweeper::default();
    assert!(read_deb(&seed, &mut sweeper).is_ok());
    let mut m = Mutator::new(0x5eed_0002, 0..256);
    const RUNS: usize = 5_000;
    for i in 0..RUNS {
        let input = m.mutate(&seed);
        let r = catch_unwind(AssertUnwindSafe(|| {
            let _ = read_deb(&input, &mut sweeper);
        }));
        assert!(r.is_ok(), "read_deb panicked on mutation {i} (seed 0x5eed0002)");
    }
    ci_summary(&format!("fuzz: .deb reader, {RUNS} mutants, no panic"));
}
