//! `hbt coverage`: scan, weigh, measure, report — and `hbt coverage merge` for sharded scans.

use super::progress::TerminalProgress;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hbt_coverage::cache::ScanCache;
use hbt_coverage::corpus::{deb::scan_debs, root::scan_root, CorpusScan, Shard};
use hbt_coverage::cpu_model::CpuModel;
use hbt_coverage::instr_set::InstructionSet;
use hbt_coverage::part::{self, Part};
use hbt_coverage::popcon::Popularity;
use hbt_coverage::report::Format;
use hbt_coverage::{analyze, AnalysisOptions, Granularity};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Popularity-weighted x86-64 instruction usage of a Linux distribution.
///
/// Sweeps every x86-64 ELF binary of an installed system (or a directory of .deb files),
/// attributes it to its package, builds each package's footprint (its executables plus the
/// libraries they load), weights packages by Debian popularity-contest installs, and reports:
/// instruction importance, the weighted completeness of an instruction set (by default the
/// translator's supported set), and a greedy plan of which instruction to implement next.
///
/// importance(i) = 1 − Π(1 − P(p)) over packages p whose footprint uses i.
/// weighted completeness(S) = Σ P(p) over packages whose footprint ⊆ S / Σ P(p) over all.
///
/// Examples:
///   hbt coverage                                   # this system, embedded popcon data
///   hbt coverage --cpu-model x86-64-v3 --granularity code --format json -o wc.json
///   hbt coverage --debs ./pool --popcon by_inst --format html -o report.html
///   hbt coverage --shard 1/4 -o part1.json         # then: hbt coverage merge part*.json
///   hbt exec --census ls.census /bin/ls; hbt coverage --compare ls.census
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, verbatim_doc_comment)]
pub struct CoverageArgs {
    #[command(subcommand)]
    merge: Option<MergeCommand>,
    #[command(flatten)]
    scan: ScanArgs,
    #[command(flatten)]
    report: ReportArgs,
}

#[derive(Subcommand)]
enum MergeCommand {
    /// Merge part files written with --shard K/N and report on the whole corpus.
    ///
    /// Example: hbt coverage merge part-*.json --format json -o coverage.json
    Merge {
        /// Part files, one per shard (all shards of one split).
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        #[command(flatten)]
        report: ReportArgs,
    },
}

#[derive(Args)]
struct ScanArgs {
    /// Installed Debian/Ubuntu system to scan (files attributed through its dpkg database).
    #[arg(long, value_name = "DIR", default_value = "/", conflicts_with = "debs")]
    root: PathBuf,
    /// Directory of .deb files to read directly instead of an installed root.
    #[arg(long, value_name = "DIR")]
    debs: Option<PathBuf>,
    /// Scan only shard K of N (1-based) and write a part file for `hbt coverage merge`.
    #[arg(long, value_name = "K/N")]
    shard: Option<Shard>,
    /// Scan cache file [default: $XDG_CACHE_HOME/hbt/coverage.cache or ~/.cache/hbt/coverage.cache].
    #[arg(long, value_name = "FILE")]
    cache: Option<PathBuf>,
    /// Neither read nor write the scan cache.
    #[arg(long, conflicts_with = "cache")]
    no_cache: bool,
}

#[derive(Args)]
struct ReportArgs {
    /// Popcon `by_inst` file [default: embedded 2018 Ubuntu+Debian snapshot, 9,332 packages].
    #[arg(long, value_name = "FILE")]
    popcon: Option<PathBuf>,
    /// Number of popcon submissions (the weight denominator) [default: read from the file header].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    submissions: Option<u64>,
    /// Instructions outside this CPU model are assumed to sit behind runtime dispatch and are
    /// left out of footprints: x86-64-v1, x86-64-v2, x86-64-v3, x86-64-v4, host, all.
    #[arg(long, value_name = "MODEL", default_value = "all")]
    cpu_model: CpuModel,
    /// Instruction set whose weighted completeness is reported: translator, all, none, or a file
    /// of iced Code names and/or mnemonics, one per line.
    #[arg(long, value_name = "SET", default_value = "translator")]
    supported: String,
    /// Compare a run's census (`hbt exec --census FILE`, `hbt run --census FILE`) with the
    /// distribution: its weighted completeness, and which of the --compare-top most important
    /// instructions it never executed (a mnemonic counts as executed when any form of it was).
    #[arg(long, value_name = "FILE", conflicts_with = "supported")]
    compare: Option<PathBuf>,
    /// With --compare: how many of the most important instructions to look at.
    #[arg(long, value_name = "N", default_value_t = 100, requires = "compare")]
    compare_top: usize,
    /// Count instruction forms (iced Code, e.g. Add_rm32_r32) or mnemonics (add).
    #[arg(long, value_name = "G", default_value = "mnemonic")]
    granularity: Granularity,
    /// Output format: table, json, csv (instruction table), html (self-contained, with charts) or
    /// markdown (supported-set status: WC per CPU model and what to implement next)
    /// [default: from the -o extension, else table].
    #[arg(long, value_name = "FMT")]
    format: Option<Format>,
    /// Write the report (or, with --shard, the part file) here instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// How many steps of the "implement next" plan to show.
    #[arg(long, value_name = "N", default_value_t = 20)]
    next: usize,
    /// No progress bar and no warning lines on stderr.
    #[arg(short, long)]
    quiet: bool,
}

pub fn run(args: CoverageArgs) -> Result<()> {
    let started = Instant::now();
    match args.merge {
        Some(MergeCommand::Merge { parts, report }) => {
            let loaded = parts.iter().map(|p| Part::load(p)).collect::<Result<Vec<_>, _>>()?;
            let corpus = part::merge(loaded)?;
            report_on(&corpus, &report, started)
        }
        None => {
            let scan = &args.scan;
            let mut cache = open_cache(scan, args.report.quiet);
            let progress = TerminalProgress::new(args.report.quiet);
            let shard = scan.shard.unwrap_or(Shard::WHOLE);
            let corpus = match &scan.debs {
                Some(dir) => scan_debs(dir, shard, &mut cache, &progress)?,
                None => scan_root(&scan.root, shard, &mut cache, &progress)?,
            };
            if let Err(e) = cache.save() {
                diag!("warning: {e}");
            }
            if scan.shard.is_some() {
                let json = Part::new(shard, corpus).to_json();
                return write_output(args.report.output.as_deref(), &json);
            }
            report_on(&corpus, &args.report, started)
        }
    }
}

fn open_cache(scan: &ScanArgs, quiet: bool) -> ScanCache {
    if scan.no_cache {
        return ScanCache::disabled();
    }
    let Some(path) = scan.cache.clone().or_else(ScanCache::default_path) else {
        return ScanCache::disabled();
    };
    let (cache, problem) = ScanCache::open(&path);
    if let (Some(p), false) = (problem, quiet) {
        diag!("warning: {p}");
    }
    cache
}

fn report_on(corpus: &CorpusScan, args: &ReportArgs, started: Instant) -> Result<()> {
    let popularity = match &args.popcon {
        Some(path) => Popularity::from_file(path, args.submissions)?,
        None => {
            let mut p = Popularity::embedded();
            if let Some(n) = args.submissions {
                p.submissions = n;
            }
            p
        }
    };
    let supported = match (&args.compare, args.supported.as_str()) {
        (Some(census), _) => InstructionSet::from_file(census)
            .with_context(|| format!("--compare {}: expected a census file", census.display()))?,
        (None, "translator") => InstructionSet::translator(),
        (None, "all") => InstructionSet::all(),
        (None, "none") => InstructionSet::none(),
        (None, file) => InstructionSet::from_file(Path::new(file))
            .with_context(|| format!("--supported {file}: expected translator, all, none or a readable file"))?,
    };
    if !args.quiet {
        const SHOWN: usize = 30;
        for w in corpus.warnings.iter().take(SHOWN) {
            diag!("warning: {}: {}", w.path, w.detail);
        }
        if corpus.warnings.len() > SHOWN {
            diag!(
                "warning: … and {} more (all are listed in --format json)",
                corpus.warnings.len() - SHOWN
            );
        }
        for (line, text) in popularity.bad_lines.iter().take(SHOWN) {
            diag!("warning: {}:{line}: not a popcon record: {text}", popularity.source);
        }
    }
    if corpus.binaries.is_empty() {
        bail!("{}: no x86-64 ELF binaries found", corpus.source);
    }
    let mut report = analyze(
        corpus,
        &AnalysisOptions {
            popularity: &popularity,
            cpu_model: args.cpu_model,
            supported: &supported,
            granularity: args.granularity,
            next_count: args.next,
            compare_top: args.compare.as_ref().map(|_| args.compare_top),
        },
    );
    report.timing.seconds = started.elapsed().as_secs_f64();
    let format = args
        .format
        .unwrap_or_else(|| format_from_extension(args.output.as_deref()));
    write_output(args.output.as_deref(), &report.render(format))
}

fn format_from_extension(output: Option<&Path>) -> Format {
    match output.and_then(|p| p.extension()).and_then(|e| e.to_str()) {
        Some("json") => Format::Json,
        Some("csv") => Format::Csv,
        Some("html") | Some("htm") => Format::Html,
        Some("md") => Format::Markdown,
        _ => Format::Table,
    }
}

fn write_output(output: Option<&Path>, text: &str) -> Result<()> {
    match output {
        Some(path) => std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display())),
        None => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r.context("cannot write to stdout"),
            }
        }
    }
}
