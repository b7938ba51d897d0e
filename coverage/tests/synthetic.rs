//! End-to-end tests of the coverage pipeline on binaries built at test time, whose
//! instruction content is known exactly.

mod common;

use common::*;
use hbt_coverage::cache::ScanCache;
use hbt_coverage::corpus::{deb::scan_debs, root::scan_root, NoProgress, Shard};
use hbt_coverage::cpu_model::CpuModel;
use hbt_coverage::footprint::footprints;
use hbt_coverage::instr_set::InstructionSet;
use hbt_coverage::part::{merge, Part};
use hbt_coverage::popcon::Popularity;
use hbt_coverage::sweep::{BinaryScan, SweepOutcome, Sweeper};
use hbt_coverage::{analyze, AnalysisOptions, Granularity};
use iced_x86::Code;
use std::collections::BTreeMap;
use std::process::Command;

fn counts(scan: &BinaryScan) -> BTreeMap<Code, u32> {
    scan.counts
        .iter()
        .map(|&(c, n)| (Code::try_from(c as usize).unwrap(), n))
        .collect()
}

#[test]
fn sweep_counts_exactly_what_was_assembled() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build(dir.path(), "libx.so", LIB_BODY, "lib", Some("libx.so.1"), &[]);
    let SweepOutcome::X86_64(scan) = Sweeper::default().sweep_elf(&std::fs::read(&lib).unwrap()).unwrap() else {
        panic!("not x86-64")
    };
    let expected: BTreeMap<Code, u32> = [(Code::Add_rm32_r32, 2), (Code::Imul_r64_rm64, 1), (Code::Retnq, 1)]
        .into_iter()
        .collect();
    assert_eq!(counts(&scan), expected);
    assert_eq!(scan.invalid_bytes, 0);
    assert_eq!(scan.soname.as_deref(), Some("libx.so.1"));
    assert_eq!(scan.kind, Some(hbt_coverage::sweep::ElfKind::SharedObject));

    let exe = build(dir.path(), "app", APP_BODY, "exe", None, &[&lib]);
    let SweepOutcome::X86_64(scan) = Sweeper::default().sweep_elf(&std::fs::read(&exe).unwrap()).unwrap() else {
        panic!()
    };
    let c = counts(&scan);
    assert_eq!(c.get(&Code::Popcnt_r64_rm64), Some(&1));
    assert_eq!(c.get(&Code::Syscall), Some(&1));
    assert_eq!(scan.needed, vec!["libx.so.1".to_string()]);
    assert_eq!(scan.kind, Some(hbt_coverage::sweep::ElfKind::Executable));
}

#[test]
fn non_x86_and_relocatable_elf_are_classified() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.s");
    std::fs::write(&src, "nop\n").unwrap();
    let obj = dir.path().join("a.o");
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
    let bytes = std::fs::read(&obj).unwrap();
    assert!(matches!(
        Sweeper::default().sweep_elf(&bytes),
        Ok(SweepOutcome::NotLoadable { e_type: 1 })
    ));
    let mut arm = bytes.clone();
    arm[18] = 183; // EM_AARCH64
    assert!(matches!(
        Sweeper::default().sweep_elf(&arm),
        Ok(SweepOutcome::OtherArch { machine: 183, .. })
    ));
}

fn options<'a>(pop: &'a Popularity, set: &'a InstructionSet, model: CpuModel, g: Granularity) -> AnalysisOptions<'a> {
    AnalysisOptions {
        popularity: pop,
        cpu_model: model,
        supported: set,
        granularity: g,
        next_count: 20,
        compare_top: None,
    }
}

#[test]
fn installed_root_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let root = fake_root(dir.path());
    let corpus = scan_root(&root, Shard::WHOLE, &mut ScanCache::disabled(), &NoProgress).unwrap();
    assert_eq!(
        corpus.binaries.len(),
        3,
        "{:?}",
        corpus.binaries.iter().map(|b| &b.path).collect::<Vec<_>>()
    );
    assert_eq!(corpus.counts.malformed, 1);
    assert!(
        corpus.warnings.iter().any(|w| w.path == "/usr/bin/broken"
            && w.detail.contains("malformed ELF")
            && w.detail.contains("truncated")),
        "{:?}",
        corpus.warnings
    );
    assert_eq!(corpus.packages.len(), 5);
    // merged /usr: the library is attributed although dpkg lists it under /lib.
    let lib = corpus
        .binaries
        .iter()
        .find(|b| b.path.ends_with("libfoo.so.1"))
        .unwrap();
    assert_eq!(lib.path, "/usr/lib/x86_64-linux-gnu/libfoo.so.1");
    assert_eq!(lib.package.as_deref(), Some("libfoo1"));

    // Footprints: app = app + libfoo (interp is not in this root, so it is unresolved).
    let fp = footprints(&corpus);
    let app = fp.packages.iter().find(|p| p.name == "app").unwrap();
    assert_eq!(app.closure, 2);
    assert!(app.codes.contains(Code::Imul_r64_rm64 as usize) && app.codes.contains(Code::Popcnt_r64_rm64 as usize));
    assert_eq!(fp.unresolved.get("/lib64/ld-linux-x86-64.so.2"), Some(&1));

    // P(app)=0.5, P(libfoo1)=0.25, P(avxtool)=0.25 of 1000 submissions.
    let pop_path = popcon(dir.path(), 1000, &[("app", 500), ("libfoo1", 250), ("avxtool", 250)]);
    let pop = Popularity::from_file(&pop_path, None).unwrap();
    let all = InstructionSet::all();
    let none = InstructionSet::none();
    let r = analyze(&corpus, &options(&pop, &all, CpuModel::All, Granularity::Code));
    assert_eq!(r.supported.weighted_completeness, 1.0);
    assert_eq!((r.binaries, r.packages, r.packages_total), (3, 3, 5));
    assert_eq!(r.popularity.matched_exact, 3);
    let r = analyze(&corpus, &options(&pop, &none, CpuModel::All, Granularity::Code));
    assert_eq!(r.supported.weighted_completeness, 0.0);
    // add is used by app (via libfoo) and libfoo1: importance = 1 - 0.5*0.75 = 0.625.
    let add = r
        .instructions
        .iter()
        .find(|i| i.code.as_deref() == Some("Add_rm32_r32"))
        .unwrap();
    assert!((add.importance - 0.625).abs() < 1e-12);
    assert_eq!(add.occurrences, 2);
    assert!((add.package_share - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(r.plan.last().unwrap().weighted_completeness, 1.0);

    // Exactly the libfoo + app forms: WC = P(app) + P(libfoo1) = 0.75.
    let set = InstructionSet::parse(
        "Add_rm32_r32\nImul_r64_rm64\nRetnq\nMov_r32_imm32\nXor_rm32_r32\nPopcnt_r64_rm64\nSyscall\n",
        std::path::Path::new("set"),
    )
    .unwrap();
    let r = analyze(&corpus, &options(&pop, &set, CpuModel::All, Granularity::Code));
    assert!(
        (r.supported.weighted_completeness - 0.75).abs() < 1e-12,
        "{}",
        r.supported.weighted_completeness
    );
    assert_eq!(
        r.next.first().map(|s| s.instruction.as_str()),
        Some("VEX_Vpaddd_ymm_ymm_ymmm256")
    );

    // Under x86-64-v2 the AVX2 instruction is behind dispatch: avxtool is complete too.
    let r = analyze(&corpus, &options(&pop, &set, CpuModel::V2, Granularity::Code));
    assert!((r.supported.weighted_completeness - 1.0).abs() < 1e-12);
    assert_eq!(r.cpu_filter.instructions_removed, 1);
    assert_eq!(r.cpu_filter.packages_touched, 1);
    // Under x86-64-v1 popcnt is left out as well.
    let r = analyze(&corpus, &options(&pop, &none, CpuModel::V1, Granularity::Mnemonic));
    assert!(r
        .instructions
        .iter()
        .all(|i| i.mnemonic != "popcnt" && i.mnemonic != "vpaddd"));
    assert_eq!(r.cpu_filter.instructions_removed, 2);
}

#[test]
fn shards_merge_to_the_whole() {
    let dir = tempfile::tempdir().unwrap();
    let root = fake_root(dir.path());
    let whole = scan_root(&root, Shard::WHOLE, &mut ScanCache::disabled(), &NoProgress).unwrap();
    let parts: Vec<Part> = (1..=3)
        .map(|k| {
            let shard: Shard = format!("{k}/3").parse().unwrap();
            let scan = scan_root(&root, shard, &mut ScanCache::disabled(), &NoProgress).unwrap();
            // Through JSON, as between machines.
            let path = dir.path().join(format!("part{k}.json"));
            std::fs::write(&path, Part::new(shard, scan).to_json()).unwrap();
            Part::load(&path).unwrap()
        })
        .collect();
    let merged = merge(parts).unwrap();
    let mut a = whole.binaries.clone();
    a.sort_by(|x, y| x.path.cmp(&y.path));
    assert_eq!(merged.binaries, a);
    assert_eq!(merged.counts.malformed, whole.counts.malformed);
    assert_eq!(merged.packages, whole.packages);
    let one: Part = Part::new("1/2".parse().unwrap(), whole.clone());
    assert!(merge(vec![one]).unwrap_err().to_string().contains("2/2 is missing"));
}

#[test]
fn cache_makes_the_second_scan_skip_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let root = fake_root(dir.path());
    let cache_file = dir.path().join("cache");
    let (mut cache, _) = ScanCache::open(&cache_file);
    let cold = scan_root(&root, Shard::WHOLE, &mut cache, &NoProgress).unwrap();
    cache.save().unwrap();
    assert_eq!(cold.counts.cached, 0);
    assert!(cold.counts.fresh_code_bytes > 0);
    let (mut cache, problem) = ScanCache::open(&cache_file);
    assert!(problem.is_none());
    let warm = scan_root(&root, Shard::WHOLE, &mut cache, &NoProgress).unwrap();
    assert_eq!(warm.counts.fresh_code_bytes, 0);
    assert_eq!(warm.counts.cached, 4, "3 binaries + the malformed file");
    assert_eq!(warm.binaries, cold.binaries);
    assert_eq!(warm.counts.malformed, 1);
}

#[test]
fn debs_are_read_directly_and_broken_ones_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = fake_root(dir.path());
    let debs = dir.path().join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    for (pkg, files) in [
        ("libfoo1", vec!["/usr/lib/x86_64-linux-gnu/libfoo.so.1"]),
        ("app", vec!["/usr/bin/app"]),
    ] {
        let tree = dir.path().join(format!("tree-{pkg}"));
        std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
        std::fs::write(
            tree.join("DEBIAN/control"),
            format!(
                "Package: {pkg}\nVersion: 1.0\nArchitecture: amd64\nMaintainer: t <t@example.org>\nDescription: test\n"
            ),
        )
        .unwrap();
        for f in files {
            install(&tree, f, &root.join(f.trim_start_matches('/')));
        }
        for comp in ["xz", "gzip", "zstd"] {
            let out = debs.join(format!("{pkg}-{comp}.deb"));
            run(Command::new("dpkg-deb")
                .arg(format!("-Z{comp}"))
                .arg("--root-owner-group")
                .arg("--build")
                .arg(&tree)
                .arg(&out));
        }
    }
    let good = std::fs::read(debs.join("app-xz.deb")).unwrap();
    std::fs::write(debs.join("truncated.deb"), &good[..good.len() - 100]).unwrap();
    std::fs::write(debs.join("garbage.deb"), b"this is not an archive").unwrap();

    let corpus = scan_debs(&debs, Shard::WHOLE, &mut ScanCache::disabled(), &NoProgress).unwrap();
    assert_eq!(corpus.counts.broken_debs, 2, "{:?}", corpus.warnings);
    assert!(corpus
        .warnings
        .iter()
        .any(|w| w.path.ends_with("garbage.deb") && w.detail.contains("not a Debian package")));
    assert_eq!(corpus.binaries.len(), 6, "three compressions of two packages");
    assert!(corpus.binaries.iter().all(|b| b.package.is_some()));
    let fp = footprints(&corpus);
    let app = fp.packages.iter().find(|p| p.name == "app").unwrap();
    assert!(
        app.codes.contains(Code::Imul_r64_rm64 as usize),
        "libfoo resolved across debs"
    );
}
