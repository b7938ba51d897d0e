//! `hbt isa-test`: the per-instruction differential harness from the command line.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use hbt_translator::cpu::HostCpu;
use hbt_translator::harness::system::{Ring, SystemWorker};
use hbt_translator::harness::{feature_names, run_codes, run_codes_on, CodeResult, Options, Status};
use hbt_translator::rules::codes_with_rules;
use hbt_translator::supported::{self, code_by_name, supported_codes};
use iced_x86::Code;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Differential test of translated instructions against the host CPU.
///
/// For every selected instruction form (iced `Code`), synthesizes instances from its operand
/// kinds and runs each on many random and edge-value machine states: once natively and once
/// through the translator under each memory strategy (identity and soft-MMU, whose guest pages
/// live at other host addresses). Compares GPRs, RIP, RFLAGS (minus flags iced marks
/// undefined), x87/MMX/SSE/AVX state, the data memory and the exception raised. A failure
/// prints the instruction, the input state and every difference; it is reproducible with the
/// same --code and --seed.
///
/// By default tests the translator's supported set (what CI runs). Forms the host CPU cannot
/// execute (e.g. SSE4A on Intel) are listed as not executable, with the missing feature; the
/// report names the host (vendor, family/model/stepping, XCR0, notable flags), since what can be
/// verified depends on it.
///
/// The guest the harness models has every XSAVE component the translator manages on this host:
/// AMX and other XFD-armed state are never offered (CPUID and `xgetbv` hide them).
///
/// Examples:
///   hbt isa-test                                   # every supported Code, 200 cases each
///   hbt isa-test --mnemonic add --cases 1000
///   hbt isa-test --code Add_rm64_r64 --seed 7 --format json
///   hbt isa-test --all --write-supported translator/src/supported.txt
///   hbt isa-test --system --cpl0 --mnemonic wrmsr --cases 1000
///
/// HBT_ISA_EVERY_FAILURE=1 reports every failing case on stderr instead of stopping at the
/// first (for finding out where a reference differs).
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct IsaTestArgs {
    /// Test this Code (iced name, e.g. Add_rm64_r64); repeatable.
    #[arg(long = "code", value_name = "NAME")]
    codes: Vec<String>,
    /// Test every Code of this mnemonic (e.g. add); repeatable.
    #[arg(long = "mnemonic", value_name = "NAME")]
    mnemonics: Vec<String>,
    /// Test every Code that has a translation rule (the candidates), not just the supported set.
    #[arg(long)]
    all: bool,
    /// Cases per Code and memory strategy.
    #[arg(long, default_value_t = 200)]
    cases: u32,
    /// Seed for instance and state generation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,
    /// Merge the results into FILE (the supported-set data file): forms that passed are added,
    /// forms that failed are removed, and forms this host cannot execute or did not test keep
    /// their lines (noted as verified elsewhere). The header names this host.
    #[arg(long, value_name = "FILE")]
    write_supported: Option<PathBuf>,
    /// Show skipped Codes in the table too.
    #[arg(long)]
    verbose: bool,
    /// System mode: run each instance inside a small guest machine (page tables with random
    /// U/S, R/W, NX, A/D bits around the data, an IDT whose handlers stop the machine) once on
    /// KVM (the reference: CPL3 code runs on the host CPU) and once through the translator in
    /// system mode, and compare registers, flags, memory, page-table A/D bits and the delivered
    /// exception (vector, error code, CR2, frame). Needs /dev/kvm.
    #[arg(long)]
    system: bool,
    /// With --system: run the instances at CPL0, where KVM's in-kernel instruction emulator is
    /// the reference, in a machine whose GDT and LDT hold every kind of descriptor, and with
    /// operands that keep it running (CR values that keep long mode on or break it on purpose,
    /// MSRs both engines model, descriptor-table images, iretq/sysretq frames, XCR0 values).
    /// Compares system registers, debug registers, MSRs, GDTR/IDTR/TR/LDTR, the GDT page and
    /// port writes too. Without --code/--mnemonic it tests the supported forms whose rule is a
    /// privileged or system one. What KVM cannot run, or runs differently from the CPU on this
    /// host, is listed at the end as "not compared: KVM cannot serve as reference".
    #[arg(long, requires = "system")]
    cpl0: bool,
    /// With --system: run 32-bit code at CPL3 (compatibility mode, as a 64-bit kernel runs
    /// 32-bit programs): instances are encoded and decoded as IA-32 (eight registers of each
    /// kind, 32-bit addressing) and run with a 32-bit code segment, where kvm_pvm's reference is
    /// the CPU itself. Without --code/--mnemonic it tests every 32-bit form with a translation
    /// rule whose 64-bit counterpart is in the supported set, and the forms only 32-bit code has
    /// (4-byte push/pop/call/ret, `inc`/`dec` r32, 32-bit `jcc`/`loop`/`jecxz`). --code takes
    /// iced's names of 32-bit forms (e.g. Push_r32).
    #[arg(long, requires = "system", conflicts_with = "cpl0")]
    compat: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

fn selection(args: &IsaTestArgs) -> Result<Vec<Code>> {
    let mut codes = Vec::new();
    for name in &args.codes {
        match code_by_name(name) {
            Some(c) => codes.push(c),
            None => bail!("unknown Code `{name}` (iced-x86 names, e.g. Add_rm64_r64)"),
        }
    }
    let rule_of = if args.compat {
        hbt_translator::rules::rule_compat
    } else {
        hbt_translator::rules::rule
    };
    for name in &args.mnemonics {
        let found: Vec<Code> = Code::values()
            .filter(|c| format!("{:?}", c.mnemonic()).eq_ignore_ascii_case(name) && rule_of(*c).is_some())
            .filter(|c| !args.compat || c.op_code().mode32())
            .collect();
        if found.is_empty() {
            bail!("no Code with mnemonic `{name}` has a translation rule");
        }
        codes.extend(found);
    }
    if codes.is_empty() && args.compat {
        // A shared form (the same Code in both modes) is claimed where its 64-bit use is
        // verified; a form only 32-bit code has is claimed through its rule.
        let supported: std::collections::HashSet<Code> = supported_codes().iter().copied().collect();
        codes = Code::values()
            .filter(|c| c.op_code().mode32() && rule_of(*c).is_some())
            .filter(|c| args.all || !c.op_code().mode64() || supported.contains(c))
            .collect();
    }
    if codes.is_empty() {
        codes = if args.all {
            codes_with_rules().collect()
        } else {
            supported_codes().to_vec()
        };
        if args.cpl0 {
            codes.retain(|&c| hbt_translator::harness::system::cpl0_form(c));
        }
    }
    codes.sort_by_key(|&c| c as u32);
    codes.dedup();
    Ok(codes)
}

pub fn run(args: IsaTestArgs) -> Result<()> {
    let codes = selection(&args)?;
    if args.cases == 0 {
        bail!("--cases must be at least 1");
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let opts = Options {
        cases: args.cases,
        seed: args.seed,
    };
    let done = AtomicUsize::new(0);
    let total = codes.len();
    let tty = std::io::stderr().is_terminal();
    let progress = |r: &CodeResult| {
        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
        if r.status == Status::Failed {
            diag!("FAIL {:?}: {}", r.code, r.failure.as_deref().unwrap_or(""));
        }
        if tty && (n.is_multiple_of(25) || n == total) {
            eprint!("\r{n}/{total} instruction forms tested");
            if n == total {
                diag!();
            }
        }
    };
    let started = std::time::Instant::now();
    let results = if args.system {
        crate::vmm::isa_system::check_kvm()?;
        let make = |_: usize| {
            let reference = crate::vmm::isa_system::KvmReference::new().map_err(|e| format!("{e:#}"))?;
            SystemWorker::new(
                Box::new(reference),
                Box::new(crate::vmm::isa_system::ModelPlatform),
                if args.cpl0 { Ring::Kernel } else { Ring::User },
                if args.compat { 32 } else { 64 },
            )
        };
        run_codes_on(&codes, &opts, threads, &make, &progress)
    } else {
        run_codes(&codes, &opts, threads, &progress)
    }
    .map_err(anyhow::Error::msg)?;
    let elapsed = started.elapsed();
    let passed = results.iter().filter(|r| r.status == Status::Passed).count();
    let failed = results.iter().filter(|r| r.status == Status::Failed).count();
    let not_executable: Vec<&CodeResult> = results
        .iter()
        .filter(|r| matches!(r.status, Status::NotExecutable(_)))
        .collect();
    let skipped = results.len() - passed - failed - not_executable.len();
    let cases: u64 = results.iter().map(|r| r.cases).sum();

    let host = HostCpu::get().describe();
    if let Some(path) = &args.write_supported {
        write_supported(path, &results, &host)?;
    }

    match args.format {
        OutputFormat::Json => {
            let strategies: &[&str] = if args.system {
                &["system-kvm-vs-bt"]
            } else {
                &["identity", "soft-mmu"]
            };
            let codes_json: Vec<_> = results
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "code": format!("{:?}", r.code),
                        "mnemonic": r.mnemonic,
                        "cases": r.cases,
                        "uncompared": r.uncompared,
                        "passed_on_rerun": r.passed_on_rerun,
                        "uncompared_reasons": r
                            .uncompared_reasons
                            .iter()
                            .map(|(why, n)| serde_json::json!({"reason": why, "cases": n}))
                            .collect::<Vec<_>>(),
                        "strategies": strategies,
                        "status": r.status.label(),
                        "reason": r.status.reason(),
                        "first_failure": r.failure,
                    })
                })
                .collect();
            let doc = serde_json::json!({
                "seed": args.seed,
                "system": args.system,
                "cpl": if args.cpl0 { 0 } else { 3 },
                "bitness": if args.compat { 32 } else { 64 },
                "cases_per_strategy": args.cases,
                "host": host,
                "passed": passed,
                "failed": failed,
                "not_executable": not_executable.len(),
                "skipped": skipped,
                "total_cases": if args.system { cases } else { cases * 2 },
                "codes": codes_json,
            });
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        }
        OutputFormat::Table => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "host: {host}\n")?;
            writeln!(out, "{:<44} {:<12} {:>7}  status", "code", "mnemonic", "cases")?;
            for r in &results {
                let status = match &r.status {
                    Status::Passed => "passed".to_string(),
                    Status::Failed => "FAILED".to_string(),
                    Status::NotExecutable(missing) => format!("not executable here (needs {})", feature_names(missing)),
                    Status::NoReference(why) => format!("not compared: {why}"),
                    Status::Skipped(why) if args.verbose => format!("skipped: {why}"),
                    Status::Skipped(_) => continue,
                };
                writeln!(
                    out,
                    "{:<44} {:<12} {:>7}  {status}",
                    format!("{:?}", r.code),
                    r.mnemonic,
                    r.cases
                )?;
            }
            if args.system {
                let no_reference = results
                    .iter()
                    .filter(|r| matches!(r.status, Status::NoReference(_)))
                    .count();
                let uncompared: u64 = results.iter().map(|r| r.uncompared).sum();
                let reruns: u64 = results.iter().map(|r| r.passed_on_rerun).sum();
                writeln!(
                    out,
                    "\n{passed} passed, {failed} failed, {} not executable on this host, {no_reference} without a reference, {} skipped; {cases} cases compared under KVM and the translator at CPL{} ({uncompared} not compared; {reruns} agreed only when run again from the same inputs) in {:.1} s",
                    not_executable.len(),
                    skipped - no_reference,
                    if args.cpl0 { 0 } else { 3 },
                    elapsed.as_secs_f64()
                )?;
                write_unreferenced(&mut out, &results)?;
            } else {
                writeln!(
                    out,
                    "\n{passed} passed, {failed} failed, {} not executable on this host, {skipped} skipped; {} cases run ({} per strategy × identity, soft-mmu) in {:.1} s",
                    not_executable.len(),
                    cases * 2,
                    cases,
                    elapsed.as_secs_f64()
                )?;
            }
            for r in results.iter().filter(|r| r.status == Status::Failed) {
                writeln!(out, "\nFAILED {:?}: {}", r.code, r.failure.as_deref().unwrap_or(""))?;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} instruction form(s) failed the differential test");
    }
    Ok(())
}

/// The system mode's list of what was not compared because KVM cannot serve as the reference
/// (the whole form, or some of its cases), grouped by reason.
fn write_unreferenced(out: &mut impl Write, results: &[CodeResult]) -> Result<()> {
    let mut by_reason: Vec<(String, Vec<String>)> = Vec::new();
    let mut add = |why: &str, what: String| match by_reason.iter_mut().find(|(w, _)| w == why) {
        Some((_, forms)) => forms.push(what),
        None => by_reason.push((why.to_string(), vec![what])),
    };
    for r in results {
        match &r.status {
            Status::NoReference(why) => add(why, format!("{:?}", r.code)),
            Status::Passed | Status::Failed => {
                for (why, n) in &r.uncompared_reasons {
                    add(why, format!("{:?} ({n} of {} cases)", r.code, r.uncompared + r.cases));
                }
            }
            _ => {}
        }
    }
    if by_reason.is_empty() {
        return Ok(());
    }
    writeln!(out, "\nnot compared: KVM cannot serve as reference")?;
    for (why, forms) in by_reason {
        writeln!(out, "  {why}:\n    {}", forms.join(", "))?;
    }
    Ok(())
}

/// Merges `results` into the supported-set file at `path` (see `--write-supported`).
fn write_supported(path: &std::path::Path, results: &[CodeResult], host: &str) -> Result<()> {
    let previous = match std::fs::read_to_string(path) {
        Ok(text) => supported::parse_entries(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let tested: std::collections::HashMap<Code, &CodeResult> = results.iter().map(|r| (r.code, r)).collect();
    let mut entries = Vec::new();
    for (code, note) in previous {
        match tested.get(&code).map(|r| &r.status) {
            // Not tested in this run: the line stays as it was.
            None => entries.push((code, note)),
            Some(Status::NotExecutable(missing)) => entries.push((
                code,
                Some(note.unwrap_or_else(|| {
                    format!(
                        "verified on a host with {}; not executable where this file was last written",
                        feature_names(missing)
                    )
                })),
            )),
            Some(_) => {}
        }
    }
    entries.extend(
        results
            .iter()
            .filter(|r| r.status == Status::Passed)
            .map(|r| (r.code, None)),
    );
    let text = supported::render(host, &entries);
    std::fs::write(path, text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}
