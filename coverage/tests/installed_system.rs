//! Tests against this machine's installed Debian system: hbt's sweep agrees with objdump, and
//! the whole-system analysis has the properties the metrics guarantee.

use hbt_coverage::cache::ScanCache;
use hbt_coverage::corpus::{root::scan_root, NoProgress, Shard};
use hbt_coverage::cpu_model::CpuModel;
use hbt_coverage::footprint::footprints;
use hbt_coverage::instr_set::InstructionSet;
use hbt_coverage::popcon::Popularity;
use hbt_coverage::sweep::{ElfKind, SweepOutcome, Sweeper};
use hbt_coverage::{analyze, AnalysisOptions, Granularity};
use std::path::Path;
use std::process::Command;

/// Real binaries from packages every Debian system has (plus a few common libraries).
const CANDIDATES: &[&str] = &[
    "/usr/bin/ls",
    "/usr/bin/cp",
    "/usr/bin/bash",
    "/usr/bin/grep",
    "/usr/bin/sed",
    "/usr/bin/tar",
    "/usr/bin/gzip",
    "/usr/bin/find",
    "/usr/bin/sort",
    "/usr/bin/dpkg",
    "/usr/bin/date",
    "/usr/bin/mount",
    "/usr/bin/diff",
    "/usr/bin/make",
    "/usr/bin/perl",
    "/usr/bin/as",
    "/usr/bin/git",
    "/usr/bin/xz",
    "/usr/bin/ssh",
    "/usr/bin/curl",
    "/usr/bin/python3.11",
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libm.so.6",
    "/usr/lib/x86_64-linux-gnu/libz.so.1",
    "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
    "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
    "/usr/lib/x86_64-linux-gnu/liblzma.so.5",
    "/usr/lib/x86_64-linux-gnu/libselinux.so.1",
    "/usr/lib/x86_64-linux-gnu/libgmp.so.10",
];

/// (valid instructions, "(bad)" lines) in `objdump -d -z` of every code section.
fn objdump_counts(path: &Path) -> (u64, u64) {
    let out = Command::new("objdump")
        .args(["-d", "-z", "-M", "intel", "--no-show-raw-insn"])
        .arg(path)
        .output()
        .expect("objdump (binutils) must be installed");
    assert!(out.status.success(), "objdump failed on {}", path.display());
    let (mut valid, mut bad) = (0, 0);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // Instruction lines look like "   1234:\tmov    eax,0x1".
        let Some((addr, rest)) = line.split_once(":\t") else {
            continue;
        };
        if addr.trim().is_empty() || !addr.trim().chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        if rest.contains("(bad)") {
            bad += 1;
        } else {
            valid += 1;
        }
    }
    (valid, bad)
}

#[test]
fn instruction_counts_agree_with_objdump() {
    let mut sweeper = Sweeper::default();
    let (mut hbt_total, mut objdump_total, mut compared) = (0u64, 0u64, 0);
    println!(
        "{:<48} {:>10} {:>10} {:>8} {:>8}",
        "binary", "hbt", "objdump", "diff", "(bad)"
    );
    for path in CANDIDATES.iter().map(Path::new).filter(|p| p.exists()) {
        let bytes = std::fs::read(path).unwrap();
        let Ok(SweepOutcome::X86_64(scan)) = sweeper.sweep_elf(&bytes) else {
            continue;
        };
        let hbt = scan.instructions();
        let (objdump, bad) = objdump_counts(path);
        println!(
            "{:<48} {:>10} {:>10} {:>+8} {:>8}",
            path.display(),
            hbt,
            objdump,
            hbt as i64 - objdump as i64,
            bad
        );
        hbt_total += hbt;
        objdump_total += objdump;
        compared += 1;
    }
    let rel = (hbt_total as f64 - objdump_total as f64).abs() / objdump_total as f64;
    println!(
        "total: hbt {hbt_total}, objdump {objdump_total}, relative difference {:.4}%",
        rel * 100.0
    );
    assert!(
        compared >= 20,
        "only {compared} of the reference binaries are installed"
    );
    assert!(rel <= 0.005, "hbt and objdump disagree by {:.3}% (> 0.5%)", rel * 100.0);
}

#[test]
fn whole_system_metrics() {
    let corpus = scan_root(Path::new("/"), Shard::WHOLE, &mut ScanCache::disabled(), &NoProgress).unwrap();
    assert!(
        corpus.binaries.len() > 100,
        "an installed Debian system has hundreds of x86-64 binaries"
    );

    // libc's code is in the footprint of every package with an executable linked against it
    // (not every dynamic executable is: klibc-utils' use klibc's own loader).
    let fp = footprints(&corpus);
    let libc = corpus
        .binaries
        .iter()
        .find(|b| b.path == "/usr/lib/x86_64-linux-gnu/libc.so.6")
        .expect("libc.so.6 scanned");
    let mut checked = 0;
    for p in &fp.packages {
        let dynamic_exe = corpus.binaries.iter().any(|b| {
            b.package.as_deref() == Some(p.name.as_str())
                && b.scan.kind == Some(ElfKind::Executable)
                && b.scan.interp.is_some()
                && b.scan.needed.iter().any(|n| n == "libc.so.6")
                && b.path != libc.path
        });
        if dynamic_exe {
            let missing: Vec<u16> = libc
                .scan
                .counts
                .iter()
                .map(|&(c, _)| c)
                .filter(|&c| !p.codes.contains(c as usize))
                .collect();
            assert!(
                missing.is_empty(),
                "package {} lacks {} libc forms",
                p.name,
                missing.len()
            );
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} packages with dynamic executables");

    let pop = Popularity::embedded();
    let analyze_with = |set: &InstructionSet, model| {
        analyze(
            &corpus,
            &AnalysisOptions {
                popularity: &pop,
                cpu_model: model,
                supported: set,
                granularity: Granularity::Mnemonic,
                next_count: 20,
                compare_top: None,
            },
        )
    };
    let all = analyze_with(&InstructionSet::all(), CpuModel::All);
    assert_eq!(all.supported.weighted_completeness, 1.0);
    let none = analyze_with(&InstructionSet::none(), CpuModel::All);
    assert_eq!(none.supported.weighted_completeness, 0.0);
    assert!(none.popularity.matched_exact > 20 && none.popularity.weighted_packages > 20);
    // mov is everywhere; the greedy plan ends at 100%; curves rise monotonically.
    assert_eq!(none.instructions[0].package_share, 1.0);
    assert!(none
        .instructions
        .iter()
        .any(|i| i.mnemonic == "mov" && i.package_share == 1.0));
    assert_eq!(none.plan.last().unwrap().weighted_completeness, 1.0);
    assert!(none
        .plan
        .windows(2)
        .all(|w| w[0].weighted_completeness <= w[1].weighted_completeness));
    // Narrower CPU models need fewer instructions.
    let n = |m: &str| none.cpu_models.iter().find(|r| r.cpu_model == m).unwrap().instructions;
    assert!(n("x86-64-v1") < n("x86-64-v3") && n("x86-64-v3") <= n("all"));
    // The translator's own set is a subset of everything.
    let tr = analyze_with(&InstructionSet::translator(), CpuModel::V3);
    assert!(tr.supported.weighted_completeness <= 1.0);
}
